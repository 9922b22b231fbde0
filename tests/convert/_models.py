"""Tiny random Llama models for the conversion tests, and logits through the Megatron path."""

from __future__ import annotations

import math
from pathlib import Path

import torch

VOCAB = 250  # not a multiple of 128: exercises the vocabulary padding
TOKENS_SHAPE = (2, 24)


def make_hf_llama(
    out_dir: Path,
    seed: int = 0,
    rope_scaling: dict | None = None,
    tie_word_embeddings: bool = False,
    max_shard_size: str = "40KB",
    **overrides,
):
    """A random fp32 ``LlamaForCausalLM`` (GQA, RoPE base 500000) saved as sharded safetensors.

    Every weight is random, norms included (ones would hide a swapped norm), at a scale that
    gives logits of order one, so a wrong mapping cannot hide under the tolerance.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    if rope_scaling is not None:
        fields["rope_scaling"] = rope_scaling
        fields["max_position_embeddings"] = 16384
    fields.update(overrides)
    config = LlamaConfig(**fields)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("embed_tokens.weight"):
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]))
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def megatron_logits(
    load_dir: Path, tokens: torch.Tensor, tensor_parallel_size: int = 1
) -> torch.Tensor:
    """Logits of the checkpoint at ``load_dir`` through megatron_syne's GPTModel (fp32, CPU).

    Runs in the calling process (TP=1) or under torchrun (TP=N, one call per rank). The model
    shape comes from the conversion record; weights load through the training loop's loader.
    Returns the full-vocabulary logits ``[b, s, padded_vocab]`` on every rank.
    """
    from megatron.core import tensor_parallel

    from megatron_syne.convert.arch import LlamaArch
    from megatron_syne.convert.megatron_checkpoint import MegatronCheckpointReader
    from megatron_syne.models.llama3 import build_gpt_model, transformer_config_from_preset
    from megatron_syne.models.presets import get_preset
    from megatron_syne.training.checkpointing import load_model_weights
    from megatron_syne.training.distributed import initialize_distributed

    initialize_distributed("cpu", tensor_model_parallel_size=tensor_parallel_size)
    reader = MegatronCheckpointReader(load_dir)
    record = reader.common["conversion"]
    arch = LlamaArch.from_dict(record["arch"])
    preset = get_preset("tiny").replace(
        **arch.to_preset_overrides(), seq_length=min(256, arch.max_position_embeddings)
    )
    config = transformer_config_from_preset(
        preset,
        tensor_model_parallel_size=tensor_parallel_size,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
    )
    model = build_gpt_model(preset, config, vocab_size=record["padded_vocab_size"]).eval()
    load_model_weights([model], load_dir)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(input_ids=tokens, position_ids=positions, attention_mask=None)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits.float()
