"""``fmrl plan``: what an fMRL job needs on a cluster that is not there yet. TorchRec's planner places the
item tables on a simulated topology through the same function training uses
(:func:`sharding.fmrl.plan_item_tables`), and the command prints, per world size, each table's sharding
type and compute kernel, TorchRec's own per-rank HBM and host-memory estimates and time per step (the
planner is told the step's real lookups: :func:`step_lookups`), whether a table must be cached in host
memory (UVM caching) to fit, the trunk's per-rank memory under the dense backend, what the loss holds per
rank (``train.loss``: the full softmax's item matrix, the sampled softmax's logits, the popularity
sampler's table), the activations, the evaluation item shard, the best-weights snapshot, the async
checkpoint's staging copy, and the checkpoint size::

    fmrl plan --config configs/scale-100m.yaml --num-items 100000000 --world-size 64,128,256,512 --device h100
    fmrl plan --config configs/scale-100m.yaml --num-items 1000000 --world-size 2 --device cpu

The planner runs on this machine's CPU for any device: the model is built on the meta device (no table
is allocated), and ``compute_device="cuda"`` only selects TorchRec's GPU kernels and cost model.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from models.fmrl import AttributeBags, FMRLRec
from models.fmrl.config import FMRLConfig
from models.ops import chunk_rows_for_budget
from sharding.config import OptimConfig, ParallelConfig
from sharding.core import PlanStorage
from sharding.fmrl import FROZEN_TABLES, TableLookups, plan_item_tables
from trainer.config import TrainConfig
from trainer.evaluation.ranking import ITEM_CHUNK
from trainer.hardware import DEVICES, Device
from trainer.logs import resident_mib

GIB = 2**30


# bytes per dense parameter in the training state: fp32 weights (4) + fp32 gradients (4) + AdamW's two fp32
# moments (8). bf16 autocast keeps these in fp32 (parallel.precision) and only casts the matmuls.
WEIGHT, GRAD, ADAM = 4, 4, 8

# fp32 values of width D that autograd keeps per position and LRU block (models/fmrl/layers.py LRUBlock):
# the block input and its layer norm (2), u_re and u_im (2), the scan's h_re and h_im (2), y and the
# residual sum h (2), h's layer norm (1), the gate and up outputs and the dropped-out up (3), the gated
# hidden (1) and the down output (1)
BLOCK_ACTIVATION_WIDTHS = 14


@dataclass(frozen=True)
class TablePlan:
    name: str
    rows: int
    dim: int
    sharding_type: str
    compute_kernel: str
    shards: int
    hbm_per_rank: int
    """The largest per-rank HBM estimate of this table's shards (bytes), TorchRec's own."""
    ddr_per_rank: int
    """The same for host memory (bytes)."""
    trained: bool
    weights_per_rank: int
    """The largest per-rank fp32 bytes of this table's weights (its shards' rows x columns x 4)."""
    step_ms: float
    """TorchRec's own estimate of this table's time per training step on its busiest rank (ms): forward
    and backward lookups, the input and output all-to-alls, the fused optimizer."""


@dataclass(frozen=True)
class ClusterPlan:
    world_size: int
    device_name: str
    device: Device
    tables: list[TablePlan]
    per_rank: list[tuple[int, int]]
    """(HBM, host) bytes of all tables on each rank."""
    dense_parameters: int
    largest_block_parameters: int
    trunk_per_rank: int
    trunk_note: str
    loss_per_rank: int
    """Bytes the loss holds per rank on the training device: for the full softmax the (N + 1, D) item
    matrix, its gradient, every table's looked-up rows and the score buffer; 0 for the sampled softmax."""
    sampler_per_rank: int
    """Host bytes of the popularity sampler's (N,) float64 cumulative table, on every rank; 0 if uniform."""
    loss_note: str
    lookups: TableLookups
    """The step's lookup batch per rank and the attribute pooling the planner was given."""
    activations_per_rank: int
    """Bytes autograd keeps on the training device for one micro-batch: the trunk's activations at
    train.batch_size x train.max_len, and (sampled softmax) the looked-up rows and their projection."""
    activations_note: str
    eval_items_per_rank: int
    """Bytes of this rank's shard of the evaluation item matrix, ceil(N / world) x D fp32, and the
    temporaries of the ITEM_CHUNK items whose representations are built at a time."""
    eval_note: str
    snapshot_per_rank: int
    """Bytes of the best-weights snapshot on the training device: a copy of this rank's trained table
    shards and its dense weights (its FSDP2/ZeRO-3 shard, or all of them)."""
    staging_per_rank: int
    """Host bytes of the async checkpoint's staging copy of this rank's state (0 without
    run.async_checkpoint)."""
    data_note: str
    data_per_rank: int
    """Host bytes of what every rank keeps of the data set: the user scan's (N + 1,) int64 item counts and,
    with an attribute table, the items' attribute index ((N + 2,) int64 offsets, int64 ids)."""
    process_per_rank: int
    """Host bytes of a rank's process before it builds anything: the interpreter with torch, TorchRec and
    the trainer loaded (:func:`process_baseline`, measured in the planning process)."""
    checkpoint_bytes: int
    table_ms_per_rank: list[float]
    """TorchRec's per-rank sum of every table shard's time per step (ms)."""
    sharding_plan: Any
    """TorchRec's ShardingPlan of the item tables (what DistributedModelParallel would apply)."""

    @property
    def nodes(self) -> int:
        return -(-self.world_size // self.device.ranks_per_node)

    @property
    def tables_step_ms(self) -> float:
        """TorchRec's estimate of the tables' time per step on the busiest rank (ms)."""
        return max(self.table_ms_per_rank)

    @property
    def uvm_tables(self) -> list[str]:
        return [t.name for t in self.tables if "uvm" in t.compute_kernel]


class PlanDoesNotFit(ValueError):
    """Nothing fits: the message names the tables, what they need and what a rank has."""


def meta_model(
    cfg: FMRLConfig, num_items: int, text_dim: int, image_dim: int, num_attributes: int
) -> FMRLRec:
    """The model of ``cfg`` at full size on the meta device (nothing allocated); feature widths 0 leave
    that table out, as a data set without it would."""
    with torch.device("meta"):
        bags = None
        if cfg.use_attributes:
            offsets = torch.zeros(num_items + 2, dtype=torch.int64)
            bags = AttributeBags(offsets, torch.zeros(0, dtype=torch.int64), num_attributes)
        return FMRLRec(
            cfg,
            num_items,
            torch.empty(num_items + 1, text_dim) if text_dim and cfg.use_text_features else None,
            torch.empty(num_items + 1, image_dim) if image_dim and cfg.use_image_features else None,
            bags,
        )


def trunk_memory(parameters: int, block: int, parallel: ParallelConfig, world_size: int) -> tuple[int, str]:
    """Per-rank bytes of the dense part's training state under ``parallel.backend`` and what is assumed."""
    state = WEIGHT + GRAD + ADAM
    if parallel.backend == "fsdp2" or (parallel.backend == "deepspeed" and parallel.zero_stage == 3):
        # weights, gradients and AdamW state sharded; each block's full weights exist while it runs
        # (FSDP2 gathers one block and prefetches the next)
        per_rank = state * parameters // world_size + 2 * WEIGHT * block
        note = "weights + grads + AdamW sharded over the ranks, plus 2 blocks' weights gathered"
    elif parallel.backend == "deepspeed" and parallel.zero_stage == 2:
        per_rank = WEIGHT * parameters + (GRAD + ADAM) * parameters // world_size
        note = "ZeRO-2: weights replicated; grads + AdamW sharded"
    elif parallel.backend == "deepspeed":
        per_rank = (WEIGHT + GRAD) * parameters + ADAM * parameters // world_size
        note = "ZeRO-1: weights + grads replicated; AdamW sharded"
    else:
        per_rank = state * parameters
        note = "DDP: everything replicated"
    return per_rank, note


def loss_memory(
    train: TrainConfig, model_cfg: FMRLConfig, num_items: int, table_dims: list[int]
) -> tuple[int, int, str]:
    """(device bytes, host bytes, what is counted) of the loss of ``train`` at ``num_items`` items per rank;
    ConfigError for a full softmax above train.full_softmax_max_items (training refuses it too)."""
    kind = train.loss_for(num_items)
    if kind == "full":
        rows, width, sizes = num_items + 1, model_cfg.nested_sizes[-1], len(model_cfg.nested_sizes)
        # every rank looks up all rows of every table, projects them to the (N + 1, D) item matrix and
        # allocates its gradient; the fused loss scores chunks of positions against all N items
        matrix = 2 * rows * width * 4 + rows * sum(table_dims) * 4
        positions = train.batch_size * train.max_len
        chunk = min(positions, chunk_rows_for_budget(num_items, sizes, model_cfg.loss_chunk_mb * 2**20))
        scores = sizes * chunk * num_items * 4
        note = (
            f"full softmax: the {rows:,} x {width} item matrix and its gradient, the tables' looked-up rows "
            f"(widths {'+'.join(map(str, table_dims))}), {sizes} x {chunk:,} x {num_items:,} fp32 scores"
        )
        return matrix + scores, 0, note
    # the sampled softmax scores every position against the C candidates (the batch's targets and the
    # M negatives, deduplicated) at each nested size: K fp32 (B x L, C) logits, kept for backward
    positions, sizes = train.batch_size * train.max_len, len(model_cfg.nested_sizes)
    candidates = min(num_items, positions + train.num_negatives)
    logits = sizes * positions * candidates * 4
    note = f"sampled softmax: {sizes} x {positions:,} x {candidates:,} fp32 logits"
    if train.negative_sampling == "popularity":
        return logits, 8 * num_items, f"{note}; the popularity sampler's {num_items:,} x float64 table"
    return logits, 0, f"{note}; uniform negatives: no per-item table"


def step_lookups(train: TrainConfig, num_items: int, attributes_per_item: float) -> TableLookups:
    """The item ids one training step looks up per rank (trainer.tasks.fmrl.forward_backward): the full
    softmax all N + 1; the sampled softmax the unique ids of the batch's tokens, its labels (the tokens
    shifted by one, so one new id per sequence) and the negatives, at most B x (L + 1) + M."""
    if train.loss_for(num_items) == "full":
        ids = num_items + 1
    else:
        ids = min(num_items + 1, train.batch_size * (train.max_len + 1) + train.num_negatives)
    return TableLookups(ids=ids, attributes_per_item=attributes_per_item)


def mean_bag_size(bags: AttributeBags | None) -> float:
    """The mean number of attribute ids per item (0.0 without attributes): the attribute table's pooling."""
    if bags is None:
        return 0.0
    items = int(bags.offsets.shape[0]) - 2
    return float(bags.offsets[-1]) / max(items, 1)


def activation_memory(
    train: TrainConfig, model_cfg: FMRLConfig, num_items: int, lookups: TableLookups, table_dims: list[int]
) -> tuple[int, str]:
    """(bytes, what is counted) autograd keeps for one micro-batch on the training device: per position
    and block BLOCK_ACTIVATION_WIDTHS fp32 values of width D, plus the trunk's input and its dropout; for
    the sampled softmax the looked-up rows (U, sum of table widths) and their projection (U, D) (the full
    softmax's are counted with its loss)."""
    width, positions = model_cfg.nested_sizes[-1], train.batch_size * train.max_len
    trunk = positions * width * 4 * (BLOCK_ACTIVATION_WIDTHS * model_cfg.num_blocks + 2)
    note = (
        f"{train.batch_size} x {train.max_len} positions x {model_cfg.num_blocks} blocks x "
        f"{BLOCK_ACTIVATION_WIDTHS} x {width} fp32 in the trunk"
    )
    if train.loss_for(num_items) == "full":
        return trunk, note
    rows = lookups.ids * (sum(table_dims) + width) * 4
    widths = "+".join(map(str, table_dims))
    return trunk + rows, f"{note}; {lookups.ids:,} looked-up items x ({widths} + {width}) fp32"


def eval_memory(num_items: int, world_size: int, width: int, table_dims: list[int]) -> tuple[int, str]:
    """(bytes, what is counted) of a rank's evaluation: its (ceil(N / W), D) fp32 item shard and, while
    the shard is built (trainer/evaluation/ranking.py), the looked-up rows and projection of ITEM_CHUNK
    items at a time, counted like the training step's looked-up items. The scores are tiled (bounded
    by TILE_ELEMENTS, a few MiB) and not counted."""
    rows = -(-num_items // world_size)
    chunk = min(ITEM_CHUNK, rows)
    widths = "+".join(map(str, table_dims))
    shard, temporaries = rows * width * 4, chunk * (sum(table_dims) + width) * 4
    return shard + temporaries, (
        f"the item shard ceil(N / {world_size}) x {width} fp32; while it is built, {chunk:,} items at a "
        f"time x ({widths} + {width}) fp32"
    )


def data_memory(num_items: int, uses_attributes: bool, attributes_per_item: float) -> tuple[int, str]:
    """Host bytes every rank keeps of the data set (:attr:`ClusterPlan.data_per_rank`) and what they are."""
    counts = 8 * (num_items + 1)
    if not uses_attributes:
        return counts, f"the user scan's {num_items + 1:,} int64 item counts"
    index = 8 * (num_items + 2) + 8 * int(num_items * attributes_per_item)
    note = f"the user scan's {num_items + 1:,} int64 item counts, the items' attribute index"
    return counts + index, note


def process_baseline() -> int:
    """This process's resident memory (bytes) with the modules a training rank loads imported: what a rank
    holds before it builds anything. Measured here, so a CPU plan made on the machine kind that trains
    counts it as it is (the allocator, Python objects and shared libraries of torch, TorchRec, FBGEMM)."""
    # what a rank loads besides this module: TorchRec's sharded modules and FBGEMM's kernels, FSDP2 and
    # the data pipeline (the training loop's own modules add ~10 MiB; importing them here would make an
    # import cycle, as the task imports this module)
    import fbgemm_gpu  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torchrec.distributed.model_parallel  # noqa: F401

    import data_pipeline.loader  # noqa: F401

    return int(resident_mib() * 2**20)


def table_state_factor(optimizer: str, dim: int) -> float:
    """The fused table optimizer's state per weight of a width-``dim`` table (row-wise Adagrad: one value
    per row)."""
    return 1 / dim if optimizer == "rowwise_adagrad" else {"adagrad": 1.0, "adam": 2.0}.get(optimizer, 0.0)


def plan_cluster(
    model_cfg: FMRLConfig,
    parallel: ParallelConfig,
    optim: OptimConfig,
    *,
    num_items: int,
    world_size: int,
    device_name: str,
    device: Device,
    text_dim: int,
    image_dim: int,
    num_attributes: int,
    train: TrainConfig | None = None,
    attributes_per_item: float = 2.0,
    async_checkpoint: bool = False,
    process_bytes: int = 0,
) -> ClusterPlan:
    """TorchRec's plan of the item tables of ``model_cfg`` at ``num_items`` items on ``world_size`` ranks
    of ``device``, given the lookups of one step of ``train`` (default: TrainConfig()) with
    ``attributes_per_item`` attribute ids per item, with its memory and time estimates and what the
    step, evaluation, the best-weights snapshot and the (``async_checkpoint``) staging copy hold per rank,
    what a rank keeps of the data set and ``process_bytes`` (:func:`process_baseline`) of host memory for
    the process itself; :class:`PlanDoesNotFit` if the planner finds no plan, ConfigError for a refused full softmax."""
    from torchrec.distributed.planner import Topology
    from torchrec.distributed.planner.types import PlannerError

    model = meta_model(model_cfg, num_items, text_dim, image_dim, num_attributes)
    table_dims = [table.embedding_dim for table in model.item_tower.tables()]
    train = train or TrainConfig()
    loss_per_rank, sampler_per_rank, loss_note = loss_memory(train, model_cfg, num_items, table_dims)
    lookups = step_lookups(train, num_items, attributes_per_item)
    activations_per_rank, activations_note = activation_memory(
        train, model_cfg, num_items, lookups, table_dims
    )
    ddr_per_rank = int(device.ddr_gb * GIB / device.ranks_per_node)
    topology = Topology(
        world_size=world_size,
        local_world_size=min(device.ranks_per_node, world_size),
        compute_device=device.compute,
        hbm_cap=int(device.hbm_gb * GIB) if device.compute == "cuda" else None,
        ddr_cap=ddr_per_rank,
    )
    recorder = PlanStorage()
    tower = model.item_tower
    try:
        _, sharding_plan, _ = plan_item_tables(
            tower,
            topology,
            nested_sizes=list(model_cfg.nested_sizes),
            device=torch.device(device.compute),
            feature_sharding=parallel.feature_table_sharding,
            table_sharding=parallel.table_sharding,
            attribute_sharding=parallel.attribute_table_sharding,
            table_optimizer=parallel.table_optimizer,
            table_lr=parallel.table_lr or optim.lr,
            collective=False,
            stats=[recorder],
            lookups=lookups,
        )
    except PlannerError as error:
        raise PlanDoesNotFit(_does_not_fit(tower, parallel, world_size, device_name, device, error)) from None

    tables = []
    table_ms_per_rank = [0.0] * world_size
    trained_weights_per_rank = [0] * world_size
    for option in recorder.options:
        per_rank: dict[int, list[float]] = {}
        for shard in option.shards:
            # HBM, host memory, weights (bytes), TorchRec's perf (ms) of this table on the shard's rank
            totals = per_rank.setdefault(shard.rank, [0, 0, 0, 0.0])
            totals[0] += shard.storage.hbm
            totals[1] += shard.storage.ddr
            totals[2] += shard.size[0] * shard.size[1] * 4
            totals[3] += shard.perf.total
            table_ms_per_rank[shard.rank] += shard.perf.total
            if option.name not in FROZEN_TABLES:
                trained_weights_per_rank[shard.rank] += shard.size[0] * shard.size[1] * 4
        rows, dim = option.tensor.shape
        tables.append(
            TablePlan(
                name=option.name,
                rows=int(rows),
                dim=int(dim),
                sharding_type=option.sharding_type,
                compute_kernel=option.compute_kernel,
                shards=len(option.shards),
                hbm_per_rank=int(max(v[0] for v in per_rank.values())),
                ddr_per_rank=int(max(v[1] for v in per_rank.values())),
                trained=option.name not in FROZEN_TABLES,
                weights_per_rank=int(max(v[2] for v in per_rank.values())),
                step_ms=max(v[3] for v in per_rank.values()),
            )
        )
    tables.sort(key=lambda t: tower.table_names().index(t.name))
    dense = [*tower.projector.parameters(), *model.trunk.parameters()]
    dense_parameters = sum(p.numel() for p in dense)
    block = max(sum(p.numel() for p in b.parameters()) for b in model.trunk.blocks)
    trunk_per_rank, trunk_note = trunk_memory(dense_parameters, block, parallel, world_size)
    checkpoint = (WEIGHT + ADAM) * dense_parameters  # dense weights + AdamW state
    staging = 0
    for t in tables:
        if t.trained:  # weights + the fused optimizer's state; frozen tables come from their files
            state = table_state_factor(parallel.table_optimizer, t.dim)
            checkpoint += int(t.rows * t.dim * 4 * (1 + state))
            if async_checkpoint:  # this rank's part, copied to host memory before the write
                staging += int(t.weights_per_rank * (1 + state))
    dense_sharded = parallel.backend == "fsdp2" or (
        parallel.backend == "deepspeed" and parallel.zero_stage == 3
    )
    dense_weights = WEIGHT * (-(-dense_parameters // world_size) if dense_sharded else dense_parameters)
    snapshot = max(trained_weights_per_rank) + dense_weights
    if async_checkpoint:
        staging += dense_weights * (WEIGHT + ADAM) // WEIGHT  # and the dense weights with AdamW's moments
    eval_items, eval_note = eval_memory(num_items, world_size, model_cfg.nested_sizes[-1], table_dims)
    data_bytes, data_note = data_memory(num_items, model_cfg.use_attributes, attributes_per_item)
    return ClusterPlan(
        world_size=world_size,
        device_name=device_name,
        device=device,
        tables=tables,
        per_rank=recorder.per_rank(world_size),
        dense_parameters=dense_parameters,
        largest_block_parameters=block,
        trunk_per_rank=trunk_per_rank,
        trunk_note=trunk_note,
        loss_per_rank=loss_per_rank,
        sampler_per_rank=sampler_per_rank,
        loss_note=loss_note,
        lookups=lookups,
        activations_per_rank=activations_per_rank,
        activations_note=activations_note,
        eval_items_per_rank=eval_items,
        eval_note=eval_note,
        snapshot_per_rank=snapshot,
        staging_per_rank=staging,
        data_per_rank=data_bytes,
        data_note=data_note,
        process_per_rank=process_bytes,
        checkpoint_bytes=checkpoint,
        table_ms_per_rank=table_ms_per_rank,
        sharding_plan=sharding_plan,
    )


def _does_not_fit(
    tower: torch.nn.Module,
    parallel: ParallelConfig,
    world_size: int,
    name: str,
    device: Device,
    error: Exception,
) -> str:
    sizes = []
    for table_name, table in zip(tower.table_names(), tower.tables()):
        state = (
            0.0
            if table_name in FROZEN_TABLES
            else {"adagrad": 1.0, "adam": 2.0}.get(parallel.table_optimizer, 0.0)
        )
        sizes.append((table.num_embeddings * table.embedding_dim * 4 * (1 + state), table_name, table))
    sizes.sort(reverse=True)
    total = sum(s for s, _, _ in sizes)
    usable_hbm = device.hbm_gb * 0.85  # TorchRec's planner reserves 15% of HBM for everything else
    ddr = device.ddr_gb / device.ranks_per_node
    listed = ", ".join(
        f"'{n}' ({t.num_embeddings:,} x {t.embedding_dim}) {s / GIB:,.0f} GiB" for s, n, t in sizes
    )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"no plan fits on {world_size} x {name}: the item tables need {total / GIB:,.0f} GiB with their "
        f"optimizer state ({listed}), {total / world_size / GIB:,.1f} GiB per rank even if split evenly, but a "
        f"rank has {usable_hbm:,.0f} GiB of HBM (after TorchRec's 15% reservation) + {ddr:,.0f} GiB of host "
        f"memory ({device.ddr_gb:,.0f} GiB per node of {device.ranks_per_node}); the largest table, "
        f"'{sizes[0][1]}', alone needs {sizes[0][0] / world_size / GIB:,.1f} GiB per rank. Use more ranks, "
        f"more memory per rank (--hbm-gb, --ddr-gb) or fewer/narrower tables. TorchRec: {first_line}"
    )


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def render(plan: ClusterPlan) -> str:
    d = plan.device
    hbm = f"{d.hbm_gb:g} GiB HBM, " if d.compute == "cuda" else ""
    lines = [
        f"## {plan.world_size} x {plan.device_name} ({plan.nodes} node(s) of {d.ranks_per_node}; per rank: "
        f"{hbm}{d.ddr_gb / d.ranks_per_node:,.0f} GiB host memory)",
        "",
        "| table | rows x width | sharding | kernel | shards | HBM per rank | host memory per rank "
        "| ms per step |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for t in plan.tables:
        lines.append(
            f"| {t.name} | {t.rows:,} x {t.dim} | {t.sharding_type} | {t.compute_kernel} | {t.shards} "
            f"| {_gib(t.hbm_per_rank)} | {_gib(t.ddr_per_rank)} | {t.step_ms:,.1f} |"
        )
    max_hbm = max(h for h, _ in plan.per_rank)
    max_ddr = max(r for _, r in plan.per_rank)
    lines.append(
        f"| all tables, busiest rank | | | | | {_gib(max_hbm)} | {_gib(max_ddr)} | {plan.tables_step_ms:,.1f} |"
    )
    lines.append("")
    lines.append(
        f"Lookups given to the planner: {plan.lookups.ids:,} item ids per step per rank in every table "
        f"(train.batch_size x (train.max_len + 1) + train.num_negatives, or all N + 1 for the full "
        f"softmax), the attribute table pooling {plan.lookups.attributes_per_item:g} attributes per item; "
        f"ms per step: TorchRec's cost model (lookups forward and backward, all-to-alls, fused optimizer)"
    )
    uvm = plan.uvm_tables
    lines.append(
        "UVM caching (table in host memory, a cache in HBM): "
        + (f"needed for {', '.join(uvm)}" if uvm else "not needed, every table fits in HBM")
        if d.compute == "cuda"
        else "CPU ranks: every table is in host memory"
    )
    lines.append(
        f"Trunk ({plan.dense_parameters / 1e6:,.1f}M dense parameters, largest block "
        f"{plan.largest_block_parameters / 1e6:,.1f}M): {_gib(plan.trunk_per_rank)} per rank "
        f"({plan.trunk_note}; fp32 weights, grads and AdamW moments, 16 B/parameter)"
    )
    lines.append(
        f"Loss ({plan.loss_note}): {_gib(plan.loss_per_rank)} on the training device, "
        f"{_gib(plan.sampler_per_rank)} host memory per rank"
    )
    lines.append(f"Activations ({plan.activations_note}): {_gib(plan.activations_per_rank)} per rank")
    lines.append(f"Evaluation ({plan.eval_note}): {_gib(plan.eval_items_per_rank)} per rank")
    lines.append(
        f"Best-weights snapshot (this rank's trained table shards + dense weights): "
        f"{_gib(plan.snapshot_per_rank)} per rank"
    )
    lines.append(
        f"Async checkpoint staging copy (run.async_checkpoint): {_gib(plan.staging_per_rank)} host memory "
        "per rank"
    )
    lines.append(f"Data set ({plan.data_note}): {_gib(plan.data_per_rank)} host memory per rank")
    if plan.process_per_rank:
        lines.append(
            f"Process (the interpreter with torch, TorchRec and the trainer loaded, measured in this "
            f"process): {_gib(plan.process_per_rank)} host memory per rank; not counted: the data loader's "
            "batches in flight, transients of start-up and checkpoint writes"
        )
    device_bytes = (
        plan.trunk_per_rank
        + plan.loss_per_rank
        + plan.activations_per_rank
        + plan.eval_items_per_rank
        + plan.snapshot_per_rank
    )
    host_bytes = max_ddr + plan.sampler_per_rank + plan.staging_per_rank
    host_bytes += plan.data_per_rank + plan.process_per_rank
    if d.compute == "cuda":
        total_hbm = max_hbm + device_bytes
        lines.append(
            f"Busiest rank: {_gib(total_hbm)} of {d.hbm_gb:g} GiB HBM (tables + trunk state + loss + "
            f"activations + evaluation shard + snapshot), {_gib(host_bytes)} of "
            f"{d.ddr_gb / d.ranks_per_node:,.0f} GiB host memory"
            + ("; does NOT fit in HBM" if total_hbm > d.hbm_gb * GIB else "")
        )
    else:
        lines.append(
            f"Busiest rank: {_gib(host_bytes + device_bytes)} of {d.ddr_gb / d.ranks_per_node:,.0f} GiB "
            "host memory (all of the above)"
        )
    lines.append(
        f"Checkpoint (trained tables + their optimizer state + dense weights + AdamW; frozen feature tables "
        f"are not saved): {_gib(plan.checkpoint_bytes)}"
    )
    return "\n".join(lines)


@dataclass(frozen=True)
class PlannedCatalog:
    """The catalog a plan is made for: given on the command line, or read from the config's data set."""

    num_items: int
    text_dim: int
    image_dim: int
    num_attributes: int
    attributes_per_item: float
    source: str
    """Where the figures come from, for the plan's header."""


FALLBACK_CATALOG = {"text_dim": 384, "image_dim": 1280, "num_attributes": 100_000, "attributes_per_item": 2.0}
"""What a plan assumes of a catalog that is neither given nor read: MiniLM text, EfficientNet-Lite0 images,
the synthetic scale catalog's two attributes per item."""


def planned_catalog(cfg: Any, args: argparse.Namespace) -> PlannedCatalog:
    """The catalog of ``args`` (``--num-items`` ...); without ``--num-items``, the config's data set
    (``data.path``: its items, its feature tables' widths, its attribute ids and bag sizes), each figure
    still overridable on the command line. DatasetError / FeaturesError name what could not be read."""
    given = {key: getattr(args, key) for key in FALLBACK_CATALOG}
    if args.num_items is not None:
        facts = {key: FALLBACK_CATALOG[key] if value is None else value for key, value in given.items()}
        return PlannedCatalog(num_items=args.num_items, source="the command line", **facts)
    from data_pipeline.features import open_feature_tables
    from data_pipeline.loader import SequenceDataset, read_item_attributes
    from data_pipeline.storage import StorageOptions

    options = StorageOptions.from_env()
    dataset = SequenceDataset.open(cfg.data.path, options)
    read: dict[str, Any] = {"text_dim": 0, "image_dim": 0, "num_attributes": 1, "attributes_per_item": 0.0}
    model = cfg.model
    if model.use_text_features or model.use_image_features:
        text, image, _ = open_feature_tables(cfg.data.features_url, options)  # headers only
        read["text_dim"] = text.shape[1] if text is not None else 0
        read["image_dim"] = image.shape[1] if image is not None else 0
    if model.use_attributes:
        bags = read_item_attributes(dataset)
        read["num_attributes"] = bags.num_attributes
        read["attributes_per_item"] = float(bags.offsets[-1]) / max(dataset.num_items, 1)
    facts = {key: read[key] if value is None else value for key, value in given.items()}
    return PlannedCatalog(num_items=dataset.num_items, source=f"the data set {dataset.url}", **facts)


def run_plan(args: argparse.Namespace) -> int:
    """The ``fmrl plan`` command: 0 when every world size has a plan, 1 when some do not fit (each says
    why), 2 on a bad argument."""
    from trainer.config import ConfigError, load_config

    # the simulated topology is built directly, and the module is on the meta device on purpose: TorchRec
    # warns about both
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"fmrl plan: config error: {error}", file=sys.stderr)
        return 2
    if cfg.task != "fmrl":
        print(
            f"fmrl plan: plans the item tables of task 'fmrl'; {args.config} is task {cfg.task!r}",
            file=sys.stderr,
        )
        return 2
    try:
        world_sizes = [int(w) for w in args.world_size.split(",") if w.strip()]
    except ValueError:
        print(
            f"fmrl plan: --world-size must be comma-separated integers, got {args.world_size!r}",
            file=sys.stderr,
        )
        return 2
    preset = DEVICES[args.device]
    device = Device(
        preset.compute,
        preset.hbm_gb if args.hbm_gb is None else args.hbm_gb,
        preset.ddr_gb if args.ddr_gb is None else args.ddr_gb,
        preset.ranks_per_node if args.ranks_per_node is None else args.ranks_per_node,
    )
    for name, value, low in (
        ("--num-items", args.num_items, 1),
        ("--ranks-per-node", device.ranks_per_node, 1),
        ("--text-dim", args.text_dim, 0),
        ("--image-dim", args.image_dim, 0),
        ("--num-attributes", args.num_attributes, 1),
        ("--attributes-per-item", args.attributes_per_item, 0),
        ("--ddr-gb", device.ddr_gb, 0),
        ("--hbm-gb", device.hbm_gb, 1 if device.compute == "cuda" else 0),
        *(("--world-size", w, 1) for w in world_sizes or [0]),
    ):
        if value is not None and not value >= low:
            print(f"fmrl plan: {name} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    from data_pipeline.features import FeaturesError
    from data_pipeline.loader import DatasetError

    try:
        catalog = planned_catalog(cfg, args)
    except (DatasetError, FeaturesError, OSError) as error:
        print(
            f"fmrl plan: {error} (without --num-items the plan reads the config's data set, data.path)",
            file=sys.stderr,
        )
        return 2
    process = process_baseline()
    print(
        f"# fmrl plan: {args.config or 'defaults'}, {catalog.num_items:,} items ({catalog.source}), model width D = "
        f"{cfg.model.dim}, text {catalog.text_dim if cfg.model.use_text_features else 0}, image "
        f"{catalog.image_dim if cfg.model.use_image_features else 0}, ID table "
        f"{'yes' if cfg.model.use_id_embedding else 'no'}, attribute table "
        f"{f'{catalog.num_attributes:,} attributes' if cfg.model.use_attributes else 'no'}; table optimizer "
        f"{cfg.parallel.table_optimizer}, dense backend {cfg.parallel.backend}; per step and rank "
        f"{cfg.train.batch_size} sequences x {cfg.train.max_len} tokens, {cfg.train.num_negatives:,} "
        f"negatives\n"
    )
    unfit = 0
    for world_size in world_sizes:
        try:
            plan = plan_cluster(
                cfg.model,
                cfg.parallel,
                cfg.optim,
                num_items=catalog.num_items,
                world_size=world_size,
                device_name=args.device,
                device=device,
                text_dim=catalog.text_dim,
                image_dim=catalog.image_dim,
                num_attributes=catalog.num_attributes,
                train=cfg.train,
                attributes_per_item=catalog.attributes_per_item,
                async_checkpoint=cfg.run.async_checkpoint,
                process_bytes=process,
            )
        except ConfigError as error:  # the same for every world size: train.loss=full refused
            print(f"fmrl plan: config error: {error}", file=sys.stderr)
            return 2
        except PlanDoesNotFit as error:  # the other world sizes may still fit
            print(f"## {world_size} x {args.device}: does not fit\n\n{error}\n", flush=True)
            print(f"fmrl plan: {error}", file=sys.stderr)
            unfit += 1
            continue
        except ValueError as error:
            print(f"fmrl plan: {error}", file=sys.stderr)
            return 2
        print(render(plan) + "\n", flush=True)
    return 1 if unfit else 0
