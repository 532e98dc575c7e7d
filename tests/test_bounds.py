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

The conformance rows' bounds (``bounds.*_depth`` through ``bounds.differential``, as the harness applies them
to a float32 target), measured the same way: lora.scaling 0.336, lora.delta 0.977, lora.forward 0.958,
lora.backward 0.951, lora.merge/unmerge 0.973, lora.embedding_forward 0.973, qlora.forward 0.958,
qlora.forward_error_bound 0.955, dora.weight_norm/init_magnitude 0.479, dora.direction/merge/embedding_forward
0.238, dora.unmerge 0.973, dora.forward_sequential 0.322, merging.task_arithmetic 0.977, merging.linear 0.488,
merging.ties/magnitude_prune/elect_and_merge 0.977, merging.dare 0.973, merging.l1_rescaled 0.492,
merging.lora_delta 0.977, merging.slerp 0.053; lora.init 0.0087 (PiSSA) / 0.0054 (OLoRA),
merging.lowrank_factors 0.00095 and merging.lora_svd 0.0011 on random matrices (backward-error bounds of
LAPACK through perturbation theory: no floor claimed).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from refimpl import bounds, dora, lora, merging, precision, qlora, quant
from refimpl.conformance._values import flatten
from refimpl.conformance.table import op_table

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


# ---------------------------------------------------------------------------- the conformance rows' bounds
#
# Each row's tolerance is bounds.differential(k, magnitude, dtype), k from a ``bounds.*_depth`` function and
# ``magnitude`` the row's formula on |inputs|. Checked here as the harness applies it to a float32 target:
# (γ_{k+2}(float32) + γ_k(float64))·magnitude against the float64 reference. The float32 evaluations follow
# the spec's order one IEEE operation at a time; the climbing inputs put the longest sum of the op on
# ``_climbing``. The floors are below the measured worst error / bound (printed with -s) and above what a
# count loose by a factor of 2 would give, except where the magnitude charges a term twice (stated).

ROWS = op_table()


def _row_ratio(op: str, case: dict, got: dict[str, np.ndarray]) -> float:
    """Worst error / bound of the float32 evaluation ``got`` under the conformance row's float32 bound."""
    module, fn = op.rsplit(".", 1)
    expected = flatten(getattr(importlib.import_module(f"refimpl.{module}"), fn)(**case))
    bound = ROWS[op].tolerance.bounds(case, "float32")
    return max(_ratio(value, expected[name], bound[name]) for name, value in got.items())


