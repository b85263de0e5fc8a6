"""SiLU-gated product ``silu(gate) * up`` with a hand-written backward.

Autograd would keep three (..., D) tensors for backward (the gate for SiLU, then SiLU's output and ``up``
for the product); this keeps two and recomputes the sigmoid. The reference is the plain expression.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.ops.precision import at_least_float32


class _GatedSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):  # noqa: D102
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        gate, up = ctx.saved_tensors
        sigmoid = torch.sigmoid(gate)
        silu = gate * sigmoid
        # d silu / d gate = sigmoid * (1 + gate * (1 - sigmoid)) = sigmoid + silu * (1 - sigmoid)
        grad_gate = grad_out * up * (sigmoid + silu * (1 - sigmoid))
        return grad_gate, grad_out * silu


def gated_silu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; both (..., D)."""
    with torch.autocast(gate.device.type, enabled=False):  # float32 under bfloat16 autocast too
        return _GatedSiLU.apply(at_least_float32(gate), at_least_float32(up))


def gated_silu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
