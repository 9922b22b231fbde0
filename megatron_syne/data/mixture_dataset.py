"""The training dataset of a mixture run: a phase-scheduled blend of curriculum components.

Global sample ``i`` (the index Megatron's pretraining sampler asks for) maps to a phase, then to
``(component, component sample k)`` through that phase's blending arrays (built by
:func:`megatron_syne.data.blending.build_phased_blending_indices`, cached on disk under a hash of
everything that determines them, memory-mapped), then to epoch ``k // samples_per_epoch`` of the
component. Phases are built one at a time as training reaches them (their weights may come from
the online mixer); per-component counters carry across phases.

Lookups cost two array reads plus a phase check that is O(1) for sequential access (the
sampler's pattern), whatever the number of phases.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_syne.data.blending import build_phased_blending_indices
from megatron_syne.data.components import Component
from megatron_syne.data.curriculum import CurriculumError, CurriculumGPTDataset
from megatron_syne.data.schedule import MixturePlan
from megatron_syne.data.spec import CurriculumSpec
from megatron_syne.utils.io import atomic_path

logger = logging.getLogger(__name__)


class ComponentExhaustedError(RuntimeError):
    """A component with ``on_exhaustion: error`` would have to repeat."""


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def rank0_first(build):
    """Run ``build`` on rank 0 (it writes caches), then on the other ranks (cache hits)."""
    result = build() if _is_rank0() else None
    _barrier()
    if not _is_rank0():
        result = build()
    return result


class ComponentEpochs:
    """A component's samples across epochs: epoch e is a CurriculumGPTDataset (lazily built)."""

    def __init__(
        self,
        component: Component,
        indexed_dataset: IndexedDataset,
        curriculum: CurriculumSpec,
        on_exhaustion: str,
        seed: int,
        config: GPTDatasetConfig,
    ) -> None:
        self.component = component
        self.indexed_dataset = indexed_dataset
        self.curriculum = curriculum
        self.on_exhaustion = on_exhaustion
        self.seed = seed
        self.config = config
        self._epochs: dict[int, CurriculumGPTDataset] = {}
        self.samples_per_epoch = len(self.epoch(0))

    def _dataset_epoch(self, epoch: int) -> int:
        return 0 if self.on_exhaustion == "repeat" else epoch

    def epoch(self, epoch: int) -> CurriculumGPTDataset:
        key = self._dataset_epoch(epoch)
        if key not in self._epochs:
            self._epochs[key] = CurriculumGPTDataset(
                self.indexed_dataset,
                self.component.prefix,
                self.component.train_documents,
                self.component.scores,
                self.curriculum,
                seed=self.seed,
                epoch=key,
                index_split=Split.train,
                config=self.config,
                name=self.component.name,
            )
        return self._epochs[key]

    def locate(self, k: int) -> tuple[int, int]:
        return divmod(int(k), self.samples_per_epoch)

    def __getitem__(self, k: int) -> dict:
        epoch, j = self.locate(k)
        if epoch > 0 and self.on_exhaustion == "error":
            raise ComponentExhaustedError(
                f"{self.component.name}: sample {k} is past its {self.samples_per_epoch} samples "
                "and on_exhaustion is error"
            )
        return self.epoch(epoch)[j]


