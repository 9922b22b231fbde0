"""Run under torchrun (2 gloo ranks): vocab-parallel results equal single-process full vocab.

Every rank builds the same full-vocabulary problem from one seed, keeps its vocab shard, and
checks loss and gradients against the plain-autograd reference on the full vocabulary.
Last, the Llama model under TP = 2 + sequence parallelism wrapped in megatron-core's
DistributedDataParallel: ``--cross-entropy-fusion-impl syne-linear`` (output layer fused into the
loss, weight gradient added to ``main_grad`` directly) gives the unfused model's losses and
``main_grad`` of every parameter, with untied and with tied embeddings.
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
    passed(name)


def passed(name):
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
    for schedule, backend, sp, reduction, smoothing, z_weight, main_grad in [
        ("tokens", "torch", False, "mean", 0.1, 0.0, False),
        ("tokens", "torch", True, "none", 0.0, 1e-2, False),
        ("tokens", "torch", True, "sum", 0.1, 0.0, False),
        ("tokens", "triton", True, "mean", 0.1, 0.0, False),
        ("tokens", "torch", True, "none", 0.0, 0.0, True),
        # Vocab schedule: 500-row shards in chunks of 192 (two full, one ragged of 116).
        ("vocab", "torch", False, "mean", 0.1, 0.0, False),
        ("vocab", "torch", True, "none", 0.1, 1e-2, False),
        ("vocab", "triton", True, "sum", 0.1, 0.0, False),
        ("vocab", "torch", True, "mean", 0.0, 0.0, True),
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
        w = torch.nn.Parameter(weight[shard].clone())
        if main_grad:  # as megatron-core DDP prepares it (earlier micro-batches: 1.0)
            w.main_grad = torch.ones(w.shape)
            w.grad_added_to_main_grad = False
        got = backward_all(
            fused_linear_cross_entropy(
                h,
                w,
                target,
                tp_group=group,
                sequence_parallel=sp,
                chunk_tokens=20,
                schedule=schedule,
                chunk_vocab=192,
                backend=backend,
                **kw,
            ),
            grads,
        )
        name = (
            f"flce[{schedule},{backend},sp={sp},{reduction},ls={smoothing},z={z_weight},"
            f"main_grad={main_grad}]"
        )
        for i, (g, x) in enumerate(zip(got, want, strict=True)):
            check(f"{name}.out{i}", g, x)
        check(f"{name}.dhidden", h.grad, h_full.grad[rows] if sp else h_full.grad)
        if main_grad:
            assert w.grad_added_to_main_grad, name
            check(f"{name}.main_grad", w.main_grad - 1.0, w_full.grad[shard])
        else:
            check(f"{name}.dweight", w.grad, w_full.grad[shard])


def model_linear_fusion_parity(world):
    """Two micro-batches through DDP-wrapped tiny Llamas, unfused vs syne-linear."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_syne.models.init import initialize_weights_layout_invariant
    from megatron_syne.models.llama3 import build_gpt_model, transformer_config_from_preset
    from megatron_syne.models.presets import get_preset
    from megatron_syne.training.distributed import initialize_distributed

    initialize_distributed("cpu", tensor_model_parallel_size=world, seed=3)
    vocab, seq, batch = 512, 32, 2
    tokens = torch.randint(0, vocab, (2, batch, seq))
    labels = torch.randint(0, vocab, (2, batch, seq))
    positions = torch.arange(seq).expand(batch, -1)
    loss_mask = (torch.rand(2, batch, seq) > 0.2).float()
    for tied in (False, True):
        preset = get_preset("tiny").replace(
            vocab_size=vocab, seq_length=seq, untie_embeddings_and_output_weights=not tied
        )
        results = {}
        for impl in ("unfused", "syne-linear"):
            config = transformer_config_from_preset(
                preset,
                tensor_model_parallel_size=world,
                sequence_parallel=True,
                cross_entropy_loss_fusion=impl != "unfused",
            )
            config.cross_entropy_fusion_impl = impl if impl != "unfused" else "native"
            model = build_gpt_model(preset, config)
            initialize_weights_layout_invariant([model], 11, config.init_method_std, 4)
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False, check_for_nan_in_grad=False
            )
            model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
            model.zero_grad_buffer()
            losses = []
            for micro in range(2):  # main_grad accumulates over micro-batches
                per_token = model(tokens[micro], positions, None, labels=labels[micro])
                (per_token * loss_mask[micro]).sum().backward()
                losses.append(per_token.detach())
            head = model.module.shared_embedding_or_output_weight()
            if not tied:
                head = model.module.output_layer.weight
            main_grads = {n: p.main_grad.clone() for n, p in model.module.named_parameters()}
            results[impl] = (torch.stack(losses), main_grads, head.grad_added_to_main_grad)
        name = f"model[tp={world},sp,tied={tied}]"
        check(f"{name}.losses", results["syne-linear"][0], results["unfused"][0])
        fused_grads, unfused_grads = results["syne-linear"][1], results["unfused"][1]
        assert fused_grads.keys() == unfused_grads.keys()
        for param_name, grad in unfused_grads.items():
            assert grad.abs().max() > 0, f"{name}: {param_name} got no gradient"
            torch.testing.assert_close(
                fused_grads[param_name], grad, rtol=1e-4, atol=1e-6,
                msg=lambda m, n=param_name, label=name: f"{label}.main_grad[{n}]: {m}",
            )  # fmt: skip
        passed(f"{name}.main_grad[{len(unfused_grads)} params]")
        # The fused head wrote its gradient into main_grad and told DDP's hook so; the unfused
        # head (no gradient accumulation fusion on CPU) left it to the hook.
        assert results["syne-linear"][2] is True and results["unfused"][2] is False, name
        passed(f"{name}.grad_added_to_main_grad")


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
        model_linear_fusion_parity(world)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
