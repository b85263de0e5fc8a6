"""The config sections of the parallel layer: how a model is spread over ranks (``parallel``) and how its
dense part is optimised (``optim``). trainer/config.py composes them into the run's config; the
functions of sharding/ take these sections, never the whole config.

Value errors are plain ``ValueError`` s that start with the field's name; the config builder prefixes
the section (``parallel.backend must be one of ...``).
"""

from __future__ import annotations

from dataclasses import dataclass

SHARDING_TYPES = ("auto", "table_wise", "column_wise", "row_wise", "data_parallel")
BACKENDS = ("fsdp2", "deepspeed", "ddp")
TABLE_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "adam", "sgd")


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


# written as `value >= minimum` passing (not `value < minimum` failing) so that NaN is rejected too
def _at_least(name: str, value: float, minimum: float) -> None:
    if not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model is spread over the ranks of a torchrun job (one process is a job of one rank)."""

    backend: str = "fsdp2"
    """Dense part (fMRL: projector + LRU blocks; DLRM: the MLPs and the interaction): "fsdp2"
    (fully_shard per block, then the dense root), "deepspeed" (ZeRO stage parallel.zero_stage on the dense
    part only) or "ddp"."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage, 1, 2 or 3 (backend "deepspeed" only)."""
    feature_table_sharding: str = "auto"
    """TorchRec sharding of the frozen text and image tables; "auto": table_wise on CPU, row_wise on GPU."""
    table_sharding: str = "auto"
    """TorchRec sharding of the learnable tables: fMRL's ID and attribute tables, DLRM's categorical
    tables. "auto": on CPU column_wise for fMRL (shard widths on nested sizes) and table_wise for DLRM;
    row_wise on GPU. Row-wise sharding needs CUDA (TorchRec has no CPU kernel for it)."""
    attribute_table_sharding: str = "same"
    """TorchRec sharding of fMRL's attribute table (one row per attribute id, pooled per item), one of
    "same" (follow table_sharding), "auto", "table_wise", "column_wise" or "row_wise". E.g. "table_wise"
    keeps its few rows whole on one rank while the large ID table is row- or column-wise sharded. `fmrl
    plan` prints TorchRec's time per step of each choice. ("data_parallel" is not offered: the trainer
    does not all-reduce a replicated table's gradients.)"""
    table_optimizer: str = "adagrad"
    """Fused in-backward optimizer of the learnable tables: "adagrad", "rowwise_adagrad", "sgd", or
    "adam" (GPU only: TorchRec's CPU kernels have none).
    Row-wise Adagrad keeps one statistic per row *per shard*: under column-wise sharding it depends on
    the number of shards, so a run on 2 ranks no longer matches 1 rank and its state cannot be resharded."""
    table_lr: float = 0.0
    """Learning rate of the tables' optimizer; 0 means optim.lr."""
    precision: str = "fp32"
    """"fp32", or "bf16": autocast of the dense part's matmuls to bfloat16 (states stay fp32)."""

    def __post_init__(self) -> None:
        _one_of("backend", self.backend, BACKENDS)
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_stage must be 1, 2 or 3, got {self.zero_stage!r}")
        _one_of("feature_table_sharding", self.feature_table_sharding, SHARDING_TYPES)
        _one_of("table_sharding", self.table_sharding, SHARDING_TYPES)
        attribute_types = ("same", *(t for t in SHARDING_TYPES if t != "data_parallel"))
        _one_of("attribute_table_sharding", self.attribute_table_sharding, attribute_types)
        _one_of("table_optimizer", self.table_optimizer, TABLE_OPTIMIZERS)
        _at_least("table_lr", self.table_lr, 0)
        _one_of("precision", self.precision, ("fp32", "bf16"))


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW on the dense part, its schedule, clipping and gradient accumulation."""

    lr: float = 1e-3
    """Peak learning rate of AdamW (reached at the end of warmup), then cosine decay to 0 at the last step."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (weight matrices only)."""
    warmup_steps: int = 100
    """Steps of linear learning-rate warmup from 0."""
    grad_clip: float = 5.0
    """Maximum global L2 norm of the dense gradients."""
    grad_accum_steps: int = 1
    """Micro-batches per optimisation step (each of train.batch_size samples per rank). The fused
    optimizer of the learnable tables steps in every backward, i.e. per micro-batch."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        _at_least("weight_decay", self.weight_decay, 0)
        _at_least("warmup_steps", self.warmup_steps, 0)
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip!r}")
        _at_least("grad_accum_steps", self.grad_accum_steps, 1)
