"""What a first-time target author met (issue 15, second pass): positional calls get a message that names the
convention; failures are grouped by code path as well as message, each group told by one case; failing boundary
cases are printed shrunk; a divergence model that runs the target's own code is not applied."""

from __future__ import annotations

import re

import numpy as np
import pytest

import refimpl.lora as L
from refimpl.conformance import report, run
from refimpl.conformance.results import FAIL, XFAIL, CaseResult, RunResult
from refimpl.conformance.targets import NamespaceTarget

# ---------------------------------------------------------------------------- keyword-only calls


def test_an_adapter_called_positionally_says_targets_take_keyword_arguments_named_like_the_reference():
    from refimpl.conformance.adapters import ArrayTarget

    t = ArrayTarget(
        {"lora.delta": lambda A, B, scaling, fan_in_fan_out=False: scaling * (B @ A)}, lambda a, op: a, name="np"
    )
    f = t.lookup("lora.delta")
    A, B = np.ones((1, 2)), np.ones((3, 1))
    with pytest.raises(TypeError, match="keyword arguments only, named like the reference's") as info:
        f(A, B, 0.5)
    assert "refimpl.lora.delta(A, B, scaling, *, fan_in_fan_out=False)" in str(info.value)
    assert np.array_equal(f(A=A, B=B, scaling=0.5), L.delta(A, B, 0.5))


def test_torch_target_called_positionally_raises_the_same_type_error():
    pytest.importorskip("torch")
    from refimpl.conformance.adapters import torch_target

    f = torch_target({"lora.delta": lambda A, B, scaling, fan_in_fan_out=False: scaling * (B @ A)}).lookup("lora.delta")
    with pytest.raises(TypeError, match="keyword arguments only"):
        f(np.ones((1, 2)), np.ones((3, 1)), 0.5)


# ---------------------------------------------------------------------------- grouping


def _result(label: str, message: str, snippet: str, path: str = "dtype='bfloat16', safe=False") -> CaseResult:
    return CaseResult("lora.merge", "boundary", label, FAIL, message, n_cases=1, snippet=snippet, path=path)


def test_a_groups_header_message_label_and_snippet_come_from_its_smallest_case():
    big = _result("big", "out: error/bound = 9 at (3, 7)", "# big case\n" + "x" * 500)
    small = _result("small", "out: error/bound = 2 at (0, 0)", "# small case\nx")
    text = report.failures_text(RunResult("t", [big, small]))
    assert text.count("--- FAIL ") == 1
    assert "[boundary: small] out: error/bound = 2 at (0, 0)" in text
    assert "reproduce [boundary: small] with:\n# small case" in text
    assert "error/bound = 9" not in text and "# big case" not in text


def test_failures_whose_messages_differ_only_in_numbers_but_take_another_code_path_are_kept_apart():
    unsafe = _result("a", "out: error/bound = 3 at (0, 0)", "a", path="dtype='float8_e4m3fn', safe=False")
    safe = _result("b", "out: error/bound = 5 at (1, 0)", "b", path="dtype='float8_e4m3fn', safe=True")
    same = _result("c", "out: error/bound = 4 at (2, 0)", "c", path="dtype='float8_e4m3fn', safe=False")
    groups = report.failure_groups(RunResult("t", [unsafe, safe, same]))
    assert [[r.label for r in rs] for _, _, rs in groups] == [["a", "c"], ["b"]]


def _two_bugs(W, A, B, scaling, *, fan_in_fan_out=False, dtype=None, safe=False):
    """Planted bugs: the unsafe low-precision merge adds 0.01, the safe one 0.03 (different code, alike messages)."""
    out = L.merge(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, dtype=dtype, safe=safe)
    return out if dtype is None else out + (0.03 if safe else 0.01)


