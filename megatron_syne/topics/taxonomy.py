"""Topic taxonomy: the set of labels the topic classifier predicts and the mixture balances.

A taxonomy is a YAML file (see ``examples/topics/syne_topics_v1.yaml``, the default)::

    name: syne-topics
    version: 1
    topics:
      - id: en_cs_engineering          # written to the metadata ``topic`` column
        lang: en                       # documents of this language may get this topic
        name: Computer Science and Engineering
        description: Programming, software, ...
        subjects: [college_computer_science, ...]   # optional provenance
        keywords: {en: [software, ...], zh: [软件, ...]}

Topic ids are unique within a file; each topic belongs to one language, so the classifier only
ever gives a document a topic of its own language.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from megatron_syne.utils.yaml_strict import YAMLInputError, load_yaml_file

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TAXONOMY = REPO_ROOT / "examples" / "topics" / "syne_topics_v1.yaml"

_TOPIC_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TaxonomyError(ValueError):
    """The taxonomy file is malformed; the message names the file, the topic and the fix."""


@dataclass(frozen=True)
class Topic:
    id: str
    lang: str
    name: str
    description: str
    keywords: dict[str, tuple[str, ...]] = field(default_factory=dict)
    subjects: tuple[str, ...] = ()

    def all_keywords(self) -> tuple[str, ...]:
        return tuple(k for words in self.keywords.values() for k in words)


@dataclass(frozen=True)
class Taxonomy:
    name: str
    version: int | str
    topics: tuple[Topic, ...]
    path: str | None = None

    def __post_init__(self) -> None:
        where = self.path or "<taxonomy>"
        if not self.topics:
            raise TaxonomyError(f"{where}: no topics; list at least one under `topics:`")
        seen: dict[str, int] = {}
        for i, topic in enumerate(self.topics):
            if topic.id in seen:
                raise TaxonomyError(
                    f"{where}: duplicate topic id {topic.id!r} (entries {seen[topic.id] + 1} and "
                    f"{i + 1}); topic ids must be unique: rename or merge one of them"
                )
            seen[topic.id] = i

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.topics]

    @property
    def languages(self) -> list[str]:
        return sorted({t.lang for t in self.topics})

    def topic(self, topic_id: str) -> Topic:
        for t in self.topics:
            if t.id == topic_id:
                return t
        raise KeyError(topic_id)

    def topics_for_lang(self, lang: str | None) -> list[Topic]:
        """Topics a document of ``lang`` may receive (all topics when the language is unknown
        to the taxonomy, so documents of an unexpected language still get a label)."""
        chosen = [t for t in self.topics if t.lang == lang]
        return chosen or list(self.topics)

    def fingerprint(self) -> str:
        """Content hash of the label set (ids and languages), stored with trained models."""
        payload = json.dumps([(t.id, t.lang) for t in self.topics])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "topics": [
                {
                    "id": t.id,
                    "lang": t.lang,
                    "name": t.name,
                    "description": t.description,
                    "subjects": list(t.subjects),
                    "keywords": {k: list(v) for k, v in t.keywords.items()},
                }
                for t in self.topics
            ],
        }

    @classmethod
    def from_dict(cls, data: dict, path: str | None = None) -> Taxonomy:
        where = path or "<taxonomy>"
        if not isinstance(data, dict) or "topics" not in data:
            raise TaxonomyError(f"{where}: expected a mapping with a `topics:` list")
        raw_topics = data["topics"]
        if not isinstance(raw_topics, list):
            raise TaxonomyError(f"{where}: `topics` must be a list of mappings")
        topics = []
        for i, raw in enumerate(raw_topics):
            topics.append(_parse_topic(raw, i, where))
        return cls(
            name=str(data.get("name", Path(where).stem)),
            version=data.get("version", 0),
            topics=tuple(topics),
            path=path,
        )


def _parse_topic(raw: object, index: int, where: str) -> Topic:
    label = f"{where}: topic entry {index + 1}"
    if not isinstance(raw, dict):
        raise TaxonomyError(f"{label}: expected a mapping with id, lang, name, description")
    missing = [k for k in ("id", "lang", "name", "description") if not raw.get(k)]
    if missing:
        raise TaxonomyError(f"{label} ({raw.get('id', '?')}): missing field(s) {missing}")
    topic_id = str(raw["id"])
    if not _TOPIC_ID.match(topic_id):
        raise TaxonomyError(
            f"{label}: topic id {topic_id!r} must be letters, digits, '_', '.', '-' "
            "(it becomes a metadata value and a file name)"
        )
    keywords_raw = raw.get("keywords") or {}
    if isinstance(keywords_raw, list):
        keywords_raw = {str(raw["lang"]): keywords_raw}
    if not isinstance(keywords_raw, dict):
        raise TaxonomyError(f"{label} ({topic_id}): `keywords` must map language -> list")
    keywords = {
        str(lang): tuple(str(w).strip() for w in words if str(w).strip())
        for lang, words in keywords_raw.items()
    }
    return Topic(
        id=topic_id,
        lang=str(raw["lang"]),
        name=str(raw["name"]),
        description=str(raw["description"]),
        keywords=keywords,
        subjects=tuple(str(s) for s in raw.get("subjects") or ()),
    )


def load_taxonomy(path: str | os.PathLike | None = None) -> Taxonomy:
    """Load and validate a taxonomy YAML file (the bundled SynE v1 taxonomy by default)."""
    path = Path(path) if path is not None else DEFAULT_TAXONOMY
    if not path.exists():
        raise TaxonomyError(f"{path}: taxonomy file not found")
    try:
        data = load_yaml_file(path, "taxonomy file")
    except YAMLInputError as e:
        raise TaxonomyError(str(e)) from None
    return Taxonomy.from_dict(data, path=str(path))


def check_labels(taxonomy: Taxonomy, labels: Iterable[tuple[str, str]], source: str) -> None:
    """Raise naming the first (line, label) pairs whose label is not a topic id."""
    known = set(taxonomy.ids)
    unknown = [(where, label) for where, label in labels if label not in known]
    if unknown:
        shown = ", ".join(f"{where}: {label!r}" for where, label in unknown[:5])
        raise TaxonomyError(
            f"{source}: {len(unknown)} label(s) are not topics of taxonomy "
            f"{taxonomy.path or taxonomy.name} ({shown}); fix the labels or add the topic "
            f"to the taxonomy. Known topics: {', '.join(taxonomy.ids)}"
        )
