"""megatron-core ``torch_dist`` checkpoints of global (unsharded) tensors, written and read
without holding the model in memory.

Writing: megatron-core's ``dist_checkpointing.save`` needs every tensor of the checkpoint in one
state dict. The converter therefore writes each converted tensor once to a scratch file and hands
``save`` tensors *memory-mapped* from it: the process's own (anonymous) memory stays at about one
tensor, the mapped pages are page cache the kernel can drop at any time, and ``save``'s writer
processes stream them to the checkpoint files. The scratch file (as large as the checkpoint) is
deleted afterwards.

Reading: one layer's slice of a stacked tensor at a time through ``dist_checkpointing.load``.

Directory layout (Megatron-LM's, which the training loop's ``--load`` reads)::

    <root>/latest_checkpointed_iteration.txt   # "<iteration>", replaced last and atomically
    <root>/iter_0000000/                        # metadata.json, common.pt, .metadata, *.distcp
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from megatron_syne.convert.arch import ConversionError
from megatron_syne.utils.io import atomic_open

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"


def checkpoint_iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    """``<root>/iter_{iteration:07d}`` (Megatron-LM's naming)."""
    return Path(root) / f"iter_{iteration:07d}"


def write_tracker(root: str | os.PathLike, iteration: int) -> None:
    """Point ``<root>/latest_checkpointed_iteration.txt`` at ``iteration`` (atomic replace)."""
    with atomic_open(Path(root) / TRACKER_FILENAME) as f:
        f.write(f"{iteration}\n")


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The ``torch_dist`` directory for ``path``: itself, or the iteration its tracker names.

    ``path`` is a save root (with ``latest_checkpointed_iteration.txt``) or an ``iter_*``
    directory. ConversionError when neither holds a complete checkpoint.
    """
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    tracker = path / TRACKER_FILENAME
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            candidate = path / "release"
        else:
            try:
                candidate = checkpoint_iteration_dir(path, int(text))
            except ValueError:
                raise ConversionError(
                    f"{tracker}: expected an iteration number, found {text!r}"
                ) from None
        if not (candidate / "metadata.json").is_file():
            raise ConversionError(
                f"{tracker} names {candidate.name}, but {candidate} holds no complete torch_dist "
                "checkpoint (metadata.json missing); the save was interrupted or files were removed"
            )
        return candidate
    if not path.exists():
        raise ConversionError(f"{path}: no such checkpoint directory (--load)")
    raise ConversionError(
        f"{path}: not a Megatron torch_dist checkpoint: it has neither metadata.json nor "
        f"{TRACKER_FILENAME}"
    )


@contextlib.contextmanager
def _cuda_free_checkpointing() -> Iterator[None]:
    """Let ``dist_checkpointing`` run in a process without CUDA, for the duration only.

    Its save path calls ``torch.cuda.synchronize()`` and puts a one-element status tensor on
    ``torch.cuda.current_device()``. Those two are redirected to the CPU while the converter
    runs and restored afterwards, instead of megatron_syne's process-wide CPU layer (which
    patches torch's tensor factories and would change other code in the caller's process).
    """
    if torch.cuda.is_available():
        yield
        return
    saved = (torch.cuda.synchronize, torch.cuda.current_device)
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_device = lambda: torch.device("cpu")
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A one-process gloo group for ``dist_checkpointing`` (which needs torch.distributed).

    Uses a file rendezvous, so no port is taken; an existing group is reused (and kept).
    """
    with _cuda_free_checkpointing():
        if torch.distributed.is_initialized():
            yield
            return
        with tempfile.TemporaryDirectory(prefix="convert-pg-") as tmp:
            torch.distributed.init_process_group(
                "gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1
            )
            try:
                yield
            finally:
                torch.distributed.destroy_process_group()


