"""Op rows for refimpl.lora (spec/lora.md; LoRA arXiv 2106.09685, rsLoRA arXiv 2312.03732).

Each row lists the equivalence classes of its input domain (``classes``) and deterministic boundary cases
that hit every class in every run (``boundary``). A boundary case's classes are computed from the case
itself (``_linear_classes`` and friends), so a label can never claim a class the case does not reach.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from refimpl import bounds, precision
from refimpl.conformance.table import TIERS, Boundary, Case, OpSpec, Special, abs_case
from refimpl.conformance.tolerance import Bounded, Exact, StoredBounded

_SCALINGS_EXACT = (0.25, 0.5, 1.0, 2.0)  # powers of two keep golden products exact
_P_EXACT = (0.0, 0.5, 0.75)  # 1/(1-p) is a power of two
#: input dtypes the reference accepts (it computes in float64 whatever it is given)
_DTYPES = ("float64", "float32", "float16", "bfloat16")
#: storage formats of merge / unmerge's ``dtype=`` option (refimpl.precision.DTYPES)
_MERGE_DTYPES = (None, "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")

#: Public functions of refimpl.lora that are not array ops (none: every one has a row).
NOT_OPS: dict[str, str] = {}


def _ref(name: str):
    import refimpl.lora as lora

    return getattr(lora, name)


def _flat(result: Any) -> dict[str, np.ndarray]:
    from refimpl.conformance._values import flatten

    return flatten(result)


def _cast(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` stored in ``dtype`` (one rounding); the reference reads it back exactly."""
    from refimpl.precision import DTYPES

    return a if dtype == "float64" else a.astype(DTYPES[dtype])


def _dtype_name(a: Any) -> str:
    return str(np.asarray(a).dtype)


class SeededRng(np.random.Generator):
    """A PCG64 Generator that prints as ``np.random.default_rng(seed)``, so a failing case's snippet
    rebuilds the same draws (randomness is an input of init and dropout_mask)."""

    def __init__(self, seed: int) -> None:
        super().__init__(np.random.PCG64(seed))
        self.seed = seed

    def __repr__(self) -> str:
        return f"np.random.default_rng({self.seed})"


@dataclass(frozen=True)
class _RowWithoutVectors(OpSpec):
    """A row whose cases cannot be stored as golden vectors (a Generator or adapter objects among the inputs,
    text among the outputs): it has no golden tier, and its canonical example is its first boundary case."""

    def example(self) -> Case:
        assert self.boundary is not None, f"{self.name}: a row without golden vectors needs boundary cases"
        return dict(self.boundary()[0].case)


_NO_GOLDEN = tuple(t for t in TIERS if t != "golden")


# ---------------------------------------------------------------------------- strategies


def rank_strategy(n_in: int, n_out: int):
    """Ranks 1 ≤ r ≤ min(in, out) + 4: r = 1, r = min(in, out) and r above it, which loralib and PEFT accept (a
    kernel that sizes a buffer by min(in, out), or assumes B A has full rank r, fails there)."""
    from hypothesis import strategies as st

    return st.integers(1, min(n_in, n_out) + 4)


def _linear_strategy(*, grad: bool = False, with_x: bool = True, merged: bool = False, options: bool = False):
    """Linear-layer cases; every option value is drawn (fan_in_fan_out, bias, mask, p, the input dtype, the
    backward flags and, with ``options``, merge's storage dtype and safe flag)."""
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        n_in, n_out = draw(rs.dims(1, 6)), draw(rs.dims(1, 6))
        r = draw(rank_strategy(n_in, n_out))
        fifo = draw(st.booleans())
        dt = draw(st.sampled_from(_DTYPES))
        case: Case = {}
        if with_x:
            lead = tuple(draw(st.lists(rs.dims(1, 3), min_size=0, max_size=2)))
            case["x"] = _cast(draw(rs.float_arrays((*lead, n_in))), dt)
        wshape = (n_in, n_out) if fifo else (n_out, n_in)
        case["W_merged" if merged else "W"] = _cast(draw(rs.float_arrays(wshape)), dt)
        case["A"] = _cast(draw(rs.float_arrays((r, n_in))), dt)
        case["B"] = _cast(draw(rs.float_arrays((n_out, r))), dt)
        if grad:
            case["grad_y"] = _cast(draw(rs.float_arrays((*case["x"].shape[:-1], n_out))), dt)
        case["scaling"] = draw(st.one_of(rs.reals(-4.0, 4.0), st.sampled_from([0.0, -2.0, 64.0, 128.0])))
        if with_x:
            if not grad and draw(st.booleans()):
                case["bias"] = _cast(draw(rs.float_arrays((n_out,))), dt)
            if draw(st.booleans()):
                case["dropout_mask"] = draw(rs.keep_masks(case["x"].shape))
                case["dropout_p"] = draw(st.sampled_from([0.0, 0.1, 0.5, 0.75]))
        case["fan_in_fan_out"] = fifo
        if grad:
            case["need_dW"] = draw(st.booleans())
            case["need_dbias"] = draw(st.booleans())
        if options:
            case["dtype"] = draw(st.sampled_from(_MERGE_DTYPES))
            if not merged:
                case["safe"] = draw(st.booleans())
        return case

    return build()


def _scaling_strategy():
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    return st.fixed_dictionaries(
        {
            "alpha": st.one_of(rs.reals(-64.0, 64.0), st.sampled_from([0.0, -16.0, 512.0])),
            "r": st.one_of(st.integers(1, 256), st.sampled_from([1, 4, 16, 64])),
            "use_rslora": st.booleans(),
        }
    )


def _embedding_strategy():
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        vocab, dim = draw(rs.dims(1, 8)), draw(rs.dims(1, 6))
        r = draw(rank_strategy(vocab, dim))
        dt = draw(st.sampled_from(_DTYPES))
        ids_shape = tuple(draw(st.lists(rs.dims(1, 4), min_size=0, max_size=2)))
        ids = np.asarray(
            draw(
                st.lists(st.integers(0, vocab - 1), min_size=int(np.prod(ids_shape)), max_size=int(np.prod(ids_shape)))
            ),
            dtype=np.int64,
        ).reshape(ids_shape)
        ids = ids.astype(draw(st.sampled_from([np.int64, np.int32, np.uint16])))
        return {
            "ids": ids,
            "E": _cast(draw(rs.float_arrays((vocab, dim))), dt),
            "A": _cast(draw(rs.float_arrays((r, vocab))), dt),
            "B": _cast(draw(rs.float_arrays((dim, r))), dt),
            "scaling": draw(st.one_of(rs.reals(-4.0, 4.0), st.sampled_from([0.0, -2.0, 64.0]))),
        }

    return build()


def _param_count_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        n_in, n_out = draw(st.integers(1, 8192)), draw(st.integers(1, 8192))
        return {
            "in_features": n_in,
            "out_features": n_out,
            "r": draw(st.integers(1, 512)),
            "lora_bias": draw(st.booleans()),
            "dora": draw(st.booleans()),
        }

    return build()


def _init_strategy():
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        method = draw(st.sampled_from(("default", "gaussian", "pissa", "olora")))
        emb = method in ("default", "gaussian") and draw(st.booleans())
        fifo = not emb and draw(st.booleans())
        n_in, n_out = draw(rs.dims(1, 6)), draw(rs.dims(1, 6))
        dt = draw(st.sampled_from(_DTYPES))
        w = _cast(draw(rs.float_arrays((n_in, n_out) if fifo else (n_out, n_in))), dt)
        # PiSSA takes √(S/s): the reference needs α > 0 there (a negative α gives NaN factors)
        alpha = draw(rs.reals(0.25, 64.0) if method == "pissa" else rs.reals(-64.0, 64.0))
        return {
            "W": w,
            "r": draw(rank_strategy(n_in, n_out)),
            "alpha": alpha,
            "method": method,
            "rng": SeededRng(draw(st.integers(0, 2**32 - 1))),
            "use_rslora": draw(st.booleans()),
            "fan_in_fan_out": fifo,
            "embedding": emb,
        }

    return build()


def _dropout_mask_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
        p = draw(st.one_of(st.sampled_from([0.0, 0.5, 0.99]), st.floats(0.0, 0.999, allow_subnormal=False)))
        return {"rng": SeededRng(draw(st.integers(0, 2**32 - 1))), "shape": shape, "p": p}

    return build()


_LAYER_NAMES = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.0.mlp.down_proj",
    "lm_head",
    "q_proj",
    "model.layers.1.xq_proj",
)
_TARGET_KEYS = ("q_proj", "v_proj", "self_attn.k_proj", "up_proj", "lm_head", "proj", "layers.0.mlp.down_proj")


def _model_count_strategy():
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> Case:
        names = draw(st.lists(st.sampled_from(_LAYER_NAMES), min_size=1, max_size=6, unique=True))
        layers = {n: (draw(st.integers(1, 4096)), draw(st.integers(1, 4096))) for n in names}
        targets: Any = draw(
            st.one_of(
                st.just("all-linear"), st.lists(st.sampled_from(_TARGET_KEYS), min_size=1, max_size=4, unique=True)
            )
        )
        hit = [n for n in names if targets == "all-linear" or any(n == k or n.endswith("." + k) for k in targets)]
        if not hit:  # the reference rejects a target list that matches nothing: add an exact name
            targets = [*targets, names[0]]
            hit = [names[0]]
        r = draw(st.integers(1, 2 * min(min(layers[n]) for n in hit) + 2))
        return {
            "layers": layers,
            "r": r,
            "target_modules": targets,
            "lora_bias": draw(st.booleans()),
            "dora": draw(st.booleans()),
        }

    return build()


