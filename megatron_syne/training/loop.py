"""The training loop: read top to bottom.

``pretrain(args)`` = set up (processes, model, optimizer, schedule, data, checkpoint), then for
each optimizer step: forward/backward over the micro batches, skip the step if the loss or the
gradient is not finite, otherwise clip and update; then hooks, logging, evaluation, saving.

Everything that decides which sample is trained when is ``consumed_samples`` (saved in every
checkpoint) plus what hooks keep in their checkpointed state, so a resumed run continues
exactly where the uninterrupted one would be.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from megatron_syne.models.init import initialize_weights_layout_invariant
from megatron_syne.models.llama3 import build_gpt_model, transformer_config_from_preset
from megatron_syne.training.arguments import TrainArgs, args_to_dict
from megatron_syne.training.checkpointing import load_checkpoint, save_checkpoint
from megatron_syne.training.data import (
    build_train_valid_test_datasets,
    micro_batches,
    sample_indices_for_step,
)
from megatron_syne.training.distributed import initialize_distributed
from megatron_syne.training.hooks import TrainingHook, TrainingState, check_unique_names
from megatron_syne.training.metrics import (
    MetricWriter,
    StepTimer,
    detect_peak_tflops,
    training_flops_per_token,
)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    """Summary of a finished ``pretrain`` call (on every rank)."""

    iteration: int
    consumed_samples: int
    skipped_steps: int
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> mean loss of that step
    eval_losses: dict[int, dict[str, float]] = field(default_factory=dict)
    checkpoints: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def build_model(args: TrainArgs) -> list[torch.nn.Module]:
    """This rank's model chunk, initialised layout-independently, wrapped for DP (one chunk)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.transformer.module import Float16Module

    overrides = dict(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        calculate_per_token_loss=True,
        # Must stay True: megatron-core only marks tensor-parallel params (which the grad norm
        # and checkpoint code rely on) inside its init; our init then overwrites the values.
        perform_initialization=True,
        cross_entropy_loss_fusion=args.cross_entropy_loss_fusion,
    )
    if args.fp8_format is not None:
        overrides["fp8"] = args.fp8_format
    config = transformer_config_from_preset(args.preset, **overrides)
    # megatron-core's config only knows native/te; the loss seam reads the attribute directly.
    config.cross_entropy_fusion_impl = args.cross_entropy_fusion_impl

    model = build_gpt_model(
        args.preset,
        config,
        transformer_impl=args.transformer_impl,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        vocab_size=args.padded_vocab_size,
    )
    if args.device == "cuda":
        model.cuda(torch.cuda.current_device())
    initialize_weights_layout_invariant(
        [model], args.seed, config.init_method_std, config.num_layers
    )
    if args.bf16:
        model = Float16Module(config, model)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    model.broadcast_params()
    config.finalize_model_grads_func = finalize_model_grads
    return [model]


def build_optimizer(args: TrainArgs, model_chunks):
    """AdamW (decoupled weight decay; none on norms) with fp32 main weights."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    for chunk in model_chunks:
        chunk.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(args: TrainArgs, optimizer):
    """megatron-core's scheduler; its unit is samples, so iterations x global batch."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = args.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=args.lr_wsd_decay_iters * gbs,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )


# ---------------------------------------------------------------------------------------------
# Forward/backward
# ---------------------------------------------------------------------------------------------


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of masked token losses; the schedule divides gradients by the global token count
    (``calculate_per_token_loss``), so the step optimises the mean over all tokens of the
    global batch, whatever the DP size or micro-batch split."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(per_token_loss.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token_loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return per_token_loss, partial(_loss_func, batch["loss_mask"])


