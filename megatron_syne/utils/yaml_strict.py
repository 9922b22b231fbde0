"""YAML loading for user input: like ``yaml.safe_load``, but a repeated mapping key is an error.

PyYAML keeps the last of two equal keys in a mapping, so a copy-pasted block silently replaces
the first one (a second ``code-en:`` source trains on other documents, with no warning). Every
YAML file the project reads as user input (mixture specs, the topic taxonomy) goes through
:func:`load_yaml_file`, whose errors name the file, the line and the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YAMLInputError(ValueError):
    """A YAML file that cannot be used; the message names the file, the line and the fix."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives the same key twice (a :class:`yaml.YAMLError`)."""

    def __init__(self, key: Any, line: int, first_line: int, name: str) -> None:
        super().__init__(problem=f"duplicate key {key!r}")
        self.key = key
        self.line = line
        self.first_line = first_line
        self.name = name

    def __str__(self) -> str:
        return (
            f"line {self.line}: duplicate key {self.key!r} (first given on line "
            f"{self.first_line}); YAML would silently keep only the last one: remove or rename "
            "one of them"
        )


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose mappings refuse repeated keys (merge keys ``<<`` may still be
    overridden, as YAML intends)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise DuplicateKeyError(key, line, first, key_node.start_mark.name)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load_strict(stream: Any) -> Any:
    """``yaml.safe_load`` that raises :class:`DuplicateKeyError` on a repeated mapping key."""
    return yaml.load(stream, Loader=StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml_file(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """Parse a user YAML file; any problem is a :class:`YAMLInputError` naming file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise YAMLInputError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise YAMLInputError(f"{path}: cannot read the {what}: {exc}") from None
    try:
        return safe_load_strict(text)
    except DuplicateKeyError as exc:
        raise YAMLInputError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise YAMLInputError(f"{path}: not valid YAML: {exc}") from None
