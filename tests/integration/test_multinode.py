"""Multi-node training without SLURM: two torchrun agents on this machine form one elastic job through a
c10d rendezvous (``--nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d``), as two cluster nodes would.

* both agents train and checkpoint to the end, with exactly the metrics of a ``--standalone
  --nproc_per_node=2`` run: the same world size gives the same global ranks, data shards, table plan and
  gloo collectives, so the losses are equal bit for bit, not just close;
* one node dies (its agent and its worker killed with SIGKILL) after a checkpoint was committed, and a
  replacement agent is started with the same arguments, as a cluster's node restart does: the job
  re-rendezvous, both workers restart, resume from the newest complete checkpoint and finish with the
  uninterrupted run's losses and metrics.

What a replaced node needs (found with torch 2.13; details at AGENT_ENV below):
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` on every agent. With torchrun's default (the workers share the
agent's TCPStore) a replacement agent can never rejoin: both agents fail after 60 s. And a node's death
is its agent *and* its workers: torchrun starts each worker in a session of its own, so killing the
agent's process group leaves the worker training on (the job then finishes without the "dead" node).

    .venv/bin/python -m pytest -q tests/integration/test_multinode.py
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from trainer.checkpoint import COMMIT

# 2 ranks, 4 sequences per rank and step: 25 steps in the epoch (200 users). A checkpoint every 4 steps:
# the first is committed a few seconds into training, the kill lands well before the end.
SETTINGS = [
    "model.nested_sizes=[8,16,32]",
    "model.use_id_embedding=true",  # a TorchRec table with fused optimizer state on both ranks
    "train.num_threads=1",
    "train.batch_size=4",
    "train.epochs=1",
    "data.num_workers=0",
    "run.progress_bar=false",
    "run.loggers=[]",
    "run.export=false",
    "run.log_sample_keys=true",
    "run.checkpoint_every=4",
    "run.resume=auto",
]
STEPS = 25

# The environment of every agent of a multi-node job, and why:
#
# torchrun's default shares the rendezvous TCPStore with the workers (TORCHELASTIC_USE_AGENT_STORE=True):
# the node of rank 0 in the *first* round starts a store server and every agent keeps the address it got
# in that round for good. A replacement agent has none, so in the new round it waits for the store address
# under the new round's key, which the survivor (who already has one) never writes: both agents fail after
# the rendezvous read timeout (60 s), ``DistStoreError: wait timeout ... keys:
# /torch.rendezvous.<id>.1/MASTER_ADDR`` on the replacement and ``.../torchelastic/role_info/1`` on the
# survivor (both exit 1). Even past that, the two nodes' workers would not meet: the survivor's restarted
# worker has TORCHELASTIC_RESTART_COUNT=1, the replacement's 0 (a new agent starts counting at 0), and
# trainer/dist.py keeps each attempt's keys in the shared store under ``attempt-<restart count>``.
#
# With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 each rendezvous round hands out a fresh MASTER_ADDR/PORT (a
# free port on the new round's rank-0 node), global rank 0's worker hosts a new TCPStore there,
# TORCHELASTIC_USE_AGENT_STORE is False and trainer/dist.py uses the plain env:// initialisation: the
# restart counts no longer matter. (The default stays fine where all agents restart together, e.g. the one
# node of test_checkpoint_faults: the same store, the same restart count on every worker.)
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "LOGLEVEL": "INFO"}  # INFO: rendezvous results


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def sample_keys(run_dir: Path, rank: int) -> str:
    return (run_dir / f"sample_keys.rank{rank}.txt").read_text()


def standalone(run_dir: Path, dataset: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    overrides = [f"data.path={dataset}", f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}"]
    done = subprocess.run(
        [*command, "-m", "trainer.cli", "train", *SETTINGS, *overrides],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    return done


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dataset) -> Path:
    """The uninterrupted single-node run that both tests compare with."""
    run_dir = tmp_path_factory.mktemp("reference") / "standalone"
    standalone(run_dir, tiny_dataset)
    assert metrics(run_dir)["steps"] == STEPS
    return run_dir


class Job:
    """Agents of one elastic job (each ``torchrun --nnodes=2 --nproc-per-node=1``), started one by one
    with the same arguments; everything they started is killed when the job is closed."""

    def __init__(self, tmp_path: Path, dataset: str, name: str) -> None:
        self.tmp_path = tmp_path
        self.run_dir = tmp_path / name
        self.rdzv_id = f"fmrl-{uuid.uuid4().hex[:8]}"
        self.endpoint = f"127.0.0.1:{free_port()}"
        self.command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.rdzv_id}",
            "--max-restarts=1",
            "--monitor-interval=0.2",
            "-m",
            "trainer.cli",
            "train",
            *SETTINGS,
            f"data.path={dataset}",
            f"run.out_dir={tmp_path}",
            f"run.name={name}",
        ]
        self.agents: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start_agent(self) -> subprocess.Popen:
        log = self.tmp_path / f"agent{len(self.agents)}.log"
        with open(log, "wb") as out:
            agent = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **AGENT_ENV},
            )
        self.agents.append(agent)
        self.logs.append(log)
        return agent

    def start_store_host(self) -> subprocess.Popen:
        """The first agent, started alone until it listens on the endpoint: it hosts the c10d rendezvous
        store (an agent that finds the port taken becomes a client; which one wins is a race otherwise)."""
        agent = self.start_agent()
        port = int(self.endpoint.rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while not any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == port
            for c in psutil.Process(agent.pid).net_connections(kind="tcp")
        ):
            if agent.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the first agent never listened on {self.endpoint}:\n{self.output(0)[-5000:]}")
            time.sleep(0.05)
        return agent

    def output(self, index: int) -> str:
        return self.logs[index].read_text(errors="replace")

    def wait(self, index: int, timeout: float = 240.0) -> str:
        agent = self.agents[index]
        try:
            code = agent.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            pytest.fail(f"agent {index} did not finish within {timeout:.0f} s:\n{self.output(index)[-5000:]}")
        output = self.output(index)
        assert code == 0, f"agent {index} exited with {code}:\n{output[-5000:]}"
        return output

    def workers(self, agent: subprocess.Popen) -> dict[int, psutil.Process]:
        """The trainer processes that ``agent`` started, by their global RANK."""
        found = {}
        for child in psutil.Process(agent.pid).children(recursive=True):
            try:
                env = child.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if env.get("TORCHELASTIC_RUN_ID") == self.rdzv_id and "RANK" in env:
                found[int(env["RANK"])] = child
        return found

    def close(self) -> None:
        """SIGKILL every agent and every worker of this job. Not by process group: torchrun starts each
        worker in a session of its own, so killing an agent's group leaves its workers running."""
        doomed = [a.pid for a in self.agents if a.poll() is None]
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.environ().get("TORCHELASTIC_RUN_ID") == self.rdzv_id:
                    doomed.append(process.pid)
        for pid in doomed:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        for agent in self.agents:
            agent.wait()


