"""Distribute an fMRLRec model over the ranks of a job: TorchRec-sharded item tables, and FSDP2, DeepSpeed
ZeRO or DDP for the dense part.

The model (models/fmrl) stays single-device PyTorch. :func:`parallelize_fmrl` splits it in two:

* **sparse**: the item tables (frozen text and image features, the optional learnable ID and attribute
  tables) move into TorchRec ``EmbeddingCollection`` s (the attribute table: an ``EmbeddingBagCollection``
  that mean-pools each item's attributes) sharded by the TorchRec planner (sharding/core.py), with
  ``ParameterConstraints`` that pin each table's sharding type (``parallel.feature_table_sharding``,
  ``parallel.table_sharding``). The frozen tables are looked up under ``no_grad``, so no gradient ever
  reaches them; the learnable ones train with a TorchRec fused optimizer applied in backward
  (``parallel.table_optimizer``). Column-wise shards of a learnable table get widths that are nested
  sizes, so a Matryoshka prefix never straddles a shard boundary.
* **dense**: the projector, the embedding dropout and the LRU blocks, as one :class:`DenseFMRL` module
  run by the backend of ``parallel.backend`` (sharding/backends.py): FSDP2, DeepSpeed ZeRO or DDP.

One training step on every backend (see :class:`ParallelFMRL`)::

    ids, inverse = torch.unique(needed_ids, return_inverse=True)   # items this step touches
    features = parallel.sparse(ids)                                # per table (U, F_t), sharded lookup
    hidden, reps = parallel.dense(features, token_index, mask)     # (B, L, D), (U, D)
    loss = ...; parallel.backward(loss); parallel.micro_step(boundary=True)

The parameters are shared with the original model object, so ``model.state_dict()`` naming is what the
rest of the project (exports, slicing to nested sizes) uses; :meth:`ParallelFMRL.full_state_dict`
gathers it onto rank 0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from models.fmrl import FMRLRec
from models.fmrl.model import ItemTower, project_features
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

FROZEN_TABLES = ("text", "image")
ID_TABLE = "id"
ATTRIBUTE_TABLE = "attribute"
LEARNABLE_TABLES = (ID_TABLE, ATTRIBUTE_TABLE)
# where each learnable table lives in FMRLRec.state_dict()
MODEL_TABLE_KEYS = {
    ID_TABLE: "item_tower.id_embedding.weight",
    ATTRIBUTE_TABLE: "item_tower.attributes.weight",
}


class FrozenTableSource(Protocol):
    """Where a frozen table's shards come from when the model holds it on meta: any (rows, cols) block,
    as float32, without the rest (``data_pipeline.features.FeatureTableReader``)."""

    shape: tuple[int, int]

    def read(
        self, row_start: int, rows: int, col_start: int = 0, cols: int | None = None
    ) -> torch.Tensor: ...


class DenseFMRL(nn.Module):
    """The dense part of fMRLRec: item projector, embedding dropout, LRU trunk (shared with the model).

    ``forward(features, token_index, mask)``: features, per table (U, F_t) rows of the U looked-up items;
    token_index (B, L) positions of the tokens' items in those U rows; mask (B, L) True at real tokens.
    Returns the hidden states (B, L, D) and the item representations (U, D). With ``token_index=None`` it
    only projects (U, D), which evaluation uses to build the item table shard by shard.
    """

    def __init__(self, model: FMRLRec) -> None:
        super().__init__()
        self.projector = model.item_tower.projector
        self.embedding_dropout = model.embedding_dropout
        self.trunk = model.trunk

    def forward(
        self,
        features: list[torch.Tensor],
        token_index: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> Any:
        reps = project_features(self.projector, features)  # (U, D)
        if token_index is None:
            return reps
        hidden = self.trunk(self.embedding_dropout(reps[token_index]), mask)  # (B, L, D)
        return hidden, reps


# ------------------------------------------------------------------------------------------- sparse part


def nested_min_partition(dim: int, sizes: list[int], world_size: int) -> int:
    """Column-wise shard width for a width-``dim`` table: the smallest nested size that is at least
    ``dim / world_size`` (at most one shard per rank) and divides ``dim``; ``dim`` if none does."""
    for m in sizes:
        if m * world_size >= dim and dim % m == 0 and m % 4 == 0:
            return m
    return dim


def even_min_partition(dim: int, world_size: int) -> int:
    """Column-wise shard width for a frozen width-``dim`` table: the smallest width that is at least
    ``dim / world_size`` (at most one shard per rank, so each rank reads its own columns), a multiple of
    4 and divides ``dim``; ``dim`` if none does."""
    for m in range(4, dim, 4):
        if m * world_size >= dim and dim % m == 0:
            return m
    return dim


@dataclass(frozen=True)
class TableLookups:
    """What one training step looks up in the item tables on one rank, for TorchRec's cost and memory
    model (without it the planner assumes 512 lookups of one id each): every table is asked for the
    same ``ids`` item ids in one bag (one sequence-embedding lookup per id); the attribute table pools
    each id's bag of ``attributes_per_item`` attribute ids on average."""

    ids: int
    attributes_per_item: float


