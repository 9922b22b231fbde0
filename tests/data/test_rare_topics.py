"""min_topic_documents: rare topics of a split source merge into one ``<source>/other`` component."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron_syne.data.components import resolve_spec
from megatron_syne.data.mixture_training import MixtureHook
from megatron_syne.data.planning import format_report, plan_report
from megatron_syne.data.schedule import MixturePlan
from megatron_syne.data.spec import SpecError, load_spec, parse_spec
from tests.data.corpus import write_source

REPO = Path(__file__).resolve().parents[2]

# A long-tailed topic distribution: two common topics, three rare ones, two unlabeled documents.
TOPIC_COUNTS = {"history": 30, "science": 20, "poetry": 3, "religion": 1, "chess": 2}


@pytest.fixture(scope="module")
def longtail(tmp_path_factory):
    root = tmp_path_factory.mktemp("longtail")
    topics: list[str | None] = [t for t, n in TOPIC_COUNTS.items() for _ in range(n)]
    topics += [None, None]
    rng = np.random.default_rng(3)
    order = rng.permutation(len(topics))  # interleave topics over document ids
    topics = [topics[i] for i in order]
    write_source(root / "news", "news", "zh", topics, rng.integers(20, 60, len(topics)).tolist())
    return root, np.array(topics, dtype=object)


def _spec_data(min_docs: int, **source) -> dict:
    news = {"path": "news", "split_by_topic": True, "topics": sorted(TOPIC_COUNTS), **source}
    if min_docs:
        news["min_topic_documents"] = min_docs
    return {
        "sources": {"news": news},
        "stages": [
            {"name": "s", "iterations": 8, "groups": {"zh": {"ratio": 1.0, "sources": {"news": 1}}}}
        ],
        "mixer": {"interval_iterations": 4},
    }


def _spec(min_docs: int, **source):
    return parse_spec(_spec_data(min_docs, **source), "rare.yaml")


def _documents(component) -> set[int]:
    return set(component.train_documents.tolist()) | set(component.valid_documents.tolist())


def _by_topic(resolution) -> dict[str, set[int]]:
    return {c.topic: _documents(c) for c in resolution.components}


def test_rare_topics_merge_below_the_threshold_only(longtail):
    root, topics = longtail
    plain = resolve_spec(_spec(0), root)["news"]
    assert sorted(_by_topic(plain)) == sorted(TOPIC_COUNTS)
    assert plain.merged_topics == {}

    # 3 is not below 3: poetry (3 documents) stays; religion (1) and chess (2) merge.
    merged = resolve_spec(_spec(3), root)["news"]
    assert [c.name for c in merged.components] == [
        "news/history",
        "news/poetry",
        "news/science",
        "news/other",
    ]
    assert merged.merged_topics == {"chess": 2, "religion": 1}
    other = merged.components[-1]
    assert other.merged_topics == ("chess", "religion")
    # Exactly the union of the merged topics' documents; the others are untouched.
    expected = set(np.flatnonzero((topics == "chess") | (topics == "religion")).tolist())
    assert _documents(other) == expected == _by_topic(plain)["chess"] | _by_topic(plain)["religion"]
    for topic in ("history", "poetry", "science"):
        assert _by_topic(merged)[topic] == _by_topic(plain)[topic]
    # Unlabeled documents keep their existing handling: excluded and counted, not merged.
    assert merged.excluded["topic missing (null)"] == 2
    assert not expected & set(np.flatnonzero(topics == None).tolist())  # noqa: E711

    # Above every rare count: poetry joins too; the common topics never merge.
    merged = resolve_spec(_spec(4), root)["news"]
    assert merged.merged_topics == {"chess": 2, "poetry": 3, "religion": 1}
    assert [c.topic for c in merged.components] == ["history", "science", "other"]
    assert len(_documents(merged.components[-1])) == 6


def test_counts_follow_the_topics_selection(longtail):
    root, _ = longtail
    # religion is not selected: it is excluded (counted), not merged.
    spec = _spec(5, topics=["history", "science", "poetry", "chess"])
    news = resolve_spec(spec, root)["news"]
    assert news.merged_topics == {"chess": 2, "poetry": 3}
    assert news.excluded["topic not listed"] == 1
    # The merged component is a topic component like the others: natural weight, held-out split.
    other = news.components[-1]
    assert other.name == "news/other"
    total = sum(c.train_tokens for c in news.components)
    assert news.initial_topic_weights["news/other"] == pytest.approx(other.train_tokens / total)


def test_nulls_without_a_topics_list_still_fail(longtail):
    root, _ = longtail
    data = {"sources": {"news": {"path": "news", "split_by_topic": True,
                                 "min_topic_documents": 5}},
            "stages": [{"name": "s", "iterations": 8,
                        "groups": {"zh": {"ratio": 1.0, "sources": {"news": 1}}}}]}  # fmt: skip
    spec = parse_spec(data, "rare.yaml")
    with pytest.raises(SpecError, match="2 selected documents have no topic"):
        resolve_spec(spec, root)


def test_explicit_topic_weights_cover_the_merged_component(longtail):
    root, _ = longtail
    weights = {"history": 0.4, "science": 0.3, "poetry": 0.1, "chess": 0.1, "religion": 0.1}
    news = resolve_spec(_spec(4, topic_weights=weights), root)["news"]
    assert news.initial_topic_weights == pytest.approx(
        {"news/history": 0.4, "news/science": 0.3, "news/other": 0.3}
    )
    # What the mixer writes back: a weight for `other` itself.
    weights = {"history": 0.5, "science": 0.3, "other": 0.2}
    news = resolve_spec(_spec(4, topic_weights=weights), root)["news"]
    assert news.initial_topic_weights["news/other"] == pytest.approx(0.2)
    with pytest.raises(SpecError, match="may only name the topics listed in topics, or 'other'"):
        _spec(4, topic_weights={"history": 0.5, "science": 0.3, "misc": 0.2})
    with pytest.raises(SpecError, match="min_topic_documents: -1 must be >= 0"):
        _spec(-1)
    with pytest.raises(SpecError, match="min_topic_documents needs split_by_topic"):
        parse_spec(
            {
                "sources": {"a": {"path": "news", "min_topic_documents": 3}},
                "stages": [
                    {
                        "name": "s",
                        "iterations": 1,
                        "groups": {"g": {"ratio": 1, "sources": {"a": 1}}},
                    }
                ],
            }
        )


def test_fingerprints_change_with_the_setting(longtail):
    root, _ = longtail
    specs = {m: _spec(m) for m in (0, 3, 4)}
    assert len({s.fingerprint() for s in specs.values()}) == 3
    plans = {m: MixturePlan(s, resolve_spec(s, root), 16, 2) for m, s in specs.items()}
    assert len({p.fingerprint() for p in plans.values()}) == 3
    # Same setting, same data: the same fingerprint (cached indices are reused).
    again = MixturePlan(_spec(3), resolve_spec(_spec(3), root), 16, 2)
    assert again.fingerprint() == plans[3].fingerprint()


def test_plan_report_names_the_merged_topics(longtail, tmp_path, capsys):
    root, _ = longtail
    spec = _spec(4)
    plan = MixturePlan(spec, resolve_spec(spec, root), 16, 2)
    report = plan_report(plan)
    assert report.merged_topics == {"news": (4, {"chess": 2, "poetry": 3, "religion": 1})}
    text = format_report(plan, report)
    assert (
        "merged into news/other: 3 topics with < 4 documents, 6 documents: "
        "chess (2), poetry (3), religion (1)" in text
    )
    assert "(3 merged topics)" in text

    module_spec = importlib.util.spec_from_file_location(
        "plan_tool", REPO / "tools/mixture/plan.py"
    )
    tool = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(tool)
    data = {**_spec_data(4), "data_root": str(root)}
    path = tmp_path / "rare.yaml"
    path.write_text(yaml.safe_dump(data))
    args = [str(path), "--seq-length", "16", "--global-batch-size", "2"]
    assert tool.main([*args, "--png", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "merged into news/other: 3 topics" in out
    assert "3 rare topics merged into <source>/other" in out


def test_too_small_merged_component_keeps_the_held_out_error(longtail):
    root, _ = longtail
    # Only religion (1 document) merges: news/other cannot hold a document out.
    spec = _spec(2, valid_min_documents=2)
    plan = MixturePlan(spec, resolve_spec(spec, root), 16, 2)
    other = plan.components[plan.component_index["news/other"]]
    assert len(other.valid_documents) == 0
    valid_sets = {c.name: c.valid_documents for c in plan.components if len(c.valid_documents)}
    with pytest.raises(SpecError, match=r"held-out documents for \['news/other'\]"):
        MixtureHook(plan, None, valid_sets)
    # With enough rare documents merged, every component gets a held-out set.
    spec = _spec(4, valid_min_documents=2)
    plan = MixturePlan(spec, resolve_spec(spec, root), 16, 2)
    assert all(len(c.valid_documents) == 2 for c in plan.components)


def test_demo_spec_merges_rare_topics():
    spec = load_spec(REPO / "examples/quickstart/syne_demo.yaml")
    assert spec.source("news-cn").min_topic_documents == 12
    assert spec.source("encyclopedia-en").min_topic_documents == 12


def test_update_keeps_the_topic_list_when_rare_topics_are_merged(longtail, tmp_path):
    """update.py's next-round spec must stay valid: "other" stands for the merged topics."""
    from megatron_syne.data.mixer import write_updated_spec

    root, _ = longtail
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({**_spec_data(5), "data_root": str(root)}))
    output = tmp_path / "next.yaml"
    write_updated_spec(
        spec_path, {"news/history": 0.5, "news/science": 0.3, "news/other": 0.2}, output
    )
    written = yaml.safe_load(output.read_text())["sources"]["news"]
    assert written["topics"] == sorted(TOPIC_COUNTS)
    assert written["topic_weights"] == {"history": 0.5, "science": 0.3, "other": 0.2}
    resolution = resolve_spec(load_spec(output), root)["news"]
    assert {c.topic for c in resolution.components} == {"history", "science", "other"}
