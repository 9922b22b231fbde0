"""Glue between a mixture spec and the training loop: datasets, and the online mixer hook.

``build_mixture_datasets(args)`` is what the training loop calls for ``--data-config``. It
resolves the spec against the data, builds the per-component curriculum datasets, the
phase-scheduled training dataset, the per-topic held-out sets, and a :class:`MixtureHook` that

1. at every phase boundary of a stage where the mixer is active, measures each topic's
   validation loss (``state.evaluate``: forward only, DP/TP/PP aware, all ranks together);
2. on rank 0 applies the SynE rule, then broadcasts the mixer record so every rank holds the
   same weights;
3. builds the next phase of the blend (Stage I -> Stage II is just another phase) while the
   loop continues, without restarting the data iterator;
4. keeps the whole mixer history in its ``state_dict`` (saved in every checkpoint), from which
   a resumed run rebuilds exactly the same phases.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

from megatron_syne.data.components import resolve_spec
from megatron_syne.data.mixer import TopicMixer
from megatron_syne.data.mixture_dataset import (
    ConcatValidationDataset,
    ScheduledMixtureDataset,
    build_validation_dataset,
    rank0_first,
)
from megatron_syne.data.schedule import MixturePlan
from megatron_syne.data.spec import MixtureSpec, SpecError, load_spec
from megatron_syne.training.data import TokenizerInfo
from megatron_syne.training.hooks import TrainingHook

logger = logging.getLogger(__name__)

HOOK_NAME = "syne_mixture"


def resolve_data_root(spec: MixtureSpec, data_root: str | os.PathLike | None) -> Path:
    """``--data-root`` if given, else the spec's ``data_root`` (relative to the spec file),
    else the directory of the spec file."""
    return spec.resolved_data_root(data_root)


def plan_from_spec(
    spec_path: str | os.PathLike,
    data_root: str | os.PathLike | None,
    seq_length: int,
    global_batch_size: int,
) -> MixturePlan:
    """Load, validate and resolve a spec; raises SpecError for anything the data contradicts."""
    spec = load_spec(spec_path)
    resolutions = resolve_spec(spec, resolve_data_root(spec, data_root))
    return MixturePlan(spec, resolutions, seq_length, global_batch_size)


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _broadcast(obj):
    if not torch.distributed.is_initialized():
        return obj
    holder = [obj if _is_rank0() else None]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


class MixtureHook(TrainingHook):
    """The online mixer as a training hook (see the module docstring).

    Metrics it adds to ``state.metrics`` (TensorBoard): ``mixture/topic_loss/<component>`` at
    each measurement, ``mixture/weight/<component>`` (share of the blend in the current phase)
    and ``mixture/tokens/<component>`` (tokens consumed so far) at every log step.
    """

    name = HOOK_NAME

    def __init__(
        self,
        plan: MixturePlan,
        dataset: ScheduledMixtureDataset,
        valid_sets: dict,
        history_path: str | os.PathLike | None = None,
    ) -> None:
        self.plan = plan
        self.dataset = dataset
        self.valid_sets = valid_sets
        self.history_path = Path(history_path) if history_path else None
        self.mixer: TopicMixer | None = None
        if plan.mixer_groups:
            missing = [
                c for cs in plan.mixer_groups.values() for c in cs if valid_sets.get(c) is None
            ]
            if missing:
                sources = sorted({plan.components[plan.component_index[c]].source for c in missing})
                raise SpecError(
                    f"{plan.spec.path}: the mixer needs held-out documents for {missing}; set "
                    f"valid_fraction (e.g. 0.01) or valid_min_documents on sources {sources}"
                )
            topics = {c.name: c.topic for c in plan.components if c.topic is not None}
            self.mixer = TopicMixer(
                plan.spec.mixer, plan.mixer_groups, plan.initial_topic_weights(), topics
            )

    # -- checkpointed state ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "plan_fingerprint": self.plan.fingerprint(),
            "phases_built": self.dataset.num_built_phases,
            "mixer": None if self.mixer is None else self.mixer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("plan_fingerprint") != self.plan.fingerprint():
            raise SpecError(
                f"{self.plan.spec.path}: the checkpoint was trained with another mixture plan "
                f"(fingerprint {state.get('plan_fingerprint')} != {self.plan.fingerprint()}): "
                "the spec, the data, --seq-length or --global-batch-size changed. Resume with "
                "the original ones, or start a new run from the weights (--finetune)"
            )
        if self.mixer is not None and state.get("mixer") is not None:
            self.mixer.load_state_dict(state["mixer"])

    # -- loop callbacks -------------------------------------------------------------------------

    def on_train_start(self, state) -> None:
        # Rebuild every phase up to the current one from the (possibly restored) history.
        self.dataset.truncate(0)
        self._advance(state)
        self._log_metrics(state, force=True)

    def on_step_end(self, state) -> None:
        self._advance(state)
        self._log_metrics(state)

    def on_train_end(self, state) -> None:
        pass

    # -- internals ------------------------------------------------------------------------------

    @property
    def history(self) -> list[dict]:
        return [] if self.mixer is None else self.mixer.history

    def _measured_at(self, iteration: int) -> bool:
        return any(r["iteration"] == iteration for r in self.history)

    def _advance(self, state) -> None:
        iteration = state.iteration
        if iteration >= self.plan.total_iterations:
            return
        target = self.plan.phase_at_iteration(iteration).index
        while self.dataset.num_built_phases <= target:
            phase = self.plan.phases[self.dataset.num_built_phases]
            if (
                phase.measure
                and self.mixer is not None
                and not self._measured_at(phase.start_iteration)
            ):
                if phase.start_iteration != iteration:
                    raise RuntimeError(
                        f"mixer history has no measurement at iteration {phase.start_iteration} "
                        f"(phase {phase.index}) but training is at {iteration}; the checkpoint's "
                        "mixer state is incomplete"
                    )
                self._measure(state, phase)
            weights = self.plan.weights_for(
                phase.stage, self.plan.topic_weights_at(phase.start_iteration, self.history)
            )
            record = self.dataset.build_phase(weights)
            if _is_rank0():
                logger.info(
                    "mixture phase %d (stage %s, iterations %d-%d) built",
                    phase.index,
                    record["stage"],
                    phase.start_iteration,
                    phase.end_iteration,
                )

    def _measure(self, state, phase) -> None:
        spec = self.plan.spec.mixer
        losses = {
            c: float(state.evaluate(self.valid_sets[c], spec.eval_samples))
            for c in self.mixer.components
        }
        record = None
        if _is_rank0():
            record = self.mixer.observe(
                losses,
                iteration=state.iteration,
                consumed_samples=state.consumed_samples,
                consumed_tokens=state.consumed_tokens,
                stage=self.plan.spec.stages[phase.stage].name,
            )
        record = _broadcast(record)
        if not _is_rank0():
            self.mixer.weights = dict(record["weights_after"])
            self.mixer.last_losses = dict(record["losses"])
            self.mixer.history.append(record)
        for c, loss in record["losses"].items():
            state.metrics[f"mixture/topic_loss/{c}"] = loss
        if self.history_path is not None and _is_rank0():
            self.history_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.history_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def consumed_per_component(self, consumed_samples: int) -> np.ndarray:
        """Samples of each component consumed in global samples ``[0, consumed_samples)``."""
        bounds = self.plan.phase_bounds_samples()
        phase = int(np.searchsorted(bounds, consumed_samples, side="right") - 1)
        phase = min(phase, self.dataset.num_built_phases - 1)
        counts = self.dataset._counters[phase].copy()
        index, _ = self.dataset._phase_arrays[phase]
        offset = min(consumed_samples - int(bounds[phase]), len(index))
        counts += np.bincount(np.asarray(index[:offset]), minlength=len(counts))
        return counts

    def _log_metrics(self, state, force: bool = False) -> None:
        log_interval = getattr(state.args, "log_interval", 1) or 1
        if not force and state.iteration % log_interval:
            return
        if self.dataset.num_built_phases == 0:
            return
        phase = min(
            self.plan.phase_at_iteration(
                min(state.iteration, self.plan.total_iterations - 1)
            ).index,
            self.dataset.num_built_phases - 1,
        )
        weights = self.dataset.phase_weights(phase)
        counts = self.consumed_per_component(state.consumed_samples)
        for i, c in enumerate(self.plan.components):
            state.metrics[f"mixture/weight/{c.name}"] = float(weights[i])
            state.metrics[f"mixture/tokens/{c.name}"] = float(counts[i] * self.plan.seq_length)


def gpt_dataset_config(args, cache_dir: str | os.PathLike) -> GPTDatasetConfig:
    eod = args.eod_token_id
    if eod is None:
        eod = 128001 if args.preset.vocab_size > 128001 else args.preset.vocab_size - 1
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=None,
        split="1,0,0",
        path_to_cache=str(cache_dir),
        tokenizer=TokenizerInfo(vocab_size=args.preset.vocab_size, eod=eod),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )


def build_mixture_datasets(args):
    """Datasets and the mixer hook for ``--data-config`` (call on every rank).

    Uses ``args``: data_config, data_root (optional; default the spec's directory), seq_length,
    global_batch_size, seed, train_iters, data_cache_path, save, preset.vocab_size,
    eod_token_id. Returns a ``megatron_syne.training.data.TrainingData``.
    """
    from megatron_syne.training.data import TrainingData

    plan = plan_from_spec(
        args.data_config, getattr(args, "data_root", None), args.seq_length, args.global_batch_size
    )
    for warning in plan.check_static_budget():
        if _is_rank0():
            logger.warning("%s: %s", args.data_config, warning)
    if args.train_iters > plan.total_iterations:
        raise SpecError(
            f"{args.data_config}: --train-iters {args.train_iters} is longer than the spec's "
            f"stages ({plan.total_iterations} iterations of {args.global_batch_size} x "
            f"{args.seq_length} tokens); lower --train-iters or lengthen the last stage"
        )
    cache_dir = Path(
        args.data_cache_path
        or Path(plan.components[0].prefix).parent / "cache" / "SyneMixture_indices"
    )
    out_dir = Path(args.save) if args.save else cache_dir
    ledger = out_dir / f"data_ledger-{plan.fingerprint()}.jsonl"
    config = gpt_dataset_config(args, cache_dir)
    train = rank0_first(lambda: ScheduledMixtureDataset(plan, config, cache_dir, ledger))
    valid_sets = {}
    for comp, epochs in zip(plan.components, train.components):
        valid_sets[comp.name] = rank0_first(
            lambda c=comp, e=epochs: build_validation_dataset(c, e.indexed_dataset, config)
        )
    hook = MixtureHook(
        plan, train, valid_sets, history_path=out_dir / f"mixer_history-{plan.fingerprint()}.jsonl"
    )
    valid = ConcatValidationDataset([d for d in valid_sets.values() if d is not None])
    if _is_rank0():
        logger.info(
            "mixture %s: %d components, %d stages, %d phases, %d iterations (%.3g tokens)",
            args.data_config,
            len(plan.components),
            len(plan.spec.stages),
            len(plan.phases),
            plan.total_iterations,
            plan.total_iterations * args.global_batch_size * args.seq_length,
        )
    return TrainingData(train=train, valid=valid if len(valid) else None, test=None, hooks=[hook])


def summarize_history(history: list[dict]) -> str:
    """One line per measurement (for logs and tools)."""
    lines = []
    for r in history:
        worst = max(r["losses"], key=r["losses"].get) if r["losses"] else "-"
        lines.append(
            f"iteration {r['iteration']}: {len(r['losses'])} topics, updated={r['updated']}, "
            f"highest loss {worst} ({r['losses'].get(worst, math.nan):.4f})"
        )
    return "\n".join(lines)
