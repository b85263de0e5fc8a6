"""What each exported size costs to serve, and the largest size that fits a budget.

Per size: parameters; bytes of the trunk (fp32, fp16) and of the item table (fp32, fp16, int8 row-wise
with one fp32 scale per row); query latency p50/p99 of ``recommend`` (encode, score every item, top-k
with the history excluded) for one user and for a batch of 64, and queries/s of the batch. The quality
is added by ``fmrl sizes`` from the run's test split: ``quality`` is NDCG@10 / Recall@10 **as served**
(``Recommender.recommend``, which masks every item of the history, so a user's next item that is
already in the history is never recommended: :data:`SERVED`), ``quality_run`` the run's own test
metrics (its ``metrics.json``, ranked as its ``eval.exclude_history`` says). Budgets and ``/info``
quote ``quality`` (:func:`served_quality`). ``fmrl sizes`` saves the table beside the export as
``sizes.json``; :func:`deploy.recommender.cost_table` reads it back (or measures latency and memory on
the spot). A table saved by an older ``fmrl sizes`` holds the run's metrics as ``quality`` without
saying how they were ranked: it counts as not measured as served.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deploy.scoring import ScoringModel

COSTS_FILE = "sizes.json"
"""The cost table, written beside export.json by ``fmrl sizes``."""

MB = 1024 * 1024

SERVED = "masked"
"""The ``history`` of a quality measured as the service answers: every item of the history masked."""

NOT_SERVED = "not measured as served"


def served_quality(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """The quality of a cost entry as served (history masked), or None if it was not measured so (no
    run to measure on, or a table saved by an older ``fmrl sizes``, whose ``quality`` was the run's
    metrics ranked otherwise)."""
    quality = entry.get("quality")
    if not quality or quality.get("history") != SERVED:
        return None
    return dict(quality)


def quality_report(entry: Mapping[str, Any]) -> dict[str, Any]:
    """What the service's ``/info`` quotes of a cost entry: ``served``, the test quality as served (or
    :data:`NOT_SERVED`), and ``run``, the run's own test metrics where the table has them (an older
    table's ``quality`` is those)."""
    served = served_quality(entry)
    run = entry.get("quality_run") or (None if served is not None else entry.get("quality"))
    return {"served": served if served is not None else NOT_SERVED, "run": run}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``, linear between the closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def random_histories(num_items: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """(batch, length) random histories of distinct-ish item ids 1..N (a fixed draw per seed)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, num_items + 1, (batch, length), generator=generator)


def query_latency_ms(recommend: Any, histories: torch.Tensor, repeats: int, k: int = 10) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``recommend(histories, k)`` (after one warm-up)."""
    recommend(histories, k)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        recommend(histories, k)
        times.append((time.perf_counter() - start) * 1000)
    return times


def size_costs(
    model: ScoringModel, recommend: Any, history_length: int = 20, repeats: int = 30
) -> dict[str, Any]:
    """The cost entry of one size (no quality: that needs the run's data)."""
    n, m = model.num_items, model.size
    parameters = sum(p.numel() for p in model.trunk.parameters())
    rows = n + 1
    entry: dict[str, Any] = {
        "size": m,
        "parameters": parameters,
        "model_bytes": {"fp32": 4 * parameters, "fp16": 2 * parameters},
        "items_bytes": {"fp32": 4 * rows * m, "fp16": 2 * rows * m, "int8": rows * m + 4 * rows},
        "history_length": history_length,
        "latency_ms": {},
    }
    for batch in (1, 64):
        histories = random_histories(n, batch, history_length, seed=batch)
        times = query_latency_ms(recommend, histories, repeats if batch == 1 else max(2, repeats // 3))
        entry["latency_ms"][str(batch)] = {"p50": percentile(times, 50), "p99": percentile(times, 99)}
    entry["queries_per_s"] = 64 / (entry["latency_ms"]["64"]["p50"] / 1000)
    return entry


def memory_mb(entry: Mapping[str, Any], quantised: bool = False) -> float:
    """MiB of the trunk (fp32) and the item table (int8 if ``quantised``, else fp32) of a cost entry."""
    return (entry["model_bytes"]["fp32"] + entry["items_bytes"]["int8" if quantised else "fp32"]) / MB


@dataclass
class Choice:
    size: int | None
    reason: str


def choose_size(
    table: Sequence[Mapping[str, Any]],
    max_latency_ms: float | None = None,
    max_memory_mb: float | None = None,
    min_ndcg: float | None = None,
    quantised: bool = False,
) -> Choice:
    """The largest size whose one-user p99 latency, memory (trunk + item table) and test NDCG@10 as
    served (:func:`served_quality`) fit the budget; if none does, ``size`` is None and ``reason`` says
    what each size misses."""
    misses = []
    for entry in sorted(table, key=lambda e: e["size"], reverse=True):
        problems = []
        latency = entry["latency_ms"]["1"]["p99"]
        if max_latency_ms is not None and latency > max_latency_ms:
            problems.append(f"p99 latency {latency:.2f} ms > {max_latency_ms:g} ms")
        memory = memory_mb(entry, quantised)
        if max_memory_mb is not None and memory > max_memory_mb:
            problems.append(f"memory {memory:.2f} MB > {max_memory_mb:g} MB")
        if min_ndcg is not None:
            served = served_quality(entry)
            if served is None and entry.get("quality"):
                problems.append(
                    f"test NDCG@10 {NOT_SERVED} (sizes.json from an older `fmrl sizes`: run it again)"
                )
            elif served is None:
                problems.append(
                    f"test NDCG@10 unknown ({NOT_SERVED}: `fmrl sizes` of the run folder measures it)"
                )
            elif served["NDCG@10"] < min_ndcg:
                problems.append(f"test NDCG@10 as served {served['NDCG@10']:.4f} < {min_ndcg:g}")
        if not problems:
            return Choice(entry["size"], f"size {entry['size']} is the largest that fits")
        misses.append(f"size {entry['size']}: " + ", ".join(problems))
    return Choice(None, "no size fits the budget: " + "; ".join(reversed(misses)))
