"""Differential tests: the LoRA reference against PEFT 0.21.2 (torch CPU).

Every comparison is reported as error / bound, the bound derived from the unit
roundoff of the format PEFT computes in and the longest chain of roundings
(spec/lora.md, "Comparing with a peer"). Run with -s to see the figures.
"""

from __future__ import annotations

import numpy as np
import pytest

from refimpl import lora, precision
from tests._peers import require

torch = require("torch")
peft = require("peft")

WORST: dict[str, float] = {}


def _record(case: str, report: precision.BoundReport) -> None:
    WORST[case] = max(WORST.get(case, 0.0), report.worst_ratio)
    print(f"[peft] {case}: {report}")
    assert report.passed, f"{case}: {report}"


class _Net(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.lin = layer

    def forward(self, x):
        return self.lin(x)


def _peft_model(layer, r, alpha, **config):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], **config)
    return peft.get_peft_model(_Net(layer), cfg)


def _np(t) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _abs_forward(x, W, A, B, s, bias=None):
    m = np.abs(x) @ np.abs(W).T + abs(s) * (np.abs(x) @ np.abs(A).T) @ np.abs(B).T
    return m if bias is None else m + np.abs(bias)


def _fp32_bound(x, W, A, B, s, bias=None):
    """PEFT's fp32 forward: two dot products (in, then r terms) and three additions, all in fp32."""
    return precision.gamma(W.shape[1] + A.shape[0] + 4, "float32") * _abs_forward(x, W, A, B, s, bias)


