"""GPU memory needed to fine-tune a model: full fine-tuning, LoRA, QLoRA (and DoRA on either).

One set of stated assumptions for every method (spec/memory.md has the formulas and every input):

    GPU peak = weights (trained 16-bit, frozen 16-bit, or frozen NF4 + quantization constants)
             + adapters (LoRA/QLoRA: adapter weights in ``adapter_dtype``)
             + gradients (of every trained parameter, same precision as the trained weights)
             + optimizer states (AdamW: two fp32 moments = 8 B per trained parameter; 0 on the GPU when
               ``paged_optimizer``, reported as ``cpu_gb["paged optimizer states"]`` instead)
             + activations kept for the backward pass ("none", "full" = no recomputation, "checkpointed")

Activations follow Korthikanti et al. (arXiv 2205.05198, eq. 2), 16-bit, no tensor/sequence parallelism:
per layer s·b·h·(34 + 5·a·s/h) bytes; with gradient checkpointing each layer's 16-bit input (2·s·b·h
bytes) is kept, plus one layer's full activations during its recompute.

The lesson's 65B figures (780 / 160 / 48 GB; ">780GB" and "<48GB" are in the QLoRA paper's §1,
arXiv 2305.14314, 160 GB is the lesson's own) are each reproduced by a *different* assumption set:
``lesson_fits()`` names them; ``consistent_table()`` gives every method under one set. 1 GB = 10⁹ bytes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from refimpl import _checks

GB = 1e9
METHODS = ("full", "lora", "qlora")
ACTIVATIONS = ("none", "full", "checkpointed")
#: Upper limits of the inputs: far above any real model (10¹⁵ parameters, 16M-token sequences, batch 2²⁰),
#: low enough that a typo (``--rank 10**20``) is an error rather than a number.
MAX_PARAMS = 1e15
MAX_SEQ_LEN = 2**24
MAX_BATCH = 2**20


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer with a gated (SwiGLU) MLP, LLaMA-style."""

    name: str
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    vocab: int

    def __post_init__(self) -> None:
        # stored as Python ints, so the counts below cannot overflow as NumPy int64 would
        for f in ("n_layers", "hidden", "ffn", "n_heads", "vocab"):
            object.__setattr__(self, f, _checks.integer(getattr(self, f), f, low=1))

    def n_params(self) -> int:
        """Embedding + untied LM head + per layer (4h² attention + 3·h·f MLP + 2h norms) + final norm."""
        h, f = self.hidden, self.ffn
        return 2 * self.vocab * h + self.n_layers * (4 * h * h + 3 * h * f + 2 * h) + h

    def max_rank(self) -> int:
        """The largest LoRA rank every adapted layer allows: r ≤ min(in, out) = min(hidden, ffn)."""
        return min(self.hidden, self.ffn)

    def lora_params(self, rank: int) -> int:
        """LoRA on every linear layer (q, k, v, o, gate, up, down): r·(in + out) each."""
        h, f = self.hidden, self.ffn
        return self.n_layers * rank * (4 * 2 * h + 3 * (h + f))

    def dora_magnitude_params(self) -> int:
        """One magnitude per output row of every adapted linear layer."""
        h, f = self.hidden, self.ffn
        return self.n_layers * (4 * h + 2 * f + h)


#: LLaMA-65B (Touvron et al., arXiv 2302.13971, Table 2): 80 layers, hidden 8192, 64 heads, FFN 22016.
LLAMA_65B = ModelShape("llama-65b", n_layers=80, hidden=8192, ffn=22016, n_heads=64, vocab=32000)


ADAPTER_DTYPES = ("bf16", "fp16", "fp32")
#: bytes per adapter weight (and per adapter gradient) for each adapter dtype
ADAPTER_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0}
#: The component names of every estimate, in stacking order (each present, 0.0 where it does not apply).
COMPONENTS = ("weights", "quantization constants", "adapters", "gradients", "optimizer states", "activations")


@dataclass(frozen=True)
class MemoryEstimate:
    method: str
    components_gb: dict[str, float]
    total_gb: float
    n_params: float
    trainable_params: float
    assumptions: tuple[str, ...] = field(default=())
    #: memory kept off the GPU (paged optimizer states), not part of ``total_gb``
    cpu_gb: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        rows = [f"{k:<28} {v:>9.2f} GB" for k, v in self.components_gb.items()]
        rows.append(f"{'total (GPU peak)':<28} {self.total_gb:>9.2f} GB")
        rows += [f"{k + ' (CPU)':<28} {v:>9.2f} GB" for k, v in self.cpu_gb.items()]
        return "\n".join(rows)


