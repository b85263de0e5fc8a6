"""The Open Bandit Dataset sample (real ZOZOTOWN fashion impressions with clicks) as CTR shards.

The ``obp==0.4.1`` wheel ships six logs of 10,000 impressions each, ``obp/dataset/obd/<policy>/<campaign>/
<campaign>.csv`` for policy ``random`` | ``bts`` (the logging policy: uniform random or Bernoulli Thompson
sampling) and campaign ``all`` | ``men`` | ``women``, each with an ``item_context.csv``. They are read as
files from the installed package, located with ``importlib.util.find_spec`` (which runs none of obp's
code: its imports are heavy); install it with ``pip install --no-deps obp==0.4.1``::

    from data_pipeline.obp import convert_obp
    convert_obp("runs/data/obp-random-all", policy="random", campaign="all")
    convert_obp("runs/data/obp-all-logs", policy=["random", "bts"], campaign=["all", "men", "women"])

Columns -> features (one row per impression; clicks are rare: 0.4-0.7%):

* label: ``click``.
* dense (4), each in the record as float32:
  ``item_feature_0`` - the shown item's numeric feature from ``item_context.csv``, as it is (already
  standardised by ZOZO); ``affinity_shown`` = log(1 + ``user-item_affinity_<item_id>``), the user's
  affinity to the shown item; ``affinity_total`` = log(1 + the sum of all ``user-item_affinity_*``
  columns); ``affinity_count`` = log(1 + how many of them are non-zero).
* sparse (11): ``item_id`` (id = item_id + 1), ``position`` (1..3, the slot in the recommendation
  interface, id = position), ``user_feature_0..3`` and the shown item's ``item_feature_1..3`` (hashed
  categorical strings: a vocabulary of the distinct values, sorted, gives ids 1..V), ``hour`` (UTC hour
  of ``timestamp``, id = hour + 1) and ``weekday`` (Monday = 1 .. Sunday = 7). Id 0 stays "missing", as
  in the Criteo encoding, so every table has (largest id + 1) rows; ``dataset.json`` lists the
  vocabularies under ``obp.vocabularies``.
* not used: ``propensity_score`` (the logging policy's probability of the action, constant for the
  random policy; an off-policy-evaluation quantity, not a feature known at serving time) and the CSV's
  unnamed index column.

Several logs (lists of policies and campaigns: every log of their cross product) make one data set:

* ``item_id`` is namespaced by campaign, since the campaigns' item sets differ (item 3 of ``men`` is not
  item 3 of ``women``): id = the campaign's offset + item_id + 1, offsets in the order all, men, women
  (``obp.item_id_offsets``; all six logs: all 0, men 80, women 114). The two policies of one campaign
  show the same items (their ``item_context.csv`` list the same ids; each log's own file gives its
  item features, whose hashed strings differ between the policies' files).
* two more sparse features name the log: ``policy`` (1..P in the order random, bts) and ``campaign``
  (1..C in the order all, men, women).
* the vocabularies of the hashed columns are over all logs.
* each log is split on its own as below (its last rows are its test rows), so every log contributes
  to every split in its share; within a split the rows of all logs are interleaved by timestamp.
  All six: 48,000 / 6,000 / 6,000 rows.

Splits as in data_pipeline/ctr.py: by position in the log, which is in time order (one week, from
2019-11-24): the last ``test_fraction`` is test, the ``valid_fraction`` before it validation. With so
few clicks the validation and test AUCs rest on a handful of positives; this data set checks the
pipeline on real sparse + dense features rather than showing a model learn much.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from data_pipeline.converters import ConversionError
from data_pipeline.ctr import CTRDatasetWriter, CTRSummary
from data_pipeline.storage import StorageOptions

__all__ = [
    "OBP_CAMPAIGNS",
    "OBP_DENSE_NAMES",
    "OBP_POLICIES",
    "OBP_SPARSE_NAMES",
    "convert_obp",
    "obp_log_path",
]

OBP_POLICIES = ("random", "bts")
OBP_CAMPAIGNS = ("all", "men", "women")
OBP_DENSE_NAMES = ["item_feature_0", "affinity_shown", "affinity_total", "affinity_count"]
_USER = [f"user_feature_{i}" for i in range(4)]
_ITEM = [f"item_feature_{i}" for i in range(1, 4)]
OBP_SPARSE_NAMES = ["item_id", "position", *_USER, *_ITEM, "hour", "weekday"]
_VOCAB_FEATURES = _USER + _ITEM
_LOG_FEATURES = ["policy", "campaign"]  # only in a data set of several logs
_OBP_HINT = "pip install --no-deps obp==0.4.1"


def obp_log_path(policy: str, campaign: str) -> str:
    """The local path of the packaged log ``<policy>/<campaign>/<campaign>.csv``, without importing obp."""
    if policy not in OBP_POLICIES:
        raise ValueError(f"policy must be one of {OBP_POLICIES}, got {policy!r}")
    if campaign not in OBP_CAMPAIGNS:
        raise ValueError(f"campaign must be one of {OBP_CAMPAIGNS}, got {campaign!r}")
    spec = importlib.util.find_spec("obp")  # reads no code of the package
    if spec is None or spec.origin is None:
        raise ConversionError(
            f"the Open Bandit Dataset is read from the obp wheel, which is not installed: {_OBP_HINT}"
        )
    path = os.path.join(os.path.dirname(spec.origin), "dataset", "obd", policy, campaign, f"{campaign}.csv")
    if not os.path.isfile(path):
        raise ConversionError(f"no Open Bandit log at {path}: reinstall with {_OBP_HINT}")
    return path


def _read_csv(path: str) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a CSV with a header line; line numbers count the header as line 1."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(io.StringIO(f.read()))
        return [(reader.line_num, row) for row in reader]


@dataclass
class _Log:
    """One packaged log, read: its impressions (with parsed times) and its campaign's items."""

    policy: str
    campaign: str
    path: str
    items_path: str
    items: dict[int, dict[str, str]]
    rows: list[tuple[int, dict[str, str]]]  # (line number, row)
    times: list[datetime]
    affinity_columns: list[str]


