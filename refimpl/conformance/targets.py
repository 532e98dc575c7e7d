"""Targets: the implementations the harness checks.

A target is any object with a ``name`` and ``lookup(op) -> callable | None``
(the :class:`Target` protocol). The callable is called with keyword arguments
named exactly as the reference op's parameters, takes and returns NumPy arrays
(DLPack-capable arrays such as CuPy or torch tensors are accepted on return),
and returns what the reference returns (an array, or an object whose fields
have the reference's names). Optional methods:

* ``options(op) -> dict``: keyword arguments added to every case of that op, for
  both the reference and the target (e.g. ``profile="bitsandbytes-cpu"``);
* ``compute_dtype(op) -> str``: the precision the target computes in (bounds
  widen from float64's unit roundoff to that dtype's).
* ``fork_safe`` (attribute, default True): False for a target that cannot run in a
  forked worker (a CUDA context does not survive fork); it then runs in the runner's
  process, without protection against exits and hangs.
* ``provided_ops() -> list[str]``, ``notes() -> list[str]``, ``reproducer(op, case) -> str``:
  what the target provides (ops without a row are reported unchecked), lines for the report,
  and a standalone script in a peer's own API for a failing case.

Built-in names: ``numpy`` (the reference itself), ``numba`` and ``cupy`` (refimpl's
kernels; ``cupy`` raises ValueError with the reason where CuPy or a GPU is missing),
``peft``, ``bitsandbytes``, ``mergekit``, ``torchao``, ``torchtune`` (the peers, adapted), ``auto`` (the fastest
built-in kernels available, else numpy), and ``module:object`` for a user target: a
Target, a mapping of op names to callables, or a namespace with ``lora.forward``
reachable as attributes (or ``lora_forward``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Target(Protocol):
    """What the harness needs from an implementation under test."""

    name: str

    def lookup(self, op: str) -> Callable[..., Any] | None:
        """The callable implementing ``op`` (e.g. "lora.forward"), or None if absent."""
        ...


class ReferenceTarget:
    """The NumPy reference checked against itself (a sanity check of the harness)."""

    name = "numpy"

    def lookup(self, op: str) -> Callable[..., Any] | None:
        module, func = op.rsplit(".", 1)
        try:
            mod = importlib.import_module(f"refimpl.{module}")
        except ImportError:
            return None
        f = getattr(mod, func, None)
        return f if callable(f) else None


class NamespaceTarget:
    """A user target given as a mapping ``{"lora.forward": f}`` or a namespace/module."""

    def __init__(
        self,
        name: str,
        obj: Any,
        *,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        compute_dtype: str = "float64",
    ) -> None:
        self.name = name
        self._obj = obj
        self._options = dict(options or {})
        self._dtype = compute_dtype

    def lookup(self, op: str) -> Callable[..., Any] | None:
        obj = self._obj
        if isinstance(obj, Mapping):
            f = obj.get(op)
            return f if callable(f) else None
        cur = obj
        for part in op.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if callable(cur):
            return cur
        f = getattr(obj, op.replace(".", "_"), None)
        return f if callable(f) else None

    def provided_ops(self) -> list[str]:
        """Mapping keys that look like op names, or the public callables under ``<module>.`` attributes."""
        from refimpl.conformance.table import OP_MODULES

        obj = self._obj
        if isinstance(obj, Mapping):
            return sorted(k for k in obj if isinstance(k, str) and "." in k and callable(obj[k]))
        out = []
        for module in OP_MODULES:
            sub = getattr(obj, module, None)
            if sub is None:
                continue
            names = getattr(sub, "__all__", None) or [n for n in dir(sub) if not n.startswith("_")]
            out += [
                f"{module}.{n}"
                for n in names
                if callable(getattr(sub, n, None)) and not isinstance(getattr(sub, n, None), type)
            ]
        return sorted(out)

    def options(self, op: str) -> dict[str, Any]:
        import fnmatch

        out: dict[str, Any] = {}
        for pat, opts in self._options.items():
            if fnmatch.fnmatchcase(op, pat):
                out.update(opts)
        return out

    def compute_dtype(self, op: str) -> str:
        return self._dtype


class KernelTarget:
    """refimpl's own fast kernels (``refimpl.kernels``), by backend name.

    A backend whose kernels do not compute in float64 or reproduce a non-default profile says so in
    ``refimpl.kernels.<package>.numpy_adapter`` (``COMPUTE_DTYPES``: op -> dtype; ``OPTIONS``: op ->
    keyword arguments for reference and target alike); the cupy backend does (float32 kernels,
    ``profile="bitsandbytes-cuda"`` for the quant ops, eval-form LoRA/DoRA).
    """

    def __init__(self, backend: str) -> None:
        self.name = backend
        self.backend = backend
        #: a CUDA context does not survive fork, so the cupy kernels run in the runner's own process
        self.fork_safe = backend != "cupy"

    def lookup(self, op: str) -> Callable[..., Any] | None:
        kernels = importlib.import_module("refimpl.kernels")
        try:
            return kernels.get(op, backend=self.backend)
        except LookupError:  # the backend is unavailable here or does not provide the op
            return None

    def _api_table(self, name: str) -> Mapping[str, Any]:
        """``name`` (COMPUTE_DTYPES or OPTIONS) of the backend's numpy_adapter module, or {}."""
        try:
            package = importlib.import_module("refimpl.kernels").BACKENDS[self.backend]
            api = importlib.import_module(f"{package}.numpy_adapter")
        except (ImportError, AttributeError, KeyError):
            return {}
        table = getattr(api, name, None)
        return table if isinstance(table, Mapping) else {}

    def options(self, op: str) -> dict[str, Any]:
        return dict(self._api_table("OPTIONS").get(op, {}))

    def unsupported(self, op: str, case: dict[str, Any]) -> str | None:
        """The backend's declared limits (``numpy_adapter.unsupported``), if it states any."""
        try:
            package = importlib.import_module("refimpl.kernels").BACKENDS[self.backend]
            fn = getattr(importlib.import_module(f"{package}.numpy_adapter"), "unsupported", None)
        except (ImportError, AttributeError, KeyError):
            return None
        return fn(op, case) if callable(fn) else None

    def compute_dtype(self, op: str) -> str:
        return str(self._api_table("COMPUTE_DTYPES").get(op, "float64"))


