"""Codebooks: the NF4 table against its definition, midpoint tables, FP4 rationals, the dynamic map."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from refimpl import quant
from refimpl.quant import codebooks


def test_derived_nf4_codebook_equals_table_bit_for_bit():
    derived = codebooks.derive_nf4()
    table = quant.codebook("nf4")
    assert derived.view(np.uint32).tolist() == table.view(np.uint32).tolist()
    # The construction's shape: 7 negative, an exact zero, 8 positive levels, ends at ±1.
    assert (table < 0).sum() == 7 and table[7] == 0 and (table > 0).sum() == 8
    assert table[0] == -1 and table[15] == 1


def test_nf4_offset_is_close_to_the_mean_of_1_over_30_and_1_over_32():
    assert abs(codebooks.NF4_OFFSET - (1 - (1 / 30 + 1 / 32) / 2)) < 1e-7


def test_other_offsets_give_other_codebooks():
    assert not np.array_equal(codebooks.derive_nf4(0.99), quant.codebook("nf4"))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_midpoint_tables_are_float32_midpoints_of_sorted_codes(quant_type):
    sorted_codes = codebooks.sorted_codebook(quant_type)
    assert np.all(np.diff(sorted_codes) >= 0)
    computed = codebooks.float32_midpoints(sorted_codes)
    assert computed.view(np.uint32).tolist() == codebooks.midpoints(quant_type).view(np.uint32).tolist()


def test_fp4_values_are_the_stated_rationals_rounded_to_float32():
    exact = [0, Fraction(1, 192), Fraction(2, 3), 1, Fraction(1, 3), Fraction(1, 2), Fraction(1, 6), Fraction(1, 4)]
    values = quant.codebook("fp4")
    for nib, v in enumerate(exact):
        assert values[nib] == np.float32(float(v))
        assert values[nib + 8] == -np.float32(float(v))
    # FP4_ORDER sorts the table (stable: nibble 0 before nibble 8 at zero).
    assert list(codebooks.FP4_ORDER) == np.argsort(values, kind="stable").tolist()


def test_fp4_cuda_thresholds_differ_from_float32_midpoints_by_the_documented_ulps():
    mids = codebooks.midpoints("fp4")[8:]  # the positive thresholds 1/384 … 5/6
    lits = np.array(codebooks.FP4_CUDA_THRESHOLDS, dtype=np.float32)
    ulps = lits.view(np.int32).astype(np.int64) - mids.view(np.int32).astype(np.int64)
    assert ulps.tolist() == [14, 0, -1, -1, 0, -6, -1]


def test_dynamic_map_properties():
    d = quant.codebook("dynamic8")
    assert d.size == 256 and np.all(np.diff(d) > 0)
    assert d[127] == 0 and d[255] == 1 and d[0] == np.float32(-0.99296874)
    assert np.array_equal(d[:127], -d[254:127:-1])  # symmetric except the +1.0 entry


def test_codebook_returns_a_copy():
    a = quant.codebook("nf4")
    a[0] = 5
    assert quant.codebook("nf4")[0] == -1


def test_codebook_rejects_unknown_names():
    with pytest.raises(ValueError, match="name"):
        quant.codebook("int4")
    with pytest.raises(ValueError, match="offset"):
        codebooks.derive_nf4(0.3)
