#!/usr/bin/env python3
"""Science QA synthesis: seed pages -> [Problem]/[Solution] items via an LLM server.

    python tools/synth/science_qa.py --seeds pages.jsonl --api-base http://host:8000/v1 \
        --model mistralai/Mistral-7B-Instruct-v0.3 --out synth/sci.jsonl

Seeds: JSONL with "text" and optional "id", "discipline" (one of the 9; assigned when
missing), "lang" (zh/en; detected when missing). Rerunning the same command resumes.
"""

from __future__ import annotations

import argparse

from megatron_syne.synth import cli
from megatron_syne.synth.pipeline import GenerationRun
from megatron_syne.synth.prompts import DISCIPLINES, KeywordDisciplineClassifier
from megatron_syne.synth.science_qa import (
    ScienceConfig,
    count_seed_lines,
    parse_science,
    read_seeds,
    science_items,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", required=True, help="seed pages (JSONL)")
    parser.add_argument("--samples-per-seed", type=int, default=1)
    parser.add_argument("--max-seed-chars", type=int, default=6000, help="longer pages are cut")
    parser.add_argument("--min-seed-chars", type=int, default=100, help="shorter pages: rejected")
    parser.add_argument(
        "--min-keyword-hits",
        type=int,
        default=2,
        help=f"discipline classifier: fewer hits -> 'general education' (of {len(DISCIPLINES)})",
    )
    cli.add_backend_args(parser)
    cli.add_run_args(parser)
    args = parser.parse_args(argv)
    config = ScienceConfig(
        samples_per_seed=args.samples_per_seed,
        max_seed_chars=args.max_seed_chars,
        min_seed_chars=args.min_seed_chars,
        limit=args.limit,
        sampling_seed=cli.sampling_seed(args),
    )
    classifier = KeywordDisciplineClassifier(min_hits=args.min_keyword_hits)

    def make_run(backend):
        return GenerationRun(cli.run_config(args), backend, "science_qa", parse_science)

    def make_items(run):
        total = count_seed_lines(args.seeds) * config.samples_per_seed
        if config.limit is not None:
            total = min(total, config.limit)
        return science_items(read_seeds(args.seeds, classifier, config), run, config), total

    cli.execute(make_run, make_items, args)


if __name__ == "__main__":
    main()
