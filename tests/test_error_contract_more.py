"""Error contract, part 2 (issue 14): one regression test per defect.

Snippets built from data only; golden vectors checked against MANIFEST.json and decoded with errors
naming the file; QuantState.from_bnb_dict; masked arrays and np.matrix in the quantizers; 0-d inputs
of the error bounds; integer overflow in parameter counts; ``refimpl memory`` option ranges; a
damaged numba cache; finite inputs whose result overflows.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from refimpl import dora, io, lora, memory, merging, precision, qlora, quant
from refimpl.conformance import op_table, run, vectors
from refimpl.conformance._values import literal, snippet
from refimpl.conformance.runner import FAIL
from refimpl.conformance.targets import NamespaceTarget

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = "boom\nimport os; os.system('x')"
#: every line break Python's tokenizer or str.splitlines knows, each carrying the payload
BREAKS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"]


def _injected(code: str) -> list[str]:
    """Statements or calls in ``code`` that a message/label smuggled in (an import of os, a .system call)."""
    tree = ast.parse(code)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "os" for a in node.names):
            hits.append("import os")
        if isinstance(node, ast.Attribute) and node.attr == "system":
            hits.append(".system")
    return hits


# ---------------------------------------------------------------------------- 1. snippets


@pytest.mark.parametrize("brk", BREAKS, ids=[repr(b) for b in BREAKS])
def test_snippet_note_and_values_never_become_code(brk):
    payload = PAYLOAD.replace("\n", brk)
    case = {"A": np.ones((2, 3)), "label": payload, "opts": {"k\nimport os": payload}, "names": [payload]}
    code = snippet("lora.delta", "numpy", case, note=f"golden case {payload}: error {payload}")
    compile(code, "<snippet>", "exec")
    assert _injected(code) == [], code
    for line in code.splitlines():
        assert not line.lstrip().startswith("import os"), code
    # a value that is text survives as the same text
    ns: dict = {}
    exec(compile(f"import numpy as np\nv = {literal(payload)}", "<literal>", "exec"), ns)
    assert ns["v"] == payload


def test_snippet_with_argument_names_that_are_not_identifiers_uses_a_dict():
    code = snippet("lora.delta", "numpy", {"x = 1\nimport os; os.system('x')\ny": 1.5})
    assert _injected(code) == [] and "**case" in code
    compile(code, "<snippet>", "exec")


def test_an_exception_message_with_a_newline_stays_in_the_snippets_comments():
    def bad_delta(**kw):
        raise ValueError(PAYLOAD)

    res = run(
        NamespaceTarget("evil", {"lora.delta": bad_delta}), "lora.delta", tiers=("names", "properties"), examples=2
    )
    fails = [r for r in res.results if r.status == FAIL and r.snippet]
    assert fails, res.results
    for r in fails:
        assert "os.system" in r.snippet  # the message is shown ...
        assert _injected(r.snippet) == [], r.snippet  # ... but only as a comment


def test_snippet_values_rebuild_generators_states_and_adapters_exactly():
    rng = np.random.default_rng(7)
    rng.random(3)  # a Generator part-way through its stream: its state, not a seed, must be rebuilt
    x = np.random.default_rng(1).standard_normal(150).astype(np.float32)
    x[5] = np.nan
    _, state = quant.quantize_4bit(x, 64, "nf4", True, nonfinite="propagate")  # NaN nested offset
    adapter = dora.DoraAdapter(A=np.ones((2, 3)), B=np.ones((4, 2)), m=np.ones(4), scaling=0.5)
    code = snippet("merging.dare_masks", "numpy", {"rng": rng, "state": state, "adapters": [adapter]})
    ns: dict = {}
    exec(compile(code.split("\nexpected = ")[0], "<snippet>", "exec"), ns)
    assert ns["rng"].bit_generator.state == rng.bit_generator.state
    got = ns["state"].to_bnb_dict()
    assert all(np.array_equal(got[k], v, equal_nan=True) for k, v in state.to_bnb_dict().items())
    assert isinstance(ns["adapters"][0], dora.DoraAdapter) and ns["adapters"][0].scaling == 0.5


def _write_vectors(root: Path, op: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "MANIFEST.json").write_bytes(vectors._manifest(files))


def test_a_golden_case_label_with_a_newline_stays_in_the_snippets_comments(tmp_path):
    spec = op_table()["lora.delta"]
    label, case = spec.golden(vectors._rng(spec.name))[0]
    files = {"lora.delta/evil.safetensors": vectors._encode(spec, f"{label}{PAYLOAD}", case)}
    _write_vectors(tmp_path, "lora.delta", files)

    def off_by_one(**kw):
        return lora.delta(**kw) + 1.0

    res = run(
        NamespaceTarget("off", {"lora.delta": off_by_one}),
        "lora.delta",
        tiers=("names", "golden"),
        vectors_dir=tmp_path,
    )
    fail = [r for r in res.results if r.tier == "golden" and r.status == FAIL]
    assert fail and "os.system" in fail[0].snippet
    assert _injected(fail[0].snippet) == [], fail[0].snippet


# ---------------------------------------------------------------------------- 2. golden vector files


OP = "lora.delta"


@pytest.fixture()
def vec_dir(tmp_path) -> Path:
    _write_vectors(tmp_path, OP, vectors.build(OP))
    return tmp_path


def _relisted(root: Path, rel: str, data: bytes) -> Path:
    """Replace one vector file and list its new bytes in MANIFEST.json (a consistent but bad file)."""
    p = root / rel
    p.write_bytes(data)
    doc = json.loads((root / "MANIFEST.json").read_text())
    import hashlib

    doc["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (root / "MANIFEST.json").write_text(json.dumps(doc))
    return p


def _meta_without(root: Path, rel: str, key: str) -> bytes:
    tensors, meta = io.load_tensors(root / rel)
    meta.pop(key)
    return io.tensors_to_bytes(tensors, meta)


BAD_FILES = {
    "missing 'shapes'": lambda root, rel: _meta_without(root, rel, "shapes"),
    "missing 'args'": lambda root, rel: _meta_without(root, rel, "args"),
    "missing 'kinds'": lambda root, rel: _meta_without(root, rel, "kinds"),
    "not safetensors (SafetensorError)": lambda root, rel: b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage",
    "output tensor missing": lambda root, rel: io.tensors_to_bytes(
        {k: v for k, v in io.load_tensors(root / rel)[0].items() if not k.startswith("output.")},
        io.load_tensors(root / rel)[1],
    ),
    "case of another op": lambda root, rel: io.tensors_to_bytes(
        io.load_tensors(root / rel)[0], {**io.load_tensors(root / rel)[1], "op": "lora.merge"}
    ),
}


def _bad_json_metadata(root: Path, rel: str) -> bytes:
    from safetensors.numpy import save

    tensors, _ = io.load_tensors(root / rel)
    return save(tensors, metadata={io.META_KEY: "{not json"})


BAD_FILES["bad metadata JSON"] = _bad_json_metadata


@pytest.mark.parametrize("label", list(BAD_FILES))
def test_a_bad_vector_file_is_a_value_error_naming_it(vec_dir, label):
    rel = sorted(vectors.build(OP))[0]
    p = _relisted(vec_dir, rel, BAD_FILES[label](vec_dir, rel))
    with pytest.raises(ValueError) as info:
        vectors.load_op(OP, vec_dir)
    assert type(info.value) is ValueError and str(p) in str(info.value), str(info.value)
    print(f"| {label} | {str(info.value).replace(str(p), '<file>')} |")


def test_conform_checks_the_manifest_sha256_of_each_file_it_reads(vec_dir):
    assert len(vectors.load_op(OP, vec_dir)) == len(vectors.build(OP))
    rel = sorted(vectors.build(OP))[1]
    p = vec_dir / rel
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01  # one bit of one stored value: still a valid safetensors file
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sha256 does not match MANIFEST\.json") as info:
        vectors.load_op(OP, vec_dir)
    assert str(p) in str(info.value)
    res = run("numpy", OP, tiers=("names", "golden"), vectors_dir=vec_dir)  # a FAIL of the golden tier
    golden = [r for r in res.results if r.tier == "golden"]
    assert [r.status for r in golden] == [FAIL] and str(p) in golden[0].message


@pytest.mark.parametrize(
    "change", ["unlisted file", "listed file missing", "manifest missing", "manifest not JSON", "size differs"]
)
def test_the_manifest_must_describe_the_op_folder(vec_dir, change):
    rels = sorted(vectors.build(OP))
    if change == "unlisted file":
        p = vec_dir / OP / "extra.safetensors"
        p.write_bytes((vec_dir / rels[0]).read_bytes())
    elif change == "listed file missing":
        p = vec_dir / rels[0]
        p.unlink()
    elif change == "manifest missing":
        p = vec_dir / "MANIFEST.json"
        p.unlink()
    elif change == "manifest not JSON":
        p = vec_dir / "MANIFEST.json"
        p.write_text("{" * 50_000)
    else:
        p = vec_dir / rels[0]
        p.write_bytes(p.read_bytes() + b" ")
    with pytest.raises(ValueError) as info:
        vectors.load_op(OP, vec_dir)
    assert str(p) in str(info.value), str(info.value)


def test_the_committed_vectors_still_load():
    n = 0
    for name in op_table():
        try:
            n += len(vectors.load_op(name))
        except FileNotFoundError:
            continue
    assert n > 0


# ---------------------------------------------------------------------------- 3. QuantState, quantizer inputs


def _state_dict(nested: bool = True) -> dict[str, np.ndarray]:
    x = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    return quant.quantize_4bit(x, 64, "nf4", nested)[1].to_bnb_dict()


def _with_meta(d: dict, **changes) -> dict:
    key = "quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(d[key]).decode())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    return {**d, key: np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()}


@pytest.mark.parametrize("key", ["absmax", "quant_map", "nested_quant_map"])
def test_from_bnb_dict_names_a_missing_tensor(key):
    d = {k: v for k, v in _state_dict().items() if k != key}
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        quant.QuantState.from_bnb_dict(d)


@pytest.mark.parametrize("key", ["shape", "blocksize", "dtype", "quant_type", "nested_offset", "nested_blocksize"])
def test_from_bnb_dict_names_a_missing_metadata_field(key):
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        quant.QuantState.from_bnb_dict(_with_meta(_state_dict(), **{key: None}))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_from_bnb_dict_refuses_a_non_finite_nested_offset_unless_propagating(bad):
    d = _with_meta(_state_dict(), nested_offset=bad)
    with pytest.raises(ValueError, match="nested_offset"):
        quant.QuantState.from_bnb_dict(d)
    # the state of an input that held NaN/inf (bitsandbytes and nonfinite="propagate" give it) still reads
    state = quant.QuantState.from_bnb_dict(d, nonfinite="propagate")
    assert not np.isfinite(state.offset)


@pytest.mark.parametrize("key", ["quant_map", "nested_quant_map"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_from_bnb_dict_refuses_a_non_finite_code_table(key, bad):
    d = _state_dict()
    table = d[key].copy()
    table[3] = bad
    for nonfinite in ("raise", "propagate"):
        with pytest.raises(ValueError, match=key):
            quant.QuantState.from_bnb_dict({**d, key: table}, nonfinite=nonfinite)


def test_a_propagated_state_round_trips_through_the_bnb_dict():
    x = np.random.default_rng(1).standard_normal(150).astype(np.float32)
    x[5] = np.nan
    packed, state = quant.quantize_4bit(x, 64, "nf4", True, nonfinite="propagate")
    back = quant.QuantState.from_bnb_dict(state.to_bnb_dict(), profile=state.profile, nonfinite="propagate")
    np.testing.assert_array_equal(quant.dequantize_4bit(packed, back), quant.dequantize_4bit(packed, state))


def _matrix_and_masked(shape: tuple[int, ...], dtype) -> list:
    a = np.ones(shape, dtype)
    return [np.matrix(a.reshape(shape[0], -1)), np.ma.masked_array(a, np.zeros(shape, bool))]


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself warns on creation
@pytest.mark.parametrize("kind", [0, 1], ids=["np.matrix", "masked array"])
def test_quantizers_refuse_masked_arrays_and_matrices_naming_the_argument(kind):
    x = _matrix_and_masked((2, 64), np.float32)[kind]
    packed, state = quant.quantize_4bit(np.ones((2, 64), np.float32), 64, "nf4", False)
    codes, absmax = quant.quantize_blockwise_8bit(np.ones((2, 256), np.float32), 256)
    calls = {
        "x": lambda: quant.quantize_4bit(x, 64, "nf4", False),
        "x ": lambda: quant.quantize_blockwise_8bit(x, 256),
        "packed": lambda: quant.dequantize_4bit(_matrix_and_masked(packed.shape, np.uint8)[kind], state),
        "nibbles": lambda: quant.pack_nibbles(_matrix_and_masked((2, 4), np.uint8)[kind]),
        "codes": lambda: quant.dequantize_blockwise_8bit(_matrix_and_masked(codes.shape, np.uint8)[kind], absmax),
        "absmax": lambda: quant.dequantize_blockwise_8bit(codes, _matrix_and_masked((2, 1), np.float32)[kind]),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"^{name.strip()}: expected a plain array"):
            call()


def test_a_masked_nan_does_not_slip_past_the_quantizer():
    x = np.ma.masked_array(np.array([1.0, np.nan] * 32, np.float32), [0, 1] * 32)
    with pytest.raises(TypeError, match="MaskedArray"):
        quant.quantize_4bit(x, 64, "nf4", False)


# ---------------------------------------------------------------------------- 4. 0-d inputs, integer overflow


@pytest.mark.parametrize("arg", ["a", "b"])
def test_matmul_error_bound_names_a_zero_dimensional_argument(arg):
    case = {"a": np.ones((2, 3)), "b": np.ones((3, 2)), arg: np.float64(1.0)}
    with pytest.raises(ValueError, match=f"^{arg}: expected an array of at least one dimension"):
        precision.matmul_error_bound(case["a"], case["b"], "float32")


def test_matmul_error_bound_names_a_reduction_length_mismatch():
    with pytest.raises(ValueError, match=r"^b: "):
        precision.matmul_error_bound(np.ones((2, 3)), np.ones((4, 2)), "float32")


@pytest.mark.parametrize("arg", ["x", "A", "B"])
def test_qlora_forward_error_bound_names_a_zero_dimensional_argument(arg):
    rng = np.random.default_rng(0)
    packed, state = quant.quantize_4bit(rng.standard_normal((6, 64)).astype(np.float32), 64, "nf4", False)
    case = {"x": np.ones((2, 64)), "A": np.ones((2, 64)), "B": np.ones((6, 2)), arg: np.float64(0.5)}
    with pytest.raises(ValueError, match=f"^{arg}: "):
        qlora.forward_error_bound(case["x"], packed, state, case["A"], case["B"], 1.0)


def test_parameter_counts_use_python_integers():
    got = dora.param_count(8, 8, 2, kernel_size=(2**31, 2**32))
    assert got == 2 * 8 * 2**63 + 8 * 2 + 8 and got > 0 and type(got) is int
    big = np.int64(2**40)
    shape = memory.ModelShape("huge", n_layers=np.int64(2**20), hidden=big, ffn=big, n_heads=8, vocab=big)
    h = 2**40
    assert shape.n_params() == 2 * h * h + 2**20 * (4 * h * h + 3 * h * h + 2 * h) + h
    layout = merging.ModelLayout(keys=("w",), shapes=((2**32, 2**32),))
    assert layout.sizes == (2**64,)


# ---------------------------------------------------------------------------- 5. refimpl memory


@pytest.mark.parametrize(
    ("argv", "flag", "allowed"),
    [
        (["--rank", "-5"], "--rank", "[1, 8192]"),
        (["--rank", str(10**20)], "--rank", "[1, 8192]"),
        (["lora", "--rank", "9000"], "--rank", "[1, 8192]"),
        (["--seq-len", "0"], "--seq-len", "[1, 16777216]"),
        (["qlora", "--batch", str(10**20)], "--batch", "[1, 1048576]"),
        (["full", "--params", "1e20"], "--params", "1e+15"),
        (["full", "--params", "nan"], "--params", "finite"),
    ],
)
def test_memory_options_out_of_range_exit_2_with_one_line_naming_the_option(capsys, argv, flag, allowed):
    assert memory.main(argv) == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert out.out == "" and "\n" not in err and flag in err and allowed in err, err


def test_memory_usage_errors_are_one_line_and_exit_2():
    p = subprocess.run(
        [sys.executable, "-m", "refimpl.memory", "--rank", "abc"],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=60,
    )
    assert p.returncode == 2 and "--rank" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "refimpl.memory", "--rank", "-5"],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=60,
    )
    assert (
        p.returncode == 2 and p.stderr.strip() == "refimpl memory: --rank: expected an integer in [1, 8192], got -5"
    ), p.stderr


def test_estimate_refuses_a_rank_above_the_model_width():
    with pytest.raises(ValueError, match=r"rank: expected an integer in \[1, 8192\]"):
        memory.estimate("lora", rank=10**20)


# ---------------------------------------------------------------------------- 7. numba cache


NUMBA_SCRIPT = textwrap.dedent("""
    import warnings
    import numpy as np
    from refimpl import lora
    from refimpl.kernels.numba_cpu import lora as k

    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((3, 8)), rng.standard_normal((5, 8))
    A, B = rng.standard_normal((2, 8)), rng.standard_normal((5, 2))
    mask = (rng.random((3, 8)) > 0.5).astype(np.float64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = k.forward(x, W, A, B, 0.5, dropout_mask=mask, dropout_p=0.5)
    np.testing.assert_allclose(got, lora.forward(x, W, A, B, 0.5, dropout_mask=mask, dropout_p=0.5), rtol=1e-12)
    for w in seen:
        print("WARNING", w.message)
    print("OK")
""")


def _numba_run(cache_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    return subprocess.run(
        [sys.executable, "-c", NUMBA_SCRIPT], capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300
    )


def test_a_damaged_numba_cache_is_recompiled_never_a_kernel_failure(tmp_path):
    pytest.importorskip("numba")
    first = _numba_run(tmp_path)
    assert first.returncode == 0 and "OK" in first.stdout, first.stderr
    index = sorted(tmp_path.rglob("*.nbi"))
    data = sorted(tmp_path.rglob("*.nbc"))
    assert index and data, "the kernel was not cached under NUMBA_CACHE_DIR"
    for damage, files in (("truncated index", index), ("garbled data", data)):
        for f in files:
            raw = f.read_bytes()
            f.write_bytes(raw[:20] if damage == "truncated index" else raw[:40] + b"\x00garbage" * 8)
        p = _numba_run(tmp_path)
        print(f"{damage}: {p.stdout.strip()[-300:]}")
        assert p.returncode == 0 and "OK" in p.stdout, (damage, p.stderr[-2000:])
        assert "numba cache problem" in p.stdout and "recompiled" in p.stdout and str(tmp_path) in p.stdout, damage
    clean = _numba_run(tmp_path)  # the cache was rewritten: no warning any more
    assert clean.returncode == 0 and "WARNING" not in clean.stdout, clean.stdout


# ---------------------------------------------------------------------------- 8. overflow


BIG = 1e200


def _overflowing_calls() -> dict:
    x, W = np.full((2, 3), BIG), np.full((4, 3), BIG)
    A, B, m = np.ones((2, 3)), np.ones((4, 2)), np.ones(4)
    huge = [np.full(3, 1e308), np.full(3, 1e308)]
    return {
        "lora.forward": lambda: lora.forward(x, W, A, B, 1.0),
        "lora.delta": lambda: lora.delta(np.full((2, 3), BIG), np.full((4, 2), BIG), 1.0),
        "lora.merge": lambda: lora.merge(np.full((4, 3), BIG), A, np.full((4, 2), BIG), BIG),
        "dora.merge": lambda: dora.merge(np.full((4, 3), BIG), A, np.full((4, 2), BIG), m, BIG),
        "dora.forward": lambda: dora.forward(x, W, A, B, m, 1.0),
        "merging.linear": lambda: merging.linear(huge, [1.0, 1.0], normalize=False),
        "merging.task_arithmetic": lambda: merging.task_arithmetic(huge, [1.0, 1.0]),
        "merging.ties": lambda: merging.ties(huge, density=1.0, weights=[1.0, 1.0]),
        "precision.matmul_error_bound": lambda: precision.matmul_error_bound(x, W.T, "float32"),
    }


@pytest.mark.parametrize("op", list(_overflowing_calls()))
def test_finite_inputs_that_overflow_raise_a_value_error_naming_the_op(op):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NumPy RuntimeWarning on the way either
        with pytest.raises(ValueError, match=rf"^{op}: the inputs are finite but the result"):
            _overflowing_calls()[op]()


def test_a_requested_storage_dtype_rounds_overflow_like_round_to():
    """``dtype=`` of a merge is a cast: beyond the format's largest finite value it gives ±inf (NaN for
    float8_e4m3fn), the value a conforming kernel produces too (spec/conventions.md §5)."""
    W, A, B = np.full((4, 3), 6e4), np.ones((2, 3)), np.ones((4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = lora.merge(W, A, B, 1e4, dtype="float16")
        assert np.isposinf(merged).all()
        np.testing.assert_array_equal(merged, precision.round_to(W + 1e4 * (B @ A), "float16"))
        assert np.isnan(lora.merge(W * 0, A, B * 3, 128.0, dtype="float8_e4m3fn")).all()  # 768 > 448


def test_results_in_range_are_unchanged_by_the_overflow_check():
    x, W = np.full((2, 3), 1e150), np.full((4, 3), 1e150)
    A, B = np.ones((2, 3)), np.ones((4, 2))
    y = lora.forward(x, W, A, B, 1.0)
    assert np.isfinite(y).all() and y[0, 0] == pytest.approx(3e300 + 3e150)
