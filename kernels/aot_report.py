#!/usr/bin/env python
"""Compile every Triton kernel for a GPU architecture on this (CPU-only) machine and report the
registers, stack and shared memory each launch configuration needs.

    python kernels/aot_report.py                          # sm_90 (H100/H200), bf16
    python kernels/aot_report.py --arch 90 100 --dtypes bf16 fp32 \\
        --output benchmarks/results/kernels_aot.md

A kernel that does not compile for the card fails here, before a GPU session is spent on it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from megatron_syne.kernels import aot  # noqa: E402
from megatron_syne.utils.io import atomic_open  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="SM versions (90)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=aot.DTYPES)
    parser.add_argument("--vocab", type=int, default=aot.LLAMA3_VOCAB, help="row length")
    parser.add_argument("--output", type=Path, default=None, help="write the tables here")
    args = parser.parse_args(argv)
    if not aot.aot_available():
        print(
            "nothing to compile: triton's CUDA backend (ptxas) is not installed, or "
            "TRITON_INTERPRET=1 is set",
            file=sys.stderr,
        )
        return 1
    import platform

    import triton

    command = "python kernels/aot_report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = [
        "# Triton kernels compiled ahead of time (`kernels/aot_report.py`)\n\n"
        f"Compiled on {platform.node()} ({platform.machine()}, no GPU) with triton "
        f"{triton.__version__}: `{command.strip()}`. No GPU ran these binaries; they show that the "
        "kernels compile for the card and what each launch needs."
    ]
    for arch in args.arch:
        start = time.perf_counter()
        results = aot.compile_all(arch, tuple(args.dtypes), args.vocab)
        table = aot.format_table(results, arch, args.vocab)
        seconds = time.perf_counter() - start
        sections.append(f"## sm_{arch}\n\n{table}\n\n{len(results)} kernels in {seconds:.1f} s.")
        print(sections[-1], flush=True)
    if args.output is not None:
        with atomic_open(args.output) as f:
            f.write("\n\n".join(sections) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
