"""Online mixture inside the training loop: 2 processes (DP=2, gloo), killed and resumed.

A run interrupted mid-phase and resumed from its checkpoint must train on exactly the samples,
and reach exactly the losses, of an uninterrupted run; the mixer must actually move weights, and
Stage I -> Stage II must happen inside the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.helpers import run_torchrun

SPEC = {
    "seed": 7,
    "sources": {
        "web-zh": {
            "path": "web-zh",
            "split_by_topic": True,
            "valid_fraction": 0.1,
            "curriculum": {"order": "ppl_ascending", "buckets": [0.3, 0.6]},
        },
        "book-zh": {"path": "book-zh"},
        "web-en": {"path": "web-en", "split_by_topic": True, "valid_fraction": 0.1},
        "code-en": {"path": "code-en", "on_exhaustion": "repeat"},
    },
    "stages": [
        {
            "name": "bilingual",
            "iterations": 6,
            "groups": {
                "zh": {"ratio": 0.4, "sources": {"web-zh": 0.7, "book-zh": 0.3}},
                "en": {"ratio": 0.6, "sources": {"web-en": 1.0}},
            },
        },
        {
            "name": "synthetic",
            "iterations": 4,
            "groups": {
                "zh": {"ratio": 0.2, "sources": {"web-zh": 1.0}},
                "en": {"ratio": 0.6, "sources": {"web-en": 1.0}},
                "synthetic": {"ratio": 0.2, "sources": {"code-en": 1.0}},
            },
        },
    ],
    # 256 tokens = 2 iterations of 4 x 32: five phases, a measurement before each.
    "mixer": {"interval_tokens": 256, "alpha": 20.0, "max_change": 0.1, "eval_samples": 4},
}


def _flags(spec: Path, cache: Path, save: Path) -> list[str]:
    return [
        "--device", "cpu", "--model", "tiny", "--vocab-size", "4096", "--num-layers", "2",
        "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "4",
        "--train-iters", "10", "--lr", "1e-3", "--log-interval", "1",
        "--data-config", str(spec), "--data-cache-path", str(cache), "--save", str(save),
    ]  # fmt: skip


def _records(path: Path) -> dict[int, dict]:
    lines = path.read_text().splitlines()
    return {r["iteration"]: r for r in map(json.loads, lines)}


def test_online_mixture_resume_is_exact(corpus, tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({**SPEC, "data_root": str(corpus)}, sort_keys=False))
    cache = tmp_path / "cache"
    full, part = tmp_path / "full", tmp_path / "part"
    runs = [
        {"record": str(tmp_path / "full.jsonl"), "argv": _flags(spec_path, cache, full)},
        # "Killed" at iteration 5: mid-phase (phases start at 0, 2, 4, 6, 8), after a mixer update.
        {
            "record": str(tmp_path / "part.jsonl"),
            "argv": [*_flags(spec_path, cache, part), "--exit-interval", "5"],
        },
        {
            "record": str(tmp_path / "resumed.jsonl"),
            "argv": [*_flags(spec_path, cache, part), "--load", str(part)],
        },
    ]
    runs_path = tmp_path / "runs.json"
    runs_path.write_text(json.dumps(runs))
    run_torchrun(["tests/data/train_driver.py", str(runs_path)], nproc=2, timeout=600)

    uninterrupted = _records(tmp_path / "full.jsonl")
    interrupted = {**_records(tmp_path / "part.jsonl"), **_records(tmp_path / "resumed.jsonl")}
    assert sorted(uninterrupted) == list(range(1, 11))
    assert sorted(_records(tmp_path / "resumed.jsonl")) == list(range(6, 11))
    for iteration, record in uninterrupted.items():
        assert interrupted[iteration]["samples"] == record["samples"], iteration
        assert interrupted[iteration]["loss"] == record["loss"], iteration

    history_files = list(full.glob("mixer_history-*.jsonl"))
    history = [json.loads(line) for line in history_files[0].read_text().splitlines()]
    assert [r["iteration"] for r in history] == [0, 2, 4, 6, 8]
    assert [r["updated"] for r in history] == [False, True, True, True, True]
    assert history[-1]["weights_after"] != history[0]["weights_after"]
    resumed_history = [
        json.loads(line)
        for line in next(part.glob("mixer_history-*.jsonl")).read_text().splitlines()
    ]
    assert [r["weights_after"] for r in resumed_history] == [r["weights_after"] for r in history]

    # Stage II brings code-en (component id 6, the last) only from iteration 7 on.
    ledger = [
        json.loads(line) for line in next(full.glob("data_ledger-*.jsonl")).read_text().splitlines()
    ]
    assert [p["stage"] for p in ledger] == ["bilingual"] * 3 + ["synthetic"] * 2
    code_steps = [i for i, r in uninterrupted.items() if any(c == 6 for c, _ in r["samples"])]
    assert code_steps and min(code_steps) >= 7
