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
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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


# ------------------------------------------------------------------------ mixer history files

_HISTORY_FIX = "fix or delete that line (the online mixer writes one JSON object per measurement)"
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class MixerHistory:
    """A ``mixer_history-*.jsonl`` file: one record per measured iteration, in iteration order
    (where a resumed run measured an iteration again, the record written last counts), the line
    each record came from, and warnings (a torn last line that was skipped)."""

    path: str
    records: tuple[dict, ...]
    lines: tuple[int, ...]
    warnings: tuple[str, ...] = ()


def _check_history_record(record: object, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: expected a JSON object (one measurement), got {_json_type(record)}; "
            + _HISTORY_FIX
        )
    for key, kind, what in (
        ("iteration", int, "a whole number >= 0"),
        ("consumed_tokens", int, "a whole number >= 0"),
        ("updated", bool, "true or false"),
    ):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}; {_HISTORY_FIX}")
        value = record[key]
        ok = isinstance(value, bool) if kind is bool else _is_number(value) and value == int(value)
        if not ok or (kind is int and value < 0):
            raise ValueError(f"{where}: {key} must be {what}, got {value!r}; {_HISTORY_FIX}")
    for key in ("losses", "weights_after"):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}; {_HISTORY_FIX}")
        values = record[key]
        if not isinstance(values, dict) or not values:
            raise ValueError(
                f"{where}: {key} must be a non-empty object component -> number, got "
                f"{_json_type(values)}; {_HISTORY_FIX}"
            )
        for name, value in values.items():
            if not _is_number(value):
                raise ValueError(
                    f"{where}: {key}.{name} must be a number, got {value!r}; {_HISTORY_FIX}"
                )
    if set(record["losses"]) != set(record["weights_after"]):
        raise ValueError(
            f"{where}: losses and weights_after name different components "
            f"({sorted(set(record['losses']) ^ set(record['weights_after']))}); {_HISTORY_FIX}"
        )


