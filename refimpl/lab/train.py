"""Pretraining the base, training adapters, and the loss curves they produce."""

from __future__ import annotations

import csv
import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from refimpl import _checks
from refimpl.lab import model as M
from refimpl.lab._threads import single_thread_blas
from refimpl.lab.optim import AdamWConfig, adamw_step, init_state, learning_rates
from refimpl.lab.tasks import Dataset, make_dataset


@dataclass(frozen=True)
class Curve:
    """Losses and accuracies measured (eval mode, whole set) at each ``step``."""

    step: tuple[int, ...]
    train_loss: tuple[float, ...]
    val_loss: tuple[float, ...]
    train_acc: tuple[float, ...]
    val_acc: tuple[float, ...]

    def to_dict(self) -> dict[str, list]:
        return {k: list(v) for k, v in asdict(self).items()}

    def save(self, path: str | Path) -> Path:
        """Write the curve as CSV (``.csv``) or JSON (any other suffix)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        if p.suffix == ".csv":
            with p.open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(list(d))
                w.writerows(zip(*d.values(), strict=True))
        else:
            p.write_text(json.dumps(d, indent=1))
        return p


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    loraplus_ratio: float = 1.0
    eval_every: int = 20
    eval_size: int = 500
    warmup: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        _checks.integer(self.steps, "steps", low=1)
        _checks.integer(self.batch_size, "batch_size", low=1)
        _checks.integer(self.eval_every, "eval_every", low=1)
        _checks.integer(self.eval_size, "eval_size", low=1)
        _checks.integer(self.warmup, "warmup", low=0)
        _checks.integer(self.seed, "seed", low=0)
        AdamWConfig(lr=self.lr, weight_decay=self.weight_decay, loraplus_ratio=self.loraplus_ratio)


@dataclass
class TrainResult:
    adapter: dict[str, np.ndarray]
    curve: Curve
    seconds: float
    config: dict = field(default_factory=dict)
    stopped: bool = False  #: ``should_stop`` ended the run before ``tcfg.steps``


def evaluate(
    base: dict[str, np.ndarray],
    adapter: dict[str, np.ndarray],
    config: M.ModelConfig,
    data: Dataset,
    scaling: float = 1.0,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on ``data``, eval mode (no dropout)."""
    logits, _ = M.forward(base, adapter, config, data.ids, scaling=scaling)
    loss, _ = M.cross_entropy(logits, data.labels)
    return loss, float((logits.argmax(axis=1) == data.labels).mean())


def _progress(total: int, desc: str, enabled: bool):
    import sys

    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the `lab` extra; without it, train silently
        return None
    # the bar redraws itself with \r: only for a terminal, never into a log file or a pipe
    tty = sys.stderr is not None and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not (enabled and tty), leave=False, dynamic_ncols=True)


PRETRAIN_WEIGHT_DECAY = 0.1
# Label smoothing keeps the base's logits moderate, so the loss of the base on a new task is a few
# nats rather than ~8 (without it some adapter runs collapsed to chance in their first steps).
PRETRAIN_LABEL_SMOOTHING = 0.1


@functools.lru_cache(maxsize=8)
def _pretrained(config: M.ModelConfig, seed: int, steps: int, n_examples: int, world_seed: int, task: str):
    with single_thread_blas():
        return _pretrain_loop(config, seed, steps, n_examples, world_seed, task)


def _pretrain_loop(config: M.ModelConfig, seed: int, steps: int, n_examples: int, world_seed: int, task: str):
    rng = np.random.default_rng([seed, 1])
    base = M.init_base(config, rng)
    data = make_dataset(task, n_examples, config, np.random.default_rng([seed, 2]), world_seed=world_seed)
    opt = AdamWConfig(lr=3e-3, weight_decay=PRETRAIN_WEIGHT_DECAY)
    state = init_state(base)
    lrs = learning_rates(base, AdamWConfig(lr=opt.lr))
    for _ in range(steps):
        idx = rng.integers(0, n_examples, 128)
        logits, cache = M.forward(base, {}, config, data.ids[idx])
        _, d = M.cross_entropy(logits, data.labels[idx], label_smoothing=PRETRAIN_LABEL_SMOOTHING)
        gb, _ = M.backward(d, cache, base, config, need_base=True)
        adamw_step(base, gb, state, opt, lrs)
    for v in base.values():
        v.setflags(write=False)
    return base


def pretrain(
    config: M.ModelConfig,
    *,
    task: str = "pretrain",
    seed: int = 0,
    steps: int = 600,
    n_examples: int = 8000,
    world_seed: int = 0,
) -> dict[str, np.ndarray]:
    """Train every base weight on ``task`` (AdamW, lr 3e-3, weight decay 0.1, label smoothing 0.1, batch 128).

    Deterministic in its arguments and cached in-process; the returned arrays are read-only.
    """
    _checks.integer(seed, "seed", low=0)
    _checks.integer(steps, "steps", low=0)
    _checks.integer(n_examples, "n_examples", low=1)
    return dict(_pretrained(config, seed, steps, n_examples, world_seed, task))


