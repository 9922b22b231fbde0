"""Quality filters for generated items: length, repetition, language, near-duplicates, and
decontamination against evaluation sets.

Each filter returns a reason string (rejected) or None (kept); the pipeline counts reasons in
the summary and writes rejected items with their reason to the rejects file.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from datasketch import MinHash, MinHashLSH

from megatron_syne.synth.text import (
    detect_lang,
    duplicate_line_fraction,
    duplicate_ngram_fraction,
    ngrams,
    text_units,
)


@dataclass
class FilterConfig:
    """Thresholds. Lengths are in characters; n-gram sizes in word units (see text.py)."""

    min_problem_chars: int = 40
    max_problem_chars: int = 6000
    min_solution_chars: int = 40
    max_solution_chars: int = 12000
    repetition_ngram: int = 5
    max_duplicate_ngram_fraction: float = 0.5
    max_duplicate_line_fraction: float = 0.3
    check_language: bool = True
    dedup: bool = True
    dedup_threshold: float = 0.8
    dedup_num_perm: int = 128
    dedup_shingle: int = 5
    decontamination_ngram: int = 13
    decontamination_min_hits: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.min_problem_chars <= self.max_problem_chars:
            raise ValueError("FilterConfig: need 0 < min_problem_chars <= max_problem_chars")
        if not 0 < self.min_solution_chars <= self.max_solution_chars:
            raise ValueError("FilterConfig: need 0 < min_solution_chars <= max_solution_chars")
        for name in ("max_duplicate_ngram_fraction", "max_duplicate_line_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"FilterConfig: {name} must be in (0, 1]")
        if not 0.0 < self.dedup_threshold < 1.0:
            raise ValueError("FilterConfig: dedup_threshold must be in (0, 1)")
        if min(self.repetition_ngram, self.dedup_shingle, self.decontamination_ngram) < 1:
            raise ValueError("FilterConfig: n-gram sizes must be >= 1")
        if self.decontamination_min_hits < 1:
            raise ValueError("FilterConfig: decontamination_min_hits must be >= 1")


def check_length(problem: str, solution: str, cfg: FilterConfig) -> str | None:
    if len(problem) < cfg.min_problem_chars:
        return f"too_short: problem has {len(problem)} chars < {cfg.min_problem_chars}"
    if len(problem) > cfg.max_problem_chars:
        return f"too_long: problem has {len(problem)} chars > {cfg.max_problem_chars}"
    if len(solution) < cfg.min_solution_chars:
        return f"too_short: solution has {len(solution)} chars < {cfg.min_solution_chars}"
    if len(solution) > cfg.max_solution_chars:
        return f"too_long: solution has {len(solution)} chars > {cfg.max_solution_chars}"
    return None


def check_repetition(text: str, cfg: FilterConfig) -> str | None:
    frac = duplicate_ngram_fraction(text_units(text), cfg.repetition_ngram)
    if frac > cfg.max_duplicate_ngram_fraction:
        return (
            f"repetition: {frac:.0%} of words are in repeated {cfg.repetition_ngram}-grams "
            f"(max {cfg.max_duplicate_ngram_fraction:.0%})"
        )
    frac = duplicate_line_fraction(text)
    if frac > cfg.max_duplicate_line_fraction:
        return f"repetition: {frac:.0%} of lines repeat (max {cfg.max_duplicate_line_fraction:.0%})"
    return None


def check_language(problem: str, solution: str, expected: str) -> str | None:
    """The problem and the solution must both be in the seed's language."""
    for name, text in (("problem", problem), ("solution", solution)):
        got = detect_lang(text)
        if got != expected:
            return f"wrong_language: {name} is {got}, seed is {expected}"
    return None


def _shingle_hash(shingle: str) -> int:
    # CRC-32 runs in C, about 20x cheaper than datasketch's default SHA-1 per shingle, and
    # unlike Python's hash() it is not salted per process, so dedup decisions are reproducible.
    return zlib.crc32(shingle.encode("utf-8"))


