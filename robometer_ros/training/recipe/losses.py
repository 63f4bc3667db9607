"""The Robometer training objective (reference section 2.1): L = w_p L_prog(A) + w_s L_succ(A) + w_r L_pref.

* L_prog: cross-entropy of the progress logits against the C51 two-hot target, masked, normalised
  exactly as the official code: sum(m * CE) / (T * sum(m)) with T the frames per side (so it is the
  masked mean CE divided once more by T).
* L_succ: BCE-with-logits per frame (logits clamped to +-50), masked mean.
* L_pref: BCE-with-logits of the preference logit (clamped to +-50) against "A is chosen", batch mean.

A term that is NaN (e.g. a batch whose mask is all zero in a reduction that divides by it) becomes 0,
as in the official trainer; an all-zero mask gives an exact 0 that keeps the graph connected.
Masked-out frames must still have finite logits (0 * inf would be NaN and zero the whole term).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from robometer_ros.model.heads import two_hot

LOGIT_CLAMP = 50.0


@dataclass
class LossWeights:
    """Weight of each term in the total loss (all 1 in the released training)."""

    progress: float = 1.0
    success: float = 1.0
    preference: float = 1.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LossWeights:
        """From a config mapping; unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: float(v) for k, v in values.items()})


@dataclass
class LossTerms:
    """The total loss (differentiable) and its weighted-before terms, each a 0-dim tensor."""

    total: torch.Tensor
    progress: torch.Tensor
    success: torch.Tensor
    preference: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        """Detached Python floats for logging."""
        return {f.name: float(getattr(self, f.name).detach()) for f in fields(self)}


def _nan_to_zero(term: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(term), torch.zeros_like(term), term)


def _as_tensor(value: torch.Tensor | np.ndarray | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32, device=like.device)


def progress_loss(
    progress_logits: torch.Tensor,
    target_progress: torch.Tensor | np.ndarray,
    sample_mask: torch.Tensor | np.ndarray | None = None,
    frame_mask: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Two-hot C51 cross-entropy: sum_{b,t} m_bt CE_bt / (T * sum_{b,t} m_bt).

    Args:
        progress_logits: [B, T, bins] logits of trajectory A's frames.
        target_progress: [B, T] targets in [0, 1].
        sample_mask: [B] 0/1, whether a sample's progress counts (progress_mask_a); None = all.
        frame_mask: [B, T] 0/1 per frame (predict_last_frame_mask); None = all.
    """
    if progress_logits.ndim != 3:
        raise ValueError(f"progress_logits must be [B, T, bins], got {list(progress_logits.shape)}")
    batch, frames, bins = progress_logits.shape
    target = _as_tensor(target_progress, progress_logits)
    if target.shape != (batch, frames):
        raise ValueError(f"target_progress must be [{batch}, {frames}], got {list(target.shape)}")
    mask = torch.ones((batch, frames), dtype=torch.float32, device=progress_logits.device)
    if sample_mask is not None:
        mask = mask * _as_tensor(sample_mask, progress_logits).reshape(batch, 1)
    if frame_mask is not None:
        mask = mask * _as_tensor(frame_mask, progress_logits).reshape(batch, frames)
    log_probs = F.log_softmax(progress_logits.float(), dim=-1)
    cross_entropy = -(two_hot(target, bins).to(log_probs.device) * log_probs).sum(dim=-1)
    # clamp_min: an all-zero mask gives 0 / tiny = 0 (graph kept, no host sync to test for it)
    return _nan_to_zero((mask * cross_entropy).sum() / (frames * mask.sum()).clamp_min(1e-12))


def success_loss(
    success_logits: torch.Tensor,
    target_success: torch.Tensor | np.ndarray,
    success_mask: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Masked mean of BCE-with-logits over frames; logits clamped to +-50.

    Args:
        success_logits: [B, T]; target_success: [B, T] 0/1; success_mask: [B, T] 0/1 (None = all).
    """
    target = _as_tensor(target_success, success_logits)
    if target.shape != success_logits.shape:
        raise ValueError(
            f"target_success shape {list(target.shape)} != success_logits shape {list(success_logits.shape)}"
        )
    mask = torch.ones_like(target) if success_mask is None else _as_tensor(success_mask, success_logits)
    logits = success_logits.float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    per_frame = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return _nan_to_zero((mask * per_frame).sum() / mask.sum().clamp_min(1e-12))


def preference_loss(
    preference_logits: torch.Tensor, preference_labels: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """Batch mean of BCE-with-logits(clamp(logit, +-50), label), label 1 = A is chosen.

    Args:
        preference_logits: [B] (or [B, 1]); preference_labels: [B].
    """
    logits = preference_logits.float().reshape(-1).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    labels = _as_tensor(preference_labels, preference_logits).reshape(-1)
    if labels.shape != logits.shape:
        raise ValueError(f"{labels.numel()} preference labels for {logits.numel()} logits")
    return _nan_to_zero(F.binary_cross_entropy_with_logits(logits, labels))


def robometer_loss(
    labels: Mapping[str, torch.Tensor | np.ndarray],
    progress_logits: torch.Tensor,
    success_logits: torch.Tensor,
    preference_logits: torch.Tensor | None = None,
    weights: LossWeights | None = None,
) -> LossTerms:
    """The weighted sum of the three terms for a batch of pairs (or of progress samples).

    Args:
        labels: `sampling.stack_pair_labels` output: progress_a [B,T], progress_mask_a [B], success_a
            [B,T], success_mask_a [B,T], preference_label [B]; optional progress_frame_mask [B,T].
        progress_logits: [B, T, bins] for trajectory A; success_logits: [B, T] for trajectory A.
        preference_logits: [B], or None for progress-only batches (the preference term is then 0).
        weights: term weights (all 1 by default).
    """
    weights = weights or LossWeights()
    progress = progress_loss(
        progress_logits, labels["progress_a"], labels.get("progress_mask_a"), labels.get("progress_frame_mask")
    )
    success = success_loss(success_logits, labels["success_a"], labels.get("success_mask_a"))
    if preference_logits is None:
        preference = torch.zeros((), dtype=torch.float32, device=progress_logits.device)
    else:
        preference = preference_loss(preference_logits, labels["preference_label"])
    total = weights.progress * progress + weights.success * success + weights.preference * preference
    return LossTerms(total=total, progress=progress, success=success, preference=preference)
