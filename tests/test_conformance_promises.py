"""A verdict is a promise: no silent pass, tight bounds, every op and class checked (issue 13).

CONFORMS only when every selected tier ran, every equivalence class was hit and every op the
target provides has a row; a target that exits, raises a BaseException or hangs fails; built-in
known divergences never apply to a user's target; an error at twice a derived bound fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import refimpl.lora as lora
from refimpl.conformance import get_target, op_table, run
from refimpl.conformance.runner import CONFORMS, EXIT_CODES, FAIL, FAILS, INCOMPLETE, PASS, XFAIL
from refimpl.conformance.table import OP_MODULES, not_ops, public_functions
from refimpl.conformance.targets import NamespaceTarget
from refimpl.conformance.tolerance import Bounded, compare

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ targets used through the CLI


def _exits(*args, **kwargs):
    sys.exit(0)


def _hard_exit(*args, **kwargs):
    os._exit(0)


def _hangs(*args, **kwargs):
    time.sleep(3600)


EXIT_TARGET = {"lora.forward": _exits}
HARD_EXIT_TARGET = {"lora.forward": _hard_exit, "lora.delta": lora.delta}
HANG_TARGET = {"lora.forward": _hangs, "lora.delta": lora.delta}


def _forward_without_checks(x, W, A, B, scaling, *, bias=None, dropout_mask=None, dropout_p=0.0, fan_in_fan_out=False):
    """lora.forward as PEFT computes it: no input validation, so NaN flows through."""
    x, W, A, B = (np.asarray(v, np.float64) for v in (x, W, A, B))
    if fan_in_fan_out:
        W = W.T
    xd = x if dropout_mask is None else x * np.asarray(dropout_mask) / (1.0 - dropout_p)
    y = x @ W.T + scaling * (xd @ A.T) @ B.T
    return y if bias is None else y + bias


class NamedPeft:
    """A user's target that happens to be named like the built-in PEFT target."""

    name = "peft"

    def lookup(self, op):
        return _forward_without_checks if op == "lora.forward" else None


