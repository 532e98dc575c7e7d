"""Op rows for refimpl.merging (spec/merging.md; task arithmetic arXiv 2212.04089, TIES arXiv 2306.01708,
DARE arXiv 2311.03099, SLERP Shoemake 1985, LoRA arXiv 2106.09685).

Bounds: every merge output element is a (masked, weighted) sum of at most T task entries, divided by
a count, a weight sum or Σ w, or scaled by 1/d or an L1 ratio, so |error| ≤ γ_K · |formula|(|inputs|)
with K from refimpl.bounds (``weighted_sum_depth``, ``disjoint_merge_depth``, ``dare_depth``, plus
``l1_rescale_depth`` for an L1 ratio). The magnitude follows the reference's own selection (trim,
election) so the bound is tight where entries are dropped; a divisor D = Σ w adds the relative error of
D, Σ|w|m / |D|. The selection steps (trim, election) are exact comparisons; drawn
data either make the election's sums exact (dyadic values, where the ties and zero scores live) or keep
them far from a tie.

A target may return a merge in its inputs' dtype (rounded once), as the peers and refimpl's numba kernel
do: for inputs narrower than float64 the bound adds one rounding to that dtype (``_Rounded``).

Equivalence classes and the deterministic boundary cases that hit them are listed per row (the
"Equivalence classes" section of spec/merging.md); the Hypothesis strategies draw every option value,
every input dtype, negative and zero weights, and tied magnitudes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import ml_dtypes
import numpy as np

from refimpl import bounds, precision
from refimpl.conformance.table import TIERS, Boundary, Case, OpSpec, Special
from refimpl.conformance.tolerance import Bounded, Exact
from refimpl.merging import profiles as merging_profiles
from refimpl.merging.profiles import DareRules, TiesRules, dare_rules, ties_rules

#: Public functions of refimpl.merging that have no row, and why.
NOT_OPS: dict[str, str] = {
    "merging.merge_files": "file I/O (safetensors shards in, shards out), not an array op; the merge it applies "
    "per tensor is the rows' ops; tested in tests/test_merging_files.py",
    "merging.read_index": "reads safetensors headers (name -> file, shape, dtype), not an array op; tested in "
    "tests/test_merging_files.py",
    "merging.unflatten_model": "bookkeeping inverse of flatten_model (slices a vector by a ModelLayout object, no "
    "arithmetic); its round trip is tested in tests/test_merging.py",
}

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), BF16)
DTYPE_CLASSES = tuple(f"dtype: {d.name}" for d in DTYPES)
TIE_VALUES = (0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0)
DENSITIES = (0.05, 0.1, 0.2, 0.25, 1 / 3, 0.5, 0.7, 0.9, 1.0)
NO_GOLDEN = tuple(t for t in TIERS if t != "golden")


def _ref(name: str):
    import refimpl.merging as merging

    return getattr(merging, name)


@dataclass(frozen=True)
class _Row(OpSpec):
    """A row whose canonical example is its first boundary case (rows added without golden vectors)."""

    def example(self) -> Case:
        if self.golden is not None:
            return super().example()
        assert self.boundary is not None, f"{self.name}: a row without golden vectors needs boundary cases"
        return dict(self.boundary()[0].case)


def _f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def _input_dtype(case: Mapping[str, Any]) -> np.dtype | None:
    for v in case.values():
        for a in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(a, np.ndarray) and (a.dtype.kind == "f" or a.dtype == BF16):
                return a.dtype
    return None


@dataclass(frozen=True)
class _Rounded(Bounded):
    """Bounded, plus one rounding of the result to the inputs' dtype when that is narrower than float64."""

    def bounds(self, case, dtype):
        out = super().bounds(case, dtype)
        dt = _input_dtype(case)
        if dt is None or dt == np.dtype(np.float64):
            return out
        u = precision.unit_roundoff(dt)
        mags = self.magnitude(case)
        return {k: v + u * np.abs(np.asarray(mags[k], dtype=np.float64)) for k, v in out.items()}


# ----------------------------------------------------------------------------- deterministic inputs


def _vals(seed: int, shape, *, dtype=np.float64, kind: str = "dyadic") -> np.ndarray:
    """Deterministic inputs: dyadic multiples of 2**-5 in [-2, 2] (exact sums), tie-rich small dyadics,
    or normal floats."""
    rng = np.random.default_rng(seed)
    if kind == "ties":
        x = rng.choice(np.array(TIE_VALUES[1:]), size=shape)
    elif kind == "normal":
        x = rng.standard_normal(shape)
    else:
        x = rng.integers(-64, 65, size=shape) * 2.0**-5
    return np.asarray(x, dtype=np.float64).astype(dtype)


def _taus(seed: int, t: int, shape, **kw) -> list[np.ndarray]:
    return [_vals(seed * 31 + i, shape, **kw) for i in range(t)]


def _shape_classes(shape) -> list[str]:
    n = int(np.prod(shape))
    out = [f"shape: {len(shape)}-D"]
    out.append("shape: size % 16 != 0 (vector tail)" if n % 16 else "shape: size a multiple of 16")
    if n % 8:
        out.append("shape: size % 8 != 0")
    if n >= 4096:
        out.append("shape: size ≥ 4096 (several chunks)")
    return out


SHAPE_CLASSES = (
    "shape: 1-D",
    "shape: 2-D",
    "shape: 3-D",
    "shape: size % 16 != 0 (vector tail)",
    "shape: size a multiple of 16",
    "shape: size % 8 != 0",
)
BIG = "shape: size ≥ 4096 (several chunks)"


def _dtype_class(case: Case) -> list[str]:
    dt = _input_dtype(case)
    return [f"dtype: {dt.name}"] if dt is not None else []


def _b(label: str, case: Case, *classes: str, shape=None) -> Boundary:
    """A boundary case; shape and dtype classes are added from the case itself."""
    cls = list(classes) + (_shape_classes(shape) if shape is not None else []) + _dtype_class(case)
    return Boundary(label, case, tuple(dict.fromkeys(cls)))


# ----------------------------------------------------------------------------- strategies


@lru_cache(maxsize=1024)
def _tie_arrays(shape):
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    return hnp.arrays(np.float64, shape, elements=st.sampled_from(TIE_VALUES))


def _draw_shape(draw, max_n: int = 20):
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    return draw(
        st.one_of(
            st.tuples(rs.dims(1, max_n)),
            st.tuples(rs.dims(1, 5), rs.dims(1, 5)),
            st.tuples(rs.dims(1, 3), rs.dims(1, 3), rs.dims(1, 3)),
        )
    )


def _draw_arrays(draw, shape, count: int, dtype) -> list[np.ndarray]:
    """``count`` arrays of one shape and dtype: tie-rich dyadics or general floats (chosen per case)."""
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    gen = _tie_arrays(shape) if draw(st.booleans()) else rs.float_arrays(shape)
    return [draw(gen).astype(dtype) for _ in range(count)]


def _draw_weights(draw, t: int, *, none_ok: bool = True):
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    if none_ok and draw(st.booleans()):
        return None
    return [draw(st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5]), rs.reals(-2.0, 2.0))) for _ in range(t)]


def _opt(draw, values):
    """None (the option left out) or one of ``values``."""
    from hypothesis import strategies as st

    return draw(st.sampled_from((None, *values)))


def _put(case: Case, **opts) -> Case:
    case.update({k: v for k, v in opts.items() if v is not None})
    return case


LAMS = (1.0, 0.5, -1.0, 0.0, 2.5)


def _task_strategy(key: str = "task_vectors", *, lam: bool = True, normalize: str = "task_arithmetic"):
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        t = draw(st.sampled_from([1, 2, 3, 4, 9]))
        shape = _draw_shape(draw)
        dtype = draw(st.sampled_from(DTYPES))
        c: Case = {key: _draw_arrays(draw, shape, t, dtype)}
        w = _draw_weights(draw, t)
        if w is not None:
            c["weights"] = w
        norm = _opt(draw, (True, False))
        wsum = float(np.sum(w)) if w is not None else float(t)
        default = key == "tensors"  # linear normalises by default, task arithmetic does not
        if (default if norm is None else norm) and abs(wsum) < 1e-3:  # Σ w ≈ 0 is a special value
            norm = False
        _put(c, normalize=norm)
        if lam:
            _put(c, lam=_opt(draw, LAMS))
        return c

    return build()


def _straddles(tau: np.ndarray, d: float) -> bool:
    """Whether equal magnitudes sit on both sides of the cut of a floor rule (k = ⌊d·n⌋ or max(1, ⌊d·n⌋)):
    which of them is kept is implementation-defined in the peers (torch.topk, argsort)."""
    if d >= 1.0:
        return False
    a = np.sort(np.abs(_f64(tau)).ravel())[::-1]
    n = a.size
    k = int(d * n)
    return any(0 < kk < n and a[kk - 1] == a[kk] for kk in {k, max(1, k)})


TIES_OPTIONS = {
    "k_rule": ("threshold", "floor", "floor_min1"),
    "elect": ("sum", "count"),
    "zero_sign": ("positive", "global_majority"),
    "weight_stage": ("before_election", "after_election"),
    "divisor": ("count", "weight_sum", "none"),
    "rescale": ("l1", "none"),
}


#: profiles drawn (magnitude_prune is PEFT's op; the MergeLM trim is drawn through ties and dare)
TIES_PROFILES = ("paper", "peft", "mergekit", "mergelm")
PRUNE_PROFILES = ("paper", "peft", "mergekit")


def _trim_strategy(op: str):
    """ties and magnitude_prune: 1–4 or 9 tasks, tie-rich or general values, every dtype, every option."""
    from hypothesis import strategies as st

    names = tuple(TIES_OPTIONS) if op == "ties" else ("k_rule", "rescale")

    @st.composite
    def build(draw) -> Case:
        t = draw(st.sampled_from([1, 2, 3, 4, 9]))
        shape = _draw_shape(draw)
        dtype = draw(st.sampled_from(DTYPES))
        c: Case = {"task_vectors": _draw_arrays(draw, shape, t, dtype)}
        w = _draw_weights(draw, t)
        if w is not None:
            c["weights"] = w
        c["density"] = draw(st.sampled_from(DENSITIES))
        _put(c, profile=_opt(draw, TIES_PROFILES if op == "ties" else PRUNE_PROFILES), lam=_opt(draw, LAMS))
        for name in names:
            _put(c, **{name: _opt(draw, TIES_OPTIONS[name])})
        return c

    # ties drawn everywhere except straddling a floor rule's cut (boundary cases pin that down)
    return build().filter(lambda c: not any(_straddles(t, c["density"]) for t in c["task_vectors"]))


