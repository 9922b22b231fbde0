"""Compile the Triton kernels for a GPU architecture without a GPU (ahead of time).

The interpreter tests check what the kernels compute, but not that they compile for a real GPU:
a dtype the PTX backend rejects, a block that does not fit, or a launch configuration that
spills registers only shows up on the card. Triton's CUDA backend ships ``ptxas`` and
``cuobjdump``, so every kernel can be lowered to a ``sm_90`` (H100/H200) cubin on a CPU-only
machine, with the launch parameters the dispatcher uses for Llama-3's vocabulary, and its
resource usage (registers, stack, shared memory) read back from the cubin.

    python kernels/aot_report.py --arch 90 --output benchmarks/results/kernels_aot.md

Pointer arguments are declared without Triton's divisibility specialisation (the JIT adds it at
launch when the pointers and strides are 16-aligned), so the cubin is the general variant: it
compiles the same code paths, and its resource usage is an upper bound for the specialised one.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megatron_syne.kernels._dispatch import HAS_TRITON

LLAMA3_VOCAB = 128256
# Element type of each pointer argument, by name; the logits (and their gradient) take the
# compiled dtype. Everything else the kernels receive is fp32 row statistics or int64 targets.
_POINTER_TYPES = {"x_ptr": None, "grad_ptr": None, "target_ptr": "i64"}
DTYPES = ("bf16", "fp16", "fp32")


class AotUnavailable(RuntimeError):
    """Triton or its CUDA backend (ptxas) is not installed: nothing can be compiled."""


@dataclass(frozen=True)
class KernelVariant:
    """One kernel with the compile-time constants of one launch."""

    name: str
    has_logit_sum: bool | None  # None: the kernel has no HAS_LOGIT_SUM switch


@dataclass
class CompileResult:
    kernel: str
    dtype: str
    has_logit_sum: bool | None
    block: int
    num_warps: int
    cubin_bytes: int
    registers: int | None
    stack_bytes: int | None
    local_bytes: int | None
    shared_bytes: int | None


VARIANTS = (
    KernelVariant("_ce_stats_kernel", False),
    KernelVariant("_ce_stats_kernel", True),
    KernelVariant("_ce_grad_kernel", None),
    KernelVariant("_ce_fused_kernel", False),
    KernelVariant("_ce_fused_kernel", True),
)


def _nvidia_tool(name: str) -> Path | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def aot_available() -> bool:
    """True when Triton and its CUDA backend's ``ptxas`` are installed and the kernels were
    decorated for compilation (with ``TRITON_INTERPRET=1`` set at import they are interpreter
    functions, which cannot be lowered)."""
    if not HAS_TRITON or _nvidia_tool("ptxas") is None:
        return False
    from megatron_syne.kernels import cross_entropy

    return all(hasattr(getattr(cross_entropy, v.name), "cache_key") for v in VARIANTS)


def _signature(fn, dtype: str) -> dict[str, str]:
    signature = {}
    for name in fn.arg_names:
        if name in ("HAS_LOGIT_SUM", "BLOCK"):
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            element = _POINTER_TYPES.get(name, "fp32") or dtype
            signature[name] = f"*{element}"
        else:  # row strides and the row length: Python ints below 2**31
            signature[name] = "i32"
    return signature


def _resource_usage(cubin: bytes, kernel: str) -> dict[str, int]:
    """REG/STACK/SHARED/LOCAL of ``kernel`` in ``cubin`` (cuobjdump), {} when not available."""
    tool = _nvidia_tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kernel}.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [str(tool), "--dump-resource-usage", str(path)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    match = re.search(rf"Function {re.escape(kernel)}:\s*\n\s*(.*)", out)
    if not match:
        return {}
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", match.group(1))}


def compile_variant(
    variant: KernelVariant, dtype: str = "bf16", arch: int = 90, n_cols: int = LLAMA3_VOCAB
) -> CompileResult:
    """Compile one kernel for ``sm_<arch>`` with the block and warps launched for ``n_cols``."""
    if not aot_available():
        raise AotUnavailable(
            "ahead-of-time compilation needs triton with its CUDA backend (ptxas), and the "
            "kernels imported without TRITON_INTERPRET=1; install the triton wheel pinned in "
            "requirements.txt and unset TRITON_INTERPRET"
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megatron_syne.kernels import cross_entropy

    fn = getattr(cross_entropy, variant.name)
    block, num_warps = cross_entropy._block_and_warps(n_cols)
    constants = {"BLOCK": block}
    if variant.has_logit_sum is not None:
        constants["HAS_LOGIT_SUM"] = variant.has_logit_sum
    names = fn.arg_names
    source = ASTSource(
        fn=fn,
        signature=_signature(fn, dtype),
        constexprs={(names.index(k),): v for k, v in constants.items()},
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
    )
    cubin = compiled.asm["cubin"]
    usage = _resource_usage(cubin, variant.name)
    return CompileResult(
        kernel=variant.name,
        dtype=dtype,
        has_logit_sum=variant.has_logit_sum,
        block=block,
        num_warps=num_warps,
        cubin_bytes=len(cubin),
        registers=usage.get("REG"),
        stack_bytes=usage.get("STACK"),
        local_bytes=usage.get("LOCAL"),
        shared_bytes=usage.get("SHARED"),
    )


def compile_all(
    arch: int = 90, dtypes: tuple[str, ...] = ("bf16",), n_cols: int = LLAMA3_VOCAB
) -> list[CompileResult]:
    """Every kernel variant in every dtype, compiled for ``sm_<arch>``."""
    return [
        compile_variant(variant, dtype, arch, n_cols) for dtype in dtypes for variant in VARIANTS
    ]


def format_table(results: list[CompileResult], arch: int, n_cols: int) -> str:
    def show(value) -> str:
        return "-" if value is None else f"{value:,}"

    lines = [
        f"Ahead-of-time compile for sm_{arch} (no GPU needed), launch parameters for a "
        f"{n_cols:,}-column vocabulary row; resource usage from the cubin (cuobjdump).",
        "",
        "| kernel | dtype | HAS_LOGIT_SUM | BLOCK | warps | cubin bytes | registers/thread "
        "| stack bytes | local bytes | shared bytes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        flag = "-" if r.has_logit_sum is None else str(r.has_logit_sum)
        lines.append(
            f"| `{r.kernel}` | {r.dtype} | {flag} | {r.block:,} | {r.num_warps} | "
            f"{r.cubin_bytes:,} | {show(r.registers)} | {show(r.stack_bytes)} | "
            f"{show(r.local_bytes)} | {show(r.shared_bytes)} |"
        )
    return "\n".join(lines)
