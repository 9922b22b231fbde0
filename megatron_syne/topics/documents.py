"""Reading documents (token ids or decoded text) back out of an indexed dataset."""

from __future__ import annotations

import os

import numpy as np


def open_indexed_dataset(prefix: str | os.PathLike):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix), mmap=True)


def document_tokens(dataset, doc_index: int) -> np.ndarray:
    """All token ids of document ``doc_index`` as a new array (its sequences concatenated;
    preprocessing writes one sequence per document, but Megatron's format allows several)."""
    doc_indices = dataset.document_indices
    first, last = int(doc_indices[doc_index]), int(doc_indices[doc_index + 1])
    if last - first == 1:
        # A copy, not a view: megatron's IndexedDataset.__del__ unmaps the .bin, and a view
        # that outlives the dataset (e.g. queued for a worker process) would then segfault.
        return np.array(dataset[first])
    if last == first:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.asarray(dataset[i]) for i in range(first, last)])


def strip_special(tokens: np.ndarray, bos: int | None, eod: int | None) -> np.ndarray:
    """Drop a leading BOS and trailing EOD ids: they are separators, not document content."""
    start, end = 0, len(tokens)
    if bos is not None and end and tokens[0] == bos:
        start = 1
    while eod is not None and end > start and tokens[end - 1] == eod:
        end -= 1
    return tokens[start:end]


def decode_documents(
    prefix: str | os.PathLike, indices, tokenizer, max_tokens: int | None = None
) -> list[str]:
    """Text of the given documents, decoded with the tokenizer that wrote the dataset (only the
    first ``max_tokens`` tokens of each when given)."""
    dataset = open_indexed_dataset(prefix)
    bos, eod = getattr(tokenizer, "bos", None), getattr(tokenizer, "eod", None)
    texts = []
    for i in indices:
        tokens = strip_special(document_tokens(dataset, int(i)), bos, eod)
        if max_tokens is not None:
            tokens = tokens[:max_tokens]
        texts.append(tokenizer.decode(tokens.tolist()) if len(tokens) else "")
    return texts
