"""slurm/train.sbatch on a real one-node SLURM cluster: a job trains to the end, and a job preempted by a
real signal checkpoints, requeues itself and finishes with the same steps as an uninterrupted job.

What is real: slurmctld, slurmd and munge started by scripts/local_slurm.sh (apt-installed slurm-wlm on
first use; needs root, which CI has); jobs submitted with sbatch, srun, torchrun with a c10d rendezvous and
2 training processes on the tiny dataset; the preemption warning sent by SLURM to the batch shell
(`scancel --signal=USR1 --batch`), the batch shell's `scontrol requeue` and SLURM starting the job again.
Nothing is mocked and the tests never nudge SLURM (no `scontrol release`/`update` of the job). If the
cluster cannot be set up, the tests ERROR with the script's output instead of being skipped.

    .venv/bin/python -m pytest -q tests/slurm          # ~3 min on 2 cores, 1 of it making the dataset
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.checkpoint import COMMIT

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "scripts" / "local_slurm.sh"
TEMPLATE = REPO / "slurm" / "train.sbatch"

# 2 epochs of 25 steps (2 ranks x 4 sequences): long enough to be preempted in the middle, short enough
# that one job takes well under a minute, most of it starting Python and torchrun
TRAINING = [
    "model.nested_sizes=[8,16,32]",
    "train.epochs=2",
    "train.batch_size=4",
    "train.num_threads=1",
    "run.progress_bar=false",
    "run.loggers=[]",
    "data.num_workers=0",
]
JOB_TIMEOUT_S = 240
# states after which a job never runs again (a requeued job passes through REQUEUED and PENDING instead)
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A running one-node cluster (scripts/local_slurm.sh is idempotent: quick when it is up already)."""
    try:
        done = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"scripts/local_slurm.sh did not finish in {e.timeout:.0f} s:\n{e.stdout}\n{e.stderr}", False
        )
    if done.returncode != 0:
        pytest.fail(
            f"scripts/local_slurm.sh failed with code {done.returncode}:\n{done.stdout}\n{done.stderr}",
            pytrace=False,
        )


