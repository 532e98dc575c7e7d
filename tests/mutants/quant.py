"""One-defect mutants of refimpl.quant and refimpl.qlora (spec/nf4.md).

Each mutant is the reference op with one bug that a 4-bit kernel author could ship, written from
what goes wrong in real kernels (bitsandbytes' history: the 0.49→0.50 argmin→midpoint rewrite, the
AVX-512 dequantizer's row-based absmax index, the fp4 sign-of-zero differences between paths, the
CUDA fast-math reciprocal; and the usual vector-kernel slips: tails, lane remainders, path switches).

The mutants reuse the reference for argument validation (so the special-value tier sees the same
errors) and recompute the result with the one defect. Each is killed by the default
``refimpl conform`` (tests/test_mutation_suite.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import ml_dtypes
import numpy as np

from refimpl import lora, qlora, quant
from refimpl.quant import blockwise as bw
from refimpl.quant import codebooks as cb
from refimpl.quant import nested as nst
from refimpl.quant.operands import ABSMAX_MIN as _TINY
from refimpl.quant.profiles.bitsandbytes_cpu import ALL_ONES_NAN as _NAN_ALL_ONES
from refimpl.quant.profiles.bitsandbytes_cpu import dynamic8_lut
from tests.mutants import Mutant

_F32 = np.float32


# ---------------------------------------------------------------------------- quantize_4bit with one knob


def _scales(
    flat: np.ndarray,
    bs: int,
    profile: str,
    *,
    full_div: bool = False,
    tail_rcp: bool = False,
    clamp: np.float32 = _TINY,
    clamp_full: bool = True,
    store_tail_raw: bool = False,
    tail_lanes: int | None = None,
    absmax_tile: int | None = None,
    nan_skip: bool = False,
    ftz: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's per-block absmax and scaled values (CPU rules), with the named defect switched on."""
    n = flat.size
    full = n - n % bs
    blocks = flat[:full].reshape(-1, bs)
    tail = flat[full:]
    with np.errstate(all="ignore"):
        region = blocks if absmax_tile is None or bs < 2048 else blocks[:, :absmax_tile]
        if nan_skip:
            absmax = np.fmax.reduce(np.abs(region), axis=1, initial=_F32(0)).astype(_F32)
        else:
            absmax = np.abs(region).max(axis=1).astype(_F32) if full else np.zeros(0, _F32)
        denom = np.maximum(absmax, clamp).astype(_F32) if clamp_full else absmax
        if full_div:
            s = blocks / denom[:, None]
        else:
            inv = (_F32(1) / denom).astype(_F32)
            s = blocks * (_flush(inv) if ftz else inv)[:, None]
        scaled = np.clip(s.astype(_F32), _F32(-1), _F32(1)).reshape(-1)
        if tail.size:
            seen = tail if tail_lanes is None else tail[: tail.size // tail_lanes * tail_lanes]
            raw = (
                np.fmax.reduce(np.abs(seen), initial=_F32(0))
                if nan_skip
                else np.abs(seen).max()
                if seen.size
                else _F32(0)
            )
            am = np.maximum(_F32(raw), clamp).astype(_F32)
            if profile == "bitsandbytes-cpu" and np.isnan(am):
                am = _NAN_ALL_ONES
            st = tail * (_F32(1) / am).astype(_F32) if tail_rcp else tail / am
            absmax = np.append(absmax, _F32(raw) if store_tail_raw else am)
            scaled = np.concatenate([scaled, np.clip(st.astype(_F32), _F32(-1), _F32(1))])
    return absmax.astype(_F32), scaled.astype(_F32)


def _flush(v: np.ndarray) -> np.ndarray:
    """Flush-to-zero: subnormal float32 results become ±0 (an -ffast-math build sets FTZ/DAZ on x86)."""
    return np.where(np.abs(v) < np.finfo(np.float32).tiny, np.copysign(_F32(0), v), v).astype(_F32)


def _nibbles_right(s: np.ndarray, qt: str) -> np.ndarray:
    """Ties to the upper code: side='right' (bisect_right / ``x >= t``)."""
    return cb.nibble_of_position(qt)[np.searchsorted(cb.midpoints(qt), s, side="right")]


def _nibbles_argmin(s: np.ndarray, qt: str) -> np.ndarray:
    """Nearest code by argmin |s − c| over the sorted codebook (first index on ties): bitsandbytes ≤ 0.49."""
    sc = cb.sorted_codebook(qt).astype(_F32)
    with np.errstate(invalid="ignore"):
        pos = np.argmin(np.abs(s[:, None] - sc[None, :]).astype(_F32), axis=1)
    pos = np.where(np.isnan(s), 15, pos)
    return cb.nibble_of_position(qt)[pos]


def _nibbles_sign_magnitude(s: np.ndarray, qt: str) -> np.ndarray:
    """FP4 decided on |s| with the sign bit from s < 0 (CUDA's rule) instead of the signed midpoints."""
    if qt != "fp4":
        return bw.nibbles_of_scaled(s, qt)
    mag = cb.nibble_of_position("fp4")[np.searchsorted(cb.midpoints("fp4"), np.abs(s), side="left")] & 7
    return (mag | np.where(s < 0, 8, 0)).astype(np.uint8)


def _nested(
    absmax: np.ndarray,
    profile: str,
    threads: int,
    *,
    offset_rule: str = "profile",
    codes_rule: str = "profile",
    group0: bool = False,
) -> tuple[np.float32, np.ndarray, np.ndarray]:
    if offset_rule == "float32 mean":
        with np.errstate(all="ignore"):
            offset = _F32(np.mean(absmax, dtype=_F32))
    else:
        offset = bw.profile_steps(profile if offset_rule == "profile" else "reference").absmax_offset(absmax, threads)
    with np.errstate(all="ignore"):
        centred = (absmax - offset).astype(_F32)
    code_profile = profile if codes_rule == "profile" else "reference"
    codes, a2 = bw.quantize_blockwise_8bit(centred, 256, profile=code_profile, nonfinite="propagate")
    if group0 and a2.size > 1:  # every group scaled by the first group's a2
        with np.errstate(all="ignore"):
            v = np.clip(centred * (_F32(1) / a2[0]), _F32(-1), _F32(1)).astype(_F32)
            dyn = cb.codebook("dynamic8")
            if code_profile == "bitsandbytes-cpu":
                t = ((v + _F32(1)) * _F32(0.5) * _F32(65535) + _F32(0.5)).astype(_F32)
                codes = dynamic8_lut()[np.clip(np.nan_to_num(t).astype(np.int64), 0, 65535)]
            else:
                codes = np.searchsorted(cb.float32_midpoints(dyn), v, side="left").clip(0, 255).astype(np.uint8)
    return offset, codes.astype(np.uint8), a2


def _q4(
    x: Any,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = False,
    *,
    profile: str = "reference",
    nonfinite: str | None = None,
    threads: int = 1,
    scales: dict | None = None,
    nib_fn: Any = None,
    pad_zero: bool = False,
    swap: bool = False,
    nest: dict | None = None,
    drop_tail16: bool = False,
    memory_order: bool = False,
    half_ftz: bool = False,
) -> tuple[np.ndarray, Any]:
    _, ref_state = quant.quantize_4bit(
        x, blocksize, quant_type, double_quant, profile=profile, nonfinite=nonfinite, threads=threads
    )  # validation
    flat = (np.asarray(x).ravel(order="K") if memory_order else np.asarray(x).reshape(-1)).astype(_F32)
    if half_ftz and np.asarray(x).dtype == np.float16:  # a bit-level f16→f32 decoder without subnormals
        flat = np.where(np.abs(flat) < _F32(2.0**-14), np.copysign(_F32(0), flat), flat).astype(_F32)
    absmax, s = _scales(flat, blocksize, profile, **(scales or {}))
    if drop_tail16 and flat.size % blocksize:  # the tail's lanes after the last full 16 are never written
        m = flat.size % blocksize
        s[flat.size - m + m // 16 * 16 :] = 0
    if flat.size % 2 and not pad_zero:
        s = np.append(s, _F32(0))
    nib = nib_fn(s, quant_type) if nib_fn else bw.nibbles_of_scaled(s, quant_type, profile)
    packed = bw.pack_nibbles(nib, pad=0)
    if swap:
        packed = ((packed & 0x0F) << 4) | (packed >> 4)
    if not double_quant:
        return packed, replace(ref_state, absmax=absmax)
    offset, codes, a2 = _nested(absmax, profile, threads, **(nest or {}))
    return packed, replace(ref_state, absmax=codes, offset=offset, nested_absmax=a2)


def _quantize_mutant(**knobs: Any):
    def fn(x, blocksize=64, quant_type="nf4", double_quant=False, **kw):
        return _q4(x, blocksize, quant_type, double_quant, **kw, **knobs)

    return fn


# ---------------------------------------------------------------------------- dequantize_4bit with one knob


def _dq4(
    packed: Any,
    state: Any,
    *,
    profile: str | None = None,
    row_index: bool = False,
    zero_neg: bool = False,
    bf16_trunc: bool = False,
    swap: bool = False,
    group0: bool = False,
    no_offset: bool = False,
    drop_tail16: bool = False,
    ignore_profile: bool = False,
) -> np.ndarray:
    quant.dequantize_4bit(packed, state, profile=profile)  # validation
    prof = state.profile if (profile is None or ignore_profile) else profile
    n, bs = state.n, state.blocksize
    p = np.asarray(packed).reshape(-1)
    nib = np.empty(2 * p.size, np.uint8)
    nib[0::2], nib[1::2] = (p & 0x0F, p >> 4) if swap else (p >> 4, p & 0x0F)
    nib = nib[:n]
    code = np.asarray(state.code, _F32).copy()
    if state.quant_type == "fp4" and (zero_neg or bw.fp4_zero_is_negative(prof, state.shape)):
        code[8] = _F32(-0.0)
    if state.nested and (group0 or no_offset):
        a2 = np.asarray(state.nested_absmax, _F32)
        a2 = np.full(a2.shape, a2[0], _F32) if group0 else a2
        scales = nst.dequantize_nested_absmax(
            state.absmax, a2, state.nested_code, _F32(0) if no_offset else state.offset, state.nested_blocksize
        )
    else:
        scales = state.block_absmax()
    i = np.arange(n)
    idx = i // bs
    if row_index and len(state.shape) >= 2:  # bitsandbytes' AVX-512 kernel: row·(cols/bs) + col/bs
        cols = state.shape[-1]
        idx = np.minimum((i // cols) * (cols // bs) + (i % cols) // bs, scales.size - 1)
    with np.errstate(all="ignore"):
        values = (code[nib] * scales[idx]).astype(_F32)
    if drop_tail16 and n % bs:
        m = n % bs
        values[n - m + m // 16 * 16 :] = 0
    if bf16_trunc and state.dtype == "bfloat16":
        out = (values.view(np.uint32) >> 16).astype(np.uint16).view(ml_dtypes.bfloat16)
    else:
        with np.errstate(all="ignore"):
            out = bw.profile_steps(prof).cast_output(values, state.dtype, state.shape)
    return out.reshape(state.shape)


def _dequantize_mutant(**knobs: Any):
    def fn(packed, state, **kw):
        return _dq4(packed, state, **kw, **knobs)

    return fn


# ---------------------------------------------------------------------------- qlora.forward with one knob


def _rows(x: Any) -> int:
    shape = np.shape(x)
    return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


def _qlora_mutant(defect: str):
    def fn(x, packed, state, A, B, scaling, bias=None, *, dropout_mask=None, dropout_p=0.0, profile=None):
        ref = qlora.forward(
            x, packed, state, A, B, scaling, bias, dropout_mask=dropout_mask, dropout_p=dropout_p, profile=profile
        )  # validation
        W = qlora.dequantized_weight(packed, state, profile=profile)
        m = _rows(x)
        if defect == "above16 ignores bias" and m > 16:
            bias = None
        elif defect == "above16 un-nested absmax" and m > 16 and state.nested:
            W = _dq4(packed, state, profile=profile, no_offset=True).astype(np.float64)
        elif defect == "state dtype rounding skipped":
            W = _dq4(packed, replace(state, dtype="float32"), profile=profile).astype(np.float64)
        elif defect == "K remainder after 16 dropped":
            k = W.shape[1] // 16 * 16
            W = W.copy()
            W[:, k:] = 0
        elif defect == "row-based absmax index":
            W = _dq4(packed, state, profile=profile, row_index=True).astype(np.float64)
        elif defect == "one-row path ignores scaling" and m == 1:
            scaling = 1.0
        elif defect == "x read in memory order":
            xx = np.asarray(x)
            x = xx.ravel(order="K").reshape(xx.shape)
            if dropout_mask is not None:
                dropout_mask = np.asarray(dropout_mask).ravel(order="K").reshape(xx.shape)
        elif defect == "dropout mask ignored":
            dropout_mask, dropout_p = None, 0.0
        else:
            return ref
        return lora.forward(x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask, dropout_p=dropout_p)

    return fn


# ---------------------------------------------------------------------------- the other ops


def _pack_pad_ignored(nibbles, pad=0):
    quant.pack_nibbles(nibbles, pad)
    return quant.pack_nibbles(nibbles, 0)


def _unpack_low_first(packed, n):
    quant.unpack_nibbles(packed, n)
    p = np.asarray(packed).reshape(-1)
    out = np.empty(2 * p.size, np.uint8)
    out[0::2], out[1::2] = p & 0x0F, p >> 4
    return out[:n]


def _q8(x, blocksize=256, *, profile="reference", nonfinite=None, defect=""):
    codes, absmax = quant.quantize_blockwise_8bit(x, blocksize, profile=profile, nonfinite=nonfinite)
    if profile != "reference" and defect != "profile ignored":
        return codes, absmax
    flat = np.asarray(x, _F32).reshape(-1)
    n, bs = flat.size, blocksize
    nb = -(-n // bs)
    padded = np.zeros(nb * bs, _F32)
    padded[:n] = flat
    a = np.repeat(absmax, bs)[:n]
    with np.errstate(all="ignore"):
        v = flat / a if defect == "division" else flat * (_F32(1) / a).astype(_F32)
        v = np.clip(v.astype(_F32), _F32(-1), _F32(1))
    side = "right" if defect == "tie upper" else "left"
    q = np.searchsorted(cb.float32_midpoints(cb.codebook("dynamic8")), v, side=side).clip(0, 255).astype(np.uint8)
    q = np.where(a == 0, np.uint8(0), q).astype(np.uint8)
    return q.reshape(np.shape(x)), absmax


def _q8_mutant(defect: str):
    def fn(x, blocksize=256, **kw):
        return _q8(x, blocksize, defect=defect, **kw)

    return fn


def _dq8_tail_previous_scale(codes, absmax, blocksize=256):
    out = quant.dequantize_blockwise_8bit(codes, absmax, blocksize)
    q = np.asarray(codes).reshape(-1)
    a = np.asarray(absmax).reshape(-1)
    if q.size % blocksize and a.size > 1:  # the tail read with the previous block's scale
        m = q.size % blocksize
        flat = out.reshape(-1).copy()
        flat[-m:] = (cb.codebook("dynamic8")[q[-m:]] * a[-2]).astype(_F32)
        return flat.reshape(out.shape)
    return out


def _codebook_fp4_negative_zero(name="nf4"):
    code = quant.codebook(name)
    if name == "fp4":
        code[8] = _F32(-0.0)
    return code


def _storage_nested_term_forgotten(blocksize=64, double_quant=False, nested_blocksize=256):
    bits = quant.storage_bits_per_parameter(blocksize, double_quant, nested_blocksize)
    return 4 + 8 / blocksize if double_quant else bits


def _check_ulps_ignored(packed, state, x, *, profile="reference", ulps=3, threads=1):
    quant.check_4bit(packed, state, x, profile=profile, ulps=ulps, threads=threads)
    return quant.check_4bit(packed, state, x, profile=profile, threads=threads)


def _check_zero_sign_wrong(packed, state, x, **kw):
    r = quant.check_4bit(packed, state, x, **kw)
    if not r.n_zero_sign:
        return r
    return replace(r, n_wrong=r.n_wrong + r.n_zero_sign, n_zero_sign=0)


def _dq_weight_profile_ignored(packed, state, *, profile=None):
    qlora.dequantized_weight(packed, state, profile=profile)
    return qlora.dequantized_weight(packed, state)


def _feb_mutant(defect: str):
    def fn(x, packed, state, A, B, scaling, bias=None, *, dtype="float32", accumulate=None, profile=None):
        ref = qlora.forward_error_bound(
            x, packed, state, A, B, scaling, bias, dtype=dtype, accumulate=accumulate, profile=profile
        )
        if defect == "accumulate ignored":
            return qlora.forward_error_bound(x, packed, state, A, B, scaling, bias, dtype=dtype, profile=profile)
        if defect == "bias term dropped":
            return qlora.forward_error_bound(
                x, packed, state, A, B, scaling, None, dtype=dtype, accumulate=accumulate, profile=profile
            )
        return ref

    return fn


Q4, DQ4, QL = "quant.quantize_4bit", "quant.dequantize_4bit", "qlora.forward"

MUTANTS: list[Mutant] = [
    # quantize_4bit: thresholds
    Mutant("q4 tie to the upper code", Q4, "thresholds", _quantize_mutant(nib_fn=_nibbles_right)),
    Mutant(
        "q4 argmin nearest code instead of midpoint count", Q4, "thresholds", _quantize_mutant(nib_fn=_nibbles_argmin)
    ),
    Mutant("q4 true division in full blocks", Q4, "thresholds", _quantize_mutant(scales={"full_div": True})),
    Mutant("q4 reciprocal-multiply in the tail block", Q4, "tails", _quantize_mutant(scales={"tail_rcp": True})),
    Mutant(
        "q4 fp4 sign bit from s < 0 (CUDA zero rule)",
        Q4,
        "special values",
        _quantize_mutant(nib_fn=_nibbles_sign_magnitude),
    ),
    # quantize_4bit: layout, tails, lanes, path switches
    Mutant("q4 nibble order swapped (planted)", Q4, "transposition", _quantize_mutant(swap=True)),
    Mutant("q4 tail lanes after the last 16 dropped", Q4, "tails", _quantize_mutant(drop_tail16=True)),
    Mutant(
        "q4 tail absmax misses the remainder after 8 lanes", Q4, "tails", _quantize_mutant(scales={"tail_lanes": 8})
    ),
    Mutant("q4 odd n padded with nibble 0, not the code of 0.0", Q4, "tails", _quantize_mutant(pad_zero=True)),
    Mutant(
        "q4 blocksize >= 2048: absmax of the first 1024 elements only",
        Q4,
        "path switch",
        _quantize_mutant(scales={"absmax_tile": 1024}),
    ),
    Mutant(
        "q4 input read in memory order (a transposed view)", Q4, "transposition", _quantize_mutant(memory_order=True)
    ),
    # quantize_4bit: special values
    Mutant(
        "q4 no 1e-38 clamp of the scale denominator",
        Q4,
        "special values",
        _quantize_mutant(scales={"clamp_full": False}),
    ),
    Mutant(
        "q4 clamp at FLT_MIN instead of 1e-38",
        Q4,
        "special values",
        _quantize_mutant(scales={"clamp": _F32(np.finfo(np.float32).tiny)}),
    ),
    Mutant(
        "q4 flush-to-zero of a subnormal reciprocal (-ffast-math)",
        Q4,
        "special values",
        _quantize_mutant(scales={"ftz": True}),
    ),
    Mutant("q4 float16 subnormal inputs decoded as zero", Q4, "special values", _quantize_mutant(half_ftz=True)),
    Mutant("q4 tail absmax stored unclamped", Q4, "special values", _quantize_mutant(scales={"store_tail_raw": True})),
    Mutant("q4 NaN-ignoring absmax (fmax)", Q4, "special values", _quantize_mutant(scales={"nan_skip": True})),
    # quantize_4bit: nested statistics
    Mutant(
        "q4 second double-quant group scaled by group 0's a2",
        Q4,
        "path switch",
        _quantize_mutant(nest={"group0": True}),
    ),
    Mutant(
        "q4 nested offset by a float32 numpy mean",
        Q4,
        "precision",
        _quantize_mutant(nest={"offset_rule": "float32 mean"}),
    ),
    Mutant(
        "q4 bitsandbytes-cpu profile ignored for the nested state",
        Q4,
        "options",
        _quantize_mutant(nest={"offset_rule": "reference", "codes_rule": "reference"}),
    ),
    # dequantize_4bit
    Mutant(
        "dq4 absmax index row·(cols/bs) + col/bs (AVX-512 kernel)", DQ4, "tails", _dequantize_mutant(row_index=True)
    ),
    Mutant("dq4 fp4 nibble 8 always -0.0", DQ4, "special values", _dequantize_mutant(zero_neg=True)),
    Mutant("dq4 bf16 output by truncation instead of RNE", DQ4, "precision", _dequantize_mutant(bf16_trunc=True)),
    Mutant("dq4 low nibble first", DQ4, "transposition", _dequantize_mutant(swap=True)),
    Mutant("dq4 second nested group uses group 0's a2", DQ4, "path switch", _dequantize_mutant(group0=True)),
    Mutant("dq4 nested offset not added", DQ4, "scaling", _dequantize_mutant(no_offset=True)),
    Mutant("dq4 tail lanes after the last 16 dropped", DQ4, "tails", _dequantize_mutant(drop_tail16=True)),
    Mutant("dq4 profile argument ignored", DQ4, "options", _dequantize_mutant(ignore_profile=True)),
    Mutant(
        "qlora.dequantize_4bit bf16 truncation",
        "qlora.dequantize_4bit",
        "precision",
        _dequantize_mutant(bf16_trunc=True),
    ),
    # qlora.forward
    Mutant("qlora above 16 rows ignores the bias", QL, "path switch", _qlora_mutant("above16 ignores bias")),
    Mutant("qlora above 16 rows drops the nested offset", QL, "path switch", _qlora_mutant("above16 un-nested absmax")),
    Mutant(
        "qlora weights not rounded to the state's dtype", QL, "precision", _qlora_mutant("state dtype rounding skipped")
    ),
    Mutant("qlora K remainder after 16 lanes dropped", QL, "tails", _qlora_mutant("K remainder after 16 dropped")),
    Mutant("qlora row-based absmax index", QL, "tails", _qlora_mutant("row-based absmax index")),
    Mutant("qlora one-row path ignores scaling", QL, "path switch", _qlora_mutant("one-row path ignores scaling")),
    Mutant("qlora dropout mask ignored", QL, "options", _qlora_mutant("dropout mask ignored")),
    Mutant(
        "qlora x read in memory order (a transposed view)", QL, "transposition", _qlora_mutant("x read in memory order")
    ),
    Mutant(
        "qlora.dequantized_weight profile ignored", "qlora.dequantized_weight", "options", _dq_weight_profile_ignored
    ),
    Mutant(
        "qlora.forward_error_bound accumulate ignored",
        "qlora.forward_error_bound",
        "options",
        _feb_mutant("accumulate ignored"),
    ),
    Mutant(
        "qlora.forward_error_bound bias term dropped",
        "qlora.forward_error_bound",
        "scaling",
        _feb_mutant("bias term dropped"),
    ),
    # packing, 8-bit, codebook, storage, checker
    Mutant("pack pad ignored", "quant.pack_nibbles", "options", _pack_pad_ignored),
    Mutant("unpack low nibble first", "quant.unpack_nibbles", "transposition", _unpack_low_first),
    Mutant("q8 tie to the upper code", "quant.quantize_blockwise_8bit", "thresholds", _q8_mutant("tie upper")),
    Mutant("q8 true division", "quant.quantize_blockwise_8bit", "thresholds", _q8_mutant("division")),
    Mutant(
        "q8 bitsandbytes-cpu LUT replaced by nearest",
        "quant.quantize_blockwise_8bit",
        "options",
        _q8_mutant("profile ignored"),
    ),
    Mutant(
        "dq8 tail block read with the previous scale",
        "quant.dequantize_blockwise_8bit",
        "tails",
        _dq8_tail_previous_scale,
    ),
    Mutant("codebook fp4 nibble 8 is -0.0", "quant.codebook", "special values", _codebook_fp4_negative_zero),
    Mutant(
        "storage bits: second-level absmax forgotten",
        "quant.storage_bits_per_parameter",
        "scaling",
        _storage_nested_term_forgotten,
    ),
    Mutant("check_4bit ulps ignored", "quant.check_4bit", "options", _check_ulps_ignored),
    Mutant("check_4bit fp4 zero sign counted wrong", "quant.check_4bit", "special values", _check_zero_sign_wrong),
]


# ---------------------------------------------------------------------------- qlora.backward with one knob


_QLORA_BACKWARD_DEFECTS = (
    "gradient through the frozen weight dropped",
    "dx through the merged weight",
    "dropout mask not applied to dx's LoRA part",
    "activation saved undropped",
    "scaling applied twice in dB",
    "scaling missing from dx's LoRA part",
    "transposed dequantized weight",
    "nested absmax not applied",
    "second tile of 256 rows skipped",
    "x read in memory order",
    "below 4 rows dx's LoRA part unmasked",
)


def _qlora_backward_mutant(defect: str):
    """qlora.backward (spec/nf4.md §13.1) recomputed from its formulas (in the reference's order) with one
    defect switched on."""
    assert defect in _QLORA_BACKWARD_DEFECTS, defect

    def fn(
        x, packed, state, A, B, grad_y, scaling, *, dropout_mask=None, dropout_p=0.0, need_dbias=False, profile=None
    ):
        ref = qlora.backward(
            x,
            packed,
            state,
            A,
            B,
            grad_y,
            scaling,
            dropout_mask=dropout_mask,
            dropout_p=dropout_p,
            need_dbias=need_dbias,
            profile=profile,
        )  # validation
        W = qlora.dequantized_weight(packed, state, profile=profile)
        out_f, in_f = W.shape
        if defect == "nested absmax not applied" and state.nested:  # dynamic8[code] + offset, without absmax2
            flat_state = replace(state, nested_absmax=np.ones_like(np.asarray(state.nested_absmax, _F32)))
            W = qlora.dequantized_weight(packed, flat_state, profile=profile)
        elif defect == "transposed dequantized weight":  # the (out, in) values read as an (in, out) array
            W = W.reshape(-1).reshape(in_f, out_f).T
        elif defect == "second tile of 256 rows skipped" and out_f > 256:
            W = W.copy()
            W[256:] = 0
        xa = np.asarray(x)
        if defect == "x read in memory order":
            xa = xa.ravel(order="K").reshape(xa.shape)
        x2 = xa.astype(np.float64).reshape(-1, in_f)
        g2 = np.asarray(grad_y).astype(np.float64).reshape(-1, out_f)
        keep = (
            None if dropout_mask is None else np.asarray(dropout_mask, np.float64).reshape(x2.shape) / (1 - dropout_p)
        )
        A64, B64, s = np.asarray(A, np.float64), np.asarray(B, np.float64), float(scaling)
        xd = x2 if keep is None or defect == "activation saved undropped" else x2 * keep
        h = xd @ A64.T
        gb = s * (g2 @ B64)
        dB = s * (g2.T @ h) if defect != "scaling applied twice in dB" else s * s * (g2.T @ h)
        dA = gb.T @ xd
        lora_dx = gb @ A64 if defect != "scaling missing from dx's LoRA part" else (g2 @ B64) @ A64
        few_rows_unmasked = defect == "below 4 rows dx's LoRA part unmasked" and x2.shape[0] < 4
        if keep is not None and defect != "dropout mask not applied to dx's LoRA part" and not few_rows_unmasked:
            lora_dx = lora_dx * keep
        if defect == "gradient through the frozen weight dropped":
            dx = lora_dx
        elif defect == "dx through the merged weight":  # g (Ŵ + s B A) plus the LoRA branch again
            dx = g2 @ (W + s * (B64 @ A64)) + lora_dx
        else:
            dx = g2 @ W + lora_dx
        return qlora.QLoraGrads(dx=dx.reshape(xa.shape), dA=dA, dB=dB, dbias=ref.dbias)

    return fn


QLB = "qlora.backward"

QLORA_BACKWARD_MUTANTS: list[Mutant] = [
    Mutant(
        "qlora.backward dx misses g Ŵ (frozen weight detached)",
        QLB,
        "scaling",
        _qlora_backward_mutant("gradient through the frozen weight dropped"),
    ),
    Mutant(
        "qlora.backward dx through the merged weight Ŵ + s B A",
        QLB,
        "scaling",
        _qlora_backward_mutant("dx through the merged weight"),
    ),
    Mutant(
        "qlora.backward dropout mask not applied to dx's LoRA part",
        QLB,
        "options",
        _qlora_backward_mutant("dropout mask not applied to dx's LoRA part"),
    ),
    Mutant(
        "qlora.backward activation saved before dropout (dA, dB from x)",
        QLB,
        "options",
        _qlora_backward_mutant("activation saved undropped"),
    ),
    Mutant(
        "qlora.backward scaling applied twice in dB",
        QLB,
        "scaling",
        _qlora_backward_mutant("scaling applied twice in dB"),
    ),
    Mutant(
        "qlora.backward scaling missing from dx's LoRA part",
        QLB,
        "scaling",
        _qlora_backward_mutant("scaling missing from dx's LoRA part"),
    ),
    Mutant(
        "qlora.backward transposed dequantized weight",
        QLB,
        "transposition",
        _qlora_backward_mutant("transposed dequantized weight"),
    ),
    Mutant(
        "qlora.backward nested absmax not applied",
        QLB,
        "scaling",
        _qlora_backward_mutant("nested absmax not applied"),
    ),
    Mutant(
        "qlora.backward second tile of 256 weight rows skipped",
        QLB,
        "path switch",
        _qlora_backward_mutant("second tile of 256 rows skipped"),
    ),
    Mutant(
        "qlora.backward below 4 rows: dx's LoRA part not masked",
        QLB,
        "path switch",
        _qlora_backward_mutant("below 4 rows dx's LoRA part unmasked"),
    ),
    Mutant(
        "qlora.backward x read in memory order (a transposed view)",
        QLB,
        "transposition",
        _qlora_backward_mutant("x read in memory order"),
    ),
]
MUTANTS += QLORA_BACKWARD_MUTANTS
