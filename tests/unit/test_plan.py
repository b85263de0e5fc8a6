"""``fmrl plan``: TorchRec's plan of the fMRL item tables on a simulated topology, through the function
training shards with (sharding.fmrl.plan_item_tables).

    .venv/bin/python -m pytest -q tests/unit/test_plan.py
"""

from __future__ import annotations

import pytest
import torch

import sharding.fmrl
import trainer.plan
from models.fmrl.config import FMRLConfig
from sharding.config import OptimConfig, ParallelConfig
from trainer.cli import main
from trainer.config import ConfigError, TrainConfig
from trainer.plan import GIB, Device, plan_cluster

MODEL = FMRLConfig(nested_sizes=[8, 16, 32, 64], use_id_embedding=True, use_attributes=True)
SIZES = dict(text_dim=64, image_dim=256, num_attributes=1000)


def small_gpu_plan(
    world_size: int,
    num_items: int = 1_000_000,
    hbm_gb: float = 1.0,
    ddr_gb: float = 64.0,
    train: TrainConfig | None = None,
):
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
        train=train,
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
    assert "| ms per step |" in out and "Activations (" in out and "Evaluation (the item shard" in out


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
    assert main(["plan", "--num-items", "10", "--world-size", "2", "--attributes-per-item", "-1"]) == 2
    assert "--attributes-per-item must be >= 0, got -1.0" in capsys.readouterr().err
    assert (
        main(["plan", "--num-items", "10", "--world-size", "2", "parallel.attribute_table_sharding=x"]) == 2
    )
    assert "parallel.attribute_table_sharding must be one of" in capsys.readouterr().err


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


def test_the_loss_chooses_full_up_to_the_threshold_and_refuses_full_above_it() -> None:
    auto, full = (
        TrainConfig(full_softmax_max_items=1000),
        TrainConfig(loss="full", full_softmax_max_items=1000),
    )
    assert auto.loss_for(1000) == "full" and auto.loss_for(1001) == "sampled"
    assert full.loss_for(1000) == "full"
    assert TrainConfig(loss="sampled").loss_for(10) == "sampled"
    with pytest.raises(
        ConfigError, match=r"train.loss=full with 1,001 items .* train.full_softmax_max_items=1,000"
    ):
        full.loss_for(1001)


def test_the_full_softmax_is_planned_per_rank() -> None:
    num_items = 100_000
    sampled = small_gpu_plan(2, num_items=num_items, hbm_gb=8.0, train=TrainConfig(loss="sampled"))
    full = small_gpu_plan(2, num_items=num_items, hbm_gb=8.0, train=TrainConfig(loss="full", batch_size=4))
    # the sampled softmax holds 4 sizes x (64 x 50 positions) x (3200 targets + 1024 negatives) fp32 logits;
    # uniform negatives: no per-item table
    assert sampled.loss_per_rank == 4 * 3200 * 4224 * 4 and sampled.sampler_per_rank == 0
    rows = num_items + 1
    # the item matrix (D = 64) and its gradient, the text (64), image (256), ID (64) and attribute (64)
    # tables' looked-up rows, and the fused loss's scores: 4 sizes x a chunk of positions x N fp32, the
    # 64 MiB chunk holding 41 of the batch's 200 positions (4 x 50)
    chunk_rows = 64 * 2**20 // (4 * 4 * num_items)
    assert chunk_rows == 41
    expected = 2 * rows * 64 * 4 + rows * (64 + 256 + 64 + 64) * 4 + 4 * chunk_rows * num_items * 4
    assert full.loss_per_rank == expected
    assert "full softmax" in full.loss_note and f"{rows:,} x 64 item matrix" in full.loss_note
    assert "Loss (full softmax" in trainer.plan.render(full)
    assert "does NOT fit" not in trainer.plan.render(full)  # 0.28 GiB of loss on 8 GiB of HBM
    # 0.5 GiB: the tables fit (0.28 GiB, told of the N + 1 lookups), with the loss they do not
    small = small_gpu_plan(2, num_items=num_items, hbm_gb=0.5, train=TrainConfig(loss="full"))
    assert not small.uvm_tables
    assert "does NOT fit in HBM" in trainer.plan.render(small)
    # a batch smaller than one chunk scores all its positions at once: 4 sizes x 10 positions
    tiny_batch = small_gpu_plan(
        2, num_items=num_items, hbm_gb=8.0, train=TrainConfig(loss="full", batch_size=2, max_len=5)
    )
    assert full.loss_per_rank - tiny_batch.loss_per_rank == 4 * (chunk_rows - 10) * num_items * 4
    # loss "auto" at 100,000 items (<= train.full_softmax_max_items) plans the full softmax too
    assert small_gpu_plan(2, num_items=num_items, hbm_gb=8.0).loss_per_rank == expected


