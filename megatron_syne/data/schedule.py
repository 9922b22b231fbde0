"""The mixture plan: components in a fixed order, stage and phase boundaries, phase weights.

Everything that decides which sample is trained when is a pure function of the spec, the data
(resolved components), ``seq_length``, ``global_batch_size`` and the mixer history: phases are
fixed in advance (in iterations), only the topic weights of each phase come from the mixer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from megatron_syne.data.components import Component, SourceResolution
from megatron_syne.data.spec import MixtureSpec, SpecError


@dataclass(frozen=True)
class Phase:
    """Iterations ``[start_iteration, end_iteration)`` of one stage with constant weights.

    ``measure``: the mixer measures per-topic validation loss (and updates) right before it.
    """

    index: int
    stage: int
    start_iteration: int
    end_iteration: int
    measure: bool

    def sample_range(self, global_batch_size: int) -> tuple[int, int]:
        return self.start_iteration * global_batch_size, self.end_iteration * global_batch_size


class MixturePlan:
    """Components, stages and phases of a resolved spec (units: iterations and samples)."""

    def __init__(
        self,
        spec: MixtureSpec,
        resolutions: Mapping[str, SourceResolution],
        seq_length: int,
        global_batch_size: int,
    ) -> None:
        for flag, value in (("seq_length", seq_length), ("global_batch_size", global_batch_size)):
            if isinstance(value, bool) or int(value) != value or value <= 0:
                raise ValueError(f"{flag} must be a positive whole number, got {value!r}")
        self.spec = spec
        self.resolutions = dict(resolutions)
        self.seq_length = int(seq_length)
        self.global_batch_size = int(global_batch_size)
        self.components: list[Component] = [
            c for r in self.resolutions.values() for c in r.components
        ]
        self.component_index = {c.name: i for i, c in enumerate(self.components)}
        self.stage_iterations = [
            s.iterations_for(self.seq_length, self.global_batch_size) for s in spec.stages
        ]
        self.stage_starts = [int(x) for x in np.cumsum([0, *self.stage_iterations[:-1]])]
        self.total_iterations = int(sum(self.stage_iterations))
        tokens_per_iteration = self.seq_length * self.global_batch_size
        self.interval_iterations = 0
        if spec.mixer is not None:
            self.interval_iterations = spec.mixer.interval_iterations or max(
                1, round(spec.mixer.interval_tokens / tokens_per_iteration)
            )
        self.phases = self._build_phases()
        self.mixer_groups = self._mixer_groups()
        for source, names in self.mixer_groups.items():
            if spec.mixer.floor * len(names) > 1:
                raise SpecError(
                    f"{spec.path}: mixer.floor: {spec.mixer.floor} x {len(names)} topics of "
                    f"{source} exceeds 1; lower the floor"
                )

    @property
    def samples_per_epoch(self) -> np.ndarray:
        """Samples in one pass over each component (last partial sample dropped)."""
        return np.array(
            [max(0, (c.train_tokens - 1) // self.seq_length) for c in self.components],
            dtype=np.int64,
        )

    @property
    def total_samples(self) -> int:
        return self.total_iterations * self.global_batch_size

    def _build_phases(self) -> list[Phase]:
        phases = []
        for s, stage in enumerate(self.spec.stages):
            start, length = self.stage_starts[s], self.stage_iterations[s]
            active = self.spec.mixer_active_in(stage.name)
            step = self.interval_iterations if active else length
            for offset in range(0, length, step):
                phases.append(
                    Phase(
                        index=len(phases),
                        stage=s,
                        start_iteration=start + offset,
                        end_iteration=start + min(offset + step, length),
                        measure=active,
                    )
                )
        return phases

    def _mixer_groups(self) -> dict[str, list[str]]:
        return mixer_groups(self.spec, self.resolutions)

    def initial_topic_weights(self) -> dict[str, float]:
        return {
            name: share
            for r in self.resolutions.values()
            for name, share in r.initial_topic_weights.items()
        }

    def phase_at_iteration(self, iteration: int) -> Phase:
        for phase in self.phases:
            if phase.start_iteration <= iteration < phase.end_iteration:
                return phase
        raise IndexError(f"iteration {iteration} is past the plan ({self.total_iterations})")

    def weights_for(self, stage: int, topic_weights: Mapping[str, float]) -> np.ndarray:
        """Sample share of every component in ``stage`` given topic shares inside sources."""
        source_weights = self.spec.stages[stage].source_weights()
        weights = np.zeros(len(self.components), dtype=np.float64)
        for i, c in enumerate(self.components):
            weights[i] = source_weights.get(c.source, 0.0) * topic_weights[c.name]
        return weights

    def topic_weights_at(self, iteration: int, history: Sequence[Mapping]) -> dict[str, float]:
        """Topic shares in effect for a phase starting at ``iteration`` given mixer history."""
        weights = self.initial_topic_weights()
        for record in history:
            if record["iteration"] <= iteration:
                weights.update(record["weights_after"])
        return weights

    def planned_phase_weights(self, history: Sequence[Mapping] = ()) -> np.ndarray:
        """``[phases, components]`` weights; without history: the initial (static) plan."""
        return np.stack(
            [
                self.weights_for(p.stage, self.topic_weights_at(p.start_iteration, history))
                for p in self.phases
            ]
        )

    def phase_bounds_samples(self) -> np.ndarray:
        return np.array(
            [p.start_iteration for p in self.phases] + [self.total_iterations], dtype=np.int64
        ) * np.int64(self.global_batch_size)

    def fingerprint(self) -> str:
        """Hash of the spec and the resolved data (component documents and sizes)."""
        digest = hashlib.sha256()
        digest.update(self.spec.fingerprint().encode())
        digest.update(json.dumps([self.seq_length, self.global_batch_size]).encode())
        for c in self.components:
            digest.update(c.name.encode())
            digest.update(c.prefix.encode())
            digest.update(np.ascontiguousarray(c.train_documents).tobytes())
            digest.update(str(c.train_tokens).encode())
            if c.scores is not None:
                digest.update(np.ascontiguousarray(c.scores).tobytes())
        return digest.hexdigest()[:16]

    def check_static_budget(self) -> list[str]:
        """Planned epochs per component under the initial weights; errors for 'error' policy.

        Returns warnings (components that will repeat); raises SpecError where repetition is
        forbidden (``on_exhaustion: error``) but the plan needs more than one epoch.
        """
        from megatron_syne.data.blending import build_phased_blending_indices

        _, _, counts = build_phased_blending_indices(
            self.phase_bounds_samples(), self.planned_phase_weights()
        )
        warnings = []
        per_epoch = self.samples_per_epoch
        for i, c in enumerate(self.components):
            if counts[i] <= per_epoch[i]:
                continue
            epochs = counts[i] / max(per_epoch[i], 1)
            message = (
                f"component {c.name}: the plan draws {int(counts[i])} samples "
                f"({int(counts[i]) * self.seq_length} tokens) but it has {int(per_epoch[i])} "
                f"per epoch ({epochs:.2f} epochs)"
            )
            policy = self.resolutions[c.source].spec.on_exhaustion
            if policy == "error":
                raise SpecError(
                    f"{self.spec.path}: sources.{c.source}.on_exhaustion: {message}, and "
                    "repetition is forbidden; lower the stage budget or its ratio, add data, or "
                    "set on_exhaustion: reshuffle / repeat"
                )
            warnings.append(f"{message}; it will repeat ({policy})")
        return warnings


def mixer_groups(
    spec: MixtureSpec, resolutions: Mapping[str, SourceResolution]
) -> dict[str, list[str]]:
    """The components whose weights the mixer adjusts, by source: sources split by topic,
    ``adjust: true``, used in a stage where the mixer runs, with more than one component."""
    if spec.mixer is None:
        return {}
    active_sources = {
        source
        for stage in spec.stages
        if spec.mixer_active_in(stage.name)
        for source in stage.source_weights()
    }
    groups = {}
    for name, resolution in resolutions.items():
        source = resolution.spec
        if name in active_sources and source.split_by_topic and source.adjust:
            if len(resolution.components) > 1:
                groups[name] = [c.name for c in resolution.components]
    return groups
