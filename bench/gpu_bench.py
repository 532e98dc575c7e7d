"""GPU benchmark: refimpl's CuPy kernels vs bitsandbytes CUDA and torch on the same data (H200).

Every figure is the median over rounds of CUDA-event time per call, after warm-up. Each round first
launches a spin kernel that keeps the GPU busy while the host queues the timed calls, so Python launch
overhead never shows up as GPU idle time (all contenders are timed the same way). Buffers larger than
the L2 cache, or rotated over several copies where one copy would fit in it.

    python bench/gpu_bench.py [--out DIR] [--quick]

Prints a table and writes DIR/gpu-h200-bench.json (command, versions, machine, every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cupy as cp
import torch

from refimpl.kernels import cupy_gpu as G
from refimpl.kernels.cupy_gpu import gemv4, lora_gemm, nf4

_SPIN = cp.RawKernel(
    r"""
extern "C" __global__ void spin(long long cycles) {
  long long t0 = clock64();
  while (clock64() - t0 < cycles) { }
}""",
    "spin",
)


def gpu_time(fn, *, reps: int = 20, rounds: int = 9, warmup: int = 3, spin_ms: float = 20.0) -> float:
    """Median seconds per call of fn(i) over ``rounds`` batches of ``reps`` calls (CUDA events)."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        _SPIN((1,), (1,), (np.int64(spin_ms * 1e-3 * 1.98e9),))
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        for i in range(reps):
            fn(i)
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3 / reps)
    return statistics.median(times)