def _read_log(policy: str, campaign: str) -> _Log:
    log_path = obp_log_path(policy, campaign)
    items_path = os.path.join(os.path.dirname(log_path), "item_context.csv")
    items: dict[int, dict[str, str]] = {}
    for lineno, row in _read_csv(items_path):
        try:
            items[int(row["item_id"])] = row
        except (KeyError, ValueError) as e:
            raise ConversionError(f"{items_path}:{lineno}: bad item row ({type(e).__name__}: {e})") from e
    rows = _read_csv(log_path)
    if not rows:
        raise ConversionError(f"{log_path}: no impressions")
    times = []
    for lineno, row in rows:
        try:
            times.append(datetime.fromisoformat(row["timestamp"]))
        except (KeyError, ValueError) as e:
            raise ConversionError(f"{log_path}:{lineno}: bad timestamp ({type(e).__name__}: {e})") from e
    affinity_columns = [c for c in rows[0][1] if c.startswith("user-item_affinity_")]
    return _Log(policy, campaign, log_path, items_path, items, rows, times, affinity_columns)


def _choices(kind: str, given: str | Sequence[str], allowed: tuple[str, ...]) -> list[str]:
    """``given`` as a list in the order of ``allowed``; unknown, repeated or no values are errors."""
    values = [given] if isinstance(given, str) else list(given)
    for v in values:
        if v not in allowed:
            raise ValueError(f"{kind} must be one of {allowed}, got {v!r}")
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{kind}: give each of {allowed} at most once and at least one, got {values}")
    return [v for v in allowed if v in values]


