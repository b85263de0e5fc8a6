"""``fmrl plan``: what an fMRL job needs on a cluster that is not there yet. TorchRec's planner places the
item tables on a simulated topology through the same function training uses
(:func:`sharding.fmrl.plan_item_tables`), and the command prints, per world size, each table's sharding
type and compute kernel, TorchRec's own per-rank HBM and host-memory estimates, whether a table must be
cached in host memory (UVM caching) to fit, the trunk's per-rank memory under the dense backend, what the
loss holds per rank (``train.loss``: the full softmax's item matrix, the popularity sampler's table), and
the checkpoint size::

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
from sharding.fmrl import FROZEN_TABLES, plan_item_tables
from trainer.config import TrainConfig
from trainer.hardware import DEVICES, Device

GIB = 2**30


# bytes per dense parameter in the training state: fp32 weights (4) + fp32 gradients (4) + AdamW's two fp32
# moments (8). bf16 autocast keeps these in fp32 (parallel.precision) and only casts the matmuls.
WEIGHT, GRAD, ADAM = 4, 4, 8


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
    checkpoint_bytes: int
    sharding_plan: Any
    """TorchRec's ShardingPlan of the item tables (what DistributedModelParallel would apply)."""

    @property
    def nodes(self) -> int:
        return -(-self.world_size // self.device.ranks_per_node)

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
    if train.negative_sampling == "popularity":
        return 0, 8 * num_items, f"sampled softmax: the popularity sampler's {num_items:,} x float64 table"
    return 0, 0, "sampled softmax, uniform negatives: no per-item table"


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
) -> ClusterPlan:
    """TorchRec's plan of the item tables of ``model_cfg`` at ``num_items`` items on ``world_size`` ranks
    of ``device``, with its memory estimates and the loss's under ``train`` (default: TrainConfig());
    :class:`PlanDoesNotFit` if the planner finds no plan, ConfigError for a refused full softmax."""
    from torchrec.distributed.planner import Topology
    from torchrec.distributed.planner.types import PlannerError

    model = meta_model(model_cfg, num_items, text_dim, image_dim, num_attributes)
    table_dims = [table.embedding_dim for table in model.item_tower.tables()]
    loss_per_rank, sampler_per_rank, loss_note = loss_memory(
        train or TrainConfig(), model_cfg, num_items, table_dims
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
            table_optimizer=parallel.table_optimizer,
            table_lr=parallel.table_lr or optim.lr,
            collective=False,
            stats=[recorder],
        )
    except PlannerError as error:
        raise PlanDoesNotFit(_does_not_fit(tower, parallel, world_size, device_name, device, error)) from None

    tables = []
    for option in recorder.options:
        per_rank: dict[int, list[int]] = {}
        for shard in option.shards:
            totals = per_rank.setdefault(shard.rank, [0, 0])
            totals[0] += shard.storage.hbm
            totals[1] += shard.storage.ddr
        rows, dim = option.tensor.shape
        tables.append(
            TablePlan(
                name=option.name,
                rows=int(rows),
                dim=int(dim),
                sharding_type=option.sharding_type,
                compute_kernel=option.compute_kernel,
                shards=len(option.shards),
                hbm_per_rank=max(v[0] for v in per_rank.values()),
                ddr_per_rank=max(v[1] for v in per_rank.values()),
                trained=option.name not in FROZEN_TABLES,
            )
        )
    tables.sort(key=lambda t: tower.table_names().index(t.name))
    dense = [*tower.projector.parameters(), *model.trunk.parameters()]
    dense_parameters = sum(p.numel() for p in dense)
    block = max(sum(p.numel() for p in b.parameters()) for b in model.trunk.blocks)
    trunk_per_rank, trunk_note = trunk_memory(dense_parameters, block, parallel, world_size)
    optimizer_state = {"adagrad": 1.0, "adam": 2.0, "sgd": 0.0}
    checkpoint = (WEIGHT + ADAM) * dense_parameters  # dense weights + AdamW state
    for t in tables:
        if t.trained:  # weights + the fused optimizer's state; frozen tables come from their files
            state = 1 / t.dim if parallel.table_optimizer == "rowwise_adagrad" else 0.0
            state += optimizer_state.get(parallel.table_optimizer, 0.0)
            checkpoint += int(t.rows * t.dim * 4 * (1 + state))
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
        checkpoint_bytes=checkpoint,
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
        "| table | rows x width | sharding | kernel | shards | HBM per rank | host memory per rank |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for t in plan.tables:
        lines.append(
            f"| {t.name} | {t.rows:,} x {t.dim} | {t.sharding_type} | {t.compute_kernel} | {t.shards} "
            f"| {_gib(t.hbm_per_rank)} | {_gib(t.ddr_per_rank)} |"
        )
    max_hbm = max(h for h, _ in plan.per_rank)
    max_ddr = max(r for _, r in plan.per_rank)
    lines.append(f"| all tables, busiest rank | | | | | {_gib(max_hbm)} | {_gib(max_ddr)} |")
    lines.append("")
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
        f"({plan.trunk_note}; fp32 weights, grads and AdamW moments, 16 B/parameter; activations not counted)"
    )
    lines.append(
        f"Loss ({plan.loss_note}): {_gib(plan.loss_per_rank)} on the training device, "
        f"{_gib(plan.sampler_per_rank)} host memory per rank"
    )
    total_hbm = max_hbm + (plan.trunk_per_rank + plan.loss_per_rank if d.compute == "cuda" else 0)
    if d.compute == "cuda":
        lines.append(
            f"Busiest rank: {_gib(total_hbm)} of {d.hbm_gb:g} GiB HBM (tables + trunk state + loss), "
            f"{_gib(max_ddr + plan.sampler_per_rank)} of {d.ddr_gb / d.ranks_per_node:,.0f} GiB host memory"
            + ("; does NOT fit in HBM" if total_hbm > d.hbm_gb * GIB else "")
        )
    lines.append(
        f"Checkpoint (trained tables + their optimizer state + dense weights + AdamW; frozen feature tables "
        f"are not saved): {_gib(plan.checkpoint_bytes)}"
    )
    return "\n".join(lines)


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
        ("--ddr-gb", device.ddr_gb, 0),
        ("--hbm-gb", device.hbm_gb, 1 if device.compute == "cuda" else 0),
        *(("--world-size", w, 1) for w in world_sizes or [0]),
    ):
        if not value >= low:
            print(f"fmrl plan: {name} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    print(
        f"# fmrl plan: {args.config or 'defaults'}, {args.num_items:,} items, model width D = "
        f"{cfg.model.dim}, text {args.text_dim if cfg.model.use_text_features else 0}, image "
        f"{args.image_dim if cfg.model.use_image_features else 0}, ID table "
        f"{'yes' if cfg.model.use_id_embedding else 'no'}, attribute table "
        f"{f'{args.num_attributes:,} attributes' if cfg.model.use_attributes else 'no'}; table optimizer "
        f"{cfg.parallel.table_optimizer}, dense backend {cfg.parallel.backend}\n"
    )
    unfit = 0
    for world_size in world_sizes:
        try:
            plan = plan_cluster(
                cfg.model,
                cfg.parallel,
                cfg.optim,
                num_items=args.num_items,
                world_size=world_size,
                device_name=args.device,
                device=device,
                text_dim=args.text_dim,
                image_dim=args.image_dim,
                num_attributes=args.num_attributes,
                train=cfg.train,
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
