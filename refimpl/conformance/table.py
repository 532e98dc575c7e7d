"""The op table: one row per reference op.

A row names the op (``<module>.<function>`` of refimpl), its valid input domain
(a Hypothesis strategy of keyword-argument dicts, plus a written summary), its
tolerance model, the tiers that apply, the golden-vector cases and the special
values. Kernels, peers and user targets all run through the same rows.

Rows live with their op family (``rows_lora``, ``rows_quant``, ``rows_dora``,
``rows_merging``).
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refimpl.conformance.tolerance import Exact, Tolerance

#: The tiers, in the order the runner takes them (array-api-tests' idea: root causes first).
TIERS = ("names", "shapes", "golden", "boundary", "properties", "special")

Case = dict[str, Any]


@dataclass(frozen=True)
class Special:
    """A special-value case: whatever the reference does (a result, or a ValueError /
    TypeError) is what a conforming target must do."""

    label: str
    case: Case


@dataclass(frozen=True)
class Boundary:
    """A deterministic case placed where kernels go wrong (a tail block, a threshold ±1 ulp, an
    option value); ``classes`` names the op's equivalence classes it exercises. The expected
    result is the reference's, computed in the run."""

    label: str
    case: Case
    classes: tuple[str, ...]


@dataclass(frozen=True)
class OpSpec:
    """One row of the op table."""

    name: str  #: "<module>.<function>", e.g. "lora.forward"
    strategy: Callable[[], Any]  #: () -> hypothesis strategy of valid keyword-argument dicts
    domain: str  #: the valid domain in words
    tolerance: Tolerance = field(default_factory=Exact)
    golden: Callable[[np.random.Generator], list[tuple[str, Case]]] | None = None
    specials: Callable[[], list[Special]] | None = None
    tiers: tuple[str, ...] = TIERS
    #: the reference's own validation rejects these (arguments that a target must reject too)
    nonfinite_args: tuple[str, ...] = ()
    #: the equivalence classes of the input domain a kernel can get wrong, "<kind>: <what>" with kind one of
    #: shape, dtype, option, value (e.g. "shape: tail block", "value: threshold ±1 ulp"); every class is hit
    #: by at least one boundary case in every run
    classes: tuple[str, ...] = ()
    boundary: Callable[[], list[Boundary]] | None = None

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def function(self) -> str:
        return self.name.rsplit(".", 1)[1]

    def reference(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(f"refimpl.{self.module}"), self.function)

    def example(self) -> Case:
        """The canonical small case: the first golden case (seed 0), else the first boundary case."""
        if self.golden is not None:
            return dict(self.golden(np.random.default_rng(0))[0][1])
        if self.boundary is not None:
            return dict(self.boundary()[0].case)
        raise LookupError(f"{self.name}: no golden or boundary cases")


#: Every public function of ``refimpl.<module>`` for these modules has a row, or is named in a row family's
#: ``NOT_OPS`` (op name -> why it is not an array op, e.g. file I/O); a target that provides an op without a
#: row is reported unchecked.
OP_MODULES = ("lora", "dora", "quant", "qlora", "merging")


def _families() -> list[str]:
    return ["rows_lora", "rows_quant", "rows_dora", "rows_merging"]


def op_table() -> dict[str, OpSpec]:
    """Every row, available or not, keyed by op name."""
    rows: dict[str, OpSpec] = {}
    for fam in _families():
        mod = importlib.import_module(f"refimpl.conformance.{fam}")
        for spec in mod.rows():
            rows[spec.name] = spec
    return rows


def public_functions(module: str) -> list[str]:
    """The public functions ``refimpl.<module>`` defines or re-exports from refimpl (``__all__`` where given)."""
    import inspect

    mod = importlib.import_module(f"refimpl.{module}")
    names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
    out = []
    for n in names:
        obj = getattr(mod, n, None)
        if inspect.isfunction(obj) and obj.__module__.startswith("refimpl."):
            out.append(f"{module}.{n}")
    return out


def not_ops() -> dict[str, str]:
    """Public functions of the op modules that have no row, with the reason (each family's ``NOT_OPS``)."""
    out: dict[str, str] = {}
    for fam in _families():
        out.update(getattr(importlib.import_module(f"refimpl.conformance.{fam}"), "NOT_OPS", {}))
    return out


def select(patterns: str | Iterable[str] | None = None) -> list[OpSpec]:
    """Rows whose names match any of the glob patterns (comma-separated string or list)."""
    table = op_table()
    if patterns is None:
        return list(table.values())
    pats = [p.strip() for p in patterns.split(",")] if isinstance(patterns, str) else list(patterns)
    pats = [p for p in pats if p]
    return [s for name, s in table.items() if any(fnmatch.fnmatchcase(name, p) for p in pats)]


def abs_case(case: Mapping[str, Any]) -> Case:
    """The case with every float array and real scalar replaced by its absolute value
    (used to evaluate the running-error magnitude of a sum of products)."""
    out: Case = {}
    for k, v in case.items():
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            out[k] = np.abs(v)
        elif isinstance(v, float):
            out[k] = abs(v)
        elif isinstance(v, list) and v and all(isinstance(e, np.ndarray) and e.dtype.kind == "f" for e in v):
            out[k] = [np.abs(e) for e in v]
        elif isinstance(v, list) and v and all(isinstance(e, float) for e in v):
            out[k] = [abs(e) for e in v]
        else:
            out[k] = v
    return out
