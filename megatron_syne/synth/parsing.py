"""Parse model answers: [Problem]/[Solution]/[Tests] sections and fenced Python code."""

from __future__ import annotations

import ast
import re

# Accept the tags as asked, plus the forms models drift to: **[Problem]**, "Problem:",
# "## Solution", and the Chinese 【问题】/【解答】.
_SECTION_NAMES = {
    "problem": ("problem", "问题", "题目"),
    "solution": ("solution", "解答", "答案", "解析"),
    "tests": ("tests", "test cases", "测试"),
}
_TAG_RE = re.compile(
    r"^[ \t>#*]*(?:\[|【)?\s*(?P<name>"
    + "|".join(re.escape(n) for names in _SECTION_NAMES.values() for n in names)
    + r")\s*(?:\]|】)?\s*[:：]?[ \t*]*$",
    re.IGNORECASE | re.MULTILINE,
)
_INLINE_TAG_RE = re.compile(
    r"^[ \t>#*]*(?:\[|【)\s*(?P<name>"
    + "|".join(re.escape(n) for names in _SECTION_NAMES.values() for n in names)
    + r")\s*(?:\]|】)[ \t*:：]*",
    re.IGNORECASE | re.MULTILINE,
)
_FENCE_RE = re.compile(r"```[ \t]*(?P<lang>[\w+-]*)[ \t]*\n(?P<code>.*?)(?:```|\Z)", re.DOTALL)


class ParseError(ValueError):
    """The answer does not have the requested structure (the reason is the message)."""


def _canonical(name: str) -> str:
    name = name.lower()
    for canon, names in _SECTION_NAMES.items():
        if name in names:
            return canon
    raise AssertionError(name)


def split_sections(answer: str) -> dict[str, str]:
    """Map section name ("problem", "solution", "tests") to its text; the first occurrence of
    each tag wins and text before the first tag is ignored."""
    marks = []
    for m in _TAG_RE.finditer(answer):
        marks.append((m.start(), m.end(), _canonical(m.group("name"))))
    for m in _INLINE_TAG_RE.finditer(answer):
        if not any(start == m.start() for start, _, _ in marks):
            marks.append((m.start(), m.end(), _canonical(m.group("name"))))
    marks.sort()
    sections: dict[str, str] = {}
    for i, (_, end, name) in enumerate(marks):
        stop = marks[i + 1][0] if i + 1 < len(marks) else len(answer)
        if name not in sections:
            sections[name] = answer[end:stop].strip()
    return sections


def parse_problem_solution(answer: str) -> tuple[str, str]:
    """(problem, solution) from a [Problem]/[Solution] answer; ParseError when either is
    missing or empty."""
    sections = split_sections(answer)
    for name in ("problem", "solution"):
        if not sections.get(name):
            raise ParseError(f"no [{name.capitalize()}] section")
    return sections["problem"], sections["solution"]


def extract_python_code(text: str) -> str:
    """The longest fenced ```python (or unlabelled) code block that parses as Python."""
    blocks = [
        m.group("code")
        for m in _FENCE_RE.finditer(text)
        if m.group("lang").lower() in ("", "python", "py", "python3")
    ]
    valid = []
    for code in blocks:
        try:
            ast.parse(code)
        except SyntaxError:
            continue
        valid.append(code.strip("\n"))
    if not valid:
        if blocks:
            raise ParseError("code block is not valid Python")
        raise ParseError("no ```python code block")
    return max(valid, key=len)


def extract_asserts(text: str) -> list[str]:
    """Top-level ``assert`` statements in ``text`` (inside a code block if there is one),
    each returned as its own source string."""
    try:
        code = extract_python_code(text)
    except ParseError:
        code = text
    try:
        tree = ast.parse(code)
    except SyntaxError as err:
        raise ParseError(f"tests are not valid Python: {err.msg} (line {err.lineno})") from err
    return [
        ast.get_source_segment(code, node) for node in tree.body if isinstance(node, ast.Assert)
    ]


def defined_functions(code: str) -> list[str]:
    """Names of top-level functions and of methods of top-level classes (LeetCode's
    ``class Solution``) defined in ``code``."""
    names = []
    for node in ast.parse(code).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.append(node.name)
        elif isinstance(node, ast.ClassDef):
            names.append(node.name)
    return names
