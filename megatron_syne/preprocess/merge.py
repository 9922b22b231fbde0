"""Merging preprocessed datasets (shards of a Slurm array, or separate corpora) with metadata."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megatron_syne.data.metadata import metadata_path
from megatron_syne.preprocess.documents import RejectReason, reject_record
from megatron_syne.preprocess.indexed import (
    IndexedDataError,
    first_occurrences,
    merge_indexed,
)
from megatron_syne.utils.io import atomic_open


def resolve_prefixes(specs: list[str]) -> list[str]:
    """Dataset prefixes from prefixes, globs of prefixes, ``.idx`` paths, or directories.

    Globs and directories expand to every ``.idx`` they contain, sorted by path (shard files
    named ``-shard00003-of-00016`` therefore merge in shard order).
    """
    prefixes: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(str(p)[:-4] for p in Path(spec).glob("*.idx"))
        elif glob.has_magic(spec):
            pattern = spec if spec.endswith(".idx") else spec + ".idx"
            found = sorted(p[:-4] for p in glob.glob(pattern))
        else:
            found = [spec[:-4] if spec.endswith(".idx") else spec]
            if not Path(f"{found[0]}.idx").is_file():
                raise IndexedDataError(f"{found[0]}.idx not found: pass a dataset prefix")
        if not found:
            raise IndexedDataError(f"--input {spec}: matched no .idx files")
        prefixes.extend(found)
    seen: dict[str, str] = {}
    for prefix in prefixes:
        real = os.path.realpath(f"{prefix}.idx")
        if real in seen:
            raise IndexedDataError(
                f"dataset {prefix} is given twice (also as {seen[real]}): each input is merged "
                "once; remove the repeat (or merge it with itself on purpose by copying it)"
            )
        seen[real] = prefix
    return prefixes


def exact_duplicates(prefixes: list[str]) -> tuple[list[np.ndarray], list[dict]]:
    """Keep masks (first occurrence of each metadata ``hash``, in order) and one reject record
    per dropped duplicate, naming its input file/line and those of the document it duplicates."""
    tables = [
        pq.ParquetFile(metadata_path(p)).read(columns=["hash", "input_file", "input_line"])
        for p in prefixes
    ]
    keep, first = first_occurrences(tables)
    dropped = np.flatnonzero(~np.concatenate(keep)) if keep else np.zeros(0, np.int64)
    if len(dropped) == 0:
        return keep, []
    files = pa.chunked_array([t.column("input_file") for t in tables])
    lines = pa.chunked_array([t.column("input_line") for t in tables])
    dup_files = files.take(pa.array(dropped)).to_pylist()
    dup_lines = lines.take(pa.array(dropped)).to_pylist()
    orig_files = files.take(pa.array(first[dropped])).to_pylist()
    orig_lines = lines.take(pa.array(first[dropped])).to_pylist()
    records = []
    for file, line, orig_file, orig_line in zip(dup_files, dup_lines, orig_files, orig_lines):
        record = reject_record(
            file,
            line,
            RejectReason.DUPLICATE,
            f"exact duplicate (normalised text) of {orig_file}:{orig_line}",
            None,
        )
        record["duplicate_of"] = {"file": orig_file, "line": orig_line}
        records.append(record)
    return keep, records


@dataclass
class MergeSummary:
    output_prefix: str
    inputs: int
    documents: int
    tokens: int
    duplicates: int
    rejects_path: str | None
    metadata: bool = True

    def format(self) -> str:
        files = ".bin/.idx/.meta.parquet" if self.metadata else ".bin/.idx"
        text = (
            f"merged {self.inputs} datasets -> {self.output_prefix}{files}: "
            f"{self.documents:,} documents, {self.tokens:,} tokens"
        )
        if self.rejects_path:
            text += f"; {self.duplicates:,} duplicates dropped (listed in {self.rejects_path})"
        return text


def merge_datasets(
    inputs: list[str], output_prefix: str, dedup: str | None = None, metadata: bool = True
) -> MergeSummary:
    """Concatenate datasets in the given order; ``dedup="exact"`` drops repeated hashes."""
    if dedup not in (None, "none", "exact"):
        raise ValueError(f"--dedup must be 'exact' or 'none', got {dedup!r}")
    if dedup == "exact" and not metadata:
        raise ValueError("--dedup exact needs the metadata sidecars (their hash column)")
    outputs = {os.path.realpath(f"{output_prefix}{s}") for s in (".bin", ".idx")}
    for prefix in inputs:
        if {os.path.realpath(f"{prefix}{s}") for s in (".bin", ".idx")} & outputs:
            raise IndexedDataError(
                f"--output-prefix {output_prefix} is the input {prefix} (the same files): "
                "write the merge to a new prefix"
            )
    keep, records, rejects_path = None, [], None
    if dedup == "exact":
        keep, records = exact_duplicates(inputs)
        rejects_path = f"{output_prefix}.rejects.jsonl"
    result = merge_indexed(inputs, output_prefix, keep=keep, metadata=metadata)
    if rejects_path is not None:
        with atomic_open(rejects_path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return MergeSummary(
        output_prefix,
        len(inputs),
        result.documents,
        result.tokens,
        len(records),
        rejects_path,
        metadata,
    )
