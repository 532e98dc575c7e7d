"""Nothing the user did not name is deleted or overwritten (issue 14, "Data loss" and "Risks").

``vectors generate`` and ``merge_files`` write into a hidden folder beside their destination and
swap it in with one rename; they refuse a destination holding anything they did not write, and
remove their temporary files on an error, Ctrl-C or SIGTERM (and a SIGKILL's on the next run).
The kill test kills a merge at every file-system step and at random times and checks that the
output is then the earlier merge or the new one, byte for byte, never a mix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from refimpl import merging
from refimpl.conformance import vectors
from refimpl.merging import streaming

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "emb": ((12, 8), np.float32),
    "l0.w": ((8, 8), np.float32),
    "l0.b": ((8,), ml_dtypes.bfloat16),
    "l1.w": ((5, 8), np.float16),
    "pos_ids": ((6,), np.int64),
}


def _model(path: Path, seed: int, files: int = 2) -> Path:
    """A small model in ``files`` safetensors files under the folder ``path``."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    t = {
        k: (np.arange(np.prod(s)).reshape(s) if dt == np.int64 else rng.standard_normal(s)).astype(dt)
        for k, (s, dt) in SHAPES.items()
    }
    names = list(t)
    cut = len(names) // files if files > 1 else len(names)
    for i in range(files):
        part = names[i * cut :] if i == files - 1 else names[i * cut : (i + 1) * cut]
        save_file({k: t[k] for k in part}, str(path / f"part-{i + 1}.safetensors"))
    return path


