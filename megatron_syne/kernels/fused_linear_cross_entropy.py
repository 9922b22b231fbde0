"""Fused output layer + cross-entropy: hidden states and the output weight to loss and gradients.

The ``[N, V]`` logits never exist: tokens are processed in chunks of ``chunk_tokens`` rows; each
chunk's logits ``h_c @ W^T`` are turned in place into ``dloss/dlogits`` by the cross-entropy
kernels of :mod:`megatron_syne.kernels.cross_entropy`, then consumed by the two gradient
products ``dH_c = G_c @ W`` and ``dW += G_c^T @ h_c`` before the next chunk reuses the memory.
``dW`` is accumulated over chunks in fp32 (bf16 accumulation across chunks is a known cause of
divergence) and cast to the weight's dtype once at the end.

Two schedules:

* eager (``reduction`` "sum"/"mean" and no z-loss): gradients are computed during the forward
  (three ``N x V x H`` products in total) and backward only scales them by the incoming scalar.
* deferred (``reduction="none"`` or ``z_loss_weight > 0``): the per-token incoming gradients are
  only known in backward, so the forward keeps the per-token logsumexp and backward recomputes
  each chunk's logits (four products in total). Memory is the same.

Parallelism (Megatron layout; ``tp_group`` None = megatron-core's TP group if initialised):

* vocab parallel: ``weight`` is this rank's ``[V_local, H]`` shard (rows
  ``[r * V_local, (r + 1) * V_local)`` of the vocabulary). Per chunk the row statistics are
  combined with one MAX and one fused SUM all-reduce. Each rank's ``dH`` only covers its vocab
  shard, so ``dH`` is all-reduced over the group (what Megatron's
  ``copy_to_tensor_model_parallel_region`` does in backward).
* sequence parallel (``sequence_parallel=True``): ``hidden`` is this rank's ``[N / tp, H]`` slice
  of the sequence-first ``[s, b, h]`` activations flattened to rows. It is all-gathered along
  rows in rank order (as ``gather_from_sequence_parallel_region``), so ``target`` and
  ``loss_mask`` must describe all ``N`` gathered rows (the full ``[s, b]`` flattened), and the
  returned loss covers all ``N`` tokens on every rank. ``dH`` is reduce-scattered back to the
  local slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_syne.kernels._dispatch import Backend, resolve_backend
from megatron_syne.kernels.cross_entropy import (
    REDUCTIONS,
    Reduction,
    _fused_stats_and_grad,
    allreduce_row_stats,
    check_targets,
    local_row_stats,
    reduction_scale,
    resolve_tp_group,
    smoothing_coefficient,
    token_cross_entropy,
    token_weights,
    vocab_shard,
    write_row_grad,
)

# Budget for one chunk of logits: 256 MiB (1024 tokens of a 128256 vocabulary in bf16).
CHUNK_LOGITS_BYTES = 1 << 28


def default_chunk_tokens(vocab_local: int, dtype: torch.dtype) -> int:
    """Tokens per chunk so that one chunk of logits stays within ``CHUNK_LOGITS_BYTES``."""
    elem = torch.empty((), dtype=dtype).element_size()
    tokens = CHUNK_LOGITS_BYTES // max(1, vocab_local * elem)
    # Multiples of 64 keep the matrix products on tensor-core friendly shapes.
    return max(64, tokens // 64 * 64)


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``/``b`` possibly bf16/fp16."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _CUDA_ADDMM_OUT_DTYPE[0]:
        try:
            # cuBLAS accumulates into the fp32 output in its epilogue: no bf16 temporary.
            torch.addmm(acc, a, b, torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):  # torch without addmm(out_dtype=...) on this build
            _CUDA_ADDMM_OUT_DTYPE[0] = False
    # Fallback: the product of one row slice at a time in the input dtype (its own reduction
    # is fp32 inside the GEMM), added to the fp32 accumulator; the temporary stays <= 64 MiB.
    step = max(1, (1 << 25) // max(1, b.shape[1]))
    for start in range(0, acc.shape[0], step):
        rows = slice(start, min(acc.shape[0], start + step))
        acc[rows] += (a[rows] @ b).float()


_CUDA_ADDMM_OUT_DTYPE = [True]


def gather_sequence_rows(hidden: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``[n, H]`` row slices of the TP group in rank order."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(hidden) for _ in range(world)]
    dist.all_gather(parts, hidden.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def reduce_scatter_rows(full: torch.Tensor, group) -> torch.Tensor:
    """Sum ``[N, H]`` over the group and keep this rank's ``[N / tp, H]`` row slice."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = full.shape[0] // world
    if dist.get_backend(group) == "nccl":
        out = torch.empty((local, full.shape[1]), dtype=full.dtype, device=full.device)
        dist.reduce_scatter_tensor(out, full.contiguous(), group=group)
        return out
    # gloo has no reduce_scatter: all-reduce and slice (CPU tests only).
    dist.all_reduce(full, group=group)
    return full[rank * local : (rank + 1) * local].clone()


