"""Evaluation metrics of the Robometer paper (reference section 4.1), in numpy only.

* VOC (value order correlation): per trajectory, the Pearson r between predicted and target progress;
  averaged over successful trajectories only.
* Kendall tau-a: (C - D) / (n (n - 1) / 2); a pair tied on either side is in neither C nor D but
  stays in the denominator.
* Trajectory ranking: within each task, tau-a between the gold order failure < suboptimal < successful
  and each trajectory's reward (its last predicted progress), averaged over every combination of one
  trajectory per present label, then per task, then over tasks (tasks need >= 2 labels present).
* Failure detection: precision / recall / F1 with failure as the positive class (plus TPR / TNR).
* Preference accuracy: how often P(A better) > 0.5 agrees with "A is chosen".
`evaluate` computes them all per data source and overall from per-episode and per-pair results.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robometer_ros.trajectory import FAILURE, QUALITY_LABELS, SUCCESSFUL, UNKNOWN

GOLD_RANK = {label: rank for rank, label in enumerate(QUALITY_LABELS, start=1)}  # failure 1 .. successful 3
OVERALL = "overall"


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation of two equal-length sequences; NaN when either is constant or has < 2 values."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"pearson needs equal lengths, got {a.size} and {b.size}")
    if a.size < 2:
        return math.nan
    a = a - a.mean()
    b = b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    if denominator == 0.0:
        return math.nan
    return float(a @ b) / denominator


def value_order_correlation(
    predicted: Sequence[Sequence[float] | np.ndarray],
    target: Sequence[Sequence[float] | np.ndarray],
    quality_labels: Sequence[str] | None = None,
) -> float:
    """Mean per-trajectory Pearson r between predicted and target progress over successful trajectories.

    Trajectories whose r is undefined (constant prediction or target) are left out; NaN if none is left.
    `quality_labels` None means every trajectory counts as successful.
    """
    if len(predicted) != len(target):
        raise ValueError(f"{len(predicted)} predicted and {len(target)} target progress sequences")
    if quality_labels is not None and len(quality_labels) != len(predicted):
        raise ValueError(f"{len(quality_labels)} quality labels for {len(predicted)} trajectories")
    values = []
    for i, (p, t) in enumerate(zip(predicted, target)):
        if quality_labels is not None and quality_labels[i] != SUCCESSFUL:
            continue
        r = pearson(p, t)
        if not math.isnan(r):
            values.append(r)
    return float(np.mean(values)) if values else math.nan


def kendall_tau_a(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Kendall tau-a = (concordant - discordant) / (n (n - 1) / 2); ties count in neither. NaN if n < 2."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"kendall_tau_a needs equal lengths, got {a.size} and {b.size}")
    n = a.size
    if n < 2:
        return math.nan
    upper = np.triu_indices(n, k=1)
    signs = np.sign(a[:, None] - a[None, :]) * np.sign(b[:, None] - b[None, :])
    return float(signs[upper].sum()) / (n * (n - 1) / 2)


@dataclass
class RankingResult:
    """Trajectory-ranking metrics.

    Attributes:
        kendall_tau: mean over tasks of the per-task mean tau-a over label combinations (NaN if no task).
        ranking_accuracy: mean over tasks of the share of different-label pairs ordered correctly
            (a tie is not correct).
        per_task: task -> mean tau-a.
        tasks_used: tasks with >= 2 quality labels present.
    """

    kendall_tau: float
    ranking_accuracy: float
    per_task: dict[str, float] = field(default_factory=dict)
    tasks_used: int = 0


def trajectory_ranking(
    tasks: Sequence[str], quality_labels: Sequence[str], rewards: Sequence[float] | np.ndarray
) -> RankingResult:
    """Kendall tau-a between gold ranks (failure 1 < suboptimal 2 < successful 3) and rewards per task.

    For a task the official metric averages tau-a over every combination of one trajectory per present
    label. Each combination's tau-a is a sum over label pairs of sign(r_better - r_worse) divided by
    k (k - 1) / 2, and the combinations are a full product, so the average is computed exactly as the
    sum over label pairs of the mean sign over all cross pairs, without enumerating combinations.
    """
    rewards = np.asarray(rewards, dtype=np.float64).ravel()
    if not len(tasks) == len(quality_labels) == rewards.size:
        raise ValueError(f"{len(tasks)} tasks, {len(quality_labels)} labels and {rewards.size} rewards")
    unknown = set(quality_labels) - set(GOLD_RANK)
    if unknown:
        raise ValueError(f"unknown quality labels {sorted(unknown)}; expected {QUALITY_LABELS}")
    groups: dict[str, dict[str, list[float]]] = {}
    for task, label, reward in zip(tasks, quality_labels, rewards):
        groups.setdefault(task, {}).setdefault(label, []).append(float(reward))
    per_task: dict[str, float] = {}
    accuracies = []
    for task, by_label in groups.items():
        present = sorted(by_label, key=GOLD_RANK.__getitem__)
        if len(present) < 2:
            continue
        k = len(present)
        sign_sum = 0.0
        correct = 0
        pairs = 0
        for i in range(k):
            for j in range(i + 1, k):
                worse = np.asarray(by_label[present[i]])
                better = np.asarray(by_label[present[j]])
                difference = better[None, :] - worse[:, None]
                sign_sum += float(np.sign(difference).mean())
                correct += int((difference > 0).sum())
                pairs += difference.size
        per_task[task] = sign_sum / (k * (k - 1) / 2)
        accuracies.append(correct / pairs)
    if not per_task:
        return RankingResult(math.nan, math.nan, {}, 0)
    return RankingResult(
        kendall_tau=float(np.mean(list(per_task.values()))),
        ranking_accuracy=float(np.mean(accuracies)),
        per_task=per_task,
        tasks_used=len(per_task),
    )


def failure_detection(
    predicted_failure: Sequence[bool] | np.ndarray, actual_failure: Sequence[bool] | np.ndarray
) -> dict[str, float]:
    """Precision, recall (= TPR), F1, TNR and counts with failure as the positive class.

    Undefined ratios (no predicted positives, no actual positives, ...) are NaN; F1 is 0 when there are
    actual or predicted failures but none is caught.
    """
    predicted = np.asarray(predicted_failure, dtype=bool).ravel()
    actual = np.asarray(actual_failure, dtype=bool).ravel()
    if predicted.shape != actual.shape:
        raise ValueError(f"{predicted.size} predictions for {actual.size} episodes")
    tp = int((predicted & actual).sum())
    fp = int((predicted & ~actual).sum())
    fn = int((~predicted & actual).sum())
    tn = int((~predicted & ~actual).sum())

    def ratio(numerator: int, denominator: int) -> float:
        return numerator / denominator if denominator else math.nan

    precision = ratio(tp, tp + fp)
    recall = ratio(tp, tp + fn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tpr": recall,
        "tnr": ratio(tn, tn + fp),
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "true_negatives": tn,
    }


def preference_accuracy(
    probability_a: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray
) -> float:
    """Share of pairs where P(A better) > 0.5 matches label 1 (A chosen) / <= 0.5 matches label 0.
    NaN for no pairs."""
    probabilities = np.asarray(probability_a, dtype=np.float64).ravel()
    truth = np.asarray(labels).ravel().astype(bool)
    if probabilities.shape != truth.shape:
        raise ValueError(f"{probabilities.size} probabilities for {truth.size} labels")
    if probabilities.size == 0:
        return math.nan
    return float(((probabilities > 0.5) == truth).mean())


@dataclass
class EpisodeResult:
    """What the evaluator predicted for one episode.

    Attributes:
        episode_id, instruction, data_source, quality_label: from the dataset.
        predicted_progress: [F] predicted progress at the evaluated frames (the last is the reward).
        target_progress: [F] target progress at the same frames.
        predicted_failure: the failure detector's verdict, or None if not run.
    """

    episode_id: str
    instruction: str
    data_source: str
    quality_label: str
    predicted_progress: np.ndarray
    target_progress: np.ndarray
    predicted_failure: bool | None = None


@dataclass
class PreferenceResult:
    """One evaluated pair: P(A better), the truth (1 = A chosen), the strategy and source."""

    data_source: str
    probability_a: float
    label: int
    strategy: str = ""


def _episode_metrics(episodes: Sequence[EpisodeResult], failure_labels: Iterable[str]) -> dict[str, Any]:
    failure_labels = set(failure_labels)
    metrics: dict[str, Any] = {"episodes": len(episodes)}
    # Episodes whose outcome is unknown have no gold label: counted, but left out of every label-based metric.
    metrics["unknown_label_episodes"] = sum(e.quality_label == UNKNOWN for e in episodes)
    episodes = [e for e in episodes if e.quality_label != UNKNOWN]
    metrics["voc"] = value_order_correlation(
        [e.predicted_progress for e in episodes],
        [e.target_progress for e in episodes],
        [e.quality_label for e in episodes],
    )
    metrics["voc_trajectories"] = sum(e.quality_label == SUCCESSFUL for e in episodes)
    # Tasks are keyed by (source, instruction): the same sentence in two datasets is two tasks.
    ranking = trajectory_ranking(
        [f"{e.data_source}\x1f{e.instruction}" for e in episodes],
        [e.quality_label for e in episodes],
        [float(np.asarray(e.predicted_progress).ravel()[-1]) for e in episodes],
    )
    metrics["kendall_tau"] = ranking.kendall_tau
    metrics["ranking_accuracy"] = ranking.ranking_accuracy
    metrics["ranking_tasks"] = ranking.tasks_used
    final = {label: [] for label in QUALITY_LABELS}
    for e in episodes:
        final[e.quality_label].append(float(np.asarray(e.predicted_progress).ravel()[-1]))
    for label, values in final.items():
        metrics[f"mean_final_progress_{label}"] = float(np.mean(values)) if values else math.nan
    metrics["succ_fail_diff"] = metrics[f"mean_final_progress_{SUCCESSFUL}"] - metrics[
        f"mean_final_progress_{FAILURE}"
    ]
    judged = [e for e in episodes if e.predicted_failure is not None]
    if judged:
        detection = failure_detection(
            [bool(e.predicted_failure) for e in judged], [e.quality_label in failure_labels for e in judged]
        )
        metrics.update({f"failure_{key}": value for key, value in detection.items()})
    return metrics


def _preference_metrics(pairs: Sequence[PreferenceResult]) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "pairs": len(pairs),
        "preference_accuracy": preference_accuracy([p.probability_a for p in pairs], [p.label for p in pairs]),
    }
    for strategy in sorted({p.strategy for p in pairs if p.strategy}):
        chosen = [p for p in pairs if p.strategy == strategy]
        metrics[f"preference_accuracy_{strategy}"] = preference_accuracy(
            [p.probability_a for p in chosen], [p.label for p in chosen]
        )
    return metrics


def evaluate(
    episodes: Sequence[EpisodeResult] = (),
    pairs: Sequence[PreferenceResult] = (),
    failure_labels: Iterable[str] = (FAILURE,),
) -> dict[str, dict[str, Any]]:
    """All metrics per data source and overall: {"overall": {...}, "<source>": {...}, ...}.

    "overall" pools every episode (VOC over all successful trajectories, ranking over all tasks) and
    every pair. Metrics that cannot be computed are NaN (e.g. no task with two labels for kendall_tau).
    `failure_labels`: quality labels that count as actual failures for failure detection.
    """
    failure_labels = tuple(failure_labels)
    sources = sorted({e.data_source for e in episodes} | {p.data_source for p in pairs})
    results: dict[str, dict[str, Any]] = {}
    for name in (OVERALL, *sources):
        chosen_episodes = [e for e in episodes if name == OVERALL or e.data_source == name]
        chosen_pairs = [p for p in pairs if name == OVERALL or p.data_source == name]
        row: dict[str, Any] = {}
        if chosen_episodes:
            row.update(_episode_metrics(chosen_episodes, failure_labels))
        if chosen_pairs:
            row.update(_preference_metrics(chosen_pairs))
        results[name] = row
    return results
