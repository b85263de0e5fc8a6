"""Distribute an fMRLRec model over the ranks of a job: TorchRec-sharded item tables, and FSDP2, DeepSpeed
ZeRO or DDP for the dense part.

The model (models/fmrl) stays single-device PyTorch. :func:`parallelize_fmrl` splits it in two:

* **sparse**: the item tables (frozen text and image features, the optional learnable ID table) move
  into TorchRec ``EmbeddingCollection`` s sharded by the TorchRec planner, with ``ParameterConstraints``
  that pin each table's sharding type (``parallel.*_table_sharding``). The frozen tables are looked up
  under ``no_grad``, so no gradient ever reaches them; the ID table trains with a TorchRec fused
  optimizer applied in backward (row-wise Adagrad by default). Column-wise shards of the ID table get
  widths that are nested sizes, so a Matryoshka prefix never straddles a shard boundary.
* **dense**: the projector, the embedding dropout and the LRU blocks, as one :class:`DenseFMRL` module
  wrapped by the chosen backend: ``fully_shard`` per LRU block and then the dense root (FSDP2),
  ``deepspeed.initialize`` with ZeRO stage 1, 2 or 3 (DeepSpeed owns only this module and its AdamW),
  or ``DistributedDataParallel``.

One training step on every backend (see :class:`ParallelFMRL`)::

    ids, inverse = torch.unique(needed_ids, return_inverse=True)   # items this step touches
    features = parallel.sparse(ids)                                # per table (U, F_t), sharded lookup
    hidden, reps = parallel.dense(features, token_index, mask)     # (B, L, D), (U, D)
    loss = ...; parallel.backward(loss); parallel.step()

The parameters are shared with the original model object, so ``model.state_dict()`` naming is what the
rest of the project (exports, slicing to nested sizes) uses; :meth:`ParallelFMRL.full_state_dict`
gathers it onto rank 0.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models.fmrl import FMRLRec
from models.fmrl.model import ItemTower, project_features

log = logging.getLogger("fmrl")

FROZEN_TABLES = ("text", "image")


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # flat keys ("state.<fqn>.exp_avg"): the nested param_groups list does not survive DCP's flattening
    return StateDictOptions(flatten_optimizer_state_dict=True)


ID_TABLE = "id"
ATTRIBUTE_TABLE = "attribute"
LEARNABLE_TABLES = (ID_TABLE, ATTRIBUTE_TABLE)
# where each learnable table lives in FMRLRec.state_dict()
MODEL_TABLE_KEYS = {
    ID_TABLE: "item_tower.id_embedding.weight",
    ATTRIBUTE_TABLE: "item_tower.attributes.weight",
}


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


def _sharding_type(setting: str, device: torch.device, default_cpu: str) -> str:
    if setting != "auto":
        if setting == "row_wise" and device.type != "cuda":
            raise ValueError(
                "row_wise table sharding needs CUDA (TorchRec has no CPU kernel for it); "
                "use table_wise or column_wise on CPU"
            )
        return setting
    return "row_wise" if device.type == "cuda" else default_cpu


def nested_min_partition(dim: int, sizes: list[int], world_size: int) -> int:
    """Column-wise shard width for a width-``dim`` table: the smallest nested size that is at least
    ``dim / world_size`` (at most one shard per rank) and divides ``dim``; ``dim`` if none does."""
    for m in sizes:
        if m * world_size >= dim and dim % m == 0 and m % 4 == 0:
            return m
    return dim


class ShardedItemTables(nn.Module):
    """The item tower's tables as TorchRec-sharded EmbeddingCollections (the attribute table: an
    EmbeddingBagCollection that mean-pools each item's attribute bag): ``forward(ids (U,))`` returns the
    rows of every table, (U, F_t) each, in the tower's table order. Collective: every rank must call it
    the same number of times (with its own ids, any count including zero)."""

    def __init__(
        self,
        tower: ItemTower,
        *,
        nested_sizes: list[int],
        device: torch.device,
        feature_sharding: str,
        id_sharding: str,
        id_optimizer: str,
        id_lr: float,
    ) -> None:
        super().__init__()
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
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

        self.names = tower.table_names()
        sources = dict(zip(self.names, tower.tables()))
        self.attribute_bags = tower.attribute_bags
        world_size = dist.get_world_size()
        frozen = [n for n in self.names if n in FROZEN_TABLES]
        learnable = [n for n in self.names if n in LEARNABLE_TABLES]

        # one collection per table: an EmbeddingCollection needs equal widths, and the frozen ones are
        # looked up without autograd
        tables = nn.ModuleDict()
        for n in self.names:
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
            if n in frozen:
                # never stepped: the lookup runs under no_grad. TorchRec's CPU kernels are all fused, so a
                # frozen table still needs some fused optimizer; plain SGD at lr 0 keeps no state.
                apply_optimizer_in_backward(torch.optim.SGD, tables[n].parameters(), {"lr": 0.0})
            else:
                apply_optimizer_in_backward(
                    _id_optimizer_class(id_optimizer), tables[n].parameters(), {"lr": id_lr}
                )

        constraints: dict[str, Any] = {}
        for n in frozen:
            kind = _sharding_type(feature_sharding, device, "table_wise")
            constraints[n] = ParameterConstraints(sharding_types=[kind])
        for n in learnable:  # the ID and attribute tables follow parallel.id_table_*
            kind = _sharding_type(id_sharding, device, "column_wise")
            width = nested_min_partition(sources[n].embedding_dim, nested_sizes, world_size)
            constraints[n] = ParameterConstraints(sharding_types=[kind], min_partition=width)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        topology = Topology(world_size=world_size, local_world_size=local_world, compute_device=device.type)
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
        sharders = [EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder()]
        plan = planner.collective_plan(tables, sharders, dist.GroupMember.WORLD)
        self.plan = plan
        self.dmp = DistributedModelParallel(
            tables, device=device, plan=plan, sharders=sharders, init_data_parallel=False
        )
        fill_shards(self.dmp, {f"{_collection_key(n)}.weight": sources[n].weight for n in self.names})
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


def fill_shards(dmp: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Fill every local shard of a DistributedModelParallel's tables from the full (unsharded) tables,
    which every rank holds at start-up (keyed like the unwrapped module's state dict)."""
    for key, value in dmp.state_dict().items():
        source = full[key.removeprefix("_dmp_wrapped_module.")]
        for shard in value.local_shards():
            (r0, c0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            with torch.no_grad():
                shard.tensor.copy_(source[r0 : r0 + rows, c0 : c0 + cols])


def _id_optimizer_class(name: str) -> type:
    if name == "rowwise_adagrad":
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

        return RowWiseAdagrad
    return {"adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]


# -------------------------------------------------------------------------------------------- dense part


@dataclass
class ParallelModel:
    """A distributed model: TorchRec-sharded tables, the wrapped dense part, and how to step and save
    them. The model-specific subclasses (:class:`ParallelFMRL`, sharding.dlrm.ParallelDLRM) add the
    forward and name the trainable tables."""

    model: nn.Module
    sparse: Any
    """The sharded tables: ``.dmp`` (DistributedModelParallel), ``.fused_optimizer``, ``.device``."""
    dense: nn.Module
    """The wrapped dense module (FSDP2 module, DDP, or a DeepSpeed engine); call it like the module."""
    backend: str
    optimizer: torch.optim.Optimizer | None
    """The dense AdamW (None under DeepSpeed, whose engine steps its own)."""
    scheduler: Any
    grad_clip: float
    autocast_dtype: torch.dtype | None

    grad_accum_steps: int = 1

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
        if self.backend == "deepspeed":
            self.dense.backward(loss)  # divides by gradient_accumulation_steps itself
        else:
            (loss / self.grad_accum_steps).backward()

    def micro_step(self, boundary: bool) -> None:
        """After each micro-batch: at an accumulation boundary clip the dense gradients, step the dense
        optimizer and the schedule (the ID table's fused optimizer already stepped in backward)."""
        if self.backend == "deepspeed":
            self.dense.step()  # steps (with clipping and the schedule) only at its own boundaries
            return
        if not boundary:
            return
        assert self.optimizer is not None
        torch.nn.utils.clip_grad_norm_(self.dense.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_grad_sync(self, enabled: bool) -> None:
        """Skip the gradient all-reduce on accumulation micro-batches (FSDP2 and DDP)."""
        if self.backend == "fsdp2":
            self.dense.set_requires_gradient_sync(enabled)
        elif self.backend == "ddp":
            self.dense.require_backward_grad_sync = enabled

    def last_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def dense_parameters(self) -> list[torch.Tensor]:
        module = self.dense.module if self.backend in ("deepspeed", "ddp") else self.dense
        return list(module.parameters())

    def state_dict(self) -> dict[str, Any]:
        """The trainable state for DCP: dense weights and optimizer (DTensors under FSDP2, full tensors
        under DeepSpeed, see :func:`deepspeed_state_dict`), the ID table
        and its fused optimizer state (ShardedTensors: live, so a DCP load fills them in place), and the
        schedule. The frozen feature tables are not included: they come from the feature files."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        tables = {k: v for k, v in self.sparse.dmp.state_dict().items() if self.trainable_table(k)}
        fused = {
            k: v
            for k, v in self.sparse.fused_optimizer.state_dict()["state"].items()
            if self.trainable_table(k) and v
        }
        state: dict[str, Any]
        if self.backend == "deepspeed":
            state = deepspeed_state_dict(self.dense)
        else:
            state = {
                "dense": get_model_state_dict(self.dense),
                "dense_optimizer": get_optimizer_state_dict(self.dense, self.optimizer, options=_options()),
            }
        state["schedule"] = json.dumps(self.scheduler.state_dict())
        if tables:
            state["tables"] = tables
        if fused:  # empty on ranks that hold no shard of the ID table
            state["tables_optimizer"] = fused
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Apply a ``state_dict()`` that DCP has filled (the tables were filled in place)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if self.backend == "deepspeed":
            load_deepspeed_state_dict(self.dense, state)
        else:
            set_model_state_dict(self.dense, state["dense"])
            set_optimizer_state_dict(self.dense, self.optimizer, state["dense_optimizer"], options=_options())
        self.scheduler.load_state_dict(json.loads(state["schedule"]))

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of this rank's local trainable state (dense shards and table shards), for
        :meth:`restore` (the early-stopping best model)."""
        return [t.detach().clone() for t in self._local_tensors()]

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for target, saved in zip(self._local_tensors(), snapshot, strict=True):
                target.copy_(saved)

    def _local_tensors(self) -> list[torch.Tensor]:
        if self.backend == "fsdp2":
            from torch.distributed.fsdp import FSDPModule

            # the root may still hold its gathered parameters after a forward: go back to the shards
            for module in self.dense.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
        tensors = []
        for p in self.dense_parameters():
            if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition
                tensors.append(p.ds_tensor)
            elif hasattr(p, "to_local"):  # FSDP2 DTensor
                tensors.append(p.to_local())
            else:
                tensors.append(p.data)
        for key, value in self.sparse.dmp.state_dict().items():
            if self.trainable_table(key.removeprefix("_dmp_wrapped_module.")):
                tensors += [shard.tensor for shard in value.local_shards()]
        return tensors

    def _full_dense_state(self) -> dict[str, torch.Tensor] | None:
        if self.backend == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(
                self.dense, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        elif self.backend == "deepspeed":
            import deepspeed

            module = self.dense.module
            params = list(module.parameters())
            with deepspeed.zero.GatheredParameters(
                params, modifier_rank=None, enabled=self.dense.zero_optimization_stage() == 3
            ):
                state = {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
        else:
            state = {k: v.detach().clone().cpu() for k, v in self.dense.module.state_dict().items()}
        return state if dist.get_rank() == 0 else None


@dataclass
class ParallelFMRL(ParallelModel):
    """fMRLRec distributed: the item tables (:class:`ShardedItemTables`) and the wrapped :class:`DenseFMRL`."""

    def trainable_table(self, key: str) -> bool:
        # the frozen feature tables come from the feature files
        return key.split(".", 1)[0] in LEARNABLE_TABLES

    def forward(self, tokens: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, L, D) of ``tokens`` (B, L) and representations (U, D) of ``ids`` (U,),
        sorted unique ids that include every token id. Collective."""
        token_index = torch.searchsorted(ids, tokens)  # (B, L) rows of the tokens' items
        features = self.sparse(ids)
        with self.autocast():
            hidden, reps = self.dense(features, token_index, tokens > 0)
        return hidden.float(), reps.float()

    def item_representations(self, ids: torch.Tensor) -> torch.Tensor:
        """(U, D) representations of ``ids`` (U,); collective."""
        features = self.sparse(ids)
        with self.autocast():
            return self.dense(features).float()

    def last_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, D) final hidden state of each left-padded history in ``tokens`` (B, L); B may be 0 (the
        rank still joins the collectives)."""
        empty = tokens.shape[0] == 0
        if empty:
            tokens = torch.zeros(1, 1, dtype=torch.int64, device=tokens.device)
        hidden, _ = self.forward(tokens, torch.unique(tokens))
        return hidden[:0, -1] if empty else hidden[:, -1]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The trainable state as full tensors on rank 0, named like ``FMRLRec.state_dict()``; None on
        other ranks. Collective."""
        dense = self._full_dense_state()
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


# ------------------------------------------------------------------------------ DeepSpeed checkpoints

_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
_ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


@dataclass
class _ZeroPartition:
    """One flat fp32 master partition (n,) that the ZeRO optimizer steps (the AdamW state is keyed by it),
    and where its parameters lie in it.

    ZeRO-1/2 concatenate a parameter group (each parameter at ``offsets[k]``, padded at the end) and cut
    it into W equal pieces of n: rank r owns elements [r*n, (r+1)*n) of the concatenation. ZeRO-3 cuts
    every parameter into W equal pieces of ``ceil(numel/W)`` (padded) and concatenates rank r's pieces:
    parameter k's piece starts at ``offsets[k]`` of the partition."""

    master: torch.Tensor
    hyperparameters: dict[str, Any]
    """The AdamW param group (lr, betas, weight decay ...) of these parameters."""
    process_group: Any
    names: list[str]
    params: list[nn.Parameter]
    shapes: list[torch.Size]
    offsets: list[int]
    per_parameter: bool
    """ZeRO-3's layout (every parameter cut separately) rather than ZeRO-1/2's (the group cut)."""

    def full(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Every parameter's full tensor (its shape) from ``rows`` (W, n): all ranks' partitions."""
        world = rows.shape[0]
        if not self.per_parameter:
            flat = rows.reshape(-1)
            return [flat[o : o + s.numel()].view(s).clone() for o, s in zip(self.offsets, self.shapes)]
        return [
            rows[:, o : o + _ceil_div(s.numel(), world)].reshape(-1)[: s.numel()].view(s).clone()
            for o, s in zip(self.offsets, self.shapes)
        ]

    def local(self, full: list[torch.Tensor], rank: int, world: int) -> torch.Tensor:
        """This rank's partition (n,) of the parameters' full tensors ``full`` (zeros in the padding)."""
        n = self.master.numel()
        if not self.per_parameter:
            flat = torch.zeros(world * n, dtype=self.master.dtype, device=self.master.device)
            for o, tensor in zip(self.offsets, full):
                flat[o : o + tensor.numel()] = tensor.reshape(-1)
            return flat[rank * n : (rank + 1) * n].clone()
        partition = torch.zeros(n, dtype=self.master.dtype, device=self.master.device)
        for o, tensor in zip(self.offsets, full):
            piece = _ceil_div(tensor.numel(), world)
            padded = torch.zeros(world * piece, dtype=self.master.dtype, device=self.master.device)
            padded[: tensor.numel()] = tensor.reshape(-1)
            partition[o : o + piece] = padded[rank * piece : (rank + 1) * piece]
        return partition


def _ceil_div(numel: int, world: int) -> int:
    return -(-numel // world)


def _zero_partitions(engine: Any) -> list[_ZeroPartition]:
    """The master partitions of a DeepSpeed ZeRO-1/2/3 engine (fp32 parameters, no offload)."""
    zero = engine.optimizer
    names = {id(p): name for name, p in engine.module.named_parameters()}
    partitions = []
    if engine.zero_optimization_stage() == 3:
        for i, params in enumerate(zero.fp16_groups):
            pieces = [p.partition_numel() for p in params]
            partitions.append(
                _ZeroPartition(
                    master=zero.fp32_partitioned_groups_flat[i],
                    hyperparameters=zero.optimizer.param_groups[zero.sub_group_to_group_id[i]],
                    process_group=zero.sub_group_process_groups[i],
                    names=[names[id(p)] for p in params],
                    params=params,
                    shapes=[p.ds_shape for p in params],
                    offsets=[sum(pieces[:k]) for k in range(len(pieces))],
                    per_parameter=True,
                )
            )
        return partitions
    for i, params in enumerate(zero.round_robin_bit16_groups):
        partitions.append(
            _ZeroPartition(
                master=zero.single_partition_of_fp32_groups[i],
                hyperparameters=zero.optimizer.param_groups[i],
                process_group=zero.real_dp_process_group[i],
                names=[names[id(p)] for p in params],
                params=params,
                shapes=[meta.shape for meta in zero.round_robin_bit16_meta[i]],
                offsets=list(zero.round_robin_bit16_offsets[i]),
                per_parameter=False,
            )
        )
    return partitions


def _gather_rows(partition: torch.Tensor, group: Any) -> torch.Tensor:
    """(W, n): every rank's ``partition`` (n,) of ``group``. Collective."""
    rows = [torch.empty_like(partition) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, partition.detach().contiguous(), group=group)
    return torch.stack(rows)


def _step_device(partition: _ZeroPartition) -> torch.device:
    """Where torch's AdamW keeps its step counter: on the parameter's device only when fused/capturable."""
    on_device = partition.hyperparameters.get("fused") or partition.hyperparameters.get("capturable")
    return partition.master.device if on_device else torch.device("cpu")


def deepspeed_state_dict(engine: Any) -> dict[str, Any]:
    """The dense state of a DeepSpeed ZeRO-1/2/3 engine for DCP, unpartitioned, so it loads at any world
    size and ZeRO stage. Collective (the partitions are all-gathered: every rank holds the full dense
    weights and Adam moments, 3x the dense parameters in fp32).

    * ``dense``: parameter name (``named_parameters``) -> full fp32 master weight (the parameter's shape),
      plus the persistent buffers (live);
    * ``dense_optimizer``: torch's flattened optimizer naming, as the other backends save it:
      ``state.<name>.{step, exp_avg, exp_avg_sq}`` (step a scalar tensor, moments the parameter's shape)
      and ``param_groups.<name>.<hyperparameter>``;
    * ``deepspeed``: JSON of the engine's step counters.

    A never-stepped optimizer is saved with step 0 and zero moments, which is what AdamW starts from.
    """
    dense = {  # the persistent buffers, unpartitioned under every stage
        f"{prefix}.{name}".lstrip("."): buffer
        for prefix, submodule in engine.module.named_modules()
        for name, buffer in submodule.named_buffers(recurse=False)
        if name not in submodule._non_persistent_buffers_set
    }
    optimizer: dict[str, Any] = {}
    adamw = engine.optimizer.optimizer
    for partition in _zero_partitions(engine):
        adam_state = adamw.state.get(partition.master, {})
        step = adam_state.get("step", torch.zeros((), device=_step_device(partition)))
        weights = partition.full(_gather_rows(partition.master, partition.process_group))
        moments = {
            key: partition.full(
                _gather_rows(adam_state.get(key, torch.zeros_like(partition.master)), partition.process_group)
            )
            for key in _ADAM_MOMENTS
        }
        for k, name in enumerate(partition.names):
            dense[name] = weights[k]
            optimizer[f"state.{name}.step"] = step.detach().clone()
            for key in _ADAM_MOMENTS:
                optimizer[f"state.{name}.{key}"] = moments[key][k]
            for key, value in partition.hyperparameters.items():
                if key != "params":
                    optimizer[f"param_groups.{name}.{key}"] = value
    counters = {name: getattr(engine, name) for name in _ENGINE_COUNTERS}
    return {"dense": dense, "dense_optimizer": optimizer, "deepspeed": json.dumps(counters)}


def load_deepspeed_state_dict(engine: Any, state: dict[str, Any]) -> None:
    """Apply a :func:`deepspeed_state_dict` that DCP has filled: cut this rank's master partitions and
    Adam moments out of the full tensors, and set the working weights (ZeRO-1/2: the full parameters;
    ZeRO-3: the rank's pieces, and the full tensors of parameters that are kept gathered)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    dense, optimizer = state["dense"], state["dense_optimizer"]
    adamw = engine.optimizer.optimizer
    with torch.no_grad():
        for partition in _zero_partitions(engine):
            rank, world = dist.get_rank(partition.process_group), dist.get_world_size(partition.process_group)
            partition.master.copy_(partition.local([dense[n] for n in partition.names], rank, world))
            adam_state = adamw.state[partition.master]
            for key in _ADAM_MOMENTS:
                full = [optimizer[f"state.{n}.{key}"] for n in partition.names]
                adam_state[key] = partition.local(full, rank, world)
            first = partition.names[0]
            adam_state["step"] = optimizer[f"state.{first}.step"].clone().to(_step_device(partition))
            for key in partition.hyperparameters.keys() - {"params"}:
                partition.hyperparameters[key] = optimizer[f"param_groups.{first}.{key}"]
            for name, param, offset in zip(partition.names, partition.params, partition.offsets):
                if not partition.per_parameter:
                    param.data.copy_(dense[name])
                    continue
                param.ds_tensor.copy_(partition.master[offset : offset + param.ds_tensor.numel()])
                if param.ds_status == ZeroParamStatus.AVAILABLE:  # a persistent (always gathered) parameter
                    param.data.copy_(dense[name])
    for name, value in json.loads(state["deepspeed"]).items():
        setattr(engine, name, value)


def parallelize_fmrl(
    model: FMRLRec,
    *,
    backend: str,
    zero_stage: int,
    feature_sharding: str,
    id_sharding: str,
    id_optimizer: str,
    id_lr: float,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    grad_clip: float,
    grad_accum_steps: int,
    micro_batch_size: int,
    precision: str,
    device: torch.device,
) -> ParallelFMRL:
    """Shard the tables with TorchRec and wrap the dense part with ``backend``. Needs an initialised
    process group (a job of one rank is fine). The model's own item tables are freed afterwards: each
    rank keeps only its shards."""
    if not dist.is_initialized():
        raise RuntimeError("parallelize_fmrl needs torch.distributed to be initialised (see trainer.dist)")
    sparse = ShardedItemTables(
        model.item_tower,
        nested_sizes=list(model.cfg.nested_sizes),
        device=device,
        feature_sharding=feature_sharding,
        id_sharding=id_sharding,
        id_optimizer=id_optimizer,
        id_lr=id_lr,
    )
    _free_tables(model.item_tower)
    dense = DenseFMRL(model).to(device)
    wrapped, optimizer, scheduler = wrap_dense(
        dense,
        list(dense.trunk.blocks),
        backend=backend,
        zero_stage=zero_stage,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        grad_clip=grad_clip,
        grad_accum_steps=grad_accum_steps,
        micro_batch_size=micro_batch_size,
        device=device,
    )
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    return ParallelFMRL(
        model, sparse, wrapped, backend, optimizer, scheduler, grad_clip, autocast_dtype, grad_accum_steps
    )


def wrap_dense(
    dense: nn.Module,
    blocks: list[nn.Module],
    *,
    backend: str,
    zero_stage: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    grad_clip: float,
    grad_accum_steps: int,
    micro_batch_size: int,
    device: torch.device,
) -> tuple[nn.Module, torch.optim.Optimizer | None, Any]:
    """Wrap a model's dense part with ``backend`` and give it AdamW with a cosine schedule: FSDP2
    (``fully_shard`` per module of ``blocks``, then the root), a DeepSpeed ZeRO engine (which owns the
    optimizer: None is returned for it) or DDP. Returns (wrapped module, optimizer, scheduler)."""
    from trainer.optim import build_optimizer, cosine_with_warmup

    def schedule(optimizer: torch.optim.Optimizer) -> Any:
        return cosine_with_warmup(optimizer, warmup_steps, total_steps)

    if backend == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        import deepspeed

        _forget_deepspeed_groups()
        optimizer = build_optimizer(dense, lr, weight_decay, fused=device.type == "cuda")
        config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum_steps,
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": False},  # bf16 is autocast of the matmuls; parameters stay fp32 as elsewhere
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        engine, _, _, scheduler = deepspeed.initialize(
            model=dense, optimizer=optimizer, lr_scheduler=schedule, config=config, dist_init_required=False
        )
        return engine, None, scheduler

    if backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(dense)
        wrapped: nn.Module = dense
    elif backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(dense, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        raise ValueError(f"unknown backend {backend!r}: fsdp2, deepspeed or ddp")
    optimizer = build_optimizer(wrapped, lr, weight_decay)
    return wrapped, optimizer, schedule(optimizer)


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches the process groups it derives from the default group in module globals; a second
    engine in the same process (after the first job's group was destroyed) must derive them anew."""
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None
    groups._DATA_PARALLEL_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    groups._TENSOR_MODEL_PARALLEL_GROUP = None
    groups._MODEL_PARALLEL_GROUP = None
    groups.mesh_device = None
    for cache in (
        groups._EXPERT_PARALLEL_GROUP,
        groups._EXPERT_PARALLEL_GROUP_RANKS,
        groups._EXPERT_DATA_PARALLEL_GROUP,
        groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
        groups._ALL_TO_ALL_GROUP,
    ):
        cache.clear()


def _free_tables(tower: ItemTower) -> None:
    """Drop the unsharded tables' storage (the sharded copies are the live ones)."""
    for table in tower.tables():
        table.weight = nn.Parameter(torch.empty(0, table.embedding_dim), requires_grad=False)
