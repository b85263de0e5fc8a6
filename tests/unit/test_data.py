"""Synthetic catalog, leave-one-out split and batch collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.sequences import LeaveOneOutSplit, eval_batches, left_pad, num_train_batches, train_batches
from data_pipeline.synthetic import make_synthetic_catalog

CATALOG_ARGS = dict(
    num_items=60, num_users=40, num_clusters=6, text_dim=8, image_dim=5, min_seq_len=4, max_seq_len=15
)


def _catalog(**overrides):
    return make_synthetic_catalog(**{**CATALOG_ARGS, "seed": 0, **overrides})


# ---- synthetic catalog -------------------------------------------------------------------------------


def test_catalog_is_deterministic_per_seed() -> None:
    a, b, c = _catalog(), _catalog(), _catalog(seed=1)
    assert len(a.sequences) == len(b.sequences) == CATALOG_ARGS["num_users"]
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
    assert torch.equal(a.text_features, b.text_features) and torch.equal(a.image_features, b.image_features)
    assert np.array_equal(a.item_cluster, b.item_cluster)
    # another seed: different sequences and features
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a.sequences, c.sequences))
    assert not torch.equal(a.text_features, c.text_features)
    assert not torch.equal(a.image_features, c.image_features)


def test_catalog_contents() -> None:
    cat = _catalog()
    n = CATALOG_ARGS["num_items"]
    assert cat.num_items == n
    lengths = [len(s) for s in cat.sequences]
    assert min(lengths) >= CATALOG_ARGS["min_seq_len"] and max(lengths) <= CATALOG_ARGS["max_seq_len"]
    assert len(set(lengths)) > 1
    ids = np.concatenate(cat.sequences)
    assert ids.dtype == np.int64
    assert ids.min() >= 1 and ids.max() <= n
    for table, width in (
        (cat.text_features, CATALOG_ARGS["text_dim"]),
        (cat.image_features, CATALOG_ARGS["image_dim"]),
    ):
        assert table.shape == (n + 1, width) and table.dtype == torch.float32
        assert torch.all(table[0] == 0)
        torch.testing.assert_close(table[1:].norm(dim=1), torch.ones(n), rtol=0, atol=1e-5)
    assert cat.item_cluster.shape == (n + 1,) and cat.item_cluster[0] == -1
    assert set(cat.item_cluster[1:].tolist()) == set(range(CATALOG_ARGS["num_clusters"]))


def test_zero_feature_width_gives_none() -> None:
    cat = _catalog(text_dim=0)
    assert cat.text_features is None and cat.image_features is not None
    cat = _catalog(image_dim=0)
    assert cat.image_features is None and cat.text_features is not None


@pytest.mark.parametrize(
    "overrides",
    [dict(num_clusters=1), dict(num_clusters=61), dict(min_seq_len=2), dict(min_seq_len=9, max_seq_len=8)],
)
def test_catalog_rejects_bad_arguments(overrides) -> None:
    with pytest.raises(ValueError):
        _catalog(**overrides)


# ---- leave-one-out split -----------------------------------------------------------------------------

SEQUENCES = [np.array([5, 3, 9, 1, 7]), np.array([2, 4, 6]), np.array([8, 8, 1, 2, 3, 4, 5, 6])]


def test_leave_one_out_parts() -> None:
    split = LeaveOneOutSplit.from_sequences(SEQUENCES)
    assert [s.tolist() for s in split.train] == [[5, 3, 9], [2], [8, 8, 1, 2, 3, 4]]
    assert split.valid_targets.tolist() == [1, 4, 5]
    assert split.test_targets.tolist() == [7, 6, 6]
    assert split.valid_targets.dtype == np.int64 and split.test_targets.dtype == np.int64
    assert [h.tolist() for h in split.valid_histories()] == [[5, 3, 9], [2], [8, 8, 1, 2, 3, 4]]
    assert [h.tolist() for h in split.test_histories()] == [[5, 3, 9, 1], [2, 4], [8, 8, 1, 2, 3, 4, 5]]
    # the split does not alias-modify the input
    assert SEQUENCES[0].tolist() == [5, 3, 9, 1, 7]


@pytest.mark.parametrize("short", [[], [4], [4, 5]])
def test_short_sequence_raises_naming_the_user(short) -> None:
    sequences = [np.array([1, 2, 3]), np.array([1, 2, 3, 4]), np.array(short, dtype=np.int64)]
    with pytest.raises(ValueError, match="user 2"):
        LeaveOneOutSplit.from_sequences(sequences)


# ---- train batches -----------------------------------------------------------------------------------


def _user_train(num_users: int, rng: np.random.Generator) -> list[np.ndarray]:
    """User u's training items are 100 u + 1, 100 u + 2, ...: every id names its user and position."""
    lengths = rng.integers(0, 14, num_users)
    lengths[:3] = [0, 1, 2]  # users 0 and 1 are too short to train on; user 2 just long enough
    return [100 * u + 1 + np.arange(n, dtype=np.int64) for u, n in enumerate(lengths)]