def _f32_normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Normal values representable in float32, held in float64 (the case is exact in both formats)."""
    return rng.standard_normal(shape).astype(F32).astype(np.float64)


def _report_floor(what: str, worst: float, floor: float) -> None:
    print(f"{what}: worst error/bound {worst:.3f} (floor {floor})")
    assert worst >= floor


#: v² = 2⁻²⁴(1 + 2⁻⁸ + 2⁻¹⁸) exactly: a sum of squares [1, v², v², …] climbs as ``_climbing`` does
V_UP = 2.0**-12 * (1 + 2.0**-9)


def _climbing_squares(k: int) -> np.ndarray:
    out = np.full(k, V_UP)
    out[0] = 1.0
    return out


# ---- LoRA (spec/lora.md)


def _lora_forward32(x, W, A, B, s, bias, mask=None, p=0.0) -> np.ndarray:
    """y = (x Wᵀ + b) + s·((x ⊙ keep) Aᵀ) Bᵀ, keep = mask / (1 − p), in float32."""
    x32 = x.astype(F32)
    xd = x32 if mask is None else (x32 * (mask.astype(F32) / F32(1.0 - F32(p))).astype(F32)).astype(F32)
    base = (_matmul32(x32, W.T) + bias.astype(F32)).astype(F32)
    return (base + (_matmul32(_matmul32(xd, A.T), B.T) * F32(s)).astype(F32)).astype(F32)


def test_lora_scaling_row_bound_holds_for_ranks_1_to_64():
    worst = 0.0
    for r in range(1, 65):
        for rs in (False, True):
            got = F32(1.7) / (F32(np.sqrt(F32(r))) if rs else F32(r))
            case = {"alpha": float(F32(1.7)), "r": r, "use_rslora": rs}
            worst = max(worst, _row_ratio("lora.scaling", case, {"out": np.asarray(got)}))
    # two roundings charged k + 2 = 4 times over: a single rounding reaches at most 1/4 of it
    _report_floor("lora.scaling", worst, 0.3)


def test_lora_delta_row_bound_holds_and_is_tight_on_a_climbing_rank_sum():
    rng = np.random.default_rng(10)
    A, B = _f32_normal(rng, 3, 5), _f32_normal(rng, 4, 3)
    _row_ratio("lora.delta", {"A": A, "B": B, "scaling": -0.75}, {"out": _matmul32(B, A) * F32(-0.75)})
    r = 256
    A, B = np.ones((r, 1)), _climbing(r)[None, :]
    worst = _row_ratio("lora.delta", {"A": A, "B": B, "scaling": 1.0}, {"out": _matmul32(B, A)})
    _report_floor(f"lora.delta r={r}", worst, 0.9)  # (r − 1) / (r + 4)


def test_lora_forward_row_bound_holds_with_dropout_and_is_tight_on_a_climbing_input_sum():
    rng = np.random.default_rng(11)
    x, W, A, B, b = (_f32_normal(rng, *s) for s in ((3, 16), (4, 16), (2, 16), (4, 2), (4,)))
    mask = (rng.random((3, 16)) > 0.3).astype(np.float64)
    case = {"x": x, "W": W, "A": A, "B": B, "scaling": 2.0, "bias": b, "dropout_mask": mask, "dropout_p": 0.3}
    _row_ratio("lora.forward", case, {"out": _lora_forward32(x, W, A, B, 2.0, b, mask, 0.3)})
    k = 256
    x, W, A, B, b = _climbing(k)[None, :], np.ones((1, k)), np.zeros((1, k)), np.zeros((1, 1)), np.zeros(1)
    case = {"x": x, "W": W, "A": A, "B": B, "scaling": 1.0, "bias": b}
    worst = _row_ratio("lora.forward", case, {"out": _lora_forward32(x, W, A, B, 1.0, b)})
    _report_floor(f"lora.forward in={k}", worst, 0.9)  # (in − 1) / (in + r + 8)


def _lora_forward_batched32(x, W, adapters, index, bias) -> np.ndarray:
    """y_t = (x_t Wᵀ + b) + s_i·(x_t A_iᵀ) B_iᵀ per token, in float32 (index −1: the base alone)."""
    y = (_matmul32(x.astype(F32), W.T) + bias.astype(F32)).astype(F32)
    for t, i in enumerate(index):
        if i >= 0:
            A, B, s = adapters[i]
            lora = (_matmul32(_matmul32(x[t : t + 1].astype(F32), A.T), B.T) * F32(s)).astype(F32)
            y[t] = (y[t] + lora[0]).astype(F32)
    return y


def test_lora_forward_batched_row_bound_holds_on_mixed_adapters_and_is_tight_on_a_climbing_input_sum():
    rng = np.random.default_rng(13)
    x, W, b = _f32_normal(rng, 5, 16), _f32_normal(rng, 4, 16), _f32_normal(rng, 4)
    adapters = [(_f32_normal(rng, r, 16), _f32_normal(rng, 4, r), s) for r, s in ((2, 0.5), (5, -1.25))]
    index = np.array([0, -1, 1, 1, 0])
    case = {"x": x, "W": W, "adapters": adapters, "adapter_index": index, "bias": b}
    _row_ratio("lora.forward_batched", case, {"out": _lora_forward_batched32(x, W, adapters, index, b)})
    k = 256
    x, W, b = _climbing(k)[None, :], np.ones((1, k)), np.zeros(1)
    adapters = [(np.zeros((1, k)), np.zeros((1, 1)), 1.0)]
    case = {"x": x, "W": W, "adapters": adapters, "adapter_index": np.array([0]), "bias": b}
    worst = _row_ratio("lora.forward_batched", case, {"out": _lora_forward_batched32(x, W, adapters, [0], b)})
    _report_floor(f"lora.forward_batched in={k}", worst, 0.9)  # (in − 1) / (in + r + 4), charged twice


def _lora_backward32(x, W, A, B, g, s) -> dict[str, np.ndarray]:
    """spec/lora.md §4 (eval form) in float32."""
    gB = _matmul32(g, B)
    return {
        "out.dx": (_matmul32(g, W) + (_matmul32(gB, A) * F32(s)).astype(F32)).astype(F32),
        "out.dA": (_matmul32(gB.T, x) * F32(s)).astype(F32),
        "out.dB": (_matmul32(g.T, _matmul32(x, A.T)) * F32(s)).astype(F32),
    }


def test_lora_backward_row_bound_holds_and_is_tight_on_a_climbing_sum_over_rows():
    rng = np.random.default_rng(12)
    x, W, A, B, g = (_f32_normal(rng, *s) for s in ((5, 6), (4, 6), (2, 6), (4, 2), (5, 4)))
    case = {"x": x, "W": W, "A": A, "B": B, "grad_y": g, "scaling": 0.5}
    _row_ratio("lora.backward", case, _lora_backward32(x, W, A, B, g, 0.5))
    n = 256  # dB = s·gᵀ(x Aᵀ) sums n rows
    x, W, A, B, g = _climbing(n)[:, None], np.ones((1, 1)), np.ones((1, 1)), np.zeros((1, 1)), np.ones((n, 1))
    case = {"x": x, "W": W, "A": A, "B": B, "grad_y": g, "scaling": 1.0}
    worst = _row_ratio("lora.backward", case, {"out.dB": _lora_backward32(x, W, A, B, g, 1.0)["out.dB"]})
    _report_floor(f"lora.backward N={n}", worst, 0.9)  # (N − 1) / (N + in + out + r + 8)


@pytest.mark.parametrize("op", ["lora.merge", "lora.unmerge"])
def test_lora_merge_row_bound_holds_and_is_tight_on_a_climbing_rank_sum(op):
    sign = 1.0 if op == "lora.merge" else -1.0
    key = "W" if op == "lora.merge" else "W_merged"
    rng = np.random.default_rng(13)
    W, A, B = _f32_normal(rng, 4, 5), _f32_normal(rng, 3, 5), _f32_normal(rng, 4, 3)
    got = (W.astype(F32) + F32(sign) * (_matmul32(B, A) * F32(1.5)).astype(F32)).astype(F32)
    _row_ratio(op, {key: W, "A": A, "B": B, "scaling": 1.5}, {"out": got})
    r = 256
    W, A, B = np.zeros((1, 1)), np.ones((r, 1)), _climbing(r)[None, :]
    worst = _row_ratio(op, {key: W, "A": A, "B": B, "scaling": 1.0}, {"out": F32(sign) * _matmul32(B, A)})
    _report_floor(f"{op} r={r}", worst, 0.9)  # (r − 1) / (r + 5)


def test_lora_embedding_forward_row_bound_holds_and_is_tight_on_a_climbing_rank_sum():
    rng = np.random.default_rng(14)
    E, A, B, ids = _f32_normal(rng, 7, 3), _f32_normal(rng, 2, 7), _f32_normal(rng, 3, 2), np.array([0, 6, 3])
    got = (E[ids].astype(F32) + (_matmul32(A.T[ids], B.T) * F32(0.5)).astype(F32)).astype(F32)
    _row_ratio("lora.embedding_forward", {"ids": ids, "E": E, "A": A, "B": B, "scaling": 0.5}, {"out": got})
    r = 256
    E, A, B, ids = np.zeros((1, 1)), _climbing(r)[:, None], np.ones((1, r)), np.array([0])
    case = {"ids": ids, "E": E, "A": A, "B": B, "scaling": 1.0}
    worst = _row_ratio("lora.embedding_forward", case, {"out": _matmul32(A.T[ids], B.T)})
    _report_floor(f"lora.embedding_forward r={r}", worst, 0.9)  # (r − 1) / (r + 5)


def _aligned(got: np.ndarray, ref: np.ndarray, axis: int) -> np.ndarray:
    """``got``'s singular vectors (rows for axis=1, columns for axis=0) with the reference's signs."""
    sign = np.sign(np.sum(got * ref, axis=axis, keepdims=True))
    return got * np.where(sign == 0, 1.0, sign)


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_lora_init_row_bound_holds_on_float32_lapack_factors(method):
    worst = 0.0
    for seed in range(4):
        rng = np.random.default_rng(20 + seed)
        W, r, alpha = _f32_normal(rng, 6, 9), 3, 6.0
        case = {"W": W, "r": r, "alpha": alpha, "method": method}
        ref = lora.init(**case)
        s = alpha / r
        if method == "pissa":
            u, sv, vh = np.linalg.svd(W.astype(F32), full_matrices=False)
            root = np.sqrt(sv[:r] / F32(s))
            A32, B32 = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        else:
            q, rf = np.linalg.qr(W.astype(F32), mode="reduced")
            A32, B32 = rf[:r], q[:, :r]
        A32 = _aligned(A32.astype(np.float64), ref.A, axis=1)
        B32 = _aligned(B32.astype(np.float64), ref.B, axis=0)
        W32 = (W.astype(F32) - (F32(s) * _matmul32(B32, A32)).astype(F32)).astype(F32)
        worst = max(worst, _row_ratio("lora.init", case, {"out.W": W32, "out.A": A32, "out.B": B32}))
    # a backward-error bound (LAPACK's p(m, n) charged as out + in + 8) through first-order perturbation
    # theory: its worst case needs adversarial spectra, so no tightness floor is claimed here
    print(f"lora.init {method}: worst error/bound {worst:.3g} on random float32 weights")


# ---- DoRA (spec/dora.md)


def _norm32(V: np.ndarray) -> np.ndarray:
    return np.array([np.sqrt(_dot32(row, row)) for row in V], dtype=F32)


@pytest.mark.parametrize("op", ["dora.weight_norm", "dora.init_magnitude"])
def test_dora_norm_row_bound_holds_and_is_tight_on_a_climbing_sum_of_squares(op):
    rng = np.random.default_rng(30)
    W, A, B = _f32_normal(rng, 4, 12), _f32_normal(rng, 2, 12), _f32_normal(rng, 4, 2)
    V = (W.astype(F32) + (_matmul32(B, A) * F32(0.5)).astype(F32)).astype(F32)
    _row_ratio(op, {"W": W, "A": A, "B": B, "scaling": 0.5}, {"out": _norm32(V)})
    k = 256
    W, A, B = _climbing_squares(k)[None, :], np.zeros((1, k)), np.zeros((1, 1))
    worst = _row_ratio(op, {"W": W, "A": A, "B": B, "scaling": 1.0}, {"out": _norm32(W)})
    # the square root halves the sum's relative error: (in − 1) / (2 (in + r + 6))
    _report_floor(f"{op} in={k}", worst, 0.45)


def test_dora_direction_and_merge_row_bounds_hold_and_are_tight_on_a_climbing_norm():
    rng = np.random.default_rng(31)
    W, A, B, m = _f32_normal(rng, 4, 12), _f32_normal(rng, 2, 12), _f32_normal(rng, 4, 2), _f32_normal(rng, 4)
    V = (W.astype(F32) + (_matmul32(B, A) * F32(0.5)).astype(F32)).astype(F32)
    n = _norm32(V)
    _row_ratio("dora.direction", {"W": W, "A": A, "B": B, "scaling": 0.5}, {"out": V / n[:, None]})
    f = (m.astype(F32) / n).astype(F32)
    got = {"out.W": f[:, None] * V, "out.weight_norm": n}
    _row_ratio("dora.merge", {"W": W, "A": A, "B": B, "m": m, "scaling": 0.5}, got)
    k = 256
    W, A, B, m = _climbing_squares(k)[None, :], np.zeros((1, k)), np.zeros((1, 1)), np.ones(1)
    n = _norm32(W)
    V = W.astype(F32)
    case = {"W": W, "A": A, "B": B, "scaling": 1.0}
    worst = _row_ratio("dora.direction", case, {"out": V / n[:, None]})
    # the magnitude charges n's error on |V| and on c|V| (c = 1 here), and the root halves it: ≈ 1/4
    _report_floor(f"dora.direction in={k}", worst, 0.2)
    f = (F32(1.0) / n).astype(F32)
    worst = _row_ratio("dora.merge", {**case, "m": m}, {"out.W": f[:, None] * V})
    _report_floor(f"dora.merge in={k}", worst, 0.2)


def test_dora_unmerge_row_bound_holds_and_is_tight_on_a_climbing_rank_sum():
    rng = np.random.default_rng(32)
    Wm, A, B = _f32_normal(rng, 4, 6), _f32_normal(rng, 2, 6), _f32_normal(rng, 4, 2)
    m, n = np.abs(_f32_normal(rng, 4)) + 1, np.abs(_f32_normal(rng, 4)) + 1
    f = (m.astype(F32) / n.astype(F32)).astype(F32)
    got = (Wm.astype(F32) / f[:, None] - (_matmul32(B, A) * F32(0.5)).astype(F32)).astype(F32)
    case = {"W_merged": Wm, "A": A, "B": B, "m": m, "scaling": 0.5, "weight_norm": n}
    _row_ratio("dora.unmerge", case, {"out": got})
    r = 256
    Wm, A, B = np.zeros((1, 1)), np.ones((r, 1)), _climbing(r)[None, :]
    case = {"W_merged": Wm, "A": A, "B": B, "m": np.ones(1), "scaling": 1.0, "weight_norm": np.ones(1)}
    worst = _row_ratio("dora.unmerge", case, {"out": -_matmul32(B, A)})
    _report_floor(f"dora.unmerge r={r}", worst, 0.9)  # (r − 1) / (r + 5)


def test_dora_embedding_forward_row_bound_holds_and_is_tight_on_a_climbing_vocabulary_norm():
    rng = np.random.default_rng(33)
    E, A, B, m = _f32_normal(rng, 9, 3), _f32_normal(rng, 2, 9), _f32_normal(rng, 3, 2), _f32_normal(rng, 3)
    ids = np.array([0, 8, 4])
    V = (E.T.astype(F32) + (_matmul32(B, A) * F32(0.5)).astype(F32)).astype(F32)  # (d, vocabulary)
    f = (m.astype(F32) / _norm32(V)).astype(F32)
    got = (f[:, None] * V).T[ids]
    _row_ratio("dora.embedding_forward", {"ids": ids, "E": E, "A": A, "B": B, "m": m, "scaling": 0.5}, {"out": got})
    k = 256
    E, A, B, ids = _climbing_squares(k)[:, None], np.zeros((1, k)), np.zeros((1, 1)), np.array([0])
    V = E.T.astype(F32)
    f = (F32(1.0) / _norm32(V)).astype(F32)
    case = {"ids": ids, "E": E, "A": A, "B": B, "m": np.ones(1), "scaling": 1.0}
    worst = _row_ratio("dora.embedding_forward", case, {"out": (f[:, None] * V).T[ids]})
    _report_floor(f"dora.embedding_forward V={k}", worst, 0.2)  # as dora.merge


def _sequential32(x, W, adapters, bias) -> np.ndarray:
    """z₀ = x Wᵀ, z_i = f_i ⊙ (z_{i−1} + s_i (x A_iᵀ) B_iᵀ), y = z_T + b, in float32 (spec/dora.md §6)."""
    z = _matmul32(x, W.T)
    for ad in adapters:
        V = (W.astype(F32) + (_matmul32(ad.B, ad.A) * F32(ad.scaling)).astype(F32)).astype(F32)
        f = (np.asarray(ad.m, dtype=F32) / _norm32(V)).astype(F32)
        term = (_matmul32(_matmul32(x, ad.A.T), ad.B.T) * F32(ad.scaling)).astype(F32)
        z = (f * (z + term).astype(F32)).astype(F32)
    return (z + bias.astype(F32)).astype(F32)


def test_dora_forward_sequential_row_bound_holds_and_is_tight_on_a_climbing_base_sum():
    rng = np.random.default_rng(34)
    x, W, b = _f32_normal(rng, 3, 8), _f32_normal(rng, 4, 8), _f32_normal(rng, 4)
    ads = [
        dora.DoraAdapter(_f32_normal(rng, r, 8), _f32_normal(rng, 4, r), _f32_normal(rng, 4), s)
        for r, s in ((2, 0.5), (3, -1.0), (1, 2.0))
    ]
    case = {"x": x, "W": W, "adapters": ads, "bias": b}
    _row_ratio("dora.forward_sequential", case, {"out": _sequential32(x, W, ads, b)})
    k = 256  # one adapter with B = 0 and m = ‖W‖ = 16: f = 1 exactly, z₀'s sum climbs
    x, W = _climbing(k)[None, :], np.ones((1, k))
    ads = [dora.DoraAdapter(np.zeros((1, k)), np.zeros((1, 1)), np.array([16.0]), 1.0)]
    case = {"x": x, "W": W, "adapters": ads, "bias": np.zeros(1)}
    worst = _row_ratio("dora.forward_sequential", case, {"out": _sequential32(x, W, ads, np.zeros(1))})
    # the magnitude is f·z₀ + (1 + c)·z₁ = 3 z₀ here (each f's error charged on z): ≈ (in − 1) / (3 (in + 6))
    _report_floor(f"dora.forward_sequential in={k}", worst, 0.3)


# ---- merging (spec/merging.md)


def _weighted_sum32(taus, w) -> np.ndarray:
    """Σ_t w_t τ_t in order t = 1 … T (spec/merging.md §3), in float32."""
    acc = np.zeros(np.shape(taus[0]), dtype=F32)
    for tau, wt in zip(taus, w, strict=True):
        acc = (acc + (np.asarray(tau, dtype=F32) * F32(wt)).astype(F32)).astype(F32)
    return acc


def _climbing_tasks(n_tasks: int) -> list[np.ndarray]:
    """T one-entry task vectors [1], [t], [t], …: their sum in order climbs."""
    return [np.array([v]) for v in _climbing(n_tasks)]


def test_task_arithmetic_and_linear_row_bounds_hold_and_are_tight_on_a_climbing_task_sum():
    rng = np.random.default_rng(40)
    taus, w = [_f32_normal(rng, 6) for _ in range(4)], _f32_normal(rng, 4)
    got = (_weighted_sum32(taus, w) * F32(0.5)).astype(F32)
    _row_ratio("merging.task_arithmetic", {"task_vectors": taus, "weights": w, "lam": 0.5}, {"out": got})
    w_pos = np.abs(w) + 0.25  # Σ w away from 0; a divisor with cancellation is charged by its condition
    got = (_weighted_sum32(taus, w_pos) / F32(np.sum(w_pos.astype(F32), dtype=F32))).astype(F32)
    _row_ratio("merging.linear", {"tensors": taus, "weights": w_pos}, {"out": got})
    n = 256
    taus, ones = _climbing_tasks(n), np.ones(n)
    worst = _row_ratio("merging.task_arithmetic", {"task_vectors": taus}, {"out": _weighted_sum32(taus, ones)})
    _report_floor(f"merging.task_arithmetic T={n}", worst, 0.9)  # (T − 1) / (T + 4)
    got = (_weighted_sum32(taus, ones) / F32(n)).astype(F32)
    worst = _row_ratio("merging.linear", {"tensors": taus}, {"out": got})
    # normalize: the magnitude's divisor factor 1 + Σ|w| / |Σ w| is 2 for positive weights
    _report_floor(f"merging.linear T={n}", worst, 0.45)


def test_ties_prune_dare_and_elect_row_bounds_are_tight_on_a_climbing_task_sum():
    # density 1 and positive entries: nothing is trimmed or dropped, every entry is elected; the merge
    # is the climbing sum, divided by the count T (ties, dare-ties, elect_and_merge) or not (prune, dare)
    n = 256
    taus, ones = _climbing_tasks(n), np.ones(n)
    total = _weighted_sum32(taus, ones)
    mean = (total / F32(n)).astype(F32)
    cases = {
        "merging.ties": ({"task_vectors": taus, "density": 1.0}, mean),
        "merging.magnitude_prune": ({"task_vectors": taus, "density": 1.0}, total),
        "merging.dare": ({"task_vectors": taus, "density": 1.0, "masks": [np.ones(1, bool)] * n}, total),
        "merging.elect_and_merge": (
            {
                "trimmed": taus,
                "weights": ones,
                "elect": "sum",
                "zero_sign": "positive",
                "weight_stage": "after_election",
                "divisor": "count",
            },
            mean,
        ),
    }
    for op, (case, got) in cases.items():
        _report_floor(f"{op} T={n}", _row_ratio(op, case, {"out": got}), 0.9)  # (T − 1) / (T + 5) at least


def test_ties_and_dare_row_bounds_hold_on_random_float32_tasks():
    rng = np.random.default_rng(41)
    taus, w = [_f32_normal(rng, 32) for _ in range(3)], np.array([1.0, 0.5, 2.0])
    masks = [rng.random(32) < 0.5 for _ in range(3)]
    # DARE linear, inverse rescale (the paper): λ Σ_t w_t (τ_t ⊙ m_t / d)
    hat = [(np.asarray(t, dtype=F32) * m / F32(0.5)).astype(F32) for t, m in zip(taus, masks, strict=True)]
    got = (_weighted_sum32(hat, w) * F32(0.75)).astype(F32)
    case = {"task_vectors": taus, "weights": w, "density": 0.5, "masks": masks, "lam": 0.75}
    _row_ratio("merging.dare", case, {"out": got})
    # TIES, PEFT profile at density 1: elect on Σ τ_t, keep the agreeing entries, weighted mean by count
    score = _weighted_sum32(taus, np.ones(3))
    keep = [np.where(score >= 0, np.asarray(t) > 0, np.asarray(t) < 0) for t in taus]
    num = _weighted_sum32([np.asarray(t) * k for t, k in zip(taus, keep, strict=True)], w)
    got = (num / np.maximum(np.sum(keep, axis=0), 1).astype(F32)).astype(F32)
    _row_ratio("merging.ties", {"task_vectors": taus, "weights": w, "density": 1.0, "profile": "peft"}, {"out": got})


def test_l1_rescaled_row_bound_holds_and_is_tight_on_a_climbing_norm():
    rng = np.random.default_rng(42)
    tau, mask = _f32_normal(rng, 40), rng.random(40) < 0.6
    t32 = tau.astype(F32)
    before, after = _dot32(np.abs(t32), np.ones(40)), _dot32(np.abs(t32 * mask), np.ones(40))
    got = (t32 * mask * F32(before / after)).astype(F32)
    _row_ratio("merging.l1_rescaled", {"tau": tau, "mask": mask}, {"out": got})
    n = 256  # ‖τ‖₁ climbs; the mask drops the leading 1, so ‖τ ⊙ m‖₁ = (n − 1)·t is exact
    tau, mask = _climbing(n), np.arange(n) > 0
    t32 = tau.astype(F32)
    before, after = _dot32(t32, np.ones(n)), _dot32(t32 * mask, np.ones(n))
    got = (t32 * mask * F32(before / after)).astype(F32)
    worst = _row_ratio("merging.l1_rescaled", {"tau": tau, "mask": mask}, {"out": got})
    # one of the two norms' sums climbs here: (n − 1) / (2n + 2)
    _report_floor(f"merging.l1_rescaled n={n}", worst, 0.45)


def _slerp32(t: float, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float, float]:
    """mergekit's SLERP in float32 (spec/merging.md §6), without the fallback: (result, c0, c1)."""
    a32, b32 = a.astype(F32), b.astype(F32)
    na, nb = np.sqrt(_dot32(a32, a32)), np.sqrt(_dot32(b32, b32))
    dot = _dot32((a32 / na).astype(F32), (b32 / nb).astype(F32))
    omega = F32(np.arccos(dot))
    s = F32(np.sin(omega))
    c0, c1 = F32(F32(np.sin(F32(F32(1 - F32(t)) * omega))) / s), F32(F32(np.sin(F32(F32(t) * omega))) / s)
    return ((a32 * c0).astype(F32) + (b32 * c1).astype(F32)).astype(F32), float(c0), float(c1)


