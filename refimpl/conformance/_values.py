"""Plumbing shared by the harness: converting a target's outputs to NumPy,
flattening structured results into named arrays, and writing a case as a
paste-able Python snippet."""

from __future__ import annotations

import dataclasses
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
    if isinstance(result, str):
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


def _array_literal(a: np.ndarray) -> str:
    dt = a.dtype
    if dt == np.dtype(ml_dtypes.bfloat16):
        return f"np.array({_nested(a.astype(np.float64))}).astype(ml_dtypes.bfloat16)"
    if dt.kind == "f":
        return f"np.array({_nested(a.astype(np.float64))}, dtype=np.{dt.name})"
    return f"np.array({np.asarray(a).tolist()!r}, dtype=np.{dt.name})"


def _nested(a: np.ndarray) -> str:
    if a.ndim == 0:
        return _float_literal(float(a))
    if a.size == 0:
        return f"np.zeros({a.shape})"
    return "[" + ", ".join(_nested(row) for row in a) + "]"


def literal(v: Any) -> str:
    """Python source that rebuilds ``v`` exactly (float64 repr round-trips)."""
    if isinstance(v, np.ndarray):
        return _array_literal(v)
    if isinstance(v, np.generic):
        return literal(v.item())
    if isinstance(v, float):
        return _float_literal(v)
    if hasattr(v, "to_bnb_dict") and hasattr(v, "profile"):  # refimpl.quant.QuantState
        items = ", ".join(f"{k!r}: {literal(t)}" for k, t in v.to_bnb_dict().items())
        return f"refimpl.quant.QuantState.from_bnb_dict({{{items}}}, profile={v.profile!r})"
    if isinstance(v, (list, tuple)):
        body = ", ".join(literal(x) for x in v)
        return f"[{body}]" if isinstance(v, list) else f"({body}{',' if len(v) == 1 else ''})"
    return repr(v)


def snippet(op: str, target: str, case: Mapping[str, Any], note: str = "") -> str:
    """A Python snippet that reproduces one case: reference vs target, side by side."""
    module, func = op.rsplit(".", 1)
    lines = ["import ml_dtypes", "import numpy as np", "import refimpl", f"import refimpl.{module} as ref",
             "from refimpl.conformance import get_target", ""]
    if note:
        lines.insert(0, f"# {note}")
    for k, v in case.items():
        lines.append(f"{k} = {literal(v)}")
    args = ", ".join(f"{k}={k}" for k in case)
    lines += ["", f"expected = ref.{func}({args})",
              f"actual = get_target({target!r}).lookup({op!r})({args})"]
    return "\n".join(lines)
