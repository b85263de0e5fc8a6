"""The fused Matryoshka cross-entropy against the materialised reference, its backward, the model-level
loss with padding, and its memory footprint."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from models.fmrl.loss import matryoshka_loss
from models.ops import chunk_rows_for_budget, matryoshka_cross_entropy, matryoshka_cross_entropy_reference

REPO = Path(__file__).resolve().parents[2]
P, N = 13, 29
SIZE_LISTS = [[2, 4, 8], [3, 8], [8], [1, 2, 5, 6, 16]]
CHUNK_ROWS = [1, 3, P - 1, P, 10 * P]


def _inputs(sizes, dtype, seed=0, rows=P, items=N):
    g = torch.Generator().manual_seed(seed)
    dim = sizes[-1]
    hidden = (torch.randn(rows, dim, generator=g, dtype=dtype) * 1.5).requires_grad_()
    table = torch.randn(items, dim, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, items, (rows,), generator=g)
    targets[0] = targets[1]  # a repeated target
    return hidden, table, targets


def _by_hand(hidden, items, targets, sizes):
    """Per-size mean of -log softmax(target), written with logsumexp directly (float64)."""
    per_size = []
    for m in sizes:
        logits = hidden[:, :m].double() @ items[:, :m].double().T
        per_size.append((torch.logsumexp(logits, 1) - logits[torch.arange(len(targets)), targets]).mean())
    per_size = torch.stack(per_size)
    return per_size.mean(), per_size


@pytest.mark.parametrize("sizes", SIZE_LISTS, ids=str)
def test_reference_matches_hand_formula(sizes) -> None:
    hidden, items, targets = _inputs(sizes, torch.float64)
    loss, per_size = matryoshka_cross_entropy_reference(hidden, items, targets, sizes)
    hand_loss, hand_per_size = _by_hand(hidden, items, targets, sizes)
    torch.testing.assert_close(loss, hand_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(per_size, hand_per_size, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sizes", SIZE_LISTS, ids=str)
@pytest.mark.parametrize("chunk_rows", CHUNK_ROWS)
def test_fused_matches_reference_float64(sizes, chunk_rows) -> None:
    hidden, items, targets = _inputs(sizes, torch.float64, seed=chunk_rows)
    loss, per_size = matryoshka_cross_entropy(hidden, items, targets, sizes, chunk_rows)
    ref_loss, ref_per_size = matryoshka_cross_entropy_reference(hidden, items, targets, sizes)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_size, ref_per_size, rtol=1e-12, atol=1e-12)
    assert per_size.shape == (len(sizes),) and not per_size.requires_grad
    grads = torch.autograd.grad(loss, (hidden, items))
    ref_grads = torch.autograd.grad(ref_loss, (hidden, items))
    for name, a, b in zip(("hidden", "items"), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"grad {name}")


@pytest.mark.parametrize("sizes", [[8, 16, 32], [4, 32]], ids=str)
@pytest.mark.parametrize("chunk_rows", [1, 3, 39, 40, 400])
def test_fused_matches_reference_float32(sizes, chunk_rows) -> None:
    hidden, items, targets = _inputs(sizes, torch.float32, seed=7, rows=40, items=300)
    loss, per_size = matryoshka_cross_entropy(hidden, items, targets, sizes, chunk_rows)
    # the reference in float64 is the ground truth; the fused float32 result must be within 1e-5 relative
    h64, i64 = hidden.detach().double().requires_grad_(), items.detach().double().requires_grad_()
    ref_loss, ref_per_size = matryoshka_cross_entropy_reference(h64, i64, targets, sizes)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(per_size.double(), ref_per_size, rtol=1e-5, atol=0)
    grads = torch.autograd.grad(loss, (hidden, items))
    ref_grads = torch.autograd.grad(ref_loss, (h64, i64))
    for name, a, b in zip(("hidden", "items"), grads, ref_grads):
        scale = b.abs().max()
        torch.testing.assert_close(a.double() / scale, b / scale, rtol=0, atol=1e-5, msg=f"grad {name}")


@pytest.mark.parametrize("chunk_rows", [1, 5, 100])
def test_no_grad_gives_the_same_loss(chunk_rows) -> None:
    sizes = [2, 4, 8]
    hidden, items, targets = _inputs(sizes, torch.float64)
    loss, per_size = matryoshka_cross_entropy(hidden, items, targets, sizes, chunk_rows)
    with torch.no_grad():
        loss_ng, per_size_ng = matryoshka_cross_entropy(hidden, items, targets, sizes, chunk_rows)
    assert loss.requires_grad and not loss_ng.requires_grad
    torch.testing.assert_close(loss_ng, loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(per_size_ng, per_size, rtol=1e-14, atol=0)
    # inputs that need no gradient also take the no-gradient path
    loss_det, _ = matryoshka_cross_entropy(hidden.detach(), items.detach(), targets, sizes, chunk_rows)
    torch.testing.assert_close(loss_det, loss, rtol=1e-14, atol=0)


@pytest.mark.parametrize("factor", [3.5, -0.25])
def test_backward_uses_grad_output(factor) -> None:
    sizes = [2, 4, 8]
    hidden, items, targets = _inputs(sizes, torch.float64)
    loss, _ = matryoshka_cross_entropy(hidden, items, targets, sizes, 4)
    base = torch.autograd.grad(loss, (hidden, items))
    loss, _ = matryoshka_cross_entropy(hidden, items, targets, sizes, 4)  # one backward per forward
    scaled = torch.autograd.grad(factor * loss + hidden.sum() * 0, (hidden, items))
    for a, b in zip(scaled, base):
        torch.testing.assert_close(a, factor * b, rtol=1e-13, atol=1e-15)
    # and against the reference under the same scaling
    ref_loss, _ = matryoshka_cross_entropy_reference(hidden, items, targets, sizes)
    for a, b in zip(scaled, torch.autograd.grad(factor * ref_loss, (hidden, items))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["hidden", "items"])
def test_gradient_to_one_input_only(which) -> None:
    sizes = [3, 8]
    hidden, items, targets = _inputs(sizes, torch.float64)
    hidden.requires_grad_(which == "hidden")
    items.requires_grad_(which == "items")
    x = hidden if which == "hidden" else items
    (g,) = torch.autograd.grad(matryoshka_cross_entropy(hidden, items, targets, sizes, 2)[0], (x,))
    (g_ref,) = torch.autograd.grad(matryoshka_cross_entropy_reference(hidden, items, targets, sizes)[0], (x,))
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_width_mismatch_raises() -> None:
    hidden, items, targets = _inputs([4, 8], torch.float64)
    with pytest.raises(ValueError, match="width mismatch"):
        matryoshka_cross_entropy(hidden, items, targets, [4, 16], 4)
    with pytest.raises(ValueError, match="width mismatch"):
        matryoshka_cross_entropy(hidden, items[:, :4], targets, [4, 8], 4)


@pytest.mark.parametrize(
    "num_items, num_sizes, budget", [(200_000, 3, 16 * 2**20), (1000, 8, 2**20), (10, 2, 80)]
)
def test_chunk_rows_for_budget_fits(num_items, num_sizes, budget) -> None:
    rows = chunk_rows_for_budget(num_items, num_sizes, budget)
    assert rows >= 1
    assert rows * num_sizes * num_items * 4 <= budget
    assert (rows + 1) * num_sizes * num_items * 4 > budget  # and it uses the budget
    assert chunk_rows_for_budget(10**9, 8, 1) == 1  # never zero


@pytest.mark.parametrize("sizes", [[2, 4, 8], [8]], ids=str)
def test_model_loss_ignores_padding_labels(sizes) -> None:
    torch.manual_seed(0)
    batch, length, num_items = 3, 6, 17
    hidden = torch.randn(batch, length, sizes[-1], dtype=torch.float64, requires_grad=True)
    items = torch.randn(num_items + 1, sizes[-1], dtype=torch.float64, requires_grad=True)
    labels = torch.randint(1, num_items + 1, (batch, length))
    labels[0, :2] = 0  # left padding
    labels[1, :] = 0  # a row without any target
    labels[2, 3] = 0  # and a hole
    labels[2, 4] = num_items  # the last item is a valid target
    labels[2, 5] = 1  # so is the first
    loss, per_size = matryoshka_loss(hidden, items, labels, sizes, chunk_mb=1)

    valid = labels > 0
    ref_loss, ref_per_size = matryoshka_cross_entropy_reference(
        hidden[valid], items[1:], labels[valid] - 1, sizes
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_size, ref_per_size, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, (hidden, items))
    ref_grads = torch.autograd.grad(ref_loss, (hidden, items))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # padded positions get no gradient, and the pad row of the table is not a candidate
    assert torch.all(grads[0][~valid] == 0)
    assert torch.all(grads[1][0] == 0)
    # changing the hidden states at padded positions changes nothing
    hidden2 = hidden.detach().clone()
    hidden2[~valid] = 1e3
    loss2, _ = matryoshka_loss(hidden2, items.detach(), labels, sizes, chunk_mb=1)
    torch.testing.assert_close(loss2, loss.detach(), rtol=1e-14, atol=0)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import torch
    torch.set_num_threads(1)
    from models.ops import chunk_rows_for_budget, matryoshka_cross_entropy
    P, N, D, sizes = {P}, {N}, 32, [8, 16, 32]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(P, D, generator=g).requires_grad_()
    items = torch.randn(N, D, generator=g).requires_grad_()
    targets = torch.randint(0, N, (P,), generator=g)
    rows = chunk_rows_for_budget(N, len(sizes), 16 * 2**20)
    loss, per_size = matryoshka_cross_entropy(hidden, items, targets, sizes, rows)
    loss.backward()
    assert torch.isfinite(loss) and hidden.grad.abs().sum() > 0 and items.grad.abs().sum() > 0
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
    print("ROWS", rows)
    print("HWM_KB", int(hwm.split()[1]))
    """
)


def test_fused_loss_memory_stays_far_below_the_logits() -> None:
    # N is cut from 200_000 (9.8 GB of logits) to keep this test near 10 s on one thread
    rows, items = 4096, 84_000
    logits_bytes = 3 * rows * items * 4
    assert logits_bytes > 4e9  # the test is only meaningful if materialising would need > 4 GB
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT.format(P=rows, N=items)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    out = dict(line.split() for line in result.stdout.splitlines() if line.split()[0] in ("ROWS", "HWM_KB"))
    assert int(out["ROWS"]) * 3 * items * 4 <= 16 * 2**20
    peak = int(out["HWM_KB"]) * 1024
    assert peak < 1.5 * 2**30, (
        f"peak RSS {peak / 2**30:.2f} GiB with grads; the materialised logits alone would be "
        f"3 x {rows} x {items} x 4 B = {logits_bytes / 1e9:.1f} GB"
    )
    assert elapsed < 60, f"memory test took {elapsed:.1f} s"


def test_second_backward_is_a_clear_error() -> None:
    sizes = [2, 4, 8]
    hidden, items, targets = _inputs(sizes, torch.float64)
    loss, _ = matryoshka_cross_entropy(hidden, items, targets, sizes, 4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward pass"):
        loss.backward()
