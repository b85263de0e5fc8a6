"""Sampled softmax against the full softmax on real data (Amazon Beauty); writes a table into docs/scale.md.

    .venv/bin/python bench/sampled_softmax.py                  # the full and four sampled runs, one thread each
    .venv/bin/python bench/sampled_softmax.py --report-only    # the table from the runs done so far

Every run is configs/amazon-beauty.yaml (the config bench/quality.py trains) with its loss named on the
command line: ``train.loss=full`` for the reference, ``train.loss=sampled`` and the sampler settings for
the others, every other setting the same. Runs live beside the quality runs (runs/quality/), continue
from their checkpoints when interrupted, and keep their records beside the quality records
(bench/results/quality/, see bench/quality.py); a run with a record is not run again, and the table is not
rewritten without a row it shows already unless ``--drop-missing-runs`` is given.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from quality import STUDIES as QUALITY_STUDIES  # bench/, the script's folder, is on sys.path
from quality import Outcome, Study, finished_seeds, keep_record, load_outcomes, prepare, run_dir, train
from trunk import machine, read_section, write_section

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
_BEAUTY = next(s for s in QUALITY_STUDIES if s.name == "beauty")
FULL = Study(
    "beauty-full", _BEAUTY.config, _BEAUTY.data, ("train.loss=full",), seeds=(42,), label="full softmax"
)
SAMPLED = [
    Study(
        f"beauty-sampled-{sampler}-{negatives}",
        FULL.config,
        FULL.data,
        ("train.loss=sampled", f"train.negative_sampling={sampler}", f"train.num_negatives={negatives}"),
        seeds=(42,),
        label=f"sampled, {sampler}, {negatives} negatives",
    )
    for negatives in (1024, 256)
    for sampler in ("uniform", "popularity")
]
DEFAULT = "beauty-sampled-uniform-1024"
"""The sampled loss at its default settings (train.negative_sampling, train.num_negatives)."""
BEGIN, END = "<!-- bench/sampled_softmax.py:begin -->", "<!-- bench/sampled_softmax.py:end -->"
DEFAULT_MARK = " (the trainer's default)"


def reported_studies(path: str) -> set[str]:
    """Studies whose row in the table of ``path`` shows a measured NDCG@10."""
    by_label = {("full softmax" if s is FULL else s.label): s.name for s in [FULL, *SAMPLED]}
    found = set()
    for line in read_section(path, BEGIN, END).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 1 and re.fullmatch(r"\d+\.\d+", cells[1]):
            name = by_label.get(cells[0].removesuffix(DEFAULT_MARK))
            if name is not None:
                found.add(name)
    return found


def render(found: dict[str, Outcome], command: str) -> str:
    full = found.get(FULL.name)
    lines = [
        BEGIN,
        f"Command: `{command}`  ",
        f"Machine: {machine()}, one thread per run  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
        "| loss | NDCG@10 | Recall@10 | NDCG@10 / full | epochs (best) | training time | time per epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for study in [FULL, *SAMPLED]:
        outcome = found.get(study.name)
        if outcome is None:
            started = any(
                os.path.isdir(os.path.join(run_dir(study, seed), "checkpoints")) for seed in study.seeds
            )
            state = "(unfinished: the bench continues it from its checkpoint)" if started else "(not run yet)"
            lines.append(f"| {study.label or 'full softmax'} | {state} | | | | | |")
            continue
        largest = outcome.sizes()[-1]
        ndcg = statistics.mean(outcome.values(largest, "NDCG@10"))
        recall = statistics.mean(outcome.values(largest, "Recall@10"))
        ratio = (
            "" if full is None else f"{ndcg / statistics.mean(full.values(largest, 'NDCG@10')) * 100:.0f} %"
        )
        run = next(iter(outcome.runs.values()))
        seconds = run.get("train_seconds", float("nan"))
        label = "full softmax" if study is FULL else study.label
        if study.name == DEFAULT:
            label += DEFAULT_MARK
        lines.append(
            f"| {label} | {ndcg:.4f} | {recall:.4f} | {ratio} | {run['epochs']} ({run['best_epoch']}) "
            f"| {seconds / 60:.0f} min | {seconds / run['epochs']:.0f} s |"
        )
    lines += [
        "",
        "Test metrics at the largest size (128), full ranking over all 12,101 items, seed 42. Training time "
        "excludes the per-epoch validation.",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--studies", default=",".join(s.name for s in [FULL, *SAMPLED]), help="comma-separated"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    parser.add_argument("--report-only", action="store_true", help="write the table from finished runs")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "scale.md"))
    parser.add_argument(
        "--drop-missing-runs",
        action="store_true",
        help="write the table even if rows it shows have no record (they become 'not run yet')",
    )
    args = parser.parse_args()
    names = args.studies.split(",")
    known = [s.name for s in [FULL, *SAMPLED]]
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown studies {unknown}; known: {known}")
    if not args.report_only:
        prepare(FULL.data)
        jobs = [(s, seed) for s in [FULL, *SAMPLED] if s.name in names for seed in s.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(train, s, seed) for s, seed in jobs]:
                future.result()
    for study in [FULL, *SAMPLED]:  # finished run folders here get their records
        for seed in finished_seeds(study):
            keep_record(study, seed)
    command = ("python bench/sampled_softmax.py " + " ".join(sys.argv[1:])).strip()
    found = load_outcomes([FULL, *SAMPLED])
    section = render(found, command)
    print(section)
    missing = sorted(reported_studies(args.output) - set(found))
    if missing and not args.drop_missing_runs:
        sys.exit(
            f"not writing {os.path.relpath(args.output, REPO)}: its table shows {', '.join(missing)}, which "
            "have no record in bench/results/quality/. Train them again or pass --drop-missing-runs."
        )
    write_section(args.output, section, BEGIN, END)


if __name__ == "__main__":
    main()
