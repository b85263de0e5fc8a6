"""The CTR models beside DLRM (models/ctr): each interaction against its definition written as plain loops
(FM sum-square identity vs the pairwise loop, CIN vs the loop over feature maps, DCN v1 / v2 cross layers
vs their formulas), TorchRec's FactorizationMachine shown not to be the FM, every model's parts and
gradients, crossed features, and the config's model key.

    .venv/bin/python -m pytest -q tests/unit/test_ctr_models.py
"""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.crossnet import LowRankCrossNet, LowRankMixtureCrossNet, VectorCrossNet
from torchrec.modules.deepfm import FactorizationMachine as TorchRecFactorizationMachine

from models.ctr import (
    CompressedInteractionNetwork,
    FactorizationMachine,
    build_ctr_model,
    cin_reference,
    cross_v1_reference,
    cross_v2_reference,
    fm_reference,
)
from models.dlrm import DLRMConfig, cross_ids, ids_to_kjt
from models.dlrm.config import CTR_MODELS

MODELS = list(CTR_MODELS)


def _cfg(model: str, **overrides: object) -> DLRMConfig:
    kwargs: dict = dict(
        model=model,
        num_dense=3,
        hash_buckets=[7, 11, 5, 13],
        embedding_dim=4,
        bottom_mlp=[8, 4],
        top_mlp=[6, 1],
    )
    if model == "wide_deep":
        kwargs["wide_crosses"] = ["cat_0*cat_2"]
        kwargs["wide_cross_buckets"] = 17
    if model == "xdeepfm":
        kwargs["cin_layers"] = [3, 2]
    kwargs.update(overrides)
    return DLRMConfig(**kwargs)


def _batch(cfg: DLRMConfig, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, cfg.num_dense, generator=g)
    ids = torch.stack([torch.randint(0, n, (batch,), generator=g) for n in cfg.hash_buckets], dim=1)
    return dense, ids  # (B, N_d), (B, F)


# ------------------------------------------------------------------------------------------------- FM


def test_fm_sum_square_identity_equals_the_pairwise_loop() -> None:
    torch.manual_seed(0)
    for fields, dim in ((2, 1), (5, 4), (27, 8)):
        vectors = torch.randn(6, fields, dim, dtype=torch.float64)
        fast, loop = FactorizationMachine()(vectors), fm_reference(vectors)
        assert fast.shape == (6,)
        torch.testing.assert_close(fast, loop, rtol=1e-12, atol=1e-10)


def test_torchrec_factorization_machine_is_not_the_fm() -> None:
    """Why models/ctr has its own FM: TorchRec's flattens (B, N, D) to (B, N D) before the identity, so
    it also sums products of different coordinates; it agrees with the FM only for D = 1."""
    torch.manual_seed(0)
    vectors = torch.randn(4, 5, 3, dtype=torch.float64)
    theirs = TorchRecFactorizationMachine()([vectors]).squeeze(-1)
    flat = vectors.flatten(1)
    all_element_pairs = 0.5 * (flat.sum(1).square() - flat.square().sum(1))
    torch.testing.assert_close(theirs, all_element_pairs)
    assert not torch.allclose(theirs, fm_reference(vectors))
    scalars = vectors[..., :1]
    torch.testing.assert_close(TorchRecFactorizationMachine()([scalars]).squeeze(-1), fm_reference(scalars))


# ------------------------------------------------------------------------------------------------ CIN


def test_cin_matches_the_loop_over_feature_maps() -> None:
    torch.manual_seed(0)
    fields = torch.randn(3, 4, 5, dtype=torch.float64)
    cin = CompressedInteractionNetwork(num_fields=4, layer_sizes=[3, 2, 4]).double()
    with torch.no_grad():
        for bias in cin.biases:
            bias.normal_()
    out = cin(fields)
    assert out.shape == (3, 3 + 2 + 4) and cin.output_width == 9
    reference = cin_reference(fields, list(cin.weights), list(cin.biases))
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-10)


def test_cin_layer_k_is_a_polynomial_of_degree_k_plus_1() -> None:
    """Scaling the input by t scales layer k's maps (without bias) by t^(k+1): the orders the CIN learns."""
    torch.manual_seed(0)
    fields = torch.randn(2, 3, 4, dtype=torch.float64)
    cin = CompressedInteractionNetwork(3, [2, 2, 2]).double()
    base, scaled = cin(fields), cin(2.0 * fields)
    for k in range(3):
        torch.testing.assert_close(scaled[:, 2 * k : 2 * k + 2], 2.0 ** (k + 2) * base[:, 2 * k : 2 * k + 2])


# --------------------------------------------------------------------------------------------- crosses


def test_dcn_v1_vector_cross_matches_its_formula() -> None:
    torch.manual_seed(0)
    net = VectorCrossNet(in_features=6, num_layers=3).double()
    with torch.no_grad():
        for bias in net.bias:
            bias.normal_()
    x0 = torch.randn(4, 6, dtype=torch.float64)
    kernels = [k.squeeze(1) for k in net.kernels]
    biases = [b.squeeze(1) for b in net.bias]
    torch.testing.assert_close(net(x0), cross_v1_reference(x0, kernels, biases), rtol=1e-12, atol=1e-10)


def test_dcn_v2_low_rank_cross_matches_its_formula() -> None:
    torch.manual_seed(0)
    net = LowRankCrossNet(in_features=6, num_layers=2, low_rank=3).double()
    with torch.no_grad():
        for bias in net.bias:
            bias.normal_()
    x0 = torch.randn(4, 6, dtype=torch.float64)
    reference = cross_v2_reference(x0, list(net.W_kernels), list(net.V_kernels), list(net.bias))
    torch.testing.assert_close(net(x0), reference, rtol=1e-12, atol=1e-10)


