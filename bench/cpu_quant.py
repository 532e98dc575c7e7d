"""NF4/FP4 quantize, dequantize and the fused GEMV on the CPU: numba vs the NumPy reference vs bitsandbytes CPU,
each beside the physical limit.

One process, the same data for every implementation (4096 x 4096 = 16.8M elements, blocksize 64),
medians after one warm-up call, timed round-robin; the outputs are checked byte for byte against bitsandbytes.
The limit is this process's copy bandwidth (``cpu_common.copy_bandwidth``: a NumPy copy of 128 MB float32,
read + write bytes per second, best of 7, measured before and after the kernels); each row gives the bytes
the kernel must move (what it reads and writes: input, packed nibbles, absmax and nested codes, output), its
GB/s and that as a share of the copy bandwidth (median time; best_share_of_copy: numba's best time, like
the copy's best of 7), and which bitsandbytes CPU path ran
(``refimpl.conformance.peers.bnb_paths``). numba's dequantize is timed writing into an existing array
(``out=``, as the copy does: numba_Melem_s, GB_s, share) and allocating its output (numba_alloc_Melem_s), whose
first-touch page faults cost about as much as the decoding; bitsandbytes 0.50.2 has no CPU kernel for
``dequantize_4bit.out``, so its side always allocates, and x_vs_bnb compares the two allocating calls.
Run: flock /tmp/bench.lock python bench/cpu_quant.py [--repeats 5] [--size 4096] [--note "..."] [--name quant]
[--bnb-scalar]. Writes bench/results/cpu-<name>.json (default cpu-quant.json).

The paths a host without AVX-512 takes can be forced on an AVX-512 host (bench/README.md, issue 21):
``NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx2,+fma,+f16c`` makes numba compile for an AVX2 CPU (its
AVX-512 kernels off; NUMBA_CPU_NAME alone keeps the host's features, AVX-512 included);
``ATEN_CPU_CAPABILITY=avx2`` makes torch (bitsandbytes' quantize path) use its AVX2 kernels; and
``--bnb-scalar`` hands bitsandbytes' dequantize the state with its shape given as (n / 8, 8): bitsandbytes
0.50.2 sends an even last dimension that is not a multiple of 16 to its C++ scalar loop, the loop a host
without AVX-512 runs for every even shape (it blocks over the flattened tensor, so the work and the bytes
are the same). The C++ AVX-512 choice reads cpuid (a static in libbitsandbytes_cpu), which no environment
variable changes.
"""

# ruff: noqa: B023 - the timed closures run within the loop iteration that defines them
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpu_common as C
import torch
from bitsandbytes import functional as F

import refimpl.quant as ref
from refimpl.conformance.peers import bnb_paths
from refimpl.kernels.numba_cpu import _quant_kernels as K
from refimpl.kernels.numba_cpu import qlora as nql
from refimpl.kernels.numba_cpu import quant as nq

BS = 64
#: bitsandbytes 0.50.2 quantizes on CPU with its default backend (backends/default/ops.py, torch ops)
BNB_QUANTIZE_PATH = f"torch (default backend, {torch.backends.cpu.get_cpu_capability()})"
#: the last dimension --bnb-scalar gives bitsandbytes' dequantize: even, not a multiple of 16 (its C++ scalar loop)
SCALAR_LAST_DIM = 8


def numba_dequantize_path() -> str:
    """Which numba dequantize kernel runs (_quant_kernels.AVX512 / AVX2) and the target numba compiles for."""
    from numba import config

    kernel = "AVX-512 (16 lanes)" if K.AVX512 else "AVX2 (8 lanes)" if K.AVX2 else "scalar"
    return f"{kernel}; NUMBA_CPU_NAME={config.CPU_NAME}, NUMBA_CPU_FEATURES={config.CPU_FEATURES}"


def to_torch(x: np.ndarray) -> torch.Tensor:
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def to_numpy_bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def same_bytes(a: np.ndarray, b: np.ndarray) -> str:
    """ "yes", "zero sign only" (equal values, some ±0 differ: FP4 nibble 8 on bitsandbytes' AVX-512 and torch
    paths, bnb_paths), or "no"."""
    if a.reshape(-1).view(np.uint8).tobytes() == b.reshape(-1).view(np.uint8).tobytes():
        return "yes"
    fa, fb = (np.asarray(v).reshape(-1).astype(np.float32) for v in (a.view(a.dtype), b.view(a.dtype)))
    return "zero sign only" if np.array_equal(fa, fb, equal_nan=True) else "no"


