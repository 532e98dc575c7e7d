"""Which bitsandbytes 0.50.2 CPU code path dequantizes a 4-bit tensor, and a bit-exact model of each.

``dequantize_4bit`` on CPU (``bitsandbytes/backends/cpu/ops.py`` and ``csrc/cpu_ops.cpp``) has three
paths; which one runs depends on the host's instruction set, the last dimension and the blocksize:

1. **torch fallback** (``backends/default/ops.py``, ``_dequantize_4bit_compute``) when
   * ``shape[-1]`` is odd, or
   * ``_has_avx512`` (``torch.backends.cpu.get_cpu_capability() == "AVX512"``) and ``blocksize >= 2048``
     (an accuracy workaround, PR #1828), or
   * the native library is missing (the CPU kernel is then not registered).
   Blocks over the flattened tensor; FP4 nibble 8 is **+0.0** (the torch table).
2. **AVX-512 kernel** (``dequantizeBlockwise4bitCpu``, ``#if defined(__AVX512F__)``) when the library
   was built with AVX-512, cpuid reports avx512f (``__builtin_cpu_supports``), ``shape[-1] % 16 == 0``
   and ``blocksize >= 16``. It reads the scale of element (row, col) at
   ``absmax[row · (cols // bs) + col // bs]``: correct only when every row is a whole number of blocks.
   FP4 nibble 8 is **+0.0** (``set_fp4_lut``). bf16 output: ``_mm512_cvtneps_pbh`` where the library
   reports AVX512-BF16 (float32 subnormals become signed zeros), else round-to-nearest-even bit
   arithmetic.
3. **C++ scalar** loop otherwise (no AVX-512, or an even last dimension that is not a multiple of 16):
   blocks over the flattened tensor, FP4 nibble 8 is **−0.0** (``fp4_lut``). This is what the
   ``bitsandbytes-cpu`` profile states for even last dimensions (spec/nf4.md).

The instruction set decides, but a build without ``__AVX512F__`` (MSVC, PR #2072) never has path 2, so
the C++ kernel's behaviour is also *probed* once per process on a 3 × 16 tensor whose third row starts
a new block (see :func:`probe_cpp_kernel`); the probe and the instruction set are both reported.

The models (:func:`peer_dequantize`) are used as known-divergence models (divergences.py): the runner
accepts a failing case only where the model reproduces bitsandbytes' output bit for bit.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

AVX512 = "avx512"
SCALAR = "scalar"
TORCH_ODD = "torch-odd"
TORCH_BS = "torch-bs2048"
TORCH_NOLIB = "torch-nolib"
UNKNOWN = "unknown"
PATHS = (AVX512, SCALAR, TORCH_ODD, TORCH_BS, TORCH_NOLIB, UNKNOWN)
# the paths whose output the bitsandbytes-cpu profile states (spec/nf4.md); the others are divergences
PROFILE_PATHS = (SCALAR, TORCH_ODD)
LABELS = {
    AVX512: "AVX-512 kernel",
    SCALAR: "C++ scalar",
    TORCH_ODD: "torch fallback (odd last dimension)",
    TORCH_BS: "torch fallback (AVX-512 host, blocksize >= 2048)",
    TORCH_NOLIB: "torch fallback (no native library)",
    UNKNOWN: "unknown C++ kernel (the probe matched no known behaviour)",
}


@dataclass(frozen=True)
class Host:
    """What decides the path on this machine (each field as bitsandbytes sees it)."""

    machine: str
    avx512f: bool | None  # cpuid (/proc/cpuinfo flags); None where it cannot be read
    avx512_bf16: bool | None
    torch_capability: str  # torch.backends.cpu.get_cpu_capability()
    bnb_has_avx512: bool  # bitsandbytes.backends.cpu.ops._has_avx512 (the blocksize >= 2048 fallback)
    native: bool  # the native library is loaded (the C++ CPU kernel is registered)
    cpp_bf16: bool  # bitsandbytes.functional.has_avx512bf16(): the AVX-512 kernel converts with cvtneps
    kernel: str  # the probed C++ kernel for shape[-1] % 16 == 0: AVX512, SCALAR, TORCH_NOLIB or UNKNOWN
    bnb_version: str
    torch_version: str


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags: the kernel's view (/proc/cpuinfo), with avx512f as this process's cpuid sees
    it (NumPy's runtime probe), which is what bitsandbytes' C++ dispatch sees too (it differs under emulation
    such as ``qemu-x86_64 -cpu Haswell``, and in VMs that hide features)."""
    flags: set[str] | None = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        return flags
    flags = set() if flags is None else flags
    if features.get("AVX512F"):
        flags.add("avx512f")
    else:
        flags.discard("avx512f")
        flags.discard("avx512_bf16")
    return flags


