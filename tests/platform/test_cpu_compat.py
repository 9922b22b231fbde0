"""The CPU compatibility layer, checked in child processes (it patches torch process-wide)."""

from __future__ import annotations

import json

from tests.helpers import REPO_ROOT, run_torchrun


def test_cpu_compat_redirects_cuda_and_emulates_collectives():
    proc = run_torchrun([str(REPO_ROOT / "tests" / "platform" / "compat_checks.py")], nproc=2)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["enabled_before"] is False and result["idempotent"] is True
    for key in ("zeros_device", "tensor_device", "cuda_method", "to_cuda"):
        assert result[key] == "cpu", key
    assert result["type_name"] == "torch.cuda.FloatTensor" and result["type_cast"]
    assert result["reduce_scatter_ok_0"] and result["reduce_scatter_ok_1"]
    assert result["fork_restores_default_stream"] and result["tp_ranks_differ"]