@contextlib.contextmanager
def elastic_job(tmp_path: Path, dataset: str, name: str) -> Iterator[Job]:
    job = Job(tmp_path, dataset, name)
    try:
        yield job
    finally:
        job.close()


def committed_steps(checkpoint_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("step-")) for p in checkpoint_dir.glob(f"step-*/{COMMIT}"))


def rendezvous_results(output: str) -> list[tuple[int, int]]:
    """(restart_count, group_rank) of each rendezvous an agent completed, from its INFO log."""
    counts = [int(c) for c in re.findall(r"\]\s+restart_count=(\d+)", output)]
    ranks = [int(r) for r in re.findall(r"\]\s+group_rank=(\d+)", output)]
    return list(zip(counts, ranks, strict=True))


def test_two_agents_train_to_the_end_like_a_standalone_run(tmp_path, tiny_dataset, reference) -> None:
    with elastic_job(tmp_path, tiny_dataset, "two-nodes") as job:
        job.start_store_host()
        job.start_agent()
        outputs = [job.wait(0), job.wait(1)]

    # one rendezvous each, one node rank each, no restart
    results = [rendezvous_results(output) for output in outputs]
    assert sorted(r[0] for r in results) == [(0, 0), (0, 1)], results
    # the node of global rank 0 writes the report; both checkpoint (each its own shard files)
    rank0 = 0 if results[0][0][1] == 0 else 1
    assert "run directory:" in outputs[rank0] and "run directory:" not in outputs[1 - rank0]
    assert committed_steps(job.run_dir / "checkpoints")[-1] == STEPS

    two_nodes, one_node = metrics(job.run_dir), metrics(reference)
    assert two_nodes["steps"] == STEPS
    # equal, not close: same world size, same ranks, same collectives in the same order
    assert two_nodes["train_losses"] == one_node["train_losses"]
    assert two_nodes["test"] == one_node["test"] and two_nodes["valid"] == one_node["valid"]
    for rank in range(2):
        assert sample_keys(job.run_dir, rank) == sample_keys(reference, rank)