@pytest.mark.parametrize("max_len", [3, 8, 50])
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_train_batches(max_len, batch_size) -> None:
    train = _user_train(23, np.random.default_rng(0))
    eligible = {u for u, s in enumerate(train) if len(s) >= 2}
    batches = list(train_batches(train, batch_size, max_len, np.random.default_rng(1)))
    assert len(batches) == num_train_batches(train, batch_size) == -(-len(eligible) // batch_size)
    seen = []
    for batch in batches:
        tokens, labels = batch.tokens, batch.labels
        assert tokens.dtype == torch.int64 and labels.dtype == torch.int64
        assert tokens.shape == labels.shape and tokens.shape[0] <= batch_size
        assert tokens.shape[1] <= max_len
        assert torch.any(tokens[:, 0] > 0), "a leading all-padding column was not trimmed"
        for row_tokens, row_labels in zip(tokens.tolist(), labels.tolist()):
            real = [t for t in row_tokens if t > 0]
            user = real[0] // 100
            seen.append(user)
            s = train[user].tolist()
            # expected by the definition: inputs s[:-1], targets s[1:], the last max_len of each
            expected_tokens = s[:-1][-max_len:]
            expected_labels = s[1:][-max_len:]
            pad = len(row_tokens) - len(expected_tokens)
            assert row_tokens == [0] * pad + expected_tokens
            assert row_labels == [0] * pad + expected_labels
            # every target is the item right after its input; no target sits behind a padding input
            for t, y in zip(row_tokens, row_labels):
                assert (t == 0) == (y == 0)
                if t:
                    assert y == t + 1
    assert sorted(seen) == sorted(eligible)  # every eligible user exactly once


def test_train_batches_order_depends_on_rng_seed_only() -> None:
    train = _user_train(30, np.random.default_rng(0))

    def order(seed):
        return [
            int(t[t > 0][0]) // 100
            for b in train_batches(train, 4, 6, np.random.default_rng(seed))
            for t in b.tokens
        ]

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert sorted(order(3)) == sorted(order(4))


def test_trimming_of_short_batches() -> None:
    train = [np.array([1, 2]), np.array([3, 4, 5])]
    (batch,) = list(train_batches(train, 8, 50, np.random.default_rng(0)))
    assert batch.tokens.shape == (2, 2)  # width of the longest input (2), not max_len
    rows = sorted(batch.tokens.tolist())
    assert rows == [[0, 1], [3, 4]]


# ---- eval batches ------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_len", [2, 4, 100])
@pytest.mark.parametrize("batch_size", [1, 3, 10])
def test_eval_batches(max_len, batch_size) -> None:
    histories = [
        np.array([1, 2, 3, 4, 5]),
        np.array([6]),
        np.array([7, 8, 9]),
        np.array([10, 11]),
        np.array([12, 13, 14, 15, 16, 17]),
    ]
    targets = np.array([21, 22, 23, 24, 25], dtype=np.int64)
    batches = list(eval_batches(histories, targets, batch_size, max_len))
    assert len(batches) == -(-len(histories) // batch_size)
    got_targets, got_rows = [], []
    for batch in batches:
        width = max(min(len(h), max_len) for h in histories[len(got_rows) : len(got_rows) + batch_size])
        assert batch.tokens.shape == (len(batch.targets), width)
        got_targets += batch.targets.tolist()
        got_rows += batch.tokens.tolist()
    assert got_targets == targets.tolist()
    for row, history in zip(got_rows, histories):
        kept = history.tolist()[-max_len:]
        assert row == [0] * (len(row) - len(kept)) + kept


def test_left_pad_empty_rows() -> None:
    out = left_pad([np.array([], dtype=np.int64), np.array([], dtype=np.int64)], 5)
    assert out.shape == (2, 1) and torch.all(out == 0)
    out = left_pad([np.array([], dtype=np.int64), np.array([4, 5, 6])], 2)
    assert out.tolist() == [[0, 0], [5, 6]]
