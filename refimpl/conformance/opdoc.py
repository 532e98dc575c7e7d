"""The per-op reference of the target contract (docs/ops.md), generated from the op table.

For every conformance row: the reference's signature, what each argument means, what the op returns (its
annotation and the named outputs of the row's example case), the tolerance, the valid domain the properties
tier draws from, the special cases and the error the reference raises on each (what a conforming target must
raise too), and a link to the op's section of the spec. Everything but the argument meanings is read from the
rows and the reference at generation time; the meanings are ``ARGUMENTS`` below (a test checks that every
parameter of every row has one, and that docs/ops.md equals what this module writes).

    python -m refimpl.conformance.opdoc --write docs/ops.md     # regenerate
    python -m refimpl.conformance.opdoc --check docs/ops.md     # exit 1 if the page is stale
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

import numpy as np

from refimpl.conformance._values import flatten
from refimpl.conformance.table import OpSpec, op_table

_FLOAT_NAMES = '"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"'
_ARRAY = "float array (float64, float32, float16 or `ml_dtypes.bfloat16`)"
_ARRAYS = "float arrays (float64, float32, float16 or `ml_dtypes.bfloat16`)"

#: argument name -> what it means, for every op that has it (``OVERRIDES`` where one op differs)
ARGUMENTS: dict[str, str] = {
    "x": f"the input batch, {_ARRAY}, shape (..., in)",
    "W": f"the base weight, {_ARRAY}, shape (out, in), or (in, out) with `fan_in_fan_out=True`",
    "W_merged": "the merged weight (what `merge` returned), layout of W",
    "A": f"the LoRA down-projection, {_ARRAY}, shape (r, in)",
    "B": f"the LoRA up-projection, {_ARRAY}, shape (out, r)",
    "E": f"the embedding table, {_ARRAY}, shape (V, d)",
    "ids": "integer token ids, any shape, each in [0, V)",
    "m": f"the DoRA magnitude vector, {_ARRAY}, shape (out,) ((d,) for an embedding)",
    "scaling": "s, the adapter's scale (α/r, or α/√r with rsLoRA): a finite real number",
    "bias": "the layer bias, shape (out,), or None",
    "dropout_mask": "the 0/1 keep mask of x's shape for the LoRA branch (training), or None for eval mode",
    "dropout_p": "the dropout probability p in [0, 1): kept entries are scaled by 1 / (1 − p); used with a mask",
    "fan_in_fan_out": "True when W is stored (in, out), as GPT-2's Conv1D; a weight result (ΔW, W') comes back in "
    "that layout",
    "grad_y": "∂L/∂y, the gradient of the layer output, shape (..., out)",
    "dtype": f"None (exact float64 result), or the base weight's storage format: a dtype or one of the names "
    f"{_FLOAT_NAMES}; the result is rounded to it (ties to even, one correct rounding from float64; float8_e4m3fn "
    "overflow gives NaN, as ml_dtypes) and returned as float64 holding that format's values",
    "safe": "with a storage `dtype`: False rounds once, round(W + ΔW); True rounds ΔW to `dtype` first, "
    "round(W + round(ΔW)) (PEFT's `safe_merge`); ignored without `dtype`",
    "embedding": "True when W is an embedding table E (V, d), A (r, V), B (d, r): norms run over the vocabulary",
    "unmerged_base": "the bare base weight when W already holds earlier merged adapters (norms against it), or None",
    "weight_norm": "‖W_base + ΔW‖ per output row, as `dora.merge` returned it",
    "mode": '"detached" (the norm is a constant, paper §4.3 and PEFT) or "full" (its gradient flows)',
    "need_dW": "also return ∂L/∂W (frozen in LoRA training, so off by default)",
    "need_dbias": "also return ∂L/∂b",
    "adapters": "a sequence of `refimpl.dora.DoraAdapter(A, B, m, scaling)`, applied in order",
    "alpha": "LoRA's α (a finite real)",
    "r": "the adapter rank, an int ≥ 1",
    "use_rslora": "rsLoRA scaling α/√r instead of α/r",
    "in_features": "the layer's input size (V for an embedding)",
    "out_features": "the layer's output size (d for an embedding)",
    "lora_bias": "count a trainable bias on B (PEFT `lora_bias`)",
    "dora": "count DoRA's magnitude vector too",
    "layers": "the model's linear layers, {name: (out, in)}",
    "target_modules": '"all-linear", or layer names matched as PEFT matches them (equal, or a suffix after a dot)',
    "method": '"default", "gaussian", "pissa" or "olora" (PEFT `init_lora_weights`)',
    "rng": "a `numpy.random.Generator`, the source of every random draw (the harness passes a seeded one)",
    "shape": "the shape of the mask(s) to draw, a sequence of ints",
    "p": "the drop probability in [0, 1)",
    "packed": "the 4-bit codes, uint8, two per byte, high nibble first, shape ((n + 1) // 2, 1)",
    "state": "a `refimpl.quant.QuantState` (docs/targets.md §3): shape, dtype, blocksize, quant_type, absmax, code, "
    "and the nested fields with double quantization",
    "profile": 'the peer rules to follow (quant: "reference", "bitsandbytes-cpu", "bitsandbytes-cuda"; None is the '
    "state's); docs/targets.md §4",
    "accumulate": "the dtype sums are accumulated in (default: `dtype`)",
    "name": '"nf4", "fp4" or "dynamic8"',
    "blocksize": "elements per absmax block: 32, 64, 128, ..., 4096 (a power of two)",
    "quant_type": '"nf4" or "fp4"',
    "double_quant": "store the block absmax as 8-bit codes with nested statistics (QLoRA double quantization)",
    "nonfinite": '"raise" (ValueError on NaN/±inf in x), "propagate" (the profile\'s special-value rules), or None: '
    '"raise" in the reference profile, "propagate" in a peer profile',
    "threads": "torch's CPU thread count where bitsandbytes ran (the bitsandbytes-cpu offset of nested states "
    "with more than 32,768 blocks)",
    "nibbles": "4-bit codes, integers in [0, 15], any shape (flattened in C order)",
    "pad": "the nibble that fills the last byte of an odd count, in [0, 15]",
    "n": "the number of 4-bit codes to unpack",
    "codes": "the 8-bit codes, uint8",
    "absmax": "the float32 block scales, one per block",
    "nested_blocksize": "blocks per nested (second-level) absmax with double quantization",
    "ulps": "how many float32 ulps from a rounding threshold a difference may lie and still be admissible",
    "finetuned": "the fine-tuned weights θ_t: an array, or a mapping name -> array (a state dict)",
    "base": "the base weights θ₀, the same kind as `finetuned`",
    "task_vectors": f"the task vectors τ_t, a list of {_ARRAYS} of one shape and dtype",
    "tensors": "the full weights θ_t to average (a list of float arrays of one shape and dtype)",
    "weights": "one finite weight w_t per task (sequence or 1-D array), or None for all ones",
    "lam": "λ, the scale of the merged task vector (a finite real; negative negates)",
    "normalize": "divide by Σ_t w_t (ValueError where |Σ_t w_t| < 1e-8)",
    "density": "the keep fraction d in (0, 1], one for all tasks or one per task",
    "k_rule": '"threshold" (official TIES), "floor" (PEFT), "floor_min1" (mergekit) or "mask_rate" (MergeLM): how '
    "many entries a trim keeps (None: the profile's)",
    "rescale": 'after the trim or drop: "inverse" (1/d, DARE only), "l1" (mergekit\'s L1 norm match) or "none" '
    "(None: the profile's)",
    "elect": '"sum" (mass) or "count" (frequency) sign election (None: the profile\'s)',
    "zero_sign": 'the sign a zero score elects: "positive", "global_majority" or "global_majority_zero" (None: the '
    "profile's)",
    "weight_stage": '"before_election" (mergekit) or "after_election" (PEFT, paper): where w_t applies (None: the '
    "profile's)",
    "divisor": '"count", "weight_sum" or "none": what the disjoint merge divides by (None: the profile\'s)',
    "masks": "DARE keep masks, one bool array of the task vectors' shape per task, or None to draw them with `rng`",
    "merge": '"linear" (dare_linear) or "ties" (dare_ties)',
    "ties_density": 'the trim density of the TIES step of `merge="ties"` (None: the profile\'s)',
    "count": "the number of masks to draw (one per task)",
    "t": "the interpolation parameter (0 gives v0, 1 gives v1)",
    "v0": f"the base tensor, {_ARRAY}",
    "v1": "the other tensor, v0's shape and dtype",
    "dot_threshold": "above this |cos Ω| SLERP falls back to linear interpolation",
    "eps": "a tensor whose norm is ≤ eps is not normalized (its norm counts as 1), as in mergekit",
    "As": "the adapters' A_i (r_i, in), a list",
    "Bs": "the adapters' B_i (out, r_i), a list of the same length",
    "scalings": "one scale s_i per adapter",
    "adapter_index": "one adapter index per token, an integer array of shape (T,), each in [-1, n); -1 is the bare "
    "base layer",
    "rank": "the rank of the result (None: the largest r_i)",
    "split": '"B" (B = U S, A = Vᵀ, PEFT) or "sqrt" (√S on both, mergekit)',
    "clamp": "the quantile q in (0, 1] both factors are clipped to (PEFT `svd_clamp`), or None",
    "delta": "ΔW, a float array (out, in)",
    "tau": "one task vector (or one flattened model), a float array",
    "mask": "a bool keep mask of tau's shape",
    "trimmed": "the trimmed task vectors τ̂_t: a list, or a (T, ...) stack",
    "remove_keys": "keys to drop (tied copies)",
    "kernel_size": "a ConvNd kernel's sizes, () for a linear layer",
    "groups": "the ConvNd's groups",
}

#: "op.arg" -> meaning, where an op's argument differs from ``ARGUMENTS``
OVERRIDES: dict[str, str] = {
    "lora.forward_batched.x": f"the tokens, {_ARRAY}, shape (T, in)",
    "lora.forward_batched.adapters": "the adapters, a sequence of (A_i (r_i, in), B_i (out, r_i), s_i) triples; ranks "
    "and scalings may differ, and the sequence may be empty when every index is -1",
    "qlora.forward_error_bound.dtype": "the dtype the bounded computation rounds each stored result to (a name such "
    'as "float32" or "bfloat16")',
    "quant.quantize_4bit.x": "the tensor to quantize: float32, float16 or bfloat16 (float64 only in the reference "
    "profile), any shape; blocks run over the flattened tensor",
    "quant.quantize_blockwise_8bit.x": "the tensor to quantize: a float array, any shape",
    "quant.check_4bit.x": "the input that was quantized (float32, float16 or bfloat16)",
    "quant.check_4bit.packed": "the codes the implementation under check produced",
    "quant.check_4bit.state": "the QuantState the implementation under check produced",
    "quant.check_4bit.profile": 'the rules to check against: "reference", "bitsandbytes-cpu" or "bitsandbytes-cuda"',
    "quant.quantize_4bit.profile": 'the rules to quantize by: "reference", "bitsandbytes-cpu" or "bitsandbytes-cuda"',
    "quant.quantize_blockwise_8bit.profile": '"reference", "bitsandbytes-cpu" or "bitsandbytes-cuda"',
    "quant.quantize_blockwise_8bit.blocksize": "elements per absmax block",
    "quant.storage_bits_per_parameter.blocksize": "elements per absmax block",
    "quant.dequantize_blockwise_8bit.blocksize": "elements per absmax block (as quantized)",
    "merging.ties.profile": '"paper", "peft", "mergekit" or "mergelm": the defaults of every option left None',
    "merging.magnitude_prune.profile": '"paper", "peft", "mergekit" or "mergelm": the defaults of every option left '
    "None",
    "merging.dare.profile": '"paper", "peft", "mergekit" or "mergelm": the defaults of every option left None',
    "merging.dare.normalize": 'divide by Σ_t w_t with `merge="linear"` (None: the profile\'s)',
    "merging.dare.rng": "a `numpy.random.Generator` that draws the masks when `masks` is None",
    "merging.dare_masks.rng": "a `numpy.random.Generator`; masks are drawn in task order",
    "merging.dare_masks.density": "the keep probability d_t in (0, 1], one for all or one per mask",
    "merging.trim_mask.density": "the keep fraction d in (0, 1]",
    "merging.elect_and_merge.weights": "one finite weight w_t per task",
    "merging.elect_and_merge.elect": '"sum" (mass) or "count" (frequency) sign election',
    "merging.elect_and_merge.zero_sign": 'the sign a zero score elects: "positive", "global_majority" or '
    '"global_majority_zero"',
    "merging.elect_and_merge.weight_stage": '"before_election" (mergekit) or "after_election" (PEFT, paper)',
    "merging.elect_and_merge.divisor": '"count", "weight_sum" or "none": what the disjoint merge divides by',
    "merging.trim_mask.k_rule": '"threshold" (official TIES), "floor" (PEFT), "floor_min1" (mergekit) or '
    '"mask_rate" (MergeLM)',
    "merging.linear.normalize": "divide by Σ_t w_t (ValueError where Σ_t w_t = 0); on by default",
    "merging.flatten_model.state": "a state dict, name -> array; its floating tensors are concatenated",
    "merging.lowrank_factors.rank": "the rank r of the factors, ≤ min(out, in)",
    "lora.init.W": f"the base weight, {_ARRAY}, shape (out, in) ((V, d) with `embedding=True`)",
    "lora.init.embedding": "W is an embedding table (V, d): A (r, V), B (d, r), and the init is reversed",
    "lora.init.alpha": "LoRA's α; the scale is α/r (α/√r with `use_rslora`)",
    "lora.init.rng": 'a `numpy.random.Generator`, required by "default" and "gaussian" (TypeError without one)',
    "lora.dropout_mask.rng": "a `numpy.random.Generator`",
    "dora.param_count.r": "the adapter rank, an int ≥ 1",
}

#: op -> (spec file, the start of the heading of its section)
SPEC: dict[str, tuple[str, str]] = {
    "lora.scaling": ("lora.md", "2. Scaling"),
    "lora.delta": ("lora.md", "1. Shapes and the delta"),
    "lora.forward": ("lora.md", "3. Forward"),
    "lora.backward": ("lora.md", "4. Backward"),
    "lora.forward_batched": ("lora.md", "11. Many adapters in one batch (`forward_batched`, the serving op)"),
    "lora.merge": ("lora.md", "6. Merge and unmerge"),
    "lora.unmerge": ("lora.md", "6. Merge and unmerge"),
    "lora.embedding_forward": ("lora.md", "Embedding"),
    "lora.param_count": ("lora.md", "7. Parameter counts"),
    "lora.model_param_count": ("lora.md", "7. Parameter counts"),
    "lora.init": ("lora.md", "5. Initialisation"),
    "lora.dropout_mask": ("lora.md", "3. Forward"),
    "qlora.forward": ("nf4.md", "13. QLoRA forward"),
    "qlora.backward": ("nf4.md", "13.1 QLoRA backward (QLoRA §3)"),
    "qlora.dequantized_weight": ("nf4.md", "13. QLoRA forward"),
    "qlora.dequantize_4bit": ("nf4.md", "5. Dequantization"),
    "qlora.forward_error_bound": ("nf4.md", "13. QLoRA forward"),
    "quant.codebook": ("nf4.md", "1. NF4 codebook"),
    "quant.quantize_4bit": ("nf4.md", "4. Quantization"),
    "quant.dequantize_4bit": ("nf4.md", "5. Dequantization"),
    "quant.pack_nibbles": ("nf4.md", "4. Quantization"),
    "quant.unpack_nibbles": ("nf4.md", "4. Quantization"),
    "quant.quantize_blockwise_8bit": ("nf4.md", "8. 8-bit blockwise"),
    "quant.dequantize_blockwise_8bit": ("nf4.md", "8. 8-bit blockwise"),
    "quant.storage_bits_per_parameter": ("nf4.md", "12. Storage cost"),
    "quant.check_4bit": ("nf4.md", "11. Checking an implementation"),
    "dora.weight_norm": ("dora.md", "2. Norm, direction, magnitude"),
    "dora.direction": ("dora.md", "2. Norm, direction, magnitude"),
    "dora.init_magnitude": ("dora.md", "2. Norm, direction, magnitude"),
    "dora.forward": ("dora.md", "3. Forward"),
    "dora.backward": ("dora.md", "4. Backward"),
    "dora.merge": ("dora.md", "5. Merge and unmerge"),
    "dora.unmerge": ("dora.md", "5. Merge and unmerge"),
    "dora.forward_sequential": ("dora.md", "6. Several DoRA adapters"),
    "dora.embedding_forward": ("dora.md", "7. Embedding"),
    "dora.param_count": ("dora.md", "9. Parameter count"),
    "merging.task_vector": ("merging.md", "2. Task vectors"),
    "merging.flatten_model": ("merging.md", "2. Task vectors"),
    "merging.task_arithmetic": ("merging.md", "3. Task arithmetic and linear"),
    "merging.linear": ("merging.md", "3. Task arithmetic and linear"),
    "merging.ties": ("merging.md", "4. TIES"),
    "merging.trim_mask": ("merging.md", "4.1 Trim"),
    "merging.elect_and_merge": ("merging.md", "4.2 Elect and disjoint merge"),
    "merging.magnitude_prune": ("merging.md", "5. DARE and magnitude prune"),
    "merging.dare": ("merging.md", "5. DARE and magnitude prune"),
    "merging.dare_masks": ("merging.md", "5. DARE and magnitude prune"),
    "merging.l1_rescaled": ("merging.md", "5. DARE and magnitude prune"),
    "merging.slerp": ("merging.md", "6. SLERP"),
    "merging.slerp_coefficients": ("merging.md", "6. SLERP"),
    "merging.lora_delta": ("merging.md", "7. LoRA-space merges"),
    "merging.lora_cat": ("merging.md", "7. LoRA-space merges"),
    "merging.lora_factor_linear": ("merging.md", "7. LoRA-space merges"),
    "merging.lora_svd": ("merging.md", "7. LoRA-space merges"),
    "merging.lowrank_factors": ("merging.md", "7. LoRA-space merges"),
}

ROOT = Path(__file__).resolve().parents[2]


def meaning(op: str, arg: str) -> str:
    """What argument ``arg`` of ``op`` means (KeyError where neither table has it)."""
    return OVERRIDES.get(f"{op}.{arg}") or ARGUMENTS[arg]


def _headings(text: str) -> list[str]:
    """The markdown headings of ``text`` (outside fenced code blocks), without their leading '#'s."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            out.append(line.lstrip("#").strip())
    return out


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return "".join(c for c in heading.lower() if c.isalnum() or c in " -_").replace(" ", "-")


