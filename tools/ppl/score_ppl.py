"""Score each document's perplexity under a base model; write nll/ppl/ppl_status columns.

    # Hugging Face checkpoint directory:
    python tools/ppl/score_ppl.py --data-prefix out/web-cn_text_document --hf-model /models/llama3-8b
    # Megatron (torch_dist) checkpoint, data-parallel over 8 GPUs:
    torchrun --nproc_per_node 8 tools/ppl/score_ppl.py --data-prefix P \
        --load checkpoints/llama3-8b --preset llama3-8b --micro-batch-size 8

Resumable: finished chunks live in <prefix>.ppl.parts/ and are skipped when rerun.
"""

from __future__ import annotations

import argparse
import sys

from megatron_syne.data.metadata import MetadataError
from megatron_syne.scoring.parts import PartsError
from megatron_syne.scoring.ppl import PPLConfig, format_summary, score_dataset
from megatron_syne.training.checkpointing import CheckpointError

PRESET_OVERRIDES = (
    ("num_layers", int),
    ("hidden_size", int),
    ("ffn_hidden_size", int),
    ("num_attention_heads", int),
    ("num_query_groups", int),
    ("kv_channels", int),
    ("vocab_size", int),
    ("max_position_embeddings", int),
    ("rotary_base", float),
    ("norm_epsilon", float),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-prefix", required=True)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--hf-model", help="local Hugging Face causal-LM directory")
    model.add_argument("--load", help="Megatron checkpoint directory (with --preset)")
    p.add_argument("--preset", help="model preset of --load (e.g. llama3-8b, tiny)")
    for name, kind in PRESET_OVERRIDES:
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=None,
            help=f"override the preset's {name}",
        )
    p.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens per document scored")
    p.add_argument("--min-tokens", type=int, default=32, help="shorter documents: too_short")
    p.add_argument("--micro-batch-size", type=int, default=8, help="documents per forward pass")
    p.add_argument("--chunk-size", type=int, default=512, help="documents per resumable part")
    p.add_argument("--bos-token-id", type=int, default=None)
    p.add_argument("--eod-token-id", type=int, default=None)
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS")
    p.add_argument("--tokenizer-type", default="Llama3Tokenizer")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--fused-kernel", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--parts-dir", default=None)
    p.add_argument("--restart", action="store_true", help="discard partial results first")
    p.add_argument("--keep-parts", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {
        name: getattr(args, name) for name, _ in PRESET_OVERRIDES if getattr(args, name) is not None
    }
    if args.untie_embeddings_and_output_weights:
        overrides["untie_embeddings_and_output_weights"] = True
    try:
        config = PPLConfig(
            data_prefix=args.data_prefix,
            hf_model=args.hf_model,
            load=args.load,
            preset=args.preset,
            preset_overrides=overrides,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            max_tokens=args.max_tokens,
            min_tokens=args.min_tokens,
            micro_batch_size=args.micro_batch_size,
            chunk_size=args.chunk_size,
            bos_token_id=args.bos_token_id,
            eod_token_id=args.eod_token_id,
            no_bos=args.no_bos,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            device=args.device,
            dtype=args.dtype,
            fused_kernel=args.fused_kernel,
            parts_dir=args.parts_dir,
            restart=args.restart,
            keep_parts=args.keep_parts,
            progress=not args.no_progress,
        )
        summary = score_dataset(config)
    except (MetadataError, PartsError, CheckpointError, OSError, ValueError) as e:
        # OSError: a --hf-model directory transformers cannot read (it names the path)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.merged or summary.world_size == 1:
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
