"""Properties of lora.forward_batched, many adapters in one batch (spec/lora.md §11), each named for its invariant,
the numba kernel against the reference, and the argument checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import kernels, lora, precision


@st.composite
def batches(draw, max_dim: int = 20, max_tokens: int = 24, max_adapters: int = 5):
    """A random batch: x (T, in), W (out, in), 0..max_adapters adapters of independent ranks (r > min(in, out)
    included) and scalings, one index per token in −1..n − 1, a bias; values from a drawn seed."""
    out_f, in_f = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    T = draw(st.integers(1, max_tokens))
    n = draw(st.integers(0, max_adapters))
    ranks = draw(st.lists(st.integers(1, min(in_f, out_f) + 3), min_size=n, max_size=n))
    scalings = draw(st.lists(st.sampled_from([0.0, 0.25, -1.5, 2.0, 128.0]), min_size=n, max_size=n))
    index = draw(st.lists(st.integers(-1, n - 1), min_size=T, max_size=T))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return {
        "x": rng.standard_normal((T, in_f)),
        "W": rng.standard_normal((out_f, in_f)),
        "adapters": [
            (rng.standard_normal((r, in_f)), rng.standard_normal((out_f, r)), s)
            for r, s in zip(ranks, scalings, strict=True)
        ],
        "adapter_index": np.array(index, dtype=np.int64),
        "bias": rng.standard_normal(out_f) if draw(st.booleans()) else None,
    }


def _abs_batch(b: dict) -> dict:
    return {
        **b,
        "x": np.abs(b["x"]),
        "W": np.abs(b["W"]),
        "adapters": [(np.abs(a), np.abs(bb), abs(s)) for a, bb, s in b["adapters"]],
        "bias": None if b["bias"] is None else np.abs(b["bias"]),
    }


def _bound(b: dict) -> np.ndarray:
    """Two float64 evaluations of the formula in different orders differ by at most 2γ_K · |formula|(|inputs|)."""
    r_max = max((a.shape[0] for a, _, _ in b["adapters"]), default=0)
    depth = b["x"].shape[1] + r_max + 4
    return 2 * precision.gamma(depth, "float64") * lora.forward_batched(**_abs_batch(b))


def _call(b: dict) -> np.ndarray:
    return lora.forward_batched(b["x"], b["W"], b["adapters"], b["adapter_index"], bias=b["bias"])


def _within(y: np.ndarray, want: np.ndarray, b: dict) -> None:
    bound = _bound(b)
    assert np.all(np.abs(y - want) <= bound), float(np.max(np.abs(y - want) - bound))


# ---------------------------------------------------------------------------- properties


@given(batches())
def test_forward_batched_equals_a_per_token_loop_of_lora_forward(b):
    y = _call(b)
    for t, i in enumerate(b["adapter_index"]):
        x_t = b["x"][t : t + 1]
        if i == -1:
            want = x_t @ b["W"].T + (0.0 if b["bias"] is None else b["bias"])
        else:
            A, B, s = b["adapters"][i]
            want = lora.forward(x_t, b["W"], A, B, s, bias=b["bias"])
        _within(y[t : t + 1], want, {**b, "x": x_t, "adapter_index": b["adapter_index"][t : t + 1]})


@given(batches())
def test_index_minus_one_gives_the_base_layer_exactly(b):
    y = _call(b)
    base = b["x"] @ b["W"].T + (0.0 if b["bias"] is None else b["bias"])
    rows = b["adapter_index"] == -1
    assert np.array_equal(y[rows], base[rows])  # the reference adds nothing to these rows


@given(batches(), st.randoms(use_true_random=False))
def test_permuting_tokens_permutes_outputs(b, rnd):
    perm = np.array(rnd.sample(range(len(b["x"])), len(b["x"])), dtype=np.int64)
    y = _call(b)
    y_perm = _call({**b, "x": b["x"][perm], "adapter_index": b["adapter_index"][perm]})
    _within(y_perm, y[perm], {**b, "x": b["x"][perm], "adapter_index": b["adapter_index"][perm]})


@given(batches(max_adapters=4), st.data())
def test_all_tokens_on_one_adapter_equals_lora_forward(b, data):
    if not b["adapters"]:
        b["adapters"] = [(np.ones((1, b["x"].shape[1])), np.ones((b["W"].shape[0], 1)), 0.5)]
    k = data.draw(st.integers(0, len(b["adapters"]) - 1))
    b["adapter_index"] = np.full(len(b["x"]), k, dtype=np.int64)
    A, B, s = b["adapters"][k]
    _within(_call(b), lora.forward(b["x"], b["W"], A, B, s, bias=b["bias"]), b)


@given(batches(max_adapters=4), st.integers(1, 6), st.floats(-8, 8, allow_nan=False))
def test_an_adapter_no_token_uses_changes_nothing(b, r, s):
    y = _call(b)
    extra = (np.ones((r, b["x"].shape[1])), np.ones((b["W"].shape[0], r)), s)
    assert np.array_equal(y, _call({**b, "adapters": [*b["adapters"], extra]}))


@given(batches())
def test_segment_form_sgmv_equals_the_reference(b):
    """Punica's SGMV / S-LoRA's MBGMM: sort tokens by adapter, one GEMM pair per contiguous segment, unsort."""
    idx = b["adapter_index"]
    order = np.argsort(idx, kind="stable")
    xs, ids = b["x"][order], idx[order]
    ys = xs @ b["W"].T + (0.0 if b["bias"] is None else b["bias"])
    for i, (A, B, s) in enumerate(b["adapters"]):
        lo, hi = np.searchsorted(ids, i, "left"), np.searchsorted(ids, i, "right")
        ys[lo:hi] += s * ((xs[lo:hi] @ A.T) @ B.T)
    y = np.empty_like(ys)
    y[order] = ys
    _within(_call(b), y, b)


@given(batches())
def test_gather_form_bgmv_padded_to_max_rank_equals_the_reference(b):
    """Punica's BGMV / vLLM's stacked LoRA weights: per token, gather its adapter's A and B, zero-padded to the
    largest rank, with s folded in; index −1 gathers nothing (a zero slot)."""
    n, (out_f, in_f) = len(b["adapters"]), b["W"].shape
    r_max = max((a.shape[0] for a, _, _ in b["adapters"]), default=1)
    A_stack, B_stack = np.zeros((n + 1, r_max, in_f)), np.zeros((n + 1, out_f, r_max))
    for i, (A, B, s) in enumerate(b["adapters"]):
        A_stack[i, : A.shape[0]] = A
        B_stack[i, :, : A.shape[0]] = s * B
    slot = np.where(b["adapter_index"] < 0, n, b["adapter_index"])  # the zero slot n for −1
    shrink = np.einsum("tk,trk->tr", b["x"], A_stack[slot])
    expand = np.einsum("tr,tor->to", shrink, B_stack[slot])
    y = b["x"] @ b["W"].T + (0.0 if b["bias"] is None else b["bias"]) + expand
    _within(_call(b), y, b)


def test_fan_in_fan_out_reads_w_as_in_out():
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((5, 4)), rng.standard_normal((3, 4))
    ads = [(rng.standard_normal((2, 4)), rng.standard_normal((3, 2)), 0.5)]
    idx = np.array([0, -1, 0, 0, -1])
    assert np.array_equal(
        lora.forward_batched(x, W, ads, idx), lora.forward_batched(x, W.T.copy(), ads, idx, fan_in_fan_out=True)
    )


# ---------------------------------------------------------------------------- numba kernel (differential)


@pytest.fixture(scope="module")
def numba_batched():
    pytest.importorskip("numba")
    return kernels.get("lora.forward_batched", "numba")


@given(batches(max_tokens=40))
def test_numba_segment_kernel_matches_the_reference_within_bound(numba_batched, b):
    y = numba_batched(b["x"], b["W"], b["adapters"], b["adapter_index"], bias=b["bias"])
    assert y.dtype == np.float64 and y.shape == (len(b["x"]), b["W"].shape[0])
    _within(y, _call(b), b)


# ---------------------------------------------------------------------------- argument checks


def _good():
    rng = np.random.default_rng(1)
    x, W = rng.standard_normal((4, 6)), rng.standard_normal((5, 6))
    ads = [(rng.standard_normal((2, 6)), rng.standard_normal((5, 2)), 0.5), (np.ones((3, 6)), np.ones((5, 3)), 2.0)]
    return {"x": x, "W": W, "adapters": ads, "adapter_index": np.array([0, -1, 1, 0])}


def _adapters_with(k: int, pos: int, value):
    ads = [list(a) for a in _good()["adapters"]]
    ads[k][pos] = value
    return [tuple(a) for a in ads]


BAD = [
    (
        "index beyond the adapters",
        {"adapter_index": np.array([0, 2, 1, 0])},
        ValueError,
        "adapter_index: expected values in [-1, 2)",
    ),
    ("index -2", {"adapter_index": np.array([0, -2, 1, 0])}, ValueError, "adapter_index: expected values in [-1, 2)"),
    (
        "float index",
        {"adapter_index": np.array([0.0, 1.0, 1.0, 0.0])},
        TypeError,
        "adapter_index: expected an integer array",
    ),
    (
        "bool index",
        {"adapter_index": np.array([True, False, True, True])},
        TypeError,
        "adapter_index: expected an integer",
    ),
    ("index length", {"adapter_index": np.array([0, 1])}, ValueError, "adapter_index: expected shape (4,)"),
    ("2-D index", {"adapter_index": np.zeros((4, 1), np.int64)}, ValueError, "adapter_index: expected shape (4,)"),
    ("x 1-D", {"x": np.ones(6)}, ValueError, "x: expected a 2-D array"),
    ("x width", {"x": np.ones((4, 5))}, ValueError, "x: expected shape (T, 6)"),
    ("x nan", {"x": np.full((4, 6), np.nan)}, ValueError, "x: expected finite values"),
    ("x integer", {"x": np.ones((4, 6), np.int64)}, TypeError, "x: expected a floating-point array"),
    ("W inf", {"W": np.full((5, 6), np.inf)}, ValueError, "W: expected finite values"),
    ("adapters not a list", {"adapters": np.ones((2, 6))}, TypeError, "adapters: expected a list or tuple"),
    (
        "adapter not a triple",
        {"adapters": [(np.ones((2, 6)), np.ones((5, 2)))]},
        TypeError,
        "adapters[0]: expected an (A, B, scaling) triple",
    ),
    ("A width", {"adapters": _adapters_with(1, 0, np.ones((3, 5)))}, ValueError, "adapters[1] A: expected shape"),
    ("B rank", {"adapters": _adapters_with(0, 1, np.ones((5, 3)))}, ValueError, "adapters[0] B: expected shape (5, 2)"),
    (
        "A nan",
        {"adapters": _adapters_with(1, 0, np.full((3, 6), np.nan))},
        ValueError,
        "adapters[1] A: expected finite",
    ),
    ("scaling nan", {"adapters": _adapters_with(0, 2, float("nan"))}, ValueError, "adapters[0] scaling"),
    ("scaling text", {"adapters": _adapters_with(0, 2, "2")}, TypeError, "adapters[0] scaling"),
    ("bias shape", {"bias": np.ones(4)}, ValueError, "bias: expected shape (5,)"),
    ("fan_in_fan_out not bool", {"fan_in_fan_out": 1}, TypeError, "fan_in_fan_out"),
    ("empty list with an index", {"adapters": []}, ValueError, "adapter_index: expected values in [-1, 0)"),
]


@pytest.mark.parametrize(("label", "change", "exc", "message"), BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_bad_input_raises_naming_the_argument_in_every_backend(label, change, exc, message, backend):
    if backend == "numba":
        pytest.importorskip("numba")
    fn = kernels.get("lora.forward_batched", backend)
    args = {**_good(), **change}
    with pytest.raises(exc) as info:
        fn(args.pop("x"), args.pop("W"), args.pop("adapters"), args.pop("adapter_index"), **args)
    assert message in str(info.value), str(info.value)


# ---------------------------------------------------------------------------- CuPy kernel (GPU only)

CUPY_REASON = kernels.available()["cupy"]
needs_gpu = pytest.mark.skipif(CUPY_REASON is not None, reason=f"GPU kernels unavailable: {CUPY_REASON}")


@pytest.mark.gpu
@needs_gpu
@given(batches(max_tokens=40))
def test_cupy_masked_gather_kernel_matches_the_reference_within_the_float32_bound(b):
    from refimpl.bounds import differential

    y = kernels.get("lora.forward_batched", "cupy")(b["x"], b["W"], b["adapters"], b["adapter_index"], bias=b["bias"])
    assert y.dtype == np.float32 and y.shape == (len(b["x"]), b["W"].shape[0])
    r_max = max((a.shape[0] for a, _, _ in b["adapters"]), default=0)
    bound = differential(b["x"].shape[1] + r_max + 4, lora.forward_batched(**_abs_batch(b)), "float32")
    assert np.all(np.abs(y - _call(b)) <= bound)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cupy_batched_kernel_in_half_precision_is_within_the_half_bound(dtype):
    import ml_dtypes

    from refimpl.bounds import differential
    from refimpl.kernels.cupy_gpu import lora_batched as LB

    cp = pytest.importorskip("cupy")
    np_dt = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    rng = np.random.default_rng(3)
    T, d, out = 70, 96, 80
    ranks, scal = (4, 16, 8), (2.0, 0.5, -1.0)
    x, W = (rng.standard_normal(s).astype(np_dt) for s in ((T, d), (out, d)))
    ads = [((rng.standard_normal((r, d)) / 4).astype(np_dt), (rng.standard_normal((out, r)) / 4).astype(np_dt), s)
           for r, s in zip(ranks, scal, strict=True)]  # fmt: skip
    idx = rng.integers(-1, 3, T)

    def dev(a):  # bfloat16 travels as its uint16 bits, float16 as itself
        return cp.asarray(a.view(np.uint16) if dtype == "bfloat16" else a)

    packed = LB.pack_batched(dev(W), [(dev(a), dev(bb), s) for a, bb, s in ads], dtype=dtype)
    buf = LB.workspace(packed, T)
    buf[:, :d] = dev(x)
    y = LB.forward_batched_packed(packed, buf, cp.asarray(idx)).get().view(np_dt).astype(np.float64)
    case = {"x": x.astype(np.float64), "W": W.astype(np.float64), "bias": None, "adapter_index": idx,
            "adapters": [(a.astype(np.float64), bb.astype(np.float64), s) for a, bb, s in ads]}  # fmt: skip
    bound = differential(d + 16 + 4, lora.forward_batched(**_abs_batch(case)), dtype)
    assert np.all(np.abs(y - _call(case)) <= bound)
