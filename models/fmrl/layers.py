"""Nested layers of the fMRL-LRU trunk: every D x D map is block lower-triangular over the nested sizes.

Shape vocabulary: B batch, L length, D width (the largest nested size), K number of nested sizes.
For every nested size m, the first m channels of every output depend only on the first m channels of
the inputs, so the top-left corner of every weight is a complete size-m layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.ops import block_averager, chunked_layer_norm, gemm_groups, lru_scan, nested_linear, nested_mask


def _init_nested_uniform_(tensor: torch.Tensor, sizes: Sequence[int]) -> None:
    """PyTorch's default Linear init per block: block i is a Linear(m_i -> m_i - m_{i-1}), bound 1/sqrt(m_i)."""
    with torch.no_grad():
        tensor.zero_()
        start = 0
        for end in sizes:
            bound = 1.0 / math.sqrt(end)
            if tensor.dim() == 2:
                tensor[start:end, :end].uniform_(-bound, bound)
            else:
                tensor[start:end].uniform_(-bound, bound)
            start = end


class NestedLinear(nn.Module):
    """Square nested linear map over ``sizes``: output block i reads the input prefix [:m_i].

    Stored as a dense (D, D) weight whose upper-triangle entries stay exactly zero: the forward pass never
    reads them (or multiplies them by the mask), so they never receive a gradient. x: (..., D) -> (..., D).
    """

    def __init__(self, sizes: Sequence[int], bias: bool = True) -> None:
        super().__init__()
        self.sizes = list(sizes)
        dim = self.sizes[-1]
        self.weight = nn.Parameter(torch.empty(dim, dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.groups = gemm_groups(self.sizes)
        # only the shared leading group is masked: keep just its corner of the mask
        self.register_buffer("mask", nested_mask(self.sizes, self.groups[0].in_end), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_nested_uniform_(self.weight, self.sizes)
        if self.bias is not None:
            _init_nested_uniform_(self.bias, self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nested_linear(x, self.weight, self.bias, self.mask, self.groups)


class ChunkedLayerNorm(nn.Module):
    """Layer norm applied independently to each nesting block [m_{i-1}:m_i]. x: (..., D) -> (..., D)."""

    def __init__(self, sizes: Sequence[int], eps: float = 1e-5) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.sizes[-1]))
        self.bias = nn.Parameter(torch.zeros(self.sizes[-1]))
        average, broadcast = block_averager(self.sizes)
        self.register_buffer("average", average, persistent=False)
        self.register_buffer("broadcast", broadcast, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return chunked_layer_norm(x, self.weight, self.bias, self.average, self.broadcast, self.eps)


class LRULayer(nn.Module):
    """Linear recurrent unit with a complex diagonal state of width D and nested B and C maps.

        u_t = gamma * (B x_t + b_B)                    complex, B = B_re + i B_im
        h_t = lambda * h_{t-1} + u_t                   lambda = exp(-nu + i theta), padding never carried
        y_t = Re(C h_t) + b_C                          C = C_re + i C_im

    nu, theta and gamma are stored in log space. Ring initialisation draws |lambda| uniformly on the
    annulus r_min <= |lambda| <= r_max and sets gamma = sqrt(1 - |lambda|^2). The paper's D term is omitted
    (the block's residual plays its role). x: (B, L, D), mask: (B, L) -> (B, L, D).
    """

    def __init__(self, sizes: Sequence[int], r_min: float, r_max: float, dropout: float) -> None:
        super().__init__()
        self.sizes = list(sizes)
        dim = self.sizes[-1]
        self.nu_log = nn.Parameter(torch.empty(dim))
        self.theta_log = nn.Parameter(torch.empty(dim))
        self.gamma_log = nn.Parameter(torch.empty(dim))
        self.in_re = NestedLinear(sizes)  # B = in_re + i in_im, complex bias
        self.in_im = NestedLinear(sizes)
        self.out_re = NestedLinear(sizes)  # C = out_re + i out_im; Re of its bias lives in out_re
        self.out_im = NestedLinear(sizes, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.r_min, self.r_max = r_min, r_max
        self.reset_parameters()

    def reset_parameters(self) -> None:
        dim = self.sizes[-1]
        with torch.no_grad():
            u1, u2 = torch.rand(dim), torch.rand(dim)
            radius_sq = u1 * (self.r_max**2 - self.r_min**2) + self.r_min**2  # |lambda|^2
            # clamp keeps log(-0.5 log r^2) finite if r_min = 0 and u1 happens to be 0
            radius_sq = radius_sq.clamp(min=1e-12, max=1 - 1e-7)
            self.nu_log.copy_(torch.log(-0.5 * torch.log(radius_sq)))
            self.theta_log.copy_(torch.log(2 * math.pi * u2.clamp(min=1e-7)))
            self.gamma_log.copy_(torch.log(torch.sqrt(1 - radius_sq)))

    def eigenvalue_moduli(self) -> torch.Tensor:
        """|lambda| per channel, (D,)."""
        return torch.exp(-torch.exp(self.nu_log))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        gamma = torch.exp(self.gamma_log)  # (D,)
        u_re = self.in_re(x) * gamma  # (B, L, D)
        u_im = self.in_im(x) * gamma
        h_re, h_im = lru_scan(u_re, u_im, torch.exp(self.nu_log), torch.exp(self.theta_log), mask)
        y = self.out_re(h_re) - self.out_im(h_im)  # Re(C h) = C_re h_re - C_im h_im, (B, L, D)
        return self.dropout(y)


class GatedFeedForward(nn.Module):
    """Nested SiLU-gated feed-forward, inner width D: Dropout(W2(SiLU(Wg x) * Dropout(W1 x)))."""

    def __init__(self, sizes: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.gate = NestedLinear(sizes)
        self.up = NestedLinear(sizes)
        self.down = NestedLinear(sizes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.gate(x)) * self.dropout(self.up(x))  # (B, L, D)
        return self.dropout(self.down(hidden))


class LRUBlock(nn.Module):
    """Pre-norm block with two residuals: h = x + LRU(LN(x)); out = h + FFN(LN(h)). (B, L, D) -> (B, L, D)."""

    def __init__(self, sizes: Sequence[int], r_min: float, r_max: float, dropout: float, attn_dropout: float):
        super().__init__()
        self.lru_norm = ChunkedLayerNorm(sizes)
        self.lru = LRULayer(sizes, r_min, r_max, attn_dropout)
        self.ffn_norm = ChunkedLayerNorm(sizes)
        self.ffn = GatedFeedForward(sizes, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x + self.lru(self.lru_norm(x), mask)
        return h + self.ffn(self.ffn_norm(h))