class ScheduledMixtureDataset(torch.utils.data.Dataset):
    """The training dataset: ``len()`` is the whole plan in samples; phases are built on demand.

    Args:
        plan: the mixture plan.
        config: megatron-core GPTDatasetConfig (sequence_length, tokenizer, cache path...).
        cache_dir: where phase indices are cached (default: ``config.path_to_cache``).
        ledger_path: JSONL file that gets one record per built phase (rank 0 writes it).
    """

    def __init__(
        self,
        plan: MixturePlan,
        config: GPTDatasetConfig,
        cache_dir: str | os.PathLike,
        ledger_path: str | os.PathLike | None = None,
    ) -> None:
        self.plan = plan
        self.config = config
        self.cache_dir = Path(cache_dir)
        self.ledger_path = Path(ledger_path) if ledger_path else None
        self.fingerprint = plan.fingerprint()
        indexed = {}
        self.components: list[ComponentEpochs] = []
        for c in plan.components:
            if c.prefix not in indexed:
                indexed[c.prefix] = IndexedDataset(c.prefix, mmap=config.mmap_bin_files)
            source = plan.resolutions[c.source].spec
            self.components.append(
                ComponentEpochs(
                    c,
                    indexed[c.prefix],
                    source.curriculum,
                    source.on_exhaustion,
                    seed=plan.spec.seed * 1_000_003 + c.seed_key,
                    config=config,
                )
            )
        self._bounds = plan.phase_bounds_samples()
        self._phase_arrays: list[tuple[np.ndarray, np.ndarray]] = []
        self._phase_weights: list[np.ndarray] = []
        self._counters: list[np.ndarray] = [np.zeros(len(self.components), dtype=np.int64)]
        self._last = 0

    # ------------------------------------------------------------------ phases

    @property
    def num_built_phases(self) -> int:
        return len(self._phase_arrays)

    @property
    def counters(self) -> np.ndarray:
        """Samples drawn so far from each component, over all built phases."""
        return self._counters[-1].copy()

    def phase_weights(self, phase: int) -> np.ndarray:
        return self._phase_weights[phase].copy()

    def truncate(self, num_phases: int) -> None:
        """Forget phases from ``num_phases`` on (used when resuming from a checkpoint)."""
        del self._phase_arrays[num_phases:]
        del self._phase_weights[num_phases:]
        del self._counters[num_phases + 1 :]
        self._last = 0

    def _phase_hash(self, phase: int, weights: np.ndarray, counters: np.ndarray) -> str:
        digest = hashlib.sha256()
        digest.update(self.fingerprint.encode())
        digest.update(self._bounds[phase : phase + 2].tobytes())
        digest.update(np.ascontiguousarray(weights, dtype=np.float64).tobytes())
        digest.update(counters.tobytes())
        return digest.hexdigest()[:24]

    def build_phase(self, weights: np.ndarray) -> dict:
        """Build the next phase with component ``weights`` (collective when distributed).

        Returns the phase's ledger record.
        """
        phase = self.num_built_phases
        if phase >= len(self.plan.phases):
            raise IndexError(f"all {len(self.plan.phases)} phases are already built")
        weights = np.asarray(weights, dtype=np.float64)
        counters = self._counters[-1]
        key = self._phase_hash(phase, weights, counters)
        base = self.cache_dir / f"{key}-MixturePhase{phase:05d}"
        paths = (Path(f"{base}-dataset_index.npy"), Path(f"{base}-dataset_sample_index.npy"))

        def build():
            if not all(p.exists() for p in paths):
                index, sample_index, _ = build_phased_blending_indices(
                    self._bounds[phase : phase + 2], weights[None, :], counters
                )
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                for path, array in zip(paths, (index, sample_index)):
                    with atomic_path(path) as tmp, open(tmp, "wb") as f:
                        np.save(f, array, allow_pickle=False)
            return tuple(np.load(p, mmap_mode="r") for p in paths)

        index, sample_index = rank0_first(build)
        drawn = np.bincount(index, minlength=len(self.components)).astype(np.int64)
        after = counters + drawn
        self._check_exhaustion(phase, counters, after)
        self._phase_arrays.append((index, sample_index))
        self._phase_weights.append(weights)
        self._counters.append(after)
        record = self._ledger_record(phase, key, weights, counters, after)
        if self.ledger_path is not None and _is_rank0():
            self._append_ledger(record)
        return record

    def _check_exhaustion(self, phase: int, before: np.ndarray, after: np.ndarray) -> None:
        p = self.plan.phases[phase]
        for i, comp in enumerate(self.components):
            n = comp.samples_per_epoch
            if after[i] <= max(before[i], n):
                continue  # nothing drawn, or still inside the first epoch
            touched = range(int(before[i]) // n, (int(after[i]) - 1) // n + 1)
            if comp.on_exhaustion == "error":
                raise ComponentExhaustedError(
                    f"{comp.component.name}: phase {phase} (stage "
                    f"{self.plan.spec.stages[p.stage].name}, iterations {p.start_iteration}-"
                    f"{p.end_iteration}) needs samples up to {int(after[i])} but the component "
                    f"has {n} per epoch and on_exhaustion is error; add data, lower its weight, "
                    "or allow repeat / reshuffle"
                )
            for epoch in touched:
                if epoch >= 1 and epoch * n >= before[i]:
                    logger.warning(
                        "%s exhausted after %d samples: epoch %d starts in phase %d (%s)",
                        comp.component.name,
                        epoch * n,
                        epoch,
                        phase,
                        comp.on_exhaustion,
                    )
                rank0_first(lambda e=epoch, c=comp: c.epoch(e))

    def _ledger_record(self, phase, key, weights, before, after) -> dict:
        p = self.plan.phases[phase]
        start, end = (int(x) for x in self._bounds[phase : phase + 2])
        components = []
        for i, comp in enumerate(self.components):
            if after[i] == before[i]:
                continue
            entry = {
                "component": comp.component.name,
                "weight": float(weights[i]),
                "samples": [int(before[i]), int(after[i])],
                "tokens": int(after[i] - before[i]) * self.plan.seq_length,
                "epochs": [],
            }
            k = int(before[i])
            while k < after[i]:
                epoch, j = comp.locate(k)
                stop = min(int(after[i]), (epoch + 1) * comp.samples_per_epoch)
                entry["epochs"].append(self._document_range(comp, epoch, j, j + stop - k - 1))
                k = stop
            components.append(entry)
        return {
            "phase": phase,
            "phase_hash": key,
            "stage": self.plan.spec.stages[p.stage].name,
            "iterations": [p.start_iteration, p.end_iteration],
            "global_samples": [start, end],
            "tokens": (end - start) * self.plan.seq_length,
            "components": components,
        }

    @staticmethod
    def _document_range(comp: ComponentEpochs, epoch: int, first: int, last: int) -> dict:
        dataset = comp.epoch(epoch)
        entry = {"epoch": epoch, "epoch_samples": [first, last + 1]}
        if comp.curriculum.order == "shuffle":
            entry["documents"] = "shuffled (see the epoch's document_index in the cache)"
            return entry
        begin = int(dataset.sample_index[int(dataset.shuffle_index[first])][0])
        end = int(dataset.sample_index[int(dataset.shuffle_index[last]) + 1][0])
        entry["document_positions"] = [begin, end]
        entry["document_ids"] = [
            int(dataset.document_index[begin]),
            int(dataset.document_index[min(end, len(dataset.document_index) - 1)]),
        ]
        return entry

    def _append_ledger(self, record: dict) -> None:
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        if self.ledger_path.exists():
            with open(self.ledger_path, encoding="utf-8") as f:
                for line in f:
                    old = json.loads(line)
                    if (
                        old.get("phase") == record["phase"]
                        and old.get("phase_hash") == record["phase_hash"]
                    ):
                        return  # rebuilt on resume: already recorded
        with open(self.ledger_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return self.plan.total_samples

    def locate(self, idx: int) -> tuple[int, int]:
        """Global sample -> (component id, component sample)."""
        phase = self._last
        if not self._bounds[phase] <= idx < self._bounds[phase + 1]:
            phase = bisect.bisect_right(self._bounds, idx) - 1
            if not 0 <= phase < len(self.plan.phases):
                raise IndexError(f"sample {idx} is outside the plan (0..{len(self) - 1})")
            self._last = phase
        if phase >= len(self._phase_arrays):
            raise IndexError(
                f"sample {idx} is in phase {phase}, which is not built yet (built: "
                f"{len(self._phase_arrays)}); the data iterator ran ahead of the mixer"
            )
        index, sample_index = self._phase_arrays[phase]
        offset = idx - int(self._bounds[phase])
        return int(index[offset]), int(sample_index[offset])

    def __getitem__(self, idx: int) -> dict:
        component, k = self.locate(int(idx))
        return {"dataset_id": component, **self.components[component][k]}


class ConcatValidationDataset(torch.utils.data.Dataset):
    """Held-out documents of several components, one after another (for the regular eval)."""

    def __init__(self, datasets: list[torch.utils.data.Dataset]) -> None:
        self.datasets = [d for d in datasets if len(d) > 0]
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, idx: int) -> dict:
        d = int(np.searchsorted(self.offsets, idx, side="right") - 1)
        return self.datasets[d][int(idx - self.offsets[d])]


def build_validation_dataset(
    component: Component, indexed_dataset: IndexedDataset, config: GPTDatasetConfig
) -> CurriculumGPTDataset | None:
    """The held-out set of a component in document order, or None when it has none."""
    if len(component.valid_documents) == 0:
        return None
    tokens = int(indexed_dataset.sequence_lengths[component.valid_documents].sum())
    if tokens <= config.sequence_length + int(config.add_extra_token_to_sequence):
        raise CurriculumError(
            f"{component.name}: its {len(component.valid_documents)} held-out documents have "
            f"{tokens} tokens, less than one sample of {config.sequence_length}; raise "
            f"valid_fraction or valid_min_documents of source {component.source}"
        )
    return CurriculumGPTDataset(
        indexed_dataset,
        component.prefix,
        component.valid_documents,
        None,
        CurriculumSpec(order="sequential"),
        seed=0,
        epoch=0,
        index_split=Split.valid,
        config=config,
        name=f"{component.name} (valid)",
    )
