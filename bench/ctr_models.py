"""The CTR model family of the DLRM paper on one trainer: DLRM, Wide & Deep, DeepFM, DCN v1 / v2 and xDeepFM
on the same data, batches and sharded tables; cost, speed and accuracy, and the paper's claims checked.

    .venv/bin/python bench/ctr_models.py                       # about 20 min CPU; writes docs/benchmarks.md
    .venv/bin/python bench/ctr_models.py --quick --no-write    # a smoke run (tests/integration/test_bench.py)
    .venv/bin/python bench/ctr_models.py --datasets obp        # only the Open Bandit columns, in place

Every model is built by ``models.ctr.build_ctr_model`` from configs/dlrm-synthetic.yaml's shared settings
(D = 16, bottom MLP [64, 16], top MLP [64, 32, 1]) and its own defaults (DCN: 3 cross layers, stacked;
DCN v2: rank 64, one expert; xDeepFM: CIN [16, 16]), and trained through ``sharding.dlrm.parallelize_dlrm``
(TorchRec table-wise tables with fused Adagrad lr 0.05, DDP dense part with AdamW lr 2e-3) and the task's
``forward_backward``: the path of ``fmrl train``. Wide & Deep runs twice on the synthetic data: without
crosses, and with the generator's 10 interacting pairs as hand-made crosses (the crosses an engineer
who knew the data would write).

* **cost**: parameters (tables and dense part) and forward FLOPs per sample, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on one forward of the single-device model (matrix products
  only: lookups, and element-wise products such as the FM's or the CIN's Hadamard products, count 0);
* **speed**: one ``torchrun`` job per rank count (1 rank x 2 threads, 2 ranks x 1 thread) trains every
  model in turn on the same global batches of 512 and reports samples/s from the median step (the
  slowest rank's);
* **accuracy**: the 1-rank job then trains every model on each data set for 3 seeds (model initialisation and
  batch order) and scores the test split: ROC AUC, log loss and NE (log loss over the constant predictor's,
  the training click rate). Data: the synthetic Criteo-format set (``prepare_synthetic_ctr``, 20,000
  impressions, one pass: the CPU budget of ~20 minutes for 60 trainings), the same impressions with the
  higher-order terms on (``--third-order 1.5 --element-cross 1.5``: same features, other clicks), and the
  Open Bandit Dataset sample, all six logs of the obp wheel in one data set (``fmrl data convert-obp
  --policy random bts --campaign all men women``: 60,000 real impressions, ~0.5% clicks; each log split
  on its own, 48,000 train / 6,000 test rows with ~30 test clicks; item ids namespaced by campaign, the
  log's policy and campaign as two more categorical features).

``--datasets`` runs the accuracy part on some data sets only and replaces just their columns (and their
part of the data line) in the written table, noting that the other columns come from the earlier full
run; the speed and cost columns and the claims (which rest on the synthetic sets) are left as they are.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from scaling import run_job  # bench/ is on sys.path
from trunk import machine, write_section

from trainer.process_exit import run_as_process

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BEGIN, END = "<!-- bench/ctr_models.py:begin -->", "<!-- bench/ctr_models.py:end -->"
CORES = 2
GLOBAL_BATCH = 512
HIGHER_ORDER = dict(third_order=1.5, element_cross=1.5)
MODELS = {
    "dlrm": ("DLRM", []),
    "wide_deep": ("Wide & Deep", ["dlrm.model=wide_deep"]),
    "wide_deep+crosses": ("Wide & Deep + true crosses", ["dlrm.model=wide_deep"]),
    "deepfm": ("DeepFM", ["dlrm.model=deepfm"]),
    "dcn": ("DCN (v1)", ["dlrm.model=dcn"]),
    "dcn_v2": ("DCN v2", ["dlrm.model=dcn_v2"]),
    "xdeepfm": ("xDeepFM", ["dlrm.model=xdeepfm"]),
}
"""Row key -> (label, config overrides); the crosses of "wide_deep+crosses" come from the data set."""
COMMON = ["task=dlrm", "dlrm.embedding_dim=16", "dlrm.bottom_mlp=[64,16]", "dlrm.top_mlp=[64,32,1]"]
COMMON += ["optim.lr=2e-3", "optim.weight_decay=0", "optim.warmup_steps=20", "parallel.backend=ddp"]
COMMON += ["parallel.table_optimizer=adagrad", "parallel.table_lr=0.05"]
RUNS = {
    "full": dict(rows=20_000, epochs=1, seeds=3, obp=True, timed=20, warm_up=3),
    "quick": dict(rows=3_000, epochs=1, seeds=1, obp=False, timed=3, warm_up=1, threads=1),
}
"""``threads``: intra-op threads per rank (default: the cores shared out). The quick run's models are tiny,
and two threads per rank thrash when another process holds a core (the quick run's test beside one or two
training processes: 208 s with two threads, 39 s with one)."""
DATASETS = {"synthetic": "synthetic", "higher": "synthetic + higher-order terms", "obp": "Open Bandit (real)"}
COLUMNS = {
    "synthetic": ["AUC synthetic", "log loss synthetic", "NE synthetic"],
    "higher": ["AUC + higher order", "NE + higher order"],
    "obp": ["AUC Open Bandit", "NE Open Bandit"],
}
"""Data set -> its columns of the table (a ``--datasets`` run replaces these)."""


# ------------------------------------------------------------------------------------------------ worker


def model_config(key: str, data: dict):  # noqa: ANN201
    from trainer.config import load_config

    overrides = list(MODELS[key][1])
    if key == "wide_deep+crosses":
        overrides.append(f"dlrm.wide_crosses=[{','.join(data['crosses'])}]")
    cfg = load_config(None, [*COMMON, *overrides])
    return cfg, cfg.dlrm.model_config(
        num_dense=data["num_dense"], hash_buckets=data["hash_buckets"], feature_names=data["feature_names"]
    )


def train_one(key: str, data: dict, seed: int, epochs: int, device, timed: int = 0, warm_up: int = 0) -> dict:  # noqa: ANN001
    """Train model ``key`` on ``data``'s train split (global batches of 512, rank r takes rows r, r+R, ...);
    with ``timed``, stop after warm_up + timed steps and return the median step; else score the test split."""
    import torch.distributed as dist

    from data_pipeline.ctr import CTRBatch
    from models.ctr import build_ctr_model
    from models.dlrm import ctr_loss, roc_auc
    from sharding.dlrm import parallelize_dlrm
    from trainer.evaluation.ctr import constant_logloss
    from trainer.tasks.dlrm import forward_backward

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, model_cfg = model_config(key, data)
    torch.manual_seed(seed)
    model = build_ctr_model(model_cfg)
    train = data["train"]
    steps_per_epoch = len(train["labels"]) // GLOBAL_BATCH
    total = warm_up + timed if timed else epochs * steps_per_epoch
    parallel = parallelize_dlrm(
        model,
        cfg.parallel,
        cfg.optim,
        total_steps=total,
        micro_batch_size=GLOBAL_BATCH // world,
        device=device,
    )
    parallel.set_training(True)
    times, step = [], 0
    for epoch in range(epochs if not timed else 10**6):
        order = torch.from_numpy(np.random.default_rng((seed, epoch)).permutation(len(train["labels"])))
        for i in range(steps_per_epoch):
            rows = order[i * GLOBAL_BATCH : (i + 1) * GLOBAL_BATCH][rank::world]
            batch = CTRBatch(train["dense"][rows], train["sparse"][rows], train["labels"][rows])
            start = time.perf_counter()
            forward_backward(parallel, batch, world)
            parallel.micro_step(True)
            if step >= warm_up:
                times.append(time.perf_counter() - start)
            step += 1
            if step >= total:
                break
        if step >= total:
            break
    if timed:
        slowest = torch.tensor(times)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return dict(samples_per_s=GLOBAL_BATCH / float(slowest.median()))
    parallel.set_training(False)
    test = data["test"]
    with torch.no_grad():
        logits = torch.cat(
            [
                parallel.forward(test["dense"][b : b + 4096], test["sparse"][b : b + 4096])
                for b in range(0, len(test["labels"]), 4096)
            ]
        )
    labels = test["labels"]
    logloss = float(ctr_loss(logits.double(), labels))
    baseline = constant_logloss(data["train_rate"], data["test_rate"])
    return dict(auc=roc_auc(logits, labels), logloss=logloss, ne=logloss / baseline)


def cost(key: str, data: dict) -> dict:
    """Parameters and forward FLOPs per sample of the single-device model."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.ctr import build_ctr_model
    from models.dlrm import ids_to_kjt

    _, model_cfg = model_config(key, data)
    model = build_ctr_model(model_cfg)
    tables = sum(p.numel() for n, p in model.named_parameters() if n.startswith("sparse_arch."))
    dense = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("sparse_arch."))
    batch = 64
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(
            data["train"]["dense"][:batch],
            ids_to_kjt(data["train"]["sparse"][:batch], model_cfg.sparse_names),
        )
    return dict(table_parameters=tables, dense_parameters=dense, flops=counter.get_total_flops() / batch)


