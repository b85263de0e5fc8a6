"""Nested layers of the fMRL-LRU trunk: every D x D map is block lower-triangular over the nested sizes.

Shape vocabulary: B batch, L length, D width (the largest nested size), K number of nested sizes.
For every nested size m, the first m channels of every output depend only on the first m channels of
the inputs, so the top-left corner of every weight is a complete size-m layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.ops import (
    block_averager,
    chunked_layer_norm,
    gated_silu,
    gemm_groups,
    join_nested_weight,
    lru_scan,
    nested_linear,
    nested_mask,
    split_nested_weight,
)


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

    The block lower-triangular weight is stored as one parameter per GEMM group (``weight_parts``), so its
    zero upper triangle costs no memory, gradient or optimizer state. ``state_dict`` presents it as one
    dense (D, D) ``weight`` (zeros above the blocks) and ``load_state_dict`` accepts that layout, so
    checkpoints and sliced sub-models do not depend on the grouping. x: (..., D) -> (..., D).
    """

    def __init__(self, sizes: Sequence[int], bias: bool = True) -> None:
        super().__init__()
        self.sizes = list(sizes)
        dim = self.sizes[-1]
        self.groups = gemm_groups(self.sizes)
        self.weight_parts = nn.ParameterList(
            nn.Parameter(torch.empty(g.row_end - g.row_start, g.in_end)) for g in self.groups
        )
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        first = self.groups[0]
        self.register_buffer("mask", nested_mask(self.sizes, first.in_end)[: first.row_end], persistent=False)
        self.register_state_dict_post_hook(_dense_weight_in_state_dict)
        self.register_load_state_dict_pre_hook(_split_dense_weight_on_load)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        dense = torch.empty(self.sizes[-1], self.sizes[-1])
        _init_nested_uniform_(dense, self.sizes)
        with torch.no_grad():
            for part, piece in zip(self.weight_parts, split_nested_weight(dense, self.groups)):
                part.copy_(piece)
        if self.bias is not None:
            _init_nested_uniform_(self.bias, self.sizes)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (D, D) block lower-triangular weight (differentiable)."""
        return join_nested_weight(list(self.weight_parts), self.groups)

    def forward(self, x: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., D). ``row_scale`` (D,) multiplies the outputs, folded into the weight and bias rows so
        that no extra (..., D) tensor is computed or kept for backward."""
        parts, bias = list(self.weight_parts), self.bias
        if row_scale is not None:
            parts = [w * row_scale[g.row_start : g.row_end, None] for w, g in zip(parts, self.groups)]
            bias = None if bias is None else bias * row_scale
        return nested_linear(x, parts, bias, self.mask, self.groups)


def _dense_weight_in_state_dict(
    module: NestedLinear, state_dict: dict, prefix: str, local_metadata: dict
) -> None:
    for i in range(len(module.groups)):
        state_dict.pop(f"{prefix}weight_parts.{i}")
    state_dict[f"{prefix}weight"] = module.weight.detach()


def _split_dense_weight_on_load(module: NestedLinear, state_dict: dict, prefix: str, *args) -> None:
    dense = state_dict.pop(f"{prefix}weight", None)
    if dense is None:
        return  # a missing key is reported by load_state_dict itself
    dim = module.sizes[-1]
    if tuple(dense.shape) != (dim, dim):
        raise ValueError(f"{prefix}weight: expected shape ({dim}, {dim}), got {tuple(dense.shape)}")
    # a plain tensor (an export, a full state dict) is checked; DTensor shards (FSDP2 loading a sharded
    # checkpoint) come from this project's own training state and would need a collective to check
    plain = type(dense) is torch.Tensor or isinstance(dense, nn.Parameter)
    if plain and bool((dense.detach() * (1 - nested_mask(module.sizes).to(dense.device, dense.dtype))).any()):
        raise ValueError(
            f"{prefix}weight has non-zero entries outside the nested blocks of sizes {module.sizes}: "
            "it was trained with other nested sizes"
        )
    for i, piece in enumerate(split_nested_weight(dense, module.groups)):
        state_dict[f"{prefix}weight_parts.{i}"] = piece


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

    ``complex_init`` "real" starts B and C real (imaginary weights and bias zero), as the official code
    does by casting a real ``nn.Linear`` to complex; "random" draws the imaginary parts like the real ones.
    """

    def __init__(
        self, sizes: Sequence[int], r_min: float, r_max: float, dropout: float, complex_init: str = "real"
    ) -> None:
        super().__init__()
        if complex_init not in ("real", "random"):
            raise ValueError(f"complex_init must be 'real' or 'random', got {complex_init!r}")
        self.complex_init = complex_init
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
        # the recurrence's evaluation: inference programs (deploy/) swap in lru_scan_by_powers, which
        # torch.export and ONNX trace with a dynamic history length
        self.scan = lru_scan
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
            if self.complex_init == "real":
                for imaginary in (self.in_im, self.out_im):
                    for part in imaginary.weight_parts:
                        part.zero_()
                    if imaginary.bias is not None:
                        imaginary.bias.zero_()

    def eigenvalue_moduli(self) -> torch.Tensor:
        """|lambda| per channel, (D,)."""
        return torch.exp(-torch.exp(self.nu_log))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        gamma = torch.exp(self.gamma_log)  # (D,)
        u_re = self.in_re(x, row_scale=gamma)  # gamma * (B_re x + b_re), (B, L, D)
        u_im = self.in_im(x, row_scale=gamma)
        h_re, h_im = self.scan(u_re, u_im, torch.exp(self.nu_log), torch.exp(self.theta_log), mask)
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
        hidden = gated_silu(self.gate(x), self.dropout(self.up(x)))  # (B, L, D)
        return self.dropout(self.down(hidden))


class LRUBlock(nn.Module):
    """Pre-norm block with two residuals: h = x + LRU(LN(x)); out = h + FFN(LN(h)). (B, L, D) -> (B, L, D)."""

    def __init__(
        self,
        sizes: Sequence[int],
        r_min: float,
        r_max: float,
        dropout: float,
        attn_dropout: float,
        complex_init: str = "real",
    ):
        super().__init__()
        self.lru_norm = ChunkedLayerNorm(sizes)
        self.lru = LRULayer(sizes, r_min, r_max, attn_dropout, complex_init)
        self.ffn_norm = ChunkedLayerNorm(sizes)
        self.ffn = GatedFeedForward(sizes, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x + self.lru(self.lru_norm(x), mask)
        return h + self.ffn(self.ffn_norm(h))
