"""Adapters: functions written for torch, CuPy or any DLPack library, wrapped as a conformance target.

The harness calls a target with NumPy arrays and reads NumPy arrays back (docs/targets.md). A kernel
written for torch or CuPy wants its own arrays, on its own device. ``torch_target`` and ``cupy_target``
do that conversion both ways, for every argument and every result:

* an array argument becomes a tensor on ``device`` (float64 inputs in ``compute_dtype``; bfloat16, which
  NumPy spells ``ml_dtypes.bfloat16``, becomes ``torch.bfloat16``), with ``requires_grad`` where asked, so
  a layer's autograd path runs as it does in training;
* a ``refimpl.quant.QuantState`` argument becomes a :class:`DeviceQuantState` (the same fields, its arrays
  on the device); a result with a QuantState's fields (a DeviceQuantState, or a refimpl QuantState built
  from tensors) comes back as a refimpl QuantState of NumPy arrays;
* results (tensors, tuples, lists, dicts, QuantStates) come back as NumPy arrays, detached from autograd.

The target declares ``compute_dtype`` (the error bounds of its ops), ``options`` and ``supports`` per op
glob, so no Target class is needed::

    TARGET = torch_target({"lora.forward": my_forward}, device="cuda", compute_dtype="float32")
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Collection, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from refimpl.conformance._values import to_numpy
from refimpl.conformance.targets import COMPUTE_DTYPES

_BF16 = np.dtype(ml_dtypes.bfloat16)
_STATE_FIELDS = ("shape", "dtype", "blocksize", "quant_type", "absmax", "code")


@dataclasses.dataclass(frozen=True)
class DeviceQuantState:
    """A ``refimpl.quant.QuantState`` whose arrays live on a device (torch tensors or CuPy arrays); the
    same field names, so a kernel reads ``state.absmax``, ``state.code``, ``state.blocksize`` as it would
    from refimpl's."""

    shape: tuple[int, ...]
    dtype: str
    blocksize: int
    quant_type: str
    absmax: Any
    code: Any
    offset: Any = None
    nested_absmax: Any = None
    nested_code: Any = None
    nested_blocksize: int = 256
    profile: str = "reference"

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


def _is_quant_state(v: Any) -> bool:
    return not isinstance(v, (type, np.ndarray)) and all(hasattr(v, f) for f in _STATE_FIELDS)


def _dtype_name(dt: Any) -> str:
    """ "float32" for np.float32, torch.float32 or "torch.float32"."""
    return str(dt).removeprefix("torch.")


def quant_state_to_numpy(state: Any) -> Any:
    """A refimpl QuantState from any object with a QuantState's fields (arrays of any DLPack library)."""
    from refimpl.quant import QuantState  # refimpl.quant is not needed until a quant op runs

    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(QuantState) if hasattr(state, f.name)}
    arrays = {
        k: (None if v is None else to_numpy(v))
        for k, v in fields.items()
        if k in ("absmax", "code", "nested_absmax", "nested_code")
    }
    if fields.get("offset") is not None:
        arrays["offset"] = np.float32(np.asarray(to_numpy(fields["offset"])).reshape(()))
    return QuantState(
        **{**fields, **arrays, "shape": tuple(int(s) for s in fields["shape"]), "dtype": _dtype_name(fields["dtype"])}
    )


def results_to_numpy(result: Any) -> Any:
    """A target's result with every device array, and every QuantState-like object, back in NumPy."""
    if result is None or isinstance(result, (bool, int, float, str, np.ndarray, np.generic)):
        return result
    if _is_quant_state(result):
        return quant_state_to_numpy(result)
    if isinstance(result, tuple) and hasattr(result, "_fields"):
        return type(result)(*(results_to_numpy(v) for v in result))
    if isinstance(result, (tuple, list)):
        return type(result)(results_to_numpy(v) for v in result)
    if isinstance(result, Mapping):
        return {k: results_to_numpy(v) for k, v in result.items()}
    return to_numpy(result)