def _randomize_B(layer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        B = layer.lora_B["default"].weight
        B.copy_(torch.randn(B.shape, generator=gen))


def _linear_case(in_f=24, out_f=16, r=4, alpha=8.0, seed=0, **config):
    torch.manual_seed(seed)
    base = torch.nn.Linear(in_f, out_f)
    model = _peft_model(base, r, alpha, **config)
    layer = model.base_model.model.lin
    return model, layer


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_peft_for_default_and_gaussian_init(init, use_rslora):
    r, alpha = 8, 16.0
    model, layer = _linear_case(r=r, alpha=alpha, init_lora_weights=init, use_rslora=use_rslora)
    s = lora.scaling(alpha, r, use_rslora=use_rslora)
    assert layer.scaling["default"] == pytest.approx(s, rel=1e-15)
    W, b = _np(layer.base_layer.weight), _np(layer.base_layer.bias)
    A, B = _np(layer.lora_A["default"].weight), _np(layer.lora_B["default"].weight)
    assert np.all(B == 0)  # ΔW = 0 at init
    if init is True:
        assert np.abs(A).max() <= 1 / np.sqrt(W.shape[1])  # kaiming_uniform(a=√5) bound 1/√in
    x = torch.randn(5, W.shape[1])
    with torch.no_grad():
        y0 = model(x)
    assert torch.equal(y0, layer.base_layer(x))  # identity at init, bit for bit
    _randomize_B(layer)
    B = _np(layer.lora_B["default"].weight)
    with torch.no_grad():
        y = _np(model(x))
    xn = _np(x)
    _record(
        f"forward init={init} rslora={use_rslora}",
        precision.compare_to_bound(y, lora.forward(xn, W, A, B, s, bias=b), _fp32_bound(xn, W, A, B, s, b)),
    )


def test_gaussian_init_std_is_one_over_r_like_peft():
    r = 16
    _, layer = _linear_case(in_f=512, out_f=64, r=r, alpha=16, init_lora_weights="gaussian")
    peft_std = float(_np(layer.lora_A["default"].weight).std())
    ours = lora.init(np.zeros((64, 512)), r, alpha=16, method="gaussian", rng=np.random.default_rng(0)).A.std()
    # 8192 draws each: the sample std is within 3% of 1/r at > 5 sigma
    assert abs(peft_std * r - 1) < 0.03 and abs(ours * r - 1) < 0.03


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_residual_inits_match_peft_through_products(method):
    r, alpha = 4, 8.0
    torch.manual_seed(1)
    base = torch.nn.Linear(20, 12, bias=False)
    W0 = _np(base.weight).copy()
    model = _peft_model(base, r, alpha, init_lora_weights=method)
    layer = model.base_model.model.lin
    s = layer.scaling["default"]
    peft_res, peft_delta = (
        _np(layer.base_layer.weight),
        s * _np(layer.lora_B["default"].weight) @ _np(layer.lora_A["default"].weight),
    )
    ours = lora.init(W0, r, alpha=alpha, method=method)
    our_delta = lora.delta(ours.A, ours.B, s)
    # PEFT factorises in fp32 (backward stable: γ_{mn}·‖W‖ in fp32); the split into the top-r part and
    # the residual moves by at most that times (1 + σ₁/gap) (Wedin), gap = σ_r − σ_{r+1} (PiSSA) or
    # the conditioning of the leading r columns (OLoRA: the projection onto span W[:, :r]).
    sv = np.linalg.svd(W0, compute_uv=False)
    lead = np.linalg.svd(W0[:, :r], compute_uv=False)
    amplification = 1 + (sv[0] / (sv[r - 1] - sv[r]) if method == "pissa" else lead[0] / lead[-1])
    bound = precision.gamma(W0.size, "float32") * sv[0] * amplification
    _record(f"init={method} ΔW", precision.compare_to_bound(peft_delta, our_delta, np.full(W0.shape, bound)))
    _record(f"init={method} W_res", precision.compare_to_bound(peft_res, ours.W, np.full(W0.shape, bound)))


@pytest.mark.parametrize("in_f, out_f, r", [(3, 5, 8), (12, 2, 6)])
def test_rank_above_min_in_out_matches_peft_forward_merge_and_counts(in_f, out_f, r):
    """r > min(in, out): PEFT builds A (r, in), B (out, r) and s = α/r; refimpl accepts the same operands
    (spec/lora.md §1) and agrees on the forward pass, the merge and the trainable-parameter count."""
    alpha = 16.0
    model, layer = _linear_case(in_f=in_f, out_f=out_f, r=r, alpha=alpha)
    A, s = _np(layer.lora_A["default"].weight), layer.scaling["default"]
    assert A.shape == (r, in_f) and layer.lora_B["default"].weight.shape == (out_f, r)
    assert s == pytest.approx(lora.scaling(alpha, r), rel=1e-15)
    ours_init = lora.init(np.zeros((out_f, in_f)), r, alpha=alpha, rng=np.random.default_rng(0))
    assert ours_init.A.shape == A.shape and ours_init.B.shape == (out_f, r)
    assert np.abs(A).max() <= 1 / np.sqrt(in_f) and np.abs(ours_init.A).max() <= 1 / np.sqrt(in_f)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == lora.param_count(in_f, out_f, r)
    _randomize_B(layer, 12)
    W, b, B = _np(layer.base_layer.weight).copy(), _np(layer.base_layer.bias), _np(layer.lora_B["default"].weight)
    x = torch.randn(4, in_f)
    with torch.no_grad():
        y = _np(model(x))
    xn = _np(x)
    _record(
        f"forward r={r} > min({in_f}, {out_f})",
        precision.compare_to_bound(y, lora.forward(xn, W, A, B, s, bias=b), _fp32_bound(xn, W, A, B, s, b)),
    )
    layer.merge(safe_merge=False)
    bound = precision.gamma(r + 3, "float32") * (np.abs(W) + abs(s) * np.abs(B) @ np.abs(A))
    _record(
        f"merge r={r} > min({in_f}, {out_f})",
        precision.compare_to_bound(_np(layer.base_layer.weight), lora.merge(W, A, B, s), bound),
    )


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_residual_inits_with_rank_above_min_keep_min_in_out_components_like_peft(method):
    """PEFT 0.21.2 slices r singular triplets / QR columns that stop at k = min(in, out) and assigns them as the
    adapter: A (k, in), B (out, k), s = α/r of the requested r. refimpl's init does the same (spec/lora.md §5)."""
    r, alpha, in_f, out_f = 7, 8.0, 6, 4
    k = min(in_f, out_f)
    torch.manual_seed(13)
    base = torch.nn.Linear(in_f, out_f, bias=False)
    W0 = _np(base.weight).copy()
    model = _peft_model(base, r, alpha, init_lora_weights=method)
    layer = model.base_model.model.lin
    s = layer.scaling["default"]
    A, B = _np(layer.lora_A["default"].weight), _np(layer.lora_B["default"].weight)
    ours = lora.init(W0, r, alpha=alpha, method=method)
    assert A.shape == ours.A.shape == (k, in_f) and B.shape == ours.B.shape == (out_f, k)
    assert s == pytest.approx(lora.scaling(alpha, r), rel=1e-15)
    # the whole SVD / QR is taken: s·B A = W (PiSSA) or s·W (OLoRA), so no gap enters; fp32 factorisation
    # and product: γ_{mn}(fp32)·‖W‖ times the conditioning of W (a backward-stable factorisation of W + E)
    sv = np.linalg.svd(W0, compute_uv=False)
    bound = precision.gamma(W0.size, "float32") * sv[0] * (1 + sv[0] / sv[-1]) * max(1.0, abs(s))
    _record(
        f"init={method} r > min ΔW",
        precision.compare_to_bound(s * B @ A, lora.delta(ours.A, ours.B, s), np.full(W0.shape, bound)),
    )
    _record(
        f"init={method} r > min W_res",
        precision.compare_to_bound(_np(layer.base_layer.weight), ours.W, np.full(W0.shape, bound)),
    )


def test_fan_in_fan_out_conv1d_matches_peft():
    transformers = require("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(16, 24)  # nf=16 outputs, nx=24 inputs; weight (in, out)
    torch.manual_seed(2)
    with torch.no_grad():
        conv1d.weight.copy_(torch.randn(24, 16))
        conv1d.bias.copy_(torch.randn(16))
    model = _peft_model(conv1d, 4, 8.0, fan_in_fan_out=True)
    layer = model.base_model.model.lin
    _randomize_B(layer, 3)
    W, b = _np(layer.base_layer.weight), _np(layer.base_layer.bias)
    A, B, s = _np(layer.lora_A["default"].weight), _np(layer.lora_B["default"].weight), layer.scaling["default"]
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        y = _np(model(x))
    xn = _np(x)
    ours = lora.forward(xn, W, A, B, s, bias=b, fan_in_fan_out=True)
    _record("conv1d forward", precision.compare_to_bound(y, ours, _fp32_bound(xn, W.T, A, B, s, b)))
    layer.merge(safe_merge=False)
    merged = _np(layer.base_layer.weight)
    bound = precision.gamma(A.shape[0] + 2, "float32") * (np.abs(W) + abs(s) * (np.abs(B) @ np.abs(A)).T)
    _record("conv1d merge", precision.compare_to_bound(merged, lora.merge(W, A, B, s, fan_in_fan_out=True), bound))


def test_embedding_lora_matches_peft():
    V, d, r = 40, 12, 4
    torch.manual_seed(4)
    emb = torch.nn.Embedding(V, d)
    model = _peft_model(emb, r, 8.0, lora_dropout=0.3)
    layer = model.base_model.model.lin
    A, B = _np(layer.lora_embedding_A["default"]), _np(layer.lora_embedding_B["default"])
    assert A.shape == (r, V) and B.shape == (d, r) and np.all(A == 0)  # Embedding: A = 0, B ~ N(0, 1)
    with torch.no_grad():
        layer.lora_embedding_A["default"].copy_(torch.randn(r, V))
    A, E, s = _np(layer.lora_embedding_A["default"]), _np(layer.base_layer.weight), layer.scaling["default"]
    ids = torch.randint(0, V, (3, 9))
    model.train()  # PEFT never applies dropout to Embedding LoRA, even in training mode
    with torch.no_grad():
        y = _np(model(ids))
    idn = ids.numpy()
    bound = precision.gamma(r + 3, "float32") * (np.abs(E) + abs(s) * np.abs(A.T) @ np.abs(B.T))[idn]
    _record("embedding forward", precision.compare_to_bound(y, lora.embedding_forward(idn, E, A, B, s), bound))
    layer.merge()
    merged = _np(layer.base_layer.weight)
    mbound = precision.gamma(r + 3, "float32") * (np.abs(E) + abs(s) * np.abs(A.T) @ np.abs(B.T))
    _record("embedding merge", precision.compare_to_bound(merged, lora.merge(E, A, B, s, fan_in_fan_out=True), mbound))


def test_train_mode_dropout_with_the_same_mask_matches_peft():
    p = 0.25
    model, layer = _linear_case(r=4, alpha=8.0, lora_dropout=p)
    _randomize_B(layer, 5)
    x = torch.randn(6, 24)
    mask = lora.dropout_mask(np.random.default_rng(7), tuple(x.shape), p)

    class MaskDropout(torch.nn.Module):
        def forward(self, t):
            return t * torch.from_numpy(mask).to(t.dtype) / (1 - p)

    assert isinstance(layer.lora_dropout["default"], torch.nn.Dropout)
    layer.lora_dropout["default"] = MaskDropout()
    model.train()
    with torch.no_grad():
        y = _np(model(x))
    W, b = _np(layer.base_layer.weight), _np(layer.base_layer.bias)
    A, B, s = _np(layer.lora_A["default"].weight), _np(layer.lora_B["default"].weight), layer.scaling["default"]
    xn = _np(x)
    ours = lora.forward(xn, W, A, B, s, bias=b, dropout_mask=mask, dropout_p=p)
    bound = precision.gamma(W.shape[1] + A.shape[0] + 5, "float32") * _abs_forward(xn / (1 - p), W, A, B, s, b)
    _record("train dropout forward", precision.compare_to_bound(y, ours, bound))


@pytest.mark.parametrize("safe", [False, True])
def test_merge_and_unmerge_match_peft_fp32(safe):
    _model, layer = _linear_case(r=4, alpha=8.0)
    _randomize_B(layer, 6)
    W = _np(layer.base_layer.weight).copy()
    A, B, s = _np(layer.lora_A["default"].weight), _np(layer.lora_B["default"].weight), layer.scaling["default"]
    layer.merge(safe_merge=safe)
    merged = _np(layer.base_layer.weight)
    mags = np.abs(W) + abs(s) * np.abs(B) @ np.abs(A)
    bound = precision.gamma(A.shape[0] + 3, "float32") * mags
    _record(f"merge fp32 safe={safe}", precision.compare_to_bound(merged, lora.merge(W, A, B, s), bound))
    layer.unmerge()
    back = _np(layer.base_layer.weight)
    _record(f"unmerge fp32 safe={safe}", precision.compare_to_bound(back, W, 2 * bound))


def test_bf16_base_with_fp32_adapters_follows_peft_casting():
    """A bf16 model: PEFT keeps the base in bf16, upcasts the adapters to fp32 (autocast_adapter_dtype),
    runs the LoRA branch in fp32 on x cast to fp32, and casts the sum back to bf16 (peft.md §2.6)."""
    torch.manual_seed(8)
    base = torch.nn.Linear(32, 16).to(torch.bfloat16)
    model = _peft_model(base, 4, 8.0)
    layer = model.base_model.model.lin
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    _randomize_B(layer, 9)
    x = torch.randn(5, 32).to(torch.bfloat16)
    with torch.no_grad():
        y = _np(model(x))
    W, b = _np(layer.base_layer.weight), _np(layer.base_layer.bias)
    A, B, s = _np(layer.lora_A["default"].weight), _np(layer.lora_B["default"].weight), layer.scaling["default"]
    xn = _np(x)
    # Emulation: bf16 base output (fp32 accumulation, one rounding to bf16), fp32 LoRA, bf16 sum.
    base_out = precision.round_to(xn @ W.T + b, "bfloat16")
    emulated = precision.round_to(base_out + lora.forward(xn, np.zeros_like(W), A, B, s), "bfloat16")
    u16 = precision.unit_roundoff("bfloat16")
    m_base = _abs_forward(xn, W, A, B, 0.0, b)
    m_lora = abs(s) * (np.abs(xn) @ np.abs(A).T) @ np.abs(B).T
    # PEFT's fp32 sums may land on the other side of a bf16 rounding boundary than the exact value:
    # each of the two bf16 roundings may then differ by one bf16 ulp (2u relative).
    bound = (
        precision.gamma(W.shape[1] + 2, "float32") * m_base
        + precision.gamma(A.shape[0] + 2, "float32") * m_lora
        + 2 * u16 * m_base
        + 2 * u16 * (m_base + m_lora)
    )
    _record("bf16 base forward", precision.compare_to_bound(y, emulated, bound))
    equal = float(np.mean(y == emulated))
    print(f"[peft] bf16 base forward: {equal:.1%} of outputs bit-identical to the emulation")

    # Merge in bf16: unsafe rounds W + ΔW once; safe rounds ΔW to bf16 first (peft.md §4.2)
    for safe in (False, True):
        model2 = _peft_model(torch.nn.Linear(32, 16).to(torch.bfloat16), 4, 8.0)
        l2 = model2.base_model.model.lin
        _randomize_B(l2, 10)
        W2 = _np(l2.base_layer.weight).copy()
        A2, B2 = _np(l2.lora_A["default"].weight), _np(l2.lora_B["default"].weight)
        l2.merge(safe_merge=safe)
        got = _np(l2.base_layer.weight)
        ours = lora.merge(W2, A2, B2, s, dtype="bfloat16", safe=safe)
        d_abs = abs(s) * np.abs(B2) @ np.abs(A2)
        # our ΔW is exact, PEFT's is fp32: the roundings may differ by one bf16 ulp each
        mb = (2 + 2 * safe) * u16 * (np.abs(W2) + d_abs) + precision.gamma(6, "float32") * d_abs
        _record(f"bf16 merge safe={safe}", precision.compare_to_bound(got, ours, mb))
        print(f"[peft] bf16 merge safe={safe}: {np.mean(got == ours):.2%} of elements bit-identical")


def test_torch_autograd_agrees_with_backward():
    rng = np.random.default_rng(11)
    x, W, b = rng.standard_normal((2, 3, 9)), rng.standard_normal((7, 9)), rng.standard_normal(7)
    A, B, g = rng.standard_normal((3, 9)), rng.standard_normal((7, 3)), rng.standard_normal((2, 3, 7))
    p, s = 0.2, 0.6
    mask = lora.dropout_mask(rng, x.shape, p)
    grads = lora.backward(x, W, A, B, g, s, dropout_mask=mask, dropout_p=p, need_dW=True, need_dbias=True)
    tx, tW, tb, tA, tB = (torch.tensor(v, requires_grad=True) for v in (x, W, b, A, B))
    xd = tx * torch.tensor(mask) / (1 - p)
    y = tx @ tW.T + tb + s * (xd @ tA.T) @ tB.T
    (y * torch.tensor(g)).sum().backward()
    mags = lora.backward(
        np.abs(x),
        np.abs(W),
        np.abs(A),
        np.abs(B),
        np.abs(g),
        s,
        dropout_mask=mask,
        dropout_p=p,
        need_dW=True,
        need_dbias=True,
    )
    gam = precision.gamma(9 + 3 + 7 + 6 + 4, "float64")
    for name, ours, theirs, mag in (
        ("dx", grads.dx, tx, mags.dx),
        ("dW", grads.dW, tW, mags.dW),
        ("dA", grads.dA, tA, mags.dA),
        ("dB", grads.dB, tB, mags.dB),
        ("dbias", grads.dbias, tb, mags.dbias),
    ):
        _record(f"autograd {name}", precision.compare_to_bound(ours, _np(theirs.grad), 2 * gam * mag))


def test_zz_report_worst_ratio_against_peft():
    """Print the summary figure for the closing note (runs after the cases above in this file)."""
    if not WORST:
        pytest.skip("no PEFT case ran in this process (e.g. -k selection or xdist split)")
    worst_case = max(WORST, key=WORST.get)
    print(f"\n[peft] {len(WORST)} PEFT cases; worst error/bound = {WORST[worst_case]:.3g} ({worst_case})")
    assert WORST[worst_case] <= 1.0
