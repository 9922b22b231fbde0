"""Streaming input: discover input files, cut them into work units, read records with bounded memory.

A *work unit* is the resumable, parallel piece of preprocessing: a whole compressed file (gzip and
zstd streams cannot be entered in the middle), a byte range of a plain JSONL file (cut at line
starts), or a range of row groups of a Parquet file. Units are concatenated in order, so how
finely the inputs are cut never changes the output.
"""

from __future__ import annotations

import glob
import itertools
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
GZIP_SUFFIXES = tuple(s + ".gz" for s in JSONL_SUFFIXES)
ZSTD_SUFFIXES = tuple(s + ".zst" for s in JSONL_SUFFIXES) + tuple(
    s + ".zstd" for s in JSONL_SUFFIXES
)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + GZIP_SUFFIXES + ZSTD_SUFFIXES + PARQUET_SUFFIXES

READ_CHUNK_BYTES = 4 << 20
# Compressed input is fed to the decoder in small pieces: when the data is corrupt, only the
# output of the failing piece is lost, everything decoded before it is kept.
COMPRESSED_FEED_BYTES = 64 << 10


class InputError(ValueError):
    """An input could not be found or read; the message names the path and the fix."""


def input_format(path: str | os.PathLike) -> str:
    """One of "jsonl", "jsonl.gz", "jsonl.zst", "parquet" from the file name."""
    name = str(path).lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(GZIP_SUFFIXES):
        return "jsonl.gz"
    if name.endswith(ZSTD_SUFFIXES):
        return "jsonl.zst"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise InputError(
        f"{path}: unsupported input type; expected one of {', '.join(SUPPORTED_SUFFIXES)}"
    )


def _is_own_output(name: str) -> bool:
    """Hidden/temporary files, metadata sidecars and rejects files (what preprocessing writes)
    are never inputs of a directory or glob."""
    return name.startswith(".") or name.endswith((".meta.parquet", ".rejects.jsonl"))


def discover_inputs(specs: list[str]) -> list[str]:
    """Expand files, globs and directories (recursively) into a sorted, de-duplicated file list.

    Order is deterministic: specs in the order given, each one's matches sorted by path.
    """
    files: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        if os.path.isdir(spec):
            matches = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(spec)
                for name in names
                if name.lower().endswith(SUPPORTED_SUFFIXES) and not _is_own_output(name)
            )
        elif glob.has_magic(spec):
            matches = sorted(
                p
                for p in glob.glob(spec, recursive=True)
                if os.path.isfile(p) and not _is_own_output(os.path.basename(p))
            )
        elif os.path.isfile(spec):
            matches = [spec]
        else:
            raise InputError(f"--input {spec}: no such file or directory")
        if not matches:
            raise InputError(
                f"--input {spec}: matched no input files ({', '.join(SUPPORTED_SUFFIXES)})"
            )
        for path in matches:
            input_format(path)  # fail early on an unsupported file named explicitly
            key = os.path.normpath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


@dataclass(frozen=True)
class WorkUnit:
    """A contiguous piece of one input file. Ranges are bytes (jsonl) or row groups (parquet)."""

    index: int
    path: str
    fmt: str
    start: int = 0  # byte offset (jsonl) / first row group (parquet); 0 for compressed files
    end: int | None = None  # exclusive; None = to the end of the file
    size: int = 0  # approximate input bytes, for scheduling the largest units first
    first_line: int = 1  # 1-based line number of the first line of a plain JSONL byte range

    @property
    def name(self) -> str:
        return f"unit-{self.index:06d}"


def plan_units(
    files: list[str], partition_bytes: int, cut_sizes: Sequence[int] | None = None
) -> list[WorkUnit]:
    """Cut input files into work units of about ``partition_bytes`` input bytes.

    ``cut_sizes`` (one plain JSONL file only) gives the units' sizes in order instead, e.g.
    decreasing ones so that parallel workers finish together.
    """
    if cut_sizes is not None and len(files) != 1:
        raise ValueError("cut_sizes needs exactly one file")
    units: list[WorkUnit] = []
    for path in files:
        fmt = input_format(path)
        size = os.path.getsize(path)
        if cut_sizes is not None:
            targets = [t for t in itertools.accumulate(cut_sizes) if 0 < t < size]
        else:
            targets = list(range(partition_bytes, size, partition_bytes))
        if fmt == "jsonl" and targets:
            cuts = line_aligned_cuts(path, targets=targets) + [(size, 0)]
            for (start, first_line), (end, _) in zip(cuts[:-1], cuts[1:]):
                units.append(WorkUnit(len(units), path, fmt, start, end, end - start, first_line))
        elif fmt == "parquet":
            metadata = _open_parquet(path).metadata
            group_start, group_bytes = 0, 0
            for group in range(metadata.num_row_groups):
                group_bytes += metadata.row_group(group).total_byte_size
                last = group == metadata.num_row_groups - 1
                if group_bytes >= partition_bytes or last:
                    units.append(
                        WorkUnit(len(units), path, fmt, group_start, group + 1, group_bytes)
                    )
                    group_start, group_bytes = group + 1, 0
            if metadata.num_row_groups == 0:
                units.append(WorkUnit(len(units), path, fmt, 0, 0, 0))
        else:
            units.append(WorkUnit(len(units), path, fmt, 0, None, size))
    return units


