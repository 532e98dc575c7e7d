"""Reports of a conformance run: a terminal table, JSON and JUnit XML."""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refimpl.conformance.results import (
    ABSENT,
    CONFORMS,
    FAIL,
    FAILS,
    INCOMPLETE,
    NA,
    PASS,
    SKIP,
    UNSUPPORTED,
    XFAIL,
    CaseResult,
    RunResult,
)
from refimpl.conformance.table import TIERS

_MARK = {
    "pass": "ok",
    "fail": "FAIL",
    "xfail": "xfail",
    "skip": "SKIP",
    "absent": "absent",
    "n/a": "n/a",
    "unsupported": "unsup",
    "-": "-",
}
_VERDICT_NOTE = {
    CONFORMS: "",
    FAILS: "",
    INCOMPLETE: " (a selected tier did not run or a class was never hit; see the gaps above)",
    "NOTHING CHECKED": " (the target provides none of the selected ops)",
}


def table(res: RunResult) -> str:
    """One row per op, one column per tier, plus the worst error / bound over all tiers."""
    tiers = [t for t in TIERS if t in res.settings.get("tiers", TIERS)]
    head = ["op", *tiers, "worst err/bound", "cases"]
    rows = []
    absent = [op for op in res.ops() if res.cell(op, "names")[0] == "absent"]
    for op in res.ops():
        if op in absent:
            continue
        cells, worst, n = [], None, 0
        for t in tiers:
            status, ratio, count = res.cell(op, t)
            cells.append(_MARK.get(status, status))
            n += count
            if ratio is not None:
                worst = ratio if worst is None else max(worst, ratio)
        rows.append([op, *cells, "-" if worst is None else f"{worst:.3g}", str(n)])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    if absent:
        lines.append(f"not provided by {res.target} ({len(absent)}): " + ", ".join(absent))
    n_fail = len(res.failures)
    n_xfail = sum(r.status == XFAIL for r in res.results)
    n_pass = sum(r.status == PASS for r in res.results)
    for note in res.notes:
        lines.append(f"note: {note}")
    gaps = res.gaps
    if gaps:
        lines.append(f"gaps ({len(gaps)}): the run cannot vouch for these")
        lines += [f"  {g}" for g in gaps[:40]]
        if len(gaps) > 40:
            lines.append(f"  ... and {len(gaps) - 40} more (see the JSON report)")
    n_classes = sum(len(h) for h in res.coverage.values())
    n_hit = sum(1 for h in res.coverage.values() for v in h.values() if v > 0)
    n_out = sum(1 for h in res.coverage.values() for v in h.values() if v < 0)
    outside: dict[str, int] = {}
    for r in res.results:
        if r.status == UNSUPPORTED:
            outside[r.op] = outside.get(r.op, 0) + max(1, r.n_cases)
    if outside:
        lines.append(
            "not run, outside the target's declared domain: "
            + ", ".join(f"{op} ({n} case{'s' if n != 1 else ''})" for op, n in outside.items())
            + (f"; {n_out} classes reached only there" if n_out else "")
        )
    for op, whys in res.out_of_scope.items():
        lines += [f"  {op}: {why}" for why in whys[:6]] + (
            [f"  {op}: ... and {len(whys) - 6} more reasons"] if len(whys) > 6 else []
        )
    lines.append("")
    subset = [t for t in TIERS if t not in res.settings.get("tiers", TIERS)]
    limits = []
    if res.verdict_scope != "full":  # never a plain CONFORMS when part of an op's domain was not run
        limits.append(
            "on the target's declared domain only (not the full domain of " + ", ".join(res.out_of_scope) + ")"
        )
    if subset:
        limits.append(f"on tiers {', '.join(res.settings['tiers'])} only")
    scope = (" " + ", ".join(limits)) if limits else ""
    lines.append(
        f"target {res.target}: {res.verdict}{scope}{_VERDICT_NOTE.get(res.verdict, '')} — {n_pass} passed, "
        f"{n_fail} failed, {n_xfail} known divergences; {n_hit} of {n_classes} equivalence classes hit; "
        f"in {res.seconds:.1f} s"
    )
    return "\n".join(lines)


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|\bnan\b|\binf\b")


