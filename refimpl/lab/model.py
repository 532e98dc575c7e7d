"""A tiny transformer classifier in NumPy with its backward pass written out.

Architecture (pre-LayerNorm, bidirectional attention, classification from a CLS token
at position 0):

    x⁰ = E[ids] + P
    per block ℓ:   a = LN₁(x);  q, k, v = a W_qᵀ, a W_kᵀ, a W_vᵀ
                   o = softmax(q kᵀ / √d_h) v  (per head);   x ← x + o W_oᵀ
                   c = LN₂(x);  x ← x + relu(c W_upᵀ + b_up) W_downᵀ + b_down
    logits = LN_f(x)[:, 0] W_headᵀ + b_head,      loss = mean cross-entropy

Every linear map W (out, in) named ``b{ℓ}.{q,k,v,o,up,down}`` can carry a LoRA adapter
(Hu et al., arXiv 2106.09685) with dropout on the LoRA branch input, as PEFT does:

    y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ,          s = α / r   (α / √r with rsLoRA, arXiv 2312.03732)

or a DoRA adapter (Liu et al., arXiv 2402.09353) with a magnitude m (out,), computed by
``refimpl.dora.forward`` / ``backward`` (PEFT's train form with dropout; eval form
y = x W'ᵀ, W' = m ⊙ (W + sBA)/‖W + sBA‖_row). The lab uses the exact gradient through the
norm (``mode="full"``); PEFT detaches the norm (paper §4.3), so its gradients differ.

Parameters are plain dicts of float64 arrays: ``base`` (all pretrained weights) and
``adapter`` (``"{layer}.lora_A"``, ``"{layer}.lora_B"``, ``"{layer}.lora_magnitude"``).
``forward`` returns the logits and a cache; ``backward`` returns gradients for both dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refimpl import _checks

LINEAR_NAMES = ("q", "k", "v", "o", "up", "down")
TARGET_PRESETS = {
    "qv": ("q", "v"),
    "attn": ("q", "k", "v", "o"),
    "ffn": ("up", "down"),
    "all": LINEAR_NAMES,
}
_LN_EPS = 1e-5


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the tiny transformer."""

    vocab: int = 96
    seq_len: int = 8
    d_model: int = 32
    n_heads: int = 2
    d_ff: int = 64
    n_blocks: int = 1
    n_classes: int = 8

    def __post_init__(self) -> None:
        for name in ("vocab", "seq_len", "d_model", "n_heads", "d_ff", "n_blocks", "n_classes"):
            _checks.integer(getattr(self, name), name, low=1)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model={self.d_model}, got {self.n_heads}")

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(out, in) of a linear layer name such as 'b0.up'."""
        kind = name.split(".")[-1]
        d, f = self.d_model, self.d_ff
        return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "up": (f, d), "down": (d, f)}[kind]

    def linear_layers(self) -> list[str]:
        return [f"b{i}.{n}" for i in range(self.n_blocks) for n in LINEAR_NAMES]


def resolve_targets(layers: str | Sequence[str], config: ModelConfig) -> tuple[str, ...]:
    """Expand "qv" | "attn" | "ffn" | "all" or a list of kinds/full names into full layer names."""
    if isinstance(layers, str):
        if layers in TARGET_PRESETS:
            kinds: Iterable[str] = TARGET_PRESETS[layers]
        else:
            kinds = [p.strip() for p in layers.split(",") if p.strip()]
    elif isinstance(layers, Sequence):
        kinds = list(layers)
    else:
        raise TypeError(f"layers: expected a preset name or a list of layer names, got {_checks.describe(layers)}")
    all_names = config.linear_layers()
    out: list[str] = []
    for k in kinds:
        if not isinstance(k, str):
            raise TypeError(f"layers: expected layer names as str, got {_checks.describe(k)}")
        if k in LINEAR_NAMES:
            out += [n for n in all_names if n.endswith("." + k)]
        elif k in all_names:
            out.append(k)
        else:
            raise ValueError(
                f"layers: expected a preset ({', '.join(TARGET_PRESETS)}), a kind ({', '.join(LINEAR_NAMES)}) "
                f"or a layer name ({', '.join(all_names)}), got {k!r}"
            )
    if not out:
        raise ValueError(f"layers: expected at least one layer, got {layers!r}")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class AdapterConfig:
    """Which layers carry an adapter and how it is scaled."""

    targets: tuple[str, ...]
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    dora: bool = False
    use_rslora: bool = False
    scaling: float = field(init=False)

    def __post_init__(self) -> None:
        _checks.integer(self.rank, "rank", low=1)
        _checks.real(self.alpha, "alpha")
        _checks.real(self.dropout, "dropout", low=0.0, high=1.0, high_inclusive=False)
        _checks.boolean(self.dora, "dora")
        _checks.boolean(self.use_rslora, "use_rslora")
        s = self.alpha / np.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank
        object.__setattr__(self, "scaling", float(s))


def init_base(config: ModelConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random pretraining initialisation (normal, std 1/√fan_in; LN gains 1, biases 0)."""
    _checks.rng(rng)
    d, c = config.d_model, config.n_classes
    p: dict[str, np.ndarray] = {
        "embed": rng.normal(0.0, 1.0, (config.vocab, d)),
        "pos": rng.normal(0.0, 1.0, (config.seq_len, d)),
    }
    for i in range(config.n_blocks):
        for ln in ("ln1", "ln2"):
            p[f"b{i}.{ln}.g"] = np.ones(d)
            p[f"b{i}.{ln}.b"] = np.zeros(d)
        for n in LINEAR_NAMES:
            out_f, in_f = config.linear_shape(n)
            p[f"b{i}.{n}"] = rng.normal(0.0, 1.0 / np.sqrt(in_f), (out_f, in_f))
        p[f"b{i}.up.bias"] = np.zeros(config.d_ff)
        p[f"b{i}.down.bias"] = np.zeros(d)
    p["lnf.g"] = np.ones(d)
    p["lnf.b"] = np.zeros(d)
    p["head"] = rng.normal(0.0, 1.0 / np.sqrt(d), (c, d))
    p["head.bias"] = np.zeros(c)
    return p


