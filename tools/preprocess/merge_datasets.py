#!/usr/bin/env python
"""Merge preprocessed datasets (e.g. the shards of a Slurm array) into one, metadata included.

    python tools/preprocess/merge_datasets.py \\
        --input 'out/web-cn-shard*_text_document' --output-prefix out/web-cn_text_document

Inputs are dataset prefixes, globs of prefixes, or directories of .idx files; they are
concatenated in the order given (globs sorted by path, so shards stay in shard order).
"""

from __future__ import annotations

import argparse
import sys
import time

import pyarrow as pa

from megatron_syne.data.metadata import MetadataError
from megatron_syne.preprocess.indexed import IndexedDataError
from megatron_syne.preprocess.merge import merge_datasets, resolve_prefixes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="dataset prefixes, globs of prefixes, or directories of .bin/.idx files",
    )
    p.add_argument("--output-prefix", required=True, help="prefix of the merged dataset")
    p.add_argument(
        "--dedup",
        choices=["none", "exact"],
        default="none",
        help="'exact': keep only the first document with each metadata hash; the "
        "dropped ones are listed in <output-prefix>.rejects.jsonl",
    )
    p.add_argument(
        "--no-metadata",
        action="store_true",
        help="merge only .bin/.idx (for datasets without a metadata sidecar)",
    )
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        inputs = resolve_prefixes(args.input)
        if args.output_prefix in inputs:
            raise IndexedDataError(f"--output-prefix {args.output_prefix} is also an input")
        summary = merge_datasets(
            inputs, args.output_prefix, dedup=args.dedup, metadata=not args.no_metadata
        )
    except (ValueError, IndexedDataError, MetadataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except pa.ArrowException as err:  # sidecars whose columns cannot be concatenated
        print(
            f"error: the inputs' metadata sidecars do not fit together ({err}); make the "
            "named column the same type in every input, or merge with --no-metadata",
            file=sys.stderr,
        )
        return 2
    except OSError as err:
        print(f"error: {err}; check that --output-prefix is writable", file=sys.stderr)
        return 2
    for prefix in inputs:
        print(f"  input: {prefix}")
    print(f"{summary.format()} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
