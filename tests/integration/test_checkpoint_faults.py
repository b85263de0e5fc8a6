"""Sharded checkpoints under real faults, with real processes and servers (no mocks):

* a worker killed with SIGKILL under ``torchrun --max-restarts=1``: torchrun restarts the workers, they
  resume from the newest complete checkpoint by themselves and finish exactly like an uninterrupted run;
* object storage that goes away in the middle of a save: a TCP proxy between the trainer and the moto
  S3 server is cut while a checkpoint is being uploaded; the save fails naming the checkpoint, leaves no
  commit marker, and the previous checkpoint stays the latest and loads (in-process and end to end);
* damaged checkpoint files (a truncated, deleted or bit-flipped shard, a corrupted ``.metadata``) are
  detected by ``CheckpointManager.load``, which names the damaged file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from data_pipeline.storage import StorageError, StorageOptions
from trainer.checkpoint import COMMIT, CheckpointError, CheckpointManager
from trainer.config import load_config
from trainer.dist import distributed
from trainer.train import train

COMMON = [
    "model.nested_sizes=[8,16,32]",
    "model.use_id_embedding=true",
    "train.num_threads=1",
    "data.num_workers=0",
    "run.progress_bar=false",
    "run.loggers=[]",
    "run.export=false",
    "run.log_sample_keys=true",
]

# --- 1. kill -9 of a worker under torchrun ------------------------------------------------------------

# 2 ranks, 4 sequences per rank and step: 25 steps in the epoch (200 users). A checkpoint every 8 steps:
# the first is committed about 2 s into training, and some 5 s of training and the evaluations follow.
KILL_RUN = ["train.batch_size=4", "train.epochs=1", "run.checkpoint_every=8", "run.resume=auto"]
KILL_RUN_STEPS = 25


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@contextlib.contextmanager
def background_job(log_path: Path, *command: str) -> Iterator[subprocess.Popen]:
    """``command`` in the background, in its own process group; whatever is left of it is killed when
    the block ends."""
    with open(log_path, "wb") as log_file:
        job = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield job
        finally:
            if job.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job.pid, signal.SIGKILL)
                job.wait()


# torchrun's default: the workers share the agent's rendezvous store, which outlives the restart;
# trainer/dist.py keeps each attempt's keys apart (pytorch/pytorch#135712), and this test covers it
def torchrun_job(log_path: Path, *overrides: str) -> contextlib.AbstractContextManager[subprocess.Popen]:
    """``torchrun --max-restarts=1 ... fmrl train`` in the background (see :func:`background_job`)."""
    restarts = ["--max-restarts=1", "--monitor-interval=0.2"]
    return background_job(log_path, *TORCHRUN, *restarts, "-m", "trainer.cli", "train", *COMMON, *overrides)


def wait_for_exit(job: subprocess.Popen, log_path: Path, timeout: float = 240.0) -> str:
    """Wait for the job, assert it exited 0, and return its combined output."""
    try:
        code = job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish within {timeout:.0f} s:\n{log_path.read_text()[-5000:]}")
    output = log_path.read_text(errors="replace")
    assert code == 0, f"torchrun exited with {code}:\n{output[-5000:]}"
    return output


def committed_steps(checkpoint_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("step-")) for p in checkpoint_dir.glob(f"step-*/{COMMIT}"))


def wait_for_first_commit(job: subprocess.Popen, checkpoint_dir: Path, log_path: Path) -> int:
    """Poll until a committed checkpoint exists; fail loudly if the job ends first."""
    deadline = time.monotonic() + 180
    while not (steps := committed_steps(checkpoint_dir)):
        if job.poll() is not None:
            pytest.fail(f"torchrun ended (code {job.returncode}) before any checkpoint was committed")
        if time.monotonic() > deadline:
            pytest.fail(f"no committed checkpoint after 180 s:\n{log_path.read_text()[-5000:]}")
        time.sleep(0.05)
    return steps[-1]


def torchrun_workers(agent_pid: int) -> dict[int, psutil.Process]:
    """The trainer processes that the torchrun agent started, by their RANK."""
    workers = {}
    for child in psutil.Process(agent_pid).children(recursive=True):
        try:
            env, cmdline = child.environ(), " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if "TORCHELASTIC_RESTART_COUNT" in env and "RANK" in env and "trainer.cli" in cmdline:
            workers[int(env["RANK"])] = child
    return workers


def test_a_worker_killed_mid_training_is_restarted_by_torchrun_and_resumes_exactly(
    tmp_path, tiny_dataset
) -> None:
    base = [f"data.path={tiny_dataset}", f"run.out_dir={tmp_path}", *KILL_RUN]
    whole_log, cut_log = tmp_path / "whole.log", tmp_path / "cut.log"
    with torchrun_job(whole_log, *base, "run.name=whole") as job:
        whole_output = wait_for_exit(job, whole_log)
    assert "resumed from" not in whole_output

    run_dir = tmp_path / "cut"
    with torchrun_job(cut_log, *base, "run.name=cut") as job:
        first_commit = wait_for_first_commit(job, run_dir / "checkpoints", cut_log)
        workers = torchrun_workers(job.pid)
        # the kill must land while the first attempt is still training, or this test proves nothing
        assert job.poll() is None and not (run_dir / "metrics.json").exists(), "the run ended too early"
        assert sorted(workers) == [0, 1], f"expected 2 workers under torchrun, found ranks {sorted(workers)}"
        assert all(w.environ()["TORCHELASTIC_RESTART_COUNT"] == "0" for w in workers.values())
        victim = workers[0]  # rank 0 writes the commit markers and the report
        os.kill(victim.pid, signal.SIGKILL)
        output = wait_for_exit(job, cut_log)

    assert f"exitcode: -9) local_rank: 0 (pid: {victim.pid})" in output  # torchrun saw the kill
    # exactly one restart: the second attempt logged its resume point, the first never got that far
    resumes = re.findall(r"resumed from (\S+) at step (\d+)", output)
    assert len(resumes) == 1, output[-5000:]
    resumed_url, resumed_step = resumes[0][0], int(resumes[0][1])
    assert resumed_url == str(run_dir / "checkpoints" / f"step-{resumed_step:09d}")
    assert first_commit <= resumed_step < KILL_RUN_STEPS

    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    cut = json.loads((run_dir / "metrics.json").read_text())
    # the losses up to the resume point come from the checkpoint (the killed attempt's later ones are
    # dropped with it), the rest were computed again: the whole list must match the uninterrupted run
    assert cut["steps"] == whole["steps"] == KILL_RUN_STEPS
    assert cut["train_losses"] == whole["train_losses"]
    assert cut["test"] == whole["test"]
    assert cut["valid"] == whole["valid"]
    for rank in range(2):
        # sample-key logs are appended to: the killed attempt's lines (perhaps a partial one) come first,
        # then the resumed attempt's, which must be exactly the uninterrupted run's from the resume point
        whole_keys = (tmp_path / "whole" / f"sample_keys.rank{rank}.txt").read_text().splitlines(True)
        cut_keys = (run_dir / f"sample_keys.rank{rank}.txt").read_text()
        assert len(whole_keys) == KILL_RUN_STEPS
        assert cut_keys.endswith("".join(whole_keys[resumed_step:]))


# --- 2. object storage lost in the middle of a save ---------------------------------------------------


_REQUEST_LINE = re.compile(rb"((?:GET|PUT|POST|HEAD|DELETE) /\S* HTTP/1\.[01])\r\n")


class CuttableProxy:
    """A TCP forwarder on 127.0.0.1 in front of ``upstream_port``, which a test can cut: every open
    connection is shut down and new ones are reset right after accept, until :meth:`restore`.

    :meth:`cut_after` arms an automatic cut: once ``marker`` shows up in the bytes a client sends (an
    HTTP request line names its object key in plain text), ``after_bytes`` more client bytes are forwarded
    and then everything is cut, so the cut lands inside that upload."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._is_cut = False
        self._marker: bytes | None = None
        self._budget: int | None = None  # client bytes still forwarded once the marker was seen
        self.cuts = 0
        self.refused = 0  # connections reset while cut
        self.interrupted: str | None = None  # the request an automatic cut landed in
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def cut_after(self, marker: bytes, after_bytes: int) -> None:
        with self._lock:
            self._marker, self._budget = marker, None
            self._after_bytes = after_bytes

    def cut(self) -> None:
        with self._lock:
            self._cut_locked()

    def restore(self) -> None:
        with self._lock:
            self._is_cut, self._marker, self._budget = False, None, None

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _cut_locked(self) -> None:
        self.cuts += not self._is_cut
        self._is_cut, self._marker, self._budget = True, None, None
        for s in self._open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self._open.clear()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refuse = self._is_cut
            if refuse:  # reset: the client sees "connection reset by peer"
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        tail, request = b"", None
        try:
            while data := source.recv(65536):
                if from_client:
                    requests = _REQUEST_LINE.findall(tail + data)
                    request = requests[-1].decode() if requests else request
                    data, cut_now = self._inspect(tail + data, len(tail))
                    tail = (tail + data)[-256:]
                    if cut_now:
                        sink.sendall(data)
                        with self._lock:
                            if not self._is_cut:
                                self.interrupted = request
                                self._cut_locked()
                        return
                sink.sendall(data)
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _inspect(self, window: bytes, tail_len: int) -> tuple[bytes, bool]:
        """The part of this chunk to forward, and whether to cut after it."""
        data = window[tail_len:]
        with self._lock:
            if self._is_cut:
                return b"", True
            if self._budget is None and self._marker is not None:
                at = window.find(self._marker)
                if at < 0:
                    return data, False
                # count from the marker's start (in this chunk)
                self._budget = self._after_bytes + max(at - tail_len, 0)
            if self._budget is None:
                return data, False
            if len(data) >= self._budget:
                return data[: self._budget], True
            self._budget -= len(data)
            return data, False


