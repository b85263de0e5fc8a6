"""The training loop shared by every model family: one or many ranks, checkpoints, exact resume, early
stopping, stop requests, the final test.

    fmrl train --config configs/demo.yaml                                   # one process
    torchrun --nproc_per_node=2 -m trainer.cli train --config configs/demo.yaml
    fmrl train --config configs/demo.yaml train.epochs=5 run.name=quick     # dotted overrides
    fmrl train --config configs/dlrm-synthetic.yaml                         # task: dlrm

One code path for any number of ranks (a plain process is a job of one). What differs between model
families is a :class:`TrainingTask` (``task:`` in the config): :class:`trainer.fmrl_task.FMRLTask`
(Matryoshka sequential recommendation, early stopping on NDCG@10) and
:class:`trainer.dlrm_task.DLRMTask` (click-through rate, early stopping on AUC). A task builds its data
loader and its distributed model (sharding/), steps one micro-batch, evaluates a split and reports; this
module does the rest in the same way for both::

    for epoch in epochs:
        for batch in task.loader:
            task.train_step(batch); task.parallel.micro_step(...)   # + loss all-reduce, checkpoints
        metrics = task.evaluate("valid")                            # early stopping on task.score(...)
        checkpoints.save(...)
    restore the best weights; task.test(); task.report(...)

Rank 0 writes the run directory (``run.out_dir/run.name``): the resolved config, the TorchRec plan,
TensorBoard scalars, the best model's weights (safetensors), and the task's report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

from data_pipeline.loader import ShardBatchLoader
from data_pipeline.storage import StorageOptions
from sharding.fmrl import ParallelModel
from sharding.world import World, set_cpu_threads
from trainer.checkpoint import CheckpointError, CheckpointManager
from trainer.config import Config, DataConfig, TrainConfig, config_to_dict, dump_config, with_absolute_paths
from trainer.dist import all_reduce_sum, broadcast_object, distributed
from trainer.preemption import StopRequest
from trainer.run_folder import RunFolderError, RunLease, choose_run_folder, empty_folder

log = logging.getLogger("fmrl")

Metrics = Any
"""A task's metrics of one split: JSON-able (fMRL: {size: {name: value}}, DLRM: {name: value})."""


@dataclass
class RunResult:
    run_dir: str
    best_epoch: int = 0
    epochs: int = 0
    """Epochs trained (the last one may have been cut short by train.max_steps)."""
    steps: int = 0
    train_losses: list[float] = field(default_factory=list)
    """Loss of every optimizer step (the mean over all ranks' loss terms), in order."""
    valid_metrics: Metrics = field(default_factory=dict)
    """Validation metrics of the best epoch."""
    test_metrics: Metrics = field(default_factory=dict)
    """Test metrics of the best model."""
    baseline_metrics: Metrics = field(default_factory=dict)
    """Test metrics of the task's baseline (fMRL: most popular; DLRM: the constant click rate)."""
    train_seconds: float = 0.0
    """Wall time of the optimisation steps (evaluation excluded)."""
    peak_rss_mib: float = 0.0
    """This rank's peak resident memory."""
    stopped: bool = False
    """The job ended early (run.stop_after_steps or a stop request) after saving a checkpoint."""


@dataclass
class Progress:
    """Early-stopping state that a checkpoint carries besides the steps and losses."""

    best_score: float = float("-inf")
    epochs_without_gain: int = 0
    best_step: int = 0
    """Step of the checkpoint that holds the best weights (saved at that epoch's end); 0 if none yet."""


