"""docs/targets.md works as printed: its example files are extracted, compiled and run as targets (issue 15)."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refimpl.conformance import report, run
from refimpl.conformance.runner import XFAIL

DOC = Path(__file__).resolve().parents[1] / "docs" / "targets.md"


def _files() -> dict[str, str]:
    """``<!-- file: NAME -->`` followed by a fenced block: NAME -> the block's text."""
    text = DOC.read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", text, re.S)}


@pytest.fixture
def examples(tmp_path, monkeypatch):
    for name, body in _files().items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in _files():
        sys.modules.pop(Path(name).stem, None)
    importlib.invalidate_caches()


def test_the_doc_holds_every_worked_example():
    assert {
        "torch_lora.py",
        "torch_lora.toml",
        "cupy_delta.py",
        "lora_delta.c",
        "lora_delta_target.py",
        "positive_zero.py",
        "positive_zero.toml",
    } <= set(_files())
    assert "docs/targets.md" in (DOC.parents[1] / "README.md").read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_the_c_function_through_ctypes_conforms_on_every_tier(examples):
    subprocess.run(
        ["cc", "-O2", "-shared", "-fPIC", "lora_delta.c", "-o", "liblora_delta.so"],
        cwd=examples,
        check=True,
        capture_output=True,
    )
    res = run("lora_delta_target:TARGET", "lora.delta", examples=25)
    assert res.ok and res.verdict_scope == "full", report.terminal(res)


def test_the_torch_cpu_example_conforms_in_float32_with_its_declared_divergence(examples):
    pytest.importorskip("torch")
    res = run("torch_lora:TARGET", "lora.forward", examples=25, divergences=[examples / "torch_lora.toml"])
    assert res.ok, report.terminal(res)
    assert any(r.status == XFAIL and r.tier == "special" for r in res.results)
    # without the declared compute dtype the same function is judged against float64's bounds and fails
    from refimpl.conformance.adapters import torch_target

    mod = importlib.import_module("torch_lora")
    strict = run(
        torch_target({"lora.forward": mod.forward}), "lora.forward", examples=10, tiers=("names", "shapes", "boundary")
    )
    assert not strict.ok and max(r.worst_ratio or 0 for r in strict.failures) > 1e3


def test_the_divergence_model_example_accepts_only_what_it_reproduces(examples):
    plain = run("positive_zero:TARGET", "quant.dequantize_4bit", examples=10)
    assert not plain.ok  # +0.0 where the reference writes -0.0
    declared = run(
        "positive_zero:TARGET", "quant.dequantize_4bit", examples=10, divergences=[examples / "positive_zero.toml"]
    )
    assert declared.ok, report.terminal(declared)
    assert any(
        r.status == XFAIL and "positive_zero:model" not in r.divergence and "+0.0" in r.divergence
        for r in declared.results
    )


def test_the_cupy_example_conforms_on_a_gpu(examples):
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy installed without a usable GPU
        pytest.skip(f"no GPU: {exc}")
    res = run("cupy_delta:TARGET", "lora.delta", examples=25)
    assert res.ok, report.terminal(res)
    assert res.verdict_scope == "declared domain"  # bfloat16 cases: CuPy has none
