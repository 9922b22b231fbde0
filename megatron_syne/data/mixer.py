"""The Llama-3-SynE topic-weight rule and the mixer state that records its whole history.

    r_i(t) = r_i(t-1) f_i / sum_j r_j(t-1) f_j,   f_i = 1 + alpha delta_i w_i

delta_i is the normalised change of topic i's validation loss between the last two
measurements: topics whose loss went up (got worse) gain weight, topics that improved lose
weight. After the rule, each weight is kept within ``max_change`` of its previous value and at
or above ``floor``, by the exact Euclidean projection onto that box intersected with the simplex
(so the result still sums to 1 and moves as little as possible from the rule's output).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np

from megatron_syne.data.spec import MixerSpec

MIN_FACTOR = 1e-3  # f_i is kept positive so no weight is zeroed by one large improvement


def normalized_deltas(previous: np.ndarray, current: np.ndarray, normalization: str) -> np.ndarray:
    """delta_i from two loss measurements (``relative``, ``absolute`` or ``standardized``)."""
    previous = np.asarray(previous, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    if normalization == "absolute":
        return current - previous
    relative = (current - previous) / np.maximum(np.abs(previous), 1e-12)
    if normalization == "relative":
        return relative
    if normalization == "standardized":
        std = relative.std()
        return relative / std if std > 0 else np.zeros_like(relative)
    raise ValueError(f"unknown normalization {normalization!r}")


def project_box_simplex(target: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Closest point (Euclidean) to ``target`` with ``lower <= x <= upper`` and ``sum(x) = 1``.

    The solution is ``clip(target + lam, lower, upper)`` for the scalar ``lam`` that makes it
    sum to 1, found by bisection (the sum is monotone in ``lam``). Needs
    ``sum(lower) <= 1 <= sum(upper)``.
    """
    target, lower, upper = (np.asarray(a, dtype=np.float64) for a in (target, lower, upper))
    if lower.sum() > 1 + 1e-12 or upper.sum() < 1 - 1e-12:
        raise ValueError("infeasible bounds: need sum(lower) <= 1 <= sum(upper)")
    lo, hi = -1.0 - np.abs(target).max(), 1.0 + np.abs(target).max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.clip(target + mid, lower, upper).sum() < 1.0:
            lo = mid
        else:
            hi = mid
    x = np.clip(target + 0.5 * (lo + hi), lower, upper)
    return x / x.sum()