class NearDuplicateIndex:
    """MinHash-LSH over everything accepted so far (datasketch); the first item wins.

    Memory: about 3 KB per indexed item at 128 permutations (measured).
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5):
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.num_perm = num_perm
        self.shingle = shingle
        # The random permutations are the same for every MinHash; build them once.
        template = MinHash(num_perm=num_perm, hashfunc=_shingle_hash)
        self._permutations, self._scheme = template.permutations, template.scheme

    def _minhash(self, text: str) -> MinHash:
        units = text_units(text)
        n = self.shingle
        shingles = [" ".join(units[i : i + n]) for i in range(len(units) - n + 1)] or [
            " ".join(units)
        ]
        m = MinHash(
            num_perm=self.num_perm,
            hashfunc=_shingle_hash,
            permutations=self._permutations,
            scheme=self._scheme,
        )
        m.update_batch(shingles)
        return m

    def check_and_add(self, key: str, text: str) -> str | None:
        """Reason naming the earlier near-duplicate, or None after indexing ``text``."""
        m = self._minhash(text)
        hits = self.lsh.query(m)
        if hits:
            return f"near_duplicate: of item {sorted(hits)[0]}"
        self.lsh.insert(key, m)
        return None

    def add(self, key: str, text: str) -> None:
        if key not in self.lsh:
            self.lsh.insert(key, self._minhash(text))


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def iter_eval_texts(path: str | os.PathLike) -> Iterator[str]:
    """Texts of one evaluation file: for .jsonl/.json(.gz) each string field of each record
    on its own (question, each choice, answer: field order then cannot hide a match); for
    anything else each paragraph of plain text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decontamination file {path} does not exist")
    name = path.name.removesuffix(".gz")
    with _open_text(path) as f:
        if name.endswith(".jsonl"):
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError) as err:
                    raise ValueError(
                        f"{path}:{line_no}: not valid JSON ({err}); fix the line or pass the "
                        "file as plain text (.txt)"
                    ) from err
                yield from _strings(record)
        elif name.endswith(".json"):
            data = json.load(f)
            yield from _strings(data)
        else:
            for paragraph in f.read().split("\n\n"):
                if paragraph.strip():
                    yield paragraph


class Decontaminator:
    """Rejects items sharing n-grams (13 word units by default) with user evaluation sets.

    Only hashes of the n-grams are kept (8 bytes each in a Python set), so a few benchmark
    sets of millions of tokens fit in memory.
    """

    def __init__(self, n: int = 13, min_hits: int = 1, min_short_units: int = 8):
        self.n = n
        self.min_hits = min_hits
        self.min_short_units = min_short_units
        self.grams: set[int] = set()
        # Benchmark items shorter than n units (short questions) can only match whole; their
        # lengths are kept so check() also looks for m-grams of those lengths.
        self.short_lengths: set[int] = set()
        self.sources: list[str] = []
        self.skipped_short = 0

    @staticmethod
    def _hash(gram: tuple[str, ...]) -> int:
        # Tuple hashing runs in C; salted per process, fine for an in-memory set.
        return hash(gram)

    def add_text(self, text: str) -> None:
        units = text_units(text)
        if len(units) >= self.n:
            self.grams.update(self._hash(g) for g in ngrams(units, self.n))
        elif len(units) >= self.min_short_units:
            self.grams.add(self._hash(tuple(units)))
            self.short_lengths.add(len(units))
        else:
            self.skipped_short += 1  # too short to be evidence of contamination

    def add_files(self, paths: Iterable[str | os.PathLike]) -> None:
        for path in paths:
            for text in iter_eval_texts(path):
                self.add_text(text)
            self.sources.append(str(path))

    def check(self, text: str) -> str | None:
        if not self.grams:
            return None
        units = text_units(text)
        hits = 0
        for n in (self.n, *sorted(self.short_lengths)):
            hits += sum(1 for g in ngrams(units, n) if self._hash(g) in self.grams)
        if hits >= self.min_hits:
            return f"contaminated: {hits} {self.n}-gram(s) shared with the evaluation sets"
        return None
