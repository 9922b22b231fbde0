"""Raw text -> Megatron ``.bin/.idx`` + metadata sidecar: parallel, lossless, resumable.

How a run is laid out (see docs/readme/preprocessing.md):

1. Inputs (files, globs, directories) are listed in sorted order; with ``num_shards > 1`` this
   process keeps its slice of the files (a Slurm array task = one shard).
2. Files are cut into work units (readers.plan_units). Each worker process (forked once the
   tokenizer is loaded) reads its units straight from disk, validates records, tokenizes them
   in batches (tiktoken returns numpy arrays: no Python int per token) and writes the unit as a
   small indexed dataset with its own metadata and rejects under ``<prefix>.parts/`` (temporary
   names, renamed, then a ``.done.json`` manifest).
3. The units are concatenated in unit order into the final files (temporary names, renamed at
   the end). Without ``--dedup`` this happens while the workers run: a unit is appended as soon
   as it and every unit before it are done. With ``--dedup exact`` it waits for every unit's
   hashes, then drops exact duplicates while concatenating.

A run killed at any moment and restarted with the same arguments reuses the finished units
(their manifests carry a fingerprint of every setting and input that determines their bytes) and
produces output byte-identical to an uninterrupted run. The unit layout (how finely files are
cut) may follow the worker count, the final bytes never do: documents are concatenated in input
order and the metadata is written in fixed-size row groups.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import gc
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megatron_syne.data.metadata import metadata_path, metadata_schema
from megatron_syne.preprocess.documents import (
    CORE_METADATA_KEYS,
    Document,
    RejectReason,
    ValidationConfig,
    Validator,
    reject_record,
)
from megatron_syne.preprocess.indexed import (
    IndexedMerger,
    TokenBinWriter,
    bin_path,
    idx_path,
    merge_indexed,
    optimal_dtype,
    write_index,
)
from megatron_syne.preprocess.merge import exact_duplicates
from megatron_syne.preprocess.readers import (
    InputError,
    WorkUnit,
    assign_shard,
    discover_inputs,
    input_format,
    iter_jsonl_lines,
    iter_parquet_rows,
    parquet_columns,
    plan_units,
)
from megatron_syne.preprocess.tokenizers import TokenizerSpec, tokenizer_files
from megatron_syne.utils.io import atomic_open, atomic_path

MIN_UNIT_BYTES = 256 << 10
BATCH_MAX_CHARS = 4_000_000  # characters per encode_batch call, whatever --batch-size says
FORMAT_VERSION = 2  # bump when unit output bytes change, so stale partitions are redone


class PreprocessError(RuntimeError):
    """The run cannot finish (too many rejects, bad inputs); the message says what to do."""


@dataclass
class PreprocessConfig:
    """Settings of one preprocessing run (command-line flags map one to one onto fields)."""

    input: tuple[str, ...]
    output_prefix: str
    json_keys: tuple[str, ...] = ("text",)
    tokenizer_type: str = "Llama3Tokenizer"
    tokenizer_model: str | None = None
    append_eod: bool = False
    prepend_bos: bool = False
    workers: int = 1
    partitions: int = 1  # split each plain JSONL file into at least this many units
    partition_bytes: int = 64 << 20  # target input bytes per unit
    batch_size: int = 512  # documents per encode_batch call
    metadata_keys: tuple[str, ...] = CORE_METADATA_KEYS
    metadata_defaults: tuple[tuple[str, str], ...] = ()
    max_chars: int = 5_000_000
    max_reject_fraction: float = 0.01
    dedup: str | None = None  # None or "exact"
    num_shards: int = 1
    shard_index: int = 0
    keep_partitions: bool = False
    progress: bool = True  # tqdm bar; when False, a log line every log_interval documents
    log_interval: int = 100_000  # documents

    def __post_init__(self) -> None:
        self.input = tuple(self.input) if not isinstance(self.input, str) else (self.input,)
        self.json_keys = tuple(self.json_keys)
        self.metadata_keys = tuple(self.metadata_keys)
        self.metadata_defaults = tuple((str(k), str(v)) for k, v in self.metadata_defaults)
        if not self.input:
            raise ValueError("--input: give at least one file, glob or directory")
        if not self.output_prefix or self.output_prefix.endswith(("/", os.sep)):
            raise ValueError(
                f"--output-prefix {self.output_prefix!r} names no file: give a directory and a "
                "name, e.g. out/web-cn (writes out/web-cn_text_document.bin/.idx)"
            )
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.partitions < 1:
            raise ValueError(f"--partitions must be >= 1, got {self.partitions}")
        if self.partition_bytes < 1 << 16:
            raise ValueError("--partition-bytes must be at least 64 KiB")
        if self.log_interval < 1:
            raise ValueError(f"--log-interval must be >= 1, got {self.log_interval}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError("--max-reject-fraction must be in [0, 1]")
        if self.dedup not in (None, "none", "exact"):
            raise ValueError(f"--dedup must be 'exact' or 'none', got {self.dedup!r}")
        if self.dedup == "none":
            self.dedup = None
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(
                f"--shard-index {self.shard_index} is outside [0, --num-shards {self.num_shards})"
            )
        unknown = {k for k, _ in self.metadata_defaults} - set(self.metadata_keys)
        if unknown:
            raise ValueError(f"--metadata-defaults for keys not in --metadata-keys: {unknown}")
        self.validation  # noqa: B018 -- validates json/metadata keys and max_chars
        TokenizerSpec(self.tokenizer_type, self.tokenizer_model)

    @property
    def validation(self) -> ValidationConfig:
        return ValidationConfig(
            self.json_keys, self.metadata_keys, self.metadata_defaults, self.max_chars
        )

    @property
    def shard_prefix(self) -> str:
        """The output prefix of this shard (``--output-prefix`` itself when not sharded)."""
        if self.num_shards == 1:
            return self.output_prefix
        return f"{self.output_prefix}-shard{self.shard_index:05d}-of-{self.num_shards:05d}"

    def dataset_prefix(self, key: str) -> str:
        """Megatron's naming: ``<output-prefix>_<json-key>_document`` (the --data-path)."""
        return f"{self.shard_prefix}_{key}_document"

    @property
    def rejects_path(self) -> Path:
        return Path(f"{self.shard_prefix}.rejects.jsonl")

    @property
    def parts_dir(self) -> Path:
        return Path(f"{self.shard_prefix}.parts")

    @property
    def extra_metadata_keys(self) -> tuple[str, ...]:
        return tuple(k for k in self.metadata_keys if k not in CORE_METADATA_KEYS)


