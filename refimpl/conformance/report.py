"""Reports of a conformance run: a terminal table, JSON and JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from refimpl.conformance.runner import FAIL, PASS, SKIP, XFAIL, RunResult
from refimpl.conformance.table import TIERS

_MARK = {"pass": "ok", "fail": "FAIL", "xfail": "xfail", "skip": "skip", "absent": "absent", "-": "-"}


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
    verdict = "CONFORMS" if res.ok else ("DOES NOT CONFORM" if res.failures else
                                         "NOTHING CHECKED (the target provides none of the selected ops)")
    lines.append("")
    lines.append(f"target {res.target}: {verdict} — {n_pass} passed, {n_fail} failed, "
                 f"{n_xfail} known divergences, in {res.seconds:.1f} s")
    return "\n".join(lines)


def failures_text(res: RunResult, limit: int = 20) -> str:
    """Each failure with its message and the paste-able snippet of its (shrunk) input."""
    out = []
    for r in res.failures[:limit]:
        out.append(f"--- FAIL {r.op} [{r.tier}: {r.label}]\n{r.message}")
        if r.snippet:
            out.append("reproduce with:\n" + r.snippet)
    if len(res.failures) > limit:
        out.append(f"... and {len(res.failures) - limit} more failures (see the JSON report)")
    return "\n".join(out)


def divergences_text(res: RunResult) -> str:
    seen = dict.fromkeys(r.divergence for r in res.results if r.status == XFAIL)
    return "\n".join(f"known divergence: {d}" for d in seen)


def terminal(res: RunResult) -> str:
    parts = [table(res)]
    if res.failures:
        parts.append(failures_text(res))
    div = divergences_text(res)
    if div:
        parts.append(div)
    for w in res.warnings:
        parts.append(f"warning: {w}")
    return "\n\n".join(parts)


def write_json(res: RunResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(res.to_dict(), indent=1, default=str) + "\n", encoding="utf-8")


def write_junit(res: RunResult, path: str | Path) -> None:
    """JUnit XML: one testsuite per tier, one testcase per op × case."""
    root = ET.Element("testsuites", name=f"refimpl conform --target {res.target}",
                      tests=str(len(res.results)), failures=str(len(res.failures)), time=f"{res.seconds:.3f}")
    for tier in res.settings.get("tiers", TIERS):
        rs = [r for r in res.results if r.tier == tier]
        suite = ET.SubElement(root, "testsuite", name=f"{res.target}.{tier}", tests=str(len(rs)),
                              failures=str(sum(r.status == FAIL for r in rs)),
                              skipped=str(sum(r.status not in (PASS, FAIL) for r in rs)),
                              time=f"{sum(r.seconds for r in rs):.3f}")
        for r in rs:
            tc = ET.SubElement(suite, "testcase", classname=f"{res.target}.{tier}.{r.op}", name=r.label,
                               time=f"{r.seconds:.3f}")
            if r.status == FAIL:
                f = ET.SubElement(tc, "failure", message=r.message[:500])
                f.text = r.message + ("\n\nreproduce with:\n" + r.snippet if r.snippet else "")
            elif r.status == XFAIL:
                ET.SubElement(tc, "skipped", message=f"known divergence: {r.divergence}")
            elif r.status != PASS:
                ET.SubElement(tc, "skipped", message=f"{r.status}: {r.message}")
            elif r.message:
                ET.SubElement(tc, "system-out").text = r.message
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


__all__ = ["SKIP", "divergences_text", "failures_text", "table", "terminal", "write_json", "write_junit"]
