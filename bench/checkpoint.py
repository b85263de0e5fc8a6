"""Sharded-checkpoint save and load (trainer/checkpoint.py) on CPU: time and bytes, local disk and S3
(a moto server on 127.0.0.1), synchronous and asynchronous saves, on 1 and 2 ranks.

    .venv/bin/python bench/checkpoint.py                 # about 5 minutes; writes docs/benchmarks.md
    .venv/bin/python bench/checkpoint.py --quick --no-write

Each (configuration, ranks) pair is one ``torchrun --standalone --nproc_per_node=R bench/checkpoint.py
--worker ...`` job (this script is its own worker) with 2 // R torch threads per rank, as in
bench/scaling.py. Every rank builds the model with random frozen tables of the right shapes (they are not
in checkpoints), shards it with ``parallelize_fmrl`` (FSDP2, TorchRec) and trains a few steps
(``forward_backward`` + ``micro_step``) on random batches so that the optimizer state exists. Then, for
local disk and for S3, through one ``CheckpointManager``:
* one untimed save first (imports, the manager's gloo group, the S3 connection);
* synchronous saves: ``save(step, TrainingState(...), blocking=True)`` until the COMMIT marker is
  written (bytes from the marker);
* loads into a second, freshly built model, as a resume does: the ``TrainingState`` of that model,
  ``load`` (which first checks every file's size and sha256 against the marker), ``load_state_dict``;
  the loaded weights are then compared with the saved ones;
* asynchronous saves: the seconds ``save(blocking=False)`` blocks (copying the state to CPU memory),
  the seconds until the background thread has committed, and the training steps run meanwhile, against
  steps run just before with no save in flight.
A time is the slowest rank's. The S3 server is one moto process, started by this script, that keeps
every object in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from data import DEMO_CONFIG, DEMO_ITEMS, DEMO_SEQ_LEN, moto_server  # bench/ is on sys.path
from scaling import QUIET_CORES, wait_quiet
from trunk import machine, write_section

from trainer.process_exit import run_as_process

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BEGIN, END = "<!-- bench/checkpoint.py:begin -->", "<!-- bench/checkpoint.py:end -->"
CORES = 2
"""The cores the ranks share out (the VM's); threads per rank = CORES // ranks."""
BUCKET = "bench-checkpoints"
CONFIGS = {
    # configs/demo.yaml over the demo's catalog; no ID table (the demo has none)
    "demo": dict(
        path=DEMO_CONFIG,
        overrides=[],
        num_items=DEMO_ITEMS,
        text_dim=384,  # MiniLM
        image_dim=1280,  # EfficientNet-Lite0
        batch=32,  # demo.yaml's, per rank
    ),
    # configs/beauty.yaml (nested sizes up to 1024, 2 blocks) over Amazon Beauty 5-core's 12,101 items,
    # with a learnable ID table, so that a TorchRec table and its fused Adagrad state are checkpointed
    "beauty": dict(
        path=os.path.join(REPO, "configs", "beauty.yaml"),
        overrides=["model.use_id_embedding=true"],
        num_items=12101,
        text_dim=1024,  # bge-large-en-v1.5, beauty.yaml's text encoder
        image_dim=1280,
        # per rank; beauty.yaml's 32 makes a full-softmax step 4-6 s here: too few steps would overlap a
        # save, and the bench would take too long (the checkpoint does not depend on the batch)
        batch=8,
    ),
}
SEQ_LEN = DEMO_SEQ_LEN
"""Items per training sequence (5..30), for both configurations."""
REPEATS = {
    # warm-up steps, sync saves, loads, async saves, steps before each async save
    "full": dict(warm_up=2, saves=3, loads=3, async_saves=3, base_steps=2),
    "quick": dict(warm_up=1, saves=1, loads=1, async_saves=1, base_steps=1),
}
MAX_FLIGHT_STEPS = 200
"""Steps run while an asynchronous save is in flight stop here at the latest (a stuck save)."""
QUIET_WAIT_S = 10.0


# --------------------------------------------------------------------------------------------- worker


class _NoLoader:
    """Stands in for the TrainLoader in the ``TrainingState``: the bench has no data files."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def resume(self, states: list[dict[str, Any]]) -> bool:
        return True


class _NegativesRNG:
    """Stands in for the task in the ``TrainingState``: its rank state is a sampler's RNG, as FMRLTask's."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def rank_state(self) -> dict[str, Any]:
        return {"negatives_rng": self.generator.get_state().tolist()}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(torch.tensor(state["negatives_rng"], dtype=torch.uint8))


def build(cfg: Any, spec: dict, device: torch.device, seed: int, world_size: int) -> Any:
    """The model of ``cfg`` over random frozen tables, sharded as the trainer does."""
    from models.fmrl import FMRLRec
    from sharding.fmrl import parallelize_fmrl

    torch.manual_seed(seed)  # the same model on every rank
    n = spec["num_items"]
    text, image = torch.randn(n + 1, spec["text_dim"]), torch.randn(n + 1, spec["image_dim"])
    text[0] = image[0] = 0
    model = FMRLRec(cfg.model, n, text, image)
    del text, image
    optim = dataclasses.replace(cfg.optim, grad_accum_steps=1)
    return parallelize_fmrl(
        model, cfg.parallel, optim, total_steps=1000, micro_batch_size=spec["batch"], device=device
    )


def slowest(seconds: float) -> float:
    """The largest of every rank's ``seconds``."""
    import torch.distributed as dist

    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value[0])


