"""Training data: dataset construction and the order in which samples are consumed.

Seam for data features. The loop needs a *train dataset* indexed by global sample index
(``dataset[i]`` -> dict with "tokens", "labels", "loss_mask", "position_ids" as 1-D tensors of
``seq_length``, like megatron-core's ``GPTDataset``) and reads it in the order of Megatron's
pretraining sampler starting at ``consumed_samples`` (:func:`sample_indices_for_step`), one step
at a time and never ahead of the current step: a hook may change what ``dataset[i]`` returns for
samples not yet consumed (the online mixer does).

* ``--data-path`` (static Megatron blend) and ``--mock-data``: built here with megatron-core's
  ``BlendedMegatronDatasetBuilder`` (so a blend gives the same proportions as megatron-core).
* ``--data-config spec.yaml``: delegated to
  ``megatron_syne.data.mixture_training.build_mixture_datasets(args)``, which returns a
  :class:`TrainingData` (or a ``(train, valid, test)`` tuple); its ``hooks`` (e.g. the online
  mixer) join the loop and its ``eval_sets`` are evaluated at every ``--eval-interval``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from megatron_syne.training.hooks import TrainingHook


@dataclass
class TrainingData:
    """Datasets for one run. Sizes are in samples (sequences of ``seq_length`` tokens).

    ``valid``/``test`` may be None. ``eval_sets`` are extra named validation datasets (e.g. one
    per topic) whose loss is logged as ``eval/<name>`` at each evaluation. ``hooks`` are added to
    the loop's hooks (their state is checkpointed).
    """

    train: Any
    valid: Any = None
    test: Any = None
    eval_sets: dict[str, Any] = field(default_factory=dict)
    hooks: list[TrainingHook] = field(default_factory=list)


@dataclass(frozen=True)
class TokenizerInfo:
    """The two facts megatron-core's GPT datasets need from a tokenizer."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict:
        # Part of the dataset cache key (megatron-core hashes the config's description).
        return {"class": "TokenizerInfo", "vocab_size": self.vocab_size, "eod": self.eod}


def _check_prefixes(prefixes: list[str]) -> None:
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            path = prefix + suffix
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"--data-path: {path} does not exist; pass the prefix of a tokenized Megatron "
                    "dataset (without .bin/.idx), e.g. from tools/preprocess/"
                )


def dataset_sizes(args) -> list[int]:
    """Samples needed per split: the whole run's training, one fixed validation set."""
    train = args.train_iters * args.global_batch_size
    eval_samples = args.eval_iters * args.global_batch_size if args.eval_interval else 0
    return [train, eval_samples, eval_samples]


def build_train_valid_test_datasets(args) -> TrainingData:
    """Datasets for ``args`` (a :class:`~megatron_syne.training.arguments.TrainArgs`).

    Must be called on every rank (megatron-core builds index caches on rank 0 first).
    """
    if args.data_config is not None:
        from megatron_syne.data.mixture_training import build_mixture_datasets

        built = build_mixture_datasets(args)
        if isinstance(built, TrainingData):
            return built
        train, valid, test = built
        return TrainingData(train=train, valid=valid, test=test)

    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.core.datasets.utils import get_blend_from_list

    blend = None
    if args.data_path is not None:
        blend = get_blend_from_list(args.data_path)
        _check_prefixes(blend[0])
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=TokenizerInfo(vocab_size=args.preset.vocab_size, eod=args.eod_token_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    dataset_cls = MockGPTDataset if args.mock_data else GPTDataset
    train, valid, test = BlendedMegatronDatasetBuilder(
        dataset_cls, dataset_sizes(args), lambda: True, config
    ).build()
    return TrainingData(train=train, valid=valid, test=test)


def sample_indices_for_step(
    consumed_samples: int,
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
) -> list[list[int]]:
    """Global sample indices this DP rank trains on in the step starting at ``consumed_samples``.

    Returns one list of ``micro_batch_size`` indices per micro batch. Same order as
    megatron-core's ``MegatronPretrainingSampler``: micro batch m of the step covers samples
    ``consumed + m*mbs*dp + [0, mbs*dp)`` and DP rank r takes the r-th slice of ``mbs``.
    """
    per_micro = micro_batch_size * data_parallel_size
    num_micro = global_batch_size // per_micro
    out = []
    for m in range(num_micro):
        start = consumed_samples + m * per_micro + data_parallel_rank * micro_batch_size
        out.append(list(range(start, start + micro_batch_size)))
    return out


def collate(samples: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """Stack per-sample dicts into ``[mbs, seq]`` tensors on ``device``."""
    batch = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        values = [s[key] for s in samples]
        values = [torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in values]
        batch[key] = torch.stack(values).to(device, non_blocking=True)
    batch["tokens"] = batch["tokens"].long()
    batch["labels"] = batch["labels"].long()
    batch["position_ids"] = batch["position_ids"].long()
    batch["loss_mask"] = batch["loss_mask"].float()
    return batch


def micro_batches(dataset, index_lists: list[list[int]], device: torch.device, num_samples=None):
    """Iterator over collated micro batches. Indices >= ``num_samples`` (padding to a whole
    micro batch) are read from sample 0 with their loss mask zeroed."""
    for indices in index_lists:
        samples = []
        for i in indices:
            if num_samples is not None and i >= num_samples:
                sample = dict(dataset[0])
                sample["loss_mask"] = torch.zeros_like(torch.as_tensor(sample["loss_mask"]))
            else:
                sample = dataset[i]
            samples.append(sample)
        yield collate(samples, device)
