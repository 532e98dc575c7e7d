"""Lint, format and types run on every submission (.ci/run runs the suite): ``ruff check``,
``ruff format --check`` and ``mypy refimpl``, with the settings in pyproject.toml."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(module: str) -> list[str]:
    if (
        shutil.which(module) is None
        and subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True).returncode != 0
    ):
        pytest.fail(f"{module} is not installed: it is in the `test` extra (pip install -e '.[test]')")
    return [sys.executable, "-m", module]


def test_ruff_check_is_clean():
    p = subprocess.run(
        [*_tool("ruff"), "check", "refimpl", "tests", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stdout[-4000:]


def test_ruff_format_leaves_every_file_unchanged():
    p = subprocess.run(
        [*_tool("ruff"), "format", "--check", "refimpl", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]


def test_every_doc_comment_sits_on_an_assignment():
    """A ``#:`` comment documents the attribute assigned on the next line (Sphinx autodoc); above anything else
    it documents nothing, or the wrong object."""
    wrong = []
    for path in sorted((ROOT / "refimpl").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not line.strip().startswith("#:") or (i + 1 < len(lines) and lines[i + 1].strip().startswith("#:")):
                continue
            after = lines[i + 1] if i + 1 < len(lines) else ""
            if not re.match(r"\s*[A-Za-z_][\w.]*(\[[^\]]*\])?\s*(:|=)|\s*[A-Za-z_]\w*\s*,", after):
                wrong.append(f"{path.relative_to(ROOT)}:{i + 1}: {after.strip()[:60]}")
    assert wrong == []


def test_no_text_cites_documents_or_people_outside_the_repository():
    """Comments, tests, specs and docs cite upstream sources (repository, file, version, issue), never notes
    kept outside the repository or the people who wrote them."""
    outside = re.compile(
        "|".join(["shared" + "/", r"peers/\w+\.md", "peer " + "doc", "the " + "lead" + r"\b"]), re.IGNORECASE
    )
    hits = []
    for folder in ("refimpl", "tests", "spec", "docs", "bench"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".toml", ".ipynb", ".js", ".html", ".txt") and path.is_file():
                for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                    if outside.search(line):
                        hits.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()[:80]}")
    hits += [
        f"README.md: {line}"
        for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
        if outside.search(line)
    ]
    assert hits == []


def test_the_version_is_written_once():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in text and 'version = {attr = "refimpl.__version__"}' in text
    assert not any(line.startswith('version = "') for line in text.splitlines())  # no literal version


def test_mypy_is_clean_on_the_package():
    p = subprocess.run([*_tool("mypy"), "refimpl"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(p.stdout[-300:])
    assert p.returncode == 0, p.stdout[-6000:]
