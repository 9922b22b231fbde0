"""Published shapes of the presets (pure Python, no model built)."""

from __future__ import annotations

import pytest

from megatron_syne.models.llama3 import padded_vocab_size
from megatron_syne.models.presets import PRESETS, get_preset


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("llama3-8b", 8_030_261_248),
        ("llama3-70b", 70_553_706_496),
        ("tinyllama-1.1b", 1_100_048_384),
        ("llama3-1b", 1_235_814_400),
    ],
)
def test_published_parameter_counts(name, parameters):
    assert get_preset(name).num_parameters == parameters


def test_llama3_8b_shape():
    p = get_preset("llama3-8b")
    assert (p.num_layers, p.hidden_size, p.ffn_hidden_size) == (32, 4096, 14336)
    assert (p.num_attention_heads, p.num_query_groups, p.kv_channels) == (32, 8, 128)
    assert (p.vocab_size, p.rotary_base, p.norm_epsilon) == (128256, 500000.0, 1e-5)
    assert p.untie_embeddings_and_output_weights and p.seq_length == 8192


def test_unknown_preset_and_bad_overrides():
    with pytest.raises(ValueError, match=r"unknown model preset 'llama4'; choose one of"):
        get_preset("llama4")
    with pytest.raises(ValueError, match="not a multiple of num_query_groups"):
        PRESETS["tiny"].replace(num_query_groups=3)
    with pytest.raises(ValueError, match="unknown ModelPreset field"):
        PRESETS["tiny"].replace(num_heads=3)


def test_vocab_padding_does_not_depend_on_tp():
    for tp in (1, 2, 4, 8):
        assert padded_vocab_size(128256, 128, tp) == 128256
        assert padded_vocab_size(32000, 128, tp) == 32000
    assert padded_vocab_size(500, 128, 2) == 512
    assert padded_vocab_size(512, 128, 3) == 768  # lcm(128, 3) = 384
