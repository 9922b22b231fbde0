"""Prompt templates (science QA, code QA), the 9 disciplines and a keyword discipline classifier.

Every template has a version string; the item key of a generated sample hashes the seed id
together with the prompt version, so editing a template makes new items instead of silently
mixing two prompt generations under one key.
"""

from __future__ import annotations

import hashlib
import json

from megatron_syne.synth.text import text_units

# The Llama-3-SynE paper's 9 disciplines of science QA seeds.
DISCIPLINES: tuple[str, ...] = (
    "mathematics",
    "physics",
    "chemistry",
    "biology",
    "astronomy",
    "earth science",
    "medicine",
    "computer science",
    "general education",
)
FALLBACK_DISCIPLINE = "general education"
# The seed (or the end of the instructions) follows this line in every user prompt; the
# scripted test server echoes what comes after it.
SEED_DELIMITER = "-----"

DISCIPLINE_ZH = {
    "mathematics": "数学",
    "physics": "物理",
    "chemistry": "化学",
    "biology": "生物",
    "astronomy": "天文",
    "earth science": "地球科学",
    "medicine": "医学",
    "computer science": "计算机科学",
    "general education": "通识教育",
}

_ALIASES = {
    "math": "mathematics",
    "maths": "mathematics",
    "cs": "computer science",
    "computer_science": "computer science",
    "earth_science": "earth science",
    "geoscience": "earth science",
    "geology": "earth science",
    "general_education": "general education",
    "general": "general education",
    **{zh: en for en, zh in DISCIPLINE_ZH.items()},
}

# Keywords per discipline. Counted as word units (English words, Chinese characters joined
# back into the keyword), so "cell" does not fire inside "excellent".
_KEYWORDS: dict[str, tuple[str, ...]] = {
    "mathematics": (
        "theorem",
        "proof",
        "equation",
        "integral",
        "derivative",
        "polynomial",
        "matrix",
        "algebra",
        "geometry",
        "probability",
        "prime",
        "lemma",
        "function",
        "triangle",
        "calculus",
        "vector",
        "数学",
        "定理",
        "证明",
        "方程",
        "积分",
        "导数",
        "函数",
        "几何",
        "概率",
        "矩阵",
        "三角形",
        "素数",
    ),
    "physics": (
        "force",
        "energy",
        "momentum",
        "velocity",
        "acceleration",
        "quantum",
        "particle",
        "electron",
        "magnetic",
        "electric",
        "wave",
        "relativity",
        "thermodynamics",
        "newton",
        "mass",
        "photon",
        "物理",
        "力学",
        "能量",
        "动量",
        "速度",
        "加速度",
        "量子",
        "电磁",
        "粒子",
        "波长",
        "热力学",
    ),
    "chemistry": (
        "molecule",
        "reaction",
        "acid",
        "base",
        "compound",
        "bond",
        "oxidation",
        "catalyst",
        "molar",
        "element",
        "ion",
        "organic",
        "chemical",
        "化学",
        "分子",
        "反应",
        "化合物",
        "酸",
        "碱",
        "催化剂",
        "离子",
        "氧化",
        "有机",
    ),
    "biology": (
        "cell",
        "gene",
        "protein",
        "dna",
        "rna",
        "evolution",
        "species",
        "organism",
        "enzyme",
        "photosynthesis",
        "ecosystem",
        "mitosis",
        "生物",
        "细胞",
        "基因",
        "蛋白质",
        "进化",
        "物种",
        "酶",
        "光合作用",
        "生态",
    ),
    "astronomy": (
        "star",
        "galaxy",
        "planet",
        "orbit",
        "telescope",
        "universe",
        "cosmic",
        "solar",
        "supernova",
        "nebula",
        "asteroid",
        "天文",
        "恒星",
        "星系",
        "行星",
        "轨道",
        "望远镜",
        "宇宙",
        "黑洞",
        "太阳系",
    ),
    "earth science": (
        "earthquake",
        "volcano",
        "plate",
        "tectonic",
        "climate",
        "weather",
        "rock",
        "mineral",
        "ocean",
        "atmosphere",
        "sediment",
        "glacier",
        "erosion",
        "地震",
        "火山",
        "板块",
        "气候",
        "天气",
        "岩石",
        "矿物",
        "海洋",
        "大气",
        "冰川",
    ),
    "medicine": (
        "patient",
        "disease",
        "treatment",
        "clinical",
        "symptom",
        "diagnosis",
        "drug",
        "therapy",
        "virus",
        "infection",
        "vaccine",
        "surgery",
        "医学",
        "患者",
        "疾病",
        "治疗",
        "临床",
        "症状",
        "诊断",
        "药物",
        "病毒",
        "感染",
        "疫苗",
    ),
    "computer science": (
        "algorithm",
        "program",
        "software",
        "computer",
        "data",
        "network",
        "code",
        "database",
        "complexity",
        "compiler",
        "memory",
        "python",
        "计算机",
        "算法",
        "程序",
        "软件",
        "数据",
        "网络",
        "代码",
        "数据库",
        "编程",
    ),
}