class ScratchTensorStore:
    """Tensors written once to a scratch file and mapped back read-only (copy-on-write).

    Each returned tensor owns a mapping of exactly its bytes, so ``dist_checkpointing``
    neither clones it nor sees it as a view of a larger storage.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "tensors.bin"
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self.nbytes = 0

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        offset = self._file.tell()
        self._file.write(data)
        self._file.flush()
        self.nbytes += data.nbytes
        mapped = np.memmap(self.path, dtype=np.uint8, mode="c", offset=offset, shape=(data.nbytes,))
        return torch.from_numpy(mapped).view(tensor.dtype).reshape(tensor.shape)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def sharded_state_dict_for(
    tensors: list[tuple[str, int | None, int, torch.Tensor]],
    extra_state_keys: list[tuple[str, int]],
) -> dict[str, Any]:
    """A megatron-core sharded state dict of global tensors, laid out as GPTModel saves them.

    ``tensors`` holds ``(key, layer, num_layers, tensor)``; ``layer`` None for non-stacked keys.
    Stacked keys get megatron-core's leading layer axis (one chunk per layer, ``prepend_axis``),
    so they load under any pipeline split. ``extra_state_keys`` are ``(key, num_layers)`` of the
    per-layer ``_extra_state`` objects (None for the local spec's linears).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    state: dict[str, Any] = {}
    for i, (key, layer, num_layers, tensor) in enumerate(tensors):
        if layer is None:
            sharded = ShardedTensor.from_rank_offsets(key, tensor, replica_id=0)
        else:
            sharded = ShardedTensor.from_rank_offsets(
                key, tensor, (0, layer, num_layers), replica_id=0, prepend_axis_num=1
            )
        state[f"t{i}:{key}:{layer}"] = sharded
    for key, num_layers in extra_state_keys:
        for layer in range(num_layers):
            state[f"x:{key}:{layer}"] = ShardedObject(
                f"{key}._extra_state", None, (num_layers,), (layer,), replica_id=0
            )
    return state


def _prestart_results_queue() -> None:
    """Give megatron-core's checkpoint writer a result queue from a *forked* manager.

    megatron-core creates it lazily through a ``spawn`` manager, whose child re-imports the
    ``__main__`` module (torch and all): about 10 s per conversion on a busy machine, for a queue.
    The converter never initialises CUDA, so forking is safe here. Skipped (megatron-core's
    default then applies) where the private hook does not exist.
    """
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "missing") is None and not (
        torch.cuda.is_available() and torch.cuda.is_initialized()
    ):
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()


def save_torch_dist(checkpoint_dir: Path, sharded_state: dict[str, Any]) -> None:
    """``dist_checkpointing.save`` into a fresh directory (created here; must not exist)."""
    from megatron.core import dist_checkpointing

    checkpoint_dir.mkdir(parents=True, exist_ok=False)
    _prestart_results_queue()
    dist_checkpointing.save(sharded_state, str(checkpoint_dir))


@contextlib.contextmanager
def scratch_dir_beside(final_dir: Path, scratch_root: str | os.PathLike | None) -> Iterator[Path]:
    """A scratch directory (on ``scratch_root`` or next to ``final_dir``), removed afterwards."""
    root = Path(scratch_root) if scratch_root else final_dir.parent
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.scratch-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _short(exc: BaseException) -> str:
    """One line for an error message: torch's checkpoint errors embed whole tracebacks."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {(lines[-1] if lines else '')[:300]}"


class MegatronCheckpointReader:
    """Read global tensors of a ``torch_dist`` checkpoint one chunk (layer) at a time."""

    def __init__(self, path: str | os.PathLike):
        from megatron.core import dist_checkpointing

        self.checkpoint_dir = resolve_checkpoint_dir(path)
        try:
            self.metadata = dist_checkpointing.load_tensors_metadata(str(self.checkpoint_dir))
            self.common = dist_checkpointing.load_common_state_dict(str(self.checkpoint_dir))
        # torch/megatron raise many types for unreadable files; torch's CheckpointException is
        # a BaseException.
        except (Exception, CheckpointException) as exc:
            raise ConversionError(
                f"{self.checkpoint_dir}: cannot read the checkpoint metadata ({_short(exc)}); "
                "the checkpoint is incomplete or corrupt"
            ) from None

    def has(self, key: str) -> bool:
        return key in self.metadata

    def global_shape(self, key: str) -> tuple[int, ...]:
        if key not in self.metadata:
            raise ConversionError(
                f"{self.checkpoint_dir}: tensor {key!r} is not in the checkpoint; it holds "
                f"{sorted(self.metadata)[:12]}"
            )
        return tuple(self.metadata[key].global_shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata[key].dtype

    def read(
        self, key: str, layer: int | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The global tensor ``key`` (or layer ``layer`` of a stacked key), in ``dtype``."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        shape = self.global_shape(key)
        dtype = dtype or self.dtype(key)
        if layer is None:
            target = torch.empty(shape, dtype=dtype)
            request = ShardedTensor.from_rank_offsets(key, target, replica_id=0)
        else:
            if not 0 <= layer < shape[0]:
                raise ConversionError(f"{key}: layer {layer} out of range [0, {shape[0]})")
            # A [1, ...] slice at offset ``layer`` of the leading axis (no prepend_axis: with
            # one process megatron-core only loads partial chunk sets in this form).
            target = torch.empty((1, *shape[1:]), dtype=dtype)
            request = ShardedTensor.from_rank_offsets(
                key, target, (0, layer, shape[0]), replica_id=0
            )
        try:
            dist_checkpointing.load(
                {"t": request}, str(self.checkpoint_dir), validate_access_integrity=False
            )
        except (Exception, CheckpointException) as exc:
            raise ConversionError(
                f"{self.checkpoint_dir}: cannot read {key!r}"
                f"{'' if layer is None else f' layer {layer}'} ({_short(exc)}); "
                "the checkpoint files are truncated or corrupt"
            ) from None
        return target if layer is None else target[0]
