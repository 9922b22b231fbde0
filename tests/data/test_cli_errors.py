"""Bad input to the mixture tools (plan.py, update.py, history.py) and the YAML files they read:
a clear error naming the file and line (or the flag), never a traceback or a silent override."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from megatron_syne.data.mixer import TopicMixer
from megatron_syne.data.spec import MixerSpec, SpecError, load_spec

REPO = Path(__file__).resolve().parents[2]
TOPICS = ["web-zh/history", "web-zh/law", "web-zh/science"]
LOSSES = [[1.26, 1.82, 1.54], [1.32, 1.45, 1.60], [1.30, 1.40, 1.62]]
SIZES = ["--seq-length", "32", "--global-batch-size", "4"]

SPEC = {
    "sources": {
        "web-zh": {"path": "web-zh", "split_by_topic": True, "valid_fraction": 0.1},
        "code-en": {"path": "code-en", "on_exhaustion": "repeat"},
    },
    "stages": [
        {"name": "one", "iterations": 80,
         "groups": {"all": {"ratio": 1.0, "sources": {"web-zh": 0.5, "code-en": 0.5}}}},
    ],
    "mixer": {"interval_iterations": 10, "alpha": 1.0, "max_change": 0.05},
}  # fmt: skip


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(
        f"mixture_{name}_cli", REPO / "tools/mixture" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spec_file(tmp_path: Path, corpus: Path, **extra) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "data_root": str(corpus), **extra}, sort_keys=False))
    return path


def _history_lines(names=TOPICS, losses=LOSSES) -> list[str]:
    mixer = TopicMixer(
        MixerSpec(interval_iterations=1), {"web": names}, dict.fromkeys(names, 1 / 3)
    )
    return [
        json.dumps(mixer.observe(dict(zip(names, row)), i * 10, i * 40, i * 1280, "one"))
        for i, row in enumerate(losses)
    ]


def _update(spec: Path, results: Path, output: Path, *extra: str) -> int:
    return _tool("update").main(
        [str(spec), "--results", str(results), "--output", str(output), *extra]
    )


# ------------------------------------------------------------------------ duplicated YAML keys


def test_duplicate_source_in_the_spec_is_an_error_naming_file_line_and_key(
    corpus, tmp_path, capsys
):
    text = (REPO / "examples/quickstart/syne_demo.yaml").read_text()
    assert text.count("\n  code-en:\n") == 1
    text = text.replace(
        "\n  code-en:\n",
        "\n  code-en:\n    path: corpus_text_document\n    select: {source: book-en}\n  code-en:\n",
    )
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    first = text.splitlines().index("  code-en:") + 1
    second = first + 3
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert str(path) in message and f"line {second}" in message and "'code-en'" in message
    assert f"first given on line {first}" in message and "remove or rename" in message
    assert _tool("plan").main([str(path), *SIZES, "--png", str(tmp_path / "p.png")]) == 1
    assert f"line {second}: duplicate key 'code-en'" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_duplicate_nested_key_and_merge_keys():
    from megatron_syne.utils.yaml_strict import DuplicateKeyError, safe_load_strict

    with pytest.raises(DuplicateKeyError, match=r"line 4: duplicate key 'ratio' \(first given"):
        safe_load_strict("stages:\n  - groups:\n      ratio: 0.2\n      ratio: 0.8\n")
    # A merge key (<<) may be overridden: that is what it is for.
    assert safe_load_strict("a: &a {x: 1}\nb: {<<: *a, x: 2}\n") == {"a": {"x": 1}, "b": {"x": 2}}


def test_duplicate_key_in_the_taxonomy(tmp_path):
    from megatron_syne.topics.taxonomy import TaxonomyError, load_taxonomy

    path = tmp_path / "topics.yaml"
    path.write_text(
        "name: t\nversion: 1\ntopics:\n  - id: a\n    lang: en\n    lang: zh\n"
        "    name: A\n    description: d\n"
    )
    with pytest.raises(TaxonomyError, match=rf"{path}: line 6: duplicate key 'lang'"):
        load_taxonomy(path)


def test_write_updated_spec_refuses_duplicate_keys(corpus, tmp_path):
    from megatron_syne.data.mixer import write_updated_spec

    path = tmp_path / "spec.yaml"
    path.write_text(f"data_root: {corpus}\nseed: 1\nseed: 2\n")
    output = tmp_path / "next.yaml"
    with pytest.raises(SpecError, match=r"line 3: duplicate key 'seed'"):
        write_updated_spec(path, dict.fromkeys(TOPICS, 1 / 3), output)
    assert not output.exists()


# ------------------------------------------------------------------------------- update.py


@pytest.mark.parametrize(
    "names, problem",
    [
        (["web-zh/history", "web-zh/law", "web-zh/science", "web-zh/zh_cooking"],
         "unknown component(s) ['web-zh/zh_cooking']"),
        (["web-zh/zh_cooking"], "unknown component(s) ['web-zh/zh_cooking']"),
        (["web-zh/history", "web-zh/law"], "no value for component(s) ['web-zh/science']"),
    ],
)  # fmt: skip
def test_update_refuses_unknown_or_missing_components(corpus, tmp_path, capsys, names, problem):
    spec = _spec_file(tmp_path, corpus)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({k: dict.fromkeys(names, 1.5) for k in ("previous", "current")}
                                  | {"weights": dict.fromkeys(names, 1.0)}))  # fmt: skip
    output = tmp_path / "next.yaml"
    assert _update(spec, results, output) == 1
    err = capsys.readouterr().err
    assert f"update.py: error: {results}: " in err and problem in err
    assert "adjusts ['web-zh/history', 'web-zh/law', 'web-zh/science']" in err
    assert not output.exists()


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_update_refuses_non_positive_or_non_finite_losses_in_a_json(
    corpus, tmp_path, capsys, value
):
    spec = _spec_file(tmp_path, corpus)
    previous = dict(zip(TOPICS, LOSSES[0]))
    previous["web-zh/law"] = value
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"weights": dict.fromkeys(TOPICS, 1 / 3), "previous": previous,
                                   "current": dict(zip(TOPICS, LOSSES[1]))}))  # fmt: skip
    output = tmp_path / "next.yaml"
    assert _update(spec, results, output) == 1
    err = capsys.readouterr().err
    assert f"{results}: previous.web-zh/law: loss {value!r} is not a finite positive" in err
    assert "delta" not in capsys.readouterr().out
    assert not output.exists()


def test_update_names_the_results_line_of_a_nan_loss(corpus, tmp_path, capsys):
    spec = _spec_file(tmp_path, corpus)
    losses = [row[:] for row in LOSSES]
    losses[2][1] = float("nan")
    history = tmp_path / "mixer_history.jsonl"
    history.write_text("\n".join(_history_lines(losses=losses)) + "\n")
    output = tmp_path / "next.yaml"
    assert _update(spec, history, output) == 1
    err = capsys.readouterr().err
    assert f"{history}: line 3: losses.web-zh/law: loss nan" in err
    assert str(output) not in err and not output.exists()


def _link_corpus(corpus: Path, into: Path) -> Path:
    into.mkdir(parents=True)
    for file in corpus.iterdir():
        if file.is_file():
            (into / file.name).symlink_to(file)
    return into


@pytest.mark.parametrize("layout", ["implicit", "relative", "flag"])
def test_update_output_in_another_directory_still_finds_the_data(corpus, tmp_path, capsys, layout):
    extra = ()
    if layout == "implicit":  # no data_root: relative paths live beside the spec
        spec_dir = _link_corpus(corpus, tmp_path / "data")
        data = dict(SPEC)
    elif layout == "flag":  # the data elsewhere, named by --data-root only
        _link_corpus(corpus, tmp_path / "data")
        spec_dir = tmp_path / "specs"
        spec_dir.mkdir()
        data = dict(SPEC)
        extra = ("--data-root", str(tmp_path / "data"))
    else:  # data_root relative to the spec
        _link_corpus(corpus, tmp_path / "data")
        spec_dir = tmp_path / "round1"
        spec_dir.mkdir()
        data = {"data_root": "../data", **SPEC}
    spec = spec_dir / "spec.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    history = tmp_path / "mixer_history.jsonl"
    history.write_text("\n".join(_history_lines()) + "\n")
    output = tmp_path / "rounds" / "two" / "next.yaml"
    assert _update(spec, history, output, *extra) == 0
    written = yaml.safe_load(output.read_text())
    assert written["data_root"] == "../../data"
    assert written["sources"]["web-zh"]["path"] == "web-zh"
    capsys.readouterr()
    assert _tool("plan").main([str(output), *SIZES, "--png", str(tmp_path / "p.png")]) == 0
    assert "web-zh/law" in capsys.readouterr().out


def test_update_output_beside_the_spec_keeps_it_as_it_was(corpus, tmp_path):
    spec_dir = _link_corpus(corpus, tmp_path / "data")
    spec = spec_dir / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    history = tmp_path / "mixer_history.jsonl"
    history.write_text("\n".join(_history_lines()) + "\n")
    assert _update(spec, history, spec_dir / "next.yaml") == 0
    assert "data_root" not in yaml.safe_load((spec_dir / "next.yaml").read_text())


# --------------------------------------------------------------------------------- plan.py


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seq-length", "0", "--global-batch-size", "4"], "argument --seq-length: must be > 0"),
        (["--seq-length", "32", "--global-batch-size", "-1"],
         "argument --global-batch-size: must be > 0, got -1"),
        ([*SIZES, "--tensorboard-dir", "MISSING"], "argument --tensorboard-dir: "),
    ],
)  # fmt: skip
def test_plan_names_the_bad_flag(corpus, tmp_path, capsys, flags, message):
    spec = _spec_file(tmp_path, corpus)
    flags = [str(tmp_path / "missing-tb") if f == "MISSING" else f for f in flags]
    with pytest.raises(SystemExit) as exit_:
        _tool("plan").main([str(spec), *flags, "--png", str(tmp_path / "p.png")])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_plan_tensorboard_dir_without_events(corpus, tmp_path, capsys):
    spec = _spec_file(tmp_path, corpus)
    (tmp_path / "tb").mkdir()
    args = [str(spec), *SIZES, "--png", str(tmp_path / "p.png"), "--tensorboard-dir"]
    assert _tool("plan").main([*args, str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err
    assert f"argument --tensorboard-dir: {tmp_path / 'tb'}: no TensorBoard event files" in err
    assert not (tmp_path / "p.png").exists()


def test_mixture_plan_refuses_non_positive_sizes(corpus):
    from megatron_syne.data.components import resolve_spec
    from megatron_syne.data.schedule import MixturePlan
    from megatron_syne.data.spec import parse_spec

    spec = parse_spec({**SPEC, "data_root": str(corpus)})
    resolutions = resolve_spec(spec, corpus)
    with pytest.raises(ValueError, match="seq_length must be a positive whole number, got 0"):
        MixturePlan(spec, resolutions, 0, 4)
    with pytest.raises(ValueError, match="global_batch_size must be a positive whole number"):
        MixturePlan(spec, resolutions, 32, -1)


# ------------------------------------------------------------- mixer histories (history, update)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("[1,2]", "line 2: expected a JSON object (one measurement), got an array"),
        ('{"iteration": 0}', "line 2: missing key 'consumed_tokens'"),
        ('{"iteration": 1', "line 2: not valid JSON at column 16"),  # corrupt, not the last line
        ("\x00garbage", "line 2: not valid JSON at column 1"),
    ],
)
@pytest.mark.parametrize("tool", ["history", "update"])
def test_bad_history_line_names_file_and_line(corpus, tmp_path, capsys, tool, bad, message):
    lines = _history_lines()
    history = tmp_path / "mixer_history.jsonl"
    history.write_text("\n".join([lines[0], bad, *lines[1:]]) + "\n")
    output = tmp_path / "out.png" if tool == "history" else tmp_path / "next.yaml"
    if tool == "history":
        code = _tool("history").main([str(history), "--png", str(output)])
    else:
        code = _update(_spec_file(tmp_path, corpus), history, output)
    assert code == 1
    assert f"{tool}.py: error: {history}: {message}" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize("tool", ["history", "update"])
def test_torn_last_line_is_skipped_with_a_warning(corpus, tmp_path, capsys, tool):
    lines = _history_lines()
    history = tmp_path / "mixer_history.jsonl"
    history.write_text("\n".join(lines) + "\n" + lines[0][:40])  # killed mid-write
    output = tmp_path / "out.png" if tool == "history" else tmp_path / "next.yaml"
    if tool == "history":
        code = _tool("history").main([str(history), "--png", str(output)])
    else:
        code = _update(_spec_file(tmp_path, corpus), history, output)
    captured = capsys.readouterr()
    assert code == 0 and output.exists()
    assert (
        f"{tool}.py: warning: {history}: line 4: skipped the incomplete last line" in captured.err
    )
    if tool == "history":
        assert "3 measurements, 2 updates, 3 topics" in captured.out


def test_history_shows_whole_component_names(tmp_path, capsys):
    names = ["news-cn/zh_economics_business", "news-cn/zh_history", "news-cn/other"]
    history = tmp_path / "mixer_history.jsonl"
    history.write_text("\n".join(_history_lines(names)) + "\n")
    assert _tool("history").main([str(history), "--png", str(tmp_path / "h.png")]) == 0
    header, first = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[2:] == names
    assert len(header) == len(first)  # cells line up with their headers
