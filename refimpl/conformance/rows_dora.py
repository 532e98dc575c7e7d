"""Op rows for refimpl.dora (spec/dora.md; DoRA arXiv 2402.09353).

Bounds: with V = W + s·B A, Vabs = |W| + |s|·|B||A| and the row condition number
κ = ‖Vabs‖ / ‖V‖ (≥ 1; large when W and s·B A cancel), every computed quantity
of the formula is within γ_K of exact relative to the terms below (Higham §3.1):

    ‖V‖:        |δn| ≤ γ_K ‖Vabs‖
    f = m/‖V‖:  |δf| ≤ γ_K |f| κ
    D = V/‖V‖:  |δD| ≤ γ_K (Vabs + κ |V|) / ‖V‖
    forward y:  |δy| ≤ γ_K ((P + |b|) + |f − 1|(P_d + |b|) + |f| Q_d + κ|f| (P_d + Q_d)),  P = |x||W|ᵀ,
                P_d = |x_d||W|ᵀ, Q_d = |s|(|x_d||A|ᵀ)|B|ᵀ, K = in + r + 5 (refimpl.bounds.dora_forward_*)
    merge W':   |δW'| ≤ γ_K |f| (Vabs + κ |V|)        (κ, f of the unmerged base when one is given)
    unmerge W:  |δW|  ≤ γ_K (|W'| n*/|m| + |s||B||A|)
    backward:   refimpl.bounds.dora_backward_terms (spec/dora.md §10)
    K per op: refimpl.bounds.dora_norm_depth, dora_weight_depth (merge, direction, embedding),
    dora_unmerge_depth, dora_forward_depth, dora_backward_depth, dora_sequential_depth
    sequential: Z₀ = |x||W|ᵀ, Zᵢ = |fᵢ|(Zᵢ₋₁ + |sᵢ|(|x||Aᵢ|ᵀ)|Bᵢ|ᵀ), Mᵢ = |fᵢ| Mᵢ₋₁ + (1 + κᵢ) Zᵢ,
                |δy| ≤ γ_K (M_k + |b|)

Each row lists its equivalence classes and deterministic boundary cases that hit every class in every run;
a boundary case's classes are computed from the case itself (``_dora_classes``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from refimpl import bounds, precision
from refimpl.conformance.rows_lora import (
    _DROP_CLASSES,
    _DTYPE_CLASSES,
    _DTYPES,
    _FIFO_CLASSES,
    _LINEAR_CONFIGS,
    _NO_GOLDEN,
    _S_CLASSES,
    _W_CLASSES,
    _X_CLASSES,
    EMB_SHAPE_CLASSES,
    _bounds_of,
    _cast,
    _dtype_name,
    _f64,
    _label,
    _lin_case,
    _linear_classes,
    _normal,
    _RowWithoutVectors,
    embedding_shape_classes,
    rank_strategy,
)
from refimpl.conformance.rows_lora import _embedding_strategy as _lora_embedding_strategy
from refimpl.conformance.table import Boundary, Case, OpSpec, Special
from refimpl.conformance.tolerance import Bounded, Exact, StoredBounded

#: Public functions of refimpl.dora that are not array ops.
NOT_OPS: dict[str, str] = {
    "dora.forward_error_bound": "an error-bound helper of the harness (its value is a tolerance, not a layer "
    "output a kernel computes); pinned by tests/test_dora.py against measured errors",
    "dora.backward_error_bound": "an error-bound helper (the dora.backward row's tolerance is built from it); "
    "pinned by tests/test_dora.py against measured errors",
}

_STORE_DTYPES = (None, "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")


# ---------------------------------------------------------------------------- the layer in (out, in) layout


def _weight_key(case: Mapping[str, Any]) -> str:
    return next(k for k in ("W", "W_merged", "E") if k in case)


def _layer(case: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(V, Vabs, W, s) in float64 and (out, in) layout (ConvNd reshaped to (out, in·∏k), as the reference)."""
    c = _f64(case)
    W, A, B = c[_weight_key(c)], c["A"], c["B"]
    if W.ndim > 2:
        W, A, B = W.reshape(W.shape[0], -1), A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
    elif c.get("fan_in_fan_out") or c.get("embedding") or "E" in c:
        W = W.T
    s = float(c["scaling"])
    return W + s * (B @ A), np.abs(W) + abs(s) * (np.abs(B) @ np.abs(A)), W, s


def _factors(case: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) in float64 as (r, in) and (out, r) (ConvNd factors flattened, as ``_layer``)."""
    A, B = np.asarray(case["A"], dtype=np.float64), np.asarray(case["B"], dtype=np.float64)
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)


def _to_caller(case: Mapping[str, Any], w: np.ndarray) -> np.ndarray:
    """An (out, in) array back in the layout of the case's weight."""
    shape = np.shape(case[_weight_key(case)])
    if len(shape) > 2:
        return w.reshape(shape)
    return w.T if (case.get("fan_in_fan_out") or case.get("embedding") or "E" in case) else w


