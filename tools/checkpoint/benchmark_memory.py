"""Peak memory and time of HF <-> Megatron conversion on a random model of a chosen shape.

    python tools/checkpoint/benchmark_memory.py --work-dir /tmp/convbench \
        --num-layers 8 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 16 \
        --num-query-groups 4 --vocab-size 32000

Each conversion runs in its own process (``tools/checkpoint/convert.py``), so its peak RSS is
its own; the table is printed as Markdown.
"""

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_syne.convert.arch import LlamaArch  # noqa: E402
from megatron_syne.convert.synthetic import write_random_hf_checkpoint  # noqa: E402

CONVERT = Path(__file__).resolve().parent / "convert.py"


def _run(args: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(CONVERT), *args, "--no-progress"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"conversion failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--ffn-hidden-size", type=int, default=5632)
    parser.add_argument("--num-attention-heads", type=int, default=16)
    parser.add_argument("--num-query-groups", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-shard-size", default="500MB")
    args = parser.parse_args()

    arch = LlamaArch(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.hidden_size // args.num_attention_heads,
        vocab_size=args.vocab_size,
        max_position_embeddings=8192,
        rotary_base=500000.0,
        norm_epsilon=1e-5,
        untie_embeddings_and_output_weights=True,
        dtype=args.dtype,
    )
    if args.work_dir.exists():
        shutil.rmtree(args.work_dir)
    hf_dir = write_random_hf_checkpoint(args.work_dir / "hf", arch, max_shard_bytes=500 * 10**6)
    size = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
    rows = []
    out, seconds = _run(
        ["hf-to-megatron", "--hf-dir", str(hf_dir), "--save", str(args.work_dir / "mcore")]
    )
    rows.append(("hf-to-megatron", out, seconds))
    out, seconds = _run(
        [
            "megatron-to-hf",
            "--load",
            str(args.work_dir / "mcore"),
            "--save",
            str(args.work_dir / "hf_back"),
            "--max-shard-size",
            args.max_shard_size,
        ]
    )
    rows.append(("megatron-to-hf", out, seconds))
    print(
        f"model: {arch.num_parameters / 1e6:.0f}M parameters, {args.dtype}, {size / 2**20:.0f} MiB of safetensors"
    )
    print(
        "| direction | wall time (s) | peak RSS (MiB) | anonymous (MiB) | file-backed (MiB) | writer subprocess peak RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    for name, out, seconds in rows:
        m = re.search(
            r"peak RSS (\d+) MiB \(anonymous (\d+) MiB, file-backed (\d+) MiB\); writer subprocess peak RSS (\d+) MiB",
            out,
        )
        print(
            f"| {name} | {seconds:.1f} | {m.group(1)} | {m.group(2)} | {m.group(3)} | {m.group(4)} |"
        )


if __name__ == "__main__":
    main()