def cause(message: str) -> str:
    """A failure's message with its numbers replaced by '#': failures that differ only in values, indices or
    shapes share a cause."""
    return _NUMBER.sub("#", message.splitlines()[0] if message else "")


def failure_groups(res: RunResult) -> list[tuple[str, str, list[CaseResult]]]:
    """Every failure, grouped by (op, cause, code path), in the order first seen. The code path (``path``: the
    options, flags and input dtypes of the case) keeps apart failures whose messages differ only in numbers but
    whose inputs took another branch (``dtype='float8_e4m3fn', safe=True`` vs ``safe=False``)."""
    groups: dict[tuple[str, str, str], list[CaseResult]] = {}
    for r in res.failures:
        groups.setdefault((r.op, cause(r.message), r.path), []).append(r)
    return [(op, c, rs) for (op, c, _), rs in groups.items()]


def representative(rs: list[CaseResult]) -> CaseResult:
    """The group's smallest case (the shortest snippet; one without a snippet only where none has one): the
    group's header message, label and snippet all come from it."""
    return min(rs, key=lambda r: (not r.snippet, len(r.snippet)))


def failures_text(res: RunResult, limit: int | None = None, labels: int = 12) -> str:
    """Every distinct failure (grouped by op, cause and code path), each with its cases and the message and
    paste-able snippet of its smallest one; ``limit`` caps the number of groups shown (default: all)."""
    groups = failure_groups(res)
    out = [
        f"{len(res.failures)} failing case(s) in {len(groups)} distinct failure(s), grouped by op, cause and code path"
    ]
    for op, _, rs in groups[:limit]:
        rep = representative(rs)
        names = [f"{r.tier}: {r.label}" for r in rs]
        shown = ", ".join(names[:labels]) + (f", and {len(names) - labels} more" if len(names) > labels else "")
        path = f" [{rep.path}]" if rep.path else ""
        out.append(
            f"--- FAIL {op}{path} ({len(rs)} case{'s' if len(rs) != 1 else ''}: {shown})\n"
            f"[{rep.tier}: {rep.label}] {rep.message}"
        )
        if rep.snippet:
            out.append(f"reproduce [{rep.tier}: {rep.label}] with:\n" + rep.snippet)
    if limit is not None and len(groups) > limit:
        out.append(f"... and {len(groups) - limit} more distinct failures (see the JSON report)")
    return "\n".join(out)


def divergences_text(res: RunResult) -> str:
    counts: dict[str, int] = {}
    for r in res.results:
        if r.status == XFAIL:
            counts[r.divergence] = counts.get(r.divergence, 0) + max(1, r.n_cases)
    return "\n".join(f"known divergence ({n} case{'s' if n != 1 else ''}): {d}" for d, n in counts.items())


def coverage_text(res: RunResult) -> str:
    """Equivalence classes × boundary cases that hit them, per op."""
    lines = ["coverage: equivalence classes hit by the boundary tier"]
    for op, hits in res.coverage.items():
        n_hit = sum(1 for v in hits.values() if v > 0)
        lines.append(f"{op}: {n_hit} of {len(hits)} classes hit")
        lines += [
            f"  {'hit ' if v > 0 else 'out ' if v < 0 else 'MISS'} {max(v, 0):>3}  {c}"
            + ("  (only cases outside the target's declared domain)" if v < 0 else "")
            for c, v in hits.items()
        ]
    return "\n".join(lines)


def terminal(res: RunResult, *, coverage: bool = False) -> str:
    parts = [coverage_text(res)] if coverage else []
    parts.append(table(res))
    if res.failures:
        parts.append(failures_text(res))
    div = divergences_text(res)
    if div:
        parts.append(div)
    for w in res.warnings:
        parts.append(f"warning: {w}")
    return "\n\n".join(parts)


#: Version of the JSON report's layout (docs/report.md); bumped on any change a reader must know about.
JSON_SCHEMA_VERSION = "2"


