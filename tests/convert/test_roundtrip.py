"""HF -> Megatron -> HF on a tiny random Llama: same logits through megatron-core, same tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_syne.convert.hf_to_megatron import HFToMegatronConfig, convert_hf_to_megatron
from megatron_syne.convert.megatron_checkpoint import MegatronCheckpointReader, single_process_group
from megatron_syne.convert.megatron_to_hf import MegatronToHFConfig, convert_megatron_to_hf
from tests.convert._models import TOKENS_SHAPE, VOCAB, hf_logits, make_hf_llama, megatron_logits
from tests.helpers import run_torchrun

TOLERANCE = 1e-4


def _all_tensors(hf_dir):
    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    model = make_hf_llama(root / "hf")
    tokens = torch.randint(0, VOCAB, TOKENS_SHAPE, generator=torch.Generator().manual_seed(1))
    to_megatron = convert_hf_to_megatron(
        HFToMegatronConfig(
            hf_dir=root / "hf",
            save=root / "megatron",
            target_tensor_parallel_size=2,
            show_progress=False,
        )
    )
    to_hf = convert_megatron_to_hf(
        MegatronToHFConfig(
            load=root / "megatron",
            save=root / "hf_back",
            max_shard_size="30KB",
            show_progress=False,
        )
    )
    # Loaded here, before any test builds a Megatron model: the CPU compatibility layer that
    # building one enables breaks transformers' from_pretrained in the same process.
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(root / "hf_back", attn_implementation="eager")
    return {
        "root": root,
        "reloaded": reloaded.eval(),
        "model": model,
        "tokens": tokens,
        "to_megatron": to_megatron,
        "to_hf": to_hf,
    }


def test_hf_input_is_sharded_with_index(converted):
    hf_dir = converted["root"] / "hf"
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3


def test_megatron_checkpoint_layout(converted):
    root = converted["root"] / "megatron"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert (root / "iter_0000000" / "metadata.json").is_file()
    assert not list(root.glob("*.partial")) and not list(root.glob(".*scratch*"))
    with single_process_group():
        reader = MegatronCheckpointReader(root)
        emb = reader.read("embedding.word_embeddings.weight")
    # Vocabulary padded to lcm(128, TP=2) = 128 -> 256 rows; layers stacked on a leading axis.
    assert reader.global_shape("embedding.word_embeddings.weight") == (256, 64)
    assert reader.global_shape("decoder.layers.self_attention.linear_qkv.weight") == (3, 96, 64)
    assert reader.global_shape("decoder.layers.mlp.linear_fc1.weight") == (3, 192, 64)
    assert torch.count_nonzero(emb[VOCAB:]) == 0
    assert converted["to_megatron"].padded_vocab_size == 256


def test_megatron_logits_match_hf_tp1(converted):
    tokens = converted["tokens"]
    expected = hf_logits(converted["model"], tokens)
    got = megatron_logits(converted["root"] / "megatron", tokens)
    assert got.shape == (*TOKENS_SHAPE, 256)
    diff = (got[..., :VOCAB] - expected).abs().max().item()
    assert expected.abs().max() > 1.0  # logits of order one: a wrong mapping cannot hide
    assert diff < TOLERANCE, f"max abs logits diff {diff}"


def test_megatron_logits_match_hf_tp2(converted):
    root = converted["root"]
    torch.save(converted["tokens"], root / "tokens.pt")
    run_torchrun(
        [
            "tests/convert/tp_logits_worker.py",
            str(root / "megatron"),
            str(root / "tokens.pt"),
            str(root / "logits_tp2.pt"),
            "2",
        ],
        nproc=2,
        timeout=300,
    )
    got = torch.load(root / "logits_tp2.pt")
    expected = hf_logits(converted["model"], converted["tokens"])
    diff = (got[..., :VOCAB] - expected).abs().max().item()
    assert diff < TOLERANCE, f"TP=2 max abs logits diff {diff}"


def test_round_trip_is_bit_identical(converted):
    original = _all_tensors(converted["root"] / "hf")
    back = _all_tensors(converted["root"] / "hf_back")
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name


def test_hf_output_loads_in_transformers(converted):
    hf_back = converted["root"] / "hf_back"
    assert len(list(hf_back.glob("model-*.safetensors"))) > 1
    assert (hf_back / "model.safetensors.index.json").is_file()
    model = converted["reloaded"]
    assert model.config.num_key_value_heads == 2
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    tokens = converted["tokens"]
    assert torch.equal(hf_logits(model, tokens), hf_logits(converted["model"], tokens))
    generation = json.loads((hf_back / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_llama31_rope_scaling_end_to_end(tmp_path):
    """Llama-3.1 ("llama3") RoPE scaling is carried through and changes the logits as in HF."""
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    model = make_hf_llama(tmp_path / "hf", seed=3, rope_scaling=scaling, num_hidden_layers=1)
    convert_hf_to_megatron(
        HFToMegatronConfig(hf_dir=tmp_path / "hf", save=tmp_path / "mg", show_progress=False)
    )
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    expected = hf_logits(model, tokens)
    got = megatron_logits(tmp_path / "mg", tokens)[..., :VOCAB]
    assert (got - expected).abs().max().item() < TOLERANCE
    convert_megatron_to_hf(
        MegatronToHFConfig(load=tmp_path / "mg", save=tmp_path / "back", show_progress=False)
    )
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert config["rope_scaling"]["factor"] == 8.0
