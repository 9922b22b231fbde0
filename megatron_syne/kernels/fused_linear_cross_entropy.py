"""Fused output layer + cross-entropy: hidden states and the output weight to loss and gradients.

The ``[N, V]`` logits never exist. The logits are produced one chunk at a time by a matrix
product, turned in place into ``dloss/dlogits`` by the cross-entropy kernels of
:mod:`megatron_syne.kernels.cross_entropy` and consumed by the gradient products before the next
chunk reuses the memory. Two schedules chunk along different axes (``schedule=``):

``"tokens"`` (chunks of ``chunk_tokens`` rows, each with the whole local vocabulary)
    Per chunk: logits ``h_c W^T``, the row statistics (exact: the chunk holds whole rows), the
    gradient ``G_c`` in place, ``dH_c = G_c W`` and ``dW += G_c^T h_c``. ``dW`` sums over
    chunks, so it needs an fp32 ``V_local x H`` accumulator (bf16 accumulation across chunks is
    a known cause of divergence) -- 1.96 GiB for Llama-3's 128256 x 4096 at TP = 1 -- unless it
    accumulates straight into Megatron's fp32 ``main_grad`` (below). 3 GEMMs when eager.
``"vocab"`` (chunks of ``chunk_vocab`` vocabulary rows of the weight, each with all N tokens)
    Pass 1: per vocabulary chunk, logits ``h W_c^T`` and their row statistics, combined over
    chunks by online softmax (:func:`merge_row_stats`); for vocab parallelism ONE MAX and ONE
    fused SUM all-reduce for all rows at the end. Pass 2: per vocabulary chunk, the logits
    again, ``G_c`` in place, ``dH += G_c W_c`` into an fp32 ``[N, H]`` accumulator and
    ``dW[c] = G_c^T h`` written directly: each vocabulary row's gradient comes from one GEMM
    over all N tokens (fp32 accumulation inside the GEMM), so no ``V x H`` buffer exists.
    Always 4 GEMMs (the logits are computed twice). Extra memory: one logits chunk, the fp32
    ``dH`` (128 MiB at N = 8192, H = 4096; for fp32 inputs it is the returned gradient itself)
    and 16-20 bytes per token of statistics.

``schedule="auto"`` (:func:`choose_schedule`): ``"vocab"`` when the weight gradient goes to
``main_grad``; otherwise ``"tokens"`` when the fp32 ``V_local x H`` accumulator is at most
``TOKEN_SCHEDULE_ACCUMULATOR_BYTES`` (256 MiB, e.g. Llama-3 8B at TP >= 8), else ``"vocab"``.
The extra-memory bound of both choices is the same order (a logits chunk plus at most 256 MiB,
or the vocab schedule's fp32 ``dH``); the token schedule saves a GEMM when eager. With
``main_grad`` both do 4 GEMMs and the token schedule needs no fp32 buffer at all, but its ``dW``
products read and write ``main_grad`` once per token chunk (the vocab schedule's once in all):
7% slower on an H200 (``kernels/bench_cross_entropy.py``).

Eager and deferred gradients:

* eager (``reduction`` "sum"/"mean", no z-loss, no ``main_grad`` accumulation): gradients are
  computed during the forward and backward only scales them by the incoming scalar.
* deferred (``reduction="none"``, a z-loss, or ``main_grad`` accumulation): the per-token
  incoming gradients are only known in backward; the forward keeps the per-token logsumexp
  (pass 1 / statistics only) and backward recomputes the logits. 4 GEMMs for both schedules.

Megatron ``main_grad`` (``accumulate_main_grad``): megatron-core's DistributedDataParallel gives
each parameter an fp32 ``main_grad`` buffer and its backward hook adds ``param.grad`` into it.
With ``accumulate_main_grad=True`` (or ``"auto"``, the default, when the weight carries an fp32
``main_grad`` and DDP's ``grad_added_to_main_grad`` flag), backward adds ``dW`` straight into
``weight.main_grad`` in fp32 (``torch.addmm(..., out_dtype=torch.float32)`` on CUDA) and
follows megatron-core's ``gradient_accumulation_fusion`` convention
(``LinearWithGradAccumulationAndAsyncCommunication``): it sets
``weight.grad_added_to_main_grad = True`` and returns a dummy weight gradient (zeros when the
weight is shared with the embedding, ``zero_out_wgrad``, because then the hook does add
``.grad``; uninitialised otherwise, which the hook skips), or ``None`` when the weight has no
``grad_added_to_main_grad`` attribute. The hook therefore never adds the head's gradient twice.

Parallelism (Megatron layout; ``tp_group`` None = megatron-core's TP group if initialised):

* vocab parallel: ``weight`` is this rank's ``[V_local, H]`` shard (rows
  ``[r * V_local, (r + 1) * V_local)`` of the vocabulary). The row statistics are combined with
  one MAX and one fused SUM all-reduce (per token chunk, or once for the vocab schedule). Each
  rank's ``dH`` only covers its vocab shard, so ``dH`` is all-reduced over the group (what
  Megatron's ``copy_to_tensor_model_parallel_region`` does in backward).
* sequence parallel (``sequence_parallel=True``): ``hidden`` is this rank's ``[N / tp, H]`` slice
  of the sequence-first ``[s, b, h]`` activations flattened to rows. It is all-gathered along
  rows in rank order (as ``gather_from_sequence_parallel_region``), so ``target`` and
  ``loss_mask`` must describe all ``N`` gathered rows (the full ``[s, b]`` flattened), and the
  returned loss covers all ``N`` tokens on every rank. ``dH`` is reduce-scattered back to the
  local slice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Literal

import torch
import torch.distributed as dist

from megatron_syne.kernels._dispatch import Backend, resolve_backend
from megatron_syne.kernels.cross_entropy import (
    REDUCTIONS,
    Reduction,
    RowStats,
    _empty_stats,
    _fused_stats_and_grad,
    allreduce_row_stats,
    check_targets,
    local_row_stats,
    merge_row_stats,
    reduction_scale,
    resolve_tp_group,
    smoothing_coefficient,
    token_cross_entropy,
    token_weights,
    vocab_shard,
    write_row_grad,
)

Schedule = Literal["auto", "tokens", "vocab"]
SCHEDULES = ("auto", "tokens", "vocab")

# Budget for one chunk of logits: 256 MiB (1024 tokens of a 128256 vocabulary in bf16, or
# 16384 vocabulary rows of 8192 tokens).
CHUNK_LOGITS_BYTES = 1 << 28
# "auto" keeps the token schedule (3 GEMMs when eager) while its fp32 V_local x H weight-gradient
# accumulator stays within this many bytes.
TOKEN_SCHEDULE_ACCUMULATOR_BYTES = 1 << 28


def _chunk_within_budget(other_dim: int, dtype: torch.dtype, budget_bytes: int) -> int:
    """How many rows of ``other_dim`` logits of ``dtype`` fit ``budget_bytes``: a multiple of
    64 (tensor-core friendly matrix shapes), at least 64."""
    elem = torch.empty((), dtype=dtype).element_size()
    rows = budget_bytes // max(1, other_dim * elem)
    return max(64, rows // 64 * 64)


def default_chunk_tokens(
    vocab_local: int, dtype: torch.dtype, budget_bytes: int = CHUNK_LOGITS_BYTES
) -> int:
    """Tokens per chunk (token schedule) so that one chunk of logits fits ``budget_bytes``."""
    return _chunk_within_budget(vocab_local, dtype, budget_bytes)


def default_chunk_vocab(
    n_tokens: int, dtype: torch.dtype, budget_bytes: int = CHUNK_LOGITS_BYTES
) -> int:
    """Vocabulary rows per chunk (vocab schedule) so that ``n_tokens x chunk`` logits fit."""
    return _chunk_within_budget(n_tokens, dtype, budget_bytes)


def choose_schedule(
    schedule: Schedule, vocab_local: int, hidden_size: int, main_grad_accumulation: bool
) -> Literal["tokens", "vocab"]:
    """Resolve ``"auto"``: vocab when ``dW`` goes to ``main_grad``; otherwise tokens when the
    fp32 ``V_local x H`` accumulator is at most ``TOKEN_SCHEDULE_ACCUMULATOR_BYTES``, else vocab
    (no accumulator, one more GEMM).

    With ``main_grad`` both schedules do 4 GEMMs, but the token schedule reads and writes the
    fp32 ``main_grad`` once per token chunk (8 times at N = 8192), the vocab schedule once: on
    an H200 at N = 8192, H = 4096, V = 128256 (bf16) vocab took 53.5-54.4 ms against tokens'
    58.1-58.5 ms (``kernels/bench_cross_entropy.py``, two runs)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule != "auto":
        return schedule
    if main_grad_accumulation:
        return "vocab"
    if vocab_local * hidden_size * 4 <= TOKEN_SCHEDULE_ACCUMULATOR_BYTES:
        return "tokens"
    return "vocab"


