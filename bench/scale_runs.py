"""The scale runs on CPU ranks: 1M, 10M and the proof run past 2^24 items (20M) on 2 ranks, and the
10M-item run on 1 rank for its memory; writes their table into docs/scale.md.

    .venv/bin/python bench/scale_runs.py                    # prepares the catalogs, runs what is missing
    .venv/bin/python bench/scale_runs.py --runs 20m         # only the 20M-item proof run
    .venv/bin/python bench/scale_runs.py --report-only      # the table from the runs done so far

The proof run (20m) is a user's whole path: the job stops at ``stop_after`` steps with a checkpoint
(``run.stop_after_steps``) and a second job resumes it to the end (evaluation, test, model.safetensors);
then ``fmrl export`` writes the ``export_sizes`` and the Matryoshka funnel of deploy/ recommends from the
export for test users (its top 10 against exact search, and both against the held-out items). Every run
is also planned (``fmrl plan`` with the run's config and overrides) and its plan kept beside what each
rank measured.

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
    stop_after: int = 0
    """If set, the first job stops at this step (a checkpoint) and a second job resumes it."""
    export_sizes: tuple[int, ...] = ()
    """If set, exported after training and recommended from with the funnel (the smallest size as the
    prefix, the largest re-ranks)."""


CATALOG_1M = ("runs/data/scale-1m", "--num-items", "1000000", "--num-users", "200000", "--text-dim", "32")
CATALOG_10M = ("runs/data/scale-10m", "--num-items", "10000000", "--num-users", "500000")
CATALOG_10M += ("--num-categories", "1000", "--num-brands", "50000", "--text-dim", "32")
CATALOG_20M = ("runs/data/scale-20m", "--num-items", "20000000", "--num-users", "400000")
CATALOG_20M += ("--num-categories", "1000", "--num-brands", "100000", "--text-dim", "16")
SCALE_RUNS = {
    "1m": ScaleRun("scale-1m", "configs/scale-1m.yaml", 2, CATALOG_1M, ("train.max_steps=300",)),
    "10m": ScaleRun("scale-10m", "configs/scale-10m.yaml", 2, CATALOG_10M),
    # memory of one rank holding every table, against the two ranks above: a short run, a small test
    "10m-1rank": ScaleRun(
        "scale-10m-1rank",
        "configs/scale-10m.yaml",
        1,
        CATALOG_10M,
        ("train.max_steps=50", "eval.max_users=500"),
    ),
    "20m": ScaleRun(
        "scale-20m", "configs/scale-20m.yaml", 2, CATALOG_20M, stop_after=150, export_sizes=(8, 32)
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
    jobs = [command]
    if run.stop_after and not os.path.isdir(os.path.join(folder, "checkpoints")):
        jobs.insert(0, command + [f"run.stop_after_steps={run.stop_after}"])
    for job in jobs:  # the second job resumes from the first one's checkpoint (run.resume=auto)
        print("$", " ".join(job), flush=True)
        subprocess.run(job, check=True, cwd=REPO)


def plan(run: ScaleRun) -> None:
    """``fmrl plan`` of the run as it was launched (its config and overrides, its ranks), kept in the run
    folder's sibling <name>.plan.txt (the run folder is the trainer's own until the run ends)."""
    path = os.path.join(RUNS, f"{run.name}.plan.txt")
    os.makedirs(RUNS, exist_ok=True)
    if os.path.exists(path):
        return
    command = [os.path.join(BIN, "fmrl"), "plan", "--config", run.config, "--world-size", str(run.ranks)]
    command += ["--device", "cpu", *run.overrides]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True)
    with open(path + ".tmp", "w") as f:
        f.write(done.stdout)
    os.replace(path + ".tmp", path)


_MEASURE = """
import json, resource, sys, time
started = time.perf_counter()
from trainer.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - started,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def export(run: ScaleRun) -> None:
    """``fmrl export`` of the finished run (its wall time and peak memory in export.json beside it)."""
    folder = os.path.join(RUNS, run.name)
    path = os.path.join(folder, "bench-export.json")
    if not run.export_sizes or os.path.exists(path):
        return
    sizes = ",".join(map(str, run.export_sizes))
    command = [sys.executable, "-c", _MEASURE, "export", folder, "--sizes", sizes]
    print("$ fmrl export", folder, "--sizes", sizes, flush=True)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"fmrl export failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    measured["gib"] = _bytes_in(os.path.join(folder, "export")) / 2**30
    write_json(path, measured)


