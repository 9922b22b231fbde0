"""Build time and memory of the phase-scheduled blending index vs megatron-core's static one.

    python benchmarks/blend_index.py [--samples 100000000] [--components 20] [--phases 100]

Same run, same sizes: megatron-core's ``helpers.build_blending_indices`` (C++, static weights)
against ``megatron_syne.data.blending.build_phased_blending_indices`` (numba, weights changing
at every phase boundary). Time: best of ``--repeats`` interleaved runs. Memory: peak traced
allocation (tracemalloc sees numpy buffers) during each build, against the index arrays
themselves (int16 + int64 per sample). Writes a Markdown table (``--output``).
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Imported before any measurement: import time and its allocations must not be counted.
from megatron.core.datasets import helpers  # noqa: E402

from megatron_syne.data.blending import build_phased_blending_indices  # noqa: E402


def _megatron(weights: np.ndarray, size: int) -> None:
    index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    helpers.build_blending_indices(index, sample_index, weights.tolist(), len(weights), size, False)


def _phased(bounds: np.ndarray, weights: np.ndarray) -> None:
    build_phased_blending_indices(bounds, weights)


def _measure(fn, *args) -> tuple[float, int]:
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    fn(*args)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gc.collect()
    return elapsed, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000_000)
    parser.add_argument("--components", type=int, default=20)
    parser.add_argument("--phases", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--machine", default="2-core CPU dev machine, no GPU")
    parser.add_argument("--output", default="benchmarks/results/blend_index.md")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    static = rng.dirichlet(np.ones(args.components))
    phase_weights = rng.dirichlet(np.ones(args.components), size=args.phases)
    bounds = np.linspace(0, args.samples, args.phases + 1).astype(np.int64)
    # Warm up both (numba compiles or loads its on-disk cache on the first call).
    _phased(bounds[:2] // 1000, phase_weights[:1])
    _megatron(static, 1000)

    times = {"megatron": [], "phased": []}
    peaks = {"megatron": [], "phased": []}
    for _ in range(args.repeats):
        t, m = _measure(_megatron, static, args.samples)
        times["megatron"].append(t)
        peaks["megatron"].append(m)
        t, m = _measure(_phased, bounds, phase_weights)
        times["phased"].append(t)
        peaks["phased"].append(m)
        print(
            f"megatron {times['megatron'][-1]:.2f}s  phased {times['phased'][-1]:.2f}s", flush=True
        )

    arrays = args.samples * (2 + 8)
    t_ref, t_ours = min(times["megatron"]), min(times["phased"])
    m_ref, m_ours = max(peaks["megatron"]), max(peaks["phased"])
    rows = [
        ("megatron-core `helpers.build_blending_indices` (static)", 1, t_ref, m_ref),
        ("`build_phased_blending_indices` (numba)", args.phases, t_ours, m_ours),
    ]
    lines = [
        "# Blending index build: phase-scheduled vs megatron-core static",
        "",
        f"Machine: {args.machine} ({platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}). Shared with other jobs: times are the best of "
        f"{args.repeats} interleaved runs.",
        "",
        f"{args.samples:,} samples, {args.components} components; index arrays (int16 dataset "
        f"index + int64 sample index) = {arrays / 2**30:.3f} GiB.",
        "",
        "| builder | phases | time (s) | peak traced memory (GiB) | memory / index arrays |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, phases, t, m in rows:
        lines.append(f"| {name} | {phases} | {t:.2f} | {m / 2**30:.3f} | {m / arrays:.3f} |")
    lines += [
        "",
        f"Time ratio (phased / megatron-core): **{t_ours / t_ref:.2f}x** (target <= 1.2x). "
        f"Memory ratio: **{m_ours / m_ref:.3f}x** (target <= 1.1x).",
        "",
        "All runs: "
        + ", ".join(f"{k} " + "/".join(f"{t:.2f}" for t in v) + " s" for k, v in times.items()),
        "",
        f"Command: `python benchmarks/blend_index.py --samples {args.samples} --components "
        f"{args.components} --phases {args.phases} --repeats {args.repeats}`",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