def _dare_strategy():
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        t = draw(st.sampled_from([1, 2, 3, 4, 9]))
        shape = _draw_shape(draw)
        dtype = draw(st.sampled_from(DTYPES))
        c: Case = {"task_vectors": _draw_arrays(draw, shape, t, dtype)}
        w = _draw_weights(draw, t)
        if w is not None:
            c["weights"] = w
        d = draw(st.sampled_from(DENSITIES))
        c["density"] = d
        # masks are inputs; density 1 keeps everything (what a peer's Bernoulli(1) draws)
        c["masks"] = [(draw(rs.keep_masks(shape)) > 0) | (d >= 1.0) for _ in range(t)]
        merge = draw(st.sampled_from(["linear", "ties"]))
        c["merge"] = merge
        norm = _opt(draw, (True, False))
        wsum = float(np.sum(w)) if w is not None else float(t)
        if norm and abs(wsum) < 1e-3:
            norm = False
        _put(
            c,
            profile=_opt(draw, TIES_PROFILES),
            lam=_opt(draw, LAMS),
            rescale=_opt(draw, ("inverse", "l1", "none")),
            normalize=norm,
        )
        if merge == "ties":
            _put(c, ties_density=_opt(draw, (0.2, 0.5, 1.0)))
            for name in ("elect", "zero_sign", "weight_stage", "divisor"):
                _put(c, **{name: _opt(draw, TIES_OPTIONS[name])})
        return c

    def no_straddle(c: Case) -> bool:
        td = c.get("ties_density")
        return c["merge"] != "ties" or td is None or not any(_straddles(t, td) for t in c["task_vectors"])

    return build().filter(no_straddle)


# ----------------------------------------------------------------------------- magnitudes (bounds)


def _weights(case: Mapping[str, Any], key: str = "task_vectors") -> np.ndarray:
    w = case.get("weights")
    return np.ones(len(case[key])) if w is None else np.asarray(w, dtype=np.float64)


def _selection(hat, w, rules: TiesRules) -> list[np.ndarray]:
    """The reference's election (spec/merging.md §4.2): which entries of each τ̂_t are merged."""
    before = rules.weight_stage == "before_election"
    es = [wt * h if before else h for h, wt in zip(hat, w, strict=True)]
    score = np.zeros(hat[0].shape)
    for e in es:
        score += e if rules.elect == "sum" else np.sign(e)
    gamma = np.sign(score)
    gamma[gamma == 0] = 1.0 if rules.zero_sign == "positive" else np.sign(gamma.sum())
    live = gamma != 0 if rules.zero_sign == "global_majority_zero" else True
    return [np.where(gamma > 0, e > 0, e < 0) & live for e in es]


def _elected_magnitude(hat, w, rules: TiesRules) -> np.ndarray:
    sel = _selection(hat, w, rules)
    num = sum(abs(wt) * np.abs(h) * s for h, wt, s in zip(hat, w, sel, strict=True))
    if rules.divisor == "count":
        return num / np.maximum(sum(s.astype(float) for s in sel), 1.0)
    if rules.divisor == "weight_sum":
        den = sum(wt * s for wt, s in zip(w, sel, strict=True))
        den = np.where(den == 0, 1.0, np.abs(den))
        return num / den * (1.0 + sum(abs(wt) * s for wt, s in zip(w, sel, strict=True)) / den)
    return num


def _l1(rescale: str, tau: np.ndarray, m: np.ndarray) -> np.ndarray:
    from refimpl.merging.sparsify import _l1_rescaled

    return np.abs(_l1_rescaled(np.abs(tau), m)) if rescale == "l1" else np.abs(tau) * m


def _ties_rules(case: Mapping[str, Any]) -> TiesRules:
    return ties_rules(case.get("profile", "paper"), **{k: case.get(k) for k in TIES_OPTIONS})


def _ties_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from refimpl.merging.sparsify import densities, trim_mask

    taus = [_f64(t) for t in case["task_vectors"]]
    w = _weights(case)
    rules = _ties_rules(case)
    d = densities(case["density"], len(taus))
    hat = []
    for tau, dt in zip(taus, d, strict=True):
        m = trim_mask(tau, dt, k_rule=rules.k_rule)
        hat.append(np.sign(tau) * _l1(rules.rescale, tau, m))
    return {"out": abs(float(case.get("lam", 1.0))) * _elected_magnitude(hat, w, rules)}


def _l1_depth(case: Mapping[str, Any], rescale: str) -> int:
    return bounds.l1_rescale_depth(int(np.asarray(case["task_vectors"][0]).size)) if rescale == "l1" else 0


def _ties_depth(case: Mapping[str, Any]) -> int:
    return bounds.disjoint_merge_depth(len(case["task_vectors"])) + _l1_depth(case, _ties_rules(case).rescale)


def _prune_rules(case: Mapping[str, Any]) -> tuple[str, str]:
    """(k_rule, rescale) of a magnitude_prune case: the profile's trim rule unless one is given."""
    return (
        case.get("k_rule") or merging_profiles.profile(case.get("profile", "peft")).ties.k_rule,
        case.get("rescale") or "none",
    )


def _prune_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from refimpl.merging.sparsify import densities, trim_mask

    taus = [_f64(t) for t in case["task_vectors"]]
    k_rule, rescale = _prune_rules(case)
    d = densities(case["density"], len(taus))
    mag = sum(
        abs(wt) * _l1(rescale, tau, trim_mask(tau, dt, k_rule=k_rule))
        for tau, wt, dt in zip(taus, _weights(case), d, strict=True)
    )
    return {"out": abs(float(case.get("lam", 1.0))) * mag}


def _prune_depth(case: Mapping[str, Any]) -> int:
    return bounds.disjoint_merge_depth(len(case["task_vectors"])) + _l1_depth(case, _prune_rules(case)[1])


def _dare_rules(case: Mapping[str, Any]) -> DareRules:
    return dare_rules(
        case.get("profile", "paper"),
        case.get("merge", "linear"),
        **{
            k: case.get(k)
            for k in ("rescale", "normalize", "ties_density", "elect", "zero_sign", "weight_stage", "divisor")
        },
    )


def _dare_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from refimpl.merging.sparsify import densities, trim_mask

    taus = [_f64(t) for t in case["task_vectors"]]
    w = _weights(case)
    rules = _dare_rules(case)
    d = densities(case["density"], len(taus))
    hat = []
    for tau, m, dt in zip(taus, case["masks"], d, strict=True):
        m = np.asarray(m).astype(bool)
        if rules.rescale == "l1":
            h = _l1("l1", tau, m)
        else:
            h = np.abs(tau) * m / (dt if rules.rescale == "inverse" else 1.0)
        hat.append(np.sign(tau) * h)
    if rules.merge == "linear":
        mag = _normalized(sum(abs(wt) * np.abs(h) for h, wt in zip(hat, w, strict=True)), w, rules.normalize)
    else:
        hat = [h * trim_mask(h, rules.ties_density, k_rule=rules.ties.k_rule) for h in hat]
        mag = _elected_magnitude(hat, w, rules.ties)
    return {"out": abs(float(case.get("lam", 1.0))) * mag}


def _dare_depth(case: Mapping[str, Any]) -> int:
    return bounds.dare_depth(len(case["task_vectors"])) + _l1_depth(case, _dare_rules(case).rescale)


def _normalized(mag: np.ndarray, w: np.ndarray, normalize: bool) -> np.ndarray:
    """Σ|w_t||τ_t| ÷ |Σ w_t| when normalizing, times 1 + Σ|w_t| / |Σ w_t|: the divisor's own roundings are
    relative to Σ|w_t| (bounds.weighted_sum_depth)."""
    if not normalize:
        return mag
    den = abs(float(w.sum()))
    return mag / den * (1.0 + float(np.abs(w).sum()) / den)


def _ta_magnitude(
    case: Mapping[str, Any], key: str = "task_vectors", lam_default: float = 1.0, normalize_default: bool = False
) -> dict[str, np.ndarray]:
    w = _weights(case, key)
    mag = sum(abs(wt) * np.abs(_f64(t)) for t, wt in zip(case[key], w, strict=True))
    mag = _normalized(mag, w, case.get("normalize", normalize_default))
    return {"out": abs(float(case.get("lam", lam_default))) * mag}


def _depth(case: Mapping[str, Any]) -> int:
    return bounds.weighted_sum_depth(len(case.get("task_vectors") or case["tensors"]))  # task_arithmetic, linear


# ----------------------------------------------------------------------------- golden (the committed vectors)


def _golden(
    rng: np.random.Generator, *, density: bool = False, masks: bool = False, key: str = "task_vectors"
) -> list[tuple[str, Case]]:
    from refimpl.conformance.strategies import dyadic

    out = []
    for i, (t, shape) in enumerate([(2, (10,)), (3, (4, 6)), (3, (100,))]):
        c: Case = {key: [dyadic(rng, shape) for _ in range(t)]}
        if i > 0:
            c["weights"] = [float(w) for w in dyadic(rng, (t,), bits=2) + 2.25]  # positive, exact
        if density:
            c["density"] = (0.2, 0.5, 0.3)[i]
        if masks:
            c["masks"] = [rng.random(shape) < c.get("density", 0.5) for _ in range(t)]
        out.append((f"case{i}_T{t}_{'x'.join(map(str, shape))}", c))
    return out


def _specials(example, key: str = "task_vectors") -> list[Special]:
    base = example()
    out = []
    for label, val in (("nan", np.nan), ("inf", np.inf)):
        c = {**base, key: [t.copy() for t in base[key]]}
        c[key][0].flat[0] = val
        out.append(Special(f"{key}[0] has {label}", c))
    out.append(Special("mismatched shapes", {**base, key: [base[key][0], np.zeros(base[key][0].size + 1)]}))
    out.append(Special("weights of the wrong length", {**base, "weights": [1.0] * (len(base[key]) + 1)}))
    out.append(Special("integer tensors", {**base, key: [np.arange(4)] * len(base[key])}))
    if "density" in base and "masks" not in base:
        tied = [np.array([0.0, 0.0, 0.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0, -1.0, 1.0])]
        out.append(
            Special("tied magnitudes at the trim threshold", {**base, key: tied, "weights": [1.0, 1.0], "density": 0.2})
        )
    if "density" in base:
        out.append(Special("density 0", {**base, "density": 0.0}))
        out.append(Special("density above 1", {**base, "density": 1.5}))
    return out


# ----------------------------------------------------------------------------- boundary cases


def _common_task_cases(key: str, *, lam: bool) -> list[Boundary]:
    """Shapes, dtypes, weights and task counts shared by task_arithmetic and linear."""
    out = []
    for i, (shape, dt) in enumerate(
        [
            ((17,), np.float64),
            ((3, 5), np.float32),
            ((2, 3, 4), np.float16),
            ((33,), BF16),
            ((4, 4), np.float64),
            ((4103,), np.float32),
        ]
    ):
        c = {key: _taus(10 + i, 3, shape, dtype=dt), "weights": [1.5, -0.75, 0.25]}
        out.append(
            _b(f"3 tasks {shape} {np.dtype(dt).name}, a negative weight", c, "value: negative weight", shape=shape)
        )
    out.append(
        _b(
            "one task, weights omitted",
            {key: _taus(20, 1, (9,))},
            "value: one task",
            "value: weights omitted",
            shape=(9,),
        )
    )
    out.append(
        _b(
            "nine tasks with a zero weight",
            {key: _taus(21, 9, (24,)), "weights": [0.5, 0.0, 1, -1, 2, 0.25, 1, 1, -0.5]},
            "value: many tasks (T ≥ 8)",
            "value: zero weight",
            shape=(24,),
        )
    )
    out.append(
        _b(
            "all-zero task vectors",
            {key: [np.zeros(7), np.zeros(7)], "weights": [1.0, 2.0]},
            "value: all-zero tensors",
            shape=(7,),
        )
    )
    return out


