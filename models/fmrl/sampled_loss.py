"""Sampled-softmax Matryoshka loss of fMRLRec, for catalogs too large for the full softmax of ``loss.py``.

Per step the softmax runs over a shared candidate set: the batch's target items united with M negatives
drawn with replacement by ``NegativeSampler``; ``candidate_set`` deduplicates them, so a negative that
happens to be a target counts once, as that target. At every nested size m the logits are corrected by
logQ (Yi et al. 2019, "Sampling-bias-corrected neural modeling"):

    logits_ij = <h_i[:m], e_j[:m]> - log_q_j          (every candidate j, the target included)

and the loss is the mean cross-entropy over valid positions, averaged with equal weights over sizes, as
``matryoshka_loss``. With all N items as candidates and log_q = 0 the two losses are equal.

log_q design: the caller passes ``sampler.log_q(candidate_ids)``, the log expected count log(M p_j) of each
candidate among the M draws, for every candidate, targets included. This is the sampled-softmax
convention (TensorFlow's ``sampled_softmax_loss`` subtracts the same expected-count log from the true
class): it removes the sampler's bias towards frequent items. It does not model that targets enter the
set deterministically, nor in-batch targets acting as negatives for other positions; with M p_j << 1,
log(M p_j) is also close to the log probability that j is drawn at least once, log(1 - (1 - p_j)^M).
No separate correction for in-batch items is offered: with one sampler there is one honest Q.

Shapes: B batch, L length, D width, K nested sizes, N items (ids 1..N, 0 is padding), M negatives,
C candidates, P valid positions.

    sampler = NegativeSampler(num_items, 1024, "popularity", counts)
    candidate_ids, _ = candidate_set(labels, sampler.sample(generator))
    loss, per_size = sampled_matryoshka_loss(
        hidden, labels, item_reps(candidate_ids), candidate_ids, sampler.log_q(candidate_ids), sizes
    )
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_DISTRIBUTIONS = ("uniform", "popularity")


class NegativeSampler:
    """Draws M negative item ids in 1..N with replacement, uniformly or by smoothed popularity.

    "popularity" draws item i with probability proportional to (counts[i] + 1) ** alpha; the +1 keeps
    unseen items drawable, alpha < 1 flattens the head of the distribution. It draws by inverse CDF: a
    uniform u in [0, W) (W the total weight) picks the item whose interval [cumulative[i-1], cumulative[i])
    of the (N,) float64 running sum of the weights holds u (``torch.searchsorted``). Unlike
    ``torch.multinomial``, which refuses more than 2^24 categories, this works for any N; the sampler
    holds that one table, 8 bytes per item (trainer/plan.py counts it per rank). ``log_q`` reads each
    item's probability off the same table, so it is exact for the distribution actually drawn.

    Args:
        num_items: N, the number of real items (ids 1..N).
        num_negatives: M, ids drawn per call of ``sample``.
        distribution: "uniform" or "popularity".
        counts: (N,) interaction counts of items 1..N; required by "popularity" only.
        alpha: exponent on the smoothed counts.
    """

    def __init__(
        self,
        num_items: int,
        num_negatives: int,
        distribution: str = "uniform",
        counts: torch.Tensor | None = None,
        alpha: float = 0.75,
    ) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
        self.num_items = num_items
        self.num_negatives = num_negatives
        self.distribution = distribution
        # (N,) float64 running sum of the weights, popularity only
        self._cumulative: torch.Tensor | None = None
        if distribution == "uniform":
            if counts is not None:
                raise ValueError("counts is only used by distribution='popularity'; pass counts=None")
            return
        if counts is None:
            raise ValueError("counts is required by distribution='popularity'")
        counts = torch.as_tensor(counts).cpu()
        if counts.shape != (num_items,):
            raise ValueError(f"counts must have shape ({num_items},), got {tuple(counts.shape)}")
        if not (torch.isfinite(counts).all() and (counts >= 0).all()):
            raise ValueError("counts must be finite and >= 0")
        # one new (N,) float64 tensor, turned into the running sum in place: no second O(N) table
        weights = counts.to(torch.float64).add(1.0).pow_(alpha)  # (N,)
        self._cumulative = weights.cumsum_(0)  # (N,), every interval non-empty: each weight is >= 1

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """(M,) int64 ids in 1..N, drawn with replacement on the generator's device."""
        device = generator.device
        if self._cumulative is None:
            return torch.randint(
                1, self.num_items + 1, (self.num_negatives,), generator=generator, device=device
            )
        cumulative = self._cumulative.to(device)
        u = torch.rand(self.num_negatives, generator=generator, device=device, dtype=torch.float64)
        u = u * cumulative[-1]  # (M,) uniform in [0, W)
        # item i holds [cumulative[i-1], cumulative[i]); the clamp only catches u rounded up to W
        index = torch.searchsorted(cumulative, u, right=True).clamp_(max=self.num_items - 1)  # (M,)
        return index + 1

    def log_q(self, ids: torch.Tensor) -> torch.Tensor:
        """(C,) float64 log expected count log(M p(id)) of each id among the M draws; ids in 1..N."""
        if ids.numel() and (ids.min() < 1 or ids.max() > self.num_items):
            raise ValueError(f"ids must lie in 1..{self.num_items}")
        if self._cumulative is None:
            return torch.full(
                ids.shape,
                math.log(self.num_negatives / self.num_items),
                dtype=torch.float64,
                device=ids.device,
            )
        cumulative = self._cumulative.to(ids.device)
        upper = cumulative[ids - 1]  # (C,)
        lower = torch.where(ids > 1, cumulative[(ids - 2).clamp_(min=0)], 0.0)  # (C,)
        return torch.log(self.num_negatives * (upper - lower) / cumulative[-1])