def resolve_main_grad(weight: torch.Tensor, accumulate_main_grad) -> torch.Tensor | None:
    """``weight.main_grad`` when the weight gradient should be added into it, else None.

    ``"auto"``: only when ``main_grad`` is an fp32 tensor of the weight's shape and the weight
    carries megatron-core DDP's ``grad_added_to_main_grad`` flag (so its hook knows not to add
    the gradient again). ``True``: the fp32 ``main_grad`` is required (ValueError otherwise).
    """
    if accumulate_main_grad not in (True, False, "auto"):
        raise ValueError(
            f"accumulate_main_grad must be True, False or 'auto', got {accumulate_main_grad!r}"
        )
    if accumulate_main_grad is False:
        return None
    main_grad = getattr(weight, "main_grad", None)
    problem = None
    if not isinstance(main_grad, torch.Tensor):
        problem = "has no main_grad tensor"
    elif main_grad.dtype != torch.float32:
        problem = f"has a {main_grad.dtype} main_grad (fp32 needed: --grad-reduce-in-fp32)"
    elif main_grad.shape != weight.shape or main_grad.device != weight.device:
        problem = (
            f"has main_grad {tuple(main_grad.shape)} on {main_grad.device}, not "
            f"{tuple(weight.shape)} on {weight.device}"
        )
    elif hasattr(weight, "__fsdp_param__"):
        problem = "is a Megatron-FSDP parameter (its main_grad is allocated on demand)"
    if accumulate_main_grad == "auto":
        usable = problem is None and hasattr(weight, "grad_added_to_main_grad")
        return main_grad if usable else None
    if problem is not None:
        raise ValueError(
            f"accumulate_main_grad=True but the weight {tuple(weight.shape)} {problem}; use "
            "accumulate_main_grad='auto' (falls back to returning the gradient) or False"
        )
    return main_grad


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