class TrainingTask:
    """One model family in the shared loop. A subclass's constructor ``(cfg, world, device, options)``
    opens the data set, builds the loader and the distributed model, and sets the attributes below; the
    methods are the loop's per-family steps."""

    sample_unit: str
    """What a training sample is, for throughput and logs ("sequences", "impressions")."""
    model_section: str
    """The config section that shapes the model's tensors: a checkpoint needs it unchanged."""
    early_stopping: str
    """What :meth:`score` measures, for the logs."""
    parallel: ParallelModel
    loader: ShardBatchLoader
    total_steps: int
    """Optimizer steps of the whole run (train.epochs, capped by train.max_steps)."""
    identity: dict[str, Any]
    """Facts of the data that a checkpoint must share (besides the config), e.g. {"num_items": N}."""

    def train_step(self, batch: Any) -> tuple[float, float, int]:
        """Forward and backward of one micro-batch on this rank. Returns the sum of its loss terms, their
        count (the step's loss is the ratio of both summed over ranks), and its samples."""
        raise NotImplementedError

    def train_scalars(self) -> dict[str, float]:
        """Extra TensorBoard scalars of the latest micro-batch (rank 0's), logged every run.log_every."""
        return {}

    def evaluate(self, split: str) -> Metrics:
        """Metrics of ``split`` ("valid" or "test") for the current weights. Collective."""
        raise NotImplementedError

    def score(self, metrics: Metrics) -> float:
        """The early-stopping score of validation metrics: higher is better."""
        raise NotImplementedError

    def describe(self, metrics: Metrics) -> str:
        """Validation metrics for the epoch's log line."""
        raise NotImplementedError

    def scalars(self, split: str, metrics: Metrics) -> dict[str, float]:
        """Metrics of ``split`` as TensorBoard scalars (tag -> value)."""
        raise NotImplementedError

    def metrics_from_json(self, metrics: Metrics) -> Metrics:
        """Metrics as read back from a checkpoint's JSON (whose object keys are strings)."""
        return metrics

    def rank_state(self) -> dict[str, Any]:
        """This rank's extra position for an exact resume (e.g. a sampler's RNG), JSON-able."""
        return {}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        """Take back :meth:`rank_state` of the saved rank with this rank's number."""

    def test(self) -> tuple[Metrics, Metrics]:
        """Test metrics of the current (best) weights and of the task's baseline. Collective."""
        raise NotImplementedError

    def report(self, result: RunResult) -> None:
        """Print and save the final report (rank 0 only)."""
        raise NotImplementedError


def task_class(name: str) -> type[TrainingTask]:
    """The :class:`TrainingTask` of ``task:`` in the config."""
    if name == "dlrm":
        from trainer.dlrm_task import DLRMTask

        return DLRMTask
    from trainer.fmrl_task import FMRLTask

    return FMRLTask


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def storage_options(cfg: DataConfig) -> StorageOptions:
    options = StorageOptions.from_env()
    if cfg.s3_endpoint_url:
        options = dataclasses.replace(options, endpoint_url=cfg.s3_endpoint_url)
    return options


@contextlib.contextmanager
def run_folder(cfg: Config, world: World, options: StorageOptions) -> Iterator[str]:
    """The run directory of this job (trainer/run_folder.py), the same on every rank, leased by rank 0
    for the duration of the block. A folder this job created and left empty (a failed start) is removed
    again. Collective."""
    lease, created, folder, error = None, False, "", ""
    if world.rank == 0:
        try:
            folder, overwrite = choose_run_folder(
                cfg.run.out_dir, cfg.run.name, cfg.run.resume, cfg.run.overwrite, config_to_dict(cfg)
            )
            created = not os.path.exists(folder)
            os.makedirs(folder, exist_ok=True)
            locations = [folder] + ([cfg.run.checkpoint_dir] if cfg.run.checkpoint_dir else [])
            lease = RunLease(locations, options)
            lease.acquire()
            if overwrite:
                log.warning("run.overwrite: deleting the earlier run in %s", folder)
                empty_folder(folder)
        except RunFolderError as exc:
            error = str(exc)
    folder, error = broadcast_object((folder, error))  # type: ignore[misc]
    if error:
        if created and not os.listdir(folder):
            os.rmdir(folder)
        raise RunFolderError(error)
    try:
        yield folder
    finally:
        if lease is not None:
            lease.release()
        if created and world.rank == 0 and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)  # nothing was written: the start failed


def total_training_steps(loader: ShardBatchLoader, cfg: TrainConfig) -> int:
    """Optimizer steps of ``cfg.epochs`` epochs of ``loader`` (at least 1), capped by ``cfg.max_steps``."""
    steps = sum(loader.steps_in_epoch(epoch) for epoch in range(cfg.epochs)) // cfg.grad_accum_steps
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    return max(steps, 1)


def dense_settings(cfg: Config, *, total_steps: int, device: torch.device) -> dict[str, Any]:
    """The keyword arguments that ``parallelize_fmrl`` and ``parallelize_dlrm`` share, from ``cfg``: the
    dense backend and its optimizer and schedule."""
    return {
        "backend": cfg.parallel.backend,
        "zero_stage": cfg.parallel.zero_stage,
        "lr": cfg.train.lr,
        "weight_decay": cfg.train.weight_decay,
        "warmup_steps": cfg.train.warmup_steps,
        "total_steps": total_steps,
        "grad_clip": cfg.train.grad_clip,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "micro_batch_size": cfg.train.batch_size,
        "precision": cfg.parallel.precision,
        "device": device,
    }


