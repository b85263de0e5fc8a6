"""Nested ("full-scale Matryoshka") linear maps.

A nested linear map over sizes (m_1 < ... < m_K = D) is a dense (D, D) weight in which output block i
(rows m_{i-1}:m_i) reads only the input prefix [:m_i]. The weight is block lower-triangular, so the first
m_i outputs depend only on the first m_i inputs and the top-left (m_i, m_i) corner of the weight is a
complete smaller layer.

The fast path skips the zero upper triangle where it is large and masks it where it is small: the small
leading blocks (together at most D/4 wide) share one masked GEMM, and every larger block is one GEMM over
its input prefix. For sizes 8, 16, ..., 1024 that is 3 GEMMs and 69% of the dense FLOPs (the triangle
itself is 67%). The weight is stored as one piece per GEMM group (``split_nested_weight``), so the zero
triangle takes no memory, no gradient and no optimizer state either. The reference loops over every
block of the dense weight, as the official fMRLRec code does, and is kept for tests.

Shapes: x is (..., D); the result is (..., D).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


class GemmGroup(NamedTuple):
    """Output rows [row_start, row_end) read inputs [:in_end]; ``masked`` if the group spans several blocks."""

    row_start: int
    row_end: int
    in_end: int
    masked: bool


def nested_mask(sizes: Sequence[int], dim: int | None = None) -> torch.Tensor:
    """The (dim, dim) 0/1 float mask of a nested weight (default dim = D): 1 where block i meets [:m_i]."""
    dim = sizes[-1] if dim is None else dim
    mask = torch.zeros(dim, dim)
    start = 0
    for end in sizes:
        mask[start:end, :end] = 1.0
        start = end
        if end >= dim:
            break
    return mask


def gemm_groups(sizes: Sequence[int]) -> list[GemmGroup]:
    """Split the blocks into GEMMs: leading blocks up to D/4 wide share one masked GEMM, the rest one each."""
    dim = sizes[-1]
    shared_end = max([m for m in sizes if m <= dim // 4], default=0)
    groups = []
    if shared_end:
        spans_blocks = sum(1 for m in sizes if m <= shared_end) > 1
        groups.append(GemmGroup(0, shared_end, shared_end, spans_blocks))
    start = shared_end
    for end in sizes:
        if end > shared_end:
            groups.append(GemmGroup(start, end, end, False))
            start = end
    return groups


def split_nested_weight(weight: torch.Tensor, groups: Sequence[GemmGroup]) -> list[torch.Tensor]:
    """Dense (D, D) weight -> one (row_end - row_start, in_end) piece per group (views)."""
    return [weight[g.row_start : g.row_end, : g.in_end] for g in groups]


def join_nested_weight(parts: Sequence[torch.Tensor], groups: Sequence[GemmGroup]) -> torch.Tensor:
    """Pieces -> the dense (D, D) weight, zero above the groups (differentiable)."""
    dim = groups[-1].row_end
    rows = [F.pad(part, (0, dim - g.in_end)) for part, g in zip(parts, groups)]
    return torch.cat(rows, dim=0)


class _NestedLinear(torch.autograd.Function):
    """Grouped GEMMs with a hand-written backward: each group's input gradient is accumulated straight
    into a strided view of the full input gradient, and each weight piece gets exactly its own gradient."""

    @staticmethod
    def forward(ctx, x2d, bias, mask, groups, *parts):  # noqa: D102
        outputs = []
        for g, w in zip(groups, parts):
            if g.masked:
                w = w * mask
            x_prefix = x2d[:, : g.in_end]  # strided view: BLAS takes the row stride, no copy
            if bias is None:
                outputs.append(x_prefix @ w.T)
            else:
                outputs.append(torch.addmm(bias[g.row_start : g.row_end], x_prefix, w.T))
        ctx.save_for_backward(x2d, mask, *parts)
        ctx.groups = groups
        ctx.has_bias = bias is not None
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)  # (P, D)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        x2d, mask, *parts = ctx.saved_tensors
        # under autocast the forward ran in grad_y's dtype (bfloat16); compute the gradients in it too and
        # return them in the dtypes of the inputs (float32)
        compute = grad_y.dtype
        grad_x = x2d.new_zeros(x2d.shape) if ctx.needs_input_grad[0] else None
        grad_parts = []
        for i, (g, w) in enumerate(zip(ctx.groups, parts)):
            gy = grad_y[:, g.row_start : g.row_end]  # (P, rows)
            if g.masked:
                w = w * mask
            if grad_x is not None:
                if compute == grad_x.dtype:
                    grad_x[:, : g.in_end].addmm_(gy, w)
                else:
                    grad_x[:, : g.in_end] += gy @ w.to(compute)
            grad_w = None
            if ctx.needs_input_grad[4 + i]:
                grad_w = (gy.T @ x2d[:, : g.in_end].to(compute)).to(w.dtype)  # (rows, in_end)
                if g.masked:
                    grad_w.mul_(mask)
            grad_parts.append(grad_w)
        grad_b = grad_y.sum(0).to(x2d.dtype) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return grad_x, grad_b, None, None, *grad_parts


def nested_linear(
    x: torch.Tensor,
    parts: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    groups: Sequence[GemmGroup],
) -> torch.Tensor:
    """Fast nested linear map. x: (..., D) -> (..., D).

    ``groups`` come from ``gemm_groups``, ``parts`` from ``split_nested_weight``; ``mask`` is the masked
    group's (rows, in_end) corner of ``nested_mask`` (None if no group is masked).
    """
    x2d = x.reshape(-1, x.shape[-1])  # (P, D)
    y = _NestedLinear.apply(x2d, bias, mask, tuple(groups), *parts)
    return y.reshape(*x.shape[:-1], groups[-1].row_end)


def nested_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sizes: Sequence[int]
) -> torch.Tensor:
    """Reference: one small linear map per block, concatenated (the official code's layout)."""
    outputs = []
    start = 0
    for end in sizes:
        block_bias = None if bias is None else bias[start:end]
        outputs.append(F.linear(x[..., :end], weight[start:end, :end], block_bias))
        start = end
    return torch.cat(outputs, dim=-1)


def nested_param_count(sizes: Sequence[int], bias: bool) -> int:
    """Number of free weights of a nested map (the block lower triangle), plus its bias."""
    count, start = 0, 0
    for end in sizes:
        count += end * (end - start)
        start = end
    return count + (sizes[-1] if bias else 0)
