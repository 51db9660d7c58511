"""The shape of the code stays readable: thin scripts, files a reader can hold, plain network
layers, argparse only at the edges, a README that is a map, and a repository that speaks only
of what it contains."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("diffusion", "nets", "losses", "sampling")
NETWORK_FILES = ("unet.py", "blocks.py", "attention.py", "embeddings.py", "text_encoder.py",
                 "denoiser.py")
# Where argparse belongs: the scripts, the one CLI module, the evaluation entry point, demos.
ARGPARSE_ALLOWED = {"train.py", "sample.py", "sampling/cli.py", "sampling/evaluate.py",
                    "diffusion/__main__.py"}
MAX_MODULE_LINES = 500
MAX_README_LINES = 300
# Words of the circumstances code was written in, which a reader of the repository lacks.
FOREIGN_WORDS = re.compile(r"workplace|\blent\b|earlier session|scratch/|the issue", re.I)


def non_blank_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def python_files():
    return [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") or part == "build"
                                                     for part in p.relative_to(ROOT).parts)]


@pytest.mark.parametrize("script, limit", [("train.py", 120), ("sample.py", 100)])
def test_scripts_are_thin(script, limit):
    assert non_blank_lines(ROOT / script) <= limit


@pytest.mark.parametrize("package", PACKAGES)
def test_package_modules_fit_in_a_readers_head(package):
    long = {p.name: n for p in (ROOT / package).glob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split along the math: {long}"


@pytest.mark.parametrize("name", NETWORK_FILES)
def test_network_files_use_no_private_torch_api(name):
    text = (ROOT / "nets" / name).read_text()
    assert "torch._C" not in text and "torch.ops.mkldnn" not in text


def test_argparse_only_at_the_edges():
    importing = {str(p.relative_to(ROOT)) for p in python_files()
                 if re.search(r"^\s*(import argparse|from argparse )", p.read_text(), re.M)
                 and p.relative_to(ROOT).parts[0] in (*PACKAGES, "train.py", "sample.py")}
    assert importing <= ARGPARSE_ALLOWED, importing - ARGPARSE_ALLOWED


def test_readme_is_a_map():
    assert len((ROOT / "README.md").read_text().splitlines()) <= MAX_README_LINES


def test_repository_speaks_only_of_what_it_contains():
    texts = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("configs/*.yaml"),
             *python_files()]
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in texts
            for i, line in enumerate(p.read_text().splitlines(), start=1)
            if FOREIGN_WORDS.search(line) and p.name != "test_layout.py"]
    assert not hits, "\n".join(hits)
