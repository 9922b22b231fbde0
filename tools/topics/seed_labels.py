"""Seed topic labels for training the classifier, from a keyword lexicon or an LLM server.

    # keyword bootstrap over (a sample of) a dataset:
    python tools/topics/seed_labels.py --method lexicon --data-prefix out/web-en_text_document \
        --output seeds.jsonl
    # any OpenAI-compatible server (vLLM, SGLang, TGI, ...):
    python tools/topics/seed_labels.py --method llm --api-base http://host:8000/v1 \
        --model Qwen2.5-7B-Instruct --data-prefix P --num-samples 5000 --output seeds.jsonl

Writes the labelled JSONL (text, topic, lang, where, method) and, beside it,
<output>.set_aside.jsonl with every document that got no label and why.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from megatron_syne.topics.seeding import (
    LLMConfig,
    SeedDocument,
    lexicon_seed_labels,
    llm_seed_labels,
)
from megatron_syne.topics.taxonomy import DEFAULT_TAXONOMY, TaxonomyError, load_taxonomy
from megatron_syne.utils.io import atomic_open


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--method", choices=["lexicon", "llm"], required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-prefix", help="indexed dataset prefix (documents are decoded)")
    src.add_argument("--input", help="JSONL with `text` (and optional `lang`)")
    p.add_argument("--output", required=True, help="labelled JSONL to write")
    p.add_argument("--taxonomy", default=str(DEFAULT_TAXONOMY))
    p.add_argument("--num-samples", type=int, default=None, help="random sample size (default all)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tokenizer-type", default="Llama3Tokenizer")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--max-tokens-per-doc", type=int, default=2048, help="decoded head (tokens)")
    lex = p.add_argument_group("lexicon")
    lex.add_argument("--min-keywords", type=int, default=3, help="distinct keywords of the winner")
    lex.add_argument("--min-margin", type=float, default=1.5, help="winner / runner-up keywords")
    lex.add_argument("--max-per-topic", type=int, default=None)
    llm = p.add_argument_group("llm")
    llm.add_argument("--api-base", help="e.g. http://localhost:8000/v1")
    llm.add_argument("--model", help="served model name")
    llm.add_argument("--api-key", default=None)
    llm.add_argument("--concurrency", type=int, default=16)
    llm.add_argument("--max-retries", type=int, default=4)
    llm.add_argument("--request-timeout", type=float, default=120.0)
    llm.add_argument("--max-chars", type=int, default=3000, help="document head in the prompt")
    return p.parse_args(argv)


def load_documents(args) -> list[SeedDocument]:
    rng = np.random.default_rng(args.seed)
    if args.input:
        docs = []
        # Bytes, decoded line by line: a non-UTF-8 line is reported with its file and number.
        with open(args.input, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(
                        f"{args.input}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start} "
                        "of the line); convert the file to UTF-8 (e.g. iconv -f GB18030 -t UTF-8)"
                    ) from e
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise ValueError(f"{args.input}:{line_no}: invalid JSON ({e})") from e
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{args.input}:{line_no}: expected a JSON object with a `text` string, "
                        f"got a {type(row).__name__}"
                    )
                if not isinstance(row.get("text"), str):
                    raise ValueError(f"{args.input}:{line_no}: no `text` string")
                docs.append(SeedDocument(row["text"], row.get("lang"), f"{args.input}:{line_no}"))
        if args.num_samples is not None and args.num_samples < len(docs):
            keep = sorted(rng.choice(len(docs), args.num_samples, replace=False).tolist())
            docs = [docs[i] for i in keep]
        return docs
    from megatron_syne.data.metadata import read_metadata
    from megatron_syne.preprocess.tokenizers import load_tokenizer
    from megatron_syne.topics.documents import decode_documents

    meta = read_metadata(args.data_prefix)
    n = meta.num_rows
    indices = np.arange(n)
    if args.num_samples is not None and args.num_samples < n:
        indices = np.sort(rng.choice(n, args.num_samples, replace=False))
    langs = meta.column("lang").to_pylist() if "lang" in meta.column_names else [None] * n
    tokenizer = load_tokenizer(args.tokenizer_type, args.tokenizer_model)
    texts = decode_documents(args.data_prefix, indices, tokenizer, args.max_tokens_per_doc)
    return [SeedDocument(t, langs[i], f"doc {i}") for t, i in zip(texts, indices.tolist())]


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag for values that would fail late or label nonsense."""
    for flag, value in (
        ("--num-samples", args.num_samples),
        ("--max-tokens-per-doc", args.max_tokens_per_doc),
        ("--min-keywords", args.min_keywords),  # 0 would label documents with no keyword hit
        ("--max-per-topic", args.max_per_topic),
        ("--max-chars", args.max_chars),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not (args.min_margin >= 0 and args.min_margin != float("inf")):
        raise ValueError(f"--min-margin must be a finite number >= 0, got {args.min_margin}")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        check_args(args)
        if args.method == "llm" and (not args.api_base or not args.model):
            raise ValueError("--method llm needs --api-base and --model")
        config = None
        if args.method == "llm":
            config = LLMConfig(
                api_base=args.api_base,
                model=args.model,
                api_key=args.api_key,
                max_retries=args.max_retries,
                request_timeout=args.request_timeout,
                concurrency=args.concurrency,
                max_chars=args.max_chars,
            )
        taxonomy = load_taxonomy(args.taxonomy)
        docs = load_documents(args)
    except (TaxonomyError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if config is None:
        result = lexicon_seed_labels(
            docs, taxonomy, args.min_keywords, args.min_margin, args.max_per_topic
        )
    else:
        result = llm_seed_labels(docs, taxonomy, config, seed=args.seed)
    output = Path(args.output)
    aside = output.with_name(output.name + ".set_aside.jsonl")
    # With no label at all the seeds file is not written (an empty one would look like a
    # finished, useless result); the set-aside file says why each document got none.
    outputs = [(aside, result.set_aside)]
    if result.labelled:
        outputs.insert(0, (output, result.labelled))
    for path, rows in outputs:
        with atomic_open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    written = output if result.labelled else "nothing written"
    print(f"documents: {len(docs)}  labelled: {len(result.labelled)} -> {written}")
    print(f"set aside: {len(result.set_aside)} -> {aside}")
    for key, value in sorted(result.counts.items()):
        print(f"  {key:<34} {value}")
    print(f"time: {time.time() - start:.1f} s")
    if not result.labelled:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(result.counts.items())) or "none"
        errors = [row["error"] for row in result.set_aside if row.get("error")]
        hint = (
            f"; first request error: {errors[0]} (check --api-base, --model and the server)"
            if errors
            else "; see the reasons in the set-aside file"
        )
        print(
            f"error: no document was labelled ({len(docs)} document(s); {reasons}){hint}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
