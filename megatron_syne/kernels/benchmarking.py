"""Timing, memory and roofline helpers for the kernel benchmarks in the root ``kernels/`` folder.

The benchmarks print the floor first (FLOPs and bytes an ideal implementation must spend, and
the time that takes at the card's measured bandwidth / matrix throughput), then measure each
implementation against it. Measurements use CUDA events on GPU, ``perf_counter`` on CPU.

Shared by every script: the command-line arguments (:func:`add_common_arguments`), the report
(:class:`Report`: header with the device, printed and written atomically), the measurement and
the markdown table; and the memory accounting of the fused head (:func:`peak_extra_memory`,
:func:`flce_expected_extra_bytes`).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

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


def skipped(name: str, reason: str) -> Measurement:
    """A table row for an implementation that could not run here (never a faked number)."""
    return Measurement(name, float("nan"), None, note=f"skipped: {reason}")


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
    max_abs_err: float | None = None,
    note: str = "",
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
    return Measurement(name, statistics.median(times), peak, max_abs_err, note)


def tokens_per_second(n_tokens: int, time_ms: float) -> str:
    return f"{n_tokens / (time_ms / 1e3):,.0f} tokens/s"


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


# ---------------------------------------------------------------------------------------------
# Command line and report shared by the scripts
# ---------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device --small --tokens --hidden --vocab --dtype --warmup --iters --output``; the
    defaults are the issue's shapes (N = 8192 tokens, H = 4096, V = 128256)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument(
        "--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--output", type=Path, help="also write the markdown report here")


def bench_dtype(dtype_name: str | None, device: torch.device) -> torch.dtype:
    """``--dtype`` as a torch dtype: bf16 on GPU and fp32 on CPU unless given."""
    name = dtype_name or ("bf16" if device.type == "cuda" else "fp32")
    return torch.bfloat16 if name == "bf16" else torch.float32


class Report:
    """Markdown sections printed as they are produced and optionally written to a file."""

    def __init__(self, title: str, device: torch.device, level: int = 2) -> None:
        self.sections: list[str] = []
        self.add(
            f"{'#' * level} {title} on {device_label(device)} (torch {torch.__version__}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"
        )

    def add(self, text: str) -> None:
        print(text, flush=True)
        self.sections.append(text)

    def write(self, path: Path | None) -> None:
        if path is None:
            return
        from megatron_syne.utils.io import atomic_open

        with atomic_open(path) as f:
            f.write("\n\n".join(self.sections) + "\n")


def random_head_inputs(
    n_tokens: int, hidden: int, vocab: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [N, H], weight [V, H] with unit-variance logits, target [N]) for head benchmarks."""
    generator = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n_tokens, hidden, device=device, generator=generator).to(dtype)
    w = torch.randn(vocab, hidden, device=device, generator=generator) * hidden**-0.5
    target = torch.randint(0, vocab, (n_tokens,), device=device, generator=generator)
    return h, w.to(dtype), target


# ---------------------------------------------------------------------------------------------
# Peak extra memory of the fused head
# ---------------------------------------------------------------------------------------------