def _by_glob(table: Mapping[str, Any] | None, op: str) -> Any:
    for pattern, value in (table or {}).items():
        if fnmatch.fnmatchcase(op, pattern):
            return value
    return None


def _reference_signature(op: str) -> str:
    """``refimpl.<op>(<parameters>)``, or the op name where the reference cannot be read."""
    import importlib
    import inspect

    module, _, func = op.rpartition(".")
    try:
        ref = getattr(importlib.import_module(f"refimpl.{module}"), func)
        params = inspect.signature(ref).parameters.values()
        return f"refimpl.{op}{inspect.Signature([p.replace(annotation=p.empty) for p in params])}"
    except (ImportError, AttributeError, TypeError, ValueError):
        return f"refimpl.{op}"


class ArrayTarget:
    """A mapping of op names to functions on another library's arrays (``to_device`` converts one NumPy
    array, ``mark`` may adjust a converted argument by name; everything else is this module's conversion)."""

    def __init__(
        self,
        fns: Mapping[str, Callable[..., Any]],
        to_device: Callable[[np.ndarray, str], Any],
        *,
        name: str,
        compute_dtype: str | Mapping[str, str] = "float64",
        options: Mapping[str, Mapping[str, Any]] | None = None,
        supports: Mapping[str, Mapping[str, Collection[Any]]] | None = None,
        fork_safe: bool = True,
        mark: Callable[[str, Any], Any] | None = None,
    ) -> None:
        if not isinstance(fns, Mapping) or not all(isinstance(k, str) and callable(f) for k, f in fns.items()):
            raise TypeError("fns: expected a mapping of op names (e.g. 'lora.forward') to callables")
        dtypes = compute_dtype.values() if isinstance(compute_dtype, Mapping) else [compute_dtype]
        bad = [d for d in dtypes if d not in COMPUTE_DTYPES]
        if bad:
            raise ValueError(f"compute_dtype: expected one of {', '.join(COMPUTE_DTYPES)}, got {bad[0]!r}")
        self.name = name
        self.fork_safe = fork_safe
        self._fns = dict(fns)
        self._to_device = to_device
        self._dtype = compute_dtype
        self._options = dict(options or {})
        self._supports = dict(supports or {})
        #: (argument name, device value) -> the value the function gets (e.g. a tensor that requires grad)
        self._mark = mark or (lambda arg, value: value)

    def compute_dtype(self, op: str) -> str:
        if isinstance(self._dtype, Mapping):
            return str(_by_glob(self._dtype, op) or "float64")
        return self._dtype

    def options(self, op: str) -> dict[str, Any]:
        return dict(_by_glob(self._options, op) or {})

    def supports(self, op: str) -> dict[str, Collection[Any]]:
        return dict(_by_glob(self._supports, op) or {})

    def provided_ops(self) -> list[str]:
        return sorted(self._fns)

    def to_device(self, value: Any, op: str) -> Any:
        """One argument on the device (arrays, lists of arrays, QuantStates; other values unchanged)."""
        dtype = self.compute_dtype(op)
        if isinstance(value, np.ndarray):
            if value.dtype == np.float64 and dtype != "float64":
                value = value.astype(_BF16 if dtype == "bfloat16" else np.dtype(dtype))
            return self._to_device(value, op)
        if isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
            return [self.to_device(v, op) for v in value]
        if _is_quant_state(value) and isinstance(getattr(value, "absmax", None), np.ndarray):
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(DeviceQuantState)}
            for k in ("absmax", "code", "nested_absmax", "nested_code"):
                if fields[k] is not None:  # the state's arrays keep their dtype (uint8 codes, float32 scales)
                    fields[k] = self._to_device(np.asarray(fields[k]), op)
            return DeviceQuantState(**fields)
        return value

    def lookup(self, op: str) -> Callable[..., Any] | None:
        fn = self._fns.get(op)
        if fn is None:
            return None

        def call(*args: Any, **kwargs: Any) -> Any:
            if args:
                raise TypeError(
                    f"{op} through {self.name}: targets are called with keyword arguments only, named like the "
                    f"reference's parameters (e.g. lookup({op!r})(**case), as the harness calls them; "
                    f"{_reference_signature(op)}, docs/ops.md); got {len(args)} positional argument(s)"
                )
            return results_to_numpy(fn(**{k: self._mark(k, self.to_device(v, op)) for k, v in kwargs.items()}))

        call.__name__ = getattr(fn, "__name__", op)
        call.__doc__ = f"{op} through {self.name}: NumPy in, NumPy out"
        return call


