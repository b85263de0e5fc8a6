"""Click-through-rate training of DLRM on one or many ranks: the same trainer, launchers and checkpoints as
fMRLRec (``task: dlrm`` in the config; ``trainer.train.train`` dispatches here).

    fmrl data prepare-synthetic-ctr runs/data/synthetic-ctr                 # the embedded CTR data set
    fmrl train --config configs/dlrm-synthetic.yaml                         # one process
    torchrun --nproc_per_node=2 -m trainer.cli train --config configs/dlrm-synthetic.yaml

TorchRec shards the embedding tables and the dense MLPs run under ``parallel.backend``
(sharding/dlrm.py); every rank reads its own shards of the ``train`` split (:class:`CTRTrainLoader`, the
same resumable machinery as the sequence loader) and the loss is binary cross-entropy. After every epoch
the validation split gives ROC AUC and log loss, early stopping follows the validation AUC, and the
epoch's checkpoint holds the exact position (loaders, RNG, steps, losses, early-stopping state). At the
end the best model is tested against the constant predictor (the training click rate): its log loss is
the denominator of the normalised entropy (NE, He et al. 2014), so NE < 1 means the model has learnt
something beyond the base rate.

Rank 0 writes the run directory: the resolved config, the TorchRec plan, TensorBoard scalars, the best
model's weights (safetensors), metrics.json and test_metrics.txt.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_pipeline.criteo import CTRBatch, CTRDataset, iter_ctr_batches
from data_pipeline.loader import CTRTrainLoader
from data_pipeline.storage import StorageOptions
from models.dlrm import DLRM, ctr_loss, roc_auc
from sharding.dlrm import ParallelDLRM, parallelize_dlrm
from sharding.world import World, set_cpu_threads
from trainer.checkpoint import CheckpointError, CheckpointManager
from trainer.config import Config, config_to_dict, dump_config
from trainer.dist import all_reduce_sum
from trainer.preemption import StopRequest
from trainer.train import (
    _SHAPING_KEYS,
    Progress,
    make_run_dir,
    save_weights,
    seed_everything,
    storage_options,
    write_json,
)

log = logging.getLogger("fmrl")

EARLY_STOPPING_METRIC = "auc"


@dataclass
class CTRRunResult:
    run_dir: str
    best_epoch: int
    steps: int
    train_losses: list[float] = field(default_factory=list)
    """Loss of every optimizer step (mean BCE over all ranks' impressions), in order."""
    valid_metrics: dict[str, float] = field(default_factory=dict)
    """Validation metrics of the best epoch: auc, logloss."""
    test_metrics: dict[str, float] = field(default_factory=dict)
    """Test metrics of the best model: auc, logloss, ne (normalised entropy)."""
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    """Test metrics of the constant predictor (the training click rate)."""
    train_seconds: float = 0.0
    """Wall time of the optimisation steps (evaluation excluded)."""
    peak_rss_mib: float = 0.0
    """This rank's peak resident memory."""
    stopped: bool = False
    """The job ended early (run.stop_after_steps or a stop request) after saving a checkpoint."""


def forward_backward(parallel: ParallelDLRM, batch: CTRBatch, world_size: int) -> tuple[float, int]:
    """Forward and backward of one micro-batch. Returns this rank's BCE sum and impression count.

    The loss is scaled by this rank's share of the global batch, so that averaging the gradients over
    ranks (DDP, FSDP2, ZeRO; TorchRec divides the table gradients by the world size too) gives exactly
    the gradient of the mean over the global batch, also when the ranks' last batches differ in size."""
    count = len(batch.labels)
    global_count = float(all_reduce_sum(torch.tensor([count]))[0])
    logits = parallel.forward(batch.dense, batch.sparse)  # (B,)
    loss = ctr_loss(logits, batch.labels.to(logits.device))
    parallel.backward(loss * (count * world_size / global_count))
    return float(loss.detach()) * count, count


def evaluate_ctr(
    parallel: ParallelDLRM,
    url: str,
    split: str,
    batch_size: int,
    world: World,
    options: StorageOptions | None = None,
) -> dict[str, float]:
    """ROC AUC and mean log loss of ``split``, exact over all its impressions. Every rank reads the split
    in order and scores rows r, r+W, ... of each global batch (the lookups are collective); the scores
    are gathered. The AUC is NaN if the split has one class only."""
    scores, labels = [], []
    parallel.set_training(False)
    with torch.no_grad():
        for batch in iter_ctr_batches(url, split, batch_size * world.world_size, options=options):
            rows = torch.arange(world.rank, len(batch.labels), world.world_size)
            empty = len(rows) == 0
            if empty:  # the last global batch may leave a rank without rows: it still joins the lookup
                rows = torch.zeros(1, dtype=torch.int64)
            logits = parallel.forward(batch.dense[rows], batch.sparse[rows]).cpu()
            if not empty:
                scores.append(logits)
                labels.append(batch.labels[rows])
    parallel.set_training(True)
    mine = (torch.cat(scores).numpy(), torch.cat(labels).numpy()) if scores else None
    parts: list[Any] = [None] * world.world_size
    dist.all_gather_object(parts, mine)
    logits = torch.from_numpy(np.concatenate([p[0] for p in parts if p is not None]))
    clicks = torch.from_numpy(np.concatenate([p[1] for p in parts if p is not None]))
    logloss = float(ctr_loss(logits.double(), clicks))
    try:
        auc = roc_auc(logits, clicks)
    except ValueError:
        auc = float("nan")
    return {"auc": auc, "logloss": logloss, "impressions": float(len(clicks))}


def constant_logloss(train_rate: float, test_rate: float) -> float:
    """Mean log loss on a split with click rate ``test_rate`` of always predicting ``train_rate``."""
    p = min(max(train_rate, 1e-12), 1 - 1e-12)
    return -(test_rate * math.log(p) + (1 - test_rate) * math.log(1 - p))


def _score(metrics: dict[str, float]) -> float:
    """Early-stopping score: the AUC, or minus the log loss on a split with one class (no AUC)."""
    return metrics["auc"] if math.isfinite(metrics["auc"]) else -metrics["logloss"]


def train_dlrm(cfg: Config, world: World, device: torch.device, stop_request: StopRequest) -> CTRRunResult:
    """Train DLRM, early-stop on validation AUC, test the best model, write the report. Runs as one rank
    of a job whose process group is up (``trainer.train.train`` opens it)."""
    main = world.rank == 0
    seed_everything(cfg.train.seed)  # the same initial model on every rank
    threads = set_cpu_threads(cfg.train.num_threads, world)
    run_dir = make_run_dir(cfg.run.out_dir, cfg.run.name)
    if main:
        dump_config(cfg, os.path.join(run_dir, "config.yaml"))
    log.info(
        "rank %d/%d on %s, %d CPU threads, run directory %s",
        world.rank,
        world.world_size,
        device,
        threads,
        run_dir,
    )

    options = storage_options(cfg.data)
    dataset = CTRDataset.open(cfg.data.path, options)
    loader = CTRTrainLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        rank=world.rank,
        world_size=world.world_size,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor,
        options=options,
    )
    model_cfg = cfg.dlrm.model_config(
        num_dense=len(dataset.dense_features),
        hash_buckets=dataset.hash_buckets,
        feature_names=dataset.sparse_features,
    )
    model = DLRM(model_cfg)
    parameters = sum(p.numel() for p in model.parameters())
    accum = cfg.train.grad_accum_steps
    total_steps = sum(loader.steps_in_epoch(epoch) for epoch in range(cfg.train.epochs)) // accum
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    parallel = parallelize_dlrm(
        model,
        backend=cfg.parallel.backend,
        zero_stage=cfg.parallel.zero_stage,
        table_sharding=cfg.parallel.id_table_sharding,
        table_optimizer=cfg.parallel.id_table_optimizer,
        table_lr=cfg.parallel.id_table_lr or cfg.train.lr,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        warmup_steps=cfg.train.warmup_steps,
        total_steps=max(total_steps, 1),
        grad_clip=cfg.train.grad_clip,
        grad_accum_steps=accum,
        micro_batch_size=cfg.train.batch_size,
        precision=cfg.parallel.precision,
        device=device,
    )
    if main:
        plan = str(parallel.sparse.plan)
        log.info(
            "CTR data set %s: %d dense, %d categorical features, %s impressions; DLRM (%s interaction): "
            "%.2fM parameters; dense backend %s on %d rank(s); table plan:\n%s",
            dataset.url,
            len(dataset.dense_features),
            len(dataset.sparse_features),
            dataset.rows,
            model_cfg.interaction,
            parameters / 1e6,
            cfg.parallel.backend,
            world.world_size,
            plan,
        )
        with open(os.path.join(run_dir, "sharding_plan.txt"), "w") as f:
            f.write(plan + "\n")
    writer = None
    if cfg.run.tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def run_eval(split: str) -> dict[str, float]:
        return evaluate_ctr(parallel, dataset.url, split, cfg.eval.batch_size, world, options)

    result = CTRRunResult(run_dir=run_dir, best_epoch=0, steps=0)
    progress = Progress()
    checkpoints = CheckpointManager(
        cfg.run.checkpoint_dir or os.path.join(run_dir, "checkpoints"), options, cfg.run.keep_checkpoints
    )
    identity = {
        "config": config_to_dict(cfg),
        "num_dense": len(dataset.dense_features),
        "hash_buckets": dataset.hash_buckets,
    }

    def save_checkpoint() -> None:
        checkpoints.save(
            result.steps,
            training_state(parallel, loader, result, progress, world),
            {**identity, "best_step": progress.best_step},
            blocking=not cfg.run.async_checkpoint,
        )

    resume_url = checkpoints.latest() if cfg.run.resume == "auto" else cfg.run.resume
    best_state = None
    if resume_url:
        best_state = restore_training_state(
            checkpoints, resume_url, identity, parallel, loader, result, progress, world
        )
        if main:
            log.info("resumed from %s at step %d (epoch %d)", resume_url, result.steps, loader.epoch + 1)
    best_score, epochs_without_gain = progress.best_score, progress.epochs_without_gain
    if best_state is None:
        best_state = parallel.snapshot()
    stop_requested = False

    def stop_due() -> bool:
        limit = bool(cfg.run.stop_after_steps) and result.steps >= cfg.run.stop_after_steps
        return limit or stop_requested

    def stop_here() -> CTRRunResult:
        """End the job here: a committed checkpoint of this step, no final test."""
        save_checkpoint()  # a no-op when this step's checkpoint exists already
        checkpoints.close()
        if main and stop_requested and cfg.run.stop_file and os.path.exists(cfg.run.stop_file):
            os.remove(cfg.run.stop_file)  # consumed: tells the launcher the trainer did stop early
        if main:
            reason = "stop requested" if stop_requested else "run.stop_after_steps reached"
            log.info("%s at step %d: checkpoint saved; continue with run.resume=auto", reason, result.steps)
        result.stopped = True
        return result

    parallel.set_training(True)
    if stop_due():  # resumed at the limit: save in this job's layout, then stop
        return stop_here()
    micro, window = 0, [0.0, 0.0]  # micro-batches; (loss sum, impressions) of the current step, all ranks
    for epoch in range(loader.epoch + 1, cfg.train.epochs + 1):
        bar = tqdm(
            loader,
            total=loader.steps_in_epoch(loader.epoch),
            desc=f"epoch {epoch}",
            disable=not (cfg.run.progress_bar and main),
            leave=False,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )
        epoch_start, epoch_rows = time.perf_counter(), 0
        steps_before = result.steps - loader.batches_in_epoch // accum  # the epoch's first step
        batches_left = loader.steps_in_epoch(loader.epoch) - loader.batches_in_epoch
        for batch in bar:
            batches_left -= 1
            micro += 1
            boundary = micro % accum == 0
            parallel.set_grad_sync(boundary)
            loss_sum, count = forward_backward(parallel, batch, world.world_size)
            parallel.micro_step(boundary)
            window[0] += loss_sum
            window[1] += count
            if not boundary:
                continue
            # one all-reduce per step: the loss, its impressions, and whether any rank was asked to stop
            total = all_reduce_sum(torch.tensor([*window, float(stop_request.local())]))
            loss = float(total[0] / total[1])
            epoch_rows += int(total[1])
            stop_requested = stop_requested or bool(total[2] > 0)
            window = [0.0, 0.0]
            result.steps += 1
            result.train_losses.append(loss)
            throughput = epoch_rows / (time.perf_counter() - epoch_start)
            bar.set_postfix(loss=f"{loss:.4f}", rows_per_s=f"{throughput:.0f}", refresh=False)
            if writer is not None and result.steps % cfg.run.log_every == 0:
                writer.add_scalar("train/loss", loss, result.steps)
                writer.add_scalar("train/lr", parallel.last_lr(), result.steps)
                writer.add_scalar("train/impressions_per_s", throughput, result.steps)
            # the epoch's last step is checkpointed after validation (with the early-stopping state)
            if result.steps >= total_steps:
                break
            if batches_left == 0:
                continue  # the loader ends the epoch
            if cfg.run.checkpoint_every and result.steps % cfg.run.checkpoint_every == 0:
                save_checkpoint()
            if stop_due():
                return stop_here()

        epoch_seconds = time.perf_counter() - epoch_start
        result.train_seconds += epoch_seconds
        valid = run_eval("valid")
        score = _score(valid)
        if writer is not None:
            for name, value in valid.items():
                writer.add_scalar(f"valid/{name}", value, result.steps)
        improved = score > best_score
        if main:
            log.info(
                "epoch %d: loss %.4f, %.0f impressions/s, valid AUC %.4f, log loss %.4f%s",
                epoch,
                float(np.mean(result.train_losses[steps_before:] or [float("nan")])),
                epoch_rows / max(epoch_seconds, 1e-9),
                valid["auc"],
                valid["logloss"],
                " (best)" if improved else "",
            )
        if improved:
            best_score, best_state, epochs_without_gain = score, parallel.snapshot(), 0
            result.best_epoch, result.valid_metrics = epoch, valid
            progress.best_step = result.steps  # the checkpoint saved next holds the best weights
        else:
            epochs_without_gain += 1
        progress.best_score, progress.epochs_without_gain = best_score, epochs_without_gain
        save_checkpoint()
        if stop_due():
            return stop_here()
        if epochs_without_gain >= cfg.train.patience:
            if main:
                log.info("early stopping: no gain in %d epochs", cfg.train.patience)
            break
        if result.steps >= total_steps:
            break
    checkpoints.close()  # the last asynchronous save commits before the run reports

    parallel.restore(best_state)
    weights = parallel.full_state_dict()
    if main:
        assert weights is not None
        save_weights(weights, os.path.join(run_dir, "model.safetensors"))
    result.test_metrics = run_eval("test")
    splits = dataset.meta["splits"]
    baseline = constant_logloss(splits["train"]["positive_rate"], splits["test"]["positive_rate"])
    result.test_metrics["ne"] = result.test_metrics["logloss"] / baseline
    result.baseline_metrics = {"auc": 0.5, "logloss": baseline, "ne": 1.0}
    if writer is not None:
        for name, value in result.test_metrics.items():
            writer.add_scalar(f"test/{name}", value, result.steps)
        writer.close()
    result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info(
        "rank %d: %d steps in %.0f s (%.2f steps/s), peak RSS %.0f MiB",
        world.rank,
        result.steps,
        result.train_seconds,
        result.steps / max(result.train_seconds, 1e-9),
        result.peak_rss_mib,
    )
    if main:
        report(result)
    return result


