"""TIES merge of 3 task vectors x 50M float32 elements (density 0.2) on the CPU.

One process, the same three tensors for: numba's O(n) kernel (profile "peft"), PEFT 0.21.2
``merge_utils.ties`` (torch, majority_sign_method "total"), and the NumPy reference
``refimpl.merging.ties`` (profile "peft", float64). Time: median after a warm-up; memory: peak RSS
during the call minus RSS before it (VmHWM reset through /proc/self/clear_refs), output included,
as a multiple of one input tensor. The outputs are compared: numba vs the reference exactly
(float32 rounding of the reference), numba vs PEFT by the count of differing entries (PEFT's
``topk`` breaks ties at the threshold in an unspecified order).
Run: python bench/cpu_ties.py [--n 50000000] [--repeats 3] [--skip-reference]
Writes bench/results/cpu-ties.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpu_common as C
import torch
from peft.utils import merge_utils

from refimpl import merging
from refimpl.kernels.numba_cpu import ties as nties


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=50_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--skip-reference", action="store_true", help="skip the float64 NumPy reference (~2 GB)")
    args = ap.parse_args()
    info = C.machine()
    rng = np.random.default_rng(0)
    taus = [rng.standard_normal(args.n, dtype=np.float32) for _ in range(3)]
    one = taus[0].nbytes
    weights = [1.0, 1.0, 1.0]
    nties.ties([t[:10_000] for t in taus], weights, density=args.density, profile="peft")  # compile / load cache

    def run_numba():
        return nties.ties(taus, weights, density=args.density, profile="peft")

    def run_peft():
        return merge_utils.ties([torch.from_numpy(t) for t in taus], torch.tensor(weights), args.density, "total")

    rows = []
    t_numba = C.median_time(run_numba, repeats=args.repeats)
    peak_numba, out_numba = C.peak_extra_bytes(run_numba)
    rows.append({"impl": "numba (profile peft)", "median_s": t_numba, "peak_extra_x_one_tensor": peak_numba / one})
    t_peft = C.median_time(run_peft, repeats=max(1, args.repeats - 1))
    peak_peft, out_peft = C.peak_extra_bytes(run_peft)
    out_peft = out_peft.numpy()
    diff_peft = int(np.count_nonzero(out_peft != out_numba))
    rows.append(
        {
            "impl": "PEFT merge_utils.ties (torch)",
            "median_s": t_peft,
            "peak_extra_x_one_tensor": peak_peft / one,
            "x_slower_than_numba": t_peft / t_numba,
            "entries_differing_from_numba": diff_peft,
        }
    )
    del out_peft
    if not args.skip_reference:
        start = time.perf_counter()
        peak_ref, out_ref = C.peak_extra_bytes(
            lambda: merging.ties(taus, weights, density=args.density, profile="peft")
        )
        t_ref = time.perf_counter() - start
        same = bool(np.array_equal(out_ref.astype(np.float32), out_numba))
        rows.append(
            {
                "impl": "NumPy reference (float64, one run)",
                "median_s": t_ref,
                "peak_extra_x_one_tensor": peak_ref / one,
                "x_slower_than_numba": t_ref / t_numba,
                "equals_numba": same,
            }
        )
        del out_ref
    rows[0]["x_slower_than_numba"] = 1.0
    targets = [
        {
            "name": f"TIES 3 x {args.n} float32 vs PEFT",
            "measured": t_peft / t_numba,
            "target": 5,
            "met": t_peft / t_numba >= 5,
        },
        {
            "name": "TIES peak extra memory (x one tensor, output included; target <= 2)",
            "measured": peak_numba / one,
            "target": "<= 2",
            "met": peak_numba / one <= 2,
        },
    ]
    print(
        f"TIES 3 x {args.n} float32, density {args.density}, on {info['cpu_model']}, {info['logical_cpus']} CPUs, "
        f"load average {info['load_average_at_start']}"
    )
    print(
        C.table(
            rows,
            [
                "impl",
                "median_s",
                "x_slower_than_numba",
                "peak_extra_x_one_tensor",
                "entries_differing_from_numba",
                "equals_numba",
            ],
        )
    )
    for t in targets:
        status = "met" if t["met"] else "MISSED"
        print(f"- {t['name']}: measured {t['measured']:.3g}, target {t['target']}: {status}")
    print("wrote", C.write("ties", info, rows, targets))


if __name__ == "__main__":
    main()