def test_slerp_row_bounds_hold_on_random_float32_endpoints_and_reach_a_floor_on_a_climbing_dot():
    worst = 0.0
    for seed in range(6):
        rng = np.random.default_rng(50 + seed)
        a, b, t = _f32_normal(rng, 64), _f32_normal(rng, 64), float(F32(rng.random()))
        got, c0, c1 = _slerp32(t, a, b)
        worst = max(worst, _row_ratio("merging.slerp", {"t": t, "v0": a, "v1": b}, {"out": got}))
        coefs = {"out.c0": np.asarray(c0), "out.c1": np.asarray(c1)}
        _row_ratio("merging.slerp_coefficients", {"t": t, "v0": a, "v1": b}, coefs)
    print(f"merging.slerp: worst error/bound {worst:.3g} on random float32 endpoints")
    n = 256  # ‖v₀‖² and ‖v₁‖² climb (``_climbing_squares``), cos Ω ≈ 0.999 (Ω ≈ 0.05, below the fallback)
    a = _climbing_squares(n)
    b = a + 0.05 * np.eye(n)[1]
    got, _, _ = _slerp32(0.5, a, b)
    worst = _row_ratio("merging.slerp", {"t": 0.5, "v0": a, "v1": b}, {"out": got})
    # measured 0.053: the magnitude charges the coefficients' sensitivity to cos Ω as (1/sin Ω + Ω + 1)
    # times γ_K absolute, where the realized error of cos Ω is the norms' (n − 1)u/2 relative; the bound is
    # loose by about 20x here, the loosest of the rows
    _report_floor(f"merging.slerp n={n}", worst, 0.04)