# ---------------------------------------------------------------------------- golden cases (exact inputs)


def _golden_linear(
    rng: np.random.Generator, *, grad: bool = False, with_x: bool = True, merged: bool = False
) -> list[tuple[str, Case]]:
    from refimpl.conformance.strategies import dyadic

    cases = []
    shapes = [
        ((2, 4), 6, 5, 2, False, False),
        ((3,), 8, 8, 4, True, False),
        ((2, 3, 8), 8, 16, 8, False, True),
        ((5,), 32, 24, 16, True, True),
    ]
    for i, (lead, n_in, n_out, r, fifo, drop) in enumerate(shapes):
        c: Case = {}
        if with_x:
            c["x"] = dyadic(rng, (*lead, n_in))
        c["W_merged" if merged else "W"] = dyadic(rng, (n_in, n_out) if fifo else (n_out, n_in))
        c["A"], c["B"] = dyadic(rng, (r, n_in)), dyadic(rng, (n_out, r))
        if grad:
            c["grad_y"] = dyadic(rng, (*lead, n_out))
        c["scaling"] = _SCALINGS_EXACT[i % len(_SCALINGS_EXACT)]
        if with_x and not grad and i % 2 == 0:
            c["bias"] = dyadic(rng, (n_out,))
        if with_x and drop:
            c["dropout_mask"] = (rng.random(c["x"].shape) >= 0.5).astype(np.float64)
            c["dropout_p"] = _P_EXACT[1 + i % 2]
        c["fan_in_fan_out"] = fifo
        if grad:
            c["need_dW"] = True
            c["need_dbias"] = True
        cases.append((f"case{i}_in{n_in}_out{n_out}_r{r}" + ("_fifo" if fifo else "") + ("_drop" if drop else ""), c))
    return cases


def _golden_embedding(rng: np.random.Generator) -> list[tuple[str, Case]]:
    from refimpl.conformance.strategies import dyadic

    out = []
    for i, (vocab, dim, r, ids_shape) in enumerate([(10, 6, 2, (4,)), (32, 16, 8, (2, 5))]):
        out.append(
            (
                f"case{i}_V{vocab}_d{dim}_r{r}",
                {
                    "ids": rng.integers(0, vocab, size=ids_shape).astype(np.int64),
                    "E": dyadic(rng, (vocab, dim)),
                    "A": dyadic(rng, (r, vocab)),
                    "B": dyadic(rng, (dim, r)),
                    "scaling": _SCALINGS_EXACT[i],
                },
            )
        )
    return out


# ---------------------------------------------------------------------------- bounds


def _reduction(case: Mapping[str, Any]) -> tuple[int, int, int, int]:
    a = case["A"]
    r, n_in = a.shape
    n_out = case["B"].shape[0]
    n_rows = int(np.prod(case["x"].shape[:-1])) if "x" in case else 1
    return n_in, n_out, r, n_rows


def _f64(case: Mapping[str, Any]) -> Case:
    """The case with every floating array (bfloat16 included, which NumPy does not call floating) in float64."""
    from refimpl.precision import DTYPES

    low = {DTYPES[d] for d in _DTYPES}
    return {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype in low else v) for k, v in case.items()}


def _magnitude_of(name: str, **renames: str):
    def mag(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
        c = abs_case(_f64(case))
        for old, new in renames.items():
            c[new] = c.pop(old)
        return _flat(_ref(name)(**c))

    return mag


def _specials(name: str, array_args: tuple[str, ...], example) -> list[Special]:
    """NaN and ±inf in each float argument, -0.0 in one; zero factors."""
    base = example()
    out: list[Special] = []
    for arg in array_args:
        if arg not in base:
            continue
        for label, val in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
            c = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in base.items()}
            if isinstance(c[arg], np.ndarray):
                c[arg].flat[0] = val
            else:
                c[arg] = val
            out.append(Special(f"{arg} has {label}", c))
    if "B" in base:
        c = dict(base)
        c["B"] = np.zeros_like(base["B"])
        out.append(Special("B is zero (adapter at init)", c))
    if "A" in base:
        c = dict(base)
        c["A"] = np.full_like(base["A"], -0.0)
        out.append(Special("A is all -0.0", c))
    return out


# ---------------------------------------------------------------------------- equivalence classes

_X_CLASSES = (
    "shape: x 1-D (one row)",
    "shape: x 2-D",
    "shape: x 3-D (batch and sequence axes)",
    "shape: one row",
    "shape: more than 16 rows (a large-batch kernel path)",
)
_W_CLASSES = (
    "shape: in % 8 != 0 (a remainder after vector width 8)",
    "shape: in > 16 and in % 16 != 0 (a remainder after vector width 16)",
    "shape: out % 8 != 0 (a remainder after vector width 8)",
    "shape: out > 16 and out % 16 != 0 (a remainder after vector width 16)",
    "shape: in == out (a transposition keeps the shape)",
    "shape: in != out",
    "shape: r = 1",
    "shape: r = min(in, out)",
    "shape: r > min(in, out) (more rank than B A can use; loralib and PEFT accept it)",
)
_FIFO_CLASSES = ("option: fan_in_fan_out=False", "option: fan_in_fan_out=True")
_BIAS_CLASSES = ("option: bias given", "option: no bias")
_DROP_CLASSES = (
    "option: dropout_mask given (train form)",
    "option: no dropout_mask (eval form)",
    "value: dropout_p = 0 with a mask",
    "value: dropout_p > 0 (keep factor 1/(1 − p) ≠ 1)",
)
_S_CLASSES = (
    "value: scaling 0",
    "value: scaling negative",
    "value: scaling positive, not 1",
    "value: |scaling| ≥ 64 (large)",
)
_DTYPE_CLASSES = tuple(f"dtype: {d} inputs" for d in _DTYPES)
_GRAD_CLASSES = ("option: need_dW=True", "option: need_dW=False", "option: need_dbias=True", "option: need_dbias=False")
_MERGE_CLASSES = tuple(f"option: dtype={d}" for d in _MERGE_DTYPES)
_SAFE_CLASSES = ("option: safe=True with a storage dtype", "option: safe=False with a storage dtype")


def _linear_classes(c: Case) -> tuple[str, ...]:
    """The classes a linear-layer case (forward, backward, delta, merge, unmerge) belongs to."""
    out: list[str] = []
    a = c["A"]
    r, n_in = a.shape
    n_out = c["B"].shape[0]
    if "x" in c:
        x = c["x"]
        rows = int(np.prod(x.shape[:-1]))
        out.append({1: _X_CLASSES[0], 2: _X_CLASSES[1]}.get(x.ndim, _X_CLASSES[2]))
        if rows == 1:
            out.append(_X_CLASSES[3])
        if rows > 16:
            out.append(_X_CLASSES[4])
    if n_in % 8:
        out.append(_W_CLASSES[0])
    if n_in > 16 and n_in % 16:
        out.append(_W_CLASSES[1])
    if n_out % 8:
        out.append(_W_CLASSES[2])
    if n_out > 16 and n_out % 16:
        out.append(_W_CLASSES[3])
    out.append(_W_CLASSES[4] if n_in == n_out else _W_CLASSES[5])
    if r == 1:
        out.append(_W_CLASSES[6])
    if r == min(n_in, n_out):
        out.append(_W_CLASSES[7])
    if r > min(n_in, n_out):
        out.append(_W_CLASSES[8])
    out.append(_FIFO_CLASSES[int(bool(c.get("fan_in_fan_out")))])
    if "x" in c and "grad_y" not in c:
        out.append(_BIAS_CLASSES[0] if c.get("bias") is not None else _BIAS_CLASSES[1])
    if "x" in c:
        if c.get("dropout_mask") is None:
            out.append(_DROP_CLASSES[1])
        else:
            out += [_DROP_CLASSES[0], _DROP_CLASSES[2] if c.get("dropout_p", 0.0) == 0 else _DROP_CLASSES[3]]
    s = c["scaling"]
    if s == 0:
        out.append(_S_CLASSES[0])
    elif s < 0:
        out.append(_S_CLASSES[1])
    elif s != 1:
        out.append(_S_CLASSES[2])
    if abs(s) >= 64:
        out.append(_S_CLASSES[3])
    out.append(f"dtype: {_dtype_name(a)} inputs")
    if "need_dW" in c:
        out += [f"option: need_dW={c['need_dW']}", f"option: need_dbias={c['need_dbias']}"]
    if "dtype" in c:
        out.append(f"option: dtype={c['dtype']}")
        if "safe" in c and c["dtype"] is not None:
            out.append(_SAFE_CLASSES[0] if c["safe"] else _SAFE_CLASSES[1])
    return tuple(out)


