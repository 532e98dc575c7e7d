"""Fused 4-bit dequantize-GEMV/GEMM, the QLoRA forward and backward (Dettmers et al., arXiv 2305.14314, eq. 5).

    Y = X · doubleDequant(c1, c2, W_4bit)ᵀ + b + s · (drop(X) Aᵀ) Bᵀ

The base weight is never materialised: each output row n decodes its K weights from the packed
nibbles through a 16-entry table per block, tbl[j] = RNE_dtype(f32(code[j] · absmax_b)) — exactly
the reference's dequantized values, so only the order of the float64 sum differs.

The backward's base term ∂L/∂x ⊇ g Ŵ (``dequant_matmul_t``): for fewer than 4 rows of g, one pass over the
packed weight, columns split over threads, each weight decoded and multiplied into dx at once; from 4 rows on,
tiles of decoded weight rows (float64, the same exact values; up to 32 MiB a tile) and g[:, tile] · tile with
BLAS. A large (out, in) weight is never formed whole.

The forward dispatches on m, the number of rows of x (``forward_path``):

* AVX2 host, every row of W a whole number of blocks (k_in % bs == 0, bs % 16 == 0):
  - m = 1: one parallel pass over the rows of W. Per block the table is formed in two 8-lane
    float32 vectors and looked up eight nibbles at a time with ``vpermps`` (AVX2 has no 16-entry
    float permute, so two 8-entry permutes and a select on the nibble's bit 3), widened to float64
    and multiplied by x; the products accumulate in 16 float64 lanes (lane l holds the weights
    k ≡ l mod 16 of the row) summed in a fixed tree at the end: the order is fixed and
    thread-independent. The nested absmax (double quantization) is decoded inside the same pass,
    so a call is one hand-off to the worker threads.
  - 2 ≤ m < ``FUSED_MAX_ROWS``: the blocked GEMM. Each thread decodes 8 rows of W at a time with the
    same lookup into a float32 buffer (the exact values, 128 KiB at in = 4096) and dots them with
    the rows of x, 4 rows of x × 2 rows of W per pass (16 accumulator vectors), each dot in the
    GEMV's lane order: every output equals the m = 1 kernel's bit for bit, whatever m.
  - m ≥ ``FUSED_MAX_ROWS``: dequantize-then-matmul: tiles of ``FORWARD_TILE_ELEMENTS`` decoded
    float64 values (2 MiB: in cache when BLAS reads them) through BLAS ``dgemm``.
* otherwise (no AVX2, or blocks straddling rows): m = 1 (whole blocks) or m < 4 the scalar
  kernels (rows decoded into a float64 buffer, eight interleaved float64 partial sums); m ≥ 4
  tiles of 256 decoded rows through BLAS.

Why the threshold on m (measured by bench/cpu_qlora.py, bench/README.md): per weight the fused path
reads half a byte once and does m float64 multiply-then-adds in numba (no FMA: the stated order is
exact mul, then add), so its time grows as m·N·K; dequantize-then-matmul pays one decode and a
float64 tile write and read per weight (cache-resident tiles), then BLAS's FMA kernels run 3–4× the
fused rate per product. Both costs scale with N·K, so the crossover depends on m alone, not on the
weight's size: m* ≈ (decode + tile traffic per weight) / (fused − BLAS time per product). On the
2-core AVX-512 host at 4096²: fused ≈ 5 ms + 1.3 ms per row of x, tiles ≈ 24 ms + 0.3 ms per row,
m* ≈ 19 (measured: m = 16 fused 25 ms / tiles 28 ms, m = 32 39 ms / 28 ms). The float32 ``sgemm`` of
the issue's unfused baseline is not an option for the kernel: its float32 sum is about 10⁴ times
outside the float64 bound below.

Why not a per-call byte table T[j, b] = code[b >> 4]·x[2j] + code[b & 15]·x[2j+1] shared by all
rows with the absmax factored out of each block sum: it computes x·(code·absmax)ᵀ, not x·Ŵᵀ with
Ŵ = RNE_dtype(f32(code·absmax)); the difference Σ x·(Ŵ − code·absmax) is up to u_dtype·Σ|x·Ŵ|
(2⁻²⁴ for float32, 2⁻⁹ for bfloat16 states): at K = 4096 about 10⁵ and 10⁹ times the float64
bound below, so the
kernel would no longer compute the reference's function.

The reference (``refimpl.qlora.forward``) sums in BLAS order, so the two agree within
2·γ_K(float64)·Σ|x·w| (``precision.matmul_error_bound`` with float64): both are a float64 sum of
the same K exact products (each x·Ŵ is one rounding), each within γ_K·Σ|x·Ŵ| of the exact sum.
"""

from __future__ import annotations

from typing import Any

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from scipy.linalg import blas

from refimpl import _checks
from refimpl._linear_operands import adapter_operands, layer_input
from refimpl.kernels.numba_cpu import _quant_kernels as K
from refimpl.kernels.numba_cpu import quant as nquant
from refimpl.kernels.numba_cpu._bits import bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16
from refimpl.kernels.numba_cpu._parallel import parallel_ranges
from refimpl.kernels.numba_cpu.lora import lora_branch_add
from refimpl.qlora import QLoraGrads
from refimpl.quant import QuantState


@njit(cache=True, inline="always")
def _round_kind(v, kind):
    """float32 v rounded to the state's dtype (fp16/bf16, RNE) and widened to float64."""
    if kind == K.KIND_BF16:
        return np.float64(bf16_to_f32(f32_to_bf16(v)))
    if kind == K.KIND_F16:
        return np.float64(f16_to_f32(f32_to_f16(v)))
    return np.float64(v)


