"""Validating input records into documents, and the reject records for everything refused.

Every input line (JSONL) or row (Parquet) becomes exactly one of: a :class:`Document`, or a
reject record (a JSON object with ``file``, ``line``, ``reason``, ``detail`` and the original
content as ``raw`` text, or ``raw_base64`` when it is not valid UTF-8) -- nothing is dropped
without a trace.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from enum import StrEnum

from megatron_syne.data.metadata import text_hash


class RejectReason(StrEnum):
    BLANK_LINE = "blank_line"
    INVALID_UTF8 = "invalid_utf8"
    NUL_BYTE = "nul_byte"
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_a_json_object"
    MISSING_TEXT = "missing_text"
    NON_STRING_TEXT = "non_string_text"
    EMPTY_TEXT = "empty_text"
    TOO_LONG = "too_long"
    INVALID_UNICODE = "invalid_unicode"
    TRUNCATED_STREAM = "truncated_stream"
    CORRUPT_STREAM = "corrupt_stream"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class ValidationConfig:
    json_keys: tuple[str, ...] = ("text",)
    metadata_keys: tuple[str, ...] = ("lang", "source", "topic")
    metadata_defaults: tuple[tuple[str, str], ...] = ()
    max_chars: int = 5_000_000

    def __post_init__(self) -> None:
        if not self.json_keys:
            raise ValueError("--json-keys needs at least one key")
        if self.max_chars <= 0:
            raise ValueError(f"--max-chars must be positive, got {self.max_chars}")
        clash = set(self.json_keys) & set(self.metadata_keys)
        if clash:
            raise ValueError(f"keys {sorted(clash)} are both --json-keys and --metadata-keys")


@dataclass
class Document:
    line: int
    texts: tuple[str, ...]  # one per json key
    hashes: tuple[str, ...]
    metadata: dict[str, str | None]


def raw_fields(raw: bytes | str) -> dict[str, str]:
    """The original content of a rejected record, losslessly."""
    if isinstance(raw, str):
        return {"raw": raw}
    try:
        return {"raw": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"raw_base64": base64.b64encode(raw).decode("ascii")}


def reject_record(
    file: str, line: int, reason: RejectReason, detail: str, raw: bytes | str | None
) -> dict:
    record = {"file": file, "line": line, "reason": str(reason), "detail": detail}
    if raw is not None:
        record.update(raw_fields(raw))
    return record


class Validator:
    """Turns a parsed record into a Document or a reject record (see :class:`RejectReason`)."""

    def __init__(self, config: ValidationConfig, file: str) -> None:
        self.config = config
        self.file = file
        self.defaults = dict(config.metadata_defaults)

    def from_line(self, number: int, raw: bytes) -> Document | dict:
        if not raw.strip():
            return reject_record(self.file, number, RejectReason.BLANK_LINE, "blank line", raw)
        if b"\x00" in raw:
            return reject_record(
                self.file, number, RejectReason.NUL_BYTE, "NUL byte in the raw line", raw
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return reject_record(self.file, number, RejectReason.INVALID_UTF8, str(err), raw)
        try:
            record = json.loads(text)
        except ValueError as err:
            return reject_record(self.file, number, RejectReason.MALFORMED_JSON, str(err), text)
        if not isinstance(record, dict):
            return reject_record(
                self.file,
                number,
                RejectReason.NOT_AN_OBJECT,
                f"expected a JSON object, got {type(record).__name__}",
                text,
            )
        return self.from_record(number, record, text)

    def from_record(self, number: int, record: dict, raw: str | None = None) -> Document | dict:
        texts, hashes = [], []
        for key in self.config.json_keys:
            value = record.get(key)
            reason, detail = None, ""
            if value is None:
                reason, detail = RejectReason.MISSING_TEXT, f"no {key!r} field (or null)"
            elif not isinstance(value, str):
                reason = RejectReason.NON_STRING_TEXT
                detail = f"{key!r} is {type(value).__name__}, not a string"
            elif "\x00" in value:
                reason, detail = RejectReason.NUL_BYTE, f"NUL character in {key!r}"
            elif not value.strip():
                reason, detail = RejectReason.EMPTY_TEXT, f"{key!r} is empty or whitespace"
            elif len(value) > self.config.max_chars:
                reason = RejectReason.TOO_LONG
                detail = (
                    f"{key!r} has {len(value)} characters > --max-chars {self.config.max_chars}"
                )
            else:
                try:
                    hashes.append(text_hash(value))
                except UnicodeEncodeError as err:
                    reason, detail = RejectReason.INVALID_UNICODE, f"{key!r}: {err}"
            if reason is not None:
                if raw is None:
                    raw = json.dumps(record, ensure_ascii=False, default=str)
                return reject_record(self.file, number, reason, detail, raw)
            texts.append(value)
        metadata = {}
        for key in self.config.metadata_keys:
            value = record.get(key)
            if value is None:
                value = self.defaults.get(key)
            metadata[key] = value if value is None or isinstance(value, str) else str(value)
        return Document(number, tuple(texts), tuple(hashes), metadata)
