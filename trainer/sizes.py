"""``fmrl sizes``: what each exported size costs to serve and what it is worth, and the largest size
that fits a budget.

    fmrl sizes runs/demo                                   # a run folder (its export/) or an export
    fmrl sizes runs/demo --max-latency-ms 5 --max-memory-mb 2 [--min-ndcg 0.05]

Per size: test NDCG@10 / Recall@10 **as served** (measured here on the run's test split through
``Recommender.recommend``, which masks the whole history as the service does) beside the run's own
test metrics (its metrics.json, ranked as the run's ``eval.exclude_history`` says), parameters, bytes
of the trunk and the item table in fp32 / fp16 / int8 (row-wise, one scale per row), latency p50/p99 of
one query and of a batch of 64 (encode, score every item, top-k with the history excluded), queries/s;
and the int8 item table's effect on NDCG@10 as served (both tables scored on the same users).
The table is printed, saved beside the export as ``sizes.json`` (what ``load_recommender(size="auto")``
and ``fmrl serve --size auto`` read) and plotted into ``sizes.png`` (quality against latency and against
memory, one point per size).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from data_pipeline.storage import StorageOptions, atomic_write, is_remote, join
from deploy.artifact import (
    ExportError,
    exported_sizes,
    fmrl_manifest,
    read_catalog,
    read_size,
    recorded_max_len,
)
from deploy.costs import COSTS_FILE, MB, NOT_SERVED, SERVED, choose_size, memory_mb, served_quality
from deploy.recommender import Recommender, measure_export
from deploy.scoring import ScoringModel

PLOT_FILE = "sizes.png"


def locate(source: str) -> tuple[str, str | None]:
    """(export URL, run folder or None) of a run folder or an export folder."""
    source = source.rstrip("/")
    if not is_remote(source) and os.path.exists(os.path.join(source, "export", "export.json")):
        return os.path.join(source, "export"), source
    parent = os.path.dirname(source)
    if not is_remote(source) and os.path.exists(os.path.join(parent, "config.yaml")):
        return source, parent
    return source, None


RUN_HISTORY = {False: "ranked", True: "masked except the target"}
"""How a run's own evaluation treats the history (its ``eval.exclude_history``)."""


def run_quality(run_dir: str | None) -> dict[int, dict[str, Any]]:
    """{size: {"NDCG@10": ..., "Recall@10": ..., "history": ...}}: the test metrics of the run's
    metrics.json and how its evaluation ranked the history (empty without a run)."""
    if run_dir is None or not os.path.exists(os.path.join(run_dir, "metrics.json")):
        return {}
    from trainer.config import load_saved_config

    history = RUN_HISTORY[load_saved_config(os.path.join(run_dir, "config.yaml")).eval.exclude_history]
    with open(os.path.join(run_dir, "metrics.json")) as f:
        test = json.load(f).get("test", {})
    return {
        int(size): {
            **{name: metrics[name] for name in ("NDCG@10", "Recall@10") if name in metrics},
            "history": history,
        }
        for size, metrics in test.items()
    }


