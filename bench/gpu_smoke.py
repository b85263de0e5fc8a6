"""First-GPU smoke run of the real trainer, with the trunk's step time and model FLOPs utilisation (MFU).

    .venv/bin/python bench/gpu_smoke.py            # on a CUDA machine: every GPU, under 8 minutes
    .venv/bin/python bench/gpu_smoke.py --record /tmp/gpu.json --workdir /tmp/gpu-smoke

On a machine without CUDA it says so and exits 0, writing nothing. With CUDA it:
1. prepares a synthetic catalog (``fmrl data prepare-synthetic-scale``, nothing downloaded; kept in
   ``--workdir`` for a rerun);
2. trains configs/gpu-smoke.yaml with ``torchrun --nproc_per_node=<GPUs> -m trainer.cli train`` (NCCL,
   every table row-wise sharded with TorchRec's fused Adagrad, FSDP2 trunk in bf16 autocast) until
   run.stop_after_steps, which ends the job with a checkpoint;
3. resumes it (``run.resume=auto``) and trains to train.max_steps, validates, tests;
4. times the trunk alone (the configured LRU blocks at the per-rank batch and length, forward, backward
   and AdamW under bf16 autocast, on cuda:0) and divides its model FLOPs by step time x the GPU's peak.

The record (bench/results/gpu/<gpu>-x<count>.json) holds the machine, each check's outcome, the phases'
wall times, the trainer's own figures read from its log, and the trunk's step time and MFU. The script
exits 1 if a check fails, after writing the record (a failed first GPU run is worth keeping).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

# bench/, the script's folder, is on sys.path
from scale_runs import _lines as log_lines  # a run folder's train.log and train-rank<N>.log lines
from trunk import machine, write_json

from models.fmrl import FMRLConfig

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)
CONFIG = "configs/gpu-smoke.yaml"
CATALOG = ("--num-items", "200000", "--num-users", "50000")
STOP_AT, MAX_STEPS = 40, 120
"""The first job stops (with a checkpoint) at STOP_AT; the resumed one goes on to MAX_STEPS."""
TIME_BUDGET_S = 480

PEAK_BF16_FLOPS = (
    # dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets; the first name contained in
    # torch.cuda.get_device_name() wins, so the PCIe and NVL H100s come before the SXM one
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989e12),
    ("A100", 312e12),
)
NESTED_MAPS_PER_BLOCK = 7
"""Nested D x D maps in one LRU block (models/fmrl/layers.py): the LRU's B (real, imaginary) and C (real,
imaginary), the feed-forward's gate, up and down."""


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of one GPU, by its torch.cuda.get_device_name(); None if not in the table."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def trunk_flops_per_step(sizes: list[int], num_blocks: int, batch: int, length: int) -> int:
    """Model FLOPs of one training step of the LRU trunk on one rank: the nested maps' matmuls only.

    A nested map computes only its block lower triangle (``nested_param_count`` multiply-adds per
    position, 2 FLOPs each); the backward pass costs twice the forward (input and weight gradients).
    Every position of the (batch, length) input counts, padding included, as the GEMMs compute them all.
    The scan, the norms and the gating are O(D) per position, not matmuls, and left out; so is the work
    the masked GEMM group spends on the zeros above the blocks (models/ops/nested_linear.py).
    """
    from models.ops import nested_param_count

    forward_per_position = 2 * NESTED_MAPS_PER_BLOCK * nested_param_count(sizes, bias=False) * num_blocks
    return 3 * forward_per_position * batch * length


def gpu_machine() -> str:
    """The host as the other benches describe it, plus its GPUs and CUDA."""
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return f"{machine()}; {len(names)} x {names[0]} ({memory:.0f} GiB), CUDA {torch.version.cuda}"


