"""Resolve a mixture spec against the data: sources -> per-topic components with documents.

A *component* is the unit the blend draws from: a whole source, or one topic of a source that
is ``split_by_topic``. Its documents are selected from the source's indexed dataset by the
metadata sidecar (``lang``, ``source``, ``topic``); a fraction is held out as its validation set.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from megatron_syne.data.curriculum import stable_key
from megatron_syne.data.metadata import MetadataError, read_metadata
from megatron_syne.data.spec import OTHER_TOPIC, MixtureSpec, SourceSpec, SpecError

logger = logging.getLogger(__name__)


@dataclass
class Component:
    """Documents of one blend component (document ids index the source's IndexedDataset)."""

    name: str
    source: str
    topic: str | None
    prefix: str
    train_documents: np.ndarray
    valid_documents: np.ndarray
    train_tokens: int
    valid_tokens: int
    scores: np.ndarray | None = None  # PPL aligned with train_documents (NaN = missing)
    missing_scores: int = 0
    # Topics merged into this component (``<source>/other``, min_topic_documents), sorted.
    merged_topics: tuple[str, ...] = ()

    @property
    def seed_key(self) -> int:
        return stable_key(self.name)


@dataclass
class SourceResolution:
    """What a source resolved to, with the documents it did not use and why."""

    spec: SourceSpec
    components: list[Component]
    total_documents: int
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> documents
    # Share of each component inside its source before any adjustment.
    initial_topic_weights: dict[str, float] = field(default_factory=dict)
    # Topics merged into ``<source>/other`` (min_topic_documents) -> their selected documents.
    merged_topics: dict[str, int] = field(default_factory=dict)


def component_name(source: str, topic: str | None) -> str:
    return source if topic is None else f"{source}/{topic}"


def _resolve_prefix(path: str, data_root: str | os.PathLike | None) -> str:
    if os.path.isabs(path) or data_root is None:
        return str(path)
    return str(Path(data_root) / path)


def _holdout(
    documents: np.ndarray, source: SourceSpec, seed: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    n = len(documents)
    if source.valid_fraction <= 0 and source.valid_min_documents <= 0:
        return documents, documents[:0]
    n_valid = round(n * source.valid_fraction)
    n_valid = max(n_valid, source.valid_min_documents)
    n_valid = min(n_valid, source.valid_max_documents, n - 1)
    if n_valid <= 0:
        return documents, documents[:0]
    rng = np.random.default_rng(np.random.SeedSequence([seed, stable_key(name), 7]))
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=n_valid, replace=False)] = True
    return documents[~mask], documents[mask]


