"""Model checks that need megatron-core's parallel state (run in a child process by
test_llama3_model.py, because they enable the CPU compatibility layer). Prints one JSON line."""

from __future__ import annotations

import json
import math

import torch

from megatron_syne.models.llama3 import (
    SDPACoreAttention,
    build_gpt_model,
    transformer_config_from_preset,
)
from megatron_syne.models.presets import get_preset
from megatron_syne.training.distributed import initialize_distributed


def meta_parameter_count(name: str) -> int:
    preset = get_preset(name)
    config = transformer_config_from_preset(
        preset, use_cpu_initialization=True, perform_initialization=False
    )
    with torch.device("meta"):
        model = build_gpt_model(preset, config)
    return sum(p.numel() for p in model.parameters())


def sdpa_vs_megatron_attention() -> float:
    """Max |SDPA - megatron DotProductAttention| on random causal GQA inputs."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    preset = get_preset("tiny")
    config = transformer_config_from_preset(preset)
    kwargs = dict(
        config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"
    )
    ours, reference = SDPACoreAttention(**kwargs), DotProductAttention(**kwargs)
    s, b, heads, groups, dim = (
        37,
        3,
        preset.num_attention_heads,
        preset.num_query_groups,
        preset.kv_channels,
    )
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, heads, dim, generator=generator)
    k = torch.randn(s, b, groups, dim, generator=generator)
    v = torch.randn(s, b, groups, dim, generator=generator)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    expected = reference(q, k, v, causal)
    got_causal_flag = ours(q, k, v, None)
    got_explicit_mask = ours(q, k, v, causal)
    return max(
        (expected - got_causal_flag).abs().max().item(),
        (expected - got_explicit_mask).abs().max().item(),
    )


def tiny_forward_backward() -> dict:
    preset = get_preset("tiny").replace(vocab_size=512, seq_length=64)
    config = transformer_config_from_preset(preset)
    model = build_gpt_model(preset, config)
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(64).expand(2, -1)
    losses = model(tokens, positions, None, labels=tokens)
    losses.mean().backward()
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters())
    logits = model(tokens, positions, None)
    return {
        "loss_shape": list(losses.shape),
        "loss_mean": losses.mean().item(),
        "logits_shape": list(logits.shape),
        "grads_finite": grads_finite,
        "ln_vocab": math.log(512),
    }


def main() -> None:
    initialize_distributed("cpu", 1, 1, seed=1)
    result = {
        "llama3-8b": meta_parameter_count("llama3-8b"),
        "llama3-1b": meta_parameter_count("llama3-1b"),
        "sdpa_max_abs_diff": sdpa_vs_megatron_attention(),
        "tiny": tiny_forward_backward(),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
