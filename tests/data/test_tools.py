"""tools/mixture/plan.py and update.py, run in-process on the test corpus."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(
        f"mixture_{name}", REPO / "tools/mixture" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SPEC = {
    "sources": {
        "web-zh": {"path": "web-zh", "split_by_topic": True, "valid_fraction": 0.1,
                   "curriculum": {"order": "ppl_ascending", "buckets": 3}},
        "code-en": {"path": "code-en", "on_exhaustion": "repeat"},
    },
    "stages": [
        {"name": "one", "iterations": 80,
         "groups": {"all": {"ratio": 1.0, "sources": {"web-zh": 0.5, "code-en": 0.5}}}},
    ],
    "mixer": {"interval_iterations": 10, "alpha": 1.0, "max_change": 0.05},
}  # fmt: skip


def test_plan_prints_tokens_epochs_and_draws(corpus, tmp_path, capsys):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({**SPEC, "data_root": str(corpus)}, sort_keys=False))
    png = tmp_path / "plan.png"
    code = _tool("plan").main(
        [str(spec_path), "--seq-length", "32", "--global-batch-size", "4", "--png", str(png)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "stage one: 10.2K tokens, 80 iterations (mixer active)" in out
    assert "web-zh/law" in out and "1 documents without a PPL score" in out
    # code-en: 30 documents (~110 samples of 32 tokens) < 80 x 4 x 0.5 = 160 samples: repeats.
    assert "code-en" in out and "WARNING: repeats" in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_plan_fails_on_a_ppl_curriculum_without_scores(corpus, tmp_path, capsys):
    bad = {**SPEC, "data_root": str(corpus)}
    bad["sources"] = {
        **SPEC["sources"],
        "code-en": {"path": "code-en", "curriculum": "ppl_ascending"},
    }
    spec_path = tmp_path / "bad.yaml"
    spec_path.write_text(yaml.safe_dump(bad, sort_keys=False))
    code = _tool("plan").main([str(spec_path), "--seq-length", "32", "--global-batch-size", "4"])
    assert code == 1
    assert "needs the 'ppl' metadata column" in capsys.readouterr().err


def test_update_writes_next_round_weights(corpus, tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({**SPEC, "data_root": str(corpus)}, sort_keys=False))
    names = ["web-zh/history", "web-zh/law", "web-zh/science"]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({
        "weights": dict.fromkeys(names, 1 / 3),
        "previous": dict(zip(names, [1.26, 1.82, 1.54])),
        "current": dict(zip(names, [1.32, 1.45, 1.60])),
    }))  # fmt: skip
    output = tmp_path / "next.yaml"
    assert (
        _tool("update").main([str(spec_path), "--results", str(results), "--output", str(output)])
        == 0
    )
    weights = yaml.safe_load(output.read_text())["sources"]["web-zh"]["topic_weights"]
    assert abs(sum(weights.values()) - 1) < 1e-9
    assert weights["history"] > 1 / 3 and weights["science"] > 1 / 3
    assert abs(weights["law"] - (1 / 3 - 0.05)) < 1e-6  # the big improver hits max_change


def test_history_plots_losses_and_weights(tmp_path, capsys):
    from megatron_syne.data.mixer import TopicMixer
    from megatron_syne.data.spec import MixerSpec

    names = ["web/a", "web/b", "web/c"]
    mixer = TopicMixer(
        MixerSpec(interval_iterations=1), {"web": names}, dict.fromkeys(names, 1 / 3)
    )
    history = tmp_path / "mixer_history.jsonl"
    for step, losses in enumerate([[1.26, 1.82, 1.54], [1.32, 1.45, 1.60], [1.30, 1.40, 1.62]]):
        record = mixer.observe(dict(zip(names, losses)), step * 10, step * 40, step * 1280, "s")
        with open(history, "a") as f:
            f.write(json.dumps(record) + "\n")
    png = tmp_path / "history.png"
    assert _tool("history").main([str(history), "--png", str(png)]) == 0
    assert "3 measurements, 2 updates, 3 topics" in capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_training_length_defaults_to_the_specs_stages(corpus, tmp_path):
    """pretrain_llama3_syne.py --data-config without --train-iters trains the spec's stages."""
    from megatron_syne.training.arguments import ArgumentError, parse_args

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({**SPEC, "data_root": str(corpus)}, sort_keys=False))
    flags = ["--device", "cpu", "--model", "tiny", "--seq-length", "32", "--global-batch-size",
             "4", "--data-config", str(spec_path)]  # fmt: skip
    assert parse_args(flags, world_size=1).train_iters == 80
    assert parse_args([*flags, "--train-iters", "50"], world_size=1).train_iters == 50
    bad = yaml.safe_load(spec_path.read_text())
    bad["stages"][0]["groups"]["all"]["sources"]["web-zh"] = 0.4
    spec_path.write_text(yaml.safe_dump(bad, sort_keys=False))
    with pytest.raises(ArgumentError, match="ratios sum to 0.9"):
        parse_args(flags, world_size=1)