def _row_norms(case: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    V, Vabs, _, _ = _layer(case)
    return np.linalg.norm(V, axis=1), np.linalg.norm(Vabs, axis=1)


def _reduction_len(case: Mapping[str, Any]) -> tuple[int, int]:
    """(in, r) of the (out, in) view: the lengths of the dot products."""
    a = np.shape(case["A"])
    return int(np.prod(a[1:])), a[0]


def _weight_depth(case: Mapping[str, Any]) -> int:
    """merge (f ⊙ V) and direction (V / n): V (r-term product, scale, add), the norm (in-term sum of squares,
    square root), the divide, the product and a storage rounding (refimpl.bounds.dora_weight_depth)."""
    return bounds.dora_weight_depth(*_reduction_len(case))


# ---------------------------------------------------------------------------- strategies


def _strategy(*, with_x: bool = True, with_m: bool = True, grad: bool = False, options: str = ""):
    """DoRA cases; every option value is drawn. ``options``: "norm" (fan_in_fan_out and embedding),
    "merge" (+ unmerged_base and the storage dtype), "magnitude" (+ the storage dtype)."""
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        n_in, n_out = draw(rs.dims(1, 6)), draw(rs.dims(1, 6))
        r = draw(rank_strategy(n_in, n_out))
        layout = draw(st.sampled_from(("linear", "fifo", "embedding") if options else ("linear", "fifo")))
        dt = draw(st.sampled_from(_DTYPES))
        c: Case = {}
        if with_x:  # an unbatched (1-D) x is a boundary case: PEFT's DoRA returns (1, out) there
            lead = tuple(draw(st.lists(rs.dims(1, 3), min_size=1, max_size=2)))
            c["x"] = _cast(draw(rs.float_arrays((*lead, n_in))), dt)
        c["W"] = _cast(draw(rs.float_arrays((n_in, n_out) if layout != "linear" else (n_out, n_in))), dt)
        c["A"] = _cast(draw(rs.float_arrays((r, n_in))), dt)
        c["B"] = _cast(draw(rs.float_arrays((n_out, r))), dt)
        if with_m:
            c["m"] = _cast(draw(rs.float_arrays((n_out,))), dt)
        if grad:
            c["grad_y"] = _cast(draw(rs.float_arrays((*c["x"].shape[:-1], n_out))), dt)
        c["scaling"] = draw(st.one_of(rs.reals(-4.0, 4.0), st.sampled_from([0.0, -2.0, 64.0])))
        if with_x:
            if not grad and draw(st.booleans()):
                c["bias"] = _cast(draw(rs.float_arrays((n_out,))), dt)
            if draw(st.booleans()):
                c["dropout_mask"] = draw(rs.keep_masks(c["x"].shape))
                c["dropout_p"] = draw(st.sampled_from([0.0, 0.1, 0.5]))
        if grad:
            c["mode"] = draw(st.sampled_from(("detached", "full")))
        c["fan_in_fan_out"] = layout == "fifo"
        if options:
            c["embedding"] = layout == "embedding"
        if options == "merge" and draw(st.booleans()):
            c["unmerged_base"] = _cast(draw(rs.float_arrays(c["W"].shape)), dt)
        if options in ("merge", "magnitude"):
            c["dtype"] = draw(st.sampled_from(_STORE_DTYPES))
        return c

    def defined(c: Case) -> bool:
        # zero-norm rows are outside the domain (the reference raises; spec/dora.md)
        if "unmerged_base" in c:
            return bool((_row_norms({**c, "W": c["unmerged_base"]})[0] > 0).all())
        return bool((_row_norms(c)[0] > 0).all())

    return build().filter(defined)


def _unmerge_strategy():
    """Merged weights as ``merge`` returns them (with their norm n*), magnitudes away from 0."""
    import refimpl.dora as dora

    def to_unmerge(c: Case) -> Case:
        m = np.where(np.abs(c["m"].astype(np.float64)) < 0.25, 1.0, c["m"].astype(np.float64))
        merged = dora.merge(
            c["W"], c["A"], c["B"], m, c["scaling"], fan_in_fan_out=c["fan_in_fan_out"], embedding=c["embedding"]
        )
        return {
            "W_merged": merged.W,
            "A": c["A"],
            "B": c["B"],
            "m": m,
            "scaling": c["scaling"],
            "weight_norm": merged.weight_norm,
            "fan_in_fan_out": c["fan_in_fan_out"],
            "embedding": c["embedding"],
            "dtype": c["dtype"],
        }

    return _strategy(with_x=False, options="magnitude").map(to_unmerge)


def _embedding_strategy():
    """LoRA's embedding cases (rows_lora) plus a magnitude m of the embedding width, in the same dtype."""
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        case = draw(_lora_embedding_strategy())
        m = draw(rs.float_arrays((case["E"].shape[1],))).astype(case["E"].dtype)
        return {**case, "m": m}

    return build().filter(lambda c: bool((_row_norms(c)[0] > 0).all()))


def _sequential_strategy():
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs
    from refimpl.dora import DoraAdapter

    @st.composite
    def build(draw) -> Case:
        n_in, n_out = draw(rs.dims(1, 6)), draw(rs.dims(1, 6))
        fifo = draw(st.booleans())
        dt = draw(st.sampled_from(_DTYPES))
        lead = tuple(draw(st.lists(rs.dims(1, 3), min_size=0, max_size=2)))
        adapters = []
        for _ in range(draw(st.integers(1, 3))):
            r = draw(rank_strategy(n_in, n_out))
            adapters.append(
                DoraAdapter(
                    A=_cast(draw(rs.float_arrays((r, n_in))), dt),
                    B=_cast(draw(rs.float_arrays((n_out, r))), dt),
                    m=_cast(draw(rs.float_arrays((n_out,))), dt),
                    scaling=draw(rs.reals(-4.0, 4.0)),
                )
            )
        c: Case = {
            "x": _cast(draw(rs.float_arrays((*lead, n_in))), dt),
            "W": _cast(draw(rs.float_arrays((n_in, n_out) if fifo else (n_out, n_in))), dt),
            "adapters": adapters,
        }
        if draw(st.booleans()):
            c["bias"] = _cast(draw(rs.float_arrays((n_out,))), dt)
        c["fan_in_fan_out"] = fifo
        return c

    return build().filter(lambda c: all((_row_norms(_adapter_case(c, ad))[0] > 0).all() for ad in c["adapters"]))


def _adapter_case(c: Case, ad: Any) -> Case:
    return {"W": c["W"], "A": ad.A, "B": ad.B, "scaling": ad.scaling, "fan_in_fan_out": c.get("fan_in_fan_out")}


def _param_count_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        ks = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=3)))
        groups = draw(st.sampled_from([1, 2, 4])) if ks else 1
        r = groups * draw(st.integers(1, 64))
        return {
            "in_features": draw(st.integers(1, 8192)),
            "out_features": draw(st.integers(1, 8192)),
            "r": r,
            "kernel_size": ks,
            "groups": groups,
        }

    return build()