def test_the_popularity_sampler_table_is_counted_on_every_rank() -> None:
    train = TrainConfig(loss="sampled", negative_sampling="popularity")
    plan = small_gpu_plan(4, train=train)
    logits = 4 * (64 * 50) * (64 * 50 + 1024) * 4  # 4 sizes x B L positions x C candidates, fp32
    assert plan.sampler_per_rank == 8 * 1_000_000 and plan.loss_per_rank == logits
    # at 100M items the table is 800 MB on every rank, whatever the world size
    device, host, note = trainer.plan.loss_memory(train, MODEL, 100_000_000, [64])
    assert (device, host) == (logits, 800_000_000) and "float64" in note
    assert "host memory per rank" in trainer.plan.render(plan)


def test_the_command_refuses_a_full_softmax_above_the_threshold(capsys) -> None:
    argv = ["plan", "--num-items", "300000", "--world-size", "2", "--device", "h100", "--text-dim", "64"]
    argv += ["--image-dim", "0", "model.nested_sizes=[8,16,32]", "train.loss=full"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "train.loss=full with 300,000 items is above train.full_softmax_max_items=200,000" in err
    assert "use train.loss=sampled" in err
    # raised to the catalog, the same command plans it and counts the loss
    assert main([*argv, "train.full_softmax_max_items=300000"]) == 0
    assert "Loss (full softmax: the 300,001 x 32 item matrix" in capsys.readouterr().out


def test_training_refuses_a_full_softmax_above_the_threshold_before_building_the_model(
    tmp_path, capsys, monkeypatch
) -> None:
    data = str(tmp_path / "data")
    argv = ["data", "prepare-synthetic-scale", data, "--num-items", "300", "--num-users", "50"]
    argv += ["--num-categories", "4", "--num-brands", "6", "--text-dim", "8", "--image-dim", "8"]
    assert main([*argv, "--max-seq-len", "8", "--shard-size", "50"]) == 0
    built = []
    monkeypatch.setattr("trainer.tasks.fmrl.FMRLRec", lambda *a, **k: built.append(1))  # must not be reached
    overrides = [f"data.path={data}", f"run.out_dir={tmp_path}", "run.name=full", "run.progress_bar=false"]
    overrides += ["data.num_workers=0", "model.use_id_embedding=true", "train.num_threads=1"]
    overrides += ["train.loss=full", "train.full_softmax_max_items=299"]
    capsys.readouterr()
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "fmrl train: config error: train.loss=full with 300 items is above train.full_softmax_max_items=299: every "
        "rank would look up all 301 items and hold the (N + 1, D) item matrix each step; use "
        "train.loss=sampled (or auto), or raise train.full_softmax_max_items if `fmrl plan` says it fits"
    )
    assert not built


# a tiny CPU cluster for hand counts: 2 ranks, D = 16 (sizes 8, 16), text 12 wide, 100 items
TINY = FMRLConfig(nested_sizes=[8, 16], use_id_embedding=True, use_attributes=True)
TINY_TRAIN = TrainConfig(loss="sampled", batch_size=4, max_len=5, num_negatives=7)


def tiny_cpu_plan(parallel: ParallelConfig | None = None, **kwargs):
    return plan_cluster(
        TINY,
        parallel or ParallelConfig(),
        OptimConfig(),
        num_items=100,
        world_size=2,
        device_name="cpu",
        device=Device("cpu", 0, 64, 2),
        text_dim=12,
        image_dim=0,
        num_attributes=10,
        **{"train": TINY_TRAIN, "attributes_per_item": 3.0, **kwargs},
    )


def test_the_planner_receives_the_real_lookup_batch_and_pooling(monkeypatch) -> None:
    received = {}
    original = sharding.fmrl.plan

    def spy(module, sharders, constraints, topology, **kwargs):
        received.update(constraints)
        return original(module, sharders, constraints, topology, **kwargs)

    monkeypatch.setattr(sharding.fmrl, "plan", spy)
    plan = tiny_cpu_plan()
    # one step on a rank looks up 4 x (5 + 1) token and label ids + 7 negatives in every table, and the
    # attribute table pools each item's 3 attributes (TorchRec's default would be 512 lookups of pooling 1)
    assert plan.lookups.ids == 4 * 6 + 7
    assert sorted(received) == ["attribute", "id", "text"]
    for name, constraints in received.items():
        assert constraints.batch_sizes == [31], name
        assert constraints.num_poolings == [1.0], name
        assert constraints.pooling_factors == ([3.0] if name == "attribute" else [1.0]), name
    # a full softmax looks up every row
    full = tiny_cpu_plan(train=TrainConfig(loss="full", batch_size=4, max_len=5))
    assert full.lookups.ids == 101
    assert "31 item ids per step per rank" in trainer.plan.render(plan)


def test_the_planners_cost_follows_the_lookups() -> None:
    # TorchRec's own estimates grow with the lookups it is told of: a bigger batch, more attributes
    small, big = tiny_cpu_plan(), tiny_cpu_plan(train=TrainConfig(loss="sampled", batch_size=64, max_len=5))
    pooled = tiny_cpu_plan(attributes_per_item=30.0)
    by_name = [{t.name: t for t in p.tables} for p in (small, big, pooled)]
    assert by_name[1]["id"].step_ms > by_name[0]["id"].step_ms > 0
    assert by_name[2]["attribute"].step_ms > by_name[0]["attribute"].step_ms
    assert by_name[2]["id"].step_ms == by_name[0]["id"].step_ms  # the pooling is the attribute table's
    assert small.tables_step_ms == max(small.table_ms_per_rank) > 0


