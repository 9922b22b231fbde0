"""Llama-3 as a megatron-core ``GPTModel``: config, layer spec and model builder.

The layer spec is chosen once, here (``get_layer_spec``):

* ``transformer_engine``: megatron-core's TE spec (fused kernels, FP8); needs Transformer Engine.
* ``local``: megatron-core's plain-torch spec with two replacements so that it is usable for real
  training: core attention is :class:`SDPACoreAttention` (``torch.nn.functional.
  scaled_dot_product_attention``: flash / memory-efficient kernels, the ``[s, s]`` score matrix is
  never materialised, unlike megatron-core's ``DotProductAttention``) and the norm is
  :class:`LlamaRMSNorm`, which supports sequence parallelism (torch's RMSNorm wrapper does not).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_syne.models.presets import ModelPreset

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports (megatron-core's TE spec and FP8 need it)."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # a half-installed TE raises RuntimeError, not ImportError
        return False
    return True


class SDPACoreAttention(MegatronModule):
    """Causal GQA attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Drop-in for megatron-core's ``DotProductAttention`` (same constructor and ``forward``
    signature, so it fits ``SelfAttentionSubmodules.core_attention``). Inputs are
    ``[s, b, heads, head_dim]`` (keys/values with ``num_query_groups`` heads); output is
    ``[s, b, heads * head_dim]`` for this tensor-parallel rank. No context parallelism: that
    needs ring attention (Transformer Engine).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "the local layer spec has no context parallelism (it needs ring attention): use "
                "--transformer-impl transformer_engine or --context-parallel-size 1"
            )
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"SDPACoreAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}"
            )
        self.attn_mask_type = attn_mask_type
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        head_dim = config.kv_channels
        # apply_query_key_layer_scaling is an fp16 overflow guard that cancels out inside
        # Megatron's fp32 softmax; SDPA accumulates in fp32, so it has nothing to do here.
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(
                "packed sequences and attention bias need --transformer-impl transformer_engine"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        seq_q, batch, heads, head_dim = query.shape
        # [s, b, n, d] -> [b, n, s, d]; the permute is a view, SDPA accepts strided inputs.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        enable_gqa = k.size(1) != q.size(1)
        mask = None
        is_causal = False
        if attention_mask is not None:
            # Megatron masks are True where attention is NOT allowed; SDPA wants the opposite.
            mask = ~attention_mask.bool()
        elif mask_type == AttnMaskType.causal:
            is_causal = True
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=enable_gqa,
        )
        # [b, n, s, d] -> [s, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(seq_q, batch, heads * head_dim)


