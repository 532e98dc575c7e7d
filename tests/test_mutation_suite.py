"""The mutation suite: the default ``refimpl conform`` must kill every one-defect mutant of the reference.

Each mutant (tests/mutants/) is the reference op with one realistic defect. It runs through the default
run (25 examples, every tier, the committed golden vectors) exactly as a user's kernel would, and must
get a verdict other than CONFORMS. The run stops at the first failing tier (``fail_fast``): a failure in
any tier already decides the default run's verdict, so this reaches the same verdict and the same first
failing tier in less time. The kill table (mutant, cause, the tier that caught it, seconds) is
printed into the test log.
"""

from __future__ import annotations

import time

import pytest

from refimpl.conformance import TIERS, op_table, run
from refimpl.conformance.runner import CONFORMS, FAIL
from refimpl.conformance.targets import NamespaceTarget
from tests.mutants import CAUSES, catalogue

MUTANTS = catalogue()


def _first_failing_tier(res) -> str:
    tiers = {r.tier for r in res.results if r.status == FAIL}
    return next((t for t in TIERS if t in tiers), "*") if tiers else f"({res.verdict})"


def test_catalogue_has_sixty_mutants_covering_every_cause():
    assert len(MUTANTS) >= 60, f"only {len(MUTANTS)} mutants"
    assert len({m.name for m in MUTANTS}) == len(MUTANTS), "mutant names must be unique"
    missing = set(CAUSES) - {m.cause for m in MUTANTS}
    assert not missing, f"no mutant for the causes {sorted(missing)}"
    table = op_table()
    unknown = sorted({m.op for m in MUTANTS} - set(table))
    assert not unknown, f"mutants of ops without a row: {unknown}"


@pytest.mark.mutation
def test_default_conform_kills_every_mutant(capsys):
    rows, survivors = [], []
    t_all = time.perf_counter()
    for m in MUTANTS:
        t0 = time.perf_counter()
        # fail-fast reaches the default run's verdict and first failing tier without the later tiers
        res = run(NamespaceTarget(f"mutant: {m.name}", {m.op: m.fn}), m.op, fail_fast=True)
        dt = time.perf_counter() - t0
        killed = res.verdict != CONFORMS and bool(res.failures)
        rows.append((m.op, m.name, m.cause, _first_failing_tier(res) if killed else "SURVIVED", dt))
        if not killed:
            survivors.append(f"{m.op}: {m.name} ({res.verdict}; gaps: {res.gaps[:3]})")
    w = max(len(r[1]) for r in rows)
    lines = [f"{'op':<30} {'mutant':<{w}} {'cause':<15} {'caught by':<11} seconds"]
    lines += [f"{op:<30} {name:<{w}} {cause:<15} {tier:<11} {dt:6.2f}" for op, name, cause, tier, dt in rows]
    by_tier = {t: sum(r[3] == t for r in rows) for t in (*TIERS, "SURVIVED")}
    lines.append(
        f"mutation suite: {len(rows) - len(survivors)} of {len(rows)} killed by the default run in "
        f"{time.perf_counter() - t_all:.1f} s; first failing tier: "
        + ", ".join(f"{t} {n}" for t, n in by_tier.items() if n)
    )
    with capsys.disabled():  # the kill table belongs in the CI log
        print("\n" + "\n".join(lines))
    assert not survivors, "mutants the default run did not kill:\n" + "\n".join(survivors)