def convert_obp(
    out_url: str,
    *,
    policy: str | Sequence[str] = "random",
    campaign: str | Sequence[str] = "all",
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_samples_per_shard: int = 5000,
    options: StorageOptions | None = None,
) -> CTRSummary:
    """Convert packaged Open Bandit logs (10,000 impressions each) to CTR shards under ``out_url``.

    One ``policy`` and one ``campaign`` convert that log; lists of them convert every (policy, campaign)
    log of the cross product into one data set (module docstring: several logs)."""
    policies, campaigns = (
        _choices("policy", policy, OBP_POLICIES),
        _choices("campaign", campaign, OBP_CAMPAIGNS),
    )
    logs = [_read_log(p, c) for p in policies for c in campaigns]
    several = len(logs) > 1

    def value(where: str, row: dict[str, str], column: str) -> str:
        try:
            return row[column]
        except KeyError:
            raise ConversionError(f"{where}: no column {column!r}") from None

    # vocabularies of the hashed categorical columns over all logs: sorted distinct values -> ids 1..V
    seen: dict[str, set[str]] = {name: set() for name in _VOCAB_FEATURES}
    for log in logs:
        for lineno, row in log.rows:
            where = f"{log.path}:{lineno}"
            for name in _USER:
                seen[name].add(value(where, row, name))
            item = _item(log.items, value(where, row, "item_id"), where)
            for name in _ITEM:
                seen[name].add(value(f"{log.items_path} (item {item})", log.items[item], name))
    vocab = {name: {v: i for i, v in enumerate(sorted(seen[name]), start=1)} for name in _VOCAB_FEATURES}
    # item ids namespaced by campaign: the campaigns' item sets differ, the policies of one campaign share it
    item_offsets: dict[str, int] = {}
    first_items: dict[str, _Log] = {}
    num_items = 0
    for log in logs:
        if log.campaign in first_items:
            if set(log.items) != set(first_items[log.campaign].items):
                raise ConversionError(
                    f"{log.items_path}: its item ids differ from those of {first_items[log.campaign].items_path}"
                )
            continue
        first_items[log.campaign] = log
        item_offsets[log.campaign] = num_items
        num_items += max(log.items) + 1
    sparse_names = OBP_SPARSE_NAMES + (_LOG_FEATURES if several else [])
    buckets = [num_items + 1, 4] + [len(vocab[n]) + 1 for n in _VOCAB_FEATURES] + [25, 8]
    if several:
        buckets += [len(policies) + 1, len(campaigns) + 1]

    # each log split by the fractions (its last rows are test); positions run over the train rows of
    # all logs interleaved by time, then the valid rows, then the test rows
    n_rows = [len(log.rows) for log in logs]
    writer = CTRDatasetWriter(
        out_url,
        name=f"obp-{'+'.join(policies)}-{'+'.join(campaigns)}",
        num_rows=sum(n_rows),
        dense_names=OBP_DENSE_NAMES,
        sparse_names=sparse_names,
        hash_buckets=buckets,
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        max_samples_per_shard=max_samples_per_shard,
        options=options,
        parts=n_rows,
    )
    sections: list[list[tuple[datetime, int, int]]] = [[], [], []]  # (time, log, row) per split
    for index, (log, n) in enumerate(zip(logs, n_rows, strict=True)):
        valid_start = n - int(n * valid_fraction) - int(n * test_fraction)
        test_start = n - int(n * test_fraction)
        for i, when in enumerate(log.times):
            section = 0 if i < valid_start else 1 if i < test_start else 2
            sections[section].append((when, index, i))
    order = [entry for section in sections for entry in (sorted(section) if several else section)]
    with writer:
        for position, (when, index, i) in enumerate(order):
            log = logs[index]
            lineno, row = log.rows[i]
            where = f"{log.path}:{lineno}"
            try:
                label = int(row["click"])
                item = _item(log.items, row["item_id"], where)
                slot = int(row["position"])
                affinities = [float(row[c]) for c in log.affinity_columns]
                shown = float(row[f"user-item_affinity_{item}"])
                item_numeric = float(log.items[item]["item_feature_0"])
            except (KeyError, ValueError) as e:
                raise ConversionError(f"{where}: bad impression ({type(e).__name__}: {e})") from e
            if label not in (0, 1) or not 1 <= slot <= 3:
                raise ConversionError(f"{where}: click {label} / position {slot} out of range")
            dense = [
                item_numeric,
                math.log1p(max(shown, 0.0)),
                math.log1p(sum(max(a, 0.0) for a in affinities)),
                math.log1p(sum(a != 0 for a in affinities)),
            ]
            sparse = [
                item_offsets[log.campaign] + item + 1,
                slot,
                *(vocab[n][row[n]] for n in _USER),
                *(vocab[n][log.items[item][n]] for n in _ITEM),
                when.hour + 1,
                when.isoweekday(),
            ]
            if several:
                sparse += [policies.index(log.policy) + 1, campaigns.index(log.campaign) + 1]
            writer.write(position, label, dense, sparse)
    sparse_columns = {
        "item_id": "item_id + 1" + (" + the campaign's offset (obp.item_id_offsets)" if several else ""),
        "position": "position (1..3)",
        **{n: "vocabulary id (obp.vocabularies), 1..V" for n in _VOCAB_FEATURES},
        "hour": "UTC hour of timestamp + 1",
        "weekday": "ISO weekday of timestamp (Monday = 1)",
    }
    if several:
        sparse_columns["policy"] = f"the log's policy: {policies} -> 1..{len(policies)}"
        sparse_columns["campaign"] = f"the log's campaign: {campaigns} -> 1..{len(campaigns)}"
    extra: dict[str, Any] = {
        "sources": [path for log in logs for path in (log.path, log.items_path)],
        "obp": {
            "package": "obp==0.4.1",
            "policy": policies[0] if not several else policies,
            "campaign": campaigns[0] if not several else campaigns,
            **(
                {"logs": [f"{log.policy}/{log.campaign}" for log in logs], "item_id_offsets": item_offsets}
                if several
                else {}
            ),
            "columns": {
                "label": "click",
                "dense": {
                    "item_feature_0": "item_context.item_feature_0 (as is)",
                    "affinity_shown": "log1p(user-item_affinity_<item_id>)",
                    "affinity_total": "log1p(sum of user-item_affinity_*)",
                    "affinity_count": "log1p(number of non-zero user-item_affinity_*)",
                },
                "sparse": sparse_columns,
                "unused": ["propensity_score", "index column"],
            },
            "vocabularies": {n: sorted(vocab[n], key=vocab[n].__getitem__) for n in _VOCAB_FEATURES},
        },
    }
    return writer.finish({}, extra)


def _item(items: dict[int, dict[str, str]], raw: str, where: str) -> int:
    try:
        item = int(raw)
    except ValueError:
        raise ConversionError(f"{where}: item_id {raw!r} is not an integer") from None
    if item not in items:
        raise ConversionError(f"{where}: item_id {item} is not in item_context.csv")
    return item
