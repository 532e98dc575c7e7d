"""Plumbing shared by the harness: converting a target's outputs to NumPy,
flattening structured results into named arrays, and writing a case as a
paste-able Python snippet."""

from __future__ import annotations

import dataclasses
import keyword
import reprlib
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np


def to_numpy(x: Any) -> Any:
    """A NumPy array from a NumPy, DLPack-capable (CuPy, torch, JAX) or array-like value.

    Scalars (int, float, bool, str, None) are returned unchanged.
    """
    if x is None or isinstance(x, (bool, int, float, str, np.ndarray, np.generic)):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch: bfloat16 has no NumPy/DLPack path
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy()
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError):
            pass
    return np.asarray(x)


def flatten(result: Any, prefix: str = "out") -> dict[str, np.ndarray]:
    """Named arrays of an op's result: an array is ``out``; a dataclass or named tuple
    gives ``out.<field>`` per field (None fields are left out); scalars become 0-d arrays."""
    items: dict[str, np.ndarray] = {}
    if result is None:
        return items
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        for f in dataclasses.fields(result):
            items.update(flatten(getattr(result, f.name), f"{prefix}.{f.name}"))
        return items
    if isinstance(result, tuple) and hasattr(result, "_fields"):
        for name in result._fields:
            items.update(flatten(getattr(result, name), f"{prefix}.{name}"))
        return items
    if isinstance(result, Mapping):
        for k, v in result.items():
            items.update(flatten(v, f"{prefix}.{k}"))
        return items
    if isinstance(result, (tuple, list)) and not all(isinstance(v, (int, float)) for v in result):
        for i, v in enumerate(result):
            items.update(flatten(v, f"{prefix}.{i}"))
        return items
    if isinstance(result, (str, np.dtype)):  # names (a dtype, a quant type, a profile) are compared as text
        items[prefix] = np.asarray(str(result))
        return items
    arr = to_numpy(result)
    items[prefix] = np.asarray(arr)
    return items


def _float_literal(v: float) -> str:
    if np.isnan(v):
        return "np.nan"
    if np.isinf(v):
        return "np.inf" if v > 0 else "-np.inf"
    return repr(float(v))


def _dtype_literal(dt: np.dtype) -> str:
    """``np.<name>`` for NumPy's own scalar types, else ``np.dtype('<str>')`` (both from data, never raw text)."""
    if dt.name.isidentifier() and getattr(np, dt.name, None) is dt.type:
        return f"np.{dt.name}"
    return f"np.dtype({dt.str!r})"


def _array_literal(a: np.ndarray) -> str:
    dt = a.dtype
    if dt == np.dtype(ml_dtypes.bfloat16):
        return f"np.array({_nested(a.astype(np.float64))}).astype(ml_dtypes.bfloat16)"
    if dt.kind == "f":
        return f"np.array({_nested(a.astype(np.float64))}, dtype={_dtype_literal(dt)})"
    if dt.kind in "biu":
        return f"np.array({np.asarray(a).tolist()!r}, dtype={_dtype_literal(dt)})"
    return f"np.array({_literal(np.asarray(a).tolist(), set())}, dtype={_dtype_literal(dt)})"


def _nested(a: np.ndarray) -> str:
    if a.ndim == 0:
        return _float_literal(float(a))
    if a.size == 0:
        return f"np.zeros({tuple(int(n) for n in a.shape)!r})"
    return "[" + ", ".join(_nested(row) for row in a) + "]"


def rng_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    """A NumPy Generator in exactly the given ``bit_generator.state`` (how a snippet rebuilds a case's rng)."""
    name = state.get("bit_generator") if isinstance(state, Mapping) else None
    cls = getattr(np.random, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, np.random.BitGenerator)):
        raise ValueError(f"state: expected a NumPy bit generator state, got {state!r}")
    bg = cls()
    bg.state = dict(state)
    return np.random.Generator(bg)


def _qualified(cls: type, imports: set[str]) -> str | None:
    """``module.Class`` for a refimpl class whose name is plain identifiers, recording the import; else None."""
    module, name = cls.__module__, cls.__qualname__
    parts = [*module.split("."), *name.split(".")]
    if module.split(".")[0] != "refimpl" or not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        return None
    imports.add(module)
    return f"{module}.{name}"


def _placeholder(v: Any) -> str:
    """A string literal standing in for a value that has no source form (never its repr as code)."""
    return repr(f"<no literal for {type(v).__qualname__}: {reprlib.repr(v)}>")


def _quant_state_literal(state: Any, imports: set[str]) -> str:
    """``refimpl.quant.QuantState(shape=..., quant_type='nf4', absmax=..., ...)``; a code table equal to a
    built-in codebook prints as ``codebook('<name>')``."""
    from refimpl.quant import codebooks  # refimpl.quant imports numba-free NumPy only, but not at harness import

    imports.add("refimpl.quant")
    imports.add("refimpl.quant.codebooks")
    parts = []
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        src = _literal(value, imports)
        if f.name in ("code", "nested_code") and isinstance(value, np.ndarray):
            for name in (state.quant_type, "dynamic8"):
                try:
                    book = np.asarray(codebooks.codebook(name), np.float32)
                except (ValueError, KeyError):
                    continue
                if book.shape == value.shape and book.tobytes() == value.astype(np.float32).tobytes():
                    src = f"refimpl.quant.codebooks.codebook({name!r})"
                    break
        elif f.name == "offset" and value is not None:
            src = f"np.float32({_float_literal(float(value))})"
        parts.append(f"{f.name}={src}")
    return "refimpl.quant.QuantState(" + ", ".join(parts) + ")"