def test_one_expert_mixture_cross_with_identity_core_is_the_low_rank_cross_of_relu() -> None:
    """LowRankMixtureCrossNet with one expert: x_0 * (U g(C g(V x_l)) + b) + x_l; with C = I and V x >= 0
    the activation g = ReLU is the identity and the layer is the v2 formula with W = U V."""
    torch.manual_seed(0)
    net = LowRankMixtureCrossNet(in_features=5, num_layers=2, num_experts=1, low_rank=2).double()
    x0 = torch.rand(3, 5, dtype=torch.float64)
    with torch.no_grad():
        for layer in range(2):
            net.C_kernels[layer].copy_(torch.eye(2).unsqueeze(0))
            net.V_kernels[layer].abs_()
            net.U_kernels[layer].abs_()
    us = [u[0] for u in net.U_kernels]
    vs = [v[0] for v in net.V_kernels]
    reference = cross_v2_reference(x0, us, vs, [b.squeeze(1) for b in net.bias])
    torch.testing.assert_close(net(x0), reference, rtol=1e-12, atol=1e-10)


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("model", MODELS)
def test_every_model_gives_logits_and_gradients_reach_every_table(model: str) -> None:
    torch.manual_seed(0)
    cfg = _cfg(model)
    net = build_ctr_model(cfg)
    dense, ids = _batch(cfg, 8, seed=1)
    logits = net(dense, ids_to_kjt(ids, cfg.sparse_names))
    assert logits.shape == (8,) and torch.isfinite(logits).all()
    logits.sum().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    tables = [name for name, _ in net.named_parameters() if name.startswith("sparse_arch.")]
    linear = model in ("wide_deep", "deepfm", "xdeepfm")
    crosses = len(cfg.wide_crosses)
    assert len(tables) == cfg.num_sparse * (2 if linear else 1) + crosses


def test_deepfm_is_first_order_plus_fm_plus_deep() -> None:
    torch.manual_seed(0)
    cfg = _cfg("deepfm")
    net = build_ctr_model(cfg)
    dense, ids = _batch(cfg, 5, seed=2)
    pooled = net.sparse_arch(ids_to_kjt(ids, cfg.sparse_names))
    x = net.dense_arch(dense)
    fields = torch.cat([x.unsqueeze(1), pooled.vectors], dim=1)
    first = net.first_order.dense(dense).squeeze(-1) + sum(
        net.sparse_arch.linear_bag_collection.embedding_bags[f"w_{name}"].weight[ids[:, f]].sum(-1)
        for f, name in enumerate(cfg.sparse_names)
    )
    expected = first + fm_reference(fields) + net.over_arch(fields.flatten(1)).squeeze(-1)
    torch.testing.assert_close(net(dense, ids_to_kjt(ids, cfg.sparse_names)), expected)


def test_wide_part_reads_the_hashed_cross_of_the_named_pair() -> None:
    cfg = _cfg("wide_deep")
    net = build_ctr_model(cfg)
    dense, ids = _batch(cfg, 6, seed=3)
    pooled = net.sparse_arch(ids_to_kjt(ids, cfg.sparse_names))
    assert pooled.weights is not None and pooled.weights.shape == (6, cfg.num_sparse + 1)
    rows = cross_ids(ids[:, 0], ids[:, 2], cfg.hash_buckets[2], 17)
    table = net.sparse_arch.linear_bag_collection.embedding_bags["w_cat_0*cat_2"].weight
    torch.testing.assert_close(pooled.weights[:, -1], table[rows].sum(-1))


def test_cross_ids_are_in_range_and_separate_pairs() -> None:
    first, second = torch.arange(100).repeat_interleave(100), torch.arange(100).repeat(100)
    rows = cross_ids(first, second, 100, 10_000)
    assert rows.min() >= 0 and rows.max() < 10_000
    assert len(rows.unique()) > 0.6 * 10_000  # spread (all 10,000 pairs into 10,000 rows: ~63% distinct)


def test_dcn_structures_and_experts() -> None:
    for model, overrides in (
        ("dcn", {"dcn_structure": "parallel", "dcn_deep_mlp": [5]}),
        ("dcn_v2", {"dcn_num_experts": 3, "dcn_low_rank_dim": 2}),
    ):
        cfg = _cfg(model, **overrides)
        net = build_ctr_model(cfg)
        dense, ids = _batch(cfg, 4, seed=4)
        assert net(dense, ids_to_kjt(ids, cfg.sparse_names)).shape == (4,)
    assert type(build_ctr_model(_cfg("dcn")).inter_arch.crossnet).__name__ == "VectorCrossNet"
    parallel = build_ctr_model(_cfg("dcn", dcn_structure="parallel", dcn_deep_mlp=[5]))
    assert parallel.over_arch[0].in_features == 5 * 4 + 5
    mixture = build_ctr_model(_cfg("dcn_v2", dcn_num_experts=3))
    assert type(mixture.inter_arch.crossnet).__name__ == "LowRankMixtureCrossNet"


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="model must be one of"):
        _cfg("fm")
    with pytest.raises(ValueError, match="cin_layers applies to model xdeepfm only"):
        _cfg("deepfm", cin_layers=[4])
    with pytest.raises(ValueError, match="wide_crosses: 'cat_0\\*nope' names \\['nope'\\]"):
        _cfg("wide_deep", wide_crosses=["cat_0*nope"])
    with pytest.raises(ValueError, match='"a\\*b" pairs'):
        _cfg("wide_deep", wide_crosses=["cat_0"])
    assert DLRMConfig().model == "dlrm"  # earlier configs and exports without the key are DLRMs
