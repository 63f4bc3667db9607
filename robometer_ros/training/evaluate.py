"""`robometer-eval CHECKPOINT_OR_BUNDLE --dataset DIR [--split val] --out DIR`: the paper's metrics.

    robometer-eval runs/tiny/best --dataset data/synth --split val --out runs/tiny/eval
    robometer-eval runs/tiny/bundle --dataset data/synth --split val --out runs/tiny/eval_bundle

The model is either a PyTorch checkpoint directory (released Robometer layout; run with torch, batched)
or a bundle directory (run through `RewardEngine`, so the exported ONNX / TensorRT engine is what gets
measured). Per trajectory of the split, the progress-only prompt scores `num_frames` frames subsampled
with the first and last kept; targets are absolute_first_frame progress (reference 2.2). Metrics
(`robometer_ros.training.metrics`, per data source and overall):

* VOC: Pearson r of predicted vs target progress, averaged over successful trajectories;
* trajectory ranking: Kendall tau-a of failure < suboptimal < successful within each task, on the last
  frame's progress;
* failure detection, failure = positive class, two ways, each named in the table:
  - the node's own verdicts ("node_F1", the figure a robot gets): every episode is replayed through the
    ScoringSession with the node's settings (config/reward_node.yaml or ``--params-file``) and its
    EpisodeMonitor; an episode is flagged when a failure flag was raised during it or at its end
    (robometer_ros.training.verdicts); also precision, recall, false-alarm rate and detection delay;
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
import contextlib
import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from robometer_ros.session import SessionConfig
from robometer_ros.training.data import TrajectoryCollection
from robometer_ros.training.metrics import EpisodeResult, PreferenceResult, evaluate
from robometer_ros.training.sampling import ProgressSample, ProgressSampler, SamplingConfig
from robometer_ros.training.verdicts import RULE, detection_figures, figures_by, judge, score_episodes
from robometer_ros.trajectory import FAILURE, QUALITY_LABELS, SUCCESSFUL

BUNDLE_MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------- predictors
class Predictor(Protocol):
    """Scores trajectories: what evaluation and scoring need from a model, whatever runs it."""

    num_frames: int

    def score(self, instructions: Sequence[str], frames: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per trajectory (uint8 [F, H, W, 3], already subsampled): (progress [F], success probability [F])."""
        ...

    def preference(
        self, instructions: Sequence[str], frames_a: Sequence[np.ndarray], frames_b: Sequence[np.ndarray]
    ) -> list[float]:
        """P(A makes more progress than B) per pair."""
        ...


