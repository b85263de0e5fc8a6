"""Where this process sits in a (possibly single-process) job, and the CPU thread budget it may use."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    """Rank and size as set by torchrun or SLURM; a plain ``python`` run is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def set_cpu_threads(num_threads: int, world: World) -> int:
    """Set torch's intra-op threads: ``num_threads`` if > 0, else the cores split evenly between the local
    ranks, so that ranks on one machine do not oversubscribe it. Returns the number set."""
    if num_threads <= 0:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size))
        num_threads = max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(num_threads)
    return num_threads
