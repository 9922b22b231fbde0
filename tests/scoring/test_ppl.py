"""PPL scoring: equality with transformers' loss (HF and converted Megatron paths, one rank and
two data-parallel ranks), too-short marking, resume, and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_syne.data.metadata import MetadataError, read_metadata, write_metadata
from megatron_syne.scoring.ppl import PPLConfig, score_dataset
from tests.helpers import REPO_ROOT, cpu_env, run_torchrun
from tests.scoring._models import (
    BOS,
    EOD,
    build_token_dataset,
    random_documents,
    save_tiny_llama,
    transformers_losses,
)

MAX_TOKENS, MIN_TOKENS = 48, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    hf = save_tiny_llama(root / "hf")
    # Lengths straddle both limits: some documents are too short, some are truncated.
    docs = random_documents(22, seed=3, min_len=1, max_len=80)
    reference = transformers_losses(hf, docs, MAX_TOKENS)
    return root, hf, docs, reference


def _check_against_reference(prefix, docs, reference):
    rows = read_metadata(prefix).to_pylist()
    assert len(rows) == len(docs)
    n_ok = 0
    for row, doc, ref in zip(rows, docs, reference):
        n_text = len(doc) - 1  # stored with EOD
        if n_text < MIN_TOKENS:
            assert row["ppl_status"] == "too_short" and row["nll"] is None and row["ppl"] is None
            continue
        n_ok += 1
        assert row["ppl_status"] == "ok"
        assert row["ppl_tokens"] == min(n_text, MAX_TOKENS)
        assert abs(row["nll"] - ref) < 1e-4, (row, ref)
        assert math.isclose(row["ppl"], math.exp(row["nll"]), rel_tol=1e-5)
    assert 0 < n_ok < len(docs)  # both kinds really occurred


def test_hf_path_matches_transformers_loss_data_parallel(setup, tmp_path):
    root, hf, docs, reference = setup
    prefix = build_token_dataset(tmp_path / "ds", docs)
    run_torchrun(
        [
            "tools/ppl/score_ppl.py",
            "--data-prefix", str(prefix),
            "--hf-model", str(hf),
            "--max-tokens", str(MAX_TOKENS),
            "--min-tokens", str(MIN_TOKENS),
            "--micro-batch-size", "3",
            "--chunk-size", "4",
            "--dtype", "fp32",
        ],
        nproc=2,
        timeout=300,
    )  # fmt: skip
    _check_against_reference(prefix, docs, reference)
    assert not (tmp_path / "ds.ppl.parts").exists()  # merged and cleaned up


def test_resume_scores_only_missing_chunks(setup, tmp_path):
    root, hf, docs, reference = setup
    prefix = build_token_dataset(tmp_path / "ds", docs)
    config = dict(
        data_prefix=str(prefix),
        hf_model=str(hf),
        max_tokens=MAX_TOKENS,
        min_tokens=MIN_TOKENS,
        micro_batch_size=4,
        chunk_size=5,
        dtype="fp32",
        keep_parts=True,
        progress=False,
    )
    first = score_dataset(PPLConfig(**config))
    assert first.documents_scored == len(docs) and first.chunks_reused == 0
    parts = sorted((tmp_path / "ds.ppl.parts").glob("part-*.parquet"))
    assert len(parts) == 5
    kept = {p: p.stat().st_mtime_ns for p in parts[:2] + parts[3:]}
    parts[2].unlink()  # as if the run died while scoring documents 10..14
    second = score_dataset(PPLConfig(**config))
    assert second.chunks_reused == 4 and second.documents_scored == 5
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # nothing rescored
    _check_against_reference(prefix, docs, reference)


def test_metadata_row_count_mismatch_is_rejected(setup, tmp_path):
    root, hf, docs, _ = setup
    prefix = build_token_dataset(tmp_path / "ds", docs)
    table = read_metadata(prefix)
    write_metadata(prefix, table.slice(0, table.num_rows - 1))
    with pytest.raises(MetadataError, match="metadata rows but"):
        score_dataset(PPLConfig(data_prefix=str(prefix), hf_model=str(hf), progress=False))


@pytest.fixture(scope="module")
def megatron_checkpoint(setup):
    """The tiny HF model converted once to a torch_dist checkpoint, plus the scorer's model flags
    (--load, --preset and the shape overrides that describe it)."""
    pytest.importorskip("megatron_syne.convert.hf_to_megatron")
    from megatron_syne.convert.arch import LlamaArch
    from megatron_syne.convert.hf_to_megatron import HFToMegatronConfig, convert_hf_to_megatron

    root, hf, _, _ = setup
    convert_hf_to_megatron(
        HFToMegatronConfig(hf, root / "meg", dtype="float32", show_progress=False)
    )
    shape = LlamaArch.from_hf_dir(hf).to_preset_overrides()
    args = ["--load", str(root / "meg"), "--preset", "tiny"]
    for name in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
        "num_query_groups", "kv_channels", "vocab_size", "max_position_embeddings",
        "rotary_base", "norm_epsilon",
    ):  # fmt: skip
        args += [f"--{name.replace('_', '-')}", str(shape[name])]
    assert shape["untie_embeddings_and_output_weights"]
    args.append("--untie-embeddings-and-output-weights")
    return args


def _megatron_score_args(prefix, model_args, micro_batch_size, chunk_size):
    return [
        "tools/ppl/score_ppl.py",
        "--data-prefix", str(prefix),
        *model_args,
        "--max-tokens", str(MAX_TOKENS),
        "--min-tokens", str(MIN_TOKENS),
        "--micro-batch-size", str(micro_batch_size),
        "--chunk-size", str(chunk_size),
        "--bos-token-id", str(BOS),
        "--eod-token-id", str(EOD),
        "--dtype", "fp32",
        "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def megatron_single_rank(setup, megatron_checkpoint, tmp_path_factory):
    """One process scores the dataset from the converted checkpoint: (prefix, stdout)."""
    _, _, docs, _ = setup
    prefix = build_token_dataset(tmp_path_factory.mktemp("ppl-meg1") / "ds", docs)
    args = _megatron_score_args(prefix, megatron_checkpoint, micro_batch_size=4, chunk_size=512)
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return prefix, proc.stdout


def test_converted_megatron_path_matches_transformers_loss(setup, megatron_single_rank):
    _, _, docs, reference = setup
    prefix, stdout = megatron_single_rank
    assert "NLL via torch" in stdout and "1 rank(s)" in stdout
    _check_against_reference(prefix, docs, reference)


def test_converted_megatron_path_data_parallel(
    setup, megatron_checkpoint, megatron_single_rank, tmp_path
):
    """Two ranks over the Megatron path: same nll/ppl as one rank and as transformers, and
    every document is scored by exactly one rank and written exactly once."""
    _, _, docs, reference = setup
    prefix = build_token_dataset(tmp_path / "ds", docs)
    chunk_size = 4  # 22 documents -> 6 chunks: rank 0 gets 0, 2, 4; rank 1 gets 1, 3, 5
    args = _megatron_score_args(
        prefix, megatron_checkpoint, micro_batch_size=3, chunk_size=chunk_size
    )
    run_torchrun([*args, "--keep-parts"], nproc=2, timeout=300)
    _check_against_reference(prefix, docs, reference)

    single = read_metadata(megatron_single_rank[0]).to_pylist()
    double = read_metadata(prefix).to_pylist()
    assert len(double) == len(single) == len(docs)
    for one, two in zip(single, double):
        assert one["ppl_status"] == two["ppl_status"] and one["ppl_tokens"] == two["ppl_tokens"]
        if one["nll"] is None:
            assert two["nll"] is None and two["ppl"] is None
        else:
            assert abs(one["nll"] - two["nll"]) < 1e-4, (one, two)
            assert math.isclose(one["ppl"], two["ppl"], rel_tol=1e-4)

    # The parts tile [0, n) with no gap and no overlap: each row was written exactly once.
    parts = sorted((tmp_path / "ds.ppl.parts").glob("part-*.parquet"))
    bounds = [tuple(int(x) for x in p.stem.split("-")[1:]) for p in parts]
    assert bounds == [(s, min(s + chunk_size, len(docs))) for s in range(0, len(docs), chunk_size)]
    assert [pq.read_metadata(p).num_rows for p in parts] == [e - s for s, e in bounds]
    summary = json.loads(Path(f"{prefix}.ppl.summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rank_chunks"] == 3  # rank 0's share
    assert summary["documents_scored"] == 12  # chunks [0, 4), [8, 12), [16, 20)
    statuses = [r["ppl_status"] for r in single]
    assert summary["status_counts"] == {s: statuses.count(s) for s in set(statuses)}


def test_too_short_and_bos_handling_without_model_noise(setup, tmp_path):
    """--no-bos: n text tokens give n - 1 predictions (first token unpredicted)."""
    root, hf, docs, _ = setup
    prefix = build_token_dataset(tmp_path / "ds", docs[:6])
    score_dataset(
        PPLConfig(
            data_prefix=str(prefix),
            hf_model=str(hf),
            max_tokens=MAX_TOKENS,
            min_tokens=MIN_TOKENS,
            no_bos=True,
            dtype="fp32",
            progress=False,
        )
    )
    table = read_metadata(prefix)
    tokens = table.column("ppl_tokens").to_pylist()
    status = table.column("ppl_status").to_pylist()
    for n, s, doc in zip(tokens, status, docs[:6]):
        n_text = len(doc) - 1
        assert s == ("ok" if n_text >= MIN_TOKENS else "too_short")
        assert n == (min(n_text, MAX_TOKENS) - 1 if s == "ok" else 0)
    assert isinstance(table.column("nll").type, pa.DataType)
    assert np.isnan(table.column("nll").to_numpy(zero_copy_only=False)).sum() == status.count(
        "too_short"
    )


def test_token_ids_outside_the_model_vocabulary_are_refused(setup, tmp_path):
    root, hf, _, _ = setup
    prefix = build_token_dataset(tmp_path / "ds", [[5, 6, 7, EOD], [5, 6, 4000, 7, EOD]])
    with pytest.raises(ValueError, match=r"document 1 has token id 4000 outside .*\[0, 320\)"):
        score_dataset(
            PPLConfig(data_prefix=str(prefix), hf_model=str(hf), min_tokens=2, progress=False)
        )


def test_megatron_checkpoint_of_another_shape_is_a_clear_error(
    setup, megatron_checkpoint, tmp_path
):
    """A --load whose shape flags do not match is `error: ...` (exit 2, no traceback) and
    leaves no resume state, so the rerun with the right flags is not refused."""
    _, _, docs, reference = setup
    prefix = build_token_dataset(tmp_path / "ds", docs)
    wrong = list(megatron_checkpoint)
    at = wrong.index("--ffn-hidden-size") + 1
    wrong[at] = str(2 * int(wrong[at]))
    for model_args, expected_rc in ((wrong, 2), (megatron_checkpoint, 0)):
        proc = subprocess.run(
            [sys.executable, *_megatron_score_args(prefix, model_args, 4, 512)],
            cwd=REPO_ROOT,
            env=cpu_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == expected_rc, proc.stderr[-4000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
        if expected_rc:
            assert "error: " in proc.stderr and not (tmp_path / "ds.ppl.parts").exists()
    _check_against_reference(prefix, docs, reference)