def plan_item_tables(
    tower: ItemTower,
    topology: Any,
    *,
    nested_sizes: list[int],
    device: torch.device,
    feature_sharding: str,
    table_sharding: str,
    table_optimizer: str,
    table_lr: float,
    collective: bool,
    stats: list[Any] | None = None,
    attribute_sharding: str = "same",
    lookups: TableLookups | None = None,
) -> tuple[nn.ModuleDict, Any, list[Any]]:
    """The item tower's tables as TorchRec collections on the meta device (one per table, each with its
    fused optimizer), their ``ShardingPlan`` on ``topology`` (a ``torchrec.distributed.planner.Topology``)
    and the sharders that apply it. Training shards the item tables with it (:class:`ShardedItemTables`,
    ``collective=True``), and ``fmrl plan`` calls it for a simulated cluster (``collective=False``, a
    meta-device tower of any size; ``device`` of type "cuda" plans for GPUs on a machine without one).

    Every table is pinned to its sharding type (``feature_sharding`` for the frozen tables,
    ``table_sharding`` for the learnable ones; "auto" resolves against ``device``); the compute kernel is
    the planner's choice, so a table that does not fit in HBM gets a UVM-cached kernel; the attribute
    table uses ``attribute_sharding`` unless it is "same". ``stats`` are TorchRec ``Stats`` that receive
    the chosen plan (default: TorchRec's EmbeddingStats log). ``lookups``: the step's real lookup batch
    and pooling per table (``fmrl plan``); None keeps TorchRec's default batch."""
    from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
    from torchrec import (
        EmbeddingBagCollection,
        EmbeddingBagConfig,
        EmbeddingCollection,
        EmbeddingConfig,
        PoolingType,
    )
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import ParameterConstraints

    names = tower.table_names()
    sources = dict(zip(names, tower.tables()))
    # one collection per table: an EmbeddingCollection needs equal widths, and the frozen ones are
    # looked up without autograd
    tables = nn.ModuleDict()
    constraints: dict[str, Any] = {}
    for n in names:
        # one feature per table, looked up by lookups.ids samples of pooling 1 (the attribute table: its
        # mean bag size); TorchRec's storage and perf estimates scale with batch x pooling
        batch: dict[str, Any] = {}
        if lookups is not None:
            pooling = lookups.attributes_per_item if n == ATTRIBUTE_TABLE else 1.0
            batch = {"batch_sizes": [lookups.ids], "num_poolings": [1.0], "pooling_factors": [pooling]}
        source = sources[n]
        if n == ATTRIBUTE_TABLE:
            bag_config = EmbeddingBagConfig(
                name=n,
                embedding_dim=source.embedding_dim,
                num_embeddings=source.num_embeddings,
                feature_names=[n],
                pooling=PoolingType.MEAN,
            )
            tables[n] = EmbeddingBagCollection(tables=[bag_config], device=torch.device("meta"))
        else:
            config = EmbeddingConfig(
                name=n,
                embedding_dim=source.embedding_dim,
                num_embeddings=source.num_embeddings,
                feature_names=[n],
            )
            tables[n] = EmbeddingCollection(tables=[config], device=torch.device("meta"))
        if n in FROZEN_TABLES:
            # never stepped: the lookup runs under no_grad. TorchRec's CPU kernels are all fused, so a
            # frozen table still needs some fused optimizer; plain SGD at lr 0 keeps no state.
            apply_optimizer_in_backward(torch.optim.SGD, tables[n].parameters(), {"lr": 0.0})
            kind = table_sharding_type(feature_sharding, device, "table_wise")
            width = even_min_partition(source.embedding_dim, topology.world_size)
            constraints[n] = ParameterConstraints(sharding_types=[kind], min_partition=width, **batch)
        else:  # the ID and attribute tables follow parallel.table_* (attribute: parallel.attribute_*)
            optimizer = table_optimizer_class(table_optimizer, device)
            apply_optimizer_in_backward(optimizer, tables[n].parameters(), {"lr": table_lr})
            requested = table_sharding
            if n == ATTRIBUTE_TABLE and attribute_sharding != "same":
                requested = attribute_sharding
            kind = table_sharding_type(requested, device, "column_wise")
            width = nested_min_partition(source.embedding_dim, nested_sizes, topology.world_size)
            constraints[n] = ParameterConstraints(sharding_types=[kind], min_partition=width, **batch)
    sharders = [EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder()]
    sharding_plan = plan(tables, sharders, constraints, topology, collective=collective, stats=stats)
    return tables, sharding_plan, sharders


