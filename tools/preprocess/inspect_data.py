#!/usr/bin/env python
"""Show what a preprocessed dataset holds: documents and tokens per language, source and topic,
and a few decoded documents.

    python tools/preprocess/inspect_data.py --data-path out/web-cn_text_document --samples 3
"""

from __future__ import annotations

import argparse
import random
import sys

from megatron_syne.data.metadata import MetadataError
from megatron_syne.preprocess.indexed import IndexedDataError
from megatron_syne.preprocess.stats import document_tokens, plot_lengths, summarize
from megatron_syne.preprocess.tokenizers import TOKENIZER_TYPES, TokenizerError, load_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-path", required=True, help="dataset prefix (without .bin/.idx)")
    p.add_argument(
        "--by", nargs="+", default=["lang", "source", "topic"], help="metadata columns to group by"
    )
    p.add_argument("--samples", type=int, default=3, help="documents to decode and print")
    p.add_argument("--sample-tokens", type=int, default=80, help="tokens shown per sample")
    p.add_argument("--seed", type=int, default=0, help="which documents are sampled")
    p.add_argument("--tokenizer-type", default="Llama3Tokenizer", choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--plot", default=None, help="write a PNG of document lengths per source")
    args = p.parse_args(argv)
    if args.samples < 0:
        p.error(f"--samples must be >= 0, got {args.samples}")
    if args.sample_tokens < 1:
        p.error(f"--sample-tokens must be >= 1, got {args.sample_tokens}")
    try:
        documents, tokens, groups, table = summarize(args.data_path, tuple(args.by))
        tokenizer = (
            load_tokenizer(args.tokenizer_type, args.tokenizer_model) if args.samples else None
        )
    except (ValueError, IndexedDataError, MetadataError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{args.data_path}: {documents:,} documents, {tokens:,} tokens "
        f"({tokens / max(documents, 1):,.1f} tokens/document)\n"
    )
    for group in groups:
        print(group.format() + "\n")
    picks = sorted(random.Random(args.seed).sample(range(documents), min(args.samples, documents)))
    for index in picks:
        row = table.slice(index, 1).to_pylist()[0]
        ids = document_tokens(args.data_path, index)
        shown = tokenizer.decode(ids[: args.sample_tokens].tolist())
        print(
            f"--- document {index}: lang={row.get('lang')} source={row.get('source')} "
            f"topic={row.get('topic')} tokens={len(ids)} from {row['input_file']}:{row['input_line']}"
        )
        print(shown + (" [...]" if len(ids) > args.sample_tokens else ""))
    if args.plot:
        try:
            plot_lengths(table, "source", args.plot)
        except OSError as err:
            print(f"error: --plot {args.plot}: cannot write it ({err})", file=sys.stderr)
            return 2
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