def _ta_boundary() -> list[Boundary]:
    out = _common_task_cases("task_vectors", lam=True)
    out += [
        _b(
            "λ = 0.5",
            {"task_vectors": _taus(30, 2, (19,)), "weights": [1.0, 0.5], "lam": 0.5},
            "option: lam ≠ 1",
            shape=(19,),
        ),
        _b(
            "negation λ = −1",
            {"task_vectors": _taus(31, 1, (12,)), "lam": -1.0},
            "option: lam < 0 (negation)",
            "value: one task",
            shape=(12,),
        ),
        _b("λ = 0", {"task_vectors": _taus(32, 2, (5,)), "lam": 0.0}, "option: lam = 0", shape=(5,)),
        _b(
            "normalize with mixed-sign weights",
            {"task_vectors": _taus(33, 3, (2, 9)), "weights": [2.0, -0.5, 0.75], "normalize": True, "lam": 1.5},
            "option: normalize=True",
            "option: lam ≠ 1",
            "value: negative weight",
            shape=(2, 9),
        ),
        _b(
            "normalize=False explicit with weights summing to 3",
            {"task_vectors": _taus(34, 2, (8,)), "weights": [1.0, 2.0], "normalize": False},
            "option: normalize=False",
            shape=(8,),
        ),
        _b(
            "normalize with a negative Σ w",
            {"task_vectors": _taus(35, 2, (11,)), "weights": [-2.0, 0.5], "normalize": True},
            "option: normalize=True",
            "value: weights summing to a negative",
            shape=(11,),
        ),
    ]
    return out


TA_CLASSES = (
    *SHAPE_CLASSES,
    BIG,
    *DTYPE_CLASSES,
    "value: negative weight",
    "value: zero weight",
    "value: one task",
    "value: weights omitted",
    "value: many tasks (T ≥ 8)",
    "value: all-zero tensors",
    "option: lam ≠ 1",
    "option: lam < 0 (negation)",
    "option: lam = 0",
    "option: normalize=True",
    "option: normalize=False",
    "value: weights summing to a negative",
)


def _linear_boundary() -> list[Boundary]:
    out = _common_task_cases("tensors", lam=False)
    out += [
        _b(
            "normalize=False",
            {"tensors": _taus(40, 2, (13,)), "weights": [0.25, 1.5], "normalize": False},
            "option: normalize=False",
            shape=(13,),
        ),
        _b(
            "mixed-sign weights, normalised",
            {"tensors": _taus(41, 3, (3, 6)), "weights": [1.0, -0.5, 2.0], "normalize": True},
            "option: normalize=True",
            "value: negative weight",
            shape=(3, 6),
        ),
        _b(
            "negative Σ w",
            {"tensors": _taus(42, 2, (10,)), "weights": [-1.0, -0.25]},
            "value: weights summing to a negative",
            "option: normalize=True",
            shape=(10,),
        ),
    ]
    return out


LINEAR_CLASSES = (
    *SHAPE_CLASSES,
    BIG,
    *DTYPE_CLASSES,
    "value: negative weight",
    "value: zero weight",
    "value: one task",
    "value: weights omitted",
    "value: many tasks (T ≥ 8)",
    "value: all-zero tensors",
    "option: normalize=True",
    "option: normalize=False",
    "value: weights summing to a negative",
)


