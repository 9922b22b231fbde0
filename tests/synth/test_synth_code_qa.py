"""Code QA end to end: the CLI against a scripted server, the sandbox deciding what is kept."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json

from megatron_syne.synth.testing_server import scripted_server
from tests.helpers import REPO_ROOT

PROBLEMS = REPO_ROOT / "examples/synth/problems.jsonl"

GOOD_NEW = """[Problem]
Pair With Difference
Given a list of distinct integers nums and an integer k > 0, return the number of pairs
(i < j) with |nums[i] - nums[j]| == k. Example: nums = [1, 5, 3, 4, 2], k = 2 -> 3.
Entry point: count_pairs(nums, k).
[Solution]
Put all numbers in a set and count the x with x + k also present: O(n) time and memory.
```python
def count_pairs(nums, k):
    seen = set(nums)
    return sum(1 for x in seen if x + k in seen)
```
[Tests]
```python
assert count_pairs([1, 5, 3, 4, 2], 2) == 3
assert count_pairs([1, 2, 3], 5) == 0
assert count_pairs([10, 20, 30, 40], 10) == 3
```
"""
WRONG_NEW = GOOD_NEW.replace("x + k in seen", "x + k + 1 in seen")
LOOPING_NEW = GOOD_NEW.replace("seen = set(nums)", "while True:\n        pass")
FEW_TESTS = (
    GOOD_NEW.split("[Tests]")[0] + "[Tests]\n```python\nassert count_pairs([1], 1) == 0\n```"
)
SOLVE_TWO_SUM = """[Solution]
Scan once, remembering the index of each value seen; O(n).
```python
def two_sum(nums, target):
    where = {}
    for j, x in enumerate(nums):
        if target - x in where:
            return [where[target - x], j]
        where[x] = j
```
"""


def _tool():
    spec = importlib.util.spec_from_file_location(
        "code_qa_tool", REPO_ROOT / "tools/synth/code_qa.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, out, script):
    """The CLI's main() in this process (saves an interpreter start per run)."""
    with scripted_server(script) as base:
        argv = [
            "--problems",
            str(PROBLEMS),
            "--api-base",
            base,
            "--model",
            "scripted",
            "--out",
            str(out),
            "--no-progress",
            "--sandbox-timeout",
            "3",
            "--sandbox-cpu",
            "1",
            "--sandbox-memory-mb",
            "256",
            *args,
        ]
        log = io.StringIO()
        with contextlib.redirect_stderr(log):
            _tool().main(argv)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    return summary, log.getvalue()


def test_new_problems_kept_only_when_their_code_passes(tmp_path):
    def rule(entry, content):
        return {"match": f"as `{entry}` is in the last example", "actions": [{"content": content}]}

    script = {
        "rules": [
            rule("two_sum", GOOD_NEW),
            rule("is_valid", WRONG_NEW),
            rule("climb_stairs", LOOPING_NEW),
        ]
    }
    out = tmp_path / "code.jsonl"
    summary, log = _run([], out, script)
    assert summary["accepted"] == 1
    assert summary["rejected_by_reason"] == {"failed_tests": 2}
    (item,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert item["seed_id"] == "two-sum" and item["passed"] is True
    assert item["test_result"]["status"] == "passed" and item["test_result"]["total"] == 3
    assert item["code"].startswith("def count_pairs") and len(item["tests"]) == 3
    rejects = {
        json.loads(x)["seed_id"]: json.loads(x)
        for x in out.with_suffix(".rejects.jsonl").read_text().splitlines()
    }
    assert rejects["valid-parentheses"]["test_result"]["status"] == "failed"
    assert rejects["climbing-stairs"]["test_result"]["status"] in ("cpu_limit", "timeout")
    assert "accepted 1" in log

    # --keep-failing keeps them (flagged), and a too-short test list is malformed.
    script = {"rules": [rule("two_sum", FEW_TESTS), rule("is_valid", WRONG_NEW)]}
    out2 = tmp_path / "code_all.jsonl"
    summary, _ = _run(["--keep-failing", "--limit", "2"], out2, script)
    assert summary["accepted"] == 1 and summary["rejected_by_reason"] == {"malformed": 1}
    (kept,) = [json.loads(x) for x in out2.read_text().splitlines()]
    assert kept["passed"] is False and kept["test_result"]["passed"] == 1


def test_solve_mode_checks_against_the_problem_tests(tmp_path):
    script = {"rules": [{"match": "Title: Two Sum", "actions": [{"content": SOLVE_TWO_SUM}]}]}
    out = tmp_path / "solve.jsonl"
    summary, _ = _run(["--mode", "solve"], out, script)
    assert summary["accepted"] == 1
    assert summary["rejected_by_reason"] == {"malformed": 2}  # default answers carry no code
    (item,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert item["seed_id"] == "two-sum" and item["test_result"]["total"] == 3
    assert item["problem"].startswith("Title: Two Sum")
