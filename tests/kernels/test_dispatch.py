"""Backend choice: Triton on CUDA or under TRITON_INTERPRET=1 (read per call), else torch."""

import pytest
import torch

from megatron_syne.kernels import _dispatch
from megatron_syne.kernels.cross_entropy import vocab_parallel_cross_entropy


def test_cpu_defaults_to_torch_and_interpreter_on_request(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _dispatch.resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.resolve_backend("auto", cpu) == "triton"
    assert _dispatch.resolve_backend("torch", cpu) == "torch"
    assert _dispatch.resolve_backend("auto", torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="backend"):
        _dispatch.resolve_backend("cuda", cpu)


def test_interpreter_env_set_after_import_runs_the_triton_kernels(monkeypatch):
    calls = []
    real_launch = _dispatch.launch

    def spy(kernel, *args, **kwargs):
        calls.append(kernel)
        return real_launch(kernel, *args, **kwargs)

    monkeypatch.setattr("megatron_syne.kernels.cross_entropy.launch", spy)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    logits = torch.randn(5, 40)
    target = torch.randint(0, 40, (5,))
    loss = vocab_parallel_cross_entropy(logits, target)
    assert calls, "TRITON_INTERPRET=1 did not route to the Triton kernels"
    torch.testing.assert_close(
        loss, torch.nn.functional.cross_entropy(logits, target, reduction="none")
    )
    monkeypatch.delenv("TRITON_INTERPRET")
    calls.clear()
    vocab_parallel_cross_entropy(logits, target)
    assert not calls
