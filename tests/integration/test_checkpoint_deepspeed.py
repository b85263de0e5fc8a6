"""DCP checkpoints of the DeepSpeed dense backend, on real gloo ranks.

One torchrun job of 2 ranks (tests/integration/deepspeed_checkpoint_worker.py) trains 6 steps with ZeRO-1,
ZeRO-2 and ZeRO-3 each, saving a checkpoint after step 3, then builds a fresh model, loads it and trains
steps 4..6: the losses and weights must equal the uninterrupted run's bit for bit. The checkpoint holds
the dense state unpartitioned, so a single process (another world size) loads the same full weights and
Adam state from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "deepspeed_checkpoint_worker.py")
STAGES = ("1", "2", "3")


def run_worker(ranks: int, *args: str) -> dict:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    done = subprocess.run(
        [sys.executable, *(launcher if ranks > 1 else []), WORKER, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out = args[args.index("--out") + 1]
    with open(out) as f:
        return json.load(f)


def tensors(out: str, stage: str) -> dict:
    return torch.load(f"{out}.{stage}.pt", weights_only=True)


def assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def two_ranks(tiny_dataset, tmp_path_factory) -> tuple[dict, str, str]:
    """The 2-rank job: (its results, its --out path, the checkpoint root)."""
    folder = tmp_path_factory.mktemp("deepspeed_checkpoints")
    out, checkpoints = str(folder / "two.json"), str(folder / "checkpoints")
    common = ["--dataset", tiny_dataset, "--checkpoints", checkpoints, "--out", out]
    return run_worker(2, *common, "--zero-stages", *STAGES), out, checkpoints


@pytest.mark.parametrize("stage", STAGES)
def test_resume_continues_exactly(two_ranks, stage) -> None:
    results, out, _ = two_ranks
    assert results["world_size"] == 2
    losses, saved = results["stages"][stage]["losses"], tensors(out, stage)
    assert results["stages"][stage]["first_step"] == 3 and len(losses["uninterrupted"]) == 6
    assert losses["resumed"] == losses["uninterrupted"][3:]
    # what was loaded is what was saved: weights, fp32 masters, exp_avg, exp_avg_sq, steps, hyperparameters
    assert_equal(saved["loaded"], saved["saved"])
    assert any(k.endswith(".exp_avg_sq") for k in saved["saved"])
    assert float(saved["saved"]["dense_optimizer.state.projector.weight.step"]) == 3.0
    # the gathered weights (dense and the ID table) at the end agree
    assert_equal(saved["resumed"], saved["uninterrupted"])


def test_another_world_size_loads_the_full_state(tiny_dataset, two_ranks, tmp_path) -> None:
    """Saved by 2 ranks, loaded by 1: DCP reads the unpartitioned tensors, and cutting them into this
    world size's partitions and gathering them again gives back exactly what was saved."""
    _, two_out, checkpoints = two_ranks
    out = str(tmp_path / "one.json")
    stages = ("2", "3")
    one = run_worker(
        1,
        *("--dataset", tiny_dataset, "--checkpoints", checkpoints, "--out", out),
        *("--load-only", "--zero-stages", *stages),
    )
    assert one["world_size"] == 1
    for stage in stages:
        assert one["stages"][stage]["first_step"] == 3
        assert_equal(tensors(out, stage)["loaded"], tensors(two_out, stage)["saved"])