def normalize_discipline(name: str) -> str:
    """Map a user-supplied discipline (any case, aliases, Chinese names) onto ``DISCIPLINES``.

    Raises ValueError naming the accepted values when it is none of them.
    """
    key = name.strip().lower().replace("-", " ")
    key = _ALIASES.get(key, _ALIASES.get(key.replace(" ", "_"), key))
    if key not in DISCIPLINES:
        raise ValueError(
            f"unknown discipline {name!r}; use one of {', '.join(DISCIPLINES)} "
            "(or leave it out to have it assigned)"
        )
    return key


class KeywordDisciplineClassifier:
    """Assigns one of the 9 disciplines by counting discipline keywords in the text.

    Cheap and transparent on purpose: it only routes a seed to a prompt template. A seed with
    fewer than ``min_hits`` keyword hits goes to "general education".
    """

    def __init__(self, min_hits: int = 2):
        self.min_hits = min_hits
        self._latin: dict[str, str] = {}
        self._cjk: list[tuple[str, str]] = []
        for discipline, words in _KEYWORDS.items():
            for w in words:
                if w.isascii():
                    self._latin[w] = discipline
                else:
                    self._cjk.append((w, discipline))

    def scores(self, text: str) -> dict[str, int]:
        counts = dict.fromkeys(DISCIPLINES, 0)
        for unit in text_units(text):
            stem = unit[:-1] if unit.endswith("s") and unit[:-1] in self._latin else unit
            if stem in self._latin:
                counts[self._latin[stem]] += 1
        for word, discipline in self._cjk:
            counts[discipline] += text.count(word)
        return counts

    def classify(self, text: str) -> str:
        counts = self.scores(text)
        best = max(DISCIPLINES, key=lambda d: (counts[d], -DISCIPLINES.index(d)))
        return best if counts[best] >= self.min_hits else FALLBACK_DISCIPLINE


_GUIDANCE_EN = {
    "mathematics": "State every quantity exactly; the solution must justify each step and end "
    "with the exact final answer.",
    "physics": "Give all physical quantities with units, state the laws used, and check the "
    "units of the final answer.",
    "chemistry": "Use balanced equations and correct chemical formulas; show stoichiometric "
    "calculations with units.",
    "biology": "Ground the problem in concrete biological mechanisms and explain the causal "
    "chain in the solution.",
    "astronomy": "Use realistic astronomical values with units and explain the physical "
    "reasoning behind each step.",
    "earth science": "Refer to concrete Earth processes and data; explain how each step follows "
    "from them.",
    "medicine": "Write a clinically accurate problem; the solution explains the reasoning and "
    "does not give personal medical advice.",
    "computer science": "Make the problem precise (inputs, outputs, constraints); the solution "
    "explains the algorithm and its complexity.",
    "general education": "Write a clear problem a student can answer from general knowledge; "
    "the solution explains the reasoning step by step.",
}

_GUIDANCE_ZH = {
    "mathematics": "所有量都要准确给出；解答需论证每一步，并以精确的最终答案结束。",
    "physics": "物理量须带单位，写明所用定律，并检查最终答案的单位。",
    "chemistry": "使用配平的化学方程式和正确的化学式；计算过程写明单位。",
    "biology": "问题要基于具体的生物学机制，解答要说明因果链条。",
    "astronomy": "使用真实合理的天文数据并带单位，解释每一步的物理依据。",
    "earth science": "结合具体的地球过程和数据，说明每一步如何得出。",
    "medicine": "问题须在医学上准确；解答说明推理过程，不提供个人医疗建议。",
    "computer science": "问题要明确输入、输出和约束；解答说明算法及其复杂度。",
    "general education": "问题清晰，学生凭常识即可作答；解答逐步说明推理。",
}

SCIENCE_TEMPLATE_EN = (
    "Please gain inspiration from the following {discipline} content to create a "
    "high-quality {discipline} problem and solution. Present your output in two sections, "
    "exactly in this format:\n[Problem]\n<a completely self-contained problem: it must not "
    'refer to "the text" or "the content above", and must include every piece of information '
    "needed to solve it>\n[Solution]\n<a step-by-step solution that reaches a clear final "
    "answer>\n{guidance} Write in English.\n\n{discipline} content:\n" + SEED_DELIMITER + "\n{seed}"
)
SCIENCE_TEMPLATE_ZH = (
    "请从以下{discipline}内容中获得灵感，创作一道高质量的{discipline}题目及其解答。"
    "请严格按照以下格式输出两个部分：\n[Problem]\n<完整独立的题目：不得提及“上文”或“以上内容”，"
    "并包含解题所需的全部信息>\n[Solution]\n<逐步推理的解答，并给出明确的最终答案>\n"
    "{guidance}请用中文写作。\n\n{discipline}内容：\n" + SEED_DELIMITER + "\n{seed}"
)
SCIENCE_SYSTEM = "You are an expert teacher who writes rigorous exam problems with solutions."