def _golden(rng: np.random.Generator, *, with_x: bool = True, with_m: bool = True) -> list[tuple[str, Case]]:
    from refimpl.conformance.strategies import dyadic

    out = []
    for i, (lead, n_in, n_out, r, fifo, drop) in enumerate(
        [((2, 4), 6, 5, 2, False, False), ((3,), 8, 8, 4, True, True), ((4,), 16, 12, 8, False, True)]
    ):
        c: Case = {}
        if with_x:
            c["x"] = dyadic(rng, (*lead, n_in))
        c["W"] = dyadic(rng, (n_in, n_out) if fifo else (n_out, n_in))
        c["A"], c["B"] = dyadic(rng, (r, n_in)), dyadic(rng, (n_out, r))
        if with_m:
            c["m"] = dyadic(rng, (n_out,))
        c["scaling"] = (0.5, 1.0, 0.25)[i]
        if with_x and i != 1:
            c["bias"] = dyadic(rng, (n_out,))
        if with_x and drop:
            c["dropout_mask"] = (rng.random(c["x"].shape) >= 0.5).astype(np.float64)
            c["dropout_p"] = 0.5
        c["fan_in_fan_out"] = fifo
        out.append((f"case{i}_in{n_in}_out{n_out}_r{r}" + ("_fifo" if fifo else "") + ("_drop" if drop else ""), c))
    return out


def _specials(example, args: tuple[str, ...]) -> list[Special]:
    base = example()
    out = []
    for arg in args:
        for label, val in (("nan", np.nan), ("inf", np.inf)):
            c = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in base.items()}
            c[arg].flat[0] = val
            out.append(Special(f"{arg} has {label}", c))
    zero = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in base.items()}
    wl = zero["W"].T if zero.get("fan_in_fan_out") else zero["W"]
    wl[0, :] = 0.0
    zero["B"][0, :] = 0.0
    out.append(Special("a row of W + s·B A is zero", zero))
    if "m" in base:
        out.append(Special("m of the wrong shape", {**base, "m": np.ones(base["m"].size + 1)}))
    return out


# ---------------------------------------------------------------------------- magnitudes (bounds)


def _forward_depth(case: Mapping[str, Any]) -> int:
    return bounds.dora_forward_depth(*_reduction_len(case))


def _forward_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The forward's terms (refimpl.bounds.dora_forward_magnitude; the eval and the train form)."""
    c = _f64(case)
    _, _, W, s = _layer(c)
    xd = None if c.get("dropout_mask") is None else c["x"] * c["dropout_mask"] / (1.0 - c.get("dropout_p", 0.0))
    return {"out": bounds.dora_forward_magnitude(c["x"], W, c["A"], c["B"], np.asarray(c["m"]), s, c.get("bias"), xd)}


def _merge_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    c = _f64(case)
    _, _, W, s = _layer(c)
    base = None if c.get("unmerged_base") is None else _layer({**c, "W": c["unmerged_base"]})[2]
    w, n_abs = bounds.dora_merge_magnitude(W, *_factors(c), np.asarray(c["m"]), s, base)
    return {"out.W": _to_caller(c, w), "out.weight_norm": n_abs}


def _norm_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    c = _f64(case)
    _, _, W, s = _layer(c)
    return {"out": bounds.dora_norm_magnitude(W, *_factors(c), s)}


def _direction_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    c = _f64(case)
    _, _, W, s = _layer(c)
    return {"out": _to_caller(c, bounds.dora_direction_magnitude(W, *_factors(c), s))}


def _unmerge_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    c = _f64(case)
    _, _, Wm, s = _layer(c)
    w = bounds.dora_unmerge_magnitude(Wm, *_factors(c), np.asarray(c["m"]), s, np.asarray(c["weight_norm"]))
    return {"out": _to_caller(c, w)}


def _stored(kind: str):
    """The stored range of merge's W / unmerge's result with a storage dtype (spec/conventions.md, "Results
    stored in a narrower format"): rd(v) from the unrounded reference v and its bound before the storage."""
    import refimpl.dora as dora

    def stored(case: Mapping[str, Any], dtype: str) -> dict[str, bounds.StoredRange]:
        storage = case.get("dtype")
        if storage is None:
            return {}
        storage = str(np.dtype(precision.resolve_dtype(storage)))
        unrounded = {k: v for k, v in case.items() if k != "dtype"}
        n_in, r = _reduction_len(case)
        if kind == "merge":
            v, name = dora.merge(**unrounded).W, "out.W"
            depth, mag = bounds.dora_merge_unrounded_depth(n_in, r), _merge_magnitude(case)[name]
        else:
            v, name = dora.unmerge(**unrounded), "out"
            depth, mag = bounds.dora_unmerge_unrounded_depth(r), _unmerge_magnitude(case)[name]
        return {name: bounds.stored_single(v, depth, mag, storage, dtype)}

    return stored


def _magnitude_stored(case: Mapping[str, Any], dtype: str) -> dict[str, bounds.StoredNormRange]:
    """init_magnitude with a storage dtype: PEFT's stages each stored (refimpl.bounds.StoredNormRange)."""
    storage = case.get("dtype")
    if storage is None:
        return {}
    _, _, W, s = _layer(case)
    A, B = _factors(case)
    return {"out": bounds.StoredNormRange(str(np.dtype(precision.resolve_dtype(storage))), dtype, W, A, B, s)}


def _backward_depth(case: Mapping[str, Any]) -> int:
    x, n_in, r = np.shape(case["x"]), *_reduction_len(case)
    return bounds.dora_backward_depth(int(np.prod(x[:-1])), n_in, np.shape(case["B"])[0], r)


def _backward_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The gradients' terms (refimpl.bounds.dora_backward_terms)."""
    c = _f64(case)
    _, _, W, s = _layer(c)
    x = c["x"]
    n_in, out_f = W.shape[1], W.shape[0]
    keep = None if c.get("dropout_mask") is None else c["dropout_mask"] / (1.0 - c.get("dropout_p", 0.0))
    x_in = x if keep is None else x * keep
    t = bounds.dora_backward_terms(
        x_in.reshape(-1, n_in),
        W,
        c["A"],
        c["B"],
        np.asarray(c["m"]),
        c["grad_y"].reshape(-1, out_f),
        s,
        c.get("mode", "detached"),
        None if keep is None else keep.reshape(-1, n_in),
    )
    return {"out.dx": t.dx.reshape(x.shape), "out.dA": t.dA, "out.dB": t.dB, "out.dm": t.dm}


