"""Throughput accounting (FLOPs, MFU) and metric sinks (stdout, TensorBoard, JSONL).

FLOPs follow the PaLM / torchtitan convention so MFU numbers compare with theirs: per trained
token, ``6 * N`` for the matmul parameters (everything except the input embedding table; the
output projection counts once even when tied) plus ``12 * L * H * D * S`` for attention scores
and values (H query heads of dimension D, sequence S, no causal discount).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from megatron_syne.models.presets import ModelPreset

# Dense BF16 peak TFLOP/s per device (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,
    "H800": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
}


def matmul_parameters(preset: ModelPreset, vocab_size: int | None = None) -> int:
    """Parameters that take part in a matmul per token (input embedding table excluded)."""
    h, f = preset.hidden_size, preset.ffn_hidden_size
    q = preset.num_attention_heads * preset.kv_channels
    kv = 2 * preset.num_query_groups * preset.kv_channels
    per_layer = h * (q + kv) + q * h + 3 * h * f
    return preset.num_layers * per_layer + (vocab_size or preset.vocab_size) * h


def training_flops_per_token(
    preset: ModelPreset, seq_length: int, vocab_size: int | None = None
) -> float:
    """Forward + backward FLOPs per trained token."""
    attention = (
        12 * preset.num_layers * preset.num_attention_heads * preset.kv_channels * seq_length
    )
    return 6 * matmul_parameters(preset, vocab_size) + attention


def detect_peak_tflops(device: str) -> float | None:
    """Per-device dense BF16 peak for known GPUs; None on CPU or unknown cards."""
    if device != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


@dataclass
class StepTimer:
    """Wall time between log points (synchronises CUDA so the time covers the GPU work)."""

    start: float = 0.0

    def reset(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter() - self.start


class MetricWriter:
    """Writes one record per log point to stdout, TensorBoard and a JSONL file (rank 0 only)."""

    def __init__(self, enabled: bool, tensorboard_dir: str | None, jsonl_path: str | None):
        self.enabled = enabled
        self.tensorboard = None
        self.jsonl = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=tensorboard_dir)
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self.jsonl = open(jsonl_path, "a", buffering=1)

    def scalars(self, step: int, values: dict[str, float], line: str | None = None) -> None:
        if not self.enabled:
            return
        if line is not None:
            print(line, flush=True)
        if self.tensorboard is not None:
            for name, value in values.items():
                if value is not None and math.isfinite(value):
                    self.tensorboard.add_scalar(name, value, step)
        if self.jsonl is not None:
            record = {"iteration": step}
            record.update(
                {k: (v if v is None or math.isfinite(v) else str(v)) for k, v in values.items()}
            )
            self.jsonl.write(json.dumps(record) + "\n")

    def text(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()
            self.tensorboard.close()
        if self.jsonl is not None:
            self.jsonl.close()
