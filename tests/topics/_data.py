"""Small datasets for topic and PPL tests: real .bin/.idx (megatron-core's builder) + metadata."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import yaml

from megatron_syne.data.metadata import write_metadata

# A separable toy taxonomy in two languages: two English and two Chinese topics.
TOY_WORDS = {
    "en_sport": (
        "en",
        "football goal match team player coach league stadium score referee".split(),
    ),
    "en_cooking": ("en", "recipe oven flour sugar butter bake kitchen dinner sauce salt".split()),
    "zh_sport": ("zh", list("足球比赛球队球员教练联赛进球裁判冠军体育")),
    "zh_cooking": ("zh", list("菜谱烤箱面粉白糖黄油厨房晚餐酱油盐炒锅")),
}
FILLER = {"en": "the a of and to in is was it".split(), "zh": list("的了是在和有我他这")}


def load_tool(relative: str):
    """Import a tools/ script as a module (tools/ is not a package) to call its main(argv)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / relative
    spec = importlib.util.spec_from_file_location(f"tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_toy_taxonomy(path: Path, duplicate: bool = False) -> Path:
    topics = [
        {
            "id": topic,
            "lang": lang,
            "name": topic.replace("_", " "),
            "description": f"documents about {topic.split('_')[1]}",
            "keywords": {lang: words[:6]},
        }
        for topic, (lang, words) in TOY_WORDS.items()
    ]
    if duplicate:
        topics.append(dict(topics[0], name="again"))
    path.write_text(
        yaml.safe_dump({"name": "toy", "version": 1, "topics": topics}, allow_unicode=True)
    )
    return path


def toy_document(topic: str, rng: random.Random, n_words: int = 30) -> str:
    lang, words = TOY_WORDS[topic]
    tokens = [
        rng.choice(words) if rng.random() < 0.5 else rng.choice(FILLER[lang])
        for _ in range(n_words)
    ]
    return (" " if lang == "en" else "").join(tokens)


def toy_corpus(n_per_topic: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = [
        {"text": toy_document(topic, rng), "topic": topic, "lang": TOY_WORDS[topic][0]}
        for topic in TOY_WORDS
        for _ in range(n_per_topic)
    ]
    rng.shuffle(rows)
    return rows


def build_dataset(
    prefix: Path,
    documents: list[list[int]],
    langs: list[str] | None = None,
    sources: list[str] | None = None,
    dtype=np.int32,
) -> Path:
    """Write ``prefix``.bin/.idx with one sequence per document, plus the metadata sidecar."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for tokens in documents:
        builder.add_document(torch.tensor(tokens, dtype=torch.int64), [len(tokens)])
    builder.finalize(f"{prefix}.idx")
    n = len(documents)
    table = pa.table(
        {
            "lang": pa.array(langs or ["en"] * n, pa.string()),
            "source": pa.array(sources or ["web"] * n, pa.string()),
            "topic": pa.array([None] * n, pa.string()),
            "n_tokens": pa.array([len(d) for d in documents], pa.int64()),
            "n_chars": pa.array([0] * n, pa.int64()),
            "hash": pa.array([f"{i:08x}" for i in range(n)], pa.string()),
            "input_file": pa.array(["toy.jsonl"] * n, pa.string()),
            "input_line": pa.array(list(range(1, n + 1)), pa.int64()),
        }
    )
    write_metadata(prefix, table)
    return prefix


def build_text_dataset(prefix: Path, rows: list[dict], tokenizer) -> Path:
    """Tokenize rows' text the way preprocessing does (text ids + EOD) into a dataset."""
    docs = [tokenizer.encode(r["text"]) + [tokenizer.eod] for r in rows]
    return build_dataset(prefix, docs, langs=[r["lang"] for r in rows])
