"""The sampled-softmax Matryoshka loss against the full-softmax loss and a hand formula, the candidate set,
the negative sampler, and the logQ correction."""

from __future__ import annotations

import math

import pytest
import torch

from models.fmrl import NegativeSampler, candidate_set, matryoshka_loss, sampled_matryoshka_loss

B, L, N = 3, 5, 17
SIZE_LISTS = [[2, 4, 8], [8], [1, 3, 8]]


def _inputs(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = sizes[-1]
    hidden = torch.randn(B, L, dim, generator=g, dtype=torch.float64).requires_grad_()
    table = torch.randn(N + 1, dim, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(1, N + 1, (B, L), generator=g)
    labels[0, :2] = 0  # padding
    labels[2, -1] = 0
    labels[1, 0] = labels[1, 1]  # a repeated target
    return hidden, table, labels


@pytest.mark.parametrize("sizes", SIZE_LISTS, ids=str)
def test_all_items_without_correction_equals_full_softmax(sizes) -> None:
    hidden, table, labels = _inputs(sizes)
    ids = torch.arange(1, N + 1)
    loss, per_size = sampled_matryoshka_loss(
        hidden, labels, table[ids], ids, torch.zeros(N, dtype=torch.float64), sizes
    )
    grad_hidden, grad_table = torch.autograd.grad(loss, (hidden, table))

    ref_loss, ref_per_size = matryoshka_loss(hidden, table, labels, sizes)
    ref_grad_hidden, ref_grad_table = torch.autograd.grad(ref_loss, (hidden, table))

    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(per_size, ref_per_size, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_hidden, ref_grad_hidden, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_table, ref_grad_table, rtol=0, atol=1e-10)
    assert grad_table[0].abs().max() == 0  # the pad row is no candidate
    assert not per_size.requires_grad


def test_hand_computed_example() -> None:
    # B=1, L=2, C=3 candidates (ids 2, 5, 9), D=2, sizes (1, 2); targets 9 then 2
    hidden = torch.tensor([[[1.0, 2.0], [-0.5, 1.0]]], dtype=torch.float64)
    reps = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-1.0, 1.5]], dtype=torch.float64)
    ids = torch.tensor([2, 5, 9])
    log_q = torch.tensor([0.3, -0.2, 1.1], dtype=torch.float64)
    labels = torch.tensor([[9, 2]])
    target_cols = [2, 0]

    expected = []
    for m in (1, 2):
        ces = []
        for pos, t in enumerate(target_cols):
            h = hidden[0, pos].tolist()
            logits = [sum(h[k] * reps[j, k].item() for k in range(m)) - log_q[j].item() for j in range(3)]
            ces.append(math.log(sum(math.exp(z) for z in logits)) - logits[t])
        expected.append(sum(ces) / len(ces))

    loss, per_size = sampled_matryoshka_loss(hidden, labels, reps, ids, log_q, [1, 2])
    torch.testing.assert_close(per_size, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, torch.tensor(sum(expected) / 2, dtype=torch.float64), rtol=1e-12, atol=0)


def test_log_q_correction_moves_the_loss() -> None:
    sizes = [2, 4, 8]
    hidden, table, labels = _inputs(sizes)
    labels = torch.full_like(labels, 3)  # one target id for every position
    ids = torch.arange(1, N + 1)
    target_col = 2
    zero = torch.zeros(N, dtype=torch.float64)
    base, _ = sampled_matryoshka_loss(hidden, labels, table[ids], ids, zero, sizes)

    on_target = zero.clone()
    on_target[target_col] = 2.0
    raised, _ = sampled_matryoshka_loss(hidden, labels, table[ids], ids, on_target, sizes)
    on_negative = zero.clone()
    on_negative[target_col + 1] = 2.0
    lowered, _ = sampled_matryoshka_loss(hidden, labels, table[ids], ids, on_negative, sizes)
    assert raised > base > lowered

    # a constant shift of log_q cancels in the softmax
    shifted, _ = sampled_matryoshka_loss(hidden, labels, table[ids], ids, zero + 5.0, sizes)
    torch.testing.assert_close(shifted, base, rtol=1e-12, atol=0)


def test_gradients_flow_into_hidden_and_candidates() -> None:
    sizes = [2, 8]
    hidden, table, labels = _inputs(sizes)
    sampler = NegativeSampler(N, 6)
    ids, _ = candidate_set(labels, sampler.sample(torch.Generator().manual_seed(1)))
    reps = table[ids].detach().requires_grad_()
    loss, _ = sampled_matryoshka_loss(hidden, labels, reps, ids, sampler.log_q(ids), sizes)
    loss.backward()
    assert hidden.grad.abs().sum() > 0 and reps.grad.abs().sum() > 0
    assert hidden.grad[labels == 0].abs().max() == 0  # padded positions take no gradient


def test_label_missing_from_candidates_raises() -> None:
    hidden, table, labels = _inputs([8])
    ids = torch.arange(1, N + 1)
    ids = ids[ids != labels[labels > 0][0]]
    with pytest.raises(ValueError, match="candidate_ids"):
        sampled_matryoshka_loss(hidden, labels, table[ids], ids, torch.zeros(len(ids)), [8])


def test_candidate_set_unique_sorted_and_maps_back() -> None:
    labels = torch.tensor([[0, 7, 3], [3, 0, 12]])
    negatives = torch.tensor([5, 7, 5, 1, 12, 20])  # 7 and 12 are also targets, 5 repeats
    ids, target_index = candidate_set(labels, negatives)
    assert ids.tolist() == [1, 3, 5, 7, 12, 20]
    assert torch.equal(ids[target_index], labels[labels > 0])
    assert target_index.shape == (4,)
    with pytest.raises(ValueError, match="negatives"):
        candidate_set(labels, torch.tensor([0, 4]))


