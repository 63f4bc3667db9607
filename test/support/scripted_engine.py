"""TEST DOUBLE: a RewardEngine stand-in whose scores are scripted by the frames' colours.

`ScriptedRewardEngine` has the RewardEngine interface the reward node uses (add_frame, score, forget,
backend_name, model_id, num_frames) but no model: a frame's progress is the mean of its red channel / 255
and its success probability the mean of its green channel / 255, so a test scripts any progress curve by
publishing frames of the right colour (jpeg keeps a flat colour's mean within a few levels). A frame with a
blue mean above 250 makes `score` raise ModelOutputError (the engine's NaN-output error); a frame with a blue
mean in (200, 250] makes the first `add_frame` of it fail (a transient encoder error; the retry succeeds).
`check_instruction` refuses instructions over 200 characters and raises on one containing "[crash]".

Run as a node (`python -m support.scripted_engine --ros-args ...`): the real reward node's `main` with this
double installed through the node's engine factory seam. The "bundle" must be an existing directory (a
missing one fails configure like a missing real bundle); `SCRIPTED_ENGINE_NUM_FRAMES` sets num_frames.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

try:
    from robometer_ros.engine.reward_engine import ModelOutputError, Scores
except ImportError:  # the engine package may not be importable in every checkout state
    from dataclasses import dataclass

    class ModelOutputError(RuntimeError):  # type: ignore[no-redef]
        """Stand-in for robometer_ros.engine.reward_engine.ModelOutputError."""

    @dataclass(frozen=True)
    class Scores:  # type: ignore[no-redef]
        """Stand-in for robometer_ros.engine.reward_engine.Scores."""

        progress: np.ndarray
        success_probability: np.ndarray
        progress_logits: np.ndarray
        success_logits: np.ndarray
        inference_time: float
        frame_ids: tuple = ()


MODEL_ID = "scripted-test-double@1"
BACKEND = "scripted:cpu"


class ScriptedRewardEngine:
    """Scores from colours: progress = mean red / 255, success = mean green / 255, NaN when blue > 250."""

    def __init__(self, num_frames: int = 8, score_delay_s: float = 0.0) -> None:
        self.num_frames = num_frames
        self.backend_name = BACKEND
        self.model_id = MODEL_ID
        self.score_delay_s = score_delay_s
        self._features: dict[Hashable, tuple[float, float, float]] = {}
        self._lock = threading.Lock()
        self._failed_once: set[Hashable] = set()
        self.added = 0
        self.forgotten = 0

    def add_frame(self, frame_id: Hashable, image: np.ndarray) -> None:
        """'Encode' a frame: keep its channel means."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected uint8 HxWx3, got {image.dtype} {image.shape}")
        means = image.reshape(-1, 3).mean(axis=0) / 255.0
        with self._lock:
            if 200 / 255 < means[2] <= 250 / 255 and frame_id not in self._failed_once:
                self._failed_once.add(frame_id)
                raise RuntimeError("scripted transient encoder failure")
            self._features[frame_id] = (float(means[0]), float(means[1]), float(means[2]))
            self.added += 1

    def check_instruction(self, instruction: str) -> None:
        """Instructions longer than 200 characters do not fit (as a bundle's prompt limit); one containing
        "[crash]" makes the check raise RuntimeError (a tokenizer that breaks: the node must survive it)."""
        if "[crash]" in instruction:
            raise RuntimeError("scripted tokenizer crash")
        if len(instruction) > 200:
            raise ValueError(f"instruction of {len(instruction)} characters is longer than the scripted 200")

    def forget(self, frame_ids: Sequence[Hashable]) -> None:
        """Drop cached frames."""
        with self._lock:
            for fid in frame_ids:
                if self._features.pop(fid, None) is not None:
                    self.forgotten += 1

    def score(self, instruction: str, frame_ids: Sequence[Hashable]) -> Scores:
        """Per-frame scores of the given frames (they must have been added)."""
        start = time.perf_counter()
        with self._lock:
            missing = [fid for fid in frame_ids if fid not in self._features]
            if missing:
                raise LookupError(f"frames {missing} were never added or were forgotten")
            feats = np.array([self._features[fid] for fid in frame_ids], dtype=np.float64)
        if self.score_delay_s:
            time.sleep(self.score_delay_s)
        if (feats[:, 2] > 250 / 255).any():
            raise ModelOutputError("scripted NaN output (a frame with blue > 250)")
        progress, success = feats[:, 0].copy(), feats[:, 1].copy()
        return Scores(
            progress=progress,
            success_probability=success,
            progress_logits=np.zeros((len(frame_ids), 10)),
            success_logits=np.zeros(len(frame_ids)),
            inference_time=time.perf_counter() - start,
            frame_ids=tuple(frame_ids),
        )


def open_scripted_engine(bundle_path: str, backend: str, **options: object) -> ScriptedRewardEngine:
    """Engine factory for the node: the bundle must be an existing directory, as a real one must."""
    if not bundle_path or not Path(bundle_path).is_dir():
        raise FileNotFoundError(f"bundle directory {bundle_path!r} does not exist")
    return ScriptedRewardEngine(
        num_frames=int(os.environ.get("SCRIPTED_ENGINE_NUM_FRAMES", "8")),
        score_delay_s=float(os.environ.get("SCRIPTED_ENGINE_DELAY_S", "0")),
    )


def main() -> None:
    """The reward node with the scripted engine installed."""
    from robometer_ros.reward_node import main as node_main

    node_main(engine_factory=open_scripted_engine)


if __name__ == "__main__":
    main()
