"""Flag validation (one clear error per bad input), unit conversions and the WSD schedule."""

from __future__ import annotations

import pytest

from megatron_syne.training.arguments import ArgumentError, parse_args
from megatron_syne.training.checkpointing import CheckpointError, find_checkpoint
from megatron_syne.training.data import sample_indices_for_step

BASE = ["--device", "cpu", "--mock-data", "--train-iters", "10"]


def test_preset_flags_contradiction_is_one_clear_error():
    with pytest.raises(ArgumentError, match=r"--num-query-groups 5.*not a multiple"):
        parse_args([*BASE, "--model", "llama3-8b", "--num-query-groups", "5"])
    with pytest.raises(
        ArgumentError, match=r"seq_length=16384 exceeds max_position_embeddings=8192"
    ):
        parse_args([*BASE, "--model", "llama3-8b", "--seq-length", "16384"])
    with pytest.raises(
        ArgumentError, match=r"--tensor-model-parallel-size 4 must divide.*num_query_groups=2"
    ):
        parse_args([*BASE, "--model", "tiny", "--tensor-model-parallel-size", "4"], world_size=4)


def test_shape_overrides_use_megatron_flag_names():
    args = parse_args([*BASE, "--model", "llama3-8b", "--num-layers", "2", "--rotary-base", "10000",
                       "--hidden-size", "1024", "--num-attention-heads", "8"])  # fmt: skip
    assert (args.preset.num_layers, args.preset.rotary_base) == (2, 10000.0)
    assert args.preset.kv_channels == 128  # follows hidden / heads
    assert args.preset.ffn_hidden_size == 14336 and args.seq_length == 8192


def test_global_batch_not_divisible_by_micro_times_dp():
    with pytest.raises(
        ArgumentError,
        match=r"--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2 = 4",
    ):
        parse_args([*BASE, "--micro-batch-size", "2", "--global-batch-size", "6"], world_size=2)
    args = parse_args([*BASE, "--micro-batch-size", "2", "--global-batch-size", "8"], world_size=2)
    assert args.num_microbatches == 2 and args.data_parallel_size == 2


def test_fp8_without_transformer_engine_is_refused():
    with pytest.raises(
        ArgumentError, match=r"--fp8-format hybrid needs Transformer Engine.*never silently ignored"
    ):
        parse_args([*BASE, "--fp8-format", "hybrid"])
    with pytest.raises(ArgumentError, match="Transformer Engine does not import"):
        parse_args([*BASE, "--transformer-impl", "transformer_engine"])
    with pytest.raises(ArgumentError, match="needs --transformer-impl transformer_engine"):
        parse_args([*BASE, "--context-parallel-size", "2"], world_size=2)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(ArgumentError, match=r"--load .*nope: no such directory"):
        parse_args([*BASE, "--load", str(tmp_path / "nope")])
    # --load = --save on a first run is the auto-resume idiom, not an error.
    parse_args([*BASE, "--load", str(tmp_path / "run"), "--save", str(tmp_path / "run")])
    assert find_checkpoint(tmp_path) is None
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("garbage\n")
    with pytest.raises(
        CheckpointError, match=r"latest_checkpointed_iteration.txt: expected an iteration number"
    ):
        find_checkpoint(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("20\n")
    with pytest.raises(CheckpointError, match=r"iter_0000020 is missing or incomplete"):
        find_checkpoint(tmp_path)
    (tmp_path / "iter_0000020").mkdir()  # a directory without metadata.json = incomplete
    with pytest.raises(CheckpointError, match="incomplete"):
        find_checkpoint(tmp_path)
    (tmp_path / "iter_0000020" / "metadata.json").write_text("{}")
    location = find_checkpoint(tmp_path)
    assert location.iteration == 20 and find_checkpoint(location.directory) == location


def test_token_budgets_become_steps():
    args = parse_args(["--device", "cpu", "--mock-data", "--model", "tiny", "--seq-length", "64",
                       "--global-batch-size", "4", "--train-tokens", "1e6", "--lr-warmup-tokens",
                       "2560", "--lr-wsd-decay-tokens", "25600"])  # fmt: skip
    assert args.tokens_per_step == 256
    assert (
        args.train_iters == 3907 and args.lr_warmup_iters == 10 and args.lr_wsd_decay_iters == 100
    )
    with pytest.raises(ArgumentError, match="exactly one of --train-iters and --train-tokens"):
        parse_args(
            ["--device", "cpu", "--mock-data", "--train-iters", "3", "--train-tokens", "100"]
        )


def test_wsd_schedule_warmup_stable_decay():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_syne.training.loop import build_scheduler

    class _Optimizer:  # the scheduler only touches param_groups
        param_groups = [{"lr": 0.0, "weight_decay": 0.0}]

    args = parse_args([*BASE[:-1], "100", "--global-batch-size", "1", "--lr", "1e-5",
                       "--lr-warmup-init", "1e-7", "--lr-warmup-iters", "10", "--min-lr", "1e-6",
                       "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "20"])  # fmt: skip
    scheduler = build_scheduler(args, _Optimizer())
    assert isinstance(scheduler, OptimizerParamScheduler)
    lrs = []
    for _ in range(101):
        lrs.append(_Optimizer.param_groups[0]["lr"])
        scheduler.step(increment=args.global_batch_size)
    assert lrs[0] == pytest.approx(1e-7)  # warmup starts at --lr-warmup-init
    assert lrs[5] == pytest.approx(1e-7 + (1e-5 - 1e-7) * 0.5)
    assert lrs[10] == pytest.approx(1e-5) and lrs[80] == pytest.approx(1e-5)  # stable
    assert lrs[90] == pytest.approx(1e-6 + 0.5 * (1e-5 - 1e-6))  # linear decay half way
    assert lrs[100] == pytest.approx(1e-6)


def test_sample_order_follows_megatron_pretraining_sampler():
    # Global batch 8 = 2 micro batches x micro 2 x DP 2, starting at consumed sample 16.
    rank0 = sample_indices_for_step(16, 8, 2, data_parallel_rank=0, data_parallel_size=2)
    rank1 = sample_indices_for_step(16, 8, 2, data_parallel_rank=1, data_parallel_size=2)
    assert rank0 == [[16, 17], [20, 21]] and rank1 == [[18, 19], [22, 23]]
