"""Compare bitsandbytes' 4-bit (NF4/FP4) and 8-bit blockwise quantization on a device with refimpl.

Run on an NVIDIA GPU with bitsandbytes 0.50.2 (CUDA build):

    PYTHONPATH=. python bench/bnb_cuda_compare.py --out "$OUT"

or on CPU, to check this script itself (bitsandbytes CPU must then match the bitsandbytes-cpu profile):

    PYTHONPATH=. python bench/bnb_cuda_compare.py --device cpu --size 4099 --out /tmp/out

For every (quant type, dtype, blocksize, double quant, data kind) it quantizes with bitsandbytes on the
device, then for each refimpl profile (bitsandbytes-cuda, reference, bitsandbytes-cpu) counts:
nibbles that differ, and their classes from refimpl.quant.check_4bit (admissible, zero-sign, special,
wrong); block scales that differ (dequantized absmax, bitwise); for nested states the offset's ulp
distance, the 8-bit code and nested-absmax mismatches; and the dequantized bits of bitsandbytes' own
codes through refimpl's dequantizer (mismatches, and how many of them are only the sign of zero).
It also compares 8-bit blockwise quantization (the nested statistics' quantizer) on its own.
Prints a table and writes bnb_compare-<device>.json into --out (default $OUT or ./out).
Needs only numpy, ml_dtypes, torch, bitsandbytes and refimpl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import ml_dtypes
import numpy as np

from refimpl import quant
from refimpl.quant import codebooks

PROFILES = ("bitsandbytes-cuda", "reference", "bitsandbytes-cpu")
DTYPES = ("float32", "float16", "bfloat16")
BLOCKSIZES = (32, 64, 128, 256, 4096)
KINDS = ("normal", "uniform", "heavy", "near_threshold", "special")
_NP = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


# ------------------------------------------------------------------------------------------------ data


def near_threshold(n: int, quant_type: str, dtype: str, bs: int, rng: np.random.Generator) -> np.ndarray:
    """Per block: element 0 is the absmax a; the others are t·a moved 0..3 ulps of ``dtype`` either way,
    t a CPU float32 midpoint or (FP4) a CUDA literal threshold; half the blocks have a power-of-two a."""
    dt = _NP[dtype]
    t = codebooks.midpoints(quant_type).astype(np.float64)
    if quant_type == "fp4":
        lit = np.array(codebooks.FP4_CUDA_THRESHOLDS, dtype=np.float32).astype(np.float64)
        t = np.concatenate([t, lit, -lit])
    t = t[t != 0]
    nblocks = -(-n // bs)
    a = rng.uniform(0.5, 8.0, nblocks)
    a = np.where(rng.random(nblocks) < 0.5, 2.0 ** rng.integers(-3, 4, nblocks), a).astype(dt).astype(np.float64)
    x = (t[rng.integers(0, t.size, n)] * np.repeat(a, bs)[:n]).astype(dt)
    bits = x.view(_UINT[dt.itemsize]).astype(np.int64) + rng.integers(-3, 4, n)
    x = bits.astype(_UINT[dt.itemsize]).view(dt).copy()
    x[::bs] = a.astype(dt)
    return x


def special(n: int, quant_type: str, dtype: str, bs: int, rng: np.random.Generator) -> np.ndarray:
    """Blocks cycling through: all zero, one NaN, ±inf, all subnormal (float32), FP4-tiny values, normal."""
    dt = _NP[dtype]
    x = rng.standard_normal(n)
    nblocks = -(-n // bs)
    for b in range(nblocks):
        lo, hi = b * bs, min(n, (b + 1) * bs)
        kind = b % 6
        if kind == 0:
            x[lo:hi] = 0.0
        elif kind == 1:
            x[lo] = np.nan
        elif kind == 2:
            x[lo] = np.inf
            if hi - lo > 1:
                x[lo + 1] = -np.inf
        elif kind == 3:
            x[lo:hi] = 1e-40 if dtype == "float32" else 1e-7
        elif kind == 4:
            x[lo:hi] = rng.uniform(-1 / 300, 1 / 300, hi - lo)
            x[lo] = 1.0
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(np.float32).astype(dt)


def make_data(kind: str, n: int, quant_type: str, dtype: str, bs: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32).astype(_NP[dtype])
    if kind == "uniform":
        return rng.uniform(-1, 1, n).astype(np.float32).astype(_NP[dtype])
    if kind == "heavy":
        return (rng.standard_normal(n) * np.exp(2 * rng.standard_normal(n))).astype(np.float32).astype(_NP[dtype])
    if kind == "near_threshold":
        return near_threshold(n, quant_type, dtype, bs, rng)
    return special(n, quant_type, dtype, bs, rng)


# ------------------------------------------------------------------------------------------------ torch glue


def to_torch(torch, x: np.ndarray, device: str):
    if x.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16).to(device)
    return torch.from_numpy(x.copy()).to(device)


def to_numpy(torch, t) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def bit_mismatch(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(elements whose bits differ, of which only the sign of zero differs); NaN equals NaN."""
    a, b = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    if a.size != b.size:
        return max(a.size, b.size), 0
    u = _UINT[a.dtype.itemsize]
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    differ = (a.view(u) != b.view(u)) & ~(np.isnan(fa) & np.isnan(fb))
    zero_sign = differ & (fa == 0) & (fb == 0)
    return int(differ.sum()), int(zero_sign.sum())


