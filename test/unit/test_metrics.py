"""Metrics on hand-made rankings with hand-computed answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from robometer_ros.training.recipe.metrics import (
    OVERALL,
    EpisodeResult,
    PreferenceResult,
    evaluate,
    failure_detection,
    kendall_tau_a,
    pearson,
    preference_accuracy,
    trajectory_ranking,
    value_order_correlation,
)


def test_pearson_by_hand_and_degenerate() -> None:
    # x = [1, 2, 3], y = [1, 3, 2]: centred [-1, 0, 1] and [-1, 1, 0]: r = 1 / (sqrt 2 sqrt 2) = 0.5
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson([0, 1], [5, 3]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))  # constant prediction
    assert math.isnan(pearson([1], [2]))


def test_voc_averages_successful_trajectories_only() -> None:
    predicted = [[0.0, 0.5, 1.0], [1.0, 3.0, 2.0], [0.3, 0.2, 0.1], [0.5, 0.5, 0.5]]
    target = [[0.0, 0.5, 1.0], [1.0, 2.0, 3.0], [0.0, 0.5, 1.0], [0.0, 0.5, 1.0]]
    labels = ["successful", "successful", "failure", "successful"]
    # r = 1 and r = 0.5; the failure (r = -1) is excluded, the constant prediction is undefined.
    assert value_order_correlation(predicted, target, labels) == pytest.approx(0.75)
    assert math.isnan(value_order_correlation(predicted[2:3], target[2:3], labels[2:3]))


def test_kendall_tau_a_ties_stay_in_denominator() -> None:
    # 3 pairs: (1,2) concordant, (1,3) concordant, (2,3) discordant -> (2 - 1) / 3
    assert kendall_tau_a([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    # x tie on pair (1,2): neither; (1,3), (2,3) concordant -> 2 / 3 (tau-b would give 0.816)
    assert kendall_tau_a([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 3)
    # all tied -> 0 / 6
    assert kendall_tau_a([0, 0, 0, 0], [1, 2, 3, 4]) == 0.0
    assert kendall_tau_a([4, 3, 2, 1], [1, 2, 3, 4]) == -1.0


def test_trajectory_ranking_by_hand() -> None:
    tasks = ["t", "t", "t", "t", "u", "u", "v"]
    labels = ["failure", "failure", "suboptimal", "successful", "failure", "successful", "failure"]
    rewards = [0.1, 0.5, 0.3, 0.9, 0.8, 0.2, 0.0]
    result = trajectory_ranking(tasks, labels, rewards)
    # task t, combinations (fail, subopt, succ): (0.1, 0.3, 0.9) -> tau 1; (0.5, 0.3, 0.9) -> (1 + 1 - 1)/3
    # mean (1 + 1/3) / 2 = 2/3. task u: one pair, wrong order -> -1. task v has one label: left out.
    assert result.per_task == pytest.approx({"t": 2 / 3, "u": -1.0})
    assert result.kendall_tau == pytest.approx((2 / 3 - 1) / 2)
    assert result.tasks_used == 2
    # pairwise accuracy: t has 5 different-label pairs, 4 right (0.5 > 0.3 is wrong); u 0 of 1
    assert result.ranking_accuracy == pytest.approx((4 / 5 + 0) / 2)


def test_trajectory_ranking_equals_enumerating_combinations() -> None:
    rng = np.random.default_rng(3)
    labels = ["failure"] * 3 + ["suboptimal"] * 2 + ["successful"] * 4
    rewards = rng.random(len(labels))
    rewards[1] = rewards[5]  # a tie across labels
    gold = {"failure": 1, "suboptimal": 2, "successful": 3}
    groups = [[i for i, label in enumerate(labels) if label == name] for name in gold]
    taus = [
        kendall_tau_a([gold[labels[i]] for i in combo], [rewards[i] for i in combo])
        for combo in itertools.product(*groups)
    ]
    assert trajectory_ranking(["t"] * len(labels), labels, rewards).kendall_tau == pytest.approx(np.mean(taus))


def test_failure_detection_failure_is_positive() -> None:
    predicted = [True, True, False, False, True, False]
    actual = [True, False, True, False, True, False]
    scores = failure_detection(predicted, actual)
    # TP 2, FP 1, FN 1, TN 2
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["tnr"] == pytest.approx(2 / 3)
    # the paper's GPT-5-mini row: precision 1, TPR 0.31 -> F1 = 2 * 0.31 / 1.31 = 0.473
    many = failure_detection([True] * 31 + [False] * 69 + [False] * 50, [True] * 100 + [False] * 50)
    assert many["f1"] == pytest.approx(0.62 / 1.31)
    assert math.isnan(failure_detection([False, False], [False, False])["precision"])


def test_preference_accuracy() -> None:
    assert preference_accuracy([0.9, 0.2, 0.6, 0.5], [1, 0, 0, 1]) == pytest.approx(0.5)
    assert math.isnan(preference_accuracy([], []))


def test_evaluate_per_source_and_overall() -> None:
    def episode(source: str, task: str, label: str, final: float, failed: bool) -> EpisodeResult:
        return EpisodeResult(
            episode_id=f"{source}-{task}-{label}-{final}",
            instruction=task,
            data_source=source,
            quality_label=label,
            predicted_progress=np.array([0.0, final / 2, final]),
            target_progress=np.array([0.0, 0.5, 1.0]),
            predicted_failure=failed,
        )

    episodes = [
        episode("a", "t", "successful", 0.9, False),
        episode("a", "t", "failure", 0.2, True),
        episode("b", "t", "successful", 0.3, False),
        episode("b", "t", "failure", 0.6, False),
    ]
    pairs = [PreferenceResult("a", 0.8, 1, "rewind"), PreferenceResult("b", 0.8, 0, "suboptimal")]
    results = evaluate(episodes, pairs)
    assert set(results) == {OVERALL, "a", "b"}
    assert results["a"]["kendall_tau"] == 1.0
    assert results["b"]["kendall_tau"] == -1.0
    assert results[OVERALL]["kendall_tau"] == 0.0  # (source, task) are separate tasks
    assert results[OVERALL]["voc"] == pytest.approx(1.0)
    assert results["a"]["failure_f1"] == 1.0
    assert results[OVERALL]["failure_recall"] == 0.5
    assert results[OVERALL]["succ_fail_diff"] == pytest.approx(0.6 - 0.4)
    assert results["a"]["preference_accuracy"] == 1.0
    assert results[OVERALL]["preference_accuracy"] == 0.5
    assert results[OVERALL]["preference_accuracy_rewind"] == 1.0

    # An episode whose outcome is unknown (a bag without an end-of-episode label) is counted, and changes
    # no label-based metric (ranking, final progress, failure detection).
    with_unknown = evaluate([*episodes, episode("a", "t", "unknown", 0.5, True)], pairs)
    assert with_unknown["a"]["unknown_label_episodes"] == 1 and with_unknown["a"]["episodes"] == 3
    assert results["a"]["unknown_label_episodes"] == 0
    for key, value in results[OVERALL].items():
        if key not in ("episodes", "unknown_label_episodes"):
            assert with_unknown[OVERALL][key] == pytest.approx(value, nan_ok=True), key


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="unknown quality labels"):
        trajectory_ranking(["t"], ["great"], [1.0])
    with pytest.raises(ValueError, match="equal lengths"):
        kendall_tau_a([1, 2], [1])
