"""Vocab-parallel cross-entropy with the gradient written during the forward pass.

One op, three implementations of the same algorithm plus a plain-autograd reference:

* Triton kernels (CUDA, or the Triton interpreter on CPU): one program per token row.
  With one tensor-parallel rank the forward is ONE kernel that streams the row twice (online
  max/sum-exp, then ``softmax - onehot`` written as the gradient; the second read mostly hits L2
  on Hopper). With vocab parallelism it is a statistics kernel, two all-reduces, and the
  gradient kernel.
* a torch implementation of the same two passes (CPU training, chunked over rows so the fp32
  upcast of the logits never exists for the whole batch).
* :func:`cross_entropy_reference`: the textbook formula through autograd, the test oracle.

Loss of token ``i`` with logits ``z`` over the *global* vocabulary of size ``K``, target ``t``,
``lse = log(sum_j exp(z_j))`` and Megatron's label smoothing ``s = alpha * K / (K - 1)``
(megatron/core/tensor_parallel/cross_entropy.py, taken from NeMo)::

    ce_i   = (1 - s) * (lse - z_t) - s * (mean_j(z_j) - lse)        # s = 0 without smoothing
    dce/dz_j = softmax_j - (1 - s) * [j == t] - s / K
    z_i    = z_loss_weight * lse^2      (returned separately; d/dz_j = 2 w lse softmax_j)

Token weights ``w_i = [t_i != ignore_index] * loss_mask_i``; ``reduction="none"`` returns
``w_i * ce_i`` per token, ``"sum"`` their sum and ``"mean"`` the sum divided by ``sum_i w_i``
(0 when every token is masked, instead of torch's NaN, so an all-padding micro-batch does not
poison a training step).

Differences from megatron-core's ``vocab_parallel_cross_entropy`` (by design):
* the smoothing term uses the *global* vocabulary size and the global mean of the logits; Megatron
  uses the local shard's size and the local mean of the log-probabilities, so under TP > 1 its
  smoothed loss depends on the TP size. At TP = 1 the two are identical.
* the softmax is never saved: the gradient (in the logits' dtype) is written during the forward,
  and backward multiplies it by the incoming gradient in place (on the Triton path a kernel that
  skips, on the device, rows whose incoming gradient is exactly 1, as it is for a mean loss).
  With ``inplace_backward=True`` the gradient overwrites the logits' own storage, so no extra
  ``N x V`` buffer exists at all.
"""

from __future__ import annotations

import sys
from typing import Literal

import torch
import torch.distributed as dist

from megatron_syne.kernels._dispatch import (
    HAS_TRITON,
    Backend,
    launch,
    next_power_of_2,
    resolve_backend,
)

Reduction = Literal["none", "sum", "mean"]
REDUCTIONS = ("none", "sum", "mean")