def _snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative path -> bytes); {} when ``d`` is absent."""
    if not d.exists():
        return {}
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _leftovers(d: Path) -> list[str]:
    """Hidden temporary siblings of ``d`` (io._temp_path names)."""
    return sorted(p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}.refimpl-tmp."))


@pytest.fixture()
def models(tmp_path):
    return _model(tmp_path / "base", 0), [_model(tmp_path / f"m{i}", i + 1) for i in range(2)]


# ----------------------------------------------------------------------------- vectors generate / verify


@pytest.fixture()
def fake_build(monkeypatch):
    """Replace the golden-vector builder by a settable set of files (the file handling is under test)."""
    files = {"op.a/c0.safetensors": b"a0", "op.a/c1.safetensors": b"a1", "op.b/c0.safetensors": b"b0"}
    monkeypatch.setattr(vectors, "build", lambda ops=None: dict(files))
    return files


def test_vectors_generate_refuses_a_model_folder_and_deletes_nothing(tmp_path, fake_build):
    d = tmp_path / "ck"
    (d / "model").mkdir(parents=True)
    (d / "model" / "w.safetensors").write_bytes(b"weights")
    (d / "notes.txt").write_text("mine")
    before = _snapshot(d)
    with pytest.raises(ValueError, match=r"model/w\.safetensors"):
        vectors.generate(d)
    assert _snapshot(d) == before and _leftovers(d) == []


def test_vectors_generate_replaces_only_the_files_its_manifest_lists(tmp_path, fake_build):
    d = tmp_path / "v1"
    vectors.generate(d)
    assert set(_snapshot(d)) == {*fake_build, "MANIFEST.json"}
    (d / "op.a" / "mine.safetensors").write_bytes(b"user file")  # not in the manifest
    with pytest.raises(ValueError, match=r"mine\.safetensors"):
        vectors.generate(d)
    assert (d / "op.a" / "mine.safetensors").read_bytes() == b"user file"
    (d / "op.a" / "mine.safetensors").unlink()
    del fake_build["op.b/c0.safetensors"]  # an op removed: its old vector and folder go
    fake_build["op.c/c0.safetensors"] = b"c0"
    vectors.generate(d)
    assert _snapshot(d) == {**fake_build, "MANIFEST.json": vectors._manifest(fake_build)}
    assert not (d / "op.b").exists() and _leftovers(d) == []
    with pytest.raises(ValueError, match="expected a folder"):
        vectors.generate(d / "MANIFEST.json")


def test_vectors_generate_failing_midway_leaves_the_old_set_whole(tmp_path, fake_build, monkeypatch):
    d = tmp_path / "v1"
    vectors.generate(d)
    before = _snapshot(d)
    fake_build["op.a/c0.safetensors"] = b"changed"

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vectors.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        vectors.generate(d)
    assert _snapshot(d) == before and _leftovers(d) == []


def test_vectors_verify_never_reads_a_file_of_the_wrong_size(tmp_path, fake_build):
    d = tmp_path / "v1"
    vectors.generate(d)
    with open(d / "op.a" / "c0.safetensors", "r+b") as fh:
        fh.truncate(256 * 2**20)  # sparse: no disk used, but reading it whole costs 256 MB
    tracemalloc.start()
    try:
        problems = vectors.verify(d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert problems == ["op.a/c0.safetensors: differs from the regenerated bytes"]
    assert peak < 8 * 2**20


def test_cli_vectors_generate_into_a_foreign_folder_exits_2_with_one_line(tmp_path, fake_build, capsys):
    from refimpl import cli

    (tmp_path / "w.safetensors").write_bytes(b"weights")
    assert cli.main(["vectors", "generate", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "w.safetensors" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "w.safetensors").read_bytes() == b"weights"


# ----------------------------------------------------------------------------- merge_files


def test_merge_files_refuses_an_output_folder_holding_its_base(tmp_path):
    ck = _model(tmp_path / "ck", 0, files=1)
    m1 = _model(tmp_path / "m1", 1, files=1)
    (ck / "part-1.safetensors").rename(ck / "model.safetensors")
    before = _snapshot(ck)
    with pytest.raises(ValueError, match="holds the input"):
        merging.merge_files(ck / "model.safetensors", [m1], ck, progress=False)
    assert _snapshot(ck) == before and _leftovers(ck) == []


@pytest.mark.parametrize("where", ["model_in_out", "out_is_parent", "out_is_a_model_file", "out_is_base_dir"])
def test_merge_files_refuses_every_output_that_would_replace_an_input(tmp_path, models, where):
    base, ms = models
    if where == "model_in_out":  # the output's name equals a model input's
        out = tmp_path / "out"
        m = _model(out, 5, files=1)
        (m / "part-1.safetensors").rename(m / "model.safetensors")
        args = (base, [ms[0], out / "model.safetensors"], out)
    elif where == "out_is_parent":
        out, args = tmp_path, (base, ms, tmp_path)
    elif where == "out_is_a_model_file":
        out, args = ms[0] / "part-1.safetensors", (base, ms, ms[0] / "part-1.safetensors")
    else:
        out, args = base, (base, ms, base)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="out_dir"):
        merging.merge_files(*args, progress=False)
    assert _snapshot(tmp_path) == before and _leftovers(out) == []


def test_merge_files_replaces_an_earlier_merge_whole_and_refuses_other_files(tmp_path, models):
    base, ms = models
    out = tmp_path / "out"
    merging.merge_files(base, ms, out, progress=False)
    assert set(_snapshot(out)) == {"model.safetensors"}
    res = merging.merge_files(base, ms, out, shard_size=300, progress=False)  # shards + index
    assert len(res.files) > 2 and set(_snapshot(out)) == {Path(f).name for f in res.files}
    assert "model.safetensors" not in _snapshot(out)  # the stale single file of the earlier merge is gone
    assert merging.read_index(out).keys() == set(SHAPES)
    merging.merge_files(base, ms, out, progress=False)  # and back: no stale shard or index survives
    assert set(_snapshot(out)) == {"model.safetensors"} and _leftovers(out) == []
    (out / "config.json").write_text("{}")
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"config\.json"):
        merging.merge_files(base, ms, out, progress=False)
    assert _snapshot(out) == before
    (out / "config.json").unlink()
    save_file({"x": np.ones(2, np.float32)}, str(out / "model.safetensors"))  # same name, not a merge output
    before = _snapshot(out)
    with pytest.raises(ValueError, match="did not write"):
        merging.merge_files(base, ms, out, progress=False)
    assert _snapshot(out) == before and _leftovers(out) == []


def test_merge_files_replaces_the_output_of_an_earlier_version(tmp_path, models):
    """Earlier versions wrote no marker in the index and left `.<name>.tmp-<pid>` files when killed."""
    base, ms = models
    out = tmp_path / "out"
    merging.merge_files(base, ms, out, shard_size=300, progress=False)
    index = out / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    del doc["metadata"]["merged_by"]
    index.write_text(json.dumps(doc))
    (out / ".model-00001-of-00003.safetensors.tmp-12345").write_bytes(b"partial")
    merging.merge_files(base, ms, out, progress=False)
    assert set(_snapshot(out)) == {"model.safetensors"}
    doc["weight_map"]["extra"] = "user-shard.safetensors"  # an index naming a file merge_files did not write
    merging.merge_files(base, ms, tmp_path / "other", shard_size=300, progress=False)
    (tmp_path / "other" / "model.safetensors.index.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json"):
        merging.merge_files(base, ms, tmp_path / "other", progress=False)


def test_merge_files_with_an_empty_base_fails_before_writing(tmp_path, models):
    _, ms = models
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    out = tmp_path / "out"
    merging.merge_files(ms[0], [ms[1]], out, progress=False)  # an earlier merge that must survive
    before = _snapshot(out)
    with pytest.raises(ValueError, match="base: expected at least one tensor"):
        merging.merge_files(empty, ms, out, progress=False)
    assert _snapshot(out) == before and _leftovers(out) == []


def test_merge_files_interrupted_by_ctrl_c_leaves_the_earlier_merge_and_no_temp_file(tmp_path, models, monkeypatch):
    base, ms = models
    out = tmp_path / "out"
    merging.merge_files(base, ms, out, shard_size=300, progress=False)
    before = _snapshot(out)
    real, calls = streaming._merge_tensor, []

    def interrupted(task):
        calls.append(task.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(streaming, "_merge_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merging.merge_files(base, ms, out, method="linear", shard_size=300, progress=False)
    assert _snapshot(out) == before and _leftovers(out) == []


def test_a_file_added_to_out_dir_during_the_merge_is_never_deleted(tmp_path, models, monkeypatch):
    base, ms = models
    out = tmp_path / "out"
    merging.merge_files(base, ms, out, progress=False)
    real = streaming._merge_tensor

    def user_copies_a_config(task):
        (out / "config.json").write_text('{"user": 1}')  # while the merge runs
        return real(task)

    monkeypatch.setattr(streaming, "_merge_tensor", user_copies_a_config)
    with pytest.raises(ValueError, match=r"config\.json"):
        merging.merge_files(base, ms, out, method="linear", progress=False)
    assert (out / "config.json").read_text() == '{"user": 1}' and _leftovers(out) == []


def test_temporary_files_of_a_dead_process_are_removed_by_the_next_write(tmp_path):
    from refimpl import io

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    pid = int(dead.stdout)
    dest = tmp_path / "x.safetensors"
    stale = io._temp_path(dest)
    stale = stale.with_name(stale.name.replace(f".{os.getpid()}.", f".{pid}."))
    stale.write_bytes(b"partial")
    mine = io._temp_path(dest)  # this (live) process's: kept
    mine.write_bytes(b"in progress")
    other_host = tmp_path / f".x.safetensors.refimpl-tmp.otherhost.{pid}.0123abcd"  # maybe alive there: kept
    other_host.write_bytes(b"remote")
    io.save_tensors(dest, {"a": np.ones(2)})
    assert not stale.exists() and mine.exists() and other_host.exists()


def test_merge_files_argument_errors_name_the_argument(tmp_path, models):
    base, ms = models
    for kwargs, exc, match in [
        ({"prefix": "/abs/path"}, ValueError, "prefix"),
        ({"prefix": ""}, ValueError, "prefix"),
        ({"prefix": 7}, TypeError, "prefix"),
        ({"prefix": "../up"}, ValueError, "prefix"),
        ({"progress": "no"}, TypeError, "progress"),
    ]:
        with pytest.raises(exc, match=match):
            merging.merge_files(base, ms, tmp_path / "out", **kwargs)
    with pytest.raises(TypeError, match="out_dir"):
        merging.merge_files(base, ms, None, progress=False)
    assert not (tmp_path / "out").exists()


_CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    from refimpl import merging
    from refimpl.merging import streaming
    a = json.loads(sys.argv[1])
    real = streaming._merge_tensor
    def slow(task):
        print("started", flush=True)  # the temporary folder and the first shard exist now
        time.sleep(a["sleep"])
        return real(task)
    streaming._merge_tensor = slow
    merging.merge_files(a["base"], a["models"], a["out"], shard_size=300, method="linear", progress=False)
""")