def served_ranks(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) 0-based rank of each target (B,) in the top-k ``ids`` (B, k) a recommender answered; k (a
    miss at every cut-off up to k) where the answer does not hold it."""
    hit = ids == targets[:, None]  # (B, k)
    return torch.where(hit.any(dim=1), hit.int().argmax(dim=1), ids.shape[1])


@torch.no_grad()
def measure_served(
    url: str, run_dir: str, sizes: Sequence[int], max_users: int, options: StorageOptions | None
) -> dict[int, dict[str, Any]]:
    """Per size, on the first ``max_users`` users of the run's test split (0: all): NDCG@10 and
    Recall@10 as the service answers them (``Recommender.recommend``: the history masked, so a target
    the user had already is a miss), with the fp32 item table (``quality``) and the int8 one
    (``int8``: NDCG@10 of both and the change)."""
    from data_pipeline.loader import SequenceDataset, eval_batches
    from trainer.config import load_saved_config
    from trainer.evaluation.metrics import RankingMetrics

    cfg = load_saved_config(os.path.join(run_dir, "config.yaml"))
    dataset = SequenceDataset.open(cfg.data.path, options)
    batches = list(eval_batches(dataset, "test", cfg.eval.batch_size, cfg.train.max_len, max_users=max_users))
    manifest = fmrl_manifest(url)
    catalog = read_catalog(url, manifest)
    max_len = recorded_max_len(url, manifest)
    measured = {}
    for size in sizes:
        export = read_size(url, size, manifest)
        quality = {}
        for key, quantised in (("fp32", False), ("int8", True)):
            model = ScoringModel.from_state(export.config, export.trunk_state, export.items, quantised)
            recommender = Recommender(model, catalog.item_ids, catalog.popularity, max_len=max_len)
            metrics = RankingMetrics([10])
            for batch in batches:
                _, ids = recommender.recommend(batch.tokens, k=10)
                metrics.update(size, served_ranks(ids, batch.targets))
            users = metrics.count(size)
            quality[key] = {name: value / users for name, value in metrics.sums()[size].items()}
        measured[size] = {
            "quality": {
                "NDCG@10": quality["fp32"]["NDCG@10"],
                "Recall@10": quality["fp32"]["Recall@10"],
                "history": SERVED,
                "users": users,
            },
            "int8": {
                "users": users,
                "NDCG@10 fp32": quality["fp32"]["NDCG@10"],
                "NDCG@10 int8": quality["int8"]["NDCG@10"],
                "change": quality["int8"]["NDCG@10"] - quality["fp32"]["NDCG@10"],
            },
        }
    return measured


def _figure(quality: dict[str, Any] | None, name: str, width: int) -> str:
    value = (quality or {}).get(name)
    return f"{value:>{width}.4f}" if value is not None else f"{'n/a':>{width}}"


def format_table(table: Sequence[dict[str, Any]]) -> str:
    """One line per size: quality as served and the run's own (where a run's is known), costs."""
    with_run = any(e.get("quality_run") for e in table)
    run_header = f" {'run NDCG@10':>11} {'Rec@10':>7}" if with_run else ""
    header = (
        f"{'size':>5} {'NDCG@10':>8} {'Rec@10':>7}{run_header} {'int8 dNDCG':>10} {'params':>9} {'model MB':>8} "
        f"{'items MB fp32/fp16/int8':>24} {'1 user p50/p99 ms':>18} {'64 users p50/p99 ms':>20} {'queries/s':>10}"
    )
    lines = [header]
    for e in table:
        served = served_quality(e)
        run = e.get("quality_run")
        run_columns = f" {_figure(run, 'NDCG@10', 11)} {_figure(run, 'Recall@10', 7)}" if with_run else ""
        effect = e.get("int8") or {}
        items = e["items_bytes"]
        one, batch = e["latency_ms"]["1"], e["latency_ms"]["64"]
        lines.append(
            f"{e['size']:>5} {_figure(served, 'NDCG@10', 8)} {_figure(served, 'Recall@10', 7)}{run_columns} "
            f"{format(effect['change'], '+.4f') if effect else 'n/a':>10} "
            f"{e['parameters']:>9,} {e['model_bytes']['fp32'] / MB:>8.3f} "
            f"{items['fp32'] / MB:>10.3f}/{items['fp16'] / MB:.3f}/{items['int8'] / MB:.3f} "
            f"{one['p50']:>9.2f}/{one['p99']:<8.2f} {batch['p50']:>10.2f}/{batch['p99']:<9.2f} "
            f"{e['queries_per_s']:>10.0f}"
        )
    return "\n".join(lines)


def save_plot(table: Sequence[dict[str, Any]], path: str) -> None:
    """Quality against one-user p50 latency and against memory, one labelled point per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    label = "test NDCG@10 as served"
    quality = [(served_quality(e) or {}).get("NDCG@10") for e in table]
    if any(q is None for q in quality):  # not measured as served: the run's own metrics, said so
        label = "test NDCG@10 (the run's, not as served)"
        quality = [(e.get("quality_run") or {}).get("NDCG@10", float("nan")) for e in table]
    xs = {
        "latency, 1 user p50 (ms)": [e["latency_ms"]["1"]["p50"] for e in table],
        "memory: trunk + item table fp32 (MB)": [memory_mb(e) for e in table],
    }
    for axis, (label, values) in zip(axes, xs.items()):
        axis.plot(values, quality, "o-")
        for e, x, y in zip(table, values, quality):
            axis.annotate(str(e["size"]), (x, y), textcoords="offset points", xytext=(4, 4))
        axis.set_xlabel(label)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    fig.suptitle("cost and quality of each nested size")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_sizes(args: Any) -> int:
    """The ``fmrl sizes`` command (argparse namespace of trainer/cli.py)."""
    import sys

    options = StorageOptions.from_env()
    url, run_dir = locate(args.source)
    try:
        manifest = fmrl_manifest(url)
        if args.threads:
            torch.set_num_threads(args.threads)
        table = measure_export(url, repeats=args.repeats)
        run = run_quality(run_dir)
        served = {}
        if run_dir is not None and args.max_users >= 0:
            served = measure_served(url, run_dir, exported_sizes(manifest), args.max_users, options)
        for entry in table:
            measured = served.get(entry["size"], {})
            entry["quality"] = measured.get("quality")
            entry["quality_run"] = run.get(entry["size"])
            entry["int8"] = measured.get("int8")
    except (ExportError, OSError) as error:
        print(f"fmrl sizes: {error}", file=sys.stderr)
        return 2
    print(format_table(table))
    if served:
        users = next(iter(served.values()))["quality"]["users"]
        print(
            f"NDCG@10, Rec@10: as served (the whole history masked, as `fmrl serve` does), on {users} test "
            "users of the run; int8 dNDCG: the same NDCG@10 with the int8 item table minus fp32"
        )
    elif run_dir is None:
        print(f"quality: {NOT_SERVED}: that needs the run folder (metrics.json, config.yaml): not found")
    else:
        print(f"quality: {NOT_SERVED} (--max-users -1)")
    if run:
        history = next(iter(run.values()))["history"]
        print(
            f"run NDCG@10, Rec@10: the run's test metrics (metrics.json, all test users, history {history})"
        )
    saved = {"fingerprint": manifest.get("fingerprint"), "sizes": table}
    out = args.out or url
    with atomic_write(join(out, COSTS_FILE), options) as f:
        f.write(json.dumps(saved, indent=1).encode())
    if not is_remote(out):
        save_plot(table, os.path.join(out, PLOT_FILE))
        print(f"saved: {join(out, COSTS_FILE)}, {join(out, PLOT_FILE)}")
    if args.max_latency_ms is not None or args.max_memory_mb is not None or args.min_ndcg is not None:
        choice = choose_size(table, args.max_latency_ms, args.max_memory_mb, args.min_ndcg, args.quantised)
        print(choice.reason if choice.size is not None else f"fmrl sizes: {choice.reason}")
        return 0 if choice.size is not None else 1
    return 0
