"""Every ```python snippet in README.md runs as written (```py marks ones that need a cluster)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index):
    namespace: dict = {}
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), namespace)
    assert namespace, "the snippet defined nothing"


def test_readme_has_the_two_quickstart_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = re.search(r"\*\*Run the tests:\*\*\n\n```bash\n(.*?)\n```", text, flags=re.S).group(1)
    assert "pytest" in test_command and test_command in ci
    assert "python -m fa_jax run mnist" in text
