"""Code QA synthesis: LeetCode-style problems -> new problems with checked solutions.

Problems are JSONL: ``title``, ``description`` (required), ``id``, ``examples`` (list of
{"input", "output", "explanation"} or strings), ``entry_point`` (function name) and ``tests``
(list of Python ``assert`` statements calling the entry point).

Modes:
* ``new`` (default): in-context prompting with ``--num-examples`` other problems of the set
  plus the target; the answer has [Problem], [Solution] (explanation + one Python block) and
  [Tests] (asserts); the code runs against the generated tests in the sandbox.
* ``solve``: a solution for each given problem, checked against the problem's own tests (and
  the asserts the answer adds, if any).
Only items whose code passes every test are kept unless ``keep_failing`` is set.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_syne.synth.client import ChatResult
from megatron_syne.synth.parsing import (
    ParseError,
    extract_asserts,
    extract_python_code,
    split_sections,
)
from megatron_syne.synth.pipeline import GenerationRun, Reject, WorkItem
from megatron_syne.synth.prompts import (
    CODE_PROMPT_VERSION,
    code_new_messages,
    code_solve_messages,
    format_code_problem,
    item_key,
)
from megatron_syne.synth.sandbox import SandboxConfig, run_tests
from megatron_syne.synth.science_qa import BadLine, iter_json_lines


@dataclass
class CodeConfig:
    """Code QA settings; ``sandbox_workers`` bounds concurrent sandbox processes (CPU)."""

    mode: str = "new"
    num_examples: int = 2
    min_tests: int = 3
    samples_per_problem: int = 1
    keep_failing: bool = False
    limit: int | None = None
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    sandbox_workers: int = max(1, (os.cpu_count() or 2) - 1)
    sampling_seed: int | None = 1234

    def __post_init__(self) -> None:
        if self.mode not in ("new", "solve"):
            raise ValueError(f"--mode must be 'new' or 'solve', got {self.mode!r}")
        if self.num_examples < 0 or self.min_tests < 1 or self.samples_per_problem < 1:
            raise ValueError(
                "need --num-examples >= 0, --min-tests >= 1, --samples-per-problem >= 1"
            )
        if self.sandbox_workers < 1:
            raise ValueError("--sandbox-workers must be >= 1")


def _validate_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    for name in ("title", "description"):
        if not isinstance(record.get(name), str) or not record[name].strip():
            return f"no string field {name!r}"
    tests = record.get("tests", [])
    if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        return "'tests' must be a list of strings (Python assert statements)"
    for i, test in enumerate(tests):
        try:
            ast.parse(test)
        except SyntaxError as err:
            return f"tests[{i}] is not valid Python: {err.msg}"
    return None


def read_problems(path: str | os.PathLike) -> tuple[list[dict], list[BadLine]]:
    """All valid problems of a JSONL file (with ``id`` filled in) and the bad lines."""
    problems, bad = [], []
    seen_ids: dict[str, int] = {}
    for line in iter_json_lines(Path(path), "--problems"):
        if isinstance(line, BadLine):
            bad.append(line)
            continue
        record = line.record
        reason = _validate_problem(record)
        if reason:
            bad.append(line.bad(reason))
            continue
        if not record.get("id"):
            digest = hashlib.sha1(f"{record['title']}\x00{record['description']}".encode())
            record["id"] = "sha1:" + digest.hexdigest()
        record["id"] = str(record["id"])
        if record["id"] in seen_ids:
            first = seen_ids[record["id"]]
            bad.append(line.bad(f"duplicate problem id {record['id']!r} (first on line {first})"))
            continue
        seen_ids[record["id"]] = line.line_no
        problems.append(record)
    return problems, bad


def code_items(
    problems: list[dict], bad: list[BadLine], run: GenerationRun, config: CodeConfig
) -> Iterator[WorkItem]:
    """Work items per problem and sample index (examples chosen by a seeded RNG per key)."""
    for line in bad:
        key = "bad:" + hashlib.sha1(f"{line.where}\x00{line.raw}".encode()).hexdigest()[:20]
        if not run.is_done(key):
            run.reject_input(key, f"{line.where}: {line.reason}", {"line": line.raw})
    version = f"{CODE_PROMPT_VERSION}-{config.mode}-k{config.num_examples}-t{config.min_tests}"
    made = 0
    for idx, target in enumerate(problems):
        if config.mode == "solve" and not target.get("tests"):
            key = item_key(target["id"], version, 0)
            if not run.is_done(key):
                run.reject_input(key, f"problem {target['id']} has no tests to check against", {})
            continue
        for k in range(config.samples_per_problem):
            if config.limit is not None and made >= config.limit:
                return
            made += 1
            key = item_key(target["id"], version, k)
            if config.mode == "new":
                # The examples depend only on the key, so a resumed run sends the same prompt.
                rng = random.Random(key)
                others = [p for j, p in enumerate(problems) if j != idx]
                examples = rng.sample(others, min(config.num_examples, len(others)))
                messages = code_new_messages(examples, target, config.min_tests)
            else:
                messages = code_solve_messages(target)
            yield WorkItem(
                key=key,
                seed_id=target["id"],
                messages=messages,
                lang="en",
                fields={
                    "discipline": "computer science",
                    "mode": config.mode,
                    "sample_index": k,
                    "prompt_version": version,
                    "seed_title": target["title"],
                },
                seed=None if config.sampling_seed is None else config.sampling_seed + k,
                context={
                    "seed_tests": list(target.get("tests", [])),
                    "seed_problem": format_code_problem(target, with_tests=False),
                },
            )


def make_code_parser(config: CodeConfig):
    def parse(item: WorkItem, result: ChatResult) -> dict[str, Any]:
        sections = split_sections(result.text)
        try:
            if config.mode == "new":
                if not sections.get("problem"):
                    raise ParseError("no [Problem] section")
                if not sections.get("solution"):
                    raise ParseError("no [Solution] section")
                problem, solution = sections["problem"], sections["solution"]
                tests = extract_asserts(sections.get("tests", ""))
                if len(tests) < config.min_tests:
                    raise ParseError(f"{len(tests)} assert tests < --min-tests {config.min_tests}")
            else:
                solution = sections.get("solution") or result.text.strip()
                problem = item.context["seed_problem"]
                tests = list(item.context["seed_tests"])
                if sections.get("tests"):
                    tests += extract_asserts(sections["tests"])
            code = extract_python_code(solution)
        except ParseError as err:
            raise Reject("malformed", str(err)) from err
        return {"problem": problem, "solution": solution, "code": code, "tests": tests}

    return parse


def make_code_verifier(config: CodeConfig):
    slots = asyncio.Semaphore(config.sandbox_workers)

    async def verify(item: WorkItem, record: dict[str, Any]) -> dict[str, Any]:
        async with slots:
            result = await asyncio.to_thread(
                run_tests, record["code"], record["tests"], config.sandbox
            )
        outcome = {"test_result": result.to_dict(), "passed": result.ok}
        if not result.ok and not config.keep_failing:
            record.update(outcome)
            raise Reject("failed_tests", f"{result.status}: {result.passed}/{result.total} passed")
        return outcome

    return verify