#: the compute dtypes a target may declare (the error bounds widen from float64's unit roundoff to that dtype's)
COMPUTE_DTYPES = ("float64", "float32", "float16", "bfloat16")


def _takes(op: str, param: str) -> bool:
    """Whether the reference of ``op`` has a parameter named ``param``."""
    import inspect

    module, func = op.rsplit(".", 1)
    try:
        ref = getattr(importlib.import_module(f"refimpl.{module}"), func)
        return param in inspect.signature(ref).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def known_profiles() -> dict[str, list[str]]:
    """profile name -> the op families whose reference accepts it (``profile=`` of quant and merging ops)."""
    from refimpl.quant import state

    merging: tuple[str, ...] = ()
    for home in ("refimpl.merging.profiles", "refimpl.merging.operands", "refimpl.merging._common", "refimpl.merging"):
        try:  # the merging family's checks may move between these modules (issue 17)
            merging = tuple(importlib.import_module(home).PROFILES)
            break
        except (ImportError, AttributeError):
            continue
    out: dict[str, list[str]] = {}
    for family, names in (("quant", state.PROFILES), ("merging", merging)):
        for n in names:
            out.setdefault(n, []).append(family)
    return out


class DeclaredTarget:
    """A target with a compute dtype and/or a profile declared from outside (``refimpl conform --compute-dtype
    float32 --profile bitsandbytes-cpu``); everything else is the wrapped target's."""

    def __init__(self, target: Target, *, compute_dtype: str | None = None, profile: str | None = None) -> None:
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype: expected one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
        profiles = known_profiles()
        if profile is not None and profile not in profiles:
            raise ValueError(f"profile: expected one of {', '.join(profiles)}, got {profile!r}")
        self.target, self._dtype, self._profile = target, compute_dtype, profile
        self.name = target.name
        self._families = profiles.get(profile or "", [])

    def __getattr__(self, attr: str) -> Any:  # provided_ops, notes, reproducer, supports, fork_safe, ...
        return getattr(self.target, attr)

    def lookup(self, op: str) -> Callable[..., Any] | None:
        return self.target.lookup(op)

    def options(self, op: str) -> dict[str, Any]:
        fn = getattr(self.target, "options", None)
        out = dict(fn(op)) if fn else {}
        if self._profile is not None and op.split(".")[0] in self._families and _takes(op, "profile"):
            out["profile"] = self._profile
        return out

    def compute_dtype(self, op: str) -> str:
        if self._dtype is not None:
            return self._dtype
        fn = getattr(self.target, "compute_dtype", None)
        return fn(op) if fn else "float64"