def probe_cpp_kernel() -> str:
    """Run bitsandbytes' CPU ``dequantize_4bit`` on one 3 × 16 FP4 tensor, blocksize 32, and classify it.

    Element 0 has nibble 8 and every other element nibble 3 (+1.0); absmax = [1, 2]. Row 2 (elements
    32–47) lies in block 1. The AVX-512 kernel returns +0.0 and scales row 2 by absmax[2·(16 // 32)] =
    absmax[0] = 1; the C++ scalar loop returns −0.0 and 2; the torch path +0.0 and 2.
    """
    import torch

    packed = torch.full((24,), 0x33, dtype=torch.uint8)
    packed[0] = 0x83
    absmax = torch.tensor([1.0, 2.0], dtype=torch.float32)
    out = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, 32, "fp4", [3, 16], torch.float32)
    out = out.reshape(-1).numpy()
    zero_negative, row2 = bool(np.signbit(out[0])) and out[0] == 0, float(out[32])
    if out[0] == 0 and not zero_negative and row2 == 1.0:
        return AVX512
    if zero_negative and row2 == 2.0:
        return SCALAR
    if out[0] == 0 and not zero_negative and row2 == 2.0:
        return TORCH_NOLIB
    return UNKNOWN


@functools.cache
def host() -> Host:
    """The machine as bitsandbytes sees it (cached: it does not change within a process)."""
    import bitsandbytes
    import bitsandbytes.functional as F
    import torch

    try:
        from bitsandbytes.backends.cpu import ops as cpu_ops
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

        bnb_has_avx512 = bool(getattr(cpu_ops, "_has_avx512", torch.backends.cpu.get_cpu_capability() == "AVX512"))
        native = not isinstance(lib, ErrorHandlerMockBNBNativeLibrary)
    except ImportError:  # another layout than 0.50.x: fall back to what 0.50.2 computes
        bnb_has_avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
        native = False
    flags = _cpu_flags()
    return Host(
        machine=platform.machine(),
        avx512f=None if flags is None else "avx512f" in flags,
        avx512_bf16=None if flags is None else "avx512_bf16" in flags,
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        bnb_has_avx512=bnb_has_avx512,
        native=native,
        cpp_bf16=bool(F.has_avx512bf16()),
        kernel=probe_cpp_kernel() if native else TORCH_NOLIB,
        bnb_version=bitsandbytes.__version__,
        torch_version=torch.__version__,
    )


def dequantize_path(shape: tuple[int, ...], blocksize: int, h: Host | None = None) -> str:
    """The path bitsandbytes' CPU ``dequantize_4bit`` takes for a state of this shape and blocksize."""
    h = host() if h is None else h
    last = int(shape[-1]) if len(shape) else 1
    if not h.native:
        return TORCH_NOLIB
    if last % 2:
        return TORCH_ODD
    if h.bnb_has_avx512 and blocksize >= 2048:
        return TORCH_BS
    if last % 16 == 0 and blocksize >= 16:
        return h.kernel  # AVX512 on an AVX-512 build and host, else the scalar loop (or UNKNOWN)
    return SCALAR


