"""Command-line plumbing shared by tools/synth/*.py: flags -> typed configs -> backend."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from megatron_syne.synth.client import ChatBackend, ChatClient, ClientConfig
from megatron_syne.synth.filters import FilterConfig
from megatron_syne.synth.pipeline import GenerationRun, RunConfig, WorkItem, format_summary


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generator (an OpenAI-compatible server fleet, or a local model)")
    g.add_argument(
        "--api-base",
        action="append",
        default=[],
        help="chat-completions base URL, e.g. http://host:8000/v1; repeat for a fleet of "
        "replicas (requests go to the least busy healthy one)",
    )
    g.add_argument("--model", default=None, help="served model name (vLLM --served-model-name)")
    g.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY"
    )
    g.add_argument("--max-concurrency", type=int, default=64, help="requests in flight in total")
    g.add_argument("--request-timeout", type=float, default=300.0, help="seconds per attempt")
    g.add_argument("--connect-timeout", type=float, default=10.0, help="seconds")
    g.add_argument("--max-retries", type=int, default=6, help="retries of a transient failure")
    g.add_argument("--backoff-base", type=float, default=1.0, help="seconds, doubled per retry")
    g.add_argument("--backoff-max", type=float, default=60.0, help="seconds")
    g.add_argument("--max-tokens", type=int, default=2048, help="completion tokens per answer")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument(
        "--extra-body",
        type=json.loads,
        default={},
        help="JSON merged into every request, e.g. '{\"repetition_penalty\": 1.05}' (vLLM)",
    )
    g.add_argument(
        "--sampling-seed",
        type=int,
        default=1234,
        help="per-request seed (base + sample index) so reruns ask for the same sample; -1: none",
    )
    g.add_argument("--local-model", default=None, help="local transformers model directory")
    g.add_argument("--local-device", default="cpu")
    g.add_argument("--local-dtype", default="auto")
    g.add_argument("--local-batch-size", type=int, default=8)
    g.add_argument("--local-max-prompt-tokens", type=int, default=4096)


def add_run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output and resume")
    g.add_argument("--out", required=True, help="accepted items (.jsonl, appended, resumable)")
    g.add_argument("--rejects", default=None, help="default: <out>.rejects.jsonl")
    g.add_argument("--limit", type=int, default=None, help="at most this many items (testing)")
    g.add_argument("--workers", type=int, default=None, help="default: 2 x --max-concurrency")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument(
        "--no-fsync", action="store_true", help="flush but do not fsync each item (faster disks)"
    )
    f = parser.add_argument_group("quality filters")
    d = FilterConfig()
    f.add_argument("--min-problem-chars", type=int, default=d.min_problem_chars)
    f.add_argument("--max-problem-chars", type=int, default=d.max_problem_chars)
    f.add_argument("--min-solution-chars", type=int, default=d.min_solution_chars)
    f.add_argument("--max-solution-chars", type=int, default=d.max_solution_chars)
    f.add_argument(
        "--max-duplicate-ngram-fraction",
        type=float,
        default=d.max_duplicate_ngram_fraction,
        help="reject when more of the words lie in repeated 5-grams",
    )
    f.add_argument(
        "--max-duplicate-line-fraction", type=float, default=d.max_duplicate_line_fraction
    )
    f.add_argument("--no-language-check", action="store_true")
    f.add_argument(
        "--no-dedup", action="store_true", help="skip MinHash-LSH near-duplicate removal"
    )
    f.add_argument("--dedup-threshold", type=float, default=d.dedup_threshold, help="Jaccard")
    f.add_argument(
        "--decontaminate",
        nargs="+",
        default=[],
        metavar="FILE",
        help="evaluation sets (.jsonl/.json/.txt, optionally .gz) to keep out of the output",
    )
    f.add_argument("--decontamination-ngram", type=int, default=d.decontamination_ngram)


def filter_config(args: argparse.Namespace) -> FilterConfig:
    return FilterConfig(
        min_problem_chars=args.min_problem_chars,
        max_problem_chars=args.max_problem_chars,
        min_solution_chars=args.min_solution_chars,
        max_solution_chars=args.max_solution_chars,
        max_duplicate_ngram_fraction=args.max_duplicate_ngram_fraction,
        max_duplicate_line_fraction=args.max_duplicate_line_fraction,
        check_language=not args.no_language_check,
        dedup=not args.no_dedup,
        dedup_threshold=args.dedup_threshold,
        decontamination_ngram=args.decontamination_ngram,
    )


def build_backend(args: argparse.Namespace) -> ChatBackend:
    if args.local_model and args.api_base:
        raise SystemExit("error: give either --api-base (server) or --local-model, not both")
    if args.local_model:
        from megatron_syne.synth.local_backend import LocalConfig, TransformersBackend

        return TransformersBackend(
            LocalConfig(
                model_dir=args.local_model,
                device=args.local_device,
                dtype=args.local_dtype,
                max_new_tokens=args.max_tokens,
                max_prompt_tokens=args.local_max_prompt_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                batch_size=args.local_batch_size,
            )
        )
    if not args.api_base:
        raise SystemExit("error: give --api-base http://host:8000/v1 (repeatable) or --local-model")
    if not args.model:
        raise SystemExit("error: --model is required with --api-base (the served model name)")
    return ChatClient(
        ClientConfig(
            api_bases=args.api_base,
            model=args.model,
            api_key=args.api_key,
            max_concurrency=args.max_concurrency,
            request_timeout=args.request_timeout,
            connect_timeout=args.connect_timeout,
            max_retries=args.max_retries,
            backoff_base=args.backoff_base,
            backoff_max=args.backoff_max,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            extra_body=args.extra_body,
        )
    )


def run_config(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    workers = args.workers or (1 if args.local_model else 2 * args.max_concurrency)
    return RunConfig(
        out=args.out,
        rejects=args.rejects,
        workers=workers,
        filters=filter_config(args),
        decontamination_files=args.decontaminate,
        progress=not args.no_progress,
        fsync=not args.no_fsync,
        **overrides,
    )


def execute(
    make_run: Callable[[ChatBackend], GenerationRun],
    make_items: Callable[[GenerationRun], tuple[Iterable[WorkItem], int | None]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Build the backend, run every item, print the summary; returns it."""

    async def main() -> dict[str, Any]:
        backend = build_backend(args)
        try:
            run = make_run(backend)
            items, total = make_items(run)
            return await run.run(items, total)
        finally:
            await backend.aclose()

    try:
        summary = asyncio.run(main())
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise SystemExit(f"error: {err}") from err
    print(format_summary(summary), file=sys.stderr)
    return summary


def sampling_seed(args: argparse.Namespace) -> int | None:
    return None if args.sampling_seed is not None and args.sampling_seed < 0 else args.sampling_seed
