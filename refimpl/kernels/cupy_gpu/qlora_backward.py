"""The QLoRA backward on the GPU (Dettmers et al., arXiv 2305.14314, §3; spec/nf4.md §13.1), float32.

With Ŵ = dequantize_4bit(packed, state) (frozen: no gradient), x̃ = x ⊙ keep (keep = mask / (1 − p)),
h = x̃ Aᵀ and g = ∂L/∂y:

    ∂L/∂B = s · gᵀ h,    ∂L/∂A = (s · g B)ᵀ x̃,    ∂L/∂x = g Ŵ + ((s · g B) A) ⊙ keep,    ∂L/∂b = Σ g

``backward`` takes device arrays: Ŵ is decoded once by the NF4/FP4 dequantize kernel (``nf4.dequantize_4bit``)
in the state's dtype, exactly the reference's values, then widened to float32 (exact); the five products are
cuBLAS float32 GEMMs, and the keep factor is applied by two fused elementwise kernels (x̃ = x ⊙ keep, and
∂L/∂x = g Ŵ + lora ⊙ keep in one pass over (N, in)). Every state dtype and the train form (a keep mask) are
supported. The error against the float64 reference is bounded like ``lora.backward``'s in float32 (the
conformance row's bound at compute dtype float32).

``qlora_backward`` is the op under the reference's name and signature (NumPy in, NumPy out) for the kernel
registry and ``refimpl conform --target cupy``: the reference's checks, upload, ``backward``, download.
Importing this module does not import CuPy.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from refimpl import _checks
from refimpl._linear_operands import adapter_operands
from refimpl.kernels.cupy_gpu import nf4
from refimpl.kernels.cupy_gpu.numpy_adapter import to_gpu_state
from refimpl.qlora import QLoraGrads
from refimpl.quant import QuantState
from refimpl.quant.operands import PROFILES


def _cp():
    import cupy as cp  # optional dependency: imported only when a kernel runs

    return cp


@functools.cache
def _masked_kernel():
    """x̃ = x ⊙ keep, float32."""
    return _cp().ElementwiseKernel("float32 x, float32 keep", "float32 xd", "xd = x * keep", "refimpl_qlora_dropped")


@functools.cache
def _dx_kernel():
    """∂L/∂x = base + lora ⊙ keep in one pass (base = g Ŵ, lora = (s·g B) A), float32, in place in ``base``."""
    return _cp().ElementwiseKernel(
        "float32 lora, float32 keep", "float32 base", "base = base + lora * keep", "refimpl_qlora_dx"
    )


def weight_f32(packed: Any, gstate: nf4.GpuQuantState) -> Any:
    """Ŵ (out, in) as float32 on the device: decoded in the state's dtype (the reference's values), widened."""
    cp = _cp()
    w = nf4.dequantize_4bit(packed, gstate, out_dtype=gstate.dtype)
    if gstate.dtype == "bfloat16":  # bfloat16 travels as its uint16 bits: the upper half of a float32
        return (w.astype(cp.uint32) << 16).view(cp.float32)
    return w.astype(cp.float32, copy=False)


def backward(
    x: Any,
    packed: Any,
    gstate: nf4.GpuQuantState,
    A: Any,
    B: Any,
    grad_y: Any,
    scaling: float,
    keep: Any = None,
    *,
    need_dbias: bool = False,
) -> tuple[Any, Any, Any, Any]:
    """(∂L/∂x, ∂L/∂A, ∂L/∂B, ∂L/∂b or None) for float32 CuPy arrays x (N, in), grad_y (N, out), A (r, in),
    B (out, r), keep (N, in) or None; ``packed``/``gstate`` the 4-bit (out, in) weight on the device."""
    cp = _cp()
    s = np.float32(scaling)
    xd = x if keep is None else _masked_kernel()(x, keep)
    h = xd @ A.T
    gb = grad_y @ B
    gb *= s  # ∂L/∂h = s · g B
    dB = grad_y.T @ h
    dB *= s
    dA = gb.T @ xd
    dx = grad_y @ weight_f32(packed, gstate)  # the base term g Ŵ: the frozen weight passes the gradient on
    lora_dx = gb @ A
    if keep is None:
        dx += lora_dx
    else:
        _dx_kernel()(lora_dx, keep, dx)
    dbias = grad_y.sum(axis=0) if need_dbias else None
    return dx, dA, dB, (None if dbias is None else cp.ascontiguousarray(dbias))


# ------------------------------------------------------------------------------------------- NumPy in, NumPy out


def _weight_operands(packed: Any, state: Any, profile: Any) -> np.ndarray:
    """The reference's checks of a 2-D 4-bit weight (same messages); the packed bytes as a column."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state: expected a refimpl.quant.QuantState, got {_checks.describe(state)}")
    if len(state.shape) != 2:
        raise ValueError(f"state: expected a 2-D (out_features, in_features) weight, got shape {state.shape}")
    if profile is not None:
        _checks.choice(profile, "profile", PROFILES)  # FP4's zero sign only: it changes no gradient
    p = np.asarray(packed)
    if p.dtype != np.uint8:
        raise TypeError(f"packed: expected uint8 packed codes, got {_checks.describe(p)}")
    if p.size != (state.n + 1) // 2:
        raise ValueError(
            f"packed: state describes shape {state.shape} ({state.n} elements, "
            f"{(state.n + 1) // 2} bytes), got {p.size} bytes"
        )
    return np.ascontiguousarray(p).reshape(-1, 1)


def qlora_backward(
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
    """``refimpl.qlora.backward`` on the GPU (``backward``): operands rounded once to float32, float32 results."""
    p = _weight_operands(packed, state, profile)
    out_f, in_f = state.shape
    ops = adapter_operands(
        x, A, B, scaling, in_features=in_f, out_features=out_f, dropout_mask=dropout_mask, dropout_p=dropout_p
    )
    g = _checks.float_array(grad_y, "grad_y", ndim=ops.x.ndim)
    _checks.check_shape(g, "grad_y", (*ops.x.shape[:-1], out_f))
    want_dbias = _checks.boolean(need_dbias, "need_dbias")
    cp = _cp()

    def up(a: np.ndarray, *shape: int) -> Any:
        return cp.asarray(np.ascontiguousarray(a, dtype=np.float32).reshape(shape))

    dx, dA, dB, dbias = backward(
        up(ops.x, -1, in_f),
        cp.asarray(p),
        to_gpu_state(state),
        up(ops.A, *ops.A.shape),
        up(ops.B, *ops.B.shape),
        up(g, -1, out_f),
        ops.scaling,
        None if ops.keep is None else up(ops.keep, -1, in_f),
        need_dbias=want_dbias,
    )
    return QLoraGrads(
        dx=dx.get().reshape(ops.x.shape), dA=dA.get(), dB=dB.get(), dbias=None if dbias is None else dbias.get()
    )
