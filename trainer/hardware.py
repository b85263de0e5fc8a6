"""Hardware presets of ``fmrl plan`` (trainer/plan.py), apart so that the CLI can list them without
importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """One rank's hardware: compute device, its memory (HBM), and the host memory of its node."""

    compute: str
    """TorchRec's compute device: "cuda" or "cpu"."""
    hbm_gb: float
    """Device memory per GPU, GiB (0 on CPU)."""
    ddr_gb: float
    """Host memory (DDR) per node, GiB, shared by the node's ranks."""
    ranks_per_node: int


DEVICES = {
    # DGX H100: 8 x H100 80 GB, 2 TB of host memory
    "h100": Device("cuda", 80, 2048, 8),
    # DGX A100 (80 GB): 8 x A100 80 GB, 2 TB of host memory
    "a100": Device("cuda", 80, 2048, 8),
    # a CPU node: 8 ranks sharing 512 GiB
    "cpu": Device("cpu", 0, 512, 8),
}
