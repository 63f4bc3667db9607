"""Preference-pair and progress samples for training and evaluation (reference section 2.2-2.3).

A `PairSampler` turns a TrajectoryCollection into an indexable stream of `PairSample`s: for sample
index i it draws, with a numpy Generator seeded from (seed, i), one of four strategies

  * SUBOPTIMAL        chosen: a successful trajectory; rejected: a failure / suboptimal one of the same
                      task (or, for partial-success data, a same-task one at least 0.2 lower);
  * DIFFERENT_TASK    rejected: a successful trajectory of another task, shown with the chosen one's
                      instruction, its progress and success labels zeroed;
  * REWIND            rejected: the chosen trajectory played f1 -> f3 and then back down to f2;
  * REVERSE_PROGRESS  rejected: the chosen trajectory played f3 -> f1;

picks the chosen / rejected frame paths, subsamples each to `num_frames` (first and last kept), builds
the labels and randomises which side (A or B) is the chosen one. Progress and success are supervised on
trajectory A only (the model is causal: A's prog tokens never see B), so only A's labels are fields;
B's are in `metadata` for analysis.

Labels (absolute_first_frame): for a frame path with start s = min(path), N stored frames and the data
source's completion cutoff c, progress y_i = min(1, (idx_i - s) / max(1, int(c * N) - s - 1)); success
= y >= c; the success mask leaves out the ambiguous band 0.5 <= y < c. Failure / suboptimal
trajectories: progress mask 0, success labels all 0 (all frames used). Different-task rejected
trajectories: progress and success all 0, progress mask 1. Partial-success trajectories (partial_success
set and < 1): progress 0 except the last stored frame, which gets the partial-success value.

Pure numpy (+ PIL for optional resizing): no torch. A PairSampler is a map-style dataset
(`len`, `sampler[i]`), so torch's DataLoader can wrap it directly.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from PIL import Image

from robometer_ros.episode import subsample_indices
from robometer_ros.training.data.store import EpisodeMeta, TrajectoryCollection
from robometer_ros.trajectory import FAILURE, SUBOPTIMAL, SUCCESSFUL, UNKNOWN


class Strategy(str, enum.Enum):
    """How the rejected trajectory of a preference pair is made."""

    SUBOPTIMAL = "suboptimal"
    DIFFERENT_TASK = "different_task"
    REWIND = "rewind"
    REVERSE_PROGRESS = "reverse_progress"


class SamplingError(RuntimeError):
    """The collection cannot produce the samples asked for (names what is missing)."""


@dataclass
class SamplingConfig:
    """Knobs of the samplers; defaults follow the released Robometer training config.

    Attributes:
        num_frames: frames per trajectory side after subsampling (8).
        strategy_ratios: relative weight of each Strategy (by value name); uniform by default.
            Strategies the collection cannot serve (e.g. DIFFERENT_TASK with one task) are left out.
        success_cutoffs: per data_source completion cutoff c (progress reaches 1 at c * N frames).
        default_cutoff: cutoff for sources not in success_cutoffs (1.0).
        min_success: progress below which a frame is a sure "not yet successful" (0.5).
        partial_success_threshold: least |partial_success difference| for a partial-success pair (0.2).
        different_task_same_source_prob: chance the DIFFERENT_TASK negative comes from the same source (0.5).
        source_weights: relative weight of each data source when picking a trajectory (default 1.0 each).
        preference_only_sources: sources whose progress is never supervised (progress mask 0).
        min_frames: trajectories with fewer stored frames are not sampled (3 is the least a segment needs).
        use_known_progress: take progress targets from Trajectory.progress where stored (e.g. simulator
            progress) instead of absolute_first_frame.
        frame_size: resize every frame to (height, width) if set; None keeps the stored size.
        epoch_size: len() of a PairSampler; None means the number of sampleable trajectories.
        instruction_phrasings: stored instruction -> the wordings a pair may show instead (one drawn per
            pair, for both sides, so the model learns the task rather than one string); instructions not
            listed are shown as stored.
    """

    num_frames: int = 8
    strategy_ratios: dict[str, float] = field(default_factory=lambda: {s.value: 1.0 for s in Strategy})
    success_cutoffs: dict[str, float] = field(default_factory=dict)
    default_cutoff: float = 1.0
    min_success: float = 0.5
    partial_success_threshold: float = 0.2
    different_task_same_source_prob: float = 0.5
    source_weights: dict[str, float] = field(default_factory=dict)
    preference_only_sources: tuple[str, ...] = ()
    min_frames: int = 3
    use_known_progress: bool = False
    frame_size: tuple[int, int] | None = None
    epoch_size: int | None = None
    instruction_phrasings: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be >= 2, got {self.num_frames}")
        unknown = set(self.strategy_ratios) - {s.value for s in Strategy}
        if unknown:
            raise ValueError(
                f"unknown strategies {sorted(unknown)} in strategy_ratios; "
                f"known: {[s.value for s in Strategy]}"
            )
        if any(r < 0 for r in self.strategy_ratios.values()) or not any(self.strategy_ratios.values()):
            raise ValueError(f"strategy_ratios must be >= 0 with one > 0, got {self.strategy_ratios}")
        for source, cutoff in {**self.success_cutoffs, "<default>": self.default_cutoff}.items():
            if not 0.0 < cutoff <= 1.0:
                raise ValueError(f"success cutoff of {source!r} must be in (0, 1], got {cutoff}")
        if self.min_frames < 3:
            raise ValueError(
                f"min_frames must be >= 3 (a segment needs 3 distinct frames), got {self.min_frames}"
            )
        if self.frame_size is not None:
            self.frame_size = (int(self.frame_size[0]), int(self.frame_size[1]))
        self.preference_only_sources = tuple(self.preference_only_sources)
        empty = sorted(k for k, wordings in self.instruction_phrasings.items() if not wordings)
        if empty:
            raise ValueError(f"instruction_phrasings has no wordings for {empty}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingConfig:
        """Build from a config mapping (e.g. the trainer's YAML `sampling:` section); unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown sampling options {sorted(unknown)}; known: {sorted(known)}")
        values = dict(values)
        if "strategy_ratios" in values:
            # Partial dicts override the uniform default only for the strategies they name.
            values["strategy_ratios"] = {**{s.value: 1.0 for s in Strategy}, **values["strategy_ratios"]}
        if values.get("frame_size") is not None:
            values["frame_size"] = tuple(values["frame_size"])
        if "preference_only_sources" in values:
            values["preference_only_sources"] = tuple(values["preference_only_sources"])
        return cls(**values)

    def cutoff(self, data_source: str) -> float:
        """Completion cutoff of a data source."""
        return float(self.success_cutoffs.get(data_source, self.default_cutoff))


@dataclass
class TrajectoryLabels:
    """Targets of one subsampled trajectory side."""

    progress: np.ndarray  # float32 [F]
    progress_mask: float  # 0 or 1: whether progress is supervised for this side
    success: np.ndarray  # float32 [F], 0 / 1
    success_mask: np.ndarray  # float32 [F], 0 / 1


@dataclass
class PairSample:
    """One preference pair. Label 1 means trajectory A is the chosen (better) one.

    Attributes:
        frames_a, frames_b: uint8 [F, H, W, 3] (the two sides may differ in H, W unless frame_size is set).
        instruction: the prompt's task for both sides: the chosen trajectory's instruction, or a wording of it
            drawn from SamplingConfig.instruction_phrasings.
        progress_a: float32 [F] progress targets of A; progress_mask_a: 0/1 for the whole side.
        success_a: float32 [F] success targets of A; success_mask_a: float32 [F] frames that count.
        preference_label: 1 if A is chosen, 0 if B is.
        strategy: the Strategy value that built the pair.
        metadata: ids, frame indices, sources and labels of both sides (B's targets included).
    """

    frames_a: np.ndarray
    frames_b: np.ndarray
    instruction: str
    progress_a: np.ndarray
    progress_mask_a: float
    success_a: np.ndarray
    success_mask_a: np.ndarray
    preference_label: int
    strategy: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProgressSample:
    """One trajectory for progress / success evaluation or progress-only training.

    Attributes:
        frames: uint8 [F, H, W, 3]; frame_indices: the stored-frame index of each.
        instruction, episode_id, data_source, quality_label: from the trajectory.
        progress, progress_mask, success, success_mask: targets as in PairSample (side A).
        metadata: the trajectory's metadata.
    """

    frames: np.ndarray
    frame_indices: np.ndarray
    instruction: str
    episode_id: str
    data_source: str
    quality_label: str
    progress: np.ndarray
    progress_mask: float
    success: np.ndarray
    success_mask: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)


