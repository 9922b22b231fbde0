"""GPU correctness check of the Triton kernels in bf16 and fp32 against the torch references.

    python kernels/check_gpu.py --output gpu_correctness.md

Compiles and runs every kernel (no interpreter) on odd shapes, for every option combination,
and compares loss and gradients with the plain-autograd fp32 reference. bf16 inputs are
compared with the reference on the same bf16 values upcast to fp32, so the only allowed error
is the bf16 rounding of the returned gradients. Exits 1 if any case fails.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from megatron_syne.kernels import benchmarking as B  # noqa: E402
from megatron_syne.kernels.cross_entropy import (  # noqa: E402
    cross_entropy_reference,
    vocab_parallel_cross_entropy,
)
from megatron_syne.kernels.fused_linear_cross_entropy import (  # noqa: E402
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from megatron_syne.kernels.ppl import token_nll_from_hidden, token_nll_reference  # noqa: E402


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (0/0 = 0)."""
    scale = want.float().abs().max().item()
    diff = (got.float() - want.float()).abs().max().item()
    return diff / scale if scale > 0 else diff


def tolerance(dtype: torch.dtype) -> float:
    # fp32: accumulation-order noise. bf16: one rounding of the output (2^-8 relative) plus
    # the GEMM's bf16 output rounding for the fused head.
    return 2e-5 if dtype == torch.float32 else 2e-2


# (tokens, vocabularies of the loss, head vocabulary, hidden) for the GPU and for --small.
SHAPES = {"gpu": (1111, (128256, 32003), 32003, 256), "small": (37, (1000, 777), 1000, 16)}


def check_cross_entropy(device, results, shapes):
    n, vocabs, _, _ = shapes
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    for dtype, vocab in itertools.product(dtypes, vocabs):
        torch.manual_seed(0)
        logits = (torch.randn(n, vocab, device=device) * 3).to(dtype)
        target = torch.randint(0, vocab, (n,), device=device)
        target[::9] = -100
        mask = (torch.rand(n, device=device) > 0.2).float()
        for reduction, smoothing, z_weight, use_mask in itertools.product(
            ["none", "sum", "mean"], [0.0, 0.1], [0.0, 1e-3], [False, True]
        ):
            kw = dict(
                reduction=reduction, label_smoothing=smoothing, z_loss_weight=z_weight,
                loss_mask=mask if use_mask else None,
            )  # fmt: skip
            shape = target.shape if reduction == "none" else ()
            grads = [torch.randn(shape, device=device) for _ in range(2 if z_weight else 1)]
            errs = []
            outs = {}
            for impl in ("triton", "reference"):
                if impl == "triton":
                    x = logits.clone().requires_grad_()
                    out = vocab_parallel_cross_entropy(x, target, backend="triton", **kw)
                else:
                    x = logits.float().clone().requires_grad_()
                    out = cross_entropy_reference(x, target, **kw)
                out = out if isinstance(out, tuple) else (out,)
                sum((o * g).sum() for o, g in zip(out, grads)).backward()
                outs[impl] = ([o.detach() for o in out], x.grad)
            for got, want in zip(outs["triton"][0], outs["reference"][0]):
                errs.append(rel_err(got, want))
            errs.append(rel_err(outs["triton"][1], outs["reference"][1]))
            name = (
                f"ce {str(dtype)[6:]} V={vocab} {reduction} ls={smoothing} z={z_weight} "
                f"mask={use_mask}"
            )
            results.append((name, max(errs), tolerance(dtype)))


