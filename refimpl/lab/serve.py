"""``refimpl lab serve``: the lesson's sandbox as a local web page over the NumPy lab.

    refimpl lab serve [--port 8000] [--host 127.0.0.1] [--max-runs 2]

The page (``refimpl/lab/static/``: one HTML file, vanilla JavaScript drawing inline SVG, one
stylesheet; nothing is fetched from anywhere but this server) offers the lesson's controls, streams
the train (orange) and validation (teal) loss of each run while the NumPy loop proceeds, keeps the
session's runs on the plot, labels each finished run with ``refimpl.lab.diagnose`` (evidence and the
lesson's fix), shows the lesson's decision tree with the run's path through it, runs the planted
failure modes (healthy beside rank-too-low, wrong layers, overfitting), and merges two trained
adapters with ``refimpl.merging`` (averaging, task arithmetic, TIES, DARE). Each control links to the
spec page or the function that computes it (``/spec/<page>.md``, ``/ref/<dotted.name>``).

Server: Python's standard library only (``ThreadingHTTPServer``, server-sent events). Training runs
on a pool of ``max_runs`` worker threads, never on a request thread; at most ``max_runs + MAX_QUEUED``
runs are queued or running at once (a 429 beyond). A bad parameter is a 400 whose JSON body names the
field. Each page holds a session with one event stream; when the stream is gone for ``CLOSE_GRACE_S``
(the tab was closed) or the page sends its closing beacon, the session's runs stop. The only files the
server writes are exports, inside its temporary folder (removed when the server stops); the user's
download is the only copy that leaves it.

The training loop here is ``refimpl.lab.train.train_adapter``'s loop with two additions, a callback per
recorded point and a stop flag; with the same configuration it records the same curve
(tests/test_lab_serve.py checks it bit for bit).
"""

from __future__ import annotations

import contextlib
import csv
import html
import importlib
import inspect
import io
import json
import math
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from refimpl.lab import model as M
from refimpl.lab._threads import single_thread_blas
from refimpl.lab.diagnose import diagnose
from refimpl.lab.tasks import Dataset
from refimpl.lab.train import Curve, TrainConfig, evaluate, train_adapter

STATIC = Path(__file__).resolve().parent / "static"
SPEC = Path(__file__).resolve().parents[2] / "spec"  # present in a source checkout (editable install)
MAX_QUEUED = 8  # runs waiting for a worker, over all sessions
CLOSE_GRACE_S = 2.0  # a session without an event stream for this long is closed and its runs stop
MAX_BODY = 64 * 1024

# --------------------------------------------------------------------------- controls


@dataclass(frozen=True)
class Control:
    """One control of the page: its type, range, default and where its meaning is written down."""

    name: str
    label: str
    kind: str  # "int" | "float" | "choice" | "bool"
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[tuple[str, str], ...] = ()  # (value, label)
    help: str = ""
    links: tuple[tuple[str, str], ...] = ()  # (text, href)
    step: float | None = None


TASK_CHOICES = (
    ("facts", "facts (new knowledge)"),
    ("position", "position (new attention pattern)"),
    ("facts_low", "facts_low (merge task A)"),
    ("facts_high", "facts_high (merge task B)"),
    ("bag", "bag (majority, base map)"),
    ("bag_facts", "bag_facts (majority, new map)"),
)

