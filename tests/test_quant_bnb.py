"""Byte-exact differential tests of refimpl.quant against bitsandbytes 0.50.2 on CPU (spec/nf4.md §12).

The matrix: nf4/fp4 × float32/float16/bfloat16 × blocksizes 32, 64, 128, 256, 4096 × double quant
off/on × shapes with tail blocks, odd lengths, 1-D and 2-D × normal, uniform, heavy-tailed data and
values within 3 ulp of every threshold. Compared bit for bit: packed codes, the whole serialized state
(absmax or its 8-bit codes, nested absmax, offset, code maps, JSON) and the dequantized output.

bitsandbytes dequantizes on one of three CPU paths chosen by the host's instruction set, the last
dimension and the blocksize (refimpl/conformance/peers/bnb_paths.py). Where it takes the C++ scalar loop
or the torch fallback for an odd last dimension, its output must equal refimpl's profile; where it takes
the AVX-512 kernel (or the AVX-512 blocksize >= 2048 fallback), it must equal the known divergence's model
bit for bit. Each test prints the paths it exercised; on a host without AVX-512 it says so.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from refimpl import quant
from refimpl.conformance.peers import bnb_paths
from refimpl.quant import codebooks
from tests._peers import PathTally, bnb_dequantize_expected, require

pytestmark = pytest.mark.peers

DTYPES = ("float32", "float16", "bfloat16")
BLOCKSIZES = (32, 64, 128, 256, 4096)
SHAPES = ((7,), (12345,), (33, 129), (1000, 77), (385, 1024))
# run for every (dtype, blocksize, nested) on top of SHAPES: (130, 200) takes the C++ scalar loop on every host
# (200 % 16 != 0); (96, 80) the AVX-512 kernel where the host has it (rows of 80 are not whole blocks)
PATH_SHAPES = ((130, 200), (96, 80))
KINDS = ("normal", "uniform", "heavy", "near_threshold")
_NP = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_UINT = {2: np.uint16, 4: np.uint32}


def _torch_dtype(torch, name):
    return getattr(torch, name)


def to_torch(torch, x: np.ndarray):
    if x.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.detach().numpy()


def near_threshold(shape, quant_type: str, dtype: str, blocksize: int, rng: np.random.Generator) -> np.ndarray:
    """Blocks whose first element is the block's absmax a and whose other elements are t·a rounded to
    ``dtype`` and then moved 0..3 ulps (of ``dtype``) either way, t a random threshold of ``quant_type``.
    Half the blocks have a power-of-two a, where exact ties s == t occur."""
    n = int(np.prod(shape))
    dt = _NP[dtype]
    t = codebooks.midpoints(quant_type).astype(np.float64)
    nblocks = -(-n // blocksize)
    a = rng.uniform(0.5, 8.0, nblocks)
    a = np.where(rng.random(nblocks) < 0.5, 2.0 ** rng.integers(-3, 4, nblocks), a)
    a = a.astype(dt).astype(np.float64)
    scale = np.repeat(a, blocksize)[:n]
    target = t[rng.integers(0, t.size, n)] * scale
    x = target.astype(dt)
    k = rng.integers(-3, 4, n)
    bits = x.view(_UINT[dt.itemsize]).astype(np.int64)
    nonzero = target != 0
    bits = np.where(nonzero, np.maximum(bits + k, 0), np.abs(k))
    x = bits.astype(_UINT[dt.itemsize]).view(dt)
    x = np.where(nonzero | (rng.random(n) < 0.5), x, -x).astype(dt)
    x[::blocksize] = a.astype(dt)
    return x.reshape(shape)


def make_data(kind: str, shape, quant_type: str, dtype: str, blocksize: int, rng) -> np.ndarray:
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "uniform":
        x = rng.uniform(-1.0, 1.0, shape)
    elif kind == "heavy":
        x = rng.standard_normal(shape) * np.exp(2.0 * rng.standard_normal(shape))
    else:
        return near_threshold(shape, quant_type, dtype, blocksize, rng)
    return x.astype(np.float32).astype(_NP[dtype])


def _bits_equal(a: np.ndarray, b: np.ndarray) -> int:
    """Number of differing elements, comparing raw bytes element by element."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.shape != b.shape or a.dtype.itemsize != b.dtype.itemsize:
        return max(a.size, b.size)
    u = _UINT.get(a.dtype.itemsize, np.uint8)
    return int((a.view(u) != b.view(u)).sum())