def test_every_memory_line_matches_a_hand_count() -> None:
    plan = tiny_cpu_plan()
    positions, width = 4 * 5, 16
    # trunk: 20 positions x (2 blocks x 14 + 2) widths x 16 fp32; the 31 looked-up items' rows of the
    # text (12), ID (16) and attribute (16) tables and their (31, 16) projection
    assert plan.activations_per_rank == positions * (2 * 14 + 2) * width * 4 + 31 * (12 + 16 + 16 + 16) * 4
    # sampled softmax: 2 sizes x 20 positions x min(100, 20 + 7) candidates, fp32
    assert plan.loss_per_rank == 2 * positions * 27 * 4
    # the evaluation item shard: ceil(100 / 2) = 50 items x 16 fp32, and while it is built the rows of
    # its 50 items (fewer than ITEM_CHUNK) and their projection, like the training step's looked-up items
    assert plan.eval_items_per_rank == 50 * width * 4 + 50 * (12 + 16 + 16 + 16) * 4
    # the data set: the user scan's 101 int64 counts; the attribute index's 102 offsets and 3 ids per item
    assert plan.data_per_rank == 8 * 101 + 8 * 102 + 8 * 300
    # the snapshot: this rank's column shards (8 of 16 columns, CPU "auto") of the ID (101 rows) and
    # attribute tables and half the dense weights (FSDP2)
    attribute_rows = next(t.rows for t in plan.tables if t.name == "attribute")
    tables = (101 + attribute_rows) * 8 * 4
    dense = 4 * -(-plan.dense_parameters // 2)
    assert plan.snapshot_per_rank == tables + dense
    assert plan.staging_per_rank == 0  # run.async_checkpoint off
    # async: the same shards with Adagrad's state (x 2) and the dense weights with AdamW's moments (x 3)
    staged = tiny_cpu_plan(async_checkpoint=True)
    assert staged.staging_per_rank == 2 * tables + 3 * dense
    # DDP keeps all dense weights on every rank
    ddp = tiny_cpu_plan(ParallelConfig(backend="ddp"))
    assert ddp.snapshot_per_rank == tables + 4 * plan.dense_parameters
    out = trainer.plan.render(staged)
    for line in (
        "Activations (",
        "Evaluation (the item shard",
        "Best-weights snapshot",
        "Async checkpoint staging",
    ):
        assert line in out, line
    total = max(r for _, r in staged.per_rank) + staged.trunk_per_rank + staged.loss_per_rank
    total += staged.activations_per_rank + staged.eval_items_per_rank + staged.snapshot_per_rank
    total += (
        staged.sampler_per_rank + staged.staging_per_rank + staged.data_per_rank + staged.process_per_rank
    )
    assert f"Busiest rank: {total / GIB:,.2f} GiB of 32 GiB host memory" in out


def test_the_attribute_table_takes_its_own_sharding() -> None:
    parallel = ParallelConfig(table_sharding="column_wise", attribute_table_sharding="table_wise")
    plan = tiny_cpu_plan(parallel)
    kinds = {name: table[name].sharding_type for name, table in plan.sharding_plan.plan.items()}
    assert kinds == {"text": "table_wise", "id": "column_wise", "attribute": "table_wise"}
    assert {t.name: t.sharding_type for t in plan.tables}["attribute"] == "table_wise"
    # "same" follows parallel.table_sharding
    same = tiny_cpu_plan(ParallelConfig(table_sharding="column_wise"))
    assert {t.name: t.sharding_type for t in same.tables}["attribute"] == "column_wise"
    with pytest.raises(ValueError, match="attribute_table_sharding must be one of"):
        ParallelConfig(attribute_table_sharding="data_parallel")


def test_training_shards_the_attribute_table_as_configured() -> None:
    from models.fmrl import AttributeBags, FMRLRec
    from trainer.dist import distributed

    num_items = 30
    offsets = torch.arange(num_items + 2).clamp(max=num_items)  # item i has attribute (i % 5) + 1
    bags = AttributeBags(offsets, torch.arange(num_items) % 5 + 1, 5)
    model = FMRLRec(TINY, num_items, torch.randn(num_items + 1, 12), None, bags)
    parallel = ParallelConfig(table_sharding="column_wise", attribute_table_sharding="table_wise")
    with distributed() as (_, device):
        wrapped = sharding.fmrl.parallelize_fmrl(
            model, parallel, OptimConfig(), total_steps=10, micro_batch_size=4, device=device
        )
        rows = wrapped.sparse(torch.tensor([1, 2, 3]))
    kinds = {name: table[name].sharding_type for name, table in wrapped.sparse.plan.plan.items()}
    assert kinds["attribute"] == "table_wise" and kinds["id"] == "column_wise"
    assert [tuple(r.shape) for r in rows] == [(3, 12), (3, 16), (3, 16)]
