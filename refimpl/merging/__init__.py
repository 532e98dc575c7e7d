"""Adapter and model merging: task arithmetic, TIES, DARE, magnitude prune, linear, SLERP,
LoRA-space merges and streaming whole-model merges over safetensors files.

The written rules are spec/merging.md. Each op has ``profile="paper" | "peft" | "mergekit" | "mergelm"``
presets (where the implementations differ) and every preset's option can be set on its own.

Modules: ``arithmetic`` (task vectors, task arithmetic, linear, whole-model flattening),
``sparsify`` (magnitude trim, magnitude prune, DARE masks), ``ties_dare`` (TIES, DARE),
``spherical`` (SLERP), ``lora_space`` (cat, factor-space linear, SVD) and ``streaming`` (merge_files);
``operands`` (the argument checks the ops and their kernels share) and ``profiles`` (the peer rule sets,
one record per profile).
"""

from refimpl.merging.arithmetic import (
    ModelLayout,
    flatten_model,
    linear,
    task_arithmetic,
    task_vector,
    unflatten_model,
)
from refimpl.merging.lora_space import lora_cat, lora_delta, lora_factor_linear, lora_svd, lowrank_factors
from refimpl.merging.sparsify import dare_masks, l1_rescaled, magnitude_prune, trim_mask
from refimpl.merging.spherical import SlerpCoefficients, slerp, slerp_coefficients
from refimpl.merging.streaming import MergeFilesResult, merge_files, read_index
from refimpl.merging.ties_dare import DARE_PROFILES, TIES_PROFILES, dare, elect_and_merge, ties

__all__ = [
    "DARE_PROFILES",
    "TIES_PROFILES",
    "MergeFilesResult",
    "ModelLayout",
    "SlerpCoefficients",
    "dare",
    "dare_masks",
    "elect_and_merge",
    "flatten_model",
    "l1_rescaled",
    "linear",
    "lora_cat",
    "lora_delta",
    "lora_factor_linear",
    "lora_svd",
    "lowrank_factors",
    "magnitude_prune",
    "merge_files",
    "read_index",
    "slerp",
    "slerp_coefficients",
    "task_arithmetic",
    "task_vector",
    "ties",
    "trim_mask",
    "unflatten_model",
]
