"""Random HF Llama checkpoints of any shape, written tensor by tensor (memory benchmarks).

No ``transformers`` model is built, so an 8B-shaped checkpoint needs one tensor of memory.
The weights are random (not a trained model): use them to measure conversion time and memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_syne.convert import layout as L
from megatron_syne.convert.arch import LlamaArch
from megatron_syne.convert.hf_checkpoint import streaming_safetensors_writer, write_json


def write_random_hf_checkpoint(
    out_dir: str | os.PathLike, arch: LlamaArch, max_shard_bytes: int = 2 * 10**9, seed: int = 0
) -> Path:
    """Write a sharded safetensors HF checkpoint of ``arch`` with N(0, 0.02) weights."""
    out_dir = Path(out_dir)
    generator = torch.Generator().manual_seed(seed)
    dtype = arch.torch_dtype
    shapes = L.hf_tensor_shapes(arch)
    entries = [(name, shape, dtype) for name, shape in shapes.items()]
    with streaming_safetensors_writer(out_dir, entries, max_shard_bytes) as writer:
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=dtype)
            else:
                tensor = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
            writer.write(name, tensor)
            del tensor
    write_json(out_dir / "config.json", arch.to_hf_config())
    write_json(out_dir / "generation_config.json", arch.hf_generation_config())
    return out_dir
