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

from data_pipeline.sequences import LeaveOneOutSplit, eval_batches
from models.fmrl import FMRLRec
from trainer.cli import main
from trainer.config import config_to_dict, load_config
from trainer.evaluate import evaluate
from trainer.train import load_catalog, train

TINY = [
    "data.num_items=150",
    "data.num_users=200",
    "data.num_clusters=10",
    "data.text_dim=16",
    "data.image_dim=12",
    "data.max_seq_len=12",
    "model.nested_sizes=[8,16,32]",
    "train.epochs=2",
    "train.batch_size=32",
    "train.warmup_steps=2",
    "train.num_threads=1",
    "eval.batch_size=64",
    "run.progress_bar=false",
]


def tiny_config(tmp_path, *extra: str):
    return load_config(None, [*TINY, f"run.out_dir={tmp_path}", *extra])


def test_cli_run_writes_every_artefact(tmp_path, capsys):
    assert main(["train", *TINY, f"run.out_dir={tmp_path}", "run.name=cli"]) == 0
    run_dir = tmp_path / "cli"
    out = capsys.readouterr().out

    # the resolved config round-trips
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved == config_to_dict(tiny_config(tmp_path, "run.name=cli"))

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


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    first = train(tiny_config(tmp_path, "run.name=a", "run.tensorboard=false"))
    second = train(tiny_config(tmp_path, "run.name=b", "run.tensorboard=false"))
    other = train(tiny_config(tmp_path, "run.name=c", "run.tensorboard=false", "train.seed=7"))
    assert first.steps == second.steps > 0
    assert first.train_losses == second.train_losses
    assert first.test_metrics == second.test_metrics
    assert other.train_losses != first.train_losses


def test_early_stopping_and_best_model_is_the_one_tested(tmp_path):
    # an lr this small cannot move the validation metric, so epoch 1 stays the best and patience 1 stops at 2
    cfg = tiny_config(tmp_path, "run.name=stop", "train.epochs=6", "train.patience=1", "train.lr=1e-30")
    result = train(cfg)
    assert result.best_epoch == 1
    assert result.steps == 2 * (len(range(0, 200, 32)))  # two epochs of 7 batches

    # the saved weights are the tested model: reload them into a fresh model and re-evaluate the test set
    catalog = load_catalog(cfg.data)
    model = FMRLRec(cfg.model, catalog.num_items, catalog.text_features, catalog.image_features)
    missing, unexpected = model.load_state_dict(
        load_file(os.path.join(result.run_dir, "model.safetensors")), strict=False
    )
    assert not unexpected and all(k.startswith(("item_tower.text.", "item_tower.image.")) for k in missing)
    split = LeaveOneOutSplit.from_sequences(catalog.sequences)
    batches = eval_batches(split.test_histories(), split.test_targets, 64, cfg.train.max_len)
    assert evaluate(model, batches, cfg.model.nested_sizes, cfg.eval.ks, False) == result.test_metrics


def test_excluding_history_only_removes_competitors(tmp_path):
    cfg = tiny_config(tmp_path, "run.name=hist", "train.epochs=1", "run.tensorboard=false")
    result = train(cfg)
    catalog = load_catalog(cfg.data)
    model = FMRLRec(cfg.model, catalog.num_items, catalog.text_features, catalog.image_features)
    model.load_state_dict(load_file(os.path.join(result.run_dir, "model.safetensors")), strict=False)
    split = LeaveOneOutSplit.from_sequences(catalog.sequences)

    def run(exclude: bool):
        batches = eval_batches(split.test_histories(), split.test_targets, 64, cfg.train.max_len)
        return evaluate(model, batches, cfg.model.nested_sizes, cfg.eval.ks, exclude)

    kept, excluded = run(False), run(True)
    assert kept == result.test_metrics  # the default follows fMRLRec: history is not excluded
    for size in kept:
        assert all(excluded[size][name] >= kept[size][name] for name in kept[size])
    assert any(excluded[s]["MRR@20"] > kept[s]["MRR@20"] for s in kept)


def test_model_learns_and_beats_most_popular(tmp_path):
    cfg = load_config(
        None,
        [
            "data.num_items=500",
            "data.num_users=1500",
            "data.num_clusters=20",
            "data.text_dim=32",
            "data.image_dim=24",
            "model.nested_sizes=[8,16,32,64]",
            "train.epochs=4",
            "train.batch_size=64",
            "train.lr=3e-3",
            "train.warmup_steps=10",
            "train.num_threads=2",
            "run.progress_bar=false",
            "run.tensorboard=false",
            f"run.out_dir={tmp_path}",
            "run.name=learn",
        ],
    )
    result = train(cfg)
    losses = result.train_losses
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3
    model_ndcg = result.test_metrics[64]["NDCG@10"]
    popular_ndcg = result.popularity_metrics["NDCG@10"]
    assert model_ndcg > 1.5 * popular_ndcg, (model_ndcg, popular_ndcg)
    # the nested series: more width, better ranking
    assert result.test_metrics[64]["NDCG@10"] > result.test_metrics[8]["NDCG@10"]


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


@pytest.mark.parametrize("path", ["configs/demo.yaml", "configs/beauty.yaml"])
def test_shipped_configs_build_their_model(path):
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", path))
    with torch.device("meta"):
        FMRLRec(
            cfg.model,
            cfg.data.num_items,
            torch.empty(cfg.data.num_items + 1, cfg.data.text_dim) if cfg.data.text_dim else None,
            torch.empty(cfg.data.num_items + 1, cfg.data.image_dim) if cfg.data.image_dim else None,
        )
