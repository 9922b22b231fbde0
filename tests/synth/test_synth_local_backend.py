"""The local transformers backend: a tiny random Llama with a tokenizer built here (no download)."""

from __future__ import annotations

import asyncio
import json

import pytest

from megatron_syne.synth.client import RequestFailed
from megatron_syne.synth.local_backend import LocalConfig, TransformersBackend
from megatron_syne.synth.pipeline import GenerationRun, RunConfig
from megatron_syne.synth.prompts import KeywordDisciplineClassifier
from megatron_syne.synth.science_qa import ScienceConfig, parse_science, read_seeds, science_items


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["Please gain inspiration from the following physics content.", "[Problem] [Solution]"]
    tok.train_from_iterator(corpus * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_local_backend_generates_and_flags_truncation(tiny_model_dir):
    backend = TransformersBackend(
        LocalConfig(str(tiny_model_dir), max_new_tokens=6, temperature=0.0)
    )

    async def go():
        try:
            msgs = [{"role": "user", "content": "What is the speed of light?"}]
            return await asyncio.gather(
                backend.complete(msgs), backend.complete(msgs, max_tokens=4)
            )
        finally:
            await backend.aclose()

    a, b = asyncio.run(go())
    # greedy decoding of a random model rarely emits EOS: the cap is what stops it
    assert a.completion_tokens <= 6 and b.completion_tokens <= 4
    assert a.finish_reason in ("length", "stop") and isinstance(a.text, str)
    if a.finish_reason == "length":
        assert a.truncated and a.completion_tokens == 6
    assert backend.generator_name == f"local:{tiny_model_dir.name}"
    assert backend.stats["completed"] == 2


def test_local_backend_refuses_prompts_longer_than_allowed(tiny_model_dir):
    backend = TransformersBackend(LocalConfig(str(tiny_model_dir), max_prompt_tokens=16))

    async def go():
        await backend.complete([{"role": "user", "content": "word " * 100}])

    with pytest.raises(RequestFailed) as info:
        asyncio.run(go())
    assert info.value.reason == "prompt_too_long" and not info.value.retryable


def test_science_pipeline_runs_on_the_local_backend(tiny_model_dir, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    text = "A pendulum of length L has period 2 pi sqrt(L/g); the energy and momentum of the mass"
    seeds.write_text(
        "".join(json.dumps({"id": f"s{i}", "text": f"{text} case {i}."}) + "\n" for i in range(3))
    )
    backend = TransformersBackend(LocalConfig(str(tiny_model_dir), max_new_tokens=8, batch_size=4))
    config = ScienceConfig(min_seed_chars=20)

    async def go():
        try:
            run = GenerationRun(
                RunConfig(out=tmp_path / "o.jsonl", workers=3, progress=False),
                backend,
                "science_qa",
                parse_science,
            )
            return await run.run(
                science_items(read_seeds(seeds, KeywordDisciplineClassifier(), config), run, config)
            )
        finally:
            await backend.aclose()

    summary = asyncio.run(go())
    # a random model writes no [Problem]/[Solution]: every item is rejected, with a reason
    assert summary["attempted"] == 3 and summary["accepted"] == 0
    assert sum(summary["rejected_by_reason"].values()) == 3
    assert set(summary["rejected_by_reason"]) <= {"truncated", "malformed"}
    assert summary["generator"].startswith("local:")
    rejects = [json.loads(x) for x in (tmp_path / "o.rejects.jsonl").read_text().splitlines()]
    assert {r["discipline"] for r in rejects} == {"physics"}
