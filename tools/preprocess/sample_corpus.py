#!/usr/bin/env python
"""Build the bilingual demo corpus (JSONL: text, lang, source) from installed packages' text.

    python tools/preprocess/sample_corpus.py --output data/demo/corpus.jsonl --target-mb 3

Deterministic: the same --target-mb, --seed and --shares give the same bytes.
"""

from __future__ import annotations

import argparse
import sys

from megatron_syne.preprocess.corpus import DEFAULT_SHARES, CorpusConfig, build_demo_corpus


def share(text: str) -> tuple[str, float]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected SOURCE=FRACTION, got {text!r}")
    source, value = text.split("=", 1)
    return source, float(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", required=True, help="output JSONL file")
    p.add_argument(
        "--target-mb",
        type=float,
        default=3.0,
        help="total text size in MB (1e6 UTF-8 bytes); default 3 (~0.9M Llama-3 tokens)",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--shares",
        nargs="+",
        type=share,
        default=list(DEFAULT_SHARES.items()),
        metavar="SOURCE=FRACTION",
        help="byte share per source (default: "
        + " ".join(f"{k}={v}" for k, v in DEFAULT_SHARES.items())
        + ")",
    )
    args = p.parse_args(argv)
    try:
        config = CorpusConfig(args.output, args.target_mb, args.seed, dict(args.shares))
        summary = build_demo_corpus(config)
    except (ValueError, OSError) as err:  # OSError: an --output that cannot be written
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
