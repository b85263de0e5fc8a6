"""DLRM: the batched dot interaction against its per-pair definition, the whole model against TorchRec's own
DLRM / DLRM_DCN with the same weights, gradients to every table, config errors, and the exact ROC AUC.

    .venv/bin/python -m pytest -q tests/unit/test_dlrm.py
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torchrec.models.dlrm import DLRM as TorchRecDLRM
from torchrec.models.dlrm import DLRM_DCN as TorchRecDLRMDCN
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from models.dlrm import (
    DLRM,
    DLRMConfig,
    DotInteraction,
    ctr_loss,
    dot_interaction_reference,
    ids_to_kjt,
    lower_triangle_order,
    roc_auc,
)


def _small(**overrides: object) -> DLRMConfig:
    kwargs: dict = dict(
        num_dense=13,
        hash_buckets=[7, 11, 5, 13, 9],
        embedding_dim=4,
        bottom_mlp=[16, 4],
        top_mlp=[12, 6, 1],
    )
    kwargs.update(overrides)
    return DLRMConfig(**kwargs)


def _batch(cfg: DLRMConfig, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, cfg.num_dense, generator=g)
    ids = torch.stack([torch.randint(0, n, (batch,), generator=g) for n in cfg.hash_buckets], dim=1)
    return dense, ids  # (B, N_d), (B, F)


# --------------------------------------------------------------------------------------------- interaction


def test_dot_interaction_matches_pair_loop_float64() -> None:
    torch.manual_seed(0)
    for num_sparse, dim in ((1, 3), (5, 4), (26, 8)):
        dense = torch.randn(6, dim, dtype=torch.float64)
        sparse = torch.randn(6, num_sparse, dim, dtype=torch.float64)
        batched = DotInteraction(num_sparse)(dense, sparse)
        reference = dot_interaction_reference(dense, sparse)
        assert batched.shape == (6, dim + num_sparse * (num_sparse + 1) // 2)
        torch.testing.assert_close(batched, reference, rtol=0, atol=1e-12)


def test_lower_triangle_order_is_the_facebookresearch_dlrm_layout() -> None:
    # facebookresearch/dlrm dlrm_s_pytorch.py interact_features (arch_interaction_itself=False)
    torch.manual_seed(1)
    num_sparse, dim = 4, 3
    dense, sparse = (
        torch.randn(2, dim, dtype=torch.float64),
        torch.randn(2, num_sparse, dim, dtype=torch.float64),
    )
    t = torch.cat([dense.unsqueeze(1), sparse], dim=1)
    z = torch.bmm(t, t.transpose(1, 2))
    ni = num_sparse + 1
    li = [i for i in range(ni) for j in range(i)]
    lj = [j for i in range(ni) for j in range(i)]
    theirs = torch.cat([dense, z[:, li, lj]], dim=1)
    ours = DotInteraction(num_sparse)(dense, sparse)
    torch.testing.assert_close(ours[:, dim:][:, lower_triangle_order(num_sparse)], theirs[:, dim:])
    assert sorted(lower_triangle_order(num_sparse)) == list(range(ni * (ni - 1) // 2))


# ------------------------------------------------------------------------------------- against TorchRec


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _copy_linears(src: nn.Module, dst: nn.Module) -> None:
    pairs = list(zip(_linears(src), _linears(dst)))
    assert pairs and len(_linears(src)) == len(_linears(dst))
    with torch.no_grad():
        for a, b in pairs:
            assert a.weight.shape == b.weight.shape
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)


def _torchrec_twin(model: DLRM) -> nn.Module:
    """TorchRec's own DLRM (or DLRM_DCN) with exactly our weights."""
    cfg = model.cfg
    ebc = EmbeddingBagCollection(tables=model.sparse_arch.embedding_bag_collection.embedding_bag_configs())
    ebc.load_state_dict(model.sparse_arch.embedding_bag_collection.state_dict())
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=cfg.num_dense,
        dense_arch_layer_sizes=cfg.bottom_mlp,
        over_arch_layer_sizes=cfg.top_mlp,
    )
    if cfg.interaction == "dot":
        twin = TorchRecDLRM(**common)
    else:
        twin = TorchRecDLRMDCN(
            **common, dcn_num_layers=cfg.dcn_num_layers, dcn_low_rank_dim=cfg.dcn_low_rank_dim
        )
        twin.inter_arch.crossnet.load_state_dict(model.inter_arch.crossnet.state_dict())
    _copy_linears(model.dense_arch, twin.dense_arch)
    _copy_linears(model.over_arch, twin.over_arch)
    return twin


@pytest.mark.parametrize("interaction", ["dot", "dcn"])
def test_matches_torchrec_dlrm_with_copied_weights(interaction: str) -> None:
    torch.manual_seed(2)
    cfg = _small(interaction=interaction, dcn_num_layers=2, dcn_low_rank_dim=3)
    model = DLRM(cfg)
    twin = _torchrec_twin(model)
    dense, ids = _batch(cfg, 8, seed=3)
    kjt = ids_to_kjt(ids, cfg.sparse_names)
    ours = model(dense, kjt)
    theirs = twin(dense_features=dense, sparse_features=kjt)  # (B, 1)
    assert ours.shape == (8,) and theirs.shape == (8, 1)
    torch.testing.assert_close(ours, theirs.squeeze(-1), rtol=1e-6, atol=1e-6)
    # the parameter count agrees too (the same architecture, not just the same outputs on one batch)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in twin.parameters())


