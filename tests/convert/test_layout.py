"""Name/layout mapping, config parsing and the streaming safetensors writer (no model needed)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_syne.convert import layout as L
from megatron_syne.convert.arch import ConversionError, LlamaArch
from megatron_syne.convert.hf_checkpoint import (
    INDEX_NAME,
    HFCheckpointReader,
    StreamingSafetensorsWriter,
)
from megatron_syne.convert.megatron_to_hf import parse_size

LLAMA3_8B_CONFIG = {  # Meta-Llama-3-8B/config.json as released (legacy rope_theta field)
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}


def small_arch(**changes) -> LlamaArch:
    fields = dict(
        num_layers=2,
        hidden_size=12,
        ffn_hidden_size=20,
        num_attention_heads=6,
        num_query_groups=2,
        kv_channels=4,
        vocab_size=30,
        max_position_embeddings=64,
        rotary_base=500000.0,
        norm_epsilon=1e-5,
        untie_embeddings_and_output_weights=True,
        dtype="float32",
    )
    fields.update(changes)
    return LlamaArch(**fields)


def test_llama3_8b_config_matches_preset_and_parameter_count():
    from megatron_syne.models.presets import get_preset

    arch = LlamaArch.from_hf_config(LLAMA3_8B_CONFIG)
    arch.check_against_preset(get_preset("llama3-8b"))
    assert arch.num_parameters == 8_030_261_248
    assert arch.qkv_rows == (32 + 2 * 8) * 128
    with pytest.raises(ConversionError, match="num_layers: checkpoint 32, preset 80"):
        arch.check_against_preset(get_preset("llama3-70b"))


def test_transformers5_rope_parameters_are_read():
    config = dict(LLAMA3_8B_CONFIG)
    del config["rope_theta"], config["rope_scaling"]
    config["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    assert LlamaArch.from_hf_config(config).rotary_base == 500000.0


def test_fused_qkv_groups_query_heads_with_their_kv_head():
    arch = small_arch()
    h, d = arch.hidden_size, arch.kv_channels
    # Row r of each projection holds the value r (q), 100 + r (k), 200 + r (v).
    q = torch.arange(6 * d, dtype=torch.float32)[:, None].expand(-1, h).clone()
    k = 100 + torch.arange(2 * d, dtype=torch.float32)[:, None].expand(-1, h).clone()
    v = 200 + torch.arange(2 * d, dtype=torch.float32)[:, None].expand(-1, h).clone()
    fused = L.fuse_qkv(q, k, v, arch)
    rows = fused[:, 0].tolist()
    group0 = list(range(0, 12)) + [100, 101, 102, 103] + [200, 201, 202, 203]
    group1 = list(range(12, 24)) + [104, 105, 106, 107] + [204, 205, 206, 207]
    assert rows == group0 + group1
    assert all(torch.equal(a, b) for a, b in zip(L.split_qkv(fused, arch), (q, k, v)))


def test_gate_up_and_vocab_padding():
    gate, up = torch.randn(5, 3), torch.randn(5, 3)
    fc1 = L.fuse_gate_up(gate, up)
    assert torch.equal(fc1[:5], gate) and torch.equal(fc1[5:], up)
    back = L.split_gate_up(fc1)
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)
    padded = L.pad_vocab(torch.ones(30, 4), 32)
    assert padded.shape == (32, 4) and padded[30:].abs().sum() == 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}},
            "low_freq_factor=2.0",
        ),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"model_type": "mistral"}, "model_type is 'mistral'"),
        ({"num_key_value_heads": 5}, "not a multiple of num_query_groups=5"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    config = dict(LLAMA3_8B_CONFIG, **change)
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace("[", r"\[")):
        LlamaArch.from_hf_config(config, source="x/config.json")


def test_llama31_rope_scaling_is_accepted():
    config = dict(
        LLAMA3_8B_CONFIG,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    arch = LlamaArch.from_hf_config(config)
    assert arch.rope_scaling_factor == 8.0
    assert arch.to_hf_config()["rope_scaling"]["rope_type"] == "llama3"


@pytest.mark.parametrize("max_shard_bytes, single", [(10**9, True), (1500, False)])
def test_streaming_writer_output_reads_back(tmp_path, max_shard_bytes, single):
    arch = small_arch(dtype="bfloat16")
    shapes = L.hf_tensor_shapes(arch)
    tensors = {n: torch.randn(s).to(torch.bfloat16) for n, s in shapes.items()}
    entries = [(n, s, torch.bfloat16) for n, s in shapes.items()]
    writer = StreamingSafetensorsWriter(tmp_path, entries, max_shard_bytes)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.finish()
    files = sorted(tmp_path.glob("*.safetensors"))
    assert (len(files) == 1) == single
    for f in files:  # every shard within the limit (a header is a few hundred bytes)
        assert f.stat().st_size <= max_shard_bytes + 2048
    loaded = {}
    for f in files:
        loaded.update(load_file(f))
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    if not single:
        index = json.loads((tmp_path / INDEX_NAME).read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    reader = HFCheckpointReader(tmp_path)  # our own output is valid input
    assert reader.validate(shapes) == []


def test_streaming_writer_refuses_out_of_plan_tensor(tmp_path):
    writer = StreamingSafetensorsWriter(tmp_path, [("a", (2,), torch.float32)], 100)
    with pytest.raises(RuntimeError, match="out-of-plan tensor b"):
        writer.write("b", torch.zeros(2))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1GiB") == 2**30
    assert parse_size("500mb") == 500 * 10**6
    with pytest.raises(ConversionError):
        parse_size("lots")