def record_name(device_name: str, count: int) -> str:
    """``h100-80gb-hbm3-x8.json`` for 8 x "NVIDIA H100 80GB HBM3": a rerun on the same kind replaces it."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower().removeprefix("nvidia ")).strip("-")
    return f"{slug}-x{count}.json"


# ------------------------------------------------------------------------------------------ the trainer


def run(command: list[str], log_path: str) -> tuple[int, float]:
    """Run ``command`` in the repository, its output into ``log_path``; (exit code, wall seconds)."""
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - started


def train_command(nproc: int, workdir: str, data: str, overrides: list[str], *job: str) -> list[str]:
    """The trainer's command line: configs/gpu-smoke.yaml, the user's ``overrides``, then this job's."""
    command = [os.path.join(BIN, "torchrun"), "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "trainer.cli", "train", "--config", CONFIG, f"data.path={data}"]
    command += [f"run.out_dir={workdir}", "run.name=gpu-smoke", f"train.max_steps={MAX_STEPS}"]
    return command + overrides + list(job)


def table_shards(run_dir: str) -> dict[str, dict]:
    """Per table, its sharding type, compute kernel and the placements of its shards, read from the
    plan the trainer writes (sharding_plan.txt: TorchRec's tables, one row per table, then per shard)."""
    path = os.path.join(run_dir, "sharding_plan.txt")
    tables: dict[str, dict] = {}
    for line in open(path).read().splitlines() if os.path.exists(path) else []:
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) != 4 or cells[0] in ("param", "") or set(cells[0]) == {"-"}:
            continue
        if cells[1].endswith(("_wise", "data_parallel")):  # param | sharding type | compute kernel | ranks
            tables[cells[0]] = {"sharding": cells[1], "kernel": cells[2], "placements": []}
        elif cells[0] in tables:  # param | shard offsets | shard sizes | placement
            tables[cells[0]]["placements"].append(cells[3])
    return tables


