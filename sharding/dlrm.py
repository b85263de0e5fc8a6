"""Distribute a DLRM, or any CTR model of models/ctr, over the ranks of a job: TorchRec-sharded embedding
tables, and FSDP2, DeepSpeed ZeRO or DDP for the dense part.

The model (models/dlrm) stays single-device PyTorch. :func:`parallelize_dlrm` applies two named steps:

1. **shard the tables**: ``model.sparse_arch`` (one EmbeddingBagCollection, a table per categorical
   feature) is rebuilt on the meta device with a fused in-backward optimizer (``parallel.table_optimizer``,
   Adagrad by default), placed by the TorchRec planner with ``ParameterConstraints`` that pin the sharding
   type (``parallel.table_sharding``; "auto": table-wise on CPU, row-wise on GPU), and wrapped in
   ``DistributedModelParallel(init_data_parallel=False)``, which materialises only this rank's shards.
   Sharded from birth: a model built with its tables on meta (``build_ctr_model(cfg,
   sparse_device="meta")``) has each shard generated row block by row block (``SparseArch.initial_rows``,
   the values the single-device model starts with), so no rank ever holds a whole table; a model whose
   tables have storage has its shards sliced from them. Either way every layout starts from the same
   weights.
2. **wrap the dense part**: every submodule but the tables (bottom MLP, interaction, top MLP, ...) as one
   :class:`DenseCTR`, run by the backend of ``parallel.backend`` (sharding/backends.py: FSDP2 per
   submodule with parameters then the root, DeepSpeed ZeRO, DDP).

Every CTR model (``dlrm.model``: DLRM, Wide & Deep, DeepFM, DCN v1 / v2, xDeepFM) takes this one path:
its ``sparse_arch`` holds all its tables (the embeddings and, for the models with a linear part, the
first-order tables), and its ``dense_forward`` reads only the other submodules.

One training step on every backend (see :class:`ParallelDLRM`)::

    parallel = parallelize_dlrm(build_ctr_model(cfg), ParallelConfig(), OptimConfig(), total_steps=..., ...)
    logits = parallel.forward(batch.dense, batch.sparse)   # (B,): (B, N_d) floats, (B, F) ids
    parallel.backward(ctr_loss(logits, batch.labels)); parallel.micro_step(True)

The parameters are shared with the original model object, so :meth:`ParallelDLRM.full_state_dict` names
everything as the model's ``state_dict()`` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models.dlrm import CTRModel, DLRMConfig, Pooled, SparseArch, ids_to_kjt
from sharding.backends import wrap_dense
from sharding.config import OptimConfig, ParallelConfig
from sharding.core import (
    ParallelModel,
    fill_shards,
    plan,
    sharded_rows,
    table_optimizer_class,
    table_sharding_type,
)


class DenseCTR(nn.Module):
    """The dense part of a CTR model (shared with the model: the same submodule objects under the same
    names, so its state dict names match the model's): ``forward(dense (B, N_d), pooled)`` returns the
    logits (B,) by the model's own ``dense_forward``."""

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        for name, child in model._modules.items():  # with the optional parts that are None
            if name != "sparse_arch":
                self.add_module(name, child)
        self._dense_forward = type(model).dense_forward

    def blocks(self) -> list[nn.Module]:
        """The submodules with parameters (FSDP2 shards each on its own, then the root)."""
        return [child for child in self.children() if any(True for _ in child.parameters())]

    def forward(self, dense: torch.Tensor, pooled: Pooled) -> torch.Tensor:
        return self._dense_forward(self, dense, pooled)  # (B,)


def plan_tables(tables: SparseArch, topology: Any, sharding_type: str, *, collective: bool = False) -> Any:
    """The TorchRec ``ShardingPlan`` of a CTR model's tables on ``topology`` (a ``torchrec.distributed.planner.
    Topology``), every table pinned to ``sharding_type`` ("table_wise", "column_wise", "row_wise", ...).

    ``collective=True`` makes the ranks of the job agree on one plan (every rank calls it); otherwise it
    plans offline, for any topology: e.g. a simulated 64-GPU cluster on a laptop, to check the row-wise
    plan and the memory per rank before a job is launched. Column-wise shards are the narrowest multiple
    of 4 columns that divides D and needs at most one shard per rank."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import ParameterConstraints

    # column-wise: split every table over the ranks (the planner would otherwise keep a small table whole)
    constraints = {}
    for collection in (tables.embedding_bag_collection, tables.linear_bag_collection):
        for config in collection.embedding_bag_configs() if collection is not None else []:
            width = _column_shard_width(config.embedding_dim, topology.world_size)
            constraints[config.name] = ParameterConstraints(
                sharding_types=[sharding_type],
                min_partition=width if sharding_type == "column_wise" else None,
            )
    return plan(tables, [EmbeddingBagCollectionSharder()], constraints, topology, collective=collective)


def _column_shard_width(dim: int, world_size: int) -> int:
    """The narrowest multiple of 4 that divides ``dim`` and needs at most one shard per rank (else dim)."""
    for width in range(4, dim + 1, 4):
        if width * world_size >= dim and dim % width == 0:
            return width
    return dim


class ShardedSparseArch(nn.Module):
    """The embedding tables as a TorchRec-sharded :class:`~models.dlrm.SparseArch`: ``forward(ids (B, F))``
    returns the pooled rows (:class:`~models.dlrm.Pooled`: (B, F, D), and (B, F + C) first-order
    weights). Collective: every rank calls it once per step (any B >= 1)."""

    def __init__(
        self,
        arch: SparseArch,
        cfg: DLRMConfig,
        *,
        device: torch.device,
        sharding: str,
        optimizer: str,
        lr: float,
    ) -> None:
        super().__init__()
        from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import Topology

        tables = SparseArch(cfg, device="meta")  # only this rank's shards are ever allocated
        apply_optimizer_in_backward(table_optimizer_class(optimizer, device), tables.parameters(), {"lr": lr})
        world_size = dist.get_world_size()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        topology = Topology(world_size=world_size, local_world_size=local_world, compute_device=device.type)
        self.plan = plan_tables(
            tables, topology, table_sharding_type(sharding, device, "table_wise"), collective=True
        )
        self.dmp = DistributedModelParallel(
            tables,
            device=device,
            plan=self.plan,
            sharders=[EmbeddingBagCollectionSharder()],
            init_data_parallel=False,
        )
        whole = arch.state_dict()

        def read_block(key: str, offsets: tuple[int, int], sizes: tuple[int, int]) -> torch.Tensor:
            """Block ``sizes`` at ``offsets`` of table ``key``: sliced from the model's table if it has
            storage (e.g. loaded weights), else generated (sharded from birth: SparseArch.initial_rows)."""
            (r0, c0), (rows, cols) = offsets, sizes
            if whole[key].device.type != "meta":
                return whole[key][r0 : r0 + rows, c0 : c0 + cols]
            return arch.initial_rows(key.split(".")[-2], r0, r0 + rows, (c0, c0 + cols))

        fill_shards(self.dmp, read_block)
        self.feature_names = cfg.sparse_names
        self.device = device

    @property
    def fused_optimizer(self) -> Any:
        return self.dmp.fused_optimizer

    def forward(self, ids: torch.Tensor) -> Pooled:
        return self.dmp(ids_to_kjt(ids.to(self.device), self.feature_names))

    def _tables(self) -> dict[str, Any]:
        """The tables' ShardedTensors, keyed like the model's ``state_dict()``."""
        return {
            "sparse_arch." + key.removeprefix("_dmp_wrapped_module."): value
            for key, value in self.dmp.state_dict().items()
        }

    def table_layout(self) -> dict[str, tuple[int, int]]:
        """The tables' full shapes (rows, cols), keyed like the model's ``state_dict()``."""
        return {key: tuple(value.size()) for key, value in self._tables().items()}

    def table_rows(self, key: str, start: int, rows: int, dst: int = 0) -> torch.Tensor | None:
        """Rows ``start : start + rows`` of table ``key`` on rank ``dst`` (None elsewhere), never the
        whole table (:func:`sharding.core.sharded_rows`). Collective."""
        return sharded_rows(self._tables()[key], start, rows, key, dst)

    def gather_tables(self) -> dict[str, torch.Tensor] | None:
        """The full tables on rank 0 (None elsewhere), keyed like the model's ``state_dict()``. Collective."""
        out: dict[str, torch.Tensor] = {}
        for key, value in self.dmp.state_dict().items():
            full = torch.empty(value.size()) if dist.get_rank() == 0 else None
            value.gather(dst=0, out=full)
            out["sparse_arch." + key.removeprefix("_dmp_wrapped_module.")] = full
        return out if dist.get_rank() == 0 else None


@dataclass
class ParallelDLRM(ParallelModel):
    """A CTR model distributed: sharded tables (:class:`ShardedSparseArch`) and the wrapped :class:`DenseCTR`.
    Stepping, checkpoint state (``state_dict`` / ``load_state_dict`` for DCP), snapshots for early
    stopping: see :class:`sharding.core.ParallelModel`; every table is trainable, so all are saved."""

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """Logits (B,) of dense features (B, N_d) and categorical ids (B, F). Collective."""
        pooled = self.sparse(sparse)  # (B, F, D) embeddings [, (B, F + C) first-order weights]
        with self.autocast():
            return self.dense.module(dense.to(self.sparse.device), pooled).float()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model as full tensors on rank 0, named like the model's ``state_dict()``; None on other
        ranks. Collective."""
        dense = self.dense.full_state_dict()
        tables = self.sparse.gather_tables()
        if dist.get_rank() != 0:
            return None
        assert dense is not None and tables is not None
        return {**dense, **tables}


def parallelize_dlrm(
    model: CTRModel,
    parallel: ParallelConfig,
    optim: OptimConfig,
    *,
    total_steps: int,
    micro_batch_size: int,
    device: torch.device,
) -> ParallelDLRM:
    """Shard the tables with TorchRec (``parallel.table_*``), then wrap the dense part with
    ``parallel.backend`` and ``optim``'s AdamW over ``total_steps`` steps. Needs an initialised process
    group (a job of one rank is fine). The model's own tables are freed afterwards (moved to the meta
    device): each rank keeps only its shards."""
    if not dist.is_initialized():
        raise RuntimeError("parallelize_dlrm needs torch.distributed to be initialised (see trainer.dist)")
    sparse = ShardedSparseArch(
        model.sparse_arch,
        model.cfg,
        device=device,
        sharding=parallel.table_sharding,
        optimizer=parallel.table_optimizer,
        lr=parallel.table_lr or optim.lr,
    )
    model.sparse_arch.to_empty(device=torch.device("meta"))
    dense = DenseCTR(model).to(device)
    backend = wrap_dense(
        dense,
        dense.blocks(),
        parallel,
        optim,
        total_steps=total_steps,
        micro_batch_size=micro_batch_size,
        device=device,
    )
    autocast_dtype = torch.bfloat16 if parallel.precision == "bf16" else None
    return ParallelDLRM(model, sparse, backend, autocast_dtype)