def recommend(run: ScaleRun, users: int = 200) -> None:
    """The funnel of deploy/ recommends from the export for ``users`` test users (in a process of its
    own: its memory is the service's); kept in bench-deploy.json beside the run."""
    folder = os.path.join(RUNS, run.name)
    path = os.path.join(folder, "bench-deploy.json")
    if not run.export_sizes or os.path.exists(path):
        return
    command = [sys.executable, os.path.abspath(__file__), "--deploy-check", run.name, "--users", str(users)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def deploy_check(key: str, users: int) -> None:
    """Load the export's largest size with a funnel (the smallest size shortlists 200 items) and without;
    recommend the top 10 for the first ``users`` test users of the data set (history = all but the last
    item, which is the target); keep recall against the targets, the funnel's overlap with exact search
    and the time per user."""
    import resource

    import torch

    sys.path.insert(0, REPO)
    from data_pipeline.loader import SequenceDataset, eval_batches
    from deploy.recommender import Funnel, Recommender, load_recommender
    from trainer.config import load_config

    run = next(r for r in SCALE_RUNS.values() if r.name == key)
    folder = os.path.join(RUNS, run.name)
    cfg = load_config(os.path.join(folder, "config.yaml"))
    started = time.perf_counter()
    exact = load_recommender(os.path.join(folder, "export"), size=max(run.export_sizes))
    loaded = time.perf_counter() - started
    funnel = Funnel(prefix=min(run.export_sizes), candidates=200)
    funneled = Recommender(exact.model, exact.item_ids, exact.popularity, funnel, exact.max_len)
    dataset = SequenceDataset.open(cfg.data.path)
    batch = next(eval_batches(dataset, "test", users, cfg.train.max_len, max_users=users))
    found = {}
    for name, recommender in (("exact", exact), ("funnel", funneled)):
        recommender.recommend(batch.tokens[:2], 10)  # warm-up
        start = time.perf_counter()
        found[name] = recommender.recommend(batch.tokens, 10)[1]
        found[name + "_ms_per_user"] = (time.perf_counter() - start) * 1000 / len(batch.targets)
    hits = {
        n: float((found[n] == batch.targets[:, None]).any(dim=1).float().mean()) for n in ("exact", "funnel")
    }
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found["funnel"], found["exact"]))
    write_json(
        os.path.join(folder, "bench-deploy.json"),
        {
            "users": len(batch.targets),
            "size": max(run.export_sizes),
            "funnel": {"prefix": funnel.prefix, "candidates": funnel.candidates},
            "num_items": exact.num_items,
            "load_seconds": loaded,
            "recall10_exact": hits["exact"],
            "recall10_funnel": hits["funnel"],
            "funnel_overlap_with_exact_top10": overlap / found["exact"].numel(),
            "ms_per_user_exact": found["exact_ms_per_user"],
            "ms_per_user_funnel": found["funnel_ms_per_user"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads(),
        },
    )


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
        "startup_seconds": _floats(lines, r"rank \d+ start-up ([\d.]+) s"),
        "resumed_at": [int(x) for x in _floats(lines, r"resumed from .* at step (\d+)")],
        **_extras(folder),
    }


def _extras(folder: str) -> dict:
    """The plan of the run and, for a proof run, its export and deploy check (files the bench wrote)."""
    found: dict = {}
    plan_path = f"{folder}.plan.txt"
    if os.path.exists(plan_path):
        text = open(plan_path).read()
        if m := re.search(r"Busiest rank: ([\d.]+) GiB of", text):
            found["plan_busiest_rank_gib"] = float(m.group(1))
        found["plan"] = text
    for key, name in (("export", "bench-export.json"), ("deploy", "bench-deploy.json")):
        if os.path.exists(os.path.join(folder, name)):
            found[key] = json.load(open(os.path.join(folder, name)))
    return found


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
    lines += ["", *proof_lines(records)]
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


def proof_lines(records: dict[str, dict]) -> list[str]:
    """The second table: each recorded run's plan against its ranks' measured peaks, its start-up, its
    resume, and for the proof run its export and the funnel's recommendations from it."""
    lines = [
        "| run | plan, busiest rank | measured peak per rank | plan error | start-up per rank | resumed at step "
        "| export: sizes, size on disk, time, peak RSS | funnel from the export |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, run in SCALE_RUNS.items():
        if key not in records:
            continue
        f = records[key]["facts"]
        plan_gib, peaks = f.get("plan_busiest_rank_gib"), f["peak_rss_mib"]
        errors = [(plan_gib * 1024 - mib) / mib for mib in peaks] if plan_gib and peaks else []
        error = " to ".join(f"{e:+.1%}" for e in sorted({min(errors), max(errors)})) if errors else "-"
        export, deploy = f.get("export"), f.get("deploy")
        export_text = (
            f"{','.join(map(str, run.export_sizes))}: {export['gib']:.2f} GiB, {export['seconds']:.0f} s, "
            f"{export['peak_rss_mib']:,.0f} MiB"
            if export
            else "-"
        )
        deploy_text = (
            f"{deploy['users']} test users, size {deploy['size']} over {deploy['num_items']:,} items: "
            f"Recall@10 {deploy['recall10_funnel']:.3f} through the funnel (prefix {deploy['funnel']['prefix']}, "
            f"{deploy['funnel']['candidates']} candidates), {deploy['recall10_exact']:.3f} exact; "
            f"{deploy['funnel_overlap_with_exact_top10']:.0%} of exact top 10 found; "
            f"{deploy['ms_per_user_funnel']:.1f} against {deploy['ms_per_user_exact']:.1f} ms per user"
            if deploy
            else "-"
        )
        lines.append(
            f"| {key} | {f'{plan_gib:.2f} GiB' if plan_gib else '(not planned)'} "
            f"| {_range([p / 1024 for p in peaks], '{:.2f}')} GiB | {error} "
            f"| {_range(f.get('startup_seconds', []), '{:.1f}')} s "
            f"| {', '.join(map(str, f.get('resumed_at', []))) or '-'} | {export_text} | {deploy_text} |"
        )
    return lines


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
    parser.add_argument("--deploy-check", metavar="RUN", help=argparse.SUPPRESS)  # the bench's own step
    parser.add_argument("--users", type=int, default=200, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.runs.split(",")
    unknown = sorted(set(names) - set(SCALE_RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {list(SCALE_RUNS)}")
    if args.deploy_check:
        deploy_check(args.deploy_check, args.users)
        return
    if not args.report_only:
        for name in names:
            if not os.path.exists(record_path(SCALE_RUNS[name])):
                run = SCALE_RUNS[name]
                prepare(run)
                plan(run)
                train(run)
                export(run)
                recommend(run)
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
