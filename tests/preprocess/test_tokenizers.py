"""Tokenizer loading: the packaged Llama-3 tokenizer and every other --tokenizer-type."""

from __future__ import annotations

import json
import random

import pytest

from megatron_syne.preprocess.tokenizers import (
    TokenizerError,
    llama3_tiktoken_model,
    llama3_tokenizer_dir,
    llama3_tokenizer_json,
    load_tokenizer,
)

TEXTS = [
    "Hello world! It's 2026, isn't it?",
    "中共中央总书记、国家主席江泽民发表1998年新年讲话《迈向充满希望的新世纪》",
    "def f(x):\n    return x  \n\n\tdone  ",
    "  leading spaces\r\n\r\nand ünïcödé 😀 12345678",
    "a literal <|end_of_text|> inside a web page",
]


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer()


def test_default_is_real_llama3(llama3):
    assert llama3.vocab_size == 128256
    assert llama3.eod == 128001
    assert llama3.bos == 128000
    # Reference ids from Meta's tokenizer for a fixed English sentence.
    assert llama3.encode("Hello world") == [9906, 1917]
    for text in TEXTS:
        ids = llama3.encode(text)
        assert llama3.decode(ids) == text
        assert all(0 <= i < llama3.vocab_size for i in ids)
    assert llama3.encode_batch(TEXTS) == [llama3.encode(t) for t in TEXTS]


def test_special_token_strings_are_text(llama3):
    ids = llama3.encode("<|end_of_text|>")
    assert llama3.eod not in ids and len(ids) > 1


def test_tiktoken_model_matches_hf(llama3):
    for tokenizer_type in ("TikTokenizer", "Llama3Tokenizer"):
        tik = load_tokenizer(tokenizer_type, llama3_tiktoken_model())
        assert type(tik).__name__ == "TikTokenizer"
        assert (tik.vocab_size, tik.eod, tik.bos) == (128256, 128001, 128000)
        assert tik.encode_batch(TEXTS) == llama3.encode_batch(TEXTS)
        # Special-token ids agree with the HF file's added tokens.
        added = json.loads(llama3_tokenizer_json().read_text())["added_tokens"]
        by_name = {a["content"]: a["id"] for a in added}
        assert all(by_name[name] == i for name, i in tik.special_tokens.items())


# Pieces that stress pre-tokenisation: whitespace kinds, contractions in any case, digit runs,
# CJK, emoji sequences, combining marks, special-token strings, control characters.
FUZZ_PIECES = [" ", "  ", "\n", "\r\n", "\r", "\t", "\u3000", "\xa0", "'s", "'S", "'LL", "'re",
    "123", "12345678", "hello", "Hello", "HELLO", "世界", "中文字符", "。", "，", "!!", "...",
    "<|end_of_text|>", "<|begin_of_text|>", "<|reserved_special_token_5|>", "😀", "👍🏽", "\u200b",
    "é", "e\u0301", "ß", "Ω", "ﬁ", "٣", "१२३", "🇺🇸", "a\x01", "def f(x):\n    return x",
    "    ", "\n\n\n", " \n ", "—", "“quoted”", "ǅ", "\ue000", "\U0010fffd"]  # fmt: skip


def test_default_engine_equals_hf_tokenizer_json(tmp_path, llama3):
    """The default Llama3Tokenizer (tiktoken on tokenizer.model) gives exactly the ids of the
    packaged Hugging Face tokenizer.json, on the embedded corpus and on random strings."""
    from megatron_syne.preprocess.corpus import CorpusConfig, build_demo_corpus

    assert type(llama3).__name__ == "TikTokenizer"
    hf = load_tokenizer("HuggingFaceTokenizer", llama3_tokenizer_json())
    build_demo_corpus(CorpusConfig(str(tmp_path / "demo.jsonl"), target_mb=0.5))
    with open(tmp_path / "demo.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    rng = random.Random(0)
    for _ in range(2000):
        texts.append("".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(1, 12))))
    for _ in range(500):
        texts.append("".join(chr(rng.randint(1, 0xD7FF)) for _ in range(rng.randint(1, 40))))
    assert len(set(texts)) > 2000
    assert llama3.encode_batch(texts) == hf.encode_batch(texts)


def test_hf_directory_and_file(tmp_path, llama3):
    for tokenizer_model in (llama3_tokenizer_dir(), llama3_tokenizer_json()):
        hf = load_tokenizer("HuggingFaceTokenizer", tokenizer_model)
        assert hf.eod == 128001
        assert hf.encode_batch(TEXTS) == llama3.encode_batch(TEXTS)


def test_sentencepiece(tmp_path):
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 20 + [f"line number {i} of text" for i in range(200)]))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=120, model_type="bpe"
    )
    sp = load_tokenizer("SentencePieceTokenizer", tmp_path / "sp.model")
    assert sp.vocab_size == 120 and sp.eod == 2 and sp.bos == 1
    ids = sp.encode_batch(["line number 7 of text", "Hello world"])
    assert ids[0] == sp.encode("line number 7 of text")
    assert sp.decode(ids[0]) == "line number 7 of text"


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(TokenizerError, match="--tokenizer-model"):
        load_tokenizer("HuggingFaceTokenizer")
    with pytest.raises(TokenizerError, match="unknown --tokenizer-type"):
        load_tokenizer("BertWordPieceCase")
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer("HuggingFaceTokenizer", "meta-llama/Meta-Llama-3-8B")
    bad = tmp_path / "bad.model"
    bad.write_text("not a tokenizer\n")
    with pytest.raises(TokenizerError, match="not a tiktoken BPE file"):
        load_tokenizer("TikTokenizer", bad)
