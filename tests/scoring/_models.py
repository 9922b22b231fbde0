"""Tiny random Hugging Face Llama models and token datasets for PPL tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.topics._data import build_dataset

VOCAB, BOS, EOD = 320, 1, 2


def save_tiny_llama(path: Path, seed: int = 0, tie: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        bos_token_id=BOS,
        eos_token_id=EOD,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).float().eval()
    # Larger-than-default weights so the distribution is far from uniform (a loose check
    # would otherwise pass with any scorer that outputs log(V)).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return path


def random_documents(n: int, seed: int, min_len: int = 1, max_len: int = 90) -> list[list[int]]:
    """Documents as stored by preprocessing: text ids (no specials) + EOD."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        docs.append(rng.integers(3, VOCAB, size=length).tolist() + [EOD])
    return docs


def build_token_dataset(prefix: Path, docs: list[list[int]]) -> Path:
    langs = ["en" if i % 3 else "zh" for i in range(len(docs))]
    sources = ["web" if i % 2 else "book" for i in range(len(docs))]
    return build_dataset(prefix, docs, langs=langs, sources=sources)


@torch.no_grad()
def transformers_losses(model_dir: Path, docs: list[list[int]], max_tokens: int) -> list[float]:
    """transformers' own loss for [BOS] + first max_tokens text tokens of each document."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for doc in docs:
        ids = torch.tensor([[BOS] + doc[:-1][:max_tokens]])
        out.append(float(model(input_ids=ids, labels=ids).loss))
    return out
