"""check_4bit names the cause of each differing nibble (issue 15 item 4).

Each test plants one cause: a quantizer written here with exactly one rule changed from the reference
(spec/nf4.md §4), and checks that check_4bit names that cause for every nibble that differs, and that a
randomly changed nibble stays "wrong". The planted quantizers are written out independently of
check_4bit's own hypothesis code.
"""

from __future__ import annotations

from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest

from refimpl import quant
from refimpl.quant import codebooks, torchao_profile

BS = 64


def _data(nblocks: int = 200, seed: int = 0, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (
        (rng.standard_normal(nblocks * BS) * np.exp(rng.standard_normal(nblocks * BS) / 4))
        .astype(np.float32)
        .astype(dtype)
    )


def _absmax(x32: np.ndarray) -> np.ndarray:
    return np.abs(x32.reshape(-1, BS)).max(axis=1)


def _reference_scaled(x32: np.ndarray) -> np.ndarray:
    a = _absmax(x32)
    inv = (np.float32(1) / a).astype(np.float32)
    return np.clip(x32.reshape(-1, BS) * inv[:, None], -1, 1).astype(np.float32).reshape(-1)


def _nearest(s: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest level (float64 distances; exact ties do not occur in these data)."""
    return np.argmin(np.abs(s.astype(np.float64)[:, None] - code.astype(np.float64)[None, :]), axis=1)


def _check(nibbles: np.ndarray, state, x: np.ndarray):
    return quant.check_4bit(quant.pack_nibbles(nibbles.astype(np.uint8)), state, x)


def test_a_different_codebook_is_named_and_read_from_the_state():
    x = _data()
    _, state = quant.quantize_4bit(x, BS)
    code = codebooks.derive_nf4(0.95)  # NF4 from other normal quantiles: a different codebook
    nib = _nearest(_reference_scaled(x), code)
    report = _check(nib, replace(state, code=code), x)
    print(f"\nplanted codebook: {report}")
    assert report.n_equal < x.size
    assert report.causes == {"codebook": x.size - report.n_equal}
    # the same nibbles with the format's own codebook in the state: not explained by a codebook any more
    plain = _check(nib, state, x)
    assert "codebook" not in plain.causes and plain.causes.get("wrong", 0) + plain.n_admissible > 0


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_lower_precision_arithmetic_is_named(dtype_name):
    dt = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(np.float16)
    x = _data(dtype=dt)
    x32 = x.astype(np.float32)
    _, state = quant.quantize_4bit(x, BS)

    def low(v):
        return np.asarray(v, dtype=np.float32).astype(dt).astype(np.float32)

    s = low(x32.reshape(-1, BS) / _absmax(x32)[:, None]).reshape(-1)
    dist = np.abs(low(s[:, None] - low(codebooks.codebook("nf4"))[None, :]))
    nib = np.argmin(dist, axis=1)  # first index among the many exact ties the 16-bit distances make
    report = _check(nib, state, x)
    print(f"\nplanted {dtype_name} arithmetic: {report}")
    assert report.n_equal < x.size
    assert set(report.causes) <= {
        f"precision:{dtype_name}",
        "scaling",
        "ties",
        f"precision:{dtype_name}+scaling",
        f"precision:{dtype_name}+ties",
        f"precision:{dtype_name}+scaling+ties",
    }
    assert report.causes.get(f"precision:{dtype_name}", 0) > 0 and "wrong" not in report.causes
    assert not report.passed


def test_linear_int8_scale_quantization_is_named():
    x = _data(nblocks=256)
    packed, state = quant.quantize_4bit(x, BS, double_quant=True)
    sc = torchao_profile.quantize_scales(_absmax(x), np.dtype(np.float32), 256)
    planted = torchao_profile.as_quant_state(state.shape, "float32", BS, sc, 256)
    report = quant.check_4bit(packed, replace(planted, code=state.code), x)
    print(f"\nplanted int8 linear scales: {report}")
    assert report.n_equal == x.size and report.n_absmax_mismatch > 0
    assert report.scale_causes == {"scale_quantization:linear_int8": report.n_absmax_mismatch}
    assert not report.passed


def test_a_scale_off_by_an_ulp_is_a_wrong_scale():
    x = _data(nblocks=8)
    packed, state = quant.quantize_4bit(x, BS)
    am = state.absmax.copy()
    am[3] = np.nextafter(am[3], np.float32(np.inf))
    report = quant.check_4bit(packed, replace(state, absmax=am), x)
    assert report.scale_causes == {"wrong": 1}


def test_the_tie_rule_is_named():
    mids = codebooks.midpoints("nf4")
    x = np.tile(np.concatenate([[1.0], np.resize(mids, BS - 1)]), 4).astype(np.float32)  # s = x exactly
    _, state = quant.quantize_4bit(x, BS)
    nib = codebooks.nibble_of_position("nf4")[np.searchsorted(mids, _reference_scaled(x), side="right")]
    report = _check(nib, state, x)
    print(f"\nplanted ties-high rule: {report}")
    assert report.causes == {"ties": x.size - report.n_equal} and report.n_equal < x.size
    assert report.passed  # a tie is admissible


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_division_instead_of_reciprocal_is_named(quant_type):
    rng = np.random.default_rng(1)
    nblocks = 1000
    a = rng.uniform(0.5, 4, nblocks).astype(np.float32)
    t = codebooks.midpoints(quant_type)
    t = t[t != 0]
    x = (t[rng.integers(0, t.size, (nblocks, BS))] * a[:, None]).astype(np.float32)
    x = np.nextafter(x, np.where(rng.random(x.shape) < 0.5, np.inf, -np.inf).astype(np.float32))
    x[:, 0] = a
    x = x.ravel()
    _, state = quant.quantize_4bit(x, BS, quant_type)
    s = np.clip(x.reshape(nblocks, BS) / a[:, None], -1, 1).astype(np.float32).ravel()
    mids = codebooks.midpoints(quant_type)
    nib = codebooks.nibble_of_position(quant_type)[np.searchsorted(mids, s, side="left")]
    report = _check(nib, state, x)
    print(f"\n[{quant_type}] planted division: {report}")
    assert report.n_equal < x.size
    assert set(report.causes) == {"scaling"} and report.passed


def test_fp4_zero_sign_and_special_blocks_are_named():
    x = _data(nblocks=4)
    x[:BS] = 0.0  # block 0 all zero: a special block
    packed, state = quant.quantize_4bit(x, BS, "fp4")
    nib = quant.unpack_nibbles(packed, x.size).astype(np.int64)
    nib[:BS] = 8 - nib[:BS] if nib[0] in (0, 8) else 0  # the zero block changed
    zeros = np.flatnonzero(nib[BS:] == 0)[:3] + BS
    nib[zeros] = 8  # +0 → −0
    report = _check(nib, state, x)
    print(f"\nplanted zero sign and zero block: {report}")
    assert report.causes == {"special": BS, "zero_sign": zeros.size}


@pytest.mark.parametrize("seed", range(5))
def test_a_random_wrong_nibble_stays_wrong(seed):
    """A nibble moved anywhere (not to a neighbour) is explained by no rule: still wrong, and located."""
    rng = np.random.default_rng(seed)
    x = _data(nblocks=20, seed=seed)
    packed, state = quant.quantize_4bit(x, BS)
    nib = quant.unpack_nibbles(packed, x.size).astype(np.int64)
    i = int(rng.integers(0, x.size))
    nib[i] = (nib[i] + int(rng.integers(3, 14))) % 16
    report = _check(nib, state, x)
    assert report.causes == {"wrong": 1} and report.first_wrong_index == i and not report.passed


def test_torchao_differences_are_all_named():
    """torchao's own rules (profile output) checked against the reference: every differing nibble has a
    named cause, the all-zero block is special, the int8 scales are named, nothing is wrong."""
    x = _data(nblocks=256, dtype=np.dtype(ml_dtypes.bfloat16)).reshape(64, 256)
    x[5] = 0
    packed, state = torchao_profile.quantize(x, BS, zero_block="nan")
    report = quant.check_4bit(packed, state, x)
    print(f"\ntorchao rules vs reference: {report}")
    assert "wrong" not in report.causes and report.causes["special"] == 256
    assert report.scale_causes == {"scale_quantization:linear_int8": report.n_absmax_mismatch}