def _tied_at_cut(n: int, k: int, seed: int) -> np.ndarray:
    """n entries whose k-th and (k+1)-th largest magnitudes are equal (several ties straddle the cut)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 4, size=n) * 0.5 * rng.choice([-1.0, 1.0], size=n)
    a = np.sort(np.abs(x))[::-1]
    assert a[k - 1] == a[k], "test data: expected a tie at the cut"
    return x


def _ties_cases(op: str) -> list[Boundary]:
    """Boundary cases shared by ties and magnitude_prune (trim, weights, dtypes, shapes, profiles)."""
    out = []
    # the trim: d·n integer / fractional / < 1, d = 1, per k rule, ties at the cut, large n (several chunks)
    for rule in ("threshold", "floor", "floor_min1"):
        out.append(
            _b(
                f"{rule}: d·n = 5 exactly",
                {"task_vectors": _taus(50, 2, (20,), kind="normal"), "density": 0.25, "k_rule": rule},
                f"option: k_rule={rule}",
                "value: d·n an integer",
                shape=(20,),
            )
        )
        out.append(
            _b(
                f"{rule}: d·n = 3.4",
                {
                    "task_vectors": _taus(51, 2, (17,), kind="normal"),
                    "density": 0.2,
                    "k_rule": rule,
                    "weights": [1.0, -0.5],
                },
                f"option: k_rule={rule}",
                "value: d·n not an integer",
                "value: negative weight",
                shape=(17,),
            )
        )
        out.append(
            _b(
                f"{rule}: d·n < 1",
                {"task_vectors": _taus(52, 3, (7,), kind="normal"), "density": 0.1, "k_rule": rule},
                f"option: k_rule={rule}",
                "value: d·n < 1",
                shape=(7,),
            )
        )
        x = _tied_at_cut(40, 12, 53)
        out.append(
            _b(
                f"{rule}: tied magnitudes at the cut",
                {"task_vectors": [x, _vals(54, (40,), kind="ties")], "density": 0.3, "k_rule": rule},
                f"option: k_rule={rule}",
                "value: tied magnitudes at the trim cut",
                shape=(40,),
            )
        )
    big = np.tile(np.array([1.0, -1.0, 0.5, 1.0, -0.5, 1.0, -1.0]), 1500)[:10007]
    out.append(
        _b(
            "floor: 10007 tied magnitudes across chunks",
            {"task_vectors": [big, -big[::-1].copy()], "density": 0.3, "k_rule": "floor"},
            "option: k_rule=floor",
            "value: tied magnitudes at the trim cut",
            "value: d·n not an integer",
            shape=(10007,),
        )
    )
    out.append(
        _b(
            "threshold: 4099 entries, float32",
            {"task_vectors": _taus(55, 3, (4099,), dtype=np.float32, kind="normal"), "density": 0.2},
            "value: d·n not an integer",
            shape=(4099,),
        )
    )
    out.append(
        _b(
            "density 1 keeps everything",
            {"task_vectors": _taus(56, 2, (2, 8)), "density": 1.0},
            "value: density = 1",
            shape=(2, 8),
        )
    )
    out.append(
        _b(
            "per-task densities",
            {
                "task_vectors": _taus(57, 3, (30,), kind="normal"),
                "density": [0.1, 0.5, 0.9],
                "weights": [1.0, 0.5, 2.0],
            },
            "option: per-task densities",
            shape=(30,),
        )
    )
    for i, dt in enumerate((np.float32, np.float16, BF16)):
        shape = ((3, 7), (2, 2, 5), (23,))[i]
        out.append(
            _b(
                f"{np.dtype(dt).name} inputs",
                {"task_vectors": _taus(58 + i, 3, shape, dtype=dt), "density": 0.5, "weights": [1.0, 0.25, -1.5]},
                "value: negative weight",
                shape=shape,
            )
        )
    out.append(_b("one task", {"task_vectors": _taus(61, 1, (9,)), "density": 0.5}, "value: one task", shape=(9,)))
    out.append(
        _b(
            "nine tasks",
            {
                "task_vectors": _taus(62, 9, (32,), kind="normal"),
                "density": 0.7,
                "weights": [1.0, -1.0, 0.5, 2.0, 0.0, 1.0, -0.5, 1.5, 1.0],
            },
            "value: many tasks (T ≥ 8)",
            "value: zero weight",
            shape=(32,),
        )
    )
    out.append(
        _b(
            "all-zero task vectors",
            {"task_vectors": [np.zeros(6), np.zeros(6)], "density": 0.5},
            "value: all-zero task vectors",
            shape=(6,),
        )
    )
    for prof in ("paper", "peft", "mergekit"):
        out.append(
            _b(
                f"profile={prof}",
                {"task_vectors": _taus(63, 3, (21,)), "density": 0.4, "profile": prof, "weights": [1.0, 3.0, -0.5]},
                f"option: profile={prof}",
                shape=(21,),
            )
        )
    out.append(
        _b(
            "λ = −0.5",
            {"task_vectors": _taus(64, 2, (12,)), "density": 0.5, "lam": -0.5},
            "option: lam ≠ 1",
            "option: lam < 0",
            shape=(12,),
        )
    )
    out.append(
        _b(
            "rescale l1",
            {
                "task_vectors": _taus(65, 2, (18,), kind="normal"),
                "density": 0.3,
                "rescale": "l1",
                "weights": [1.0, 0.5],
            },
            "option: rescale=l1",
            shape=(18,),
        )
    )
    out.append(
        _b(
            "rescale none",
            {"task_vectors": _taus(66, 2, (18,)), "density": 0.3, "rescale": "none", "profile": "mergekit"},
            "option: rescale=none",
            "option: profile=mergekit",
            shape=(18,),
        )
    )
    return out


TRIM_CLASSES = (
    *SHAPE_CLASSES,
    BIG,
    *DTYPE_CLASSES,
    "option: k_rule=threshold",
    "option: k_rule=floor",
    "option: k_rule=floor_min1",
    "value: d·n an integer",
    "value: d·n not an integer",
    "value: d·n < 1",
    "value: density = 1",
    "value: tied magnitudes at the trim cut",
    "option: per-task densities",
    "value: negative weight",
    "value: zero weight",
    "value: one task",
    "value: many tasks (T ≥ 8)",
    "value: all-zero task vectors",
    "option: profile=paper",
    "option: profile=peft",
    "option: profile=mergekit",
    "option: lam ≠ 1",
    "option: lam < 0",
    "option: rescale=l1",
    "option: rescale=none",
)


def _ties_boundary() -> list[Boundary]:
    out = _ties_cases("ties")
    tau1 = np.array([2.0, -1.0, 0.5, 1.0, 1.0, 0.0])
    tau2 = np.array([-1.0, -3.0, 0.5, -1.0, -1.0, 0.0])
    for elect in ("sum", "count"):
        out.append(
            _b(
                f"elect={elect}",
                {
                    "task_vectors": _taus(70, 3, (14,), kind="ties"),
                    "density": 1.0,
                    "elect": elect,
                    "weights": [1.0, 2.0, -1.0],
                },
                f"option: elect={elect}",
                "value: density = 1",
                shape=(14,),
            )
        )
    for stage in ("before_election", "after_election"):
        out.append(
            _b(
                f"weight_stage={stage}",
                {"task_vectors": [tau1, tau2], "weights": [1.0, 3.0], "density": 1.0, "weight_stage": stage},
                f"option: weight_stage={stage}",
                shape=(6,),
            )
        )
    for div in ("count", "weight_sum", "none"):
        out.append(
            _b(
                f"divisor={div}",
                {
                    "task_vectors": _taus(71, 3, (16,), kind="normal"),
                    "density": 0.8,
                    "divisor": div,
                    "weights": [0.5, 2.0, 1.5],
                },
                f"option: divisor={div}",
                shape=(16,),
            )
        )
    out.append(
        _b(
            "weight_sum divisor 0 over agreeing entries",
            {
                "task_vectors": [np.array([1.0, 2.0, -1.0]), np.array([1.0, 1.0, -1.0])],
                "weights": [1.0, -1.0],
                "density": 1.0,
                "divisor": "weight_sum",
            },
            "option: divisor=weight_sum",
            "value: agreeing weights sum to 0",
            shape=(3,),
        )
    )
    # elected score exactly 0: +1 (positive) or the global majority; a zero majority selects the negatives
    zero = [np.array([1.0, -2.0, 0.5, 1.0, 0.25]), np.array([-1.0, -1.0, 0.5, -1.0, -0.25])]
    for zs in ("positive", "global_majority"):
        out.append(
            _b(
                f"score 0 with zero_sign={zs}",
                {"task_vectors": zero, "density": 1.0, "zero_sign": zs},
                f"option: zero_sign={zs}",
                "value: elected score exactly 0",
                shape=(5,),
            )
        )
    even = [np.array([1.0, 2.0, -1.0, -2.0]), np.array([-1.0, 1.0, 1.0, -1.0])]
    out.append(
        _b(
            "global majority 0 (score 0 selects the negatives)",
            {"task_vectors": even, "density": 1.0, "zero_sign": "global_majority", "elect": "count"},
            "option: zero_sign=global_majority",
            "value: global majority 0",
            "option: elect=count",
            shape=(4,),
        )
    )
    out.append(
        _b(
            "no agreeing entry",
            {
                "task_vectors": [np.array([0.0, 1.0]), np.array([0.0, -1.0])],
                "density": 1.0,
                "weights": [1.0, 1.0],
                "profile": "peft",
            },
            "value: no agreeing entry",
            "value: elected score exactly 0",
            shape=(2,),
        )
    )
    # MergeLM (profile=mergelm): the drop count int(n·(1 − d)) keeps one more entry than the official
    # code when d·n is not whole (n = 10, d = 0.25: 4 vs 3), and a zero global majority gives 0
    out.append(
        _b(
            "profile=mergelm: n = 10, d = 0.25 keeps 4",
            {"task_vectors": _taus(72, 2, (10,), kind="normal"), "density": 0.25, "profile": "mergelm"},
            "option: profile=mergelm",
            "value: d·n not an integer",
            shape=(10,),
        )
    )
    out.append(
        _b(
            "profile=mergelm: elected sign 0 gives 0",
            {"task_vectors": [np.array([1.0, -2.0]), np.array([-1.0, 2.0])], "density": 1.0, "profile": "mergelm"},
            "option: profile=mergelm",
            "value: elected score exactly 0",
            "value: global majority 0",
            shape=(2,),
        )
    )
    out.append(
        _b(
            "profile=mergelm: d·n < 1, weighted",
            {
                "task_vectors": _taus(73, 3, (7,), kind="normal"),
                "density": 0.1,
                "profile": "mergelm",
                "weights": [1.0, 2.0, -0.5],
            },
            "option: profile=mergelm",
            "value: d·n < 1",
            shape=(7,),
        )
    )
    out.append(
        _b(
            "mergekit profile, weighted election flips the sign",
            {"task_vectors": [tau1, tau2], "weights": [1.0, 3.0], "density": 1.0, "profile": "mergekit"},
            "option: profile=mergekit",
            "option: weight_stage=before_election",
            shape=(6,),
        )
    )
    return out


TIES_CLASSES = (
    *TRIM_CLASSES,
    "option: elect=sum",
    "option: elect=count",
    "option: zero_sign=positive",
    "option: zero_sign=global_majority",
    "option: weight_stage=before_election",
    "option: weight_stage=after_election",
    "option: divisor=count",
    "option: divisor=weight_sum",
    "option: divisor=none",
    "value: agreeing weights sum to 0",
    "value: elected score exactly 0",
    "value: global majority 0",
    "value: no agreeing entry",
    "option: profile=mergelm",
)


def _dare_boundary() -> list[Boundary]:
    def masks(seed, shape, t, d):
        rng = np.random.default_rng(seed)
        return [rng.random(shape) < d for _ in range(t)]

    out = []
    for i, (shape, dt) in enumerate(
        [
            ((17,), np.float64),
            ((3, 5), np.float32),
            ((2, 3, 4), np.float16),
            ((33,), BF16),
            ((4, 4), np.float64),
            ((4101,), np.float64),
        ]
    ):
        c = {
            "task_vectors": _taus(80 + i, 2, shape, dtype=dt, kind="normal"),
            "density": 0.3,
            "masks": masks(80 + i, shape, 2, 0.3),
            "weights": [1.0, -0.5],
        }
        out.append(
            _b(f"linear {shape} {np.dtype(dt).name}", c, "option: merge=linear", "value: negative weight", shape=shape)
        )
    base = {
        "task_vectors": _taus(90, 3, (20,), kind="normal"),
        "density": 0.5,
        "masks": masks(90, (20,), 3, 0.5),
        "weights": [1.0, 2.0, 0.5],
    }
    for merge in ("linear", "ties"):
        for prof in TIES_PROFILES:
            out.append(
                _b(
                    f"{merge}, profile={prof}",
                    {**base, "merge": merge, "profile": prof},
                    f"option: merge={merge}",
                    f"option: profile={prof}",
                    shape=(20,),
                )
            )
        for rs in ("inverse", "l1", "none"):
            out.append(
                _b(
                    f"{merge}, rescale={rs}",
                    {**base, "merge": merge, "rescale": rs},
                    f"option: merge={merge}",
                    f"option: rescale={rs}",
                    shape=(20,),
                )
            )
    out.append(
        _b(
            "normalize",
            {**base, "normalize": True, "weights": [1.0, -0.25, 2.0], "lam": 0.5},
            "option: normalize=True",
            "option: lam ≠ 1",
            "value: negative weight",
            shape=(20,),
        )
    )
    out.append(
        _b(
            "normalize=False explicit",
            {**base, "normalize": False, "profile": "mergekit"},
            "option: normalize=False",
            "option: profile=mergekit",
            shape=(20,),
        )
    )
    out.append(
        _b(
            "ties with its own trim",
            {**base, "merge": "ties", "ties_density": 0.3, "profile": "peft"},
            "option: merge=ties",
            "option: ties_density < 1",
            shape=(20,),
        )
    )
    for name, vals in (
        ("elect", ("sum", "count")),
        ("zero_sign", ("positive", "global_majority")),
        ("weight_stage", ("before_election", "after_election")),
        ("divisor", ("count", "weight_sum", "none")),
    ):
        for v in vals:
            out.append(
                _b(
                    f"ties, {name}={v}",
                    {
                        **base,
                        "task_vectors": _taus(91, 3, (20,), kind="ties"),
                        "merge": "ties",
                        name: v,
                        "weights": [1.0, -2.0, 0.5],
                    },
                    "option: merge=ties",
                    f"option: {name}={v}",
                    shape=(20,),
                )
            )
    out.append(
        _b(
            "every mask keeps nothing (L1 guard)",
            {"task_vectors": _taus(92, 2, (9,)), "density": 0.5, "masks": [np.zeros(9, bool)] * 2, "rescale": "l1"},
            "value: a mask keeps nothing",
            "option: rescale=l1",
            shape=(9,),
        )
    )
    out.append(
        _b(
            "masks keep everything at density 1",
            {"task_vectors": _taus(93, 2, (9,)), "density": 1.0, "masks": [np.ones(9, bool)] * 2},
            "value: density = 1",
            shape=(9,),
        )
    )
    out.append(
        _b(
            "per-task densities",
            {"task_vectors": _taus(94, 3, (12,)), "density": [0.2, 0.5, 0.9], "masks": masks(94, (12,), 3, 0.5)},
            "option: per-task densities",
            shape=(12,),
        )
    )
    out.append(
        _b(
            "0/1 float masks",
            {
                "task_vectors": _taus(95, 2, (10,)),
                "density": 0.5,
                "masks": [m.astype(np.float64) for m in masks(95, (10,), 2, 0.5)],
                "lam": -1.0,
            },
            "value: 0/1 float masks",
            "option: lam < 0",
            shape=(10,),
        )
    )
    out.append(
        _b(
            "one task",
            {"task_vectors": _taus(96, 1, (8,)), "density": 0.25, "masks": masks(96, (8,), 1, 0.25)},
            "value: one task",
            shape=(8,),
        )
    )
    out.append(
        _b(
            "nine tasks",
            {"task_vectors": _taus(97, 9, (16,)), "density": 0.6, "masks": masks(97, (16,), 9, 0.6), "merge": "ties"},
            "value: many tasks (T ≥ 8)",
            "option: merge=ties",
            shape=(16,),
        )
    )
    out.append(
        _b(
            "all-zero task vectors",
            {"task_vectors": [np.zeros(5)] * 2, "density": 0.5, "masks": masks(98, (5,), 2, 0.5), "merge": "ties"},
            "value: all-zero task vectors",
            "option: merge=ties",
            shape=(5,),
        )
    )
    return out


DARE_CLASSES = (
    *SHAPE_CLASSES,
    BIG,
    *DTYPE_CLASSES,
    "option: merge=linear",
    "option: merge=ties",
    "option: profile=paper",
    "option: profile=peft",
    "option: profile=mergekit",
    "option: profile=mergelm",
    "option: rescale=inverse",
    "option: rescale=l1",
    "option: rescale=none",
    "option: normalize=True",
    "option: normalize=False",
    "option: ties_density < 1",
    "option: elect=sum",
    "option: elect=count",
    "option: zero_sign=positive",
    "option: zero_sign=global_majority",
    "option: weight_stage=before_election",
    "option: weight_stage=after_election",
    "option: divisor=count",
    "option: divisor=weight_sum",
    "option: divisor=none",
    "option: lam ≠ 1",
    "option: lam < 0",
    "option: per-task densities",
    "value: a mask keeps nothing",
    "value: density = 1",
    "value: 0/1 float masks",
    "value: negative weight",
    "value: one task",
    "value: many tasks (T ≥ 8)",
    "value: all-zero task vectors",
)


def _task_vector_boundary() -> list[Boundary]:
    out = []
    for i, (shape, dt) in enumerate(
        [
            ((17,), np.float64),
            ((3, 5), np.float32),
            ((2, 3, 4), np.float16),
            ((33,), BF16),
            ((4, 4), np.float64),
            ((4100,), np.float32),
        ]
    ):
        out.append(
            _b(
                f"{shape} {np.dtype(dt).name}",
                {
                    "finetuned": _vals(100 + i, shape, dtype=dt, kind="normal"),
                    "base": _vals(200 + i, shape, dtype=dt, kind="normal"),
                },
                shape=shape,
            )
        )
    x = _vals(110, (9,))
    out.append(
        _b("finetuned equals base", {"finetuned": x, "base": x.copy()}, "value: finetuned equals base", shape=(9,))
    )
    out.append(
        _b(
            "signed zeros",
            {"finetuned": np.array([0.0, -0.0, 0.0, -0.0]), "base": np.array([0.0, 0.0, -0.0, -0.0])},
            "value: signed zeros",
            shape=(4,),
        )
    )
    return out


TV_CLASSES = (*SHAPE_CLASSES, BIG, *DTYPE_CLASSES, "value: finetuned equals base", "value: signed zeros")


# ----------------------------------------------------------------------------- SLERP


def _pair(seed: int, shape, cos: float, *, scale1: float = 1.0, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """v0 and v1 with cos Ω = ``cos`` (to ~1e-15) and ‖v1‖ = scale1·‖v0‖."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    u = rng.standard_normal(n)
    u /= np.linalg.norm(u)
    w = rng.standard_normal(n)
    w -= (w @ u) * u
    w /= np.linalg.norm(w)
    v0 = 1.5 * u
    v1 = 1.5 * scale1 * (cos * u + math.sqrt(max(0.0, 1.0 - cos * cos)) * w)
    return v0.reshape(shape).astype(dtype), v1.reshape(shape).astype(dtype)


