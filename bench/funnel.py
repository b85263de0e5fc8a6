"""Matryoshka funnel retrieval against exact search: recall of the exact top-10 and query latency.

    .venv/bin/python bench/funnel.py runs/demo/export --size 128 [--items 12000,1000000] [--write]

The trunk is the export's size-``--size`` model; the item table is the export's own when ``--items``
equals its catalog, otherwise a synthetic table of that many items drawn with the same per-channel
mean and spread as the export's table (so that its prefixes carry what the trained prefixes carry, on
average; synthetic tables are how the 12k and 1M rows are measured). Queries are encodings of random
20-item histories. Exact search scores every item at full size; the funnel scores every item on the
first ``prefix`` channels only, keeps ``candidates`` and re-ranks them at full size; the ANN funnel
takes the shortlist from a faiss HNSW index on the prefix instead. History items are excluded
everywhere. ``--write`` puts the table into docs/deploy.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from deploy.artifact import fmrl_manifest, read_size  # noqa: E402
from deploy.costs import percentile, random_histories  # noqa: E402
from deploy.recommender import Funnel, Recommender  # noqa: E402
from deploy.scoring import ScoringModel  # noqa: E402

BEGIN, END = "<!-- bench/funnel.py:begin -->", "<!-- bench/funnel.py:end -->"


def synthetic_table(real: torch.Tensor, rows: int, seed: int = 0) -> torch.Tensor:
    """(rows + 1, m) Gaussian items with the per-channel mean and std of ``real``'s items; row 0 kept."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = real[1:].mean(dim=0), real[1:].std(dim=0)
    table = torch.randn(rows + 1, real.shape[1], generator=generator) * std + mean
    table[0] = real[0]
    return table


def timed(recommend, histories: torch.Tensor, repeats: int) -> tuple[list[float], torch.Tensor]:
    _, ids = recommend(histories, 10)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        recommend(histories, 10)
        times.append((time.perf_counter() - start) * 1000)
    return times, ids


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact))
    return hits / exact.numel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--items", default="12000,1000000", help="catalog sizes (0: the export's own)")
    parser.add_argument("--prefixes", default="16,32")
    parser.add_argument("--candidates", default="200,1000")
    parser.add_argument("--queries", type=int, default=64, help="histories scored for recall, one batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--ann-max-items", type=int, default=20000, help="largest catalog given an HNSW index"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    manifest = fmrl_manifest(args.export)
    export = read_size(args.export, args.size, manifest)
    lines = [
        f"Trunk of size {args.size} from `{args.export}`; {args.queries} random 20-item histories; one torch "
        f"thread; {os.cpu_count()}-core {platform.machine()} VM (shared, load average "
        f"{os.getloadavg()[0]:.1f} at the start). Latency: p50 of a batch of {args.queries} and of 1 user "
        "(ms). Recall: of the exact top-10.",
        "",
        "| items | table | method | recall@10 | batch p50 ms | 1 user p50 ms |",
        "| ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for rows in [int(n) for n in args.items.split(",")]:
        own = rows in (0, manifest["num_items"])
        items = export.items if own else synthetic_table(export.items, rows)
        rows = items.shape[0] - 1
        model = ScoringModel.from_state(export.config, export.trunk_state, items)
        batch = random_histories(rows, args.queries, 20, seed=1)
        one = batch[:1]
        methods = [("exact", None)]
        for prefix in [int(p) for p in args.prefixes.split(",")]:
            for candidates in [int(c) for c in args.candidates.split(",")]:
                methods.append((f"funnel {prefix} -> {candidates}", Funnel(prefix, candidates)))
                if rows <= args.ann_max_items:
                    methods.append((f"HNSW {prefix} -> {candidates}", Funnel(prefix, candidates, ann=True)))
        exact_ids = None
        for name, funnel in methods:
            start = time.perf_counter()
            rec = Recommender(model, funnel=funnel)
            build = time.perf_counter() - start
            batch_times, ids = timed(rec.recommend, batch, args.repeats)
            one_times, _ = timed(rec.recommend, one, args.repeats * 4)
            if exact_ids is None:
                exact_ids = ids
            table = "export" if own else "synthetic"
            label = name + (f" (index built in {build:.0f} s)" if funnel is not None and funnel.ann else "")
            line = (
                f"| {rows:,} | {table} | {label} | {recall(ids, exact_ids):.3f} | "
                f"{percentile(batch_times, 50):.1f} | {percentile(one_times, 50):.2f} |"
            )
            print(line, flush=True)
            lines.append(line)
    text = "\n".join(lines)
    print(text)
    if args.write:
        path = os.path.join(REPO, "docs", "deploy.md")
        doc = open(path).read()
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        open(path, "w").write(doc[:start] + "\n" + text + "\n" + doc[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
