"""Process-group and model-parallel setup: gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits. Sizes are in ranks."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    context_parallel_size: int
    data_parallel_size: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_distributed(
    device: str,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> DistributedInfo:
    """Initialise torch.distributed, megatron-core's parallel state and the RNGs.

    ``device`` is "cpu" (gloo; enables :mod:`megatron_syne.platform.cpu`) or "cuda" (NCCL, one
    GPU per process chosen by LOCAL_RANK). Works under torchrun and in a plain single process
    (world size 1, a free local port). Calling it again with the same layout is a no-op; with a
    different layout the model-parallel groups are rebuilt. Data parallelism takes the ranks
    left over: world_size / (TP * PP * CP).
    """
    from megatron.core import parallel_state

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cpu":
        from megatron_syne.platform.cpu import enable_cpu_compat

        enable_cpu_compat()
        backend = "gloo"
    else:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "--device cuda requested but CUDA is not available; use --device cpu"
            )
        backend = "nccl"

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))

    world_size = dist.get_world_size()
    model_parallel = (
        tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    )
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by TP({tensor_model_parallel_size}) x "
            f"PP({pipeline_model_parallel_size}) x CP({context_parallel_size}) = {model_parallel}; "
            "change --nproc_per_node or the parallel sizes"
        )
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tensor_model_parallel_size
            and parallel_state.get_pipeline_model_parallel_world_size()
            == pipeline_model_parallel_size
            and parallel_state.get_context_parallel_world_size() == context_parallel_size
        )
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
        )

    set_random_seed(seed)
    return DistributedInfo(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        device=torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu"),
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        data_parallel_size=world_size // model_parallel,
    )


def set_random_seed(seed: int) -> None:
    """Seed python, numpy, torch and megatron-core's model-parallel RNG tracker.

    As in Megatron-LM each pipeline stage gets ``seed + 100 * pp_rank`` so stages draw different
    dropout masks; initial weights do not depend on it (see ``megatron_syne.training.init``).
    """
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed, force_reset_rng=True)


def destroy_distributed() -> None:
    """Tear down parallel state and the process group (tests, tools that run several layouts)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
