"""The conformance harness: the reference passes against itself, tiers, reports, divergences, snippets."""

from __future__ import annotations

import json
import re
import textwrap
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import refimpl.lora as lora
from refimpl.conformance import TIERS, get_target, op_table, report, run
from refimpl.conformance import divergences as div
from refimpl.conformance.runner import ABSENT, FAIL, NA, PASS, XFAIL
from refimpl.conformance.table import Special
from refimpl.conformance.targets import NamespaceTarget, ReferenceTarget
from refimpl.conformance.tolerance import Bounded, Exact


@pytest.fixture(scope="module")
def reference_run():
    return run("numpy", examples=10)


def test_reference_conforms_to_itself_on_every_op(reference_run):
    res = reference_run
    assert res.ok, report.failures_text(res)
    ran = {r.op for r in res.results if r.status == PASS}
    assert ran == set(op_table())
    assert all(r.status in (PASS, NA) for r in res.results), {r.status for r in res.results}
    n_prop = sum(r.n_cases for r in res.results if r.tier == "properties")
    print(f"\nreference vs itself: {len(ran)} ops, {n_prop} property examples, {res.seconds:.1f} s")


#: rows in the special tier without special values of their own, and why
NO_SPECIALS = {"qlora.dequantize_4bit": "a re-export of quant.dequantize_4bit, whose row holds the special values"}


def test_every_row_names_a_reference_a_domain_tolerance_golden_and_specials():
    rows = op_table()
    assert len(rows) >= 45
    for name, spec in rows.items():
        assert callable(spec.reference()), name  # a row naming a missing function fails here
        assert len(spec.domain.split()) >= 3, (name, spec.domain)
        assert isinstance(spec.tolerance, (Exact, Bounded)), name
        # a row whose inputs cannot be stored as tensors (a Generator, adapter objects) leaves out the golden tier
        assert (spec.golden is not None) == ("golden" in spec.tiers), name
        assert spec.boundary is not None and spec.classes, name
        assert set(spec.tiers) <= set(TIERS), name
        if "special" in spec.tiers and name not in NO_SPECIALS:
            specials = spec.specials() if spec.specials is not None else []
            assert specials and all(isinstance(s, Special) and s.label for s in specials), name


def test_every_row_with_the_golden_tier_has_committed_golden_vectors(reference_run):
    golden = {r.op for r in reference_run.results if r.tier == "golden" and r.status == PASS}
    expected = {n for n, s in op_table().items() if "golden" in s.tiers}
    assert golden == expected
    assert len(expected) >= 35


def test_missing_op_is_absent_and_blocks_later_tiers():
    res = run(NamespaceTarget("partial", {"lora.delta": lora.delta}), "lora.delta,lora.merge", examples=3)
    assert res.ok
    assert res.cell("lora.merge", "names")[0] == ABSENT
    assert all(res.cell("lora.merge", t)[0] == "-" for t in TIERS[1:])  # nothing to run, nothing to vouch for
    assert res.cell("lora.delta", "properties")[0] == PASS


def test_wrong_output_shape_fails_the_shapes_tier_and_stops_there():
    def transposed_delta(A, B, scaling, *, fan_in_fan_out=False):
        return lora.delta(A, B, scaling, fan_in_fan_out=not fan_in_fan_out)

    res = run(NamespaceTarget("t", {"lora.delta": transposed_delta}), "lora.delta", examples=3)
    assert not res.ok
    assert res.cell("lora.delta", "shapes")[0] == FAIL
    assert all(res.cell("lora.delta", t)[0] == NA for t in ("golden", "boundary", "properties", "special"))
    assert "shape" in res.failures[0].message


def test_integer_output_where_float_is_expected_fails_shapes():
    res = run(
        NamespaceTarget(
            "t",
            {
                "lora.delta": lambda A, B, scaling, fan_in_fan_out=False: lora.delta(
                    A, B, scaling, fan_in_fan_out=fan_in_fan_out
                ).astype(np.int64)
            },
        ),
        "lora.delta",
        examples=3,
    )
    assert res.cell("lora.delta", "shapes")[0] == FAIL
    assert "dtype" in res.failures[0].message


