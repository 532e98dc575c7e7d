"""The conformance runner: every selected op, tier by tier.

Tiers (``table.TIERS``), each only for ops that passed the tiers before it, so a
partial implementation sees root causes rather than a cascade:

1. ``names``      the target provides a callable for the op;
2. ``shapes``     on one small case, its result has the reference's outputs, shapes and dtype kinds;
3. ``golden``     it reproduces the golden vectors in refimpl/golden/v1 (inputs stored exactly; under a
                  target's options the expected values are the reference's under those options);
4. ``boundary``   deterministic cases at the op's equivalence classes (tails, vector-width remainders,
                  path switches, every option and dtype, thresholds ±1 ulp, ties); every class is hit;
5. ``properties`` differential: on Hypothesis-drawn valid inputs it agrees with the reference
                  under the op's tolerance model; a failure is shrunk to the smallest input and
                  printed as a paste-able snippet;
6. ``special``    special values (NaN, ±inf, -0.0, zero factors, out-of-range options): it does
                  what the reference does, a result or a ValueError/TypeError.

The verdict is a promise, so it is CONFORMS only when every selected tier ran for every op the
target provides, every equivalence class was hit, and every provided op has a row. A skipped tier
or an unchecked op gives INCOMPLETE; a failure gives DOES NOT CONFORM.

Each op runs in a forked worker process (``isolate=True``): a target that exits (``sys.exit``,
``os._exit``), crashes or hangs past ``timeout`` seconds on one case fails that op, and the run goes on
in a fresh worker.

Known divergences (``divergences.py``) turn a matching failure into ``xfail``. Built-in entries apply
to the built-in targets only (by class, not by name). An entry with a ``model`` is accepted only where
the model reproduces the target's output bit for bit; any other difference stays a failure.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refimpl.conformance import divergences as _div
from refimpl.conformance._values import flatten, snippet
from refimpl.conformance.isolation import Executor
from refimpl.conformance.report import failures_text
from refimpl.conformance.results import (
    ABSENT,
    CONFORMS,
    EXIT_CODES,
    FAIL,
    FAILS,
    INCOMPLETE,
    NA,
    NOTHING,
    PASS,
    SKIP,
    UNSUPPORTED,
    XFAIL,
    CaseResult,
    RunResult,
)
from refimpl.conformance.table import TIERS, OpSpec, op_table, select
from refimpl.conformance.targets import Target, declare, get_target, is_builtin, provided_ops, target_source
from refimpl.conformance.tolerance import Verdict, compare, compare_exact

# the result records and verdict names live in results.py (report.py reads them too); they are re-exported here
__all__ = [
    "ABSENT",
    "CONFORMS",
    "DEFAULT_EXAMPLES",
    "DEFAULT_TIMEOUT",
    "EXIT_CODES",
    "FAIL",
    "FAILS",
    "INCOMPLETE",
    "NA",
    "NOTHING",
    "PASS",
    "SKIP",
    "THOROUGH_EXAMPLES",
    "UNSUPPORTED",
    "XFAIL",
    "CaseResult",
    "InputMutated",
    "RunResult",
    "assert_conforms",
    "run",
    "stderr_progress",
]

DEFAULT_EXAMPLES = 25
DEFAULT_TIMEOUT = 60.0
#: at most this many extra calls of the target while shrinking a failing case's shapes
SHRINK_TRIES = 80
#: a failing boundary case's shapes are shrunk with at most this many calls, and at most BOUNDARY_SHRINK_BUDGET
#: calls per op over all its failing boundary cases (the boundary tier stays cheap for a target that fails many)
BOUNDARY_SHRINK_TRIES = 40
BOUNDARY_SHRINK_BUDGET = 400
THOROUGH_EXAMPLES = 1000


#: how a failure says that a divergence's model was not applied because it runs the target's own code
DEPENDENT_MODEL = "the divergence {source} (model {model}) was not applied"


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _copy_case(case: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in case.items()}


class InputMutated(AssertionError):
    """The target wrote into an array it was given."""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        if not isinstance(b, np.ndarray) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        return a.tobytes() == b.tobytes()
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return True  # scalars and objects are immutable here or compared by their own tiers


def _mutated(original: dict[str, Any], given: dict[str, Any]) -> str:
    """The first argument whose arrays the target changed, or ''."""
    return next((k for k, v in original.items() if not _same(v, given.get(k))), "")


def _options(target: Target, op: str) -> dict[str, Any]:
    fn = getattr(target, "options", None)
    return dict(fn(op)) if fn else {}


def _dtype(target: Target, op: str) -> str:
    fn = getattr(target, "compute_dtype", None)
    return fn(op) if fn else "float64"


def _supports(target: Target, op: str) -> dict[str, frozenset[Any]]:
    """The target's ``supports(op)`` declaration: argument name (or ``"dtypes"``) -> the values it handles."""
    fn = getattr(target, "supports", None)
    decl = fn(op) if fn else None
    if not decl:
        return {}
    out: dict[str, frozenset[Any]] = {}
    for key, allowed in dict(decl).items():
        if isinstance(allowed, (str, bytes)) or not isinstance(allowed, Iterable):
            raise TypeError(f"supports({op!r}): {key!r} must map to a set of values, got {allowed!r}")
        out[str(key)] = frozenset(str(np.dtype(a)) if key == "dtypes" else a for a in allowed)
    return out


