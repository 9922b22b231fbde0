"""Train a topic classifier on labelled JSONL and evaluate it on a held-out split.

Input: JSONL lines ``{"text": ..., "topic": <taxonomy id>, "lang": optional}``. Lines that are
not JSON or lack a text, and rows whose ``lang`` is not a string or not the language the
taxonomy gives their topic, are written to ``<output>/rejects.jsonl`` with the reason and
counted; a label that is not a topic of the taxonomy is an error (a typo there would silently
train a wrong label set), and so is a file that is not UTF-8 (named with its line).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_syne.topics.classifier import (
    ENCODER_DIR,
    NgramModelConfig,
    TopicModel,
    train_ngram_model,
)
from megatron_syne.topics.taxonomy import Taxonomy, check_labels
from megatron_syne.utils.io import atomic_open, save_png


@dataclass
class LabelledData:
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    langs: list[str] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)


class TrainingDataError(ValueError):
    """Training input that cannot be used; the message names the file (and line) and the fix."""


def _check_distinct_inputs(paths: list[str | os.PathLike]) -> None:
    seen: dict[str, str] = {}
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:
            raise TrainingDataError(
                f"--input {path} is the same file as {seen[key]}: its examples would count twice; "
                "list each file once"
            )
        seen[key] = str(path)


def read_labelled_jsonl(paths: list[str | os.PathLike], taxonomy: Taxonomy) -> LabelledData:
    _check_distinct_inputs(paths)
    data = LabelledData()
    where_labels: list[tuple[str, str]] = []
    known = set(taxonomy.ids)
    for path in paths:
        if not os.path.isfile(path):
            raise TrainingDataError(
                f"{path}: training input not found (or not a file); pass labelled JSONL "
                "written by tools/topics/seed_labels.py (or your own) to --input"
            )
        # Read bytes and decode line by line, so a non-UTF-8 line is named by its number.
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                where = f"{path}:{line_no}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise TrainingDataError(
                        f"{where}: not valid UTF-8 ({e.reason} at byte {e.start} of the line); "
                        "convert the file to UTF-8 (e.g. iconv -f GB18030 -t UTF-8)"
                    ) from e
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    data.rejects.append({"where": where, "reason": f"invalid JSON: {e}"})
                    continue
                if not isinstance(row, dict):
                    data.rejects.append({"where": where, "reason": "not a JSON object"})
                    continue
                text, topic = row.get("text"), row.get("topic")
                if not isinstance(text, str) or not text.strip():
                    data.rejects.append({"where": where, "reason": "missing or empty `text`"})
                    continue
                if not isinstance(topic, str) or not topic:
                    data.rejects.append({"where": where, "reason": "missing `topic`"})
                    continue
                where_labels.append((where, topic))
                lang = row.get("lang")
                if lang is not None and not isinstance(lang, str):
                    data.rejects.append(
                        {"where": where, "reason": f"`lang` must be a string, got {lang!r}"}
                    )
                    continue
                if lang and topic in known and taxonomy.topic(topic).lang != lang:
                    data.rejects.append(
                        {
                            "where": where,
                            "reason": f"`lang` {lang!r} is not the language of topic {topic!r} "
                            f"({taxonomy.topic(topic).lang!r} in the taxonomy): a document only "
                            "gets a topic of its own language",
                        }
                    )
                    continue
                data.texts.append(text)
                data.labels.append(topic)
                data.langs.append(lang)
    check_labels(taxonomy, where_labels, ", ".join(map(str, paths)))
    data.langs = [
        lang if lang else taxonomy.topic(label).lang for lang, label in zip(data.langs, data.labels)
    ]
    return data


def split_held_out(
    labels: list[str], held_out_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split indices (train, test); topics with one example stay in train."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for label in sorted(by_label):
        idx = np.array(by_label[label])
        rng.shuffle(idx)
        n_test = int(round(held_out_fraction * len(idx))) if len(idx) >= 2 else 0
        n_test = min(max(n_test, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        test.extend(idx[:n_test].tolist())
        train.extend(idx[n_test:].tolist())
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


def evaluate(model: TopicModel, texts: list[str], labels: list[str], langs: list[str]) -> dict:
    """Accuracy, macro-F1 and per-topic precision/recall/F1/support on labelled documents."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
    from sklearn.metrics import precision_recall_fscore_support as prfs

    predicted, _ = model.predict(texts, langs)
    topics = sorted(set(labels) | set(predicted))
    precision, recall, f1, support = prfs(labels, predicted, labels=topics, zero_division=0)
    return {
        "n_documents": len(texts),
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(
            f1_score(
                labels, predicted, labels=sorted(set(labels)), average="macro", zero_division=0
            )
        ),
        "per_topic": {
            t: {
                "precision": float(p),
                "recall": float(r),
                "f1": float(f),
                "support": int(s),
            }
            for t, p, r, f, s in zip(topics, precision, recall, f1, support)
        },
        "confusion_labels": topics,
        "confusion_matrix": confusion_matrix(labels, predicted, labels=topics).tolist(),
    }


