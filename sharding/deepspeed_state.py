"""DeepSpeed ZeRO 1/2/3 state as full tensors, so that a DeepSpeed checkpoint loads at any world size and
ZeRO stage (and its dense part in the same names as the other backends save it).

DeepSpeed keeps each rank's fp32 master weights and Adam moments as flat partitions; these functions
all-gather them into per-parameter tensors for DCP (:func:`deepspeed_state_dict`) and cut a rank's
partitions back out of such tensors (:func:`load_deepspeed_state_dict`). Used by
:class:`sharding.backends.DeepSpeedBackend`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["deepspeed_state_dict", "forget_deepspeed_groups", "load_deepspeed_state_dict"]

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


def forget_deepspeed_groups() -> None:
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