def _values_of(key: str, case: dict[str, Any], defaults: dict[str, Any]) -> list[Any]:
    """What ``key`` of a supports declaration is in ``case``: the argument's value (an array's dtype name), the
    reference's default where the case leaves it out, or an attribute of that name of an argument (a QuantState's
    ``quant_type``); ``"dtypes"`` is the dtype of every float array argument; ``"arg.attr"`` is an attribute of
    one argument, arrays included (``"x.ndim"``)."""
    if key == "dtypes":
        return [str(v.dtype) for v in case.values() if isinstance(v, np.ndarray) and _kind(v.dtype) == "float"]
    arg, dot, attr = key.partition(".")
    if dot:
        return [getattr(case[arg], attr)] if arg in case and hasattr(case[arg], attr) else []
    if key in case:
        v = case[key]
        return [str(v.dtype) if isinstance(v, np.ndarray) else v]
    attrs = [getattr(v, key) for v in case.values() if hasattr(v, key) and not isinstance(v, np.ndarray)]
    if attrs:
        return attrs
    return [defaults[key]] if key in defaults else []


def beyond_support(decl: dict[str, frozenset[Any]], case: dict[str, Any], defaults: dict[str, Any]) -> str:
    """Why ``case`` lies outside a ``supports`` declaration (e.g. "quant_type='fp4' (supports 'nf4')"), or ''."""
    for key, allowed in decl.items():
        for v in _values_of(key, case, defaults):
            try:
                ok = v in allowed
            except TypeError:  # an unhashable value cannot be in a set of declared values
                ok = False
            if not ok:
                return f"{key}={v!r} (supports {', '.join(repr(a) for a in sorted(allowed, key=repr))})"
    return ""


def _reference_defaults(ref: Callable[..., Any]) -> dict[str, Any]:
    import inspect

    try:
        params = inspect.signature(ref).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _short(value: Any) -> str:
    """An option's value for a one-line message: arrays by shape and dtype, anything else by repr."""
    if isinstance(value, np.ndarray):
        return f"<{value.dtype} array of shape {value.shape}>"
    return repr(value)


