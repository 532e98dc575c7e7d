"""Op rows for refimpl.quant and refimpl.qlora (spec/nf4.md; QLoRA arXiv 2305.14314).

NF4/FP4 storage is bit-exact by definition (float32 arithmetic in a fixed order), so
every quant row is ``Exact``: packed codes, absmax, nested state and dequantized bits.

Where 4-bit kernels go wrong is known (spec/nf4.md §4–§9, from bitsandbytes 0.50.2's source), and
random inputs almost never reach it: in 500 random examples no scaled value came within 4 ulp of
a midpoint. So each row lists its equivalence classes (``classes``) and a deterministic boundary
tier places inputs in every one of them:

* thresholds: x is built from the block's absmax a so that the float32 scaled value
  s = x·f32(1/a) (full block) or x/a (tail block) is exactly a codebook midpoint, or one float32
  ulp either side (``_x_hitting``); and x where x·f32(1/a) and x/a fall on opposite sides of a
  midpoint, so a kernel with the other scaling rule picks the other code (``_straddle``);
* shapes: tails, remainders after 8 and 16 lanes, 2-D rows that are not a whole number of blocks,
  1-/2-/3-D, every blocksize 32 … 4096, more than 256 blocks (a second, partial double-quant
  group), qlora inputs on both sides of the kernels' row-count switches (4 and 16 rows);
* values: zeros, −0.0, FP4's tiny values, subnormal blocks on both sides of the 1e-38 clamp,
  NaN/±inf (nonfinite="propagate"), a nested offset where a float32 mean differs;
* every dtype and option value, including profile="bitsandbytes-cpu".
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import bounds
from refimpl.conformance.table import Boundary, Case, OpSpec, Special
from refimpl.conformance.tolerance import Bounded, Exact
from refimpl.quant.operands import BLOCKSIZES as _BLOCKSIZES

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_F32 = np.float32

#: Public functions of refimpl.quant / refimpl.qlora that are not array ops (no row).
NOT_OPS: dict[str, str] = {
    "quant.QuantState": "a record type (its constructor validates fields); states are checked through the "
    "quantize/dequantize rows",
    "quant.Check4bitReport": "the record type check_4bit returns, not an op",
    "qlora.QuantState": "re-export of the record type quant.QuantState, not an op",
}


def _dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _quant():
    from refimpl import quant

    return quant


# ---------------------------------------------------------------------------- threshold-adjacent values


def _step(x: npt.ArrayLike, k: int | np.ndarray, dtype: np.dtype) -> np.ndarray:
    """x (a value of ``dtype``) moved k units in the last place of ``dtype`` (k > 0: away from −inf; an array
    of k: one value per k)."""
    v = np.asarray(x, dtype=dtype)
    bits = v.view(np.uint16 if dtype.itemsize == 2 else np.uint32).astype(np.int64)
    neg = np.signbit(v.astype(np.float32))
    mag = np.where(neg, -bits + (1 << (8 * dtype.itemsize - 1)), bits)  # signed-magnitude to ordered integer
    mag = mag + k
    out = np.where(mag < 0, (-mag) | (1 << (8 * dtype.itemsize - 1)), mag)
    return out.astype(np.uint16 if dtype.itemsize == 2 else np.uint32).view(dtype)


def _scaled(x: Any, a: Any, tail: bool) -> np.ndarray:
    """s as quantize_4bit forms it in float32: x·f32(1/a) (full block) or x/a (tail block), clamped to ±1."""
    x32, a32 = np.asarray(x, _F32), _F32(max(_F32(a), _F32(1e-38)))
    with np.errstate(all="ignore"):
        s = x32 / a32 if tail else x32 * (_F32(1) / a32)
    return np.clip(s.astype(_F32), _F32(-1), _F32(1))


def _x_hitting(t: float, a: float, tail: bool, dtype: np.dtype | None = None) -> Any:
    """A value x of ``dtype`` (default float32) whose scaled value (absmax a, full or tail block) is exactly
    the float32 t, or None: searched among the few ``dtype`` neighbours of t·a."""
    dtype = np.dtype(np.float32) if dtype is None else dtype
    x0 = np.asarray(np.float64(t) * np.float64(a)).astype(dtype)
    cands = _step(x0, np.arange(-6, 7), dtype)
    hit = np.flatnonzero(_scaled(cands.astype(_F32), a, tail) == _F32(t))
    return cands[hit[0]] if hit.size else None


@functools.cache
def _absmax_candidates(dtype_name: str) -> np.ndarray:
    """Candidate block absmax values in [0.5, 1) of a dtype, in a fixed pseudo-random order: with a < 1 the
    product grid x·f32(1/a) is fine enough to land on any float32 target near s (spec/nf4.md §4)."""
    dt = _dtype(dtype_name)
    if dt.itemsize == 2:
        lo, hi = (np.array([0.5, 1.0], np.float32).astype(dt).view(np.uint16)).astype(np.int64)
        vals = np.arange(lo, hi, dtype=np.int64).astype(np.uint16).view(dt)
    else:
        vals = np.random.default_rng(20261130).uniform(0.5, 1.0, 400).astype(np.float32)
    return vals[np.random.default_rng(7).permutation(vals.size)]


def _threshold_block(targets: list[float], tail: bool, dtype_name: str = "float32") -> tuple[Any, list[Any]] | None:
    """(a, xs): one absmax for which every target scaled value is hit exactly, or None."""
    dt = _dtype(dtype_name)
    for a in _absmax_candidates(dtype_name)[:200]:
        xs = [_x_hitting(t, float(a), tail, dt) for t in targets]
        if all(x is not None for x in xs):
            return a, xs
    return None


def _straddle(m: float, absmax: float | None = None) -> tuple[float, float] | None:
    """(a, x) with x·f32(1/a) and x/a on opposite sides of the float32 midpoint m (one > m, the other ≤ m),
    so the scaling rule decides the code; a is ``absmax`` when given, else searched."""
    cands = [absmax] if absmax is not None else _absmax_candidates("float32")[:200]
    for a in cands:
        a32 = _F32(a)
        x0 = _F32(np.float64(m) * np.float64(a32))
        xs = _step(x0, np.arange(-4, 5), np.dtype(np.float32))
        rec, div = _scaled(xs, a32, False) > _F32(m), _scaled(xs, a32, True) > _F32(m)
        hit = np.flatnonzero(rec != div)
        if hit.size:
            return float(a32), float(xs[hit[0]])
    return None


def _midpoints(quant_type: str) -> np.ndarray:
    from refimpl.quant import codebooks

    return codebooks.midpoints(quant_type)


def _around(m: float) -> list[float]:
    """The float32 midpoint m and its two float32 neighbours."""
    m32 = _F32(m)
    return [float(np.nextafter(m32, _F32(-2))), float(m32), float(np.nextafter(m32, _F32(2)))]


def _filler(rng: np.random.Generator, n: int, a: float) -> np.ndarray:
    """n values strictly inside (−a, a)."""
    return (rng.uniform(-0.95, 0.95, n) * a).astype(np.float32)


def _threshold_case(quant_type: str, blocksize: int, tail_len: int, seed: int) -> np.ndarray:
    """Every midpoint of ``quant_type`` and its ±1 ulp neighbours as scaled values, in blocks of their own
    (full blocks: reciprocal-multiply), both signs; then a tail block of ``tail_len`` elements whose values
    sit at midpoints ±1 ulp under true division."""
    rng = np.random.default_rng(seed)
    blocks = []
    for m in _midpoints(quant_type):
        if m == 0:
            continue
        found = _threshold_block(_around(m), tail=False)
        assert found is not None, f"no absmax hits the scaled values around {quant_type} midpoint {m}"
        a, xs = found
        vals = np.array([a, *xs, *(-np.asarray(xs))], dtype=np.float32)
        blocks.append(np.concatenate([vals, _filler(rng, blocksize - vals.size, float(a))]))
    mids = [m for m in _midpoints(quant_type) if m != 0]
    picks = [mids[i] for i in np.linspace(0, len(mids) - 1, max(1, (tail_len - 1) // 3)).astype(int)]
    for k in range(len(picks), 0, -1):
        found = _threshold_block([t for m in picks[:k] for t in _around(m)], tail=True)
        if found is not None:
            a, xs = found
            vals = np.array(xs, dtype=np.float32)[: tail_len - 1]
            # the absmax element last: a reduction that drops the lanes' remainder misses it
            blocks.append(np.concatenate([vals, _filler(rng, tail_len - 1 - vals.size, float(a)), [a]]))
            break
    return np.concatenate(blocks).astype(np.float32)


def _straddle_case(quant_type: str, blocksize: int, tail_len: int, seed: int) -> np.ndarray:
    """Full blocks where x·f32(1/a) and x/a straddle a midpoint (a kernel dividing picks the other code), then
    a tail block where they straddle again (a kernel multiplying by the reciprocal there is wrong)."""
    rng = np.random.default_rng(seed)
    blocks = []
    tail_a, tail_xs = None, []
    for m in _midpoints(quant_type):
        if m == 0:
            continue
        found = _straddle(float(m))
        if found is not None:
            a, x = found
            vals = np.array([a, x, -x], dtype=np.float32)
            blocks.append(np.concatenate([vals, _filler(rng, blocksize - 3, a)]))
        if tail_a is None and found is not None:
            tail_a = found[0]
        if tail_a is not None:
            again = _straddle(float(m), absmax=tail_a)
            if again is not None:
                tail_xs.append(again[1])
    assert tail_a is not None, f"no {quant_type} midpoint has a straddling absmax"
    vals = np.array(tail_xs, dtype=np.float32)[: tail_len - 1]
    blocks.append(np.concatenate([vals, _filler(rng, tail_len - 1 - vals.size, tail_a), [tail_a]]))
    return np.concatenate(blocks).astype(np.float32)


def _half_tie_case(dtype_name: str, seed: int) -> np.ndarray:
    """(14, 32) blocks of a float16/bfloat16 input whose scaled values tie an FP4 midpoint exactly (plus the
    ±1 ulp neighbours the dtype reaches with the same absmax): FP4's midpoints are short rationals that
    half-precision data reaches (spec/nf4.md)."""
    rng = np.random.default_rng(seed)
    dt = _dtype(dtype_name)
    rows = []
    for m in _midpoints("fp4"):
        if m == 0:
            continue
        targets = _around(m)
        got = None
        for a in _absmax_candidates(dtype_name):
            xs = [_x_hitting(t, float(a.astype(np.float32)), False, dt) for t in targets]
            if xs[1] is not None:
                got = (a, [x for x in xs if x is not None])
                break
        assert got is not None, f"no {dtype_name} absmax hits FP4 midpoint {m}"
        a, xs = got
        a32 = float(np.asarray(a).astype(np.float32))
        vals = np.array([a32, *[float(np.asarray(x).astype(np.float32)) for x in xs]], dtype=np.float32)
        rows.append(np.concatenate([vals, _filler(rng, 32 - vals.size, a32).astype(dt).astype(np.float32)]))
    return np.stack(rows).astype(dt)


# ---------------------------------------------------------------------------- quantize_4bit


_QUANT_CLASSES = (
    "shape: 1-D",
    "shape: 2-D, rows a whole number of blocks",
    "shape: 2-D, row not a whole number of blocks",
    "shape: 2-D, row shorter than a block",
    "shape: 3-D",
    "shape: Fortran-order (transposed view) input",
    "shape: single element",
    "shape: odd n (pad nibble)",
    "shape: tail block (n % blocksize != 0)",
    "shape: tail length % 8 != 0 (remainder after 8 and 16 lanes)",
    "shape: tail length % 16 == 8 (remainder after 16 lanes)",
    "shape: one block (double quant of a single absmax)",
    "shape: exactly 256 blocks (one full double-quant group)",
    "shape: more than 256 blocks (second double-quant group)",
    "shape: partial last double-quant group",
    "dtype: float32",
    "dtype: float16",
    "dtype: bfloat16",
    *(f"option: blocksize={bs}" for bs in _BLOCKSIZES),
    "option: quant_type=nf4",
    "option: quant_type=fp4",
    "option: double_quant=False",
    "option: double_quant=True",
    "option: profile=bitsandbytes-cpu",
    "option: nonfinite=propagate",
    "value: scaled value at each NF4 threshold and ±1 ulp (full block, reciprocal)",
    "value: scaled value at each FP4 threshold and ±1 ulp (full block, reciprocal)",
    "value: scaled value at thresholds ±1 ulp in a tail block (true division)",
    "value: x·(1/absmax) and x/absmax on opposite sides of a threshold (full block)",
    "value: x/absmax and x·(1/absmax) on opposite sides of a threshold (tail block)",
    "value: exact FP4 midpoint tie from float16/bfloat16 input",
    "value: exact code values and ±absmax (s = ±1)",
    "value: FP4 tiny values in (0, 1/384] and (-1/384, 0)",
    "value: zeros and -0.0",
    "value: all-zero full block (absmax 0)",
    "value: all-zero tail block (absmax clamped to 1e-38)",
    "value: subnormal block with absmax below 1e-38 (clamped scale)",
    "value: block absmax between 1e-38 and the smallest normal float32",
    "value: subnormal tail block",
    "value: block absmax above 2^126 (subnormal reciprocal)",
    "value: float16 subnormal inputs (absmax subnormal in float16)",
    "value: bfloat16 subnormal inputs",
    "value: NaN in a block",
    "value: ±inf in a block",
    "value: nested offset where a float32 mean differs from the correctly rounded one",
    "value: bitsandbytes-cpu nested codes where the 65,536-bin LUT differs from the nearest code",
    "value: second double-quant group with another scale than the first",
)


def _q(x: np.ndarray, blocksize: int, quant_type: str, double_quant: bool, **kw: Any) -> Case:
    return {"x": x, "blocksize": blocksize, "quant_type": quant_type, "double_quant": double_quant, **kw}


def _dq_cls(dq: bool) -> str:
    return f"option: double_quant={dq}"


def _offset_case(profile: str, want_lut: bool) -> np.ndarray:
    """Blocks of 32 (x = [a_i, smaller values]) whose absmax vector makes a float32 numpy mean differ from
    the profile's offset (and, for bitsandbytes-cpu, the LUT codes differ from the nearest codes)."""
    from refimpl.quant import blockwise

    nblocks = 300 if want_lut else 40
    for seed in range(400):
        rng = np.random.default_rng(1000 + seed)
        a = rng.uniform(0.5, 8.0, nblocks).astype(np.float32)
        off = blockwise.profile_steps(profile).absmax_offset(a, 1)
        if _F32(np.mean(a, dtype=np.float32)) == off:
            continue
        if want_lut:
            c = (a - off).astype(np.float32)
            lut, _ = blockwise.quantize_blockwise_8bit(c, 256, profile="bitsandbytes-cpu", nonfinite="propagate")
            near, _ = blockwise.quantize_blockwise_8bit(c, 256, profile="reference", nonfinite="propagate")
            if np.array_equal(lut, near):
                continue
        rest = (rng.uniform(-0.99, 0.99, (nblocks, 31)) * a[:, None]).astype(np.float32)
        return np.concatenate([a[:, None], rest], axis=1).reshape(-1)
    raise AssertionError("no offset case found (the search space is deterministic: a table bug)")