def versions() -> dict[str, str | None]:
    """refimpl, spec, Python, numpy and peer versions (None where a package is not installed)."""
    import importlib.metadata
    import platform

    import numpy as np

    import refimpl

    out: dict[str, str | None] = {
        "refimpl": refimpl.__version__,
        "spec": refimpl.SPEC_VERSION,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    for dist in ("numba", "torch", "peft", "bitsandbytes", "mergekit", "hypothesis", "cupy-cuda13x"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def to_json(res: RunResult) -> dict[str, Any]:
    """The JSON report (layout: docs/report.md)."""
    return {"schema_version": JSON_SCHEMA_VERSION, "versions": versions(), **res.to_dict()}


def write_json(res: RunResult, path: str | Path) -> None:
    text = json.dumps(to_json(res), indent=1, default=str) + "\n"
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _junit_time(seconds: float) -> str:
    return f"{max(0.0, seconds):.3f}"


def write_junit(res: RunResult, path: str | Path) -> None:
    """JUnit XML (Jenkins junit-10 layout): one testsuite per op, one testcase per op × tier.

    A testcase fails when any of its cases failed (each failure is one <failure> with its snippet), is
    skipped when the tier did not apply, and passes otherwise; known divergences are listed in its
    system-out. A tier that should have run and did not is an <error>: the run cannot vouch for it.
    """
    tiers = [t for t in TIERS if t in res.settings.get("tiers", TIERS)]
    root = ET.Element("testsuites", name=f"refimpl conform --target {res.target}", time=_junit_time(res.seconds))
    n_tests = n_fail = n_err = 0
    for op in res.ops():
        suite = ET.SubElement(root, "testsuite", name=f"{res.target}.{op}")
        s_tests = s_fail = s_err = s_skip = 0
        for tier in tiers:
            rs = [r for r in res.results if r.op == op and r.tier == tier]
            if not rs:
                continue
            s_tests += 1
            tc = ET.SubElement(
                suite,
                "testcase",
                classname=f"refimpl.{res.target}.{op}",
                name=f"{op} {tier}",
                time=_junit_time(sum(r.seconds for r in rs)),
            )
            fails = [r for r in rs if r.status == FAIL]
            skipped = [r for r in rs if r.status == SKIP]
            for r in fails:
                f = ET.SubElement(tc, "failure", type="mismatch", message=f"{r.label}: {r.message}"[:500])
                f.text = f"[{r.label}] {r.message}" + ("\n\nreproduce with:\n" + r.snippet if r.snippet else "")
            for r in skipped:
                ET.SubElement(tc, "error", type="not run", message=f"{r.label}: did not run: {r.message}"[:500])
            if not fails and not skipped and all(r.status in (NA, ABSENT, UNSUPPORTED) for r in rs):
                ET.SubElement(tc, "skipped", message=rs[0].message[:500])
                s_skip += 1
            lines = [
                f"{r.status:<6} {r.label}: {r.message}"
                + (f" [known divergence: {r.divergence}]" if r.status == XFAIL else "")
                for r in rs
            ]
            ET.SubElement(tc, "system-out").text = "\n".join(lines)
            s_fail += bool(fails)
            s_err += bool(skipped) and not fails
        suite.set("tests", str(s_tests))
        suite.set("failures", str(s_fail))
        suite.set("errors", str(s_err))
        suite.set("skipped", str(s_skip))
        suite.set("time", _junit_time(sum(r.seconds for r in res.results if r.op == op)))
        n_tests, n_fail, n_err = n_tests + s_tests, n_fail + s_fail, n_err + s_err
    root.set("tests", str(n_tests))
    root.set("failures", str(n_fail))
    root.set("errors", str(n_err))
    _atomic_write(path, lambda p: ET.ElementTree(root).write(p, encoding="utf-8", xml_declaration=True))


__all__ = [
    "JSON_SCHEMA_VERSION",
    "SKIP",
    "coverage_text",
    "divergences_text",
    "failures_text",
    "table",
    "terminal",
    "to_json",
    "versions",
    "write_json",
    "write_junit",
]