class TorchPredictor:
    """A RobometerModel (optionally DDP/FSDP-wrapped `RobometerBatchModule`) run in batches with torch.

    Args:
        module: a RobometerBatchModule, a DDP/FSDP-wrapped one, or a bare RobometerModel.
        collator: the BatchCollator (tokenizer, frame size) the model was trained with.
        device: where inputs go.
        amp_dtype: bf16 autocast dtype on CUDA, or None.
        num_frames: frames per scored prompt.
        batch_size: prompts per forward pass.
    """

    def __init__(self, module: Any, collator: Any, device: Any, amp_dtype: Any = None, num_frames: int = 8,
                 batch_size: int = 8) -> None:
        from robometer_ros.model.robometer import RobometerModel
        from robometer_ros.training.collate import RobometerBatchModule

        if isinstance(module, RobometerModel):
            module = RobometerBatchModule(module)
        self.module = module
        self.collator = collator
        self.device = device
        self.amp_dtype = amp_dtype
        self.num_frames = num_frames
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, tokenizer_dir: str | None = None, device: str | None = None,
                        frame_size: Sequence[int] | None = None, batch_size: int = 8) -> TorchPredictor:
        """Load a checkpoint directory; the frame size defaults to the one it was trained with."""
        import torch

        from robometer_ros.model.checkpoint import load_checkpoint
        from robometer_ros.training.collate import BatchCollator
        from robometer_ros.training.trainer import read_training_info

        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, info = load_checkpoint(path, tokenizer_dir=tokenizer_dir, dtype=torch.float32, device=target)
        model.eval()
        if frame_size is None:
            frame_size = read_training_info(path).get("frame_size")
        collator = BatchCollator(info.tokenizer, model.config.spatial_merge_size, frame_size)
        amp = torch.bfloat16 if target.type == "cuda" else None
        return cls(model, collator, target, amp, num_frames=model.config.num_frames, batch_size=batch_size)

    @property
    def frame_size(self) -> tuple[int, int] | None:
        return self.collator.frame_size

    @property
    def engine(self) -> CheckpointEngine:
        """This checkpoint behind the engine interface the ScoringSession scores through."""
        return CheckpointEngine(self)

    def _run(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from robometer_ros.training.collate import model_inputs

        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            return self.module(**model_inputs(batch, self.device))

    def score(self, instructions: Sequence[str], frames: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        import torch

        from robometer_ros.model.heads import expected_progress

        results = []
        for start in range(0, len(frames), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            out = self._run(self.collator.progress_batch(instructions[chunk], frames[chunk]))
            progress = expected_progress(out["progress_logits"]).cpu().numpy()
            success = torch.sigmoid(out["success_logits"].float()).cpu().numpy()
            results += [(progress[i], success[i]) for i in range(progress.shape[0])]
        return results

    def preference(
        self, instructions: Sequence[str], frames_a: Sequence[np.ndarray], frames_b: Sequence[np.ndarray]
    ) -> list[float]:
        import torch

        results: list[float] = []
        for start in range(0, len(frames_a), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            out = self._run(self.collator.preference_batch(instructions[chunk], frames_a[chunk], frames_b[chunk]))
            results += torch.sigmoid(out["preference_logits"].float()).cpu().tolist()
        return results


@dataclass(frozen=True)
class StepScores:
    """Per-frame scores of one step (the part of RewardEngine's Scores the ScoringSession reads)."""

    progress: np.ndarray
    success_probability: np.ndarray


class CheckpointEngine:
    """A PyTorch checkpoint behind the RewardEngine interface of the ScoringSession (add_frame, score,
    score_batch, forget). Frames are kept as images and every step runs the whole model on its frames:
    the same scores as a bundle of the checkpoint, without the frame cache's speed."""

    def __init__(self, predictor: TorchPredictor) -> None:
        self.predictor = predictor
        self.num_frames = predictor.num_frames
        self.backend_name = "torch"
        self.model_id = "checkpoint"
        self._frames: dict[Any, np.ndarray] = {}

    def add_frame(self, frame_id: Any, image: np.ndarray) -> None:
        self._frames[frame_id] = np.ascontiguousarray(image)

    def forget(self, frame_ids: Any) -> None:
        for frame_id in frame_ids:
            self._frames.pop(frame_id, None)

    def score(self, instruction: str, frame_ids: Sequence[Any]) -> StepScores:
        return self.score_batch(instruction, [frame_ids])[0]

    def score_batch(self, instruction: str, frame_id_lists: Sequence[Sequence[Any]]) -> list[StepScores]:
        stacks = [np.stack([self._frames[i] for i in ids]) for ids in frame_id_lists]
        return [StepScores(p, q) for p, q in self.predictor.score([instruction] * len(stacks), stacks)]


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


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class FailureRule:
    """Episode-level failure prediction: failure if the LAST frame's success probability is below
    `success_threshold` AND its progress is below `progress_threshold` (the paper does not publish its
    rule; this one flags episodes that neither look done nor got far)."""

    success_threshold: float = 0.5
    progress_threshold: float = 0.5

    def __call__(self, progress: np.ndarray, success_probability: np.ndarray) -> bool:
        return bool(success_probability[-1] < self.success_threshold and progress[-1] < self.progress_threshold)


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


@dataclass
class EvalOptions:
    """What to evaluate and how.

    Attributes:
        max_trajectories: cap on scored trajectories (0 = all), taken evenly over the split.
        max_pairs: cap on preference pairs of each kind (0 = none).
        success_cutoffs: per-source completion cutoffs for the progress targets.
        failure_rule: the offline episode-level failure predictor.
        session: the node's settings to replay every episode with (the node's verdicts); None skips them.
        frame_transform: applied to every episode's frames before scoring (e.g. JpegTransport: the camera's
            compressed transport); None = the stored frames.
        rephrase: (stored instruction, key) -> the wording the model is given (e.g. a held-out phrasing of the
            episode's task; key = the episode id, or a pair's number); metrics still group episodes by the
            stored instruction. None = the stored instruction.
        num_plots: episodes drawn as PNG progress curves.
        batch_size: trajectories per scoring call.
        seed: pair selection and side randomisation.
    """

    max_trajectories: int = 0
    max_pairs: int = 200
    success_cutoffs: dict[str, float] = field(default_factory=dict)
    failure_rule: FailureRule = field(default_factory=FailureRule)
    session: SessionConfig | None = None
    frame_transform: Callable[[np.ndarray], np.ndarray] | None = None
    rephrase: Callable[[str, str], str] | None = None
    num_plots: int = 6
    batch_size: int = 8
    seed: int = 0


def _evenly(count: int, limit: int) -> list[int]:
    if limit <= 0 or count <= limit:
        return list(range(count))
    return sorted({int(i) for i in np.linspace(0, count - 1, limit).round()})


def _transformed(item: Any, options: EvalOptions, key: str | None = None) -> Any:
    """What the model is shown of a sample or trajectory: its frames through ``options.frame_transform`` and
    its instruction through ``options.rephrase`` (key: the episode id unless given); a copy, or the item."""
    changes: dict[str, Any] = {}
    if options.frame_transform is not None:
        changes["frames"] = options.frame_transform(np.asarray(item.frames))
    if options.rephrase is not None:
        changes["instruction"] = options.rephrase(item.instruction, item.episode_id if key is None else key)
    return dataclasses.replace(item, **changes) if changes else item


def score_trajectories(
    predictor: Predictor, collection: TrajectoryCollection, options: EvalOptions
) -> list[tuple[ProgressSample, np.ndarray, np.ndarray]]:
    """(sample, predicted progress, success probability) for the chosen trajectories of a collection."""
    sampler = ProgressSampler(
        collection,
        SamplingConfig(num_frames=predictor.num_frames, success_cutoffs=dict(options.success_cutoffs)),
    )
    positions = _evenly(len(collection), options.max_trajectories)
    results = []
    for start in range(0, len(positions), options.batch_size):
        samples = [sampler[p] for p in positions[start : start + options.batch_size]]
        shown = [_transformed(s, options) for s in samples]
        scored = predictor.score([s.instruction for s in shown], [s.frames for s in shown])
        results += [(s, prog, succ) for s, (prog, succ) in zip(samples, scored)]
    return results


def preference_pairs(
    collection: TrajectoryCollection, max_pairs: int, seed: int
) -> list[tuple[str, int, int, str, str]]:
    """(kind, better position, worse position, instruction, data source) pairs.

    different_quality: same task, better label vs worse label; different_task: a successful trajectory
    of the task vs a successful trajectory of another task, both shown with the first one's instruction.
    """
    rank = {label: i for i, label in enumerate(QUALITY_LABELS)}
    metas = collection.metas
    rng = np.random.default_rng([seed, 1])
    by_task = collection.indices_by_task_and_label()
    quality: list[tuple[str, int, int, str, str]] = []
    for task, by_label in by_task.items():
        labels = sorted((label for label in by_label if label in rank), key=rank.__getitem__)  # not unknown
        for i, worse_label in enumerate(labels):
            for better_label in labels[i + 1:]:
                for better in by_label[better_label]:
                    for worse in by_label[worse_label]:
                        quality.append(("different_quality", better, worse, task, metas[better].data_source))
    successful = {task: by_label.get(SUCCESSFUL, []) for task, by_label in by_task.items()}
    tasks = [t for t, items in successful.items() if items]
    different: list[tuple[str, int, int, str, str]] = []
    for task in tasks:
        for other in tasks:
            if other != task:
                for better in successful[task]:
                    for worse in successful[other]:
                        different.append(("different_task", better, worse, task, metas[better].data_source))
    chosen = []
    for pool in (quality, different):
        if max_pairs > 0 and len(pool) > max_pairs:
            pool = [pool[i] for i in sorted(rng.choice(len(pool), size=max_pairs, replace=False))]
        elif max_pairs <= 0:
            pool = []
        chosen += pool
    return chosen


def evaluate_preferences(
    predictor: Predictor, collection: TrajectoryCollection, options: EvalOptions
) -> list[PreferenceResult]:
    """Preference accuracy inputs: each pair scored once, the better trajectory on a random side."""
    pairs = preference_pairs(collection, options.max_pairs, options.seed)
    if not pairs:
        return []
    sampler = ProgressSampler(collection, SamplingConfig(num_frames=predictor.num_frames))
    rng = np.random.default_rng([options.seed, 2])
    sides = rng.integers(0, 2, size=len(pairs))
    results: list[PreferenceResult] = []
    for start in range(0, len(pairs), options.batch_size):
        chunk = pairs[start : start + options.batch_size]
        labels = sides[start : start + options.batch_size]
        a_frames, b_frames, instructions = [], [], []
        for number, ((_, better, worse, task, _), label) in enumerate(zip(chunk, labels), start=start):
            first, second = (better, worse) if label == 1 else (worse, better)
            a_frames.append(_transformed(sampler[first], options).frames)
            b_frames.append(_transformed(sampler[second], options).frames)
            instructions.append(options.rephrase(task, f"pair{number}") if options.rephrase else task)
        probabilities = predictor.preference(instructions, a_frames, b_frames)
        for (kind, _, _, _, source), label, probability in zip(chunk, labels, probabilities):
            results.append(PreferenceResult(source, float(probability), int(label), kind))
    return results


def json_ready(value: Any) -> Any:
    """NaN / inf -> None, recursively (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return json_ready(value.item())
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    return value


def evaluate_collection(
    predictor: Predictor,
    collection: TrajectoryCollection,
    options: EvalOptions | None = None,
    out_dir: str | Path | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Score a collection and compute every metric; with `out_dir`, write metrics.json and plots.

    Returns metrics per data source and "overall" (metrics.evaluate's layout, NaN where undefined).
    """
    options = options or EvalOptions()
    if len(collection) == 0:
        raise ValueError("the evaluation split has no episodes")
    scored = score_trajectories(predictor, collection, options)
    episodes = [
        EpisodeResult(
            episode_id=s.episode_id,
            instruction=s.instruction,
            data_source=s.data_source,
            quality_label=s.quality_label,
            predicted_progress=np.asarray(progress, dtype=np.float64),
            target_progress=np.asarray(s.progress, dtype=np.float64),
            predicted_failure=options.failure_rule(progress, success),
        )
        for s, progress, success in scored
    ]
    pairs = evaluate_preferences(predictor, collection, options)
    metrics = evaluate(episodes, pairs, failure_labels=(FAILURE,))
    verdicts: list[Any] = []
    if options.session is not None:
        verdicts = node_verdicts(predictor, collection, options)
        for name, figures in (("overall", detection_figures(verdicts)), *figures_by(verdicts, "data_source").items()):
            metrics.setdefault(name, {}).update({f"node_{k}": v for k, v in figures.as_dict().items()
                                                 if not isinstance(v, dict)})
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "settings": json_ready({
                **(settings or {}),
                "num_frames": predictor.num_frames,
                "trajectories": len(episodes),
                "pairs": len(pairs),
                "failure_rule": asdict(options.failure_rule),
                "node_verdicts": None if options.session is None else {
                    "rule": RULE, "session": options.session.parameters()},
                "max_trajectories": options.max_trajectories,
                "max_pairs": options.max_pairs,
                "seed": options.seed,
            }),
            "metrics": json_ready(metrics),
            "episodes": [
                json_ready({
                    "episode_id": s.episode_id,
                    "instruction": s.instruction,
                    "data_source": s.data_source,
                    "quality_label": s.quality_label,
                    "frame_indices": s.frame_indices,
                    "target_progress": s.progress,
                    "predicted_progress": progress,
                    "success_probability": success,
                    "predicted_failure": options.failure_rule(progress, success),
                })
                for s, progress, success in scored
            ],
            "node_verdicts": [
                json_ready({"episode_id": v.episode.episode_id, "quality_label": v.episode.quality_label,
                         "predicted_failure": v.predicted_failure, "first_alarm_reason": v.first_alarm_reason,
                         "first_alarm_s": v.first_alarm_s, "delay_s": v.delay_s, "end_verdict": v.end_verdict,
                         "steps": len(v.episode.step_scores)})
                for v in verdicts
            ],
        }
        (out / "metrics.json").write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
        plot_progress_curves(scored, out / "plots", options.num_plots)
    return metrics


def node_verdicts(predictor: Predictor, collection: TrajectoryCollection, options: EvalOptions) -> list[Any]:
    """The node's verdict on every chosen episode: replayed through the ScoringSession with
    ``options.session`` (its monitor included), as a robot would have scored it."""
    assert options.session is not None
    positions = _evenly(len(collection), options.max_trajectories)
    scored = score_episodes(predictor.engine, (_transformed(collection[p], options) for p in positions),
                            options.session)
    return judge(scored, options.session.monitor)


# ---------------------------------------------------------------------------------------------- output
TABLE_COLUMNS = (
    ("episodes", "episodes", "{:d}"),
    ("voc", "VOC", "{:.3f}"),
    ("kendall_tau", "tau_a", "{:.3f}"),
    ("ranking_accuracy", "rank_acc", "{:.3f}"),
    ("succ_fail_diff", "succ-fail", "{:.3f}"),
    ("node_f1", "node_F1", "{:.3f}"),
    ("node_precision", "node_P", "{:.3f}"),
    ("node_recall", "node_R", "{:.3f}"),
    ("node_false_alarm_rate", "node_FAR", "{:.3f}"),
    ("failure_f1", "offline_F1", "{:.3f}"),
    ("preference_accuracy_different_quality", "pref_qual", "{:.3f}"),
    ("preference_accuracy_different_task", "pref_task", "{:.3f}"),
    ("preference_accuracy", "pref_all", "{:.3f}"),
)


TABLE_LEGEND = (
    "node_*: the node's own verdicts (" + RULE + "); node_FAR = flagged non-failure episodes / non-failure "
    "episodes.\noffline_F1: FailureRule on the whole-episode subsample (final success and progress both below "
    "their thresholds)."
)


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table: one row per data source (overall first), one column per headline metric."""
    names = ["overall", *sorted(k for k in metrics if k != "overall")]
    width = max(12, *(len(n) for n in names))
    header = "source".ljust(width) + "".join(f"{title:>11}" for _, title, _ in TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    for name in names:
        row = metrics.get(name, {})
        cells = []
        for key, _, fmt in TABLE_COLUMNS:
            value = row.get(key)
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                cells.append(f"{'-':>11}")
            else:
                if isinstance(value, float):
                    value = round(value, 3) + 0.0  # no "-0.000"
                cells.append(f"{fmt.format(value):>11}")
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:80] or "episode"


def plot_progress_curves(
    scored: Sequence[tuple[ProgressSample, np.ndarray, np.ndarray]], out_dir: str | Path, count: int
) -> list[Path]:
    """PNG per episode: predicted vs target progress and success probability over the scored frames.

    Picks up to `count` episodes spread over the quality labels (successful first) so that good and bad
    episodes are both shown.
    """
    if count <= 0 or not scored:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label: dict[str, list[int]] = {}
    for i, (sample, _, _) in enumerate(scored):
        by_label.setdefault(sample.quality_label, []).append(i)
    order = [SUCCESSFUL, *(label for label in QUALITY_LABELS[::-1] if label != SUCCESSFUL)]
    picked: list[int] = []
    while len(picked) < min(count, len(scored)):
        for label in order:
            pool = by_label.get(label, [])
            if pool and len(picked) < count:
                picked.append(pool.pop(0))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in picked:
        sample, progress, success = scored[i]
        figure, axis = plt.subplots(figsize=(5.0, 3.2), dpi=100)
        x = np.asarray(sample.frame_indices)
        axis.plot(x, sample.progress, "o-", color="0.4", label="target progress")
        axis.plot(x, progress, "o-", color="tab:blue", label="predicted progress")
        axis.plot(x, success, "s--", color="tab:green", label="P(success)")
        axis.set_ylim(-0.05, 1.05)
        axis.set_xlabel("stored frame index")
        axis.set_title(f"{sample.episode_id} ({sample.quality_label})\n{sample.instruction[:60]}", fontsize=8)
        axis.legend(fontsize=7, loc="upper left")
        figure.tight_layout()
        path = out / f"{_safe_name(sample.episode_id)}.png"
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written


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
    from robometer_ros.training.data import Dataset

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
                        "robometer_ros/training/metaworld_tasks.yaml)")
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
    from robometer_ros.training.data import DatasetError
    from robometer_ros.training.trainer import open_split

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
            from robometer_ros.training.metaworld import TASKS_FILE, TaskCatalog

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