CONTROLS: tuple[Control, ...] = (
    Control(
        "task",
        "task",
        "choice",
        "facts",
        choices=TASK_CHOICES,
        help="the synthetic task the adapter learns",
        links=(("tasks", "/ref/refimpl.lab.tasks.make_dataset"),),
    ),
    Control(
        "rank",
        "rank r",
        "int",
        8,
        1,
        64,
        step=1,
        help="capacity of the update ΔW = s·BA",
        links=(("spec §1–2", "/spec/lora.md#1-shapes-and-the-delta"), ("init", "/ref/refimpl.lab.model.init_adapter")),
    ),
    Control(
        "layers",
        "layers",
        "choice",
        "all",
        choices=(("qv", "QV only"), ("all", "All"), ("ffn", "FFN only")),
        help="which linear layers carry an adapter",
        links=(("targets", "/ref/refimpl.lab.model.resolve_targets"),),
    ),
    Control(
        "alpha",
        "alpha α (0 = 2r)",
        "float",
        0.0,
        0.0,
        1024.0,
        step=1,
        help="scaling s = α/r; 0 uses the lab's α = 2r",
        links=(("spec §2", "/spec/lora.md#2-scaling"), ("scaling", "/ref/refimpl.lab.model.AdapterConfig")),
    ),
    Control(
        "dropout",
        "dropout",
        "float",
        0.05,
        0.0,
        0.5,
        step=0.01,
        help="on the LoRA branch input (PEFT)",
        links=(("spec §3", "/spec/lora.md#3-forward"), ("forward", "/ref/refimpl.lab.model._lin_fwd")),
    ),
    Control(
        "weight_decay",
        "weight decay λ",
        "float",
        0.01,
        0.0,
        1.0,
        step=0.01,
        help="AdamW's decoupled decay",
        links=(("AdamW", "/ref/refimpl.lab.optim.adamw_step"),),
    ),
    Control(
        "lr",
        "learning rate",
        "float",
        3e-3,
        1e-5,
        0.1,
        step=0.0005,
        help="AdamW, 20-step linear warmup",
        links=(("AdamW", "/ref/refimpl.lab.optim.adamw_step"),),
    ),
    Control(
        "loraplus_ratio",
        "LoRA+ ratio",
        "float",
        1.0,
        1.0,
        64.0,
        step=1,
        help="lr of B = ratio × lr",
        links=(("groups", "/ref/refimpl.lab.optim.learning_rates"),),
    ),
    Control(
        "examples",
        "dataset size",
        "int",
        2000,
        20,
        20000,
        step=10,
        help="training examples",
        links=(("data", "/ref/refimpl.lab.experiments.datasets"),),
    ),
    Control(
        "steps",
        "steps",
        "int",
        300,
        20,
        2000,
        step=10,
        help="optimizer steps (batch 64)",
        links=(("loop", "/ref/refimpl.lab.serve.stream_train"),),
    ),
    Control(
        "dora",
        "DoRA",
        "bool",
        False,
        help="magnitude + direction (refimpl.dora)",
        links=(("spec", "/spec/dora.md#3-forward-forward"), ("dora.forward", "/ref/refimpl.dora.forward")),
    ),
    Control(
        "nf4",
        "QLoRA (NF4 base)",
        "bool",
        False,
        help="frozen base stored as NF4",
        links=(("spec", "/spec/nf4.md#1-nf4-codebook"), ("base", "/ref/refimpl.lab.train.quantize_base_nf4")),
    ),
    Control(
        "seed",
        "seed",
        "int",
        0,
        0,
        2**31 - 1,
        step=1,
        help="data, init, batches and dropout",
        links=(("streams", "/ref/refimpl.lab.train.train_adapter"),),
    ),
)
CONTROL_BY_NAME = {c.name: c for c in CONTROLS}

#: the lesson's failure modes, planted as in tests/test_lab_diagnose.py (seed 0)
FAILURE_MODES: dict[str, dict[str, Any]] = {
    "healthy": {
        "task": "facts",
        "examples": 2000,
        "layers": "all",
        "rank": 16,
        "dropout": 0.05,
        "weight_decay": 0.01,
        "steps": 200,
    },
    "rank_too_low": {
        "task": "facts",
        "examples": 2000,
        "layers": "all",
        "rank": 1,
        "dropout": 0.05,
        "weight_decay": 0.01,
        "steps": 200,
    },
    "wrong_layers": {
        "task": "position",
        "examples": 100,
        "layers": "ffn",
        "rank": 16,
        "dropout": 0.05,
        "weight_decay": 0.01,
        "steps": 300,
    },
    "overfitting": {
        "task": "facts",
        "examples": 200,
        "layers": "all",
        "rank": 32,
        "dropout": 0.0,
        "weight_decay": 0.0,
        "steps": 200,
    },
}

#: functions and classes the page links to (``/ref/<name>`` serves only these)
REF_NAMES = sorted(
    {href[len("/ref/") :] for c in CONTROLS for _, href in c.links if href.startswith("/ref/")}
    | {
        "refimpl.lab.diagnose.diagnose",
        "refimpl.lab.train.evaluate",
        "refimpl.lab.serve.merge_adapters",
        "refimpl.lab.serve.tree_path",
        "refimpl.merging.linear",
        "refimpl.merging.task_arithmetic",
        "refimpl.merging.ties",
        "refimpl.merging.dare",
        "refimpl.lab.model.merged_base",
        "refimpl.lab.serve.peft_adapter_files",
        "refimpl.lab.train.train_adapter",
    }
)


