"""A NaN score never wins: not a ranking (a diverged model's targets rank last, not first) and not early
stopping."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.evaluation.metrics import RankingMetrics, target_ranks
from trainer.evaluation.sharded import sharded_target_ranks
from trainer.state import EarlyStopping


@pytest.mark.parametrize("history", [None, torch.tensor([[0, 2], [3, 3]])])
def test_nan_scores_rank_the_target_last(history) -> None:
    # before: `scores > target_score` is False for every NaN, so an all-NaN model ranked every target
    # first (NDCG@10 = 1.0)
    scores = torch.full((2, 5), math.nan)
    targets = torch.tensor([1, 4])
    excluded = 0 if history is None else 1  # one other item of each row's history is masked out
    assert target_ranks(scores, targets, history).tolist() == [4 - excluded, 4 - excluded]
    metrics = RankingMetrics([10])
    metrics.update(32, target_ranks(torch.full((1, 50), math.nan), torch.tensor([7])))
    assert metrics.compute()[32]["NDCG@10"] == 0.0


def test_an_item_scored_nan_counts_above_a_finite_target() -> None:
    scores = torch.tensor([[0.5, math.nan, 0.1, 0.9]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [2]  # item 4 (0.9) and item 2 (NaN)
    assert target_ranks(scores, torch.tensor([4])).tolist() == [1]  # only the NaN


def test_the_sharded_ranking_agrees_on_nan() -> None:
    queries = torch.tensor([[math.nan, 1.0], [1.0, 0.0]])  # (B, D): the first query diverged
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [math.nan, 0.0]])  # (N, D): item 4 too
    targets = torch.tensor([2, 1])
    full = target_ranks(queries @ items.T, targets)
    sharded = sharded_target_ranks(queries, targets, items, shard_lo=1, chunk_size=1)
    assert full.tolist() == sharded.tolist() == [3, 2]


def test_early_stopping_never_takes_a_nonfinite_score() -> None:
    stopping = EarlyStopping(patience=2)
    assert not stopping.update(math.nan, 1, 10, {"score": math.nan})  # not even as the first epoch
    assert stopping.best_epoch == 0 and stopping.epochs_without_gain == 1
    assert stopping.update(0.1, 2, 20, {"score": 0.1})
    assert not stopping.update(math.inf, 3, 30, {})
    assert not stopping.update(math.nan, 4, 40, {})
    assert stopping.best_epoch == 2 and stopping.exhausted


def test_skipping_nonfinite_steps_is_a_checked_config_key() -> None:
    from trainer.config import ConfigError, load_config

    base = ["data.path=runs/data/demo"]
    assert load_config(None, base).train.skip_nonfinite_steps == 0  # the first non-finite step fails
    assert load_config(None, [*base, "train.skip_nonfinite_steps=3"]).train.skip_nonfinite_steps == 3
    with pytest.raises(ConfigError, match="train.skip_nonfinite_steps"):
        load_config(None, [*base, "train.skip_nonfinite_steps=-1"])
    with pytest.raises(ConfigError, match="train.skip_nonfinite_steps needs parallel.backend fsdp2 or ddp"):
        load_config(None, [*base, "train.skip_nonfinite_steps=1", "parallel.backend=deepspeed"])


def test_nan_click_predictions_count_against_the_model() -> None:
    from trainer.evaluation.ctr import ctr_metrics

    clicks = torch.tensor([1.0, 0.0, 1.0, 0.0])
    # before: torch.unique sorts NaN last, so NaN-scored clicks took the top ranks (here AUC 1.0)
    nan_clicks = ctr_metrics(torch.tensor([math.nan, -1.0, math.nan, -2.0]), clicks)
    assert nan_clicks["auc"] == 0.0 and math.isnan(nan_clicks["logloss"])
    assert ctr_metrics(torch.full((4,), math.nan), clicks)["auc"] == 0.0
    assert ctr_metrics(torch.tensor([2.0, -1.0, 1.0, -2.0]), clicks)["auc"] == 1.0  # finite: unchanged


@pytest.mark.parametrize("shape", [(), (7,), (5, 3), (1000, 9), (3, 4, 5)])
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
def test_all_finite_in_blocks_matches_isfinite(monkeypatch, shape, bad) -> None:
    # the blockwise check (views of a few rows at a time) against torch.isfinite of the whole tensor,
    # with blocks smaller than the tensor so that the last block and a bad value in any block count
    import sharding.core

    monkeypatch.setattr(sharding.core, "FINITE_CHECK_ELEMENTS", 16)
    numel = math.prod(shape)
    for where in sorted({0, 15, 16, numel // 2, numel - 1} & set(range(numel))):  # first, block edges, last
        tensor = torch.randn(shape)
        if bad is not None:
            tensor.view(-1)[where] = bad
        assert sharding.core.all_finite(tensor) == bool(torch.isfinite(tensor).all())
    # a strided view (a column shard of a wider table) is checked without a copy, the same way
    wide = torch.randn(40, 6)
    wide[33, 4] = math.nan
    assert not sharding.core.all_finite(wide[:, 3:])
    assert sharding.core.all_finite(wide[:, :3])
