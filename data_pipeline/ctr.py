"""Click-through-rate (CTR) data sets: the shard layout every CTR source is written in, its encoding, the
writer and the readers. Sources: the Criteo TSV format (data_pipeline/criteo.py), Criteo-like synthetic
data with learnable structure (data_pipeline/synthetic_ctr.py) and the Open Bandit Dataset
(data_pipeline/obp.py). Read them back with :func:`iter_ctr_samples` / :func:`iter_ctr_batches`::

    from data_pipeline.ctr import CTRDataset, iter_ctr_batches
    dataset = CTRDataset.open("runs/data/synthetic-ctr")
    for batch in iter_ctr_batches(dataset.url, "train", batch_size=512):
        batch.dense, batch.sparse, batch.labels  # (B, N_d) float32, (B, F) int64 ids, (B,) float32

**Encoding** (the same for every CTR data set; ``dataset.json`` records it):

* dense: ``float32(log(1 + max(x, 0)))``, a missing value is x = 0 (so 0.0). The log tames Criteo's
  heavy-tailed counts; negatives (``int_1`` has a few -1..-3) are clipped to 0 first, as in the
  facebookresearch/dlrm preprocessing (TorchRec's ``tsv_to_npys`` instead shifts by the column minimum).
* sparse: id 0 is reserved for "missing"; a present value v (the hex string parsed as an integer) maps to
  ``1 + v mod (hash_buckets[f] - 1)``. So feature f's embedding table has exactly ``hash_buckets[f]`` rows
  and the missing value has its own learnable row (MLPerf maps missing to the hash of 0 instead).

**Splits** by position: the rows of a source, in order, are numbered 0..N-1; the last ``test_fraction`` of
them (floor) is ``test``, the ``valid_fraction`` before that ``valid``, the rest ``train``. A skipped row
leaves a gap; the positions of the others do not move.

**Output** under ``out_url``::

    train-000000.tar ... train.manifest.json    one sample per impression: <position:012d>.json
    valid-*.tar  valid.manifest.json             = {"label": 0|1, "dense": [N_d floats], "sparse": [F ints]}
    test-*.tar   test.manifest.json
    dataset.json                                 written last: kind "ctr", feature names, hash_buckets,
                                                 per-split rows / positives / positive rate, skipped rows

The dense floats are written as the shortest decimal that reads back as the same float32. One small
JSON member per sample keeps a sample in a single 512-byte tar block (plus its header), as small as a
binary record would be, and readable with ``tar -xOf train-000000.tar | head``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from data_pipeline.shards import ShardEntry, ShardWriter, read_manifest
from data_pipeline.storage import StorageOptions, atomic_write, exists, join, open_read
from data_pipeline.stream import Sample, iter_shard

__all__ = [
    "DENSE_TRANSFORM",
    "SPARSE_ENCODING",
    "SPLITS",
    "CTRBatch",
    "CTRDataset",
    "CTRDatasetWriter",
    "CTRRecord",
    "CTRSummary",
    "collate_ctr",
    "decode_ctr_sample",
    "encode_ctr_record",
    "hash_categorical",
    "iter_ctr_batches",
    "iter_ctr_samples",
    "split_shards",
]

SPLITS = ("train", "valid", "test")
KIND = "ctr"
RECORD_FORMAT = '<position:012d>.json = {"label": 0|1, "dense": [float32], "sparse": [int]}'
DENSE_TRANSFORM = "float32(log(1 + max(x, 0))); missing -> x = 0"
SPARSE_ENCODING = "0 = missing; present value v -> 1 + v mod (hash_buckets[f] - 1)"
SPLIT_RULE = (
    "by position over the non-blank input lines: last test_fraction test, valid_fraction before it valid"
)


class CTRRecord(NamedTuple):
    """One impression: label 0/1, dense (N_d,) float32, sparse (F,) int64 ids."""

    label: int
    dense: np.ndarray
    sparse: np.ndarray


@dataclass(frozen=True)
class CTRSummary:
    """What a CTR writer wrote (the same numbers as ``dataset.json``)."""

    name: str
    out_url: str
    num_rows: int
    rows: dict[str, int]
    """Rows written per split."""
    positives: dict[str, int]
    """Clicks per split."""
    positive_rate: float
    hash_buckets: list[int]
    skipped: dict[str, int] = field(default_factory=dict)
    """Bad rows skipped, by reason (``on_error="skip"``)."""
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    """The first few skipped rows per reason, each as ``file:line: what is wrong``."""
    skip_log: str | None = None
    """Where every skipped row is listed (``<out_url>/skipped.log``), if any was skipped."""
    reused: bool = False
    """True when a complete data set with the same settings was already there and nothing was written."""


# ------------------------------------------------------------------------------------------- encoding


def hash_categorical(value: int, buckets: int) -> int:
    """The id of a present categorical value: ``1 + value mod (buckets - 1)`` (0 is the missing id)."""
    return 1 + value % (buckets - 1)


def encode_ctr_record(label: int, dense: Sequence[float], sparse: Sequence[int]) -> bytes:
    """The JSON member of one sample; ``dense`` is rounded to float32 and written as its shortest decimal."""
    dense_text = ",".join(map(_f32_text, dense))
    sparse_text = ",".join(map(str, sparse))
    return f'{{"label":{int(label)},"dense":[{dense_text}],"sparse":[{sparse_text}]}}'.encode()


_F32_TEXT: dict[float, str] = {}


def _f32_text(value: float) -> str:
    """The shortest decimal that reads back as ``float32(value)`` (memoised: Criteo's log counts repeat)."""
    text = _F32_TEXT.get(value)
    if text is None:
        if not math.isfinite(value):
            raise ValueError(f"dense value {value} is not finite")
        if len(_F32_TEXT) >= 1 << 20:
            _F32_TEXT.clear()
        text = _F32_TEXT[value] = str(np.float32(value))
    return text


def decode_ctr_sample(sample: Sample) -> CTRRecord:
    """A :class:`CTRRecord` from a streamed sample (``{"__key__", "json": bytes, ...}``)."""
    doc = json.loads(sample["json"])
    return CTRRecord(
        label=int(doc["label"]),
        dense=np.asarray(doc["dense"], dtype=np.float32),
        sparse=np.asarray(doc["sparse"], dtype=np.int64),
    )


def _buckets(hash_buckets: int | Sequence[int], count: int) -> list[int]:
    buckets = [hash_buckets] * count if isinstance(hash_buckets, int) else list(hash_buckets)
    if len(buckets) != count:
        raise ValueError(
            f"hash_buckets must be one int or {count} ints (one per categorical feature), got {len(buckets)}"
        )
    for i, n in enumerate(buckets):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"hash_buckets[{i}] must be an int >= 2 (id 0 is the missing value), got {n!r}")
    return buckets


