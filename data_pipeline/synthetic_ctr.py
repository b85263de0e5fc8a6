"""Criteo-format click data with learnable structure, generated (the DLRM demo's embedded data set)::

    from data_pipeline.synthetic_ctr import prepare_synthetic_ctr
    prepare_synthetic_ctr("runs/data/synthetic-ctr", rows=50_000, seed=0)

The lines are generated in Criteo's TSV format and written through the Criteo converter's parser, so the
result is byte-identical to converting them from a file (data_pipeline/criteo.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from data_pipeline.converters import RowProblems
from data_pipeline.criteo import (
    NUM_DENSE,
    NUM_SPARSE,
    _write_criteo_lines,
    criteo_writer,
)
from data_pipeline.ctr import SPLITS, CTRSummary, _buckets, _summary
from data_pipeline.shards import generated_dataset
from data_pipeline.storage import StorageOptions

__all__ = ["prepare_synthetic_ctr", "synthetic_criteo_lines", "synthetic_ctr_draw", "synthetic_ctr_pairs"]


# Hidden structure of the synthetic data (see synthetic_criteo_lines). The sizes make a logistic
# regression on one-hot features clearly better than chance, and leave much more to a model that can
# form products of embeddings (the pairwise and dense x categorical terms have zero mean per value).
_LATENT = 4  # width of the hidden per-value factor vectors
_NUM_PAIRS = 10  # interacting pairs of categorical features
_MAIN_SCALE = 0.25  # std of a value's own (main) effect on the logit
_PAIR_SCALE = 1.0  # scale of each <u_f, u_g> pair term
_DENSE_SCALE = 0.3  # std of a dense feature's own slope
_DENSE_CROSS = 4  # dense features whose effect is modulated by a categorical value's factor vector
_TARGET_RATE = 0.25  # positive rate (Criteo: ~0.26), reached by calibrating the bias
_CHUNK = 4096  # rows per generator block; row r's values depend only on (seed, r // _CHUNK)
_STRUCTURE, _ROWS, _CALIBRATION, _HIGHER_ORDER = 0, 1, 2, 3  # seed-tuple tags: independent streams
_ELEMENT_CROSS_WIDTH = _LATENT  # latent elements each crossed with their own dense feature


class _HiddenStructure:
    """The hidden parameters, all drawn from ``default_rng((seed, _STRUCTURE))``."""

    def __init__(
        self, seed: int, max_cardinality: int, third_order: float = 0.0, element_cross: float = 0.0
    ) -> None:
        rng = np.random.default_rng((seed, _STRUCTURE))
        self.cardinality = rng.permutation(
            np.geomspace(3, max_cardinality, NUM_SPARSE).round().astype(np.int64)
        )
        self.tokens = [rng.integers(0, 2**32, n, dtype=np.int64) for n in self.cardinality]  # hex values
        # Zipf-like popularity within each feature
        self.cum_pop = [np.cumsum(1.0 / np.arange(1, n + 1) ** 1.1) for n in self.cardinality]
        self.cat_missing = rng.uniform(0.0, 0.15, NUM_SPARSE)
        self.main = [rng.normal(0.0, _MAIN_SCALE, n) for n in self.cardinality]
        self.factors = [rng.normal(0.0, 1.0, (n, _LATENT)) for n in self.cardinality]
        pairs = [(f, g) for f in range(NUM_SPARSE) for g in range(f + 1, NUM_SPARSE)]
        self.pairs = [pairs[i] for i in rng.choice(len(pairs), _NUM_PAIRS, replace=False)]
        self.pair_weight = _PAIR_SCALE / math.sqrt(_LATENT * _NUM_PAIRS / 4)
        # dense counts: floor(exp(N(mu, sigma))) - 1 >= 0, heavy-tailed like Criteo's
        self.dense_mu = rng.uniform(0.0, 4.0, NUM_DENSE)
        self.dense_sigma = rng.uniform(0.5, 1.5, NUM_DENSE)
        self.dense_missing = rng.uniform(0.0, 0.4, NUM_DENSE)
        self.dense_slope = rng.normal(0.0, _DENSE_SCALE, NUM_DENSE)
        self.cross_feature = rng.choice(NUM_SPARSE, _DENSE_CROSS, replace=False)
        self.cross_vector = rng.normal(0.0, 1.0 / math.sqrt(_LATENT), (_DENSE_CROSS, _LATENT))
        # the optional higher-order terms draw from their own stream: off, the data are as before
        higher = np.random.default_rng((seed, _HIGHER_ORDER))
        self.third_order, self.element_cross = float(third_order), float(element_cross)
        self.triple = higher.choice(NUM_SPARSE, 3, replace=False)  # the three features of the 3rd-order term
        self.traits = [higher.choice([-1.0, 1.0], n) for n in self.cardinality]  # a +-1 trait per value
        self.element_feature = int(higher.integers(NUM_SPARSE))  # whose latent the dense features cross
        self.element_dense = higher.choice(NUM_DENSE, _ELEMENT_CROSS_WIDTH, replace=False)
        self.bias = 0.0
        self.bias = self._calibrated_bias(seed)

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(values (n, 26) int, -1 = missing; counts (n, 13) int, -1 = missing; logits (n,); labels (n,))``."""
        values = np.empty((n, NUM_SPARSE), dtype=np.int64)
        for f in range(NUM_SPARSE):
            cum = self.cum_pop[f]
            values[:, f] = np.minimum(
                np.searchsorted(cum, rng.random(n) * cum[-1], side="right"), len(cum) - 1
            )
        values[rng.random((n, NUM_SPARSE)) < self.cat_missing] = -1
        counts = np.floor(np.exp(self.dense_mu + self.dense_sigma * rng.standard_normal((n, NUM_DENSE)))) - 1
        counts = np.maximum(counts, 0).astype(np.int64)
        counts[rng.random((n, NUM_DENSE)) < self.dense_missing] = -1
        logits = self._logits(values, counts)
        labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int64)
        return values, counts, logits, labels

    def _logits(self, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
        n = values.shape[0]
        present = values >= 0
        main = np.zeros(n)
        factors = np.zeros((n, NUM_SPARSE, _LATENT))  # a missing value has no effect (zero vector)
        for f in range(NUM_SPARSE):
            v = np.where(present[:, f], values[:, f], 0)
            main += np.where(present[:, f], self.main[f][v], 0.0)
            factors[:, f] = np.where(present[:, f, None], self.factors[f][v], 0.0)
        pair = sum(np.einsum("nk,nk->n", factors[:, f], factors[:, g]) for f, g in self.pairs)
        z = (np.log1p(np.maximum(counts, 0)) - self.dense_mu) / self.dense_sigma  # (n, 13), about N(0, 1)
        z[counts < 0] = 0.0
        dense = z @ self.dense_slope
        cross = sum(
            z[:, j] * (factors[:, f] @ self.cross_vector[j]) for j, f in enumerate(self.cross_feature)
        )
        logits = self.bias + main + self.pair_weight * pair + dense + cross
        if self.third_order:
            logits = logits + self.third_order * self.triple_indicator(values)
        if self.element_cross:
            logits = logits + self.element_cross * self.element_term(factors, z)
        return logits

    def triple_indicator(self, values: np.ndarray) -> np.ndarray:
        """(n,) in {-1, 0, +1}: the product of the three ``triple`` features' value traits (0 if one is
        missing). A purely third-order signal: each pair of the three traits is independent of it."""
        signs = np.ones(values.shape[0])
        for f in self.triple:
            present = values[:, f] >= 0
            signs *= np.where(present, self.traits[f][np.where(present, values[:, f], 0)], 0.0)
        return signs

    def element_term(self, factors: np.ndarray, z: np.ndarray) -> np.ndarray:
        """(n,) about unit variance: sum_k z_{j_k} u_f[v_f]_k / 2, latent element k of feature f times its
        own dense feature j_k (element level: no single dot product of a dense vector with u_f gives it)."""
        latent = factors[:, self.element_feature, :_ELEMENT_CROSS_WIDTH]  # (n, K)
        return (z[:, self.element_dense] * latent).sum(axis=1) / math.sqrt(_ELEMENT_CROSS_WIDTH)

    def _calibrated_bias(self, seed: int) -> float:
        rng = np.random.default_rng((seed, _CALIBRATION))
        _, _, logits, _ = self.draw(rng, 20_000)
        low, high = -20.0, 20.0
        for _ in range(60):  # bisection on the mean click probability
            mid = (low + high) / 2
            if np.mean(1.0 / (1.0 + np.exp(-(logits + mid)))) < _TARGET_RATE:
                low = mid
            else:
                high = mid
        return (low + high) / 2


def synthetic_ctr_pairs(seed: int, max_cardinality: int = 100) -> list[tuple[int, int]]:
    """The categorical feature pairs (f, g), f < g, whose factor products drive the clicks: the crosses an
    engineer with perfect knowledge would hand to Wide & Deep (bench/ctr_models.py)."""
    return [(int(f), int(g)) for f, g in _HiddenStructure(seed, max_cardinality).pairs]


def synthetic_ctr_draw(
    rows: int, seed: int, *, max_cardinality: int = 100, third_order: float = 0.0, element_cross: float = 0.0
) -> dict[str, np.ndarray]:
    """The generator's rows with what is hidden in them, for tests and benchmarks (the same rows as
    :func:`synthetic_criteo_lines` with these arguments): ``values`` (n, 26) value indices (-1 missing),
    ``counts`` (n, 13), ``logits`` (n,) the true logits, ``labels`` (n,), and the two optional terms'
    signals ``triple_indicator`` and ``element_term`` (n,) (computed whether or not they are on)."""
    structure = _HiddenStructure(seed, max_cardinality, third_order, element_cross)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("values", "counts", "logits", "labels")}
    for chunk_start in range(0, rows, _CHUNK):
        rng = np.random.default_rng((seed, _ROWS, chunk_start // _CHUNK))
        drawn = structure.draw(rng, _CHUNK)
        for name, value in zip(parts, drawn):
            parts[name].append(value[: rows - chunk_start])
    out = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    out["triple_indicator"] = structure.triple_indicator(out["values"])
    z = (np.log1p(np.maximum(out["counts"], 0)) - structure.dense_mu) / structure.dense_sigma
    z[out["counts"] < 0] = 0.0
    factors = np.zeros((rows, NUM_SPARSE, _LATENT))
    f = structure.element_feature
    present = out["values"][:, f] >= 0
    factors[:, f] = np.where(
        present[:, None], structure.factors[f][np.where(present, out["values"][:, f], 0)], 0.0
    )
    out["element_term"] = structure.element_term(factors, z)
    return out


def synthetic_criteo_lines(
    rows: int, seed: int, *, max_cardinality: int = 100, third_order: float = 0.0, element_cross: float = 0.0
) -> Iterator[bytes]:
    """Criteo-format TSV lines (label, 13 ints, 26 hex) with learnable hidden structure.

    Per row: each categorical feature f takes one of ``cardinality[f]`` values (3..``max_cardinality``,
    Zipf-popular, missing with a per-feature rate up to 15%), written as a fixed random 32-bit hex token;
    each dense feature is a heavy-tailed count (missing up to 40%). The click is Bernoulli(sigmoid(logit)):

        logit = bias + sum_f m_f[v_f]                                 main effects (one-hot learnable)
              + w * sum_{(f,g) in 10 pairs} <u_f[v_f], u_g[v_g]>      pairwise factor interactions
              + sum_j a_j z_j + sum_{j<4} z_j <c_j, u_{f_j}[v_{f_j}]> dense slopes and dense x categorical

    with z_j the standardised log count. The interaction terms average to zero over each single value,
    so a one-hot logistic regression sees only the main and dense effects, while DLRM's dot products of
    embeddings (and its dense vector) can represent them. The bias is calibrated to a 25% click rate.
    Row r depends only on ``(seed, r // 4096)``: a smaller ``rows`` gives a prefix of a larger one.

    Two optional higher-order terms, off (0) by default (the lines are then those of earlier versions),
    are added to the logit with a known strength, the standard deviation they add to it:

        + third_order * s_a[v_a] s_b[v_b] s_c[v_c]          a +-1 trait per value of three features:
                                                            third order only (every pair is independent)
        + element_cross * sum_{k<4} z_{j_k} u_f[v_f]_k / 2  latent element k times its own dense feature

    Dot products of embeddings (DLRM, FM) cannot form the first; cross layers and the CIN can (in
    principle) form both.
    """
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    if max_cardinality < 3:
        raise ValueError(f"max_cardinality must be >= 3, got {max_cardinality}")
    for name, strength in (("third_order", third_order), ("element_cross", element_cross)):
        if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {strength!r}")
    structure = _HiddenStructure(seed, max_cardinality, third_order, element_cross)
    # per feature: its tokens as text, plus "" at index -1 for a missing value
    token_text = [
        np.array([f"{t:08x}" for t in tokens.tolist()] + [""], dtype=object) for tokens in structure.tokens
    ]
    for chunk_start in range(0, rows, _CHUNK):
        n = min(_CHUNK, rows - chunk_start)
        rng = np.random.default_rng((seed, _ROWS, chunk_start // _CHUNK))
        values, counts, _, labels = structure.draw(rng, _CHUNK)
        columns = [labels[:n].astype(str).astype(object)]
        columns += [
            np.where(counts[:n, j] < 0, "", counts[:n, j].astype(str)).astype(object)
            for j in range(NUM_DENSE)
        ]
        columns += [token_text[f][values[:n, f]] for f in range(NUM_SPARSE)]  # index -1 -> ""
        for cells in zip(*(c.tolist() for c in columns)):
            yield ("\t".join(cells) + "\n").encode()


def prepare_synthetic_ctr(
    out_url: str,
    *,
    rows: int = 50_000,
    seed: int = 0,
    hash_buckets: int | Sequence[int] = 1000,
    max_cardinality: int = 100,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_samples_per_shard: int = 10_000,
    third_order: float = 0.0,
    element_cross: float = 0.0,
    options: StorageOptions | None = None,
) -> CTRSummary:
    """Write :func:`synthetic_criteo_lines` through the Criteo converter's encoding into CTR shards.

    The result is byte-identical to writing those lines to a TSV file and running :func:`convert_criteo`
    on it with the same settings. If ``out_url`` already holds a complete data set made with the same
    settings it is reused (``reused=True``); one made with other settings is a ValueError.
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive int, got {rows!r}")
    buckets = _buckets(hash_buckets, NUM_SPARSE)
    generator = {
        "rows": rows,
        "seed": seed,
        "max_cardinality": max_cardinality,
        "hash_buckets": buckets,
        "valid_fraction": valid_fraction,
        "test_fraction": test_fraction,
        "max_samples_per_shard": max_samples_per_shard,
    }
    # recorded only when on, so that data sets written before these terms existed are still reused
    if third_order:
        generator["third_order"] = float(third_order)
    if element_cross:
        generator["element_cross"] = float(element_cross)
    existing = _existing_synthetic(out_url, generator, options)
    if existing is not None:
        return existing
    writer = criteo_writer(
        out_url, "synthetic-ctr", rows, buckets, valid_fraction, test_fraction, max_samples_per_shard, options
    )
    problems = RowProblems("raise")  # generated lines are never malformed; one would be a bug
    source = "synthetic"
    with writer:
        numbered = (
            (source, i + 1, line)
            for i, line in enumerate(
                synthetic_criteo_lines(
                    rows,
                    seed,
                    max_cardinality=max_cardinality,
                    third_order=third_order,
                    element_cross=element_cross,
                )
            )
        )
        _write_criteo_lines(writer, numbered, problems)
    return writer.finish({}, {"sources": [source], "generator": generator})


def _existing_synthetic(
    out_url: str, generator: dict[str, Any], options: StorageOptions | None
) -> CTRSummary | None:
    doc = generated_dataset(out_url, generator, SPLITS, options)
    return None if doc is None else _summary(out_url, doc, reused=True)