class ShardedItemTables(nn.Module):
    """The item tower's tables as TorchRec-sharded EmbeddingCollections (the attribute table: an
    EmbeddingBagCollection that mean-pools each item's attribute bag): ``forward(ids (U,))`` returns the
    rows of every table, (U, F_t) each, in the tower's table order. Collective: every rank must call it
    the same number of times (with its own ids, any count including zero).

    Sharded from birth: the collections are built on meta and TorchRec allocates only this rank's
    shards; each shard is filled from where its rows live: a tower table that has
    storage is sliced, a meta one is generated (learnable: ``ItemTower.initial_rows``) or read from
    ``frozen_tables`` (the feature files, only the shard's bytes)."""

    def __init__(
        self,
        tower: ItemTower,
        *,
        nested_sizes: list[int],
        device: torch.device,
        feature_sharding: str,
        table_sharding: str,
        table_optimizer: str,
        table_lr: float,
        frozen_tables: Mapping[str, FrozenTableSource] | None = None,
        attribute_sharding: str = "same",
        lookups: TableLookups | None = None,
    ) -> None:
        super().__init__()
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import Topology

        self.names = tower.table_names()
        sources = dict(zip(self.names, tower.tables()))
        self.attribute_bags = tower.attribute_bags
        world_size = dist.get_world_size()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        topology = Topology(world_size=world_size, local_world_size=local_world, compute_device=device.type)
        tables, self.plan, sharders = plan_item_tables(
            tower,
            topology,
            nested_sizes=nested_sizes,
            device=device,
            feature_sharding=feature_sharding,
            table_sharding=table_sharding,
            attribute_sharding=attribute_sharding,
            table_optimizer=table_optimizer,
            table_lr=table_lr,
            collective=True,
            lookups=lookups,
        )
        self.dmp = DistributedModelParallel(
            tables, device=device, plan=self.plan, sharders=sharders, init_data_parallel=False
        )
        frozen = dict(frozen_tables or {})

        def read_block(key: str, offsets: tuple[int, int], sizes: tuple[int, int]) -> torch.Tensor:
            """Block ``sizes`` at ``offsets`` of the table that state-dict entry ``key`` holds."""
            (r0, c0), (rows, cols) = offsets, sizes
            name = key.split(".", 1)[0]
            weight = sources[name].weight
            if weight.device.type != "meta":
                return weight[r0 : r0 + rows, c0 : c0 + cols]
            if name in FROZEN_TABLES:
                source = frozen.get(name)
                if source is None:
                    raise ValueError(
                        f"the {name} table is on meta and no file to read its shards from was given"
                    )
                if tuple(source.shape) != tuple(weight.shape):
                    raise ValueError(
                        f"the {name} file holds {tuple(source.shape)}, the model {tuple(weight.shape)}"
                    )
                return source.read(r0, rows, c0, cols)
            return tower.initial_rows(name, r0, r0 + rows)[:, c0 : c0 + cols]

        fill_shards(self.dmp, read_block)
        self.device = device

    @property
    def fused_optimizer(self) -> Any:
        return self.dmp.fused_optimizer

    def forward(self, ids: torch.Tensor) -> list[torch.Tensor]:
        from torchrec import KeyedJaggedTensor

        ids = ids.to(self.device).contiguous()  # a strided view breaks the all-to-all
        lengths = torch.tensor([len(ids)], dtype=torch.int32, device=ids.device)
        rows = []
        for name in self.names:
            with torch.set_grad_enabled(torch.is_grad_enabled() and name not in FROZEN_TABLES):
                if name == ATTRIBUTE_TABLE:
                    assert self.attribute_bags is not None
                    values, bag_lengths = self.attribute_bags.select(ids.cpu())
                    kjt = KeyedJaggedTensor.from_lengths_sync(
                        keys=[name],
                        values=values.to(self.device),
                        lengths=bag_lengths.to(self.device, torch.int32),
                    )
                    rows.append(self.dmp.module[name](kjt)[name])  # (U, F_name), pooled
                else:
                    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[name], values=ids, lengths=lengths)
                    rows.append(self.dmp.module[name](kjt)[name].values())  # (U, F_name)
        return rows

    def _learnable_state(self) -> dict[str, Any]:
        """The learnable tables' ShardedTensors, keyed like the model's state dict."""
        out = {}
        for key, value in self.dmp.state_dict().items():
            name = key.removeprefix("_dmp_wrapped_module.").split(".", 1)[0]
            if name in LEARNABLE_TABLES:
                out[MODEL_TABLE_KEYS[name]] = value
        return out

    def table_layout(self) -> dict[str, tuple[int, int]]:
        """The learnable tables' full shapes (rows, cols), keyed like the model's state dict; known on
        every rank without any table being whole anywhere."""
        return {key: tuple(value.size()) for key, value in self._learnable_state().items()}

    def table_rows(self, key: str, start: int, rows: int, dst: int = 0) -> torch.Tensor | None:
        """Rows ``start : start + rows`` of learnable table ``key`` (all columns) on rank ``dst``, None
        elsewhere: every rank sends the part of its shards in those rows, so ``dst`` holds one block of
        the table at a time, never the table. Collective."""
        return sharded_rows(self._learnable_state()[key], start, rows, key, dst)

    def gather_tables(self) -> dict[str, torch.Tensor] | None:
        """The full trainable tables on rank 0 (None elsewhere), keyed like the model's state dict."""
        out: dict[str, torch.Tensor] = {}
        for key, value in self.dmp.state_dict().items():
            name = key.removeprefix("_dmp_wrapped_module.").split(".", 1)[0]
            if name not in LEARNABLE_TABLES:
                continue
            full = torch.empty(value.size()) if dist.get_rank() == 0 else None
            value.gather(dst=0, out=full)
            out[MODEL_TABLE_KEYS[name]] = full
        return out if dist.get_rank() == 0 else None