# --------------------------------------------------------------------------------------------- writer


class CTRDatasetWriter:
    """Writes one CTR data set: three shard sets split by position, then ``dataset.json`` (:meth:`finish`).

    Use as a context manager; positions run 0..num_rows-1 and decide the split. On an exception no
    manifest and no ``dataset.json`` is written, so the partial output never looks complete.
    """

    def __init__(
        self,
        out_url: str,
        *,
        name: str,
        num_rows: int,
        dense_names: list[str],
        sparse_names: list[str],
        hash_buckets: list[int],
        valid_fraction: float,
        test_fraction: float,
        max_samples_per_shard: int,
        options: StorageOptions | None,
        parts: Sequence[int] | None = None,
    ) -> None:
        for label, frac in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"{label} must be in [0, 1), got {frac}")
        if valid_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"valid_fraction + test_fraction must be < 1, got {valid_fraction} + {test_fraction}"
            )
        if len(hash_buckets) != len(sparse_names):
            raise ValueError(f"{len(hash_buckets)} hash_buckets for {len(sparse_names)} sparse features")
        self.out_url = out_url
        self.name = name
        self.options = options
        self.dense_names, self.sparse_names, self.hash_buckets = dense_names, sparse_names, hash_buckets
        # ``parts``: row counts of sources split one by one (each its own last rows), positions then run
        # over the train rows of every part, then their valid rows, then their test rows
        parts = [num_rows] if parts is None else list(parts)
        if sum(parts) != num_rows:
            raise ValueError(f"parts {parts} do not add up to num_rows {num_rows}")
        n_valid = sum(int(n * valid_fraction) for n in parts)
        n_test = sum(int(n * test_fraction) for n in parts)
        self.num_positions = num_rows
        self.valid_start = num_rows - n_valid - n_test
        self.test_start = num_rows - n_test
        self.rows = dict.fromkeys(SPLITS, 0)
        self.positives = dict.fromkeys(SPLITS, 0)
        self.fractions = {"valid": valid_fraction, "test": test_fraction}
        self._meta = {split: {"dataset": name, "kind": KIND, "split": split} for split in SPLITS}
        self._stack = contextlib.ExitStack()
        self._writers = {
            split: ShardWriter(out_url, split, max_samples_per_shard, options, self._meta[split])
            for split in SPLITS
        }

    def __enter__(self) -> CTRDatasetWriter:
        for writer in self._writers.values():
            self._stack.enter_context(writer)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    def split_of(self, position: int) -> str:
        if not 0 <= position < self.num_positions:
            raise ValueError(f"position {position} is outside 0..{self.num_positions - 1}")
        return "train" if position < self.valid_start else "valid" if position < self.test_start else "test"

    def write(self, position: int, label: int, dense: Sequence[float], sparse: Sequence[int]) -> None:
        if len(dense) != len(self.dense_names) or len(sparse) != len(self.sparse_names):
            raise ValueError(
                f"row {position}: {len(dense)} dense / {len(sparse)} sparse values, expected "
                f"{len(self.dense_names)} / {len(self.sparse_names)}"
            )
        split = self.split_of(position)
        self._writers[split].write(f"{position:012d}", {"json": encode_ctr_record(label, dense, sparse)})
        self.rows[split] += 1
        self.positives[split] += int(label)

    def finish(self, skipped: dict[str, int], extra: dict[str, Any] | None = None) -> CTRSummary:
        """Write ``dataset.json``, the completion marker; call it after the ``with`` block has written the
        manifests. ``extra`` adds source-specific keys (sources, generator settings, column mapping)."""
        total = sum(self.rows.values())
        positives = sum(self.positives.values())
        splits = {
            split: {
                "prefix": split,
                "rows": self.rows[split],
                "positives": self.positives[split],
                "positive_rate": self.positives[split] / self.rows[split] if self.rows[split] else 0.0,
            }
            for split in SPLITS
        }
        doc: dict[str, Any] = {
            "kind": KIND,
            "name": self.name,
            "record": RECORD_FORMAT,
            "num_dense": len(self.dense_names),
            "num_sparse": len(self.sparse_names),
            "dense_features": self.dense_names,
            "sparse_features": self.sparse_names,
            "hash_buckets": self.hash_buckets,
            "dense_transform": DENSE_TRANSFORM,
            "sparse_encoding": SPARSE_ENCODING,
            "split_rule": SPLIT_RULE,
            "valid_fraction": self.fractions["valid"],
            "test_fraction": self.fractions["test"],
            "num_rows": total,
            "positives": positives,
            "positive_rate": positives / total if total else 0.0,
            "splits": splits,
            "skipped": dict(sorted(skipped.items())),
            **(extra or {}),
        }
        with atomic_write(join(self.out_url, "dataset.json"), self.options) as f:
            f.write(json.dumps(doc, indent=1).encode())
        return _summary(self.out_url, doc)


