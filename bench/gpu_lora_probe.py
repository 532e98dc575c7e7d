"""Where the LoRA/DoRA forward's time over the base GEMM goes (issue 20, bf16, T = d = out = 4096, r = 16).

Times, with bench/gpu_bench.py's method (CUDA events, a spin kernel first, median of rounds): the base
GEMM; the main GEMM over K_pad; u = s·x Aᵀ by cuBLAS (lora_gemm's path) and by the experimental
tensor-core kernel below (several CTA shapes); the forward with that kernel's u before the GEMM (chunks = 1)
and with u of later row chunks on a side stream (chunks = 2, 4); the DoRA forward with the best setting;
both forwards with lora_gemm's own path (u by cuBLAS). The kernel lost to cuBLAS (bench/README.md, GPU
section) and stays here, out of the library, as the record of what was tried. With
--sweep also the main GEMM at M = 2048, 1024, 512 rows and as 2 or 4 row chunks back to back, and every
algorithm cublasLt's heuristic offers for K = 4096, 4112, 4128, 4160 (with and without an SM-count target
of 128). Checks first: the kernel's u against cuBLAS's and the float64 u rounded once, for every shape.

    python bench/gpu_lora_probe.py [--out DIR] [--sweep]   # writes DIR/gpu-h200-lora-probe.json
    ncu --clock-control none ... python bench/gpu_lora_probe.py --ncu   # u by cuBLAS and the kernel, once
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import importlib.util
import itertools
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from refimpl.kernels import cupy_gpu as G  # noqa: E402
from refimpl.kernels.cupy_gpu import _device as D  # noqa: E402
from refimpl.kernels.cupy_gpu import lora_gemm  # noqa: E402

_spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "bench", "gpu_bench.py"))
gpu_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_bench)
gpu_time = gpu_bench.gpu_time

_U_SRC = r"""
// u[i, j] = s · Σ_k x[i, k] A[j, k] for the rows i < m of a workspace (row stride ldx) and the ranks j < r ≤ 16,
// on the tensor cores: mma.sync m16n8k16 with float32 accumulation, then rounded once to the element type.
// A CTA takes 16 rows at a time and streams them, with the matching columns of A, through shared memory in
// stages of KC = 32·WARPS columns with cp.async, STAGES - 1 stages in flight (the kernel is bound by reading
// x once); warp w multiplies the stage's columns 32w..32w+31 and the warps add their float32 partial sums in
// shared memory at the end.
// The fragment's k order is a permutation of the true one, the same for x and A: thread (g, t) takes the
// 8 columns 8t..8t+7 of its warp's 32 for rows g, g + 8 and ranks g, g + 8, and feeds words 0, 1 to one
// mma and words 2, 3 to the next, so a dot product still pairs x[i, k] with A[j, k].
__device__ __forceinline__ void mma16816(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if DT == 2
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

#define KC (WARPS * 32)
#define LDS (KC + 8)   // padded shared row (elements): rows g and g + 1 start 4 banks apart

extern "C" __global__ void __launch_bounds__(WARPS * 32)
lora_u(const elem_t* __restrict__ x, long long ldx, const elem_t* __restrict__ A, elem_t* __restrict__ u,
       int m, int d, int r, float s) {
  extern __shared__ __align__(16) unsigned char smem[];
  elem_t* stage = reinterpret_cast<elem_t*>(smem);
  float* part = reinterpret_cast<float*>(smem);  // reused once the pipeline has drained
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, t = lane & 3;
  const int nk = (d + KC - 1) / KC;
  const int tiles = (m + 15) >> 4;
  // this thread's 16-byte pieces of a stage: column pc of shared rows pr, pr + 8 (x) and 16 + pr, 24 + pr (A)
  const int pr = tid / (KC / 8), pc = (tid % (KC / 8)) * 8;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int row0 = tile * 16;
    const elem_t* src[4];
    bool src_ok[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = row0 + pr + 8 * h, j = pr + 8 * h;
      src_ok[h] = i < m;
      src[h] = x + (long long)(src_ok[h] ? i : 0) * ldx;
      src_ok[2 + h] = j < r;
      src[2 + h] = A + (long long)(src_ok[2 + h] ? j : 0) * d;
    }
    // stage ks: columns ks·KC.. of rows row0..row0+15 of x and of the 16 rows of A (zero past m, r and d),
    // so that A arrives with x instead of costing an L2 round trip inside the loop
    auto issue = [&](int ks) {
      elem_t* dst = stage + (ks % STAGES) * 32 * LDS + pr * LDS + pc;
      const int col = ks * KC + pc;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const bool ok = src_ok[q] && col < d;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                     :: "r"(smem_addr(dst + 8 * q * LDS)), "l"(ok ? src[q] + col : x), "r"(ok ? 16 : 0)
                     : "memory");
      }
    };
