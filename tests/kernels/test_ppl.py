"""PPL scoring: per-token NLL from hidden states, per-sequence and per-document means."""

import math

import pytest
import torch

from megatron_syne.kernels.ppl import (
    document_mean_nll,
    sequence_mean_nll,
    token_nll_from_hidden,
    token_nll_reference,
)


def _inputs(n_tokens=111, hidden=24, vocab=1000):
    return (
        torch.randn(n_tokens, hidden),
        torch.randn(vocab, hidden) * 0.3,
        torch.randint(0, vocab, (n_tokens,)),
    )


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_token_nll_matches_reference_with_mask(backend, small_block):
    hidden, weight, target = _inputs()
    mask = torch.rand(111) > 0.2
    nll = token_nll_from_hidden(hidden, weight, target, mask, chunk_tokens=50, backend=backend)
    assert nll.dtype == torch.float32 and nll.shape == (111,)
    torch.testing.assert_close(
        nll, token_nll_reference(hidden, weight, target, mask), rtol=1e-5, atol=1e-5
    )
    assert torch.all(nll[~mask] == 0)
    assert torch.all(nll[mask] > 0)


def test_token_nll_equals_exp_of_mean_for_uniform_model():
    # A zero weight gives uniform logits: every token's NLL is exactly log(V).
    hidden, weight, target = _inputs(n_tokens=37, vocab=777)
    nll = token_nll_from_hidden(hidden, torch.zeros_like(weight), target, backend="triton")
    torch.testing.assert_close(nll, torch.full((37,), math.log(777)))


def test_sequence_and_document_means():
    nll = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    means = sequence_mean_nll(nll, mask)
    torch.testing.assert_close(means[:2], torch.tensor([2.0, 4.0]))
    assert math.isnan(means[2].item())
    # Packed row: documents 0 | 1 | 2 with a masked boundary token.
    doc_ids = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    flat = torch.tensor([1.0, 3.0, 2.0, 4.0, 100.0, 7.0, 7.0])
    doc_mask = torch.tensor([1, 1, 1, 1, 0, 1, 1])
    mean, count = document_mean_nll(flat, doc_ids, 4, doc_mask)
    torch.testing.assert_close(mean[:3], torch.tensor([2.0, 3.0, 7.0]))
    assert math.isnan(mean[3].item())
    assert count.tolist() == [2, 2, 2, 0]


def test_shape_errors():
    hidden, weight, target = _inputs()
    with pytest.raises(ValueError, match="target has"):
        token_nll_from_hidden(hidden, weight, target[:5])
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        sequence_mean_nll(torch.zeros(3), torch.zeros(3))
