"""Properties of the LoRA reference (spec/lora.md), each named for its invariant."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import lora, precision

U64 = precision.unit_roundoff("float64")


@st.composite
def layers(draw, max_dim: int = 24, batch_dims: int = 2):
    """A random LoRA layer: W (out, in), A (r, in), B (out, r), x (..., in), scaling, seed-driven values."""
    out_f = draw(st.integers(1, max_dim))
    in_f = draw(st.integers(1, max_dim))
    r = draw(st.integers(1, min(in_f, out_f)))
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=batch_dims)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return {
        "W": rng.standard_normal((out_f, in_f)) * scale,
        "A": rng.standard_normal((r, in_f)),
        "B": rng.standard_normal((out_f, r)),
        "x": rng.standard_normal((*lead, in_f)),
        "bias": rng.standard_normal(out_f),
        "s": float(draw(st.sampled_from([0.5, 2.0, 16.0]))) / r,
        "rng": rng,
    }


def _abs_forward(x, W, A, B, s, bias=None):
    """|x|·(|W| + |s||B||A|)ᵀ + |b|: the sum of magnitudes every rounding error is relative to."""
    m = np.abs(x) @ np.abs(W).T + abs(s) * (np.abs(x) @ np.abs(A).T) @ np.abs(B).T
    return m if bias is None else m + np.abs(bias)


def _depth(W, A) -> int:
    """Longest chain of roundings in forward: the in-term dot products, the r-term one, three adds."""
    return W.shape[1] + A.shape[0] + 3


@given(layers())
def test_zero_B_leaves_forward_equal_to_base_exactly(layer):
    x, W, A = layer["x"], layer["W"], layer["A"]
    y = lora.forward(x, W, A, np.zeros_like(layer["B"]), layer["s"], bias=layer["bias"])
    assert np.array_equal(y, x @ W.T + layer["bias"])


@given(layers())
def test_forward_equals_x_times_merged_weight_within_bound(layer):
    x, W, A, B, s, b = (layer[k] for k in ("x", "W", "A", "B", "s", "bias"))
    y = lora.forward(x, W, A, B, s, bias=b)
    y_merged = x @ lora.merge(W, A, B, s).T + b
    # both sides carry at most γ_depth relative error on the same magnitudes
    bound = 2 * precision.gamma(_depth(W, A) + 1, "float64") * _abs_forward(x, W, A, B, s, b)
    report = precision.compare_to_bound(y, y_merged, bound)
    assert report.passed, str(report)


@given(layers())
def test_unmerge_of_merge_returns_W_within_bound(layer):
    W, A, B, s = (layer[k] for k in ("W", "A", "B", "s"))
    back = lora.unmerge(lora.merge(W, A, B, s), A, B, s)
    # fl(fl(W + Δ) − Δ): two roundings of magnitude ≤ |W| + 2|Δ|
    bound = 2 * U64 * (np.abs(W) + 2 * np.abs(lora.delta(A, B, s)))
    report = precision.compare_to_bound(back, W, bound)
    assert report.passed, str(report)


@given(st.integers(1, 300), st.integers(1, 300), st.data())
def test_param_count_equals_formula_and_elements_init_creates(in_f, out_f, data):
    r = data.draw(st.integers(1, min(in_f, out_f)))
    rng = np.random.default_rng(0)
    made = lora.init(np.zeros((out_f, in_f)), r, alpha=2 * r, rng=rng)
    assert lora.param_count(in_f, out_f, r) == r * (in_f + out_f) == made.A.size + made.B.size
    assert lora.param_count(in_f, out_f, r, lora_bias=True, dora=True) == r * (in_f + out_f) + 2 * out_f


def test_lesson_numbers_fall_out():
    # The lesson: d = 4096, r = 8 -> 2·4096·8 = 65,536 parameters, a 256x reduction from d².
    assert lora.param_count(4096, 4096, 8) == 65_536
    assert 4096 * 4096 / lora.param_count(4096, 4096, 8) == 256


@given(st.floats(-64, 64, allow_nan=False), st.integers(1, 512))
def test_rslora_scaling_is_alpha_over_sqrt_r_and_plain_is_alpha_over_r(alpha, r):
    assert lora.scaling(alpha, r) == alpha / r
    assert lora.scaling(alpha, r, use_rslora=True) == alpha / np.sqrt(r)


@given(layers(batch_dims=1))
def test_fan_in_fan_out_transposes_only_delta(layer):
    x, W, A, B, s = (layer[k] for k in ("x", "W", "A", "B", "s"))
    # BLAS may sum in another order for a transposed layout, so the forward agrees within the bound
    bound = 2 * precision.gamma(_depth(W, A), "float64") * _abs_forward(x, W, A, B, s)
    fifo = lora.forward(x, W.T.copy(), A, B, s, fan_in_fan_out=True)
    assert precision.compare_to_bound(fifo, lora.forward(x, W, A, B, s), bound).passed
    assert np.array_equal(lora.merge(W.T.copy(), A, B, s, fan_in_fan_out=True), lora.merge(W, A, B, s).T)
    assert np.array_equal(lora.delta(A, B, s, fan_in_fan_out=True), lora.delta(A, B, s).T)


@given(layers(batch_dims=1))
def test_row_vector_form_of_the_lesson_equals_column_layout(layer):
    # The lesson writes x @ W_q + (α/r)·(x @ A_q) @ B_q with A_q (d, r), B_q (r, d): A_q = Aᵀ, B_q = Bᵀ.
    x, W, A, B, s = (layer[k] for k in ("x", "W", "A", "B", "s"))
    A_q, B_q = A.T.copy(), B.T.copy()
    lesson = x @ W.T + s * (x @ A_q) @ B_q
    bound = 2 * precision.gamma(_depth(W, A), "float64") * _abs_forward(x, W, A, B, s)
    assert precision.compare_to_bound(lora.forward(x, W, A, B, s), lesson, bound).passed


@given(layers(), st.sampled_from([0.0, 0.1, 0.5]))
def test_dropout_applies_inverted_mask_to_lora_branch_only(layer, p):
    x, W, A, B, s = (layer[k] for k in ("x", "W", "A", "B", "s"))
    mask = lora.dropout_mask(layer["rng"], x.shape, p)
    y = lora.forward(x, W, A, B, s, dropout_mask=mask, dropout_p=p)
    expected = x @ W.T + s * ((x * mask / (1 - p)) @ A.T) @ B.T
    bound = 2 * precision.gamma(_depth(W, A) + 2, "float64") * _abs_forward(x / (1 - p), W, A, B, s)
    assert precision.compare_to_bound(y, expected, bound).passed
    all_kept = lora.forward(x, W, A, B, s, dropout_mask=np.ones_like(x), dropout_p=0.0)
    assert np.array_equal(all_kept, lora.forward(x, W, A, B, s))


def _loss_grad_bound(layer, mask, p):
    """Rounding bound on each gradient entry: the gradient of the magnitudes, times γ."""
    x, W, A, B, s = (layer[k] for k in ("x", "W", "A", "B", "s"))
    g = np.ones((*x.shape[:-1], W.shape[0]))
    mags = lora.backward(
        np.abs(x),
        np.abs(W),
        np.abs(A),
        np.abs(B),
        g,
        abs(s),
        dropout_mask=mask,
        dropout_p=p,
        need_dW=True,
        need_dbias=True,
    )
    return mags, precision.gamma(_depth(W, A) + W.shape[0] + int(np.prod(x.shape[:-1])) + 4, "float64")


@given(layers(max_dim=8), st.sampled_from([0.0, 0.25]))
def test_backward_equals_central_finite_differences(layer, p):
    x, W, A, B, s, b = (layer[k] for k in ("x", "W", "A", "B", "s", "bias"))
    mask = lora.dropout_mask(layer["rng"], x.shape, p) if p else None
    rng = np.random.default_rng(1)
    g = rng.standard_normal((*x.shape[:-1], W.shape[0]))
    grads = lora.backward(x, W, A, B, g, s, dropout_mask=mask, dropout_p=p, need_dW=True, need_dbias=True)

    def loss(x_=x, W_=W, A_=A, B_=B, b_=b):
        return float(np.sum(g * lora.forward(x_, W_, A_, B_, s, bias=b_, dropout_mask=mask, dropout_p=p)))

    # The loss is linear in each argument separately, so the central difference with h = 1 has no
    # truncation error: only rounding, bounded by γ·(magnitude sum at θ ± h) / h per evaluation.
    mags, gam = _loss_grad_bound(layer, mask, p)
    absg = np.abs(g)
    magnitude = float(np.sum(absg * _abs_forward(np.abs(x) / (1 - p), W, A, B, s, b)))
    for name, arr, analytic, mag in (
        ("x", x, grads.dx, mags.dx),
        ("A", A, grads.dA, mags.dA),
        ("B", B, grads.dB, mags.dB),
        ("W", W, grads.dW, mags.dW),
        ("b", b, grads.dbias, mags.dbias),
    ):
        fd = np.empty_like(arr)
        for i in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[i] += 1.0
            minus[i] -= 1.0
            fd[i] = (loss(**{name + "_": plus}) - loss(**{name + "_": minus})) / 2.0
        # the perturbed magnitude sum is at most magnitude + (largest |∂(magnitude)/∂θ_i|) · h
        bound = gam * (magnitude + float(np.max(mag)) * float(np.max(absg)) + np.abs(mag) * np.max(absg))
        report = precision.compare_to_bound(analytic, fd, 2 * bound)
        assert report.passed, f"d{name}: {report}"


def test_embedding_forward_equals_lookup_in_merged_table():
    rng = np.random.default_rng(3)
    V, d, r, s = 50, 12, 4, 0.75
    E, A, B = rng.standard_normal((V, d)), rng.standard_normal((r, V)), rng.standard_normal((d, r))
    ids = rng.integers(0, V, size=(3, 7))
    merged = lora.merge(E, A, B, s, fan_in_fan_out=True)  # ΔE = s·(B A)ᵀ, shape (V, d)
    y = lora.embedding_forward(ids, E, A, B, s)
    bound = 2 * precision.gamma(r + 2, "float64") * (np.abs(E) + abs(s) * np.abs(A.T) @ np.abs(B.T))[ids]
    assert precision.compare_to_bound(y, merged[ids], bound).passed


@pytest.mark.parametrize("method", ["pissa", "olora"])
@pytest.mark.parametrize("fifo", [False, True])
def test_residual_init_reconstructs_W(method, fifo):
    rng = np.random.default_rng(4)
    W = rng.standard_normal((20, 14))
    base = W.T.copy() if fifo else W
    made = lora.init(base, 5, alpha=10.0, method=method, fan_in_fan_out=fifo)
    s = lora.scaling(10.0, 5)
    P = lora.delta(made.A, made.B, s, fan_in_fan_out=fifo)
    # W_res = fl(W − P), so fl(W_res + P) is two roundings away from W whatever the factorisation's accuracy
    bound = 2 * U64 * (np.abs(base) + 2 * np.abs(P))
    assert precision.compare_to_bound(made.W + P, base, bound).passed
    if method == "pissa":
        # W_res is the tail of the SVD; a backward-stable SVD moves the rank-r subspace by at most
        # γ_{mn}·σ₁ / (σ_r − σ_{r+1}) (Wedin), so the tail moves by ≤ γ_{mn}·σ₁·(1 + σ₁ / gap)
        u, sv, vh = np.linalg.svd(W, full_matrices=False)
        tail = (u[:, 5:] * sv[5:]) @ vh[5:]
        gap = sv[4] - sv[5]
        limit = precision.gamma(W.size, "float64") * sv[0] * (1 + sv[0] / gap)
        assert np.abs((made.W.T if fifo else made.W) - tail).max() <= limit


def test_default_init_is_kaiming_uniform_A_and_zero_B():
    rng = np.random.default_rng(5)
    made = lora.init(np.zeros((64, 400)), 16, alpha=16, rng=rng)
    assert np.all(made.B == 0)
    assert np.abs(made.A).max() <= 1 / np.sqrt(400)
    # uniform on ±1/√in has std 1/√(3·in); 6400 draws put the sample std within 3% at > 5 sigma
    assert abs(made.A.std() * np.sqrt(3 * 400) - 1) < 0.03
    g = lora.init(np.zeros((64, 400)), 16, alpha=16, rng=rng, method="gaussian")
    assert np.all(g.B == 0) and abs(g.A.std() * 16 - 1) < 0.03
    e = lora.init(np.zeros((400, 64)), 16, alpha=16, rng=rng, embedding=True)
    assert e.A.shape == (16, 400) and e.B.shape == (64, 16) and np.all(e.A == 0)
    assert abs(e.B.std() - 1) < 0.06  # 1024 N(0,1) draws


def test_low_precision_merge_rounds_once_unsafe_and_twice_safe():
    rng = np.random.default_rng(6)
    W = precision.round_to(rng.standard_normal((32, 48)), "bfloat16")
    A, B = rng.standard_normal((4, 48)), rng.standard_normal((32, 4)) * 1e-2
    exact = W + lora.delta(A, B, 0.5)
    unsafe = lora.merge(W, A, B, 0.5, dtype="bfloat16")
    safe = lora.merge(W, A, B, 0.5, dtype="bfloat16", safe=True)
    assert np.array_equal(unsafe, precision.round_to(exact, "bfloat16"))
    assert np.array_equal(
        safe, precision.round_to(W + precision.round_to(lora.delta(A, B, 0.5), "bfloat16"), "bfloat16")
    )
    assert np.all(precision.ulp_distance(unsafe, exact, "bfloat16") <= 1)
    back = lora.unmerge(unsafe, A, B, 0.5, dtype="bfloat16")
    assert not np.array_equal(back, W)  # not exact in bf16, as PEFT documents (peft.md §4.3)
    assert np.abs(back - W).max() <= 2 * precision.unit_roundoff("bfloat16") * np.abs(exact).max() * 2


def test_model_param_count_matches_peft_suffix_rule():
    layers = {f"layers.{i}.attn.{p}": (4096, 4096) for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    layers.update(
        {
            f"layers.{i}.mlp.{p}": shape
            for i in range(2)
            for p, shape in (("up_proj", (11008, 4096)), ("down_proj", (4096, 11008)))
        }
    )
    qv = lora.model_param_count(layers, 8, ["q_proj", "v_proj"])
    assert qv.trainable == 2 * 2 * 65_536 and len(qv.adapted_layers) == 4
    every = lora.model_param_count(layers, 8, "all-linear")
    assert every.trainable == 2 * (4 * 65_536 + 2 * 8 * (4096 + 11008))
    assert every.fraction == every.trainable / (every.base + every.trainable)
