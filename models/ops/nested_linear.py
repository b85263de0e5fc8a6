"""Nested ("full-scale Matryoshka") linear maps.

A nested linear map over sizes (m_1 < ... < m_K = D) is a dense (D, D) weight in which output block i
(rows m_{i-1}:m_i) reads only the input prefix [:m_i]. The weight is block lower-triangular, so the first
m_i outputs depend only on the first m_i inputs and the top-left (m_i, m_i) corner of the weight is a
complete smaller layer.

The fast path skips the zero upper triangle where it is large and masks it where it is small: the small
leading blocks (together at most D/4 wide) share one masked GEMM, and every larger block is one GEMM over
its input prefix. For sizes 8, 16, ..., 1024 that is 3 GEMMs and 69% of the dense FLOPs (the triangle
itself is 67%). The reference loops over every block, as the official fMRLRec code does, and is kept for
tests.

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


class _NestedLinear(torch.autograd.Function):
    """Grouped GEMMs with a hand-written backward that writes each group's gradients straight into strided
    views of the full gradients (autograd would zero-fill and add a full-size gradient per slice)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, mask, groups):  # noqa: D102
        outputs = []
        for g in groups:
            w = weight[g.row_start : g.row_end, : g.in_end]
            if g.masked:
                w = w * mask[g.row_start : g.row_end, : g.in_end]
            x_prefix = x2d[:, : g.in_end]  # strided view: BLAS takes the row stride, no copy
            if bias is None:
                outputs.append(x_prefix @ w.T)
            else:
                outputs.append(torch.addmm(bias[g.row_start : g.row_end], x_prefix, w.T))
        ctx.save_for_backward(x2d, weight, mask)
        ctx.groups = groups
        ctx.has_bias = bias is not None
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)  # (P, D_out)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        x2d, weight, mask = ctx.saved_tensors
        grad_x = x2d.new_zeros(x2d.shape) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for g in ctx.groups:
            rows, cols = slice(g.row_start, g.row_end), slice(0, g.in_end)
            gy = grad_y[:, rows]  # (P, rows)
            w = weight[rows, cols] * mask[rows, cols] if g.masked else weight[rows, cols]
            if grad_x is not None:
                grad_x[:, cols].addmm_(gy, w)
            if grad_w is not None:
                grad_w[rows, cols].addmm_(gy.T, x2d[:, cols])
                if g.masked:
                    grad_w[rows, cols].mul_(mask[rows, cols])
        grad_b = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


def nested_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    groups: Sequence[GemmGroup],
) -> torch.Tensor:
    """Fast nested linear map. x: (..., D) -> (..., D).

    ``groups`` come from ``gemm_groups``; ``mask`` is ``nested_mask`` cut to at least the masked group.
    """
    x2d = x.reshape(-1, x.shape[-1])  # (P, D)
    y = _NestedLinear.apply(x2d, weight, bias, mask, tuple(groups))
    return y.reshape(*x.shape[:-1], weight.shape[0])


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
