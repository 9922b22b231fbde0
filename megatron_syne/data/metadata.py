"""Per-document metadata sidecar of an indexed (Megatron .bin/.idx) dataset.

File: ``<prefix>.meta.parquet`` beside ``<prefix>.bin`` / ``<prefix>.idx``, where ``prefix`` is
what Megatron calls the data path (e.g. ``out/web-cn_text_document``). One row per document, in
document order: row ``i`` describes sequence ``i`` of the IndexedDataset (one sequence per
document). Core columns written by preprocessing (see ``CORE_COLUMNS``); later tools add columns
(``topic``, ``topic_confidence``, ``ppl``, ``ppl_status``) with :func:`add_columns`, which
rewrites only this small file, never the .bin.
"""

from __future__ import annotations

import hashlib
import os
import struct
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megatron_syne.utils.io import atomic_path

METADATA_SUFFIX = ".meta.parquet"

# name -> arrow type. ``topic`` may be null (not yet labelled); ``ppl`` is added by scoring.
CORE_COLUMNS: dict[str, pa.DataType] = {
    "lang": pa.string(),
    "source": pa.string(),
    "topic": pa.string(),
    "n_tokens": pa.int64(),  # tokens in the stored sequence, EOD included when appended
    "n_chars": pa.int64(),
    "hash": pa.string(),  # hex digest of the normalised text (exact-dedup key)
    "input_file": pa.string(),
    "input_line": pa.int64(),  # 1-based line (JSONL) or row (Parquet) in input_file
}


HASH_DIGEST_BYTES = 16  # 128-bit blake2b: collision-free in practice for 1e12 documents


def normalize_for_hash(text: str) -> str:
    """The text the ``hash`` column digests: Unicode NFC, whitespace runs collapsed, stripped.

    Two documents that differ only in whitespace or Unicode composition are exact duplicates.
    """
    return unicodedata.normalize("NFC", " ".join(text.split()))


def text_hash(text: str) -> str:
    """Hex digest (32 characters) of :func:`normalize_for_hash` ``(text)`` (UTF-8, blake2b-128).

    Raises UnicodeEncodeError for text that is not valid Unicode (lone surrogates).
    """
    data = normalize_for_hash(text).encode("utf-8")
    return hashlib.blake2b(data, digest_size=HASH_DIGEST_BYTES).hexdigest()


def metadata_schema(extra_string_columns: Iterable[str] = ()) -> pa.Schema:
    """Schema of a freshly preprocessed sidecar: the core columns, then extra string columns
    (input metadata keys other than lang/source/topic), in the order given."""
    fields = [pa.field(name, dtype) for name, dtype in CORE_COLUMNS.items()]
    fields += [pa.field(name, pa.string()) for name in extra_string_columns]
    return pa.schema(fields)


def hashes_as_uint64(hashes: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
    """``[N, 2]`` uint64 view of hex ``hash`` values, for vectorised exact-duplicate detection."""
    values = hashes.to_pylist() if isinstance(hashes, pa.Array | pa.ChunkedArray) else hashes
    if len(values) == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    raw = bytes.fromhex("".join(values))
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(len(values), 2)


class MetadataError(ValueError):
    """Metadata missing, misaligned with its index, or malformed. The message says the fix."""


def metadata_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}{METADATA_SUFFIX}")


def index_document_count(prefix: str | os.PathLike) -> int:
    """Number of documents in ``<prefix>.idx``, read from its header (no .bin, no torch import)."""
    idx_path = Path(f"{prefix}.idx")
    if not idx_path.exists():
        raise MetadataError(
            f"{idx_path}: index file not found; run tools/preprocess/preprocess_data.py"
        )
    # megatron-core MMIDIDX layout: 9-byte magic, <Q version, <B dtype code, <Q sequence count,
    # <Q document count (= documents + 1: document_indices starts with 0).
    with open(idx_path, "rb") as f:
        header = f.read(34)
    if len(header) < 34 or header[:9] != b"MMIDIDX\x00\x00":
        raise MetadataError(f"{idx_path}: not a Megatron MMIDIDX index file")
    (document_count,) = struct.unpack("<Q", header[26:34])
    return document_count - 1


