"""preprocess_data: Megatron-readable output, aligned metadata, formats, byte-identical runs."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_syne.data.metadata import read_metadata, text_hash
from megatron_syne.preprocess.pipeline import PreprocessConfig, run_preprocess
from megatron_syne.utils.slurm import slurm_shard_defaults
from tests.preprocess._data import output_files, read_input_records


def _run(corpus_dir, out, **overrides):
    config = PreprocessConfig(
        input=(str(corpus_dir),),
        output_prefix=str(out),
        append_eod=True,
        progress=False,
        **overrides,
    )
    return run_preprocess(config)


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory):
    """One uninterrupted single-worker run over the corpus (64 KiB units: several per file)."""
    out = tmp_path_factory.mktemp("reference") / "corpus"
    summary = _run(corpus_dir, out, partition_bytes=1 << 16)
    return out, summary


def test_documents_read_back_through_megatron(reference, tokenizer):
    out, summary = reference
    prefix = f"{out}_text_document"
    dataset = IndexedDataset(prefix)
    metadata = read_metadata(prefix).to_pylist()
    assert summary.stats.records == 600 and summary.rejected == 0
    assert len(dataset) == len(metadata) == 600
    assert dataset[0].dtype == np.int32  # optimal dtype for a 128256-token vocabulary
    cache: dict[str, list[dict]] = {}
    tokens = 0
    for i, row in enumerate(metadata):
        records = cache.setdefault(row["input_file"], read_input_records(row["input_file"]))
        record = records[row["input_line"] - 1]
        expected = tokenizer.encode(record["text"]) + [tokenizer.eod]
        assert dataset[i].tolist() == expected, (i, row)
        # Metadata row i describes document i (checked by content hash) and carries its fields.
        assert row["hash"] == text_hash(record["text"])
        assert (row["lang"], row["source"], row["topic"]) == (
            record["lang"],
            record["source"],
            record.get("topic"),
        )
        assert row["n_tokens"] == len(expected) and row["n_chars"] == len(record["text"])
        tokens += len(expected)
    assert summary.stats.tokens["text"] == tokens
    # Input order is kept: files sorted by name, lines in file order.
    order = [(row["input_file"].rsplit("/", 1)[1], row["input_line"]) for row in metadata]
    assert order == sorted(order)
    assert {name for name, _ in order} == {"a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"}


def test_index_bytes_equal_megatron_builder(reference, tmp_path):
    """Our numpy index writer and merge produce exactly what megatron-core's builder writes."""
    out, _ = reference
    prefix = f"{out}_text_document"
    dataset = IndexedDataset(prefix)
    builder = IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.int32)
    import torch

    for i in range(len(dataset)):
        builder.add_document(torch.from_numpy(dataset[i].astype(np.int64)), [len(dataset[i])])
    builder.finalize(str(tmp_path / "mc.idx"))
    assert (tmp_path / "mc.bin").read_bytes() == open(f"{prefix}.bin", "rb").read()
    assert (tmp_path / "mc.idx").read_bytes() == open(f"{prefix}.idx", "rb").read()


def test_workers_and_units_do_not_change_bytes(reference, corpus_dir, tmp_path):
    out, _ = reference
    parallel = tmp_path / "w4"
    summary = _run(corpus_dir, parallel, workers=4, partition_bytes=1 << 20)
    assert summary.units != 0
    assert output_files(str(parallel)) == output_files(str(out))
    assert not (tmp_path / "w4.parts").exists()  # partitions removed after the merge


def test_dedup_exact(corpus_dir, tmp_path, tokenizer):
    from tests.preprocess._data import make_records, write_jsonl

    records = make_records(50, seed=9)
    duplicated = records + [dict(records[3]), dict(records[7])]
    duplicated[-1]["text"] = "  " + records[7]["text"].replace(" ", "   ") + "\n"  # same normalised
    data = tmp_path / "in"
    data.mkdir()
    write_jsonl(data / "dups.jsonl", duplicated)
    summary = _run(data, tmp_path / "d", dedup="exact")
    assert summary.duplicates == 2
    dataset = IndexedDataset(f"{tmp_path}/d_text_document")
    assert len(dataset) == 50
    # The summary counts what was written, not the dropped duplicates.
    assert summary.stats.tokens["text"] == int(dataset.sequence_lengths.sum())
    assert summary.stats.characters["text"] == sum(len(r["text"]) for r in records)
    assert f"text: {int(dataset.sequence_lengths.sum()):,} tokens" in summary.format()
    rejects = (tmp_path / "d.rejects.jsonl").read_text().splitlines()
    assert [r for r in rejects if '"duplicate"' in r] and len(rejects) == 2
    assert '"line": 51' in rejects[0] and '"duplicate_of": {"file"' in rejects[0]


def test_keys_that_would_clash_are_refused(tmp_path):
    for overrides, message in [
        ({"json_keys": ("text", "text")}, "--json-keys names"),
        ({"metadata_keys": ("lang", "hash")}, "written by preprocessing itself"),
        ({"metadata_keys": ("input_line",)}, "written by preprocessing itself"),
        ({"output_prefix": ""}, "names no file"),
        ({"output_prefix": f"{tmp_path}/out/"}, "names no file"),
    ]:
        with pytest.raises(ValueError, match=message):
            PreprocessConfig(**{"input": ("x.jsonl",), "output_prefix": "o", **overrides})


def test_sidecar_rows_out_of_order_are_refused(tmp_path):
    import pyarrow.parquet as pq

    from megatron_syne.data.metadata import MetadataError, metadata_path
    from tests.preprocess._data import make_records, write_jsonl

    data = tmp_path / "in"
    data.mkdir()
    write_jsonl(data / "x.jsonl", make_records(40, seed=3))
    _run(data, tmp_path / "d")
    prefix = f"{tmp_path}/d_text_document"
    assert read_metadata(prefix, columns=["lang"]).num_rows == 40  # in order: accepted
    table = pq.read_table(metadata_path(prefix))
    order = np.random.default_rng(0).permutation(table.num_rows)
    pq.write_table(table.take(order), metadata_path(prefix))
    # Same row count, rows of other documents: every later tool would mislabel documents.
    with pytest.raises(MetadataError, match="rows disagree with .*token count"):
        read_metadata(prefix, columns=["lang"])
    metadata_path(prefix).write_bytes(b"not parquet")
    with pytest.raises(MetadataError, match="cannot read the metadata sidecar"):
        read_metadata(prefix)


def test_metadata_defaults_and_extra_keys(tmp_path):
    from tests.preprocess._data import write_jsonl

    data = tmp_path / "in"
    data.mkdir()
    write_jsonl(data / "x.jsonl", [{"text": "hello", "url": "http://a"}, {"text": "bye"}])
    _run(
        data,
        tmp_path / "m",
        metadata_keys=("lang", "source", "topic", "url"),
        metadata_defaults=(("source", "web-en"),),
    )
    table = pq.read_table(f"{tmp_path}/m_text_document.meta.parquet")
    assert table.column("source").to_pylist() == ["web-en", "web-en"]
    assert table.column("url").to_pylist() == ["http://a", None]
    assert table.column("topic").to_pylist() == [None, None]


def test_slurm_shard_defaults():
    assert slurm_shard_defaults({}) == (1, 0)
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "16", "SLURM_ARRAY_TASK_MIN": "1"}
    assert slurm_shard_defaults(env) == (16, 4)
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID='abc' is not an integer"):
        slurm_shard_defaults({**env, "SLURM_ARRAY_TASK_ID": "abc"})
