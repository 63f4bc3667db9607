"""Cost of the default model's candidate sizes (a script, not a test): how `DEFAULT_MODEL_SIZES` was chosen.

For every size (robometer_ros.training.data.metaworld.DEFAULT_MODEL_SIZES) and frame size it prints

* parameters;
* the training step (ms): one optimiser step of `training/default_model.yaml` (batch 8 preference pairs,
  forward + backward + AdamW, sampling and collation included) on a Meta-World dataset, median of the timed
  steps, with the recipe's thread count (OMP_NUM_THREADS=1 in `make default-model`);
* the scoring step (ms) as the node runs it: the untrained model exported to a bundle, ONNX Runtime on one
  thread, one new frame encoded and 8 frames scored through RewardEngine (frame cache and prefix reuse),
  median over `--score-steps`;
* the training time that `--train-steps` optimiser steps would take at that step time.

The weights are untrained: step times do not depend on them. Held-out quality needs a training run per size
(README, "The embedded default model").

    python benchmarks/bench_default_sizes.py --dataset data/metaworld --split eval_seeds
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

ROOT = Path(__file__).resolve().parents[1]


def train_step_ms(init: Path, dataset: str, split: str, frame: int, steps: int, warmup: int, work: Path) -> float:
    """Median optimiser-step time of the default recipe at this size and frame size."""
    from robometer_ros.training.recipe.config import load_config
    from robometer_ros.training.recipe.trainer import Trainer

    config = load_config(ROOT / "training" / "default_model.yaml", [
        f"model.init_checkpoint={init}", f"data.dataset={dataset}", f"data.train_split={split}",
        "data.eval_split=null", f"data.frame_size=[{frame}, {frame}]", "data.num_workers=0",
        f"output_dir={work / 'run'}", f"optim.max_steps={warmup + steps}", "checkpoint.every=0",
        "log.every=1", "log.progress_bar=false", "log.tensorboard=false",
    ])
    trainer = Trainer(config)
    trainer.train(stop_at_step=warmup + steps)
    log = [json.loads(line) for line in (work / "run" / "train_log.jsonl").read_text().splitlines()]
    batch = config.optim.batch_size
    return 1000 * statistics.median(batch / row["train/pairs_per_second"] for row in log[warmup:])


def score_step_ms(init: Path, frame: int, steps: int, work: Path) -> float:
    """Median node step (one new frame encoded + 8 frames scored) of the exported model, ORT on one thread."""
    import numpy as np

    from robometer_ros.engine.reward_engine import RewardEngine
    from robometer_ros.episode import subsample_indices
    from robometer_ros.model.checkpoint import load_checkpoint
    from robometer_ros.training.export.onnx_export import export_bundle

    model, info = load_checkpoint(init)
    bundle = export_bundle(model.eval(), info.tokenizer, work / "bundle", frame_size=(frame, frame),
                           model_id="size-probe", log=lambda *_: None)
    engine = RewardEngine(bundle, backend="onnxruntime", intra_op_threads=1)
    rng = np.random.default_rng(0)
    times = []
    for step in range(steps + 8):
        image = rng.integers(0, 255, (frame, frame, 3), dtype=np.uint8)
        start = time.perf_counter()
        engine.add_frame(step, image)
        engine.score("pull the door open", [int(i) for i in subsample_indices(step + 1, 8)])
        if step >= 8:  # a full 8-frame step from here on
            times.append(time.perf_counter() - start)
    engine.close()
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    """Print one row per (size, frame size)."""
    from robometer_ros.training.data.metaworld import DEFAULT_MODEL_SIZES, write_default_model_init

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="a Meta-World dataset (robometer-dataset from-metaworld)")
    parser.add_argument("--split", default="eval_seeds", help="split the training steps sample from")
    parser.add_argument("--sizes", nargs="+", default=sorted(DEFAULT_MODEL_SIZES), choices=sorted(DEFAULT_MODEL_SIZES))
    parser.add_argument("--frame-sizes", nargs="+", type=int, default=[64, 96], help="square frames, multiples of 32")
    parser.add_argument("--train-timed", type=int, default=8, help="timed training steps")
    parser.add_argument("--score-steps", type=int, default=60, help="timed scoring steps")
    parser.add_argument("--train-steps", type=int, default=8000, help="steps of a whole run, for the time column")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(f"# bench_default_sizes: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, 1 thread for training and scoring")
    print(f"{'size':>4} {'frame':>5} {'params M':>8} {'train step ms':>13} {'scoring step ms':>15} "
          f"{f'{args.train_steps} steps, min':>16}")
    for size in args.sizes:
        for frame in args.frame_sizes:
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                write_default_model_init(work / "init", size=size)
                from robometer_ros.model.checkpoint import load_checkpoint

                params = sum(p.numel() for p in load_checkpoint(work / "init")[0].parameters()) / 1e6
                score = score_step_ms(work / "init", frame, args.score_steps, work)
                train = train_step_ms(work / "init", args.dataset, args.split, frame, args.train_timed, 2, work)
            print(f"{size:>4} {frame:>5} {params:>8.2f} {train:>13.0f} {score:>15.2f} "
                  f"{train * args.train_steps / 60000:>16.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
