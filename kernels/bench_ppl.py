"""Benchmark: forward-only per-token NLL (PPL scoring) without materialising the logits.

GPU (N=8192 tokens, H=4096, V=128256, bf16; whole-model comparison on a Llama-3-8B-shaped
model for each of --layers (decoder layers), random weights; 32 layers is Llama-3-8B itself):
    python kernels/bench_ppl.py --output bench_ppl.md
CPU smoke run:
    python kernels/bench_ppl.py --device cpu --small

Head only (hidden states -> NLL per token):
  torch-upcast      logits = h @ W^T, F.cross_entropy(logits.float(), reduction="none")
  syne              megatron_syne token_nll_from_hidden (chunked GEMM + Triton logsumexp)
Whole model (input ids -> scores), tokens/s and peak memory:
  hf-labels         transformers model(input_ids, labels=input_ids)  (mean loss only)
  hf-logits+ce      model(input_ids).logits -> per-token F.cross_entropy on fp32
  syne              model.model(input_ids) hidden states -> token_nll_from_hidden
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from megatron_syne.kernels import benchmarking as B  # noqa: E402
from megatron_syne.kernels.ppl import token_nll_from_hidden  # noqa: E402


def _measure_throughput(name, fn, device, args, err: float, n_tokens: int) -> B.Measurement:
    m = B.measure(name, fn, device, args.warmup, args.iters, max_abs_err=err)
    m.note = B.tokens_per_second(n_tokens, m.time_ms)
    return m


def bench_head(args, device, dtype) -> str:
    n, h, v = args.tokens, args.hidden, args.vocab
    gemm_flops, gemm_ms = B.measured_matmul_flops(device, n, v, h, dtype)
    out = [
        f"### PPL head: N={n} tokens, H={h}, V={v}, {dtype}",
        "",
        f"Floor: one N x V x H product = {2 * n * v * h / 1e12:.4f} TFLOP, measured "
        f"{gemm_ms:.3f} ms ({gemm_flops / 1e12:.1f} TFLOP/s); the logits of the whole batch "
        f"would be {n * v * 2 / 2**30:.2f} GiB in bf16 and {n * v * 4 / 2**30:.2f} GiB in fp32.",
        "",
    ]
    hidden, weight, target = B.random_head_inputs(n, h, v, device, dtype)
    ref = F.cross_entropy(hidden.float() @ weight.float().t(), target, reduction="none")
    impls = {
        "torch-upcast": lambda: F.cross_entropy(
            (hidden @ weight.t()).float(), target, reduction="none"
        ),
        "syne": lambda: token_nll_from_hidden(hidden, weight, target),
    }
    rows = []
    with torch.no_grad():
        for name, fn in impls.items():
            err = (fn() - ref).abs().max().item()
            rows.append(_measure_throughput(name, fn, device, args, err, n))
    out += [B.format_table(rows, gemm_ms), "", "max abs err: per-token NLL vs fp32 logits."]
    return "\n".join(out)


def _build_llama(args, layers, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn_hidden,
        num_hidden_layers=layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq_length, 128),
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def bench_model(args, layers, device, dtype) -> str:
    try:
        model = _build_llama(args, layers, device, dtype)
    except Exception as exc:  # transformers missing or API drift: say so, do not fake numbers
        return f"### Whole model: skipped ({type(exc).__name__}: {exc})"
    batch = max(1, args.tokens // args.seq_length)
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (batch, args.seq_length), device=device)
    n_scored = batch * (args.seq_length - 1)
    params = sum(p.numel() for p in model.parameters())

    def hf_labels():
        return model(input_ids=ids, labels=ids).loss

    def hf_logits_ce():
        logits = model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )

    def syne():
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        return token_nll_from_hidden(
            hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, ids[:, 1:].reshape(-1)
        )

    rows = []
    with torch.no_grad():
        reference = hf_labels().float().item()
        for name, fn, mean_of in [
            ("hf-labels", hf_labels, lambda x: x.float().item()),
            ("hf-logits+ce", hf_logits_ce, lambda x: x.mean().item()),
            ("syne", syne, lambda x: x.mean().item()),
        ]:
            err = abs(mean_of(fn()) - reference)
            rows.append(_measure_throughput(name, fn, device, args, err, n_scored))
    hf_tps = n_scored / (rows[0].time_ms / 1e3)
    syne_tps = n_scored / (rows[-1].time_ms / 1e3)
    return "\n".join(
        [
            f"### Whole model: Llama-shaped, {layers} layers, H={args.hidden}, "
            f"V={args.vocab}, {params / 1e9:.2f} B parameters, {batch} x {args.seq_length} "
            f"tokens, {dtype}",
            "",
            B.format_table(rows),
            "",
            f"syne / hf-labels tokens/s: {syne_tps / hf_tps:.2f}x. max abs err: mean NLL vs "
            "the hf-labels loss.",
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    B.add_common_arguments(parser)
    parser.add_argument("--ffn-hidden", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument(
        "--layers", type=int, nargs="+", default=[4],
        help="decoder layers of the model; several values: one whole-model table each",
    )  # fmt: skip
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.small:
        args.tokens, args.hidden, args.vocab, args.ffn_hidden = 256, 64, 1000, 128
        args.heads, args.kv_heads, args.layers, args.seq_length = 4, 2, [2], 64
        args.iters = min(args.iters, 3)
    dtype = B.bench_dtype(args.dtype, device)
    report = B.Report("PPL scoring benchmark", device)
    report.add(bench_head(args, device, dtype))
    if not args.skip_model:
        for layers in args.layers:
            report.add(bench_model(args, layers, device, dtype))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report.write(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
