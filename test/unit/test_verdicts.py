"""The node's verdicts on labelled episodes (robometer-eval's node_* figures, robometer-calibrate's report):
episodes scored through the ScoringSession, unknown outcomes left out, detection delays from the failure
onset or from the episode end, and bootstrap intervals.

The engine is the scripted test double (progress = red / 255, success = green / 255), so every step's
scores, and with them when each rule fires, are known from the frames.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from robometer_ros.monitor import MonitorConfig
from robometer_ros.session import SessionConfig
from robometer_ros.training.recipe.verdicts import (
    bootstrap_intervals,
    detection_figures,
    failure_onset,
    judge,
    score_episodes,
)
from robometer_ros.trajectory import Trajectory
from support.scripted_engine import ScriptedRewardEngine

T0 = 1000.0  # camera seconds of every episode's first frame
FRAMES = 40  # at 10 Hz: 3.9 s
# every frame a step; a stall is 1 s without a rise of 0.02, from the start; the end window 3 steps
CONFIG = SessionConfig(frame_rate=0.0, monitor=MonitorConfig(stall_timeout_s=1.0, stall_grace_s=0.0,
                                                             stall_epsilon=0.02, end_window_steps=3))


def _trajectory(name: str, label: str, progress: np.ndarray, success: np.ndarray, **metadata) -> Trajectory:
    frames = np.zeros((len(progress), 4, 4, 3), dtype=np.uint8)
    frames[..., 0] = np.round(progress * 255)[:, None, None]
    frames[..., 1] = np.round(success * 255)[:, None, None]
    return Trajectory(instruction="open the drawer", frames=frames, frame_stamps=T0 + np.arange(len(progress)) / 10,
                      quality_label=label, data_source="test", episode_id=name,
                      metadata={"task": "drawer", **metadata})


def _episodes() -> list[Trajectory]:
    rising = np.linspace(0.0, 1.0, FRAMES)
    stalled = np.minimum(np.linspace(0.0, 0.4 * FRAMES / 15, FRAMES), 0.4)  # flat at 0.4 from frame 14 (1.4 s)
    return [
        _trajectory("success", "successful", rising, np.where(rising > 0.9, 0.9, 0.1)),
        # the generator says the stall began at control step 15 of 0.1 s: 1.5 s after the first frame
        _trajectory("stall", "failure", stalled, np.full(FRAMES, 0.05), behaviour="stall",
                    behaviour_params={"stall_step": 15}, control_dt=0.1),
        _trajectory("miss", "failure", rising * 0.9, np.full(FRAMES, 0.1)),  # moves on, never succeeds
        _trajectory("unlabelled", "unknown", rising, np.full(FRAMES, 0.9)),
    ]


@pytest.fixture(scope="module")
def scored():
    return score_episodes(ScriptedRewardEngine(), _episodes(), CONFIG)


def test_episodes_are_scored_as_the_node_scores_them_and_unknown_outcomes_are_left_out(scored) -> None:
    assert [e.episode_id for e in scored] == ["success", "stall", "miss"]
    for episode in scored:
        assert episode.frames_offered == episode.frames_admitted == FRAMES  # frame_rate 0: every frame a step
        assert episode.step_scores.shape == (FRAMES, 3)
        np.testing.assert_allclose(episode.step_scores[:, 0], T0 + np.arange(FRAMES) / 10)
        assert (episode.start_s, episode.end_s, episode.task) == (T0, pytest.approx(T0 + 3.9), "drawer")
    onsets = {e.episode_id: e.onset_s for e in scored}
    assert onsets == {"success": None, "stall": pytest.approx(T0 + 1.5), "miss": None}


def test_detection_delay_is_measured_from_the_onset_where_known_else_from_the_end(scored) -> None:
    verdicts = {v.episode.episode_id: v for v in judge(scored, CONFIG.monitor)}
    assert not verdicts["success"].predicted_failure and verdicts["success"].delay_s is None
    stall = verdicts["stall"]
    # the last rise is at 1.4 s, so STALLED fires 1 s later, at 2.4 s: 0.9 s after the labelled onset
    assert stall.predicted_failure and stall.first_alarm_reason == "STALLED"
    assert stall.first_alarm_s == pytest.approx(T0 + 2.4, abs=0.15)
    assert stall.delay_s == pytest.approx(stall.first_alarm_s - (T0 + 1.5))
    miss = verdicts["miss"]  # no onset known: flagged by the end verdict, at the end
    assert miss.first_alarm_reason == "LOW_SUCCESS_AT_END" and miss.delay_s == pytest.approx(0.0)
    figures = detection_figures(list(verdicts.values()))
    assert (figures.true_positives, figures.false_positives, figures.false_negatives) == (2, 0, 0)
    assert figures.f1 == 1.0 and figures.false_alarm_rate == 0.0
    assert figures.delay_from_onset_s == pytest.approx(stall.delay_s)
    assert figures.delay_from_end_s == pytest.approx(0.0)
    assert figures.reasons == {"LOW_SUCCESS_AT_END": 1, "STALLED": 1}


def test_failure_onset_only_for_labelled_failures() -> None:
    stall, = (t for t in _episodes() if t.episode_id == "stall")
    assert failure_onset(stall) == pytest.approx(T0 + 1.5)
    stall.metadata["failure_onset_s"] = T0 + 0.7  # an explicit onset wins
    assert failure_onset(stall) == pytest.approx(T0 + 0.7)
    stall.quality_label = "successful"
    assert failure_onset(stall) is None


def test_bootstrap_intervals_bracket_the_figures_and_collapse_for_a_perfect_detector(scored) -> None:
    perfect = judge(scored, CONFIG.monitor) * 5
    intervals = bootstrap_intervals(perfect, samples=200)
    assert intervals["f1"] == (1.0, 1.0) and intervals["false_alarm_rate"] == (0.0, 0.0)
    # an end threshold above the success's 0.9 flags it too: precision 2/3, a false alarm in every third
    strict = judge(scored, MonitorConfig(**{**CONFIG.monitor.__dict__, "end_success_threshold": 0.95})) * 5
    figures = detection_figures(strict)
    assert figures.precision == pytest.approx(2 / 3) and figures.false_alarm_rate == 1.0
    intervals = bootstrap_intervals(strict, samples=200)
    low, high = intervals["precision"]
    assert 0.0 <= low < figures.precision < high <= 1.0
    assert intervals == bootstrap_intervals(strict, samples=200)  # seeded
    assert all(math.isfinite(x) for pair in intervals.values() for x in pair)
