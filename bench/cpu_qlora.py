"""Fused NF4 dequantize-GEMV/GEMM (the QLoRA base matmul) on the CPU.

Same packed 4096 x 4096 NF4 weight (blocksize 64, nested statistics as in QLoRA) and the same
inputs for: numba's fused kernel (float64 accumulation, W never materialised; m = 1 runs the AVX2
vpermps kernel where the host has AVX2, column "fused_kernel"); dequantize-then-
matmul with numba's dequantizer and a float32 BLAS product; bitsandbytes ``matmul_4bit`` (CPU:
dequantize, then torch ``F.linear``); the NumPy reference ``refimpl.qlora`` base product.
Also the full LoRA and DoRA forwards (numba module vs reference) at m = 16.
Run: python bench/cpu_qlora.py [--repeats 7]. Writes bench/results/cpu-qlora.json.
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

import bitsandbytes as bnb
import cpu_common as C
import torch
from bitsandbytes import functional as F

import refimpl.quant as ref
from refimpl import dora, lora, precision
from refimpl.kernels.numba_cpu import dora as ndora
from refimpl.kernels.numba_cpu import lora as nlora
from refimpl.kernels.numba_cpu import qlora as nqlora
from refimpl.kernels.numba_cpu import quant as nq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args()
    info = C.machine()
    d = args.size
    rng = np.random.default_rng(0)
    rows, targets = [], []
    for wdtype in (np.float32, ml_dtypes.bfloat16):
        W = (rng.standard_normal((d, d), dtype=np.float32) * 0.02).astype(wdtype)
        packed, state = nq.quantize_4bit(
            W, 64, "nf4", True, profile="bitsandbytes-cpu", threads=torch.get_num_threads()
        )
        Wt = torch.from_numpy(W.view(np.int16)).view(torch.bfloat16) if wdtype != np.float32 else torch.from_numpy(W)
        bp, bstate = F.quantize_4bit(Wt, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert np.array_equal(bp.numpy(), packed), "packed weights differ from bitsandbytes"
        for m in (1, 16):
            x = rng.standard_normal((m, d)).astype(np.float32)
            xt = torch.from_numpy(x).to(Wt.dtype)
            r = args.repeats

            def deq_then_matmul():
                return x @ nq.dequantize_4bit(packed, state).astype(np.float32, copy=False).T

            t = C.interleaved_medians(
                {
                    "fused": lambda: nqlora.dequant_matmul(x, packed, state),
                    "deq": deq_then_matmul,
                    "bnb": lambda: bnb.matmul_4bit(xt, bp.t(), quant_state=bstate),
                },
                repeats=r,
            )
            t_fused, t_deq, t_bnb = t["fused"], t["deq"], t["bnb"]
            t_ref = C.median_time(
                lambda: x.astype(np.float64) @ ref.dequantize_4bit(packed, state).astype(np.float64).T,
                repeats=max(2, r // 3),
            )
            Wd = ref.dequantize_4bit(packed, state).astype(np.float64)
            got = nqlora.dequant_matmul(x, packed, state)
            rep = precision.compare_to_bound(
                got, x.astype(np.float64) @ Wd.T, 2 * precision.matmul_error_bound(x, Wd.T, "float64")
            )
            kernel = ("avx2" if nqlora.AVX2 else "scalar") if m < nqlora.GEMM_MIN_ROWS else "tiles+BLAS"
            rows.append(
                {
                    "op": f"NF4 {'GEMV' if m == 1 else 'GEMM'} m={m}",
                    "weight_dtype": np.dtype(wdtype).name,
                    "fused_kernel": kernel,
                    "fused_numba_s": t_fused,
                    "numba_dequant_then_matmul_s": t_deq,
                    "bnb_matmul_4bit_s": t_bnb,
                    "numpy_ref_s": t_ref,
                    "x_vs_dequant_then_matmul": t_deq / t_fused,
                    "x_vs_bnb": t_bnb / t_fused,
                    "error_over_bound": rep.worst_ratio,
                }
            )
            if m == 1:
                targets.append(
                    {
                        "name": f"fused NF4 GEMV {d}x{d} m=1 ({np.dtype(wdtype).name} weight) vs "
                        "dequantize-then-matmul",
                        "measured": t_deq / t_fused,
                        "target": 3,
                        "met": t_deq / t_fused >= 3,
                    }
                )
    # LoRA / DoRA forwards, float64 as the reference, m = 16 tokens, r = 16
    m, r = 16, 16
    x = rng.standard_normal((m, d))
    W = rng.standard_normal((d, d)) * 0.02
    A, B = rng.standard_normal((r, d)) * 0.02, rng.standard_normal((d, r)) * 0.02
    bias, mag = rng.standard_normal(d), np.abs(rng.standard_normal(d)) + 0.5
    for name, kfn, rfn in (
        (
            "LoRA forward",
            lambda: nlora.forward(x, W, A, B, 2.0, bias=bias),
            lambda: lora.forward(x, W, A, B, 2.0, bias=bias),
        ),
        (
            "DoRA forward",
            lambda: ndora.forward(x, W, A, B, mag, 2.0, bias=bias),
            lambda: dora.forward(x, W, A, B, mag, 2.0, bias=bias),
        ),
    ):
        t = C.interleaved_medians({"k": kfn, "r": rfn}, repeats=args.repeats)
        tk, tr = t["k"], t["r"]
        peak_k, _ = C.peak_extra_bytes(kfn)
        peak_r, _ = C.peak_extra_bytes(rfn)
        rows.append(
            {
                "op": f"{name} m={m} r={r}",
                "weight_dtype": "float64",
                "fused_numba_s": tk,
                "numpy_ref_s": tr,
                "x_vs_ref": tr / tk,
                "peak_extra_MB_numba": peak_k / 2**20,
                "peak_extra_MB_ref": peak_r / 2**20,
            }
        )
    cols = [
        "op",
        "weight_dtype",
        "fused_kernel",
        "fused_numba_s",
        "numba_dequant_then_matmul_s",
        "bnb_matmul_4bit_s",
        "numpy_ref_s",
        "x_vs_dequant_then_matmul",
        "x_vs_bnb",
        "x_vs_ref",
        "error_over_bound",
        "peak_extra_MB_numba",
        "peak_extra_MB_ref",
    ]
    print(
        f"QLoRA/LoRA/DoRA on {info['cpu_model']}, {info['logical_cpus']} CPUs, d = {d}, "
        f"load average {info['load_average_at_start']}"
    )
    print(C.table(rows, cols))
    for t in targets:
        print(C.target_line(t))
    print("wrote", C.write("qlora", info, rows, targets))


if __name__ == "__main__":
    main()
