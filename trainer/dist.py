"""Process-group set-up: a torchrun job, or a plain process as a job of one rank.

The trainer has one code path: TorchRec shards the tables and the dense backend wraps the trunk whether
there are 64 ranks or one. A plain ``fmrl train`` therefore starts a one-rank group on a free local port.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from sharding.world import World
from trainer.process_exit import mark_group_joined

log = logging.getLogger("fmrl")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def distributed() -> Iterator[tuple[World, torch.device]]:
    """Initialise the default process group (nccl on GPU, gloo on CPU) for the duration of the block.

    Under torchrun the rendezvous variables are already set; a plain process gets RANK=0, WORLD_SIZE=1
    and a free port on 127.0.0.1. A group that is already initialised (a caller's) is used and kept.
    """
    if dist.is_initialized():
        yield World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))), _device()
        return
    added: list[str] = []
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        single = {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
        }
        added = [name for name in single if name not in os.environ]
        os.environ.update({name: single[name] for name in added})
    world = World.from_env()
    device = _device(world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _restart_safe_agent_store(world)
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.world_size)
    except Exception:
        for name in added:
            os.environ.pop(name, None)
        raise
    mark_group_joined()  # the process now ends through trainer/process_exit.py's exit_process
    try:
        yield world, device
    finally:
        _injected_teardown_fault(world)
        dist.destroy_process_group()
        for name in added:  # a later run in this process picks a fresh port
            os.environ.pop(name, None)


def _injected_teardown_fault(world: World) -> None:
    """Test seam for a fault that cannot be caused on demand: ``FMRL_TEST_ABORT_AT_TEARDOWN=<rank>``
    makes that rank abort (SIGABRT) as its teardown starts, as a native library that aborts at exit
    does now and then (tests/integration/test_run_folder.py checks that a finished run's artefacts are
    written before any rank may get there)."""
    if os.environ.get("FMRL_TEST_ABORT_AT_TEARDOWN") == str(world.rank):
        os.abort()


def _restart_safe_agent_store(world: World) -> dist.Store | None:
    """Under torchrun the workers share the agent's TCPStore (TORCHELASTIC_USE_AGENT_STORE=True), which
    outlives a restart (``--max-restarts``): a restarted attempt would read the dead attempt's gloo
    addresses and fail to connect (pytorch/pytorch#135712). Its keys go under a prefix per attempt.

    This holds while all agents restart together (one node, or a fixed set of nodes). Launchers that
    restart agents one by one set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which gives every rendezvous
    round a fresh store; then torchrun sets TORCHELASTIC_USE_AGENT_STORE=False and this returns None.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) == 0:
        log.warning(
            "several torchrun agents share the rendezvous store: a node restarted on its own cannot rejoin "
            "(its restart count differs); set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for every agent "
            "(slurm/train.sbatch and `fmrl launch` do)"
        )
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world.world_size,
        is_master=False,
        timeout=timedelta(minutes=10),
    )
    return dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _device(local_rank: int | None = None) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    return torch.device("cuda", index)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor over all ranks (on the group's device), returned on the CPU."""
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    out = values.to(device=device, dtype=torch.float64)
    dist.all_reduce(out)
    return out.cpu()


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
