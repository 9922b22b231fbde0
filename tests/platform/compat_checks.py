"""Run under torchrun (2 processes, gloo) by test_cpu_compat.py; prints one JSON line on rank 0."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from megatron_syne.platform.cpu import cpu_compat_enabled, enable_cpu_compat


def main() -> None:
    before = cpu_compat_enabled()
    enable_cpu_compat()
    zeros_before = torch.zeros  # the second call must not wrap the wrappers again
    enable_cpu_compat()
    result = {"enabled_before": before, "idempotent": torch.zeros is zeros_before}

    result["zeros_device"] = str(torch.zeros(2, device="cuda").device)
    result["tensor_device"] = str(torch.tensor([1.0], device=torch.cuda.current_device()).device)
    result["cuda_method"] = str(torch.ones(1).cuda().device)
    result["to_cuda"] = str(torch.ones(1).to("cuda").device)
    result["type_name"] = torch.ones(1).type()
    result["type_cast"] = torch.ones(1).type("torch.cuda.HalfTensor").dtype == torch.float16

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    full = torch.arange(8, dtype=torch.float32) * (rank + 1)  # sum over ranks = arange * 3
    out = torch.empty(4)
    dist.reduce_scatter_tensor(out, full)
    result[f"reduce_scatter_ok_{rank}"] = torch.equal(
        out, (torch.arange(8.0) * 3)[rank * 4 : (rank + 1) * 4]
    )

    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(5)
    with tracker.fork():
        inside = torch.rand(3)
    outside = torch.rand(3)
    torch.manual_seed(5)
    result["fork_restores_default_stream"] = torch.equal(outside, torch.rand(3))
    gathered = [torch.empty(3) for _ in range(world)]
    dist.all_gather(gathered, inside)
    # The model-parallel stream is seeded per TP rank: the two ranks draw different numbers.
    result["tp_ranks_differ"] = not torch.equal(gathered[0], gathered[1])
    flags = [None] * world
    dist.all_gather_object(flags, result)
    if rank == 0:
        merged = {k: v for part in flags for k, v in part.items()}
        print("RESULT " + json.dumps(merged), flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