def _slerp_boundary() -> list[Boundary]:
    from refimpl.merging.spherical import DOT_THRESHOLD as THR

    out = []
    for i, (shape, dt) in enumerate(
        [
            ((17,), np.float64),
            ((3, 5), np.float32),
            ((2, 3, 4), np.float16),
            ((33,), BF16),
            ((4, 4), np.float64),
            ((4099,), np.float64),
        ]
    ):
        v0, v1 = _pair(300 + i, shape, 0.3, scale1=0.5, dtype=dt)
        out.append(
            _b(
                f"cos 0.3, {shape} {np.dtype(dt).name}",
                {"t": 0.3, "v0": v0, "v1": v1},
                "option: 0 < t < 1",
                "value: endpoints of different norms",
                shape=shape,
            )
        )
    v0, v1 = _pair(310, (20,), 0.0)
    out.append(_b("orthogonal", {"t": 0.5, "v0": v0, "v1": v1}, "value: orthogonal", "option: 0 < t < 1", shape=(20,)))
    for t in (0.0, 1.0):
        v0, v1 = _pair(311, (12,), 0.6, scale1=2.0)
        out.append(_b(f"t = {t:g}", {"t": t, "v0": v0, "v1": v1}, f"option: t = {t:g}", shape=(12,)))
    for label, cos, cls in (
        ("cos Ω = threshold + 2e-6 (linear)", THR + 2e-6, "value: cos Ω just above the threshold"),
        ("cos Ω = threshold − 2e-6 (slerp)", THR - 2e-6, "value: cos Ω just below the threshold"),
        ("cos Ω = 0.9997 (linear)", 0.9997, "value: cos Ω just above the threshold"),
        ("cos Ω = 0.999 (slerp)", 0.999, "value: cos Ω just below the threshold"),
        ("cos Ω = −(threshold + 2e-6) (linear)", -THR - 2e-6, "value: antiparallel (linear)"),
        ("cos Ω = −0.999 (slerp)", -0.999, "value: cos Ω just above −threshold"),
    ):
        v0, v1 = _pair(312, (24,), cos, scale1=1.25)
        out.append(_b(label, {"t": 0.35, "v0": v0, "v1": v1}, cls, "option: 0 < t < 1", shape=(24,)))
    v = _vals(313, (10,))
    out.append(
        _b("identical endpoints", {"t": 0.4, "v0": v, "v1": v.copy()}, "value: identical endpoints", shape=(10,))
    )
    out.append(
        _b("exactly antiparallel", {"t": 0.4, "v0": v, "v1": -2.0 * v}, "value: antiparallel (linear)", shape=(10,))
    )
    out.append(
        _b(
            "zero endpoint (‖v0‖ ≤ eps)",
            {"t": 0.25, "v0": np.zeros(6), "v1": _vals(314, (6,))},
            "value: zero endpoint",
            shape=(6,),
        )
    )
    v0, v1 = _pair(315, (16,), 0.999)
    out.append(
        _b(
            "dot_threshold 0.99 given",
            {"t": 0.3, "v0": v0, "v1": v1, "dot_threshold": 0.99},
            "option: dot_threshold given",
            shape=(16,),
        )
    )
    v0, v1 = _pair(316, (8,), 0.5)
    out.append(
        _b(
            "eps above ‖v1‖",
            {"t": 0.6, "v0": v0, "v1": v1 * 1e-3, "eps": 0.01},
            "option: eps given",
            "value: zero endpoint",
            shape=(8,),
        )
    )
    return out


SLERP_CLASSES = (
    *SHAPE_CLASSES,
    BIG,
    *DTYPE_CLASSES,
    "option: t = 0",
    "option: t = 1",
    "option: 0 < t < 1",
    "value: orthogonal",
    "value: endpoints of different norms",
    "value: cos Ω just above the threshold",
    "value: cos Ω just below the threshold",
    "value: antiparallel (linear)",
    "value: cos Ω just above −threshold",
    "value: identical endpoints",
    "value: zero endpoint",
    "option: dot_threshold given",
    "option: eps given",
)


def _slerp_terms(case: Mapping[str, Any]):
    """(c0, c1, S0, S1, linear): the coefficients and their sensitivity (in units of the rounding of cos Ω)."""
    from refimpl.merging import slerp_coefficients

    kw = {k: case[k] for k in ("dot_threshold", "eps") if k in case}
    c = slerp_coefficients(case["t"], case["v0"], case["v1"], **kw)
    if c.linear:
        return c.c0, c.c1, 1.0, 1.0, True
    t = float(case["t"])
    om = math.acos(c.dot)
    s = math.sin(om)

    def dc(tt):  # d/dΩ of sin(tt·Ω)/sin Ω
        return abs((tt * math.cos(tt * om) * s - math.sin(tt * om) * math.cos(om)) / (s * s))

    sens = 1.0 / s + om + 1.0
    return c.c0, c.c1, dc(1.0 - t) * sens + abs(c.c0), dc(t) * sens + abs(c.c1), False


def _slerp_depth(case: Mapping[str, Any]) -> int:
    return bounds.slerp_depth(int(np.asarray(case["v0"]).size))


def _slerp_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    c0, c1, s0, s1, _ = _slerp_terms(case)
    a, b = np.abs(_f64(case["v0"])), np.abs(_f64(case["v1"]))
    return {"out": (abs(c0) + s0) * a + (abs(c1) + s1) * b}


def _coef_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    c0, c1, s0, s1, _ = _slerp_terms(case)
    return {"out.c0": np.asarray(abs(c0) + s0), "out.c1": np.asarray(abs(c1) + s1), "out.dot": np.asarray(1.0)}


def _slerp_strategy():
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs
    from refimpl.merging.spherical import DOT_THRESHOLD as THR

    @st.composite
    def build(draw) -> Case:
        shape = _draw_shape(draw)
        dtype = draw(st.sampled_from(DTYPES))
        v0 = draw(rs.float_arrays(shape))
        kind = draw(st.sampled_from(["independent", "near", "anti", "scaled"]))
        if kind == "independent":
            v1 = draw(rs.float_arrays(shape))
        else:
            alpha = draw(rs.reals(0.25, 3.0)) * (-1.0 if kind == "anti" else 1.0)
            v1 = alpha * v0 + (draw(rs.float_arrays(shape, -0.05, 0.05)) if kind != "scaled" else 0.0)
        t = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5]), rs.reals(0.0, 1.0)))
        c: Case = {"t": float(t), "v0": v0.astype(dtype), "v1": np.asarray(v1).astype(dtype)}
        _put(c, dot_threshold=_opt(draw, (0.9995, 0.99)))
        return c

    def away_from_threshold(c: Case) -> bool:
        from refimpl.merging import slerp_coefficients

        thr = c.get("dot_threshold", THR)
        dot = slerp_coefficients(c["t"], c["v0"], c["v1"]).dot
        return abs(abs(dot) - thr) > 1e-9

    return build().filter(away_from_threshold)


# ----------------------------------------------------------------------------- LoRA space


def _adapters_case(
    seed: int, ranks, n_out: int, n_in: int, *, scalings=2.0, weights=None, dtype=np.float64, kind="dyadic"
) -> Case:
    c: Case = {
        "As": [_vals(seed + i, (r, n_in), dtype=dtype, kind=kind) for i, r in enumerate(ranks)],
        "Bs": [_vals(seed + 50 + i, (n_out, r), dtype=dtype, kind=kind) for i, r in enumerate(ranks)],
        "scalings": scalings,
    }
    if weights is not None:
        c["weights"] = weights
    return c


def _lora_cases(*, equal_ranks: bool = False) -> list[Boundary]:
    out = []
    r2 = (2, 2) if equal_ranks else (2, 3)
    for i, (dims, dt) in enumerate(
        [((5, 7), np.float64), ((16, 8), np.float32), ((9, 17), np.float16), ((6, 6), BF16)]
    ):
        c = _adapters_case(400 + 10 * i, r2, *dims, scalings=[0.5, 2.0], weights=[1.0, -0.5], dtype=dt)
        cls = [
            "option: per-adapter scalings",
            "value: negative weight",
            "shape: out ≠ in" if dims[0] != dims[1] else "shape: out = in",
        ]
        if dims[0] % 16 or dims[1] % 16:
            cls.append("shape: out or in % 16 != 0")
        out.append(_b(f"2 adapters {dims} {np.dtype(dt).name}", c, *cls))
    out.append(
        _b(
            "one adapter of rank 1, weights omitted",
            _adapters_case(450, (1,), 4, 6, scalings=0.5),
            "value: one adapter",
            "shape: rank 1",
            "option: one scaling for all",
            "value: weights omitted",
            "shape: out ≠ in",
            "shape: out or in % 16 != 0",
        )
    )
    ranks = (3, 3, 3) if equal_ranks else (1, 3, 2)
    out.append(
        _b(
            "three adapters, a zero weight",
            _adapters_case(460, ranks, 8, 10, scalings=1.0, weights=[0.5, 0.0, 2.0]),
            "value: several adapters (T ≥ 3)",
            "value: zero weight",
            "option: one scaling for all",
            "shape: out ≠ in",
            "shape: out or in % 16 != 0",
        )
    )
    return out


LORA_CLASSES = (
    "shape: out ≠ in",
    "shape: out = in",
    "shape: out or in % 16 != 0",
    "shape: rank 1",
    *DTYPE_CLASSES,
    "option: per-adapter scalings",
    "option: one scaling for all",
    "value: negative weight",
    "value: zero weight",
    "value: weights omitted",
    "value: one adapter",
    "value: several adapters (T ≥ 3)",
)