def test_lora_space_row_bounds_hold_and_lora_delta_is_tight_on_a_climbing_rank_sum():
    rng = np.random.default_rng(60)
    As = [_f32_normal(rng, r, 5) for r in (2, 3)]
    Bs = [_f32_normal(rng, 4, r) for r in (2, 3)]
    sc, w = np.array([0.5, 2.0]), np.array([1.0, -0.5])
    c = [F32(wi * si) for wi, si in zip(w, sc, strict=True)]
    delta = _weighted_sum32([_matmul32(b, a) for a, b in zip(As, Bs, strict=True)], c)
    case = {"As": As, "Bs": Bs, "scalings": sc, "weights": w}
    _row_ratio("merging.lora_delta", case, {"out": delta})
    cat_A = np.concatenate([(a.astype(F32) * ci).astype(F32) for a, ci in zip(As, c, strict=True)])
    _row_ratio("merging.lora_cat", case, {"out.0": cat_A, "out.1": np.concatenate(Bs, axis=1)})
    r = 256
    As, Bs = [np.ones((r, 1))], [_climbing(r)[None, :]]
    worst = _row_ratio("merging.lora_delta", {"As": As, "Bs": Bs, "scalings": [1.0]}, {"out": _matmul32(Bs[0], As[0])})
    _report_floor(f"merging.lora_delta r={r}", worst, 0.9)  # (r − 1) / (r + 4)


