"""Merge whole models stored as safetensors files, tensor by tensor, in the memory of a few tensors.

Every input tensor is read on its own through ``safetensors.safe_open(framework="numpy")`` (the
file is memory-mapped; each read opens and closes it, so no mapping outlives one tensor), merged
with one of this package's per-tensor operations, and streamed into output shards written by a
small safetensors writer (header first, then each tensor's bytes as it is produced). Shards are
written to temporary files and renamed into place only after every tensor succeeded, so a failure
never leaves a partial output. Per-tensor tasks may run on any ``concurrent.futures.Executor``
(threads, processes, a Dask ``distributed`` client's ``get_executor()``); results are written in order.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

from refimpl import _checks, precision
from refimpl.merging import _common, arithmetic, spherical, ties_dare
from refimpl.merging import sparsify as _sparsify

METHODS = ("task_arithmetic", "ties", "dare", "magnitude_prune", "linear", "slerp")

#: safetensors dtype codes.
_CODES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.uint16): "U16",
    np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64", np.dtype(np.bool_): "BOOL",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2",
}
_FROM_CODE = {v: k for k, v in _CODES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class MergeFilesResult:
    """What ``merge_files`` wrote."""

    files: tuple[str, ...]  #: shard paths (and the index file when there are several shards)
    n_tensors: int
    total_bytes: int  #: bytes of tensor data written
    largest_tensor: str
    largest_tensor_bytes: int  #: of the largest output tensor, in its stored dtype
    shard_of: dict[str, str] = field(repr=False, default_factory=dict)


def _files_of(spec: Any, name: str) -> list[str]:
    """A model is a .safetensors file, a directory of them, or a list of files."""
    if isinstance(spec, (str, os.PathLike)):
        p = Path(spec)
        if p.is_dir():
            files = sorted(str(f) for f in p.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{name}: directory {str(p)!r} holds no *.safetensors file")
            return files
        if not p.is_file():
            raise ValueError(f"{name}: expected an existing .safetensors file or directory, got {str(p)!r}")
        return [str(p)]
    if isinstance(spec, Sequence) and spec and all(isinstance(s, (str, os.PathLike)) for s in spec):
        out = []
        for i, s in enumerate(spec):
            out += _files_of(s, f"{name}[{i}]")
        return out
    raise TypeError(f"{name}: expected a path or a non-empty list of paths, got {_checks.describe(spec)}")


def read_index(spec: Any, name: str = "model") -> dict[str, TensorInfo]:
    """Name → (file, shape, dtype) for every tensor of a model, from the safetensors headers only."""
    index: dict[str, TensorInfo] = {}
    for path in _files_of(spec, name):
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                if key in index:
                    raise ValueError(f"{name}: tensor {key!r} appears in both {index[key].file} and {path}")
                sl = f.get_slice(key)
                code = sl.get_dtype()
                if code not in _FROM_CODE:
                    raise TypeError(f"{name}: tensor {key!r} has unsupported dtype {code}")
                index[key] = TensorInfo(path, tuple(int(s) for s in sl.get_shape()), _FROM_CODE[code])
    return index


def _load(info: TensorInfo, key: str) -> np.ndarray:
    with safe_open(info.file, framework="numpy") as f:
        return f.get_tensor(key)


@dataclass(frozen=True)
class _Task:
    """One output tensor: everything a worker needs (picklable, no open files)."""

    key: str
    base: TensorInfo
    models: tuple[TensorInfo, ...]
    method: str
    weights: tuple[float, ...] | None
    options: tuple[tuple[str, Any], ...]
    seed: int


def _merge_tensor(task: _Task) -> np.ndarray:
    """Read one tensor from every input, merge it in float64, round once to the base dtype.

    The task vectors are built one model at a time and handed to the in-place cores of ``ties`` /
    ``dare`` (options were validated by ``merge_files``), so the working set is about T + 4 float64
    copies of this tensor.
    """
    base = _load(task.base, task.key)
    dt = np.dtype(base.dtype)
    if dt not in _checks.FLOAT_DTYPES:
        return np.ascontiguousarray(base)  # integer/bool buffers are copied from the base
    opts = dict(task.options)
    w = _common.weight_vector(task.weights, len(task.models))
    if task.method == "linear":
        merged = arithmetic.linear([_load(m, task.key) for m in task.models], w, **opts)
    elif task.method == "slerp":
        merged = spherical.slerp(opts.pop("t"), base, _load(task.models[0], task.key), **opts)
    else:
        taus = []
        for m in task.models:
            tau = np.subtract(_load(m, task.key), base, dtype=np.float64)
            _finite(tau, task.key, m.file)
            taus.append(tau)
        merged = _merge_task_vectors(task, taus, w, opts)
        del taus
        np.add(merged, base, out=merged)
    if dt == np.dtype(ml_dtypes.bfloat16):
        return np.ascontiguousarray(precision.round_to(merged, dt).astype(dt))
    return np.ascontiguousarray(merged.astype(dt))  # float64 -> float32/float16: one correct rounding


def _finite(tau: np.ndarray, key: str, file: str) -> None:
    if not np.isfinite(tau).all():
        bad = int(np.flatnonzero(~np.isfinite(tau.ravel()))[0])
        raise ValueError(f"{file}: tensor {key!r}: expected finite values, got a non-finite task-vector "
                         f"entry at flat index {bad}")


def _merge_task_vectors(task: _Task, taus: list[np.ndarray], w: np.ndarray, opts: dict) -> np.ndarray:
    lam = float(opts.pop("lam", 1.0))
    if task.method == "task_arithmetic":
        return arithmetic.task_arithmetic_owned(taus, w, lam, bool(opts.get("normalize", False)))
    if task.method == "magnitude_prune":
        return _sparsify.magnitude_prune(taus, w, lam=lam, **opts)
    d = _sparsify.densities(opts.pop("density"), len(taus))
    profile = opts.pop("profile", "paper")
    if task.method == "ties":
        return ties_dare.ties_owned(taus, w, d, ties_dare.ties_options(profile, **opts), lam)
    merge = opts.pop("merge", "linear")
    rng = np.random.default_rng([task.seed, zlib.crc32(task.key.encode())])
    masks = _sparsify.dare_masks(taus[0].shape, len(taus), d, rng)
    return ties_dare.dare_owned(taus, w, d, masks, ties_dare.dare_options(profile, merge, **opts), lam)


def _header(entries: list[tuple[str, TensorInfo]], metadata: Mapping[str, str]) -> bytes:
    """A safetensors header: 8-byte little-endian length, then JSON padded with spaces to 8 bytes."""
    head: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, info in entries:
        head[key] = {"dtype": _CODES[info.dtype], "shape": list(info.shape),
                     "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.total, self.done, self.enabled = total, 0, enabled
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, unit="tensor", desc="merge_files")

    def step(self, key: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            print(f"\rmerge_files: {self.done}/{self.total} tensors ({key})", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def _plan_shards(keys: list[str], infos: Mapping[str, TensorInfo], shard_size: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nb = infos[key].nbytes
        if shards[-1] and size + nb > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nb
    return shards


def merge_files(
    base: Any,
    models: Sequence[Any],
    out_dir: str | os.PathLike,
    *,
    method: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    options: Mapping[str, Any] | None = None,
    shard_size: int = 5 * 2**30,
    executor: Executor | None = None,
    max_in_flight: int = 2,
    seed: int = 0,
    progress: bool = True,
    prefix: str = "model",
) -> MergeFilesResult:
    """Merge ``models`` into ``base`` tensor by tensor and write safetensors shards to ``out_dir``.

    ``base`` and each of ``models`` is a .safetensors file, a directory of them or a list of files.
    Every floating tensor of the base is merged with ``method``:

    * ``task_arithmetic`` / ``ties`` / ``dare`` / ``magnitude_prune``: θ = θ₀ + f(τ_1 … τ_T), with
      τ_t = θ_t − θ₀ and f the function of that name called with ``weights`` and ``**options``
      (e.g. ``{"density": 0.2, "profile": "mergekit"}``). Scope is per tensor. DARE masks come from
      ``np.random.default_rng([seed, zlib.crc32(name)])`` through ``dare_masks``.
    * ``linear``: ``linear([θ_1 … θ_T], weights, **options)`` (the base supplies names and dtypes).
    * ``slerp``: ``slerp(options["t"], θ₀, θ_1)`` with exactly one model.

    Integer and bool tensors are copied from the base. Every model must hold every base tensor with
    the same shape and dtype (checked from the headers before anything is written). Results are
    computed in float64 and rounded once to the base tensor's dtype. Output: ``{prefix}.safetensors``
    or ``{prefix}-0000i-of-0000N.safetensors`` plus ``{prefix}.safetensors.index.json``, each shard at
    most ``shard_size`` bytes (a larger tensor gets a shard of its own).

    ``executor``: an optional ``concurrent.futures.Executor`` that runs the per-tensor tasks; at most
    ``max_in_flight`` results are pending at once, which bounds memory. Peak memory is about
    (T + 4)·(largest tensor in float64) per task in flight (measured for TIES with T = 2: 5.8×).
    """
    _checks.choice(method, "method", METHODS)
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, Sequence) or not models:
        raise TypeError(f"models: expected a non-empty list of models (paths), got {_checks.describe(models)}")
    if method == "slerp" and len(models) != 1:
        raise ValueError(f"models: slerp merges the base with exactly one model, got {len(models)}")
    if weights is not None:
        weights = tuple(float(w) for w in _common.weight_vector(weights, len(models)))
    opts = dict(options or {})
    if method == "slerp" and "t" not in opts:
        raise ValueError("options: slerp needs options['t'] (0 = base, 1 = the model)")
    if method in ("slerp",) and weights is not None:
        raise ValueError("weights: slerp takes no weights; use options['t']")
    shard_size = _checks.integer(shard_size, "shard_size", low=1)
    max_in_flight = _checks.integer(max_in_flight, "max_in_flight", low=1)
    seed = _checks.integer(seed, "seed", low=0)
    if executor is not None and not isinstance(executor, Executor) and not hasattr(executor, "submit"):
        raise TypeError(f"executor: expected a concurrent.futures.Executor, got {_checks.describe(executor)}")

    base_index = read_index(base, "base")
    model_indexes = [read_index(m, f"models[{i}]") for i, m in enumerate(models)]
    for i, idx in enumerate(model_indexes):
        for key, info in base_index.items():
            if key not in idx:
                raise ValueError(f"models[{i}]: expected tensor {key!r} (present in base), it is missing")
            other = idx[key]
            if other.shape != info.shape or other.dtype != info.dtype:
                raise ValueError(f"models[{i}]: tensor {key!r}: expected shape {info.shape} and dtype "
                                 f"{info.dtype} (as in base), got shape {other.shape} and dtype {other.dtype}")
        extra = sorted(set(idx) - set(base_index))
        if extra:
            raise ValueError(f"models[{i}]: tensors not in base: {extra[:5]}{' …' if len(extra) > 5 else ''}")

    keys = list(base_index)
    frozen_opts = tuple(sorted(opts.items()))
    tasks = [_Task(k, base_index[k], tuple(idx[k] for idx in model_indexes), method, weights, frozen_opts, seed)
             for k in keys]
    # Fail early on bad options: run the first floating tensor's merge on a tiny slice of the data.
    _validate_options(method, weights, opts, len(models))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(keys, base_index, shard_size)
    n = len(shards)
    names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
                                                      for i in range(n)]
    tmp_paths = [out / f".{nm}.tmp-{os.getpid()}" for nm in names]
    metadata = {"format": "pt", "merged_by": "refimpl.merging.merge_files", "method": method}
    bar = _Progress(len(tasks), progress)
    task_iter = iter(tasks)
    pending: deque = deque()

    def submit_next() -> None:
        t = next(task_iter, None)
        if t is not None:
            pending.append((t, executor.submit(_merge_tensor, t) if executor is not None else None))

    try:
        for _ in range(max_in_flight):
            submit_next()
        for shard_keys, tmp in zip(shards, tmp_paths, strict=True):
            with open(tmp, "wb") as fh:
                fh.write(_header([(k, base_index[k]) for k in shard_keys], metadata))
                for key in shard_keys:
                    t, fut = pending.popleft()
                    assert t.key == key
                    arr = fut.result() if fut is not None else _merge_tensor(t)
                    submit_next()
                    if arr.shape != base_index[key].shape or arr.dtype != base_index[key].dtype:
                        raise RuntimeError(f"merge of {key!r} returned {_checks.describe(arr)}")
                    fh.write(memoryview(arr.reshape(-1).view(np.uint8)))
                    del arr
                    bar.step(key)
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:
        for fut in (f for _, f in pending if f is not None):
            fut.cancel()
        for tmp in tmp_paths:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    written = []
    for tmp, nm in zip(tmp_paths, names, strict=True):
        os.replace(tmp, out / nm)
        written.append(str(out / nm))
    shard_of = {k: names[i] for i, sk in enumerate(shards) for k in sk}
    total = sum(base_index[k].nbytes for k in keys)
    if n > 1:
        index_path = out / f"{prefix}.safetensors.index.json"
        tmp_index = out / f".{index_path.name}.tmp-{os.getpid()}"
        tmp_index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": shard_of}, indent=2))
        os.replace(tmp_index, index_path)
        written.append(str(index_path))
    largest = max(keys, key=lambda k: base_index[k].nbytes)
    return MergeFilesResult(tuple(written), len(keys), total, largest, base_index[largest].nbytes, shard_of)


def _validate_options(method: str, weights: Any, opts: dict, count: int) -> None:
    """Run the method once on a tiny probe, so a bad option raises before any file is created."""
    probe = [np.linspace(-1.0, 1.0, 8) * (i + 1) for i in range(count)]
    base = np.zeros(8)
    w = None if weights is None else list(weights)
    try:
        if method == "linear":
            arithmetic.linear(probe, w, **opts)
        elif method == "slerp":
            o = dict(opts)
            spherical.slerp(o.pop("t"), base, probe[0], **o)
        elif method == "task_arithmetic":
            arithmetic.task_arithmetic(probe, w, **opts)
        elif method == "ties":
            ties_dare.ties(probe, w, **opts)
        elif method == "magnitude_prune":
            _sparsify.magnitude_prune(probe, w, **opts)
        else:
            ties_dare.dare(probe, w, rng=np.random.default_rng(0), **opts)
    except TypeError as exc:
        raise TypeError(f"options: not accepted by {method}: {exc}") from exc
