"""safetensors I/O: golden vectors, PEFT adapter folders and merged models. Never pickle.

Reading: ``read_header`` parses and checks a safetensors header itself (size, JSON, dtypes,
shapes, offsets that tile the data exactly), and ``read_tensor`` reads one tensor with one
positioned read. Every format problem is a ValueError that names the file (and the tensor), and
every dtype of ``DTYPES`` loads, FP8 and bfloat16 included (through ml_dtypes), 0-d tensors keep
their shape ().

Writing: files are written with a single metadata entry (``"refimpl"``, a JSON object with
sorted keys), because safetensors writes a multi-key metadata map in a per-process random order;
with one key the bytes are deterministic, which the golden vectors' sha256 manifest relies on.

Committing: nothing is written in place. A file goes to a hidden temporary name beside it and is
renamed over the destination; a folder of files (a multi-shard merge, the golden vectors) is
written into a hidden temporary folder beside the destination and swapped in with one rename
(``_commit_dir``). Temporary names carry the host and process id, so a later run removes the
leftovers of a killed one (``_remove_stale``); ``_sigterm_cleanup`` turns SIGTERM into an exception
for the duration of a write, so the writer's cleanup runs before the process ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from refimpl import _checks

META_KEY = "refimpl"


class MissingFileError(FileNotFoundError, ValueError):
    """A required file is absent: a FileNotFoundError that is also the ValueError every refimpl
    function raises for bad input."""


#: dtypes a golden vector may hold (stored exactly; bfloat16 travels as its uint16 bits)
STORABLE = ("float64", "float32", "float16", "int64", "int32", "uint8", "uint16", "bool")

#: safetensors dtype code -> NumPy dtype (little-endian, as the format stores them)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
#: NumPy dtype -> safetensors dtype code
CODES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}

#: the safetensors library's own limit on the JSON header
MAX_HEADER_BYTES = 100_000_000


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: where its bytes are in the file."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  #: absolute file offset of the first byte
    nbytes: int


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: the metadata map and the tensors, sorted by name."""

    path: str
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and check the header of a safetensors file; any format problem is a ValueError naming the file.

    Checked: the 8-byte length fits the file and the 100 MB limit; the header is UTF-8 JSON, an
    object without duplicate keys; ``__metadata__`` maps str to str; every tensor has a known dtype,
    a shape of non-negative ints and ``data_offsets`` whose extent equals shape × itemsize; the
    tensors tile the data section exactly (no gap, no overlap, nothing after the last one).
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{p}: no such safetensors file")
    with open(p, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 8:
            raise ValueError(f"{p}: not a safetensors file: {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(fh.read(8), "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(
                f"{p}: not a safetensors file: header length {n} exceeds "
                f"{'the file size ' + str(size) if 8 + n > size else 'the 100 MB limit'}"
            )
        raw = fh.read(n)
    try:
        head = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{p}: not a safetensors file: the header is not valid JSON ({exc})") from None
    if not isinstance(head, dict):
        raise ValueError(f"{p}: not a safetensors file: the header is JSON {type(head).__name__}, not an object")
    meta = head.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{p}: __metadata__: expected an object of strings, got {_checks.describe(meta)}")
    data_start, data_len = 8 + n, size - 8 - n
    spans = []
    tensors: dict[str, TensorEntry] = {}
    for key, entry in head.items():
        where = f"{p}: tensor {key!r}"
        if not isinstance(entry, dict):
            raise ValueError(
                f"{where}: expected an object with dtype, shape and data_offsets, got {_checks.describe(entry)}"
            )
        code, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if code not in DTYPES:
            raise ValueError(f"{where}: unsupported dtype {code!r}; expected one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_index(s) for s in shape):
            raise ValueError(f"{where}: expected a shape of non-negative integers, got {shape!r}")
        if not (
            isinstance(offs, list)
            and len(offs) == 2
            and all(_is_index(o) for o in offs)
            and offs[0] <= offs[1] <= data_len
        ):
            raise ValueError(
                f"{where}: expected data_offsets [begin, end] within the {data_len}-byte data section, got {offs!r}"
            )
        nbytes = DTYPES[code].itemsize
        for s in shape:
            nbytes *= s  # Python ints: no overflow
        if offs[1] - offs[0] != nbytes:
            raise ValueError(
                f"{where}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, but shape {shape} of "
                f"{code} needs {nbytes}"
            )
        spans.append((offs[0], offs[1], key))
        tensors[key] = TensorEntry(DTYPES[code], tuple(shape), data_start + offs[0], nbytes)
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            kind = "overlaps the previous tensor" if begin < end else f"leaves a gap of {begin - end} bytes"
            raise ValueError(f"{p}: tensor {key!r}: data_offsets {[begin, stop]} {kind}")
        end = stop
    if end != data_len:
        raise ValueError(f"{p}: not a safetensors file: tensors cover {end} of the {data_len} data bytes")
    return Header(str(p), dict(meta), dict(sorted(tensors.items())))  # by name, as safetensors' keys()


def read_tensor(path: str | os.PathLike[str], key: str, entry: TensorEntry) -> npt.NDArray[Any]:
    """Read one tensor (a writable array of ``entry``'s dtype and shape) with one positioned read."""
    if not isinstance(entry, TensorEntry):
        raise TypeError(f"entry: expected a TensorEntry from read_header, got {_checks.describe(entry)}")
    arr = np.empty(entry.shape, dtype=entry.dtype)
    with open(path, "rb") as fh:
        fh.seek(entry.offset)
        got = fh.readinto(arr.reshape(-1).view(np.uint8).data) if entry.nbytes else 0
    if got != entry.nbytes:
        raise ValueError(f"{path}: tensor {key!r}: file truncated ({got} of {entry.nbytes} bytes)")
    return arr


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
    """Read a safetensors file: (tensors, refimpl metadata; {} when absent).

    Format errors, and refimpl metadata that is not a JSON object, raise ValueError naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"path: no safetensors file at {p}")
    header = read_header(p)
    tensors = {k: read_tensor(p, k, e) for k, e in header.tensors.items()}
    text = header.metadata.get(META_KEY)
    if not text:
        return tensors, {}
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{p}: __metadata__[{META_KEY!r}]: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{p}: __metadata__[{META_KEY!r}]: expected a JSON object, got {type(meta).__name__}")
    return tensors, meta


# --------------------------------------------------------------------------- writing


def _check_tensors(tensors: Any) -> dict[str, np.ndarray]:
    if not isinstance(tensors, Mapping) or not tensors:
        raise TypeError(f"tensors: expected a non-empty mapping name -> array, got {_checks.describe(tensors)}")
    out = {}
    for k, v in tensors.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"tensors: expected non-empty str keys, got {k!r}")
        if k == "__metadata__":
            raise ValueError(
                "tensors: the name '__metadata__' is reserved by the safetensors format; pass metadata as meta="
            )
        if not isinstance(v, np.ndarray) or isinstance(v, (np.ma.MaskedArray, np.matrix)):
            raise TypeError(f"tensors[{k!r}]: expected a numpy array, got {_checks.describe(v)}")
        if v.dtype.name not in STORABLE:
            raise TypeError(f"tensors[{k!r}]: expected one of {', '.join(STORABLE)}, got dtype {v.dtype}")
        out[k] = np.array(v, order="C", copy=True)
    return out


def tensors_to_bytes(tensors: Mapping[str, npt.NDArray[Any]], meta: Mapping[str, Any] | None = None) -> bytes:
    """Deterministic safetensors bytes of ``tensors`` with ``meta`` (JSON-serialisable) as metadata."""
    from safetensors.numpy import save

    t = _check_tensors(tensors)
    if meta is not None and not isinstance(meta, Mapping):
        raise TypeError(f"meta: expected a mapping, got {_checks.describe(meta)}")
    text = json.dumps(dict(meta or {}), sort_keys=True, allow_nan=False, separators=(",", ":"))
    return save(t, metadata={META_KEY: text})


def save_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, npt.NDArray[Any]], meta: Mapping[str, Any] | None = None
) -> Path:
    """Write a safetensors file atomically (temporary file, fsync, then rename)."""
    data = tensors_to_bytes(tensors, meta)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(p)
    tmp = _temp_path(p)
    with _sigterm_cleanup():
        try:
            with open(tmp, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return p


def load_peft_adapter(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """A PEFT adapter folder: (adapter_config.json as a dict, adapter_model.safetensors tensors).

    Only the safetensors weights are read; a folder with only ``adapter_model.bin`` (a pickle)
    is refused. A config that is not a JSON object raises ValueError naming the file.
    """
    d = Path(folder)
    cfg_path, st_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise MissingFileError(f"folder: no adapter_config.json in {d}")
    if not st_path.is_file():
        has_bin = (d / "adapter_model.bin").exists()
        hint = " (adapter_model.bin is a pickle, which refimpl never loads)" if has_bin else ""
        raise MissingFileError(f"folder: no adapter_model.safetensors in {d}{hint}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{cfg_path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got a JSON {type(config).__name__}")
    tensors, _ = load_tensors(st_path)
    return config, tensors


# --------------------------------------------------------------------------- committing

_TMP_TAG = ".refimpl-tmp."


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _temp_path(dest: str | os.PathLike[str]) -> Path:
    """A fresh hidden name beside ``dest``: ``.<name>.refimpl-tmp.<host>.<pid>.<random>``."""
    d = Path(dest)
    return d.parent / f".{d.name}{_TMP_TAG}{_host()}.{os.getpid()}.{secrets.token_hex(4)}"


def _pid_dead(pid: int) -> bool:
    if os.name != "posix":
        return False  # os.kill(pid, 0) is not a probe on Windows: never guess
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _remove_stale(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files and folders that killed refimpl processes of this host left beside ``dest``."""
    d = Path(dest)
    pattern = re.compile(re.escape(f".{d.name}{_TMP_TAG}{_host()}.") + r"(\d+)\.[0-9a-f]+")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(d.parent))
    except OSError:
        return removed
    for e in entries:
        m = pattern.fullmatch(e.name)
        if m and int(m.group(1)) != os.getpid() and _pid_dead(int(m.group(1))):
            with contextlib.suppress(OSError):
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path)
                else:
                    os.unlink(e.path)
                removed.append(Path(e.path))
    return removed


def _make_temp_dir(dest: str | os.PathLike[str]) -> Path:
    """Create a fresh hidden folder beside ``dest`` (same filesystem, so it can be renamed onto it),
    after removing the leftovers of killed runs."""
    d = Path(dest)
    d.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(d)
    tmp = _temp_path(d)
    tmp.mkdir()
    return tmp


def _fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (new names, renames) to disk, where the OS allows it."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _renameat2 = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _renameat2 = fn
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # this filesystem cannot exchange: the caller falls back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _commit_dir(tmp: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path | None:
    """Make the complete folder ``tmp`` appear at ``dest`` in one step.

    ``dest`` absent: one rename. ``dest`` present: one atomic exchange (Linux); elsewhere two renames,
    between which ``dest`` is briefly absent (never a mix). Returns the path that now holds ``dest``'s
    previous content, for the caller to remove what it owns there, or None when there was none.
    """
    t, d = Path(tmp), Path(dest)
    _fsync_dir(t)
    if not os.path.lexists(d):
        os.rename(t, d)
        _fsync_dir(d.parent)
        return None
    if _exchange(t, d):
        _fsync_dir(d.parent)
        return t
    old = _temp_path(d)
    os.rename(d, old)
    try:
        os.rename(t, d)
    except BaseException:
        os.rename(old, d)
        raise
    _fsync_dir(d.parent)
    return old


class Terminated(BaseException):
    """SIGTERM arrived while refimpl was writing; raised so that temporary files are removed first."""


class _SigtermState:
    active = False  #: a _sigterm_cleanup block is running
    critical = 0  #: depth of critical sections (commits): a SIGTERM there waits for their end
    got = 0  #: SIGTERMs received in the block
    raised = False


def _on_sigterm(signum: int, frame: Any) -> None:
    _SigtermState.got += 1
    if _SigtermState.critical == 0 and not _SigtermState.raised:
        _SigtermState.raised = True
        raise Terminated("SIGTERM while writing: temporary files removed")


@contextlib.contextmanager
def _sigterm_cleanup() -> Iterator[None]:
    """Within the block SIGTERM raises ``Terminated`` (once) instead of ending the process at once, so
    the writer's ``except``/``finally`` removes its temporary files; on leaving, the previous handler
    is restored and the signal is delivered again, so the process still ends as SIGTERM asked.

    Only in the main thread and only while SIGTERM has its default action (a program with its own
    handler keeps it); nested blocks share the outer one.
    """
    if (
        _SigtermState.active
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    _SigtermState.active, _SigtermState.got, _SigtermState.raised = True, 0, False
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _SigtermState.active = False
        if _SigtermState.got:
            os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def _critical() -> Iterator[None]:
    """A section that SIGTERM must not cut in two (a commit's renames): the signal is acted on at its end."""
    _SigtermState.critical += 1
    try:
        yield
    finally:
        _SigtermState.critical -= 1
    if _SigtermState.critical == 0 and _SigtermState.got and not _SigtermState.raised:
        _SigtermState.raised = True
        raise Terminated("SIGTERM while writing: temporary files removed")
