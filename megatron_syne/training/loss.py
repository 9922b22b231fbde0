"""The one place where the per-token language-model loss is computed.

``LlamaGPTModel.compute_language_model_loss`` (megatron_syne.models.llama3) calls
:func:`compute_token_losses`, so every path that runs the model with labels (training,
validation, per-topic evaluation, the PPL scorer) uses the implementation chosen here:

=============================================  ================================================
flags                                          implementation
=============================================  ================================================
(default)                                      megatron-core ``vocab_parallel_cross_entropy``
``--cross-entropy-loss-fusion``                megatron-core's fused (native) kernel
``... --cross-entropy-fusion-impl te``         Transformer Engine's parallel cross entropy
``... --cross-entropy-fusion-impl syne``       ``megatron_syne.kernels.cross_entropy``
                                               (Triton; gradient written in the forward)
=============================================  ================================================

Reduction over tokens (loss mask, division by the number of tokens) happens in the training
loop's loss function, not here: this returns unreduced per-token losses.
"""

from __future__ import annotations

import torch

FUSION_IMPLS = ("native", "te", "syne")


def compute_token_losses(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """Per-token cross entropy, fp32, shape ``[b, s]``.

    Args:
        logits: ``[s, b, V_local]`` -- this tensor-parallel rank's vocabulary shard, as
            megatron-core's output layer produces it (shard r holds ids [r*V_local,(r+1)*V_local)).
        labels: ``[b, s]`` global token ids.
        config: anything with ``cross_entropy_loss_fusion`` (bool) and
            ``cross_entropy_fusion_impl`` ("native" | "te" | "syne"), e.g. the model's
            ``TransformerConfig`` or the training args.
    """
    from megatron.core import parallel_state, tensor_parallel

    target = labels.transpose(0, 1).contiguous()  # [s, b], like the logits
    fused = getattr(config, "cross_entropy_loss_fusion", False)
    impl = getattr(config, "cross_entropy_fusion_impl", "native")
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if not fused:
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits, target)
    elif impl == "native":
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        losses = fused_vocab_parallel_cross_entropy(logits, target, tp_group)
    elif impl == "te":
        from megatron.core.extensions.transformer_engine import te_parallel_cross_entropy

        if te_parallel_cross_entropy is None:
            raise RuntimeError("--cross-entropy-fusion-impl te needs Transformer Engine >= 2.0")
        losses = te_parallel_cross_entropy(logits, target, tp_group, False)
    elif impl == "syne":
        # Imported lazily: the kernels package pulls in Triton, which plain runs do not need.
        from megatron_syne.kernels.cross_entropy import vocab_parallel_cross_entropy

        losses = vocab_parallel_cross_entropy(logits, target, tp_group=tp_group, reduction="none")
    else:
        raise ValueError(
            f"unknown cross_entropy_fusion_impl {impl!r}; choose one of {FUSION_IMPLS}"
        )
    return losses.float().transpose(0, 1).contiguous()