def activation_bytes(model: ModelShape, *, mode: str, seq_len: int, batch: int) -> float:
    """Activation memory kept for backward, 16-bit, Korthikanti et al. eq. 2 (no sequence parallelism).

    "full": L·s·b·h·(34 + 5·a·s/h); "checkpointed": L·2·s·b·h + s·b·h·(34 + 5·a·s/h); "none": 0.
    """
    _checks.choice(mode, "activations", ACTIVATIONS)
    s = _checks.integer(seq_len, "seq_len", low=1, high=MAX_SEQ_LEN)
    b = _checks.integer(batch, "batch", low=1, high=MAX_BATCH)
    h, a = model.hidden, model.n_heads
    per_layer = s * b * h * (34 + 5 * a * s / h)
    if mode == "none":
        return 0.0
    if mode == "full":
        return model.n_layers * per_layer
    return model.n_layers * 2 * s * b * h + per_layer


def estimate(
    method: str,
    *,
    model: ModelShape = LLAMA_65B,
    n_params: float | None = None,
    rank: int = 64,
    dora: bool = False,
    adapter_dtype: str = "bf16",
    paged_optimizer: bool = False,
    activations: str = "checkpointed",
    seq_len: int = 512,
    batch: int = 1,
    weight_bytes: float | None = None,
    grad_bytes: float = 2.0,
    optimizer_bytes: float = 8.0,
    adapter_bytes: float | None = None,
    adapter_grad_bytes: float | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
) -> MemoryEstimate:
    """Peak GPU memory to fine-tune ``model`` with ``method`` ("full", "lora" or "qlora").

    full:  n·weight_bytes (2) + n·grad_bytes (2) + n·optimizer_bytes (8: AdamW, two fp32 moments)
    lora:  n·weight_bytes (2, frozen) + p·(adapter + adapter gradient + optimizer_bytes)
    qlora: n·(4 bits + quantization constants) + the same adapter terms
    + activations ("none", "full" = no recomputation, "checkpointed"), ``seq_len`` × ``batch`` tokens.

    ``adapter_dtype`` sets the adapter weight and gradient bytes (bf16/fp16: 2 + 2, fp32: 4 + 4; the
    explicit ``adapter_bytes``/``adapter_grad_bytes`` override it). ``paged_optimizer``: the optimizer states
    live in CPU-backed paged memory (QLoRA §3) and count in ``cpu_gb``, not in the GPU peak.
    Quantization constants per weight: 32/blocksize bits (fp32 absmax), or with double quantization
    8/blocksize + 32/(blocksize·256) bits (QLoRA §3, 0.127 bits at blocksize 64).
    ``n_params`` overrides the model's exact count (the lesson uses the nominal 65·10⁹).
    p = LoRA parameters at ``rank`` on every linear layer (+ DoRA magnitudes when ``dora``).
    Ranges (ValueError naming the argument otherwise): 1 ≤ rank ≤ min(hidden, ffn) of ``model``,
    1 ≤ n_params ≤ MAX_PARAMS, seq_len ≤ MAX_SEQ_LEN, batch ≤ MAX_BATCH.
    """
    _checks.choice(method, "method", METHODS)
    _checks.integer(rank, "rank", low=1, high=model.max_rank())
    _checks.boolean(dora, "dora")
    _checks.boolean(double_quant, "double_quant")
    _checks.boolean(paged_optimizer, "paged_optimizer")
    _checks.choice(adapter_dtype, "adapter_dtype", ADAPTER_DTYPES)
    _checks.integer(blocksize, "blocksize", low=1)
    ab = ADAPTER_BYTES[adapter_dtype] if adapter_bytes is None else adapter_bytes
    agb = ADAPTER_BYTES[adapter_dtype] if adapter_grad_bytes is None else adapter_grad_bytes
    for name, v in (
        ("grad_bytes", grad_bytes),
        ("optimizer_bytes", optimizer_bytes),
        ("adapter_bytes", ab),
        ("adapter_grad_bytes", agb),
    ):
        _checks.real(v, name, low=0.0)
    if dora and method == "full":
        raise ValueError("dora: expected False for method='full' (DoRA is an adapter), got True")
    n = float(model.n_params()) if n_params is None else _checks.real(n_params, "n_params", low=1.0, high=MAX_PARAMS)
    act = activation_bytes(model, mode=activations, seq_len=seq_len, batch=batch)
    comp = dict.fromkeys(COMPONENTS, 0.0)
    notes = [
        f"model {model.name}: {model.n_params() / 1e9:.3f} B parameters by count; {n / 1e9:.3f} B used",
        "1 GB = 1e9 bytes",
    ]
    if method == "full":
        wb = 2.0 if weight_bytes is None else _checks.real(weight_bytes, "weight_bytes", low=0.0)
        trainable = n
        comp["weights"] = n * wb
        comp["gradients"] = n * grad_bytes
        notes.append(
            f"every weight trained: {wb:g} B weight + {grad_bytes:g} B gradient + "
            f"{optimizer_bytes:g} B optimizer state (AdamW: two fp32 moments) per parameter"
        )
    else:
        p = float(model.lora_params(rank) + (model.dora_magnitude_params() if dora else 0))
        trainable = p
        if method == "lora":
            wb = 2.0 if weight_bytes is None else _checks.real(weight_bytes, "weight_bytes", low=0.0)
            comp["weights"] = n * wb
            notes.append(f"frozen base in 16-bit: {wb:g} B per weight, no gradient or optimizer state")
        else:
            wb = 0.5 if weight_bytes is None else _checks.real(weight_bytes, "weight_bytes", low=0.0)
            const_bits = 8 / blocksize + 32 / (blocksize * 256) if double_quant else 32 / blocksize
            comp["weights"] = n * wb
            comp["quantization constants"] = n * const_bits / 8
            notes.append(
                f"frozen base in NF4: {wb:g} B per weight + {const_bits:.4f} bits of absmax "
                f"(blocksize {blocksize}, double quantization {double_quant})"
            )
        comp["adapters"] = p * ab
        comp["gradients"] = p * agb
        notes.append(
            f"LoRA r={rank} on all 7 linear layers per block{' + DoRA magnitudes' if dora else ''}: "
            f"{p / 1e6:.1f} M trainable; adapters {adapter_dtype}: {ab:g} B weight + {agb:g} B gradient "
            f"+ {optimizer_bytes:g} B AdamW state (two fp32 moments) each"
        )
    opt = trainable * optimizer_bytes
    cpu: dict[str, float] = {}
    if paged_optimizer:
        cpu["paged optimizer states"] = opt / GB
        notes.append(
            "paged optimizer: AdamW states in CPU-backed paged memory, counted off the GPU peak "
            "(best case: evicted whenever the GPU needs the room)"
        )
    else:
        comp["optimizer states"] = opt
        notes.append("optimizer states resident on the GPU (not paged)")
    comp["activations"] = act
    notes.append(
        f"activations: {activations}"
        + ("" if activations == "none" else f" (16-bit, seq_len {seq_len} x batch {batch}, Korthikanti et al. eq. 2)")
    )
    comp_gb = {k: v / GB for k, v in comp.items()}
    return MemoryEstimate(
        method=method,
        components_gb=comp_gb,
        total_gb=sum(comp_gb.values()),
        n_params=n,
        trainable_params=trainable,
        assumptions=tuple(notes),
        cpu_gb=cpu,
    )


