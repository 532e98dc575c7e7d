"""Peak memory of refimpl.merging.merge_files against the largest tensor.

Builds a multi-file safetensors model (base + T fine-tuned copies) in a temporary directory,
merges it with ``merge_files`` in a child process, and reports the child's peak RSS (VmHWM)
above its RSS just before the merge, in units of the largest tensor (stored dtype and float64).
Writes bench/results/merge-files-memory-<machine>.json and removes the temporary files.

    python bench/merge_files_memory.py                 # ≥ 2 GB per model, 2 tasks, TIES (the default)
    python bench/merge_files_memory.py --gb 0.2 --method task_arithmetic
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
sys.path.insert(0, __ROOT__)
from refimpl import merging  # imports before the baseline, so only the merge is measured

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)

args = json.loads(sys.argv[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
before = rss("VmRSS")
t0 = time.perf_counter()
res = merging.merge_files(args["base"], args["models"], args["out"], method=args["method"],
                          options=args["options"], shard_size=args["shard_size"], progress=False)
dt = time.perf_counter() - t0
print(json.dumps({"rss_before": before, "vm_hwm": rss("VmHWM"), "seconds": dt,
                  "largest_tensor_bytes": res.largest_tensor_bytes, "largest_tensor": res.largest_tensor,
                  "n_tensors": res.n_tensors, "total_bytes": res.total_bytes, "files": len(res.files)}))
"""


def layer_shapes(total_bytes: float, hidden: int = 2048) -> list[tuple[str, tuple[int, ...]]]:
    """A transformer-like list of float32 tensors summing to about ``total_bytes``.

    The embedding (vocab × hidden) is the largest tensor, as in real checkpoints.
    """
    vocab = 16384
    shapes = [("embed_tokens.weight", (vocab, hidden))]
    per_layer = [
        ("q_proj.weight", (hidden, hidden)),
        ("k_proj.weight", (hidden // 4, hidden)),
        ("v_proj.weight", (hidden // 4, hidden)),
        ("o_proj.weight", (hidden, hidden)),
        ("up_proj.weight", (2 * hidden, hidden)),
        ("down_proj.weight", (hidden, 2 * hidden)),
        ("input_layernorm.weight", (hidden,)),
    ]
    size = 4 * vocab * hidden
    i = 0
    while size < total_bytes - 4 * vocab * hidden:
        for name, shape in per_layer:
            shapes.append((f"layers.{i}.{name}", shape))
            size += 4 * int(np.prod(shape))
        i += 1
    shapes.append(("norm.weight", (hidden,)))
    shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def write_model(path: Path, shapes, seed: int, files: int, scale: float = 1.0, base_seed: int = 0) -> int:
    """Write a model as ``files`` safetensors shards; a fine-tuned model is base + scale·noise."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    groups = np.array_split(np.arange(len(shapes)), files)
    total = 0
    for g_i, group in enumerate(groups):
        tensors = {}
        for j in group:
            name, shape = shapes[j]
            base = np.random.default_rng([base_seed, j]).standard_normal(shape, dtype=np.float32)
            if seed != base_seed:
                base += np.float32(scale) * np.random.default_rng([seed, j]).standard_normal(shape, dtype=np.float32)
            tensors[name] = base
            total += base.nbytes
        save_file(tensors, str(path / f"model-{g_i:05d}.safetensors"))
        del tensors
    return total


def build(root: Path, gb: float, tasks: int, files: int, hidden: int = 2048) -> dict:
    shapes = layer_shapes(gb * 1e9, hidden)
    size = write_model(root / "base", shapes, 0, files)
    for t in range(tasks):
        write_model(root / f"task{t}", shapes, t + 1, files, scale=0.01)
    return {
        "base": str(root / "base"),
        "models": [str(root / f"task{t}") for t in range(tasks)],
        "bytes_per_model": size,
        "n_tensors": len(shapes),
    }


def measure(model: dict, out: Path, method: str, options: dict, shard_size: int) -> dict:
    """Run merge_files in a child process; return its peak RSS above the pre-merge RSS."""
    args = {
        "base": model["base"],
        "models": model["models"],
        "out": str(out),
        "method": method,
        "options": options,
        "shard_size": shard_size,
    }
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD.replace("__ROOT__", repr(str(ROOT))), json.dumps(args)],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    largest = r["largest_tensor_bytes"]
    r["peak_extra_bytes"] = r["vm_hwm"] - r["rss_before"]
    r["peak_extra_over_largest_tensor"] = r["peak_extra_bytes"] / largest
    r["peak_extra_over_largest_tensor_float64"] = r["peak_extra_bytes"] / (largest * 8 // 4)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.1, help="GB of tensors per model (default 2.1)")
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--files", type=int, default=4, help="safetensors files per model")
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size (embedding = 16384 × hidden)")
    ap.add_argument("--method", default="ties")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--tmp", default=None, help="directory for the temporary model (default: system temp)")
    ap.add_argument("--machine", default="cpu")
    a = ap.parse_args()
    options = {"density": a.density} if a.method in ("ties", "dare", "magnitude_prune") else {}
    tmp = Path(tempfile.mkdtemp(prefix="refimpl-merge-bench-", dir=a.tmp))
    try:
        t0 = time.perf_counter()
        model = build(tmp, a.gb, a.tasks, a.files, a.hidden)
        build_s = time.perf_counter() - t0
        r = measure(model, tmp / "out", a.method, options, int(a.shard_gb * 1e9))
        out_bytes = sum(f.stat().st_size for f in (tmp / "out").iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "model": {
            "gb_per_model": model["bytes_per_model"] / 1e9,
            "tasks": a.tasks,
            "files_per_model": a.files,
            "n_tensors": model["n_tensors"],
        },
        "method": a.method,
        "options": options,
        "build_seconds": build_s,
        "output_bytes": out_bytes,
        **r,
    }
    out = ROOT / "bench" / "results" / f"merge-files-memory-{a.machine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"model: {result['model']['gb_per_model']:.2f} GB × {a.tasks + 1} models, {model['n_tensors']} tensors, "
        f"{a.files} files each; method {a.method}"
    )
    print(f"largest tensor {r['largest_tensor']}: {r['largest_tensor_bytes'] / 1e6:.1f} MB")
    print(
        f"peak RSS above pre-merge: {r['peak_extra_bytes'] / 1e6:.1f} MB = "
        f"{r['peak_extra_over_largest_tensor']:.2f} × largest tensor "
        f"({r['peak_extra_over_largest_tensor_float64']:.2f} × its float64 size); merge {r['seconds']:.1f} s"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