def _summary(out_url: str, doc: dict[str, Any], reused: bool = False) -> CTRSummary:
    return CTRSummary(
        name=doc["name"],
        out_url=out_url,
        num_rows=doc["num_rows"],
        rows={s: doc["splits"][s]["rows"] for s in SPLITS},
        positives={s: doc["splits"][s]["positives"] for s in SPLITS},
        positive_rate=doc["positive_rate"],
        hash_buckets=list(doc["hash_buckets"]),
        skipped=dict(doc["skipped"]),
        reused=reused,
    )


# --------------------------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class CTRDataset:
    """A complete CTR data set (its ``dataset.json``)."""

    url: str
    name: str
    dense_features: list[str]
    sparse_features: list[str]
    hash_buckets: list[int]
    rows: dict[str, int]
    positive_rate: float
    meta: dict[str, Any]
    """The whole ``dataset.json``."""

    @classmethod
    def open(cls, url: str, options: StorageOptions | None = None) -> CTRDataset:
        doc_url = join(url, "dataset.json")
        if not exists(doc_url, options):
            raise FileNotFoundError(
                f"no CTR data set at {url}: {doc_url} is missing (incomplete or never written)"
            )
        with open_read(doc_url, options) as f:
            doc = json.loads(f.read())
        if doc.get("kind") != KIND:
            raise ValueError(f"{doc_url} describes a {doc.get('kind', 'sequence')!r} data set, not a CTR one")
        return cls(
            url=url,
            name=doc["name"],
            dense_features=list(doc["dense_features"]),
            sparse_features=list(doc["sparse_features"]),
            hash_buckets=list(doc["hash_buckets"]),
            rows={s: doc["splits"][s]["rows"] for s in SPLITS},
            positive_rate=doc["positive_rate"],
            meta=doc,
        )