@pytest.fixture
def s3_proxy(s3_server) -> Iterator[CuttableProxy]:
    proxy = CuttableProxy(s3_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


# credentials that moto accepts and that must never show up in an error message or a log
SECRET = "fault-test-secret-do-not-print"


def model_state(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        # 4 MiB of shard data, so that a cut after a few hundred KiB lands inside the upload
        "weights": torch.randn(1024, 1024, generator=generator),
        "bias": torch.randn(1024, generator=generator),
        "run": json.dumps({"seed": seed}),
    }


def empty_state() -> dict:
    return {"weights": torch.zeros(1024, 1024), "bias": torch.zeros(1024), "run": ""}


def test_a_save_cut_off_from_object_storage_fails_and_leaves_the_previous_checkpoint_latest(
    s3_server, s3_proxy, caplog, capfd
) -> None:
    bucket = s3_server.make_bucket()
    root = f"{bucket}/ckpt"
    options = StorageOptions(
        endpoint_url=s3_proxy.url, key="fault-test-key", secret=SECRET, region="us-east-1", max_attempts=2
    )
    caplog.set_level("DEBUG", logger="fmrl")
    with distributed():
        manager = CheckpointManager(root, options)
        first = manager.save(1, model_state(1))
        assert manager.latest() == first

        # the next save dies 256 KiB into the upload of its first shard file
        s3_proxy.cut_after(b"/ckpt/step-000000002/", 256 * 1024)
        started = time.monotonic()
        with pytest.raises(CheckpointError) as failure:
            manager.save(2, model_state(2))
        took = time.monotonic() - started
        assert s3_proxy.cuts == 1 and s3_proxy.refused > 0
        # it landed inside the upload of a shard file of step 2 (after the HEAD of its COMMIT, if any)
        assert re.fullmatch(
            r"PUT /\S+/ckpt/step-000000002/__0_0\.distcp\S* HTTP/1\.1", s3_proxy.interrupted or ""
        )
        message = str(failure.value)
        assert f"saving checkpoint {root}/step-000000002 failed (it is not committed)" in message
        assert SECRET not in message

        s3_proxy.restore()
        # no marker for the failed step; the previous checkpoint is still the latest and loads intact
        assert [step for step, _ in manager.complete()] == [1]
        assert manager.latest() == first
        with pytest.raises(CheckpointError, match=r"step-000000002 has no COMMIT marker"):
            manager.marker(f"{root}/step-000000002")
        state = empty_state()
        assert manager.load(first, state)["step"] == 1
        expected = model_state(1)
        assert torch.equal(state["weights"], expected["weights"])
        assert torch.equal(state["bias"], expected["bias"])
        assert state["run"] == expected["run"]
        # and saving works again once the storage is back
        assert manager.save(2, model_state(2)) == f"{root}/step-000000002"
        assert [step for step, _ in manager.complete()] == [1, 2]
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text
    assert took < 60, f"the failed save took {took:.0f} s to give up"


def single(tmp_path, dataset: str, *overrides: str):
    return train(load_config(None, [*COMMON, f"data.path={dataset}", f"run.out_dir={tmp_path}", *overrides]))


def test_a_training_run_whose_storage_dies_during_a_save_fails_clearly_and_resumes_after(
    tmp_path, tiny_dataset, s3_server, s3_proxy, caplog
) -> None:
    bucket = s3_server.make_bucket()
    root = f"{bucket}/ckpt"
    # 1 rank, 16 sequences per step: 13 steps in the epoch; a checkpoint every 4 steps, through the proxy
    remote = [
        "train.batch_size=16",
        "train.epochs=1",
        "run.checkpoint_every=4",
        f"run.checkpoint_dir={root}",
        f"data.s3_endpoint_url={s3_proxy.url}",
        "run.name=cut",
    ]
    s3_proxy.cut_after(b"/ckpt/step-000000008/", 64 * 1024)  # the second save dies mid-upload
    with pytest.raises(CheckpointError, match=rf"saving checkpoint {root}/step-000000008 failed"):
        single(tmp_path, tiny_dataset, *remote)
    assert s3_proxy.cuts == 1
    assert re.fullmatch(r"PUT /\S+/ckpt/step-000000008/\S+ HTTP/1\.1", s3_proxy.interrupted or "")
    s3_proxy.restore()
    with distributed():
        manager = CheckpointManager(root, s3_server.options)
        assert [step for step, _ in manager.complete()] == [4]

    caplog.set_level("INFO", logger="fmrl")
    resumed = single(tmp_path, tiny_dataset, *remote, "run.resume=auto")
    assert f"resumed from {root}/step-000000004 at step 4" in caplog.text
    assert resumed.steps == 13 and len(resumed.train_losses) == 13 and resumed.test_metrics
    # (that such a resume is exact is test_checkpoint.py's business)


TWO_RANK_SAVES = textwrap.dedent(
    """
    import json, os, sys, time

    import torch

    from data_pipeline.storage import StorageOptions
    from trainer.checkpoint import CheckpointError, CheckpointManager
    from trainer.dist import distributed
    from trainer.logs import configure_logging
    from trainer.process_exit import run_as_process


    def wait_for(mark):
        while not os.path.exists(mark):
            time.sleep(0.05)


    def main():
        configure_logging()
        root, endpoint, marks, deadline = sys.argv[1:5]
        options = StorageOptions(
            endpoint_url=endpoint, key="testing", secret="testing", region="us-east-1", deadline=float(deadline)
        )
        with distributed() as (world, _):
            manager = CheckpointManager(root, options, timeout=60)
            manager.save(1, {"w": torch.full((64, 64), float(world.rank)), "run": "x"})
            open(os.path.join(marks, f"saved.{world.rank}"), "w").close()
            wait_for(os.path.join(marks, "fault"))
            started = time.monotonic()
            try:
                manager.save(2, {"w": torch.zeros(64, 64), "run": "x"})
                outcome = "no error"
            except CheckpointError as e:
                outcome = str(e)
            record = {"seconds": time.monotonic() - started, "ended": time.time(), "error": outcome}
            if outcome == "no error":  # abandoned: once the storage answers again, the next save commits
                wait_for(os.path.join(marks, "back"))
                manager.save(3, {"w": torch.ones(64, 64), "run": "x"})
                record["committed"] = [step for step, _ in manager.complete()]
            with open(os.path.join(marks, f"outcome.{world.rank}.json"), "w") as f:
                json.dump(record, f)


    run_as_process(main)
    """
)


@pytest.mark.parametrize("fault", ["dead", "hung"])
def test_a_dead_endpoint_fails_a_save_and_a_hung_one_abandons_it_on_every_rank_at_once(
    tmp_path, s3_server, fault
) -> None:
    """A server of its own under a 2-rank job, between two saves: killed (connections refused: the save
    fails on both ranks, naming the cause), or frozen for 8 s (SIGSTOP; the storage deadline is 4 s) and
    then let go (both ranks abandon the save at that deadline, and the next save commits). Before, rank 0
    failed its first storage call and left the collective that the other rank waited in: the save was
    abandoned only at the checkpoint deadline (here 60 s, 600 s by default), with no word of the cause,
    and a frozen server that answered again still held training until then."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = type(s3_server)(port)
    server.start()
    try:
        bucket = server.make_bucket()
        script, marks = tmp_path / "saves.py", tmp_path / "marks"
        script.write_text(TWO_RANK_SAVES)
        marks.mkdir()
        storage_deadline = "4" if fault == "hung" else "300"  # a refusal must fail on its own, well before
        arguments = [str(script), f"{bucket}/ckpt", server.endpoint_url, str(marks), storage_deadline]
        with background_job(tmp_path / "job.out", *TORCHRUN, *arguments) as job:
            deadline = time.monotonic() + 120
            while not all((marks / f"saved.{rank}").exists() for rank in range(2)):
                assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "job.out").read_text()
                time.sleep(0.05)
            if fault == "dead":
                server.stop()
            else:
                server.pause()
            (marks / "fault").touch()
            if fault == "hung":
                time.sleep(8.0)
                server.unpause()
            answering_again = time.time()
            (marks / "back").touch()
            assert job.wait(timeout=120) == 0, (tmp_path / "job.out").read_text()[-5000:]
    finally:
        server.unpause()
        server.stop()
    output = (tmp_path / "job.out").read_text()
    for rank in range(2):
        outcome = json.loads((marks / f"outcome.{rank}.json").read_text())
        message = outcome["error"]
        if fault == "dead":  # a failure: the save (and a training job) stops, naming the cause
            assert f"saving checkpoint {bucket}/ckpt/step-000000002 failed (it is not committed)" in message
            assert f"cannot reach object storage at {server.endpoint_url}" in message, message
            assert "Could not connect to the endpoint URL" in message, message
            # 3 attempts of botocore's standard retry mode (connection refused at once), not the deadline
            assert outcome["seconds"] < 30, outcome
        else:  # the save is abandoned at the storage deadline by both ranks, and the next one commits
            assert message == "no error"
            assert re.search(
                rf"\[rank {rank}\] checkpoint {bucket}/ckpt/step-000000002 was given up \(rank 0: "
                rf"StorageTimeoutError: .* object storage at {server.endpoint_url} did not answer within 4 s",
                output,
            ), output[-5000:]
            # no rank is held after the server answers again (before: until the 60 s deadline)
            assert outcome["ended"] < answering_again + 10, outcome
            assert outcome["committed"] == [1, 3]


# --- 3. damaged files are detected on load ------------------------------------------------------------


def truncate_shard(step_dir: Path) -> str:
    shard = next(step_dir.glob("*.distcp"))
    os.truncate(shard, shard.stat().st_size // 2)
    return shard.name


def delete_shard(step_dir: Path) -> str:
    shard = next(step_dir.glob("*.distcp"))
    shard.unlink()
    return shard.name


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    size = len(data)
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def flip_bytes_in_shard(step_dir: Path) -> str:
    shard = next(step_dir.glob("*.distcp"))
    flip_bytes(shard)
    return shard.name


def corrupt_metadata(step_dir: Path) -> str:
    flip_bytes(step_dir / ".metadata")
    return ".metadata"


@pytest.mark.parametrize("damage", [truncate_shard, delete_shard, flip_bytes_in_shard, corrupt_metadata])
def test_a_damaged_checkpoint_file_is_detected_on_load_and_named(tmp_path, damage) -> None:
    with distributed():
        manager = CheckpointManager(str(tmp_path / "ckpt"))
        url = manager.save(1, model_state(1))
        state = empty_state()
        manager.load(url, state)  # intact, it loads
        assert torch.equal(state["weights"], model_state(1)["weights"])

        damaged = damage(Path(url))
        with pytest.raises(CheckpointError) as failure:
            manager.load(url, empty_state())
        message = str(failure.value)
        assert damaged in message and "step-000000001" in message, message


def test_a_damaged_commit_marker_is_named_and_resume_auto_falls_back_to_the_newest_intact_one(
    tmp_path, tiny_dataset, caplog
) -> None:
    # 1 rank, 16 sequences per step: 13 steps; checkpoints at steps 4, 8, 12 and 13 (the epoch's end)
    run = ["train.batch_size=16", "train.epochs=1", "run.checkpoint_every=4", "run.keep_checkpoints=5"]
    single(tmp_path, tiny_dataset, *run, "run.name=m")
    root = tmp_path / "m" / "checkpoints"
    marker = root / "step-000000013" / COMMIT
    marker.write_bytes(b"\xdd\xdd" + marker.read_bytes()[2:])  # bytes of a bad sector: not UTF-8
    with distributed():
        with pytest.raises(CheckpointError, match=rf"{marker}: the commit marker is damaged"):
            CheckpointManager(str(root)).marker(str(marker.parent))

    caplog.set_level("INFO", logger="fmrl")
    resumed = single(tmp_path, tiny_dataset, *run, "run.name=m", "run.resume=auto")
    assert f"skipping checkpoint {marker.parent}: {marker}: the commit marker is damaged" in caplog.text
    assert f"resumed from {root / 'step-000000012'} at step 12" in caplog.text
    assert resumed.steps == 13 and resumed.test_metrics
    # the resumed run saved step 13 again, in place of the damaged one
    assert f"replacing checkpoint {marker.parent}" in caplog.text
    assert json.loads(marker.read_text())["step"] == 13


# --- 4. storage that hangs, a disk that fills ---------------------------------------------------------


def test_a_save_to_a_hung_server_is_abandoned_and_training_goes_on(
    tmp_path, tiny_dataset, s3_server, caplog
) -> None:
    """The S3 server is frozen (SIGSTOP) for a few seconds right after the first checkpoint: the next save
    is abandoned at its deadline (never committed), training goes on, and the later saves commit."""
    bucket = s3_server.make_bucket()
    root = f"{bucket}/ckpt"
    first_commit = f"{root}/step-000000004/{COMMIT}".removeprefix("s3://")
    fs = s3fs_for(s3_server)
    paused = threading.Event()

    def freeze_after_the_first_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while not fs.exists(first_commit) and time.monotonic() < deadline:
            time.sleep(0.05)
        s3_server.pause()
        paused.set()
        time.sleep(8.0)
        s3_server.unpause()

    watcher = threading.Thread(target=freeze_after_the_first_checkpoint, daemon=True)
    caplog.set_level("INFO", logger="fmrl")
    watcher.start()
    try:
        result = single(
            tmp_path,
            tiny_dataset,
            "train.batch_size=16",
            "train.epochs=2",
            "run.checkpoint_every=4",
            "run.checkpoint_timeout=4",
            # margin: on a loaded machine the woken server works off the abandoned requests first, and a
            # third save can time out behind them (this test is about going on, not about giving up)
            "run.checkpoint_max_abandoned=6",
            f"run.checkpoint_dir={root}",
            f"data.s3_endpoint_url={s3_server.endpoint_url}",
            "run.name=hung",
        )
    finally:
        watcher.join()
        s3_server.unpause()
    assert paused.is_set()
    assert result.steps == 26 and result.test_metrics  # two epochs of 13 steps, to the end
    assert "did not finish within 4 s (storage not answering?): abandoned, not committed" in caplog.text
    assert "training goes on and the next checkpoint tries again" in caplog.text
    with distributed():
        manager = CheckpointManager(root, s3_server.options)
        committed = [step for step, _ in manager.complete()]
    assert committed[-1] == 26
    abandoned = [int(m) for m in re.findall(r"step-0*(\d+) did not finish within", caplog.text)]
    assert abandoned and not set(abandoned) & set(committed)


def s3fs_for(server):
    from data_pipeline.storage import filesystem

    fs, _ = filesystem("s3://x", server.options)
    return fs


@contextlib.contextmanager
def small_disk(path: Path, mib: int) -> Iterator[Path]:
    """A tmpfs of ``mib`` MiB mounted at ``path`` (needs root, as CI has)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (this test needs root): {done.stderr.decode()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def sized_state(mib: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"weights": torch.randn(int(mib * 2**20 / 4), generator=g), "run": json.dumps({"seed": seed})}


@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "async"])
def test_a_full_disk_is_named_and_the_failed_save_leaves_no_debris(tmp_path, blocking) -> None:
    with small_disk(tmp_path / "disk", 6) as disk, distributed():
        root = str(disk / "ckpt")
        manager = CheckpointManager(root)
        first = manager.save(1, sized_state(2, 1), blocking=blocking)
        manager.wait()
        with pytest.raises(CheckpointError) as failure:  # 5 MiB more do not fit beside the first 2
            manager.save(2, sized_state(5, 2), blocking=blocking)
            manager.wait()  # an asynchronous save fails here, one call later
        message = str(failure.value)
        assert f"saving checkpoint {root}/step-000000002 failed (it is not committed)" in message
        assert "No space left on device" in message and f"{root} has" in message and "MiB free" in message
        # the partial step folder is gone, the first checkpoint is still the latest, and there is room again
        assert sorted(os.listdir(root)) == ["step-000000001"]
        assert manager.latest() == first
        assert manager.save(3, sized_state(2, 3), blocking=blocking) == f"{root}/step-000000003"
        manager.close()
        assert [step for step, _ in manager.complete()] == [1, 3]