def _embedding_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    c = _f64(case)
    _, _, W, s = _layer(c)  # (d, V)
    w, _ = bounds.dora_merge_magnitude(W, c["A"], c["B"], np.asarray(c["m"]), s)
    return {"out": w.T[np.asarray(case["ids"])]}


def _embedding_depth(case: Mapping[str, Any]) -> int:
    return bounds.dora_weight_depth(np.shape(case["E"])[0], np.shape(case["A"])[0])  # the norm runs over V


def _sequential_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    c = _f64(case)
    W = c["W"].T if c.get("fan_in_fan_out") else c["W"]
    ads = [
        (np.asarray(ad.A, dtype=np.float64), np.asarray(ad.B, dtype=np.float64), np.asarray(ad.m, dtype=np.float64))
        for ad in c["adapters"]
    ]
    adapters = [(A, B, m, float(ad.scaling)) for (A, B, m), ad in zip(ads, c["adapters"], strict=True)]
    return {"out": bounds.dora_sequential_magnitude(c["x"], W, adapters, c.get("bias"))}


def _sequential_depth(case: Mapping[str, Any]) -> int:
    ads = case["adapters"]
    r_max = max((np.shape(ad.A)[0] for ad in ads), default=0)
    return bounds.dora_sequential_depth(np.shape(case["x"])[-1], r_max, len(ads))


# ---------------------------------------------------------------------------- equivalence classes

_M_CLASSES = ("value: m has a negative entry", "value: m has a zero entry")
_NORM_CLASSES = ("value: a row with a small norm (‖V_o‖ < 0.01: an ε added to the norm shows)",)
_ZERO_ROW = "value: a zero row (norm 0: allowed here)"
_LAYOUT_CLASSES = ("option: embedding=True (E (V, d), norm across the vocabulary)", "option: embedding=False")
_CONV_CLASSES = ("shape: Conv1d weight (out, in, k)", "shape: Conv2d weight (out, in, kh, kw)")
_BASE_CLASSES = ("option: unmerged_base given", "option: unmerged_base=None")
_MODE_CLASSES = ("option: mode=detached", "option: mode=full")
_STORE_CLASSES = tuple(f"option: dtype={d}" for d in _STORE_DTYPES)


def _dora_classes(c: Case) -> tuple[str, ...]:
    """The classes of a DoRA case: the LoRA layer's, plus magnitude, norm, layout and option classes."""
    w = c[_weight_key(c)]
    out: list[str] = []
    if np.ndim(w) > 2:
        out.append(_CONV_CLASSES[np.ndim(w) - 3])
        s = c["scaling"]
        out += [
            cls for cls, hit in zip(_S_CLASSES, (s == 0, s < 0, s > 0 and s != 1, abs(s) >= 64), strict=True) if hit
        ]
        out.append(f"dtype: {_dtype_name(w)} inputs")
        if "dtype" in c:
            out.append(f"option: dtype={c['dtype']}")
    else:
        if "E" not in c:  # embedding_forward classifies its own (V, d) shapes
            out += list(_linear_classes(c))
    if "embedding" in c:
        out.append(_LAYOUT_CLASSES[0] if c["embedding"] else _LAYOUT_CLASSES[1])
    if "m" in c:
        m = np.asarray(c["m"], dtype=np.float64)
        if (m < 0).any():
            out.append(_M_CLASSES[0])
        if (m == 0).any():
            out.append(_M_CLASSES[1])
    norms = _row_norms(c)[0]
    if ((norms > 0) & (norms < 0.01)).any():
        out.append(_NORM_CLASSES[0])
    if (norms == 0).any():
        out.append(_ZERO_ROW)
    if "mode" in c:
        out.append(f"option: mode={c['mode']}")
    if "m" in c and "dtype" in c and "weight_norm" not in c:  # merge
        out.append(_BASE_CLASSES[0] if c.get("unmerged_base") is not None else _BASE_CLASSES[1])
    return tuple(dict.fromkeys(out))


# ---------------------------------------------------------------------------- boundary cases


def _shrink_row(c: Case, row: int = 0, factor: float = 1e-3) -> None:
    """Scale output row ``row`` of W and B (in place, any layout) so ‖V_row‖ is small."""
    key = _weight_key(c)
    w = c[key]
    if w.ndim > 2 or not (c.get("fan_in_fan_out") or c.get("embedding")):
        w[row] = w[row] * factor
    else:
        w[:, row] = w[:, row] * factor
    c["B"][row] = c["B"][row] * factor


def _zero_row(c: Case, row: int = 0) -> None:
    _shrink_row(c, row, 0.0)


def _magnitudes(c: Case, rng: np.random.Generator, *, negative: bool, zero: bool) -> np.ndarray:
    n = _row_norms(c)[0]
    m = n * (1.0 + 0.25 * rng.standard_normal(n.size))
    if negative and m.size > 1:
        m[1] = -m[1]
    if zero and m.size > 2:
        m[-1] = 0.0
    return m


def _dora_linear_boundary(kind: str):
    """forward / backward boundary cases: the LoRA layer configurations plus DoRA's magnitudes and norms."""

    def build() -> list[Boundary]:
        cases = []
        for i, cfg in enumerate(_LINEAR_CONFIGS):
            c = _lin_case(i, cfg, grad=kind == "backward")
            if i % 3 == 1:
                _shrink_row(c, c["B"].shape[0] - 1)
            rng = np.random.default_rng(500 + i)
            c["m"] = _cast(_magnitudes(c, rng, negative=i % 2 == 0, zero=i % 4 == 0 and kind == "forward"), cfg.dtype)
            if kind == "backward":
                c["mode"] = ("detached", "full")[i % 2]
            cases.append((_label(i, cfg), c))
        return _bounds_of(cases, _dora_classes)

    return build