def torch_target(
    fns: Mapping[str, Callable[..., Any]],
    *,
    device: str = "cpu",
    compute_dtype: str | Mapping[str, str] = "float64",
    requires_grad: bool | Collection[str] = False,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    supports: Mapping[str, Mapping[str, Collection[Any]]] | None = None,
    name: str = "torch",
) -> ArrayTarget:
    """A target of torch functions: NumPy arguments become tensors on ``device``, results come back.

    ``compute_dtype`` (one dtype, or op glob -> dtype) is the precision the functions compute in: float64
    inputs are given in it and the error bounds widen to it. ``requires_grad`` (True, or argument names)
    makes those float tensors require grad, as parameters do in training. A CUDA device runs in the
    runner's process (a CUDA context does not survive fork).
    """
    import torch  # optional dependency: only a torch target needs it

    dev = torch.device(device)

    def to_tensor(a: np.ndarray, op: str) -> Any:
        if a.dtype == _BF16:  # torch reads no ml_dtypes array: pass the bits, view them as bfloat16
            t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.array(a, copy=True))  # a copy: the harness's arrays stay read-only
        return t.to(dev)

    def mark(arg: str, value: Any) -> Any:
        if (
            (requires_grad is True or (requires_grad and arg in requires_grad))
            and isinstance(value, torch.Tensor)
            and value.is_floating_point()
        ):
            value.requires_grad_(True)
        return value

    return ArrayTarget(
        fns,
        to_tensor,
        name=name,
        compute_dtype=compute_dtype,
        options=options,
        supports=supports,
        fork_safe=dev.type == "cpu",
        mark=mark if requires_grad else None,
    )


def cupy_target(
    fns: Mapping[str, Callable[..., Any]],
    *,
    compute_dtype: str | Mapping[str, str] = "float64",
    options: Mapping[str, Mapping[str, Any]] | None = None,
    supports: Mapping[str, Mapping[str, Collection[Any]]] | None = None,
    name: str = "cupy-kernels",
) -> ArrayTarget:
    """A target of CuPy functions (or any library that reads CuPy arrays, e.g. through ``__dlpack__``):
    NumPy arguments become CuPy arrays on the current GPU, results come back.

    CuPy has no bfloat16: unless ``supports`` says otherwise, every op declares float16, float32 and
    float64 inputs only, so a bfloat16 case is reported as outside the target's domain rather than run
    in another dtype. It runs in the runner's process (a CUDA context does not survive fork).
    """
    import cupy  # optional dependency: only a CuPy target needs it

    def to_cupy(a: np.ndarray, op: str) -> Any:
        if a.dtype == _BF16:
            raise TypeError(f"{op}: CuPy has no bfloat16 array; declare supports without bfloat16")
        return cupy.asarray(a)

    decl = dict(supports or {"*": {"dtypes": {"float16", "float32", "float64"}}})
    return ArrayTarget(
        fns, to_cupy, name=name, compute_dtype=compute_dtype, options=options, supports=decl, fork_safe=False
    )


__all__ = ["ArrayTarget", "DeviceQuantState", "cupy_target", "quant_state_to_numpy", "results_to_numpy", "torch_target"]
