"""Sharded checkpoints and exact resume: a run stopped mid-epoch and resumed from its newest complete
checkpoint sees the same sample keys and computes the same losses and metrics as an uninterrupted run,
on 2 torchrun ranks (FSDP2 + TorchRec tables) and on S3 (moto); incomplete checkpoints are ignored."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from trainer.checkpoint import COMMIT, CheckpointError, CheckpointManager
from trainer.cli import main
from trainer.config import load_config
from trainer.dist import distributed
from trainer.export import load_recommender
from trainer.train import train

COMMON = [
    "model.nested_sizes=[8,16,32]",
    "model.use_id_embedding=true",  # its fused optimizer state must round-trip too
    "train.epochs=2",
    "train.batch_size=16",
    "train.num_threads=1",
    "run.log_sample_keys=true",
    "run.progress_bar=false",
    "run.loggers=[]",
]


def torchrun(*overrides: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*command, "-m", "trainer.cli", "train", *COMMON, *overrides],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]


def outcome(run_dir) -> tuple[list[float], dict, list[str]]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    keys = [
        (run_dir / f"sample_keys.rank{r}.txt").read_text()
        for r in range(2)
        if (run_dir / f"sample_keys.rank{r}.txt").exists()
    ]
    return metrics["train_losses"], metrics["test"], keys


def test_resume_mid_epoch_on_two_ranks_is_exact(tmp_path, tiny_dataset) -> None:
    base = [f"data.path={tiny_dataset}", f"run.out_dir={tmp_path}", "data.num_workers=2"]
    torchrun(*base, "run.name=whole")
    # 8 steps per epoch (per rank 2 reader slots of one 50-user shard: 4 batches each): stop inside epoch 1
    torchrun(*base, "run.name=cut", "run.stop_after_steps=5")
    assert not (tmp_path / "cut" / "metrics.json").exists()  # stopped before the end
    assert (tmp_path / "cut" / "checkpoints" / "step-000000005" / COMMIT).exists()
    torchrun(*base, "run.name=cut", "run.resume=auto")
    losses, test, keys = outcome(tmp_path / "whole")
    resumed_losses, resumed_test, resumed_keys = outcome(tmp_path / "cut")
    assert len(losses) == 16
    assert resumed_losses == losses  # bit for bit, step for step
    assert resumed_keys == keys and len(keys) == 2  # both ranks saw exactly the same sequences
    assert resumed_test == test


def single(tmp_path, dataset: str, *overrides: str):
    return train(
        load_config(
            None,
            [*COMMON, f"data.path={dataset}", f"run.out_dir={tmp_path}", "data.num_workers=0", *overrides],
        )
    )


def test_resume_from_s3_is_exact_and_old_checkpoints_are_pruned(
    tmp_path, tiny_dataset, s3_server, monkeypatch
) -> None:
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_server.endpoint_url)
    bucket = s3_server.make_bucket()
    whole = single(tmp_path, tiny_dataset, "run.name=whole")
    root = f"{bucket}/ckpt"
    stopped = single(
        tmp_path,
        tiny_dataset,
        "run.name=cut",
        f"run.checkpoint_dir={root}",
        "run.checkpoint_every=2",
        "run.keep_checkpoints=2",
        "run.stop_after_steps=9",
    )
    assert stopped.steps == 9 and not stopped.test_metrics
    with distributed():
        manager = CheckpointManager(root, s3_server.options)
        # every 2 steps and at the end of epoch 1 (step 7) and at the stop (9); the newest 2 are kept
        assert [step for step, _ in manager.complete()] == [8, 9]
        # a checkpoint inside epoch 2 carries that epoch's training time so far: step 9's total is
        # step 8's plus a step (before, both held epoch 1's alone, and a resumed run lost the rest)
        seconds = [
            json.loads(manager.read_full(f"{root}/step-00000000{s}")["run"])["train_seconds"] for s in (8, 9)
        ]
        assert 0 < seconds[0] < seconds[1] <= stopped.train_seconds
    resumed = single(tmp_path, tiny_dataset, "run.name=cut", f"run.checkpoint_dir={root}", "run.resume=auto")
    assert resumed.train_losses == whole.train_losses
    assert resumed.test_metrics == whole.test_metrics


def test_a_checkpoint_without_commit_marker_is_never_loaded(tmp_path, tiny_dataset) -> None:
    single(tmp_path, tiny_dataset, "run.name=a", "train.epochs=1", "run.checkpoint_every=3")
    root = tmp_path / "a" / "checkpoints"
    with distributed():
        manager = CheckpointManager(str(root))
        # every 3 steps and at the epoch's end (13 steps: 200 users, 16 per step); the newest 3 are kept
        assert [s for s, _ in manager.complete()] == [9, 12, 13]
        # a save that died before its marker: shards without COMMIT
        os.remove(root / "step-000000013" / COMMIT)
        assert manager.latest() == str(root / "step-000000012")
        with pytest.raises(CheckpointError, match=r"step-000000013 has no COMMIT marker"):
            manager.marker(str(root / "step-000000013"))
        assert dist.get_world_size() == 1


def full_tensors(step_dir) -> dict[str, torch.Tensor]:
    state = CheckpointManager(str(step_dir.parent)).read_full(str(step_dir))
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_resume_at_another_world_size_reshards_dense_state_tables_and_data(tmp_path, tiny_dataset) -> None:
    base = [f"data.path={tiny_dataset}", f"run.out_dir={tmp_path}", "data.num_workers=0"]
    torchrun(*base, "run.name=two", "run.stop_after_steps=3")
    two = tmp_path / "two" / "checkpoints" / "step-000000003"
    # 2 ranks -> 1 -> 2: each job resumes at step 3 and stops at once, saving in its own layout
    single(tmp_path, tiny_dataset, "run.name=one", f"run.resume={two}", "run.stop_after_steps=3")
    one = tmp_path / "one" / "checkpoints" / "step-000000003"
    torchrun(*base, "run.name=back", f"run.resume={one}", "run.stop_after_steps=3")
    back = tmp_path / "back" / "checkpoints" / "step-000000003"
    saved = [json.loads((step / COMMIT).read_text()) for step in (two, one, back)]
    assert [m["world_size"] for m in saved] == [2, 1, 2]
    # FSDP2 shards of the trunk and its AdamW moments, the column-wise ID table and its Adagrad state
    reference = full_tensors(two)
    assert any(k.startswith("tables.") for k in reference) and any("exp_avg" in k for k in reference)
    for step in (one, back):
        resharded = full_tensors(step)
        assert resharded.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(resharded[key], value), key
    # an export reads any of them in one process, with the same result
    exports = []
    for step in (two, one):
        assert main(["export", str(step), "--sizes", "8,32", "--out", str(step) + "-export"]) == 0
        exports.append(load_recommender(str(step) + "-export", 32).items)
    assert torch.equal(exports[0], exports[1])
    # the resharded data position: training goes on to the end on 2 ranks
    torchrun(*base, "run.name=back", "run.resume=auto")
    metrics = json.loads((tmp_path / "back" / "metrics.json").read_text())
    assert len(metrics["train_losses"]) > 3 and metrics["test"]


def test_a_checkpoint_of_another_model_is_refused_naming_the_setting(tmp_path, tiny_dataset) -> None:
    single(tmp_path, tiny_dataset, "run.name=m", "run.stop_after_steps=2")
    with pytest.raises(CheckpointError, match=r"model\.nested_sizes was \[8, 16, 32\], now \[8, 16\]"):
        single(tmp_path, tiny_dataset, "run.name=m", "run.resume=auto", "model.nested_sizes=[8,16]")


def test_asynchronous_checkpoints_hold_the_same_state_as_synchronous_ones(tmp_path, tiny_dataset) -> None:
    # training changes the weights while the background thread writes: the staged copy must not
    sync = single(tmp_path, tiny_dataset, "run.name=sync", "run.checkpoint_every=2", "run.keep_checkpoints=9")
    asynchronous = single(
        tmp_path,
        tiny_dataset,
        "run.name=async",
        "run.checkpoint_every=2",
        "run.keep_checkpoints=9",
        "run.async_checkpoint=true",
    )
    assert asynchronous.train_losses == sync.train_losses
    with distributed():
        steps = [s for s, _ in CheckpointManager(str(tmp_path / "sync" / "checkpoints")).complete()]
        assert steps == [s for s, _ in CheckpointManager(str(tmp_path / "async" / "checkpoints")).complete()]
    assert len(steps) > 5
    for step in steps:
        name = f"step-{step:09d}"
        a = full_tensors(tmp_path / "sync" / "checkpoints" / name)
        b = full_tensors(tmp_path / "async" / "checkpoints" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_the_best_weights_survive_pruning_and_resume(tmp_path, tiny_dataset) -> None:
    # a learning rate this high wrecks the model after epoch 2 (13 steps per epoch): the best is early
    settings = ["train.epochs=4", "optim.lr=0.2", "train.patience=9", "run.keep_checkpoints=1"]
    whole = single(tmp_path, tiny_dataset, "run.name=whole", *settings)
    assert whole.best_epoch < 3  # precondition: a later resume must bring back older weights
    single(tmp_path, tiny_dataset, "run.name=cut", *settings, "run.stop_after_steps=45")
    with distributed():
        manager = CheckpointManager(str(tmp_path / "cut" / "checkpoints"), keep_last=1)
        kept = [s for s, _ in manager.complete()]
        best = manager.marker(manager.latest())["best_step"]
    assert kept[-1] == 45 and best in kept and best < 45  # kept for its weights despite keep_checkpoints=1
    resumed = single(tmp_path, tiny_dataset, "run.name=cut", *settings, "run.resume=auto")
    assert resumed.best_epoch == whole.best_epoch
    assert resumed.test_metrics == whole.test_metrics


@pytest.mark.parametrize(
    "backend",
    [["parallel.backend=deepspeed", "parallel.zero_stage=2"], ["parallel.backend=ddp"]],
    ids=["zero2", "ddp"],
)
def test_resume_is_exact_on_the_deepspeed_and_ddp_backends(tmp_path, tiny_dataset, backend) -> None:
    # ZeRO partitions are saved as full tensors (sharding/deepspeed_state.py; test_checkpoint_deepspeed.py
    # covers 2 ranks and every stage); DDP's wrapper must not change the names the nested weights load by
    settings = [*backend, "train.epochs=1"]
    whole = single(tmp_path, tiny_dataset, "run.name=whole", *settings)
    single(tmp_path, tiny_dataset, "run.name=cut", *settings, "run.stop_after_steps=5")
    resumed = single(tmp_path, tiny_dataset, "run.name=cut", *settings, "run.resume=auto")
    assert resumed.train_losses == whole.train_losses and len(whole.train_losses) == 13
    assert resumed.test_metrics == whole.test_metrics
    # its checkpoints export like the run folder (DeepSpeed names the nested weights by their parts)
    for source in (tmp_path / "cut" / "checkpoints", tmp_path / "cut"):
        assert main(["export", str(source), "--sizes", "32", "--out", str(tmp_path / source.name)]) == 0
    assert torch.equal(
        load_recommender(str(tmp_path / "checkpoints"), 32).items,
        load_recommender(str(tmp_path / "cut"), 32).items,
    )


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_tampered_metadata_pickle_is_refused(tmp_path, tiny_dataset) -> None:
    single(tmp_path, tiny_dataset, "run.name=t", "run.stop_after_steps=2")
    step = tmp_path / "t" / "checkpoints" / "step-000000002"
    with open(step / ".metadata", "wb") as f:
        pickle.dump(_Exploit(), f)
    # an attacker who can write the files can rewrite the marker's fingerprint too
    marker = json.loads((step / COMMIT).read_text())
    data = (step / ".metadata").read_bytes()
    marker["files"][".metadata"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / COMMIT).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match=r"\.metadata: the checkpoint metadata refers to posix\.system"):
        single(tmp_path, tiny_dataset, "run.name=t", "run.resume=auto")


def test_a_stop_request_checkpoints_at_a_step_boundary_and_resumes_exactly(tmp_path, tiny_dataset) -> None:
    whole = single(tmp_path, tiny_dataset, "run.name=whole")
    stop_file = tmp_path / "STOP"
    stop_file.touch()  # present from the start: the first step boundary stops
    first = single(tmp_path, tiny_dataset, "run.name=cut", f"run.stop_file={stop_file}")
    assert first.stopped and first.steps == 1 and not first.test_metrics
    assert not stop_file.exists()  # consumed: the launcher knows the trainer acted on it
    # SIGUSR1 in the middle of training, once 3 more steps are logged (the handler only sets a flag)
    keys = tmp_path / "cut" / "sample_keys.rank0.txt"
    done = threading.Event()

    def signal_after_three_steps() -> None:
        start = len(keys.read_text().splitlines())
        while not done.is_set():
            if len(keys.read_text().splitlines()) >= start + 3:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=signal_after_three_steps)
    watcher.start()
    try:
        second = single(tmp_path, tiny_dataset, "run.name=cut", "run.resume=auto")
    finally:
        done.set()
        watcher.join()
    assert second.stopped and 1 < second.steps < len(whole.train_losses)
    with distributed():
        assert (
            CheckpointManager(str(tmp_path / "cut" / "checkpoints"))
            .latest()
            .endswith(f"step-{second.steps:09d}")
        )
    resumed = single(tmp_path, tiny_dataset, "run.name=cut", "run.resume=auto")
    assert not resumed.stopped
    assert resumed.train_losses == whole.train_losses and resumed.test_metrics == whole.test_metrics