def worker(config_name: str, roots: list[tuple[str, str]], mode: str) -> dict | None:
    """One rank's share of a job: ``roots`` are (storage label, checkpoint root) pairs. Rank 0 returns
    the results, other ranks None."""
    import torch.distributed as dist

    from data_pipeline.sequences import collate_next_item
    from data_pipeline.storage import StorageOptions, remove
    from trainer.checkpoint import CheckpointManager, TrainingState
    from trainer.config import config_to_dict, load_config
    from trainer.dist import distributed
    from trainer.state import EarlyStopping, Progress, RankPositions, RunState
    from trainer.tasks.fmrl import StepInputs, forward_backward

    r = REPEATS[mode]
    spec = CONFIGS[config_name]
    with distributed() as (world, device):
        torch.set_num_threads(max(1, CORES // world.world_size))
        cfg = load_config(spec["path"], spec["overrides"])
        n = spec["num_items"]
        parallel = build(cfg, spec, device, cfg.train.seed, world.world_size)
        trainable = parallel.model.num_parameters()
        inputs = StepInputs(
            sizes=list(cfg.model.nested_sizes),
            num_items=n,
            loss_kind="full",
            chunk_mb=cfg.model.loss_chunk_mb,
            sampler=None,
            generator=torch.Generator().manual_seed(world.rank),
            device=device,
        )
        rng = np.random.default_rng(world.rank)
        low, high = SEQ_LEN
        batches = [
            collate_next_item(
                [rng.integers(1, n + 1, rng.integers(low, high + 1)) for _ in range(spec["batch"])],
                cfg.train.max_len,
            )
            for _ in range(4)
        ]
        progress = Progress()
        identity = {"config": config_to_dict(cfg), "num_items": n, "best_step": 0}

        def step() -> float:
            """One training step; its seconds on this rank."""
            start = time.perf_counter()
            forward_backward(parallel, batches[progress.steps % len(batches)], inputs)
            parallel.micro_step(True)
            progress.steps += 1
            return time.perf_counter() - start

        def state_of(model: Any) -> TrainingState:
            """What the trainer saves: the model, the run's progress, every rank's position."""
            run = RunState(progress, EarlyStopping(patience=cfg.train.patience), world.world_size)
            positions = RankPositions(
                _NoLoader(), _NegativesRNG(inputs.generator), world.rank, world.world_size
            )
            return TrainingState(model=model, run=run, positions=positions)

        parallel.set_training(True)
        for _ in range(r["warm_up"]):
            step()
        fresh = build(cfg, spec, device, cfg.train.seed + 1, world.world_size)  # the model loads go into
        out: list[dict] = []
        for storage, root in roots:
            options = StorageOptions.from_env() if root.startswith("s3://") else None
            # the trainer's keep_last: once it holds that many, a save also deletes the oldest
            manager = CheckpointManager(root, options, keep_last=cfg.run.keep_checkpoints)
            # untimed and tiny: imports, the manager's gloo group, the first S3 connection (pruned later)
            manager.save(0, {"warm_up": torch.zeros(1)}, identity)
            save_s = []
            for i in range(r["saves"]):
                state = state_of(parallel).state_dict()  # gathered before the clock starts, as before
                dist.barrier()
                start = time.perf_counter()
                url = manager.save(progress.steps + 1 + i, state, identity)
                save_s.append(slowest(time.perf_counter() - start))
            marker = manager.marker(url)
            saved = parallel.snapshot()

            load_s = []
            for _ in range(r["loads"]):
                dist.barrier()
                start = time.perf_counter()
                manager.load(url, state_of(fresh))
                load_s.append(slowest(time.perf_counter() - start))
            same = all(torch.equal(a, b) for a, b in zip(saved, fresh.snapshot(), strict=True))
            same = slowest(0.0 if same else 1.0) == 0.0
            del saved

            staging_s, commit_s, base_steps, flight_steps = [], [], [], []
            for _ in range(r["async_saves"]):
                base_steps += [step() for _ in range(r["base_steps"])]
                state = state_of(parallel).state_dict()
                committed: list[float] = []
                dist.barrier()
                start = time.perf_counter()
                manager.save(progress.steps + 1000, state, identity, blocking=False)
                staging_s.append(slowest(time.perf_counter() - start))
                del state
                # the manager's one save in flight: stamp the moment its background thread has committed
                assert manager._pending is not None
                manager._pending.future.add_done_callback(
                    lambda _, stamps=committed: stamps.append(time.perf_counter())
                )
                flight_steps.append([])
                for _ in range(MAX_FLIGHT_STEPS):
                    flight_steps[-1].append(step())
                    # every rank must run as many steps (they are collective): stop when all are done
                    done = torch.tensor([1 if committed else 0])
                    dist.all_reduce(done, op=dist.ReduceOp.MIN)
                    if done[0]:
                        break
                manager.wait()
                commit_s.append(slowest(committed[0] - start))
            manager.close()
            dist.barrier()
            if world.rank == 0:
                if options is None:
                    shutil.rmtree(root)
                else:
                    remove(root, options, recursive=True)
            gathered: list[Any] = [None] * world.world_size
            dist.all_gather_object(gathered, (base_steps, flight_steps))
            flight_slowest = [
                [max(t) for t in zip(*per_rank)] for per_rank in zip(*(g[1] for g in gathered))
            ]  # per async save, each step's slowest rank
            out.append(
                dict(
                    storage=storage,
                    bytes=marker["bytes"],
                    files=len(marker["files"]),
                    save_s=save_s,
                    load_s=load_s,
                    loaded_equal=same,
                    staging_s=staging_s,
                    commit_s=commit_s,
                    # a step's time is the slowest rank's
                    base_step_s=[max(t) for t in zip(*(g[0] for g in gathered))],
                    flight_step_s=flight_slowest,
                )
            )
        if world.rank != 0:
            return None
        return dict(
            config=config_name,
            ranks=world.world_size,
            threads=torch.get_num_threads(),
            trainable_params=trainable,
            batch=spec["batch"],
            results=out,
        )


# --------------------------------------------------------------------------------------------- driver


def launch(config: str, ranks: int, s3_root: str, env: dict[str, str], quick: bool) -> dict:
    """Run one job (local disk, then S3) under torchrun and return rank 0's JSON line."""
    local_root = tempfile.mkdtemp(prefix="bench-checkpoint-")
    try:
        roots = [("local", os.path.join(local_root, "ckpt")), ("s3", f"{s3_root}/{config}-{ranks}r")]
        runner = os.path.join(os.path.dirname(sys.executable), "torchrun")
        command = [
            runner,
            "--standalone",
            f"--nproc_per_node={ranks}",
            __file__,
            "--worker",
            config,
            json.dumps(roots),
        ] + (["--quick"] if quick else [])
        env = {**env, "OMP_NUM_THREADS": str(max(1, CORES // ranks))}
        idle_before = 0.0 if quick else wait_quiet(QUIET_WAIT_S)
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(
                f"{config} on {ranks} rank(s) failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
            )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1])
        result["wall_s"] = wall
        result["others_cores_before"] = idle_before
        return result
    finally:
        shutil.rmtree(local_root, ignore_errors=True)


def summary(job: dict, r: dict) -> dict:
    """Medians of one (job, storage) row."""
    base = statistics.median(r["base_step_s"])
    flight = statistics.median(t for steps in r["flight_step_s"] for t in steps)
    # training time an async save costs: its in-flight steps less as many steps without a save
    lost = statistics.median(sum(steps) - len(steps) * base for steps in r["flight_step_s"])
    return dict(
        config=job["config"],
        ranks=job["ranks"],
        threads=job["threads"],
        storage=r["storage"],
        mb=r["bytes"] / 1e6,
        files=r["files"],
        save_s=statistics.median(r["save_s"]),
        load_s=statistics.median(r["load_s"]),
        loaded_equal=r["loaded_equal"],
        staging_s=statistics.median(r["staging_s"]),
        commit_s=statistics.median(r["commit_s"]),
        base_ms=base * 1e3,
        flight_ms=flight * 1e3,
        flight_steps=statistics.mean(len(steps) for steps in r["flight_step_s"]),
        overhead=flight / base,
        lost_s=lost,
        repeats=(len(r["save_s"]), len(r["load_s"]), len(r["commit_s"])),
    )


def row(s: dict) -> str:
    storage = "S3 (moto)" if s["storage"] == "s3" else "local disk"
    return (
        f"| {s['config']} | {s['ranks']} | {storage} | {s['mb']:.1f} ({s['files']}) | {s['save_s']:.2f} "
        f"| {s['load_s']:.2f} | {s['staging_s']:.2f} | {s['commit_s']:.2f} | {s['base_ms']:.0f} "
        f"| {s['flight_ms']:.0f} ({s['flight_steps']:.1f}) | {s['overhead']:.2f}x | {s['lost_s']:.2f} |"
    )


def render(jobs: list[dict], command: str, wall_s: float) -> str:
    rows = [summary(job, r) for job in jobs for r in job["results"]]
    saves, loads, async_saves = rows[0]["repeats"] if rows else (0, 0, 0)
    params = {job["config"]: job["trainable_params"] / 1e6 for job in jobs}
    batch = {job["config"]: job["batch"] for job in jobs}
    described = []
    if "demo" in params:
        described.append(
            f"*demo*: configs/demo.yaml's model (nested sizes [8..128], 2 blocks) over {DEMO_ITEMS} items, "
            f"{params['demo']:.2f}M trainable parameters, no ID table"
        )
    if "beauty" in params:
        described.append(
            "*beauty*: configs/beauty.yaml's model (nested sizes [8..1024], 2 blocks) over Amazon Beauty's "
            f"{CONFIGS['beauty']['num_items']:,} items with a learnable ID table (`model.use_id_embedding="
            f"true`, TorchRec, fused Adagrad), {params['beauty']:.2f}M trainable parameters"
        )
    lines = [
        BEGIN,
        "## Checkpoints: save and load (`bench/checkpoint.py`)",
        "",
        f"Command: `{command}` ({wall_s / 60:.1f} min wall)  ",
        f"Machine: {machine()}  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
        "Sharded DCP checkpoints through `trainer.checkpoint.CheckpointManager`, of the state a training "
        "run saves (the trainer's `TrainingState`: dense weights and AdamW state as FSDP2 DTensors, the ID "
        "table and its optimizer state as TorchRec ShardedTensors, the schedule, per-rank RNG positions; "
        f"frozen feature tables are not in checkpoints). {'; '.join(described)}. Every rank builds the model "
        "with random frozen tables and trains a few steps on random batches (sequences of "
        f"{SEQ_LEN[0]}..{SEQ_LEN[1]} items, {', '.join(f'{b} per rank ({c})' for c, b in batch.items())}; "
        "full softmax) first, so that the optimizer state exists. Each (configuration, ranks) pair is one "
        f"torchrun job with {CORES} // ranks torch threads per rank, and saves to the local disk and then "
        "to S3: a moto server on 127.0.0.1 (one process on the same 2 cores, objects kept in memory).",
        "",
        "* *MB (files)*: the committed checkpoint, from its COMMIT marker (all ranks' `.distcp` files and "
        "`.metadata`).",
        f"* *sync save*: `save(blocking=True)` until COMMIT is written (DCP write, fsync on local disk, "
        f"sha256 of every file read back, marker), median of {saves}.",
        f"* *load*: into a freshly built model, as a resume does: its `TrainingState`, `load` (which checks "
        f"every file's size and sha256 before DCP reads it), `load_state_dict`; median of {loads}. The "
        "loaded weights equal the saved ones"
        + ("" if all(s["loaded_equal"] for s in rows) else " **in some rows only (see the log)**")
        + ".",
        f"* *async*: `save(blocking=False)`, median of {async_saves}: *blocks* is the time the call takes "
        "(copying the state to new CPU memory); *committed* the time from the call until the background "
        "thread has written, verified and committed, while training goes on; *step* the median training "
        "step with no save in flight, and *during save* the median of the steps started while one was in "
        "flight (in brackets: steps per save); *overhead* = during / without; *training time lost*: the "
        "in-flight steps' time less as many steps without a save, per save (to compare with *sync save*, "
        "which training loses entirely).",
        "",
        "A time is the slowest rank's. Save and load figures are seconds."
        + (
            ""
            if "--quick" in command
            else f" Before each job the script waited (at most {QUIET_WAIT_S:.0f} s) for other processes to "
            f"use less than {QUIET_CORES} cores; they used "
            + ", ".join(f"{j['others_cores_before']:.2f}" for j in jobs)
            + " cores when the jobs started (another engineer's work on the same VM shows up as noise)."
        ),
        "",
        "| config | ranks | storage | MB (files) | sync save | load | async: blocks | async: committed "
        "| step (ms) | step during save (ms) | step overhead | training time lost |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(row(s) for s in rows),
    ]
    lines += ["", *notes(rows, jobs)]
    lines.append(END)
    return "\n".join(lines)


def notes(rows: list[dict], jobs: list[dict]) -> list[str]:
    """The reading of the table, worded from its own numbers."""
    if not rows:
        return []
    by_key = {(s["config"], s["ranks"], s["storage"]): s for s in rows}
    out = []
    ratios = [
        (key[0], key[1], by_key[(*key[:2], "s3")]["save_s"] / s["save_s"])
        for key, s in by_key.items()
        if key[2] == "local" and (*key[:2], "s3") in by_key
    ]
    if ratios:
        out.append(
            "- **S3 vs local disk.** S3 / local sync-save time: "
            + ", ".join(f"{c} {k} rank(s) {x:.1f}x" for c, k, x in ratios)
            + ". moto runs on 127.0.0.1 and keeps objects in memory, so this is the cost of the S3 protocol "
            "path (boto3/s3fs HTTP, multipart uploads, moto's own request handling on the same 2 cores, and "
            "reading every file back for its sha256), not of a network; a real bucket adds bandwidth and "
            "latency. Local saves fsync every file to the VM's virtual disk."
        )
    overheads = sorted(rows, key=lambda s: s["overhead"])
    worst, best = overheads[-1], overheads[0]
    out.append(
        f"- **Async saves.** The call blocks for {min(s['staging_s'] for s in rows):.2f}-"
        f"{max(s['staging_s'] for s in rows):.2f} s (a copy of the state in memory) instead of the whole "
        f"sync save, but the steps run meanwhile are {best['overhead']:.2f}x-{worst['overhead']:.2f}x as "
        f"long (worst: {worst['config']}, {worst['ranks']} rank(s), {worst['storage']}). The background "
        "thread's serialisation, sha256 and HTTP work run in the same process as training and hold the GIL "
        "for their Python parts; on this 2-core VM it competes with the training threads (and, for S3, with "
        "the moto server) for the same cores, so the overhead here is an upper bound of what a machine with "
        "spare cores would see. Training time lost per async save against a sync save's: "
        + ", ".join(
            f"{s['config']} {s['ranks']} rank(s) {s['storage']} {s['lost_s']:.2f} vs {s['save_s']:.2f} s"
            for s in rows
        )
        + "."
    )
    out.append(
        "- **Load** includes reading every file once more for the sha256 check before DCP reads it, and "
        "local reads come from the page cache (the checkpoint was just written), so a local load is DCP's "
        "planning, deserialisation and hashing, not disk reads; a cold disk or a remote bucket pays the read "
        "twice."
    )
    if any(job["ranks"] == 2 for job in jobs):
        out.append(
            "- **2 ranks** write one `.distcp` file each (in parallel) but each has one core, and the 2-rank "
            "jobs also run the checkpoint's collectives (planning, the marker's gather, barriers) over gloo; "
            "on 2 cores this shows the sharded path works at about the same bytes, not a speed-up."
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", help=f"comma-separated, of {', '.join(CONFIGS)}; default: all (demo with --quick)"
    )
    parser.add_argument("--ranks", help="comma-separated; default 1,2 (1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="demo on 1 rank, one repeat of everything")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "ROOTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    if args.worker:
        config, roots = args.worker
        result = worker(config, [tuple(x) for x in json.loads(roots)], mode)
        if result is not None:
            print(json.dumps(result), flush=True)
        return

    started = time.perf_counter()
    configs = (args.configs or ("demo" if args.quick else ",".join(CONFIGS))).split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configurations {unknown}: {', '.join(CONFIGS)}")
    ranks = [int(x) for x in (args.ranks or ("1" if args.quick else "1,2")).split(",")]
    jobs = []
    with moto_server() as options:
        from data_pipeline.storage import filesystem

        fs, _ = filesystem(f"s3://{BUCKET}", options)
        fs.call_s3("create_bucket", Bucket=BUCKET)  # not fs.mkdir: moto rejects its LocationConstraint
        # the workers read the server and its (dummy) credentials from the environment, never from argv
        env = {
            **os.environ,
            "FSSPEC_S3_ENDPOINT_URL": options.endpoint_url or "",
            "AWS_ACCESS_KEY_ID": options.key or "",
            "AWS_SECRET_ACCESS_KEY": options.secret or "",
            "AWS_DEFAULT_REGION": options.region or "",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.pop(name, None)
        for config in configs:
            for r in ranks:
                job = launch(config, r, f"s3://{BUCKET}", env, args.quick)
                jobs.append(job)
                for res in job["results"]:
                    print(row(summary(job, res)), f"({job['wall_s']:.0f} s job)", flush=True)
    command = "python bench/checkpoint.py" + (" --quick" if args.quick else "")
    section = render(jobs, command, time.perf_counter() - started)
    print(section)
    if not args.no_write:
        write_section(args.output, section, BEGIN, END)


if __name__ == "__main__":
    run_as_process(main)  # trainer/process_exit.py: why a gloo process exits this way
