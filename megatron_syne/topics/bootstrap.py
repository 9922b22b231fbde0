"""Topic labels without any labelled data, in one call: keyword-lexicon seeds from the datasets
themselves -> n-gram classifier -> ``topic`` column of every dataset. What the quick-start demo
runs on the embedded corpus; the same steps as seed_labels.py, train.py and label.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_syne.data.metadata import check_distinct_datasets, read_metadata
from megatron_syne.topics.documents import decode_documents
from megatron_syne.topics.labeling import LabelConfig, LabelSummary, label_dataset
from megatron_syne.topics.seeding import SeedDocument, lexicon_seed_labels
from megatron_syne.topics.taxonomy import Taxonomy, load_taxonomy
from megatron_syne.topics.training import TrainResult, train_topic_classifier
from megatron_syne.utils.io import atomic_open


@dataclass
class BootstrapResult:
    n_seed_candidates: int
    n_seeds: int
    seed_counts: dict[str, int]
    train: TrainResult
    labels: dict[str, LabelSummary]


def bootstrap_topics(
    data_prefixes: list[str | os.PathLike],
    output_dir: str | os.PathLike,
    taxonomy: Taxonomy | None = None,
    tokenizer_type: str = "Llama3Tokenizer",
    tokenizer_model: str | None = None,
    max_seed_documents: int = 20000,
    max_tokens_per_doc: int = 2048,
    min_keywords: int = 3,
    min_margin: float = 1.5,
    workers: int = 1,
    seed: int = 1234,
) -> BootstrapResult:
    """Seed (up to ``max_seed_documents`` sampled documents), train, then label every dataset.
    Writes ``seeds.jsonl`` (+ ``.set_aside.jsonl``) and ``model/`` under ``output_dir``."""
    from megatron_syne.preprocess.tokenizers import load_tokenizer

    check_distinct_datasets(data_prefixes, "its documents would be sampled twice")
    taxonomy = taxonomy or load_taxonomy()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_type, tokenizer_model)
    rng = np.random.default_rng(seed)
    sizes = [read_metadata(p, columns=["lang"]).num_rows for p in data_prefixes]
    per_dataset = max(1, max_seed_documents // max(len(data_prefixes), 1))
    documents = []
    for prefix, n in zip(data_prefixes, sizes):
        indices = np.arange(n) if n <= per_dataset else np.sort(rng.choice(n, per_dataset, False))
        langs = read_metadata(prefix, columns=["lang"]).column("lang").to_pylist()
        texts = decode_documents(prefix, indices, tokenizer, max_tokens_per_doc)
        documents += [
            SeedDocument(t, langs[i], f"{prefix} doc {i}") for t, i in zip(texts, indices.tolist())
        ]
    seeds = lexicon_seed_labels(documents, taxonomy, min_keywords, min_margin)
    seeds_path = output_dir / "seeds.jsonl"
    for path, rows in (
        (seeds_path, seeds.labelled),
        (Path(f"{seeds_path}.set_aside.jsonl"), seeds.set_aside),
    ):
        with atomic_open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    train = train_topic_classifier([seeds_path], taxonomy, output_dir / "model", seed=seed)
    labels = {
        str(prefix): label_dataset(
            LabelConfig(
                str(prefix),
                str(output_dir / "model"),
                tokenizer_type=tokenizer_type,
                tokenizer_model=tokenizer_model,
                workers=workers,
                restart=True,
                progress=False,
            )
        )
        for prefix in data_prefixes
    }
    return BootstrapResult(len(documents), len(seeds.labelled), dict(seeds.counts), train, labels)
