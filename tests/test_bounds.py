"""Each error bound of refimpl.bounds holds, and is tight.

A bound is checked against a float32 evaluation of its formula in a fixed order, one IEEE operation at a
time (NumPy float32 scalars: every operation correctly rounded), with a float64 oracle (its own error, about
γ_k(float64), is ~10⁻⁹ of the float32 bound). Two kinds of input:

* random (normal, with negative scalings and magnitudes, cancellation between W and s·B A): the bound holds;
* adversarial, built so that every addition of the longest sum rounds the same way with no cancellation:
  a partial sum s ∈ [1, 2) plus t = 2⁻²⁴(1 + 2⁻⁸), just over half an ulp of s, rounds up by 2⁻²³, so each
  step adds an error of 2⁻²⁴(1 − 2⁻⁸) ≈ u and K steps give (K − 1)u, the γ_K the bound charges. There the
  worst error / bound must be at least a stated floor: the bound is not loose by more than that factor.

Measured worst error / bound on the adversarial inputs (printed with ``-s``): matmul 0.988 (K = 256),
QLoRA forward 0.981, DoRA forward 0.485, DoRA backward (dB) 0.904, the harness's differential bound 0.984.
DoRA's forward bound charges the norm's error c·|f|·P besides the sum's own P, hence about 1/2.
"""

from __future__ import annotations

import numpy as np
import pytest

from refimpl import bounds, dora, precision, qlora, quant

F32 = np.float32
U32 = 2.0**-24
#: just over half an ulp of a partial sum in [1, 2): each addition rounds up by 2⁻²³
T_UP = U32 * (1 + 2.0**-8)


def _climbing(k: int) -> np.ndarray:
    """[1, t, t, …, t] (length k): summed in order in float32, every addition rounds up by ~u."""
    out = np.full(k, T_UP)
    out[0] = 1.0
    return out


# ---------------------------------------------------------------------------- float32, one operation at a time


def _dot32(a: np.ndarray, b: np.ndarray) -> np.float32:
    acc = F32(0.0)
    for ai, bi in zip(a.astype(F32), b.astype(F32), strict=True):
        acc = F32(acc + F32(ai * bi))
    return acc


