"""Offline SynE round: per-topic eval results of a run -> the next round's topic weights.

    python tools/mixture/update.py spec.yaml --results RUN/mixer_history-<hash>.jsonl \
        --output next_round.yaml

``--results`` is either a mixer history (JSONL written by the online mixer; its last two
measurements are used, and its last weights) or a JSON file
``{"weights": {component: r}, "previous": {component: loss}, "current": {component: loss}}``
with components named ``<source>/<topic>``; they must be exactly the components the spec's mixer
adjusts on the data (the spec is resolved on it: ``--data-root`` as for plan.py), and losses
finite and > 0. A torn last line of a history (a run killed mid-write) is skipped with a
warning. The rule and its settings (alpha, normalization, importance, max_change, floor) come
from the spec's ``mixer`` section. Writes the spec with each adjusted source's ``topic_weights``
replaced (and, without --data-root, its ``data_root`` set so relative source paths resolve from
the output's directory), and prints the changes. Exits 1 with the reason on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_syne.data.spec import SpecError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="the mixture spec of the run (its mixer section is the rule)")
    parser.add_argument("--results", required=True, help="mixer history JSONL or results JSON")
    parser.add_argument("--output", required=True, help="where to write the next round's spec")
    parser.add_argument(
        "--data-root",
        default=None,
        help="root of relative source paths (default: the spec's data_root, else its directory)",
    )
    args = parser.parse_args(argv)

    from megatron_syne.data.mixer import load_eval_results, offline_update, write_updated_spec

    try:
        results = load_eval_results(args.results)
        for warning in results.warnings:
            print(f"update.py: warning: {warning}", file=sys.stderr)
        new_weights, rows = offline_update(args.spec, results, args.data_root)
        write_updated_spec(args.spec, new_weights, args.output, args.data_root)
    except (SpecError, ValueError, FileNotFoundError) as err:
        print(f"update.py: error: {err}", file=sys.stderr)
        return 1
    print(
        f"{'component':<40} {'loss before':>12} {'loss after':>12} {'delta':>9} {'r':>8} {'r new':>8}"
    )
    for row in rows:
        print(
            f"{row['component']:<40} {row['previous']:12.4f} {row['current']:12.4f} "
            f"{row['delta']:+9.4f} {row['weight']:8.4f} {row['new_weight']:8.4f}"
        )
    print(f"summary: {len(rows)} topic weights updated; next round spec written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
