"""Lint, format and types run on every submission (.ci/run runs the suite): ``ruff check``,
``ruff format --check`` and ``mypy refimpl``, with the settings in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(module: str) -> list[str]:
    if shutil.which(module) is None and subprocess.run([sys.executable, "-m", module, "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.fail(f"{module} is not installed: it is in the `test` extra (pip install -e '.[test]')")
    return [sys.executable, "-m", module]


def test_ruff_check_is_clean():
    p = subprocess.run([*_tool("ruff"), "check", "refimpl", "tests", "bench"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:]


def test_ruff_format_leaves_every_file_unchanged():
    p = subprocess.run([*_tool("ruff"), "format", "--check", "refimpl", "tests", "bench"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]


def test_the_version_is_written_once():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in text and 'version = {attr = "refimpl.__version__"}' in text
    assert not any(line.startswith("version =") for line in text.splitlines())


def test_mypy_is_clean_on_the_package():
    p = subprocess.run([*_tool("mypy"), "refimpl"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(p.stdout[-300:])
    assert p.returncode == 0, p.stdout[-6000:]