def spec_link(op: str, spec_dir: Path | None = None) -> str:
    """A markdown link to the op's spec section (LookupError where the op or its heading is missing)."""
    if op not in SPEC:
        raise LookupError(f"{op}: no spec section in refimpl.conformance.opdoc.SPEC")
    file, start = SPEC[op]
    text = ((spec_dir or ROOT / "spec") / file).read_text(encoding="utf-8")
    heading = next((h for h in _headings(text) if h.startswith(start)), None)
    if heading is None:
        raise LookupError(f"{op}: spec/{file} has no heading starting with {start!r}")
    return f"[spec/{file} § {heading}](../spec/{file}#{anchor(heading)})"


def _signature(spec: OpSpec) -> str:
    ref = spec.reference()
    parts, star = [], False
    for p in inspect.signature(ref).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}")
    return f"{spec.name}({', '.join(parts)})"


def _describe(v: np.ndarray) -> str:
    return f"{v.dtype} {tuple(v.shape)}" if v.ndim else f"{v.dtype} scalar"


def _returns(spec: OpSpec) -> str:
    ann = inspect.signature(spec.reference()).return_annotation
    ann_text = "" if ann is inspect.Signature.empty else f"`{ann if isinstance(ann, str) else ann.__name__}`"
    try:
        out = flatten(spec.reference()(**spec.example()))
    except Exception as exc:  # a row without an example: say so rather than guess
        return f"{ann_text} (no example ran: {type(exc).__name__})"
    names = ", ".join(f"`{k}` {_describe(np.asarray(v))}" for k, v in out.items())
    return f"{ann_text}; the flattened outputs on the row's example case (the keys a divergence model returns): {names}"


