"""Megatron ``.bin/.idx`` files written and merged with numpy, streaming, byte-compatible.

The index layout is megatron-core's ``MMIDIDX`` version 1 (``indexed_dataset._IndexWriter``):
header, version, dtype code, sequence count, document count, int32 sequence lengths, int64
byte pointers, int64 document indices. It is re-implemented here (vectorised, and without
importing torch in every preprocessing worker); tests check the bytes against megatron-core's
``IndexedDatasetBuilder`` and read every file back through ``IndexedDataset``.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megatron_syne.data.metadata import (
    METADATA_SUFFIX,
    MetadataError,
    hashes_as_uint64,
    metadata_path,
)
from megatron_syne.utils.io import atomic_path

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron.core.datasets.indexed_dataset.DType codes.
DTYPE_CODES: dict[type, int] = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
COPY_CHUNK_BYTES = 16 << 20
METADATA_ROW_GROUP_ROWS = 1 << 16
# array module typecodes of the token dtypes (native byte order, as numpy's tofile writes).
_ARRAY_TYPECODES = {
    np.dtype(dtype): code
    for dtype, code in (
        (np.uint8, "B"),
        (np.int8, "b"),
        (np.uint16, "H"),
        (np.int16, "h"),
        (np.int32, "i"),
        (np.int64, "q"),
    )
    if array.array(code).itemsize == np.dtype(dtype).itemsize
}


class IndexedDataError(ValueError):
    """An indexed dataset is missing or inconsistent; the message names the file and the fix."""


def optimal_dtype(vocab_size: int) -> type:
    """Token dtype megatron-core picks for a vocabulary (uint16 below 65500 ids, else int32)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


@dataclass
class IndexArrays:
    """The arrays of one ``.idx`` file (memory-mapped where possible)."""

    dtype: type
    sequence_lengths: np.ndarray  # int32 [S], tokens per sequence
    sequence_pointers: np.ndarray  # int64 [S], byte offset of each sequence in the .bin
    document_indices: np.ndarray  # int64 [D + 1], sequence index at which each document starts

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def one_sequence_per_document(self) -> bool:
        return len(self.sequence_lengths) == self.num_documents and bool(
            np.array_equal(self.document_indices, np.arange(len(self.document_indices)))
        )


def read_index(prefix: str | os.PathLike) -> IndexArrays:
    path = idx_path(prefix)
    if not path.is_file():
        raise IndexedDataError(f"{path}: not found; is {prefix} a dataset prefix (no .bin/.idx)?")
    with open(path, "rb") as f:
        header = f.read(len(INDEX_HEADER))
        if header != INDEX_HEADER:
            raise IndexedDataError(f"{path}: not a Megatron MMIDIDX index file")
        (version,) = struct.unpack("<Q", f.read(8))
        (code,) = struct.unpack("<B", f.read(1))
        sequence_count, document_count = struct.unpack("<QQ", f.read(16))
        offset = f.tell()
    if version != INDEX_VERSION or code not in CODE_DTYPES:
        raise IndexedDataError(f"{path}: unsupported index version {version} / dtype code {code}")
    if sequence_count == 0 and document_count <= 1:
        empty = np.zeros(0, dtype=np.int32)
        return IndexArrays(CODE_DTYPES[code], empty, empty.astype(np.int64), np.zeros(1, np.int64))
    mm = np.memmap(path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=sequence_count, offset=offset)
    offset += lengths.nbytes
    pointers = np.frombuffer(mm, dtype=np.int64, count=sequence_count, offset=offset)
    offset += pointers.nbytes
    documents = np.frombuffer(mm, dtype=np.int64, count=document_count, offset=offset)
    return IndexArrays(CODE_DTYPES[code], lengths, pointers, documents)


def check_bin_size(prefix: str | os.PathLike, ix: IndexArrays) -> None:
    """Raise IndexedDataError unless ``prefix``.bin holds exactly the tokens its index lists."""
    path = bin_path(prefix)
    if not path.is_file():
        raise IndexedDataError(f"{path}: not found (its index {idx_path(prefix)} exists)")
    expected = int(ix.sequence_lengths.sum(dtype=np.int64)) * np.dtype(ix.dtype).itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise IndexedDataError(
            f"{path}: {actual:,} bytes, but {idx_path(prefix)} describes {expected:,}: the .bin "
            "is truncated or belongs to another version of the dataset; re-copy it or re-run "
            "preprocessing"
        )