class Job:
    """One sbatch submission of slurm/train.sbatch with its output under ``root``."""

    def __init__(self, root: Path, dataset: str, name: str, *overrides: str, run_name: str = "") -> None:
        self.root, self.name = root, name
        (root / "logs").mkdir(parents=True, exist_ok=True)  # sbatch does not create the log folder
        self.stop_file = root / f"{name}.stop"
        env = {
            **os.environ,
            "NPROC_PER_NODE": "2",
            "STOP_FILE": str(self.stop_file),
            "PYTHON": sys.executable,
            **({"RUN_NAME": run_name} if run_name else {}),
        }
        command = [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            "--cpus-per-task=2",  # the whole node: both training processes
            f"--output={root}/logs/%x-%j.out",
            str(TEMPLATE),
            f"data.path={dataset}",
            f"run.out_dir={root}",
            *TRAINING,
            *overrides,
        ]
        # from the repository, like a user: the template's default config path is relative to it
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"sbatch failed: {done.stderr}"
        self.id = done.stdout.strip().split(";")[0]
        self.run_dir = root / (run_name or f"{name}-{self.id}")  # the template's default: <job name>-<job id>
        self.checkpoints = self.run_dir / "checkpoints"
        self.log_file = root / "logs" / f"{name}-{self.id}.out"

    def info(self) -> dict[str, str]:
        """``scontrol show job`` as a dict (no slurmdbd here, so sacct has no records)."""
        done = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", self.id], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, f"scontrol show job {self.id}: {done.stderr}"
        return dict(field.split("=", 1) for field in done.stdout.split() if "=" in field)

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def wait(self, until=None, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
        """Poll until the job has ended (or ``until()`` holds); returns the last job info."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if info["JobState"] in FINAL or (until is not None and until()):
                return info
            if time.monotonic() > deadline:
                self.cancel()
                queue = subprocess.run(
                    ["squeue", "-o", "%i %j %T %R"], capture_output=True, text=True, timeout=30
                ).stdout
                pytest.fail(
                    f"job {self.id} still {info['JobState']} (reason {info.get('Reason')}) after "
                    f"{timeout:.0f} s; queue:\n{queue}log:\n{self.log()[-6000:]}"
                )
            time.sleep(0.25)

    def signal_batch_shell(self, name: str) -> None:
        """What SLURM does for --signal=B:<name>@<secs> (a time-limit or preemption warning)."""
        done = subprocess.run(
            ["scancel", f"--signal={name}", "--batch", self.id], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, f"scancel --signal={name} --batch {self.id}: {done.stderr}"

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], capture_output=True, timeout=30)

    def metrics(self) -> dict:
        return json.loads((self.run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: None, tiny_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """A job trained to the end without interruption; the preemption test compares against it. Its
    preemption warning comes too late to matter: after the last step, while the job tests and exports."""
    job = Job(tmp_path_factory.mktemp("slurm"), tiny_dataset, "whole")
    try:
        info = job.wait(until=lambda: re.search(r"rank 0: \d+ steps in", job.log()) is not None)
        assert info["JobState"] == "RUNNING", f"the job ended unexpectedly early:\n{job.log()[-6000:]}"
        job.signal_batch_shell("USR1")
        job.wait()
    finally:
        job.cancel()  # a no-op for an ended job; frees the node for the next test otherwise
    return job


def test_a_job_trains_to_the_end_on_two_processes(uninterrupted: Job) -> None:
    job = uninterrupted
    info = job.info()
    log = job.log()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]
    # the late warning: the trainer had no step left to stop at, so the shell did not requeue
    assert info["Restarts"] == "0"
    assert "SIGUSR1 received" in log and "stop requested" not in log
    assert "training had finished before the stop request took effect: not requeueing" in log
    # the per-job log file, named by --output=%x-%j, with the template's own lines and the trainer's
    assert f"job {job.id} (whole) restart count 0 on 1 node(s)" in log
    assert "2 process(es) per node" in log and "--nproc-per-node=2" in log
    assert f"run.name=whole-{job.id}" in log and "run.resume=auto" in log
    assert "rank 1/2" in log  # torchrun started both processes
    metrics = job.metrics()
    assert len(metrics["train_losses"]) == 50  # 2 epochs of 25 steps
    assert metrics["test"]  # the final test ran
    committed = sorted(p.parent.name for p in job.checkpoints.glob(f"*/{COMMIT}"))
    assert committed and committed[-1] == "step-000000050"
    assert not job.stop_file.exists()


def test_a_preempted_job_checkpoints_requeues_itself_and_resumes(
    uninterrupted: Job, tiny_dataset: str, tmp_path: Path
) -> None:
    job = Job(tmp_path, tiny_dataset, "preempted", "run.checkpoint_every=5", "run.keep_checkpoints=100")
    try:
        # training is under way once the first periodic checkpoint is committed
        info = job.wait(until=lambda: any(job.checkpoints.glob(f"*/{COMMIT}")), timeout=180)
        assert info["JobState"] == "RUNNING", (
            f"the job ended before its first checkpoint:\n{job.log()[-6000:]}"
        )
        job.signal_batch_shell("USR1")  # the preemption warning, to the batch shell only
        info = job.wait()
    finally:
        job.cancel()
    log = job.log()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]

    # the first attempt: the batch shell turned the signal into the stop file, every rank stopped at the
    # same step with a committed checkpoint, and the shell requeued the job
    assert "SIGUSR1 received" in log, log[-6000:]
    stopped = re.search(r"stop requested at step (\d+)", log)
    assert stopped, log[-6000:]
    step = int(stopped.group(1))
    assert 5 <= step < 50  # in the middle of training
    step_dir = job.checkpoints / f"step-{step:09d}"
    assert (step_dir / COMMIT).exists()
    assert f"requeueing job {job.id}" in log

    # the second attempt: the same job id and run name, started again by SLURM, resumed from that checkpoint
    assert info["Restarts"] == "1"
    assert f"job {job.id} (preempted) restart count 1" in log
    assert f"resumed from {step_dir} at step {step}" in log
    assert log.index("stop requested") < log.index("restart count 1") < log.index("resumed from")
    assert not job.stop_file.exists()  # removed before the requeue: the second attempt ran to the end

    # and it finished the same training as the uninterrupted job: every step once, the same losses
    metrics = job.metrics()
    reference = uninterrupted.metrics()
    assert len(metrics["train_losses"]) == len(reference["train_losses"]) == 50
    assert metrics["train_losses"] == reference["train_losses"]
    assert metrics["test"] == reference["test"]


def test_a_cancelled_job_stops_with_a_checkpoint_and_a_new_job_resumes_from_it(
    uninterrupted: Job, tiny_dataset: str, tmp_path: Path
) -> None:
    """`scancel` sends SIGTERM to every process of the job (the batch shell, srun, the torchrun agent, the
    training processes) and SIGKILL KillWait later (10 s on this cluster): every training process stops
    at the next step boundary with a committed checkpoint and frees the run's lease within its grace.
    Before, the workers died at once with nothing saved since the last periodic checkpoint."""
    run = ["run.checkpoint_every=5", "run.keep_checkpoints=100", "run.stop_grace_s=8"]
    job = Job(tmp_path, tiny_dataset, "cancelled", *run)
    try:
        info = job.wait(until=lambda: any(job.checkpoints.glob(f"*/{COMMIT}")), timeout=180)
        assert info["JobState"] == "RUNNING", (
            f"the job ended before its first checkpoint:\n{job.log()[-6000:]}"
        )
        job.cancel()
        info = job.wait()
    finally:
        job.cancel()
    assert info["JobState"] == "CANCELLED", job.log()[-6000:]
    # the trainer's own log (the job's output stream may be cut when srun is signalled)
    trainer_log = (job.run_dir / "train.log").read_text()
    assert "SIGTERM received: stopping at the next step boundary" in trainer_log, trainer_log[-6000:]
    stopped = re.search(r"stop requested at step (\d+): checkpoint saved", trainer_log)
    assert stopped, trainer_log[-6000:]
    step = int(stopped.group(1))
    assert 5 <= step < 50
    step_dir = job.checkpoints / f"step-{step:09d}"
    assert (step_dir / COMMIT).exists()
    assert not (job.run_dir / ".lease").exists()  # a new job may take the run at once
    assert info["Restarts"] == "0"  # a cancel is not requeued

    # a new job under the same run name continues from that checkpoint and ends like the uninterrupted one
    again = Job(tmp_path, tiny_dataset, "again", *run, run_name=job.run_dir.name)
    try:
        info = again.wait()
    finally:
        again.cancel()
    log = again.log()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]
    assert f"resumed from {step_dir} at step {step}" in log
    metrics = again.metrics()
    assert metrics["train_losses"] == uninterrupted.metrics()["train_losses"]