def training_state(
    parallel: ParallelDLRM, loader: CTRTrainLoader, result: CTRRunResult, progress: Progress, world: World
) -> dict[str, Any]:
    """Everything a run needs to continue exactly, as a DCP state dict (tensors are live references, so
    loading fills them in place); per-rank positions (data, RNG) are gathered into one JSON string."""
    positions: list[Any] = [None] * world.world_size
    mine = {"loader": loader.state_dict(), "torch_rng": torch.get_rng_state().tolist()}
    dist.all_gather_object(positions, mine)
    run = {
        "steps": result.steps,
        "train_losses": result.train_losses,
        "best_epoch": result.best_epoch,
        "valid_metrics": result.valid_metrics,
        "train_seconds": result.train_seconds,
        "best_score": progress.best_score,
        "epochs_without_gain": progress.epochs_without_gain,
        "best_step": progress.best_step,
        "world_size": world.world_size,
    }
    state = parallel.state_dict()
    state["run"] = json.dumps(run)
    state["positions"] = json.dumps(positions)
    return state


def restore_training_state(
    checkpoints: CheckpointManager,
    url: str,
    identity: dict[str, Any],
    parallel: ParallelDLRM,
    loader: CTRTrainLoader,
    result: CTRRunResult,
    progress: Progress,
    world: World,
) -> list[torch.Tensor] | None:
    """Continue from checkpoint ``url`` (as :func:`trainer.train.restore_training_state` does for fMRL).
    Returns the best weights so far when an earlier checkpoint holds them, else None."""
    marker = checkpoints.marker(url)
    mismatch = incompatible(marker, identity)
    if mismatch:
        raise CheckpointError(
            f"{url} does not fit this run: " + "; ".join(mismatch) + ". Start a new run (another "
            "run.name or run.checkpoint_dir) or resume with the settings the checkpoint was saved with"
        )
    best_state = None
    best_step = marker.get("best_step", 0)
    if best_step and best_step != marker["step"]:
        state = parallel.state_dict()
        checkpoints.load(checkpoints.url(best_step), state, only=("dense", "tables"))
        parallel.load_state_dict(state)  # the optimizer part is the live state: unchanged
        best_state = parallel.snapshot()
    state = training_state(parallel, loader, result, progress, world)
    checkpoints.load(url, state)
    parallel.load_state_dict(state)
    run, positions = json.loads(state["run"]), json.loads(state["positions"])
    exact = loader.resume([p["loader"] for p in positions])
    if world.rank < len(positions):
        torch.set_rng_state(torch.tensor(positions[world.rank]["torch_rng"], dtype=torch.uint8))
    if not exact and world.rank == 0:
        log.warning(
            "%s was saved by %d rank(s); this job has %d: epoch %d continues with the impressions not "
            "read yet, in another order (an exact resume needs the saving layout)",
            url,
            marker["world_size"],
            world.world_size,
            loader.epoch + 1,
        )
    result.steps, result.train_losses = run["steps"], run["train_losses"]
    result.best_epoch, result.train_seconds = run["best_epoch"], run["train_seconds"]
    result.valid_metrics = run["valid_metrics"]
    progress.best_score, progress.epochs_without_gain = run["best_score"], run["epochs_without_gain"]
    progress.best_step = run["best_step"]
    return best_state