class ParamError(ValueError):
    """A bad request parameter; ``field`` names it (the 400's JSON carries both)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


def _number(c: Control, v: Any) -> float:
    if isinstance(v, bool) or v is None:
        raise ParamError(c.name, f"expected a number, got {v!r}")
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise ParamError(c.name, f"expected a number, got {v!r}") from None
    if not isinstance(v, int | float) or not math.isfinite(v):
        raise ParamError(c.name, f"expected a finite number, got {v!r}")
    if c.kind == "int":
        if float(v) != int(v):
            raise ParamError(c.name, f"expected an integer, got {v!r}")
        v = int(v)
    if not (c.low <= v <= c.high):
        raise ParamError(c.name, f"expected a value in [{c.low:g}, {c.high:g}], got {v!r}")
    return v


def parse_params(raw: Any) -> dict[str, Any]:
    """Check a run's parameters (a JSON object, missing fields take their defaults); ParamError names the field."""
    if not isinstance(raw, dict):
        raise ParamError("params", f"expected a JSON object, got {type(raw).__name__}")
    for k in raw:
        if k not in CONTROL_BY_NAME:
            raise ParamError(str(k), f"unknown field (expected one of {', '.join(CONTROL_BY_NAME)})")
    out: dict[str, Any] = {}
    for c in CONTROLS:
        v = raw.get(c.name, c.default)
        if c.kind in ("int", "float"):
            out[c.name] = _number(c, v)
        elif c.kind == "bool":
            if not isinstance(v, bool):
                raise ParamError(c.name, f"expected true or false, got {v!r}")
            out[c.name] = v
        else:
            values = [value for value, _ in c.choices]
            if v not in values:
                raise ParamError(c.name, f"expected one of {', '.join(values)}, got {v!r}")
            out[c.name] = v
    if out["alpha"] == 0:
        out["alpha"] = 2.0 * out["rank"]
    return out


# --------------------------------------------------------------------------- the training loop