def _conform(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "refimpl.cli", "conform", "-q", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_target_that_calls_sys_exit_0_fails_with_a_nonzero_exit():
    p = _conform("--target", "tests.test_conformance_promises:EXIT_TARGET", "--ops", "lora.forward")
    print(p.stdout[-600:])
    assert p.returncode == EXIT_CODES[FAILS], p.stdout + p.stderr
    assert "SystemExit" in p.stdout and "DOES NOT CONFORM" in p.stdout


def test_a_target_named_peft_does_not_inherit_the_builtin_divergences():
    res = run(NamedPeft(), "lora.forward")
    nan_cases = [r for r in res.results if r.tier == "special" and "has" in r.label]
    assert nan_cases and all(r.status == FAIL for r in nan_cases), [(r.label, r.status) for r in nan_cases]
    assert not any(r.status == XFAIL for r in res.results)
    p = _conform("--target", "tests.test_conformance_promises:NamedPeft", "--ops", "lora.forward")
    assert p.returncode == EXIT_CODES[FAILS], p.stdout[-800:]


def test_the_builtin_peft_divergences_still_apply_to_the_builtin_target():
    pytest.importorskip("peft")
    res = run("peft", "lora.forward", tiers=("names", "special"))
    assert any(r.status == XFAIL for r in res.results)


def test_a_missing_vectors_dir_is_incomplete_with_a_nonzero_exit(tmp_path):
    p = _conform("--target", "numpy", "--ops", "lora.delta", "--vectors-dir", str(tmp_path / "nowhere"))
    print(p.stdout[-600:])
    assert p.returncode == EXIT_CODES[INCOMPLETE], p.stdout + p.stderr
    assert "INCOMPLETE" in p.stdout and "golden" in p.stdout


def test_a_target_that_ends_its_process_fails_that_op_and_the_run_goes_on():
    res = run(NamespaceTarget("hard", HARD_EXIT_TARGET), "lora.forward,lora.delta")
    fail = [r for r in res.results if r.op == "lora.forward" and r.status == FAIL]
    assert fail and "ended the process" in fail[0].message
    assert res.cell("lora.delta", "properties")[0] == PASS
    assert res.verdict == FAILS


def test_a_target_that_hangs_fails_after_the_timeout_and_the_run_goes_on():
    t0 = time.perf_counter()
    res = run(NamespaceTarget("hang", HANG_TARGET), "lora.forward,lora.delta", timeout=2)
    assert time.perf_counter() - t0 < 60
    fail = [r for r in res.results if r.op == "lora.forward" and r.status == FAIL]
    assert fail and "did not return within 2 s" in fail[0].message
    assert res.cell("lora.delta", "properties")[0] == PASS


def test_an_op_the_target_provides_without_a_row_is_unchecked_and_incomplete():
    target = NamespaceTarget("extra", {"lora.delta": lora.delta, "lora.fused_delta_v2": lora.delta})
    res = run(target, "lora.*")
    assert res.unchecked == ["lora.fused_delta_v2"]
    assert res.verdict == INCOMPLETE and res.exit_code == EXIT_CODES[INCOMPLETE]
    assert any("fused_delta_v2" in g for g in res.gaps)


def test_a_skipped_tier_is_incomplete_never_conforms(tmp_path):
    res = run("numpy", "lora.delta", vectors_dir=tmp_path)
    assert res.cell("lora.delta", "golden")[0] == "skip"
    assert res.verdict == INCOMPLETE and not res.ok


def test_every_public_function_of_the_op_modules_has_a_row_or_a_reason():
    table, skip = op_table(), not_ops()
    public = [op for module in OP_MODULES for op in public_functions(module)]
    assert len(public) > 40, public
    missing = [op for op in public if op not in table and op not in skip]
    assert not missing, f"public functions with no row and no NOT_OPS reason: {missing}"
    assert not set(skip) & set(table), "an op cannot both have a row and be listed as not an op"


def test_every_row_declares_classes_and_boundary_cases_hit_each_class():
    for name, spec in op_table().items():
        if "boundary" not in spec.tiers:
            continue
        assert spec.classes, f"{name}: no equivalence classes"
        assert spec.boundary is not None, f"{name}: no boundary cases"
        hit = {c for b in spec.boundary() for c in b.classes}
        assert set(spec.classes) <= hit, f"{name}: classes never hit: {sorted(set(spec.classes) - hit)}"
        undeclared = sorted(hit - set(spec.classes))
        assert not undeclared, f"{name}: boundary cases name undeclared classes: {undeclared}"


def test_budget_spends_extra_seeded_rounds():
    res = run("numpy", "lora.scaling", tiers=("names", "properties"), budget=1.0, examples=5)
    labels = {r.label for r in res.results if r.tier == "properties"}
    assert "differential" in labels and any("seed 1" in lab for lab in labels), labels


def test_coverage_is_printed_and_in_the_json(tmp_path):
    p = _conform(
        "--target", "numpy", "--ops", "lora.forward", "--coverage", "--report", "json", str(tmp_path / "r.json")
    )
    assert "coverage: equivalence classes" in p.stdout
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    assert data["coverage"]["lora.forward"] and all(v > 0 for v in data["coverage"]["lora.forward"].values())
    assert data["verdict"] == CONFORMS, data["gaps"]


# ------------------------------------------------------------------ tight bounds


BOUNDED = [name for name, spec in op_table().items() if isinstance(spec.tolerance, Bounded) and spec.golden]


@pytest.mark.parametrize("op", BOUNDED)
def test_an_error_at_twice_the_bound_fails_and_half_passes(op):
    spec = op_table()[op]
    case = spec.example()
    from refimpl.conformance._values import flatten

    exp = flatten(spec.reference()(**case))
    bounds = spec.tolerance.bounds(case, "float64")
    name = next(k for k, b in bounds.items() if np.any(np.asarray(b) > 0))
    b = np.broadcast_to(np.asarray(bounds[name], np.float64), exp[name].shape)
    i = np.unravel_index(int(np.argmax(b)), b.shape)
    for factor, should_pass in ((2.0, False), (0.5, True)):
        act = {k: np.array(v, np.float64, copy=True) for k, v in exp.items()}
        act[name][i] += factor * b[i]
        v = compare(spec.tolerance, act, exp, case, "float64")
        assert v.passed is should_pass, f"{op}: error {factor}x the bound gave {v.message}"
        if not should_pass:
            assert "rounding in the declared precision cannot explain it" in v.message


def test_a_kernel_computing_in_float32_while_declaring_float64_is_caught():
    def f32_forward(x, W, A, B, scaling, **kw):
        c = lambda a: None if a is None else np.asarray(a, np.float32)  # noqa: E731
        kw = {k: (c(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        return lora.forward(c(x), c(W), c(A), c(B), float(np.float32(scaling)), **kw).astype(np.float64)

    res = run(NamespaceTarget("f32-declared-f64", {"lora.forward": f32_forward}), "lora.forward")
    assert res.verdict == FAILS
    worst = max(r.worst_ratio for r in res.failures if r.worst_ratio is not None)
    print(f"\nfloat32 kernel declared float64: worst error/bound {worst:.3g}")
    assert worst > 2


def test_failure_verdict_with_get_target_resolves_builtin_only_by_class():
    from refimpl.conformance.targets import is_builtin

    assert is_builtin(get_target("numpy"))
    assert not is_builtin(NamedPeft())


# ------------------------------------------------------------------ modelled divergences that predict a raise


def model_raises_runtime_error(op, case, expected):
    """A divergence model: the peer raises RuntimeError for lora.delta when r == 1, nothing else."""
    return {"raises": "RuntimeError"} if op == "lora.delta" and case["A"].shape[0] == 1 else None


def _raising_delta(exc_type):
    def delta(A, B, scaling, *, fan_in_fan_out=False):
        if A.shape[0] == 1:
            raise exc_type("peer refuses rank 1")
        return lora.delta(A, B, scaling, fan_in_fan_out=fan_in_fan_out)

    return delta


def test_a_modelled_raise_is_known_only_for_the_exception_the_model_predicts(tmp_path):
    p = tmp_path / "div.toml"
    p.write_text(
        '[[divergence]]\nop = "lora.delta"\ntarget = "peer-*"\nreason = "rank 1 refused"\n'
        'upstream = "test"\nmodel = "tests.test_conformance_promises:model_raises_runtime_error"\n'
    )
    ok = run(
        NamespaceTarget("peer-runtime", {"lora.delta": _raising_delta(RuntimeError)}), "lora.delta", divergences=[p]
    )
    assert ok.verdict == CONFORMS, ok.gaps + [f.message for f in ok.failures]
    assert any(r.status == XFAIL for r in ok.results)
    wrong = run(NamespaceTarget("peer-type", {"lora.delta": _raising_delta(TypeError)}), "lora.delta", divergences=[p])
    assert wrong.verdict == FAILS