def plot_confusion_matrix(metrics: dict, path: str | os.PathLike, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = metrics["confusion_labels"]
    matrix = np.array(metrics["confusion_matrix"], dtype=np.float64)
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted topic")
    ax.set_ylabel("true topic")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j]:
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label="fraction of the true topic")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


@dataclass
class TrainResult:
    model: TopicModel
    metrics: dict
    output_dir: Path
    n_train: int
    n_test: int
    n_rejects: int
    seconds: float


def train_topic_classifier(
    input_paths: list[str | os.PathLike],
    taxonomy: Taxonomy,
    output_dir: str | os.PathLike,
    held_out_fraction: float = 0.2,
    ngram_config: NgramModelConfig | None = None,
    encoder_config=None,
    seed: int = 1234,
) -> TrainResult:
    """Train (n-gram model, or the HF encoder when ``encoder_config`` is given), evaluate on a
    stratified held-out split, write the model directory, metrics, rejects and the PNG."""
    if not 0 <= held_out_fraction < 1:
        raise ValueError(f"--held-out-fraction must be in [0, 1), got {held_out_fraction}")
    start = time.time()
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingDataError(
            f"--output-dir {output_dir} is an existing file; give a directory for the model"
        )
    data = read_labelled_jsonl(input_paths, taxonomy)
    if len(set(data.labels)) < 2:
        raise TrainingDataError(
            f"{', '.join(map(str, input_paths))}: need examples of at least two topics to train "
            f"a classifier, found {sorted(set(data.labels))} ({len(data.labels)} usable "
            f"example(s), {len(data.rejects)} rejected line(s)); add labelled examples"
        )
    # The directory is created only now that there is something to write, and removed again
    # if this run created it and then failed: no empty or half-written model is left behind.
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _train_and_write(
            data, taxonomy, output_dir, held_out_fraction, ngram_config, encoder_config, seed, start
        )
    except BaseException:
        if created:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def _train_and_write(
    data: LabelledData,
    taxonomy: Taxonomy,
    output_dir: Path,
    held_out_fraction: float,
    ngram_config: NgramModelConfig | None,
    encoder_config,
    seed: int,
    start: float,
) -> TrainResult:
    train_idx, test_idx = split_held_out(data.labels, held_out_fraction, seed)
    pick = lambda values, idx: [values[i] for i in idx]  # noqa: E731
    train_texts, train_labels = pick(data.texts, train_idx), pick(data.labels, train_idx)

    if encoder_config is None:
        model = train_ngram_model(
            train_texts, train_labels, taxonomy, ngram_config or NgramModelConfig()
        )
        extra = {}
    else:
        from megatron_syne.topics.encoder import finetune_encoder

        classes = sorted(set(train_labels))
        encoder, epoch_losses = finetune_encoder(train_texts, train_labels, classes, encoder_config)
        model = TopicModel(
            kind="hf_encoder",
            taxonomy=taxonomy,
            classes=classes,
            config={k: v for k, v in vars(encoder_config).items()},
            encoder=encoder,
            max_chars=100 * encoder_config.max_length,
        )
        extra = {"epoch_losses": epoch_losses}

    metrics = {
        "n_train": len(train_idx),
        "n_held_out": len(test_idx),
        "n_rejects": len(data.rejects),
        "train_label_counts": dict(sorted(Counter(train_labels).items())),
        "topics_without_examples": [t for t in taxonomy.ids if t not in set(data.labels)],
        **extra,
    }
    if len(test_idx):
        metrics["held_out"] = evaluate(
            model,
            pick(data.texts, test_idx),
            pick(data.labels, test_idx),
            pick(data.langs, test_idx),
        )
    model.metrics = metrics
    if model.kind == "hf_encoder":
        model.encoder.save(output_dir / ENCODER_DIR)
    model.save(output_dir)

    with atomic_open(output_dir / "metrics.json", "w", encoding="utf-8") as f:
        json.dump(metrics, f, ensure_ascii=False, indent=2)
    with atomic_open(output_dir / "rejects.jsonl", "w", encoding="utf-8") as f:
        for reject in data.rejects:
            f.write(json.dumps(reject, ensure_ascii=False) + "\n")
    if "held_out" in metrics:
        held = metrics["held_out"]
        plot_confusion_matrix(
            held,
            output_dir / "confusion_matrix.png",
            f"held-out confusion ({held['n_documents']} docs, accuracy {held['accuracy']:.3f}, "
            f"macro-F1 {held['macro_f1']:.3f})",
        )
    return TrainResult(
        model=model,
        metrics=metrics,
        output_dir=output_dir,
        n_train=len(train_idx),
        n_test=len(test_idx),
        n_rejects=len(data.rejects),
        seconds=time.time() - start,
    )


def format_metrics_table(metrics: dict) -> str:
    """Markdown per-topic precision/recall table of the held-out evaluation."""
    held = metrics.get("held_out")
    if not held:
        return "(no held-out split)"
    lines = [
        f"held-out documents: {held['n_documents']}  accuracy: {held['accuracy']:.4f}  "
        f"macro-F1: {held['macro_f1']:.4f}",
        "",
        "| topic | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for topic, m in held["per_topic"].items():
        lines.append(
            f"| {topic} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        )
    return "\n".join(lines)
