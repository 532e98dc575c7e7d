"""Merge whole models stored as safetensors files, tensor by tensor, in the memory of a few tensors.

Every input header is parsed and checked by ``refimpl.io.read_header`` (format errors are
ValueErrors naming the file); every input tensor is read on its own with one positioned read (no
memory map outlives one tensor), merged with one of this package's per-tensor operations, and
streamed into output shards written by a small safetensors writer (header first, then each tensor's
bytes as it is produced). Per-tensor tasks may run on any ``concurrent.futures.Executor`` (threads,
processes, a Dask ``distributed`` client's ``get_executor()``); results are written in order.

File guarantees (spec/merging.md §10.1): the output folder never holds an input; it is absent, empty
or holds only an earlier merge_files result, which is replaced whole, and anything else in it is
refused before a byte is written. The whole result (every shard and the index) is written into a
fresh hidden folder beside ``out_dir`` and appears with one rename (one atomic exchange when it
replaces an earlier merge), so a reader sees the old merge or the new one, never a mix, whether it
looks for ``model.safetensors``, globs the shards or follows the index. On an error, Ctrl-C or
SIGTERM the hidden folder is removed; the leftovers of a SIGKILL are removed by the next run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import warnings
import zlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from refimpl import _checks, precision
from refimpl import io as _io
from refimpl.merging import arithmetic, operands, profiles, spherical, ties_dare
from refimpl.merging import sparsify as _sparsify

METHODS = ("task_arithmetic", "ties", "dare", "magnitude_prune", "linear", "slerp")

#: safetensors dtype codes (every one of them loads; FP8 through ml_dtypes).
_CODES = _io.CODES

#: the value of the "merged_by" metadata entry that marks merge_files' own output
MARKER = "refimpl.merging.merge_files"


@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int = -1  #: absolute file offset of the tensor's bytes (-1: look it up in the header)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


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
    """Name → (file, shape, dtype, offset) for every tensor of a model, from the safetensors headers only.

    A malformed header raises ValueError naming ``name`` and the file (``refimpl.io.read_header``).
    """
    index: dict[str, TensorInfo] = {}
    for path in _files_of(spec, name):
        try:
            header = _io.read_header(path)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        for key, e in header.tensors.items():
            if key in index:
                raise ValueError(f"{name}: tensor {key!r} appears in both {index[key].file} and {path}")
            index[key] = TensorInfo(path, e.shape, e.dtype, e.offset)
    return index


def _load(info: TensorInfo, key: str) -> np.ndarray:
    """One tensor of one input file, in the shape ``info`` gives (a 0-d tensor may be read as shape (1,))."""
    if info.offset < 0:
        return _io.read_tensor(info.file, key, _io.read_header(info.file).tensors[key]).reshape(info.shape)
    return _io.read_tensor(info.file, key, _io.TensorEntry(info.dtype, info.shape, info.offset, info.nbytes))


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

    The task vectors are built one model at a time and handed to the cores of ``ties`` / ``dare``
    (options were validated by ``merge_files``), which trim or drop each one as it arrives, so the
    working set is about T + 4 float64 copies of this tensor.
    """
    base = _load(task.base, task.key)
    dt = np.dtype(base.dtype)
    if dt not in _checks.FLOAT_DTYPES:
        return np.ascontiguousarray(base)  # integer/bool/FP8 buffers are copied from the base
    if base.ndim == 0:  # a scalar (e.g. a logit scale): merged as a 1-element vector
        return _merge_tensor(
            dataclasses.replace(
                task,
                base=dataclasses.replace(task.base, shape=(1,)),
                models=tuple(dataclasses.replace(m, shape=(1,)) for m in task.models),
            )
        ).reshape(())
    opts = dict(task.options)
    w = operands.weight_vector(task.weights, len(task.models))
    if task.method == "linear":
        merged = arithmetic.linear([_load(m, task.key) for m in task.models], w, **opts)
    elif task.method == "slerp":
        merged = spherical.slerp(opts.pop("t"), base, _load(task.models[0], task.key), **opts)
    else:
        taus = (_task_vector(m, task.key, base) for m in task.models)  # one model at a time
        merged = _merge_task_vectors(task, taus, base.shape, w, opts)
        np.add(merged, base, out=merged)
    if dt == np.dtype(ml_dtypes.bfloat16):
        return np.ascontiguousarray(precision.round_to(merged, dt).astype(dt))
    return np.ascontiguousarray(merged.astype(dt))  # float64 -> float32/float16: one correct rounding


def _finite(tau: np.ndarray, key: str, file: str) -> None:
    if not np.isfinite(tau).all():
        bad = int(np.flatnonzero(~np.isfinite(tau.ravel()))[0])
        raise ValueError(
            f"{file}: tensor {key!r}: expected finite values, got a non-finite task-vector entry at flat index {bad}"
        )


def _task_vector(model: TensorInfo, key: str, base: np.ndarray) -> np.ndarray:
    tau = np.subtract(_load(model, key), base, dtype=np.float64)
    _finite(tau, key, model.file)
    return tau


