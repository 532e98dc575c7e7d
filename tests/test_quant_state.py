"""QuantState: validation, nested absmax, conversion to and from bitsandbytes' serialized dict."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refimpl import quant
from refimpl.quant import QuantState


def _state(**over):
    kw = dict(
        shape=(4, 32),
        dtype="float32",
        blocksize=64,
        quant_type="nf4",
        absmax=np.ones(2, np.float32),
        code=quant.codebook("nf4"),
    )
    kw.update(over)
    return QuantState(**kw)


def test_serialized_dict_has_bitsandbytes_keys_and_json():
    x = np.random.default_rng(0).standard_normal((40, 70)).astype(np.float32)
    _, state = quant.quantize_4bit(x, 64, "fp4", double_quant=True)
    d = state.to_bnb_dict()
    assert set(d) == {"absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__fp4"}
    meta = json.loads(bytes(d["quant_state.bitsandbytes__fp4"]).decode())
    assert meta == {
        "quant_type": "fp4",
        "blocksize": 64,
        "dtype": "float32",
        "shape": [40, 70],
        "nested_blocksize": 256,
        "nested_dtype": "float32",
        "nested_offset": float(state.offset),
    }
    assert d["absmax"].dtype == np.uint8 and d["nested_absmax"].dtype == np.float32


@pytest.mark.parametrize("nested", [False, True])
def test_state_survives_a_round_trip_through_the_dict(nested):
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float16)
    packed, state = quant.quantize_4bit(x, 32, "nf4", double_quant=nested)
    back = QuantState.from_bnb_dict(
        {"model.layer.weight." + k: v for k, v in state.to_bnb_dict().items()}, profile="reference"
    )
    assert back.shape == state.shape and back.dtype == "float16" and back.nested == nested
    assert np.array_equal(quant.dequantize_4bit(packed, back), quant.dequantize_4bit(packed, state))


def test_single_block_nested_absmax_is_exactly_the_offset():
    x = np.linspace(-2, 3, 64, dtype=np.float32)
    _, state = quant.quantize_4bit(x, 64, double_quant=True)
    assert state.nested_absmax.tolist() == [0.0]
    assert state.block_absmax().tolist() == [3.0] == [float(state.offset)]


@pytest.mark.parametrize(
    "over,exc,match",
    [
        ({"absmax": np.ones(3, np.float32)}, ValueError, "absmax: expected 2 values"),
        ({"absmax": np.ones(2)}, TypeError, "absmax: expected a float32"),
        ({"blocksize": 48}, ValueError, "blocksize"),
        ({"dtype": "int8"}, ValueError, "dtype"),
        ({"quant_type": "fp8"}, ValueError, "quant_type"),
        ({"shape": (0, 3)}, ValueError, "shape"),
        ({"code": np.ones(15, np.float32)}, ValueError, "code"),
        ({"profile": "gpu"}, ValueError, "profile"),
        ({"offset": np.float32(1)}, ValueError, "offset"),
        ({"absmax": np.ones(2, np.uint8), "nested_absmax": np.ones(1, np.float32)}, ValueError, "offset"),
        (
            {"absmax": np.ones(2, np.float32), "nested_absmax": np.ones(1, np.float32), "offset": 1.0},
            TypeError,
            "absmax: expected a uint8",
        ),
    ],
)
def test_state_rejects_inconsistent_fields(over, exc, match):
    with pytest.raises(exc, match=match):
        _state(**over)


def test_from_dict_rejects_incomplete_dicts():
    d = _state().to_bnb_dict()
    with pytest.raises(ValueError, match=r"quant_state\.bitsandbytes"):
        QuantState.from_bnb_dict({k: v for k, v in d.items() if not k.startswith("quant_state")})
    with pytest.raises(ValueError, match="absmax"):
        QuantState.from_bnb_dict({k: v for k, v in d.items() if k != "absmax"})
    with pytest.raises(TypeError, match="dict"):
        QuantState.from_bnb_dict([("absmax", 1)])
