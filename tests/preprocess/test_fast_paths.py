"""The fast paths of preprocessing accept exactly what the full checks accept, and write the
same bytes: validation, the chunked line reader, token arrays, and the streaming merge."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from megatron_syne.data.metadata import metadata_schema
from megatron_syne.preprocess import readers
from megatron_syne.preprocess.documents import Document, ValidationConfig, Validator
from megatron_syne.preprocess.indexed import (
    IndexedMerger,
    TokenBinWriter,
    merge_indexed,
    read_index,
)
from tests.preprocess.test_rejects import BAD_LINES
from tests.topics._data import build_dataset

TRICKY_LINES = [
    *BAD_LINES.values(),
    b'{"text": "ok", "lang": "en", "topic": 3}',
    b' {"text": "leading space"}',
    b'{"text": "trailing space"} ',
    b'{"text": "crlf line"}\r',
    b'{"text": "extra data"} {"x": 1}',
    b'{"text": "dup", "text": "last wins"}',
    b'\xef\xbb\xbf{"text": "byte order mark"}',
    b'{"text": NaN}',
    b'{"text": "big", "source": 123456789012345678901234567890}',
    b'{"text": "float", "source": 1e400}',
    b'{"text": "\\ud83d\\ude00 pair"}',
    b'{"text": "\\udc00 low alone"}',
    b'{"text": "\\u3000\\u00a0 "}',
    b'{"text": "\\u3000 x \\u00a0"}',
    b'{"text": "control \x01 raw"}',
    b'{"text": null}',
    b'{"text": ["a"]}',
    b'{"lang": "en"}',
    b"{}",
    b"42",
    b'"a string"',
    b"",
    b"\x00",
    b'{"text": "nul\x00raw"}',
    b'{"text": "' + b"y" * 150 + b'"}',
    b'{"text": "\\t\\n"}',
    b'{"text": "ab\\u0301c e\\u0301"}',
    '{"text": "中文 文本\u3000结束", "source": "news-cn"}'.encode(),
    # Metadata that is not a string: numbers past 64 bits, floats, lists, booleans.
    b'{"text": "neg big", "source": -9223372036854775809}',
    b'{"text": 123456789012345678901234567890}',
    b'{"text": "nested", "topic": {"a": 123456789012345678901234567890}}',
    b'{"text": "float metadata", "lang": 0.1}',
    b'{"text": "list metadata", "topic": [1, 2.5, "x"]}',
    b'{"text": "bool metadata", "lang": true, "source": 18446744073709551615}',
    # Nesting deeper than Python's parser goes: a reject, not a crash of the worker.
    b"[" * 5000 + b"]" * 5000,
    b'{"text": "deep", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
]


class FullChecks(Validator):
    """Only the full checks (what every line went through before the fast paths)."""

    def from_line(self, number, raw):
        return self._from_line_checked(number, raw)

    def from_record(self, number, record, raw=None):
        return self._from_record_checked(number, record, raw)


@pytest.mark.parametrize("json_keys", [("text",), ("text", "title")])
def test_fast_validation_equals_full_checks(json_keys):
    config = ValidationConfig(
        json_keys=json_keys, metadata_defaults=(("lang", "xx"),), max_chars=100
    )
    validator, reference = Validator(config, "in.jsonl"), FullChecks(config, "in.jsonl")
    lines = list(TRICKY_LINES)
    lines += [
        json.dumps({"text": t, "title": t[:5]}, ensure_ascii=bool(i % 2)).encode()
        for i, t in enumerate(["x", " y ", "中文", "a  b\n c", "\u200b", "e\u0301"])
    ]
    rng = random.Random(0)
    pieces = [b"{", b"}", b'"text"', b":", b'"a"', b",", b" ", b"\\u0000", b'"\\ud800"', b"1"]
    lines += [b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(400)]
    accepted = 0
    for number, raw in enumerate(lines, start=1):
        fast = validator.from_line(number, raw)
        assert fast == reference.from_line(number, raw), raw
        if isinstance(fast, Document):
            accepted += 1
            assert fast.metadata["lang"] is not None
    assert accepted >= (8 if len(json_keys) == 1 else 5)
    deep = validator.from_line(1, b'{"text": "x", "y": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert deep["reason"] == "malformed_json" and "nested too deeply" in deep["detail"]


def test_byte_order_mark_and_non_string_metadata(tmp_path):
    import gzip

    from megatron_syne.preprocess.pipeline import PreprocessConfig, run_preprocess

    body = b'{"text": "first", "lang": ["en", "zh"]}\n{"text": "second", "source": true}\n'
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + body)
    (tmp_path / "bom.jsonl.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + body, mtime=0))
    for name in ("bom.jsonl", "bom.jsonl.gz"):
        (unit,) = readers.plan_units([str(tmp_path / name)], 1 << 30)
        assert [line.raw for line in readers.iter_jsonl_lines(unit)] == body.split(b"\n")[:2]
    summary = run_preprocess(
        PreprocessConfig(
            input=(str(tmp_path / "bom.jsonl"),),
            output_prefix=str(tmp_path / "out"),
            progress=False,
        )
    )
    assert summary.rejected == 0 and summary.stats.documents == 2
    table = pq.read_table(tmp_path / "out_text_document.meta.parquet")
    # Non-string metadata is stored as JSON text, readable by any tool.
    assert table.column("lang").to_pylist() == ['["en", "zh"]', None]
    assert table.column("source").to_pylist() == [None, "true"]


def test_chunked_plain_range_reader(tmp_path, monkeypatch):
    lines = [json.dumps({"text": "w" * random.Random(i).randint(0, 40)}) for i in range(300)]
    path = tmp_path / "a.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "no final newline"}')
    monkeypatch.setattr(readers, "READ_CHUNK_BYTES", 37)  # lines straddle every chunk edge
    units = readers.plan_units([str(path)], max(1 << 12, path.stat().st_size // 3))
    assert len(units) >= 2
    got = [(line.number, line.raw) for u in units for line in readers.iter_jsonl_lines(u)]
    expected = list(enumerate(path.read_bytes().split(b"\n"), start=1))
    assert got == expected

    # A line thousands of chunks long (plain and gzip), then a truncated gzip stream.
    import gzip

    long_line = json.dumps({"text": "x" * 200_000}).encode()
    data = b'{"text": "a"}\n' + long_line + b'\n{"text": "b"}'
    (tmp_path / "long.jsonl").write_bytes(data)
    (tmp_path / "long.jsonl.gz").write_bytes(gzip.compress(data))
    for name in ("long.jsonl", "long.jsonl.gz"):
        (unit,) = readers.plan_units([str(tmp_path / name)], 1 << 30)
        assert [line.raw for line in readers.iter_jsonl_lines(unit)] == data.split(b"\n")
    cut = gzip.compress(data * 3)
    (tmp_path / "cut.jsonl.gz").write_bytes(cut[: len(cut) // 2])
    (unit,) = readers.plan_units([str(tmp_path / "cut.jsonl.gz")], 1 << 30)
    lines = list(readers.iter_jsonl_lines(unit))
    assert lines[-1].truncated and not any(line.truncated for line in lines[:-1])
    assert [line.number for line in lines] == list(range(1, len(lines) + 1))


@pytest.mark.parametrize("dtype", [np.int32, np.uint16])
def test_token_writer_arrays_and_lists_write_the_same_bytes(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=n).tolist() for n in (0, 1, 7, 300)]
    files = {}
    for kind in ("lists", "arrays"):
        writer = TokenBinWriter(tmp_path / f"{kind}.bin", dtype)
        batch = docs if kind == "lists" else [np.array(d, dtype=np.uint32) for d in docs]
        lengths = writer.add_documents(batch, bos=60001, eod=60002)
        writer.add_documents(batch[:2])
        writer.close()
        assert lengths.tolist() == [len(d) + 2 for d in docs]
        files[kind] = (tmp_path / f"{kind}.bin").read_bytes()
        assert writer.lengths.tolist() == [len(d) + 2 for d in docs] + [0, 1]
    assert files["lists"] == files["arrays"]
    flat = np.frombuffer(files["lists"], dtype=dtype)
    assert flat[:3].tolist() == [60001, 60002, 60001] and flat[-1] == docs[1][0]


def test_streaming_merge_equals_merge_and_cleans_up(tmp_path):
    parts = []
    for i in range(3):
        prefix = tmp_path / f"part{i}"
        build_dataset(prefix, [[i, j, 7] for j in range(5 + i)])
        parts.append(str(prefix))
    merge_indexed(parts, tmp_path / "whole")
    with IndexedMerger(tmp_path / "stream", np.int32, metadata_schema()) as merger:
        for prefix in parts:
            merger.add(prefix)
        result = merger.finish()
    assert (result.documents, result.tokens) == (18, 54)
    for suffix in (".bin", ".idx", ".meta.parquet"):
        assert (tmp_path / f"whole{suffix}").read_bytes() == (
            tmp_path / f"stream{suffix}"
        ).read_bytes()
    assert read_index(tmp_path / "stream").num_documents == 18

    # An error (or leaving without finish) removes every temporary: nothing looks complete.
    with pytest.raises(ValueError, match="boom"):
        with IndexedMerger(tmp_path / "failed", np.int32, metadata_schema()) as merger:
            merger.add(parts[0])
            raise ValueError("boom")
    with pytest.raises(RuntimeError, match="without finish"):
        with IndexedMerger(tmp_path / "unfinished", np.int32, None) as merger:
            merger.add(parts[0])
    leftovers = [p.name for p in tmp_path.iterdir() if "failed" in p.name or "unfinished" in p.name]
    assert leftovers == []
    with pytest.raises(Exception, match="dtype"):
        with IndexedMerger(tmp_path / "wrong", np.uint16, None) as merger:
            merger.add(parts[0])


def test_guided_unit_sizes_shrink_towards_the_end(tmp_path):
    from megatron_syne.preprocess.pipeline import MIN_UNIT_BYTES, _guided_unit_sizes

    mb = 1 << 20
    sizes = _guided_unit_sizes(46 * mb, 46 * mb, 46 * mb, 2, 64 * mb)
    assert sum(sizes) >= 46 * mb and sum(sizes[:-1]) < 46 * mb
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 46 * mb // 4
    assert sizes[-1] >= 46 * mb // 32 and 8 <= len(sizes) <= 16
    assert _guided_unit_sizes(10 * 64 * mb, 10 * 64 * mb, 10 * 64 * mb, 2, 64 * mb)[0] == 64 * mb
    assert min(_guided_unit_sizes(mb, mb, mb, 8, 64 * mb)) >= MIN_UNIT_BYTES

    path = tmp_path / "a.jsonl"
    path.write_bytes(b"".join(b'{"text": "%d"}\n' % i for i in range(20_000)))
    units = readers.plan_units([str(path)], 1 << 40, cut_sizes=[100_000, 50_000, 25_000])
    assert [u.start for u in units][:3] == [0, units[0].end, units[1].end]
    assert abs(units[0].size - 100_000) < 20 and abs(units[1].size - 50_000) < 20
    assert units[-1].end == path.stat().st_size and len(units) == 4
    numbered = [line.number for u in units for line in readers.iter_jsonl_lines(u)]
    assert numbered == list(range(1, 20_001))
