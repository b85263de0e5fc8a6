"""Full-ranking metrics: target ranks (ties, history exclusion, padding) and NDCG/Recall/MRR@K."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.evaluation.metrics import RankingMetrics, target_ranks


def _brute_force_rank(scores, target, history=None) -> int:
    """Items (1-based ids) scored strictly above the target, history items (except the target) removed."""
    seen = set() if history is None else {int(i) for i in history if int(i) > 0} - {int(target)}
    target_score = float(scores[int(target) - 1])
    return sum(1 for j in range(len(scores)) if (j + 1) not in seen and float(scores[j]) > target_score)


def test_ranks_by_hand() -> None:
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.3, 0.7],  # target 3 (0.5): items 2 and 5 above -> rank 2
            [0.1, 0.9, 0.5, 0.3, 0.7],  # target 2 (0.9): best -> rank 0
            [0.1, 0.9, 0.5, 0.3, 0.7],  # target 1 (0.1): worst -> rank 4
        ]
    )
    targets = torch.tensor([3, 2, 1])
    assert target_ranks(scores, targets).tolist() == [2, 0, 4]


def test_ties_count_only_strictly_greater() -> None:
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([3, 5])  # tied with items 2 and 4; one item above
    assert target_ranks(scores, targets).tolist() == [1, 0]


def test_history_exclusion_removes_seen_items() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7, 0.6]])
    targets = torch.tensor([4])  # 0.3: items 2, 3, 5, 6 above -> rank 4 without exclusion
    assert target_ranks(scores, targets).tolist() == [4]
    history = torch.tensor([[0, 0, 2, 5]])  # left-padded; items 2 and 5 seen
    assert target_ranks(scores, targets, history).tolist() == [2]
    # scores are not modified in place
    assert scores[0, 1] == 0.9


def test_target_in_history_is_never_excluded() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.1, 0.9, 0.5, 0.3]])
    targets = torch.tensor([3, 2])
    history = torch.tensor([[0, 3, 2], [2, 2, 3]])
    # row 0: target 3 seen before, item 2 excluded -> rank 0; row 1: target 2 is the best anyway
    assert target_ranks(scores, targets, history).tolist() == [0, 0]
    # a target seen in the history still counts higher-scored unseen items
    assert target_ranks(scores, torch.tensor([4, 1]), torch.tensor([[4, 0, 0], [1, 1, 1]])).tolist() == [2, 3]


def test_left_padding_in_history_is_ignored() -> None:
    # padding id 0 must not exclude item 1 (its column 0) and must not leave item 1 scored when seen
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.9, 0.5, 0.1]])
    targets = torch.tensor([2, 2])
    history = torch.tensor([[0, 0, 3], [0, 0, 1]])
    assert target_ranks(scores, targets, history).tolist() == [1, 0]
    assert target_ranks(scores, targets, torch.zeros(2, 4, dtype=torch.long)).tolist() == [1, 1]


@pytest.mark.parametrize(
    "history",
    [[1, 0], [0, 1, 0, 3]],
    ids=["right-pad", "interleaved"],
)
def test_padding_anywhere_in_history_is_ignored(history) -> None:
    """0 = padding, ignored: wherever the zeros sit, a seen item 1 is still excluded."""
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.7]])
    targets = torch.tensor([2])
    expected = _brute_force_rank(scores[0], 2, history)
    assert target_ranks(scores, targets, torch.tensor([history])).tolist() == [expected]


def test_ranks_match_brute_force_left_padded() -> None:
    g = torch.Generator().manual_seed(0)
    batch, num_items, length = 16, 50, 12
    scores = torch.randint(0, 8, (batch, num_items), generator=g).float()  # many ties
    targets = torch.randint(1, num_items + 1, (batch,), generator=g)
    history = torch.randint(1, num_items + 1, (batch, length), generator=g)
    history[:4, -1] = targets[:4]  # some targets are in the history
    history[4:8, -2] = 1  # item 1 (column 0, where padding ids also point) seen, and scored high
    scores[4:8, 0] = 100.0
    for b in range(batch):
        pads = b % length
        history[b, :pads] = 0
    ranks = target_ranks(scores, targets, history)
    expected = [_brute_force_rank(scores[b], targets[b], history[b]) for b in range(batch)]
    assert ranks.tolist() == expected
    no_history = [_brute_force_rank(scores[b], targets[b]) for b in range(batch)]
    assert target_ranks(scores, targets).tolist() == no_history
    assert expected != no_history  # the exclusion did something


def _expected_metrics(ranks, ks):
    out = {}
    for k in ks:
        out[f"NDCG@{k}"] = sum(1 / math.log2(r + 2) if r < k else 0.0 for r in ranks) / len(ranks)
        out[f"Recall@{k}"] = sum(1.0 if r < k else 0.0 for r in ranks) / len(ranks)
        out[f"MRR@{k}"] = sum(1 / (r + 1) if r < k else 0.0 for r in ranks) / len(ranks)
    return out


def test_single_rank_metrics() -> None:
    for rank in [0, 1, 4, 9, 10, 19, 20, 500]:
        metrics = RankingMetrics([10, 20])
        metrics.update(64, torch.tensor([rank]))
        got = metrics.compute()[64]
        for k in (10, 20):
            hit = rank < k
            assert got[f"NDCG@{k}"] == pytest.approx(1 / math.log2(rank + 2) if hit else 0.0, abs=1e-12)
            assert got[f"Recall@{k}"] == (1.0 if hit else 0.0)
            assert got[f"MRR@{k}"] == pytest.approx(1 / (rank + 1) if hit else 0.0, abs=1e-12)
    # the best rank gives a perfect score
    metrics = RankingMetrics([1])
    metrics.update(8, torch.tensor([0]))
    assert metrics.compute() == {8: {"NDCG@1": 1.0, "Recall@1": 1.0, "MRR@1": 1.0}}


def test_metrics_accumulate_over_batches_and_sizes() -> None:
    ks = [1, 5, 10]
    metrics = RankingMetrics(ks)
    batches_8 = [torch.tensor([0, 3, 12]), torch.tensor([9, 10]), torch.tensor([4])]
    batches_32 = [torch.tensor([1, 1, 2, 100])]
    for ranks in batches_8:
        metrics.update(8, ranks)
    for ranks in batches_32:
        metrics.update(32, ranks)
    result = metrics.compute()
    assert list(result) == [8, 32]
    for size, batches in ((8, batches_8), (32, batches_32)):
        expected = _expected_metrics([int(r) for b in batches for r in b], ks)
        assert set(result[size]) == set(expected)
        for name, value in expected.items():
            assert result[size][name] == pytest.approx(value, abs=1e-12), (size, name)
