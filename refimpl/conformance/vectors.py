"""Golden vectors: spec/vectors/v1/<op>/<case>.safetensors and MANIFEST.json.

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

import hashlib
import json
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
SEED = 20260601  # SeedSequence entropy; each op draws from SeedSequence([SEED, crc32(op)])


def default_dir() -> Path:
    """spec/vectors/v1 of the source checkout."""
    return Path(refimpl.__file__).resolve().parent.parent / "spec" / "vectors" / FORMAT


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
    for name, arr in result.items():
        tensors[f"output.{name}"] = np.array(arr, order="C", copy=True)
    meta = {"op": spec.name, "case": label, "args": list(case), "scalars": scalars, "kinds": kinds,
            "outputs": list(result), "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "tolerance": spec.tolerance.kind,
            "spec_version": refimpl.SPEC_VERSION, "generator": f"refimpl {refimpl.__version__}", "format": FORMAT}
    return io.tensors_to_bytes(tensors, meta)


def build(ops: str | Iterable[str] | None = None) -> dict[str, bytes]:
    """Relative path -> file bytes for every golden case of the available ops."""
    files: dict[str, bytes] = {}
    for spec in select(ops):
        if spec.golden is None or not spec.available():
            continue
        for label, case in spec.golden(_rng(spec.name)):
            files[f"{spec.name}/{label}.safetensors"] = _encode(spec, label, case)
    return files


def _manifest(files: dict[str, bytes]) -> bytes:
    entries = {path: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
               for path, data in sorted(files.items())}
    doc = {"format": FORMAT, "spec_version": refimpl.SPEC_VERSION, "generator": f"refimpl {refimpl.__version__}",
           "seed": SEED, "total_bytes": sum(len(d) for d in files.values()), "files": entries}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def generate(directory: str | Path | None = None) -> dict[str, Any]:
    """Write every golden vector and MANIFEST.json; stale files of this format are removed."""
    d = Path(directory) if directory is not None else default_dir()
    files = build()
    total = sum(len(b) for b in files.values())
    if total > MAX_TOTAL_BYTES:
        raise ValueError(f"golden vectors: {total} bytes exceed the {MAX_TOTAL_BYTES}-byte budget")
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*/*.safetensors"):
        if old.relative_to(d).as_posix() not in files:
            old.unlink()
    for rel, data in files.items():
        p = d / rel
        if not p.is_file() or p.read_bytes() != data:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    for sub in d.iterdir():
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    (d / "MANIFEST.json").write_bytes(_manifest(files))
    return {"directory": str(d), "files": len(files), "total_bytes": total,
            "ops": len({rel.split("/")[0] for rel in files})}


def verify(directory: str | Path | None = None) -> list[str]:
    """Regenerate in memory and compare with the files on disk; returns the problems (empty = verified)."""
    d = Path(directory) if directory is not None else default_dir()
    problems: list[str] = []
    if not (d / "MANIFEST.json").is_file():
        return [f"{d}: no MANIFEST.json (run `refimpl vectors generate`)"]
    files = build()
    on_disk = {p.relative_to(d).as_posix() for p in d.glob("*/*.safetensors")}
    for rel in sorted(on_disk - set(files)):
        problems.append(f"{rel}: on disk but not regenerated (op removed or its module is unavailable here)")
    for rel, data in sorted(files.items()):
        p = d / rel
        if not p.is_file():
            problems.append(f"{rel}: missing on disk")
        elif p.read_bytes() != data:
            problems.append(f"{rel}: differs from the regenerated bytes")
    if (d / "MANIFEST.json").read_bytes() != _manifest(files):
        problems.append("MANIFEST.json: differs from the regenerated manifest")
    else:
        manifest = json.loads((d / "MANIFEST.json").read_text())
        for rel, entry in manifest["files"].items():
            p = d / rel
            if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() != entry["sha256"]:
                problems.append(f"{rel}: sha256 does not match MANIFEST.json")
    return problems


def load_op(op: str, directory: str | Path | None = None) -> list[tuple[str, dict[str, Any], dict[str, np.ndarray]]]:
    """The golden cases of one op: (label, keyword arguments, expected named outputs)."""
    d = (Path(directory) if directory is not None else default_dir()) / op
    paths = sorted(d.glob("*.safetensors")) if d.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"no golden vectors for {op} in {d.parent} (run `refimpl vectors generate`)")
    out = []
    for p in paths:
        tensors, meta = io.load_tensors(p)
        # safetensors' NumPy reader returns 0-d tensors as shape (1,): restore the stored shapes
        tensors = {k: v.reshape(meta["shapes"][k]) for k, v in tensors.items()}
        case: dict[str, Any] = {}
        for name in meta["args"]:
            kind = meta["kinds"].get(name)
            if kind is None:
                case[name] = meta["scalars"][name]
            elif kind == "array":
                case[name] = tensors[f"input.{name}"]
            elif kind.startswith("list"):
                case[name] = [tensors[f"input.{name}.{i}"] for i in range(int(kind[4:]))]
            else:
                from refimpl.quant import QuantState

                prefix = f"input.{name}."
                parts = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                case[name] = QuantState.from_bnb_dict(parts, profile=kind.split(":", 1)[1])
        expected = {name: tensors[f"output.{name}"] for name in meta["outputs"]}
        out.append((meta["case"], case, expected))
    return out
