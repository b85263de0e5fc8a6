"""Click-through-rate (CTR) data sets as WebDataset shards: the Criteo TSV format, and Criteo-like
synthetic data with learnable structure (the demo's embedded data set); data_pipeline/obp.py writes the
Open Bandit Dataset in the same layout. Read them back with :func:`iter_ctr_samples` / :func:`iter_ctr_batches`::

    from data_pipeline.criteo import convert_criteo, prepare_synthetic_ctr, iter_ctr_batches
    convert_criteo("s3://bucket/criteo", ["day_0.gz", "day_1.gz"], hash_buckets=10_000_000, on_error="skip")
    prepare_synthetic_ctr("runs/data/synthetic-ctr", rows=50_000, seed=0)
    for batch in iter_ctr_batches("runs/data/synthetic-ctr", "train", batch_size=512):
        logits = model(batch.dense, batch.kjt(names))  # batch.labels (B,) float32

**Input (Criteo).** One impression per line, 40 tab-separated fields: the label (0/1), 13 integer
features ``int_0..int_12``, 26 categorical features ``cat_0..cat_25`` (32-bit hashes written as hex,
e.g. ``68fd1e64``). Any feature may be empty (missing). Files may be gzipped (detected by magic bytes)
and local or ``s3://``. Blank lines are ignored.

**Encoding** (the same for every CTR data set; ``dataset.json`` records it):

* dense: ``float32(log(1 + max(x, 0)))``, a missing value is x = 0 (so 0.0). The log tames Criteo's
  heavy-tailed counts; negatives (``int_1`` has a few -1..-3) are clipped to 0 first, as in the
  facebookresearch/dlrm preprocessing (TorchRec's ``tsv_to_npys`` instead shifts by the column minimum).
* sparse: id 0 is reserved for "missing"; a present value v (the hex string parsed as an integer) maps to
  ``1 + v mod (hash_buckets[f] - 1)``. So feature f's embedding table has exactly ``hash_buckets[f]`` rows
  and the missing value has its own learnable row (MLPerf maps missing to the hash of 0 instead).

**Bad rows** (another field count than 40, a label other than 0/1, a non-integer dense value, a
categorical value that is not hex) raise :class:`ConversionError` naming ``file:line``; with
``on_error="skip"`` they are skipped and counted by reason (``field_count``, ``bad_label``, ``bad_dense``,
``bad_categorical``) in the summary, the manifests and ``dataset.json``.

**Splits** by position: the non-blank lines of all inputs, in the order given, are numbered 0..N-1; the
last ``test_fraction`` of them (floor) is ``test``, the ``valid_fraction`` before that ``valid``, the rest
``train``. Criteo's files are chronological (Kaggle's ``train.txt`` covers 7 days, the 1TB logs come as
``day_0..day_23``), so this is the usual "evaluate on later days" split. A skipped row leaves a gap; the
positions of the others do not move. Counting N needs one extra pass over the inputs.

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
import dataclasses
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from data_pipeline.converters import ConversionError, OnError, RowProblems, iter_text_lines
from data_pipeline.shards import ShardEntry, ShardWriter, generated_dataset, read_manifest
from data_pipeline.storage import StorageOptions, atomic_write, exists, join, open_read
from data_pipeline.stream import Sample, iter_shard

__all__ = [
    "CRITEO_DENSE_NAMES",
    "CRITEO_SPARSE_NAMES",
    "DENSE_TRANSFORM",
    "SPARSE_ENCODING",
    "SPLITS",
    "CTRBatch",
    "CTRDataset",
    "CTRDatasetWriter",
    "CTRRecord",
    "CTRSummary",
    "ConversionError",
    "collate_ctr",
    "split_shards",
    "convert_criteo",
    "decode_ctr_sample",
    "encode_ctr_record",
    "hash_categorical",
    "iter_ctr_batches",
    "iter_ctr_samples",
    "parse_criteo_line",
    "prepare_synthetic_ctr",
    "synthetic_criteo_lines",
]

NUM_DENSE, NUM_SPARSE = 13, 26
CRITEO_DENSE_NAMES = [f"int_{i}" for i in range(NUM_DENSE)]
CRITEO_SPARSE_NAMES = [f"cat_{i}" for i in range(NUM_SPARSE)]
SPLITS = ("train", "valid", "test")
KIND = "ctr"
RECORD_FORMAT = '<position:012d>.json = {"label": 0|1, "dense": [float32], "sparse": [int]}'
DENSE_TRANSFORM = "float32(log(1 + max(x, 0))); missing -> x = 0"
SPARSE_ENCODING = "0 = missing; present value v -> 1 + v mod (hash_buckets[f] - 1)"
SPLIT_RULE = (
    "by position over the non-blank input lines: last test_fraction test, valid_fraction before it valid"
)

_INT = re.compile(rb"-?[0-9]{1,18}")  # int() alone would accept " 7", "+7" and "1_000"
_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")
# a whole well-formed line in one C-level match (the per-field checks above only explain a rejected line)
_LINE = re.compile(
    rb"([01])"
    + (rb"\t(" + _INT.pattern + rb")?") * NUM_DENSE
    + (rb"\t(" + _HEX.pattern + rb")?") * NUM_SPARSE
    + rb"\r?\n?"
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


class _BadRow(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_criteo_line(line: bytes, hash_buckets: Sequence[int]) -> tuple[int, list[float], list[int]]:
    """``(label, dense (13 transformed floats), sparse (26 ids))`` of one Criteo TSV line.

    A malformed line raises ``ValueError`` (a ``_BadRow`` carrying a ``reason``) without its location.
    """
    match = _LINE.fullmatch(line)
    if match is None:
        _diagnose(line)  # raises, naming the first bad field
        raise _BadRow("malformed", "malformed line")  # unreachable unless the two checks disagree
    groups = match.groups()
    dense = [0.0 if raw is None else math.log1p(max(int(raw), 0)) for raw in groups[1 : 1 + NUM_DENSE]]
    sparse = [
        0 if raw is None else hash_categorical(int(raw, 16), buckets)
        for raw, buckets in zip(groups[1 + NUM_DENSE :], hash_buckets)
    ]
    return int(groups[0]), dense, sparse


def _diagnose(line: bytes) -> None:
    """Raise ``_BadRow`` for the first problem of a line that the one-regex fast path rejected."""
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) != 1 + NUM_DENSE + NUM_SPARSE:
        raise _BadRow(
            "field_count",
            f"{len(fields)} tab-separated fields, expected {1 + NUM_DENSE + NUM_SPARSE} (label, "
            f"{NUM_DENSE} integer, {NUM_SPARSE} categorical; Criteo's unlabeled test files are not supported)",
        )
    if fields[0] not in (b"0", b"1"):
        raise _BadRow("bad_label", f"label {fields[0].decode(errors='replace')!r} is not 0 or 1")
    for name, raw in zip(CRITEO_DENSE_NAMES, fields[1 : 1 + NUM_DENSE]):
        if raw and not _INT.fullmatch(raw):
            raise _BadRow("bad_dense", f"{name} = {raw.decode(errors='replace')!r} is not an integer")
    for name, raw in zip(CRITEO_SPARSE_NAMES, fields[1 + NUM_DENSE :]):
        if raw and not _HEX.fullmatch(raw):
            raise _BadRow("bad_categorical", f"{name} = {raw.decode(errors='replace')!r} is not hex")


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
        n_valid, n_test = int(num_rows * valid_fraction), int(num_rows * test_fraction)
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


def _write_criteo_lines(
    writer: CTRDatasetWriter, lines: Iterable[tuple[str, int, bytes]], problems: RowProblems
) -> None:
    """Parse ``(url, line number, line)`` in order; the i-th line is position i."""
    for position, (url, lineno, line) in enumerate(lines):
        try:
            label, dense, sparse = parse_criteo_line(line, writer.hash_buckets)
        except _BadRow as e:
            problems.bad(e.reason, f"{url}:{lineno}: {e}")
            continue
        writer.write(position, label, dense, sparse)


# --------------------------------------------------------------------------------------------- Criteo


def convert_criteo(
    out_url: str,
    src_paths: str | Sequence[str],
    *,
    hash_buckets: int | Sequence[int],
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_samples_per_shard: int = 50_000,
    on_error: OnError = "raise",
    name: str = "criteo",
    options: StorageOptions | None = None,
) -> CTRSummary:
    """Convert Criteo TSV files (plain or gzipped, local or S3, in chronological order) to CTR shards.

    ``hash_buckets``: rows of each categorical feature's table, one int for all 26 or one per feature.
    """
    paths = [src_paths] if isinstance(src_paths, str) else list(src_paths)
    if not paths:
        raise ValueError("convert_criteo needs at least one input file")
    buckets = _buckets(hash_buckets, NUM_SPARSE)
    problems = RowProblems(on_error)

    def lines() -> Iterator[tuple[str, int, bytes]]:
        for url in paths:
            for lineno, line in iter_text_lines(url, options):
                yield url, lineno, line

    num_rows = sum(1 for _ in lines())  # the split needs the total; one cheap extra pass
    writer = CTRDatasetWriter(
        out_url,
        name=name,
        num_rows=num_rows,
        dense_names=CRITEO_DENSE_NAMES,
        sparse_names=CRITEO_SPARSE_NAMES,
        hash_buckets=buckets,
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        max_samples_per_shard=max_samples_per_shard,
        options=options,
    )
    with writer:
        _write_criteo_lines(writer, lines(), problems)
    log_url = problems.write_log(out_url, options)
    summary = writer.finish(
        dict(problems.counts), {"sources": paths, "skipped_examples": dict(problems.examples)}
    )
    return dataclasses.replace(summary, skipped_examples=dict(problems.examples), skip_log=log_url)


# ------------------------------------------------------------------------------------------ synthetic

# Hidden structure of the synthetic data (see synthetic_criteo_lines). The sizes make a logistic
# regression on one-hot features clearly better than chance, and leave much more to a model that can
# form products of embeddings (the pairwise and dense x categorical terms have zero mean per value).
_LATENT = 4  # width of the hidden per-value factor vectors
_NUM_PAIRS = 10  # interacting pairs of categorical features
_MAIN_SCALE = 0.25  # std of a value's own (main) effect on the logit
_PAIR_SCALE = 1.0  # scale of each <u_f, u_g> pair term
_DENSE_SCALE = 0.3  # std of a dense feature's own slope
_DENSE_CROSS = 4  # dense features whose effect is modulated by a categorical value's factor vector
_TARGET_RATE = 0.25  # positive rate (Criteo: ~0.26), reached by calibrating the bias
_CHUNK = 4096  # rows per generator block; row r's values depend only on (seed, r // _CHUNK)
_WORLD, _ROWS, _CALIBRATION = 0, 1, 2  # seed-tuple tags: independent generator streams


class _World:
    """The hidden parameters, all drawn from ``default_rng((seed, _WORLD))``."""

    def __init__(self, seed: int, max_cardinality: int) -> None:
        rng = np.random.default_rng((seed, _WORLD))
        self.cardinality = rng.permutation(
            np.geomspace(3, max_cardinality, NUM_SPARSE).round().astype(np.int64)
        )
        self.tokens = [rng.integers(0, 2**32, n, dtype=np.int64) for n in self.cardinality]  # hex values
        # Zipf-like popularity within each feature
        self.cum_pop = [np.cumsum(1.0 / np.arange(1, n + 1) ** 1.1) for n in self.cardinality]
        self.cat_missing = rng.uniform(0.0, 0.15, NUM_SPARSE)
        self.main = [rng.normal(0.0, _MAIN_SCALE, n) for n in self.cardinality]
        self.factors = [rng.normal(0.0, 1.0, (n, _LATENT)) for n in self.cardinality]
        pairs = [(f, g) for f in range(NUM_SPARSE) for g in range(f + 1, NUM_SPARSE)]
        self.pairs = [pairs[i] for i in rng.choice(len(pairs), _NUM_PAIRS, replace=False)]
        self.pair_weight = _PAIR_SCALE / math.sqrt(_LATENT * _NUM_PAIRS / 4)
        # dense counts: floor(exp(N(mu, sigma))) - 1 >= 0, heavy-tailed like Criteo's
        self.dense_mu = rng.uniform(0.0, 4.0, NUM_DENSE)
        self.dense_sigma = rng.uniform(0.5, 1.5, NUM_DENSE)
        self.dense_missing = rng.uniform(0.0, 0.4, NUM_DENSE)
        self.dense_slope = rng.normal(0.0, _DENSE_SCALE, NUM_DENSE)
        self.cross_feature = rng.choice(NUM_SPARSE, _DENSE_CROSS, replace=False)
        self.cross_vector = rng.normal(0.0, 1.0 / math.sqrt(_LATENT), (_DENSE_CROSS, _LATENT))
        self.bias = 0.0
        self.bias = self._calibrated_bias(seed)

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(values (n, 26) int, -1 = missing; counts (n, 13) int, -1 = missing; logits (n,); labels (n,))``."""
        values = np.empty((n, NUM_SPARSE), dtype=np.int64)
        for f in range(NUM_SPARSE):
            cum = self.cum_pop[f]
            values[:, f] = np.minimum(
                np.searchsorted(cum, rng.random(n) * cum[-1], side="right"), len(cum) - 1
            )
        values[rng.random((n, NUM_SPARSE)) < self.cat_missing] = -1
        counts = np.floor(np.exp(self.dense_mu + self.dense_sigma * rng.standard_normal((n, NUM_DENSE)))) - 1
        counts = np.maximum(counts, 0).astype(np.int64)
        counts[rng.random((n, NUM_DENSE)) < self.dense_missing] = -1
        logits = self._logits(values, counts)
        labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int64)
        return values, counts, logits, labels

    def _logits(self, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
        n = values.shape[0]
        present = values >= 0
        main = np.zeros(n)
        factors = np.zeros((n, NUM_SPARSE, _LATENT))  # a missing value has no effect (zero vector)
        for f in range(NUM_SPARSE):
            v = np.where(present[:, f], values[:, f], 0)
            main += np.where(present[:, f], self.main[f][v], 0.0)
            factors[:, f] = np.where(present[:, f, None], self.factors[f][v], 0.0)
        pair = sum(np.einsum("nk,nk->n", factors[:, f], factors[:, g]) for f, g in self.pairs)
        z = (np.log1p(np.maximum(counts, 0)) - self.dense_mu) / self.dense_sigma  # (n, 13), about N(0, 1)
        z[counts < 0] = 0.0
        dense = z @ self.dense_slope
        cross = sum(
            z[:, j] * (factors[:, f] @ self.cross_vector[j]) for j, f in enumerate(self.cross_feature)
        )
        return self.bias + main + self.pair_weight * pair + dense + cross

    def _calibrated_bias(self, seed: int) -> float:
        rng = np.random.default_rng((seed, _CALIBRATION))
        _, _, logits, _ = self.draw(rng, 20_000)
        low, high = -20.0, 20.0
        for _ in range(60):  # bisection on the mean click probability
            mid = (low + high) / 2
            if np.mean(1.0 / (1.0 + np.exp(-(logits + mid)))) < _TARGET_RATE:
                low = mid
            else:
                high = mid
        return (low + high) / 2


def synthetic_criteo_lines(rows: int, seed: int, *, max_cardinality: int = 100) -> Iterator[bytes]:
    """Criteo-format TSV lines (label, 13 ints, 26 hex) with learnable hidden structure.

    Per row: each categorical feature f takes one of ``cardinality[f]`` values (3..``max_cardinality``,
    Zipf-popular, missing with a per-feature rate up to 15%), written as a fixed random 32-bit hex token;
    each dense feature is a heavy-tailed count (missing up to 40%). The click is Bernoulli(sigmoid(logit)):

        logit = bias + sum_f m_f[v_f]                                 main effects (one-hot learnable)
              + w * sum_{(f,g) in 10 pairs} <u_f[v_f], u_g[v_g]>      pairwise factor interactions
              + sum_j a_j z_j + sum_{j<4} z_j <c_j, u_{f_j}[v_{f_j}]> dense slopes and dense x categorical

    with z_j the standardised log count. The interaction terms average to zero over each single value,
    so a one-hot logistic regression sees only the main and dense effects, while DLRM's dot products of
    embeddings (and its dense vector) can represent them. The bias is calibrated to a 25% click rate.
    Row r depends only on ``(seed, r // 4096)``: a smaller ``rows`` gives a prefix of a larger one.
    """
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    if max_cardinality < 3:
        raise ValueError(f"max_cardinality must be >= 3, got {max_cardinality}")
    world = _World(seed, max_cardinality)
    # per feature: its tokens as text, plus "" at index -1 for a missing value
    token_text = [
        np.array([f"{t:08x}" for t in tokens.tolist()] + [""], dtype=object) for tokens in world.tokens
    ]
    for chunk_start in range(0, rows, _CHUNK):
        n = min(_CHUNK, rows - chunk_start)
        rng = np.random.default_rng((seed, _ROWS, chunk_start // _CHUNK))
        values, counts, _, labels = world.draw(rng, _CHUNK)
        columns = [labels[:n].astype(str).astype(object)]
        columns += [
            np.where(counts[:n, j] < 0, "", counts[:n, j].astype(str)).astype(object)
            for j in range(NUM_DENSE)
        ]
        columns += [token_text[f][values[:n, f]] for f in range(NUM_SPARSE)]  # index -1 -> ""
        for cells in zip(*(c.tolist() for c in columns)):
            yield ("\t".join(cells) + "\n").encode()


def prepare_synthetic_ctr(
    out_url: str,
    *,
    rows: int = 50_000,
    seed: int = 0,
    hash_buckets: int | Sequence[int] = 1000,
    max_cardinality: int = 100,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_samples_per_shard: int = 10_000,
    options: StorageOptions | None = None,
) -> CTRSummary:
    """Write :func:`synthetic_criteo_lines` through the Criteo converter's encoding into CTR shards.

    The result is byte-identical to writing those lines to a TSV file and running :func:`convert_criteo`
    on it with the same settings. If ``out_url`` already holds a complete data set made with the same
    settings it is reused (``reused=True``); one made with other settings is a ValueError.
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive int, got {rows!r}")
    buckets = _buckets(hash_buckets, NUM_SPARSE)
    generator = {
        "rows": rows,
        "seed": seed,
        "max_cardinality": max_cardinality,
        "hash_buckets": buckets,
        "valid_fraction": valid_fraction,
        "test_fraction": test_fraction,
        "max_samples_per_shard": max_samples_per_shard,
    }
    existing = _existing_synthetic(out_url, generator, options)
    if existing is not None:
        return existing
    writer = CTRDatasetWriter(
        out_url,
        name="synthetic-ctr",
        num_rows=rows,
        dense_names=CRITEO_DENSE_NAMES,
        sparse_names=CRITEO_SPARSE_NAMES,
        hash_buckets=buckets,
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        max_samples_per_shard=max_samples_per_shard,
        options=options,
    )
    problems = RowProblems("raise")  # generated lines are never malformed; one would be a bug
    source = "synthetic"
    with writer:
        numbered = (
            (source, i + 1, line)
            for i, line in enumerate(synthetic_criteo_lines(rows, seed, max_cardinality=max_cardinality))
        )
        _write_criteo_lines(writer, numbered, problems)
    return writer.finish({}, {"sources": [source], "generator": generator})


def _existing_synthetic(
    out_url: str, generator: dict[str, Any], options: StorageOptions | None
) -> CTRSummary | None:
    doc = generated_dataset(out_url, generator, options)
    return None if doc is None else _summary(out_url, doc, reused=True)


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

    def kjt(self, keys: list[str]) -> Any:
        """The sparse ids as a KeyedJaggedTensor (one id per sample and feature) with ``keys``."""
        from models.dlrm.model import ids_to_kjt  # torchrec is imported only where a KJT is wanted

        return ids_to_kjt(self.sparse, keys)


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
