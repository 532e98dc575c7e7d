"""The conformance runner: every selected op, tier by tier.

Tiers (``table.TIERS``), each only for ops that passed the tiers before it, so a
partial implementation sees root causes rather than a cascade:

1. ``names``      the target provides a callable for the op;
2. ``shapes``     on one small case, its result has the reference's outputs, shapes and dtype kinds;
3. ``golden``     it reproduces the golden vectors in spec/vectors (inputs stored exactly);
4. ``properties`` differential: on Hypothesis-drawn valid inputs it agrees with the reference
                  under the op's tolerance model; a failure is shrunk to the smallest input and
                  printed as a paste-able snippet;
5. ``special``    special values (NaN, ±inf, -0.0, zero factors, out-of-range options): it does
                  what the reference does, a result or a ValueError/TypeError.

Known divergences (``divergences.py``) turn a matching failure into ``xfail``.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refimpl.conformance import divergences as _div
from refimpl.conformance._values import flatten, snippet
from refimpl.conformance.table import TIERS, OpSpec, select
from refimpl.conformance.targets import Target, get_target
from refimpl.conformance.tolerance import Verdict, compare

PASS, FAIL, XFAIL, SKIP, ABSENT = "pass", "fail", "xfail", "skip", "absent"
DEFAULT_EXAMPLES = 25


@dataclass
class CaseResult:
    """One (op, tier, case) outcome."""

    op: str
    tier: str
    label: str
    status: str
    message: str = ""
    worst_ratio: float | None = None
    n_cases: int = 0
    snippet: str = ""
    divergence: str = ""
    seconds: float = 0.0
    classes: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    """Everything a run found; ``ok`` is the exit verdict."""

    target: str
    results: list[CaseResult]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == FAIL]

    @property
    def checked(self) -> bool:
        """Whether any case ran and passed (a target providing none of the selected ops checks nothing)."""
        return any(r.status == PASS and r.tier != "names" for r in self.results)

    @property
    def ok(self) -> bool:
        return not self.failures and self.checked

    def ops(self) -> list[str]:
        return list(dict.fromkeys(r.op for r in self.results))

    def cell(self, op: str, tier: str) -> tuple[str, float | None, int]:
        """Aggregated status of one op × tier: fail > xfail > pass > absent > skip; worst ratio; case count."""
        rs = [r for r in self.results if r.op == op and r.tier == tier]
        if not rs:
            return "-", None, 0
        order = [FAIL, XFAIL, PASS, ABSENT, SKIP]
        status = min((r.status for r in rs), key=order.index)
        # known divergences are excluded: the column shows how close the conforming cases are
        ratios = [r.worst_ratio for r in rs
                  if r.status in (PASS, FAIL) and r.worst_ratio is not None and np.isfinite(r.worst_ratio)]
        return status, (max(ratios) if ratios else None), sum(r.n_cases for r in rs)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "ok": self.ok, "seconds": round(self.seconds, 3),
                "settings": self.settings, "warnings": self.warnings,
                "results": [asdict(r) for r in self.results]}


class _Progress:
    def __init__(self, sink: Callable[[str], None] | None) -> None:
        self.sink = sink

    def __call__(self, msg: str) -> None:
        if self.sink is not None:
            self.sink(msg)


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _copy_case(case: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in case.items()}


def _options(target: Target, op: str) -> dict[str, Any]:
    fn = getattr(target, "options", None)
    return dict(fn(op)) if fn else {}


def _dtype(target: Target, op: str) -> str:
    fn = getattr(target, "compute_dtype", None)
    return fn(op) if fn else "float64"


def _kind(dt: np.dtype) -> str:
    if dt.kind == "f" or dt.name == "bfloat16":
        return "float"
    if dt.kind in "iu":
        return "integer"
    return {"b": "bool", "c": "complex"}.get(dt.kind, dt.kind)


class _Checker:
    def __init__(self, spec: OpSpec, target: Target, f: Callable[..., Any]) -> None:
        self.spec, self.target, self.f = spec, target, f
        self.ref = spec.reference()
        self.opts = _options(target, spec.name)
        self.dtype = _dtype(target, spec.name)

    def prepare(self, case: dict[str, Any]) -> dict[str, Any]:
        return {**case, **self.opts}

    def expected(self, case: dict[str, Any]) -> dict[str, np.ndarray]:
        return flatten(self.ref(**_copy_case(case)))

    def actual(self, case: dict[str, Any]) -> dict[str, np.ndarray]:
        return flatten(self.f(**_copy_case(case)))

    def snip(self, case: dict[str, Any], note: str) -> str:
        return snippet(self.spec.name, self.target.name, case, note)

    # -------------------------------------------------------------- tiers

    def shapes(self) -> CaseResult:
        case = self.prepare(self.spec.example())
        exp = self.expected(case)
        try:
            act = self.actual(case)
        except Exception as exc:
            return CaseResult(self.spec.name, "shapes", "example", FAIL, f"target raised {type(exc).__name__}: {exc}",
                              n_cases=1, snippet=self.snip(case, "the target raised on a valid input"))
        problems = []
        for name, e in exp.items():
            a = act.get(name)
            if a is None:
                problems.append(f"{name} missing (target returned {sorted(act) or 'nothing'})")
            elif a.shape != e.shape:
                problems.append(f"{name}: shape {a.shape}, expected {e.shape}")
            elif _kind(a.dtype) != _kind(e.dtype):
                problems.append(f"{name}: dtype {a.dtype} ({_kind(a.dtype)}), expected {_kind(e.dtype)} like {e.dtype}")
        if problems:
            return CaseResult(self.spec.name, "shapes", "example", FAIL, "; ".join(problems), n_cases=1,
                              snippet=self.snip(case, "; ".join(problems)))
        return CaseResult(self.spec.name, "shapes", "example", PASS, f"outputs {sorted(exp)}", n_cases=1)

    def golden(self, vectors_dir: Path | None) -> list[CaseResult]:
        from refimpl.conformance import vectors

        if self.opts:
            return [CaseResult(self.spec.name, "golden", "*", SKIP,
                               f"golden vectors hold the default profile; this target runs with {self.opts}")]
        try:
            cases = vectors.load_op(self.spec.name, vectors_dir)
        except FileNotFoundError as exc:
            return [CaseResult(self.spec.name, "golden", "*", SKIP, str(exc))]
        out = []
        for label, case, expected in cases:
            try:
                act = self.actual(case)
            except Exception as exc:
                out.append(CaseResult(self.spec.name, "golden", label, FAIL,
                                      f"target raised {type(exc).__name__}: {exc}", n_cases=1,
                                      snippet=self.snip(case, f"golden vector {label}")))
                continue
            v = compare(self.spec.tolerance, act, expected, case, self.dtype)
            out.append(CaseResult(self.spec.name, "golden", label, PASS if v.passed else FAIL, v.message,
                                  worst_ratio=v.worst_ratio, n_cases=1,
                                  snippet="" if v.passed else self.snip(case, f"golden vector {label}: {v.message}")))
        return out

    def boundary(self) -> list[CaseResult]:
        """Every boundary case of the row, expected from the reference in this run."""
        cases = self.spec.boundary() if self.spec.boundary else []
        if not cases:
            return [CaseResult(self.spec.name, "boundary", "*", SKIP, "no boundary cases for this op")]
        out = []
        for b in cases:
            case = self.prepare(b.case)
            try:
                exp = self.expected(case)
            except Exception as exc:
                out.append(CaseResult(self.spec.name, "boundary", b.label, FAIL,
                                      f"the reference rejected a boundary case (a table bug): "
                                      f"{type(exc).__name__}: {exc}", n_cases=1, classes=list(b.classes)))
                continue
            try:
                act = self.actual(case)
            except Exception as exc:
                out.append(CaseResult(self.spec.name, "boundary", b.label, FAIL,
                                      f"target raised {type(exc).__name__}: {exc}", n_cases=1,
                                      classes=list(b.classes), snippet=self.snip(case, f"boundary case {b.label}")))
                continue
            v = compare(self.spec.tolerance, act, exp, case, self.dtype)
            out.append(CaseResult(self.spec.name, "boundary", b.label, PASS if v.passed else FAIL, v.message,
                                  worst_ratio=v.worst_ratio, n_cases=1, classes=list(b.classes),
                                  snippet="" if v.passed else self.snip(case, f"boundary case {b.label}: "
                                                                              f"{v.message}")))
        return out

    def properties(self, examples: int) -> CaseResult:
        from hypothesis import HealthCheck, Verbosity, given, settings

        stats = {"n": 0, "worst": 0.0}
        failing: dict[str, Any] = {}

        @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                  verbosity=Verbosity.quiet, suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                  print_blob=False)
        @given(self.spec.strategy())
        def prop(drawn: dict[str, Any]) -> None:
            case = self.prepare(drawn)
            try:
                exp = self.expected(case)
            except Exception as exc:
                failing.update(case=case, msg=f"the reference rejected a generated case (a strategy bug): "
                                              f"{type(exc).__name__}: {exc}", ratio=None)
                raise
            try:
                act = self.actual(case)
            except Exception as exc:
                failing.update(case=case, msg=f"target raised {type(exc).__name__}: {exc}", ratio=None)
                raise AssertionError(failing["msg"]) from exc
            v: Verdict = compare(self.spec.tolerance, act, exp, case, self.dtype)
            stats["n"] += 1
            if not v.passed:
                failing.update(case=case, msg=v.message, ratio=v.worst_ratio)
                raise AssertionError(v.message)
            stats["worst"] = max(stats["worst"], v.worst_ratio)

        try:
            prop()
        except Exception as exc:
            if not failing:
                return CaseResult(self.spec.name, "properties", "differential", FAIL,
                                  f"{type(exc).__name__}: {exc}", n_cases=stats["n"])
            case = failing["case"]
            return CaseResult(self.spec.name, "properties", "differential", FAIL, failing["msg"],
                              worst_ratio=failing.get("ratio"), n_cases=stats["n"],
                              snippet=self.snip(case, "smallest failing input (shrunk): " + failing["msg"]))
        return CaseResult(self.spec.name, "properties", "differential", PASS,
                          f"{stats['n']} examples, worst error/bound {stats['worst']:.3g}"
                          if self.spec.tolerance.kind == "bounded" else f"{stats['n']} examples, bit-exact",
                          worst_ratio=stats["worst"], n_cases=stats["n"])

    def special(self) -> list[CaseResult]:
        out = []
        for sp in self.spec.specials() if self.spec.specials else []:
            case = self.prepare(sp.case)
            try:
                exp, ref_exc = self.expected(case), None
            except (ValueError, TypeError) as exc:
                exp, ref_exc = None, exc
            try:
                act, tgt_exc = self.actual(case), None
            except Exception as exc:
                act, tgt_exc = None, exc
            name = self.spec.name
            if ref_exc is not None:
                if isinstance(tgt_exc, (ValueError, TypeError)):
                    out.append(CaseResult(name, "special", sp.label, PASS, f"rejected: {type(tgt_exc).__name__}",
                                          n_cases=1))
                else:
                    got = "returned a result" if tgt_exc is None else f"raised {type(tgt_exc).__name__}: {tgt_exc}"
                    msg = f"the reference raises {type(ref_exc).__name__} ({ref_exc}); the target {got}"
                    out.append(CaseResult(name, "special", sp.label, FAIL, msg, n_cases=1,
                                          snippet=self.snip(case, f"special value '{sp.label}': {msg}")))
                continue
            if tgt_exc is not None:
                msg = f"the reference returns a result; the target raised {type(tgt_exc).__name__}: {tgt_exc}"
                out.append(CaseResult(name, "special", sp.label, FAIL, msg, n_cases=1,
                                      snippet=self.snip(case, f"special value '{sp.label}': {msg}")))
                continue
            v = compare(self.spec.tolerance, act, exp, case, self.dtype)
            out.append(CaseResult(name, "special", sp.label, PASS if v.passed else FAIL, v.message,
                                  worst_ratio=v.worst_ratio, n_cases=1,
                                  snippet="" if v.passed else self.snip(case, f"special value '{sp.label}': "
                                                                              f"{v.message}")))
        if not out:
            out.append(CaseResult(self.spec.name, "special", "*", SKIP, "no special values for this op"))
        return out


def run(target: str | Target = "auto", ops: str | Iterable[str] | None = None, *,
        examples: int = DEFAULT_EXAMPLES, tiers: Iterable[str] = TIERS,
        divergences: list[str | Path] | None = None, vectors_dir: str | Path | None = None,
        progress: Callable[[str], None] | None = None) -> RunResult:
    """Check ``target`` against the reference on the selected ops (globs, e.g. "quant.*").

    Returns a RunResult; ``result.ok`` is true when every case that is not a known
    divergence passed and at least one case was checked (absent ops and ops whose reference
    has not landed are skipped).
    """
    start = time.perf_counter()
    say = _Progress(progress)
    tgt = get_target(target)
    tiers = [t for t in TIERS if t in set(tiers)]
    specs = select(ops)
    if not specs:
        raise ValueError(f"ops: no op matches {ops!r}")
    divs = _div.load_all(divergences)
    vdir = Path(vectors_dir) if vectors_dir is not None else None
    results: list[CaseResult] = []
    blocked: dict[str, str] = {}
    checkers: dict[str, _Checker] = {}
    say(f"refimpl conform: target {tgt.name}, {len(specs)} ops, tiers {', '.join(tiers)}, {examples} examples")
    for spec in specs:
        why = spec.unavailable_reason()
        if why:
            blocked[spec.name] = why
    for tier in tiers:
        t0 = time.perf_counter()
        n_before = len(results)
        for spec in specs:
            if spec.name in blocked:
                results.append(CaseResult(spec.name, tier, "*", SKIP, blocked[spec.name]))
                continue
            if tier not in spec.tiers:
                results.append(CaseResult(spec.name, tier, "*", SKIP, "tier not applicable to this op"))
                continue
            t1 = time.perf_counter()
            if tier == "names":
                f = tgt.lookup(spec.name)
                if f is None:
                    blocked[spec.name] = f"target {tgt.name} does not provide {spec.name}"
                    results.append(CaseResult(spec.name, tier, "*", ABSENT, blocked[spec.name]))
                else:
                    checkers[spec.name] = _Checker(spec, tgt, f)
                    results.append(CaseResult(spec.name, tier, "*", PASS, "present", n_cases=1))
                continue
            chk = checkers[spec.name]
            if tier == "shapes":
                new = [chk.shapes()]
            elif tier == "golden":
                new = chk.golden(vdir)
            elif tier == "boundary":
                new = chk.boundary()
            elif tier == "properties":
                if progress:
                    say(f"  properties {spec.name} ...")
                new = [chk.properties(examples)]
            else:
                new = chk.special()
            for r in new:
                r.seconds = time.perf_counter() - t1
                if r.status == FAIL:
                    for d in divs:
                        if d.matches(spec.name, tgt.name, r.tier, r.label):
                            r.status, r.divergence = XFAIL, str(d)
                            break
            results.extend(new)
            if tier == "shapes" and any(r.status == FAIL for r in new):
                blocked[spec.name] = "shapes tier failed"
        tier_res = results[n_before:]
        counts = {s: sum(r.status == s for r in tier_res) for s in (PASS, FAIL, XFAIL, SKIP, ABSENT)}
        say(f"tier {tier:<10} " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
            + f"  ({time.perf_counter() - t0:.1f} s)")
    warnings = []
    ran = {s.name for s in specs if s.name not in blocked or blocked[s.name] == "shapes tier failed"}
    for d in divs:
        applicable = [op for op in ran if d.applies(op, tgt.name)]
        if applicable and not any(r.divergence == str(d) for r in results):
            warnings.append(f"known divergence matched nothing (fixed upstream, or a stale entry): {d} "
                            f"[{d.source}]")
    return RunResult(tgt.name, results, warnings, time.perf_counter() - start,
                     {"examples": examples, "tiers": tiers, "ops": [s.name for s in specs]})


def assert_conforms(target: str | Target, ops: str | Iterable[str] | None = None, **kwargs: Any) -> RunResult:
    """Run and raise AssertionError with the failures' snippets unless the target conforms."""
    res = run(target, ops, **kwargs)
    if not res.ok:
        from refimpl.conformance.report import failures_text

        raise AssertionError(failures_text(res))
    return res
