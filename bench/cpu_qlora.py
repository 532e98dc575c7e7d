"""Fused NF4 dequantize-GEMV/GEMM (the QLoRA forward) on the CPU, swept over the number of rows m.

Same packed 4096 x 4096 NF4 weight (blocksize 64, nested statistics as in QLoRA), the same x (m, 4096)
float32 and the same LoRA adapter (r = 16, float32) for, at each m:

* fused: ``refimpl.kernels.numba_cpu.qlora.forward`` (float64 accumulation; column "path" names the
  kernel its dispatch on m chose, ``qlora.forward_path``);
* deq+sgemm: numba's dequantizer to float32, then a float32 BLAS product, plus the LoRA branch in
  float32 — the issue's "dequantize-then-matmul" (its float32 sum is far outside the oracle's
  float64 bound: column err/bound deq+sgemm);
* deq+dgemm: the same dequantized weight widened to float64 and a float64 BLAS product, plus the
  LoRA branch in float64 (the unfused computation that stays within the bound);
* bnb: bitsandbytes ``matmul_4bit`` (CPU: dequantize, then torch ``F.linear``), base product only.

The implementations are timed round-robin; speed-up columns are unfused time / fused time (≥ 1:
the fused path is not slower). err/bound: the worst |fused − x·Ŵᵀ − branch| over the conformance
bound. Also the full LoRA and DoRA forwards (numba vs reference) at m = 16.
Run: python bench/cpu_qlora.py [--repeats 7] [--ms 1,2,4,8,16,32,64]. Writes bench/results/cpu-qlora.json.
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


def _path(m: int, state) -> str:
    return nqlora.forward_path(m, state) if hasattr(nqlora, "forward_path") else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ms", default="1,2,4,8,16,32,64")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    info = C.machine()
    info["torch_threads"] = torch.get_num_threads()
    info["fused_kernel_threshold"] = {
        k: getattr(nqlora, k) for k in ("GEMM_MIN_ROWS", "FUSED_MAX_ROWS") if hasattr(nqlora, k)
    }
    d, r, s = args.size, args.rank, 2.0
    rng = np.random.default_rng(0)
    rows, targets = [], []
    for wname in args.dtypes.split(","):
        wdtype = np.float32 if wname == "float32" else ml_dtypes.bfloat16
        W = (rng.standard_normal((d, d), dtype=np.float32) * 0.02).astype(wdtype)
        packed, state = nq.quantize_4bit(
            W, 64, "nf4", True, profile="bitsandbytes-cpu", threads=torch.get_num_threads()
        )
        Wt = torch.from_numpy(W.view(np.int16)).view(torch.bfloat16) if wdtype != np.float32 else torch.from_numpy(W)
        bp, bstate = F.quantize_4bit(Wt, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert np.array_equal(bp.numpy(), packed), "packed weights differ from bitsandbytes"
        Wd = ref.dequantize_4bit(packed, state).astype(np.float64)
        A = (rng.standard_normal((r, d)) * 0.02).astype(np.float32)
        B = (rng.standard_normal((d, r)) * 0.02).astype(np.float32)
        A64, B64 = A.astype(np.float64), B.astype(np.float64)
        for m in (int(v) for v in args.ms.split(",")):
            x = rng.standard_normal((m, d)).astype(np.float32)
            x64 = x.astype(np.float64)
            xt = torch.from_numpy(x).to(Wt.dtype)

            def deq_sgemm():
                y = x @ nq.dequantize_4bit(packed, state).astype(np.float32, copy=False).T
                y += (s * (x @ A.T)) @ B.T
                return y

            def deq_dgemm():
                y = x64 @ nq.dequantize_4bit(packed, state).astype(np.float64).T
                y += (s * (x64 @ A64.T)) @ B64.T
                return y

            t = C.interleaved_medians(
                {
                    "fused": lambda: nqlora.forward(x, packed, state, A, B, s),
                    "sgemm": deq_sgemm,
                    "dgemm": deq_dgemm,
                    "bnb": lambda: bnb.matmul_4bit(xt, bp.t(), quant_state=bstate),
                },
                repeats=args.repeats,
            )
            want = x64 @ Wd.T + (s * (x64 @ A64.T)) @ B64.T
            bound = 2 * (
                precision.matmul_error_bound(x64, Wd.T, "float64", extra_roundings=4)
                + s * precision.gamma(2 * r + 4, "float64") * (np.abs(x64) @ np.abs(A64.T) @ np.abs(B64.T))
            )
            err_fused = precision.compare_to_bound(nqlora.forward(x, packed, state, A, B, s), want, bound)
            err_sgemm = precision.compare_to_bound(deq_sgemm().astype(np.float64), want, bound)
            rows.append(
                {
                    "m": m,
                    "weight_dtype": np.dtype(wdtype).name,
                    "path": _path(m, state),
                    "fused_ms": 1e3 * t["fused"],
                    "deq_sgemm_ms": 1e3 * t["sgemm"],
                    "deq_dgemm_ms": 1e3 * t["dgemm"],
                    "bnb_ms": 1e3 * t["bnb"],
                    "x_vs_deq_sgemm": t["sgemm"] / t["fused"],
                    "x_vs_deq_dgemm": t["dgemm"] / t["fused"],
                    "x_vs_bnb": t["bnb"] / t["fused"],
                    "err_over_bound_fused": err_fused.worst_ratio,
                    "err_over_bound_deq_sgemm": err_sgemm.worst_ratio,
                }
            )
            print(C.table(rows[-1:], list(rows[-1])), flush=True)
            targets.append(
                {
                    "name": f"fused NF4 forward {d}x{d} m={m} r={r} ({np.dtype(wdtype).name} weight) vs "
                    "dequantize-then-matmul (float32 BLAS)",
                    "measured": t["sgemm"] / t["fused"],
                    "target": 1,
                    "met": t["sgemm"] >= t["fused"],
                }
            )
    # LoRA / DoRA forwards, float64 as the reference, m = 16 tokens, r = 16
    m = 16
    x = rng.standard_normal((m, d))
    W = rng.standard_normal((d, d)) * 0.02
    A, B = rng.standard_normal((r, d)) * 0.02, rng.standard_normal((d, r)) * 0.02
    bias, mag = rng.standard_normal(d), np.abs(rng.standard_normal(d)) + 0.5
    other = []
    for name, kfn, rfn in (
        (
            "LoRA forward",
            lambda: nlora.forward(x, W, A, B, s, bias=bias),
            lambda: lora.forward(x, W, A, B, s, bias=bias),
        ),
        (
            "DoRA forward",
            lambda: ndora.forward(x, W, A, B, mag, s, bias=bias),
            lambda: dora.forward(x, W, A, B, mag, s, bias=bias),
        ),
    ):
        t = C.interleaved_medians({"k": kfn, "r": rfn}, repeats=args.repeats)
        peak_k, _ = C.peak_extra_bytes(kfn)
        peak_r, _ = C.peak_extra_bytes(rfn)
        other.append(
            {
                "op": f"{name} m={m} r={r}",
                "numba_ms": 1e3 * t["k"],
                "numpy_ref_ms": 1e3 * t["r"],
                "x_vs_ref": t["r"] / t["k"],
                "peak_extra_MB_numba": peak_k / 2**20,
                "peak_extra_MB_ref": peak_r / 2**20,
            }
        )
    print(
        f"\nQLoRA forward on {info['cpu_model']} ({' '.join(info['isa_flags'])}), {info['logical_cpus']} CPUs, "
        f"numba threads {info['numba_threads']}, d = {d}, r = {r}, load average {info['load_average_at_start']}"
    )
    print(C.table(rows, list(rows[0])))
    print()
    print(C.table(other, list(other[0])))
    for tg in targets:
        print(C.target_line(tg))
    print("wrote", C.write("qlora", info, rows + other, targets))


if __name__ == "__main__":
    main()
