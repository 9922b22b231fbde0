"""Checkpoints in megatron-core's ``torch_dist`` format, with Megatron-LM's directory layout.

::

    <save>/latest_checkpointed_iteration.txt   # "1200": written atomically, after the checkpoint
    <save>/iter_0001200/                       # dist_checkpointing directory (metadata.json, ...)

A checkpoint is first written to ``iter_XXXXXXX.partial`` and renamed when every rank has
finished, and only then is the ``latest`` marker replaced: a crash mid-save leaves the previous
checkpoint as the one that is resumed. Because tensors are stored with their global
coordinates, a checkpoint loads into any TP/PP/DP layout (the model is resharded on load).

Contents: model (sharded), optimizer (sharded), and common state: iteration, consumed samples/tokens,
the LR scheduler, the flags of the run, the parallel layout, hook states and skipped-step
counters. The distributed optimizer is saved "dp_reshardable" (Megatron-LM's default) unless
``--dist-ckpt-optim-fully-reshardable`` asks for the format that loads into any TP/PP. RNG states are one ``ShardedObject`` per rank, restored only into the same layout.
"""

from __future__ import annotations

import os
import queue
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_syne.utils.io import atomic_open

LATEST_FILE = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the path."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


@dataclass(frozen=True)
class CheckpointLocation:
    directory: Path  # the iter_XXXXXXX directory
    iteration: int


def find_checkpoint(load: str | os.PathLike) -> CheckpointLocation | None:
    """The checkpoint ``--load`` refers to: the root's ``latest`` marker, or an ``iter_`` dir.

    Returns None when ``load`` is an existing directory that holds no checkpoint at all (a fresh
    run with ``--load`` = ``--save``). Raises :class:`CheckpointError` when the directory does
    not exist, the marker is unreadable, or it points to a missing or incomplete checkpoint.
    """
    root = Path(load)
    if not root.is_dir():
        raise CheckpointError(
            f"--load {root}: no such directory; pass a directory written by --save (or an "
            "iter_XXXXXXX directory inside it)"
        )
    match = _ITER_DIR.match(root.name)
    if match and (root / "metadata.json").exists():
        return CheckpointLocation(root, int(match.group(1)))
    marker = root / LATEST_FILE
    if not marker.exists():
        complete = [p for p in root.iterdir() if _ITER_DIR.match(p.name)]
        if complete:
            raise CheckpointError(
                f"--load {root}: {LATEST_FILE} is missing but {len(complete)} iter_ directories "
                f"exist; pass one of them directly (e.g. --load {sorted(complete)[-1]})"
            )
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(
            f"{marker}: expected an iteration number, found {text[:40]!r}; the file is corrupt. "
            "Write the iteration of a complete iter_ directory into it, or pass that directory"
        )
    location = CheckpointLocation(iteration_dir(root, int(text)), int(text))
    if not (location.directory / "metadata.json").exists():
        raise CheckpointError(
            f"{marker} points to iteration {text} but {location.directory} is missing or "
            "incomplete (no metadata.json)"
        )
    return location


def _model_key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / Float16Module wrappers: checkpoints hold its keys
    ("embedding.word_embeddings.weight", ...), whatever wrapped it during training."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def _model_sharded_state_dict(model_chunks) -> dict:
    return {
        _model_key(i, len(model_chunks)): unwrap_model(chunk).sharded_state_dict()
        for i, chunk in enumerate(model_chunks)
    }


def _parallel_layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(with_context_parallel=True),
    }


def _optimizer_metadata(optimizer_sharding: str | None) -> dict | None:
    if optimizer_sharding is None:
        return None
    return {"distrib_optim_sharding_type": optimizer_sharding}


def _materialize_distributed_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state to load into (and, without apex/TE, its
    ``state_dict`` asserts on that); megatron-core's own remedy creates placeholder states, which
    the load then overwrites together with the fp32 main parameters."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state:
            with torch.no_grad():
                inner._init_optimizer_states_with_dummy_values()