MIB = 2**20


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def reset_peak_rss() -> None:
    """Reset the kernel's peak resident set size (VmHWM) of this process to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def resident_bytes(t: torch.Tensor | None) -> int:
    """Bytes of ``t``'s storage resident in RAM (``mincore``): pages never written (e.g. a
    ``torch.empty`` never filled) cost no RSS, so they must not be subtracted from it."""
    if t is None:
        return 0
    start, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    page = os.sysconf("SC_PAGE_SIZE")
    aligned = start - start % page
    length = start + nbytes - aligned
    pages = (length + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mincore(ctypes.c_void_p(aligned), ctypes.c_size_t(length), vec) != 0:
        return nbytes  # not mapped memory we can query: assume all of it is resident
    return min(nbytes, bytes(vec).translate(bytes([b & 1 for b in range(256)])).count(1) * page)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def pin_malloc_mmap_threshold(threshold_bytes: int = 128 * 1024) -> bool:
    """Make glibc serve every allocation of at least ``threshold_bytes`` with its own ``mmap``.

    glibc raises its mmap threshold (up to 32 MiB) each time an mmapped block is freed, after
    which blocks below it come from the heap, whose freed pages stay resident: peak RSS would
    then over-count tensors under 32 MiB. Setting the threshold explicitly turns the dynamic
    adjustment off. Returns False where it is not glibc.
    """
    try:
        return ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1
    except (AttributeError, OSError):
        return False


def release_freed_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc ``malloc_trim``), so the
    baseline RSS of the next measurement is not inflated by the previous one."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


@dataclasses.dataclass
class MemoryResult:
    """Peak memory of one call above its baseline, and what it handed back."""

    peak_above_baseline: int  # bytes
    returned: int  # bytes of the returned gradients (resident bytes on CPU)

    @property
    def extra(self) -> int:
        return self.peak_above_baseline - self.returned


def peak_extra_memory(
    run: Callable[[], Sequence[torch.Tensor | None]], device: torch.device
) -> MemoryResult:
    """Run ``run()`` once; it returns the gradients it produced (e.g. ``[h.grad, w.grad]``).

    Extra memory = peak during the call - memory at entry (inputs, main_grad) - the returned
    gradients. CUDA: ``torch.cuda.max_memory_allocated`` (allocator bytes). CPU: the process's
    peak RSS (``VmHWM`` after ``clear_refs``); with :func:`pin_malloc_mmap_threshold` (called
    here; call it before allocating the inputs too) every tensor over 128 KiB is its own
    ``mmap``, returned to the OS when freed, so RSS follows live tensors; the returned gradients
    count with their resident pages.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        grads = run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        returned = sum(g.untyped_storage().nbytes() for g in grads if g is not None)
        return MemoryResult(peak - base, returned)
    pin_malloc_mmap_threshold()
    release_freed_memory()
    base = _proc_status_kib("VmRSS") * 1024
    reset_peak_rss()
    grads = run()
    peak = _proc_status_kib("VmHWM") * 1024
    return MemoryResult(peak - base, sum(resident_bytes(g) for g in grads))


def flce_expected_extra_bytes(
    schedule: str,
    n_tokens: int,
    hidden: int,
    vocab: int,
    dtype: torch.dtype,
    chunk_tokens: int,
    chunk_vocab: int,
    main_grad: bool,
    torch_path: bool,
) -> dict[str, int]:
    """Analytic extra memory of ``fused_linear_cross_entropy`` at TP = 1, by component (bytes).

    Beyond the inputs and the returned dH / dW in their own dtype: the logits chunk (turned into
    its gradient in place); the token schedule's fp32 ``V x H`` accumulator unless ``dW`` goes to
    ``main_grad`` or the weight is fp32 (then the accumulator IS the returned gradient); the
    vocab schedule's fp32 ``N x H`` ``dH`` accumulator (likewise free for fp32) and 16-20 bytes
    per token of row statistics; on the torch (CPU) path two fp32 temporaries of at most
    ``TORCH_CHUNK_ELEMENTS`` elements each in the softmax / gradient code.
    """
    from megatron_syne.kernels.cross_entropy import TORCH_CHUNK_ELEMENTS

    elem = torch.empty((), dtype=dtype).element_size()
    parts: dict[str, int] = {}
    if schedule == "tokens":
        chunk = min(chunk_tokens, n_tokens)
        parts["logits chunk"] = chunk * vocab * elem
        if not main_grad and dtype != torch.float32:
            parts["fp32 dW accumulator"] = vocab * hidden * 4
        cols = vocab
    else:
        chunk = min(chunk_vocab, vocab)
        parts["logits chunk"] = n_tokens * chunk * elem
        if dtype != torch.float32:
            parts["fp32 dH accumulator"] = n_tokens * hidden * 4
        parts["row statistics"] = 20 * n_tokens
        cols = chunk
    if torch_path:
        rows = max(1, TORCH_CHUNK_ELEMENTS // cols)
        parts["torch-path temporaries"] = 2 * min(rows * cols, parts["logits chunk"] // elem) * 4
    return parts


def unfused_expected_extra_bytes(n_tokens: int, vocab: int, dtype: torch.dtype) -> dict[str, int]:
    """``F.cross_entropy((h @ W^T).float(), t)`` at its backward peak: the saved fp32
    log-softmax, the gradient nll_loss hands to it, the fp32 gradient of the logits and, for
    bf16, that gradient cast back to bf16 for the two GEMMs (the forward peak, logits + upcast +
    log-softmax, is lower)."""
    elem = torch.empty((), dtype=dtype).element_size()
    logits = n_tokens * vocab
    parts = {
        "fp32 log-softmax (saved)": logits * 4,
        "its gradient (nll_loss backward)": logits * 4,
        "fp32 gradient of the logits": logits * 4,
    }
    if elem != 4:
        parts["gradient cast to the logits' dtype"] = logits * elem
    return parts
