"""Topic tools on bad input: a clear ``error: ...`` (file, line or flag, and the fix) and exit 2,
never a traceback; a run that cannot start leaves no state that blocks the corrected rerun."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from megatron_syne.data.metadata import metadata_path, read_metadata
from megatron_syne.preprocess.tokenizers import load_tokenizer
from megatron_syne.scoring.parts import PartsDir
from megatron_syne.topics.bootstrap import bootstrap_topics
from megatron_syne.topics.classifier import TopicModelError, load_topic_model
from megatron_syne.topics.taxonomy import load_taxonomy
from megatron_syne.topics.training import train_topic_classifier
from tests.topics._data import build_text_dataset, load_tool, toy_corpus, write_toy_taxonomy

train_tool = load_tool("topics/train.py")
label_tool = load_tool("topics/label.py")
seed_tool = load_tool("topics/seed_labels.py")


def _jsonl(path, rows, extra: bytes = b""):
    with open(path, "wb") as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
        f.write(extra)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, taxonomy path, model dir, training JSONL, dataset prefix)."""
    root = tmp_path_factory.mktemp("cli-errors")
    taxonomy = write_toy_taxonomy(root / "toy.yaml")
    train = _jsonl(root / "train.jsonl", toy_corpus(20, seed=0))
    train_topic_classifier([train], load_taxonomy(taxonomy), root / "model")
    prefix = build_text_dataset(root / "ds", toy_corpus(3, seed=1), load_tokenizer())
    return root, taxonomy, root / "model", train, prefix


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------ train.py
def _train(args, taxonomy) -> int:
    return train_tool.main([*args, "--taxonomy", str(taxonomy)])


def test_train_bad_input_is_an_error_and_leaves_no_output_dir(trained, tmp_path, capsys):
    _, taxonomy, _, train, _ = trained
    out = tmp_path / "model"
    cases = {
        "missing": (tmp_path / "missing.jsonl", "missing.jsonl: training input not found"),
        "empty": (_jsonl(tmp_path / "empty.jsonl", []), "at least two topics"),
        "one topic": (
            _jsonl(
                tmp_path / "one.jsonl", [r for r in toy_corpus(3, 0) if r["topic"] == "en_sport"]
            ),
            r"at least two topics to train a classifier, found \['en_sport'\]",
        ),
        "not utf-8": (
            _jsonl(
                tmp_path / "gbk.jsonl", toy_corpus(2, 0), extra='{"text": "足球"}\n'.encode("gbk")
            ),
            r"gbk.jsonl:9: not valid UTF-8 .*convert the file to UTF-8",
        ),
    }
    for name, (path, message) in cases.items():
        assert _train(["--input", str(path), "--output-dir", str(out)], taxonomy) == 2, name
        assert re.search(message, _error(capsys)), name
        assert not out.exists(), name  # nothing created for a run that failed
    rc = _train(["--input", str(train), str(train), "--output-dir", str(out)], taxonomy)
    assert rc == 2 and "is the same file as" in _error(capsys) and not out.exists()


def test_train_rejects_rows_whose_lang_does_not_fit_the_topic(trained, tmp_path):
    _, taxonomy, _, _, _ = trained
    rows = toy_corpus(10, seed=0)
    extra = [
        {"text": "football goal match", "topic": "en_sport", "lang": "zh"},
        {"text": "football goal match", "topic": "en_sport", "lang": 5},
        {"text": "足球比赛", "topic": "zh_sport", "lang": "zh"},  # fine
    ]
    data = _jsonl(tmp_path / "train.jsonl", rows + extra)
    assert _train(["--input", str(data), "--output-dir", str(tmp_path / "m")], taxonomy) == 0
    rejects = [json.loads(x) for x in (tmp_path / "m" / "rejects.jsonl").read_text().splitlines()]
    assert [r["where"].rsplit(":", 1)[1] for r in rejects] == ["41", "42"]
    assert "'zh' is not the language of topic 'en_sport'" in rejects[0]["reason"]
    assert "`lang` must be a string, got 5" in rejects[1]["reason"]
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["n_rejects"] == 2 and metrics["n_train"] + metrics["n_held_out"] == 41


