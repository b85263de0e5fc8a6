"""The Criteo click-log format (TSV) converted into CTR shards (data_pipeline/ctr.py has the layout)::

    from data_pipeline.criteo import convert_criteo
    convert_criteo("s3://bucket/criteo", ["day_0.gz", "day_1.gz"], hash_buckets=10_000_000, on_error="skip")

**Input.** One impression per line, 40 tab-separated fields: the label (0/1), 13 integer features
``int_0..int_12``, 26 categorical features ``cat_0..cat_25`` (32-bit hashes written as hex, e.g.
``68fd1e64``). Any feature may be empty (missing). Files may be gzipped (detected by magic bytes) and
local or ``s3://``. Blank lines are ignored. The non-blank lines of all inputs, in the order given, are
the positions 0..N-1 of the split (Criteo's files are chronological: Kaggle's ``train.txt`` covers 7 days,
the 1TB logs come as ``day_0..day_23``, so this is the usual "evaluate on later days" split). Counting N
needs one extra pass over the inputs.

**Bad rows** (another field count than 40, a label other than 0/1, a non-integer dense value, a
categorical value that is not hex) raise :class:`ConversionError` naming ``file:line``; with
``on_error="skip"`` they are skipped and counted by reason (``field_count``, ``bad_label``, ``bad_dense``,
``bad_categorical``) in the summary, the manifests and ``dataset.json``, the first few named there and
every one in ``skipped.log``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator, Sequence

from data_pipeline.converters import ConversionError, OnError, RowProblems, iter_text_lines
from data_pipeline.ctr import CTRDatasetWriter, CTRSummary, _buckets, hash_categorical
from data_pipeline.storage import StorageOptions

__all__ = [
    "CRITEO_DENSE_NAMES",
    "CRITEO_SPARSE_NAMES",
    "ConversionError",
    "convert_criteo",
    "parse_criteo_line",
]

NUM_DENSE, NUM_SPARSE = 13, 26
CRITEO_DENSE_NAMES = [f"int_{i}" for i in range(NUM_DENSE)]
CRITEO_SPARSE_NAMES = [f"cat_{i}" for i in range(NUM_SPARSE)]

_INT = re.compile(rb"-?[0-9]{1,18}")  # int() alone would accept " 7", "+7" and "1_000"
_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")
# a whole well-formed line in one C-level match (the per-field checks above only explain a rejected line)
_LINE = re.compile(
    rb"([01])"
    + (rb"\t(" + _INT.pattern + rb")?") * NUM_DENSE
    + (rb"\t(" + _HEX.pattern + rb")?") * NUM_SPARSE
    + rb"\r?\n?"
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


def criteo_writer(
    out_url: str,
    name: str,
    num_rows: int,
    hash_buckets: list[int],
    valid_fraction: float,
    test_fraction: float,
    max_samples_per_shard: int,
    options: StorageOptions | None,
) -> CTRDatasetWriter:
    """The writer of a data set with Criteo's 13 dense and 26 categorical features."""
    return CTRDatasetWriter(
        out_url,
        name=name,
        num_rows=num_rows,
        dense_names=CRITEO_DENSE_NAMES,
        sparse_names=CRITEO_SPARSE_NAMES,
        hash_buckets=hash_buckets,
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        max_samples_per_shard=max_samples_per_shard,
        options=options,
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
    writer = criteo_writer(
        out_url, name, num_rows, buckets, valid_fraction, test_fraction, max_samples_per_shard, options
    )
    with writer:
        _write_criteo_lines(writer, lines(), problems)
    log_url = problems.write_log(out_url, options)
    summary = writer.finish(
        dict(problems.counts), {"sources": paths, "skipped_examples": dict(problems.examples)}
    )
    return dataclasses.replace(summary, skipped_examples=dict(problems.examples), skip_log=log_url)
