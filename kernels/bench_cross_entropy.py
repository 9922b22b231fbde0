"""Benchmark: cross-entropy forward+backward over logits, and fused linear + cross-entropy.

GPU (the issue's shapes: N=8192 tokens, H=4096, V=128256, bf16):
    python kernels/bench_cross_entropy.py --output bench_ce.md
CPU smoke run (tiny shapes, checks the script and the comparisons execute):
    python kernels/bench_cross_entropy.py --device cpu --small

Implementations compared in the same run (absent ones are listed as skipped, not faked):
  torch-upcast     F.cross_entropy(logits.float(), target)          (what HF models do)
  megatron-fused   megatron-core fused_vocab_parallel_cross_entropy (needs megatron-core)
  liger            Liger-Kernel LigerCrossEntropyLoss                (needs liger-kernel)
  syne             megatron_syne vocab_parallel_cross_entropy (gradient buffer)
  syne-inplace     same with inplace_backward=True (gradient overwrites the logits)
and for the output layer + loss (hidden [N,H], weight [V,H]):
  torch-linear+ce  logits = h @ W^T, then F.cross_entropy on fp32 logits
  liger-flce       LigerFusedLinearCrossEntropyLoss (needs liger-kernel)
  syne-flce        megatron_syne fused_linear_cross_entropy
against the floor printed first: bytes for the loss (memory bound), three GEMMs for the head.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from megatron_syne.kernels import benchmarking as B  # noqa: E402
from megatron_syne.kernels.cross_entropy import vocab_parallel_cross_entropy  # noqa: E402
from megatron_syne.kernels.fused_linear_cross_entropy import (  # noqa: E402
    fused_linear_cross_entropy,
)


def _init_single_process_group(device: torch.device):
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD


def _loss_impls(device: torch.device):
    """name -> callable(logits, target) returning a scalar mean loss, or a skip reason."""
    impls = {
        "torch-upcast": lambda x, t: F.cross_entropy(x.float(), t),
        "syne": lambda x, t: vocab_parallel_cross_entropy(x, t, reduction="mean"),
        "syne-inplace": lambda x, t: vocab_parallel_cross_entropy(
            x, t, reduction="mean", inplace_backward=True
        ),
    }
    try:
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        group = _init_single_process_group(device)
        impls["megatron-fused"] = lambda x, t: fused_vocab_parallel_cross_entropy(
            x, t, group
        ).mean()
    except Exception as exc:  # ImportError, or a megatron-core that fails to import
        impls["megatron-fused"] = f"skipped: megatron-core unavailable ({type(exc).__name__})"
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        if device.type != "cuda":
            raise ImportError("Liger-Kernel needs CUDA")
        liger = LigerCrossEntropyLoss()
        impls["liger"] = lambda x, t: liger(x, t)
    except Exception as exc:
        impls["liger"] = f"skipped: liger-kernel unavailable ({type(exc).__name__})"
    return impls


def bench_loss(args, device, dtype) -> str:
    n, v = args.tokens, args.vocab
    elem = torch.empty((), dtype=dtype).element_size()
    floor = B.cross_entropy_floor(n, v, elem)
    bandwidth = B.measured_copy_bandwidth(device, 256 if args.small else 2048)
    floor_ms = floor["bytes_min"] / bandwidth * 1e3
    out = [
        f"### Cross-entropy forward+backward, N={n} tokens, V={v}, {dtype} logits",
        "",
        f"Floor: read logits once + write the gradient once = {floor['bytes_min'] / 1e9:.3f} GB; "
        f"{floor['flops'] / 1e9:.2f} GFLOP (memory bound). Measured copy bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s -> floor {floor_ms:.3f} ms "
        f"(two-pass kernel missing L2: {floor['bytes_two_pass'] / bandwidth * 1e3:.3f} ms). "
        f"fp32 upcast of the logits alone: {floor['fp32_logits_bytes'] / 2**30:.2f} GiB.",
        "",
    ]
    torch.manual_seed(0)
    base = (torch.randn(n, v, device=device) * 2).to(dtype)
    # No ignored tokens: megatron-core's kernels have no ignore_index.
    target = torch.randint(0, v, (n,), device=device)
    ref_x = base.float().clone().requires_grad_()
    ref_loss = F.cross_entropy(ref_x, target)
    ref_loss.backward()
    ref_grad = ref_x.grad
    del ref_x

    rows = []
    for name, fn in _loss_impls(device).items():
        if isinstance(fn, str):
            rows.append(B.Measurement(name, float("nan"), None, note=fn))
            continue
        x = base.clone().requires_grad_()
        loss = fn(x, target)
        loss.backward()
        err = max(
            (loss.float() - ref_loss).abs().item(), (x.grad.float() - ref_grad).abs().max().item()
        )
        del loss
        x.grad = None

        def setup(x=x):
            x.grad = None

        def run(x=x, fn=fn):
            fn(x, target).backward()

        m = B.measure(name, run, device, warmup=args.warmup, iters=args.iters, setup=setup)
        m.max_abs_err = err
        rows.append(m)
        del x
    out.append(B.format_table(rows, floor_ms))
    out.append("")
    out.append(
        "max abs err: max of |loss - fp32 reference| and |grad - fp32 reference| "
        "(gradient of the mean loss; bf16 gradients round at ~4e-3 relative)."
    )
    return "\n".join(out)


def bench_linear(args, device, dtype) -> str:
    n, h, v = args.tokens, args.hidden, args.vocab
    floor = B.linear_cross_entropy_floor(n, h, v)
    gemm_flops, gemm_ms = B.measured_matmul_flops(device, n, v, h, dtype)
    out = [
        f"### Output layer + cross-entropy forward+backward, N={n}, H={h}, V={v}, {dtype}",
        "",
        f"Floor: three N x V x H products = {floor['flops'] / 1e12:.4f} TFLOP; one product "
        f"measured {gemm_ms:.3f} ms ({gemm_flops / 1e12:.0f} TFLOP/s) -> floor "
        f"{3 * gemm_ms:.3f} ms. Memory: the gradient dW ({v * h * 2 / 2**30:.2f} GiB in bf16) "
        f"is an output every implementation allocates; full fp32 logits would be "
        f"{4 * n * v / 2**30:.2f} GiB.",
        "",
    ]
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dtype)
    weight = (torch.randn(v, h, device=device) * h**-0.5).to(dtype)
    target = torch.randint(0, v, (n,), device=device)

    def torch_path(hh, ww):
        return F.cross_entropy((hh @ ww.t()).float(), target)

    impls = {
        "torch-linear+ce": torch_path,
        "syne-flce": lambda hh, ww: fused_linear_cross_entropy(hh, ww, target),
    }
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )

        if device.type != "cuda":
            raise ImportError("Liger-Kernel needs CUDA")
        liger = LigerFusedLinearCrossEntropyLoss()
        impls["liger-flce"] = lambda hh, ww: liger(ww, hh, target)
    except Exception as exc:
        impls["liger-flce"] = f"skipped: liger-kernel unavailable ({type(exc).__name__})"

    hr = hidden.float().clone().requires_grad_()
    wr = weight.float().clone().requires_grad_()
    ref_loss = torch_path(hr, wr)
    ref_loss.backward()
    rows = []
    for name, fn in impls.items():
        if isinstance(fn, str):
            rows.append(B.Measurement(name, float("nan"), None, note=fn))
            continue
        hh = hidden.clone().requires_grad_()
        ww = weight.clone().requires_grad_()
        loss = fn(hh, ww)
        loss.backward()
        rel_dw = ((ww.grad.float() - wr.grad).norm() / wr.grad.norm()).item()
        err = (loss.float() - ref_loss).abs().item()

        def setup(hh=hh, ww=ww):
            hh.grad = ww.grad = None

        def run(hh=hh, ww=ww, fn=fn):
            fn(hh, ww).backward()

        m = B.measure(name, run, device, warmup=args.warmup, iters=args.iters, setup=setup)
        m.max_abs_err = err
        m.note = f"rel. L2 err of dW vs fp32: {rel_dw:.2e}"
        rows.append(m)
        del hh, ww, loss
    out.append(B.format_table(rows, 3 * gemm_ms))
    out.append("")
    out.append(
        "max abs err: |loss - fp32 reference|. Peak extra memory includes the dW and dH "
        "gradients each implementation returns."
    )
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument("--output", type=Path, help="also write the markdown tables here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.small:
        args.tokens, args.hidden, args.vocab = 257, 64, 1000
        args.iters = min(args.iters, 3)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    header = (
        f"## Kernel benchmark on {B.device_label(device)} (torch {torch.__version__}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"
    )
    print(header, flush=True)
    sections = [header, "", bench_loss(args, device, dtype)]
    print(sections[-1], flush=True)
    if not args.skip_linear:
        sections += ["", bench_linear(args, device, dtype)]
        print(sections[-1], flush=True)
    if args.output:
        args.output.write_text("\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
