"""Matryoshka training loss of fMRLRec: full-softmax cross-entropy at every non-pad position and every
nested size, averaged with equal weights over sizes (the official code's reduction).

Unlike the official code, the softmax runs over the N real items only: the padding id is never a target
and is not a candidate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.ops import chunk_rows_for_budget, matryoshka_cross_entropy


def matryoshka_loss(
    hidden: torch.Tensor,
    items: torch.Tensor,
    labels: torch.Tensor,
    sizes: Sequence[int],
    chunk_mb: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss over the positions whose label is not padding.

    Args:
        hidden: (B, L, D) output states.
        items: (N+1, D) item table including the pad row 0.
        labels: (B, L) next-item ids, 0 where there is no target.
        sizes: the nested sizes.
        chunk_mb: memory budget of one chunk of score buffers.

    Returns:
        (loss, per_size_loss): a scalar and a detached (K,) tensor.
    """
    valid = labels > 0  # (B, L)
    scored = hidden[valid]  # (P, D)
    targets = labels[valid] - 1  # (P,) indices into the candidates items[1:]
    chunk_rows = chunk_rows_for_budget(items.shape[0] - 1, len(sizes), chunk_mb * 2**20)
    return matryoshka_cross_entropy(scored, items, targets, sizes, chunk_rows, first_item=1)
