"""Command-line contracts of ``refimpl lab`` and ``refimpl memory`` (issue 16, item 4): a description,
an epilog with the exit codes and help text for every option; no progress frames in a log; one line and
exit 2 when matplotlib is missing."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refimpl import memory
from refimpl.lab import cli as lab_cli

ROOT = Path(__file__).resolve().parents[1]
EXIT_CODES = "exit codes: 0 success; 2 usage or input error; 3 internal error"


def _parsers() -> dict[str, argparse.ArgumentParser]:
    lab = lab_cli._parser()
    out = {"refimpl lab": lab}
    for action in lab._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.update({f"refimpl lab {name}": p for name, p in action.choices.items()})
    out["refimpl memory"] = memory._parser()
    return out


def test_every_lab_and_memory_parser_is_covered():
    assert set(_parsers()) == {
        "refimpl lab",
        "refimpl lab train",
        "refimpl lab experiment",
        "refimpl lab serve",
        "refimpl memory",
    }


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_parser_has_a_description_and_the_exit_codes(name):
    p = _parsers()[name]
    assert p.description and len(p.description) > 20, name
    assert p.epilog and EXIT_CODES in p.epilog, name


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_every_option_has_help(name):
    p = _parsers()[name]
    missing = [
        a.option_strings or a.dest
        for a in p._actions
        if not isinstance(a, argparse._HelpAction) and (not a.help or a.help == argparse.SUPPRESS)
    ]
    assert missing == [], f"{name}: no help for {missing}"


@pytest.mark.parametrize(
    "argv",
    [
        ["lab", "--help"],
        ["lab", "train", "--help"],
        ["lab", "experiment", "--help"],
        ["lab", "serve", "--help"],
        ["memory", "--help"],
    ],
)
def test_help_through_the_refimpl_command_shows_the_exit_codes(argv, capsys):
    from refimpl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # help text is wrapped to the terminal width
    assert EXIT_CODES in out
    assert f"usage: refimpl {' '.join(argv[:-1])}" in out


def _run(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("REFIMPL_TRACEBACK", None)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


_REFIMPL = "import sys; from refimpl.cli import main; sys.exit(main(sys.argv[1:]))"
_NO_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; " + _REFIMPL


def test_progress_is_off_when_stderr_is_not_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")
    from refimpl.lab import train

    class Pipe:
        def isatty(self) -> bool:
            return False

        def write(self, s: str) -> int:
            raise AssertionError(f"progress written to a non-terminal: {s!r}")

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Pipe())
    bar = train._progress(10, "t", True)
    assert bar is not None and bar.disable
    bar.update(1)
    bar.close()


def test_train_into_a_pipe_writes_no_carriage_returns(tmp_path):
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    r = _run(_REFIMPL, "lab", "train", "--steps", "5", "--examples", "100", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\r" not in r.stdout
    assert (tmp_path / "o" / "curves.png").is_file()


@pytest.mark.parametrize("argv", [["lab", "train", "--steps", "5"], ["lab", "experiment", "memory"]])
def test_missing_matplotlib_is_one_line_naming_the_extra_and_exit_2(argv, tmp_path):
    r = _run(_NO_MATPLOTLIB, *argv, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "pip install 'refimpl[lab]'" in lines[0] and "matplotlib" in lines[0]
    assert lines[0].startswith(f"refimpl lab {argv[1]}:")
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "o").exists()  # checked before any training or writing


def test_missing_matplotlib_does_not_stop_serve_help_or_memory(tmp_path):
    r = _run(_NO_MATPLOTLIB, "memory", "qlora", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _run(_NO_MATPLOTLIB, "lab", "serve", "--help", cwd=tmp_path)
    assert r.returncode == 0 and EXIT_CODES in " ".join(r.stdout.split()), r.stderr
