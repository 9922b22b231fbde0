"""PPL tools on bad input: a clear ``error: ...`` and exit 2, never a traceback; no resume state
from a run that could not start; report outputs written all or nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from megatron_syne.data.metadata import add_columns, read_metadata, write_metadata
from megatron_syne.scoring.parts import PartsDir, PartsError
from megatron_syne.scoring.ppl import PPLConfig, score_dataset
from megatron_syne.scoring.report import OUTPUT_FILES, ppl_report
from tests.helpers import REPO_ROOT, cpu_env
from tests.scoring._models import build_token_dataset, random_documents, save_tiny_llama
from tests.topics._data import build_dataset, load_tool

report_tool = load_tool("ppl/ppl_report.py")


def test_a_manifest_without_finished_parts_is_replaced(tmp_path):
    PartsDir(tmp_path / "parts", {"model": "a"})
    parts = PartsDir(tmp_path / "parts", {"model": "b"})  # nothing finished under "a"
    assert json.loads((tmp_path / "parts" / "manifest.json").read_text()) == {"model": "b"}
    parts.write_part(0, 1, read_metadata(build_dataset(tmp_path / "ds", [[5]])).select(["lang"]))
    with pytest.raises(PartsError, match=r"model changed.*--restart"):
        PartsDir(tmp_path / "parts", {"model": "c"})  # finished parts are protected


def test_score_ppl_bad_load_is_an_error_and_does_not_block_the_rerun(tmp_path):
    prefix = build_token_dataset(tmp_path / "ds", random_documents(4, seed=0, min_len=8))
    (tmp_path / "empty").mkdir()
    for load, message in (
        (tmp_path / "nonexistent", "no such directory"),
        (tmp_path / "empty", "contains no checkpoint"),
    ):
        proc = subprocess.run(
            [sys.executable, "tools/ppl/score_ppl.py", "--data-prefix", str(prefix),
             "--load", str(load), "--preset", "tiny", "--device", "cpu", "--no-progress"],
            cwd=REPO_ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        error = proc.stderr[proc.stderr.index("error: ") :]
        assert str(load) in error and message in error, error
        assert not (tmp_path / "ds.ppl.parts").exists()  # no resume state was written
    # The corrected rerun (here: another model) is not refused.
    hf = save_tiny_llama(tmp_path / "hf")
    summary = score_dataset(
        PPLConfig(data_prefix=str(prefix), hf_model=str(hf), min_tokens=2, progress=False)
    )
    assert summary.merged and summary.documents_scored == 4


def _scored(tmp_path, n=40):
    prefix = build_dataset(tmp_path / "ds", [[5, 6, 7]] * n)
    ppl = np.exp(np.random.default_rng(0).normal(2.0, 0.5, n))
    add_columns(prefix, {"ppl": ppl.astype(np.float32), "ppl_status": ["ok"] * n})
    return prefix, ppl


def _report(args, capsys) -> tuple[int, str]:
    rc = report_tool.main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("inf"), None])
def test_report_refuses_bad_ppl_of_ok_rows_and_writes_nothing(tmp_path, capsys, bad):
    prefix, ppl = _scored(tmp_path)
    values = [float(v) for v in ppl]
    values[3] = values[17] = bad
    add_columns(prefix, {"ppl": values})
    out = tmp_path / "report"
    rc, err = _report(["--data-prefix", str(prefix), "--output-dir", str(out)], capsys)
    assert rc == 2 and "ds.meta.parquet: 2 row(s) with ppl_status 'ok'" in err
    assert "row 3 (ppl=" in err and "row 17 (ppl=" in err
    assert not out.exists()


def test_report_outputs_are_all_or_nothing(tmp_path, monkeypatch):
    import megatron_syne.scoring.report as report

    prefix, _ = _scored(tmp_path)

    def fail(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "plot_histograms", fail)
    with pytest.raises(RuntimeError, match="plot failed"):
        ppl_report([prefix], tmp_path / "report")
    assert list((tmp_path / "report").iterdir()) == []  # no json/md without the PNG, no temps
    monkeypatch.undo()
    ppl_report([prefix], tmp_path / "report")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(OUTPUT_FILES)


def test_report_bad_arguments_are_clear_errors(tmp_path, capsys):
    prefix, _ = _scored(tmp_path)
    (tmp_path / "a_file").write_text("x")
    rc, err = _report(
        ["--data-prefix", str(prefix), "--output-dir", str(tmp_path / "a_file")], capsys
    )
    assert rc == 2 and "is an existing file, not a directory" in err

    # The same dataset twice would count every document twice.
    same = str(prefix.parent / "." / prefix.name)
    rc, err = _report(
        ["--data-prefix", str(prefix), same, "--output-dir", str(tmp_path / "r")], capsys
    )
    assert rc == 2 and "names the same dataset" in err and not (tmp_path / "r").exists()

    # A missing group-by column is not a scoring problem.
    write_metadata(prefix, read_metadata(prefix).drop_columns(["source", "topic"]))
    args = ["--data-prefix", str(prefix), "--output-dir", str(tmp_path / "r")]
    rc, err = _report(args, capsys)
    assert rc == 2 and "no column(s) ['source'] to group by" in err and "score_ppl" not in err
    assert "choose --group-by from the columns it has: lang," in err
    rc, err = _report([*args, "--group-by", "topic"], capsys)
    assert rc == 2 and "tools/topics/label.py writes `topic`" in err
    rc, _ = _report([*args, "--group-by", "lang"], capsys)
    assert rc == 0