#: The lesson's 65B figures (full FT, LoRA, QLoRA).
LESSON_GB = {"full": 780.0, "lora": 160.0, "qlora": 48.0}
#: How close (relative) an estimate must be to count as reproducing one of the lesson's rounded figures.
LESSON_TOLERANCE = 0.02
#: The one assumption set used for every method in ``consistent_table`` (and the CLI's defaults): the QLoRA
#: paper's own setting — BF16 adapters, gradient checkpointing — with AdamW states resident on the GPU.
CONSISTENT: dict[str, Any] = {
    "adapter_dtype": "bf16",
    "activations": "checkpointed",
    "paged_optimizer": False,
    "seq_len": 512,
    "batch": 1,
}
#: The sets searched by ``assumption_grid``: adapter precision × activations × paged optimizer.
GRID_ADAPTERS = ("fp32", "bf16")
GRID_PAGED = (False, True)


def assumption_grid(
    *, n_params: float = 65e9, seq_len: int = 512, batch: int = 1
) -> list[tuple[dict[str, Any], dict[str, float]]]:
    """Every (adapter precision, activations, paged optimizer) set with the total GB of full, lora and qlora
    on a nominal ``n_params`` model (LLaMA-65B shape for adapters and activations), r = 64 on all layers."""
    out = []
    for adt in GRID_ADAPTERS:
        for act in ACTIVATIONS:
            for paged in GRID_PAGED:
                kw: dict[str, Any] = {
                    "adapter_dtype": adt,
                    "activations": act,
                    "paged_optimizer": paged,
                    "seq_len": seq_len,
                    "batch": batch,
                }
                out.append((kw, {m: estimate(m, n_params=n_params, **kw).total_gb for m in METHODS}))
    return out