def head_statistics_chunk(h_chunk, weight, target_local, group, with_logit_sum, backend):
    """Global row statistics of ``h_chunk @ weight^T`` without keeping the logits."""
    logits = h_chunk @ weight.t()
    return allreduce_row_stats(
        local_row_stats(logits, target_local, with_logit_sum, backend), group
    )


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        target,
        loss_mask,
        group,
        sequence_parallel,
        ignore_index,
        label_smoothing,
        z_loss_weight,
        reduction,
        chunk_tokens,
        backend,
    ):
        h = gather_sequence_rows(hidden, group) if sequence_parallel else hidden
        h = h.contiguous()
        n_tokens = h.shape[0]
        vocab_local = weight.shape[0]
        vocab_start, vocab_size = vocab_shard(vocab_local, group)
        smoothing = smoothing_coefficient(label_smoothing, vocab_size)
        with_logit_sum = smoothing > 0.0
        valid = target != ignore_index
        target_local = torch.where(valid, target - vocab_start, -1).to(torch.int64).contiguous()
        weights = token_weights(target, ignore_index, loss_mask)
        scale = reduction_scale(weights, reduction)
        chunk = chunk_tokens or default_chunk_tokens(vocab_local, h.dtype)

        eager = (
            reduction != "none"
            and z_loss_weight == 0.0
            and ctx.needs_input_grad[:2]
            != (
                False,
                False,
            )
        )
        lse = torch.empty(n_tokens, dtype=torch.float32, device=h.device)
        ce = torch.empty_like(lse)
        grad_hidden = grad_weight = None
        if eager:
            grad_hidden = torch.empty_like(h)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, n_tokens, chunk):
            rows = slice(start, min(n_tokens, start + chunk))
            if not eager:
                stats = head_statistics_chunk(
                    h[rows], weight, target_local[rows], group, with_logit_sum, backend
                )
            else:
                logits = h[rows] @ weight.t()
                coef_p = (weights[rows] * scale).contiguous()
                coef_target = -(1.0 - smoothing) * coef_p
                coef_const = -(smoothing / vocab_size) * coef_p
                if group is None:
                    stats = _fused_stats_and_grad(
                        logits,
                        logits,
                        target_local[rows],
                        coef_p,
                        coef_target,
                        coef_const,
                        with_logit_sum,
                        backend,
                    )
                else:
                    stats = allreduce_row_stats(
                        local_row_stats(logits, target_local[rows], with_logit_sum, backend),
                        group,
                    )
                    write_row_grad(
                        logits,
                        logits,
                        target_local[rows],
                        stats.lse(),
                        coef_p,
                        coef_target,
                        coef_const,
                        backend,
                    )
                torch.mm(logits, weight, out=grad_hidden[rows])
                _accumulate_fp32(grad_weight, logits.t(), h[rows])
                del logits
            lse[rows] = stats.lse()
            ce[rows] = token_cross_entropy(stats, smoothing, vocab_size)

        loss_tok = ce * weights
        z_tok = z_loss_weight * lse.square() * weights
        if eager:
            grad_hidden = _finish_grad_hidden(grad_hidden, group, sequence_parallel)
            grad_weight = grad_weight.to(weight.dtype)
            ctx.save_for_backward(grad_hidden, grad_weight)
        else:
            ctx.save_for_backward(h, weight, target_local, weights, scale, lse)
        ctx.eager, ctx.reduction = eager, reduction
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        ctx.smoothing, ctx.vocab_size, ctx.z_loss_weight = smoothing, vocab_size, z_loss_weight
        ctx.chunk, ctx.backend = chunk, backend
        ctx.set_materialize_grads(False)

        if reduction == "none":
            loss, z_loss = loss_tok, z_tok
        else:
            loss, z_loss = loss_tok.sum() * scale, z_tok.sum() * scale
        return (loss, z_loss) if z_loss_weight > 0.0 else loss

    @staticmethod
    def backward(ctx, grad_loss, grad_z_loss=None):
        nones = (None,) * 10
        if grad_loss is None and grad_z_loss is None:
            return (None, None, *nones)
        if ctx.eager:
            grad_hidden, grad_weight = ctx.saved_tensors
            g = grad_loss.to(grad_hidden.dtype)
            return grad_hidden.mul_(g), grad_weight.mul_(g.to(grad_weight.dtype)), *nones

        h, weight, target_local, weights, scale, lse = ctx.saved_tensors

        def per_row(g):
            if g is None:
                return torch.zeros_like(lse)
            return g.reshape(-1).float() if ctx.reduction == "none" else g.float().expand_as(lse)

        g_loss = per_row(grad_loss)
        g_z = per_row(grad_z_loss)
        w = weights * scale
        coef_p_all = w * (g_loss + 2.0 * ctx.z_loss_weight * lse * g_z)
        coef_target_all = -(1.0 - ctx.smoothing) * w * g_loss
        coef_const_all = -(ctx.smoothing / ctx.vocab_size) * w * g_loss
        grad_hidden = torch.empty_like(h)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, h.shape[0], ctx.chunk):
            rows = slice(start, min(h.shape[0], start + ctx.chunk))
            logits = h[rows] @ weight.t()
            write_row_grad(
                logits,
                logits,
                target_local[rows],
                lse[rows].contiguous(),
                coef_p_all[rows].contiguous(),
                coef_target_all[rows].contiguous(),
                coef_const_all[rows].contiguous(),
                ctx.backend,
            )
            torch.mm(logits, weight, out=grad_hidden[rows])
            _accumulate_fp32(grad_weight, logits.t(), h[rows])
            del logits
        grad_hidden = _finish_grad_hidden(grad_hidden, ctx.group, ctx.sequence_parallel)
        return grad_hidden, grad_weight.to(weight.dtype), *nones