@pytest.fixture(scope="module")
def bnb():
    torch = require("torch")
    bnb_functional = require("bitsandbytes.functional")
    import bitsandbytes

    if tuple(int(p) for p in bitsandbytes.__version__.split(".")[:2]) < (0, 50):
        pytest.fail(
            f"bitsandbytes >= 0.50 required (PR #1960 changed the CPU quantizer), got {bitsandbytes.__version__}"
        )
    # bitsandbytes' torch dequantization path is wrapped in torch.compile; eager runs the same float32
    # products and avoids recompiling for every shape.
    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield torch, bnb_functional
    torch._dynamo.config.disable = previous


def compare_one(
    torch, F, x: np.ndarray, quant_type: str, blocksize: int, nested: bool, tally: PathTally | None = None
) -> dict[str, int]:
    xt = to_torch(torch, x)
    packed_t, state_t = F.quantize_4bit(xt, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    packed, state = quant.quantize_4bit(
        x, blocksize, quant_type, nested, profile="bitsandbytes-cpu", threads=torch.get_num_threads()
    )
    theirs = {k: to_numpy(v) for k, v in state_t.as_dict(packed=True).items()}
    ours = state.to_bnb_dict()
    assert theirs.keys() == ours.keys()
    out = {"codes": _bits_equal(to_numpy(packed_t), packed)}
    for key in theirs:
        out["state:" + key.split(".")[-1]] = _bits_equal(theirs[key], ours[key])
    deq_t = to_numpy(F.dequantize_4bit(packed_t, state_t)).reshape(x.shape)  # (1, n) quirk: #2047
    ours = quant.dequantize_4bit(packed, state)
    expected, path = bnb_dequantize_expected(packed, state, ours)
    out["dequantized"] = _bits_equal(deq_t, expected)
    if tally is not None:
        tally.add(path, _bits_equal(deq_t, ours) > 0)
    return out


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_byte_exact_matrix_against_bitsandbytes_cpu(bnb, quant_type):
    torch, F = bnb
    rng = np.random.default_rng(2026 if quant_type == "nf4" else 4096)
    elements = 0
    mismatches: dict[str, int] = {}
    failures = []
    combo = tensors = 0
    tally = PathTally()
    for dtype in DTYPES:
        for blocksize in BLOCKSIZES:
            for nested in (False, True):
                # every data kind on a rotating shape, then every path-selecting shape on a rotating kind
                cases = [(kind, SHAPES[(combo + j) % len(SHAPES)]) for j, kind in enumerate(KINDS)]
                cases += [(KINDS[(combo + i) % len(KINDS)], shape) for i, shape in enumerate(PATH_SHAPES)]
                for kind, shape in cases:
                    x = make_data(kind, shape, quant_type, dtype, blocksize, rng)
                    result = compare_one(torch, F, x, quant_type, blocksize, nested, tally)
                    elements += x.size
                    tensors += 1
                    for key, count in result.items():
                        mismatches[key] = mismatches.get(key, 0) + count
                        if count and len(failures) < 5:
                            failures.append((dtype, blocksize, nested, kind, shape, key, count))
                combo += 1
    print(
        f"\n[{quant_type}] bitsandbytes-cpu byte-exact matrix: {elements} elements in {tensors} "
        f"tensors; mismatches: " + ", ".join(f"{k}={v}" for k, v in sorted(mismatches.items()))
    )
    print(tally.line())
    assert elements >= 10_000_000
    assert bnb_paths.SCALAR in tally.cases  # the profile's own rules are checked on every host
    assert sum(mismatches.values()) == 0, f"first mismatches (dtype, bs, nested, kind, shape, item, count): {failures}"


def test_special_values_match_bitsandbytes_cpu(bnb):
    """Each CPU row of the special-value table (spec/nf4.md §9), against bitsandbytes itself."""
    torch, F = bnb
    rows = {
        "all_zero_with_zero_tail": np.zeros(64 * 3 + 5, np.float32),
        "nan_in_block": np.concatenate([np.full(64, 0.5), [np.nan], np.ones(63)]).astype(np.float32),
        "inf_in_block": np.concatenate([[np.inf, -np.inf], np.linspace(-1, 1, 126)]).astype(np.float32),
        "subnormal_block": np.full(64, 1e-40, np.float32),
        "tiny_fp4_values": np.concatenate([[1.0], np.linspace(-1 / 300, 1 / 300, 63)]).astype(np.float32),
    }
    rows["nan_in_tail"] = np.concatenate([np.full(64, 0.5), [0.25, np.nan], np.ones(42)]).astype(np.float32)
    tally = PathTally()
    for name, x in rows.items():
        for shape in (x.shape, (2, x.size // 2), (x.size // 16, 16)):  # 1-D, then rows of x.size / 2 and 16
            if int(np.prod(shape)) != x.size:
                continue
            for dtype in DTYPES:
                with np.errstate(over="ignore"):
                    xd = x.astype(_NP[dtype]).reshape(shape)
                for quant_type in ("nf4", "fp4"):
                    for nested in (False, True):
                        result = compare_one(torch, F, xd, quant_type, 64, nested, tally)
                        assert sum(result.values()) == 0, (name, shape, dtype, quant_type, nested, result)
    print("\n" + tally.line())


def test_blockwise_8bit_cpu_lookup_rule_matches_bitsandbytes(bnb):
    """The 65,536-bin CPU lookup table (not nearest) on a dense grid and random data."""
    torch, F = bnb
    rng = np.random.default_rng(8)
    grid = np.linspace(-1, 1, 1 << 20, dtype=np.float32)
    data = np.concatenate(
        [grid, rng.standard_normal(1 << 18).astype(np.float32) * 1e-3, rng.uniform(-1, 1, 1 << 18).astype(np.float32)]
    )
    data[::256] = 1.0  # absmax 1 per block: v equals the grid value
    codes_t, state_t = F.quantize_blockwise(torch.from_numpy(data), blocksize=256)
    codes, absmax = quant.quantize_blockwise_8bit(data, 256, profile="bitsandbytes-cpu")
    ref_codes, _ = quant.quantize_blockwise_8bit(data, 256, profile="reference")
    n_code = int((codes_t.numpy() != codes).sum())
    n_nearest = int((ref_codes != codes).sum())
    print(
        f"\n8-bit CPU LUT rule: {data.size} codes, {n_code} mismatches vs bitsandbytes; the nearest-code "
        f"reference differs from bitsandbytes in {n_nearest} ({n_nearest / data.size:.3%})"
    )
    assert n_code == 0
    assert _bits_equal(state_t.absmax.numpy(), absmax) == 0
    deq = quant.dequantize_blockwise_8bit(codes, absmax, 256)
    assert _bits_equal(F.dequantize_blockwise(codes_t, state_t).numpy(), deq) == 0


def test_codebooks_equal_bitsandbytes_tables(bnb):
    _torch, F = bnb
    for name in ("nf4", "fp4"):
        assert _bits_equal(F.get_4bit_type(name, device="cpu").numpy(), quant.codebook(name)) == 0
    assert _bits_equal(F.create_dynamic_map().numpy(), quant.codebook("dynamic8")) == 0


def test_quant_state_dict_round_trips_through_bitsandbytes(bnb):
    """Our serialized state loads in bitsandbytes and dequantizes identically; theirs loads here."""
    torch, F = bnb
    rng = np.random.default_rng(5)
    x = rng.standard_normal((96, 80)).astype(ml_dtypes.bfloat16)
    for nested in (False, True):
        packed, state = quant.quantize_4bit(x, 64, "nf4", nested, profile="bitsandbytes-cpu")
        as_torch = {k: torch.from_numpy(v) for k, v in state.to_bnb_dict().items()}
        state_t = F.QuantState.from_dict(as_torch, device="cpu")
        deq_t = to_numpy(F.dequantize_4bit(torch.from_numpy(packed), state_t))
        expected, path = bnb_dequantize_expected(packed, state)  # (96, 80): rows are not whole blocks
        print(f"\nnested={nested}: bitsandbytes took the {bnb_paths.LABELS[path]} path")
        assert _bits_equal(deq_t.reshape(x.shape), expected) == 0
        back = quant.QuantState.from_bnb_dict(
            {"weight." + k: to_numpy(v) for k, v in state_t.as_dict(packed=True).items()}
        )
        assert _bits_equal(quant.dequantize_4bit(packed, back), quant.dequantize_4bit(packed, state)) == 0