# ---------------------------------------------------------------------------------------------
# The two schedules
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything about one call that is not a tensor."""

    group: object
    sequence_parallel: bool
    ignore_index: int
    vocab_start: int
    vocab_size: int
    smoothing: float
    z_loss_weight: float
    reduction: str
    schedule: str  # "tokens" | "vocab"
    chunk_tokens: int
    chunk_vocab: int
    eager: bool
    need_grad_hidden: bool
    need_grad_weight: bool
    backend: str

    @property
    def with_logit_sum(self) -> bool:
        return self.smoothing > 0.0


def _slices(total: int, step: int) -> Iterator[slice]:
    for start in range(0, total, step):
        yield slice(start, min(total, start + step))


def _store_rows(full: RowStats, rows: slice, part: RowStats) -> None:
    full.max[rows], full.sumexp[rows] = part.max, part.sumexp
    full.target_logit[rows] = part.target_logit
    if full.logit_sum is not None:
        full.logit_sum[rows] = part.logit_sum


def _row_coefficients(plan: _Plan, weights, scale, g_loss=None, g_z=None, lse=None):
    """Per-row fp32 ``(coef_p, coef_target, coef_const)`` of
    ``dloss/dlogits = coef_p * softmax + coef_target * onehot + coef_const`` (the incoming
    gradients ``g_loss``/``g_z`` per row; None = 1 for the loss, 0 for the z-loss)."""
    scaled = weights * scale
    g_ce = scaled if g_loss is None else scaled * g_loss
    coef_p = g_ce
    if g_z is not None and plan.z_loss_weight > 0.0:
        coef_p = g_ce + 2.0 * plan.z_loss_weight * lse * g_z * scaled
    coef_target = -(1.0 - plan.smoothing) * g_ce
    coef_const = -(plan.smoothing / plan.vocab_size) * g_ce
    return coef_p.contiguous(), coef_target.contiguous(), coef_const.contiguous()


def _token_statistics(plan: _Plan, h, weight, target_local) -> RowStats:
    stats = _empty_stats(h.shape[0], h.device, plan.with_logit_sum)
    for rows in _slices(h.shape[0], plan.chunk_tokens):
        part = head_statistics_chunk(
            h[rows], weight, target_local[rows], plan.group, plan.with_logit_sum, plan.backend
        )
        _store_rows(stats, rows, part)
    return stats


def _token_gradients(plan: _Plan, h, weight, target_local, coefs, dw_acc, lse=None):
    """Token schedule: per chunk of rows, logits -> ``G_c`` in place -> ``dH_c``, ``dW += ``.

    ``dw_acc``: fp32 ``[V_local, H]`` (an accumulator or ``main_grad``) or None. With ``lse``
    None (eager forward) the statistics come from the same logits and are returned.
    """
    n_rows = h.shape[0]
    grad_hidden = torch.empty_like(h) if plan.need_grad_hidden else None
    stats = None if lse is not None else _empty_stats(n_rows, h.device, plan.with_logit_sum)
    for rows in _slices(n_rows, plan.chunk_tokens):
        logits = h[rows] @ weight.t()
        target_rows = target_local[rows]
        coef_p, coef_target, coef_const = (c[rows] for c in coefs)
        if lse is not None:
            write_row_grad(
                logits, logits, target_rows, lse[rows], coef_p, coef_target, coef_const,
                plan.backend,
            )  # fmt: skip
        elif plan.group is None:
            part = _fused_stats_and_grad(
                logits, logits, target_rows, coef_p, coef_target, coef_const,
                plan.with_logit_sum, plan.backend,
            )  # fmt: skip
            _store_rows(stats, rows, part)
        else:
            part = allreduce_row_stats(
                local_row_stats(logits, target_rows, plan.with_logit_sum, plan.backend),
                plan.group,
            )
            write_row_grad(
                logits, logits, target_rows, part.lse(), coef_p, coef_target, coef_const,
                plan.backend,
            )  # fmt: skip
            _store_rows(stats, rows, part)
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[rows])
        if dw_acc is not None:
            _accumulate_fp32(dw_acc, logits.t(), h[rows])
        del logits
    return grad_hidden, stats


def _vocab_statistics(plan: _Plan, h, weight, target_local) -> RowStats:
    """Vocab schedule pass 1: online softmax over vocabulary chunks, then one MAX and one
    fused SUM all-reduce over the TP group for all rows."""
    local = None
    for cols in _slices(weight.shape[0], plan.chunk_vocab):
        logits = h @ weight[cols].t()
        # Targets outside this chunk (and ignored rows, -1) fall outside [0, chunk): logit 0.
        part = local_row_stats(logits, target_local - cols.start, plan.with_logit_sum, plan.backend)
        local = part if local is None else merge_row_stats(local, part)
        del logits
    return allreduce_row_stats(local, plan.group)


def _vocab_gradients(
    plan: _Plan, h, weight, target_local, lse, coefs, grad_weight=None, main_grad=None
):
    """Vocab schedule pass 2: per vocabulary chunk ``c``, logits -> ``G_c`` in place,
    ``dH += G_c W_c`` (fp32 accumulator) and ``dW[c] = G_c^T h`` (into ``grad_weight`` in the
    weight's dtype, or added to the fp32 ``main_grad``). Returns ``dH`` in ``h``'s dtype."""
    grad_hidden = None
    if plan.need_grad_hidden:
        grad_hidden = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    for cols in _slices(weight.shape[0], plan.chunk_vocab):
        weight_chunk = weight[cols]
        logits = h @ weight_chunk.t()
        write_row_grad(logits, logits, target_local - cols.start, lse, *coefs, plan.backend)
        if grad_hidden is not None:
            _accumulate_fp32(grad_hidden, logits, weight_chunk)
        if main_grad is not None:
            _accumulate_fp32(main_grad[cols], logits.t(), h)
        elif grad_weight is not None:
            torch.mm(logits.t(), h, out=grad_weight[cols])
        del logits
    return None if grad_hidden is None else grad_hidden.to(h.dtype)


def _finish_grad_hidden(grad_hidden, plan: _Plan):
    if grad_hidden is None or plan.group is None:
        return grad_hidden
    if plan.sequence_parallel:
        return reduce_scatter_rows(grad_hidden, plan.group)
    dist.all_reduce(grad_hidden, group=plan.group)
    return grad_hidden


def _main_grad_convention_grad(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight gradient autograd receives once ``dW`` is in ``main_grad``.

    megatron-core's LinearWithGradAccumulationAndAsyncCommunication (gradient accumulation
    fusion): a dummy gradient keeps DDP's hook on the main backward thread; its hook skips
    ``.grad`` when ``grad_added_to_main_grad`` is set unless ``zero_out_wgrad`` (a weight shared
    with the embedding, whose lookup gradient also lands in ``.grad``), so then it must be 0.
    """
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    if getattr(weight, "zero_out_wgrad", False):
        dummy = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    else:
        dummy = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    weight.grad_added_to_main_grad = True
    return dummy


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, loss_mask, plan: _Plan, main_grad):
        h = gather_sequence_rows(hidden, plan.group) if plan.sequence_parallel else hidden
        h = h.contiguous()
        valid = target != plan.ignore_index
        # Ignored rows get -1 so an ignore_index inside the vocabulary never selects a logit.
        target_local = torch.where(valid, target - plan.vocab_start, -1).to(torch.int64)
        target_local = target_local.contiguous()
        weights = token_weights(target, plan.ignore_index, loss_mask)
        scale = reduction_scale(weights, plan.reduction)

        if plan.eager:
            coefs = _row_coefficients(plan, weights, scale)
            grad_weight = None
            if plan.schedule == "tokens":
                acc = None
                if plan.need_grad_weight:
                    acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                grad_hidden, stats = _token_gradients(plan, h, weight, target_local, coefs, acc)
                if acc is not None:
                    grad_weight = acc.to(weight.dtype)
                del acc
            else:
                stats = _vocab_statistics(plan, h, weight, target_local)
                if plan.need_grad_weight:
                    grad_weight = torch.empty_like(weight)
                grad_hidden = _vocab_gradients(
                    plan, h, weight, target_local, stats.lse(), coefs, grad_weight=grad_weight
                )
            grad_hidden = _finish_grad_hidden(grad_hidden, plan)
            ctx.save_for_backward(grad_hidden, grad_weight)
            lse = stats.lse()
        else:
            if plan.schedule == "tokens":
                stats = _token_statistics(plan, h, weight, target_local)
            else:
                stats = _vocab_statistics(plan, h, weight, target_local)
            lse = stats.lse()
            ctx.save_for_backward(h, weight, target_local, weights, scale, lse)
            # Not in save_for_backward: main_grad is modified in place by design (megatron-core
            # keeps it on ctx for the same reason).
            ctx.main_grad = main_grad
            ctx.weight_param = weight if main_grad is not None else None
        ctx.plan = plan
        ctx.set_materialize_grads(False)

        loss_tok = token_cross_entropy(stats, plan.smoothing, plan.vocab_size) * weights
        z_tok = plan.z_loss_weight * lse.square() * weights
        if plan.reduction == "none":
            loss, z_loss = loss_tok, z_tok
        else:
            loss, z_loss = loss_tok.sum() * scale, z_tok.sum() * scale
        return (loss, z_loss) if plan.z_loss_weight > 0.0 else loss

    @staticmethod
    def backward(ctx, grad_loss, grad_z_loss=None):
        plan = ctx.plan
        nones = (None,) * 4
        if grad_loss is None and grad_z_loss is None:
            return (None, None, *nones)
        if plan.eager:
            grad_hidden, grad_weight = ctx.saved_tensors
            if grad_hidden is not None:
                grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
            if grad_weight is not None:
                grad_weight.mul_(grad_loss.to(grad_weight.dtype))
            return grad_hidden, grad_weight, *nones

        h, weight, target_local, weights, scale, lse = ctx.saved_tensors

        def per_row(g):
            if g is None:
                return None
            return g.reshape(-1).float() if plan.reduction == "none" else g.float().expand_as(lse)

        g_loss = per_row(grad_loss)
        if g_loss is None:
            g_loss = torch.zeros_like(lse)
        coefs = _row_coefficients(plan, weights, scale, g_loss, per_row(grad_z_loss), lse)
        main_grad = ctx.main_grad
        grad_weight = None
        if plan.schedule == "tokens":
            acc = None
            if plan.need_grad_weight:
                acc = main_grad
                if acc is None:
                    acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            grad_hidden, _ = _token_gradients(plan, h, weight, target_local, coefs, acc, lse=lse)
            if acc is not None and main_grad is None:
                grad_weight = acc.to(weight.dtype)
            del acc
        else:
            if plan.need_grad_weight and main_grad is None:
                grad_weight = torch.empty_like(weight)
            grad_hidden = _vocab_gradients(
                plan, h, weight, target_local, lse, coefs,
                grad_weight=grad_weight,
                main_grad=main_grad if plan.need_grad_weight else None,
            )  # fmt: skip
        grad_hidden = _finish_grad_hidden(grad_hidden, plan)
        if main_grad is not None and plan.need_grad_weight:
            grad_weight = _main_grad_convention_grad(ctx.weight_param)
        return grad_hidden, grad_weight, *nones


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
    schedule: Schedule = "auto",
    chunk_vocab: int | None = None,
    accumulate_main_grad: bool | Literal["auto"] = "auto",
    backend: Backend = "auto",
):
    """Cross-entropy of ``hidden @ weight^T`` without materialising the logits.

    Args:
        hidden: ``[N_local, H]`` final hidden states (after the final norm), tokens as rows;
            with ``sequence_parallel`` this rank's slice of the sequence, else all ``N`` rows.
        weight: ``[V_local, H]`` output-layer weight (this rank's vocab shard), same dtype.
        target: ``[N]`` global token ids of all (gathered) rows; ``ignore_index`` = no loss.
        loss_mask: ``[N]`` float/bool per-token weights.
        reduction: ``"mean"`` (over tokens with nonzero weight), ``"sum"`` or ``"none"``.
        chunk_tokens: token schedule, tokens per chunk (default: a 256 MiB logits chunk, e.g.
            1024 tokens of a 128256 vocabulary in bf16).
        schedule: ``"tokens"``, ``"vocab"`` or ``"auto"`` (see :func:`choose_schedule`).
        chunk_vocab: vocab schedule, vocabulary rows per chunk (default: a 256 MiB logits
            chunk, e.g. 16384 rows for 8192 tokens in bf16).
        accumulate_main_grad: add the weight gradient into ``weight.main_grad`` (fp32, as
            megatron-core DDP allocates it) instead of returning it; ``"auto"`` does so when
            the weight has DDP's fp32 ``main_grad`` (see the module docstring).
        Other arguments: as :func:`megatron_syne.kernels.cross_entropy.vocab_parallel_cross_entropy`.

    Returns:
        fp32 ``loss`` (``[N]`` for "none", else a scalar) or ``(loss, z_loss)``. Call backward
        at most once through it.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V_local, H] expected, got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if z_loss_weight < 0.0:
        raise ValueError(f"z_loss_weight must be >= 0, got {z_loss_weight}")
    for name, value in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
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
    vocab_start, vocab_size = vocab_shard(weight.shape[0], group)
    check_targets(target, vocab_size, ignore_index)
    if loss_mask is not None:
        loss_mask = loss_mask.reshape(-1)
        if loss_mask.numel() != n_rows:
            raise ValueError(f"loss_mask has {loss_mask.numel()} tokens, expected {n_rows}")

    # Inside autograd.Function.forward grad mode is off and needs_input_grad ignores it, so
    # whether gradients are wanted at all (not under torch.no_grad) is decided here.
    grad_enabled = torch.is_grad_enabled()
    need_grad_hidden = grad_enabled and hidden.requires_grad
    need_grad_weight = grad_enabled and weight.requires_grad
    main_grad = resolve_main_grad(weight, accumulate_main_grad) if need_grad_weight else None
    chosen = choose_schedule(schedule, weight.shape[0], weight.shape[1], main_grad is not None)
    eager = (
        (need_grad_hidden or need_grad_weight)
        and reduction != "none"
        and z_loss_weight == 0.0
        and main_grad is None
    )
    plan = _Plan(
        group=group,
        sequence_parallel=sequence_parallel,
        ignore_index=ignore_index,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        smoothing=smoothing_coefficient(float(label_smoothing), vocab_size),
        z_loss_weight=float(z_loss_weight),
        reduction=reduction,
        schedule=chosen,
        chunk_tokens=chunk_tokens or default_chunk_tokens(weight.shape[0], hidden.dtype),
        chunk_vocab=chunk_vocab or default_chunk_vocab(n_rows, hidden.dtype),
        eager=eager,
        need_grad_hidden=need_grad_hidden,
        need_grad_weight=need_grad_weight,
        backend=resolve_backend(backend, hidden.device),
    )
    return _FusedLinearCrossEntropy.apply(hidden, weight, target, loss_mask, plan, main_grad)


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
