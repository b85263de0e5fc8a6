"""Exports: one training run, a standalone recommender at every Matryoshka size (fMRLRec), or the
standalone click model (DLRM).

    fmrl export runs/demo --sizes 16,64,128 [--out URL]
    fmrl export runs/dlrm-synthetic [--out URL]                  # a DLRM run: no sizes

For each size m the export folder ``size-<m>/`` holds

* ``model.safetensors``: the LRU trunk sliced to width m (``slice_state_dict``);
* ``items.safetensors``: the item table at size m, ``(N + 1, m)``, precomputed from the frozen features
  (and the ID table) through the projector, so serving needs neither the features nor the projector;
* ``config.json``: the model config at size m and the number of items.

``export.json`` (written last) lists the sizes with their bytes. Everything is safetensors and JSON:
loading never unpickles. :func:`load_recommender` turns one size back into a :class:`Recommender`.

The input is a finished run folder (its ``config.yaml`` and ``model.safetensors``, the best model) or a
sharded checkpoint (:func:`load_checkpoint_model`): one ``step-N`` folder, or a checkpoint root, whose
newest complete checkpoint names the one holding the best weights. A checkpoint's commit marker carries
the run's config, so the export needs no run folder; the checkpoint may come from any world size.

A DLRM (``task: dlrm``) has no nested sizes: :func:`export_dlrm` writes ``model.safetensors`` (the whole
model, tables included), ``config.json`` (its :class:`~models.dlrm.DLRMConfig`) and ``export.json``, and
:func:`load_click_model` turns them into a :class:`ClickModel` that predicts click probabilities.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from data_pipeline.features import load_feature_tables
from data_pipeline.storage import StorageOptions, atomic_write, exists, is_remote, join, open_read
from models.dlrm import DLRM, DLRMConfig, ids_to_kjt
from models.fmrl import FMRLConfig, FMRLRec, LRUTrunk, slice_state_dict

EXPORT_VERSION = 1


class ExportError(ValueError):
    """A run folder or an export that cannot be used; the message names the file."""


def _read(url: str, options: StorageOptions | None) -> bytes:
    with open_read(url, options) as f:
        return f.read()


def _write(url: str, data: bytes, options: StorageOptions | None) -> int:
    with atomic_write(url, options) as f:
        f.write(data)
    return len(data)


def load_trained_model(run_dir: str, options: StorageOptions | None = None) -> FMRLRec | DLRM:
    """The best model of a finished run: its config, the dataset's frozen features (fMRL) or its feature
    list (DLRM), its weights."""
    from trainer.config import load_config

    config_path = os.path.join(run_dir, "config.yaml")
    weights_path = os.path.join(run_dir, "model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise ExportError(f"{path} is missing: {run_dir!r} is not a finished run folder")
    cfg = load_config(config_path)
    if cfg.task == "dlrm":
        from data_pipeline.criteo import CTRDataset

        try:
            dataset = CTRDataset.open(cfg.data.path, options)
        except (OSError, ValueError) as error:
            raise ExportError(
                f"the DLRM run {run_dir!r} needs its data set's feature list ({cfg.data.path}): {error}; "
                "export one of its checkpoints instead (their markers carry the list)"
            ) from error
        model_cfg = cfg.dlrm.model_config(
            num_dense=len(dataset.dense_features),
            hash_buckets=dataset.hash_buckets,
            feature_names=dataset.sparse_features,
        )
        return _dlrm_with_weights(model_cfg, st_load(_read(weights_path, options)), weights_path)
    needs_features = cfg.model.use_text_features or cfg.model.use_image_features
    text, image, info = (None, None, None)
    if needs_features:
        text, image, info = load_feature_tables(cfg.data.features_url, options)
    weights = st_load(_read(weights_path, options))
    num_items = info["num_items"] if info else int(weights["item_tower.id_embedding.weight"].shape[0]) - 1
    model = FMRLRec(cfg.model, num_items, text, image)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise ExportError(
            f"{weights_path} does not fit the run's config: unexpected {sorted(unexpected)[:3]}, "
            f"missing {sorted(set(missing) - frozen)[:3]}"
        )
    return model.eval()


def load_checkpoint_model(url: str, options: StorageOptions | None = None) -> FMRLRec | DLRM:
    """The model held by a sharded checkpoint (a ``step-N`` folder), or, for a checkpoint root, by the
    checkpoint that its newest complete one names as holding the best weights (else the newest)."""
    from sharding.fmrl import DenseFMRL
    from trainer.checkpoint import COMMIT, CheckpointManager
    from trainer.config import config_from_dict

    url = url.rstrip("/")
    if not exists(join(url, COMMIT), options):
        root = CheckpointManager(url, options)
        latest = root.latest()
        if latest is None:
            raise ExportError(
                f"{url} is neither a finished run folder (config.yaml + model.safetensors) nor a "
                "complete checkpoint nor a folder of checkpoints"
            )
        best = root.marker(latest).get("best_step")
        url = root.url(best) if best and exists(join(root.url(best), COMMIT), options) else latest
    manager = CheckpointManager(url.rsplit("/", 1)[0], options)
    marker = manager.marker(url)
    if "config" not in marker:
        raise ExportError(f"{url}/{COMMIT} records no config (an older checkpoint); export its run folder")
    cfg = config_from_dict(marker["config"])
    state = manager.read_full(url)
    if cfg.task == "dlrm":
        model_cfg = cfg.dlrm.model_config(
            num_dense=int(marker["num_dense"]),
            hash_buckets=list(marker["hash_buckets"]),
            feature_names=list(marker["sparse_features"]),
        )
        weights = {k.removeprefix("dense."): v for k, v in state.items() if k.startswith("dense.")}
        prefix = "tables."
        weights.update(
            {"sparse_arch." + k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
        return _dlrm_with_weights(model_cfg, weights, url)
    text, image = None, None
    if cfg.model.use_text_features or cfg.model.use_image_features:
        text, image, _ = load_feature_tables(cfg.data.features_url, options)
    model = FMRLRec(cfg.model, int(marker["num_items"]), text, image)
    dense = {k.removeprefix("dense."): v for k, v in state.items() if k.startswith("dense.")}
    DenseFMRL(model).load_state_dict(dense)  # strict: names the first key that does not fit
    tables = [v for k, v in state.items() if k.startswith("tables.") and k.endswith(".weight")]
    if cfg.model.use_id_embedding:
        if len(tables) != 1:
            raise ExportError(f"{url} should hold one ID table, found {len(tables)}")
        with torch.no_grad():
            model.item_tower.id_embedding.weight.copy_(tables[0])
    return model.eval()


def load_model(url: str, options: StorageOptions | None = None) -> FMRLRec | DLRM:
    """A finished run folder (``config.yaml`` present) or a checkpoint: the model to export."""
    if not is_remote(url) and os.path.exists(os.path.join(url, "config.yaml")):
        return load_trained_model(url, options)
    return load_checkpoint_model(url, options)


@torch.no_grad()
def export_sizes(
    model: FMRLRec, out_url: str, sizes: list[int], options: StorageOptions | None = None
) -> dict[str, Any]:
    """Write a standalone model per size in ``sizes`` (each one of the model's nested sizes)."""
    unknown = [m for m in sizes if m not in model.cfg.nested_sizes]
    if unknown:
        raise ExportError(f"sizes {unknown} are not nested sizes of this model ({model.cfg.nested_sizes})")
    state = {k: v for k, v in model.state_dict().items() if k.startswith("trunk.")}
    items = model.item_tower()  # (N + 1, D)
    manifest: dict[str, Any] = {"version": EXPORT_VERSION, "num_items": model.num_items, "sizes": {}}
    for m in sorted(sizes):
        folder = join(out_url, f"size-{m}")
        sliced = slice_state_dict(state, m)
        sub_cfg = dataclasses.replace(model.cfg, nested_sizes=[s for s in model.cfg.nested_sizes if s <= m])
        written = _write(join(folder, "model.safetensors"), st_save(sliced), options)
        written += _write(
            join(folder, "items.safetensors"), st_save({"items": items[:, :m].contiguous()}), options
        )
        config = {"model": dataclasses.asdict(sub_cfg), "num_items": model.num_items, "size": m}
        written += _write(join(folder, "config.json"), json.dumps(config, indent=1).encode(), options)
        manifest["sizes"][str(m)] = {"folder": f"size-{m}", "bytes": written}
    _write(join(out_url, "export.json"), json.dumps(manifest, indent=1).encode(), options)  # last
    return manifest


@dataclass
class Recommender:
    """A size-m model: LRU trunk of width m and the (N + 1, m) item table (row 0 is padding)."""

    size: int
    trunk: LRUTrunk
    items: torch.Tensor

    @torch.no_grad()
    def scores(self, histories: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded item-id histories -> (B, N) scores of items 1..N."""
        hidden = self.trunk(self.items[histories], histories > 0)  # (B, L, m)
        return hidden[:, -1] @ self.items[1:].T

    @torch.no_grad()
    def recommend(self, histories: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores, item ids 1..N), each (B, k)."""
        values, index = torch.topk(self.scores(histories), k, dim=1)
        return values, index + 1


def load_recommender(url: str, size: int, options: StorageOptions | None = None) -> Recommender:
    """Load the size-``size`` model of an export (safetensors and JSON only)."""
    manifest = json.loads(_read(join(url, "export.json"), options))
    if str(size) not in manifest["sizes"]:
        raise ExportError(f"{url} has sizes {sorted(map(int, manifest['sizes']))}, not {size}")
    folder = join(url, manifest["sizes"][str(size)]["folder"])
    config = json.loads(_read(join(folder, "config.json"), options))
    cfg = FMRLConfig(**config["model"])
    trunk = LRUTrunk(cfg)
    weights = st_load(_read(join(folder, "model.safetensors"), options))
    trunk.load_state_dict({k.removeprefix("trunk."): v for k, v in weights.items()})
    items = st_load(_read(join(folder, "items.safetensors"), options))["items"]
    if tuple(items.shape) != (config["num_items"] + 1, size):
        raise ExportError(
            f"{folder}/items.safetensors has shape {tuple(items.shape)}, expected ({config['num_items'] + 1}, {size})"
        )
    return Recommender(size, trunk.eval(), items)


# ------------------------------------------------------------------------------------------------ DLRM


def _dlrm_with_weights(cfg: DLRMConfig, weights: dict[str, torch.Tensor], source: str) -> DLRM:
    """A DLRM of ``cfg`` holding ``weights`` (named like ``DLRM.state_dict()``); every key must fit."""
    model = DLRM(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ExportError(
            f"{source} does not hold this DLRM: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shapes {wrong[:3]}"
        )
    model.load_state_dict(weights)
    return model.eval()


def export_dlrm(model: DLRM, out_url: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """Write the whole DLRM (``model.safetensors``, ``config.json``), then ``export.json``."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    written = _write(join(out_url, "model.safetensors"), st_save(state), options)
    config = {"task": "dlrm", "model": dataclasses.asdict(model.cfg)}
    written += _write(join(out_url, "config.json"), json.dumps(config, indent=1).encode(), options)
    manifest = {"version": EXPORT_VERSION, "task": "dlrm", "bytes": written}
    _write(join(out_url, "export.json"), json.dumps(manifest, indent=1).encode(), options)  # last
    return manifest


@dataclass
class ClickModel:
    """An exported DLRM: click probabilities of impressions."""

    model: DLRM

    @torch.no_grad()
    def predict(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """(B, N_d) dense features (log1p-scaled as in the data set) and (B, F) hashed ids -> (B,)
        click probabilities."""
        cfg = self.model.cfg
        if dense.ndim != 2 or dense.shape[1] != cfg.num_dense or sparse.shape != (len(dense), cfg.num_sparse):
            raise ValueError(
                f"expected dense (B, {cfg.num_dense}) and sparse (B, {cfg.num_sparse}), got "
                f"{tuple(dense.shape)} and {tuple(sparse.shape)}"
            )
        too_big = sparse >= torch.tensor(cfg.hash_buckets)
        if bool((sparse < 0).any() or too_big.any()):
            raise ValueError(f"ids must lie in [0, hash_buckets) per feature {cfg.hash_buckets}")
        return torch.sigmoid(self.model(dense.float(), ids_to_kjt(sparse.long(), cfg.sparse_names)))


def load_click_model(url: str, options: StorageOptions | None = None) -> ClickModel:
    """Load a DLRM export (safetensors and JSON only)."""
    manifest = json.loads(_read(join(url, "export.json"), options))
    if manifest.get("task") != "dlrm":
        raise ExportError(f"{url} is not a DLRM export (use load_recommender for fMRL exports)")
    config = json.loads(_read(join(url, "config.json"), options))
    weights = st_load(_read(join(url, "model.safetensors"), options))
    return ClickModel(_dlrm_with_weights(DLRMConfig(**config["model"]), weights, url))


def export_model(
    model: FMRLRec | DLRM, out_url: str, sizes: list[int] | None, options: StorageOptions | None = None
) -> dict[str, Any]:
    """Export any trained model: fMRL at ``sizes`` (required), DLRM whole (``sizes`` must be None)."""
    if isinstance(model, DLRM):
        if sizes:
            raise ExportError("a DLRM has no nested sizes: leave out --sizes")
        return export_dlrm(model, out_url, options)
    if not sizes:
        raise ExportError(f"name the nested sizes to export (--sizes), some of {model.cfg.nested_sizes}")
    return export_sizes(model, out_url, sizes, options)
