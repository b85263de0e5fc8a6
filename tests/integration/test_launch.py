"""``fmrl launch`` (trainer/launch.py) and ``accelerate launch`` as launchers of ``fmrl train``: the
commands a dry run prints, a real 2-process run through each, and the exit code of a failed run.

    .venv/bin/python -m pytest -q tests/integration/test_launch.py
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import main

BIN = Path(sys.executable).parent
SMALL = [
    "model.nested_sizes=[8,16,32]",
    "train.epochs=1",
    "train.batch_size=16",
    "train.num_threads=1",
    "run.progress_bar=false",
    "run.loggers=[]",
    "data.num_workers=0",
    "run.export=false",
]


def dry_run(capsys, *arguments: str) -> list[str]:
    assert main(["launch", "--dry-run", *arguments]) == 0
    return capsys.readouterr().out.splitlines()


def test_a_dry_run_prints_the_torchrun_and_sbatch_commands_of_one_node(capsys) -> None:
    lines = dry_run(capsys, "--nproc", "3", "--config", "configs/demo.yaml", "train.epochs=1", "run.name=a b")
    assert lines[0] == "torchrun (3 process(es) on this machine):"
    torchrun = shlex.split(lines[1])
    assert torchrun == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=3",
        "-m",
        "trainer.cli",
        "train",
        "--config",
        "configs/demo.yaml",
        "train.epochs=1",
        "run.name=a b",  # quoted so that the printed line can be pasted into a shell
    ]
    assert lines[2] == "sbatch (slurm/train.sbatch):"
    # slurm/train.sbatch: CONFIG and NPROC_PER_NODE from the environment, overrides after the script
    assert lines[3].strip() == (
        "mkdir -p runs/slurm && CONFIG=configs/demo.yaml NPROC_PER_NODE=3 "
        "sbatch --nodes=1 slurm/train.sbatch train.epochs=1 'run.name=a b'"
    )
    assert len(lines) == 4


def test_a_dry_run_of_several_nodes_uses_a_c10d_rendezvous_with_a_fresh_store_per_round(capsys) -> None:
    lines = dry_run(
        capsys,
        *("--nnodes", "4", "--nproc", "8", "--rdzv-endpoint", "node1:29400", "--rdzv-id", "job7"),
        *("--max-restarts", "2", "--config", "configs/beauty.yaml", "optim.lr=1e-3"),
    )
    assert lines[0] == "torchrun (8 process(es) on each of the 4 nodes):"
    assert shlex.split(lines[1]) == [
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
        sys.executable,
        *("-m", "torch.distributed.run", "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d"),
        *("--rdzv-endpoint=node1:29400", "--rdzv-id=job7", "--max-restarts=2"),
        *("-m", "trainer.cli", "train", "--config", "configs/beauty.yaml", "optim.lr=1e-3"),
    ]
    assert lines[3].strip() == (
        "mkdir -p runs/slurm && CONFIG=configs/beauty.yaml NPROC_PER_NODE=8 MAX_RESTARTS=2 "
        "sbatch --nodes=4 slurm/train.sbatch optim.lr=1e-3"
    )


def test_the_default_process_count_and_usage_errors(capsys) -> None:
    import torch

    lines = dry_run(capsys, "train.epochs=1")
    expected = torch.cuda.device_count() if torch.cuda.is_available() else min(2, os.cpu_count() or 1)
    assert lines[0] == f"torchrun ({expected} process(es) on this machine):"
    assert "--config" not in lines[1] and "configs/demo.yaml" in lines[4]  # the template's default config
    # nothing is started for a command that cannot work
    assert main(["launch", "--dry-run", "--nnodes", "2", "train.epochs=1"]) == 2
    assert "--rdzv-endpoint" in capsys.readouterr().err
    assert main(["launch", "--dry-run", "train.epochs=1", "train.no_such_key=1"]) == 2
    assert "unknown key 'train.no_such_key'" in capsys.readouterr().err


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_fmrl_launch_trains_on_two_processes(tmp_path, tiny_dataset) -> None:
    data = [f"data.path={tiny_dataset}", f"run.out_dir={tmp_path}", "run.name=launched"]
    done = run([str(BIN / "fmrl"), "launch", "--nproc", "2", "--config", "configs/demo.yaml", *SMALL, *data])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.startswith("torchrun (2 process(es) on this machine):\n")
    assert "--standalone --nproc-per-node=2 -m trainer.cli train --config configs/demo.yaml" in done.stdout
    assert "rank 0/2 on cpu" in done.stderr and "rank 1/2 on cpu" in done.stderr
    metrics = json.loads((tmp_path / "launched" / "metrics.json").read_text())
    assert metrics["steps"] == 7 and metrics["test"]  # 200 users, 2 ranks x 16 per step


def test_fmrl_launch_forwards_the_exit_code_of_a_failed_run(tmp_path) -> None:
    done = run(
        [str(BIN / "fmrl"), "launch", "--nproc", "2", *SMALL, f"data.path={tmp_path}/missing"], timeout=180
    )
    assert done.returncode == 1, done.stderr[-5000:]  # torchrun's code when a worker failed
    assert "ChildFailedError" in done.stderr


def test_accelerate_launch_with_the_config_file_trains_on_two_processes(tmp_path, tiny_dataset) -> None:
    config = Path(__file__).parents[2] / "configs" / "accelerate" / "cpu-2proc.yaml"
    command = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "-m", "trainer.cli", "train"]
    data = [f"data.path={tiny_dataset}", f"run.out_dir={tmp_path}", "run.name=accelerated"]
    done = run([*command, "--config", "configs/demo.yaml", *SMALL, *data])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "rank 0/2 on cpu" in done.stderr and "rank 1/2 on cpu" in done.stderr
    assert "rank 1: 7 steps" in done.stderr
    metrics = json.loads((tmp_path / "accelerated" / "metrics.json").read_text())
    assert metrics["steps"] == 7 and metrics["test"]


@pytest.fixture(autouse=True)
def _repository_root(monkeypatch) -> None:
    # configs/demo.yaml and the printed paths are relative to the repository
    monkeypatch.chdir(Path(__file__).parents[2])
