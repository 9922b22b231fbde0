"""Taxonomy validation and the topic classifier (n-gram default, HF encoder option)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_syne.topics.classifier import load_topic_model
from megatron_syne.topics.taxonomy import TaxonomyError, load_taxonomy
from megatron_syne.topics.training import train_topic_classifier
from tests.topics._data import TOY_WORDS, load_tool, toy_corpus, write_toy_taxonomy


def _write_jsonl(path, rows, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def test_default_taxonomy_has_11_topics_per_language():
    taxonomy = load_taxonomy()
    by_lang = {lang: [t for t in taxonomy.topics if t.lang == lang] for lang in ("en", "zh")}
    assert len(by_lang["en"]) == 11 and len(by_lang["zh"]) == 11 and len(taxonomy.topics) == 22
    names = {t.name for t in by_lang["en"]}
    for known in (
        "Computer Science and Engineering",
        "History and Geography",
        "Psychology and Sociology",
    ):
        assert known in names
    for topic in taxonomy.topics:
        assert topic.description and topic.keywords.get("en") and topic.keywords.get("zh")


def test_duplicate_topic_is_a_clear_error(tmp_path):
    path = write_toy_taxonomy(tmp_path / "dup.yaml", duplicate=True)
    with pytest.raises(TaxonomyError, match=r"duplicate topic id 'en_sport' \(entries 1 and 5\)"):
        load_taxonomy(path)


def test_unknown_topic_in_training_labels_names_the_line(tmp_path):
    taxonomy = load_taxonomy(write_toy_taxonomy(tmp_path / "toy.yaml"))
    rows = toy_corpus(3, seed=0)
    rows[4] = dict(rows[4], topic="en_gardening")
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(TaxonomyError, match=r"train.jsonl:5: 'en_gardening'"):
        train_topic_classifier([data], taxonomy, tmp_path / "model")


def test_ngram_classifier_learns_toy_taxonomy_in_both_languages(tmp_path):
    train_tool = load_tool("topics/train.py")

    taxonomy_path = write_toy_taxonomy(tmp_path / "toy.yaml")
    data = _write_jsonl(
        tmp_path / "train.jsonl",
        toy_corpus(30, seed=0),
        # a malformed line, a line without text, and nesting too deep for Python's parser
        extra_lines=['{"text": "broken', '{"topic": "en_sport"}', "[" * 5000 + "]" * 5000],
    )
    rc = train_tool.main(
        [
            "--input",
            str(data),
            "--output-dir",
            str(tmp_path / "model"),
            "--taxonomy",
            str(taxonomy_path),
        ]
    )
    assert rc == 0
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    held = metrics["held_out"]
    assert held["n_documents"] == 24  # 20% of 30 per topic
    assert held["accuracy"] >= 0.95 and held["macro_f1"] >= 0.95
    assert set(held["per_topic"]) == set(TOY_WORDS)
    assert metrics["n_rejects"] == 3
    rejects = (tmp_path / "model" / "rejects.jsonl").read_text().splitlines()
    assert [json.loads(r)["where"].rsplit(":", 1)[1] for r in rejects] == ["121", "122", "123"]
    assert (tmp_path / "model" / "confusion_matrix.png").stat().st_size > 5000

    model = load_topic_model(tmp_path / "model")
    fresh = toy_corpus(20, seed=7)
    topics, confidence = model.predict([r["text"] for r in fresh], [r["lang"] for r in fresh])
    accuracy = np.mean([t == r["topic"] for t, r in zip(topics, fresh)])
    assert accuracy >= 0.95
    assert ((confidence > 0.25) & (confidence <= 1.0)).all()
    # The language restriction: an English sports text declared Chinese gets a Chinese topic.
    forced, _ = model.predict([fresh[0]["text"]], ["zh"])
    assert forced[0].startswith("zh_")


def test_hf_encoder_finetuning_path_on_cpu(tmp_path):
    """The optional encoder path with a tiny random BERT saved locally (stands in for TinyBERT)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from megatron_syne.topics.encoder import EncoderTrainConfig

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for _, words in TOY_WORDS.values():
        vocab += [w for w in words if w not in vocab]
    vocab += "the a of and to in is was it 的 了 是 在 和 有 我 他 这".split()
    vocab = list(dict.fromkeys(vocab))
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(1)  # a fixed random encoder: CPU training is then deterministic
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")

    taxonomy = load_taxonomy(write_toy_taxonomy(tmp_path / "toy.yaml"))
    data = _write_jsonl(tmp_path / "train.jsonl", toy_corpus(20, seed=1))
    result = train_topic_classifier(
        [data],
        taxonomy,
        tmp_path / "model",
        encoder_config=EncoderTrainConfig(
            encoder_path=str(tmp_path / "bert"),
            epochs=10,
            learning_rate=1e-2,
            micro_batch_size=16,
            max_length=40,
            device="cpu",
        ),  # fmt: skip
    )
    losses = result.metrics["epoch_losses"]
    assert losses[-1] < 0.5 * losses[0]
    assert result.metrics["held_out"]["accuracy"] >= 0.75  # chance is 0.25, language alone 0.5
    model = load_topic_model(tmp_path / "model", device="cpu")
    assert model.kind == "hf_encoder"
    fresh = toy_corpus(10, seed=9)
    topics, _ = model.predict([r["text"] for r in fresh], [r["lang"] for r in fresh])
    assert np.mean([t == r["topic"] for t, r in zip(topics, fresh)]) >= 0.75
