"""Mixed-precision helper shared by the custom kernels."""

from __future__ import annotations

import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 if it is a 16-bit float (bfloat16 autocast output), else unchanged (float64 stays)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