@njit(cache=True, inline="always")
def _dot8(x, i, w, k):
    """Σ_j x[i, j] · w[j] over j < k with 8 interleaved float64 partial sums."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    j = 0
    while j + 8 <= k:
        a0 += x[i, j] * w[j]
        a1 += x[i, j + 1] * w[j + 1]
        a2 += x[i, j + 2] * w[j + 2]
        a3 += x[i, j + 3] * w[j + 3]
        a4 += x[i, j + 4] * w[j + 4]
        a5 += x[i, j + 5] * w[j + 5]
        a6 += x[i, j + 6] * w[j + 6]
        a7 += x[i, j + 7] * w[j + 7]
        j += 8
    while j < k:
        a0 += x[i, j] * w[j]
        j += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


def _avx2_host() -> bool:
    """True when numba compiles for this host (the default) and the host has AVX2 (``vpermps``)."""
    cpu_name = numba.config.CPU_NAME  # type: ignore[attr-defined]  # numba.config's options are set at import time
    return cpu_name in (None, "host") and "avx2" in llvm.get_host_cpu_features().flatten()


#: The vectorised GEMV kernel below is used when this is true (else the scalar kernel).
AVX2 = _avx2_host()


class _NibbleTable:
    """Codegen shared by the AVX2 row kernels: per block, the 16-entry table code · absmax as two float32 <8>
    vectors (the same IEEE product as the scalar code), rounded to bfloat16 (RNE on the bits: the values are
    finite) or float16 (fptrunc/fpext, IEEE RNE) by kind; per four packed bytes, their eight nibbles (high
    nibble first) looked up through two ``vpermps`` and a select on bit 3."""

    I32, I64 = ir.IntType(32), ir.IntType(64)
    F32X8, I32X8 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(ir.IntType(32), 8)

    def __init__(self, builder: Any, code_data: Any, kind_v: Any) -> None:
        self.builder = builder
        self.permps = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(self.F32X8, [self.F32X8, self.I32X8]), "llvm.x86.avx2.permps"
        )
        self.code_lo = builder.load(self._ptr(code_data, 0, self.F32X8), align=4)
        self.code_hi = builder.load(self._ptr(code_data, 8, self.F32X8), align=4)
        self.is_bf16 = builder.icmp_signed("==", kind_v, ir.Constant(kind_v.type, K.KIND_BF16))
        self.is_f16 = builder.icmp_signed("==", kind_v, ir.Constant(kind_v.type, K.KIND_F16))

    def _ptr(self, data: Any, index: Any, ty: Any) -> Any:
        if isinstance(index, int):
            index = ir.Constant(self.I64, index)
        return self.builder.bitcast(self.builder.gep(data, [index]), ty.as_pointer())

    def _splat(self, ty: Any, v: int) -> Any:
        return ir.Constant(ty, [v] * ty.count)

    def _round_kind(self, t: Any) -> Any:
        b, i32x8 = self.builder, self.I32X8
        bits = b.bitcast(t, i32x8)
        odd = b.and_(b.lshr(bits, self._splat(i32x8, 16)), self._splat(i32x8, 1))
        bf = b.and_(b.add(b.add(bits, self._splat(i32x8, 0x7FFF)), odd), self._splat(i32x8, -65536))
        f16 = b.fpext(b.fptrunc(t, ir.VectorType(ir.HalfType(), 8)), self.F32X8)
        return b.select(self.is_bf16, b.bitcast(bf, self.F32X8), b.select(self.is_f16, f16, t))

    def block(self, scale: Any) -> tuple[Any, Any]:
        """The block's table (low and high halves) for its float32 scale."""
        b = self.builder
        sv = b.insert_element(ir.Constant(self.F32X8, None), scale, ir.Constant(self.I32, 0))
        sv = b.shuffle_vector(sv, sv, ir.Constant(self.I32X8, [0] * 8))
        return self._round_kind(b.fmul(self.code_lo, sv)), self._round_kind(b.fmul(self.code_hi, sv))

    def decode8(self, table: tuple[Any, Any], packed_data: Any, byte: Any) -> Any:
        """The eight weights of packed bytes [byte, byte + 4), a float32 <8>."""
        b, i32x8 = self.builder, self.I32X8
        raw = b.load(self._ptr(packed_data, byte, ir.VectorType(ir.IntType(8), 4)), align=1)
        w4 = b.zext(raw, ir.VectorType(self.I32, 4))
        w8 = b.shuffle_vector(w4, w4, ir.Constant(i32x8, [0, 0, 1, 1, 2, 2, 3, 3]))
        nib = b.and_(b.lshr(w8, ir.Constant(i32x8, [4, 0] * 4)), self._splat(i32x8, 15))
        lo = b.call(self.permps, [table[0], nib])
        hi = b.call(self.permps, [table[1], nib])
        return b.select(b.icmp_unsigned(">", nib, self._splat(i32x8, 7)), hi, lo)


