"""Golden vectors: refimpl/golden/v1/<op>/<case>.safetensors and MANIFEST.json (package data).

Each file holds one case of one op: ``input.<arg>`` tensors (stored exactly:
float64, float32, integers), ``output.<name>`` tensors (the reference's result,
flattened: ``output.out`` for a single array, ``output.out.dx`` for a field), and
one metadata entry ``refimpl`` with the op, case label, argument order, scalar
arguments (JSON), tolerance kind, spec and generator versions. Inputs are chosen
so that outputs are exactly representable where the op allows it (dyadic values:
every sum of products is exact in float32 and float64), so a kernel in any
language can compare bit for bit. See spec/vectors.md for readers in C++, Rust
and JavaScript.

``generate`` writes them deterministically (seeded, single-key metadata);
``verify`` regenerates in memory and compares bytes with the files and manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

import refimpl
from refimpl import io
from refimpl.conformance._values import flatten
from refimpl.conformance.table import OpSpec, select

FORMAT = "v1"
MAX_TOTAL_BYTES = 5 * 1024 * 1024
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a MANIFEST.json larger than this is not one generate wrote
SEED = 20260601  # SeedSequence entropy; each op draws from SeedSequence([SEED, crc32(op)])


def default_dir() -> Path:
    """The committed vectors, shipped as package data: ``refimpl/golden/v1`` (importlib.resources)."""
    import importlib.resources

    return Path(str(importlib.resources.files("refimpl") / "golden" / FORMAT))


def _rng(op: str) -> np.random.Generator:
    import zlib

    return np.random.default_rng(np.random.SeedSequence([SEED, zlib.crc32(op.encode())]))


def _encode(spec: OpSpec, label: str, case: dict[str, Any]) -> bytes:
    tensors: dict[str, np.ndarray] = {}
    scalars: dict[str, Any] = {}
    kinds: dict[str, str] = {}  # how a non-scalar argument is stored: array, list (of arrays), QuantState
    for k, v in case.items():
        if isinstance(v, np.ndarray):
            tensors[f"input.{k}"], kinds[k] = v, "array"
        elif isinstance(v, (list, tuple)) and v and all(isinstance(e, np.ndarray) for e in v):
            for i, e in enumerate(v):
                tensors[f"input.{k}.{i}"] = e
            kinds[k] = f"list{len(v)}"
        elif hasattr(v, "to_bnb_dict"):
            for name, t in v.to_bnb_dict().items():
                tensors[f"input.{k}.{name}"] = t
            kinds[k] = "QuantState:" + v.profile
        elif isinstance(v, (np.generic,)):
            scalars[k] = v.item()
        else:
            scalars[k] = v
    result = flatten(spec.reference()(**{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in case.items()}))
    text: dict[str, str] = {}  # names in the result (a dtype, a quant type) are stored as metadata
    for name, arr in result.items():
        if arr.dtype.kind in "US":
            text[name] = str(arr)
        else:
            tensors[f"output.{name}"] = np.array(arr, order="C", copy=True)
    meta = {
        "op": spec.name,
        "case": label,
        "args": list(case),
        "scalars": scalars,
        "kinds": kinds,
        "outputs": list(result),
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "tolerance": spec.tolerance.kind,
        "spec_version": refimpl.SPEC_VERSION,
        "generator": f"refimpl {refimpl.__version__}",
        "format": FORMAT,
    }
    if text:
        meta["text_outputs"] = text
    return io.tensors_to_bytes(tensors, meta)


def build(ops: str | Iterable[str] | None = None) -> dict[str, bytes]:
    """Relative path -> file bytes for every golden case of the selected ops."""
    files: dict[str, bytes] = {}
    for spec in select(ops):
        if spec.golden is None:
            continue
        for label, case in spec.golden(_rng(spec.name)):
            files[f"{spec.name}/{label}.safetensors"] = _encode(spec, label, case)
    return files


def _manifest(files: dict[str, bytes]) -> bytes:
    entries = {
        path: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for path, data in sorted(files.items())
    }
    doc = {
        "format": FORMAT,
        "spec_version": refimpl.SPEC_VERSION,
        "generator": f"refimpl {refimpl.__version__}",
        "seed": SEED,
        "total_bytes": sum(len(d) for d in files.values()),
        "files": entries,
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def _manifest_listing(d: Path) -> set[str] | None:
    """The files a MANIFEST.json of this format in ``d`` lists, or None when there is no such manifest."""
    m = d / "MANIFEST.json"
    try:
        if not m.is_file() or m.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        doc = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
        return None
    return {rel for rel in doc["files"] if isinstance(rel, str)}


def _owned(d: Path) -> list[str]:
    """The files in ``d`` that ``generate`` wrote (MANIFEST.json and the files it lists), as relative paths.

    ValueError when ``d`` is a file or holds anything else: a folder given by mistake (a model, a
    checkout) is refused, never cleaned.
    """
    if not d.exists() and not d.is_symlink():
        return []
    if not d.is_dir():
        raise ValueError(f"directory: expected a folder for the golden vectors, got the file {str(d)!r}")
    listed = _manifest_listing(d)
    own = set() if listed is None else listed | {"MANIFEST.json"}
    present = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_symlink() or not p.is_dir())
    foreign = [rel for rel in present if rel not in own]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        why = "no MANIFEST.json of golden vectors" if listed is None else "files its MANIFEST.json does not list"
        raise ValueError(
            f"directory: {str(d)!r} holds {why} ({shown}); `vectors generate` replaces the whole "
            "folder, so give it a new or empty folder or one it generated earlier"
        )
    return present


def _remove_owned(old: Path, owned: list[str]) -> None:
    """Delete the previous vectors that the commit moved to ``old``: only the files checked as generated."""
    for rel in owned:
        (old / rel).unlink(missing_ok=True)
    for sub in sorted((p for p in old.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    try:
        old.rmdir()
    except OSError:
        warnings.warn(f"vectors generate: {old} kept: files appeared in the folder while generating", stacklevel=3)


def generate(directory: str | Path) -> dict[str, Any]:
    """Write every golden vector and MANIFEST.json into ``directory``, which the caller names (in a source
    checkout the committed set is ``refimpl/golden/v1``; an installed package is never written into).

    The folder must be absent, empty, or hold only what an earlier ``generate`` wrote (its
    MANIFEST.json and the files listed there); anything else raises ValueError before a byte is
    written. The new set is written into a hidden folder beside it and swapped in with one rename,
    so a failure (full disk, Ctrl-C, SIGTERM) leaves the old set whole and no partial file.
    """
    if directory is None or not isinstance(directory, (str, Path)) or not str(directory):
        raise ValueError(
            "directory: name the folder to write the golden vectors into (refimpl/golden/v1 in a "
            f"source checkout), got {directory!r}"
        )
    given = Path(directory)
    d = given.resolve()
    files = build()
    total = sum(len(b) for b in files.values())
    if total > MAX_TOTAL_BYTES:
        raise ValueError(f"golden vectors: {total} bytes exceed the {MAX_TOTAL_BYTES}-byte budget")
    _owned(d)
    tmp = io._make_temp_dir(d)
    old: Path | None = None
    owned: list[str] = []
    committed = False
    with io._sigterm_cleanup():
        try:
            for rel, data in [*files.items(), ("MANIFEST.json", _manifest(files))]:
                p = tmp / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                with open(p, "xb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            with io._critical():
                owned = _owned(d)  # check again just before the swap
                old = io._commit_dir(tmp, d)
                committed = True
        except BaseException:
            if not committed:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if old is not None:
                _remove_owned(old, owned)
    return {
        "directory": str(given),
        "files": len(files),
        "total_bytes": total,
        "ops": len({rel.split("/")[0] for rel in files}),
    }


def _read_expected(p: Path, size: int) -> bytes | None:
    """The bytes of ``p`` when it is a regular file of exactly ``size`` bytes (never reads more), else None."""
    try:
        if not p.is_file() or p.stat().st_size != size:
            return None
        with open(p, "rb") as fh:
            return fh.read(size + 1)
    except OSError:
        return None


def verify(directory: str | Path | None = None) -> list[str]:
    """Regenerate in memory and compare with the files on disk; returns the problems (empty = verified).

    A file is read only when its size equals the regenerated one, so a huge or special file in the
    folder costs one ``stat``; unreadable files are problems, not exceptions.
    """
    d = Path(directory) if directory is not None else default_dir()
    problems: list[str] = []
    if not (d / "MANIFEST.json").is_file():
        return [f"{d}: no MANIFEST.json (in a source checkout: `refimpl vectors generate --dir refimpl/golden/v1`)"]
    files = build()
    on_disk = {p.relative_to(d).as_posix() for p in d.glob("*/*.safetensors")}
    for rel in sorted(on_disk - set(files)):
        problems.append(f"{rel}: on disk but not regenerated (op removed or its module is unavailable here)")
    for rel, data in sorted(files.items()):
        p = d / rel
        if not p.is_file():
            problems.append(f"{rel}: missing on disk")
        elif _read_expected(p, len(data)) != data:
            problems.append(f"{rel}: differs from the regenerated bytes")
    manifest = _manifest(files)
    if _read_expected(d / "MANIFEST.json", len(manifest)) != manifest:
        problems.append("MANIFEST.json: differs from the regenerated manifest")
    else:
        for rel, entry in json.loads(manifest)["files"].items():
            on_disk_bytes = _read_expected(d / rel, entry["bytes"])
            if on_disk_bytes is not None and hashlib.sha256(on_disk_bytes).hexdigest() != entry["sha256"]:
                problems.append(f"{rel}: sha256 does not match MANIFEST.json")
    return problems


_META_TYPES: dict[str, type] = {
    "op": str,
    "case": str,
    "args": list,
    "scalars": dict,
    "kinds": dict,
    "outputs": list,
    "shapes": dict,
}


def _manifest_entries(d: Path) -> dict[str, Any]:
    """The ``files`` of MANIFEST.json in ``d``: relative path -> {"sha256", "bytes"}; ValueError naming it."""
    m = d / "MANIFEST.json"
    try:
        if m.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"{m}: larger than {MAX_MANIFEST_BYTES} bytes: not a manifest of golden vectors")
        doc = json.loads(m.read_bytes())
    except FileNotFoundError:
        raise ValueError(
            f"{m}: missing; golden vectors are only read with their manifest (run `refimpl vectors generate`)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{m}: not a readable JSON manifest ({type(exc).__name__}: {exc})") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
        for e in files.values()
    ):
        raise ValueError(f'{m}: expected an object with "files": {{path: {{"sha256", "bytes"}}}}')
    return files


def _check_file(p: Path, entry: dict[str, Any]) -> None:
    """ValueError naming ``p`` unless its size and sha256 are those MANIFEST.json lists (a file of another
    size is never read, so a huge file costs one ``stat``)."""
    size = p.stat().st_size
    if size != entry["bytes"]:
        raise ValueError(
            f"{p}: {size} bytes, MANIFEST.json lists {entry['bytes']}: the file was changed "
            "after `refimpl vectors generate` (regenerate it, or restore it)"
        )
    with open(p, "rb") as fh:
        data = fh.read(size + 1)
    if len(data) != size or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(
            f"{p}: sha256 does not match MANIFEST.json: the file was changed after "
            "`refimpl vectors generate` (regenerate it, or restore it)"
        )


def _decode_case(
    p: Path,
    op: str,
    tensors: dict[str, np.ndarray],
    meta: dict[str, Any],
) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """(label, keyword arguments, expected outputs) of one vector file; ValueError naming ``p`` when its
    metadata is incomplete or does not fit its tensors."""
    for key, typ in _META_TYPES.items():
        if key not in meta:
            raise ValueError(
                f"{p}: metadata has no {key!r} (keys: {sorted(meta)}); not a golden vector of format {FORMAT}"
            )
        if not isinstance(meta[key], typ):
            raise ValueError(f"{p}: metadata {key!r}: expected a JSON {typ.__name__}, got {type(meta[key]).__name__}")
    if meta["op"] != op:
        raise ValueError(f"{p}: holds a case of {meta['op']!r}, not of {op!r}")
    names = [*meta["args"], *meta["outputs"]]
    if not all(isinstance(n, str) for n in names) or not all(isinstance(k, str) for k in meta["kinds"].values()):
        raise ValueError(f"{p}: metadata 'args', 'outputs' and 'kinds' must hold strings")
    try:
        # safetensors' NumPy reader returns 0-d tensors as shape (1,): restore the stored shapes
        tensors = {k: v.reshape(meta["shapes"][k]) for k, v in tensors.items()}
        case: dict[str, Any] = {}
        for name in meta["args"]:
            kind = meta["kinds"].get(name)
            if kind is None:
                case[name] = meta["scalars"][name]
            elif kind == "array":
                case[name] = tensors[f"input.{name}"]
            elif kind.startswith("list") and kind[4:].isdigit():
                case[name] = [tensors[f"input.{name}.{i}"] for i in range(int(kind[4:]))]
            elif kind.startswith("QuantState:"):
                from refimpl.quant import QuantState

                prefix = f"input.{name}."
                parts = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                # the stored state is the reference's own output (NaN offsets included), checked by its sha256
                case[name] = QuantState.from_bnb_dict(parts, profile=kind.split(":", 1)[1], nonfinite="propagate")
            else:
                raise ValueError(f"unknown kind {kind!r} of argument {name!r}")
        text = meta.get("text_outputs", {})
        expected = {
            name: np.asarray(text[name]) if name in text else tensors[f"output.{name}"] for name in meta["outputs"]
        }
    except KeyError as exc:
        raise ValueError(f"{p}: no {exc.args[0]!r} in the file's tensors or metadata") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{p}: {exc}") from None
    return meta["case"], case, expected


def load_op(op: str, directory: str | Path | None = None) -> list[tuple[str, dict[str, Any], dict[str, np.ndarray]]]:
    """The golden cases of one op: (label, keyword arguments, expected named outputs).

    FileNotFoundError when the op has no vectors. Every file is checked against MANIFEST.json (size and
    sha256; a file it does not list, or a listed one that is missing, counts too) before it is decoded,
    and a tampered, malformed or incomplete file raises ValueError naming it: the runner reports that
    as a failure of the golden tier, never as a traceback.
    """
    root = Path(directory) if directory is not None else default_dir()
    d = root / op
    paths = sorted(d.glob("*.safetensors")) if d.is_dir() else []
    if not paths:
        raise FileNotFoundError(
            f"no golden vectors for {op} in {root} (in a source checkout: "
            "`refimpl vectors generate --dir refimpl/golden/v1`)"
        )
    entries = _manifest_entries(root)
    listed = {rel for rel in entries if rel.startswith(f"{op}/") and rel.count("/") == 1}
    missing = sorted(listed - {f"{op}/{p.name}" for p in paths})
    if missing:
        raise ValueError(
            f"{root / missing[0]}: listed in MANIFEST.json but missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    out = []
    for p in paths:
        entry = entries.get(f"{op}/{p.name}")
        if entry is None:
            raise ValueError(
                f"{p}: not listed in {root / 'MANIFEST.json'} (a stray or renamed file; run "
                "`refimpl vectors generate` or remove it)"
            )
        try:
            _check_file(p, entry)
        except OSError as exc:
            raise ValueError(f"{p}: cannot be read ({exc.strerror or exc})") from None
        tensors, meta = io.load_tensors(p)  # format errors: ValueError naming the file
        out.append(_decode_case(p, op, tensors, meta))
    return out
