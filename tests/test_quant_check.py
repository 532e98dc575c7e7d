"""check_4bit: classification of differing nibbles (admissible, zero-sign, special, wrong)."""

from __future__ import annotations

import numpy as np
import pytest

from refimpl import quant
from refimpl.quant import blockwise, codebooks


def _data(n=4096, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * np.exp(rng.standard_normal(n))).astype(np.float32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_output_checks_clean(quant_type):
    x = _data()
    packed, state = quant.quantize_4bit(x, 64, quant_type, double_quant=True)
    report = quant.check_4bit(packed, state, x)
    print(f"\n{report}")
    assert report.passed and report.n_equal == x.size and report.first_wrong_index is None


def test_a_flipped_nibble_is_wrong_and_located():
    x = _data()
    packed, state = quant.quantize_4bit(x, 64)
    nib = quant.unpack_nibbles(packed, x.size).copy()
    nib[1234] = (nib[1234] + 5) % 16
    report = quant.check_4bit(quant.pack_nibbles(nib, pad=7), state, x)
    assert report.n_wrong == 1 and report.first_wrong_index == 1234 and not report.passed
    assert report.first_wrong[1] == quant.unpack_nibbles(packed, x.size)[1234]


def test_a_wrong_absmax_is_reported():
    x = _data(256)
    packed, state = quant.quantize_4bit(x, 64)
    absmax = state.absmax.copy()
    absmax[2] = np.nextafter(absmax[2], np.float32(np.inf))
    bad = quant.QuantState(
        shape=state.shape, dtype=state.dtype, blocksize=64, quant_type="nf4", absmax=absmax, code=state.code
    )
    report = quant.check_4bit(packed, bad, x)
    assert report.n_absmax_mismatch == 1 and report.first_absmax_mismatch == 2 and not report.passed


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_division_instead_of_reciprocal_gives_only_admissible_differences(quant_type):
    """An implementation that divides (s = x / a) differs from the reciprocal rule only within an ulp
    of thresholds: the checker must call every such difference admissible, none wrong."""
    rng = np.random.default_rng(1)
    bs, nblocks = 64, 2000
    a = rng.uniform(0.5, 4, nblocks).astype(np.float32)
    t = codebooks.midpoints(quant_type)
    t = t[t != 0]
    s = t[rng.integers(0, t.size, (nblocks, bs))].astype(np.float64)
    x = (s * a[:, None]).astype(np.float32)
    x = np.nextafter(x, np.where(rng.random(x.shape) < 0.5, np.inf, -np.inf).astype(np.float32))
    x[:, 0] = a
    x = x.ravel()
    _, state = quant.quantize_4bit(x, bs, quant_type)
    scaled = np.clip(x.reshape(nblocks, bs) / a[:, None], -1, 1).astype(np.float32).ravel()
    packed = quant.pack_nibbles(blockwise.nibbles_of_scaled(scaled, quant_type))
    report = quant.check_4bit(packed, state, x)
    print(f"\n[{quant_type}] division rule vs reciprocal rule: {report}")
    assert report.n_admissible > 0
    assert report.n_wrong == 0 and report.n_special == 0


def test_cuda_profile_differences_are_classified():
    """CUDA-rule codes checked against the reference: the FP4 ±0 swap is zero-sign, an all-zero
    block is special, and nothing is wrong."""
    x = _data(1024, seed=3)
    x[:64] = 0.0
    x[100] = 1e-3 * np.abs(x[64:128]).max()
    packed, state = quant.quantize_4bit(x, 64, "fp4", profile="bitsandbytes-cuda")
    report = quant.check_4bit(packed, state, x)
    print(f"\ncuda-rule fp4 vs reference: {report}")
    assert report.n_zero_sign >= 1 and report.n_special == 0 and report.n_wrong == 0
    packed, state = quant.quantize_4bit(x, 64, "nf4", profile="bitsandbytes-cuda")
    report = quant.check_4bit(packed, state, x)
    assert report.n_special == 64 and report.n_wrong == 0
    assert quant.check_4bit(packed, state, x, profile="bitsandbytes-cuda").passed


def test_check_rejects_mismatched_inputs():
    x = _data(128)
    packed, state = quant.quantize_4bit(x, 64)
    with pytest.raises(ValueError, match="x: expected the state's shape"):
        quant.check_4bit(packed, state, x[:64])
    with pytest.raises(ValueError, match="packed: expected 64 uint8 bytes"):
        quant.check_4bit(packed[:10], state, x)
    with pytest.raises(ValueError, match="dtype 'float32' does not match"):
        quant.check_4bit(packed, state, x.astype(np.float16))
    with pytest.raises(TypeError, match="state"):
        quant.check_4bit(packed, None, x)
    with pytest.raises(ValueError, match="ulps"):
        quant.check_4bit(packed, state, x, ulps=-1)
