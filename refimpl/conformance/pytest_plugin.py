"""pytest plugin: run the conformance harness inside a project's own test suite.

    pytest --refimpl-target=mypkg.kernels:TARGET [--refimpl-ops='lora.*'] [--refimpl-examples=25]

adds one test item per op and tier (``refimpl::<target>::<op>::<tier>``); a failing item
shows the failure and the paste-able snippet of its shrunk input; known divergences are
xfail, absent ops and unavailable rows are skipped. Registered as the ``refimpl`` entry
point in the ``pytest11`` group; without the installed entry point use
``-p refimpl.conformance.pytest_plugin``. Nothing is collected unless
``--refimpl-target`` is given.
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("refimpl", "refimpl conformance harness")
    group.addoption("--refimpl-target", default=None,
                    help="check this target against refimpl (numpy, numba, cupy, peft, bitsandbytes, mergekit, "
                         "auto, or module:object)")
    group.addoption("--refimpl-ops", default=None, help="comma-separated globs over op names (default: all)")
    group.addoption("--refimpl-examples", type=int, default=25, help="Hypothesis examples per op")
    group.addoption("--refimpl-divergences", action="append", default=None,
                    help="extra known-divergences TOML file (repeatable)")


class ConformanceItem(pytest.Item):
    """One op × tier of a conformance run."""

    def __init__(self, *, results: list[Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.results = results

    def runtest(self) -> None:
        from refimpl.conformance.runner import ABSENT, FAIL, SKIP, XFAIL

        fails = [r for r in self.results if r.status == FAIL]
        if fails:
            raise ConformanceFailure(fails)
        if self.results and all(r.status == XFAIL for r in self.results if r.status not in (SKIP,)) \
                and any(r.status == XFAIL for r in self.results):
            pytest.xfail("; ".join(dict.fromkeys(r.divergence for r in self.results if r.status == XFAIL)))
        if self.results and all(r.status in (SKIP, ABSENT) for r in self.results):
            pytest.skip(self.results[0].message)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, ConformanceFailure):
            parts = []
            for r in excinfo.value.results:
                parts.append(f"[{r.tier}: {r.label}] {r.message}")
                if r.snippet:
                    parts.append("reproduce with:\n" + r.snippet)
            return "\n".join(parts)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[str, int, str]:
        return "refimpl-conformance", 0, self.name


class ConformanceFailure(AssertionError):
    def __init__(self, results: list[Any]) -> None:
        super().__init__(f"{len(results)} failing case(s)")
        self.results = results


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    target = config.getoption("--refimpl-target")
    if not target:
        return
    from refimpl.conformance import runner

    res = runner.run(target, config.getoption("--refimpl-ops"), examples=config.getoption("--refimpl-examples"),
                     divergences=config.getoption("--refimpl-divergences"))
    for op in res.ops():
        for tier in res.settings["tiers"]:
            rs = [r for r in res.results if r.op == op and r.tier == tier]
            if rs:
                items.append(ConformanceItem.from_parent(session, name=f"refimpl::{res.target}::{op}::{tier}",
                                                         results=rs))
    config._refimpl_result = res  # for the terminal summary


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    res = getattr(config, "_refimpl_result", None)
    if res is None:
        return
    from refimpl.conformance import report

    terminalreporter.section(f"refimpl conformance: {res.target}")
    terminalreporter.write_line(report.table(res))
    for w in res.warnings:
        terminalreporter.write_line(f"warning: {w}")
