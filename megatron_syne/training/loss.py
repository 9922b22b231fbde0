"""The one place where the per-token language-model loss is computed.

``LlamaGPTModel.compute_language_model_loss`` (megatron_syne.models.llama3) calls
:func:`compute_token_losses`, so every path that runs the model with labels (training,
validation, per-topic evaluation, the PPL scorer) uses the implementation chosen here:

===============================================  ==============================================
flags                                            implementation
===============================================  ==============================================
(default)                                        megatron-core ``vocab_parallel_cross_entropy``
``--cross-entropy-loss-fusion``                  megatron-core's fused (native) kernel
``... --cross-entropy-fusion-impl te``           Transformer Engine's parallel cross entropy
``... --cross-entropy-fusion-impl syne``         ``megatron_syne.kernels.cross_entropy``
                                                 (Triton; gradient written in the forward)
``... --cross-entropy-fusion-impl syne-linear``  ``megatron_syne.kernels.fused_linear_cross_``
                                                 ``entropy`` from the hidden states and the
                                                 output weight: the output layer's GEMM is
                                                 fused into the loss, the logits never exist
===============================================  ==============================================

``syne-linear`` is this project's name for what later Megatron-LM versions call
``--cross-entropy-fusion-impl linear`` (their ``LinearCrossEntropyModule``), which megatron-core
0.16.1 does not have. :class:`megatron_syne.models.llama3.LlamaGPTModel` routes it through
:func:`compute_token_losses_from_hidden` (the logits path below only sees it if a caller hands
it logits, and then uses the ``syne`` kernel).

Reduction over tokens (loss mask, division by the number of tokens) happens in the training
loop's loss function, not here: this returns unreduced per-token losses.
"""

from __future__ import annotations

import torch

FUSION_IMPLS = ("native", "te", "syne", "syne-linear")


def compute_token_losses(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """Per-token cross entropy, fp32, shape ``[b, s]``.

    Args:
        logits: ``[s, b, V_local]`` -- this tensor-parallel rank's vocabulary shard, as
            megatron-core's output layer produces it (shard r holds ids [r*V_local,(r+1)*V_local)).
        labels: ``[b, s]`` global token ids.
        config: anything with ``cross_entropy_loss_fusion`` (bool) and
            ``cross_entropy_fusion_impl`` (one of ``FUSION_IMPLS``), e.g. the model's
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
    elif impl in ("syne", "syne-linear"):
        # Imported lazily: the kernels package pulls in Triton, which plain runs do not need.
        from megatron_syne.kernels.cross_entropy import vocab_parallel_cross_entropy

        losses = vocab_parallel_cross_entropy(logits, target, tp_group=tp_group, reduction="none")
    else:
        raise ValueError(
            f"unknown cross_entropy_fusion_impl {impl!r}; choose one of {FUSION_IMPLS}"
        )
    return losses.float().transpose(0, 1).contiguous()


def uses_linear_fusion(config) -> bool:
    """True when the config asks for the fused output layer + loss (``syne-linear``)."""
    return bool(getattr(config, "cross_entropy_loss_fusion", False)) and (
        getattr(config, "cross_entropy_fusion_impl", "native") == "syne-linear"
    )


def compute_token_losses_from_hidden(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    tp_group=None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Per-token cross entropy of the output layer ``hidden_states @ weight^T``, fp32 ``[b, s]``.

    Args:
        hidden_states: ``[s, b, H]`` final hidden states (after the final norm); with sequence
            parallelism this rank's ``[s / tp, b, H]`` slice, as megatron-core's decoder
            returns them.
        weight: ``[V_local, H]`` this rank's vocabulary shard of the output layer weight (the
            embedding's when they are tied). When it carries megatron-core DDP's fp32
            ``main_grad`` its gradient is added there directly (see
            :mod:`megatron_syne.kernels.fused_linear_cross_entropy`).
        labels: ``[b, s]`` global token ids.
        tp_group / sequence_parallel: the output layer's (``ColumnParallelLinear``) settings.
    """
    from megatron_syne.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    seq_local, batch, hidden_size = hidden_states.shape
    # Rows in [s, b] order: the sequence-parallel all-gather concatenates the ranks' sequence
    # slices, which is the full [s, b] flattened.
    target = labels.transpose(0, 1).reshape(-1)
    losses = fused_linear_cross_entropy(
        hidden_states.reshape(seq_local * batch, hidden_size),
        weight,
        target,
        tp_group=tp_group,
        sequence_parallel=sequence_parallel,
        reduction="none",
    )
    return losses.view(labels.shape[1], labels.shape[0]).transpose(0, 1).contiguous()
