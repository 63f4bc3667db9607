"""robometer-calibrate on synthetic episodes whose best thresholds are known.

Three kinds of episode, 1 scoring step per 0.1 s of camera time:
* successes: progress rises to 1 with one pause of 0.6-1.0 s on the way; success probability ends near 0.8;
* stalls (failures): progress rises, then stays flat for the last 2.0-2.6 s; success probability ends near
  0.45 — too close to a success for the end rule alone;
* misses (failures): progress rises to ~0.5, success ends near 0.15.
Perfect detection needs the end threshold between the stalls' and the successes' end success, or a stall
timeout longer than every pause (1.0 s) and shorter than every stall (2.0 s).
"""

from __future__ import annotations

import numpy as np
import pytest

from robometer_ros.monitor import MonitorConfig
from robometer_ros.node_parameters import load_parameters
from robometer_ros.training.evaluation import calibrate as cal
from robometer_ros.training.recipe.verdicts import ScoredEpisode, detection_figures, judge


def _episode(kind: str, i: int, rng: np.random.Generator) -> ScoredEpisode:
    n = 60
    t = np.arange(n) * 0.1
    if kind == "success":
        pause = int(rng.integers(6, 11))
        start = int(rng.integers(10, 30))
        rate = np.ones(n)
        rate[start:start + pause] = 0.0
        progress = np.clip(np.cumsum(rate) / (n - pause - 5), 0, 1)
        success = np.clip(progress * 0.85 + rng.normal(0, 0.02, n), 0, 1)
        label = "successful"
    elif kind == "stall":
        flat = int(rng.integers(20, 27))
        progress = np.clip(np.minimum(np.arange(n), n - flat) / (n - 5), 0, 1)
        success = np.clip(progress * 0.55 + rng.normal(0, 0.02, n), 0, 1)
        label = "failure"
    else:
        progress = np.clip(np.arange(n) / (2 * n), 0, 1)
        success = np.clip(0.15 + rng.normal(0, 0.02, n), 0, 1)
        label = "failure"
    steps = np.stack([t, progress, success], axis=1)
    return ScoredEpisode(f"{kind}-{i}", "task", f"task-{i % 3}", "synthetic", label, steps, 0.0, float(t[-1]))


@pytest.fixture(scope="module")
def episodes() -> list[ScoredEpisode]:
    rng = np.random.default_rng(0)
    return [_episode(kind, i, rng) for kind in ("success", "stall", "miss") for i in range(9)]


def test_calibration_finds_thresholds_that_separate_the_kinds_and_reports_held_out_figures(episodes) -> None:
    start = MonitorConfig(stall_timeout_s=0.0, end_success_threshold=0.3)  # misses only: recall 1/2
    before = detection_figures(judge(episodes, start))
    assert before.recall == pytest.approx(0.5) and before.false_alarm_rate == 0.0
    result = cal.calibrate(episodes, cal.Objective(), k=4, seed=1, start=start)
    cross = detection_figures(result.cross_validated)
    assert len(result.cross_validated) == len(episodes)
    assert cross.f1 == 1.0 and cross.false_alarm_rate == 0.0
    chosen = result.config
    stall_ok = 1.0 < chosen.stall_timeout_s < 2.0 and chosen.stall_epsilon < 0.05
    end_ok = 0.5 < chosen.end_success_threshold <= 0.8  # above the stalls' ~0.5, at most the successes' ~0.85
    assert stall_ok or end_ok, chosen
    assert detection_figures(result.fitted).f1 == 1.0


def test_a_false_alarm_bound_is_honoured(episodes) -> None:
    # successes pause; a short stall timeout catches every stall but also flags the pauses
    start = MonitorConfig(stall_timeout_s=0.3, stall_grace_s=0.0, end_success_threshold=0.3)
    assert detection_figures(judge(episodes, start)).false_alarm_rate > 0.5
    chosen = cal.search(episodes, cal.Objective(max_false_alarm=0.0), start)
    figures = detection_figures(judge(episodes, chosen))
    assert figures.false_alarm_rate == 0.0 and figures.recall > 0.5


def test_the_yaml_sets_every_threshold_and_loads_as_node_parameters(tmp_path, episodes) -> None:
    config = MonitorConfig(stall_timeout_s=1.5, success_steps=3)
    path = tmp_path / "calibration.yaml"
    path.write_text(cal.parameters_yaml(config, ["cross-validated F1 1.000", ""]))
    text = path.read_text()
    assert text.startswith("# cross-validated F1 1.000\n#\n/**:")
    values = load_parameters([path])
    assert values["monitor.stall_timeout_s"] == 1.5 and values["monitor.success_steps"] == 3
    assert isinstance(values["monitor.episode_timeout_s"], float)  # 0.0, never 0 (ROS types doubles strictly)
    assert set(values) == {f"monitor.{name}" for name in MonitorConfig.field_names()}


def test_scores_round_trip_and_the_report_is_written(tmp_path, episodes) -> None:
    cal.save_scores(episodes, tmp_path / "scores.npz")
    again = cal.load_scores(tmp_path / "scores.npz")
    assert [e.episode_id for e in again] == [e.episode_id for e in episodes]
    np.testing.assert_array_equal(again[5].step_scores, episodes[5].step_scores)
    result = cal.calibrate(again, cal.Objective(), k=3, start=MonitorConfig())
    record = cal.report(result, again, {"model": "synthetic"}, tmp_path / "report")
    assert record["cross_validated"]["f1"] == detection_figures(result.cross_validated).f1
    assert set(record["per_task_cross_validated"]) == {"task-0", "task-1", "task-2"}
    assert (tmp_path / "report" / "curves.png").stat().st_size > 1000
    assert "| task-0 |" in (tmp_path / "report" / "report.md").read_text()