# ------------------------------------------------------------------------------ label.py
def _broken_models(model, tmp_path):
    def truncated(d):
        data = (d / "classifier.joblib").read_bytes()
        (d / "classifier.joblib").write_bytes(data[: len(data) // 3])

    def set_kind(d):
        card = json.loads((d / "model.json").read_text())
        (d / "model.json").write_text(json.dumps(dict(card, kind="svm")))

    breakers = {
        "truncated joblib": (truncated, r"classifier.joblib: cannot load the classifier"),
        "broken json": (lambda d: (d / "model.json").write_text('{"kind": '), "unreadable"),
        "empty card": (lambda d: (d / "model.json").write_text("{}"), "missing field"),
        "unknown kind": (set_kind, "unknown model kind 'svm'"),
        "no card": (lambda d: (d / "model.json").unlink(), "not a topic model directory"),
    }
    for name, (breaker, message) in breakers.items():
        directory = tmp_path / name.replace(" ", "_")
        shutil.copytree(model, directory)
        breaker(directory)
        yield name, directory, message


def test_label_broken_model_is_an_error_and_the_fixed_rerun_works(trained, tmp_path, capsys):
    root, _, model, _, prefix = trained
    parts_dir = tmp_path / "parts"
    base = ["--data-prefix", str(prefix), "--no-progress", "--parts-dir", str(parts_dir)]
    for name, directory, message in _broken_models(model, tmp_path):
        with pytest.raises(TopicModelError, match=message):
            load_topic_model(directory)
        assert label_tool.main([*base, "--model", str(directory), "--keep-parts"]) == 2, name
        assert re.search(message, _error(capsys)), name
        assert not parts_dir.exists(), name  # no resume state from a run that never started
        # "Fix" the model in place (same path): the rerun must not be refused.
        shutil.rmtree(directory)
        shutil.copytree(model, directory)
        assert label_tool.main([*base, "--model", str(directory)]) == 0, name
        capsys.readouterr()
    assert read_metadata(prefix).column("topic").null_count == 0


def test_label_manifest_without_parts_does_not_block_another_run(trained, tmp_path):
    _, _, model, _, prefix = trained
    parts_dir = tmp_path / "parts"
    PartsDir(parts_dir, {"job": "topic-labelling", "model": "/elsewhere"})  # a failed start
    args = ["--data-prefix", str(prefix), "--model", str(model), "--parts-dir", str(parts_dir)]
    assert label_tool.main([*args, "--no-progress"]) == 0


def test_label_bad_flags_and_metadata_are_errors(trained, tmp_path, capsys):
    _, _, model, _, prefix = trained
    base = ["--data-prefix", str(prefix), "--model", str(model), "--no-progress"]
    for flags, message in (
        (
            ["--shard-index", "5", "--num-shards", "2"],
            "--shard-index 5 must be in [0, --num-shards 2)",
        ),
        (["--num-shards", "0"], "--num-shards must be >= 1"),
        (["--workers", "0"], "--workers (0)"),
        (["--chunk-size", "0"], "--chunk-size (0) must be >= 1"),
    ):
        assert label_tool.main([*base, *flags]) == 2, flags
        assert message in _error(capsys), flags
    copy = tmp_path / "ds"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{prefix}{suffix}", f"{copy}{suffix}")
    for content in (b"", b"PAR1 not really parquet"):
        metadata_path(copy).write_bytes(content)
        assert label_tool.main(["--data-prefix", str(copy), "--model", str(model)]) == 2
        assert "ds.meta.parquet: cannot read the metadata sidecar" in _error(capsys)


# ------------------------------------------------------------------------------ seed_labels.py
def test_seed_labels_bad_values_and_input_are_errors(trained, tmp_path, capsys):
    _, taxonomy, _, train, _ = trained
    base = [
        "--method",
        "lexicon",
        "--taxonomy",
        str(taxonomy),
        "--output",
        str(tmp_path / "s.jsonl"),
    ]
    for flags, message in (
        (["--num-samples", "-3"], "--num-samples must be >= 1, got -3"),
        (["--min-keywords", "0"], "--min-keywords must be >= 1, got 0"),
    ):
        assert seed_tool.main([*base, "--input", str(train), *flags]) == 2
        assert message in _error(capsys)
    gbk = _jsonl(tmp_path / "gbk.jsonl", [{"text": "ok"}], extra='{"text": "足球"}\n'.encode("gbk"))
    assert seed_tool.main([*base, "--input", str(gbk)]) == 2
    assert "gbk.jsonl:2: not valid UTF-8" in _error(capsys)
    assert not (tmp_path / "s.jsonl").exists()


def test_seed_labels_llm_exits_non_zero_when_nothing_is_labelled(trained, tmp_path, capsys):
    _, taxonomy, _, _, _ = trained
    data = _jsonl(tmp_path / "docs.jsonl", [{"text": "football", "lang": "en"}] * 2)
    out = tmp_path / "seeds.jsonl"
    rc = seed_tool.main(
        ["--method", "llm", "--input", str(data), "--output", str(out), "--taxonomy",
         str(taxonomy), "--api-base", "http://127.0.0.1:9/v1", "--model", "m",
         "--max-retries", "0", "--request-timeout", "5"]
    )  # fmt: skip
    assert rc == 1
    captured = capsys.readouterr()
    assert "request_failed" in captured.out and "error: no document was labelled" in captured.err
    aside = (tmp_path / "seeds.jsonl.set_aside.jsonl").read_text().splitlines()
    assert [json.loads(r)["reason"] for r in aside] == ["request_failed"] * 2
    assert not (tmp_path / "seeds.jsonl").exists()  # no empty seeds file that looks finished


def test_bootstrap_refuses_the_same_dataset_twice(trained, tmp_path):
    _, _, _, _, prefix = trained
    with pytest.raises(ValueError, match="names the same dataset"):
        bootstrap_topics([prefix, prefix.parent / "." / prefix.name], tmp_path / "topics")
