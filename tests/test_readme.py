"""The README stays true: its python blocks run, its config reference (docs/config.md) matches
the dataclass, and CI runs its test command."""

import re
from pathlib import Path

import pytest

from diffusion import config_reference

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CONFIG_DOC = (ROOT / "docs" / "config.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(index):
    exec(compile(PYTHON_BLOCKS[index], f"README.md block {index}", "exec"), {})


def test_config_table_lists_every_field_with_its_default():
    for name, default, help_text in config_reference():
        row = f"| `{name}` | `{default}` | {help_text} |"
        assert row in CONFIG_DOC, f"docs/config.md is out of date for {name}: {row}"


def test_readme_links_the_config_reference():
    assert "(docs/config.md)" in README


def test_ci_runs_the_readme_test_command():
    marker = README.index("<!-- ci:test-command")
    command = re.search(r"```bash\n(.*?)\n", README[marker:]).group(1)
    assert command.endswith("pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ci:test-command" in ci