def read_history(path: str | os.PathLike, what: str = "mixer history") -> MixerHistory:
    """Read and check a mixer history JSONL; every problem names the file and the line.

    A last line without a newline that is not valid JSON is what a run killed mid-write leaves:
    it is skipped, with a warning in :attr:`MixerHistory.warnings`. A bad line anywhere else is
    an error.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    chunks = raw.split(b"\n")
    warnings: list[str] = []
    by_iteration: dict[int, tuple[int, dict]] = {}
    components: set[str] | None = None
    first_line = 0
    for i, chunk in enumerate(chunks):
        if not chunk.strip():
            continue
        line, where = i + 1, f"{path}: line {i + 1}"
        try:
            record = json.loads(chunk.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = (
                f"not valid JSON at column {exc.colno}: {exc.msg}"
                if isinstance(exc, json.JSONDecodeError)
                else "not UTF-8 text"
            )
            if i == len(chunks) - 1:  # the last line, and no newline after it: torn write
                warnings.append(
                    f"{where}: skipped the incomplete last line ({problem}; it has no newline at "
                    "its end: the run writing the history was stopped mid-write)"
                )
                continue
            raise ValueError(f"{where}: {problem}; {_HISTORY_FIX}") from None
        _check_history_record(record, where)
        names = set(record["losses"])
        if components is None:
            components, first_line = names, line
        elif names != components:
            raise ValueError(
                f"{where}: components differ from those of line {first_line} "
                f"({sorted(names ^ components)}); a history holds the measurements of one run "
                f"of one spec: {_HISTORY_FIX}"
            )
        by_iteration[int(record["iteration"])] = (line, record)
    ordered = [by_iteration[k] for k in sorted(by_iteration)]
    return MixerHistory(
        path=str(path),
        records=tuple(r for _, r in ordered),
        lines=tuple(n for n, _ in ordered),
        warnings=tuple(warnings),
    )


# ------------------------------------------------------------------- offline (between rounds)


@dataclass(frozen=True)
class EvalResults:
    """Topic weights and the last two per-component losses of a run, with where each came
    from (``where``: ``weights``/``previous``/``current`` -> file, line and key, for errors)."""

    path: str
    weights: dict[str, float]
    previous: dict[str, float]
    current: dict[str, float]
    where: dict[str, str]
    warnings: tuple[str, ...] = ()


def _check_values(values: Mapping, where: str, loss: bool) -> dict[str, float]:
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected an object component -> number, got {values!r}")
    checked = {}
    for name, value in values.items():
        if not _is_number(value):
            raise ValueError(f"{where}.{name}: expected a number, got {value!r}")
        value = float(value)
        if loss and not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"{where}.{name}: loss {value!r} is not a finite positive number (nats/token): "
                "the measurement is unusable; fix the results, or use measurements with valid "
                "losses"
            )
        if not loss and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{where}.{name}: weight {value!r} must be a finite number >= 0")
        checked[str(name)] = value
    return checked


def load_eval_results(path: str | os.PathLike) -> EvalResults:
    """Weights and the previous and current losses, from a mixer history JSONL (its last two
    measurements, and its last weights) or a results JSON (``weights``, ``previous``,
    ``current``). Losses must be finite and > 0, weights finite and >= 0."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: results file not found")
    if path.suffix == ".jsonl":
        history = read_history(path, "results file")
        if len(history.records) < 2:
            raise ValueError(
                f"{path}: need at least two measurements, found {len(history.records)}"
            )
        (before, after), (line_before, line_after) = history.records[-2:], history.lines[-2:]
        where = {
            "weights": f"{path}: line {line_after}: weights_after",
            "previous": f"{path}: line {line_before}: losses",
            "current": f"{path}: line {line_after}: losses",
        }
        raw = {
            "weights": after["weights_after"],
            "previous": before["losses"],
            "current": after["losses"],
        }
        warnings = history.warnings
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}: line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(
                f"{path}: expected a JSON object with weights, previous, current; got "
                f"{_json_type(data)}"
            )
        missing = [k for k in ("weights", "previous", "current") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing} (need weights, previous, current)")
        unknown = sorted(set(data) - {"weights", "previous", "current"})
        if unknown:
            raise ValueError(
                f"{path}: unknown key(s) {unknown}; allowed: weights, previous, current"
            )
        where = {k: f"{path}: {k}" for k in ("weights", "previous", "current")}
        raw = {k: data[k] for k in where}
        warnings = ()
    # Losses first: a NaN loss measured online also makes the weights after it NaN.
    previous = _check_values(raw["previous"], where["previous"], loss=True)
    current = _check_values(raw["current"], where["current"], loss=True)
    return EvalResults(
        path=str(path),
        weights=_check_values(raw["weights"], where["weights"], loss=False),
        previous=previous,
        current=current,
        where=where,
        warnings=tuple(warnings),
    )


def _resolve_for_mixer(spec, data_root, what: str):
    """(resolutions, mixer groups) of a spec on its data; SpecError naming the data root."""
    from megatron_syne.data.components import resolve_spec
    from megatron_syne.data.metadata import MetadataError
    from megatron_syne.data.schedule import mixer_groups
    from megatron_syne.data.spec import SpecError

    # Normalised: the output's directory (a data root of ../data from it) may not exist yet.
    root = Path(os.path.normpath(spec.resolved_data_root(data_root)))
    try:
        resolutions = resolve_spec(spec, root)
    except (SpecError, MetadataError) as exc:
        raise SpecError(
            f"{exc} ({what} on its data, under {root}; pass --data-root if the data lives "
            "elsewhere)"
        ) from None
    return resolutions, mixer_groups(spec, resolutions)


