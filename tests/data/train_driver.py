"""Run the training loop with a recorder hook: per step, the (component, sample) pairs and loss.

Usage (under torchrun): python tests/data/train_driver.py RUNS.json
where RUNS.json is a list of ``{"record": path, "argv": [pretrain flags...]}`` run one after the
other in the same processes (imports and process start are paid once).
"""

from __future__ import annotations

import json
import sys

import torch

from megatron_syne.training.arguments import parse_args
from megatron_syne.training.distributed import destroy_distributed
from megatron_syne.training.hooks import TrainingHook
from megatron_syne.training.loop import pretrain


class SampleRecorder(TrainingHook):
    name = "test_sample_recorder"

    def __init__(self, path: str, global_batch_size: int) -> None:
        self.path = path
        self.global_batch_size = global_batch_size

    def on_step_end(self, state) -> None:
        start = state.consumed_samples - self.global_batch_size
        samples = [state.train_dataset.locate(i) for i in range(start, state.consumed_samples)]
        if torch.distributed.get_rank() == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                record = {"iteration": state.iteration, "loss": state.last_loss, "samples": samples}
                f.write(json.dumps(record) + "\n")


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        runs = json.load(f)
    try:
        # The process group stays up between runs (initialize_distributed is then a no-op).
        for run in runs:
            args = parse_args(run["argv"])
            pretrain(args, hooks=[SampleRecorder(run["record"], args.global_batch_size)])
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
