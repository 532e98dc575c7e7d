"""Golden vectors: committed files equal the regenerated ones, bytes are deterministic, inputs exact."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from safetensors.numpy import load_file

import refimpl
from refimpl import io
from refimpl.conformance import vectors
from refimpl.conformance.table import op_table

DIR = vectors.default_dir()


def test_committed_vectors_equal_the_regenerated_ones():
    problems = vectors.verify()
    assert problems == [], (
        "\n".join(problems) + "\n(run `refimpl vectors generate --dir refimpl/golden/v1` and commit it)"
    )


def test_total_size_is_within_budget_and_manifest_lists_every_file_with_sha256():
    manifest = json.loads((DIR / "MANIFEST.json").read_text())
    files = sorted(p.relative_to(DIR).as_posix() for p in DIR.glob("*/*.safetensors"))
    assert sorted(manifest["files"]) == files
    total = sum((DIR / f).stat().st_size for f in files)
    print(f"\ngolden vectors: {len(files)} files, {total} bytes (budget {vectors.MAX_TOTAL_BYTES})")
    assert total == manifest["total_bytes"] <= vectors.MAX_TOTAL_BYTES
    assert manifest["spec_version"] == refimpl.SPEC_VERSION
    assert manifest["generator"] == f"refimpl {refimpl.__version__}"
    for f, entry in manifest["files"].items():
        assert hashlib.sha256((DIR / f).read_bytes()).hexdigest() == entry["sha256"], f


def test_generation_is_byte_identical_across_processes_with_different_hash_seeds():
    code = (
        "import hashlib; from refimpl.conformance import vectors; "
        "b = vectors.build(); print(hashlib.sha256(b''.join(b[k] for k in sorted(b))).hexdigest())"
    )
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=str(DIR.parents[2])
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def _arrays(value):
    """The arrays inside an argument: itself, list items, dataclass fields (a QuantState's absmax, code …)."""
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _arrays(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _arrays(getattr(value, f.name))


def test_vectors_are_plain_safetensors_whose_inputs_load_exactly():
    """Every ``input.*`` tensor read without refimpl (safetensors alone) is, bit for bit and dtype for dtype,
    the argument refimpl's loader passes to the op."""
    n = 0
    for spec in op_table().values():
        if "golden" not in spec.tiers:
            continue
        for label, case, expected in vectors.load_op(spec.name):
            raw = load_file(str(DIR / spec.name / f"{label}.safetensors"))
            outputs = {k.removeprefix("output."): v for k, v in raw.items() if k.startswith("output.")}
            assert outputs and set(outputs) <= set(expected), (spec.name, label)  # text outputs: in the metadata
            stored = [(v.dtype.str, v.shape, v.tobytes()) for k, v in raw.items() if k.startswith("input.")]
            loaded = [(a.dtype.str, a.shape, a.tobytes()) for v in case.values() for a in _arrays(v)]
            # float inputs one to one; every other loaded array (codes, masks) is a stored tensor (the stored
            # side also holds a QuantState's JSON description as bytes)
            floats = [t for t in stored if t[0][1] == "f"]
            assert sorted(floats) == sorted(t for t in loaded if t[0][1] == "f"), (spec.name, label)
            assert all(t in stored for t in loaded), (spec.name, label)
            n += 1
    assert n >= 100


#: bounded-tolerance inputs that are not dyadic by design, and why
NOT_DYADIC = {
    ("dora.unmerge", "W_merged"): "dora.merge's output, the state unmerge receives",
    ("dora.unmerge", "weight_norm"): "the cached norm ‖V‖ of that merge",
}


def _dyadic(a: np.ndarray) -> bool:
    """Multiples of 2⁻⁵ in [−2, 2] (spec/vectors.md, "How to compare")."""
    a = a.astype(np.float64)
    return bool(np.all(np.abs(a) <= 2) and np.all(a * 32 == np.round(a * 32)))


def test_bounded_vectors_have_dyadic_inputs_and_short_dyadic_scalars():
    for spec in op_table().values():
        if "golden" not in spec.tiers or spec.tolerance.kind != "bounded":
            continue
        for label, case, _ in vectors.load_op(spec.name):
            for arg, value in case.items():
                if (spec.name, arg) in NOT_DYADIC or dataclasses.is_dataclass(value):
                    continue  # (a QuantState holds a 4-bit weight: its codebook and scales are its format's)
                for a in _arrays(value):
                    if a.dtype.kind == "f":
                        assert _dyadic(a), (spec.name, label, arg)
                if arg in ("scaling", "alpha", "weights"):  # the scalar factors (density is a fraction kept)
                    for v in np.ravel(np.asarray(value, dtype=np.float64)):
                        q = Fraction(float(v))
                        assert q.denominator & (q.denominator - 1) == 0 and abs(q.numerator) < 2**8, (spec.name, arg)
                if arg == "dropout_p":  # the keep factor 1/(1 − p) is what the formula multiplies by
                    q = 1 / (1 - Fraction(value))
                    assert q.denominator == 1 and q.numerator & (q.numerator - 1) == 0, (spec.name, value)


def _exact(a) -> np.ndarray:
    return np.vectorize(Fraction, otypes=[object])(np.asarray(a, dtype=np.float64))


def test_lora_forward_and_merge_vectors_equal_the_exact_rational_result():
    """With dyadic inputs every sum of products is exact, so the stored float64 output is the exact value of
    the formula, computed here in rational arithmetic (y = x Wᵀ + b + s·(x_d Aᵀ) Bᵀ, W' = W + s·B A)."""
    for label, case, expected in vectors.load_op("lora.forward"):
        s = Fraction(case["scaling"])
        W = _exact(case["W"].T if case["fan_in_fan_out"] else case["W"])
        x = _exact(case["x"])
        xd = x
        if "dropout_mask" in case:
            xd = x * _exact(case["dropout_mask"]) / (1 - Fraction(case["dropout_p"]))
        y = x @ W.T + (xd @ _exact(case["A"]).T) @ _exact(case["B"]).T * s
        if "bias" in case:
            y = y + _exact(case["bias"])
        assert np.array_equal(_exact(expected["out"]), y), label
    for label, case, expected in vectors.load_op("lora.merge"):
        delta = _exact(case["B"]) @ _exact(case["A"]) * Fraction(case["scaling"])
        W = _exact(case["W"]) + (delta.T if case["fan_in_fan_out"] else delta)
        assert np.array_equal(_exact(expected["out"]), W), label


def test_dyadic_golden_inputs_make_lora_forward_exact_in_float32():
    """Every sum of products of the stored inputs is exact in float32, so a float32 kernel matches bit for bit."""
    import refimpl.lora as lora

    for label, case, expected in vectors.load_op("lora.forward"):
        c32 = {
            k: (v.astype(np.float32).astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in case.items()
        }
        x32, W32 = case["x"].astype(np.float32), case["W"].astype(np.float32)
        base32 = (x32 @ (W32 if case["fan_in_fan_out"] else W32.T)).astype(np.float64)
        base64 = case["x"] @ (case["W"] if case["fan_in_fan_out"] else case["W"].T)
        np.testing.assert_array_equal(base32, base64, err_msg=label)
        np.testing.assert_array_equal(lora.forward(**c32), expected["out"], err_msg=label)


def test_tensor_file_round_trip_and_refusals(tmp_path):
    t = {"a": np.arange(3.0), "b": np.array(2.5), "m": np.array([True, False])}
    p = io.save_tensors(tmp_path / "x.safetensors", t, {"k": [1, 2], "s": "v"})
    back, meta = io.load_tensors(p)
    assert meta == {"k": [1, 2], "s": "v"}
    np.testing.assert_array_equal(back["a"], t["a"])
    assert io.tensors_to_bytes(t, {"s": "v", "k": [1, 2]}) == io.tensors_to_bytes(t, {"k": [1, 2], "s": "v"})
    with pytest.raises(TypeError, match="tensors"):
        io.save_tensors(tmp_path / "y.safetensors", {"a": [1.0]})
    with pytest.raises(TypeError, match="tensors"):
        io.save_tensors(tmp_path / "y.safetensors", {})
    with pytest.raises(TypeError, match="complex"):
        io.save_tensors(tmp_path / "y.safetensors", {"a": np.zeros(2, complex)})
    with pytest.raises(ValueError):
        io.save_tensors(tmp_path / "y.safetensors", {"a": np.zeros(2)}, {"x": float("nan")})
    assert not (tmp_path / "y.safetensors").exists()  # failures leave no partial file
    with pytest.raises(FileNotFoundError, match="path"):
        io.load_tensors(tmp_path / "missing.safetensors")


def test_peft_adapter_folder_is_read_from_safetensors_only(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        io.load_peft_adapter(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickle"):
        io.load_peft_adapter(tmp_path)
    io.save_tensors(tmp_path / "adapter_model.safetensors", {"layer.lora_A.weight": np.ones((4, 6))})
    cfg, tensors = io.load_peft_adapter(tmp_path)
    assert cfg["r"] == 4 and tensors["layer.lora_A.weight"].shape == (4, 6)
    with pytest.raises(FileNotFoundError, match="adapter_config"):
        io.load_peft_adapter(tmp_path / "nope")


def test_verify_reports_a_tampered_file(tmp_path):
    vectors.generate(tmp_path)
    assert vectors.verify(tmp_path) == []
    victim = sorted(tmp_path.glob("*/*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    problems = vectors.verify(tmp_path)
    assert any("differs" in p for p in problems)
    (tmp_path / "MANIFEST.json").unlink()
    assert "MANIFEST" in vectors.verify(tmp_path)[0]
