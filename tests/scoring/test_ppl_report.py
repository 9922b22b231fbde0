"""ppl_report: percentiles and curriculum boundaries per source/language from the ppl column."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_syne.data.metadata import add_columns
from megatron_syne.scoring.report import ppl_report
from tests.topics._data import build_dataset


def test_report_boundaries_and_outputs(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    prefix = build_dataset(
        tmp_path / "ds",
        [[5, 6, 7]] * n,
        langs=["en" if i % 2 else "zh" for i in range(n)],
        sources=["web"] * n,
    )
    ppl = np.exp(rng.normal(2.0, 0.5, n)).astype(np.float32)
    status = ["ok"] * n
    ppl[:10], status[:10] = np.nan, ["too_short"] * 10
    add_columns(
        prefix,
        {
            "ppl": [None if s != "ok" else float(p) for p, s in zip(ppl, status)],
            "ppl_status": status,
        },
    )
    groups = ppl_report([prefix], tmp_path / "report", num_buckets=4)
    assert [g.key for g in groups] == ["all", "web/en", "web/zh"]
    everything = groups[0]
    valid = ppl[10:].astype(np.float64)
    assert everything.n_scored == n - 10 and everything.status_counts == {
        "ok": 390,
        "too_short": 10,
    }
    assert everything.ccnet_boundaries == pytest.approx(np.percentile(valid, [30, 60]).tolist())
    assert everything.quantile_boundaries == pytest.approx(
        np.quantile(valid, [0.25, 0.5, 0.75]).tolist()
    )
    zh = groups[2]
    zh_valid = ppl[10:][np.arange(10, n)[:] % 2 == 0]
    assert zh.percentiles["p50"] == pytest.approx(float(np.median(zh_valid)))
    report = json.loads((tmp_path / "report" / "ppl_report.json").read_text())
    assert report["groups"][1]["group"] == "web/en"
    assert (tmp_path / "report" / "ppl_histogram.png").stat().st_size > 5000
    assert "CCNet head" in (tmp_path / "report" / "ppl_report.md").read_text()


def test_report_needs_scored_dataset(tmp_path):
    prefix = build_dataset(tmp_path / "ds", [[5, 6]] * 3)
    with pytest.raises(ValueError, match="score_ppl.py"):
        ppl_report([prefix], tmp_path / "r")
