"""The embedded default data: a synthetic catalog whose latent item clusters drive both the item features
and what users pick next, so that a sequential model over text and image features has something real to
learn (and a most-popular baseline does not).

How it is made (all from one seed):
* every item belongs to one of C latent clusters and has a latent vector z = centre + noise;
* its "text" and "image" features are two different noisy random projections of z, L2-normalised, so
  each modality carries the cluster signal and combining them helps;
* every cluster has two successor clusters; a user's next item stays in the current cluster (30%), moves
  to a successor (60%) or jumps anywhere (10%), and within the chosen cluster is drawn by a Zipf
  popularity, so the next item depends on the recent items through their clusters;
* sequence lengths are uniform in [min_seq_len, max_seq_len].

Item ids run 1..N; row 0 of every feature table is the zero padding row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_LATENT_DIM = 16
_STAY, _SUCCESSOR = 0.3, 0.6  # the remaining 0.1 jumps to a uniformly random cluster


@dataclass
class SyntheticCatalog:
    """Items (features, clusters) and user sequences of the synthetic catalog."""

    num_items: int
    text_features: torch.Tensor | None
    """(N+1, text_dim) float32, row 0 zero; None if text_dim is 0."""
    image_features: torch.Tensor | None
    """(N+1, image_dim) float32, row 0 zero; None if image_dim is 0."""
    item_cluster: np.ndarray
    """(N+1,) latent cluster of each item id (entry 0 is -1 for padding)."""
    sequences: list[np.ndarray]
    """One chronological int64 array of item ids (1..N) per user."""


def _features(latent: np.ndarray, dim: int, noise: float, rng: np.random.Generator) -> torch.Tensor | None:
    if dim == 0:
        return None
    projection = rng.standard_normal((latent.shape[1], dim)) / np.sqrt(latent.shape[1])
    values = latent @ projection + noise * rng.standard_normal((latent.shape[0], dim))
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    table = np.zeros((latent.shape[0] + 1, dim), dtype=np.float32)
    table[1:] = values
    return torch.from_numpy(table)


def make_synthetic_catalog(
    *,
    num_items: int,
    num_users: int,
    num_clusters: int,
    text_dim: int,
    image_dim: int,
    min_seq_len: int,
    max_seq_len: int,
    seed: int,
) -> SyntheticCatalog:
    """Generate the catalog deterministically from ``seed`` (same arguments, same catalog)."""
    if not 2 <= num_clusters <= num_items:
        raise ValueError(f"num_clusters must be in [2, num_items], got {num_clusters} for {num_items} items")
    if not 3 <= min_seq_len <= max_seq_len:
        raise ValueError(f"need 3 <= min_seq_len <= max_seq_len, got {min_seq_len}, {max_seq_len}")
    rng = np.random.default_rng(seed)

    # items: cluster, latent vector, within-cluster popularity
    cluster = rng.permutation(np.arange(num_items) % num_clusters)  # (N,) balanced clusters
    centres = rng.standard_normal((num_clusters, _LATENT_DIM))
    latent = centres[cluster] + 0.6 * rng.standard_normal((num_items, _LATENT_DIM))
    members = [np.flatnonzero(cluster == c) for c in range(num_clusters)]
    popularity = []
    for ids in members:
        weights = 1.0 / np.arange(1, len(ids) + 1) ** 1.1  # Zipf over a random order of the members
        popularity.append(rng.permutation(weights) / weights.sum())
    successors = np.stack(
        [rng.choice(np.delete(np.arange(num_clusters), c), 2, replace=False) for c in range(num_clusters)]
    )

    # users: Markov walk over clusters, popularity-weighted item within the cluster
    sequences = []
    for _ in range(num_users):
        length = int(rng.integers(min_seq_len, max_seq_len + 1))
        current = int(rng.integers(num_clusters))
        seq = np.empty(length, dtype=np.int64)
        for t in range(length):
            ids = members[current]
            seq[t] = ids[rng.choice(len(ids), p=popularity[current])] + 1  # ids start at 1
            move = rng.random()
            if move < _STAY:
                pass
            elif move < _STAY + _SUCCESSOR:
                current = int(successors[current, rng.integers(2)])
            else:
                current = int(rng.integers(num_clusters))
        sequences.append(seq)

    return SyntheticCatalog(
        num_items=num_items,
        text_features=_features(latent, text_dim, 0.8, rng),
        image_features=_features(latent, image_dim, 1.0, rng),
        item_cluster=np.concatenate([[-1], cluster]),
        sequences=sequences,
    )
