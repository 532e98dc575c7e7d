"""The target contract (issue 15): declared compute dtype, profile and supported domain; golden vectors under
options; labels that name what ran; every distinct failure shown; shapes shrunk; snippets that run for every
kind of target; QuantState as a constructor call; torch/CuPy adapters; pytest xfail for mixed items."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import refimpl.lora as L
import refimpl.quant as Q
from refimpl import cli
from refimpl.conformance import report, run
from refimpl.conformance._values import literal
from refimpl.conformance.runner import FAIL, PASS, UNSUPPORTED, XFAIL
from refimpl.conformance.targets import NamespaceTarget

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- supports


class Nf4Only:
    """A quantizer that handles NF4 only (it raises on anything else) and declares so."""

    name = "nf4-only"

    def supports(self, op):
        return {"quant_type": {"nf4"}}

    def lookup(self, op):
        if op != "quant.quantize_4bit":
            return None

        def quantize(x, blocksize=64, quant_type="nf4", double_quant=False, **kw):
            if quant_type != "nf4":
                raise NotImplementedError(f"quant_type {quant_type!r}")
            return Q.quantize_4bit(x, blocksize, quant_type, double_quant, **kw)

        return quantize


def test_supports_draws_only_supported_inputs_and_the_verdict_says_declared_domain_only():
    res = run(Nf4Only(), "quant.quantize_4bit", examples=15)
    assert res.ok, report.failures_text(res)
    props = [r for r in res.results if r.tier == "properties" and r.status == PASS]
    assert props and props[0].n_cases == 15  # every drawn example was an NF4 case (none wasted on FP4)
    assert res.verdict_scope == "declared domain"
    assert any("quant_type='fp4'" in why for why in res.out_of_scope["quant.quantize_4bit"])
    line = report.table(res).splitlines()[-1]
    assert "CONFORMS on the target's declared domain only" in line and "quant.quantize_4bit" in line
    assert report.to_json(res)["verdict_scope"] == "declared domain"


class WholeBlocks1D(Nf4Only):
    """NF4 of 1-D tensors of whole blocks only: an attribute key (``x.ndim``) and a finer ``unsupported`` rule."""

    name = "whole-blocks-1d"

    def supports(self, op):
        return {"quant_type": {"nf4"}, "x.ndim": {1}}

    def unsupported(self, op, case):
        x = case.get("x")
        return "tail block" if isinstance(x, np.ndarray) and x.size % case.get("blocksize", 64) else None


def test_properties_draw_inside_attribute_keys_and_unsupported_rules():
    res = run(WholeBlocks1D(), "quant.quantize_4bit", tiers=["properties"], examples=10)
    assert res.ok, report.failures_text(res)
    props = [r for r in res.results if r.tier == "properties"]
    assert [r.n_cases for r in props if r.status == PASS] == [10]  # all drawn inside: none skipped
    scope = " ".join(res.out_of_scope["quant.quantize_4bit"])
    assert "x.ndim in {1}" in scope and "drawn again: tail block" in scope


def test_a_run_that_excluded_nothing_has_the_full_scope():
    res = run("numpy", "lora.delta", examples=3)
    assert res.ok and res.verdict_scope == "full" and "declared domain" not in report.table(res)


# ---------------------------------------------------------------------------- compute dtype and profile


def _module(tmp_path: Path, name: str, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)


F32_FORWARD = """
    import numpy as np

    def forward(x, W, A, B, scaling, *, bias=None, dropout_mask=None, dropout_p=0.0, fan_in_fan_out=False):
        x, W, A, B = (np.asarray(t, np.float32) for t in (x, W, A, B))
        if fan_in_fan_out:
            W = W.T
        xd = x if dropout_mask is None else x * np.asarray(dropout_mask, np.float32) / np.float32(1 - dropout_p)
        y = x @ W.T + np.float32(scaling) * ((xd @ A.T) @ B.T)
        return y if bias is None else y + np.asarray(bias, np.float32)

    TARGET = {"lora.forward": forward}