def ulp_distance32(a: float, b: float) -> int | None:
    fa, fb = np.float32(a), np.float32(b)
    if np.isnan(fa) and np.isnan(fb):
        return 0
    if not (np.isfinite(fa) and np.isfinite(fb)):
        return None if fa != fb else 0

    def ordered(v):
        i = int(np.array(v, np.float32).view(np.int32))
        return i if i >= 0 else -(i & 0x7FFFFFFF)

    return abs(ordered(fa) - ordered(fb))


# ------------------------------------------------------------------------------------------------ comparisons


def compare_4bit(torch, F, x, quant_type, dtype, bs, nested, device, threads) -> dict:
    xt = to_torch(torch, x, device)
    packed_t, state_t = F.quantize_4bit(xt, blocksize=bs, compress_statistics=nested, quant_type=quant_type)
    deq_t = to_numpy(torch, F.dequantize_4bit(packed_t, state_t)).reshape(x.shape)
    if device != "cpu":
        torch.cuda.synchronize()
    packed = to_numpy(torch, packed_t)
    theirs = {
        k: to_numpy(torch, v) if isinstance(v, torch.Tensor) else v for k, v in state_t.as_dict(packed=True).items()
    }
    row: dict = {"quant_type": quant_type, "dtype": dtype, "blocksize": bs, "nested": nested, "n": int(x.size)}
    for profile in PROFILES:
        state = quant.QuantState.from_bnb_dict(dict(theirs), profile=profile, nonfinite="propagate")
        if nested:  # the JSON offset loses a NaN's payload; take the live tensor's bits
            state = dataclasses.replace(state, offset=to_numpy(torch, state_t.offset).reshape(()))
        ref_packed, ref_state = quant.quantize_4bit(
            x, bs, quant_type, nested, profile=profile, nonfinite="propagate", threads=threads
        )
        rep = quant.check_4bit(packed, state, x, profile=profile, threads=threads)
        deq_bits, deq_zero = bit_mismatch(deq_t, quant.dequantize_4bit(packed, state, profile=profile))
        entry = {
            "nibbles_differ": rep.n_elements - rep.n_equal,
            "admissible": rep.n_admissible,
            "zero_sign": rep.n_zero_sign,
            "special": rep.n_special,
            "wrong": rep.n_wrong,
            "first_wrong_index": rep.first_wrong_index,
            "first_wrong": list(rep.first_wrong) if rep.first_wrong else None,
            "block_scales_differ": rep.n_absmax_mismatch,
            "dequantized_bits_differ": deq_bits,
            "dequantized_zero_sign_only": deq_zero,
            "packed_bytes_differ": int((packed.reshape(-1) != ref_packed.reshape(-1)).sum()),
        }
        if nested:
            entry["offset_ulps"] = ulp_distance32(float(state.offset), float(ref_state.offset))
            entry["nested_codes_differ"] = int((state.absmax != ref_state.absmax).sum())
            entry["nested_absmax_differ"] = bit_mismatch(state.nested_absmax, ref_state.nested_absmax)[0]
        else:
            entry["absmax_differ"] = bit_mismatch(state.absmax, ref_state.absmax)[0]
        row[profile] = entry
    return row