def resolve_source(
    source: SourceSpec, spec: MixtureSpec, data_root: str | os.PathLike | None
) -> SourceResolution:
    """Select documents, split into components, hold out validation documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    where = f"{spec.path}: sources.{source.name}"
    prefix = _resolve_prefix(source.path, data_root)
    try:
        meta = read_metadata(prefix)
    except MetadataError as exc:
        raise SpecError(f"{where}: {exc}") from None
    columns = set(meta.column_names)
    # Copied while the IndexedDataset lives: its __del__ closes the memory map under the view.
    indexed = IndexedDataset(prefix, mmap=True)
    sizes = np.array(indexed.sequence_lengths, dtype=np.int64)
    del indexed
    n_docs = meta.num_rows
    keep = np.ones(n_docs, dtype=bool)
    excluded: dict[str, int] = {}
    for column, values in source.select:
        if column not in columns:
            raise SpecError(f"{where}.select.{column}: the metadata of {prefix} has no {column}")
        present = set(pc.unique(meta.column(column)).to_pylist())
        unknown = [v for v in values if v not in present]
        if unknown:
            raise SpecError(
                f"{where}.select.{column}: value(s) {unknown} do not occur in {prefix} "
                f"(present: {sorted(str(p) for p in present if p is not None)})"
            )
        match = np.asarray(
            pc.fill_null(pc.is_in(meta.column(column), value_set=_string_array(values)), False)
        )
        excluded[f"{column} not in {list(values)}"] = int((keep & ~match).sum())
        keep &= match
    if not keep.any():
        raise SpecError(f"{where}: no documents left after select {source.select_dict}")

    topics_col = None
    if source.split_by_topic:
        if "topic" not in columns:
            raise SpecError(f"{where}: split_by_topic needs a topic column; run tools/topics/")
        topics_col = meta.column("topic")
        unlabeled = keep & np.asarray(pc.is_null(topics_col))
        present = sorted(
            t for t in pc.unique(topics_col.filter(pa.array(keep))).to_pylist() if t is not None
        )
        if source.topics:
            unknown = [t for t in source.topics if t not in present]
            if unknown:
                raise SpecError(
                    f"{where}.topics: topic(s) {unknown} do not occur in {prefix} "
                    f"(present: {present})"
                )
            listed = np.asarray(
                pc.fill_null(pc.is_in(topics_col, value_set=_string_array(source.topics)), False)
            )
            excluded["topic not listed"] = int((keep & ~listed & ~unlabeled).sum())
            excluded["topic missing (null)"] = int(unlabeled.sum())
            keep &= listed
            topics = list(source.topics)
        else:
            if unlabeled.any():
                raise SpecError(
                    f"{where}: {int(unlabeled.sum())} selected documents have no topic; label them "
                    "with tools/topics/, or list the topics to train (unlisted ones are excluded "
                    "and counted)"
                )
            topics = present
    else:
        topics = [None]

    # topic -> topics whose documents form its component; rare ones share one component.
    members: dict[str | None, tuple[str, ...]] = {t: (t,) for t in topics if t is not None}
    merged: dict[str, int] = {}
    if source.min_topic_documents > 0:
        # Counted on the selected documents, after the `topics:` selection (nulls are gone).
        counts = pc.value_counts(topics_col.filter(pa.array(keep))).to_pylist()
        count = {c["values"]: c["counts"] for c in counts if c["values"] is not None}
        rare = {t for t in topics if count.get(t, 0) < source.min_topic_documents}
        if rare:
            # A real topic named `other` would collide with the merged component: it joins it.
            if OTHER_TOPIC in topics:
                rare.add(OTHER_TOPIC)
            merged = {t: int(count.get(t, 0)) for t in sorted(rare)}
            kept = [t for t in topics if t not in merged]
            topics = kept + [OTHER_TOPIC]
            members = {t: (t,) for t in kept}
            members[OTHER_TOPIC] = tuple(merged)
            logger.info(
                "%s: %d topics with < %d documents merged into %s (%d documents): %s",
                where,
                len(merged),
                source.min_topic_documents,
                component_name(source.name, OTHER_TOPIC),
                sum(merged.values()),
                ", ".join(f"{t} ({n})" for t, n in merged.items()),
            )

    scores = None
    if source.curriculum.uses_ppl:
        column = source.curriculum.ppl_column
        if column not in columns:
            raise SpecError(
                f"{where}.curriculum: order {source.curriculum.order} needs the '{column}' "
                f"metadata column, which {prefix} does not have; score it with tools/ppl/"
            )
        scores = np.asarray(
            pc.fill_null(meta.column(column).cast(pa.float64()), float("nan")), dtype=np.float64
        ).copy()
        if "ppl_status" in columns:
            ok = np.asarray(pc.fill_null(pc.equal(meta.column("ppl_status"), "ok"), False))
            scores[~ok] = np.nan

    components = []
    all_ids = np.arange(n_docs, dtype=np.int32)
    for topic in topics:
        mask = (
            keep
            if topic is None
            else keep
            & np.asarray(
                pc.fill_null(pc.is_in(topics_col, value_set=_string_array(members[topic])), False)
            )
        )
        documents = all_ids[mask]
        name = component_name(source.name, topic)
        if len(documents) == 0:
            raise SpecError(f"{where}: component {name} has no documents")
        train, valid = _holdout(documents, source, spec.seed, name)
        component_scores = None
        missing = 0
        if scores is not None:
            component_scores = scores[train]
            missing = int((~np.isfinite(component_scores)).sum())
            if missing == len(train):
                raise SpecError(
                    f"{where}: component {name}: none of its {len(train)} documents has a PPL "
                    "score but the curriculum orders by PPL; score them with tools/ppl/"
                )
            if missing and source.curriculum.missing_ppl == "error":
                raise SpecError(
                    f"{where}: component {name}: {missing} of {len(train)} documents have no PPL "
                    "score; score them or set curriculum.missing_ppl: last"
                )
        components.append(
            Component(
                name=name,
                source=source.name,
                topic=topic,
                prefix=prefix,
                train_documents=train,
                valid_documents=valid,
                train_tokens=int(sizes[train].sum(dtype=np.int64)),
                valid_tokens=int(sizes[valid].sum(dtype=np.int64)),
                scores=component_scores,
                missing_scores=missing,
                merged_topics=members[topic] if topic == OTHER_TOPIC and merged else (),
            )
        )
    resolution = SourceResolution(source, components, n_docs, excluded, merged_topics=merged)
    resolution.initial_topic_weights = _initial_topic_weights(source, components, where)
    return resolution


def _string_array(values):
    return pa.array([str(v) for v in values], type=pa.string())


def _initial_topic_weights(
    source: SourceSpec, components: list[Component], where: str
) -> dict[str, float]:
    if not source.split_by_topic:
        return {components[0].name: 1.0}
    if isinstance(source.topic_weights, tuple):
        given = dict(source.topic_weights)
        weights = {}
        for c in components:
            # A merged component carries its own weight (`other`, as the mixer writes it back)
            # plus the weights given to the topics it absorbed.
            parts = {c.topic, *c.merged_topics}
            if not parts & set(given):
                raise SpecError(
                    f"{where}.topic_weights: no weight for component {c.name}; "
                    f"give one for {sorted(parts)}"
                )
            weights[c.name] = sum(given.get(t, 0.0) for t in parts)
        return weights
    if source.topic_weights == "uniform":
        return {c.name: 1.0 / len(components) for c in components}
    total = sum(c.train_tokens for c in components)
    return {c.name: c.train_tokens / total for c in components}


def resolve_spec(
    spec: MixtureSpec, data_root: str | os.PathLike | None
) -> dict[str, SourceResolution]:
    """Resolve every source that some stage uses, in spec order."""
    used = {s for stage in spec.stages for s in stage.source_weights()}
    return {s.name: resolve_source(s, spec, data_root) for s in spec.sources if s.name in used}