@pytest.mark.parametrize("distribution", ["uniform", "popularity"])
def test_sampler_stays_in_range(distribution) -> None:
    counts = torch.arange(N, dtype=torch.float64) if distribution == "popularity" else None
    sampler = NegativeSampler(N, 5000, distribution, counts)
    draws = sampler.sample(torch.Generator().manual_seed(0))
    assert draws.dtype == torch.int64 and draws.shape == (5000,)
    assert draws.min() >= 1 and draws.max() <= N
    assert len(draws.unique()) == N  # every item drawable, smoothing included (count 0 for item 1)


def test_uniform_log_q() -> None:
    sampler = NegativeSampler(N, 40)
    ids = torch.tensor([1, 4, N])
    torch.testing.assert_close(sampler.log_q(ids), torch.full((3,), math.log(40 / N), dtype=torch.float64))


def test_popularity_frequencies_and_log_q() -> None:
    counts = torch.tensor([0.0, 1.0, 10.0, 100.0, 3.0])
    alpha, draws_per_call, calls = 0.75, 1000, 200
    sampler = NegativeSampler(5, draws_per_call, "popularity", counts, alpha)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sampler.sample(g) for _ in range(calls)])
    frequencies = torch.bincount(draws, minlength=6)[1:].double() / draws.numel()
    weights = (counts.double() + 1) ** alpha
    expected = weights / weights.sum()
    # 200k draws: one standard deviation is at most 0.0011
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.006)
    ids = torch.arange(1, 6)
    torch.testing.assert_close(sampler.log_q(ids), torch.log(draws_per_call * expected))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_items": 0, "num_negatives": 3}, "num_items"),
        ({"num_items": 5, "num_negatives": 0}, "num_negatives"),
        ({"num_items": 5, "num_negatives": 3, "distribution": "zipf"}, "distribution"),
        ({"num_items": 5, "num_negatives": 3, "distribution": "popularity"}, "counts"),
        ({"num_items": 5, "num_negatives": 3, "counts": torch.ones(5)}, "counts"),
        (
            {"num_items": 5, "num_negatives": 3, "distribution": "popularity", "counts": torch.ones(4)},
            "counts",
        ),
        (
            {
                "num_items": 2,
                "num_negatives": 3,
                "distribution": "popularity",
                "counts": torch.tensor([1.0, -1]),
            },
            "counts",
        ),
        ({"num_items": 5, "num_negatives": 3, "alpha": -0.5}, "alpha"),
    ],
)
def test_sampler_bad_arguments(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        NegativeSampler(**kwargs)


def test_log_q_rejects_padding_id() -> None:
    with pytest.raises(ValueError, match="ids"):
        NegativeSampler(N, 3).log_q(torch.tensor([0, 1]))


def test_popularity_chi_square_against_the_probabilities() -> None:
    # 50 items of uneven popularity, 200k draws: Pearson's chi-square against the sampler's own
    # probabilities (exp(log_q) / M) and against the formula (counts + 1) ** alpha / sum
    num_items, draws_per_call, calls, alpha = 50, 2000, 100, 0.75
    counts = torch.randint(0, 500, (num_items,), generator=torch.Generator().manual_seed(3)).double()
    sampler = NegativeSampler(num_items, draws_per_call, "popularity", counts, alpha)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sampler.sample(g) for _ in range(calls)])
    observed = torch.bincount(draws, minlength=num_items + 1)[1:].double()
    weights = (counts + 1) ** alpha
    probs = torch.exp(sampler.log_q(torch.arange(1, num_items + 1))) / draws_per_call
    torch.testing.assert_close(probs, weights / weights.sum(), rtol=1e-12, atol=0)
    expected = probs * draws.numel()
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 85.4  # the 0.999 quantile of chi-square with 49 degrees of freedom


@pytest.mark.parametrize("distribution", ["uniform", "popularity"])
def test_sampler_past_two_to_the_24_items(distribution) -> None:
    # torch.multinomial refuses more than 2^24 categories; the inverse-CDF draw does not. The last 1,000
    # items carry half the popularity mass, so about half the draws must land past 2^24.
    num_items, draws = 2**24 + 1000, 20_000
    counts = None
    if distribution == "popularity":
        counts = torch.zeros(num_items, dtype=torch.float64)  # 134 MB
        counts[2**24 :] = 2**24 / 1000 - 1  # weight (count + 1) ** 1 = 2^24 / 1000 each
    sampler = NegativeSampler(num_items, draws, distribution, counts, alpha=1.0)
    ids = sampler.sample(torch.Generator().manual_seed(0))
    assert ids.min() >= 1 and ids.max() <= num_items
    past = float((ids > 2**24).double().mean())
    tail_share = 0.5 if distribution == "popularity" else 1000 / num_items
    assert abs(past - tail_share) < 0.02  # one standard deviation: <= 0.0036
    if distribution == "popularity":
        assert ids.max() > 2**24
        log_q = sampler.log_q(torch.tensor([1, num_items]))
        expected = torch.tensor([1 / 2**25, 1 / 2 / 1000], dtype=torch.float64)
        torch.testing.assert_close(log_q, torch.log(draws * expected), rtol=1e-9, atol=0)


def test_popularity_draws_are_reproducible_from_the_generator_state() -> None:
    # the trainer saves the generator's state for an exact resume: the same state, the same negatives
    sampler = NegativeSampler(N, 64, "popularity", torch.arange(N, dtype=torch.float64))
    g = torch.Generator().manual_seed(7)
    sampler.sample(g)
    state = g.get_state()
    first = sampler.sample(g)
    g.set_state(state)
    assert torch.equal(sampler.sample(g), first)