def _restore_adam_step_counters(optimizer) -> None:
    """Without apex/TE, megatron-core's distributed optimizer keeps Adam's step in the param
    groups of its checkpoint, but when the torch state already exists (it must, see
    :func:`_materialize_distributed_optimizer_state`) the per-parameter ``step`` that torch's
    Adam actually uses for bias correction is not updated. Copy it over, one tensor per
    parameter (torch increments them in place)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        for group in getattr(torch_optimizer, "param_groups", []):
            if "step" not in group or group["step"] is None:
                continue
            for param in group["params"]:
                state = torch_optimizer.state.get(param)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _rng_sharded_object(is_loading: bool):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = None
    if not is_loading:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        }
    layout = _parallel_layout()
    return ShardedObject(
        "rng_state",
        state,
        (layout["pp"], layout["tp"], layout["dp"]),
        (
            ps.get_pipeline_model_parallel_rank(),
            ps.get_tensor_model_parallel_rank(),
            ps.get_data_parallel_rank(with_context_parallel=True),
        ),
        replica_id=0,
    )


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _use_in_process_write_results_queue() -> None:
    """megatron-core's torch_dist writer reports results through a queue that it creates with
    a *spawned* ``multiprocessing.Manager`` (a whole Python process: seconds per run, and one
    that outlives a crashed trainer holding its stdout). For synchronous saves, which is all we
    do, the queue is only used inside this process, so a plain ``queue.Queue`` serves."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(
    save: str | os.PathLike,
    iteration: int,
    model_chunks: list,
    optimizer,
    scheduler,
    common: dict,
    optimizer_sharding: str | None = None,
) -> Path:
    """Write ``<save>/iter_<iteration>`` and then move the ``latest`` marker to it.

    ``common`` holds picklable, rank-independent state (counters, args, hook states); it is
    stored by rank 0. ``optimizer_sharding`` is the distributed optimizer's format
    ("dp_reshardable": fast, loads only with the same TP/PP; "fully_reshardable": gathered on
    save, loads into any layout); None for the regular optimizer (always reshardable).
    Must be called on every rank. Returns the checkpoint directory.
    """
    from megatron.core import dist_checkpointing

    _use_in_process_write_results_queue()
    root = Path(save)
    final_dir = iteration_dir(root, iteration)
    partial_dir = final_dir.with_name(final_dir.name + ".partial")
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial_dir.exists():  # left by a crash during an earlier save of this iteration
            shutil.rmtree(partial_dir)
        partial_dir.mkdir()
    dist.barrier()

    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=False, metadata=_optimizer_metadata(optimizer_sharding)
        )
    state["rng_state"] = _rng_sharded_object(is_loading=False)
    state["opt_param_scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["has_optimizer"] = optimizer is not None
    state["optimizer_sharding"] = optimizer_sharding
    state["checkpoint_version"] = FORMAT_VERSION
    state["iteration"] = iteration
    state["parallel_layout"] = _parallel_layout()
    state.update(common)
    dist_checkpointing.save(state, str(partial_dir))

    dist.barrier()
    if rank == 0:
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(partial_dir, final_dir)
        with atomic_open(root / LATEST_FILE) as f:
            f.write(f"{iteration}\n")
    dist.barrier()
    return final_dir


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored. ``common`` is the checkpoint's common state."""

    directory: Path
    iteration: int
    common: dict
    loaded_optimizer: bool
    loaded_rng: bool


def _describe(err: BaseException) -> str:
    """One line per failing rank, without the tracebacks torch embeds in its message."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, failure in sorted(failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else getattr(failure, "exc", failure)
            detail = str(inner).strip()[:200] or "(no message; a truncated file reads like this)"
            parts.append(f"rank {rank}: {type(inner).__name__}: {detail}")
        return "; ".join(parts)
    return f"{type(err).__name__}: {str(err).strip()[:500]}"


def _load(state: dict, directory: Path) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    try:
        return dist_checkpointing.load(
            state, str(directory), strict=StrictHandling.RAISE_UNEXPECTED
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    # torch.distributed.checkpoint wraps per-rank failures in a BaseException subclass.
    except BaseException as err:  # noqa: B036
        raise CheckpointError(
            f"cannot load checkpoint {directory}: {_describe(err)}. The checkpoint "
            "may be incomplete or corrupt, or written for another model shape (compare --model "
            "and shape flags with the run that saved it)"
        ) from err


def load_checkpoint(
    load: str | os.PathLike,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    load_optim: bool = True,
    load_rng: bool = True,
) -> LoadedCheckpoint | None:
    """Restore model (and optionally optimizer, scheduler, RNG) from ``load``.

    Returns None when ``load`` holds no checkpoint yet (see :func:`find_checkpoint`). RNG
    states are restored only when the saved TP/PP/DP layout equals the current one (otherwise
    they cannot correspond rank by rank; a message says so). Every rank must call this.
    """
    from megatron.core import dist_checkpointing

    location = find_checkpoint(load)
    if location is None:
        return None
    try:
        common = dist_checkpointing.load_common_state_dict(str(location.directory))
    except Exception as err:
        raise CheckpointError(
            f"cannot read the common state of {location.directory}: {err}; the checkpoint is "
            "incomplete or corrupt"
        ) from err

    state = _model_sharded_state_dict(model_chunks)
    load_optim = load_optim and optimizer is not None
    if load_optim:
        if not common.get("has_optimizer", False):
            raise CheckpointError(
                f"{location.directory} has no optimizer state; pass --no-load-optim to load "
                "only the weights"
            )
        saved_sharding = common.get("optimizer_sharding")
        saved_layout, layout = common.get("parallel_layout", {}), _parallel_layout()
        model_layout_changed = any(saved_layout.get(k) != layout[k] for k in ("tp", "pp"))
        if saved_sharding == "dp_reshardable" and model_layout_changed:
            raise CheckpointError(
                f"{location.directory}: its distributed-optimizer state was saved in the "
                f"dp_reshardable format for TP={saved_layout.get('tp')} PP={saved_layout.get('pp')} "
                f"and cannot be loaded with TP={layout['tp']} PP={layout['pp']}; pass "
                "--no-load-optim, or save with --dist-ckpt-optim-fully-reshardable"
            )
        _materialize_distributed_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=True, metadata=_optimizer_metadata(saved_sharding)
        )
    same_layout = common.get("parallel_layout") == _parallel_layout()
    load_rng = load_rng and same_layout
    if load_rng:
        state["rng_state"] = _rng_sharded_object(is_loading=True)
    loaded = _load(state, location.directory)

    for i, chunk in enumerate(model_chunks):
        unwrap_model(chunk).load_state_dict(loaded[_model_key(i, len(model_chunks))], strict=True)
    if load_optim:
        with torch.no_grad():  # copies into views of fp32 main params that require grad
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_step_counters(optimizer)
        if scheduler is not None and common.get("opt_param_scheduler") is not None:
            scheduler.load_state_dict(common["opt_param_scheduler"])
    if load_rng:
        _restore_rng(loaded["rng_state"])
    return LoadedCheckpoint(
        directory=location.directory,
        iteration=location.iteration,
        common=common,
        loaded_optimizer=load_optim,
        loaded_rng=load_rng,
    )


def load_model_weights(model_chunks: list, load_dir: str | os.PathLike) -> int:
    """Load only the model weights (no optimizer, no RNG) into ``model_chunks``.

    ``load_dir`` is a ``--save`` directory (its latest checkpoint is used) or an ``iter_``
    directory. For tools (PPL scorer, converter, evaluation): parallel state must be
    initialised; any TP/PP layout works. Returns the checkpoint's iteration.
    """
    location = find_checkpoint(load_dir)
    if location is None:
        raise CheckpointError(f"{load_dir} contains no checkpoint ({LATEST_FILE} is missing)")
    loaded = load_checkpoint(location.directory, model_chunks, load_optim=False, load_rng=False)
    return loaded.iteration