def declare(target: Target, *, compute_dtype: str | None = None, profile: str | None = None) -> Target:
    """``target`` judged in ``compute_dtype`` and run under ``profile`` (for the ops that take one)."""
    if compute_dtype is None and profile is None:
        return target
    return DeclaredTarget(target, compute_dtype=compute_dtype, profile=profile)


def kernel_backends() -> list[str]:
    """Kernel backends usable here that provide at least one op, fastest first (cupy, numba)."""
    try:
        kernels = importlib.import_module("refimpl.kernels")
    except ImportError:
        return []
    try:
        usable = [b for b, why in kernels.available().items() if why is None]
        order = {"cupy": 0, "numba": 1}
        return sorted((b for b in usable if b in order and kernels.ops(b)), key=order.__getitem__)
    except Exception:
        return []


BUILTIN = ("auto", "numpy", "numba", "cupy", "peft", "bitsandbytes", "mergekit", "torchao", "torchtune")


def is_builtin(target: Target) -> bool:
    """Whether ``target`` is one of refimpl's built-in targets, by class (a user target named "peft" is not)."""
    cls = type(target)
    if cls in (ReferenceTarget, KernelTarget):
        return True
    return (cls.__module__, cls.__qualname__) in _PEERS.values()


def provided_ops(target: Target) -> list[str]:
    """The op names a target provides, where they can be listed (else [])."""
    fn = getattr(target, "provided_ops", None)
    if callable(fn):
        return sorted(fn())
    from refimpl.conformance.table import OP_MODULES, not_ops, public_functions

    if isinstance(target, ReferenceTarget):
        skip = not_ops()
        return sorted(op for module in OP_MODULES for op in public_functions(module) if op not in skip)
    if isinstance(target, KernelTarget):
        try:
            return sorted(importlib.import_module("refimpl.kernels").ops(target.backend))
        except Exception:
            return []
    if isinstance(target, NamespaceTarget):
        return target.provided_ops()
    ops = getattr(target, "_ops", None)
    return sorted(ops) if isinstance(ops, Mapping) else []


_EXTRA = {
    "numba": "fast",
    "cupy": "gpu",
    "peft": "peers",
    "bitsandbytes": "peers",
    "mergekit": "peers",
    "torchao": "torchpeers",
    "torchtune": "torchpeers",
}


_PEERS = {
    "peft": ("refimpl.conformance.peers.peft", "PeftTarget"),
    "bitsandbytes": ("refimpl.conformance.peers.bnb", "BitsandbytesTarget"),
    "mergekit": ("refimpl.conformance.peers.mergekit", "MergekitTarget"),
    "torchao": ("refimpl.conformance.peers.torchao", "TorchaoTarget"),
    "torchtune": ("refimpl.conformance.peers.torchtune", "TorchtuneTarget"),
}


def extra_of(name: str) -> str | None:
    """The pip extra that installs built-in target ``name`` (``"torchpeers"`` for torchao), or None."""
    return _EXTRA.get(name)


