"""safetensors I/O: golden vectors and PEFT adapter folders. Never pickle.

Files are written with a single metadata entry (``"refimpl"``, a JSON object with
sorted keys), because safetensors writes a multi-key metadata map in a
per-process random order; with one key the bytes are deterministic, which the
golden vectors' sha256 manifest relies on. Writes go to a temporary file that is
renamed into place, so a failure never leaves a partial file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from refimpl import _checks

META_KEY = "refimpl"

class MissingFileError(FileNotFoundError, ValueError):
    """A required file is absent: a FileNotFoundError that is also the ValueError every refimpl
    function raises for bad input."""


#: dtypes a golden vector may hold (stored exactly; bfloat16 travels as its uint16 bits)
STORABLE = ("float64", "float32", "float16", "int64", "int32", "uint8", "uint16", "bool")


def _check_tensors(tensors: Any) -> dict[str, np.ndarray]:
    if not isinstance(tensors, Mapping) or not tensors:
        raise TypeError(f"tensors: expected a non-empty mapping name -> array, got {_checks.describe(tensors)}")
    out = {}
    for k, v in tensors.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"tensors: expected non-empty str keys, got {k!r}")
        if not isinstance(v, np.ndarray):
            raise TypeError(f"tensors[{k!r}]: expected a numpy array, got {_checks.describe(v)}")
        if v.dtype.name not in STORABLE:
            raise TypeError(f"tensors[{k!r}]: expected one of {', '.join(STORABLE)}, got dtype {v.dtype}")
        out[k] = np.array(v, order="C", copy=True)
    return out


def tensors_to_bytes(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> bytes:
    """Deterministic safetensors bytes of ``tensors`` with ``meta`` (JSON-serialisable) as metadata."""
    from safetensors.numpy import save

    t = _check_tensors(tensors)
    if meta is not None and not isinstance(meta, Mapping):
        raise TypeError(f"meta: expected a mapping, got {_checks.describe(meta)}")
    text = json.dumps(dict(meta or {}), sort_keys=True, allow_nan=False, separators=(",", ":"))
    return save(t, metadata={META_KEY: text})


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray],
                 meta: Mapping[str, Any] | None = None) -> Path:
    """Write a safetensors file atomically (temporary file, then rename)."""
    data = tensors_to_bytes(tensors, meta)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a safetensors file: (tensors, refimpl metadata; {} when absent)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"path: no safetensors file at {p}")
    tensors: dict[str, np.ndarray] = {}
    with safe_open(str(p), framework="numpy") as fh:
        meta = fh.metadata() or {}
        for k in fh.keys():
            tensors[k] = fh.get_tensor(k)
    text = meta.get(META_KEY)
    return tensors, (json.loads(text) if text else {})


def load_peft_adapter(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A PEFT adapter folder: (adapter_config.json as a dict, adapter_model.safetensors tensors).

    Only the safetensors weights are read; a folder with only ``adapter_model.bin`` (a pickle)
    is refused.
    """
    d = Path(folder)
    cfg_path, st_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise MissingFileError(f"folder: no adapter_config.json in {d}")
    if not st_path.is_file():
        has_bin = (d / "adapter_model.bin").exists()
        hint = " (adapter_model.bin is a pickle, which refimpl never loads)" if has_bin else ""
        raise MissingFileError(f"folder: no adapter_model.safetensors in {d}{hint}")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    tensors, _ = load_tensors(st_path)
    return config, tensors
