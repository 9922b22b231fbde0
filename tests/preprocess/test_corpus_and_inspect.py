"""The demo corpus is deterministic and bilingual; inspect_data reports what a dataset holds."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

from megatron_syne.preprocess.corpus import CorpusConfig, build_demo_corpus
from megatron_syne.preprocess.pipeline import PreprocessConfig, run_preprocess
from tests.helpers import REPO_ROOT, cpu_env


def test_sample_corpus_is_deterministic(tmp_path):
    first = build_demo_corpus(CorpusConfig(str(tmp_path / "a.jsonl"), target_mb=0.3, seed=7))
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools/preprocess/sample_corpus.py")]
        + ["--output", str(tmp_path / "b.jsonl"), "--target-mb", "0.3", "--seed", "7"],
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    sources = Counter(r["source"] for r in records)
    assert set(sources) == {"news-cn", "forum-cn", "book-en", "encyclopedia-en", "code-en"}
    assert sources == Counter(first.documents)
    assert {r["lang"] for r in records if r["source"].endswith("-cn")} == {"zh"}
    assert {r["lang"] for r in records if r["source"].endswith("-en")} == {"en"}
    # Byte budgets follow the shares (each source stops right after crossing its budget).
    total = sum(len(r["text"].encode()) for r in records)
    assert 0.3e6 <= total < 0.3e6 + 5 * 20_000
    news = [r["text"] for r in records if r["source"] == "news-cn"]
    assert all("/" not in t.split("\n")[0][-3:] for t in news)  # POS tags stripped
    assert not any("/n " in t or "/v " in t for t in news)
    # Sources are shuffled together: any prefix of the file mixes them.
    assert len({r["source"] for r in records[:40]}) >= 3


def test_inspect_data_reports_counts_and_decodes(tmp_path):
    build_demo_corpus(CorpusConfig(str(tmp_path / "c.jsonl"), target_mb=0.05, seed=1))
    summary = run_preprocess(
        PreprocessConfig(
            input=(str(tmp_path / "c.jsonl"),),
            output_prefix=str(tmp_path / "demo"),
            append_eod=True,
            progress=False,
        )
    )
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools/preprocess/inspect_data.py")]
        + ["--data-path", f"{tmp_path}/demo_text_document", "--samples", "2"]
        + ["--plot", str(tmp_path / "lengths.png")],
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = summary.stats.tokens["text"]
    assert f"{summary.stats.documents:,} documents, {tokens:,} tokens" in proc.stdout
    for source in ("news-cn", "forum-cn", "book-en", "encyclopedia-en", "code-en"):
        assert source in proc.stdout
    assert proc.stdout.count("--- document") == 2
    assert "<|end_of_text|>" in proc.stdout or "[...]" in proc.stdout
    assert (tmp_path / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
