"""Vocab-parallel (TP=2 over gloo) equals the single-process full-vocabulary reference; the
fused-linear model path under TP=2 + sequence parallelism + DDP equals the unfused model."""

from pathlib import Path

from tests.helpers import run_torchrun

WORKER = Path(__file__).with_name("tp_worker.py")


def test_two_rank_vocab_parallel_matches_full_vocab():
    proc = run_torchrun([str(WORKER)], nproc=2, timeout=600)
    passed = [line for line in proc.stdout.splitlines() if line.startswith("CHECK ")]
    # 5 cross-entropy cases (loss [+ z-loss] + grad: 12 checks), 9 fused-linear cases, both
    # schedules (loss [+ z-loss] + dH + dW or main_grad: 29 checks), megatron-core parity
    # (loss + grad), the Llama model with syne-linear vs unfused under DDP, untied and tied
    # embeddings (losses + main_grad of every parameter + the DDP flag: 6 checks).
    assert len(passed) == 12 + 29 + 2 + 6, proc.stdout[-4000:]
    assert all(line.endswith(" OK") for line in passed)
