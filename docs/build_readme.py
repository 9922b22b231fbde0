"""Assemble README.md and BENCHMARKS.md from docs/readme/*.md and benchmarks/results/*.md.

python docs/build_readme.py          # rewrite both
python docs/build_readme.py --check  # exit 1 if either is out of date (used by the tests)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Sections in the order of the data flow (ARCHITECTURE.md), then the cluster side.
README_SECTIONS = [
    "00-intro.md",
    "preprocessing.md",
    "topics_ppl.md",
    "mixture.md",
    "synthesis.md",
    "training.md",
    "kernels.md",
    "conversion.md",
    "cluster.md",
    "development.md",
]
BENCHMARK_ORDER = [
    "train_throughput.md",
    "kernels.md",
    "fused_linear_memory.md",
    "kernels_aot.md",
    "preprocess_throughput.md",
    "blend_index.md",
    "topics.md",
    "synth_client.md",
]


def _demote(text: str) -> str:
    """Benchmark tables sit under BENCHMARKS.md's title: '# x' becomes '## x' and so on."""
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())


def build() -> dict[Path, str]:
    readme_dir = REPO / "docs" / "readme"
    missing = sorted({p.name for p in readme_dir.glob("*.md")} - set(README_SECTIONS))
    if missing:
        raise SystemExit(f"docs/readme: add {missing} to README_SECTIONS in {__file__}")
    readme = "\n\n".join((readme_dir / name).read_text().strip() for name in README_SECTIONS)
    results = REPO / "benchmarks" / "results"
    names = BENCHMARK_ORDER + sorted(
        p.name for p in results.glob("*.md") if p.name not in BENCHMARK_ORDER
    )
    header = (
        "# Benchmarks\n\nThe latest table of each benchmark, with the machine or card that "
        "produced it. Regenerated from `benchmarks/results/*.md` by `python docs/build_readme.py`."
    )
    parts = [header] + [_demote((results / n).read_text().strip()) for n in names]
    return {REPO / "README.md": readme + "\n", REPO / "BENCHMARKS.md": "\n\n".join(parts) + "\n"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    stale = []
    for path, text in build().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {stale}; run python docs/build_readme.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