def _bf16_round_bits(values: np.ndarray, avx512_bf16: bool) -> np.ndarray:
    """float32 → bfloat16 as the AVX-512 kernel does (``cvt_fp32_to_bf16``): without AVX512-BF16,
    (bits + 0x7FFF + lsb) >> 16 with NaN → 0xFFFF; with it, ``vcvtneps2bf16``: the same rounding, float32
    subnormals as signed zeros, and NaN → its upper half with the quiet bit set (sign kept)."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    bits = v.view(np.uint32).astype(np.uint64)
    nan = np.isnan(v)
    if avx512_bf16:
        bits = np.where((bits & 0x7F800000) == 0, bits & 0x80000000, bits)
        nan_bits = (bits >> 16) | 0x40
    else:
        nan_bits = np.full(bits.shape, 0xFFFF, np.uint64)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFFFFFF) >> 16
    return np.where(nan, nan_bits, out).astype(np.uint16).view(ml_dtypes.bfloat16)


def peer_dequantize(packed: Any, state: Any, path: str, h: Host | None = None) -> np.ndarray:
    """bitsandbytes 0.50.2's CPU ``dequantize_4bit`` output on ``path``, computed in NumPy.

    ``state`` is a refimpl.quant.QuantState (its float32 block scales, nested ones rebuilt as bitsandbytes
    does, spec/nf4.md §7). out = cast(f32(code[nibble] · absmax[index])) with, per path:

    * AVX512: index = row · (cols // bs) + col // bs; FP4 nibble 8 = +0.0; bf16 by the kernel's conversion;
    * SCALAR: index = flat // bs; FP4 nibble 8 = −0.0; bf16 by ``float_to_bf16`` (RNE bit arithmetic);
    * torch paths: index = flat // bs; FP4 nibble 8 = +0.0; torch's round-to-nearest-even casts.
    """
    from refimpl.quant.blockwise import unpack_nibbles
    from refimpl.quant.profiles.bitsandbytes_cpu import bf16_cpp

    if path not in PATHS or path == UNKNOWN:
        raise ValueError(f"path: no model of bitsandbytes' dequantize path {path!r}")
    h = host() if path == AVX512 and h is None else h
    n, bs = state.n, state.blocksize
    nib = unpack_nibbles(np.asarray(packed), n).astype(np.intp)
    code = np.asarray(state.code, dtype=np.float32).copy()
    if state.quant_type == "fp4":
        code[8] = np.float32(-0.0) if path == SCALAR else np.float32(0.0)
    flat = np.arange(n, dtype=np.int64)
    if path == AVX512:
        cols = int(state.shape[-1]) if len(state.shape) else 1
        index = (flat // cols) * (cols // bs) + (flat % cols) // bs
    else:
        index = flat // bs
    with np.errstate(invalid="ignore", over="ignore"):
        values = (code[nib] * state.block_absmax()[index]).astype(np.float32)
    if state.dtype == "bfloat16":
        if path == AVX512:
            out = _bf16_round_bits(values, avx512_bf16=bool(h is not None and h.cpp_bf16))
        elif path == SCALAR:
            out = bf16_cpp(values)
        else:
            out = values.astype(ml_dtypes.bfloat16)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            out = values.astype(np.dtype(state.dtype))
    return out.reshape(state.shape)


def _model(op: str, case: dict[str, Any], path: str) -> dict[str, np.ndarray] | None:
    if op != "quant.dequantize_4bit":
        return None
    try:
        state, packed = case["state"], case["packed"]
        if dequantize_path(tuple(state.shape), int(state.blocksize)) != path:
            return None
        return {"out": peer_dequantize(packed, state, path)}
    except Exception:  # not a case this model understands (e.g. a malformed special case): no claim
        return None


def avx512_kernel_model(op: str, case: dict[str, Any], expected: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """Known-divergence model: bitsandbytes' AVX-512 dequantize kernel (row-major absmax index, +0.0 for
    FP4 nibble 8). None where the case does not take that kernel on this host."""
    return _model(op, case, AVX512)


def avx512_torch_fallback_model(
    op: str, case: dict[str, Any], expected: dict[str, Any]
) -> dict[str, np.ndarray] | None:
    """Known-divergence model: the torch fallback bitsandbytes takes on an AVX-512 host for blocksize ≥ 2048
    (+0.0 for FP4 nibble 8 where the C++ scalar loop gives −0.0). None on any other path."""
    return _model(op, case, TORCH_BS)


def transpose_shim_model(op: str, case: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any] | None:
    """Known-divergence model: ``functional.dequantize_4bit`` returns ``out.t()`` whenever the packed array has
    one row (a backward-compatibility shim for the transposed ``[1, m]`` layout). Packed data of at most two
    elements is always ``(1, 1)``, so a 3-D tensor of one or two elements raises RuntimeError (2-D ones come back
    transposed, which the adapter reshapes). On every CPU path."""
    if op != "quant.dequantize_4bit":
        return None
    try:
        packed, state = np.asarray(case["packed"]), case["state"]
        if packed.ndim == 2 and packed.shape[0] == 1 and len(tuple(state.shape)) >= 3:
            return {"raises": "RuntimeError"}
    except Exception:
        return None
    return None


def host_lines(counts: dict[str, int] | None = None, h: Host | None = None) -> list[str]:
    """Lines for the verdict table: the host, the paths taken (with counts) and what was not exercised."""
    h = host() if h is None else h
    yes = {True: "yes", False: "no", None: "unknown"}
    lines = [
        f"bitsandbytes {h.bnb_version} CPU dequantize_4bit on {h.machine}: avx512f {yes[h.avx512f]} "
        f"(cpuid), torch CPU capability {h.torch_capability}, C++ kernel for shape[-1] % 16 == 0 "
        f"(probed): {LABELS[h.kernel]}"
    ]
    if counts is not None:
        ran = ", ".join(f"{LABELS[p]} {counts[p]}" for p in PATHS if counts.get(p))
        lines.append(f"dequantize paths taken: {ran or 'none (no dequantize_4bit case ran)'}")
    if h.kernel != AVX512:
        why = "this host has no AVX-512" if not h.avx512f else "the library's C++ kernel is not the AVX-512 one"
        lines.append(
            f"the AVX-512 dequantize kernel was NOT exercised ({why}): its known divergences "
            "(row-major absmax index, +0.0 for FP4 nibble 8) were not checked here"
        )
    elif counts is not None and not counts.get(AVX512):
        lines.append(
            "the AVX-512 dequantize kernel was available but no case took it "
            "(it needs shape[-1] % 16 == 0 and blocksize < 2048)"
        )
    return lines
