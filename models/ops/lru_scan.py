"""The linear recurrent unit's diagonal recurrence, h_t = lambda * h_{t-1} + u_t, over left-padded batches.

lambda = exp(-nu + i*theta) is a complex diagonal (one eigenvalue per channel). Complex numbers are carried
as separate real and imaginary float tensors, which keeps every op a plain real kernel.

Padding is on the left and contiguous, marked by ``mask`` (True = real item). A padded position never
passes its state on, so real positions see only real inputs:

    h_t = u_t + lambda * h_{t-1} * mask_{t-1}

``lru_scan`` evaluates this in log2(L) parallel levels (LRURec's Algorithm 1): at level i, blocks of
length 2^i add lambda^k times the last state of their first half to the k-th element of their second
half. Its backward pass is hand-written: the gradient of a linear recurrence is the same recurrence run
backwards in time with conj(lambda), so only the outputs h are kept for backward, not the log2(L) levels
of intermediates that autograd would store. ``lru_scan_reference`` is the sequential loop above, kept
for tests (its gradients come from autograd).

Shapes: B batch, L length, D channels. u_re, u_im: (B, L, D); nu, theta: (D,) positive; mask: (B, L).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.ops.precision import at_least_float32


def lambda_powers(nu: torch.Tensor, theta: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of lambda^k for k = 1..count, each (count, D)."""
    k = torch.arange(1, count + 1, dtype=nu.dtype, device=nu.device).unsqueeze(1)  # (count, 1)
    magnitude = torch.exp(-k * nu)  # (count, D)
    angle = k * theta
    return magnitude * torch.cos(angle), magnitude * torch.sin(angle)


def _parallel_scan(
    u_re: torch.Tensor, u_im: torch.Tensor, nu: torch.Tensor, theta: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = u_t + lambda * gate_{t-1} * h_{t-1}, exact when the zeros of ``gate`` (B, L) are a prefix.

    Runs outside autograd (inside ``_LRUScan``), so the levels update a fresh buffer in place.
    """
    batch, length, dim = u_re.shape
    levels = max(1, math.ceil(math.log2(length)))
    padded = 2**levels
    # left-pad to a power of two with masked zeros; this copy is also the buffer the levels update
    h_re = u_re.new_zeros(batch, padded, dim)
    h_im = u_im.new_zeros(batch, padded, dim)
    h_re[:, padded - length :] = u_re
    h_im[:, padded - length :] = u_im
    gate = F.pad(gate, (padded - length, 0))
    pow_re, pow_im = lambda_powers(nu, theta, padded // 2)  # (padded/2, D)

    for level in range(levels):
        half = 2**level
        blocks = batch * padded // (2 * half)
        pairs_re = h_re.view(blocks, 2, half, dim)
        pairs_im = h_im.view(blocks, 2, half, dim)
        # the last state of each first half, zeroed where that position is padding: (blocks, 1, D)
        carry_gate = gate.reshape(blocks, 2 * half)[:, half - 1, None, None]
        carry_re = pairs_re[:, 0, half - 1 : half] * carry_gate
        carry_im = pairs_im[:, 0, half - 1 : half] * carry_gate
        p_re, p_im = pow_re[:half], pow_im[:half]  # (half, D): lambda^1 .. lambda^half
        second_re, second_im = pairs_re[:, 1], pairs_im[:, 1]  # (blocks, half, D) views
        second_re.addcmul_(p_re, carry_re).addcmul_(p_im, carry_im, value=-1.0)
        second_im.addcmul_(p_re, carry_im).addcmul_(p_im, carry_re)

    return h_re[:, padded - length :], h_im[:, padded - length :]


def lru_scan_reference(
    u_re: torch.Tensor, u_im: torch.Tensor, nu: torch.Tensor, theta: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential reference in complex arithmetic. Returns (h_re, h_im), each (B, L, D)."""
    lam = torch.polar(torch.exp(-nu), theta)  # (D,) complex
    u = torch.complex(u_re, u_im)
    gate = mask.to(u_re.dtype).unsqueeze(-1)  # (B, L, 1)
    states = [u[:, 0]]
    for t in range(1, u.shape[1]):
        states.append(u[:, t] + lam * states[-1] * gate[:, t - 1])
    h = torch.stack(states, dim=1)
    return h.real, h.imag


class _LRUScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u_re, u_im, nu, theta, mask):  # noqa: D102
        gate = mask.to(u_re.dtype)
        h_re, h_im = _parallel_scan(u_re, u_im, nu, theta, gate)
        # contiguous copies free the padded buffers, and the next GEMM would copy a padded view anyway
        h_re, h_im = h_re.contiguous(), h_im.contiguous()
        ctx.save_for_backward(h_re, h_im, nu, theta, gate)
        return h_re, h_im

    @staticmethod
    def backward(ctx, grad_h_re, grad_h_im):  # noqa: D102
        h_re, h_im, nu, theta, gate = ctx.saved_tensors
        # G_t = dL/dh_t + conj(lambda) * gate_t * G_{t+1}: the forward recurrence on the time-reversed
        # sequence, with conj(lambda) = exp(-nu - i theta). Reversed, the carry into position s comes from
        # s-1 and is gated by gate at s itself, hence the gate shifted by one.
        flipped_gate = gate.flip(1)
        reverse_gate = torch.cat([flipped_gate[:, 1:], torch.zeros_like(flipped_gate[:, :1])], dim=1)
        g_re, g_im = _parallel_scan(grad_h_re.flip(1), grad_h_im.flip(1), nu, -theta, reverse_gate)
        # the zeros of reverse_gate are a suffix, not a prefix, so the scan is exact at real positions only;
        # at a padded position nothing is carried in (gate_t = 0), so G_t is just dL/dh_t
        real = gate.unsqueeze(-1).bool()  # (B, L, 1)
        g_re = torch.where(real, g_re.flip(1), grad_h_re)  # (B, L, D)
        g_im = torch.where(real, g_im.flip(1), grad_h_im)

        # dL/dlambda from h_t = u_t + lambda * gate_{t-1} * h_{t-1}, with lambda = c + i d
        carried = gate[:, :-1].unsqueeze(-1)  # (B, L-1, 1)
        prev_re, prev_im = h_re[:, :-1] * carried, h_im[:, :-1] * carried
        next_re, next_im = g_re[:, 1:], g_im[:, 1:]
        grad_c = (next_re * prev_re + next_im * prev_im).sum(dim=(0, 1))  # (D,)
        grad_d = (next_im * prev_re - next_re * prev_im).sum(dim=(0, 1))
        magnitude = torch.exp(-nu)
        c, d = magnitude * torch.cos(theta), magnitude * torch.sin(theta)
        grad_nu = -(c * grad_c + d * grad_d)  # dc/dnu = -c, dd/dnu = -d
        grad_theta = -d * grad_c + c * grad_d  # dc/dtheta = -d, dd/dtheta = c
        return g_re, g_im, grad_nu, grad_theta, None


