"""Append-only, resumable JSONL output keyed by item.

Generation runs for hours against a fleet, so the output cannot be written to a temporary
name and renamed at the end (a kill would lose everything). Instead every item is one JSON
line appended, flushed and fsynced before the next is acknowledged. On open, the file is
scanned: the keys it holds are the work already done, and a torn last line (a kill in the
middle of a write) is cut off, so a restart redoes exactly the missing items and writes no
duplicate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO


class JsonlStore:
    """One append-only JSONL file whose records carry a unique ``key`` field.

    Only the keys are held in memory; :meth:`iter_records` reads the records back.
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self.keys: set[str] = set()
        self.repaired_bytes = 0
        self.duplicate_lines = 0
        self._file: TextIO | None = None
        self._load()

    def _load(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            return
        good_end = 0
        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    break  # torn tail: the write of this record never finished
                try:
                    record = json.loads(raw)
                    key = record["key"]
                except (ValueError, KeyError, TypeError, RecursionError) as err:
                    raise ValueError(
                        f"{self.path}:{line_no}: not a record of this tool ({err}); this file "
                        "was not written by tools/synth or was edited. Move it away or give "
                        "another --out."
                    ) from err
                if key in self.keys:
                    self.duplicate_lines += 1
                self.keys.add(key)
                good_end += len(raw)
        size = self.path.stat().st_size
        if size > good_end:
            self.repaired_bytes = size - good_end
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                os.fsync(f.fileno())

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def append(self, record: dict[str, Any]) -> bool:
        """Write ``record`` unless its key is already stored; True when written."""
        key = record["key"]
        if key in self.keys:
            return False
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        # One write call per record, so a kill leaves at most one torn line at the end.
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self.keys.add(key)
        return True

    def iter_records(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):
                    yield json.loads(line)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
