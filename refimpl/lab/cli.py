"""``refimpl lab``: train one adapter, or run one of the lesson's experiments.

    refimpl lab train --rank 8 --alpha 16 --layers all --dropout 0.05 --weight-decay 0.01 --examples 2000
    refimpl lab experiment rank|layers|overfit|merge|loraplus|memory [--out DIR]
    refimpl lab serve [--port 8000] [--host 127.0.0.1]     (the lesson's sandbox as a local web page)

(also ``python -m refimpl.lab.cli ...``)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

#: The exit codes of every ``refimpl lab`` command (an unexpected exception is turned into 3 by ``refimpl``).
EXIT_CODES = "exit codes: 0 success; 2 usage or input error; 3 internal error"
INSTALL_HINT = "pip install 'refimpl[lab]'"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="refimpl lab",
        description="The LoRA teaching lab (tiny NumPy transformer): "
        "train one adapter, run one of the lesson's experiments, or serve the sandbox page.",
        epilog=EXIT_CODES,
    )
    sub = ap.add_subparsers(dest="command", required=True, help="the lab command (each has its own --help)")
    t = sub.add_parser(
        "train",
        help="train one adapter and save its curves (CSV, JSON, PNG)",
        description="Train one adapter on the lab's pretrained tiny transformer and write its loss "
        "curves (curves.csv, curves.json, curves.png) and summary.json, with a "
        "diagnosis of the curves. Needs matplotlib (" + INSTALL_HINT + ").",
        epilog=EXIT_CODES,
    )
    t.add_argument(
        "--task",
        default="facts",
        help="the synthetic task: facts | position | facts_low | facts_high | bag_facts (default facts)",
    )
    t.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    t.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scaling alpha/r (default 16)")
    t.add_argument(
        "--layers",
        default="all",
        help='adapted layers: "qv", "attn", "ffn", "all" or a comma list such as q,v,up (default all)',
    )
    t.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout probability (default 0.05)")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    t.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 0.003)")
    t.add_argument(
        "--loraplus-ratio",
        type=float,
        default=1.0,
        help="learning rate of B = ratio x lr (LoRA+; default 1, plain LoRA)",
    )
    t.add_argument("--examples", type=int, default=2000, help="training examples (default 2000)")
    t.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    t.add_argument("--batch-size", type=int, default=64, help="examples per step (default 64)")
    t.add_argument("--dora", action="store_true", help="DoRA adapters (refimpl.dora)")
    t.add_argument("--nf4", action="store_true", help="QLoRA: NF4 frozen base weights (refimpl.quant)")
    t.add_argument("--rslora", action="store_true", help="scaling alpha/sqrt(r) (rsLoRA) instead of alpha/r")
    t.add_argument(
        "--seed", type=int, default=0, help="seed of the data, adapter init, batches and dropout (default 0)"
    )
    t.add_argument("--out", default="lab-out/train", help="folder for the curves and summary (default lab-out/train)")
    t.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it is shown only when stderr is a terminal)"
    )
    from refimpl.lab.experiments import EXPERIMENTS

    e = sub.add_parser(
        "experiment",
        help="run one of the lesson's experiments",
        description="Run one of the lesson's experiments and write its results (results.json, "
        "CSV, PNG plots) under OUT/NAME/. Needs matplotlib (" + INSTALL_HINT + ").",
        epilog=EXIT_CODES,
    )
    e.add_argument(
        "name",
        choices=EXPERIMENTS,
        help="rank: rank 1 to 32; layers: which layers to adapt; overfit: dropout and weight decay "
        "against overfitting; merge: merging two adapters; loraplus: LoRA+ ratios; "
        "memory: the lesson's 65B memory table",
    )
    e.add_argument("--out", default="lab-out", help="parent folder of the results (default lab-out)")
    e.add_argument("--seed", type=int, default=0, help="seed of every run of the experiment (default 0)")
    e.add_argument("--quick", action="store_true", help="a smaller sweep (for tests)")
    v = sub.add_parser(
        "serve",
        help="the lesson's sandbox: a local web page over the lab (refimpl.lab.serve)",
        description="Serve the lesson's sandbox: a local web page that trains adapters, streams "
        "their curves, merges and exports them. Runs until Ctrl-C (exit 0).",
        epilog=EXIT_CODES + " (2 also when the address cannot be bound)",
    )
    v.add_argument("--port", type=int, default=8000, help="TCP port, 0 to 65535; 0 picks a free port (default 8000)")
    v.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind; anything beyond localhost must be asked for (default 127.0.0.1)",
    )
    v.add_argument("--max-runs", type=int, default=2, help="runs trained at once; more are queued (default 2)")
    v.add_argument("--no-warm", action="store_true", help="do not pretrain the base at start")
    return ap


def _missing_matplotlib(command: str) -> str | None:
    """The one-line message when matplotlib (needed for the plots) cannot be imported, else None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return (
            f"refimpl lab {command}: the plots need matplotlib, which cannot be imported ({exc}); "
            f"install the lab extra: {INSTALL_HINT}"
        )
    return None


