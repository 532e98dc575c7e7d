"""GPU memory needed to fine-tune a model: full fine-tuning, LoRA, QLoRA (and DoRA on either).

Reproduces the lesson's 65B table (full FT 780 GB, LoRA 160 GB, QLoRA 48 GB; ">780GB" and "<48GB" are
in the QLoRA paper's §1, Dettmers et al., arXiv 2305.14314, whose abstract says only "a single 48GB GPU";
160 GB is the lesson's own figure) from stated bytes per element; spec/memory.md has the
formulas and every assumption. 1 GB = 10⁹ bytes.

    total = weights + gradients + optimizer state          (trained parameters)
          + frozen base weights (+ quantization constants)  (LoRA / QLoRA)
          + activations kept for the backward pass

Activations follow Korthikanti et al. (arXiv 2205.05198, eq. 2) for 16-bit training without
recomputation: per layer s·b·h·(34 + 5·a·s/h) bytes; with gradient checkpointing only each
layer's 16-bit input (2·s·b·h bytes) is kept, plus one layer's full activations during recompute.
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


@dataclass(frozen=True)
class MemoryEstimate:
    method: str
    components_gb: dict[str, float]
    total_gb: float
    n_params: float
    trainable_params: float
    assumptions: tuple[str, ...] = field(default=())

    def table(self) -> str:
        rows = [f"{k:<28} {v:>9.2f} GB" for k, v in self.components_gb.items()]
        return "\n".join([*rows, f"{'total':<28} {self.total_gb:>9.2f} GB"])


def activation_bytes(model: ModelShape, *, mode: str, seq_len: int, batch: int) -> float:
    """Activation memory kept for backward, 16-bit, Korthikanti et al. eq. 2 (no sequence parallelism)."""
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
    weight_bytes: float | None = None,
    grad_bytes: float = 2.0,
    optimizer_bytes: float = 8.0,
    adapter_bytes: float = 4.0,
    adapter_grad_bytes: float = 4.0,
    blocksize: int = 64,
    double_quant: bool = True,
    activations: str = "none",
    seq_len: int = 512,
    batch: int = 1,
) -> MemoryEstimate:
    """Memory to fine-tune ``model`` with ``method`` ("full", "lora" or "qlora").

    full:  n·(weight_bytes + grad_bytes + optimizer_bytes)       defaults 2 + 2 + 8 = 12 B/param
    lora:  n·weight_bytes (frozen, 2 B) + p·(adapter_bytes + adapter_grad_bytes + optimizer_bytes)
    qlora: n·(4 bits + quantization constants) + the same adapter terms
    + activations ("none", "full" = no recomputation, "checkpointed"), seq_len × batch tokens.

    Quantization constants per weight: 32/blocksize bits (fp32 absmax), or with double
    quantization 8/blocksize + 32/(blocksize·256) bits (QLoRA §3, 0.127 bits at blocksize 64).
    ``n_params`` overrides the model's exact count (the lesson uses the nominal 65·10⁹).
    p = LoRA parameters at ``rank`` on every linear layer (+ DoRA magnitudes when ``dora``).
    Ranges (ValueError naming the argument otherwise): 1 ≤ rank ≤ min(hidden, ffn) of ``model``,
    1 ≤ n_params ≤ MAX_PARAMS, seq_len ≤ MAX_SEQ_LEN, batch ≤ MAX_BATCH.
    """
    _checks.choice(method, "method", METHODS)
    _checks.integer(rank, "rank", low=1, high=model.max_rank())
    _checks.boolean(dora, "dora")
    _checks.boolean(double_quant, "double_quant")
    _checks.integer(blocksize, "blocksize", low=1)
    for name, v in (("grad_bytes", grad_bytes), ("optimizer_bytes", optimizer_bytes),
                    ("adapter_bytes", adapter_bytes), ("adapter_grad_bytes", adapter_grad_bytes)):
        _checks.real(v, name, low=0.0)
    if dora and method == "full":
        raise ValueError("dora: expected False for method='full' (DoRA is an adapter), got True")
    n = float(model.n_params()) if n_params is None else _checks.real(n_params, "n_params", low=1.0,
                                                                                 high=MAX_PARAMS)
    act = activation_bytes(model, mode=activations, seq_len=seq_len, batch=batch)
    comp: dict[str, float] = {}
    notes = [f"model {model.name}: {model.n_params() / 1e9:.3f} B parameters by count; "
             f"{n / 1e9:.3f} B used", "1 GB = 1e9 bytes"]
    if method == "full":
        wb = 2.0 if weight_bytes is None else _checks.real(weight_bytes, "weight_bytes", low=0.0)
        comp["weights"] = n * wb
        comp["gradients"] = n * grad_bytes
        comp["optimizer state"] = n * optimizer_bytes
        trainable = n
        notes.append(f"every weight trained: {wb:g} B weight + {grad_bytes:g} B gradient + "
                     f"{optimizer_bytes:g} B optimizer state (Adam: two fp32 moments) per parameter")
    else:
        p = float(model.lora_params(rank) + (model.dora_magnitude_params() if dora else 0))
        trainable = p
        if method == "lora":
            wb = 2.0 if weight_bytes is None else _checks.real(weight_bytes, "weight_bytes", low=0.0)
            comp["frozen base weights"] = n * wb
            notes.append(f"frozen base in 16-bit: {wb:g} B per weight, no gradient or optimizer state")
        else:
            wb = 0.5 if weight_bytes is None else _checks.real(weight_bytes, "weight_bytes", low=0.0)
            const_bits = 8 / blocksize + 32 / (blocksize * 256) if double_quant else 32 / blocksize
            comp["frozen base weights (NF4)"] = n * wb
            comp["quantization constants"] = n * const_bits / 8
            notes.append(f"frozen base in NF4: {wb:g} B per weight + {const_bits:.4f} bits of absmax "
                         f"(blocksize {blocksize}, double quantization {double_quant})")
        comp["adapter weights"] = p * adapter_bytes
        comp["adapter gradients"] = p * adapter_grad_bytes
        comp["adapter optimizer state"] = p * optimizer_bytes
        notes.append(f"LoRA r={rank} on all 7 linear layers per block{' + DoRA magnitudes' if dora else ''}: "
                     f"{p / 1e6:.1f} M trainable; {adapter_bytes:g} B weight + {adapter_grad_bytes:g} B gradient "
                     f"+ {optimizer_bytes:g} B Adam state each")
    comp["activations"] = act
    notes.append(f"activations: {activations}" + ("" if activations == "none" else
                 f" (16-bit, seq_len {seq_len} x batch {batch}, Korthikanti et al. eq. 2)"))
    comp_gb = {k: v / GB for k, v in comp.items()}
    return MemoryEstimate(method=method, components_gb=comp_gb, total_gb=sum(comp_gb.values()), n_params=n,
                          trainable_params=trainable, assumptions=tuple(notes))


#: The lesson's 65B table and the settings that reproduce it (spec/memory.md explains each).
LESSON_65B: dict[str, tuple[float, dict[str, Any]]] = {
    "full": (780.0, {"activations": "none"}),
    "lora": (160.0, {"activations": "full"}),
    "qlora": (48.0, {"activations": "checkpointed"}),
}


def lesson_table() -> list[tuple[str, float, MemoryEstimate]]:
    """(method, lesson's figure in GB, our estimate) for full FT, LoRA and QLoRA on a nominal 65·10⁹ model."""
    return [(m, gb, estimate(m, n_params=65e9, **kw)) for m, (gb, kw) in LESSON_65B.items()]


def format_lesson_table() -> str:
    lines = [f"{'method':<8} {'lesson':>8} {'estimate':>9}  components (GB)"]
    for m, gb, est in lesson_table():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in est.components_gb.items() if v)
        lines.append(f"{m:<8} {gb:>6.0f} GB {est.total_gb:>6.1f} GB  {parts}")
    lines.append("assumptions:")
    seen: list[str] = []
    for _, _, est in lesson_table():
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
    ap = _Parser(prog="refimpl memory",
                 description="GPU memory needed to fine-tune a model: full fine-tuning, LoRA, QLoRA (and DoRA on "
                             "either). Without a method: the lesson's 65B table; with one: that method's estimate "
                             "for the LLaMA-65B shape, its components and assumptions (spec/memory.md). "
                             "1 GB = 1e9 bytes.",
                 epilog="exit codes: 0 success; 2 usage or input error; 3 internal error")
    ap.add_argument("method", nargs="?", choices=METHODS, help="one method; omit for the lesson's 65B table")
    ap.add_argument("--params", type=float, default=None,
                    help=f"number of parameters, 1..{MAX_PARAMS:g} (default: LLaMA-65B count)")
    ap.add_argument("--rank", type=int, default=64, help=f"LoRA rank, 1..{LLAMA_65B.max_rank()} (default 64)")
    ap.add_argument("--dora", action="store_true",
                    help="add DoRA's magnitude vectors to the trained parameters (lora and qlora only)")
    ap.add_argument("--activations", choices=ACTIVATIONS, default="none",
                    help="activations kept for the backward pass, 16-bit: none, full (no recomputation) or "
                         "checkpointed (gradient checkpointing) (default none)")
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
        est = estimate(args.method, n_params=args.params, rank=args.rank, dora=args.dora,
                       activations=args.activations, seq_len=args.seq_len, batch=args.batch)
    except (TypeError, ValueError) as exc:
        print(f"refimpl memory: {exc}", file=sys.stderr)
        return 2
    print(est.table())
    for a in est.assumptions:
        print(f"  - {a}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