def _global_loss_sum_and_tokens(losses_reduced: list[dict], device) -> tuple[float, float]:
    """(sum of token losses, number of tokens) over the whole global batch, on every rank."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage():
        for item in losses_reduced:
            total += item["lm loss"].to(device=device, dtype=torch.float64)
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total[0]), float(total[1])


def _run_microbatches(
    args, model_chunks, dataset, index_lists, device, forward_only, num_samples=None
):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterator = micro_batches(dataset, index_lists, device, num_samples=num_samples)
    return get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterator,
        model=model_chunks,
        num_microbatches=len(index_lists),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=forward_only,
    )


@dataclass
class StepResult:
    loss: float  # mean token loss of the global batch (nan/inf when non-finite)
    tokens: float
    grad_norm: float
    skipped: bool


def train_step(args, model_chunks, optimizer, dataset, consumed_samples: int, device) -> StepResult:
    """One optimizer step on the global batch that starts at ``consumed_samples``."""
    from megatron.core import parallel_state as ps

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()

    index_lists = sample_indices_for_step(
        consumed_samples,
        args.global_batch_size,
        args.micro_batch_size,
        ps.get_data_parallel_rank(),
        ps.get_data_parallel_world_size(),
    )
    losses = _run_microbatches(args, model_chunks, dataset, index_lists, device, forward_only=False)
    loss_sum, tokens = _global_loss_sum_and_tokens(losses, device)
    loss = loss_sum / max(tokens, 1.0)

    # Decide on every rank from all-reduced numbers, so all ranks skip or step together.
    optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return StepResult(loss=loss, tokens=tokens, grad_norm=grad_norm, skipped=True)
    updated, clipped_norm, _ = optimizer.step()
    if not updated:
        return StepResult(loss=loss, tokens=tokens, grad_norm=grad_norm, skipped=True)
    return StepResult(
        loss=loss, tokens=tokens, grad_norm=float(clipped_norm or grad_norm), skipped=False
    )


@torch.no_grad()
def evaluate_loss(model_chunks, dataset, num_samples: int, micro_batch_size: int = 1) -> float:
    """Mean per-token loss on samples ``0..num_samples-1`` of ``dataset`` (forward only).

    DP/TP/PP aware: samples are spread over data-parallel ranks in micro batches of
    ``micro_batch_size``; the last, partial round is padded with masked-out samples. Every rank
    must call it with the same arguments; all get the same value. The dataset's samples must
    have the training sequence length. Returns nan for an empty request.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    num_samples = min(num_samples, len(dataset))
    if num_samples <= 0:
        return float("nan")
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_round = micro_batch_size * dp_size
    rounds = math.ceil(num_samples / per_round)
    index_lists = sample_indices_for_step(0, rounds * per_round, micro_batch_size, dp_rank, dp_size)
    device = next(model_chunks[0].parameters()).device
    seq_length = int(torch.as_tensor(dataset[0]["tokens"]).numel())

    for chunk in model_chunks:
        chunk.eval()
    try:
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=micro_batches(dataset, index_lists, device, num_samples=num_samples),
            model=model_chunks,
            num_microbatches=len(index_lists),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    finally:
        for chunk in model_chunks:
            chunk.train()
    loss_sum, tokens = _global_loss_sum_and_tokens(losses, device)
    return loss_sum / tokens if tokens > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def pretrain(args: TrainArgs, hooks: list[TrainingHook] | None = None) -> TrainResult:
    """Train according to ``args``; ``hooks`` join the hooks the data source brings."""
    # -- processes, model, optimizer, schedule --------------------------------------------------
    info = initialize_distributed(
        args.device,
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.context_parallel_size,
        seed=args.seed,
    )
    writer = MetricWriter(info.rank == 0, args.tensorboard_dir, args.metrics_jsonl)
    model_chunks = build_model(args)
    optimizer = build_optimizer(args, model_chunks)
    scheduler = build_scheduler(args, optimizer)
    n_params = sum(p.numel() for c in model_chunks for p in c.parameters())
    writer.text(
        f"> model {args.model}: {args.preset.num_parameters / 1e6:.2f}M parameters "
        f"({n_params / 1e6:.2f}M on rank 0) | TP={args.tensor_model_parallel_size} "
        f"PP={args.pipeline_model_parallel_size} DP={info.data_parallel_size} on {args.device} | "
        f"global batch {args.global_batch_size} x {args.seq_length} tokens, "
        f"{args.num_microbatches} micro batches of {args.micro_batch_size} per DP rank"
    )

    # -- data ----------------------------------------------------------------------------------
    data = build_train_valid_test_datasets(args)
    hooks = [*(hooks or []), *data.hooks]
    check_unique_names(hooks)

    # -- resume --------------------------------------------------------------------------------
    iteration = consumed_samples = skipped_total = 0
    if args.load is not None:
        loaded = None
        if os.path.isdir(args.load):  # absent only when --load = --save on a first run
            loaded = load_checkpoint(
                args.load,
                model_chunks,
                optimizer,
                scheduler,
                load_optim=not args.no_load_optim,
                load_rng=not args.no_load_rng,
            )
        if loaded is None:
            writer.text(f"> no checkpoint in {args.load} yet: starting from scratch")
        else:
            if not args.finetune:
                iteration = loaded.iteration
                # Converted base weights (tools/checkpoint) carry no training counters.
                consumed_samples = int(loaded.common.get("consumed_samples", 0))
                skipped_total = int(loaded.common.get("skipped_steps", 0))
                saved_hooks = loaded.common.get("hooks", {})
                for hook in hooks:
                    if hook.name in saved_hooks:
                        hook.load_state_dict(saved_hooks[hook.name])
            writer.text(
                f"> loaded {loaded.directory} (iteration {loaded.iteration}; optimizer "
                f"{'restored' if loaded.loaded_optimizer else 'NOT restored'}; RNG "
                f"{'restored' if loaded.loaded_rng else 'NOT restored (--no-load-rng or another layout)'})"
                + ("; --finetune: counters reset to 0" if args.finetune else "")
            )

    def evaluate(dataset, num_samples: int) -> float:
        return evaluate_loss(model_chunks, dataset, num_samples, args.micro_batch_size)

    state = TrainingState(
        iteration=iteration,
        consumed_samples=consumed_samples,
        consumed_tokens=consumed_samples * args.seq_length,
        model_chunks=model_chunks,
        args=args,
        evaluate=evaluate,
        train_dataset=data.train,
        skipped_steps=skipped_total,
    )
    for hook in hooks:
        hook.on_train_start(state)

    # -- steps ---------------------------------------------------------------------------------
    result = TrainResult(
        iteration=iteration, consumed_samples=consumed_samples, skipped_steps=skipped_total
    )
    flops_per_token = training_flops_per_token(args.preset, args.seq_length, args.padded_vocab_size)
    peak_tflops = args.peak_tflops or detect_peak_tflops(args.device)
    timer = StepTimer()
    timer.reset()
    window = _LogWindow()
    consecutive_skips = 0
    saved_at = None

    optimizer_sharding = None
    if args.use_distributed_optimizer:
        fully = args.dist_ckpt_optim_fully_reshardable
        optimizer_sharding = "fully_reshardable" if fully else "dp_reshardable"

    def save(step: int) -> None:
        nonlocal saved_at
        common = {
            "consumed_samples": state.consumed_samples,
            "consumed_tokens": state.consumed_tokens,
            "skipped_steps": state.skipped_steps,
            "args": args_to_dict(args),
            "hooks": {hook.name: hook.state_dict() for hook in hooks},
        }
        path = save_checkpoint(
            args.save, step, model_chunks, optimizer, scheduler, common, optimizer_sharding
        )
        result.checkpoints.append(str(path))
        saved_at = step
        writer.text(f"> saved checkpoint {path}")

    while iteration < args.train_iters:
        learning_rate = optimizer.param_groups[0]["lr"]
        step = train_step(args, model_chunks, optimizer, data.train, consumed_samples, info.device)
        iteration += 1
        consumed_samples += args.global_batch_size
        if step.skipped:
            skipped_total += 1
            consecutive_skips += 1
            writer.text(
                f"> iteration {iteration}: non-finite loss ({step.loss}) or grad norm "
                f"({step.grad_norm}); step skipped ({consecutive_skips} in a row, {skipped_total} total)"
            )
        else:
            consecutive_skips = 0
            scheduler.step(increment=args.global_batch_size)
            result.losses[iteration] = step.loss

        state.iteration, state.consumed_samples = iteration, consumed_samples
        state.consumed_tokens = consumed_samples * args.seq_length
        state.last_loss = step.loss if not step.skipped else float("nan")
        state.learning_rate, state.skipped_steps = learning_rate, skipped_total
        for hook in hooks:
            hook.on_step_end(state)

        window.add(step, learning_rate)
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            elapsed = timer.elapsed()
            _log_window(
                writer, args, state, window, elapsed, flops_per_token, peak_tflops, info.world_size
            )
            window = _LogWindow()

        if consecutive_skips >= args.max_consecutive_skipped_steps:
            writer.close()
            raise NonFiniteLossError(
                f"{consecutive_skips} consecutive steps had a non-finite loss or gradient "
                f"(last at iteration {iteration}); stopping. Lower --lr, check the data, or "
                "raise --max-consecutive-skipped-steps"
            )
        if args.eval_interval and (
            iteration % args.eval_interval == 0 or iteration == args.train_iters
        ):
            result.eval_losses[iteration] = _evaluate_all(args, data, evaluate, writer, iteration)
        stop = args.exit_interval is not None and iteration >= args.exit_interval
        if args.save and (
            stop
            or iteration == args.train_iters
            or (args.save_interval and iteration % args.save_interval == 0)
        ):
            save(iteration)
        if stop:
            writer.text(f"> --exit-interval {args.exit_interval} reached at iteration {iteration}")
            break
        if (
            iteration % args.log_interval == 0
            or saved_at == iteration
            or iteration in result.eval_losses
        ):
            timer.reset()  # evaluation and saving do not count as training time

    for hook in hooks:
        hook.on_train_end(state)
    writer.close()
    result.iteration, result.consumed_samples, result.skipped_steps = (
        iteration,
        consumed_samples,
        skipped_total,
    )
    return result