def _specials(spec: OpSpec) -> list[str]:
    if spec.specials is None or "special" not in spec.tiers:
        return ["No special cases."]
    raises: dict[str, list[tuple[str, str]]] = {}
    results: list[str] = []
    ref = spec.reference()
    for sp in spec.specials():
        try:
            ref(**sp.case)
            results.append(sp.label)
        except (ValueError, TypeError) as exc:
            raises.setdefault(type(exc).__name__, []).append((sp.label, str(exc).splitlines()[0] if str(exc) else ""))
    lines = []
    if raises:
        lines.append(
            "The reference raises on these, so the target must raise `ValueError` or `TypeError` (either passes; "
            "any other exception or a result fails):"
        )
        lines.append("")
        lines.append("| case | the reference raises |")
        lines.append("|---|---|")
        for name, cases in raises.items():
            lines += [f"| {_cell(label)} | `{name}`: {_cell(msg, 240)} |" for label, msg in cases]
    if results:
        lines.append("")
        lines.append(
            "The reference returns a result on these, compared like any other case: "
            + "; ".join(_cell(r) for r in results)
            + "."
        )
    return lines


def _cell(text: str, limit: int | None = None) -> str:
    """Text for a markdown table cell: pipes escaped, newlines joined, cut to ``limit`` characters."""
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def section(spec: OpSpec) -> str:
    ref = spec.reference()
    params = inspect.signature(ref).parameters.values()
    lines = [
        f"## {spec.name}",
        "",
        "```python",
        _signature(spec),
        "```",
        "",
        f"Spec: {spec_link(spec.name)}. Tolerance: {spec.tolerance.describe()}. Tiers: {', '.join(spec.tiers)}.",
        "",
        inspect.getdoc(ref) or "",
        "",
        "| argument | default | meaning |",
        "|---|---|---|",
    ]
    for p in params:
        default = "required" if p.default is inspect.Parameter.empty else f"`{p.default!r}`"
        lines.append(f"| `{p.name}` | {default} | {_cell(meaning(spec.name, p.name))} |")
    lines += ["", f"**Valid domain** (what the properties tier draws): {spec.domain}", ""]
    lines += [f"**Returns**: {_returns(spec)}.", "", "**Special tier.** " + "\n".join(_specials(spec)), ""]
    return "\n".join(lines)


