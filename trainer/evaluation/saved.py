"""Metrics of saved weights without training (``fmrl eval``): a finished run folder or a checkpoint,
evaluated in this one process on the validation or test split of its data set.

    fmrl eval runs/demo                                   # the best model's test metrics per nested size
    fmrl eval runs/demo/checkpoints/step-000000140 --split valid eval.max_users=500
    fmrl eval runs/dlrm-synthetic                         # DLRM: AUC, log loss, normalised entropy

fMRL: full ranking over all items at every nested size, with the most-popular baseline, the same table
as the end of training (:func:`~trainer.evaluation.ranking.evaluate_model` is the single-device
reference of the distributed evaluation). DLRM: exact AUC and log loss over every impression of the
split. The model is loaded by :func:`trainer.export.load_model`; the settings of the evaluation (``eval``,
``train.max_len``, ``data``) are the run's own unless overridden.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_pipeline.storage import StorageOptions
from trainer.config import Config, ConfigError, with_overrides
from trainer.report import format_size_table

SPLITS = ("test", "valid")

# what the saved weights were built with: an evaluation cannot change it
_FIXED_SECTIONS = ("task", "model", "dlrm", "parallel")


@dataclass
class SavedEvaluation:
    """What :func:`evaluate_saved` measured."""

    source: str
    split: str
    task: str
    metrics: Any
    """fMRL: {size: {"NDCG@10": ...}}; DLRM: {"auc", "logloss", "ne", "impressions"}."""
    baseline: Any
    """fMRL: most-popular's metrics; DLRM: the constant click rate's."""
    table: str
    """The metrics as the end of training prints them."""


def evaluate_saved(
    source: str, split: str = "test", overrides: Sequence[str] = (), options: StorageOptions | None = None
) -> SavedEvaluation:
    """Evaluate the model saved at ``source`` (run folder or checkpoint) on ``split``; ``overrides``
    (``eval.max_users=500``, ``data.path=...``) change the run's evaluation settings. ``options`` default
    to the environment's for ``source`` and the run's ``data`` settings for its data set."""
    from trainer.export import load_model, source_config

    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    fixed = [o for o in overrides if o.partition("=")[0].strip().split(".")[0] in _FIXED_SECTIONS]
    if fixed:
        raise ConfigError(
            f"{fixed[0]!r}: the saved weights fix the sections {', '.join(_FIXED_SECTIONS)}; an evaluation "
            "may change eval.*, train.max_len and data.*"
        )
    # the run's own endpoint (data.s3_endpoint_url) for its data set, unless the caller gave options
    cfg = with_overrides(source_config(source, options or StorageOptions.from_env()), overrides)
    options = options or cfg.data.storage_options()
    model = load_model(source, options, features=cfg.data.features_url)
    if cfg.task == "dlrm":
        return _evaluate_dlrm(source, split, cfg, model, options)
    return _evaluate_fmrl(source, split, cfg, model, options)


def _evaluate_fmrl(
    source: str, split: str, cfg: Config, model: Any, options: StorageOptions
) -> SavedEvaluation:
    from data_pipeline.loader import SequenceDataset, eval_batches, scan_users
    from trainer.evaluation.metrics import RankingMetrics
    from trainer.evaluation.ranking import evaluate_model, popularity_ranks

    ev = cfg.eval
    dataset = SequenceDataset.open(cfg.data.path, options)
    if dataset.num_items != model.num_items:
        raise ValueError(
            f"the data set {dataset.url} has {dataset.num_items} items, the model {model.num_items}: "
            "evaluate on the data set it was trained on (data.path=...)"
        )

    def batches() -> Any:
        return eval_batches(dataset, split, ev.batch_size, cfg.train.max_len, max_users=ev.max_users)

    sizes = list(cfg.model.nested_sizes)
    metrics = evaluate_model(model, batches(), sizes, ev.ks, ev.exclude_history)
    popularity = torch.from_numpy(scan_users(dataset).train_item_counts[1:].astype(np.float64))  # (N,)
    ordered = torch.sort(popularity).values  # (N,) once for all batches
    popular = RankingMetrics(ev.ks)
    for batch in batches():
        history = batch.tokens if ev.exclude_history else None
        popular.update(0, popularity_ranks(ordered, popularity, batch.targets, history))
    baseline = popular.compute()[0]
    table = format_size_table(metrics, ev.ks, baseline)
    return SavedEvaluation(source, split, "fmrl", metrics, baseline, table)


def _evaluate_dlrm(
    source: str, split: str, cfg: Config, model: Any, options: StorageOptions
) -> SavedEvaluation:
    from data_pipeline.ctr import CTRDataset, iter_ctr_batches
    from models.dlrm import ids_to_kjt
    from trainer.evaluation.ctr import constant_logloss, ctr_metrics
    from trainer.tasks.base import RunResult
    from trainer.tasks.dlrm import format_ctr_table

    dataset = CTRDataset.open(cfg.data.path, options)
    logits, labels = [], []
    with torch.no_grad():
        for batch in iter_ctr_batches(dataset.url, split, cfg.eval.batch_size, options=options):
            kjt = ids_to_kjt(batch.sparse.long(), model.cfg.sparse_names)
            logits.append(model(batch.dense.float(), kjt))
            labels.append(batch.labels)
    measured = ctr_metrics(torch.cat(logits), torch.cat(labels))
    rates = dataset.meta["splits"]
    baseline_loss = constant_logloss(rates["train"]["positive_rate"], rates[split]["positive_rate"])
    metrics = {
        "auc": measured["auc"],
        "logloss": measured["logloss"],
        "ne": measured["logloss"] / baseline_loss,
        "impressions": measured["impressions"],
    }
    baseline = {"auc": 0.5, "logloss": baseline_loss, "ne": 1.0}
    table = format_ctr_table(RunResult(run_dir=source, test_metrics=metrics, baseline_metrics=baseline))
    return SavedEvaluation(source, split, "dlrm", metrics, baseline, table)