def test_svd_factor_row_bounds_hold_on_float32_lapack_factors():
    worst = 0.0
    for seed in range(4):
        rng = np.random.default_rng(70 + seed)
        delta = _f32_normal(rng, 6, 8)
        for split in ("B", "sqrt"):
            case = {"delta": delta, "rank": 3, "split": split}
            ref_A, ref_B = merging.lowrank_factors(**case)
            u, s, vh = np.linalg.svd(delta.astype(F32), full_matrices=False)
            root = np.sqrt(s[:3])
            b, a = (u[:, :3] * s[:3], vh[:3]) if split == "B" else (u[:, :3] * root, root[:, None] * vh[:3])
            a = _aligned(a.astype(np.float64), ref_A, axis=1)
            b = _aligned(b.astype(np.float64), ref_B, axis=0)
            worst = max(worst, _row_ratio("merging.lowrank_factors", case, {"out.0": a, "out.1": b}))
    # as lora.init: a generously charged backward error through σ₁/gap, no tightness floor claimed
    print(f"merging.lowrank_factors: worst error/bound {worst:.3g} on random float32 matrices")


# ---- QLoRA (spec/nf4.md): the forward row and the row of forward_error_bound itself


def test_qlora_forward_row_bound_is_the_lora_forward_count_and_is_tight_on_a_climbing_base_sum():
    k = 256  # all-ones weight: NF4 stores 1.0 exactly; B = 0 leaves the base sum alone
    packed, state = quant.quantize_4bit(np.ones((2, k), dtype=F32), 64, "nf4", False)
    x, A, B, bias = _climbing(k)[None, :], np.ones((1, k)), np.zeros((2, 1)), np.zeros(2)
    case = {"x": x, "packed": packed, "state": state, "A": A, "B": B, "scaling": 1.0, "bias": bias}
    got = _peft_qlora32(x, qlora.dequantized_weight(packed, state), A, B, 1.0, bias)
    _report_floor(f"qlora.forward in={k}", _row_ratio("qlora.forward", case, {"out": got}), 0.9)


