#!/usr/bin/env python
"""Tokenize JSONL / JSONL.gz / JSONL.zst / Parquet into Megatron .bin/.idx + a metadata sidecar.

Flags follow Megatron-LM's tools/preprocess_data.py. Example:

    python tools/preprocess/preprocess_data.py --input 'data/web-cn/*.jsonl.gz' \\
        --output-prefix out/web-cn --workers 16 --append-eod

writes out/web-cn_text_document.{bin,idx,meta.parquet} and out/web-cn.rejects.jsonl. Killed runs
resume from out/web-cn.parts/ when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import sys

from megatron_syne.preprocess.pipeline import (
    CORE_METADATA_KEYS,
    PreprocessConfig,
    PreprocessError,
    run_preprocess,
)
from megatron_syne.preprocess.readers import InputError
from megatron_syne.preprocess.tokenizers import TOKENIZER_TYPES, TokenizerError
from megatron_syne.utils.slurm import slurm_shard_defaults


def key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def build_parser() -> argparse.ArgumentParser:
    slurm_shards, slurm_index = slurm_shard_defaults()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="input files, globs (quote them) or directories; .jsonl, .jsonl.gz, "
        ".jsonl.zst, .parquet",
    )
    g.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="text fields to tokenize; each key gets its own dataset (default: text)",
    )
    g.add_argument(
        "--metadata-keys",
        nargs="+",
        default=list(CORE_METADATA_KEYS),
        help="input fields copied into the metadata sidecar (default: lang source "
        "topic; missing fields are null)",
    )
    g.add_argument(
        "--metadata-defaults",
        nargs="+",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="value for a metadata key when a record lacks it, e.g. source=web-cn",
    )
    g.add_argument(
        "--max-chars",
        type=int,
        default=5_000_000,
        help="reject documents longer than this many characters (default 5,000,000)",
    )
    g.add_argument(
        "--max-reject-fraction",
        type=float,
        default=0.01,
        help="fail when more than this fraction of records is rejected (default 0.01)",
    )
    g.add_argument(
        "--dedup",
        choices=["none", "exact"],
        default="none",
        help="'exact': drop documents whose normalised text hash was seen before",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="Llama3Tokenizer", choices=TOKENIZER_TYPES)
    g.add_argument(
        "--tokenizer-model",
        default=None,
        help="local tokenizer file or directory (default: the packaged Llama-3 one)",
    )
    g.add_argument("--append-eod", action="store_true", help="append the EOD token to each doc")
    g.add_argument("--prepend-bos", action="store_true", help="prepend BOS to each document")
    g = p.add_argument_group("output data")
    g.add_argument(
        "--output-prefix",
        required=True,
        help="writes <prefix>_<key>_document.{bin,idx,meta.parquet}",
    )
    g.add_argument(
        "--keep-partitions",
        action="store_true",
        help="keep the per-unit files in <prefix>.parts/ after the merge",
    )
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="worker processes (one per core)")
    g.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="cut each plain JSONL file into at least this many work units (of at least "
        "64 KiB each, so a small file gets fewer)",
    )
    g.add_argument(
        "--partition-bytes",
        type=int,
        default=64 << 20,
        help="target input bytes per work unit (resume granularity; default 64 MiB)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=512,
        help="documents per native encode_batch call (default 512)",
    )
    g.add_argument(
        "--num-shards",
        type=int,
        default=slurm_shards,
        help="split the input files over this many jobs (default: SLURM_ARRAY_TASK_COUNT, else 1)",
    )
    g.add_argument(
        "--shard-index",
        type=int,
        default=slurm_index,
        help="this job's shard (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)",
    )
    g.add_argument(
        "--log-interval",
        type=int,
        default=100_000,
        help="with --no-progress: print a progress line every this many documents",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ValueError as err:  # a malformed Slurm environment (the shard defaults)
        print(f"error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        config = PreprocessConfig(
            input=tuple(args.input),
            output_prefix=args.output_prefix,
            json_keys=tuple(args.json_keys),
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            append_eod=args.append_eod,
            prepend_bos=args.prepend_bos,
            workers=args.workers,
            partitions=args.partitions,
            partition_bytes=args.partition_bytes,
            batch_size=args.batch_size,
            metadata_keys=tuple(args.metadata_keys),
            metadata_defaults=tuple(args.metadata_defaults),
            max_chars=args.max_chars,
            max_reject_fraction=args.max_reject_fraction,
            dedup=args.dedup,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
            keep_partitions=args.keep_partitions,
            progress=not args.no_progress,
            log_interval=args.log_interval,
        )
        summary = run_preprocess(config)
    except (ValueError, InputError, TokenizerError, PreprocessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an output directory that cannot be created or written, ...
        print(f"error: {err}; check --input and that --output-prefix is writable", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
