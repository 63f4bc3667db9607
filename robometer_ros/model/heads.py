"""The three Robometer prediction heads and the C51-style progress decode / two-hot encode.

Head shape (as the released checkpoint): Linear(H -> H/2), LayerNorm(H/2), GELU, Dropout, Linear(H/2 -> out),
so the state-dict keys are ``<name>.0.*`` (first Linear), ``<name>.1.*`` (LayerNorm), ``<name>.4.*``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from robometer_ros.model.progress import bin_centers, expected_progress_np, two_hot_np

__all__ = [
    "bin_centers",
    "expected_progress",
    "expected_progress_np",
    "prediction_head",
    "two_hot",
    "two_hot_np",
]


def prediction_head(hidden_size: int, out_features: int, dropout: float = 0.1) -> nn.Sequential:
    """One head: Linear(H, H//2) -> LayerNorm -> GELU -> Dropout -> Linear(H//2, out_features)."""
    half = hidden_size // 2
    return nn.Sequential(
        nn.Linear(hidden_size, half),
        nn.LayerNorm(half),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(half, out_features),
    )


def expected_progress(progress_logits: torch.Tensor) -> torch.Tensor:
    """C51 decode: sum_k softmax(logits)_k * k/(bins-1) over the last axis, computed in float32."""
    logits = progress_logits.float()
    centers = torch.linspace(0.0, 1.0, logits.shape[-1], device=logits.device, dtype=torch.float32)
    return (torch.softmax(logits, dim=-1) * centers).sum(dim=-1)


def two_hot(progress: torch.Tensor | np.ndarray | float, num_bins: int) -> torch.Tensor:
    """C51 two-hot target of a progress value in [0, 1] (values outside are clamped).

    b = y * (bins - 1), l = floor(b), u = ceil(b); p[l] = u - b, p[u] = b - l, and p[l] = 1 when l == u.
    Returns float32 [..., num_bins].
    """
    y = torch.as_tensor(progress, dtype=torch.float32).clamp(0.0, 1.0)
    b = y * (num_bins - 1)
    lower = b.floor().long()
    upper = b.ceil().long()
    target = torch.zeros((*y.shape, num_bins), dtype=torch.float32, device=y.device)
    same = lower == upper
    lower_weight = torch.where(same, torch.ones_like(b), upper.float() - b)
    upper_weight = torch.where(same, torch.zeros_like(b), b - lower.float())
    target.scatter_add_(-1, lower.unsqueeze(-1), lower_weight.unsqueeze(-1))
    target.scatter_add_(-1, upper.unsqueeze(-1), upper_weight.unsqueeze(-1))
    return target
