"""One rank of a small distributed fMRL job for the equivalence tests (run under torchrun, or plainly).

    torchrun --nproc_per_node=2 tests/integration/distributed_worker.py --dataset D --backend fsdp2 --out o.json

Every rank builds the same model, shards it with ``parallelize_fmrl`` and trains on fixed *global*
batches: global batch g is users [g*G, (g+1)*G) in file order, and rank r takes rows r, r+W, ... of it.
So a 1-rank and a 2-rank job see the same sequences per step, and their losses must agree. Rank 0 writes
the per-step losses (mean over all ranks' positions), the largest difference between sharded and
unsharded table lookups, and the test metrics of the distributed evaluation.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.features import load_feature_tables
from data_pipeline.loader import SequenceDataset, decode_user
from data_pipeline.sequences import collate_next_item
from data_pipeline.storage import join
from data_pipeline.stream import iter_shard
from models.fmrl import AttributeBags, FMRLConfig, FMRLRec, NegativeSampler
from sharding.config import OptimConfig, ParallelConfig
from sharding.fmrl import parallelize_fmrl
from trainer.dist import all_reduce_sum, distributed
from trainer.evaluation.ranking import evaluate
from trainer.process_exit import run_as_process
from trainer.tasks.fmrl import StepInputs, forward_backward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--backend", default="fsdp2")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--id-optimizer", default="adagrad")
    parser.add_argument("--no-id-table", action="store_true")
    parser.add_argument("--attributes", action="store_true", help="add a learnable attribute table")
    parser.add_argument("--attribute-sharding", default="same", help="parallel.attribute_table_sharding")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (the same rows)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--loss", default="full", choices=["full", "sampled"])
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    with distributed() as (world, device):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        dataset = SequenceDataset.open(args.dataset)
        text, image, _ = load_feature_tables(join(args.dataset, "features"))
        cfg = FMRLConfig(
            nested_sizes=[8, 16, 32],
            num_blocks=2,
            dropout=0.0,
            attn_dropout=0.0,
            use_id_embedding=not args.no_id_table,
            use_attributes=args.attributes,
        )
        model = FMRLRec(cfg, dataset.num_items, text, image, fixed_attribute_bags(dataset.num_items))
        ids = torch.arange(dataset.num_items + 1)
        reference_rows = [t.detach().clone() for t in model.item_tower.lookup(ids)]

        parallel = parallelize_fmrl(
            model,
            ParallelConfig(
                backend=args.backend,
                zero_stage=args.zero_stage,
                table_optimizer=args.id_optimizer,
                table_lr=0.05,
                precision=args.precision,
                attribute_table_sharding=args.attribute_sharding,
            ),
            OptimConfig(
                lr=3e-3, weight_decay=0.01, warmup_steps=2, grad_clip=5.0, grad_accum_steps=args.grad_accum
            ),
            total_steps=args.steps,
            micro_batch_size=args.global_batch // world.world_size,
            device=device,
        )
        # every rank asks for other ids: sharded lookups must return the unsharded rows
        mine = ids[world.rank :: world.world_size]
        lookup_diff = max(
            float((got - want[mine]).abs().max()) for got, want in zip(parallel.sparse(mine), reference_rows)
        )

        users = [
            decode_user(sample, dataset.num_items)[:-2]
            for entry in dataset.users.shards
            for sample in iter_shard(join(args.dataset, entry.name), entry)
        ]
        users = [u for u in users if len(u) >= 2]
        inputs = StepInputs(
            sizes=cfg.nested_sizes,
            num_items=dataset.num_items,
            loss_kind=args.loss,
            chunk_mb=64,
            sampler=NegativeSampler(dataset.num_items, 32) if args.loss == "sampled" else None,
            generator=torch.Generator().manual_seed(0),
            device=device,
        )
        losses = []
        parallel.set_training(True)
        for step in range(args.steps):
            start = (step * args.global_batch) % (len(users) - args.global_batch)
            rows = users[start : start + args.global_batch][world.rank :: world.world_size]
            for micro in range(args.grad_accum):  # the same rows each time: the mean gradient is unchanged
                boundary = micro == args.grad_accum - 1
                parallel.set_grad_sync(boundary)
                loss_sum, positions, _ = forward_backward(parallel, collate_next_item(rows, 10), inputs)
                parallel.micro_step(boundary)
            total = all_reduce_sum(torch.tensor([loss_sum, positions]))
            losses.append(float(total[0] / total[1]))

        # the frozen feature tables never change; the learnable ones (ID, attributes) do
        after = parallel.sparse(mine)
        change = {
            name: float((got - want[mine]).abs().max())
            for name, got, want in zip(parallel.sparse.names, after, reference_rows)
        }
        frozen_diff = max((change[n] for n in ("text", "image") if n in change), default=0.0)
        id_change = change.get("id", 0.0)
        metrics = evaluate(
            parallel,
            dataset,
            "test",
            cfg.nested_sizes,
            [5, 10, 20],
            exclude_history=True,
            batch_size=16,
            max_len=10,
            device=device,
        )
        full = parallel.full_state_dict()
        if dist.get_rank() == 0:
            assert full is not None
            digest = {k: float(np.float64(v.double().abs().sum())) for k, v in sorted(full.items())}
            with open(args.out, "w") as f:
                json.dump(
                    {
                        "losses": losses,
                        "lookup_diff": lookup_diff,
                        "frozen_diff": frozen_diff,
                        "id_change": id_change,
                        "table_change": change,
                        "metrics": {str(k): v for k, v in metrics.items()},
                        "weights": digest,
                        "world_size": world.world_size,
                        "sharding_types": {
                            name: table[name].sharding_type
                            for name, table in parallel.sparse.plan.plan.items()
                        },
                    },
                    f,
                )


def fixed_attribute_bags(num_items: int, num_attributes: int = 12) -> AttributeBags:
    """0-3 attribute ids per item, the same on every rank and in every run."""
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 4, (num_items + 1,), generator=g)
    lengths[0] = 0
    offsets = torch.zeros(num_items + 2, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    values = torch.randint(1, num_attributes + 1, (int(offsets[-1]),), generator=g)
    return AttributeBags(offsets, values, num_attributes)


if __name__ == "__main__":
    run_as_process(main)  # trainer/process_exit.py: why a gloo process exits this way
