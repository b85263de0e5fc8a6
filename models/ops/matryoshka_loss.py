"""Matryoshka full-softmax cross-entropy over all items, at every nested size, without the logits tensor.

The loss is the mean over nested sizes m of the mean cross-entropy of ``hidden[:, :m] @ items[:, :m].T``
against ``targets``. Materialising those logits for every size needs K x P x N floats (K sizes, P
positions, N items): 1.2 GB for the paper's Clothing set. Here:

* size m_i's scores are a running sum of per-block partial products
  ``hidden[:, m_{i-1}:m_i] @ items[:, m_{i-1}:m_i].T``, so all K sizes cost one P x N x D product;
* rows are processed in chunks whose K score buffers fit a memory budget;
* each size's log-softmax runs in place, row by row (a row of N scores stays in cache), and the gradients
  are formed inside the forward pass, chunk by chunk: size m's softmax minus one-hot is multiplied with
  the first m columns of the candidates and of the hidden states (GEMMs whose inner dimension is N, not a
  narrow block), so nothing of size P x N is kept for backward. Backward only scales the stored
  gradients.

``matryoshka_cross_entropy_reference`` materialises every size's logits, as the official code does; tests
compare the two, values and gradients.

Shapes: P scored positions, D width, N items, K nested sizes. hidden: (P, D); items: (N, D); targets: (P,)
with values in [0, N).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_MIN_EXPONENT = -60.0


def chunk_rows_for_budget(num_items: int, num_sizes: int, budget_bytes: int) -> int:
    """Rows per chunk such that K fp32 score buffers of (rows, N) fit in ``budget_bytes``."""
    return max(1, budget_bytes // (4 * num_sizes * num_items))


class _MatryoshkaCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, item_table, targets, sizes, chunk_rows, first_item, with_grad):  # noqa: D102
        num_rows, _ = hidden.shape
        items = item_table[first_item:]  # (N, D) candidates, a view
        num_items = items.shape[0]
        num_sizes = len(sizes)
        starts = (0, *sizes[:-1])
        per_size = torch.zeros(num_sizes, dtype=torch.float64, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if with_grad else None
        # rows before first_item (padding) are not candidates: their gradient stays zero
        grad_table = torch.zeros_like(item_table) if with_grad else None

        buffer = hidden.new_empty(num_sizes, min(chunk_rows, num_rows), num_items)
        for row0 in range(0, num_rows, chunk_rows):
            rows = slice(row0, min(row0 + chunk_rows, num_rows))
            h = hidden[rows]  # (c, D)
            t = targets[rows]  # (c,)
            c = h.shape[0]
            scores = buffer[:, :c]  # (K, c, N): per size the logits, then log-probabilities, then gradients
            arange = torch.arange(c, device=h.device)
            # size i's logits = size i-1's logits + block i's partial product: all sizes cost one
            # (c, N, D) product, written once each
            for i, (a, b) in enumerate(zip(starts, sizes)):
                if i == 0:
                    torch.mm(h[:, a:b], items[:, a:b].T, out=scores[0])
                else:
                    torch.addmm(scores[i - 1], h[:, a:b], items[:, a:b].T, out=scores[i])
            for i, m in enumerate(sizes):
                s = scores[i]
                # row-wise in place: each row is read and written while it sits in cache
                torch.log_softmax(s, dim=1, out=s)
                per_size[i] -= s[arange, t].double().sum()
                if not with_grad:
                    continue
                # softmax - onehot; the clamp keeps probabilities below exp(-60) from becoming subnormal
                # floats, which make the GEMMs below ~5x slower on x86 CPUs (it changes each by less
                # than exp(-60), far below fp32 resolution). The 1/(P K) scale is applied in backward.
                s.clamp_(min=_MIN_EXPONENT).exp_()
                s[arange, t] -= 1.0
                # full-width products (inner dimension N): size m's gradient reaches dims [:m] of the
                # hidden states and of the candidates
                grad_hidden[rows, :m].addmm_(s, items[:, :m])
                grad_table[first_item:, :m].addmm_(s.T, h[:, :m])

        per_size_mean = (per_size / num_rows).to(hidden.dtype)
        if with_grad:
            ctx.save_for_backward(grad_hidden, grad_table)
            ctx.scale = 1.0 / (num_rows * num_sizes)  # d(mean over rows and sizes) / d(one row's CE)
            ctx.backward_done = False
        return per_size_mean.mean(), per_size_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_size):  # noqa: D102
        if ctx.backward_done:
            raise RuntimeError(
                "the fused Matryoshka loss supports one backward pass per forward pass (its gradients are "
                "formed in the forward pass and scaled in place); run the forward pass again"
            )
        ctx.backward_done = True
        grad_hidden, grad_table = ctx.saved_tensors
        scale = grad_loss * ctx.scale
        # in place: a scaled copy would add another (N, D) table to the memory peak
        return grad_hidden.mul_(scale), grad_table.mul_(scale), None, None, None, None, None


def matryoshka_cross_entropy(
    hidden: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    sizes: Sequence[int],
    chunk_rows: int,
    first_item: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Matryoshka loss. Returns (loss, per_size_loss): a scalar and a detached (K,) tensor.

    Args:
        hidden: (P, D) output states at the scored positions.
        items: (N + first_item, D) item table; rows ``first_item:`` are the N candidates (1 leaves out a
            padding row 0 without slicing outside the op, which would cost a full-size gradient copy).
        targets: (P,) candidate indices in [0, N).
        sizes: nested sizes, strictly increasing, the last one equal to D.
        chunk_rows: rows per chunk (see ``chunk_rows_for_budget``).
        first_item: index of the first candidate row of ``items``.
    """
    if hidden.shape[1] != sizes[-1] or items.shape[1] != sizes[-1]:
        raise ValueError(
            f"width mismatch: hidden {tuple(hidden.shape)}, items {tuple(items.shape)}, sizes {sizes}"
        )
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or items.requires_grad)
    loss, per_size = _MatryoshkaCrossEntropy.apply(
        hidden, items, targets, tuple(sizes), max(1, chunk_rows), first_item, with_grad
    )
    return loss, per_size.detach()


def matryoshka_cross_entropy_reference(
    hidden: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    sizes: Sequence[int],
    first_item: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: materialise every size's (P, N) logits and average F.cross_entropy over sizes."""
    items = items[first_item:]
    losses = torch.stack([F.cross_entropy(hidden[:, :m] @ items[:, :m].T, targets) for m in sizes])
    return losses.mean(), losses.detach()
