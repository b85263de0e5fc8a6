"""The generic parallel core that every model family's parallelisation (sharding/fmrl.py,
sharding/dlrm.py) is built from:

* :class:`ParallelModel`: a model split into TorchRec-sharded tables (``sparse``) and a dense part run
  by a :class:`~sharding.backends.DenseBackend`; stepping, checkpoint state for DCP, snapshots for early
  stopping, the gathered weights at the end;
* table helpers: the sharding type a table gets (:func:`table_sharding_type`), the TorchRec planner
  (:func:`plan`), filling this rank's shards (:func:`fill_shards`: from a reader of any slice, so no
  rank needs the full tables), and the fused table optimizers TorchRec's kernels offer
  (:func:`table_optimizer_class`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sharding.backends import DenseBackend

__all__ = [
    "ParallelModel",
    "PlanStorage",
    "fill_shards",
    "plan",
    "sharded_rows",
    "table_optimizer_class",
    "table_sharding_type",
]

DMP_PREFIX = "_dmp_wrapped_module."


def table_sharding_type(setting: str, device: torch.device, default_cpu: str) -> str:
    """The TorchRec sharding type of a table for ``parallel.*_sharding`` = ``setting``: as given, or for
    "auto" row-wise on GPU and ``default_cpu`` on CPU (TorchRec has no CPU kernel for row-wise)."""
    if setting != "auto":
        if setting == "row_wise" and device.type != "cuda":
            raise ValueError(
                "row_wise table sharding needs CUDA (TorchRec has no CPU kernel for it); "
                "use table_wise or column_wise on CPU"
            )
        return setting
    return "row_wise" if device.type == "cuda" else default_cpu


def table_optimizer_class(name: str, device: torch.device) -> type:
    """The optimizer class TorchRec fuses into the backward of a table for ``parallel.table_optimizer``."""
    if name == "adam" and device.type != "cuda":
        raise ValueError(
            "parallel.table_optimizer 'adam' needs CUDA: TorchRec's CPU kernels offer adagrad, "
            "rowwise_adagrad and sgd"
        )
    if name == "rowwise_adagrad":
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

        return RowWiseAdagrad
    return {"adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]


def plan(
    module: nn.Module,
    sharders: list[Any],
    constraints: dict[str, Any],
    topology: Any,
    *,
    collective: bool,
    stats: list[Any] | None = None,
) -> Any:
    """The TorchRec ``ShardingPlan`` of ``module`` 's tables on ``topology`` under ``constraints`` (per
    table: ``ParameterConstraints``). ``collective=True`` makes the ranks of the job agree on one plan
    (every rank calls it); otherwise it plans offline, for any topology, e.g. a simulated 64-GPU cluster
    on a laptop, to check the plan and the memory per rank before a job is launched. ``stats``: TorchRec
    ``Stats`` objects that receive the chosen plan (default: TorchRec's EmbeddingStats log;
    :class:`PlanStorage` keeps the planner's storage estimate of every shard)."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner

    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints, stats=stats)
    if collective:
        return planner.collective_plan(module, sharders, dist.GroupMember.WORLD)
    return planner.plan(module, sharders)


def sharded_rows(value: Any, start: int, rows: int, name: str, dst: int = 0) -> torch.Tensor | None:
    """Rows ``start : start + rows`` (all columns) of the TorchRec-sharded table ``value`` (a
    ShardedTensor, row-, column- or table-wise) on rank ``dst``, None elsewhere: every rank sends the
    part of its shards in those rows, so ``dst`` holds one block of the table at a time, never the
    table. ``name`` names the table in errors. Collective."""
    pieces = []
    for shard in value.local_shards():
        (r0, c0), (n, _) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        lo, hi = max(start, r0), min(start + rows, r0 + n)
        if lo < hi:
            pieces.append((lo - start, c0, shard.tensor[lo - r0 : hi - r0].detach().cpu().clone()))
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(pieces, gathered, dst=dst)
    if gathered is None:
        return None
    block = torch.empty(rows, value.size(1))
    filled = 0
    for row, col, piece in (p for rank_pieces in gathered for p in rank_pieces):
        block[row : row + piece.shape[0], col : col + piece.shape[1]] = piece
        filled += piece.numel()
    if filled != block.numel():
        raise RuntimeError(f"{name}: rows {start}:{start + rows} are not covered by the shards")
    return block


