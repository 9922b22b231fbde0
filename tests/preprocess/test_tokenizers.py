"""Tokenizer loading: the packaged Llama-3 tokenizer and every other --tokenizer-type."""

from __future__ import annotations

import json
import random

import numpy as np
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
    encoded = llama3.encode_batch(texts)
    assert encoded == hf.encode_batch(texts)
    # The array path preprocessing runs (tiktoken's buffer, no Python int per token).
    arrays = llama3.encode_batch_numpy(texts)
    assert all(a.dtype == np.uint32 for a in arrays)
    assert [a.tolist() for a in arrays] == encoded


def test_tiktoken_ranks_cache(tmp_path, monkeypatch, llama3):
    """The parsed BPE table is cached by content: a warm load equals a cold parse, a changed
    file gets a new entry, a damaged entry is parsed again, and the cache can be switched off."""
    from megatron_syne.preprocess import tokenizers

    cache = tmp_path / "cache"
    monkeypatch.setenv(tokenizers.CACHE_DIR_ENV, str(cache))
    assert tokenizers.cache_dir() == cache
    model = llama3_tiktoken_model()
    cold = tokenizers.load_tiktoken_bpe(model)
    entries = list((cache / "tiktoken").glob("*.marshal"))
    assert len(entries) == 1 and not list((cache / "tiktoken").glob(".*.tmp"))
    assert tokenizers.load_tiktoken_bpe(model) == cold == tokenizers._load_tiktoken_bpe_lines(model)

    entries[0].write_bytes(b"damaged")  # a cut or corrupted cache file is not trusted
    assert tokenizers.load_tiktoken_bpe(model) == cold
    blob = bytearray(entries[0].read_bytes())
    blob[len(blob) // 2] ^= 1  # one flipped bit inside the table: the checksum catches it
    entries[0].write_bytes(bytes(blob))
    assert tokenizers._read_ranks_cache(entries[0]) is None
    assert tokenizers.load_tiktoken_bpe(model) == cold

    small = tmp_path / "small.model"
    small.write_bytes(b"YQ== 0\nYg== 1\nYWI= 2\n")
    assert tokenizers.load_tiktoken_bpe(small) == {b"a": 0, b"b": 1, b"ab": 2}
    assert len(list((cache / "tiktoken").glob("*.marshal"))) == 2
    small.write_bytes(b"YQ== 0\nYg== 1\nYmE= 2\n")  # same size, new content: a new entry
    assert tokenizers.load_tiktoken_bpe(small) == {b"a": 0, b"b": 1, b"ba": 2}

    monkeypatch.setenv(tokenizers.CACHE_DIR_ENV, "off")
    assert tokenizers.cache_dir() is None
    assert tokenizers.load_tiktoken_bpe(small)[b"ba"] == 2
    assert len(list((cache / "tiktoken").glob("*.marshal"))) == 3
    monkeypatch.delenv(tokenizers.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tokenizers.cache_dir() == tmp_path / "xdg" / "megatron-syne"


def test_tiktoken_file_with_blank_or_bad_lines(tmp_path, monkeypatch):
    from megatron_syne.preprocess import tokenizers

    monkeypatch.setenv(tokenizers.CACHE_DIR_ENV, "off")
    blank = tmp_path / "blank.model"
    blank.write_bytes(b"YQ== 0\n\nYg== 1\n")  # a blank line: the line reader skips it
    assert tokenizers.load_tiktoken_bpe(blank) == {b"a": 0, b"b": 1}
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"YQ== 0\nYg== 1 7\nYWI= 2\n")
    with pytest.raises(TokenizerError, match=r"bad.model:2: not a tiktoken BPE line"):
        tokenizers.load_tiktoken_bpe(bad)


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