def _collection_key(name: str) -> str:
    """Where table ``name`` sits in the state dict of its (unsharded) collection module."""
    if name == ATTRIBUTE_TABLE:
        return f"{name}.embedding_bags.{name}"
    return f"{name}.embeddings.{name}"


@dataclass
class ParallelFMRL(ParallelModel):
    """fMRLRec distributed: the item tables (:class:`ShardedItemTables`) and :class:`DenseFMRL` under its
    backend. Stepping, checkpoint state and snapshots: :class:`sharding.core.ParallelModel`."""

    def trainable_table(self, key: str) -> bool:
        # the frozen feature tables come from the feature files
        return key.split(".", 1)[0] in LEARNABLE_TABLES

    def forward(self, tokens: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, L, D) of ``tokens`` (B, L) and representations (U, D) of ``ids`` (U,),
        sorted unique ids that include every token id. Collective."""
        token_index = torch.searchsorted(ids, tokens)  # (B, L) rows of the tokens' items
        features = self.sparse(ids)
        with self.autocast():
            hidden, reps = self.dense.module(features, token_index, tokens > 0)
        return hidden.float(), reps.float()

    def item_representations(self, ids: torch.Tensor) -> torch.Tensor:
        """(U, D) representations of ``ids`` (U,); collective."""
        features = self.sparse(ids)
        with self.autocast():
            return self.dense.module(features).float()

    def last_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, D) final hidden state of each left-padded history in ``tokens`` (B, L); B may be 0 (the
        rank still joins the collectives)."""
        empty = tokens.shape[0] == 0
        if empty:
            tokens = torch.zeros(1, 1, dtype=torch.int64, device=tokens.device)
        hidden, _ = self.forward(tokens, torch.unique(tokens))
        return hidden[:0, -1] if empty else hidden[:, -1]

    def model_key(self, dense_key: str) -> str:
        return _model_key(dense_key)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The trainable state as full tensors on rank 0, named like ``FMRLRec.state_dict()``; None on
        other ranks. Collective. (The run's final weights are written with :meth:`weight_pieces`.)"""
        dense = self.dense.full_state_dict()
        tables = self.sparse.gather_tables()
        if dist.get_rank() != 0:
            return None
        assert dense is not None and tables is not None
        return {**{_model_key(k): v for k, v in dense.items()}, **tables}


def _model_key(dense_key: str) -> str:
    """DenseFMRL state-dict names -> FMRLRec names."""
    if dense_key.startswith("projector."):
        return "item_tower." + dense_key
    return dense_key


def parallelize_fmrl(
    model: FMRLRec,
    parallel: ParallelConfig,
    optim: OptimConfig,
    *,
    total_steps: int,
    micro_batch_size: int,
    device: torch.device,
    frozen_tables: Mapping[str, FrozenTableSource] | None = None,
    lookups: TableLookups | None = None,
) -> ParallelFMRL:
    """Shard the item tables with TorchRec (``parallel.feature_table_sharding`` / ``table_*``), then wrap
    the dense part with ``parallel.backend`` and ``optim``'s AdamW over ``total_steps`` steps. Needs an
    initialised process group (a job of one rank is fine). A model built with its tables on meta
    (``FMRLRec(..., table_device="meta")``, meta feature tensors) is sharded from birth: its frozen
    shards are read from ``frozen_tables`` ("text", "image"), its learnable ones generated per shard.
    Either way the model's own tables end on meta: each rank keeps only its shards. ``lookups``: the
    step's lookup batch per table (``trainer.plan.step_lookups``), so the planner sizes the tables'
    buffers and chooses kernels for the real step, as ``fmrl plan`` does; None keeps TorchRec's default."""
    if not dist.is_initialized():
        raise RuntimeError("parallelize_fmrl needs torch.distributed to be initialised (see trainer.dist)")
    sparse = ShardedItemTables(
        model.item_tower,
        nested_sizes=list(model.cfg.nested_sizes),
        device=device,
        feature_sharding=parallel.feature_table_sharding,
        table_sharding=parallel.table_sharding,
        attribute_sharding=parallel.attribute_table_sharding,
        table_optimizer=parallel.table_optimizer,
        table_lr=parallel.table_lr or optim.lr,
        frozen_tables=frozen_tables,
        lookups=lookups,
    )
    _free_tables(model.item_tower)
    dense = DenseFMRL(model).to(device)
    backend = wrap_dense(
        dense,
        list(dense.trunk.blocks),
        parallel,
        optim,
        total_steps=total_steps,
        micro_batch_size=micro_batch_size,
        device=device,
    )
    autocast_dtype = torch.bfloat16 if parallel.precision == "bf16" else None
    return ParallelFMRL(model, sparse, backend, autocast_dtype)


def _free_tables(tower: ItemTower) -> None:
    """Drop the unsharded tables' storage, keeping their shapes on meta (the shards are the live ones)."""
    for table in tower.tables():
        table.weight = nn.Parameter(table.weight.to("meta"), requires_grad=False)
