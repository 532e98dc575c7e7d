"""Op rows for refimpl.dora (spec/dora.md; DoRA arXiv 2402.09353).

Bounds: with V = W + s·B A, Vabs = |W| + |s|·|B||A| and the row condition number
κ = ‖Vabs‖ / ‖V‖ (≥ 1; large when W and s·B A cancel), every computed quantity
of the formula is within γ_K of exact relative to the terms below (Higham §3.1):

    ‖V‖:        |δn| ≤ γ_K ‖Vabs‖
    f = m/‖V‖:  |δf| ≤ γ_K |f| κ
    eval y:     |δy| ≤ γ_K (|f| |x| Vabsᵀ + |f| κ |x Vᵀ| + |b|)
    train y:    |δy| ≤ γ_K (|x||W|ᵀ + |b| + (|f|+1)|x_d||W|ᵀ + |f||s||x_d||A|ᵀ|B|ᵀ + |f| κ (|x_d Wᵀ| + |s x_d Aᵀ Bᵀ|))
    merge W':   |δW'| ≤ γ_K |f| (Vabs + κ |V|)
"""

from __future__ import annotations

import numpy as np

from refimpl.conformance.table import Case, OpSpec, Special
from refimpl.conformance.tolerance import Bounded


def _layer(case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(V, Vabs, W, s) in (out, in) layout."""
    W = case["W"].T if case.get("fan_in_fan_out") else case["W"]
    A, B, s = case["A"], case["B"], float(case["scaling"])
    return W + s * (B @ A), np.abs(W) + abs(s) * (np.abs(B) @ np.abs(A)), W, s


def _row_norms(case: Case) -> tuple[np.ndarray, np.ndarray]:
    V, Vabs, _, _ = _layer(case)
    return np.linalg.norm(V, axis=1), np.linalg.norm(Vabs, axis=1)


def _strategy(*, with_x: bool = True, with_m: bool = True):
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        n_in, n_out = draw(rs.dims(1, 6)), draw(rs.dims(1, 6))
        r = draw(st.integers(1, min(n_in, n_out)))
        fifo = draw(st.booleans())
        c: Case = {}
        if with_x:
            lead = tuple(draw(st.lists(rs.dims(1, 3), min_size=1, max_size=2)))
            c["x"] = draw(rs.float_arrays((*lead, n_in)))
        c["W"] = draw(rs.float_arrays((n_in, n_out) if fifo else (n_out, n_in)))
        c["A"] = draw(rs.float_arrays((r, n_in)))
        c["B"] = draw(rs.float_arrays((n_out, r)))
        if with_m:
            c["m"] = draw(rs.float_arrays((n_out,)))
        c["scaling"] = draw(rs.reals(-4.0, 4.0))
        if with_x:
            if draw(st.booleans()):
                c["bias"] = draw(rs.float_arrays((n_out,)))
            if draw(st.booleans()):
                c["dropout_mask"] = draw(rs.keep_masks(c["x"].shape))
                c["dropout_p"] = draw(st.sampled_from([0.0, 0.1, 0.5]))
        c["fan_in_fan_out"] = fifo
        return c

    # zero-norm rows are outside the domain (the reference raises; spec/dora.md)
    return build().filter(lambda c: bool((_row_norms(c)[0] > 0).all()))


def _golden(rng: np.random.Generator, *, with_x: bool = True, with_m: bool = True) -> list[tuple[str, Case]]:
    from refimpl.conformance.strategies import dyadic

    out = []
    for i, (lead, n_in, n_out, r, fifo, drop) in enumerate([((2, 4), 6, 5, 2, False, False),
                                                            ((3,), 8, 8, 4, True, True),
                                                            ((4,), 16, 12, 8, False, True)]):
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


def _forward_magnitude(case: Case) -> dict[str, np.ndarray]:
    V, Vabs, W, s = _layer(case)
    n, nabs = np.linalg.norm(V, axis=1), np.linalg.norm(Vabs, axis=1)
    kappa, f = nabs / n, np.asarray(case["m"]) / n
    x, A, B = case["x"], case["A"], case["B"]
    b = np.abs(case["bias"]) if case.get("bias") is not None else 0.0
    # the train form's terms; in eval (x_d = x) PEFT evaluates that same form, base + (f − 1)·base + f·lora,
    # whose (f − 1)·base term can dwarf f·(x Vᵀ), so the eval bound adds the paper form's terms to it
    xd = x if case.get("dropout_mask") is None else x * case["dropout_mask"] / (1.0 - case.get("dropout_p", 0.0))
    P, Q = xd @ W.T, s * ((xd @ A.T) @ B.T)
    mag = (np.abs(x) @ np.abs(W).T + b + (np.abs(f) + 1) * (np.abs(xd) @ np.abs(W).T)
           + np.abs(f) * abs(s) * ((np.abs(xd) @ np.abs(A).T) @ np.abs(B).T)
           + np.abs(f) * kappa * (np.abs(P) + np.abs(Q)))
    if case.get("dropout_mask") is None:
        mag = mag + np.abs(f) * (np.abs(x) @ Vabs.T) + np.abs(f) * kappa * np.abs(x @ V.T)
    return {"out": mag}


def _merge_magnitude(case: Case) -> dict[str, np.ndarray]:
    V, Vabs, _, _ = _layer(case)
    n, nabs = np.linalg.norm(V, axis=1), np.linalg.norm(Vabs, axis=1)
    f = np.abs(np.asarray(case["m"]) / n)
    w = f[:, None] * (Vabs + (nabs / n)[:, None] * np.abs(V))
    return {"out.W": w.T if case.get("fan_in_fan_out") else w, "out.weight_norm": nabs}


def _depth(case: Case) -> int:
    r, n_in = case["A"].shape
    return n_in + r + 8  # r-term product, add, in-term sum of squares, sqrt, divide, in-term dot, adds


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


def rows() -> list[OpSpec]:
    fwd_ex = lambda: dict(_golden(np.random.default_rng(0))[0][1])  # noqa: E731
    norm_ex = lambda: dict(_golden(np.random.default_rng(0), with_x=False, with_m=False)[0][1])  # noqa: E731
    merge_ex = lambda: dict(_golden(np.random.default_rng(0), with_x=False)[0][1])  # noqa: E731
    return [
        OpSpec("dora.weight_norm", lambda: _strategy(with_x=False, with_m=False),
               "W (out, in) (or (in, out) with fan_in_fan_out), A (r, in), B (out, r), scaling finite",
               Bounded(lambda c: c["A"].shape[1] + c["A"].shape[0] + 4, lambda c: {"out": _row_norms(c)[1]}),
               golden=lambda rng: _golden(rng, with_x=False, with_m=False),
               specials=lambda: _specials(norm_ex, ("W", "A"))),
        OpSpec("dora.forward", _strategy,
               "as lora.forward plus m (out,); every row of W + s·B A non-zero",
               Bounded(_depth, _forward_magnitude), golden=_golden,
               specials=lambda: _specials(fwd_ex, ("x", "W", "m"))),
        OpSpec("dora.merge", lambda: _strategy(with_x=False),
               "W, A, B, m (out,), scaling; every row of W + s·B A non-zero",
               Bounded(_depth, _merge_magnitude), golden=lambda rng: _golden(rng, with_x=False),
               specials=lambda: _specials(merge_ex, ("W", "m"))),
    ]
