"""The training loop shared by every model family: one or many ranks, checkpoints, exact resume, early
stopping, stop requests, the final test.

    fmrl train --config configs/demo.yaml                                   # one process
    torchrun --nproc_per_node=2 -m trainer.cli train --config configs/demo.yaml
    fmrl train --config configs/demo.yaml train.epochs=5 run.name=quick     # dotted overrides
    fmrl train --config configs/dlrm-synthetic.yaml                         # task: dlrm

One code path for any number of ranks (a plain process is a job of one). What differs between model
families is a :class:`~trainer.tasks.base.TrainingTask` (``task:`` in the config, trainer/tasks/): it
builds its data loader and its distributed model (sharding/), steps one micro-batch, evaluates a split
and reports. :class:`Trainer` does the rest, in the same way for both::

    resume from a checkpoint, if asked
    for epoch in epochs:
        for batch in task.loader:
            train_step(batch)        # forward + backward; at an accumulation boundary the optimizer step
                                     # (a non-finite loss or gradient norm: fail, or skip the step)
            if should_stop():        # run.stop_after_steps, a stop file, SIGUSR1, a lost torchrun agent
                return stop_here()   # checkpoint, no final test
            maybe_save()             # every run.checkpoint_every steps
        end_epoch()                  # validate (never non-finite weights), early stopping, checkpoint
        if stopping.exhausted or the step budget is spent: break
    finish()                         # the best weights back, save them, test, report

The loop's state lives in objects that the checkpoint manager saves and loads as they are
(trainer/state.py: :class:`~trainer.state.Progress`, :class:`~trainer.state.EarlyStopping`,
:class:`~trainer.state.RankPositions`; the model's own in :class:`~sharding.core.ParallelModel`).

Rank 0 writes the run directory (``run.out_dir/run.name``, trainer/run_folder.py): the resolved config,
the TorchRec plan, the log file (``train.log``, trainer/logs.py), the scalars of ``run.loggers``
(TensorBoard, MLflow: trainer/tracking.py), the best model's weights (safetensors), and the task's report.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.features import safetensors_header
from data_pipeline.storage import StorageError, StorageOptions, exists, join
from sharding.core import ParallelModel
from sharding.world import World, set_cpu_threads
from trainer.checkpoint import COMMIT, CheckpointError, CheckpointManager, TrainingState
from trainer.config import (
    Config,
    ConfigError,
    RunConfig,
    config_to_dict,
    dump_config,
    upgrade_saved_config,
    with_absolute_paths,
)
from trainer.dist import all_reduce_sum, broadcast_object, distributed
from trainer.logs import RunLog, log_file_name, peak_rss_mib, progress_bar, run_log_file
from trainer.preemption import StopRequest
from trainer.run_folder import RunFolder, RunFolderError, RunLease, choose_run_folder, empty_run_folder
from trainer.state import DivergedError, EarlyStopping, Progress, RankPositions, RunState
from trainer.tasks import task_class
from trainer.tasks.base import RunResult, TrainingTask
from trainer.tracking import Trackers, TrackingError, check_trackers, open_trackers

log = logging.getLogger("fmrl")

__all__ = ["RunResult", "Trainer", "incompatible", "train"]


def train(cfg: Config) -> RunResult:
    """Train the model of ``cfg.task``, early-stop on its validation score, test the best model, write the
    report. Runs as one rank of a torchrun job, or as a job of one rank in a plain process. Relative
    paths in ``cfg`` are taken from the current directory; the run records them absolute."""
    cfg = with_absolute_paths(cfg)
    options = cfg.data.storage_options()
    check_resume_source(cfg.run.resume, options)  # before a process group, a data set or a model
    check_folder_paths(cfg)
    stop = StopRequest(cfg.run.stop_file, cfg.run.stop_grace_s)
    with distributed() as (world, device), stop as stop_request:
        with (
            run_folder(cfg, world, options, stop_request) as folder,
            run_log_file(folder.path, world.rank, hold=folder.replaces) as run_log,
        ):
            run_dir = folder.path
            log.debug("command line: %s", " ".join(sys.argv))
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
            task = task_class(cfg.task).from_config(cfg, world, device, options)
            trainer = Trainer(cfg, task, world, run_dir, options, stop_request)
            claim_run_folder(folder, cfg.run, world, run_log)  # run.overwrite: only now
            return trainer.run()


class Trainer:
    """One run of a task, from start (or resume) to the report. See the module docstring."""

    def __init__(
        self,
        cfg: Config,
        task: TrainingTask,
        world: World,
        run_dir: str,
        options: StorageOptions,
        stop_request: StopRequest,
    ) -> None:
        self.cfg, self.task, self.world, self.run_dir = cfg, task, world, run_dir
        self.main = world.rank == 0
        self.stop_request = stop_request
        self.parallel, self.loader = task.parallel, task.loader
        self.progress = Progress()
        self.stopping = EarlyStopping(patience=cfg.train.patience)
        self.positions = RankPositions(task.loader, task, world.rank, world.world_size)
        run_state = RunState(self.progress, self.stopping, world.world_size, task.metrics_from_json)
        self.state = TrainingState(model=task.parallel, run=run_state, positions=self.positions)
        self.checkpoints = CheckpointManager(
            cfg.run.checkpoint_dir or os.path.join(run_dir, "checkpoints"),
            options,
            cfg.run.keep_checkpoints,
            every=cfg.run.checkpoint_every,
            timeout=cfg.run.checkpoint_timeout,
            max_abandoned=cfg.run.checkpoint_max_abandoned,
        )
        self.identity = {"config": config_to_dict(cfg), **task.identity}
        self.trackers = Trackers([])
        self.keys_log: Any = None
        self.best_weights: list[torch.Tensor] = []
        self.window = StepWindow()
        self.stop_requested = False

    # ------------------------------------------------------------------------------------------ the run

    def run(self) -> RunResult:
        """The run, from start (or resume) to its report; the trackers learn how it ended."""
        try:
            return self._run()
        except BaseException:
            self.trackers.close("FAILED")
            raise

    def _run(self) -> RunResult:
        self.start()
        self.parallel.set_training(True)
        if self.should_stop():  # resumed at the limit: save in this job's layout, then stop
            return self.stop_here()
        for epoch in range(self.loader.epoch + 1, self.cfg.train.epochs + 1):
            if self.progress.steps >= self.task.total_steps:
                break  # the step budget is spent (also when resumed with a lower train.max_steps)
            if self.train_epoch(epoch):
                return self.stop_here()
            self.end_epoch(epoch)
            if self.should_stop():
                return self.stop_here()
            if self.stopping.exhausted:
                if self.main:
                    log.info(
                        "early stopping: no gain in %s for %d epochs",
                        self.task.early_stopping,
                        self.cfg.train.patience,
                    )
                break
        return self.finish()

    def start(self) -> None:
        """Resume if asked, then write the run record (only once the data, the model and the checkpoint
        were accepted) and open the logs."""
        if (
            self.main
        ):  # a save that died with an earlier job left a folder without a marker: it only takes space
            self.checkpoints.remove_debris()
        cfg = self.cfg
        # auto: the newest checkpoint whose commit marker reads (a damaged one is skipped, logged)
        url = self.checkpoints.latest_intact() if cfg.run.resume == "auto" else cfg.run.resume
        if url:
            self.resume(url)
        elif cfg.run.resume == "auto" and self.main:
            log.info("run.resume=auto: no complete checkpoint in %s, starting afresh", self.checkpoints.root)
        if not self.best_weights:
            self.best_weights = self.parallel.snapshot()
        error = ""
        if self.main:
            config = os.path.join(self.run_dir, "config.yaml")
            dump_config(cfg, config)
            with open(os.path.join(self.run_dir, "sharding_plan.txt"), "w") as f:
                f.write(str(self.parallel.sparse.plan) + "\n")
            try:
                self.trackers = open_trackers(cfg.run, self.run_dir, config_to_dict(cfg), resumed=bool(url))
                self.trackers.log_files([config])
            except TrackingError as exc:
                error = str(exc)
        error = str(broadcast_object(error))  # every rank stops, not rank 0 alone (its peers would hang)
        if error:
            raise TrackingError(error)
        if cfg.run.log_sample_keys:
            self.keys_log = open(os.path.join(self.run_dir, f"sample_keys.rank{self.world.rank}.txt"), "a")

    def train_epoch(self, epoch: int) -> bool:
        """One epoch's steps (the rest of it, after a mid-epoch resume); True if the job must stop now."""
        loader, cfg = self.loader, self.cfg
        accum = cfg.optim.grad_accum_steps
        # micro-batches: the epoch's, or fewer when the run's steps (train.max_steps) end it early
        steps_left = self.task.total_steps - self.progress.steps
        total = min(loader.steps_in_epoch(loader.epoch), loader.batches_in_epoch + steps_left * accum)
        bar = progress_bar(
            loader,
            total=total,
            initial=loader.batches_in_epoch,
            desc=f"epoch {epoch}",
            enabled=cfg.run.progress_bar and self.main,
        )
        self.window.start_epoch(self.progress.steps - loader.batches_in_epoch // cfg.optim.grad_accum_steps)
        batches_left = loader.steps_in_epoch(loader.epoch) - loader.batches_in_epoch
        for batch in bar:
            batches_left -= 1
            if not self.train_step(batch):
                continue  # inside a gradient accumulation
            bar.set_postfix(self.window.postfix(self.progress, self.task.sample_unit), refresh=False)
            # the last step of an epoch (or of training) is checkpointed after the validation, so that
            # its checkpoint holds the early-stopping state: one checkpoint per step
            if self.progress.steps >= self.task.total_steps:
                break
            if batches_left == 0:
                continue  # the loader ends the epoch
            self.maybe_save()
            if self.should_stop():
                return True
        return False

    def train_step(self, batch: Any) -> bool:
        """Forward and backward of one micro-batch; at an accumulation boundary the optimizer step, one
        all-reduce (loss, count, samples, stop flag) and the logs. True if an optimizer step was taken."""
        boundary = self.window.next_micro_batch(self.cfg.optim.grad_accum_steps)
        self.parallel.set_grad_sync(boundary)
        loss_sum, count, samples = self.task.train_step(batch)
        if self.keys_log is not None:
            self.keys_log.write(" ".join(batch.keys) + "\n")
            self.keys_log.flush()  # readable while the run goes on
        self.window.add(loss_sum, count, samples)
        if not boundary:
            self.parallel.micro_step(False)
            return False
        # the gradient norm before the update, so that a non-finite one can still skip it; the flag of
        # this rank's rides on the step's all-reduce: every rank takes the same decision
        norm = self.parallel.clip_gradients()
        local_nonfinite = not math.isfinite(self.window.loss_sum) or not math.isfinite(norm or 0.0)
        total = all_reduce_sum(self.window.take(float(self.stop_request.local()), float(local_nonfinite)))
        self.stop_requested = self.stop_requested or bool(total[3] > 0)
        loss = float(total[0] / total[1])
        self.window.samples_in_epoch += int(total[2])
        self.progress.steps += 1
        if total[4] > 0 or not math.isfinite(loss):
            self.skip_nonfinite_step(loss, "loss" if not math.isfinite(loss) else "gradient norm")
        else:
            self.parallel.micro_step(True)
            # DeepSpeed clips inside its step: its global norm, the same on every rank, comes after it
            norm = self.parallel.grad_norm()
            if norm is not None and not math.isfinite(norm):
                raise DivergedError(self.diverged_message("gradient norm", norm))
        self.progress.train_losses.append(loss)
        if self.progress.steps % self.cfg.run.log_every == 0:
            throughput = self.window.throughput()
            self.log_scalars(
                {
                    "train/loss": loss,
                    "train/lr": self.parallel.last_lr(),
                    f"train/{self.task.sample_unit}_per_s": throughput,
                    **self.task.train_scalars(),
                }
            )
        return True

    def skip_nonfinite_step(self, loss: float, what: str) -> None:
        """The step's loss or gradient norm is not finite (on some rank): skip the update while
        train.skip_nonfinite_steps allows, else fail the run. The same on every rank."""
        allowed = self.cfg.train.skip_nonfinite_steps
        if self.progress.skipped_steps >= allowed:
            limit = f" ({allowed} skipped before: train.skip_nonfinite_steps={allowed})" if allowed else ""
            raise DivergedError(self.diverged_message(what, loss) + limit)
        self.parallel.skip_step()
        self.progress.skipped_steps += 1
        self.log_scalars({"train/skipped_steps": self.progress.skipped_steps})
        if self.main:
            log.warning(
                "step %d (epoch %d): non-finite %s (loss %s): update skipped, %d of %d allowed "
                "(train.skip_nonfinite_steps)",
                self.progress.steps,
                self.loader.epoch + 1,
                what,
                loss,
                self.progress.skipped_steps,
                allowed,
            )

    def diverged_message(self, what: str, value: float) -> str:
        return (
            f"non-finite {what} ({value}) at step {self.progress.steps} (epoch "
            f"{self.loader.epoch + 1}); lower optim.lr, check the data (e.g. fmrl features again), or "
            f"allow skipped steps with train.skip_nonfinite_steps=N"
        )

    def check_finite_weights(self, when: str) -> None:
        """Refuse to evaluate (or save) weights with a NaN or infinity on any rank. Collective: joins the
        evaluation every rank is about to run."""
        name = self.parallel.nonfinite_tensor()
        if all_reduce_sum(torch.tensor([float(bool(name))], dtype=torch.float64))[0] > 0:
            where = f": {name} on rank {self.world.rank}" if name else " on another rank"
            raise DivergedError(
                f"the weights hold NaN or infinity at step {self.progress.steps}{where}; {when} refused"
            )

    def end_epoch(self, epoch: int) -> None:
        """Validate, update early stopping (keeping a copy of the best weights), save a checkpoint."""
        seconds = self.window.end_epoch()
        self.progress.train_seconds += seconds
        self.progress.epochs = epoch
        started = time.perf_counter()
        self.check_finite_weights(f"validation of epoch {epoch}")
        valid = self.task.evaluate("valid")
        release_freed_memory()
        valid_seconds = time.perf_counter() - started
        self.log_scalars(self.task.scalars("valid", valid))
        improved = self.stopping.update(self.task.score(valid), epoch, self.progress.steps, valid)
        if improved:
            self.best_weights = self.parallel.snapshot()
        if self.main:
            log.info(
                "epoch %d: loss %.4f, %.0f %s/s, valid %s (evaluated in %.1f s)%s",
                epoch,
                self.progress.epoch_loss(self.window.first_step),
                self.window.samples_in_epoch / max(seconds, 1e-9),  # training only, evaluation excluded
                self.task.sample_unit,
                self.task.describe(valid),
                valid_seconds,
                " (best)" if improved else "",
            )
        self.save()

    def maybe_save(self) -> None:
        """Save a checkpoint if one is due at this step (run.checkpoint_every)."""
        if self.checkpoints.due(self.progress.steps):
            self.save()

    def save(self) -> None:
        # a checkpoint in the middle of an epoch carries that epoch's training time so far (the total
        # is otherwise added at the epoch's end, which a job stopped here never reaches)
        partial = self.window.unrecorded_seconds()
        self.progress.train_seconds += partial
        try:
            self.checkpoints.save(
                self.progress.steps,
                self.state,
                {**self.identity, "best_step": self.stopping.best_step},
                blocking=not self.cfg.run.async_checkpoint,
            )
        finally:
            self.progress.train_seconds -= partial
        release_freed_memory()

    def should_stop(self) -> bool:
        """run.stop_after_steps reached, or a stop requested on any rank (known after a step's all-reduce)."""
        limit = self.cfg.run.stop_after_steps
        return bool(limit) and self.progress.steps >= limit or self.stop_requested

    def stop_here(self) -> RunResult:
        """End the job here (run.stop_after_steps or a stop request): a committed checkpoint of this step,
        no final test."""
        self.save()  # a no-op when this step's checkpoint exists already
        self.checkpoints.close()
        self.stop_request.stopped()  # committed: a SIGTERM grace running out now must not exit 1
        self.close_logs()
        self.trackers.close("KILLED")  # to be resumed: the resumed job sets it running again
        stop_file = self.cfg.run.stop_file
        if self.main and self.stop_requested and stop_file:
            # consumed: tells the launcher the trainer did stop early (and a requeued job must not stop)
            with contextlib.suppress(FileNotFoundError):
                os.remove(stop_file)
        if self.main:
            reason = "stop requested" if self.stop_requested else "run.stop_after_steps reached"
            log.info(
                "%s at step %d: checkpoint saved; continue with run.resume=auto", reason, self.progress.steps
            )
        return dataclasses.replace(self.result(), stopped=True)

    def finish(self) -> RunResult:
        """The best weights back, saved; the test; the report. No rank starts its teardown before rank 0
        has written the report: a peer dying in its teardown makes torchrun kill the job, and that must
        not cut a finished run's artefacts short."""
        self.checkpoints.close()  # the last asynchronous save commits before the run reports
        self.close_logs()
        self.parallel.restore(self.best_weights)
        self.check_finite_weights("the test of the best weights")
        started = time.perf_counter()
        save_weights(self.parallel, os.path.join(self.run_dir, "model.safetensors"))
        release_freed_memory()
        saved = time.perf_counter()
        result = self.result()
        result.test_metrics, result.baseline_metrics = self.task.test()
        result.peak_rss_mib = peak_rss_mib()  # the whole run's, the test included
        if self.main:
            log.info(
                "model.safetensors written in %.1f s, test evaluated in %.1f s",
                saved - started,
                time.perf_counter() - saved,
            )
        self.log_scalars(self.task.scalars("test", result.test_metrics))
        log.info(
            "rank %d: %d steps in %.0f s (%.2f steps/s), peak RSS %.0f MiB",
            self.world.rank,
            result.steps,
            result.train_seconds,
            result.steps / max(result.train_seconds, 1e-9),
            result.peak_rss_mib,
        )
        if self.main and result.skipped_steps:
            log.warning(
                "%d optimizer step(s) were skipped for a non-finite loss or gradient norm "
                "(train.skip_nonfinite_steps=%d; metrics.json: skipped_steps)",
                result.skipped_steps,
                self.cfg.train.skip_nonfinite_steps,
            )
        try:
            if self.main:
                self.task.report(result)
                report = ["test_metrics.txt", "metrics.json", "metrics_by_size.png", "train.log"]
                self.trackers.log_files([os.path.join(self.run_dir, name) for name in report])
                self.trackers.close("FINISHED")
        finally:
            dist.barrier()
        return result

    # -------------------------------------------------------------------------------------- resuming

    def resume(self, url: str) -> None:
        """Continue from checkpoint ``url``, refusing one whose tensors cannot fit this run. At the saving
        world size the run continues exactly; at another one, DCP reshards the dense state and the
        TorchRec tables, and the data loader continues the epoch with the samples no rank has read yet.
        When an earlier checkpoint holds the best weights so far, they are read first."""
        marker = self.checkpoints.marker(url)
        mismatch = incompatible(marker, self.identity, self.task.model_section)
        if mismatch:
            raise CheckpointError(
                f"{url} does not fit this run: " + "; ".join(mismatch) + ". Start a new run (another "
                "run.name or run.checkpoint_dir) or resume with the settings the checkpoint was saved with"
            )
        best_step = marker.get("best_step", 0)
        if best_step and best_step != marker["step"]:
            best = TrainingState(model=self.parallel)
            self.checkpoints.load(self.checkpoints.url(best_step), best, only=("dense", "tables"))
            self.best_weights = self.parallel.snapshot()
        self.checkpoints.load(url, self.state)
        if self.main:
            if not self.positions.exact:
                log.warning(
                    "%s was saved by %d rank(s) with %s; this job has %d rank(s): epoch %d continues with the "
                    "%s not read yet, in another order (an exact resume needs the saving layout)",
                    url,
                    marker["world_size"],
                    self.positions.describe_saved_layout(),
                    self.world.world_size,
                    self.loader.epoch + 1,
                    self.task.sample_unit,
                )
            log.info("resumed from %s at step %d (epoch %d)", url, self.progress.steps, self.loader.epoch + 1)

    # ---------------------------------------------------------------------------------------- helpers

    def result(self) -> RunResult:
        return RunResult(
            run_dir=self.run_dir,
            best_epoch=self.stopping.best_epoch,
            epochs=self.progress.epochs,
            steps=self.progress.steps,
            train_losses=self.progress.train_losses,
            valid_metrics=self.stopping.best_metrics,
            train_seconds=self.progress.train_seconds + self.window.unrecorded_seconds(),
            skipped_steps=self.progress.skipped_steps,
            peak_rss_mib=peak_rss_mib(),
        )

    def log_scalars(self, scalars: dict[str, float]) -> None:
        self.trackers.log_scalars(scalars, self.progress.steps)

    def close_logs(self) -> None:
        if self.keys_log is not None:
            self.keys_log.close()
            self.keys_log = None


class StepWindow:
    """This rank's micro-batches since the last optimizer step (loss sum, count, samples) and the current
    epoch's clock and sample count."""

    def __init__(self) -> None:
        self.micro = 0
        self.loss_sum = self.count = self.samples = 0.0
        self.first_step = 0
        self.samples_in_epoch = 0
        self.epoch_start = time.perf_counter()
        self.in_epoch = False
        """Between :meth:`start_epoch` and :meth:`end_epoch`: the clock counts training time."""

    def start_epoch(self, first_step: int) -> None:
        self.first_step, self.samples_in_epoch, self.epoch_start = first_step, 0, time.perf_counter()
        self.in_epoch = True

    def end_epoch(self) -> float:
        """The epoch's training seconds (this job's part of it); the clock stops."""
        self.in_epoch = False
        return self.epoch_seconds()

    def unrecorded_seconds(self) -> float:
        """Training seconds of the epoch in progress, not yet added to the run's total (0 between
        epochs): what a checkpoint saved now must carry, or a resumed run would lose them."""
        return self.epoch_seconds() if self.in_epoch else 0.0

    def next_micro_batch(self, accum: int) -> bool:
        """Count a micro-batch; whether it ends an accumulation (an optimizer step)."""
        self.micro += 1
        return self.micro % accum == 0

    def add(self, loss_sum: float, count: float, samples: int) -> None:
        self.loss_sum, self.count, self.samples = (
            self.loss_sum + loss_sum,
            self.count + count,
            self.samples + samples,
        )

    def take(self, stop_flag: float, nonfinite_flag: float = 0.0) -> torch.Tensor:
        """The window as one tensor for the step's all-reduce (with this rank's stop flag and non-finite
        loss or gradient flag); then empty it."""
        values = torch.tensor(
            [self.loss_sum, self.count, self.samples, stop_flag, nonfinite_flag], dtype=torch.float64
        )
        self.loss_sum = self.count = self.samples = 0.0
        return values

    def epoch_seconds(self) -> float:
        return time.perf_counter() - self.epoch_start

    def throughput(self) -> float:
        return self.samples_in_epoch / max(self.epoch_seconds(), 1e-9)

    def postfix(self, progress: Progress, unit: str) -> dict[str, str]:
        return {"loss": f"{progress.train_losses[-1]:.4f}", f"{unit}_per_s": f"{self.throughput():.0f}"}


# ------------------------------------------------------------------------------------ set-up helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def check_resume_source(url: str, options: StorageOptions) -> None:
    """Refuse a ``run.resume`` URL that is not a complete checkpoint (ConfigError naming it), so that the
    job fails at once and not after the data set and the model were built. "" and "auto" pass."""
    if url in ("", "auto") or exists(join(url, COMMIT), options):
        return
    example = "e.g. run.resume=runs/NAME/checkpoints/step-000000100, or run.resume=auto with run.name=NAME"
    if not exists(url, options):
        raise ConfigError(f"run.resume={url}: nothing there; give a checkpoint ({example})")
    newest = CheckpointManager(url, options).latest()
    if newest is not None:
        raise ConfigError(
            f"run.resume={url} is a folder of checkpoints, not one checkpoint: give one of them, e.g. the "
            f"newest, run.resume={newest} (or run.resume=auto with this run's run.name)"
        )
    raise ConfigError(
        f"run.resume={url} is not a complete checkpoint (no {COMMIT} marker: not a checkpoint, or its save "
        f"did not finish); give a complete one ({example})"
    )


@contextlib.contextmanager
def run_folder(
    cfg: Config, world: World, options: StorageOptions, stop_request: StopRequest | None = None
) -> Iterator[RunFolder]:
    """The run folder of this job (trainer/run_folder.py), the same on every rank, leased by rank 0 for
    the duration of the block. A folder this job created and left empty (a failed start) is removed
    again; an earlier run that run.overwrite replaces stays until :func:`claim_run_folder`. Collective."""
    lease, created, folder, overwrite, error = None, False, "", False, ""
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
            if stop_request is not None:  # a process leaving after its SIGTERM grace frees the run too
                stop_request.on_grace_expired(lease.release)
        except RunFolderError as exc:
            error = str(exc)
    folder, overwrite, error = broadcast_object((folder, overwrite, error))  # type: ignore[misc]
    if error:
        if created and not os.listdir(folder):
            os.rmdir(folder)
        raise RunFolderError(error)
    try:
        yield RunFolder(folder, replaces=bool(overwrite))
    finally:
        if lease is not None:
            lease.release()
        if created and world.rank == 0 and os.path.isdir(folder):
            remove_failed_start(folder, world.world_size)


def claim_run_folder(folder: RunFolder, run_cfg: RunConfig, world: World, run_log: RunLog) -> None:
    """run.overwrite's point of no return, reached once the job is built (its config, data set, features,
    model and resume source passed their checks): rank 0 checks that the trackers answer, deletes the
    earlier run (but the lease), then every rank's held log goes to its file. A start that fails before
    leaves the earlier run as it was. Collective; nothing to do without run.overwrite."""
    if not folder.replaces:
        return
    failure: Exception | None = None
    if world.rank == 0:
        try:
            check_trackers(run_cfg)
            log.warning("run.overwrite: deleting the earlier run in %s", folder.path)
            empty_run_folder(folder.path, run_cfg.out_dir)
        except TrackingError as exc:
            failure = exc
        except (RunFolderError, OSError) as exc:
            failure = RunFolderError(f"run.overwrite: cannot delete the earlier run in {folder.path}: {exc}")
    failure = broadcast_object(failure)  # type: ignore[assignment]  # logs are written once the old are gone
    if failure is not None:
        raise failure
    run_log.write_held()


def check_folder_paths(cfg: Config) -> None:
    """Refuse a local data.path, data.features, run.out_dir or run.checkpoint_dir that is a file or lies
    under one (ConfigError naming the key and the file) before anything is built: the system's own words
    would be "Not a directory", naming neither."""
    paths = {
        "data.path": cfg.data.path,
        "data.features": cfg.data.features,
        "run.out_dir": cfg.run.out_dir,
        "run.checkpoint_dir": cfg.run.checkpoint_dir,
    }
    for key, path in paths.items():
        if not path or "://" in path:
            continue
        existing = os.path.abspath(path)
        while not os.path.exists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        if os.path.exists(existing) and not os.path.isdir(existing):
            where = "is a file" if existing == os.path.abspath(path) else f"lies under the file {existing}"
            raise ConfigError(f"{key}={path} {where}, not a folder: give a folder")


def remove_failed_start(folder: str, world_size: int) -> None:
    """Remove a run folder this job created if the start failed: nothing in it but the log files (the
    failure itself is on the terminal, its traceback with ``--debug``). Anything else keeps it."""
    logs = {log_file_name(rank) for rank in range(world_size)}
    if not set(os.listdir(folder)) <= logs:
        return
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)