def train(cfg: Config) -> RunResult:
    """Train the model of ``cfg.task``, early-stop on its validation score, test the best model, write the
    report. Runs as one rank of a torchrun job, or as a job of one rank in a plain process. Relative
    paths in ``cfg`` are taken from the current directory; the run records them absolute."""
    cfg = with_absolute_paths(cfg)
    with distributed() as (world, device), StopRequest(cfg.run.stop_file) as stop_request:
        options = storage_options(cfg.data)
        with run_folder(cfg, world, options) as run_dir:
            return _train(cfg, world, device, stop_request, run_dir, options)


def _train(
    cfg: Config,
    world: World,
    device: torch.device,
    stop_request: StopRequest,
    run_dir: str,
    options: StorageOptions,
) -> RunResult:
    main = world.rank == 0
    seed_everything(cfg.train.seed)  # the same initial model on every rank
    threads = set_cpu_threads(cfg.train.num_threads, world)
    log.info(
        "rank %d/%d on %s, %d CPU threads, run directory %s",
        world.rank,
        world.world_size,
        device,
        threads,
        run_dir,
    )
    task = task_class(cfg.task)(cfg, world, device, options)
    parallel, loader = task.parallel, task.loader
    writer = None

    def log_scalars(scalars: dict[str, float], step: int) -> None:
        if writer is not None:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)

    result = RunResult(run_dir=run_dir)
    progress = Progress()
    checkpoints = CheckpointManager(
        cfg.run.checkpoint_dir or os.path.join(run_dir, "checkpoints"),
        options,
        cfg.run.keep_checkpoints,
        timeout=cfg.run.checkpoint_timeout,
        max_abandoned=cfg.run.checkpoint_max_abandoned,
    )
    if main:  # a save that died with an earlier job left a folder without a marker: it only takes space
        checkpoints.remove_debris()
    identity = {"config": config_to_dict(cfg), **task.identity}

    def save_checkpoint() -> None:
        checkpoints.save(
            result.steps,
            training_state(parallel, loader, task.rank_state(), result, progress, world),
            {**identity, "best_step": progress.best_step},
            blocking=not cfg.run.async_checkpoint,
        )

    resume_url = checkpoints.latest() if cfg.run.resume == "auto" else cfg.run.resume
    best_state = None
    if resume_url:
        best_state = restore_training_state(checkpoints, resume_url, identity, task, result, progress, world)
        if main:
            log.info("resumed from %s at step %d (epoch %d)", resume_url, result.steps, loader.epoch + 1)
    elif cfg.run.resume == "auto" and main:
        log.info("run.resume=auto: no complete checkpoint in %s, starting afresh", checkpoints.root)
    if main:  # written once the data, the model and the checkpoint to resume from were accepted
        dump_config(cfg, os.path.join(run_dir, "config.yaml"))
        with open(os.path.join(run_dir, "sharding_plan.txt"), "w") as f:
            f.write(str(parallel.sparse.plan) + "\n")
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    if best_state is None:
        best_state = parallel.snapshot()
    keys_log = (
        open(os.path.join(run_dir, f"sample_keys.rank{world.rank}.txt"), "a")
        if cfg.run.log_sample_keys
        else None
    )
    stop_requested = False

    def stop_due() -> bool:
        limit = bool(cfg.run.stop_after_steps) and result.steps >= cfg.run.stop_after_steps
        return limit or stop_requested

    def stop_here() -> RunResult:
        """End the job here (run.stop_after_steps or a stop request): a committed checkpoint of this
        step, no final test."""
        save_checkpoint()  # a no-op when this step's checkpoint exists already
        checkpoints.close()
        if keys_log is not None:
            keys_log.close()
        if main and stop_requested and cfg.run.stop_file:
            # consumed: tells the launcher the trainer did stop early (and a requeued job must not stop)
            with contextlib.suppress(FileNotFoundError):
                os.remove(cfg.run.stop_file)
        if main:
            reason = "stop requested" if stop_requested else "run.stop_after_steps reached"
            log.info("%s at step %d: checkpoint saved; continue with run.resume=auto", reason, result.steps)
        result.stopped = True
        return result

    accum, total_steps = cfg.train.grad_accum_steps, task.total_steps
    parallel.set_training(True)
    if stop_due():  # resumed at the limit: save in this job's layout, then stop
        return stop_here()
    micro = 0
    window = [0.0, 0.0, 0.0]  # the current step's loss sum, its count, its samples (this rank)
    for epoch in range(loader.epoch + 1, cfg.train.epochs + 1):
        bar = tqdm(
            loader,
            total=loader.steps_in_epoch(loader.epoch),
            desc=f"epoch {epoch}",
            disable=not (cfg.run.progress_bar and main),
            leave=False,
            # redraws flood log files (batch jobs, CI): redraw rarely when stderr is not a terminal
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )
        epoch_start, epoch_samples = time.perf_counter(), 0
        steps_before = result.steps - loader.batches_in_epoch // accum  # the epoch's first step
        batches_left = loader.steps_in_epoch(loader.epoch) - loader.batches_in_epoch
        for batch in bar:
            batches_left -= 1
            micro += 1
            boundary = micro % accum == 0
            parallel.set_grad_sync(boundary)
            loss_sum, count, samples = task.train_step(batch)
            if keys_log is not None:
                keys_log.write(" ".join(batch.keys) + "\n")
                keys_log.flush()  # readable while the run goes on
            parallel.micro_step(boundary)
            window = [window[0] + loss_sum, window[1] + count, window[2] + samples]
            if not boundary:
                continue
            # one all-reduce per step: the loss, its count, the samples, whether any rank was asked to stop
            total = all_reduce_sum(torch.tensor([*window, float(stop_request.local())], dtype=torch.float64))
            loss = float(total[0] / total[1])
            epoch_samples += int(total[2])
            stop_requested = stop_requested or bool(total[3] > 0)
            window = [0.0, 0.0, 0.0]
            result.steps += 1
            result.train_losses.append(loss)
            throughput = epoch_samples / (time.perf_counter() - epoch_start)
            postfix = {"loss": f"{loss:.4f}", f"{task.sample_unit}_per_s": f"{throughput:.0f}"}
            bar.set_postfix(postfix, refresh=False)  # redrawn at tqdm's pace
            if result.steps % cfg.run.log_every == 0:
                log_scalars(
                    {
                        "train/loss": loss,
                        "train/lr": parallel.last_lr(),
                        f"train/{task.sample_unit}_per_s": throughput,
                        **task.train_scalars(),
                    },
                    result.steps,
                )
            # the last step of an epoch (or of training) is checkpointed after the validation below, so
            # that its checkpoint holds the early-stopping state: one checkpoint per step
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
        result.epochs = epoch
        valid = task.evaluate("valid")
        log_scalars(task.scalars("valid", valid), result.steps)
        score = task.score(valid)
        improved = score > progress.best_score
        if main:
            log.info(
                "epoch %d: loss %.4f, %.0f %s/s, valid %s%s",
                epoch,
                float(np.mean(result.train_losses[steps_before:] or [float("nan")])),
                epoch_samples / max(epoch_seconds, 1e-9),  # training only, evaluation excluded
                task.sample_unit,
                task.describe(valid),
                " (best)" if improved else "",
            )
        if improved:
            best_state = parallel.snapshot()
            progress.best_score, progress.epochs_without_gain = score, 0
            progress.best_step = result.steps  # the checkpoint saved next holds the best weights
            result.best_epoch, result.valid_metrics = epoch, valid
        else:
            progress.epochs_without_gain += 1
        save_checkpoint()
        if stop_due():
            return stop_here()
        if progress.epochs_without_gain >= cfg.train.patience:
            if main:
                log.info(
                    "early stopping: no gain in %s for %d epochs", task.early_stopping, cfg.train.patience
                )
            break
        if result.steps >= total_steps:
            break
    if keys_log is not None:
        keys_log.close()
    checkpoints.close()  # the last asynchronous save commits before the run reports

    parallel.restore(best_state)
    weights = parallel.full_state_dict()
    if main:
        assert weights is not None
        save_weights(weights, os.path.join(run_dir, "model.safetensors"))
    result.test_metrics, result.baseline_metrics = task.test()
    log_scalars(task.scalars("test", result.test_metrics), result.steps)
    if writer is not None:
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
    try:
        if main:
            task.report(result)
    finally:
        # no rank starts its teardown (destroying the process group, exiting) before rank 0 has written
        # the report, the weights' export and the plot: a peer that dies in its teardown makes torchrun
        # kill every worker, which must not cut a finished run's artefacts short
        dist.barrier()
    return result


