"""The compiled loops behind ``numba_cpu.quant`` (NF4/FP4 blockwise 4-bit, nested statistics).

Each kernel is one pass over its blocks: a serial ``@njit(nogil=True)`` loop over a range of blocks,
run on numba's thread count by ``_parallel.parallel_ranges`` (no ``prange``: see there why).
Arithmetic is IEEE float32 exactly as bitsandbytes 0.50.2 CPU does it
(spec/nf4.md; bitsandbytes ``backends/default/ops.py``, ``functional.py``):

    full block:  s = clamp(x · f32(1 / max(absmax, 1e-38)), −1, 1)     (reciprocal, then multiply)
    tail block:  s = clamp(x / max(absmax, 1e-38), −1, 1)              (true division; clamped absmax stored)
    code:        number of float32 midpoints strictly below s (NaN → 15), FP4 remapped by its order
    packing:     byte k = nib[2k] << 4 | nib[2k+1]; odd n padded with the code of 0.0
    dequantize:  RNE_dtype(f32(code[nib] · absmax))

Input arrays are float32, or uint16 holding fp16 (kind 1) or bf16 (kind 2) bits; one
source compiles to those two signatures only.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from refimpl.kernels.numba_cpu._bits import bf16_to_f32, bits_f32, f16_to_f32, f32_to_bf16, f32_to_f16
from refimpl.kernels.numba_cpu._parallel import parallel_ranges
from refimpl.quant.operands import ABSMAX_MIN

KIND_F32, KIND_F16, KIND_BF16 = 0, 1, 2
#: the kernels' output kind for each storage dtype name (float64 states hold float32 values)
KIND_OF_DTYPE = {"float32": KIND_F32, "float16": KIND_F16, "bfloat16": KIND_BF16}
_ONE = np.float32(1.0)


@njit(cache=True, inline="always")
def load_f32(v, kind):
    """Element of a float32 / fp16-bits / bf16-bits array as float32 (exact)."""
    if kind == KIND_BF16:
        return bf16_to_f32(v)
    if kind == KIND_F16:
        return f16_to_f32(v)
    return np.float32(v)


@njit(cache=True, inline="always")
def store_f32(out, i, v, kind):
    """Store float32 v into a float32 array, or as fp16/bf16 bits with round-to-nearest-even."""
    if kind == KIND_BF16:
        out[i] = f32_to_bf16(v)
    elif kind == KIND_F16:
        out[i] = f32_to_f16(v)
    else:
        out[i] = v


@njit(cache=True, inline="always")
def _load_block(x, start, m, kind, buf):
    """buf[:m] = x[start:start+m] as float32, with the dtype branch outside the loop."""
    if kind == KIND_BF16:
        for i in range(m):
            buf[i] = bf16_to_f32(x[start + i])
    elif kind == KIND_F16:
        for i in range(m):
            buf[i] = f16_to_f32(x[start + i])
    else:
        for i in range(m):
            buf[i] = np.float32(x[start + i])


@njit(cache=True, inline="always")
def _absmax(src, off, m):
    """max |src[off:off+m]| in float32; NaN if any element is NaN (torch's max propagates NaN)."""
    am = np.float32(0.0)
    nans = 0
    for i in range(m):
        a = abs(src[off + i])
        am = a if a > am else am
        nans += a != a
    return np.float32(np.nan) if nans else am


@njit(cache=True, inline="always")
def _block_nibbles(src, off, m, inv, amc, full, bounds, nib):
    """nib[i] = #{ j : bounds[j] < clamp(s_i, −1, 1) } with s_i = src·inv (full block) or src/amc
    (tail), NaN → 15 (``not (s <= b)`` is true for NaN). One fused pass, no branches."""
    for i in range(m):
        v = src[off + i]
        s = v * inv if full else v / amc
        s = _ONE if s > _ONE else s
        s = -_ONE if s < -_ONE else s
        q = 0
        for j in range(15):
            q += not (s <= bounds[j])
        nib[i] = q


@njit(cache=True, inline="always")
def _quantize_block(src, off, m, full, bounds, order, remap, zero_nib, nib, packed, base):
    """Quantize src[off:off+m] (float32) into packed[base:]; returns the stored absmax."""
    am = _absmax(src, off, m)
    amc = ABSMAX_MIN if am < ABSMAX_MIN else am  # clamp(min=1e-38); NaN stays NaN
    inv = _ONE / amc
    _block_nibbles(src, off, m, inv, amc, full, bounds, nib)
    nib[m] = zero_nib  # the pad of an odd n
    if remap:
        for k in range((m + 1) // 2):
            packed[base + k] = (order[nib[2 * k]] << 4) | order[nib[2 * k + 1]]
    else:
        for k in range((m + 1) // 2):
            packed[base + k] = (nib[2 * k] << 4) | nib[2 * k + 1]
    if full:
        return am
    # torch's reduction over the tail returns the NaN 0xFFFFFFFF (full blocks: 0x7FC00000)
    return amc if amc == amc else bits_f32(np.uint32(0xFFFFFFFF))


@njit(cache=True, nogil=True, fastmath=False)
def _quantize_blocks(x, kind, n, bs, bounds, order, zero_nib, packed, absmax, b0, b_lo, b_hi):
    """Blocks b0 + [b_lo, b_hi) of ``quantize_4bit_kernel`` (one thread's share); absmax starts at block b0."""
    nfull = n // bs
    remap = False
    for j in range(16):
        remap |= order[j] != j
    zero_pos = 0
    for j in range(16):
        if order[j] == zero_nib:
            zero_pos = j
    buf = np.empty(bs, dtype=np.float32)
    nib = np.empty(bs + 1, dtype=np.uint8)
    for b in range(b0 + b_lo, b0 + b_hi):
        start = b * bs
        m = min(bs, n - start)
        full = b < nfull
        if kind == KIND_F32:
            am = _quantize_block(
                x, start, m, full, bounds, order, remap, zero_pos if remap else zero_nib, nib, packed, start // 2
            )
        else:
            _load_block(x, start, m, kind, buf)
            am = _quantize_block(
                buf, 0, m, full, bounds, order, remap, zero_pos if remap else zero_nib, nib, packed, start // 2
            )
        absmax[b - b0] = am


def quantize_4bit_kernel(x, kind, n, bs, bounds, order, zero_nib, packed, absmax):
    """Blockwise 4-bit quantization of the first n elements of x into packed/absmax (threads over blocks).

    On AVX-512 the whole blocks take ``_quantize_blocks_avx512`` (16 lanes per step), on AVX2
    ``_quantize_blocks_avx2`` (the same 16-lane code, each permute in two 8-lane halves), a partial last
    block the scalar loop."""
    nb = (n + bs - 1) // bs
    whole = n // bs if AVX512 or AVX2 else 0
    if whole:
        kernel = _quantize_blocks_avx512 if AVX512 else _quantize_blocks_avx2
        parallel_ranges(kernel, whole, x, kind, bs, bounds, order, packed, absmax)
    if whole < nb:
        parallel_ranges(
            _quantize_blocks, nb - whole, x, kind, n, bs, bounds, order, zero_nib, packed, absmax[whole:], whole
        )


def _avx512_host() -> bool:
    """True when numba compiles for this host (the default) and the host has AVX-512F (512-bit ``vpermd``)."""
    cpu_name = numba.config.CPU_NAME  # type: ignore[attr-defined]  # numba.config's options are set at import time
    return cpu_name in (None, "host") and "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")


def _avx2_target() -> bool:
    """True when numba compiles with AVX2 and F16C (8-lane ``vpermd``, ``vcvtps2ph``): the features named by
    ``NUMBA_CPU_FEATURES`` when set, else the host's (numba passes the host's features even when
    ``NUMBA_CPU_NAME`` is set; set both, e.g. ``haswell`` and ``+avx2,+fma,+f16c``, to compile for an AVX2 CPU)."""
    feats = numba.config.CPU_FEATURES  # type: ignore[attr-defined]  # numba.config's options are set at import time
    spelled = (llvm.get_host_cpu_features().flatten() if feats is None else feats).split(",")
    return "+avx2" in spelled and "+f16c" in spelled


#: The dequantizer decodes 32 nibbles per step with two 512-bit table permutes when this is true.
AVX512 = _avx512_host()
#: Else, 16 nibbles per step with 256-bit permutes (two per nibble: the table is two 8-lane halves) when true.
AVX2 = _avx2_target()


#: Outputs of at least this many bytes are written with non-temporal (streaming) stores. A plain store first
#: reads the cache line it writes (read-for-ownership): for a float32 output that is 4 more bytes of memory
#: traffic per element on top of the 4.5 counted. Streaming stores skip that read, as glibc's memcpy does for
#: large copies (the copy that defines the bench's limit), but they also evict the line from the caches, so a
#: small output that the caller reads next (one QLoRA weight, about the L2 size or less) keeps plain stores.
NONTEMPORAL_MIN_BYTES = 4 << 20


def _table_bits(builder: ir.IRBuilder, codes: ir.Value, scale: ir.Value, kind: int) -> ir.Value:
    """<16 x i32>: lane j holds the bits of RNE_kind(f32(code[j] · scale)) (16-bit kinds zero-extended).

    One <16 x float> multiply (the same IEEE product as the scalar code), then, by kind: the float32
    bits; bfloat16 by round-to-nearest-even on the bits, (b + 0x7FFF + lsb) >> 16, NaN → (b >> 16) | 0x40
    (``_bits.f32_to_bf16``); float16 by ``fptrunc`` (``vcvtps2ph``: IEEE RNE, subnormals, overflow to
    inf, NaN quieted with its payload's top bits, as ``_bits.f32_to_f16``).
    """
    i32 = ir.IntType(32)
    f32x16, i32x16 = ir.VectorType(ir.FloatType(), 16), ir.VectorType(i32, 16)

    def splat(v):
        return ir.Constant(i32x16, [v] * 16)

    sv = builder.insert_element(ir.Constant(f32x16, None), scale, ir.Constant(i32, 0))
    v = builder.fmul(codes, builder.shuffle_vector(sv, sv, ir.Constant(i32x16, [0] * 16)))
    bits = builder.bitcast(v, i32x16)
    if kind == KIND_BF16:
        odd = builder.and_(builder.lshr(bits, splat(16)), splat(1))
        rne = builder.lshr(builder.add(builder.add(bits, splat(0x7FFF)), odd), splat(16))
        nan = builder.icmp_unsigned(">", builder.and_(bits, splat(0x7FFFFFFF)), splat(0x7F800000))
        bits = builder.select(nan, builder.or_(builder.lshr(bits, splat(16)), splat(0x40)), rne)
    elif kind == KIND_F16:
        half = builder.bitcast(builder.fptrunc(v, ir.VectorType(ir.HalfType(), 16)), ir.VectorType(ir.IntType(16), 16))
        bits = builder.zext(half, i32x16)
    return bits


def _dequantize_lanes(kind: int, lanes: int, nested: bool = False) -> object:
    """An intrinsic ``f(code, absmax, packed, out32, bs, b_lo, b_hi, stream)`` decoding whole blocks
    [b_lo, b_hi) into out32, the output's uint32 view (float32 words, or pairs of 16-bit values), with
    L = ``lanes`` 32-bit lanes per vector: 16 (AVX-512) or 8 (AVX2).

    nested: ``f(code, qcodes, packed, out32, bs, b_lo, b_hi, stream, absmax2, offset, dyn)`` decodes each
    block's scale from the nested statistics as it goes, f32(f32(dyn[qcodes_b] · absmax2[b // 256]) +
    offset) (``_dequantize_nested_range``), instead of reading a decoded absmax array.

    Per block the 16 possible outputs are formed in registers (``_table_bits``); each step then decodes L
    packed bytes = 2L nibbles (high nibble first): the bytes are widened to 32-bit lanes and each nibble
    indexes the table, a = tbl[byte >> 4], b = tbl[byte & 15] (L = 16: one ``vpermd`` each; L = 8: one
    ``vpermd`` in each 8-entry half and a select on the nibble's bit 3). float32 out: words 2k, 2k + 1 =
    a_k, b_k (two interleaving shuffles, 2 vectors); 16-bit out: word k = a_k | b_k << 16 (element 2k in the
    low half, little-endian; 1 vector).

    stream ≠ 0 and a 4-byte aligned out32: the vectors V_0 … V_{N−1} (at words w_0 + Lj) are written as
    whole aligned 4L-byte lines by non-temporal stores (which need aligned addresses). With t = L − (w_0's
    address / 4 mod L) ∈ [1, L], line j (at word w_0 + t + Lj) is V_j[t:] ++ V_{j+1}[:t]: one ``vpermt2d``
    (L = 16) or two ``vpermd`` and a select (L = 8) of consecutive vectors; the head V_0[:t] and the tail
    V_{N−1}[t:] (partial lines, which the neighbouring ranges may share) take plain scalar stores.
    Else every vector takes a plain store.
    """
    i1, i8, i32, i64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
    f32x16, ivec = ir.VectorType(ir.FloatType(), 16), ir.VectorType(i32, lanes)
    wide = kind == KIND_F32
    half = lanes // 2
    bytewise = lanes == 8 and not wide  # 16-bit outputs on AVX2: vpshufb over byte tables (bytes_lookup)

    def splat(v):
        return ir.Constant(ivec, [v] * lanes)

    def impl(typingctx, code, absmax, packed, out32, bs, b_lo, b_hi, stream):
        return types.void(code, absmax, packed, out32, bs, b_lo, b_hi, stream), codegen

    def impl_nested(typingctx, code, qcodes, packed, out32, bs, b_lo, b_hi, stream, absmax2, offset, dyn):
        return types.void(code, qcodes, packed, out32, bs, b_lo, b_hi, stream, absmax2, offset, dyn), codegen

    def codegen(context, builder, signature, args):
        code_v, absmax_v, packed_v, out_v, _, _, _, stream_v = args[:8]
        sa = signature.args
        code_p = context.make_array(sa[0])(context, builder, code_v).data
        absmax_p = context.make_array(sa[1])(context, builder, absmax_v).data
        if nested:
            absmax2_p = context.make_array(sa[8])(context, builder, args[8]).data
            dyn_p = context.make_array(sa[10])(context, builder, args[10]).data
        packed_p = context.make_array(sa[2])(context, builder, packed_v).data
        out_p = context.make_array(sa[3])(context, builder, out_v).data
        bs_v, lo_v, hi_v = (context.cast(builder, v, t, types.int64) for v, t in zip(args[4:7], sa[4:7], strict=True))
        mod = builder.module
        if lanes == 16:
            permd = cgutils.get_or_insert_function(
                mod, ir.FunctionType(ivec, [ivec, ivec]), "llvm.x86.avx512.permvar.si.512"
            )
            permt2d = cgutils.get_or_insert_function(
                mod, ir.FunctionType(ivec, [ivec, ivec, ivec]), "llvm.x86.avx512.vpermi2var.d.512"
            )
        else:
            permd = cgutils.get_or_insert_function(mod, ir.FunctionType(ivec, [ivec, ivec]), "llvm.x86.avx2.permd")
            i8x32 = ir.VectorType(i8, 32)
            pshufb = cgutils.get_or_insert_function(
                mod, ir.FunctionType(i8x32, [i8x32, i8x32]), "llvm.x86.avx2.pshuf.b"
            )
        sfence = cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
        nontemporal = mod.add_metadata([ir.Constant(i32, 1)])

        def c64(v):
            return ir.Constant(i64, v)

        def wptr(widx):  # <L x i32>* at word widx of out32
            return builder.bitcast(builder.gep(out_p, [widx]), ivec.as_pointer())

        def lookup(tables, idx):  # tables[idx] lane by lane, idx in [0, 16)
            if lanes == 16:
                return builder.call(permd, [tables[0], idx])
            upper = builder.icmp_unsigned("!=", builder.and_(idx, splat(8)), splat(0))
            return builder.select(upper, builder.call(permd, [tables[1], idx]), builder.call(permd, [tables[0], idx]))

        def rotate(prev, cur, rot, from_prev):  # prev[t:] ++ cur[:t]
            if lanes == 16:
                return builder.call(permt2d, [prev, rot, cur])
            return builder.select(from_prev, builder.call(permd, [prev, rot]), builder.call(permd, [cur, rot]))

        codes = builder.load(builder.bitcast(code_p, f32x16.as_pointer()), align=4)
        wpb = bs_v if wide else builder.lshr(bs_v, c64(1))  # output words per block
        steps = builder.udiv(bs_v, c64(2 * lanes))  # 2L nibbles a step
        w0 = builder.mul(lo_v, wpb)
        addr0 = builder.add(builder.ptrtoint(out_p, i64), builder.mul(w0, c64(4)))
        t = builder.sub(c64(lanes), builder.and_(builder.lshr(addr0, c64(2)), c64(lanes - 1)))
        tv = builder.shuffle_vector(
            builder.insert_element(ir.Constant(ivec, None), builder.trunc(t, i32), ir.Constant(i32, 0)),
            ir.Constant(ivec, None),
            splat(0),
        )
        lane_no = ir.Constant(ivec, list(range(lanes)))
        rot = builder.add(tv, lane_no)  # lanes t … t + L − 1 of (V_j, V_{j+1})
        from_prev = builder.icmp_unsigned("<", rot, splat(lanes))
        if lanes == 8:
            rot = builder.and_(rot, splat(7))
        first = cgutils.alloca_once_value(builder, ir.Constant(i1, 1))
        prev = cgutils.alloca_once_value(builder, ir.Constant(ivec, None))

        def lanes_store(vec, widx, lane_lo, lane_hi):  # plain stores of vec's lanes [lane_lo, lane_hi) at widx
            for lane in range(lanes):
                ln = c64(lane)
                keep = builder.and_(builder.icmp_signed("<=", lane_lo, ln), builder.icmp_signed("<", ln, lane_hi))
                with builder.if_then(keep):
                    builder.store(
                        builder.extract_element(vec, ir.Constant(i32, lane)),
                        builder.gep(out_p, [builder.add(widx, ln)]),
                    )

        def emit(vec, widx, streaming):
            if not streaming:  # align 1: out32 may be a view 2 bytes off a word (a 16-bit array at an odd element)
                builder.store(vec, wptr(widx), align=1)
                return
            with builder.if_else(builder.load(first)) as (head, body):
                with head:
                    lanes_store(vec, widx, c64(0), t)
                    builder.store(ir.Constant(i1, 0), first)
                with body:
                    line = rotate(builder.load(prev), vec, rot, from_prev)
                    st = builder.store(line, wptr(builder.add(builder.sub(widx, c64(lanes)), t)), align=4 * lanes)
                    st.set_metadata("nontemporal", nontemporal)
            builder.store(vec, prev)

        def bytes_lookup(bits, pbase, obase, streaming):
            # 16-bit outputs on AVX2: the table's low and high bytes as two 16-byte tables, looked up with
            # ``vpshufb`` (32 nibbles per step, in element order), then interleaved into 16-bit words
            both = ir.Constant(ir.VectorType(i32, 32), list(range(16)) * 2)
            lo_b = builder.trunc(bits, ir.VectorType(i8, 16))
            hi_b = builder.trunc(builder.lshr(bits, ir.Constant(ir.VectorType(i32, 16), [8] * 16)), lo_b.type)
            tlo, thi = (builder.shuffle_vector(t, t, both) for t in (lo_b, hi_b))
            with cgutils.for_range(builder, builder.lshr(bs_v, c64(5))) as loop:
                g = loop.index
                src = builder.bitcast(
                    builder.gep(packed_p, [builder.add(pbase, builder.mul(g, c64(16)))]), lo_b.type.as_pointer()
                )
                raw = builder.load(src, align=1)
                nib_hi = builder.lshr(raw, ir.Constant(raw.type, [4] * 16))
                nib_lo = builder.and_(raw, ir.Constant(raw.type, [15] * 16))
                idx = builder.shuffle_vector(
                    nib_hi, nib_lo, ir.Constant(ir.VectorType(i32, 32), [k // 2 + 16 * (k % 2) for k in range(32)])
                )
                lb, hb = (builder.call(pshufb, [t, idx]) for t in (tlo, thi))
                words = builder.bitcast(
                    builder.shuffle_vector(
                        lb, hb, ir.Constant(ir.VectorType(i32, 64), [k // 2 + 32 * (k % 2) for k in range(64)])
                    ),
                    ir.VectorType(i32, 16),
                )
                widx = builder.add(obase, builder.mul(g, c64(16)))
                for h in range(2):
                    vec = builder.shuffle_vector(words, words, ir.Constant(ivec, [8 * h + j for j in range(8)]))
                    emit(vec, builder.add(widx, c64(8 * h)), streaming)

        def blocks(streaming):
            with cgutils.for_range_slice(builder, lo_v, hi_v, c64(1)) as (b, _):
                if nested:  # IEEE float32 multiply, then add (no contraction: no fast-math flags)
                    q = builder.zext(builder.load(builder.gep(absmax_p, [b])), i64)
                    a2 = builder.load(builder.gep(absmax2_p, [builder.lshr(b, c64(8))]))
                    scale = builder.fadd(builder.fmul(builder.load(builder.gep(dyn_p, [q])), a2), args[9])
                else:
                    scale = builder.load(builder.gep(absmax_p, [b]))
                bits = _table_bits(builder, codes, scale, kind)
                pbase = builder.mul(b, builder.lshr(bs_v, c64(1)))
                obase = builder.mul(b, wpb)
                if bytewise:
                    bytes_lookup(bits, pbase, obase, streaming)
                else:
                    tables = [
                        builder.shuffle_vector(bits, bits, ir.Constant(ivec, [h * lanes + j for j in range(lanes)]))
                        for h in range(16 // lanes)
                    ]
                    with cgutils.for_range(builder, steps) as loop:
                        g = loop.index
                        src = builder.bitcast(
                            builder.gep(packed_p, [builder.add(pbase, builder.mul(g, c64(lanes)))]),
                            ir.VectorType(i8, lanes).as_pointer(),
                        )
                        w = builder.zext(builder.load(src, align=1), ivec)
                        a = lookup(tables, builder.lshr(w, splat(4)))
                        bb = lookup(tables, builder.and_(w, splat(15)))
                        if wide:
                            widx = builder.add(obase, builder.mul(g, c64(2 * lanes)))
                            for h in range(2):
                                mask = [h * half + j // 2 + lanes * (j % 2) for j in range(lanes)]
                                vec = builder.shuffle_vector(a, bb, ir.Constant(ivec, mask))
                                emit(vec, builder.add(widx, c64(h * lanes)), streaming)
                        else:
                            pair = builder.or_(a, builder.shl(bb, splat(16)))
                            emit(pair, builder.add(obase, builder.mul(g, c64(lanes))), streaming)

        aligned4 = builder.icmp_unsigned("==", builder.and_(addr0, c64(3)), c64(0))
        do_stream = builder.and_(builder.icmp_signed("!=", stream_v, ir.Constant(stream_v.type, 0)), aligned4)
        with builder.if_else(do_stream) as (streamed, plain):
            with streamed:
                blocks(True)
                with builder.if_then(builder.not_(builder.load(first))):  # the last vector's tail
                    last = builder.sub(builder.mul(hi_v, wpb), c64(lanes))
                    lanes_store(builder.load(prev), last, t, c64(lanes))
                # streaming stores are weakly ordered; the fence orders them before this range's caller (a
                # worker thread) reports done, as a plain store would be, so the joined result is complete
                builder.call(sfence, [])
            with plain:
                blocks(False)
        return context.get_dummy_value()

    return intrinsic(impl_nested if nested else impl)


_dequantize_f32 = _dequantize_lanes(KIND_F32, 16)
_dequantize_f16 = _dequantize_lanes(KIND_F16, 16)
_dequantize_bf16 = _dequantize_lanes(KIND_BF16, 16)
_dequantize_f32_avx2 = _dequantize_lanes(KIND_F32, 8)
_dequantize_f16_avx2 = _dequantize_lanes(KIND_F16, 8)
_dequantize_bf16_avx2 = _dequantize_lanes(KIND_BF16, 8)
_dequantize_f32_nested = _dequantize_lanes(KIND_F32, 16, nested=True)
_dequantize_f16_nested = _dequantize_lanes(KIND_F16, 16, nested=True)
_dequantize_bf16_nested = _dequantize_lanes(KIND_BF16, 16, nested=True)
_dequantize_f32_nested_avx2 = _dequantize_lanes(KIND_F32, 8, nested=True)
_dequantize_f16_nested_avx2 = _dequantize_lanes(KIND_F16, 8, nested=True)
_dequantize_bf16_nested_avx2 = _dequantize_lanes(KIND_BF16, 8, nested=True)


@njit(cache=True, nogil=True, fastmath=False)
def _dequantize_blocks(packed, absmax, n, bs, code, kind, out, b_lo, b_hi):
    """Blocks [b_lo, b_hi) of ``dequantize_4bit_kernel`` (scalar: any host, and the tail block)."""
    tbl = np.empty(16, dtype=out.dtype)
    for b in range(b_lo, b_hi):
        start = b * bs
        m = min(bs, n - start)
        scale = absmax[b]
        for j in range(16):
            store_f32(tbl, j, code[j] * scale, kind)
        base = start // 2
        for k in range(m // 2):
            byte = packed[base + k]
            out[start + 2 * k] = tbl[byte >> 4]
            out[start + 2 * k + 1] = tbl[byte & 15]
        if m % 2 == 1:
            out[start + m - 1] = tbl[packed[base + m // 2] >> 4]


@njit(cache=True, nogil=True, fastmath=False)
def _dequantize_blocks_avx512(packed, absmax, bs, code, kind, out32, stream, b_lo, b_hi):
    """Whole blocks [b_lo, b_hi) of ``dequantize_4bit_kernel`` on AVX-512: 32 nibbles per step
    (``_dequantize_lanes``); out32 is the output's uint32 view, stream ≠ 0 asks for streaming stores."""
    if kind == KIND_F32:
        _dequantize_f32(code, absmax, packed, out32, bs, b_lo, b_hi, stream)
    elif kind == KIND_BF16:
        _dequantize_bf16(code, absmax, packed, out32, bs, b_lo, b_hi, stream)
    else:
        _dequantize_f16(code, absmax, packed, out32, bs, b_lo, b_hi, stream)


@njit(cache=True, nogil=True, fastmath=False)
def _dequantize_blocks_avx2(packed, absmax, bs, code, kind, out32, stream, b_lo, b_hi):
    """``_dequantize_blocks_avx512`` with 8-lane vectors (AVX2): 16 nibbles per step."""
    if kind == KIND_F32:
        _dequantize_f32_avx2(code, absmax, packed, out32, bs, b_lo, b_hi, stream)
    elif kind == KIND_BF16:
        _dequantize_bf16_avx2(code, absmax, packed, out32, bs, b_lo, b_hi, stream)
    else:
        _dequantize_f16_avx2(code, absmax, packed, out32, bs, b_lo, b_hi, stream)


@njit(cache=True, nogil=True, fastmath=False)
def _dequantize_nested_blocks_avx512(packed, qcodes, absmax2, offset, dyn, bs, code, kind, out32, stream, b_lo, b_hi):
    """``_dequantize_blocks_avx512`` with each block's scale decoded from the nested statistics on the way."""
    if kind == KIND_F32:
        _dequantize_f32_nested(code, qcodes, packed, out32, bs, b_lo, b_hi, stream, absmax2, offset, dyn)
    elif kind == KIND_BF16:
        _dequantize_bf16_nested(code, qcodes, packed, out32, bs, b_lo, b_hi, stream, absmax2, offset, dyn)
    else:
        _dequantize_f16_nested(code, qcodes, packed, out32, bs, b_lo, b_hi, stream, absmax2, offset, dyn)


@njit(cache=True, nogil=True, fastmath=False)
def _dequantize_nested_blocks_avx2(packed, qcodes, absmax2, offset, dyn, bs, code, kind, out32, stream, b_lo, b_hi):
    """``_dequantize_nested_blocks_avx512`` with 8-lane vectors (AVX2)."""
    if kind == KIND_F32:
        _dequantize_f32_nested_avx2(code, qcodes, packed, out32, bs, b_lo, b_hi, stream, absmax2, offset, dyn)
    elif kind == KIND_BF16:
        _dequantize_bf16_nested_avx2(code, qcodes, packed, out32, bs, b_lo, b_hi, stream, absmax2, offset, dyn)
    else:
        _dequantize_f16_nested_avx2(code, qcodes, packed, out32, bs, b_lo, b_hi, stream, absmax2, offset, dyn)


def dequantize_4bit_kernel(packed, absmax, n, bs, code, kind, out, nested=None, fresh=False):
    """out[i] = RNE_kind(f32(code[nib_i] · absmax[i // bs])) for i < n.

    Per block the 16 possible outputs are formed once (tbl[j] = RNE(f32(code[j] · absmax_b)), in the
    output's own format), so the element loop is table lookups and stores: on AVX-512 two ``vpermd``
    per 16 bytes, on AVX2 four per 8 bytes (``_dequantize_lanes``; streaming stores for outputs of
    ``NONTEMPORAL_MIN_BYTES`` or more), else two scalar lookups per byte. Every blocksize is a multiple
    of 32, so only a partial last block takes the scalar loop on AVX-512 and AVX2.

    nested = (absmax2, offset, dyn): absmax holds the 8-bit codes q of the nested statistics (blocks of
    256) and absmax_b = f32(f32(dyn[q_b] · absmax2[b // 256]) + offset); the vector kernels decode it
    per block in the same pass, the scalar one first decodes all of them (``dequantize_nested_kernel``).

    fresh: out was just allocated, so it takes plain stores: the OS zeroes each page at its first touch,
    which leaves its lines in this core's cache, where plain stores find them (streaming stores would
    write the line to memory a second time; measured 10-15 % slower for a fresh 64 MB float32 output).
    """
    nb = (n + bs - 1) // bs
    if nested is not None:
        nested = (nested[0], np.float32(nested[1]), nested[2])  # the kernels add a float32 offset
    if not (AVX512 or AVX2):
        if nested is not None:
            scales = np.empty(nb, dtype=np.float32)
            dequantize_nested_kernel(absmax, nested[0], nested[1], nested[2], scales)
            absmax = scales
        parallel_ranges(_dequantize_blocks, nb, packed, absmax, n, bs, code, kind, out)
        return
    whole = n // bs
    if whole:
        words = out[: whole * bs].view(np.uint32)  # whole · bs is a multiple of 32: a whole number of words
        stream = int(words.nbytes >= NONTEMPORAL_MIN_BYTES and not fresh)
        if nested is None:
            kernel = _dequantize_blocks_avx512 if AVX512 else _dequantize_blocks_avx2
            parallel_ranges(kernel, whole, packed, absmax, bs, code, kind, words, stream)
        else:
            kernel = _dequantize_nested_blocks_avx512 if AVX512 else _dequantize_nested_blocks_avx2
            parallel_ranges(kernel, whole, packed, absmax, *nested, bs, code, kind, words, stream)
    if whole == nb:
        return
    if nested is None:
        _dequantize_blocks(packed, absmax, n, bs, code, kind, out, whole, nb)
        return
    absmax2, offset, dyn = nested  # the partial last block, its scale in float32 like the kernels'
    scale = np.float32(dyn[absmax[whole]] * absmax2[whole // 256]) + np.float32(offset)
    tail = whole * bs
    _dequantize_blocks(packed[tail // 2 :], np.full(1, scale, np.float32), n - tail, bs, code, kind, out[tail:], 0, 1)


def _quant_lanes(kind: int, avx2: bool = False) -> tuple[object, object]:
    """Two intrinsics over 16-lane vectors of a float32 / fp16-bits / bf16-bits array (by kind).

    avx2: for AVX2 targets, each 16-entry permute is two 8-lane ``vpermps`` / ``vpermd`` per half of the
    indices and a select on their bit 3 (``perm16``); LLVM splits the other 16-lane operations in two.

    ``absmax(x, off, m)``: max |x[off : off + m]| (m % 16 == 0) as float32, NaN (0x7FC00000) if any is NaN:
    lane-wise select-max (exact in any order), then the lanes in turn.
    ``nibbles(x, off, inv, bounds, order, packed, pbyte)``: 32 elements x[off : off + 32] to 16 bytes at
    packed[pbyte]: s = clamp(x · inv, −1, 1) (NaN stays NaN), q = Σ_j [not (s ≤ bounds_j)] over the 15
    sorted midpoints (bounds: 16 float32, the last a pad), found by a 4-step binary search (one ``vpermps``,
    compare and add per step and 16 lanes, not 15 compares), nibble = order[q] (one ``vpermd``), byte k =
    nib[2k] << 4 | nib[2k + 1] (two shuffles). The same float32 operations as ``_block_nibbles`` for a full block.
    """
    i32, i64 = ir.IntType(32), ir.IntType(64)
    f32x16, i32x16 = ir.VectorType(ir.FloatType(), 16), ir.VectorType(i32, 16)

    def splat_i(v):
        return ir.Constant(i32x16, [v] * 16)

    def load16(builder, data, index):
        if kind == KIND_F32:
            return builder.load(builder.bitcast(builder.gep(data, [index]), f32x16.as_pointer()), align=4)
        raw = builder.load(
            builder.bitcast(builder.gep(data, [index]), ir.VectorType(ir.IntType(16), 16).as_pointer()), align=2
        )
        if kind == KIND_F16:
            return builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), 16)), f32x16)
        return builder.bitcast(builder.shl(builder.zext(raw, i32x16), splat_i(16)), f32x16)

    def fabs(builder, v):
        return builder.bitcast(builder.and_(builder.bitcast(v, i32x16), splat_i(0x7FFFFFFF)), f32x16)

    def absmax_impl(typingctx, x, off, m):
        sig = types.float32(x, off, m)

        def codegen(context, builder, signature, args):
            x_v, off_v, m_v = args
            data = context.make_array(signature.args[0])(context, builder, x_v).data
            zero = ir.Constant(f32x16, [0.0] * 16)
            acc = cgutils.alloca_once_value(builder, zero)
            nan = cgutils.alloca_once_value(builder, ir.Constant(ir.VectorType(ir.IntType(1), 16), [0] * 16))
            with cgutils.for_range(builder, builder.udiv(m_v, ir.Constant(m_v.type, 16))) as loop:
                a = fabs(
                    builder, load16(builder, data, builder.add(off_v, builder.mul(loop.index, ir.Constant(i64, 16))))
                )
                cur = builder.load(acc)
                builder.store(builder.select(builder.fcmp_ordered(">", a, cur), a, cur), acc)
                builder.store(builder.or_(builder.load(nan), builder.fcmp_unordered("uno", a, a)), nan)
            v = builder.load(acc)
            am = builder.extract_element(v, ir.Constant(i32, 0))
            for j in range(1, 16):
                e = builder.extract_element(v, ir.Constant(i32, j))
                am = builder.select(builder.fcmp_ordered(">", e, am), e, am)
            anynan = builder.icmp_unsigned(
                "!=", builder.bitcast(builder.load(nan), ir.IntType(16)), ir.Constant(ir.IntType(16), 0)
            )
            return builder.select(anynan, ir.Constant(ir.FloatType(), float("nan")), am)

        return sig, codegen

    def nibbles_impl(typingctx, x, off, inv, bounds, order, packed, pbyte):
        sig = types.void(x, off, inv, bounds, order, packed, pbyte)

        def codegen(context, builder, signature, args):
            x_v, off_v, inv_v, bounds_v, order_v, packed_v, pbyte_v = args
            data = context.make_array(signature.args[0])(context, builder, x_v).data
            bdata = context.make_array(signature.args[3])(context, builder, bounds_v).data
            odata = context.make_array(signature.args[4])(context, builder, order_v).data
            pdata = context.make_array(signature.args[5])(context, builder, packed_v).data

            def perm16(name512, name256, table, idx):  # table[idx] lane by lane, idx in [0, 16)
                if not avx2:
                    fn = ir.FunctionType(table.type, [table.type, i32x16])
                    return builder.call(cgutils.get_or_insert_function(builder.module, fn, name512), [table, idx])
                t8, i8x = ir.VectorType(table.type.element, 8), ir.VectorType(i32, 8)
                fn8 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(t8, [t8, i8x]), name256)
                lo_t, hi_t = (
                    builder.shuffle_vector(table, table, ir.Constant(i8x, list(range(8 * h, 8 * h + 8))))
                    for h in range(2)
                )
                parts = []
                for h in range(2):
                    ih = builder.shuffle_vector(idx, idx, ir.Constant(i8x, list(range(8 * h, 8 * h + 8))))
                    upper = builder.icmp_unsigned(
                        "!=", builder.and_(ih, ir.Constant(i8x, [8] * 8)), ir.Constant(i8x, [0] * 8)
                    )
                    parts.append(builder.select(upper, builder.call(fn8, [hi_t, ih]), builder.call(fn8, [lo_t, ih])))
                return builder.shuffle_vector(parts[0], parts[1], ir.Constant(i32x16, list(range(16))))

            def bcast(v):
                sv = builder.insert_element(ir.Constant(f32x16, None), v, ir.Constant(i32, 0))
                return builder.shuffle_vector(sv, sv, ir.Constant(i32x16, [0] * 16))

            inv16 = bcast(inv_v)
            one, mone = ir.Constant(f32x16, [1.0] * 16), ir.Constant(f32x16, [-1.0] * 16)
            bnds = builder.load(builder.bitcast(bdata, f32x16.as_pointer()), align=4)
            order16 = builder.load(builder.bitcast(odata, i32x16.as_pointer()), align=4)
            qs = []
            for h in range(2):
                v = load16(builder, data, builder.add(off_v, ir.Constant(i64, 16 * h)))
                sc = builder.fmul(v, inv16)
                sc = builder.select(builder.fcmp_ordered(">", sc, one), one, sc)
                sc = builder.select(builder.fcmp_ordered("<", sc, mone), mone, sc)
                # q = #{j : not (s <= b_j)} by binary search over the sorted midpoints (b_15 = +inf pads the
                # table and is never read): q ≥ c exactly when not (s <= b_{c-1}); NaN passes every step → 15
                q = splat_i(0)
                for step in (8, 4, 2, 1):
                    b = perm16(
                        "llvm.x86.avx512.permvar.sf.512",
                        "llvm.x86.avx2.permps",
                        bnds,
                        builder.add(q, splat_i(step - 1)),
                    )
                    up = builder.fcmp_unordered("ugt", sc, b)
                    q = builder.add(q, builder.select(up, splat_i(step), splat_i(0)))
                qs.append(perm16("llvm.x86.avx512.permvar.si.512", "llvm.x86.avx2.permd", order16, q))
            ev = builder.shuffle_vector(qs[0], qs[1], ir.Constant(i32x16, [2 * k for k in range(16)]))
            od = builder.shuffle_vector(qs[0], qs[1], ir.Constant(i32x16, [2 * k + 1 for k in range(16)]))
            byte = builder.trunc(builder.or_(builder.shl(ev, splat_i(4)), od), ir.VectorType(ir.IntType(8), 16))
            builder.store(byte, builder.bitcast(builder.gep(pdata, [pbyte_v]), byte.type.as_pointer()), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(absmax_impl), intrinsic(nibbles_impl)


_absmax_f32, _nibbles_f32 = _quant_lanes(KIND_F32)
_absmax_f16, _nibbles_f16 = _quant_lanes(KIND_F16)
_absmax_bf16, _nibbles_bf16 = _quant_lanes(KIND_BF16)
_absmax_f32_avx2, _nibbles_f32_avx2 = _quant_lanes(KIND_F32, avx2=True)
_absmax_f16_avx2, _nibbles_f16_avx2 = _quant_lanes(KIND_F16, avx2=True)
_absmax_bf16_avx2, _nibbles_bf16_avx2 = _quant_lanes(KIND_BF16, avx2=True)


@njit(cache=True, inline="always")
def _lane_tables(bounds, order):
    """The 15 midpoints padded to 16 lanes with +inf (never below s), and the nibble order as int32 lanes."""
    bounds16 = np.full(16, np.inf, dtype=np.float32)
    order32 = np.empty(16, dtype=np.int32)
    for j in range(16):
        order32[j] = order[j]
    for j in range(15):
        bounds16[j] = bounds[j]
    return bounds16, order32


@njit(cache=True, nogil=True, fastmath=False)
def _quantize_blocks_avx512(x, kind, bs, bounds, order, packed, absmax, b_lo, b_hi):
    """Whole blocks [b_lo, b_hi) of ``quantize_4bit_kernel`` on AVX-512 (absmax, then 32 elements a step)."""
    bounds16, order32 = _lane_tables(bounds, order)
    for b in range(b_lo, b_hi):
        start = b * bs
        if kind == KIND_F32:
            am = _absmax_f32(x, start, bs)
        elif kind == KIND_F16:
            am = _absmax_f16(x, start, bs)
        else:
            am = _absmax_bf16(x, start, bs)
        amc = ABSMAX_MIN if am < ABSMAX_MIN else am  # clamp(min=1e-38); NaN stays NaN
        inv = _ONE / amc
        for g in range(bs // 32):
            if kind == KIND_F32:
                _nibbles_f32(x, start + 32 * g, inv, bounds16, order32, packed, start // 2 + 16 * g)
            elif kind == KIND_F16:
                _nibbles_f16(x, start + 32 * g, inv, bounds16, order32, packed, start // 2 + 16 * g)
            else:
                _nibbles_bf16(x, start + 32 * g, inv, bounds16, order32, packed, start // 2 + 16 * g)
        absmax[b] = am


@njit(cache=True, nogil=True, fastmath=False)
def _quantize_blocks_avx2(x, kind, bs, bounds, order, packed, absmax, b_lo, b_hi):
    """``_quantize_blocks_avx512`` with the AVX2 intrinsics (``_quant_lanes(kind, avx2=True)``)."""
    bounds16, order32 = _lane_tables(bounds, order)
    for b in range(b_lo, b_hi):
        start = b * bs
        if kind == KIND_F32:
            am = _absmax_f32_avx2(x, start, bs)
        elif kind == KIND_F16:
            am = _absmax_f16_avx2(x, start, bs)
        else:
            am = _absmax_bf16_avx2(x, start, bs)
        amc = ABSMAX_MIN if am < ABSMAX_MIN else am  # clamp(min=1e-38); NaN stays NaN
        inv = _ONE / amc
        for g in range(bs // 32):
            if kind == KIND_F32:
                _nibbles_f32_avx2(x, start + 32 * g, inv, bounds16, order32, packed, start // 2 + 16 * g)
            elif kind == KIND_F16:
                _nibbles_f16_avx2(x, start + 32 * g, inv, bounds16, order32, packed, start // 2 + 16 * g)
            else:
                _nibbles_bf16_avx2(x, start + 32 * g, inv, bounds16, order32, packed, start // 2 + 16 * g)
        absmax[b] = am


# ---------------------------------------------------------------- nested statistics (bitsandbytes CPU)


@njit(cache=True)
def _ceil_log2(x):
    if x <= 2:
        return 1
    r = 0
    v = x - 1
    while v > 0:
        v >>= 1
        r += 1
    return r


@njit(cache=True)
def _row_sum(x, begin, stride, size, lanes):
    """torch's row_sum (ilp 4) over ``size`` items of ``lanes`` float32 lanes each; item i
    starts at x[begin + i*stride]. Returns the per-lane sums (float32)."""
    size_ilp = size // 4
    level_power = max(4, _ceil_log2(size_ilp) // 4)
    level_step = 1 << level_power
    level_mask = level_step - 1
    acc = np.zeros((4, 4, lanes), dtype=np.float32)  # [level][ilp row][lane]
    i = 0
    while i + level_step <= size_ilp:
        for _ in range(level_step):
            for k in range(4):
                off = begin + (i * 4 + k) * stride
                for ln in range(lanes):
                    acc[0, k, ln] += x[off + ln]
            i += 1
        for j in range(1, 4):
            for k in range(4):
                for ln in range(lanes):
                    acc[j, k, ln] += acc[j - 1, k, ln]
                    acc[j - 1, k, ln] = np.float32(0.0)
            if (i & (level_mask << (j * level_power))) != 0:
                break
    while i < size_ilp:
        for k in range(4):
            off = begin + (i * 4 + k) * stride
            for ln in range(lanes):
                acc[0, k, ln] += x[off + ln]
        i += 1
    for j in range(1, 4):
        for k in range(4):
            for ln in range(lanes):
                acc[0, k, ln] += acc[j, k, ln]
    part = acc[0].copy()  # (4, lanes): the ilp partial sums
    for i2 in range(size_ilp * 4, size):
        off = begin + i2 * stride
        for ln in range(lanes):
            part[0, ln] += x[off + ln]
    for k in range(1, 4):
        for ln in range(lanes):
            part[0, ln] += part[k, ln]
    return part[0]


@njit(cache=True)
def _inner_sum(x, begin, end, lanes):
    """torch's float32 sum of x[begin:end] on one thread (vectorized_inner_sum / scalar row_sum).

    One call site of ``_row_sum`` (and one of this function in ``torch_cpu_sum_f32``): LLVM inlines
    each call site, and four inlined copies of the cascade took 18 s to compile."""
    size = end - begin
    vector = size >= lanes
    nvec = size // lanes if vector else size
    vec = _row_sum(x, begin, lanes if vector else 1, nvec, lanes if vector else 1)
    if not vector:
        return vec[0]
    total = np.float32(0.0)
    for k in range(begin + nvec * lanes, end):
        total += x[k]
    for ln in range(lanes):
        total += vec[ln]
    return total


@njit(cache=True)
def torch_cpu_sum_f32(x, threads, lanes):
    """torch.sum of a contiguous float32 vector on CPU: cascade sum per thread chunk
    (chunks only above GRAIN_SIZE = 32768), then a cascade sum of the per-thread slots."""
    n = x.size
    single = n < 32768 or threads <= 1
    tasks = 1 if single else min(threads, (n + 32767) // 32768)
    chunk = (n + tasks - 1) // tasks
    slots = np.zeros(max(threads, 1), dtype=np.float32)
    # steps 0 … tasks−1 sum the chunks of x into slots; step tasks sums the slots (one call site)
    for step in range(tasks + (0 if single else 1)):
        src = x if step < tasks else slots
        lo = step * chunk if step < tasks else 0
        hi = min(n, lo + chunk) if step < tasks else threads
        if lo < hi:
            slots[step if step < tasks else 0] = np.float32(0.0) + _inner_sum(src, lo, hi, lanes)
    return slots[0]


@njit(cache=True, nogil=True, fastmath=False)
def _quantize_nested_blocks(absmax, offset, lut, codes, absmax2, b_lo, b_hi):
    """Blocks of 256 [b_lo, b_hi) of ``quantize_nested_kernel``."""
    n = absmax.size
    for b in range(b_lo, b_hi):
        start = b * 256
        m = min(256, n - start)
        a2 = np.float32(0.0)  # bitsandbytes' C++ loop: max(a2, |c|) from 0, so NaN is skipped
        for i in range(m):
            a = abs(absmax[start + i] - offset)
            if a > a2:
                a2 = a
        absmax2[b] = a2
        if a2 == 0:
            for i in range(m):
                codes[start + i] = 0
            continue
        inv = _ONE / a2
        for i in range(m):
            v = (absmax[start + i] - offset) * inv
            if v > _ONE:
                v = _ONE
            elif v < -_ONE:
                v = -_ONE
            t = ((v + _ONE) * np.float32(0.5)) * np.float32(65535.0) + np.float32(0.5)
            if t != t:
                t = np.float32(0.0)
            codes[start + i] = lut[np.int64(t)]


def quantize_nested_kernel(absmax, offset, lut, codes, absmax2):
    """8-bit blockwise (256) codes of f32(absmax − offset) by bitsandbytes' CPU 65,536-bin LUT:
    v = clamp(f32(c · f32(1/a2)), −1, 1); idx = trunc(((v + 1)·0.5)·65535 + 0.5); q = lut[idx]."""
    parallel_ranges(_quantize_nested_blocks, (absmax.size + 255) // 256, absmax, offset, lut, codes, absmax2)


@njit(cache=True, nogil=True, fastmath=False)
def _dequantize_nested_range(codes, absmax2, offset, dyn, out, lo, hi):
    for i in range(lo, hi):
        out[i] = dyn[codes[i]] * absmax2[i // 256] + offset


def dequantize_nested_kernel(codes, absmax2, offset, dyn, out):
    """â_i = f32(f32(d[q_i] · a2[i // 256]) + offset)."""
    parallel_ranges(_dequantize_nested_range, codes.size, codes, absmax2, offset, dyn, out)
