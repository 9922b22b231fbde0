"""Training throughput of the Llama-3 GPTModel: tokens/s, TFLOP/s per device and MFU.

    python benchmarks/train_throughput.py                      # GPU: tinyllama-1.1b + llama3-1b, seq 4096, bf16
    python benchmarks/train_throughput.py --device cpu         # CPU: the tiny preset, seq 256, fp32
    python benchmarks/train_throughput.py --output benchmarks/results/train_throughput.md

One process, one device, the full training step of pretrain_llama3_syne.py (DDP wrapper,
megatron-core AdamW with fp32 main weights, gradient clipping, local layer spec with torch SDPA)
on random tokens. The first ``--warmup`` steps are not timed. FLOPs use the PaLM/torchtitan
convention of megatron_syne.training.metrics (6N + 12 L H D S per token).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_syne.models.presets import get_preset  # noqa: E402
from megatron_syne.training.arguments import TrainArgs  # noqa: E402
from megatron_syne.training.metrics import detect_peak_tflops, training_flops_per_token  # noqa: E402
from megatron_syne.utils.io import atomic_open  # noqa: E402


class RandomTokens:
    """``dataset[i]`` -> a GPT sample of random token ids (deterministic in i)."""

    def __init__(self, seq_length: int, vocab_size: int):
        self.seq_length, self.vocab_size = seq_length, vocab_size

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        text = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=generator)
        return {
            "tokens": text[:-1],
            "labels": text[1:],
            "loss_mask": torch.ones(self.seq_length),
            "position_ids": torch.arange(self.seq_length),
        }


def measure(model_name: str, options: argparse.Namespace) -> dict:
    from megatron_syne.training.loop import build_model, build_optimizer, train_step

    args = TrainArgs(
        model=model_name,
        device=options.device,
        seq_length=options.seq_length,
        max_position_embeddings=max(
            options.seq_length, get_preset(model_name).max_position_embeddings
        ),
        micro_batch_size=options.micro_batch_size,
        global_batch_size=options.micro_batch_size * options.grad_accum,
        train_iters=options.warmup + options.steps,
        bf16=options.bf16,
        lr=1e-5,
        mock_data=True,
        cross_entropy_loss_fusion=options.cross_entropy_fusion is not None,
        cross_entropy_fusion_impl=options.cross_entropy_fusion or "native",
    )
    model_chunks = build_model(args)
    optimizer = build_optimizer(args, model_chunks)
    dataset = RandomTokens(args.seq_length, args.preset.vocab_size)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if args.device == "cuda"
        else torch.device("cpu")
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    losses = []
    consumed = 0
    for step in range(options.warmup + options.steps):
        if step == options.warmup:
            sync()
            start = time.perf_counter()
        result = train_step(args, model_chunks, optimizer, dataset, consumed, device)
        losses.append(result.loss)
        consumed += args.global_batch_size
    sync()
    elapsed = time.perf_counter() - start
    tokens_per_second = options.steps * args.tokens_per_step / elapsed
    flops = training_flops_per_token(args.preset, args.seq_length, args.padded_vocab_size)
    tflops = tokens_per_second * flops / 1e12
    peak = detect_peak_tflops(args.device)
    memory = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    del model_chunks, optimizer
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {
        "model": model_name,
        "params": args.preset.num_parameters,
        "seq": args.seq_length,
        "batch": f"{args.micro_batch_size}x{options.grad_accum}",
        "dtype": "bf16" if args.bf16 else "fp32",
        "step_s": elapsed / options.steps,
        "tokens_per_s": tokens_per_second,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "memory_gib": memory,
        "final_loss": losses[-1],
    }


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU ({platform.processor() or platform.machine()}, {cores} cores, {torch.get_num_threads()} threads)"


def to_markdown(rows: list[dict], device: str, options: argparse.Namespace) -> str:
    header = (
        "| model | params | seq | micro x accum | dtype | step (s) | tokens/s | TFLOP/s | MFU | peak mem (GiB) |\n"
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['memory_gib']:.1f}" if r["memory_gib"] is not None else "n/a"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:,.1f}M | {r['seq']} | {r['batch']} | {r['dtype']} | "
            f"{r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.3f} | {mfu} | {mem} |"
        )
    return (
        f"Device: {device}. torch {torch.__version__}. {options.steps} timed steps after "
        f"{options.warmup} warm-up steps; local layer spec (torch SDPA), megatron-core AdamW.\n\n"
        + header
        + "\n".join(lines)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--models", nargs="+", default=None, help="presets (default: GPU pair, or tiny on CPU)"
    )
    parser.add_argument(
        "--seq-length", type=int, default=None, help="default 4096 on GPU, 256 on CPU"
    )
    parser.add_argument(
        "--micro-batch-size", type=int, default=None, help="default 2 on GPU, 1 on CPU"
    )
    parser.add_argument("--grad-accum", type=int, default=1, help="micro batches per step")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 10 GPU, 5 CPU)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 on GPU")
    parser.add_argument(
        "--cross-entropy-fusion", choices=["native", "te", "syne", "syne-linear"], default=None
    )
    parser.add_argument("--output", default=None, help="write the table (markdown) here")
    options = parser.parse_args(argv)
    gpu = options.device == "cuda"
    options.models = options.models or (["tinyllama-1.1b", "llama3-1b"] if gpu else ["tiny"])
    options.seq_length = options.seq_length or (4096 if gpu else 256)
    options.micro_batch_size = options.micro_batch_size or (2 if gpu else 1)
    options.steps = options.steps or (10 if gpu else 5)
    options.bf16 = gpu and not options.fp32

    from megatron_syne.training.distributed import initialize_distributed

    initialize_distributed(options.device, 1, 1, seed=1234)
    rows = []
    for name in options.models:
        row = measure(name, options)
        rows.append(row)
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        print(
            f"{name}: {row['tokens_per_s']:,.0f} tokens/s, {row['tflops']:.3f} TFLOP/s, MFU {mfu}",
            flush=True,
        )
    table = to_markdown(rows, device_name(options.device), options)
    print(table)
    if options.output:
        with atomic_open(options.output) as f:
            f.write("# Training throughput (benchmarks/train_throughput.py)\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