#: Weight-only configurations: (label, out, in, r, layout, dtype, scaling, conv kernel); layout is
#: "linear", "fifo", "embedding" (W is E (V, d) with V = in, d = out) or "conv".
_WEIGHT_CONFIGS = (
    ("b0", 5, 6, 1, "linear", "float64", 0.75, ()),
    ("b1", 21, 19, 19, "fifo", "float64", -1.5, ()),
    ("b2", 33, 40, 4, "linear", "float32", 2.0, ()),
    ("b3", 17, 24, 3, "embedding", "float64", 0.5, ()),
    ("b4", 16, 8, 8, "linear", "float16", 128.0, ()),
    ("b5", 12, 12, 5, "fifo", "bfloat16", 0.0, ()),
    ("b6", 35, 17, 6, "embedding", "float32", -80.0, ()),
    ("b7_conv1d", 6, 4, 2, "conv", "float64", 0.5, (3,)),
    ("b8_conv2d", 5, 3, 3, "conv", "float32", -1.25, (3, 3)),
    ("b9", 3, 5, 7, "linear", "float64", 0.5, ()),  # r > min(out, in)
    ("b10_conv1d", 2, 1, 4, "conv", "float64", 0.75, (3,)),  # r > min(out, in·k)
)


def _weight_case(i: int, cfg: tuple, *, key: str = "W") -> Case:
    _, o, n, r, layout, dt, s, ks = cfg
    rng = np.random.default_rng(700 + i)
    if layout == "conv":
        w = _normal(rng, (o, n, *ks))
        a, b = _normal(rng, (r, n, *ks), 0.5), _normal(rng, (o, r, *([1] * len(ks))), 0.5)
    else:
        w = _normal(rng, (n, o) if layout in ("fifo", "embedding") else (o, n))
        a, b = _normal(rng, (r, n), 0.5), _normal(rng, (o, r), 0.5)
    c: Case = {
        key: _cast(w, dt),
        "A": _cast(a, dt),
        "B": _cast(b, dt),
        "scaling": s,
        "fan_in_fan_out": layout == "fifo",
        "embedding": layout == "embedding",
    }
    return c


def _weight_boundary(kind: str):
    """weight_norm, direction, init_magnitude, merge, unmerge: every layout (Linear, Conv1D, Embedding,
    ConvNd), small-norm rows, zero rows where allowed, every storage dtype and the unmerged base."""
    import refimpl.dora as dora

    def build() -> list[Boundary]:
        cases = []
        for i, cfg in enumerate(_WEIGHT_CONFIGS):
            c = _weight_case(i, cfg)
            if i % 3 == 1:
                _shrink_row(c, 0)
            if kind in ("weight_norm", "init_magnitude") and i % 4 == 2:
                _zero_row(c, 1)
            if kind == "init_magnitude":
                c["dtype"] = None
            if kind in ("merge", "unmerge"):
                rng = np.random.default_rng(800 + i)
                m = _magnitudes(c, rng, negative=True, zero=kind == "merge" and i % 2 == 0)
                c["m"] = _cast(m, cfg[5])
                if kind == "merge":
                    c["dtype"] = None
                    if i in (2, 5, 7):  # W holds an earlier merged adapter: the norm is against the base
                        c["unmerged_base"] = c["W"]
                        c["W"] = _cast(np.asarray(c["W"], dtype=np.float64) * 1.25 + 0.125, cfg[5])
                else:
                    merged = dora.merge(
                        c["W"],
                        c["A"],
                        c["B"],
                        c["m"],
                        c["scaling"],
                        fan_in_fan_out=c["fan_in_fan_out"],
                        embedding=c["embedding"],
                    )
                    c = {
                        "W_merged": merged.W,
                        "A": c["A"],
                        "B": c["B"],
                        "m": c["m"],
                        "scaling": c["scaling"],
                        "weight_norm": merged.weight_norm,
                        "fan_in_fan_out": c["fan_in_fan_out"],
                        "embedding": c["embedding"],
                        "dtype": None,
                    }
            cases.append(
                (
                    f"{cfg[0]}_{cfg[4]}_out{cfg[1]}_in{cfg[2]}_r{cfg[3]}_s{cfg[6]:g}_{cfg[5]}"
                    + ("_base" if "unmerged_base" in c else ""),
                    c,
                )
            )
        if kind in ("merge", "unmerge", "init_magnitude"):
            base = cases[2][1]
            for dt in _STORE_DTYPES[1:]:
                cases.append((f"dtype_{dt}", {**base, "dtype": dt}))
        return _bounds_of(cases, _dora_classes)

    return build


def _weight_classes(kind: str) -> tuple[str, ...]:
    out = [*_W_CLASSES, *_FIFO_CLASSES, *_LAYOUT_CLASSES, *_CONV_CLASSES, *_S_CLASSES, *_DTYPE_CLASSES, *_NORM_CLASSES]
    if kind in ("weight_norm", "init_magnitude"):
        out.append(_ZERO_ROW)
    if kind in ("merge", "unmerge"):
        out.append(_M_CLASSES[0])
    if kind == "merge":
        out += [_M_CLASSES[1], *_BASE_CLASSES]
    if kind in ("merge", "unmerge", "init_magnitude"):
        out += _STORE_CLASSES
    return tuple(out)


def _linear_dora_classes(kind: str) -> tuple[str, ...]:
    out = [
        *_X_CLASSES,
        *_W_CLASSES,
        *_FIFO_CLASSES,
        *_DROP_CLASSES,
        *_S_CLASSES,
        *_DTYPE_CLASSES,
        *_NORM_CLASSES,
        _M_CLASSES[0],
    ]
    if kind == "forward":
        out += ["option: bias given", "option: no bias", _M_CLASSES[1]]
    else:
        out += _MODE_CLASSES
    return tuple(out)


_EMB_CLASSES = (*EMB_SHAPE_CLASSES, *_M_CLASSES, *_NORM_CLASSES)


def _embedding_classes(c: Case) -> tuple[str, ...]:
    return (*embedding_shape_classes(c), *_dora_classes(c))


