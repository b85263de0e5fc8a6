"""Run folders: a finished run is never overwritten (a second run, a failed start, an export), the same
command resumes its own run, one job at a time holds a run (a lease), and workers whose torchrun agent
died stop instead of training on headless.

    .venv/bin/python -m pytest -q tests/integration/test_run_folder.py
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from trainer.config import ConfigError, load_config
from trainer.run_folder import LEASE, RunFolderError, choose_run_folder, empty_run_folder
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


def digest(folder) -> dict[str, str]:
    """sha256 of every file under ``folder`` (by relative path)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture
def config(tmp_path, tiny_dataset):
    def make(*extra: str):
        return load_config(None, [*TINY, f"data.path={tiny_dataset}", f"run.out_dir={tmp_path}", *extra])

    return make


def test_a_finished_run_is_never_overwritten(config, tmp_path) -> None:
    first = train(config("run.name=r"))
    before = digest(first.run_dir)
    assert "config.yaml" in before and "model.safetensors" in before and "metrics.json" in before
    # the same name again: refused before anything is written
    with pytest.raises(RunFolderError, match=r"holds a run already: continue it with run.resume=auto"):
        train(config("run.name=r", "train.seed=7"))
    # a start that fails on its data, with the finished run's name: refused too
    with pytest.raises(RunFolderError):
        train(config("run.name=r", f"data.path={tmp_path}/nowhere"))
    # resuming it with a bad data path fails on the data, and writes nothing but the attempt's lines in
    # the run's log (appended: the finished run's own lines are kept)
    log_before = open(os.path.join(first.run_dir, "train.log")).read()
    with pytest.raises(ValueError, match="nowhere"):
        train(config("run.name=r", "run.resume=auto", f"data.path={tmp_path}/nowhere"))
    after = digest(first.run_dir)
    assert {k: v for k, v in after.items() if k != "train.log"} == {
        k: v for k, v in before.items() if k != "train.log"
    }
    log_after = open(os.path.join(first.run_dir, "train.log")).read()
    assert log_after.startswith(log_before) and "nowhere" in log_after[len(log_before) :]


def test_overwrite_starts_afresh_without_the_old_checkpoints(config, tmp_path) -> None:
    old = train(config("run.name=o", "train.epochs=2"))
    old_steps = sorted(os.listdir(os.path.join(old.run_dir, "checkpoints")))
    old_log = open(os.path.join(old.run_dir, "train.log")).read()
    new = train(config("run.name=o", "run.overwrite=true", "train.max_steps=3"))
    assert new.run_dir == old.run_dir and new.steps == 3
    # only the new run's checkpoints: none of the old run's is left to be mixed with them
    assert sorted(os.listdir(os.path.join(new.run_dir, "checkpoints"))) == ["step-000000003"]
    assert "step-000000003" not in old_steps
    assert json.load(open(os.path.join(new.run_dir, "metrics.json")))["steps"] == 3
    # the new run's log is its own, from its first line (held while the old run was still there)
    new_log = open(os.path.join(new.run_dir, "train.log")).read()
    assert old_log.splitlines()[0] not in new_log
    assert new_log.startswith(old_log.splitlines()[0][:10])  # the same kind of line: the command line
    assert "run.overwrite: deleting the earlier run in" in new_log and "model.safetensors written" in new_log


@pytest.mark.parametrize(
    ("broken", "error"),
    [
        ("data.path={tmp}/nowhere", "nowhere"),  # the data set
        ("data.features={tmp}/no-features", "no-features"),  # the feature tables, read by the model build
        ("run.loggers=[mlflow] run.mlflow_tracking_uri=sqlite:///{tmp}/a-file/mlflow.db", "^MLflow at"),
    ],
)
def test_overwrite_keeps_the_old_run_when_the_new_start_fails(config, tmp_path, broken, error) -> None:
    """run.overwrite deletes the earlier run only once the new start-up passed its checks: a start that
    fails leaves every file of the finished run as it was, its log included, and no lease."""
    (tmp_path / "a-file").write_text("a file where MLflow wants a folder")
    first = train(config("run.name=keep"))
    before = digest(first.run_dir)
    with pytest.raises((ValueError, RuntimeError, OSError), match=error):
        train(config("run.name=keep", "run.overwrite=true", *broken.format(tmp=tmp_path).split()))
    assert digest(first.run_dir) == before
    assert not os.path.exists(os.path.join(first.run_dir, LEASE))