def lesson_fits(tolerance: float = LESSON_TOLERANCE) -> dict[str, list[tuple[dict[str, Any], float]]]:
    """For each method, the assumption sets of ``assumption_grid`` whose total is within ``tolerance`` of the
    lesson's figure, with that total. No single set fits all three (spec/memory.md, table A)."""
    fits: dict[str, list[tuple[dict[str, Any], float]]] = {m: [] for m in METHODS}
    for kw, totals in assumption_grid():
        for m in METHODS:
            if abs(totals[m] / LESSON_GB[m] - 1.0) <= tolerance:
                fits[m].append((kw, totals[m]))
    return fits


#: The set the lesson's table was fitted with, row by row (each row a different activation assumption and
#: fp32 adapters): kept so the fit can be shown beside the consistent accounting.
LESSON_65B: dict[str, tuple[float, dict[str, Any]]] = {
    "full": (780.0, {"activations": "none", "adapter_dtype": "fp32"}),
    "lora": (160.0, {"activations": "full", "adapter_dtype": "fp32"}),
    "qlora": (48.0, {"activations": "checkpointed", "adapter_dtype": "fp32"}),
}


def lesson_table() -> list[tuple[str, float, MemoryEstimate]]:
    """(method, lesson's figure, the row-by-row fit) on a nominal 65·10⁹ model: three different assumption sets."""
    return [(m, gb, estimate(m, n_params=65e9, **kw)) for m, (gb, kw) in LESSON_65B.items()]


def consistent_table(**overrides: Any) -> list[tuple[str, float, MemoryEstimate]]:
    """(method, lesson's figure, estimate) on a nominal 65·10⁹ model, every method under ``CONSISTENT``
    (updated by ``overrides``)."""
    kw = {**CONSISTENT, **overrides}
    return [(m, LESSON_GB[m], estimate(m, n_params=65e9, **kw)) for m in METHODS]


def _describe(kw: dict[str, Any]) -> str:
    return (
        f"adapters {kw.get('adapter_dtype', 'bf16')}, activations {kw.get('activations', 'checkpointed')}, "
        f"optimizer {'paged' if kw.get('paged_optimizer') else 'resident'}"
    )


