"""The reward node's verdicts on labelled episodes: what a robot's failure flag would have said, and how good
that is (failure-detection precision / recall / F1, false-alarm rate, detection delay).

Episodes are scored once through the ScoringSession (``score_episodes``: every frame offered at its camera
stamp, every admitted frame scored, ``end`` with the episode's outcome, exactly as the node runs), and their
per-step scores are kept, so the EpisodeMonitor can be re-run with any thresholds without the model
(``judge``): robometer-calibrate searches thresholds that way, robometer-eval reports the node's verdicts.

The rule behind every figure here: an episode is *predicted failed* when the node raised a failure flag at
any time during it or at its end (any reason: STALLED, REGRESSED, SUCCESS_LOST, TIMEOUT, MODEL_ERROR or the
end-of-episode LOW_SUCCESS_AT_END) — what a FailureFlag subscriber or a safety trigger sees. It is
*actually failed* when its quality label is ``failure`` (``successful`` and ``suboptimal`` episodes reached
the goal); episodes labelled ``unknown`` are left out. A false alarm is a flag raised on an episode that
did not fail.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robometer_ros.monitor import EventKind, MonitorConfig, Outcome
from robometer_ros.session import ScoringSession, SessionConfig, monitor_events, replay
from robometer_ros.trajectory import FAILURE, Trajectory

RULE = ("node monitor: a failure flag raised during the episode or at its end (any reason); failure = "
        "quality label 'failure'")
KNOWN_LABELS = ("failure", "suboptimal", "successful")


@dataclass
class ScoredEpisode:
    """One labelled episode scored as the node scores it, with what the monitor needs to judge it again.

    Attributes:
        episode_id, instruction, task, data_source, quality_label: from the trajectory.
        step_scores: [steps, 3] (camera stamp s, progress, success probability) per scoring step.
        start_s, end_s: camera stamps of the first and last frame.
        onset_s: camera time the failure began where the data says (e.g. a stall's first step), else None.
        frames_offered, frames_admitted: the session's admission.
    """

    episode_id: str
    instruction: str
    task: str
    data_source: str
    quality_label: str
    step_scores: np.ndarray
    start_s: float
    end_s: float
    onset_s: float | None = None
    frames_offered: int = 0
    frames_admitted: int = 0

    @property
    def failed(self) -> bool:
        """The label says the episode failed."""
        return self.quality_label == FAILURE

    @property
    def duration_s(self) -> float:
        """Camera seconds from the first to the last frame."""
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Verdict:
    """The node's verdict on one episode under one MonitorConfig."""

    episode: ScoredEpisode
    predicted_failure: bool
    first_alarm_s: float | None
    first_alarm_reason: str
    end_verdict: str

    @property
    def delay_s(self) -> float | None:
        """Seconds from the failure onset (or, where none is known, from the episode end) to the first flag;
        None when no flag was raised."""
        if self.first_alarm_s is None:
            return None
        origin = self.episode.onset_s if self.episode.onset_s is not None else self.episode.end_s
        return self.first_alarm_s - origin


def failure_onset(trajectory: Trajectory) -> float | None:
    """The camera time a labelled failure began, where the data says: ``metadata["failure_onset_s"]``, or a
    Meta-World stall's first still step; None otherwise."""
    meta = trajectory.metadata
    if trajectory.quality_label != FAILURE:
        return None
    if "failure_onset_s" in meta:
        return float(meta["failure_onset_s"])
    params = meta.get("behaviour_params") or {}
    if meta.get("behaviour") == "stall" and "stall_step" in params and "control_dt" in meta:
        return float(trajectory.frame_stamps[0]) + float(params["stall_step"]) * float(meta["control_dt"])
    return None


def label_outcome(label: str) -> Outcome:
    """The ~/end_episode outcome a robot stack would give an episode of this quality label."""
    return {FAILURE: Outcome.FAILURE, "successful": Outcome.SUCCESS, "suboptimal": Outcome.SUCCESS}.get(
        label, Outcome.UNKNOWN)


def score_episodes(engine: Any, trajectories: Iterable[Trajectory], config: SessionConfig,
                   progress_bar: bool = False, batch_size: int = 16) -> list[ScoredEpisode]:
    """Score every trajectory through one ScoringSession as the node would (its frames offered at their
    stamps, ``end`` with the label's outcome); episodes whose label is not known are skipped."""
    session = ScoringSession(engine, config)
    iterator: Iterable[Trajectory] = trajectories
    if progress_bar:
        from tqdm import tqdm

        iterator = tqdm(trajectories, desc="score", unit="episode")
    scored: list[ScoredEpisode] = []
    for trajectory in iterator:
        if trajectory.quality_label not in KNOWN_LABELS:
            continue
        stamps = np.asarray(trajectory.frame_stamps, dtype=np.float64)
        stamps_ns = np.round(stamps * 1e9).astype(np.int64)
        result = replay(session, trajectory.instruction, stamps_ns, trajectory.frames,
                        label_outcome(trajectory.quality_label), batch_size=batch_size)
        scored.append(ScoredEpisode(
            episode_id=trajectory.episode_id, instruction=trajectory.instruction,
            task=str(trajectory.metadata.get("task", trajectory.instruction)), data_source=trajectory.data_source,
            quality_label=trajectory.quality_label, step_scores=result.step_scores(),
            start_s=float(stamps[0]), end_s=float(stamps[-1]), onset_s=failure_onset(trajectory),
            frames_offered=result.frames_offered, frames_admitted=result.frames_admitted,
        ))
    return scored


def judge(episodes: Sequence[ScoredEpisode], monitor: MonitorConfig) -> list[Verdict]:
    """The node's verdict on each episode under ``monitor`` (re-runs only the monitor)."""
    verdicts = []
    for episode in episodes:
        events = monitor_events(episode.step_scores, monitor, episode.end_s, label_outcome(episode.quality_label))
        alarms = [e for e in events if e.kind is EventKind.FAILURE_RAISED]
        end = "failed" if _failed_at_end(events) else "succeeded"
        verdicts.append(Verdict(episode, bool(alarms), alarms[0].stamp_s if alarms else None,
                                alarms[0].reason.name if alarms else "", end))
    return verdicts


def _failed_at_end(events: Sequence[Any]) -> bool:
    failed = False
    for event in events:
        if event.kind is EventKind.FAILURE_RAISED:
            failed = True
        elif event.kind is EventKind.FAILURE_CLEARED:
            failed = False
    return failed


@dataclass
class DetectionFigures:
    """Failure-detection figures of a set of verdicts (failure = positive class)."""

    episodes: int
    failures: int
    true_positives: int
    false_positives: int
    false_negatives: int
    precision: float
    recall: float
    f1: float
    false_alarm_rate: float  # flagged non-failure episodes / non-failure episodes
    delay_from_onset_s: float  # median, over detected failures with a known onset (NaN if none)
    delay_from_end_s: float  # median, over detected failures without one (negative = before the end)
    reasons: dict[str, int] = field(default_factory=dict)  # first alarm reason over all flagged episodes

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN -> None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


def detection_figures(verdicts: Sequence[Verdict]) -> DetectionFigures:
    """Precision, recall, F1, false-alarm rate and detection delays of the node's verdicts."""
    tp = sum(v.predicted_failure and v.episode.failed for v in verdicts)
    fp = sum(v.predicted_failure and not v.episode.failed for v in verdicts)
    fn = sum(not v.predicted_failure and v.episode.failed for v in verdicts)
    negatives = sum(not v.episode.failed for v in verdicts)
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    onset = [v.delay_s for v in verdicts if v.predicted_failure and v.episode.failed and v.episode.onset_s is not None]
    ends = [v.delay_s for v in verdicts if v.predicted_failure and v.episode.failed and v.episode.onset_s is None]
    reasons: dict[str, int] = {}
    for v in verdicts:
        if v.predicted_failure:
            reasons[v.first_alarm_reason] = reasons.get(v.first_alarm_reason, 0) + 1
    return DetectionFigures(
        episodes=len(verdicts), failures=tp + fn, true_positives=tp, false_positives=fp, false_negatives=fn,
        precision=precision, recall=recall, f1=f1, false_alarm_rate=fp / negatives if negatives else math.nan,
        delay_from_onset_s=float(np.median(onset)) if onset else math.nan,
        delay_from_end_s=float(np.median(ends)) if ends else math.nan,
        reasons=dict(sorted(reasons.items())),
    )


def bootstrap_intervals(verdicts: Sequence[Verdict], samples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (episodes resampled) of precision, recall, F1 and false-alarm rate."""
    if not verdicts:
        return {}
    rng = np.random.default_rng(seed)
    predicted = np.asarray([v.predicted_failure for v in verdicts])
    actual = np.asarray([v.episode.failed for v in verdicts])
    values: dict[str, list[float]] = {"precision": [], "recall": [], "f1": [], "false_alarm_rate": []}
    for _ in range(samples):
        pick = rng.integers(0, len(verdicts), len(verdicts))
        p, a = predicted[pick], actual[pick]
        tp, fp, fn = int(np.sum(p & a)), int(np.sum(p & ~a)), int(np.sum(~p & a))
        values["precision"].append(tp / (tp + fp) if tp + fp else math.nan)
        values["recall"].append(tp / (tp + fn) if tp + fn else math.nan)
        values["f1"].append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan)
        negatives = int(np.sum(~a))
        values["false_alarm_rate"].append(fp / negatives if negatives else math.nan)
    low, high = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for name, series in values.items():
        finite = np.asarray([x for x in series if math.isfinite(x)])
        out[name] = (float(np.percentile(finite, low)), float(np.percentile(finite, high))) if finite.size else (
            math.nan, math.nan)
    return out


def figures_by(verdicts: Sequence[Verdict], key: str = "task") -> dict[str, DetectionFigures]:
    """detection_figures per task (or per data_source)."""
    groups: dict[str, list[Verdict]] = {}
    for v in verdicts:
        groups.setdefault(str(getattr(v.episode, key)), []).append(v)
    return {name: detection_figures(group) for name, group in sorted(groups.items())}


def format_figures(name: str, figures: DetectionFigures,
                   intervals: dict[str, tuple[float, float]] | None = None) -> str:
    """One line: episodes, P / R / F1 (with intervals), false-alarm rate, delays."""
    def cell(metric: str) -> str:
        value = getattr(figures, metric)
        text = "-" if not math.isfinite(value) else f"{value:.3f}"
        if intervals and metric in intervals and all(math.isfinite(x) for x in intervals[metric]):
            text += f" [{intervals[metric][0]:.2f}, {intervals[metric][1]:.2f}]"
        return text

    delays = []
    if math.isfinite(figures.delay_from_onset_s):
        delays.append(f"delay from onset {figures.delay_from_onset_s:+.2f} s")
    if math.isfinite(figures.delay_from_end_s):
        delays.append(f"from end {figures.delay_from_end_s:+.2f} s")
    return (f"{name}: {figures.episodes} episodes ({figures.failures} failures)  P {cell('precision')}  "
            f"R {cell('recall')}  F1 {cell('f1')}  false alarms {cell('false_alarm_rate')}"
            + (f"  {', '.join(delays)}" if delays else ""))