@pytest.mark.parametrize("name", [".", "a/..", "../x"])  # every form: tests/unit/test_config.py
def test_a_run_name_is_one_folder_name(config, tmp_path, name) -> None:
    """run.name=. with run.overwrite=true used to empty run.out_dir (every sibling run); ../x wrote
    outside it. Refused at config validation, naming the key; nothing is touched."""
    sibling = train(config("run.name=sibling", "train.max_steps=1"))
    before = digest(tmp_path)
    with pytest.raises(ConfigError, match=r"^run.name must be one folder name"):
        train(config(f"run.name={name}", "run.overwrite=true"))
    assert digest(tmp_path) == before and os.path.isdir(sibling.run_dir)


def test_only_a_run_folder_directly_inside_out_dir_is_ever_emptied(tmp_path) -> None:
    """The defence behind the config check: whatever path reaches it, empty_run_folder refuses
    run.out_dir itself, a folder beside or above it, a link to a run, a folder that holds no run."""
    out = tmp_path / "runs"
    for name in ("r", "other"):
        (out / name).mkdir(parents=True)
        (out / name / "config.yaml").write_text("task: fmrl\n")
    (out / "plain").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.yaml").write_text("task: fmrl\n")
    os.symlink(out / "other", out / "link")
    for folder in (out, out / "r" / "..", out / ".", out / ".." / "outside", out / "link", out / "plain"):
        with pytest.raises(RunFolderError, match="refusing to empty"):
            empty_run_folder(str(folder), str(out))
    assert all((out / n / "config.yaml").exists() for n in ("r", "other"))
    assert (tmp_path / "outside" / "config.yaml").exists()
    (out / "r" / LEASE).write_text("{}")
    empty_run_folder(str(out / "r"), str(out))
    assert os.listdir(out / "r") == [LEASE]  # the run is gone, the lease of the job replacing it stays


def test_the_same_name_refusal_names_the_job_using_the_run(tmp_path) -> None:
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "config.yaml").write_text("task: fmrl\n")
    job = subprocess.Popen(["sleep", "60"])  # a live process holding the run's lease
    try:
        holder = {"host": socket.gethostname(), "pid": job.pid, "started": time.time()}
        (folder / LEASE).write_text(json.dumps(holder))
        with pytest.raises(RunFolderError, match=rf"holds a run that is in use by process {job.pid} on host"):
            choose_run_folder(str(tmp_path), "busy", "", False, {})
    finally:
        job.kill()
        job.wait()
    # its holder gone, the refusal is the usual one
    with pytest.raises(RunFolderError, match=r"holds a run already: continue it with run.resume=auto"):
        choose_run_folder(str(tmp_path), "busy", "", False, {})


@pytest.mark.parametrize(
    ("key", "value"),
    [("data.path", "{file}"), ("run.out_dir", "{file}"), ("run.out_dir", "{file}/runs")],
)
def test_a_path_that_is_a_file_is_named_with_its_key(tiny_dataset, tmp_path, capsys, key, value) -> None:
    from trainer.cli import main

    file = tmp_path / "a-file"
    file.write_text("not a folder")
    paths = {"data.path": tiny_dataset, "run.out_dir": str(tmp_path / "out"), key: value.format(file=file)}
    code = main(["train", *TINY, *(f"{k}={v}" for k, v in paths.items())])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"fmrl train: config error: {key}={value.format(file=file)} ")
    assert str(file) in err[-1] and "not a folder" in err[-1]


def test_a_failed_start_leaves_no_folder(config, tmp_path) -> None:
    with pytest.raises(ValueError, match="nowhere"):
        train(config("run.name=fresh", f"data.path={tmp_path}/nowhere"))
    assert not os.path.exists(tmp_path / "fresh")


def test_resume_auto_without_a_name_continues_the_run_of_the_same_config(config, tmp_path) -> None:
    stopped = train(config("train.epochs=2", "run.stop_after_steps=3", "run.resume=auto"))
    assert stopped.stopped and stopped.steps == 3
    again = train(config("train.epochs=2", "run.resume=auto"))
    assert again.run_dir == stopped.run_dir and again.steps > 3 and not again.stopped
    # another config is another run: a new folder
    other = train(config("train.epochs=2", "optim.lr=3e-3", "run.resume=auto", "train.max_steps=2"))
    assert other.run_dir != stopped.run_dir and other.steps == 2


def _train_command(tiny_dataset: str, out: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainer.cli",
        "train",
        *TINY,
        f"data.path={tiny_dataset}",
        f"run.out_dir={out}",
        "run.name=busy",
        "train.epochs=400",
        "train.batch_size=8",
        *extra,
    ]


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


