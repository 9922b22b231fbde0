"""Resumable per-document jobs (topic labelling, PPL scoring): work is cut into chunks of
consecutive documents; each finished chunk is one Parquet part file written under a temporary
name and renamed, so a part that exists is complete. A killed run restarts, skips the parts
that exist and never relabels or loses a document. A ``manifest.json`` records what produced
the parts (model, chunking, dataset size); a run with different settings refuses to mix in.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_syne.utils.io import atomic_open, atomic_path

MANIFEST = "manifest.json"


class PartsError(RuntimeError):
    """Existing parts do not match this run, or parts are missing at merge time."""


def chunk_ranges(n_docs: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) document ranges of ``chunk_size`` documents (the last may be shorter)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 document, got {chunk_size}")
    return [(s, min(s + chunk_size, n_docs)) for s in range(0, n_docs, chunk_size)]


class PartsDir:
    def __init__(self, directory: str | os.PathLike, manifest: dict, restart: bool = False):
        self.directory = Path(directory)
        self.manifest = manifest
        if restart and self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest_path = self.directory / MANIFEST
        existing = None
        if manifest_path.exists():
            try:
                existing = json.loads(manifest_path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                if self.has_parts():
                    raise PartsError(
                        f"{manifest_path}: unreadable ({e}); pass --restart to discard the "
                        "partial results"
                    ) from e
                existing = {}
        if existing is not None and existing != manifest and self.has_parts():
            changed = sorted(
                k for k in set(existing) | set(manifest) if existing.get(k) != manifest.get(k)
            )
            raise PartsError(
                f"{self.directory}: partial results from a run with different settings "
                f"({', '.join(changed)} changed); pass --restart to discard them, or rerun "
                "with the original settings to resume"
            )
        if existing != manifest:
            # A new directory, or one where nothing finished under the old settings (e.g. a
            # run that failed at startup): nothing to resume, so this run's settings replace
            # them without --restart.
            with atomic_open(manifest_path, "w") as f:
                json.dump(manifest, f, indent=2, sort_keys=True)

    def has_parts(self) -> bool:
        """Whether any finished part exists (temporary files of unfinished ones do not count)."""
        return any(self.directory.glob("part-*.parquet"))

    def part_path(self, start: int, end: int) -> Path:
        return self.directory / f"part-{start:012d}-{end:012d}.parquet"

    def is_done(self, start: int, end: int) -> bool:
        return self.part_path(start, end).exists()

    def write_part(self, start: int, end: int, table: pa.Table) -> Path:
        if table.num_rows != end - start:
            raise PartsError(f"part [{start}, {end}) has {table.num_rows} rows")
        path = self.part_path(start, end)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path

    def read_part(self, start: int, end: int) -> pa.Table:
        return pq.read_table(self.part_path(start, end))

    def missing(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [r for r in ranges if not self.is_done(*r)]

    def merge(self, ranges: list[tuple[int, int]]) -> pa.Table:
        """Concatenate all parts in document order; raise naming the missing chunks."""
        missing = self.missing(ranges)
        if missing:
            shown = ", ".join(f"[{s}, {e})" for s, e in missing[:5])
            raise PartsError(
                f"{self.directory}: {len(missing)} of {len(ranges)} chunks are not done yet "
                f"(documents {shown}{', ...' if len(missing) > 5 else ''}); run the remaining "
                "shards (same --num-shards) before merging"
            )
        tables = []
        for start, end in ranges:
            table = self.read_part(start, end)
            if table.num_rows != end - start:
                raise PartsError(
                    f"{self.part_path(start, end)}: {table.num_rows} rows for {end - start} "
                    "documents; delete this part file and rerun to redo the chunk"
                )
            tables.append(table)
        return pa.concat_tables(tables)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
