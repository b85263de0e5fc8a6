"""Reading an export folder (written by ``fmrl export``) with torch, safetensors and fsspec only.

An export holds ``export.json`` (the index: sizes, their folders, every file's sha256), per size
``size-<m>/model.safetensors`` (the LRU trunk at width m), ``items.safetensors`` (the ``(N + 1, m)``
item table, row 0 padding) and ``config.json``, and optionally the catalog ``item_ids.json`` and
``popularity.safetensors``. Every file read is checked against the sha256 the index records, every
tensor for non-finite values, and config.json's nested sizes against the nested blocks of the weights
themselves (:func:`weight_nested_sizes`), so an edited config.json cannot change what a model computes.
Nothing is unpickled. URLs are local paths or anything fsspec opens (``s3://``); ``storage_options`` are
fsspec's keyword arguments for that file system (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load

from models.fmrl import FMRLConfig


class ExportError(ValueError):
    """A run folder or an export that cannot be used; the message names the file."""


def join(url: str, *parts: str) -> str:
    """``url/part/...`` for local paths and ``scheme://`` URLs alike."""
    return posixpath.join(url.rstrip("/"), *parts)


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole file at ``url``; a missing or unreadable file is an ExportError naming it."""
    try:
        with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
            return f.read()
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read {url}: {error}") from error


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified(url: str, expected: str | None, storage_options: Mapping[str, Any] | None) -> bytes:
    """The file at ``url``, refused if it does not match the sha256 that export.json records."""
    data = read_bytes(url, storage_options)
    if expected is not None and sha256(data) != expected:
        raise ExportError(f"{url} does not match the sha256 in export.json: it was changed or damaged")
    return data


def read_manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The export index ``url/export.json``, or None if there is none."""
    path = join(url, "export.json")
    fs, local = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    if not fs.exists(local):
        return None
    try:
        manifest = json.loads(read_bytes(path, storage_options))
    except (ValueError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sizes", {}), dict):
        raise ExportError(f"{path} is not an export index")
    return manifest


def fmrl_manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The index of an fMRL export at ``url`` (an error for no export or a DLRM export)."""
    manifest = read_manifest(url, storage_options)
    if manifest is None:
        raise ExportError(f"{url} has no export.json: not an export (write one with `fmrl export`)")
    if manifest.get("task") == "dlrm":
        raise ExportError(f"{url} is a DLRM export: use load_click_model")
    return manifest


def exported_sizes(manifest: Mapping[str, Any]) -> list[int]:
    return sorted(int(m) for m in manifest["sizes"])


def check_finite(tensors: Mapping[str, Any], url: str) -> None:
    """ExportError naming ``url`` and the first float tensor of ``tensors`` (other values are skipped)
    holding a NaN or an infinity: a model whose training diverged, refused before anything reads it."""
    for name, tensor in tensors.items():
        floating = isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
        if floating and not bool(torch.isfinite(tensor).all()):
            raise ExportError(
                f"{url}: tensor {name!r} holds non-finite values (NaN or infinity): the model's training "
                "diverged; use the weights of a checkpoint from before it diverged"
            )


def weight_nested_sizes(trunk_state: Mapping[str, torch.Tensor]) -> list[int]:
    """The nested sizes that the trunk's weights themselves are built on, from their block structure.

    Every (m, m) matrix of the trunk is a nested weight: row r of block i reads the input prefix
    [:m_i] and nothing after it. So the width of row r (last non-zero column + 1, the largest over all
    the trunk's matrices) is the nested size of its block, and the distinct row widths are the nested
    sizes: trained (or randomly initialised) weights have no all-zero column inside a block."""
    matrices = [w for w in trunk_state.values() if w.ndim == 2]
    if not matrices:
        return []
    dim = matrices[0].shape[1]
    columns = torch.arange(1, dim + 1)  # (m,) the width a non-zero entry in each column implies
    width = torch.zeros(matrices[0].shape[0], dtype=torch.int64)
    for weight in matrices:
        width = torch.maximum(width, ((weight != 0) * columns).amax(dim=1))  # (m,)
    return sorted({int(w) for w in width} | {dim})


def recorded_max_len(url: str, manifest: Mapping[str, Any]) -> int | None:
    """The training ``max_len`` that the export at ``url`` records (None for an export written before
    exports recorded it)."""
    max_len = manifest.get("max_len")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ExportError(f"{join(url, 'export.json')}: max_len must be a positive integer, got {max_len!r}")
    return max_len


@dataclass
class SizeExport:
    """One exported size as read from disk: its config, trunk weights and item table."""

    size: int
    config: FMRLConfig
    trunk_state: dict[str, torch.Tensor]
    """The LRU trunk's state dict (keys without the ``trunk.`` prefix)."""
    items: torch.Tensor
    """(N + 1, m) item table; row 0 is padding."""
    folder: str
    """URL of the size's folder (where portable programs of this size are kept too)."""


def read_size(
    url: str, size: int, manifest: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None
) -> SizeExport:
    """The files of size ``size`` of the export at ``url`` (index ``manifest``), each checked."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise ExportError(
            f"size must be an int (one of the exported sizes), got {size!r} ({type(size).__name__})"
        )
    if str(size) not in manifest["sizes"]:
        raise ExportError(f"{url} has sizes {exported_sizes(manifest)}, not {size}")
    entry = manifest["sizes"][str(size)]
    folder = join(url, entry["folder"])
    hashes = entry.get("sha256", {})
    config_url = join(folder, "config.json")
    config = json.loads(read_verified(config_url, hashes.get("config.json"), storage_options))
    try:
        cfg = FMRLConfig(**config["model"])
    except (TypeError, ValueError, KeyError) as error:
        raise ExportError(f"{config_url}: not a model config of this version ({error})") from error
    if (
        config.get("size") != size
        or cfg.nested_sizes[-1] != size
        or config.get("num_items") != manifest["num_items"]
    ):
        raise ExportError(
            f"{config_url} describes size {config.get('size')} (nested sizes {cfg.nested_sizes}) and "
            f"{config.get('num_items')} items; export.json lists it as size {size} of {manifest['num_items']} items"
        )
    weights_url = join(folder, "model.safetensors")
    weights = st_load(read_verified(weights_url, hashes.get("model.safetensors"), storage_options))
    check_finite(weights, weights_url)
    items_url = join(folder, "items.safetensors")
    items = st_load(read_verified(items_url, hashes.get("items.safetensors"), storage_options))["items"]
    if tuple(items.shape) != (manifest["num_items"] + 1, size):
        raise ExportError(
            f"{items_url} has shape {tuple(items.shape)}, expected ({manifest['num_items'] + 1}, {size})"
        )
    check_finite({"items": items}, items_url)
    trunk_state = {k.removeprefix("trunk."): v for k, v in weights.items()}
    # the weights decide the nested sizes (each one normalises its own block): config.json must agree
    in_weights = weight_nested_sizes(trunk_state)
    if in_weights != cfg.nested_sizes:
        differences = [
            f"size {m} missing from config.json" if m in in_weights else f"size {m} not in the weights"
            for m in sorted(set(in_weights) ^ set(cfg.nested_sizes))
        ]
        raise ExportError(
            f"{config_url} lists nested sizes {cfg.nested_sizes}, but the weights in {weights_url} are "
            f"nested at {in_weights} ({'; '.join(differences)}): the config was edited or is another model's"
        )
    return SizeExport(size, cfg, trunk_state, items, folder)


@dataclass
class Catalog:
    """The items' source ids and training popularity, if the export records them."""

    item_ids: list[str] | None
    """Source id per internal id (index 0 is padding, "")."""
    popularity: torch.Tensor | None
    """(N + 1,) training interactions per item."""


def read_catalog(
    url: str, manifest: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None
) -> Catalog:
    catalog = manifest.get("catalog")
    if not catalog:
        return Catalog(None, None)
    item_ids = json.loads(
        read_verified(join(url, "item_ids.json"), catalog["item_ids.json"], storage_options)
    )
    popularity_data = read_verified(
        join(url, "popularity.safetensors"), catalog["popularity.safetensors"], storage_options
    )
    return Catalog(item_ids, st_load(popularity_data)["popularity"])
