"""Validating input records into documents, and the reject records for everything refused.

Every input line (JSONL) or row (Parquet) becomes exactly one of: a :class:`Document`, or a
reject record (a JSON object with ``file``, ``line``, ``reason``, ``detail`` and the original
content as ``raw`` text, or ``raw_base64`` when it is not valid UTF-8) -- nothing is dropped
without a trace.
"""

from __future__ import annotations

import base64
import json
import json.scanner
from dataclasses import dataclass
from enum import StrEnum

from megatron_syne.data.metadata import CORE_COLUMNS, text_hash

# Sidecar columns copied from the input records (when present), and those preprocessing computes.
CORE_METADATA_KEYS = ("lang", "source", "topic")
WRITTEN_COLUMNS = tuple(c for c in CORE_COLUMNS if c not in CORE_METADATA_KEYS)


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
        for flag, keys in (
            ("--json-keys", self.json_keys),
            ("--metadata-keys", self.metadata_keys),
        ):
            repeated = sorted({k for k in keys if keys.count(k) > 1})
            if repeated:
                raise ValueError(f"{flag} names {repeated} more than once; give each key once")
        reserved = sorted(set(self.metadata_keys) & set(WRITTEN_COLUMNS))
        if reserved:
            raise ValueError(
                f"--metadata-keys {reserved}: these columns are written by preprocessing itself "
                f"({', '.join(WRITTEN_COLUMNS)}); rename the field in your input or leave it out"
            )


@dataclass(slots=True)
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


def _as_text(value) -> str:
    """A non-string metadata value as the string column stores it: JSON (``true``, ``3``,
    ``["en", "zh"]``), so lists and objects stay readable by any tool; other types (dates
    from Parquet) as ``str``."""
    return json.dumps(value, ensure_ascii=False, default=str)


_scan_json = json.scanner.make_scanner(json.JSONDecoder())  # the C scanner json.loads runs
_EMPTY_TEXT_HASH = text_hash("")


class Validator:
    """Turns a parsed record into a Document or a reject record (see :class:`RejectReason`).

    Each entry point tries a fast path first that accepts only records passing every check
    (one JSON scan, one hash that also detects blank text); anything else goes through the
    full checks, which decide the reject reason. Both accept exactly the same records.
    """

    def __init__(self, config: ValidationConfig, file: str) -> None:
        self.config = config
        self.file = file
        self.defaults = dict(config.metadata_defaults)
        self._metadata = [(key, self.defaults.get(key)) for key in config.metadata_keys]

    def from_line(self, number: int, raw: bytes) -> Document | dict:
        try:
            text = raw.decode("utf-8")
            record, end = _scan_json(text, 0)
        except (UnicodeDecodeError, ValueError, StopIteration, RecursionError):
            return self._from_line_checked(number, raw)
        # No NUL check here: strict JSON has no raw control character, so a line holding one
        # failed the scan above; an escaped one (\u0000) is caught in from_record.
        if end != len(text) or type(record) is not dict:
            return self._from_line_checked(number, raw)
        return self.from_record(number, record, text)

    def _from_line_checked(self, number: int, raw: bytes) -> Document | dict:
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
        except RecursionError:  # valid JSON perhaps, but deeper than Python's parser goes
            return reject_record(
                self.file,
                number,
                RejectReason.MALFORMED_JSON,
                "JSON nested too deeply to parse (arrays or objects about 1,000 levels deep); "
                "flatten the record",
                text,
            )
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
        max_chars = self.config.max_chars
        for key in self.config.json_keys:
            value = record.get(key)
            if type(value) is not str or len(value) > max_chars or "\x00" in value:
                return self._from_record_checked(number, record, raw)
            try:
                digest = text_hash(value)
            except UnicodeEncodeError:
                return self._from_record_checked(number, record, raw)
            if digest == _EMPTY_TEXT_HASH:  # empty or whitespace only
                return self._from_record_checked(number, record, raw)
            texts.append(value)
            hashes.append(digest)
        metadata = {}
        for key, default in self._metadata:
            value = record.get(key)
            if value is None:
                value = default
            metadata[key] = value if value is None or type(value) is str else _as_text(value)
        return Document(number, tuple(texts), tuple(hashes), metadata)

    def _from_record_checked(
        self, number: int, record: dict, raw: str | None = None
    ) -> Document | dict:
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
            metadata[key] = value if value is None or isinstance(value, str) else _as_text(value)
        return Document(number, tuple(texts), tuple(hashes), metadata)