#pragma unroll
    for (int ks = 0; ks < STAGES - 1; ++ks) {
      if (ks < nk) issue(ks);
      asm volatile("cp.async.commit_group;" ::: "memory");
    }
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    for (int ks = 0; ks < nk; ++ks) {
      asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 2) : "memory");
      __syncthreads();  // stage ks landed for every thread; stage ks - 1's buffer is free again
      if (ks + STAGES - 1 < nk) issue(ks + STAGES - 1);
      asm volatile("cp.async.commit_group;" ::: "memory");
      const elem_t* sb = stage + (ks % STAGES) * 32 * LDS + w * 32 + 8 * t;
      const uint4 lo = *reinterpret_cast<const uint4*>(sb + g * LDS);
      const uint4 hi = *reinterpret_cast<const uint4*>(sb + (g + 8) * LDS);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const uint4 b = *reinterpret_cast<const uint4*>(sb + (16 + 8 * nt + g) * LDS);
        mma16816(acc[nt], lo.x, hi.x, lo.y, hi.y, b.x, b.y);
        mma16816(acc[nt], lo.z, hi.z, lo.w, hi.w, b.z, b.w);
      }
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) part[(w * 8 + nt * 4 + c) * 32 + lane] = acc[nt][c];
    __syncthreads();
    for (int f = tid; f < 8 * 32; f += WARPS * 32) {
      const int ln = f & 31, k = f >> 5, c = k & 3, nt = k >> 2;
      float v = 0.0f;
#pragma unroll
      for (int ww = 0; ww < WARPS; ++ww) v += part[(ww * 8 + k) * 32 + ln];
      const int i = row0 + (ln >> 2) + ((c >> 1) << 3);
      const int j = nt * 8 + (ln & 3) * 2 + (c & 1);
      if (i < m && j < r) u[(long long)i * ldx + j] = from_f(s * v);
    }
    __syncthreads();
  }
}
"""

#: (warps per CTA, pipeline stages) of the u kernel
SHAPES = [(8, 6), (8, 4), (16, 3), (16, 4), (4, 8), (8, 8)]
U_SHAPE = list(SHAPES[0])
_configured: set = set()


def set_shape(shape):
    U_SHAPE[:] = shape


def u_pass(packed, x_ptr: int, a_ptr: int, rows: int, *, ctas: int | None = None) -> None:
    """u = s·x Aᵀ for ``rows`` workspace rows from x_ptr into their columns d..d+r, by the tensor-core
    kernel (bf16/fp16, r ≤ 16, d % 8 == 0) on at most ``ctas`` CTAs, on the current stream."""
    d, r, kp = packed.d, packed.r, packed.k_pad
    if packed.dtype not in ("float16", "bfloat16") or r > 16 or d % 8:
        raise ValueError("the u kernel covers float16/bfloat16, r <= 16 and d % 8 == 0")
    it = D.ITEMSIZE[packed.dtype]
    warps, stages = U_SHAPE
    grid = -(-rows // 16) if ctas is None else min(-(-rows // 16), int(ctas))
    key = (D.DT_CODE[packed.dtype], warps, stages)
    kern = D.compile_kernel(_U_SRC, "lora_u", (("DT", key[0]), ("WARPS", warps), ("STAGES", stages)))
    smem = max(stages * 32 * (32 * warps + 8) * it, warps * 8 * 32 * 4)
    if key not in _configured:
        kern.max_dynamic_shared_size_bytes = smem
        _configured.add(key)
    args = (D.ptr(x_ptr), np.int64(kp), D.ptr(a_ptr), D.ptr(x_ptr + d * it), np.int32(rows), np.int32(d))
    kern((grid,), (32 * warps,), (*args, np.int32(r), np.float32(packed.scaling)), shared_mem=smem)


def forward_kernel_u(packed, xbuf, y, chunks: int = 1):
    """lora_gemm.forward_packed with u by the kernel above: u then the GEMM over K_pad (chunks = 1), or u of
    chunk 0, then the GEMM of chunk c while u of chunk c + 1 runs on a side stream."""
    m, kp, n_out = xbuf.shape[0], packed.k_pad, packed.out_features
    xp, ap, wp, yp = xbuf.data_ptr(), packed.A.data_ptr(), packed.weight.data_ptr(), y.data_ptr()

    def gemm(lo, hi):
        lora_gemm.gemm_rowmajor(
            lora_gemm._handle(),
            hi - lo,
            n_out,
            kp,
            1.0,
            xp + lo * kp * 2,
            kp,
            wp,
            kp,
            0.0,
            yp + lo * n_out * 2,
            n_out,
            packed.dtype,
        )

    bounds = [int(b) for b in np.linspace(0, m, chunks + 1).astype(int)]
    main = cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    if chunks == 1:
        with main:
            u_pass(packed, xp, ap, m)
            gemm(0, m)
        return y
    side, _ = lora_gemm._side(cp.cuda.Device().id)
    side.wait_event(main.record())
    ready = []
    with side:
        for lo, hi in itertools.pairwise(bounds[1:]):
            u_pass(packed, xp + lo * kp * 2, ap, hi - lo)
            ready.append(side.record())
    with main:
        u_pass(packed, xp, ap, bounds[1])
        gemm(bounds[0], bounds[1])
        for (lo, hi), ev in zip(itertools.pairwise(bounds[1:]), ready, strict=True):
            main.wait_event(ev)
            gemm(lo, hi)
    return y


class Lt:
    """cublasLt through ctypes: the heuristic's algorithms for row-major y = x Wᵀ (bf16, float32 sums)."""

    class Result(ctypes.Structure):
        _fields_ = [
            ("algo", ctypes.c_uint64 * 8),
            ("workspace", ctypes.c_size_t),
            ("state", ctypes.c_int),
            ("waves", ctypes.c_float),
            ("reserved", ctypes.c_int * 4),
        ]

    def __init__(self):
        lib = None
        for name in ("libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"):
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            for pat in ("nvidia/*/lib/libcublasLt.so*", "nvidia/cublas/lib/libcublasLt.so*"):
                for base in sys.path:
                    hits = sorted(glob.glob(os.path.join(base, pat)))
                    if hits:
                        lib = ctypes.CDLL(hits[0])
                        break
                if lib is not None:
                    break
        self.lib = lib
        self.h = ctypes.c_void_p()
        self._ok(lib.cublasLtCreate(ctypes.byref(self.h)), "create")
        self.ws = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")

    @staticmethod
    def _ok(status, what):
        if status != 0:
            raise RuntimeError(f"cublasLt {what}: status {status}")

    def _layout(self, rows, cols, ld):
        lay = ctypes.c_void_p()
        self._ok(
            self.lib.cublasLtMatrixLayoutCreate(
                ctypes.byref(lay), 14, ctypes.c_uint64(rows), ctypes.c_uint64(cols), ctypes.c_int64(ld)
            ),
            "layout",
        )
        return lay

    def plans(self, m, n, k, ld, count=8, sm_target=0):
        """Algorithms for y (m, n) = x (m, k; row stride ld) · W (n, k; row stride ld)ᵀ, in the heuristic's order."""
        lib = self.lib
        desc = ctypes.c_void_p()
        self._ok(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), 68, 0), "desc")
        op_t = ctypes.c_int32(1)
        self._ok(lib.cublasLtMatmulDescSetAttribute(desc, 3, ctypes.byref(op_t), ctypes.c_size_t(4)), "transa")
        if sm_target:
            tgt = ctypes.c_int32(sm_target)
            self._ok(lib.cublasLtMatmulDescSetAttribute(desc, 15, ctypes.byref(tgt), ctypes.c_size_t(4)), "sm target")
        la, lb, lc = self._layout(k, n, ld), self._layout(k, m, ld), self._layout(n, m, n)
        pref = ctypes.c_void_p()
        self._ok(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "pref")
        wsb = ctypes.c_uint64(self.ws.numel())
        self._ok(lib.cublasLtMatmulPreferenceSetAttribute(pref, 1, ctypes.byref(wsb), ctypes.c_size_t(8)), "pref ws")
        res = (self.Result * count)()
        got = ctypes.c_int()
        self._ok(
            lib.cublasLtMatmulAlgoGetHeuristic(self.h, desc, la, lb, lc, lc, pref, count, res, ctypes.byref(got)),
            "heuristic",
        )
        return [(desc, la, lb, lc, res[i]) for i in range(got.value) if res[i].state == 0]

    def run(self, plan, x_ptr, w_ptr, y_ptr):
        desc, la, lb, lc, r = plan
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self._ok(
            self.lib.cublasLtMatmul(
                self.h,
                desc,
                ctypes.byref(one),
                ctypes.c_void_p(w_ptr),
                la,
                ctypes.c_void_p(x_ptr),
                lb,
                ctypes.byref(zero),
                ctypes.c_void_p(y_ptr),
                lc,
                ctypes.c_void_p(y_ptr),
                lc,
                ctypes.byref(r.algo),
                ctypes.c_void_p(self.ws.data_ptr()),
                ctypes.c_size_t(self.ws.numel()),
                ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
            ),
            "matmul",
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ncu", action="store_true", help="run u by cuBLAS and by the kernel once each (for ncu)")
    ap.add_argument("--sweep", action="store_true", help="also chunked GEMMs and cublasLt's algorithms for K_pad")
    args = ap.parse_args()
    torch.manual_seed(0)
    m = d = n_out = 4096
    r, s = 16, 2.0
    x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(n_out, d, device="cuda", dtype=torch.bfloat16) / 64
    A = torch.randn(r, d, device="cuda", dtype=torch.bfloat16) / 64
    B = torch.randn(n_out, r, device="cuda", dtype=torch.bfloat16) / 64
    y = torch.empty(m, n_out, device="cuda", dtype=torch.bfloat16)
    packed = G.pack(W, A, B, s)
    buf = G.workspace(packed, m)
    buf[:, :d].copy_(x)
    kp = packed.k_pad
    h = lora_gemm._handle()
    xp, ap_, wp, yp = buf.data_ptr(), A.data_ptr(), packed.weight.data_ptr(), y.data_ptr()

    def main_gemm(lo, hi):
        lora_gemm.gemm_rowmajor(
            h, hi - lo, n_out, kp, 1.0, xp + lo * kp * 2, kp, wp, kp, 0.0, yp + lo * n_out * 2, n_out, "bfloat16"
        )

    def u_cublas(rows=m):
        lora_gemm.gemm_rowmajor(h, rows, r, d, s, xp, kp, ap_, d, 0.0, xp + d * 2, kp, "bfloat16")

    def u_kernel(rows=m, ctas=None):
        u_pass(packed, xp, ap_, rows, ctas=ctas)

    if args.ncu:
        u_cublas()
        for shape in SHAPES[:3]:
            set_shape(shape)
            u_kernel()
        torch.cuda.synchronize()
        return

    res: dict = {"command": " ".join(sys.argv), "versions": gpu_bench.versions(), "figures": {}, "checks": {}}
    fig, chk = res["figures"], res["checks"]

    # ---- correctness: u by the kernel against cuBLAS's u and the float64 u rounded once
    u64 = s * (x.double() @ A.double().T)
    u_ref = u64.to(torch.bfloat16)
    u_cublas()
    torch.cuda.synchronize()
    u_cb = buf[:, d : d + r].clone()
    chk["cublas_u_mismatch_vs_rounded_f64"] = int((u_cb != u_ref).sum())
    for shape in SHAPES:
        set_shape(shape)
        for rows, ctas in ((m, None), (1000, 3)):
            key = f"w{shape[0]}_st{shape[1]}_rows{rows}_ctas{ctas}"
            buf[:, d : d + r].fill_(float("nan"))
            try:
                u_kernel(rows, ctas)
                torch.cuda.synchronize()
            except Exception as exc:
                chk[key] = repr(exc)
                continue
            got = buf[:rows, d : d + r]
            chk[key] = {
                "unwritten": int(torch.isnan(got.float()).sum()),
                "mismatch_vs_cublas": int((got != u_cb[:rows]).sum()),
                "mismatch_vs_rounded_f64": int((got != u_ref[:rows]).sum()),
                "max_rel_err_vs_f64": float(
                    ((got.double() - u64[:rows]).abs() / u64[:rows].abs().clamp_min(1e-30)).max()
                ),
                "untouched_rows_nan": int(torch.isnan(buf[rows:, d : d + r].float()).sum()) if rows < m else 0,
            }
    # small odd shapes and float16: u of the kernel against float64
    for dt, (mm, dd, rr) in (("bfloat16", (37, 264, 3)), ("float16", (300, 1024, 16)), ("float16", (5, 8, 1))):
        tdt = getattr(torch, dt)
        xs = torch.randn(mm, dd, device="cuda", dtype=tdt)
        As = torch.randn(rr, dd, device="cuda", dtype=tdt) / 8
        ps = G.pack(
            torch.randn(24, dd, device="cuda", dtype=tdt), As, torch.randn(24, rr, device="cuda", dtype=tdt), 0.5
        )
        bs = G.workspace(ps, mm)
        bs[:, :dd].copy_(xs)
        bs[:, dd : dd + rr].fill_(float("nan"))
        set_shape(SHAPES[0])
        u_pass(ps, bs.data_ptr(), As.data_ptr(), mm)
        torch.cuda.synchronize()
        got = bs[:, dd : dd + rr].double()
        ref = 0.5 * (xs.double() @ As.double().T)
        chk[f"{dt}_{mm}x{dd}_r{rr}"] = {
            "unwritten": int(torch.isnan(got).sum()),
            "mismatch_vs_rounded_f64": int((bs[:, dd : dd + rr] != ref.to(tdt)).sum()),
            "max_abs_err_over_sum_abs": float(
                ((got - ref).abs() / (0.5 * xs.double().abs() @ As.double().abs().T)).max()
            ),
            "pad_cols_zero": bool((bs[:, dd + rr :] == 0).all()),
        }
    # the whole forward against a torch float32 product of the same operands
    set_shape(SHAPES[0])
    y4 = forward_kernel_u(packed, buf, torch.empty_like(y), chunks=4)
    y1 = forward_kernel_u(packed, buf, torch.empty_like(y), chunks=1)
    yr = (x.float() @ W.float().T + u_ref.float() @ B.float().T).to(torch.bfloat16)
    chk["forward_chunks4_equals_chunks1"] = bool((y4 == y1).all())
    chk["forward_rel_err_vs_torch_f32"] = float((y1.float() - yr.float()).norm() / yr.float().norm())
    print(json.dumps(chk, indent=1))

    # ---- timings
    fig["base_gemm_torch_s"] = t_base = gpu_time(lambda i: torch.matmul(x, W.T, out=y))
    fig["main_gemm_kpad_m4096_s"] = gpu_time(lambda i: main_gemm(0, m))
    fig["u_cublas_m4096_s"] = gpu_time(lambda i: u_cublas())
    fig["old_path_cublas_u_then_main_s"] = gpu_time(lambda i: (u_cublas(), main_gemm(0, m)))
    if args.sweep:
        for rows in (2048, 1024, 512):
            fig[f"main_gemm_kpad_m{rows}_s"] = gpu_time(lambda i, rows=rows: main_gemm(0, rows))
        for c in (2, 4):
            step = m // c
            fig[f"main_gemm_kpad_{c}chunks_s"] = gpu_time(
                lambda i, c=c, step=step: [main_gemm(k * step, (k + 1) * step) for k in range(c)]
            )
    for shape in SHAPES:
        tag = f"w{shape[0]}_st{shape[1]}"
        try:
            set_shape(shape)
            fig[f"u_kernel_{tag}_m4096_s"] = gpu_time(lambda i: u_kernel())
            fig[f"forward_{tag}_chunks1_s"] = gpu_time(lambda i: forward_kernel_u(packed, buf, y))
        except Exception as exc:
            fig[f"error_{tag}"] = repr(exc)
            print("error", tag, repr(exc))
    set_shape(SHAPES[0])
    for chunks in (2, 4):
        fig[f"forward_w{SHAPES[0][0]}_st{SHAPES[0][1]}_chunks{chunks}_s"] = gpu_time(
            lambda i, c=chunks: forward_kernel_u(packed, buf, y, chunks=c)
        )
    # ---- the main GEMM through cublasLt: every algorithm the heuristic offers, at K = 4096 and K_pad choices
    try:
        if not args.sweep:
            raise RuntimeError("not asked for (--sweep)")
        lt = Lt()
        for k in (4096, 4112, 4128, 4160):
            xk = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            wk = torch.randn(n_out, k, device="cuda", dtype=torch.bfloat16) / 64
            for sm_target in (0, 128):
                plans = lt.plans(m, n_out, k, k, sm_target=sm_target)
                for j, plan in enumerate(plans):
                    key = f"lt_k{k}_sm{sm_target}_algo{j}"
                    try:
                        fig[key + "_s"] = gpu_time(
                            lambda i, plan=plan, xk=xk, wk=wk: lt.run(plan, xk.data_ptr(), wk.data_ptr(), yp)
                        )
                        fig[key + "_waves"] = float(plan[4].waves)
                    except Exception as exc:
                        fig[key + "_error"] = repr(exc)
            del xk, wk
    except Exception as exc:
        fig["lt_error"] = repr(exc)
        print("cublasLt:", repr(exc))
    fwd = {k: v for k, v in fig.items() if k.startswith("forward_")}
    best = min(fwd, key=fwd.get)
    fig["best_forward"] = best
    fig["best_forward_over_base"] = fwd[best] / t_base
    # ---- DoRA with the best setting
    parts = best.split("_")
    set_shape((int(parts[1][1:]), int(parts[2][2:])))
    chunks = int(parts[3][6:])
    mag = (W.float().norm(dim=1) * 1.1).contiguous()
    bias = torch.randn(n_out, device="cuda", dtype=torch.bfloat16)
    pd_ = G.pack(W, A, B, s, magnitude=mag, bias=bias)
    bufd = G.workspace(pd_, m)
    bufd[:, :d].copy_(x)
    fig["dora_best_setting_s"] = gpu_time(lambda i: forward_kernel_u(pd_, bufd, y, chunks=chunks))
    fig["dora_best_setting_over_base"] = fig["dora_best_setting_s"] / t_base
    fig["lora_best_again_s"] = gpu_time(lambda i: forward_kernel_u(packed, buf, y, chunks=chunks))
    # lora_gemm's own forward (u by cuBLAS)
    fig["lora_cublas_u_chunks1_s"] = gpu_time(lambda i: G.forward_packed(packed, buf, chunks=1, out=y))
    fig["dora_cublas_u_chunks1_s"] = gpu_time(lambda i: G.forward_packed(pd_, bufd, chunks=1, out=y))
    fig["base_gemm_again_s"] = gpu_time(lambda i: torch.matmul(x, W.T, out=y))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu-h200-lora-probe.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=float)
    for k, v in fig.items():
        print(f"{k:48s} {v * 1e6:9.2f} us" if isinstance(v, float) and v < 1e-2 else f"{k:48s} {v}")


if __name__ == "__main__":
    main()
