"""End-to-end training on CPU through pretrain_llama3_syne.py (gloo, 1-2 processes).

One module-scoped fixture runs every launch once (about 10 launches of a tiny model); the tests
below check different properties of their outputs:

* loss equivalence: TP=1, TP=2 + sequence parallel, PP=2, DP=2 (distributed optimizer) give the
  same per-step training losses and validation losses on fixed (mock) data;
* kill-and-resume: a DP=2 distributed-optimizer run killed during step 3 (checkpoint at 2)
  resumes with the losses, LR and hook state of the uninterrupted run;
* resume TP=1 -> TP=1 bit-exact; a TP=2 checkpoint (weights and optimizer) loads into TP=1;
* a static --data-path blend trains; a non-finite loss skips the step, training continues,
  N in a row stop the run;
* a corrupt checkpoint gives one clear error.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, cpu_env, run_torchrun

TRAIN_ITERS = 4
COMMON = [
    "--device", "cpu", "--model", "tiny", "--vocab-size", "512", "--seq-length", "64",
    "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(TRAIN_ITERS),
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-init", "1e-4", "--lr-warmup-iters", "1",
    "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "2", "--mock-data", "--log-interval", "1",
    "--eval-interval", "2", "--eval-iters", "1", "--seed", "7",
]  # fmt: skip
HOOKED = str(REPO_ROOT / "tests" / "training" / "train_with_test_hooks.py")
ENTRY = str(REPO_ROOT / "pretrain_llama3_syne.py")


def _records(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(training records by iteration, eval records by iteration) from a metrics JSONL."""
    train, evals = {}, {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        (train if "train/loss" in record else evals)[record["iteration"]] = record
    return train, evals


def _without_mock(flags: list[str]) -> list[str]:
    return [f for f in flags if f != "--mock-data"]


def _write_blend(directory: Path) -> list[str]:
    """Two small Megatron .bin/.idx datasets; returns ``--data-path`` arguments (weights 0.7/0.3)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    args = []
    for name, weight, period in (("web", "0.7", 7), ("book", "0.3", 11)):
        prefix = str(directory / name)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
        for _ in range(60):  # documents of repeating patterns: learnable, with EOD 511
            length = int(rng.integers(20, 120))
            start = int(rng.integers(0, 400))
            doc = (start + np.arange(length) % period).astype(np.int32)
            builder.add_document(
                torch.from_numpy(np.append(doc, 511).astype(np.int32)), [length + 1]
            )
        builder.finalize(prefix + ".idx")
        args += [weight, prefix]
    return args


def _single(args: list[str], expect_rc: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], env=cpu_env(), cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == expect_rc, (
        f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    out: dict[str, object] = {"tmp": tmp}

    def jsonl(name):
        return ["--metrics-jsonl", str(tmp / f"{name}.jsonl")]

    # a: reference, TP=1, checkpoints at 2 and 4, TensorBoard on.
    _single([ENTRY, *COMMON, "--save", str(tmp / "A"), "--save-interval", "2",
             "--tensorboard-dir", str(tmp / "tb"), *jsonl("a")])  # fmt: skip
    # b: TP=2 with sequence parallelism, checkpoints for the TP=2 -> TP=1 load.
    run_torchrun([ENTRY, *COMMON, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                  "--save", str(tmp / "B"), "--save-interval", "2", *jsonl("b")])  # fmt: skip
    # c: PP=2.
    run_torchrun([ENTRY, *COMMON, "--pipeline-model-parallel-size", "2", *jsonl("c")])
    # d: DP=2 with the distributed optimizer, killed right after step 3 (checkpoint at 2).
    d = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         HOOKED, "--crash-at", "3", *COMMON, "--use-distributed-optimizer",
         "--save", str(tmp / "D"), "--load", str(tmp / "D"), "--save-interval", "2", *jsonl("d")],
        env=cpu_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out["d_rc"] = d.returncode
    # e: the same command again resumes from D's latest checkpoint (iteration 2).
    e = run_torchrun([HOOKED, *COMMON, "--use-distributed-optimizer", "--save", str(tmp / "D"),
                      "--load", str(tmp / "D"), "--save-interval", "2", *jsonl("e")])  # fmt: skip
    out["e_stdout"] = e.stdout
    # f: TP=1 continues from B's TP=2 checkpoint at iteration 2 (weights + optimizer resharded).
    f = _single([ENTRY, *COMMON, "--load", str(tmp / "B" / "iter_0000002"), *jsonl("f")])
    out["f_stdout"] = f.stdout
    # g: TP=1 continues from A's checkpoint at iteration 2 (same layout: RNG restored too).
    _single([ENTRY, *COMMON, "--load", str(tmp / "A" / "iter_0000002"), *jsonl("g")])
    # h: on a static two-dataset blend (--data-path): NaN in step 2 (skipped, training goes
    # on), then from step 4 on: stop after 2 in a row.
    blend = _write_blend(tmp / "corpus")
    h = _single([HOOKED, "--nan-at", "2", "--nan-from", "4", *_without_mock(COMMON), "--data-path",
                 *blend, "--split", "90,10,0", "--data-cache-path", str(tmp / "cache"),
                 "--train-iters", "6", "--max-consecutive-skipped-steps", "2", *jsonl("h")],
                expect_rc=3)  # fmt: skip
    out["h_stdout"] = h.stdout
    # i: a truncated tensor file in a checkpoint.
    corrupt = tmp / "corrupt" / "iter_0000002"
    shutil.copytree(tmp / "A" / "iter_0000002", corrupt)
    victim = sorted(corrupt.glob("*.distcp"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    i = _single([ENTRY, *COMMON, "--load", str(corrupt)], expect_rc=1)
    out["i_stderr"] = i.stderr
    out["victim"] = victim
    return out


def _assert_close(reference: dict, other: dict, iterations, key: str, rel: float) -> None:
    for it in iterations:
        a, b = reference[it][key], other[it][key]
        assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-7), f"{key} at iteration {it}: {a} vs {b}"


def test_layouts_give_the_same_losses(runs):
    tmp = runs["tmp"]
    ref_train, ref_eval = _records(tmp / "a.jsonl")
    assert sorted(ref_train) == list(range(1, TRAIN_ITERS + 1))
    # The model must actually learn on this data, or equal losses would prove little.
    assert ref_train[TRAIN_ITERS]["train/loss"] < ref_train[1]["train/loss"] - 0.05
    for name in ("b", "c", "d"):
        train, evals = _records(tmp / f"{name}.jsonl")
        steps = [it for it in ref_train if it in train]
        assert steps, name
        _assert_close(ref_train, train, steps, "train/loss", 2e-6)
        _assert_close(ref_train, train, steps, "train/grad_norm", 1e-4)
        _assert_close(ref_eval, evals, [it for it in ref_eval if it in evals], "eval/valid", 2e-6)


def test_kill_and_resume_with_distributed_optimizer_is_exact(runs):
    tmp = runs["tmp"]
    assert runs["d_rc"] != 0  # killed
    killed, _ = _records(tmp / "d.jsonl")
    assert max(killed) == 2  # the crash hook runs before step 3 is logged
    resumed, _ = _records(tmp / "e.jsonl")
    assert sorted(resumed) == [3, 4]  # restarted after the checkpoint at 2
    uninterrupted, _ = _records(tmp / "a.jsonl")
    _assert_close(uninterrupted, resumed, [3, 4], "train/loss", 2e-6)
    _assert_close(uninterrupted, resumed, [3, 4], "train/learning_rate", 0.0)
    assert resumed[4]["train/consumed_tokens"] == TRAIN_ITERS * 4 * 64
    # The hook's checkpointed state came back: 2 steps before the checkpoint + 2 after.
    assert "HOOK start 2" in runs["e_stdout"] and "HOOK end 4" in runs["e_stdout"]
    assert (tmp / "D" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


def test_resume_same_layout_is_bitwise_and_tp2_checkpoint_loads_into_tp1(runs):
    tmp = runs["tmp"]
    reference, ref_eval = _records(tmp / "a.jsonl")
    same, same_eval = _records(tmp / "g.jsonl")
    _assert_close(reference, same, [3, 4], "train/loss", 0.0)
    _assert_close(ref_eval, same_eval, [4], "eval/valid", 0.0)
    resharded, _ = _records(tmp / "f.jsonl")
    _assert_close(reference, resharded, [3, 4], "train/loss", 2e-6)
    assert "optimizer restored" in runs["f_stdout"]
    assert "RNG NOT restored" in runs["f_stdout"]  # another layout: said, not silent
    assert list((tmp / "tb").glob("events.out.tfevents.*"))


def test_non_finite_loss_is_skipped_counted_and_stops_the_run(runs):
    train, _ = _records(runs["tmp"] / "h.jsonl")
    # The per-step log has loss NaN (stored as a string) for skipped steps.
    assert train[2]["train/loss"] == "nan" and train[2]["train/skipped_steps"] == 1.0
    assert math.isfinite(train[3]["train/loss"]) and train[3]["train/skipped_steps"] == 1.0
    assert math.isfinite(train[1]["train/loss"]) and train[1]["train/skipped_steps"] == 0.0
    assert train[5]["train/skipped_steps"] == 3.0 and 6 not in train
    assert "STOPPED: 2 consecutive steps had a non-finite loss" in runs["h_stdout"]


def test_corrupt_checkpoint_gives_one_clear_error(runs):
    stderr = runs["i_stderr"]
    assert "cannot load checkpoint" in stderr and str(runs["victim"].parent) in stderr
    assert "Traceback" not in stderr.split("pretrain_llama3_syne.py: error:")[-1]
