"""Timing, memory and roofline helpers for the kernel benchmarks in the root ``kernels/`` folder.

The benchmarks print the floor first (FLOPs and bytes an ideal implementation must spend, and
the time that takes at the card's measured bandwidth / matrix throughput), then measure each
implementation against it. Measurements use CUDA events on GPU, ``perf_counter`` on CPU.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

# Datasheet peaks, only used when a measurement is impossible (CPU) or as a label.
H100_SXM_HBM_BYTES_PER_S = 3.35e12
H100_SXM_BF16_DENSE_FLOPS = 989e12


@dataclasses.dataclass
class Measurement:
    """One implementation's result: median time over ``iters`` runs and peak extra memory."""

    name: str
    time_ms: float
    peak_extra_mib: float | None  # above what was allocated before the run; None on CPU
    max_abs_err: float | None = None
    note: str = ""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    name: str,
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 2,
    iters: int = 5,
    setup: Callable[[], None] | None = None,
) -> Measurement:
    """Median wall time of ``fn()`` and its peak memory above the allocation at entry.

    ``setup`` runs before every call outside the timed region (e.g. clearing ``.grad``).
    """
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    synchronize(device)
    peak = None
    if device.type == "cuda":
        if setup:
            setup()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    times = []
    for _ in range(iters):
        if setup:
            setup()
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Measurement(name, statistics.median(times), peak)


def measured_copy_bandwidth(device: torch.device, mib: int = 1024) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the practical HBM ceiling."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    result = measure("copy", lambda: dst.copy_(src), device, warmup=2, iters=10)
    return 2 * n * 4 / (result.time_ms / 1e3)


def measured_matmul_flops(
    device: torch.device, m: int, n: int, k: int, dtype: torch.dtype
) -> tuple[float, float]:
    """(FLOP/s, ms) of one ``[m, k] @ [k, n]`` product in ``dtype``."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    result = measure("matmul", lambda: a @ b, device, warmup=2, iters=5)
    return 2 * m * n * k / (result.time_ms / 1e3), result.time_ms


def cross_entropy_floor(n_tokens: int, vocab: int, elem_bytes: int) -> dict[str, float]:
    """Minimum traffic of cross-entropy forward+backward over materialised logits.

    The logits must be read once and their gradient written once: ``2 * N * V * elem_bytes``.
    Arithmetic is ~6 FLOPs per logit (max, subtract, exp, add, scale, store), far below the
    bandwidth roof, so the op is memory bound. A two-pass kernel whose second read misses L2
    moves ``3 * N * V * elem_bytes``.
    """
    return {
        "bytes_min": 2.0 * n_tokens * vocab * elem_bytes,
        "bytes_two_pass": 3.0 * n_tokens * vocab * elem_bytes,
        "flops": 6.0 * n_tokens * vocab,
        "fp32_logits_bytes": 4.0 * n_tokens * vocab,
    }


def linear_cross_entropy_floor(n_tokens: int, hidden: int, vocab: int) -> dict[str, float]:
    """FLOPs of the output layer + loss, forward and backward: three ``N x V x H`` products
    (logits, dH = G W, dW = G^T H); compute bound at the card's matrix throughput."""
    return {
        "flops": 3 * 2.0 * n_tokens * vocab * hidden,
        "gemm_flops": 2.0 * n_tokens * vocab * hidden,
    }


def format_table(rows: list[Measurement], floor_ms: float | None = None) -> str:
    """Markdown table: time, x of the floor, peak extra memory, max error vs the reference."""
    lines = [
        "| implementation | time (ms) | x floor | peak extra memory (MiB) | max abs err | note |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        ratio = f"{r.time_ms / floor_ms:.2f}" if floor_ms and r.time_ms == r.time_ms else "-"
        mem = f"{r.peak_extra_mib:.0f}" if r.peak_extra_mib is not None else "n/a"
        err = f"{r.max_abs_err:.2e}" if r.max_abs_err is not None else "-"
        lines.append(f"| {r.name} | {r.time_ms:.3f} | {ratio} | {mem} | {err} | {r.note} |")
    return "\n".join(lines)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"
