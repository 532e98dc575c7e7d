"""Fast kernels under the reference's names, and a registry to find them.

An op is named ``"<module>.<function>"`` exactly as in the NumPy reference
(``"quant.quantize_4bit"``, ``"merging.ties"``, ``"lora.forward"`` …). A backend is

* ``"numpy"``: the reference itself (``refimpl.<module>.<function>``), always available;
* ``"numba"``: ``refimpl.kernels.numba_cpu.<module>.<function>``, when numba imports;
* ``"cupy"``: ``refimpl.kernels.cupy_gpu.<module>.<function>``, when CuPy imports and sees a GPU.

A backend package provides an op by defining the function in the module of the same name, or
by naming it in a dict ``OPS`` in its ``__init__`` (op name -> callable, or "submodule.function"
relative to the package), which is consulted first; nothing here lists the functions, so
``cupy_gpu`` (or a new backend added to ``BACKENDS``) plugs in without editing this file.
``get`` raises ``LookupError`` naming the reason
when an op or backend is missing; ``ops(backend)`` lists what a backend provides.

The reference never imports this package; kernels never import ``refimpl.conformance``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache
from typing import Any

from refimpl import _checks

#: backend name -> package holding its op modules (None: the reference package itself)
BACKENDS: dict[str, str] = {
    "numpy": "refimpl",
    "numba": "refimpl.kernels.numba_cpu",
    "cupy": "refimpl.kernels.cupy_gpu",
}

#: The ops kernels may provide (the hot paths); ``ops`` checks each backend against this list.
OPS: tuple[str, ...] = (
    "quant.quantize_4bit",
    "quant.dequantize_4bit",
    "qlora.forward",
    "qlora.backward",
    "lora.forward",
    "lora.backward",
    "lora.forward_batched",
    "dora.forward",
    "dora.weight_norm",
    "merging.ties",
)


@cache
def _probe(backend: str) -> str | None:
    """None when the backend can run here, else the reason it cannot."""
    if backend == "numpy":
        return None
    if backend == "numba":
        try:
            importlib.import_module("numba")
        except ImportError as exc:
            return f"numba is not importable ({exc}); install the fast extra: pip install 'refimpl[fast]'"
        return None
    if backend == "cupy":
        try:
            cupy = importlib.import_module("cupy")
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # any failure means no usable GPU
            return f"CuPy with a CUDA GPU is not available ({type(exc).__name__}: {exc})"
        return None if count > 0 else "CuPy sees no CUDA device"
    return f"unknown backend {backend!r}"


def available() -> dict[str, str | None]:
    """Each backend with None (usable here) or the reason it is not."""
    return {name: _probe(name) for name in BACKENDS}


def get(op: str, backend: str = "numba") -> Callable[..., Any]:
    """The implementation of ``op`` (e.g. ``"quant.quantize_4bit"``) in ``backend``.

    Raises ValueError for an unknown backend or a malformed op name, LookupError when the
    backend is unavailable here or does not provide the op (the message says which).
    """
    _checks.choice(backend, "backend", tuple(BACKENDS))
    if not isinstance(op, str) or op.count(".") != 1:
        raise ValueError(f"op: expected '<module>.<function>' such as 'quant.quantize_4bit', got {op!r}")
    reason = _probe(backend)
    if reason is not None:
        raise LookupError(f"backend {backend!r} is not available: {reason}")
    module_name, func_name = op.split(".")
    if backend != "numpy":
        table = getattr(importlib.import_module(BACKENDS[backend]), "OPS", None)
        if isinstance(table, dict) and op in table:
            entry = table[op]
            if isinstance(entry, str):
                sub, _, attr = entry.rpartition(".")
                entry = getattr(importlib.import_module(f"{BACKENDS[backend]}.{sub}"), attr)
            if not callable(entry):
                raise LookupError(f"backend {backend!r} lists {op!r} in OPS but it is not callable")
            return entry
    try:
        module = importlib.import_module(f"{BACKENDS[backend]}.{module_name}")
    except ModuleNotFoundError as exc:
        raise LookupError(f"backend {backend!r} has no module {module_name!r} (op {op!r}): {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise LookupError(f"backend {backend!r} does not provide {op!r}")
    return func


def ops(backend: str = "numba") -> list[str]:
    """The ops of ``OPS`` that ``backend`` provides here (empty when it is unavailable)."""
    _checks.choice(backend, "backend", tuple(BACKENDS))
    found = []
    for op in OPS:
        try:
            get(op, backend)
        except LookupError:
            continue
        found.append(op)
    return found


def fastest(op: str) -> tuple[str, Callable[..., Any]]:
    """(backend, function) of the fastest available implementation of ``op``: cupy, numba, numpy."""
    for backend in ("cupy", "numba", "numpy"):
        try:
            return backend, get(op, backend)
        except LookupError:
            continue
    raise LookupError(f"no backend provides {op!r}")