def syne_update(
    weights: np.ndarray,
    previous_loss: np.ndarray,
    current_loss: np.ndarray,
    alpha: float = 1.0,
    importance: np.ndarray | None = None,
    normalization: str = "relative",
    max_change: float = 1.0,
    floor: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One application of the rule to the topic weights of one source.

    Args:
        weights: current r (sums to 1).
        previous_loss, current_loss: per-topic validation loss (nats/token) at the last two
            measurements.
        alpha: step size; importance: per-topic w (default 1).
        max_change: largest allowed |r_new - r_old| per topic (fraction of the source).
        floor: smallest allowed r_new.

    Returns:
        ``(new_weights, delta, factor)``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if abs(weights.sum() - 1.0) > 1e-6 or (weights < 0).any():
        raise ValueError(f"weights must be a distribution, got {weights}")
    n = len(weights)
    if floor * n > 1.0:
        raise ValueError(f"floor {floor} x {n} topics exceeds 1")
    w = np.ones(n) if importance is None else np.asarray(importance, dtype=np.float64)
    delta = normalized_deltas(previous_loss, current_loss, normalization)
    factor = np.maximum(1.0 + alpha * delta * w, MIN_FACTOR)
    proposed = weights * factor / np.sum(weights * factor)
    upper = np.minimum(weights + max_change, 1.0)
    lower = np.minimum(np.maximum(weights - max_change, floor), upper)
    if lower.sum() > 1.0:
        # Several topics start below the floor: lift them as far as the budget allows.
        lower = lower * (1.0 / lower.sum())
    return project_box_simplex(proposed, lower, upper), delta, factor


class TopicMixer:
    """Topic weights per source, updated from per-topic validation losses, with full history.

    ``groups`` maps an adjustable source to its topic components (names); ``initial`` gives each
    component's starting share inside its source. The state (weights, last losses, every
    update) is a JSON-able dict, saved in checkpoints, from which the whole sequence of blend
    phases is rebuilt on resume.
    """

    def __init__(
        self,
        spec: MixerSpec,
        groups: Mapping[str, Sequence[str]],
        initial: Mapping[str, float],
        topics: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.groups = {g: list(c) for g, c in groups.items()}
        self.topics = dict(topics or {})
        self.initial = {c: float(initial[c]) for cs in self.groups.values() for c in cs}
        self.weights = dict(self.initial)
        self.last_losses: dict[str, float] | None = None
        self.history: list[dict] = []

    @property
    def components(self) -> list[str]:
        return [c for cs in self.groups.values() for c in cs]

    def observe(
        self,
        losses: Mapping[str, float],
        iteration: int,
        consumed_samples: int,
        consumed_tokens: int,
        stage: str,
        update: bool = True,
    ) -> dict:
        """Record one measurement; with a previous one (and ``update``), apply the rule.

        ``losses``: mean validation loss (nats/token) per component. Returns the history record.
        """
        missing = [c for c in self.components if c not in losses]
        if missing:
            raise ValueError(f"no validation loss for component(s) {missing}")
        before = dict(self.weights)
        record: dict = {
            "iteration": int(iteration),
            "consumed_samples": int(consumed_samples),
            "consumed_tokens": int(consumed_tokens),
            "stage": stage,
            "losses": {c: float(losses[c]) for c in self.components},
            "weights_before": before,
            "updated": False,
        }
        if self.last_losses is not None and update:
            record["deltas"], record["factors"] = {}, {}
            for cs in self.groups.values():
                if len(cs) < 2:
                    continue
                importance = np.array(
                    [self.spec.importance_of(self.topics.get(c, c)) for c in cs], dtype=np.float64
                )
                new, delta, factor = syne_update(
                    np.array([self.weights[c] for c in cs]),
                    np.array([self.last_losses[c] for c in cs]),
                    np.array([losses[c] for c in cs]),
                    alpha=self.spec.alpha,
                    importance=importance,
                    normalization=self.spec.normalization,
                    max_change=self.spec.max_change,
                    floor=self.spec.floor,
                )
                for i, c in enumerate(cs):
                    self.weights[c] = float(new[i])
                    record["deltas"][c] = float(delta[i])
                    record["factors"][c] = float(factor[i])
            record["updated"] = True
        record["weights_after"] = dict(self.weights)
        self.last_losses = {c: float(losses[c]) for c in self.components}
        self.history.append(record)
        return record

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "weights": dict(self.weights),
            "last_losses": None if self.last_losses is None else dict(self.last_losses),
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown mixer state version {state.get('version')!r}")
        unknown = set(state["weights"]) ^ set(self.weights)
        if unknown:
            raise ValueError(
                f"checkpointed mixer has components {sorted(unknown)} that do not match the spec's; "
                "resume with the spec the run started with"
            )
        self.weights = {c: float(v) for c, v in state["weights"].items()}
        last = state.get("last_losses")
        self.last_losses = None if last is None else {c: float(v) for c, v in last.items()}
        self.history = copy.deepcopy(list(state["history"]))


# ------------------------------------------------------------------- offline (between rounds)


def load_eval_results(path) -> tuple[dict, dict, dict]:
    """(weights, previous losses, current losses) from a mixer history JSONL or a results JSON."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: results file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        # A resumed run re-measures what came after its checkpoint: the last record counts.
        records = list({r["iteration"]: r for r in records}.values())
        records.sort(key=lambda r: r["iteration"])
        if len(records) < 2:
            raise ValueError(f"{path}: need at least two measurements, found {len(records)}")
        return (
            dict(records[-1]["weights_after"]),
            dict(records[-2]["losses"]),
            dict(records[-1]["losses"]),
        )
    data = json.loads(text)
    for key in ("weights", "previous", "current"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r} (need weights, previous, current)")
    return dict(data["weights"]), dict(data["previous"]), dict(data["current"])


def offline_update(spec_path, weights: Mapping, previous: Mapping, current: Mapping):
    """Apply the spec's rule per source to ``<source>/<topic>`` components.

    Returns ``(new_weights, rows)``: new weights by component, and one row per component.
    """
    from megatron_syne.data.spec import SpecError, load_spec

    spec = load_spec(spec_path)
    if spec.mixer is None:
        raise SpecError(f"{spec_path}: no mixer section: nothing defines the update rule")
    by_source: dict[str, list[str]] = {}
    for name in weights:
        if "/" not in name:
            raise ValueError(f"component {name!r} is not named <source>/<topic>")
        by_source.setdefault(name.split("/", 1)[0], []).append(name)
    new_weights, rows = {}, []
    for names in by_source.values():
        missing = [n for n in names if n not in previous or n not in current]
        if missing:
            raise ValueError(f"no previous/current loss for {missing}")
        r = np.array([weights[n] for n in names], dtype=np.float64)
        r = r / r.sum()
        new, delta, _ = syne_update(
            r,
            np.array([previous[n] for n in names]),
            np.array([current[n] for n in names]),
            alpha=spec.mixer.alpha,
            importance=np.array([spec.mixer.importance_of(n.split("/", 1)[1]) for n in names]),
            normalization=spec.mixer.normalization,
            max_change=spec.mixer.max_change,
            floor=spec.mixer.floor,
        )
        for i, n in enumerate(names):
            new_weights[n] = float(new[i])
            rows.append(
                {
                    "component": n,
                    "previous": float(previous[n]),
                    "current": float(current[n]),
                    "delta": float(delta[i]),
                    "weight": float(r[i]),
                    "new_weight": float(new[i]),
                }
            )
    return new_weights, rows


def write_updated_spec(spec_path, new_weights: Mapping[str, float], output) -> None:
    """Copy the spec YAML with ``topic_weights`` of the adjusted sources replaced."""
    import yaml

    from megatron_syne.data.spec import SpecError, parse_spec
    from megatron_syne.utils.io import atomic_open

    with open(spec_path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    sources = data.get("sources", {})
    by_source: dict[str, dict[str, float]] = {}
    for name, weight in new_weights.items():
        source, topic = name.split("/", 1)
        by_source.setdefault(source, {})[topic] = weight
    for source, topics in by_source.items():
        if source not in sources:
            raise SpecError(f"{spec_path}: results name source {source!r}, not in the spec")
        total = sum(topics.values())
        # Rounded for readability, then fixed up so they sum to exactly 1 again.
        rounded = {t: round(w / total, 6) for t, w in topics.items()}
        largest = max(rounded, key=rounded.get)
        rounded[largest] = round(rounded[largest] + 1.0 - sum(rounded.values()), 6)
        sources[source]["topic_weights"] = rounded
        merges_rare_topics = sources[source].get("min_topic_documents", 0) and "other" in rounded
        if sources[source].get("topics") and not merges_rare_topics:
            # With rare topics merged, "other" stands for several listed topics: keep the list.
            sources[source]["topics"] = list(rounded)
    parse_spec(data, str(output))  # the written spec must be valid
    with atomic_open(output, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