def _lora_delta_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from refimpl.merging.lora_space import _adapters

    A, B, c = _adapters(case["As"], case["Bs"], case["scalings"], case.get("weights"))
    return {"out": sum(abs(ci) * (np.abs(b) @ np.abs(a)) for ci, a, b in zip(c, A, B, strict=True))}


def _lora_depth(case: Mapping[str, Any]) -> int:
    return bounds.lora_delta_merge_depth(max(np.shape(a)[0] for a in case["As"]), len(case["As"]))


def _cat_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from refimpl.merging.lora_space import _adapters

    A, B, c = _adapters(case["As"], case["Bs"], case["scalings"], case.get("weights"))
    return {
        "out.0": np.concatenate([abs(ci) * np.abs(a) for ci, a in zip(c, A, strict=True)], axis=0),
        "out.1": np.zeros((B[0].shape[0], sum(b.shape[1] for b in B))),
    }


def _factor_linear_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from refimpl.merging.lora_space import _adapters

    A, B, c = _adapters(case["As"], case["Bs"], case["scalings"], case.get("weights"))
    r = np.sqrt(np.abs(c))
    return {
        "out.0": sum(x * np.abs(a) for x, a in zip(r, A, strict=True)),
        "out.1": sum(x * np.abs(b) for x, b in zip(r, B, strict=True)),
    }


def _svd_bound(delta: np.ndarray, rank: int, split: str) -> dict[str, np.ndarray]:
    """Perturbation bound of the truncated SVD factors, in units of γ_K·‖ΔW‖: a singular vector moves by
    ≲ σ₁/gap_j (Wedin), the gap to the nearest other singular value (σ_{r+1} included)."""
    s = np.linalg.svd(delta, compute_uv=False)
    s1 = float(s[0]) if s.size and s[0] > 0 else 1.0
    ext = np.concatenate([[np.inf], s, [0.0]])
    gaps = [min(ext[j] - ext[j + 1], ext[j + 1] - ext[j + 2]) for j in range(rank)]
    g = max(min(gaps), s1 * 1e-12)
    sr = max(float(s[rank - 1]), s1 * 1e-12)
    m, n = delta.shape
    if split == "B":
        return {"out.0": np.full((rank, n), s1 / g), "out.1": np.full((m, rank), s1 * (s1 / g + 1.0))}
    root = math.sqrt(s1)
    k = s1 / g * root + s1 / math.sqrt(sr)
    return {"out.0": np.full((rank, n), k), "out.1": np.full((m, rank), k)}


def _lowrank_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return _svd_bound(_f64(case["delta"]), int(case["rank"]), case.get("split", "B"))


def _lora_svd_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from refimpl.merging import lora_delta

    delta = lora_delta(case["As"], case["Bs"], case["scalings"], case.get("weights"))
    r = case.get("rank") or max(np.shape(a)[0] for a in case["As"])
    return _svd_bound(delta, int(r), case.get("split", "B"))


def _svd_depth(case: Mapping[str, Any]) -> int:
    m, n = np.shape(case["delta"]) if "delta" in case else (np.shape(case["Bs"][0])[0], np.shape(case["As"][0])[1])
    return bounds.svd_factor_depth(m, n, len(case.get("As", [0])))


def _lora_strategy(*, equal_ranks: bool = False, svd: bool = False):
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        t = draw(st.integers(1, 3))
        n_out, n_in = draw(rs.dims(1, 12)), draw(rs.dims(1, 12))
        hi = min(3, n_out, n_in)
        r0 = draw(st.integers(1, hi))
        ranks = [r0 if equal_ranks else draw(st.integers(1, hi)) for _ in range(t)]
        dtype = draw(st.sampled_from(DTYPES))
        c: Case = {
            "As": [draw(rs.float_arrays((r, n_in))).astype(dtype) for r in ranks],
            "Bs": [draw(rs.float_arrays((n_out, r))).astype(dtype) for r in ranks],
        }
        c["scalings"] = (
            draw(rs.reals(-2.0, 2.0)) if draw(st.booleans()) else [draw(rs.reals(-2.0, 2.0)) for _ in range(t)]
        )
        w = _draw_weights(draw, t)
        if w is not None:
            c["weights"] = w
        if svd:
            _put(c, rank=_opt(draw, tuple(range(1, min(n_out, n_in) + 1))), split=_opt(draw, ("B", "sqrt")))
            if c.get("split", "B") == "B":
                _put(c, clamp=_opt(draw, (0.9, 0.99)))
        return c

    return build()


def _svd_cases() -> list[Boundary]:
    def spectral(seed, m, n, svals):
        rng = np.random.default_rng(seed)
        u = np.linalg.qr(rng.standard_normal((m, len(svals))))[0]
        v = np.linalg.qr(rng.standard_normal((n, len(svals))))[0]
        return (u * np.asarray(svals)) @ v.T

    out = []
    for split in ("B", "sqrt"):
        out.append(
            _b(
                f"split={split}, exact rank",
                {"delta": spectral(500, 9, 17, [4.0, 2.0, 1.0]), "rank": 3, "split": split},
                f"option: split={split}",
                "value: rank(ΔW) ≤ rank (exact)",
                "shape: out or in % 16 != 0",
            )
        )
        out.append(
            _b(
                f"split={split}, truncated",
                {"delta": spectral(501, 16, 12, [8.0, 4.0, 2.0, 1.0, 0.5]), "rank": 2, "split": split},
                f"option: split={split}",
                "value: rank(ΔW) > rank (truncated)",
                "shape: out or in % 16 != 0",
            )
        )
    out.append(
        _b(
            "clamp 0.9",
            {"delta": spectral(502, 8, 8, [3.0, 1.0]), "rank": 2, "clamp": 0.9},
            "option: clamp",
            "option: split=B",
            "value: rank(ΔW) ≤ rank (exact)",
        )
    )
    out.append(
        _b(
            "rank = min(out, in)",
            {"delta": spectral(503, 4, 6, [5.0, 2.5, 1.25, 0.5]), "rank": 4},
            "option: rank = min(out, in)",
            "value: rank(ΔW) ≤ rank (exact)",
            "shape: out or in % 16 != 0",
        )
    )
    out.append(
        _b(
            "float32 ΔW, rank 1",
            {"delta": spectral(504, 5, 3, [2.0, 0.5]).astype(np.float32), "rank": 1},
            "shape: rank 1",
            "value: rank(ΔW) > rank (truncated)",
            "dtype: float32",
            "shape: out or in % 16 != 0",
        )
    )
    return out


LOWRANK_CLASSES = (
    "option: split=B",
    "option: split=sqrt",
    "option: clamp",
    "option: rank = min(out, in)",
    "shape: rank 1",
    "shape: out or in % 16 != 0",
    "value: rank(ΔW) ≤ rank (exact)",
    "value: rank(ΔW) > rank (truncated)",
    "dtype: float64",
    "dtype: float32",
)


def _lora_svd_cases() -> list[Boundary]:
    out = []
    c = _adapters_case(600, (2, 3), 9, 17, scalings=[0.5, 2.0], weights=[1.0, -0.5], kind="normal")
    out.append(
        _b(
            "default rank = max r_i (truncates ΔW of rank 5)",
            c,
            "option: rank default (max r_i)",
            "value: rank(ΔW) > rank (truncated)",
            "value: negative weight",
            "option: per-adapter scalings",
        )
    )
    out.append(
        _b(
            "rank given, split sqrt",
            {**_adapters_case(610, (2,), 6, 8, scalings=1.5, kind="normal"), "rank": 2, "split": "sqrt"},
            "option: rank given",
            "option: split=sqrt",
            "value: rank(ΔW) ≤ rank (exact)",
            "value: one adapter",
            "option: one scaling for all",
        )
    )
    out.append(
        _b(
            "rank given below max r_i, split B",
            {
                **_adapters_case(620, (3, 1), 7, 7, scalings=[1.0, 4.0], kind="normal", dtype=np.float32),
                "rank": 2,
                "split": "B",
            },
            "option: rank given",
            "option: split=B",
            "value: rank(ΔW) > rank (truncated)",
            "dtype: float32",
        )
    )
    out.append(
        _b(
            "clamp",
            {**_adapters_case(630, (2, 2), 8, 5, scalings=2.0, weights=[0.5, 0.25], kind="normal"), "clamp": 0.95},
            "option: clamp",
            "option: rank default (max r_i)",
            "value: rank(ΔW) > rank (truncated)",
        )
    )
    return out


LORA_SVD_CLASSES = (
    "option: rank default (max r_i)",
    "option: rank given",
    "option: split=B",
    "option: split=sqrt",
    "option: clamp",
    "value: rank(ΔW) ≤ rank (exact)",
    "value: rank(ΔW) > rank (truncated)",
    "value: negative weight",
    "value: one adapter",
    "option: per-adapter scalings",
    "option: one scaling for all",
    "dtype: float64",
    "dtype: float32",
)


# ----------------------------------------------------------------------------- building blocks


def _trim_mask_boundary() -> list[Boundary]:
    out = []
    for rule in ("threshold", "floor", "floor_min1"):
        for label, tau, d, cls in (
            ("d·n = 5", _vals(700, (20,), kind="normal"), 0.25, "value: d·n an integer"),
            ("d·n = 3.4", _vals(701, (17,), kind="normal"), 0.2, "value: d·n not an integer"),
            ("d·n < 1", _vals(702, (7,), kind="normal"), 0.1, "value: d·n < 1"),
            ("ties at the cut", _tied_at_cut(40, 12, 53), 0.3, "value: tied magnitudes at the trim cut"),
        ):
            out.append(
                _b(
                    f"{rule}: {label}",
                    {"tau": tau, "density": d, "k_rule": rule},
                    f"option: k_rule={rule}",
                    cls,
                    shape=tau.shape,
                )
            )
    big = np.tile(np.array([1.0, -1.0, 0.5]), 3400)[:10007]
    out.append(
        _b(
            "floor: 10007 ties across chunks",
            {"tau": big, "density": 0.3, "k_rule": "floor"},
            "option: k_rule=floor",
            "value: tied magnitudes at the trim cut",
            shape=(10007,),
        )
    )
    out.append(
        _b(
            "default rule, 2-D float32",
            {"tau": _vals(703, (4, 6), dtype=np.float32, kind="normal"), "density": 0.5},
            "option: k_rule default",
            shape=(4, 6),
        )
    )
    out.append(_b("density 1", {"tau": _vals(704, (2, 2, 3)), "density": 1.0}, "value: density = 1", shape=(2, 2, 3)))
    out.append(
        _b(
            "32 entries, d·n = 8",
            {"tau": _vals(707, (32,), kind="normal"), "density": 0.25},
            "option: k_rule default",
            "value: d·n an integer",
            shape=(32,),
        )
    )
    out.append(
        _b(
            "all zeros",
            {"tau": np.zeros(9), "density": 0.5, "k_rule": "floor"},
            "value: all zeros",
            "option: k_rule=floor",
            shape=(9,),
        )
    )
    for i, dt in enumerate((np.float16, BF16)):
        out.append(
            _b(
                f"{np.dtype(dt).name}",
                {"tau": _vals(705 + i, (33,), dtype=dt, kind="normal"), "density": 0.3},
                "option: k_rule default",
                shape=(33,),
            )
        )
    return out


