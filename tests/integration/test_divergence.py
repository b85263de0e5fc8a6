"""A diverged run is a failure, never a result: a non-finite loss or gradient norm stops training (or, if
asked, skips the step, counted, up to train.skip_nonfinite_steps), non-finite weights are never
evaluated, the run exits 1 saying "diverged"; and resuming with a lower train.max_steps trains no more."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from trainer.cli import main
from trainer.config import load_config
from trainer.state import DivergedError
from trainer.train import train

TINY = [
    "data.num_workers=0",
    "model.nested_sizes=[8,16,32]",
    "train.epochs=2",
    "train.batch_size=32",
    "optim.warmup_steps=0",
    "train.num_threads=1",
    "eval.batch_size=64",
    "run.progress_bar=false",
    "run.loggers=[]",
]


@pytest.fixture
def tiny_args(tmp_path, tiny_dataset):
    def make(*extra: str) -> list[str]:
        return [*TINY, f"data.path={tiny_dataset}", f"run.out_dir={tmp_path}", *extra]

    return make


def test_a_huge_learning_rate_fails_the_run_naming_the_step(tmp_path, tiny_args, capsys):
    # before: `loss nan`, every epoch "(best)", rc 0 and NDCG@10 = 1.0000 at every size
    assert main(["train", *tiny_args("run.name=huge", "optim.lr=1e30")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # the one line after the log lines
    assert last.startswith("fmrl train: training diverged: non-finite loss (nan) at step "), last
    assert "(epoch 1)" in last and "optim.lr" in last
    run_dir = tmp_path / "huge"
    # nothing that looks like a result: no weights, no test table, no report
    for name in ("model.safetensors", "test_metrics.txt", "metrics.json"):
        assert not (run_dir / name).exists(), name
    assert "DivergedError: non-finite loss (nan) at step" in (run_dir / "train.log").read_text()


def test_skipped_steps_are_counted_and_the_run_stops_after_the_allowed_number(tiny_args, caplog):
    cfg = load_config(None, tiny_args("run.name=skip", "optim.lr=1e30", "train.skip_nonfinite_steps=2"))
    with pytest.raises(DivergedError, match=r"at step (\d+) .*\(2 skipped before") as failure:
        train(cfg)
    skipped = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(skipped) == 2 and "1 of 2 allowed" in skipped[0] and "2 of 2 allowed" in skipped[1]
    # the steps in a row: the one failing is the third non-finite one
    first = int(skipped[0].split()[1])
    assert f"at step {first + 2} " in str(failure.value)


def test_a_run_within_its_skip_allowance_reports_the_skips_and_ranks_nan_scores_last(tiny_args, tmp_path):
    # step 1 moves every weight by ~1e30 (finite), so step 2's loss is NaN: skipped, the one allowed; the
    # budget (2 steps) ends the run, whose model scores NaN: it must rank its targets last, not first
    result = train(
        load_config(
            None,
            tiny_args(
                "run.name=within", "optim.lr=1e30", "train.max_steps=2", "train.skip_nonfinite_steps=1"
            ),
        )
    )
    assert result.steps == 2 and result.skipped_steps == 1
    assert math.isfinite(result.train_losses[0]) and math.isnan(result.train_losses[1])
    metrics = json.loads((tmp_path / "within" / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 1
    for size in ("8", "16", "32"):  # before: 1.0 at every size
        assert metrics["test"][size]["NDCG@10"] == metrics["valid"][size]["NDCG@10"] == 0.0


def test_nonfinite_table_weights_are_never_evaluated(tiny_args):
    # skipped steps leave the dense weights alone, but the learnable ID table steps inside backward (its
    # fused optimizer): with NaN gradients it turns NaN, and the validation must refuse it, not call the
    # epoch "(best)" with NDCG@10 = 1.0
    cfg = load_config(
        None,
        tiny_args(
            "run.name=table",
            "optim.lr=1e30",
            "model.use_id_embedding=true",
            "train.epochs=1",
            "train.skip_nonfinite_steps=100",
        ),
    )
    with pytest.raises(DivergedError, match=r"weights hold NaN or infinity .*id.*validation of epoch 1"):
        train(cfg)


def test_resuming_with_a_lower_max_steps_trains_no_more(tiny_args, tmp_path):
    first = train(
        load_config(None, tiny_args("run.name=steps", "train.max_steps=3", "run.checkpoint_every=1"))
    )
    assert first.steps == 3
    resumed = train(load_config(None, tiny_args("run.name=steps", "train.max_steps=2", "run.resume=auto")))
    assert resumed.steps == 3  # before: 4, one more step past the checkpoint
    assert resumed.train_losses == first.train_losses
    assert os.path.exists(os.path.join(resumed.run_dir, "model.safetensors"))


@pytest.mark.parametrize("block_checksums", [True, False])
def test_flipped_feature_bytes_fail_the_start_naming_the_file(
    tmp_path, tiny_args, tiny_dataset, capsys, block_checksums
):
    # before: training went on with `loss nan` and reported NDCG@10 = 1.0000 at every size
    features = tmp_path / "features"
    shutil.copytree(os.path.join(tiny_dataset, "features"), features)
    if not block_checksums:  # a folder written before block checksums: the whole file's sha256 is checked
        info = json.loads((features / "features.json").read_text())
        info = {k: v for k, v in info.items() if not k.endswith("_blocks")}
        (features / "features.json").write_text(json.dumps(info))
    table = features / "text_features.safetensors"
    data = bytearray(table.read_bytes())
    data[-4 * 384 * 10 - 1] ^= 0x7F  # the high byte of a value of item 140: a NaN or a huge number
    table.write_bytes(bytes(data))
    assert main(["train", *tiny_args("run.name=flipped", f"data.features={features}")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"fmrl train: error: {table} is corrupt: "), last
    if block_checksums:
        assert "block 23 (rows 0:151, columns 368:384)" in last, last
    else:
        assert "sha256 differs" in last, last
    assert not (tmp_path / "flipped").exists()  # a failed start leaves no run folder


def test_rerunning_features_adds_block_checksums_to_an_old_folder(tmp_path, tiny_dataset):
    from data_pipeline.features import extract_features, open_feature_tables

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    features = data / "features"
    info = json.loads((features / "features.json").read_text())
    old = {k: v for k, v in info.items() if not k.endswith("_blocks")}  # as written before block checksums
    (features / "features.json").write_text(json.dumps(old))
    for name in ("text_features.blocks", "image_features.blocks"):
        (features / name).unlink()
    plan = json.loads((features / "parts" / "plan.json").read_text())  # the copy's own data set path
    (features / "parts" / "plan.json").write_text(json.dumps({**plan, "dataset_url": str(data)}))
    info["dataset_url"] = str(data)
    assert open_feature_tables(str(features))[0].blocks is None  # still readable
    summary = extract_features(str(data), image_size=32, chunk_size=64, progress=False)
    assert summary.chunks_computed == 0 and summary.merged  # nothing encoded again: only the merge
    assert json.loads((features / "features.json").read_text()) == info
    assert open_feature_tables(str(features))[0].blocks is not None


@pytest.mark.parametrize("backend", ["fsdp2", "ddp"])
def test_a_skipped_step_leaves_the_dense_weights_and_optimizer_alone(backend):
    import torch

    from sharding.backends import wrap_dense
    from sharding.config import OptimConfig, ParallelConfig
    from trainer.dist import distributed

    with distributed():
        torch.manual_seed(0)
        dense = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        wrapped = wrap_dense(
            dense,
            [dense[0]],
            ParallelConfig(backend=backend),
            OptimConfig(lr=0.1, warmup_steps=0),
            total_steps=10,
            micro_batch_size=2,
            device=torch.device("cpu"),
        )

        def backward(x: torch.Tensor) -> None:
            wrapped.backward(wrapped.module(x).sum())

        backward(torch.ones(2, 4))
        assert math.isfinite(wrapped.clip_gradients())
        wrapped.step(True)  # a normal step: the optimizer has state
        before = [t.detach().clone() for t in wrapped.local_tensors()]
        optimizer_state = wrapped.state_dict()["dense_optimizer"]  # "state.<name>.exp_avg" etc.: no lr
        state = {k: _copy(v) for k, v in optimizer_state.items() if k.startswith("state.")}
        backward(torch.full((2, 4), math.nan))
        assert not math.isfinite(wrapped.clip_gradients())
        wrapped.skip_step()
        assert all(torch.equal(a, b) for a, b in zip(before, wrapped.local_tensors(), strict=True))
        after = wrapped.state_dict()["dense_optimizer"]
        assert state and all(_copy(after[k]) == state[k] for k in state)
        assert all(p.grad is None for p in wrapped.parameters())  # nothing left for the next step
        assert wrapped.scheduler.last_epoch == 2  # the schedule follows the step count
        backward(torch.ones(2, 4))
        assert math.isfinite(wrapped.clip_gradients())
        wrapped.step(True)
        assert not torch.equal(before[0], wrapped.local_tensors()[0])


def _copy(value):
    """An optimizer state entry as plain Python (DTensors as their local values), for comparisons."""
    return (
        value.to_local().tolist() if hasattr(value, "to_local") else getattr(value, "tolist", lambda: value)()
    )


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_a_diverged_dlrm_fails_under_every_backend(tmp_path, backend):
    # the other task family and the dense backend that steps by itself (DeepSpeed: its own clipping)
    from data_pipeline.synthetic_ctr import prepare_synthetic_ctr

    data = str(tmp_path / "ctr")
    prepare_synthetic_ctr(data, rows=1000, seed=1, hash_buckets=50, max_samples_per_shard=500)
    args = [
        "task=dlrm",
        "dlrm.embedding_dim=8",
        "dlrm.bottom_mlp=[16,8]",
        "dlrm.top_mlp=[16,1]",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "train.num_threads=1",
        "train.batch_size=64",
        "data.num_workers=0",
        "run.progress_bar=false",
        "run.loggers=[]",
        f"parallel.backend={backend}",
        f"data.path={data}",
        f"run.out_dir={tmp_path}",
    ]
    with pytest.raises(DivergedError, match=r"non-finite (loss|gradient norm) .* at step \d+ \(epoch 1\)"):
        train(load_config(None, args))
