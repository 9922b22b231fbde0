"""Show what a mixture spec will train on, and draw the planned weights.

    python tools/mixture/plan.py examples/llama3_8b/syne.yaml --data-root /data/syne \
        --seq-length 8192 --global-batch-size 256 [--tensorboard-dir RUN/tb] [--png plan.png]

Prints tokens per stage, group, source and topic, and the epochs each component needs (warning
above 1); exits with status 1 (and the reason) when the spec cannot run on the data: a component
with no documents, a PPL curriculum without PPL scores, repetition where it is forbidden; with
status 2 for a bad argument (a non-positive size, a missing --tensorboard-dir).
Lists the rare topics merged into ``<source>/other`` (``min_topic_documents``) with their
document counts.
Writes a PNG of the planned weights over training; with --tensorboard-dir the actual weights of
a run (``mixture/weight/*`` scalars) are overlaid.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_syne.data.metadata import MetadataError  # noqa: E402
from megatron_syne.data.spec import SpecError  # noqa: E402


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="mixture spec YAML")
    parser.add_argument("--data-root", default=None, help="root of relative source paths")
    parser.add_argument("--seq-length", type=_positive_int, required=True, help="tokens per sample")
    parser.add_argument(
        "--global-batch-size", type=_positive_int, required=True, help="samples per iteration"
    )
    parser.add_argument("--png", default=None, help="plot path (default: <spec>.plan.png)")
    parser.add_argument("--tensorboard-dir", default=None, help="overlay a run's actual weights")
    args = parser.parse_args(argv)
    if args.tensorboard_dir is not None and not Path(args.tensorboard_dir).is_dir():
        parser.error(
            f"argument --tensorboard-dir: {args.tensorboard_dir} is not a directory; give the "
            "run's --tensorboard-dir (it holds events.out.tfevents.* files)"
        )

    from megatron_syne.data.mixture_training import plan_from_spec
    from megatron_syne.data.planning import (
        format_report,
        plan_report,
        plot_plan,
        read_tensorboard_weights,
    )

    start = time.time()
    try:
        plan = plan_from_spec(args.spec, args.data_root, args.seq_length, args.global_batch_size)
        report = plan_report(plan)
    except (SpecError, MetadataError) as err:
        print(f"plan.py: error: {err}", file=sys.stderr)
        return 1
    actual = None
    if args.tensorboard_dir:
        try:
            actual = read_tensorboard_weights(args.tensorboard_dir)
        except FileNotFoundError as err:
            print(f"plan.py: error: argument --tensorboard-dir: {err}", file=sys.stderr)
            return 2
    print(format_report(plan, report))
    png = Path(args.png) if args.png else Path(args.spec).with_suffix(".plan.png")
    plot_plan(plan, png, actual)
    merged = sum(len(topics) for _, topics in report.merged_topics.values())
    print(
        f"\nsummary: {len(plan.components)} components, {sum(report.stage_tokens.values()):,} "
        f"tokens, {merged} rare topics merged into <source>/other, {len(report.warnings)} "
        f"warnings; plot {png}; {time.time() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
