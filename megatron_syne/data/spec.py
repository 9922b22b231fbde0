"""The mixture spec: one YAML file that describes a whole continual pre-training run's data.

A spec has three parts (see ``docs/readme/mixture.md`` and ``examples/*/syne*.yaml``):

``sources``
    Named data sources. Each is one indexed dataset (``path``: a Megatron prefix, relative to
    ``--data-root``), optionally narrowed by metadata equality filters (``select``), optionally
    split into one *component* per topic (``split_by_topic``), with a curriculum that orders its
    documents and an on-exhaustion policy.
``stages``
    In order. Each has a budget (``tokens`` or ``iterations``), group ratios (e.g. zh 0.2,
    en 0.8) and source ratios inside each group.
``mixer``
    The online topic-weight adjustment rule of Llama-3-SynE (optional).

Every parse error names the file and the key path, e.g.
``syne.yaml: stages[1].groups.zh.sources: ratios sum to 0.97, expected 1``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_syne.utils.yaml_strict import YAMLInputError, load_yaml_file

RATIO_TOLERANCE = 1e-6

CURRICULUM_ORDERS = ("shuffle", "ppl_ascending", "ppl_descending", "sequential")
CURRICULUM_SHUFFLES = ("none", "within_bucket", "window")
EXHAUSTION_POLICIES = ("repeat", "reshuffle", "error")
MISSING_PPL_POLICIES = ("error", "last", "first")
TOPIC_WEIGHT_MODES = ("natural", "uniform")
DELTA_NORMALIZATIONS = ("relative", "absolute", "standardized")
SELECT_COLUMNS = ("lang", "source", "topic")
# Topic of the component that gathers a source's rare topics (see min_topic_documents).
OTHER_TOPIC = "other"


class SpecError(ValueError):
    """A mixture spec that cannot be used; the message names the file, the key and the fix."""


def _fail(where: str, message: str) -> SpecError:
    return SpecError(f"{where}: {message}")


@dataclass(frozen=True)
class CurriculumSpec:
    """How a component orders its documents within one epoch.

    ``order``: ``shuffle`` (random, Megatron's default), ``ppl_ascending`` (easy to hard),
    ``ppl_descending``, ``sequential`` (document order of the indexed dataset).
    ``buckets``: PPL quantile cut points in (0, 1), increasing (CCNet head/middle/tail is
    ``[0.3, 0.6]``); an integer ``k`` in the YAML means ``k`` equal-mass buckets. Empty: one
    fully sorted sequence.
    ``shuffle``: ``none`` (strictly sorted), ``within_bucket`` (random inside each bucket; the
    default when buckets are given), ``window`` (random inside consecutive windows of
    ``window`` documents of the sorted order).
    ``missing_ppl``: what to do with documents without a usable score (NaN, or ``ppl_status``
    not ``ok``): ``last`` (treated as hardest, the default), ``first``, ``error``.
    """

    order: str = "shuffle"
    buckets: tuple[float, ...] = ()
    shuffle: str = "none"
    window: int = 0
    ppl_column: str = "ppl"
    missing_ppl: str = "last"

    def __post_init__(self) -> None:
        if self.order not in CURRICULUM_ORDERS:
            raise ValueError(f"order: {self.order!r} is not one of {CURRICULUM_ORDERS}")
        if self.shuffle not in CURRICULUM_SHUFFLES:
            raise ValueError(f"shuffle: {self.shuffle!r} is not one of {CURRICULUM_SHUFFLES}")
        if self.missing_ppl not in MISSING_PPL_POLICIES:
            raise ValueError(
                f"missing_ppl: {self.missing_ppl!r} is not one of {MISSING_PPL_POLICIES}"
            )
        if any(not 0.0 < q < 1.0 for q in self.buckets) or list(self.buckets) != sorted(
            set(self.buckets)
        ):
            raise ValueError(
                f"buckets: {list(self.buckets)} must be strictly increasing quantiles in (0, 1)"
            )
        if self.shuffle == "window" and self.window < 2:
            raise ValueError("window: shuffle 'window' needs window >= 2 (documents)")
        if self.shuffle == "within_bucket" and not self.buckets:
            raise ValueError("shuffle: 'within_bucket' needs buckets (e.g. buckets: [0.3, 0.6])")
        if not self.uses_ppl and (self.buckets or self.shuffle != "none"):
            raise ValueError(f"buckets/shuffle only apply to ppl orders, not order {self.order!r}")

    @property
    def uses_ppl(self) -> bool:
        return self.order in ("ppl_ascending", "ppl_descending")


@dataclass(frozen=True)
class SourceSpec:
    """One data source: an indexed dataset prefix plus metadata filters, split and curriculum.

    ``valid_fraction`` of each component's documents (at least ``valid_min_documents``, at most
    ``valid_max_documents``) is held out, never trained on, and used as that component's
    validation set (the per-topic held-out sets of the method).

    ``min_topic_documents`` (documents; 0 = off): with ``split_by_topic``, topics with fewer
    selected documents than this are merged into one component ``<source>/other``. Real topic
    labels are long-tailed, and a topic of a handful of documents can give neither a held-out
    set nor a meaningful loss for the mixer.
    """

    name: str
    path: str
    select: tuple[tuple[str, tuple[str, ...]], ...] = ()
    split_by_topic: bool = False
    topics: tuple[str, ...] = ()
    topic_weights: str | tuple[tuple[str, float], ...] = "natural"
    curriculum: CurriculumSpec = field(default_factory=CurriculumSpec)
    on_exhaustion: str = "reshuffle"
    adjust: bool = True
    valid_fraction: float = 0.0
    valid_min_documents: int = 0
    valid_max_documents: int = 1000
    min_topic_documents: int = 0

    def __post_init__(self) -> None:
        if self.min_topic_documents < 0:
            raise ValueError(
                f"min_topic_documents: {self.min_topic_documents} must be >= 0 (0 = no merging)"
            )
        if self.min_topic_documents and not self.split_by_topic:
            raise ValueError("min_topic_documents needs split_by_topic: true")
        if self.on_exhaustion not in EXHAUSTION_POLICIES:
            raise ValueError(
                f"on_exhaustion: {self.on_exhaustion!r} is not one of {EXHAUSTION_POLICIES}"
            )
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction: {self.valid_fraction} must be in [0, 1)")
        if isinstance(self.topic_weights, str) and self.topic_weights not in TOPIC_WEIGHT_MODES:
            raise ValueError(
                f"topic_weights: {self.topic_weights!r} is not one of {TOPIC_WEIGHT_MODES} "
                "or a mapping topic -> weight"
            )
        if not self.split_by_topic and (self.topics or not isinstance(self.topic_weights, str)):
            raise ValueError("topics/topic_weights need split_by_topic: true")

    @property
    def select_dict(self) -> dict[str, tuple[str, ...]]:
        return dict(self.select)


@dataclass(frozen=True)
class GroupSpec:
    """A group (e.g. a language) with its share of the stage and its sources' shares."""

    name: str
    ratio: float
    sources: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class StageSpec:
    """A stage of training with a budget (tokens or iterations) and fixed group/source ratios."""

    name: str
    groups: tuple[GroupSpec, ...]
    tokens: int | None = None
    iterations: int | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.iterations is None):
            raise ValueError("give exactly one of tokens or iterations")

    def iterations_for(self, seq_length: int, global_batch_size: int) -> int:
        """Iterations (optimizer steps) of this stage; token budgets round to whole steps."""
        if self.iterations is not None:
            return self.iterations
        return max(1, round(self.tokens / (seq_length * global_batch_size)))

    def source_weights(self) -> dict[str, float]:
        """Share of every source in this stage (group ratio x source ratio), in samples."""
        weights: dict[str, float] = {}
        for group in self.groups:
            for source, ratio in group.sources:
                weights[source] = weights.get(source, 0.0) + group.ratio * ratio
        return weights


