"""Quick-start: train the tiny Llama-3 preset on CPU and plot its loss curve.

    python examples/quickstart/run_demo.py --output-dir demo_output      # (what `make demo` runs)

Trains ``--model tiny`` for a few hundred steps in this process (world size 1, gloo, the same
code path as ``torchrun pretrain_llama3_syne.py``) on megatron-core's mock GPT data, which is
learnable (each document counts up through the vocabulary), so the loss falls visibly within
minutes on two cores. Writes under ``--output-dir``: ``checkpoints/`` (torch_dist), ``tensorboard/``,
``metrics.jsonl`` and ``loss_curve.png``, then prints a summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_syne.training.arguments import parse_args  # noqa: E402
from megatron_syne.utils.io import atomic_path  # noqa: E402


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str) -> tuple[list, list]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, valid = [], []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if isinstance(record.get("train/loss"), float):
            train.append((record["iteration"], record["train/loss"]))
        if isinstance(record.get("eval/valid"), float):
            valid.append((record["iteration"], record["eval/valid"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1.2)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return train, valid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--vocab-size", type=int, default=4096, help="mock-data vocabulary")
    parser.add_argument("--seq-length", type=int, default=128)
    options = parser.parse_args(argv)

    out = Path(options.output_dir).resolve()
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()  # one curve per demo run
    flags = [
        "--device", "cpu", "--model", "tiny", "--vocab-size", str(options.vocab_size),
        "--seq-length", str(options.seq_length), "--micro-batch-size", "4", "--global-batch-size", "4",
        "--train-iters", str(options.steps), "--lr", "3e-3", "--min-lr", "3e-4",
        "--lr-warmup-init", "1e-5", "--lr-warmup-iters", str(max(1, options.steps // 20)),
        "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", str(max(1, options.steps // 5)),
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--mock-data", "--seed", "1234",
        "--log-interval", "10", "--eval-interval", str(max(1, options.steps // 6)), "--eval-iters", "1",
        "--save", str(out / "checkpoints"), "--save-interval", str(options.steps),
        "--tensorboard-dir", str(out / "tensorboard"), "--metrics-jsonl", str(metrics),
    ]  # fmt: skip
    args = parse_args(flags, world_size=1)

    from megatron_syne.training.distributed import destroy_distributed
    from megatron_syne.training.loop import pretrain

    print(f"megatron-syne quick-start: training the '{args.model}' Llama-3 preset on CPU")
    print(f"  python pretrain_llama3_syne.py {' '.join(flags)}\n", flush=True)
    start = time.time()
    try:
        result = pretrain(args)
    finally:
        destroy_distributed()
    elapsed = time.time() - start

    png = out / "loss_curve.png"
    train, valid = plot_loss_curve(
        metrics,
        png,
        f"tiny Llama-3 ({args.preset.num_parameters / 1e6:.1f}M params), mock data, CPU",
    )
    first, last = train[0][1], train[-1][1]
    tokens = result.consumed_samples * args.seq_length
    print("\n==== quick-start summary ====")
    print(f"model            : tiny Llama-3 preset, {args.preset.num_parameters / 1e6:.2f}M parameters "
          f"(vocab {args.preset.vocab_size}, {args.preset.num_layers} layers, GQA {args.preset.num_attention_heads}/"
          f"{args.preset.num_query_groups} heads, RoPE base {args.preset.rotary_base:g})")  # fmt: skip
    print(f"trained          : {result.iteration} steps, {tokens:,} tokens in {elapsed:.0f} s "
          f"({tokens / elapsed:,.0f} tokens/s), {result.skipped_steps} skipped steps")  # fmt: skip
    print(
        f"training loss    : {first:.3f} -> {last:.3f} (uniform guess: {math.log(args.preset.vocab_size):.3f})"
    )
    if valid:
        print(f"validation loss  : {valid[0][1]:.3f} -> {valid[-1][1]:.3f}")
    print(f"loss curve (PNG) : {png}")
    print(f"checkpoint       : {result.checkpoints[-1] if result.checkpoints else 'none'}")
    print(
        f"metrics          : {metrics}  (TensorBoard: tensorboard --logdir {out / 'tensorboard'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
