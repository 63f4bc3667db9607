"""Synthetic robot episodes whose progress is visible: a coloured square sliding to a goal line.

Each task is a colour ("push the red square to the right edge"); a successful episode slides the square
all the way, a suboptimal one dawdles and gets there late, a failure one stops half-way and slides back.
Small (64x64 frames, 12-16 frames), deterministic per seed, for trainer / eval / score tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from robometer_ros.trajectory import FAILURE, SUBOPTIMAL, SUCCESSFUL, Trajectory

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
}
FRAME_SIZE = 64
SQUARE = 14


def instruction_for(colour: str) -> str:
    return f"push the {colour} square to the right edge"


def _positions(label: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Fraction of the way to the goal at each frame."""
    t = np.linspace(0.0, 1.0, n)
    if label == SUCCESSFUL:
        return np.clip(t + rng.normal(0, 0.01, n), 0, 1)
    if label == SUBOPTIMAL:
        return np.clip(t**2.5, 0, 1)  # slow start, late finish
    peak = rng.uniform(0.4, 0.6)
    return np.where(t < 0.5, 2 * t * peak, peak * (1 - (t - 0.5)))  # half-way, then back


def render(colour: str, positions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [T, 64, 64, 3]: grey floor, dark goal line at the right, the square at each position."""
    frames = np.full((len(positions), FRAME_SIZE, FRAME_SIZE, 3), 120, dtype=np.uint8)
    frames[:, :, FRAME_SIZE - 4 :] = (30, 30, 30)
    row = int(rng.integers(8, FRAME_SIZE - SQUARE - 8))
    span = FRAME_SIZE - 4 - SQUARE
    for i, p in enumerate(positions):
        col = round(float(p) * span)
        frames[i, row : row + SQUARE, col : col + SQUARE] = COLOURS[colour]
    return frames


def make_trajectories(episodes_per_task: int = 6, seed: int = 0, split: str | None = None) -> list[Trajectory]:
    """Episodes for every colour: labels cycle successful, successful, suboptimal, failure, ..."""
    rng = np.random.default_rng(seed)
    cycle = [SUCCESSFUL, SUCCESSFUL, SUBOPTIMAL, FAILURE]
    out = []
    for colour in COLOURS:
        for k in range(episodes_per_task):
            label = cycle[k % len(cycle)]
            n = int(rng.integers(12, 17))
            positions = _positions(label, n, rng)
            meta = {"colour": colour}
            if split is not None:
                meta["split"] = split
            out.append(
                Trajectory(
                    instruction=instruction_for(colour),
                    frames=render(colour, positions, rng),
                    frame_stamps=np.arange(n) * 0.1,
                    quality_label=label,
                    progress=positions.astype(np.float32) if label == SUCCESSFUL else None,
                    data_source=f"squares_{'a' if colour != 'blue' else 'b'}",
                    embodiment="pusher",
                    episode_id=f"{split or 'ep'}-{colour}-{k}-{seed}",
                    metadata=meta,
                )
            )
    return out


def write_square_dataset(directory: Path, episodes_per_task: int = 6, eval_episodes_per_task: int = 4,
                         seed: int = 0) -> Path:
    """A dataset directory with train/ and val/ splits (as `DIR/<split>/` sub-datasets)."""
    from robometer_ros.training.data.store import write_dataset

    write_dataset(directory / "train", make_trajectories(episodes_per_task, seed, "train"), frame_codec="npz")
    write_dataset(directory / "val", make_trajectories(eval_episodes_per_task, seed + 1000, "val"),
                  frame_codec="npz")
    return directory
