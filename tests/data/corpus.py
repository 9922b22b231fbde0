"""A small synthetic indexed corpus with a metadata sidecar, for the mixture tests.

Each document's tokens encode (source id, document id) so a test can tell from a training sample
which component and document it came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_syne.data.metadata import write_metadata

EOD = 0
VOCAB = 4096


class TinyTokenizer:
    """The part of a Megatron tokenizer that GPTDataset uses."""

    vocab_size = VOCAB
    eod = EOD
    pad = -1

    def __init__(self) -> None:
        self.unique_identifiers = {"class": "TinyTokenizer", "vocab_size": VOCAB}


def write_source(
    prefix: Path,
    source: str,
    lang: str,
    topics: list[str | None],
    lengths: list[int],
    ppl: list[float] | None = None,
    source_id: int = 1,
) -> Path:
    """Documents d = 0..n-1, token t of d = 1 + (source_id * 1000 + d) % (VOCAB - 1), EOD last."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for d, n in enumerate(lengths):
        value = 1 + (source_id * 1000 + d) % (VOCAB - 1)
        tokens = np.full(n, value, dtype=np.int32)
        tokens[-1] = EOD
        builder.add_document(torch.from_numpy(tokens), [n])
    builder.finalize(f"{prefix}.idx")
    columns = {
        "lang": pa.array([lang] * len(lengths), pa.string()),
        "source": pa.array([source] * len(lengths), pa.string()),
        "topic": pa.array(topics, pa.string()),
        "n_tokens": pa.array(lengths, pa.int64()),
        "n_chars": pa.array([4 * n for n in lengths], pa.int64()),
        "hash": pa.array([f"{source}-{d}" for d in range(len(lengths))], pa.string()),
        "input_file": pa.array(["synthetic.jsonl"] * len(lengths), pa.string()),
        "input_line": pa.array(list(range(1, len(lengths) + 1)), pa.int64()),
    }
    if ppl is not None:
        columns["ppl"] = pa.array(ppl, pa.float64())
        columns["ppl_status"] = pa.array(
            ["ok" if np.isfinite(p) else "too_short" for p in ppl], pa.string()
        )
    write_metadata(prefix, pa.table(columns))
    return prefix


def decode_document(tokens: np.ndarray, source_id: int) -> set[int]:
    """Document ids (of source ``source_id``) whose tokens appear in a sample."""
    values = set(int(t) for t in np.asarray(tokens).ravel() if t != EOD)
    return {(v - 1 - source_id * 1000) % (VOCAB - 1) for v in values}


def gpt_config(seq_length: int, cache: Path, seed: int = 1234) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=None,
        split="1,0,0",
        path_to_cache=str(cache),
        tokenizer=TinyTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def make_corpus(root: Path, seed: int = 0) -> Path:
    """web-zh (3 topics, PPL scores), book-zh, web-en (2 topics), code-en; random doc lengths."""
    rng = np.random.default_rng(seed)
    topics3 = ["history", "science", "law"]
    n = 120
    lengths = rng.integers(20, 90, size=n).tolist()
    ppl = rng.lognormal(2.0, 0.5, size=n)
    ppl[5] = np.nan
    write_source(
        root / "web-zh", "web", "zh", [topics3[d % 3] for d in range(n)], lengths, ppl.tolist(), 1
    )
    write_source(
        root / "book-zh", "book", "zh", [None] * 40, rng.integers(30, 120, 40).tolist(), source_id=2
    )
    write_source(
        root / "web-en",
        "web",
        "en",
        [["history", "science"][d % 2] for d in range(80)],
        rng.integers(20, 90, 80).tolist(),
        source_id=3,
    )
    write_source(
        root / "code-en", "code", "en", [None] * 30, rng.integers(40, 200, 30).tolist(), source_id=4
    )
    return root