def absolute_first_frame_progress(path: Sequence[int], n_frames: int, cutoff: float) -> np.ndarray:
    """Progress of each stored-frame index on `path`: 0 at the path's lowest index, 1 at the cutoff.

    y_i = min(1, (idx_i - s) / max(1, int(cutoff * n_frames) - s - 1)) with s = min(path).
    """
    indices = np.asarray(path, dtype=np.float64)
    start = indices.min()
    cutoff_index = int(cutoff * n_frames)
    return np.minimum(1.0, (indices - start) / max(1.0, cutoff_index - start - 1)).astype(np.float32)


def success_labels(progress: np.ndarray, cutoff: float, min_success: float) -> tuple[np.ndarray, np.ndarray]:
    """(success, success_mask) from progress targets: success = y >= cutoff; frames with
    min_success <= y < cutoff are ambiguous and masked out."""
    success = (progress >= cutoff).astype(np.float32)
    mask = ((progress < min_success) | (success > 0)).astype(np.float32)
    return success, mask


def _is_partial(meta: EpisodeMeta) -> bool:
    return meta.partial_success is not None and meta.partial_success < 1.0


def _random_forward_path(rng: np.random.Generator, n_frames: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Three distinct sorted stored-frame indices f1 < f2 < f3 and the forward path f1..f3."""
    f1, f2, f3 = (int(i) for i in np.sort(rng.choice(n_frames, size=3, replace=False)))
    return np.arange(f1, f3 + 1), (f1, f2, f3)


def _random_rewind_path(rng: np.random.Generator, n_frames: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """f1 -> f3 forward, then back down to f2 (f3 is not repeated)."""
    forward, (f1, f2, f3) = _random_forward_path(rng, n_frames)
    return np.concatenate([forward, np.arange(f3 - 1, f2 - 1, -1)]), (f1, f2, f3)


def _random_reverse_path(rng: np.random.Generator, n_frames: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """f3 -> f1, played backwards."""
    forward, triple = _random_forward_path(rng, n_frames)
    return forward[::-1].copy(), triple


@dataclass
class _Side:
    """One side of a pair before its frames are loaded."""

    position: int
    path: np.ndarray  # stored-frame indices in play order (before subsampling)
    role: str  # "normal", "different_task" or "rewind"


class _LabelMaker:
    """Frame selection, loading and labels shared by PairSampler and ProgressSampler."""

    def __init__(self, collection: TrajectoryCollection, config: SamplingConfig) -> None:
        self.collection = collection
        self.config = config

    def build(self, side: _Side) -> tuple[np.ndarray, np.ndarray, TrajectoryLabels]:
        """(frames [F,H,W,3], stored-frame indices [F], labels) of one side."""
        config = self.config
        meta = self.collection.metas[side.position]
        selection = subsample_indices(len(side.path), config.num_frames)
        frame_indices = side.path[selection]
        trajectory = self.collection.trajectory(side.position, frame_indices)
        frames = trajectory.frames
        if config.frame_size is not None and frames.shape[1:3] != config.frame_size:
            height, width = config.frame_size
            frames = np.stack(
                [np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR)) for f in frames]
            )
        cutoff = config.cutoff(meta.data_source)
        count = len(frame_indices)
        if side.role == "different_task":
            progress = np.zeros(count, dtype=np.float32)
        elif _is_partial(meta):
            is_last = frame_indices == meta.n_frames - 1
            progress = np.where(is_last, meta.partial_success, 0.0).astype(np.float32)
        elif config.use_known_progress and trajectory.progress is not None:
            progress = np.clip(trajectory.progress, 0.0, 1.0).astype(np.float32)
        else:
            progress = absolute_first_frame_progress(side.path, meta.n_frames, cutoff)[selection]
        if side.role == "different_task" or (meta.quality_label != SUCCESSFUL and not _is_partial(meta)):
            success = np.zeros(count, dtype=np.float32)
            success_mask = np.ones(count, dtype=np.float32)
        else:
            success, success_mask = success_labels(progress, cutoff, config.min_success)
        if meta.data_source in config.preference_only_sources:
            progress_mask = 0.0
        elif side.role in ("different_task", "rewind") or _is_partial(meta):
            progress_mask = 1.0
        else:
            progress_mask = 1.0 if meta.quality_label == SUCCESSFUL else 0.0
        return frames, frame_indices, TrajectoryLabels(progress, progress_mask, success, success_mask)


class PairSampler:
    """Indexable, reproducible stream of PairSamples over a TrajectoryCollection.

    `sampler[i]` always returns the same pair for the same (collection, config, seed, i), in any process
    and in any order, so it can be used as a torch map-style dataset with any number of workers.

    Raises SamplingError at construction if no strategy can be served (e.g. no successful trajectory of
    at least `min_frames` frames).
    """

    def __init__(self, collection: TrajectoryCollection, config: SamplingConfig | None = None, seed: int = 0):
        self.collection = collection
        self.config = config or SamplingConfig()
        self.seed = int(seed)
        self._labels = _LabelMaker(collection, self.config)
        metas = collection.metas
        labelled = [m for m in metas if m.quality_label != UNKNOWN]  # no outcome: no target to learn
        self.excluded_unknown = len(metas) - len(labelled)
        usable = [m for m in labelled if m.n_frames >= self.config.min_frames]
        self.excluded_short = len(labelled) - len(usable)
        self._usable_count = len(usable)
        self._metas = metas

        successful = [m for m in usable if m.quality_label == SUCCESSFUL and not _is_partial(m)]
        self._successful_by_task: dict[str, list[int]] = {}
        # source -> task -> successful positions (DIFFERENT_TASK negatives from the same source)
        self._successful_by_source_task: dict[str, dict[str, list[int]]] = {}
        for m in successful:
            self._successful_by_task.setdefault(m.instruction, []).append(m.index)
            self._successful_by_source_task.setdefault(m.data_source, {}).setdefault(m.instruction, []).append(
                m.index
            )
        self._successful = [m.index for m in successful]
        self._worse_by_task: dict[str, list[int]] = {}
        for m in usable:
            if m.quality_label in (FAILURE, SUBOPTIMAL) and m.partial_success is None:
                self._worse_by_task.setdefault(m.instruction, []).append(m.index)
        self._partial_by_task: dict[str, list[int]] = {}
        for m in usable:
            if m.partial_success is not None:
                self._partial_by_task.setdefault(m.instruction, []).append(m.index)
        # per task, the lowest and highest partial-success score: a trajectory has a partner iff it is
        # at least the threshold away from one of them (O(1) instead of scanning the task)
        self._partial_range = {
            task: (min(metas[p].partial_success for p in positions), max(metas[p].partial_success for p in positions))
            for task, positions in self._partial_by_task.items()
        }

        # Candidate first picks of each strategy, grouped by data source.
        candidates: dict[Strategy, dict[str, list[int]]] = {s: {} for s in Strategy}
        for m in usable:
            task = m.instruction
            if m.partial_success is not None:
                low, high = self._partial_range[task]
                threshold = self.config.partial_success_threshold - 1e-9
                if high - m.partial_success >= threshold or m.partial_success - low >= threshold:
                    candidates[Strategy.SUBOPTIMAL].setdefault(m.data_source, []).append(m.index)
            elif (
                m.quality_label in (SUCCESSFUL, FAILURE, SUBOPTIMAL)
                and self._successful_by_task.get(task)
                and self._worse_by_task.get(task)
            ):
                candidates[Strategy.SUBOPTIMAL].setdefault(m.data_source, []).append(m.index)
        if len(self._successful_by_task) >= 2:
            for m in successful:
                candidates[Strategy.DIFFERENT_TASK].setdefault(m.data_source, []).append(m.index)
        for m in successful:
            candidates[Strategy.REWIND].setdefault(m.data_source, []).append(m.index)
            candidates[Strategy.REVERSE_PROGRESS].setdefault(m.data_source, []).append(m.index)
        self._candidates = candidates

        weights = np.array(
            [self.config.strategy_ratios.get(s.value, 0.0) if candidates[s] else 0.0 for s in Strategy]
        )
        if weights.sum() <= 0:
            raise SamplingError(
                f"no pair strategy can be sampled from {len(metas)} episodes "
                f"({self.excluded_short} shorter than min_frames={self.config.min_frames}, "
                f"{self.excluded_unknown} with an unknown outcome): "
                f"available strategies {[s.value for s in Strategy if candidates[s]]}, "
                f"ratios {self.config.strategy_ratios}. REWIND/REVERSE need a successful trajectory, "
                "SUBOPTIMAL a task with successful and failure/suboptimal trajectories, "
                "DIFFERENT_TASK successful trajectories of two tasks"
            )
        self.strategy_probabilities = {s.value: float(w / weights.sum()) for s, w in zip(Strategy, weights)}
        self._strategy_weights = weights / weights.sum()

    def __len__(self) -> int:
        if self.config.epoch_size is not None:
            return int(self.config.epoch_size)
        return self._usable_count

    def __getitem__(self, index: int) -> PairSample:
        return self.sample(index)

    def _partial_partners(self, position: int) -> list[int]:
        meta = self._metas[position]
        threshold = self.config.partial_success_threshold
        return [
            p
            for p in self._partial_by_task.get(meta.instruction, [])
            if p != position
            and abs(self._metas[p].partial_success - meta.partial_success) >= threshold - 1e-9
        ]

    def _pick_source(self, rng: np.random.Generator, sources: Sequence[str]) -> str:
        weights = np.array([self.config.source_weights.get(s, 1.0) for s in sources], dtype=np.float64)
        if weights.sum() <= 0:
            raise SamplingError(f"source_weights give zero weight to every eligible source {list(sources)}")
        return sources[int(rng.choice(len(sources), p=weights / weights.sum()))]

    def sample(self, index: int) -> PairSample:
        """The pair at `index` (any int >= 0; the same index always gives the same pair)."""
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, int(index)])
        strategy = list(Strategy)[int(rng.choice(len(Strategy), p=self._strategy_weights))]
        by_source = self._candidates[strategy]
        source = self._pick_source(rng, sorted(by_source))
        pool = by_source[source]
        picked = pool[int(rng.integers(len(pool)))]
        chosen, rejected = self._make_sides(rng, strategy, picked)

        chosen_frames, chosen_indices, chosen_labels = self._labels.build(chosen)
        rejected_frames, rejected_indices, rejected_labels = self._labels.build(rejected)
        chosen_meta, rejected_meta = self._metas[chosen.position], self._metas[rejected.position]
        preference_label = int(rng.integers(0, 2))
        if preference_label == 1:
            frames_a, frames_b = chosen_frames, rejected_frames
            labels_a, labels_b = chosen_labels, rejected_labels
        else:
            frames_a, frames_b = rejected_frames, chosen_frames
            labels_a, labels_b = rejected_labels, chosen_labels
        metadata = {
            "index": int(index),
            "chosen_episode_id": chosen_meta.episode_id,
            "rejected_episode_id": rejected_meta.episode_id,
            "chosen_frame_indices": chosen_indices.tolist(),
            "rejected_frame_indices": rejected_indices.tolist(),
            "chosen_data_source": chosen_meta.data_source,
            "rejected_data_source": rejected_meta.data_source,
            "chosen_quality_label": chosen_meta.quality_label,
            "rejected_quality_label": rejected_meta.quality_label,
            "rejected_instruction": rejected_meta.instruction,
            "data_source": chosen_meta.data_source,
            "progress_b": labels_b.progress,
            "progress_mask_b": labels_b.progress_mask,
            "success_b": labels_b.success,
            "success_mask_b": labels_b.success_mask,
            "stored_instruction": chosen_meta.instruction,
        }
        # Drawn last, so a config without phrasings gives the same pairs as before.
        wordings = self.config.instruction_phrasings.get(chosen_meta.instruction)
        instruction = wordings[int(rng.integers(len(wordings)))] if wordings else chosen_meta.instruction
        return PairSample(
            frames_a=frames_a,
            frames_b=frames_b,
            instruction=instruction,
            progress_a=labels_a.progress,
            progress_mask_a=labels_a.progress_mask,
            success_a=labels_a.success,
            success_mask_a=labels_a.success_mask,
            preference_label=preference_label,
            strategy=strategy.value,
            metadata=metadata,
        )

    def _make_sides(self, rng: np.random.Generator, strategy: Strategy, picked: int) -> tuple[_Side, _Side]:
        meta = self._metas[picked]
        n = meta.n_frames
        if strategy is Strategy.REWIND:
            return (_Side(picked, _random_forward_path(rng, n)[0], "normal"),
                    _Side(picked, _random_rewind_path(rng, n)[0], "rewind"))
        if strategy is Strategy.REVERSE_PROGRESS:
            return (_Side(picked, _random_forward_path(rng, n)[0], "normal"),
                    _Side(picked, _random_reverse_path(rng, n)[0], "normal"))
        if strategy is Strategy.DIFFERENT_TASK:
            other = self._different_task_partner(rng, meta)
            return (_Side(picked, _random_forward_path(rng, n)[0], "normal"),
                    _Side(other, _random_forward_path(rng, self._metas[other].n_frames)[0], "different_task"))
        # SUBOPTIMAL
        if meta.partial_success is not None:
            partners = self._partial_partners(picked)
            other = partners[int(rng.integers(len(partners)))]
            better, worse = (picked, other)
            if self._metas[other].partial_success > meta.partial_success:
                better, worse = other, picked
            # Whole trajectories, so the last frame (which carries the partial-success value) is shown.
            return (_Side(better, np.arange(self._metas[better].n_frames), "normal"),
                    _Side(worse, np.arange(self._metas[worse].n_frames), "normal"))
        if meta.quality_label == SUCCESSFUL:
            worse_pool = self._worse_by_task[meta.instruction]
            worse = worse_pool[int(rng.integers(len(worse_pool)))]
            return (_Side(picked, _random_forward_path(rng, n)[0], "normal"),
                    _Side(worse, _random_forward_path(rng, self._metas[worse].n_frames)[0], "normal"))
        # A failure / suboptimal pick is the rejected side and a successful one of its task the chosen
        # side, both whole trajectories (reference 2.3, special case).
        better_pool = self._successful_by_task[meta.instruction]
        better = better_pool[int(rng.integers(len(better_pool)))]
        return (_Side(better, np.arange(self._metas[better].n_frames), "normal"),
                _Side(picked, np.arange(n), "normal"))

    def _different_task_partner(self, rng: np.random.Generator, meta: EpisodeMeta) -> int:
        by_task = self._successful_by_source_task[meta.data_source]
        others = [(task, positions) for task, positions in by_task.items() if task != meta.instruction]
        if others and rng.random() < self.config.different_task_same_source_prob:
            # uniform over the source's successful trajectories of other tasks
            draw = int(rng.integers(sum(len(positions) for _, positions in others)))
            for _, positions in others:
                if draw < len(positions):
                    return positions[draw]
                draw -= len(positions)
        # Any source: pick another task uniformly, then a trajectory of it.
        tasks = [t for t in self._successful_by_task if t != meta.instruction]
        task = tasks[int(rng.integers(len(tasks)))]
        pool = self._successful_by_task[task]
        return pool[int(rng.integers(len(pool)))]


class ProgressSampler:
    """Progress samples (one trajectory, its labels) for evaluation or progress-only training.

    With `random_segments=False` (evaluation) `sampler[i]` is trajectory i subsampled whole to
    num_frames, deterministic. With `random_segments=True` it is a random forward segment f1..f3 of
    trajectory i, seeded from (seed, i).
    """

    def __init__(
        self,
        collection: TrajectoryCollection,
        config: SamplingConfig | None = None,
        random_segments: bool = False,
        seed: int = 0,
    ) -> None:
        self.collection = collection
        self.config = config or SamplingConfig()
        self.random_segments = random_segments
        self.seed = int(seed)
        self._labels = _LabelMaker(collection, self.config)

    def __len__(self) -> int:
        return len(self.collection)

    def __getitem__(self, position: int) -> ProgressSample:
        return self.sample(position)

    def sample(self, position: int) -> ProgressSample:
        """The progress sample of trajectory `position`."""
        if not 0 <= position < len(self.collection):
            raise IndexError(f"trajectory position {position} out of range for {len(self.collection)}")
        meta = self.collection.metas[position]
        if self.random_segments and meta.n_frames >= 3:
            rng = np.random.default_rng([self.seed, int(position)])
            path = _random_forward_path(rng, meta.n_frames)[0]
        else:
            path = np.arange(meta.n_frames)
        frames, frame_indices, labels = self._labels.build(_Side(position, path, "normal"))
        return ProgressSample(
            frames=frames,
            frame_indices=frame_indices,
            instruction=meta.instruction,
            episode_id=meta.episode_id,
            data_source=meta.data_source,
            quality_label=meta.quality_label,
            progress=labels.progress,
            progress_mask=labels.progress_mask,
            success=labels.success,
            success_mask=labels.success_mask,
            metadata=dict(meta.metadata),
        )


def stack_pair_labels(samples: Sequence[PairSample]) -> dict[str, np.ndarray]:
    """Batch the labels of PairSamples: progress_a [B,F], progress_mask_a [B], success_a [B,F],
    success_mask_a [B,F], preference_label [B] (float32), as `losses.robometer_loss` takes them."""
    if not samples:
        raise ValueError("no samples to stack")
    return {
        "progress_a": np.stack([s.progress_a for s in samples]).astype(np.float32),
        "progress_mask_a": np.array([s.progress_mask_a for s in samples], dtype=np.float32),
        "success_a": np.stack([s.success_a for s in samples]).astype(np.float32),
        "success_mask_a": np.stack([s.success_mask_a for s in samples]).astype(np.float32),
        "preference_label": np.array([s.preference_label for s in samples], dtype=np.float32),
    }
