"""Spec -> components -> curriculum datasets -> scheduled blend, on a small synthetic corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_syne.data.components import resolve_spec
from megatron_syne.data.curriculum import CurriculumGPTDataset, curriculum_document_order
from megatron_syne.data.mixture_dataset import ComponentExhaustedError, ScheduledMixtureDataset
from megatron_syne.data.schedule import MixturePlan
from megatron_syne.data.spec import CurriculumSpec, parse_spec
from tests.data.corpus import decode_document, gpt_config

SEQ = 32


def _plan(corpus, text: str, gbs: int = 4) -> MixturePlan:
    spec = parse_spec(yaml.safe_load(text), "test.yaml")
    return MixturePlan(spec, resolve_spec(spec, corpus), SEQ, gbs)


def test_static_spec_matches_megatron_blended_dataset(corpus, tmp_path):
    plan = _plan(
        corpus,
        """
        sources: {book-zh: {path: book-zh}, web-en: {path: web-en}, code-en: {path: code-en}}
        stages:
          - {name: only, iterations: 25, groups: {zh: {ratio: 0.3, sources: {book-zh: 1.0}},
             en: {ratio: 0.7, sources: {web-en: 0.6, code-en: 0.4}}}}
        """,
    )
    config = gpt_config(SEQ, tmp_path / "cache")
    ours = ScheduledMixtureDataset(plan, config, tmp_path / "cache")
    weights = plan.planned_phase_weights()[0]
    ours.build_phase(weights)
    index = np.concatenate([np.asarray(ours._phase_arrays[0][0])])

    datasets = []
    for name in ("book-zh", "web-en", "code-en"):
        indexed = IndexedDataset(str(corpus / name))
        docs = np.arange(len(indexed.document_indices) - 1, dtype=np.int32)
        datasets.append(GPTDataset(indexed, str(corpus / name), docs, None, Split.train, config))
    # No cache path: megatron-core's BlendedDataset then builds without torch.distributed.
    config.path_to_cache = None
    reference = BlendedDataset(datasets, weights.tolist(), len(ours), config)
    counts = np.bincount(index, minlength=3)
    np.testing.assert_array_equal(counts, np.bincount(reference.dataset_index, minlength=3))
    np.testing.assert_array_equal(index, reference.dataset_index)
    assert len(ours) == 100 and counts.tolist() == [30, 42, 28]


def test_curriculum_is_monotone_in_ppl_across_buckets(corpus, tmp_path):
    plan = _plan(
        corpus,
        """
        sources:
          web-zh: {path: web-zh, split_by_topic: true,
                   curriculum: {order: ppl_ascending, buckets: [0.3, 0.6]}}
        stages: [{name: s, iterations: 2, groups: {zh: {ratio: 1, sources: {web-zh: 1}}}}]
        """,
    )
    component = plan.components[plan.component_index["web-zh/law"]]  # holds unscored doc 5
    indexed = IndexedDataset(component.prefix)
    dataset = CurriculumGPTDataset(
        indexed, component.prefix, component.train_documents, component.scores,
        plan.resolutions["web-zh"].spec.curriculum, seed=3, epoch=0, index_split=Split.train,
        config=gpt_config(SEQ, tmp_path / "cache"), name=component.name,
    )  # fmt: skip
    score_of = dict(zip(component.train_documents.tolist(), component.scores.tolist()))
    order = np.asarray(dataset.document_index)
    scores = np.array([score_of[d] for d in order])
    finite = scores[np.isfinite(scores)]
    cuts = np.quantile(finite, [0.3, 0.6])
    buckets = np.searchsorted(cuts, finite, side="right")
    assert (np.diff(buckets) >= 0).all()  # bucket order ascending
    assert len(set(buckets)) == 3
    assert not (np.diff(finite) >= 0).all()  # shuffled inside buckets
    assert order[-1] == 5 and not np.isfinite(scores[-1])  # the unscored document goes last
    # Samples are in curriculum order: sample j's first document comes no earlier than j-1's.
    first_docs = [
        int(dataset.sample_index[int(dataset.shuffle_index[j])][0]) for j in range(len(dataset))
    ]
    assert first_docs == sorted(first_docs)
    # Descending reverses the bucket order.
    desc = curriculum_document_order(
        component.train_documents, component.scores,
        CurriculumSpec(order="ppl_descending", buckets=(0.5,), shuffle="within_bucket"), 3,
    )  # fmt: skip
    desc_scores = np.array([score_of[d] for d in desc])
    median = np.median(desc_scores[np.isfinite(desc_scores)])
    half = np.isfinite(desc_scores).sum() // 2
    assert (desc_scores[:half] >= median).all()


def test_phases_carry_counters_and_nothing_repeats_before_exhaustion(corpus, tmp_path, monkeypatch):
    plan = _plan(
        corpus,
        """
        sources:
          web-en: {path: web-en, split_by_topic: true, valid_fraction: 0.1}
          code-en: {path: code-en, on_exhaustion: reshuffle}
        stages:
          - {name: a, iterations: 30, groups: {en: {ratio: 1, sources: {web-en: 0.5, code-en: 0.5}}}}
          - {name: b, iterations: 30, groups: {en: {ratio: 1, sources: {web-en: 0.2, code-en: 0.8}}}}
        mixer: {interval_tokens: 1280, eval_samples: 2}
        """,
    )
    ledger = tmp_path / "ledger.jsonl"
    dataset = ScheduledMixtureDataset(
        plan, gpt_config(SEQ, tmp_path / "cache"), tmp_path / "cache", ledger
    )
    rng = np.random.default_rng(0)
    for phase in plan.phases:  # arbitrary topic weights per phase, as the mixer would give
        share = rng.dirichlet([1, 1])
        topics = {"web-en/history": share[0], "web-en/science": share[1], "code-en": 1.0}
        dataset.build_phase(plan.weights_for(phase.stage, topics))
    assert len(plan.phases) == 6 and dataset.num_built_phases == 6
    code = plan.component_index["code-en"]
    per_epoch = dataset.components[code].samples_per_epoch
    # Sequential reads (the sampler's pattern) search for the phase only when it changes.
    import megatron_syne.data.mixture_dataset as module

    searches = []
    real_bisect = module.bisect.bisect_right
    monkeypatch.setattr(
        module.bisect, "bisect_right", lambda *a: searches.append(a[1]) or real_bisect(*a)
    )
    seen, documents = [], []
    for i in range(len(dataset)):
        component, k = dataset.locate(i)
        if component == code:
            seen.append(k)
            if k < 2 * per_epoch:
                documents.append(
                    (k // per_epoch, frozenset(decode_document(dataset[i]["tokens"], 4)))
                )
    assert len(searches) == len(plan.phases) - 1
    monkeypatch.undo()
    assert seen == list(range(len(seen)))  # counters carried across all phases
    assert len(seen) > per_epoch  # code-en is exhausted and repeats ...
    first = [d for e, d in documents if e == 0]
    second = [d for e, d in documents if e == 1]
    assert set().union(*first) == set(range(30))  # ... only after every document was seen
    assert first != second[: len(first)]  # reshuffled for the next epoch
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [r["phase"] for r in records] == list(range(6))
    tokens = sum(c["tokens"] for r in records for c in r["components"])
    assert tokens == len(dataset) * SEQ


def test_error_policy_stops_a_phase_that_would_repeat(corpus, tmp_path):
    plan = _plan(
        corpus,
        """
        sources: {code-en: {path: code-en, on_exhaustion: reshuffle}, book-zh: {path: book-zh}}
        stages: [{name: s, iterations: 40, groups: {all: {ratio: 1, sources: {code-en: 0.9, book-zh: 0.1}}}}]
        """,
    )
    object.__setattr__(plan.resolutions["code-en"].spec, "on_exhaustion", "error")
    dataset = ScheduledMixtureDataset(plan, gpt_config(SEQ, tmp_path / "cache"), tmp_path / "cache")
    with pytest.raises(ComponentExhaustedError, match="code-en.*on_exhaustion is error"):
        dataset.build_phase(plan.planned_phase_weights()[0])
