"""label.py: topics land in the right metadata rows; sharded, multi-process, killed-and-resumed
runs give the same labels; bad input is refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from megatron_syne.data.metadata import MetadataError, read_metadata, write_metadata
from megatron_syne.preprocess.tokenizers import load_tokenizer
from megatron_syne.scoring.parts import PartsError
from megatron_syne.topics.classifier import load_topic_model
from megatron_syne.topics.labeling import LabelConfig, label_dataset
from megatron_syne.topics.taxonomy import load_taxonomy
from megatron_syne.topics.training import train_topic_classifier
from tests.helpers import REPO_ROOT, cpu_env
from tests.topics._data import build_dataset, toy_corpus, write_toy_taxonomy


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("labeling")
    taxonomy = load_taxonomy(write_toy_taxonomy(root / "toy.yaml"))
    with open(root / "train.jsonl", "w", encoding="utf-8") as f:
        for row in toy_corpus(30, seed=0):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    train_topic_classifier([root / "train.jsonl"], taxonomy, root / "model")
    tokenizer = load_tokenizer()
    rows = toy_corpus(10, seed=5)  # 40 documents, topics shuffled
    # Document 13 is empty (only EOD): it must get a null topic, not a guess.
    docs = [tokenizer.encode(r["text"]) + [tokenizer.eod] for r in rows]
    docs.insert(13, [tokenizer.eod])
    rows.insert(13, {"text": "", "topic": None, "lang": "en"})
    return root, rows, docs


def _dataset(tmp_path, rows, docs):
    return build_dataset(tmp_path / "ds", docs, langs=[r["lang"] for r in rows])


def _expected(root, rows):
    model = load_topic_model(root / "model")
    texts = [r["text"] for r in rows if r["text"]]
    topics, conf = model.predict(texts, [r["lang"] for r in rows if r["text"]])
    it = iter(zip(topics, conf))
    return [next(it) if r["text"] else (None, None) for r in rows]


def test_labels_land_in_the_right_rows(trained, tmp_path):
    root, rows, docs = trained
    prefix = _dataset(tmp_path, rows, docs)
    summary = label_dataset(
        LabelConfig(str(prefix), str(root / "model"), chunk_size=7, progress=False)
    )
    assert summary.merged and summary.documents_labelled == 41 and summary.empty_documents == 1
    meta = read_metadata(prefix)
    topics = meta.column("topic").to_pylist()
    confidence = meta.column("topic_confidence").to_pylist()
    assert topics[13] is None and confidence[13] is None
    truth = [r["topic"] for r in rows]
    assert sum(t == g for t, g in zip(topics, truth) if g) >= 39  # toy topics are separable
    assert all(t.startswith(r["lang"] + "_") for t, r in zip(topics, rows) if t)
    for (topic, conf), got_t, got_c in zip(_expected(root, rows), topics, confidence):
        assert got_t == topic and (conf is None or abs(got_c - conf) < 1e-6)
    # the other metadata columns are untouched
    assert meta.column("input_line").to_pylist() == list(range(1, 42))
    written = json.loads((tmp_path / "ds.topics.summary.json").read_text())
    assert sum(written["topic_counts"].values()) == 41
    assert written["topic_counts"]["<empty document>"] == 1
    assert not (tmp_path / "ds.topics.parts").exists()


def test_sharded_multiprocess_labelling_then_merge(trained, tmp_path):
    root, rows, docs = trained
    prefix = _dataset(tmp_path, rows, docs)
    common = dict(
        data_prefix=str(prefix), model_dir=str(root / "model"), chunk_size=5, progress=False
    )
    s0 = label_dataset(LabelConfig(**common, num_shards=2, shard_index=0, workers=2))
    assert not s0.merged and s0.chunks_labelled == 5  # chunks 0, 2, 4, 6, 8 of 9
    assert read_metadata(prefix).column("topic").null_count == 41  # nothing written yet
    with pytest.raises(PartsError, match="1 of 9 chunks|4 of 9 chunks"):
        label_dataset(LabelConfig(**common, num_shards=2, merge_only=True))
    s1 = label_dataset(LabelConfig(**common, num_shards=2, shard_index=1))
    assert s1.chunks_labelled == 4 and not s1.merged
    merged = label_dataset(LabelConfig(**common, num_shards=2, merge_only=True))
    assert merged.merged and merged.documents_labelled == 0
    topics = read_metadata(prefix).column("topic").to_pylist()
    assert topics == [t for t, _ in _expected(root, rows)]


def test_killed_run_resumes_without_relabelling_or_losing_rows(trained, tmp_path):
    root, rows, docs = trained
    prefix = _dataset(tmp_path, rows, docs)
    parts_dir = tmp_path / "ds.topics.parts"
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests/topics/_slow_label.py"), str(prefix), str(root / "model"), "0.4"],
        env=cpu_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 240
    while len(list(parts_dir.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "labelling run made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = {p: p.stat().st_mtime_ns for p in parts_dir.glob("part-*.parquet")}
    assert 3 <= len(done) < 11  # killed part-way through the 11 chunks
    assert read_metadata(prefix).column("topic").null_count == 41  # not merged

    summary = label_dataset(
        LabelConfig(str(prefix), str(root / "model"), chunk_size=4, keep_parts=True, progress=False)
    )
    assert summary.chunks_reused == len(done)
    assert summary.chunks_labelled == 11 - len(done)
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # none relabelled
    topics = read_metadata(prefix).column("topic").to_pylist()
    assert len(topics) == 41 and topics == [t for t, _ in _expected(root, rows)]


def test_resume_with_another_model_is_refused(trained, tmp_path):
    root, rows, docs = trained
    prefix = _dataset(tmp_path, rows, docs)
    config = dict(data_prefix=str(prefix), chunk_size=8, progress=False, num_shards=2)
    label_dataset(LabelConfig(model_dir=str(root / "model"), **config))
    other = tmp_path / "model2"
    train_topic_classifier(
        [root / "train.jsonl"], load_taxonomy(root / "toy.yaml"), other, held_out_fraction=0.0
    )
    with pytest.raises(PartsError, match="model.*changed.*--restart"):
        label_dataset(LabelConfig(model_dir=str(other), **config, shard_index=1))


def test_metadata_row_count_mismatch_is_refused(trained, tmp_path):
    root, rows, docs = trained
    prefix = _dataset(tmp_path, rows, docs)
    table = read_metadata(prefix)
    write_metadata(prefix, table.slice(0, 40))
    with pytest.raises(MetadataError, match=r"40 metadata rows but .*41 documents"):
        label_dataset(LabelConfig(str(prefix), str(root / "model"), progress=False))


def test_bootstrap_from_lexicon_seeds_labels_the_dataset(trained, tmp_path):
    """The demo path: no labelled data, lexicon seeds -> classifier -> topic column."""
    from megatron_syne.topics.bootstrap import bootstrap_topics

    root, rows, docs = trained
    prefix = _dataset(tmp_path, rows, docs)
    result = bootstrap_topics(
        [prefix], tmp_path / "topics", taxonomy=load_taxonomy(root / "toy.yaml"), min_keywords=2
    )
    assert result.n_seed_candidates == 41 and 20 <= result.n_seeds <= 40
    assert result.labels[str(prefix)].merged
    topics = read_metadata(prefix).column("topic").to_pylist()
    truth = [r["topic"] for r in rows]
    assert sum(t == g for t, g in zip(topics, truth) if g) >= 36 and topics[13] is None
