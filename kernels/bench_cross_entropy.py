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
  ... per-token    reduction="none", then .mean(): backward scales the gradient per token
and for the output layer + loss (hidden [N,H], weight [V,H]):
  torch-linear+ce            logits = h @ W^T, then F.cross_entropy on fp32 logits
  liger-flce                 LigerFusedLinearCrossEntropyLoss (needs liger-kernel)
  syne-flce tokens           fused_linear_cross_entropy(schedule="tokens"), eager (3 GEMMs)
  syne-flce vocab            fused_linear_cross_entropy(schedule="vocab"), eager (4 GEMMs)
  syne-flce ... +main_grad   reduction "none" with dW added to an fp32 main_grad (deferred,
                             4 GEMMs): what training with megatron-core DDP runs
against the floor printed first: bytes for the loss (memory bound), three GEMMs for the head.
The head table reports, per implementation, the peak extra memory (peak minus the returned dH
and dW) beside the analytic expectation (benchmarking.flce_expected_extra_bytes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from megatron_syne.kernels import benchmarking as B  # noqa: E402
from megatron_syne.kernels._dispatch import resolve_backend  # noqa: E402
from megatron_syne.kernels.cross_entropy import vocab_parallel_cross_entropy  # noqa: E402
from megatron_syne.kernels.fused_linear_cross_entropy import (  # noqa: E402
    default_chunk_tokens,
    default_chunk_vocab,
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
        # Per-token losses reduced outside the op (Megatron's loss_func): the incoming gradient
        # is 1/N per token, so backward scales the whole gradient.
        "syne-inplace per-token": lambda x, t: vocab_parallel_cross_entropy(
            x, t, reduction="none", inplace_backward=True
        ).mean(),
    }
    try:
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        group = _init_single_process_group(device)
        impls["megatron-fused"] = lambda x, t: fused_vocab_parallel_cross_entropy(
            x, t, group
        ).mean()
    except Exception as exc:  # ImportError, or a megatron-core that fails to import
        impls["megatron-fused"] = f"megatron-core unavailable ({_why(exc)})"
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        if device.type != "cuda":
            raise ImportError("Liger-Kernel needs CUDA")
        liger = LigerCrossEntropyLoss()
        liger_none = LigerCrossEntropyLoss(reduction="none")
        impls["liger"] = lambda x, t: liger(x, t)
        impls["liger per-token"] = lambda x, t: liger_none(x, t).mean()
    except Exception as exc:
        impls["liger"] = impls["liger per-token"] = f"liger-kernel unavailable ({_why(exc)})"
    return impls


def _why(exc: Exception) -> str:
    """``Type: message`` of why an optional implementation could not run, one line, short."""
    return f"{type(exc).__name__}: {exc}".replace("|", "/").splitlines()[0][:160]


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
            rows.append(B.skipped(name, fn))
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

        rows.append(
            B.measure(name, run, device, args.warmup, args.iters, setup=setup, max_abs_err=err)
        )
        del x
    out.append(B.format_table(rows, floor_ms))
    out.append("")
    out.append(
        "max abs err: max of |loss - fp32 reference| and |grad - fp32 reference| "
        "(gradient of the mean loss; bf16 gradients round at ~4e-3 relative)."
    )
    return "\n".join(out)


def _linear_impls(target, chunk_tokens):
    """name -> (callable(h, w) returning the loss to backward, schedule, main_grad) or a skip
    reason."""

    def torch_path(hh, ww):
        return F.cross_entropy((hh @ ww.t()).float(), target)

    def syne(schedule, main_grad):
        def fn(hh, ww):
            loss = fused_linear_cross_entropy(
                hh, ww, target, reduction="none" if main_grad else "mean",
                chunk_tokens=chunk_tokens, schedule=schedule,
            )  # fmt: skip
            return loss.mean() if main_grad else loss

        return fn, schedule, main_grad

    impls = {"torch-linear+ce": (torch_path, None, False)}
    for schedule in ("tokens", "vocab"):
        impls[f"syne-flce {schedule}"] = syne(schedule, False)
    for schedule in ("tokens", "vocab"):
        impls[f"syne-flce {schedule} +main_grad"] = syne(schedule, True)
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )

        if target.device.type != "cuda":
            raise ImportError("Liger-Kernel needs CUDA")
        liger = LigerFusedLinearCrossEntropyLoss()
        impls["liger-flce"] = (lambda hh, ww: liger(ww, hh, target), None, False)
    except Exception as exc:
        impls["liger-flce"] = f"liger-kernel unavailable ({_why(exc)})"
    return impls