def assign_shard(files: list[str], num_shards: int, shard_index: int) -> list[str]:
    """The files of one shard: greedy size balancing, deterministic (ties broken by order)."""
    if num_shards == 1:
        return list(files)
    loads = [0] * num_shards
    owner: dict[str, int] = {}
    by_size = sorted(range(len(files)), key=lambda i: (-os.path.getsize(files[i]), i))
    for i in by_size:
        shard = min(range(num_shards), key=lambda s: (loads[s], s))
        owner[files[i]] = shard
        loads[shard] += os.path.getsize(files[i])
    return [path for path in files if owner[path] == shard_index]


class TruncatedStreamError(Exception):
    """A compressed stream ended before its end marker (a file cut during copy or download),
    or its data is corrupt (``corrupt`` is True): nothing after the last good byte is readable.
    ``unread_bytes``: compressed bytes of the file from the failing read on (0 for a cut file,
    whose missing part is not on disk to count)."""

    def __init__(self, message: str, corrupt: bool = False, unread_bytes: int = 0) -> None:
        super().__init__(message)
        self.corrupt = corrupt
        self.unread_bytes = unread_bytes


def _decompressed_chunks(path: str, fmt: str) -> Iterator[bytes]:
    """Decompressed bytes of a whole file; raises TruncatedStreamError after the last good byte."""
    with open(path, "rb") as f:
        if fmt == "jsonl":
            while chunk := f.read(READ_CHUNK_BYTES):
                yield chunk
            return
        if fmt == "jsonl.gz":
            new = lambda: zlib.decompressobj(wbits=47)  # noqa: E731 -- 47: gzip or zlib header
        else:
            import zstandard

            dctx = zstandard.ZstdDecompressor()
            new = dctx.decompressobj
        decoder = new()
        pending = b""
        while True:
            data = pending or f.read(COMPRESSED_FEED_BYTES)
            pending = b""
            if not data:
                break
            try:
                out = decoder.decompress(data)
            except Exception as err:  # zlib.error / zstandard.ZstdError: corrupt data
                unread = os.fstat(f.fileno()).st_size - (f.tell() - len(data))
                raise TruncatedStreamError(
                    f"{path}: corrupt compressed data ({err})", True, unread
                ) from err
            if out:
                yield out
            if decoder.eof:
                # Concatenated members/frames (pigz, `cat a.gz b.gz`): start a new decoder.
                pending = decoder.unused_data
                if not pending:
                    pending = f.read(COMPRESSED_FEED_BYTES)
                    if not pending:
                        return
                decoder = new()
        if not decoder.eof:
            raise TruncatedStreamError(
                f"{path}: compressed stream ends before its end marker (file truncated?)"
            )


@dataclass
class Line:
    number: int  # 1-based line number in the (decompressed) file
    raw: bytes  # without the line terminator
    truncated: bool = False  # the rest of a line cut by a truncated compressed stream
    corrupt: bool = False  # ... cut by corrupt compressed data instead
    unread_bytes: int = 0  # compressed bytes after the corruption (see TruncatedStreamError)


class _LineSplitter:
    """Cuts a stream of byte chunks into lines. A line longer than a chunk is joined once when
    its end arrives (never re-copied per chunk, which would be quadratic in its length)."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines completed by ``chunk`` (without their ``\\n``)."""
        self._pieces.append(chunk)
        if b"\n" not in chunk:
            return []
        lines = b"".join(self._pieces).split(b"\n")
        self._pieces = [lines.pop()]
        return lines

    @property
    def rest(self) -> bytes:
        """What follows the last newline so far."""
        return b"".join(self._pieces)


_UTF8_BOM = b"\xef\xbb\xbf"