def worker(job: str, data_dir: str, run: dict, names: list[str]) -> dict | None:
    from trainer.dist import distributed

    with distributed() as (world, device):
        torch.set_num_threads(run.get("threads") or max(1, CORES // world.world_size))
        sets = {name: torch.load(os.path.join(data_dir, f"{name}.pt")) for name in names}
        out: dict = {"ranks": world.world_size}
        if job != "accuracy":
            out["speed"] = {
                key: train_one(key, sets["synthetic"], 0, 1, device, run["timed"], run["warm_up"])
                for key in MODELS
            }
        if job == "all":  # on 1 rank: the speed above, then cost and accuracy
            out["cost"] = {key: cost(key, sets["synthetic"]) for key in MODELS}
        if job in ("all", "accuracy"):
            out["accuracy"] = {}
            for name, data in sets.items():
                for key in MODELS:
                    if key == "wide_deep+crosses" and not data["crosses"]:
                        continue
                    runs = [train_one(key, data, seed, run["epochs"], device) for seed in range(run["seeds"])]
                    out["accuracy"][f"{name}/{key}"] = runs
                    print(name, key, [round(r["auc"], 4) for r in runs], file=sys.stderr, flush=True)
        return out if world.rank == 0 else None


# ------------------------------------------------------------------------------------------------ parent


def data_sets(run: dict) -> list[str]:
    return ["synthetic", "higher"] + (["obp"] if run["obp"] else [])


def obp_data_line(info: dict) -> str:
    return (
        f"Open Bandit, all six logs (random and bts policy x campaigns all, men, women), "
        f"{info['rows']['train']:,} train / {info['rows']['test']:,} test impressions "
        f"({info['test_positives']} test clicks)"
    )


def replace_columns(section: str, acc: dict, meta: dict, command: str, wall_s: float) -> str:
    """The written ``section`` with the columns of the data sets in ``acc`` replaced (a ``--datasets`` run);
    the other columns, the cost and speed and the claims stay those of the earlier full run."""
    names = sorted({key.split("/")[0] for key in acc})
    lines = section.split("\n")
    header = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    titles = [cell.strip() for cell in lines[header].strip("|").split("|")]
    labels = {label: key for key, (label, _) in MODELS.items()}
    for i in range(header + 2, len(lines)):
        if not lines[i].startswith("| "):
            break
        cells = [cell.strip() for cell in lines[i].strip("|").split("|")]
        key = labels[cells[0]]
        for name in names:
            for title, metric in zip(
                COLUMNS[name], (["auc", "logloss", "ne"] if name == "synthetic" else ["auc", "ne"])
            ):
                runs = acc.get(f"{name}/{key}")
                cells[titles.index(title)] = fmt([r[metric] for r in runs]) if runs else "—"
        lines[i] = "| " + " | ".join(cells) + " |"
    for i, line in enumerate(lines):
        if line.startswith("Data: ") and "obp" in names:
            lines[i] = re.sub(r"; Open Bandit[^;]*?test clicks\)", f"; {obp_data_line(meta['obp'])}", line)
            columns = ", ".join(c for n in names for c in COLUMNS[n])
            note = f"Columns {columns}: "
            lines = [other for other in lines if not other.startswith(note)]  # an earlier --datasets run's
            lines.insert(
                i + 1,
                f"Columns {columns}: `{command}` ({wall_s / 60:.1f} min wall-clock, "
                f"{time.strftime('%Y-%m-%d')}); the other columns, the speeds and the claims are from the "
                "earlier full run above.  ",
            )
            break
    return "\n".join(lines)


def prepare(data_dir: str, run: dict, names: list[str]) -> dict:
    """Write the data sets and their train/test splits as tensors (<name>.pt)."""
    from data_pipeline.ctr import CTRDataset, iter_ctr_batches
    from data_pipeline.obp import OBP_CAMPAIGNS, OBP_POLICIES, convert_obp
    from data_pipeline.synthetic_ctr import prepare_synthetic_ctr, synthetic_ctr_pairs

    meta = {}
    for name in names:
        url = os.path.join(data_dir, name)
        if name == "obp":
            convert_obp(url, policy=OBP_POLICIES, campaign=OBP_CAMPAIGNS)  # all six logs
        else:
            prepare_synthetic_ctr(url, rows=run["rows"], seed=0, **(HIGHER_ORDER if name == "higher" else {}))
        dataset = CTRDataset.open(url)
        splits = {}
        for split in ("train", "test"):
            (batch,) = iter_ctr_batches(url, split, dataset.rows[split])
            splits[split] = dict(dense=batch.dense, sparse=batch.sparse, labels=batch.labels)
        names = dataset.sparse_features
        crosses = [f"{names[f]}*{names[g]}" for f, g in synthetic_ctr_pairs(0)] if name != "obp" else []
        info = dict(
            num_dense=len(dataset.dense_features),
            hash_buckets=dataset.hash_buckets,
            feature_names=names,
            crosses=crosses,
            rows=dataset.rows,
            train_rate=dataset.meta["splits"]["train"]["positive_rate"],
            test_rate=dataset.meta["splits"]["test"]["positive_rate"],
            test_positives=int(splits["test"]["labels"].sum()),
        )
        torch.save({**splits, **info}, os.path.join(data_dir, f"{name}.pt"))
        meta[name] = info
    return meta


def launch(job: str, ranks: int, data_dir: str, quick: bool, names: list[str]) -> dict:
    runner = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [
        runner,
        "--standalone",
        f"--nproc_per_node={ranks}",
        __file__,
        "--worker",
        job,
        "--data",
        data_dir,
        "--datasets",
        *names,
    ]
    command += ["--quick"] if quick else []
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, CORES // ranks))}
    return run_job(command, env, 0.0)


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def fmt(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.4f}" if math.isnan(sd) else f"{mean:.4f} ± {sd:.4f}"


def render(
    accuracy_job: dict, speed: dict, meta: dict, run: dict, command: str, wall_s: float, quick: bool
) -> str:
    costs, acc = accuracy_job["cost"], accuracy_job["accuracy"]
    lines = [
        BEGIN,
        "## The CTR model family: DLRM beside Wide & Deep, DeepFM, DCN and xDeepFM (`bench/ctr_models.py`)",
        "",
        f"Command: `{command}` ({wall_s / 60:.1f} min wall-clock)  ",
        f"Machine: {machine()}; shared with other jobs, so speeds are indicative  ",
        f"Data: synthetic Criteo-format, {meta['synthetic']['rows']['train']:,} train / "
        f"{meta['synthetic']['rows']['test']:,} test impressions; the same with the higher-order terms "
        f"(third order 1.5, element-level cross 1.5)"
        + (f"; {obp_data_line(meta['obp'])}" if "obp" in meta else "; Open Bandit: not run (`--quick`)")
        + f". {run['epochs']} pass(es) over the train split in global batches of {GLOBAL_BATCH}, mean ± sd over "
        f"{run['seeds']} seed(s). Setup and claims: the docstring of bench/ctr_models.py.",
        "",
    ]
    if quick:
        lines += ["**`--quick` run: tiny data, one seed, a few timed steps; the numbers mean little.**", ""]
    header = (
        "| model | table params | dense params | MFLOPs/sample | samples/s, 1 rank | samples/s, 2 ranks |"
    )
    header += " AUC synthetic | AUC + higher order | AUC Open Bandit | log loss synthetic |"
    header += " NE synthetic | NE + higher order | NE Open Bandit |"
    lines += [header, "|" + "---|" * 13]
    for key, (label, _) in MODELS.items():
        c = costs[key]

        def column(name: str, metric: str, key: str = key) -> str:
            runs = acc.get(f"{name}/{key}")
            return fmt([r[metric] for r in runs]) if runs else "—"

        lines.append(
            f"| {label} | {c['table_parameters']:,} | {c['dense_parameters']:,} | {c['flops'] / 1e6:.3f} | "
            f"{speed[1][key]['samples_per_s']:,.0f} | {speed[2][key]['samples_per_s']:,.0f} | "
            f"{column('synthetic', 'auc')} | {column('higher', 'auc')} | {column('obp', 'auc')} | "
            f"{column('synthetic', 'logloss')} | {column('synthetic', 'ne')} | {column('higher', 'ne')} | "
            f"{column('obp', 'ne')} |"
        )
    lines += ["", *claims(costs, speed, acc, quick), END]
    return "\n".join(lines)


def claims(costs: dict, speed: dict, acc: dict, quick: bool) -> list[str]:
    """The DLRM paper's qualitative claims next to what this run measured, with a verdict each."""

    def auc(name: str, key: str) -> tuple[float, float]:
        return mean_sd([r["auc"] for r in acc[f"{name}/{key}"]])

    def noise(*pairs: tuple[float, float]) -> float:  # 2 standard errors of a difference of means
        sds = [sd for _, sd in pairs if not math.isnan(sd)]
        n = len(next(iter(acc.values())))
        return 2 * math.sqrt(sum(s * s for s in sds) / n) if sds and n > 1 else 0.0

    six = [k for k in MODELS if k != "wide_deep+crosses"]
    flops = {k: costs[k]["flops"] for k in six}
    fast = {k: speed[1][k]["samples_per_s"] for k in six}
    rows = ["| claim (DLRM paper, §2–3) | measured here | verdict |", "|---|---|---|"]
    cheapest, quickest = min(flops, key=flops.get), max(fast, key=fast.get)
    verdict = (
        "confirmed"
        if cheapest == "dlrm" and quickest == "dlrm"
        else (
            "partly: fewest FLOPs, not the fastest here" if cheapest == "dlrm" else "refuted at these sizes"
        )
    )
    rows.append(
        f"| DLRM is the most computationally efficient | fewest FLOPs/sample: {MODELS[cheapest][0]} "
        f"({flops[cheapest] / 1e6:.3f} M; DLRM {flops['dlrm'] / 1e6:.3f} M); fastest on 1 rank: "
        f"{MODELS[quickest][0]} ({fast[quickest]:,.0f}/s; DLRM {fast['dlrm']:,.0f}/s) | {verdict} |"
    )
    priciest, slowest = max(flops, key=flops.get), min(fast, key=fast.get)
    verdict = (
        "confirmed"
        if priciest == "xdeepfm" and slowest == "xdeepfm"
        else ("partly" if "xdeepfm" in (priciest, slowest) else "refuted at these sizes")
    )
    rows.append(
        f"| DCN and xDeepFM pay for higher-order interactions; the CIN is the most expensive | most FLOPs: "
        f"{MODELS[priciest][0]} ({flops[priciest] / 1e6:.3f} M); slowest: {MODELS[slowest][0]} "
        f"({fast[slowest]:,.0f}/s); DCN {flops['dcn'] / 1e6:.3f} M, DCN v2 {flops['dcn_v2'] / 1e6:.3f} M | {verdict} |"
    )
    # higher order: the AUC a model gains over DLRM on the higher-order data, minus what it gains on the plain data
    parts, gains = [], {}
    for key in ("dcn", "dcn_v2", "xdeepfm"):
        plain = auc("synthetic", key)[0] - auc("synthetic", "dlrm")[0]
        higher = auc("higher", key)[0] - auc("higher", "dlrm")[0]
        gains[key] = higher - plain
        parts.append(f"{MODELS[key][0]} {higher:+.4f} vs {plain:+.4f}")
    margin = noise(
        auc("higher", "dlrm"), auc("higher", "xdeepfm"), auc("synthetic", "dlrm"), auc("synthetic", "xdeepfm")
    )
    best = max(gains.values())
    verdict = (
        "confirmed"
        if best > margin and best > 0
        else "not measurable here: no higher-order model gains beyond seed noise"
    )
    rows.append(
        "| DLRM learns second-order (dot-product) interactions only; cross layers and the CIN learn higher "
        f"orders | AUC minus DLRM's, with the higher-order terms vs without: {'; '.join(parts)} "
        f"(2 SE ≈ {margin:.4f}) | {verdict} |"
    )
    if "synthetic/wide_deep+crosses" in acc:
        plain, crossed = auc("synthetic", "wide_deep"), auc("synthetic", "wide_deep+crosses")
        deepfm = auc("synthetic", "deepfm")
        margin = noise(plain, crossed)
        rows.append(
            f"| Wide & Deep needs hand-made crosses | AUC without crosses {plain[0]:.4f}, with the 10 true pairs "
            f"{crossed[0]:.4f} (2 SE ≈ {margin:.4f}) | "
            + (
                "confirmed"
                if crossed[0] - plain[0] > margin
                else "not confirmed: its deep MLP already finds them here"
            )
            + " |"
        )
        margin = noise(plain, deepfm)
        rows.append(
            f"| DeepFM automates the second-order interactions (no hand-made crosses) | DeepFM {deepfm[0]:.4f} vs "
            f"Wide & Deep without crosses {plain[0]:.4f} and with the true crosses {crossed[0]:.4f} | "
            + (
                "confirmed"
                if deepfm[0] - plain[0] > margin and deepfm[0] >= crossed[0] - margin
                else "partly"
                if deepfm[0] > plain[0]
                else "not confirmed here"
            )
            + " |"
        )
    if quick:
        rows += ["", "(`--quick`: the verdicts rest on tiny runs and mean nothing.)"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="4,000 impressions, 1 seed, no Open Bandit")
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=list(DATASETS),
        help="only these data sets' accuracy columns, replaced in the written table (only obp: the claims "
        "rest on synthetic and higher, which need the full run)",
    )
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", choices=["speed", "all", "accuracy"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    run = RUNS["quick" if args.quick else "full"]
    if args.worker:
        result = worker(args.worker, args.data, run, args.datasets)
        if result is not None:
            print(json.dumps(result), flush=True)
        return
    started = time.perf_counter()
    if args.datasets:
        if args.quick or set(args.datasets) != {"obp"}:
            parser.error("--datasets: only `--datasets obp` (without --quick) replaces columns in place")
        text = open(args.output).read() if os.path.exists(args.output) else ""
        if BEGIN not in text or END not in text:
            parser.error(
                f"--datasets replaces columns of the table in {args.output}, which has none: run in full"
            )
        with tempfile.TemporaryDirectory(prefix="bench-ctr-") as data_dir:
            meta = prepare(data_dir, run, args.datasets)
            accuracy = launch("accuracy", 1, data_dir, False, args.datasets)
        command = "python bench/ctr_models.py --datasets " + " ".join(args.datasets)
        old = text[text.index(BEGIN) : text.index(END) + len(END)]
        section = replace_columns(old, accuracy["accuracy"], meta, command, time.perf_counter() - started)
    else:
        names = data_sets(run)
        with tempfile.TemporaryDirectory(prefix="bench-ctr-") as data_dir:
            meta = prepare(data_dir, run, names)
            speed = {2: launch("speed", 2, data_dir, args.quick, names)["speed"]}
            print(json.dumps(speed), flush=True)
            accuracy = launch("all", 1, data_dir, args.quick, names)
            speed[1] = accuracy["speed"]
        command = "python bench/ctr_models.py" + (" --quick" if args.quick else "")
        section = render(accuracy, speed, meta, run, command, time.perf_counter() - started, args.quick)
    print(section)
    if not args.no_write:
        write_section(args.output, section, BEGIN, END)


if __name__ == "__main__":
    run_as_process(main)  # trainer/process_exit.py: why a gloo process exits this way
