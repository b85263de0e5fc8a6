"""Memory of building the sharded item tables at 1M items on 2 gloo ranks: sharded from birth against the
old path (every rank loads the feature table and creates the ID table whole, then TorchRec shards them).

    .venv/bin/python bench/sharded_birth.py                    # 1M items, 384-d text, 128-d ID table
    .venv/bin/python bench/sharded_birth.py --num-items 100000

Each way runs in a fresh ``torchrun --nproc_per_node=2`` job that only builds the model and its sharded
tables (column-wise, so each rank owns half of every table) and reports per rank its peak RSS, the
bytes it read of the feature file, and the elements of its local shards. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from data_pipeline.features import load_feature_tables, open_feature_tables
    from models.fmrl import FMRLConfig, FMRLRec
    from sharding.config import OptimConfig, ParallelConfig
    from sharding.fmrl import parallelize_fmrl
    from trainer.dist import distributed
    from trainer.process_exit import run_as_process

    def main() -> None:
        with distributed() as (world, device):
            torch.manual_seed(0)
            cfg = FMRLConfig(nested_sizes=[32, 64, 128], num_blocks=2, use_id_embedding=True)
            if args.mode == "birth":
                text, _, info = open_feature_tables(args.features)
                model = FMRLRec(
                    cfg, info["num_items"], torch.empty(text.shape, device="meta"), table_device="meta"
                )
                readers = {"text": text}
            else:
                table, _, info = load_feature_tables(args.features)
                model = FMRLRec(cfg, info["num_items"], table)
                readers = {}
            parallel = parallelize_fmrl(
                model,
                ParallelConfig(
                    backend="ddp", feature_table_sharding="column_wise", table_sharding="column_wise"
                ),
                OptimConfig(),
                total_steps=1,
                micro_batch_size=1,
                device=device,
                frozen_tables=readers,
            )
            local = sum(
                s.tensor.numel() for v in parallel.sparse.dmp.state_dict().values() for s in v.local_shards()
            )
            report = {
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "bytes_read": readers["text"].bytes_read if readers else None,
                "local_shard_elements": local,
            }
            reports: list = [None] * world.world_size
            dist.all_gather_object(reports, report)
            if world.rank == 0:
                with open(args.out, "w") as f:
                    json.dump(reports, f)

    run_as_process(main)


def run(mode: str, features: str, out: str) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    subprocess.run(
        [*command, "--worker", "--mode", mode, "--features", features, "--out", out], check=True, env=env
    )
    with open(out) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-items", type=int, default=1_000_000)
    parser.add_argument("--text-dim", type=int, default=384)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["birth", "old"], help=argparse.SUPPRESS)
    parser.add_argument("--features", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, REPO)
    from data_pipeline.synthetic_scale import ScaleCatalog, write_synthetic_features

    with tempfile.TemporaryDirectory() as tmp:
        features = os.path.join(tmp, "features")
        catalog = ScaleCatalog(num_items=args.num_items, num_categories=100, num_brands=1000, seed=0)
        write_synthetic_features(catalog, features, tmp, text_dim=args.text_dim, image_dim=0, seed=0)
        file_bytes = os.path.getsize(os.path.join(features, "text_features.safetensors"))
        results = {mode: run(mode, features, os.path.join(tmp, f"{mode}.json")) for mode in ("old", "birth")}
    print(
        f"\n{args.num_items:,} items, text table {args.num_items + 1:,} x {args.text_dim} "
        f"({file_bytes / 2**20:,.0f} MiB), ID table 128 wide; 2 gloo ranks, column-wise\n"
    )
    print("| build | rank | peak RSS | feature bytes read | local shard elements |")
    print("|---|---:|---:|---:|---:|")
    for mode, reports in results.items():
        for rank, r in enumerate(reports):
            read = "all (whole file)" if r["bytes_read"] is None else f"{r['bytes_read'] / file_bytes:.1%}"
            print(
                f"| {'old path' if mode == 'old' else 'from birth'} | {rank} | {r['peak_rss_mib']:,.0f} MiB "
                f"| {read} | {r['local_shard_elements']:,} |"
            )


if __name__ == "__main__":
    main()