# ---------------------------------------------------------------------------------------------
# Logging and evaluation helpers
# ---------------------------------------------------------------------------------------------


@dataclass
class _LogWindow:
    """Aggregates the steps between two log points."""

    steps: int = 0
    skipped: int = 0
    loss_sum: float = 0.0
    tokens: float = 0.0
    grad_norm: float = float("nan")
    learning_rate: float = 0.0

    def add(self, step: StepResult, learning_rate: float) -> None:
        self.steps += 1
        self.learning_rate = learning_rate
        self.tokens += step.tokens
        if step.skipped:
            self.skipped += 1
            return
        self.loss_sum += step.loss
        self.grad_norm = step.grad_norm


def _log_window(
    writer, args, state, window, elapsed, flops_per_token, peak_tflops, world_size
) -> None:
    trained = window.steps - window.skipped
    loss = window.loss_sum / trained if trained else float("nan")
    tokens_per_step = args.global_batch_size * args.seq_length
    tokens_per_second = window.steps * tokens_per_step / max(elapsed, 1e-9)
    tflops_per_device = tokens_per_second * flops_per_token / world_size / 1e12
    mfu = tflops_per_device / peak_tflops if peak_tflops else None
    values = {
        "train/loss": loss,
        "train/learning_rate": window.learning_rate,
        "train/grad_norm": window.grad_norm,
        "train/tokens_per_second": tokens_per_second,
        "train/tflops_per_device": tflops_per_device,
        "train/mfu": mfu,
        "train/skipped_steps": float(state.skipped_steps),
        "train/consumed_tokens": float(state.consumed_tokens),
        "train/step_time_ms": 1000.0 * elapsed / window.steps,
    }
    values.update(state.metrics)
    state.metrics.clear()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        values["train/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    line = (
        f" iteration {state.iteration:8d}/{args.train_iters:8d} | consumed tokens: {state.consumed_tokens:12d}"
        f" | step time (ms): {values['train/step_time_ms']:8.1f} | lr: {window.learning_rate:.3e}"
        f" | loss: {loss:.6f} | grad norm: {window.grad_norm:.3f} | tokens/s: {tokens_per_second:,.0f}"
        f" | TFLOP/s/device: {tflops_per_device:.2f}"
        + (f" | MFU: {100 * mfu:.1f}%" if mfu is not None else "")
        + f" | skipped: {window.skipped} (total {state.skipped_steps})"
    )
    writer.scalars(state.iteration, values, line)


def _evaluate_all(args, data, evaluate, writer, iteration: int) -> dict[str, float]:
    samples = args.eval_iters * args.global_batch_size
    sets = {}
    if data.valid is not None and samples > 0:
        sets["valid"] = data.valid
    sets.update(data.eval_sets)
    losses = {name: evaluate(dataset, samples) for name, dataset in sets.items()}
    if losses:
        text = " | ".join(
            f"{name} loss: {value:.6f} (ppl {math.exp(min(value, 50)):.2f})"
            for name, value in losses.items()
        )
        writer.scalars(
            iteration,
            {f"eval/{k}": v for k, v in losses.items()},
            f" validation at iteration {iteration} | {text}",
        )
    return losses
