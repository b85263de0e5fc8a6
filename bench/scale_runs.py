"""The 1M- and 10M-item training runs on 2 CPU ranks (and the 10M-item run on 1 rank, for its memory);
writes their table into docs/scale.md.

    .venv/bin/python bench/scale_runs.py                    # prepares the catalogs, runs what is missing
    .venv/bin/python bench/scale_runs.py --runs 1m          # only the 1M-item run
    .venv/bin/python bench/scale_runs.py --report-only      # the table from the runs done so far

Each run is ``torchrun --nproc_per_node=R -m trainer.cli train --config configs/scale-*.yaml`` (the real
trainer: every table column-wise sharded from birth, sampled softmax, sharded evaluation, checkpoints)
in runs/scale/<name>; a run with ``metrics.json`` is done and is not run again. The figures come from
the run's own logs (train.log, train-rank<N>.log), its metrics.json and its checkpoint folder, and are
kept as the run's record in bench/results/scale/<name>.json: runs/ is not in the repository, the records
are, and the table is written from the records alone, so it survives the machine that ran the runs. The
bench refuses to rewrite a table that shows runs without a record (``--drop-missing-runs`` overrides).
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

# bench/, the script's folder, is on sys.path
from trunk import machine, read_section, write_json, write_section

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)
RUNS = os.path.join(REPO, "runs", "scale")
RESULTS = os.path.join(HERE, "results", "scale")
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
    """What the table shows of a finished run, read from its folder in runs/scale; None if not finished."""
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


def record_path(run: ScaleRun) -> str:
    return os.path.join(RESULTS, f"{run.name}.json")


def keep_record(run: ScaleRun) -> None:
    """Keep the facts of the finished run in its record (bench/results/scale/), with its command's settings,
    the machine that ran it (run folders do not travel) and the day it finished; nothing if the run has not
    finished here."""
    found = facts(run)
    if found is None:
        return
    finished = os.path.getmtime(os.path.join(RUNS, run.name, "metrics.json"))
    record = {"run": run.name, "config": run.config, "ranks": run.ranks, "overrides": list(run.overrides)}
    record.update(machine=machine(), date=time.strftime("%Y-%m-%d", time.localtime(finished)), facts=found)
    os.makedirs(RESULTS, exist_ok=True)
    write_json(record_path(run), record)


def load_records() -> dict[str, dict]:
    """Records of the runs, by their key in SCALE_RUNS."""
    return {
        key: json.load(open(record_path(run)))
        for key, run in SCALE_RUNS.items()
        if os.path.exists(record_path(run))
    }


def reported_runs(path: str) -> set[str]:
    """Keys of the runs the table in ``path`` shows with figures (not "not run yet")."""
    rows = re.findall(r"^\| ([\w-]+) \| \d+ \| (.*)$", read_section(path, BEGIN, END), re.MULTILINE)
    return {key for key, rest in rows if key in SCALE_RUNS and not rest.startswith("(not run yet)")}


def _range(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "?"
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)}-{fmt.format(high)}"


def _range_text(values: list[str]) -> str:
    return values[0] if len(values) == 1 else f"{values[0]} to {values[-1]}"


def render(records: dict[str, dict], command: str) -> str:
    """The table of the recorded runs; the machine and date are the records' (this machine's if none)."""
    machines = sorted({r["machine"] for r in records.values()}) or [machine()]
    dates = sorted({r["date"] for r in records.values()}) or [time.strftime("%Y-%m-%d")]
    lines = [
        BEGIN,
        f"Command: `{command}`  ",
        f"Machine: {'; '.join(machines)}, one thread per rank  ",
        f"Date: {_range_text(dates)}",
        "",
        "| run | ranks | trainable params | steps (epochs) | steps/s | peak RSS per rank | validation "
        "| test | checkpoint: size, save | model.safetensors: size, write | wall | test NDCG@10 (size) "
        "| most-popular | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, run in SCALE_RUNS.items():
        f = records[key]["facts"] if key in records else None
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
    parser.add_argument("--report-only", action="store_true", help="write the table from the recorded runs")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "scale.md"))
    parser.add_argument(
        "--drop-missing-runs",
        action="store_true",
        help="write the table even if it then shows fewer runs than before (runs without a record)",
    )
    args = parser.parse_args()
    names = args.runs.split(",")
    unknown = sorted(set(names) - set(SCALE_RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {list(SCALE_RUNS)}")
    if not args.report_only:
        for name in names:
            if not os.path.exists(record_path(SCALE_RUNS[name])):
                prepare(SCALE_RUNS[name])
                train(SCALE_RUNS[name])
    for run in SCALE_RUNS.values():  # every run finished here (also by an earlier bench) gets its record
        keep_record(run)
    records = load_records()
    section = render(records, ("python bench/scale_runs.py " + " ".join(sys.argv[1:])).strip())
    print(section)
    missing = sorted(reported_runs(args.output) - set(records))
    if missing and not args.drop_missing_runs:
        sys.exit(
            f"not writing {os.path.relpath(args.output, REPO)}: its table shows {len(missing)} run(s) that have "
            f"no record in {os.path.relpath(RESULTS, REPO)}: {', '.join(missing)}. Run them again "
            "(`python bench/scale_runs.py --runs NAME`; a run with a record is not run again) or pass "
            "--drop-missing-runs to write the table without them."
        )
    write_section(args.output, section, BEGIN, END)


if __name__ == "__main__":
    main()
