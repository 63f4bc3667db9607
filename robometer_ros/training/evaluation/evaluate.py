"""`robometer-eval CHECKPOINT_OR_BUNDLE --dataset DIR [--split val] --out DIR`: the paper's metrics.

    robometer-eval runs/tiny/best --dataset data/synth --split val --out runs/tiny/eval
    robometer-eval runs/tiny/bundle --dataset data/synth --split val --out runs/tiny/eval_bundle

The model is either a PyTorch checkpoint directory (released Robometer layout; run with torch, batched)
or a bundle directory (run through `RewardEngine`, so the exported ONNX / TensorRT engine is what gets
measured). The evaluation itself is the trainer's held-out one (``robometer_ros.training.recipe.validation``,
`evaluate_collection`); this command opens the model and the split and sets the options. Per trajectory of
the split, the progress-only prompt scores `num_frames` frames subsampled with the first and last kept;
targets are absolute_first_frame progress (reference 2.2). Metrics (`robometer_ros.training.recipe.metrics`,
per data source and overall):

* VOC: Pearson r of predicted vs target progress, averaged over successful trajectories;
* trajectory ranking: Kendall tau-a of failure < suboptimal < successful within each task, on the last
  frame's progress;
* failure detection, failure = positive class, two ways, each named in the table:
  - the node's own verdicts ("node_F1", the figure a robot gets): every episode is replayed through the
    ScoringSession with the node's settings (config/reward_node.yaml or ``--params-file``) and its
    EpisodeMonitor; an episode is flagged when a failure flag was raised during it or at its end
    (robometer_ros.training.recipe.verdicts); also precision, recall, false-alarm rate and detection delay;
  - the offline rule of `FailureRule` on the whole-episode subsample ("offline_F1"; default: final success
    probability < 0.5 AND final progress < 0.5 -> predicted failure);
* preference accuracy on pairs of the same task with different quality labels ("different_quality")
  and on pairs of two tasks shown with one task's instruction ("different_task"); the side of the
  better trajectory is randomised (seeded).

Writes OUT/metrics.json (settings, metrics per source, per-episode predictions; NaN written as null),
prints a table, and draws OUT/plots/*.png: predicted vs target progress (and success probability) for a
few episodes.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robometer_ros.training.recipe.validation import (
    TABLE_LEGEND,
    EvalOptions,
    FailureRule,
    Predictor,
    TorchPredictor,
    evaluate_collection,
    format_table,
)

BUNDLE_MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------- predictors
class EnginePredictor:
    """A bundle run through RewardEngine (frames are added, scored and forgotten per trajectory)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.num_frames = int(engine.num_frames)
        self._serial = 0

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str = "auto", device: str | None = None) -> EnginePredictor:
        from robometer_ros.engine.reward_engine import RewardEngine

        return cls(RewardEngine(path, backend=backend, device=device, verify_checksums=False))

    @property
    def frame_size(self) -> tuple[int, int]:
        return tuple(self.engine.frame_size)  # type: ignore[return-value]

    def _add(self, frames: np.ndarray) -> list[tuple[int, int]]:
        self._serial += 1
        ids = [(self._serial, i) for i in range(len(frames))]
        for frame_id, frame in zip(ids, frames):
            self.engine.add_frame(frame_id, np.ascontiguousarray(frame))
        return ids

    def score(self, instructions: Sequence[str], frames: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        results = []
        for instruction, trajectory in zip(instructions, frames):
            ids = self._add(trajectory)
            try:
                scores = self.engine.score(instruction, ids)
            finally:
                self.engine.forget(ids)
            results.append((np.asarray(scores.progress), np.asarray(scores.success_probability)))
        return results

    def preference(
        self, instructions: Sequence[str], frames_a: Sequence[np.ndarray], frames_b: Sequence[np.ndarray]
    ) -> list[float]:
        results = []
        for instruction, a, b in zip(instructions, frames_a, frames_b):
            ids_a, ids_b = self._add(a), self._add(b)
            try:
                results.append(float(self.engine.preference(instruction, ids_a, ids_b)))
            finally:
                self.engine.forget(ids_a + ids_b)
        return results

    def close(self) -> None:
        self.engine.close()


def is_bundle(path: str | Path) -> bool:
    """A bundle directory has manifest.json; a checkpoint has config.json + safetensors."""
    return (Path(path) / BUNDLE_MANIFEST).is_file()


def open_predictor(path: str | Path, backend: str = "auto", device: str | None = None,
                   tokenizer_dir: str | None = None, frame_size: Sequence[int] | None = None,
                   batch_size: int = 8) -> Predictor:
    """A bundle (through RewardEngine) or a checkpoint directory (torch), by what the directory holds."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a directory (expected a checkpoint or a bundle)")
    if is_bundle(p):
        if frame_size is not None:
            raise ValueError("--frame-size applies to checkpoints; a bundle has its own fixed frame size")
        return EnginePredictor.from_bundle(p, backend=backend, device=device)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} holds neither manifest.json (bundle) nor config.json (checkpoint)")
    return TorchPredictor.from_checkpoint(p, tokenizer_dir, device, frame_size, batch_size)


# ---------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class JpegTransport:
    """Frames as a camera sends them over image_transport ``compressed``: each frame JPEG-encoded at its own
    size (libjpeg-turbo, ``quality``) and decoded by the node's decoder (robometer_ros.images)."""

    quality: int = 95

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        import simplejpeg

        from robometer_ros.images import compressed_to_rgb

        return np.stack([
            compressed_to_rgb("jpeg", simplejpeg.encode_jpeg(np.ascontiguousarray(f), quality=self.quality,
                                                             colorspace="RGB"))
            for f in frames
        ])



def resolve_split(dataset: str | Path, split: str) -> str | None:
    """``auto`` -> "val" when the dataset has that split (a val/ dataset or episodes tagged val), else None
    (every episode); any other name as it is ("all" -> None)."""
    if split == "all":
        return None
    if split != "auto":
        return split
    root = Path(dataset)
    if (root / "val" / "dataset.json").is_file():
        return "val"
    from robometer_ros.training.data.store import Dataset

    if (root / "dataset.json").is_file() and any(m.metadata.get("split") == "val" for m in Dataset(root).metas):
        return "val"
    return None


def _frame_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[x,](\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"frame size must look like 256x320 (HxW), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by robometer-eval and robometer-score for opening a checkpoint or a bundle."""
    parser.add_argument("model", help="checkpoint directory (config.json + safetensors) or bundle directory")
    parser.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "onnxruntime", "torch"),
                        help="bundle backend (RewardEngine); ignored for checkpoints (always torch)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--tokenizer-dir", help="tokenizer.json directory for a checkpoint that ships none")
    parser.add_argument("--frame-size", type=_frame_size, metavar="HxW",
                        help="checkpoints only: resize frames to this (default: the size it was trained at)")
    parser.add_argument("--batch-size", type=int, default=8, help="trajectories per forward pass (torch)")


