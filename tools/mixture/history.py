"""Show a run's mixer history: per-topic validation loss and topic weights, as text and a PNG.

python tools/mixture/history.py RUN/mixer_history-<hash>.jsonl [--png history.png]

A bad line is an error naming the file and the line (exit 1); a torn last line (no newline at
its end: the run writing the history was killed mid-write) is skipped with a warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("history", help="mixer_history-*.jsonl written by the online mixer")
    parser.add_argument("--png", default=None, help="plot path (default: beside the history)")
    args = parser.parse_args(argv)

    from megatron_syne.data.planning import plot_mixer_history, read_mixer_history

    def warn(message: str) -> None:
        print(f"history.py: warning: {message}", file=sys.stderr)

    try:
        history = read_mixer_history(args.history, warn)
        png = Path(args.png) if args.png else Path(args.history).with_suffix(".png")
        plot_mixer_history(history, png)
    except (FileNotFoundError, ValueError) as err:
        print(f"history.py: error: {err}", file=sys.stderr)
        return 1
    names = list(history[0]["losses"])
    # Columns as wide as the longest name: a cut name (cn/zh_economics_business) is ambiguous.
    width = max(24, *(len(n) for n in names))
    print(f"{'iteration':>9} {'tokens':>12} " + " ".join(f"{n:>{width}}" for n in names))
    for r in history:
        cells = " ".join(
            f"{r['losses'][n]:>12.4f} r={r['weights_after'][n]:>8.4f}".rjust(width) for n in names
        )
        print(f"{r['iteration']:>9} {r['consumed_tokens']:>12} {cells}")
    updates = sum(r["updated"] for r in history)
    print(
        f"summary: {len(history)} measurements, {updates} updates, {len(names)} topics; plot {png}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
