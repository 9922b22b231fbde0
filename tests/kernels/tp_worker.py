"""Run under torchrun (2 gloo ranks): vocab-parallel results equal single-process full vocab.

Every rank builds the same full-vocabulary problem from one seed, keeps its vocab shard, and
checks loss and gradients against the plain-autograd reference on the full vocabulary.
Prints one ``CHECK <name> OK`` line per passed check (the pytest side counts them).
"""

import os

import torch
import torch.distributed as dist

from megatron_syne.kernels import cross_entropy
from megatron_syne.kernels.cross_entropy import (
    cross_entropy_reference,
    vocab_parallel_cross_entropy,
)
from megatron_syne.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

VOCAB, HIDDEN = 1000, 16


def check(name, got, want, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    if dist.get_rank() == 0:
        print(f"CHECK {name} OK", flush=True)


def backward_all(outs, grads):
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum((o * g).sum() for o, g in zip(outs, grads)).backward()
    return [o.detach() for o in outs]


def cross_entropy_cases(rank, world, group):
    local = VOCAB // world
    shard = slice(rank * local, (rank + 1) * local)
    logits = torch.randn(3, 37, VOCAB) * 3
    target = torch.randint(0, VOCAB, (3, 37))
    target.view(-1)[::5] = -100
    mask = (torch.rand(3, 37) > 0.3).float()
    cases = [
        ("torch", "none", 0.0, 0.0, None),
        ("torch", "mean", 0.1, 1e-2, mask),
        ("torch", "sum", 0.1, 0.0, mask),
        ("triton", "none", 0.1, 1e-2, mask),
        ("triton", "mean", 0.0, 0.0, None),
    ]
    for backend, reduction, smoothing, z_weight, loss_mask in cases:
        kw = dict(
            reduction=reduction,
            label_smoothing=smoothing,
            z_loss_weight=z_weight,
            loss_mask=loss_mask,
        )
        shape = target.shape if reduction == "none" else ()
        grads = [torch.randn(shape) for _ in range(2 if z_weight else 1)]
        full = logits.clone().requires_grad_()
        want = backward_all(cross_entropy_reference(full, target, **kw), grads)
        part = logits[..., shard].clone().requires_grad_()
        got = backward_all(
            vocab_parallel_cross_entropy(part, target, tp_group=group, backend=backend, **kw), grads
        )
        name = f"ce[{backend},{reduction},ls={smoothing},z={z_weight},mask={loss_mask is not None}]"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            check(f"{name}.out{i}", g, w)
        check(f"{name}.grad", part.grad, full.grad[..., shard], atol=1e-6)


def megatron_parity(rank, world):
    """tp_group=None picks megatron-core's TP group; unsmoothed loss equals megatron-core's."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.cross_entropy import (
        vocab_parallel_cross_entropy as megatron_ce,
    )

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    local = VOCAB // world
    logits = torch.randn(37, 3, VOCAB)
    target = torch.randint(0, VOCAB, (37, 3))
    shard = logits[..., rank * local : (rank + 1) * local]
    a = shard.clone().requires_grad_()
    b = shard.clone().requires_grad_()
    ours = vocab_parallel_cross_entropy(a, target, backend="torch")
    theirs = megatron_ce(b, target)
    grad = torch.randn_like(ours)
    (ours * grad).sum().backward()
    (theirs * grad).sum().backward()
    check("megatron_parity.loss", ours, theirs)
    check("megatron_parity.grad", a.grad, b.grad, atol=1e-6)
    parallel_state.destroy_model_parallel()


def fused_linear_cases(rank, world, group):
    local = VOCAB // world
    shard = slice(rank * local, (rank + 1) * local)
    n_tokens = 74  # divisible by the TP size for sequence parallelism
    hidden = torch.randn(n_tokens, HIDDEN)
    weight = torch.randn(VOCAB, HIDDEN) * 0.3
    target = torch.randint(0, VOCAB, (n_tokens,))
    target[::6] = -100
    rows = slice(rank * n_tokens // world, (rank + 1) * n_tokens // world)
    for backend, sp, reduction, smoothing, z_weight in [
        ("torch", False, "mean", 0.1, 0.0),
        ("torch", True, "none", 0.0, 1e-2),
        ("torch", True, "sum", 0.1, 0.0),
        ("triton", True, "mean", 0.1, 0.0),
    ]:
        kw = dict(reduction=reduction, label_smoothing=smoothing, z_loss_weight=z_weight)
        shape = target.shape if reduction == "none" else ()
        grads = [torch.randn(shape) for _ in range(2 if z_weight else 1)]
        h_full = hidden.clone().requires_grad_()
        w_full = weight.clone().requires_grad_()
        want = backward_all(
            fused_linear_cross_entropy_reference(h_full, w_full, target, **kw), grads
        )
        h = (hidden[rows] if sp else hidden).clone().requires_grad_()
        w = weight[shard].clone().requires_grad_()
        got = backward_all(
            fused_linear_cross_entropy(
                h,
                w,
                target,
                tp_group=group,
                sequence_parallel=sp,
                chunk_tokens=20,
                backend=backend,
                **kw,
            ),
            grads,
        )
        name = f"flce[{backend},sp={sp},{reduction},ls={smoothing},z={z_weight}]"
        for i, (g, x) in enumerate(zip(got, want, strict=True)):
            check(f"{name}.out{i}", g, x)
        check(f"{name}.dhidden", h.grad, h_full.grad[rows] if sp else h_full.grad)
        check(f"{name}.dweight", w.grad, w_full.grad[shard])


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # identical full problem on every rank
    # 500-token shards in blocks of 128: three full blocks and a ragged one.
    cross_entropy.MAX_BLOCK_SIZE = 128
    group = dist.new_group(list(range(world)))
    cross_entropy_cases(rank, world, group)
    fused_linear_cases(rank, world, group)
    if os.environ.get("SKIP_MEGATRON_PARITY") != "1":
        megatron_parity(rank, world)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
