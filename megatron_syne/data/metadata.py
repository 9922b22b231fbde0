"""Per-document metadata sidecar of an indexed (Megatron .bin/.idx) dataset.

File: ``<prefix>.meta.parquet`` beside ``<prefix>.bin`` / ``<prefix>.idx``, where ``prefix`` is
what Megatron calls the data path (e.g. ``out/web-cn_text_document``). One row per document, in
document order: row ``i`` describes sequence ``i`` of the IndexedDataset (one sequence per
document). Core columns written by preprocessing (see ``CORE_COLUMNS``); later tools add columns
(``topic``, ``topic_confidence``, ``ppl``, ``ppl_status``) with :func:`add_columns`, which
rewrites only this small file, never the .bin.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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


class MetadataError(ValueError):
    """Metadata missing, misaligned with its index, or malformed. The message says the fix."""


def metadata_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}{METADATA_SUFFIX}")


def index_document_count(prefix: str | os.PathLike) -> int:
    """Number of documents in ``<prefix>.idx`` (read from its header, without loading the .bin)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    idx_path = Path(f"{prefix}.idx")
    if not idx_path.exists():
        raise MetadataError(
            f"{idx_path}: index file not found; run tools/preprocess/preprocess_data.py"
        )
    dataset = IndexedDataset(str(prefix), mmap=True)
    return len(dataset.document_indices) - 1


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
    table = pq.read_table(path, columns=list(columns) if columns is not None else None)
    if check_index:
        n_docs = index_document_count(prefix)
        if table.num_rows != n_docs:
            raise MetadataError(
                f"{path}: {table.num_rows} metadata rows but {prefix}.idx has {n_docs} documents; "
                "the sidecar belongs to another version of the dataset: re-run preprocessing "
                "(or the tool that last wrote it)"
            )
    return table


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
