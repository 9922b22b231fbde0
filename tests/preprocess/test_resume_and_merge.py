"""Crash safety (kill at a random moment, rerun: same bytes), Slurm-array shards and merging."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_syne.data.metadata import read_metadata
from megatron_syne.preprocess.pipeline import PreprocessConfig, run_preprocess
from tests.helpers import REPO_ROOT, cpu_env
from tests.preprocess._data import output_files

PREPROCESS = str(REPO_ROOT / "tools/preprocess/preprocess_data.py")
MERGE = str(REPO_ROOT / "tools/preprocess/merge_datasets.py")


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "corpus"
    config = PreprocessConfig(
        input=(str(corpus_dir),),
        output_prefix=str(out),
        append_eod=True,
        partition_bytes=1 << 16,
        progress=False,
    )
    return out, run_preprocess(config)


def _cli(corpus_dir, out):
    return [
        sys.executable,
        PREPROCESS,
        "--input",
        str(corpus_dir),
        "--output-prefix",
        str(out),
        "--append-eod",
        "--workers",
        "2",
        "--partition-bytes",
        str(1 << 16),
        "--batch-size",
        "8",
        "--no-progress",
    ]


def test_kill_at_random_moment_then_rerun_gives_identical_bytes(reference, corpus_dir, tmp_path):
    ref_out, ref_summary = reference
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    out = tmp_path / "killed"
    parts = Path(f"{out}.parts")
    wait_for_units = rng.randint(1, ref_summary.units - 1)
    extra_delay = rng.uniform(0.0, 0.3)
    proc = subprocess.Popen(
        _cli(corpus_dir, out),
        env=cpu_env(),
        start_new_session=True,  # its own process group: the kill takes the workers too
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("*.done.json"))) >= wait_for_units:
            break
        time.sleep(0.01)
    time.sleep(extra_delay)
    finished_before_kill = proc.poll() is not None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(parts.glob("*.done.json"))) if parts.is_dir() else 0
    print(f"killed after {wait_for_units} units + {extra_delay:.2f} s: {done_at_kill} units done")
    if not finished_before_kill:
        # An unfinished run is marked by its .parts directory (removed only after the merge).
        assert parts.is_dir() or Path(f"{out}_text_document.bin").exists()
    rerun = subprocess.run(
        _cli(corpus_dir, out), env=cpu_env(), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reused = int(re.search(r"\((\d+) reused", rerun.stdout).group(1))
    assert reused == done_at_kill  # finished units are not redone
    assert output_files(str(out)) == output_files(str(ref_out))
    assert not parts.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_slurm_array_shards_then_merge(reference, corpus_dir, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "sharded"
    for task_id in (1, 2):  # --array=1-2
        env = cpu_env(
            SLURM_ARRAY_TASK_ID=str(task_id), SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_TASK_MIN="1"
        )
        cmd = _cli(corpus_dir, out)
        cmd[cmd.index("--workers") + 1] = "1"
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted(tmp_path.glob("sharded-shard*_text_document.idx"))
    assert [p.name for p in shards] == [
        "sharded-shard00000-of-00002_text_document.idx",
        "sharded-shard00001-of-00002_text_document.idx",
    ]
    merged = tmp_path / "merged_text_document"
    proc = subprocess.run(
        [sys.executable, MERGE, "--input", f"{tmp_path}/sharded-shard*_text_document"]
        + ["--output-prefix", str(merged)],
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Same documents as the single run (the shards hold disjoint files), metadata still aligned.
    reference_ds = IndexedDataset(f"{ref_out}_text_document")
    reference_rows = read_metadata(f"{ref_out}_text_document").to_pylist()
    by_origin = {
        (r["input_file"], r["input_line"]): reference_ds[i].tolist()
        for i, r in enumerate(reference_rows)
    }
    merged_ds = IndexedDataset(str(merged))
    merged_rows = read_metadata(merged).to_pylist()
    assert len(merged_ds) == len(merged_rows) == len(reference_rows)
    for i, row in enumerate(merged_rows):
        assert merged_ds[i].tolist() == by_origin[(row["input_file"], row["input_line"])]
    assert sorted(r["hash"] for r in merged_rows) == sorted(r["hash"] for r in reference_rows)


def test_merge_with_dedup_drops_the_second_copy(reference, tmp_path):
    ref_out, _ = reference
    prefix = f"{ref_out}_text_document"
    merged = tmp_path / "twice_text_document"
    proc = subprocess.run(
        [sys.executable, MERGE, "--input", prefix, prefix + ".idx", "--output-prefix", str(merged)]
        + ["--dedup", "exact"],
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    # The same dataset twice (however spelled) is refused, never merged once or twice silently.
    assert proc.returncode != 0 and "is given twice" in proc.stderr, proc.stderr[-3000:]
    from megatron_syne.preprocess.merge import merge_datasets

    # An output that is an input under another spelling is refused before anything is written.
    other_spelling = str(Path(prefix).parent / ".." / Path(prefix).parent.name / Path(prefix).name)
    before = Path(f"{prefix}.bin").read_bytes()
    with pytest.raises(Exception, match="is the input"):
        merge_datasets([prefix], other_spelling)
    assert Path(f"{prefix}.bin").read_bytes() == before

    summary = merge_datasets([prefix, prefix], str(merged), dedup="exact")
    assert summary.duplicates == len(IndexedDataset(prefix))
    assert Path(f"{merged}.bin").read_bytes() == Path(f"{prefix}.bin").read_bytes()
    assert Path(f"{merged}.idx").read_bytes() == Path(f"{prefix}.idx").read_bytes()
    assert pq.read_table(f"{merged}.meta.parquet").equals(pq.read_table(f"{prefix}.meta.parquet"))
    rejects = Path(f"{merged}.rejects.jsonl").read_text().splitlines()
    assert len(rejects) == summary.duplicates and '"reason": "duplicate"' in rejects[0]
    # Without dedup the documents are simply concatenated.
    summary = merge_datasets([prefix, prefix], str(tmp_path / "concat"))
    assert summary.documents == 2 * len(IndexedDataset(prefix))
    assert len(read_metadata(tmp_path / "concat")) == summary.documents