def versions() -> dict:
    v = {
        "python": platform.python_version(),
        "cupy": cp.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
    }
    try:
        import bitsandbytes

        v["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:
        v["bitsandbytes"] = f"unavailable: {exc}"
    props = cp.cuda.runtime.getDeviceProperties(0)
    v["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    v["sm_count"] = props["multiProcessorCount"]
    v["l2_bytes"] = props["l2CacheSize"]
    v["driver"] = cp.cuda.runtime.driverGetVersion()
    v["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
    v["cpu"] = platform.processor() or platform.machine()
    v["cores"] = os.cpu_count()
    return v


def bf16(t):
    return t.to(torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--probe", action="store_true", help="run each kernel a few times untimed (for ncu)")
    ap.add_argument(
        "--sections",
        default="0,1,2,4",
        help="0 quantize/dequantize, 1 GEMV and QLoRA, 2 LoRA/DoRA, 4 TIES (default: all); "
        "with fewer, the JSON is written as gpu-h200-bench-sections-<list>.json",
    )
    args = ap.parse_args()
    if args.probe:
        x = torch.randn(1 << 26, device="cuda", dtype=torch.bfloat16)
        pk, stt = G.quantize_4bit(x, 64, "nf4")
        G.dequantize_4bit(pk, stt)
        W = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        pw, sw = G.quantize_4bit(W, 64, "nf4")
        G.gemv_4bit(torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16), pw, sw)
        G.gemv_4bit(torch.randn(16, 8192, device="cuda", dtype=torch.bfloat16), pw, sw)
        torch.cuda.synchronize()
        return
    torch.manual_seed(0)
    res: dict = {"command": " ".join(sys.argv), "versions": versions(), "figures": {}, "targets": {}}
    fig = res["figures"]
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except Exception as exc:
        bnb = F = None
        print("bitsandbytes unavailable:", exc)

    # ---- ceilings: copy bandwidth and GEMM rate
    n_copy = 1 << 30  # 1 GiB
    src = torch.empty(n_copy, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = gpu_time(lambda i: dst.copy_(src), reps=5)
    copy_bw = 2 * n_copy / t
    fig["copy_bandwidth_Bps"] = copy_bw
    for n in (4096, 8192):
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        t = gpu_time(lambda i, a=a, b=b: a @ b.T, reps=5 if n == 8192 else 10)
        fig[f"gemm_bf16_{n}_flops"] = 2 * n**3 / t
        fig[f"gemm_bf16_{n}_s"] = t
    gemm_rate = fig["gemm_bf16_4096_flops"]

    def _section0():
        # ---- NF4 quantize / dequantize, 268M bf16 elements (PERFORMANCE.md anchors)
        n = (1 << 28) if not args.quick else (1 << 26)
        x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        # sweep the loads-in-flight knobs, keep the best for the figures below
        sweep = {}
        for slots in (1, 2, 4):
            nf4.QUANT_SLOTS = slots
            sweep[f"quantize_slots{slots}_s"] = gpu_time(lambda i: G.quantize_4bit(x, 64, "nf4"), reps=10)
        nf4.QUANT_SLOTS = min((1, 2, 4), key=lambda v: sweep[f"quantize_slots{v}_s"])
        for min_blocks in (1, 6, 8):
            nf4.QUANT_MIN_BLOCKS = min_blocks
            sweep[f"quantize_min_blocks{min_blocks}_s"] = gpu_time(lambda i: G.quantize_4bit(x, 64, "nf4"), reps=10)
        nf4.QUANT_MIN_BLOCKS = min((1, 6, 8), key=lambda v: sweep[f"quantize_min_blocks{v}_s"])
        for waves in (1, 2, 4, 8):
            nf4.QUANT_WAVES = waves
            sweep[f"quantize_waves{waves}_s"] = gpu_time(lambda i: G.quantize_4bit(x, 64, "nf4"), reps=10)
        nf4.QUANT_WAVES = min((1, 2, 4, 8), key=lambda v: sweep[f"quantize_waves{v}_s"])
        pk, stt = G.quantize_4bit(x, 64, "nf4")
        for slots in (1, 2, 4, 8):
            nf4.DEQUANT_SLOTS = slots
            sweep[f"dequantize_slots{slots}_s"] = gpu_time(lambda i: G.dequantize_4bit(pk, stt), reps=10)
        nf4.DEQUANT_SLOTS = min((1, 2, 4, 8), key=lambda v: sweep[f"dequantize_slots{v}_s"])
        sweep["chosen"] = {
            "QUANT_SLOTS": nf4.QUANT_SLOTS,
            "QUANT_MIN_BLOCKS": nf4.QUANT_MIN_BLOCKS,
            "QUANT_WAVES": nf4.QUANT_WAVES,
            "DEQUANT_SLOTS": nf4.DEQUANT_SLOTS,
        }
        fig["nf4_knob_sweep_bs64_bf16"] = sweep
        for bs in (64, 128):
            for qt in ("nf4", "fp4"):
                key = f"quantize_{qt}_bs{bs}_bf16"
                t_ours = gpu_time(lambda i, bs=bs, qt=qt: G.quantize_4bit(x, bs, qt), reps=10)
                bytes_moved = n * 2 + n / 2 + 4 * n / bs
                fig[key] = {
                    "ours_s": t_ours,
                    "ours_elem_per_s": n / t_ours,
                    "ours_Bps": bytes_moved / t_ours,
                    "ours_share_of_copy_bw": bytes_moved / t_ours / copy_bw,
                }
                if F is not None:
                    t_b = gpu_time(lambda i, bs=bs, qt=qt: F.quantize_4bit(x, blocksize=bs, quant_type=qt), reps=10)
                    fig[key].update({"bnb_s": t_b, "bnb_elem_per_s": n / t_b, "speedup_vs_bnb": t_b / t_ours})
                packed, st = G.quantize_4bit(x, bs, qt)
                key = f"dequantize_{qt}_bs{bs}_bf16"
                t_ours = gpu_time(lambda i, packed=packed, st=st: G.dequantize_4bit(packed, st), reps=10)
                fig[key] = {
                    "ours_s": t_ours,
                    "ours_elem_per_s": n / t_ours,
                    "ours_Bps": bytes_moved / t_ours,
                    "ours_share_of_copy_bw": bytes_moved / t_ours / copy_bw,
                }
                if F is not None:
                    bp, bst = F.quantize_4bit(x, blocksize=bs, quant_type=qt)
                    t_b = gpu_time(lambda i, bp=bp, bst=bst: F.dequantize_4bit(bp, bst), reps=10)
                    fig[key].update({"bnb_s": t_b, "bnb_elem_per_s": n / t_b, "speedup_vs_bnb": t_b / t_ours})
        # nested (double quant) quantize
        t_ours = gpu_time(lambda i: G.quantize_4bit(x, 64, "nf4", double_quant=True), reps=10)
        fig["quantize_nf4_bs64_bf16_nested"] = {"ours_s": t_ours, "ours_elem_per_s": n / t_ours}
        if F is not None:
            t_b = gpu_time(
                lambda i: F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True), reps=10
            )
            fig["quantize_nf4_bs64_bf16_nested"].update({"bnb_s": t_b, "speedup_vs_bnb": t_b / t_ours})
        torch.cuda.empty_cache()

    def _section1():
        # ---- 4-bit GEMV, 8192 x 8192, rotated over 8 weight copies (32 MB each, L2 is ~60 MB)
        N = K = 8192
        copies = 8
        Ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        ours_q = [G.quantize_4bit(w, 64, "nf4") for w in Ws]
        bnb_q = [F.quantize_4bit(w, blocksize=64, quant_type="nf4") for w in Ws] if F is not None else None
        sweep = {}
        # m = 1: the rows kernel (x in registers) over its knobs, then the per-row-group kernel's sweep below
        x1 = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        rows_cfgs = [(rpw, waves) for rpw in (2, 4, 8) for waves in (1, 2)]
        for rpw, waves in rows_cfgs:
            gemv4.ROWS_MAX_M, gemv4.ROWS_RPW, gemv4.ROWS_WAVES = 1, rpw, waves
            sweep[f"m1_rows_rpw{rpw}_waves{waves}_s"] = gpu_time(
                lambda i: G.gemv_4bit(x1, *ours_q[i % copies]), reps=40
            )
        gemv4.ROWS_RPW, gemv4.ROWS_WAVES = min(rows_cfgs, key=lambda c: sweep[f"m1_rows_rpw{c[0]}_waves{c[1]}_s"])
        rows_best = sweep[f"m1_rows_rpw{gemv4.ROWS_RPW}_waves{gemv4.ROWS_WAVES}_s"]
        gemv4.ROWS_MAX_M = 0
        for m in (1, 4, 16):
            xs = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            cands = (
                [(2, 2, 4), (2, 2, 2), (2, 1, 4), (4, 2, 4), (2, 2, 8), (1, 2, 4), (2, 4, 4), (4, 1, 2), (4, 1, 4)]
                if m <= 4
                else [(2, 2, 2), (2, 2, 4), (2, 1, 2), (2, 2, 1), (1, 2, 4)]
            )
            cands += [(4, 2, 2), (8, 1, 2), (8, 1, 1), (4, 1, 1), (8, 2, 1), (4, 1, 8), (8, 1, 4)] if m <= 4 else []
            for cfg in cands:
                gemv4.GEMV_CONFIG[m] = cfg
                try:
                    sweep[f"m{m}_rpw{cfg[0]}_u{cfg[1]}_ks{cfg[2]}_s"] = gpu_time(
                        lambda i, xs=xs: G.gemv_4bit(xs, *ours_q[i % copies]), reps=40
                    )
                except Exception as exc:
                    sweep[f"m{m}_rpw{cfg[0]}_u{cfg[1]}_ks{cfg[2]}_s"] = repr(exc)
            ok = [c for c in cands if isinstance(sweep[f"m{m}_rpw{c[0]}_u{c[1]}_ks{c[2]}_s"], float)]
            gemv4.GEMV_CONFIG[m] = min(ok, key=lambda c: sweep[f"m{m}_rpw{c[0]}_u{c[1]}_ks{c[2]}_s"])
            sweep[f"m{m}_chosen"] = gemv4.GEMV_CONFIG[m]
        c1 = gemv4.GEMV_CONFIG[1]
        gemv4.ROWS_MAX_M = 1 if rows_best < sweep[f"m1_rpw{c1[0]}_u{c1[1]}_ks{c1[2]}_s"] else 0
        sweep["m1_rows_chosen"] = {
            "ROWS_MAX_M": gemv4.ROWS_MAX_M,
            "ROWS_RPW": gemv4.ROWS_RPW,
            "ROWS_WAVES": gemv4.ROWS_WAVES,
        }
        fig["gemv_knob_sweep"] = sweep
        for m in (1, 4, 16):
            xs = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            key = f"gemv_nf4_m{m}_8192"
            t_ours = gpu_time(lambda i, xs=xs: G.gemv_4bit(xs, *ours_q[i % copies]), reps=40)
            t_bf16 = gpu_time(lambda i, xs=xs: xs @ Ws[i % copies].T, reps=40)
            bytes_w = N * K / 2 + 4 * N * K / 64
            fig[key] = {
                "ours_s": t_ours,
                "ours_weight_Bps": bytes_w / t_ours,
                "torch_bf16_s": t_bf16,
                "ours_share_of_copy_bw": bytes_w / t_ours / copy_bw,
            }
            if F is not None:
                with torch.inference_mode():
                    t_b = gpu_time(
                        lambda i, xs=xs: bnb.matmul_4bit(
                            xs, bnb_q[i % copies][0].t(), quant_state=bnb_q[i % copies][1]
                        ),
                        reps=40,
                    )
                fig[key].update({"bnb_s": t_b, "ours_over_bnb_time": t_ours / t_b})
        # QLoRA forward m=1 with r=16 LoRA branch
        A = torch.randn(16, K, device="cuda", dtype=torch.bfloat16) / 64
        B = torch.randn(N, 16, device="cuda", dtype=torch.bfloat16) / 64
        x1 = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        fig["qlora_forward_m1_8192_r16"] = {
            "ours_s": gpu_time(lambda i: G.qlora_forward(x1, *ours_q[i % copies], A, B, 2.0), reps=40)
        }
        torch.cuda.empty_cache()

    def _section2():
        # ---- LoRA forward, bf16, r = 16, m = d = out = 4096
        m = d = out = 4096
        r = 16
        s = 2.0
        x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
        W = torch.randn(out, d, device="cuda", dtype=torch.bfloat16) / 64
        A = torch.randn(r, d, device="cuda", dtype=torch.bfloat16) / 64
        B = torch.randn(out, r, device="cuda", dtype=torch.bfloat16) / 64
        bias = torch.randn(out, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(m, out, device="cuda", dtype=torch.bfloat16)
        t_base = gpu_time(lambda i: torch.matmul(x, W.T, out=y), reps=20)
        xc, Wc = cp.asarray(x.view(torch.int16)), cp.asarray(W.view(torch.int16))
        yc = cp.empty((m, out), dtype=cp.uint16)
        t_base_cublas = gpu_time(
            lambda i: lora_gemm.gemm_rowmajor(
                lora_gemm._handle(), m, out, d, 1.0, xc.data.ptr, d, Wc.data.ptr, d, 0.0, yc.data.ptr, out, "bfloat16"
            ),
            reps=20,
        )
        t_naive = gpu_time(lambda i: x @ W.T + s * ((x @ A.T) @ B.T), reps=20)
        t_addmm = gpu_time(lambda i: torch.addmm(x @ W.T, x @ A.T, B.T, alpha=s), reps=20)
        packed = G.pack(W, A, B, s)
        buf = G.workspace(packed, m)
        buf[:, :d].copy_(x)
        lf = {
            "base_gemm_torch_s": t_base,
            "base_gemm_cublas_s": t_base_cublas,
            "torch_naive_s": t_naive,
            "torch_addmm_s": t_addmm,
            "extra_flops_share": (2 * m * d * r + 2 * m * r * out) / (2 * m * d * out),
        }
        yout = torch.empty(m, out, device="cuda", dtype=torch.bfloat16)
        for chunks in (1, 2, 4, 8):
            lf[f"ours_packed_chunks{chunks}_s"] = gpu_time(
                lambda i, c=chunks: G.forward_packed(packed, buf, chunks=c, out=yout), reps=20
            )

        def with_copy(i):
            buf[:, :d].copy_(x)
            return G.forward_packed(packed, buf, chunks=4, out=yout)

        lf["ours_with_input_copy_chunks4_s"] = gpu_time(with_copy, reps=20)
        best = min(v for k, v in lf.items() if k.startswith("ours_packed"))
        lf["ours_best_s"] = best
        # components: u = s·x Aᵀ alone (cuBLAS and torch), the K = d + r GEMM alone, K alignment variants
        h = lora_gemm._handle()
        xp = cp.asarray(buf.view(torch.int16))
        Ac = cp.asarray(A.view(torch.int16))
        Wp = cp.asarray(packed.weight.view(torch.int16))
        yp = cp.asarray(yout.view(torch.int16))
        kp = packed.k_pad
        lf["u_gemm_cublas_s"] = gpu_time(
            lambda i: lora_gemm.gemm_rowmajor(
                h, m, r, d, s, xp.data.ptr, kp, Ac.data.ptr, d, 0.0, xp.data.ptr + 2 * d, kp, "bfloat16"
            ),
            reps=20,
        )
        lf["u_gemm_torch_s"] = gpu_time(lambda i: x @ A.T, reps=20)
        lf["main_gemm_kpad_s"] = gpu_time(
            lambda i: lora_gemm.gemm_rowmajor(
                h, m, out, kp, 1.0, xp.data.ptr, kp, Wp.data.ptr, kp, 0.0, yp.data.ptr, out, "bfloat16"
            ),
            reps=20,
        )
        for align in (8, 128):
            lora_gemm.K_ALIGN = align
            pa = G.pack(W, A, B, s)
            ba = G.workspace(pa, m)
            ba[:, :d].copy_(x)
            lf[f"ours_packed_kalign{align}_chunks1_s"] = gpu_time(
                lambda i, pa=pa, ba=ba: G.forward_packed(pa, ba, chunks=1, out=yout), reps=20
            )
        lora_gemm.K_ALIGN = 64
        lf["k_pad_default"] = packed.k_pad
        lf["ours_over_base"] = best / t_base
        lf["torch_naive_over_base"] = t_naive / t_base
        lf["torch_addmm_over_base"] = t_addmm / t_base
        lf["base_gemm_flops"] = 2 * m * d * out / t_base
        fig["lora_forward_bf16_r16_4096"] = lf
        # bias folded as an extra K column
        packed_b = G.pack(W, A, B, s, bias=bias)
        buf_b = G.workspace(packed_b, m)
        buf_b[:, :d].copy_(x)
        lf["ours_with_bias_chunks4_s"] = gpu_time(
            lambda i: G.forward_packed(packed_b, buf_b, chunks=4, out=yout), reps=20
        )

        # ---- DoRA forward (eval), same shapes
        mag = (W.float().norm(dim=1) * 1.1).contiguous()
        t0 = time.perf_counter()
        pd_ = G.pack(W, A, B, s, magnitude=mag, bias=bias)
        torch.cuda.synchronize()
        t_pack = time.perf_counter() - t0
        t_pack_gpu = gpu_time(lambda i: G.pack(W, A, B, s, magnitude=mag, bias=bias), reps=3, rounds=5)
        bufd = G.workspace(pd_, m)
        bufd[:, :d].copy_(x)
        df = {"base_gemm_torch_s": t_base, "pack_first_call_wall_s": t_pack, "pack_s": t_pack_gpu}
        for chunks in (1, 2, 4, 8):
            df[f"ours_packed_chunks{chunks}_s"] = gpu_time(
                lambda i, c=chunks: G.forward_packed(pd_, bufd, chunks=c, out=yout), reps=20
            )

        def dora_torch(i):
            lw = B @ A
            wn = (W + s * lw).float().norm(dim=1).detach()
            f = (mag / wn).to(x.dtype)
            base = x @ W.T
            return f * (base + s * ((x @ A.T) @ B.T)) + bias

        df["torch_peft_style_s"] = gpu_time(dora_torch, reps=10)
        best = min(v for k, v in df.items() if k.startswith("ours_packed"))
        df["ours_best_s"] = best
        df["ours_over_base"] = best / t_base
        df["torch_peft_style_over_base"] = df["torch_peft_style_s"] / t_base
        fig["dora_forward_bf16_r16_4096"] = df
        torch.cuda.empty_cache()

    def _section4():
        # ---- TIES, 3 task vectors x 50M float32, density 0.2 (PEFT's torch TIES on the same GPU)
        nt = 50_000_000 if not args.quick else 5_000_000
        taus = [torch.randn(nt, device="cuda") for _ in range(3)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
        t_ties = gpu_time(lambda i: G.ties(taus, density=0.2, k_rule="floor"), reps=2, rounds=5)
        walls = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            G.ties(taus, density=0.2, k_rule="floor")
            cp.cuda.Device().synchronize()
            walls.append(time.perf_counter() - t0)
        cp_pool = cp.get_default_memory_pool()
        tf = {
            "ours_s": t_ties,
            "ours_wall_s": statistics.median(walls),
            "ours_cupy_pool_bytes": cp_pool.total_bytes(),
            "tensor_bytes": 4 * nt,
        }
        try:
            from peft.utils import merge_utils

            wts = torch.ones(3, device="cuda")
            stacked = torch.stack(taus)
            tf["peft_s"] = gpu_time(lambda i: merge_utils.ties(stacked, wts, 0.2), reps=1, rounds=3)
            tf["peft_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base_mem
            pw = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                merge_utils.ties(stacked, wts, 0.2)
                torch.cuda.synchronize()
                pw.append(time.perf_counter() - t0)
            tf["peft_wall_s"] = statistics.median(pw)
            tf["speedup_vs_peft_wall"] = tf["peft_wall_s"] / tf["ours_wall_s"]
            tf["speedup_vs_peft"] = tf["peft_s"] / t_ties
        except Exception as exc:
            tf["peft"] = f"unavailable: {exc}"
        fig["ties_3x50M_density0.2"] = tf

    sections = {"0": _section0, "1": _section1, "2": _section2, "4": _section4}
    chosen = [c.strip() for c in args.sections.split(",") if c.strip()]
    for name in chosen:
        try:
            sections[name]()
        except Exception as exc:
            import traceback

            traceback.print_exc()
            fig[f"_section{name}_error"] = repr(exc)
        torch.cuda.empty_cache()

    # ---- targets
    tg = res["targets"]
    fig["gemm_rate_flops"] = gemm_rate
    every = sorted(chosen) == sorted(sections)
    name = "gpu-h200-bench.json" if every else f"gpu-h200-bench-sections-{'-'.join(chosen)}.json"
    path = os.path.join(args.out, name)
    try:
        _targets(fig, tg)
    finally:
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1, default=float)
    print(json.dumps(res["figures"], indent=1, default=float))
    print("\nTARGETS")
    for k, v in tg.items():
        print(f"  {k:32s} {v}")
    print("wrote", path)


def _targets(fig: dict, tg: dict) -> None:
    """Issue 20's targets from the figures present (a run of some sections reports those only)."""
    q = fig.get("quantize_nf4_bs64_bf16")
    dq = fig.get("dequantize_nf4_bs64_bf16")
    gv = fig.get("gemv_nf4_m1_8192")
    if q:
        tg["quantize: >=5x bnb"] = q.get("speedup_vs_bnb")
        tg["quantize: >=60% copy bw"] = q["ours_share_of_copy_bw"]
    if dq:
        tg["dequantize: >=1.3x bnb"] = dq.get("speedup_vs_bnb")
        tg["dequantize: >=80% copy bw"] = dq["ours_share_of_copy_bw"]
    if gv:
        tg["gemv m=1: <=0.4x bnb time"] = gv.get("ours_over_bnb_time")
    if "lora_forward_bf16_r16_4096" in fig:
        tg["lora fwd: <=1.05x base"] = fig["lora_forward_bf16_r16_4096"]["ours_over_base"]
    if "dora_forward_bf16_r16_4096" in fig:
        tg["dora fwd: <=1.06x base"] = fig["dora_forward_bf16_r16_4096"]["ours_over_base"]


if __name__ == "__main__":
    main()
