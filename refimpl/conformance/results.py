"""What a conformance run found: case and run results, their statuses and the verdict constants.

The runner produces these records and the reports read them; both import them from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PASS, FAIL, XFAIL, SKIP, ABSENT, NA = "pass", "fail", "xfail", "skip", "absent", "n/a"
#: a case outside the domain the target declares (``supports(op)``, ``unsupported(op, case)``, or options that
#: replace a golden vector's inputs): not run, counted and reported
UNSUPPORTED = "unsupported"

CONFORMS, FAILS, INCOMPLETE, NOTHING = "CONFORMS", "DOES NOT CONFORM", "INCOMPLETE", "NOTHING CHECKED"
#: process exit codes of ``refimpl conform`` (2 is a usage or input error, 3 an internal error of refimpl)
EXIT_CODES = {CONFORMS: 0, FAILS: 1, INCOMPLETE: 4, NOTHING: 5}


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
    reproducer: str = ""
    #: the case's arguments that pick a code path (options, flags, input dtypes), e.g. "dtype='bfloat16', safe=True;
    #: float32 inputs": failures are grouped by it as well as by their message
    path: str = ""


@dataclass
class RunResult:
    """Everything a run found; ``verdict`` is the promise, ``ok`` whether it is CONFORMS."""

    target: str
    results: list[CaseResult]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    #: op -> declared equivalence class -> boundary cases that hit it in this run
    coverage: dict[str, dict[str, int]] = field(default_factory=dict)
    #: ops the target provides that have no row (so nothing checked them)
    unchecked: list[str] = field(default_factory=list)
    #: lines from the target (e.g. which code path of a peer ran)
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == FAIL]

    @property
    def checked(self) -> bool:
        """Whether any case ran and passed (a target providing none of the selected ops checks nothing)."""
        return any(r.status == PASS and r.tier != "names" for r in self.results)

    @property
    def gaps(self) -> list[str]:
        """Why the run is incomplete: skipped tiers of provided ops, classes never hit, unchecked ops."""
        out = [f"{r.op}: tier {r.tier} did not run ({r.message})" for r in self.results if r.status == SKIP]
        for op, hits in self.coverage.items():
            out += [f"{op}: class {c!r} was never hit" for c, n in hits.items() if n == 0]
        out += [f"{op}: provided by the target but has no row (unchecked)" for op in self.unchecked]
        return out

    @property
    def out_of_scope(self) -> dict[str, list[str]]:
        """op -> what was not run because the target declared it outside its domain (``supports``,
        ``unsupported``, or options that replace a golden vector's inputs)."""
        out: dict[str, list[str]] = {}
        for r in self.results:
            if r.status == UNSUPPORTED:
                out.setdefault(r.op, [])
                if r.message not in out[r.op]:
                    out[r.op].append(r.message)
        return out

    @property
    def verdict_scope(self) -> str:
        """ "declared domain" when part of some op's domain was not run (the verdict holds only there), else
        "full"."""
        return "declared domain" if self.out_of_scope else "full"

    @property
    def verdict(self) -> str:
        if self.failures:
            return FAILS
        if self.gaps:
            return INCOMPLETE
        if not self.checked:
            return NOTHING
        return CONFORMS

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    @property
    def ok(self) -> bool:
        return self.verdict == CONFORMS

    def ops(self) -> list[str]:
        return list(dict.fromkeys(r.op for r in self.results))

    def cell(self, op: str, tier: str) -> tuple[str, float | None, int]:
        """Aggregated status of one op × tier: fail > skip > xfail > pass > absent > n/a; worst ratio; case count."""
        rs = [r for r in self.results if r.op == op and r.tier == tier]
        if not rs:
            return "-", None, 0
        order = [FAIL, SKIP, XFAIL, PASS, UNSUPPORTED, ABSENT, NA]
        status = min((r.status for r in rs), key=order.index)
        # known divergences are excluded: the column shows how close the conforming cases are
        ratios = [
            r.worst_ratio
            for r in rs
            if r.status in (PASS, FAIL) and r.worst_ratio is not None and np.isfinite(r.worst_ratio)
        ]
        return status, (max(ratios) if ratios else None), sum(r.n_cases for r in rs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "verdict": self.verdict,
            "verdict_scope": self.verdict_scope,
            "out_of_scope": self.out_of_scope,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 3),
            "settings": self.settings,
            "warnings": self.warnings,
            "gaps": self.gaps,
            "unchecked": self.unchecked,
            "notes": self.notes,
            "coverage": self.coverage,
            "results": [asdict(r) for r in self.results],
        }