def _subnormal_case(seed: int) -> np.ndarray:
    """Blocks of 64: absmax 1e-40 (below the 1e-38 clamp), 1.1e-38 (between 1e-38 and FLT_MIN), 5e-39,
    the smallest subnormal, then a subnormal tail of 7; values spread over the thresholds of the clamped scale."""
    rng = np.random.default_rng(seed)
    out = []
    for a in (1e-40, 1.1e-38, 5e-39, 1.4e-45):
        a32 = _F32(a)
        vals = (rng.uniform(-1, 1, 63) * np.float64(a32)).astype(np.float32)
        out.append(np.concatenate([[a32], vals]).astype(np.float32))
    out.append((rng.uniform(-1, 1, 7) * 3e-39).astype(np.float32))
    return np.concatenate(out)


def _second_group_case(nblocks: int, bs: int, tail: int, seed: int) -> np.ndarray:
    """nblocks full blocks + a tail; blocks past the first 256 have 4× the spread, so the second nested
    group has its own scale."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(nblocks * bs + tail).astype(np.float32)
    x[256 * bs :] *= _F32(4) * rng.uniform(0.2, 1.0, x.size - 256 * bs).astype(np.float32)
    return x


@functools.cache
def _quantize_boundary_cases() -> tuple[Boundary, ...]:
    f32, f16, bf16 = (_dtype(n) for n in _FLOAT_DTYPES)
    rng = np.random.default_rng(42)
    out: list[Boundary] = []

    def add(label: str, case: Case, *classes: str) -> None:
        x = case["x"]
        dt = {f32: "float32", f16: "float16", bf16: "bfloat16"}[np.dtype(x.dtype)]
        n, bs = x.size, case["blocksize"]
        cls = {
            f"dtype: {dt}",
            f"option: blocksize={bs}",
            f"option: quant_type={case['quant_type']}",
            _dq_cls(case["double_quant"]),
            *classes,
        }
        if n % bs:
            cls.add("shape: tail block (n % blocksize != 0)")
            cls.add(
                "shape: tail length % 8 != 0 (remainder after 8 and 16 lanes)"
                if (n % bs) % 8
                else "shape: tail length % 16 == 8 (remainder after 16 lanes)"
                if (n % bs) % 16 == 8
                else ""
            )
        if n % 2:
            cls.add("shape: odd n (pad nibble)")
        if x.ndim == 1:
            cls.add("shape: 1-D")
        elif x.ndim == 3:
            cls.add("shape: 3-D")
        elif x.ndim == 2:
            cls.add(
                "shape: 2-D, rows a whole number of blocks"
                if x.shape[-1] % bs == 0
                else "shape: 2-D, row shorter than a block"
                if x.shape[-1] < bs
                else "shape: 2-D, row not a whole number of blocks"
            )
        if case.get("profile") == "bitsandbytes-cpu":
            cls.add("option: profile=bitsandbytes-cpu")
        if case.get("nonfinite") == "propagate":
            cls.add("option: nonfinite=propagate")
        cls.discard("")
        out.append(Boundary(label, case, tuple(sorted(cls))))

    # thresholds ±1 ulp, full blocks by reciprocal-multiply and a tail by division (tail 13: %8 and %16 != 0)
    add(
        "nf4 midpoints ±1 ulp, bs 32 + tail 13",
        _q(_threshold_case("nf4", 32, 13, 1), 32, "nf4", False),
        "value: scaled value at each NF4 threshold and ±1 ulp (full block, reciprocal)",
        "value: scaled value at thresholds ±1 ulp in a tail block (true division)",
    )
    add(
        "fp4 midpoints ±1 ulp, bs 32 + tail 24",
        _q(_threshold_case("fp4", 32, 24, 2), 32, "fp4", True),
        "value: scaled value at each FP4 threshold and ±1 ulp (full block, reciprocal)",
        "value: scaled value at thresholds ±1 ulp in a tail block (true division)",
    )
    # the scaling rule decides the code
    for qt, bs, tail, seed in (("nf4", 64, 21, 3), ("fp4", 128, 40, 4)):
        x = _straddle_case(qt, bs, tail, seed)
        add(
            f"{qt} reciprocal vs division straddles, bs {bs} + tail {tail}",
            _q(x, bs, qt, False),
            "value: x·(1/absmax) and x/absmax on opposite sides of a threshold (full block)",
            "value: x/absmax and x·(1/absmax) on opposite sides of a threshold (tail block)",
        )
    # half-precision data tying FP4 midpoints exactly
    add(
        "fp4 exact midpoint ties, float16 (14, 32)",
        _q(_half_tie_case("float16", 5), 32, "fp4", False),
        "value: exact FP4 midpoint tie from float16/bfloat16 input",
    )
    add(
        "fp4 exact midpoint ties, bfloat16 (14, 32)",
        _q(_half_tie_case("bfloat16", 6), 32, "fp4", True),
        "value: exact FP4 midpoint tie from float16/bfloat16 input",
    )
    # exact code values (s = c_j exactly with a = 1) and ±absmax
    for qt in ("nf4", "fp4"):
        from refimpl.quant import codebooks

        codes = codebooks.codebook(qt)
        x = np.concatenate([codes, -codes, [1.0, -1.0], codes * _F32(0.5)]).astype(np.float32)
        add(
            f"{qt} exact code values and ±absmax, 2-D (2, 25)",
            _q(x[:50].reshape(2, 25), 64, qt, False),
            "value: exact code values and ±absmax (s = ±1)",
        )
    # FP4 tiny values, zeros and -0.0 in a 2-D input whose rows straddle blocks
    tiny = np.array(
        [1.0, 1e-4, 1 / 400, 1 / 384, 2.6e-3, -1e-4, -1 / 400, -1 / 384, 0.0, -0.0, 1e-30, -1e-30], dtype=np.float32
    )
    x = np.concatenate([np.tile(tiny, 10)]).reshape(3, 40)
    x[:, 0] = x[:, 0] * np.array([1.0, 0.75, 3.0], dtype=np.float32)
    add(
        "fp4 tiny values, zeros, -0.0, (3, 40) bs 32",
        _q(x, 32, "fp4", True),
        "value: FP4 tiny values in (0, 1/384] and (-1/384, 0)",
        "value: zeros and -0.0",
    )
    add("nf4 tiny values, zeros, -0.0, (3, 40) bs 32", _q(x.copy(), 32, "nf4", False), "value: zeros and -0.0")
    # all-zero blocks: a full block (absmax 0 stored) and a tail (absmax clamped to 1e-38)
    for qt in ("nf4", "fp4"):
        z = np.concatenate([np.zeros(32), rng.standard_normal(32), np.zeros(26)]).astype(np.float32)
        add(
            f"{qt} all-zero full and tail blocks, (2, 45) bs 32",
            _q(z.reshape(2, 45), 32, qt, qt == "fp4"),
            "value: all-zero full block (absmax 0)",
            "value: all-zero tail block (absmax clamped to 1e-38)",
            "value: zeros and -0.0",
        )
    # subnormal blocks around the 1e-38 clamp
    for qt, dq in (("nf4", False), ("fp4", True)):
        add(
            f"{qt} subnormal blocks around the 1e-38 clamp, bs 64 + tail 7",
            _q(_subnormal_case(7), 64, qt, dq),
            "value: subnormal block with absmax below 1e-38 (clamped scale)",
            "value: block absmax between 1e-38 and the smallest normal float32",
            "value: subnormal tail block",
        )
    # a huge absmax makes f32(1/a) subnormal (a flush-to-zero build loses it); half-precision subnormals
    big = np.concatenate([[3.0e38], rng.uniform(-1, 1, 63) * 3.0e38, [2.5e38], rng.uniform(-1, 1, 20) * 2.5e38])
    add(
        "nf4 absmax 3e38 (subnormal reciprocal), bs 64 + tail 21",
        _q(big.astype(np.float32), 64, "nf4", True),
        "value: block absmax above 2^126 (subnormal reciprocal)",
    )
    sub16 = np.concatenate([rng.uniform(-1, 1, 32) * 5e-5, rng.uniform(-1, 1, 31) * 4e-6, [6e-8]]).astype(f16)
    add(
        "fp4 float16 subnormal blocks, bs 32",
        _q(sub16, 32, "fp4", False),
        "value: float16 subnormal inputs (absmax subnormal in float16)",
    )
    sub16b = np.concatenate([rng.uniform(-1, 1, 64) * 5e-5, [1.0], rng.uniform(-1, 1, 63) * 5e-5]).astype(f16)
    add(
        "nf4 float16 subnormals beside a normal absmax, (2, 64) bs 64",
        _q(sub16b.reshape(2, 64), 64, "nf4", False),
        "value: float16 subnormal inputs (absmax subnormal in float16)",
    )
    sub_bf = (
        np.concatenate([rng.uniform(-1, 1, 32) * 1e-39, rng.uniform(-1, 1, 32) * 3e-38]).astype(np.float32).astype(bf16)
    )
    add("fp4 bfloat16 subnormal blocks, bs 32, nested", _q(sub_bf, 32, "fp4", True), "value: bfloat16 subnormal inputs")
    # every blocksize, with dtypes, quant types, double quant and shapes rotating
    shapes = {
        32: ((5, 16), bf16, "nf4", True),
        64: ((3, 100), f16, "fp4", False),
        128: ((2, 3, 50), f32, "nf4", True),
        256: ((600,), bf16, "fp4", True),
        512: ((3, 700), f16, "nf4", False),
        1024: ((1500,), f32, "fp4", True),
        2048: ((3, 1000), bf16, "nf4", True),
        4096: ((5000,), f16, "fp4", True),
    }
    for bs, (shape, dt, qt, dq) in shapes.items():
        x = (rng.standard_normal(shape) * rng.choice([0.02, 1.0, 25.0])).astype(np.float32).astype(dt)
        add(f"{qt} bs {bs} {dt.name} {'x'.join(map(str, shape))}", _q(x, bs, qt, dq))
    x = rng.standard_normal((2, 4100)).astype(np.float32)
    add("nf4 bs 4096 float32 2x4100 (rows misaligned)", _q(x, 4096, "nf4", False))
    x = rng.standard_normal((4, 2048)).astype(np.float32).astype(f16)
    add("fp4 bs 2048 float16 4x2048 (rows aligned)", _q(x, 2048, "fp4", False))
    # double quantization: one block; exactly 256; more than 256 with a partial last group and a tail
    add(
        "nf4 one block, nested",
        _q(rng.standard_normal(64).astype(np.float32), 64, "nf4", True),
        "shape: one block (double quant of a single absmax)",
    )
    add(
        "fp4 256 blocks exactly, nested",
        _q(rng.standard_normal((256, 32)).astype(np.float32), 32, "fp4", True),
        "shape: exactly 256 blocks (one full double-quant group)",
    )
    add(
        "nf4 300 blocks + tail 13, nested (second, partial group)",
        _q(_second_group_case(300, 32, 13, 8), 32, "nf4", True),
        "shape: more than 256 blocks (second double-quant group)",
        "shape: partial last double-quant group",
        "value: second double-quant group with another scale than the first",
    )
    add(
        "fp4 257 blocks of 64, bfloat16, nested",
        _q(_second_group_case(257, 64, 0, 9).astype(bf16), 64, "fp4", True),
        "shape: more than 256 blocks (second double-quant group)",
        "shape: partial last double-quant group",
        "value: second double-quant group with another scale than the first",
    )
    # nested offsets a float32 mean gets wrong, in both profiles
    add(
        "nf4 nested offset (40 blocks), float32 mean differs",
        _q(_offset_case("reference", False), 32, "nf4", True),
        "value: nested offset where a float32 mean differs from the correctly rounded one",
    )
    add(
        "fp4 nested, profile bitsandbytes-cpu (300 blocks): cascade offset and LUT codes",
        _q(_offset_case("bitsandbytes-cpu", True), 32, "fp4", True, profile="bitsandbytes-cpu"),
        "value: nested offset where a float32 mean differs from the correctly rounded one",
        "value: bitsandbytes-cpu nested codes where the 65,536-bin LUT differs from the nearest code",
        "shape: more than 256 blocks (second double-quant group)",
        "shape: partial last double-quant group",
    )
    add(
        "nf4 profile bitsandbytes-cpu, (3, 40) bs 32",
        _q(rng.standard_normal((3, 40)).astype(np.float32), 32, "nf4", False, profile="bitsandbytes-cpu"),
    )
    # special values with nonfinite="propagate"
    for qt, dq in (("nf4", False), ("fp4", True), ("nf4", True)):
        x = rng.standard_normal(150).astype(np.float32)
        x[5], x[70], x[140] = np.nan, np.inf, -np.inf
        add(
            f"{qt} NaN / +inf / -inf (tail), nonfinite=propagate",
            _q(x, 64, qt, dq, nonfinite="propagate"),
            "value: NaN in a block",
            "value: ±inf in a block",
        )
    # a transposed view: blocks follow the logical C order, not the memory order
    xt = rng.standard_normal((45, 3)).astype(np.float32).T
    add(
        "nf4 Fortran-order (transposed view) 3x45, bs 32",
        _q(xt, 32, "nf4", True),
        "shape: Fortran-order (transposed view) input",
    )
    xt = rng.standard_normal((50, 4)).astype(np.float32).astype(bf16).T
    add(
        "fp4 Fortran-order (transposed view) bfloat16 4x50, bs 64",
        _q(xt, 64, "fp4", False),
        "shape: Fortran-order (transposed view) input",
    )
    # tiny sizes
    add("nf4 single element", _q(np.array([-0.3], np.float32), 32, "nf4", False), "shape: single element")
    add("fp4 three elements, float16", _q(np.array([0.5, -2.0, 1e-3], np.float16), 32, "fp4", True))
    return tuple(out)


def _quantize_boundary() -> list[Boundary]:
    return list(_quantize_boundary_cases())


def _planted(draw, x: np.ndarray, bs: int, table: str, dtype: np.dtype, allow_nonfinite: bool) -> np.ndarray:
    """Replace a few drawn positions of x (flat float32 values of ``dtype``) with threshold-adjacent values
    (a midpoint of ``table`` or ±1 ulp as the block's scaled value), zeros, −0.0, ±absmax, tiny FP4 values
    and, when allowed, NaN/±inf."""
    from hypothesis import strategies as st

    from refimpl.quant import codebooks

    mids = _midpoints(table) if table in ("nf4", "fp4") else codebooks.float32_midpoints(codebooks.codebook(table))
    kinds = ["threshold", "threshold", "zero", "-0.0", "absmax", "tiny"] + (["nan", "inf"] if allow_nonfinite else [])
    n = x.size
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(kinds))
        pos = draw(st.integers(0, n - 1))
        b0 = pos // bs * bs
        block = x[b0 : b0 + bs]
        with np.errstate(invalid="ignore"):
            a = float(np.max(np.abs(block)))
        if not np.isfinite(a) or abs(float(x[pos])) == a:
            continue
        if kind == "threshold":
            t = _around(float(mids[draw(st.integers(0, mids.size - 1))]))[draw(st.integers(0, 2))]
            tail = n % bs != 0 and b0 == n - n % bs and table in ("nf4", "fp4")
            v = _x_hitting(t, a, tail, dtype) if a > 0 else None
            if v is not None:
                x[pos] = np.asarray(v).astype(np.float32)
        elif kind == "zero":
            x[pos] = 0.0
        elif kind == "-0.0":
            x[pos] = -0.0
        elif kind == "absmax":
            x[pos] = -a
        elif kind == "tiny":
            x[pos] = np.asarray(a * draw(st.sampled_from([1e-4, -1e-4, 1 / 384, -1 / 384]))).astype(dtype)
        else:
            x[pos] = np.nan if kind == "nan" else draw(st.sampled_from([np.inf, -np.inf]))
    return x


def _shape_of(draw, max_elems: int, blocksize: int | None = None):
    """A 1-, 2- or 3-D shape of at most ``max_elems`` elements; with ``blocksize``, also a whole number of blocks
    (1-D, or 2-D rows of whole blocks), which lengths drawn at random almost never are."""
    from hypothesis import strategies as st

    kind = draw(st.sampled_from(["1d", "2d", "3d"] + (["blocks"] if blocksize else [])))
    if kind == "blocks" and blocksize:
        rows = draw(st.integers(0, 3))  # 0: a 1-D tensor
        per_row = draw(st.integers(1, max(1, max_elems // (max(rows, 1) * blocksize))))
        return (per_row * blocksize,) if rows == 0 else (rows, per_row * blocksize)
    if kind == "1d":
        return (draw(st.integers(1, max_elems)),)
    if kind == "2d":
        rows = draw(st.integers(1, 5))
        return rows, draw(st.integers(1, max(1, max_elems // rows)))
    a, b = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return a, b, draw(st.integers(1, max(1, max_elems // (a * b))))


def _quantize_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        bs = draw(st.sampled_from(_BLOCKSIZES))
        shape = _shape_of(draw, 300 if bs <= 128 else 2 * bs + 40, bs)  # large blocksizes: one or two blocks
        dt_name = draw(st.sampled_from(_FLOAT_DTYPES))
        qt = draw(st.sampled_from(["nf4", "fp4"]))
        case: Case = {"blocksize": bs, "quant_type": qt, "double_quant": draw(st.booleans())}
        if draw(st.booleans()):
            case["profile"] = draw(st.sampled_from(["reference", "bitsandbytes-cpu"]))
        propagate = draw(st.booleans())
        if propagate:
            case["nonfinite"] = "propagate"
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        scale = draw(st.sampled_from([1e-39, 1e-3, 1.0, 40.0]))
        dt = _dtype(dt_name)
        x = (rng.standard_normal(int(np.prod(shape))) * scale).astype(np.float32).astype(dt).astype(np.float32)
        x = _planted(draw, x, bs, qt, dt, propagate)
        case["x"] = x.astype(dt).reshape(shape)
        return case

    return build()


def _golden_quantize(rng: np.random.Generator) -> list[tuple[str, Case]]:
    out = []
    for i, (shape, bs, qt, dq, dt) in enumerate(
        [
            ((4, 64), 64, "nf4", False, "float32"),
            ((130,), 32, "nf4", True, "float32"),
            ((3, 33), 128, "fp4", False, "float32"),
            ((257,), 64, "fp4", True, "float16"),
            ((2, 600), 256, "nf4", True, "float16"),
        ]
    ):
        x = (rng.standard_normal(shape) * rng.choice([0.01, 1.0, 30.0])).astype(np.float32).astype(_dtype(dt))
        out.append(
            (
                f"case{i}_{qt}_bs{bs}_{'dq' if dq else 'plain'}_{dt}_{'x'.join(map(str, shape))}",
                {"x": x, "blocksize": bs, "quant_type": qt, "double_quant": dq},
            )
        )
    return out


# ---------------------------------------------------------------------------- dequantize_4bit


def _dequantize_case(q: Case) -> Case:
    from refimpl import quant

    kw = {k: q[k] for k in ("profile", "nonfinite") if k in q}
    packed, state = quant.quantize_4bit(q["x"], q["blocksize"], q["quant_type"], q["double_quant"], **kw)
    return {"packed": packed, "state": state}


#: quantize_4bit classes that say nothing about a (packed, state) input: how the scaled values were formed
#: and input layouts; the other shape / dtype / option classes carry over, and these value classes too:
_DEQUANT_DROPPED = ("option: nonfinite=propagate", "shape: Fortran-order (transposed view) input")
_DEQUANT_VALUES = (
    "value: exact code values and ±absmax (s = ±1)",
    "value: zeros and -0.0",
    "value: all-zero full block (absmax 0)",
    "value: subnormal block with absmax below 1e-38 (clamped scale)",
    "value: block absmax between 1e-38 and the smallest normal float32",
    "value: second double-quant group with another scale than the first",
    "value: NaN in a block",
    "value: ±inf in a block",
)


def _carried(classes: tuple[str, ...]) -> set[str]:
    return {c for c in classes if c not in _DEQUANT_DROPPED and (not c.startswith("value:") or c in _DEQUANT_VALUES)}


_DEQUANT_CLASSES = (
    *(c for c in _QUANT_CLASSES if c in _carried(_QUANT_CLASSES)),
    "value: every byte value 0..255 with arbitrary block scales",
    "value: FP4 nibble 8 (zero) and nibble 0",
    "value: NaN block scale",
    "option: profile=bitsandbytes-cpu, FP4 with an even last dimension (C++ path: -0.0, C++ bf16 rounding)",
    "option: profile=bitsandbytes-cpu, FP4 with an odd last dimension (torch path: +0.0)",
    "option: profile given to dequantize_4bit for a reference-profile state",
    "shape: 2-D or 3-D with at most 2 elements (packed is a single (1, 1) byte row)",
)


def _byte_state(shape: tuple[int, ...], bs: int, quant_type: str, dtype: str, seed: int, nested: bool = False) -> Case:
    """Packed bytes cycling through all 256 values with random per-block scales (a state no quantizer need
    produce, so every nibble meets every block position)."""
    from refimpl.quant import QuantState, codebooks
    from refimpl.quant.nested import correctly_rounded_mean

    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    packed = ((np.arange((n + 1) // 2) * 37 + seed) % 256).astype(np.uint8).reshape(-1, 1)
    nblocks = -(-n // bs)
    absmax = rng.uniform(0.05, 9.0, nblocks).astype(np.float32)
    if not nested:
        return {
            "packed": packed,
            "state": QuantState(
                shape=shape,
                dtype=dtype,
                blocksize=bs,
                quant_type=quant_type,
                absmax=absmax,
                code=codebooks.codebook(quant_type),
            ),
        }
    codes = rng.integers(0, 256, nblocks).astype(np.uint8)
    a2 = rng.uniform(0.5, 3.0, -(-nblocks // 256)).astype(np.float32)
    return {
        "packed": packed,
        "state": QuantState(
            shape=shape,
            dtype=dtype,
            blocksize=bs,
            quant_type=quant_type,
            absmax=codes,
            code=codebooks.codebook(quant_type),
            offset=correctly_rounded_mean(absmax),
            nested_absmax=a2,
            nested_code=codebooks.codebook("dynamic8"),
        ),
    }


@functools.cache
def _dequantize_boundary_cases() -> tuple[Boundary, ...]:
    out: list[Boundary] = []
    for b in _quantize_boundary_cases():
        cls = _carried(b.classes)
        if "value: NaN in a block" in b.classes:
            cls.add("value: NaN block scale")
        if b.case["quant_type"] == "fp4" and "value: FP4 tiny values in (0, 1/384] and (-1/384, 0)" in b.classes:
            cls.add("value: FP4 nibble 8 (zero) and nibble 0")
        out.append(Boundary(b.label, _dequantize_case(b.case), tuple(sorted(cls))))
    every = "value: every byte value 0..255 with arbitrary block scales"
    for shape, bs, qt, dt, nested in (
        ((9, 57), 64, "nf4", "float32", False),
        ((9, 57), 32, "fp4", "bfloat16", True),
        ((3, 7, 25), 128, "nf4", "float16", False),
        ((600,), 256, "fp4", "float16", False),
    ):
        case = _byte_state(shape, bs, qt, dt, seed=bs, nested=nested)
        cls = {every, f"dtype: {dt}", f"option: blocksize={bs}", f"option: quant_type={qt}", _dq_cls(nested)}
        cls.add(
            "shape: 3-D"
            if len(shape) == 3
            else "shape: 1-D"
            if len(shape) == 1
            else "shape: 2-D, row not a whole number of blocks"
        )
        if qt == "fp4":
            cls.add("value: FP4 nibble 8 (zero) and nibble 0")
        out.append(
            Boundary(f"all byte values, {qt} {dt} bs {bs} {'x'.join(map(str, shape))}", case, tuple(sorted(cls)))
        )
    # the FP4 zero sign and bf16 rounding of the bitsandbytes-cpu profile, and profile given to dequantize
    even = "option: profile=bitsandbytes-cpu, FP4 with an even last dimension (C++ path: -0.0, C++ bf16 rounding)"
    odd = "option: profile=bitsandbytes-cpu, FP4 with an odd last dimension (torch path: +0.0)"
    for shape, dt, tag in (((4, 48), "bfloat16", even), ((4, 47), "float32", odd), ((3, 64), "float16", even)):
        case = _byte_state(shape, 32, "fp4", dt, seed=3)
        state = case["state"]
        from dataclasses import replace

        case = {"packed": case["packed"], "state": replace(state, profile="bitsandbytes-cpu")}
        out.append(
            Boundary(
                f"fp4 {dt} {'x'.join(map(str, shape))} state profile bitsandbytes-cpu",
                case,
                (
                    tag,
                    "option: profile=bitsandbytes-cpu",
                    "value: FP4 nibble 8 (zero) and nibble 0",
                    f"dtype: {dt}",
                    "option: quant_type=fp4",
                ),
            )
        )
    # a packed (1, 1) array looks like the transposed [1, m] layout that bitsandbytes' dequantize_4bit still
    # accepts (it transposes its result back): a kernel must not mistake a tiny N-D tensor for that layout
    tiny = "shape: 2-D or 3-D with at most 2 elements (packed is a single (1, 1) byte row)"
    for shape, qt, dt in (((1, 1, 1), "nf4", "float32"), ((1, 2), "fp4", "float16"), ((2, 1, 1), "nf4", "bfloat16")):
        case = _byte_state(shape, 32, qt, dt, seed=5)
        out.append(
            Boundary(
                f"tiny {qt} {dt} {'x'.join(map(str, shape))}",
                case,
                (tiny, f"dtype: {dt}", f"option: quant_type={qt}", "option: blocksize=32"),
            )
        )
    case = _byte_state((4, 48), 64, "fp4", "bfloat16", seed=11)
    out.append(
        Boundary(
            "fp4 bfloat16 4x48 reference state, profile=bitsandbytes-cpu given",
            {**case, "profile": "bitsandbytes-cpu"},
            (
                "option: profile given to dequantize_4bit for a reference-profile state",
                even,
                "value: FP4 nibble 8 (zero) and nibble 0",
                "dtype: bfloat16",
            ),
        )
    )
    return tuple(out)


def _dequantize_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        case = _dequantize_case(draw(_quantize_strategy()))
        if draw(st.integers(0, 3)) == 0:
            case["profile"] = draw(st.sampled_from(["reference", "bitsandbytes-cpu"]))
        return case

    return build()


def _quant_specials() -> list[Special]:
    base = {"blocksize": 64, "quant_type": "nf4", "double_quant": False}
    x = np.linspace(-1, 1, 128, dtype=np.float32)
    out = []
    for qt in ("nf4", "fp4"):
        z = dict(base, quant_type=qt)
        out += [
            Special(f"{qt}: all-zero full block", {**z, "x": np.zeros(64, np.float32)}),
            Special(f"{qt}: all-zero tail block", {**z, "x": np.concatenate([x[:64], np.zeros(6, np.float32)])}),
            Special(f"{qt}: x has nan", {**z, "x": np.where(np.arange(128) == 5, np.nan, x).astype(np.float32)}),
            Special(f"{qt}: x has inf", {**z, "x": np.where(np.arange(128) == 5, np.inf, x).astype(np.float32)}),
            Special(f"{qt}: subnormal block", {**z, "x": np.full(64, 1e-40, np.float32)}),
            Special(f"{qt}: odd length", {**z, "x": x[:7].copy()}),
            Special(f"{qt}: -0.0 values", {**z, "x": np.full(64, -0.0, np.float32)}),
        ]
    out += [
        Special("blocksize 48 (unsupported)", {**base, "x": x, "blocksize": 48}),
        Special("quant_type int4 (unknown)", {**base, "x": x, "quant_type": "int4"}),
        Special("integer input", {**base, "x": np.arange(64, dtype=np.int32)}),
        Special("empty input", {**base, "x": np.zeros(0, np.float32)}),
    ]
    return out


# ---------------------------------------------------------------------------- nibble packing


def _pack_strategy():
    from hypothesis import strategies as st

    return st.fixed_dictionaries(
        {
            "nibbles": st.lists(st.integers(0, 15), min_size=1, max_size=64).map(lambda v: np.asarray(v, np.uint8)),
            "pad": st.integers(0, 15),
        }
    )


def _unpack_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        n = draw(st.integers(1, 64))
        packed = np.asarray(
            draw(st.lists(st.integers(0, 255), min_size=(n + 1) // 2, max_size=(n + 1) // 2)), np.uint8
        ).reshape(-1, 1)
        return {"packed": packed, "n": n}

    return build()


_PACK_CLASSES = (
    "shape: even count",
    "shape: odd count (pad nibble)",
    "shape: single nibble",
    "shape: count % 16 != 0 and % 8 != 0",
    "value: every nibble 0..15 in both positions",
    "option: pad 0",
    "option: pad 15",
    "option: pad other",
    "dtype: uint8",
    "dtype: int64",
)


def _pack_boundary() -> list[Boundary]:
    allpairs = np.array([[hi, lo] for hi in range(16) for lo in range(16)], np.uint8).reshape(-1)
    return [
        Boundary(
            "all 256 nibble pairs, even",
            {"nibbles": allpairs, "pad": 0},
            ("shape: even count", "value: every nibble 0..15 in both positions", "option: pad 0", "dtype: uint8"),
        ),
        Boundary(
            "odd 13, pad 15",
            {"nibbles": np.arange(13, dtype=np.uint8), "pad": 15},
            ("shape: odd count (pad nibble)", "shape: count % 16 != 0 and % 8 != 0", "option: pad 15", "dtype: uint8"),
        ),
        Boundary(
            "odd 21 int64, pad 7",
            {"nibbles": (np.arange(21) * 5 % 16).astype(np.int64), "pad": 7},
            (
                "shape: odd count (pad nibble)",
                "shape: count % 16 != 0 and % 8 != 0",
                "option: pad other",
                "dtype: int64",
            ),
        ),
        Boundary(
            "single nibble 9, pad 0",
            {"nibbles": np.array([9], np.uint8), "pad": 0},
            ("shape: single nibble", "shape: odd count (pad nibble)", "option: pad 0", "dtype: uint8"),
        ),
    ]


_UNPACK_CLASSES = (
    "shape: even n",
    "shape: odd n (pad nibble dropped)",
    "shape: n % 16 != 0 and % 8 != 0",
    "shape: 2-D (n, 1) packed",
    "shape: 1-D packed",
    "value: every byte value 0..255",
)


def _unpack_boundary() -> list[Boundary]:
    allbytes = np.arange(256, dtype=np.uint8)
    return [
        Boundary(
            "all bytes, n 512, (256, 1)",
            {"packed": allbytes.reshape(-1, 1), "n": 512},
            ("shape: even n", "shape: 2-D (n, 1) packed", "value: every byte value 0..255"),
        ),
        Boundary(
            "all bytes, n 511, 1-D",
            {"packed": allbytes.copy(), "n": 511},
            (
                "shape: odd n (pad nibble dropped)",
                "shape: 1-D packed",
                "shape: n % 16 != 0 and % 8 != 0",
                "value: every byte value 0..255",
            ),
        ),
        Boundary(
            "n 21",
            {"packed": allbytes[100:111].reshape(-1, 1), "n": 21},
            ("shape: odd n (pad nibble dropped)", "shape: n % 16 != 0 and % 8 != 0", "shape: 2-D (n, 1) packed"),
        ),
    ]


# ---------------------------------------------------------------------------- 8-bit blockwise


def _q8_threshold_case(seed: int) -> np.ndarray:
    """Blocks of 64 whose values sit on every 9th float32 midpoint of the dynamic map and ±1 ulp."""
    from refimpl.quant import codebooks

    rng = np.random.default_rng(seed)
    mids = codebooks.float32_midpoints(codebooks.codebook("dynamic8"))
    blocks = []
    for j in range(0, mids.size, 9):
        found = _threshold_block(_around(float(mids[j])), tail=False)
        if found is None:
            continue
        a, xs = found
        vals = np.array([a, *xs], dtype=np.float32)
        blocks.append(np.concatenate([vals, _filler(rng, 64 - vals.size, float(a))]))
    return np.concatenate(blocks)


def _q8_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        bs = draw(st.sampled_from(_BLOCKSIZES))
        shape = _shape_of(draw, 300 if bs <= 128 else 2 * bs + 40)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        x = (rng.standard_normal(int(np.prod(shape))) * draw(st.sampled_from([1e-3, 1.0, 40.0]))).astype(np.float32)
        x = _planted(draw, x, bs, "dynamic8", np.dtype(np.float32), False)
        case: Case = {"x": x.reshape(shape), "blocksize": bs}
        if draw(st.booleans()):
            case["profile"] = draw(st.sampled_from(["reference", "bitsandbytes-cpu"]))
        return case

    return build()


_Q8_CLASSES = (
    "shape: 1-D",
    "shape: 2-D",
    "shape: tail block (n % blocksize != 0)",
    "shape: tail length % 8 != 0 (remainder after 8 and 16 lanes)",
    *(f"option: blocksize={bs}" for bs in _BLOCKSIZES),
    "option: profile=bitsandbytes-cpu",
    "value: scaled value at dynamic-map midpoints and ±1 ulp",
    "value: all-zero block",
    "value: zeros and -0.0",
    "value: ±absmax",
)


@functools.cache
def _q8_boundary_cases() -> tuple[Boundary, ...]:
    rng = np.random.default_rng(8)
    out = [
        Boundary(
            "dynamic-map midpoints ±1 ulp, bs 64",
            {"x": _q8_threshold_case(1), "blocksize": 64},
            ("value: scaled value at dynamic-map midpoints and ±1 ulp", "shape: 1-D", "option: blocksize=64"),
        ),
        Boundary(
            "dynamic-map midpoints ±1 ulp, bitsandbytes-cpu LUT",
            {"x": _q8_threshold_case(2), "blocksize": 64, "profile": "bitsandbytes-cpu"},
            (
                "value: scaled value at dynamic-map midpoints and ±1 ulp",
                "option: profile=bitsandbytes-cpu",
                "option: blocksize=64",
            ),
        ),
    ]
    z = np.concatenate([np.zeros(32), rng.standard_normal(32), [-0.0, 0.0, 1.0, -1.0, 0.5], np.zeros(8)])
    out.append(
        Boundary(
            "zeros, -0.0, ±absmax, tail 13, bs 32",
            {"x": z.astype(np.float32).reshape(-1), "blocksize": 32},
            (
                "value: all-zero block",
                "value: zeros and -0.0",
                "value: ±absmax",
                "shape: 1-D",
                "shape: tail block (n % blocksize != 0)",
                "option: blocksize=32",
                "shape: tail length % 8 != 0 (remainder after 8 and 16 lanes)",
            ),
        )
    )
    for bs, shape in (
        (128, (3, 100)),
        (256, (700,)),
        (512, (2, 600)),
        (1024, (1100,)),
        (2048, (3, 1000)),
        (4096, (4200,)),
    ):
        x = (rng.standard_normal(shape) * rng.choice([0.01, 1.0, 30.0])).astype(np.float32)
        n = x.size
        cls = {f"option: blocksize={bs}", "shape: 2-D" if len(shape) == 2 else "shape: 1-D"}
        if n % bs:
            cls.add("shape: tail block (n % blocksize != 0)")
        if (n % bs) % 8:
            cls.add("shape: tail length % 8 != 0 (remainder after 8 and 16 lanes)")
        out.append(Boundary(f"bs {bs} {'x'.join(map(str, shape))}", {"x": x, "blocksize": bs}, tuple(sorted(cls))))
    return tuple(out)


def _dq8_case(c: Case) -> Case:
    from refimpl import quant

    codes, absmax = quant.quantize_blockwise_8bit(c["x"], c["blocksize"], profile=c.get("profile", "reference"))
    return {"codes": codes, "absmax": absmax, "blocksize": c["blocksize"]}


_DQ8_CLASSES = (
    "shape: 1-D",
    "shape: 2-D",
    "shape: tail block (n % blocksize != 0)",
    "shape: tail length % 8 != 0 (remainder after 8 and 16 lanes)",
    *(f"option: blocksize={bs}" for bs in _BLOCKSIZES),
    "value: every code 0..255",
    "value: zero block scale",
)


def _dq8_boundary() -> list[Boundary]:
    rng = np.random.default_rng(9)
    out = []
    for b in _q8_boundary_cases():
        cls = [c for c in b.classes if c.startswith(("shape:", "option: blocksize"))]
        if "value: all-zero block" in b.classes:
            cls.append("value: zero block scale")
        out.append(Boundary(b.label, _dq8_case(b.case), tuple(cls)))
    codes = np.arange(600, dtype=np.int64) % 256
    out.append(
        Boundary(
            "every code, bs 32, 2-D (20, 30)",
            {
                "codes": codes.astype(np.uint8).reshape(20, 30),
                "absmax": rng.uniform(0.1, 5, 19).astype(np.float32),
                "blocksize": 32,
            },
            (
                "value: every code 0..255",
                "shape: 2-D",
                "shape: tail block (n % blocksize != 0)",
                "option: blocksize=32",
            ),
        )
    )
    return out


def _golden_q8(rng: np.random.Generator) -> list[tuple[str, Case]]:
    return [
        (f"n{n}_bs{bs}", {"x": (rng.standard_normal(n) * 3).astype(np.float32), "blocksize": bs})
        for n, bs in ((256, 256), (300, 64))
    ]


# ---------------------------------------------------------------------------- codebook


def _codebook_strategy():
    from hypothesis import strategies as st

    return st.fixed_dictionaries({"name": st.sampled_from(["nf4", "fp4", "dynamic8"])})


_CODEBOOK_CLASSES = ("option: name=nf4", "option: name=fp4", "option: name=dynamic8")


def _codebook_boundary() -> list[Boundary]:
    return [Boundary(n, {"name": n}, (f"option: name={n}",)) for n in ("nf4", "fp4", "dynamic8")]


# ---------------------------------------------------------------------------- storage cost


def _storage_strategy():
    from hypothesis import strategies as st

    return st.fixed_dictionaries(
        {
            "blocksize": st.sampled_from(_BLOCKSIZES),
            "double_quant": st.booleans(),
            "nested_blocksize": st.sampled_from([1, 64, 128, 256, 1000, 4096]),
        }
    )


_STORAGE_CLASSES = (
    *(f"option: blocksize={bs}" for bs in _BLOCKSIZES),
    "option: double_quant=False",
    "option: double_quant=True",
    "option: nested_blocksize other than 256",
)


def _storage_boundary() -> list[Boundary]:
    out = []
    for bs in _BLOCKSIZES:
        for dq in (False, True):
            out.append(
                Boundary(
                    f"bs {bs} dq {dq}", {"blocksize": bs, "double_quant": dq}, (f"option: blocksize={bs}", _dq_cls(dq))
                )
            )
    out.append(
        Boundary(
            "bs 64 nested_blocksize 128",
            {"blocksize": 64, "double_quant": True, "nested_blocksize": 128},
            ("option: nested_blocksize other than 256", "option: double_quant=True", "option: blocksize=64"),
        )
    )
    return out


# ---------------------------------------------------------------------------- check_4bit


def _perturbed(
    x: np.ndarray,
    bs: int,
    qt: str,
    dq: bool,
    rng: np.random.Generator,
    *,
    profile: str = "reference",
    flips: int = 6,
    absmax_bump: bool = False,
) -> Case:
    """A (packed, state, x) triple as an implementation might produce it: the reference's codes with a few
    nibbles moved to a neighbouring code, to FP4's other zero, or anywhere, and optionally one block scale off."""
    from dataclasses import replace

    from refimpl.quant import blockwise, codebooks

    packed, state = blockwise.quantize_4bit(x, bs, qt, dq, profile=profile, nonfinite="propagate")
    nib = blockwise.unpack_nibbles(packed, state.n).astype(np.int64)
    pos = codebooks.position_of_nibble(qt)
    order = codebooks.nibble_of_position(qt)
    for i in rng.choice(state.n, size=min(flips, state.n), replace=False):
        kind = rng.integers(0, 3)
        if kind == 0:  # neighbour in value order
            p = pos[nib[i]] + (1 if pos[nib[i]] < 15 else -1)
            nib[i] = order[p]
        elif kind == 1 and qt == "fp4" and nib[i] in (0, 8):
            nib[i] = 8 - nib[i]
        else:
            nib[i] = (nib[i] + 5) % 16
    pad = int(blockwise.unpack_nibbles(packed, state.n + 1)[-1]) if state.n % 2 else 0  # keep the pad nibble
    packed = blockwise.pack_nibbles(nib.astype(np.uint8), pad=pad)
    if absmax_bump and not state.nested:
        am = state.absmax.copy()
        am[0] = np.nextafter(am[0], np.float32(np.inf))
        state = replace(state, absmax=am)
    case: Case = {"packed": packed, "state": state, "x": x}
    if profile != "reference":
        case["profile"] = profile
    return case


def _check_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        q = draw(_quantize_strategy())
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        case = _perturbed(
            q["x"],
            q["blocksize"],
            q["quant_type"],
            q["double_quant"],
            rng,
            profile=q.get("profile", "reference"),
            flips=draw(st.integers(0, 8)),
            absmax_bump=draw(st.booleans()),
        )
        if draw(st.booleans()):
            case["ulps"] = draw(st.sampled_from([0, 1, 3, 10.5]))
        return case

    return build()


_CHECK_CLASSES = (
    "value: equal codes",
    "value: admissible neighbour at a threshold",
    "value: neighbour code far from any threshold (wrong)",
    "value: FP4 zero-sign difference",
    "value: difference in a special block (NaN, zero or subnormal absmax)",
    "value: block scale differs",
    "option: ulps=0",
    "option: ulps default",
    "option: profile=bitsandbytes-cpu",
    "option: quant_type=nf4",
    "option: quant_type=fp4",
    "option: double_quant=True",
    "shape: tail block",
    "dtype: bfloat16",
)


def _check_boundary() -> list[Boundary]:
    from refimpl.quant import blockwise

    rng = np.random.default_rng(13)
    out = []
    x = _threshold_case("nf4", 32, 13, 21)
    packed, state = blockwise.quantize_4bit(x, 32, "nf4")
    out.append(
        Boundary(
            "equal codes",
            {"packed": packed, "state": state, "x": x},
            ("value: equal codes", "option: quant_type=nf4", "shape: tail block", "option: ulps default"),
        )
    )
    # thresholds: flip every code whose scaled value is within 1 ulp of a midpoint to its neighbour
    steps = blockwise.profile_steps("reference")
    s = steps.scaled(x, steps.block_absmax(x, 32), 32)
    nib = blockwise.unpack_nibbles(packed, x.size).astype(np.int64)
    mids = _midpoints("nf4")
    near = np.flatnonzero(
        np.min(np.abs(s[:, None].astype(np.float64) - mids[None, :]), axis=1) <= np.abs(s).astype(np.float64) * 2.0**-22
    )
    for i in near:
        j = int(np.argmin(np.abs(mids - s[i])))
        nib[i] = j + 1 if nib[i] == j else j
    flipped = blockwise.pack_nibbles(nib.astype(np.uint8), pad=7)
    for ulps, tag in ((3, "option: ulps default"), (0, "option: ulps=0")):
        case = {"packed": flipped, "state": state, "x": x}
        if ulps != 3:
            case["ulps"] = ulps
        out.append(
            Boundary(
                f"neighbours at NF4 thresholds, ulps {ulps}",
                case,
                ("value: admissible neighbour at a threshold", tag, "option: quant_type=nf4"),
            )
        )
    xf = np.array([1.0, 1e-4, -1e-4, 0.0, 0.3, -0.6, 0.01, 0.9] * 8, np.float32)
    out.append(
        Boundary(
            "fp4 zero sign, far neighbours, scale off",
            _perturbed(xf, 32, "fp4", False, rng, flips=20, absmax_bump=True),
            (
                "value: FP4 zero-sign difference",
                "value: neighbour code far from any threshold (wrong)",
                "value: block scale differs",
                "option: quant_type=fp4",
            ),
        )
    )
    xs = np.concatenate([np.full(32, 1e-40), [np.nan], np.ones(31), np.zeros(32), np.linspace(-1, 1, 40)])
    out.append(
        Boundary(
            "special blocks (subnormal, NaN, zero), nested bf16, bitsandbytes-cpu",
            _perturbed(
                xs.astype(np.float32).astype(_dtype("bfloat16")),
                32,
                "nf4",
                True,
                rng,
                flips=40,
                profile="bitsandbytes-cpu",
            ),
            (
                "value: difference in a special block (NaN, zero or subnormal absmax)",
                "option: profile=bitsandbytes-cpu",
                "option: double_quant=True",
                "dtype: bfloat16",
                "shape: tail block",
            ),
        )
    )
    return out


# ---------------------------------------------------------------------------- qlora


def _qlora_weight(
    n_out: int, n_in: int, bs: int, qt: str, dq: bool, dt: str, rng: np.random.Generator, profile: str | None = None
) -> tuple[np.ndarray, Any]:
    from refimpl import quant

    w = (rng.standard_normal((n_out, n_in)) * rng.choice([0.05, 1.0])).astype(np.float32).astype(_dtype(dt))
    if qt == "fp4":
        w.reshape(-1)[::7] = np.asarray(1e-4, np.float32).astype(_dtype(dt))  # FP4 nibble 8 weights
    if profile is None:
        return quant.quantize_4bit(w, bs, qt, dq)
    return quant.quantize_4bit(w, bs, qt, dq, profile=profile)


def _qlora_strategy():
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        n_in = draw(st.sampled_from([8, 13, 16, 24, 40, 72, 77, 128]))
        n_out = draw(rs.dims(1, 20))
        r = draw(st.integers(1, min(n_in, n_out, 8)))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        bs = draw(st.sampled_from(_BLOCKSIZES))
        packed, state = _qlora_weight(
            n_out,
            n_in,
            bs,
            draw(st.sampled_from(["nf4", "fp4"])),
            draw(st.booleans()),
            draw(st.sampled_from(_FLOAT_DTYPES)),
            rng,
        )
        rows = draw(st.sampled_from([1, 2, 3, 4, 5, 16, 17, 24, 40]))
        lead = draw(st.sampled_from([(rows,), (1, rows), () if rows == 1 else (rows,)]))
        xdt = draw(st.sampled_from(["float64", "float32", "float16", "bfloat16"]))
        # seeded arrays: drawing up to 40 x 128 elements one by one dominates the run time
        c: Case = {
            "x": rng.standard_normal((*lead, n_in)).astype(_dtype(xdt)),
            "packed": packed,
            "state": state,
            "A": rng.standard_normal((r, n_in)),
            "B": rng.standard_normal((n_out, r)),
            "scaling": draw(rs.reals(-4.0, 4.0)),
        }
        if draw(st.booleans()):
            c["bias"] = rng.standard_normal(n_out)
        if draw(st.integers(0, 3)) == 0:
            c["dropout_mask"] = rng.integers(0, 2, c["x"].shape).astype(np.float64)
            c["dropout_p"] = draw(st.sampled_from([0.0, 0.25, 0.5]))
        return c

    return build()


_QLORA_CLASSES = (
    "shape: x 1-D",
    "shape: x 2-D",
    "shape: x 3-D",
    "shape: x Fortran-order (transposed view)",
    "shape: 1 row",
    "shape: 2-3 rows",
    "shape: 4-16 rows",
    "shape: more than 16 rows",
    "shape: in_features % 16 != 0 and % 8 != 0",
    "shape: in_features % 16 == 8",
    "shape: out_features % 8 != 0",
    "shape: row of W not a whole number of blocks",
    "shape: row of W shorter than a block",
    "shape: rows of W a whole number of blocks",
    "shape: more than 256 blocks (second double-quant group)",
    "shape: more than 256 output features",
    "dtype: state float32",
    "dtype: state float16",
    "dtype: state bfloat16",
    "dtype: x float32",
    "dtype: x float16",
    "dtype: x bfloat16",
    "dtype: x float64",
    "option: quant_type=nf4",
    "option: quant_type=fp4",
    "option: double_quant=False",
    "option: double_quant=True",
    *(f"option: blocksize={bs}" for bs in _BLOCKSIZES),
    "option: bias",
    "option: no bias",
    "option: dropout mask",
    "option: scaling 0",
    "option: scaling negative",
)


def _qlora_case(
    lead: tuple[int, ...],
    n_in: int,
    n_out: int,
    r: int,
    bs: int,
    qt: str,
    dq: bool,
    sdt: str,
    xdt: str,
    bias: bool,
    scaling: float,
    seed: int,
    mask: bool = False,
) -> tuple[Case, set[str]]:
    rng = np.random.default_rng(seed)
    packed, state = _qlora_weight(n_out, n_in, bs, qt, dq, sdt, rng)
    c: Case = {
        "x": rng.standard_normal((*lead, n_in)).astype(_dtype(xdt)),
        "packed": packed,
        "state": state,
        "A": rng.standard_normal((r, n_in)),
        "B": rng.standard_normal((n_out, r)),
        "scaling": scaling,
    }
    m = int(np.prod(lead)) if lead else 1
    cls = {
        f"shape: x {len(lead) + 1}-D",
        f"dtype: state {sdt}",
        f"dtype: x {xdt}",
        f"option: quant_type={qt}",
        _dq_cls(dq),
        f"option: blocksize={bs}",
        "option: bias" if bias else "option: no bias",
        "shape: 1 row"
        if m == 1
        else "shape: 2-3 rows"
        if m < 4
        else "shape: 4-16 rows"
        if m <= 16
        else "shape: more than 16 rows",
    }
    if n_in % 8:
        cls.add("shape: in_features % 16 != 0 and % 8 != 0")
    elif n_in % 16 == 8:
        cls.add("shape: in_features % 16 == 8")
    if n_out % 8:
        cls.add("shape: out_features % 8 != 0")
    cls.add(
        "shape: rows of W a whole number of blocks"
        if n_in % bs == 0
        else "shape: row of W shorter than a block"
        if n_in < bs
        else "shape: row of W not a whole number of blocks"
    )
    if -(-n_in * n_out // bs) > 256 and dq:
        cls.add("shape: more than 256 blocks (second double-quant group)")
    if n_out > 256:
        cls.add("shape: more than 256 output features")
    if scaling == 0:
        cls.add("option: scaling 0")
    elif scaling < 0:
        cls.add("option: scaling negative")
    if bias:
        c["bias"] = rng.standard_normal(n_out)
    if mask:
        c["dropout_mask"] = rng.integers(0, 2, c["x"].shape).astype(np.float64)
        c["dropout_p"] = 0.25
        cls.add("option: dropout mask")
    return c, cls


def _qlora_boundary() -> list[Boundary]:
    specs = [  # (lead, in, out, r, bs, qt, dq, state dtype, x dtype, bias, scaling, mask)
        ((), 77, 19, 3, 64, "nf4", False, "float32", "float64", True, 1.5, False),
        ((1,), 128, 16, 4, 32, "fp4", True, "bfloat16", "float32", False, 2.0, False),
        ((3,), 256, 24, 2, 64, "nf4", True, "float16", "float64", True, -0.5, False),
        ((2,), 40, 13, 2, 32, "fp4", False, "float32", "float16", True, 1.0, False),
        ((4,), 64, 12, 3, 64, "nf4", True, "bfloat16", "bfloat16", False, 0.75, False),
        ((17,), 72, 21, 3, 32, "nf4", True, "bfloat16", "float64", True, 1.25, False),
        ((2, 9), 64, 10, 2, 64, "fp4", True, "float16", "bfloat16", True, -2.0, False),
        ((40,), 128, 260, 4, 32, "nf4", True, "float32", "float32", True, 0.5, False),
        ((20,), 45, 7, 2, 128, "fp4", False, "float32", "float64", True, 1.0, True),
        ((5,), 24, 9, 2, 32, "fp4", False, "float32", "float64", False, 0.0, False),
        ((33,), 2000, 3, 2, 4096, "fp4", True, "float16", "float64", True, 1.0, False),
        ((16,), 1024, 4, 2, 2048, "nf4", True, "bfloat16", "float16", True, 1.0, False),
        ((1, 17), 136, 5, 2, 256, "nf4", False, "float16", "float64", True, -1.0, False),
        ((2,), 512, 6, 2, 512, "fp4", True, "float32", "float64", False, 1.0, False),
        ((18,), 1024, 3, 2, 1024, "nf4", False, "bfloat16", "float32", True, 1.0, True),
        ((1,), 13, 9, 2, 128, "nf4", True, "float32", "float64", True, 1.0, False),
        ((2,), 128, 80, 2, 32, "fp4", True, "float16", "float32", True, 1.0, False),
    ]
    out = []
    for i, (lead, n_in, n_out, r, bs, qt, dq, sdt, xdt, bias, s, mask) in enumerate(specs):
        c, cls = _qlora_case(lead, n_in, n_out, r, bs, qt, dq, sdt, xdt, bias, s, 100 + i, mask)
        if i in (5, 7):  # x as a transposed view: rows are the logical rows, not memory runs
            c["x"] = np.asfortranarray(c["x"])
            cls.add("shape: x Fortran-order (transposed view)")
        out.append(
            Boundary(
                f"x {'x'.join(map(str, (*lead, n_in)))} W {n_out}x{n_in} {qt} bs {bs} "
                f"{'dq ' if dq else ''}{sdt}{' bias' if bias else ''}{' mask' if mask else ''}",
                c,
                tuple(sorted(cls)),
            )
        )
    return out


def _golden_qlora(rng: np.random.Generator) -> list[tuple[str, Case]]:
    from refimpl import quant
    from refimpl.conformance.strategies import dyadic

    out = []
    for i, (lead, n_in, n_out, r, bs, qt, dq) in enumerate(
        [((2, 3), 64, 8, 4, 64, "nf4", False), ((5,), 40, 6, 2, 32, "fp4", True)]
    ):
        packed, state = quant.quantize_4bit(dyadic(rng, (n_out, n_in)).astype(np.float32), bs, qt, dq)
        c: Case = {
            "x": dyadic(rng, (*lead, n_in)),
            "packed": packed,
            "state": state,
            "A": dyadic(rng, (r, n_in)),
            "B": dyadic(rng, (n_out, r)),
            "scaling": (0.5, 2.0)[i],
        }
        if i == 0:
            c["bias"] = dyadic(rng, (n_out,))
        out.append((f"case{i}_{qt}_bs{bs}_{'dq' if dq else 'plain'}_in{n_in}_out{n_out}_r{r}", c))
    return out


def _qlora_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """|x||Ŵ|ᵀ + |b| + |s|(|x||A|ᵀ)|B|ᵀ with Ŵ the exactly dequantized base weight (dropout: |x|·mask/(1−p))."""
    from refimpl import lora, qlora

    w = np.abs(qlora.dequantized_weight(case["packed"], case["state"]))
    b = None if case.get("bias") is None else np.abs(case["bias"])
    x = np.abs(np.asarray(case["x"], dtype=np.float64))
    base = lora.forward(x, w, np.zeros((1, x.shape[-1])), np.zeros((w.shape[0], 1)), 0.0, bias=b)
    mask = case.get("dropout_mask")
    xa = x if mask is None else x * np.asarray(mask, np.float64) / (1.0 - float(case.get("dropout_p", 0.0)))
    branch = abs(float(case["scaling"])) * ((xa @ np.abs(case["A"]).T) @ np.abs(case["B"]).T)
    return {"out": base + branch}


def _qlora_specials() -> list[Special]:
    from refimpl import quant

    base = _golden_qlora(np.random.default_rng(0))[0][1]
    return [
        Special("x has nan", {**base, "x": np.full((1, 64), np.nan)}),
        Special(
            "1-D base weight",
            {**base, **dict(zip(("packed", "state"), quant.quantize_4bit(np.ones(64, np.float32)), strict=True))},
        ),
        Special("x of the wrong width", {**base, "x": np.ones((2, 63))}),
    ]


def _dq_weight_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        packed, state = _qlora_weight(
            draw(st.integers(1, 20)),
            draw(st.sampled_from([8, 13, 40, 77, 128])),
            draw(st.sampled_from(_BLOCKSIZES)),
            draw(st.sampled_from(["nf4", "fp4"])),
            draw(st.booleans()),
            draw(st.sampled_from(_FLOAT_DTYPES)),
            rng,
            profile=draw(st.sampled_from(["reference", "bitsandbytes-cpu"])),
        )
        case: Case = {"packed": packed, "state": state}
        if draw(st.booleans()):
            case["profile"] = draw(st.sampled_from(["reference", "bitsandbytes-cpu"]))
        return case

    return build()


_DQW_CLASSES = (
    "shape: rows a whole number of blocks",
    "shape: row not a whole number of blocks",
    "shape: row shorter than a block",
    "shape: more than 256 blocks (second double-quant group)",
    "dtype: float32",
    "dtype: float16",
    "dtype: bfloat16",
    "option: quant_type=nf4",
    "option: quant_type=fp4",
    "option: double_quant=True",
    "option: profile=bitsandbytes-cpu",
    "option: profile given for a reference-profile state (FP4 zero sign)",
)


def _dq_weight_boundary() -> list[Boundary]:
    out = []
    for i, (n_out, n_in, bs, qt, dq, dt, prof) in enumerate(
        [
            (12, 64, 64, "nf4", False, "float32", None),
            (5, 48, 32, "fp4", True, "bfloat16", "bitsandbytes-cpu"),
            (3, 16, 32, "nf4", True, "float16", None),
            (40, 232, 32, "fp4", True, "float32", None),
        ]
    ):
        packed, state = _qlora_weight(n_out, n_in, bs, qt, dq, dt, np.random.default_rng(200 + i), profile=prof)
        cls = {
            f"dtype: {dt}",
            f"option: quant_type={qt}",
            "shape: rows a whole number of blocks"
            if n_in % bs == 0
            else "shape: row shorter than a block"
            if n_in < bs
            else "shape: row not a whole number of blocks",
        }
        if dq:
            cls.add("option: double_quant=True")
        if prof:
            cls.add("option: profile=bitsandbytes-cpu")
        if -(-n_out * n_in // bs) > 256:
            cls.add("shape: more than 256 blocks (second double-quant group)")
        out.append(
            Boundary(f"W {n_out}x{n_in} {qt} bs {bs} {dt}", {"packed": packed, "state": state}, tuple(sorted(cls)))
        )
    packed, state = _qlora_weight(6, 64, 64, "fp4", False, "float32", np.random.default_rng(210))
    out.append(
        Boundary(
            "W 6x64 fp4 reference state, profile=bitsandbytes-cpu given",
            {"packed": packed, "state": state, "profile": "bitsandbytes-cpu"},
            (
                "option: profile given for a reference-profile state (FP4 zero sign)",
                "option: quant_type=fp4",
                "dtype: float32",
                "shape: rows a whole number of blocks",
            ),
        )
    )
    return out


def _feb_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        c = draw(_qlora_strategy())
        c.pop("dropout_mask", None)
        c.pop("dropout_p", None)
        c["dtype"] = draw(st.sampled_from(["float32", "float16", "bfloat16", "float64"]))
        acc = draw(st.sampled_from([None, "float32", "float64"]))
        if acc is not None:
            c["accumulate"] = acc
        return c

    return build()


_FEB_CLASSES = (
    "option: dtype=float32",
    "option: dtype=float16",
    "option: dtype=bfloat16",
    "option: dtype=float64",
    "option: accumulate=float32",
    "option: accumulate=float64",
    "option: bias",
    "option: no bias",
    "shape: x 1-D",
    "shape: x 3-D",
    "shape: more than 16 rows",
    "option: quant_type=nf4",
    "option: quant_type=fp4",
)


def _feb_boundary() -> list[Boundary]:
    out = []
    for i, (dt, acc, lead, bias, qt) in enumerate(
        [
            ("float32", None, (3,), True, "nf4"),
            ("float16", "float32", (), False, "fp4"),
            ("bfloat16", "float32", (2, 9), True, "nf4"),
            ("float64", "float64", (17,), False, "nf4"),
        ]
    ):
        c, _ = _qlora_case(lead, 40, 6, 2, 32, qt, True, "bfloat16", "float32", bias, 1.5, 300 + i)
        c["dtype"] = dt
        cls = {f"option: dtype={dt}", "option: bias" if bias else "option: no bias", f"option: quant_type={qt}"}
        if acc:
            c["accumulate"] = acc
            cls.add(f"option: accumulate={acc}")
        if len(lead) != 1:
            cls.add(f"shape: x {len(lead) + 1}-D")
        if int(np.prod(lead)) > 16:
            cls.add("shape: more than 16 rows")
        out.append(Boundary(f"dtype {dt} accumulate {acc} x {lead}", c, tuple(sorted(cls))))
    return out


def _feb_tolerance() -> Bounded:
    """The bound is a float64 sum of non-negative products: any other summation order is within γ_K of it."""
    from refimpl import qlora

    def depth(c: Mapping[str, Any]) -> int:
        return bounds.qlora_forward_bound_evaluation_depth(c["A"].shape[1], c["A"].shape[0])

    def magnitude(c: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {"out": qlora.forward_error_bound(**c)}

    return Bounded(depth, magnitude, note="the bound's own float64 evaluation, any summation order")


# ---------------------------------------------------------------------------- qlora.backward


def _grad_of(c: Case, rng: np.random.Generator, grad_dtype: str, need_dbias: bool) -> Case:
    """A qlora.forward case made a qlora.backward case: no bias (it enters no gradient), grad_y of y's shape."""
    out: Case = {k: v for k, v in c.items() if k != "bias"}
    out["grad_y"] = rng.standard_normal((*np.shape(c["x"])[:-1], c["state"].shape[0])).astype(_dtype(grad_dtype))
    out["need_dbias"] = need_dbias
    return out


def _qlora_backward_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        c = draw(_qlora_strategy())
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return _grad_of(c, rng, draw(st.sampled_from(["float64", "float32", "bfloat16"])), draw(st.booleans()))

    return build()


_QLORA_BACKWARD_CLASSES = (
    *(c for c in _QLORA_CLASSES if c not in ("option: bias", "option: no bias")),
    "dtype: grad_y float64",
    "dtype: grad_y float32",
    "dtype: grad_y bfloat16",
    "option: need_dbias",
    "value: grad_y zero",
)


def _qlora_backward_boundary() -> list[Boundary]:
    """qlora.forward's boundary cases (the same shapes, blocks, dtypes and options; 1-3 rows and 4 or more take
    different paths for g Ŵ in the numba kernel, and more than 256 output features gives a kernel that tiles Ŵ
    by 256 rows a second tile), each with a grad_y, plus a zero grad_y."""
    out = []
    gdts = ("float64", "float32", "bfloat16")
    for i, b in enumerate(_qlora_boundary()):
        gdt, dbias = gdts[i % 3], i % 2 == 0
        c = _grad_of(b.case, np.random.default_rng(400 + i), gdt, dbias)
        cls = {k for k in b.classes if k not in ("option: bias", "option: no bias")} | {f"dtype: grad_y {gdt}"}
        if dbias:
            cls.add("option: need_dbias")
        out.append(Boundary(f"{b.label.replace(' bias', '')} grad_y {gdt}", c, tuple(sorted(cls))))
    base, cls0 = _qlora_case((3,), 64, 10, 2, 32, "nf4", True, "float32", "float64", False, 1.0, 420, mask=True)
    c = _grad_of(base, np.random.default_rng(420), "float32", True)
    c["grad_y"] = np.zeros_like(c["grad_y"])
    cls = (cls0 - {"option: no bias"}) | {"value: grad_y zero", "dtype: grad_y float32", "option: need_dbias"}
    out.append(Boundary("x 3x64 W 10x64 nf4 bs 32 dq float32 mask grad_y zero", c, tuple(sorted(cls))))
    # a dropout mask on each side of the numba kernel's row switch (fewer than 4 rows / more)
    for lead in ((2,), (5,)):
        base, cls0 = _qlora_case(lead, 48, 9, 3, 32, "fp4", False, "float16", "float32", False, -1.5, 430, mask=True)
        c = _grad_of(base, np.random.default_rng(430 + lead[0]), "float64", False)
        cls = (cls0 - {"option: no bias"}) | {"dtype: grad_y float64"}
        out.append(Boundary(f"x {lead[0]}x48 W 9x48 fp4 bs 32 float16 mask grad_y float64", c, tuple(sorted(cls))))
    return out


def _golden_qlora_backward(rng: np.random.Generator) -> list[tuple[str, Case]]:
    from refimpl.conformance.strategies import dyadic

    out = []
    for i, (name, c) in enumerate(_golden_qlora(rng)):
        g = {k: v for k, v in c.items() if k != "bias"}
        g["grad_y"] = dyadic(rng, (*g["x"].shape[:-1], g["state"].shape[0]))
        g["need_dbias"] = i == 0
        if i == 1:
            g["dropout_mask"] = rng.integers(0, 2, g["x"].shape).astype(np.float64)
            g["dropout_p"] = 0.5
        out.append((f"{name}{'_drop' if i == 1 else ''}", g))
    return out


def _qlora_backward_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Each gradient's formula on absolute values (lora.backward over |x|, |Ŵ|, |A|, |B|, |g|, |s|; the keep
    factor is non-negative), Ŵ the exactly dequantized base weight."""
    from refimpl import lora, qlora

    def a(k: str) -> np.ndarray:
        return np.abs(np.asarray(case[k], dtype=np.float64))

    w = np.abs(qlora.dequantized_weight(case["packed"], case["state"], profile=case.get("profile")))
    grads = lora.backward(
        a("x"),
        w,
        a("A"),
        a("B"),
        a("grad_y"),
        abs(float(case["scaling"])),
        dropout_mask=case.get("dropout_mask"),
        dropout_p=case.get("dropout_p", 0.0),
        need_dbias=bool(case.get("need_dbias", False)),
    )
    out = {"out.dx": grads.dx, "out.dA": grads.dA, "out.dB": grads.dB}
    if grads.dbias is not None:
        out["out.dbias"] = grads.dbias
    return out


def _qlora_backward_depth(case: Mapping[str, Any]) -> int:
    r, n_in = case["A"].shape
    return bounds.qlora_backward_row_depth(n_in, case["B"].shape[0], r, int(np.prod(np.shape(case["x"])[:-1])))


def _qlora_backward_specials() -> list[Special]:
    from refimpl import quant

    base = _golden_qlora_backward(np.random.default_rng(0))[0][1]
    bad_g = {**base, "grad_y": base["grad_y"].copy()}
    bad_g["grad_y"].flat[0] = np.nan
    inf_g = {**base, "grad_y": base["grad_y"].copy()}
    inf_g["grad_y"].flat[-1] = -np.inf
    return [
        Special("x has nan", {**base, "x": np.full(base["x"].shape, np.nan)}),
        Special("grad_y has nan", bad_g),
        Special("grad_y has -inf", inf_g),
        Special("grad_y of the wrong width", {**base, "grad_y": base["grad_y"][..., :-1]}),
        Special("B is zero (adapter at init)", {**base, "B": np.zeros_like(base["B"])}),
        Special(
            "1-D base weight",
            {**base, **dict(zip(("packed", "state"), quant.quantize_4bit(np.ones(64, np.float32)), strict=True))},
        ),
    ]


def _qlora_backward_row() -> OpSpec:
    return OpSpec(
        "qlora.backward",
        _qlora_backward_strategy,
        "qlora.forward's x, packed/state, A, B, scaling, dropout mask (no bias); grad_y (..., out); need_dbias",
        Bounded(
            _qlora_backward_depth,
            _qlora_backward_magnitude,
            note="dequantization is exact; the gradients are bounded like lora.backward's",
        ),
        golden=_golden_qlora_backward,
        specials=_qlora_backward_specials,
        classes=_QLORA_BACKWARD_CLASSES,
        boundary=_qlora_backward_boundary,
    )


# ---------------------------------------------------------------------------- the rows


def rows() -> list[OpSpec]:
    exact = Exact()
    q8_golden = _golden_q8
    return [
        OpSpec(
            "qlora.forward",
            _qlora_strategy,
            "x (..., in); packed codes and QuantState of a 2-D (out, in) weight; A (r, in), B (out, r); "
            "optional bias (out,), dropout mask",
            Bounded(
                lambda c: bounds.lora_forward_depth(c["A"].shape[1], c["A"].shape[0]),
                _qlora_magnitude,
                note="dequantization is exact; the matmuls are bounded like lora.forward",
            ),
            golden=_golden_qlora,
            specials=_qlora_specials,
            classes=_QLORA_CLASSES,
            boundary=_qlora_boundary,
        ),
        _qlora_backward_row(),
        OpSpec(
            "qlora.dequantized_weight",
            _dq_weight_strategy,
            "packed codes and QuantState of a 2-D (out, in) weight; optional profile",
            exact,
            golden=lambda rng: [
                (
                    "w12x64",
                    dict(
                        zip(("packed", "state"), _qlora_weight(12, 64, 64, "nf4", False, "float32", rng), strict=True)
                    ),
                )
            ],
            specials=lambda: [
                Special(
                    "1-D state",
                    _dequantize_case(
                        {"x": np.ones(64, np.float32), "blocksize": 64, "quant_type": "nf4", "double_quant": False}
                    ),
                )
            ],
            classes=_DQW_CLASSES,
            boundary=_dq_weight_boundary,
        ),
        OpSpec(
            "qlora.dequantize_4bit",
            _dequantize_strategy,
            "re-export of quant.dequantize_4bit: packed codes and the QuantState quantize_4bit returned",
            exact,
            golden=lambda rng: [(n, _dequantize_case(c)) for n, c in _golden_quantize(rng)],
            classes=_DEQUANT_CLASSES,
            boundary=lambda: list(_dequantize_boundary_cases()),
        ),
        OpSpec(
            "qlora.forward_error_bound",
            _feb_strategy,
            "qlora.forward's arguments (no dropout) and the implementation's dtype / accumulate dtype",
            _feb_tolerance(),
            golden=lambda rng: [
                (n, {**c, "dtype": "bfloat16"}) for n, c in _golden_qlora(rng) if "dropout_mask" not in c
            ],
            specials=lambda: [
                Special("unknown dtype", {**_golden_qlora(np.random.default_rng(0))[0][1], "dtype": "int8"})
            ],
            classes=_FEB_CLASSES,
            boundary=_feb_boundary,
        ),
        OpSpec(
            "quant.codebook",
            _codebook_strategy,
            "name in nf4, fp4, dynamic8",
            exact,
            golden=lambda rng: [(n, {"name": n}) for n in ("nf4", "fp4", "dynamic8")],
            specials=lambda: [Special("unknown name", {"name": "nf3"})],
            classes=_CODEBOOK_CLASSES,
            boundary=_codebook_boundary,
        ),
        OpSpec(
            "quant.quantize_4bit",
            _quantize_strategy,
            "x float32/float16/bfloat16, any shape, finite (or nonfinite='propagate'); blocksize in 32..4096 "
            "(powers of 2); nf4/fp4; double_quant; profile reference or bitsandbytes-cpu",
            exact,
            golden=_golden_quantize,
            specials=_quant_specials,
            classes=_QUANT_CLASSES,
            boundary=_quantize_boundary,
        ),
        OpSpec(
            "quant.dequantize_4bit",
            _dequantize_strategy,
            "packed codes and the QuantState quantize_4bit returned (or any bytes and scales); optional profile",
            exact,
            golden=lambda rng: [(n, _dequantize_case(c)) for n, c in _golden_quantize(rng)],
            specials=lambda: [
                Special(
                    "packed too short",
                    {
                        **_dequantize_case(
                            {"x": np.ones(64, np.float32), "blocksize": 64, "quant_type": "nf4", "double_quant": False}
                        ),
                        "packed": np.zeros((31, 1), np.uint8),
                    },
                )
            ],
            classes=_DEQUANT_CLASSES,
            boundary=lambda: list(_dequantize_boundary_cases()),
        ),
        OpSpec(
            "quant.pack_nibbles",
            _pack_strategy,
            "integer codes in [0, 15], pad in [0, 15]",
            exact,
            golden=lambda rng: [
                ("odd7", {"nibbles": rng.integers(0, 16, 7).astype(np.uint8), "pad": 0}),
                ("even16", {"nibbles": rng.integers(0, 16, 16).astype(np.uint8), "pad": 0}),
            ],
            specials=lambda: [
                Special("nibble 16", {"nibbles": np.array([16], np.uint8), "pad": 0}),
                Special("float nibbles", {"nibbles": np.array([1.0]), "pad": 0}),
            ],
            classes=_PACK_CLASSES,
            boundary=_pack_boundary,
        ),
        OpSpec(
            "quant.unpack_nibbles",
            _unpack_strategy,
            "uint8 packed bytes, n with (n+1)//2 bytes",
            exact,
            golden=lambda rng: [("n7", {"packed": rng.integers(0, 256, (4, 1)).astype(np.uint8), "n": 7})],
            specials=lambda: [Special("wrong byte count", {"packed": np.zeros((3, 1), np.uint8), "n": 7})],
            classes=_UNPACK_CLASSES,
            boundary=_unpack_boundary,
        ),
        OpSpec(
            "quant.quantize_blockwise_8bit",
            _q8_strategy,
            "x float32 (any shape), blocksize 32..4096; profile reference or bitsandbytes-cpu",
            exact,
            golden=q8_golden,
            specials=lambda: [
                Special("all-zero block", {"x": np.zeros(64, np.float32), "blocksize": 64}),
                Special("x has nan", {"x": np.array([1, np.nan], np.float32), "blocksize": 64}),
            ],
            classes=_Q8_CLASSES,
            boundary=lambda: list(_q8_boundary_cases()),
        ),
        OpSpec(
            "quant.dequantize_blockwise_8bit",
            lambda: _q8_strategy().map(_dq8_case),
            "uint8 codes and float32 absmax per block",
            exact,
            golden=lambda rng: [
                (
                    n,
                    dict(
                        zip(("codes", "absmax"), _quant().quantize_blockwise_8bit(c["x"], c["blocksize"]), strict=True),
                        blocksize=c["blocksize"],
                    ),
                )
                for n, c in q8_golden(rng)
            ],
            specials=lambda: [
                Special(
                    "absmax of the wrong length",
                    {"codes": np.zeros(128, np.uint8), "absmax": np.ones(1, np.float32), "blocksize": 64},
                )
            ],
            classes=_DQ8_CLASSES,
            boundary=_dq8_boundary,
        ),
        OpSpec(
            "quant.storage_bits_per_parameter",
            _storage_strategy,
            "blocksize 32..4096, double_quant, nested_blocksize ≥ 1",
            exact,
            golden=lambda rng: [("bs64_dq", {"blocksize": 64, "double_quant": True})],
            specials=lambda: [
                Special("blocksize 48", {"blocksize": 48}),
                Special("nested_blocksize 0", {"blocksize": 64, "double_quant": True, "nested_blocksize": 0}),
            ],
            classes=_STORAGE_CLASSES,
            boundary=_storage_boundary,
        ),
        OpSpec(
            "quant.check_4bit",
            _check_strategy,
            "packed codes + QuantState produced by an implementation for x (nibbles may differ), x; profile; ulps ≥ 0",
            exact,
            golden=lambda rng: [
                ("nf4_equal", {**_dequantize_case(c), "x": c["x"]}) for c in [_golden_quantize(rng)[0][1]]
            ],
            specials=lambda: [
                Special(
                    "x of another shape",
                    {
                        **_dequantize_case(_golden_quantize(np.random.default_rng(0))[0][1]),
                        "x": np.ones((3, 3), np.float32),
                    },
                ),
                Special(
                    "ulps negative",
                    {
                        **_dequantize_case(_golden_quantize(np.random.default_rng(0))[0][1]),
                        "x": _golden_quantize(np.random.default_rng(0))[0][1]["x"],
                        "ulps": -1,
                    },
                ),
            ],
            classes=_CHECK_CLASSES,
            boundary=_check_boundary,
        ),
    ]
