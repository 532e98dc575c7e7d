"""Known divergences: a peer's deliberate or accidental difference, kept as data.

Each entry of ``known_divergences.toml`` (or a user file passed to the runner) is

    [[divergence]]
    op = "lora.forward"          # glob over op names
    target = "peft"              # glob over target names
    tier = "special"             # optional: one of the tiers (default: any)
    case = "* has nan"           # optional glob over the case label (default: any)
    reason = "PEFT does not validate its inputs: NaN propagates"
    upstream = "huggingface/peft#1234"   # or "by design" when there is no issue
    model = "pkg.module:function"  # optional: a model of the peer's output (below)

A failing case that matches an entry is reported as ``xfail`` with its reason; the
run still exits 0.

An entry with a ``model`` is stricter: a failing case counts as this divergence only where the
model reproduces the target's output bit for bit. The model is imported from "module:function" and
called as ``model(op, case, expected) -> dict[str, np.ndarray] | None``: ``case`` is the prepared
case (target options included), ``expected`` the reference's flattened output (``{"out": ...}``);
it returns the peer's output as modelled, with the same keys, or ``{"raises": "<exception class>"}``
where the peer raises, or None where the divergence does not apply to this case (another code path,
another op). Any other difference stays a failure, so a
divergence that is named cannot hide a second, unnamed one.

An entry that applies to the run (its target and op were run) but matched no failing case is
reported as a warning: the divergence is gone or the entry is wrong.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refimpl.conformance.table import TIERS

BUILTIN_FILE = Path(__file__).with_name("known_divergences.toml")

_MODEL_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")

Model = Callable[[str, dict[str, Any], dict[str, Any]], "dict[str, Any] | None"]


@functools.cache
def import_model(path: str) -> Model:
    """The callable named by "module:function" (imported once per process)."""
    if not _MODEL_PATH.match(path):
        raise ValueError(f"divergence model: expected 'module:function', got {path!r}")
    module, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"divergence model {path!r} cannot be imported ({type(exc).__name__}: {exc})") from exc
    if not callable(fn):
        raise ValueError(f"divergence model {path!r} is not callable (got {type(fn).__name__})")
    return fn


@dataclass(frozen=True)
class Divergence:
    op: str
    target: str
    reason: str
    upstream: str
    tier: str = "*"
    case: str = "*"
    source: str = ""
    model: str = ""

    def model_fn(self) -> Model | None:
        """The model callable (see the module docstring), or None for an entry without one."""
        return import_model(self.model) if self.model else None

    def applies(self, op: str, target: str) -> bool:
        return fnmatch.fnmatchcase(op, self.op) and fnmatch.fnmatchcase(target, self.target)

    def matches(self, op: str, target: str, tier: str, label: str) -> bool:
        return (
            self.applies(op, target) and fnmatch.fnmatchcase(tier, self.tier) and fnmatch.fnmatchcase(label, self.case)
        )

    def __str__(self) -> str:
        return f"{self.op} [{self.target}, {self.tier}, {self.case!r}]: {self.reason} ({self.upstream})"


def load(path: str | Path) -> list[Divergence]:
    """Read a divergences file; every entry needs op, target, reason and upstream."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"divergences: cannot read {p} ({exc})") from exc
    entries = data.get("divergence", [])
    if not isinstance(entries, list):
        raise ValueError(f"divergences: {p}: expected [[divergence]] tables, got {type(entries).__name__}")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"divergences: {p}: entry {i} must be a [[divergence]] table, got {e!r}")
        missing = [k for k in ("op", "target", "reason", "upstream") if not isinstance(e.get(k), str) or not e[k]]
        if missing:
            raise ValueError(f"divergences: {p}: entry {i} needs non-empty string(s) {', '.join(missing)}, got {e!r}")
        tier = e.get("tier", "*")
        if tier != "*" and tier not in TIERS:
            raise ValueError(
                f"divergences: {p}: entry {i}: tier must be one of {', '.join(TIERS)} or '*', got {tier!r}"
            )
        model = e.get("model", "")
        if not isinstance(model, str) or (model and not _MODEL_PATH.match(model)):
            raise ValueError(f"divergences: {p}: entry {i}: model must be a 'module:function' string, got {model!r}")
        out.append(
            Divergence(
                op=e["op"],
                target=e["target"],
                reason=e["reason"],
                upstream=e["upstream"],
                tier=tier,
                case=e.get("case", "*"),
                source=f"{p.name}#{i}",
                model=model,
            )
        )
    return out


def load_all(extra: list[str | Path] | None = None) -> list[Divergence]:
    """The built-in file plus any user files."""
    out = load(BUILTIN_FILE)
    for f in extra or []:
        out.extend(load(f))
    return out
