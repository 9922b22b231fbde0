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


_HF_AFTER_COMPAT = """
import sys, tempfile, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0)
directory = tempfile.mkdtemp()
reference = LlamaForCausalLM(config)
reference.save_pretrained(directory)
from megatron_syne.platform.cpu import enable_cpu_compat
enable_cpu_compat()
loaded = LlamaForCausalLM.from_pretrained(directory)
ids = torch.arange(12).unsqueeze(0)
with torch.no_grad():
    diff = (loaded(ids).logits - reference(ids).logits).abs().max().item()
same = torch.equal(loaded.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
with torch.device("meta"):
    on_meta = torch.arange(4).device.type
print("RESULT", same, diff, on_meta)
"""


def test_hf_models_load_correctly_after_cpu_compat():
    """``with torch.device("meta")`` (transformers' loading) must keep working once patched."""
    import subprocess
    import sys

    from tests.helpers import cpu_env

    proc = subprocess.run(
        [sys.executable, "-c", _HF_AFTER_COMPAT],
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    _, same, diff, on_meta = line.split()
    assert same == "True"
    assert float(diff) < 1e-5
    assert on_meta == "meta"