@dataclass(frozen=True)
class _Lin:
    """One linear-layer configuration: leading axes of x, widths, rank and options."""

    lead: tuple[int, ...]
    n_in: int
    n_out: int
    r: int
    fifo: bool = False
    bias: bool = False
    p: float | None = None  # None: no dropout mask (eval form)
    s: float = 0.75
    dtype: str = "float64"


#: Shapes that leave remainders after vector widths 8 and 16, 1/2/3-D x, one row and more than 16 rows,
#: r = 1, r = min(in, out) and r above it, square and non-square W, every option value, every input dtype.
_LINEAR_CONFIGS = (
    _Lin((), 6, 5, 1, bias=True),
    _Lin((1,), 19, 21, 19, fifo=True, p=0.0, s=-1.5),
    _Lin((2, 3), 40, 33, 4, bias=True, p=0.25, s=2.0),
    _Lin((33,), 24, 17, 3, fifo=True, bias=True, p=0.5, s=0.5),
    _Lin((17,), 8, 16, 8, s=128.0),
    _Lin((3,), 5, 7, 2, bias=True, s=0.0),
    _Lin((2, 5), 18, 9, 2, p=0.1, dtype="float32"),
    _Lin((20,), 9, 18, 9, fifo=True, bias=True, dtype="float16", s=-0.625),
    _Lin((4,), 12, 12, 5, fifo=True, p=0.75, dtype="bfloat16"),
    _Lin((3, 7), 17, 35, 6, bias=True, p=0.5, s=-80.0),
    _Lin((2, 2, 5), 12, 12, 12, s=1.25),
    _Lin((2, 3), 3, 5, 7, bias=True, p=0.5, s=0.5),
    _Lin((4,), 6, 2, 9, fifo=True, s=-1.25, dtype="float32"),
)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return rng.standard_normal(shape) * scale