def write_index(
    path: str | os.PathLike,
    dtype: type,
    length_pieces: Callable[[], Iterator[np.ndarray]],
) -> tuple[int, int]:
    """Write an ``.idx`` for one-sequence-per-document data; returns (documents, tokens).

    ``length_pieces()`` yields int32 arrays of document lengths (tokens) in document order; it
    is called three times (the format stores lengths, then pointers, then document indices),
    so memory holds one piece at a time.
    """
    itemsize = np.int64(np.dtype(dtype).itemsize)
    sequence_count = sum(len(piece) for piece in length_pieces())
    with open(path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", sequence_count))
        f.write(struct.pack("<Q", sequence_count + 1))
        tokens = 0
        for piece in length_pieces():
            f.write(np.ascontiguousarray(piece, dtype=np.int32).tobytes())
            tokens += int(piece.sum(dtype=np.int64))
        pointer = np.int64(0)
        for piece in length_pieces():
            ends = np.cumsum(piece.astype(np.int64) * itemsize) + pointer
            starts = np.empty_like(ends)
            starts[:1] = pointer
            starts[1:] = ends[:-1]
            f.write(starts.tobytes())
            if len(ends):
                pointer = ends[-1]
        f.write(np.zeros(1, dtype=np.int64).tobytes())
        start = 1
        for piece in length_pieces():
            f.write(np.arange(start, start + len(piece), dtype=np.int64).tobytes())
            start += len(piece)
    return sequence_count, tokens


class TokenBinWriter:
    """Appends documents (token ids) to a ``.bin``; remembers their lengths for the index."""

    def __init__(self, path: str | os.PathLike, dtype: type) -> None:
        self.dtype = dtype
        self._file = open(path, "wb")  # noqa: SIM115 -- closed in close()
        self._lengths: list[np.ndarray] = []

    def add_documents(
        self,
        documents: Sequence[Sequence[int] | np.ndarray],
        bos: int | None = None,
        eod: int | None = None,
    ) -> np.ndarray:
        """Append documents, each stored as ``[bos] + ids + [eod]`` (``bos``/``eod`` when not
        None). ``documents`` are integer numpy arrays (one copy, no Python int per token) or
        lists of ints. Ids must fit the dtype (the tokenizer's vocabulary chose it). Returns
        the stored lengths."""
        lengths = np.fromiter(map(len, documents), dtype=np.int32, count=len(documents))
        lengths += (bos is not None) + (eod is not None)
        head = None if bos is None else np.array([bos], dtype=self.dtype)
        tail = None if eod is None else np.array([eod], dtype=self.dtype)
        if documents and all(isinstance(d, np.ndarray) for d in documents):
            pieces = []
            for ids in documents:
                if head is not None:
                    pieces.append(head)
                pieces.append(ids)
                if tail is not None:
                    pieces.append(tail)
            np.concatenate(pieces, dtype=self.dtype, casting="unsafe").tofile(self._file)
        elif (code := _ARRAY_TYPECODES.get(np.dtype(self.dtype))) is not None:
            # array.fromlist converts in C (faster than np.fromiter over a chained iterator);
            # an id out of the dtype's range raises OverflowError.
            flat = array.array(code)
            for ids in documents:
                if bos is not None:
                    flat.append(bos)
                if type(ids) is list:
                    flat.fromlist(ids)
                else:
                    flat.extend(ids)
                if eod is not None:
                    flat.append(eod)
            self._file.write(flat)
        else:
            framed = itertools.chain.from_iterable(
                itertools.chain(() if bos is None else (bos,), ids, () if eod is None else (eod,))
                for ids in documents
            )
            total = int(lengths.sum(dtype=np.int64))
            np.fromiter(framed, dtype=self.dtype, count=total).tofile(self._file)
        self._lengths.append(lengths)
        return lengths

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)

    def close(self) -> None:
        self._file.close()


@dataclass
class MergeResult:
    documents: int
    tokens: int
    dropped: int  # documents removed by the keep masks (duplicates)