def science_messages(seed_text: str, discipline: str, lang: str) -> list[dict[str, str]]:
    """Chat messages asking for a [Problem]/[Solution] pair inspired by ``seed_text``."""
    if lang == "zh":
        user = SCIENCE_TEMPLATE_ZH.format(
            discipline=DISCIPLINE_ZH[discipline], guidance=_GUIDANCE_ZH[discipline], seed=seed_text
        )
    else:
        user = SCIENCE_TEMPLATE_EN.format(
            discipline=discipline, guidance=_GUIDANCE_EN[discipline], seed=seed_text
        )
    return [{"role": "system", "content": SCIENCE_SYSTEM}, {"role": "user", "content": user}]


CODE_SYSTEM = (
    "You are an expert competitive programmer who writes original, correct Python problems "
    "with reference solutions and tests."
)
CODE_TEMPLATE_NEW = (
    "Here are example programming problems in the style of LeetCode:\n\n{examples}\n\n"
    "Create ONE new, original problem inspired by the last example (not a copy of it). "
    "Answer exactly in this format:\n[Problem]\n<title on the first line, then a precise "
    "description with input/output format, constraints and at least one example>\n"
    "[Solution]\n<a short explanation of the approach and its complexity, then the complete "
    "Python 3 solution in one ```python code block defining the entry-point function named in "
    "the problem, as `{entry_hint}` is in the last example>\n[Tests]\n```python\n<at least {min_tests} independent "
    "`assert` lines that call the entry point and check exact results>\n```\n\n" + SEED_DELIMITER
)
CODE_TEMPLATE_SOLVE = (
    "Solve the following programming problem in Python 3.\n\n{problem}\n\nAnswer exactly in "
    "this format:\n[Solution]\n<a short explanation of the approach and its complexity, then "
    "the complete solution in one ```python code block that defines `{entry_point}`>\n\n"
    + SEED_DELIMITER
)


def format_code_problem(problem: dict, with_tests: bool = True) -> str:
    """Render one LeetCode-style problem record (title, description, examples, tests)."""
    parts = [f"Title: {problem['title']}", problem["description"].strip()]
    for i, ex in enumerate(problem.get("examples") or [], 1):
        if isinstance(ex, dict):
            line = f"Example {i}: Input: {ex.get('input', '')}  Output: {ex.get('output', '')}"
            if ex.get("explanation"):
                line += f"  Explanation: {ex['explanation']}"
        else:
            line = f"Example {i}: {ex}"
        parts.append(line)
    if problem.get("entry_point"):
        parts.append(f"Entry point: {problem['entry_point']}")
    if with_tests and problem.get("tests"):
        parts.append("Tests:\n```python\n" + "\n".join(problem["tests"][:5]) + "\n```")
    return "\n".join(parts)


def code_new_messages(examples: list[dict], target: dict, min_tests: int) -> list[dict[str, str]]:
    """In-context prompt: a few example problems (with tests), then ask for a new problem
    inspired by ``target`` with solution and tests."""
    shown = [*examples, target]
    rendered = "\n\n".join(
        f"### Example {i}\n{format_code_problem(p)}" for i, p in enumerate(shown, 1)
    )
    user = CODE_TEMPLATE_NEW.format(
        examples=rendered, entry_hint=target.get("entry_point", "solve"), min_tests=min_tests
    )
    return [{"role": "system", "content": CODE_SYSTEM}, {"role": "user", "content": user}]


def code_solve_messages(problem: dict) -> list[dict[str, str]]:
    """Prompt for a solution of an existing problem, checked against its own tests."""
    user = CODE_TEMPLATE_SOLVE.format(
        problem=format_code_problem(problem, with_tests=False),
        entry_point=problem.get("entry_point", "solve"),
    )
    return [{"role": "system", "content": CODE_SYSTEM}, {"role": "user", "content": user}]


def prompt_version(name: str, *parts: object) -> str:
    """``name-<hash>`` over the template text and settings that shape the answer."""
    blob = json.dumps([name, *parts], sort_keys=True, ensure_ascii=False, default=str)
    return f"{name}-{hashlib.sha256(blob.encode('utf-8')).hexdigest()[:10]}"


SCIENCE_PROMPT_VERSION = prompt_version(
    "science-v1",
    SCIENCE_SYSTEM,
    SCIENCE_TEMPLATE_EN,
    SCIENCE_TEMPLATE_ZH,
    _GUIDANCE_EN,
    _GUIDANCE_ZH,
)
CODE_PROMPT_VERSION = prompt_version("code-v1", CODE_SYSTEM, CODE_TEMPLATE_NEW, CODE_TEMPLATE_SOLVE)


def item_key(seed_id: str, version: str, sample_index: int) -> str:
    """Stable id of one generated item: seed, prompt version and sample number."""
    blob = f"{seed_id}\x00{version}\x00{sample_index}"
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]
