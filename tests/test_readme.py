"""The README's two set-up commands exist, .ci/run runs the test one, and the main job works."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The shell commands in the ```sh blocks of the README's set-up section."""
    text = (ROOT / "README.md").read_text().split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    main, tests = cmds
    assert main.startswith("pip install -e ") and "&& refimpl " in main
    assert tests.startswith("pip install -e ") and "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = readme_commands()[1]
    lines = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert test_cmd in lines, f"{test_cmd!r} not a line of .ci/run"
    assert "set -euo pipefail" in ci  # any failure makes CI fail


def test_extras_named_by_the_readme_exist_in_pyproject():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for cmd in readme_commands():
        for group in re.findall(r"\[([a-z,]+)\]", cmd):
            for extra in group.split(","):
                assert extra in extras, f"README names extra {extra!r}, pyproject lacks it"
    assert any(req.startswith("torch==2.13.0") for req in extras["peers"])
    assert {"torchao==0.17.0", "torchtune==0.6.1"} <= set(extras["torchpeers"])  # the pair that imports together


def test_readme_main_job_runs_and_exits_zero():
    main = readme_commands()[0]
    job = shlex.split(main.split("&&", 1)[1].strip())  # the part after the install
    assert job[0] == "refimpl"
    exe = shutil.which("refimpl")
    cmd = [exe, *job[1:]] if exe else [sys.executable, "-m", "refimpl.cli", *job[1:]]
    if exe is None and "CI" in __import__("os").environ:
        pytest.fail("the refimpl console script is not on PATH after the README's install")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    # the time is reported, never asserted (timings belong to bench/)
    print(f"\n{main.split('&&', 1)[1].strip()}: exit {done.returncode} in {time.perf_counter() - t0:.1f} s")
    print(done.stdout[-400:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_readme_python_tour_runs():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "the README has no python tour"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # the README's own example
