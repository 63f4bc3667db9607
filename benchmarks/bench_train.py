"""Training-step cost of the trainer on a small model (a script, not a test).

One optimiser step = one forward + backward over `--batch` preference pairs (2 x 8 frames each, the
preference prompt) + clipping + AdamW, through `Trainer` exactly as `robometer-train` runs it (data
sampling and collation included, since they run in the same process with data.num_workers=0). Prints the
median step time over the timed steps and pairs/s per configuration.

The dataset is synthetic (a coloured square moving across a grey floor, 3 tasks, all quality labels),
written to a temporary directory at the frame size being measured.

Examples::

    python benchmarks/bench_train.py                                   # tiny, 64 and 128 px, CPU
    python benchmarks/bench_train.py --presets tiny mid --frame-sizes 64 --batch 4
    python benchmarks/bench_train.py --presets mid --device-note "H100" --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from robometer_ros.trajectory import FAILURE, SUBOPTIMAL, SUCCESSFUL, Trajectory

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230)}


def synthetic_dataset(directory: Path, size: int, per_task: int = 4, frames: int = 16) -> Path:
    from robometer_ros.training.data.store import write_dataset

    rng = np.random.default_rng(0)
    labels = [SUCCESSFUL, SUCCESSFUL, SUBOPTIMAL, FAILURE]
    trajectories = []
    square = max(4, size // 5)
    for colour, rgb in COLOURS.items():
        for k in range(per_task):
            label = labels[k % len(labels)]
            t = np.linspace(0, 1, frames)
            position = t if label == SUCCESSFUL else (t**2.5 if label == SUBOPTIMAL else 0.5 * np.sin(np.pi * t))
            video = np.full((frames, size, size, 3), 120, np.uint8)
            row = int(rng.integers(0, size - square))
            for i, p in enumerate(position):
                col = round(float(p) * (size - square))
                video[i, row : row + square, col : col + square] = rgb
            trajectories.append(Trajectory(
                instruction=f"push the {colour} square to the right edge", frames=video,
                frame_stamps=np.arange(frames) * 0.1, quality_label=label, data_source="bench",
                episode_id=f"{colour}-{k}",
            ))
    return write_dataset(directory, trajectories, frame_codec="npz").directory


def measure(preset: str, size: int, batch: int, steps: int, warmup: int, checkpointing: bool, lora: bool) -> dict:
    import torch

    from robometer_ros.training.recipe.config import load_config
    from robometer_ros.training.recipe.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_dataset(Path(tmp) / "data", size)
        config = load_config(Path(__file__).resolve().parents[1] / "training" / "tiny_cpu.yaml", [
            f"data.dataset={data}", "data.train_split=all", f"output_dir={Path(tmp) / 'run'}",
            f"model.preset={preset}",
            f"data.frame_size=[{size}, {size}]", f"optim.batch_size={batch}",
            f"optim.max_steps={warmup + steps}", "data.eval_split=null", "checkpoint.every=0",
            "log.every=1", "log.progress_bar=false", "log.tensorboard=false",
            f"model.gradient_checkpointing={str(checkpointing).lower()}", f"lora.enabled={str(lora).lower()}",
        ])
        trainer = Trainer(config)
        start = time.perf_counter()
        trainer.train(stop_at_step=warmup + steps)
        total = time.perf_counter() - start
        log = [json.loads(line) for line in (Path(tmp) / "run" / "train_log.jsonl").read_text().splitlines()]
        # log.every=1: each row's pairs/s covers exactly one step (data, forward, backward, optimiser)
        durations = [batch / row["train/pairs_per_second"] for row in log[warmup:]]
        params = sum(p.numel() for p in trainer.robometer.parameters())
        trainable = sum(p.numel() for p in trainer.robometer.parameters() if p.requires_grad)
        return {
            "preset": preset, "frame": size, "batch": batch, "ckpt": checkpointing, "lora": lora,
            "params_M": params / 1e6, "trainable_M": trainable / 1e6,
            "step_ms": 1000 * statistics.median(durations), "pairs_per_s": batch / statistics.median(durations),
            "first_loss": log[0]["train/loss"], "last_loss": log[-1]["train/loss"], "wall_s": total,
            "device": str(trainer.env.device), "threads": torch.get_num_threads(),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"], choices=("tiny", "mid"))
    parser.add_argument("--frame-sizes", nargs="+", type=int, default=[64, 128], help="square frames, multiples of 32")
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"# bench_train: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    header = f"{'preset':>6} {'frame':>5} {'batch':>5} {'params M':>9} {'train M':>8} {'step ms':>8} {'pairs/s':>8} " \
             f"{'loss 1st':>8} {'loss last':>9}  device"
    print(header)
    for preset in args.presets:
        for size in args.frame_sizes:
            row = measure(preset, size, args.batch, args.steps, args.warmup, args.gradient_checkpointing, args.lora)
            print(f"{row['preset']:>6} {row['frame']:>5} {row['batch']:>5} {row['params_M']:>9.2f} "
                  f"{row['trainable_M']:>8.2f} {row['step_ms']:>8.1f} {row['pairs_per_s']:>8.1f} "
                  f"{row['first_loss']:>8.3f} {row['last_loss']:>9.3f}  {row['device']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
