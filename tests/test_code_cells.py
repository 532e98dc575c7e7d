"""The GPU quantizer's code lookup (refimpl/kernels/cupy_gpu/code_cells.py) against the bitsandbytes-cuda rule.

Runs without a GPU: ``code_by_cells`` is the kernel's lookup in NumPy, over the table the kernel loads.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refimpl.kernels.cupy_gpu import code_cells as C
from refimpl.quant.profiles import bitsandbytes_cuda as P

QUANT_TYPES = ("nf4", "fp4")


def _rule(s: np.ndarray, quant_type: str) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return P.nibbles(s, quant_type)


def _cell_edges(quant_type: str) -> np.ndarray:
    """Per cell: its lowest and highest key, the last key coded lo and the first coded hi (as float32)."""
    table = C.cell_table(quant_type)
    base = np.arange(table.size, dtype=np.uint32) << np.uint32(32 - C.CELL_BITS)
    thr = table >> np.uint32(11)
    low_mask = np.uint32((1 << (32 - C.CELL_BITS)) - 1)
    keys = np.concatenate([base, base | low_mask, base | thr, base | np.minimum(thr + np.uint32(1), low_mask)])
    bits = C._bits_of_key(keys, quant_type)
    s = bits.view(np.float32)
    return s[~np.isinf(s)]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_lookup_equals_the_cuda_rule_at_every_cell_edge_and_step(quant_type):
    """Each cell's two ends and the two keys around its step: the lookup gives the rule's code (8192 values)."""
    s = _cell_edges(quant_type)
    got, want = C.code_by_cells(s, quant_type), _rule(s, quant_type)
    assert s.size >= 4 * (1 << C.CELL_BITS) - 64
    assert np.array_equal(got, want), s[got != want][:5]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_lookup_equals_the_cuda_rule_on_random_bit_patterns_and_scaled_values(quant_type):
    """Two million random float32 bit patterns (NaN, subnormals and huge values included, ±inf excluded) and
    two million values in [-1.3, 1.3], where the thresholds are."""
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    s = np.concatenate([bits.view(np.float32), rng.uniform(-1.3, 1.3, 2_000_000).astype(np.float32)])
    s = s[~np.isinf(s)]
    assert np.array_equal(C.code_by_cells(s, quant_type), _rule(s, quant_type))


@given(
    x=hnp.arrays(
        np.float32,
        st.integers(1, 64),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
    )
)
def test_scaled_values_are_never_infinite_so_the_table_covers_them(x):
    """The table gives NaN's code to ±inf; the kernel never forms ±inf: s = ftz(x) · rcp.approx.ftz(a) with
    a = fmaxf over ftz|x| (zero or subnormal a: every ftz(x) is 0 and s = 0 · inf = NaN; a = inf: s ∈ {0, NaN})."""
    absmax = P.block_absmax(x, x.size)
    with np.errstate(invalid="ignore", over="ignore"):
        s = P.scaled(x, absmax, x.size)
    assert not np.isinf(s).any()


def test_a_cell_with_two_thresholds_is_refused():
    """The table builder checks its premise: with too few key bits two NF4 thresholds share a cell."""
    saved = C.CELL_BITS, C._LOW, C._LOW_MASK
    C.cell_table.cache_clear()
    try:
        C.CELL_BITS, C._LOW = 10, 22
        C._LOW_MASK = np.uint32((1 << 22) - 1)
        with pytest.raises(AssertionError, match="more than one threshold"):
            C.cell_table("nf4")
    finally:
        C.CELL_BITS, C._LOW, C._LOW_MASK = saved
        C.cell_table.cache_clear()
