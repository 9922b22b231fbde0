"""Topic classifiers: a fast character/word n-gram linear model (default) and a fine-tuned HF
encoder (optional, GPU), behind one saved-model format.

A saved model is a directory::

    model.json          kind ("ngram" | "hf_encoder"), taxonomy, training config, metrics
    classifier.joblib   (ngram) the scikit-learn pipeline
    encoder/            (hf_encoder) save_pretrained() weights + tokenizer

Why this default: character n-grams need no word segmentation, so one model serves Chinese and
English; scikit-learn's HashingVectorizer keeps memory flat whatever the vocabulary and makes
featurisation stateless (cheap to ship to worker processes), and a linear model over sparse
features labels thousands of documents per second per core. The joblib file is a pickle: load
only models you trained yourself.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megatron_syne.topics.taxonomy import Taxonomy
from megatron_syne.utils.io import atomic_open, atomic_path

MODEL_CARD = "model.json"
NGRAM_FILE = "classifier.joblib"
ENCODER_DIR = "encoder"


class TopicModelError(ValueError):
    """A model directory that cannot be loaded; the message names the file and the fix."""


@dataclass
class NgramModelConfig:
    """Hashing n-gram features + linear classifier (scikit-learn)."""

    char_ngram_min: int = 1
    char_ngram_max: int = 4
    word_ngram_min: int = 1
    word_ngram_max: int = 2
    n_features: int = 2**19  # hash buckets per feature family (char, word)
    max_chars: int = 4000  # only the head of a document is featurised (speed; topic is early)
    alpha: float = 1e-5  # L2 strength of the SGD logistic regression
    max_iter: int = 50
    class_weight: str | None = "balanced"  # seeds from a lexicon are rarely balanced
    seed: int = 1234

    def __post_init__(self) -> None:
        if not 1 <= self.char_ngram_min <= self.char_ngram_max:
            raise ValueError("need 1 <= char_ngram_min <= char_ngram_max")
        if not 1 <= self.word_ngram_min <= self.word_ngram_max:
            raise ValueError("need 1 <= word_ngram_min <= word_ngram_max")
        if self.n_features < 2**10 or self.max_chars < 1 or self.alpha <= 0 or self.max_iter < 1:
            raise ValueError("n_features >= 1024, max_chars >= 1, alpha > 0, max_iter >= 1")
        if self.class_weight not in (None, "balanced"):
            raise ValueError("class_weight must be None or 'balanced'")


def _build_ngram_pipeline(config: NgramModelConfig):
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import FeatureUnion, Pipeline

    common = dict(n_features=config.n_features, alternate_sign=False, norm=None, lowercase=True)
    features = FeatureUnion(
        [
            (
                "char",
                HashingVectorizer(
                    analyzer="char_wb",
                    ngram_range=(config.char_ngram_min, config.char_ngram_max),
                    **common,
                ),
            ),
            (
                "word",
                HashingVectorizer(
                    analyzer="word",
                    ngram_range=(config.word_ngram_min, config.word_ngram_max),
                    token_pattern=r"(?u)\b\w+\b",
                    **common,
                ),
            ),
        ]
    )
    classifier = SGDClassifier(
        loss="log_loss",
        alpha=config.alpha,
        max_iter=config.max_iter,
        tol=1e-4,
        class_weight=config.class_weight,
        random_state=config.seed,
    )
    return Pipeline(
        [
            ("features", features),
            ("tfidf", TfidfTransformer(sublinear_tf=True)),
            ("clf", classifier),
        ]
    )


@dataclass
class TopicModel:
    """A trained topic classifier. ``predict`` restricts each document to the topics of its
    language (when the taxonomy has topics for it) and renormalises the probabilities."""

    kind: str
    taxonomy: Taxonomy
    classes: list[str]
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    pipeline: object | None = None  # ngram
    encoder: object | None = None  # hf_encoder: megatron_syne.topics.encoder.EncoderClassifier
    max_chars: int = 4000

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """[n_docs, n_classes] probabilities, columns in ``self.classes`` order."""
        texts = [t[: self.max_chars] for t in texts]
        if self.kind == "ngram":
            return np.asarray(self.pipeline.predict_proba(texts), dtype=np.float64)
        return self.encoder.predict_proba(texts)

    def predict(
        self, texts: list[str], langs: list[str | None] | None = None
    ) -> tuple[list[str], np.ndarray]:
        """Return (topic id per document, confidence in [0, 1] per document)."""
        if not texts:
            return [], np.zeros(0, dtype=np.float32)
        proba = self.predict_proba(texts)
        if langs is not None:
            proba = proba * self._language_mask(langs)
            totals = proba.sum(axis=1, keepdims=True)
            # A document whose language has topics but whose allowed classes all got ~0
            # probability falls back to the unrestricted prediction rather than a 0/0.
            proba = np.where(totals > 0, proba / np.maximum(totals, 1e-300), proba)
        best = proba.argmax(axis=1)
        confidence = proba[np.arange(len(texts)), best].astype(np.float32)
        return [self.classes[i] for i in best], confidence

    def _language_mask(self, langs: list[str | None]) -> np.ndarray:
        class_lang = np.array([self.taxonomy.topic(c).lang for c in self.classes])
        masks: dict[str | None, np.ndarray] = {}
        out = np.empty((len(langs), len(self.classes)), dtype=np.float64)
        for i, lang in enumerate(langs):
            if lang not in masks:
                m = class_lang == lang
                masks[lang] = m.astype(np.float64) if m.any() else np.ones(len(self.classes))
            out[i] = masks[lang]
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # An older model's card goes first: until the new card is written the directory is not
        # a model, so a run that dies half-way never pairs an old card with new weights.
        (directory / MODEL_CARD).unlink(missing_ok=True)
        if self.kind == "ngram":
            import joblib

            with atomic_path(directory / NGRAM_FILE) as tmp:
                joblib.dump(self.pipeline, tmp)
        card = {
            "kind": self.kind,
            "classes": self.classes,
            "max_chars": self.max_chars,
            "config": self.config,
            "metrics": self.metrics,
            "taxonomy": self.taxonomy.to_dict(),
            "taxonomy_fingerprint": self.taxonomy.fingerprint(),
        }
        # The card is written last: a directory with a card is a complete model.
        with atomic_open(directory / MODEL_CARD, "w", encoding="utf-8") as f:
            json.dump(card, f, ensure_ascii=False, indent=2)
        return directory


def model_fingerprint(directory: str | os.PathLike) -> str:
    """Identity of a saved model (size + mtime of its files), recorded in resumable outputs so
    a resumed labelling run refuses to mix labels of two different models."""
    import hashlib

    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(directory)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def train_ngram_model(
    texts: list[str], labels: list[str], taxonomy: Taxonomy, config: NgramModelConfig
) -> TopicModel:
    pipeline = _build_ngram_pipeline(config)
    pipeline.fit([t[: config.max_chars] for t in texts], labels)
    # Hash buckets no training document touched keep a zero weight under L2: a sparse coef_
    # makes the saved model (and every worker's copy) tens of times smaller.
    pipeline.named_steps["clf"].sparsify()
    classes = [str(c) for c in pipeline.named_steps["clf"].classes_]
    return TopicModel(
        kind="ngram",
        taxonomy=taxonomy,
        classes=classes,
        config=asdict(config),
        pipeline=pipeline,
        max_chars=config.max_chars,
    )


def load_topic_model(directory: str | os.PathLike, device: str | None = None) -> TopicModel:
    """Load a model directory written by ``tools/topics/train.py``. Raises
    :class:`TopicModelError` (naming the file and the fix) for anything that is not one."""
    directory = Path(directory)
    card_path = directory / MODEL_CARD
    retrain = "retrain it with tools/topics/train.py (or restore the directory)"
    if not card_path.is_file():
        raise TopicModelError(
            f"{card_path}: not a topic model directory (no {MODEL_CARD}); "
            "train one with tools/topics/train.py"
        )
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise TopicModelError(f"{card_path}: unreadable model card ({e}); {retrain}") from e
    if not isinstance(card, dict):
        raise TopicModelError(f"{card_path}: expected a JSON object; {retrain}")
    missing = [k for k in ("kind", "classes", "taxonomy") if k not in card]
    if missing:
        raise TopicModelError(f"{card_path}: missing field(s) {missing}; {retrain}")
    kind, classes = card["kind"], card["classes"]
    if kind not in ("ngram", "hf_encoder"):
        raise TopicModelError(
            f"{card_path}: unknown model kind {kind!r} (expected 'ngram' or 'hf_encoder'); "
            f"{retrain}"
        )
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise TopicModelError(f"{card_path}: `classes` must be a list of topic ids; {retrain}")
    try:
        taxonomy = Taxonomy.from_dict(card["taxonomy"], path=str(card_path))
        unknown = [c for c in classes if c not in set(taxonomy.ids)]
        if unknown:
            raise TopicModelError(
                f"{card_path}: classes {unknown} are not topics of the model's taxonomy; {retrain}"
            )
        model = TopicModel(
            kind=kind,
            taxonomy=taxonomy,
            classes=list(classes),
            config=card.get("config") or {},
            metrics=card.get("metrics") or {},
            max_chars=int(card.get("max_chars", 4000)),
        )
    except TopicModelError:
        raise
    except (ValueError, TypeError) as e:  # TaxonomyError is a ValueError
        raise TopicModelError(f"{card_path}: invalid model card ({e}); {retrain}") from e
    if model.kind == "ngram":
        import joblib

        path = directory / NGRAM_FILE
        if not path.is_file():
            raise TopicModelError(f"{path}: missing (the n-gram classifier); {retrain}")
        try:
            model.pipeline = joblib.load(path)
        except Exception as e:  # a truncated or foreign pickle raises almost anything
            raise TopicModelError(
                f"{path}: cannot load the classifier ({type(e).__name__}: {e}); {retrain}"
            ) from e
        found = [str(c) for c in getattr(model.pipeline, "classes_", [])]
        if not hasattr(model.pipeline, "predict_proba") or found != model.classes:
            raise TopicModelError(
                f"{path}: does not match {card_path} (classes {found} vs {model.classes}); "
                f"{retrain}"
            )
    else:
        from megatron_syne.topics.encoder import EncoderClassifier

        path = directory / ENCODER_DIR
        try:
            model.encoder = EncoderClassifier.load(path, device=device)
        except Exception as e:  # transformers raises OSError, ValueError, safetensors errors...
            raise TopicModelError(
                f"{path}: cannot load the fine-tuned encoder ({type(e).__name__}: {e}); {retrain}"
            ) from e
    return model
