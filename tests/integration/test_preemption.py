"""SIGTERM keeps the work (trainer/preemption.py): whichever process of a job it reaches first, every
training process stops at the next step boundary with a committed checkpoint, exits cleanly and frees
the run's lease, and ``run.resume=auto`` continues from that checkpoint. Real signals to real processes:
a plain ``fmrl train``; a 2-rank torchrun job whose agent alone gets SIGTERM (it forwards it to the
workers at once); the same job with SIGTERM sent to every one of its processes at once, loader workers
included (what SLURM does on preemption, cancel or time limit; tests/slurm/test_slurm.py does it with
``scancel``). A process that reaches no step boundary within ``run.stop_grace_s`` exits 1 on its own,
saying so, and still frees the lease.

    .venv/bin/python -m pytest -q tests/integration/test_preemption.py
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from trainer.checkpoint import COMMIT
from trainer.config import load_config
from trainer.run_folder import LEASE
from trainer.train import train

# 1 rank x 4 sequences: 50 steps in the epoch (2 ranks: 25), each a few tens of milliseconds
COMMON = [
    "model.nested_sizes=[8,16,32]",
    "train.epochs=1",
    "train.batch_size=4",
    "train.num_threads=1",
    "data.num_workers=0",
    "run.progress_bar=false",
    "run.loggers=[]",
    "run.export=false",
    "run.log_sample_keys=true",
    "run.name=job",
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@contextlib.contextmanager
def job(command: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    """A background job in its own process group; whatever is left of it is killed when the block ends."""
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            for p in [*descendants(process.pid), process]:
                with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                    p.kill()
            process.wait()


def descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


def wait_for_steps(process: subprocess.Popen, keys: Path, steps: int, log_path: Path) -> None:
    """Poll until rank 0 has logged the sample keys of ``steps`` steps (training is under way)."""
    deadline = time.monotonic() + 180
    while not (keys.exists() and len(keys.read_text().splitlines()) >= steps):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {steps} steps (exit code {process.poll()}):\n{log_path.read_text()[-5000:]}")
        time.sleep(0.01)


def ended(process: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> tuple[int, str, float]:
    """Exit code, output and seconds it took the job to end."""
    started = time.monotonic()
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {timeout:.0f} s after SIGTERM:\n{log_path.read_text()[-5000:]}")
    return code, log_path.read_text(errors="replace"), time.monotonic() - started


def stopped_with_a_checkpoint(run_dir: Path, output: str, total_steps: int) -> int:
    """The step the job stopped at: in the middle, committed, the lease gone. Returns it."""
    stops = re.findall(r"stop requested at step (\d+): checkpoint saved", output)
    assert stops, output[-5000:]
    step = int(stops[0])
    assert 3 <= step < total_steps, output[-5000:]
    assert (run_dir / "checkpoints" / f"step-{step:09d}" / COMMIT).exists()
    assert not (run_dir / LEASE).exists(), "the run's lease was left behind"
    assert not (run_dir / "metrics.json").exists()  # it stopped: no final test
    return step


def resumed(tmp_path: Path, dataset: str, step: int, caplog) -> None:
    """run.resume=auto (one process, in this one) continues from ``step`` and trains to the end."""
    caplog.set_level("INFO", logger="fmrl")
    result = train(
        load_config(None, [*COMMON, f"data.path={dataset}", f"run.out_dir={tmp_path}", "run.resume=auto"])
    )
    assert f"checkpoints/step-{step:09d} at step {step}" in caplog.text
    assert not result.stopped and result.test_metrics


def test_sigterm_to_fmrl_train_checkpoints_at_a_step_boundary_exits_0_and_resumes(
    tmp_path, tiny_dataset, caplog
) -> None:
    log_path = tmp_path / "train.out"
    command = [sys.executable, "-m", "trainer.cli", "train", *COMMON]
    with job([*command, f"data.path={tiny_dataset}", f"run.out_dir={tmp_path}"], log_path) as process:
        wait_for_steps(process, tmp_path / "job" / "sample_keys.rank0.txt", 3, log_path)
        process.send_signal(signal.SIGTERM)
        code, output, took = ended(process, log_path)
    assert code == 0, output[-5000:]  # before: 143, killed at once, nothing saved
    assert "SIGTERM received: stopping at the next step boundary with a checkpoint" in output
    assert took < 20  # within run.stop_grace_s
    step = stopped_with_a_checkpoint(tmp_path / "job", output, 50)
    resumed(tmp_path, tiny_dataset, step, caplog)


def torchrun_job(tmp_path: Path, dataset: str, *overrides: str) -> list[str]:
    return [
        *TORCHRUN,
        "-m",
        "trainer.cli",
        "train",
        *COMMON,
        f"data.path={dataset}",
        f"run.out_dir={tmp_path}",
        *overrides,
    ]


def test_sigterm_to_the_torchrun_agent_alone_stops_every_worker_with_a_checkpoint(
    tmp_path, tiny_dataset
) -> None:
    """The agent forwards SIGTERM to its workers at once and SIGKILLs them 30 s later (torch 2.13's
    --shutdown-timeout): they stop at the next step boundary with a checkpoint, long before that."""
    log_path = tmp_path / "torchrun.out"
    with job(torchrun_job(tmp_path, tiny_dataset), log_path) as agent:
        wait_for_steps(agent, tmp_path / "job" / "sample_keys.rank0.txt", 3, log_path)
        agent.send_signal(signal.SIGTERM)
        code, output, took = ended(agent, log_path)
    stopped_with_a_checkpoint(tmp_path / "job", output, 25)
    assert "Unable to shutdown process" not in output  # the workers ended on their own, not SIGKILLed
    assert took < 20, output[-5000:]
    # torchrun itself re-raises its SignalException after the workers ended: exit code 1 (documented)
    assert code == 1, output[-5000:]


def test_sigterm_to_every_process_of_a_job_stops_it_with_a_checkpoint_and_resumes(
    tmp_path, tiny_dataset, caplog
) -> None:
    """What SLURM does on preemption, cancel or time limit: SIGTERM to every process of the job at once
    (the agent, both training processes and their data loader workers)."""
    log_path = tmp_path / "torchrun.out"
    with job(torchrun_job(tmp_path, tiny_dataset, "data.num_workers=1"), log_path) as agent:
        wait_for_steps(agent, tmp_path / "job" / "sample_keys.rank0.txt", 3, log_path)
        everyone = [psutil.Process(agent.pid), *descendants(agent.pid)]
        assert len(everyone) >= 5  # the agent, 2 trainers, their loader workers
        for process in everyone:
            process.send_signal(signal.SIGTERM)
        code, output, took = ended(agent, log_path)
    assert "DataLoader worker" not in output, output[-5000:]  # loader workers outlive SIGTERM
    step = stopped_with_a_checkpoint(tmp_path / "job", output, 25)
    assert took < 20 and code == 1, output[-5000:]
    resumed(tmp_path, tiny_dataset, step, caplog)


GRACE_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time

    from trainer.logs import configure_logging
    from trainer.preemption import StopRequest

    configure_logging()
    marks = sys.argv[1]
    with StopRequest(grace_s=0.5) as stop:
        stop.on_grace_expired(lambda: open(os.path.join(marks, "released"), "w").close())
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.local()  # the handler only asked for a stop
        if sys.argv[2] == "stuck":
            time.sleep(60)  # no step boundary: a step, a validation or a test slower than the grace
        stop.stopped()  # the stop checkpoint committed in time
        time.sleep(1.0)  # past the grace: it must not fire now
    print("left normally")
    """
)


@pytest.mark.parametrize("mode", ["stuck", "in-time"])
def test_a_process_that_reaches_no_step_boundary_within_the_grace_exits_1_and_frees_the_lease(
    tmp_path, mode
) -> None:
    script = tmp_path / "grace.py"
    script.write_text(GRACE_SCRIPT)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), mode], capture_output=True, text=True, timeout=60
    )
    took = time.monotonic() - started
    if mode == "stuck":
        assert done.returncode == 1, done.stderr
        assert "no step boundary was reached within run.stop_grace_s" in done.stderr
        assert (tmp_path / "released").exists()  # the lease release ran before the exit
        assert took < 30  # not the 60 s of the stuck step
    else:
        assert done.returncode == 0 and "left normally" in done.stdout, done.stderr
        assert not (tmp_path / "released").exists()
