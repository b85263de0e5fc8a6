"""Leave-one-out splits of user sequences and their collation into left-padded batches for the LRU model.

Per user with sequence s (chronological item ids 1..N):
* train: s[:-2]; each epoch yields one sample per user with tokens = train[:-1][-L:] and
  labels = train[1:][-L:], so every target has a real input before it (the official code also makes
  train[0] a target behind a padding input; we do not);
* validation: history train[-L:], target s[-2];
* test: history (train + [s[-2]])[-L:], target s[-1].

Padding is id 0, on the left. A batch drops leading columns that are padding in every row: the LRU never
carries padding into real positions, so this changes no output and saves work on short sequences.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TrainBatch:
    """Next-item prediction at every position."""

    tokens: torch.Tensor
    """(B, L) int64 input item ids, left-padded with 0."""
    labels: torch.Tensor
    """(B, L) int64 next item ids, 0 where there is no target."""


@dataclass
class EvalBatch:
    """Predict one held-out item from a history."""

    tokens: torch.Tensor
    """(B, L) int64 history, left-padded with 0."""
    targets: torch.Tensor
    """(B,) int64 held-out item ids (1..N)."""


@dataclass
class LeaveOneOutSplit:
    train: list[np.ndarray]
    """Per user, the training part s[:-2]."""
    valid_targets: np.ndarray
    """(U,) s[-2] per user."""
    test_targets: np.ndarray
    """(U,) s[-1] per user."""

    @classmethod
    def from_sequences(cls, sequences: Sequence[np.ndarray]) -> LeaveOneOutSplit:
        for user, seq in enumerate(sequences):
            if len(seq) < 3:
                raise ValueError(f"user {user}: leave-one-out needs at least 3 items, got {len(seq)}")
        return cls(
            train=[np.asarray(s[:-2]) for s in sequences],
            valid_targets=np.array([s[-2] for s in sequences], dtype=np.int64),
            test_targets=np.array([s[-1] for s in sequences], dtype=np.int64),
        )

    def valid_histories(self) -> list[np.ndarray]:
        return self.train

    def test_histories(self) -> list[np.ndarray]:
        return [np.append(t, v) for t, v in zip(self.train, self.valid_targets)]


def left_pad(rows: Sequence[np.ndarray], max_len: int) -> torch.Tensor:
    """Keep the last ``max_len`` ids of each row and left-pad with 0: (B, L) with L = longest kept row."""
    width = max((min(len(r), max_len) for r in rows), default=0)
    out = np.zeros((len(rows), max(width, 1)), dtype=np.int64)  # (B, L)
    for i, row in enumerate(rows):
        kept = row[-max_len:] if len(row) else row
        if len(kept):
            out[i, -len(kept) :] = kept
    return torch.from_numpy(out)


def train_batches(
    train: Sequence[np.ndarray], batch_size: int, max_len: int, rng: np.random.Generator
) -> Iterator[TrainBatch]:
    """One epoch: users in a random order from ``rng``; users with fewer than 2 training items are skipped."""
    users = [u for u, seq in enumerate(train) if len(seq) >= 2]
    order = rng.permutation(len(users))
    for start in range(0, len(order), batch_size):
        yield collate_next_item([train[users[i]] for i in order[start : start + batch_size]], max_len)


def collate_next_item(sequences: Sequence[np.ndarray], max_len: int) -> TrainBatch:
    """Next-item batch from item-id sequences of at least 2 items: tokens s[:-1], labels s[1:], left-padded."""
    return TrainBatch(
        tokens=left_pad([s[:-1] for s in sequences], max_len),
        labels=left_pad([s[1:] for s in sequences], max_len),
    )


def num_train_batches(train: Sequence[np.ndarray], batch_size: int) -> int:
    users = sum(1 for seq in train if len(seq) >= 2)
    return (users + batch_size - 1) // batch_size


def eval_batches(
    histories: Sequence[np.ndarray], targets: np.ndarray, batch_size: int, max_len: int
) -> Iterator[EvalBatch]:
    """Users in order; histories truncated to their last ``max_len`` items."""
    for start in range(0, len(histories), batch_size):
        end = start + batch_size
        yield EvalBatch(
            tokens=left_pad(histories[start:end], max_len), targets=torch.from_numpy(targets[start:end])
        )