def _qlora_bound32(x, W, A, B, s, bias, g_base: float, g_lora: float) -> np.ndarray:
    """forward_error_bound's formula evaluated in float32: g_base·(|x||W|ᵀ + |b|) + g_lora·|s|·(|x||A|ᵀ)|B|ᵀ."""
    base = (_matmul32(np.abs(x), np.abs(W).T) + np.abs(bias).astype(F32)).astype(F32)
    lora_term = (_matmul32(_matmul32(np.abs(x), np.abs(A).T), np.abs(B).T) * F32(abs(s))).astype(F32)
    return ((base * F32(g_base)).astype(F32) + (lora_term * F32(g_lora)).astype(F32)).astype(F32)


def test_qlora_forward_error_bound_row_bound_holds_and_is_tight_on_a_climbing_sum():
    def gammas(k_in: int, r: int) -> tuple[float, float]:
        u, g = precision.unit_roundoff("float32"), lambda n: precision.gamma(n, "float32")
        return (1 + g(k_in + 1)) * (1 + u) ** 2 - 1, (1 + g(k_in)) * (1 + g(r)) * (1 + u) ** 4 - 1

    rng = np.random.default_rng(80)
    W = (rng.standard_normal((4, 64)) * 0.05).astype(F32)
    packed, state = quant.quantize_4bit(W, 64, "nf4", False)
    x, A, B, bias = (_f32_normal(rng, *s) for s in ((3, 64), (2, 64), (4, 2), (4,)))
    case = {"x": x, "packed": packed, "state": state, "A": A, "B": B, "scaling": -0.5, "bias": bias}
    got = _qlora_bound32(x, qlora.dequantized_weight(packed, state), A, B, -0.5, bias, *gammas(64, 2))
    _row_ratio("qlora.forward_error_bound", case, {"out": got})
    k = 256  # the lora term's in-term sum climbs (W = 0 would not quantize to a nonzero base: B carries it)
    packed, state = quant.quantize_4bit(np.zeros((1, k), dtype=F32), 64, "nf4", False)
    x, A, B, bias = _climbing(k)[None, :], np.ones((1, k)), np.ones((1, 1)), np.zeros(1)
    case = {"x": x, "packed": packed, "state": state, "A": A, "B": B, "scaling": 1.0, "bias": bias}
    got = _qlora_bound32(x, qlora.dequantized_weight(packed, state), A, B, 1.0, bias, *gammas(k, 1))
    worst = _row_ratio("qlora.forward_error_bound", case, {"out": got})
    _report_floor(f"qlora.forward_error_bound in={k}", worst, 0.9)  # (in − 1) / (in + r + 10)


