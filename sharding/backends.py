"""Dense backends: the ways the dense part of a model (everything but its TorchRec tables) runs over the
ranks, one class each behind one interface, :class:`DenseBackend`.

* :class:`FSDP2Backend`: ``fully_shard`` per block, then the dense root; AdamW on the DTensor shards.
* :class:`DDPBackend`: ``DistributedDataParallel``; AdamW on the full parameters of every rank.
* :class:`DeepSpeedBackend`: a DeepSpeed ZeRO 1/2/3 engine, which owns its AdamW and schedule.

A backend turns a plain ``nn.Module`` into something the trainer steps without knowing which backend it
is: call :attr:`DenseBackend.module` like the module, then :meth:`~DenseBackend.backward` and
:meth:`~DenseBackend.step` per micro-batch; :meth:`~DenseBackend.state_dict` gives the dense weights and
optimizer state for a DCP checkpoint in one naming for all backends (so a checkpoint loads under any
of them at any world size). :func:`wrap_dense` picks the class from ``parallel.backend``.

Adding a backend: subclass :class:`DenseBackend`, implement its abstract methods, and register it in
:data:`BACKENDS` (and in ``sharding.config.BACKENDS``, which the config checks).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sharding.config import OptimConfig, ParallelConfig
from sharding.deepspeed_state import deepspeed_state_dict, forget_deepspeed_groups, load_deepspeed_state_dict
from sharding.optim import build_optimizer, cosine_with_warmup

__all__ = ["BACKENDS", "DDPBackend", "DeepSpeedBackend", "DenseBackend", "FSDP2Backend", "wrap_dense"]


def _flat_optimizer_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # flat keys ("state.<fqn>.exp_avg"): the nested param_groups list does not survive DCP's flattening
    return StateDictOptions(flatten_optimizer_state_dict=True)


class DenseBackend:
    """The dense part of a model wrapped for one way of data parallelism, with its optimizer and schedule.

    ``dense`` is the plain module (its parameters stay the model's own); ``blocks`` are its submodules
    that FSDP2 shards one by one. ``micro_batch_size`` is the samples per rank and micro-batch.
    """

    name: str = ""

    def __init__(
        self,
        dense: nn.Module,
        blocks: list[nn.Module],
        optim: OptimConfig,
        *,
        zero_stage: int,
        total_steps: int,
        micro_batch_size: int,
        device: torch.device,
    ) -> None:
        self.inner = dense
        self.optim = optim
        self.device = device

    module: nn.Module
    """The wrapped module: call it as the dense module."""
    scheduler: Any
    """The learning-rate schedule (linear warmup, cosine decay)."""

    def train(self, mode: bool) -> None:
        self.module.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (the mean over the accumulated micro-batches is taken here)."""
        raise NotImplementedError

    def clip_gradients(self) -> float | None:
        """At an accumulation boundary, before :meth:`step`: clip the gradients to ``optim.grad_clip`` and
        return this rank's part of their norm (non-finite if any of this rank's gradients is); None
        where the step clips by itself (DeepSpeed: see :meth:`grad_norm`)."""
        return None

    def step(self, boundary: bool) -> None:
        """After each micro-batch; at an accumulation boundary: step the optimizer and the schedule."""
        raise NotImplementedError

    def skip_step(self) -> None:
        """At an accumulation boundary, instead of :meth:`step`: drop the gradients, leave the weights and
        the optimizer state untouched; the schedule advances as on a step (it follows the step count)."""
        raise NotImplementedError

    def grad_norm(self) -> float | None:
        """After a :meth:`step` that clipped by itself: the global gradient norm it used (the same on
        every rank), None if it is unknown or :meth:`clip_gradients` gave it already."""
        return None

    def set_grad_sync(self, enabled: bool) -> None:
        """Whether this micro-batch's backward all-reduces the gradients (off within an accumulation)."""

    def last_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def parameters(self) -> list[torch.Tensor]:
        """The dense parameters as this backend holds them (DTensor shards under FSDP2)."""
        return list(self.inner.parameters())

    def state_dict(self) -> dict[str, Any]:
        """``{"dense": weights, "dense_optimizer": optimizer state, "schedule": JSON}`` for DCP (tensors
        live, so a DCP load fills them in place), in the same names under every backend."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Apply a :meth:`state_dict` that DCP has filled."""
        raise NotImplementedError

    def local_tensors(self) -> list[torch.Tensor]:
        """This rank's own storage of the dense parameters (for early-stopping snapshots)."""
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The dense weights as full CPU tensors on rank 0 (None elsewhere). Collective."""
        raise NotImplementedError


class _AdamWBackend(DenseBackend):
    """FSDP2 and DDP: this project's AdamW and schedule on the wrapped module's parameters."""

    def _build_optimizer(self, total_steps: int) -> None:
        self.optimizer = build_optimizer(self.module, self.optim.lr, self.optim.weight_decay)
        self.scheduler = cosine_with_warmup(self.optimizer, self.optim.warmup_steps, total_steps)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.optim.grad_accum_steps).backward()

    def clip_gradients(self) -> float | None:
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.optim.grad_clip)
        # FSDP2: a DTensor whose local value is the norm of this rank's gradient shards; non-finite there
        # iff the global norm is (the step's all-reduce makes that every rank's decision, no collective)
        return float(norm.to_local() if hasattr(norm, "to_local") else norm)

    def step(self, boundary: bool) -> None:
        if not boundary:
            return
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        # through the unwrapped module: with a DDP wrapper DCP would match parameter names ("weight_parts.i")
        # against the state dict's names ("weight", see NestedLinear) and refuse to load
        return {
            "dense": get_model_state_dict(self.inner),
            "dense_optimizer": get_optimizer_state_dict(
                self.inner, self.optimizer, options=_flat_optimizer_options()
            ),
            "schedule": json.dumps(self.scheduler.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(self.inner, state["dense"])
        set_optimizer_state_dict(
            self.inner, self.optimizer, state["dense_optimizer"], options=_flat_optimizer_options()
        )
        self.scheduler.load_state_dict(json.loads(state["schedule"]))


class FSDP2Backend(_AdamWBackend):
    """``fully_shard`` on every block, then on the dense root: each rank holds 1/R of every parameter."""

    name = "fsdp2"

    def __init__(self, dense: nn.Module, blocks: list[nn.Module], optim: OptimConfig, **kwargs: Any) -> None:
        super().__init__(dense, blocks, optim, **kwargs)
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(dense)
        self.module = dense
        self._build_optimizer(kwargs["total_steps"])

    def set_grad_sync(self, enabled: bool) -> None:
        self.module.set_requires_gradient_sync(enabled)  # type: ignore[operator]

    def local_tensors(self) -> list[torch.Tensor]:
        from torch.distributed.fsdp import FSDPModule

        # the root may still hold its gathered parameters after a forward: go back to the shards
        for module in self.module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        return [p.to_local() if hasattr(p, "to_local") else p.data for p in self.parameters()]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return state if dist.get_rank() == 0 else None


class DDPBackend(_AdamWBackend):
    """``DistributedDataParallel``: every rank holds the whole dense part; gradients are all-reduced."""

    name = "ddp"

    def __init__(self, dense: nn.Module, blocks: list[nn.Module], optim: OptimConfig, **kwargs: Any) -> None:
        super().__init__(dense, blocks, optim, **kwargs)
        from torch.nn.parallel import DistributedDataParallel

        device = kwargs["device"]
        self.module = DistributedDataParallel(
            dense, device_ids=[device.index] if device.type == "cuda" else None
        )
        self._build_optimizer(kwargs["total_steps"])

    def set_grad_sync(self, enabled: bool) -> None:
        self.module.require_backward_grad_sync = enabled  # type: ignore[assignment]

    def local_tensors(self) -> list[torch.Tensor]:
        return [p.data for p in self.parameters()]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        state = {k: v.detach().clone().cpu() for k, v in self.inner.state_dict().items()}
        return state if dist.get_rank() == 0 else None


class DeepSpeedBackend(DenseBackend):
    """A DeepSpeed ZeRO engine (stage ``parallel.zero_stage``) on the dense part only. The engine owns the
    AdamW (built here, so the parameter groups match the other backends), the clipping, the gradient
    accumulation and the schedule. Its state is saved unpartitioned (sharding/deepspeed_state.py)."""

    name = "deepspeed"

    def __init__(self, dense: nn.Module, blocks: list[nn.Module], optim: OptimConfig, **kwargs: Any) -> None:
        super().__init__(dense, blocks, optim, **kwargs)
        device = kwargs["device"]
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        import deepspeed

        forget_deepspeed_groups()
        optimizer = build_optimizer(dense, optim.lr, optim.weight_decay, fused=device.type == "cuda")
        total_steps = kwargs["total_steps"]

        def schedule(opt: torch.optim.Optimizer) -> Any:
            return cosine_with_warmup(opt, optim.warmup_steps, total_steps)

        # DeepSpeed's buckets default to 5e8 elements (2 GB), allocated again at every micro-step by ZeRO-1/2:
        # 1.1 s per step on CPU for a model of 1M parameters. A bucket never needs more than the whole model
        # (rounded up to a multiple of 1,024: ZeRO wants a multiple of its alignment factor, 2-8 elements).
        parameters = sum(p.numel() for p in dense.parameters())
        bucket = min(500_000_000, -(-parameters // 1024) * 1024)
        config = {
            "train_micro_batch_size_per_gpu": kwargs["micro_batch_size"],
            "gradient_accumulation_steps": optim.grad_accum_steps,
            "gradient_clipping": optim.grad_clip,
            "zero_optimization": {
                "stage": kwargs["zero_stage"],
                "reduce_bucket_size": bucket,
                "allgather_bucket_size": bucket,
            },
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": False},  # bf16 is autocast of the matmuls; parameters stay fp32 as elsewhere
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        self.module, _, _, self.scheduler = deepspeed.initialize(
            model=dense, optimizer=optimizer, lr_scheduler=schedule, config=config, dist_init_required=False
        )

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss)  # type: ignore[operator]  # divides by the accumulation steps itself

    def step(self, boundary: bool) -> None:
        self.module.step()  # type: ignore[operator]  # steps (clipping, schedule) at its own boundaries

    def skip_step(self) -> None:
        # the engine owns its boundaries, clipping and optimizer: it has no step without an update
        raise NotImplementedError("DeepSpeed cannot skip an optimizer step (train.skip_nonfinite_steps)")

    def grad_norm(self) -> float | None:
        norm = self.module.get_global_grad_norm()  # type: ignore[operator]
        return None if norm is None else float(norm)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.module.module.parameters())  # type: ignore[union-attr]

    def state_dict(self) -> dict[str, Any]:
        state = deepspeed_state_dict(self.module)
        state["schedule"] = json.dumps(self.scheduler.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_deepspeed_state_dict(self.module, state)
        self.scheduler.load_state_dict(json.loads(state["schedule"]))

    def local_tensors(self) -> list[torch.Tensor]:
        # ZeRO-3: this rank's partition of each parameter; ZeRO-1/2: the full parameters
        return [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in self.parameters()]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        import deepspeed

        module = self.module.module  # type: ignore[union-attr]
        with deepspeed.zero.GatheredParameters(
            list(module.parameters()),
            modifier_rank=None,
            enabled=self.module.zero_optimization_stage() == 3,  # type: ignore[operator]
        ):
            state = {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
        return state if dist.get_rank() == 0 else None


BACKENDS: dict[str, type[DenseBackend]] = {
    FSDP2Backend.name: FSDP2Backend,
    DDPBackend.name: DDPBackend,
    DeepSpeedBackend.name: DeepSpeedBackend,
}


def wrap_dense(
    dense: nn.Module,
    blocks: list[nn.Module],
    parallel: ParallelConfig,
    optim: OptimConfig,
    *,
    total_steps: int,
    micro_batch_size: int,
    device: torch.device,
) -> DenseBackend:
    """The dense part ``dense`` wrapped by ``parallel.backend``, with AdamW and the cosine schedule of
    ``optim`` over ``total_steps`` optimizer steps."""
    backend = BACKENDS.get(parallel.backend)
    if backend is None:
        raise ValueError(f"unknown dense backend {parallel.backend!r}: one of {sorted(BACKENDS)}")
    return backend(
        dense,
        blocks,
        optim,
        zero_stage=parallel.zero_stage,
        total_steps=total_steps,
        micro_batch_size=micro_batch_size,
        device=device,
    )
