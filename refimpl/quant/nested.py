"""Double quantization of the per-block absmax (QLoRA, arXiv 2305.14314, §3 "Double Quantization").

The float32 absmax vector a (one value per 4-bit block) is stored as 8-bit codes:

    offset = mean(a)                      (float32)
    c      = f32(a − offset)              (centred)
    c is quantized blockwise (blocks of 256) with the 8-bit dynamic map d:
        a2_k = max |c| over block k       (float32, stored)
        q_i  = code of f32(c_i · f32(1/a2_k)) in d
    dequantized:  â_i = f32(f32(d[q_i] · a2_k) + offset)

What differs between profiles is the mean's rounding (the reference's ``correctly_rounded_mean``;
bitsandbytes-cpu's torch order, ``profiles.bitsandbytes_cpu.absmax_offset``) and the 8-bit code choice
(``blockwise.quantize_blockwise_8bit``); spec/nf4.md §7.

This module also emulates PyTorch's CPU float32 sum (the "cascade sum" of
aten/src/ATen/native/cpu/SumKernel.cpp), because bitsandbytes' offset is
``torch.mean`` and its last bits depend on the summation order.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

_LANES = 8  # AVX2: Vectorized<float> has 8 lanes
_ILP = 4  # row_sum's ilp_factor
_LEVELS = 4  # multi_row_sum's num_levels
_GRAIN = 32768  # at::internal::GRAIN_SIZE: below it a reduction runs on one thread


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else int(x - 1).bit_length()


def _multi_row_sum(rows: np.ndarray) -> np.ndarray:
    """multi_row_sum: rows (size, width) float32 → per-column float32 sums, summed in
    groups of 2^level_power rows, each group's total carried up through 4 levels."""
    size, width = rows.shape
    level_power = max(4, _ceil_log2(size) // _LEVELS)
    step = 1 << level_power
    mask = step - 1
    acc = np.zeros((_LEVELS, width), dtype=np.float32)
    n_groups = size // step
    if n_groups:
        # Each group starts from acc[0] == 0, so its total is a sequential sum of its rows.
        groups = rows[: n_groups * step].reshape(n_groups, step, width)
        group_sums = np.add.accumulate(groups, axis=1, dtype=np.float32)[:, -1, :]
        i = 0
        for g in range(n_groups):
            acc[0] = group_sums[g]
            i += step
            for j in range(1, _LEVELS):
                acc[j] = acc[j] + acc[j - 1]
                acc[j - 1] = 0
                if i & (mask << (j * level_power)):
                    break
    for r in rows[n_groups * step :]:
        acc[0] = acc[0] + r
    for j in range(1, _LEVELS):
        acc[0] = acc[0] + acc[j]
    return acc[0]


def _row_sum(values: np.ndarray) -> np.ndarray:
    """row_sum: values (size, lanes); interleave into ilp=4 accumulators, then fold them."""
    size = values.shape[0]
    size_ilp = size // _ILP
    lanes = values.shape[1]
    if size_ilp:
        partial = _multi_row_sum(values[: size_ilp * _ILP].reshape(size_ilp, _ILP * lanes))
        partial = partial.reshape(_ILP, lanes).copy()
    else:
        partial = np.zeros((_ILP, lanes), dtype=np.float32)
    for r in values[size_ilp * _ILP :]:
        partial[0] = partial[0] + r
    for k in range(1, _ILP):
        partial[0] = partial[0] + partial[k]
    return partial[0]


def _cascade_sum_serial(x: np.ndarray) -> np.float32:
    """One thread's contiguous float32 sum (vectorized_inner_sum or scalar_inner_sum)."""
    n = x.size
    if n >= _LANES:
        vec_size = n // _LANES
        lanes = _row_sum(x[: vec_size * _LANES].reshape(vec_size, _LANES))
        total = np.float32(0)
        for v in x[vec_size * _LANES :]:
            total = np.float32(total + v)
        for v in lanes:
            total = np.float32(total + v)
        return total
    return np.float32(_row_sum(x.reshape(n, 1))[0])


def torch_cpu_sum_float32(x: npt.ArrayLike, threads: int = 1) -> np.float32:
    """Emulate ``torch.sum`` of a contiguous 1-D float32 tensor on an x86-64 AVX2 CPU.

    Above GRAIN_SIZE elements the sum is split into min(threads, ⌈n/32768⌉) contiguous
    chunks of ⌈n/chunks⌉ elements; each chunk is cascade-summed and the per-thread partial
    sums (``threads`` slots, unused ones 0) are cascade-summed again. AVX-512 builds use
    16 lanes and are not emulated.
    """
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    n = x.size
    if n < _GRAIN or threads <= 1:
        return np.float32(np.float32(0) + _cascade_sum_serial(x))
    tasks = min(threads, -(-n // _GRAIN))
    chunk = -(-n // tasks)
    buffer = np.zeros(threads, dtype=np.float32)
    for t in range(tasks):
        part = x[t * chunk : min(n, (t + 1) * chunk)]
        if part.size:
            buffer[t] = np.float32(0) + _cascade_sum_serial(part)
    return np.float32(np.float32(0) + _cascade_sum_serial(buffer))


def correctly_rounded_mean(absmax: npt.ArrayLike) -> np.float32:
    """offset = f32(Σa / n), the correctly rounded mean (math.fsum): the reference's offset, and the
    bitsandbytes-cuda profile's (CUDA's reduction order is not emulated; spec/nf4.md §7). A NaN or +inf
    absmax (nonfinite="propagate") gives a NaN or +inf mean."""
    a = np.asarray(absmax, dtype=np.float32)
    if not np.isfinite(a).all():
        return np.float32(np.mean(a.astype(np.float64)))
    return np.float32(math.fsum(a.astype(np.float64).tolist()) / a.size)


def nested_scales(
    dq: npt.NDArray[np.float32], a2: npt.NDArray[np.float32], offset: np.float32
) -> npt.NDArray[np.float32]:
    """â = f32(f32(d[q] · a2) + offset), with dq = d[q] and a2 repeated per block: the reference's rule."""
    return (dq * a2 + np.float32(offset)).astype(np.float32)


NestedRule = Callable[[npt.NDArray[np.float32], npt.NDArray[np.float32], np.float32], npt.NDArray[np.float32]]


def dequantize_nested_absmax(
    codes: npt.ArrayLike,
    nested_absmax: npt.ArrayLike,
    nested_code: npt.ArrayLike,
    offset: np.float32,
    nested_blocksize: int = 256,
    rule: NestedRule = nested_scales,
) -> npt.NDArray[np.float32]:
    """â_i = f32(f32(d[q_i] · a2[i // 256]) + offset): the per-block float32 scales of a nested state
    (``rule``: a profile's ``nested_scales``, e.g. bitsandbytes-cuda's flush of subnormals)."""
    q = np.asarray(codes, dtype=np.uint8).ravel()
    a2 = np.repeat(np.asarray(nested_absmax, dtype=np.float32), nested_blocksize)[: q.size]
    with np.errstate(invalid="ignore", over="ignore"):
        return rule(np.asarray(nested_code, dtype=np.float32)[q], a2, np.float32(offset))
