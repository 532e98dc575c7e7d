"""Golden vectors: committed files equal the regenerated ones, bytes are deterministic, inputs exact."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import refimpl
from refimpl import io
from refimpl.conformance import vectors
from refimpl.conformance.table import op_table

DIR = vectors.default_dir()


def test_committed_vectors_equal_the_regenerated_ones():
    problems = vectors.verify()
    assert problems == [], ("\n".join(problems)
                            + "\n(run `refimpl vectors generate --dir refimpl/golden/v1` and commit it)")


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
    code = ("import hashlib; from refimpl.conformance import vectors; "
            "b = vectors.build(); print(hashlib.sha256(b''.join(b[k] for k in sorted(b))).hexdigest())")
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                             cwd=str(DIR.parents[2]))
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_vectors_are_plain_safetensors_with_exact_inputs_and_reference_outputs():
    from safetensors.numpy import load_file

    for spec in op_table().values():
        if not spec.available() or "golden" not in spec.tiers:
            continue
        for label, case, expected in vectors.load_op(spec.name):
            raw = load_file(str(DIR / spec.name / f"{label}.safetensors"))  # readable without refimpl
            assert any(k.startswith("output.") for k in raw)
            got = spec.reference()(**case)
            from refimpl.conformance._values import flatten

            for name, arr in flatten(got).items():
                np.testing.assert_array_equal(arr, expected[name], err_msg=f"{spec.name}/{label}/{name}")


def test_dyadic_golden_inputs_make_lora_forward_exact_in_float32():
    """Every sum of products of the stored inputs is exact in float32, so a float32 kernel matches bit for bit."""
    import refimpl.lora as lora

    for label, case, expected in vectors.load_op("lora.forward"):
        c32 = {k: (v.astype(np.float32).astype(np.float64) if isinstance(v, np.ndarray) else v)
               for k, v in case.items()}
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