def _finish_grad_hidden(grad_hidden, group, sequence_parallel):
    if group is None:
        return grad_hidden
    if sequence_parallel:
        return reduce_scatter_rows(grad_hidden, group)
    dist.all_reduce(grad_hidden, group=group)
    return grad_hidden


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    tp_group=None,
    sequence_parallel: bool = False,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    reduction: Reduction = "mean",
    loss_mask: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    *,
    backend: Backend = "auto",
):
    """Cross-entropy of ``hidden @ weight^T`` without materialising the logits.

    Args:
        hidden: ``[N_local, H]`` final hidden states (after the final norm), tokens as rows;
            with ``sequence_parallel`` this rank's slice of the sequence, else all ``N`` rows.
        weight: ``[V_local, H]`` output-layer weight (this rank's vocab shard).
        target: ``[N]`` global token ids of all (gathered) rows; ``ignore_index`` = no loss.
        loss_mask: ``[N]`` float/bool per-token weights.
        reduction: ``"mean"`` (over tokens with nonzero weight), ``"sum"`` or ``"none"``.
        chunk_tokens: tokens per chunk (default: a 256 MiB logits chunk, e.g. 1024 tokens of a
            128256 vocabulary in bf16).
        Other arguments: as :func:`megatron_syne.kernels.cross_entropy.vocab_parallel_cross_entropy`.

    Returns:
        fp32 ``loss`` (``[N]`` for "none", else a scalar) or ``(loss, z_loss)``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V_local, H] expected, got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if z_loss_weight < 0.0:
        raise ValueError(f"z_loss_weight must be >= 0, got {z_loss_weight}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    group = resolve_tp_group(tp_group)
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    if sequence_parallel and group is None:
        raise ValueError("sequence_parallel=True needs a tensor-parallel group of size > 1")
    n_rows = hidden.shape[0] * (dist.get_world_size(group) if sequence_parallel else 1)
    target = target.reshape(-1)
    if target.numel() != n_rows:
        raise ValueError(
            f"target has {target.numel()} tokens but the (gathered) hidden states have {n_rows}"
        )
    check_targets(target, vocab_shard(weight.shape[0], group)[1], ignore_index)
    if loss_mask is not None:
        loss_mask = loss_mask.reshape(-1)
        if loss_mask.numel() != n_rows:
            raise ValueError(f"loss_mask has {loss_mask.numel()} tokens, expected {n_rows}")
    return _FusedLinearCrossEntropy.apply(
        hidden,
        weight,
        target,
        loss_mask,
        group,
        sequence_parallel,
        ignore_index,
        float(label_smoothing),
        float(z_loss_weight),
        reduction,
        chunk_tokens,
        resolve_backend(backend, hidden.device),
    )


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    reduction: Reduction = "mean",
    loss_mask: torch.Tensor | None = None,
):
    """Plain-autograd reference over the full vocabulary: materialises ``[N, V]`` logits."""
    from megatron_syne.kernels.cross_entropy import cross_entropy_reference

    return cross_entropy_reference(
        hidden @ weight.t(),
        target.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss_weight=z_loss_weight,
        reduction=reduction,
        loss_mask=None if loss_mask is None else loss_mask.reshape(-1),
    )