def _kept_runs(keep: np.ndarray) -> Iterator[tuple[int, int]]:
    """[start, stop) runs of True in a boolean mask."""
    if len(keep) == 0:
        return
    padded = np.concatenate([[False], keep, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    yield from zip(edges[0::2].tolist(), edges[1::2].tolist())


def merge_indexed(
    inputs: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    keep: Sequence[np.ndarray | None] | None = None,
    metadata: bool = True,
) -> MergeResult:
    """Concatenate indexed datasets (and their metadata sidecars) into ``output_prefix``.

    ``keep[i]`` optionally selects documents of input ``i`` (boolean, one per document), e.g.
    to drop duplicates. All outputs are written under temporary names and renamed at the end.
    Memory: one input's index arrays at a time plus a copy buffer.
    """
    inputs = [str(p) for p in inputs]
    keep = list(keep) if keep is not None else [None] * len(inputs)
    if len(keep) != len(inputs):
        raise ValueError(f"{len(keep)} keep masks for {len(inputs)} inputs")
    indices = [read_index(p) for p in inputs]
    dtypes = {ix.dtype for ix in indices}
    if len(dtypes) > 1:
        raise IndexedDataError(
            f"cannot merge datasets with different token dtypes {sorted(map(str, dtypes))}: "
            "they were tokenized with different vocabularies; re-preprocess with one tokenizer"
        )
    for prefix, ix, mask in zip(inputs, indices, keep):
        _check_mergeable(prefix, ix, mask)
    schema = None
    if metadata:
        paths = _sidecars(inputs)
        schema = pa.unify_schemas([pq.read_schema(p) for p in paths], promote_options="permissive")
    with IndexedMerger(output_prefix, dtypes.pop() if dtypes else np.int32, schema) as merger:
        for prefix, mask in zip(inputs, keep):
            merger.add(prefix, mask)
        return merger.finish()


def _sidecars(prefixes: Sequence[str]) -> list[Path]:
    """The metadata sidecars of ``prefixes``; an error naming every missing one."""
    paths = [metadata_path(p) for p in prefixes]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MetadataError(
            f"metadata sidecar missing for {', '.join(missing)}; every merged dataset needs "
            f"its {METADATA_SUFFIX} (re-preprocess it, or merge with --no-metadata)"
        )
    return paths


def _check_mergeable(prefix: str, ix: IndexArrays, mask: np.ndarray | None) -> None:
    if not ix.one_sequence_per_document:
        raise IndexedDataError(
            f"{prefix}: has documents made of several sequences (--split-sentences data); "
            "merge it with megatron-core's IndexedDatasetBuilder.add_index instead"
        )
    if mask is not None and len(mask) != ix.num_documents:
        raise IndexedDataError(f"{prefix}: keep mask has {len(mask)} entries")


class IndexedMerger:
    """Streaming concatenation of indexed datasets: :meth:`add` them in order (each is copied
    as it comes, so a producer can merge finished parts while later ones are still being
    written), then :meth:`finish`. Used as a context manager: outputs live under temporary
    names and are renamed only when the block ends after :meth:`finish`; on an error (or
    without :meth:`finish`) they are removed.

    ``schema`` is the metadata sidecar's schema (inputs' sidecars are cast to it); None merges
    no metadata. The output's bytes depend only on the documents added, in order, never on how
    they were split into inputs.
    """

    def __init__(
        self, output_prefix: str | os.PathLike, dtype: type, schema: pa.Schema | None
    ) -> None:
        self.output_prefix = output_prefix
        self.dtype = dtype
        self.schema = schema
        self._inputs: list[tuple[str, np.ndarray | None]] = []
        self._buffered: list[pa.Table] = []
        self._finished = False
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> IndexedMerger:
        with self._stack as stack:
            self._tmp_bin = stack.enter_context(atomic_path(bin_path(self.output_prefix)))
            self._tmp_idx = stack.enter_context(atomic_path(idx_path(self.output_prefix)))
            self._bin = stack.enter_context(open(self._tmp_bin, "wb"))
            self._writer = None
            if self.schema is not None:
                tmp_meta = stack.enter_context(atomic_path(metadata_path(self.output_prefix)))
                self._writer = stack.enter_context(
                    pq.ParquetWriter(tmp_meta, self.schema, compression="zstd")
                )
            self._stack = stack.pop_all()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and not self._finished:
            error = RuntimeError("IndexedMerger left without finish(): outputs discarded")
            self._stack.__exit__(RuntimeError, error, None)  # removes the temporaries
            raise error
        return self._stack.__exit__(exc_type, exc, tb)

    def add(self, prefix: str | os.PathLike, keep: np.ndarray | None = None) -> None:
        """Append dataset ``prefix`` (only the documents where ``keep`` is True, if given)."""
        prefix = str(prefix)
        ix = read_index(prefix)
        if ix.dtype != self.dtype:
            raise IndexedDataError(
                f"{prefix}: token dtype {np.dtype(ix.dtype)} differs from "
                f"{np.dtype(self.dtype)}: tokenized with another vocabulary; re-preprocess"
            )
        _check_mergeable(prefix, ix, keep)
        _copy_documents(bin_path(prefix), self._bin, ix, keep)
        if self._writer is not None:
            self._add_metadata(prefix, keep, ix.num_documents)
        self._inputs.append((prefix, keep))

    def _add_metadata(self, prefix: str, mask: np.ndarray | None, count: int) -> None:
        (path,) = _sidecars([prefix])
        schema = self.schema
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows != count:
            raise MetadataError(
                f"{path}: {parquet.metadata.num_rows} rows for {count} documents; re-preprocess"
            )
        offset = 0
        # Streamed in batches: memory is one batch plus one pending row group.
        for batch in parquet.iter_batches(batch_size=METADATA_ROW_GROUP_ROWS):
            table = pa.Table.from_batches([batch])
            if mask is not None:
                table = table.filter(pa.array(mask[offset : offset + batch.num_rows]))
            offset += batch.num_rows
            for name in schema.names:
                if name not in table.column_names:
                    table = table.append_column(
                        name, pa.nulls(table.num_rows, schema.field(name).type)
                    )
            table = table.select(schema.names)
            if not table.schema.equals(schema):  # Table.cast imports pyarrow.compute (~0.1 s)
                table = table.cast(schema)
            self._buffered.append(table)
            # Fixed-size row groups: the file's bytes do not depend on how documents were
            # split into inputs (work units), only on the rows themselves.
            if sum(t.num_rows for t in self._buffered) >= METADATA_ROW_GROUP_ROWS:
                combined = pa.concat_tables(self._buffered)
                full = combined.num_rows - combined.num_rows % METADATA_ROW_GROUP_ROWS
                for start in range(0, full, METADATA_ROW_GROUP_ROWS):
                    self._writer.write_table(combined.slice(start, METADATA_ROW_GROUP_ROWS))
                self._buffered = [combined.slice(full)]

    def finish(self) -> MergeResult:
        """Write the index and the last metadata rows; the files are renamed when the ``with``
        block ends."""
        self._bin.close()
        if self._writer is not None:
            rest = pa.concat_tables(self._buffered) if self._buffered else self.schema.empty_table()
            if rest.num_rows or not self._buffered:
                self._writer.write_table(rest)
            self._writer.close()

        def pieces() -> Iterator[np.ndarray]:
            for prefix, mask in self._inputs:
                lengths = read_index(prefix).sequence_lengths
                yield lengths if mask is None else lengths[mask]

        documents, tokens = write_index(self._tmp_idx, self.dtype, pieces)
        dropped = sum(int((~m).sum()) for _, m in self._inputs if m is not None)
        self._finished = True
        return MergeResult(documents, tokens, dropped)


def _copy_documents(source: Path, out, ix: IndexArrays, mask: np.ndarray | None) -> None:
    itemsize = np.dtype(ix.dtype).itemsize
    if ix.num_documents == 0:
        return
    with open(source, "rb") as f:
        if mask is None:
            runs = [(0, ix.num_documents)]
        else:
            runs = list(_kept_runs(mask))
        for start, stop in runs:
            begin = int(ix.sequence_pointers[start])
            end = (
                int(ix.sequence_pointers[stop - 1]) + int(ix.sequence_lengths[stop - 1]) * itemsize
            )
            f.seek(begin)
            todo = end - begin
            while todo > 0:
                chunk = f.read(min(COPY_CHUNK_BYTES, todo))
                if not chunk:
                    raise IndexedDataError(f"{source}: shorter than its .idx says; re-preprocess")
                out.write(chunk)
                todo -= len(chunk)


def first_occurrences(hash_tables: Sequence[pa.Table]) -> tuple[list[np.ndarray], np.ndarray]:
    """Exact-duplicate detection over datasets in merge order, vectorised.

    ``hash_tables[i]`` has dataset i's ``hash`` column. Returns per-dataset keep masks (True for
    a document whose hash was not seen earlier) and, over the concatenated documents, the
    global index of each document's first occurrence. Memory: about 32 bytes per document.
    """
    counts = [t.num_rows for t in hash_tables]
    hashes = np.concatenate(
        [hashes_as_uint64(t.column("hash")) for t in hash_tables] or [np.zeros((0, 2), np.uint64)]
    )
    n = len(hashes)
    keep = np.zeros(n, dtype=bool)
    first = np.arange(n, dtype=np.int64)
    if n:
        order = np.lexsort((np.arange(n), hashes[:, 1], hashes[:, 0]))
        ordered = hashes[order]
        new_group = np.ones(n, dtype=bool)
        new_group[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
        keep[order[new_group]] = True
        group_id = np.cumsum(new_group) - 1
        first[order] = order[new_group][group_id]
    return list(np.split(keep, np.cumsum(counts)[:-1])), first
