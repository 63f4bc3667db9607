"""Write / read speed and size of the dataset store's frame codecs on camera-like frames.

    python benchmarks/dataset_codecs.py [--episodes 8] [--frames 32] [--height 240] [--width 320]

Prints, per codec: bytes per frame, write time per frame, time to read a whole episode, and time to read
the 8 frames a pair sampler asks for. Frames are smooth gradients with moving shapes and sensor noise
(random noise alone would make every codec look bad; flat images would make them all look free).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from robometer_ros.training.data.store import FRAME_CODECS, Dataset, write_dataset
from robometer_ros.trajectory import Trajectory


def camera_like_episode(number: int, frames: int, height: int, width: int) -> Trajectory:
    rng = np.random.default_rng(number)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 90.0)], axis=-1)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        image = base.copy()
        cy, cx = height // 2 + int(40 * np.sin(t / 5)), int(width * t / frames)
        image[max(0, cy - 20) : cy + 20, max(0, cx - 30) : cx + 30] = (200, 40, 40)
        image += rng.normal(0, 3, image.shape)
        video[t] = np.clip(image, 0, 255).astype(np.uint8)
    return Trajectory("move the red block", video, np.arange(frames) / 10.0, episode_id=f"ep{number}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    args = parser.parse_args()
    episodes = [camera_like_episode(i, args.frames, args.height, args.width) for i in range(args.episodes)]
    total_frames = args.episodes * args.frames
    raw_bytes = total_frames * args.height * args.width * 3
    print(f"{args.episodes} episodes x {args.frames} frames of {args.height}x{args.width} "
          f"(raw {raw_bytes / total_frames / 1024:.0f} KiB/frame)")
    print(f"{'codec':6} {'KiB/frame':>10} {'write ms/frame':>15} {'read episode ms':>16} {'read 8 frames ms':>17}")
    for codec in FRAME_CODECS:
        with tempfile.TemporaryDirectory() as directory:
            root = Path(directory) / "ds"
            start = time.perf_counter()
            write_dataset(root, episodes, frame_codec=codec)
            write_s = time.perf_counter() - start
            size = sum(p.stat().st_size for p in root.rglob("*.npz"))
            dataset = Dataset(root)
            start = time.perf_counter()
            for i in range(len(dataset)):
                dataset.frames(i)
            read_all_s = (time.perf_counter() - start) / len(dataset)
            wanted = np.rint(np.linspace(0, args.frames - 1, 8)).astype(int)
            start = time.perf_counter()
            for i in range(len(dataset)):
                dataset.frames(i, wanted)
            read_8_s = (time.perf_counter() - start) / len(dataset)
        print(f"{codec:6} {size / total_frames / 1024:10.1f} {1000 * write_s / total_frames:15.2f} "
              f"{1000 * read_all_s:16.1f} {1000 * read_8_s:17.1f}")


if __name__ == "__main__":
    main()