# ---- the LoRA-space merges not covered above


def test_lora_factor_linear_and_lora_svd_row_bounds_hold_on_random_float32_adapters():
    rng = np.random.default_rng(90)
    As, Bs = [_f32_normal(rng, 2, 5) for _ in range(3)], [_f32_normal(rng, 4, 2) for _ in range(3)]
    sc, w = np.array([0.5, 2.0, 1.0]), np.array([1.0, -0.5, 0.25])
    c = (w * sc).astype(F32)
    root = np.sqrt(np.abs(c)).astype(F32)
    a = _weighted_sum32(As, (np.sign(c) * root).astype(F32))
    b = _weighted_sum32(Bs, root)
    case = {"As": As, "Bs": Bs, "scalings": sc, "weights": w}
    _row_ratio("merging.lora_factor_linear", case, {"out.0": a, "out.1": b})
    ref_A, ref_B = merging.lora_svd(**case, rank=2)
    delta = _weighted_sum32([_matmul32(b, a) for a, b in zip(As, Bs, strict=True)], c)
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    got_A = _aligned(vh[:2].astype(np.float64), ref_A, axis=1)
    got_B = _aligned((u[:, :2] * s[:2]).astype(np.float64), ref_B, axis=0)
    worst = _row_ratio("merging.lora_svd", {**case, "rank": 2}, {"out.0": got_A, "out.1": got_B})
    print(f"merging.lora_svd: worst error/bound {worst:.3g} on random float32 adapters")