def test_interaction_widths() -> None:
    assert _small().interaction_width == 4 + 5 * 6 // 2
    assert _small(interaction="dcn").interaction_width == 6 * 4
    assert DLRMConfig().interaction_width == 16 + 26 * 27 // 2


# ----------------------------------------------------------------------------------- shapes, gradients


@pytest.mark.parametrize("interaction", ["dot", "dcn"])
def test_shapes_and_gradients_reach_every_table(interaction: str) -> None:
    torch.manual_seed(4)
    cfg = _small(interaction=interaction)
    model = DLRM(cfg)
    dense, ids = _batch(cfg, 16, seed=5)
    logits = model(dense, ids_to_kjt(ids, cfg.sparse_names))
    assert logits.shape == (16,) and logits.dtype == torch.float32
    labels = (torch.arange(16) % 2).float()
    ctr_loss(logits, labels).backward()
    tables = model.sparse_arch.embedding_bag_collection.embedding_bags
    assert sorted(tables) == sorted(f"t_{name}" for name in cfg.sparse_names)
    for name, table in tables.items():
        grad = table.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
        used = torch.zeros(table.weight.shape[0], dtype=torch.bool)
        used[ids[:, cfg.sparse_names.index(name[2:])]] = True
        assert grad[~used].abs().sum() == 0, f"{name}: rows that were not looked up got gradient"
    for name, param in model.named_parameters():
        assert param.grad is not None, name


def test_ids_to_kjt_layout_and_missing_row() -> None:
    ids = torch.tensor([[0, 5], [3, 1], [2, 0]])
    kjt = ids_to_kjt(ids, ["a", "b"])
    assert kjt.keys() == ["a", "b"] and kjt.stride() == 3
    assert kjt["a"].values().tolist() == [0, 3, 2] and kjt["b"].values().tolist() == [5, 1, 0]
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        ids_to_kjt(ids, ["a", "b", "c"])


def test_multi_hot_is_sum_pooled() -> None:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    cfg = _small(hash_buckets=[10, 10], feature_names=["u", "v"], num_dense=2, bottom_mlp=[4], top_mlp=[1])
    model = DLRM(cfg)
    kjt = KeyedJaggedTensor(
        keys=["u", "v"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([2, 0, 1, 1])
    )
    pooled = model.sparse_arch(kjt).vectors  # (2, 2, 4)
    table = model.sparse_arch.embedding_bag_collection.embedding_bags
    torch.testing.assert_close(pooled[0, 0], table["t_u"].weight[1] + table["t_u"].weight[2])
    torch.testing.assert_close(pooled[1, 0], torch.zeros(4))  # an empty bag pools to zero
    torch.testing.assert_close(pooled[1, 1], table["t_v"].weight[4])


def test_ctr_loss_is_bce_with_logits() -> None:
    logits, labels = torch.tensor([-2.0, 0.5, 3.0]), torch.tensor([0.0, 1.0, 1.0])
    expected = -(
        labels * torch.sigmoid(logits).log() + (1 - labels) * (1 - torch.sigmoid(logits)).log()
    ).mean()
    torch.testing.assert_close(ctr_loss(logits, labels), expected)


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_dense": 0}, "num_dense must be a positive int"),
        ({"hash_buckets": []}, "at least one categorical"),
        ({"hash_buckets": [10, 1]}, r"hash_buckets\[1\] must be an int >= 2"),
        ({"hash_buckets": [10, 2.5]}, r"hash_buckets\[1\]"),
        ({"bottom_mlp": [16, 8]}, r"bottom MLP's last width \(8\) must equal embedding_dim \(4\)"),
        ({"bottom_mlp": []}, "bottom_mlp must list"),
        ({"top_mlp": [8, 2]}, "one logit"),
        ({"top_mlp": [0, 1]}, "top_mlp must be positive ints"),
        ({"interaction": "cross"}, "interaction must be one of"),
        ({"interaction": "dcn", "dcn_low_rank_dim": 0}, "dcn_low_rank_dim must be a positive int"),
        ({"dcn_num_layers": 0}, "dcn_num_layers"),
        ({"feature_names": ["a", "b"]}, "feature_names has 2 names but hash_buckets has 5"),
        ({"feature_names": ["a", "a", "b", "c", "d"]}, "unique"),
        ({"embedding_dim": True}, "embedding_dim must be a positive int"),
    ],
)
def test_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _small(**overrides)


def test_default_config_is_criteo_shaped() -> None:
    cfg = DLRMConfig()
    assert cfg.num_dense == 13 and cfg.num_sparse == 26
    assert cfg.sparse_names[0] == "cat_0" and cfg.sparse_names[-1] == "cat_25"


# ---------------------------------------------------------------------------------------------- ROC AUC


def _auc_brute_force(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_matches_pairwise_definition_with_ties() -> None:
    g = torch.Generator().manual_seed(6)
    for trial in range(20):
        n = int(torch.randint(2, 60, (1,), generator=g))
        # few distinct values: many ties, within and across classes
        scores = torch.randint(0, 1 + trial % 7, (n,), generator=g).float() / 3
        labels = torch.randint(0, 2, (n,), generator=g)
        labels[0], labels[1] = 0, 1
        assert roc_auc(scores, labels) == pytest.approx(
            _auc_brute_force(scores.tolist(), labels.tolist()), abs=1e-12
        )
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0
    assert roc_auc(torch.tensor([0.9, 0.1]), torch.tensor([0, 1])) == 0.0
    assert roc_auc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0, 1, 1])) == 0.5


def test_roc_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="differ in size"):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 0, 1]))