def test_a_run_separates_two_bugs_on_two_paths_and_each_group_reads_as_one_case():
    res = run(NamespaceTarget("two-bugs", {"lora.merge": _two_bugs}), "lora.merge", tiers=("names", "boundary"))
    assert res.failures
    for _, _, rs in report.failure_groups(res):
        assert len({"safe=True" in r.path for r in rs}) == 1, [r.label for r in rs]
    text = report.failures_text(res)
    for block in text.split("--- FAIL ")[1:]:
        header = block.splitlines()[1]  # "[tier: label] message" of the representative case
        label = re.match(r"\[(\w+): ([^\]]+)\]", header).group(2)
        assert f"reproduce [boundary: {label}] with:\n# boundary case {label}" in block


# ---------------------------------------------------------------------------- boundary cases shrunk


def _off_at_origin(W, A, B, scaling, *, fan_in_fan_out=False, dtype=None, safe=False):
    """Planted bug: the first element of the merged weight is off by 0.5."""
    out = L.merge(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, dtype=dtype, safe=safe).copy()
    out.reshape(-1)[0] += 0.5
    return out


_CALLS = {"n": 0}


def _counted_origin(**kw):
    _CALLS["n"] += 1
    return _off_at_origin(**kw)


ORIGIN = {"lora.merge": _counted_origin}


def test_a_failing_boundary_case_is_printed_shrunk_and_says_from_which_shape():
    from refimpl.conformance import runner

    _CALLS["n"] = 0
    target = "tests.test_conformance_usability:ORIGIN"
    res = run(target, "lora.merge", tiers=("names", "boundary"), isolate=False)
    boundary = [r for r in res.results if r.tier == "boundary"]
    fails = [r for r in boundary if r.status == FAIL]
    assert len(fails) == len(boundary)  # every case has an element at the origin
    assert _CALLS["n"] <= len(boundary) + runner.BOUNDARY_SHRINK_BUDGET  # shrinking is bounded
    shrunk = [r for r in fails if "shrunk from the boundary case's shapes" in r.snippet]
    assert shrunk
    big = next(r for r in shrunk if "(24, 40)" in r.snippet.splitlines()[0])
    ns: dict = {}
    exec(compile(big.snippet, "<snippet>", "exec"), ns)
    assert ns["W"].size <= 2, ns["W"].shape
    assert abs(ns["actual"].reshape(-1)[0] - ns["expected"].reshape(-1)[0]) == pytest.approx(0.5)
    assert "shrunk from the boundary case's shapes" in big.message  # the message tells the same (shrunk) case


# ---------------------------------------------------------------------------- models independent of the target


def _unsafe_off(W, A, B, scaling, *, fan_in_fan_out=False, dtype=None, safe=False):
    """Planted bug on one path: the unsafe low-precision merge adds 0.01."""
    out = L.merge(W, A, B, scaling, fan_in_fan_out=fan_in_fan_out, dtype=dtype, safe=safe)
    return out + 0.01 if dtype is not None and not safe else out


UNSAFE_OFF = {"lora.merge": _unsafe_off}


def calls_the_target(op, case, expected):
    """A model that is not one: it runs the target, so it would reproduce every bug of that path."""
    return {"out": _unsafe_off(**case)}


def independent(op, case, expected):
    """The declared difference computed from the reference's output alone."""
    if case.get("dtype") is None or case.get("safe"):
        return None
    return {"out": expected["out"] + 0.01}


def _divergence_file(tmp_path, model):
    path = tmp_path / "div.toml"
    path.write_text(
        "[[divergence]]\n"
        'op = "lora.merge"\n'
        'target = "tests.test_conformance_usability:UNSAFE_OFF"\n'
        'reason = "adds 0.01 on the unsafe path"\n'
        'upstream = "by design"\n'
        f'model = "tests.test_conformance_usability:{model}"\n',
        encoding="utf-8",
    )
    return str(path)


def test_a_model_that_runs_the_target_explains_nothing_and_the_report_says_why(tmp_path):
    target = "tests.test_conformance_usability:UNSAFE_OFF"
    res = run(
        target, "lora.merge", tiers=("names", "boundary"), divergences=[_divergence_file(tmp_path, "calls_the_target")]
    )
    assert res.failures and not any(r.status == XFAIL for r in res.results)
    assert all(
        "its model runs the target's own code (test_conformance_usability.py:_unsafe_off)" in r.message
        for r in res.failures
    )
    assert any("runs the target's own code, so it was not applied" in w for w in res.warnings)


