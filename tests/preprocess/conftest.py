"""Fixtures: a small bilingual corpus in every input format, and the Llama-3 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_syne.preprocess.tokenizers import llama3_tokenizer_json, load_tokenizer
from tests.preprocess._data import make_records, write_jsonl, write_parquet


@pytest.fixture(scope="session")
def tokenizer():
    """The reference the tests compare stored documents with: Hugging Face ``tokenizers`` on the
    packaged Llama-3 tokenizer.json (the tool itself runs Meta's tokenizer.model via tiktoken)."""
    return load_tokenizer("HuggingFaceTokenizer", llama3_tokenizer_json())


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Four input files (jsonl, jsonl.gz, jsonl.zst, parquet), 600 documents in all."""
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl(root / "a.jsonl", make_records(300, seed=1))
    write_jsonl(root / "b.jsonl.gz", make_records(100, seed=2))
    write_jsonl(root / "c.jsonl.zst", make_records(100, seed=3))
    write_parquet(root / "d.parquet", make_records(100, seed=4))
    return root
