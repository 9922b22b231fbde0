"""Backend choice shared by the fused kernels: Triton on CUDA, torch on CPU, interpreter on demand.

The rule (issue 6):

* CUDA tensors run the Triton kernels when ``triton`` imports.
* CPU tensors run the torch implementation of the same algorithm, unless ``TRITON_INTERPRET=1``
  is set in the environment at call time, in which case the Triton kernels run in the Triton
  interpreter (numpy on the CPU; exact in fp32, about 100x slower than torch).
* ``backend="triton"`` / ``backend="torch"`` force a choice (tests use this to run the Triton
  kernels in the interpreter without setting a process-wide environment variable, which would
  otherwise leak into every other test and child process).

Triton reads ``TRITON_INTERPRET`` when a kernel is *decorated* (module import), not when it is
launched. So that the choice can be made per call, kernels decorated for the GPU are wrapped in
an ``InterpretedFunction`` on demand when they have to run on CPU tensors. Kernels therefore must
not call other ``@triton.jit`` helpers (a compiled helper cannot be called from the interpreter).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Literal

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")

try:  # The GPU image may lack Triton only in broken installs; CPU users may not install it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is in requirements.txt
    HAS_TRITON = False


def interpret_requested() -> bool:
    """True when the user asked for the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: Backend, device: torch.device) -> Literal["triton", "torch"]:
    """Pick the implementation for tensors on ``device`` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        return "triton"
    if HAS_TRITON and (device.type == "cuda" or interpret_requested()):
        return "triton"
    return "torch"


_INTERPRETED: dict[int, Any] = {}


def _interpreted(kernel: Any) -> Any:
    # Keyed by id: hashing a JITFunction walks its source, which fails while triton.language
    # is patched for the interpreter. Kernels are module-level objects, so ids are stable.
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    wrapped = _INTERPRETED.get(id(kernel))
    if wrapped is None:
        wrapped = _INTERPRETED[id(kernel)] = (kernel, InterpretedFunction(kernel.fn))
    return wrapped[1]


@contextlib.contextmanager
def _jit_calls_interpreted():
    """Let compiled-mode ``@triton.jit`` functions be called from an interpreted kernel.

    ``tl.max``/``tl.sum`` are themselves ``@triton.jit`` functions of triton's standard library,
    decorated for the GPU when ``TRITON_INTERPRET`` was unset at import; inside the interpreter
    they must run as interpreted functions too. Patched only for the duration of one launch.
    """
    from triton.runtime.jit import JITFunction

    if _INTERPRET_PATCH_DEPTH[0] == 0:
        JITFunction.__call__ = lambda self, *a, **k: _interpreted(self)(*a, **k)
    _INTERPRET_PATCH_DEPTH[0] += 1
    try:
        yield
    finally:
        _INTERPRET_PATCH_DEPTH[0] -= 1
        if _INTERPRET_PATCH_DEPTH[0] == 0:
            JITFunction.__call__ = _ORIGINAL_JIT_CALL[0]


_INTERPRET_PATCH_DEPTH = [0]
_ORIGINAL_JIT_CALL: list[Any] = [None]
if HAS_TRITON:
    from triton.runtime.jit import JITFunction as _JITFunction

    _ORIGINAL_JIT_CALL[0] = _JITFunction.__call__


def launch(kernel: Any, grid: tuple[int, ...], device: torch.device, *args: Any, **kwargs: Any):
    """Launch ``kernel[grid](*args, **kwargs)``, through the interpreter for CPU tensors.

    ``num_warps`` is dropped for the interpreter (it has no meaning there).
    """
    if device.type == "cuda":
        return kernel[grid](*args, **kwargs)
    kwargs.pop("num_warps", None)
    with _jit_calls_interpreted():
        return _interpreted(kernel)[grid](*args, **kwargs)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
