"""Distributed training on real gloo ranks: 2 ranks follow 1 rank step for step with each dense backend
(FSDP2, DeepSpeed ZeRO-2 and ZeRO-3, DDP) and TorchRec-sharded tables; sharded lookups equal unsharded
ones; distributed evaluation equals single-process evaluation.

Each case launches tests/integration/distributed_worker.py (20 full-softmax steps on fixed global
batches of 16 sequences, with a learnable ID table column-wise sharded over the ranks) with torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
# float32 with sums re-associated over ranks: differences of ~1e-7 relative per step, measured <= 2e-7
LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-4


def run_worker(dataset: str, out: str, ranks: int, *args: str) -> dict:
    if ranks == 1:
        command = [sys.executable, WORKER]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            WORKER,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "--dataset", dataset, "--out", out, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def one_rank(tiny_dataset, tmp_path_factory) -> dict:
    return run_worker(tiny_dataset, str(tmp_path_factory.mktemp("ref") / "one.json"), 1, "--backend", "fsdp2")


@pytest.mark.parametrize(
    "backend_args",
    [
        ("--backend", "fsdp2"),
        ("--backend", "deepspeed", "--zero-stage", "2"),
        ("--backend", "deepspeed", "--zero-stage", "3"),
        ("--backend", "ddp"),
    ],
    ids=["fsdp2", "zero2", "zero3", "ddp"],
)
def test_two_ranks_follow_one_rank(tiny_dataset, one_rank, tmp_path, backend_args) -> None:
    two = run_worker(tiny_dataset, str(tmp_path / "two.json"), 2, *backend_args)
    assert two["world_size"] == 2 and one_rank["world_size"] == 1
    # the table shards return exactly the rows of the unsharded tables
    assert two["lookup_diff"] == 0.0 and one_rank["lookup_diff"] == 0.0
    # after training: the frozen feature tables are unchanged, the learnable ID table has moved
    assert two["frozen_diff"] == 0.0 and two["id_change"] > 1e-3
    one_losses, two_losses = np.array(one_rank["losses"]), np.array(two["losses"])
    assert len(one_losses) == len(two_losses) == 20
    assert one_losses[-1] < one_losses[0] - 0.3  # it trains
    np.testing.assert_allclose(two_losses, one_losses, rtol=LOSS_RTOL)
    # the trained weights (dense and the ID table, gathered on rank 0) agree
    assert one_rank["weights"].keys() == two["weights"].keys()
    assert (
        "item_tower.id_embedding.weight" in two["weights"] and "trunk.blocks.1.lru.nu_log" in two["weights"]
    )
    for key, value in one_rank["weights"].items():
        assert two["weights"][key] == pytest.approx(value, rel=WEIGHT_RTOL), key
    # distributed evaluation (items sharded over ranks, users split) equals single-process evaluation
    for size, metrics in one_rank["metrics"].items():
        for name, value in metrics.items():
            assert two["metrics"][size][name] == pytest.approx(value, abs=1e-6), (size, name)


def test_attribute_table_on_two_ranks_follows_one_rank(tiny_dataset, tmp_path) -> None:
    # a learnable attribute table (mean-pooled bags, TorchRec EmbeddingBagCollection, column-wise over
    # the ranks) beside the ID table and the frozen features
    one = run_worker(tiny_dataset, str(tmp_path / "one.json"), 1, "--attributes")
    two = run_worker(tiny_dataset, str(tmp_path / "two.json"), 2, "--attributes")
    # pooled rows equal the unsharded ones up to summation order (fbgemm's kernel vs nn.EmbeddingBag)
    assert two["lookup_diff"] < 1e-6 and one["lookup_diff"] < 1e-6
    assert two["table_change"]["attribute"] > 1e-3 and two["table_change"]["id"] > 1e-3
    assert two["frozen_diff"] == 0.0
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=LOSS_RTOL)
    assert "item_tower.attributes.weight" in two["weights"]
    for key, value in one["weights"].items():
        assert two["weights"][key] == pytest.approx(value, rel=WEIGHT_RTOL), key
    # parallel.attribute_table_sharding: the attribute table whole on one rank, the ID table still
    # column-wise, and training the same
    table_wise = run_worker(
        tiny_dataset, str(tmp_path / "tw.json"), 2, "--attributes", "--attribute-sharding", "table_wise"
    )
    assert two["sharding_types"]["attribute"] == "column_wise"
    assert table_wise["sharding_types"]["attribute"] == "table_wise"
    assert table_wise["sharding_types"]["id"] == "column_wise"
    assert table_wise["lookup_diff"] < 1e-6 and table_wise["table_change"]["attribute"] > 1e-3
    np.testing.assert_allclose(table_wise["losses"], one["losses"], rtol=LOSS_RTOL)
    for key, value in one["weights"].items():
        assert table_wise["weights"][key] == pytest.approx(value, rel=WEIGHT_RTOL), key


@pytest.fixture(scope="module")
def one_rank_without_id_table(tiny_dataset, tmp_path_factory) -> dict:
    return run_worker(tiny_dataset, str(tmp_path_factory.mktemp("ref") / "noid.json"), 1, "--no-id-table")


@pytest.mark.parametrize(
    "backend_args", [("--backend", "fsdp2"), ("--backend", "deepspeed")], ids=["fsdp2", "zero2"]
)
def test_gradient_accumulation_equals_one_step_over_the_micro_batches(
    tiny_dataset, one_rank_without_id_table, tmp_path, backend_args
) -> None:
    # two micro-batches of the same rows, no sync on the first: the same mean gradient, the same steps
    # (no ID table here: its fused optimizer steps in every backward, so it does not accumulate)
    accumulated = run_worker(
        tiny_dataset, str(tmp_path / "acc.json"), 2, *backend_args, "--no-id-table", "--grad-accum", "2"
    )
    np.testing.assert_allclose(accumulated["losses"], one_rank_without_id_table["losses"], rtol=LOSS_RTOL)


def test_bf16_autocast_trains_close_to_fp32(tiny_dataset, one_rank, tmp_path) -> None:
    bf16 = run_worker(tiny_dataset, str(tmp_path / "bf16.json"), 1, "--precision", "bf16")
    losses, reference = np.array(bf16["losses"]), np.array(one_rank["losses"])
    assert not np.array_equal(losses, reference)  # the matmuls really ran in bfloat16
    np.testing.assert_allclose(losses, reference, rtol=2e-2)


def test_sampled_softmax_trains_on_two_ranks(tiny_dataset, tmp_path) -> None:
    sampled = run_worker(
        tiny_dataset, str(tmp_path / "sampled.json"), 2, "--loss", "sampled", "--steps", "30"
    )
    losses = np.array(sampled["losses"])
    assert losses[-5:].mean() < losses[:5].mean() - 0.3
    assert sampled["metrics"]["32"]["NDCG@10"] > 0.1  # above chance (10 / 150 items) after 30 steps
