"""Evaluation of click-through-rate models (DLRM): exact ROC AUC and log loss of a split over all ranks,
the constant predictor's log loss (the denominator of the normalised entropy), the early-stopping score.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.ctr import iter_ctr_batches, split_shards
from data_pipeline.storage import StorageOptions
from models.dlrm import ctr_loss, roc_auc
from sharding.dlrm import ParallelDLRM
from sharding.world import World
from trainer.logs import progress_bar


def evaluate_ctr(
    parallel: ParallelDLRM,
    url: str,
    split: str,
    batch_size: int,
    world: World,
    options: StorageOptions | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """ROC AUC and mean log loss of ``split``, exact over all its impressions, in batches of ``batch_size``
    impressions over all ranks. Rank r reads shards r, r+R, ... of the split (:func:`split_shards`), so
    the split is read once in all. The table lookups are collective: every rank makes as many forward
    calls as the rank with the most batches, a rank with no rows left looking up one dummy row. The
    scores are gathered on every rank. The AUC is NaN if the split has one class only. ``progress`` shows
    a progress bar."""
    per_rank = max(1, batch_size // world.world_size)
    rows = sum(
        e.samples for e in split_shards(url, split, options, rank=world.rank, world_size=world.world_size)
    )
    # on the tables' device: NCCL, the default group on GPUs, has no CPU tensors
    calls = torch.tensor([math.ceil(rows / per_rank)], device=parallel.sparse.device)
    dist.all_reduce(calls, op=dist.ReduceOp.MAX)
    batches = iter_ctr_batches(
        url, split, per_rank, options=options, rank=world.rank, world_size=world.world_size
    )
    scores, labels = [], []
    parallel.set_training(False)
    with torch.no_grad():
        for _ in progress_bar(range(int(calls[0])), total=int(calls[0]), desc=split, enabled=progress):
            batch = next(batches, None)
            if batch is None:  # this rank is done: it still joins the lookup, with one row
                parallel.forward(
                    torch.zeros(1, parallel.model.cfg.num_dense),
                    torch.zeros(1, parallel.model.cfg.num_sparse, dtype=torch.int64),
                )
                continue
            scores.append(parallel.forward(batch.dense, batch.sparse).cpu())
            labels.append(batch.labels)
    parallel.set_training(True)
    mine = (torch.cat(scores).numpy(), torch.cat(labels).numpy()) if scores else None
    parts: list[Any] = [None] * world.world_size
    dist.all_gather_object(parts, mine)
    logits = torch.from_numpy(np.concatenate([p[0] for p in parts if p is not None]))
    clicks = torch.from_numpy(np.concatenate([p[1] for p in parts if p is not None]))
    return ctr_metrics(logits, clicks)


def ctr_metrics(logits: torch.Tensor, clicks: torch.Tensor) -> dict[str, float]:
    """AUC, log loss and count of the (N,) ``logits`` of impressions with (N,) ``clicks``. The AUC is
    NaN with one class only; a NaN logit counts against the model, as in the ranking metrics: a
    clicked impression scored NaN ranks below every other, an unclicked one above (the log loss of
    such a model is NaN)."""
    logloss = float(ctr_loss(logits.double(), clicks))
    flat, clicked = logits.reshape(-1), clicks.reshape(-1) > 0.5  # (N,), (N,)
    nan = flat.isnan()
    if bool(nan.any()):
        flat = flat.masked_fill(nan & clicked, -math.inf).masked_fill(nan & ~clicked, math.inf)
    try:
        auc = roc_auc(flat, clicks)
    except ValueError:  # one class only
        auc = float("nan")
    return {"auc": auc, "logloss": logloss, "impressions": float(len(clicks))}


def constant_logloss(train_rate: float, test_rate: float) -> float:
    """Mean log loss on a split with click rate ``test_rate`` of always predicting ``train_rate``."""
    p = min(max(train_rate, 1e-12), 1 - 1e-12)
    return -(test_rate * math.log(p) + (1 - test_rate) * math.log(1 - p))


def ctr_score(metrics: dict[str, float]) -> float:
    """Early-stopping score: the AUC, or minus the log loss on a split with one class (no AUC)."""
    return metrics["auc"] if math.isfinite(metrics["auc"]) else -metrics["logloss"]
