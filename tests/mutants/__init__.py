"""The mutation catalogue: one-defect copies of the reference, each a bug a kernel author could ship.

Each family module (``quant``, ``lora``, ``dora``, ``merging``) defines ``MUTANTS``, a list of
:class:`Mutant`. A mutant is the reference op with exactly one defect, written from a cause of real
kernel bugs (the ``CAUSES`` below), never from what the strategies happen to draw. The default
``refimpl conform`` must kill every one of them (tests/test_mutation_suite.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Why kernels go wrong; every mutant names one.
CAUSES = {
    "scaling": "a wrong scale factor (α instead of α/r, √r, a missing weight or λ, a wrong absmax)",
    "axes": "a reduction or broadcast over the wrong axis",
    "transposition": "a transposed operand or output layout",
    "tails": "a partial block, vector-width remainder or last tile handled wrongly",
    "path switch": "a second code path (large batch, many blocks, second group) that differs from the first",
    "thresholds": "a decision at a threshold: tie rule, midpoint, reciprocal vs division, nearest-code search",
    "precision": "computing in a lower precision than declared, or an epsilon added to a norm",
    "options": "an option ignored or read wrongly (dtype, profile, fan_in_fan_out, rescale, normalize, ...)",
    "merge rules": "a rule of a merge method (sign election, disjoint mean, k rule, rescale, SLERP fallback)",
    "special values": "zeros, signed zeros, subnormals, NaN or ±inf handled unlike the reference",
}

FAMILIES = ("quant", "lora", "dora", "merging")


@dataclass(frozen=True)
class Mutant:
    """One defect in one op: ``fn`` replaces ``op`` and takes the reference's keyword arguments."""

    name: str
    op: str
    cause: str
    fn: Callable[..., Any]

    def __post_init__(self) -> None:
        if self.cause not in CAUSES:
            raise ValueError(f"cause: expected one of {sorted(CAUSES)}, got {self.cause!r}")


def catalogue() -> list[Mutant]:
    """Every mutant of every family module present."""
    out: list[Mutant] = []
    for fam in FAMILIES:
        try:
            mod = importlib.import_module(f"tests.mutants.{fam}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tests.mutants.{fam}":
                raise
            continue
        out.extend(mod.MUTANTS)
    return out