def test_a_replaced_node_rejoins_and_the_job_resumes_exactly(tmp_path, tiny_dataset, reference) -> None:
    checkpoints = tmp_path / "replaced" / "checkpoints"
    with elastic_job(tmp_path, tiny_dataset, "replaced") as job:
        host = job.start_store_host()  # must survive: the job's rendezvous state lives in its store
        doomed = job.start_agent()
        deadline = time.monotonic() + 180
        while not (first_commit := committed_steps(checkpoints)):
            if host.poll() is not None or doomed.poll() is not None:
                pytest.fail(f"an agent ended before the first checkpoint:\n{job.output(0)[-5000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no committed checkpoint after 180 s:\n{job.output(0)[-5000:]}")
            time.sleep(0.05)
        # the node goes down: its agent and its worker at once (the worker is in a session of its own)
        victims = [psutil.Process(doomed.pid), *job.workers(doomed).values()]
        assert len(victims) == 2, f"expected the agent and 1 worker, found {victims}"
        for victim in victims:
            victim.kill()
        doomed.wait()
        assert not (job.run_dir / "metrics.json").exists(), "the run ended before the kill: it proves nothing"
        # the cluster restarts the node: a new agent with the same arguments
        job.start_agent()
        outputs = [job.wait(0), job.wait(2)]

    survivor, replacement = (rendezvous_results(output) for output in outputs)
    # the survivor's workers failed on the dead peer's connection and torchrun restarted them (its one
    # restart); the replacement agent joined that second round as a first attempt: the restart counts of
    # one job's workers differ, which is why the shared agent store cannot be used (see AGENT_ENV)
    assert [count for count, _ in survivor] == [0, 1], survivor
    assert [count for count, _ in replacement] == [0], replacement
    assert "Worker group FAILED. 1/1 attempts left; will restart worker group" in outputs[0]

    # one resume, by the second round's global rank 0, from a committed checkpoint before the end
    resumes = [m for output in outputs for m in re.findall(r"resumed from (\S+) at step (\d+)", output)]
    assert len(resumes) == 1, resumes
    resumed_step = int(resumes[0][1])
    assert resumes[0][0] == str(checkpoints / f"step-{resumed_step:09d}")
    assert first_commit[-1] <= resumed_step < STEPS

    replaced, whole = metrics(job.run_dir), metrics(reference)
    assert replaced["steps"] == STEPS
    assert replaced["train_losses"] == whole["train_losses"]
    assert replaced["test"] == whole["test"] and replaced["valid"] == whole["valid"]
    for rank in range(2):
        # appended to: the killed attempt's lines first, then exactly the reference's from the resume point
        whole_keys = sample_keys(reference, rank).splitlines(True)
        assert len(whole_keys) == STEPS
        assert sample_keys(job.run_dir, rank).endswith("".join(whole_keys[resumed_step:]))
