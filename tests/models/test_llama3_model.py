"""The Llama-3 GPTModel: exact parameter counts on the meta device, SDPA attention equal to
megatron-core's reference attention, and a CPU forward/backward."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, cpu_env


@pytest.fixture(scope="module")
def checks() -> dict:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "models" / "model_checks.py")],
        env=cpu_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_llama3_8b_on_meta_device_has_published_parameter_count(checks):
    assert checks["llama3-8b"] == 8_030_261_248


def test_llama3_1b_ties_embeddings(checks):
    assert checks["llama3-1b"] == 1_235_814_400


def test_sdpa_attention_matches_megatron_reference(checks):
    assert checks["sdpa_max_abs_diff"] < 1e-5


def test_tiny_forward_backward(checks):
    tiny = checks["tiny"]
    assert tiny["loss_shape"] == [2, 64] and tiny["logits_shape"] == [2, 64, 512]
    assert tiny["grads_finite"]
    # Random init: loss close to uniform over the vocabulary.
    assert abs(tiny["loss_mean"] - tiny["ln_vocab"]) < 0.5