def _mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A 0/1 keep mask with at least one kept and (where possible) one dropped element."""
    m = (rng.random(shape) >= 0.5).astype(np.float64)
    flat = m.reshape(-1)
    flat[0] = 1.0
    if flat.size > 1:
        flat[-1] = 0.0
    return m


def _lin_case(i: int, cfg: _Lin, *, grad: bool = False, with_x: bool = True, merged: bool = False) -> Case:
    rng = np.random.default_rng(1000 + i)
    dt = cfg.dtype
    c: Case = {}
    if with_x:
        c["x"] = _cast(_normal(rng, (*cfg.lead, cfg.n_in)), dt)
    c["W_merged" if merged else "W"] = _cast(
        _normal(rng, (cfg.n_in, cfg.n_out) if cfg.fifo else (cfg.n_out, cfg.n_in)), dt
    )
    c["A"] = _cast(_normal(rng, (cfg.r, cfg.n_in), 0.5), dt)
    c["B"] = _cast(_normal(rng, (cfg.n_out, cfg.r), 0.5), dt)
    if grad:
        c["grad_y"] = _cast(_normal(rng, (*cfg.lead, cfg.n_out)), dt)
    c["scaling"] = cfg.s
    if with_x and not grad and cfg.bias:
        c["bias"] = _cast(_normal(rng, (cfg.n_out,)), dt)
    if with_x and cfg.p is not None:
        c["dropout_mask"] = _mask(rng, c["x"].shape)
        c["dropout_p"] = cfg.p
    c["fan_in_fan_out"] = cfg.fifo
    return c


def _label(i: int, cfg: _Lin) -> str:
    """A readable label; an unbatched (1-D) x says so, a peer may shape that case differently."""
    x = "x" + "x".join(map(str, (*cfg.lead, cfg.n_in))) + ("_unbatched" if not cfg.lead else "")
    drop = "" if cfg.p is None else f"_p{cfg.p:g}"
    return (
        f"b{i}_{x}_out{cfg.n_out}_r{cfg.r}_s{cfg.s:g}"
        + ("_fifo" if cfg.fifo else "")
        + ("_bias" if cfg.bias else "")
        + drop
        + (f"_{cfg.dtype}" if cfg.dtype != "float64" else "")
    )


def _bounds_of(cases: list[tuple[str, Case]], classify: Callable[[Case], tuple[str, ...]]) -> list[Boundary]:
    return [Boundary(label, case, classify(case)) for label, case in cases]


def _linear_boundary(kind: str) -> Callable[[], list[Boundary]]:
    """Boundary cases of a linear-layer op: ``kind`` is delta, forward, backward, merge or unmerge."""

    def build() -> list[Boundary]:
        cases: list[tuple[str, Case]] = []
        for i, cfg in enumerate(_LINEAR_CONFIGS):
            if kind == "forward":
                c = _lin_case(i, cfg)
            elif kind == "backward":
                c = _lin_case(i, cfg, grad=True)
                c["need_dW"], c["need_dbias"] = i % 2 == 0, i % 3 != 1
            else:
                c = _lin_case(i, cfg, with_x=False, merged=kind == "unmerge")
                if kind == "delta":
                    c = {k: c[k] for k in ("A", "B", "scaling", "fan_in_fan_out")}
                elif kind in ("merge", "unmerge"):
                    c["dtype"] = None
            cases.append((_label(i, cfg), c))
        if kind in ("merge", "unmerge"):
            # every storage dtype (and both merge paths) on a 24 x 40 layer: enough elements that one and two
            # roundings differ somewhere
            base = _lin_case(99, _Lin((1,), 40, 24, 4, s=0.625), with_x=False, merged=kind == "unmerge")
            for dt in _MERGE_DTYPES[1:]:
                for safe in (False, True) if kind == "merge" else (None,):
                    c = {**base, "dtype": dt}
                    if safe is not None:
                        c["safe"] = safe
                    cases.append((f"dtype_{dt}" + ("" if safe is None else f"_safe{int(safe)}"), c))
        return _bounds_of(cases, _linear_classes)

    return build


def _linear_op_classes(kind: str) -> tuple[str, ...]:
    w = (*_W_CLASSES, *_FIFO_CLASSES, *_S_CLASSES, *_DTYPE_CLASSES)
    if kind == "delta":
        return w
    if kind in ("merge", "unmerge"):
        return (*w, *_MERGE_CLASSES, *(_SAFE_CLASSES if kind == "merge" else ()))
    xs = (*_X_CLASSES, *w, *_DROP_CLASSES)
    return (*xs, *_BIAS_CLASSES) if kind == "forward" else (*xs, *_GRAD_CLASSES)


# ---------------------------------------------------------------------------- scaling, embedding, counts

_SCALING_CLASSES = (
    "value: r = 1",
    "value: r a perfect square > 1 (√r exact)",
    "value: r not a perfect square",
    "value: r > 64",
    "option: use_rslora=False",
    "option: use_rslora=True",
    "value: alpha 0",
    "value: alpha negative",
    "value: alpha not a multiple of r",
)


def _scaling_classes(c: Case) -> tuple[str, ...]:
    a, r = c["alpha"], c["r"]
    out = [f"option: use_rslora={c['use_rslora']}"]
    if r == 1:
        out.append(_SCALING_CLASSES[0])
    elif math.isqrt(r) ** 2 == r:
        out.append(_SCALING_CLASSES[1])
    else:
        out.append(_SCALING_CLASSES[2])
    if r > 64:
        out.append(_SCALING_CLASSES[3])
    if a == 0:
        out.append(_SCALING_CLASSES[6])
    if a < 0:
        out.append(_SCALING_CLASSES[7])
    if a % r:
        out.append(_SCALING_CLASSES[8])
    return tuple(out)


def _scaling_boundary() -> list[Boundary]:
    cases = [(16.0, 1), (16.0, 4), (24.0, 16), (-16.0, 8), (0.0, 3), (7.0, 3), (64.0, 128), (1.0, 255)]
    return _bounds_of(
        [
            (f"alpha{a:g}_r{r}_rs{int(rs)}", {"alpha": a, "r": r, "use_rslora": rs})
            for a, r in cases
            for rs in (False, True)
        ],
        _scaling_classes,
    )


#: the classes of an embedding case's shapes, scaling and table dtype (shared with DoRA's embedding row)
EMB_SHAPE_CLASSES = (
    "shape: ids 0-D (one token)",
    "shape: ids 1-D",
    "shape: ids 2-D",
    "shape: more than 16 ids",
    "value: repeated ids",
    "shape: V > d",
    "shape: V < d",
    "shape: V == d",
    "shape: d > 16 and d % 16 != 0 (a remainder after vector width 16)",
    "shape: r = 1",
    "shape: r = min(V, d)",
    "shape: r > min(V, d)",
    *_S_CLASSES,
    *_DTYPE_CLASSES,
)
_EMB_CLASSES = (
    *EMB_SHAPE_CLASSES,
    "value: ids 0 and V − 1 (the table's ends)",
    "dtype: int64 ids",
    "dtype: int32 ids",
    "dtype: unsigned ids",
)


def embedding_shape_classes(c: Case) -> list[str]:
    """The classes of ``EMB_SHAPE_CLASSES`` that an embedding case (ids, E, A, scaling) hits."""
    ids, E = np.asarray(c["ids"]), c["E"]
    vocab, dim = E.shape
    r = c["A"].shape[0]
    out = [{0: "shape: ids 0-D (one token)", 1: "shape: ids 1-D"}.get(ids.ndim, "shape: ids 2-D")]
    if ids.size > 16:
        out.append("shape: more than 16 ids")
    if np.unique(ids).size < ids.size:
        out.append("value: repeated ids")
    out.append("shape: V > d" if vocab > dim else "shape: V < d" if vocab < dim else "shape: V == d")
    if dim > 16 and dim % 16:
        out.append("shape: d > 16 and d % 16 != 0 (a remainder after vector width 16)")
    if r == 1:
        out.append("shape: r = 1")
    if r == min(vocab, dim):
        out.append("shape: r = min(V, d)")
    if r > min(vocab, dim):
        out.append("shape: r > min(V, d)")
    s = c["scaling"]
    out += [cls for cls, hit in zip(_S_CLASSES, (s == 0, s < 0, s > 0 and s != 1, abs(s) >= 64), strict=True) if hit]
    out.append(f"dtype: {_dtype_name(E)} inputs")
    return out


def _embedding_classes(c: Case) -> tuple[str, ...]:
    ids, vocab = np.asarray(c["ids"]), c["E"].shape[0]
    out = embedding_shape_classes(c)
    if 0 in ids and vocab - 1 in ids:
        out.append("value: ids 0 and V − 1 (the table's ends)")
    out.append(
        {
            "i": "dtype: int64 ids"
            if ids.dtype == np.int64
            else "dtype: int32 ids"
            if ids.dtype == np.int32
            else "dtype: other signed ids",
            "u": "dtype: unsigned ids",
        }[ids.dtype.kind]
    )
    return tuple(out)


def _embedding_boundary() -> list[Boundary]:
    configs = [  # (ids shape, V, d, r, scaling, dtype, ids dtype)
        ((), 7, 5, 1, 0.75, "float64", np.int64),
        ((9,), 40, 19, 19, -1.5, "float64", np.int32),
        ((3, 7), 33, 48, 4, 2.0, "float32", np.uint16),
        ((20,), 6, 35, 6, 0.0, "float16", np.int64),
        ((2, 2), 12, 12, 3, 96.0, "bfloat16", np.uint8),
        ((5,), 6, 4, 9, 0.5, "float64", np.int64),
    ]
    out = []
    for i, (shape, vocab, dim, r, s, dt, idt) in enumerate(configs):
        rng = np.random.default_rng(2000 + i)
        ids = rng.integers(0, vocab, size=shape)
        if ids.ndim:
            flat = ids.reshape(-1)
            flat[0], flat[-1] = 0, vocab - 1
            if flat.size > 2:
                flat[1] = flat[-1]  # a repeated id
        c = {
            "ids": ids.astype(idt),
            "E": _cast(_normal(rng, (vocab, dim)), dt),
            "A": _cast(_normal(rng, (r, vocab), 0.5), dt),
            "B": _cast(_normal(rng, (dim, r), 0.5), dt),
            "scaling": s,
        }
        out.append((f"b{i}_ids{'x'.join(map(str, shape)) or '0d'}_V{vocab}_d{dim}_r{r}_s{s:g}_{dt}", c))
    return _bounds_of(out, _embedding_classes)


_COUNT_CLASSES = (
    "option: lora_bias=False",
    "option: lora_bias=True",
    "option: dora=False",
    "option: dora=True",
    "shape: r = 1",
    "shape: r = min(in, out)",
    "shape: in != out",
    "shape: in == out",
    "shape: r > min(in, out)",
)


def _count_classes(c: Case) -> tuple[str, ...]:
    i, o, r = c["in_features"], c["out_features"], c["r"]
    out = [
        f"option: lora_bias={c['lora_bias']}",
        f"option: dora={c['dora']}",
        "shape: in != out" if i != o else "shape: in == out",
    ]
    if r == 1:
        out.append("shape: r = 1")
    if r == min(i, o):
        out.append("shape: r = min(in, out)")
    if r > min(i, o):
        out.append("shape: r > min(in, out)")
    return tuple(out)


def _count_boundary() -> list[Boundary]:
    cases = [
        (4096, 4096, 8, False, False),
        (10, 6, 6, True, True),
        (1, 7, 1, True, False),
        (768, 3072, 1, False, True),
        (5, 5, 5, False, True),
        (4, 3, 8, True, False),
    ]
    return _bounds_of(
        [
            (
                f"in{i}_out{o}_r{r}_bias{int(b)}_dora{int(d)}",
                {"in_features": i, "out_features": o, "r": r, "lora_bias": b, "dora": d},
            )
            for i, o, r, b, d in cases
        ],
        _count_classes,
    )


_MODEL_CLASSES = (
    "option: target_modules='all-linear'",
    "option: target_modules a list",
    "value: a key matching a dotted suffix",
    "value: a key equal to a whole name",
    "value: a key inside a name but not after a dot (no match)",
    "value: a multi-part key",
    *_COUNT_CLASSES[:4],
    "shape: r = min(in, out) of a matched layer",
    "shape: r > min(in, out) of a matched layer",
)


def _model_classes(c: Case) -> tuple[str, ...]:
    t = c["target_modules"]
    out = [f"option: lora_bias={c['lora_bias']}", f"option: dora={c['dora']}"]
    if t == "all-linear":
        out.append(_MODEL_CLASSES[0])
        hit = list(c["layers"])
    else:
        out.append(_MODEL_CLASSES[1])
        names = list(c["layers"])
        if any(n.endswith("." + k) for n in names for k in t):
            out.append(_MODEL_CLASSES[2])
        if any(n == k for n in names for k in t):
            out.append(_MODEL_CLASSES[3])
        if any(k in n and not (n == k or n.endswith("." + k)) for n in names for k in t):
            out.append(_MODEL_CLASSES[4])
        if any("." in k for k in t):
            out.append(_MODEL_CLASSES[5])
        hit = [n for n in names if any(n == k or n.endswith("." + k) for k in t)]
    if any(c["r"] == min(c["layers"][n]) for n in hit):
        out.append(_MODEL_CLASSES[-2])
    if any(c["r"] > min(c["layers"][n]) for n in hit):
        out.append(_MODEL_CLASSES[-1])
    return tuple(out)


def _model_boundary() -> list[Boundary]:
    layers = {
        "model.layers.0.self_attn.q_proj": (64, 64),
        "model.layers.0.self_attn.k_proj": (16, 64),
        "model.layers.0.self_attn.v_proj": (16, 64),
        "model.layers.0.mlp.up_proj": (172, 64),
        "model.layers.0.mlp.down_proj": (64, 172),
        "model.layers.1.xq_proj": (8, 64),
        "lm_head": (100, 64),
    }
    cases = [
        ("all_linear", {"layers": layers, "r": 8, "target_modules": "all-linear", "lora_bias": False, "dora": False}),
        (
            "suffix_keys",
            {"layers": layers, "r": 16, "target_modules": ["q_proj", "v_proj"], "lora_bias": True, "dora": False},
        ),
        (
            "whole_name_and_multipart",
            {
                "layers": layers,
                "r": 4,
                "target_modules": ["lm_head", "self_attn.k_proj", "mlp.down_proj"],
                "lora_bias": False,
                "dora": True,
            },
        ),
        (
            "one_layer",
            {"layers": {"proj": (3, 5)}, "r": 3, "target_modules": ["proj"], "lora_bias": True, "dora": True},
        ),
        (
            "rank_above_a_layer",
            {
                "layers": {"proj": (3, 5), "lm_head": (100, 64)},
                "r": 7,
                "target_modules": "all-linear",
                "lora_bias": False,
                "dora": True,
            },
        ),
    ]
    return _bounds_of(cases, _model_classes)


# ---------------------------------------------------------------------------- init

_INIT_CLASSES = (
    "option: method=default",
    "option: method=gaussian",
    "option: method=pissa",
    "option: method=olora",
    "option: embedding=True, method=default",
    "option: embedding=True, method=gaussian",
    "option: fan_in_fan_out=True",
    "option: fan_in_fan_out=False",
    "option: use_rslora=True",
    "option: use_rslora=False",
    "shape: r = 1",
    "shape: r = min(in, out)",
    "shape: in > out",
    "shape: in < out",
    "value: s = α/r ≠ 1",
    "value: alpha negative",
    *_DTYPE_CLASSES,
    "shape: r > min(in, out), method=default or gaussian (A (r, in), B (out, r))",
    "shape: r > min(in, out), method=pissa or olora (min(in, out) components, as PEFT)",
)


def _init_classes(c: Case) -> tuple[str, ...]:
    w = c["W"]
    emb, fifo = c.get("embedding", False), c.get("fan_in_fan_out", False)
    out_f, in_f = (w.shape[1], w.shape[0]) if (emb or fifo) else w.shape
    m = c.get("method", "default")
    out = [
        f"option: method={m}",
        f"option: fan_in_fan_out={fifo}",
        f"option: use_rslora={c['use_rslora']}",
        f"dtype: {_dtype_name(w)} inputs",
    ]
    if emb:
        out.append(f"option: embedding=True, method={m}")
    if c["r"] == 1:
        out.append("shape: r = 1")
    if c["r"] == min(in_f, out_f):
        out.append("shape: r = min(in, out)")
    if c["r"] > min(in_f, out_f):
        out.append(_INIT_CLASSES[-2] if m in ("default", "gaussian") else _INIT_CLASSES[-1])
    if in_f != out_f:
        out.append("shape: in > out" if in_f > out_f else "shape: in < out")
    s = c["alpha"] / (math.sqrt(c["r"]) if c["use_rslora"] else c["r"])
    if s != 1:
        out.append("value: s = α/r ≠ 1")
    if c["alpha"] < 0:
        out.append("value: alpha negative")
    return tuple(out)


def _init_boundary() -> list[Boundary]:
    configs = [  # (method, (out, in), r, alpha, rslora, fifo, emb, dtype)
        ("pissa", (5, 9), 2, 8.0, False, False, False, "float64"),
        ("default", (24, 40), 4, 16.0, False, False, False, "float64"),
        ("default", (33, 19), 1, -8.0, True, True, False, "float32"),
        ("gaussian", (17, 12), 12, 24.0, False, False, False, "float16"),
        ("gaussian", (8, 20), 3, 6.0, True, True, False, "bfloat16"),
        ("default", (6, 35), 6, 12.0, False, False, True, "float64"),  # embedding: W is E (V, d) = (35, 6)
        ("gaussian", (19, 9), 2, 4.0, False, False, True, "float32"),
        ("pissa", (20, 12), 12, 6.0, True, True, False, "float64"),
        ("pissa", (7, 7), 1, 3.0, False, False, False, "bfloat16"),
        ("olora", (9, 17), 3, 12.0, False, False, False, "float64"),
        ("olora", (18, 10), 10, -5.0, True, True, False, "float16"),
        ("olora", (6, 6), 1, 2.0, False, False, False, "float32"),
        ("default", (3, 5), 7, 8.0, False, False, False, "float64"),
        ("pissa", (4, 6), 6, 3.0, False, True, False, "float64"),
        ("olora", (6, 3), 5, -2.0, False, False, False, "float32"),
    ]
    out = []
    for i, (m, (o, n), r, a, rs, fifo, emb, dt) in enumerate(configs):
        rng = np.random.default_rng(3000 + i)
        shape = (n, o) if (fifo or emb) else (o, n)
        w = _normal(rng, shape)
        if m == "pissa":  # well-separated singular values: the factors are well conditioned (a tight bound)
            u, _, vh = np.linalg.svd(w, full_matrices=False)
            w = (u * (2.0 ** -np.arange(u.shape[1]) * 4.0)) @ vh
        c = {
            "W": _cast(w, dt),
            "r": r,
            "alpha": a,
            "method": m,
            "rng": SeededRng(40 + i),
            "use_rslora": rs,
            "fan_in_fan_out": fifo,
            "embedding": emb,
        }
        out.append(
            (
                f"b{i}_{m}{'_emb' if emb else ''}{'_fifo' if fifo else ''}_{o}x{n}_r{r}_a{a:g}"
                f"{'_rs' if rs else ''}_{dt}",
                c,
            )
        )
    return _bounds_of(out, _init_classes)


def _golden_init(rng: np.random.Generator) -> list[tuple[str, Case]]:
    """PiSSA and OLoRA need no random draws (rng is not an input): their cases are stored as vectors."""
    from refimpl.conformance.strategies import dyadic

    out = []
    for i, (m, (o, n), r, a, fifo) in enumerate([("pissa", (6, 4), 2, 4.0, False), ("olora", (5, 8), 3, 6.0, True)]):
        w = dyadic(rng, (n, o) if fifo else (o, n))
        out.append(
            (
                f"case{i}_{m}_{o}x{n}_r{r}",
                {
                    "W": w,
                    "r": r,
                    "alpha": a,
                    "method": m,
                    "use_rslora": False,
                    "fan_in_fan_out": fifo,
                    "embedding": False,
                },
            )
        )
    return out


def _init_layout(c: Mapping[str, Any]) -> tuple[np.ndarray, float]:
    """W in (out, in) layout (float64) and s."""
    w = np.asarray(c["W"], dtype=np.float64)
    if c.get("fan_in_fan_out") or c.get("embedding"):
        w = w.T
    r = c["r"]
    s = c["alpha"] / (math.sqrt(r) if c.get("use_rslora") else r)
    return w, s


def _init_depth(c: Mapping[str, Any]) -> int:
    w, _ = _init_layout(c)
    return bounds.lora_init_depth(*w.shape)


def _init_magnitude(c: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per output, |δ| ≤ (γ_K(target) + γ_K(float64)) · magnitude.

    default / gaussian / embedding: the reference's own draws; A = −b + 2b·u (kaiming bound b = 1/√in) and
    A = σ·z carry a few roundings of |A|, B = z none; W is returned as given (exact).
    PiSSA (first-order perturbation theory; Wedin): a backward-stable SVD is exact for W + E with
    ‖E‖₂ ≤ γ_K ‖W‖₂; then |δσ_i| ≤ ‖E‖, the angle of singular vector i is ≤ ‖E‖ / gap_i, and the rank-r
    part moves by ≤ ‖E‖ (1 + 2σ₁ / gap_r), gap_r = σ_r − σ_{r+1}. A_i = √(σ_i/s) v_iᵀ therefore moves by
    ≤ ‖E‖ (√(σ_i/|s|) / gap_i + 1 / (2√(σ_i |s|))), B likewise.
    OLoRA (Stewart/Sun QR perturbation): Householder QR is column-wise backward stable, and the leading r
    columns' Q_r moves by ≤ 2 κ₂(W[:, :r]) γ_K, R_r = Q_rᵀ W by ≤ 2 κ₂ ‖W‖₂ γ_K, W_res by |s| times that.
    Where that first-order bound exceeds the trivial one (a zero or tiny gap, rank-deficient leading columns:
    the factors are barely determined), the trivial bound applies: two unit vectors differ by at most 2, so
    |δA_i| ≤ 2√(σ_i/|s|) (PiSSA), |δQ| ≤ 2, |δR| ≤ 2‖W‖₂ (OLoRA), |δW_res| ≤ 2|s|·‖B A‖₂ — expressed as a
    magnitude against float64's γ_K (a lower-precision target only widens it).
    """
    from refimpl import precision

    m = c.get("method", "default")
    w, s = _init_layout(c)
    out_f, in_f = w.shape
    r = c["r"]
    k = min(r, out_f, in_f)  # PiSSA / OLoRA components (as PEFT: no more than min(in, out))
    zero_w = np.zeros_like(np.asarray(c["W"], dtype=np.float64))
    if m in ("default", "gaussian"):
        if c.get("embedding"):
            return {"out.W": zero_w, "out.A": np.zeros((r, in_f)), "out.B": np.zeros((out_f, r))}
        a = np.full((r, in_f), 4.0 / math.sqrt(in_f)) if m == "default" else np.full((r, in_f), 8.0 / r)
        return {"out.W": zero_w, "out.A": a, "out.B": np.zeros((out_f, r))}
    g64 = 2.0 * precision.gamma(_init_depth(c), "float64")

    def capped(first_order: npt.ArrayLike, trivial: npt.ArrayLike) -> np.ndarray:
        first_order = np.where(np.isnan(first_order), np.inf, first_order)
        return np.minimum(first_order, np.asarray(trivial) / g64)

    norm = np.linalg.norm(w, 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        if m == "pissa":
            sv = np.linalg.svd(w, compute_uv=False)
            padded = np.concatenate([[np.inf], sv, [0.0]])
            gaps = np.minimum(padded[:-2] - padded[1:-1], padded[1:-1] - padded[2:])[:k]
            gap_r = sv[k - 1] - (sv[k] if k < sv.size else 0.0)
            root = np.sqrt(sv[:k] / abs(s))
            fac = capped(norm * (root / gaps + 1.0 / (2.0 * np.sqrt(sv[:k] * abs(s)))), 2.0 * root)
            w_res = np.full(w.shape, capped(norm * (1.0 + 2.0 * norm / gap_r), 2.0 * norm).item())
            a_mag, b_mag = np.repeat(fac[:, None], in_f, axis=1), np.repeat(fac[None, :], out_f, axis=0)
        else:
            lead = np.linalg.svd(w[:, :k], compute_uv=False)
            kappa = lead[0] / lead[-1]
            a_mag = np.full((k, in_f), capped(np.asarray(2.0 * kappa * norm), 2.0 * norm).item())
            b_mag = np.full((out_f, k), capped(np.asarray(2.0 * kappa), 2.0).item())
            w_res = np.full(
                w.shape, capped(np.asarray(norm + abs(s) * 4.0 * kappa * norm), norm + 2.0 * abs(s) * norm).item()
            )
    fifo = c.get("fan_in_fan_out")
    return {"out.W": w_res.T if fifo else w_res, "out.A": a_mag, "out.B": b_mag}


# ---------------------------------------------------------------------------- dropout mask

_MASK_CLASSES = (
    "shape: 1-D",
    "shape: 2-D",
    "shape: 3-D",
    "shape: a zero-length axis (empty mask)",
    "shape: more than 16 elements",
    "value: p = 0 (keep everything)",
    "value: 0 < p < 1",
    "value: p close to 1 (0.99)",
)


def _mask_classes(c: Case) -> tuple[str, ...]:
    shape, p = c["shape"], c["p"]
    out = [f"shape: {len(shape)}-D"]
    if 0 in shape:
        out.append(_MASK_CLASSES[3])
    if math.prod(shape) > 16:
        out.append(_MASK_CLASSES[4])
    out.append(_MASK_CLASSES[5] if p == 0 else _MASK_CLASSES[7] if p >= 0.99 else _MASK_CLASSES[6])
    return tuple(out)


def _mask_boundary() -> list[Boundary]:
    cases = [((7,), 0.5), ((33,), 0.0), ((4, 9), 0.25), ((2, 3, 5), 0.99), ((0, 3), 0.5), ((3, 17), 0.1)]
    return _bounds_of(
        [
            (f"shape{'x'.join(map(str, sh))}_p{p:g}", {"rng": SeededRng(50 + i), "shape": sh, "p": p})
            for i, (sh, p) in enumerate(cases)
        ],
        _mask_classes,
    )


# ---------------------------------------------------------------------------- merge bounds


def _merge_magnitude(*, merged: bool = False) -> Callable[[Mapping[str, Any]], dict[str, np.ndarray]]:
    """|W| + |s|·|B||A| (merge) or |W'| + |s|·|B||A| (unmerge), before any storage rounding: with a storage
    dtype the bound applies to the unrounded value, and ``_merge_stored`` turns it into the stored range."""

    def mag(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
        c = abs_case(_f64({k: v for k, v in case.items() if k not in ("dtype", "safe")}))
        if merged:
            c["W"] = c.pop("W_merged")
        return _flat(_ref("merge")(**c))

    return mag


def _merge_stored(*, merged: bool = False) -> Callable[[Mapping[str, Any], str], dict[str, bounds.StoredRange]]:
    """The stored values a target computing in ``dtype`` may give with a storage dtype (spec/conventions.md,
    "Results stored in a narrower format"): rd(W + ΔW) (merge, safe=False) from the unrounded merge and its
    bound; rd(W ± rd(ΔW)) (merge with safe=True, unmerge) through the inner rounding of ΔW."""

    def stored(case: Mapping[str, Any], dtype: str) -> dict[str, bounds.StoredRange]:
        storage = case.get("dtype")
        if storage is None:
            return {}
        storage = str(np.dtype(precision.resolve_dtype(storage)))
        c = _f64({k: v for k, v in case.items() if k not in ("dtype", "safe")})
        W = c.pop("W_merged") if merged else c.pop("W")
        r = int(np.shape(c["A"])[0])
        fifo = bool(c.get("fan_in_fan_out", False))
        if not merged and not case.get("safe", False):
            v = _ref("merge")(W, c["A"], c["B"], c["scaling"], fan_in_fan_out=fifo)
            mag = _merge_magnitude()(case)["out"]
            return {"out": bounds.stored_single(v, bounds.lora_merge_unrounded_depth(r), mag, storage, dtype)}
        d = _ref("delta")(c["A"], c["B"], c["scaling"], fan_in_fan_out=fifo)
        d_mag = _ref("delta")(np.abs(c["A"]), np.abs(c["B"]), abs(c["scaling"]), fan_in_fan_out=fifo)
        depth = bounds.lora_delta_unrounded_depth(r)
        return {"out": bounds.stored_sum(W, d, depth, d_mag, storage, dtype, sign=-1.0 if merged else 1.0)}

    return stored


def rows() -> list[OpSpec]:
    def linear_depth(case: Mapping[str, Any]) -> int:
        n_in, _, r, _ = _reduction(case)
        return bounds.lora_forward_depth(n_in, r)

    def backward_depth(case: Mapping[str, Any]) -> int:
        n_in, n_out, r, n_rows = _reduction(case)
        return bounds.lora_backward_depth(n_in, n_out, r, n_rows)

    def ex(name: str, **kw):
        return lambda: dict(_golden_linear(np.random.default_rng(0), **kw)[0][1])

    fwd = ("x", "W", "A", "B", "scaling", "bias")
    init_ex = {"W": np.arange(12.0).reshape(3, 4) - 5.5, "r": 2, "alpha": 4.0, "use_rslora": False}
    return [
        OpSpec(
            "lora.scaling",
            _scaling_strategy,
            "alpha finite real, r ≥ 1, use_rslora bool",
            Bounded(
                lambda c: bounds.lora_scaling_depth(),
                lambda c: {"out": np.asarray(_ref("scaling")(abs(c["alpha"]), c["r"], use_rslora=c["use_rslora"]))},
                note="α/r or α/√r: ≤ 2 roundings",
            ),
            golden=lambda rng: [
                (f"alpha{a}_r{r}_rs{int(rs)}", {"alpha": a, "r": r, "use_rslora": rs})
                for a, r, rs in ((16.0, 8, False), (16.0, 8, True), (32.0, 64, True), (8.0, 3, False))
            ],
            specials=lambda: [
                Special("alpha is nan", {"alpha": math.nan, "r": 8, "use_rslora": False}),
                Special("alpha is inf", {"alpha": math.inf, "r": 8, "use_rslora": False}),
                Special("r is 0", {"alpha": 8.0, "r": 0, "use_rslora": False}),
                Special("alpha is 0", {"alpha": 0.0, "r": 4, "use_rslora": True}),
            ],
            classes=_SCALING_CLASSES,
            boundary=_scaling_boundary,
        ),
        OpSpec(
            "lora.delta",
            lambda: _linear_strategy(with_x=False).map(
                lambda c: {k: c[k] for k in ("A", "B", "scaling", "fan_in_fan_out")}
            ),
            "A (r, in), B (out, r), r ≥ 1 (r > min(in, out) included), scaling finite",
            Bounded(lambda c: bounds.lora_delta_depth(c["A"].shape[0]), _magnitude_of("delta")),
            golden=lambda rng: [
                (n, {k: c[k] for k in ("A", "B", "scaling", "fan_in_fan_out")})
                for n, c in _golden_linear(rng, with_x=False)
            ],
            specials=lambda: _specials(
                "delta",
                ("A", "B", "scaling"),
                lambda: {
                    k: v for k, v in ex("delta", with_x=False)().items() if k in ("A", "B", "scaling", "fan_in_fan_out")
                },
            ),
            classes=_linear_op_classes("delta"),
            boundary=_linear_boundary("delta"),
        ),
        OpSpec(
            "lora.forward",
            _linear_strategy,
            "x (..., in), W (out, in) or (in, out) with fan_in_fan_out, A (r, in), B (out, r), "
            "r ≥ 1 (r > min(in, out) included); optional bias (out,), 0/1 dropout_mask of x's shape, "
            "dropout_p in [0, 1)",
            Bounded(linear_depth, _magnitude_of("forward")),
            golden=_golden_linear,
            specials=lambda: _specials("forward", fwd, ex("forward")),
            classes=_linear_op_classes("forward"),
            boundary=_linear_boundary("forward"),
        ),
        OpSpec(
            "lora.backward",
            lambda: _linear_strategy(grad=True),
            "as forward, plus grad_y (..., out); need_dW / need_dbias flags",
            Bounded(backward_depth, _magnitude_of("backward")),
            golden=lambda rng: _golden_linear(rng, grad=True),
            specials=lambda: _specials("backward", ("x", "W", "A", "B", "grad_y"), ex("backward", grad=True)),
            classes=_linear_op_classes("backward"),
            boundary=_linear_boundary("backward"),
        ),
        OpSpec(
            "lora.merge",
            lambda: _linear_strategy(with_x=False, options=True),
            "W (out, in) or (in, out) with fan_in_fan_out, A (r, in), B (out, r); dtype None (float64 result) or a "
            "storage format (float32, float16, bfloat16, float8_*), rounded once (safe=False) or twice (safe=True)",
            StoredBounded(
                lambda c: bounds.lora_merge_depth(c["A"].shape[0]), _merge_magnitude(), stored=_merge_stored()
            ),
            golden=lambda rng: _golden_linear(rng, with_x=False),
            specials=lambda: _specials("merge", ("W", "A", "B", "scaling"), ex("merge", with_x=False)),
            classes=_linear_op_classes("merge"),
            boundary=_linear_boundary("merge"),
        ),
        OpSpec(
            "lora.unmerge",
            lambda: _linear_strategy(with_x=False, merged=True, options=True),
            "as merge, with W_merged in place of W; dtype None or a storage format (round(W' − round(ΔW)))",
            # |W' − ΔW| is bounded by the merge of the absolute values, |W'| + |s|·|B||A|
            StoredBounded(
                lambda c: bounds.lora_merge_depth(c["A"].shape[0]),
                _merge_magnitude(merged=True),
                stored=_merge_stored(merged=True),
            ),
            golden=lambda rng: _golden_linear(rng, with_x=False, merged=True),
            specials=lambda: _specials("unmerge", ("W_merged", "A", "B"), ex("unmerge", with_x=False, merged=True)),
            classes=_linear_op_classes("unmerge"),
            boundary=_linear_boundary("unmerge"),
        ),
        OpSpec(
            "lora.embedding_forward",
            _embedding_strategy,
            "ids integer array (any shape, 0-D included) in [0, V), E (V, d), A (r, V), B (d, r), r ≥ 1",
            Bounded(lambda c: bounds.lora_embedding_forward_depth(c["A"].shape[0]), _magnitude_of("embedding_forward")),
            golden=_golden_embedding,
            specials=lambda: [
                *_specials(
                    "embedding_forward",
                    ("E", "A", "B"),
                    lambda: dict(_golden_embedding(np.random.default_rng(0))[0][1]),
                ),
                Special(
                    "ids out of range",
                    {**_golden_embedding(np.random.default_rng(0))[0][1], "ids": np.array([10], dtype=np.int64)},
                ),
            ],
            classes=_EMB_CLASSES,
            boundary=_embedding_boundary,
        ),
        OpSpec(
            "lora.param_count",
            _param_count_strategy,
            "in, out, r ≥ 1 integers (r > min(in, out) included)",
            Exact(),
            golden=lambda rng: [
                (
                    "lesson_4096_r8",
                    {"in_features": 4096, "out_features": 4096, "r": 8, "lora_bias": False, "dora": False},
                ),
                ("dora_bias", {"in_features": 10, "out_features": 6, "r": 4, "lora_bias": True, "dora": True}),
            ],
            specials=lambda: [
                Special("r is 0", {"in_features": 4, "out_features": 3, "r": 0, "lora_bias": False, "dora": False})
            ],
            classes=_COUNT_CLASSES,
            boundary=_count_boundary,
        ),
        _RowWithoutVectors(  # its result names the adapted layers (text), which a safetensors vector cannot hold
            "lora.model_param_count",
            _model_count_strategy,
            "layers {name: (out, in)} non-empty, r ≥ 1, target_modules "
            "'all-linear' or a list of names (equal, or a suffix after a dot)",
            Exact(),
            tiers=_NO_GOLDEN,
            specials=lambda: [
                Special("no layer matches", {"layers": {"a.q_proj": (8, 8)}, "r": 2, "target_modules": ["k_proj"]}),
                Special(
                    "target_modules a bare name", {"layers": {"a.q_proj": (8, 8)}, "r": 2, "target_modules": "q_proj"}
                ),
                Special("layers empty", {"layers": {}, "r": 2, "target_modules": "all-linear"}),
            ],
            classes=_MODEL_CLASSES,
            boundary=_model_boundary,
        ),
        OpSpec(
            "lora.init",
            _init_strategy,
            "W (out, in) ((in, out) with fan_in_fan_out; the table E (V, d) with embedding), r ≥ 1 (PiSSA and "
            "OLoRA keep min(r, in, out) components, as PEFT), "
            "alpha finite (> 0 for PiSSA), method default/gaussian/pissa/olora (embedding: default/gaussian), "
            "rng a numpy Generator (the draws are the reference's)",
            Bounded(
                _init_depth,
                _init_magnitude,
                note="draws exact up to their roundings; SVD/QR factors by first-order perturbation bounds with "
                "LAPACK's signs (numpy.linalg)",
            ),
            golden=_golden_init,
            specials=lambda: [
                Special("unknown method", {**init_ex, "method": "loftq"}),
                Special("pissa with alpha 0", {**init_ex, "alpha": 0.0, "method": "pissa"}),
                Special("embedding with pissa", {**init_ex, "method": "pissa", "embedding": True}),
                Special(
                    "embedding with fan_in_fan_out",
                    {**init_ex, "embedding": True, "fan_in_fan_out": True, "rng": SeededRng(0)},
                ),
                Special("r is 0", {**init_ex, "r": 0, "rng": SeededRng(0)}),
                Special("rng is not a Generator", {**init_ex, "rng": 0}),
                Special("W has nan", {**init_ex, "W": np.full((3, 4), np.nan), "method": "olora"}),
            ],
            classes=_INIT_CLASSES,
            boundary=_init_boundary,
        ),
        _RowWithoutVectors(
            "lora.dropout_mask",
            _dropout_mask_strategy,
            "rng a numpy Generator, shape a sequence of integers ≥ 0, p in [0, 1): (rng.random(shape) ≥ p) as 0/1",
            Exact(),
            tiers=_NO_GOLDEN,
            specials=lambda: [
                Special("p is 1", {"rng": SeededRng(0), "shape": (3,), "p": 1.0}),
                Special("p negative", {"rng": SeededRng(0), "shape": (3,), "p": -0.1}),
                Special("negative length", {"rng": SeededRng(0), "shape": (-1,), "p": 0.5}),
                Special("rng is a seed", {"rng": 0, "shape": (3,), "p": 0.5}),
            ],
            classes=_MASK_CLASSES,
            boundary=_mask_boundary,
        ),
        _batched_row(),
    ]


# ---------------------------------------------------------------------------- forward_batched (many adapters)

_BATCH_CLASSES = (
    "shape: T = 1 (one token)",
    "shape: more than 16 tokens (a large-batch kernel path)",
    "shape: one adapter",
    "shape: 8 or more adapters",
    "shape: adapters of different ranks (padding to the largest rank)",
    "shape: an adapter of rank 1",
    "shape: an adapter of rank > min(in, out)",
    "shape: in % 8 != 0 (a remainder after vector width 8)",
    "shape: in > 16 and in % 16 != 0 (a remainder after vector width 16)",
    "shape: out % 8 != 0 (a remainder after vector width 8)",
    "shape: out > 16 and out % 16 != 0 (a remainder after vector width 16)",
    "value: tokens with index -1 (base layer only)",
    "value: every token on index -1 (no adapter applied)",
    "value: every token on an adapter (no -1)",
    "value: no adapters given (an empty list)",
    "value: an adapter used by no token",
    "value: the last adapter (index n - 1) used",
    "value: index 0 used",
    "value: one adapter's tokens not contiguous (interleaved with others)",
    "value: tokens already sorted into contiguous segments",
    "value: adapters of different scalings",
    "value: an adapter with scaling 0",
    "value: an adapter with negative scaling",
    "value: an adapter with |scaling| >= 64 (large)",
    *_FIFO_CLASSES,
    *_BIAS_CLASSES,
    *_DTYPE_CLASSES,
)


def _batched_classes(c: Case) -> tuple[str, ...]:
    """The classes a forward_batched case belongs to (computed from the case)."""
    out: list[str] = []
    x, idx, ads = c["x"], np.asarray(c["adapter_index"]), c["adapters"]
    T, n_in = x.shape
    n_out = (c["W"].shape[1] if c.get("fan_in_fan_out") else c["W"].shape[0]) if "W" in c else 0
    n = len(ads)
    ranks = [a[0].shape[0] for a in ads]
    scalings = [float(a[2]) for a in ads]
    used = set(idx[idx >= 0].tolist())
    if T == 1:
        out.append(_BATCH_CLASSES[0])
    if T > 16:
        out.append(_BATCH_CLASSES[1])
    if n == 1:
        out.append(_BATCH_CLASSES[2])
    if n >= 8:
        out.append(_BATCH_CLASSES[3])
    if len(set(ranks)) > 1:
        out.append(_BATCH_CLASSES[4])
    if 1 in ranks:
        out.append(_BATCH_CLASSES[5])
    if any(r > min(n_in, n_out) for r in ranks):
        out.append(_BATCH_CLASSES[6])
    if n_in % 8:
        out.append(_BATCH_CLASSES[7])
    if n_in > 16 and n_in % 16:
        out.append(_BATCH_CLASSES[8])
    if n_out % 8:
        out.append(_BATCH_CLASSES[9])
    if n_out > 16 and n_out % 16:
        out.append(_BATCH_CLASSES[10])
    if (idx == -1).any():
        out.append(_BATCH_CLASSES[11])
    if (idx == -1).all():
        out.append(_BATCH_CLASSES[12])
    if (idx >= 0).all():
        out.append(_BATCH_CLASSES[13])
    if n == 0:
        out.append(_BATCH_CLASSES[14])
    if len(used) < n:
        out.append(_BATCH_CLASSES[15])
    if n - 1 in used:
        out.append(_BATCH_CLASSES[16])
    if 0 in used:
        out.append(_BATCH_CLASSES[17])
    runs = [int(i) for k, i in enumerate(idx) if k == 0 or idx[k - 1] != i]
    out.append(_BATCH_CLASSES[18] if len(runs) != len(set(runs)) else _BATCH_CLASSES[19])
    if len(set(scalings)) > 1:
        out.append(_BATCH_CLASSES[20])
    if 0.0 in scalings:
        out.append(_BATCH_CLASSES[21])
    if any(s < 0 for s in scalings):
        out.append(_BATCH_CLASSES[22])
    if any(abs(s) >= 64 for s in scalings):
        out.append(_BATCH_CLASSES[23])
    out.append(_FIFO_CLASSES[int(bool(c.get("fan_in_fan_out")))])
    out.append(_BIAS_CLASSES[0] if c.get("bias") is not None else _BIAS_CLASSES[1])
    out.append(f"dtype: {_dtype_name(x)} inputs")
    return tuple(out)


def _batched_strategy():
    """Batches of 1 to 20 tokens over 0 to 4 adapters of independently drawn ranks (r ≤ min(in, out) + 4) and
    scalings; each token's index is drawn from −1..n − 1, so unused adapters, −1 tokens and interleaved
    segments all occur; every option value and input dtype is drawn."""
    from hypothesis import strategies as st

    from refimpl.conformance import strategies as rs

    @st.composite
    def build(draw) -> Case:
        n_in, n_out = draw(rs.dims(1, 6)), draw(rs.dims(1, 6))
        T = draw(st.integers(1, 20))
        n = draw(st.integers(0, 4))
        fifo = draw(st.booleans())
        dt = draw(st.sampled_from(_DTYPES))
        scalings = st.one_of(rs.reals(-4.0, 4.0), st.sampled_from([0.0, -2.0, 64.0, 128.0]))
        case: Case = {"x": _cast(draw(rs.float_arrays((T, n_in))), dt)}
        case["W"] = _cast(draw(rs.float_arrays((n_in, n_out) if fifo else (n_out, n_in))), dt)
        adapters = []
        for _ in range(n):
            r = draw(rank_strategy(n_in, n_out))
            a = _cast(draw(rs.float_arrays((r, n_in))), dt)
            b = _cast(draw(rs.float_arrays((n_out, r))), dt)
            adapters.append((a, b, draw(scalings)))
        case["adapters"] = adapters
        case["adapter_index"] = np.array(draw(st.lists(st.integers(-1, n - 1), min_size=T, max_size=T)), np.int64)
        if draw(st.booleans()):
            case["bias"] = _cast(draw(rs.float_arrays((n_out,))), dt)
        case["fan_in_fan_out"] = fifo
        return case

    return build()


def _batched_case(
    seed: int,
    index: list[int],
    n_in: int,
    n_out: int,
    ranks: tuple[int, ...],
    scalings: tuple[float, ...],
    *,
    fifo: bool = False,
    bias: bool = False,
    dtype: str = "float64",
    index_dtype: Any = np.int64,
) -> Case:
    rng = np.random.default_rng(2000 + seed)
    c: Case = {"x": _cast(_normal(rng, (len(index), n_in)), dtype)}
    c["W"] = _cast(_normal(rng, (n_in, n_out) if fifo else (n_out, n_in)), dtype)
    c["adapters"] = [
        (_cast(_normal(rng, (r, n_in), 0.5), dtype), _cast(_normal(rng, (n_out, r), 0.5), dtype), s)
        for r, s in zip(ranks, scalings, strict=True)
    ]
    c["adapter_index"] = np.array(index, dtype=index_dtype)
    if bias:
        c["bias"] = _cast(_normal(rng, (n_out,)), dtype)
    c["fan_in_fan_out"] = fifo
    return c


def _batched_boundary() -> list[Boundary]:
    interleaved = [0, 1, -1, 0, 2, 1, -1, 2, 0]
    eight = [(t * 5) % 9 - 1 for t in range(40)]  # −1..7, every adapter, interleaved, 40 tokens
    cases = [
        ("one_token_one_adapter", _batched_case(0, [0], 6, 5, (2,), (0.75,), bias=True)),
        ("one_token_base_only", _batched_case(1, [-1], 6, 5, (2,), (0.75,))),
        ("interleaved_mixed_ranks", _batched_case(2, interleaved, 19, 21, (1, 4, 19), (0.5, -1.5, 2.0), fifo=True)),
        ("sorted_segments", _batched_case(3, [0, 0, 0, 1, 1, 2, 2, 2, -1], 24, 17, (3, 3, 5), (1.0, 0.25, 128.0))),
        (
            "unused_adapters",
            _batched_case(4, [1, 1, -1, 1], 12, 12, (2, 6, 9), (2.0, 0.5, -80.0), fifo=True, bias=True),
        ),
        ("all_base_only", _batched_case(5, [-1, -1, -1], 8, 16, (4,), (1.25,), bias=True)),
        ("no_adapters", _batched_case(6, [-1, -1], 5, 7, (), ())),
        (
            "eight_adapters_40_tokens",
            _batched_case(
                7, eight, 40, 33, (1, 2, 4, 8, 16, 3, 5, 7), tuple(0.25 * (k + 1) for k in range(8)), bias=True
            ),
        ),
        ("scaling_zero", _batched_case(8, [0, 1, 0, 1], 9, 18, (2, 2), (0.0, 1.5), fifo=True)),
        ("rank_above_min", _batched_case(9, [0, -1, 0, 1], 3, 5, (7, 2), (0.5, 0.5))),
        ("float32", _batched_case(10, [1, 0, -1, 1, 0], 17, 35, (2, 6), (0.5, -0.625), dtype="float32", bias=True)),
        ("float16", _batched_case(11, [0, 0, 1], 18, 9, (3, 1), (2.0, 1.0), dtype="float16", fifo=True)),
        ("bfloat16", _batched_case(12, [1, -1, 0], 12, 12, (5, 2), (0.75, 0.5), dtype="bfloat16")),
        (
            "int32_index_single_adapter_17_tokens",
            _batched_case(13, [0] * 17, 33, 24, (4,), (0.5,), index_dtype=np.int32, bias=True),
        ),
    ]
    return _bounds_of(cases, _batched_classes)


def _abs_adapters(case: Mapping[str, Any]) -> Case:
    c = abs_case(_f64({k: v for k, v in case.items() if k != "adapters"}))
    c["adapters"] = [
        (np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64)), abs(float(s)))
        for a, b, s in case["adapters"]
    ]
    return c