def test_float32_target_passes_under_float32_bounds_and_fails_under_float64():
    def f32_forward(x, W, A, B, scaling, **kw):
        c = lambda a: None if a is None else np.asarray(a, np.float32)  # noqa: E731
        kw = {k: (c(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        y = lora.forward(c(x), c(W), c(A), c(B), float(np.float32(scaling)), **kw)
        return y.astype(np.float32)

    ok = run(
        NamespaceTarget("f32", {"lora.forward": f32_forward}, compute_dtype="float32"),
        "lora.forward",
        examples=8,
        tiers=("names", "shapes", "properties"),
    )
    assert ok.ok, report.failures_text(ok)
    worst = ok.cell("lora.forward", "properties")[1]
    print(f"\nfloat32 target under float32 bounds: worst error/bound {worst:.3g}")
    assert 0 < worst <= 1
    strict = run(
        NamespaceTarget("f32", {"lora.forward": f32_forward}),
        "lora.forward",
        examples=8,
        tiers=("names", "shapes", "properties"),
    )
    assert not strict.ok


def test_failure_snippet_is_pasteable_and_reproduces_the_failure():
    res = run("tests.test_conformance:PLANTED", "lora.scaling", examples=20, tiers=("names", "properties"))
    fail = res.failures[0]
    ns: dict = {}
    exec(compile(fail.snippet, "<snippet>", "exec"), ns)
    assert ns["expected"] != ns["actual"]
    assert ns["r"] >= 2 and ns["alpha"] != 0


#: a user target given as module:object (used by the snippet test above)
PLANTED = {"lora.scaling": lambda alpha, r, use_rslora=False: float(alpha)}


def test_user_target_by_module_object_name_resolves():
    t = get_target("tests.test_conformance:PLANTED")
    assert t.lookup("lora.scaling")(alpha=4.0, r=2) == 4.0
    assert t.lookup("lora.forward") is None
    with pytest.raises(ValueError, match="target"):
        get_target("no_such_module_xyz:obj")
    with pytest.raises(ValueError, match="target"):
        get_target("bogus")
    with pytest.raises(TypeError, match="target"):
        get_target(42)


def test_run_rejects_a_glob_that_matches_no_op():
    with pytest.raises(ValueError, match="ops"):
        run("numpy", "nothing.*")


def test_json_and_junit_reports_describe_every_case(tmp_path):
    res = run(get_target("tests.test_conformance:PLANTED"), "lora.scaling", examples=5)
    report.write_json(res, tmp_path / "r.json")
    report.write_junit(res, tmp_path / "r.xml")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["ok"] is False and data["target"] == "tests.test_conformance:PLANTED"
    assert len(data["results"]) == len(res.results)
    root = ET.parse(tmp_path / "r.xml").getroot()
    failing_tiers = {(r.op, r.tier) for r in res.failures}
    assert int(root.get("failures")) == len(failing_tiers) > 0  # one testcase per op and tier
    failures = root.findall(".//failure")
    assert failures and "reproduce with" in failures[0].text
    assert "DOES NOT CONFORM" in report.table(res)


def _write(tmp_path, text):
    p = tmp_path / "div.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_known_divergence_marks_matching_failures_xfail_and_exits_ok(tmp_path):
    p = _write(
        tmp_path,
        """
        [[divergence]]
        op = "lora.scaling"
        target = "tests.test_conformance:PLANTED"
        reason = "planted: returns alpha"
        upstream = "test"
    """,
    )
    res = run("tests.test_conformance:PLANTED", "lora.scaling", examples=5, divergences=[p])
    assert res.ok
    assert any(r.status == XFAIL and "planted" in r.divergence for r in res.results)


def test_divergence_that_matches_nothing_warns(tmp_path):
    p = _write(
        tmp_path,
        """
        [[divergence]]
        op = "lora.forward"
        target = "numpy"
        tier = "special"
        reason = "stale entry"
        upstream = "none#0"
    """,
    )
    res = run("numpy", "lora.forward", examples=3, divergences=[p])
    assert res.ok
    assert any("matched nothing" in w and "stale entry" in w for w in res.warnings)


@pytest.mark.parametrize(
    "text, match",
    [
        ("[[divergence]]\nop = 'x'\ntarget = 'y'\nreason = 'r'\n", "upstream"),
        ("[[divergence]]\nop = 'x'\ntarget = 'y'\nreason = 'r'\nupstream = 'u'\ntier = 'bogus'\n", "tier"),
        ("divergence = 3\n", "divergence"),
        ("divergence = [1, 2]\n", "entry 0 must be a"),
        ("not toml [[[", "cannot read"),
    ],
)
def test_bad_divergence_files_are_rejected_with_the_reason(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        div.load(p)


def test_builtin_divergences_each_name_reason_and_upstream():
    entries = div.load(div.BUILTIN_FILE)
    assert entries
    for d in entries:
        assert (
            d.reason and d.upstream and d.target in ("peft", "bitsandbytes", "mergekit", "cupy", "torchao", "torchtune")
        )


def test_reference_target_finds_every_row():
    t = ReferenceTarget()
    for name, spec in op_table().items():
        assert t.lookup(name) is spec.reference(), name


def test_tiers_subset_runs_only_those_tiers():
    res = run("numpy", "lora.delta", examples=3, tiers=("names", "golden"))
    assert {r.tier for r in res.results} == {"names", "golden"}


def test_pytest_plugin_turns_each_op_and_tier_into_a_test_item(tmp_path):
    import importlib.metadata
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "planted_target.py").write_text(
        "import refimpl.lora as L\n"
        "TARGET = {'lora.scaling': lambda alpha, r, use_rslora=False: float(alpha), 'lora.delta': L.delta}\n"
    )
    registered = any(
        ep.value.startswith("refimpl.conformance.pytest_plugin")
        for ep in importlib.metadata.entry_points(group="pytest11")
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(tmp_path),
        "--refimpl-target=planted_target:TARGET",
        "--refimpl-ops=lora.scaling,lora.delta",
        "--refimpl-examples=5",
        str(tmp_path),
    ]
    if not registered:
        cmd[3:3] = ["-p", "refimpl.conformance.pytest_plugin"]
    env = {**__import__("os").environ, "PYTHONPATH": f"{root}{__import__('os').pathsep}{tmp_path}"}
    # under xdist (as CI suites run) each worker runs only its items' ops; the summary table still appears
    parallel = ["-n", "2", "--dist", "loadgroup"] if importlib.util.find_spec("xdist") else []
    proc = subprocess.run([*cmd, *parallel], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out[-2000:]
    assert "refimpl::planted_target:TARGET::lora.scaling::properties" in out
    assert "reproduce with:" in out and "refimpl conformance: planted_target:TARGET" in out
    failed = re.findall(r"^FAILED (\S+)", out, flags=re.M)
    assert len(failed) >= 3 and all("lora.scaling" in f for f in failed), failed
    assert "passed" in out
    # collection runs nothing: --collect-only lists one item per op and tier at once
    t0 = time.perf_counter()
    listed = subprocess.run(
        [*cmd, "--collect-only"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert time.perf_counter() - t0 < 30 and "12 tests collected" in listed.stdout, listed.stdout[-800:]
    assert listed.stdout.count("::refimpl::planted_target:TARGET::") == 12
    # -k selects items by op and tier; only the selected op runs
    sel = subprocess.run(
        [*cmd, "-k", "lora and delta and golden"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert sel.returncode == 0 and "1 passed, 11 deselected" in sel.stdout, sel.stdout[-800:]


def test_target_returning_torch_tensors_is_converted_through_dlpack():
    from tests._peers import require

    torch = require("torch")

    def torch_delta(A, B, scaling, *, fan_in_fan_out=False):
        # a float64 target (as declared): narrower inputs are widened exactly (torch.from_numpy has no bfloat16)
        A, B = (np.asarray(v, np.float64) for v in (A, B))
        d = scaling * (torch.from_numpy(B) @ torch.from_numpy(A))
        return d.T if fan_in_fan_out else d

    res = run(
        NamespaceTarget("torch-delta", {"lora.delta": torch_delta}),
        "lora.delta",
        examples=10,
        tiers=("names", "shapes", "golden", "properties"),
    )  # torch does not reject NaN: no special tier
    assert res.ok, report.failures_text(res)
    assert res.cell("lora.delta", "golden")[0] == PASS


def test_a_target_providing_none_of_the_selected_ops_does_not_pass():
    res = run(NamespaceTarget("empty", {}), "lora.*", examples=3)
    assert not res.failures and not res.ok
    assert "NOTHING CHECKED" in report.table(res)
