"""Optional topic classifier: fine-tune a local Hugging Face encoder (TinyBERT-class, as in the
SynE paper) for sequence classification. Runs on GPU when available, on CPU otherwise (slow;
fine for tests with a tiny model). Nothing is downloaded: ``encoder_path`` is a local directory
with ``config.json``, weights and a tokenizer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class EncoderTrainConfig:
    encoder_path: str
    epochs: int = 3
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    micro_batch_size: int = 32  # documents per step
    max_length: int = 256  # tokens per document seen by the encoder (its head)
    warmup_fraction: float = 0.1  # of all optimizer steps
    device: str = "auto"
    seed: int = 1234

    def __post_init__(self) -> None:
        if not Path(self.encoder_path, "config.json").exists():
            raise FileNotFoundError(
                f"{self.encoder_path}: no config.json; --encoder-path must be a local HF model "
                "directory (save_pretrained output), nothing is downloaded"
            )
        if self.epochs < 1 or self.micro_batch_size < 1 or self.max_length < 8:
            raise ValueError("epochs >= 1, micro_batch_size >= 1, max_length >= 8")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError("warmup_fraction must be in [0, 1)")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class EncoderClassifier:
    """A sequence-classification encoder plus its tokenizer; ``predict_proba`` in batches."""

    def __init__(self, model, tokenizer, device: torch.device, max_length: int, batch_size: int):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | None = None) -> EncoderClassifier:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(str(directory))
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        max_length = int(getattr(model.config, "syne_max_length", 256))
        return cls(model, tokenizer, resolve_device(device), max_length, batch_size=64)

    @torch.no_grad()
    def predict_proba(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**batch).logits.float()
            out.append(torch.softmax(logits, dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def save(self, directory: str | os.PathLike) -> None:
        self.model.config.syne_max_length = self.max_length
        self.model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))


def finetune_encoder(
    texts: list[str], labels: list[str], classes: list[str], config: EncoderTrainConfig
) -> tuple[EncoderClassifier, list[float]]:
    """Fine-tune the encoder; returns the classifier and the mean loss of each epoch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    label_to_id = {c: i for i, c in enumerate(classes)}
    model = AutoModelForSequenceClassification.from_pretrained(
        config.encoder_path,
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id=label_to_id,
        ignore_mismatched_sizes=True,  # a fresh head for our label set
    ).to(device)
    tokenizer = AutoTokenizer.from_pretrained(config.encoder_path)
    targets = torch.tensor([label_to_id[y] for y in labels], dtype=torch.long)

    steps_per_epoch = math.ceil(len(texts) / config.micro_batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = int(config.warmup_fraction * total_steps)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            (step + 1) / max(warmup, 1)
            if step < warmup
            else max(0.0, (total_steps - step) / max(total_steps - warmup, 1))
        ),
    )
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    generator = torch.Generator().manual_seed(config.seed)
    epoch_losses = []
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(texts), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), config.micro_batch_size):
            idx = order[start : start + config.micro_batch_size]
            batch = tokenizer(
                [texts[i] for i in idx],
                truncation=True,
                max_length=config.max_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(**batch, labels=targets[idx].to(device))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(out.loss))
        epoch_losses.append(float(np.mean(losses)))
    model.eval()
    return EncoderClassifier(model, tokenizer, device, config.max_length, 64), epoch_losses
