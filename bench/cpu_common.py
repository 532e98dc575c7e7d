"""Shared helpers of the CPU benchmarks: medians after warm-up, peak-memory deltas, machine
details (CPU model, instruction set), the physical limit (the same process's copy bandwidth), the
printed table and the JSON written to bench/results/cpu-<name>.json."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> float:
    """Median wall time (s) of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def interleaved_times(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Every wall time (s) of each function, timed round-robin (a, b, c, a, b, c, …) so that load
    bursts from other processes on a shared machine fall on every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def interleaved_medians(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time (s) of each function, timed round-robin (``interleaved_times``)."""
    return {k: float(np.median(v)) for k, v in interleaved_times(fns, repeats=repeats, warmup=warmup).items()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(peak RSS during fn − RSS before, fn's result): the kernel's extra memory, its output
    included. Linux: the peak (VmHWM) is reset through /proc/self/clear_refs."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    result = fn()
    return (_status_kb("VmHWM") - before) * 1024, result


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


#: the instruction-set flags worth naming in a result (/proc/cpuinfo spelling)
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512vbmi",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
)
COPY_BYTES = 128 * 2**20


def isa_flags() -> list[str]:
    """Which of ``ISA_FLAGS`` this CPU reports (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in ISA_FLAGS if f in flags]


def copy_bandwidth(nbytes: int = COPY_BYTES, repeats: int = 7) -> float:
    """The physical limit: bytes per second a NumPy copy of a ``nbytes`` float32 array moves (read +
    write, 2 · nbytes per copy), best of ``repeats`` after one warm-up copy, in this process."""
    src = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def limit_columns(bytes_moved: float, seconds: float, copy_bps: float) -> dict[str, float]:
    """A kernel's bytes moved per second and its share of the copy bandwidth (the row's limit columns)."""
    bps = bytes_moved / seconds
    return {"bytes_moved": bytes_moved, "GB_s": bps / 1e9, "share_of_copy": bps / copy_bps}


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import numba

    return {
        "cpu_model": cpu,
        "isa_flags": isa_flags(),
        "logical_cpus": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in ("numpy", "numba", "torch", "bitsandbytes", "peft", "scipy", "ml_dtypes")},
        "load_average_at_start": os.getloadavg(),
    }


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows`` (dicts) over ``columns``; floats with 3 significant digits."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(name: str, info: dict[str, Any], rows: list[dict[str, Any]], targets: list[dict[str, Any]]) -> Path:
    """Write bench/results/cpu-<name>.json and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = dict(info)
    info["load_average_at_end"] = os.getloadavg()
    info["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    path = RESULTS / f"cpu-{name}.json"
    path.write_text(json.dumps({"machine": info, "rows": rows, "targets": targets}, indent=2, default=str) + "\n")
    return path


def target_line(t: dict[str, Any]) -> str:
    status = "met" if t["met"] else "MISSED"
    if t.get("unit") == "share":  # a share of the copy bandwidth
        return f"- {t['name']}: measured {t['measured']:.0%}, target >= {t['target']:.0%}: {status}"
    return f"- {t['name']}: measured {t['measured']:.3g}x, target >= {t['target']}x: {status}"