def _embedding_boundary() -> list[Boundary]:
    configs = [
        ((), 7, 5, 1, 0.75, "float64"),
        ((9,), 40, 19, 19, -1.5, "float64"),
        ((3, 7), 33, 48, 4, 2.0, "float32"),
        ((20,), 6, 35, 6, 0.0, "float16"),
        ((2, 2), 12, 12, 3, 96.0, "bfloat16"),
        ((5,), 6, 4, 9, 0.5, "float64"),
    ]
    out = []
    for i, (shape, vocab, dim, r, s, dt) in enumerate(configs):
        rng = np.random.default_rng(900 + i)
        ids = rng.integers(0, vocab, size=shape)
        if ids.ndim:
            flat = ids.reshape(-1)
            flat[0], flat[-1] = 0, vocab - 1
            if flat.size > 2:
                flat[1] = flat[-1]
        c = {
            "ids": ids.astype(np.int64),
            "E": _normal(rng, (vocab, dim)),
            "A": _normal(rng, (r, vocab), 0.5),
            "B": _normal(rng, (dim, r), 0.5),
            "scaling": s,
        }
        if i % 2:
            _shrink_row({**c, "embedding": True}, 0)
        c["m"] = _magnitudes(c, rng, negative=True, zero=i % 2 == 0)
        c = {k: (_cast(v, dt) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v) for k, v in c.items()}
        out.append((f"b{i}_ids{'x'.join(map(str, shape)) or '0d'}_V{vocab}_d{dim}_r{r}_s{s:g}_{dt}", c))
    return _bounds_of(out, _embedding_classes)


_SEQ_CLASSES = (
    "shape: one adapter",
    "shape: two adapters",
    "shape: three adapters",
    *_X_CLASSES,
    "shape: in > 16 and in % 16 != 0 (a remainder after vector width 16)",
    "shape: out > 16 and out % 16 != 0 (a remainder after vector width 16)",
    *_FIFO_CLASSES,
    "option: bias given",
    "option: no bias",
    "value: adapters of different ranks",
    "value: a negative scaling",
    _M_CLASSES[0],
    *_DTYPE_CLASSES,
    "shape: an adapter with r > min(in, out)",
)


def _sequential_classes(c: Case) -> tuple[str, ...]:
    ads = c["adapters"]
    x = c["x"]
    rows = int(np.prod(x.shape[:-1]))
    n_in = x.shape[-1]
    n_out = np.shape(ads[0].B)[0]
    out = [
        ("shape: one adapter", "shape: two adapters", "shape: three adapters")[min(len(ads), 3) - 1],
        {1: _X_CLASSES[0], 2: _X_CLASSES[1]}.get(x.ndim, _X_CLASSES[2]),
        _FIFO_CLASSES[int(bool(c.get("fan_in_fan_out")))],
        "option: bias given" if c.get("bias") is not None else "option: no bias",
        f"dtype: {_dtype_name(x)} inputs",
    ]
    if rows == 1:
        out.append(_X_CLASSES[3])
    if rows > 16:
        out.append(_X_CLASSES[4])
    if n_in > 16 and n_in % 16:
        out.append("shape: in > 16 and in % 16 != 0 (a remainder after vector width 16)")
    if n_out > 16 and n_out % 16:
        out.append("shape: out > 16 and out % 16 != 0 (a remainder after vector width 16)")
    if len({np.shape(ad.A)[0] for ad in ads}) > 1:
        out.append("value: adapters of different ranks")
    if any(np.shape(ad.A)[0] > min(n_in, n_out) for ad in ads):
        out.append("shape: an adapter with r > min(in, out)")
    if any(ad.scaling < 0 for ad in ads):
        out.append("value: a negative scaling")
    if any((np.asarray(ad.m, dtype=np.float64) < 0).any() for ad in ads):
        out.append(_M_CLASSES[0])
    return tuple(out)


def _sequential_boundary() -> list[Boundary]:
    from refimpl.dora import DoraAdapter

    configs = [
        ((), 6, 5, (1,), False, True, "float64"),
        ((1,), 19, 21, (2, 5), True, False, "float64"),
        ((2, 3), 40, 33, (4, 4, 1), False, True, "float32"),
        ((33,), 24, 17, (3, 3), True, True, "float16"),
        ((4,), 12, 12, (2,), False, False, "bfloat16"),
        ((3,), 3, 4, (2, 6), True, True, "float64"),
    ]
    out = []
    for i, (lead, n_in, n_out, ranks, fifo, bias, dt) in enumerate(configs):
        rng = np.random.default_rng(1100 + i)
        w = _normal(rng, (n_in, n_out) if fifo else (n_out, n_in))
        c: Case = {"x": _cast(_normal(rng, (*lead, n_in)), dt), "W": _cast(w, dt)}
        ads = []
        for j, r in enumerate(ranks):
            ad: dict[str, Any] = {
                "A": _normal(rng, (r, n_in), 0.5),
                "B": _normal(rng, (n_out, r), 0.5),
                "scaling": (0.75, -1.5, 2.0)[j],
            }
            ad["m"] = _magnitudes({**ad, "W": w, "fan_in_fan_out": fifo}, rng, negative=j == 0, zero=False)
            fields: dict[str, Any] = {k: (_cast(v, dt) if isinstance(v, np.ndarray) else v) for k, v in ad.items()}
            ads.append(DoraAdapter(**fields))
        c["adapters"] = ads
        if bias:
            c["bias"] = _cast(_normal(rng, (n_out,)), dt)
        c["fan_in_fan_out"] = fifo
        out.append(
            (
                f"b{i}_x{'x'.join(map(str, (*lead, n_in)))}_out{n_out}_ranks{'-'.join(map(str, ranks))}"
                f"{'_fifo' if fifo else ''}{'_bias' if bias else ''}_{dt}",
                c,
            )
        )
    return _bounds_of(out, _sequential_classes)


def _sequential_zero_row() -> Case:
    """The first boundary case with a second adapter whose W + s·B A has a zero row (the reference raises)."""
    from refimpl.dora import DoraAdapter

    c = _sequential_boundary()[0].case
    w = np.asarray(c["W"], dtype=np.float64)
    ad = c["adapters"][0]
    b = np.array(ad.B, dtype=np.float64)
    b[0] = 0.0
    a = np.array(ad.A, dtype=np.float64)
    w2 = w.copy()
    w2[0] = 0.0
    return {**c, "W": w2, "adapters": [*c["adapters"], DoraAdapter(A=a, B=b, m=ad.m, scaling=ad.scaling)]}