def quantize_base_nf4(base: dict[str, np.ndarray], config: M.ModelConfig, blocksize: int = 64) -> dict[str, np.ndarray]:
    """QLoRA's frozen base: every linear weight stored as NF4 (refimpl.quant) and used dequantized."""
    from refimpl import quant

    out = dict(base)
    for name in config.linear_layers():
        w32 = np.ascontiguousarray(base[name], dtype=np.float32)
        packed, qstate = quant.quantize_4bit(w32, blocksize=blocksize, quant_type="nf4")
        out[name] = np.asarray(quant.dequantize_4bit(packed, qstate), dtype=np.float64).reshape(w32.shape)
    return out


def train_adapter(
    base: dict[str, np.ndarray],
    config: M.ModelConfig,
    acfg: M.AdapterConfig,
    train: Dataset,
    val: Dataset,
    tcfg: TrainConfig,
    *,
    progress: bool = False,
    desc: str = "train",
    on_point: Callable[[dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train only the adapter (base frozen) with AdamW (+ LoRA+ ratio, linear warmup over
    ``warmup`` steps) and record the curves.

    Minibatches are drawn with replacement-free epochs from ``default_rng([seed, 10])``; dropout
    masks from ``default_rng([seed, 11])``; the adapter init from ``default_rng([seed, 12])``.
    ``on_point`` receives each recorded point (step, train/val loss and accuracy) as it is measured;
    ``should_stop`` is asked before every step and ends the run early when it returns true.
    """
    with single_thread_blas():
        return _train_loop(base, config, acfg, train, val, tcfg, progress, desc, on_point, should_stop)


def _train_loop(base, config, acfg, train, val, tcfg, progress, desc, on_point, should_stop) -> TrainResult:
    t0 = time.perf_counter()
    batch_rng = np.random.default_rng([tcfg.seed, 10])
    drop_rng = np.random.default_rng([tcfg.seed, 11])
    adapter = M.init_adapter(base, config, acfg, np.random.default_rng([tcfg.seed, 12]))
    opt = AdamWConfig(lr=tcfg.lr, weight_decay=tcfg.weight_decay, loraplus_ratio=tcfg.loraplus_ratio)
    lrs = learning_rates(adapter, opt)
    state = init_state(adapter)
    n = train.ids.shape[0]
    bs = min(tcfg.batch_size, n)
    rec: dict[str, list] = {k: [] for k in ("step", "train_loss", "val_loss", "train_acc", "val_acc")}

    # curves are measured on fixed subsets (the first eval_size examples) to keep evaluation cheap
    train_eval = Dataset(train.ids[: tcfg.eval_size], train.labels[: tcfg.eval_size])
    val_eval = Dataset(val.ids[: tcfg.eval_size], val.labels[: tcfg.eval_size])

    def record(step: int) -> None:
        tl, ta = evaluate(base, adapter, config, train_eval, acfg.scaling)
        vl, va = evaluate(base, adapter, config, val_eval, acfg.scaling)
        point = dict(zip(rec, (step, tl, vl, ta, va), strict=True))
        for k, v in point.items():
            rec[k].append(v)
        if on_point is not None:
            on_point(point)

    record(0)
    bar = _progress(tcfg.steps, desc, progress)
    order = batch_rng.permutation(n)
    pos = 0
    stopped = False
    for step in range(1, tcfg.steps + 1):
        if should_stop is not None and should_stop():
            stopped = True
            break
        if pos + bs > n:
            order, pos = batch_rng.permutation(n), 0
        idx = order[pos : pos + bs]
        pos += bs
        masks = M.draw_dropout(adapter, config, bs, acfg.dropout, drop_rng)
        logits, cache = M.forward(
            base, adapter, config, train.ids[idx], scaling=acfg.scaling, dropout_masks=masks, dropout_p=acfg.dropout
        )
        _, d = M.cross_entropy(logits, train.labels[idx])
        _, ga = M.backward(d, cache, base, config, need_base=False)
        warm = min(1.0, step / tcfg.warmup) if tcfg.warmup else 1.0  # linear warmup of every group's lr
        adamw_step(adapter, ga, state, opt, {k: v * warm for k, v in lrs.items()} if warm < 1.0 else lrs)
        if step % tcfg.eval_every == 0 or step == tcfg.steps:
            record(step)
            if bar is not None:
                bar.set_postfix(train=f"{rec['train_loss'][-1]:.3f}", val=f"{rec['val_loss'][-1]:.3f}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    curve = Curve(**{k: tuple(v) for k, v in rec.items()})
    return TrainResult(
        adapter=adapter,
        curve=curve,
        seconds=time.perf_counter() - t0,
        config={"adapter": asdict(acfg), "train": asdict(tcfg)},
        stopped=stopped,
    )