TRIM_MASK_CLASSES = (
    *SHAPE_CLASSES,
    BIG,
    *DTYPE_CLASSES,
    "option: k_rule=threshold",
    "option: k_rule=floor",
    "option: k_rule=floor_min1",
    "option: k_rule default",
    "value: d·n an integer",
    "value: d·n not an integer",
    "value: d·n < 1",
    "value: tied magnitudes at the trim cut",
    "value: density = 1",
    "value: all zeros",
)


def _elect_rules(c: Mapping[str, Any]) -> TiesRules:
    return replace(merging_profiles.PAPER.ties, **{k: c[k] for k in ("elect", "zero_sign", "weight_stage", "divisor")})


def _elect_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    hat = [_f64(t) for t in (case["trimmed"] if isinstance(case["trimmed"], list) else list(case["trimmed"]))]
    w = np.ones(len(hat)) if case.get("weights") is None else np.asarray(case["weights"], dtype=np.float64)
    return {"out": _elected_magnitude(hat, w, _elect_rules(case))}


def _elect_depth(case: Mapping[str, Any]) -> int:
    return bounds.disjoint_merge_depth(len(case["trimmed"]))


ELECT_DEFAULT = {"elect": "sum", "zero_sign": "positive", "weight_stage": "after_election", "divisor": "count"}


def _elect_boundary() -> list[Boundary]:
    out = []
    base = _taus(800, 3, (18,), kind="ties")
    for name, vals in (
        ("elect", ("sum", "count")),
        ("zero_sign", ("positive", "global_majority")),
        ("weight_stage", ("before_election", "after_election")),
        ("divisor", ("count", "weight_sum", "none")),
    ):
        for v in vals:
            out.append(
                _b(
                    f"{name}={v}",
                    {"trimmed": base, "weights": [1.0, -2.0, 0.5], **ELECT_DEFAULT, name: v},
                    f"option: {name}={v}",
                    "value: negative weight",
                    shape=(18,),
                )
            )
    zero = [np.array([1.0, -2.0, 0.5, 1.0, 0.0, 1.5]), np.array([-1.0, -1.0, 0.5, -1.0, 0.0, 0.0])]
    out.append(
        _b(
            "score 0, global majority; zeros beside a vote",
            {"trimmed": zero, "weights": None, **ELECT_DEFAULT, "zero_sign": "global_majority"},
            "value: elected score exactly 0",
            "option: zero_sign=global_majority",
            "value: weights None",
            "value: zeros",
            shape=(6,),
        )
    )
    even = [np.array([1.0, 2.0, -1.0, -2.0]), np.array([-1.0, 1.0, 1.0, -1.0])]
    out.append(
        _b(
            "global majority 0",
            {"trimmed": even, "weights": None, **ELECT_DEFAULT, "elect": "count", "zero_sign": "global_majority"},
            "value: global majority 0",
            "option: elect=count",
            "value: weights None",
            shape=(4,),
        )
    )
    stack = np.stack(_taus(801, 4, (2, 3, 4), kind="ties"))
    out.append(
        _b(
            "a (T, ...) stack",
            {"trimmed": stack, "weights": [1.0, 1.0, 2.0, 0.5], **ELECT_DEFAULT},
            "shape: trimmed as one stacked array",
            "shape: 3-D",
        )
    )
    out.append(
        _b(
            "float32, 4103 entries",
            {
                "trimmed": _taus(802, 2, (4103,), dtype=np.float32, kind="normal"),
                "weights": [1.0, 0.5],
                **ELECT_DEFAULT,
                "divisor": "weight_sum",
            },
            "option: divisor=weight_sum",
            shape=(4103,),
        )
    )
    return out


ELECT_CLASSES = (
    "shape: 1-D",
    "shape: 3-D",
    "shape: size % 16 != 0 (vector tail)",
    "shape: size % 8 != 0",
    BIG,
    "shape: trimmed as one stacked array",
    "dtype: float64",
    "dtype: float32",
    "option: elect=sum",
    "option: elect=count",
    "option: zero_sign=positive",
    "option: zero_sign=global_majority",
    "option: weight_stage=before_election",
    "option: weight_stage=after_election",
    "option: divisor=count",
    "option: divisor=weight_sum",
    "option: divisor=none",
    "value: negative weight",
    "value: weights None",
    "value: elected score exactly 0",
    "value: global majority 0",
    "value: zeros",
)


def _elect_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        t = draw(st.sampled_from([1, 2, 3, 4, 9]))
        shape = _draw_shape(draw)
        c: Case = {"trimmed": _draw_arrays(draw, shape, t, draw(st.sampled_from(DTYPES)))}
        c["weights"] = _draw_weights(draw, t)
        for name in ("elect", "zero_sign", "weight_stage", "divisor"):
            c[name] = draw(st.sampled_from(TIES_OPTIONS[name]))
        return c

    return build()


def _dare_masks_boundary() -> list[Boundary]:
    def rng(seed):
        return np.random.default_rng(seed)

    return [
        _b(
            "1-D, one task",
            {"shape": (17,), "count": 1, "density": 0.3, "rng": rng(1)},
            "value: count = 1",
            "shape: 1-D",
        ),
        _b(
            "2-D, three tasks",
            {"shape": (3, 5), "count": 3, "density": 0.5, "rng": rng(2)},
            "value: count > 1",
            "shape: 2-D",
        ),
        _b(
            "3-D, per-task densities",
            {"shape": (2, 3, 4), "count": 3, "density": [0.1, 0.5, 0.9], "rng": rng(3)},
            "option: per-task densities",
            "shape: 3-D",
            "value: count > 1",
        ),
        _b(
            "density 1",
            {"shape": (9,), "count": 2, "density": 1.0, "rng": rng(4)},
            "value: density = 1",
            "shape: 1-D",
            "value: count > 1",
        ),
        _b(
            "empty shape",
            {"shape": (0,), "count": 2, "density": 0.5, "rng": rng(5)},
            "shape: size 0",
            "value: count > 1",
        ),
    ]


DARE_MASKS_CLASSES = (
    "shape: 1-D",
    "shape: 2-D",
    "shape: 3-D",
    "shape: size 0",
    "value: count = 1",
    "value: count > 1",
    "option: per-task densities",
    "value: density = 1",
)


def _dare_masks_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        shape = _draw_shape(draw)
        count = draw(st.integers(1, 4))
        d = (
            draw(st.sampled_from(DENSITIES))
            if draw(st.booleans())
            else [draw(st.sampled_from(DENSITIES)) for _ in range(count)]
        )
        return {"shape": shape, "count": count, "density": d, "rng": np.random.default_rng(draw(st.integers(0, 99)))}

    return build()


def _l1_boundary() -> list[Boundary]:
    out = []
    for i, (shape, dt) in enumerate(
        [
            ((17,), np.float64),
            ((3, 5), np.float32),
            ((2, 3, 4), np.float16),
            ((33,), BF16),
            ((4, 4), np.float64),
            ((4097,), np.float64),
        ]
    ):
        tau = _vals(900 + i, shape, dtype=dt, kind="normal")
        mask = np.random.default_rng(900 + i).random(shape) < 0.4
        out.append(_b(f"{shape} {np.dtype(dt).name}", {"tau": tau, "mask": mask}, "value: bool mask", shape=shape))
    tau = _vals(910, (12,), kind="normal")
    out += [
        _b(
            "0/1 float mask",
            {"tau": tau, "mask": (np.arange(12) % 3 == 0).astype(np.float64)},
            "value: 0/1 float mask",
            shape=(12,),
        ),
        _b(
            "mask keeps everything",
            {"tau": tau, "mask": np.ones(12, bool)},
            "value: mask keeps everything",
            shape=(12,),
        ),
        _b(
            "mask keeps nothing (guard)",
            {"tau": tau, "mask": np.zeros(12, bool)},
            "value: mask keeps nothing",
            shape=(12,),
        ),
        _b(
            "‖τ‖₁ below 1e-7 (guard)",
            {"tau": np.full(4, 1e-9), "mask": np.array([True, False, True, False])},
            "value: ‖τ‖₁ below the guard",
            shape=(4,),
        ),
        _b(
            "kept norm below 1e-7 (guard)",
            {"tau": np.array([1.0, 2.0, 3e-8, -1.0]), "mask": np.array([False, False, True, False])},
            "value: kept norm below the guard",
            shape=(4,),
        ),
    ]
    return out


L1_CLASSES = (
    *SHAPE_CLASSES,
    BIG,
    *DTYPE_CLASSES,
    "value: bool mask",
    "value: 0/1 float mask",
    "value: mask keeps everything",
    "value: mask keeps nothing",
    "value: ‖τ‖₁ below the guard",
    "value: kept norm below the guard",
)


def _l1_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {"out": _l1("l1", _f64(case["tau"]), np.asarray(case["mask"]).astype(bool))}


def _l1_strategy():
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        shape = _draw_shape(draw)
        tau = _draw_arrays(draw, shape, 1, draw(st.sampled_from(DTYPES)))[0]
        m = draw(rs.keep_masks(shape))
        return {"tau": tau, "mask": m > 0 if draw(st.booleans()) else m}

    return build()


def _flatten_boundary() -> list[Boundary]:
    return [
        _b(
            "keys out of order, an integer buffer",
            {
                "state": {
                    "z.weight": _vals(1000, (3, 4)),
                    "a.bias": _vals(1001, (3,)),
                    "position_ids": np.arange(5),
                    "m.weight": _vals(1002, (2, 2, 2)),
                }
            },
            "value: keys not in sorted order",
            "value: integer buffer skipped",
            "shape: 1-D",
            "shape: 2-D",
            "shape: 3-D",
        ),
        _b(
            "remove_keys",
            {
                "state": {"b": _vals(1003, (4,)), "a": _vals(1004, (4,)), "tied": _vals(1005, (4,))},
                "remove_keys": ["tied"],
            },
            "option: remove_keys",
            "shape: 1-D",
        ),
        _b(
            "float32 and bfloat16 tensors",
            {"state": {"x": _vals(1006, (5,), dtype=np.float32), "y": _vals(1007, (2, 3), dtype=BF16)}},
            "dtype: mixed float dtypes",
            "shape: 1-D",
            "shape: 2-D",
        ),
        _b("a 0-D tensor", {"state": {"s": np.array(1.5), "v": _vals(1008, (3,))}}, "shape: 0-D tensor", "shape: 1-D"),
    ]


FLATTEN_CLASSES = (
    "shape: 0-D tensor",
    "shape: 1-D",
    "shape: 2-D",
    "shape: 3-D",
    "value: keys not in sorted order",
    "value: integer buffer skipped",
    "option: remove_keys",
    "dtype: mixed float dtypes",
)