def main(argv: list[str] | None = None) -> int:
    """Console entry point of robometer-eval."""
    parser = argparse.ArgumentParser(prog="robometer-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--dataset", required=True, help="dataset directory (robometer-dataset)")
    parser.add_argument("--split", default="auto", help="split to evaluate (DIR/<split>/ or metadata 'split'; "
                        "'all' = every episode; default auto = val if the dataset has one, else all)")
    parser.add_argument("--params-file", action="append", default=[],
                        help="the node's parameter files for its verdicts (session settings, monitor thresholds; "
                        "repeatable, later wins; default: the package's config/reward_node.yaml)")
    parser.add_argument("--transport", choices=("raw", "jpeg"), default="raw",
                        help="jpeg: every frame JPEG-encoded at its size and decoded by the node's decoder, as over "
                        "image_transport compressed (the common real-robot transport)")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="--transport jpeg quality (image_transport's "
                        "default 95)")
    parser.add_argument("--wording", choices=("stored", "train", "heldout"), default="stored",
                        help="the instruction the model is given: the stored one, or per episode one of its task's "
                        "training / held-out wordings from --phrasings (metrics still group by the stored one)")
    parser.add_argument("--phrasings", help="task catalog YAML for --wording (default: the package's "
                        "robometer_ros/training/data/metaworld_tasks.yaml)")
    parser.add_argument("--no-node-verdicts", action="store_true", help="skip replaying episodes through the node's "
                        "session and monitor")
    parser.add_argument("--out", required=True, help="output directory (metrics.json, plots/)")
    parser.add_argument("--max-trajectories", type=int, default=0, help="cap on trajectories (0 = all)")
    parser.add_argument("--max-pairs", type=int, default=200, help="preference pairs of each kind (0 = none)")
    parser.add_argument("--success-threshold", type=float, default=0.5,
                        help="failure rule: last-frame P(success) below this ...")
    parser.add_argument("--progress-threshold", type=float, default=0.5,
                        help="... and last-frame progress below this => predicted failure")
    parser.add_argument("--success-cutoff", action="append", default=[], metavar="SOURCE=C",
                        help="completion cutoff of a data source for the targets (repeatable)")
    parser.add_argument("--plots", type=int, default=6, help="episodes to plot")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from robometer_ros.engine.bundle import BundleError
    from robometer_ros.training.data.store import DatasetError, open_split

    try:
        cutoffs = {}
        for item in args.success_cutoff:
            source, _, value = item.partition("=")
            if not source or not value:
                raise ValueError(f"--success-cutoff {item!r} must look like SOURCE=0.95")
            cutoffs[source] = float(value)
        split = resolve_split(args.dataset, args.split)
        collection = open_split(args.dataset, split)
        predictor = open_predictor(args.model, args.backend, args.device, args.tokenizer_dir, args.frame_size,
                                   args.batch_size)
        rephrase = None
        if args.wording != "stored":
            from robometer_ros.training.data.metaworld import TASKS_FILE, TaskCatalog

            catalog = TaskCatalog.load(args.phrasings or TASKS_FILE)
            for instruction in sorted({m.instruction for m in collection.metas}):
                catalog.wording(instruction, "", args.wording)  # every task known, before any scoring

            def rephrase(text: str, key: str) -> str:
                return catalog.wording(text, key, args.wording)
        session = None
        if not args.no_node_verdicts:
            from robometer_ros.node_parameters import session_config_from_files

            session = session_config_from_files(args.params_file, predictor.num_frames)
    except (BundleError, DatasetError, FileNotFoundError, ValueError) as error:
        print(f"robometer-eval: {error}", file=sys.stderr)
        return 2
    options = EvalOptions(
        max_trajectories=args.max_trajectories,
        max_pairs=args.max_pairs,
        success_cutoffs=cutoffs,
        failure_rule=FailureRule(args.success_threshold, args.progress_threshold),
        session=session,
        frame_transform=JpegTransport(args.jpeg_quality) if args.transport == "jpeg" else None,
        rephrase=rephrase,
        num_plots=args.plots,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    settings = {"model": str(args.model), "dataset": str(args.dataset), "split": split or "all",
                "params_files": args.params_file or ["config/reward_node.yaml"],
                "transport": args.transport if args.transport == "raw" else f"jpeg quality {args.jpeg_quality}",
                "wording": args.wording,
                "runner": getattr(getattr(predictor, "engine", None), "backend_name", "torch")}
    metrics = evaluate_collection(predictor, collection, options, args.out, settings)
    print(f"{len(collection)} episodes of {args.dataset} (split {split or 'all'})")
    print(format_table(metrics))
    print(TABLE_LEGEND)
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