def test_merge_files_killed_by_sigterm_removes_its_temp_folder(tmp_path, models):
    base, ms = models
    out = tmp_path / "out"
    merging.merge_files(base, ms, out, progress=False)
    before = _snapshot(out)
    arg = json.dumps({"base": str(base), "models": [str(m) for m in ms], "out": str(out), "sleep": 5.0})
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, arg], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"  # mid-merge: a shard is being written
    assert len(_leftovers(out)) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM  # it still ends as SIGTERM asks
    assert _snapshot(out) == before and _leftovers(out) == []


_KILLER = textwrap.dedent("""
    import json, os, random, shutil, signal, sys, time
    from pathlib import Path
    from refimpl import io, merging
    from refimpl.merging import streaming

    a = json.loads(sys.argv[1])
    out, base, models = Path(a["out"]), a["base"], a["models"]
    OLD = dict(method="task_arithmetic", shard_size=10**9, progress=False)  # one file
    NEW = dict(method="linear", shard_size=300, progress=False)             # several shards and an index

    def snap(d):
        if not d.exists():
            return None
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    merging.merge_files(base, models, a["ref_old"], **OLD)
    merging.merge_files(base, models, a["ref_new"], **NEW)
    ref = {"old": snap(Path(a["ref_old"])), "new": snap(Path(a["ref_new"]))}

    def outcome():
        s = snap(out)
        return "absent" if s is None else next((k for k, v in ref.items() if v == s), "MIX")

    def child(kill_at, sleep):
        # the merge in a forked child that SIGKILLs itself at its kill_at-th file-system step
        pid = os.fork()
        if pid:
            return pid
        count = [0]
        def step(fn):
            def wrapped(*args, **kw):
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*args, **kw)
            return wrapped
        for mod, name in [(os, "fsync"), (os, "rename"), (os, "replace"), (os, "unlink"), (os, "mkdir"),
                          (os, "rmdir"), (shutil, "rmtree"), (io, "_exchange"), (streaming, "_merge_tensor")]:
            setattr(mod, name, step(getattr(mod, name)))
        if sleep:
            real = streaming._merge_tensor
            def slow(task):
                time.sleep(sleep)
                return real(task)
            streaming._merge_tensor = slow
        try:
            merging.merge_files(base, models, out, **NEW)
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(1)
        os._exit(0)

    runs = []
    for start in ("old", "absent"):
        for kill_at in range(1, 200):
            shutil.rmtree(out, ignore_errors=True)
            if start == "old":
                merging.merge_files(base, models, out, **OLD)
            status = os.waitpid(child(kill_at, 0.0), 0)[1]
            killed = os.WIFSIGNALED(status)
            failed = os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0
            runs.append({"start": start, "kill": f"step {kill_at}" if killed else "none",
                         "outcome": "ERROR" if failed else outcome()})
            if not killed:
                break
    rng = random.Random(14)
    t0 = time.perf_counter()
    os.waitpid(child(0, 0.002), 0)
    whole = time.perf_counter() - t0
    for _ in range(a["random_kills"]):
        shutil.rmtree(out, ignore_errors=True)
        merging.merge_files(base, models, out, **OLD)
        pid = child(0, 0.002)
        at = rng.uniform(0.0, 1.2 * whole)
        time.sleep(at)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        runs.append({"start": "old", "kill": f"{at * 1e3:.1f} ms", "outcome": outcome()})
    os.waitpid(child(3, 0.0), 0)  # one more kill mid-merge: its temporary folder stays behind
    stale = len([p for p in out.parent.iterdir() if ".refimpl-tmp." in p.name])
    merging.merge_files(base, models, out, **NEW)  # the next run removes what the killed ones left
    left = len([p for p in out.parent.iterdir() if ".refimpl-tmp." in p.name])
    print(json.dumps({"runs": runs, "whole_ms": whole * 1e3, "stale_before": stale, "left_after": left,
                      "final": outcome()}))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_merge_files_killed_at_any_point_leaves_the_earlier_merge_or_the_new_one(tmp_path, models):
    base, ms = models
    arg = json.dumps(
        {
            "base": str(base),
            "models": [str(m) for m in ms],
            "out": str(tmp_path / "work" / "out"),
            "ref_old": str(tmp_path / "ref_old"),
            "ref_new": str(tmp_path / "ref_new"),
            "random_kills": 12,
        }
    )
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _KILLER, arg], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout.strip().splitlines()[-1])
    runs = res["runs"]
    tally: dict[str, int] = {}
    for r in runs:
        how = "step" if r["kill"].startswith("step") else "none" if r["kill"] == "none" else "random"
        key = f"{how} {r['start']}->{r['outcome']}"
        tally[key] = tally.get(key, 0) + 1
    print(
        f"\nkill test: {len(runs)} runs in {time.perf_counter() - t0:.1f} s (a whole merge "
        f"{res['whole_ms']:.0f} ms); outcomes {tally}; temp folders left by kills {res['stale_before']}, "
        f"after the next run {res['left_after']}"
    )
    assert all(
        r["outcome"] in ("old", "new") if r["start"] == "old" else r["outcome"] in ("absent", "new") for r in runs
    ), runs
    step_kills = [r for r in runs if r["kill"].startswith("step")]
    assert len(step_kills) > 20  # every file-system step of a 3-shard merge was a kill point
    assert {"step old->old", "step old->new", "step absent->absent", "step absent->new"} <= set(tally)
    assert res["stale_before"] > 0 and res["left_after"] == 0 and res["final"] == "new"
