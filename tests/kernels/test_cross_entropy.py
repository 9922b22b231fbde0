"""Cross-entropy over logits: Triton (interpreter, fp32) and torch paths against the reference."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from megatron_syne.kernels import cross_entropy
from megatron_syne.kernels.cross_entropy import (
    cross_entropy_reference,
    scale_rows,
    vocab_parallel_cross_entropy,
)

BATCH, SEQ = 3, 37  # 111 tokens: odd on purpose


def _inputs(vocab, ignore_every=7, with_mask=True, dtype=torch.float32):
    logits = (torch.randn(BATCH, SEQ, vocab) * 3.0).to(dtype)
    target = torch.randint(0, vocab, (BATCH, SEQ))
    target.view(-1)[::ignore_every] = -100
    mask = (torch.rand(BATCH, SEQ) > 0.25).float() if with_mask else None
    return logits, target, mask


def _run(fn, logits, grads, **kw):
    x = logits.clone().requires_grad_()
    out = fn(x, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    total = sum((o * g).sum() for o, g in zip(outs, grads) if g is not None)
    total.backward()
    return [o.detach() for o in outs], x.grad


def _check(backend, vocab, reduction, label_smoothing, z_loss_weight, with_mask):
    logits, target, mask = _inputs(vocab, with_mask=with_mask)
    kw = dict(
        target=target,
        label_smoothing=label_smoothing,
        z_loss_weight=z_loss_weight,
        reduction=reduction,
        loss_mask=mask,
    )
    shape = target.shape if reduction == "none" else ()
    grads = [torch.randn(shape)]
    if z_loss_weight > 0:
        grads.append(torch.randn(shape))
    out, grad = _run(
        lambda x, **k: vocab_parallel_cross_entropy(x, backend=backend, **k), logits, grads, **kw
    )
    ref, ref_grad = _run(lambda x, **k: cross_entropy_reference(x, **k), logits, grads, **kw)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32 and o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


GRID = list(itertools.product(["none", "sum", "mean"], [0.0, 0.1], [0.0, 1e-2], [False, True]))
# The interpreter is ~100x slower than torch, so the Triton kernels get a pairwise-covering subset
# of GRID (every pair of option values appears); the options only change per-row coefficients
# computed in Python shared by both backends, and the torch path runs the full GRID.
PAIRWISE = [
    ("none", 0.0, 0.0, False),
    ("none", 0.1, 1e-2, True),
    ("sum", 0.0, 1e-2, True),
    ("sum", 0.1, 0.0, False),
    ("mean", 0.0, 1e-2, False),
    ("mean", 0.1, 0.0, True),
    ("mean", 0.1, 1e-2, True),
]


def test_pairwise_subset_covers_every_option_pair():
    for i, j in itertools.combinations(range(4), 2):
        wanted = {(g[i], g[j]) for g in GRID}
        assert wanted == {(p[i], p[j]) for p in PAIRWISE}, (i, j)


@pytest.mark.parametrize("reduction,label_smoothing,z_loss_weight,with_mask", PAIRWISE)
def test_triton_matches_reference_all_options(
    small_block, reduction, label_smoothing, z_loss_weight, with_mask
):
    # 1000 = 3 full blocks of 256 + a ragged block of 232.
    _check("triton", 1000, reduction, label_smoothing, z_loss_weight, with_mask)


@pytest.mark.parametrize("reduction,label_smoothing,z_loss_weight,with_mask", GRID)
def test_torch_path_matches_reference_all_options(
    reduction, label_smoothing, z_loss_weight, with_mask
):
    _check("torch", 1000, reduction, label_smoothing, z_loss_weight, with_mask)


@pytest.mark.parametrize("vocab", [1024, 777])
def test_triton_single_block_vocab_sizes(vocab):
    # Default block = next power of two >= vocab: one (possibly ragged) block per row.
    _check("triton", vocab, "mean", 0.1, 1e-2, True)


def test_z_loss_gradient_without_loss_gradient():
    # Only z_loss reaches the graph: the backward must rebuild the softmax from the stored grad.
    logits, target, mask = _inputs(1000)
    x = logits.clone().requires_grad_()
    _, z = vocab_parallel_cross_entropy(
        x, target, z_loss_weight=0.1, loss_mask=mask, backend="triton"
    )
    z.sum().backward()
    y = logits.clone().requires_grad_()
    _, z_ref = cross_entropy_reference(y, target, z_loss_weight=0.1, loss_mask=mask)
    z_ref.sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inplace_backward_overwrites_logits_and_matches(backend):
    logits, target, mask = _inputs(1000)
    ref_grad = _run(
        lambda x: cross_entropy_reference(x, target, reduction="mean", loss_mask=mask),
        logits,
        [torch.ones(())],
    )[1]
    x = logits.clone().requires_grad_()
    buf = x.detach()
    loss = vocab_parallel_cross_entropy(
        x * 1.0, target, reduction="mean", loss_mask=mask, inplace_backward=True, backend=backend
    )
    loss.backward()
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(buf, logits)  # the leaf is untouched; only the product's buffer was reused


def test_reference_matches_torch_and_megatron_smoothing_formula():
    logits, target, _ = _inputs(1000, with_mask=False)
    flat, tflat = logits.view(-1, 1000), target.view(-1)
    ref = cross_entropy_reference(flat, tflat, reduction="mean")
    torch.testing.assert_close(ref, F.cross_entropy(flat, tflat, ignore_index=-100))
    # Megatron's smoothing with alpha equals torch's with alpha * K / (K - 1) (same NeMo formula).
    alpha, k = 0.1, 1000
    valid = tflat != -100
    ref_s = cross_entropy_reference(flat[valid], tflat[valid], label_smoothing=alpha)
    torch_s = F.cross_entropy(
        flat[valid], tflat[valid], label_smoothing=alpha * k / (k - 1), reduction="none"
    )
    torch.testing.assert_close(ref_s, torch_s)


def test_all_tokens_masked_mean_is_zero_with_zero_grad():
    logits, target, _ = _inputs(1000)
    target.fill_(-100)
    x = logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, target, reduction="mean", backend="triton")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0


def test_bf16_logits_accumulate_in_fp32():
    logits, target, mask = _inputs(1000, dtype=torch.bfloat16)
    loss = vocab_parallel_cross_entropy(logits, target, loss_mask=mask, backend="torch")
    ref = cross_entropy_reference(logits.float(), target, loss_mask=mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    x = logits.clone().requires_grad_()
    vocab_parallel_cross_entropy(x, target, reduction="sum", backend="triton").backward()
    assert x.grad.dtype == torch.bfloat16


def test_no_grad_forward_only_matches():
    logits, target, mask = _inputs(1000)
    with torch.no_grad():
        loss = vocab_parallel_cross_entropy(logits, target, loss_mask=mask, backend="triton")
    torch.testing.assert_close(
        loss, cross_entropy_reference(logits, target, loss_mask=mask), rtol=1e-5, atol=1e-5
    )


def test_bad_arguments_are_rejected():
    logits, target, _ = _inputs(1000)
    with pytest.raises(ValueError, match="target"):
        vocab_parallel_cross_entropy(logits, target[:, :-1])
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(logits, target, label_smoothing=1.0)
    with pytest.raises(TypeError, match="integer"):
        vocab_parallel_cross_entropy(logits, target.float())
    target[1, 5] = 1000
    with pytest.raises(ValueError, match=r"1 target ids lie outside the vocabulary \[0, 1000\)"):
        vocab_parallel_cross_entropy(logits, target)


def _assert_scaled(got, expected, backend):
    """Exact, except that Triton's interpreter truncates fp32 -> bf16 (the GPU and torch round
    to nearest even): there within one bf16 unit in the last place."""
    if backend == "triton" and got.dtype == torch.bfloat16:
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(got, expected), backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_rows_matches_torch_and_skips_rows_scaled_by_one(monkeypatch, dtype):
    # Three blocks per row with a ragged last one.
    monkeypatch.setattr(cross_entropy, "MAX_BLOCK_SIZE", 128)
    grad = (torch.randn(6, 300) * 3).to(dtype)
    scale = torch.tensor([1.0, 0.3, -2.7, 1.0, 1.3e-3, 0.0])
    expected = (grad.float() * scale[:, None]).to(dtype)
    # torch's own mul_ with an fp32 column computes in fp32 and rounds once: the same values.
    assert torch.equal(grad.clone().mul_(scale[:, None]), expected)
    for backend in ("triton", "torch"):
        got = grad.clone()
        scale_rows(got, scale, backend)
        _assert_scaled(got, expected, backend)
        assert torch.equal(got[[0, 3]], grad[[0, 3]])  # rows scaled by exactly 1: untouched
    # A 0-dim scale applies to every row (the incoming gradient of a "mean" or "sum" loss).
    for value in (1.0, 0.37):
        for backend in ("triton", "torch"):
            got = grad.clone()
            scale_rows(got, torch.tensor(value), backend)
            _assert_scaled(got, (grad.float() * value).to(dtype), backend)
    # A row-strided view (stride(0) > n_cols) is scaled in place without touching the padding.
    padded = torch.zeros(4, 320, dtype=dtype)
    view = padded[:, :300]
    view.copy_(grad[:4])
    scale_rows(view, scale[:4].contiguous(), "triton")
    _assert_scaled(view, expected[:4], "triton")
    assert not padded[:, 300:].any()
