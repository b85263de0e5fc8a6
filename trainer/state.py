"""The training loop's own state, as objects with ``state_dict()`` / ``load_state_dict()`` that the
checkpoint manager saves and loads as they are (trainer/checkpoint.py, :class:`TrainingState`):

* :class:`Progress`: steps, losses, epochs and training time so far;
* :class:`EarlyStopping`: the best validation score, its epoch, step and metrics, and the patience used;
* :class:`RankPositions`: where every rank is in its data and its random streams (data loader, torch RNG,
  the task's own, e.g. a negative sampler's), for an exact resume or, at another world size, a
  resharded one.

Each ``state_dict()`` returns top-level entries of the DCP state of a checkpoint; JSON strings, since DCP
stores non-tensor values with ``torch.save`` and they are read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("fmrl")


class DivergedError(RuntimeError):
    """Training produced a non-finite loss, gradient norm or weight: the run failed (exit code 1)."""


@dataclass
class Progress:
    """How far training has come."""

    steps: int = 0
    """Optimizer steps taken."""
    train_losses: list[float] = field(default_factory=list)
    """The loss of every optimizer step (the mean over all ranks' loss terms), in order."""
    epochs: int = 0
    """Epochs finished (the last one may have been cut short by train.max_steps)."""
    train_seconds: float = 0.0
    """Wall time of the optimisation steps (evaluation excluded)."""
    skipped_steps: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient norm (train.skip_nonfinite_steps)."""

    def epoch_loss(self, first_step: int) -> float:
        """Mean loss of the steps from ``first_step`` on (skipped steps' non-finite losses left out)."""
        losses = [loss for loss in self.train_losses[first_step:] if math.isfinite(loss)]
        return sum(losses) / len(losses) if losses else math.nan


@dataclass
class EarlyStopping:
    """The best validation score so far and the epochs since it; stop after ``patience`` without gain.
    A non-finite score (NaN, infinity: a diverged model's) is never the best."""

    patience: int
    best_score: float = float("-inf")
    epochs_without_gain: int = 0
    best_epoch: int = 0
    best_step: int = 0
    """Step of the checkpoint that holds the best weights (saved at that epoch's end); 0 if none yet."""
    best_metrics: Any = field(default_factory=dict)
    """Validation metrics of the best epoch (JSON-able)."""

    def update(self, score: float, epoch: int, step: int, metrics: Any) -> bool:
        """Record an epoch's validation; True if it is the best so far (never for a non-finite score)."""
        if math.isfinite(score) and score > self.best_score:
            self.best_score, self.epochs_without_gain = score, 0
            self.best_epoch, self.best_step, self.best_metrics = epoch, step, metrics
            return True
        self.epochs_without_gain += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.epochs_without_gain >= self.patience


class RunState:
    """:class:`Progress` and :class:`EarlyStopping` as one checkpoint entry, ``run`` (JSON)."""

    def __init__(
        self, progress: Progress, stopping: EarlyStopping, world_size: int, metrics_from_json: Any = None
    ) -> None:
        self.progress, self.stopping, self.world_size = progress, stopping, world_size
        self.metrics_from_json = metrics_from_json
        """How the task reads its metrics back from JSON (whose object keys are strings)."""

    def state_dict(self) -> dict[str, Any]:
        p, s = self.progress, self.stopping
        run = {
            "steps": p.steps,
            "train_losses": p.train_losses,
            "epochs": p.epochs,
            "train_seconds": p.train_seconds,
            "skipped_steps": p.skipped_steps,
            "best_epoch": s.best_epoch,
            "valid_metrics": s.best_metrics,
            "best_score": s.best_score,
            "epochs_without_gain": s.epochs_without_gain,
            "best_step": s.best_step,
            "world_size": self.world_size,
        }
        return {"run": json.dumps(run)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        run = json.loads(state["run"])
        p, s = self.progress, self.stopping
        p.steps, p.train_losses = run["steps"], run["train_losses"]
        p.epochs, p.train_seconds = run.get("epochs", 0), run["train_seconds"]
        p.skipped_steps = run.get("skipped_steps", 0)
        s.best_epoch, s.best_score = run["best_epoch"], run["best_score"]
        s.epochs_without_gain, s.best_step = run["epochs_without_gain"], run.get("best_step", 0)
        metrics = run["valid_metrics"]
        s.best_metrics = self.metrics_from_json(metrics) if self.metrics_from_json is not None else metrics


class RankPositions:
    """Every rank's position in its data and random streams, gathered into one checkpoint entry,
    ``positions`` (JSON): the data loader's state, the torch RNG state and the task's ``rank_state``."""

    def __init__(self, loader: Any, task: Any, rank: int, world_size: int) -> None:
        self.loader, self.task, self.rank, self.world_size = loader, task, rank, world_size
        self.exact = True
        """Whether the last load resumed in the saving layout (else the epoch continues resharded)."""

    def state_dict(self) -> dict[str, Any]:
        """Collective: gathers every rank's position."""
        gathered: list[Any] = [None] * self.world_size
        mine = {
            "loader": self.loader.state_dict(),
            "torch_rng": torch.get_rng_state().tolist(),
            **self.task.rank_state(),
        }
        dist.all_gather_object(gathered, mine)
        return {"positions": json.dumps(gathered)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from the saved ranks' positions: this rank's own when the layout is the same (exact),
        else the epoch in progress goes on with the samples no saved rank had read (the loader decides),
        and rank r takes saved rank r's random streams where it exists."""
        positions = json.loads(state["positions"])
        self.exact = self.loader.resume([p["loader"] for p in positions])
        if self.rank < len(positions):
            torch.set_rng_state(torch.tensor(positions[self.rank]["torch_rng"], dtype=torch.uint8))
            self.task.load_rank_state(positions[self.rank])
        self.saved = positions

    def describe_saved_layout(self) -> str:
        first = self.saved[0]["loader"]
        return ", ".join(f"{k}={first[k]}" for k in ("num_workers", "batch_size"))
