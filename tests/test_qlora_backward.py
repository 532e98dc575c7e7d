"""QLoRA backward (spec/nf4.md §13.1): properties, central differences, bitsandbytes + PEFT autograd, the bound.

* it is LoRA's backward over the dequantized weight (bit for bit), the frozen weight gets nothing;
* it is the derivative of ``qlora.forward``: the loss L = Σ g ⊙ y is linear in x, A, B and b separately, so a
  central difference with step 1 has no truncation error and differs from ⟨∇L, v⟩ by rounding only (float64);
* torch autograd through bitsandbytes' ``Linear4bit`` (CPU) with a PEFT LoRA adapter agrees within
  ``refimpl.bounds.qlora_backward`` (the bitsandbytes dequantize path that ran is printed);
* the bound holds on float32 evaluations in PEFT's order and is tight on climbing sums;
* the numba kernel agrees with the reference and rejects what it rejects.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import bounds, lora, precision, qlora, quant
from refimpl.kernels.numba_cpu import qlora as numba_qlora
from tests._peers import require

F32 = np.float32
U32 = 2.0**-24
T_UP = U32 * (1 + 2.0**-8)  # just over half an ulp of a partial sum in [1, 2): each addition rounds up by 2⁻²³
GRADS = ("dx", "dA", "dB", "dbias")
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@st.composite
def layers(draw):
    """A 4-bit base weight (every quant type, double quant, state dtype and blocksize; rows that are and are
    not whole blocks; more than 256 output rows), an adapter, x of 1 to 3 axes, g, and sometimes a mask."""
    n_in = draw(st.sampled_from([8, 13, 40, 64, 77]))
    n_out = draw(st.sampled_from([1, 5, 12, 260]))
    r = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sdt = draw(st.sampled_from(list(_DTYPES)))
    W = (rng.standard_normal((n_out, n_in)) * 0.1).astype(_DTYPES[sdt])
    packed, state = quant.quantize_4bit(
        W,
        draw(st.sampled_from([32, 64, 128, 4096])),
        draw(st.sampled_from(["nf4", "fp4"])),
        draw(st.booleans()),
    )
    lead = draw(st.sampled_from([(), (3,), (2, 3), (17,)]))
    c = {
        "x": rng.standard_normal((*lead, n_in)),
        "packed": packed,
        "state": state,
        "A": rng.standard_normal((r, n_in)),
        "B": rng.standard_normal((n_out, r)),
        "grad_y": rng.standard_normal((*lead, n_out)),
        "scaling": draw(st.sampled_from([0.5, -2.0, 0.0, 1.25])),
    }
    if draw(st.booleans()):
        c["dropout_mask"] = (rng.random(c["x"].shape) < 0.7).astype(np.float64)
        c["dropout_p"] = draw(st.sampled_from([0.0, 0.3, 0.5]))
    return c


def _opts(c):
    return {k: c[k] for k in ("dropout_mask", "dropout_p") if k in c}


# ---------------------------------------------------------------------------- properties


@given(layers())
def test_backward_equals_lora_backward_over_the_dequantized_weight_bit_for_bit(c):
    got = qlora.backward(**c, need_dbias=True)
    W = qlora.dequantized_weight(c["packed"], c["state"])
    want = lora.backward(c["x"], W, c["A"], c["B"], c["grad_y"], c["scaling"], **_opts(c), need_dbias=True)
    for name in GRADS:
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert not hasattr(got, "dW")  # the 4-bit weight is frozen: no gradient is offered for it


def _loss(c, **changed):
    """L = Σ g ⊙ y and the magnitude Σ |g| ⊙ y(|x|, |Ŵ|, |A|, |B|, |b|, |s|) that bounds its float64 rounding."""
    a = {**c, **changed}
    y = qlora.forward(a["x"], a["packed"], a["state"], a["A"], a["B"], a["scaling"], a.get("bias"), **_opts(a))
    W = np.abs(qlora.dequantized_weight(a["packed"], a["state"]))
    bias = None if a.get("bias") is None else np.abs(a["bias"])
    mag = lora.forward(np.abs(a["x"]), W, np.abs(a["A"]), np.abs(a["B"]), abs(a["scaling"]), bias=bias, **_opts(a))
    g = a["grad_y"]
    return float(np.sum(g * y)), float(np.sum(np.abs(g) * mag))


@given(layers(), st.integers(0, 2**32 - 1))
def test_gradients_equal_central_differences_of_forward_in_float64(c, seed):
    """L(θ + v) − L(θ − v) = 2⟨∂L/∂θ, v⟩ exactly (L is linear in each of x, A, B, b): only rounding differs,
    at most γ_k(float64)·(Σ|g||y|(|θ| + |v|) + ⟨|∂L/∂θ|(|inputs|), |v|⟩) with k the longest rounding chain."""
    rng = np.random.default_rng(seed)
    c = {**c, "bias": rng.standard_normal(c["state"].shape[0])}
    grads = qlora.backward(**{k: v for k, v in c.items() if k != "bias"}, need_dbias=True)
    n_in, n_out = c["state"].shape[1], c["state"].shape[0]
    k = n_in + n_out + c["A"].shape[0] + c["x"].size + 20
    W = np.abs(qlora.dequantized_weight(c["packed"], c["state"]))
    mags = lora.backward(
        np.abs(c["x"]),
        W,
        np.abs(c["A"]),
        np.abs(c["B"]),
        np.abs(c["grad_y"]),
        abs(c["scaling"]),
        **_opts(c),
        need_dbias=True,
    )
    for arg, grad, mag in (("x", "dx", "dx"), ("A", "dA", "dA"), ("B", "dB", "dB"), ("bias", "dbias", "dbias")):
        v = rng.standard_normal(c[arg].shape)
        plus, m_plus = _loss(c, **{arg: c[arg] + v})
        minus, m_minus = _loss(c, **{arg: c[arg] - v})
        central = (plus - minus) / 2
        dot = float(np.sum(getattr(grads, grad) * v))
        tol = precision.gamma(k, "float64") * (max(m_plus, m_minus) + float(np.sum(getattr(mags, mag) * np.abs(v))))
        assert abs(central - dot) <= tol, (arg, central, dot, tol)


def test_zero_grad_gives_zero_gradients_and_the_base_weight_is_used_untransposed():
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((5, 64)) * 0.1).astype(F32)
    packed, state = quant.quantize_4bit(W, 64, "nf4", True)
    x, A, B = rng.standard_normal((3, 64)), rng.standard_normal((2, 64)), rng.standard_normal((5, 2))
    z = qlora.backward(x, packed, state, A, B, np.zeros((3, 5)), 2.0, need_dbias=True)
    assert all(not np.any(getattr(z, n)) for n in GRADS)
    g = np.zeros((3, 5))
    g[1, 4] = 1.0  # ∂L/∂x of row 1 is row 4 of Ŵ (plus the LoRA branch, zero here with B = 0)
    d = qlora.backward(x, packed, state, A, np.zeros_like(B), g, 2.0)
    assert np.array_equal(d.dx[1], qlora.dequantized_weight(packed, state)[4])
    assert not np.any(d.dx[[0, 2]]) and not np.any(d.dA)


def test_backward_rejects_bad_input_with_the_argument_named():
    rng = np.random.default_rng(3)
    packed, state = quant.quantize_4bit((rng.standard_normal((6, 64)) * 0.1).astype(F32), 64)
    x, A, B, g = (
        rng.standard_normal((2, 64)),
        rng.standard_normal((2, 64)),
        rng.standard_normal((6, 2)),
        np.ones((2, 6)),
    )
    for fn in (qlora.backward, numba_qlora.backward):
        with pytest.raises(ValueError, match="grad_y"):
            fn(x, packed, state, A, B, g[:, :5], 1.0)
        with pytest.raises(ValueError, match="grad_y"):
            fn(x, packed, state, A, B, np.full((2, 6), np.nan), 1.0)
        with pytest.raises(ValueError, match="x: expected shape"):
            fn(x[:, :63], packed, state, A, B, g, 1.0)
        with pytest.raises(TypeError, match="state"):
            fn(x, packed, None, A, B, g, 1.0)
        with pytest.raises(ValueError, match="packed"):
            fn(x, packed[:-1], state, A, B, g, 1.0)
        with pytest.raises(TypeError, match="need_dbias"):
            fn(x, packed, state, A, B, g, 1.0, need_dbias="yes")
        with pytest.raises(ValueError, match="dropout_p"):
            fn(x, packed, state, A, B, g, 1.0, dropout_mask=np.ones_like(x), dropout_p=1.0)
        _, state1d = quant.quantize_4bit(np.ones(6 * 64, np.float32), 64)
        with pytest.raises(ValueError, match="2-D"):
            fn(x, packed, state1d, A, B, g, 1.0)


# ---------------------------------------------------------------------------- the numba kernel


@given(layers())
def test_numba_kernel_agrees_with_the_reference_within_the_float64_bound(c):
    got = numba_qlora.backward(**c, need_dbias=True)
    want = qlora.backward(**c, need_dbias=True)
    W = np.abs(qlora.dequantized_weight(c["packed"], c["state"]))
    mag = lora.backward(
        np.abs(c["x"]), W, np.abs(c["A"]), np.abs(c["B"]), np.abs(c["grad_y"]), abs(c["scaling"]), **_opts(c)
    )
    depth = sum(c["state"].shape) + c["A"].shape[0] + c["x"].size + 6
    for name in ("dx", "dA", "dB"):
        bound = bounds.differential(depth, getattr(mag, name), "float64")
        rep = precision.compare_to_bound(getattr(got, name), getattr(want, name), bound)
        assert rep.passed, (name, str(rep))
    assert np.array_equal(got.dbias, want.dbias)


@pytest.mark.parametrize("n_rows", [1, 3, 4, 9])
@pytest.mark.parametrize("tile_rows", [None, 1, 7, 256])
def test_numba_g_times_w_is_g_at_the_dequantized_weight_on_every_path_and_tile_split(n_rows, tile_rows):
    """g Ŵ from the one-pass few-row kernel (n_rows < 4, no tile_rows) or from tiles of decoded rows, with tails
    of tiles (out = 23 is not a multiple of 7) and rows that are not whole blocks (in = 40, blocksize 32)."""
    from refimpl.kernels.numba_cpu import quant as numba_quant

    rng = np.random.default_rng(n_rows)
    packed, state = quant.quantize_4bit(
        (rng.standard_normal((23, 40)) * 0.1).astype(ml_dtypes.bfloat16), 32, "nf4", True
    )
    g = rng.standard_normal((n_rows, 23))
    code = numba_quant.code_table(state)
    got = numba_qlora.dequant_matmul_t(g, packed.reshape(-1), state, code, tile_rows=tile_rows)
    W = qlora.dequantized_weight(packed, state)
    bound = bounds.differential(23, np.abs(g) @ np.abs(W), "float64")
    rep = precision.compare_to_bound(got, g @ W, bound)
    assert rep.passed, str(rep)


# ---------------------------------------------------------------------------- the bound, in float32


def _dot32(a, b):
    acc = F32(0.0)
    for ai, bi in zip(a.astype(F32), b.astype(F32), strict=True):
        acc = F32(acc + F32(ai * bi))
    return acc


def _matmul32(a, b):
    return np.array([[_dot32(a[i], b[:, j]) for j in range(b.shape[1])] for i in range(a.shape[0])], dtype=F32)


def _autograd32(x, W, A, B, g, s, keep):
    """The backward in torch autograd's order through PEFT's layer (bounds.qlora_backward's docstring), float32,
    one IEEE operation at a time."""
    x, W, A, B, g = (np.asarray(v, dtype=F32) for v in (x, W, A, B, g))
    k32 = None if keep is None else keep.astype(F32)
    xd = x if k32 is None else (x * k32).astype(F32)
    h = _matmul32(xd, A.T)
    gs = (g * F32(s)).astype(F32)
    dh = _matmul32(gs, B)
    lora_dx = _matmul32(dh, A)
    if k32 is not None:
        lora_dx = (lora_dx * k32).astype(F32)
    dbias = np.array([_dot32(g[:, o], np.ones(g.shape[0])) for o in range(g.shape[1])], dtype=F32)
    return {
        "dx": (_matmul32(g, W) + lora_dx).astype(F32),
        "dA": _matmul32(dh.T, xd),
        "dB": _matmul32(gs.T, h),
        "dbias": dbias,
    }


def _ratios(got, c, keep):
    ref = qlora.backward(**c, need_dbias=True)
    W = qlora.dequantized_weight(c["packed"], c["state"])
    bnd = bounds.qlora_backward(c["x"], W, c["A"], c["B"], c["grad_y"], c["scaling"], keep, "float32")
    out = {}
    for name in GRADS:
        rep = precision.compare_to_bound(np.asarray(got[name], np.float64), getattr(ref, name), getattr(bnd, name))
        assert rep.passed, (name, str(rep))
        out[name] = rep.worst_ratio
    return out


@pytest.mark.parametrize("seed", range(4))
def test_backward_bound_holds_on_float32_evaluations_in_autograd_order(seed):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.standard_normal(shape).astype(F32).astype(np.float64)  # noqa: E731
    packed, state = quant.quantize_4bit((rng.standard_normal((7, 40)) * 0.1).astype(F32), 32, "fp4", True)
    c = {
        "x": f32(6, 40),
        "packed": packed,
        "state": state,
        "A": f32(3, 40),
        "B": f32(7, 3),
        "grad_y": f32(6, 7),
        "scaling": float(F32(rng.choice([-2.0, 0.5, 1.0]))),
    }
    keep = None
    if seed % 2:
        c["dropout_mask"], c["dropout_p"] = (rng.random((6, 40)) < 0.75).astype(np.float64), 0.1
        keep = c["dropout_mask"] / 0.9  # 1/0.9 is not a float32: the keep factor rounds (ρ = 2)
    W = qlora.dequantized_weight(packed, state)
    _ratios(_autograd32(c["x"], W, c["A"], c["B"], c["grad_y"], c["scaling"], keep), c, keep)


def _climbing(k):
    out = np.full(k, T_UP)
    out[0] = 1.0
    return out


def test_backward_bound_is_tight_on_climbing_sums_over_out_features_and_rows():
    # dx's base term g Ŵ sums out = 256 products: all-ones weight (NF4 stores 1.0 exactly), B = 0
    n = 256
    packed, state = quant.quantize_4bit(np.ones((n, 16), dtype=F32), 64, "nf4", False)
    c = {
        "x": np.ones((1, 16)),
        "packed": packed,
        "state": state,
        "A": np.ones((1, 16)),
        "B": np.zeros((n, 1)),
        "grad_y": _climbing(n)[None, :],
        "scaling": 1.0,
    }
    W = qlora.dequantized_weight(packed, state)
    worst_dx = _ratios(_autograd32(c["x"], W, c["A"], c["B"], c["grad_y"], 1.0, None), c, None)["dx"]
    # dB = s gᵀ h sums N = 256 rows: h = x Aᵀ = 1 exactly
    packed, state = quant.quantize_4bit(np.ones((1, 1), dtype=F32), 64, "nf4", False)
    c = {
        "x": np.ones((n, 1)),
        "packed": packed,
        "state": state,
        "A": np.ones((1, 1)),
        "B": np.ones((1, 1)),
        "grad_y": _climbing(n)[:, None],
        "scaling": 1.0,
    }
    W = qlora.dequantized_weight(packed, state)
    worst = _ratios(_autograd32(c["x"], W, c["A"], c["B"], c["grad_y"], 1.0, None), c, None)
    print(f"\nqlora backward: worst error/bound dx (out = {n}) {worst_dx:.3f}, dB (N = {n}) {worst['dB']:.3f}")
    assert worst_dx >= 0.9  # (out − 1)(1 − 2⁻⁸) / (out + 2)
    assert worst["dB"] >= 0.9  # (N − 1)(1 − 2⁻⁸) / (N + 4)


# ---------------------------------------------------------------------------- bitsandbytes Linear4bit + PEFT, CPU


CASES = [  # (dtype, quant_type, nested, dropout, in_features): in % 16 == 0, even, odd take different
    # bitsandbytes CPU dequantize paths (AVX-512 kernel where the host has it / C++ scalar loop / torch fallback)
    ("float32", "nf4", True, True, 256),
    ("float32", "fp4", False, False, 200),
    ("float32", "fp4", True, True, 255),
    ("bfloat16", "nf4", True, True, 256),
    ("bfloat16", "fp4", False, False, 200),
    ("float16", "nf4", False, True, 255),
    ("float16", "fp4", True, False, 256),
]


@pytest.mark.peers
@pytest.mark.parametrize("dtype,quant_type,nested,dropout,K", CASES)
def test_backward_agrees_with_torch_autograd_through_bitsandbytes_and_peft_within_the_bound(
    dtype, quant_type, nested, dropout, K
):
    torch = require("torch")
    bnb = require("bitsandbytes")
    peft_bnb = require("peft.tuners.lora.bnb")
    from peft import LoraConfig

    from refimpl.conformance.peers import bnb_paths

    torch.manual_seed(1)
    tdt = getattr(torch, dtype)
    N, r, M, p = 80, 8, 7, 0.25
    base = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=tdt, compress_statistics=nested, quant_type=quant_type)
    base.weight = bnb.nn.Params4bit(
        (torch.randn(N, K) * 0.05).to(tdt), requires_grad=False, compress_statistics=nested, quant_type=quant_type
    )._quantize("cpu")
    base.bias = torch.nn.Parameter(torch.randn(N).to(tdt), requires_grad=True)  # for ∂L/∂b
    config = LoraConfig(r=r, lora_alpha=16, init_lora_weights=False, lora_dropout=p)
    layer = peft_bnb.Linear4bit(base, "default", config, r=r, lora_alpha=16, lora_dropout=p, init_lora_weights=False)
    layer.lora_A["default"].to(tdt)
    layer.lora_B["default"].to(tdt)
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and layer.training
    mask = (np.random.default_rng(2).random((M, K)) >= p).astype(np.float64) if dropout else None

    class FixedDropout(torch.nn.Module):
        """torch's inverted dropout with the given mask: x · (mask / (1 − p)) in the layer's dtype."""

        def __init__(self, keep):
            super().__init__()
            self.keep = keep

        def forward(self, t):
            return t * self.keep

    if dropout:
        layer.lora_dropout["default"] = FixedDropout(torch.from_numpy(mask / (1 - p)).to(tdt))
    else:
        layer.lora_dropout["default"] = torch.nn.Identity()
    x = torch.randn(M, K).to(tdt).requires_grad_(True)
    g = torch.randn(M, N).to(tdt)
    layer(x).backward(g)

    def f64(t):
        return t.detach().float().numpy().astype(np.float64)

    qs = {
        k: (v.numpy() if isinstance(v, torch.Tensor) else v)
        for k, v in layer.base_layer.weight.quant_state.as_dict(packed=True).items()
    }
    state = quant.QuantState.from_bnb_dict(qs)
    packed = layer.base_layer.weight.data.numpy()
    A, B = f64(layer.lora_A["default"].weight), f64(layer.lora_B["default"].weight)
    s = layer.scaling["default"]
    opts = {"dropout_mask": mask, "dropout_p": p} if dropout else {}
    ref = qlora.backward(f64(x), packed, state, A, B, f64(g), s, need_dbias=True, **opts)
    W = qlora.dequantized_weight(packed, state)
    keep = None if mask is None else mask / (1 - p)
    bnd = bounds.qlora_backward(f64(x), W, A, B, f64(g), s, keep, dtype, accumulate="float32")
    peer = {
        "dx": x.grad,
        "dA": layer.lora_A["default"].weight.grad,
        "dB": layer.lora_B["default"].weight.grad,
        "dbias": base.bias.grad,
    }
    assert layer.base_layer.weight.grad is None  # the 4-bit weight is frozen in the peer too
    path = bnb_paths.dequantize_path(tuple(state.shape), int(state.blocksize))
    lines = [
        f"qlora backward {dtype} {quant_type} nested={nested} dropout={dropout} in={K} vs bitsandbytes+PEFT autograd "
    ]
    lines.append(f"  bitsandbytes dequantize path: {bnb_paths.LABELS[path]}; " + bnb_paths.host_lines()[0])
    for name in GRADS:
        rep = precision.compare_to_bound(f64(peer[name]), getattr(ref, name), getattr(bnd, name))
        lines.append(f"  {name}: {rep}")
        assert rep.passed, f"{name}: {rep}"
    print("\n" + "\n".join(lines))
    # the base weight the peer differentiated through is refimpl's dequantized weight, bit for bit
    W_bnb = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    assert np.array_equal(f64(W_bnb).reshape(N, K), W)
