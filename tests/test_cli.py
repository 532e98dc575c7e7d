"""The ``refimpl`` command: conform, vectors, info, and forwarding to lab and memory."""

from __future__ import annotations

import json
import re
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from refimpl import cli

ROOT = Path(__file__).resolve().parents[1]


def test_conform_numpy_subset_exits_0_and_prints_the_table(capsys, tmp_path):
    rc = cli.main(
        [
            "conform",
            "--target",
            "numpy",
            "--ops",
            "lora.delta,lora.scaling",
            "--examples",
            "5",
            "--report",
            "json",
            str(tmp_path / "r.json"),
            "--report",
            "junit",
            str(tmp_path / "r.xml"),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0
    assert "lora.delta" in out and "CONFORMS" in out
    assert "tier properties" not in err  # progress goes to stderr only when it is a terminal
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True
    assert ET.parse(tmp_path / "r.xml").getroot().get("failures") == "0"


def test_conform_exits_1_on_a_failing_user_target_and_prints_the_snippet(capsys):
    rc = cli.main(
        ["conform", "--target", "tests.test_conformance:PLANTED", "--ops", "lora.scaling", "--examples", "10", "-q"]
    )
    out, err = capsys.readouterr()
    assert rc == 1
    assert "DOES NOT CONFORM" in out and re.search(r"^reproduce \[\w+: .+\] with:$", out, re.M)
    assert "expected = outcome(ref.scaling, " in out and "target = get_target('tests.test_conformance:PLANTED')" in out
    assert err == ""  # -q: no progress


@pytest.mark.parametrize(
    "argv, message",
    [
        (["conform", "--target", "bogus"], "target"),
        (["conform", "--ops", "nothing.*"], "ops"),
        (["conform", "--tiers", "names,bogus"], "tiers"),
    ],
)
def test_conform_bad_arguments_exit_2_with_a_message(capsys, argv, message):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["conform", "--examples", "0"], ["conform", "--report", "xml", "p"], ["nope"]])
def test_argparse_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


def test_vectors_verify_passes_on_the_committed_vectors(capsys):
    assert cli.main(["vectors", "verify"]) == 0
    assert "verified" in capsys.readouterr().out


def test_vectors_generate_then_verify_in_a_fresh_directory(capsys, tmp_path):
    assert cli.main(["vectors", "generate", "--dir", str(tmp_path)]) == 0
    assert cli.main(["vectors", "verify", "--dir", str(tmp_path)]) == 0
    (tmp_path / "MANIFEST.json").write_text("{}")
    assert cli.main(["vectors", "verify", "--dir", str(tmp_path)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_info_lists_ops_and_targets(capsys):
    rc = cli.main(["info"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "conformance ops" in out and "lora.forward" in out and "module:object" in out


def test_lab_and_memory_forward_their_arguments(monkeypatch):
    seen = {}
    for name in ("refimpl.lab.cli", "refimpl.memory"):
        fake = types.ModuleType(name)
        fake.main = lambda argv, _n=name: seen.setdefault(_n, list(argv)) and 0
        monkeypatch.setitem(sys.modules, name, fake)
    assert cli.main(["lab", "train", "--steps", "3"]) == 0
    assert cli.main(["memory", "--model", "7b"]) == 0
    assert seen == {"refimpl.lab.cli": ["train", "--steps", "3"], "refimpl.memory": ["--model", "7b"]}


def test_forwarding_to_a_missing_module_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "refimpl.memory", None)  # import raises ImportError
    assert cli.main(["memory"]) == 2
    assert "not available" in capsys.readouterr().err
