"""The LRU's diagonal recurrence: the parallel scan with its hand-written backward against the sequential
reference, padding isolation, and the ring initialisation of LRULayer."""

from __future__ import annotations

import math

import pytest
import torch

from models.fmrl.layers import LRULayer
from models.ops import lru_scan, lru_scan_reference

LENGTHS = [2, 3, 7, 8, 11, 50, 64]
DIM = 5
BATCH = 4


def _mask(pattern: str, length: int) -> torch.Tensor:
    """(BATCH, length) bool mask, True = real item, padding contiguous on the left."""
    if pattern == "none":
        pads = [0] * BATCH
    elif pattern == "left":
        pads = [0, 1, length // 2, length - 1]  # various left-padding lengths, one row with one real item
    elif pattern == "all_pad_row":
        pads = [length, 0, 1, length - 2]  # row 0 is all padding
    else:
        raise AssertionError(pattern)
    positions = torch.arange(length)
    return torch.stack([positions >= p for p in pads])


def _params(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # |lambda| = exp(-nu) in (0.37, 0.99): slow decay, so long-range terms matter in the comparison
    nu = torch.rand(DIM, generator=g, dtype=dtype) * 0.99 + 0.01
    theta = torch.rand(DIM, generator=g, dtype=dtype) * 2 * math.pi
    return nu, theta


def _sequential_by_hand(u_re, u_im, nu, theta, mask):
    """Independent check of the recurrence in Python complex numbers, one channel at a time."""
    batch, length, dim = u_re.shape
    out = torch.zeros(batch, length, dim, dtype=torch.complex128)
    for b in range(batch):
        for d in range(dim):
            lam = complex(
                math.exp(-nu[d].item()) * math.cos(theta[d].item()),
                math.exp(-nu[d].item()) * math.sin(theta[d].item()),
            )
            h = 0j
            for t in range(length):
                carry = h if t > 0 and bool(mask[b, t - 1]) else 0j
                h = complex(u_re[b, t, d].item(), u_im[b, t, d].item()) + lam * carry
                out[b, t, d] = h
    return out.real, out.imag


@pytest.mark.parametrize("pattern", ["none", "left", "all_pad_row"])
def test_reference_matches_hand_recurrence(pattern) -> None:
    length = 7
    torch.manual_seed(0)
    nu, theta = _params(0)
    u_re = torch.randn(BATCH, length, DIM, dtype=torch.float64)
    u_im = torch.randn(BATCH, length, DIM, dtype=torch.float64)
    mask = _mask(pattern, length)
    ref = lru_scan_reference(u_re, u_im, nu, theta, mask)
    hand = _sequential_by_hand(u_re, u_im, nu, theta, mask)
    for a, b in zip(ref, hand):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("pattern", ["none", "left", "all_pad_row"])
def test_parallel_scan_matches_reference_values_and_grads(length, pattern) -> None:
    torch.manual_seed(length)
    nu, theta = _params(length)
    nu.requires_grad_()
    theta.requires_grad_()
    u_re = torch.randn(BATCH, length, DIM, dtype=torch.float64, requires_grad=True)
    u_im = torch.randn(BATCH, length, DIM, dtype=torch.float64, requires_grad=True)
    mask = _mask(pattern, length)
    # upstream gradients everywhere, padded positions included
    g_re = torch.randn(BATCH, length, DIM, dtype=torch.float64)
    g_im = torch.randn(BATCH, length, DIM, dtype=torch.float64)
    inputs = (u_re, u_im, nu, theta)

    fast = lru_scan(u_re, u_im, nu, theta, mask)
    ref = lru_scan_reference(u_re, u_im, nu, theta, mask)
    for name, a, b in zip(("h_re", "h_im"), fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)

    grads_fast = torch.autograd.grad(fast, inputs, (g_re, g_im))
    grads_ref = torch.autograd.grad(ref, inputs, (g_re, g_im))
    for name, a, b in zip(("u_re", "u_im", "nu", "theta"), grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"grad {name}")


@pytest.mark.parametrize("length", [3, 11, 64])
def test_gradient_through_only_one_output(length) -> None:
    """A loss on h_re alone: backward gets no gradient for h_im (autograd materialises zeros)."""
    torch.manual_seed(5)
    nu, theta = _params(5)
    nu.requires_grad_()
    theta.requires_grad_()
    u_re = torch.randn(2, length, DIM, dtype=torch.float64, requires_grad=True)
    u_im = torch.randn(2, length, DIM, dtype=torch.float64, requires_grad=True)
    mask = _mask("left", length)[:2]
    inputs = (u_re, u_im, nu, theta)
    fast = torch.autograd.grad(lru_scan(u_re, u_im, nu, theta, mask)[0].pow(2).sum(), inputs)
    ref = torch.autograd.grad(lru_scan_reference(u_re, u_im, nu, theta, mask)[0].pow(2).sum(), inputs)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length", [7, 8, 50])
@pytest.mark.parametrize("scan", [lru_scan, lru_scan_reference], ids=["parallel", "reference"])
def test_padding_never_leaks_into_real_positions(length, scan) -> None:
    torch.manual_seed(7)
    nu, theta = _params(7)
    u_re = torch.randn(BATCH, length, DIM, dtype=torch.float64)
    u_im = torch.randn(BATCH, length, DIM, dtype=torch.float64)
    mask = _mask("left", length)
    h_re, h_im = scan(u_re, u_im, nu, theta, mask)
    pad = ~mask
    u_re2, u_im2 = u_re.clone(), u_im.clone()
    u_re2[pad] += 100.0 * torch.randn_like(u_re2[pad])
    u_im2[pad] -= 100.0 * torch.randn_like(u_im2[pad])
    h_re2, h_im2 = scan(u_re2, u_im2, nu, theta, mask)
    assert torch.equal(h_re2[mask], h_re[mask])
    assert torch.equal(h_im2[mask], h_im[mask])
    # and the real positions are a scan over the real items only: the unpadded suffix run on its own
    for b in range(BATCH):
        start = int(pad[b].sum())
        sub = scan(u_re[b : b + 1, start:], u_im[b : b + 1, start:], nu, theta, mask[b : b + 1, start:])
        torch.testing.assert_close(sub[0][0], h_re[b, start:], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sub[1][0], h_im[b, start:], rtol=1e-12, atol=1e-12)


def test_real_positions_do_carry_state() -> None:
    """Guard for the leak test: changing an earlier *real* input does change later real outputs."""
    nu, theta = _params(8)
    u_re = torch.randn(1, 6, DIM, dtype=torch.float64)
    u_im = torch.randn(1, 6, DIM, dtype=torch.float64)
    mask = torch.ones(1, 6, dtype=torch.bool)
    h = lru_scan(u_re, u_im, nu, theta, mask)
    u_re[0, 0] += 1.0
    h2 = lru_scan(u_re, u_im, nu, theta, mask)
    assert not torch.allclose(h2[0][0, -1], h[0][0, -1])


def test_mask_shape_is_checked() -> None:
    u = torch.zeros(2, 5, DIM)
    nu, theta = torch.ones(DIM), torch.ones(DIM)
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        lru_scan(u, u, nu, theta, torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("r_min, r_max", [(0.0, 0.1), (0.4, 0.9), (0.9, 0.999)])
def test_lru_layer_ring_init(r_min, r_max) -> None:
    torch.manual_seed(11)
    layer = LRULayer([8, 16, 64, 256], r_min=r_min, r_max=r_max, dropout=0.0)
    moduli = layer.eigenvalue_moduli().detach().double()
    assert moduli.shape == (256,)
    tol = 1e-5
    assert moduli.min() >= r_min - tol and moduli.max() <= r_max + tol, (moduli.min(), moduli.max())
    # spread over the annulus, not collapsed to one radius
    assert moduli.max() - moduli.min() > 0.5 * (r_max - r_min)
    # |lambda| also from the definition lambda = exp(-nu + i theta), nu = exp(nu_log)
    torch.testing.assert_close(moduli, torch.exp(-torch.exp(layer.nu_log.detach().double())))
    gamma = torch.exp(layer.gamma_log.detach().double())
    torch.testing.assert_close(gamma, torch.sqrt(1 - moduli**2), rtol=1e-5, atol=1e-6)
    theta = torch.exp(layer.theta_log.detach().double())
    assert theta.min() > 0 and theta.max() <= 2 * math.pi + 1e-5


@pytest.mark.parametrize("pattern", ["none", "left", "all_pad_row"])
@pytest.mark.parametrize("length", [1, 2, 7, 50])
def test_closed_form_for_inference_matches_reference(length, pattern) -> None:
    from models.ops import lru_scan_by_powers

    nu, theta = _params(length)
    g = torch.Generator().manual_seed(length + 1)
    u_re, u_im = (torch.randn(BATCH, length, DIM, generator=g, dtype=torch.float64) for _ in range(2))
    mask = _mask(pattern, length) if length > 1 else torch.ones(BATCH, 1, dtype=torch.bool)
    expected = lru_scan_reference(u_re, u_im, nu, theta, mask)
    for got, want in zip(lru_scan_by_powers(u_re, u_im, nu, theta, mask), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
