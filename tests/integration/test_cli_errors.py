"""Failures of `fmrl` commands as a user sees them (real subprocesses): one line naming the culprit, exit
code 2 for a wrong command line / config / path and 1 for a failure while running, no traceback unless
--debug, once under torchrun; storage options reach the data commands; a run.resume that names no
checkpoint is refused before the model is built; a hostile checkpoint entry is refused by name."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import COMMIT, _MetadataUnpickler
from trainer.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "data.num_workers=0",
    "model.nested_sizes=[8,16]",
    "train.epochs=1",
    "train.batch_size=32",
    "train.num_threads=1",
    "run.progress_bar=false",
    "run.loggers=[]",
    "run.export=false",
]


def fmrl(
    *args: str, launcher: tuple[str, ...] = (), timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *launcher, "-m", "trainer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.parametrize(
    "command",
    [
        ["data", "prepare-synthetic", "s3://bucket/demo"],
        ["data", "prepare-synthetic-ctr", "s3://bucket/demo"],
        ["features", "s3://bucket/demo"],
        ["export", "s3://bucket/run/checkpoints", "--sizes", "8"],
        ["eval", "s3://bucket/run/checkpoints"],
        ["recommend", "s3://bucket/export", "--history", "1"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_every_url_command_reaches_the_given_endpoint_and_fails_in_one_line(command: list[str]) -> None:
    endpoint = f"http://127.0.0.1:{_dead_port()}"
    done = fmrl(*command, "--s3-endpoint-url", endpoint)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("fmrl ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"fmrl {' '.join(command[:2]) if command[0] == 'data' else command[0]}: ")
    assert f"storage error: cannot reach object storage at {endpoint} for s3://bucket/" in lines[0]


def test_a_missing_input_file_is_exit_2_and_names_it(tmp_path) -> None:
    missing = tmp_path / "Beauty.txt"
    done = fmrl("data", "convert-seqrec", str(tmp_path / "out"), str(missing))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and str(missing) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_resume_from_a_path_that_holds_no_checkpoint_is_refused_before_the_model(
    tmp_path, tiny_dataset
) -> None:
    common = [*TINY, f"data.path={tiny_dataset}", f"run.out_dir={tmp_path}"]
    nowhere = tmp_path / "nonexistent"
    done = fmrl("train", *common, f"run.resume={nowhere}")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"fmrl train: config error: run.resume={nowhere}: nothing there; give a checkpoint "
        "(e.g. run.resume=runs/NAME/checkpoints/step-000000100, or run.resume=auto with run.name=NAME)"
    )
    assert not os.listdir(tmp_path)  # no run folder, no process group, no model
    # a folder of checkpoints: the message names the newest one to give instead
    assert main(["train", *common, "run.name=r", "train.max_steps=2", "run.checkpoint_every=1"]) == 0
    root = tmp_path / "r" / "checkpoints"
    folder = fmrl("train", *common, f"run.resume={root}")
    assert folder.returncode == 2
    assert f"run.resume={root}/step-000000002" in folder.stderr and "Traceback" not in folder.stderr


def test_under_torchrun_the_message_appears_once(tmp_path) -> None:
    # every rank fails on the data set after the process group started: rank 0 reports it
    nowhere = tmp_path / "nowhere"
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    done = fmrl("train", *TINY, f"data.path={nowhere}", f"run.out_dir={tmp_path}", launcher=torchrun)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if "fmrl train" in line]
    assert len(ours) == 1, done.stderr
    assert ours[0].startswith("fmrl train: error: ") and str(nowhere) in ours[0]
    # no worker traceback: nothing of ours in a traceback frame, no torchrun "[rankN]:" prefixed lines
    assert 'trainer/train.py", line' not in done.stderr
    assert re.search(r"^\[rank\d+\]:", done.stderr, flags=re.M) is None, done.stderr


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_hostile_checkpoint_entry_is_refused_by_name(tmp_path, tiny_dataset) -> None:
    common = [*TINY, f"data.path={tiny_dataset}", f"run.out_dir={tmp_path}", "run.name=h"]
    assert main(["train", *common, "run.stop_after_steps=2"]) == 0
    step = tmp_path / "h" / "checkpoints" / "step-000000002"
    # the run's JSON entry replaced by a pickle that would run a command: appended to the data file,
    # the metadata pointed at it, and the marker's fingerprints rewritten (an attacker can do all that)
    with open(step / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f, str(step)).load()
    index = next(i for i in metadata.storage_data if i.fqn == "run")
    info = metadata.storage_data[index]
    data_file = step / info.relative_path
    payload_path = tmp_path / "payload.pt"
    torch.save(_Exploit(), payload_path)
    payload = payload_path.read_bytes()
    offset = data_file.stat().st_size
    with open(data_file, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = type(info)(info.relative_path, offset, len(payload))
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    marker = json.loads((step / COMMIT).read_text())
    for name in (".metadata", info.relative_path):
        data = (step / name).read_bytes()
        marker["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / COMMIT).write_text(json.dumps(marker))

    done = fmrl("train", *common, f"run.resume={step}")
    assert done.returncode == 1
    ours = [line for line in done.stderr.splitlines() if line.startswith("fmrl train")]
    assert len(ours) == 1, done.stderr
    assert ours[0].startswith(f"fmrl train: checkpoint error: loading checkpoint {step} failed")
    assert "entry 'run'" in ours[0] and "refusing to load it" in ours[0] and "posix.system" in ours[0]
    assert "weights_only=False" not in done.stderr and "Traceback" not in done.stderr
