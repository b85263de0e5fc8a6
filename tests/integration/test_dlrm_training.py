"""DLRM through the shared trainer (``task: dlrm``): it learns the synthetic CTR data better than a logistic
regression, 2 gloo ranks follow 1 rank step for step on the same global batches (FSDP2 and DeepSpeed,
table-wise sharded tables), a run stopped mid-epoch resumes exactly, a 2-rank checkpoint resumes on 1 rank
(resharded tables, optimizer state and data position), and checkpoints of the other task or of another
DLRM are refused with the reason.

    .venv/bin/python -m pytest -q tests/integration/test_dlrm_training.py

This file is also the worker of the 2-rank comparison (run under torchrun, see ``worker``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from data_pipeline.ctr import CTRDataset, iter_ctr_batches
from data_pipeline.synthetic_ctr import prepare_synthetic_ctr
from models.dlrm import roc_auc
from trainer.checkpoint import CheckpointError, CheckpointManager
from trainer.cli import main
from trainer.config import config_to_dict, load_config
from trainer.dist import distributed
from trainer.export import load_click_model
from trainer.train import incompatible, train

COMMON = [
    "task=dlrm",
    "dlrm.embedding_dim=8",
    "dlrm.bottom_mlp=[32,8]",
    "dlrm.top_mlp=[32,1]",
    "optim.lr=2e-3",
    "optim.weight_decay=0",
    "optim.warmup_steps=5",
    "train.num_threads=1",
    "parallel.table_lr=0.05",
    "eval.batch_size=2048",
    "data.num_workers=0",
    "run.progress_bar=false",
    "run.loggers=[]",
    "run.export=false",
]
# float32 sums re-associated over ranks; 2e-7 relative per step measured for fMRL
LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-4


def run(tmp_path, data: str, *overrides: str):
    return train(load_config(None, [*COMMON, f"data.path={data}", f"run.out_dir={tmp_path}", *overrides]))


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> str:
    """20,000 impressions (16k train, 2k valid, 2k test), 4 train shards."""
    out = str(tmp_path_factory.mktemp("ctr") / "learnable")
    prepare_synthetic_ctr(out, rows=20_000, seed=0, hash_buckets=200, max_samples_per_shard=4000)
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    """3,000 impressions (2,400 train in 12 shards of 200; 300 valid and 300 test, each in shards of 200 and
    100, so that 2 ranks evaluate different amounts)."""
    out = str(tmp_path_factory.mktemp("ctr") / "small")
    prepare_synthetic_ctr(out, rows=3000, seed=1, hash_buckets=100, max_samples_per_shard=200)
    return out


def logistic_regression_auc(data: str, buckets: int) -> float:
    """Test AUC of a logistic regression on one-hot hashed categorical + dense features (full batch,
    Adam, a little L2), trained on the same train split."""
    (tr,) = iter_ctr_batches(data, "train", batch_size=1_000_000)
    (te,) = iter_ctr_batches(data, "test", batch_size=1_000_000)
    torch.manual_seed(0)
    offsets = torch.arange(tr.sparse.shape[1]) * buckets
    weights = torch.zeros(tr.sparse.shape[1] * buckets, 1, requires_grad=True)
    slopes = torch.zeros(tr.dense.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)

    def logits(batch) -> torch.Tensor:
        hot = torch.nn.functional.embedding_bag(batch.sparse + offsets, weights, mode="sum").squeeze(-1)
        return hot + batch.dense @ slopes + bias

    opt = torch.optim.Adam([weights, slopes, bias], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(tr), tr.labels)
        (loss + 1e-4 * weights.square().sum()).backward()
        opt.step()
    with torch.no_grad():
        return roc_auc(logits(te), te.labels)


def test_dlrm_learns_the_synthetic_clicks_better_than_logistic_regression(tmp_path, learnable) -> None:
    result = run(tmp_path, learnable, "run.name=dlrm", "train.epochs=4", "train.batch_size=128")
    lr_auc = logistic_regression_auc(learnable, 200)
    dlrm_auc = result.test_metrics["auc"]
    print(f"test AUC: DLRM {dlrm_auc:.4f}, logistic regression {lr_auc:.4f}")
    assert lr_auc > 0.6  # the baseline is a real one
    assert dlrm_auc > 0.7 and dlrm_auc > lr_auc + 0.02
    assert result.test_metrics["ne"] < 0.95  # better than the constant click rate
    assert result.train_losses[-1] < result.train_losses[0]
    metrics = json.loads((tmp_path / "dlrm" / "metrics.json").read_text())
    assert metrics["test"]["auc"] == dlrm_auc and metrics["constant"]["auc"] == 0.5
    assert (tmp_path / "dlrm" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------- 1 rank vs 2 ranks


def worker() -> None:
    """One rank: 12 steps on fixed global batches (rank r takes rows r, r+W, ... of global batch g, the
    g-th batch of the train split in file order); rank 0 writes losses, weights and valid metrics."""
    from models.ctr import build_ctr_model
    from sharding.config import OptimConfig, ParallelConfig
    from sharding.dlrm import parallelize_dlrm
    from trainer.dist import all_reduce_sum
    from trainer.evaluation.ctr import evaluate_ctr
    from trainer.tasks.dlrm import forward_backward

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--backend", default="fsdp2")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--table-sharding", default="auto")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="dlrm")
    parser.add_argument("--crosses", default="[]")
    args = parser.parse_args()
    with distributed() as (world, device):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        dataset = CTRDataset.open(args.data)
        settings = [*COMMON, f"dlrm.model={args.model}"]
        if args.model == "wide_deep":
            settings.append(f"dlrm.wide_crosses={args.crosses}")
        cfg = load_config(None, settings).dlrm.model_config(
            num_dense=len(dataset.dense_features),
            hash_buckets=dataset.hash_buckets,
            feature_names=dataset.sparse_features,
        )
        parallel = parallelize_dlrm(
            build_ctr_model(cfg),
            ParallelConfig(
                backend=args.backend,
                zero_stage=args.zero_stage,
                table_sharding=args.table_sharding,
                table_lr=0.05,
            ),
            OptimConfig(lr=2e-3, weight_decay=0.0, warmup_steps=2, grad_clip=5.0),
            total_steps=args.steps,
            micro_batch_size=args.global_batch // world.world_size,
            device=device,
        )
        parallel.set_training(True)
        losses = []
        batches = iter_ctr_batches(args.data, "train", args.global_batch)
        for _, batch in zip(range(args.steps), batches):
            rows = torch.arange(world.rank, args.global_batch, world.world_size)
            mine = type(batch)(batch.dense[rows], batch.sparse[rows], batch.labels[rows])
            loss_sum, count = forward_backward(parallel, mine, world.world_size)
            parallel.micro_step(True)
            total = all_reduce_sum(torch.tensor([loss_sum, count]))
            losses.append(float(total[0] / total[1]))
        metrics = evaluate_ctr(parallel, args.data, "valid", 128, world)
        weights = parallel.full_state_dict()
        # model.safetensors as the trainer writes it, every rank its share of 64-row blocks: the same
        # tensors, and no table whole on any rank
        from safetensors.torch import load_file

        import trainer.train

        trainer.train.WEIGHT_BLOCK_ROWS = 64
        path = args.out + ".safetensors"
        wrote = trainer.train.save_weights(parallel, path)
        assert all(rows <= 64 for rows in wrote.largest_block_rows.values()), wrote
        assert all(key.startswith("sparse_arch.") for key in wrote.largest_block_rows), wrote
        if world.rank == 0:
            assert weights is not None
            written = load_file(path)
            assert written.keys() == weights.keys()
            for key, value in weights.items():
                assert torch.equal(written[key], value), key
            out = {
                "world_size": world.world_size,
                "losses": losses,
                "metrics": metrics,
                "weights": {k: v.flatten().tolist() for k, v in weights.items()},
            }
            with open(args.out, "w") as f:
                json.dump(out, f)


def run_worker(data: str, out: str, ranks: int, *args: str) -> dict:
    command = [sys.executable, __file__]
    if ranks > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            __file__,
        ]
    done = subprocess.run(
        [*command, "--data", data, "--out", out, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def one_rank(small, tmp_path_factory) -> dict:
    return run_worker(small, str(tmp_path_factory.mktemp("ref") / "one.json"), 1)


@pytest.mark.parametrize(
    "backend_args",
    [
        ("--backend", "fsdp2"),  # table-wise tables ("auto" on CPU)
        ("--backend", "deepspeed", "--zero-stage", "2", "--table-sharding", "column_wise"),
    ],
    ids=["fsdp2-table_wise", "zero2-column_wise"],
)
def test_two_ranks_follow_one_rank(small, one_rank, tmp_path, backend_args) -> None:
    two = run_worker(small, str(tmp_path / "two.json"), 2, *backend_args)
    assert two["world_size"] == 2 and one_rank["world_size"] == 1
    one_losses, two_losses = np.array(one_rank["losses"]), np.array(two["losses"])
    assert len(one_losses) == 12 and one_losses[-3:].mean() < one_losses[:3].mean()
    np.testing.assert_allclose(two_losses, one_losses, rtol=LOSS_RTOL)
    assert one_rank["weights"].keys() == two["weights"].keys()
    assert "sparse_arch.embedding_bag_collection.embedding_bags.t_cat_0.weight" in two["weights"]
    for key, value in one_rank["weights"].items():
        np.testing.assert_allclose(two["weights"][key], value, rtol=WEIGHT_RTOL, atol=1e-7, err_msg=key)
    for name in ("auc", "logloss"):
        assert two["metrics"][name] == pytest.approx(one_rank["metrics"][name], abs=1e-5), name


@pytest.mark.parametrize(
    "model_args",
    [
        ("--model", "wide_deep", "--crosses", "[cat_0*cat_1,cat_2*cat_5]", "--backend", "fsdp2"),
        ("--model", "xdeepfm", "--backend", "ddp", "--table-sharding", "column_wise"),
    ],
    ids=["wide_deep-fsdp2-table_wise", "xdeepfm-ddp-column_wise"],
)
def test_ctr_models_with_linear_tables_follow_one_rank_on_two(small, tmp_path, model_args) -> None:
    """The first-order tables (and the crossed features' tables) shard like the embeddings:
    2 ranks take the same steps as 1, table-wise and column-wise."""
    one = run_worker(small, str(tmp_path / "one.json"), 1, *model_args, "--steps", "6")
    two = run_worker(small, str(tmp_path / "two.json"), 2, *model_args, "--steps", "6")
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=LOSS_RTOL)
    linear = [k for k in one["weights"] if "linear_bag_collection" in k]
    assert len(linear) == 26 + (2 if "wide_deep" in model_args else 0)
    assert one["weights"].keys() == two["weights"].keys()
    for key, value in one["weights"].items():
        # atol: float sums re-associated over ranks. An Adagrad-stepped entry near 0 moved 3e-7 apart; and
        # AdamW's first step moves an entry by lr * g / (|g| + eps), so an entry whose gradient cancels to
        # ~eps (1e-8) moves by a fraction of lr that re-association changes: xdeepfm's over_arch.0.weight
        # entry 3441 is 1.58e-5 apart after step 1 and stays so (measured with this file's worker, 1 vs 2
        # ranks, --steps 1, 3 and 6)
        np.testing.assert_allclose(two["weights"][key], value, rtol=WEIGHT_RTOL, atol=5e-5, err_msg=key)


# ------------------------------------------------------------------------------------ checkpoints, resume


def test_resume_mid_epoch_is_exact_and_other_checkpoints_are_refused(tmp_path, small) -> None:
    settings = ["train.epochs=2", "train.batch_size=100", "run.checkpoint_every=5"]  # 24 steps per epoch
    whole = run(tmp_path, small, "run.name=whole", *settings)
    assert whole.steps == 48 and not whole.stopped
    cut = run(tmp_path, small, "run.name=cut", *settings, "run.stop_after_steps=13")
    assert cut.stopped and cut.steps == 13 and not cut.test_metrics
    resumed = run(tmp_path, small, "run.name=cut", *settings, "run.resume=auto")
    assert resumed.train_losses == whole.train_losses  # bit for bit, step for step
    assert resumed.valid_metrics == whole.valid_metrics and resumed.test_metrics == whole.test_metrics

    # another DLRM cannot load it, naming the setting
    with pytest.raises(CheckpointError, match=r"dlrm\.embedding_dim was 8, now 16"):
        run(
            tmp_path,
            small,
            "run.name=cut",
            *settings,
            "run.resume=auto",
            "dlrm.embedding_dim=16",
            "dlrm.bottom_mlp=[32,16]",
        )
    # an fMRL run refuses a DLRM checkpoint and vice versa (trainer.train.incompatible, one check for both)
    with distributed():
        url = CheckpointManager(str(tmp_path / "cut" / "checkpoints")).latest()
        assert url is not None
        marker = CheckpointManager(str(tmp_path / "cut" / "checkpoints")).marker(url)
    fmrl = {"config": config_to_dict(load_config(None, [])), "num_items": 150}
    assert incompatible(marker, fmrl, "model") == ["task was 'dlrm', now 'fmrl'"]
    dlrm = {**marker, "config": config_to_dict(load_config(None, COMMON))}
    fmrl_marker = {**fmrl, "step": 3, "world_size": 1}
    assert incompatible(fmrl_marker, dlrm, "dlrm") == ["task was 'fmrl', now 'dlrm'"]
    # a data set with other tables: named with both values
    other = {**dlrm, "hash_buckets": [7] * len(marker["hash_buckets"])}
    assert incompatible(marker, other, "dlrm") == [
        f"the data set has hash_buckets {other['hash_buckets']}, the checkpoint {marker['hash_buckets']}"
    ]


def test_a_two_rank_checkpoint_resumes_on_one_rank(tmp_path, small) -> None:
    settings = [*COMMON, f"data.path={small}", f"run.out_dir={tmp_path}", "train.epochs=2"]
    settings += ["train.batch_size=100", "run.log_sample_keys=true"]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["-m", "trainer.cli", "train", *settings, "run.name=two", "run.stop_after_steps=5"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    two = tmp_path / "two" / "checkpoints" / "step-000000005"
    # resume at step 5 on one rank and stop at once: the checkpoint it writes holds what it loaded
    one = train(load_config(None, [*settings, "run.name=one", f"run.resume={two}", "run.stop_after_steps=5"]))
    assert one.stopped and one.steps == 5
    saved, resharded = (
        CheckpointManager(str(step.parent)).read_full(str(step))
        for step in (two, tmp_path / "one" / "checkpoints" / "step-000000005")
    )
    tensors = [k for k, v in saved.items() if isinstance(v, torch.Tensor)]
    # the table-wise tables and their fused Adagrad state, the FSDP2 MLPs and their AdamW moments
    assert sum(k.startswith("tables.") for k in tensors) == 26  # one per categorical feature
    assert sum(k.startswith("tables_optimizer.") and "momentum" in k for k in tensors) == 26
    assert any("exp_avg" in k for k in tensors)
    assert all(torch.equal(saved[k], resharded[k]) for k in tensors)
    # either checkpoint exports the same click model in one process, whatever layout wrote it
    test = next(iter_ctr_batches(small, "test", 300))
    predictions = []
    for step in (two, tmp_path / "one" / "checkpoints" / "step-000000005"):
        assert main(["export", str(step), "--out", str(step) + "-export"]) == 0
        predictions.append(load_click_model(str(step) + "-export").predict(test.dense, test.sparse))
    assert torch.equal(predictions[0], predictions[1]) and predictions[0].shape == (300,)
    assert main(["export", str(two), "--sizes", "8", "--out", str(tmp_path / "x")]) == 2  # no sizes

    # the data position: the rest of epoch 1 reads exactly the impressions the 2 ranks had not
    finished = train(load_config(None, [*settings, "run.name=one", "run.resume=auto", "run.export=true"]))
    assert not finished.stopped and finished.test_metrics["auc"] > 0.5
    lines = [(tmp_path / "two" / f"sample_keys.rank{r}.txt").read_text().split() for r in range(2)]
    lines.append((tmp_path / "one" / "sample_keys.rank0.txt").read_text().split())
    reads = Counter(key for keys in lines for key in keys)
    assert len(reads) == 2400 and set(reads.values()) == {2}, Counter(reads.values())
    # the run's export (its best model) reproduces the run's test AUC
    clicks = load_click_model(str(tmp_path / "one" / "export")).predict(test.dense, test.sparse)
    assert roc_auc(clicks, test.labels) == pytest.approx(finished.test_metrics["auc"], abs=1e-9)


MODEL_SETTINGS = {
    "dlrm": [],
    "wide_deep": [
        "dlrm.model=wide_deep",
        "dlrm.wide_crosses=[cat_0*cat_1,cat_3*cat_7]",
        "dlrm.wide_cross_buckets=500",
    ],
    "deepfm": ["dlrm.model=deepfm"],
    "dcn": [
        "dlrm.model=dcn",
        "dlrm.dcn_num_layers=2",
        "dlrm.dcn_structure=parallel",
        "dlrm.dcn_deep_mlp=[16]",
    ],
    "dcn_v2": [
        "dlrm.model=dcn_v2",
        "dlrm.dcn_num_layers=2",
        "dlrm.dcn_low_rank_dim=8",
        "dlrm.dcn_num_experts=2",
    ],
    "xdeepfm": ["dlrm.model=xdeepfm", "dlrm.cin_layers=[8,8]"],
}


@pytest.mark.parametrize("model", list(MODEL_SETTINGS))
def test_each_ctr_model_trains_resumes_exactly_and_exports(tmp_path, small, model) -> None:
    """Every ``dlrm.model`` on the one path: train, checkpoint, stop mid-epoch, resume bit for bit,
    export the run and a checkpoint, reload both with the predictions the run's metrics came from."""
    settings = [*MODEL_SETTINGS[model], "train.epochs=1", "train.batch_size=200", "run.checkpoint_every=4"]
    whole = run(tmp_path, small, "run.name=whole", *settings, "run.export=true")
    # learns: the last 3 steps' losses below the first 3's (one 200-row batch's loss is noisy: deepfm's
    # jumps to 2.3 at step 4 and its last is above its first; to 3.2 at step 3 under TorchRec's own init)
    assert whole.steps == 12 and np.mean(whole.train_losses[-3:]) < np.mean(whole.train_losses[:3])
    cut = run(tmp_path, small, "run.name=cut", *settings, "run.stop_after_steps=6")
    assert cut.stopped and cut.steps == 6
    resumed = run(tmp_path, small, "run.name=cut", *settings, "run.resume=auto")
    assert resumed.train_losses == whole.train_losses
    assert resumed.test_metrics == whole.test_metrics
    test = next(iter_ctr_batches(small, "test", 300))
    exported = load_click_model(str(tmp_path / "whole" / "export"))
    assert exported.model.cfg.model == model
    clicks = exported.predict(test.dense, test.sparse)
    assert roc_auc(clicks, test.labels) == pytest.approx(whole.test_metrics["auc"], abs=1e-9)
    # the best checkpoint (one epoch: the last) exports the same model
    checkpoints = str(tmp_path / "whole" / "checkpoints")
    assert main(["export", checkpoints, "--out", str(tmp_path / "from-checkpoint")]) == 0
    again = load_click_model(str(tmp_path / "from-checkpoint")).predict(test.dense, test.sparse)
    assert torch.equal(again, clicks)
    # another model cannot resume this one's checkpoints
    other = "deepfm" if model != "deepfm" else "xdeepfm"
    with pytest.raises(CheckpointError, match=rf"dlrm\.model was '{model}', now '{other}'"):
        run(
            tmp_path,
            small,
            "run.name=cut",
            *settings[len(MODEL_SETTINGS[model]) :],
            f"dlrm.model={other}",
            "run.resume=auto",
        )


def test_the_obp_config_trains_and_exports_on_real_clicks(tmp_path) -> None:
    """configs/dlrm-obp.yaml end to end through the CLI on the Open Bandit Dataset sample (real
    impressions, ~0.4% clicks): too few clicks for a meaningful AUC, so this checks the pipeline on real
    features: training reaches the base rate's loss, every test impression is scored, the export loads."""
    from data_pipeline.obp import convert_obp

    convert_obp(str(tmp_path / "obp"), policy="random", campaign="all")
    overrides = [f"data.path={tmp_path / 'obp'}", f"run.out_dir={tmp_path}", "run.name=obp", "train.epochs=2"]
    overrides += ["train.num_threads=1", "run.progress_bar=false", "run.loggers=[]"]
    assert main(["train", "--config", "configs/dlrm-obp.yaml", *overrides]) == 0
    metrics = json.loads((tmp_path / "obp" / "metrics.json").read_text())
    dataset = CTRDataset.open(str(tmp_path / "obp"))
    rate = dataset.meta["splits"]["train"]["positive_rate"]
    base_rate_loss = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))  # ~0.03 nats
    assert metrics["train_losses"][0] > 0.3  # a fresh model's logits sit near p = 0.5
    assert np.mean(metrics["train_losses"][-10:]) < 2 * base_rate_loss
    assert metrics["test"]["impressions"] == 1000 and np.isfinite(metrics["test"]["logloss"])
    test = next(iter_ctr_batches(str(tmp_path / "obp"), "test", 1000))
    clicks = load_click_model(str(tmp_path / "obp" / "export")).predict(test.dense, test.sparse)
    assert clicks.shape == (1000,) and float(clicks.max()) < 0.5


if __name__ == "__main__":
    worker()