@dataclass(frozen=True)
class MixerSpec:
    """The online topic-weight rule: r_i <- r_i f_i / sum_j r_j f_j, f_i = 1 + alpha delta_i w_i.

    Defaults and why:
    - ``interval_tokens`` (or ``interval_iterations``): how often topic losses are measured and
      weights updated (tokens are rounded to whole iterations). No default: the paper adjusted
      between multi-billion-token rounds; a few percent of the stage is a sensible start.
    - ``alpha`` = 1.0: with ``relative`` deltas of a few percent, f_i moves weights by a few
      percent per update.
    - ``normalization`` = ``relative``: delta_i = (L_t - L_{t-1}) / L_{t-1} (scale-free across
      topics of different difficulty); ``absolute``: L_t - L_{t-1}; ``standardized``: the
      relative change divided by its standard deviation across the topics of the source.
    - ``importance``: per-topic w_i (default 1).
    - ``max_change`` = 0.02: no topic weight moves by more than 2 percentage points of its
      source per update (the same lab's later work kept phase changes within a few points).
    - ``floor`` = 0.01: no topic weight drops below 1% of its source.
    - ``eval_samples``: validation samples per topic per measurement.
    - ``stages``: names of stages in which the rule runs (default: all).
    """

    interval_tokens: int | None = None
    interval_iterations: int | None = None
    alpha: float = 1.0
    normalization: str = "relative"
    importance: tuple[tuple[str, float], ...] = ()
    max_change: float = 0.02
    floor: float = 0.01
    eval_samples: int = 16
    stages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.interval_tokens is None) == (self.interval_iterations is None):
            raise ValueError("give exactly one of interval_tokens or interval_iterations")
        if (self.interval_tokens or self.interval_iterations) <= 0:
            raise ValueError("the update interval must be > 0")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")
        if self.normalization not in DELTA_NORMALIZATIONS:
            raise ValueError(
                f"normalization: {self.normalization!r} is not one of {DELTA_NORMALIZATIONS}"
            )
        if not 0.0 < self.max_change <= 1.0:
            raise ValueError("max_change must be in (0, 1]")
        if not 0.0 <= self.floor < 1.0:
            raise ValueError("floor must be in [0, 1)")
        if self.eval_samples < 1:
            raise ValueError("eval_samples must be >= 1")
        if any(w < 0 for _, w in self.importance):
            raise ValueError("importance weights must be >= 0")

    def importance_of(self, topic: str) -> float:
        return dict(self.importance).get(topic, 1.0)


