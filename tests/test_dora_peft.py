"""DoRA reference vs PEFT 0.21.2 ``use_dora=True`` (torch CPU): differential tests.

PEFT's parameters (W, A, B, m, bias: float32/bfloat16 values, exact in float64)
are read back and fed to refimpl.dora, which computes in float64; PEFT's result
must lie within a bound derived from float32 (and bfloat16) unit roundoff and
the reduction lengths (refimpl.dora.forward_error_bound). PEFT 0.21.2:
``tuners/lora/dora.py`` and ``tuners/lora/variants.py`` (spec/dora.md). Every comparison prints its worst error / bound.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from refimpl import dora, lora, precision
from tests._peers import require

pytestmark = pytest.mark.peers

F32, BF16 = "float32", "bfloat16"
IN, OUT, R, ALPHA, N = 24, 16, 4, 8, 6


def _report(label: str, rep: precision.BoundReport) -> None:
    print(f"[dora-peft] {label}: {rep}")
    assert rep.passed, f"{label}: {rep}"


def _np(t):
    return t.detach().double().numpy()


@pytest.fixture(scope="module")
def torch():
    t = require("torch")
    require("peft")
    return t


def _wrap(torch, base, target, *, dropout=0.0, names=("default",), init=True, seed=0, r=R):
    """get_peft_model with DoRA on ``target``; B and m are then randomised so that nothing is trivial."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r, lora_alpha=ALPHA, target_modules=[target], use_dora=True, lora_dropout=dropout, init_lora_weights=init
    )
    model = get_peft_model(base, cfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg)
    layer = getattr(model.base_model.model, target)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            if init:
                b = layer.lora_B[name].weight if name in layer.lora_B else layer.lora_embedding_B[name]
                b.copy_(0.3 * torch.randn(b.shape, generator=g, dtype=b.dtype))
                if name in layer.lora_embedding_A:
                    a = layer.lora_embedding_A[name]
                    a.copy_(torch.randn(a.shape, generator=g, dtype=a.dtype))
            mag = layer.lora_magnitude_vector[name].weight
            mag.mul_(0.5 + torch.rand(mag.shape, generator=g, dtype=mag.dtype))
    if len(names) > 1:
        layer.set_adapter(list(names))
    return model, layer


def _params(layer, name="default"):
    emb = name in getattr(layer, "lora_embedding_A", {})
    A = layer.lora_embedding_A[name] if emb else layer.lora_A[name].weight
    B = layer.lora_embedding_B[name] if emb else layer.lora_B[name].weight
    base = layer.get_base_layer()
    bias = getattr(base, "bias", None)
    return dict(
        W=_np(base.weight),
        A=_np(A),
        B=_np(B),
        m=_np(layer.lora_magnitude_vector[name].weight),
        s=layer.scaling[name],
        bias=None if bias is None else _np(bias),
    )


def _model(torch, module, name="lin"):
    """A one-layer network holding ``module`` under ``name`` (PEFT targets it by that name)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            setattr(self, name, module)

        def forward(self, x):
            return getattr(self, name)(x)

    return Net()


class _MaskDropout:
    """Replaces PEFT's nn.Dropout: the same keep mask refimpl gets, x ⊙ mask / (1 − p)."""

    def __new__(cls, torch, mask, p):
        class MaskDropout(torch.nn.Module):
            def forward(self, x):
                return x * mask.to(x.dtype) / (1 - p)

        return MaskDropout()


