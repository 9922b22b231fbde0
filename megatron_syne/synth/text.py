"""Language-agnostic text helpers shared by the filters: language guess and word units.

Chinese has no spaces, so every CJK character counts as one unit and runs of Latin letters or
digits count as one unit each; n-grams, repetition and MinHash shingles use these units, so a
13-gram means 13 words of English or 13 characters of Chinese.
"""

from __future__ import annotations

import re

_UNIT_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)
_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_RE = re.compile(r"[A-Za-z]")


def detect_lang(text: str, zh_threshold: float = 0.3) -> str:
    """``"zh"`` when CJK characters make up at least ``zh_threshold`` of the letters, else
    ``"en"``. Only the two languages of the SynE corpus are told apart."""
    cjk = len(_CJK_RE.findall(text))
    latin = len(_LATIN_RE.findall(text))
    if cjk + latin == 0:
        return "en"
    # A Latin word carries about as much text as 1.5 CJK characters; weigh letters down so
    # Chinese prose with a few English terms and formulas stays Chinese.
    return "zh" if cjk / (cjk + latin / 4) >= zh_threshold else "en"


def text_units(text: str) -> list[str]:
    """Lower-cased word units: CJK characters one by one, other words whole."""
    return _UNIT_RE.findall(text.lower())


def ngrams(units: list[str], n: int) -> list[tuple[str, ...]]:
    """Contiguous n-grams of ``units`` (empty when there are fewer than ``n`` units)."""
    return [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]


def duplicate_ngram_fraction(units: list[str], n: int) -> float:
    """Fraction of units covered by n-grams that occur more than once (Gopher's measure of
    heavy repetition; 0.0 for text with fewer than ``n`` units)."""
    grams = ngrams(units, n)
    if not grams:
        return 0.0
    seen: dict[tuple[str, ...], int] = {}
    for g in grams:
        seen[g] = seen.get(g, 0) + 1
    covered = [False] * len(units)
    for i, g in enumerate(grams):
        if seen[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    return sum(covered) / len(units)


def duplicate_line_fraction(text: str) -> float:
    """Fraction of non-empty lines that repeat an earlier line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)
