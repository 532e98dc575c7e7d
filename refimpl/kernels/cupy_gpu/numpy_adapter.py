"""The CuPy kernels under the reference's names and signatures (NumPy in, NumPy out).

The kernels of this package take device arrays and a device-side ``GpuQuantState``; this module adapts
them to the calling convention of ``refimpl.<module>.<function>`` so that the kernel registry
(``refimpl.kernels``, through ``OPS`` in this package) and the conformance harness
(``refimpl conform --target cupy``) find them. Each function validates its arguments with the
reference's own rules (same ValueError/TypeError for the same bad input), uploads the operands with CuPy,
launches the kernel and returns ``.get()`` of the result. Arguments the kernels do not implement raise
NotImplementedError naming the argument, before anything touches the GPU.

What the kernels compute, and so what a conforming result means here (``COMPUTE_DTYPES``, ``OPTIONS``):

    lora.forward       eval form y = x Wᵀ + b + s·(x Aᵀ) Bᵀ (Hu et al., arXiv 2106.09685, eq. 3), one cuBLAS
                       GEMM over K = d + r (+1), float32 operands and accumulation; no dropout_mask
    dora.forward       eval form y = f ⊙ (x (W + s·B A)ᵀ) + b, f = m / ‖W + s·B A‖_row (Liu et al.,
                       arXiv 2402.09353, eq. 5), float32; no dropout_mask
    qlora.forward      y = x·Ŵᵀ + b + s·(x Aᵀ) Bᵀ with Ŵ = f32(code · absmax) (QLoRA, arXiv 2305.14314,
                       eq. 5): the fused 4-bit GEMV for ≤ 16 rows and K % 32 == 0, else dequantize + GEMM
    quant.quantize_4bit, quant.dequantize_4bit
                       NF4/FP4 blockwise storage with bitsandbytes' CUDA rules: profile="bitsandbytes-cuda"
                       bit for bit; the nested offset is the profile's mean (see ``quantize_4bit``)
    merging.ties       TIES (Yadav et al., arXiv 2306.01708) on float32 task vectors, float64 arithmetic in
                       the reference's order, result rounded once to float32; no L1 rescale, ≤ 16 tasks

fan_in_fan_out (W stored (in, out)) is a layout only: W is transposed on the host before the upload.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

from refimpl import _checks
from refimpl._linear_operands import adapter_operands, linear_operands
from refimpl.kernels.cupy_gpu import nf4
from refimpl.kernels.cupy_gpu.lora_batched import forward_batched as lora_forward_batched  # noqa: F401 (OPS names it)
from refimpl.merging import operands
from refimpl.merging.profiles import ties_rules
from refimpl.quant import QuantState, codebooks
from refimpl.quant.blockwise import profile_steps
from refimpl.quant.operands import NESTED_BLOCKSIZE, PROFILES, quant_operands

#: the profile of refimpl.quant that the quant kernels reproduce bit for bit
PROFILE = "bitsandbytes-cuda"

#: the precision each op computes in (the conformance bounds widen to it)
COMPUTE_DTYPES: dict[str, str] = {
    "lora.forward": "float32",
    "lora.forward_batched": "float32",
    "dora.forward": "float32",
    "qlora.forward": "float32",
    "qlora.backward": "float32",  # qlora_backward.py (every state dtype, dropout mask included)
    "merging.ties": "float32",
    "quant.quantize_4bit": "float32",
    "quant.dequantize_4bit": "float32",
}

#: keyword arguments the conformance harness adds to every case of an op, for the reference and this
#: target alike: the quant ops run under the profile the kernels reproduce; the LoRA/DoRA kernels are the
#: eval form, so a drawn keep mask is replaced by None (the train form is not checked on this target)
OPTIONS: dict[str, dict[str, Any]] = {
    "quant.quantize_4bit": {"profile": PROFILE},
    "quant.dequantize_4bit": {"profile": PROFILE},
    "lora.forward": {"dropout_mask": None},
    "dora.forward": {"dropout_mask": None},
    "qlora.forward": {"dropout_mask": None},
}


def unsupported(op: str, case: dict[str, Any]) -> str | None:
    """Cases outside what the kernels implement (the harness reports them as not run, with this reason)."""
    if op == "qlora.forward":
        dtype = getattr(case.get("state"), "dtype", "float32")
        if dtype not in ("float32", "float64"):
            return f"the fused QLoRA kernels use the unrounded float32 weight; a {dtype} state rounds it"
    if op == "merging.ties" and case.get("rescale") is not None:
        return "the CuPy TIES kernel has no L1 rescale (rescale='l1')"
    if op == "merging.ties" and (
        case.get("profile") == "mergelm"
        or case.get("k_rule") == "mask_rate"
        or case.get("zero_sign") == "global_majority_zero"
    ):
        return "the CuPy TIES kernel has no MergeLM rules (k_rule='mask_rate', zero_sign='global_majority_zero')"
    return None


_BF16 = np.dtype(ml_dtypes.bfloat16)
_KERNEL_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", _BF16: "bfloat16"}
_MAX_RANK = 256  # lora_gemm.pack
_MAX_TASKS = 16  # ties.MAX_TASKS


# ------------------------------------------------------------------------------------------- transfers


def _cp():
    import cupy as cp

    return cp


def _upload(a: np.ndarray) -> tuple[Any, str]:
    """A C-contiguous device copy of a float32/float16/bfloat16 array and its kernel dtype name
    (bfloat16 travels as its uint16 bits)."""
    a = np.ascontiguousarray(a)
    dtype = _KERNEL_DTYPES[np.dtype(a.dtype)]
    return _cp().asarray(a.view(np.uint16) if dtype == "bfloat16" else a), dtype


def _upload32(a: np.ndarray) -> Any:
    """A float32 device copy (one rounding of a float64 operand)."""
    return _cp().asarray(np.ascontiguousarray(a, dtype=np.float32))


def _host(a: Any, dtype: str | None = None) -> np.ndarray:
    h = a.get()
    return h.view(_BF16) if dtype == "bfloat16" else h


def _no_dropout(keep: np.ndarray | None) -> None:
    """The kernels are the eval form: a (checked) keep mask is not implemented."""
    if keep is not None:
        raise NotImplementedError(
            "dropout_mask: the CuPy LoRA/DoRA/QLoRA kernels implement the eval form only (no keep mask); "
            "use refimpl.lora / refimpl.dora / refimpl.qlora or the numba backend for the train form"
        )


# ------------------------------------------------------------------------------------------- LoRA, DoRA


def _gemm_rank(rank: int) -> None:
    if rank > _MAX_RANK:
        raise NotImplementedError(f"A: the CuPy LoRA GEMM packs ranks up to {_MAX_RANK}, got r = {rank}")


def lora_forward(
    x: Any,
    W: Any,
    A: Any,
    B: Any,
    scaling: float,
    *,
    bias: Any = None,
    dropout_mask: Any = None,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
) -> np.ndarray:
    """``refimpl.lora.forward`` (eval form) on the GPU: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, float32 (arXiv 2106.09685).

    One cuBLAS GEMM [x | s·x Aᵀ | 1] · [W | B | b]ᵀ (``lora_gemm.forward``); operands are rounded once
    to float32. ``dropout_mask`` is not implemented (NotImplementedError).
    """
    ops = linear_operands(
        x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask, dropout_p=dropout_p, fan_in_fan_out=fan_in_fan_out
    )
    _no_dropout(ops.keep)
    _gemm_rank(ops.rank)
    from refimpl.kernels.cupy_gpu import lora_gemm  # cupy is optional: imported only when a kernel runs

    y = lora_gemm.forward(
        _upload32(ops.x.reshape(-1, ops.in_features)),
        _upload32(ops.W),
        _upload32(ops.A),
        _upload32(ops.B),
        ops.scaling,
        bias=None if ops.bias is None else _upload32(ops.bias),
    )
    return _host(y).reshape(*ops.x.shape[:-1], ops.out_features)


def dora_forward(
    x: Any,
    W: Any,
    A: Any,
    B: Any,
    m: Any,
    scaling: float,
    *,
    bias: Any = None,
    dropout_mask: Any = None,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
) -> np.ndarray:
    """``refimpl.dora.forward`` (eval form) on the GPU: y = f ⊙ (x (W + s·B A)ᵀ) + b, f = m / ‖W + s·B A‖_row
    (arXiv 2402.09353, eq. 5), as one GEMM over [f⊙W | f⊙B | b]. float32 operands (m included);
    ``dropout_mask`` (the train form) is not implemented. A zero row norm raises ValueError, as the reference.
    """
    ops = linear_operands(
        x, W, A, B, scaling, bias=bias, dropout_mask=dropout_mask, dropout_p=dropout_p, fan_in_fan_out=fan_in_fan_out
    )
    m_arr = _checks.float_array(m, "m", ndim=1)
    _checks.check_shape(m_arr, "m", (ops.out_features,))
    _no_dropout(ops.keep)
    _gemm_rank(ops.rank)
    from refimpl.kernels.cupy_gpu import lora_gemm  # cupy is optional: imported only when a kernel runs

    y = lora_gemm.dora_forward(
        _upload32(ops.x.reshape(-1, ops.in_features)),
        _upload32(ops.W),
        _upload32(ops.A),
        _upload32(ops.B),
        _upload32(m_arr),
        ops.scaling,
        bias=None if ops.bias is None else _upload32(ops.bias),
    )
    return _host(y).reshape(*ops.x.shape[:-1], ops.out_features)


# ------------------------------------------------------------------------------------------- NF4 / FP4


def _quant_state(state: Any) -> QuantState:
    if not isinstance(state, QuantState):
        raise TypeError(f"state: expected a refimpl.quant.QuantState, got {_checks.describe(state)}")
    return state


def _packed(packed: Any, state: QuantState) -> np.ndarray:
    p = np.asarray(packed)
    if p.dtype != np.uint8:
        raise TypeError(f"packed: expected uint8 packed codes, got {_checks.describe(p)}")
    if p.size != (state.n + 1) // 2:
        raise ValueError(
            f"packed: state describes shape {state.shape} ({state.n} elements, "
            f"{(state.n + 1) // 2} bytes), got {p.size} bytes"
        )
    return np.ascontiguousarray(p).reshape(-1, 1)


def to_gpu_state(state: QuantState) -> Any:
    """A ``GpuQuantState`` holding the device copies of a reference ``QuantState``'s statistics.

    The kernels use their own code tables (the standard NF4/FP4 codebooks, the dynamic 8-bit map, nested
    blocks of 256); a state with other tables raises NotImplementedError naming the field.
    """
    state = _quant_state(state)
    cp = _cp()
    if not np.array_equal(state.code, codebooks.codebook(state.quant_type)):  # −0.0 == +0.0: FP4's zero sign
        raise NotImplementedError(
            f"state.code: the CuPy kernels use the standard {state.quant_type} codebook; "
            "this state carries another table"
        )
    dtype = state.dtype if state.dtype in ("float32", "float16", "bfloat16") else "float32"
    if not state.nested:
        return nf4.GpuQuantState(cp.asarray(state.absmax), tuple(state.shape), dtype, state.blocksize, state.quant_type)
    if state.nested_blocksize != NESTED_BLOCKSIZE:
        raise NotImplementedError(
            f"state.nested_blocksize: the CuPy kernels use {NESTED_BLOCKSIZE}, got {state.nested_blocksize}"
        )
    if state.nested_code is None or not np.array_equal(state.nested_code, codebooks.codebook("dynamic8")):
        raise NotImplementedError("state.nested_code: the CuPy kernels use the dynamic 8-bit map")
    return nf4.GpuQuantState(
        cp.asarray(state.absmax),
        tuple(state.shape),
        dtype,
        state.blocksize,
        state.quant_type,
        cp.asarray(state.nested_absmax),
        cp.asarray(np.array([state.offset], np.float32)),
    )


def from_gpu_state(gstate: Any, *, shape: tuple[int, ...], dtype: str, profile: str = PROFILE) -> QuantState:
    """The reference ``QuantState`` of a ``GpuQuantState`` (statistics copied to the host)."""
    code = codebooks.codebook(gstate.quant_type)
    if not gstate.nested:
        return QuantState(
            shape=shape,
            dtype=dtype,
            blocksize=gstate.blocksize,
            quant_type=gstate.quant_type,
            absmax=_host(gstate.absmax),
            code=code,
            profile=profile,
        )
    return QuantState(
        shape=shape,
        dtype=dtype,
        blocksize=gstate.blocksize,
        quant_type=gstate.quant_type,
        absmax=_host(gstate.absmax),
        code=code,
        offset=np.float32(_host(gstate.offset).reshape(-1)[0]),
        nested_absmax=_host(gstate.absmax2),
        nested_code=codebooks.codebook("dynamic8"),
        profile=profile,
    )


def _profile_only(profile: Any) -> str:
    p = _checks.choice(profile, "profile", PROFILES)
    if p != PROFILE:
        raise NotImplementedError(f"profile: the CuPy quant kernels reproduce profile={PROFILE!r} only, got {p!r}")
    return p


def quantize_4bit(
    x: Any,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = False,
    *,
    profile: str = "reference",
    nonfinite: str | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, QuantState]:
    """``refimpl.quant.quantize_4bit`` with ``profile="bitsandbytes-cuda"`` on the GPU (QLoRA eq. 1).

    float32/float16/bfloat16 ``x`` of any shape; returns (packed uint8 ((n+1)//2, 1), QuantState).
    Nested statistics: the 8-bit codes and a2 come from the GPU kernel; the offset (the mean of absmax)
    is the profile's correctly rounded mean, computed on the host from the kernel's absmax and handed to
    the kernel, because neither CuPy's nor torch's CUDA summation order is reproduced by the profile
    (spec/nf4.md §7). ``threads`` only matters to the bitsandbytes-cpu profile and is validated only.
    Any other profile raises NotImplementedError.
    """
    _profile_only(profile)
    ops = quant_operands(
        x, blocksize, quant_type, double_quant, profile=profile, nonfinite=nonfinite, threads=threads
    )  # the reference's checks
    xd, kdt = _upload(ops.x)
    packed, gstate = nf4.quantize_4bit(xd, ops.blocksize, ops.quant_type, dtype=kdt)
    if ops.double_quant:
        offset = profile_steps(ops.profile).absmax_offset(_host(gstate.absmax), ops.threads)
        codes, absmax2, off = nf4.quantize_absmax(gstate.absmax, offset=_cp().asarray(np.array([offset], np.float32)))
        gstate = nf4.GpuQuantState(codes, gstate.shape, gstate.dtype, ops.blocksize, ops.quant_type, absmax2, off)
    return _host(packed), from_gpu_state(gstate, shape=ops.shape, dtype=ops.dtype, profile=ops.profile)


def dequantize_4bit(packed: Any, state: QuantState, *, profile: str | None = None) -> np.ndarray:
    """``refimpl.quant.dequantize_4bit`` on the GPU: x̂ = RNE_dtype(f32(code[nib] · absmax)), shape and dtype
    of the state; nested absmax rebuilt in the kernel. The effective profile (``profile``, else the state's)
    must be bitsandbytes-cuda (FP4's nibble 8 dequantizes to −0.0 as in CUDA)."""
    st = _quant_state(state)
    _profile_only(st.profile if profile is None else profile)
    p = _packed(packed, st)
    gstate = to_gpu_state(st)
    out_dtype = gstate.dtype
    out = _host(nf4.dequantize_4bit(_cp().asarray(p), gstate, out_dtype=out_dtype), out_dtype)
    if st.dtype == "float64":  # exact widening, as the reference's float64 output
        out = out.astype(np.float64)
    return out.reshape(st.shape)


def qlora_forward(
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
    """``refimpl.qlora.forward`` (eval form) on the GPU: y = x·Ŵᵀ + b + s·(x Aᵀ) Bᵀ (QLoRA eq. 5), float32.

    The 4-bit weight is read as codes plus absmax (fused GEMV for ≤ 16 rows when in % 32 == 0, else one
    dequantization and the LoRA GEMM). The kernels use Ŵ = f32(code · absmax) unrounded, which is the
    reference's weight for float32 and float64 states; float16/bfloat16 states (rounded Ŵ) raise
    NotImplementedError, as does ``dropout_mask``.
    """
    st = _quant_state(state)
    if len(st.shape) != 2:
        raise ValueError(f"state: expected a 2-D (out_features, in_features) weight, got shape {st.shape}")
    if profile is not None:
        _checks.choice(profile, "profile", PROFILES)
    p = _packed(packed, st)
    out_f, in_f = st.shape
    ops = adapter_operands(
        x,
        A,
        B,
        scaling,
        in_features=in_f,
        out_features=out_f,
        bias=bias,
        dropout_mask=dropout_mask,
        dropout_p=dropout_p,
    )
    _no_dropout(ops.keep)
    if st.dtype not in ("float32", "float64"):
        raise NotImplementedError(
            f"state.dtype: the CuPy QLoRA kernels use the float32 weight f32(code·absmax); "
            f"a {st.dtype} state's weight is rounded to {st.dtype} by the reference"
        )
    if not (ops.x.size // in_f <= 16 and in_f % 32 == 0):  # the dequantize + GEMM path
        _gemm_rank(ops.rank)
    from refimpl.kernels.cupy_gpu import gemv4  # cupy is optional: imported only when a kernel runs

    y = gemv4.qlora_forward(
        _upload32(ops.x.reshape(-1, in_f)),
        _cp().asarray(p),
        to_gpu_state(st),
        _upload32(ops.A),
        _upload32(ops.B),
        ops.scaling,
        bias=None if ops.bias is None else _upload32(ops.bias),
    )
    return _host(y).reshape(*ops.x.shape[:-1], out_f)


# ------------------------------------------------------------------------------------------- TIES


def ties(
    task_vectors: Sequence[Any],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    profile: str = "paper",
    k_rule: str | None = None,
    elect: str | None = None,
    zero_sign: str | None = None,
    weight_stage: str | None = None,
    divisor: str | None = None,
    rescale: str | None = None,
    lam: float = 1.0,
) -> np.ndarray:
    """``refimpl.merging.ties`` on the GPU (arXiv 2306.01708, Algorithm 1): radix-select trim and one fused
    elect + disjoint-merge pass over float32 task vectors (operands rounded once to float32), float64
    arithmetic, result float32. ``rescale="l1"`` and more than 16 tasks raise
    NotImplementedError."""
    ops = operands.task_operands(task_vectors, weights, density=density, lam=lam)
    rules = ties_rules(
        profile,
        k_rule=k_rule,
        elect=elect,
        zero_sign=zero_sign,
        weight_stage=weight_stage,
        divisor=divisor,
        rescale=rescale,
    )
    if rules.rescale != "none":
        raise NotImplementedError(f"rescale: the CuPy TIES kernel has no L1 rescale, got {rules.rescale!r}")
    if len(ops.taus) > _MAX_TASKS:
        raise NotImplementedError(
            f"task_vectors: the CuPy TIES kernel merges at most {_MAX_TASKS} tasks, got {len(ops.taus)}"
        )
    # the package rebinds its attribute ``ties`` to the function, so the submodule is taken by its full name
    _ties = importlib.import_module("refimpl.kernels.cupy_gpu.ties")
    out = _ties.ties(
        [_upload32(t) for t in ops.taus],
        [float(v) for v in ops.weights],
        density=[float(v) for v in ops.densities],
        k_rule=rules.k_rule,
        elect=rules.elect,
        zero_sign=rules.zero_sign,
        weight_stage=rules.weight_stage,
        divisor=rules.divisor,
        lam=ops.lam,
        out_dtype="float32",
    )
    return _host(out).reshape(ops.taus[0].shape)