def _flatten_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        names = draw(st.lists(st.sampled_from(["a", "b.w", "c", "layer.0", "z"]), min_size=1, max_size=5, unique=True))
        state = {k: _draw_arrays(draw, _draw_shape(draw, 6), 1, draw(st.sampled_from(DTYPES)))[0] for k in names}
        c: Case = {"state": state}
        if len(names) > 1 and draw(st.booleans()):
            c["remove_keys"] = [names[0]]
        return c

    return build()


# ----------------------------------------------------------------------------- specials of the new rows


def _nan_first(a: np.ndarray) -> np.ndarray:
    b = _f64(a).copy()
    b.flat[0] = np.nan
    return b


def _new_specials(op: str) -> Callable[[Case], list[Special]]:
    cases = {
        "slerp": lambda c: [
            Special("v0 has nan", {**c, "v0": _nan_first(c["v0"])}),
            Special("t above 1", {**c, "t": 1.5}),
            Special("shapes differ", {**c, "v1": np.zeros(np.size(c["v0"]) + 1)}),
        ],
        "lora": lambda c: [
            Special("As[0] has nan", {**c, "As": [_nan_first(c["As"][0]), *c["As"][1:]]}),
            Special("B rank mismatch", {**c, "Bs": [np.zeros((np.shape(c["Bs"][0])[0], 9)), *c["Bs"][1:]]}),
        ],
        "lowrank": lambda c: [
            Special("rank above min(out, in)", {**c, "rank": 99}),
            Special("clamp with split sqrt", {**c, "split": "sqrt", "clamp": 0.9}),
        ],
        "trim": lambda c: [
            Special("density 0", {**c, "density": 0.0}),
            Special("unknown k_rule", {**c, "k_rule": "ceil"}),
        ],
        "elect": lambda c: [
            Special("unknown divisor", {**c, "divisor": "mean"}),
            Special("trimmed[0] has nan", {**c, "trimmed": [_nan_first(c["trimmed"][0]), *c["trimmed"][1:]]}),
        ],
        "masks": lambda c: [Special("count 0", {**c, "count": 0}), Special("density above 1", {**c, "density": 2.0})],
        "l1": lambda c: [
            Special("mask of 0.5", {**c, "mask": np.full(np.shape(c["tau"]), 0.5)}),
            Special("tau has nan", {**c, "tau": _nan_first(c["tau"])}),
        ],
        "flatten": lambda c: [Special("no floating tensor", {"state": {"ids": np.arange(3)}})],
    }
    return cases[op]


def _row(name, strategy, domain, tol, boundary, classes, specials_kind) -> _Row:
    return _Row(
        name,
        strategy,
        domain,
        tol,
        tiers=NO_GOLDEN,
        classes=classes,
        boundary=boundary,
        specials=lambda: _new_specials(specials_kind)(dict(boundary()[0].case)),
    )


def rows() -> list[OpSpec]:
    ex = lambda **kw: lambda: dict(_golden(np.random.default_rng(0), **kw)[1][1])  # noqa: E731
    return [
        OpSpec(
            "merging.task_vector",
            lambda: _task_strategy(lam=False).map(
                lambda c: {"finetuned": c["task_vectors"][0], "base": c["task_vectors"][-1]}
            ),
            "finetuned and base: float arrays of one shape and dtype (float16, bfloat16, float32, float64)",
            _Rounded(
                lambda c: bounds.task_vector_depth(),
                lambda c: {"out": np.abs(_f64(c["finetuned"])) + np.abs(_f64(c["base"]))},
            ),
            golden=lambda rng: [
                (n, {"finetuned": c["task_vectors"][0], "base": c["task_vectors"][1]}) for n, c in _golden(rng)
            ],
            specials=lambda: [
                Special("shapes differ", {"finetuned": np.zeros(3), "base": np.zeros(4)}),
                Special("finetuned has nan", {"finetuned": np.array([np.nan]), "base": np.zeros(1)}),
            ],
            classes=TV_CLASSES,
            boundary=_task_vector_boundary,
        ),
        OpSpec(
            "merging.task_arithmetic",
            _task_strategy,
            "1–4 or 9 float task vectors of one shape and dtype; weights finite (any sign), |Σ w| ≥ 1e-3 "
            "with normalize; lam any finite real",
            _Rounded(_depth, _ta_magnitude),
            golden=_golden,
            specials=lambda: _specials(ex()),
            classes=TA_CLASSES,
            boundary=_ta_boundary,
        ),
        OpSpec(
            "merging.linear",
            lambda: _task_strategy("tensors", lam=False),
            "1–4 or 9 float tensors of one shape and dtype; weights finite (any sign), Σ w ≠ 0 with normalize",
            _Rounded(_depth, lambda c: _ta_magnitude(c, "tensors", normalize_default=True)),
            golden=lambda rng: _golden(rng, key="tensors"),
            specials=lambda: _specials(ex(key="tensors"), "tensors"),
            classes=LINEAR_CLASSES,
            boundary=_linear_boundary,
        ),
        OpSpec(
            "merging.ties",
            lambda: _trim_strategy("ties"),
            "task vectors (tie-rich or general values, every dtype); density in (0, 1]; weights finite; every "
            "profile and option. Tied magnitudes straddling a floor rule's cut are boundary cases only",
            _Rounded(_ties_depth, _ties_magnitude),
            golden=lambda rng: _golden(rng, density=True),
            specials=lambda: _specials(ex(density=True)),
            classes=TIES_CLASSES,
            boundary=_ties_boundary,
        ),
        OpSpec(
            "merging.magnitude_prune",
            lambda: _trim_strategy("prune"),
            "task vectors; density in (0, 1]; weights finite; every profile, k_rule and rescale",
            _Rounded(_prune_depth, _prune_magnitude),
            golden=lambda rng: _golden(rng, density=True),
            specials=lambda: _specials(ex(density=True)),
            classes=TRIM_CLASSES,
            boundary=lambda: _ties_cases("prune"),
        ),
        OpSpec(
            "merging.dare",
            _dare_strategy,
            "task vectors; keep masks (bool, one per task); density in (0, 1]; merge linear or ties; every "
            "profile and option",
            _Rounded(_dare_depth, _dare_magnitude),
            golden=lambda rng: _golden(rng, density=True, masks=True),
            specials=lambda: _specials(ex(density=True, masks=True)),
            classes=DARE_CLASSES,
            boundary=_dare_boundary,
        ),
        _row(
            "merging.slerp",
            _slerp_strategy,
            "t in [0, 1]; v0, v1 float arrays of one shape and dtype; |cos Ω| not within 1e-9 of the threshold "
            "(the boundary tier places cases 2e-6 either side)",
            _Rounded(_slerp_depth, _slerp_magnitude),
            _slerp_boundary,
            SLERP_CLASSES,
            "slerp",
        ),
        _row(
            "merging.slerp_coefficients",
            _slerp_strategy,
            "as merging.slerp; outputs c0, c1, cos Ω (bounded) and whether the fallback was taken (exact)",
            Bounded(_slerp_depth, _coef_magnitude),
            _slerp_boundary,
            SLERP_CLASSES,
            "slerp",
        ),
        _row(
            "merging.lora_delta",
            _lora_strategy,
            "T adapters A_i (r_i, in), B_i (out, r_i); scalings one or per adapter; weights finite",
            _Rounded(_lora_depth, _lora_delta_magnitude),
            _lora_cases,
            LORA_CLASSES,
            "lora",
        ),
        _row(
            "merging.lora_cat",
            _lora_strategy,
            "as lora_delta; outputs (A, B): c_i A_i rounded once, B exact",
            _Rounded(lambda c: bounds.lora_cat_depth(), _cat_magnitude),
            _lora_cases,
            LORA_CLASSES,
            "lora",
        ),
        _row(
            "merging.lora_factor_linear",
            lambda: _lora_strategy(equal_ranks=True),
            "as lora_delta with equal ranks; outputs (A, B)",
            _Rounded(_lora_depth, _factor_linear_magnitude),
            lambda: _lora_cases(equal_ranks=True),
            LORA_CLASSES,
            "lora",
        ),
        _row(
            "merging.lora_svd",
            lambda: _lora_strategy(svd=True),
            "as lora_delta; rank ≤ min(out, in); split B or sqrt; clamp (split B). Factors are compared as "
            "returned (LAPACK gesdd's signs, as NumPy), within a Wedin bound σ₁/gap",
            _Rounded(_svd_depth, _lora_svd_magnitude),
            _lora_svd_cases,
            LORA_SVD_CLASSES,
            "lora",
        ),
        _row(
            "merging.lowrank_factors",
            lambda: _lowrank_strategy(),
            "delta (out, in) float; rank ≤ min(out, in); split B or sqrt; clamp (split B)",
            _Rounded(_svd_depth, _lowrank_magnitude),
            _svd_cases,
            LOWRANK_CLASSES,
            "lowrank",
        ),
        _row(
            "merging.trim_mask",
            _trim_mask_strategy,
            "tau float array; density in (0, 1]; every k_rule",
            Exact(),
            _trim_mask_boundary,
            TRIM_MASK_CLASSES,
            "trim",
        ),
        _row(
            "merging.elect_and_merge",
            _elect_strategy,
            "trimmed: 1–4 or 9 float arrays (or a stack); weights or None; every elect, zero_sign, weight_stage "
            "and divisor",
            _Rounded(_elect_depth, _elect_magnitude),
            _elect_boundary,
            ELECT_CLASSES,
            "elect",
        ),
        _row(
            "merging.dare_masks",
            _dare_masks_strategy,
            "shape, count ≥ 1, density (one or per task), a seeded Generator (copied per call: randomness is an input)",
            Exact(),
            _dare_masks_boundary,
            DARE_MASKS_CLASSES,
            "masks",
        ),
        _row(
            "merging.l1_rescaled",
            _l1_strategy,
            "tau float array; mask bool or 0/1 of its shape",
            _Rounded(lambda c: bounds.l1_rescale_depth(int(np.size(c["tau"]))), _l1_magnitude),
            _l1_boundary,
            L1_CLASSES,
            "l1",
        ),
        _row(
            "merging.flatten_model",
            _flatten_strategy,
            "state: a mapping name -> array (float tensors are concatenated in sorted key order, others skipped)",
            Exact(),
            _flatten_boundary,
            FLATTEN_CLASSES,
            "flatten",
        ),
    ]


def _lowrank_strategy():
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        m, n = draw(rs.dims(1, 10)), draw(rs.dims(1, 10))
        c: Case = {
            "delta": draw(rs.float_arrays((m, n))).astype(draw(st.sampled_from(DTYPES))),
            "rank": draw(st.integers(1, min(m, n))),
        }
        _put(c, split=_opt(draw, ("B", "sqrt")))
        if c.get("split", "B") == "B":
            _put(c, clamp=_opt(draw, (0.9, 0.99)))
        return c

    return build()


def _trim_mask_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        shape = _draw_shape(draw)
        c: Case = {
            "tau": _draw_arrays(draw, shape, 1, draw(st.sampled_from(DTYPES)))[0],
            "density": draw(st.sampled_from(DENSITIES)),
        }
        _put(c, k_rule=_opt(draw, TIES_OPTIONS["k_rule"]))
        return c

    return build()