def stats_bytes(n: int, nested: bool) -> int:
    """Bytes of the per-block statistics: float32 absmax, or uint8 codes + float32 per 256 blocks."""
    nb = -(-n // BS)
    return nb + 4 * -(-nb // 256) if nested else 4 * nb


def timed(fns: dict[str, Any], *, repeats: int) -> dict[str, float]:
    """Medians of each function's interleaved times, and numba's best time as "numba_best"."""
    times = C.interleaved_times(fns, repeats=repeats)
    out = {k: float(np.median(v)) for k, v in times.items()}
    out["numba_best"] = min(times["numba"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=4096, help="the tensor is size x size")
    ap.add_argument("--note", default="", help="recorded with the machine (e.g. that the host was shared)")
    ap.add_argument("--name", default="quant", help="writes bench/results/cpu-<name>.json")
    ap.add_argument(
        "--bnb-scalar",
        action="store_true",
        help=f"bitsandbytes dequantizes with the shape (n / {SCALAR_LAST_DIM}, {SCALAR_LAST_DIM}): its C++ scalar loop",
    )
    args = ap.parse_args()
    info = C.machine()
    info["note"] = args.note
    info["numba_dequantize"] = numba_dequantize_path()
    info["bnb_scalar_forced"] = args.bnb_scalar
    h = bnb_paths.host()
    info["bnb_host"] = {k: getattr(h, k) for k in ("avx512f", "avx512_bf16", "torch_capability", "cpp_bf16", "kernel")}
    copy_before = C.copy_bandwidth()
    rng = np.random.default_rng(0)
    base = rng.standard_normal((args.size, args.size), dtype=np.float32)
    n = base.size
    r = args.repeats
    rows: list[dict[str, Any]] = []
    timings: list[tuple[dict[str, Any], float]] = []  # (row, bytes moved): the limit columns are filled at the end

    def add(op: str, dname: str, qt: str, t: dict[str, float], moved: float, path: str, same: str) -> None:
        row = {
            "op": op,
            "dtype": dname,
            "quant_type": qt,
            "numba_s": t["numba"],
            "bnb_s": t["bnb"],
            "numpy_ref_s": t.get("ref"),
            "numba_Melem_s": n / t["numba"] / 1e6,
            "bnb_Melem_s": n / t["bnb"] / 1e6,
            "x_vs_bnb": t["bnb"] / t.get("numba_alloc", t["numba"]),  # both allocating their output
            "x_vs_ref": t["ref"] / t["numba"] if "ref" in t else None,
            "numba_alloc_Melem_s": n / t["numba_alloc"] / 1e6 if "numba_alloc" in t else None,
            "bnb_path": path,
            "bytes_identical": same,
        }
        row["numba_best_s"] = t["numba_best"]
        rows.append(row)
        timings.append((row, moved))

    bnb_shape = (base.size // SCALAR_LAST_DIM, SCALAR_LAST_DIM) if args.bnb_scalar else base.shape
    deq_path = bnb_paths.LABELS[bnb_paths.dequantize_path(bnb_shape, BS)]
    if args.bnb_scalar:
        deq_path += f" (forced: shape {bnb_shape})"

    def bnb_state(state: Any) -> Any:
        """The bitsandbytes state, with the shape --bnb-scalar asks for."""
        if not args.bnb_scalar:
            return state
        forced = copy.copy(state)
        forced.shape = torch.Size(bnb_shape)
        return forced

    for dtype in (np.float32, ml_dtypes.bfloat16, np.float16):
        x = base.astype(dtype)
        xt = to_torch(x)
        dname = np.dtype(dtype).name
        isz = x.dtype.itemsize
        for qt in ("nf4", "fp4"):
            t = timed(
                {
                    "numba": lambda: nq.quantize_4bit(x, BS, qt, profile="bitsandbytes-cpu"),
                    "bnb": lambda: F.quantize_4bit(xt, blocksize=BS, quant_type=qt),
                    "ref": lambda: ref.quantize_4bit(x, BS, qt, profile="bitsandbytes-cpu"),
                },
                repeats=r,
            )
            kp, ks = nq.quantize_4bit(x, BS, qt, profile="bitsandbytes-cpu")
            bp, bs = F.quantize_4bit(xt, blocksize=BS, quant_type=qt)
            same_q = "yes" if np.array_equal(kp, bp.numpy()) and np.array_equal(ks.absmax, bs.absmax.numpy()) else "no"
            add("quantize", dname, qt, t, n * isz + n / 2 + stats_bytes(n, False), BNB_QUANTIZE_PATH, same_q)

            ko = np.empty_like(x)  # numba dequantizes into an existing array: no page faults
            bs = bnb_state(bs)
            t = timed(
                {
                    "numba": lambda: nq.dequantize_4bit(kp, ks, out=ko),
                    "numba_alloc": lambda: nq.dequantize_4bit(kp, ks),
                    "bnb": lambda: F.dequantize_4bit(bp, bs),
                    "ref": lambda: ref.dequantize_4bit(kp, ks),
                },
                repeats=r,
            )
            kd = nq.dequantize_4bit(kp, ks)
            same_d = same_bytes(kd, to_numpy_bits(F.dequantize_4bit(bp, bs)).reshape(kd.shape).view(kd.dtype))
            add("dequantize", dname, qt, t, n / 2 + stats_bytes(n, False) + n * isz, deq_path, same_d)
            rows[-1]["equal_to_profile"] = same_bytes(kd, ref.dequantize_4bit(kp, ks))

    # nested statistics (double quantization), float32 NF4: the absmax is decoded from 8-bit codes first
    # the bitsandbytes-cpu offset is torch's CPU sum over torch's threads: the same count on both sides
    kp, ks = nq.quantize_4bit(base, BS, "nf4", True, profile="bitsandbytes-cpu", threads=torch.get_num_threads())
    bp, bs = F.quantize_4bit(torch.from_numpy(base), blocksize=BS, quant_type="nf4", compress_statistics=True)
    bs = bnb_state(bs)
    ko = np.empty_like(base)
    t = timed(
        {
            "numba": lambda: nq.dequantize_4bit(kp, ks, out=ko),
            "numba_alloc": lambda: nq.dequantize_4bit(kp, ks),
            "bnb": lambda: F.dequantize_4bit(bp, bs),
        },
        repeats=r,
    )
    kd = nq.dequantize_4bit(kp, ks)
    same_n = same_bytes(kd, to_numpy_bits(F.dequantize_4bit(bp, bs)).reshape(kd.shape))
    add("dequantize nested", "float32", "nf4", t, n / 2 + stats_bytes(n, True) + 4 * n, deq_path, same_n)

    # the fused GEMV y = x W^T (one token, W 4096 x 4096 NF4 bf16): bitsandbytes has no CPU gemv_4bit kernel
    # without AVX512-BF16, so its side is dequantize_4bit then torch's matmul
    w = base.astype(ml_dtypes.bfloat16)
    kp, ks = nq.quantize_4bit(w, BS, "nf4", profile="bitsandbytes-cpu")
    bp, bs = F.quantize_4bit(to_torch(w), blocksize=BS, quant_type="nf4")
    bs = bnb_state(bs)
    xv = rng.standard_normal((1, args.size), dtype=np.float32).astype(ml_dtypes.bfloat16)
    xvt = to_torch(xv)
    t = timed(
        {
            "numba": lambda: nql.dequant_matmul(xv, kp, ks),
            "bnb": lambda: xvt @ F.dequantize_4bit(bp, bs).reshape(w.shape).t(),
        },
        repeats=r,
    )
    moved = n / 2 + stats_bytes(n, False) + 2 * 2 * args.size
    add("fused GEMV (1 token)", "bfloat16", "nf4", t, moved, f"{deq_path} + torch matmul", "n/a (sum order)")

    copy_after = C.copy_bandwidth()
    copy_bps = max(copy_before, copy_after)
    for row, mv in timings:
        row.update(C.limit_columns(mv, row["numba_s"], copy_bps))
        row["bnb_share_of_copy"] = mv / row["bnb_s"] / copy_bps
        # best against best: the copy is a best of 7, so this is the like-for-like capacity on a shared host
        row["best_share_of_copy"] = mv / row["numba_best_s"] / copy_bps
    info["copy_GB_s"] = {"before": copy_before / 1e9, "after": copy_after / 1e9, "used": copy_bps / 1e9}

    targets = []
    for row in rows:
        name = f"{row['quant_type']} {row['op']} {row['dtype']}"
        if row["op"] == "quantize":
            targets.append({"name": f"{name} vs bitsandbytes", "measured": row["x_vs_bnb"], "target": 10})
            targets.append(
                {
                    "name": f"{name} share of copy (best time, like the copy)",
                    "measured": row["best_share_of_copy"],
                    "target": 0.4,
                    "unit": "share",
                }
            )
        elif row["op"].startswith("dequantize"):
            targets.append({"name": f"{name} vs bitsandbytes", "measured": row["x_vs_bnb"], "target": 2})
            targets.append(
                {
                    "name": f"{name} share of copy (best time, like the copy)",
                    "measured": row["best_share_of_copy"],
                    "target": 0.7,
                    "unit": "share",
                }
            )
    for tg in targets:
        tg["met"] = tg["measured"] >= tg["target"]
    cols = [
        "op",
        "dtype",
        "quant_type",
        "numba_Melem_s",
        "bnb_Melem_s",
        "x_vs_bnb",
        "GB_s",
        "share_of_copy",
        "bnb_share_of_copy",
        "best_share_of_copy",
        "numba_alloc_Melem_s",
        "bnb_path",
        "bytes_identical",
        "equal_to_profile",
    ]
    print(
        f"NF4/FP4 on {info['cpu_model']} ({' '.join(info['isa_flags'])}), {info['logical_cpus']} CPUs, "
        f"{info['numba_threads']} numba threads, {n} elements, blocksize {BS}, load average "
        f"{info['load_average_at_start']}; copy bandwidth {copy_before / 1e9:.1f} GB/s before, "
        f"{copy_after / 1e9:.1f} GB/s after (shares use the larger)"
    )
    print("\n".join(bnb_paths.host_lines()))
    print("numba dequantize:", info["numba_dequantize"])
    if args.note:
        print("note:", args.note)
    print(C.table(rows, cols))
    for tg in targets:
        print(C.target_line(tg))
    print("wrote", C.write(args.name, info, rows, targets))


if __name__ == "__main__":
    main()
