"""Every kind of bad input is counted and written, losslessly, to <prefix>.rejects.jsonl."""

from __future__ import annotations

import base64
import gzip
import json
import random
from collections import Counter

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_syne.data.metadata import read_metadata, text_hash
from megatron_syne.preprocess.pipeline import PreprocessConfig, PreprocessError, run_preprocess

GOOD = [json.dumps({"text": f"good document number {i}", "lang": "en"}) for i in range(40)]
BAD_LINES = {
    "malformed_json": b'{"text": "unterminated',
    "not_a_json_object": b'["text", "a list"]',
    "missing_text": b'{"body": "wrong key"}',
    "non_string_text": b'{"text": 42}',
    "empty_text": b'{"text": "  \\n\\t "}',
    "invalid_utf8": b'{"text": "caf\xe9 latin-1"}',
    "nul_byte": b'{"text": "a\\u0000b"}',
    "too_long": json.dumps({"text": "x" * 101}).encode(),
    "invalid_unicode": b'{"text": "lone \\ud800 surrogate"}',
    "blank_line": b"   ",
}


def _config(inputs, out, max_chars=100, **kw):
    return PreprocessConfig(
        input=tuple(map(str, inputs)),
        output_prefix=str(out),
        append_eod=True,
        max_chars=max_chars,
        progress=False,
        **kw,
    )