@intrinsic
def _row_dot_avx2(typingctx, code, scales, packed, pbase, x, nblk, bs, kind):
    """Σ_k x[k] · Ŵ[k] over one row of nblk blocks of bs weights (bs % 16 == 0), float64.

    Ŵ[k] = RNE_kind(f32(code[nib_k] · scales[k // bs])); the row's bytes start at packed[pbase].
    Per block: tbl = code · absmax in two float32 <8> vectors (the same IEEE product as the scalar
    code), rounded to bfloat16 (RNE on the bits: the values are finite) or float16 (fptrunc/fpext,
    IEEE RNE) by kind. Per four bytes: eight nibbles (high nibble first) index the table through
    two ``vpermps`` and a select on bit 3; the values are widened to float64 and multiplied by x.
    Two <8 x double> accumulators take alternate groups of eight, so lane l of the 16 holds
    the weights k ≡ l (mod 16); the 16 lanes are summed in a fixed tree.
    """
    sig = types.float64(code, scales, packed, pbase, x, nblk, bs, kind)

    def codegen(context, builder, signature, args):
        code_v, scales_v, packed_v, pbase_v, x_v, nblk_v, bs_v, kind_v = args
        code_a = context.make_array(signature.args[0])(context, builder, code_v)
        scales_a = context.make_array(signature.args[1])(context, builder, scales_v)
        packed_a = context.make_array(signature.args[2])(context, builder, packed_v)
        x_a = context.make_array(signature.args[4])(context, builder, x_v)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        f64x8 = ir.VectorType(ir.DoubleType(), 8)

        def vload(ptr, index, ty, align):
            return builder.load(builder.bitcast(builder.gep(ptr, [index]), ty.as_pointer()), align=align)

        nt = _NibbleTable(builder, code_a.data, kind_v)
        zero = ir.Constant(f64x8, [0.0] * 8)
        acc0 = cgutils.alloca_once_value(builder, zero)
        acc1 = cgutils.alloca_once_value(builder, zero)
        half_bs = builder.lshr(bs_v, ir.Constant(i64, 1))
        npairs = builder.lshr(bs_v, ir.Constant(i64, 4))  # groups of 16 weights (8 bytes) per block
        with cgutils.for_range(builder, nblk_v) as blk:
            table = nt.block(builder.load(builder.gep(scales_a.data, [blk.index])))
            byte0 = builder.add(pbase_v, builder.mul(blk.index, half_bs))
            k0 = builder.mul(blk.index, bs_v)
            with cgutils.for_range(builder, npairs) as pair:
                for half, acc in ((0, acc0), (1, acc1)):
                    q = builder.add(builder.mul(pair.index, ir.Constant(i64, 2)), ir.Constant(i64, half))
                    w = nt.decode8(table, packed_a.data, builder.add(byte0, builder.mul(q, ir.Constant(i64, 4))))
                    xv = vload(x_a.data, builder.add(k0, builder.mul(q, ir.Constant(i64, 8))), f64x8, 8)
                    prod = builder.fmul(builder.fpext(w, f64x8), xv)
                    builder.store(builder.fadd(builder.load(acc), prod), acc)
        total = builder.fadd(builder.load(acc0), builder.load(acc1))
        lane = [builder.extract_element(total, ir.Constant(i32, j)) for j in range(8)]
        return builder.fadd(
            builder.fadd(builder.fadd(lane[0], lane[1]), builder.fadd(lane[2], lane[3])),
            builder.fadd(builder.fadd(lane[4], lane[5]), builder.fadd(lane[6], lane[7])),
        )

    return sig, codegen