def iter_jsonl_lines(unit: WorkUnit) -> Iterator[Line]:
    """Lines of a JSONL unit, numbered as in the whole file. Memory: one read chunk + one line.

    A UTF-8 byte order mark at the start of a file (Windows tools write one) is not part of
    its first line."""
    lines = _iter_jsonl_lines(unit)
    if unit.start == 0:
        for line in lines:
            if line.raw.startswith(_UTF8_BOM):
                line.raw = line.raw[len(_UTF8_BOM) :]
            yield line
            break
    yield from lines


def _iter_jsonl_lines(unit: WorkUnit) -> Iterator[Line]:
    if unit.fmt == "jsonl" and unit.end is not None:
        yield from _iter_plain_range(unit.path, unit.start, unit.end, unit.first_line)
        return
    number = 0
    splitter = _LineSplitter()
    try:
        for chunk in _decompressed_chunks(unit.path, unit.fmt):
            for raw in splitter.feed(chunk):
                number += 1
                yield Line(number, raw)
    except TruncatedStreamError as err:
        yield Line(
            number + 1,
            splitter.rest,
            truncated=True,
            corrupt=err.corrupt,
            unread_bytes=err.unread_bytes,
        )
        return
    if rest := splitter.rest:
        yield Line(number + 1, rest)


def _iter_plain_range(path: str, start: int, end: int, first_line: int) -> Iterator[Line]:
    number = first_line - 1
    splitter = _LineSplitter()
    with open(path, "rb") as f:
        f.seek(start)
        todo = end - start
        while todo > 0:
            chunk = f.read(min(READ_CHUNK_BYTES, todo))
            if not chunk:
                break  # the file shrank since it was planned
            todo -= len(chunk)
            for raw in splitter.feed(chunk):
                number += 1
                yield Line(number, raw)
    if rest := splitter.rest:
        yield Line(number + 1, rest)


def line_aligned_cuts(
    path: str, partition_bytes: int | None = None, targets: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """(byte offset, 1-based line number) of each line start that begins a new unit: the first
    line start at or after every ``partition_bytes`` multiple, or after each of the increasing
    byte offsets ``targets``.

    One sequential pass over the file (newline counting runs at disk speed); always starts with
    (0, 1).
    """
    size = os.path.getsize(path)
    if targets is None:
        if partition_bytes is None:
            raise ValueError("give partition_bytes or targets")
        targets = list(range(partition_bytes, size, partition_bytes))
    cuts = [(0, 1)]
    with open(path, "rb") as f:
        for target in targets:
            f.seek(target - 1)
            if f.read(1) != b"\n":
                f.readline()
            offset = f.tell()
            if offset < size and offset > cuts[-1][0]:
                cuts.append((offset, 0))
        # Line numbers: count newlines before each cut in one pass.
        f.seek(0)
        newlines, pos, todo = 0, 0, 1
        while todo < len(cuts):
            block = f.read(min(READ_CHUNK_BYTES, cuts[todo][0] - pos))
            newlines += block.count(b"\n")
            pos += len(block)
            if pos == cuts[todo][0]:
                cuts[todo] = (pos, newlines + 1)
                todo += 1
    return cuts


def _open_parquet(path: str):
    """``pq.ParquetFile(path)``, with an error that names the file when it is not Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(
            f"{path}: not a readable Parquet file ({err}); re-copy it, or remove it from --input"
        ) from err


def iter_parquet_rows(unit: WorkUnit, columns: list[str], batch_rows: int) -> Iterator[list[dict]]:
    """Rows of a Parquet unit as dicts with an ``__line__`` (1-based row in the file) entry."""
    import pyarrow as pa

    parquet = _open_parquet(unit.path)
    available = set(parquet.schema_arrow.names)
    first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.start))
    groups = list(range(unit.start, unit.end if unit.end is not None else 0))
    if not groups:
        return
    wanted = [c for c in columns if c in available]
    row = first_row
    batches = parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=wanted)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as err:
            # Corrupt pages: the rows cannot be read, so they cannot be rejected one by one.
            raise InputError(
                f"{unit.path}: rows after row {row} (row groups {groups[0]}-{groups[-1]}) "
                f"cannot be read ({err}); the file is corrupt: re-copy it, or remove it from "
                "--input"
            ) from err
        if batch is None:
            return
        records = batch.to_pylist()
        for record in records:
            row += 1
            record["__line__"] = row
        yield records


def parquet_columns(path: str) -> list[str]:
    return list(_open_parquet(path).schema_arrow.names)
