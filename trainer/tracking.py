"""Experiment tracking: the run's scalars, config and report files, to TensorBoard and/or MLflow.

``run.loggers`` names the trackers (``["tensorboard"]`` by default); rank 0 opens them with
:func:`open_trackers` and the training loop talks to the :class:`Trackers` it returns, whichever they
are::

    trackers = open_trackers(cfg.run, run_dir, config, resumed=...)
    trackers.log_scalars({"train/loss": 4.1, "train/lr": 1e-3}, step)
    trackers.log_files([".../test_metrics.txt", ".../metrics_by_size.png"])
    trackers.close("FINISHED")

* ``tensorboard``: event files in ``<run dir>/tensorboard`` (the files of the run are in the run folder
  already).
* ``mlflow``: one MLflow run per run folder, named after it, in experiment ``run.mlflow_experiment`` at
  ``run.mlflow_tracking_uri`` (default ``sqlite:///<run.out_dir>/mlflow.db``, artefacts in
  ``<run.out_dir>/mlartifacts``). The same scalars (MLflow keys cannot hold ``@``: ``NDCG@10`` is
  logged as ``NDCG_at_10``), the resolved config as parameters (``optim.lr``, ...) and as the artefact
  ``config.yaml``, and the report's files as artefacts. A resumed run continues its MLflow run (its id is
  kept in ``<run dir>/mlflow_run.json``). A tracking server that stops answering during training is
  reported once, and training goes on without it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from trainer.config import RunConfig

log = logging.getLogger("fmrl")

MLFLOW_RUN_FILE = "mlflow_run.json"


class TrackingError(RuntimeError):
    """A tracker cannot be opened (e.g. the MLflow server does not answer); the message says which."""


class Tracker:
    """One tracking backend. Rank 0 only."""

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def log_files(self, paths: Iterable[str]) -> None:
        """Keep copies of these files of the run folder (the report) with the run."""

    def close(self, status: str) -> None:
        """End the run: ``status`` is "FINISHED", "FAILED" or "KILLED" (stopped early, to be resumed)."""


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, status: str) -> None:
        self.writer.close()


def mlflow_key(tag: str) -> str:
    """A scalar's tag as an MLflow key, which may hold letters, digits and ``_-. /:`` only."""
    return re.sub(r"[^\w\-. /:]", "_", tag.replace("@", "_at_"))


def default_tracking_uri(out_dir: str) -> str:
    return f"sqlite:///{os.path.abspath(out_dir)}/mlflow.db"


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


class MLflowTracker(Tracker):
    """One MLflow run per run folder (continued on resume), through ``MlflowClient``."""

    def __init__(self, run_cfg: RunConfig, run_dir: str, config: Mapping[str, Any], resumed: bool) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.uri = run_cfg.mlflow_tracking_uri or default_tracking_uri(run_cfg.out_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.broken = False
        try:
            record = os.path.join(run_dir, MLFLOW_RUN_FILE)
            self.run_id = self._previous_run(record) if resumed else None
            if self.run_id is not None:
                self.client.update_run(self.run_id, status="RUNNING")
                log.info("MLflow: continuing run %s at %s", self.run_id, self.uri)
                return
            experiment = self._experiment(run_cfg)
            run = self.client.create_run(
                experiment, run_name=os.path.basename(run_dir), tags={"fmrl.run_dir": run_dir}
            )
            self.run_id = run.info.run_id
            with open(f"{record}.tmp", "w") as f:
                json.dump({"tracking_uri": self.uri, "run_id": self.run_id}, f)
            os.replace(f"{record}.tmp", record)
            params = [Param(key, value[:6000]) for key, value in _flatten(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                self.client.log_batch(self.run_id, params=params[start : start + 100])
            log.info(
                "MLflow: run %s in experiment %r at %s", self.run_id, run_cfg.mlflow_experiment, self.uri
            )
        except Exception as error:
            raise _unreachable(self.uri, error) from error

    def _previous_run(self, record: str) -> str | None:
        """The MLflow run of an earlier job of this run folder, at the same tracking URI."""
        try:
            with open(record) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return None
        if saved.get("tracking_uri") != self.uri:
            return None
        return str(saved["run_id"])

    def _experiment(self, run_cfg: RunConfig) -> str:
        from mlflow.exceptions import MlflowException

        name = run_cfg.mlflow_experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        # a local store's artefacts go beside it, not into the current directory (MLflow's default)
        location = None
        if not run_cfg.mlflow_tracking_uri:
            location = f"{os.path.abspath(run_cfg.out_dir)}/mlartifacts"
        try:
            return str(self.client.create_experiment(name, artifact_location=location))
        except MlflowException:  # another job created it at the same moment
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def _call(self, what: str, *args: Any, **kwargs: Any) -> None:
        if self.broken:
            return
        try:
            getattr(self.client, what)(self.run_id, *args, **kwargs)
        except Exception as error:  # tracking must not end a training run
            self.broken = True
            log.warning("MLflow at %s failed (%s); training goes on without MLflow logging", self.uri, error)

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(tag), float(value), now, step) for tag, value in scalars.items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per call
            self._call("log_batch", metrics=metrics[start : start + 1000])

    def log_files(self, paths: Iterable[str]) -> None:
        for path in paths:
            self._call("log_artifact", path)

    def close(self, status: str) -> None:
        self._call("set_terminated", status=status)


class Trackers:
    """The trackers of ``run.loggers``, used as one."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_scalars(scalars, step)

    def log_files(self, paths: Iterable[str]) -> None:
        existing = [path for path in paths if os.path.isfile(path)]
        for tracker in self.trackers:
            tracker.log_files(existing)

    def close(self, status: str) -> None:
        trackers, self.trackers = self.trackers, []  # closed once, whatever happens next
        for tracker in trackers:
            tracker.close(status)


def _unreachable(uri: str, error: Exception) -> TrackingError:
    return TrackingError(
        f"MLflow at {uri} (run.mlflow_tracking_uri): {error}. Check the URI and that the server answers, "
        "or leave mlflow out of run.loggers"
    )


def check_trackers(run_cfg: RunConfig) -> None:
    """Raise :class:`TrackingError` now if MLflow is in ``run_cfg.loggers`` and does not answer, before
    anything is logged: run.overwrite deletes the earlier run only once this passed. (TensorBoard writes
    local files in the run folder: nothing to reach.)"""
    if "mlflow" not in run_cfg.loggers:
        return
    from mlflow import MlflowClient

    uri = run_cfg.mlflow_tracking_uri or default_tracking_uri(run_cfg.out_dir)
    try:
        MlflowClient(tracking_uri=uri).get_experiment_by_name(run_cfg.mlflow_experiment)
    except Exception as error:
        raise _unreachable(uri, error) from error


def open_trackers(run_cfg: RunConfig, run_dir: str, config: Mapping[str, Any], resumed: bool) -> Trackers:
    """The trackers named in ``run_cfg.loggers``, open on ``run_dir``; ``config`` is the resolved config
    (a plain mapping), ``resumed`` whether the job continues an earlier one of this run folder."""
    trackers: list[Tracker] = []
    for name in run_cfg.loggers:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir))
        elif name == "mlflow":
            trackers.append(MLflowTracker(run_cfg, run_dir, config, resumed))
    return Trackers(trackers)
