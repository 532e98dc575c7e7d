"""Synthetic classification tasks that show the lesson's failure modes.

Sequences have a CLS token (id 0) at position 0 followed by ``seq_len − 1`` content tokens
drawn uniformly from ids 1 … vocab−1. A *world* (fixed by ``world_seed``) holds three random,
balanced maps from content tokens to classes: g₀ (what the base model learns in pretraining),
g₁ and g₂ (new "facts").

| task | label | what adapting needs |
|---|---|---|
| ``pretrain`` | g₀(x₁) | (the base model's task) |
| ``facts`` | g₁(x₁) | new token→class knowledge for every token: a high-rank change (FFN) |
| ``position`` | g₀(x_{T−1}) | same knowledge, read from the last position: a new attention pattern (Q/K) |
| ``facts_low`` | g₁(x₁), x₁ in the lower half of the content ids | knowledge edit on half the vocabulary |
| ``facts_high`` | g₂(x₁), x₁ in the upper half | a second, disjoint knowledge edit (for merging) |
| ``relabel`` | (g₀(x₁) + 1) mod C | every class moved to the next, a rank-(C − 1) logit change (Experiment 1) |

The base is pretrained on ``pretrain``, a related task, so each adapter adapts something.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refimpl import _checks
from refimpl.lab.model import ModelConfig

TASKS = ("pretrain", "facts", "position", "facts_low", "facts_high", "bag", "bag_facts", "relabel")


@dataclass(frozen=True)
class Dataset:
    ids: np.ndarray  # (n, seq_len) int64
    labels: np.ndarray  # (n,) int64


def world_maps(config: ModelConfig, world_seed: int = 0) -> np.ndarray:
    """Array (3, vocab) of class maps g₀, g₁, g₂ (entry 0, the CLS token, is unused)."""
    rng = np.random.default_rng([world_seed, 7919])
    n_content = config.vocab - 1
    maps = np.zeros((3, config.vocab), dtype=np.int64)
    for j in range(3):
        balanced = np.arange(n_content) % config.n_classes
        maps[j, 1:] = rng.permutation(balanced)
    return maps


def make_dataset(task: str, n: int, config: ModelConfig, rng: np.random.Generator, *, world_seed: int = 0) -> Dataset:
    """Draw ``n`` labelled sequences of ``task`` with ``rng``."""
    _checks.choice(task, "task", TASKS)
    n = _checks.integer(n, "n", low=1)
    _checks.rng(rng)
    if config.seq_len < 3 or config.vocab < 5:
        raise ValueError(f"config: expected seq_len >= 3 and vocab >= 5, got {config.seq_len}, {config.vocab}")
    g = world_maps(config, world_seed)
    ids = rng.integers(1, config.vocab, (n, config.seq_len))
    ids[:, 0] = 0
    half = 1 + (config.vocab - 1) // 2
    if task == "facts_low":
        ids[:, 1] = rng.integers(1, half, n)
    elif task == "facts_high":
        ids[:, 1] = rng.integers(half, config.vocab, n)

    def majority(gmap: np.ndarray) -> np.ndarray:
        counts = np.zeros((n, config.n_classes), dtype=np.int64)
        np.add.at(counts, (np.arange(n)[:, None], gmap[ids[:, 1:]]), 1)
        return counts.argmax(axis=1)  # ties go to the lowest class id

    if task in ("bag", "bag_facts"):
        return Dataset(ids=ids.astype(np.int64), labels=majority(g[0] if task == "bag" else g[1]))
    label = {
        "pretrain": g[0][ids[:, 1]],
        "facts": g[1][ids[:, 1]],
        "position": g[0][ids[:, -1]],
        "facts_low": g[1][ids[:, 1]],
        "facts_high": g[2][ids[:, 1]],
        "relabel": (g[0][ids[:, 1]] + 1) % config.n_classes,
    }[task]
    return Dataset(ids=ids.astype(np.int64), labels=label.astype(np.int64))