def check_fused_linear(device, results, shapes):
    n, _, vocab, hidden_size = shapes
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    for dtype in dtypes:
        torch.manual_seed(0)
        hidden = torch.randn(n, hidden_size, device=device).to(dtype)
        weight = (torch.randn(vocab, hidden_size, device=device) / 16).to(dtype)
        target = torch.randint(0, vocab, (n,), device=device)
        target[::9] = -100
        cases = itertools.product(
            ["tokens", "vocab"],
            [("mean", 0.0, 0.0), ("sum", 0.1, 0.0), ("none", 0.1, 1e-3), ("mean", 0.0, 1e-3)],
            [False],
        )
        # dW added to an fp32 main_grad (megatron-core DDP), both schedules.
        main_grad_cases = [(s, ("none", 0.0, 0.0), True) for s in ("tokens", "vocab")]
        for schedule, (reduction, smoothing, z_weight), main_grad in [*cases, *main_grad_cases]:
            kw = dict(reduction=reduction, label_smoothing=smoothing, z_loss_weight=z_weight)
            shape = target.shape if reduction == "none" else ()
            grads = [torch.randn(shape, device=device) for _ in range(2 if z_weight else 1)]
            res = {}
            for impl in ("fused", "reference"):
                h = (hidden if impl == "fused" else hidden.float()).clone().requires_grad_()
                w = torch.nn.Parameter((weight if impl == "fused" else weight.float()).clone())
                if impl == "fused" and main_grad:
                    w.main_grad = torch.zeros(w.shape, dtype=torch.float32, device=device)
                    w.grad_added_to_main_grad = False
                if impl == "fused":
                    out = fused_linear_cross_entropy(
                        h, w, target, chunk_tokens=max(8, n // 4), schedule=schedule,
                        chunk_vocab=vocab // 3 + 1, backend="triton", **kw,
                    )  # fmt: skip
                else:
                    out = fused_linear_cross_entropy_reference(h, w, target, **kw)
                out = out if isinstance(out, tuple) else (out,)
                sum((o * g).sum() for o, g in zip(out, grads)).backward()
                dw = w.main_grad if impl == "fused" and main_grad else w.grad
                res[impl] = ([o.detach() for o in out], h.grad, dw)
            errs = [rel_err(a, b) for a, b in zip(res["fused"][0], res["reference"][0])]
            errs += [rel_err(res["fused"][1], res["reference"][1])]
            errs += [rel_err(res["fused"][2], res["reference"][2])]
            name = (
                f"flce {schedule}{' +main_grad' if main_grad else ''} {str(dtype)[6:]} "
                f"V={vocab} {reduction} ls={smoothing} z={z_weight}"
            )
            results.append((name, max(errs), 2 * tolerance(dtype)))


def check_ppl(device, results, shapes):
    n, vocabs, _, hidden_size = shapes
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    for dtype in dtypes:
        torch.manual_seed(0)
        hidden = torch.randn(n, 2 * hidden_size, device=device).to(dtype)
        weight = (torch.randn(vocabs[0], 2 * hidden_size, device=device) / 22).to(dtype)
        target = torch.randint(0, vocabs[0], (n,), device=device)
        mask = torch.rand(n, device=device) > 0.1
        got = token_nll_from_hidden(hidden, weight, target, mask, backend="triton")
        want = token_nll_reference(hidden.float(), weight.float(), target, mask)
        name = f"ppl {str(dtype)[6:]} V={vocabs[0]}"
        results.append((name, rel_err(got, want), 2 * tolerance(dtype)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--small",
        action="store_true",
        help="tiny fp32 shapes on CPU through the Triton interpreter (checks this script runs)",
    )
    args = parser.parse_args(argv)
    if args.small:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print(
            "check_gpu.py needs a CUDA device (or --small for the CPU interpreter)", file=sys.stderr
        )
        return 2
    shapes = SHAPES["small" if args.small else "gpu"]
    torch.backends.cuda.matmul.allow_tf32 = False
    results: list[tuple[str, float, float]] = []
    start = time.perf_counter()
    for check in (check_cross_entropy, check_fused_linear, check_ppl):
        check(device, results, shapes)
        print(f"{check.__name__}: done at {time.perf_counter() - start:.1f} s", flush=True)
    lines = [
        f"## Kernel correctness on {B.device_label(device)} (torch {torch.__version__}, "
        f"Triton {'interpreter' if device.type == 'cpu' else 'compiled'})",
        "",
        "| case | max rel. error | tolerance | result |",
        "| --- | ---: | ---: | --- |",
    ]
    failed = 0
    for name, err, tol in results:
        ok = err <= tol
        failed += not ok
        lines.append(f"| {name} | {err:.2e} | {tol:.0e} | {'PASS' if ok else 'FAIL'} |")
    lines += ["", f"{len(results) - failed}/{len(results)} passed"]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