@dataclass
class UnitStats:
    """Counts for one work unit (records = input lines or Parquet rows)."""

    records: int = 0
    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # per json key, EOD/BOS included
    characters: dict[str, int] = field(default_factory=dict)
    rejects: dict[str, int] = field(default_factory=dict)  # reason -> count
    # Compressed bytes after corrupt data (lines that could not be decoded, so not counted in
    # records): they count against --max-reject-fraction as a share of the input bytes.
    unread_bytes: int = 0

    def add(self, other: UnitStats) -> None:
        self.records += other.records
        self.documents += other.documents
        self.unread_bytes += other.unread_bytes
        for mine, theirs in (
            (self.tokens, other.tokens),
            (self.characters, other.characters),
            (self.rejects, other.rejects),
        ):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value


@dataclass(frozen=True)
class UnitTask:
    unit: WorkUnit
    parts_dir: str
    fingerprint: str
    config: PreprocessConfig
    dtype: str


@dataclass
class PreprocessSummary:
    output_prefixes: dict[str, str]  # json key -> dataset prefix
    rejects_path: str
    files: int
    units: int
    units_reused: int
    stats: UnitStats
    duplicates: int
    seconds: float

    @property
    def rejected(self) -> int:
        return sum(self.stats.rejects.values())

    def format(self) -> str:
        key = next(iter(self.output_prefixes))
        tokens = self.stats.tokens.get(key, 0)
        lines = [
            f"inputs: {self.files} files in {self.units} units "
            f"({self.units_reused} reused from an interrupted run)",
            f"records: {self.stats.records:,}  documents written: "
            f"{self.stats.documents - self.duplicates:,}  "
            f"rejected: {self.rejected:,}  duplicates dropped: {self.duplicates:,}",
        ]
        if self.stats.records == 0:
            lines.append("  note: the input holds no records (empty files): the dataset is empty")
        for reason, count in sorted(self.stats.rejects.items()):
            lines.append(f"  reject {reason}: {count:,}")
        if self.stats.unread_bytes:
            lines.append(
                f"  corrupt compressed data: {self.stats.unread_bytes:,} bytes could not be "
                "decoded (see corrupt_stream in the rejects file)"
            )
        for k, prefix in self.output_prefixes.items():
            lines.append(f"{k}: {self.stats.tokens.get(k, 0):,} tokens -> {prefix}.bin/.idx")
        lines.append(f"rejects: {self.rejects_path}")
        rate = tokens / self.seconds if self.seconds > 0 else 0.0
        lines.append(f"time: {self.seconds:.1f} s ({rate:,.0f} tokens/s)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- worker side

_WORKER: dict = {}


def _init_worker(counters, single_threaded: bool) -> None:
    if single_threaded:  # a forked pool worker
        # Everything inherited from the parent (modules, the tokenizer's tables) moves to the
        # permanent generation: the worker's garbage collections no longer walk it (nor
        # write to its pages, which would copy them).
        gc.freeze()
        # One process per core already: native thread pools would only oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
    _WORKER["counters"] = counters


def _tokenizer(config: PreprocessConfig):
    key = (config.tokenizer_type, config.tokenizer_model)
    if _WORKER.get("tokenizer_key") != key:
        _WORKER["tokenizer"] = TokenizerSpec(*key).load()
        _WORKER["tokenizer_key"] = key
    return _WORKER["tokenizer"]


def _unit_prefix(parts_dir: str | Path, unit: WorkUnit, key: str) -> Path:
    return Path(parts_dir) / f"{unit.name}_{key}_document"


def _unit_rejects(parts_dir: str | Path, unit: WorkUnit) -> Path:
    return Path(parts_dir) / f"{unit.name}.rejects.jsonl"


def _unit_manifest(parts_dir: str | Path, unit: WorkUnit) -> Path:
    return Path(parts_dir) / f"{unit.name}.done.json"


def _iter_unit_records(unit: WorkUnit, validator: Validator, config: PreprocessConfig):
    """Documents and reject records of a unit, in input order."""
    if unit.fmt == "parquet":
        columns = parquet_columns(unit.path)
        missing = [k for k in config.json_keys if k not in columns]
        if missing:
            raise InputError(
                f"{unit.path}: Parquet file has no column {missing} (columns: {columns}); "
                "pass the text column with --json-keys"
            )
        for records in iter_parquet_rows(
            unit, list(config.json_keys) + list(config.metadata_keys), config.batch_size
        ):
            for record in records:
                yield validator.from_record(record.pop("__line__"), record)
        return
    for line in iter_jsonl_lines(unit):
        if line.truncated:
            problem = (
                "compressed data is corrupt"
                if line.corrupt
                else "compressed stream ends before its end marker"
            )
            where = (
                f"after line {line.number - 1}; this is the partial last line"
                if line.number > 1
                else "before the first line (is it really compressed as its extension says?)"
            )
            lost = ""
            if line.unread_bytes:
                size = max(os.path.getsize(unit.path), 1)
                lost = (
                    f"; {line.unread_bytes:,} of {size:,} compressed bytes "
                    f"({line.unread_bytes / size:.0%}) could not be decoded"
                )
            record = reject_record(
                unit.path,
                line.number,
                RejectReason.CORRUPT_STREAM if line.corrupt else RejectReason.TRUNCATED_STREAM,
                f"{problem} {where}{lost}; the rest of the file is unreadable: re-copy or "
                "re-download the file",
                line.raw,
            )
            record["unread_bytes"] = line.unread_bytes
            yield record
        else:
            yield validator.from_line(line.number, line.raw)


def process_unit(task: UnitTask) -> UnitStats:
    """Tokenize one work unit into ``<parts>/<unit>_<key>_document.{bin,idx,meta.parquet}``."""
    config, unit = task.config, task.unit
    tokenizer = _tokenizer(config)
    dtype = np.dtype(task.dtype).type
    validator = Validator(config.validation, unit.path)
    counters = _WORKER.get("counters")
    stats = UnitStats(
        tokens={k: 0 for k in config.json_keys}, characters={k: 0 for k in config.json_keys}
    )
    rejects: Counter[str] = Counter()
    schema = metadata_schema(config.extra_metadata_keys)
    prefixes = {k: _unit_prefix(task.parts_dir, unit, k) for k in config.json_keys}

    with contextlib.ExitStack() as stack:
        tmp_bins = {k: stack.enter_context(atomic_path(bin_path(p))) for k, p in prefixes.items()}
        writers = {k: TokenBinWriter(tmp_bins[k], dtype) for k in config.json_keys}
        # Metadata is written batch by batch (small row groups; the final merge re-groups
        # them), so a unit's memory does not grow with its number of documents.
        meta_writers = {
            k: stack.enter_context(
                pq.ParquetWriter(
                    stack.enter_context(atomic_path(metadata_path(p))), schema, compression="zstd"
                )
            )
            for k, p in prefixes.items()
        }
        reject_file = stack.enter_context(
            atomic_open(_unit_rejects(task.parts_dir, unit), "w", encoding="utf-8")
        )
        pending: list[Document] = []

        encode_arrays = getattr(tokenizer, "encode_batch_numpy", None)
        bos = tokenizer.bos if config.prepend_bos else None
        eod = tokenizer.eod if config.append_eod else None
        metadata_columns = [
            name
            for name in schema.names
            if name in CORE_METADATA_KEYS or name in config.extra_metadata_keys
        ]

        def flush() -> None:
            first_key_tokens = stats.tokens[config.json_keys[0]]
            for i, key in enumerate(config.json_keys):
                texts = [d.texts[i] for d in pending]
                # Arrays when the tokenizer can return them (tiktoken: no Python int per token).
                encoded = (encode_arrays or tokenizer.encode_batch)(texts)
                n_tokens = writers[key].add_documents(encoded, bos=bos, eod=eod)
                n_chars = [len(t) for t in texts]
                stats.tokens[key] += int(n_tokens.sum(dtype=np.int64))
                stats.characters[key] += sum(n_chars)
                columns = {
                    name: [d.metadata.get(name) for d in pending] for name in metadata_columns
                }
                columns.update(
                    n_tokens=n_tokens,
                    n_chars=n_chars,
                    hash=[d.hashes[i] for d in pending],
                    input_file=[unit.path] * len(pending),
                    input_line=[d.line for d in pending],
                )
                meta_writers[key].write_table(pa.table(columns, schema=schema))
            stats.documents += len(pending)
            new_tokens = stats.tokens[config.json_keys[0]] - first_key_tokens
            if counters is not None:
                with counters.get_lock():
                    counters[0] += len(pending)
                    counters[1] += new_tokens
            if "on_batch" in _WORKER:
                _WORKER["on_batch"](len(pending), new_tokens)
            pending.clear()

        pending_chars = 0
        for item in _iter_unit_records(unit, validator, config):
            stats.records += 1
            if isinstance(item, Document):
                pending.append(item)
                pending_chars += sum(map(len, item.texts))
                # A batch also ends at BATCH_MAX_CHARS, so long documents (books, code files)
                # cannot make one batch's token lists large: memory stays bounded.
                if len(pending) >= config.batch_size or pending_chars >= BATCH_MAX_CHARS:
                    flush()
                    pending_chars = 0
            else:
                rejects[item["reason"]] += 1
                stats.unread_bytes += item.get("unread_bytes", 0)
                reject_file.write(json.dumps(item, ensure_ascii=False) + "\n")
        if pending:
            flush()
        for writer in writers.values():
            writer.close()
        for key, prefix in prefixes.items():
            lengths = writers[key].lengths
            with atomic_path(idx_path(prefix)) as tmp_idx:
                write_index(tmp_idx, dtype, lambda lengths=lengths: iter([lengths]))
    # The manifest is written last: its presence means every file above is complete.
    stats.rejects = dict(sorted(rejects.items()))
    with atomic_open(_unit_manifest(task.parts_dir, unit), "w") as f:
        json.dump({"fingerprint": task.fingerprint, "stats": asdict(stats)}, f)
    return stats


# ----------------------------------------------------------------------------- driver side


def _file_identity(path: str) -> dict:
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _unit_fingerprint(config: PreprocessConfig, unit: WorkUnit, tokenizer_files: list) -> str:
    determining = {
        "format_version": FORMAT_VERSION,
        "unit": asdict(unit),
        "input": _file_identity(unit.path),
        "tokenizer": [config.tokenizer_type, tokenizer_files],
        "json_keys": config.json_keys,
        "append_eod": config.append_eod,
        "prepend_bos": config.prepend_bos,
        "batch_size": config.batch_size,
        "metadata_keys": config.metadata_keys,
        "metadata_defaults": config.metadata_defaults,
        "max_chars": config.max_chars,
    }
    blob = json.dumps(determining, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _tokenizer_files(config: PreprocessConfig) -> list:
    files = tokenizer_files(config.tokenizer_type, config.tokenizer_model)
    return [_file_identity(str(p)) for p in files]


def _unit_is_done(task: UnitTask) -> UnitStats | None:
    manifest = _unit_manifest(task.parts_dir, task.unit)
    if not manifest.is_file():
        return None
    try:
        record = json.loads(manifest.read_text())
    except ValueError:
        return None
    if record.get("fingerprint") != task.fingerprint:
        return None
    for key in task.config.json_keys:
        prefix = _unit_prefix(task.parts_dir, task.unit, key)
        if not all(
            p.is_file() for p in (bin_path(prefix), idx_path(prefix), metadata_path(prefix))
        ):
            return None
    return UnitStats(**record["stats"])


def _remove_stale_temporaries(directory: Path, names: list[str]) -> None:
    """Temporary files a killed run left behind (``.<name>.<random>.tmp``)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.endswith(".tmp") and any(entry.name.startswith(f".{n}.") for n in names):
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def _environment(**variables: str):
    """Set environment variables for the block (inherited by processes forked inside it)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Progress:
    """A tqdm bar over units (interactive), or a log line every ``log_interval`` documents
    (``--no-progress``, e.g. Slurm logs). Counts come from workers through shared counters."""

    def __init__(self, config: PreprocessConfig, units: int) -> None:
        self.log_interval = config.log_interval
        self.units, self.units_done = units, 0
        self.next_log = config.log_interval
        self.start = time.perf_counter()
        self.bar = None
        if config.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=units, unit="unit", desc="preprocess", dynamic_ncols=True)

    def update(self, documents: int, tokens: int, units_done: int = 0) -> None:
        self.units_done += units_done
        if self.bar is not None:
            self.bar.update(units_done)
            self.bar.set_postfix(docs=documents, tokens=tokens, refresh=False)
        elif documents >= self.next_log:
            elapsed = time.perf_counter() - self.start
            print(
                f"processed {documents:,} documents, {tokens:,} tokens "
                f"({tokens / max(elapsed, 1e-9):,.0f} tokens/s), "
                f"units {self.units_done}/{self.units}",
                flush=True,
            )
            self.next_log = (documents // self.log_interval + 1) * self.log_interval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_units(
    tasks: list[UnitTask], config: PreprocessConfig, on_done: Callable[[int], None]
) -> list[UnitStats]:
    """Process units (largest first) with ``config.workers`` processes; results in task order.

    ``on_done(i)`` is called in this process as soon as ``tasks[i]`` is finished (the caller
    merges finished units while the workers go on)."""
    results: list[UnitStats | None] = [None] * len(tasks)
    progress = _Progress(config, len(tasks))
    # Larger units first (a large one started last would leave the other workers idle); units
    # of one power-of-two size class in input order, so the caller can merge them as they
    # finish.
    order = sorted(range(len(tasks)), key=lambda i: (-tasks[i].unit.size.bit_length(), i))
    if config.workers == 1:
        # In the main process; the tokenizer may use its native thread pool on every core.
        counters = [0, 0]

        def on_batch(documents: int, tokens: int) -> None:
            counters[0] += documents
            counters[1] += tokens
            progress.update(*counters)

        _init_worker(None, single_threaded=False)
        _WORKER["on_batch"] = on_batch
        try:
            for i in order:
                results[i] = process_unit(tasks[i])
                progress.update(*counters, units_done=1)
                on_done(i)
        finally:
            _WORKER.pop("on_batch", None)
    else:
        # fork (Linux): workers inherit the imported modules and the loaded tokenizer, so they
        # start in milliseconds instead of re-importing and re-loading (seconds each).
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        context = mp.get_context(method)
        shared = context.Array("q", 2)
        with (
            _environment(TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1"),
            cf.ProcessPoolExecutor(
                max_workers=min(config.workers, max(len(tasks), 1)),
                mp_context=context,
                initializer=_init_worker,
                initargs=(shared, True),
            ) as pool,
        ):
            futures = {pool.submit(process_unit, tasks[i]): i for i in order}
            pending = set(futures)
            try:
                while pending:
                    done, pending = cf.wait(pending, timeout=0.5)
                    for future in done:
                        results[futures[future]] = future.result()
                    progress.update(shared[0], shared[1], units_done=len(done))
                    for future in sorted(done, key=futures.get):
                        on_done(futures[future])
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    progress.close()
    return results  # type: ignore[return-value]


def _guided_unit_sizes(
    size: int, remaining: int, total: int, workers: int, largest: int
) -> list[int]:
    """Unit sizes for a plain JSONL file of ``size`` bytes when ``remaining`` bytes (this file
    included) of ``total`` are still to be planned: each unit takes 1/(2 x workers) of what
    remains (guided self-scheduling), at most ``largest`` and at least 1/(16 x workers) of the
    input. Large units come first and small ones last, so the workers finish together even when
    the machine's speed varies during the run (about 6 units per worker). Only the
    resume granularity depends on this: the output bytes never do."""
    smallest = min(largest, max(MIN_UNIT_BYTES, total // (16 * workers)))
    sizes: list[int] = []
    planned = 0
    while planned < size:
        step = min(largest, max(smallest, remaining // (2 * workers)))
        sizes.append(step)
        planned += step
        remaining -= step
    return sizes


def run_preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Run (or resume) preprocessing; returns the summary. See the module docstring."""
    start_time = time.perf_counter()
    files = assign_shard(discover_inputs(list(config.input)), config.num_shards, config.shard_index)
    units: list[WorkUnit] = []
    total_bytes = sum(os.path.getsize(path) for path in files)
    remaining = total_bytes
    for path in files:
        size = os.path.getsize(path)
        per_file = config.partition_bytes
        if config.partitions > 1:
            per_file = min(per_file, max(size // config.partitions + 1, 1 << 16))
        cut_sizes = None
        if config.workers > 1 and input_format(path) == "jsonl":
            cut_sizes = _guided_unit_sizes(size, remaining, total_bytes, config.workers, per_file)
        elif config.workers > 1:  # Parquet row groups: about 4 units per worker
            per_file = min(per_file, max(MIN_UNIT_BYTES, -(-total_bytes // (4 * config.workers))))
        base = len(units)
        planned = plan_units([path], per_file, cut_sizes)
        units += [replace(u, index=base + i) for i, u in enumerate(planned)]
        remaining -= size
    tokenizer = _tokenizer(config)  # fails early on a bad tokenizer; cached for workers=1
    dtype = np.dtype(optimal_dtype(tokenizer.vocab_size)).name
    tokenizer_files = _tokenizer_files(config)

    parts_dir = config.parts_dir
    parts_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(parts_dir, [u.name for u in units])
    final_names = [Path(config.dataset_prefix(k)).name for k in config.json_keys]
    final_names.append(config.rejects_path.name)
    _remove_stale_temporaries(config.parts_dir.parent, final_names)

    tasks = [
        UnitTask(u, str(parts_dir), _unit_fingerprint(config, u, tokenizer_files), config, dtype)
        for u in units
    ]
    done = {i: stats for i, t in enumerate(tasks) if (stats := _unit_is_done(t)) is not None}
    todo = [i for i in range(len(tasks)) if i not in done]
    unit_prefixes = {
        k: [str(_unit_prefix(parts_dir, u, k)) for u in units] for k in config.json_keys
    }
    unit_rejects = [_unit_rejects(parts_dir, u) for u in units]
    duplicates_records: list[dict] = []
    with contextlib.ExitStack() as merging:
        # Without deduplication the final files are written while the workers run: each unit
        # is appended as soon as it and every unit before it are finished, so only the last
        # units are merged after the workers stop. (Deduplication needs every hash first.)
        mergers = {}
        if config.dedup is None:
            schema = metadata_schema(config.extra_metadata_keys)
            mergers = {
                k: merging.enter_context(
                    IndexedMerger(config.dataset_prefix(k), np.dtype(dtype).type, schema)
                )
                for k in config.json_keys
            }
        finished = [i in done for i in range(len(tasks))]
        merged = 0  # units [0, merged) are in the final files

        def merge_ready() -> None:
            nonlocal merged
            while mergers and merged < len(tasks) and finished[merged]:
                for key, merger in mergers.items():
                    merger.add(unit_prefixes[key][merged])
                merged += 1

        def unit_finished(position: int) -> None:
            finished[todo[position]] = True
            merge_ready()

        merge_ready()  # units reused from an interrupted run
        fresh = _run_units([tasks[i] for i in todo], config, unit_finished)
        all_stats: list[UnitStats] = []
        fresh_iter = iter(fresh)
        for i in range(len(tasks)):
            all_stats.append(done[i] if i in done else next(fresh_iter))
        total = UnitStats(
            tokens={k: 0 for k in config.json_keys}, characters={k: 0 for k in config.json_keys}
        )
        for stats in all_stats:
            total.add(stats)

        rejected = sum(total.rejects.values())
        fraction = rejected / total.records if total.records else 0.0
        # Corrupt compressed data hides an unknown number of lines: its share of the input
        # bytes counts against the same limit, so a half-unreadable corpus cannot pass.
        unread_fraction = total.unread_bytes / total_bytes if total_bytes else 0.0
        if max(fraction, unread_fraction) > config.max_reject_fraction:
            _concatenate_rejects(unit_rejects, [], config.rejects_path)
            stale = _set_aside_final_outputs(config)
            reasons = ", ".join(f"{r}={c}" for r, c in sorted(total.rejects.items()))
            what = f"{rejected} of {total.records} input records rejected ({fraction:.2%})"
            if total.unread_bytes:
                what += (
                    f", and {total.unread_bytes:,} of {total_bytes:,} input bytes "
                    f"({unread_fraction:.2%}) are corrupt compressed data that could not be "
                    "decoded"
                )
            raise PreprocessError(
                f"{what} > --max-reject-fraction {config.max_reject_fraction:.2%} ({reasons}); "
                f"see {config.rejects_path}. Fix the inputs or raise --max-reject-fraction; "
                f"finished units are kept in {parts_dir} and reused by the next run"
                + (
                    ". The dataset an earlier run left at this prefix was renamed "
                    f"({', '.join(stale)}) so it cannot be taken for this run's output; rename "
                    "it back to use it"
                    if stale
                    else ""
                )
            )
        if config.dedup is None:
            if merged != len(tasks):  # every unit finished, so every unit was appended
                raise RuntimeError(f"internal error: {merged} of {len(tasks)} units merged")
            for merger in mergers.values():
                merger.finish()
        else:
            keep, duplicates_records = exact_duplicates(unit_prefixes[config.json_keys[0]])
            for key in config.json_keys:
                result = merge_indexed(unit_prefixes[key], config.dataset_prefix(key), keep=keep)
                # The counts describe what was written: without the dropped duplicates.
                total.tokens[key] = result.tokens
                n_chars = pq.read_table(
                    metadata_path(config.dataset_prefix(key)), columns=["n_chars"]
                ).column(0)
                total.characters[key] = int(n_chars.to_numpy().sum(dtype=np.int64))
    _concatenate_rejects(unit_rejects, duplicates_records, config.rejects_path)
    if not config.keep_partitions:
        # Manifests first: a run killed during this cleanup never leaves a manifest whose
        # unit files are already gone (the next run simply redoes those units).
        for manifest in parts_dir.glob("*.done.json"):
            manifest.unlink(missing_ok=True)
        shutil.rmtree(parts_dir, ignore_errors=True)
    total.rejects = dict(sorted(total.rejects.items()))
    return PreprocessSummary(
        output_prefixes={k: config.dataset_prefix(k) for k in config.json_keys},
        rejects_path=str(config.rejects_path),
        files=len(files),
        units=len(units),
        units_reused=len(done),
        stats=total,
        duplicates=len(duplicates_records),
        seconds=time.perf_counter() - start_time,
    )


def _set_aside_final_outputs(config: PreprocessConfig) -> list[str]:
    """Rename the dataset files an earlier run left at this prefix to ``<name>.previous`` (so
    they are neither taken for this failed run's output nor lost); their new names."""
    moved = []
    for key in config.json_keys:
        prefix = config.dataset_prefix(key)
        for path in (bin_path(prefix), idx_path(prefix), metadata_path(prefix)):
            if path.is_file():
                target = path.with_name(path.name + ".previous")
                os.replace(path, target)
                moved.append(target.name)
    return moved


def _concatenate_rejects(parts: list[Path], extra: list[dict], final: Path) -> None:
    with atomic_open(final, "wb") as out:
        for part in parts:
            if part.is_file():
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        for record in extra:
            out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