def incompatible(marker: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint (its commit marker) and this DLRM run in ways the saved tensors
    cannot follow: the task, the data set's features and table sizes, the dlrm section, the dense
    backend, the table optimizer."""
    saved, now = marker.get("config"), identity["config"]
    if saved is None:
        return []
    saved_task = saved.get("task", "fmrl")
    if saved_task != now["task"]:
        return [f"task was {saved_task!r}, now {now['task']!r}"]
    problems = [
        f"the data set has {key} {identity[key]}, the checkpoint {marker.get(key)}"
        for key in ("num_dense", "hash_buckets")
        if marker.get(key) != identity[key]
    ]
    for key in sorted(set(saved["dlrm"]) | set(now["dlrm"])):
        if saved["dlrm"].get(key) != now["dlrm"].get(key):
            problems.append(f"dlrm.{key} was {saved['dlrm'].get(key)!r}, now {now['dlrm'].get(key)!r}")
    for dotted in _SHAPING_KEYS:
        section, key = dotted.split(".")
        if saved[section].get(key) != now[section].get(key):
            problems.append(f"{dotted} was {saved[section].get(key)!r}, now {now[section].get(key)!r}")
    return problems


def format_ctr_table(result: CTRRunResult) -> str:
    rows = [("DLRM", result.test_metrics), ("constant (training click rate)", result.baseline_metrics)]
    lines = [f"{'model':<32}{'AUC':>8}{'log loss':>10}{'NE':>8}"]
    lines += [f"{name:<32}{m['auc']:>8.4f}{m['logloss']:>10.4f}{m['ne']:>8.4f}" for name, m in rows]
    return "\n".join(lines)


def report(result: CTRRunResult) -> None:
    """Print and save the test table and metrics.json."""
    table = format_ctr_table(result)
    with open(os.path.join(result.run_dir, "test_metrics.txt"), "w") as f:
        f.write(table + "\n")
    write_json(
        {
            "best_epoch": result.best_epoch,
            "steps": result.steps,
            "train_losses": result.train_losses,
            "valid": result.valid_metrics,
            "test": result.test_metrics,
            "constant": result.baseline_metrics,
        },
        os.path.join(result.run_dir, "metrics.json"),
    )
    impressions = int(result.test_metrics["impressions"])
    print(f"\nTest metrics of the best model (epoch {result.best_epoch}) on {impressions:,} impressions:\n")
    print(table)
    print(f"\nrun directory: {result.run_dir}")