def test_an_independent_model_still_turns_the_declared_difference_into_xfail(tmp_path):
    target = "tests.test_conformance_usability:UNSAFE_OFF"
    res = run(
        target, "lora.merge", tiers=("names", "boundary"), divergences=[_divergence_file(tmp_path, "independent")]
    )
    assert not res.failures, report.failures_text(res)
    assert any(r.status == XFAIL for r in res.results) and not res.warnings


# ---------------------------------------------------------------------------- --profile for merging targets


def test_profile_option_accepts_the_merging_profiles_and_reaches_the_merging_ops():
    from refimpl.conformance.targets import declare, known_profiles

    assert "merging" in known_profiles()["peft"]  # was quant-only: the merging profiles had moved
    t = declare(NamespaceTarget("m", {}), profile="mergekit")
    assert t.options("merging.ties") == {"profile": "mergekit"}
    assert t.options("merging.task_arithmetic") == {}  # an op without a profile parameter gets none


# ---------------------------------------------------------------------------- a tier that compared nothing


def _delta_plus(A, B, scaling, fan_in_fan_out=False):
    d = scaling * (np.asarray(B, dtype=np.float64) @ np.asarray(A, dtype=np.float64)) + 0.01
    return d.T if fan_in_fan_out else d


def every_case_plus(op, case, expected):
    """An independent model of ``_delta_plus``: the reference's output plus 0.01, on every case."""
    return {"out": expected["out"] + 0.01}


def test_a_properties_tier_whose_every_example_is_a_known_divergence_reads_xfail_not_pass(tmp_path):
    path = tmp_path / "div.toml"
    path.write_text(
        '[[divergence]]\nop = "lora.delta"\ntarget = "plus"\nreason = "adds 0.01"\nupstream = "by design"\n'
        'model = "tests.test_conformance_usability:every_case_plus"\n',
        encoding="utf-8",
    )
    res = run(
        NamespaceTarget("plus", {"lora.delta": _delta_plus}),
        "lora.delta",
        tiers=("properties",),
        divergences=[str(path)],
        isolate=False,
    )
    rows = [r for r in res.results if r.tier == "properties" and r.label == "differential"]
    assert not res.failures, report.failures_text(res)
    assert rows == [] or all(r.status != "pass" for r in rows)
    assert any(r.status == XFAIL and r.n_cases > 0 for r in res.results if r.tier == "properties")
    assert not any(r.status == "pass" and r.n_cases == 0 for r in res.results)


def test_a_properties_tier_that_ran_no_example_is_incomplete_not_a_pass():
    class NothingInDomain(NamespaceTarget):
        def unsupported(self, op, case):
            return "this target takes no input at all"

    res = run(NothingInDomain("nothing", {"lora.delta": L.delta}), "lora.delta", tiers=("properties",), isolate=False)
    props = [r for r in res.results if r.tier == "properties"]
    assert not any(r.status == "pass" for r in props), [(r.label, r.status, r.message) for r in props]
    assert res.verdict != "CONFORMS"


def test_a_golden_vector_that_options_override_says_so_in_one_line_naming_arrays_by_shape():
    class EvalOnly(NamespaceTarget):
        def options(self, op):
            return {"dropout_mask": None, "dropout_p": 0.0}

    res = run(EvalOnly("eval", {"lora.forward": L.forward}), "lora.forward", tiers=("golden",), isolate=False)
    skipped = [r for r in res.results if r.status == "unsupported"]
    assert skipped, "the dropout vectors should not run under eval-only options"
    for r in skipped:
        assert re.search(r"dropout_mask=<float64 array of shape \([\d, ]+\)>", r.message), r.message
        assert "\n" not in r.message and len(r.message) < 300
