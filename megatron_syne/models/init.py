"""Layout-independent weight initialisation.

megatron-core initialises each tensor-parallel shard from its own RNG stream and each pipeline
stage from its own seed, so the same ``--seed`` gives different models under TP=1, TP=2 or PP=2.
Here every tensor is drawn from a generator seeded by (seed, checkpoint key, layer index) and
each rank copies out its shard, using the same global coordinates that ``dist_checkpointing``
uses. The model is then identical under every layout, which is what makes loss-equivalence
tests across layouts meaningful and lets a run change its layout without changing its init.
"""

from __future__ import annotations

import math
import zlib

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

# Output projections of residual branches get std / sqrt(2 * num_layers) (GPT-2 / Megatron).
_SCALED_INIT_SUFFIXES = ("linear_proj.weight", "linear_fc2.weight")


def _sharded_tensors(model_chunk: torch.nn.Module):
    state = model_chunk.sharded_state_dict()
    for item in nested_values(state):
        if isinstance(item, ShardedTensorFactory):
            yield from (t for t in nested_values(item.build()) if isinstance(t, ShardedTensor))
        elif isinstance(item, ShardedTensor):
            yield item


def _generator_seed(seed: int, key: str, prefix_index: tuple[int, ...]) -> int:
    text = f"{key}|{','.join(map(str, prefix_index))}"
    return (seed * 1_000_003 + zlib.crc32(text.encode())) % (2**63 - 1)


@torch.no_grad()
def initialize_weights_layout_invariant(
    model_chunks: list[torch.nn.Module], seed: int, init_method_std: float, num_layers: int
) -> int:
    """Re-initialise all parameters of ``model_chunks`` independently of TP/PP/DP layout.

    Matrices ~ N(0, init_method_std) (residual output projections scaled by
    1/sqrt(2*num_layers)); norm weights 1; 1-D non-norm tensors 0. Returns the number of
    tensors initialised on this rank.
    """
    scaled_std = init_method_std / math.sqrt(2.0 * num_layers)
    count = 0
    for chunk in model_chunks:
        for sh in _sharded_tensors(chunk):
            data = sh.data
            if not data.is_floating_point() or sh.flattened_range is not None:
                continue
            n_prefix = sh.prepend_axis_num
            body_shape = tuple(sh.global_shape[n_prefix:])
            body_offset = tuple(sh.global_offset[n_prefix:])
            if len(body_shape) == 1:
                value = 1.0 if "norm" in sh.key else 0.0
                data.fill_(value)
                count += 1
                continue
            std = scaled_std if sh.key.endswith(_SCALED_INIT_SUFFIXES) else init_method_std
            generator = torch.Generator(device=data.device)
            generator.manual_seed(_generator_seed(seed, sh.key, tuple(sh.global_offset[:n_prefix])))
            full = torch.empty(body_shape, dtype=torch.float32, device=data.device)
            full.normal_(0.0, std, generator=generator)
            index = tuple(
                slice(offset, offset + size) for offset, size in zip(body_offset, data.shape)
            )
            data.copy_(full[index])
            count += 1
    return count
