"""Batches of the LRU model: leave-one-out parts of user sequences, collated into left-padded tensors.

The split (made per user by :mod:`data_pipeline.loader` as it streams the user shards), for a user with
sequence s (chronological item ids 1..N):
* train: s[:-2]; each epoch yields one sample per user with tokens = train[:-1][-L:] and
  labels = train[1:][-L:], so every target has a real input before it (the official code also makes
  train[0] a target behind a padding input; we do not);
* validation: history train[-L:], target s[-2];
* test: history (train + [s[-2]])[-L:], target s[-1].

Padding is id 0, on the left. A batch drops leading columns that are padding in every row: the LRU never
carries padding into real positions, so this changes no output and saves work on short sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    keys: tuple[str, ...] = ()
    """Sample keys of the sequences, in row order, when they come from shards (for logging)."""

    def to(self, device: torch.device | str) -> TrainBatch:
        """This batch with its tensors on ``device``."""
        return TrainBatch(self.tokens.to(device), self.labels.to(device), self.keys)


@dataclass
class EvalBatch:
    """Predict one held-out item from a history."""

    tokens: torch.Tensor
    """(B, L) int64 history, left-padded with 0."""
    targets: torch.Tensor
    """(B,) int64 held-out item ids (1..N)."""

    def to(self, device: torch.device | str) -> EvalBatch:
        """This batch with its tensors on ``device``."""
        return EvalBatch(self.tokens.to(device), self.targets.to(device))


def left_pad(rows: Sequence[np.ndarray], max_len: int) -> torch.Tensor:
    """Keep the last ``max_len`` ids of each row and left-pad with 0: (B, L) with L = longest kept row."""
    width = max((min(len(r), max_len) for r in rows), default=0)
    out = np.zeros((len(rows), max(width, 1)), dtype=np.int64)  # (B, L)
    for i, row in enumerate(rows):
        kept = row[-max_len:] if len(row) else row
        if len(kept):
            out[i, -len(kept) :] = kept
    return torch.from_numpy(out)


def collate_next_item(sequences: Sequence[np.ndarray], max_len: int) -> TrainBatch:
    """Next-item batch from item-id sequences of at least 2 items: tokens s[:-1], labels s[1:], left-padded."""
    return TrainBatch(
        tokens=left_pad([s[:-1] for s in sequences], max_len),
        labels=left_pad([s[1:] for s in sequences], max_len),
    )
