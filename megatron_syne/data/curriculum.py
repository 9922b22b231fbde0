"""Curriculum ordering of a component's documents and the GPTDataset that follows it.

megatron-core's GPTDataset shuffles documents and samples. :class:`CurriculumGPTDataset`
overrides ``_build_document_sample_shuffle_indices`` so that one epoch's document order follows
the component's curriculum (PPL ascending / descending with quantile buckets or windows, or a
plain shuffle), packs documents into samples with megatron-core's own ``build_sample_idx``, and
keeps the sample order (no global sample shuffle) for PPL curricula so the order is what is
trained. Each instance is exactly one epoch; later epochs are separate instances (``epoch``
seeds the reshuffle), so no sample repeats before the epoch is exhausted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict

import numpy as np
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_syne.data.spec import CurriculumSpec
from megatron_syne.utils.io import atomic_path

logger = logging.getLogger(__name__)


class CurriculumError(ValueError):
    """A curriculum that cannot be built for the given documents (e.g. no PPL scores)."""


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def stable_key(text: str) -> int:
    """A process-independent 32-bit integer for a name (Python's hash() is salted)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def ppl_buckets(scores: np.ndarray, quantiles: tuple[float, ...]) -> np.ndarray:
    """Bucket of each finite score: 0 below the first quantile cut, ..., len(quantiles) above."""
    finite = np.isfinite(scores)
    buckets = np.full(len(scores), -1, dtype=np.int64)
    if not quantiles:
        buckets[finite] = 0
        return buckets
    cuts = np.quantile(scores[finite], quantiles)
    buckets[finite] = np.searchsorted(cuts, scores[finite], side="right")
    return buckets


def curriculum_document_order(
    document_ids: np.ndarray,
    scores: np.ndarray | None,
    curriculum: CurriculumSpec,
    seed: int,
    epoch: int = 0,
    name: str = "component",
) -> np.ndarray:
    """Order ``document_ids`` (int32) for one epoch of ``curriculum``.

    ``scores`` (PPL, aligned with ``document_ids``; NaN = missing) is needed for ppl orders.
    Buckets and windows shuffle with a generator seeded by ``(seed, epoch)``: ``epoch`` 0 is the
    first pass, later values give the reshuffled passes of the ``reshuffle`` policy.
    """
    document_ids = np.asarray(document_ids, dtype=np.int32)
    rng = _rng(seed, epoch)
    if curriculum.order == "sequential":
        return np.sort(document_ids)
    if curriculum.order == "shuffle":
        return rng.permutation(document_ids)
    if scores is None:
        raise CurriculumError(
            f"{name}: curriculum {curriculum.order} needs the '{curriculum.ppl_column}' metadata "
            "column; score the documents with tools/ppl/ first"
        )
    scores = np.asarray(scores, dtype=np.float64)
    missing = ~np.isfinite(scores)
    if missing.all():
        raise CurriculumError(
            f"{name}: none of its {len(scores)} documents has a PPL score "
            f"('{curriculum.ppl_column}'); score them with tools/ppl/ or use order: shuffle"
        )
    if missing.any() and curriculum.missing_ppl == "error":
        raise CurriculumError(
            f"{name}: {int(missing.sum())} of {len(scores)} documents have no PPL score; "
            "score them, or set curriculum.missing_ppl to last/first"
        )
    key = scores if curriculum.order == "ppl_ascending" else -scores
    buckets = ppl_buckets(scores, curriculum.buckets)
    if curriculum.order == "ppl_descending":
        buckets = np.where(buckets >= 0, len(curriculum.buckets) - buckets, -1)
    # Missing scores form their own bucket at the end (hardest) or the start.
    buckets = np.where(
        missing, len(curriculum.buckets) + 1 if curriculum.missing_ppl == "last" else -1, buckets
    )
    key = np.where(missing, 0.0, key)
    # Ties broken by document id so the order is a pure function of the data.
    order = np.lexsort((document_ids, key, buckets))
    ordered = document_ids[order]
    if curriculum.shuffle == "within_bucket" or missing.any():
        sorted_buckets = buckets[order]
        edges = np.flatnonzero(np.diff(sorted_buckets)) + 1
        starts = np.concatenate(([0], edges))
        ends = np.concatenate((edges, [len(ordered)]))
        for start, end, bucket in zip(starts, ends, sorted_buckets[starts]):
            is_missing_bucket = bucket in (-1, len(curriculum.buckets) + 1)
            if curriculum.shuffle == "within_bucket" or is_missing_bucket:
                ordered[start:end] = rng.permutation(ordered[start:end])
    if curriculum.shuffle == "window":
        for start in range(0, len(ordered), curriculum.window):
            ordered[start : start + curriculum.window] = rng.permutation(
                ordered[start : start + curriculum.window]
            )
    return ordered


class CurriculumGPTDataset(GPTDataset):
    """One epoch of a component, in curriculum order, packed into ``sequence_length`` samples.

    Args:
        indexed_dataset: the component's IndexedDataset.
        dataset_path: its prefix (bookkeeping and the default cache location).
        document_ids: documents of the component (train split), in any order.
        scores: PPL per document (aligned with ``document_ids``) or None.
        curriculum: the ordering.
        seed: component seed; ``epoch`` selects the pass (reshuffle policy).
        index_split: Split.train for training components, Split.valid for held-out sets.
        config: megatron-core GPTDatasetConfig (sequence_length, tokenizer, path_to_cache...).
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        dataset_path: str,
        document_ids: np.ndarray,
        scores: np.ndarray | None,
        curriculum: CurriculumSpec,
        seed: int,
        epoch: int,
        index_split: Split,
        config: GPTDatasetConfig,
        name: str = "component",
    ) -> None:
        self.curriculum = curriculum
        self.scores = None if scores is None else np.asarray(scores, dtype=np.float64)
        self.component_seed = int(seed)
        self.epoch = int(epoch)
        self.name = name
        super().__init__(
            indexed_dataset,
            dataset_path,
            np.asarray(document_ids, dtype=np.int32),
            None,
            index_split,
            config,
        )
        self.unique_identifiers["curriculum"] = asdict(curriculum)
        self.unique_identifiers["component_seed"] = self.component_seed
        self.unique_identifiers["epoch"] = self.epoch

    def _index_hash(self) -> str:
        digest = hashlib.md5(usedforsecurity=False)
        digest.update(self.unique_description.encode())
        digest.update(
            json.dumps(
                [asdict(self.curriculum), self.component_seed, self.epoch], sort_keys=True
            ).encode()
        )
        digest.update(np.ascontiguousarray(self.indices).tobytes())
        if self.scores is not None and self.curriculum.uses_ppl:
            digest.update(np.ascontiguousarray(self.scores).tobytes())
        return digest.hexdigest()

    def _build_document_sample_shuffle_indices(self):
        from megatron.core.datasets import helpers

        cache_dir = self.config.path_to_cache or os.path.join(
            os.path.dirname(self.dataset.path_prefix), "cache", f"{type(self).__name__}_indices"
        )
        base = os.path.join(
            cache_dir, f"{self._index_hash()}-{type(self).__name__}-{self.index_split.name}"
        )
        paths = [f"{base}-{kind}.npy" for kind in ("document_index", "sample_index", "shuffle")]
        if all(os.path.isfile(p) for p in paths):
            return tuple(np.load(p, mmap_mode="r") for p in paths)

        document_index = curriculum_document_order(
            self.indices, self.scores, self.curriculum, self.component_seed, self.epoch, self.name
        )
        sizes = self.dataset.sequence_lengths
        tokens_per_epoch = int(np.sum(sizes[self.indices], dtype=np.int64))
        extra = int(self.config.add_extra_token_to_sequence)
        if tokens_per_epoch <= self.config.sequence_length + extra:
            raise CurriculumError(
                f"{self.name}: {tokens_per_epoch} tokens in {len(self.indices)} documents is less "
                f"than one sample ({self.config.sequence_length + extra} tokens); add data or "
                "remove the component"
            )
        drop_last = (
            self.index_split != Split.valid or self.config.drop_last_partial_validation_sequence
        )
        sample_index = helpers.build_sample_idx(
            np.ascontiguousarray(sizes, dtype=np.int32),
            document_index,
            self.config.sequence_length,
            1,
            tokens_per_epoch,
            drop_last,
            self.config.add_extra_token_to_sequence,
        )
        num_samples = sample_index.shape[0] - 1
        dtype = np.uint32 if num_samples < np.iinfo(np.uint32).max - 1 else np.int64
        shuffle_index = np.arange(num_samples, dtype=dtype)
        if self.curriculum.order == "shuffle":
            # Plain shuffle also permutes samples (as megatron-core does), inside this epoch only.
            _rng(self.component_seed, self.epoch, 1).shuffle(shuffle_index)
        arrays = (document_index, sample_index, shuffle_index)
        os.makedirs(cache_dir, exist_ok=True)
        if not os.path.isfile(f"{base}-description.txt"):
            with atomic_path(f"{base}-description.txt") as tmp:
                tmp.write_text(self.unique_description)
        for path, array in zip(paths, arrays):
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
        logger.info(
            "%s epoch %d: %d documents, %d samples, order %s",
            self.name,
            self.epoch,
            len(document_index),
            num_samples,
            self.curriculum.order,
        )
        return tuple(np.load(p, mmap_mode="r") for p in paths)
