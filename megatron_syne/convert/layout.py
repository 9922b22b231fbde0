"""Tensor names and layouts: Hugging Face Llama <-> megatron-core GPTModel (global, unsharded).

Megatron-core's ``torch_dist`` checkpoints store *global* tensors (what a TP=1, PP=1 model
holds) and every rank reads its slice on load, so the converter only needs the global layout:

* ``linear_qkv.weight`` fuses Q, K and V grouped by key/value head, so that splitting the rows
  evenly over tensor-parallel ranks gives each rank whole groups:
  ``[g0: q heads of g0, k0, v0 | g1: ... ]`` with shape ``[(heads + 2 * groups) * head_dim, h]``.
* ``linear_fc1.weight`` is ``[gate; up]`` (SwiGLU ``silu(gate) * up``); megatron-core's
  checkpoint stores it as two row blocks, which is the same global tensor.
* RMSNorm weights are stored under the Transformer Engine names (``linear_qkv.layer_norm_weight``,
  ``linear_fc1.layer_norm_weight``) by both the TE and the local layer specs (the local spec
  maps its ``input_layernorm`` / ``pre_mlp_layernorm`` onto them), so one checkpoint serves both.
* Decoder weights are stacked over layers (a leading ``[num_layers]`` axis, one chunk per
  layer), which makes the checkpoint independent of the pipeline-parallel split.

Both models use the same rotary convention (rotate-half, ``rotary_interleaved=False``), so Q and
K need no row permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_syne.convert.arch import LlamaArch

# Megatron sharded-state-dict keys (TE-style names; see the module docstring).
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
LAYER_PREFIX = "decoder.layers."
QKV_NORM = LAYER_PREFIX + "self_attention.linear_qkv.layer_norm_weight"
QKV = LAYER_PREFIX + "self_attention.linear_qkv.weight"
PROJ = LAYER_PREFIX + "self_attention.linear_proj.weight"
FC1_NORM = LAYER_PREFIX + "mlp.linear_fc1.layer_norm_weight"
FC1 = LAYER_PREFIX + "mlp.linear_fc1.weight"
FC2 = LAYER_PREFIX + "mlp.linear_fc2.weight"
LAYER_KEYS = (QKV_NORM, QKV, PROJ, FC1_NORM, FC1, FC2)
# Linear layers of the local and TE specs carry an ``_extra_state`` (None for local linears,
# FP8 metadata for TE) and so does TE's core attention; megatron-core stores one object per layer
# and a model that asks for one the checkpoint lacks fails to load. Both specs' objects are
# written (None: TE starts with fresh FP8 scaling state); a key the model does not ask for is
# ignored on load.
EXTRA_STATE_MODULES = (
    LAYER_PREFIX + "self_attention.core_attention",
    LAYER_PREFIX + "self_attention.linear_proj",
    LAYER_PREFIX + "self_attention.linear_qkv",
    LAYER_PREFIX + "mlp.linear_fc1",
    LAYER_PREFIX + "mlp.linear_fc2",
)


def hf_layer_names(layer: int) -> dict[str, str]:
    """HF parameter names of decoder layer ``layer`` (0-based)."""
    p = f"model.layers.{layer}."
    return {
        "input_norm": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "o": p + "self_attn.o_proj.weight",
        "post_norm": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }


HF_EMBEDDING = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"


def hf_tensor_shapes(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    """Every HF parameter name with its shape, in the order the converter writes them."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.kv_channels
    q_rows, kv_rows = arch.num_attention_heads * d, arch.num_query_groups * d
    shapes: dict[str, tuple[int, ...]] = {HF_EMBEDDING: (arch.vocab_size, h)}
    for layer in range(arch.num_layers):
        n = hf_layer_names(layer)
        shapes.update(
            {
                n["input_norm"]: (h,),
                n["q"]: (q_rows, h),
                n["k"]: (kv_rows, h),
                n["v"]: (kv_rows, h),
                n["o"]: (h, q_rows),
                n["post_norm"]: (h,),
                n["gate"]: (f, h),
                n["up"]: (f, h),
                n["down"]: (h, f),
            }
        )
    shapes[HF_FINAL_NORM] = (h,)
    if arch.untie_embeddings_and_output_weights:
        shapes[HF_LM_HEAD] = (arch.vocab_size, h)
    return shapes


@dataclass(frozen=True)
class MegatronTensorSpec:
    """One global Megatron tensor: its key, per-layer shape and whether it is layer-stacked."""

    key: str
    shape: tuple[int, ...]  # of one layer's chunk for stacked keys, of the tensor otherwise
    stacked: bool


def megatron_tensor_specs(arch: LlamaArch, padded_vocab_size: int) -> list[MegatronTensorSpec]:
    """The global tensors a Megatron checkpoint of ``arch`` holds (vocab rows padded)."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.kv_channels
    specs = [
        MegatronTensorSpec(EMBEDDING, (padded_vocab_size, h), False),
        MegatronTensorSpec(QKV_NORM, (h,), True),
        MegatronTensorSpec(QKV, (arch.qkv_rows, h), True),
        MegatronTensorSpec(PROJ, (h, arch.num_attention_heads * d), True),
        MegatronTensorSpec(FC1_NORM, (h,), True),
        MegatronTensorSpec(FC1, (2 * f, h), True),
        MegatronTensorSpec(FC2, (h, f), True),
        MegatronTensorSpec(FINAL_NORM, (h,), False),
    ]
    if arch.untie_embeddings_and_output_weights:
        specs.append(MegatronTensorSpec(OUTPUT_LAYER, (padded_vocab_size, h), False))
    return specs


# ---- layout transforms (pure functions on global tensors) ----
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: LlamaArch) -> torch.Tensor:
    """HF ``q_proj``, ``k_proj``, ``v_proj`` -> Megatron's group-interleaved ``linear_qkv``."""
    g, d, h = arch.num_query_groups, arch.kv_channels, arch.hidden_size
    q = q.reshape(g, arch.heads_per_group * d, h)
    k = k.reshape(g, d, h)
    v = v.reshape(g, d, h)
    return torch.cat([q, k, v], dim=1).reshape(arch.qkv_rows, h)


def split_qkv(
    qkv: torch.Tensor, arch: LlamaArch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: returns contiguous ``(q, k, v)`` in HF layout."""
    g, d, h = arch.num_query_groups, arch.kv_channels, arch.hidden_size
    grouped = qkv.reshape(g, (arch.heads_per_group + 2) * d, h)
    q, k, v = torch.split(grouped, [arch.heads_per_group * d, d, d], dim=1)
    return (
        q.reshape(arch.num_attention_heads * d, h).contiguous(),
        k.reshape(g * d, h).contiguous(),
        v.reshape(g * d, h).contiguous(),
    )


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF ``gate_proj``, ``up_proj`` -> Megatron ``linear_fc1`` (``[gate; up]``)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_gate_up`."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(weight: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """Append zero rows up to ``padded_vocab_size`` (Megatron pads so TP splits evenly)."""
    extra = padded_vocab_size - weight.shape[0]
    if extra < 0:
        raise ValueError(f"padded vocab {padded_vocab_size} < vocab {weight.shape[0]}")
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(extra, weight.shape[1])], dim=0)
