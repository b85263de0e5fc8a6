"""The 1M- and 10M-item training runs on 2 CPU ranks (and the 10M-item run on 1 rank, for its memory);
writes their table into docs/scale.md.

    .venv/bin/python bench/scale_runs.py                    # prepares the catalogs, runs what is missing
    .venv/bin/python bench/scale_runs.py --runs 1m          # only the 1M-item run
    .venv/bin/python bench/scale_runs.py --report-only      # the table from the runs done so far

Each run is ``torchrun --nproc_per_node=R -m trainer.cli train --config configs/scale-*.yaml`` (the real
trainer: every table column-wise sharded from birth, sampled softmax, sharded evaluation, checkpoints)
in runs/scale/<name>; a run with ``metrics.json`` is done and is not run again. The figures come from
the run's own logs (train.log, train-rank<N>.log), its metrics.json and its checkpoint folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime

from trunk import machine, write_section  # bench/, the script's folder, is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)
RUNS = os.path.join(REPO, "runs", "scale")
BEGIN, END = "<!-- bench/scale_runs.py:begin -->", "<!-- bench/scale_runs.py:end -->"


@dataclass(frozen=True)
class ScaleRun:
    name: str
    config: str
    ranks: int
    catalog: tuple[str, ...]
    """``fmrl data prepare-synthetic-scale`` arguments of its catalog."""
    overrides: tuple[str, ...] = ()


CATALOG_1M = ("runs/data/scale-1m", "--num-items", "1000000", "--num-users", "200000", "--text-dim", "32")
CATALOG_10M = ("runs/data/scale-10m", "--num-items", "10000000", "--num-users", "500000")
CATALOG_10M += ("--num-categories", "1000", "--num-brands", "50000", "--text-dim", "32")
SCALE_RUNS = {
    "1m": ScaleRun("scale-1m", "configs/scale-1m.yaml", 2, CATALOG_1M, ("train.epochs=2",)),
    "10m": ScaleRun("scale-10m", "configs/scale-10m.yaml", 2, CATALOG_10M),
    # memory of one rank holding every table, against the two ranks above: a short run, a small test
    "10m-1rank": ScaleRun(
        "scale-10m-1rank",
        "configs/scale-10m.yaml",
        1,
        CATALOG_10M,
        ("train.max_steps=50", "eval.max_users=500"),
    ),
}


def prepare(run: ScaleRun) -> None:
    if not os.path.exists(os.path.join(REPO, run.catalog[0], "dataset.json")):
        command = [os.path.join(BIN, "fmrl"), "data", "prepare-synthetic-scale", *run.catalog]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=REPO)


def train(run: ScaleRun) -> None:
    folder = os.path.join(RUNS, run.name)
    if os.path.exists(os.path.join(folder, "metrics.json")):
        return
    command = [os.path.join(BIN, "torchrun"), "--standalone", f"--nproc_per_node={run.ranks}"]
    command += ["-m", "trainer.cli", "train", "--config", run.config, "train.num_threads=1"]
    command += [f"run.out_dir={RUNS}", f"run.name={run.name}", "run.resume=auto", "run.progress_bar=false"]
    command += list(run.overrides)
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


# ------------------------------------------------------------------------------------------------ results

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ ")


def _lines(folder: str) -> list[str]:
    lines: list[str] = []
    for name in sorted(os.listdir(folder)):
        if re.fullmatch(r"train(-rank\d+)?\.log", name):
            lines += open(os.path.join(folder, name), errors="replace").read().splitlines()
    return lines


def _floats(lines: list[str], pattern: str) -> list[float]:
    return [float(m.group(1)) for line in lines if (m := re.search(pattern, line))]


def _wall_seconds(lines: list[str]) -> float:
    stamps = [
        datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S") for line in lines if (m := _STAMP.match(line))
    ]
    return (max(stamps) - min(stamps)).total_seconds() if stamps else float("nan")


def _bytes_in(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def facts(run: ScaleRun) -> dict | None:
    folder = os.path.join(RUNS, run.name)
    if not os.path.exists(os.path.join(folder, "metrics.json")):
        return None
    metrics = json.load(open(os.path.join(folder, "metrics.json")))
    lines = _lines(folder)
    checkpoints = os.path.join(folder, "checkpoints")
    latest = sorted(os.listdir(checkpoints))[-1] if os.path.isdir(checkpoints) else None
    largest = max(metrics["test"], key=int)
    return {
        "peak_rss_mib": _floats(lines, r"peak RSS (\d+) MiB"),
        "steps_per_s": _floats(lines, r"\(([\d.]+) steps/s\)")[:1],
        "valid_seconds": _floats(lines, r"evaluated in ([\d.]+) s\)"),
        "test_seconds": _floats(lines, r"test evaluated in ([\d.]+) s"),
        "weights_seconds": _floats(lines, r"model\.safetensors written in ([\d.]+) s"),
        "save_seconds": _floats(lines, r"saved in ([\d.]+) s"),
        "feature_mib": _floats(lines, r"read ([\d.]+) MiB of the text feature table"),
        "checkpoint_gib": _bytes_in(os.path.join(checkpoints, latest)) / 2**30 if latest else float("nan"),
        "weights_gib": os.path.getsize(os.path.join(folder, "model.safetensors")) / 2**30,
        "wall_min": _wall_seconds(lines) / 60,
        "steps": metrics["steps"],
        "epochs": metrics["epochs"],
        "parameters_m": metrics.get("trainable_parameters", float("nan")) / 1e6,
        "size": largest,
        "ndcg": metrics["test"][largest]["NDCG@10"],
        "recall": metrics["test"][largest]["Recall@10"],
        "popular": metrics["most_popular"]["NDCG@10"],
    }


def _range(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "?"
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)}-{fmt.format(high)}"


def render(command: str) -> str:
    lines = [
        BEGIN,
        f"Command: `{command}`  ",
        f"Machine: {machine()}, one thread per rank  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
        "| run | ranks | trainable params | steps (epochs) | steps/s | peak RSS per rank | validation "
        "| test | checkpoint: size, save | model.safetensors: size, write | wall | test NDCG@10 (size) "
        "| most-popular | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, run in SCALE_RUNS.items():
        f = facts(run)
        if f is None:
            lines.append(f"| {key} | {run.ranks} | (not run yet) |" + " |" * 11)
            continue
        lines.append(
            f"| {key} | {run.ranks} | {f['parameters_m']:.1f}M | {f['steps']} ({f['epochs']}) "
            f"| {_range(f['steps_per_s'], '{:.2f}')} | {_range(f['peak_rss_mib'])} MiB "
            f"| {_range(f['valid_seconds'])} s | {_range(f['test_seconds'])} s "
            f"| {f['checkpoint_gib']:.2f} GiB, {_range(f['save_seconds'], '{:.1f}')} s "
            f"| {f['weights_gib']:.2f} GiB, {_range(f['weights_seconds'], '{:.1f}')} s "
            f"| {f['wall_min']:.0f} min | {f['ndcg']:.4f} ({f['size']}) | {f['popular']:.4f} "
            f"| {f'{ratio:.0f}x' if (ratio := f['ndcg'] / f['popular'] if f['popular'] else 0) else 'no hit'} |"
        )
    lines += [
        "",
        "Validation and test: sharded full ranking over every item (each rank scores all ranks' queries against "
        "its half of the catalog) for the users of eval.max_users. Peak RSS: each rank's maximum resident "
        "memory over the whole run (evaluation included), as the trainer logs it. Checkpoint: the last one, "
        "every rank's shards and the optimizer state. Ratio: test NDCG@10 over most-popular's; \"no hit\": "
        "most-popular placed no test target in its top 20.",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default=",".join(SCALE_RUNS), help=f"comma-separated of {list(SCALE_RUNS)}")
    parser.add_argument("--report-only", action="store_true", help="write the table from finished runs")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "scale.md"))
    args = parser.parse_args()
    names = args.runs.split(",")
    unknown = sorted(set(names) - set(SCALE_RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {list(SCALE_RUNS)}")
    if not args.report_only:
        for name in names:
            prepare(SCALE_RUNS[name])
            train(SCALE_RUNS[name])
    section = render(("python bench/scale_runs.py " + " ".join(sys.argv[1:])).strip())
    print(section)
    write_section(args.output, section, BEGIN, END)


if __name__ == "__main__":
    main()