def _overridden(case: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """The options that replace a different value the case itself gives (what ran is not what the label says)."""
    out = {}
    for k, v in opts.items():
        if k in case and not _same_value(case[k], v):
            out[k] = v
    return out


def _same_value(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) if not isinstance(a, np.ndarray) and not isinstance(b, np.ndarray) else _same(a, b)
    except Exception:
        return False


def relabel(label: str, case: dict[str, Any], opts: dict[str, Any]) -> str:
    """``label`` plus what the target's options changed in the case, so a label names what actually ran
    ("fp4: nan in x [ran with quant_type='nf4' from the target's options]")."""
    changed = _overridden(case, opts)
    if not changed:
        return label
    return f"{label} [ran with {', '.join(f'{k}={v!r}' for k, v in changed.items())} from the target's options]"


def _cut_all(a: np.ndarray, n: int, m: int, cut: Callable[[np.ndarray, int, int, bool], np.ndarray]) -> np.ndarray:
    """``a`` with every axis of length ``n`` cut to its first ``m`` entries."""
    for axis, length in enumerate(a.shape):
        if length == n:
            a = cut(a, axis, m, False)
    return a


def _kind(dt: np.dtype) -> str:
    if dt.kind == "f" or dt.name == "bfloat16":
        return "float"
    if dt.kind in "iu":
        return "integer"
    if dt.kind in "US":
        return "text"
    return {"b": "bool", "c": "complex"}.get(dt.kind, dt.kind)


def code_path(case: dict[str, Any]) -> str:
    """The arguments of ``case`` that pick a code path: its string, bool and None options (``dtype='bfloat16',
    safe=True``, ``bias=None``) and the dtypes of its float arrays ("float32 inputs"). Failures with the same
    message but another path are kept apart: they are often different bugs."""
    opts = [f"{k}={v!r}" for k, v in case.items() if v is None or isinstance(v, (bool, str, np.dtype))]
    dtypes = sorted(
        {
            str(a.dtype)
            for v in case.values()
            for a in (v if isinstance(v, list) else [v])
            if isinstance(a, np.ndarray) and _kind(a.dtype) == "float"
        }
    )
    ins = f"{'/'.join(dtypes)} inputs" if dtypes else ""
    return "; ".join(p for p in (", ".join(opts), ins) if p)


def _shapes(case: dict[str, Any]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in case.items() if isinstance(v, np.ndarray) and v.ndim)


@functools.lru_cache(maxsize=1)
def _library_roots() -> tuple[str, ...]:
    """Folders of code that is nobody's target: refimpl, the standard library, installed packages."""
    import sysconfig

    paths = sysconfig.get_paths()
    roots = [Path(__file__).resolve().parents[1], *(Path(paths[k]).resolve() for k in _LIBRARY_PATHS if k in paths)]
    return tuple(str(r) + os.sep for r in roots)


_LIBRARY_PATHS = ("stdlib", "platstdlib", "purelib", "platlib")


@functools.lru_cache(maxsize=4096)
def _own_file(filename: str) -> bool:
    """Whether ``filename`` is a target author's own code: not refimpl's, not the standard library's, not an
    installed package's (site-packages), not generated (``<string>``, a notebook cell)."""
    if filename.startswith("<"):
        return False
    return not str(Path(filename).resolve()).startswith(_library_roots())


def _executed(fn: Callable[[], Any]) -> tuple[Any, BaseException | None, set[Any]]:
    """(result, exception, the author's own code objects ``fn()`` executed), through ``sys.setprofile``."""
    seen: set[Any] = set()

    def prof(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            seen.add(frame.f_code)

    previous = sys.getprofile()
    sys.setprofile(prof)
    try:
        result, exc = fn(), None
    except Exception as e:
        result, exc = None, e
    finally:
        sys.setprofile(previous)
    return result, exc, {c for c in seen if _own_file(c.co_filename)}


class _Checker:
    """Runs the tiers of one op against one target callable (inside the worker)."""

    def __init__(
        self,
        spec: OpSpec,
        target: Target,
        f: Callable[..., Any],
        divs: list[_div.Divergence],
        beat: Callable[[str, str], None],
    ) -> None:
        self.spec, self.target, self.f = spec, target, f
        self.ref = spec.reference()
        self.opts = _options(target, spec.name)
        self.dtype = _dtype(target, spec.name)
        self.beat = beat
        self.divs = divs
        self.modelled = [d for d in divs if d.model and d.applies(spec.name, target.name)]
        self.support = _supports(target, spec.name)
        #: how a snippet gets the target back: a name for get_target, or None (an object with no importable name)
        self.source: str | None = target.name
        self.defaults = _reference_defaults(self.ref)
        #: the author's own code objects the target executed (recorded while a divergence model applies): a model
        #: that executes any of them is not independent of the target and explains nothing
        self.target_code: set[Any] = set()
        #: divergence -> the target's functions its model executed (the model was not applied)
        self.dependent: dict[str, list[str]] = {}
        self.shrink_budget = BOUNDARY_SHRINK_BUDGET
        self.calls = 0  #: calls of the target so far
        #: why the last case's modelled divergence was not applied (its model runs the target's own code), or ''
        self.last_dependent = ""

    def prepare(self, case: dict[str, Any]) -> dict[str, Any]:
        return {**case, **self.opts}

    def expected(self, case: dict[str, Any]) -> dict[str, np.ndarray]:
        return flatten(self.ref(**_copy_case(case)))

    def actual(self, case: dict[str, Any], tier: str = "", label: str = "") -> dict[str, np.ndarray]:
        self.beat(tier, label)
        self.calls += 1
        given = _copy_case(case)
        if self.modelled:  # record which of the author's functions the target runs (models must not run them)
            result, exc, code = _executed(lambda: self.f(**given))
            self.target_code |= code
            if exc is not None:
                raise exc
            out = flatten(result)
        else:
            out = flatten(self.f(**given))
        changed = _mutated(case, given)
        if changed:
            raise InputMutated(f"the target modified its input {changed!r} in place (inputs are read-only)")
        return out

    def snip(self, case: dict[str, Any], note: str) -> str:
        return snippet(self.spec.name, self.source, case, note)

    def reproducer(self, case: dict[str, Any]) -> str:
        fn = getattr(self.target, "reproducer", None)
        if fn is None:
            return ""
        try:
            return fn(self.spec.name, case) or ""
        except Exception as exc:  # a reproducer is a convenience: never let it change a verdict
            return f"# no reproducer: {type(exc).__name__}: {exc}"

    def outside(self, case: dict[str, Any]) -> str:
        """Why the case lies outside the domain the target declares (``unsupported(op, case)``), or ''."""
        why = beyond_support(self.support, case, self.defaults)
        if why:
            return why
        fn = getattr(self.target, "unsupported", None)
        return (fn(self.spec.name, case) or "") if fn else ""

    def label(self, label: str, case: dict[str, Any]) -> str:
        return relabel(label, case, self.opts)

    def known(
        self, case: dict[str, Any], act: dict[str, np.ndarray], exp: dict[str, np.ndarray], tier: str, label: str
    ) -> str:
        """The modelled divergence that reproduces ``act`` bit for bit, or ''. A model that raises explains
        nothing: the case stays a failure."""
        self.last_dependent = ""
        for d in self.modelled:
            if not d.matches(self.spec.name, self.target.name, tier, label):
                continue
            modelled = self.run_model(d, case, exp)
            if modelled is not None and "raises" not in modelled and compare_exact(act, modelled).passed:
                return str(d)
        return ""

    def run_model(self, d: _div.Divergence, case: dict[str, Any], exp: dict[str, np.ndarray]) -> Any:
        """The model's prediction for ``case``, or None where it does not apply, raises, or is not independent
        of the target (it executed the target's own code: then it is recorded in ``self.dependent``)."""
        model = d.model_fn()
        if model is None:
            return None
        modelled, exc, code = _executed(lambda: model(self.spec.name, _copy_case(case), exp))
        shared = code & self.target_code
        if shared:
            names = sorted({f"{Path(c.co_filename).name}:{c.co_name}" for c in shared})
            self.dependent[str(d)] = names
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            self.last_dependent = (
                f" [{DEPENDENT_MODEL.format(source=d.source, model=d.model)}: its model runs the target's own code "
                f"({shown}); a model must be independent of the target (docs/targets.md §5)]"
            )
            return None
        return None if exc is not None else modelled

    def known_raise(self, case: dict[str, Any], exc: BaseException, tier: str, label: str) -> str:
        """The modelled divergence that predicts the target raising ``exc`` here (a model returning
        ``{"raises": "<exception class name>"}``), or ''."""
        self.last_dependent = ""
        for d in self.modelled:
            if not d.matches(self.spec.name, self.target.name, tier, label):
                continue
            modelled = self.run_model(d, case, {})
            if isinstance(modelled, dict) and modelled.get("raises") == type(exc).__name__:
                return str(d)
        return ""

    def one(
        self, tier: str, label: str, case: dict[str, Any], exp: dict[str, np.ndarray], classes: Iterable[str] = ()
    ) -> CaseResult:
        """Call the target on one prepared case and compare with ``exp``."""
        name = self.spec.name
        why = self.outside(case)
        if why:
            return CaseResult(
                name,
                tier,
                label,
                UNSUPPORTED,
                f"outside the target's declared domain: {why}",
                n_cases=1,
                classes=list(classes),
            )
        self.last_dependent = ""
        try:
            act = self.actual(case, tier, label)
        except Exception as exc:
            div = self.known_raise(case, exc, tier, label)
            msg, ratio = f"target raised {type(exc).__name__}: {exc}", None
        else:
            v = compare(self.spec.tolerance, act, exp, case, self.dtype)
            if v.passed:
                return CaseResult(
                    name, tier, label, PASS, v.message, worst_ratio=v.worst_ratio, n_cases=1, classes=list(classes)
                )
            div = self.known(case, act, exp, tier, label)
            msg, ratio = v.message, v.worst_ratio
        msg += self.last_dependent if not div else ""
        shown, note = case, f"{tier} case {label}: {msg}"
        if tier == "boundary" and not div:
            shown, note, msg = self.shrunk_boundary(case, label, msg)
        return CaseResult(
            name,
            tier,
            label,
            XFAIL if div else FAIL,
            msg,
            worst_ratio=ratio,
            n_cases=1,
            classes=list(classes),
            divergence=div,
            snippet=self.snip(shown, note),
            reproducer=self.reproducer(case),
            path="" if div else code_path(case),
        )

    def shrunk_boundary(self, case: dict[str, Any], label: str, msg: str) -> tuple[dict[str, Any], str, str]:
        """(the case to print, its snippet note, the result's message) for a failing boundary case: its shapes
        shrunk (``smaller``, at most BOUNDARY_SHRINK_TRIES calls, out of the op's BOUNDARY_SHRINK_BUDGET) while it
        fails with the same cause, or the case itself where nothing smaller does."""
        from refimpl.conformance.report import cause

        tries = min(BOUNDARY_SHRINK_TRIES, self.shrink_budget)
        plain = (case, f"boundary case {label}: {msg}", msg)
        if tries <= 0 or not _shapes(case):
            return plain
        before = self.calls
        small, (small_msg, _) = self.smaller(
            case, (msg, None), tries, tier="boundary", label=label, same=lambda m: cause(m) == cause(msg)
        )
        self.shrink_budget -= self.calls - before
        if small is case:
            return plain
        where = f"shrunk from the boundary case's shapes {_shapes(case)} to {_shapes(small)}"
        return small, f"boundary case {label}, {where}: {small_msg}", f"{small_msg} ({where})"

    # -------------------------------------------------------------- tiers

    def _example(self) -> dict[str, Any]:
        """The row's example case, or where the target declares it outside its domain, the first boundary case
        inside it."""
        case = self.prepare(self.spec.example())
        if not self.outside(case) or self.spec.boundary is None:
            return case
        inside = (self.prepare(b.case) for b in self.spec.boundary() if not _overridden(b.case, self.opts))
        return next((c for c in inside if not self.outside(c)), case)

    def shapes(self) -> CaseResult:
        case = self._example()
        exp = self.expected(case)
        why = self.outside(case)
        if why:
            return CaseResult(
                self.spec.name,
                "shapes",
                "example",
                UNSUPPORTED,
                f"outside the target's declared domain: {why}",
                n_cases=1,
            )
        try:
            act = self.actual(case, "shapes", "example")
        except Exception as exc:
            return CaseResult(
                self.spec.name,
                "shapes",
                "example",
                FAIL,
                f"target raised {type(exc).__name__}: {exc}",
                n_cases=1,
                snippet=self.snip(case, "the target raised on a valid input"),
            )
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
            return CaseResult(
                self.spec.name,
                "shapes",
                "example",
                FAIL,
                "; ".join(problems),
                n_cases=1,
                snippet=self.snip(case, "; ".join(problems)),
            )
        return CaseResult(self.spec.name, "shapes", "example", PASS, f"outputs {sorted(exp)}", n_cases=1)

    def golden(self, vectors_dir: Path | None) -> list[CaseResult]:
        from refimpl.conformance import vectors

        if self.spec.golden is None:
            return [CaseResult(self.spec.name, "golden", "*", NA, "no golden vectors for this op")]
        try:
            cases = vectors.load_op(self.spec.name, vectors_dir)
        except FileNotFoundError as exc:
            return [CaseResult(self.spec.name, "golden", "*", SKIP, str(exc))]
        except ValueError as exc:  # a tampered, malformed or unlisted vector file (names the file)
            return [CaseResult(self.spec.name, "golden", "*", FAIL, f"golden vectors unusable: {exc}")]
        out = []
        for label, case, expected in cases:
            changed = _overridden(case, self.opts)
            if changed:  # the vector holds other values than the target's options: it did not run, and says so
                held = ", ".join(f"{k}={_short(case[k])}" for k in changed)
                out.append(
                    CaseResult(
                        self.spec.name,
                        "golden",
                        label,
                        UNSUPPORTED,
                        f"not run: the vector holds {held}, the target's options set "
                        + ", ".join(f"{k}={_short(v)}" for k, v in changed.items()),
                        n_cases=1,
                    )
                )
                continue
            if any(k not in case for k in self.opts):
                # options the vector does not hold (a profile): the expected values are the reference's under them
                case = self.prepare(case)
                try:
                    expected = self.expected(case)
                except (ValueError, TypeError) as exc:
                    out.append(
                        CaseResult(
                            self.spec.name,
                            "golden",
                            label,
                            UNSUPPORTED,
                            f"not run: the reference rejects the vector under the target's options "
                            f"({type(exc).__name__}: {exc})",
                            n_cases=1,
                        )
                    )
                    continue
            out.append(self.one("golden", label, case, expected))
        return out

    def boundary(self) -> list[CaseResult]:
        """Every boundary case of the row, expected from the reference in this run."""
        cases = self.spec.boundary() if self.spec.boundary else []
        if not cases:
            return [CaseResult(self.spec.name, "boundary", "*", SKIP, "the row has no boundary cases")]
        out = []
        for b in cases:
            case, label = self.prepare(b.case), self.label(b.label, b.case)
            try:
                exp = self.expected(case)
            except Exception as exc:
                if _overridden(b.case, self.opts):  # the target's options made the case invalid: not this op's bug
                    out.append(
                        CaseResult(
                            self.spec.name,
                            "boundary",
                            label,
                            UNSUPPORTED,
                            f"not run: the reference rejects the case under the target's options "
                            f"({type(exc).__name__}: {exc})",
                            n_cases=1,
                            classes=list(b.classes),
                        )
                    )
                    continue
                out.append(
                    CaseResult(
                        self.spec.name,
                        "boundary",
                        label,
                        FAIL,
                        f"the reference rejected a boundary case (a table bug): {type(exc).__name__}: {exc}",
                        n_cases=1,
                        classes=list(b.classes),
                    )
                )
                continue
            out.append(self.one("boundary", label, case, exp, b.classes))
        return out

    def failure(
        self, case: dict[str, Any], tier: str = "properties", label: str = ""
    ) -> tuple[str, float | None] | None:
        """(message, ratio) where the target fails on the prepared ``case`` outside any known divergence, else
        None (also where the reference or the target's declared domain rejects the case)."""
        if self.outside(case):
            return None
        try:
            exp = self.expected(case)
        except Exception:
            return None
        try:
            act = self.actual(case, tier, "shrinking shapes")
        except Exception as exc:
            return (
                None
                if self.known_raise(case, exc, tier, label)
                else (f"target raised {type(exc).__name__}: {exc}" + self.last_dependent, None)
            )
        v = compare(self.spec.tolerance, act, exp, case, self.dtype)
        if v.passed or self.known(case, act, exp, tier, label):
            return None
        return v.message + self.last_dependent, v.worst_ratio

    def smaller(
        self,
        case: dict[str, Any],
        found: tuple[str, float | None],
        tries: int = SHRINK_TRIES,
        *,
        tier: str = "properties",
        label: str = "",
        same: Callable[[str], bool] = lambda msg: True,
    ) -> tuple[dict[str, Any], tuple[str, float | None]]:
        """Shrink the shapes of a failing case (Hypothesis shrinks the values it drew; a case's shapes are often
        drawn through sizes it cannot shorten without losing the failure): greedily cut array axes to 1, half or
        one less (every array that shares the axis length at once, then one array alone, from the front or the
        back) while the target still fails (with a message ``same`` accepts) and the reference still accepts the
        case."""

        def cut(a: np.ndarray, axis: int, m: int, tail: bool) -> np.ndarray:
            n = a.shape[axis]
            idx = [slice(None)] * a.ndim
            idx[axis] = slice(n - m, n) if tail else slice(0, m)
            return np.ascontiguousarray(a[tuple(idx)])

        def moves(c: dict[str, Any]) -> Iterable[dict[str, Any]]:
            arrays = {k: v for k, v in c.items() if isinstance(v, np.ndarray) and v.ndim}
            lengths = sorted({n for v in arrays.values() for n in v.shape if n > 1}, reverse=True)
            for n in lengths:
                for m in dict.fromkeys((1, n // 2, n - 1)):
                    yield {**c, **{k: _cut_all(v, n, m, cut) for k, v in arrays.items() if n in v.shape}}
            for k, v in arrays.items():
                for axis, n in enumerate(v.shape):
                    for m in dict.fromkeys((1, n // 2, n - 1)):
                        if 0 < m < n:
                            yield {**c, k: cut(v, axis, m, False)}
                            yield {**c, k: cut(v, axis, m, True)}

        def size(c: dict[str, Any]) -> int:
            return sum(v.size for v in c.values() if isinstance(v, np.ndarray))

        improved = True
        while improved and tries > 0:
            improved = False
            for cand in moves(case):
                if size(cand) >= size(case):
                    continue
                tries -= 1
                got = self.failure(cand, tier, label)
                if got is not None and same(got[0]):
                    case, found, improved = cand, got, True
                    break
                if tries <= 0:
                    break
        return case, found

    def _tier_outcome(self, label: str, stats: dict[str, Any], known: dict[str, int]) -> list[CaseResult]:
        """The pass row of a properties run that found no failure: the examples compared against the reference
        alone. None where every example was a known divergence (its xfail rows stand for the tier); a skip where
        nothing was compared at all, since a tier that checked no example must not read as a pass."""
        n_own = stats["n"] - sum(known.values())
        if n_own > 0:
            detail = f"worst error/bound {stats['worst']:.3g}" if self.spec.tolerance.kind == "bounded" else "bit-exact"
            return [
                CaseResult(
                    self.spec.name,
                    "properties",
                    label,
                    PASS,
                    f"{n_own} examples, {detail}",
                    worst_ratio=stats["worst"],
                    n_cases=n_own,
                )
            ]
        if known:
            return []
        msg = "no drawn example ran: every draw fell outside the target's domain"
        return [CaseResult(self.spec.name, "properties", label, SKIP, msg, n_cases=0)]

    def properties(self, examples: int, seed: int | None = None) -> list[CaseResult]:
        from hypothesis import HealthCheck, Verbosity, given, settings
        from hypothesis import seed as hseed
        from hypothesis.errors import Unsatisfiable

        label = "differential" if seed is None else f"differential (seed {seed})"
        stats: dict[str, Any] = {"n": 0, "worst": 0.0}
        known: dict[str, int] = {}
        outside: dict[str, int] = {}
        redrawn: dict[str, int] = {}
        failing: dict[str, Any] = {}

        strategy = self.spec.strategy()
        if self.support or getattr(self.target, "unsupported", None):

            def inside(drawn: dict[str, Any]) -> bool:
                """Draw only inside the declared domain (``supports`` and ``unsupported``); count the rest."""
                why = self.outside(self.prepare(drawn))
                if why and not failing:  # not while shrinking a failure
                    redrawn[why] = redrawn.get(why, 0) + 1
                return not why

            strategy = strategy.filter(inside)

        @settings(
            max_examples=examples,
            derandomize=seed is None,
            database=None,
            deadline=None,
            verbosity=Verbosity.quiet,
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
            print_blob=False,
        )
        @given(strategy)
        def prop(drawn: dict[str, Any]) -> None:
            case = self.prepare(drawn)
            why = self.outside(case)
            if why:
                outside[why] = outside.get(why, 0) + 1
                return
            try:
                exp = self.expected(case)
            except Exception as exc:
                if _overridden(drawn, self.opts):  # the target's options made the drawn case invalid
                    why = "the reference rejects the drawn case under the target's options"
                    outside[why] = outside.get(why, 0) + 1
                    return
                failing.update(
                    case=case,
                    msg=f"the reference rejected a generated case (a strategy bug): {type(exc).__name__}: {exc}",
                    ratio=None,
                )
                raise
            try:
                act = self.actual(case, "properties", label)
            except Exception as exc:
                div = self.known_raise(case, exc, "properties", label)
                if div:
                    known[div] = known.get(div, 0) + (not failing)  # examples of the shrink phase are not counted
                    return
                msg = f"target raised {type(exc).__name__}: {exc}" + self.last_dependent
                failing.update(case=case, msg=msg, ratio=None)
                raise AssertionError(failing["msg"]) from exc
            v: Verdict = compare(self.spec.tolerance, act, exp, case, self.dtype)
            stats["n"] += not failing
            if not v.passed:
                div = self.known(case, act, exp, "properties", label)
                if div:
                    known[div] = known.get(div, 0) + (not failing)  # examples of the shrink phase are not counted
                    return
                failing.update(case=case, msg=v.message + self.last_dependent, ratio=v.worst_ratio)
                raise AssertionError(v.message)
            stats["worst"] = max(stats["worst"], v.worst_ratio)

        if seed is not None:
            prop = hseed(seed)(prop)
        out = []
        declared = "; ".join(
            f"{k} in {{{', '.join(repr(a) for a in sorted(v, key=repr))}}}" for k, v in self.support.items()
        )
        try:
            prop()
        except Unsatisfiable:
            out.append(
                CaseResult(
                    self.spec.name,
                    "properties",
                    f"{label}: outside the declared domain",
                    UNSUPPORTED,
                    f"no drawn input lies in the declared domain ({declared})",
                    n_cases=0,
                )
            )
            return out
        except Exception as exc:
            if not failing:
                out.append(
                    CaseResult(
                        self.spec.name, "properties", label, FAIL, f"{type(exc).__name__}: {exc}", n_cases=stats["n"]
                    )
                )
            else:
                case, (msg, ratio) = failing["case"], (failing["msg"], failing.get("ratio"))
                if "strategy bug" not in msg:
                    case, (msg, ratio) = self.smaller(case, (msg, ratio))
                failing.update(msg=msg)
                out.append(
                    CaseResult(
                        self.spec.name,
                        "properties",
                        label,
                        FAIL,
                        msg,
                        worst_ratio=ratio,
                        n_cases=stats["n"],
                        snippet=self.snip(case, "smallest failing input (shrunk): " + failing["msg"]),
                        reproducer=self.reproducer(case),
                        path=code_path(case),
                    )
                )
        else:
            out += self._tier_outcome(label, stats, known)
        if self.support:
            out.append(
                CaseResult(
                    self.spec.name,
                    "properties",
                    f"{label}: drawn within the declared domain",
                    UNSUPPORTED,
                    f"inputs were drawn only where {declared} (the target's supports)",
                    n_cases=0,
                )
            )
        for why, n in outside.items():
            out.append(
                CaseResult(
                    self.spec.name,
                    "properties",
                    f"{label}: outside the declared domain",
                    UNSUPPORTED,
                    f"{n} drawn cases not run: {why}",
                    n_cases=n,
                )
            )
        for why, n in redrawn.items():
            out.append(
                CaseResult(
                    self.spec.name,
                    "properties",
                    f"{label}: outside the declared domain",
                    UNSUPPORTED,
                    f"{n} drawn cases outside the declared domain, drawn again: {why}",
                    n_cases=0,
                )
            )
        for div, n in known.items():
            out.append(
                CaseResult(
                    self.spec.name,
                    "properties",
                    f"{label}: known divergence",
                    XFAIL,
                    f"{n} drawn cases reproduced by the divergence's model",
                    n_cases=n,
                    divergence=div,
                )
            )
        return out

    def special(self) -> list[CaseResult]:
        out = []
        for sp in self.spec.specials() if self.spec.specials else []:
            case, sp_label = self.prepare(sp.case), self.label(sp.label, sp.case)
            try:
                exp, ref_exc = self.expected(case), None
            except (ValueError, TypeError) as exc:
                exp, ref_exc = None, exc
            if exp is not None:
                out.append(self.one("special", sp_label, case, exp))
                continue
            try:
                self.actual(case, "special", sp_label)
                tgt_exc: Exception | None = None
            except Exception as exc:
                tgt_exc = exc
            name = self.spec.name
            if isinstance(tgt_exc, (ValueError, TypeError)) or (tgt_exc is not None and self.outside(case)):
                out.append(
                    CaseResult(name, "special", sp_label, PASS, f"rejected: {type(tgt_exc).__name__}", n_cases=1)
                )
            else:
                got = "returned a result" if tgt_exc is None else f"raised {type(tgt_exc).__name__}: {tgt_exc}"
                msg = f"the reference raises {type(ref_exc).__name__} ({ref_exc}); the target {got}"
                out.append(
                    CaseResult(
                        name,
                        "special",
                        sp_label,
                        FAIL,
                        msg,
                        n_cases=1,
                        snippet=self.snip(case, f"special value '{sp_label}': {msg}"),
                        path=code_path(case),
                    )
                )
        if not out:
            out.append(CaseResult(self.spec.name, "special", "*", NA, "no special values for this op"))
        return out


def _label_divergences(results: list[CaseResult], op: str, target: Target, divs: list[_div.Divergence]) -> None:
    """Turn failures matching a model-less known divergence into xfail."""
    for r in results:
        if r.status != FAIL:
            continue
        for d in divs:
            if not d.model and d.matches(op, target.name, r.tier, r.label):
                r.status, r.divergence = XFAIL, str(d)
                break


def _applicable(divs: list[_div.Divergence], target: Target) -> list[_div.Divergence]:
    """Built-in entries apply to built-in targets only (by class); a user's file applies by target name."""
    builtin = is_builtin(target)
    return [d for d in divs if not d.source.startswith(_div.BUILTIN_FILE.name + "#") or builtin]


@dataclass
class _Task:
    op: str
    tiers: list[str]
    examples: int
    seed: int | None = None
    fail_fast: bool = False


def _run_task(
    task: _Task, spec: OpSpec, chk: _Checker, vectors_dir: Path | None, emit: Callable[[CaseResult], None]
) -> None:
    """The tiers of one op, in order; a failed shapes tier stops the op."""
    for tier in task.tiers:
        t1 = time.perf_counter()
        if tier not in spec.tiers:
            new = [CaseResult(spec.name, tier, "*", NA, "tier not applicable to this op")]
        elif tier == "shapes":
            new = [chk.shapes()]
        elif tier == "golden":
            new = chk.golden(vectors_dir)
        elif tier == "boundary":
            new = chk.boundary()
        elif tier == "properties":
            new = chk.properties(task.examples, task.seed)
        else:
            new = chk.special()
        _label_divergences(new, spec.name, chk.target, chk.divs)
        for r in new:
            r.seconds = time.perf_counter() - t1
            emit(r)
        if any(r.status == FAIL for r in new) and (tier == "shapes" or task.fail_fast):
            why = "the shapes tier failed" if tier == "shapes" else f"the {tier} tier failed (fail-fast)"
            for later in task.tiers[task.tiers.index(tier) + 1 :]:
                emit(CaseResult(spec.name, later, "*", NA, f"not run: {why}"))
            return


def _execute(executor: Executor, task: _Task) -> list[CaseResult]:
    """Run one task through the executor; a crash, an exit or a hang of the target is a failure."""
    raw, lost, crash = executor.run(asdict(task))
    out = [CaseResult(**r) for r in raw]
    if crash is not None:
        out.append(
            CaseResult(
                task.op,
                crash.tier,
                crash.label,
                FAIL,
                f"the target {crash.what} during {crash.tier} case {crash.label!r} (a BaseException: "
                "it would end the caller's process)",
                n_cases=1,
            )
        )
    if lost is not None:
        out.append(
            CaseResult(
                task.op,
                lost.tier,
                lost.label,
                FAIL,
                f"the target {lost.what} during {lost.tier} case {lost.label!r}",
                n_cases=1,
            )
        )
    return out


def _coverage(specs: list[OpSpec], results: list[CaseResult], present: set[str]) -> dict[str, dict[str, int]]:
    cov: dict[str, dict[str, int]] = {}
    for spec in specs:
        if spec.name not in present or not spec.classes or "boundary" not in spec.tiers:
            continue
        hits = dict.fromkeys(spec.classes, 0)
        declared_out: set[str] = set()
        for r in results:
            if r.op == spec.name and r.tier == "boundary":
                for c in r.classes:
                    if c in hits and r.status in (PASS, FAIL, XFAIL):
                        hits[c] += 1
                    elif r.status == UNSUPPORTED:
                        declared_out.add(c)
        # a class reached only by cases the target declares unsupported is reported as such, not as a gap
        cov[spec.name] = {c: (n if n or c not in declared_out else -1) for c, n in hits.items()}
    return cov


def _unchecked(target: Target, patterns: str | Iterable[str] | None) -> list[str]:
    provided = provided_ops(target)
    if patterns is not None:
        pats = [p.strip() for p in patterns.split(",")] if isinstance(patterns, str) else list(patterns)
        provided = [op for op in provided if any(fnmatch.fnmatchcase(op, p) for p in pats if p)]
    table = op_table()
    return sorted(op for op in provided if op not in table)


def run(
    target: str | Target = "auto",
    ops: str | Iterable[str] | None = None,
    *,
    examples: int = DEFAULT_EXAMPLES,
    tiers: Iterable[str] = TIERS,
    divergences: list[str | Path] | None = None,
    vectors_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    isolate: bool = True,
    budget: float = 0.0,
    fail_fast: bool = False,
    compute_dtype: str | None = None,
    profile: str | None = None,
) -> RunResult:
    """Check ``target`` against the reference on the selected ops (globs, e.g. "quant.*").

    ``timeout`` bounds each call of the target (seconds); ``isolate`` runs the target in a forked
    worker so that an exit or a crash is a failure, not the end of the run; ``budget`` spends that
    many more seconds on freshly seeded random examples after the default tiers; ``fail_fast`` stops
    an op at its first failing tier (the verdict is the same, reached sooner). ``compute_dtype`` and
    ``profile`` declare, for a user target, the precision it computes in (its error bounds) and the
    profile its quant or merging ops follow (docs/targets.md).
    """
    if not (timeout > 0 and np.isfinite(timeout)):
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    if not (budget >= 0 and np.isfinite(budget)):
        raise ValueError(f"budget: expected a non-negative number of seconds, got {budget!r}")
    if examples < 1:
        raise ValueError(f"examples: expected a positive integer, got {examples!r}")
    start = time.perf_counter()
    say = progress or (lambda msg: None)
    tgt = get_target(target)
    if compute_dtype is not None or profile is not None:
        if is_builtin(tgt):
            raise ValueError(
                f"compute_dtype, profile: the built-in target {tgt.name} declares its own; these are "
                "for a user target (module:object)"
            )
        tgt = declare(tgt, compute_dtype=compute_dtype, profile=profile)
    tiers = [t for t in TIERS if t in set(tiers)]
    specs = select(ops)
    if not specs:
        raise ValueError(f"ops: no op matches {ops!r}")
    divs = _applicable(_div.load_all(divergences), tgt)
    vdir = Path(vectors_dir) if vectors_dir is not None else None
    say(f"refimpl conform: target {tgt.name}, {len(specs)} ops, tiers {', '.join(tiers)}, {examples} examples")

    results: list[CaseResult] = []
    checkers: dict[str, _Checker] = {}
    for spec in specs:
        f = tgt.lookup(spec.name)
        if f is None:
            results.append(
                CaseResult(spec.name, "names", "*", ABSENT, f"target {tgt.name} does not provide {spec.name}")
            )
            continue
        if "names" in tiers:
            results.append(CaseResult(spec.name, "names", "*", PASS, "present", n_cases=1))
        checkers[spec.name] = _Checker(spec, tgt, f, divs, lambda tier, label: None)
        checkers[spec.name].source = target_source(target, tgt)

    later = [t for t in tiers if t != "names"]
    by_name = {s.name: s for s in specs}

    def run_task(task: dict[str, Any], beat: Callable[[str, str], None], emit: Callable[[dict[str, Any]], None]):
        chk = checkers[task["op"]]
        chk.beat = beat
        _run_task(_Task(**task), by_name[task["op"]], chk, vdir, lambda r: emit(asdict(r)))

    fork_safe = bool(getattr(tgt, "fork_safe", True))
    executor = Executor(run_task, timeout, isolate and fork_safe)
    try:
        for name in checkers:
            t0 = time.perf_counter()
            new = _execute(executor, _Task(name, later, examples, fail_fast=fail_fast))
            results += new
            bad = sum(r.status == FAIL for r in new)
            failed = f", {bad} FAILED" if bad else ""
            say(f"  {name:<34} {len(new)} results{failed}  ({time.perf_counter() - t0:.1f} s)")
        rounds, deadline = 0, time.perf_counter() + budget
        while budget and "properties" in later and time.perf_counter() < deadline:
            rounds += 1
            for name in checkers:
                if time.perf_counter() >= deadline:
                    break
                results += _execute(executor, _Task(name, ["properties"], examples, seed=rounds))
        if rounds:
            say(f"budget: {rounds} extra round(s) of {examples} seeded examples per op")
    finally:
        executor.close()

    for tier in tiers:
        tier_res = [r for r in results if r.tier == tier]
        counts = {s: sum(r.status == s for r in tier_res) for s in (PASS, FAIL, XFAIL, SKIP, ABSENT, NA)}
        say(f"tier {tier:<10} " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))

    warnings = []
    for d in divs:
        applicable = [op for op in checkers if d.applies(op, tgt.name)]
        dependent = DEPENDENT_MODEL.format(source=d.source, model=d.model)
        n_dependent = sum(dependent in r.message for r in results if r.status == FAIL)
        if d.model and n_dependent:
            warnings.append(
                f"the model of known divergence {d} [{d.source}] runs the target's own code, so it was not applied "
                f"and the {n_dependent} failing result(s) it would have explained stay failures: a model that calls "
                "the target reproduces every bug on that path; compute the target's intended behaviour "
                "independently (from the reference, NumPy, ml_dtypes), docs/targets.md §5"
            )
        elif applicable and not any(r.divergence == str(d) for r in results):
            warnings.append(
                f"known divergence matched nothing (fixed upstream, not exercised on this host, or a "
                f"stale entry): {d} [{d.source}]"
            )
    notes_fn = getattr(tgt, "notes", None)
    notes = list(notes_fn()) if notes_fn else []
    if target == "auto":
        from refimpl.conformance.targets import auto_reason

        notes.insert(0, auto_reason())
    if isolate and not fork_safe:
        notes.append(
            f"target {tgt.name} cannot run in a forked worker (fork_safe is False): it ran in this process, "
            "so an exit or a hang of the target would end the run instead of failing one op"
        )
    coverage = _coverage(specs, results, set(checkers)) if "boundary" in tiers else {}
    return RunResult(
        tgt.name,
        results,
        warnings,
        time.perf_counter() - start,
        {
            "examples": examples,
            "tiers": tiers,
            "ops": [s.name for s in specs],
            "timeout": timeout,
            "compute_dtype": compute_dtype,
            "profile": profile,
            "isolate": executor.isolate,
            "budget": budget,
            "fail_fast": fail_fast,
        },
        coverage=coverage,
        unchecked=_unchecked(tgt, ops),
        notes=notes,
    )


def assert_conforms(target: str | Target, ops: str | Iterable[str] | None = None, **kwargs: Any) -> RunResult:
    """Run and raise AssertionError with the failures' snippets unless the target conforms."""
    res = run(target, ops, **kwargs)
    if not res.ok:
        raise AssertionError(f"verdict {res.verdict}\n" + "\n".join(res.gaps[:20]) + "\n" + failures_text(res))
    return res
