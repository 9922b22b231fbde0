"""Science QA end to end over a real socket: filters' reject reasons, redo of failed requests,
kill-and-resume without duplicates, and the corpus conversion."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_syne.synth.client import ChatClient, ClientConfig
from megatron_syne.synth.corpus import to_corpus
from megatron_syne.synth.pipeline import GenerationRun, RunConfig
from megatron_syne.synth.prompts import KeywordDisciplineClassifier
from megatron_syne.synth.science_qa import ScienceConfig, parse_science, read_seeds, science_items
from megatron_syne.synth.testing_server import scripted_server
from tests.helpers import REPO_ROOT, cpu_env


def _real_paragraphs(n: int) -> list[str]:
    """Distinct English paragraphs of real prose (the Python reference manual)."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        text = " ".join(topics[name].split())
        if len(text) > 1500:
            out.append(text[:1400])
        if len(out) == n:
            return out
    raise AssertionError("not enough paragraphs")


def _write_seeds(path: Path, seeds: list[dict]) -> None:
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in seeds))


def _run_science(base: str, seeds: Path, out: Path, decontaminate=()) -> dict:
    config = ScienceConfig(min_seed_chars=50)

    async def go():
        client = ChatClient(
            ClientConfig([base], "scripted", max_retries=1, backoff_base=0.01, request_timeout=5)
        )
        try:
            run = GenerationRun(
                RunConfig(
                    out=out, workers=4, progress=False, decontamination_files=list(decontaminate)
                ),
                client,
                "science_qa",
                parse_science,
            )
            items = science_items(
                read_seeds(seeds, KeywordDisciplineClassifier(), config), run, config
            )
            return await run.run(items)
        finally:
            await client.aclose()

    return asyncio.run(go())


ZH = (
    "化学反应速率受温度、浓度和催化剂的影响。根据阿伦尼乌斯方程，温度升高时许多反应的速率明显增加。"
    "催化剂通过提供活化能更低的反应途径来加快反应，而自身在反应前后的质量和化学性质不变。"
)