def bench_linear(args, device, dtype) -> str:
    n, h, v = args.tokens, args.hidden, args.vocab
    floor = B.linear_cross_entropy_floor(n, h, v)
    gemm_flops, gemm_ms = B.measured_matmul_flops(device, n, v, h, dtype)
    out = [
        f"### Output layer + cross-entropy forward+backward, N={n}, H={h}, V={v}, {dtype}",
        "",
        f"Floor: three N x V x H products = {floor['flops'] / 1e12:.4f} TFLOP; one product "
        f"measured {gemm_ms:.3f} ms ({gemm_flops / 1e12:.0f} TFLOP/s) -> floor "
        f"{3 * gemm_ms:.3f} ms (the vocab schedule and every deferred backward do 4 products: "
        f"{4 * gemm_ms:.3f} ms). Memory: the gradient dW ({v * h * 2 / 2**30:.2f} GiB in bf16) "
        f"is an output every implementation allocates; full fp32 logits would be "
        f"{4 * n * v / 2**30:.2f} GiB.",
        "",
    ]
    hidden, weight, target = B.random_head_inputs(n, h, v, device, dtype)
    chunk_tokens = default_chunk_tokens(v, dtype)
    torch_path = resolve_backend("auto", device) == "torch"

    hr = hidden.float().clone().requires_grad_()
    wr = weight.float().clone().requires_grad_()
    ref_loss = F.cross_entropy(hr @ wr.t(), target)
    ref_loss.backward()
    ref_dw = wr.grad
    del hr, wr
    rows, memory = [], []
    for name, impl in _linear_impls(target, chunk_tokens).items():
        if isinstance(impl, str):
            rows.append(B.skipped(name, impl))
            memory.append("| - | - |")
            continue
        fn, schedule, main_grad = impl
        hh = hidden.clone().requires_grad_()
        ww = torch.nn.Parameter(weight.clone())

        def setup(hh=hh, ww=ww, main_grad=main_grad):
            hh.grad = ww.grad = None
            if main_grad:  # megatron-core DDP's zero_grad_buffer
                ww.main_grad.zero_()
                ww.grad_added_to_main_grad = False

        if main_grad:
            ww.main_grad = torch.zeros(ww.shape, dtype=torch.float32, device=device)
        setup()
        loss = fn(hh, ww)
        loss.backward()
        dw = (ww.main_grad if main_grad else ww.grad).float()
        rel_dw = ((dw - ref_dw).norm() / ref_dw.norm()).item()
        err = (loss.float() - ref_loss).abs().item()
        del loss, dw
        setup()
        extra = B.peak_extra_memory(lambda hh=hh, ww=ww, fn=fn: _backward(fn, hh, ww), device)

        def run(hh=hh, ww=ww, fn=fn):
            fn(hh, ww).backward()

        rows.append(
            B.measure(
                name, run, device, args.warmup, args.iters, setup=setup, max_abs_err=err,
                note=f"rel. L2 err of dW vs fp32: {rel_dw:.2e}",
            )
        )  # fmt: skip
        if schedule is None:
            expected = B.unfused_expected_extra_bytes(n, v, dtype)
        else:
            expected = B.flce_expected_extra_bytes(
                schedule, n, h, v, dtype, chunk_tokens, default_chunk_vocab(n, dtype),
                main_grad, torch_path,
            )  # fmt: skip
        memory.append(f"| {extra.extra / B.MIB:,.0f} | {sum(expected.values()) / B.MIB:,.0f} |")
        del hh, ww
    table = B.format_table(rows, 3 * gemm_ms).splitlines()
    table[0] += " extra w/o returned dH, dW (MiB) | expected (MiB) |"
    table[1] += " ---: | ---: |"
    table[2:] = [line + cells[1:] for line, cells in zip(table[2:], memory, strict=True)]
    out.append("\n".join(table))
    out.append("")
    out.append(
        "max abs err: |loss - fp32 reference|. Peak extra memory: above the memory at entry, "
        "including the dW and dH each implementation returns; extra w/o returned dH, dW: "
        "that peak minus the returned gradients in their own dtype (the main_grad rows' dummy "
        "weight gradient counts as dW; their fp32 main_grad exists before the call), the "
        "quantity of the issue's target < 1.2 GB = 1,144 MiB; expected: "
        "benchmarking.flce_expected_extra_bytes."
    )
    return "\n".join(out)


def _backward(fn, hh, ww):
    fn(hh, ww).backward()
    return [hh.grad, ww.grad]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    B.add_common_arguments(parser)
    parser.add_argument("--skip-linear", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.small:
        args.tokens, args.hidden, args.vocab = 257, 64, 1000
        args.iters = min(args.iters, 3)
    dtype = B.bench_dtype(args.dtype, device)
    report = B.Report("Kernel benchmark", device)
    report.add(bench_loss(args, device, dtype))
    if not args.skip_linear:
        report.add(bench_linear(args, device, dtype))
    report.write(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
