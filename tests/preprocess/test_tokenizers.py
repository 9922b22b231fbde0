"""Tokenizer loading: the packaged Llama-3 tokenizer and every other --tokenizer-type."""

from __future__ import annotations

import json

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
