"""Op rows for refimpl.lora (spec/lora.md; LoRA arXiv 2106.09685, rsLoRA arXiv 2312.03732)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from refimpl.conformance.table import Case, OpSpec, Special, abs_case
from refimpl.conformance.tolerance import Bounded, Exact

_SCALINGS_EXACT = (0.25, 0.5, 1.0, 2.0)  # powers of two keep golden products exact
_P_EXACT = (0.0, 0.5, 0.75)  # 1/(1-p) is a power of two


def _ref(name: str):
    import refimpl.lora as lora

    return getattr(lora, name)


def _flat(result: Any) -> dict[str, np.ndarray]:
    from refimpl.conformance._values import flatten

    return flatten(result)


# ---------------------------------------------------------------------------- strategies


def _linear_strategy(*, grad: bool = False, with_x: bool = True, merged: bool = False):
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        n_in, n_out = draw(rs.dims(1, 6)), draw(rs.dims(1, 6))
        r = draw(st.integers(1, min(n_in, n_out)))
        fifo = draw(st.booleans())
        case: Case = {}
        if with_x:
            lead = tuple(draw(st.lists(rs.dims(1, 3), min_size=1, max_size=2)))
            case["x"] = draw(rs.float_arrays((*lead, n_in)))
        wshape = (n_in, n_out) if fifo else (n_out, n_in)
        case["W_merged" if merged else "W"] = draw(rs.float_arrays(wshape))
        case["A"] = draw(rs.float_arrays((r, n_in)))
        case["B"] = draw(rs.float_arrays((n_out, r)))
        if grad:
            case["grad_y"] = draw(rs.float_arrays((*case["x"].shape[:-1], n_out)))
        case["scaling"] = draw(rs.reals(-4.0, 4.0))
        if with_x:
            if not grad and draw(st.booleans()):
                case["bias"] = draw(rs.float_arrays((n_out,)))
            if draw(st.booleans()):
                case["dropout_mask"] = draw(rs.keep_masks(case["x"].shape))
                case["dropout_p"] = draw(st.sampled_from([0.0, 0.1, 0.5, 0.75]))
        case["fan_in_fan_out"] = fifo
        if grad:
            case["need_dW"] = draw(st.booleans())
            case["need_dbias"] = draw(st.booleans())
        return case

    return build()


def _scaling_strategy():
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    return st.fixed_dictionaries({"alpha": rs.reals(-64.0, 64.0), "r": st.integers(1, 256),
                                  "use_rslora": st.booleans()})


def _embedding_strategy():
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        vocab, dim = draw(rs.dims(1, 8)), draw(rs.dims(1, 6))
        r = draw(st.integers(1, min(vocab, dim)))
        ids_shape = tuple(draw(st.lists(rs.dims(1, 4), min_size=1, max_size=2)))
        ids = np.asarray(draw(st.lists(st.integers(0, vocab - 1), min_size=int(np.prod(ids_shape)),
                                       max_size=int(np.prod(ids_shape)))), dtype=np.int64).reshape(ids_shape)
        return {"ids": ids, "E": draw(rs.float_arrays((vocab, dim))), "A": draw(rs.float_arrays((r, vocab))),
                "B": draw(rs.float_arrays((dim, r))), "scaling": draw(rs.reals(-4.0, 4.0))}

    return build()


def _param_count_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        n_in, n_out = draw(st.integers(1, 8192)), draw(st.integers(1, 8192))
        return {"in_features": n_in, "out_features": n_out, "r": draw(st.integers(1, min(n_in, n_out, 512))),
                "lora_bias": draw(st.booleans()), "dora": draw(st.booleans())}

    return build()


# ---------------------------------------------------------------------------- golden cases (exact inputs)


def _golden_linear(rng: np.random.Generator, *, grad: bool = False, with_x: bool = True,
                   merged: bool = False) -> list[tuple[str, Case]]:
    from refimpl.conformance.strategies import dyadic

    cases = []
    shapes = [((2, 4), 6, 5, 2, False, False), ((3,), 8, 8, 4, True, False), ((2, 3, 8), 8, 16, 8, False, True),
              ((5,), 32, 24, 16, True, True)]
    for i, (lead, n_in, n_out, r, fifo, drop) in enumerate(shapes):
        c: Case = {}
        if with_x:
            c["x"] = dyadic(rng, (*lead, n_in))
        c["W_merged" if merged else "W"] = dyadic(rng, (n_in, n_out) if fifo else (n_out, n_in))
        c["A"], c["B"] = dyadic(rng, (r, n_in)), dyadic(rng, (n_out, r))
        if grad:
            c["grad_y"] = dyadic(rng, (*lead, n_out))
        c["scaling"] = _SCALINGS_EXACT[i % len(_SCALINGS_EXACT)]
        if with_x and not grad and i % 2 == 0:
            c["bias"] = dyadic(rng, (n_out,))
        if with_x and drop:
            c["dropout_mask"] = (rng.random(c["x"].shape) >= 0.5).astype(np.float64)
            c["dropout_p"] = _P_EXACT[1 + i % 2]
        c["fan_in_fan_out"] = fifo
        if grad:
            c["need_dW"] = True
            c["need_dbias"] = True
        cases.append((f"case{i}_in{n_in}_out{n_out}_r{r}" + ("_fifo" if fifo else "") + ("_drop" if drop else ""), c))
    return cases


def _golden_embedding(rng: np.random.Generator) -> list[tuple[str, Case]]:
    from refimpl.conformance.strategies import dyadic

    out = []
    for i, (vocab, dim, r, ids_shape) in enumerate([(10, 6, 2, (4,)), (32, 16, 8, (2, 5))]):
        out.append((f"case{i}_V{vocab}_d{dim}_r{r}", {
            "ids": rng.integers(0, vocab, size=ids_shape).astype(np.int64), "E": dyadic(rng, (vocab, dim)),
            "A": dyadic(rng, (r, vocab)), "B": dyadic(rng, (dim, r)), "scaling": _SCALINGS_EXACT[i]}))
    return out


# ---------------------------------------------------------------------------- bounds


def _reduction(case: Case) -> tuple[int, int, int, int]:
    a = case["A"]
    r, n_in = a.shape
    n_out = case["B"].shape[0]
    n_rows = int(np.prod(case["x"].shape[:-1])) if "x" in case else 1
    return n_in, n_out, r, n_rows


def _magnitude_of(name: str, **renames: str):
    def mag(case: Case) -> dict[str, np.ndarray]:
        c = abs_case(case)
        for old, new in renames.items():
            c[new] = c.pop(old)
        return _flat(_ref(name)(**c))

    return mag


def _specials(name: str, array_args: tuple[str, ...], example) -> list[Special]:
    """NaN and ±inf in each float argument, -0.0 in one; zero factors."""
    base = example()
    out: list[Special] = []
    for arg in array_args:
        if arg not in base:
            continue
        for label, val in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
            c = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in base.items()}
            if isinstance(c[arg], np.ndarray):
                c[arg].flat[0] = val
            else:
                c[arg] = val
            out.append(Special(f"{arg} has {label}", c))
    if "B" in base:
        c = dict(base)
        c["B"] = np.zeros_like(base["B"])
        out.append(Special("B is zero (adapter at init)", c))
    if "A" in base:
        c = dict(base)
        c["A"] = np.full_like(base["A"], -0.0)
        out.append(Special("A is all -0.0", c))
    return out


def rows() -> list[OpSpec]:
    def linear_depth(case: Case) -> int:
        n_in, _, r, _ = _reduction(case)
        return n_in + r + 6  # in-term dot, r-term dot, scaling, dropout scale, bias and branch adds

    def backward_depth(case: Case) -> int:
        n_in, n_out, r, n_rows = _reduction(case)
        return n_in + n_out + r + n_rows + 6  # every reduction on the longest path, plus scalings

    def ex(name: str, **kw):
        return lambda: dict(_golden_linear(np.random.default_rng(0), **kw)[0][1])

    fwd = ("x", "W", "A", "B", "scaling", "bias")
    return [
        OpSpec(
            "lora.scaling", _scaling_strategy, "alpha finite real, r ≥ 1, use_rslora bool",
            Bounded(lambda c: 2, lambda c: {"out": np.asarray(_ref("scaling")(abs(c["alpha"]), c["r"],
                                                                             use_rslora=c["use_rslora"]))},
                    note="α/r or α/√r: ≤ 2 roundings"),
            golden=lambda rng: [(f"alpha{a}_r{r}_rs{int(rs)}", {"alpha": a, "r": r, "use_rslora": rs})
                                for a, r, rs in ((16.0, 8, False), (16.0, 8, True), (32.0, 64, True), (8.0, 3, False))],
            specials=lambda: [Special("alpha is nan", {"alpha": math.nan, "r": 8, "use_rslora": False}),
                              Special("alpha is inf", {"alpha": math.inf, "r": 8, "use_rslora": False}),
                              Special("r is 0", {"alpha": 8.0, "r": 0, "use_rslora": False}),
                              Special("alpha is 0", {"alpha": 0.0, "r": 4, "use_rslora": True})],
        ),
        OpSpec(
            "lora.delta", lambda: _linear_strategy(with_x=False).map(
                lambda c: {k: c[k] for k in ("A", "B", "scaling", "fan_in_fan_out")}),
            "A (r, in), B (out, r), 1 ≤ r ≤ min(in, out), scaling finite",
            Bounded(lambda c: c["A"].shape[0] + 2, _magnitude_of("delta")),
            golden=lambda rng: [(n, {k: c[k] for k in ("A", "B", "scaling", "fan_in_fan_out")})
                                for n, c in _golden_linear(rng, with_x=False)],
            specials=lambda: _specials("delta", ("A", "B", "scaling"),
                                       lambda: {k: v for k, v in ex("delta", with_x=False)().items()
                                                if k in ("A", "B", "scaling", "fan_in_fan_out")}),
        ),
        OpSpec(
            "lora.forward", _linear_strategy,
            "x (..., in), W (out, in) or (in, out) with fan_in_fan_out, A (r, in), B (out, r), "
            "r ≤ min(in, out); optional bias (out,), 0/1 dropout_mask of x's shape, dropout_p in [0, 1)",
            Bounded(linear_depth, _magnitude_of("forward")),
            golden=_golden_linear,
            specials=lambda: _specials("forward", fwd, ex("forward")),
        ),
        OpSpec(
            "lora.backward", lambda: _linear_strategy(grad=True),
            "as forward, plus grad_y (..., out); need_dW / need_dbias flags",
            Bounded(backward_depth, _magnitude_of("backward")),
            golden=lambda rng: _golden_linear(rng, grad=True),
            specials=lambda: _specials("backward", ("x", "W", "A", "B", "grad_y"), ex("backward", grad=True)),
        ),
        OpSpec(
            "lora.merge", lambda: _linear_strategy(with_x=False),
            "W (out, in) or (in, out) with fan_in_fan_out, A (r, in), B (out, r); float64 result (dtype=None)",
            Bounded(lambda c: c["A"].shape[0] + 3, _magnitude_of("merge")),
            golden=lambda rng: _golden_linear(rng, with_x=False),
            specials=lambda: _specials("merge", ("W", "A", "B", "scaling"), ex("merge", with_x=False)),
        ),
        OpSpec(
            "lora.unmerge", lambda: _linear_strategy(with_x=False, merged=True),
            "as merge, with W_merged in place of W",
            # |W' − ΔW| is bounded by the merge of the absolute values, |W'| + |s|·|B||A|
            Bounded(lambda c: c["A"].shape[0] + 3, _magnitude_of("merge", W_merged="W")),
            golden=lambda rng: _golden_linear(rng, with_x=False, merged=True),
            specials=lambda: _specials("unmerge", ("W_merged", "A", "B"), ex("unmerge", with_x=False, merged=True)),
        ),
        OpSpec(
            "lora.embedding_forward", _embedding_strategy,
            "ids integer array in [0, V), E (V, d), A (r, V), B (d, r), r ≤ min(V, d)",
            Bounded(lambda c: c["A"].shape[0] + 3, _magnitude_of("embedding_forward")),
            golden=_golden_embedding,
            specials=lambda: [
                *_specials("embedding_forward", ("E", "A", "B"),
                           lambda: dict(_golden_embedding(np.random.default_rng(0))[0][1])),
                Special("ids out of range", {**_golden_embedding(np.random.default_rng(0))[0][1],
                                             "ids": np.array([10], dtype=np.int64)})],
        ),
        OpSpec(
            "lora.param_count", _param_count_strategy, "in, out ≥ 1 integers, 1 ≤ r ≤ min(in, out)", Exact(),
            golden=lambda rng: [("lesson_4096_r8", {"in_features": 4096, "out_features": 4096, "r": 8,
                                                    "lora_bias": False, "dora": False}),
                                ("dora_bias", {"in_features": 10, "out_features": 6, "r": 4,
                                               "lora_bias": True, "dora": True})],
            specials=lambda: [Special("r above min(in, out)", {"in_features": 4, "out_features": 3, "r": 4,
                                                               "lora_bias": False, "dora": False}),
                              Special("r is 0", {"in_features": 4, "out_features": 3, "r": 0,
                                                 "lora_bias": False, "dora": False})],
        ),
    ]