"""


def test_compute_dtype_option_makes_a_correct_float32_target_conform(tmp_path, monkeypatch, capsys):
    _module(tmp_path, "f32_lora", F32_FORWARD, monkeypatch)
    args = [
        "conform",
        "--target",
        "f32_lora:TARGET",
        "--ops",
        "lora.forward",
        "--examples",
        "10",
        "--tiers",
        "names,shapes,golden,boundary,properties",
        "-q",
    ]
    assert cli.main(args) == 1  # judged against float64's bounds
    assert "error/bound" in capsys.readouterr().out
    assert cli.main([*args, "--compute-dtype", "float32"]) == 0
    assert "CONFORMS" in capsys.readouterr().out
    assert cli.main(["conform", "--target", "numpy", "--ops", "lora.delta", "--compute-dtype", "float32"]) == 2
    assert "built-in" in capsys.readouterr().err


def test_profile_option_reaches_reference_and_target_alike(tmp_path, monkeypatch, capsys):
    _module(
        tmp_path,
        "cpu_quant",
        """
        import refimpl.quant as Q

        def quantize_4bit(x, blocksize=64, quant_type="nf4", double_quant=False, *, profile="reference", **kw):
            assert profile == "bitsandbytes-cpu", profile  # this kernel follows bitsandbytes' CPU rules only
            return Q.quantize_4bit(x, blocksize, quant_type, double_quant, profile=profile, **kw)

        TARGET = {"quant.quantize_4bit": quantize_4bit}
    """,
        monkeypatch,
    )
    args = ["conform", "--target", "cpu_quant:TARGET", "--ops", "quant.quantize_4bit", "--examples", "5", "-q"]
    assert cli.main([*args, "--profile", "bitsandbytes-cpu"]) == 0, capsys.readouterr().out[-3000:]
    capsys.readouterr()
    assert cli.main(args) == 1
    capsys.readouterr()
    assert cli.main([*args, "--profile", "no-such-profile"]) == 2
    assert "profile" in capsys.readouterr().err


# ---------------------------------------------------------------------------- golden vectors and labels under options


def test_golden_vectors_run_where_the_options_match_them_and_labels_name_what_ran():
    t = NamespaceTarget(
        "opts",
        {"quant.quantize_4bit": Q.quantize_4bit, "lora.forward": L.forward},
        options={"quant.*": {"quant_type": "nf4"}, "lora.*": {"fan_in_fan_out": False}},
    )
    res = run(t, "quant.quantize_4bit,lora.forward", examples=5, isolate=False)
    assert res.ok, report.failures_text(res)
    for op in ("quant.quantize_4bit", "lora.forward"):
        golden = [r for r in res.results if r.op == op and r.tier == "golden"]
        assert any(r.status == PASS for r in golden), golden
        assert all(r.status in (PASS, UNSUPPORTED) for r in golden)
    held = [r for r in res.results if r.tier == "golden" and r.status == UNSUPPORTED and r.op.startswith("quant")]
    assert held and all("fp4" in r.label and "quant_type='nf4'" in r.message for r in held)
    # a special case drawn as FP4 ran as NF4: its label says so
    fp4 = [r for r in res.results if r.tier == "special" and r.label.startswith("fp4:")]
    assert fp4 and all("[ran with quant_type='nf4' from the target's options]" in r.label for r in fp4)


# ---------------------------------------------------------------------------- failures: all shown, grouped, small


def _zero_forward(x, W, A, B, scaling, **kw):
    return np.zeros((*np.asarray(x).shape[:-1], np.asarray(W).shape[1 if kw.get("fan_in_fan_out") else 0]))


def test_every_distinct_failure_is_shown_grouped_by_cause():
    res = run(NamespaceTarget("zeros", {"lora.forward": _zero_forward}), "lora.forward", examples=5)
    assert len(res.failures) > 20
    text = report.failures_text(res)
    assert "more failures" not in text and "more distinct failures" not in text
    groups = report.failure_groups(res)
    assert text.count("--- FAIL ") == len(groups) < len(res.failures)
    for r in res.failures:  # every failing case is named in its group
        assert f"{r.tier}: {r.label}" in text


class FlipsLargeBlocks:
    """Planted bug: the first packed byte is wrong whenever some |x| > 3."""

    name = "flips"

    def lookup(self, op):
        if op != "quant.quantize_4bit":
            return None

        def quantize(x, *args, **kw):
            packed, state = Q.quantize_4bit(x, *args, **kw)
            if np.nanmax(np.abs(np.asarray(x, np.float32))) > 3:
                packed = packed.copy()
                packed.reshape(-1)[0] ^= 1
            return packed, state

        return quantize


def test_shrinking_reduces_the_shapes_of_a_failing_case():
    res = run(FlipsLargeBlocks(), "quant.quantize_4bit", examples=40, tiers=("names", "properties"))
    fail = next(r for r in res.failures if r.tier == "properties")
    ns: dict = {}
    exec(compile(fail.snippet, "<snippet>", "exec"), ns)
    assert ns["x"].size <= 2, ns["x"].shape  # one element above 3 is all the bug needs
    assert not np.array_equal(ns["expected"][0], ns["actual"][0])


def test_shape_shrinking_cuts_a_large_failing_case_that_hypothesis_left_large():
    from refimpl.conformance.runner import _Checker
    from refimpl.conformance.table import op_table

    target = FlipsLargeBlocks()
    chk = _Checker(
        op_table()["quant.quantize_4bit"], target, target.lookup("quant.quantize_4bit"), [], lambda tier, label: None
    )
    x = np.random.default_rng(0).uniform(-1, 1, (3, 300)).astype(np.float32)
    x[2, 277] = 3.5  # the one value the bug needs, deep inside a large case
    case = {"x": x, "blocksize": 64, "quant_type": "nf4", "double_quant": True}
    found = chk.failure(case)
    assert found is not None
    small, (message, _) = chk.smaller(case, found)
    assert small["x"].size == 1 and small["x"][(0,) * small["x"].ndim] == np.float32(3.5), small["x"]
    assert "differ" in message and small["blocksize"] == 64  # values that are not arrays stay as they were


# ---------------------------------------------------------------------------- snippets and literals


class WrongScaling:
    """A Target class: lora.scaling ignores r."""

    name = "wrong-scaling"

    def lookup(self, op):
        return (lambda alpha, r, use_rslora=False: float(alpha)) if op == "lora.scaling" else None


WRONG = {"lora.scaling": lambda alpha, r, use_rslora=False: float(alpha)}


@pytest.mark.parametrize(
    "target",
    ["tests.test_conformance_contract:WrongScaling", "tests.test_conformance_contract:WRONG", WrongScaling()],
    ids=["class by name", "mapping by name", "instance"],
)
def test_a_snippet_runs_as_printed_for_every_kind_of_target(target):
    res = run(target, "lora.scaling", examples=10, tiers=("names", "properties"))
    fail = res.failures[0]
    ns: dict = {}
    exec(compile(fail.snippet, "<snippet>", "exec"), ns)
    assert not isinstance(ns["actual"], Exception), ns["actual"]
    assert ns["actual"] == ns["alpha"] != ns["expected"]


def test_a_quant_state_prints_as_its_constructor_call():
    x = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    _, state = Q.quantize_4bit(x, 64, "nf4", True)
    src = literal(state)
    assert src.startswith("refimpl.quant.QuantState(shape=(300,), dtype='float32', blocksize=64, quant_type='nf4'")
    assert "codebook('nf4')" in src and "codebook('dynamic8')" in src and "from_bnb_dict" not in src
    ns: dict = {}
    exec(
        compile(
            f"import numpy as np\nimport refimpl.quant\nimport refimpl.quant.codebooks\nv = {src}", "<lit>", "exec"
        ),
        ns,
    )
    got = ns["v"]
    for f in dataclasses.fields(state):
        a, b = getattr(got, f.name), getattr(state, f.name)
        assert np.array_equal(a, b) if isinstance(b, np.ndarray) else a == b, f.name


def test_a_special_case_snippet_runs_where_the_reference_raises():
    res = run(
        NamespaceTarget("tests.test_conformance_contract:WRONG", WRONG),
        "lora.scaling",
        examples=3,
        tiers=("names", "special"),
    )
    fail = next(r for r in res.failures if r.tier == "special")
    ns: dict = {}
    exec(compile(fail.snippet, "<snippet>", "exec"), ns)
    assert isinstance(ns["expected"], (ValueError, TypeError))


# ---------------------------------------------------------------------------- adapters


def test_torch_target_converts_arrays_bf16_grad_and_quant_state_both_ways():
    torch = pytest.importorskip("torch")
    from refimpl.conformance.adapters import DeviceQuantState, torch_target

    seen = {}

    def forward(x, W, state):
        seen.update(x=x, W=W, state=state)
        y = x.float() @ W.T
        return y, DeviceQuantState(
            shape=tuple(state.shape),
            dtype=torch.float32,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            absmax=state.absmax,
            code=state.code,
        )

    t = torch_target({"lora.forward": forward}, compute_dtype="float32", requires_grad=["W"])
    x = np.ones((2, 3)).astype(ml_dtypes.bfloat16)
    W = np.arange(12, dtype=np.float64).reshape(4, 3)
    _, state = Q.quantize_4bit(np.linspace(-1, 1, 64).astype(np.float32), 64, "nf4")
    y, back = t.lookup("lora.forward")(x=x, W=W, state=state)
    assert seen["x"].dtype == torch.bfloat16 and not seen["x"].requires_grad
    assert seen["W"].dtype == torch.float32 and seen["W"].requires_grad  # float64 given in the compute dtype
    assert isinstance(seen["state"], DeviceQuantState) and isinstance(seen["state"].absmax, torch.Tensor)
    assert isinstance(y, np.ndarray) and np.array_equal(y, np.ones((2, 3)) @ W.T)  # result required grad
    assert isinstance(back, Q.QuantState) and back.dtype == "float32"
    assert np.array_equal(back.absmax, state.absmax) and np.array_equal(back.code, state.code)
    assert t.compute_dtype("lora.forward") == "float32" and t.fork_safe
    with pytest.raises(ValueError, match="compute_dtype"):
        torch_target({"lora.forward": forward}, compute_dtype="float8")


# ---------------------------------------------------------------------------- pytest plugin


def test_pytest_item_that_mixes_pass_and_xfail_is_reported_xfail(tmp_path):
    (tmp_path / "lax_target.py").write_text(
        textwrap.dedent("""
        import numpy as np
        import refimpl.lora as L

        def delta(A, B, scaling, *, fan_in_fan_out=False):
            A = np.nan_to_num(np.asarray(A, np.float64), nan=0.0)  # swallows NaN in A instead of raising
            return L.delta(A, B, scaling, fan_in_fan_out=fan_in_fan_out)

        TARGET = {"lora.delta": delta}
    """),
        encoding="utf-8",
    )
    (tmp_path / "lax.toml").write_text(
        textwrap.dedent("""
        [[divergence]]
        op = "lora.delta"
        target = "lax_target:TARGET"
        tier = "special"
        case = "A has nan"
        reason = "NaN in A is read as 0"
        upstream = "by design"
    """),
        encoding="utf-8",
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:xdist",
        "--rootdir",
        str(tmp_path),
        "--refimpl-target=lax_target:TARGET",
        "--refimpl-ops=lora.delta",
        "--refimpl-examples=3",
        f"--refimpl-divergences={tmp_path / 'lax.toml'}",
        "-rxX",
        "-k",
        "special",
        str(tmp_path),
    ]
    import importlib.metadata

    if not any(
        ep.value.startswith("refimpl.conformance.pytest_plugin")
        for ep in importlib.metadata.entry_points(group="pytest11")
    ):
        cmd[3:3] = ["-p", "refimpl.conformance.pytest_plugin"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300).stdout
    assert "1 xfailed" in out and "passed" not in out.splitlines()[-1], out[-2000:]
    assert "other case(s) passed" in out, out[-2000:]


def test_results_statuses_are_those_the_report_knows():
    assert {PASS, FAIL, XFAIL, UNSUPPORTED} <= set(report._MARK)


class _Boxed:
    """An array of another library, seen only through DLPack (as CuPy or JAX arrays are)."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_array_target_runs_any_dlpack_library_and_conforms():
    from refimpl.conformance.adapters import ArrayTarget

    def delta(A, B, scaling, *, fan_in_fan_out=False):
        assert isinstance(A, _Boxed) and isinstance(B, _Boxed)
        return _Boxed(
            np.ascontiguousarray(L.delta(np.from_dlpack(A), np.from_dlpack(B), scaling, fan_in_fan_out=fan_in_fan_out))
        )

    # NumPy's DLPack has no bfloat16 (ml_dtypes): the target declares the float dtypes it takes
    t = ArrayTarget(
        {"lora.delta": delta},
        lambda a, op: _Boxed(a),
        name="boxed",
        supports={"lora.*": {"dtypes": {"float16", "float32", "float64"}}},
    )
    res = run(t, "lora.delta", examples=10, tiers=("names", "shapes", "golden", "boundary", "properties"))
    assert res.ok, report.failures_text(res)
    assert res.verdict_scope == "declared domain" and "bfloat16" in str(res.out_of_scope)