def training_state(
    parallel: ParallelModel,
    loader: Any,
    rank_state: dict[str, Any],
    result: RunResult,
    progress: Progress,
    world: World,
) -> dict[str, Any]:
    """Everything a run needs to continue exactly, as a DCP state dict (tensors are live references,
    so loading fills them in place). Per-rank positions (data, RNG, ``rank_state``) are gathered into one
    JSON string."""
    positions: list[Any] = [None] * world.world_size
    mine = {"loader": loader.state_dict(), "torch_rng": torch.get_rng_state().tolist(), **rank_state}
    dist.all_gather_object(positions, mine)
    run = {
        "steps": result.steps,
        "train_losses": result.train_losses,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
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
    task: TrainingTask,
    result: RunResult,
    progress: Progress,
    world: World,
) -> list[torch.Tensor] | None:
    """Continue from checkpoint ``url``. Returns the best weights so far (a :meth:`ParallelModel.snapshot`)
    when an earlier checkpoint holds them, else None (the resumed weights are the best so far).

    At the saving world size the run continues exactly. At another one, DCP reshards the dense state and
    the TorchRec tables, the data loader continues the epoch with the samples no rank has read yet, and
    rank r takes the RNG states of saved rank r (fresh seeds for ranks the saved job did not have).
    """
    parallel, loader = task.parallel, task.loader
    marker = checkpoints.marker(url)
    mismatch = incompatible(marker, identity, task.model_section)
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
    state = training_state(parallel, loader, task.rank_state(), result, progress, world)
    checkpoints.load(url, state)
    parallel.load_state_dict(state)
    run, positions = json.loads(state["run"]), json.loads(state["positions"])
    exact = loader.resume([p["loader"] for p in positions])
    if world.rank < len(positions):
        torch.set_rng_state(torch.tensor(positions[world.rank]["torch_rng"], dtype=torch.uint8))
        task.load_rank_state(positions[world.rank])
    if not exact and world.rank == 0:
        log.warning(
            "%s was saved by %d rank(s) with %s; this job has %d rank(s): epoch %d continues with the "
            "%s not read yet, in another order (an exact resume needs the saving layout)",
            url,
            marker["world_size"],
            ", ".join(f"{k}={positions[0]['loader'][k]}" for k in ("num_workers", "batch_size")),
            world.world_size,
            loader.epoch + 1,
            task.sample_unit,
        )
    result.steps, result.train_losses = run["steps"], run["train_losses"]
    result.best_epoch, result.train_seconds = run["best_epoch"], run["train_seconds"]
    result.epochs = run.get("epochs", 0)
    result.valid_metrics = task.metrics_from_json(run["valid_metrics"])
    progress.best_score, progress.epochs_without_gain = run["best_score"], run["epochs_without_gain"]
    progress.best_step = run.get("best_step", 0)
    return best_state