@njit(cache=True, nogil=True, fastmath=False)
def _gemv_avx2_rows(x, packed, absmax, qcodes, absmax2, offset, dyn, nested, n_out, k_in, bs, code, kind, y, lo, hi):
    """Output features [lo, hi) of ``dequant_gemv_avx2_kernel``."""
    nblk = k_in // bs
    sc = np.empty(nblk, dtype=np.float32)
    for n in range(lo, hi):
        b0 = n * nblk
        if nested:
            for bb in range(nblk):
                b = b0 + bb
                sc[bb] = dyn[qcodes[b]] * absmax2[b // 256] + offset
        else:
            for bb in range(nblk):
                sc[bb] = absmax[b0 + bb]
        for i in range(x.shape[0]):
            y[i, n] = _row_dot_avx2(code, sc, packed, (n * k_in) >> 1, x[i], nblk, bs, kind)


def dequant_gemv_avx2_kernel(x, packed, absmax, qcodes, absmax2, offset, dyn, nested, n_out, k_in, bs, code, kind, y):
    """y[i, n] = Σ_k x[i, k] · Ŵ[n, k] for every row i of x (few rows), k_in % bs == 0, bs % 16 == 0.

    nested: the block scales are f32(f32(dyn[qcodes_b] · absmax2[b // 256]) + offset) (decoded here,
    as ``quant.dequantize_absmax_8bit``), else absmax[b]."""
    parallel_ranges(
        _gemv_avx2_rows, n_out, x, packed, absmax, qcodes, absmax2, offset, dyn, nested, n_out, k_in, bs, code, kind, y
    )


@intrinsic
def _decode_row_avx2(typingctx, code, scales, packed, pbase, nblk, bs, kind, w, wbase):
    """w[wbase + k] = Ŵ[k] (exact, in w's dtype: float32 or float64) for one row of nblk blocks of bs weights
    (bs % 16 == 0) whose bytes start at packed[pbase]: the table lookup of ``_row_dot_avx2`` (two ``vpermps``
    and a select on bit 3, the table rounded to the state's dtype in the vector), stored, not multiplied."""
    sig = types.void(code, scales, packed, pbase, nblk, bs, kind, w, wbase)

    def codegen(context, builder, signature, args):
        code_v, scales_v, packed_v, pbase_v, nblk_v, bs_v, kind_v, w_v, wbase_v = args
        code_a = context.make_array(signature.args[0])(context, builder, code_v)
        scales_a = context.make_array(signature.args[1])(context, builder, scales_v)
        packed_a = context.make_array(signature.args[2])(context, builder, packed_v)
        w_a = context.make_array(signature.args[7])(context, builder, w_v)
        i64 = ir.IntType(64)
        f32x8 = ir.VectorType(ir.FloatType(), 8)
        out_ty = f32x8 if signature.args[7].dtype == types.float32 else ir.VectorType(ir.DoubleType(), 8)

        def vptr(ptr, index, ty):
            return builder.bitcast(builder.gep(ptr, [index]), ty.as_pointer())

        nt = _NibbleTable(builder, code_a.data, kind_v)
        half_bs = builder.lshr(bs_v, ir.Constant(i64, 1))
        groups = builder.lshr(bs_v, ir.Constant(i64, 3))  # groups of 8 weights (4 bytes) per block
        with cgutils.for_range(builder, nblk_v) as blk:
            table = nt.block(builder.load(builder.gep(scales_a.data, [blk.index])))
            byte0 = builder.add(pbase_v, builder.mul(blk.index, half_bs))
            k0 = builder.add(wbase_v, builder.mul(blk.index, bs_v))
            with cgutils.for_range(builder, groups) as grp:
                q = grp.index
                val = nt.decode8(table, packed_a.data, builder.add(byte0, builder.mul(q, ir.Constant(i64, 4))))
                dst = vptr(w_a.data, builder.add(k0, builder.mul(q, ir.Constant(i64, 8))), out_ty)
                builder.store(val if out_ty == f32x8 else builder.fpext(val, out_ty), dst, align=4)
        return context.get_dummy_value()

    return sig, codegen


#: Rows of x and of decoded W that ``_dot_block_avx2`` takes at once (its 4 x 2 dot products keep
#: 16 <8 x double> accumulators: the 32 registers of AVX-512, spilled in part on AVX2).
_BLOCK_X, _BLOCK_W = 4, 2
#: Rows of W decoded into the float32 buffer per tile (8 x in x 4 bytes: 128 KiB at in = 4096, in L2).
_DECODED_ROWS = 8


@intrinsic
def _dot_block_avx2(typingctx, x, rows, w, wbase, k, out):
    """out[2j + v] = Σ_k x[rows[j], k] · w[wbase + v·k_in + k] for j < 4, v < 2 (k_in % 16 == 0), each dot in the
    order of ``_row_dot_avx2`` (lane l of 16 sums k ≡ l mod 16 in increasing k; lanes l, l + 8 added;
    then the tree ((0+1)+(2+3))+((4+5)+(6+7))), so every output equals the GEMV kernel's bit for bit.
    w holds float32 (exact) weights widened in the register; x float64 (m, k_in) C-contiguous."""
    sig = types.void(x, rows, w, wbase, k, out)

    def codegen(context, builder, signature, args):
        x_v, rows_v, w_v, wbase_v, k_v, out_v = args
        x_a = context.make_array(signature.args[0])(context, builder, x_v)
        rows_a = context.make_array(signature.args[1])(context, builder, rows_v)
        w_a = context.make_array(signature.args[2])(context, builder, w_v)
        out_a = context.make_array(signature.args[5])(context, builder, out_v)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        f32x8, f64x8 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(ir.DoubleType(), 8)
        xrow = []
        for j in range(_BLOCK_X):
            r = builder.load(builder.gep(rows_a.data, [ir.Constant(i64, j)]))
            xrow.append(builder.gep(x_a.data, [builder.mul(r, k_v)]))
        zero = ir.Constant(f64x8, [0.0] * 8)
        acc = [
            [[cgutils.alloca_once_value(builder, zero) for _ in range(2)] for _ in range(_BLOCK_W)]
            for _ in range(_BLOCK_X)
        ]
        npairs = builder.lshr(k_v, ir.Constant(i64, 4))
        with cgutils.for_range(builder, npairs) as pair:
            for half in range(2):
                off = builder.add(builder.mul(pair.index, ir.Constant(i64, 16)), ir.Constant(i64, 8 * half))
                wv = []
                for v in range(_BLOCK_W):
                    v_off = builder.add(wbase_v, builder.mul(k_v, ir.Constant(i64, v)))
                    p = builder.gep(w_a.data, [builder.add(off, v_off)])
                    wv.append(builder.fpext(builder.load(builder.bitcast(p, f32x8.as_pointer()), align=4), f64x8))
                for j in range(_BLOCK_X):
                    xv = builder.load(builder.bitcast(builder.gep(xrow[j], [off]), f64x8.as_pointer()), align=8)
                    for v in range(_BLOCK_W):
                        a = acc[j][v][half]
                        builder.store(builder.fadd(builder.load(a), builder.fmul(wv[v], xv)), a)
        for j in range(_BLOCK_X):
            for v in range(_BLOCK_W):
                total = builder.fadd(builder.load(acc[j][v][0]), builder.load(acc[j][v][1]))
                lane = [builder.extract_element(total, ir.Constant(i32, t)) for t in range(8)]
                s = builder.fadd(
                    builder.fadd(builder.fadd(lane[0], lane[1]), builder.fadd(lane[2], lane[3])),
                    builder.fadd(builder.fadd(lane[4], lane[5]), builder.fadd(lane[6], lane[7])),
                )
                builder.store(s, builder.gep(out_a.data, [ir.Constant(i64, _BLOCK_W * j + v)]))
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, fastmath=False)
def _gemm_avx2_rows(x, packed, absmax, qcodes, absmax2, offset, dyn, nested, n_out, k_in, bs, code, kind, y, lo, hi):
    """Output features [lo, hi) of ``dequant_gemm_avx2_kernel``: _DECODED_ROWS rows of W decoded at a time,
    then each block of _BLOCK_X rows of x dotted with them _BLOCK_W rows at a time (x read once per tile)."""
    m = x.shape[0]
    nblk = k_in // bs
    sc = np.empty(nblk, dtype=np.float32)
    w = np.zeros(_DECODED_ROWS * k_in, dtype=np.float32)
    rows = np.empty(_BLOCK_X, dtype=np.int64)
    out = np.empty(_BLOCK_X * _BLOCK_W, dtype=np.float64)
    for t0 in range(lo, hi, _DECODED_ROWS):
        nt = min(_DECODED_ROWS, hi - t0)
        for v in range(nt):
            b0 = (t0 + v) * nblk
            if nested:
                for bb in range(nblk):
                    b = b0 + bb
                    sc[bb] = dyn[qcodes[b]] * absmax2[b // 256] + offset
            else:
                for bb in range(nblk):
                    sc[bb] = absmax[b0 + bb]
            _decode_row_avx2(code, sc, packed, ((t0 + v) * k_in) >> 1, nblk, bs, kind, w, v * k_in)
        for i0 in range(0, m, _BLOCK_X):
            nx = min(_BLOCK_X, m - i0)
            for j in range(_BLOCK_X):
                rows[j] = i0 + min(j, nx - 1)  # a short last block repeats its last row (results unused)
            for v0 in range(0, nt, _BLOCK_W):
                nw = min(_BLOCK_W, nt - v0)
                # a short last group is dotted with the rows before it (or, alone, the zero rows after it)
                base = v0 if nw == _BLOCK_W or v0 < _BLOCK_W else nt - _BLOCK_W
                _dot_block_avx2(x, rows, w, base * k_in, k_in, out)
                for j in range(nx):
                    for v in range(nw):
                        y[i0 + j, t0 + v0 + v] = out[_BLOCK_W * j + v0 - base + v]


@njit(cache=True, nogil=True, fastmath=False)
def _decode_tile_avx2_rows(packed, absmax, qcodes, absmax2, offset, dyn, nested, row0, k_in, bs, code, kind, w, lo, hi):
    """w[r, :] = the dequantized row row0 + r (float64 or float32, exact) for r in [lo, hi), by the vpermps
    decoder."""
    nblk = k_in // bs
    sc = np.empty(nblk, dtype=np.float32)
    flat = w.reshape(-1)
    for r in range(lo, hi):
        b0 = (row0 + r) * nblk
        if nested:
            for bb in range(nblk):
                b = b0 + bb
                sc[bb] = dyn[qcodes[b]] * absmax2[b // 256] + offset
        else:
            for bb in range(nblk):
                sc[bb] = absmax[b0 + bb]
        _decode_row_avx2(code, sc, packed, ((row0 + r) * k_in) >> 1, nblk, bs, kind, flat, r * k_in)


def dequant_gemm_avx2_kernel(x, packed, absmax, qcodes, absmax2, offset, dyn, nested, n_out, k_in, bs, code, kind, y):
    """y = x · Ŵᵀ for 2 ≤ m < ``FUSED_MAX_ROWS`` rows of x (k_in % bs == 0, bs % 16 == 0): each pair of rows of
    W decoded once (vpermps, into a float32 buffer of 2 rows: the exact values) and dotted with the rows of x
    four at a time; every output in the GEMV kernel's summation order (independent of m and threads)."""
    parallel_ranges(
        _gemm_avx2_rows, n_out, x, packed, absmax, qcodes, absmax2, offset, dyn, nested, n_out, k_in, bs, code, kind, y
    )


@njit(cache=True, nogil=True, fastmath=False)
def _gemv_rows(x, packed, scales, n_out, k_in, bs, code, kind, y, lo, hi):
    """Output features [lo, hi) of ``dequant_gemv_kernel``."""
    nblk = k_in // bs
    xv = x[0]
    tbl = np.empty(16, dtype=np.float64)
    for n in range(lo, hi):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
        for bb in range(nblk):
            b = n * nblk + bb
            scale = scales[b]
            for j in range(16):
                tbl[j] = _round_kind(code[j] * scale, kind)
            base = (b * bs) >> 1
            k = bb * bs
            for p in range(0, bs // 2, 4):
                c0 = np.int64(packed[base + p])
                c1 = np.int64(packed[base + p + 1])
                c2 = np.int64(packed[base + p + 2])
                c3 = np.int64(packed[base + p + 3])
                kk = k + 2 * p
                a0 += tbl[c0 >> 4] * xv[kk]
                a1 += tbl[c0 & 15] * xv[kk + 1]
                a2 += tbl[c1 >> 4] * xv[kk + 2]
                a3 += tbl[c1 & 15] * xv[kk + 3]
                a4 += tbl[c2 >> 4] * xv[kk + 4]
                a5 += tbl[c2 & 15] * xv[kk + 5]
                a6 += tbl[c3 >> 4] * xv[kk + 6]
                a7 += tbl[c3 & 15] * xv[kk + 7]
        y[0, n] = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


def dequant_gemv_kernel(x, packed, scales, n_out, k_in, bs, code, kind, y):
    """m = 1, every row a whole number of blocks (k_in % bs == 0): decode and multiply in one loop,
    y[n] = Σ over the row of tbl[nib]·x with eight interleaved float64 partial sums (fixed order)."""
    parallel_ranges(_gemv_rows, n_out, x, packed, scales, n_out, k_in, bs, code, kind, y)


@njit(cache=True, nogil=True, fastmath=False)
def _matmul_rows(x, packed, scales, n_out, k_in, bs, code, kind, y, lo, hi):
    """Output features [lo, hi) of ``dequant_matmul_kernel``."""
    m = x.shape[0]
    w = np.empty(k_in, dtype=np.float64)
    tbl = np.empty(16, dtype=np.float64)
    for n in range(lo, hi):
        e0 = n * k_in
        e = e0
        e1 = e0 + k_in
        while e < e1:
            b = e // bs
            seg = min(e1, (b + 1) * bs)
            scale = scales[b]
            for j in range(16):
                tbl[j] = _round_kind(code[j] * scale, kind)
            if e % 2 == 0 and seg % 2 == 0:
                for p in range((seg - e) // 2):
                    byte = packed[(e >> 1) + p]
                    w[e - e0 + 2 * p] = tbl[byte >> 4]
                    w[e - e0 + 2 * p + 1] = tbl[byte & 15]
            else:
                for i in range(e, seg):
                    byte = np.int64(packed[i >> 1])
                    nib = (byte >> 4) if i % 2 == 0 else (byte & 15)
                    w[i - e0] = tbl[nib]
            e = seg
        for i in range(m):
            y[i, n] = _dot8(x, i, w, k_in)


def dequant_matmul_kernel(x, packed, scales, n_out, k_in, bs, code, kind, y):
    """y[i, n] = Σ_k x[i, k] · W_dq[n, k] with W_dq decoded row by row from the packed nibbles."""
    parallel_ranges(_matmul_rows, n_out, x, packed, scales, n_out, k_in, bs, code, kind, y)


@njit(cache=True, nogil=True, fastmath=False)
def _decode_rows(packed, scales, row0, n_rows, k_in, bs, code, kind, w, lo, hi):
    """Tile rows [lo, hi) of ``dequant_rows_kernel``."""
    tbl = np.empty(16, dtype=np.float64)
    for r in range(lo, hi):
        e0 = (row0 + r) * k_in
        e = e0
        e1 = e0 + k_in
        while e < e1:
            b = e // bs
            seg = min(e1, (b + 1) * bs)
            scale = scales[b]
            for j in range(16):
                tbl[j] = _round_kind(code[j] * scale, kind)
            for i in range(e, seg):
                byte = np.int64(packed[i >> 1])
                nib = (byte >> 4) if i % 2 == 0 else (byte & 15)
                w[r, i - e0] = tbl[nib]
            e = seg


def dequant_rows_kernel(packed, scales, row0, n_rows, k_in, bs, code, kind, w):
    """w[r, :] = the dequantized row row0 + r of the (n_out, k_in) weight, float64 (exact values)."""
    parallel_ranges(_decode_rows, n_rows, packed, scales, row0, n_rows, k_in, bs, code, kind, w)


#: From this many rows of x on, the product runs as BLAS GEMMs over tiles of decoded weight rows
#: (each tile is _TILE_ROWS x in float64), which beats the row-at-a-time dot products.
GEMM_MIN_ROWS = 4
_TILE_ROWS = 256


#: Below this many rows of x (AVX2 host, whole blocks per row) the fused kernels run; from here on the
#: decoded tiles through BLAS (the crossover measured by bench/cpu_qlora.py; see the module docstring).
FUSED_MAX_ROWS = 20
#: The AVX2 forward's dequantize-then-matmul tiles hold this many float64 values (2 MiB: the decoded
#: tile is still in cache when BLAS reads it, and no fresh 32 MiB buffer is faulted in per call).
FORWARD_TILE_ELEMENTS = 1 << 18


def forward_path(m: int, state: QuantState) -> str:
    """The kernel ``dequant_matmul`` runs for m rows of x: "avx2" (fused: GEMV at m = 1, the blocked GEMM
    below ``FUSED_MAX_ROWS``), "avx2 tiles+BLAS" (from ``FUSED_MAX_ROWS`` on: vpermps-decoded float64 tiles
    through BLAS), "scalar" (fused, no AVX2 or blocks straddling rows, m < ``GEMM_MIN_ROWS``) or
    "tiles+BLAS" (the scalar decoder's float64 row tiles through BLAS)."""
    k_in = state.shape[-1]
    if AVX2 and k_in % state.blocksize == 0 and state.blocksize % 16 == 0:
        return "avx2" if m < FUSED_MAX_ROWS else "avx2 tiles+BLAS"
    return "scalar" if m < GEMM_MIN_ROWS else "tiles+BLAS"


_NO_U8 = np.zeros(1, dtype=np.uint8)
_NO_F32 = np.zeros(1, dtype=np.float32)


def _avx2_scales(state: QuantState) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.float32, bool]:
    """(absmax, 8-bit codes, nested absmax, offset, nested) for the AVX2 kernels, which decode nested
    statistics (blocks of 256) themselves; the unused arrays are placeholders."""
    n_out, k_in = state.shape
    nblocks = n_out * k_in // state.blocksize
    if state.nested and state.nested_blocksize == nquant.NESTED_BLOCKSIZE:
        q = np.ascontiguousarray(state.absmax, dtype=np.uint8).reshape(-1)
        a2 = np.ascontiguousarray(state.nested_absmax, dtype=np.float32).reshape(-1)
        if q.size != nblocks or a2.size != -(-nblocks // nquant.NESTED_BLOCKSIZE):
            raise ValueError(
                f"state: expected {nblocks} 8-bit absmax codes and "
                f"{-(-nblocks // nquant.NESTED_BLOCKSIZE)} nested absmax values, got {q.size} and "
                f"{a2.size}"
            )
        return _NO_F32, q, a2, np.float32(state.offset), True
    scales = nquant.block_scales(state)
    if scales.size != nblocks:
        raise ValueError(f"state: expected {nblocks} absmax values, got {scales.size}")
    return scales, _NO_U8, _NO_F32, np.float32(0.0), False


def _gemv_avx2(x2: np.ndarray, flat: np.ndarray, state: QuantState, code: np.ndarray, kind: int, y: np.ndarray) -> None:
    """The fused AVX2 kernels on validated arrays: m = 1 the GEMV, else the blocked GEMM."""
    kernel = dequant_gemv_avx2_kernel if x2.shape[0] == 1 else dequant_gemm_avx2_kernel
    n_out, k_in = state.shape
    absmax, q, a2, offset, nested = _avx2_scales(state)
    kernel(x2, flat, absmax, q, a2, offset, nquant.DYNAMIC8, nested, n_out, k_in, state.blocksize, code, kind, y)


def _tiles_avx2(x2: np.ndarray, flat: np.ndarray, state: QuantState, code: np.ndarray, kind: int, y: Any) -> None:
    """y = x · Ŵᵀ through BLAS over tiles of rows of Ŵ (float64, exact) decoded by the vpermps decoder on the
    calling thread; a tile holds up to ``BACKWARD_TILE_ELEMENTS`` values (few hand-offs to BLAS)."""
    n_out, k_in = state.shape
    absmax, q, a2, offset, nested = _avx2_scales(state)
    step = max(1, FORWARD_TILE_ELEMENTS // max(k_in, 1))
    tile = np.empty((min(step, n_out), k_in), dtype=np.float64)
    for lo in range(0, n_out, step):
        rows = min(step, n_out - lo)
        # decoded on this thread alone: BLAS's worker threads keep spinning for a while after each product
        # and a second decoding thread would compete with them for the cores
        _decode_tile_avx2_rows(
            flat, absmax, q, a2, offset, nquant.DYNAMIC8, nested, lo, k_in, state.blocksize, code, kind, tile, 0, rows
        )
        y[:, lo : lo + rows] = x2 @ tile[:rows].T


def _weight_operands(packed: Any, state: Any) -> np.ndarray:
    """The checks of a 2-D 4-bit weight (the reference's messages); returns the packed bytes, flat."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state: expected a refimpl.quant.QuantState, got {_checks.describe(state)}")
    if len(state.shape) != 2:
        raise ValueError(f"state: expected a 2-D (out_features, in_features) weight, got shape {state.shape}")
    p = np.asarray(packed)
    if p.dtype != np.uint8:
        raise TypeError(f"packed: expected uint8 packed codes, got {_checks.describe(p)}")
    if p.size != (state.n + 1) // 2:
        raise ValueError(
            f"packed: state describes shape {state.shape} ({(state.n + 1) // 2} bytes), got {p.size} bytes"
        )
    return np.ascontiguousarray(p).reshape(-1)


def dequant_matmul(x: Any, packed: Any, state: QuantState, *, profile: str | None = None) -> np.ndarray:
    """x · dequantize_4bit(packed, state)ᵀ in float64 without forming the (out, in) weight.

    x: (..., in) of any float dtype (used exactly); state: a 2-D (out, in) weight.
    """
    _weight_operands(packed, state)
    n_out, k_in = state.shape
    x_arr = layer_input(x, k_in)
    p = np.asarray(packed)
    x2 = np.ascontiguousarray(x_arr.reshape(-1, k_in))
    y = np.empty((x2.shape[0], n_out), dtype=np.float64)
    kind = K.KIND_OF_DTYPE.get(state.dtype, K.KIND_F32)  # float64 states hold float32 values
    flat = np.ascontiguousarray(p).reshape(-1)
    code = nquant.code_table(state, profile)
    path = forward_path(x2.shape[0], state)
    if path == "avx2":
        _gemv_avx2(x2, flat, state, code, kind, y)
        return y.reshape(*x_arr.shape[:-1], n_out)
    if path == "avx2 tiles+BLAS":
        _tiles_avx2(x2, flat, state, code, kind, y)
        return y.reshape(*x_arr.shape[:-1], n_out)
    scales = nquant.block_scales(state)
    if x2.shape[0] == 1 and k_in % state.blocksize == 0:
        dequant_gemv_kernel(x2, flat, scales, n_out, k_in, state.blocksize, code, kind, y)
    elif x2.shape[0] < GEMM_MIN_ROWS:
        dequant_matmul_kernel(x2, flat, scales, n_out, k_in, state.blocksize, code, kind, y)
    else:
        tile = np.empty((min(_TILE_ROWS, n_out), k_in), dtype=np.float64)
        for lo in range(0, n_out, _TILE_ROWS):
            rows = min(_TILE_ROWS, n_out - lo)
            dequant_rows_kernel(flat, scales, lo, rows, k_in, state.blocksize, code, kind, tile)
            np.matmul(x2, tile[:rows].T, out=y[:, lo : lo + rows])
    return y.reshape(*x_arr.shape[:-1], n_out)


def forward(
    x: Any,
    packed: Any,
    state: QuantState,
    A: Any,
    B: Any,
    scaling: float,
    bias: Any = None,
    *,
    dropout_mask: Any = None,
    dropout_p: float = 0.0,
    profile: str | None = None,
) -> np.ndarray:
    """``refimpl.qlora.forward`` with the fused dequantize-matmul: y = x·W_dqᵀ + b + s·(drop(x)Aᵀ)Bᵀ."""
    y = dequant_matmul(x, packed, state, profile=profile)
    n_out, k_in = state.shape
    ops = adapter_operands(
        x,
        A,
        B,
        scaling,
        in_features=k_in,
        out_features=n_out,
        bias=bias,
        dropout_mask=dropout_mask,
        dropout_p=dropout_p,
    )
    if ops.bias is not None:
        y += ops.bias
    lora_branch_add(y, ops.x, ops.A, ops.B, ops.scaling, ops.keep)
    return y


@njit(cache=True, nogil=True, fastmath=False)
def _gemv_t_cols(g, packed, scales, n_out, k_in, bs, code, kind, dx, lo, hi):
    """Columns [lo, hi) of ``dequant_gemv_t_kernel``: for each weight row n in order, its weights k in
    [lo, hi) decoded (one scale per block segment) and dx[:, k] += g[:, n] · Ŵ[n, k]."""
    m = g.shape[0]
    for n in range(n_out):
        e = n * k_in + lo
        e1 = n * k_in + hi
        while e < e1:
            b = e // bs
            seg = min(e1, (b + 1) * bs)
            scale = scales[b]
            for i in range(e, seg):
                byte = np.int64(packed[i >> 1])
                nib = (byte >> 4) if i % 2 == 0 else (byte & 15)
                w = _round_kind(code[nib] * scale, kind)
                k = i - n * k_in
                for r in range(m):
                    dx[r, k] += g[r, n] * w
            e = seg


def dequant_gemv_t_kernel(g, packed, scales, n_out, k_in, bs, code, kind, dx):
    """dx += g · Ŵ for few rows of g without a decoded tile: columns of Ŵ split over threads, each summing the
    rows n = 0, 1, … in order (the order does not depend on the thread count)."""
    parallel_ranges(_gemv_t_cols, k_in, g, packed, scales, n_out, k_in, bs, code, kind, dx)


#: The backward's tiles of decoded weight rows hold up to this many float64 values (32 MiB), at least _TILE_ROWS
#: rows: one GEMM per tile, so larger tiles run at the speed of a single g Ŵ product (256-row tiles took 1.7x
#: its time at N = 256, in = out = 2048), with the memory of the weight still bounded.
BACKWARD_TILE_ELEMENTS = 1 << 22


def dequant_matmul_t(
    g2: np.ndarray, flat: np.ndarray, state: QuantState, code: np.ndarray, *, tile_rows: int | None = None
) -> np.ndarray:
    """g · Ŵ (N, in) for g (N, out) float64. Below ``GEMM_MIN_ROWS`` rows of g (and without ``tile_rows``): one
    pass over the packed weight (``dequant_gemv_t_kernel``); otherwise tiles of ``tile_rows`` decoded rows of Ŵ
    (default: as many as fit in ``BACKWARD_TILE_ELEMENTS``), dx += g[:, tile] · tile in order of the tiles."""
    n_out, k_in = state.shape
    kind = K.KIND_OF_DTYPE.get(state.dtype, K.KIND_F32)  # float64 states hold float32 values
    scales = nquant.block_scales(state)
    if g2.shape[0] < GEMM_MIN_ROWS and tile_rows is None:
        dx_few = np.zeros((g2.shape[0], k_in), dtype=np.float64)
        dequant_gemv_t_kernel(np.ascontiguousarray(g2), flat, scales, n_out, k_in, state.blocksize, code, kind, dx_few)
        return dx_few
    step = tile_rows or max(_TILE_ROWS, BACKWARD_TILE_ELEMENTS // max(k_in, 1))
    dx = np.zeros((g2.shape[0], k_in), dtype=np.float64)
    tile = np.empty((min(step, n_out), k_in), dtype=np.float64)
    for lo in range(0, n_out, step):
        rows = min(step, n_out - lo)
        dequant_rows_kernel(flat, scales, lo, rows, k_in, state.blocksize, code, kind, tile)
        g_tile = np.ascontiguousarray(g2[:, lo : lo + rows])
        # dxᵀ += tileᵀ · g_tileᵀ: every operand a Fortran-order view (no copies), dxᵀ written in place
        blas.dgemm(1.0, tile[:rows].T, g_tile.T, beta=1.0, c=dx.T, overwrite_c=True)
    return dx


def backward(
    x: Any,
    packed: Any,
    state: QuantState,
    A: Any,
    B: Any,
    grad_y: Any,
    scaling: float,
    *,
    dropout_mask: Any = None,
    dropout_p: float = 0.0,
    need_dbias: bool = False,
    profile: str | None = None,
) -> QLoraGrads:
    """``refimpl.qlora.backward`` (QLoRA §3) with the base term g Ŵ from decoded tiles (``dequant_matmul_t``):

    x̃ = x ⊙ keep,  h = x̃ Aᵀ,  gB = s · g B,  ∂B = s · gᵀ h,  ∂A = gBᵀ x̃,  ∂x = g Ŵ + (gB A) ⊙ keep
    """
    flat = _weight_operands(packed, state)
    if profile is not None:
        nquant.profile_name(profile)  # the reference's check of the name
    code = nquant.code_table(state, profile)
    n_out, k_in = state.shape
    ops = adapter_operands(
        x, A, B, scaling, in_features=k_in, out_features=n_out, dropout_mask=dropout_mask, dropout_p=dropout_p
    )
    g = _checks.float_array(grad_y, "grad_y", ndim=ops.x.ndim)
    _checks.check_shape(g, "grad_y", (*ops.x.shape[:-1], n_out))
    want_dbias = _checks.boolean(need_dbias, "need_dbias")
    x2 = ops.x.reshape(-1, k_in)
    g2 = np.ascontiguousarray(g.reshape(-1, n_out))
    keep = None if ops.keep is None else ops.keep.reshape(-1, k_in)
    xd = x2 if keep is None else x2 * keep  # x̃ = drop(x)
    h = xd @ ops.A.T
    gb = g2 @ ops.B
    gb *= ops.scaling  # ∂L/∂h = s · g B
    dB = g2.T @ h
    dB *= ops.scaling
    dA = gb.T @ xd
    dx = dequant_matmul_t(g2, flat, state, code)
    lora_dx = gb @ ops.A
    if keep is not None:
        lora_dx *= keep  # the LoRA branch's gradient passes through drop(·) again
    dx += lora_dx
    dbias = g2.sum(axis=0) if want_dbias else None
    return QLoraGrads(dx=dx.reshape(ops.x.shape), dA=dA, dB=dB, dbias=dbias)