class PlanStorage:
    """A TorchRec planner ``Stats`` that keeps the chosen plan's sharding options: per table its sharding
    type, compute kernel and shards, each with the planner's own storage estimate (``Storage(hbm, ddr)``,
    bytes: weights, optimizer state, input/output buffers, the HBM cache of a UVM-cached table) and rank.
    Pass it in ``plan(..., stats=[PlanStorage()])``; after planning, :attr:`options` holds them."""

    def __init__(self) -> None:
        self.options: list[Any] = []

    def log(
        self, sharding_plan: Any, topology: Any, *args: Any, best_plan: Any = None, **kwargs: Any
    ) -> None:
        # TorchRec calls Stats.log with keyword arguments; best_plan is the list of ShardingOptions
        self.options = list(best_plan or [])

    def per_rank(self, world_size: int) -> list[tuple[int, int]]:
        """(HBM bytes, host-memory bytes) of the tables on each rank."""
        totals = [[0, 0] for _ in range(world_size)]
        for option in self.options:
            for shard in option.shards:
                totals[shard.rank][0] += shard.storage.hbm
                totals[shard.rank][1] += shard.storage.ddr
        return [(hbm, ddr) for hbm, ddr in totals]


ShardReader = Callable[[str, tuple[int, int], tuple[int, int]], torch.Tensor]
"""``read(key, (row, col) offset, (rows, cols) size)`` -> that block (rows, cols) of table ``key``."""


FILL_ROWS = 65536
"""Rows of a shard filled per ``read`` call: bounds the transient memory of filling one shard."""


