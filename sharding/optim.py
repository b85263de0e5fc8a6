"""AdamW with decoupled weight decay on weight matrices only, and a cosine schedule with linear warmup.

No decay on norms, biases and the LRU's nu/theta/gamma: they are all 1-D tensors, so "decay exactly the
parameters with two or more dimensions" is the rule. (The official fMRLRec code filters by name and, by
mistake, decays its layer-norm gains and the LRU parameters.)
"""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, fused: bool = True
) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # eps 1e-9 as in the official code; the fused kernel avoids foreach temporaries on CPU and GPU alike
    return torch.optim.AdamW(groups, lr=lr, eps=1e-9, fused=fused)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the base lr over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