def lru_scan(
    u_re: torch.Tensor, u_im: torch.Tensor, nu: torch.Tensor, theta: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel scan in ceil(log2 L) levels with a hand-written backward. Returns (h_re, h_im), (B, L, D)."""
    if mask.shape != u_re.shape[:2]:
        raise ValueError(f"mask must be (B, L) = {tuple(u_re.shape[:2])}, got {tuple(mask.shape)}")
    # the recurrence is complex, which has no bfloat16: float32 also under autocast
    with torch.autocast(u_re.device.type, enabled=False):
        return _LRUScan.apply(at_least_float32(u_re), at_least_float32(u_im), nu, theta, mask)


def lru_scan_by_powers(
    u_re: torch.Tensor, u_im: torch.Tensor, nu: torch.Tensor, theta: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence in closed form for inference programs: h_t = u_t + sum_{s<t} lambda^(t-s) mask_s u_s.

    Exact for left padding (a padded s precedes every real position, so a real s carries into every later
    t). One (L, L, D) table of powers and one batched product, no Python loop over L and no in-place
    update: ``torch.export`` and the ONNX exporter trace it with a dynamic batch size and history
    length. It costs O(L^2 D) per sequence, fine for serving histories (L up to a few hundred), not for
    training (``lru_scan``). Returns (h_re, h_im), each (B, L, D).
    """
    length = u_re.shape[1]
    steps = torch.arange(length, device=u_re.device)
    lag = (steps[:, None] - steps[None, :]).to(nu.dtype)  # (L, L): t - s
    earlier = (lag > 0).to(nu.dtype)[..., None]  # (L, L, 1): s < t
    lag = lag.clamp(min=0)[..., None]  # (L, L, 1)
    magnitude = torch.exp(-lag * nu) * earlier  # (L, L, D)
    k_re, k_im = magnitude * torch.cos(lag * theta), magnitude * torch.sin(lag * theta)
    gate = mask.to(u_re.dtype)[..., None]  # (B, L, 1)
    v_re, v_im = u_re * gate, u_im * gate
    h_re = u_re + torch.einsum("tsd,bsd->btd", k_re, v_re) - torch.einsum("tsd,bsd->btd", k_im, v_im)
    h_im = u_im + torch.einsum("tsd,bsd->btd", k_re, v_im) + torch.einsum("tsd,bsd->btd", k_im, v_re)
    return h_re, h_im