def compare_8bit(torch, F, x, device) -> dict:
    codes_t, state_t = F.quantize_blockwise(to_torch(torch, x, device), blocksize=256)
    codes, absmax = to_numpy(torch, codes_t), to_numpy(torch, state_t.absmax)
    row = {"n": int(x.size)}
    for profile in PROFILES:
        q, a = quant.quantize_blockwise_8bit(x, 256, profile=profile, nonfinite="propagate")
        where = np.flatnonzero(q.reshape(-1) != codes.reshape(-1))
        row[profile] = {
            "codes_differ": int(where.size),
            "absmax_differ": bit_mismatch(a, absmax)[0],
            "first_differ": [
                {
                    "index": int(i),
                    "x": float(x.reshape(-1)[i]),
                    "absmax": float(absmax.reshape(-1)[i // 256]),
                    "bnb": int(codes.reshape(-1)[i]),
                    "refimpl": int(q.reshape(-1)[i]),
                }
                for i in where[:5]
            ],
        }
    return row


# ------------------------------------------------------------------------------------------------ reciprocal

_RCP_SOURCE = r"""
extern "C" __global__ void rcp_ptx(const unsigned int expo, unsigned int* out, const unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = __uint_as_float((expo << 23) | i), r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    out[i] = __float_as_uint(r);
}
extern "C" __global__ void rcp_div(const unsigned int expo, unsigned int* out, const unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = __float_as_uint(1.0f / __uint_as_float((expo << 23) | i));  // --use_fast_math, as bitsandbytes
}
"""


def measure_rcp_approx(table_path: str) -> dict:
    """Measure the GPU's rcp.approx.ftz.f32 on every float32 significand and write refimpl's table.

    For each of the 2^23 significands m (x = 1.m in [1, 2)) it records d(m) = bits(rcp(x)) − bits(RN(1/x))
    and checks that the result depends on the significand only (binades 2^-27, 2^0, 2^23 and 2^100) and that
    `1.0f / x` under --use_fast_math (bitsandbytes' build flag) gives the same bits as the PTX instruction.
    Writes ``table_path`` (npz: ``delta2``, the d(m) packed four per byte, 2 bits each: 0 → 0, 1 → +1, 3 → −1).
    """
    import cupy as cp

    n = 1 << 23
    mod = cp.RawModule(code=_RCP_SOURCE, options=("--use_fast_math",))
    out = cp.empty(n, dtype=cp.uint32)
    results = {}
    for name in ("rcp_ptx", "rcp_div"):
        for expo in (100, 127, 150, 227):
            mod.get_function(name)(((n + 255) // 256,), (256,), (cp.uint32(expo), out, cp.uint32(n)))
            results[name, expo] = cp.asnumpy(out).astype(np.int64)
    m = np.arange(n, dtype=np.uint32)
    x = ((np.uint32(127) << 23) | m).view(np.float32)
    ieee = (np.float32(1) / x).view(np.uint32).astype(np.int64)
    got = results["rcp_ptx", 127]
    delta = got - ieee
    same_binades = all(
        np.array_equal(results[name, e] + ((e - 127) << 23), got)
        for name in ("rcp_ptx", "rcp_div")
        for e in (100, 127, 150)
    )
    div_equals_ptx = all(np.array_equal(results["rcp_div", e], results["rcp_ptx", e]) for e in (100, 127, 150, 227))
    # 2^100 has results near 2^-101 (normal) as well; 2^227 = e 227: results 2^-100, still normal.
    same_227 = np.array_equal(results["rcp_ptx", 227] + (100 << 23), got)
    if np.abs(delta).max() > 1:
        raise RuntimeError(f"rcp.approx differs from RN(1/x) by {np.abs(delta).max()} ulps")
    two = np.where(delta < 0, 3, delta).astype(np.uint8).reshape(-1, 4)
    packed = (two[:, 0] | (two[:, 1] << 2) | (two[:, 2] << 4) | (two[:, 3] << 6)).astype(np.uint8)
    os.makedirs(os.path.dirname(table_path) or ".", exist_ok=True)
    np.savez_compressed(table_path, delta2=packed)
    import torch

    return {
        "significands": n,
        "plus_one_ulp": int((delta == 1).sum()),
        "minus_one_ulp": int((delta == -1).sum()),
        "equal_to_rn": int((delta == 0).sum()),
        "depends_on_significand_only": bool(same_binades and same_227),
        "fast_math_division_equals_rcp_approx_ftz": bool(div_equals_ptx),
        "device_name": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "table": os.path.basename(table_path),
    }


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--out", default=os.environ.get("OUT") or "out", help="output directory")
    ap.add_argument("--size", type=int, default=16384 + 37, help="elements per case (default 16421)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocksizes", default=",".join(map(str, BLOCKSIZES)))
    ap.add_argument(
        "--measure-rcp",
        metavar="NPZ",
        default=None,
        help="first measure the GPU's rcp.approx.ftz.f32 into this table (CuPy), e.g. "
        "refimpl/quant/rcp_approx_ftz_sm90.npz; the comparison then uses it",
    )
    args = ap.parse_args(argv)

    # bitsandbytes' torch dequantization path (CPU) is wrapped in torch.compile; eager runs the same
    # float32 products without recompiling per shape.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import bitsandbytes
    import bitsandbytes.functional as F
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu to check the script", file=sys.stderr)
        return 2
    rcp_measured = None
    if args.measure_rcp:
        rcp_measured = measure_rcp_approx(args.measure_rcp)
        print("rcp.approx.ftz.f32 measured:", rcp_measured)
    from refimpl.quant import cuda_rcp

    rcp_table = cuda_rcp.table_info()
    print("refimpl bitsandbytes-cuda reciprocal:", rcp_table)
    threads = torch.get_num_threads()
    rng = np.random.default_rng(args.seed)
    blocksizes = tuple(int(b) for b in args.blocksizes.split(","))
    t0 = time.perf_counter()
    rows = []
    for quant_type in ("nf4", "fp4"):
        for dtype in DTYPES:
            for bs in blocksizes:
                for nested in (False, True):
                    for kind in KINDS:
                        x = make_data(kind, args.size, quant_type, dtype, bs, rng)
                        row = compare_4bit(torch, F, x, quant_type, dtype, bs, nested, args.device, threads)
                        row["kind"] = kind
                        rows.append(row)
    rows8 = []
    for kind in ("normal", "uniform", "heavy", "small"):
        for dtype in DTYPES:
            n = args.size
            x = {
                "normal": rng.standard_normal(n),
                "uniform": rng.uniform(-1, 1, n),
                "heavy": rng.standard_normal(n) * np.exp(2 * rng.standard_normal(n)),
                "small": rng.standard_normal(n) * 1e-3,
            }[kind]
            x = x.astype(np.float32)
            x[::256] = np.abs(x[::256]) + 1e-3 * (kind == "small")  # some blocks with ties near ±a
            row = compare_8bit(torch, F, x.astype(_NP[dtype]), args.device)
            row.update(kind=kind, dtype=dtype)
            rows8.append(row)
    elapsed = time.perf_counter() - t0

    # ---- summary: per quant type and profile, totals of each class
    summary = {}
    for quant_type in ("nf4", "fp4"):
        for profile in PROFILES:
            sel = [r for r in rows if r["quant_type"] == quant_type]
            keys = (
                "nibbles_differ",
                "admissible",
                "zero_sign",
                "special",
                "wrong",
                "block_scales_differ",
                "dequantized_bits_differ",
                "dequantized_zero_sign_only",
                "packed_bytes_differ",
                "nested_codes_differ",
                "nested_absmax_differ",
                "absmax_differ",
            )
            tot = {k: sum(r[profile].get(k, 0) or 0 for r in sel) for k in keys}
            offs = [r[profile]["offset_ulps"] for r in sel if r["nested"]]
            tot["offset_max_ulps"] = max((o for o in offs if o is not None), default=0)
            tot["offset_cases_differ"] = sum(1 for o in offs if o != 0)
            tot["elements"] = sum(r["n"] for r in sel)
            summary[f"{quant_type}/{profile}"] = tot
    for profile in PROFILES:
        summary[f"8bit/{profile}"] = {
            "codes_differ": sum(r[profile]["codes_differ"] for r in rows8),
            "absmax_differ": sum(r[profile]["absmax_differ"] for r in rows8),
            "elements": sum(r["n"] for r in rows8),
        }

    cols = (
        "elements",
        "nibbles_differ",
        "admissible",
        "zero_sign",
        "special",
        "wrong",
        "block_scales_differ",
        "dequantized_bits_differ",
        "dequantized_zero_sign_only",
        "offset_cases_differ",
        "offset_max_ulps",
        "nested_codes_differ",
    )
    print(
        f"bitsandbytes {bitsandbytes.__version__} on {args.device} vs refimpl; {len(rows)} 4-bit cases, "
        f"{len(rows8)} 8-bit cases, {elapsed:.1f} s"
    )
    print("| quant/profile | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for key, tot in summary.items():
        if key.startswith("8bit"):
            continue
        print(f"| {key} | " + " | ".join(str(tot[c]) for c in cols) + " |")
    print("\n| 8-bit blockwise (bs 256) | elements | codes differ | absmax differ |\n|---|---|---|---|")
    for profile in PROFILES:
        t = summary[f"8bit/{profile}"]
        print(f"| {profile} | {t['elements']} | {t['codes_differ']} | {t['absmax_differ']} |")
    # per-kind breakdown of the CUDA profile, where the classes live
    print("\nbitsandbytes-cuda profile, by data kind (nibbles differ / admissible / zero-sign / special / wrong):")
    for quant_type in ("nf4", "fp4"):
        for kind in KINDS:
            sel = [r["bitsandbytes-cuda"] for r in rows if r["quant_type"] == quant_type and r["kind"] == kind]
            print(
                f"  {quant_type} {kind:15s} "
                + " / ".join(
                    str(sum(e[k] for e in sel))
                    for k in ("nibbles_differ", "admissible", "zero_sign", "special", "wrong")
                )
            )

    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor()
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "versions": {
            "bitsandbytes": bitsandbytes.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "device": args.device,
            "device_name": device_name,
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
        },
        "reciprocal": {"measured": rcp_measured, "refimpl_table": rcp_table},
        "size_per_case": args.size,
        "seed": args.seed,
        "elapsed_s": elapsed,
        "summary": summary,
        "cases_4bit": rows,
        "cases_8bit": rows8,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bnb_compare-{args.device.split(':')[0]}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
