"""Robustness: every public function, fed invalid input, raises ValueError or TypeError —
never another exception, a crash or a silent result.

Two sweeps:
1. every op of the conformance table: its canonical case with one argument at a time replaced by a
   wrong rank, wrong shape, wrong dtype, NaN / ±inf, an empty array, or an out-of-range option;
   non-finite values, empty arrays, wrong dtypes and bad options must be rejected, while a changed
   shape may be legal (leading batch dimensions) and then only another exception type fails;
2. every other public function of the reference modules: all required arguments replaced by junk.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import numpy as np
import pytest

from refimpl.conformance.table import op_table

MODULES = ("lora", "dora", "quant", "qlora", "merging", "memory", "precision", "io")

MUST_REJECT = "must reject"
MAY_ACCEPT = "may accept"


def _mutations(name: str, value: Any) -> list[tuple[str, str, Any]]:
    """(label, policy, new value) for one argument."""
    out: list[tuple[str, str, Any]] = []
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" or value.dtype.name == "bfloat16":
            for label, v in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
                bad = value.astype(np.float32 if value.dtype.name == "bfloat16" else value.dtype).copy()
                bad.flat[0] = v
                out.append((label, MUST_REJECT, bad.astype(value.dtype)))
            out.append(("complex dtype", MUST_REJECT, value.astype(np.complex128)))
        out.append(("string dtype", MUST_REJECT, value.astype(str)))
        out.append(("empty", MUST_REJECT, np.zeros((0,) * max(value.ndim, 1), value.dtype)))
        out.append(("extra axis", MAY_ACCEPT, value[..., None]))
        if value.ndim:
            out.append(("one element short", MAY_ACCEPT, value[..., :-1] if value.shape[-1] > 1 else value[..., :0]))
        out.append(("scalar", MAY_ACCEPT, value.reshape(-1)[0] if value.size else value))
    elif isinstance(value, list) and value and isinstance(value[0], np.ndarray):
        out.append(("empty list", MUST_REJECT, []))
        out.append(("list of strings", MUST_REJECT, ["a"] * len(value)))
        bad = [v.copy() for v in value]
        if bad[0].dtype.kind == "f":
            bad[0].flat[0] = np.nan
            out.append(("nan in first", MUST_REJECT, bad))
    elif isinstance(value, bool):
        out.append(("string for bool", MUST_REJECT, "yes"))
    elif isinstance(value, int):
        out += [("negative", MUST_REJECT, -3), ("float for int", MUST_REJECT, 2.5), ("string", MUST_REJECT, "4")]
    elif isinstance(value, float):
        out += [("nan", MUST_REJECT, float("nan")), ("inf", MUST_REJECT, float("inf")), ("string", MUST_REJECT, "1")]
    elif isinstance(value, str):
        out.append(("unknown option", MUST_REJECT, "bogus-option"))
    elif isinstance(value, list) and value and isinstance(value[0], float):
        out += [("nan weight", MUST_REJECT, [float("nan")] * len(value)), ("empty weights", MUST_REJECT, [])]
    return out


#: calls that are legal although the sweep marks them "must reject": (op, argument, mutation)
LEGAL = {
    ("merging.dare", "masks", "nan in first"),  # masks are boolean: no NaN to inject
    ("lora.embedding_forward", "ids", "empty"),  # an empty batch of token ids is a valid lookup (shape (0, d))
    ("dora.embedding_forward", "ids", "empty"),  # the same lookup as LoRA's: (0, d)
    # check_4bit classifies what an implementation did with NaN/inf in x ("special", spec/nf4.md §11):
    # a non-finite x is its input domain, not an error
    ("quant.check_4bit", "x", "nan"),
    ("quant.check_4bit", "x", "inf"),
    ("quant.check_4bit", "x", "-inf"),
    # NaN/inf in a stored absmax propagate by the spec (bitsandbytes' CPU NaN poisoning, spec/nf4.md)
    ("quant.dequantize_blockwise_8bit", "absmax", "nan"),
    ("quant.dequantize_blockwise_8bit", "absmax", "inf"),
    ("quant.dequantize_blockwise_8bit", "absmax", "-inf"),
}

#: junk that is valid input by design: comparing empty arrays is a trivially passing comparison
VALID_JUNK = {"precision.compare_to_bound": {"empty"}}


def _table_cases():
    for name, spec in op_table().items():
        base = spec.example()
        for arg, value in base.items():
            for label, policy, new in _mutations(arg, value):
                yield pytest.param(name, arg, label, policy, new, id=f"{name}-{arg}-{label}")


@pytest.mark.parametrize("op, arg, label, policy, new", list(_table_cases()))
def test_op_rejects_invalid_input_with_value_or_type_error(op, arg, label, policy, new):
    spec = op_table()[op]
    case = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in spec.example().items()}
    case[arg] = new
    try:
        with np.errstate(all="ignore"):
            spec.reference()(**case)
    except (ValueError, TypeError) as exc:
        assert str(exc), "the error message must say what was expected"
        return
    except Exception as exc:
        pytest.fail(f"{op}({arg}={label}) raised {type(exc).__name__}: {exc} — expected ValueError/TypeError")
    if policy == MUST_REJECT and (op, arg, label) not in LEGAL:
        pytest.fail(f"{op}({arg}={label}) returned a result silently; expected ValueError/TypeError")


def _public_functions():
    covered = set(op_table())
    for mod_name in MODULES:
        mod = importlib.import_module(f"refimpl.{mod_name}")  # a broken import fails collection, never a skip
        names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        for n in names:
            f = getattr(mod, n, None)
            if not inspect.isfunction(f):
                continue
            own = f.__module__ == mod.__name__ or f.__module__.startswith(mod.__name__ + ".")
            if not own or f"{mod_name}.{n}" in covered:
                continue
            if n == "main":
                continue  # command-line entry points take argv
            yield pytest.param(mod_name, n, id=f"{mod_name}.{n}")


JUNK = {"None": None, "str": "bogus", "nan": np.array([np.nan]), "empty": np.zeros((0,)), "object": object()}


@pytest.mark.parametrize("mod_name, func", list(_public_functions()))
def test_public_function_rejects_junk_with_value_or_type_error(mod_name, func):
    f = getattr(importlib.import_module(f"refimpl.{mod_name}"), func)
    params = [
        p
        for p in inspect.signature(f).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    kwonly = {
        p.name: None
        for p in inspect.signature(f).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind == p.KEYWORD_ONLY
    }
    if not params and not kwonly:
        pytest.skip("no required arguments")
    for label, junk in JUNK.items():
        if label in VALID_JUNK.get(f"{mod_name}.{func}", ()):
            continue
        try:
            with np.errstate(all="ignore"):
                f(*[junk] * len(params), **{k: junk for k in kwonly})
        except (ValueError, TypeError):
            continue
        except Exception as exc:
            pytest.fail(f"refimpl.{mod_name}.{func}(*{junk!r}) raised {type(exc).__name__}: {exc}")
        pytest.fail(f"refimpl.{mod_name}.{func}(*{junk!r}) returned a result silently")