@dataclass(frozen=True)
class CTRBatch:
    """A batch of impressions: dense (B, N_d) float32, sparse (B, F) int64 ids, labels (B,) float32."""

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor
    keys: tuple[str, ...] = ()
    """Sample keys of the impressions, in row order, when they come from shards (for logging)."""

    def to(self, device: torch.device | str) -> CTRBatch:
        """This batch with its tensors on ``device``."""
        return CTRBatch(self.dense.to(device), self.sparse.to(device), self.labels.to(device), self.keys)


def collate_ctr(records: Sequence[CTRRecord], keys: Sequence[str] = ()) -> CTRBatch:
    """Stack records (with their sample ``keys``, if known) into a :class:`CTRBatch`."""
    if not records:
        raise ValueError("cannot collate an empty batch")
    return CTRBatch(
        dense=torch.from_numpy(np.stack([r.dense for r in records])),
        sparse=torch.from_numpy(np.stack([r.sparse for r in records])),
        labels=torch.tensor([float(r.label) for r in records], dtype=torch.float32),
        keys=tuple(keys),
    )


def split_shards(
    url: str, split: str, options: StorageOptions | None = None, *, rank: int = 0, world_size: int = 1
) -> list[ShardEntry]:
    """The manifest entries of ``split`` that rank ``rank`` of ``world_size`` reads: shards
    ``rank, rank + world_size, ...`` in file order (all of them for one rank)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return read_manifest(url, split, options).shards[rank::world_size]


def iter_ctr_samples(
    url: str, split: str, options: StorageOptions | None = None, *, rank: int = 0, world_size: int = 1
) -> Iterator[CTRRecord]:
    """The records of one split (of this rank's shards, see :func:`split_shards`) in file (= position)
    order, every shard checked against its manifest.

    For training across ranks and workers, stream the split with :class:`data_pipeline.stream.ShardStream`
    (prefix = split) and decode its samples with :func:`decode_ctr_sample`.
    """
    for entry in split_shards(url, split, options, rank=rank, world_size=world_size):
        for sample in iter_shard(join(url, entry.name), entry, options):
            yield decode_ctr_sample(sample)


def iter_ctr_batches(
    url: str,
    split: str,
    batch_size: int,
    *,
    drop_last: bool = False,
    options: StorageOptions | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[CTRBatch]:
    """:func:`iter_ctr_samples` in batches of ``batch_size`` (the last one smaller unless ``drop_last``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[CTRRecord] = []
    for record in iter_ctr_samples(url, split, options, rank=rank, world_size=world_size):
        batch.append(record)
        if len(batch) == batch_size:
            yield collate_ctr(batch)
            batch = []
    if batch and not drop_last:
        yield collate_ctr(batch)