def candidate_set(labels: torch.Tensor, negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared candidates of a batch: its target ids united with the negatives, deduplicated.

    Args:
        labels: (B, L) next-item ids, 0 where there is no target.
        negatives: (M,) sampled ids in 1..N.

    Returns:
        (candidate_ids, target_index): (C,) sorted unique ids, and (P,) the index into candidate_ids of
        each target in ``labels[labels > 0]`` order.
    """
    if negatives.numel() and negatives.min() < 1:
        raise ValueError("negatives must be item ids >= 1 (0 is padding)")
    targets = labels[labels > 0]  # (P,)
    ids = torch.cat([targets, negatives.to(device=labels.device, dtype=labels.dtype)])  # (P + M,)
    candidate_ids, inverse = torch.unique(ids, sorted=True, return_inverse=True)  # (C,), (P + M,)
    return candidate_ids, inverse[: targets.numel()]


def sampled_matryoshka_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    candidate_reps: torch.Tensor,
    candidate_ids: torch.Tensor,
    log_q: torch.Tensor,
    sizes: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """logQ-corrected sampled-softmax loss over the positions whose label is not padding.

    Args:
        hidden: (B, L, D) output states.
        labels: (B, L) next-item ids, 0 where there is no target; every target must be a candidate.
        candidate_reps: (C, D) representations of the candidates (gradients flow into them).
        candidate_ids: (C,) sorted unique ids, as returned by ``candidate_set``.
        log_q: (C,) log sampling correction, subtracted from every candidate's logit.
        sizes: nested sizes, strictly increasing, the last one at most D.

    Returns:
        (loss, per_size_loss): a scalar and a detached (K,) tensor.
    """
    width = hidden.shape[-1]
    if candidate_reps.shape != (candidate_ids.shape[0], width):
        raise ValueError(
            f"candidate_reps must be (C, D) = ({candidate_ids.shape[0]}, {width}), "
            f"got {tuple(candidate_reps.shape)}"
        )
    if log_q.shape != candidate_ids.shape:
        raise ValueError(f"log_q must have shape {tuple(candidate_ids.shape)}, got {tuple(log_q.shape)}")
    if not sizes or any(a >= b for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1 or sizes[-1] > width:
        raise ValueError(f"sizes must be strictly increasing in 1..{width}, got {list(sizes)}")
    valid = labels > 0  # (B, L)
    scored = hidden[valid]  # (P, D)
    target_ids = labels[valid]  # (P,)
    targets = torch.searchsorted(candidate_ids, target_ids).clamp_(max=candidate_ids.numel() - 1)  # (P,)
    if not torch.equal(candidate_ids[targets], target_ids):
        raise ValueError("every non-zero label must be among candidate_ids")
    correction = log_q.to(scored.dtype)  # (C,)
    losses = []
    for m in sizes:  # one (P, C) logits tensor per size, never (K, P, C) at once
        logits = scored[:, :m] @ candidate_reps[:, :m].T - correction  # (P, C)
        losses.append(F.cross_entropy(logits, targets))
    per_size = torch.stack(losses)  # (K,)
    return per_size.mean(), per_size.detach()
