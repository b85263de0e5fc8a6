"""Evaluation of the fMRL model at every nested size, and of a most-popular baseline."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from data_pipeline.sequences import EvalBatch
from models.fmrl import FMRLRec, nested_scores
from trainer.metrics import RankingMetrics, target_ranks


@torch.no_grad()
def evaluate(
    model: FMRLRec,
    batches: Iterable[EvalBatch],
    sizes: Sequence[int],
    ks: Sequence[int],
    exclude_history: bool,
) -> dict[int, dict[str, float]]:
    """Full-ranking metrics per nested size: {size: {"NDCG@10": ..., ...}}."""
    was_training = model.training
    model.eval()
    items = model.item_tower()  # (N+1, D), once for all batches
    metrics = RankingMetrics(ks)
    for batch in batches:
        hidden, _ = model(batch.tokens, items)  # (B, L, D)
        scores = nested_scores(hidden[:, -1], items[1:], sizes)  # {m: (B, N)}
        for size, size_scores in scores.items():
            history = batch.tokens if exclude_history else None
            metrics.update(size, target_ranks(size_scores, batch.targets, history))
    model.train(was_training)
    return metrics.compute()


def evaluate_popularity(
    popularity: torch.Tensor, batches: Iterable[EvalBatch], ks: Sequence[int], exclude_history: bool
) -> dict[str, float]:
    """Metrics of ranking every user's candidates by training popularity."""
    metrics = RankingMetrics(ks)
    for batch in batches:
        scores = popularity.expand(len(batch.targets), -1)  # (B, N)
        metrics.update(0, target_ranks(scores, batch.targets, batch.tokens if exclude_history else None))
    return metrics.compute()[0]
