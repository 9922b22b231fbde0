"""Forward-only per-token NLL from hidden states for perplexity scoring, no full logits.

Scoring a corpus with the base model only needs ``lse - logit[target]`` per token. Tokens are
processed in chunks: a chunk's logits (``chunk_tokens x V``, 256 MiB by default) are produced by
one matrix product and reduced by the Triton statistics kernel (online max / sum-exp, the target
logit) on CUDA, or by the same computation in torch on CPU; only two fp32 numbers per token
survive. Compared with ``model(input_ids, labels=...)`` this never holds ``[N, V]`` logits nor
their fp32 upcast.

Masks: ``mask`` marks tokens that count (0 for padding, for the first token of a document that
has no prediction, for positions after an end-of-document token that start another document).
Per-sequence and per-document means are separate helpers so a scorer can pack many short
documents into one row and still get one NLL per document.
"""

from __future__ import annotations

import torch

from megatron_syne.kernels._dispatch import Backend, resolve_backend
from megatron_syne.kernels.fused_linear_cross_entropy import (
    default_chunk_tokens,
    head_statistics_chunk,
)


@torch.no_grad()
def token_nll_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Negative log-likelihood (nats) of each target token, fp32, shape ``[N]``.

    Args:
        hidden: ``[N, H]`` final hidden states (after the final norm), one row per token.
        weight: ``[V, H]`` full output-layer weight (no vocab parallelism: scoring runs on
            one GPU per model replica).
        target: ``[N]`` the token each row predicts (the next token).
        mask: ``[N]`` bool/float; tokens with mask 0 get NLL 0 and are not computed into any
            mean. ``None`` counts every token.
        chunk_tokens: tokens per logits chunk (default: 256 MiB of logits).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    target = target.reshape(-1)
    if target.numel() != hidden.shape[0]:
        raise ValueError(f"target has {target.numel()} tokens, hidden has {hidden.shape[0]} rows")
    if mask is not None and mask.numel() != hidden.shape[0]:
        raise ValueError(f"mask has {mask.numel()} tokens, hidden has {hidden.shape[0]} rows")
    impl = resolve_backend(backend, hidden.device)
    vocab_size = weight.shape[0]
    valid = (target >= 0) & (target < vocab_size)
    keep = valid if mask is None else valid & (mask.reshape(-1) != 0)
    target_local = torch.where(keep, target, -1).to(torch.int64).contiguous()
    chunk = chunk_tokens or default_chunk_tokens(vocab_size, hidden.dtype)
    nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, min(hidden.shape[0], start + chunk))
        stats = head_statistics_chunk(hidden[rows], weight, target_local[rows], None, False, impl)
        nll[rows] = stats.lse() - stats.target_logit
    return torch.where(keep, nll, 0.0)


def token_nll_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference: full fp32 logits and ``F.cross_entropy(reduction='none')``."""
    logits = hidden.float() @ weight.float().t()
    target = target.reshape(-1)
    keep = (target >= 0) & (target < weight.shape[0])
    if mask is not None:
        keep = keep & (mask.reshape(-1) != 0)
    nll = torch.nn.functional.cross_entropy(logits, torch.where(keep, target, 0), reduction="none")
    return torch.where(keep, nll, 0.0)


def sequence_mean_nll(token_nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL per sequence: ``token_nll`` and ``mask`` are ``[B, T]``; returns ``[B]`` fp32.

    A sequence without any counted token gets NaN (its perplexity is undefined, and a NaN is
    visible downstream where 0 would look like a perfect score).
    """
    if token_nll.shape != mask.shape or token_nll.dim() != 2:
        raise ValueError(
            f"token_nll and mask must both be [B, T], got {tuple(token_nll.shape)} "
            f"and {tuple(mask.shape)}"
        )
    weights = mask.to(torch.float32)
    count = weights.sum(dim=1)
    total = (token_nll.float() * weights).sum(dim=1)
    return torch.where(count > 0, total / count.clamp_min(1.0), float("nan"))


def document_mean_nll(
    token_nll: torch.Tensor,
    document_ids: torch.Tensor,
    num_documents: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL per document for packed rows: ``document_ids`` [N] in ``[0, num_documents)``.

    Returns ``(mean_nll [D] fp32, counted_tokens [D] int64)``; documents without a counted token
    get NaN.
    """
    token_nll = token_nll.reshape(-1).float()
    document_ids = document_ids.reshape(-1).to(torch.int64)
    if document_ids.numel() != token_nll.numel():
        raise ValueError("document_ids must have one entry per token")
    weights = torch.ones_like(token_nll) if mask is None else mask.reshape(-1).to(torch.float32)
    total = torch.zeros(num_documents, dtype=torch.float32, device=token_nll.device)
    count = torch.zeros_like(total)
    total.index_add_(0, document_ids, token_nll * weights)
    count.index_add_(0, document_ids, weights)
    mean = torch.where(count > 0, total / count.clamp_min(1.0), float("nan"))
    return mean, count.round().to(torch.int64)
