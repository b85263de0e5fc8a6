"""Exact ROC AUC for click prediction (ties count one half), in torch: no sklearn / torchmetrics needed."""

from __future__ import annotations

import torch


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` (N,) for binary ``labels`` (N,), exactly.

    It is the Mann-Whitney statistic: the fraction of (positive, negative) pairs in which the positive
    scores higher, a tie counting 1/2. Computed from average ranks in O(N log N): with ranks 1..N (tied
    scores share their average rank), AUC = (sum of the positives' ranks - P(P+1)/2) / (P N_neg).
    ValueError when one class is absent (the AUC is undefined).
    """
    scores = scores.detach().reshape(-1).double()
    positive = labels.detach().reshape(-1) > 0.5
    if scores.shape != positive.shape:
        raise ValueError(f"scores and labels differ in size: {scores.numel()} vs {positive.numel()}")
    num_pos = int(positive.sum())
    num_neg = positive.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"ROC AUC needs both classes, got {num_pos} positives and {num_neg} negatives")
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of each distinct score's last occurrence
    average_rank = ends - (counts.double() - 1.0) / 2.0  # (U,)
    rank_sum = average_rank[inverse][positive].sum().item()
    return (rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)
