#!/usr/bin/env python3
"""Synthesis outputs -> training-text JSONL (text, lang, source, discipline) for preprocessing.

python tools/synth/to_corpus.py synth/sci.jsonl synth/code.jsonl --output synth/corpus.jsonl
python tools/preprocess/preprocess_data.py --input synth/corpus.jsonl ...
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_syne.synth.corpus import to_corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="outputs of science_qa.py / code_qa.py")
    parser.add_argument("--output", required=True, help="corpus JSONL (written atomically)")
    parser.add_argument("--rejects", default=None, help="default: <output stem>.rejects.jsonl")
    parser.add_argument("--source", default="synthesis", help="value of the 'source' field")
    parser.add_argument(
        "--include-failing", action="store_true", help="also code items that failed their tests"
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        s = to_corpus(args.inputs, args.output, args.rejects, args.source, args.include_failing)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"to_corpus: wrote {s.written} documents ({s.chars} chars) to {args.output} in "
        f"{time.monotonic() - start:.1f} s; skipped {sum(s.skipped.values())} "
        f"{dict(s.skipped)}\n  by lang {dict(s.by_lang)}\n  by discipline {dict(s.by_discipline)}",
        file=sys.stderr,
    )
    if s.written == 0:
        print(
            "to_corpus: warning: no usable item in the inputs, the corpus is empty (see the "
            "rejects file for why)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
