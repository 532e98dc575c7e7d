"""Classify the 4-bit codes of an implementation under test against the reference (spec/nf4.md §11).

For each element whose nibble differs from the nibble the chosen profile gives:

* ``zero_sign``: FP4 nibbles 0 and 8 (+0 and −0): the same value, a sign-of-zero convention.
* ``special``: the element's block holds NaN/±inf, or its absmax is 0 or subnormal: the result
  is a convention of the special-value table, not arithmetic.
* ``admissible``: the two codes are neighbours in value order and the exact scaled value
  x/a lies within ``ulps`` float32 ulps of the exact midpoint t between them,

      |x/a − t| ≤ ulps · ulp_f32(t),

  i.e. a different but legitimate float32 evaluation of s = x·(1/a) (a reciprocal, a product,
  a float32 threshold: about one rounding each, hence the default 3) lands on the other side.
  With ``profile="bitsandbytes-cuda"``, t is the CUDA kernel's float32 literal threshold (FP4:
  0.00260417f … 0.8333333f on |s|; NF4: the 15 literals of dQuantizeNF4), which is what that
  profile decides against.
* ``wrong``: anything that none of the causes below explains: a bug.

Causes (``Check4bitReport.causes``, issue 15 item 4). Every differing nibble is also given the cause that
explains it. Each cause is a testable hypothesis: the reference step is re-run on that element with one
rule changed, and the cause is named where that reproduces the nibble under test:

* ``special`` / ``zero_sign``: as above (a special-value block; FP4's ±0), decided first;
* then single rules, in this order (the smallest change first):
* ``codebook``: the state's own ``code`` (16 levels; e.g. torchao's 4-decimal NF4) instead of the
  format's, with nearest-level rounding at its float32 midpoints;
* ``scaling``: the other scaling rule, x / a in a full block or x·f32(1/a) in a tail block
  (reciprocal vs division);
* ``ties``: exact ties at a threshold go to the higher code;
* ``precision:bfloat16`` / ``precision:float16``: s and the distances |s − c_j| computed in the input's
  own 16-bit dtype (every step rounded to it), the nearest level by argmin (ties to the lower index); not
  tried for a float32 input (computing it in 16 bits is a bug, not a design);
* ``admissible``: no single rule reproduces it but it lies within ``ulps`` of a threshold (above);
* a ``+``-joined name (e.g. ``codebook+precision:bfloat16``): only that combination reproduces it (pairs
  are tried before triples);
* ``wrong``: nothing explains it (``n_wrong``; ``passed`` still requires every difference admissible or ±0).

Block scales that differ are attributed in ``scale_causes``: ``scale_quantization:linear_int8`` where
torchao's int8 linear double quantization (``torchao_profile.quantize_scales``) of the raw block absmax
reproduces the state's scale codes, else ``wrong``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import numpy.typing as npt

from refimpl import _checks
from refimpl.quant import blockwise, codebooks, torchao_profile
from refimpl.quant.operands import float_input_array
from refimpl.quant.state import QuantState


@dataclass(frozen=True)
class Check4bitReport:
    """Counts of compared nibbles by class, and where the first wrong one is."""

    n_elements: int
    n_equal: int
    n_admissible: int
    n_zero_sign: int
    n_special: int
    n_wrong: int
    first_wrong_index: int | None  #: flat index of the first wrong nibble
    first_wrong: tuple[int, int] | None  #: (nibble under test, reference nibble) there
    n_absmax_mismatch: int  #: blocks whose float32 scale differs bitwise (NaN equals NaN)
    first_absmax_mismatch: int | None
    #: differing nibbles by cause (module docstring); the counts add up to n_elements − n_equal
    causes: dict[str, int] = field(default_factory=dict)
    #: differing block scales by cause
    scale_causes: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every differing nibble admissible or a ±0 difference, and identical block scales (a difference that
        a design rule explains, e.g. another codebook, is named in ``causes`` but does not pass)."""
        n_diff = self.n_elements - self.n_equal
        return self.n_admissible + self.n_zero_sign == n_diff and self.n_special == 0 and self.n_absmax_mismatch == 0

    def __str__(self) -> str:
        s = (
            f"{self.n_elements} nibbles: {self.n_equal} equal, {self.n_admissible} admissible, "
            f"{self.n_zero_sign} zero-sign, {self.n_special} special, {self.n_wrong} wrong"
        )
        if self.first_wrong_index is not None and self.first_wrong is not None:  # set together
            s += (
                f" (first at flat index {self.first_wrong_index}: got {self.first_wrong[0]}, "
                f"expected {self.first_wrong[1]})"
            )
        s += f"; {self.n_absmax_mismatch} block scales differ"
        if self.causes:
            s += "; causes: " + ", ".join(f"{c} {n}" for c, n in self.causes.items())
        if self.scale_causes:
            s += "; scale causes: " + ", ".join(f"{c} {n}" for c, n in self.scale_causes.items())
        return s


