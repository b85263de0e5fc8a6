"""Collation of item-id sequences into left-padded next-item batches (the split is in test_loader.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.sequences import collate_next_item, left_pad

# ---- train batches -----------------------------------------------------------------------------------


def _user_train(num_users: int, rng: np.random.Generator) -> list[np.ndarray]:
    """User u's training items are 100 u + 1, 100 u + 2, ...: every id names its user and position."""
    lengths = rng.integers(0, 14, num_users)
    lengths[:3] = [2, 2, 13]
    return [100 * u + 1 + np.arange(n, dtype=np.int64) for u, n in enumerate(lengths)]


@pytest.mark.parametrize("max_len", [3, 8, 50])
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_collate_next_item(max_len, batch_size) -> None:
    by_user = _user_train(23, np.random.default_rng(0))
    train = [s for s in by_user if len(s) >= 2]
    batches = [
        collate_next_item(train[i : i + batch_size], max_len) for i in range(0, len(train), batch_size)
    ]
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
            s = by_user[user].tolist()
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
    assert seen == [int(s[0]) // 100 for s in train]  # every user once, in order


def test_trimming_of_short_batches() -> None:
    train = [np.array([1, 2]), np.array([3, 4, 5])]
    batch = collate_next_item(train, 50)
    assert batch.tokens.shape == (2, 2)  # width of the longest input (2), not max_len
    rows = batch.tokens.tolist()
    assert rows == [[0, 1], [3, 4]]


def test_left_pad_empty_rows() -> None:
    out = left_pad([np.array([], dtype=np.int64), np.array([], dtype=np.int64)], 5)
    assert out.shape == (2, 1) and torch.all(out == 0)
    out = left_pad([np.array([], dtype=np.int64), np.array([4, 5, 6])], 2)
    assert out.tolist() == [[0, 0], [5, 6]]
