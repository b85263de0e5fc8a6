"""Full-ranking leave-one-out metrics: NDCG@K, Recall@K and MRR@K, per nested size.

Every item is a candidate (no sampled negatives). With a single held-out target, Recall@K equals the hit
rate, NDCG@K = 1 / log2(rank + 2) when the 0-based rank is below K, and MRR@K = 1 / (rank + 1) likewise.
The rank counts the items scored strictly higher than the target.

Whether the user's history items are excluded from the ranking is a switch: fMRLRec does not exclude
them (its default here), LRURec does. The target itself is never excluded, even if it is in the history.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

METRIC_NAMES = ("NDCG", "Recall", "MRR")


def target_ranks(
    scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None = None
) -> torch.Tensor:
    """0-based rank of each target among all items. A NaN counts against the model: an item scored NaN
    is above the target, and so is every item when the target's score is NaN (a diverged model ranks
    its targets last, never first).

    Args:
        scores: (B, N) scores of items 1..N (column j is item j + 1).
        targets: (B,) target item ids in 1..N.
        history: optional (B, L) item ids to exclude (0 = padding, ignored).
    """
    column = (targets - 1).unsqueeze(1)  # (B, 1)
    target_score = scores.gather(1, column)  # (B, 1)
    higher = (scores <= target_score).logical_not_()  # (B, N); "not below": true for a NaN on either side
    higher.scatter_(1, column, False)  # the target is not above itself
    if history is not None:
        # column 0 of `seen` is the padding id; every write is True, so repeated ids are harmless
        seen = torch.zeros(scores.shape[0], scores.shape[1] + 1, dtype=torch.bool, device=scores.device)
        seen.scatter_(1, history, True)
        higher &= ~seen[:, 1:]  # item j + 1 in column j; the target is already not counted
    return higher.sum(dim=1)  # (B,)


class RankingMetrics:
    """Accumulates per-size metric sums over evaluation batches."""

    def __init__(self, ks: Sequence[int]) -> None:
        self.ks = list(ks)
        self._sums: dict[int, dict[str, float]] = {}
        self._counts: dict[int, int] = {}

    def update(self, size: int, ranks: torch.Tensor) -> None:
        sums = self._sums.setdefault(size, {f"{m}@{k}": 0.0 for m in METRIC_NAMES for k in self.ks})
        ranks = ranks.double()
        for k in self.ks:
            hit = ranks < k
            sums[f"NDCG@{k}"] += torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0).sum().item()
            sums[f"Recall@{k}"] += hit.sum().item()
            sums[f"MRR@{k}"] += torch.where(hit, 1.0 / (ranks + 1.0), 0.0).sum().item()
        self._counts[size] = self._counts.get(size, 0) + ranks.numel()

    def sums(self) -> dict[int, dict[str, float]]:
        """Per-size metric sums so far (to be added over ranks)."""
        return {size: dict(sums) for size, sums in self._sums.items()}

    def count(self, size: int) -> int:
        """Users scored at ``size`` so far."""
        return self._counts.get(size, 0)

    def compute(self) -> dict[int, dict[str, float]]:
        """{size: {"NDCG@10": value, ...}} averaged over all users seen."""
        return {
            size: {name: total / self._counts[size] for name, total in sums.items()}
            for size, sums in sorted(self._sums.items())
        }
