"""README.md and BENCHMARKS.md are generated from their parts and start as promised."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO_ROOT


def test_readme_and_benchmarks_are_current():
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docs" / "build_readme.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_readme_starts_with_the_two_commands():
    text = (REPO_ROOT / "README.md").read_text()
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]
    assert text.index("```bash") < text.index("\n## ")


def test_every_tool_mentioned_in_the_readme_exists():
    import re

    text = (REPO_ROOT / "README.md").read_text()
    for path in sorted(set(re.findall(r"\btools/[\w/]+\.py\b", text))):
        assert (REPO_ROOT / path).exists(), path
