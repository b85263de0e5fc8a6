"""Nested linear maps: the grouped fast path against the per-block reference, the zero upper triangle, the
nesting property, parameter counts and the GEMM grouping."""

from __future__ import annotations

import pytest
import torch

from models.fmrl.layers import NestedLinear
from models.ops import (
    gemm_groups,
    nested_linear,
    nested_linear_reference,
    nested_mask,
    nested_param_count,
    split_nested_weight,
)

SIZE_LISTS = [
    [4, 8, 16, 32],
    [8, 16, 32, 64, 128],
    [16],
    [2, 4, 8, 64],
    [8, 16, 32, 64, 128, 256, 512, 1024],
]


def _hand_mask(sizes: list[int]) -> torch.Tensor:
    """Block lower-triangular mask from the definition: row r (in the block ending at m_i) reads columns < m_i."""
    dim = sizes[-1]
    block_end = torch.tensor([next(m for m in sizes if r < m) for r in range(dim)])  # (D,)
    return (torch.arange(dim)[None, :] < block_end[:, None]).to(torch.float64)


def _random_nested_weight(sizes: list[int], dtype=torch.float64, dense: bool = False) -> torch.Tensor:
    """Random weight; nonzero in the upper triangle too when ``dense`` (the maps must never read it)."""
    dim = sizes[-1]
    w = torch.randn(dim, dim, dtype=dtype)
    return w if dense else w * _hand_mask(sizes).to(dtype)


def _fast(x, weight, bias, sizes):
    """The fast path on a dense weight: split into its GEMM-group pieces (views, so gradients reach it)."""
    groups = gemm_groups(sizes)
    mask = nested_mask(sizes, groups[0].in_end)[: groups[0].row_end].to(x.dtype)
    return nested_linear(x, split_nested_weight(weight, groups), bias, mask, groups)


@pytest.mark.parametrize("sizes", SIZE_LISTS[:4] + [[8, 16, 32, 64]], ids=str)
def test_nested_mask_matches_hand_mask(sizes: list[int]) -> None:
    assert torch.equal(nested_mask(sizes).double(), _hand_mask(sizes))


