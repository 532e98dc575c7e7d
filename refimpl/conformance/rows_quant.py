"""Op rows for refimpl.quant and refimpl.qlora (spec/nf4.md; QLoRA arXiv 2305.14314).

NF4/FP4 storage is bit-exact by definition (float32 arithmetic in a fixed order), so
every quant row is ``Exact``: packed codes, absmax, nested state and dequantized bits.
"""

from __future__ import annotations

import numpy as np

from refimpl.conformance.table import Case, OpSpec, Special
from refimpl.conformance.tolerance import Bounded, Exact

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def _dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _quantize_strategy():
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    @st.composite
    def build(draw) -> Case:
        shape = draw(st.one_of(st.tuples(st.integers(1, 300)),
                               st.tuples(st.integers(1, 4), st.integers(1, 100))))
        elements = st.one_of(
            st.floats(-8, 8, width=32, allow_subnormal=False),
            st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5]),  # ties and exact codebook values
        )
        x = draw(hnp.arrays(np.float32, shape, elements=elements))
        dtype = draw(st.sampled_from(_FLOAT_DTYPES))
        return {"x": x.astype(_dtype(dtype)), "blocksize": draw(st.sampled_from([32, 64, 128])),
                "quant_type": draw(st.sampled_from(["nf4", "fp4"])), "double_quant": draw(st.booleans())}

    return build()


def _golden_quantize(rng: np.random.Generator) -> list[tuple[str, Case]]:
    out = []
    for i, (shape, bs, qt, dq, dt) in enumerate([
        ((4, 64), 64, "nf4", False, "float32"), ((130,), 32, "nf4", True, "float32"),
        ((3, 33), 128, "fp4", False, "float32"), ((257,), 64, "fp4", True, "float16"),
        ((2, 600), 256, "nf4", True, "float16"),
    ]):
        x = (rng.standard_normal(shape) * rng.choice([0.01, 1.0, 30.0])).astype(np.float32).astype(_dtype(dt))
        out.append((f"case{i}_{qt}_bs{bs}_{'dq' if dq else 'plain'}_{dt}_{'x'.join(map(str, shape))}",
                    {"x": x, "blocksize": bs, "quant_type": qt, "double_quant": dq}))
    return out


def _dequantize_case(q: Case) -> Case:
    from refimpl import quant

    packed, state = quant.quantize_4bit(q["x"], q["blocksize"], q["quant_type"], q["double_quant"])
    return {"packed": packed, "state": state}


def _quant_specials() -> list[Special]:
    base = {"blocksize": 64, "quant_type": "nf4", "double_quant": False}
    x = np.linspace(-1, 1, 128, dtype=np.float32)
    out = []
    for qt in ("nf4", "fp4"):
        z = dict(base, quant_type=qt)
        out += [
            Special(f"{qt}: all-zero full block", {**z, "x": np.zeros(64, np.float32)}),
            Special(f"{qt}: all-zero tail block", {**z, "x": np.concatenate([x[:64], np.zeros(6, np.float32)])}),
            Special(f"{qt}: x has nan", {**z, "x": np.where(np.arange(128) == 5, np.nan, x).astype(np.float32)}),
            Special(f"{qt}: x has inf", {**z, "x": np.where(np.arange(128) == 5, np.inf, x).astype(np.float32)}),
            Special(f"{qt}: subnormal block", {**z, "x": np.full(64, 1e-40, np.float32)}),
            Special(f"{qt}: odd length", {**z, "x": x[:7].copy()}),
            Special(f"{qt}: -0.0 values", {**z, "x": np.full(64, -0.0, np.float32)}),
        ]
    out += [
        Special("blocksize 48 (unsupported)", {**base, "x": x, "blocksize": 48}),
        Special("quant_type int4 (unknown)", {**base, "x": x, "quant_type": "int4"}),
        Special("integer input", {**base, "x": np.arange(64, dtype=np.int32)}),
        Special("empty input", {**base, "x": np.zeros(0, np.float32)}),
    ]
    return out


def _pack_strategy():
    from hypothesis import strategies as st

    return st.fixed_dictionaries({
        "nibbles": st.lists(st.integers(0, 15), min_size=1, max_size=64).map(lambda v: np.asarray(v, np.uint8)),
        "pad": st.integers(0, 15)})


