"""A re-implementation of the official fMRLRec code's structure, for benchmarking only.

It mirrors how yueqirex/fMRLRec computes (see ../shared/reference/fmrlrec.md, sections 1.3-1.6): nested
layers as a Python loop of one nn.Linear per block, chunk-wise layer norm as a loop of nn.LayerNorm,
complex (cfloat) B and C maps, the log2(L) parallel scan differentiated by autograd, the projector applied
to the gathered input features and again to the whole table, the input padded to a power of two before the
blocks, and the loss computed from the materialised logits of every nested size. Same maths as
models/fmrl; only the computation differs. Not used by the trainer.

Shapes: B batch, L length, D width, N items, K nested sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoopNestedLinear(nn.Module):
    def __init__(self, sizes, bias=True, dtype=torch.float32):
        super().__init__()
        starts = [0, *sizes[:-1]]
        self.sizes = sizes
        self.blocks = nn.ModuleList(
            nn.Linear(m, m - s, bias=bias, dtype=dtype) for s, m in zip(starts, sizes)
        )

    def forward(self, x):
        return torch.cat([block(x[..., :m]) for block, m in zip(self.blocks, self.sizes)], dim=-1)


class LoopLayerNorm(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        starts = [0, *sizes[:-1]]
        self.bounds = list(zip(starts, sizes))
        self.norms = nn.ModuleList(nn.LayerNorm(m - s) for s, m in self.bounds)

    def forward(self, x):
        return torch.cat([norm(x[..., s:m]) for norm, (s, m) in zip(self.norms, self.bounds)], dim=-1)


class ComplexLRULayer(nn.Module):
    def __init__(self, sizes, r_min, r_max, dropout):
        super().__init__()
        dim = sizes[-1]
        u1, u2 = torch.rand(dim), torch.rand(dim)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2 + 1e-12))
        theta_log = torch.log(2 * math.pi * u2 + 1e-7)
        radius = torch.exp(-torch.exp(nu_log))
        gamma_log = torch.log(torch.sqrt(1 - radius**2))
        self.params_log = nn.Parameter(torch.vstack([nu_log, theta_log, gamma_log]))
        self.in_proj = LoopNestedLinear(sizes, dtype=torch.cfloat)
        self.out_proj = LoopNestedLinear(sizes, dtype=torch.cfloat)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask):
        nu, theta, gamma = torch.exp(self.params_log).split((1, 1, 1))
        lamb = torch.exp(torch.complex(-nu, theta))  # (1, D)
        h = self.in_proj(x.to(torch.cfloat)) * gamma  # (B, L, D) complex
        batch, length, dim = h.shape
        for i in range(int(math.log2(length))):
            span = 2 ** (i + 1)
            h = h.reshape(batch * length // span, span, dim)
            m = mask.reshape(batch * length // span, span)
            h1, h2 = h[:, : span // 2], h[:, span // 2 :]
            if i > 0:
                lamb = torch.cat([lamb, lamb * lamb[-1]], dim=0)
            h2 = h2 + lamb * h1[:, -1:] * m[:, span // 2 - 1 : span // 2].unsqueeze(-1)
            h = torch.cat([h1, h2], dim=1)
        h = h.reshape(batch, length, dim)
        return self.dropout(self.out_proj(h).real)


class OfficialStyleBlock(nn.Module):
    def __init__(self, sizes, r_min, r_max, dropout, attn_dropout):
        super().__init__()
        self.norm1, self.norm2 = LoopLayerNorm(sizes), LoopLayerNorm(sizes)
        self.lru = ComplexLRULayer(sizes, r_min, r_max, attn_dropout)
        self.gate, self.up, self.down = (
            LoopNestedLinear(sizes),
            LoopNestedLinear(sizes),
            LoopNestedLinear(sizes),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask):
        h = x + self.lru(self.norm1(x), mask)
        z = self.norm2(h)
        return h + self.dropout(self.down(F.silu(self.gate(z)) * self.dropout(self.up(z))))


class OfficialStyleFMRL(nn.Module):
    def __init__(self, sizes, num_blocks, text, image, dropout=0.1, attn_dropout=0.1, r_min=0.0, r_max=0.1):
        super().__init__()
        self.sizes = sizes
        self.text = nn.Embedding.from_pretrained(text, freeze=True, padding_idx=0)
        self.image = nn.Embedding.from_pretrained(image, freeze=True, padding_idx=0)
        self.projector = nn.Linear(text.shape[1] + image.shape[1], sizes[-1])
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            OfficialStyleBlock(sizes, r_min, r_max, dropout, attn_dropout) for _ in range(num_blocks)
        )

    def loss(self, tokens, labels):
        mask = tokens > 0
        x = self.dropout(self.projector(torch.cat([self.text(tokens), self.image(tokens)], dim=-1)))
        items = self.projector(torch.cat([self.text.weight, self.image.weight], dim=-1))  # (N+1, D)
        length = tokens.shape[1]
        padded = 2 ** math.ceil(math.log2(length))
        x = F.pad(x, (0, 0, padded - length, 0))
        mask = F.pad(mask, (padded - length, 0))
        for block in self.blocks:
            x = block(x, mask)
        x = x[:, -length:]
        logits = torch.cat([x[..., :m] @ items[:, :m].T for m in self.sizes], dim=0)  # (K B, L, N+1)
        targets = labels.repeat(len(self.sizes), 1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=0)
