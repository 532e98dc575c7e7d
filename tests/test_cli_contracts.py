"""The CLI and report contracts: exit codes, --version, help texts, JSON and JUnit layouts, input safety."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

import refimpl
import refimpl.lora as lora
from refimpl.conformance import report, run
from refimpl.conformance.runner import EXIT_CODES, FAILS
from refimpl.conformance.targets import NamespaceTarget

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "refimpl.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_version_prints_the_package_and_spec_versions():
    p = _cli("--version")
    assert p.returncode == 0
    assert p.stdout.strip() == f"refimpl {refimpl.__version__} (spec {refimpl.SPEC_VERSION})"


def _parsers():
    import argparse

    from refimpl.cli import build_parser

    top = build_parser()
    yield "refimpl", top
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name not in ("lab", "memory"):  # they forward to their own parsers
                    yield f"refimpl {name}", sub


def test_every_help_has_a_description_exit_codes_and_help_for_each_option():
    for name, parser in _parsers():
        assert parser.description, f"{name}: no description"
        assert parser.epilog and "exit codes:" in parser.epilog, f"{name}: exit codes missing from --help"
        for action in parser._actions:
            assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest}: no help text"
    p = _cli("conform", "--help")
    assert p.returncode == 0 and "exit codes:" in p.stdout


def test_conform_help_documents_every_verdict_code():
    out = _cli("conform", "--help").stdout
    text = " ".join(out.split())
    for verdict, code in EXIT_CODES.items():
        assert f"{code} {verdict}" in text, (verdict, code)
    assert "3 internal error" in text and "2 usage or input error" in text


def test_a_report_path_in_a_missing_folder_fails_before_the_run(tmp_path):
    p = _cli(
        "conform",
        "--target",
        "numpy",
        "--ops",
        "lora.delta",
        "--report",
        "json",
        str(tmp_path / "no" / "dir" / "r.json"),
    )
    assert p.returncode == 2
    assert "does not exist" in p.stderr and "Traceback" not in p.stderr
    assert "refimpl conform: target" not in p.stderr  # nothing ran


def test_a_target_module_that_raises_on_import_is_one_line_exit_2(tmp_path):
    (tmp_path / "broken_target.py").write_text("raise RuntimeError('boom at import')\n")
    p = _cli("conform", "--target", "broken_target:T", "--ops", "lora.delta", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "boom at import" in p.stderr and "Traceback" not in p.stderr


def test_an_internal_error_is_one_line_and_exit_3(monkeypatch, capsys):
    from refimpl import cli
    from refimpl.conformance import runner

    def broken(*args, **kwargs):
        raise KeyError("planted bug in the harness")

    monkeypatch.setattr(runner, "run", broken)
    assert cli.main(["conform", "--target", "numpy", "--ops", "lora.delta"]) == 3
    err = capsys.readouterr().err
    assert "internal error" in err and "planted bug" in err


def test_a_target_that_writes_into_its_inputs_fails():
    def in_place_delta(A, B, scaling, *, fan_in_fan_out=False):
        out = lora.delta(A, B, scaling, fan_in_fan_out=fan_in_fan_out)
        A *= 0  # a kernel reusing its input buffer as scratch
        return out

    res = run(NamespaceTarget("in-place", {"lora.delta": in_place_delta}), "lora.delta")
    assert res.verdict == FAILS
    assert any("modified its input 'A' in place" in r.message for r in res.failures)


def test_json_report_carries_schema_and_versions(tmp_path):
    res = run("numpy", "lora.delta", examples=3)
    report.write_json(res, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["schema_version"] == report.JSON_SCHEMA_VERSION
    assert data["versions"]["refimpl"] == refimpl.__version__ and data["versions"]["numpy"] == np.__version__
    assert data["verdict"] == res.verdict and data["exit_code"] == res.exit_code
    documented = (ROOT / "docs" / "report.md").read_text()
    for key in data:
        assert f"`{key}`" in documented, f"JSON key {key!r} is not documented in docs/report.md"
    for key in data["results"][0]:
        assert f"`{key}`" in documented, f"result field {key!r} is not documented in docs/report.md"


def _check_junit10(root: ET.Element) -> None:
    """The rules of Jenkins' junit-10.xsd that a writer can break (required attributes, allowed children)."""
    assert root.tag == "testsuites"
    time_re = re.compile(r"^(([0-9]{0,3},)*[0-9]{3}|[0-9]{0,3})*(\.[0-9]*)?$")
    for suite in root.iter("testsuite"):
        for attr in ("name", "tests", "failures", "errors"):
            assert suite.get(attr) is not None, f"testsuite lacks {attr}"
        assert time_re.match(suite.get("time", "0")), suite.get("time")
        for child in suite:
            assert child.tag in ("testsuite", "properties", "testcase", "system-out", "system-err"), child.tag
        for case in suite.findall("testcase"):
            assert case.get("name"), "testcase lacks a name"
            for child in case:
                assert child.tag in ("skipped", "error", "failure", "system-out", "system-err"), child.tag


def test_junit_report_follows_junit10_with_one_named_case_per_op_and_tier(tmp_path):
    bad = {"lora.scaling": lambda alpha, r, use_rslora=False: float(alpha), "lora.delta": lora.delta}
    res = run(NamespaceTarget("planted", bad), "lora.scaling,lora.delta", examples=5)
    report.write_junit(res, tmp_path / "r.xml")
    root = ET.parse(tmp_path / "r.xml").getroot()
    _check_junit10(root)
    names = [c.get("name") for c in root.iter("testcase")]
    assert "*" not in names and len(names) == len(set(names))
    assert "lora.scaling properties" in names and "lora.delta golden" in names
    failing = [c for c in root.iter("testcase") if c.find("failure") is not None]
    assert failing and all(c.get("name").startswith("lora.scaling") for c in failing)
    assert int(root.get("failures")) == len(failing)
