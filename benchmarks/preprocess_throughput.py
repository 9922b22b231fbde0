#!/usr/bin/env python
"""Preprocessing throughput: this tool vs the tokenizer alone vs a Megatron-LM-style encoder.

    python benchmarks/preprocess_throughput.py --workers 2 --target-mb 12
    python benchmarks/preprocess_throughput.py --input my.jsonl --workers 16

Prints tokens/s (EOD included, the same token count for all) for:

- ``tool``: tools/preprocess/preprocess_data.py's pipeline end to end (discovery, validation,
  hashing, tokenization, .bin/.idx + metadata + rejects, merge), tokenizer load included.
- ``tokenizer alone``: tokenization of texts already in memory, nothing else, four ways:
  tiktoken's ``encode_ordinary_batch`` (the engine the tool runs, on its own thread pool, which
  scales badly), Hugging Face ``tokenizers``' Rust ``encode_batch_fast`` (rayon on every core),
  and tiktoken in one forked process per worker (the true multi-core figure) returning lists
  (``encode_ordinary``) or arrays (``encode_to_numpy``, as the tool does). The fastest is the
  ceiling.
- ``reference``: the least any JSONL -> tokens tool does, one forked process per worker that
  loads the tokenizer, reads its share of the file, parses each line and encodes to arrays
  (no validation, hashing, metadata or output): the tool's own work costs the difference.
- ``megatron-style``: Megatron-LM's tools/preprocess_data.py structure -- a multiprocessing pool
  that receives raw JSON lines, ``imap(encode, lines, chunksize=32)`` encoding one document per
  call, and the parent writing through megatron-core's ``IndexedDatasetBuilder.add_document``.
  Three tokenizer backends: tiktoken (the tool's engine, so the row isolates the pipeline
  design), the Rust HF tokenizer, and transformers' ``AutoTokenizer`` (what Megatron-LM's
  ``HuggingFaceTokenizer`` runs: the path people use today).

Each measurement is the best of ``--repeats`` interleaved runs (the machine is shared: the best
run is the one least disturbed by other processes). With ``--memory`` it also runs the tool on the input
repeated 1x and 4x and reports the peak RSS of the largest process, to show memory stays flat.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------- Megatron-LM-style encoder
class MegatronStyleEncoder:
    """The shape of Megatron-LM's ``Encoder`` (tools/preprocess_data.py): per-worker tokenizer
    built in the pool initializer, one JSON line in, one document's ids out.

    ``backend``: ``"tiktoken"`` (the engine our tool runs), ``"rust"`` (Hugging Face
    ``tokenizers`` from the same package's tokenizer.json) or ``"transformers"`` (an
    ``AutoTokenizer`` call per document, as Megatron-LM's ``HuggingFaceTokenizer``; without
    special tokens so the counts match ours). All three give the same ids.
    """

    tokenizer = None

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def initializer(self) -> None:
        from megatron_syne.preprocess.tokenizers import (
            llama3_tokenizer_dir,
            llama3_tokenizer_json,
            load_tokenizer,
        )

        if self.backend == "transformers":
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir()))
            MegatronStyleEncoder.tokenizer = (
                lambda text: hf(text, add_special_tokens=False).input_ids,
                hf.convert_tokens_to_ids("<|end_of_text|>"),
            )
            return
        if self.backend == "rust":
            tokenizer = load_tokenizer("HuggingFaceTokenizer", llama3_tokenizer_json())
        else:
            tokenizer = load_tokenizer()
        MegatronStyleEncoder.tokenizer = (tokenizer.encode, tokenizer.eod)

    def encode(self, json_line: str):
        data = json.loads(json_line)
        tokenize, eod = MegatronStyleEncoder.tokenizer
        ids = tokenize(data["text"])
        ids.append(eod)
        return ids, len(json_line)


def megatron_style(input_path: str, output_prefix: str, workers: int, backend: str) -> int:
    import numpy as np
    import torch  # imported (untimed) in main() already, as Megatron-LM's tool imports it first
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    encoder = MegatronStyleEncoder(backend)
    pool = mp.get_context("fork").Pool(workers, initializer=encoder.initializer)
    tokens = 0
    builder = IndexedDatasetBuilder(f"{output_prefix}.bin", dtype=np.int32)
    with open(input_path, encoding="utf-8") as fin:
        for ids, _ in pool.imap(encoder.encode, fin, 32):
            builder.add_document(torch.IntTensor(ids), [len(ids)])
            tokens += len(ids)
    builder.finalize(f"{output_prefix}.idx")
    pool.close()
    pool.join()
    return tokens


# ----------------------------------------------------------------------------------- measurements
def measure_tool(input_path: str, workdir: Path, workers: int) -> tuple[float, int]:
    from megatron_syne.preprocess import pipeline

    pipeline._WORKER.clear()  # include the tokenizer load, as a fresh run would
    out = workdir / "tool"
    shutil.rmtree(out, ignore_errors=True)
    config = pipeline.PreprocessConfig(
        input=(input_path,),
        output_prefix=str(out / "bench"),
        append_eod=True,
        workers=workers,
        progress=False,
    )
    start = time.perf_counter()
    summary = pipeline.run_preprocess(config)
    return time.perf_counter() - start, summary.stats.tokens["text"]


def measure_ceiling(texts: list[str], engine: str) -> tuple[float, int]:
    """One batch call over in-memory texts on every core (tokenizer load not timed)."""
    from megatron_syne.preprocess.tokenizers import llama3_tokenizer_json, load_tokenizer

    if engine == "rust":
        tokenizer = load_tokenizer("HuggingFaceTokenizer", llama3_tokenizer_json())
    else:
        tokenizer = load_tokenizer()
    with _all_cores():
        start = time.perf_counter()
        if engine == "rust":
            encoded = tokenizer.encode_batch(texts)
        else:  # tiktoken's own batch API, a thread per core
            encoded = tokenizer._enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        seconds = time.perf_counter() - start
    return seconds, sum(len(ids) + 1 for ids in encoded)  # + EOD, as the others count it


_SHARED: dict = {}  # texts and tokenizer, inherited by forked ceiling processes


def _encode_share(bounds: tuple[int, int]) -> int:
    texts = _SHARED["texts"][bounds[0] : bounds[1]]
    if _SHARED["api"] == "array":
        return sum(len(ids) + 1 for ids in _SHARED["tokenizer"].encode_batch_numpy(texts))
    encode = _SHARED["tokenizer"].encode
    return sum(len(encode(text)) + 1 for text in texts)


def measure_ceiling_processes(texts: list[str], workers: int, api: str) -> tuple[float, int]:
    """tiktoken in one forked process per worker, each encoding a contiguous share of texts
    already in memory (equal characters per share); only token counts come back. This is the
    real tokenizer-alone ceiling for ``workers`` cores (tiktoken's own batch call runs threads
    that spend part of their time holding the GIL). ``api``: ``list`` (``encode_ordinary``,
    a Python int per token) or ``array`` (``encode_to_numpy``, what the tool runs). Tokenizer
    load not timed; fork timed."""
    from megatron_syne.preprocess.tokenizers import load_tokenizer

    _SHARED.update(texts=texts, tokenizer=load_tokenizer(), api=api)
    cumulative = list(itertools.accumulate(len(t) for t in texts))
    cuts = [0]
    for k in range(1, workers):
        cuts.append(bisect.bisect_left(cumulative, cumulative[-1] * k / workers))
    cuts.append(len(texts))
    start = time.perf_counter()
    with mp.get_context("fork").Pool(workers) as pool:
        counts = pool.map(_encode_share, list(zip(cuts[:-1], cuts[1:])), chunksize=1)
    seconds = time.perf_counter() - start
    _SHARED.clear()
    return seconds, sum(counts)


def _minimal_share(bounds: tuple[str, int, int]) -> int:
    from megatron_syne.preprocess.tokenizers import load_tokenizer

    path, start, end = bounds
    tokenizer = load_tokenizer()  # in each process, as every pipeline with workers pays it
    with open(path, "rb") as f:
        f.seek(start)
        lines = [line for line in f.read(end - start).splitlines() if line.strip()]
    texts = [json.loads(line)["text"] for line in lines]
    return sum(len(ids) + 1 for ids in tokenizer.encode_batch_numpy(texts))


def measure_minimal(input_path: str, workers: int) -> tuple[float, int]:
    """The least any JSONL -> tokens tool does: one forked process per worker loads the
    tokenizer, reads its line-aligned share of the file, parses each line and encodes the
    texts to arrays, counting tokens. No validation, hashing, metadata, output or crash
    safety: what the tool's own work costs is the difference to this row."""
    size = os.path.getsize(input_path)
    cuts = [0]
    with open(input_path, "rb") as f:
        for k in range(1, workers):
            f.seek(max(cuts[-1], size * k // workers))
            f.readline()
            cuts.append(min(size, f.tell()))
    cuts.append(size)
    shares = [(input_path, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    start = time.perf_counter()
    with mp.get_context("fork").Pool(workers) as pool:
        counts = pool.map(_minimal_share, shares, chunksize=1)
    return time.perf_counter() - start, sum(counts)


@contextlib.contextmanager
def _all_cores():
    """Native thread pools on every core (undo a RAYON_NUM_THREADS=1 from the environment)."""
    saved = os.environ.pop("RAYON_NUM_THREADS", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["RAYON_NUM_THREADS"] = saved


def measure_megatron(
    input_path: str, workdir: Path, workers: int, backend: str
) -> tuple[float, int]:
    out = workdir / "megatron"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    tokens = megatron_style(input_path, str(out / "bench"), workers, backend)
    return time.perf_counter() - start, tokens


def peak_rss_mb(input_path: str, workdir: Path, workers: int) -> float:
    """Peak RSS (MB) of the largest process of a CLI run (its own process tree only)."""
    out = workdir / "rss"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        str(REPO_ROOT / "tools/preprocess/preprocess_data.py"),
        "--input",
        input_path,
        "--output-prefix",
        str(out / "x"),
        "--append-eod",
        "--workers",
        str(workers),
        "--no-progress",
    ]
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True
    )
    return int(result.stdout.strip()) / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--input",
        default=None,
        help="a JSONL file with a 'text' field (default: "
        "the demo corpus built by tools/preprocess/sample_corpus.py)",
    )
    p.add_argument(
        "--target-mb",
        type=float,
        default=12.0,
        help="size of the demo corpus when --input is not given (default 12 MB)",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (best is kept)")
    p.add_argument(
        "--skip-transformers",
        action="store_true",
        help="skip the transformers-tokenizer Megatron-style baseline (slow to import)",
    )
    p.add_argument("--memory", action="store_true", help="also measure peak RSS at 1x and 4x input")
    p.add_argument("--markdown", default=None, help="append the result table to this file")
    args = p.parse_args(argv)

    # Imports are not timed for any pipeline (each tool pays them once at start-up).
    import megatron.core.datasets.indexed_dataset  # noqa: F401
    import torch  # noqa: F401

    if not args.skip_transformers:
        import transformers  # noqa: F401

    import megatron_syne.preprocess.pipeline  # noqa: F401

    workdir = Path(tempfile.mkdtemp(prefix="preprocess_bench_"))
    try:
        input_path = args.input
        if input_path is None:
            from megatron_syne.preprocess.corpus import CorpusConfig, build_demo_corpus

            input_path = str(workdir / "demo.jsonl")
            build_demo_corpus(CorpusConfig(input_path, target_mb=args.target_mb))
        with open(input_path, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        n_bytes = os.path.getsize(input_path)
        load = os.getloadavg()[0]
        print(
            f"input: {input_path} ({len(texts):,} documents, {n_bytes / 1e6:.1f} MB), "
            f"workers={args.workers}, cpus={os.cpu_count()}, load average before: {load:.2f}"
        )

        # Interleaved repeats (tool, ceiling, megatron-style, tool, ...): on a shared machine
        # each pipeline gets its chance at a quiet moment; the best run of each is kept.
        measures = {
            "tool": lambda: measure_tool(input_path, workdir, args.workers),
            "ceiling-tiktoken": lambda: measure_ceiling(texts, "tiktoken"),
            "ceiling-rust": lambda: measure_ceiling(texts, "rust"),
            "ceiling-processes": lambda: measure_ceiling_processes(texts, args.workers, "list"),
            "ceiling-processes-array": lambda: measure_ceiling_processes(
                texts, args.workers, "array"
            ),
            "minimal": lambda: measure_minimal(input_path, args.workers),
            "megatron-tiktoken": lambda: measure_megatron(
                input_path, workdir, args.workers, "tiktoken"
            ),
            "megatron-rust": lambda: measure_megatron(input_path, workdir, args.workers, "rust"),
        }
        if not args.skip_transformers:
            measures["megatron-transformers"] = lambda: measure_megatron(
                input_path, workdir, args.workers, "transformers"
            )
        runs: dict[str, list[tuple[float, int]]] = {name: [] for name in measures}
        for _ in range(args.repeats):
            for name, measure in measures.items():
                runs[name].append(measure())
        results = {name: min(r, key=lambda x: x[0]) for name, r in runs.items()}
        # transformers turns special-token strings in the text into control ids (the others
        # do not), so its count may differ by a few tokens: each rate uses its own count.
        counts = {name: tokens for name, (_, tokens) in results.items()}
        exact = {k: v for k, v in counts.items() if k != "megatron-transformers"}
        if len(set(exact.values())) != 1:
            raise RuntimeError(f"token counts differ between pipelines: {exact}")
        rate = {name: tokens / seconds for name, (seconds, tokens) in results.items()}
        ceiling_name = max((n for n in rate if n.startswith("ceiling-")), key=rate.get)
        ceiling_rate = rate[ceiling_name]
        labels = {
            "tool": "tool (preprocess_data.py, tiktoken engine)",
            "ceiling-tiktoken": "tokenizer alone: tiktoken encode_ordinary_batch, all cores",
            "ceiling-rust": "tokenizer alone: HF tokenizers encode_batch_fast, all cores",
            "ceiling-processes": "tokenizer alone: tiktoken lists, one process per worker",
            "ceiling-processes-array": "tokenizer alone: tiktoken arrays, one process per worker",
            "minimal": "reference: read + json.loads + tokenizer load + arrays, process/worker",
            "megatron-tiktoken": "megatron-style, tiktoken, 1 doc/call",
            "megatron-rust": "megatron-style, HF Rust tokenizer, 1 doc/call",
            "megatron-transformers": "megatron-style, HuggingFaceTokenizer (transformers)",
        }
        lines = [
            f"| pipeline ({args.workers} workers) | seconds | tokens/s | vs ceiling | tool is |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, (seconds, _) in results.items():
            speedup = "" if name == "tool" else f"{rate['tool'] / rate[name]:.2f}x"
            lines.append(
                f"| {labels[name]} | {seconds:.2f} | {rate[name]:,.0f} | "
                f"{rate[name] / ceiling_rate:.2f}x | {speedup} |"
            )
        lines.append("")
        megatron = [
            f"{name.split('-', 1)[1]} {rate['tool'] / rate[name]:.2f}x"
            for name in results
            if name.startswith("megatron-")
        ]
        lines.append(
            f"ceiling = {labels[ceiling_name].split(': ', 1)[1]}. tool / ceiling = "
            f"{rate['tool'] / ceiling_rate:.2f} (target >= 0.8); tool / megatron-style = "
            + ", ".join(megatron)
            + " (target >= 2)"
        )

        # The best-of figures favour short runs on a noisy machine (a quiet second is likelier
        # than a quiet two seconds); runs of one round ran back to back, so their ratios are
        # the paired view. Their median is printed next to the best-of ratio.
        def paired(name: str) -> float:
            """Median over rounds of (tool tokens/s) / (``name`` tokens/s)."""
            return statistics.median(
                (tool_tokens / tool_seconds) / (tokens / seconds)
                for (tool_seconds, tool_tokens), (seconds, tokens) in zip(runs["tool"], runs[name])
            )

        lines.append(
            f"median of per-round ratios: tool / ceiling = {paired(ceiling_name):.2f}; "
            f"tool / minimal reference = {paired('minimal'):.2f}; tool / megatron-style = "
            + ", ".join(
                f"{name.split('-', 1)[1]} {paired(name):.2f}x"
                for name in results
                if name.startswith("megatron-")
            )
        )
        lines.append(f"load average after: {os.getloadavg()[0]:.2f}")
        if args.memory:
            big = workdir / "x4.jsonl"
            with open(big, "wb") as out:
                for _ in range(4):
                    with open(input_path, "rb") as f:
                        shutil.copyfileobj(f, out)
            rss1 = peak_rss_mb(input_path, workdir, args.workers)
            rss4 = peak_rss_mb(str(big), workdir, args.workers)
            lines.append(
                f"peak RSS of the largest process: {rss1:.0f} MB at 1x input, "
                f"{rss4:.0f} MB at 4x input"
            )
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
