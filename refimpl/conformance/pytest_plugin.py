"""pytest plugin: run the conformance harness inside a project's own test suite.

    pytest --refimpl-target=mypkg.kernels:TARGET [--refimpl-ops='lora.*'] [--refimpl-examples=25]

Collection creates one test item per op and tier (``refimpl::<target>::<op>::<tier>``, selectable
with ``-k``) and runs nothing: ``--collect-only`` is instant. The first item of an op runs that op's
tiers (cached for the op's other items); a failing item shows the failure and the paste-able snippet
of its shrunk input; a tier that should have run and did not fails (the run cannot vouch for it);
an item with any known divergence is xfail (its passing cases counted in the reason); absent ops and
tiers that do not apply are skipped. Under pytest-xdist
each worker runs only the ops of its items (``--dist loadgroup`` keeps an op's items on one worker),
and the summary table is built from the items' reports, so it appears under xdist too.

Registered as the ``refimpl`` entry point in the ``pytest11`` group; without the installed entry
point use ``-p refimpl.conformance.pytest_plugin``. Nothing is collected unless ``--refimpl-target``
is given.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from _pytest._code.code import TerminalRepr


def pytest_addoption(parser: pytest.Parser) -> None:
    from refimpl.conformance.targets import builtin_help

    group = parser.getgroup("refimpl", "refimpl conformance harness")
    group.addoption(
        "--refimpl-target",
        default=None,
        help=f"check this target against refimpl ({builtin_help()}, or module:object)",
    )
    group.addoption("--refimpl-ops", default=None, help="comma-separated globs over op names (default: all)")
    group.addoption("--refimpl-examples", type=int, default=25, help="Hypothesis examples per op")
    group.addoption(
        "--refimpl-divergences", action="append", default=None, help="extra known-divergences TOML file (repeatable)"
    )


class _OpRuns:
    """One conformance run per op, on first use (so collection runs nothing)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.cache: dict[str, Any] = {}

    def results(self, op: str) -> Any:
        if op not in self.cache:
            from refimpl.conformance import runner

            c = self.config
            self.cache[op] = runner.run(
                c.getoption("--refimpl-target"),
                op,
                examples=c.getoption("--refimpl-examples"),
                divergences=c.getoption("--refimpl-divergences"),
            )
        return self.cache[op]


class ConformanceItem(pytest.Item):
    """One op × tier of a conformance run."""

    def __init__(self, *, op: str, tier: str, runs: _OpRuns, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.op, self.tier, self.runs = op, tier, runs

    def runtest(self) -> None:
        from refimpl.conformance.runner import ABSENT, FAIL, NA, PASS, SKIP, XFAIL

        res = self.runs.results(self.op)
        results = [r for r in res.results if r.op == self.op and r.tier == self.tier]
        self.user_properties.append(
            (
                "refimpl",
                json.dumps(
                    {"target": res.target, "op": self.op, "tier": self.tier, "results": [asdict(r) for r in results]},
                    default=str,
                ),
            )
        )
        if not results:  # an absent op has no later tiers
            pytest.skip(next((r.message for r in res.results if r.op == self.op), "not run"))
        # a tier that should have run and did not is a failure: the run cannot vouch for the op
        fails = [r for r in results if r.status in (FAIL, SKIP)]
        if self.tier == "boundary":
            missed = [c for c, n in res.coverage.get(self.op, {}).items() if n == 0]
            if missed:
                raise ConformanceFailure(fails, f"equivalence classes never hit: {missed}")
        if fails:
            raise ConformanceFailure(fails)
        xfails = [r for r in results if r.status == XFAIL]
        if xfails:  # an item with any known divergence is xfail, never a plain pass (its passing cases are named)
            why = "; ".join(dict.fromkeys(r.divergence for r in xfails))
            n_pass = sum(r.status == PASS for r in results)
            pytest.xfail(
                why if not n_pass else f"{len(xfails)} known divergence(s): {why}; {n_pass} other case(s) passed"
            )
        if all(r.status in (NA, ABSENT) for r in results):
            pytest.skip(results[0].message)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str | TerminalRepr:
        if isinstance(excinfo.value, ConformanceFailure):
            parts = [excinfo.value.note] if excinfo.value.note else []
            for r in excinfo.value.results:
                what = "did not run: " if r.status == "skip" else ""
                parts.append(f"[{r.tier}: {r.label}] {what}{r.message}")
                if r.snippet:
                    parts.append("reproduce with:\n" + r.snippet)
            return "\n".join(parts)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[str, int, str]:
        return "refimpl-conformance", 0, self.name


class ConformanceFailure(AssertionError):
    def __init__(self, results: list[Any], note: str = "") -> None:
        super().__init__(note or f"{len(results)} failing case(s)")
        self.results, self.note = results, note


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    target = config.getoption("--refimpl-target")
    if not target:
        return
    from refimpl.conformance.table import TIERS, select

    ops = config.getoption("--refimpl-ops")
    specs = select(ops)
    if not specs:
        raise pytest.UsageError(f"--refimpl-ops: no op matches {ops!r}")
    runs = _OpRuns(config)
    before = len(items)
    for spec in specs:
        for tier in TIERS:
            item = ConformanceItem.from_parent(
                session, name=f"refimpl::{target}::{spec.name}::{tier}", op=spec.name, tier=tier, runs=runs
            )
            item.add_marker(pytest.mark.xdist_group(spec.name))
            items.append(item)
    # the items are made here rather than by a collector: count them in "collected N items"
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and hasattr(reporter, "_numcollected"):
        reporter._numcollected += len(items) - before


def pytest_configure(config: pytest.Config) -> None:
    config._refimpl_reports = []  # type: ignore[attr-defined]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    for key, value in report.user_properties:
        if key == "refimpl" and isinstance(value, str):  # a JSON text (ConformanceItem.runtest)
            _REPORTS.append(json.loads(value))


_REPORTS: list[dict[str, Any]] = []


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _REPORTS:
        return
    from refimpl.conformance import report
    from refimpl.conformance.runner import CaseResult, RunResult

    target = _REPORTS[0]["target"]
    results = [CaseResult(**r) for rep in _REPORTS for r in rep["results"]]
    res = RunResult(
        target, results, settings={"tiers": sorted({rep["tier"] for rep in _REPORTS}, key=[*report.TIERS].index)}
    )
    terminalreporter.section(f"refimpl conformance: {target}")
    terminalreporter.write_line(report.table(res))