def stream_train(
    base: dict[str, np.ndarray],
    config: M.ModelConfig,
    acfg: M.AdapterConfig,
    train: Dataset,
    val: Dataset,
    tcfg: TrainConfig,
    on_point: Callable[[dict[str, float]], None],
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[dict[str, np.ndarray], Curve, bool]:
    """``train_adapter`` with its per-point callback and stop flag: (adapter, curve, stopped)."""
    res = train_adapter(base, config, acfg, train, val, tcfg, on_point=on_point, should_stop=should_stop)
    return res.adapter, res.curve, res.stopped


def eval_every(steps: int) -> int:
    """Points are recorded every 20 steps (as in the experiments), more often for short runs."""
    return max(1, min(20, steps // 10))


def tree_path(evidence: dict[str, float], label: str) -> list[dict[str, Any]]:
    """The run's path through the lesson's decision tree (``diagnose``'s tests, in order, with its
    default thresholds): one entry per question asked, with the figure, the threshold and the answer."""
    defaults = {
        k: p.default
        for k, p in inspect.signature(diagnose).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    gap_growth = evidence["gap_end/ref"] - evidence["gap_start/ref"]
    questions = [
        ("flat", "train_end/ref", evidence["train_end/ref"], defaults["flat_fraction"], "rank_too_low"),
        ("mediocre", "val_min/ref", evidence["val_min/ref"], defaults["mediocre_fraction"], "wrong_layers"),
        ("gap", "gap growth/ref", gap_growth, defaults["gap_fraction"], "overfitting"),
    ]
    path = []
    for node, figure, value, threshold, leaf in questions:
        yes = value > threshold
        if node == "flat":  # or: the slope reaches ~0 early (plateau_start <= early_fraction) at a high level
            start = evidence.get("plateau_start", 1.0)
            early = start <= defaults["early_fraction"] and value > defaults["plateau_fraction"]
            yes = yes or early
            path.append(
                {
                    "node": node,
                    "figure": figure,
                    "value": value,
                    "threshold": threshold,
                    "yes": yes,
                    "plateau": {
                        "figure": "plateau_start",
                        "value": start,
                        "early": defaults["early_fraction"],
                        "level": defaults["plateau_fraction"],
                        "yes": early,
                    },
                }
            )
        elif node == "gap":
            rise = evidence["val_rise/ref"]
            yes = yes or rise > defaults["rise_fraction"]
            path.append(
                {
                    "node": node,
                    "figure": figure,
                    "value": value,
                    "threshold": threshold,
                    "yes": yes,
                    "also": {"figure": "val_rise/ref", "value": rise, "threshold": defaults["rise_fraction"]},
                }
            )
        else:
            path.append({"node": node, "figure": figure, "value": value, "threshold": threshold, "yes": yes})
        if yes:
            path.append({"node": leaf})
            break
    else:
        path.append({"node": "healthy"})
    if path[-1]["node"] != label:
        raise AssertionError(f"tree_path: the path ends at {path[-1]['node']}, diagnose said {label}")
    return path


# --------------------------------------------------------------------------- state


class _Bases:
    """The pretrained base (and its NF4 copy), built once per process under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[bool, tuple[M.ModelConfig, dict[str, np.ndarray]]] = {}

    def ready(self) -> bool:
        return False in self._cache

    def get(self, nf4: bool) -> tuple[M.ModelConfig, dict[str, np.ndarray]]:
        with self._lock:
            if nf4 not in self._cache:
                from refimpl.lab.experiments import lab_model
                from refimpl.lab.train import quantize_base_nf4

                cfg, base = self._cache[False] if False in self._cache else lab_model()
                self._cache[False] = (cfg, base)
                if nf4:
                    self._cache[True] = (cfg, quantize_base_nf4(base, cfg))
            return self._cache[nf4]


@dataclass(eq=False)
class Run:
    """One adapter training run of a session."""

    id: str
    session: Session
    params: dict[str, Any]
    group: str = "sandbox"  # "sandbox" or "failure:<mode>"
    status: str = "queued"  # queued | running | done | stopped | error
    points: list[dict[str, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    adapter: dict[str, np.ndarray] | None = None
    scaling: float = 1.0
    diagnosis: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0
    trainable: int = 0
    created: float = field(default_factory=time.monotonic)

    def summary(self) -> dict[str, Any]:
        """What the page shows of the run (points travel separately)."""
        return {
            "id": self.id,
            "group": self.group,
            "status": self.status,
            "params": self.params,
            "diagnosis": self.diagnosis,
            "error": self.error,
            "seconds": round(self.seconds, 2),
            "trainable": self.trainable,
            "points": len(self.points),
        }

    def curve(self) -> dict[str, list]:
        keys = ("step", "train_loss", "val_loss", "train_acc", "val_acc")
        return {k: [p[k] for p in self.points] for k in keys}


class Session:
    """One open page: its runs and the ordered events its stream delivers."""

    def __init__(self, sid: str) -> None:
        self.id = sid
        self.runs: dict[str, Run] = {}
        self.events: list[tuple[int, str, str]] = []  # (seq, event name, JSON data)
        self.cond = threading.Condition()
        self.streams = 0
        self.closed = False
        self.last_detach = time.monotonic()

    def publish(self, name: str, data: dict[str, Any]) -> None:
        with self.cond:
            self.events.append((len(self.events) + 1, name, json.dumps(data)))
            self.cond.notify_all()

    def wait_events(self, after: int, timeout: float) -> list[tuple[int, str, str]]:
        with self.cond:
            if len(self.events) <= after:
                self.cond.wait(timeout)
            return self.events[after:]


class Lab:
    """Sessions, runs and the worker pool; everything the HTTP handler calls."""

    def __init__(self, max_runs: int = 2, tmpdir: str | None = None) -> None:
        if not isinstance(max_runs, int) or max_runs < 1:
            raise ValueError(f"max_runs: expected a positive integer, got {max_runs!r}")
        self.max_runs = max_runs
        self.pool = ThreadPoolExecutor(max_workers=max_runs, thread_name_prefix="lab-run")
        self.bases = _Bases()
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.active = 0  # runs queued or running
        self.tmp = Path(tempfile.mkdtemp(prefix="refimpl-lab-serve-", dir=tmpdir))
        self.closing = threading.Event()
        self._blas = contextlib.ExitStack()
        # one BLAS thread for the whole server: concurrent runs would otherwise undo each other's setting
        self._blas.enter_context(single_thread_blas())

    # -- sessions
    def new_session(self) -> Session:
        s = Session(secrets.token_hex(8))
        with self.lock:
            self.sessions[s.id] = s
        return s

    def session(self, sid: Any) -> Session:
        s = self.sessions.get(sid) if isinstance(sid, str) else None
        if s is None or s.closed:
            raise ParamError("session", f"unknown or closed session {sid!r}")
        return s

    def attach(self, s: Session) -> None:
        with s.cond:
            s.streams += 1

    def detach(self, s: Session) -> None:
        """A stream ended; if none comes back within CLOSE_GRACE_S, the tab is gone: close the session."""
        with s.cond:
            s.streams -= 1
            s.last_detach = time.monotonic()
        timer = threading.Timer(CLOSE_GRACE_S, self._close_if_orphaned, args=(s,))
        timer.daemon = True
        timer.start()

    def _close_if_orphaned(self, s: Session) -> None:
        with s.cond:
            orphaned = s.streams == 0 and time.monotonic() - s.last_detach >= CLOSE_GRACE_S * 0.99
        if orphaned:
            self.close_session(s)

    def close_session(self, s: Session) -> None:
        """Stop every run of the session and forget it."""
        s.closed = True
        for run in list(s.runs.values()):
            run.stop.set()
        with self.lock:
            self.sessions.pop(s.id, None)

    # -- runs
    def start_run(self, s: Session, params: dict[str, Any], group: str = "sandbox") -> Run:
        with self.lock:
            if self.active >= self.max_runs + MAX_QUEUED:
                raise OverflowError(
                    f"runs: {self.active} runs are queued or running (the limit is "
                    f"{self.max_runs} running + {MAX_QUEUED} queued); stop one or wait"
                )
            self.active += 1
        run = Run(id=secrets.token_hex(4), session=s, params=params, group=group)
        s.runs[run.id] = run
        s.publish("run", run.summary())
        self.pool.submit(self._execute, run)
        return run

    def _execute(self, run: Run) -> None:
        s = run.session
        t0 = time.perf_counter()
        try:
            if run.stop.is_set() or self.closing.is_set():
                run.status = "stopped"
                return
            run.status = "running"
            s.publish("run", run.summary())
            p = run.params
            cfg, base = self.bases.get(p["nf4"])
            from refimpl.lab.experiments import datasets

            train, val = datasets(p["task"], p["examples"], cfg, p["seed"])
            acfg = M.AdapterConfig(
                targets=M.resolve_targets(p["layers"], cfg),
                rank=p["rank"],
                alpha=p["alpha"],
                dropout=p["dropout"],
                dora=p["dora"],
            )
            tcfg = TrainConfig(
                steps=p["steps"],
                lr=p["lr"],
                weight_decay=p["weight_decay"],
                loraplus_ratio=p["loraplus_ratio"],
                seed=p["seed"],
                eval_every=eval_every(p["steps"]),
            )
            run.scaling = acfg.scaling

            def on_point(point: dict[str, float]) -> None:
                run.points.append(point)
                s.publish("point", {"run": run.id, **point})

            def should_stop() -> bool:
                return run.stop.is_set() or self.closing.is_set()

            adapter, curve, stopped = stream_train(base, cfg, acfg, train, val, tcfg, on_point, should_stop)
            run.adapter = adapter
            run.trainable = int(sum(v.size for v in adapter.values()))
            if len(curve.step) >= 3:
                d = diagnose(curve.train_loss, curve.val_loss, chance_loss=float(np.log(cfg.n_classes)))
                run.diagnosis = {
                    "label": d.label,
                    "reason": d.reason,
                    "fix": d.fix,
                    "evidence": d.evidence,
                    "path": tree_path(d.evidence, d.label),
                    "partial": stopped,
                }
            run.status = "stopped" if stopped else "done"
        except Exception as exc:  # reported to the page; the server goes on
            run.status = "error"
            run.error = f"{type(exc).__name__}: {exc}"
        finally:
            run.seconds = time.perf_counter() - t0
            with self.lock:
                self.active -= 1
            s.publish("run", run.summary())

    def run(self, s: Session, rid: Any) -> Run:
        r = s.runs.get(rid) if isinstance(rid, str) else None
        if r is None:
            raise ParamError("run", f"no run {rid!r} in this session")
        return r

    def status(self) -> dict[str, Any]:
        return {
            "base_ready": self.bases.ready(),
            "active": self.active,
            "max_runs": self.max_runs,
            "max_queued": MAX_QUEUED,
            "sessions": len(self.sessions),
        }

    def close(self) -> None:
        """Stop every run, wait for the workers, remove the temporary folder."""
        self.closing.set()
        for s in list(self.sessions.values()):
            self.close_session(s)
        self.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._blas.close()


# --------------------------------------------------------------------------- merging and export


def task_vector(base: dict[str, np.ndarray], run: Run) -> dict[str, np.ndarray]:
    """The adapter's update of each adapted weight, W' − W (s·BA for LoRA; DoRA's full change)."""
    if run.adapter is None:
        raise ParamError("run", f"run {run.id} has no trained adapter (status {run.status})")
    merged = M.merged_base(base, run.adapter, run.scaling)
    return {k: merged[k] - base[k] for k in merged if merged[k] is not base[k]}


def merge_adapters(
    lab: Lab, a: Run, b: Run, *, lam: float = 1.0, ties_density: float = 0.2, dare_density: float = 0.5, seed: int = 0
) -> dict[str, Any]:
    """Merge two adapters' task vectors (whole-model scope, as in the TIES paper) with ``refimpl.merging``
    and evaluate each merged model on both tasks and on the base task (accuracy and loss, 1000 examples)."""
    from refimpl import merging
    from refimpl.lab.experiments import datasets

    for name, r in (("a", a), ("b", b)):
        if r.adapter is None:
            raise ParamError(name, f"run {r.id} has no trained adapter (status {r.status})")
    if a.params["nf4"] != b.params["nf4"]:
        raise ParamError("b", "both adapters need the same base (both NF4 or both float64)")
    for name, v, low, high in (
        ("lam", lam, -4.0, 4.0),
        ("ties_density", ties_density, 0.01, 1.0),
        ("dare_density", dare_density, 0.01, 1.0),
        ("seed", seed, 0, 2**31 - 1),
    ):
        if isinstance(v, bool) or not isinstance(v, int | float) or not (low <= v <= high):
            raise ParamError(name, f"expected a number in [{low:g}, {high:g}], got {v!r}")
    cfg, base = lab.bases.get(a.params["nf4"])
    ta, tb = task_vector(base, a), task_vector(base, b)
    for k in set(ta) | set(tb):  # adapters on different layers: the other's update there is zero
        ta.setdefault(k, np.zeros_like(base[k]))
        tb.setdefault(k, np.zeros_like(base[k]))
    va, layout = merging.flatten_model(ta)
    vb, _ = merging.flatten_model(tb)
    methods = {
        "base": np.zeros_like(va),
        "A only": va,
        "B only": vb,
        "average": merging.linear([va, vb]),
        f"task arithmetic λ={lam:g}": merging.task_arithmetic([va, vb], lam=lam),
        f"TIES d={ties_density:g}": merging.ties([va, vb], density=ties_density, lam=lam),
        f"DARE d={dare_density:g}": merging.dare(
            [va, vb], density=dare_density, lam=lam, rng=np.random.default_rng(int(seed))
        ),
    }
    tasks = {
        f"A: {a.params['task']}": a.params["task"],
        f"B: {b.params['task']}": b.params["task"],
        "base task (pretrain)": "pretrain",
    }
    evals = {label: datasets(t, 10, cfg, 0)[1] for label, t in tasks.items()}
    rows = []
    for method, vec in methods.items():
        delta = merging.unflatten_model(vec, layout)
        model = {k: (v + delta[k] if k in delta else v) for k, v in base.items()}
        row: dict[str, Any] = {"method": method}
        for label, data in evals.items():
            loss, acc = evaluate(model, {}, cfg, data)
            row[label] = {"acc": round(acc, 4), "loss": round(loss, 4)}
        rows.append(row)
    return {
        "a": a.id,
        "b": b.id,
        "series": list(tasks),
        "rows": rows,
        "options": {"lam": lam, "ties_density": ties_density, "dare_density": dare_density, "seed": seed},
    }


def peft_adapter_files(run: Run, folder: Path) -> list[Path]:
    """Write the run's adapter as a PEFT folder: ``adapter_config.json`` and ``adapter_model.safetensors``
    (keys ``base_model.model.<layer>.lora_A.weight`` (r, in), ``lora_B.weight`` (out, r) and, for DoRA,
    ``lora_magnitude_vector`` (out,); float32, as PEFT saves them)."""
    from refimpl import io as rio

    if run.adapter is None:
        raise ParamError("run", f"run {run.id} has no adapter yet (status {run.status})")
    p = run.params
    tensors = {}
    for key, arr in run.adapter.items():
        layer, kind = key.rsplit(".", 1)
        name = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}[kind]
        tensors[f"base_model.model.{layer}.{name}"] = np.ascontiguousarray(arr, dtype=np.float32)
    targets = sorted({k.rsplit(".", 1)[0] for k in run.adapter})
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": "refimpl-lab-tiny-transformer",
        "r": p["rank"],
        "lora_alpha": p["alpha"],
        "lora_dropout": p["dropout"],
        "target_modules": targets,
        "use_dora": p["dora"],
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "adapter_config.json"
    cfg_path.write_text(json.dumps(config, indent=1))
    meta = {"run": run.id, "params": p, "base": "nf4" if p["nf4"] else "float64"}
    st = rio.save_tensors(folder / "adapter_model.safetensors", tensors, meta)
    return [cfg_path, st]


def export_run(lab: Lab, run: Run, fmt: str) -> tuple[bytes, str, str]:
    """(body, content type, file name) of an export: ``json`` or ``csv`` curves, ``peft`` adapter (a zip)."""
    stem = f"lab-run-{run.id}"
    if fmt == "json":
        body = {
            "run": run.id,
            "params": run.params,
            "status": run.status,
            "curve": run.curve(),
            "diagnosis": run.diagnosis,
        }
        return json.dumps(body, indent=1).encode(), "application/json", f"{stem}.json"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        c = run.curve()
        w.writerow(list(c))
        w.writerows(zip(*c.values(), strict=True))
        return buf.getvalue().encode(), "text/csv", f"{stem}.csv"
    if fmt == "peft":
        if run.adapter is None:
            raise ParamError("format", f"run {run.id} has no adapter yet (status {run.status})")
        folder = lab.tmp / f"{stem}-{secrets.token_hex(3)}"
        files = peft_adapter_files(run, folder)
        zbuf = io.BytesIO()
        with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as z:
            for f in files:
                z.write(f, f"{stem}-adapter/{f.name}")
        shutil.rmtree(folder, ignore_errors=True)
        return zbuf.getvalue(), "application/zip", f"{stem}-adapter.zip"
    raise ParamError("format", f"expected json, csv or peft, got {fmt!r}")


# --------------------------------------------------------------------------- reference pages


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lstrip("#").strip().lower())
    return text.replace(" ", "-")


def _page(title: str, body: str) -> bytes:
    return (
        f"<!doctype html><html lang=en><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<link rel=stylesheet href=/static/style.css><body class=ref><p><a href=/>← the lab</a></p>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>"
    ).encode()


def spec_page(name: str) -> bytes | None:
    """A spec/ Markdown page as HTML (headings carry GitHub-style anchors), or None where there is none."""
    if not re.fullmatch(r"[a-z0-9_]+\.md", name) or not (SPEC / name).is_file():
        return None
    lines = []
    for line in (SPEC / name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            lines.append(f'<b id="{_slug(line)}" class=h>{html.escape(line)}</b>')
        else:
            lines.append(html.escape(line))
    return _page(f"spec/{name}", "<pre class=src>" + "\n".join(lines) + "</pre>")


def ref_page(name: str) -> bytes | None:
    """The source of one of ``REF_NAMES`` with its file and line numbers, or None."""
    if name not in REF_NAMES:
        return None
    module_name, _, attr = name.rpartition(".")
    obj = getattr(importlib.import_module(module_name), attr)
    lines, first = inspect.getsourcelines(obj)
    path = inspect.getsourcefile(obj) or "?"
    rel = path.split("/refimpl/", 1)[-1] if "/refimpl/" in path else path
    numbered = "".join(f"<span class=ln>{first + i:4d}</span> {html.escape(t)}" for i, t in enumerate(lines))
    return _page(name, f"<p>refimpl/{html.escape(rel)}, line {first}</p><pre class=src>{numbered}</pre>")


# --------------------------------------------------------------------------- HTTP


def config_payload(lab: Lab) -> dict[str, Any]:
    """Everything the page needs to build itself: controls, failure modes, the tree's thresholds."""
    defaults = {
        k: p.default
        for k, p in inspect.signature(diagnose).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {
        "controls": [asdict(c) for c in CONTROLS],
        "failure_modes": FAILURE_MODES,
        "thresholds": defaults,
        "chance_loss": float(np.log(M.ModelConfig().n_classes)),
        "status": lab.status(),
        "spec_available": SPEC.is_dir(),
    }


class Handler(BaseHTTPRequestHandler):
    """Routes: the page and its assets, the JSON API, the event stream, reference pages."""

    server_version = "refimpl-lab"
    lab: Lab  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the terminal belongs to the user
        pass

    # -- responses
    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header(
            "Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"
        )
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj).encode(), "application/json")

    def _error(self, code: int, message: str, field_name: str | None = None) -> None:
        self._json(code, {"error": message, "field": field_name})

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise ParamError("body", f"expected at most {MAX_BODY} bytes, got {n}")
        raw = self.rfile.read(n) if n else b"{}"
        try:
            return json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise ParamError("body", "expected a JSON object") from None

    # -- dispatch
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [unquote(p) for p in url.path.split("/") if p]
        try:
            self._route(method, parts, query)
        except ParamError as exc:
            self._error(400, str(exc), exc.field)
        except OverflowError as exc:
            self._error(429, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, method: str, parts: list[str], q: dict[str, str]) -> None:
        lab = self.lab
        if method == "GET" and not parts:
            return self._static("index.html")
        if method == "GET" and parts[0] == "static" and len(parts) == 2:
            return self._static(parts[1])
        if method == "GET" and parts[0] == "spec" and len(parts) == 2:
            page = spec_page(parts[1])
            if page is None:
                return self._send(
                    404,
                    _page(
                        "not here",
                        f"<p>spec/{html.escape(parts[1])} is in the source "
                        "repository (spec/), not in this installation.</p>",
                    ),
                    "text/html",
                )
            return self._send(200, page, "text/html; charset=utf-8")
        if method == "GET" and parts[0] == "ref" and len(parts) == 2:
            page = ref_page(parts[1])
            if page is None:
                return self._send(404, _page("not here", "<p>no such reference</p>"), "text/html")
            return self._send(200, page, "text/html; charset=utf-8")
        if parts[0] != "api" or len(parts) < 2:
            return self._error(404, f"no such path {self.path}")
        api = parts[1:]
        if method == "GET" and api == ["config"]:
            return self._json(200, config_payload(lab))
        if method == "GET" and api == ["status"]:
            return self._json(200, lab.status())
        if method == "POST" and api == ["session"]:
            return self._json(200, {"session": lab.new_session().id})
        if method == "GET" and api == ["events"]:
            return self._events(lab.session(q.get("session")))
        if method == "POST" and len(api) == 3 and api[0] == "session" and api[2] == "close":
            s = lab.sessions.get(api[1])
            if s is not None:
                lab.close_session(s)
            return self._json(200, {"closed": api[1]})
        if method == "POST" and api == ["runs"]:
            body = self._body()
            s = lab.session(body.get("session") if isinstance(body, dict) else None)
            run = lab.start_run(s, parse_params(body.get("params", {})))
            return self._json(202, run.summary())
        if method == "POST" and api == ["failure-modes"]:
            body = self._body()
            s = lab.session(body.get("session") if isinstance(body, dict) else None)
            runs = [lab.start_run(s, parse_params(p), group=f"failure:{mode}") for mode, p in FAILURE_MODES.items()]
            return self._json(202, {"runs": [r.summary() for r in runs]})
        if method == "POST" and len(api) == 3 and api[0] == "runs" and api[2] == "stop":
            body = self._body()
            run = lab.run(lab.session(body.get("session") if isinstance(body, dict) else None), api[1])
            run.stop.set()
            return self._json(200, run.summary())
        if method == "GET" and len(api) == 3 and api[0] == "runs" and api[2] == "export":
            run = lab.run(lab.session(q.get("session")), api[1])
            body, ctype, fname = export_run(lab, run, q.get("format", "json"))
            return self._send(200, body, ctype, {"Content-Disposition": f'attachment; filename="{fname}"'})
        if method == "POST" and api == ["merge"]:
            body = self._body()
            if not isinstance(body, dict):
                raise ParamError("body", "expected a JSON object")
            s = lab.session(body.get("session"))
            a, b = lab.run(s, body.get("a")), lab.run(s, body.get("b"))
            opts = {k: body[k] for k in ("lam", "ties_density", "dare_density", "seed") if k in body}
            return self._json(200, merge_adapters(lab, a, b, **opts))
        return self._error(404, f"no such endpoint {method} {self.path}")

    def _static(self, name: str) -> None:
        types = {
            ".html": "text/html; charset=utf-8",
            ".js": "text/javascript; charset=utf-8",
            ".css": "text/css; charset=utf-8",
            ".svg": "image/svg+xml",
        }
        path = STATIC / name
        if not re.fullmatch(r"[a-z_-]+\.(html|js|css|svg)", name) or not path.is_file():
            return self._error(404, f"no such asset {name}")
        self._send(200, path.read_bytes(), types[path.suffix])

    def _events(self, s: Session) -> None:
        """Server-sent events of the session, from Last-Event-ID on; a ping each second keeps the
        stream honest, so a closed tab shows up as a failed write within a second or two."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        given = self.headers.get("Last-Event-ID") or "0"
        last = int(given) if given.isdigit() else 0
        self.lab.attach(s)
        try:
            self.wfile.write(b"retry: 1000\n\n")
            while not self.lab.closing.is_set() and not s.closed:
                chunk = [f"id: {seq}\nevent: {name}\ndata: {data}\n\n" for seq, name, data in s.wait_events(last, 1.0)]
                if chunk:
                    last += len(chunk)
                self.wfile.write(("".join(chunk) or ": ping\n\n").encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            pass
        finally:
            self.lab.detach(s)


class LabServer(ThreadingHTTPServer):
    """The HTTP server together with its :class:`Lab`; ``close()`` stops both."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, max_runs: int = 2, tmpdir: str | None = None):
        self.lab = Lab(max_runs=max_runs, tmpdir=tmpdir)
        handler = type("BoundHandler", (Handler,), {"lab": self.lab})
        try:
            super().__init__((host, port), handler)
        except OSError:
            self.lab.close()
            raise

    @property
    def url(self) -> str:
        # an AF_INET/AF_INET6 server's address starts (host: str, port: int); typeshed allows bytes for AF_UNIX
        host, port = cast("tuple[str, int]", self.server_address[:2])
        return f"http://{host}:{port}/"

    def warm(self) -> threading.Thread:
        """Pretrain the base in the background, so the first Train draws its first point at once."""
        t = threading.Thread(target=self.lab.bases.get, args=(False,), name="lab-warm", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.lab.close()


def serve(host: str = "127.0.0.1", port: int = 8000, max_runs: int = 2, warm: bool = True) -> int:
    """Run the server until Ctrl-C; prints its URL first."""
    try:
        srv = LabServer(host, port, max_runs=max_runs)
    except OSError as exc:
        print(f"refimpl lab serve: cannot listen on {host}:{port} ({exc.strerror or exc})", file=sys.stderr)
        return 2
    if warm:
        srv.warm()
    print(
        f"refimpl lab serve: {srv.url}  (Ctrl-C stops; {max_runs} concurrent runs; temporary folder {srv.lab.tmp})",
        flush=True,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"refimpl lab serve: listening on {host}, reachable beyond this machine; no authentication",
            file=sys.stderr,
            flush=True,
        )
    thread = threading.Thread(target=srv.serve_forever, name="lab-http", daemon=True)
    thread.start()

    def on_sigterm(signum: int, frame: Any) -> None:  # a terminated server cleans up as Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        print("refimpl lab serve: stopping", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        srv.close()
    return 0
