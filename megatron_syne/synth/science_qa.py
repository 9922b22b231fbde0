"""Science QA synthesis (Llama-3-SynE Stage II): seed pages -> [Problem]/[Solution] items.

Seeds are JSONL, one page per line: ``text`` (required), ``id``, ``discipline`` (one of the
9, aliases and Chinese names accepted; assigned by a keyword classifier when missing) and
``lang`` ("zh"/"en"; detected when missing). The prompt template is chosen by discipline and
language; the answer's [Problem] and [Solution] are parsed and filtered (see pipeline.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_syne.synth.client import ChatResult
from megatron_syne.synth.parsing import ParseError, parse_problem_solution
from megatron_syne.synth.pipeline import GenerationRun, Reject, WorkItem
from megatron_syne.synth.prompts import (
    SCIENCE_PROMPT_VERSION,
    KeywordDisciplineClassifier,
    item_key,
    normalize_discipline,
    science_messages,
)
from megatron_syne.synth.text import detect_lang


@dataclass
class Seed:
    seed_id: str
    text: str
    discipline: str
    discipline_source: str  # "seed" or "classifier"
    lang: str


@dataclass
class BadLine:
    where: str
    reason: str
    raw: str


@dataclass
class JsonLine:
    line_no: int
    where: str  # "file:line"
    raw: str
    record: Any  # the parsed JSON value (not necessarily an object)

    def bad(self, reason: str) -> BadLine:
        return BadLine(self.where, reason, self.raw[:500])


def iter_json_lines(path: Path, flag: str) -> Iterator[JsonLine | BadLine]:
    """The non-blank lines of a JSONL input in order, parsed; a line that is not JSON comes out
    as a :class:`BadLine`. ``flag`` names the option in the missing-file error."""
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError) as err:
                yield BadLine(where, f"not valid JSON ({err})", raw[:500])
                continue
            yield JsonLine(line_no, where, raw, record)


@dataclass
class ScienceConfig:
    """Science QA settings. ``max_seed_chars`` cuts long pages (characters, not tokens) so the
    prompt fits the generator's context; ``samples_per_seed`` items are made per page."""

    samples_per_seed: int = 1
    max_seed_chars: int = 6000
    min_seed_chars: int = 100
    limit: int | None = None
    sampling_seed: int | None = 1234

    def __post_init__(self) -> None:
        if self.samples_per_seed < 1:
            raise ValueError("--samples-per-seed must be >= 1")
        if self.max_seed_chars < self.min_seed_chars:
            raise ValueError("--max-seed-chars must be >= --min-seed-chars")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be >= 1")


def read_seeds(
    path: str | os.PathLike, classifier: KeywordDisciplineClassifier, config: ScienceConfig
) -> Iterator[Seed | BadLine]:
    """Seeds of a JSONL file in file order; unusable lines come out as :class:`BadLine`."""
    seen_ids: dict[str, int] = {}
    for line in iter_json_lines(Path(path), "--seeds"):
        if isinstance(line, BadLine):
            yield line
            continue
        record = line.record
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            yield line.bad("no string field 'text'")
            continue
        text = record["text"].strip()
        if len(text) < config.min_seed_chars:
            yield line.bad(f"text has {len(text)} chars < --min-seed-chars {config.min_seed_chars}")
            continue
        text = text[: config.max_seed_chars]
        seed_id = str(record.get("id") or "sha1:" + hashlib.sha1(text.encode()).hexdigest())
        if seed_id in seen_ids:
            # Same id -> same item keys: the copy would be skipped as "done" unnoticed.
            yield line.bad(f"duplicate seed id {seed_id!r} (first on line {seen_ids[seed_id]})")
            continue
        seen_ids[seed_id] = line.line_no
        lang = record.get("lang") or detect_lang(text)
        if lang not in ("zh", "en"):
            yield line.bad(f"lang {lang!r} is neither 'zh' nor 'en'")
            continue
        if record.get("discipline"):
            try:
                discipline = normalize_discipline(str(record["discipline"]))
            except ValueError as err:
                yield line.bad(str(err))
                continue
            source = "seed"
        else:
            discipline, source = classifier.classify(text), "classifier"
        yield Seed(seed_id, text, discipline, source, lang)


def science_items(
    seeds: Iterator[Seed | BadLine], run: GenerationRun, config: ScienceConfig
) -> Iterator[WorkItem]:
    """Work items for every seed and sample index; bad lines are recorded in the rejects."""
    made = 0
    for seed in seeds:
        if isinstance(seed, BadLine):
            key = "bad:" + hashlib.sha1(f"{seed.where}\x00{seed.raw}".encode()).hexdigest()[:20]
            if not run.is_done(key):
                run.reject_input(key, f"{seed.where}: {seed.reason}", {"line": seed.raw})
            continue
        messages = science_messages(seed.text, seed.discipline, seed.lang)
        for k in range(config.samples_per_seed):
            if config.limit is not None and made >= config.limit:
                return
            made += 1
            yield WorkItem(
                key=item_key(seed.seed_id, SCIENCE_PROMPT_VERSION, k),
                seed_id=seed.seed_id,
                messages=messages,
                lang=seed.lang,
                fields={
                    "discipline": seed.discipline,
                    "discipline_source": seed.discipline_source,
                    "sample_index": k,
                    "prompt_version": SCIENCE_PROMPT_VERSION,
                },
                seed=None if config.sampling_seed is None else config.sampling_seed + k,
            )


def parse_science(item: WorkItem, result: ChatResult) -> dict[str, Any]:
    try:
        problem, solution = parse_problem_solution(result.text)
    except ParseError as err:
        raise Reject("malformed", str(err)) from err
    return {"problem": problem, "solution": solution}


def count_seed_lines(path: str | os.PathLike) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