# ---------------------------------------------------------------------------- Linear / Conv1D, float32


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_eval_forward_matches_peft_float32(torch, kind):
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(1)
        lin = Conv1D(OUT, IN)
        with torch.no_grad():
            lin.weight.normal_(0, IN**-0.5)
            lin.bias.normal_()
    else:
        torch.manual_seed(1)
        lin = torch.nn.Linear(IN, OUT)
    model, layer = _wrap(torch, _model(torch, lin), "lin", dropout=0.1, seed=1)
    model.eval()  # eval: PEFT ignores the dropout module
    P = _params(layer)
    fifo = kind == "conv1d"
    x = torch.randn(N, IN)
    with torch.no_grad():
        y = _np(model(x))
    args = (_np(x), P["W"], P["A"], P["B"], P["m"], P["s"])
    ref = dora.forward(*args, bias=P["bias"], fan_in_fan_out=fifo)
    bound = dora.forward_error_bound(*args, F32, bias=P["bias"], fan_in_fan_out=fifo)
    _report(f"{kind} eval forward (fp32)", precision.compare_to_bound(y, ref, bound))


def test_train_forward_with_dropout_matches_peft_float32(torch):
    torch.manual_seed(2)
    model, layer = _wrap(torch, _model(torch, torch.nn.Linear(IN, OUT)), "lin", dropout=0.3, seed=2)
    x = torch.randn(N, IN)
    mask = (torch.rand(N, IN, generator=torch.Generator().manual_seed(3)) > 0.3).float()
    layer.lora_dropout["default"] = _MaskDropout(torch, mask, 0.3)
    model.train()
    with torch.no_grad():
        y = _np(model(x))
    P = _params(layer)
    args = (_np(x), P["W"], P["A"], P["B"], P["m"], P["s"])
    ref = dora.forward(*args, bias=P["bias"], dropout_mask=_np(mask), dropout_p=0.3)
    # PEFT evaluates x Wᵀ + b + (f − 1)(x_d Wᵀ) + f·s·(x_d Aᵀ)Bᵀ: the bound for x plus the bound for x_d covers
    # every term (each bound's P, Q and |b| terms dominate the matching terms of this formula).
    xd = _np(x) * _np(mask) / 0.7
    bound = dora.forward_error_bound(*args, F32, bias=P["bias"]) + dora.forward_error_bound(
        xd, *args[1:], F32, bias=P["bias"]
    )
    _report("linear train-mode dropout forward (fp32)", precision.compare_to_bound(y, ref, bound))
    eval_ref = dora.forward(*args, bias=P["bias"])
    assert np.abs(y - eval_ref).max() > 1e-2  # the mask mattered


@pytest.mark.parametrize("form", ["eval", "train"])
def test_backward_matches_peft_autograd_float64(torch, form):
    """PEFT detaches the norm (paper §4.3): its float64 autograd is refimpl's mode="detached"."""
    torch.manual_seed(4)
    model, layer = _wrap(
        torch, _model(torch, torch.nn.Linear(IN, OUT, dtype=torch.float64)), "lin", dropout=0.25, seed=4
    )
    x = torch.randn(N, IN, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(N, IN, generator=torch.Generator().manual_seed(5)) > 0.25).double()
    kw = {}
    if form == "train":
        layer.lora_dropout["default"] = _MaskDropout(torch, mask, 0.25)
        model.train()
        kw = dict(dropout_mask=_np(mask), dropout_p=0.25)
    else:
        model.eval()
    G = torch.randn(N, OUT, dtype=torch.float64)
    model(x).backward(G)
    P = _params(layer)
    args = (_np(x), P["W"], P["A"], P["B"], P["m"], _np(G), P["s"])
    g = dora.backward(*args, mode="detached", **kw)
    gb = dora.backward_error_bound(*args, "float64", mode="detached", **kw)
    peft_grads = dict(
        x=x.grad,
        A=layer.lora_A["default"].weight.grad,
        B=layer.lora_B["default"].weight.grad,
        m=layer.lora_magnitude_vector["default"].weight.grad,
    )
    for name, grad in peft_grads.items():
        rep = precision.compare_to_bound(getattr(g, "d" + name), _np(grad), 2 * getattr(gb, "d" + name))
        _report(f"detached d{name} vs PEFT autograd ({form}, float64)", rep)
    full = dora.backward(*args, mode="full", **kw)
    assert np.abs(full.dA - _np(peft_grads["A"])).max() > 1e-6  # PEFT is not the full gradient


