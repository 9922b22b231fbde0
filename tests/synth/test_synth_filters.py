"""Filters, decontamination, answer parsing and discipline assignment on crafted cases."""

from __future__ import annotations

import json

import pytest

from megatron_syne.synth.filters import (
    Decontaminator,
    FilterConfig,
    NearDuplicateIndex,
    check_language,
    check_length,
    check_repetition,
)
from megatron_syne.synth.parsing import (
    ParseError,
    extract_asserts,
    extract_python_code,
    parse_problem_solution,
)
from megatron_syne.synth.prompts import (
    KeywordDisciplineClassifier,
    normalize_discipline,
    science_messages,
)
from megatron_syne.synth.text import detect_lang

PROSE = (
    "The mitochondrion is the site of aerobic respiration in eukaryotic cells. Pyruvate from "
    "glycolysis enters the matrix, is converted to acetyl coenzyme A and feeds the citric acid "
    "cycle, whose reduced carriers drive the electron transport chain and ATP synthase."
)


def test_length_bounds():
    cfg = FilterConfig(min_problem_chars=20, max_problem_chars=100, min_solution_chars=10)
    assert check_length("x" * 50, "y" * 50, cfg) is None
    assert check_length("short", "y" * 50, cfg).startswith("too_short: problem")
    assert check_length("x" * 101, "y" * 50, cfg).startswith("too_long: problem")
    assert check_length("x" * 50, "tiny", cfg).startswith("too_short: solution")


def test_heavy_repetition_rejected_normal_text_kept():
    cfg = FilterConfig()
    assert check_repetition(PROSE, cfg) is None
    looping = PROSE + " " + " ".join(["the answer is forty two"] * 30)
    assert check_repetition(looping, cfg).startswith("repetition")
    lines = "\n".join(
        [f"Value {i} is read from row {i * 7} of the table." for i in range(6)]
        + ["Therefore the sum is even."] * 5
    )
    assert "lines repeat" in check_repetition(lines, cfg)
    zh_loop = "光合作用" + "答案是四十二。" * 40
    assert check_repetition(zh_loop, cfg).startswith("repetition")


def test_language_detection_and_check():
    zh = "勾股定理指出，在直角三角形中，两条直角边的平方和等于斜边的平方，即 a^2 + b^2 = c^2。"
    assert detect_lang(zh) == "zh" and detect_lang(PROSE) == "en"
    assert check_language(zh, zh, "zh") is None
    assert check_language(PROSE, zh, "zh") == "wrong_language: problem is en, seed is zh"
    assert check_language(PROSE, zh, "en") == "wrong_language: solution is zh, seed is en"


def test_minhash_near_duplicates():
    from pydoc_data.topics import topics

    page = " ".join(topics["assignment"].split())[:1500]  # ~230 words of real prose
    index = NearDuplicateIndex(threshold=0.8)
    assert index.check_and_add("a", page) is None
    near = page.replace(" the ", " a ", 1) + " (copied)"
    assert index.check_and_add("b", near) == "near_duplicate: of item a"
    other = " ".join(topics["import"].split())[:1500]
    assert index.check_and_add("c", other) is None
    assert index.check_and_add("d", PROSE) is None


def test_decontamination_13_grams(tmp_path):
    question = (
        "A ball is thrown vertically upward with an initial speed of 20 meters per second; "
        "how long does it take to reach its highest point"
    )
    eval_file = tmp_path / "sciq.jsonl"
    eval_file.write_text(
        json.dumps({"question": question, "answer": "about 2 s"})
        + "\n"
        + json.dumps(
            {"question": "What is the chemical symbol of the element sodium", "answer": "Na"}
        )
        + "\n"
    )
    txt = tmp_path / "notes.txt"
    txt.write_text("短题目不算\n\n" + "一个物体从静止开始做匀加速直线运动加速度为二米每二次方秒")
    deco = Decontaminator(n=13)
    deco.add_files([eval_file, txt])
    copied = "Consider this: a ball is thrown vertically upward with an initial speed of 20 meters per second. Solve."
    assert deco.check(copied).startswith("contaminated: 3 13-gram")  # 15 shared words
    # 12 shared words are not enough for a 13-gram match
    twelve = "ball is thrown vertically upward with an initial speed of 20 meters in a lab"
    assert deco.check(twelve) is None
    # the short question (8..12 units) only matches whole
    assert deco.check("Q: what is the chemical symbol of the element sodium? A: Na").startswith(
        "contaminated"
    )
    assert deco.check("what is the chemical symbol") is None
    zh = "已知一个物体从静止开始做匀加速直线运动加速度为二米每二次方秒，求三秒末速度。"
    assert deco.check(zh).startswith("contaminated")
    assert deco.skipped_short == 3  # "短题目不算", "Na", "about 2 s": too short to count


def test_decontamination_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        Decontaminator().add_files([bad])
    with pytest.raises(FileNotFoundError):
        Decontaminator().add_files([tmp_path / "missing.jsonl"])


@pytest.mark.parametrize(
    "answer",
    [
        "[Problem]\nWhat is 2+2?\n[Solution]\nAdd them: 4.",
        "Sure! Here it is.\n**[Problem]**\nWhat is 2+2?\n\n**[Solution]**\nAdd them: 4.",
        "## Problem\nWhat is 2+2?\n## Solution:\nAdd them: 4.",
        "[Problem] What is 2+2?\n[Solution] Add them: 4.",
        "【问题】\nWhat is 2+2?\n【解答】\nAdd them: 4.",
    ],
)
def test_parse_problem_solution_variants(answer):
    assert parse_problem_solution(answer) == ("What is 2+2?", "Add them: 4.")


def test_parse_problem_solution_missing_parts():
    with pytest.raises(ParseError, match="Solution"):
        parse_problem_solution("[Problem]\nWhat is 2+2?")
    with pytest.raises(ParseError, match="Problem"):
        parse_problem_solution("The answer is 4.")


def test_code_and_assert_extraction():
    text = "Idea.\n```python\ndef f(x):\n    return x * 2\n```\nAlso ```bash\nls\n```"
    assert extract_python_code(text) == "def f(x):\n    return x * 2"
    with pytest.raises(ParseError, match="not valid Python"):
        extract_python_code("```python\ndef f(:\n```")
    tests = "```python\nassert f(1) == 2\nx = 3\nassert f(x) == 6\n```"
    assert extract_asserts(tests) == ["assert f(1) == 2", "assert f(x) == 6"]


def test_discipline_classifier_and_names():
    clf = KeywordDisciplineClassifier()
    assert clf.classify(PROSE + " The enzyme and protein in the cell.") == "biology"
    assert clf.classify("The electron and photon carry energy and momentum.") == "physics"
    assert clf.classify("催化剂可以加快化学反应，酸和碱发生中和反应。") == "chemistry"
    assert clf.classify("A quiet afternoon by the lake.") == "general education"
    assert normalize_discipline("Earth-Science") == "earth science"
    assert normalize_discipline("数学") == "mathematics"
    with pytest.raises(ValueError, match="unknown discipline 'poetry'"):
        normalize_discipline("poetry")


def test_templates_follow_language_and_discipline():
    en = science_messages(PROSE, "biology", "en")[-1]["content"]
    assert en.startswith("Please gain inspiration from the following biology content")
    assert "[Problem]" in en and "[Solution]" in en and PROSE in en
    zh = science_messages("勾股定理", "mathematics", "zh")[-1]["content"]
    assert zh.startswith("请从以下数学内容中获得灵感") and "勾股定理" in zh
