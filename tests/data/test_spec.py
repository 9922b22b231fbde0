"""Spec validation: the paper's specs parse; bad specs fail with the key path and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_syne.data.components import resolve_spec
from megatron_syne.data.schedule import MixturePlan
from megatron_syne.data.spec import SpecError, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]


def test_llama3_8b_spec_reproduces_the_paper():
    spec = load_spec(REPO / "examples/llama3_8b/syne.yaml")
    stage1, stage2 = spec.stages
    assert (stage1.tokens, stage2.tokens) == (92_500_000_000, 7_500_000_000)
    assert {g.name: g.ratio for g in stage1.groups} == {"zh": 0.2, "en": 0.8}
    assert {g.name: g.ratio for g in stage2.groups} == {"zh": 0.1, "en": 0.7, "synthetic": 0.2}
    zh = {"web-zh": 0.70, "encyclopedia-zh": 0.05, "book-zh": 0.20, "qa-zh": 0.05}
    en = {"web-en": 0.40, "encyclopedia-en": 0.05, "book-en": 0.15, "qa-en": 0.05,
          "paper-en": 0.10, "math-en": 0.10, "code-en": 0.15}  # fmt: skip
    for stage in spec.stages:
        groups = {g.name: dict(g.sources) for g in stage.groups}
        assert groups["zh"] == zh and groups["en"] == en
    assert spec.source("web-zh").curriculum.order == "ppl_ascending"
    assert spec.source("web-zh").curriculum.buckets == (0.3, 0.6)
    assert spec.mixer_active_in("bilingual_adaptation")
    assert not spec.mixer_active_in("synthetic_enhancement")
    # Stage I at 8192 x 256 tokens per step.
    assert stage1.iterations_for(8192, 256) == round(92.5e9 / (8192 * 256))


@pytest.mark.parametrize("name", ["tinyllama/syne.yaml", "quickstart/syne_demo.yaml"])
def test_other_example_specs_parse(name):
    spec = load_spec(REPO / "examples" / name)
    assert spec.stages[-1].source_weights()


BASE = {
    "sources": {"a": {"path": "web-zh"}, "b": {"path": "book-zh"}},
    "stages": [
        {
            "name": "s",
            "iterations": 4,
            "groups": {"zh": {"ratio": 1.0, "sources": {"a": 0.5, "b": 0.5}}},
        }
    ],
}


def _with(**changes):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for path, value in changes.items():
        node = data
        keys = path.split("__")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node[key]
        node[keys[-1]] = value
    return data


def test_ratios_that_do_not_sum_to_one_name_the_key():
    bad = _with(stages__0__groups__zh__sources={"a": 0.5, "b": 0.47})
    with pytest.raises(
        SpecError,
        match=r"x\.yaml: stages\[0\]\.groups\.zh\.sources: ratios sum to 0\.97, expected 1",
    ):
        parse_spec(bad, "x.yaml")
    bad = _with(stages__0__groups={"zh": {"ratio": 0.2, "sources": {"a": 1.0}}})
    with pytest.raises(SpecError, match=r"stages\[0\]\.groups: ratios sum to 0\.2"):
        parse_spec(bad, "x.yaml")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages__0__groups__zh__sources": {"a": 0.5, "zz": 0.5}}, r"sources\.zz: unknown source"),
        ({"sources__a__curriculum": {"order": "ppl_sideways"}}, r"sources\.a\.curriculum: order"),
        ({"sources__a__curriculum": {"order": "ppl_ascending", "buckets": [0.6, 0.3]}}, "buckets"),
        ({"sources__a__on_exhaustion": "loop"}, r"sources\.a: on_exhaustion"),
        ({"sources__a__colour": "red"}, r"sources\.a: unknown key\(s\) \['colour'\]"),
        ({"stages__0__tokens": 100}, "exactly one of tokens or iterations"),
        ({"mixer": {"alpha": 1.0}}, "interval_tokens"),
    ],
)
def test_structural_errors(change, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(_with(**change), "x.yaml")


def test_unknown_metadata_value(corpus):
    spec = parse_spec(_with(sources__a={"path": "web-zh", "select": {"lang": "fr"}}), "x.yaml")
    with pytest.raises(
        SpecError, match=r"sources\.a\.select\.lang: value\(s\) \['fr'\] do not occur"
    ):
        resolve_spec(spec, corpus)
    spec = parse_spec(
        _with(
            sources__a={"path": "web-zh", "split_by_topic": True, "topics": ["history", "alchemy"]}
        ),
        "x.yaml",
    )
    with pytest.raises(SpecError, match=r"topics: topic\(s\) \['alchemy'\] do not occur"):
        resolve_spec(spec, corpus)


def test_ppl_curriculum_on_data_without_ppl(corpus):
    spec = parse_spec(
        _with(sources__b={"path": "book-zh", "curriculum": {"order": "ppl_ascending"}}), "x.yaml"
    )
    with pytest.raises(
        SpecError, match=r"sources\.b\.curriculum: order ppl_ascending needs the 'ppl'"
    ):
        resolve_spec(spec, corpus)


def test_budget_larger_than_data_with_repetition_forbidden(corpus):
    # book-zh: 40 documents of 30..120 tokens, about 80 samples of 32 tokens; 100 iterations x 4
    # samples x 0.5 = 200 samples would repeat it.
    data = _with(
        stages__0__iterations=100, sources__b={"path": "book-zh", "on_exhaustion": "error"}
    )
    spec = parse_spec(data, "x.yaml")
    plan = MixturePlan(spec, resolve_spec(spec, corpus), 32, 4)
    with pytest.raises(
        SpecError,
        match=r"sources\.b\.on_exhaustion: component b: the plan draws 200 samples .* repetition is forbidden",
    ):
        plan.check_static_budget()
    data["sources"]["b"]["on_exhaustion"] = "reshuffle"
    spec = parse_spec(data, "x.yaml")
    warnings = MixturePlan(spec, resolve_spec(spec, corpus), 32, 4).check_static_budget()
    assert any("component b" in w and "will repeat (reshuffle)" in w for w in warnings)