_COUNT_CLASSES = (
    "option: kernel_size=() (Linear, Embedding)",
    "option: kernel_size 1-D (Conv1d)",
    "option: kernel_size 2-D (Conv2d)",
    "option: kernel_size 3-D (Conv3d)",
    "option: groups=1",
    "option: groups > 1",
    "shape: r = 1",
    "shape: in != out",
)


def _count_classes(c: Case) -> tuple[str, ...]:
    ks = c["kernel_size"]
    out = [_COUNT_CLASSES[len(ks)], "option: groups=1" if c["groups"] == 1 else "option: groups > 1"]
    if c["r"] == 1:
        out.append("shape: r = 1")
    if c["in_features"] != c["out_features"]:
        out.append("shape: in != out")
    return tuple(out)


def _count_boundary() -> list[Boundary]:
    cases = [(10, 6, 4, (), 1), (20, 6, 1, (), 1), (3, 4, 2, (3,), 1), (8, 12, 4, (3, 3), 2), (4, 4, 8, (3, 3, 3), 4)]
    return _bounds_of(
        [
            (
                f"in{i}_out{o}_r{r}_k{'x'.join(map(str, ks)) or 'none'}_g{g}",
                {"in_features": i, "out_features": o, "r": r, "kernel_size": ks, "groups": g},
            )
            for i, o, r, ks, g in cases
        ],
        _count_classes,
    )


def _with_first(a: np.ndarray, value: float) -> np.ndarray:
    """A copy of ``a`` with its first element replaced."""
    out = np.array(a, dtype=np.float64)
    out.flat[0] = value
    return out


