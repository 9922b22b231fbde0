"""Vocab-parallel (TP=2 over gloo) equals the single-process full-vocabulary reference."""

from pathlib import Path

from tests.helpers import run_torchrun

WORKER = Path(__file__).with_name("tp_worker.py")


def test_two_rank_vocab_parallel_matches_full_vocab():
    proc = run_torchrun([str(WORKER)], nproc=2, timeout=600)
    passed = [line for line in proc.stdout.splitlines() if line.startswith("CHECK ")]
    # 5 cross-entropy cases (loss [+ z-loss] + grad: 12 checks), 4 fused-linear cases
    # (loss [+ z-loss] + dH + dW: 13 checks), megatron-core parity (loss + grad).
    assert len(passed) == 12 + 13 + 2, proc.stdout[-4000:]
    assert all(line.endswith(" OK") for line in passed)