def _merge_bound(P, dtype, *, fifo=False, embedding=False):
    """|PEFT merge − f ⊙ (W + ΔW)| ≤ γ_{in+r+10}·c|f|·(|W| + |s||B||A|) (norm, factor, product, sum)."""
    tr = fifo or embedding
    w = P["W"].T if tr else P["W"]
    v_abs = np.abs(w) + abs(P["s"]) * np.abs(P["B"]) @ np.abs(P["A"])
    n = dora.weight_norm(P["W"], P["A"], P["B"], P["s"], fan_in_fan_out=tr)
    fc = np.abs(P["m"]) / n * np.linalg.norm(v_abs, axis=1) / n
    bound = precision.gamma(w.shape[1] + P["A"].shape[0] + 10, dtype) * fc[:, None] * v_abs
    return bound.T if tr else bound


def test_merge_and_unmerge_match_peft_float32(torch):
    torch.manual_seed(6)
    _, layer = _wrap(torch, _model(torch, torch.nn.Linear(IN, OUT)), "lin", seed=6)
    P = _params(layer)
    layer.merge()
    merged = _np(layer.get_base_layer().weight)
    cached = _np(layer._caches["default-weight_norm"])
    mg = dora.merge(P["W"], P["A"], P["B"], P["m"], P["s"])
    _report("merged weight (fp32)", precision.compare_to_bound(merged, mg.W, _merge_bound(P, F32)))
    n_bound = precision.gamma(IN + R + 6, F32) * np.linalg.norm(
        np.abs(P["W"]) + abs(P["s"]) * np.abs(P["B"]) @ np.abs(P["A"]), axis=1
    )
    _report("cached weight norm (fp32)", precision.compare_to_bound(cached, mg.weight_norm, n_bound))
    layer.unmerge()
    unmerged = _np(layer.get_base_layer().weight)
    ref = dora.unmerge(merged, P["A"], P["B"], P["m"], P["s"], cached)
    # PEFT: fl(fl(W_m / f̂) − Δ̂) with Δ̂ = fl(s·fl(B A)): three roundings on |W_m/f| + |Δ|, Δ to γ_{r+1}.
    f = P["m"] / cached
    delta_abs = abs(P["s"]) * np.abs(P["B"]) @ np.abs(P["A"])
    bound = precision.gamma(R + 4, F32) * (np.abs(merged / f[:, None]) + 2 * delta_abs)
    _report("unmerge with the cached norm (fp32)", precision.compare_to_bound(unmerged, ref, bound))
    print(f"[dora-peft] fp32 merge→unmerge round trip: max |W' − W| = {np.abs(unmerged - P['W']).max():.3g}")


