"""Chunk-wise layer norm: an independent layer norm on each nesting block [m_{i-1}:m_i] of the last dim.

Normalising each block on its own keeps the size-m prefix of the output a function of the size-m prefix
of the input alone. The fast path computes every block's mean and variance with skinny matmuls against a
(D, K) averaging matrix and has a hand-written backward that keeps only the normalised input and the
per-block 1/std; the reference calls F.layer_norm once per block.

Shapes: x (..., D); weight, bias (D,); sizes (m_1 < ... < m_K = D).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from models.ops.precision import at_least_float32


def block_averager(sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, K) matrix averaging each block, and (K, D) matrix broadcasting block values back."""
    dim = sizes[-1]
    average = torch.zeros(dim, len(sizes))
    start = 0
    for k, end in enumerate(sizes):
        average[start:end, k] = 1.0 / (end - start)
        start = end
    return average, (average > 0).to(average.dtype).T.contiguous()


class _ChunkedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, average, broadcast, eps):  # noqa: D102
        centred = x - (x @ average) @ broadcast  # (..., D)
        inv_std = torch.rsqrt((centred * centred) @ average + eps)  # (..., K)
        normalised = centred * (inv_std @ broadcast)  # (..., D)
        ctx.save_for_backward(normalised, inv_std, weight, average, broadcast)
        return normalised * weight + bias

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        normalised, inv_std, weight, average, broadcast = ctx.saved_tensors
        g = grad_out * weight
        # per block: dx = inv_std * (g - mean(g) - x_hat * mean(g * x_hat))
        block_mean = ((g @ average) @ broadcast) + normalised * (((g * normalised) @ average) @ broadcast)
        grad_x = (g - block_mean) * (inv_std @ broadcast)
        leading = tuple(range(grad_out.dim() - 1))
        return grad_x, (grad_out * normalised).sum(leading), grad_out.sum(leading), None, None, None


def chunked_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    average: torch.Tensor,
    broadcast: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Fast chunk-wise layer norm; ``average`` and ``broadcast`` come from ``block_averager``."""
    # statistics in float32 even when the matmuls around it run in bfloat16 (autocast)
    with torch.autocast(x.device.type, enabled=False):
        return _ChunkedLayerNorm.apply(at_least_float32(x), weight, bias, average, broadcast, eps)


def chunked_layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, sizes: Sequence[int], eps: float = 1e-5
) -> torch.Tensor:
    """Reference: one F.layer_norm per block, concatenated."""
    outputs, start = [], 0
    for end in sizes:
        outputs.append(
            F.layer_norm(x[..., start:end], (end - start,), weight[start:end], bias[start:end], eps)
        )
        start = end
    return torch.cat(outputs, dim=-1)
