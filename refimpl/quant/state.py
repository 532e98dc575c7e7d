"""QuantState: everything besides the packed codes that 4-bit dequantization needs (spec/nf4.md §5, §10).

A plain frozen record (no hidden state), convertible to and from bitsandbytes'
serialized form (``QuantState.as_dict(packed=True)``): the tensors ``absmax``,
``quant_map``, ``nested_absmax``, ``nested_quant_map`` and a uint8 tensor
``quant_state.bitsandbytes__nf4`` (or ``__fp4``) holding UTF-8 JSON with
quant_type, blocksize, dtype, shape and, when nested, nested_blocksize,
nested_dtype and nested_offset. Here all tensors are NumPy arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np

from refimpl import _checks
from refimpl.quant import codebooks, nested
from refimpl.quant.operands import PROFILES, valid_blocksize

OUTPUT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _array(value: Any, name: str, dtype: Any, size: int | None = None) -> np.ndarray:
    arr = _checks._to_numpy(value, name)
    if arr.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: expected a {np.dtype(dtype)} array, got {_checks.describe(arr)}")
    if size is not None and arr.size != size:
        raise ValueError(f"{name}: expected {size} values, got {_checks.describe(arr)}")
    return arr.reshape(-1)


@dataclass(frozen=True, eq=False)
class QuantState:
    """State of a 4-bit quantized tensor.

    absmax: float32 per-block scales, or (nested) their uint8 8-bit codes.
    code: the 16 float32 code values, index = nibble.
    offset, nested_absmax, nested_code, nested_blocksize: the double-quantization state
    (offset float32; nested_absmax float32 per 256 blocks; nested_code the 256-entry dynamic map).
    profile: the profile that produced it (decides the sign of FP4's zero on dequantization).
    """

    shape: tuple[int, ...]
    dtype: str
    blocksize: int
    quant_type: str
    absmax: np.ndarray
    code: np.ndarray
    offset: np.float32 | None = None
    nested_absmax: np.ndarray | None = None
    nested_code: np.ndarray | None = None
    nested_blocksize: int = 256
    profile: str = "reference"

    def __post_init__(self) -> None:
        shape = tuple(_checks.integer(s, "shape", low=0) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        if prod(shape) == 0:
            raise ValueError(f"shape: expected a non-empty shape, got {shape}")
        _checks.choice(self.dtype, "dtype", OUTPUT_DTYPES)
        valid_blocksize(self.blocksize)
        _checks.choice(self.quant_type, "quant_type", codebooks.QUANT_TYPES)
        _checks.choice(self.profile, "profile", PROFILES)
        object.__setattr__(self, "code", _array(self.code, "code", np.float32, 16))
        _finite(self.code, "code")
        nblocks = self.n_blocks
        if self.nested_absmax is None:
            if self.offset is not None or self.nested_code is not None:
                raise ValueError("offset: a non-nested state has no offset or nested_code; got one")
            object.__setattr__(self, "absmax", _array(self.absmax, "absmax", np.float32, nblocks))
            return
        object.__setattr__(self, "absmax", _array(self.absmax, "absmax", np.uint8, nblocks))
        nbs = _checks.integer(self.nested_blocksize, "nested_blocksize", low=1)
        if self.offset is None:
            raise ValueError("offset: a nested state needs the float32 offset, got None")
        object.__setattr__(self, "offset", np.float32(self.offset))
        object.__setattr__(
            self, "nested_absmax", _array(self.nested_absmax, "nested_absmax", np.float32, -(-nblocks // nbs))
        )
        nested_code = codebooks.codebook("dynamic8") if self.nested_code is None else self.nested_code
        object.__setattr__(self, "nested_code", _array(nested_code, "nested_code", np.float32, 256))
        _finite(self.nested_code, "nested_code")

    @property
    def n(self) -> int:
        """Number of quantized elements."""
        return prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.n // self.blocksize)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def _nested_parts(self) -> tuple[np.ndarray, np.ndarray, np.float32]:
        """(nested_absmax, nested_code, offset) of a nested state (``__post_init__`` sets all three together)."""
        if self.nested_absmax is None or self.nested_code is None or self.offset is None:
            raise ValueError("nested_absmax: not a double-quantized (nested) state")
        return self.nested_absmax, self.nested_code, self.offset

    def block_absmax(self) -> np.ndarray:
        """The float32 scale of each block: stored, or rebuilt from the nested state (§7)."""
        if not self.nested:
            return self.absmax.copy()
        nested_absmax, nested_code, offset = self._nested_parts()
        return nested.dequantize_nested_absmax(self.absmax, nested_absmax, nested_code, offset, self.nested_blocksize)

    def to_bnb_dict(self) -> dict[str, np.ndarray]:
        """bitsandbytes' ``QuantState.as_dict(packed=True)`` as NumPy arrays (byte-identical JSON)."""
        meta: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": self.dtype,
            "shape": list(self.shape),
        }
        out: dict[str, np.ndarray] = {"absmax": self.absmax.copy(), "quant_map": self.code.copy()}
        if self.nested:
            nested_absmax, nested_code, offset = self._nested_parts()
            out["nested_absmax"] = nested_absmax.copy()
            out["nested_quant_map"] = nested_code.copy()
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32", nested_offset=float(offset))
        out["quant_state.bitsandbytes__" + self.quant_type] = np.frombuffer(
            json.dumps(meta).encode("utf-8"), dtype=np.uint8
        ).copy()
        return out

    @classmethod
    def from_bnb_dict(
        cls, d: dict[str, Any], *, profile: str = "bitsandbytes-cpu", nonfinite: str = "raise"
    ) -> QuantState:
        """Read bitsandbytes' packed serialized dict (keys may carry a module prefix).

        Every missing key (a tensor, or a field of the JSON metadata) is a ValueError naming it.
        ``quant_map`` and ``nested_quant_map`` must be finite. A NaN/±inf ``nested_offset`` (every
        dequantized weight would be NaN/inf) raises unless ``nonfinite="propagate"``: that is what
        quantizing an input that holds NaN/inf with double quantization produces (bitsandbytes and
        ``quantize_4bit(..., nonfinite="propagate")``), so readers of such states opt in.
        """
        if not isinstance(d, dict):
            raise TypeError(f"d: expected a dict of arrays, got {_checks.describe(d)}")
        mode = _checks.choice(nonfinite, "nonfinite", ("raise", "propagate"))
        if not all(isinstance(k, str) for k in d):
            raise TypeError(f"d: expected str keys, got {sorted(map(repr, d))}")
        items = {k.split(".")[-1] if "quant_state." not in k else k[k.index("quant_state.") :]: v for k, v in d.items()}
        meta_keys = [k for k in items if k.startswith("quant_state.bitsandbytes__")]
        if len(meta_keys) != 1:
            raise ValueError(f"d: expected exactly one 'quant_state.bitsandbytes__nf4|fp4' key, got {meta_keys}")
        meta = _bnb_meta(items[meta_keys[0]], meta_keys[0])
        nested = "nested_absmax" in items
        need = ("absmax", "quant_map") + (("nested_absmax", "nested_quant_map") if nested else ())
        for key in need:
            if key not in items:
                raise ValueError(f"d: missing key {key!r}; keys are {sorted(items)}")
        fields = ("quant_type", "blocksize", "dtype", "shape") + (
            ("nested_blocksize", "nested_offset") if nested else ()
        )
        for key in fields:
            if key not in meta:
                raise ValueError(f"d[{meta_keys[0]!r}]: missing key {key!r}; keys are {sorted(meta)}")
        if not isinstance(meta["shape"], list):
            raise ValueError(f"d[{meta_keys[0]!r}]['shape']: expected a list, got {meta['shape']!r}")
        for key in ("quant_map", "nested_quant_map"):
            if key in items:
                _finite(items[key], key)
        nested_kw: dict[str, Any] = {}
        if nested:
            off = meta["nested_offset"]
            if isinstance(off, bool) or not isinstance(off, (int, float)):
                raise TypeError(f"nested_offset: expected a number, got {_checks.describe(off)}")
            if mode == "raise" and not np.isfinite(np.float32(off)):
                raise ValueError(
                    f"nested_offset: expected a finite float32 value, got {off!r} (every dequantized "
                    "weight would be non-finite; pass nonfinite='propagate' for the state of an "
                    "input that held NaN/inf)"
                )
            nested_kw = dict(
                offset=np.float32(off),
                nested_absmax=np.asarray(items["nested_absmax"]),
                nested_code=np.asarray(items["nested_quant_map"]),
                nested_blocksize=meta["nested_blocksize"],
            )
        return cls(
            shape=tuple(meta["shape"]),
            dtype=meta["dtype"],
            blocksize=meta["blocksize"],
            quant_type=meta["quant_type"],
            absmax=np.asarray(items["absmax"]),
            code=np.asarray(items["quant_map"]),
            profile=profile,
            **nested_kw,
        )


def _bnb_meta(value: Any, key: str) -> dict[str, Any]:
    """The JSON object stored as uint8 bytes under ``quant_state.bitsandbytes__*``; ValueError naming the key."""
    arr = np.asarray(value)
    if arr.dtype.kind in "iu" and arr.size and 0 <= arr.min() and arr.max() <= 255:
        arr = arr.astype(np.uint8)
    if arr.dtype != np.uint8:
        raise TypeError(f"d[{key!r}]: expected uint8 bytes of UTF-8 JSON, got {_checks.describe(arr)}")
    try:
        meta = json.loads(arr.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"d[{key!r}]: not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"d[{key!r}]: expected a JSON object, got {type(meta).__name__}")
    return meta


def _finite(value: Any, name: str) -> None:
    """ValueError naming ``name`` when a float array holds NaN/±inf (type errors are left to the constructor)."""
    arr = np.asarray(value)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        i = int(np.flatnonzero(~np.isfinite(arr.reshape(-1)))[0])
        raise ValueError(f"{name}: expected finite values, got {arr.reshape(-1)[i]} at flat index {i}")