def _batched_magnitude(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """|x| |W|ᵀ + |b| + |s_i| (|x| |A_i|ᵀ) |B_i|ᵀ per token: the formula on absolute values."""
    return _flat(_ref("forward_batched")(**_abs_adapters(case)))


def _batched_depth(case: Mapping[str, Any]) -> int:
    r_max = max((a[0].shape[0] for a in case["adapters"]), default=0)
    return bounds.lora_forward_batched_depth(case["x"].shape[1], r_max)


def _batched_specials() -> list[Special]:
    base = _batched_case(20, [0, -1, 1, 0], 6, 5, (2, 3), (0.5, 2.0), bias=True)

    def with_(**kw: Any) -> Case:
        return {**base, **kw}

    def adapter(k: int, pos: int, value: Any) -> list[tuple[Any, Any, Any]]:
        ads = [list(a) for a in base["adapters"]]
        if pos == 2:
            ads[k][2] = value
        else:
            arr = np.array(ads[k][pos])
            arr.flat[0] = value
            ads[k][pos] = arr
        return [tuple(a) for a in ads]  # type: ignore[misc]

    out = []
    for label, val in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
        for arg in ("x", "W", "bias"):
            arr = np.array(base[arg])
            arr.flat[0] = val
            out.append(Special(f"{arg} has {label}", with_(**{arg: arr})))
        out.append(Special(f"adapters[1] A has {label}", with_(adapters=adapter(1, 0, val))))
        out.append(Special(f"adapters[0] B has {label}", with_(adapters=adapter(0, 1, val))))
        out.append(Special(f"adapters[1] scaling is {label}", with_(adapters=adapter(1, 2, float(val)))))
    zero_b = [(a, np.zeros_like(b), s) for a, b, s in base["adapters"]]
    a0, b0, s0 = base["adapters"][0]
    out += [
        Special("every B is zero (adapters at init)", with_(adapters=zero_b)),
        Special("adapters[0] A is all -0.0", with_(adapters=[(np.full_like(a0, -0.0), b0, s0), base["adapters"][1]])),
        Special("adapter_index equal to the number of adapters", with_(adapter_index=np.array([0, 2, 1, 0]))),
        Special("adapter_index -2", with_(adapter_index=np.array([0, -2, 1, 0]))),
        Special("adapter_index of floats", with_(adapter_index=np.array([0.0, -1.0, 1.0, 0.0]))),
        Special("adapter_index of booleans", with_(adapter_index=np.array([True, False, True, True]))),
        Special("adapter_index one short", with_(adapter_index=np.array([0, -1, 1]))),
        Special(
            "adapters[1] B of the wrong rank",
            with_(adapters=[base["adapters"][0], (base["adapters"][1][0], base["adapters"][0][1], 2.0)]),
        ),
        Special("an adapter that is not a triple", with_(adapters=[base["adapters"][0][:2], base["adapters"][1]])),
        Special("index into an empty adapter list", with_(adapters=[], adapter_index=np.array([0, -1, -1, -1]))),
    ]
    return out


def _batched_row() -> OpSpec:
    return _RowWithoutVectors(  # adapters are a list of (A, B, s) triples, which a golden vector file cannot hold
        "lora.forward_batched",
        _batched_strategy,
        "x (T, in), W (out, in) or (in, out) with fan_in_fan_out, adapters a list of (A_i (r_i, in), B_i "
        "(out, r_i), s_i) with ranks ≥ 1 that may differ, adapter_index (T,) integers in [−1, n) (−1: no "
        "adapter); optional bias (out,)",
        Bounded(_batched_depth, _batched_magnitude),
        tiers=_NO_GOLDEN,
        specials=_batched_specials,
        classes=_BATCH_CLASSES,
        boundary=_batched_boundary,
    )
