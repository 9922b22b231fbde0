"""Continual pre-training of Llama-3 on megatron-core (the Llama-3-SynE recipe).

    torchrun --nproc_per_node 8 pretrain_llama3_syne.py --model llama3-8b --bf16 \\
        --tensor-model-parallel-size 2 --micro-batch-size 1 --global-batch-size 256 \\
        --lr 1e-5 --lr-warmup-init 1e-7 --lr-warmup-tokens 10e9 --lr-decay-style WSD \\
        --train-tokens 92.5e9 --data-path 0.7 /data/zh_web 0.3 /data/en_web \\
        --load /ckpt/llama3-8b-base --no-load-optim --no-load-rng --save /ckpt/syne

See ``--help`` and docs; the logic lives in ``megatron_syne.training``.
"""

from __future__ import annotations

import sys

from megatron_syne.training.arguments import ArgumentError, parse_args
from megatron_syne.training.checkpointing import CheckpointError


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ArgumentError as err:
        print(f"pretrain_llama3_syne.py: error: {err}", file=sys.stderr)
        return 2
    from megatron_syne.data.curriculum import CurriculumError
    from megatron_syne.data.mixture_dataset import ComponentExhaustedError
    from megatron_syne.data.spec import SpecError
    from megatron_syne.training.distributed import destroy_distributed
    from megatron_syne.training.loop import NonFiniteLossError, pretrain

    try:
        pretrain(args)
    except (
        CheckpointError,
        NonFiniteLossError,
        FileNotFoundError,
        SpecError,
        CurriculumError,
        ComponentExhaustedError,
    ) as err:
        print(f"pretrain_llama3_syne.py: error: {err}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
