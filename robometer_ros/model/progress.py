"""C51-style progress decode and two-hot encode in numpy (no torch: the torch-free runtimes use these).

Bin centres are linspace(0, 1, bins) (k / (bins - 1)); progress = sum_k softmax(logits)_k * centre_k.
"""

from __future__ import annotations

import numpy as np


def bin_centers(num_bins: int) -> np.ndarray:
    """Progress value of each bin: linspace(0, 1, num_bins)."""
    if num_bins < 2:
        raise ValueError(f"num_bins must be at least 2, got {num_bins}")
    return np.linspace(0.0, 1.0, num_bins)


def expected_progress_np(progress_logits: np.ndarray) -> np.ndarray:
    """C51 decode over the last axis: expectation of the bin centres under softmax(logits). float32."""
    logits = np.asarray(progress_logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    return (probs * bin_centers(logits.shape[-1])).sum(axis=-1).astype(np.float32)


def two_hot_np(progress: np.ndarray | float, num_bins: int) -> np.ndarray:
    """C51 two-hot target of progress in [0, 1] (clamped): float32 [..., num_bins].

    b = y * (bins - 1), l = floor(b), u = ceil(b); p[l] = u - b, p[u] = b - l; p[l] = 1 when l == u.
    """
    y = np.clip(np.asarray(progress, dtype=np.float64), 0.0, 1.0)
    b = y * (num_bins - 1)
    lower = np.floor(b).astype(np.int64)
    upper = np.ceil(b).astype(np.int64)
    same = lower == upper
    target = np.zeros((*y.shape, num_bins), dtype=np.float64)
    lower_weight = np.where(same, 1.0, upper - b)
    upper_weight = np.where(same, 0.0, b - lower)
    np.put_along_axis(target, lower[..., None], lower_weight[..., None], axis=-1)
    # add (not put) so that the l == u case keeps its weight of 1
    upper_slot = np.take_along_axis(target, upper[..., None], axis=-1) + upper_weight[..., None]
    np.put_along_axis(target, upper[..., None], upper_slot, axis=-1)
    return target.astype(np.float32)


def sigmoid_np(logits: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (success / preference probabilities)."""
    x = np.asarray(logits, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out.astype(np.float32)
