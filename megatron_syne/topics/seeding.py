"""Seed labels for the topic classifier, since users rarely have labelled web pages.

Two sources, both writing training JSONL (``text``, ``topic``, ``lang`` + provenance):

- :class:`KeywordLexicon`: the taxonomy's per-topic keyword lists. A document is labelled only
  when enough distinct keywords of one topic occur and that topic clearly beats the runner-up;
  everything else is kept aside as ``no_keywords`` / ``ambiguous`` (never forced). Precise but
  low-recall: good seeds, not a classifier (the classifier trained on them generalises).
- :func:`llm_seed_labels`: any OpenAI-compatible chat server (vLLM, SGLang, TGI, ...). The prompt
  lists the document language's topics with their descriptions; the answer must name one topic
  id. Transient HTTP failures are retried with backoff; answers naming no (or several) topics
  are counted and written aside with the raw answer.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from megatron_syne.topics.taxonomy import Taxonomy, Topic


@dataclass
class SeedDocument:
    text: str
    lang: str | None
    where: str  # provenance: "doc 17" or "file.jsonl:3"


@dataclass
class SeedResult:
    labelled: list[dict] = field(default_factory=list)
    set_aside: list[dict] = field(default_factory=list)  # each with a "reason"
    counts: Counter = field(default_factory=Counter)


# ------------------------------------------------------------------------------ lexicon
_WORD = re.compile(r"[^\W_]+")  # words for ASCII keyword matching (letters and digits)


class KeywordLexicon:
    """Per-topic keyword matcher. ASCII keywords match case-insensitively on word boundaries;
    others (Chinese) match as substrings, since Chinese has no spaces between words."""

    def __init__(self, taxonomy: Taxonomy):
        self.taxonomy = taxonomy
        # ASCII keywords are looked up in the document's word n-gram counts (one tokenisation
        # per document); other keywords are counted as substrings (str.count, in C).
        self._ascii: dict[str, list[str]] = {}
        self._other: dict[str, list[str]] = {}
        self._max_words = 1
        for topic in taxonomy.topics:
            keywords = list(dict.fromkeys(k.lower() for k in topic.all_keywords()))
            ascii_keywords = [" ".join(_WORD.findall(k)) for k in keywords if k.isascii()]
            self._ascii[topic.id] = [k for k in ascii_keywords if k]
            self._other[topic.id] = [k for k in keywords if not k.isascii()]
            for k in self._ascii[topic.id]:
                self._max_words = max(self._max_words, k.count(" ") + 1)

    def scores(self, text: str, lang: str | None) -> dict[str, tuple[int, int]]:
        """topic id -> (distinct keywords matched, total occurrences), for ``lang``'s topics."""
        lowered = text.lower()
        words = _WORD.findall(lowered)
        ngrams = Counter(words)
        for n in range(2, self._max_words + 1):
            ngrams.update(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
        out = {}
        for topic in self.taxonomy.topics_for_lang(lang):
            counts = [ngrams.get(k, 0) for k in self._ascii[topic.id]]
            counts += [lowered.count(k) for k in self._other[topic.id]]
            out[topic.id] = (sum(1 for c in counts if c), sum(counts))
        return out

    def label(
        self, text: str, lang: str | None, min_keywords: int = 3, min_margin: float = 1.5
    ) -> tuple[str | None, str, dict[str, tuple[int, int]]]:
        """(topic or None, reason, scores). Ranking is by distinct keywords then occurrences;
        the winner needs ``min_keywords`` distinct keywords and ``min_margin`` times the
        runner-up's distinct count."""
        scores = self.scores(text, lang)
        ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
        best_id, (best, _) = ranked[0]
        runner_up = ranked[1][1][0] if len(ranked) > 1 else 0
        if best < min_keywords:
            return None, "no_keywords", scores
        if best < min_margin * runner_up:
            return None, "ambiguous", scores
        return best_id, "ok", scores


def lexicon_seed_labels(
    documents: Iterable[SeedDocument],
    taxonomy: Taxonomy,
    min_keywords: int = 3,
    min_margin: float = 1.5,
    max_per_topic: int | None = None,
) -> SeedResult:
    if min_keywords < 1:
        # 0 would label documents in which no keyword of any topic occurs
        raise ValueError(f"min_keywords (--min-keywords) must be >= 1, got {min_keywords}")
    if max_per_topic is not None and max_per_topic < 1:
        raise ValueError(f"max_per_topic (--max-per-topic) must be >= 1, got {max_per_topic}")
    lexicon = KeywordLexicon(taxonomy)
    result = SeedResult()
    per_topic: Counter = Counter()
    for doc in documents:
        topic, reason, scores = lexicon.label(doc.text, doc.lang, min_keywords, min_margin)
        top = {k: v[0] for k, v in sorted(scores.items(), key=lambda kv: kv[1], reverse=True)[:3]}
        if topic is not None and max_per_topic is not None and per_topic[topic] >= max_per_topic:
            topic, reason = None, "topic_full"
        result.counts[reason] += 1
        row = {"text": doc.text, "lang": doc.lang, "where": doc.where, "method": "lexicon"}
        if topic is None:
            result.set_aside.append({**row, "reason": reason, "keyword_hits": top})
        else:
            per_topic[topic] += 1
            result.labelled.append({**row, "topic": topic, "keyword_hits": top})
    result.counts.update({f"topic:{k}": v for k, v in per_topic.items()})
    return result


# ------------------------------------------------------------------------------ LLM
SYSTEM_PROMPT = "You are a careful data annotator. You classify documents by topic."


def build_prompt(text: str, topics: list[Topic], max_chars: int) -> list[dict[str, str]]:
    listing = "\n".join(f"- {t.id}: {t.name}. {t.description}" for t in topics)
    user = (
        "Classify the document below into exactly one of these topics:\n"
        f"{listing}\n\n"
        "Answer with the topic id only (for example: "
        f"{topics[0].id}), nothing else.\n\n"
        f"Document:\n<<<\n{text[:max_chars]}\n>>>"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_answer(answer: str, topics: list[Topic]) -> str | None:
    """The one topic the answer names (by id, else by display name); None if none or several."""
    lowered = answer.lower()
    ids = [
        t.id
        for t in topics
        if re.search(rf"(?<![\w.-]){re.escape(t.id.lower())}(?![\w-])", lowered)
    ]
    if len(ids) == 1:
        return ids[0]
    if not ids:
        names = [t.id for t in topics if t.name.lower() in lowered]
        if len(names) == 1:
            return names[0]
    return None


@dataclass
class LLMConfig:
    api_base: str
    model: str
    api_key: str | None = None
    max_retries: int = 4
    backoff_base: float = 1.0  # seconds; doubled per retry, with jitter
    request_timeout: float = 120.0  # seconds per request
    concurrency: int = 16  # requests in flight
    max_chars: int = 3000  # document head shown to the model
    max_tokens: int = 16  # an id is a few tokens; reasoning models need more
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if not self.api_base.startswith(("http://", "https://")):
            raise ValueError(f"--api-base {self.api_base!r} must start with http:// or https://")
        self.api_base = self.api_base.rstrip("/")
        if not self.model:
            raise ValueError("--model (the served model name) is required")
        if self.max_retries < 0 or self.concurrency < 1 or self.request_timeout <= 0:
            raise ValueError("max_retries >= 0, concurrency >= 1, request_timeout > 0")


RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class ChatError(RuntimeError):
    pass


def chat_completion(
    client: httpx.Client, config: LLMConfig, messages: list[dict], rng: random.Random
) -> tuple[str, int]:
    """(answer text, attempts). Retries timeouts, connection errors, 429/5xx, non-JSON bodies."""
    payload = {
        "model": config.model,
        "messages": messages,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
    }
    last_error = ""
    for attempt in range(config.max_retries + 1):
        if attempt:
            time.sleep(rng.uniform(0, config.backoff_base * 2 ** (attempt - 1)))
        try:
            response = client.post(f"{config.api_base}/chat/completions", json=payload)
        except httpx.HTTPError as e:
            last_error = f"{type(e).__name__}: {e}"
            continue
        if response.status_code in RETRYABLE_STATUS:
            last_error = f"HTTP {response.status_code}"
            continue
        if response.status_code != 200:
            raise ChatError(f"HTTP {response.status_code}: {response.text[:300]}")
        try:
            return response.json()["choices"][0]["message"]["content"] or "", attempt + 1
        except (ValueError, KeyError, IndexError, TypeError) as e:
            last_error = f"malformed response ({type(e).__name__})"
    raise ChatError(f"gave up after {config.max_retries + 1} attempts: {last_error}")


def llm_seed_labels(
    documents: list[SeedDocument], taxonomy: Taxonomy, config: LLMConfig, seed: int = 1234
) -> SeedResult:
    result = SeedResult()
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency)

    def one(args: tuple[int, SeedDocument, httpx.Client]) -> dict:
        i, doc, client = args
        topics = taxonomy.topics_for_lang(doc.lang)
        row = {"text": doc.text, "lang": doc.lang, "where": doc.where, "method": "llm"}
        try:
            answer, attempts = chat_completion(
                client,
                config,
                build_prompt(doc.text, topics, config.max_chars),
                random.Random(seed + i),
            )
        except ChatError as e:
            return {**row, "reason": "request_failed", "error": str(e)}
        topic = parse_answer(answer, topics)
        if topic is None:
            return {**row, "reason": "unparsable", "answer": answer, "attempts": attempts}
        return {**row, "topic": topic, "answer": answer, "attempts": attempts}

    with (
        httpx.Client(headers=headers, timeout=config.request_timeout, limits=limits) as client,
        ThreadPoolExecutor(config.concurrency) as pool,
    ):
        rows = list(pool.map(one, [(i, d, client) for i, d in enumerate(documents)]))
    for row in rows:
        if "topic" in row:
            result.labelled.append(row)
            result.counts["ok"] += 1
            result.counts[f"topic:{row['topic']}"] += 1
        else:
            result.set_aside.append(row)
            result.counts[row["reason"]] += 1
    return result
