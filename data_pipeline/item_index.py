"""The item-attribute index: every item's attribute bags as two raw ``.npy`` arrays, so each rank reads
them in O(1) Python work instead of parsing every item record of the item shards::

    item_attributes.offsets.npy   (N + 2,) int64  item i's bag is values[offsets[i]:offsets[i + 1]]
    item_attributes.values.npy    (nnz,) int64    attribute ids in 1..num_attributes

Written with the item shards by the writers that record ``num_attributes`` (``fmrl data
prepare-synthetic-scale``, ``fmrl data convert-seqrec --attributes``), or afterwards from the item shards
for an older data set::

    fmrl data index-attributes runs/data/scale-10m

``dataset.json`` names the files under ``"attribute_index"`` with their byte sizes and sha256, so a data
set without that key has no index (:func:`data_pipeline.loader.read_item_attributes` then parses the
item shards, the reference this index is tested against).

Reading. A local index is memory-mapped copy-on-write (``np.load(mmap_mode="c")``): nothing is parsed,
the pages are shared between the ranks of a node through the page cache, and a write into the arrays
(there should be none) stays private to the process instead of reaching the file. An ``s3://`` index is
read whole into one buffer per file that the array views (no per-item objects).

Checks, and why not more: every read checks each file's byte size against ``dataset.json``, its npy
header (dtype, shape) and the CSR structure, vectorised (offsets start 0, 0, never decrease and end at
``len(values)``; ids in 1..num_attributes), so a truncated, swapped or damaged-in-range file is an
:class:`AttributeIndexError` naming it (a ``DatasetError`` by the time the loader raises it) and no bag
can index out of bounds. The sha256 is checked where the bytes are read whole anyway (``s3://``); a local
memory map skips it, as hashing would read and hash every page on every rank at start-up (a same-size
corruption that keeps ids in range is the one thing that passes there).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline.storage import (
    StorageNotFoundError,
    StorageOptions,
    atomic_write,
    filesystem,
    is_remote,
    join,
    open_read,
)

__all__ = [
    "INDEX_KEY",
    "OFFSETS_FILE",
    "VALUES_FILE",
    "AttributeIndexError",
    "AttributeIndexSummary",
    "check_bags",
    "note_missing_index",
    "read_attribute_index",
    "write_attribute_index",
]

INDEX_KEY = "attribute_index"
"""The ``dataset.json`` key that names the index files."""
OFFSETS_FILE = "item_attributes.offsets.npy"
VALUES_FILE = "item_attributes.values.npy"
INDEX_VERSION = 1
_CHUNK = 64 * 2**20  # bytes hashed and written at a time

log = logging.getLogger("fmrl")
_NOTED: set[str] = set()  # data sets already said to have no index, in this process


class AttributeIndexError(ValueError):
    """A missing, malformed or damaged index file, named in the message with how to rebuild it
    (:func:`data_pipeline.loader.read_item_attributes` turns it into a ``DatasetError``)."""


@dataclass(frozen=True)
class AttributeIndexSummary:
    """What ``fmrl data index-attributes`` wrote."""

    dataset: str
    num_items: int
    num_attributes: int
    nnz: int
    """Attribute ids in all bags."""
    bytes: int
    """Both files together."""


def check_bags(
    offsets: np.ndarray, values: np.ndarray, num_items: int, num_attributes: int
) -> tuple[str, str] | None:
    """What is wrong with CSR bags ``offsets`` (N + 2,) / ``values`` (nnz,) of ``num_items`` items with ids
    in 1..num_attributes, as (``"offsets"`` or ``"values"``: the array at fault, what), or None if nothing.
    Vectorised: no Python work per item."""
    if offsets.ndim != 1 or offsets.shape[0] != num_items + 2 or num_items < 0:
        return (
            "offsets",
            f"offsets have shape {offsets.shape}, expected ({num_items + 2},) for {num_items} items",
        )
    if values.ndim != 1:
        return "values", f"values have shape {values.shape}, expected (nnz,)"
    if offsets[0] != 0 or offsets[1] != 0:
        return "offsets", f"offsets must start 0, 0 (row 0 is the padding item), got {offsets[:2].tolist()}"
    decreasing = np.flatnonzero(offsets[1:] < offsets[:-1])  # (N + 1,) bools: the one temporary
    if len(decreasing):
        i = int(decreasing[0])
        return "offsets", f"offsets decrease at item {i} ({int(offsets[i])} -> {int(offsets[i + 1])})"
    if offsets[-1] != len(values):
        return "offsets", f"the last offset is {int(offsets[-1])} but there are {len(values)} values"
    if len(values):
        low, high = int(values.min()), int(values.max())
        if low < 1 or high > num_attributes:
            return "values", f"attribute id {low if low < 1 else high} is outside 1..{num_attributes}"
    return None


def write_attribute_index(
    dataset_url: str,
    offsets: np.ndarray,
    values: np.ndarray,
    num_attributes: int,
    options: StorageOptions | None = None,
) -> dict[str, Any]:
    """Write the index of CSR bags ``offsets`` (N + 2,) / ``values`` (nnz,) into the data set folder
    ``dataset_url`` and return its ``dataset.json`` entry (to store under :data:`INDEX_KEY`; the caller
    writes ``dataset.json``, last). Each file is written all or nothing (a temporary name renamed
    locally, one PUT or multipart upload on S3). ValueError if the bags are malformed."""
    offsets = np.ascontiguousarray(offsets, dtype="<i8")
    values = np.ascontiguousarray(values, dtype="<i8")
    problem = check_bags(offsets, values, len(offsets) - 2, num_attributes)
    if problem is not None:
        raise ValueError(f"cannot index the item attributes of {dataset_url}: {problem[1]}")
    entry: dict[str, Any] = {"version": INDEX_VERSION}
    for key, name, array in (("offsets", OFFSETS_FILE, offsets), ("values", VALUES_FILE, values)):
        digest, size = hashlib.sha256(), 0
        with atomic_write(join(dataset_url, name), options) as f:
            for chunk in _npy_chunks(array):
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        entry[key] = {"file": name, "bytes": size, "sha256": digest.hexdigest()}
    return entry


def read_attribute_index(
    dataset_url: str, info: dict[str, Any], num_items: int, options: StorageOptions | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """The CSR attribute bags (offsets (N + 2,), values (nnz,), num_attributes) of the data set at
    ``dataset_url`` whose ``dataset.json`` is ``info``, from the index that it names, checked (see the
    module docstring); an :class:`AttributeIndexError` naming the file otherwise."""
    info_url = join(dataset_url, "dataset.json")
    entry = info[INDEX_KEY]
    num_attributes = info.get("num_attributes")
    files = [entry.get(key) if isinstance(entry, dict) else None for key in ("offsets", "values")]
    named = isinstance(entry, dict) and entry.get("version") == INDEX_VERSION
    named = named and all(  # plain file names in the data set folder, with their sizes
        isinstance(f, dict)
        and isinstance(f.get("file"), str)
        and f["file"].strip(".")
        and "/" not in f["file"]
        and isinstance(f.get("bytes"), int)
        for f in files
    )
    if not named or not isinstance(num_attributes, int) or num_attributes < 1:
        raise AttributeIndexError(
            f"{info_url}: {INDEX_KEY!r} must be version {INDEX_VERSION} and name 'offsets' and 'values' "
            f"files of the data set folder with their 'bytes' (and 'num_attributes' must be a positive "
            f"integer), got {entry!r}; "
            f"rebuild it with `fmrl data index-attributes {dataset_url}`"
        )
    urls = {key: join(dataset_url, f["file"]) for key, f in zip(("offsets", "values"), files)}
    hint = f"rebuild the index with `fmrl data index-attributes {dataset_url}`"
    offsets, values = (_read_array(urls[key], f, hint, options) for key, f in zip(urls, files))
    problem = check_bags(offsets, values, num_items, num_attributes)
    if problem is not None:
        raise AttributeIndexError(f"{urls[problem[0]]}: damaged attribute index: {problem[1]}; {hint}")
    return offsets, values, num_attributes


def note_missing_index(dataset_url: str) -> None:
    """Say (once per data set and process) that ``dataset_url`` has no index, what that costs, and how to
    add one."""
    if dataset_url in _NOTED:
        return
    _NOTED.add(dataset_url)
    log.warning(
        "%s has no item-attribute index: every rank parses all item records at start-up (minutes at "
        "tens of millions of items); add one with `fmrl data index-attributes %s`",
        dataset_url,
        dataset_url,
    )


def _npy_chunks(array: np.ndarray) -> Iterator[bytes | memoryview]:
    """The ``.npy`` (format 1.0) bytes of a 1-D little-endian array: its header, then its data in chunks."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    yield header.getvalue()
    data = memoryview(array).cast("B")
    for start in range(0, len(data), _CHUNK):
        yield data[start : start + _CHUNK]


