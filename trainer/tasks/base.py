"""The interface between the training loop (trainer/train.py) and a model family: a :class:`TrainingTask`
builds its data loader and its distributed model, steps one micro-batch, evaluates a split, reports.

Adding a model family: write ``trainer/tasks/<name>.py`` with a subclass of :class:`TrainingTask` (its
``from_config`` takes the sections it needs), register it in :data:`trainer.tasks.TASKS`, and add its
config section to trainer/config.py (docs/architecture.md walks through it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from data_pipeline.loader import ShardBatchLoader
from data_pipeline.storage import StorageOptions
from sharding.core import ParallelModel
from sharding.world import World

Metrics = Any
"""A task's metrics of one split: JSON-able (fMRL: {size: {name: value}}, DLRM: {name: value})."""


@dataclass
class RunResult:
    """What a training run ends with (every rank has it; rank 0 reports it)."""

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
    skipped_steps: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient norm (train.skip_nonfinite_steps)."""


class TrainingTask:
    """One model family in the shared loop. ``from_config`` opens the data set, builds the loader and the
    distributed model and sets the attributes below; the methods are the loop's per-family steps."""

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
    progress_bar: bool = False
    """Show a progress bar while evaluating (run.progress_bar, on rank 0)."""

    def __init__(
        self,
        *,
        model: Any,
        data: Any,
        train: Any,
        optim: Any,
        parallel: Any,
        evaluation: Any,
        export: bool,
        world: World,
        device: torch.device,
        options: StorageOptions,
    ) -> None:
        """Build the task from the config sections it uses: ``model`` is its own model section (the one
        :attr:`model_section` names), the others are ``data``, ``train``, ``optim``, ``parallel``,
        ``eval`` and ``run.export``."""
        raise NotImplementedError

    @classmethod
    def from_config(
        cls, cfg: Any, world: World, device: torch.device, options: StorageOptions
    ) -> TrainingTask:
        """The task of a run's config (``trainer.config.Config``): the one place that reads the root."""
        task = cls(
            model=getattr(cfg, cls.model_section),
            data=cfg.data,
            train=cfg.train,
            optim=cfg.optim,
            parallel=cfg.parallel,
            evaluation=cfg.eval,
            export=cfg.run.export,
            world=world,
            device=device,
            options=options,
        )
        task.progress_bar = cfg.run.progress_bar and world.rank == 0
        return task

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


def total_training_steps(loader: ShardBatchLoader, epochs: int, grad_accum_steps: int, max_steps: int) -> int:
    """Optimizer steps of ``epochs`` epochs of ``loader`` (at least 1), capped by ``max_steps`` (0: none)."""
    steps = sum(loader.steps_in_epoch(epoch) for epoch in range(epochs)) // grad_accum_steps
    if max_steps:
        steps = min(steps, max_steps)
    return max(steps, 1)


def write_json(obj: object, path: str) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file (readers never see half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
