"""Where the cross-entropy time goes, and which launch configuration the row kernels want.

GPU (the issue's shape: N=8192 tokens, V=128256, bf16):
    python kernels/tune_cross_entropy.py --output tune_ce.md
CPU smoke run (Triton interpreter, tiny shape; checks the script runs):
    TRITON_INTERPRET=1 python kernels/tune_cross_entropy.py --device cpu --small

Prints two tables:
1. a breakdown of one forward+backward: each kernel alone (fused statistics+gradient, the
   statistics pass, the gradient pass, the backward scaling with an incoming gradient of 1 and
   of 0.5), torch's ``mul_`` and ``clone`` of the same tensor for reference, the whole op
   forward-only and forward+backward, and Liger-Kernel's when installed; each with its
   effective bandwidth (bytes a kernel must move / time);
2. a sweep of (BLOCK, num_warps) for the three row kernels. The fastest configuration of
   each is marked; ``cross_entropy._block_and_warps`` holds the default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from megatron_syne.kernels import benchmarking as B  # noqa: E402
from megatron_syne.kernels import cross_entropy as ce  # noqa: E402
from megatron_syne.kernels._dispatch import launch  # noqa: E402

# (BLOCK, num_warps) pairs with 4 to 64 logits per thread and block.
SWEEP = [
    (block, warps)
    for block in (2048, 4096, 8192, 16384, 32768)
    for warps in (4, 8, 16, 32)
    if 4 <= block // (32 * warps) <= 64
]


class Buffers:
    """The logits, gradient and per-row inputs every measurement shares (allocated once)."""

    def __init__(self, n: int, v: int, device: torch.device, dtype: torch.dtype) -> None:
        torch.manual_seed(0)
        self.x = (torch.randn(n, v, device=device) * 2).to(dtype)
        self.grad = torch.empty_like(self.x)
        self.target = torch.randint(0, v, (n,), device=device)
        coef_p = torch.full((n,), 1.0 / n, device=device)
        self.coefs = (coef_p, -coef_p, torch.zeros_like(coef_p))
        self.stats = ce._empty_stats(n, device, False)
        self.lse = torch.zeros(n, device=device)
        self.nbytes = self.x.numel() * self.x.element_size()

    def moved(self) -> dict[str, int]:
        """Bytes each row kernel must move at least (reads + writes of N x V elements)."""
        return {"fused stats+grad": 2 * self.nbytes, "stats": self.nbytes, "grad": 2 * self.nbytes}


def _launchers(buf: Buffers, block: int, warps: int):
    """The three row kernels with an explicit launch configuration (name -> callable)."""
    x, grad, target, coefs, stats = buf.x, buf.grad, buf.target, buf.coefs, buf.stats
    n, v = x.shape
    common = dict(BLOCK=block, num_warps=warps)

    def fused():
        launch(
            ce._ce_fused_kernel, (n,), x.device, x, x.stride(0), grad, grad.stride(0), target,
            stats.max, stats.sumexp, stats.target_logit, stats.max, *coefs, v,
            HAS_LOGIT_SUM=False, **common,
        )  # fmt: skip

    def stats_only():
        launch(
            ce._ce_stats_kernel, (n,), x.device, x, x.stride(0), target, stats.max,
            stats.sumexp, stats.target_logit, stats.max, v, HAS_LOGIT_SUM=False, **common,
        )  # fmt: skip

    def grad_only():
        launch(
            ce._ce_grad_kernel, (n,), x.device, x, x.stride(0), grad, grad.stride(0), target,
            buf.lse, *coefs, v, **common,
        )  # fmt: skip

    return {"fused stats+grad": fused, "stats": stats_only, "grad": grad_only}


def _row(name, ms, nbytes, note=""):
    gbps = nbytes / (ms / 1e3) / 1e9 if ms == ms and ms > 0 else float("nan")
    return f"| {name} | {ms:.3f} | {nbytes / 1e9:.2f} | {gbps:,.0f} | {note} |"


def breakdown(args, buf: Buffers, device, dtype) -> str:
    (n, v), x, grad, target, nbytes = buf.x.shape, buf.x, buf.grad, buf.target, buf.nbytes
    block, warps = ce._block_and_warps(v)
    kernels = _launchers(buf, block, warps)
    moved = buf.moved()
    one = torch.ones((), device=device)
    half = torch.full((), 0.5, device=device)
    g_rows = torch.full((n,), 0.5, device=device)

    def measure(fn, setup=None):
        return B.measure("", fn, device, args.warmup, args.iters, setup=setup).time_ms

    lines = [
        f"### Breakdown at N={n}, V={v}, {dtype}; default launch BLOCK={block}, "
        f"num_warps={warps}",
        "",
        "| step | time (ms) | GB moved (minimum) | GB/s | note |",
        "| --- | ---: | ---: | ---: | --- |",
        _row("fused stats+grad kernel", measure(kernels["fused stats+grad"]),
             moved["fused stats+grad"], "reads the row twice (2nd mostly L2), writes the gradient"),
        _row("stats kernel", measure(kernels["stats"]), moved["stats"]),
        _row("grad kernel", measure(kernels["grad"]), moved["grad"]),
        _row("scale_rows, incoming gradient 1", measure(lambda: ce.scale_rows(grad, one, "triton")),
             0, "skipped on the device"),
        _row("scale_rows, scalar 0.5", measure(lambda: ce.scale_rows(grad, half, "triton")),
             2 * nbytes),
        _row("scale_rows, per-row 0.5", measure(lambda: ce.scale_rows(grad, g_rows, "triton")),
             2 * nbytes),
        _row("torch grad.mul_(g[:, None])", measure(lambda: grad.mul_(g_rows[:, None])),
             2 * nbytes, "the backward before scale_rows"),
        _row("torch clone", measure(lambda: x.clone()), 2 * nbytes),
    ]  # fmt: skip
    impls = {
        "syne": lambda xx: ce.vocab_parallel_cross_entropy(xx, target, reduction="mean"),
        "syne-inplace": lambda xx: ce.vocab_parallel_cross_entropy(
            xx, target, reduction="mean", inplace_backward=True
        ),
    }
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        if device.type != "cuda":
            raise ImportError("Liger-Kernel needs CUDA")
        liger = LigerCrossEntropyLoss()
        impls["liger"] = lambda xx: liger(xx, target)
    except Exception as exc:
        lines.append(f"| liger | - | - | - | skipped: {type(exc).__name__} |")
    for name, fn in impls.items():
        xx = x.clone().requires_grad_()

        def setup(xx=xx):
            xx.grad = None

        fwd = measure(lambda xx=xx, fn=fn: fn(xx), setup)
        both = measure(lambda xx=xx, fn=fn: fn(xx).backward(), setup)
        lines.append(_row(f"{name} forward", fwd, 2 * nbytes, "with the gradient written"))
        lines.append(_row(f"{name} forward+backward", both, 2 * nbytes, "x.grad set"))
        del xx
    return "\n".join(lines)


def sweep(args, buf: Buffers, device, dtype) -> str:
    n, v = buf.x.shape
    configs = SWEEP if not args.small else [(256, 4), (512, 4)]
    moved = buf.moved()
    times: dict[str, dict[tuple[int, int], float]] = {k: {} for k in moved}
    for block, warps in configs:
        for name, fn in _launchers(buf, block, warps).items():
            try:
                times[name][block, warps] = B.measure(
                    name, fn, device, args.warmup, args.iters
                ).time_ms
            except Exception as exc:  # a configuration the compiler rejects
                print(f"{name} BLOCK={block} warps={warps}: {type(exc).__name__}: {exc}")
                times[name][block, warps] = float("nan")
    default = ce._block_and_warps(v)
    lines = [
        f"### Launch sweep at N={n}, V={v}, {dtype} (ms; * fastest, d default)",
        "",
        "| BLOCK | warps | " + " | ".join(f"{k} (ms)" for k in moved) + " |",
        "| ---: | ---: | " + " | ".join("---:" for _ in moved) + " |",
    ]
    best = {k: min((t for t in d.items() if t[1] == t[1]), key=lambda kv: kv[1])[0]
            for k, d in times.items()}  # fmt: skip
    for cfg in configs:
        cells = []
        for k in moved:
            mark = ("*" if best[k] == cfg else "") + ("d" if cfg == default else "")
            cells.append(f"{times[k][cfg]:.3f}{mark}")
        lines.append(f"| {cfg[0]} | {cfg[1]} | " + " | ".join(cells) + " |")
    lines.append("")
    for k, cfg in best.items():
        t = times[k][cfg]
        lines.append(
            f"- {k}: fastest BLOCK={cfg[0]}, num_warps={cfg[1]}: {t:.3f} ms, "
            f"{moved[k] / (t / 1e3) / 1e9:,.0f} GB/s"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    B.add_common_arguments(parser)
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.small:
        args.tokens, args.vocab, args.iters, args.warmup = 7, 1000, 1, 0
    dtype = B.bench_dtype(args.dtype, device)
    report = B.Report("Cross-entropy kernel breakdown and launch sweep", device)
    buf = Buffers(args.tokens, args.vocab, device, dtype)
    report.add(breakdown(args, buf, device, dtype))
    if not args.skip_sweep:
        report.add(sweep(args, buf, device, dtype))
    report.write(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