def _literal(v: Any, imports: set[str]) -> str:
    """Python source for ``v``, built from its data; modules the expression needs are added to ``imports``."""
    if v is None or isinstance(v, (bool, int, str, bytes, complex)):
        return repr(v)  # the repr of these types is a literal: a newline in a str is written as \n
    if isinstance(v, float):
        return _float_literal(v)
    if isinstance(v, np.ndarray):
        return _array_literal(v)
    if isinstance(v, np.generic):
        return _literal(v.item(), imports)
    if isinstance(v, np.dtype):
        return f"np.dtype({v.str!r})"
    if isinstance(v, np.random.Generator):
        seed = getattr(v, "seed", None)  # rows_lora.SeededRng: prints as the seed it was made from
        if isinstance(seed, int) and not isinstance(seed, bool):
            return f"np.random.default_rng({int(seed)!r})"
        imports.add("refimpl.conformance._values")
        return f"refimpl.conformance._values.rng_from_state({_literal(v.bit_generator.state, imports)})"
    if hasattr(v, "to_bnb_dict") and dataclasses.is_dataclass(v):  # refimpl.quant.QuantState: its constructor
        return _quant_state_literal(v, imports)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        name = _qualified(type(v), imports)
        if name is None:
            return _placeholder(v)
        fields = ", ".join(
            f"{f.name}={_literal(getattr(v, f.name), imports)}"
            for f in dataclasses.fields(v)
            if f.init and f.name.isidentifier() and not keyword.iskeyword(f.name)
        )
        return f"{name}({fields})"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_literal(k, imports)}: {_literal(x, imports)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        body = ", ".join(_literal(x, imports) for x in v)
        return f"[{body}]" if isinstance(v, list) else f"({body}{',' if len(v) == 1 else ''})"
    return _placeholder(v)


def literal(v: Any) -> str:
    """Python source that rebuilds ``v`` exactly (float64 repr round-trips).

    Every piece is built from data with ``repr`` of a str, int, float or bytes, so no text carried
    by a value (a label, a message, a key) can become a statement; a value with no source form
    becomes a string placeholder.
    """
    return _literal(v, set())


def comment(text: str) -> list[str]:
    """``text`` as comment lines: every line (any line break Python or str.splitlines knows) starts with
    "# ", and control characters are escaped, so no part of the text can become code."""
    lines = str(text).splitlines() or [""]
    return ["# " + "".join(c if c.isprintable() else repr(c)[1:-1] for c in line) for line in lines]


def _is_name(s: Any) -> bool:
    return isinstance(s, str) and s.isidentifier() and not keyword.iskeyword(s)


def snippet(op: str, target: str | None, case: Mapping[str, Any], note: str = "") -> str:
    """A Python snippet that reproduces one case: reference vs target, side by side.

    Code lines are built from data only (``repr`` of names and values, see ``literal``); ``note``,
    which may carry a target's exception message or a golden vector's case label, is written as
    sanitized comment lines. Argument names that are not identifiers go through a ``case`` dict.
    """
    module, _, func = str(op).rpartition(".")
    imports: set[str] = set()
    values = {k: _literal(v, imports) for k, v in case.items()}
    lines = comment(note) if note else []
    lines += ["import ml_dtypes", "import numpy as np", "import refimpl"]
    if module and all(_is_name(p) for p in module.split(".")) and _is_name(func):
        lines.append(f"import refimpl.{module} as ref")
        call = f"ref.{func}"
    else:
        lines.append("import importlib")
        call = f"getattr(importlib.import_module('refimpl.' + {module!r}), {func!r})"
    lines += [f"import {m}" for m in sorted(imports)]
    if target is not None:
        lines += ["from refimpl.conformance import get_target", "", f"target = get_target({str(target)!r})"]
    lines += [
        "",
        "",
        "def outcome(f, *args, **kwargs):",
        '    """f(...), or the exception it raises (a special case may expect one)."""',
        "    try:",
        "        return f(*args, **kwargs)",
        "    except Exception as exc:",
        "        return exc",
        "",
        "",
    ]
    if all(_is_name(k) for k in case):
        lines += [f"{k} = {src}" for k, src in values.items()]
        args = ", ".join(f"{k}={k}" for k in case)
    else:
        lines.append("case = {" + ", ".join(f"{_literal(k, imports)}: {src}" for k, src in values.items()) + "}")
        args = "**case"
    lines += ["", f"expected = outcome({call}{', ' if args else ''}{args})"]
    if target is not None:
        lines.append(f"actual = outcome(target.lookup({str(op)!r}){', ' if args else ''}{args})")
    else:  # an object given to run() directly: it has no name get_target could resolve
        lines += [
            f"actual = ...  # your target's lookup({str(op)!r}) called with the same arguments (the target was "
            "given as an object, with no importable name)"
        ]
    lines += ["print('expected:', expected)", "print('actual:  ', actual)"]
    return "\n".join(lines)