@pytest.mark.parametrize("sizes", SIZE_LISTS, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("leading", [(5,), (2, 3)], ids=["2d", "3d"])
def test_fast_matches_reference_values_and_grads(sizes, with_bias, leading) -> None:
    torch.manual_seed(0)
    dim = sizes[-1]
    if dim >= 512:
        leading = tuple(1 if i else 2 for i, _ in enumerate(leading))  # small batch for the widest map
    x = torch.randn(*leading, dim, dtype=torch.float64, requires_grad=True)
    # a dense weight: entries above the block triangle must be ignored by both implementations
    weight = _random_nested_weight(sizes, dense=True).requires_grad_()
    bias = torch.randn(dim, dtype=torch.float64, requires_grad=True) if with_bias else None
    grad_out = torch.randn(*leading, dim, dtype=torch.float64)

    inputs = [x, weight] + ([bias] if with_bias else [])
    y_fast = _fast(x, weight, bias, sizes)
    grads_fast = torch.autograd.grad(y_fast, inputs, grad_out)
    y_ref = nested_linear_reference(x, weight, bias, sizes)
    grads_ref = torch.autograd.grad(y_ref, inputs, grad_out)

    assert y_fast.shape == (*leading, dim)
    # the reference itself against a dense product with the hand-made mask
    expected = x @ (weight * _hand_mask(sizes)).T + (bias if with_bias else 0.0)
    torch.testing.assert_close(y_ref, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-12, atol=1e-10)
    for name, g_fast, g_ref in zip(["x", "weight", "bias"], grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-12, atol=1e-10, msg=f"grad {name}")


@pytest.mark.parametrize("sizes", SIZE_LISTS[:4], ids=str)
def test_weight_gradient_is_exactly_zero_above_the_block_triangle(sizes) -> None:
    torch.manual_seed(1)
    dim = sizes[-1]
    x = torch.randn(7, dim, dtype=torch.float64)
    weight = _random_nested_weight(sizes, dense=True).requires_grad_()
    bias = torch.randn(dim, dtype=torch.float64, requires_grad=True)
    _fast(x, weight, bias, sizes).pow(2).sum().backward()
    upper = _hand_mask(sizes) == 0
    assert upper.any() or len(sizes) == 1
    assert torch.all(weight.grad[upper] == 0)
    assert torch.all(weight.grad[~upper] != 0)  # and the allowed entries do get a gradient


@pytest.mark.parametrize("sizes", [[4, 8, 16, 32], [2, 4, 8, 64], [8, 16, 32, 64, 128]], ids=str)
def test_masked_weights_stay_zero_under_adamw(sizes) -> None:
    torch.manual_seed(2)
    layer = NestedLinear(sizes)
    upper = nested_mask(sizes) == 0
    assert torch.all(layer.weight[upper] == 0)  # initialisation
    assert torch.all(layer.weight[~upper] != 0)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    before = layer.weight.detach().clone()
    for _ in range(4):
        opt.zero_grad()
        x = torch.randn(3, 5, sizes[-1])
        layer(x).pow(2).mean().backward()
        opt.step()
    assert torch.all(layer.weight[upper] == 0)
    assert not torch.equal(layer.weight[~upper], before[~upper])  # the optimiser did move the rest


@pytest.mark.parametrize("sizes", SIZE_LISTS[:4], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_output_prefix_depends_only_on_input_prefix(sizes, with_bias) -> None:
    torch.manual_seed(3)
    dim = sizes[-1]
    weight = _random_nested_weight(sizes, dense=True)
    bias = torch.randn(dim, dtype=torch.float64) if with_bias else None
    x = torch.randn(4, 6, dim, dtype=torch.float64)
    y = _fast(x, weight, bias, sizes)
    for m in sizes[:-1]:
        x2 = x.clone()
        x2[..., m:] += torch.randn_like(x2[..., m:]) * 10
        y2 = _fast(x2, weight, bias, sizes)
        assert torch.equal(y2[..., :m], y[..., :m])
        assert not torch.allclose(y2[..., m:], y[..., m:])  # the perturbation is visible beyond m


@pytest.mark.parametrize("sizes", SIZE_LISTS, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_nested_param_count(sizes, with_bias) -> None:
    ones = int(nested_mask(sizes).sum().item())
    assert nested_param_count(sizes, with_bias) == ones + (sizes[-1] if with_bias else 0)


@pytest.mark.parametrize("sizes", SIZE_LISTS + [[1, 2, 3], [3, 5, 6, 30, 31, 100]], ids=str)
def test_gemm_groups_cover_every_row_once_and_read_enough(sizes) -> None:
    dim = sizes[-1]
    groups = gemm_groups(sizes)
    covered = torch.zeros(dim, dtype=torch.int64)
    for g in groups:
        covered[g.row_start : g.row_end] += 1
        # each row must read at least its own block's prefix, and never past D
        for r in range(g.row_start, g.row_end):
            block_end = next(m for m in sizes if r < m)
            assert g.in_end >= block_end
            assert g.in_end <= dim
            if not g.masked:
                assert g.in_end == block_end  # unmasked groups must not read the upper triangle
    assert torch.all(covered == 1)
    assert [g.row_start for g in groups] == sorted(g.row_start for g in groups)


def test_gemm_groups_for_paper_sizes() -> None:
    sizes = [8, 16, 32, 64, 128, 256, 512, 1024]
    groups = gemm_groups(sizes)
    assert len(groups) == 3
    flops = sum((g.row_end - g.row_start) * g.in_end for g in groups)
    assert flops <= 0.7 * 1024**2, f"{flops / 1024**2:.3f} of the dense FLOPs"