def format_lesson_table() -> str:
    """Table A (which assumption sets reproduce each lesson figure) and table B (one set for every method)."""
    grid = assumption_grid()
    lines = [
        "A. Total GB of a nominal 65e9-parameter model (LLaMA-65B shape), LoRA r=64 on all linear layers,",
        "   seq_len 512 x batch 1, AdamW (two fp32 moments); bf16 adapters = fp16 adapters (2 B each);",
        "   '*' = within 2 % of the lesson's figure (780 / 160 / 48 GB)",
        f"{'adapters':<9} {'activations':<13} {'optimizer':<9} {'full':>9} {'lora':>9} {'qlora':>9}",
    ]
    for kw, t in grid:
        cells = [f"{t[m]:>8.1f}{'*' if abs(t[m] / LESSON_GB[m] - 1) <= LESSON_TOLERANCE else ' '}" for m in METHODS]
        lines.append(
            f"{kw['adapter_dtype']:<9} {kw['activations']:<13} "
            f"{'paged' if kw['paged_optimizer'] else 'resident':<9} {' '.join(cells)}"
        )
    lines.append("   no single row fits all three: the lesson's table is fitted row by row (fp32 adapters;")
    lines.append("   activations none for full FT, full for LoRA, checkpointed for QLoRA):")
    for m, gb, est in lesson_table():
        lines.append(f"   {m:<6} lesson {gb:>4.0f} GB  fit {est.total_gb:>6.1f} GB  ({_describe(LESSON_65B[m][1])})")
    lines.append("")
    lines.append(f"B. One assumption set for every method: {_describe(CONSISTENT)}, seq_len 512 x batch 1")
    lines.append(f"{'method':<8} {'lesson':>8} {'estimate':>9}  components (GB)")
    for m, gb, est in consistent_table():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in est.components_gb.items() if v)
        lines.append(f"{m:<8} {gb:>5.0f} GB {est.total_gb:>6.1f} GB  {parts}")
    for m, _, est in consistent_table(paged_optimizer=True):
        lines.append(
            f"{m:<8} {'paged':>8} {est.total_gb:>6.1f} GB  on the GPU; "
            f"{est.cpu_gb['paged optimizer states']:.1f} GB optimizer states paged to CPU"
        )
    lines.append("assumptions:")
    seen: list[str] = []
    for _, _, est in consistent_table():
        for a in est.assumptions:
            if a not in seen:
                seen.append(a)
                lines.append(f"  - {a}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (exit 2), like the range errors below."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _check_options(args: argparse.Namespace, model: ModelShape) -> None:
    """ValueError/TypeError naming the command-line option when a number is out of its range. Checked with
    or without a method, so a value is never silently ignored."""
    _checks.integer(args.rank, "--rank", low=1, high=model.max_rank())
    _checks.integer(args.seq_len, "--seq-len", low=1, high=MAX_SEQ_LEN)
    _checks.integer(args.batch, "--batch", low=1, high=MAX_BATCH)
    if args.params is not None:
        _checks.real(args.params, "--params", low=1.0, high=MAX_PARAMS)


def _parser() -> argparse.ArgumentParser:
    """The ``refimpl memory`` argument parser."""
    ap = _Parser(
        prog="refimpl memory",
        description="Peak GPU memory needed to fine-tune a model: full fine-tuning, LoRA, QLoRA (and DoRA "
        "on either). Without a method: (A) which assumption sets reproduce each of the lesson's "
        "65B figures (780 / 160 / 48 GB) and (B) every method under one consistent set; with "
        "one: that method's estimate for the LLaMA-65B shape, its components and assumptions "
        "(spec/memory.md). 1 GB = 1e9 bytes.",
        epilog="exit codes: 0 success; 2 usage or input error; 3 internal error",
    )
    ap.add_argument("method", nargs="?", choices=METHODS, help="one method; omit for the lesson's 65B tables")
    ap.add_argument(
        "--params", type=float, default=None, help=f"number of parameters, 1..{MAX_PARAMS:g} (default: LLaMA-65B count)"
    )
    ap.add_argument("--rank", type=int, default=64, help=f"LoRA rank, 1..{LLAMA_65B.max_rank()} (default 64)")
    ap.add_argument(
        "--dora",
        action="store_true",
        help="add DoRA's magnitude vectors to the trained parameters (lora and qlora only)",
    )
    ap.add_argument(
        "--adapter-dtype",
        choices=ADAPTER_DTYPES,
        default=CONSISTENT["adapter_dtype"],
        help="precision of the adapter weights and their gradients: bf16 or fp16 (2 B each) or fp32 "
        f"(4 B each) (default {CONSISTENT['adapter_dtype']}, as in the QLoRA paper)",
    )
    ap.add_argument(
        "--paged",
        action="store_true",
        help="paged optimizer (QLoRA): AdamW states in CPU-backed memory, reported apart and left out of the GPU peak",
    )
    ap.add_argument(
        "--activations",
        choices=ACTIVATIONS,
        default=CONSISTENT["activations"],
        help="activations kept for the backward pass, 16-bit: none, full (no recomputation) or "
        f"checkpointed (gradient checkpointing) (default {CONSISTENT['activations']})",
    )
    ap.add_argument("--seq-len", type=int, default=512, help=f"tokens per sequence, 1..{MAX_SEQ_LEN} (default 512)")
    ap.add_argument("--batch", type=int, default=1, help=f"sequences per batch, 1..{MAX_BATCH} (default 1)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """``refimpl memory``: the lesson's 65B table, or one estimate. Exit 2 on an invalid option."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        _check_options(args, LLAMA_65B)
    except (TypeError, ValueError) as exc:
        print(f"refimpl memory: {exc}", file=sys.stderr)
        return 2
    if args.method is None:
        print(format_lesson_table())
        return 0
    try:
        est = estimate(
            args.method,
            n_params=args.params,
            rank=args.rank,
            dora=args.dora,
            adapter_dtype=args.adapter_dtype,
            paged_optimizer=args.paged,
            activations=args.activations,
            seq_len=args.seq_len,
            batch=args.batch,
        )
    except (TypeError, ValueError) as exc:
        print(f"refimpl memory: {exc}", file=sys.stderr)
        return 2
    print(est.table())
    for a in est.assumptions:
        print(f"  - {a}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
