"""DoRA reference (refimpl.dora): properties, gradient checks, special values and bad input.

Differential tests against PEFT are in tests/test_dora_peft.py. Every bounded
comparison uses precision.compare_to_bound with a bound derived from the float64
unit roundoff and the reduction lengths; the worst error / bound is printed.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import bounds, dora, lora, precision
from tests._peers import require

F64 = "float64"


def _report(label: str, rep: precision.BoundReport) -> None:
    print(f"[dora] {label}: {rep}")
    assert rep.passed, f"{label}: {rep}"


def _layer(seed: int, out_f: int, in_f: int, r: int, n: int = 3, *, zero_B: bool = False, s: float = 0.75):
    """Random operands with a trained-looking adapter (B ≠ 0) and magnitude (m ≠ ‖V‖)."""
    g = np.random.default_rng(seed)
    W = g.standard_normal((out_f, in_f)) / np.sqrt(in_f)
    A = g.standard_normal((r, in_f)) / np.sqrt(in_f)
    B = np.zeros((out_f, r)) if zero_B else 0.5 * g.standard_normal((out_f, r))
    m = dora.weight_norm(W, A, B, s) * g.uniform(0.5, 1.5, out_f)
    x = g.standard_normal((n, in_f))
    bias = g.standard_normal(out_f)
    grad_y = g.standard_normal((n, out_f))
    return dict(W=W, A=A, B=B, m=m, s=s, x=x, bias=bias, grad_y=grad_y)


shapes = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(1, 9),  # out
    st.integers(1, 9),  # in
    st.integers(1, 4),  # n rows of x
).flatmap(
    lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.just(t[2]), st.integers(1, min(t[1], t[2])), st.just(t[3]))
)


# ---------------------------------------------------------------------------- tier 1: names and shapes


def test_public_api_names_exist():
    for name in (
        "weight_norm",
        "init_magnitude",
        "forward",
        "backward",
        "merge",
        "unmerge",
        "param_count",
        "direction",
        "embedding_forward",
        "forward_sequential",
        "forward_error_bound",
        "backward_error_bound",
    ):
        assert callable(getattr(dora, name)), name


def test_shapes_of_every_result():
    L = _layer(0, 5, 7, 2, n=4)
    assert dora.weight_norm(L["W"], L["A"], L["B"], L["s"]).shape == (5,)
    assert dora.forward(L["x"], L["W"], L["A"], L["B"], L["m"], L["s"]).shape == (4, 5)
    x3 = L["x"].reshape(2, 2, 7)
    assert dora.forward(x3, L["W"], L["A"], L["B"], L["m"], L["s"]).shape == (2, 2, 5)
    g = dora.backward(x3, L["W"], L["A"], L["B"], L["m"], L["grad_y"].reshape(2, 2, 5), L["s"])
    assert (g.dx.shape, g.dA.shape, g.dB.shape, g.dm.shape) == ((2, 2, 7), (2, 7), (5, 2), (5,))
    mg = dora.merge(L["W"], L["A"], L["B"], L["m"], L["s"])
    assert mg.W.shape == (5, 7) and mg.weight_norm.shape == (5,)
    mt = dora.merge(L["W"].T, L["A"], L["B"], L["m"], L["s"], fan_in_fan_out=True)
    np.testing.assert_array_equal(mt.W, mg.W.T)


# ---------------------------------------------------------------------------- tier 2: properties


@given(shapes)
def test_zero_B_at_init_makes_forward_equal_to_base_exactly(shape):
    seed, out_f, in_f, r, n = shape
    L = _layer(seed, out_f, in_f, r, n, zero_B=True)
    m0 = dora.init_magnitude(L["W"], L["A"], L["B"], L["s"])
    y = dora.forward(L["x"], L["W"], L["A"], L["B"], m0, L["s"], bias=L["bias"])
    # m0 and the forward's norm are the same float64 computation, so f = 1 exactly and y = x Wᵀ + b.
    np.testing.assert_array_equal(y, L["x"] @ L["W"].T + L["bias"])


@given(shapes)
def test_at_init_forward_equals_the_lora_layer(shape):
    seed, out_f, in_f, r, n = shape
    L = _layer(seed, out_f, in_f, r, n)  # B ≠ 0 (e.g. a PiSSA-style init): m0 = ‖W + sBA‖ still gives f = 1
    m0 = dora.init_magnitude(L["W"], L["A"], L["B"], L["s"])
    y = dora.forward(L["x"], L["W"], L["A"], L["B"], m0, L["s"], bias=L["bias"])
    y_lora = lora.forward(L["x"], L["W"], L["A"], L["B"], L["s"], bias=L["bias"])
    bound = 2 * dora.forward_error_bound(L["x"], L["W"], L["A"], L["B"], m0, L["s"], F64, bias=L["bias"])
    _report("init: DoRA vs LoRA layer (float64)", precision.compare_to_bound(y, y_lora, bound))


@given(shapes)
def test_direction_rows_have_unit_norm(shape):
    seed, out_f, in_f, r, _ = shape
    L = _layer(seed, out_f, in_f, r)
    d = dora.direction(L["W"], L["A"], L["B"], L["s"])
    # ‖V/‖V‖‖: one division per element, a sum of in squares and a square root.
    rep = precision.compare_to_bound(np.linalg.norm(d, axis=1), np.ones(out_f), precision.gamma(in_f + 4, F64))
    _report("direction row norms", rep)


@given(shapes)
def test_merged_forward_equals_unmerged_forward(shape):
    seed, out_f, in_f, r, n = shape
    L = _layer(seed, out_f, in_f, r, n)
    merged = dora.merge(L["W"], L["A"], L["B"], L["m"], L["s"]).W
    y = dora.forward(L["x"], L["W"], L["A"], L["B"], L["m"], L["s"], bias=L["bias"])
    bound = 2 * dora.forward_error_bound(L["x"], L["W"], L["A"], L["B"], L["m"], L["s"], F64, bias=L["bias"])
    _report("merged vs unmerged forward", precision.compare_to_bound(L["x"] @ merged.T + L["bias"], y, bound))


@given(shapes, st.booleans())
def test_unmerge_with_the_cached_norm_recovers_the_base(shape, fifo):
    seed, out_f, in_f, r, _ = shape
    L = _layer(seed, out_f, in_f, r)
    W = L["W"].T if fifo else L["W"]
    mg = dora.merge(W, L["A"], L["B"], L["m"], L["s"], fan_in_fan_out=fifo)
    back = dora.unmerge(mg.W, L["A"], L["B"], L["m"], L["s"], mg.weight_norm, fan_in_fan_out=fifo)
    delta = np.abs(lora.delta(L["A"], L["B"], L["s"], fan_in_fan_out=fifo))
    # W + Δ, ×f, ÷f, −Δ with the same f and Δ bits: four roundings, each at most u·(|W| + 2|Δ|) (Δ to γ_r).
    bound = precision.gamma(4 + r, F64) * (np.abs(W) + 2 * delta)
    _report("unmerge(merge(W)) vs W", precision.compare_to_bound(back, W, bound))


def test_merge_alone_does_not_determine_the_norm():
    # Why unmerge takes the norm: W_merged = (m / n*) ⊙ (W + ΔW) fixes only the ratio, so unmerging with any
    # other norm gives a different, wrong base weight.
    L = _layer(1, 4, 6, 2)
    mg = dora.merge(L["W"], L["A"], L["B"], L["m"], L["s"])
    wrong = dora.unmerge(mg.W, L["A"], L["B"], L["m"], L["s"], 2 * mg.weight_norm)
    assert np.abs(wrong - L["W"]).max() > 0.1


@given(shapes)
def test_train_form_with_all_ones_mask_and_p0_equals_eval_form(shape):
    seed, out_f, in_f, r, n = shape
    L = _layer(seed, out_f, in_f, r, n)
    args = (L["x"], L["W"], L["A"], L["B"], L["m"], L["s"])
    y_eval = dora.forward(*args, bias=L["bias"])
    y_train = dora.forward(*args, bias=L["bias"], dropout_mask=np.ones_like(L["x"]), dropout_p=0.0)
    bound = 2 * dora.forward_error_bound(*args, F64, bias=L["bias"])
    _report("train form, no dropout vs eval form", precision.compare_to_bound(y_train, y_eval, bound))


def test_train_form_differs_from_the_naive_dropout_forms():
    # PEFT's formula (PR #1474): the base x Wᵀ keeps the undropped x; neither naive form does.
    L = _layer(2, 4, 6, 2, n=5)
    mask = (np.random.default_rng(3).random(L["x"].shape) > 0.5).astype(float)
    p = 0.5
    args = (L["W"], L["A"], L["B"], L["m"], L["s"])
    y = dora.forward(L["x"], *args, dropout_mask=mask, dropout_p=p)
    xd = L["x"] * mask / (1 - p)
    naive_all = dora.forward(xd, *args)
    f = L["m"] / dora.weight_norm(*args[:3], L["s"])
    naive_lora = f * (L["x"] @ L["W"].T) + f * L["s"] * (xd @ L["A"].T @ L["B"].T)
    assert np.abs(y - naive_all).max() > 0.01 and np.abs(y - naive_lora).max() > 0.01


def test_output_minus_bias_is_linear_in_the_magnitude_exactly():
    L = _layer(4, 5, 6, 3)
    args = (L["x"], L["W"], L["A"], L["B"])
    y1 = dora.forward(*args, L["m"], L["s"])
    y2 = dora.forward(*args, 2 * L["m"], L["s"])
    np.testing.assert_array_equal(y2, 2 * y1)  # a power-of-two factor commutes with every rounding


@given(shapes)
def test_embedding_forward_equals_the_linear_form_on_one_hot_inputs(shape):
    seed, dim, vocab, r, n = shape
    g = np.random.default_rng(seed)
    E = g.standard_normal((vocab, dim))
    A, B = g.standard_normal((r, vocab)), g.standard_normal((dim, r))
    m = g.uniform(0.5, 2.0, dim)
    ids = g.integers(0, vocab, size=n)
    y = dora.embedding_forward(ids, E, A, B, m, 0.5)
    onehot = np.eye(vocab)[ids]
    y_lin = dora.forward(onehot, E, A, B, m, 0.5, fan_in_fan_out=True)
    bound = 2 * dora.forward_error_bound(onehot, E, A, B, m, 0.5, F64, fan_in_fan_out=True)
    _report("embedding vs one-hot linear", precision.compare_to_bound(y, y_lin, bound))
    assert m.shape == dora.weight_norm(E, A, B, 0.5, embedding=True).shape == (dim,)


def test_embedding_at_init_is_the_base_lookup_exactly():
    g = np.random.default_rng(5)
    E, A, B = g.standard_normal((11, 4)), np.zeros((2, 11)), g.standard_normal((4, 2))  # PEFT: A = 0, B ~ N(0,1)
    m0 = dora.init_magnitude(E, A, B, 2.0, embedding=True)
    np.testing.assert_array_equal(m0, np.linalg.norm(E, axis=0))
    ids = np.array([[0, 3, 10], [3, 3, 1]])
    np.testing.assert_array_equal(dora.embedding_forward(ids, E, A, B, m0, 2.0), E[ids])


def test_sequential_adapters_single_adapter_equals_forward():
    L = _layer(6, 5, 7, 3)
    ad = dora.DoraAdapter(L["A"], L["B"], L["m"], L["s"])
    y = dora.forward_sequential(L["x"], L["W"], [ad], bias=L["bias"])
    y1 = dora.forward(L["x"], L["W"], L["A"], L["B"], L["m"], L["s"], bias=L["bias"])
    bound = 2 * dora.forward_error_bound(L["x"], L["W"], L["A"], L["B"], L["m"], L["s"], F64, bias=L["bias"])
    _report("sequential(1 adapter) vs forward", precision.compare_to_bound(y, y1, bound))


def test_sequential_adapters_equal_the_sequential_merge_and_not_the_summed_delta():
    L = _layer(7, 5, 7, 3)
    M = _layer(8, 5, 7, 2)
    W, x = L["W"], L["x"]
    a = dora.DoraAdapter(L["A"], L["B"], L["m"], L["s"])
    b = dora.DoraAdapter(M["A"], M["B"], M["m"], M["s"])
    y = dora.forward_sequential(x, W, [a, b], bias=L["bias"])
    W1 = dora.merge(W, a.A, a.B, a.m, a.scaling).W
    W2 = dora.merge(W1, b.A, b.B, b.m, b.scaling, unmerged_base=W).W
    # Bound: both sides evaluate f_b ⊙ (f_a ⊙ (W + Δ_a) + Δ_b); γ_k times that expression on absolute values,
    # with each f carrying its norm's condition number (see forward_error_bound), k covering both adapters.
    fa = np.abs(a.m) / dora.weight_norm(W, a.A, a.B, a.scaling)
    fb = np.abs(b.m) / dora.weight_norm(W, b.A, b.B, b.scaling)

    def cond(ad):
        v_abs = np.abs(W) + abs(ad.scaling) * np.abs(ad.B) @ np.abs(ad.A)
        return np.linalg.norm(v_abs, axis=1) / dora.weight_norm(W, ad.A, ad.B, ad.scaling)

    da = np.abs(a.scaling) * np.abs(a.B) @ np.abs(a.A)
    db = np.abs(b.scaling) * np.abs(b.B) @ np.abs(b.A)
    w_abs = (fb * cond(b))[:, None] * ((fa * cond(a))[:, None] * (np.abs(W) + da) + db)
    k = 2 * (7 + 3 + 10)
    bound = 2 * precision.gamma(k, F64) * (np.abs(x) @ w_abs.T + np.abs(L["bias"]))
    _report(
        "two adapters: sequential forward vs sequential merge",
        precision.compare_to_bound(y, x @ W2.T + L["bias"], bound),
    )
    summed = dora.forward(
        x, W, np.vstack([a.A, b.A]), np.hstack([a.B, b.B * (b.scaling / a.scaling)]), b.m, a.scaling, bias=L["bias"]
    )
    assert np.abs(y - summed).max() > 1e-3  # composition is not a DoRA layer of the summed delta


def test_conv_norm_is_the_linear_rule_on_the_flattened_kernel():
    g = np.random.default_rng(9)
    W = g.standard_normal((4, 3, 3, 3))
    A, B = g.standard_normal((2, 3, 3, 3)), g.standard_normal((4, 2, 1, 1))
    n = dora.weight_norm(W, A, B, 0.5)
    V = W + 0.5 * np.einsum("or,rikl->oikl", B[:, :, 0, 0], A)
    V_abs = np.abs(W) + 0.5 * np.einsum("or,rikl->oikl", np.abs(B[:, :, 0, 0]), np.abs(A))
    # Both sides: V to γ_{r+2}·|V|_abs, a 27-term sum of squares and a square root: γ_{27+r+4} on ‖V_abs‖
    # (bounds.dora_norm_depth, r = 2).
    n_abs = np.sqrt((V_abs**2).sum(axis=(1, 2, 3)))
    _report(
        "conv norm",
        precision.compare_to_bound(
            n, np.sqrt((V**2).sum(axis=(1, 2, 3))), 2 * precision.gamma(bounds.dora_norm_depth(27, 2), F64) * n_abs
        ),
    )
    mg = dora.merge(W, A, B, n * 2.0, 0.5)
    assert mg.W.shape == W.shape
    # f = 2n/n = 2 exactly, so W_merged = 2·(W + ΔW) up to the two evaluations of ΔW (γ_{r+2} each).
    _report("conv merge", precision.compare_to_bound(mg.W, 2.0 * V, 4 * precision.gamma(2 + 2, F64) * V_abs))


# ---------------------------------------------------------------------------- gradients


def _loss(L, *, mode_args, A=None, B=None, m=None, x=None):
    y = dora.forward(
        L["x"] if x is None else x,
        L["W"],
        L["A"] if A is None else A,
        L["B"] if B is None else B,
        L["m"] if m is None else m,
        L["s"],
        bias=L["bias"],
        **mode_args,
    )
    return float(np.sum(L["grad_y"] * y))


def _central_differences(L, mode_args):
    """∂⟨G, y⟩/∂θ by central differences, and a bound on their error: rounding of ⟨G, y⟩ (≤ E) over the step
    gives E/h; truncation is h²/6·|L'''|, with L''' from the 5-point stencil at the same step."""
    u = precision.unit_roundoff(F64)
    y_bound = dora.forward_error_bound(L["x"], L["W"], L["A"], L["B"], L["m"], L["s"], F64, bias=L["bias"])
    y = dora.forward(L["x"], L["W"], L["A"], L["B"], L["m"], L["s"], bias=L["bias"], **mode_args)
    if mode_args:  # the train form's base term uses the undropped x, so the bound takes both inputs
        xd = L["x"] * mode_args["dropout_mask"] / (1 - mode_args["dropout_p"])
        y_bound = y_bound + dora.forward_error_bound(xd, L["W"], L["A"], L["B"], L["m"], L["s"], F64)
    E = float(np.sum(np.abs(L["grad_y"]) * y_bound)) + precision.gamma(y.size, F64) * float(
        np.sum(np.abs(L["grad_y"] * y))
    )
    out = {}
    for name in ("A", "B", "m", "x"):
        theta = L[name]
        fd = np.empty_like(theta)
        bound = np.empty_like(theta)
        for idx in np.ndindex(theta.shape):
            h = u ** (1 / 3) * max(1.0, abs(theta[idx]))
            vals = {}
            for k in (-2, -1, 1, 2):
                t = theta.copy()
                t[idx] += k * h
                vals[k] = _loss(L, mode_args=mode_args, **{name: t})
            fd[idx] = (vals[1] - vals[-1]) / (2 * h)
            third = (vals[2] - 2 * vals[1] + 2 * vals[-1] - vals[-2]) / (2 * h**3)
            bound[idx] = E / h + h**2 / 6 * abs(third)
        out[name] = (fd, bound)
    return out


@pytest.mark.parametrize("form", ["eval", "train"])
def test_full_mode_backward_equals_central_finite_differences(form):
    L = _layer(11, 4, 5, 2, n=3)
    mode_args = {}
    if form == "train":
        mask = np.random.default_rng(12).random(L["x"].shape) > 0.4
        mode_args = dict(dropout_mask=mask.astype(float), dropout_p=0.4)
    g = dora.backward(L["x"], L["W"], L["A"], L["B"], L["m"], L["grad_y"], L["s"], mode="full", **mode_args)
    worst = 0.0
    for name, (fd, bound) in _central_differences(L, mode_args).items():
        rep = precision.compare_to_bound(getattr(g, "d" + name), fd, bound)
        _report(f"full-mode d{name} vs central differences ({form})", rep)
        worst = max(worst, rep.worst_ratio)
    print(f"[dora] full-mode gradient check ({form}): worst error/bound {worst:.3g}")


def test_detached_and_full_modes_differ_only_in_dA_dB():
    L = _layer(13, 4, 5, 2)
    args = (L["x"], L["W"], L["A"], L["B"], L["m"], L["grad_y"], L["s"])
    gd, gf = dora.backward(*args, mode="detached"), dora.backward(*args, mode="full")
    np.testing.assert_array_equal(gd.dx, gf.dx)
    np.testing.assert_array_equal(gd.dm, gf.dm)
    assert np.abs(gd.dA - gf.dA).max() > 1e-3 and np.abs(gd.dB - gf.dB).max() > 1e-3


def _torch_dora(torch, x, W, A, B, m, s, bias, *, detach, mask=None, p=0.0):
    """DoRA in torch, written independently of refimpl and of PEFT (float64 autograd)."""
    V = W + s * (B @ A)
    n = torch.linalg.norm(V, dim=1)
    n = n.detach() if detach else n
    f = m / n
    if mask is None:
        return f * (x @ V.T) + bias
    xd = x * mask / (1 - p)
    return x @ W.T + bias + (f - 1) * (xd @ W.T) + f * s * ((xd @ A.T) @ B.T)


@pytest.mark.parametrize("mode", ["detached", "full"])
@pytest.mark.parametrize("form", ["eval", "train"])
def test_backward_equals_torch_autograd_in_float64(mode, form):
    torch = require("torch")
    L = _layer(21, 6, 8, 3, n=5)
    mode_args = {}
    mask_t = None
    if form == "train":
        mask = (np.random.default_rng(22).random(L["x"].shape) > 0.3).astype(float)
        mode_args = dict(dropout_mask=mask, dropout_p=0.3)
        mask_t = torch.tensor(mask)
    T = {k: torch.tensor(L[k], requires_grad=k in ("x", "A", "B", "m")) for k in ("x", "W", "A", "B", "m", "bias")}
    y = _torch_dora(
        torch, T["x"], T["W"], T["A"], T["B"], T["m"], L["s"], T["bias"], detach=mode == "detached", mask=mask_t, p=0.3
    )
    y.backward(torch.tensor(L["grad_y"]))
    args = (L["x"], L["W"], L["A"], L["B"], L["m"], L["grad_y"], L["s"])
    g = dora.backward(*args, mode=mode, **mode_args)
    gb = dora.backward_error_bound(*args, F64, mode=mode, **mode_args)
    for name in ("x", "A", "B", "m"):
        rep = precision.compare_to_bound(getattr(g, "d" + name), T[name].grad.numpy(), 2 * getattr(gb, "d" + name))
        _report(f"{mode} d{name} vs torch autograd ({form})", rep)


# ---------------------------------------------------------------------------- special values: zero-norm rows


def _zero_row_layer():
    L = _layer(31, 4, 5, 2)
    W, B = L["W"].copy(), L["B"].copy()
    W[2] = 0.0
    B[2] = 0.0  # row 2 of W + s·B·A is exactly zero
    return L, W, B


def test_zero_norm_row_has_norm_and_magnitude_zero():
    L, W, B = _zero_row_layer()
    n = dora.weight_norm(W, L["A"], B, L["s"])
    assert n[2] == 0.0 and (np.delete(n, 2) > 0).all()
    assert dora.init_magnitude(W, L["A"], B, L["s"])[2] == 0.0


@pytest.mark.parametrize("op", ["direction", "forward", "backward", "merge", "embedding", "sequential"])
def test_zero_norm_row_raises_naming_the_row(op):
    L, W, B = _zero_row_layer()
    A, m, s, x = L["A"], L["m"], L["s"], L["x"]
    calls = {
        "direction": lambda: dora.direction(W, A, B, s),
        "forward": lambda: dora.forward(x, W, A, B, m, s),
        "backward": lambda: dora.backward(x, W, A, B, m, L["grad_y"], s),
        "merge": lambda: dora.merge(W, A, B, m, s),
        "embedding": lambda: dora.embedding_forward([0], W.T, A, B, m, s),
        "sequential": lambda: dora.forward_sequential(x, W, [dora.DoraAdapter(A, B, m, s)]),
    }
    with pytest.raises(ValueError, match=r"row norm is zero at output row\(s\) \[2\]"):
        calls[op]()


def test_zero_magnitude_row_outputs_exactly_the_bias():
    L = _layer(33, 4, 5, 2)
    m = L["m"].copy()
    m[1] = 0.0
    y = dora.forward(L["x"], L["W"], L["A"], L["B"], m, L["s"], bias=L["bias"])
    np.testing.assert_array_equal(y[:, 1], np.full(3, L["bias"][1]))


def test_full_mode_dV_is_orthogonal_to_each_row_of_V():
    # dV_full = (I − D Dᵀ) dV_detached per row; recover dV from dB = s·dV Aᵀ with A of full row rank r = in.
    L = _layer(34, 4, 3, 3)
    g = dora.backward(L["x"], L["W"], L["A"], L["B"], L["m"], L["grad_y"], L["s"], mode="full")
    dV = (g.dB / L["s"]) @ np.linalg.inv(L["A"].T)
    V = L["W"] + L["s"] * L["B"] @ L["A"]
    along = np.sum(dV * V, axis=1)
    scale = np.sum(np.abs(dV) * np.abs(V), axis=1)
    # Recovering dV through inv(Aᵀ) perturbs it by about κ(A)·u relative (backward-stable solve); the dot
    # products add γ_in: bound κ(A)·γ_{2·in+4}·Σ|dV||V|.
    bound = np.linalg.cond(L["A"]) * precision.gamma(2 * 3 + 4, F64) * scale
    _report("full-mode dV ⟂ rows of V", precision.compare_to_bound(along, np.zeros(4), bound))


def test_unmerge_rejects_zero_magnitude_and_nonpositive_norm():
    L = _layer(32, 4, 5, 2)
    mg = dora.merge(L["W"], L["A"], L["B"], L["m"], L["s"])
    m0 = L["m"].copy()
    m0[1] = 0.0
    with pytest.raises(ValueError, match=r"m: zero magnitude at output row\(s\) \[1\]"):
        dora.unmerge(mg.W, L["A"], L["B"], m0, L["s"], mg.weight_norm)
    bad = mg.weight_norm.copy()
    bad[3] = 0.0
    with pytest.raises(ValueError, match="weight_norm: expected positive row norms"):
        dora.unmerge(mg.W, L["A"], L["B"], L["m"], L["s"], bad)


# ---------------------------------------------------------------------------- bad input


def test_shape_mismatches_raise_naming_the_argument():
    L = _layer(41, 4, 5, 2)
    W, A, B, m, s, x = L["W"], L["A"], L["B"], L["m"], L["s"], L["x"]
    with pytest.raises(ValueError, match=r"A: expected shape \(\*, 5\), got shape \(2, 6\)"):
        dora.forward(x, W, np.zeros((2, 6)), B, m, s)
    with pytest.raises(ValueError, match=r"B: expected shape \(4, 2\), got shape \(3, 2\)"):
        dora.weight_norm(W, A, np.zeros((3, 2)), s)
    with pytest.raises(ValueError, match=r"B: expected shape \(4, 2\), got shape \(4, 3\)"):
        dora.merge(W, A, np.zeros((4, 3)), m, s)
    # the linear family's one x check (refimpl._linear_operands.layer_input) names the shape and in
    with pytest.raises(ValueError, match=r"x: expected shape \(3, 5\) \(a last axis of size in = 5\)"):
        dora.forward(np.zeros((3, 4)), W, A, B, m, s)
    with pytest.raises(ValueError, match=r"grad_y: expected shape \(3, 4\)"):
        dora.backward(x, W, A, B, m, np.zeros((3, 5)), s)
    with pytest.raises(ValueError, match=r"bias: expected shape \(4,\)"):
        dora.forward(x, W, A, B, m, s, bias=np.zeros(5))
    # r = 6 > min(out, in) = 4 is legal (as in PEFT), but A and B must agree on r
    with pytest.raises(ValueError, match=r"B: expected shape \(4, 6\), got shape \(4, 5\)"):
        dora.weight_norm(W, np.zeros((6, 5)), np.zeros((4, 5)), s)
    with pytest.raises(ValueError, match="W: expected a 2-D array"):
        dora.forward(x, W[0], A, B, m, s)
    with pytest.raises(ValueError, match=r"unmerged_base: expected shape \(4, 5\), got shape \(5, 4\)"):
        dora.merge(W, A, B, m, s, unmerged_base=W.T)
    with pytest.raises(ValueError, match=r"dropout_mask: expected the shape of x"):
        dora.forward(x, W, A, B, m, s, dropout_mask=np.ones((3, 4)), dropout_p=0.1)


@pytest.mark.parametrize("bad_m", [np.ones(5), np.ones((4, 1)), np.ones(3)])
def test_magnitude_of_the_wrong_shape_raises(bad_m):
    L = _layer(42, 4, 5, 2)
    with pytest.raises(ValueError, match=r"m: expected"):
        dora.forward(L["x"], L["W"], L["A"], L["B"], bad_m, L["s"])
    with pytest.raises(ValueError, match=r"m: expected"):
        dora.merge(L["W"], L["A"], L["B"], bad_m, L["s"])


@pytest.mark.parametrize("arg", ["x", "W", "A", "B", "m", "bias"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_values_raise_naming_the_argument(arg, value):
    L = _layer(43, 4, 5, 2)
    L[arg] = L[arg].copy()
    L[arg].flat[1] = value
    with pytest.raises(ValueError, match=rf"{arg}: expected finite values"):
        dora.forward(L["x"], L["W"], L["A"], L["B"], L["m"], L["s"], bias=L["bias"])


def test_non_finite_scaling_and_grad_raise():
    L = _layer(44, 4, 5, 2)
    with pytest.raises(ValueError, match="scaling: expected a finite number"):
        dora.weight_norm(L["W"], L["A"], L["B"], float("nan"))
    g = L["grad_y"].copy()
    g[0, 0] = np.inf
    with pytest.raises(ValueError, match="grad_y: expected finite values"):
        dora.backward(L["x"], L["W"], L["A"], L["B"], L["m"], g, L["s"])


def test_wrong_types_and_options_raise():
    L = _layer(45, 4, 5, 2)
    W, A, B, m, s, x = L["W"], L["A"], L["B"], L["m"], L["s"], L["x"]
    with pytest.raises(TypeError, match="W: expected a floating-point array"):
        dora.forward(x, W.astype(np.int64), A, B, m, s)
    with pytest.raises(TypeError, match="scaling: expected a real number"):
        dora.forward(x, W, A, B, m, "2")
    with pytest.raises(ValueError, match="mode: expected one of 'detached', 'full', got 'paper'"):
        dora.backward(x, W, A, B, m, L["grad_y"], s, mode="paper")
    with pytest.raises(ValueError, match=r"dropout_p: expected a value in \[0, 1\)"):
        dora.forward(x, W, A, B, m, s, dropout_mask=np.ones_like(x), dropout_p=1.0)
    with pytest.raises(ValueError, match="dropout_mask: expected only 0"):
        dora.forward(x, W, A, B, m, s, dropout_mask=np.full_like(x, 0.5), dropout_p=0.5)
    with pytest.raises(TypeError, match="fan_in_fan_out: expected a bool"):
        dora.weight_norm(W, A, B, s, fan_in_fan_out=1)
    with pytest.raises(TypeError, match="ids: expected an integer array"):
        dora.embedding_forward(np.array([0.0]), W.T, A, B, m, s)
    with pytest.raises(ValueError, match=r"ids: expected ids in \[0, 5\)"):
        dora.embedding_forward(np.array([5]), W.T, A, B, m, s)
    with pytest.raises(TypeError, match="adapters: expected a non-empty sequence"):
        dora.forward_sequential(x, W, dora.DoraAdapter(A, B, m, s))
    with pytest.raises(TypeError, match=r"adapters\[0\]: expected a DoraAdapter"):
        dora.forward_sequential(x, W, [(A, B, m, s)])
    with pytest.raises(ValueError, match="fan_in_fan_out: a convolution weight has no transposed layout"):
        dora.weight_norm(np.ones((4, 3, 3, 3)), np.ones((2, 3, 3, 3)), np.ones((4, 2, 1, 1)), s, fan_in_fan_out=True)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        dora.merge(W, A, B, m, s, dtype="int8")


# ---------------------------------------------------------------------------- parameter counts


def test_param_count_matches_the_peft_worked_example():
    # peft.md §8 (measured): Linear(10→6) + Embedding(20×6) + Conv(3→4, 3×3), r = 4, DoRA: 70 + 110 + 128 = 308.
    assert dora.param_count(10, 6, 4) == 70
    assert dora.param_count(20, 6, 4) == 110
    assert dora.param_count(3, 4, 4, kernel_size=(3, 3)) == 128
    assert dora.param_count(10, 6, 4) == lora.param_count(10, 6, 4, dora=True)


def test_param_count_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"r: expected an integer in \[1, inf\]"):
        dora.param_count(10, 6, 0)
    with pytest.raises(ValueError, match="r: expected a multiple of groups = 4"):
        dora.param_count(8, 12, 6, kernel_size=(3, 3), groups=4)
    with pytest.raises(ValueError, match="groups: only convolutions are grouped"):
        dora.param_count(8, 12, 4, groups=2)
    with pytest.raises(TypeError, match="in_features: expected an integer"):
        dora.param_count(8.0, 12, 4)


def test_rank_above_min_out_in_computes_the_dora_formula():
    """r = 7 > min(out, in) = 4, accepted as PEFT accepts it: forward is f ⊙ (x Vᵀ) + b with V = W + s·B A,
    f = m / ‖V‖, and the weight norm is ‖V‖ per row (B A has rank ≤ 4; the formula does not care)."""
    rng = np.random.default_rng(43)
    W, A, B = rng.standard_normal((4, 5)), rng.standard_normal((7, 5)), rng.standard_normal((4, 7))
    m, x, s = rng.uniform(0.5, 2.0, 4), rng.standard_normal((3, 5)), 0.25
    V = W + s * B @ A
    np.testing.assert_allclose(dora.weight_norm(W, A, B, s), np.linalg.norm(V, axis=1), rtol=1e-13)
    np.testing.assert_allclose(
        dora.forward(x, W, A, B, m, s), (m / np.linalg.norm(V, axis=1)) * (x @ V.T), rtol=1e-12, atol=1e-12
    )
    assert dora.param_count(5, 4, 7) == 7 * 9 + 4