# what a checkpoint's tensors depend on besides the model section: another value cannot load it
_SHAPING_KEYS = ("parallel.backend", "parallel.table_optimizer")


def incompatible(marker: dict[str, Any], identity: dict[str, Any], model_section: str) -> list[str]:
    """What differs between a checkpoint (its commit marker) and this run in ways the saved tensors cannot
    follow: the task, the data facts in ``identity`` (e.g. the item count), any setting of the config
    section ``model_section``, the dense backend, the table optimizer."""
    saved, now = marker.get("config"), identity["config"]
    if saved is None:  # written before configs were recorded
        return []
    saved = upgrade_saved_config(saved)
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


WEIGHT_BLOCK_ROWS = 65536
"""Table rows per block when the final weights are streamed to model.safetensors."""


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``) after a phase that allocates
    and frees large temporaries (an evaluation's item shard, the streamed final weights, a checkpoint).
    glibc serves blocks of up to 32 MiB from its heap once one such block was freed, and a fragmented
    heap keeps them resident: measured on the 1M-item 2-rank run of tests/integration/test_plan_memory.py,
    rank 0 stayed ~250 MiB higher after writing model.safetensors, on top of the test's own peak. Nothing
    where the C library has no ``malloc_trim`` (not glibc)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


@dataclasses.dataclass(frozen=True)
class WrittenWeights:
    """What one rank wrote of ``model.safetensors`` (:func:`save_weights`)."""

    pieces: dict[str, int]
    """Pieces written per tensor: whole dense tensors (rank 0) and blocks of table rows."""
    bytes: int
    largest_block_rows: dict[str, int]
    """Per table, the most rows this rank held at once."""


def save_weights(parallel: ParallelModel, path: str) -> WrittenWeights:
    """Write the trained weights to the local file ``path`` (safetensors, named like the model's state
    dict), every rank its own share: rank 0 writes the header and the dense weights, and block b of
    :data:`WEIGHT_BLOCK_ROWS` rows of each table is written by rank ``b % world_size``, which receives
    its rows from the ranks that hold them and writes them at their offset (``os.pwrite`` into a file
    whose size is set first). No rank holds a table or writes the whole file. All or nothing: the
    bytes go to a temporary name in the same folder, fsynced by every rank, renamed over ``path`` by
    rank 0 once all have written. The run folder is on a filesystem every node shares (docs/cluster.md).
    Collective. Returns what this rank wrote."""
    rank = dist.get_rank()
    layout, pieces = parallel.weight_pieces(WEIGHT_BLOCK_ROWS)
    tables = parallel.sparse.table_layout()
    prefix, spans = safetensors_header(layout)
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, str(broadcast_object(f".{name}.tmp-{os.urandom(6).hex()}")))
    counts: dict[str, int] = {}
    largest: dict[str, int] = {}
    written = 0
    try:
        if rank == 0:
            with open(temporary, "wb") as f:
                f.write(prefix)
                f.truncate(len(prefix) + sum(nbytes for _, nbytes in spans.values()))
        dist.barrier()
        fd = os.open(temporary, os.O_WRONLY)
        try:
            for key, first_row, block in pieces:
                dtype, shape = layout[key]
                block = block.detach().cpu().contiguous()
                if block.dtype != dtype or tuple(block.shape[1:]) != tuple(shape[1:]):
                    raise ValueError(
                        f"{path}: a piece of {key} is {block.dtype} {tuple(block.shape)}, not {dtype} {shape}"
                    )
                start, nbytes = spans[key]
                row_bytes = nbytes // max(1, shape[0]) if shape else nbytes
                data = memoryview(block.view(torch.uint8).numpy()) if block.numel() else memoryview(b"")
                offset = start + first_row * row_bytes
                while data:  # pwrite may write less than asked
                    done = os.pwrite(fd, data, offset)
                    data, offset, written = data[done:], offset + done, written + done
                counts[key] = counts.get(key, 0) + 1
                if key in tables:
                    largest[key] = max(largest.get(key, 0), block.shape[0])
            os.fsync(fd)
        finally:
            os.close(fd)
        dist.barrier()  # every rank's bytes are on disk
        if rank == 0:
            os.replace(temporary, path)
            directory = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename survives a crash
            finally:
                os.close(directory)
        dist.barrier()
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        if isinstance(error, StorageError):
            raise
        # a full disk's failed write names no file: name the one that could not be written
        raise StorageError(f"cannot write {path}: {error}") from error
    return WrittenWeights(counts, written, largest)
