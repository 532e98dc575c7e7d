"""First-call compile time and second-process start time of the numba kernels.

Runs a child process that imports every numba kernel module and calls each op once on tiny data,
with NUMBA_CACHE_DIR pointing at an empty temporary directory (cold: numba compiles and writes its
cache), then a second child with the same directory (warm: numba loads the cached machine code).
Each child reports the import time and the first-call time of each op. Then the default
``refimpl conform`` (the numba target) runs once more with another empty cache directory, timed
as a whole (issue 6: under 60 s on a fresh clone); ``--no-conform`` skips it.
Run: python bench/cpu_compile.py [--no-conform]. Writes bench/results/cpu-compile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpu_common as C

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, time
t0 = time.perf_counter()
import ml_dtypes, numpy as np
from refimpl.kernels.numba_cpu import quant, qlora, lora, dora, ties
out = {"import_s": time.perf_counter() - t0}
rng = np.random.default_rng(0)
def first(name, fn):
    t = time.perf_counter(); fn(); out[name] = time.perf_counter() - t
x = rng.standard_normal((64, 96)).astype(np.float32)
first("quant.quantize_4bit float32 (+nested)",
      lambda: quant.quantize_4bit(x, 64, "nf4", True, profile="bitsandbytes-cpu"))
first("quant.quantize_4bit bfloat16", lambda: quant.quantize_4bit(x.astype(ml_dtypes.bfloat16), 64, "nf4"))
p, s = quant.quantize_4bit(x, 64, "nf4", True, profile="bitsandbytes-cpu")
first("quant.dequantize_4bit float32 (+nested)", lambda: quant.dequantize_4bit(p, s))
pb, sb = quant.quantize_4bit(x.astype(ml_dtypes.bfloat16), 64, "nf4")
first("quant.dequantize_4bit bfloat16", lambda: quant.dequantize_4bit(pb, sb))
A, B = rng.standard_normal((4, 96)), rng.standard_normal((64, 4))
first("qlora.forward", lambda: qlora.forward(rng.standard_normal((2, 96)), p, s, A, B, 1.0))
W = rng.standard_normal((64, 96))
mask = np.ones((2, 96))
first("lora.forward (dropout mask)", lambda: lora.forward(rng.standard_normal((2, 96)), W, A, B, 1.0,
                                                         dropout_mask=mask, dropout_p=0.1))
first("dora.forward", lambda: dora.forward(rng.standard_normal((2, 96)), W, A, B, np.ones(64), 1.0))
taus = [rng.standard_normal(5000).astype(np.float32) for _ in range(3)]
first("merging.ties float32 (paper)", lambda: ties.ties(taus, density=0.2, profile="paper"))
taus64 = [t.astype(np.float64) for t in taus]
first("merging.ties float64 (paper)", lambda: ties.ties(taus64, density=0.2, profile="paper"))
first("merging.ties float64, 2 tasks (peft)", lambda: ties.ties(taus64[:2], density=0.2, profile="peft"))
print(json.dumps(out))
"""


def child(cache_dir: str) -> dict[str, float]:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(res.stdout.strip().splitlines()[-1])


def conform_cold_s() -> float:
    """Wall time of ``python -m refimpl.cli conform -q`` (default target) with an empty numba cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "refimpl.cli", "conform", "-q"], env=env, capture_output=True, check=True, cwd=ROOT
        )
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-conform", action="store_true", help="skip the cold `refimpl conform` run")
    args = ap.parse_args()
    info = C.machine()
    with tempfile.TemporaryDirectory() as cache:
        cold = child(cache)
        warm = child(cache)
    rows = [{"step": k, "cold_s": cold[k], "warm_s": warm[k]} for k in cold]
    rows.append({"step": "total", "cold_s": sum(cold.values()), "warm_s": sum(warm.values())})
    targets = []
    if not args.no_conform:
        t = conform_cold_s()
        rows.append({"step": "refimpl conform -q (default target, whole process)", "cold_s": t})
        targets.append(
            {"name": "cold default `refimpl conform` wall time (s)", "measured": t, "target": "< 60", "met": t < 60}
        )
    print(f"numba compile (cold cache) vs second process (warm cache), load average {info['load_average_at_start']}")
    print(C.table(rows, ["step", "cold_s", "warm_s"]))
    for tg in targets:
        print(
            f"- {tg['name']}: measured {tg['measured']:.3g}, target {tg['target']}: {'met' if tg['met'] else 'MISSED'}"
        )
    print("wrote", C.write("compile", info, rows, targets))


if __name__ == "__main__":
    main()
