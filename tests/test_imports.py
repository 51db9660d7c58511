"""Package structure: every package imports first in a fresh interpreter, and imports flow one
way (docs/design.md): nets and losses are leaves, diffusion never imports sampling."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nets", "losses", "diffusion", "sampling")
# package -> project packages it may import
ALLOWED = {
    "nets": set(),
    "losses": set(),
    "diffusion": {"nets", "losses"},
    "sampling": {"diffusion", "nets", "losses"},
}


@pytest.mark.parametrize("package", PACKAGES + ("train", "sample"))
def test_imports_first_in_a_fresh_interpreter(package):
    result = subprocess.run([sys.executable, "-c", f"import {package}"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def project_imports(path: Path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names} & set(PACKAGES)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_flow_one_way(package):
    for path in sorted((ROOT / package).glob("*.py")):
        bad = project_imports(path) - ALLOWED[package] - {package}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_public_names():
    from diffusion import AdvancedScheduler, DiffusionConfig  # noqa: F401
    from losses import AdvancedLossFunctions  # noqa: F401
