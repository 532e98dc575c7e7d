"""QLoRA forward: against bitsandbytes matmul_4bit + PEFT's 4-bit LoRA layer (CPU), properties, bad input."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from refimpl import lora, precision, qlora, quant
from tests._peers import require


def _layer(rng, out_f=48, in_f=96, r=4, quant_type="nf4", nested=False, dtype=np.float32):
    W = (rng.standard_normal((out_f, in_f)) * 0.05).astype(dtype)
    packed, state = quant.quantize_4bit(W, 64, quant_type, nested)
    A = rng.standard_normal((r, in_f)) * 0.1
    B = rng.standard_normal((out_f, r)) * 0.1
    return packed, state, A, B


def test_zero_B_leaves_forward_equal_to_the_dequantized_base():
    rng = np.random.default_rng(0)
    packed, state, A, B = _layer(rng)
    x = rng.standard_normal((3, 96))
    y = qlora.forward(x, packed, state, A, np.zeros_like(B), 2.0)
    assert np.array_equal(y, x @ quant.dequantize_4bit(packed, state).astype(np.float64).T)


def test_forward_is_lora_forward_over_the_dequantized_weight():
    rng = np.random.default_rng(1)
    packed, state, A, B = _layer(rng, quant_type="fp4", nested=True)
    x, bias = rng.standard_normal((5, 96)), rng.standard_normal(48)
    mask = (rng.random((5, 96)) < 0.9).astype(np.float64)
    W = quant.dequantize_4bit(packed, state).astype(np.float64)
    expected = lora.forward(x, W, A, B, 0.5, bias=bias, dropout_mask=mask, dropout_p=0.1)
    got = qlora.forward(x, packed, state, A, B, 0.5, bias, dropout_mask=mask, dropout_p=0.1)
    assert np.array_equal(got, expected)


def test_forward_accepts_bfloat16_inputs_exactly():
    rng = np.random.default_rng(2)
    packed, state, A, B = _layer(rng, dtype=ml_dtypes.bfloat16)
    x = rng.standard_normal((2, 96)).astype(ml_dtypes.bfloat16)
    y = qlora.forward(x, packed, state, A.astype(ml_dtypes.bfloat16), B, 1.0)
    W = quant.dequantize_4bit(packed, state).astype(np.float64)
    A64 = A.astype(ml_dtypes.bfloat16).astype(np.float64)
    assert np.allclose(y, x.astype(np.float64) @ W.T + (x.astype(np.float64) @ A64.T) @ B.T, rtol=0, atol=1e-12)


def test_forward_rejects_bad_input():
    rng = np.random.default_rng(3)
    packed, state, A, B = _layer(rng)
    x = rng.standard_normal((2, 96))
    with pytest.raises(ValueError, match="x: expected shape"):
        qlora.forward(x[:, :95], packed, state, A, B, 1.0)
    with pytest.raises(TypeError, match="state"):
        qlora.forward(x, packed, None, A, B, 1.0)
    with pytest.raises(ValueError, match="packed"):
        qlora.forward(x, packed[:-1], state, A, B, 1.0)
    _, state1d = quant.quantize_4bit(np.ones(96 * 48, np.float32), 64)
    with pytest.raises(ValueError, match="2-D"):
        qlora.forward(x, packed, state1d, A, B, 1.0)
    with pytest.raises(TypeError, match="x: expected a float"):
        qlora.forward(np.ones((2, 96), np.int64), packed, state, A, B, 1.0)
    with pytest.raises(ValueError, match="A"):
        qlora.forward(x, packed, state, A[:, :90], B, 1.0)


# ----------------------------------------------------------------------------------------------
# differential: bitsandbytes Linear4bit (matmul_4bit) + peft.tuners.lora.bnb.Linear4bit on CPU


CASES = [
    ("float32", "nf4", True),
    ("float32", "fp4", False),
    ("bfloat16", "nf4", True),
    ("bfloat16", "fp4", True),
    ("float16", "nf4", False),
]


@pytest.mark.peers
@pytest.mark.parametrize("dtype,quant_type,nested", CASES)
def test_forward_agrees_with_bitsandbytes_and_peft_within_the_derived_bound(dtype, quant_type, nested):
    torch = require("torch")
    bnb = require("bitsandbytes")
    peft_bnb = require("peft.tuners.lora.bnb")
    from peft import LoraConfig

    torch.manual_seed(0)
    tdt = getattr(torch, dtype)
    K, N, r, M = 256, 80, 8, 7
    base = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=tdt, compress_statistics=nested, quant_type=quant_type)
    base.weight = bnb.nn.Params4bit(
        (torch.randn(N, K) * 0.05).to(tdt), requires_grad=False, compress_statistics=nested, quant_type=quant_type
    )._quantize("cpu")
    base.bias = torch.nn.Parameter(torch.randn(N).to(tdt), requires_grad=False)
    layer = peft_bnb.Linear4bit(
        base,
        "default",
        LoraConfig(r=r, lora_alpha=16, init_lora_weights=False),
        r=r,
        lora_alpha=16,
        init_lora_weights=False,
    )
    layer.lora_A["default"].to(tdt)
    layer.lora_B["default"].to(tdt)
    assert type(layer).__module__ == "peft.tuners.lora.bnb"
    x = torch.randn(M, K).to(tdt)
    with torch.no_grad():
        y = layer(x)

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
    ref = qlora.forward(f64(x), packed, state, A, B, s, f64(base.bias))
    bound = qlora.forward_error_bound(f64(x), packed, state, A, B, s, f64(base.bias), dtype=dtype, accumulate="float32")
    report = precision.compare_to_bound(f64(y), ref, bound)
    print(f"\nqlora forward {dtype} {quant_type} nested={nested} vs bitsandbytes+PEFT: {report}")
    assert report.passed, str(report)
    # The base weight itself is exactly what refimpl dequantizes.
    W_bnb = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    assert np.array_equal(f64(W_bnb).reshape(N, K), quant.dequantize_4bit(packed, state).astype(np.float64))