@pytest.fixture()
def bad_inputs(tmp_path):
    lines = (
        [g.encode() for g in GOOD[:20]] + list(BAD_LINES.values()) + [g.encode() for g in GOOD[20:]]
    )
    plain = tmp_path / "bad.jsonl"
    plain.write_bytes(b"\n".join(lines) + b"\n")
    # A gzip file cut in the middle of its stream (an interrupted copy): the lines before the
    # cut are kept, the partial last line is a truncated_stream reject.
    full = gzip.compress(("\n".join(GOOD) + "\n").encode() * 50, mtime=0)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(full[: len(full) // 2])
    return plain, cut, lines


def test_each_bad_input_is_rejected_with_reason(bad_inputs, tmp_path, tokenizer):
    plain, cut, lines = bad_inputs
    summary = run_preprocess(
        _config([plain, cut], tmp_path / "out", max_reject_fraction=0.5, workers=1)
    )
    rejects = [json.loads(r) for r in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    by_reason = Counter(r["reason"] for r in rejects)
    assert by_reason == Counter({**{k: 1 for k in BAD_LINES}, "truncated_stream": 1})
    assert summary.stats.rejects == dict(sorted(by_reason.items()))
    for record in rejects:
        if record["file"] != str(plain):
            continue
        original = lines[record["line"] - 1]
        assert original == BAD_LINES[record["reason"]]  # right file, right line
        # Lossless: the raw line comes back byte for byte.
        raw = (
            base64.b64decode(record["raw_base64"])
            if "raw_base64" in record
            else record["raw"].encode("utf-8")
        )
        assert raw == original
        assert record["detail"]
    truncated = next(r for r in rejects if r["reason"] == "truncated_stream")
    assert truncated["file"] == str(cut) and "re-copy" in truncated["detail"]
    # Everything before the cut was kept: the good lines of the plain file + the cut file's lines.
    metadata = read_metadata(f"{tmp_path}/out_text_document").to_pylist()
    from_cut = [m for m in metadata if m["input_file"] == str(cut)]
    assert len(from_cut) == truncated["line"] - 1 > 40
    dataset = IndexedDataset(f"{tmp_path}/out_text_document")
    assert len(dataset) == 40 + len(from_cut)
    assert dataset[0].tolist() == tokenizer.encode(json.loads(GOOD[0])["text"]) + [tokenizer.eod]
    assert summary.stats.records == len(lines) + truncated["line"]


def test_reject_fraction_fails_the_run_but_keeps_work(bad_inputs, tmp_path):
    plain, _, _ = bad_inputs
    with pytest.raises(PreprocessError, match="max-reject-fraction") as err:
        run_preprocess(_config([plain], tmp_path / "out", max_reject_fraction=0.1))
    assert "rejects.jsonl" in str(err.value)
    assert (tmp_path / "out.rejects.jsonl").is_file()  # the user can see why
    assert not (tmp_path / "out_text_document.bin").exists()  # nothing looks complete
    summary = run_preprocess(_config([plain], tmp_path / "out", max_reject_fraction=0.25))
    assert summary.units_reused == summary.units  # the finished units were kept and reused


def test_missing_parquet_column_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_syne.preprocess.readers import InputError

    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(InputError, match="x.parquet.*--json-keys"):
        run_preprocess(_config([tmp_path / "x.parquet"], tmp_path / "out"))


def test_missing_input_is_a_clear_error(tmp_path):
    from megatron_syne.preprocess.readers import InputError

    with pytest.raises(InputError, match="no such file"):
        run_preprocess(_config([tmp_path / "nope.jsonl"], tmp_path / "out"))
    with pytest.raises(InputError, match="matched no input files"):
        run_preprocess(_config([str(tmp_path / "*.jsonl.gz")], tmp_path / "out"))


def test_corrupt_gzip_keeps_what_decodes(tmp_path):
    rng = random.Random(0)
    # Random digits compress poorly, so the corruption lands mid-file, many pieces in.
    lines = [
        json.dumps({"text": " ".join(str(rng.random()) for _ in range(30))}) for _ in range(3000)
    ]
    data = bytearray(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    middle = len(data) // 2
    data[middle : middle + 16] = b"\xff" * 16
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(bytes(data))
    summary = run_preprocess(
        _config([path], tmp_path / "out", max_chars=10_000, max_reject_fraction=1.0)
    )
    rejects = [json.loads(r) for r in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["corrupt_stream"]
    kept = summary.stats.documents
    assert rejects[0]["line"] == kept + 1
    assert 1000 < kept < 2000  # everything decoded before the corrupt 64 KiB piece is kept
    hashes = read_metadata(f"{tmp_path}/out_text_document").column("hash").to_pylist()
    assert hashes == [text_hash(json.loads(line)["text"]) for line in lines[:kept]]
    # What could not be decoded is measured in bytes, and counts against the reject limit.
    unread = rejects[0]["unread_bytes"]
    assert len(data) - middle <= unread <= len(data) - middle + 64 * 1024
    assert summary.stats.unread_bytes == unread and "could not be decoded" in summary.format()
    # A file that is not gzip at all, next to a good one: one reject, but half the input
    # bytes are unreadable, so the default 1% limit fails the run and says why.
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(lines[:500]) + "\n")
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(good.read_bytes())  # plain text under a .gz name
    with pytest.raises(PreprocessError, match="input bytes .* could not be decoded"):
        run_preprocess(_config([good, fake], tmp_path / "two", max_chars=10_000))
    (record,) = [json.loads(r) for r in (tmp_path / "two.rejects.jsonl").read_text().splitlines()]
    assert record["reason"] == "corrupt_stream" and "before the first line" in record["detail"]
    assert record["unread_bytes"] == fake.stat().st_size


def test_failed_run_sets_an_earlier_runs_outputs_aside(bad_inputs, tmp_path):
    plain, _, lines = bad_inputs
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(GOOD) + "\n")
    run_preprocess(_config([good], tmp_path / "out"))
    assert (tmp_path / "out_text_document.bin").is_file()
    before = (tmp_path / "out_text_document.bin").read_bytes()
    with pytest.raises(PreprocessError, match="earlier run left at this prefix was renamed"):
        run_preprocess(_config([plain], tmp_path / "out", max_reject_fraction=0.1))
    # Beside this run's rejects no dataset from other inputs is left under the dataset's name;
    # the earlier one is kept under .previous names.
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out"))
    assert left == [
        "out.parts",
        "out.rejects.jsonl",
        "out_text_document.bin.previous",
        "out_text_document.idx.previous",
        "out_text_document.meta.parquet.previous",
    ]
    assert (tmp_path / "out_text_document.bin.previous").read_bytes() == before
