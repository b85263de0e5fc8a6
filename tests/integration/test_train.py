"""Whole single-process runs: artefacts, determinism, early stopping, best-model testing, CLI, learning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from data_pipeline.features import extract_features, load_feature_tables
from data_pipeline.loader import SequenceDataset, eval_batches
from data_pipeline.synthetic_shards import prepare_synthetic
from models.fmrl import AttributeBags, FMRLRec
from trainer.cli import main
from trainer.config import config_to_dict, load_config
from trainer.evaluation.ranking import evaluate_model
from trainer.train import train

TINY = [
    "data.num_workers=0",
    "model.nested_sizes=[8,16,32]",
    "train.epochs=2",
    "train.batch_size=32",
    "optim.warmup_steps=2",
    "train.num_threads=1",
    "eval.batch_size=64",
    "run.progress_bar=false",
]


@pytest.fixture
def tiny_config(tmp_path, tiny_dataset):
    def make(*extra: str):
        return load_config(None, [*TINY, f"data.path={tiny_dataset}", f"run.out_dir={tmp_path}", *extra])

    return make


def trained_model(cfg, run_dir: str) -> tuple[FMRLRec, SequenceDataset]:
    """A fresh model with the run's saved weights and the dataset's frozen features."""
    dataset = SequenceDataset.open(cfg.data.path)
    text, image, _ = load_feature_tables(cfg.data.features_url)
    model = FMRLRec(cfg.model, dataset.num_items, text, image)
    missing, unexpected = model.load_state_dict(
        load_file(os.path.join(run_dir, "model.safetensors")), strict=False
    )
    assert not unexpected and all(k.startswith(("item_tower.text.", "item_tower.image.")) for k in missing)
    return model, dataset


def test_cli_run_writes_every_artefact(tmp_path, tiny_dataset, tiny_config, capsys):
    assert main(["train", *TINY, f"data.path={tiny_dataset}", f"run.out_dir={tmp_path}", "run.name=cli"]) == 0
    run_dir = tmp_path / "cli"
    out = capsys.readouterr().out

    # the resolved config round-trips
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved == config_to_dict(tiny_config("run.name=cli"))

    # per-size table on stdout and on disk, with the baseline row
    table = (run_dir / "test_metrics.txt").read_text()
    for size in ("8", "16", "32", "most-popular"):
        assert any(line.split()[0] == size for line in table.splitlines()[2:]), size
    assert table.strip() in out

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]) == {"8", "16", "32"}
    for values in metrics["test"].values():
        assert set(values) == {f"{m}@{k}" for m in ("NDCG", "Recall", "MRR") for k in (5, 10, 20)}
        assert all(0.0 <= v <= 1.0 for v in values.values())
        assert values["NDCG@5"] <= values["NDCG@10"] <= values["NDCG@20"]
        assert values["Recall@5"] <= values["Recall@10"] <= values["Recall@20"]

    png = (run_dir / "metrics_by_size.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    weights = load_file(str(run_dir / "model.safetensors"))
    assert "trunk.blocks.0.lru.nu_log" in weights and "item_tower.projector.weight" in weights
    assert not any(k.startswith(("item_tower.text.", "item_tower.image.")) for k in weights)  # frozen

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/loss_size_8",
        "train/lr",
        "valid_size_32/NDCG@10",
        "test_size_8/Recall@10",
    } <= tags


def test_same_seed_same_run_other_seed_other_run(tiny_config):
    # with worker processes too: the batch order is a function of the seed and the worker count only
    keys = "run.log_sample_keys=true"
    first = train(tiny_config("run.name=a", "run.loggers=[]", "data.num_workers=2", keys))
    second = train(tiny_config("run.name=b", "run.loggers=[]", "data.num_workers=2", keys))
    other = train(tiny_config("run.name=c", "run.loggers=[]", "data.num_workers=2", keys, "train.seed=7"))
    assert first.steps == second.steps > 0
    assert first.train_losses == second.train_losses
    assert first.test_metrics == second.test_metrics
    assert other.train_losses != first.train_losses
    # train.seed reaches every source of randomness: the batch order (dropout and init: the losses) ...
    order = [open(os.path.join(r.run_dir, "sample_keys.rank0.txt")).read() for r in (first, second, other)]
    assert order[0] == order[1] != order[2]
    # ... and the initial weights: the saved models of two seeds differ in every trunk tensor that
    # starts random (the norms start at 1 and 0, the LRU's imaginary parts at 0), also for the sizes
    trained = [trained_model(tiny_config(), r.run_dir)[0].state_dict() for r in (first, other)]
    random_start = [k for k in trained[0] if k.startswith("trunk.") and "norm" not in k and "_im." not in k]
    assert random_start and all(not torch.equal(trained[0][k], trained[1][k]) for k in random_start)


def test_early_stopping_and_best_model_is_the_one_tested(tiny_config):
    # an lr this small cannot move the validation metric, so epoch 1 stays the best and patience 1 stops at 2
    cfg = tiny_config("run.name=stop", "train.epochs=6", "train.patience=1", "optim.lr=1e-30")
    result = train(cfg)
    assert result.best_epoch == 1
    assert result.steps == 2 * (len(range(0, 200, 32)))  # two epochs of 7 batches (200 users)

    # the saved weights are the tested model: reload them into a fresh model and re-evaluate the test set
    model, dataset = trained_model(cfg, result.run_dir)
    batches = eval_batches(dataset, "test", 64, cfg.train.max_len)
    assert evaluate_model(model, batches, cfg.model.nested_sizes, cfg.eval.ks, False) == result.test_metrics


def test_excluding_history_only_removes_competitors(tiny_config):
    cfg = tiny_config("run.name=hist", "train.epochs=1", "run.loggers=[]")
    result = train(cfg)
    model, dataset = trained_model(cfg, result.run_dir)

    def run(exclude: bool):
        batches = eval_batches(dataset, "test", 64, cfg.train.max_len)
        return evaluate_model(model, batches, cfg.model.nested_sizes, cfg.eval.ks, exclude)

    kept, excluded = run(False), run(True)
    assert kept == result.test_metrics  # the default follows fMRLRec: history is not excluded
    for size in kept:
        assert all(excluded[size][name] >= kept[size][name] for name in kept[size])
    assert any(excluded[s]["MRR@20"] > kept[s]["MRR@20"] for s in kept)


def test_model_learns_and_beats_most_popular(tmp_path):
    # the real pipeline at a size where there is something to learn: shards -> features -> training
    data = str(tmp_path / "data")
    prepare_synthetic(
        data,
        num_items=500,
        num_users=1500,
        num_clusters=20,
        min_seq_len=5,
        max_seq_len=30,
        seed=0,
        max_samples_per_shard=250,
        image_size=32,
        progress=False,
    )
    extract_features(data, image_size=32, chunk_size=128, progress=False)
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            "model.nested_sizes=[8,16,32,64]",
            "train.epochs=4",
            "train.batch_size=64",
            "optim.lr=3e-3",
            "optim.warmup_steps=10",
            "train.num_threads=2",
            "run.progress_bar=false",
            "run.loggers=[]",
            f"run.out_dir={tmp_path}",
            "run.name=learn",
        ],
    )
    result = train(cfg)
    losses = result.train_losses
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3
    model_ndcg = result.test_metrics[64]["NDCG@10"]
    popular_ndcg = result.baseline_metrics["NDCG@10"]
    assert model_ndcg > 1.5 * popular_ndcg, (model_ndcg, popular_ndcg)
    # the nested series: more width, better ranking
    assert result.test_metrics[64]["NDCG@10"] > result.test_metrics[8]["NDCG@10"]


def test_a_missing_dataset_is_a_clear_error(tmp_path):
    cfg = load_config(
        None, [f"data.path={tmp_path}/nowhere", f"run.out_dir={tmp_path}", "run.progress_bar=false"]
    )
    with pytest.raises(
        ValueError, match=r"nowhere/dataset\.json does not exist.*fmrl data prepare-synthetic"
    ):
        train(cfg)


def test_features_of_another_dataset_are_refused(tmp_path, tiny_dataset):
    other = str(tmp_path / "other")
    prepare_synthetic(
        other,
        num_items=20,
        num_users=30,
        num_clusters=4,
        min_seq_len=5,
        max_seq_len=8,
        seed=0,
        image_size=32,
        progress=False,
    )
    cfg = load_config(
        None,
        [
            f"data.path={other}",
            f"data.features={tiny_dataset}/features",
            f"run.out_dir={tmp_path}",
            "run.progress_bar=false",
        ],
    )
    with pytest.raises(ValueError, match=r"cover 150 items but the dataset at .*other has 20"):
        train(cfg)


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "train.lrr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "train.lrr" in err and "lr" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  nested_sizes: [16, 8]\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "model.nested_sizes" in capsys.readouterr().err


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "fmrl")
    assert os.access(script, os.X_OK), "the `fmrl` console script is missing from the environment"
    out = subprocess.run([script, "train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "KEY=VALUE" in out


# item counts, feature widths and attribute counts of the datasets the shipped configs are for (beauty.yaml:
# the paper's encoders; amazon-beauty.yaml: the bundled S3-Rec release with its 637 attributes)
SHIPPED = {
    "configs/demo.yaml": (2000, 384, 1280, 0),
    "configs/ml-100k.yaml": (1349, 384, 0, 0),
    "configs/ml-100k-official.yaml": (1349, 384, 0, 0),
    "configs/beauty.yaml": (12101, 1024, 1024, 0),
    "configs/amazon-beauty.yaml": (12101, 0, 0, 637),
    "configs/synthetic-1m.yaml": (1_000_000, 0, 0, 0),
}


@pytest.mark.parametrize("path", sorted(SHIPPED))
def test_shipped_configs_build_their_model(path):
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", path))
    num_items, text_dim, image_dim, num_attributes = SHIPPED[path]
    bags = None
    if num_attributes:
        bags = AttributeBags(
            torch.zeros(num_items + 2, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 637
        )
    with torch.device("meta"):
        model = FMRLRec(
            cfg.model,
            num_items,
            torch.empty(num_items + 1, text_dim) if text_dim else None,
            torch.empty(num_items + 1, image_dim) if image_dim else None,
            bags,
        )
    assert model.num_parameters() > 0


def test_torchrun_two_ranks_end_to_end(tmp_path, tiny_dataset):
    # the demo's path: the CLI under torchrun, TorchRec tables + FSDP2, artefacts written once by rank 0
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
        "run.name=two",
        "train.epochs=2",
        "train.batch_size=16",
        "train.num_threads=1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = tmp_path / "two"
    assert done.stdout.count("Test metrics of the best model") == 1  # printed by rank 0 only
    plan = (run_dir / "sharding_plan.txt").read_text()
    assert "table_wise" in plan and "text" in plan and "image" in plan
    # the two feature tables went to different ranks
    assert "rank:0/cpu" in plan and "rank:1/cpu" in plan
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2 * 7  # 100 users per rank (2 of the 4 shards), 16 per step: 7 steps per epoch
    # the weights gathered on rank 0 reproduce the distributed test metrics on one process
    cfg = load_config(None, [*TINY, f"data.path={tiny_dataset}"])
    model, dataset = trained_model(cfg, str(run_dir))
    single = evaluate_model(
        model, eval_batches(dataset, "test", 64, cfg.train.max_len), [8, 16, 32], [5, 10, 20], False
    )
    for size, values in single.items():
        for name, value in values.items():
            assert metrics["test"][str(size)][name] == pytest.approx(value, abs=1e-6), (size, name)
