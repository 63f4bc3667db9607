"""The trajectory record every importer produces and every consumer (sampling, eval, score, demo) reads.

Pure numpy: importable without torch or rclpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SUCCESSFUL = "successful"
SUBOPTIMAL = "suboptimal"
FAILURE = "failure"
QUALITY_LABELS = (FAILURE, SUBOPTIMAL, SUCCESSFUL)  # worst to best: the gold ranking order
# The outcome was never reported (a bag without an end-of-episode outcome): no gold rank, never a training
# target (the pair sampler leaves these out) and left out of every label-based metric.
UNKNOWN = "unknown"
LABELS = (*QUALITY_LABELS, UNKNOWN)  # every value Trajectory.quality_label may take
FRAME_STEPS = "frame_steps"  # Trajectory.step_data key: the control step of each frame


@dataclass
class Trajectory:
    """One robot episode: what the camera saw, what it was asked to do and how it went.

    Attributes:
        instruction: the natural-language task.
        frames: uint8 RGB frames, shape [T, H, W, 3], oldest first.
        frame_stamps: capture time of each frame in seconds, shape [T], non-decreasing.
        quality_label: one of LABELS: successful / suboptimal / failure (QUALITY_LABELS), or unknown.
        partial_success: human partial-success score in [0, 1] where known (RoboReward-style data).
        progress: per-frame task progress in [0, 1] where known (e.g. from a simulator), shape [T].
        data_source: dataset or robot the episode came from (per-source cutoffs and metrics key on it).
        embodiment: robot type where known.
        episode_id: unique id within its dataset.
        metadata: anything else an importer knows (task name, seed, generator kind, ...), JSON-serialisable.
        step_data: low-dimensional arrays per control step where known (e.g. a simulator's ``observations``
            [S + 1, D] and ``actions`` [S, A]), each with its own first axis; the key ``frame_steps`` is
            special: int [T], the control step each frame shows, and is restricted with the frames.
    """

    instruction: str
    frames: np.ndarray
    frame_stamps: np.ndarray
    quality_label: str = SUCCESSFUL
    partial_success: float | None = None
    progress: np.ndarray | None = None
    data_source: str = "unknown"
    embodiment: str | None = None
    episode_id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    step_data: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.frames = np.asarray(self.frames)
        self.frame_stamps = np.asarray(self.frame_stamps, dtype=np.float64)
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise ValueError(
                f"frames must be uint8 [T, H, W, 3], got {self.frames.dtype} {list(self.frames.shape)}"
            )
        if len(self.frames) == 0:
            raise ValueError(f"trajectory {self.episode_id!r} has no frames")
        if self.frame_stamps.shape != (len(self.frames),):
            raise ValueError(
                f"frame_stamps has shape {list(self.frame_stamps.shape)}, expected [{len(self.frames)}]"
            )
        if self.quality_label not in LABELS:
            raise ValueError(f"quality_label must be one of {LABELS}, got {self.quality_label!r}")
        if self.progress is not None:
            self.progress = np.asarray(self.progress, dtype=np.float32)
            if self.progress.shape != (len(self.frames),):
                raise ValueError(f"progress has shape {list(self.progress.shape)}, expected [{len(self.frames)}]")
        if not self.instruction.strip():
            raise ValueError(f"trajectory {self.episode_id!r} has an empty instruction")
        self.step_data = {name: np.asarray(value) for name, value in self.step_data.items()}
        for name, value in self.step_data.items():
            if not name.isidentifier():
                raise ValueError(f"step_data name {name!r} is not an identifier")
            if value.ndim == 0 or value.dtype == object:
                raise ValueError(f"step_data {name!r} must be a numeric array with a step axis, got "
                                 f"{value.dtype} {list(value.shape)}")
        frame_steps = self.step_data.get(FRAME_STEPS)
        if frame_steps is not None:
            if frame_steps.shape != (len(self.frames),) or not np.issubdtype(frame_steps.dtype, np.integer):
                raise ValueError(f"step_data {FRAME_STEPS!r} must be int [{len(self.frames)}] (one control step "
                                 f"per frame), got {frame_steps.dtype} {list(frame_steps.shape)}")
            if len(frame_steps) and frame_steps.min() < 0:
                raise ValueError(f"step_data {FRAME_STEPS!r} must be non-negative")

    def __len__(self) -> int:
        return len(self.frames)