@pytest.mark.parametrize("n_in, n_out, r", [(3, 5, 8), (10, 2, 6)])
def test_rank_above_min_in_out_matches_peft_magnitude_forward_and_merge(torch, n_in, n_out, r):
    """r > min(in, out), which PEFT accepts (A (r, in), B (out, r)) and refimpl too (spec/dora.md §1): the
    initial magnitude, the eval forward and the merge agree within their float32 bounds."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(17)
    lin = torch.nn.Linear(n_in, n_out)
    W0 = _np(lin.weight).copy()
    fresh = get_peft_model(
        _model(torch, copy.deepcopy(lin)), LoraConfig(r=r, lora_alpha=ALPHA, target_modules=["lin"], use_dora=True)
    )
    m0 = _np(fresh.base_model.model.lin.lora_magnitude_vector["default"].weight)
    n_bound = precision.gamma(n_in + 2, F32) * np.linalg.norm(W0, axis=1)  # B = 0 at init: m₀ = ‖W‖
    _report(
        f"r={r} > min: initial magnitude (fp32)",
        precision.compare_to_bound(
            m0, dora.init_magnitude(W0, np.zeros((r, n_in)), np.zeros((n_out, r)), ALPHA / r), n_bound
        ),
    )
    model, layer = _wrap(torch, _model(torch, lin), "lin", seed=17, r=r)
    model.eval()
    P = _params(layer)
    assert P["A"].shape == (r, n_in) and P["B"].shape == (n_out, r)
    x = torch.randn(N, n_in)
    with torch.no_grad():
        y = _np(model(x))
    args = (_np(x), P["W"], P["A"], P["B"], P["m"], P["s"])
    _report(
        f"r={r} > min({n_in}, {n_out}): eval forward (fp32)",
        precision.compare_to_bound(
            y, dora.forward(*args, bias=P["bias"]), dora.forward_error_bound(*args, F32, bias=P["bias"])
        ),
    )
    layer.merge()
    mg = dora.merge(P["W"], P["A"], P["B"], P["m"], P["s"])
    _report(
        f"r={r} > min({n_in}, {n_out}): merged weight (fp32)",
        precision.compare_to_bound(_np(layer.get_base_layer().weight), mg.W, _merge_bound(P, F32)),
    )


def test_two_adapters_compose_sequentially_in_forward_and_merge(torch):
    torch.manual_seed(7)
    model, layer = _wrap(torch, _model(torch, torch.nn.Linear(IN, OUT)), "lin", names=("a", "b"), seed=7)
    model.eval()
    Pa, Pb = _params(layer, "a"), _params(layer, "b")
    W, bias = Pa["W"], Pa["bias"]
    x = torch.randn(N, IN)
    with torch.no_grad():
        y = _np(model(x))
    ads = [dora.DoraAdapter(P["A"], P["B"], P["m"], P["s"]) for P in (Pa, Pb)]
    ref = dora.forward_sequential(_np(x), W, ads, bias=bias)
    # γ_k on the nested expression in absolute values, each f carrying its norm's condition number.
    fc = []
    for P in (Pa, Pb):
        v_abs = np.abs(W) + abs(P["s"]) * np.abs(P["B"]) @ np.abs(P["A"])
        n = dora.weight_norm(W, P["A"], P["B"], P["s"])
        fc.append(np.abs(P["m"]) / n * np.linalg.norm(v_abs, axis=1) / n)
    da, db = (abs(P["s"]) * np.abs(P["B"]) @ np.abs(P["A"]) for P in (Pa, Pb))
    w_abs = fc[1][:, None] * (fc[0][:, None] * (np.abs(W) + da) + db)
    gk = precision.gamma(2 * (IN + R + 10), F32)
    bound = gk * (np.abs(_np(x)) @ (w_abs + np.abs(W)).T + 3 * np.abs(bias))
    _report("two DoRA adapters, forward (fp32)", precision.compare_to_bound(y, ref, bound))
    layer.merge()  # both active adapters, in order; 0.21.2 norms each against the unmerged base (#3609)
    merged = _np(layer.get_base_layer().weight)
    W1 = dora.merge(W, Pa["A"], Pa["B"], Pa["m"], Pa["s"]).W
    W2 = dora.merge(W1, Pb["A"], Pb["B"], Pb["m"], Pb["s"], unmerged_base=W).W
    _report("two DoRA adapters, sequential merge (fp32)", precision.compare_to_bound(merged, W2, gk * w_abs))


# ---------------------------------------------------------------------------- Embedding, float32


def test_embedding_forward_and_merge_match_peft_float32(torch):
    torch.manual_seed(8)
    V, D = 30, 12
    model, layer = _wrap(torch, _model(torch, torch.nn.Embedding(V, D), "emb"), "emb", seed=8)
    model.eval()
    P = _params(layer)
    assert P["m"].shape == (D,)
    ids = torch.randint(0, V, (3, 5))
    with torch.no_grad():
        y = _np(model(ids))
    ref = dora.embedding_forward(ids.numpy(), P["W"], P["A"], P["B"], P["m"], P["s"])
    onehot = np.eye(V)[ids.numpy().ravel()]
    bound = dora.forward_error_bound(onehot, P["W"], P["A"], P["B"], P["m"], P["s"], F32, fan_in_fan_out=True)
    _report("embedding forward (fp32)", precision.compare_to_bound(y.reshape(-1, D), ref.reshape(-1, D), bound))
    layer.merge()
    merged = _np(layer.get_base_layer().weight)
    mg = dora.merge(P["W"], P["A"], P["B"], P["m"], P["s"], embedding=True)
    _report("embedding merge (fp32)", precision.compare_to_bound(merged, mg.W, _merge_bound(P, F32, embedding=True)))


# ---------------------------------------------------------------------------- bf16 base, fp32 adapters


def test_bf16_base_magnitude_is_computed_in_bf16_so_init_is_not_the_identity(torch):
    torch.manual_seed(9)
    base = _model(torch, torch.nn.Linear(IN, OUT, dtype=torch.bfloat16))
    reference_base = copy.deepcopy(base)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], use_dora=True))
    layer = model.base_model.model.lin
    assert layer.lora_A["default"].weight.dtype == torch.float32  # autocast_adapter_dtype
    P = _params(layer)
    # PEFT's m is the norm computed in bf16: refimpl reproduces it bit for bit with dtype="bfloat16".
    np.testing.assert_array_equal(P["m"], dora.init_magnitude(P["W"], P["A"], P["B"], P["s"], dtype=BF16))
    exact = dora.init_magnitude(P["W"], P["A"], P["B"], P["s"])
    f_minus_1 = np.abs(P["m"] / exact - 1)
    u = precision.unit_roundoff(BF16)
    model.eval()
    x = torch.randn(64, IN, dtype=torch.bfloat16)
    with torch.no_grad():
        y = _np(model(x))
        y0 = _np(reference_base(x))
    print(
        f"[dora-peft] bf16 base at init: max |f − 1| = {f_minus_1.max():.3g} (u_bf16 = {u:.3g}); "
        f"max |y_dora − y_base| = {np.abs(y - y0).max():.3g}, "
        f"{int((y != y0).sum())} of {y.size} outputs differ, max |y_base| = {np.abs(y0).max():.3g}"
    )
    assert f_minus_1.max() <= u  # one rounding of the norm
    assert (y != y0).any()  # not the identity: this changes if PEFT computes m in fp32
    np.testing.assert_array_equal(
        dora.forward(_np(x), P["W"], P["A"], P["B"], exact, P["s"], bias=P["bias"]), _np(x) @ P["W"].T + P["bias"]
    )  # refimpl (float64 m) is exact


def test_bf16_base_forward_matches_peft_within_the_bf16_bound(torch):
    torch.manual_seed(10)
    model, layer = _wrap(torch, _model(torch, torch.nn.Linear(IN, OUT, dtype=torch.bfloat16)), "lin", seed=10)
    model.eval()
    P = _params(layer)
    x = torch.randn(N, IN, dtype=torch.bfloat16)
    with torch.no_grad():
        y = _np(model(x))
    args = (_np(x), P["W"], P["A"], P["B"], P["m"], P["s"])
    ref = dora.forward(*args, bias=P["bias"])
    # PEFT: base = bf16(x Wᵀ + b) (CPU bf16 GEMM accumulates in fp32, one rounding), bf16(base − b), the DoRA
    # terms in fp32, the sum cast to bf16. Beyond the fp32 bound: u_bf16 on the base and on base − b, both
    # also multiplied by |f − 1| in (f − 1)·base, and u_bf16 on the output.
    f = P["m"] / dora.weight_norm(P["W"], P["A"], P["B"], P["s"])
    p_abs = np.abs(_np(x)) @ np.abs(P["W"]).T
    bound = dora.forward_error_bound(*args, F32, bias=P["bias"]) + precision.gamma(2, BF16) * (
        (1 + np.abs(f - 1)) * (p_abs + 2 * np.abs(P["bias"])) + np.abs(ref)
    )
    _report("bf16 base + fp32 adapters, eval forward", precision.compare_to_bound(y, ref, bound))


def test_bf16_embedding_magnitude_is_computed_in_bf16(torch):
    torch.manual_seed(11)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _model(torch, torch.nn.Embedding(40, 8, dtype=torch.bfloat16), "emb"),
        LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["emb"], use_dora=True),
    )
    P = _params(model.base_model.model.emb)
    np.testing.assert_array_equal(
        P["m"], dora.init_magnitude(P["W"], P["A"], P["B"], P["s"], embedding=True, dtype=BF16)
    )


# ---------------------------------------------------------------------------- Conv2d, counts, zero rows


def test_conv2d_magnitude_and_merge_match_peft(torch):
    torch.manual_seed(12)
    _, layer = _wrap(torch, _model(torch, torch.nn.Conv2d(3, 8, 3), "conv"), "conv", init=False, seed=12)
    base = layer.get_base_layer()
    W, A, B = _np(base.weight), _np(layer.lora_A["default"].weight), _np(layer.lora_B["default"].weight)
    s = layer.scaling["default"]
    m = _np(layer.lora_magnitude_vector["default"].weight)
    assert m.shape == (1, 8, 1, 1)  # PEFT's ConvNd magnitude shape (peft.md §2.1)
    layer.merge()
    merged = _np(base.weight)
    P = dict(W=W.reshape(8, -1), A=A.reshape(R, -1), B=B.reshape(8, R), m=m.ravel(), s=s)
    mg = dora.merge(W, A, B, m.ravel(), s)
    _report("conv2d merge (fp32)", precision.compare_to_bound(merged, mg.W, _merge_bound(P, F32).reshape(W.shape)))


def test_init_magnitude_of_conv2d_matches_peft_at_init(torch):
    torch.manual_seed(13)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _model(torch, torch.nn.Conv2d(3, 8, 3), "conv"),
        LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["conv"], use_dora=True),
    )
    layer = model.base_model.model.conv
    W = _np(layer.get_base_layer().weight)
    A, B = _np(layer.lora_A["default"].weight), _np(layer.lora_B["default"].weight)
    m = _np(layer.lora_magnitude_vector["default"].weight).ravel()
    ref = dora.init_magnitude(W, A, B, layer.scaling["default"])
    bound = precision.gamma(27 + 3, F32) * ref
    _report("conv2d init magnitude (fp32)", precision.compare_to_bound(m, ref, bound))


def test_param_count_matches_peft_trainable_parameters(torch):
    from peft import LoraConfig, get_peft_model

    cases = [
        (torch.nn.Linear(10, 6), dict(in_features=10, out_features=6)),
        (torch.nn.Embedding(20, 6), dict(in_features=20, out_features=6)),
        (torch.nn.Conv2d(3, 4, 3), dict(in_features=3, out_features=4, kernel_size=(3, 3))),
        (torch.nn.Conv2d(8, 12, 3, groups=2), dict(in_features=8, out_features=12, kernel_size=(3, 3), groups=2)),
    ]
    for module, kw in cases:
        model = get_peft_model(
            _model(torch, module, "t"), LoraConfig(r=4, lora_alpha=8, target_modules=["t"], use_dora=True)
        )
        trainable, _ = model.get_nb_trainable_parameters()
        assert dora.param_count(r=4, **kw) == trainable, (module, trainable)


def test_zero_norm_row_gives_nan_in_peft_and_raises_in_refimpl(torch):
    torch.manual_seed(14)
    lin = torch.nn.Linear(IN, OUT)
    with torch.no_grad():
        lin.weight[3] = 0.0  # B = 0 at init, so row 3 of W + s·B·A is exactly zero
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(torch, lin), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], use_dora=True))
    model.eval()
    P = _params(model.base_model.model.lin)
    assert P["m"][3] == 0.0
    x = torch.randn(N, IN)
    with torch.no_grad():
        y = _np(model(x))
    bad_cols = np.flatnonzero(~np.isfinite(y).all(axis=0))
    print(f"[dora-peft] zero-norm row: PEFT output columns with NaN/inf = {bad_cols.tolist()}")
    assert bad_cols.tolist() == [3]  # m/‖V‖ = 0/0 = NaN for that output only
    with pytest.raises(ValueError, match=r"row norm is zero at output row\(s\) \[3\]"):
        dora.forward(_np(x), P["W"], P["A"], P["B"], P["m"], P["s"], bias=P["bias"])


def test_lora_delta_is_the_dora_numerator(torch):
    # refimpl.dora builds V = W + refimpl.lora.delta(A, B, s); PEFT's get_delta_weight agrees to the fp32 bound.
    torch.manual_seed(15)
    _, layer = _wrap(torch, _model(torch, torch.nn.Linear(IN, OUT)), "lin", seed=15)
    P = _params(layer)
    with torch.no_grad():
        d = _np(layer.get_delta_weight("default"))
    bound = precision.gamma(R + 1, F32) * abs(P["s"]) * np.abs(P["B"]) @ np.abs(P["A"])
    _report("delta weight (fp32)", precision.compare_to_bound(d, lora.delta(P["A"], P["B"], P["s"]), bound))


def test_bf16_merge_rounds_once_and_safe_equals_unsafe(torch):
    """PEFT computes f ⊙ (W + ΔW) in fp32 and casts once to bf16, on both merge paths (variants.py
    merge_safe / merge_unsafe). refimpl.merge(dtype="bfloat16") rounds the float64 value once. With a, b the
    unrounded values, |rn(a) − rn(b)| ≤ |a − b| + ½ulp(a) + ½ulp(b): the fp32 merge bound plus one bf16 ulp."""
    merged = {}
    for safe in (False, True):
        torch.manual_seed(16)
        _, layer = _wrap(torch, _model(torch, torch.nn.Linear(IN, OUT, dtype=torch.bfloat16)), "lin", seed=16)
        P = _params(layer)
        layer.merge(safe_merge=safe)
        merged[safe] = _np(layer.get_base_layer().weight)
    np.testing.assert_array_equal(merged[False], merged[True])
    mg = dora.merge(P["W"], P["A"], P["B"], P["m"], P["s"], dtype=BF16)
    one_ulp = precision.ulp(np.maximum(np.abs(merged[False]), np.abs(mg.W)), BF16)
    _report(
        "bf16 merge vs refimpl merge(dtype=bf16)",
        precision.compare_to_bound(merged[False], mg.W, _merge_bound(P, F32) + one_ulp),
    )
    print(
        f"[dora-peft] bf16 merge: {int((merged[False] != mg.W).sum())} of {mg.W.size} elements differ from "
        "refimpl's single rounding"
    )
    layer.unmerge()
    back = _np(layer.get_base_layer().weight)
    ref_back = dora.unmerge(merged[False], P["A"], P["B"], P["m"], P["s"], mg.weight_norm, dtype=BF16)
    # PEFT divides by its fp32 factor and subtracts its fp32 ΔW before the cast: the fp32 unmerge error
    # (three roundings on |W_m/f| + |ΔW|, ΔW to γ_{r+1}), the fp32 norm error carried by 1/f, plus one bf16 ulp.
    f = P["m"] / mg.weight_norm
    delta_abs = abs(P["s"]) * np.abs(P["B"]) @ np.abs(P["A"])
    w_over_f = np.abs(merged[False] / f[:, None])
    fp32_part = precision.gamma(IN + R + 10, F32) * (2 * w_over_f + 2 * delta_abs)
    one_ulp = precision.ulp(np.maximum(np.abs(back), np.abs(ref_back)), BF16)
    _report(
        "bf16 unmerge vs refimpl unmerge(dtype=bf16)", precision.compare_to_bound(back, ref_back, fp32_part + one_ulp)
    )
    print(
        f"[dora-peft] bf16 merge→unmerge round trip (not the identity): max |W' − W| = "
        f"{np.abs(back - P['W']).max():.3g}"
    )
