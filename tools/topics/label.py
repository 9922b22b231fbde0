"""Write ``topic`` and ``topic_confidence`` into the metadata of an indexed dataset.

    python tools/topics/label.py --data-prefix out/web-cn_text_document --model out/topic-model \
        --workers 16
    # across nodes (Slurm array; shard defaults come from SLURM_ARRAY_TASK_ID/COUNT):
    sbatch --array=0-7 ... tools/topics/label.py --data-prefix P --model M
    python tools/topics/label.py --data-prefix P --model M --num-shards 8 --merge-only

Resumable: finished chunks live in <prefix>.topics.parts/ and are skipped when rerun.
"""

from __future__ import annotations

import argparse
import sys

from megatron_syne.data.metadata import MetadataError
from megatron_syne.scoring.parts import PartsError
from megatron_syne.topics.classifier import TopicModelError
from megatron_syne.topics.labeling import LabelConfig, format_summary, label_dataset
from megatron_syne.utils.slurm import slurm_shard_defaults


def parse_args(argv=None) -> argparse.Namespace:
    num_shards, shard_index = slurm_shard_defaults()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-prefix", required=True, help="dataset prefix (without .bin/.idx)")
    p.add_argument("--model", required=True, help="model directory from tools/topics/train.py")
    p.add_argument("--tokenizer-type", default="Llama3Tokenizer")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--workers", type=int, default=1, help="processes on this node")
    p.add_argument("--chunk-size", type=int, default=1024, help="documents per resumable part")
    p.add_argument("--num-shards", type=int, default=num_shards)
    p.add_argument("--shard-index", type=int, default=shard_index)
    p.add_argument("--parts-dir", default=None, help="default: <prefix>.topics.parts")
    p.add_argument("--merge-only", action="store_true", help="merge finished shards, label nothing")
    p.add_argument("--restart", action="store_true", help="discard partial results first")
    p.add_argument("--keep-parts", action="store_true", help="keep part files after merging")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as e:  # a malformed Slurm environment (the shard defaults)
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        config = LabelConfig(
            data_prefix=args.data_prefix,
            model_dir=args.model,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            workers=args.workers,
            chunk_size=args.chunk_size,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
            parts_dir=args.parts_dir,
            merge_only=args.merge_only,
            restart=args.restart,
            keep_parts=args.keep_parts,
            progress=not args.no_progress,
        )
        summary = label_dataset(config)
    except (MetadataError, PartsError, TopicModelError, ValueError, OSError) as e:
        # bad flag values (ValueError), the model directory, the metadata sidecar and existing
        # parts: each message names the file or flag and the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
