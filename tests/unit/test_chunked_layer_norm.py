"""Chunk-wise layer norm: fast matmul path with hand-written backward against per-block F.layer_norm."""

from __future__ import annotations

import pytest
import torch

from models.fmrl.layers import ChunkedLayerNorm
from models.ops import block_averager, chunked_layer_norm, chunked_layer_norm_reference

SIZE_LISTS = [[4, 8, 16, 32], [2, 3, 7, 20], [16], [8, 16, 32, 64, 128]]
SHAPES = [(6,), (3, 5), (2, 3, 4)]


def _averager64(sizes):
    """block_averager's matrices in exact float64. (block_averager builds them in float32, so casting its
    1/3, 1/7, ... entries to float64 would carry float32 rounding into a float64 comparison.)"""
    _, broadcast = block_averager(sizes)
    broadcast = broadcast.double()  # (K, D) 0/1: exact in any dtype
    widths = torch.tensor([b - a for a, b in _blocks(sizes)], dtype=torch.float64)
    return (broadcast / widths[:, None]).T.contiguous(), broadcast


def _fast(x, weight, bias, sizes, eps=1e-5):
    if x.dtype == torch.float64:
        average, broadcast = _averager64(sizes)
    else:
        average, broadcast = block_averager(sizes)
    return chunked_layer_norm(x, weight, bias, average, broadcast, eps)


def _blocks(sizes):
    starts = [0, *sizes[:-1]]
    return list(zip(starts, sizes))


@pytest.mark.parametrize("sizes", SIZE_LISTS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fast_matches_reference_values_and_grads(sizes, shape) -> None:
    torch.manual_seed(0)
    dim = sizes[-1]
    x = (torch.randn(*shape, dim, dtype=torch.float64) * 3 + 1).requires_grad_()
    weight = torch.randn(dim, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(dim, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(*shape, dim, dtype=torch.float64)
    inputs = (x, weight, bias)
    y_fast = _fast(x, weight, bias, sizes)
    y_ref = chunked_layer_norm_reference(x, weight, bias, sizes)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(
        ("x", "weight", "bias"),
        torch.autograd.grad(y_fast, inputs, grad_out),
        torch.autograd.grad(y_ref, inputs, grad_out),
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"grad {name}")


def test_reference_normalises_each_block_on_its_own() -> None:
    # by hand: block statistics, biased variance, eps inside the square root
    sizes = [2, 5]
    x = torch.tensor([[1.0, 3.0, -1.0, 0.0, 4.0]], dtype=torch.float64)
    w, b = torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    eps = 1e-5
    first = (x[0, :2] - 2.0) / (1.0 + eps) ** 0.5
    m = 1.0
    var = ((-2.0) ** 2 + (-1.0) ** 2 + 3.0**2) / 3
    second = (x[0, 2:] - m) / (var + eps) ** 0.5
    expected = torch.cat([first, second])[None]
    torch.testing.assert_close(chunked_layer_norm_reference(x, w, b, sizes, eps), expected)
    torch.testing.assert_close(_fast(x, w, b, sizes, eps), expected)


@pytest.mark.parametrize("sizes", SIZE_LISTS, ids=str)
def test_block_averager_matches_definition(sizes) -> None:
    average, broadcast = block_averager(sizes)
    dim, k = sizes[-1], len(sizes)
    assert average.shape == (dim, k) and broadcast.shape == (k, dim)
    for i, (a, b) in enumerate(_blocks(sizes)):
        expected = torch.zeros(dim)
        expected[a:b] = 1.0
        assert torch.equal(broadcast[i], expected)
        torch.testing.assert_close(average[:, i], expected / (b - a), rtol=1e-7, atol=0)


@pytest.mark.parametrize("sizes", SIZE_LISTS, ids=str)
def test_each_block_has_zero_mean_unit_variance(sizes) -> None:
    torch.manual_seed(1)
    dim = sizes[-1]
    eps = 1e-5
    norm = ChunkedLayerNorm(sizes, eps=eps)
    assert torch.equal(norm.weight, torch.ones(dim)) and torch.equal(norm.bias, torch.zeros(dim))
    x = torch.randn(4, 7, dim) * 5 + 2
    y = norm(x).double()
    for a, b in _blocks(sizes):
        block = y[..., a:b]
        torch.testing.assert_close(
            block.mean(-1), torch.zeros(block.shape[:-1], dtype=torch.float64), atol=1e-5, rtol=0
        )
        # eps in the denominator: the variance is var_x / (var_x + eps), ~1 except for tiny blocks
        var_x = x[..., a:b].double().var(-1, unbiased=False)
        expected = var_x / (var_x + eps)
        if b - a > 2:
            assert torch.all(expected > 0.999)
        torch.testing.assert_close(block.var(-1, unbiased=False), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sizes", SIZE_LISTS[:2] + SIZE_LISTS[3:], ids=str)
def test_output_prefix_depends_only_on_input_prefix(sizes) -> None:
    torch.manual_seed(2)
    dim = sizes[-1]
    weight = torch.randn(dim, dtype=torch.float64)
    bias = torch.randn(dim, dtype=torch.float64)
    x = torch.randn(3, 4, dim, dtype=torch.float64)
    y = _fast(x, weight, bias, sizes)
    for m in sizes[:-1]:
        x2 = x.clone()
        x2[..., m:] = torch.randn_like(x2[..., m:]) * 7 - 3
        y2 = _fast(x2, weight, bias, sizes)
        assert torch.equal(y2[..., :m], y[..., :m])
        assert not torch.allclose(y2[..., m:], y[..., m:])


def test_module_float32_matches_reference() -> None:
    torch.manual_seed(3)
    sizes = [8, 16, 32, 64]
    norm = ChunkedLayerNorm(sizes)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(5, 9, 64)
    torch.testing.assert_close(
        norm(x), chunked_layer_norm_reference(x, norm.weight, norm.bias, sizes), rtol=1e-5, atol=1e-5
    )