def builtin_help() -> str:
    """The built-in target names, from the registry, for a ``--target`` help text."""
    peers: dict[str, list[str]] = {}
    for name in _PEERS:
        peers.setdefault(_EXTRA[name], []).append(name)
    return (
        "numpy (the reference itself), "
        + ", ".join(b for b in BUILTIN if b in _EXTRA and b not in _PEERS)
        + " (refimpl's kernels), "
        + "; ".join(f"{', '.join(names)} (refimpl[{extra}])" for extra, names in peers.items())
        + ", auto (the fastest built-in kernels, else numpy)"
    )


def auto_reason() -> str:
    """Which target ``auto`` resolves to here, and why."""
    kernels = importlib.import_module("refimpl.kernels")
    why = kernels.available()
    chosen = kernel_backends()
    skipped = [f"{b}: {why[b]}" for b in ("cupy", "numba") if why.get(b) is not None]
    if chosen:
        return f"auto chose {chosen[0]}, the fastest kernels usable here" + (
            f" ({'; '.join(skipped)})" if skipped else ""
        )
    return (
        "auto fell back to numpy, the reference checked against itself (a sanity check of the harness, not "
        f"of a kernel): {'; '.join(skipped)}; pip install 'refimpl[fast]' for the numba kernels"
    )


def target_source(spec: str | Target, target: Target) -> str | None:
    """A name that ``get_target`` resolves to ``target`` again (what a reproduce snippet calls), or None where
    the target was given as an object that has no importable name."""
    if isinstance(spec, str):
        return target.name if spec == "auto" else spec
    if isinstance(target, NamespaceTarget):
        return target.name if ":" in target.name else None
    if isinstance(target, DeclaredTarget):
        return target_source(target.target, target.target)
    if is_builtin(target):
        return target.name
    cls = type(target)
    module, qualname = cls.__module__, cls.__qualname__
    if module in ("__main__", "builtins") or "<locals>" in qualname:
        return None
    return f"{module}:{qualname}"


def get_target(spec: str | Target) -> Target:
    """Resolve a target name (see the module docstring) or pass a Target through."""
    if not isinstance(spec, str):
        if isinstance(spec, Target):
            return spec
        raise TypeError(f"target: expected a name or an object with name and lookup(op), got {type(spec).__name__}")
    if spec == "auto":
        backends = kernel_backends()
        return KernelTarget(backends[0]) if backends else ReferenceTarget()
    if spec == "numpy":
        return ReferenceTarget()
    if spec in ("numba", "cupy"):
        # not usable here: say so and how to fix it (exit 2 from the CLI) rather than report nothing checked
        why = importlib.import_module("refimpl.kernels").available()[spec]
        if why is not None:
            raise ValueError(
                f"target: {spec} is unavailable here: {why}; install it with pip install 'refimpl[{_EXTRA[spec]}]'"
            )
        return KernelTarget(spec)
    if spec in _PEERS:
        module, cls = _PEERS[spec]
        try:
            return getattr(importlib.import_module(module), cls)()
        except ImportError as exc:
            raise ValueError(
                f"target: {spec} is unavailable here ({type(exc).__name__}: {exc}); install the "
                f"peers with pip install 'refimpl[{_EXTRA[spec]}]'"
            ) from exc
    if ":" in spec:
        modname, _, attr = spec.partition(":")
        try:
            mod = importlib.import_module(modname)
        except ImportError as exc:
            raise ValueError(f"target: cannot import module {modname!r} of {spec!r} ({exc})") from exc
        except Exception as exc:  # the user's module failed while importing: their error, named, not a traceback
            raise ValueError(
                f"target: importing module {modname!r} of {spec!r} raised {type(exc).__name__}: {exc}"
            ) from exc
        obj: Any = mod
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"target: module {modname!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if isinstance(obj, type):
            try:
                obj = obj()
            except Exception as exc:
                raise ValueError(f"target: constructing {spec!r} raised {type(exc).__name__}: {exc}") from exc
        if isinstance(obj, Target):
            return obj
        return NamespaceTarget(spec, obj)
    raise ValueError(f"target: expected one of {', '.join(BUILTIN)} or 'module:object', got {spec!r}")