class LlamaRMSNorm(torch.nn.Module):
    """RMSNorm over the hidden dimension, with sequence-parallel support.

    Under sequence parallelism every TP rank sees a different slice of the sequence, so the
    weight's gradient must be summed over the TP group: megatron-core's ``finalize_model_grads``
    does that for parameters marked ``sequence_parallel``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden, (hidden.size(-1),), self.weight, self.eps)


class LlamaGPTModel(GPTModel):
    """megatron-core's ``GPTModel`` whose language-model loss comes from
    :mod:`megatron_syne.training.loss` (the project's single loss seam: megatron's, Transformer
    Engine's or our Triton cross entropy, chosen by the config's ``cross_entropy_loss_fusion`` /
    ``cross_entropy_fusion_impl``).

    With ``cross_entropy_fusion_impl == "syne-linear"`` and labels, the output layer's GEMM is
    not run: the per-token loss comes straight from the final hidden states and the output
    weight (:func:`megatron_syne.training.loss.compute_token_losses_from_hidden`), so the
    ``[s, b, V_local]`` logits never exist. Without labels (generation, logits export) the
    output layer runs as usual.
    """

    def compute_language_model_loss(
        self, labels: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        from megatron_syne.training.loss import compute_token_losses

        return compute_token_losses(logits, labels, self.config)

    def _postprocess(self, hidden_states, labels=None, **kwargs):
        # megatron-core 0.16.1's GPTModel.forward calls _postprocess with keyword arguments
        # only; everything but the fused loss path is left to it.
        from megatron_syne.training.loss import compute_token_losses_from_hidden, uses_linear_fusion

        if labels is None or not self.post_process or not uses_linear_fusion(self.config):
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        if self.config.mtp_num_layers is not None or kwargs.get("mtp_in_postprocess"):
            raise NotImplementedError(
                "--cross-entropy-fusion-impl syne-linear does not support multi-token "
                "prediction; use --cross-entropy-fusion-impl syne"
            )
        if kwargs.get("inference_context") is not None and not self.training:
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.output_layer.weight
        return compute_token_losses_from_hidden(
            hidden_states,
            weight,
            labels,
            tp_group=self.output_layer.tp_group,
            sequence_parallel=self.output_layer.sequence_parallel,
        )


def get_layer_spec(transformer_impl: str = "local") -> ModuleSpec:
    """The transformer-layer spec for ``transformer_impl`` in ``TRANSFORMER_IMPLS``."""
    if transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise RuntimeError(
                "--transformer-impl transformer_engine needs Transformer Engine, which does not "
                "import here; install it (NGC PyTorch images ship it) or use --transformer-impl local"
            )
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    if transformer_impl != "local":
        raise ValueError(
            f"unknown transformer_impl {transformer_impl!r}; choose one of {TRANSFORMER_IMPLS}"
        )
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer = spec.submodules
    layer.input_layernorm = LlamaRMSNorm
    layer.pre_mlp_layernorm = LlamaRMSNorm
    layer.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def transformer_config_from_preset(preset: ModelPreset, **overrides) -> TransformerConfig:
    """A megatron-core ``TransformerConfig`` for a Llama-3-style ``preset``.

    ``overrides`` are ``TransformerConfig`` field names (``tensor_model_parallel_size``,
    ``params_dtype``, ``bf16``, ``sequence_parallel``, ...) and win over the defaults below.
    """
    fields = dict(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        ffn_hidden_size=preset.ffn_hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.num_query_groups,
        kv_channels=preset.kv_channels,
        layernorm_epsilon=preset.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        # Fusions below need apex / TE kernels; torch's own are used instead.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
    )
    fields.update(overrides)
    if fields.get("bf16") and "params_dtype" not in overrides:
        fields["params_dtype"] = torch.bfloat16
    if fields.get("bf16") and "pipeline_dtype" not in overrides:
        fields["pipeline_dtype"] = torch.bfloat16
    if "pipeline_dtype" not in fields:
        fields["pipeline_dtype"] = fields.get("params_dtype", torch.float32)
    return TransformerConfig(**fields)


def build_gpt_model(
    preset: ModelPreset,
    config: TransformerConfig,
    transformer_impl: str = "local",
    pre_process: bool = True,
    post_process: bool = True,
    vocab_size: int | None = None,
) -> GPTModel:
    """Build the Llama-3 ``GPTModel`` (this rank's pipeline stage and tensor shard).

    ``vocab_size`` is the (possibly padded) embedding size; None means ``preset.vocab_size``
    exactly. Parallel state must be initialised first (``initialize_distributed``).
    """
    layer_spec = get_layer_spec(transformer_impl)
    if transformer_impl == "local":
        # The final norm comes from the block spec; megatron-core's default for it is torch's
        # RMSNorm wrapper, which refuses sequence parallelism.
        num_layers = get_num_layers_to_build(config)
        layer_spec = ModuleSpec(
            module=TransformerBlock,
            submodules=TransformerBlockSubmodules(
                layer_specs=[layer_spec] * num_layers, layer_norm=LlamaRMSNorm
            ),
        )
    return LlamaGPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab_size if vocab_size is not None else preset.vocab_size,
        max_sequence_length=preset.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not preset.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(preset.rotary_base),
        rope_scaling=preset.rope_scaling_factor is not None,
        rope_scaling_factor=preset.rope_scaling_factor or 8.0,
    )


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int) -> int:
    """``vocab_size`` rounded up to a multiple of lcm(divisible_by, TP).

    Megatron-LM pads to ``divisible_by * TP``, which makes the embedding shape depend on TP and
    breaks loading a checkpoint with another TP; the lcm keeps it layout-independent for the
    usual power-of-two sizes while still splitting evenly over TP.
    """
    multiple = math.lcm(divisible_by, tensor_model_parallel_size)
    return ((vocab_size + multiple - 1) // multiple) * multiple
