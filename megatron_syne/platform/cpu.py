"""CPU compatibility layer for megatron-core (used only when training with ``--device cpu``).

megatron-core assumes CUDA in many small places: tensors created with ``device="cuda"`` or
``torch.cuda.current_device()``, ``.cuda()`` calls, CUDA RNG states in the model-parallel RNG
tracker, ``param.type() == "torch.cuda.FloatTensor"`` checks in the optimizers, and
``torch.cuda.synchronize()``. On a machine without CUDA each of these raises. This module
redirects them to the CPU so that the unmodified megatron-core model, DDP, optimizers
(distributed optimizer included), pipeline schedules and ``dist_checkpointing`` run over gloo.
Gloo also lacks ``reduce_scatter_tensor`` (sequence parallelism, distributed optimizer); it is
emulated with an all-reduce.

The redirection is process-wide (megatron-core reaches ``torch.cuda`` from dozens of modules),
which is why it lives here, is opt-in through :func:`enable_cpu_compat` and is never imported
by the CUDA path. In a process that called it, "cuda" means the CPU.
"""

from __future__ import annotations

import functools
import logging
import threading

import torch
import torch.distributed as dist

_lock = threading.Lock()
_enabled = False

_FACTORIES = (
    "tensor",
    "empty",
    "zeros",
    "ones",
    "full",
    "arange",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "rand",
    "randn",
    "empty_strided",
)
_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):  # a bare int means a CUDA ordinal
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _redirect_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    wrapper.__syne_cpu_compat__ = True
    return wrapper


def _tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self


_original_tensor_to = torch.Tensor.to


def _tensor_to(self, *args, **kwargs):
    if args and _is_cuda_device(args[0]):
        args = (_CPU, *args[1:])
    if _is_cuda_device(kwargs.get("device")):
        kwargs["device"] = _CPU
    return _original_tensor_to(self, *args, **kwargs)


_original_tensor_type = torch.Tensor.type


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    # megatron-core's optimizers accept params only if type() names a CUDA tensor type.
    if dtype is None and not kwargs:
        name = _original_tensor_type(self)
        if self.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
            return "torch.cuda." + name[len("torch.") :]
        return name
    if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
        dtype = "torch." + dtype[len("torch.cuda.") :]
    return _original_tensor_type(self, dtype, non_blocking, **kwargs)


def _reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
    # gloo has no reduce_scatter: all-reduce a copy, keep this rank's slice (dim 0, as NCCL).
    reduced = input.clone()
    dist.all_reduce(reduced, op=op, group=group)
    rank = dist.get_rank(group)
    chunk = output.numel()
    output.copy_(reduced.reshape(-1)[rank * chunk : (rank + 1) * chunk].view_as(output))
    if async_op:
        return _CompletedWork()
    return None


class _CompletedWork:
    """A finished ``dist.Work`` stand-in for the emulated collectives."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state_all = lambda: [torch.get_rng_state()]
    cuda.set_rng_state_all = lambda states: torch.set_rng_state(states[0])
    cuda.Stream = _NullStream
    cuda.stream = lambda stream=None: _NullStream()
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    # The tracker swaps "CUDA" generator states around model-parallel regions; on CPU the CPU
    # default generator plays that role.
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )

    class _DropExpectedWarning(logging.Filter):
        # With one generator for "CPU" and "CUDA" the tracker's CPU-state check always fires.
        def filter(self, record: logging.LogRecord) -> bool:
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mcore_random.__name__).addFilter(_DropExpectedWarning())


def _patch_collectives() -> None:
    dist.reduce_scatter_tensor = _reduce_scatter_tensor
    if hasattr(dist, "_reduce_scatter_base"):
        dist._reduce_scatter_base = _reduce_scatter_tensor


def _keep_default_device_contexts_working(originals) -> None:
    # ``with torch.device("meta"):`` (transformers' from_pretrained, accelerate) fills in the
    # device only for functions in torch.utils._device._device_constructors(), a cached set of
    # the torch factories. Computed after the wrapping above it holds the wrappers, while the
    # call that reaches the mode is the original inside them: the tensor would land on the CPU
    # instead of meta and be left uninitialised by the later to_empty() (garbage RoPE inv_freq).
    # Accept both the wrappers and the originals.
    from torch.utils import _device

    base = _device._device_constructors

    @functools.lru_cache(1)
    def _device_constructors():
        return set(base()) | set(originals)

    _device._device_constructors = _device_constructors


def enable_cpu_compat() -> None:
    """Make megatron-core run on CPU in this process. Idempotent and thread-safe.

    Call before building models, optimizers or loading checkpoints. Not reversible: use it only
    in processes that train on the CPU.
    """
    global _enabled
    with _lock:
        if _enabled:
            return
        originals = [getattr(torch, name) for name in _FACTORIES]
        for name, original in zip(_FACTORIES, originals):
            setattr(torch, name, _redirect_device(original))
        _keep_default_device_contexts_working(originals)
        torch.Tensor.cuda = _tensor_cuda
        torch.Tensor.to = _tensor_to
        torch.Tensor.type = _tensor_type
        _patch_torch_cuda()
        _patch_megatron_rng()
        _patch_collectives()
        _enabled = True


def cpu_compat_enabled() -> bool:
    """Whether :func:`enable_cpu_compat` has run in this process."""
    return _enabled