# ---- results stored in a narrower format (spec/conventions.md §2)


@pytest.mark.parametrize("storage", ["float16", "bfloat16", "float8_e5m2"])
def test_stored_range_of_the_merge_row_is_attained_and_no_wider_than_the_bound_plus_two_roundings(storage):
    # the range [rd(v − e), rd(v + e)] is attained at both ends (rd of a value within the bound) and is wider
    # than rd(v) alone only where v lies within e of a tie of the storage format (or cancels: e > an ulp of v)
    rng = np.random.default_rng(41)
    W, A, B = rng.standard_normal((48, 64)), rng.standard_normal((4, 64)) * 0.5, rng.standard_normal((48, 4)) * 0.5
    case = {"W": W, "A": A, "B": B, "scaling": 0.75, "dtype": storage}
    rng_ = ROWS["lora.merge"].tolerance.stored(case, "float32")["out"]
    v, e = rng_.base, rng_.e_outer
    assert np.array_equal(
        e,
        bounds.differential(
            bounds.lora_merge_unrounded_depth(4), np.abs(W) + 0.75 * (np.abs(B) @ np.abs(A)), "float32"
        ),
    )
    lo, hi = rng_.ends(1.0)
    assert np.array_equal(lo, precision.round_to(v - e, storage))
    assert np.array_equal(hi, precision.round_to(v + e, storage))
    # each end is within half an ulp of v ∓ e: the range is no wider than the bound plus the two roundings
    assert (hi - lo <= 2 * e + (precision.ulp(lo, storage) + precision.ulp(hi, storage)) / 2).all()
    wide = lo != hi
    print(f"{storage}: {int(wide.sum())} of {v.size} stored ranges wider than rd(v)")
    assert wide.sum() < v.size // 20  # float32 error is far below a storage ulp: the range is almost always rd(v)