def fill_shards(dmp: nn.Module, read: ShardReader) -> None:
    """Fill every local shard of a DistributedModelParallel's tables (built on meta: TorchRec allocated
    only this rank's shards) with ``read(key, offsets, sizes)``, key as in the unwrapped module's state
    dict, :data:`FILL_ROWS` rows at a time. Only blocks this rank owns are ever asked for."""
    for key, value in dmp.state_dict().items():
        for shard in value.local_shards():
            (r0, c0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            for start in range(0, rows, FILL_ROWS):
                n = min(FILL_ROWS, rows - start)
                block = read(key.removeprefix(DMP_PREFIX), (r0 + start, c0), (n, cols))
                if tuple(block.shape) != (n, cols):
                    raise ValueError(
                        f"{key}: block ({r0 + start}, {c0}) is {tuple(block.shape)}, not {(n, cols)}"
                    )
                with torch.no_grad():
                    shard.tensor[start : start + n].copy_(block)


FINITE_CHECK_ELEMENTS = 2**22
"""Elements checked for NaN or infinity at a time by :func:`all_finite` (16 MiB of fp32)."""


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN or infinity, checked about FINITE_CHECK_ELEMENTS at a time (blocks
    of its first dimension: views, never a copy): ``torch.isfinite`` of a whole table shard allocates its
    absolute value and three masks (measured: +435 MiB for a 1M x 64 fp32 shard, the largest transient of
    a 1M-item run)."""
    if tensor.dim() == 0:
        return bool(torch.isfinite(tensor))
    rows = max(1, FINITE_CHECK_ELEMENTS // max(1, tensor[:1].numel()))
    return all(
        bool(torch.isfinite(tensor[start : start + rows].detach()).all())
        for start in range(0, tensor.shape[0], rows)
    )


@dataclass
class ParallelModel:
    """A distributed model: TorchRec-sharded tables, the dense part under a backend, and how to step and
    save them. The model-specific subclasses (sharding.fmrl.ParallelFMRL, sharding.dlrm.ParallelDLRM) add
    the forward and say which tables are trained."""

    model: nn.Module
    """The single-device model; its dense parameters are the ones the backend trains."""
    sparse: Any
    """The sharded tables: ``.dmp`` (DistributedModelParallel), ``.fused_optimizer``, ``.device``."""
    dense: DenseBackend
    autocast_dtype: torch.dtype | None

    def autocast(self) -> Any:
        device = "cuda" if self.sparse.device.type == "cuda" else "cpu"
        return torch.autocast(
            device, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        )

    def trainable_table(self, key: str) -> bool:
        """Whether the table state-dict entry ``key`` is trained (and so checkpointed); all by default."""
        return True

    def set_training(self, mode: bool) -> None:
        self.dense.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (averaged over the accumulation steps)."""
        self.dense.backward(loss)

    def micro_step(self, boundary: bool) -> None:
        """After each micro-batch: at an accumulation boundary the dense part is stepped with its schedule
        (clipped before by :meth:`clip_gradients`, or by DeepSpeed's step itself; the tables' fused
        optimizer already stepped in backward)."""
        self.dense.step(boundary)

    def clip_gradients(self) -> float | None:
        """At an accumulation boundary, before :meth:`micro_step`: clip the dense gradients; this rank's
        part of their norm, or None where the backend clips in its step (then :meth:`grad_norm`)."""
        return self.dense.clip_gradients()

    def skip_step(self) -> None:
        """At an accumulation boundary, instead of :meth:`micro_step`: no update of the dense weights or
        their optimizer state. The tables' fused optimizer stepped in backward already: not undone."""
        self.dense.skip_step()

    def grad_norm(self) -> float | None:
        """After :meth:`micro_step` at a boundary: the global dense gradient norm where the backend clipped
        by itself (DeepSpeed), else None."""
        return self.dense.grad_norm()

    def nonfinite_tensor(self) -> str:
        """The first of this rank's trainable tensors (dense shards, trained table shards) holding a NaN
        or infinity, by its name in the model's state dict; "" if all are finite. Local."""
        names = [self.model_key(name) for name, _ in self.dense.inner.named_parameters()]
        for name, tensor in zip(names, self.dense.local_tensors(), strict=True):
            if not all_finite(tensor):
                return name
        for key, value in self._trained_tables().items():
            if not all(all_finite(shard.tensor) for shard in value.local_shards()):
                return key.removeprefix(DMP_PREFIX)
        return ""

    def set_grad_sync(self, enabled: bool) -> None:
        """Skip the gradient all-reduce on accumulation micro-batches."""
        self.dense.set_grad_sync(enabled)

    def last_lr(self) -> float:
        return self.dense.last_lr()

    def dense_parameters(self) -> list[torch.Tensor]:
        return self.dense.parameters()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The trained state as full tensors on rank 0 (None elsewhere). Collective."""
        raise NotImplementedError

    def model_key(self, dense_key: str) -> str:
        """The model's state-dict name of the dense backend's entry ``dense_key``; the same by default."""
        return dense_key

    def weight_pieces(
        self, block_rows: int
    ) -> tuple[dict[str, Any], Iterator[tuple[str, int, torch.Tensor]]]:
        """The trained state for writers on every rank: its layout (name -> (dtype, shape)), the same on
        every rank, and this rank's ``(name, first_row, rows)`` pieces: the dense weights on rank 0 (whole,
        gathered: small), and of each trained table the blocks of ``block_rows`` rows whose index b has
        ``b % world_size == rank`` (``sparse.table_rows`` to that rank), so the ranks share the writing and
        no rank ever holds more than one block of a table. Every rank must exhaust the iterator.
        Collective."""
        rank, world = dist.get_rank(), dist.get_world_size()
        dense = self.dense.full_state_dict()
        tables = self.sparse.table_layout()
        if rank == 0:
            assert dense is not None
            dense = {self.model_key(k): v for k, v in dense.items()}
        shapes = [{k: (v.dtype, tuple(v.shape)) for k, v in dense.items()} if rank == 0 else None]
        dist.broadcast_object_list(shapes, src=0)
        layout = {**shapes[0], **{k: (torch.float32, tuple(shape)) for k, shape in tables.items()}}

        def pieces() -> Iterator[tuple[str, int, torch.Tensor]]:
            if rank == 0:
                yield from ((key, 0, value) for key, value in sorted(dense.items()))
            for key in sorted(tables):  # the same order on every rank: each block is one collective
                rows = tables[key][0]
                for index, start in enumerate(range(0, rows, block_rows)):
                    owner = index % world
                    block = self.sparse.table_rows(key, start, min(block_rows, rows - start), dst=owner)
                    if block is not None:
                        yield key, start, block

        return layout, pieces()

    def _trained_tables(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in self.sparse.dmp.state_dict().items()
            if self.trainable_table(k.removeprefix(DMP_PREFIX))
        }

    def state_dict(self) -> dict[str, Any]:
        """The trainable state for DCP: the backend's dense weights, optimizer and schedule (the same
        names under every backend), the trained tables and their fused optimizer state (ShardedTensors:
        live, so a DCP load fills them in place). Frozen tables are not included: they come from their
        files."""
        state = self.dense.state_dict()
        tables = self._trained_tables()
        fused = {
            k: v
            for k, v in self.sparse.fused_optimizer.state_dict()["state"].items()
            if self.trainable_table(k.removeprefix(DMP_PREFIX)) and v
        }
        if tables:
            state["tables"] = tables
        if fused:  # empty on ranks that hold no shard of a trained table
            state["tables_optimizer"] = fused
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Apply a ``state_dict()`` that DCP has filled (the tables were filled in place)."""
        self.dense.load_state_dict(state)

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of this rank's local trainable state (dense shards and table shards), for
        :meth:`restore` (the early-stopping best model)."""
        return [t.detach().clone() for t in self._local_tensors()]

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for target, saved in zip(self._local_tensors(), snapshot, strict=True):
                target.copy_(saved)

    def _local_tensors(self) -> list[torch.Tensor]:
        tensors = self.dense.local_tensors()
        for value in self._trained_tables().values():
            tensors += [shard.tensor for shard in value.local_shards()]
        return tensors