@dataclass(frozen=True)
class MixtureSpec:
    sources: tuple[SourceSpec, ...]
    stages: tuple[StageSpec, ...]
    mixer: MixerSpec | None = None
    seed: int = 1234
    path: str = "<memory>"
    # Where relative source paths live; relative to the spec file. --data-root overrides it.
    data_root: str | None = None

    def source(self, name: str) -> SourceSpec:
        for source in self.sources:
            if source.name == name:
                return source
        raise KeyError(name)

    def resolved_data_root(self, override: str | os.PathLike | None = None) -> Path:
        """``override`` (``--data-root``) if given, else ``data_root`` (relative to the spec
        file's directory), else the spec file's directory."""
        if override is not None:
            return Path(override)
        spec_dir = Path(self.path).resolve().parent
        return spec_dir / self.data_root if self.data_root else spec_dir

    def mixer_active_in(self, stage_name: str) -> bool:
        return self.mixer is not None and (not self.mixer.stages or stage_name in self.mixer.stages)

    def fingerprint(self) -> str:
        """Hash of everything in the spec that decides which sample is trained when."""
        payload = dataclasses.asdict(self)
        payload.pop("path")
        payload.pop("data_root")  # where the data lives does not change what is trained
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------- parsing


def _expect_mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(where, f"expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(data: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _number(value: Any, where: str, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _fail(where, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError as exc:
        raise _fail(where, f"expected a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise _fail(where, f"expected a finite number, got {value!r}")
    if integer:
        if number != int(number):
            raise _fail(where, f"expected a whole number, got {value!r}")
        return int(number)
    return number


def _ratios(data: Any, where: str, what: str) -> tuple[tuple[str, float], ...]:
    data = _expect_mapping(data, where)
    if not data:
        raise _fail(where, f"no {what} given")
    pairs = []
    for key, value in data.items():
        ratio = _number(value, f"{where}.{key}")
        if ratio < 0:
            raise _fail(f"{where}.{key}", f"ratio {ratio} is negative")
        pairs.append((str(key), float(ratio)))
    total = sum(r for _, r in pairs)
    if abs(total - 1.0) > RATIO_TOLERANCE:
        raise _fail(
            where,
            f"ratios sum to {total:.6g}, expected 1 (write them as fractions of 1, "
            "e.g. zh: 0.2, en: 0.8 for 2:8)",
        )
    return tuple(pairs)


def _wrap(where: str, build):
    try:
        return build()
    except ValueError as exc:
        if isinstance(exc, SpecError):
            raise
        raise _fail(where, str(exc)) from exc


def _parse_curriculum(data: Any, where: str) -> CurriculumSpec:
    if data is None:
        return CurriculumSpec()
    if isinstance(data, str):
        data = {"order": data}
    data = _expect_mapping(data, where)
    _check_keys(data, {f.name for f in dataclasses.fields(CurriculumSpec)}, where)
    kwargs = dict(data)
    buckets = kwargs.get("buckets", ())
    if isinstance(buckets, int) and not isinstance(buckets, bool):
        if buckets < 1:
            raise _fail(f"{where}.buckets", f"bucket count {buckets} must be >= 1")
        buckets = [i / buckets for i in range(1, buckets)]
    elif not isinstance(buckets, list | tuple):
        raise _fail(f"{where}.buckets", "expected a list of quantiles or a bucket count")
    kwargs["buckets"] = tuple(
        float(_number(q, f"{where}.buckets[{i}]")) for i, q in enumerate(buckets)
    )
    if "window" in kwargs:
        kwargs["window"] = _number(kwargs["window"], f"{where}.window", integer=True)
    if kwargs["buckets"] and "shuffle" not in kwargs:
        kwargs["shuffle"] = "within_bucket"
    return _wrap(where, lambda: CurriculumSpec(**kwargs))


def _parse_source(name: str, data: Any, where: str) -> SourceSpec:
    data = _expect_mapping(data, where)
    allowed = {f.name for f in dataclasses.fields(SourceSpec)} - {"name"}
    _check_keys(data, allowed, where)
    if "path" not in data:
        raise _fail(where, "missing 'path' (the dataset prefix, relative to --data-root)")
    kwargs: dict[str, Any] = {k: v for k, v in data.items() if k != "curriculum"}
    kwargs["path"] = str(data["path"])
    select = _expect_mapping(data.get("select", {}) or {}, f"{where}.select")
    pairs = []
    for column, values in select.items():
        if column not in SELECT_COLUMNS:
            raise _fail(f"{where}.select.{column}", f"can only select on {SELECT_COLUMNS}")
        values = values if isinstance(values, list) else [values]
        pairs.append((column, tuple(str(v) for v in values)))
    kwargs["select"] = tuple(pairs)
    kwargs["topics"] = tuple(str(t) for t in data.get("topics", ()) or ())
    weights = data.get("topic_weights", "natural")
    if isinstance(weights, dict):
        weights = _ratios(weights, f"{where}.topic_weights", "topic weights")
        named = {t for t, _ in weights}
        if data.get("min_topic_documents"):
            # A merged component is weighted by the name `other` (what the mixer writes back)
            # or by the sum of its topics' weights.
            if kwargs["topics"] and not named <= set(kwargs["topics"]) | {OTHER_TOPIC}:
                raise _fail(
                    f"{where}.topic_weights",
                    f"may only name the topics listed in topics, or {OTHER_TOPIC!r}",
                )
        elif kwargs["topics"] and set(kwargs["topics"]) != named:
            raise _fail(f"{where}.topic_weights", "must name exactly the topics listed in topics")
    kwargs["topic_weights"] = weights
    for key in ("valid_min_documents", "valid_max_documents", "min_topic_documents"):
        if key in kwargs:
            kwargs[key] = _number(kwargs[key], f"{where}.{key}", integer=True)
    if "valid_fraction" in kwargs:
        kwargs["valid_fraction"] = _number(kwargs["valid_fraction"], f"{where}.valid_fraction")
    curriculum = _parse_curriculum(data.get("curriculum"), f"{where}.curriculum")
    return _wrap(where, lambda: SourceSpec(name=name, curriculum=curriculum, **kwargs))


def _parse_stage(data: Any, where: str, source_names: set[str]) -> StageSpec:
    data = _expect_mapping(data, where)
    _check_keys(data, {"name", "tokens", "iterations", "groups"}, where)
    name = str(data.get("name", where))
    budget = {}
    for key in ("tokens", "iterations"):
        if data.get(key) is not None:
            budget[key] = _number(data[key], f"{where}.{key}", integer=True)
            if budget[key] <= 0:
                raise _fail(f"{where}.{key}", "must be > 0")
    groups_data = _expect_mapping(data.get("groups"), f"{where}.groups")
    group_ratios = _ratios(
        {g: _expect_mapping(v, f"{where}.groups.{g}").get("ratio") for g, v in groups_data.items()},
        f"{where}.groups",
        "groups",
    )
    groups = []
    seen: dict[str, str] = {}
    for (group_name, ratio), group_data in zip(group_ratios, groups_data.values()):
        gwhere = f"{where}.groups.{group_name}"
        _check_keys(group_data, {"ratio", "sources"}, gwhere)
        sources = _ratios(group_data.get("sources"), f"{gwhere}.sources", "sources")
        for source, _ in sources:
            if source not in source_names:
                raise _fail(
                    f"{gwhere}.sources.{source}",
                    f"unknown source; define it under 'sources' (known: {sorted(source_names)})",
                )
            if source in seen:
                raise _fail(f"{gwhere}.sources.{source}", f"already used in group {seen[source]}")
            seen[source] = group_name
        groups.append(GroupSpec(name=group_name, ratio=ratio, sources=sources))
    return _wrap(where, lambda: StageSpec(name=name, groups=tuple(groups), **budget))


def _parse_mixer(data: Any, where: str, stage_names: set[str]) -> MixerSpec:
    data = _expect_mapping(data, where)
    _check_keys(data, {f.name for f in dataclasses.fields(MixerSpec)}, where)
    if "interval_tokens" not in data and "interval_iterations" not in data:
        raise _fail(
            where, "missing 'interval_tokens' or 'interval_iterations' (between two updates)"
        )
    kwargs: dict[str, Any] = dict(data)
    for key in ("interval_tokens", "interval_iterations"):
        if key in data:
            kwargs[key] = _number(data[key], f"{where}.{key}", integer=True)
    for key in ("alpha", "max_change", "floor"):
        if key in kwargs:
            kwargs[key] = _number(kwargs[key], f"{where}.{key}")
    if "eval_samples" in kwargs:
        kwargs["eval_samples"] = _number(kwargs["eval_samples"], f"{where}.eval_samples", True)
    importance = _expect_mapping(data.get("importance", {}) or {}, f"{where}.importance")
    kwargs["importance"] = tuple(
        (str(k), float(_number(v, f"{where}.importance.{k}"))) for k, v in importance.items()
    )
    stages = tuple(str(s) for s in data.get("stages", ()) or ())
    for s in stages:
        if s not in stage_names:
            raise _fail(f"{where}.stages", f"unknown stage {s!r} (known: {sorted(stage_names)})")
    kwargs["stages"] = stages
    return _wrap(where, lambda: MixerSpec(**kwargs))


def parse_spec(data: Any, path: str = "<memory>") -> MixtureSpec:
    """Validate a parsed YAML document into a :class:`MixtureSpec` (raises :class:`SpecError`)."""
    try:
        data = _expect_mapping(data, "spec")
        _check_keys(
            data, {"seed", "sources", "stages", "mixer", "description", "data_root"}, "spec"
        )
        sources_data = _expect_mapping(data.get("sources"), "sources")
        if not sources_data:
            raise _fail("sources", "no sources defined")
        sources = tuple(_parse_source(str(n), d, f"sources.{n}") for n, d in sources_data.items())
        stages_data = data.get("stages")
        if not isinstance(stages_data, list) or not stages_data:
            raise _fail("stages", "expected a non-empty list of stages")
        names = {s.name for s in sources}
        stages = tuple(_parse_stage(d, f"stages[{i}]", names) for i, d in enumerate(stages_data))
        if len({s.name for s in stages}) != len(stages):
            raise _fail("stages", "stage names must be unique")
        mixer = None
        if data.get("mixer") is not None:
            mixer = _parse_mixer(data["mixer"], "mixer", {s.name for s in stages})
        seed = _number(data.get("seed", 1234), "seed", integer=True)
        data_root = data.get("data_root")
        return MixtureSpec(
            sources=sources,
            stages=stages,
            mixer=mixer,
            seed=seed,
            path=path,
            data_root=None if data_root is None else str(data_root),
        )
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


def load_spec(path: str | os.PathLike) -> MixtureSpec:
    """Read and validate a YAML mixture spec file."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"{path}: mixture spec not found")
    return parse_spec(read_spec_yaml(path), str(path))


def read_spec_yaml(path: str | os.PathLike) -> Any:
    """The parsed YAML of a spec file (not validated); a repeated key is an error naming the
    file, the line and the key, since YAML would silently keep only the last one."""
    try:
        return load_yaml_file(path, "mixture spec")
    except YAMLInputError as exc:
        raise SpecError(str(exc)) from None
