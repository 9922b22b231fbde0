"""Kernel tests run the Triton kernels in the interpreter by passing backend="triton" explicitly.

``TRITON_INTERPRET`` is deliberately NOT set process-wide: it is read when kernels are decorated,
and it would leak into other engineers' tests and their torchrun children (making every CPU
training step with the fused loss run in the interpreter).
"""

import pytest
import torch

from megatron_syne.kernels import cross_entropy


@pytest.fixture
def small_block(monkeypatch):
    """Vocabulary blocks of 256: a 1000-token vocabulary takes 4 blocks, the last one ragged."""
    monkeypatch.setattr(cross_entropy, "MAX_BLOCK_SIZE", 256)
    return 256


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
