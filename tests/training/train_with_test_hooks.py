"""Test launcher: ``pretrain`` with hooks that simulate failures (crash, non-finite loss).

    python tests/training/train_with_test_hooks.py [--crash-at N] [--nan-at N ...]
        [--nan-from N] <pretrain_llama3_syne.py flags>

Prints ``HOOK <name> <count>`` lines so tests can check that hook state survives a resume.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from megatron_syne.training.arguments import parse_args
from megatron_syne.training.checkpointing import unwrap_model
from megatron_syne.training.hooks import TrainingHook
from megatron_syne.training.loop import NonFiniteLossError, pretrain


class StepCounter(TrainingHook):
    """Counts steps; its count lives in checkpoints, so after a resume it continues."""

    name = "step_counter"

    def __init__(self) -> None:
        self.count = 0

    def on_train_start(self, state) -> None:
        if state.args.device == "cpu" and int(os.environ.get("RANK", "0")) == 0:
            print(f"HOOK start {self.count}", flush=True)

    def on_step_end(self, state) -> None:
        self.count += 1

    def on_train_end(self, state) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"HOOK end {self.count}", flush=True)

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


class CrashAt(TrainingHook):
    """Kills the process without cleanup right after step ``iteration`` (like a node failure)."""

    name = "crash"

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def on_step_end(self, state) -> None:
        if state.iteration == self.iteration:
            sys.stdout.flush()
            os._exit(17)


def _poison_output(module, inputs, output):
    if isinstance(output, tuple):
        return (output[0] * float("nan"), *output[1:])
    return output * float("nan")


class InjectNaN(TrainingHook):
    """Makes the output of the first layer NaN during the given steps (1-based iterations)."""

    name = "inject_nan"

    def __init__(self, at: list[int], start: int | None) -> None:
        self.at, self.start = set(at), start
        self.handle = None

    def _poisoned(self, iteration: int) -> bool:
        return iteration in self.at or (self.start is not None and iteration >= self.start)

    def _arm(self, state, next_iteration: int) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self._poisoned(next_iteration):
            layer = unwrap_model(state.model_chunks[0]).decoder.layers[0]
            self.handle = layer.register_forward_hook(_poison_output)

    def on_train_start(self, state) -> None:
        self._arm(state, state.iteration + 1)

    def on_step_end(self, state) -> None:
        self._arm(state, state.iteration + 1)


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--crash-at", type=int)
    parser.add_argument("--nan-at", type=int, nargs="*", default=[])
    parser.add_argument("--nan-from", type=int)
    # torchrun swallows a "--" separator, so the launcher's own flags are picked out by name.
    own, train_flags = parser.parse_known_args(sys.argv[1:])
    hooks: list[TrainingHook] = [StepCounter()]
    if own.crash_at:
        hooks.append(CrashAt(own.crash_at))
    if own.nan_at or own.nan_from:
        hooks.append(InjectNaN(own.nan_at, own.nan_from))
    torch.set_num_threads(1)
    try:
        pretrain(parse_args(train_flags), hooks=hooks)
    except NonFiniteLossError as err:
        print(f"STOPPED: {err}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
