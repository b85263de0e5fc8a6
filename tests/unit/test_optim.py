"""AdamW parameter groups (decay on matrices only, frozen tables left out) and the warmup-cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from models.fmrl import FMRLConfig, FMRLRec
from sharding.optim import build_optimizer, cosine_with_warmup

NUM_ITEMS = 15


def _model(use_id_embedding: bool) -> FMRLRec:
    torch.manual_seed(0)
    cfg = FMRLConfig(nested_sizes=[4, 8, 16], num_blocks=2, use_id_embedding=use_id_embedding)
    return FMRLRec(
        cfg,
        NUM_ITEMS,
        text_features=torch.randn(NUM_ITEMS + 1, 6),
        image_features=torch.randn(NUM_ITEMS + 1, 5),
    )


def _expected_decay(name: str) -> bool:
    """Decide by name, independently of tensor dims: which parameters are weight matrices."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("nu_log", "theta_log", "gamma_log", "bias"):
        return False
    if "norm" in name:  # chunked layer-norm gains
        return False
    assert leaf == "weight" or ".weight_parts." in name, name
    return True  # nested linear weight pieces, the projector weight, the ID table


@pytest.mark.parametrize("use_id_embedding", [False, True])
def test_parameter_groups(use_id_embedding) -> None:
    model = _model(use_id_embedding)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert len(opt.param_groups) == 2
    decay_group = next(g for g in opt.param_groups if g["weight_decay"] == 0.05)
    no_decay_group = next(g for g in opt.param_groups if g["weight_decay"] == 0.0)
    decay_ids = {id(p) for p in decay_group["params"]}
    no_decay_ids = {id(p) for p in no_decay_group["params"]}
    assert not decay_ids & no_decay_ids

    names = dict(model.named_parameters())
    assert any(k.endswith("nu_log") for k in names) and any("norm" in k for k in names)
    for name, p in names.items():
        if not p.requires_grad:
            continue
        if _expected_decay(name):
            assert id(p) in decay_ids, f"{name} should be decayed"
        else:
            assert id(p) in no_decay_ids, f"{name} should not be decayed"
    # the required members by name
    assert id(names["item_tower.projector.weight"]) in decay_ids
    for nested in ("trunk.blocks.0.lru.in_re", "trunk.blocks.1.ffn.down"):
        pieces = [k for k in names if k.startswith(f"{nested}.weight_parts.")]
        assert pieces and all(id(names[k]) in decay_ids for k in pieces), nested
    for name in (
        "item_tower.projector.bias",
        "trunk.blocks.0.lru.nu_log",
        "trunk.blocks.0.lru.theta_log",
        "trunk.blocks.1.lru.gamma_log",
        "trunk.blocks.0.lru_norm.weight",
        "trunk.blocks.1.ffn_norm.bias",
        "trunk.blocks.0.lru.out_re.bias",
    ):
        assert id(names[name]) in no_decay_ids, name
    if use_id_embedding:
        assert id(names["item_tower.id_embedding.weight"]) in decay_ids

    # frozen feature tables are in no group; every trainable parameter is in exactly one
    frozen = [model.item_tower.text.weight, model.item_tower.image.weight]
    assert all(not p.requires_grad for p in frozen)
    assert not {id(p) for p in frozen} & (decay_ids | no_decay_ids)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert decay_ids | no_decay_ids == trainable
    assert len(decay_group["params"]) + len(no_decay_group["params"]) == len(trainable)


def test_weight_decay_acts_on_the_decayed_group_only() -> None:
    model = _model(False)
    lr, wd = 0.1, 0.5
    opt = build_optimizer(model, lr=lr, weight_decay=wd)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # zero gradient: only the decoupled decay moves anything
    opt.step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[name])
        elif _expected_decay(name):
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * wd))
        else:
            assert torch.equal(p.detach(), before[name]), name


def _lr_trace(warmup: int, total: int, base: float, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([param], lr=base)
    sched = cosine_with_warmup(opt, warmup, total)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("warmup, total", [(10, 110), (100, 1000), (4, 9)])
def test_cosine_with_warmup(warmup, total) -> None:
    base = 3e-3
    lrs = _lr_trace(warmup, total, base, total + 5)
    # linear warmup: strictly increasing, equal steps, starting well below the base lr
    warm = lrs[: warmup + 1]
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert all(s > 0 for s in steps)
    assert max(steps) - min(steps) < 1e-12
    assert lrs[0] <= base / (warmup / 2)
    # the base lr right after warmup
    assert lrs[warmup] == pytest.approx(base, rel=1e-9)
    # half way through the cosine: half the base lr
    middle = warmup + (total - warmup) / 2
    if middle == int(middle):
        assert lrs[int(middle)] == pytest.approx(base / 2, rel=1e-9)
    else:  # between two steps: the two neighbours straddle base / 2 symmetrically
        assert lrs[int(middle)] > base / 2 > lrs[int(middle) + 1]
        assert lrs[int(middle)] + lrs[int(middle) + 1] == pytest.approx(base, rel=1e-9)
    # a cosine after warmup: monotone decreasing, matching 0.5 (1 + cos(pi t))
    decay = lrs[warmup : total + 1]
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    for step in (warmup + 1, (warmup + total) // 3 + 1, total - 1):
        progress = (step - warmup) / (total - warmup)
        assert lrs[step] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-9)
    # zero at total_steps, and it stays there
    assert lrs[total] == pytest.approx(0.0, abs=1e-15)
    assert all(lr == pytest.approx(0.0, abs=1e-15) for lr in lrs[total:])
