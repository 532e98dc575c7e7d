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
    (lambda: lora.forward(x, W, A, B, 1.0, dropout_mask=np.ones((3, 9)), dropout_p=0.1), ValueError,
     ["dropout_mask", "shape"]),
    (lambda: lora.forward(x, W, A, B, 1.0, dropout_mask=np.full(x.shape, 0.5), dropout_p=0.1), ValueError,
     ["dropout_mask", "0"]),
    (lambda: lora.forward(x, W, A, B, 1.0, dropout_mask=np.ones(x.shape), dropout_p=1.0), ValueError,
     ["dropout_p", "[0, 1)"]),
    (lambda: lora.forward(x, W, A, B, 1.0, dropout_mask=np.ones(x.shape), dropout_p=-0.1), ValueError,
     ["dropout_p"]),
    (lambda: lora.forward(np.zeros((0, 10)), W, A, B, 1.0), ValueError, ["x", "non-empty"]),
    (lambda: lora.forward(x, W, rng.standard_normal((11, 10)), rng.standard_normal((6, 11)), 1.0), ValueError,
     ["rank", "min(in, out)"]),
    (lambda: lora.backward(x, W, A, B, g[:, :5], 1.0), ValueError, ["grad_y", "expected shape"]),
    (lambda: lora.backward(x, W, A, B, g, 1.0, need_dW="yes"), TypeError, ["need_dW", "bool"]),
    (lambda: lora.scaling(8, 0), ValueError, ["r", "[1, inf]"]),
    (lambda: lora.scaling(float("inf"), 8), ValueError, ["alpha", "finite"]),
    (lambda: lora.scaling(8, 2.5), TypeError, ["r", "integer"]),
    (lambda: lora.init(W, 0, alpha=8, rng=rng), ValueError, ["r", "[1, 6]"]),
    (lambda: lora.init(W, 7, alpha=8, rng=rng), ValueError, ["r", "[1, 6]"]),
    (lambda: lora.init(W, 4, alpha=8, rng=None), TypeError, ["rng", "Generator"]),
    (lambda: lora.init(W, 4, alpha=8, method="loftq", rng=rng), ValueError, ["method", "pissa"]),
    (lambda: lora.init(W, 4, alpha=float("nan"), rng=rng), ValueError, ["alpha", "finite"]),
    (lambda: lora.init(W, 4, alpha=8, method="pissa", embedding=True), ValueError, ["method", "embedding"]),
    (lambda: lora.init(W, 4, alpha=0, method="pissa"), ValueError, ["alpha", "PiSSA"]),
    (lambda: lora.merge(W, A, B, 1.0, dtype="int8"), ValueError, ["dtype", "bfloat16"]),
    (lambda: lora.merge(W.T, A, B, 1.0), ValueError, ["A", "expected shape"]),
    (lambda: lora.unmerge(nan_W, A, B, 1.0), ValueError, ["W_merged", "finite"]),
    (lambda: lora.delta(A, B.T, 1.0), ValueError, ["B", "expected shape"]),
    (lambda: lora.embedding_forward(np.array([0, 10]), np.zeros((10, 6)), A, B, 1.0), ValueError,
     ["ids", "[0, 10)"]),
    (lambda: lora.embedding_forward(np.array([0.0]), np.zeros((10, 6)), A, B, 1.0), TypeError, ["ids", "integer"]),
    (lambda: lora.param_count(4096, 4096, 0), ValueError, ["r"]),
    (lambda: lora.param_count(4096, 4096, 4097), ValueError, ["r", "4096"]),
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
