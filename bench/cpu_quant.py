"""NF4/FP4 quantize and dequantize on the CPU: numba vs the NumPy reference vs bitsandbytes CPU.

One process, the same data for every implementation (4096 x 4096 = 16.8M elements, blocksize 64),
medians after one warm-up call, timed round-robin; the outputs are checked byte for byte against bitsandbytes.
Run: python bench/cpu_quant.py [--repeats 5] [--size 4096]
Writes bench/results/cpu-quant.json.
"""

# ruff: noqa: B023 - the timed closures run within the loop iteration that defines them
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpu_common as C
import torch
from bitsandbytes import functional as F

import refimpl.quant as ref
from refimpl.kernels.numba_cpu import quant as nq


def to_torch(x: np.ndarray) -> torch.Tensor:
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, default=4096, help="the tensor is size x size")
    args = ap.parse_args()
    info = C.machine()
    rng = np.random.default_rng(0)
    base = rng.standard_normal((args.size, args.size), dtype=np.float32)
    n = base.size
    rows, targets = [], []
    for dtype in (np.float32, ml_dtypes.bfloat16):
        x = base.astype(dtype)
        xt = to_torch(x)
        dname = np.dtype(dtype).name
        for qt in ("nf4", "fp4"):
            r = args.repeats
            t = C.interleaved_medians(
                {
                    "numba": lambda: nq.quantize_4bit(x, 64, qt, profile="bitsandbytes-cpu"),
                    "bnb": lambda: F.quantize_4bit(xt, blocksize=64, quant_type=qt),
                    "ref": lambda: ref.quantize_4bit(x, 64, qt, profile="bitsandbytes-cpu"),
                },
                repeats=r,
            )
            t_numba, t_bnb, t_ref = t["numba"], t["bnb"], t["ref"]
            kp, ks = nq.quantize_4bit(x, 64, qt, profile="bitsandbytes-cpu")
            bp, bs = F.quantize_4bit(xt, blocksize=64, quant_type=qt)
            same_q = bool(np.array_equal(kp, bp.numpy()) and np.array_equal(ks.absmax, bs.absmax.numpy()))
            rows.append(
                {
                    "op": "quantize",
                    "dtype": dname,
                    "quant_type": qt,
                    "numba_s": t_numba,
                    "bnb_s": t_bnb,
                    "numpy_ref_s": t_ref,
                    "numba_Melem_s": n / t_numba / 1e6,
                    "bnb_Melem_s": n / t_bnb / 1e6,
                    "x_vs_bnb": t_bnb / t_numba,
                    "x_vs_ref": t_ref / t_numba,
                    "bytes_identical": same_q,
                }
            )
            targets.append(
                {
                    "name": f"{qt} quantize {dname} vs bitsandbytes",
                    "measured": t_bnb / t_numba,
                    "target": 10,
                    "met": t_bnb / t_numba >= 10,
                }
            )
            targets.append(
                {
                    "name": f"{qt} quantize {dname} vs NumPy reference",
                    "measured": t_ref / t_numba,
                    "target": 10,
                    "met": t_ref / t_numba >= 10,
                }
            )

            t = C.interleaved_medians(
                {
                    "numba": lambda: nq.dequantize_4bit(kp, ks),
                    "bnb": lambda: F.dequantize_4bit(bp, bs),
                    "ref": lambda: ref.dequantize_4bit(kp, ks),
                },
                repeats=r,
            )
            t_numba, t_bnb, t_ref = t["numba"], t["bnb"], t["ref"]
            kd = nq.dequantize_4bit(kp, ks)
            bd = F.dequantize_4bit(bp, bs)
            bd = bd.view(torch.int16).numpy() if bd.dtype == torch.bfloat16 else bd.numpy()
            same_d = kd.reshape(-1).view(np.uint8).tobytes() == bd.reshape(-1).view(np.uint8).tobytes()
            rows.append(
                {
                    "op": "dequantize",
                    "dtype": dname,
                    "quant_type": qt,
                    "numba_s": t_numba,
                    "bnb_s": t_bnb,
                    "numpy_ref_s": t_ref,
                    "numba_Melem_s": n / t_numba / 1e6,
                    "bnb_Melem_s": n / t_bnb / 1e6,
                    "x_vs_bnb": t_bnb / t_numba,
                    "x_vs_ref": t_ref / t_numba,
                    "bytes_identical": same_d,
                }
            )
            targets.append(
                {
                    "name": f"{qt} dequantize {dname} vs bitsandbytes",
                    "measured": t_bnb / t_numba,
                    "target": 2,
                    "met": t_bnb / t_numba >= 2,
                }
            )
    cols = [
        "op",
        "dtype",
        "quant_type",
        "numba_s",
        "bnb_s",
        "numpy_ref_s",
        "numba_Melem_s",
        "bnb_Melem_s",
        "x_vs_bnb",
        "x_vs_ref",
        "bytes_identical",
    ]
    print(
        f"NF4/FP4 on {info['cpu_model']}, {info['logical_cpus']} CPUs, {n} elements, blocksize 64, "
        f"load average {info['load_average_at_start']}"
    )
    print(C.table(rows, cols))
    for t in targets:
        print(C.target_line(t))
    print("wrote", C.write("quant", info, rows, targets))


if __name__ == "__main__":
    main()