HEADER = """# Op reference: every op a target can implement

<!-- generated by `python -m refimpl.conformance.opdoc --write docs/ops.md`; do not edit by hand
     (tests/test_opdoc.py fails when this page differs from what the rows and the reference give) -->

For every row of the conformance table: the reference's signature (a target is called with these keyword
arguments, every optional one included: [targets.md §2](targets.md#2-calling-convention-and-return-types)),
what each argument means, what the op returns, the tolerance it is judged by, the valid domain the properties tier
draws from, the special cases with the error the reference raises on each, and the spec section.
Arrays arrive as NumPy arrays: float64, float32, float16, `ml_dtypes.bfloat16`, integer or uint8 codes;
a dtype argument arrives as a name (`"bfloat16"`, `"float8_e4m3fn"`, ...) or a NumPy dtype.
"""


def render() -> str:
    """The whole page."""
    rows = op_table()
    toc = ["| op | tolerance |", "|---|---|"]
    toc += [f"| [{n}](#{anchor(n)}) | {s.tolerance.kind} |" for n, s in rows.items()]
    body = [section(s) for s in rows.values()]
    return "\n".join([HEADER, *toc, "", *body]).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refimpl.conformance.opdoc", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="PATH", help="write the page (docs/ops.md)")
    group.add_argument("--check", metavar="PATH", help="exit 1 if the page differs from the generated one")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
        return 0
    current = Path(args.check).read_text(encoding="utf-8") if Path(args.check).exists() else ""
    if current != text:
        print(f"{args.check} is stale: regenerate it with python -m refimpl.conformance.opdoc --write {args.check}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["ARGUMENTS", "OVERRIDES", "SPEC", "anchor", "main", "meaning", "render", "section", "spec_link"]
