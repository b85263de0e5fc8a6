"""``fmrl plan``: TorchRec's plan of the fMRL item tables on a simulated topology, through the function
training shards with (sharding.fmrl.plan_item_tables).

    .venv/bin/python -m pytest -q tests/unit/test_plan.py
"""

from __future__ import annotations

import torch

import sharding.fmrl
import trainer.plan
from models.fmrl.config import FMRLConfig
from sharding.config import OptimConfig, ParallelConfig
from trainer.cli import main
from trainer.plan import GIB, Device, plan_cluster

MODEL = FMRLConfig(nested_sizes=[8, 16, 32, 64], use_id_embedding=True, use_attributes=True)
SIZES = dict(text_dim=64, image_dim=256, num_attributes=1000)


def small_gpu_plan(world_size: int, num_items: int = 1_000_000, hbm_gb: float = 1.0, ddr_gb: float = 64.0):
    # a simulated cluster of small GPUs (1 GiB HBM each, 4 per node): the tables outgrow one device
    device = Device("cuda", hbm_gb, ddr_gb, 4)
    return plan_cluster(
        MODEL,
        ParallelConfig(),
        OptimConfig(),
        num_items=num_items,
        world_size=world_size,
        device_name="small-gpu",
        device=device,
        **SIZES,
    )


def test_a_table_larger_than_one_device_is_row_wise_sharded_over_every_rank() -> None:
    plan = small_gpu_plan(4)
    assert [t.name for t in plan.tables] == ["text", "image", "id", "attribute"]
    image = next(t for t in plan.tables if t.name == "image")
    assert image.rows * image.dim * 4 > 0.85 * GIB  # more than one device's usable HBM
    for name, table in plan.sharding_plan.plan.items():
        sharding = table[name]
        shards = sharding.sharding_spec.shards
        # GPU "auto": row-wise, a row block per rank, the blocks covering the table exactly
        assert sharding.sharding_type == "row_wise", name
        assert sorted(s.placement.rank() for s in shards) == [0, 1, 2, 3]
        rows = next(t.rows for t in plan.tables if t.name == name)
        assert sum(s.shard_sizes[0] for s in shards) == rows
    # TorchRec's estimate of the image table on a rank is about a quarter of its weights
    assert image.hbm_per_rank + image.ddr_per_rank >= image.rows * image.dim * 4 / 4


def test_tables_that_do_not_fit_in_hbm_are_cached_in_host_memory() -> None:
    plan = small_gpu_plan(2, num_items=3_000_000)
    busiest_hbm = max(h for h, _ in plan.per_rank)
    assert busiest_hbm <= GIB  # what stays in HBM fits the device
    assert plan.uvm_tables, "the tables need 3 GiB per rank: some must live in host memory"
    for table in plan.tables:
        if table.name in plan.uvm_tables:
            assert table.compute_kernel == "fused_uvm_caching"
            assert table.ddr_per_rank > table.hbm_per_rank > 0  # the table in DDR, a cache in HBM


def test_per_rank_memory_falls_with_the_world_size() -> None:
    busiest = [max(h for h, _ in small_gpu_plan(w, hbm_gb=8.0).per_rank) for w in (2, 4, 8)]
    assert busiest[0] > busiest[1] > busiest[2]
    trunk = [small_gpu_plan(w, hbm_gb=8.0).trunk_per_rank for w in (2, 8)]
    assert trunk[0] > trunk[1]


def test_the_command_prints_every_table_and_world_size(capsys) -> None:
    argv = ["plan", "--num-items", "200000", "--world-size", "2,4", "--device", "h100", "--text-dim", "64"]
    argv += ["--image-dim", "32", "model.use_id_embedding=true", "model.nested_sizes=[8,16,32]"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("text", "image", "id"):
        assert out.count(f"| {name} | 200,001 x ") == 2, name
    assert "## 2 x h100" in out and "## 4 x h100" in out
    assert "Trunk (" in out and "Checkpoint" in out and "UVM caching" in out


def test_nothing_fits_names_the_table_and_the_memory(capsys) -> None:
    argv = ["plan", "--num-items", "50000000", "--world-size", "2", "--device", "h100", "--hbm-gb", "1"]
    argv += ["--ddr-gb", "2", "--ranks-per-node", "2", "--text-dim", "0", "--image-dim", "1280"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no plan fits on 2 x h100" in err
    assert "'image' (50,000,001 x 1280) 238 GiB" in err  # the table and what it needs
    assert "1 GiB of HBM" in err and "1 GiB of host memory" in err  # what a rank has


def test_bad_arguments_name_the_argument(capsys) -> None:
    assert main(["plan", "--num-items", "0", "--world-size", "2"]) == 2
    assert "--num-items must be >= 1" in capsys.readouterr().err
    assert main(["plan", "--num-items", "10", "--world-size", "2,x"]) == 2
    assert "--world-size" in capsys.readouterr().err


def test_training_and_fmrl_plan_use_one_planning_function(monkeypatch) -> None:
    from models.fmrl import FMRLRec
    from trainer.dist import distributed

    # the command calls the very function training calls
    assert trainer.plan.plan_item_tables is sharding.fmrl.plan_item_tables
    calls = []
    original = sharding.fmrl.plan_item_tables

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(sharding.fmrl, "plan_item_tables", spy)
    cfg = FMRLConfig(nested_sizes=[8, 16], use_id_embedding=True)
    num_items = 50
    model = FMRLRec(cfg, num_items, torch.randn(num_items + 1, 12), torch.randn(num_items + 1, 20))
    with distributed() as (_, device):
        parallel = sharding.fmrl.parallelize_fmrl(
            model, ParallelConfig(), OptimConfig(), total_steps=10, micro_batch_size=4, device=device
        )
    assert len(calls) == 1 and calls[0]["collective"] is True
    # and for the same topology (1 CPU rank) both get the same plan
    offline = plan_cluster(
        cfg,
        ParallelConfig(),
        OptimConfig(),
        num_items=num_items,
        world_size=1,
        device_name="cpu",
        device=Device("cpu", 0, 64, 1),
        text_dim=12,
        image_dim=20,
        num_attributes=1,
    )
    assert str(offline.sharding_plan) == str(parallel.sparse.plan)
