"""One rank of a CTR model's tables sharded from birth (run under torchrun, or plainly), for
tests/integration/test_sharded_birth.py and the peak-memory measurement in docs/scale.md.

    torchrun --nproc_per_node=2 tests/integration/ctr_birth_worker.py --model wide_deep --out o.json

The model is built with its tables on meta (``build_ctr_model(cfg, sparse_device="meta")``) and sharded
with ``parallel.table_sharding``; ``--whole`` builds it the way it was before tables were sharded from
birth (every table whole on every rank, the shards sliced from it). Every call of
``SparseArch.initial_rows`` is recorded (the shape it returned: the largest block of initial values a
rank ever generated), then rank 0 writes the gathered model (``--weights``) and every rank's report:
its peak RSS after building and sharding, whether the model's own tables hold storage, and its local
shards against the tables' full shapes.

    torchrun --nproc_per_node=2 tests/integration/ctr_birth_worker.py --model dlrm --tables 26 \\
        --rows 500000 --dim 16 --sharding table_wise --out birth.json [--whole]
"""

from __future__ import annotations

import argparse
import json
import resource

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from models.ctr import build_ctr_model
from models.dlrm import DLRMConfig, SparseArch
from sharding.config import OptimConfig, ParallelConfig
from sharding.dlrm import parallelize_dlrm
from trainer.dist import distributed
from trainer.process_exit import run_as_process


def config(args: argparse.Namespace) -> DLRMConfig:
    """A small model of ``--tables`` tables of ``--rows`` rows (every third one larger), crossed features
    for Wide & Deep."""
    rows = [args.rows + 1000 * (f % 3) for f in range(args.tables)]
    crosses = {"wide_crosses": ["cat_0*cat_1", "cat_1*cat_2"], "wide_cross_buckets": 2500}
    extra = crosses if args.model == "wide_deep" else {}
    return DLRMConfig(
        model=args.model,
        num_dense=4,
        hash_buckets=rows,
        embedding_dim=args.dim,
        bottom_mlp=[8, args.dim],
        top_mlp=[8, 1],
        **extra,
    )


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="dlrm")
    parser.add_argument("--tables", type=int, default=3)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--sharding", default="column_wise", choices=["column_wise", "table_wise"])
    parser.add_argument("--whole", action="store_true", help="build every table whole first (the old way)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", help="rank 0 writes the gathered model here")
    return parser


def main() -> None:
    args = parser().parse_args()

    generated: dict[str, list[int]] = {}
    original = SparseArch.initial_rows

    def recorded(self: SparseArch, name: str, start: int, stop: int, columns=None) -> torch.Tensor:  # noqa: ANN001
        rows = original(self, name, start, stop, columns)
        largest = generated.get(name, [0, 0])
        generated[name] = max(largest, list(rows.shape), key=lambda shape: shape[0] * shape[1])
        return rows

    SparseArch.initial_rows = recorded  # a spy: the real values, and the largest block each table asked
    with distributed() as (world, device):
        torch.set_num_threads(1)
        cfg = config(args)
        rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        torch.manual_seed(0)
        model = build_ctr_model(cfg, sparse_device=None if args.whole else "meta")
        parallel = parallelize_dlrm(
            model,
            ParallelConfig(backend="ddp", table_sharding=args.sharding, table_optimizer="adagrad"),
            OptimConfig(lr=1e-3),
            total_steps=1,
            micro_batch_size=4,
            device=device,
        )
        rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        shards = {}
        for key, value in parallel.sparse.dmp.state_dict().items():
            shards[key.split(".")[-2]] = {
                "full": list(value.size()),
                "local": [list(s.tensor.shape) for s in value.local_shards()],
                "local_numel": sum(s.tensor.numel() for s in value.local_shards()),
            }
        report = {
            "peak_rss_mib_start": rss_start / 1024,  # ru_maxrss is in KiB on Linux
            "peak_rss_mib_built": rss_built / 1024,
            "tables_on_meta": all(p.device.type == "meta" for p in model.sparse_arch.parameters()),
            "generated": generated,
            "shards": shards,
        }
        state = parallel.full_state_dict()
        if state is not None and args.weights:
            save_file({k: v.contiguous() for k, v in state.items()}, args.weights)
        per_rank: list = [None] * world.world_size
        dist.all_gather_object(per_rank, report)
        if world.rank == 0:
            with open(args.out, "w") as f:
                json.dump({"world_size": world.world_size, "ranks": per_rank}, f)


if __name__ == "__main__":
    run_as_process(main)  # trainer/process_exit.py: why a gloo process exits this way