def _unpack_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        n = draw(st.integers(1, 64))
        packed = np.asarray(draw(st.lists(st.integers(0, 255), min_size=(n + 1) // 2, max_size=(n + 1) // 2)),
                            np.uint8).reshape(-1, 1)
        return {"packed": packed, "n": n}

    return build()


def _q8_strategy():
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    @st.composite
    def build(draw) -> Case:
        n = draw(st.integers(1, 600))
        x = draw(hnp.arrays(np.float32, (n,), elements=st.floats(-4, 4, width=32, allow_subnormal=False)))
        return {"x": x, "blocksize": draw(st.sampled_from([64, 256]))}

    return build()


def _dq8_strategy():
    from refimpl import quant

    return _q8_strategy().map(lambda c: dict(zip(("codes", "absmax"), quant.quantize_blockwise_8bit(c["x"],
                                                                                                     c["blocksize"]),
                                                 strict=True), blocksize=c["blocksize"]))


def _golden_q8(rng: np.random.Generator) -> list[tuple[str, Case]]:
    return [(f"n{n}_bs{bs}", {"x": (rng.standard_normal(n) * 3).astype(np.float32), "blocksize": bs})
            for n, bs in ((256, 256), (300, 64))]


def _qlora_strategy():
    from hypothesis import strategies as st

    from refimpl import quant
    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        n_in, n_out = draw(st.sampled_from([8, 16, 40])), draw(rs.dims(1, 6))
        r = draw(st.integers(1, min(n_in, n_out)))
        w = draw(rs.float_arrays((n_out, n_in), dtype=np.float32))
        packed, state = quant.quantize_4bit(w, draw(st.sampled_from([32, 64])),
                                            draw(st.sampled_from(["nf4", "fp4"])), draw(st.booleans()))
        lead = tuple(draw(st.lists(rs.dims(1, 3), min_size=1, max_size=2)))
        c: Case = {"x": draw(rs.float_arrays((*lead, n_in))), "packed": packed, "state": state,
                   "A": draw(rs.float_arrays((r, n_in))), "B": draw(rs.float_arrays((n_out, r))),
                   "scaling": draw(rs.reals(-4.0, 4.0))}
        if draw(st.booleans()):
            c["bias"] = draw(rs.float_arrays((n_out,)))
        return c

    return build()


def _golden_qlora(rng: np.random.Generator) -> list[tuple[str, Case]]:
    from refimpl import quant
    from refimpl.conformance.strategies import dyadic

    out = []
    for i, (lead, n_in, n_out, r, bs, qt, dq) in enumerate([((2, 3), 64, 8, 4, 64, "nf4", False),
                                                            ((5,), 40, 6, 2, 32, "fp4", True)]):
        packed, state = quant.quantize_4bit(dyadic(rng, (n_out, n_in)).astype(np.float32), bs, qt, dq)
        c: Case = {"x": dyadic(rng, (*lead, n_in)), "packed": packed, "state": state,
                   "A": dyadic(rng, (r, n_in)), "B": dyadic(rng, (n_out, r)), "scaling": (0.5, 2.0)[i]}
        if i == 0:
            c["bias"] = dyadic(rng, (n_out,))
        out.append((f"case{i}_{qt}_bs{bs}_{'dq' if dq else 'plain'}_in{n_in}_out{n_out}_r{r}", c))
    return out


def _qlora_magnitude(case: Case) -> dict[str, np.ndarray]:
    """|x||Ŵ|ᵀ + |b| + |s|(|x||A|ᵀ)|B|ᵀ with Ŵ the exactly dequantized base weight."""
    from refimpl import lora, qlora

    w = np.abs(qlora.dequantized_weight(case["packed"], case["state"]))
    b = None if case.get("bias") is None else np.abs(case["bias"])
    return {"out": lora.forward(np.abs(case["x"]), w, np.abs(case["A"]), np.abs(case["B"]),
                                abs(float(case["scaling"])), bias=b)}


def _codebook_strategy():
    from hypothesis import strategies as st

    return st.fixed_dictionaries({"name": st.sampled_from(["nf4", "fp4", "dynamic8"])})


def rows() -> list[OpSpec]:
    exact = Exact()
    return [
        OpSpec("qlora.forward", _qlora_strategy,
               "x (..., in); packed codes and QuantState of a 2-D (out, in) weight; A (r, in), B (out, r); "
               "optional bias (out,)",
               Bounded(lambda c: c["A"].shape[1] + c["A"].shape[0] + 6, _qlora_magnitude,
                       note="dequantization is exact; the matmuls are bounded like lora.forward"),
               golden=_golden_qlora,
               specials=lambda: [
                   Special("x has nan", {**_golden_qlora(np.random.default_rng(0))[0][1],
                                         "x": np.full((1, 64), np.nan)}),
                   Special("1-D base weight", {**_golden_qlora(np.random.default_rng(0))[0][1],
                                               **dict(zip(("packed", "state"), __import__("refimpl.quant").quant
                                                          .quantize_4bit(np.ones(64, np.float32)), strict=True))}),
               ]),
        OpSpec("quant.codebook", _codebook_strategy,
               "name in nf4, fp4, dynamic8", exact,
               golden=lambda rng: [(n, {"name": n}) for n in ("nf4", "fp4", "dynamic8")],
               specials=lambda: [Special("unknown name", {"name": "nf3"})]),
        OpSpec("quant.quantize_4bit", _quantize_strategy,
               "x float32/float16/bfloat16, any shape, finite; blocksize in 32..4096 (powers of 2); nf4/fp4; "
               "double_quant", exact, golden=_golden_quantize, specials=_quant_specials),
        OpSpec("quant.dequantize_4bit", lambda: _quantize_strategy().map(_dequantize_case),
               "packed codes and the QuantState quantize_4bit returned", exact,
               golden=lambda rng: [(n, _dequantize_case(c)) for n, c in _golden_quantize(rng)],
               specials=lambda: [Special("packed too short", {**_dequantize_case(
                   {"x": np.ones(64, np.float32), "blocksize": 64, "quant_type": "nf4", "double_quant": False}),
                   "packed": np.zeros((31, 1), np.uint8)})]),
        OpSpec("quant.pack_nibbles", _pack_strategy, "integer codes in [0, 15], pad in [0, 15]", exact,
               golden=lambda rng: [("odd7", {"nibbles": rng.integers(0, 16, 7).astype(np.uint8), "pad": 0}),
                                   ("even16", {"nibbles": rng.integers(0, 16, 16).astype(np.uint8), "pad": 0})],
               specials=lambda: [Special("nibble 16", {"nibbles": np.array([16], np.uint8), "pad": 0}),
                                 Special("float nibbles", {"nibbles": np.array([1.0]), "pad": 0})]),
        OpSpec("quant.unpack_nibbles", _unpack_strategy, "uint8 packed bytes, n with (n+1)//2 bytes", exact,
               golden=lambda rng: [("n7", {"packed": rng.integers(0, 256, (4, 1)).astype(np.uint8), "n": 7})],
               specials=lambda: [Special("wrong byte count", {"packed": np.zeros((3, 1), np.uint8), "n": 7})]),
        OpSpec("quant.quantize_blockwise_8bit", _q8_strategy, "x float32 (any shape), blocksize 32..4096", exact,
               golden=_golden_q8,
               specials=lambda: [Special("all-zero block", {"x": np.zeros(64, np.float32), "blocksize": 64}),
                                 Special("x has nan", {"x": np.array([1, np.nan], np.float32), "blocksize": 64})]),
        OpSpec("quant.dequantize_blockwise_8bit", _dq8_strategy, "uint8 codes and float32 absmax per block", exact,
               golden=lambda rng: [(n, dict(zip(("codes", "absmax"), __import__("refimpl.quant").quant
                                               .quantize_blockwise_8bit(c["x"], c["blocksize"]), strict=True),
                                        blocksize=c["blocksize"])) for n, c in _golden_q8(rng)],
               specials=lambda: [Special("absmax of the wrong length", {"codes": np.zeros(128, np.uint8),
                                                                       "absmax": np.ones(1, np.float32),
                                                                       "blocksize": 64})]),
    ]
