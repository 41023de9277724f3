"""Every Python example of the SDK's README runs as written against the live stack."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("n", range(len(EXAMPLES)))
def test_readme_example_runs(n, capsys):
    exec(compile(EXAMPLES[n], f"README.md example {n + 1}", "exec"), {})
