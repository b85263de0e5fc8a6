"""``fmrl sizes``: what each exported size costs to serve and what it is worth, and the largest size
that fits a budget.

    fmrl sizes runs/demo                                   # a run folder (its export/) or an export
    fmrl sizes runs/demo --max-latency-ms 5 --max-memory-mb 2 [--min-ndcg 0.05]

Per size: the run's test NDCG@10 / Recall@10 (its metrics.json), parameters, bytes of the trunk and the
item table in fp32 / fp16 / int8 (row-wise, one scale per row), latency p50/p99 of one query and of a
batch of 64 (encode, score every item, top-k with the history excluded), queries/s; and the int8 item
table's effect on NDCG@10, measured on the run's test split (both tables scored on the same users).
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
from deploy.artifact import ExportError, exported_sizes, fmrl_manifest, read_size
from deploy.costs import COSTS_FILE, MB, choose_size, memory_mb
from deploy.recommender import measure_export
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


def run_quality(run_dir: str | None) -> dict[int, dict[str, float]]:
    """{size: {"NDCG@10": ..., "Recall@10": ...}} from the run's metrics.json (empty without one)."""
    if run_dir is None or not os.path.exists(os.path.join(run_dir, "metrics.json")):
        return {}
    with open(os.path.join(run_dir, "metrics.json")) as f:
        test = json.load(f).get("test", {})
    return {
        int(size): {name: metrics[name] for name in ("NDCG@10", "Recall@10") if name in metrics}
        for size, metrics in test.items()
    }


@torch.no_grad()
def int8_effect(
    url: str, run_dir: str, sizes: Sequence[int], max_users: int, options: StorageOptions | None
) -> dict[int, dict[str, float]]:
    """NDCG@10 of each size with its fp32 and its int8 item table, on the first ``max_users`` users of
    the run's test split (full ranking, the run's own history-exclusion setting)."""
    from data_pipeline.loader import SequenceDataset, eval_batches
    from trainer.config import load_saved_config
    from trainer.evaluation.metrics import RankingMetrics, target_ranks

    cfg = load_saved_config(os.path.join(run_dir, "config.yaml"))
    dataset = SequenceDataset.open(cfg.data.path, options)
    batches = list(eval_batches(dataset, "test", cfg.eval.batch_size, cfg.train.max_len, max_users=max_users))
    manifest = fmrl_manifest(url)
    effect = {}
    for size in sizes:
        export = read_size(url, size, manifest)
        ndcg = {}
        for key, quantised in (("fp32", False), ("int8", True)):
            model = ScoringModel.from_state(export.config, export.trunk_state, export.items, quantised)
            metrics = RankingMetrics([10])
            for batch in batches:
                history = batch.tokens if cfg.eval.exclude_history else None
                metrics.update(size, target_ranks(model(batch.tokens), batch.targets, history))
            ndcg[key] = metrics.sums()[size]["NDCG@10"] / metrics.count(size)
        effect[size] = {
            "users": metrics.count(size),
            "NDCG@10 fp32": ndcg["fp32"],
            "NDCG@10 int8": ndcg["int8"],
            "change": ndcg["int8"] - ndcg["fp32"],
        }
    return effect


def format_table(table: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'size':>5} {'NDCG@10':>8} {'Rec@10':>7} {'int8 dNDCG':>10} {'params':>9} {'model MB':>8} "
        f"{'items MB fp32/fp16/int8':>24} {'1 user p50/p99 ms':>18} {'64 users p50/p99 ms':>20} {'queries/s':>10}"
    )
    lines = [header]
    for e in table:
        quality = e.get("quality") or {}
        effect = e.get("int8") or {}
        items = e["items_bytes"]
        one, batch = e["latency_ms"]["1"], e["latency_ms"]["64"]
        lines.append(
            f"{e['size']:>5} {quality.get('NDCG@10', float('nan')):>8.4f} "
            f"{quality.get('Recall@10', float('nan')):>7.4f} "
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
    quality = [(e.get("quality") or {}).get("NDCG@10") for e in table]
    if any(q is None for q in quality):  # no run metrics: the recomputed fp32 NDCG@10 if there is one
        quality = [(e.get("int8") or {}).get("NDCG@10 fp32", float("nan")) for e in table]
    xs = {
        "latency, 1 user p50 (ms)": [e["latency_ms"]["1"]["p50"] for e in table],
        "memory: trunk + item table fp32 (MB)": [memory_mb(e) for e in table],
    }
    for axis, (label, values) in zip(axes, xs.items()):
        axis.plot(values, quality, "o-")
        for e, x, y in zip(table, values, quality):
            axis.annotate(str(e["size"]), (x, y), textcoords="offset points", xytext=(4, 4))
        axis.set_xlabel(label)
        axis.set_ylabel("test NDCG@10")
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
        quality = run_quality(run_dir)
        effect = {}
        if run_dir is not None and args.max_users >= 0:
            effect = int8_effect(url, run_dir, exported_sizes(manifest), args.max_users, options)
        for entry in table:
            entry["quality"] = quality.get(entry["size"])
            entry["int8"] = effect.get(entry["size"])
    except (ExportError, OSError) as error:
        print(f"fmrl sizes: {error}", file=sys.stderr)
        return 2
    print(format_table(table))
    if effect:
        users = next(iter(effect.values()))["users"]
        print(f"int8 dNDCG: NDCG@10 with the int8 item table minus fp32, on {users} test users of the run")
    elif run_dir is None:
        print("quality and the int8 effect need the run folder (metrics.json, config.yaml): not found")
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