def rows() -> list[OpSpec]:
    fwd_ex = lambda: dict(_golden(np.random.default_rng(0))[0][1])  # noqa: E731
    norm_ex = lambda: dict(_golden(np.random.default_rng(0), with_x=False, with_m=False)[0][1])  # noqa: E731
    merge_ex = lambda: dict(_golden(np.random.default_rng(0), with_x=False)[0][1])  # noqa: E731

    def grad_golden(rng: np.random.Generator) -> list[tuple[str, Case]]:
        out = []
        for i, (label, c) in enumerate(_golden(rng)):
            c = {k: v for k, v in c.items() if k != "bias"}
            c["grad_y"] = rng.integers(-64, 65, size=(*c["x"].shape[:-1], c["B"].shape[0])) / 32.0
            c["mode"] = ("detached", "full")[i % 2]
            out.append((label, c))
        return out

    def unmerge_golden(rng: np.random.Generator) -> list[tuple[str, Case]]:
        import refimpl.dora as dora

        out = []
        for label, c in _golden(rng, with_x=False):
            m = np.where(c["m"] == 0, 1.0, c["m"])
            merged = dora.merge(c["W"], c["A"], c["B"], m, c["scaling"], fan_in_fan_out=c["fan_in_fan_out"])
            out.append(
                (
                    label,
                    {
                        "W_merged": merged.W,
                        "A": c["A"],
                        "B": c["B"],
                        "m": m,
                        "scaling": c["scaling"],
                        "weight_norm": merged.weight_norm,
                        "fan_in_fan_out": c["fan_in_fan_out"],
                    },
                )
            )
        return out

    def embedding_golden(rng: np.random.Generator) -> list[tuple[str, Case]]:
        from refimpl.conformance.strategies import dyadic

        out = []
        for i, (vocab, dim, r, ids_shape) in enumerate([(10, 6, 2, (4,)), (32, 16, 8, (2, 5))]):
            E = dyadic(rng, (vocab, dim))
            E[0] = 1.0  # every column non-zero: the norm across the vocabulary is defined
            out.append(
                (
                    f"case{i}_V{vocab}_d{dim}_r{r}",
                    {
                        "ids": rng.integers(0, vocab, size=ids_shape).astype(np.int64),
                        "E": E,
                        "A": dyadic(rng, (r, vocab)),
                        "B": dyadic(rng, (dim, r)),
                        "m": dyadic(rng, (dim,)),
                        "scaling": (0.5, 0.25)[i],
                    },
                )
            )
        return out

    def weight_only():
        return lambda rng: [
            (label, {k: c[k] for k in ("W", "A", "B", "scaling", "fan_in_fan_out")})
            for label, c in _golden(rng, with_x=False, with_m=False)
        ]

    unmerge_ex = lambda: dict(unmerge_golden(np.random.default_rng(0))[0][1])  # noqa: E731
    grad_ex = lambda: dict(grad_golden(np.random.default_rng(0))[0][1])  # noqa: E731
    emb_ex = lambda: dict(embedding_golden(np.random.default_rng(0))[0][1])  # noqa: E731
    count_ex = {"in_features": 10, "out_features": 6, "r": 4}
    return [
        OpSpec(
            "dora.weight_norm",
            lambda: _strategy(with_x=False, with_m=False, options="norm"),
            "W (out, in) (or (in, out) with fan_in_fan_out, E (V, d) with embedding, (out, in, *k) for ConvNd), "
            "A (r, in), B (out, r), scaling finite; a zero row is allowed (norm 0)",
            Bounded(lambda c: bounds.dora_norm_depth(*_reduction_len(c)), _norm_magnitude),
            golden=lambda rng: _golden(rng, with_x=False, with_m=False),
            specials=lambda: _specials(norm_ex, ("W", "A")),
            classes=_weight_classes("weight_norm"),
            boundary=_weight_boundary("weight_norm"),
        ),
        OpSpec(
            "dora.forward",
            _strategy,
            "as lora.forward plus m (out,); every row of W + s·B A non-zero",
            Bounded(_forward_depth, _forward_magnitude),
            golden=_golden,
            specials=lambda: _specials(fwd_ex, ("x", "W", "m")),
            classes=_linear_dora_classes("forward"),
            boundary=_dora_linear_boundary("forward"),
        ),
        OpSpec(
            "dora.merge",
            lambda: _strategy(with_x=False, options="merge"),
            "W, A, B, m (out,), scaling in any layout of weight_norm; optional unmerged_base (W's shape) that the "
            "norm is taken against; dtype None or a storage format; every row of W_base + s·B A non-zero",
            StoredBounded(_weight_depth, _merge_magnitude, stored=_stored("merge")),
            golden=lambda rng: _golden(rng, with_x=False),
            specials=lambda: _specials(merge_ex, ("W", "m")),
            classes=_weight_classes("merge"),
            boundary=_weight_boundary("merge"),
        ),
        OpSpec(
            "dora.unmerge",
            _unmerge_strategy,
            "W_merged, A, B, m (no zero entry), scaling and the weight_norm merge returned (positive), any layout "
            "of weight_norm; dtype None or a storage format",
            StoredBounded(
                lambda c: bounds.dora_unmerge_depth(_reduction_len(c)[1]), _unmerge_magnitude, stored=_stored("unmerge")
            ),
            golden=unmerge_golden,
            specials=lambda: [
                *(
                    Special(f"{a} has {lbl}", {**unmerge_ex(), a: _with_first(unmerge_ex()[a], v)})
                    for a in ("W_merged", "m")
                    for lbl, v in (("nan", np.nan), ("inf", np.inf))
                ),
                Special("m has a zero", {**unmerge_ex(), "m": np.zeros_like(unmerge_ex()["m"])}),
                Special(
                    "weight_norm has a zero",
                    {**unmerge_ex(), "weight_norm": np.zeros_like(unmerge_ex()["weight_norm"])},
                ),
            ],
            classes=_weight_classes("unmerge"),
            boundary=_weight_boundary("unmerge"),
        ),
        OpSpec(
            "dora.direction",
            lambda: _strategy(with_x=False, with_m=False, options="norm"),
            "as weight_norm; every row of W + s·B A non-zero",
            Bounded(_weight_depth, _direction_magnitude),
            golden=weight_only(),
            specials=lambda: _specials(norm_ex, ("W", "A")),
            classes=_weight_classes("direction"),
            boundary=_weight_boundary("direction"),
        ),
        OpSpec(
            "dora.init_magnitude",
            lambda: _strategy(with_x=False, with_m=False, options="magnitude"),
            "as weight_norm; dtype None (float64) or the base storage format PEFT computes m in",
            StoredBounded(
                lambda c: bounds.dora_norm_depth(*_reduction_len(c)), _norm_magnitude, stored=_magnitude_stored
            ),
            golden=weight_only(),
            specials=lambda: _specials(norm_ex, ("W", "A")),
            classes=_weight_classes("init_magnitude"),
            boundary=_weight_boundary("init_magnitude"),
        ),
        OpSpec(
            "dora.backward",
            lambda: _strategy(grad=True),
            "as forward (no bias) plus grad_y (..., out) and mode detached / full",
            Bounded(_backward_depth, _backward_magnitude),
            golden=grad_golden,
            specials=lambda: [
                *_specials(grad_ex, ("x", "W", "m", "grad_y")),
                Special("unknown mode", {**grad_ex(), "mode": "exact"}),
            ],
            classes=_linear_dora_classes("backward"),
            boundary=_dora_linear_boundary("backward"),
        ),
        OpSpec(
            "dora.embedding_forward",
            _embedding_strategy,
            "ids integer array (any shape) in [0, V), E (V, d), A (r, V), B (d, r), m (d,), every column of "
            "E + s·(B A)ᵀ non-zero",
            Bounded(_embedding_depth, _embedding_magnitude),
            golden=embedding_golden,
            specials=lambda: [
                *(
                    Special(f"{a} has {lbl}", {**emb_ex(), a: _with_first(emb_ex()[a], v)})
                    for a in ("E", "m")
                    for lbl, v in (("nan", np.nan), ("inf", np.inf))
                ),
                Special("ids out of range", {**emb_ex(), "ids": np.array([10], dtype=np.int64)}),
                Special("float ids", {**emb_ex(), "ids": np.array([1.0])}),
                Special(
                    "a column of E + ΔE is zero",
                    {**emb_ex(), "E": np.zeros_like(emb_ex()["E"]), "B": np.zeros_like(emb_ex()["B"])},
                ),
            ],
            classes=_EMB_CLASSES,
            boundary=_embedding_boundary,
        ),
        _RowWithoutVectors(
            "dora.forward_sequential",
            _sequential_strategy,
            "x (..., in), W, adapters a non-empty list of DoraAdapter(A, B, m, scaling) of W's shape, optional bias; "
            "every row of W + s_i·B_i A_i non-zero",
            Bounded(_sequential_depth, _sequential_magnitude),
            tiers=_NO_GOLDEN,
            specials=lambda: [
                Special("no adapters", {**_sequential_boundary()[0].case, "adapters": []}),
                Special("an adapter as a tuple", {**_sequential_boundary()[0].case, "adapters": [(1.0, 2.0)]}),
                Special("a row of W + s·B A is zero", _sequential_zero_row()),
            ],
            classes=_SEQ_CLASSES,
            boundary=_sequential_boundary,
        ),
        OpSpec(
            "dora.param_count",
            _param_count_strategy,
            "in, out, r ≥ 1; kernel_size () or ConvNd sizes ≥ 1; groups ≥ 1 dividing r (groups only with a kernel)",
            Exact(),
            golden=lambda rng: [
                ("linear_10_6_r4", {**count_ex, "kernel_size": (), "groups": 1}),
                ("conv2d_g2", {"in_features": 8, "out_features": 12, "r": 4, "kernel_size": (3, 3), "groups": 2}),
            ],
            specials=lambda: [
                Special("groups without a kernel", {**count_ex, "kernel_size": (), "groups": 2}),
                Special("r not a multiple of groups", {**count_ex, "kernel_size": (3,), "groups": 3}),
                Special("r is 0", {**count_ex, "r": 0, "kernel_size": (), "groups": 1}),
            ],
            classes=_COUNT_CLASSES,
            boundary=_count_boundary,
        ),
    ]