def test_every_reject_reason_and_redo_of_failed_requests(tmp_path):
    paras = _real_paragraphs(4)
    seeds = [
        {"id": "good-en", "text": paras[0], "discipline": "computer science"},
        {"id": "good-zh", "text": ZH},
        {"id": "dup-of-good-en", "text": paras[0], "discipline": "computer science"},
        {"id": "trunc", "text": "trunc-marker " + paras[1]},
        {"id": "malformed", "text": "malformed-marker " + paras[2]},
        {"id": "wrong-lang", "text": "英文回答标记" + ZH[10:]},
        {"id": "server-down", "text": "fail-marker " + paras[3]},
        {
            "id": "contaminated",
            "text": "The quick brown fox jumps over the lazy dog near the river bank today " + ZH,
        },
        {"text": "too short"},
        {"id": "bad-discipline", "text": paras[1], "discipline": "poetry"},
        {"id": "good-zh", "text": ZH + "再说一遍。"},
    ]
    seed_file = tmp_path / "seeds.jsonl"
    _write_seeds(seed_file, seeds)
    with open(seed_file, "a") as f:
        f.write("{not json\n")
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text(
        json.dumps(
            {"question": "the quick brown fox jumps over the lazy dog near the river bank today"}
        )
        + "\n"
    )
    english_answer = "[Problem]\n" + paras[1][:300] + "\n[Solution]\n" + paras[2][:300]
    script = {
        "rules": [
            {
                "match": "trunc-marker",
                "actions": [{"content": "[Problem]\nIncomplete", "finish_reason": "length"}],
            },
            {
                "match": "malformed-marker",
                "actions": [{"content": "I cannot answer that in the requested format."}],
            },
            {"match": "英文回答标记", "actions": [{"content": english_answer}]},
            {"match": "fail-marker", "actions": [{"status": 503}], "repeat_last": True},
        ]
    }
    out = tmp_path / "sci.jsonl"
    with scripted_server(script) as base:
        summary = _run_science(base, seed_file, out, [evalset])
    assert summary["accepted"] == 2, summary
    assert summary["rejected_by_reason"] == {
        "bad_input": 4,
        "near_duplicate": 1,
        "truncated": 1,
        "malformed": 1,
        "wrong_language": 1,
        "contaminated": 1,
    }
    assert summary["request_failed"] == 1 and summary["request_failed_by_reason"] == {"http_503": 1}
    records = [json.loads(x) for x in out.read_text().splitlines()]
    by_seed = {r["seed_id"]: r for r in records}
    # the two copies race through the workers: whichever finishes first is kept
    en_kept = "good-en" if "good-en" in by_seed else "dup-of-good-en"
    en_dropped = ({"good-en", "dup-of-good-en"} - {en_kept}).pop()
    assert set(by_seed) == {en_kept, "good-zh"}
    assert by_seed["good-zh"]["lang"] == "zh" and by_seed["good-zh"]["discipline"] == "chemistry"
    assert by_seed["good-zh"]["discipline_source"] == "classifier"
    assert by_seed[en_kept]["discipline_source"] == "seed"
    for r in records:
        assert r["problem"] and r["solution"] and r["generator"] == "scripted"
        assert r["prompt_version"].startswith("science-v1-")
    rejects = [json.loads(x) for x in (tmp_path / "sci.rejects.jsonl").read_text().splitlines()]
    reasons = {r.get("seed_id", r["detail"][:40]): r["reason"] for r in rejects}
    assert reasons["trunc"] == "truncated" and reasons["malformed"] == "malformed"
    assert reasons["wrong-lang"] == "wrong_language" and reasons[en_dropped] == "near_duplicate"
    assert any("seeds.jsonl:12" in r["detail"] and "not valid JSON" in r["detail"] for r in rejects)
    assert any("poetry" in r["detail"] for r in rejects)
    assert any("duplicate seed id 'good-zh' (first on line 2)" in r["detail"] for r in rejects)
    errors = (tmp_path / "sci.errors.jsonl").read_text().splitlines()
    assert len(errors) == 1 and json.loads(errors[0])["seed_id"] == "server-down"
    assert (tmp_path / "sci.summary.json").exists() and (tmp_path / "sci.summary.png").exists()

    # Second run, server healthy: only the failed request is redone; nothing is duplicated.
    with scripted_server({}) as base:
        again = _run_science(base, seed_file, out, [evalset])
    assert again["attempted"] == 1 and again["accepted"] == 1 and again["rejected"] == 0
    assert again["skipped_done"] == 7
    keys = [json.loads(x)["key"] for x in out.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 3

    corpus = tmp_path / "corpus.jsonl"
    stats = to_corpus([out, out], corpus)
    docs = [json.loads(x) for x in corpus.read_text().splitlines()]
    assert stats.written == 3 and stats.skipped["duplicate_key"] == 3
    assert {d["source"] for d in docs} == {"synthesis"}
    assert {d["lang"] for d in docs} == {"en", "zh"}
    assert all(d["text"].count("\n\n") >= 1 and d["discipline"] for d in docs)


def test_kill_and_resume_has_no_duplicates(tmp_path):
    n = 24
    seeds = [{"id": f"seed-{i:02d}", "text": t} for i, t in enumerate(_real_paragraphs(n))]
    seed_file = tmp_path / "seeds.jsonl"
    _write_seeds(seed_file, seeds)
    out = tmp_path / "sci.jsonl"
    with scripted_server({"latency": 0.25}) as base:
        cmd = [
            sys.executable,
            str(REPO_ROOT / "tools/synth/science_qa.py"),
            "--seeds",
            str(seed_file),
            "--api-base",
            base,
            "--model",
            "scripted",
            "--out",
            str(out),
            "--max-concurrency",
            "2",
            "--no-progress",
        ]
        proc = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if out.exists() and out.read_text().count("\n") >= 6:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        done_before = out.read_text().count("\n")
        assert 6 <= done_before < n
        # A kill in the middle of a write leaves a torn last line: simulate the worst case.
        with open(out, "a") as f:
            f.write('{"key": "torn", "seed_id": "seed-')
        proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "sci.summary.json").read_text())
    assert summary["skipped_done"] == done_before
    assert summary["accepted"] == n - done_before
    assert summary["torn_tail_bytes_repaired"] > 0
    assert "repaired a torn last line" in proc.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["seed_id"] for r in records) == [s["id"] for s in seeds]
    assert len({r["key"] for r in records}) == n


