"""Fused Triton kernels with their torch references: cross-entropy, fused linear cross-entropy
and PPL scoring. Import the op modules directly (``megatron_syne.kernels.cross_entropy``, ...);
this package imports nothing so that ``import megatron_syne`` never pulls in Triton."""
