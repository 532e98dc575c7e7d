"""refimpl.merging.merge_files: streamed whole-model merges over safetensors files."""

from __future__ import annotations

import importlib.util
import json
import os
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from refimpl import merging, precision

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("merge_files_memory", ROOT / "bench" / "merge_files_memory.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SHAPES = {
    "emb": ((12, 8), np.float32),
    "l0.w": ((8, 8), np.float32),
    "l0.b": ((8,), ml_dtypes.bfloat16),
    "l1.w": ((5, 8), np.float16),
    "pos_ids": ((6,), np.int64),
}


def _write(path: Path, seed: int, *, bad: str | None = None) -> Path:
    """A model in two files; ``bad`` = a tensor name to fill with NaN."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (shape, dt) in SHAPES.items():
        x = np.arange(np.prod(shape)).reshape(shape) if dt == np.int64 else rng.standard_normal(shape)
        if name == bad:
            x = np.full(shape, np.nan)
        tensors[name] = np.asarray(x).astype(dt)
    names = list(tensors)
    save_file({k: tensors[k] for k in names[:2]}, str(path / "part-1.safetensors"))
    save_file({k: tensors[k] for k in names[2:]}, str(path / "part-2.safetensors"))
    return path


def _read(out: Path) -> dict[str, np.ndarray]:
    res = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as fh:
            for k in fh.keys():
                res[k] = fh.get_tensor(k)
    return res


@pytest.fixture()
def models(tmp_path):
    return _write(tmp_path / "base", 0), [_write(tmp_path / f"m{i}", i + 1) for i in range(2)]


def _expected(base_dir, model_dirs, method, weights, options):
    """What merge_files must write: the per-tensor function, then one rounding to the base dtype."""
    base, ms = _read(base_dir), [_read(m) for m in model_dirs]
    out = {}
    for k, b in base.items():
        if b.dtype == np.int64:
            out[k] = b
            continue
        taus = [merging.task_vector(m[k], b) for m in ms]
        o = dict(options)
        if method == "ties":
            delta = merging.ties(taus, weights, **o)
        elif method == "task_arithmetic":
            delta = merging.task_arithmetic(taus, weights, **o)
        elif method == "magnitude_prune":
            delta = merging.magnitude_prune(taus, weights, **o)
        elif method == "dare":
            import zlib

            rng = np.random.default_rng([0, zlib.crc32(k.encode())])
            delta = merging.dare(taus, weights, rng=rng, **o)
        if method == "linear":
            merged = merging.linear([m[k] for m in ms], weights, **o)
        elif method == "slerp":
            merged = merging.slerp(o["t"], b, ms[0][k])
        else:
            merged = delta + b.astype(np.float64)
        out[k] = precision.round_to(merged, b.dtype).astype(b.dtype)
    return out


@pytest.mark.parametrize(
    ("method", "weights", "options", "n_models"),
    [
        ("task_arithmetic", [0.5, -1.0], {"lam": 0.7}, 2),
        ("ties", [1.0, 2.0], {"density": 0.4, "profile": "mergekit"}, 2),
        ("ties", None, {"density": 0.3}, 2),
        ("dare", [1.0, 1.0], {"density": 0.5, "merge": "ties", "profile": "peft"}, 2),
        ("magnitude_prune", [1.0, 0.5], {"density": 0.5}, 2),
        ("linear", [1.0, 3.0], {}, 2),
        ("slerp", None, {"t": 0.3}, 1),
    ],
)
def test_merge_files_equals_the_per_tensor_reference(tmp_path, models, method, weights, options, n_models):
    base, ms = models
    ms = ms[:n_models]
    res = merging.merge_files(
        base, ms, tmp_path / "out", method=method, weights=weights, options=options, progress=False
    )
    got = _read(tmp_path / "out")
    exp = _expected(base, ms, method, weights, options)
    assert set(got) == set(exp) == set(SHAPES)
    for k in exp:
        assert got[k].dtype == exp[k].dtype, k
        np.testing.assert_array_equal(got[k].view(np.uint8), exp[k].view(np.uint8), err_msg=k)
    assert res.n_tensors == len(SHAPES) and res.largest_tensor == "emb"


def test_merge_files_shards_and_index(tmp_path, models):
    base, ms = models
    res = merging.merge_files(base, ms, tmp_path / "out", options={}, shard_size=300, progress=False, prefix="merged")
    index = json.loads((tmp_path / "out" / "merged.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SHAPES)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0].startswith("merged-00001-of-")
    assert index["metadata"]["total_size"] == res.total_bytes
    assert merging.read_index(tmp_path / "out").keys() == set(SHAPES)
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_a_failing_merge_leaves_no_output(tmp_path, models):
    base, ms = models
    bad = _write(tmp_path / "bad", 9, bad="l1.w")  # the last floating tensor: earlier shards are written first
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"l1\.w"):
        merging.merge_files(base, [ms[0], bad], out, shard_size=300, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "base", "m0", "m1"]  # nothing written


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"method": "nope"}, ValueError, "method"),
        ({"weights": [1.0]}, ValueError, "weights"),
        ({"method": "ties", "options": {"density": 0.0}}, ValueError, "density"),
        ({"method": "ties", "options": {"densty": 0.5}}, TypeError, "options"),
        ({"method": "slerp"}, ValueError, "slerp"),
        ({"shard_size": 0}, ValueError, "shard_size"),
        ({"executor": object()}, TypeError, "executor"),
    ],
)
def test_merge_files_bad_options_raise_before_writing(tmp_path, models, kwargs, exc, match):
    base, ms = models
    with pytest.raises(exc, match=match):
        merging.merge_files(base, ms, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_merge_files_rejects_mismatched_models(tmp_path, models):
    base, ms = models
    other = tmp_path / "other"
    other.mkdir()
    t = _read(ms[0])
    t["emb"] = t["emb"][:, :4].copy()
    save_file(t, str(other / "m.safetensors"))
    with pytest.raises(ValueError, match="emb"):
        merging.merge_files(base, [other], tmp_path / "out", progress=False)
    del t["emb"]
    save_file(t, str(other / "m.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        merging.merge_files(base, [other], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="existing"):
        merging.merge_files(base, [tmp_path / "nowhere.safetensors"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_merge_files_on_an_executor_writes_the_same_bytes(tmp_path, models):
    base, ms = models
    opts = {"density": 0.5, "merge": "ties", "profile": "mergekit"}
    merging.merge_files(base, ms, tmp_path / "a", method="dare", options=opts, progress=False)
    with ThreadPoolExecutor(max_workers=2) as ex:
        merging.merge_files(
            base, ms, tmp_path / "b", method="dare", options=opts, executor=ex, max_in_flight=3, progress=False
        )
    for name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_merge_files_on_a_dask_local_cluster(tmp_path, models):
    distributed = pytest.importorskip("distributed", reason="dask.distributed not installed (optional)")
    base, ms = models
    merging.merge_files(base, ms, tmp_path / "a", method="ties", options={"density": 0.5}, progress=False)
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        merging.merge_files(
            base,
            ms,
            tmp_path / "b",
            method="ties",
            options={"density": 0.5},
            executor=client.get_executor(),
            progress=False,
        )
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_merge_files_peak_memory_is_a_few_tensors(tmp_path):
    """~210 MB of tensors (3 models × 71 MB, 3 files each): traced peak ≤ (T + 4) × the largest
    tensor in float64 (the working set of the TIES path, spec/merging.md §Streaming); the child's
    peak RSS adds at most the file pages of the T + 1 tensors being read."""
    model = bench.build(tmp_path, 0.07, tasks=2, files=3, hidden=256)
    tracemalloc.start()
    try:
        res = merging.merge_files(
            model["base"],
            model["models"],
            tmp_path / "out",
            method="ties",
            options={"density": 0.2},
            shard_size=50_000_000,
            progress=False,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    largest64 = res.largest_tensor_bytes * 2
    print(
        f"merge_files memory: {res.n_tensors} tensors, {3 * res.total_bytes / 1e6:.0f} MB read, largest "
        f"{res.largest_tensor} {res.largest_tensor_bytes / 1e6:.1f} MB; traced peak {peak / 1e6:.1f} MB = "
        f"{peak / res.largest_tensor_bytes:.2f} × largest tensor = {peak / largest64:.2f} × its float64 size"
    )
    assert peak <= (2 + 4) * largest64
    rss = bench.measure(model, tmp_path / "out2", "ties", {"density": 0.2}, 50_000_000)
    print(
        f"merge_files child peak RSS above pre-merge: {rss['peak_extra_bytes'] / 1e6:.1f} MB = "
        f"{rss['peak_extra_over_largest_tensor']:.2f} × largest tensor"
    )
    # the traced working set plus the file pages of the T + 1 tensors being read
    assert rss["peak_extra_bytes"] <= (2 + 4) * largest64 + 3 * res.largest_tensor_bytes
    assert rss["peak_extra_bytes"] < 3 * res.total_bytes  # below the size of the models read
