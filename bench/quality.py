"""Model quality on real data, per nested size, beside the published numbers; writes docs/quality.md.

    .venv/bin/python bench/quality.py                           # every study and seed: hours on 2 cores
    .venv/bin/python bench/quality.py --studies ml-100k --seeds 42
    .venv/bin/python bench/quality.py --report-only             # the tables from the runs done so far

Each study is a config plus overrides, trained once per seed by ``fmrl train`` in its own process (the
real trainer, checkpoints and all). Two runs go at a time with one thread each, the most a 2-core machine
holds. A run whose ``metrics.json`` exists is done and is not run again; an interrupted run continues from
its latest checkpoint (``run.resume=auto``), and its wall time adds up over the attempts
(``quality_run.json`` beside the run), so the whole bench can be spread over several sessions.
Runs of more seeds than a study's own (``--seeds 45,46``) join its tables.

runs/ is scratch space that does not outlive the machine; what a finished run measured is kept as a
record in bench/results/quality/<run>.json, in the repository, and the report is written from those
records alone. The report is not rewritten with fewer runs than it shows already: a run that it reports
and that has no record stops the bench with the list of them (``--drop-missing-runs`` writes it anyway).

Data: Amazon Beauty (5-core, S3-Rec's release, bundled in real-data/amazon-beauty) with its item attributes,
converted by ``fmrl data convert-seqrec``; MovieLens-100k from the recbole wheel with all-MiniLM-L6-v2
text features (``fmrl data convert-movielens`` + ``fmrl features --image-model none``). Protocol of the
fMRLRec paper: leave-one-out, full ranking over all items, history items not excluded. The Beauty runs
are also evaluated with the history masked (LRURec's protocol, ``eval.exclude_history=true``; no Beauty
user buys an item twice, so masking never hides a target), kept in ``history_masked.json`` in the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# bench/, the script's folder, is on sys.path
from trunk import machine, read_section, write_json, write_section

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FMRL = os.path.join(os.path.dirname(sys.executable), "fmrl")
KS = (5, 10, 20)
METRICS = [f"{name}@{k}" for name in ("NDCG", "Recall") for k in KS]


@dataclass(frozen=True)
class Study:
    """One row family of the report: a config, its overrides, the seeds it is trained with."""

    name: str
    config: str
    data: str
    """Key of DATA: the data set the config trains on."""
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (42, 43, 44)
    label: str = ""


DATA = {
    "amazon-beauty": "runs/data/amazon-beauty",
    "ml-100k": "runs/data/ml-100k",
}
BEAUTY_SIZES = (8, 16, 32, 64, 128)
ML_SIZES = (8, 16, 32, 64, 128, 256)
INDEPENDENT = {"amazon-beauty": (16, 64), "ml-100k": (16, 64)}
"""Sizes of the independently trained single-size models (the largest size is the single-size row)."""

STUDIES = [
    Study("beauty", "configs/amazon-beauty.yaml", "amazon-beauty", label="fMRL-LRU, ID + attributes"),
    Study(
        "beauty-id",
        "configs/amazon-beauty.yaml",
        "amazon-beauty",
        ("model.use_attributes=false",),
        label="fMRL-LRU, ID only",
    ),
    Study(
        "beauty-single",
        "configs/amazon-beauty.yaml",
        "amazon-beauty",
        (f"model.nested_sizes=[{BEAUTY_SIZES[-1]}]",),
        label=f"single size {BEAUTY_SIZES[-1]} (LRURec-style), ID + attributes",
    ),
    *(
        Study(
            f"beauty-independent-{m}",
            "configs/amazon-beauty.yaml",
            "amazon-beauty",
            (f"model.nested_sizes=[{m}]",),
            label=f"independent size {m}",
        )
        for m in INDEPENDENT["amazon-beauty"]
    ),
    Study("ml-100k", "configs/ml-100k-official.yaml", "ml-100k", label="fMRL-LRU, MiniLM text"),
    Study(
        "ml-100k-single",
        "configs/ml-100k-official.yaml",
        "ml-100k",
        (f"model.nested_sizes=[{ML_SIZES[-1]}]",),
        label=f"single size {ML_SIZES[-1]}",
    ),
    *(
        Study(
            f"ml-100k-independent-{m}",
            "configs/ml-100k-official.yaml",
            "ml-100k",
            (f"model.nested_sizes=[{m}]",),
            label=f"independent size {m}",
        )
        for m in INDEPENDENT["ml-100k"]
    ),
]

# Published full-ranking numbers on the same data (see ../shared/reference and docs/quality.md).
BEAUTY_REFERENCES = [
    # (source, model, {metric: value})
    (
        "fMRLRec paper, Table 2",
        "SASRec",
        {"NDCG@5": 0.0274, "Recall@5": 0.0456, "NDCG@10": 0.0364, "Recall@10": 0.0734},
    ),
    (
        "fMRLRec paper, Table 2",
        "BERT4Rec",
        {"NDCG@5": 0.0275, "Recall@5": 0.0420, "NDCG@10": 0.0350, "Recall@10": 0.0653},
    ),
    (
        "fMRLRec paper, Table 2",
        "FMLP-Rec",
        {"NDCG@5": 0.0318, "Recall@5": 0.0539, "NDCG@10": 0.0416, "Recall@10": 0.0846},
    ),
    (
        "fMRLRec paper, Table 2",
        "LRURec (ID)",
        {"NDCG@5": 0.0339, "Recall@5": 0.0565, "NDCG@10": 0.0438, "Recall@10": 0.0871},
    ),
    (
        "fMRLRec paper, Table 2",
        "fMRLRec (text + image)",
        {"NDCG@5": 0.0415, "Recall@5": 0.0613, "NDCG@10": 0.0520, "Recall@10": 0.0939},
    ),
    (
        "fMRLRec paper, Table 3",
        "fMRLRec w/o language & image (ID)",
        {"NDCG@5": 0.0257, "Recall@5": 0.0335, "NDCG@10": 0.0288, "Recall@10": 0.0431},
    ),
    ("S3-Rec paper", "SASRec", {"NDCG@10": 0.0318, "Recall@10": 0.0605}),
    ("S3-Rec paper", "S3-Rec (attributes)", {"NDCG@10": 0.0327, "Recall@10": 0.0647}),
]
BEAUTY_TARGET = {"NDCG@10": 0.0438, "Recall@10": 0.0871}  # the paper's LRU baseline
ML_OFFICIAL = {  # the official fMRLRec code at configs/ml-100k-official.yaml's settings, mean of 3 seeds
    "NDCG@10": {8: 0.0179, 16: 0.0217, 32: 0.0260, 64: 0.0340, 128: 0.0412, 256: 0.0472},
    "Recall@10": {256: 0.0962},
}
RUNS = os.path.join(REPO, "runs", "quality")
RESULTS = os.path.join(HERE, "results", "quality")
"""One JSON record per finished run, kept in the repository (see :func:`keep_record`)."""
BEGIN, END = "<!-- bench/quality.py:begin -->", "<!-- bench/quality.py:end -->"


# ------------------------------------------------------------------------------------------------ running


def run(command: list[str], log_path: str | None = None) -> None:
    print("$", " ".join(command), flush=True)
    if log_path is None:
        subprocess.run(command, check=True, cwd=REPO)
        return
    with open(log_path, "a") as log:
        done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (rc {done.returncode}); see {log_path}")


def prepare(data: str) -> None:
    """Write a data set (and its features) unless it is complete already."""
    out = os.path.join(REPO, DATA[data])
    if data == "amazon-beauty":
        if not os.path.exists(os.path.join(out, "dataset.json")):
            beauty = os.path.join(REPO, "real-data", "amazon-beauty")
            run(
                [
                    FMRL,
                    "data",
                    "convert-seqrec",
                    out,
                    os.path.join(beauty, "Beauty.txt.gz"),
                    "--attributes",
                    os.path.join(beauty, "Beauty_item2attributes.json.gz"),
                    "--shard-size",
                    "1000",
                ]
            )
        return
    if not os.path.exists(os.path.join(out, "dataset.json")):
        run([FMRL, "data", "convert-movielens", out, "--shard-size", "200"])
    if not os.path.exists(os.path.join(out, "features", "features.json")):
        run([FMRL, "features", out, "--image-model", "none"])


def run_dir(study: Study, seed: int) -> str:
    return os.path.join(RUNS, f"{study.name}-s{seed}")


def train(study: Study, seed: int) -> None:
    """One run to its end (or on from its latest checkpoint); its wall time is added to quality_run.json
    and what it measured is kept as its record. A run with a record is not trained again."""
    folder = run_dir(study, seed)
    if os.path.exists(record_path(study, seed)):
        return
    if os.path.exists(os.path.join(folder, "metrics.json")):
        return  # finished before the bench kept records: main() records every finished folder
    os.makedirs(folder, exist_ok=True)
    timing_path = os.path.join(folder, "quality_run.json")
    timing = (
        json.load(open(timing_path)) if os.path.exists(timing_path) else {"wall_seconds": 0.0, "attempts": 0}
    )
    command = [
        FMRL, "train", "--config", study.config,
        f"data.path={DATA[study.data]}", f"train.seed={seed}", "train.num_threads=1",
        f"run.out_dir={RUNS}", f"run.name={os.path.basename(folder)}", "run.resume=auto",
        "run.progress_bar=false", "run.export=false", *study.overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        run(command, os.path.join(folder, "train.log"))
    finally:
        timing["wall_seconds"] += time.perf_counter() - start
        timing["attempts"] += 1
        write_json(timing_path, timing)
    keep_record(study, seed)


MASKED = "history_masked.json"
"""Test metrics of a Beauty run with the history items masked out of the ranking (LRURec's protocol)."""


def evaluate_history_masked(folder: str) -> None:
    """Evaluate a finished run's best weights on test with ``eval.exclude_history=true`` (once; cached)."""
    path = os.path.join(folder, MASKED)
    if os.path.exists(path):
        return
    import torch

    from trainer.evaluation.saved import evaluate_saved

    torch.set_num_threads(1)
    result = evaluate_saved(folder, "test", ["eval.exclude_history=true"])
    record = {
        "test": {str(size): values for size, values in result.metrics.items()},
        "most_popular": result.baseline,
    }
    write_json(path, record)


def record_path(study: Study, seed: int) -> str:
    return os.path.join(RESULTS, f"{study.name}-s{seed}.json")


def keep_record(study: Study, seed: int) -> None:
    """Copy what the finished run ``study``/``seed`` measured into its record (bench/results/quality/):
    its metrics.json (test metrics per size, most-popular, epochs, steps, training time, parameters), the
    bench's wall time, the history-masked evaluation when there is one, and the command's settings. The
    per-step training losses stay in the run folder (and its TensorBoard log): the report does not use them
    and they are two thirds of a record's size."""
    folder = run_dir(study, seed)
    metrics = json.load(open(os.path.join(folder, "metrics.json")))
    metrics.pop("train_losses", None)
    record = {
        "study": study.name,
        "seed": seed,
        "config": study.config,
        "overrides": list(study.overrides),
        "metrics": metrics,
    }
    for key, name in (("bench", "quality_run.json"), ("history_masked", MASKED)):
        if os.path.exists(os.path.join(folder, name)):
            record[key] = json.load(open(os.path.join(folder, name)))
    os.makedirs(RESULTS, exist_ok=True)
    write_json(record_path(study, seed), record)


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Outcome:
    """A study's finished runs: per seed, the test metrics per size and the run facts."""

    study: Study
    runs: dict[int, dict] = field(default_factory=dict)
    masked: dict[int, dict] = field(default_factory=dict)
    """Per seed, the test metrics with the history masked (Beauty runs; see MASKED)."""

    def sizes(self) -> list[int]:
        first = next(iter(self.runs.values()))
        return sorted(int(s) for s in first["test"])

    def values(self, size: int, metric: str) -> list[float]:
        return [r["test"][str(size)][metric] for r in self.runs.values()]

    def popular(self, metric: str) -> float:
        return statistics.mean(r["most_popular"][metric] for r in self.runs.values())


def finished_seeds(study: Study) -> list[int]:
    """Seeds of the study's finished run folders here (those with metrics.json): its own seeds and any
    more trained with ``--seeds``."""
    pattern = re.compile(re.escape(study.name) + r"-s(\d+)")
    found = [
        int(m.group(1)) for m in map(pattern.fullmatch, os.listdir(RUNS) if os.path.isdir(RUNS) else []) if m
    ]
    return sorted(
        seed for seed in found if os.path.exists(os.path.join(run_dir(study, seed), "metrics.json"))
    )


def recorded_seeds(study: Study) -> list[int]:
    """Seeds of the study's records in bench/results/quality/."""
    pattern = re.compile(re.escape(study.name) + r"-s(\d+)\.json")
    names = os.listdir(RESULTS) if os.path.isdir(RESULTS) else []
    return sorted(int(m.group(1)) for m in map(pattern.fullmatch, names) if m)


def load_outcomes(studies: list[Study] | None = None) -> dict[str, Outcome]:
    """The recorded runs of ``studies`` (default: this bench's), by study name; studies without any left out."""
    outcomes = {}
    for study in STUDIES if studies is None else studies:
        outcome = Outcome(study)
        for seed in recorded_seeds(study):
            record = json.load(open(record_path(study, seed)))
            metrics = record["metrics"]
            metrics["wall_seconds"] = record.get("bench", {}).get("wall_seconds", math.nan)
            outcome.runs[seed] = metrics
            if "history_masked" in record:
                outcome.masked[seed] = record["history_masked"]
        if outcome.runs:
            outcomes[study.name] = outcome
    return outcomes


RUN_ROW = re.compile(r"\| ([a-z0-9-]+) \| (\d+) \|")
"""A row of the report's "Every run" table: | study | seed | ..."""


def reported_runs(path: str) -> set[str]:
    """Runs ("study-sSEED") that the report section of ``path`` shows in its "Every run" table."""
    section = read_section(path, BEGIN, END)
    table = section[section.index("### Every run") :] if "### Every run" in section else ""
    return {f"{m.group(1)}-s{m.group(2)}" for m in map(RUN_ROW.match, table.splitlines()) if m}


def missing_records(reported: set[str], outcomes: dict[str, Outcome]) -> list[str]:
    """The runs in ``reported`` that are not among ``outcomes``' recorded runs."""
    have = {f"{name}-s{seed}" for name, outcome in outcomes.items() for seed in outcome.runs}
    return sorted(reported - have)


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def size_table(outcome: Outcome) -> list[str]:
    n = len(outcome.runs)
    lines = [
        f"| size | {' | '.join(METRICS)} | NDCG@10 vs the next size down |",
        "|---|" + "---|" * (len(METRICS) + 1),
    ]
    previous = None
    for size in outcome.sizes():
        ndcg = statistics.mean(outcome.values(size, "NDCG@10"))
        drop = "" if previous is None else f"{(ndcg - previous) / ndcg * 100:+.0f} % gain"
        cells = [mean_sd(outcome.values(size, m)) for m in METRICS]
        lines.append(f"| {size} | {' | '.join(cells)} | {drop} |")
        previous = ndcg
    lines.append(f"| most-popular | {' | '.join(f'{outcome.popular(m):.4f}' for m in METRICS)} | |")
    lines.append("")
    lines.append(
        f"Mean ± sample sd over {n} seed{'s' if n > 1 else ''} ({', '.join(map(str, outcome.runs))})."
    )
    return lines


def halving_drops(outcome: Outcome) -> list[tuple[int, int, float]]:
    """(size, half size, relative NDCG@10 drop) per halving."""
    sizes = outcome.sizes()
    means = {s: statistics.mean(outcome.values(s, "NDCG@10")) for s in sizes}
    return [(b, a, 1 - means[a] / means[b]) for a, b in zip(sizes, sizes[1:]) if b == 2 * a]


def run_table(outcomes: dict[str, Outcome]) -> list[str]:
    lines = [
        "| run | seed | epochs (best) | steps | training time | wall time (with evaluation) |",
        "|---|---|---|---|---|---|",
    ]
    for name, outcome in outcomes.items():
        for seed, r in outcome.runs.items():
            lines.append(
                f"| {name} | {seed} | {r.get('epochs', '?')} ({r['best_epoch']}) | {r['steps']} "
                f"| {r.get('train_seconds', math.nan) / 60:.0f} min | {r['wall_seconds'] / 60:.0f} min |"
            )
    return lines


def nested_vs_independent(outcomes: dict[str, Outcome], data: str, nested: str, single: str) -> list[str]:
    if nested not in outcomes:
        return []
    base = outcomes[nested]
    independents = {m: outcomes.get(f"{nested}-independent-{m}") for m in INDEPENDENT[data]}
    largest = base.sizes()[-1]
    independents[largest] = outcomes.get(single)
    lines = [
        "| size | nested slice NDCG@10 | independent model NDCG@10 | seeds (independent) | gap "
        "| nested slice Recall@10 | independent Recall@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    ran: list[Outcome] = []
    for m in sorted(independents):
        other = independents[m]
        nested_ndcg, nested_recall = base.values(m, "NDCG@10"), base.values(m, "Recall@10")
        if other is None:
            lines.append(f"| {m} | {mean_sd(nested_ndcg)} | (not run) | | | {mean_sd(nested_recall)} | |")
            continue
        ind_ndcg, ind_recall = other.values(m, "NDCG@10"), other.values(m, "Recall@10")
        gap = (statistics.mean(nested_ndcg) / statistics.mean(ind_ndcg) - 1) * 100
        lines.append(
            f"| {m} | {mean_sd(nested_ndcg)} | {mean_sd(ind_ndcg)} | {len(ind_ndcg)} | {gap:+.1f} % "
            f"| {mean_sd(nested_recall)} | {mean_sd(ind_recall)} |"
        )
        ran.append(other)
    if not ran:
        return lines
    # runs from before the trainer recorded its training time have only the harness's wall time
    timed = all("train_seconds" in r for o in [base, *ran] for r in o.runs.values())
    key, what = (
        ("train_seconds", "training time (evaluation excluded)")
        if timed
        else ("wall_seconds", "wall time (evaluation included; some runs predate the training timer)")
    )

    def mean_of(outcome: Outcome, name: str) -> float:
        values = [r[name] for r in outcome.runs.values() if name in r]
        return statistics.mean(values) if values else math.nan

    sizes = ", ".join(str(o.sizes()[-1]) for o in ran)
    lines += [
        "",
        f"Mean ± sample sd over seeds; the nested slices over the nested study's {len(base.runs)} seeds. "
        "Gap: the nested slice's mean NDCG@10 against the independent models' mean.",
        "",
        f"Trainable parameters: the one nested model {mean_of(base, 'trainable_parameters') / 1e6:.2f}M; "
        f"the independent models of sizes {sizes} together "
        f"{sum(mean_of(o, 'trainable_parameters') for o in ran) / 1e6:.2f}M. {what.capitalize()}: nested "
        f"{mean_of(base, key) / 60:.0f} min, the independent models together "
        f"{sum(mean_of(o, key) for o in ran) / 60:.0f} min.",
    ]
    return lines


def history_masked_table(outcomes: dict[str, Outcome]) -> list[str]:
    """Beauty's NDCG@10 / Recall@10 under both protocols: the main study per size, the others at their
    largest size (runs without a masked evaluation left out)."""
    rows = []
    for name in ("beauty", "beauty-id", "beauty-single"):
        outcome = outcomes.get(name)
        if outcome is None or not outcome.masked:
            continue
        sizes = outcome.sizes() if name == "beauty" else outcome.sizes()[-1:]
        seeds = [seed for seed in outcome.runs if seed in outcome.masked]
        for size in sizes:
            cells = []
            for source in (outcome.runs, outcome.masked):
                cells += [
                    mean_sd([source[seed]["test"][str(size)][m] for seed in seeds])
                    for m in ("NDCG@10", "Recall@10")
                ]
            rows.append(f"| {outcome.study.label} | {size} | {len(seeds)} | {' | '.join(cells)} |")
    if not rows:
        return []
    return [
        "| model | size | seeds | NDCG@10, history ranked | Recall@10, history ranked "
        "| NDCG@10, history masked | Recall@10, history masked |",
        "|---|---|---|---|---|---|---|",
        *rows,
        f"| paper: LRURec (Table 2) | | | {BEAUTY_TARGET['NDCG@10']:.4f} | {BEAUTY_TARGET['Recall@10']:.4f} | | |",
    ]


def render(outcomes: dict[str, Outcome], command: str) -> str:
    lines = [
        BEGIN,
        "## Results (`bench/quality.py`)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
    ]
    lines += [f"Date: {time.strftime('%Y-%m-%d')}", ""]
    beauty = outcomes.get("beauty")
    if beauty is not None:
        largest = beauty.sizes()[-1]
        lines += [
            f"### Amazon Beauty at the largest size ({largest}) beside the published numbers",
            "",
            "| source | model | NDCG@5 | NDCG@10 | NDCG@20 | Recall@5 | Recall@10 | Recall@20 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for source, model, values in BEAUTY_REFERENCES:
            cells = [f"{values[m]:.4f}" if m in values else "" for m in METRICS]
            lines.append(
                f"| {source} | {model} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {cells[4]} | {cells[5]} |"
            )
        for name in ("beauty", "beauty-id", "beauty-single"):
            if name in outcomes:
                o = outcomes[name]
                m = o.sizes()[-1]
                cells = [mean_sd(o.values(m, k)) for k in METRICS]
                lines.append(f"| this project | {o.study.label} | {' | '.join(cells)} |")
        cells = [f"{beauty.popular(k):.4f}" for k in METRICS]
        lines += [f"| this project | most-popular | {' | '.join(cells)} |", ""]
        masked = history_masked_table(outcomes)
        if masked:
            lines += [
                "### Amazon Beauty with the history items masked (LRURec's protocol)",
                "",
                "The tables here rank every item, the user's history included (the fMRLRec paper's protocol). "
                "LRURec's code masks the history out of the ranking; no Beauty user buys an item twice, so "
                "masking never hides a target and only frees top-k places. The same runs, both ways "
                "(`fmrl eval RUN eval.exclude_history=true`):",
                "",
                *masked,
                "",
            ]
    for name, outcome in outcomes.items():
        if "independent" in name:
            continue
        lines += [f"### {name}: {outcome.study.label}, every nested size", "", *size_table(outcome), ""]
        if name == "ml-100k":
            official = ML_OFFICIAL["NDCG@10"]
            lines += [
                "Beside the official fMRLRec code at the same settings (NDCG@10, mean of 3 seeds):",
                "",
                "| size | official | this project | difference |",
                "|---|---|---|---|",
            ]
            for size, value in official.items():
                ours = statistics.mean(outcome.values(size, "NDCG@10"))
                lines.append(f"| {size} | {value:.4f} | {ours:.4f} | {(ours / value - 1) * 100:+.1f} % |")
            lines.append("")
        drops = halving_drops(outcome)
        if drops:
            lines.append(
                "Drop of NDCG@10 per halving of the size: "
                + ", ".join(f"{b} → {a}: {d * 100:.0f} %" for b, a, d in drops)
                + "."
            )
            lines.append("")
    for data, nested, single in (
        ("amazon-beauty", "beauty", "beauty-single"),
        ("ml-100k", "ml-100k", "ml-100k-single"),
    ):
        table = nested_vs_independent(outcomes, data, nested, single)
        if table:
            lines += [f"### Nested slices against independently trained models: {nested}", "", *table, ""]
    lines += ["### Every run", "", *run_table(outcomes), "", "![per-size test metrics](quality.png)", END]
    return "\n".join(lines)


def plot(outcomes: dict[str, Outcome], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, data, title in (
        (axes[0], "amazon-beauty", "Amazon Beauty"),
        (axes[1], "ml-100k", "MovieLens-100k"),
    ):
        for name, outcome in outcomes.items():
            if outcome.study.data != data or len(outcome.sizes()) == 1:
                continue
            sizes = outcome.sizes()
            for metric, style in (("NDCG@10", "-o"), ("Recall@10", "--s")):
                means = [statistics.mean(outcome.values(s, metric)) for s in sizes]
                sds = [
                    statistics.stdev(outcome.values(s, metric)) if len(outcome.runs) > 1 else 0 for s in sizes
                ]
                ax.errorbar(sizes, means, yerr=sds, fmt=style, capsize=3, label=f"{name} {metric}")
        singles = [o for o in outcomes.values() if o.study.data == data and len(o.sizes()) == 1]
        for o in singles:
            m = o.sizes()[0]
            ax.plot([m], [statistics.mean(o.values(m, "NDCG@10"))], "k^", label=None)
        if singles:
            ax.plot([], [], "k^", label="independent models, NDCG@10")
        if data == "amazon-beauty" and outcomes.get("beauty"):
            largest = outcomes["beauty"].sizes()[-1]
            ax.plot([largest], [BEAUTY_TARGET["NDCG@10"]], "r*", markersize=12, label="paper: LRURec NDCG@10")
            ax.plot(
                [largest], [BEAUTY_TARGET["Recall@10"]], "rX", markersize=10, label="paper: LRURec Recall@10"
            )
        if data == "ml-100k":
            official = ML_OFFICIAL["NDCG@10"]
            ax.plot(list(official), list(official.values()), "r:*", label="official code NDCG@10")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("nested size m")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", default=",".join(s.name for s in STUDIES), help="comma-separated")
    parser.add_argument("--seeds", help="comma-separated; default: each study's own")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from finished runs (evaluating Beauty runs with the history masked once)",
    )
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "quality.md"))
    parser.add_argument(
        "--drop-missing-runs",
        action="store_true",
        help="write the report even if it then shows fewer runs than before (runs without a record)",
    )
    args = parser.parse_args()
    # a stopped bench (kill, SLURM's SIGTERM) still records the attempts' wall time: the runs' `finally`
    # blocks run once their `fmrl train` children, stopped with it, have exited
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    names = args.studies.split(",")
    unknown = sorted(set(names) - {s.name for s in STUDIES})
    if unknown:
        parser.error(f"unknown studies {unknown}; known: {[s.name for s in STUDIES]}")
    chosen = [s for s in STUDIES if s.name in names]
    if not args.report_only:
        for data in sorted({s.data for s in chosen}):
            prepare(data)
        seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else None
        jobs = [(s, seed) for s in chosen for seed in (seeds or s.seeds)]
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(train, s, seed) for s, seed in jobs]:
                future.result()
    # every finished run folder here (also those finished by an earlier bench) gets its record
    for study in STUDIES:
        for seed in finished_seeds(study):
            if study.data == "amazon-beauty" and "independent" not in study.name:
                evaluate_history_masked(run_dir(study, seed))
            keep_record(study, seed)
    outcomes = load_outcomes()
    if not outcomes:
        print(f"no recorded runs yet (in {os.path.relpath(RESULTS, REPO)})")
        return
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    section = render(outcomes, command.strip())
    print(section)
    missing = missing_records(reported_runs(args.output), outcomes)
    if missing and not args.drop_missing_runs:
        sys.exit(
            f"not writing {os.path.relpath(args.output, REPO)}: it reports {len(missing)} run(s) that have no "
            f"record in {os.path.relpath(RESULTS, REPO)}: {', '.join(missing)}. Train them again "
            "(`python bench/quality.py --studies STUDY --seeds SEED`; a run with a record is not trained "
            "again) or pass --drop-missing-runs to write the report without them."
        )
    plot(outcomes, os.path.join(os.path.dirname(args.output), "quality.png"))
    write_section(args.output, section, BEGIN, END)


if __name__ == "__main__":
    main()