def offline_update(
    spec_path: str | os.PathLike,
    results: EvalResults,
    data_root: str | os.PathLike | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Apply the spec's rule per source to its ``<source>/<topic>`` components.

    The spec is resolved on its data (``data_root``: as ``--data-root``) to know the components
    its mixer adjusts; the results must name exactly those. Returns ``(new_weights, rows)``: new
    weights by component, and one row per component.
    """
    from megatron_syne.data.spec import SpecError, load_spec

    spec = load_spec(spec_path)
    if spec.mixer is None:
        raise SpecError(f"{spec_path}: no mixer section: nothing defines the update rule")
    _, groups = _resolve_for_mixer(spec, data_root, "update.py resolves the spec")
    expected = {c for names in groups.values() for c in names}
    if not expected:
        raise SpecError(
            f"{spec_path}: the mixer adjusts no component (no source split by topic with "
            "adjust: true, in a mixer stage, with more than one topic): nothing to update"
        )
    for key in ("weights", "previous", "current"):
        given = set(getattr(results, key))
        unknown, missing = sorted(given - expected), sorted(expected - given)
        if unknown or missing:
            problems = []
            if unknown:
                problems.append(f"unknown component(s) {unknown}")
            if missing:
                problems.append(f"no value for component(s) {missing}")
            raise ValueError(
                f"{results.where[key]}: {' and '.join(problems)}; the mixer of {spec_path} "
                f"adjusts {sorted(expected)}. Use results of a run of this spec on this data "
                "(the same sources, topics and min_topic_documents), or fix the results file"
            )
    new_weights, rows = {}, []
    for source, names in groups.items():
        r = np.array([results.weights[n] for n in names], dtype=np.float64)
        if r.sum() <= 0:
            raise ValueError(
                f"{results.where['weights']}: the weights of {source}'s components sum to 0; "
                "give each topic its share (they are normalised per source)"
            )
        r = r / r.sum()
        previous = np.array([results.previous[n] for n in names])
        current = np.array([results.current[n] for n in names])
        new, delta, _ = syne_update(
            r,
            previous,
            current,
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
                    "previous": float(previous[i]),
                    "current": float(current[i]),
                    "delta": float(delta[i]),
                    "weight": float(r[i]),
                    "new_weight": float(new[i]),
                }
            )
    return new_weights, rows


def _relocated_data_root(spec, data: dict, output: Path, data_root=None) -> dict:
    """``data`` with ``data_root`` set so that relative source paths resolve from ``output``'s
    directory to the same data as from the original spec's (a spec's implicit data root is its
    own directory), or to ``data_root`` (``--data-root``) when given."""
    source_root = spec.resolved_data_root(data_root).resolve()
    out_dir = output.resolve().parent
    current = spec.data_root
    if (out_dir / current if current else out_dir).resolve() == source_root:
        return data
    try:
        new_root = os.path.relpath(source_root, out_dir)
    except ValueError:  # another drive (Windows)
        new_root = str(source_root)
    if "data_root" in data:
        return {**data, "data_root": new_root}
    relocated = {}
    for key, value in data.items():
        if key == "sources":
            relocated["data_root"] = new_root
        relocated[key] = value
    relocated.setdefault("data_root", new_root)
    return relocated


def write_updated_spec(
    spec_path: str | os.PathLike,
    new_weights: Mapping[str, float],
    output: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
) -> None:
    """Copy the spec YAML with ``topic_weights`` of the adjusted sources replaced.

    The copy's ``data_root`` is rewritten where needed so its relative source paths find the
    data (the original's, or ``data_root``: ``--data-root``) from the output's directory. The
    copy is checked as ``plan.py`` would (it must parse, and resolve on the data to the same
    mixer components) before it is written (atomically).
    """
    import yaml

    from megatron_syne.data.spec import SpecError, parse_spec, read_spec_yaml
    from megatron_syne.utils.io import atomic_open

    spec_path, output = Path(spec_path), Path(output)
    data = read_spec_yaml(spec_path)
    spec = parse_spec(data, str(spec_path))
    sources = data["sources"]
    by_source: dict[str, dict[str, float]] = {}
    for name, weight in new_weights.items():
        if "/" not in name:
            raise SpecError(f"{spec_path}: component {name!r} is not named <source>/<topic>")
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
    # The copy records where its data is (the original's root, or --data-root), so plan.py and
    # training find it from the output's directory without --data-root.
    data = _relocated_data_root(spec, data, output, data_root)
    what = f"the next round's spec for {output}"
    try:
        written = parse_spec(data, str(output))
    except SpecError as exc:
        raise SpecError(f"{exc} (in {what}; not written)") from None
    _, groups = _resolve_for_mixer(written, None, f"checking {what}")
    adjusted = {c for names in groups.values() for c in names}
    if not set(new_weights) <= adjusted:
        raise SpecError(
            f"{what}: components {sorted(set(new_weights) - adjusted)} would not be adjusted by "
            "its mixer on the data (not written)"
        )
    with atomic_open(output, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
