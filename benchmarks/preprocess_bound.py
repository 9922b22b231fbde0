#!/usr/bin/env python
"""How close to the tokenizer-alone ceiling can ANY JSONL -> tokens tool get? A lower bound.

    python benchmarks/preprocess_bound.py --workers 2 --target-mb 12
    python benchmarks/preprocess_bound.py --input my.jsonl --workers 16

`preprocess_throughput.py` compares the tool with the tokenizer alone: tiktoken in one forked
process per worker, over texts already in memory, its tables already built (the ceiling). Every
tool must also do what that ceiling leaves out. This script times each of those parts alone, in
one process (best of ``--repeats`` interleaved runs), and the ceiling itself with ``--workers``
processes, then adds up the least a tool must spend:

- ``B``: building tiktoken's tables from the 128k BPE ranks (``CoreBPE``), plus reading the
  cached ranks. The build runs in Rust holding the GIL, and a worker cannot encode before it has
  the tables (built itself, or inherited by fork from a parent that built them).
- ``P``: parsing the JSON lines (the fastest parser installed: the C scanner the tool runs,
  and orjson when it is installed).
- ``H``: the content hash the issue asks for (NFC, whitespace-collapsed text, blake2b-128).
- ``E``: encoding to arrays, one process.

With ``s`` = E / (ceiling seconds) the parallel speed-up the ceiling itself gets from the
workers (on a VM whose cores are hyper-threads it is well under the worker count), the per-
document parts ``P + H`` cost at least ``(P + H) / s`` of wall time. Two bounds:

- build not overlapped (what every tool does today: nothing else can use the GIL while the
  tables are built, and forked workers need them): ``ceiling + B + (P + H) / s``;
- build perfectly overlapped with parsing and hashing in another process, at zero cost to move
  the parsed texts: ``ceiling + (B + P + H) / s``.

``ceiling / bound`` is the most a tool could reach; the tool's own number is in
`preprocess_throughput.py`'s table. Reading the file, metadata, output and crash safety are
left out, so the real limit is lower still.
"""

from __future__ import annotations

import argparse
import json
import json.scanner
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from preprocess_throughput import measure_ceiling_processes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", default=None, help="JSONL with a 'text' field (default: demo corpus)")
    p.add_argument("--target-mb", type=float, default=12.0, help="demo corpus size (default 12)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=5, help="runs per part (best is kept)")
    args = p.parse_args(argv)

    from tiktoken import _tiktoken

    from megatron_syne.data.metadata import text_hash
    from megatron_syne.preprocess import tokenizers

    with tempfile.TemporaryDirectory(prefix="preprocess_bound_") as workdir:
        path = args.input
        if path is None:
            from megatron_syne.preprocess.corpus import CorpusConfig, build_demo_corpus

            path = str(Path(workdir) / "demo.jsonl")
            build_demo_corpus(CorpusConfig(path, target_mb=args.target_mb))
        with open(path, "rb") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    texts = [json.loads(line)["text"] for line in lines]
    model = tokenizers.llama3_tiktoken_model()
    ranks = tokenizers.load_tiktoken_bpe(model)  # warms the cache: the tool reads it the same way
    tokenizer = tokenizers.load_tokenizer()
    encoding = tokenizer._enc
    scan = json.scanner.make_scanner(json.JSONDecoder())
    parts = {
        "B: build tiktoken's tables (CoreBPE)": lambda: _tiktoken.CoreBPE(
            ranks, encoding._special_tokens, encoding._pat_str
        ),
        "B: read the cached BPE ranks": lambda: tokenizers.load_tiktoken_bpe(model),
        "P: parse, decode + C JSON scan (the tool)": lambda: [scan(x.decode(), 0) for x in lines],
        "H: content hash": lambda: [text_hash(t) for t in texts],
        "E: encode to arrays, 1 process": lambda: tokenizer.encode_batch_numpy(texts),
    }
    try:
        import orjson

        parts["P: parse, orjson"] = lambda: [orjson.loads(x) for x in lines]
    except ImportError:
        pass
    best = dict.fromkeys(parts, float("inf"))
    ceiling = float("inf")
    for _ in range(args.repeats):
        for name, run in parts.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
        ceiling = min(ceiling, measure_ceiling_processes(texts, args.workers, "array")[0])

    build = sum(v for k, v in best.items() if k.startswith("B:"))
    parse = min(v for k, v in best.items() if k.startswith("P:"))
    hashing = best["H: content hash"]
    encode = best["E: encode to arrays, 1 process"]
    speedup = encode / ceiling
    serial = ceiling + build + (parse + hashing) / speedup
    overlapped = ceiling + (build + parse + hashing) / speedup
    print(f"input: {path} ({len(texts):,} documents), workers={args.workers}")
    print("| part | seconds |\n|---|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.3f} |")
    print(
        f"| ceiling: tiktoken arrays, {args.workers} processes (s = {speedup:.2f}) | {ceiling:.3f} |"
    )
    print(
        f"| bound, build not overlapped: ceiling + B + (P+H)/s | {serial:.3f} "
        f"(**{ceiling / serial:.2f}x** the ceiling) |"
    )
    print(
        f"| bound, build overlapped: ceiling + (B+P+H)/s | {overlapped:.3f} "
        f"(**{ceiling / overlapped:.2f}x**) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
