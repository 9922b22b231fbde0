"""Train a topic classifier on labelled JSONL (``text``, ``topic``[, ``lang``]).

    python tools/topics/train.py --input seeds.jsonl --output-dir out/topic-model
    python tools/topics/train.py --input seeds.jsonl --output-dir out/topic-encoder \
        --encoder-path /models/tinybert   # optional: fine-tune a local HF encoder (GPU)

Writes the model directory (for label.py), metrics.json (accuracy, macro-F1, per-topic
precision/recall on the held-out split), confusion_matrix.png and rejects.jsonl.
"""

from __future__ import annotations

import argparse
import sys

from megatron_syne.topics.classifier import NgramModelConfig
from megatron_syne.topics.taxonomy import DEFAULT_TAXONOMY, TaxonomyError, load_taxonomy
from megatron_syne.topics.training import (
    TrainResult,
    format_metrics_table,
    train_topic_classifier,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", nargs="+", required=True, help="labelled JSONL file(s)")
    p.add_argument("--output-dir", required=True, help="model directory to write")
    p.add_argument("--taxonomy", default=str(DEFAULT_TAXONOMY), help="taxonomy YAML")
    p.add_argument("--held-out-fraction", type=float, default=0.2, help="per topic, stratified")
    p.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("n-gram model (default)")
    d = NgramModelConfig()
    g.add_argument(
        "--char-ngram-range", type=int, nargs=2, default=[d.char_ngram_min, d.char_ngram_max]
    )
    g.add_argument(
        "--word-ngram-range", type=int, nargs=2, default=[d.word_ngram_min, d.word_ngram_max]
    )
    g.add_argument("--n-features", type=int, default=d.n_features, help="hash buckets per family")
    g.add_argument("--max-chars", type=int, default=d.max_chars, help="document head featurised")
    g.add_argument("--alpha", type=float, default=d.alpha, help="L2 regularisation")
    g.add_argument("--max-iter", type=int, default=d.max_iter)
    g.add_argument("--no-class-weight", action="store_true", help="do not balance topics")
    e = p.add_argument_group("HF encoder fine-tuning (optional)")
    e.add_argument("--encoder-path", help="local HF encoder directory; enables fine-tuning")
    e.add_argument("--epochs", type=int, default=3)
    e.add_argument("--lr", type=float, default=5e-5)
    e.add_argument("--micro-batch-size", type=int, default=32)
    e.add_argument("--seq-length", type=int, default=256, help="encoder tokens per document")
    e.add_argument("--device", default="auto", help="auto | cuda | cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = _train(args)
    except (TaxonomyError, ValueError, OSError) as e:
        # TaxonomyError, TrainingDataError and bad flag values are ValueErrors naming the file,
        # line or flag; OSError: an --input or --output-dir the system refuses (names the path)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_metrics_table(result.metrics))
    print(
        f"\nmodel ({result.model.kind}): {result.output_dir}  train documents: {result.n_train}  "
        f"held-out: {result.n_test}  rejects: {result.n_rejects} "
        f"(see {result.output_dir / 'rejects.jsonl'})  time: {result.seconds:.1f} s"
    )
    missing = result.metrics["topics_without_examples"]
    if missing:
        print(f"warning: no training examples for {len(missing)} topic(s): {', '.join(missing)}")
    return 0


def _train(args: argparse.Namespace) -> TrainResult:
    taxonomy = load_taxonomy(args.taxonomy)
    encoder_config = None
    if args.encoder_path:
        from megatron_syne.topics.encoder import EncoderTrainConfig

        encoder_config = EncoderTrainConfig(
            encoder_path=args.encoder_path,
            epochs=args.epochs,
            learning_rate=args.lr,
            micro_batch_size=args.micro_batch_size,
            max_length=args.seq_length,
            device=args.device,
            seed=args.seed,
        )
    ngram_config = NgramModelConfig(
        char_ngram_min=args.char_ngram_range[0],
        char_ngram_max=args.char_ngram_range[1],
        word_ngram_min=args.word_ngram_range[0],
        word_ngram_max=args.word_ngram_range[1],
        n_features=args.n_features,
        max_chars=args.max_chars,
        alpha=args.alpha,
        max_iter=args.max_iter,
        class_weight=None if args.no_class_weight else "balanced",
        seed=args.seed,
    )
    return train_topic_classifier(
        args.input,
        taxonomy,
        args.output_dir,
        held_out_fraction=args.held_out_fraction,
        ngram_config=ngram_config,
        encoder_config=encoder_config,
        seed=args.seed,
    )


if __name__ == "__main__":
    sys.exit(main())
