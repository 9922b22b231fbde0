#!/usr/bin/env python
"""Preprocessing work in CPU instructions: the tool vs the tokenizer alone vs Megatron-style.

    python benchmarks/preprocess_work.py                 # demo corpus, 2 MB
    python benchmarks/preprocess_work.py --input my.jsonl

Wall-clock ratios on a shared VM move by +-20% from run to run (`preprocess_throughput.py`
prints them). Instruction counts do not: each pipeline runs once under valgrind
(``--tool=cachegrind --cache-sim=no``, every forked process counted) and the table gives the
instructions it executed, per token, and the tokenizer-alone count divided by it (the share of
the pipeline's work that is tokenization: 1.0 would mean nothing but tokenizing). Everything
runs in one process (``--workers 1``: the workers do the same per-document work; a forked
child's count would include its parent's, so multi-process pipelines are left to the
wall-clock benchmark).

What is counted (imports are subtracted: a run with the same imports that stops before the work):
- ``tool``: ``run_preprocess`` end to end, one worker (tokenizer load with a warm cache,
  reading, validation, hashing, tokenization, .bin/.idx/metadata/rejects, merge).
- ``tool, fixed part``: the same on a 10-document prefix of the input (tokenizer construction,
  files, merge): what a run costs whatever its size.
- ``tokenizer alone``: tiktoken over texts already in memory, as lists (``encode_ordinary``) or
  as arrays (``encode_to_numpy``, what the tool runs); loading the texts and the tokenizer is
  not counted.

Instructions are not time (cache misses, memory stalls and idle cores are not in them), so this
complements the wall-clock benchmark; it does not replace it. Needs ``valgrind`` on the PATH;
valgrind runs programs about 50x slower (a 2 MB input takes a few minutes).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Each program: setup (imports, loading; not counted), then the measured work when argv[1] says
# "run". The baseline is the same program with argv[1] == "setup".
PROGRAMS = {
    "tool": """
import shutil, sys
from megatron_syne.preprocess import pipeline
pipeline._tokenizer(pipeline.PreprocessConfig(input=(INPUT,), output_prefix=OUT))  # warm cache
pipeline._WORKER.clear()
if sys.argv[1] == "run":
    pipeline.run_preprocess(pipeline.PreprocessConfig(
        input=(INPUT,), output_prefix=OUT, append_eod=True, workers=1, progress=False))
""",
    "tokenizer-lists": """
import json, sys
from megatron_syne.preprocess.tokenizers import load_tokenizer
texts = [json.loads(line)["text"] for line in open(INPUT, encoding="utf-8")]
tokenizer = load_tokenizer()
if sys.argv[1] == "run":
    tokens = sum(len(tokenizer.encode(t)) + 1 for t in texts)
""",
    "tokenizer-arrays": """
import json, sys
from megatron_syne.preprocess.tokenizers import load_tokenizer
texts = [json.loads(line)["text"] for line in open(INPUT, encoding="utf-8")]
tokenizer = load_tokenizer()
if sys.argv[1] == "run":
    tokens = sum(len(a) + 1 for a in tokenizer.encode_batch_numpy(texts))
""",
}


def count_instructions(program: str, mode: str, tree: Path) -> int:
    """Instructions ``program`` executes (one process)."""
    result = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            sys.executable,
            "-c",
            program,
            mode,
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=str(tree)),
        cwd=tree,  # `python -c` puts the working directory first on sys.path
    )
    if result.returncode != 0:
        raise RuntimeError(f"valgrind run failed ({mode}):\n{result.stderr[-3000:]}")
    found = re.search(r"I\s+refs:\s+([\d,]+)", result.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{result.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def measure(name: str, input_path: str, workdir: Path, tree: Path = REPO_ROOT) -> int:
    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    program = f"INPUT = {input_path!r}\nOUT = {str(out / 'bench')!r}\n" + PROGRAMS[name]
    work = count_instructions(program, "run", tree) - count_instructions(program, "setup", tree)
    shutil.rmtree(out, ignore_errors=True)
    return work


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", default=None, help="JSONL with a 'text' field (default: demo corpus)")
    p.add_argument("--target-mb", type=float, default=2.0, help="demo corpus size (default 2)")
    p.add_argument(
        "--compare-tree",
        default=None,
        help="another checkout of this repository (e.g. `git worktree add /tmp/old <commit>`): "
        "its tool is counted too, on the same input",
    )
    p.add_argument("--markdown", default=None, help="append the table to this file")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: apt-get install valgrind", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="preprocess_work_"))
    try:
        input_path = args.input
        if input_path is None:
            from megatron_syne.preprocess.corpus import CorpusConfig, build_demo_corpus

            input_path = str(workdir / "demo.jsonl")
            build_demo_corpus(CorpusConfig(input_path, target_mb=args.target_mb))
        with open(input_path, encoding="utf-8") as f:
            head = [next(f, "") for _ in range(10)]
        prefix = workdir / "first10.jsonl"
        prefix.write_text("".join(head), encoding="utf-8")

        from megatron_syne.preprocess.tokenizers import load_tokenizer

        tokenizer = load_tokenizer()
        with open(input_path, encoding="utf-8") as f:
            import json

            texts = [json.loads(line)["text"] for line in f]
        tokens = sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts))
        print(
            f"input: {input_path} ({len(texts):,} documents, {tokens:,} tokens with EOD), "
            "one process; running under valgrind (minutes)...",
            flush=True,
        )
        work = {
            "tool": measure("tool", input_path, workdir),
            "tokenizer-arrays": measure("tokenizer-arrays", input_path, workdir),
            "tokenizer-lists": measure("tokenizer-lists", input_path, workdir),
        }
        fixed = measure("tool", str(prefix), workdir)
        if args.compare_tree:
            tree = Path(args.compare_tree).resolve()
            work[f"tool at {tree}"] = measure("tool", input_path, workdir, tree)
        labels = {
            "tool": "tool (preprocess_data.py)",
            "tokenizer-arrays": "tokenizer alone: tiktoken arrays",
            "tokenizer-lists": "tokenizer alone: tiktoken lists",
        }
        ceiling = min(work["tokenizer-arrays"], work["tokenizer-lists"])
        lines = [
            "| pipeline | instructions (M) | per token | tokenizer-alone / this |",
            "|---|---:|---:|---:|",
        ]
        for name, count in work.items():
            lines.append(
                f"| {labels.get(name, name)} | {count / 1e6:,.0f} | {count / tokens:,.0f} | "
                f"{ceiling / count:.2f} |"
            )
        marginal = work["tool"] - fixed
        lines += [
            f"| tool, fixed part (first 10 documents) | {fixed / 1e6:,.0f} | | |",
            f"| tool minus its fixed part | {marginal / 1e6:,.0f} | {marginal / tokens:,.0f} | "
            f"{ceiling / marginal:.2f} |",
        ]
        report = "\n".join(lines)
        print(report)
        if args.markdown:
            with open(args.markdown, "a", encoding="utf-8") as f:
                f.write(report + "\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