def read_metadata(
    prefix: str | os.PathLike, columns: Sequence[str] | None = None, check_index: bool = True
) -> pa.Table:
    """Read the metadata table; by default check its row count against the index."""
    path = metadata_path(prefix)
    if not path.exists():
        raise MetadataError(
            f"{path}: metadata sidecar not found for dataset prefix {prefix}; "
            "preprocess with tools/preprocess/preprocess_data.py (it writes it)"
        )
    try:
        table = pq.read_table(path, columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, OSError) as err:
        raise MetadataError(
            f"{path}: cannot read the metadata sidecar ({err}); re-run preprocessing (or the "
            "tool that last wrote it), or restore the file"
        ) from err
    if check_index:
        n_docs = index_document_count(prefix)
        if table.num_rows != n_docs:
            raise MetadataError(
                f"{path}: {table.num_rows} metadata rows but {prefix}.idx has {n_docs} documents; "
                "the sidecar belongs to another version of the dataset: re-run preprocessing "
                "(or the tool that last wrote it)"
            )
        check_rows_match_index(prefix, table if "n_tokens" in table.column_names else None)
    return table


def check_rows_match_index(prefix: str | os.PathLike, table: pa.Table | None = None) -> None:
    """Raise MetadataError unless row i's ``n_tokens`` is document i's length in the index:
    rows in another order (or of another dataset with as many documents) would silently give
    every document another's topic, PPL or source. No-op for sidecars without ``n_tokens``."""
    from megatron_syne.preprocess.indexed import read_index  # (indexed imports this module)

    path = metadata_path(prefix)
    if table is None:
        if "n_tokens" not in pq.read_schema(path).names:
            return
        table = pq.read_table(path, columns=["n_tokens"])
    counts = table.column("n_tokens").to_numpy(zero_copy_only=False)
    ix = read_index(prefix)
    starts = ix.document_indices[:-1]
    if len(ix.sequence_lengths) == len(starts):  # one sequence per document (preprocessing)
        lengths = ix.sequence_lengths
    else:
        cumulative = np.concatenate([[0], np.cumsum(ix.sequence_lengths, dtype=np.int64)])
        lengths = cumulative[ix.document_indices[1:]] - cumulative[starts]
    wrong = np.flatnonzero(counts != lengths)
    if len(wrong):
        first = int(wrong[0])
        raise MetadataError(
            f"{path}: {len(wrong):,} of {len(counts):,} rows disagree with {prefix}.idx on the "
            f"document's token count (first: row {first}, n_tokens={int(counts[first])}, index "
            f"{int(lengths[first])}); the rows are in another order or belong to another "
            "dataset: re-run preprocessing (or the tool that last wrote the sidecar)"
        )


def check_distinct_datasets(prefixes: Sequence[str | os.PathLike], consequence: str) -> None:
    """Raise MetadataError when two prefixes name the same dataset (however spelled: ``a/../a``,
    a symlink); ``consequence`` says what counting it twice would do."""
    seen: dict[Path, str] = {}
    for prefix in prefixes:
        key = metadata_path(prefix).resolve()
        if key in seen:
            raise MetadataError(
                f"--data-prefix {prefix} names the same dataset as {seen[key]} ({key}): "
                f"{consequence}; list each dataset once"
            )
        seen[key] = str(prefix)


def write_metadata(prefix: str | os.PathLike, table: pa.Table) -> Path:
    """Atomically (temporary name, then rename) write the metadata table."""
    path = metadata_path(prefix)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def add_columns(
    prefix: str | os.PathLike,
    columns: Mapping[str, np.ndarray | pa.Array | Sequence],
    overwrite: bool = True,
) -> Path:
    """Add or replace columns (each with exactly one value per document), atomically."""
    table = read_metadata(prefix)
    for name, values in columns.items():
        array = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values)
        if len(array) != table.num_rows:
            raise MetadataError(
                f"{metadata_path(prefix)}: column {name!r} has {len(array)} values for "
                f"{table.num_rows} documents; pass one value per document"
            )
        if name in table.column_names:
            if not overwrite:
                raise MetadataError(f"{metadata_path(prefix)}: column {name!r} already exists")
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    return write_metadata(prefix, table)
