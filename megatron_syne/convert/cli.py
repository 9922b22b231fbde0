"""Command line of ``tools/checkpoint/convert.py`` (HF <-> Megatron checkpoint conversion)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_syne.convert.arch import ConversionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/checkpoint/convert.py",
        description="Convert Llama-3 checkpoints between Hugging Face safetensors and "
        "megatron-core torch_dist, streaming tensor by tensor.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    h2m = sub.add_parser(
        "hf-to-megatron",
        help="HF directory -> torch_dist checkpoint for --load ... --no-load-optim --no-load-rng",
    )
    h2m.add_argument(
        "--hf-dir", type=Path, required=True, help="HF model directory (config.json + safetensors)"
    )
    h2m.add_argument(
        "--save", type=Path, required=True, help="output root (gets iter_0000000 + latest marker)"
    )
    h2m.add_argument(
        "--target-tensor-parallel-size",
        type=int,
        default=1,
        help="TP the training run will use: checked against the shape, sets vocab padding "
        "(torch_dist reshards on load, so other layouts load too)",
    )
    h2m.add_argument(
        "--target-pipeline-parallel-size",
        type=int,
        default=1,
        help="PP the training run will use (checked: num_layers must divide evenly)",
    )
    h2m.add_argument(
        "--preset",
        default=None,
        help="refuse the conversion unless the HF model has this preset's shape (e.g. llama3-8b)",
    )
    h2m.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad embedding rows to a multiple of lcm(this, TP), as the training run does (default 128)",
    )
    h2m.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="cast weights (default: keep the checkpoint's)",
    )
    h2m.add_argument(
        "--scratch-dir",
        type=Path,
        default=None,
        help="where the scratch file (checkpoint-sized) goes; default: inside --save",
    )
    h2m.add_argument(
        "--overwrite", action="store_true", help="replace an existing checkpoint in --save"
    )
    h2m.add_argument("--no-progress", action="store_true")

    m2h = sub.add_parser("megatron-to-hf", help="torch_dist checkpoint -> HF directory")
    m2h.add_argument(
        "--load",
        type=Path,
        required=True,
        help="save root (latest checkpoint) or an iter_XXXXXXX directory",
    )
    m2h.add_argument("--save", type=Path, required=True, help="output HF directory")
    m2h.add_argument(
        "--preset", default=None, help="model shape, when the checkpoint does not record it"
    )
    m2h.add_argument(
        "--hf-config", type=Path, default=None, help="take the model shape from this config.json"
    )
    m2h.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="output dtype (default: the checkpoint's)",
    )
    m2h.add_argument(
        "--max-shard-size",
        default="2GB",
        help="safetensors shard size, e.g. 2GB, 5GB (default 2GB)",
    )
    m2h.add_argument(
        "--tokenizer-dir",
        type=Path,
        default=None,
        help="copy tokenizer files from this directory (e.g. the original HF model)",
    )
    m2h.add_argument(
        "--overwrite", action="store_true", help="replace model files already in --save"
    )
    m2h.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf-to-megatron":
            from megatron_syne.convert.hf_to_megatron import (
                HFToMegatronConfig,
                convert_hf_to_megatron,
            )

            summary = convert_hf_to_megatron(
                HFToMegatronConfig(
                    hf_dir=args.hf_dir,
                    save=args.save,
                    target_tensor_parallel_size=args.target_tensor_parallel_size,
                    target_pipeline_parallel_size=args.target_pipeline_parallel_size,
                    preset=args.preset,
                    make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                    dtype=args.dtype,
                    scratch_dir=args.scratch_dir,
                    overwrite=args.overwrite,
                    show_progress=not args.no_progress,
                )
            )
        else:
            from megatron_syne.convert.megatron_to_hf import (
                MegatronToHFConfig,
                convert_megatron_to_hf,
            )

            summary = convert_megatron_to_hf(
                MegatronToHFConfig(
                    load=args.load,
                    save=args.save,
                    preset=args.preset,
                    hf_config=args.hf_config,
                    dtype=args.dtype,
                    max_shard_size=args.max_shard_size,
                    tokenizer_dir=args.tokenizer_dir,
                    overwrite=args.overwrite,
                    show_progress=not args.no_progress,
                )
            )
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.command}: done")
    for line in summary.lines():
        print(f"  {line}")
    return 0
