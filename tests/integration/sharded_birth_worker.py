"""One rank of a small fMRL job built sharded from birth, and the same job built the old way (run under
torchrun, or plainly), for tests/integration/test_sharded_birth.py.

    torchrun --nproc_per_node=2 tests/integration/sharded_birth_worker.py --dataset D \\
        --features D/features --sharding column_wise --out o.json

First the job is built from birth: the model's tables on meta, the frozen shards read from the feature
files (locally or from S3) by :class:`~data_pipeline.features.FeatureTableReader`, the learnable ones
generated per shard. It records, per rank, the bytes each reader asked storage for, the size of every
local shard against its table's full shape, and whether any tower table holds storage; then it trains a
few steps. Then the same job is built the old way (every table loaded and created whole, then sharded)
under the same seed and trained on the same batches. Rank 0 writes both runs' losses and lookups.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from data_pipeline.features import load_feature_tables, open_feature_tables
from data_pipeline.loader import SequenceDataset, decode_user
from data_pipeline.sequences import collate_next_item
from data_pipeline.storage import join
from data_pipeline.stream import iter_shard
from models.fmrl import FMRLConfig, FMRLRec
from sharding.config import OptimConfig, ParallelConfig
from sharding.fmrl import ParallelFMRL, parallelize_fmrl
from trainer.dist import all_reduce_sum, distributed
from trainer.process_exit import run_as_process
from trainer.tasks.fmrl import StepInputs, forward_backward

sys.path.insert(0, os.path.dirname(__file__))
from distributed_worker import fixed_attribute_bags  # noqa: E402

CFG = FMRLConfig(
    nested_sizes=[8, 16, 32],
    num_blocks=2,
    dropout=0.0,
    attn_dropout=0.0,
    use_id_embedding=True,
    use_attributes=True,
)
GLOBAL_BATCH = 16


def build(
    args: argparse.Namespace, num_items: int, device: torch.device, birth: bool
) -> tuple[ParallelFMRL, dict]:
    """The parallel model, built from birth or the old way, and (from birth) what each rank holds."""
    torch.manual_seed(0)
    held: dict = {}
    if birth:
        text, image, _ = open_feature_tables(args.features)
        readers = {"text": text, "image": image}
        model = FMRLRec(
            CFG,
            num_items,
            torch.empty(text.shape, device="meta"),
            torch.empty(image.shape, device="meta"),
            fixed_attribute_bags(num_items),
            table_device="meta",
        )
        held["tower_storage_bytes"] = sum(
            t.weight.untyped_storage().nbytes()
            for t in model.item_tower.tables()
            if t.weight.device.type != "meta"
        )
    else:
        text_table, image_table, _ = load_feature_tables(args.features)
        model = FMRLRec(CFG, num_items, text_table, image_table, fixed_attribute_bags(num_items))
        readers = {}
    parallel = parallelize_fmrl(
        model,
        ParallelConfig(
            backend="ddp",
            feature_table_sharding=args.sharding,
            table_sharding=args.sharding,
            table_optimizer="adagrad",
            table_lr=0.05,
        ),
        OptimConfig(lr=3e-3, weight_decay=0.01, warmup_steps=1, grad_clip=5.0),
        total_steps=args.steps,
        micro_batch_size=GLOBAL_BATCH // dist.get_world_size(),
        device=device,
        frozen_tables=readers,
    )
    if birth:
        held["bytes_read"] = {name: r.bytes_read for name, r in readers.items()}
        held["requests"] = {name: r.requests for name, r in readers.items()}
        held["file_bytes"] = {name: r.data_start + r.nbytes for name, r in readers.items()}
        shards = {}
        for key, value in parallel.sparse.dmp.state_dict().items():
            name = key.removeprefix("_dmp_wrapped_module.").split(".", 1)[0]
            shards[name] = {
                "full": list(value.size()),
                "local": [list(s.tensor.shape) for s in value.local_shards()],
                "local_numel": sum(s.tensor.numel() for s in value.local_shards()),
            }
        held["shards"] = shards
        held["tower_on_meta"] = all(t.weight.device.type == "meta" for t in model.item_tower.tables())
    return parallel, held


def train(
    parallel: ParallelFMRL, users: list, args: argparse.Namespace, num_items: int, device: torch.device
) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    ids = torch.arange(num_items + 1)
    mine = ids[rank::world]
    before = [rows.sum(1).tolist() for rows in parallel.sparse(mine)]
    inputs = StepInputs(
        sizes=CFG.nested_sizes,
        num_items=num_items,
        loss_kind="full",
        chunk_mb=64,
        sampler=None,
        generator=torch.Generator().manual_seed(0),
        device=device,
    )
    losses = []
    parallel.set_training(True)
    for step in range(args.steps):
        rows = users[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH][rank::world]
        loss_sum, positions, _ = forward_backward(parallel, collate_next_item(rows, 10), inputs)
        parallel.micro_step(True)
        total = all_reduce_sum(torch.tensor([loss_sum, positions]))
        losses.append(float(total[0] / total[1]))
    after = [rows.sum(1).tolist() for rows in parallel.sparse(mine)]
    return {"losses": losses, "rows_before": before, "rows_after": after}


BLOCK_ROWS = 64


def write_weights(parallel: ParallelFMRL, path: str) -> dict:
    """Write the trained weights to ``path`` with trainer.train.save_weights (blocks of 64 table rows,
    block b by rank b % world size), and check the file against the gathered state (the old way). Each
    rank reports the largest table block it held and the pieces it wrote."""
    import trainer.train

    trainer.train.WEIGHT_BLOCK_ROWS = BLOCK_ROWS
    wrote = trainer.train.save_weights(parallel, path)
    tables = parallel.sparse.table_layout()
    gathered = parallel.full_state_dict()
    report: dict = {
        "largest_block_rows": wrote.largest_block_rows,
        "pieces": wrote.pieces,
        "bytes": wrote.bytes,
        "table_rows": {k: v[0] for k, v in tables.items()},
    }
    if gathered is not None:
        written = load_file(path)
        assert written.keys() == gathered.keys(), (sorted(written), sorted(gathered))
        report["max_diff"] = max(float((written[k] - gathered[k]).abs().max()) for k in written)
        report["keys"] = sorted(written)
        report["file_bytes"] = os.path.getsize(path)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--features", required=True, help="feature folder URL (local or s3://)")
    parser.add_argument("--sharding", default="column_wise", choices=["column_wise", "table_wise"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", help="stream the from-birth job's trained weights to this file")
    args = parser.parse_args()

    with distributed() as (world, device):
        torch.set_num_threads(1)
        dataset = SequenceDataset.open(args.dataset)
        users = [
            decode_user(sample, dataset.num_items)[:-2]
            for entry in dataset.users.shards
            for sample in iter_shard(join(args.dataset, entry.name), entry)
        ]
        users = [u for u in users if len(u) >= 2]
        parallel, held = build(args, dataset.num_items, device, birth=True)
        birth = train(parallel, users, args, dataset.num_items, device)
        if args.weights:
            birth["weights"] = write_weights(parallel, args.weights)
        del parallel
        parallel, _ = build(args, dataset.num_items, device, birth=False)
        old = train(parallel, users, args, dataset.num_items, device)
        per_rank: list = [None] * world.world_size
        dist.all_gather_object(per_rank, {"held": held, "birth": birth, "old": old})
        if world.rank == 0:
            with open(args.out, "w") as f:
                json.dump({"world_size": world.world_size, "ranks": per_rank}, f)


if __name__ == "__main__":
    run_as_process(main)  # trainer/process_exit.py: why a gloo process exits this way