def test_a_second_job_on_a_running_run_is_refused_and_a_dead_holder_is_taken_over(
    tiny_dataset, tmp_path
) -> None:
    lease = tmp_path / "busy" / LEASE
    first = subprocess.Popen(
        _train_command(tiny_dataset, str(tmp_path), "run.resume=auto"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: (tmp_path / "busy" / "checkpoints").exists() or first.poll() is not None)
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        holder = json.loads(lease.read_text())
        assert holder["pid"] == first.pid
        second = subprocess.run(
            _train_command(tiny_dataset, str(tmp_path), "run.resume=auto", "train.max_steps=1"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode != 0
        assert f"this run is in use by process {first.pid} on host" in second.stderr
    finally:
        first.kill()  # SIGKILL: the lease stays behind, its holder is gone
        first.wait()
    assert lease.exists()
    third = subprocess.run(
        _train_command(tiny_dataset, str(tmp_path), "run.resume=auto", "train.epochs=2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert "taking over the stale lease" in third.stderr and "resumed from" in third.stderr
    assert not lease.exists()  # released at the end


def test_workers_stop_when_their_torchrun_agent_is_killed(tiny_dataset, tmp_path) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *_train_command(tiny_dataset, str(tmp_path))[1:],
    ]
    log_path = tmp_path / "agent.log"
    with open(log_path, "w") as log:
        agent = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: (tmp_path / "busy" / "checkpoints").exists() or agent.poll() is not None, 300)
        assert agent.poll() is None, log_path.read_text()[-3000:]
        workers = [
            int(pid)
            for pid in subprocess.run(
                ["pgrep", "-P", str(agent.pid)], capture_output=True, text=True
            ).stdout.split()
        ]
        assert len(workers) == 2
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        _wait_for(lambda: all(gone(pid) for pid in workers), 120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.pid, signal.SIGKILL)  # whatever is left of the job's process group
    text = log_path.read_text()
    assert "torchrun agent" in text and "is gone: stopping after a checkpoint" in text
    assert not (tmp_path / "busy" / LEASE).exists()  # the lease went with them
    checkpoints = sorted(os.listdir(tmp_path / "busy" / "checkpoints"))
    assert checkpoints and all(name.startswith("step-") for name in checkpoints)


def test_relative_paths_are_taken_from_the_current_directory_and_stored_absolute(
    tiny_dataset, tmp_path, monkeypatch
) -> None:
    import yaml

    from trainer.cli import main

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    relative_data = os.path.relpath(tiny_dataset, work)
    result = train(
        load_config(None, [*TINY, f"data.path={relative_data}", "run.out_dir=runs", "run.name=rel"])
    )
    assert result.run_dir == str(work / "runs" / "rel")
    saved = yaml.safe_load(open(os.path.join(result.run_dir, "config.yaml")))
    assert saved["data"]["path"] == tiny_dataset and saved["run"]["out_dir"] == str(work / "runs")
    # from another folder, the run exports: its config names the data absolutely
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["export", result.run_dir, "--sizes", "8", "--out", "exported"]) == 0
    assert json.load(open(elsewhere / "exported" / "export.json"))["sizes"].keys() == {"8"}
    # the features can be pointed at explicitly (here: a copy elsewhere), and a wrong place is named
    import shutil

    shutil.copytree(os.path.join(tiny_dataset, "features"), tmp_path / "moved-features")
    assert (
        main(
            [
                "export",
                result.run_dir,
                "--sizes",
                "16",
                "--out",
                "exported",
                "--features",
                str(tmp_path / "moved-features"),
            ]
        )
        == 0
    )
    assert (
        main(["export", result.run_dir, "--sizes", "16", "--out", "x", "--features", str(tmp_path / "none")])
        == 2
    )


def test_a_rank_that_dies_in_its_teardown_cannot_cut_the_report_short(tiny_dataset, tmp_path) -> None:
    """Rank 1 aborts as its teardown starts (a native library aborting at exit, which happened about
    once in 15 two-rank runs); torchrun then kills every worker. Rank 0's report (weights, metrics, plot,
    export) must be complete by then: no rank starts its teardown before rank 0 has written it."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "trainer.cli",
        "train",
        *[o for o in TINY if o != "run.export=false"],
        f"data.path={tiny_dataset}",
        f"run.out_dir={tmp_path}",
        "run.name=end",
        "train.batch_size=16",
    ]
    env = {**os.environ, "FMRL_TEST_ABORT_AT_TEARDOWN": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode != 0  # the abort is real: torchrun reports the failed worker
    run_dir = tmp_path / "end"
    for name in ("model.safetensors", "metrics.json", "test_metrics.txt", "metrics_by_size.png"):
        assert (run_dir / name).exists(), (name, done.stderr[-3000:])
    manifest = json.loads((run_dir / "export" / "export.json").read_text())
    assert set(manifest["sizes"]) == {"8", "16", "32"}
