"""Every public LoRA function rejects bad input with a ValueError/TypeError naming the argument."""

from __future__ import annotations

import numpy as np
import pytest

from refimpl import lora, precision

rng = np.random.default_rng(0)
W = rng.standard_normal((6, 10))
A = rng.standard_normal((4, 10))
B = rng.standard_normal((6, 4))
x = rng.standard_normal((3, 10))
g = rng.standard_normal((3, 6))
nan_W = W.copy()
nan_W[2, 3] = np.nan

CASES = [
    # (call, exception, words the message must contain)
    (lambda: lora.forward(x[:, :9], W, A, B, 1.0), ValueError, ["x", "expected shape"]),
    (lambda: lora.forward(x, W, A[:, :9], B, 1.0), ValueError, ["A", "expected shape"]),
    (lambda: lora.forward(x, W, A, B[:, :3], 1.0), ValueError, ["B", "expected shape"]),
    (lambda: lora.forward(x, W[0], A, B, 1.0), ValueError, ["W", "2-D"]),
    (lambda: lora.forward(x.astype(np.int64), W, A, B, 1.0), TypeError, ["x", "floating"]),
    (lambda: lora.forward(x.astype(np.complex128), W, A, B, 1.0), TypeError, ["x", "floating"]),
    (lambda: lora.forward(x, nan_W, A, B, 1.0), ValueError, ["W", "finite"]),
    (lambda: lora.forward(x, W, A, B, float("nan")), ValueError, ["scaling", "finite"]),
    (lambda: lora.forward(x, W, A, B, "1"), TypeError, ["scaling", "real"]),
    (lambda: lora.forward(x, W, A, B, 1.0, bias=np.zeros(5)), ValueError, ["bias", "(6,)"]),
    (
        lambda: lora.forward(x, W, A, B, 1.0, dropout_mask=np.ones((3, 9)), dropout_p=0.1),
        ValueError,
        ["dropout_mask", "shape"],
    ),
    (
        lambda: lora.forward(x, W, A, B, 1.0, dropout_mask=np.full(x.shape, 0.5), dropout_p=0.1),
        ValueError,
        ["dropout_mask", "0"],
    ),
    (
        lambda: lora.forward(x, W, A, B, 1.0, dropout_mask=np.ones(x.shape), dropout_p=1.0),
        ValueError,
        ["dropout_p", "[0, 1)"],
    ),
    (lambda: lora.forward(x, W, A, B, 1.0, dropout_mask=np.ones(x.shape), dropout_p=-0.1), ValueError, ["dropout_p"]),
    (lambda: lora.forward(np.zeros((0, 10)), W, A, B, 1.0), ValueError, ["x", "non-empty"]),
    # r > min(in, out) is legal (as in loralib and PEFT), but A and B must still agree on r
    (
        lambda: lora.forward(x, W, rng.standard_normal((11, 10)), rng.standard_normal((6, 12)), 1.0),
        ValueError,
        ["B", "expected shape (6, 11)"],
    ),
    (lambda: lora.backward(x, W, A, B, g[:, :5], 1.0), ValueError, ["grad_y", "expected shape"]),
    (lambda: lora.backward(x, W, A, B, g, 1.0, need_dW="yes"), TypeError, ["need_dW", "bool"]),
    (lambda: lora.scaling(8, 0), ValueError, ["r", "[1, inf]"]),
    (lambda: lora.scaling(float("inf"), 8), ValueError, ["alpha", "finite"]),
    (lambda: lora.scaling(8, 2.5), TypeError, ["r", "integer"]),
    (lambda: lora.init(W, 0, alpha=8, rng=rng), ValueError, ["r", "[1, inf]"]),
    (lambda: lora.init(W, 7.0, alpha=8, rng=rng), TypeError, ["r", "integer"]),
    (lambda: lora.init(W, 4, alpha=8, rng=None), TypeError, ["rng", "Generator"]),
    (lambda: lora.init(W, 4, alpha=8, method="loftq", rng=rng), ValueError, ["method", "pissa"]),
    (lambda: lora.init(W, 4, alpha=float("nan"), rng=rng), ValueError, ["alpha", "finite"]),
    (lambda: lora.init(W, 4, alpha=8, method="pissa", embedding=True), ValueError, ["method", "embedding"]),
    (lambda: lora.init(W, 4, alpha=0, method="pissa"), ValueError, ["alpha", "PiSSA"]),
    (lambda: lora.merge(W, A, B, 1.0, dtype="int8"), ValueError, ["dtype", "bfloat16"]),
    (lambda: lora.merge(W.T, A, B, 1.0), ValueError, ["A", "expected shape"]),
    (lambda: lora.unmerge(nan_W, A, B, 1.0), ValueError, ["W_merged", "finite"]),
    (lambda: lora.delta(A, B.T, 1.0), ValueError, ["B", "expected shape"]),
    (lambda: lora.embedding_forward(np.array([0, 10]), np.zeros((10, 6)), A, B, 1.0), ValueError, ["ids", "[0, 10)"]),
    (lambda: lora.embedding_forward(np.array([0.0]), np.zeros((10, 6)), A, B, 1.0), TypeError, ["ids", "integer"]),
    (lambda: lora.param_count(4096, 4096, 0), ValueError, ["r"]),
    (lambda: lora.param_count(4096, 4096, True), TypeError, ["r", "integer"]),
    (lambda: lora.param_count(0, 4096, 1), ValueError, ["in_features"]),
    (lambda: lora.model_param_count({"q": (4, 4)}, 2, ["v"]), ValueError, ["target_modules", "matched none"]),
    (lambda: lora.model_param_count({"q": (4,)}, 2, ["q"]), ValueError, ["layers['q']"]),
    (lambda: lora.dropout_mask(rng, (2, 2), 1.5), ValueError, ["p"]),
    (lambda: precision.round_to([1.0], "float128"), ValueError, ["dtype"]),
    (lambda: precision.gamma(10**20, "float64"), ValueError, ["n"]),
]


@pytest.mark.parametrize("call, exc, words", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_input_raises_a_named_error(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def test_rank_above_min_in_out_is_accepted_as_loralib_and_peft_accept_it():
    """r = 11 > min(in, out) = 6: every op runs and computes its formula (B A has rank ≤ 6, the adapter r·(in + out)
    parameters); PiSSA/OLoRA keep min(r, in, out) components, as PEFT 0.21.2 does."""
    r = 11
    a, b = rng.standard_normal((r, 10)), rng.standard_normal((6, r))
    np.testing.assert_allclose(lora.forward(x, W, a, b, 0.5), x @ W.T + 0.5 * (x @ a.T) @ b.T, rtol=1e-12, atol=1e-12)
    assert lora.backward(x, W, a, b, g, 0.5).dA.shape == (r, 10)
    np.testing.assert_allclose(lora.merge(W, a, b, 0.5), W + 0.5 * b @ a, rtol=1e-12, atol=1e-12)
    assert lora.param_count(10, 6, r) == r * 16
    init = lora.init(W, r, alpha=8.0, rng=np.random.default_rng(1))
    assert init.A.shape == (r, 10) and init.B.shape == (6, r) and not init.B.any()
    for method in ("pissa", "olora"):
        init = lora.init(W, r, alpha=8.0, method=method)
        assert init.A.shape == (6, 10) and init.B.shape == (6, 6), method  # k = min(r, in, out) = 6 components
        np.testing.assert_allclose(init.W + (8.0 / r) * init.B @ init.A, W, atol=1e-12)  # W_res + s·B A = W