def _train(args: argparse.Namespace) -> int:
    import numpy as np

    from refimpl.lab import model as M
    from refimpl.lab import plots
    from refimpl.lab.diagnose import diagnose
    from refimpl.lab.experiments import datasets
    from refimpl.lab.tasks import TASKS
    from refimpl.lab.train import TrainConfig, pretrain, quantize_base_nf4, train_adapter

    if args.task not in TASKS or args.task == "pretrain":
        raise ValueError(f"--task: expected one of {', '.join(t for t in TASKS if t != 'pretrain')}, got {args.task!r}")
    cfg = M.ModelConfig()
    base = pretrain(cfg)
    if args.nf4:
        base = quantize_base_nf4(base, cfg)
    acfg = M.AdapterConfig(
        targets=M.resolve_targets(args.layers, cfg),
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        dora=args.dora,
        use_rslora=args.rslora,
    )
    tcfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        loraplus_ratio=args.loraplus_ratio,
        seed=args.seed,
        eval_every=max(1, min(20, args.steps // 10)),
    )
    if args.examples < 1:
        raise ValueError(f"--examples: expected a positive integer, got {args.examples}")
    train, val = datasets(args.task, args.examples, cfg, args.seed)
    res = train_adapter(
        base,
        cfg,
        acfg,
        train,
        val,
        tcfg,
        progress=not args.no_progress,
        desc=f"{args.task} {args.layers} r={args.rank}",
    )
    out = Path(args.out)
    chance = float(np.log(cfg.n_classes))
    d = diagnose(res.curve.train_loss, res.curve.val_loss, chance_loss=chance) if len(res.curve.step) >= 3 else None
    files = [
        res.curve.save(out / "curves.csv"),
        res.curve.save(out / "curves.json"),
        plots.plot_curves(
            {f"{args.layers} r={args.rank}": res.curve},
            out / "curves.png",
            chance_loss=chance,
            title=f"task {args.task}: {args.layers}, r={args.rank}, "
            f"dropout {args.dropout}, wd {args.weight_decay}, {args.examples} examples",
        ),
    ]
    summary = {
        "config": res.config,
        "base": "nf4" if args.nf4 else "float64",
        "final": {k: v[-1] for k, v in res.curve.to_dict().items()},
        "diagnosis": None
        if d is None
        else {"label": d.label, "reason": d.reason, "fix": d.fix, "evidence": d.evidence},
        "seconds": res.seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    c = res.curve
    print(
        f"task {args.task}: {len(acfg.targets)} adapted layers, "
        f"{sum(v.size for v in res.adapter.values())} trainable parameters, {res.seconds:.1f} s"
    )
    print(
        f"final train loss {c.train_loss[-1]:.4f} (acc {c.train_acc[-1]:.3f}), "
        f"val loss {c.val_loss[-1]:.4f} (acc {c.val_acc[-1]:.3f}); chance {chance:.3f}"
    )
    print(f"diagnosis: {d}" if d is not None else "diagnosis: needs at least 3 curve points (more --steps)")
    print("wrote " + ", ".join(str(f) for f in [*files, out / "summary.json"]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    if args.command in ("train", "experiment"):
        missing = _missing_matplotlib(args.command)
        if missing is not None:  # checked before training, not after minutes of it
            print(missing, file=sys.stderr)
            return 2
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "serve":
            from refimpl.lab.serve import serve

            if not 0 <= args.port <= 65535:
                raise ValueError(f"--port: expected 0 to 65535, got {args.port}")
            if args.max_runs < 1:
                raise ValueError(f"--max-runs: expected a positive integer, got {args.max_runs}")
            return serve(args.host, args.port, max_runs=args.max_runs, warm=not args.no_warm)
        from refimpl.lab.experiments import run_experiment

        res = run_experiment(args.name, args.out, seed=args.seed, quick=args.quick)
    except (TypeError, ValueError) as exc:
        print(f"refimpl lab: {exc}", file=sys.stderr)
        return 2
    print(res.text)
    print(f"experiment {res.name}: {res.seconds:.1f} s; wrote " + ", ".join(str(f) for f in res.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
