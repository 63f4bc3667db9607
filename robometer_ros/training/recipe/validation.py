"""Held-out evaluation of a model on a trajectory collection: the paper's metrics, the node's verdicts.

The trainer runs it on its held-out split every ``eval.every`` steps (and picks ``best/`` by it);
robometer-eval (``robometer_ros.training.evaluation.evaluate``) runs it on a checkpoint or a bundle.
What is measured (``robometer_ros.training.recipe.metrics``, per data source and overall): VOC, Kendall
tau-a trajectory ranking, failure detection by the node's own verdicts (``recipe.verdicts``) and by the
offline `FailureRule`, preference accuracy on pairs of different quality and of different tasks; see
robometer-eval's documentation for the definitions.

A model is anything with the `Predictor` interface: `TorchPredictor` runs a RobometerModel (or a
DDP/FSDP-wrapped one) in batches with the training collator; `CheckpointEngine` puts it behind the
engine interface the ScoringSession scores through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from robometer_ros.session import SessionConfig
from robometer_ros.training.data.store import TrajectoryCollection
from robometer_ros.training.recipe.metrics import EpisodeResult, PreferenceResult, evaluate
from robometer_ros.training.recipe.sampling import ProgressSample, ProgressSampler, SamplingConfig
from robometer_ros.training.recipe.verdicts import RULE, detection_figures, figures_by, judge, score_episodes
from robometer_ros.trajectory import FAILURE, QUALITY_LABELS, SUCCESSFUL


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
        from robometer_ros.training.recipe.collate import RobometerBatchModule

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
        from robometer_ros.training.recipe.collate import BatchCollator
        from robometer_ros.training.recipe.config import read_training_info

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

        from robometer_ros.training.recipe.collate import model_inputs

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

