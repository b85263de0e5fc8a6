"""One rank of a small DeepSpeed ZeRO job that saves and resumes DCP checkpoints (run under torchrun, or
plainly for one rank), for tests/integration/test_checkpoint_deepspeed.py.

    torchrun --nproc_per_node=2 tests/integration/deepspeed_checkpoint_worker.py --dataset D \\
        --zero-stages 2 3 --checkpoints C --out o.json

For each ZeRO stage: train 6 steps uninterrupted, saving a checkpoint (C/zero<stage>) after step 3; then
build a fresh model, load that checkpoint and train steps 4..6. With ``--load-only`` it only loads each
stage's newest checkpoint (saved by another world size). Global step s trains on users [s*G, (s+1)*G)
in file order, rank r taking rows r, r+W, ... (as tests/integration/distributed_worker.py).

Rank 0 writes o.json (per stage: the losses of both runs, mean over all ranks' positions) and
o.json.<stage>.pt (torch.save): the full dense weights and AdamW state when saved and right after loading,
and the gathered model weights at the end of both runs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.features import load_feature_tables
from data_pipeline.loader import SequenceDataset, decode_user
from data_pipeline.sequences import collate_next_item
from data_pipeline.storage import join
from data_pipeline.stream import iter_shard
from models.fmrl import FMRLConfig, FMRLRec
from sharding.config import OptimConfig, ParallelConfig
from sharding.fmrl import ParallelFMRL, parallelize_fmrl
from trainer.checkpoint import CheckpointManager
from trainer.dist import World, all_reduce_sum, distributed
from trainer.process_exit import run_as_process
from trainer.tasks.fmrl import StepInputs, forward_backward

SIZES = [8, 16, 32]


def dense_tensors(parallel: ParallelFMRL) -> dict[str, torch.Tensor]:
    """The unpartitioned dense weights and AdamW state (name -> tensor), gathered afresh. Collective."""
    state = parallel.state_dict()
    return {
        f"{part}.{k}": v.clone()
        for part in ("dense", "dense_optimizer")
        for k, v in state[part].items()
        if isinstance(v, torch.Tensor)
    }


def build(args: argparse.Namespace, zero_stage: int, world: World, device: torch.device) -> ParallelFMRL:
    torch.manual_seed(0)
    dataset = SequenceDataset.open(args.dataset)
    text, image, _ = load_feature_tables(join(args.dataset, "features"))
    cfg = FMRLConfig(nested_sizes=SIZES, num_blocks=2, dropout=0.0, attn_dropout=0.0, use_id_embedding=True)
    return parallelize_fmrl(
        FMRLRec(cfg, dataset.num_items, text, image),
        ParallelConfig(backend="deepspeed", zero_stage=zero_stage, table_lr=0.05),
        OptimConfig(
            lr=3e-3, weight_decay=0.01, warmup_steps=2, grad_clip=5.0, grad_accum_steps=args.grad_accum
        ),
        total_steps=args.steps,
        micro_batch_size=args.global_batch // world.world_size,
        device=device,
    )


def train_steps(
    parallel: ParallelFMRL,
    args: argparse.Namespace,
    steps: range,
    world: World,
    device: torch.device,
    checkpoints: CheckpointManager | None = None,
) -> tuple[list[float], dict[str, torch.Tensor] | None]:
    """Train global steps ``steps``, saving to ``checkpoints`` after step ``args.save_at``. Returns the
    per-step mean losses and the :func:`dense_tensors` that were saved."""
    dataset = SequenceDataset.open(args.dataset)
    users = [
        decode_user(sample, dataset.num_items)[:-2]
        for entry in dataset.users.shards
        for sample in iter_shard(join(args.dataset, entry.name), entry)
    ]
    users = [u for u in users if len(u) >= 2]
    inputs = StepInputs(
        sizes=SIZES,
        num_items=dataset.num_items,
        loss_kind="full",
        chunk_mb=64,
        sampler=None,
        generator=torch.Generator().manual_seed(0),
        device=device,
    )
    losses, saved = [], None
    parallel.set_training(True)
    for step in steps:
        start = (step * args.global_batch) % (len(users) - args.global_batch)
        rows = users[start : start + args.global_batch][world.rank :: world.world_size]
        for micro in range(args.grad_accum):  # the same rows each time: the mean gradient is unchanged
            loss_sum, positions, _ = forward_backward(parallel, collate_next_item(rows, 10), inputs)
            parallel.micro_step(micro == args.grad_accum - 1)
        total = all_reduce_sum(torch.tensor([loss_sum, positions]))
        losses.append(float(total[0] / total[1]))
        if checkpoints is not None and step + 1 == args.save_at:
            checkpoints.save(step + 1, parallel.state_dict())
            saved = dense_tensors(parallel)
    return losses, saved


def resume(parallel: ParallelFMRL, checkpoints: CheckpointManager) -> int:
    """Load the newest checkpoint into ``parallel``; returns its step."""
    url = checkpoints.latest()
    assert url is not None, f"no checkpoint under {checkpoints.root}"
    state = parallel.state_dict()
    checkpoints.load(url, state)
    parallel.load_state_dict(state)
    return int(json.loads(state["deepspeed"])["global_steps"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--zero-stages", type=int, nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-at", type=int, default=3, help="checkpoint after this many steps")
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--load-only", action="store_true", help="only load each stage's checkpoint")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    with distributed() as (world, device):
        torch.set_num_threads(1)
        results = {}
        for stage in args.zero_stages:
            checkpoints = CheckpointManager(join(args.checkpoints, f"zero{stage}"))
            tensors: dict[str, Any] = {}
            losses: dict[str, list[float]] = {}
            if not args.load_only:
                parallel = build(args, stage, world, device)
                run = train_steps(parallel, args, range(args.steps), world, device, checkpoints)
                losses["uninterrupted"], tensors["saved"] = run
                tensors["uninterrupted"] = parallel.full_state_dict()
            parallel = build(args, stage, world, device)
            first = resume(parallel, checkpoints)
            tensors["loaded"] = dense_tensors(parallel)
            if not args.load_only:
                steps = range(first, args.steps)
                losses["resumed"], _ = train_steps(parallel, args, steps, world, device)
                tensors["resumed"] = parallel.full_state_dict()
            results[str(stage)] = {"losses": losses, "first_step": first}
            if dist.get_rank() == 0:
                torch.save(tensors, f"{args.out}.{stage}.pt")
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump({"stages": results, "world_size": world.world_size}, f)


if __name__ == "__main__":
    run_as_process(main)  # trainer/process_exit.py: why a gloo process exits this way