def _read_array(url: str, recorded: dict[str, Any], hint: str, options: StorageOptions | None) -> np.ndarray:
    """One index file as a 1-D int64 array: memory-mapped copy-on-write if local, read whole (and its
    sha256 checked) if remote. DatasetError naming ``url`` if its size, checksum or header is wrong."""
    expected = recorded["bytes"]
    if not is_remote(url):
        _, path = filesystem(url, options)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise AttributeIndexError(f"{url} does not exist (named by dataset.json); {hint}") from None
        if size != expected:
            raise AttributeIndexError(f"{url}: {size} bytes, dataset.json records {expected}; {hint}")
        try:
            array = np.load(path, mmap_mode="c", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise AttributeIndexError(f"{url}: not a readable .npy array ({e}); {hint}") from None
    else:
        # one byte more than recorded, so that a longer file shows; writable, so that torch.from_numpy
        # takes the array without a copy or a warning
        buffer = bytearray(expected + 1)
        try:
            with open_read(url, options) as f:
                view, size = memoryview(buffer), 0
                while size <= expected and (n := f.readinto(view[size:])):
                    size += n
                view.release()  # the buffer is shrunk below, which an open view would forbid
        except StorageNotFoundError:
            raise AttributeIndexError(f"{url} does not exist (named by dataset.json); {hint}") from None
        if size != expected:
            got = f"{size}" if size <= expected else f"more than {expected}"
            raise AttributeIndexError(f"{url}: {got} bytes, dataset.json records {expected}; {hint}")
        del buffer[expected:]
        digest = hashlib.sha256(buffer).hexdigest()
        if digest != recorded.get("sha256"):
            raise AttributeIndexError(f"{url}: sha256 {digest} differs from dataset.json's; {hint}")
        array = _from_npy_bytes(url, buffer, hint)
    if array.dtype != np.dtype("<i8") or array.ndim != 1:
        raise AttributeIndexError(
            f"{url}: expected a 1-D int64 array, got {array.dtype} {array.shape}; {hint}"
        )
    return array


def _from_npy_bytes(url: str, buffer: bytearray, hint: str) -> np.ndarray:
    """The array that the ``.npy`` bytes ``buffer`` hold, a view of the buffer (no copy)."""
    head = io.BytesIO(bytes(buffer[:65_536]))  # the header only (at most 64 KiB in formats 1 and 2)
    try:
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(head)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(head)
        count = int(np.prod(shape))
        return np.frombuffer(buffer, dtype=dtype, count=count, offset=head.tell()).reshape(shape)
    except ValueError as e:
        raise AttributeIndexError(f"{url}: not a readable .npy array ({e}); {hint}") from None
