#!/usr/bin/env python3
"""Code QA synthesis: LeetCode-style problems -> new problems + solutions, run in a sandbox.

    python tools/synth/code_qa.py --problems problems.jsonl --api-base http://host:8000/v1 \
        --model Qwen/Qwen2.5-Coder-7B-Instruct --out synth/code.jsonl

Problems: JSONL with "title", "description", optional "id", "examples", "entry_point",
"tests" (Python assert statements). Only items whose code passes all tests are kept unless
--keep-failing. Rerunning the same command resumes.
"""

from __future__ import annotations

import argparse

from megatron_syne.synth import cli
from megatron_syne.synth.code_qa import (
    CodeConfig,
    code_items,
    make_code_parser,
    make_code_verifier,
    read_problems,
)
from megatron_syne.synth.pipeline import GenerationRun
from megatron_syne.synth.sandbox import SandboxConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problems", required=True, help="LeetCode-style problems (JSONL)")
    parser.add_argument("--mode", choices=("new", "solve"), default="new")
    parser.add_argument("--num-examples", type=int, default=2, help="in-context examples")
    parser.add_argument("--min-tests", type=int, default=3, help="asserts a new problem needs")
    parser.add_argument("--samples-per-problem", type=int, default=1)
    parser.add_argument("--keep-failing", action="store_true", help="keep items failing tests")
    s = parser.add_argument_group("sandbox")
    d = SandboxConfig()
    s.add_argument("--sandbox-timeout", type=float, default=d.timeout_s, help="wall seconds")
    s.add_argument("--sandbox-cpu", type=int, default=d.cpu_s, help="CPU seconds")
    s.add_argument("--sandbox-memory-mb", type=int, default=d.memory_mb)
    s.add_argument(
        "--sandbox-network",
        choices=("auto", "netns", "audit"),
        default="auto",
        help="auto: network namespace when unshare works, plus the audit hook",
    )
    s.add_argument("--sandbox-workers", type=int, default=CodeConfig().sandbox_workers)
    cli.add_backend_args(parser)
    cli.add_run_args(parser)
    args = parser.parse_args(argv)
    config = CodeConfig(
        mode=args.mode,
        num_examples=args.num_examples,
        min_tests=args.min_tests,
        samples_per_problem=args.samples_per_problem,
        keep_failing=args.keep_failing,
        limit=args.limit,
        sandbox=SandboxConfig(
            timeout_s=args.sandbox_timeout,
            cpu_s=args.sandbox_cpu,
            memory_mb=args.sandbox_memory_mb,
            network=args.sandbox_network,
        ),
        sandbox_workers=args.sandbox_workers,
        sampling_seed=cli.sampling_seed(args),
    )
    problems, bad = read_problems(args.problems)

    def make_run(backend):
        overrides = {"language_fields": ("problem",), "repetition_fields": ("problem",)}
        text_of = None
        if config.mode == "solve":
            # Every sample of a problem shares its statement: compare solutions only.
            overrides = {"language_fields": (), "repetition_fields": ("solution",)}
            text_of = lambda r: r["solution"]  # noqa: E731
        return GenerationRun(
            cli.run_config(args, **overrides),
            backend,
            "code_qa",
            make_code_parser(config),
            make_code_verifier(config),
            text_of=text_of,
        )

    def make_items(run):
        total = len(problems) * config.samples_per_problem
        if config.limit is not None:
            total = min(total, config.limit)
        return code_items(problems, bad, run, config), total

    cli.execute(make_run, make_items, args)


if __name__ == "__main__":
    main()