def init_adapter(
    base: dict[str, np.ndarray], config: ModelConfig, acfg: AdapterConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """PEFT's default LoRA init: A ~ kaiming-uniform(a=√5) = U(±1/√in), B = 0, so ΔW = 0 at step 0.

    With DoRA the magnitude starts at m = ‖W‖_row, so the adapted model equals the base.
    """
    _checks.rng(rng)
    ad: dict[str, np.ndarray] = {}
    for name in acfg.targets:
        out_f, in_f = config.linear_shape(name)
        r = min(acfg.rank, out_f, in_f)
        bound = 1.0 / np.sqrt(in_f)
        ad[f"{name}.lora_A"] = rng.uniform(-bound, bound, (r, in_f))
        ad[f"{name}.lora_B"] = np.zeros((out_f, r))
        if acfg.dora:
            ad[f"{name}.lora_magnitude"] = np.linalg.norm(base[name], axis=1)
    return ad


# ----------------------------------------------------------------------------- layer pieces


def _ln_fwd(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, tuple]:
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + _LN_EPS)
    xhat = xc * rstd
    return xhat * g + b, (xhat, rstd, g)


def _ln_bwd(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xhat, rstd, g = cache
    lead = tuple(range(dy.ndim - 1))
    dg = (dy * xhat).sum(axis=lead)
    db = dy.sum(axis=lead)
    dxh = dy * g
    dx = rstd * (dxh - dxh.mean(axis=-1, keepdims=True) - xhat * (dxh * xhat).mean(axis=-1, keepdims=True))
    return dx, dg, db


def _lin_fwd(
    x: np.ndarray,
    W: np.ndarray,
    bias: np.ndarray | None,
    ad: dict[str, np.ndarray] | None,
    s: float,
    mask: np.ndarray | None,
    p: float,
) -> tuple[np.ndarray, tuple]:
    """One linear layer: plain, LoRA (written out here) or DoRA (``refimpl.dora.forward``).

    ``mask`` is the 0/1 keep mask of the LoRA branch input, or None (eval mode)."""
    cache: tuple = (x, W, ad, s, mask, p, None, None)
    if ad is None:
        z = x @ W.T
    elif "m" in ad:
        from refimpl import dora

        z = dora.forward(x, W, ad["A"], ad["B"], ad["m"], s, dropout_mask=mask, dropout_p=p)
    else:
        xd = x if mask is None else x * (mask / (1.0 - p))
        h = xd @ ad["A"].T
        z = x @ W.T + s * (h @ ad["B"].T)
        cache = (x, W, ad, s, mask, p, xd, h)
    if bias is not None:
        z = z + bias
    return z, cache


def _lin_bwd(dy: np.ndarray, cache: tuple, need_dW: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    x, W, ad, s, mask, p, xd, h = cache
    in_f, out_f = W.shape[1], W.shape[0]
    g = dy.reshape(-1, out_f)
    grads: dict[str, np.ndarray] = {"bias": g.sum(axis=0), "W": g.T @ x.reshape(-1, in_f)} if need_dW else {}
    if ad is not None and "m" in ad:
        from refimpl import dora

        if need_dW:
            raise ValueError("need_base: the base weights of a DoRA layer are frozen; train them without adapters")
        # mode="full": the exact gradient through ‖W + sBA‖ (PEFT detaches the norm, paper §4.3)
        dg = dora.backward(x, W, ad["A"], ad["B"], ad["m"], dy, s, mode="full", dropout_mask=mask, dropout_p=p)
        return dg.dx, {"A": dg.dA, "B": dg.dB, "m": dg.dm}
    dx = g @ W
    if ad is not None:
        A, B = ad["A"], ad["B"]
        gb = s * (g @ B)
        grads["B"] = s * (g.T @ h.reshape(-1, A.shape[0]))
        grads["A"] = gb.T @ xd.reshape(-1, in_f)
        dxl = gb @ A
        if mask is not None:
            dxl = dxl * (mask.reshape(-1, in_f) / (1.0 - p))
        dx = dx + dxl
    return dx.reshape(x.shape), grads


def _adapter_of(adapter: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray] | None:
    if f"{name}.lora_A" not in adapter:
        return None
    out = {"A": adapter[f"{name}.lora_A"], "B": adapter[f"{name}.lora_B"]}
    if f"{name}.lora_magnitude" in adapter:
        out["m"] = adapter[f"{name}.lora_magnitude"]
    return out


# ----------------------------------------------------------------------------- model


def draw_dropout(
    adapter: dict[str, np.ndarray], config: ModelConfig, batch: int, p: float, rng: np.random.Generator
) -> dict[str, np.ndarray] | None:
    """Keep masks (0/1, shape of each adapted layer's input) drawn as ``rng.random(shape) >= p``,
    in sorted layer-name order. Returns None when p == 0."""
    if p == 0.0:
        return None
    names = sorted({k.rsplit(".", 1)[0] for k in adapter if k.endswith(".lora_A")})
    return {n: (rng.random((batch, config.seq_len, config.linear_shape(n)[1])) >= p).astype(np.float64) for n in names}


def _check_ids(ids: Any, config: ModelConfig) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"ids: expected an integer array of token ids, got {_checks.describe(arr)}")
    _checks.check_shape(arr, "ids", (None, config.seq_len))
    if arr.size and (arr.min() < 0 or arr.max() >= config.vocab):
        raise ValueError(f"ids: expected token ids in [0, {config.vocab - 1}], got range [{arr.min()}, {arr.max()}]")
    return arr


def forward(
    base: dict[str, np.ndarray],
    adapter: dict[str, np.ndarray],
    config: ModelConfig,
    ids: Any,
    *,
    scaling: float = 1.0,
    dropout_masks: dict[str, np.ndarray] | None = None,
    dropout_p: float = 0.0,
) -> tuple[np.ndarray, dict]:
    """Logits (N, n_classes) and the cache ``backward`` needs."""
    ids = _check_ids(ids, config)
    nh = config.n_heads
    dh = config.d_model // nh
    N, T = ids.shape
    x = base["embed"][ids] + base["pos"][None, :, :]
    cache: dict[str, Any] = {"ids": ids, "blocks": []}

    def lin(inp: np.ndarray, name: str, bias: np.ndarray | None) -> tuple[np.ndarray, tuple]:
        ad = _adapter_of(adapter, name)
        mask = None if ad is None or dropout_masks is None else dropout_masks[name]
        return _lin_fwd(inp, base[name], bias, ad, scaling, mask, dropout_p)

    for i in range(config.n_blocks):
        bc: dict[str, Any] = {}
        a, bc["ln1"] = _ln_fwd(x, base[f"b{i}.ln1.g"], base[f"b{i}.ln1.b"])
        q, bc["q"] = lin(a, f"b{i}.q", None)
        k, bc["k"] = lin(a, f"b{i}.k", None)
        v, bc["v"] = lin(a, f"b{i}.v", None)
        qh, kh, vh = (t.reshape(N, T, nh, dh).transpose(0, 2, 1, 3) for t in (q, k, v))
        S = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(dh)
        S = S - S.max(axis=-1, keepdims=True)
        P = np.exp(S)
        P /= P.sum(axis=-1, keepdims=True)
        o = (P @ vh).transpose(0, 2, 1, 3).reshape(N, T, config.d_model)
        bc["attn"] = (qh, kh, vh, P)
        att, bc["o"] = lin(o, f"b{i}.o", None)
        x = x + att
        c, bc["ln2"] = _ln_fwd(x, base[f"b{i}.ln2.g"], base[f"b{i}.ln2.b"])
        u, bc["up"] = lin(c, f"b{i}.up", base[f"b{i}.up.bias"])
        hact = np.maximum(u, 0.0)
        bc["relu"] = u > 0
        f, bc["down"] = lin(hact, f"b{i}.down", base[f"b{i}.down.bias"])
        x = x + f
        cache["blocks"].append(bc)
    z, cache["lnf"] = _ln_fwd(x[:, 0, :], base["lnf.g"], base["lnf.b"])
    cache["z"] = z
    logits = z @ base["head"].T + base["head.bias"]
    return logits, cache


def backward(
    dlogits: np.ndarray, cache: dict, base: dict[str, np.ndarray], config: ModelConfig, *, need_base: bool
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Gradients (base_grads, adapter_grads) of a scalar loss given ∂L/∂logits.

    ``base_grads`` is empty unless ``need_base`` (pretraining trains every base weight).
    """
    ids = cache["ids"]
    N, T = ids.shape
    nh = config.n_heads
    dh = config.d_model // nh
    gb: dict[str, np.ndarray] = {}
    ga: dict[str, np.ndarray] = {}

    def lin_back(dy: np.ndarray, name: str, c: tuple, has_bias: bool) -> np.ndarray:
        dx, g = _lin_bwd(dy, c, need_base)
        if "A" in g:
            ga[f"{name}.lora_A"], ga[f"{name}.lora_B"] = g["A"], g["B"]
        if "m" in g:
            ga[f"{name}.lora_magnitude"] = g["m"]
        if need_base:
            gb[name] = g["W"]
            if has_bias:
                gb[f"{name}.bias"] = g["bias"]
        return dx

    if need_base:
        gb["head"] = dlogits.T @ cache["z"]
        gb["head.bias"] = dlogits.sum(axis=0)
    dz = dlogits @ base["head"]
    dz0, dgf, dbf = _ln_bwd(dz, cache["lnf"])
    if need_base:
        gb["lnf.g"], gb["lnf.b"] = dgf, dbf
    dx = np.zeros((N, T, config.d_model))
    dx[:, 0, :] = dz0
    for i in reversed(range(config.n_blocks)):
        bc = cache["blocks"][i]
        dh_ = lin_back(dx, f"b{i}.down", bc["down"], True)
        du = dh_ * bc["relu"]
        dc = lin_back(du, f"b{i}.up", bc["up"], True)
        dres, dg2, db2 = _ln_bwd(dc, bc["ln2"])
        dx = dx + dres
        do = lin_back(dx, f"b{i}.o", bc["o"], False)
        qh, kh, vh, P = bc["attn"]
        doh = do.reshape(N, T, nh, dh).transpose(0, 2, 1, 3)
        dP = doh @ vh.transpose(0, 1, 3, 2)
        dvh = P.transpose(0, 1, 3, 2) @ doh
        dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True)) / np.sqrt(dh)
        dqh = dS @ kh
        dkh = dS.transpose(0, 1, 3, 2) @ qh
        dq, dk, dv = (t.transpose(0, 2, 1, 3).reshape(N, T, config.d_model) for t in (dqh, dkh, dvh))
        da = lin_back(dq, f"b{i}.q", bc["q"], False)
        da = da + lin_back(dk, f"b{i}.k", bc["k"], False)
        da = da + lin_back(dv, f"b{i}.v", bc["v"], False)
        dres, dg1, db1 = _ln_bwd(da, bc["ln1"])
        dx = dx + dres
        if need_base:
            gb[f"b{i}.ln1.g"], gb[f"b{i}.ln1.b"] = dg1, db1
            gb[f"b{i}.ln2.g"], gb[f"b{i}.ln2.b"] = dg2, db2
    if need_base:
        gE = np.zeros_like(base["embed"])
        np.add.at(gE, ids, dx)
        gb["embed"] = gE
        gb["pos"] = dx.sum(axis=0)
    return gb, ga


def cross_entropy(logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0) -> tuple[float, np.ndarray]:
    """Mean cross-entropy against targets (1 − ε)·onehot + ε/C, and its gradient (softmax − target)/N."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n, c = logits.shape
    target = np.full((n, c), label_smoothing / c)
    target[np.arange(n), labels] += 1.0 - label_smoothing
    loss = float(-(target * logp).sum(axis=1).mean())
    return loss, (np.exp(logp) - target) / n


def merged_base(base: dict[str, np.ndarray], adapter: dict[str, np.ndarray], scaling: float) -> dict[str, np.ndarray]:
    """Fold an adapter into the base weights: W' = W + s B A (LoRA) or m ⊙ (W + sBA)/‖W + sBA‖ (DoRA)."""
    out = dict(base)
    for key in adapter:
        if not key.endswith(".lora_A"):
            continue
        name = key[: -len(".lora_A")]
        V = base[name] + scaling * (adapter[f"{name}.lora_B"] @ adapter[key])
        if f"{name}.lora_magnitude" in adapter:
            V = (adapter[f"{name}.lora_magnitude"] / np.linalg.norm(V, axis=1))[:, None] * V
        out[name] = V
    return out
