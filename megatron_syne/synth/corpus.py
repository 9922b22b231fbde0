"""Accepted synthesis items -> training text JSONL for tools/preprocess/preprocess_data.py.

Each output line: ``text`` (problem, a blank line, solution), ``lang``, ``source``
("synthesis"), ``discipline``, ``synth_task`` (science_qa / code_qa), ``id`` (item key) and
``generator``. Code QA items that did not pass their tests (kept with ``--keep-failing``) are
left out unless ``include_failing`` is set.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_syne.utils.io import atomic_open

REQUIRED = ("key", "problem", "solution", "lang")


@dataclass
class CorpusSummary:
    written: int
    skipped: Counter
    chars: int
    by_discipline: Counter
    by_lang: Counter


def item_text(record: dict[str, Any]) -> str:
    """Plain training text of one item (the paper: problem + solution as plain text)."""
    return f"{record['problem'].strip()}\n\n{record['solution'].strip()}"


def to_corpus(
    inputs: list[str | os.PathLike],
    output: str | os.PathLike,
    rejects: str | os.PathLike | None = None,
    source: str = "synthesis",
    include_failing: bool = False,
) -> CorpusSummary:
    """Convert synthesis outputs to one corpus JSONL; duplicate keys across inputs are
    written once; unusable lines go to ``rejects`` with the reason (file:line)."""
    output = Path(output)
    rejects = Path(rejects) if rejects else output.with_name(output.stem + ".rejects.jsonl")
    if output.resolve() == rejects.resolve():
        raise ValueError(f"--rejects {rejects} is the --output file; give another name")
    for path in inputs:
        if Path(path).resolve() in (output.resolve(), rejects.resolve()):
            raise ValueError(
                f"input {path} would be overwritten by the output or rejects file "
                "(it holds the generator's items and resume state); write elsewhere"
            )
    skipped: Counter[str] = Counter()
    by_discipline: Counter[str] = Counter()
    by_lang: Counter[str] = Counter()
    seen: set[str] = set()
    written = chars = 0
    with (
        atomic_open(output, "w", encoding="utf-8") as out,
        atomic_open(rejects, "w", encoding="utf-8") as rej,
    ):

        def reject(reason: str, where: str, raw: str) -> None:
            skipped[reason] += 1
            rej.write(json.dumps({"reason": reason, "where": where, "line": raw[:500]}) + "\n")

        for path in inputs:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"input {path} does not exist")
            with open(path, "rb") as f:
                for line_no, data in enumerate(f, 1):
                    where = f"{path}:{line_no}"
                    try:
                        raw = data.decode("utf-8")
                    except UnicodeDecodeError:
                        reject("invalid_utf8", where, data.decode("utf-8", "replace"))
                        continue
                    if not raw.strip():
                        continue
                    if not raw.endswith("\n"):
                        reject("torn_line", where, raw)  # a generation run still writing
                        continue
                    try:
                        record = json.loads(raw)
                    except (ValueError, RecursionError):
                        reject("invalid_json", where, raw)
                        continue
                    if not isinstance(record, dict):
                        reject("not_a_json_object", where, raw)
                        continue
                    wrong = [
                        k
                        for k in (*REQUIRED, "discipline", "task")
                        if record.get(k) is not None and not isinstance(record[k], str)
                    ]
                    if wrong:
                        reject(f"non_string_{wrong[0]}", where, raw)
                        continue
                    missing = [k for k in REQUIRED if not (record.get(k) or "").strip()]
                    if missing:  # absent, empty or whitespace only
                        reject(f"missing_{missing[0]}", where, raw)
                        continue
                    if record.get("passed") is False and not include_failing:
                        reject("failed_tests", where, raw)
                        continue
                    if record["key"] in seen:
                        reject("duplicate_key", where, raw)
                        continue
                    seen.add(record["key"])
                    text = item_text(record)
                    discipline = record.get("discipline") or "general education"
                    out.write(
                        json.dumps(
                            {
                                "text": text,
                                "lang": record["lang"],
                                "source": source,
                                "discipline": discipline,
                                "synth_task": record.get("task", "unknown"),
                                "id": record["key"],
                                "generator": record.get("generator"),
                            },
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
                    written += 1
                    chars += len(text)
                    by_discipline[discipline] += 1
                    by_lang[record["lang"]] += 1
    return CorpusSummary(written, skipped, chars, by_discipline, by_lang)
