"""Logs: the project's line format whatever libraries do to the root logger, the known library noise
filtered (and nothing else), the run's log file (appended on resume, with a failing run's traceback),
the progress bars (train.max_steps, evaluation)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from trainer.config import load_config
from trainer.train import train

TINY = [
    "data.num_workers=0",
    "model.nested_sizes=[8,16,32]",
    "train.epochs=1",
    "train.batch_size=32",
    "optim.warmup_steps=2",
    "train.num_threads=1",
    "eval.batch_size=64",
    "run.progress_bar=false",
    "run.loggers=[]",
    "run.export=false",
]
LINE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
# what TorchRec and torch print on every run without trainer/logs.py's filters
NOISE = (
    "The topology was constructed directly",
    "HeuristicalStorageReservation is known to cause issues",
    "There is a known issue with TorchRec's dense tensor size calculation",
    "is_fx_tracing will return true",
    "`broadcast_buffers` is deprecated",
    "Please use DTensor instead",
)

# Libraries that configure the root logger on import (fbgemm_gpu calls logging.basicConfig()): imported
# before and after the set-up, then one line of ours, each filtered message through its real logger or
# the warnings module, and messages of the same loggers that must still show.
_SCRIPT = """
import logging, warnings
import fbgemm_gpu, torchrec
from trainer.logs import configure_logging
configure_logging()
import deepspeed
assert logging.getLogger().handlers, "the libraries did configure the root logger"
logging.getLogger("fmrl").info("a line of ours")
logging.getLogger("fmrl").debug("a debug line of ours")
logging.getLogger("torchrec.distributed.planner.types").warning(
    "The topology was constructed directly rather than via TopologyFactory.create_topology().")
logging.getLogger("torchrec.distributed.planner.types").warning("another planner warning")
logging.getLogger("torchrec.distributed.planner.storage_reservations").warning(
    "There is a known issue with TorchRec's dense tensor size calculation in dry run scenarios")
logging.getLogger("torch.fx._symbolic_trace").warning(
    "is_fx_tracing will return true for both fx.symbolic_trace and torch.export. Please use ...")
warnings.warn("HeuristicalStorageReservation is known to cause issues, particularly ...", FutureWarning)
warnings.warn("`broadcast_buffers` is deprecated. Use `forward_sync_buffers` instead.", FutureWarning)
warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning)
warnings.warn("Both `broadcast_buffers` and `forward_sync_buffers` were specified.", FutureWarning)
"""


@pytest.mark.parametrize("world", [1, 2])
def test_our_format_survives_libraries_that_configure_the_root_logger(world: int) -> None:
    env = {**os.environ, "WORLD_SIZE": str(world), "RANK": str(world - 1), "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stderr.splitlines()
    rank = "[rank 1] " if world == 2 else ""
    ours = [line for line in lines if "a line of ours" in line]
    assert len(ours) == 1 and re.fullmatch(LINE + re.escape(rank + "a line of ours"), ours[0]), lines
    assert not any("INFO:fmrl" in line or "debug line" in line for line in lines)  # INFO on the terminal
    for message in NOISE:
        assert not any(message in line for line in lines), message
    # the filters are narrow: other messages of the same loggers and categories still show
    assert any("another planner warning" in line for line in lines)
    assert any("Both `broadcast_buffers` and `forward_sync_buffers`" in line for line in lines)


def test_a_torchrun_job_logs_in_our_format_without_the_noise_and_keeps_log_files(
    tmp_path, tiny_dataset
) -> None:
    """A real 2-rank run (DDP, so that DistributedDataParallel is built too) from the command line."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "trainer.cli",
        "train",
        *TINY,
        f"data.path={tiny_dataset}",
        f"run.out_dir={tmp_path}",
        "run.name=job",
        "parallel.backend=ddp",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    lines = done.stderr.splitlines()
    for message in NOISE:
        assert not any(message in line for line in lines), message
    for rank in (0, 1):
        started = [line for line in lines if f"rank {rank}/2 on cpu" in line]
        assert len(started) == 1 and re.match(LINE + re.escape(f"[rank {rank}] rank {rank}/2"), started[0])
    assert not any("INFO:fmrl" in line for line in lines)
    run_dir = tmp_path / "job"
    main_log = (run_dir / "train.log").read_text()
    assert re.search(r"DEBUG \[rank 0\] command line: .*train", main_log)  # DEBUG goes to the file
    assert "[rank 0] epoch 1: loss" in main_log
    assert "[rank 1] rank 1/2 on cpu" in (run_dir / "train-rank1.log").read_text()


def test_the_log_file_is_appended_on_resume_and_keeps_a_failing_run_s_traceback(
    tmp_path, tiny_dataset
) -> None:
    def config(*extra: str):
        return load_config(
            None, [*TINY, f"data.path={tiny_dataset}", f"run.out_dir={tmp_path}", "run.name=r", *extra]
        )

    assert train(config("run.stop_after_steps=3")).stopped
    log_file = tmp_path / "r" / "train.log"
    first = log_file.read_text()
    assert "run.stop_after_steps reached at step 3" in first
    train(config("run.resume=auto"))
    second = log_file.read_text()
    assert second.startswith(first) and "resumed from" in second[len(first) :]

    # a job that fails once the run folder is known: the traceback is in its log file
    with pytest.raises(Exception) as failure:
        train(config("run.resume=auto", f"data.path={tmp_path / 'no-such-dataset'}"))
    third = log_file.read_text()
    assert third.startswith(second)
    assert "Traceback (most recent call last)" in third[len(second) :]
    assert str(failure.value).splitlines()[0] in third


def test_progress_bars_follow_max_steps_and_show_evaluation(tmp_path, tiny_dataset, capsys) -> None:
    overrides = [*TINY, f"data.path={tiny_dataset}", f"run.out_dir={tmp_path}", "train.max_steps=3"]
    result = train(load_config(None, [*overrides, "run.name=bar", "run.progress_bar=true"]))
    assert result.steps == 3
    err = capsys.readouterr().err
    assert re.search(r"epoch 1: +0%\|[^|]*\| 0/3 ", err), err  # an epoch is 7 steps; the run has 3
    assert re.search(r"valid: +0%\|[^|]*\| 0/\d+ ", err) and re.search(r"test: +0%\|[^|]*\| 0/\d+ ", err)

    train(load_config(None, [*overrides, "run.name=quiet"]))  # run.progress_bar=false
    assert "valid:" not in capsys.readouterr().err
