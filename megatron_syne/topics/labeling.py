"""Label every document of an indexed dataset with a topic; write ``topic`` and
``topic_confidence`` into its metadata sidecar.

Documents are decoded from the ``.bin`` with the tokenizer that wrote it (leading BOS and
trailing EOD removed), classified by a model from ``tools/topics/train.py`` restricted to the
topics of the document's ``lang``, and written in resumable chunk parts (see
:mod:`megatron_syne.scoring.parts`) under ``<prefix>.topics.parts/``. Work spreads over worker
processes on one node and over ``num_shards`` jobs (Slurm array tasks) across nodes; the merge
step (automatic with one shard, ``--merge-only`` after an array) writes the columns.
Empty documents get a null topic and are counted, never guessed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from megatron_syne.data.metadata import add_columns, read_metadata
from megatron_syne.scoring.parts import PartsDir, chunk_ranges
from megatron_syne.topics.classifier import TopicModel, load_topic_model, model_fingerprint
from megatron_syne.topics.documents import (
    document_tokens,
    open_indexed_dataset,
    strip_special,
)
from megatron_syne.utils.io import atomic_open


@dataclass
class LabelConfig:
    data_prefix: str
    model_dir: str
    tokenizer_type: str = "Llama3Tokenizer"
    tokenizer_model: str | None = None
    workers: int = 1  # processes on this node
    chunk_size: int = 1024  # documents per resumable part
    num_shards: int = 1  # jobs across nodes (Slurm array tasks)
    shard_index: int = 0
    parts_dir: str | None = None  # default: <prefix>.topics.parts
    merge: bool | None = None  # None: merge when num_shards == 1
    merge_only: bool = False
    restart: bool = False
    keep_parts: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1 or self.chunk_size < 1:
            raise ValueError(
                f"--workers ({self.workers}) and --chunk-size ({self.chunk_size}) must be >= 1"
            )
        if self.num_shards < 1:
            raise ValueError(f"--num-shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(
                f"--shard-index {self.shard_index} must be in [0, --num-shards {self.num_shards})"
            )
        if self.parts_dir is None:
            self.parts_dir = f"{self.data_prefix}.topics.parts"
        if self.merge is None:
            self.merge = self.num_shards == 1


@dataclass
class LabelSummary:
    n_documents: int
    n_chunks: int
    chunks_this_shard: int
    chunks_reused: int
    chunks_labelled: int
    documents_labelled: int
    empty_documents: int
    seconds: float
    worker_seconds: float  # summed wall time of the chunk jobs (one core each)
    workers: int
    merged: bool = False
    topic_counts: dict[str, int] = field(default_factory=dict)

    @property
    def documents_per_second(self) -> float:
        return self.documents_labelled / self.seconds if self.seconds else 0.0

    @property
    def documents_per_second_per_core(self) -> float:
        return self.documents_labelled / self.worker_seconds if self.worker_seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["documents_per_second"] = self.documents_per_second
        d["documents_per_second_per_core"] = self.documents_per_second_per_core
        return d


# Per-process state of a labelling worker (loaded once, reused for every chunk). Workers get
# token ids from the parent (cheap mmap reads) so they import neither torch nor megatron.
_WORKER: dict = {}


def _init_worker(
    config: LabelConfig, manifest: dict, model: TopicModel | None = None, tokenizer=None
) -> None:
    from megatron_syne.preprocess.tokenizers import load_tokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER.clear()
    _WORKER.update(
        config=config,
        model=model or load_topic_model(config.model_dir, device="cpu"),
        tokenizer=tokenizer or load_tokenizer(config.tokenizer_type, config.tokenizer_model),
        manifest=manifest,
    )


def _label_chunk(
    task: tuple[int, int, list[np.ndarray], list | None],
) -> tuple[int, int, int, float]:
    """Label documents [start, end) and write their part; returns (start, end, empty, seconds)."""
    t0 = time.perf_counter()
    start, end, documents, langs = task
    tokenizer, model = _WORKER["tokenizer"], _WORKER["model"]
    bos, eod = getattr(tokenizer, "bos", None), getattr(tokenizer, "eod", None)
    texts = []
    for tokens in documents:
        tokens = strip_special(tokens, bos, eod)
        texts.append(tokenizer.decode(tokens.tolist()) if len(tokens) else "")
    nonempty = [i for i, t in enumerate(texts) if t.strip()]
    topics: list[str | None] = [None] * len(texts)
    confidence = np.full(len(texts), np.nan, dtype=np.float32)
    if nonempty:
        predicted, conf = model.predict(
            [texts[i] for i in nonempty],
            [langs[i] for i in nonempty] if langs is not None else None,
        )
        for j, i in enumerate(nonempty):
            topics[i] = predicted[j]
            confidence[i] = conf[j]
    table = pa.table(
        {
            "topic": pa.array(topics, type=pa.string()),
            "topic_confidence": pa.array(confidence, type=pa.float32(), from_pandas=True),
        }
    )
    PartsDir(_WORKER["config"].parts_dir, _WORKER["manifest"]).write_part(start, end, table)
    return start, end, len(texts) - len(nonempty), time.perf_counter() - t0


def _tasks(config: LabelConfig, pending: list[tuple[int, int]], langs: list | None):
    dataset = open_indexed_dataset(config.data_prefix)
    for start, end in pending:
        documents = [document_tokens(dataset, i) for i in range(start, end)]
        yield start, end, documents, langs[start:end] if langs is not None else None


def _bounded_imap(pool, fn, tasks, max_in_flight: int):
    """imap_unordered that reads at most ``max_in_flight`` tasks ahead (Pool.imap would read
    the whole corpus into its queue)."""
    from collections import deque

    in_flight: deque = deque()
    for task in tasks:
        in_flight.append(pool.apply_async(fn, (task,)))
        while len(in_flight) >= max_in_flight:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


def label_dataset(config: LabelConfig) -> LabelSummary:
    """Label this shard's pending chunks, then merge when asked; returns the run summary."""
    from tqdm import tqdm

    t0 = time.time()
    meta = read_metadata(config.data_prefix)  # checks the row count against the .idx
    n_docs = meta.num_rows
    langs = meta.column("lang").to_pylist() if "lang" in meta.column_names else None
    ranges = chunk_ranges(n_docs, config.chunk_size)
    model = tokenizer = None
    if not config.merge_only:
        # Load (and so validate) the model and tokenizer before any resume state is written: a
        # run that cannot start must not leave a manifest that refuses the corrected rerun.
        from megatron_syne.preprocess.tokenizers import load_tokenizer

        model = load_topic_model(config.model_dir, device="cpu")
        tokenizer = load_tokenizer(config.tokenizer_type, config.tokenizer_model)
    manifest = {
        "job": "topic-labelling",
        "n_documents": n_docs,
        "chunk_size": config.chunk_size,
        "model": str(Path(config.model_dir).resolve()),
        "model_fingerprint": model_fingerprint(config.model_dir),
        "tokenizer": [config.tokenizer_type, config.tokenizer_model],
    }
    parts = PartsDir(config.parts_dir, manifest, restart=config.restart and not config.merge_only)
    mine = ranges[config.shard_index :: config.num_shards]
    pending = [] if config.merge_only else parts.missing(mine)
    summary = LabelSummary(
        n_documents=n_docs,
        n_chunks=len(ranges),
        chunks_this_shard=len(mine),
        chunks_reused=len(mine) - len(pending) if not config.merge_only else 0,
        chunks_labelled=0,
        documents_labelled=0,
        empty_documents=0,
        seconds=0.0,
        worker_seconds=0.0,
        workers=config.workers,
    )
    if pending:
        n_pending_docs = sum(e - s for s, e in pending)
        bar = tqdm(total=n_pending_docs, unit="doc", desc="labelling", disable=not config.progress)
        if config.workers == 1:
            _init_worker(config, manifest, model, tokenizer)
            results = map(_label_chunk, _tasks(config, pending, langs))
            pool = None
        else:
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(
                config.workers,
                initializer=_init_worker,
                initargs=(config, manifest),
            )
            results = _bounded_imap(
                pool, _label_chunk, _tasks(config, pending, langs), 2 * config.workers
            )
        try:
            for start, end, empty, seconds in results:
                summary.chunks_labelled += 1
                summary.documents_labelled += end - start
                summary.empty_documents += empty
                summary.worker_seconds += seconds
                bar.update(end - start)
                bar.set_postfix(docs_per_s=f"{bar.n / max(bar.format_dict['elapsed'], 1e-9):.0f}")
        finally:
            bar.close()
            if pool is not None:
                pool.close()
                pool.join()
    if config.merge or config.merge_only:
        table = parts.merge(ranges)
        add_columns(
            config.data_prefix,
            {"topic": table.column("topic"), "topic_confidence": table.column("topic_confidence")},
        )
        counts = Counter(t for t in table.column("topic").to_pylist())
        summary.topic_counts = {
            ("<empty document>" if k is None else k): v for k, v in sorted(counts.items(), key=str)
        }
        summary.merged = True
        if not config.keep_parts:
            parts.remove()
    summary.seconds = time.time() - t0
    if summary.merged:
        with atomic_open(f"{config.data_prefix}.topics.summary.json", "w") as f:
            json.dump(summary.to_dict(), f, indent=2, ensure_ascii=False)
    return summary


def format_summary(summary: LabelSummary) -> str:
    lines = [
        f"documents in dataset: {summary.n_documents} ({summary.n_chunks} chunks)",
        f"this shard: {summary.chunks_this_shard} chunks, {summary.chunks_reused} reused from "
        f"an earlier run, {summary.chunks_labelled} labelled now "
        f"({summary.documents_labelled} documents, {summary.empty_documents} empty -> null topic)",
        f"time: {summary.seconds:.1f} s; {summary.documents_per_second:.1f} documents/s with "
        f"{summary.workers} worker(s); {summary.documents_per_second_per_core:.1f} documents/s "
        "per core",
    ]
    if summary.merged:
        lines.append("documents per topic:")
        total = sum(summary.topic_counts.values()) or 1
        for topic, count in sorted(summary.topic_counts.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {topic:<28} {count:>9}  {100 * count / total:5.1f}%")
    else:
        lines.append("not merged yet: after all shards finish run label.py ... --merge-only")
    return "\n".join(lines)
