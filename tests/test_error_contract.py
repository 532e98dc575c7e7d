"""Error contract of the file readers (issue 14): a malformed file is a ValueError naming the file.

Every malformed safetensors case below is rejected by ``io.load_tensors``, ``merging.read_index``
and ``merging.merge_files`` with a ValueError whose message names the file (never the safetensors
library's ``SafetensorError``, a KeyError or a RecursionError), and each case is one the
safetensors library itself rejects too, so refimpl is not stricter than the format. Every dtype
the readers list loads (FP8 and bfloat16 included), and a 0-d tensor keeps its shape.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from refimpl import io, merging


def _raw(header: object, data: bytes = b"", *, length: int | None = None, text: bytes | None = None) -> bytes:
    body = json.dumps(header).encode() if text is None else text
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def _good(**extra: object) -> dict:
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, **extra}


F32x2 = np.ones(2, np.float32).tobytes()

MALFORMED = {
    "empty file": b"",
    "shorter than the length field": b"\x01\x02\x03",
    "header length beyond the file": _raw(_good(), F32x2, length=10_000),
    "header length above 100 MB": _raw(_good(), F32x2, length=2**40),
    "header not UTF-8": _raw(None, F32x2, text=b'{"\xff": 1}'),
    "header not JSON": _raw(None, F32x2, text=b"{not json}"),
    "header a JSON array": _raw([1, 2], F32x2),
    "header nested 100000 deep": _raw(None, b"", text=b"[" * 100_000 + b"]" * 100_000),
    "duplicate tensor name": _raw(
        None,
        F32x2 * 2,
        text=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
    ),
    "__metadata__ not an object": _raw(_good(__metadata__=[1]), F32x2),
    "__metadata__ value not a string": _raw(_good(__metadata__={"k": 1}), F32x2),
    "tensor entry not an object": _raw({"a": 5}, F32x2),
    "unknown dtype": _raw({"a": {"dtype": "F128", "shape": [2], "data_offsets": [0, 8]}}, F32x2),
    "dtype missing": _raw({"a": {"shape": [2], "data_offsets": [0, 8]}}, F32x2),
    "negative dimension": _raw({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, F32x2),
    "shape not a list": _raw({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, F32x2),
    "data_offsets reversed": _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, F32x2),
    "data_offsets of length 3": _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, F32x2),
    "data beyond the file (truncated)": _raw(_good(), F32x2[:5]),
    "extent differs from shape": _raw({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, F32x2),
    "gap between tensors": _raw(
        {
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
        },
        F32x2,
    ),
    "overlapping tensors": _raw(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
        },
        F32x2,
    ),
    "bytes after the last tensor": _raw(_good(), F32x2 + b"\0" * 8),
    "shape overflowing int64": _raw({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}, F32x2),
}


def _write(tmp_path: Path, label: str, data: bytes) -> Path:
    p = tmp_path / (label.replace(" ", "_").replace("(", "").replace(")", "") + ".safetensors")
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("label", list(MALFORMED))
def test_malformed_safetensors_raise_a_value_error_naming_the_file(tmp_path, label):
    p = _write(tmp_path, label, MALFORMED[label])
    with pytest.raises(Exception):  # noqa: B017 - the format itself rejects the case (any exception)
        with safe_open(str(p), framework="numpy") as fh:
            for k in fh.keys():
                fh.get_tensor(k)
    good = tmp_path / "good.safetensors"
    save_file({"a": np.ones(2, np.float32)}, str(good))
    calls = {
        "io.load_tensors": lambda: io.load_tensors(p),
        "merging.read_index": lambda: merging.read_index(p),
        "merge_files(base=bad)": lambda: merging.merge_files(p, [good], tmp_path / "o1", progress=False),
        "merge_files(models=[bad])": lambda: merging.merge_files(good, [p], tmp_path / "o2", progress=False),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as info:
            call()
        assert type(info.value) is ValueError, name
        assert str(p) in str(info.value), (name, str(info.value))
        assert "\n" not in str(info.value) and len(str(info.value)) < 400, name
    print(f"| {label} | {str(info.value).replace(str(p), '<file>')} |")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_refimpl_metadata_that_is_not_a_json_object_names_the_file(tmp_path):
    for text in ("{bad", "[1, 2]"):
        p = tmp_path / "m.safetensors"
        save_file({"a": np.ones(2)}, str(p), metadata={io.META_KEY: text})
        with pytest.raises(ValueError, match=rf"{p}: __metadata__\['refimpl'\]"):
            io.load_tensors(p)


@pytest.mark.parametrize("code", ["F8_E4M3", "F8_E5M2", "BF16"])
def test_listed_low_precision_dtypes_load_and_merge(tmp_path, code):
    dt = np.dtype(
        {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "BF16": ml_dtypes.bfloat16}[code]
    )
    x = np.array([-2.0, -0.5, 0.0, 0.25, 1.5, 3.0], np.float32).astype(dt)
    header = {
        "w": {"dtype": code, "shape": [2, 3], "data_offsets": [0, x.nbytes]},
        "v": {"dtype": "F32", "shape": [2], "data_offsets": [x.nbytes, x.nbytes + 8]},
    }
    p = tmp_path / "lp.safetensors"
    p.write_bytes(_raw(header, x.tobytes() + np.array([1.0, 2.0], np.float32).tobytes()))
    tensors, _ = io.load_tensors(p)
    assert tensors["w"].dtype == dt and tensors["w"].shape == (2, 3)
    np.testing.assert_array_equal(tensors["w"].reshape(-1).view(np.uint8), x.view(np.uint8))
    assert merging.read_index(p)["w"].dtype == dt
    m = tmp_path / "m.safetensors"
    m.write_bytes(_raw(header, x.tobytes() + np.array([3.0, 5.0], np.float32).tobytes()))
    merging.merge_files(p, [m], tmp_path / "out", weights=[0.5], progress=False)
    got, _ = io.load_tensors(tmp_path / "out" / "model.safetensors")
    if dt in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)):
        np.testing.assert_array_equal(got["w"].view(np.uint8), tensors["w"].view(np.uint8))  # copied from the base
    else:
        np.testing.assert_array_equal(got["w"], tensors["w"])  # τ = 0
    np.testing.assert_array_equal(got["v"], [2.0, 3.5])


def test_zero_dimensional_tensors_keep_their_shape_and_merge_like_one_element(tmp_path):
    def model(name: str, shape: list[int], values: list[float]) -> Path:
        header = {
            "scale": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]},
            "w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        }
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(_raw(header, np.array(values, np.float32).tobytes()))
        return p

    a0, b0 = model("a0", [], [2.0, 1.0, 1.0]), model("b0", [], [4.0, 3.0, 1.0])
    a1, b1 = model("a1", [1], [2.0, 1.0, 1.0]), model("b1", [1], [4.0, 3.0, 1.0])
    tensors, _ = io.load_tensors(a0)
    assert tensors["scale"].shape == () and tensors["scale"] == 2.0
    for method, kw in [
        ("task_arithmetic", {"weights": [0.5]}),
        ("ties", {"options": {"density": 1.0}}),
        ("dare", {"options": {"density": 0.5}}),
        ("linear", {"weights": [0.5]}),
        ("slerp", {"options": {"t": 0.25}}),
    ]:
        merging.merge_files(a0, [b0], tmp_path / method / "0d", method=method, progress=False, **kw)
        merging.merge_files(a1, [b1], tmp_path / method / "1", method=method, progress=False, **kw)
        got, _ = io.load_tensors(tmp_path / method / "0d" / "model.safetensors")
        ref, _ = io.load_tensors(tmp_path / method / "1" / "model.safetensors")
        assert got["scale"].shape == () and got["scale"].dtype == np.float32, method
        assert got["scale"].tobytes() == ref["scale"].tobytes(), method


def test_save_tensors_refuses_what_it_could_not_read_back(tmp_path):
    with pytest.raises(ValueError, match="__metadata__"):
        io.save_tensors(tmp_path / "x.safetensors", {"__metadata__": np.ones(3)})
    with pytest.raises(TypeError, match=r"tensors\['a'\]"):
        io.save_tensors(tmp_path / "x.safetensors", {"a": np.ma.masked_array([1.0, np.nan], [0, 1])})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[1, 2]", "expected a JSON object, got a JSON list"),
        ("{bad", "not valid JSON"),
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
    ],
    ids=["list", "bad JSON", "nested 100000 deep", "not UTF-8"],
)
def test_load_peft_adapter_refuses_a_config_that_is_not_a_json_object(tmp_path, text, match):
    cfg = tmp_path / "adapter_config.json"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    io.save_tensors(tmp_path / "adapter_model.safetensors", {"layer.lora_A.weight": np.ones((2, 3))})
    with pytest.raises(ValueError, match=match) as info:
        io.load_peft_adapter(tmp_path)
    assert str(cfg) in str(info.value)