def test_an_internal_error_on_one_item_is_logged_and_redone_not_fatal(tmp_path):
    paras = _real_paragraphs(3)
    seed_file = tmp_path / "seeds.jsonl"
    _write_seeds(seed_file, [{"id": f"s{i}", "text": t} for i, t in enumerate(paras)])
    config = ScienceConfig()

    async def flaky_verify(item, record):
        if item.seed_id == "s1":
            raise OSError("disk full")
        return {}

    async def go(base, verify):
        client = ChatClient(ClientConfig([base], "scripted"))
        try:
            run = GenerationRun(
                RunConfig(out=tmp_path / "o.jsonl", workers=1, progress=False),
                client,
                "science_qa",
                parse_science,
                verify,
            )
            clf = KeywordDisciplineClassifier()
            return await run.run(science_items(read_seeds(seed_file, clf, config), run, config))
        finally:
            await client.aclose()

    with scripted_server({}) as base:
        first = asyncio.run(go(base, flaky_verify))
        second = asyncio.run(go(base, None))
    assert first["accepted"] == 2 and first["request_failed_by_reason"] == {"internal_error": 1}
    assert "disk full" in (tmp_path / "o.errors.jsonl").read_text()
    assert second["attempted"] == 1 and second["accepted"] == 1 and second["skipped_done"] == 2


def test_to_corpus_rejects_each_unusable_line_with_its_reason(tmp_path):
    good = {"key": "k1", "problem": "P?", "solution": "S.", "lang": "en", "discipline": "physics"}
    lines = [
        json.dumps(good),
        json.dumps(["not", "an", "object"]),
        json.dumps({**good, "key": "k2", "problem": 42}),
        json.dumps({**good, "key": ["k3"]}),
        json.dumps({**good, "key": "k4", "discipline": {"x": 1}}),
        "[" * 5000 + "]" * 5000,
        json.dumps({**good, "key": "k5", "solution": " \n "}),
        "{not json",
    ]
    items = tmp_path / "items.jsonl"
    items.write_bytes(
        ("\n".join(lines) + "\n").encode()
        + b'{"key": "k7", "problem": "caf\xe9"}\n'  # not UTF-8
        + json.dumps({**good, "key": "k6"}).encode()  # torn tail
    )
    stats = to_corpus([items], tmp_path / "corpus.jsonl")
    assert stats.written == 1
    rejects = [json.loads(x) for x in (tmp_path / "corpus.rejects.jsonl").read_text().splitlines()]
    assert [(r["where"].rsplit(":", 1)[1], r["reason"]) for r in rejects] == [
        ("2", "not_a_json_object"),
        ("3", "non_string_problem"),
        ("4", "non_string_key"),
        ("5", "non_string_discipline"),
        ("6", "invalid_json"),
        ("7", "missing_solution"),
        ("8", "invalid_json"),
        ("9", "invalid_utf8"),
        ("10", "torn_line"),
    ]
    assert sum(stats.skipped.values()) == len(rejects)
    # The output may never overwrite an input or the rejects file.
    with pytest.raises(ValueError, match="would be overwritten"):
        to_corpus([items], items)
    with pytest.raises(ValueError, match="is the --output file"):
        to_corpus([items], tmp_path / "c.jsonl", rejects=tmp_path / "c.jsonl")