# what a checkpoint's tensors depend on besides the model section: another value cannot load it
_SHAPING_KEYS = ("parallel.backend", "parallel.id_table_optimizer")


def incompatible(marker: dict[str, Any], identity: dict[str, Any], model_section: str) -> list[str]:
    """What differs between a checkpoint (its commit marker) and this run in ways the saved tensors cannot
    follow: the task, the data facts in ``identity`` (e.g. the item count), any setting of the config
    section ``model_section``, the dense backend, the table optimizer."""
    saved, now = marker.get("config"), identity["config"]
    if saved is None:  # written before configs were recorded
        return []
    saved_task = saved.get("task", "fmrl")
    if saved_task != now["task"]:
        return [f"task was {saved_task!r}, now {now['task']!r}"]
    problems = [
        f"the data set has {key} {identity[key]}, the checkpoint {marker.get(key)}"
        for key in sorted(identity)
        if key != "config" and marker.get(key) != identity[key]
    ]
    for key in sorted(set(saved[model_section]) | set(now[model_section])):
        was, is_now = saved[model_section].get(key), now[model_section].get(key)
        if was != is_now:
            problems.append(f"{model_section}.{key} was {was!r}, now {is_now!r}")
    for dotted in _SHAPING_KEYS:
        section, key = dotted.split(".")
        if saved[section].get(key) != now[section].get(key):
            problems.append(f"{dotted} was {saved[section].get(key)!r}, now {now[section].get(key)!r}")
    return problems


def save_weights(state: dict[str, torch.Tensor], path: str) -> None:
    tmp = f"{path}.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def write_json(obj: object, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
