"""Nested-size exports: the size-m export of a trained run scores exactly like the full model's size-m
prefix, loads from safetensors and JSON only, and bad requests are clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from data_pipeline.loader import SequenceDataset, eval_batches
from models.fmrl import nested_scores
from trainer.cli import main
from trainer.config import load_config
from trainer.export import ExportError, load_recommender, load_trained_model
from trainer.train import train


@pytest.fixture(scope="module")
def run_dir(tiny_dataset, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("runs")
    overrides = [
        f"data.path={tiny_dataset}",
        f"run.out_dir={out}",
        "run.name=r",
        "model.nested_sizes=[8,16,32]",
        "model.use_id_embedding=true",
        "train.epochs=1",
        "train.batch_size=32",
        "data.num_workers=0",
        "run.progress_bar=false",
        "run.tensorboard=false",
    ]
    return train(load_config(None, overrides)).run_dir


def test_each_size_scores_like_the_full_models_prefix(run_dir, tiny_dataset, capsys) -> None:
    # training exported every nested size by itself
    automatic = json.loads(open(f"{run_dir}/export/export.json").read())
    assert set(automatic["sizes"]) == {"8", "16", "32"}
    assert main(["export", run_dir, "--sizes", "8,32"]) == 0
    printed = capsys.readouterr().out
    assert "size     8" in printed and "size    32" in printed
    manifest = json.loads(open(f"{run_dir}/export/export.json").read())
    assert set(manifest["sizes"]) == {"8", "32"} and manifest["num_items"] == 150
    assert manifest["sizes"]["8"]["bytes"] < manifest["sizes"]["32"]["bytes"]

    model = load_trained_model(run_dir)
    batch = next(iter(eval_batches(SequenceDataset.open(tiny_dataset), "test", 40, 50)))
    with torch.no_grad():
        hidden, items = model(batch.tokens)
        full = nested_scores(hidden[:, -1], items[1:], [8, 32])
    for size in (8, 32):
        recommender = load_recommender(f"{run_dir}/export", size)
        assert recommender.items.shape == (151, size)
        torch.testing.assert_close(recommender.scores(batch.tokens), full[size], rtol=1e-5, atol=1e-5)
        values, ids = recommender.recommend(batch.tokens, 10)
        assert ids.shape == (40, 10) and bool((ids >= 1).all() and (ids <= 150).all())
        assert torch.equal(ids, torch.topk(full[size], 10).indices + 1)


def exported_scores(url: str, tokens: torch.Tensor, sizes: tuple[int, ...]) -> dict[int, torch.Tensor]:
    return {size: load_recommender(url, size).scores(tokens) for size in sizes}


def test_a_checkpoint_exports_like_the_run_folder(run_dir, tiny_dataset, tmp_path) -> None:
    # the checkpoint root names its best checkpoint (1 epoch: the epoch's end) and carries the config
    assert main(["export", f"{run_dir}/checkpoints", "--sizes", "8,32", "--out", str(tmp_path / "c")]) == 0
    assert main(["export", run_dir, "--sizes", "8,32", "--out", str(tmp_path / "r")]) == 0
    batch = next(iter(eval_batches(SequenceDataset.open(tiny_dataset), "test", 40, 50)))
    from_checkpoint = exported_scores(str(tmp_path / "c"), batch.tokens, (8, 32))
    from_run = exported_scores(str(tmp_path / "r"), batch.tokens, (8, 32))
    for size in (8, 32):
        assert torch.equal(from_checkpoint[size], from_run[size])


def test_bad_requests_are_clear_errors(run_dir, tmp_path, capsys) -> None:
    assert main(["export", run_dir, "--sizes", "12", "--out", str(tmp_path / "x")]) == 2
    assert "sizes [12] are not nested sizes" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--sizes", "8"]) == 2
    assert "is neither a finished run folder" in capsys.readouterr().err
    main(["export", run_dir, "--sizes", "8", "--out", str(tmp_path / "e")])
    with pytest.raises(ExportError, match=r"has sizes \[8\], not 16"):
        load_recommender(str(tmp_path / "e"), 16)