def trainer_facts(run_dir: str) -> dict:
    lines = log_lines(run_dir) if os.path.isdir(run_dir) else []
    text = "\n".join(lines)
    metrics_path = os.path.join(run_dir, "metrics.json")
    metrics = json.load(open(metrics_path)) if os.path.exists(metrics_path) else {}
    return {
        "tables": table_shards(run_dir),
        "resumed_at_step": [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", text)],
        "stopped_at_step": [int(m) for m in re.findall(r"run.stop_after_steps reached at step (\d+)", text)],
        "steps_per_s": [float(m) for m in re.findall(r"\(([\d.]+) steps/s\)", text)],
        "peak_rss_mib": [float(m) for m in re.findall(r"peak RSS (\d+) MiB", text)],
        "steps": metrics.get("steps"),
        "test": metrics.get("test"),
        "most_popular": metrics.get("most_popular"),
    }


# ------------------------------------------------------------------------------------------ the trunk


def time_trunk(model: FMRLConfig, batch: int, length: int, steps: int) -> dict:
    """Median seconds of one training step of the LRU trunk alone on cuda:0 under bf16 autocast."""
    from models.fmrl.model import LRUTrunk
    from sharding.optim import build_optimizer

    torch.manual_seed(0)
    device = torch.device("cuda", 0)
    trunk = LRUTrunk(model).to(device)
    optimizer = build_optimizer(trunk, 1e-4, 0.01, fused=True)
    x = torch.randn(batch, length, model.dim, device=device)  # (B, L, D)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)  # (B, L)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = trunk(x, mask)  # (B, L, D)
        out.float().square().mean().backward()
        optimizer.step()

    for _ in range(3):  # warm-up: kernels chosen, allocator and optimizer state in place
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {"step_s": statistics.median(times), "min_s": min(times), "steps": steps}


def trunk_figures(step_s: float, flops: int, device_name: str) -> dict:
    """FLOP/s and MFU of a trunk step of ``flops`` model FLOPs taking ``step_s`` seconds on one GPU named
    ``device_name``; without a known peak the MFU is None, with a note saying why."""
    peak = peak_bf16_flops(device_name)
    figures = {
        "step_s": step_s,
        "flops_per_step": flops,
        "tflops_per_s": flops / step_s / 1e12,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "mfu": flops / (step_s * peak) if peak else None,
    }
    if peak is None:
        figures["note"] = f"MFU omitted: no peak bf16 FLOP/s known for {device_name!r} (PEAK_BF16_FLOPS)"
    return figures


def describe_trunk(trunk: dict, batch: int, length: int) -> str:
    if "error" in trunk:
        return f"not timed: {trunk['error']}"
    mfu = f"MFU {trunk['mfu']:.1%}" if trunk["mfu"] is not None else trunk["note"]
    return (
        f"{trunk['step_s'] * 1e3:.2f} ms/step at batch {batch} x length {length}, "
        f"{trunk['tflops_per_s']:.1f} TFLOP/s, {mfu}"
    )


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "bench", "gpu-smoke"))
    parser.add_argument("--record", help="the record's path (default bench/results/gpu/<gpu>-x<count>.json)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help=f"config overrides for both trainer jobs and the trunk's timing (of {CONFIG})",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench/gpu_smoke.py needs CUDA (torch.cuda.is_available() is False here): nothing run or written"
        )
        return 0

    from trainer.config import ConfigError, load_config

    try:
        cfg = load_config(os.path.join(REPO, CONFIG), args.overrides)
    except ConfigError as e:  # a bad KEY=VALUE: one line, exit 2
        parser.error(str(e))
    sizes, blocks = list(cfg.model.nested_sizes), cfg.model.num_blocks
    batch, length = cfg.train.batch_size, cfg.train.max_len
    nproc = torch.cuda.device_count()
    device_name = torch.cuda.get_device_name(0)
    record_path = args.record or os.path.join(HERE, "results", "gpu", record_name(device_name, nproc))
    workdir = os.path.abspath(args.workdir)
    data = os.path.join(workdir, "data")
    run_dir = os.path.join(workdir, "gpu-smoke")
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    phases: dict[str, float] = {}
    codes: dict[str, int] = {}

    if not os.path.exists(os.path.join(data, "dataset.json")):
        command = [os.path.join(BIN, "fmrl"), "data", "prepare-synthetic-scale", data, *CATALOG]
        codes["prepare"], phases["prepare_s"] = run(command, os.path.join(workdir, "prepare.out"))
    if codes.get("prepare", 0) == 0:
        stop = [f"run.stop_after_steps={STOP_AT}", "run.overwrite=true"]  # overwrite: a rerun starts afresh
        first = train_command(nproc, workdir, data, args.overrides, *stop)
        codes["train"], phases["train_s"] = run(first, os.path.join(workdir, "train.out"))
    if codes.get("train") == 0:
        resumed = train_command(nproc, workdir, data, args.overrides, "run.resume=auto")
        codes["resume"], phases["resume_s"] = run(resumed, os.path.join(workdir, "resume.out"))
    facts = trainer_facts(run_dir)

    try:
        timing = time_trunk(cfg.model, batch, length, steps=20)
        flops = trunk_flops_per_step(sizes, blocks, batch, length)
        trunk = {**timing, **trunk_figures(timing["step_s"], flops, device_name)}
    except Exception as e:  # noqa: BLE001 - kept in the record: a first GPU run's failure is what it is for
        trunk = {"error": f"{type(e).__name__}: {e}"}
    phases["total_s"] = time.perf_counter() - started

    tables = facts["tables"].values()
    checks = {
        "trainer exited 0 (stop, then resume)": codes.get("train") == 0 and codes.get("resume") == 0,
        f"stopped at step {STOP_AT} with a checkpoint": STOP_AT in facts["stopped_at_step"],
        f"resumed at step {STOP_AT}": STOP_AT in facts["resumed_at_step"],
        f"finished at step {MAX_STEPS} with test metrics": facts["steps"] == MAX_STEPS
        and bool(facts["test"]),
        "every table row-wise sharded on the GPUs, fused optimizer": bool(tables)
        and all(
            t["sharding"] == "row_wise"
            and t["kernel"].startswith("fused")  # fused, or a fused UVM-caching kernel
            and t["placements"]
            and all("cuda" in p for p in t["placements"])
            for t in tables
        ),
        "trunk timed": "error" not in trunk,
        f"under {TIME_BUDGET_S} s": phases["total_s"] < TIME_BUDGET_S,
    }
    record = {
        "command": "python bench/gpu_smoke.py " + " ".join(sys.argv[1:]),
        "machine": gpu_machine(),
        "date": time.strftime("%Y-%m-%d"),
        "config": CONFIG,
        "overrides": args.overrides,
        "ranks": nproc,
        "catalog": list(CATALOG),
        "stop_at": STOP_AT,
        "max_steps": MAX_STEPS,
        "exit_codes": codes,
        "phases": phases,
        "checks": checks,
        "trainer": facts,
        "trunk": {"sizes": sizes, "blocks": blocks, "batch": batch, "length": length, **trunk},
    }
    os.makedirs(os.path.dirname(os.path.abspath(record_path)), exist_ok=True)
    write_json(record_path, record)
    for name, passed in checks.items():
        print(f"{'ok  ' if passed else 'FAIL'} {name}")
    print(f"trainer: steps/s per rank {facts['steps_per_s']}; total {phases['total_s']:.0f} s")
    print(f"trunk: {describe_trunk(trunk, batch, length)}")
    print(f"record: {record_path}")
    if not all(checks.values()):
        print(f"see the logs in {workdir} (prepare.out, train.out, resume.out) and {run_dir}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