def _merge_task_vectors(
    task: _Task, taus: Iterator[np.ndarray], shape: tuple[int, ...], w: np.ndarray, opts: dict
) -> np.ndarray:
    lam = float(opts.pop("lam", 1.0))
    if task.method == "task_arithmetic":
        return arithmetic._task_arithmetic(list(taus), w, lam, bool(opts.get("normalize", False)))
    if task.method == "magnitude_prune":
        return _sparsify.magnitude_prune(list(taus), w, lam=lam, **opts)
    d = operands.densities(opts.pop("density"), len(w))
    profile = opts.pop("profile", "paper")
    if task.method == "ties":
        return ties_dare._ties(taus, w, d, profiles.ties_rules(profile, **opts), lam)
    rules = profiles.dare_rules(profile, opts.pop("merge", "linear"), **opts)
    rng = np.random.default_rng([task.seed, zlib.crc32(task.key.encode())])
    masks = _sparsify.dare_masks(shape, len(w), d.tolist(), rng)
    return ties_dare._dare(taus, w, d, masks, rules, lam)


def _header(entries: list[tuple[str, TensorInfo]], metadata: Mapping[str, str]) -> bytes:
    """A safetensors header: 8-byte little-endian length, then JSON padded with spaces to 8 bytes."""
    head: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, info in entries:
        head[key] = {
            "dtype": _CODES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
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
    weights: npt.ArrayLike | None = None,
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

    ``out_dir`` must not hold any input, and must be absent, empty, or hold only an earlier
    merge_files result (which this merge replaces whole); anything else is refused with a ValueError
    before a byte is written. The result appears all at once (one rename of a complete hidden folder
    beside ``out_dir``); on any error, Ctrl-C or SIGTERM nothing of it remains (spec/merging.md §10.1).
    """
    _checks.choice(method, "method", METHODS)
    out = _output_dir(out_dir)
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix) or prefix in (".", ".."):
        raise (ValueError if isinstance(prefix, str) else TypeError)(
            f"prefix: expected a plain file-name stem (letters, digits, '.', '_', '-'; no path), got {prefix!r}"
        )
    progress = _checks.boolean(progress, "progress")
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, Sequence) or not models:
        raise TypeError(f"models: expected a non-empty list of models (paths), got {_checks.describe(models)}")
    if method == "slerp" and len(models) != 1:
        raise ValueError(f"models: slerp merges the base with exactly one model, got {len(models)}")
    if weights is not None:
        weights = tuple(float(w) for w in operands.weight_vector(weights, len(models)))
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
    if not base_index:
        raise ValueError(f"base: expected at least one tensor, got none in {_files_of(base, 'base')}")
    model_indexes = [read_index(m, f"models[{i}]") for i, m in enumerate(models)]
    for i, idx in enumerate(model_indexes):
        for key, info in base_index.items():
            if key not in idx:
                raise ValueError(f"models[{i}]: expected tensor {key!r} (present in base), it is missing")
            other = idx[key]
            if other.shape != info.shape or other.dtype != info.dtype:
                raise ValueError(
                    f"models[{i}]: tensor {key!r}: expected shape {info.shape} and dtype "
                    f"{info.dtype} (as in base), got shape {other.shape} and dtype {other.dtype}"
                )
        extra = sorted(set(idx) - set(base_index))
        if extra:
            raise ValueError(f"models[{i}]: tensors not in base: {extra[:5]}{' …' if len(extra) > 5 else ''}")

    keys = list(base_index)
    frozen_opts = tuple(sorted(opts.items()))
    tasks = [
        _Task(k, base_index[k], tuple(idx[k] for idx in model_indexes), method, weights, frozen_opts, seed)
        for k in keys
    ]
    # Fail early on bad options: run the first floating tensor's merge on a tiny slice of the data.
    _validate_options(method, weights, opts, len(models))

    inputs = {
        Path(f).resolve()
        for i, spec in enumerate([base, *models])
        for f in _files_of(spec, "base" if i == 0 else f"models[{i - 1}]")
    }
    _own_entries(out, inputs)  # refuse before writing anything
    shards = _plan_shards(keys, base_index, shard_size)
    n = len(shards)
    names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    metadata = {"format": "pt", "merged_by": MARKER, "method": method}
    shard_of = {k: names[i] for i, sk in enumerate(shards) for k in sk}
    total = sum(base_index[k].nbytes for k in keys)
    bar = _Progress(len(tasks), progress)
    task_iter = iter(tasks)
    pending: deque = deque()

    def submit_next() -> None:
        t = next(task_iter, None)
        if t is not None:
            pending.append((t, executor.submit(_merge_tensor, t) if executor is not None else None))

    tmp_dir = _io._make_temp_dir(out)
    old: Path | None = None
    own: list[str] = []
    committed = False
    try:
        with _io._sigterm_cleanup():
            try:
                for _ in range(max_in_flight):
                    submit_next()
                for shard_keys, nm in zip(shards, names, strict=True):
                    with open(tmp_dir / nm, "xb") as fh:
                        fh.write(_header([(k, base_index[k]) for k in shard_keys], metadata))
                        for key in shard_keys:
                            t, fut = pending.popleft()
                            assert t.key == key
                            arr = fut.result() if fut is not None else _merge_tensor(t)
                            submit_next()
                            if arr.shape != base_index[key].shape or arr.dtype != base_index[key].dtype:
                                raise RuntimeError(f"merge of {key!r} returned {_checks.describe(arr)}")
                            fh.write(arr.reshape(-1).view(np.uint8).data)
                            del arr
                            bar.step(key)
                        fh.flush()
                        os.fsync(fh.fileno())
                if n > 1:
                    index = {"metadata": {"total_size": total, "merged_by": MARKER}, "weight_map": shard_of}
                    with open(tmp_dir / f"{prefix}.safetensors.index.json", "x", encoding="utf-8") as fj:
                        fj.write(json.dumps(index, indent=2))
                        fj.flush()
                        os.fsync(fj.fileno())
                with _io._critical():  # check again (the merge may have taken hours), then swap in one step
                    own = _own_entries(out, inputs)
                    old = _io._commit_dir(tmp_dir, out)  # the earlier merge, if any, now lies at `old`
                    committed = True
            except BaseException:
                for fut in (f for _, f in pending if f is not None):
                    fut.cancel()
                if not committed:
                    shutil.rmtree(tmp_dir, ignore_errors=True)
                raise
            finally:
                if old is not None:
                    _remove_replaced(old, own, out)
    finally:
        bar.close()
    given = Path(out_dir)
    written = [str(given / nm) for nm in names]
    if n > 1:
        written.append(str(given / f"{prefix}.safetensors.index.json"))
    largest = max(keys, key=lambda k: base_index[k].nbytes)
    return MergeFilesResult(tuple(written), len(keys), total, largest, base_index[largest].nbytes, shard_of)


_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,200}")
#: hidden temporary files that earlier refimpl versions left in out_dir when killed
_OLD_TMP = re.compile(r"\..+\.(safetensors|safetensors\.index\.json)\.tmp-\d+")


def _output_dir(out_dir: Any) -> Path:
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir: expected a folder path, got {_checks.describe(out_dir)}")
    out = Path(out_dir).resolve()
    if out.parent == out:
        raise ValueError(f"out_dir: expected a folder below a parent folder, got {str(out)!r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: expected a folder, got the file {str(out)!r}")
    return out


def _own_entries(out: Path, inputs: set[Path]) -> list[str]:
    """The names in ``out`` that merge_files wrote earlier; ValueError when ``out`` holds an input or
    anything merge_files did not write (it would be replaced with the folder)."""
    for f in sorted(inputs):
        if out == f or out in f.parents:
            raise ValueError(
                f"out_dir: {str(out)!r} holds the input {str(f)!r}; merge_files replaces the whole "
                "folder, so write the merge to another folder"
            )
    if not out.is_dir():
        return []
    own, foreign, shards, indexes = [], [], set(), []
    for e in sorted(os.scandir(out), key=lambda e: e.name):
        if e.is_file(follow_symlinks=False) and e.name.endswith(".safetensors") and _is_own_shard(e.path):
            own.append(e.name)
            shards.add(e.name)
        elif e.is_file(follow_symlinks=False) and e.name.endswith(".safetensors.index.json"):
            indexes.append(e)
        elif e.is_file(follow_symlinks=False) and _OLD_TMP.fullmatch(e.name):
            own.append(e.name)
        else:
            foreign.append(e.name)
    for e in indexes:
        (own if _is_own_index(e.path, shards) else foreign).append(e.name)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"out_dir: {str(out)!r} holds files merge_files did not write ({shown}); merge_files "
            "replaces the whole folder, so merge into a new or empty folder (or move them away)"
        )
    return own


def _is_own_shard(path: str) -> bool:
    try:
        return _io.read_header(path).metadata.get("merged_by") == MARKER
    except (ValueError, OSError):
        return False


def _is_own_index(path: str, shards: set[str]) -> bool:
    """An index merge_files wrote: marked, or (earlier versions) naming only merge_files shards present here."""
    try:
        if os.path.getsize(path) > 2**26:
            return False
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(doc, dict):
        return False
    meta, wmap = doc.get("metadata"), doc.get("weight_map")
    if isinstance(meta, dict) and meta.get("merged_by") == MARKER:
        return True
    return isinstance(wmap, dict) and bool(wmap) and all(isinstance(v, str) and v in shards for v in wmap.values())


def _remove_replaced(old: Path, own: list[str], out: Path) -> None:
    """Delete the earlier merge that the commit moved to ``old``: only the files checked as its own."""
    for name in own:
        (old / name).unlink(missing_ok=True)
    try:
        old.rmdir()
    except OSError:
        warnings.warn(
            f"merge_files: {old} kept: files appeared in {out} while merging, and only merge_files' own "
            "earlier output is ever deleted",
            stacklevel=3,
        )


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