# Largest vocabulary block one Triton program holds in registers; tests lower it to exercise
# the multi-block loop and the ragged last block on a small vocabulary. Measured on an H200
# (kernels/tune_cross_entropy.py, N=8192, V=128256, bf16): BLOCK 8192 with 8 warps is within 4%
# of the fastest launch of each row kernel (fused 1.63 ms, statistics 0.59, gradient 1.13),
# where Liger-Kernel's 32768 with 32 warps took 1.77-1.81 / 0.79-0.82 / 1.15-1.16 ms.
MAX_BLOCK_SIZE = 8192
# Rows per chunk of the torch implementation: bounds its fp32 temporaries to ~64 MiB.
TORCH_CHUNK_ELEMENTS = 1 << 24

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _row_statistics(x_row, target, n_cols, HAS_LOGIT_SUM: tl.constexpr, BLOCK: tl.constexpr):
        """One pass of online softmax over a row: (max, sum of exp(x - max), x[target], sum x).

        ``target`` outside [0, n_cols) (another rank's shard, or ignored) gives x[target] = 0.
        """
        running_max = float("-inf")
        sumexp = 0.0
        logit_sum = 0.0
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            in_row = offs < n_cols
            x = tl.load(x_row + offs, mask=in_row, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            sumexp = sumexp * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
            if HAS_LOGIT_SUM:
                logit_sum += tl.sum(tl.where(in_row, x, 0.0), axis=0)
        in_shard = (target >= 0) & (target < n_cols)
        target_logit = tl.load(x_row + target, mask=in_shard, other=0.0).to(tl.float32)
        return running_max, sumexp, target_logit, logit_sum

    @triton.jit
    def _store_row_statistics(
        row,
        max_ptr,
        sumexp_ptr,
        target_logit_ptr,
        logit_sum_ptr,
        running_max,
        sumexp,
        target_logit,
        logit_sum,
        HAS_LOGIT_SUM: tl.constexpr,
    ):
        tl.store(max_ptr + row, running_max)
        tl.store(sumexp_ptr + row, sumexp)
        tl.store(target_logit_ptr + row, target_logit)
        if HAS_LOGIT_SUM:
            tl.store(logit_sum_ptr + row, logit_sum)

    @triton.jit
    def _write_row_gradient(
        x_row,
        grad_row,
        grad_ptr,
        target,
        lse,
        coef_p_ptr,
        coef_target_ptr,
        coef_const_ptr,
        row,
        n_cols,
        BLOCK: tl.constexpr,
    ):
        """grad[j] = a * softmax[j] + e + b * [j == target] over one row, softmax from ``lse``.

        ``grad_row`` may equal ``x_row``: every element is read before it is overwritten.
        """
        coef_p = tl.load(coef_p_ptr + row)
        coef_target = tl.load(coef_target_ptr + row)
        coef_const = tl.load(coef_const_ptr + row)
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            in_row = offs < n_cols
            x = tl.load(x_row + offs, mask=in_row, other=0.0).to(tl.float32)
            grad = coef_p * tl.exp(x - lse) + coef_const
            grad = tl.where(offs == target, grad + coef_target, grad)
            tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_row)

    @triton.jit
    def _ce_stats_kernel(
        x_ptr,
        x_row_stride,
        target_ptr,
        max_ptr,
        sumexp_ptr,
        target_logit_ptr,
        logit_sum_ptr,
        n_cols,
        HAS_LOGIT_SUM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Per row of the local shard: max, sum of exp(x - max), x[target], sum of x."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_row_stride
        target = tl.load(target_ptr + row)
        running_max, sumexp, target_logit, logit_sum = _row_statistics(
            x_row, target, n_cols, HAS_LOGIT_SUM, BLOCK
        )
        _store_row_statistics(
            row,
            max_ptr,
            sumexp_ptr,
            target_logit_ptr,
            logit_sum_ptr,
            running_max,
            sumexp,
            target_logit,
            logit_sum,
            HAS_LOGIT_SUM,
        )

    @triton.jit
    def _ce_grad_kernel(
        x_ptr,
        x_row_stride,
        grad_ptr,
        grad_row_stride,
        target_ptr,
        lse_ptr,
        coef_p_ptr,
        coef_target_ptr,
        coef_const_ptr,
        n_cols,
        BLOCK: tl.constexpr,
    ):
        """grad[j] = a * softmax[j] + e + b * [j == target], softmax from the global lse.

        ``grad_ptr`` may equal ``x_ptr``: every element is read before it is overwritten by
        the same program.
        """
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_row_stride
        grad_row = grad_ptr + row * grad_row_stride
        target = tl.load(target_ptr + row)
        lse = tl.load(lse_ptr + row)
        _write_row_gradient(
            x_row,
            grad_row,
            grad_ptr,
            target,
            lse,
            coef_p_ptr,
            coef_target_ptr,
            coef_const_ptr,
            row,
            n_cols,
            BLOCK,
        )

    @triton.jit
    def _ce_fused_kernel(
        x_ptr,
        x_row_stride,
        grad_ptr,
        grad_row_stride,
        target_ptr,
        max_ptr,
        sumexp_ptr,
        target_logit_ptr,
        logit_sum_ptr,
        coef_p_ptr,
        coef_target_ptr,
        coef_const_ptr,
        n_cols,
        HAS_LOGIT_SUM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Single-rank forward: the statistics pass and the gradient pass in one program."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_row_stride
        grad_row = grad_ptr + row * grad_row_stride
        target = tl.load(target_ptr + row)
        running_max, sumexp, target_logit, logit_sum = _row_statistics(
            x_row, target, n_cols, HAS_LOGIT_SUM, BLOCK
        )
        _store_row_statistics(
            row,
            max_ptr,
            sumexp_ptr,
            target_logit_ptr,
            logit_sum_ptr,
            running_max,
            sumexp,
            target_logit,
            logit_sum,
            HAS_LOGIT_SUM,
        )

        lse = running_max + tl.log(sumexp)
        _write_row_gradient(
            x_row,
            grad_row,
            grad_ptr,
            target,
            lse,
            coef_p_ptr,
            coef_target_ptr,
            coef_const_ptr,
            row,
            n_cols,
            BLOCK,
        )

    @triton.jit
    def _scale_rows_kernel(
        grad_ptr, grad_row_stride, scale_ptr, scale_stride, n_cols, BLOCK: tl.constexpr
    ):
        """grad[row] *= scale[row * scale_stride] in fp32; a scale of exactly 1 (the usual
        incoming gradient of a mean loss) returns without touching the row, so the check costs
        no host synchronisation and the multiply no memory traffic."""
        row = tl.program_id(0).to(tl.int64)
        scale = tl.load(scale_ptr + row * scale_stride)
        if scale != 1.0:
            grad_row = grad_ptr + row * grad_row_stride
            for start in range(0, n_cols, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                in_row = offs < n_cols
                g = tl.load(grad_row + offs, mask=in_row, other=0.0).to(tl.float32)
                tl.store(grad_row + offs, (g * scale).to(grad_ptr.dtype.element_ty), mask=in_row)


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    block = min(MAX_BLOCK_SIZE, next_power_of_2(n_cols))
    # One warp per 1024 elements of the block (32 per thread), at least 4 and at most 8: several
    # programs per SM keep more loads in flight than one program of 32 warps.
    return block, max(4, min(8, block // 1024))


# ---------------------------------------------------------------------------------------------
# Row statistics and gradient: the building blocks shared with fused_linear_cross_entropy / ppl
# ---------------------------------------------------------------------------------------------


class RowStats:
    """Per-row fp32 statistics of a logits block (local shard, or global after all-reduce)."""

    __slots__ = ("max", "sumexp", "target_logit", "logit_sum")

    def __init__(self, max_, sumexp, target_logit, logit_sum):
        self.max, self.sumexp = max_, sumexp
        self.target_logit, self.logit_sum = target_logit, logit_sum

    def lse(self) -> torch.Tensor:
        return self.max + torch.log(self.sumexp)


def _empty_stats(n_rows: int, device: torch.device, with_logit_sum: bool) -> RowStats:
    def make():
        return torch.empty(n_rows, dtype=torch.float32, device=device)

    return RowStats(make(), make(), make(), make() if with_logit_sum else None)


def _torch_row_chunks(n_rows: int, n_cols: int):
    step = max(1, TORCH_CHUNK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _torch_stats(x: torch.Tensor, target_local: torch.Tensor, with_logit_sum: bool) -> RowStats:
    stats = _empty_stats(x.shape[0], x.device, with_logit_sum)
    n_cols = x.shape[1]
    for rows in _torch_row_chunks(x.shape[0], n_cols):
        xf = x[rows].float()
        row_max = xf.amax(dim=-1)
        stats.max[rows] = row_max
        stats.sumexp[rows] = torch.exp(xf - row_max[:, None]).sum(dim=-1)
        t = target_local[rows]
        in_shard = (t >= 0) & (t < n_cols)
        picked = xf.gather(1, torch.where(in_shard, t, 0)[:, None]).squeeze(1)
        stats.target_logit[rows] = torch.where(in_shard, picked, 0.0)
        if with_logit_sum:
            stats.logit_sum[rows] = xf.sum(dim=-1)
    return stats


def _torch_grad(x, grad, target_local, lse, coef_p, coef_target, coef_const) -> None:
    n_cols = x.shape[1]
    for rows in _torch_row_chunks(x.shape[0], n_cols):
        xf = x[rows].float()
        g = coef_p[rows, None] * torch.exp(xf - lse[rows, None]) + coef_const[rows, None]
        t = target_local[rows]
        in_shard = (t >= 0) & (t < n_cols)
        idx = torch.where(in_shard, t, 0)[:, None]
        g.scatter_add_(1, idx, torch.where(in_shard, coef_target[rows], 0.0)[:, None])
        grad[rows] = g.to(grad.dtype)


def local_row_stats(
    x: torch.Tensor, target_local: torch.Tensor, with_logit_sum: bool, backend: str
) -> RowStats:
    """Statistics of the local vocabulary shard ``x`` [rows, V_local] (any float dtype).

    ``target_local`` [rows] int64 is the target id minus the shard's first id (out-of-shard and
    ignored targets give ``target_logit = 0``).
    """
    if backend == "torch":
        return _torch_stats(x, target_local, with_logit_sum)
    stats = _empty_stats(x.shape[0], x.device, with_logit_sum)
    block, warps = _block_and_warps(x.shape[1])
    launch(
        _ce_stats_kernel,
        (x.shape[0],),
        x.device,
        x,
        x.stride(0),
        target_local,
        stats.max,
        stats.sumexp,
        stats.target_logit,
        stats.logit_sum if with_logit_sum else stats.max,
        x.shape[1],
        HAS_LOGIT_SUM=with_logit_sum,
        BLOCK=block,
        num_warps=warps,
    )
    return stats


def write_row_grad(x, grad, target_local, lse, coef_p, coef_target, coef_const, backend) -> None:
    """``grad = coef_p * softmax(x; lse) + coef_const + coef_target * onehot(target_local)``.

    All coefficients are fp32 per row; ``grad`` may be ``x`` itself (in place).
    """
    if backend == "torch":
        _torch_grad(x, grad, target_local, lse, coef_p, coef_target, coef_const)
        return
    block, warps = _block_and_warps(x.shape[1])
    launch(
        _ce_grad_kernel,
        (x.shape[0],),
        x.device,
        x,
        x.stride(0),
        grad,
        grad.stride(0),
        target_local,
        lse,
        coef_p,
        coef_target,
        coef_const,
        x.shape[1],
        BLOCK=block,
        num_warps=warps,
    )


def _fused_stats_and_grad(
    x, grad, target_local, coef_p, coef_target, coef_const, with_logit_sum, backend
) -> RowStats:
    if backend == "torch":
        stats = _torch_stats(x, target_local, with_logit_sum)
        _torch_grad(x, grad, target_local, stats.lse(), coef_p, coef_target, coef_const)
        return stats
    stats = _empty_stats(x.shape[0], x.device, with_logit_sum)
    block, warps = _block_and_warps(x.shape[1])
    launch(
        _ce_fused_kernel,
        (x.shape[0],),
        x.device,
        x,
        x.stride(0),
        grad,
        grad.stride(0),
        target_local,
        stats.max,
        stats.sumexp,
        stats.target_logit,
        stats.logit_sum if with_logit_sum else stats.max,
        coef_p,
        coef_target,
        coef_const,
        x.shape[1],
        HAS_LOGIT_SUM=with_logit_sum,
        BLOCK=block,
        num_warps=warps,
    )
    return stats


def scale_rows(grad: torch.Tensor, scale: torch.Tensor, backend: str) -> None:
    """``grad[i, :] *= scale[i]`` in place (``scale``: fp32, one value per row, or a 0-dim
    tensor for all rows); the same rounding as ``grad.mul_(scale[:, None])``. On the Triton
    path rows whose scale is exactly 1 are skipped on the device.

    torch's own ``mul_`` of a bf16 tensor by a broadcast fp32 column runs at 0.96 TB/s on an
    H200 (4.4 ms for 8192 x 128256); the kernel streams at 3.7 TB/s (1.14 ms).
    """
    if backend == "torch":
        # A dimensioned fp32 operand makes torch compute in fp32 (a 0-dim one would not).
        grad.mul_(scale.expand(grad.shape[0])[:, None])
        return
    block, warps = _block_and_warps(grad.shape[1])
    launch(
        _scale_rows_kernel,
        (grad.shape[0],),
        grad.device,
        grad,
        grad.stride(0),
        scale,
        0 if scale.dim() == 0 else scale.stride(0),
        grad.shape[1],
        BLOCK=block,
        num_warps=warps,
    )


def _rescale_factor(old_max: torch.Tensor, new_max: torch.Tensor) -> torch.Tensor:
    """``exp(old_max - new_max)``, 0 where both are -inf (a block of all -inf logits adds 0
    to the sum of exps instead of NaN)."""
    return torch.exp(torch.nan_to_num(old_max - new_max, nan=float("-inf")))


def merge_row_stats(a: RowStats, b: RowStats) -> RowStats:
    """Statistics of the concatenation of two disjoint column blocks of the same rows.

    The online-softmax combination used across vocabulary chunks on one rank (out-of-block
    targets contribute a target logit of 0, so the target logits simply add).
    """
    new_max = torch.maximum(a.max, b.max)
    sumexp = a.sumexp * _rescale_factor(a.max, new_max) + b.sumexp * _rescale_factor(b.max, new_max)
    logit_sum = None if a.logit_sum is None else a.logit_sum + b.logit_sum
    return RowStats(new_max, sumexp, a.target_logit + b.target_logit, logit_sum)


def allreduce_row_stats(stats: RowStats, group) -> RowStats:
    """Combine shard statistics across the TP group: one MAX all-reduce, one fused SUM."""
    if group is None or dist.get_world_size(group) == 1:
        return stats
    global_max = stats.max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # Rescale each shard's sum of exps to the global max before summing.
    scale = _rescale_factor(stats.max, global_max)
    parts = [stats.sumexp * scale, stats.target_logit]
    if stats.logit_sum is not None:
        parts.append(stats.logit_sum)
    packed = torch.stack(parts)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    logit_sum = packed[2] if stats.logit_sum is not None else None
    return RowStats(global_max, packed[0], packed[1], logit_sum)


def smoothing_coefficient(label_smoothing: float, vocab_size: int) -> float:
    """Megatron's ``alpha * K / (K - 1)``: the weight moved from the target to the uniform."""
    if label_smoothing == 0.0:
        return 0.0
    return label_smoothing * vocab_size / (vocab_size - 1)


def token_cross_entropy(stats: RowStats, smoothing: float, vocab_size: int) -> torch.Tensor:
    """Unweighted per-token loss from *global* statistics (fp32)."""
    lse = stats.lse()
    if smoothing == 0.0:
        return lse - stats.target_logit
    return lse - (1.0 - smoothing) * stats.target_logit - (smoothing / vocab_size) * stats.logit_sum


def resolve_tp_group(tp_group):
    """``tp_group`` if given, else megatron-core's TP group when it spans more than one rank."""
    if tp_group is not None:
        return tp_group
    # Importing megatron-core costs seconds; if nobody imported parallel_state, it cannot be
    # initialised. (The GPU benchmark image has no megatron-core at all.)
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is None:
        return None
    if (
        parallel_state.model_parallel_is_initialized()
        and parallel_state.get_tensor_model_parallel_world_size() > 1
    ):
        return parallel_state.get_tensor_model_parallel_group()
    return None


def vocab_shard(n_local: int, group) -> tuple[int, int]:
    """(first global id of this rank's shard, global vocabulary size); Megatron's even split."""
    if group is None:
        return 0, n_local
    return dist.get_rank(group) * n_local, n_local * dist.get_world_size(group)


def check_targets(target: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise on target ids outside ``[0, vocab_size)`` (other than ``ignore_index``).

    Checked for CPU tensors only: on CUDA the check would synchronise the stream every step
    (megatron-core does not check either); there such ids contribute a target logit of 0.
    """
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab_size))
    if bool(bad.any()):
        first = int(torch.nonzero(bad.reshape(-1))[0])
        raise ValueError(
            f"{int(bad.sum())} target ids lie outside the vocabulary [0, {vocab_size}); the first "
            f"is {int(target.reshape(-1)[first])} at flat position {first}. Mark tokens without "
            f"a loss with ignore_index={ignore_index} or fix the vocabulary size."
        )


def token_weights(
    target: torch.Tensor, ignore_index: int, loss_mask: torch.Tensor | None
) -> torch.Tensor:
    """fp32 weight per token: 0 for ``ignore_index``, times ``loss_mask`` when given."""
    weights = (target != ignore_index).to(torch.float32)
    if loss_mask is not None:
        weights = weights * loss_mask.reshape(-1).to(torch.float32)
    return weights


def reduction_scale(weights: torch.Tensor, reduction: str) -> torch.Tensor:
    """Scalar tensor c with reduced = c * sum_i(w_i * loss_i); no host sync."""
    if reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=weights.device)
    denom = weights.sum()
    return torch.where(denom > 0, 1.0 / denom.clamp_min(1e-30), torch.zeros_like(denom))


def reduce_tokens(per_token: torch.Tensor, reduction: str, scale: torch.Tensor, shape):
    if reduction == "none":
        return per_token.view(shape)
    return per_token.sum() * scale


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits,
        target,
        loss_mask,
        group,
        ignore_index,
        label_smoothing,
        z_loss_weight,
        reduction,
        inplace_backward,
        backend,
    ):
        shape = target.shape
        x = logits.reshape(-1, logits.shape[-1])
        if x.stride(-1) != 1:
            x = x.contiguous()
        target = target.reshape(-1)
        n_local = x.shape[1]
        vocab_start, vocab_size = vocab_shard(n_local, group)
        smoothing = smoothing_coefficient(label_smoothing, vocab_size)
        with_logit_sum = smoothing > 0.0

        valid = target != ignore_index
        # Ignored rows get -1 so an ignore_index that happens to lie in the vocab range never
        # selects a logit.
        target_local = torch.where(valid, target - vocab_start, -1).to(torch.int64).contiguous()
        weights = token_weights(target, ignore_index, loss_mask)
        scale = reduction_scale(weights, reduction)

        needs_grad = ctx.needs_input_grad[0]
        grad = None
        if needs_grad:
            coef_p = (weights * scale).contiguous()
            coef_target = -(1.0 - smoothing) * coef_p
            coef_const = -(smoothing / vocab_size) * coef_p
            # detach(): the saved buffer must not be an autograd view of the input.
            grad = x.detach() if inplace_backward else torch.empty_like(x)
            if group is None:
                stats = _fused_stats_and_grad(
                    x, grad, target_local, coef_p, coef_target, coef_const, with_logit_sum, backend
                )
            else:
                stats = allreduce_row_stats(
                    local_row_stats(x, target_local, with_logit_sum, backend), group
                )
                write_row_grad(
                    x, grad, target_local, stats.lse(), coef_p, coef_target, coef_const, backend
                )
        else:
            stats = allreduce_row_stats(
                local_row_stats(x, target_local, with_logit_sum, backend), group
            )

        lse = stats.lse()
        loss = reduce_tokens(
            token_cross_entropy(stats, smoothing, vocab_size) * weights, reduction, scale, shape
        )
        ctx.set_materialize_grads(False)
        ctx.logits_shape = logits.shape
        ctx.reduction = reduction
        ctx.smoothing, ctx.vocab_size, ctx.z_loss_weight = smoothing, vocab_size, z_loss_weight
        ctx.backend = backend
        ctx.save_for_backward(grad, lse, target_local, weights, scale)
        if z_loss_weight > 0.0:
            z_loss = reduce_tokens(z_loss_weight * lse.square() * weights, reduction, scale, shape)
            return loss, z_loss
        return loss

    @staticmethod
    def backward(ctx, grad_loss, grad_z_loss=None):
        grad, lse, target_local, weights, scale = ctx.saved_tensors
        if grad_loss is None and grad_z_loss is None:
            return (None,) * 10

        def per_row(g):
            if g is None:
                return torch.zeros_like(lse)
            g = g.reshape(-1).float() if ctx.reduction == "none" else g.float().expand_as(lse)
            return g

        # Backward runs once (as Megatron's fused loss): the saved buffer becomes the result.
        if grad_z_loss is None or ctx.z_loss_weight == 0.0:
            if grad_loss is None:
                grad.zero_()
            else:
                g = grad_loss.float()
                g = g.reshape(-1).contiguous() if ctx.reduction == "none" else g.reshape(())
                scale_rows(grad, g, ctx.backend)
        else:
            g_loss = per_row(grad_loss)
            # The buffer holds G = w c (softmax - (1-s) onehot - s/K), so softmax is recoverable
            # and the z-loss gradient 2 zw lse w c softmax folds into one per-row affine map.
            zscale = 2.0 * ctx.z_loss_weight * lse * per_row(grad_z_loss)
            beta = zscale * weights * scale
            grad.mul_((g_loss + zscale)[:, None])
            if ctx.smoothing > 0.0:
                grad.add_((beta * (ctx.smoothing / ctx.vocab_size))[:, None])
            in_shard = (target_local >= 0) & (target_local < grad.shape[1])
            rows = torch.nonzero(in_shard).squeeze(1)
            grad[rows, target_local[rows]] += (beta[rows] * (1.0 - ctx.smoothing)).to(grad.dtype)
        return (grad.view(ctx.logits_shape),) + (None,) * 9


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group=None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    reduction: Reduction = "none",
    loss_mask: torch.Tensor | None = None,
    *,
    inplace_backward: bool = False,
    backend: Backend = "auto",
):
    """Cross-entropy of vocab-sharded logits, forward and backward in one pass over the logits.

    Args:
        logits: ``[..., V_local]`` in any float dtype (bf16 is accumulated in fp32). Rank ``r`` of
            the TP group holds global vocabulary ids ``[r * V_local, (r + 1) * V_local)``.
        target: ``[...]`` global token ids (int); ``ignore_index`` marks tokens without a loss.
        tp_group: the tensor-parallel process group. ``None`` uses megatron-core's TP group when
            ``parallel_state`` is initialised with TP > 1, else no vocab parallelism.
        label_smoothing: Megatron's ``alpha`` in ``[0, 1)``.
        z_loss_weight: when > 0 also return ``z_loss = weight * logsumexp^2`` (reduced like the
            loss); it is *not* added to ``loss`` and gets its own gradient.
        reduction: ``"none"`` (per-token fp32 tensor shaped like ``target``), ``"sum"`` or
            ``"mean"`` (over tokens with nonzero weight; 0 when there are none).
        loss_mask: ``[...]`` float or bool weights per token (Megatron's ``loss_mask``); the
            per-token output is already multiplied by it.
        inplace_backward: write the gradient into ``logits``' storage instead of a new buffer
            (saves ``N x V_local`` elements). Only when nothing else reads the logits afterwards.
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else torch),
            ``"triton"`` or ``"torch"``.

    Returns:
        ``loss`` (fp32), or ``(loss, z_loss)`` when ``z_loss_weight > 0``. Call backward at most
        once through it (the saved gradient buffer is scaled in place).
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be target {tuple(target.shape)} + [V_local]"
        )
    if target.dtype.is_floating_point:
        raise TypeError(f"target must hold integer token ids, got {target.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if z_loss_weight < 0.0:
        raise ValueError(f"z_loss_weight must be >= 0, got {z_loss_weight}")
    if loss_mask is not None and loss_mask.shape != target.shape:
        raise ValueError(
            f"loss_mask {tuple(loss_mask.shape)} must have target's shape {tuple(target.shape)}"
        )
    group = resolve_tp_group(tp_group)
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    check_targets(target, vocab_shard(logits.shape[-1], group)[1], ignore_index)
    return _VocabParallelCrossEntropy.apply(
        logits,
        target,
        loss_mask,
        group,
        ignore_index,
        float(label_smoothing),
        float(z_loss_weight),
        reduction,
        inplace_backward,
        resolve_backend(backend, logits.device),
    )


def cross_entropy_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    reduction: Reduction = "none",
    loss_mask: torch.Tensor | None = None,
):
    """Plain-autograd torch reference over the FULL vocabulary (same semantics, fp32 math)."""
    x = logits.float()
    vocab_size = x.shape[-1]
    lse = torch.logsumexp(x, dim=-1)
    valid = target != ignore_index
    target_logit = x.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    loss = lse - target_logit
    smoothing = smoothing_coefficient(label_smoothing, vocab_size)
    if smoothing > 0.0:
        mean_log_prob = x.mean(dim=-1) - lse
        loss = (1.0 - smoothing) * loss - smoothing * mean_log_prob
    weights = valid.float()
    if loss_mask is not None:
        weights = weights * loss_mask.float()
    z_loss = z_loss_weight * lse.square() * weights
    loss = loss * weights
    if reduction == "sum":
        loss, z_loss = loss.sum(), z_loss.sum()
    elif reduction == "mean":
        denom = weights.sum()
        scale = torch.where(denom > 0, 1.0 / denom.clamp_min(1e-30), torch.zeros_like(denom))
        loss, z_loss = loss.sum() * scale, z_loss.sum() * scale
    return (loss, z_loss) if z_loss_weight > 0.0 else loss
