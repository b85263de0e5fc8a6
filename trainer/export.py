"""Exports: one training run, a standalone recommender at every Matryoshka size (fMRLRec), or the
standalone click model (DLRM).

    fmrl export runs/demo --sizes 16,64,128 [--out URL]
    fmrl export runs/dlrm-synthetic [--out URL]                  # a DLRM run: no sizes

For each size m the export folder ``size-<m>/`` holds

* ``model.safetensors``: the LRU trunk sliced to width m (``slice_state_dict``);
* ``items.safetensors``: the item table at size m, ``(N + 1, m)``, precomputed from the frozen features
  (and the ID table) through the projector, so serving needs neither the features nor the projector;
* ``config.json``: the model config at size m and the number of items.

``export.json`` (written last) lists the sizes with their bytes and the training ``max_len`` (the most
recent items of a history the model was trained on; the recommender keeps that many). Everything is
safetensors and JSON: loading never unpickles. :func:`load_recommender` turns one size back into a :class:`Recommender`.

The input is a finished run folder (its ``config.yaml`` and ``model.safetensors``, the best model) or a
sharded checkpoint (:func:`load_checkpoint_model`): one ``step-N`` folder, or a checkpoint root, whose
newest complete checkpoint names the one holding the best weights. A checkpoint's commit marker carries
the run's config, so the export needs no run folder; the checkpoint may come from any world size.

A run folder is exported streamed (:func:`export_trained`: :func:`open_run_items`, then
:func:`export_items`): the model's item tables stay on meta and the item table is computed and written
:data:`EXPORT_BLOCK_ROWS` items at a time from range reads of the ID table and the feature files, so no
item table is ever whole in memory, at any catalog size. A model held in memory (a checkpoint's, or one
passed to :func:`export_sizes`) goes through the same :func:`export_items` and writes the same files.

A DLRM (``task: dlrm``) has no nested sizes: :func:`export_dlrm` writes ``model.safetensors`` (the whole
model, tables included), ``config.json`` (its :class:`~models.dlrm.DLRMConfig`) and ``export.json``, and
:func:`load_click_model` turns them into a :class:`ClickModel` that predicts click probabilities.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from data_pipeline.features import (
    FeatureTableReader,
    load_feature_tables,
    open_feature_tables,
    write_safetensors_blocks,
)
from data_pipeline.storage import (
    StorageOptions,
    atomic_write,
    exists,
    is_remote,
    join,
    open_read,
    read_ranges,
    remove,
    s3_filesystem_kwargs,
    translated_errors,
)
from deploy import ExportError, Recommender
from deploy import artifact as deploy_artifact
from deploy import load_recommender as deploy_load_recommender
from deploy.artifact import check_finite, sha256
from deploy.portable import FILES as PORTABLE_FILES
from deploy.portable import program_bytes
from deploy.scoring import ScoringModel
from models.ctr import build_ctr_model
from models.dlrm import CTRModel, DLRMConfig, ids_to_kjt
from models.fmrl import AttributeBags, FMRLRec, slice_state_dict

log = logging.getLogger("fmrl")

EXPORT_VERSION = 3
"""2: export.json records each file's sha256, the model's fingerprint and the item catalog. 3: the
fingerprint hashes the model's weights and attribute bags (what the item table is computed from), so an
export that computes the table block by block can record it."""


def _read(url: str, options: StorageOptions | None) -> bytes:
    with open_read(url, options) as f:
        return f.read()


def _write(url: str, data: bytes, options: StorageOptions | None) -> int:
    with atomic_write(url, options) as f:
        f.write(data)
    return len(data)


def load_trained_model(
    run_dir: str, options: StorageOptions | None = None, features: str | None = None
) -> FMRLRec | CTRModel:
    """The best model of a finished run: its config, the dataset's frozen features (fMRL; ``features``
    names another copy of them) or its feature list (DLRM), its weights."""
    cfg, weights_path = _run_files(run_dir)
    if cfg.task == "dlrm":
        from data_pipeline.ctr import CTRDataset

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
        text, image, info = load_feature_tables(features or cfg.data.features_url, options)
    weights = st_load(_read(weights_path, options))
    num_items = info["num_items"] if info else int(weights["item_tower.id_embedding.weight"].shape[0]) - 1
    model = FMRLRec(cfg.model, num_items, text, image, _attribute_bags(cfg, options))
    _load_weights(model, weights, weights_path)
    return model.eval()


def _run_files(run_dir: str) -> tuple[Any, str]:
    """A finished run folder's config and the path of its weights (ExportError if either is missing)."""
    from trainer.config import load_saved_config

    config_path = os.path.join(run_dir, "config.yaml")
    weights_path = os.path.join(run_dir, "model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise ExportError(f"{path} is missing: {run_dir!r} is not a finished run folder")
    return load_saved_config(config_path), weights_path


def _load_weights(
    model: FMRLRec, weights: dict[str, torch.Tensor], source: str, streamed: frozenset[str] = frozenset()
) -> None:
    """Load a run's trained ``weights`` into ``model``: every key must be the model's, and every
    trainable weight there except the tables in ``streamed`` (read by row range instead); a weight
    holding NaN or infinity (a diverged run) is refused naming it."""
    check_finite(weights, source)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    absent = set(missing) - frozen - streamed
    if unexpected or absent:
        raise ExportError(
            f"{source} does not fit the run's config: unexpected {sorted(unexpected)[:3]}, "
            f"missing {sorted(absent)[:3]}"
        )


def load_checkpoint_model(
    url: str, options: StorageOptions | None = None, features: str | None = None
) -> FMRLRec | CTRModel:
    """The model held by a sharded checkpoint (a ``step-N`` folder), or, for a checkpoint root, by the
    checkpoint that its newest complete one names as holding the best weights (else the newest)."""
    from sharding.fmrl import DenseFMRL
    from trainer.checkpoint import COMMIT, CheckpointManager
    from trainer.config import config_from_dict, upgrade_saved_config

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
    cfg = config_from_dict(upgrade_saved_config(marker["config"]))
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
        text, image, _ = load_feature_tables(features or cfg.data.features_url, options)
    model = FMRLRec(cfg.model, int(marker["num_items"]), text, image, _attribute_bags(cfg, options))
    dense = {k.removeprefix("dense."): v for k, v in state.items() if k.startswith("dense.")}
    check_finite(state, url)
    DenseFMRL(model).load_state_dict(dense)  # strict: names the first key that does not fit
    tables = {
        k.removeprefix("tables.").split(".", 1)[0]: v
        for k, v in state.items()
        if k.startswith("tables.") and k.endswith(".weight")
    }
    expected = {"id": cfg.model.use_id_embedding, "attribute": cfg.model.use_attributes}
    wanted = sorted(name for name, used in expected.items() if used)
    if sorted(tables) != wanted:
        raise ExportError(f"{url} should hold the learnable tables {wanted}, found {sorted(tables)}")
    with torch.no_grad():
        for name, table in tables.items():
            module = model.item_tower.id_embedding if name == "id" else model.item_tower.attributes
            module.weight.copy_(table)
    return model.eval()


def open_attributes(dataset: Any, needed: bool = True) -> AttributeBags | None:
    """The items' attribute bags of a :class:`~data_pipeline.loader.SequenceDataset` (None if the model
    has no attribute table). Where the data set has an attribute index the arrays are memory-mapped
    copy-on-write (data_pipeline/item_index.py): the tensors share those pages without a copy, and
    nothing writes into them (a write would stay private to the process, never reach the file)."""
    if not needed:
        return None
    from data_pipeline.loader import read_item_attributes

    bags = read_item_attributes(dataset)
    return AttributeBags(torch.from_numpy(bags.offsets), torch.from_numpy(bags.values), bags.num_attributes)


def _attribute_bags(cfg: Any, options: StorageOptions | None) -> AttributeBags | None:
    """The items' attribute bags from the run's data set, if its model has an attribute table."""
    if not cfg.model.use_attributes:
        return None
    from data_pipeline.loader import SequenceDataset

    try:
        return open_attributes(SequenceDataset.open(cfg.data.path, options))
    except (OSError, ValueError) as error:
        raise ExportError(
            f"the model's attribute table needs its data set's item attributes: {error}"
        ) from error


def load_model(
    url: str, options: StorageOptions | None = None, features: str | None = None
) -> FMRLRec | CTRModel:
    """A finished run folder (``config.yaml`` present) or a checkpoint: the model to export. ``features``
    overrides where the frozen feature tables are read from (the config's ``data.features_url``)."""
    if _is_run_folder(url):
        return load_trained_model(url, options, features)
    return load_checkpoint_model(url, options, features)


def _is_run_folder(url: str) -> bool:
    return not is_remote(url) and os.path.exists(os.path.join(url, "config.yaml"))


def source_config(url: str, options: StorageOptions | None = None) -> Any:
    """The training config of a run folder or checkpoint (what `fmrl export` reads it with)."""
    from trainer.checkpoint import COMMIT, CheckpointManager
    from trainer.config import config_from_dict, load_saved_config, upgrade_saved_config

    if _is_run_folder(url):
        return load_saved_config(os.path.join(url, "config.yaml"))
    url = url.rstrip("/")
    if not exists(join(url, COMMIT), options):
        latest = CheckpointManager(url, options).latest()
        if latest is None:
            raise ExportError(
                f"{url} is neither a finished run folder (config.yaml + model.safetensors) nor a "
                "complete checkpoint nor a folder of checkpoints"
            )
        url = latest
    marker = CheckpointManager(url.rsplit("/", 1)[0], options).marker(url)
    return config_from_dict(upgrade_saved_config(marker["config"]))


@dataclass
class ItemCatalog:
    """What an export records about the items besides the model."""

    source_ids: list[str]
    """Per internal id (index), the item's id in the source data (ASIN, MovieLens id ...); [0] is ""."""
    popularity: torch.Tensor
    """(N + 1,) training interactions per item (index 0 is padding, 0): the answer for empty histories."""


def item_catalog(dataset_url: str, options: StorageOptions | None = None) -> ItemCatalog:
    """The catalog of a sequence data set: source ids from its item shards, popularity from the training
    parts of its users."""
    from data_pipeline.loader import SequenceDataset, read_item_source_ids, scan_users

    dataset = SequenceDataset.open(dataset_url, options)
    counts = torch.from_numpy(scan_users(dataset).train_item_counts.astype("float32"))
    return ItemCatalog(read_item_source_ids(dataset), counts)


EXPORT_BLOCK_ROWS = 65536
"""Items per block when an export projects and writes the item table: what it holds of any item table at
once is ``EXPORT_BLOCK_ROWS`` rows."""

TABLE_KEYS = {
    "text": "item_tower.text.weight",
    "image": "item_tower.image.weight",
    "id": "item_tower.id_embedding.weight",
}
"""The state-dict name of each item table an export may read by row range instead of holding whole."""


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@dataclass
class ItemTableSource:
    """What an fMRL export is computed from: the model (trunk, projector, attribute table in memory) and,
    for each item table it holds on meta, a reader of that table's rows ("text", "image", "id" ->
    :class:`~data_pipeline.features.FeatureTableReader`). The item table is computed ``block_rows``
    items at a time, so with the tables on meta no item table is ever whole in memory
    (:func:`open_run_items`); a model with its tables in memory (no readers) goes the same way.
    ``checksums``: the sha256 of a read table's whole file (``features.json`` records them), checked
    on the fingerprint's pass over its rows, before anything is written."""

    model: FMRLRec
    readers: dict[str, FeatureTableReader] = dataclasses.field(default_factory=dict)
    block_rows: int = EXPORT_BLOCK_ROWS
    checksums: dict[str, str] = dataclasses.field(default_factory=dict)
    max_len: int | None = None
    """The training ``train.max_len`` (recorded in export.json), if known."""

    def __post_init__(self) -> None:
        if self.block_rows < 1:
            raise ExportError(f"block_rows must be at least 1, got {self.block_rows}")
        tower = self.model.item_tower
        for name, table in zip(tower.table_names(), tower.tables(), strict=True):
            if table.weight.is_meta and name not in self.readers:
                raise ExportError(f"the model's {name} table is on meta and no reader of its rows was given")
            if name in self.readers and tuple(self.readers[name].shape) != tuple(table.weight.shape):
                raise ExportError(
                    f"the {name} table is {tuple(table.weight.shape)} in the model, "
                    f"{tuple(self.readers[name].shape)} where its rows are read from"
                )

    @property
    def streamed(self) -> bool:
        """Whether the item tables are read block by block (rather than held by the model)."""
        return bool(self.readers)

    def _blocks(self) -> Iterator[tuple[int, int]]:
        total = self.model.num_items + 1
        for start in range(0, total, self.block_rows):
            yield start, min(total, start + self.block_rows)

    def table_rows(self, start: int, stop: int) -> list[torch.Tensor]:
        """Rows ``start:stop`` of every item table, (stop - start, F_t) in ``ItemTower.tables`` order:
        read where a reader is given, else looked up in the model (the attribute table pools bags)."""
        tower = self.model.item_tower
        own = tower.lookup(torch.arange(start, stop))  # meta rows for the tables on meta: no storage
        return [
            self.readers[name].read(start, stop - start) if name in self.readers else rows
            for name, rows in zip(tower.table_names(), own, strict=True)
        ]

    @torch.no_grad()
    def item_blocks(self) -> Iterator[torch.Tensor]:
        """The item table (N + 1, D) in consecutive blocks of up to ``block_rows`` rows, (b, D) each."""
        for start, stop in self._blocks():
            block = self.model.item_tower.project(self.table_rows(start, stop))  # (b, D)
            if not bool(torch.isfinite(block).all()):
                row = start + int((~torch.isfinite(block)).any(dim=1).nonzero()[0])
                raise ExportError(
                    f"the item table holds non-finite values (NaN or infinity) at item {row}: the model's "
                    "item tables or projector diverged; use the weights of a checkpoint from before that"
                )
            yield block

    @torch.no_grad()
    def fingerprint(self) -> str:
        """sha256 of what the export is computed from: every weight of the model by sorted name (an item
        table read block by block where it is read) and the items' attribute bags. Equal for two exports
        of the same trained model, however loaded and at any block size, different otherwise. (Not a hash
        of the computed item table: its last bits depend on how many rows one product covers.)"""
        digest = hashlib.sha256()
        names = {TABLE_KEYS[name]: name for name in self.readers}
        for key, value in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            if key not in names:
                digest.update(_tensor_bytes(value))
                continue
            name = names[key]
            reader, expected = self.readers[name], self.checksums.get(name)
            file_digest = None
            if expected is not None:  # the file's sha256: its header, then the rows read here
                file_digest = hashlib.sha256(
                    read_ranges(reader.url, [(0, reader.data_start)], reader.options)[0]
                )
            for start, stop in self._blocks():
                rows = reader.read(start, stop - start)  # (b, F) float32
                digest.update(_tensor_bytes(rows))
                if file_digest is not None:
                    file_digest.update(_tensor_bytes(rows.to(reader.dtype)))  # the file's own bytes
            if file_digest is not None and file_digest.hexdigest() != expected:
                raise ExportError(
                    f"{reader.url} is corrupt: its sha256 differs from the one its index records"
                )
        bags = self.model.item_tower.attribute_bags
        if bags is not None:
            for key, value in (
                ("attribute_bags.offsets", bags.offsets),
                ("attribute_bags.values", bags.values),
            ):
                digest.update(key.encode())
                digest.update(_tensor_bytes(value))
        return digest.hexdigest()


def model_fingerprint(model: FMRLRec) -> str:
    """The fingerprint an export of ``model`` records (:meth:`ItemTableSource.fingerprint`)."""
    return ItemTableSource(model).fingerprint()


def open_run_items(
    run_dir: str,
    options: StorageOptions | None = None,
    features: str | None = None,
    block_rows: int = EXPORT_BLOCK_ROWS,
) -> ItemTableSource:
    """The best model of a finished fMRL run, for an export that never holds a whole item table: the
    model is built with its tables on meta (``table_device="meta"``, feature tables as shapes), the small
    weights (trunk, projector, attribute table) are loaded from ``model.safetensors``, and the ID table
    (in ``model.safetensors``) and the frozen feature tables (the data set's, or ``features``) are read
    ``block_rows`` rows at a time by range reads. The items' attribute bags are read whole (ids only)."""
    from safetensors import safe_open

    cfg, weights_path = _run_files(run_dir)
    if cfg.task == "dlrm":
        raise ExportError(f"{run_dir!r} is a DLRM run: it exports whole (load_trained_model, export_model)")
    with safe_open(weights_path, "pt") as f:  # memory-mapped: only the tensors taken are read
        in_file = set(f.keys())
        small = {k: f.get_tensor(k) for k in sorted(in_file - set(TABLE_KEYS.values()))}
    readers: dict[str, FeatureTableReader] = {
        name: FeatureTableReader(weights_path, options, name=key)
        for name, key in TABLE_KEYS.items()
        if key in in_file
    }
    info, checksums = None, {}
    if cfg.model.use_text_features or cfg.model.use_image_features:
        text, image, info = open_feature_tables(features or cfg.data.features_url, options)
        for name, reader in (("text", text), ("image", image)):
            if reader is not None and name not in readers:
                readers[name], checksums[name] = reader, info[f"{name}_sha256"]
    bags = _attribute_bags(cfg, options)
    if info is not None:
        num_items = int(info["num_items"])
    elif "id" in readers:
        num_items = readers["id"].shape[0] - 1
    elif bags is not None:
        num_items = int(bags.offsets.shape[0]) - 2
    else:
        raise ExportError(f"{weights_path} holds no item table and the run's model reads no features")
    shapes = {
        name: torch.empty(readers[name].shape, device="meta") for name in ("text", "image") if name in readers
    }
    model = FMRLRec(cfg.model, num_items, shapes.get("text"), shapes.get("image"), bags, table_device="meta")
    tower = model.item_tower
    if tower.attributes is not None:  # small (attributes x F): loaded like the trunk
        tower.attributes.to_empty(device="cpu")
    _load_weights(model, small, weights_path, streamed=frozenset({TABLE_KEYS["id"]}))
    used = set(tower.table_names())
    return ItemTableSource(
        model.eval(),
        {n: r for n, r in readers.items() if n in used},
        block_rows,
        {n: c for n, c in checksums.items() if n in used},
        cfg.train.max_len,
    )


def _read_manifest(url: str, options: StorageOptions | None) -> dict[str, Any] | None:
    """The export index ``url/export.json`` (deploy's reader, given this project's storage options)."""
    options = options or StorageOptions.from_env()
    storage = s3_filesystem_kwargs(options) if is_remote(url) else None
    with translated_errors("read", url, options if is_remote(url) else None):
        return deploy_artifact.read_manifest(url, storage)


def export_sizes(
    model: FMRLRec,
    out_url: str,
    sizes: list[int],
    options: StorageOptions | None = None,
    catalog: ItemCatalog | None = None,
    overwrite: bool = False,
    formats: Sequence[str] = (),
    block_rows: int = EXPORT_BLOCK_ROWS,
    max_len: int | None = None,
) -> dict[str, Any]:
    """:func:`export_items` of a model held in memory (its item table computed ``block_rows`` items at
    a time, like a streamed export's); ``max_len``: the training ``train.max_len``, if known."""
    return export_items(
        ItemTableSource(model, {}, block_rows, max_len=max_len),
        out_url,
        sizes,
        options,
        catalog,
        overwrite,
        formats,
    )


def _write_items(
    source: ItemTableSource, url: str, size: int, options: StorageOptions | None
) -> tuple[str, int]:
    """Write ``items.safetensors`` of nested size ``size``, (N + 1, size), as its blocks are computed;
    returns its sha256 and bytes."""
    layout = {"items": (torch.float32, (source.model.num_items + 1, size))}
    blocks = (("items", block[:, :size]) for block in source.item_blocks())  # (b, size) each
    digest = write_safetensors_blocks(url, layout, blocks, options=options)
    written = FeatureTableReader(url, options, name="items")  # its header: two small reads
    return digest, written.data_start + written.nbytes


@torch.no_grad()
def export_items(
    source: ItemTableSource,
    out_url: str,
    sizes: list[int],
    options: StorageOptions | None = None,
    catalog: ItemCatalog | None = None,
    overwrite: bool = False,
    formats: Sequence[str] = (),
) -> dict[str, Any]:
    """Write a standalone model per size in ``sizes`` (each one of the model's nested sizes) into
    ``out_url``, adding to an export of the same model that is there already (its other sizes stay
    listed). An export of another model in ``out_url`` is refused unless ``overwrite``, which replaces it
    as a whole. Every file is written under a name no reader uses yet and ``export.json`` (the index, with
    each file's sha256) last, so a reader sees the old export or the new one, never a mixture; folders
    the new index no longer names are deleted afterwards. ``formats`` ("pt2", "onnx") adds portable
    programs of each size (deploy/portable.py); a listed size without one of them is written anew.
    Each file written is logged with its time (portable programs take minutes at large sizes).
    ``export.json`` records ``source.max_len`` (or, for more sizes of the same model, the one there).

    Each size's ``items.safetensors`` is written as it is computed, ``source.block_rows`` items at a
    time (one pass over the item tables per size, one more for the fingerprint). A portable program
    holds the whole item table, so a streamed source (tables read by range) writes ``formats`` only for
    a catalog that fits in one block."""
    model = source.model
    unknown_formats = sorted(set(formats) - set(PORTABLE_FILES))
    if unknown_formats:
        raise ExportError(f"unknown export formats {unknown_formats}: choose from {sorted(PORTABLE_FILES)}")
    if not sizes:
        raise ExportError(f"name the nested sizes to export (--sizes), some of {model.cfg.nested_sizes}")
    unknown = [m for m in sizes if m not in model.cfg.nested_sizes]
    if unknown:
        raise ExportError(f"sizes {unknown} are not nested sizes of this model ({model.cfg.nested_sizes})")
    if formats and source.streamed and model.num_items + 1 > source.block_rows:
        raise ExportError(
            f"portable programs ({', '.join(formats)}) embed the whole ({model.num_items + 1}, m) item table, "
            f"which this export computes {source.block_rows} items at a time so as never to hold it: "
            "export without --formats (load_recommender and `fmrl serve` read the safetensors export), "
            "or, where the table fits in memory, export a checkpoint of the run (loaded whole) or pass "
            "export_trained(..., block_rows=) above the number of items"
        )
    fingerprint = source.fingerprint()
    existing = _read_manifest(out_url, options)
    listed: dict[str, Any] = {}
    if existing is not None:
        same_model = existing.get("fingerprint") == fingerprint and existing.get("version") == EXPORT_VERSION
        if same_model:
            listed = dict(existing["sizes"])
        elif not overwrite:
            written_by = existing.get("version")
            earlier = f", written by export version {written_by}" if written_by != EXPORT_VERSION else ""
            raise ExportError(
                f"{out_url} holds an export of another model (sizes {sorted(map(int, existing['sizes']))}"
                f"{earlier}): export to another folder (--out), or pass --overwrite to replace that export"
            )
    used_folders = {entry["folder"] for entry in (existing or {}).get("sizes", {}).values()}
    state = {k: v for k, v in model.state_dict().items() if k.startswith("trunk.")}
    check_finite(state, "the model to export")
    max_len = source.max_len
    if max_len is None and listed:  # more sizes of the same model: keep what its export recorded
        max_len = existing.get("max_len") if existing is not None else None
    manifest: dict[str, Any] = {
        "version": EXPORT_VERSION,
        "num_items": model.num_items,
        "fingerprint": fingerprint,
        "max_len": max_len,
        "sizes": listed,
    }
    todo = sorted(set(sizes))
    log.info("export to %s: sizes %s%s", out_url, todo, f", formats {', '.join(formats)}" if formats else "")
    items = None  # (N + 1, D), only for portable programs
    for position, m in enumerate(todo, start=1):
        wanted = {PORTABLE_FILES[f] for f in formats}
        if str(m) in listed and wanted <= set(listed[str(m)].get("sha256", {})):
            continue  # the same model's size m is there already: identical files
        if str(m) in listed:  # the same model, more formats: keep the formats it had
            had = {f for f, name in PORTABLE_FILES.items() if name in listed[str(m)].get("sha256", {})}
            wanted = {PORTABLE_FILES[f] for f in set(formats) | had}
        folder = f"size-{m}"
        if folder in used_folders:  # replaced: new files under a new name, the old folder goes after
            folder = f"size-{m}-{fingerprint[:12]}"
            version = 1
            while folder in used_folders:  # rewritten once more (more formats): yet another name
                version += 1
                folder = f"size-{m}-{fingerprint[:12]}-{version}"
        sub_cfg = dataclasses.replace(model.cfg, nested_sizes=[s for s in model.cfg.nested_sizes if s <= m])
        config = {"model": dataclasses.asdict(sub_cfg), "num_items": model.num_items, "size": m}
        files: dict[str, bytes | None] = {
            "model.safetensors": st_save(slice_state_dict(state, m)),
            "items.safetensors": None,  # computed and written block by block
            "config.json": json.dumps(config, indent=1).encode(),
        }
        if wanted:
            if items is None:
                items = torch.cat(list(source.item_blocks()))  # (N + 1, D)
            program = ScoringModel.from_state(
                sub_cfg,
                {k.removeprefix("trunk."): v for k, v in slice_state_dict(state, m).items()},
                items[:, :m],
            )
            for fmt, name in PORTABLE_FILES.items():
                if name in wanted:  # minutes at large sizes: say what runs before and after
                    step = f"export size {m} ({position}/{len(todo)}): {name}"
                    log.info("%s: tracing ...", step)
                    started = time.perf_counter()
                    files[name] = program_bytes(program, fmt)
                    log.info("%s traced in %.1f s", step, time.perf_counter() - started)
        hashes, written = {}, 0
        for name, data in files.items():
            url = join(out_url, folder, name)
            started = time.perf_counter()
            if data is None:
                hashes[name], size = _write_items(source, url, m, options)
            else:
                hashes[name], size = sha256(data), _write(url, data, options)
            written += size
            log.debug("export size %d: %s written in %.1f s", m, name, time.perf_counter() - started)
        log.info("export size %d (%d/%d): %.2f MiB in %s", m, position, len(todo), written / 2**20, folder)
        listed[str(m)] = {"folder": folder, "bytes": written, "sha256": hashes}
    if catalog is not None:
        if len(catalog.source_ids) != model.num_items + 1 or tuple(catalog.popularity.shape) != (
            model.num_items + 1,
        ):
            raise ExportError(
                f"the item catalog covers {len(catalog.source_ids) - 1} items, the model {model.num_items}"
            )
        files = {
            "item_ids.json": json.dumps(catalog.source_ids).encode(),
            "popularity.safetensors": st_save({"popularity": catalog.popularity.float().contiguous()}),
        }
        for name, data in files.items():
            _write(join(out_url, name), data, options)
        manifest["catalog"] = {name: sha256(data) for name, data in files.items()}
    elif existing is not None and "catalog" in existing and existing.get("fingerprint") == fingerprint:
        manifest["catalog"] = existing["catalog"]
    _write(join(out_url, "export.json"), json.dumps(manifest, indent=1).encode(), options)  # the commit
    stale = used_folders - {entry["folder"] for entry in listed.values()}
    for folder in sorted(stale):
        remove(join(out_url, folder), options, recursive=True)
    return manifest


def exported_sizes(url: str, options: StorageOptions | None = None) -> list[int]:
    """The sizes an fMRL export holds (ExportError for a folder that is not one)."""
    options = options or StorageOptions.from_env()
    storage = s3_filesystem_kwargs(options) if is_remote(url) else None
    with translated_errors("read", url, options if is_remote(url) else None):
        return deploy_artifact.exported_sizes(deploy_artifact.fmrl_manifest(url, storage))


def load_recommender(
    url: str, size: int | str = "auto", options: StorageOptions | None = None, **choice: Any
) -> Recommender:
    """Load the size-``size`` model of an export: :func:`deploy.load_recommender` (which see, also for
    ``size="auto"`` with ``max_latency_ms`` / ``max_memory_mb`` / ``min_ndcg``, ``quantised`` and
    ``funnel``), with the storage options of this project."""
    options = options or StorageOptions.from_env()
    storage = s3_filesystem_kwargs(options) if is_remote(url) else None
    with translated_errors("read", url, options if is_remote(url) else None):
        return deploy_load_recommender(url, size, storage_options=storage, **choice)


# ------------------------------------------------------------------------------------------------ DLRM


def _dlrm_with_weights(cfg: DLRMConfig, weights: dict[str, torch.Tensor], source: str) -> CTRModel:
    """A CTR model of ``cfg`` (DLRM or ``cfg.model``) holding ``weights`` (named like its
    ``state_dict()``); every key must fit, and no weight may hold NaN or infinity."""
    check_finite(weights, source)
    model = build_ctr_model(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ExportError(
            f"{source} does not hold this {cfg.model} model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shapes {wrong[:3]}"
        )
    model.load_state_dict(weights)
    return model.eval()


def export_dlrm(model: CTRModel, out_url: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """Write the whole CTR model (``model.safetensors``, ``config.json`` with its ``model`` name), then
    ``export.json``."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    written = _write(join(out_url, "model.safetensors"), st_save(state), options)
    config = {"task": "dlrm", "model": dataclasses.asdict(model.cfg)}
    written += _write(join(out_url, "config.json"), json.dumps(config, indent=1).encode(), options)
    manifest = {"version": EXPORT_VERSION, "task": "dlrm", "bytes": written}
    _write(join(out_url, "export.json"), json.dumps(manifest, indent=1).encode(), options)  # last
    return manifest


@dataclass
class ClickModel:
    """An exported CTR model (DLRM or any ``dlrm.model``): click probabilities of impressions."""

    model: CTRModel

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
    """Load a CTR model export (DLRM or any ``dlrm.model``; safetensors and JSON only). Exports written
    before ``model`` existed hold a DLRM, its default."""
    manifest = _read_manifest(url, options)
    if manifest is None:
        raise ExportError(f"{url} has no export.json: not an export (write one with `fmrl export`)")
    if manifest.get("task") != "dlrm":
        raise ExportError(f"{url} is not a DLRM export (use load_recommender for fMRL exports)")
    config = json.loads(_read(join(url, "config.json"), options))
    weights = st_load(_read(join(url, "model.safetensors"), options))
    return ClickModel(_dlrm_with_weights(DLRMConfig(**config["model"]), weights, url))


def export_model(
    model: FMRLRec | CTRModel,
    out_url: str,
    sizes: list[int] | None,
    options: StorageOptions | None = None,
    catalog: ItemCatalog | None = None,
    overwrite: bool = False,
    formats: Sequence[str] = (),
    max_len: int | None = None,
) -> dict[str, Any]:
    """Export any trained model: fMRL at ``sizes`` (required), DLRM whole (``sizes`` must be None).
    ``max_len``: the training ``train.max_len`` an fMRL export records, if known."""
    if isinstance(model, CTRModel):
        if sizes:
            raise ExportError("a DLRM has no nested sizes: leave out --sizes")
        return export_dlrm(model, out_url, options)
    return export_sizes(model, out_url, sizes, options, catalog, overwrite, formats, max_len=max_len)


def export_trained(
    url: str,
    out_url: str,
    sizes: list[int] | None,
    options: StorageOptions | None = None,
    catalog: ItemCatalog | None = None,
    overwrite: bool = False,
    formats: Sequence[str] = (),
    features: str | None = None,
    block_rows: int = EXPORT_BLOCK_ROWS,
) -> dict[str, Any]:
    """Export a finished run folder or a checkpoint (what `fmrl export` does). An fMRL run folder is
    exported streamed (:func:`open_run_items`, :func:`export_items`): no item table is ever whole in
    memory. A checkpoint (its tables are read whole by the checkpoint reader) and a DLRM are loaded and
    exported whole (:func:`load_model`, :func:`export_model`)."""
    config = source_config(url, options)
    if _is_run_folder(url) and config.task != "dlrm":
        source = open_run_items(url, options, features, block_rows)
        return export_items(source, out_url, sizes, options, catalog, overwrite, formats)
    model = load_model(url, options, features)
    return export_model(
        model, out_url, sizes, options, catalog, overwrite, formats, max_len=config.train.max_len
    )