def _matmul32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (M, K) @ b (K, N), each element a sequential float32 dot product."""
    return np.array([[_dot32(a[i], b[:, j]) for j in range(b.shape[1])] for i in range(a.shape[0])], dtype=F32)


def _dora_forward32(x, W, A, B, m, s, bias, *, order: str) -> np.ndarray:
    """DoRA's eval forward in float32: PEFT's order base + (f − 1)(base − b) + f·s·B(A x), or f ⊙ (x Vᵀ) + b."""
    x, W, A, B, m, b = (np.asarray(v, dtype=F32) for v in (x, W, A, B, m, bias))
    s = F32(s)
    V = (W + (_matmul32(B, A) * s).astype(F32)).astype(F32)
    n = np.array([np.sqrt(_dot32(row, row)) for row in V], dtype=F32)
    f = (m / n).astype(F32)
    if order == "direct":
        return ((_matmul32(x, V.T) * f).astype(F32) + b).astype(F32)
    base = (_matmul32(x, W.T) + b).astype(F32)
    lora = (_matmul32(_matmul32(x, A.T), B.T) * s).astype(F32)
    correction = ((f - F32(1)).astype(F32) * (base - b).astype(F32)).astype(F32)
    return ((base + correction).astype(F32) + (f * lora).astype(F32)).astype(F32)


def _dora_backward32(x, W, A, B, m, g, s) -> dict[str, np.ndarray]:
    """The detached DoRA backward (spec/dora.md §4, eval form) in float32."""
    x, W, A, B, m, g = (np.asarray(v, dtype=F32) for v in (x, W, A, B, m, g))
    s = F32(s)
    V = (W + (_matmul32(B, A) * s).astype(F32)).astype(F32)
    n = np.array([np.sqrt(_dot32(row, row)) for row in V], dtype=F32)
    f = (m / n).astype(F32)
    gf = (g * f).astype(F32)
    P = _matmul32(x, V.T)
    dm = np.array([_dot32(g[:, o], P[:, o]) for o in range(W.shape[0])], dtype=F32) / n
    dV = _matmul32(gf.T, x)
    return {
        "dx": _matmul32(gf, V),
        "dA": (_matmul32(B.T, dV) * s).astype(F32),
        "dB": (_matmul32(dV, A.T) * s).astype(F32),
        "dm": dm.astype(F32),
    }


def _ratio(actual, expected, bound) -> float:
    rep = precision.compare_to_bound(np.asarray(actual, dtype=np.float64), expected, bound)
    assert rep.passed, str(rep)
    return rep.worst_ratio


def _random_dora(seed: int, out_f: int = 5, in_f: int = 24, r: int = 3, n: int = 3):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.standard_normal(shape).astype(F32).astype(np.float64)  # noqa: E731
    W, A, B = f32(out_f, in_f), f32(r, in_f), f32(out_f, r)
    if seed % 2:  # s·B A nearly cancels W in row 0: the norm's condition number c is large
        W[0] = (-(np.float64(F32(0.9)) * (B @ A))[0]).astype(F32)
    s = float(F32(rng.choice([-2.0, 0.5, 1.0])))
    m = f32(out_f) * 3
    return f32(n, in_f), W, A, B, m, s, f32(out_f)


# ---------------------------------------------------------------------------- the bounds


def test_matmul_bound_holds_on_random_float32_products_and_is_tight_on_climbing_sums():
    rng = np.random.default_rng(0)
    for k in (1, 7, 64):
        a, b = rng.standard_normal((3, k)).astype(F32), rng.standard_normal((k, 2)).astype(F32)
        _ratio(_matmul32(a, b), a.astype(np.float64) @ b, precision.matmul_error_bound(a, b, "float32"))
    k = 256
    a, b = _climbing(k)[None, :], np.ones((k, 1))
    worst = _ratio(_matmul32(a, b), a @ b, precision.matmul_error_bound(a, b, "float32"))
    print(f"matmul K={k}: worst error/bound {worst:.3f}")
    assert worst >= 0.9  # (K − 1)(1 − 2⁻⁸) / (K + 1)


def _peft_qlora32(x, W, A, B, s, bias) -> np.ndarray:
    base = (_matmul32(x, W.T) + bias.astype(F32)).astype(F32)
    lora = (_matmul32(_matmul32(x, A.T), B.T) * F32(s)).astype(F32)
    return (base + lora).astype(F32)


def test_qlora_forward_bound_holds_on_random_layers_and_is_tight_on_a_climbing_base_sum():
    rng = np.random.default_rng(1)
    W = (rng.standard_normal((4, 64)) * 0.05).astype(F32)
    packed, state = quant.quantize_4bit(W, 64, "nf4", False)
    Wd = qlora.dequantized_weight(packed, state)
    x, A, B = rng.standard_normal((3, 64)), rng.standard_normal((2, 64)), rng.standard_normal((4, 2))
    x, A, B = (v.astype(F32).astype(np.float64) for v in (x, A, B))
    bias = rng.standard_normal(4).astype(F32).astype(np.float64)
    _ratio(
        _peft_qlora32(x, Wd, A, B, -0.5, bias),
        qlora.forward(x, packed, state, A, B, -0.5, bias),
        qlora.forward_error_bound(x, packed, state, A, B, -0.5, bias),
    )
    # all-ones weight: NF4 stores 1.0 exactly (code 15, absmax 1); B = 0 leaves the base sum alone
    k = 256
    packed, state = quant.quantize_4bit(np.ones((2, k), dtype=F32), 64, "nf4", False)
    x, A, B, bias = _climbing(k)[None, :], np.ones((1, k)), np.zeros((2, 1)), np.zeros(2)
    got = _peft_qlora32(x, qlora.dequantized_weight(packed, state), A, B, 1.0, bias)
    worst = _ratio(
        got,
        qlora.forward(x, packed, state, A, B, 1.0, bias),
        qlora.forward_error_bound(x, packed, state, A, B, 1.0, bias),
    )
    print(f"qlora forward K={k}: worst error/bound {worst:.3f}")
    assert worst >= 0.9


@pytest.mark.parametrize("order", ["peft", "direct"])
@pytest.mark.parametrize("seed", range(6))
def test_dora_forward_bound_holds_on_random_float32_layers(seed, order):
    x, W, A, B, m, s, b = _random_dora(seed)
    got = _dora_forward32(x, W, A, B, m, s, b, order=order)
    _ratio(got, dora.forward(x, W, A, B, m, s, bias=b), dora.forward_error_bound(x, W, A, B, m, s, "float32", bias=b))


def test_dora_forward_bound_is_tight_on_a_climbing_base_sum():
    k, r = 256, 1
    x, W = _climbing(k)[None, :], np.ones((2, k))
    A, B, b = np.ones((r, k)), np.zeros((2, r)), np.zeros(2)
    m = np.linalg.norm(W, axis=1)  # f = 1: the bound's P coefficient is 1 + c|f| = 2
    worst = _ratio(
        _dora_forward32(x, W, A, B, m, 1.0, b, order="peft"),
        dora.forward(x, W, A, B, m, 1.0, bias=b),
        dora.forward_error_bound(x, W, A, B, m, 1.0, "float32", bias=b),
    )
    print(f"dora forward in={k}, r={r}: worst error/bound {worst:.3f}")
    assert worst >= 0.45  # (in − 1) / (2 (in + r + 5))


def test_dora_forward_bound_charges_the_bias_rounding_that_f_minus_1_scales():
    # x Wᵀ below half an ulp of b = 1: PEFT's base − b is 0, so (f − 1)·(base − b) loses (f − 1)·x Wᵀ whole;
    # the former bound (2|b| in place of (1 + |f − 1|)|b|) was exceeded here
    x, W, A, B = np.array([[0.3 * U32]]), np.ones((1, 1)), np.ones((1, 1)), np.zeros((1, 1))
    m, b = np.array([100.0]), np.ones(1)
    got = _dora_forward32(x, W, A, B, m, 1.0, b, order="peft")
    exact = dora.forward(x, W, A, B, m, 1.0, bias=b)
    error = abs(float(got[0, 0]) - exact[0, 0])
    in_f, r, f = 1, 1, 100.0
    former = precision.gamma(in_f + r + 10, "float32") * ((1 + (f - 1) + f) * 0.3 * U32 + 2 * 1.0)
    assert error > former
    print(f"dora forward, bias case: error {error:.3g}, former bound {former:.3g}")
    _ratio(got, exact, dora.forward_error_bound(x, W, A, B, m, 1.0, "float32", bias=b))


@pytest.mark.parametrize("seed", range(4))
def test_dora_backward_bound_holds_on_random_float32_layers(seed):
    x, W, A, B, m, s, _ = _random_dora(seed, n=6)
    g = np.random.default_rng(seed + 100).standard_normal((6, W.shape[0])).astype(F32).astype(np.float64)
    got = _dora_backward32(x, W, A, B, m, g, s)
    exact = dora.backward(x, W, A, B, m, g, s, mode="detached")
    bound = dora.backward_error_bound(x, W, A, B, m, g, s, "float32", mode="detached")
    for name in ("dx", "dA", "dB", "dm"):
        _ratio(got[name], getattr(exact, "d" + name[1:]), getattr(bound, "d" + name[1:]))


def test_dora_backward_bound_is_tight_on_a_climbing_sum_over_the_rows_of_x():
    n_rows, in_f, out_f, r = 256, 2, 2, 1
    x = np.stack([_climbing(n_rows), np.zeros(n_rows)], axis=1)  # dV = (G f)ᵀ x sums n_rows terms
    W, A, B = np.eye(out_f, in_f), np.ones((r, in_f)), np.zeros((out_f, r))
    m, g = np.ones(out_f), np.ones((n_rows, out_f))
    got = _dora_backward32(x, W, A, B, m, g, 1.0)
    exact = dora.backward(x, W, A, B, m, g, 1.0, mode="detached")
    bound = dora.backward_error_bound(x, W, A, B, m, g, 1.0, "float32", mode="detached")
    worst = _ratio(got["dB"], exact.dB, bound.dB)
    print(f"dora backward N={n_rows}: dB worst error/bound {worst:.3f}")
    assert worst >= 0.8  # (N − 1) / (N + in + out + r + 20)


def test_differential_bound_of_the_harness_holds_and_is_tight_on_a_climbing_sum():
    k = 256
    a, b = _climbing(k)[None, :], np.ones((k, 1))
    reference = a @ b  # float64, as the harness's reference
    # depth K: a float32 target also rounds its inputs and result (K + 2), the reference is within γ_K(f64)
    worst = _ratio(_matmul32(a, b), reference, bounds.differential(k, np.abs(a) @ np.abs(b), "float32"))
    print(f"differential K={k}: worst error/bound {worst:.3f}")
    assert worst >= 0.9
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 32)).astype(F32), rng.standard_normal((32, 3)).astype(F32)
    _ratio(_matmul32(a, b), a.astype(np.float64) @ b, bounds.differential(32, np.abs(a) @ np.abs(b), "float32"))