def _same_float32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def _ulp32(t: np.ndarray) -> np.ndarray:
    t32 = np.abs(t).astype(np.float32)
    return (np.nextafter(t32, np.float32(np.inf)) - t32).astype(np.float64)


def _fp4_cuda_boundaries() -> np.ndarray:
    """The 14 decision boundaries of CUDA's dQuantizeFP4 in value order (ranks 0..14, FP4's two zeros
    merged): boundary k separates rank k from rank k + 1; −L_6 … −L_0, L_0 … L_6 with L the float32
    literals applied to |s| (spec/nf4.md §9, §15)."""
    lit = np.array(codebooks.FP4_CUDA_THRESHOLDS, dtype=np.float32).astype(np.float64)
    return np.concatenate([-lit[::-1], lit])


_TINY = np.float32(1e-38)  # the reference's clamp of the scale denominator
_LOW_PRECISION = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def _raw_block_absmax(x32: np.ndarray, bs: int) -> np.ndarray:
    """max |x| per block of the flattened float32 input (the tail block included); NaN propagates."""
    n = x32.size
    padded = np.zeros(-(-n // bs) * bs, dtype=np.float32)
    padded[:n] = np.abs(x32)
    with np.errstate(invalid="ignore"):
        return padded.reshape(-1, bs).max(axis=1)


@dataclass(frozen=True)
class _Rules:
    """One set of quantization rules for the hypothesis test (None / False = the reference's rule)."""

    codebook: np.ndarray | None = None  #: the state's 16 levels instead of the format's
    precision: str | None = None  #: "bfloat16" / "float16": s and the distances in that dtype
    other_scaling: bool = False  #: x / a in full blocks, x·f32(1/a) in tail blocks
    ties_high: bool = False  #: exact ties go to the higher code

    def name(self) -> str:
        parts = (
            (["codebook"] if self.codebook is not None else [])
            + ([f"precision:{self.precision}"] if self.precision else [])
            + (["scaling"] if self.other_scaling else [])
            + (["ties"] if self.ties_high else [])
        )
        return "+".join(parts)


def _nibbles_under(rules: _Rules, xs: np.ndarray, a: np.ndarray, tail: np.ndarray, quant_type: str) -> np.ndarray:
    """The nibbles of the elements xs (float32) with raw block absmax a under ``rules`` (module docstring)."""
    code = codebooks.codebook(quant_type) if rules.codebook is None else rules.codebook
    den = np.maximum(a, _TINY)
    divide = tail != rules.other_scaling  # the reference divides in the tail block only
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if rules.precision is None:
            s = np.where(divide, xs / den, xs * (np.float32(1) / den)).astype(np.float32)
            s = np.clip(s, np.float32(-1), np.float32(1))
            order = np.argsort(code, kind="stable")
            mids = codebooks.float32_midpoints(code[order].astype(np.float32))
            pos = np.searchsorted(mids, s, side="right" if rules.ties_high else "left")
            return order[np.minimum(pos, 15)].astype(np.int64)
        dt = _LOW_PRECISION[rules.precision]

        def low(v: np.ndarray) -> np.ndarray:
            return np.asarray(v).astype(dt).astype(np.float32)

        a_d, x_d, c_d = low(a), low(xs), low(code)
        s = low(np.where(divide, x_d / a_d, x_d * low(np.float32(1) / a_d)))
        dist = np.abs(low(s[:, None] - c_d[None, :]))
        dist = np.where(np.isnan(dist), np.inf, dist)
        if rules.ties_high:
            return (15 - np.argmin(dist[:, ::-1], axis=1)).astype(np.int64)
        return np.argmin(dist, axis=1).astype(np.int64)


def _hypotheses(state_code: np.ndarray, quant_type: str, dtype: str) -> list[_Rules]:
    """Every rule set that differs from the reference, fewest changes first (a fixed order within a size).
    Lower precision is tried for a 16-bit input only, in its own dtype (an implementation computes in its
    input's dtype or wider; a float32 input computed in 16 bits is a bug, not a design)."""
    precisions = [dtype] if dtype in _LOW_PRECISION else []
    codes: list[np.ndarray | None] = [None]
    if not np.array_equal(state_code.view(np.uint32), codebooks.codebook(quant_type).view(np.uint32)):
        codes.append(state_code)
    out = [
        _Rules(c, p, sc, t)
        for c, p, sc, t in itertools.product(codes, (None, *precisions), (False, True), (False, True))
    ]
    out = [r for r in out if r.name()]
    # fewest changes first; within a size the smallest change first: the state's codebook (a fact the state
    # states), the scaling rule (one rounding), the tie rule (a reference s exactly on a threshold, which the
    # scaling rule also moves), then a lower precision (many roundings)
    return sorted(
        out,
        key=lambda r: (
            r.name().count("+"),
            r.codebook is None,
            not r.other_scaling,
            not r.ties_high,
            r.precision is None,
        ),
    )


def _nibble_causes(
    hyps: list[_Rules], g: np.ndarray, xs: np.ndarray, a: np.ndarray, tail: np.ndarray, quant_type: str
) -> np.ndarray:
    """For each differing element, the name of the first (smallest) rule set reproducing the nibble g, or ''.
    Single rules are tried before the admissible window, combinations after it (``check_4bit``)."""
    names = np.full(g.size, "", dtype=object)
    for rules in hyps:
        todo = names == ""
        if not todo.any():
            break
        hit = np.zeros(g.size, dtype=bool)
        hit[todo] = _nibbles_under(rules, xs[todo], a[todo], tail[todo], quant_type) == g[todo]
        names[hit] = rules.name()
    return names


def _scale_causes(state: QuantState, raw_absmax: np.ndarray, blocks: np.ndarray) -> dict[str, int]:
    """Differing block scales by cause: torchao's int8 linear double quantization, or wrong."""
    explained = np.zeros(blocks.size, dtype=bool)
    dtype = torchao_profile.DTYPES.get(state.dtype)
    if (
        state.nested
        and dtype is not None
        and state.n % state.blocksize == 0
        and state.n_blocks % state.nested_blocksize == 0
    ):
        sc = torchao_profile.quantize_scales(raw_absmax, dtype, state.nested_blocksize)
        with np.errstate(invalid="ignore"):
            explained = sc.codes.view(np.uint8)[blocks] == state.absmax[blocks]
    out = {"scale_quantization:linear_int8": int(explained.sum()), "wrong": int((~explained).sum())}
    return {k: v for k, v in out.items() if v}


def check_4bit(
    packed: npt.ArrayLike,
    state: QuantState,
    x: npt.ArrayLike,
    *,
    profile: str = "reference",
    ulps: float = 3,
    threads: int = 1,
) -> Check4bitReport:
    """Compare packed codes + state produced by an implementation for input ``x`` with what
    ``profile`` gives (quantize_4bit with nonfinite="propagate"), and classify each difference
    and name its cause (module docstring).

    packed: uint8 codes as bitsandbytes stores them; state: a QuantState (e.g. from
    ``QuantState.from_bnb_dict``); x: the quantized input (float32/float16/bfloat16).
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state: expected a refimpl.quant.QuantState, got {_checks.describe(state)}")
    ulps = _checks.real(ulps, "ulps", low=0)
    arr = float_input_array(x, "x")
    if tuple(arr.shape) != state.shape:
        raise ValueError(f"x: expected the state's shape {state.shape}, got shape {arr.shape}")
    p = np.asarray(packed)
    if p.dtype != np.uint8 or p.size != (state.n + 1) // 2:
        raise ValueError(
            f"packed: expected {(state.n + 1) // 2} uint8 bytes for the state's {state.n} "
            f"elements, got {_checks.describe(p)}"
        )
    ref_packed, ref_state = blockwise.quantize_4bit(
        arr, state.blocksize, state.quant_type, state.nested, profile=profile, nonfinite="propagate", threads=threads
    )
    if ref_state.dtype != state.dtype:
        raise ValueError(f"state: dtype {state.dtype!r} does not match x's dtype {ref_state.dtype!r}")

    got_scale, ref_scale = state.block_absmax(), ref_state.block_absmax()
    scale_diff = np.flatnonzero(~_same_float32(got_scale, ref_scale))

    n, bs = state.n, state.blocksize
    x32 = arr.reshape(-1).astype(np.float32)
    raw_absmax = _raw_block_absmax(x32, bs)
    got = blockwise.unpack_nibbles(p, n)
    exp = blockwise.unpack_nibbles(ref_packed, n)
    diff = np.flatnonzero(got != exp)
    n_zero = n_special = n_adm = 0
    wrong = np.zeros(0, dtype=np.int64)
    causes: dict[str, int] = {}
    if diff.size:
        g, e = got[diff].astype(np.int64), exp[diff].astype(np.int64)
        xs = x32[diff]
        a32 = raw_absmax[diff // bs]
        a = a32.astype(np.float64)
        block_bad = ~np.isfinite(raw_absmax) | (np.abs(raw_absmax) < np.finfo(np.float32).tiny)
        nonfinite_x = ~np.isfinite(x32)
        if nonfinite_x.any():
            block_bad |= np.add.reduceat(nonfinite_x, np.arange(0, n, bs)) > 0
        special = block_bad[diff // bs]
        zero_sign = (state.quant_type == "fp4") & (np.minimum(g, e) == 0) & (np.maximum(g, e) == 8) & ~special
        # Rank in value order, with FP4's two zeros merged into one rank.
        pos = codebooks.position_of_nibble(state.quant_type)
        rank = np.where(pos > 7, pos - 1, pos) if state.quant_type == "fp4" else pos
        values = codebooks.codebook(state.quant_type).astype(np.float64)
        rg, re = rank[g], rank[e]
        t = (values[g] + values[e]) / 2.0
        if profile == "bitsandbytes-cuda":  # the kernels' literals, not the midpoints
            bounds = (
                _fp4_cuda_boundaries()
                if state.quant_type == "fp4"
                else codebooks.nf4_cuda_thresholds().astype(np.float64)
            )
            t = bounds[np.minimum(rg, re)]
        with np.errstate(invalid="ignore", divide="ignore"):
            s = np.clip(xs.astype(np.float64) / a, -1.0, 1.0)
            admissible = (np.abs(rg - re) == 1) & (np.abs(s - t) <= ulps * _ulp32(t)) & ~special & ~zero_sign
        n_zero, n_special, n_adm = int(zero_sign.sum()), int(special.sum()), int(admissible.sum())

        # causes: special and zero sign first, then single rules, the admissible window, combinations
        names = np.full(diff.size, "", dtype=object)
        names[special] = "special"
        names[zero_sign] = "zero_sign"
        open_ = names == ""
        tail = (diff // bs) == (n // bs) if n % bs else np.zeros(diff.size, dtype=bool)
        hyps = _hypotheses(np.asarray(state.code, dtype=np.float32), state.quant_type, state.dtype)
        singles = [h for h in hyps if "+" not in h.name()]
        combos = [h for h in hyps if "+" in h.name()]
        names[open_] = _nibble_causes(singles, g[open_], xs[open_], a32[open_], tail[open_], state.quant_type)
        names[(names == "") & admissible] = "admissible"
        open_ = names == ""
        names[open_] = _nibble_causes(combos, g[open_], xs[open_], a32[open_], tail[open_], state.quant_type)
        names[names == ""] = "wrong"
        for name in names:
            causes[name] = causes.get(name, 0) + 1
        wrong = diff[names == "wrong"]
    first = int(wrong[0]) if wrong.size else None
    return Check4bitReport(
        n_elements=n,
        n_equal=n - int(diff.size),
        n_admissible=n_adm,
        n_zero_sign=n_zero,
        n_special=n_special,
        n_wrong=int(wrong.size),
        first_wrong_index=first,
        first_wrong=(int(got[first]), int(exp[first])) if first is not None else None,
        n_absmax_mismatch=int(scale_diff.size),
        first_absmax_mismatch=int(scale_diff[0]) if scale_diff.size else None,
        causes=dict(sorted(causes.items())),
        scale_causes=_scale_causes(state, raw_absmax, scale_diff) if scale_diff.size else {},
    )