def test_a_full_disk_at_the_end_of_a_run_names_the_file_it_could_not_write(tmp_path, tiny_dataset) -> None:
    """A real full disk (a 256 KiB tmpfs) under the run folder: the checkpoints go elsewhere and fit, the
    trained weights (about 300 KB) do not. Before, the error was a bare "[Errno 28] No space left on
    device" (the failed write's retry in the clean-up replaced the named error)."""
    with small_disk(tmp_path / "disk", 1) as disk:
        subprocess.run(["mount", "-o", "remount,size=256k", str(disk)], check=True)
        run = ["train.batch_size=16", "train.epochs=1", "run.log_sample_keys=false", "run.name=full"]
        checkpoints = f"run.checkpoint_dir={tmp_path / 'ckpt'}"
        weights = disk / "full" / "model.safetensors"
        with pytest.raises(
            StorageError, match=rf"^cannot write {weights}: \[Errno 28\] No space left on device"
        ):
            single(disk, tiny_dataset, *run, checkpoints)
        assert not weights.exists() and not list((disk / "full").glob(".model.safetensors.tmp-*"))


def test_a_restart_on_a_disk_left_full_by_a_dead_save_starts(tmp_path) -> None:
    """A save that died with its job (no chance to clean up) leaves an uncommitted folder; the next job's
    checkpoint manager removes it before writing anything."""
    with small_disk(tmp_path / "disk", 4) as disk, distributed():
        root = disk / "ckpt"
        (root / "step-000000007").mkdir(parents=True)
        (root / "step-000000007" / "__0_0.distcp").write_bytes(os.urandom(3 * 2**20))  # no COMMIT
        manager = CheckpointManager(str(root))
        manager.remove_debris()
        assert not (root / "step-000000007").exists()
        manager.save(8, sized_state(2, 8))
        assert [step for step, _ in manager.complete()] == [8]
