"""EpisodeMonitor on synthetic progress / success curves (1 step per second of camera time)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pytest

from robometer_ros.monitor import (
    EpisodeMonitor,
    Event,
    EventKind,
    FailureReason,
    MonitorConfig,
    Outcome,
    Severity,
)

# The thresholds these hand-made score sequences were written for (the defaults before calibration): the tests
# pin them, so a new calibration of the defaults does not change what the rules are tested with.
HAND_THRESHOLDS = {"success_threshold": 0.65, "success_steps": 2, "success_release_threshold": 0.35,
                   "success_lost_steps": 2, "end_window_steps": 3, "end_success_threshold": 0.5,
                   "stall_timeout_s": 10.0, "stall_grace_s": 2.0, "stall_epsilon": 0.02, "regression_margin": 0.2,
                   "regression_steps": 2, "clear_steps": 2}


def hand_config(**overrides: object) -> MonitorConfig:
    """MonitorConfig with HAND_THRESHOLDS and ``overrides``."""
    return MonitorConfig(**{**HAND_THRESHOLDS, **overrides})

def run(
    monitor: EpisodeMonitor, progress: Iterable[float], success: Iterable[float] | float = 0.0, t0: float = 0.0
) -> list[tuple[int, Event]]:
    """Feed one step per second; return (step index, event) for every event."""
    progress = list(progress)
    success = [success] * len(progress) if isinstance(success, float) else list(success)
    out: list[tuple[int, Event]] = []
    for i, (p, s) in enumerate(zip(progress, success)):
        out.extend((i, e) for e in monitor.update(t0 + i, p, s))
    return out


def kinds(events: list[tuple[int, Event]]) -> list[tuple[EventKind, FailureReason]]:
    return [(e.kind, e.reason) for _, e in events]


def test_constants_match_the_messages() -> None:
    from pathlib import Path

    msg_dir = Path(__file__).resolve().parents[2] / "msg"
    flag = (msg_dir / "FailureFlag.msg").read_text()
    for reason in FailureReason:
        assert f"uint8 REASON_{reason.name}={reason.value}" in flag
    for severity in Severity:
        assert f"uint8 SEVERITY_{severity.name}={severity.value}" in flag
    status = (msg_dir / "EpisodeStatus.msg").read_text()
    for outcome in Outcome:
        assert f"uint8 OUTCOME_{outcome.name}={outcome.value}" in status


def test_monotone_success() -> None:
    m = EpisodeMonitor(hand_config())
    progress = np.clip(np.arange(30) / 20, 0, 1)
    success = np.where(np.arange(30) >= 22, 0.9, 0.05)
    events = run(m, progress, success)
    assert kinds(events) == [(EventKind.SUCCEEDED, FailureReason.NONE)]
    step, ev = events[0]
    assert step == 23  # the second consecutive step over 0.65
    assert ev.stamp_s == 23.0 and ev.confidence == pytest.approx(0.9) and ev.severity is Severity.INFO
    assert m.succeeded and not m.failed
    assert m.end(30.0, Outcome.SUCCESS) == []


def test_a_flickering_success_is_kept_and_a_finished_robot_standing_still_is_no_stall() -> None:
    # single steps below the release threshold (0.35 for 2 steps) do not lose the success
    m = EpisodeMonitor(hand_config(stall_timeout_s=5.0))
    events = run(m, [0.2, 0.5, 0.9, 0.95] + [0.95] * 30, [0.1, 0.3, 0.8, 0.9] + [0.2, 0.9] * 15)
    assert kinds(events) == [(EventKind.SUCCEEDED, FailureReason.NONE)]


def test_stall_raises_once_then_clears_when_progress_resumes() -> None:
    m = EpisodeMonitor(hand_config(stall_timeout_s=10.0, stall_epsilon=0.02, clear_steps=2))
    progress = [0.1 * i for i in range(4)] + [0.3 + 0.005 * (i % 2) for i in range(20)] + [0.4, 0.45, 0.5]
    events = run(m, progress, 0.0)
    assert kinds(events) == [
        (EventKind.FAILURE_RAISED, FailureReason.STALLED),
        (EventKind.FAILURE_CLEARED, FailureReason.STALLED),
    ]
    (raised_at, raised), (cleared_at, cleared) = events
    assert raised_at == 13  # reference set at step 3 (progress 0.3), 10 s of camera time later
    assert raised.severity is Severity.WARN and raised.failed
    assert raised.confidence == pytest.approx(0.75)  # rose 0.005 of the 0.02 allowed
    assert "0.30" in raised.detail and "10.0 s" in raised.detail
    assert cleared_at == len(progress) - 2  # two consecutive steps above reference + epsilon
    assert not cleared.failed and cleared.severity is Severity.INFO


def test_stall_uses_camera_stamps_not_step_count() -> None:
    m = EpisodeMonitor(hand_config(stall_timeout_s=10.0, stall_grace_s=0.0))
    # 100 steps but only 5 s of camera time: no stall
    for i in range(100):
        assert m.update(i * 0.05, 0.3, 0.0) == []
    assert m.update(11.0, 0.3, 0.0)[0].reason is FailureReason.STALLED


def test_stall_off_when_timeout_is_zero() -> None:
    m = EpisodeMonitor(hand_config(stall_timeout_s=0.0))
    assert run(m, [0.3] * 200) == []


def test_regression_rewind_raises_and_recovers_with_hysteresis() -> None:
    cfg = hand_config(regression_margin=0.2, regression_steps=2, clear_steps=2, stall_timeout_s=0.0)
    m = EpisodeMonitor(cfg)
    progress = [0.1, 0.3, 0.5, 0.7, 0.7, 0.45, 0.4, 0.45, 0.55, 0.62, 0.68, 0.7, 0.75]
    events = run(m, progress)
    assert kinds(events) == [
        (EventKind.FAILURE_RAISED, FailureReason.REGRESSED),
        (EventKind.FAILURE_CLEARED, FailureReason.REGRESSED),
    ]
    (raised_at, raised), (cleared_at, _) = events
    assert raised_at == 6  # second consecutive step more than 0.2 below the max of 0.7
    assert raised.max_progress == pytest.approx(0.7) and raised.progress == pytest.approx(0.4)
    assert raised.confidence == pytest.approx(0.3 / 0.4)
    # 0.55 is above max - margin but not above max - margin/2 = 0.6: still failed; cleared after 0.62, 0.68
    assert cleared_at == 10


def test_single_step_outlier_neither_sets_the_max_nor_raises() -> None:
    m = EpisodeMonitor(hand_config(stall_timeout_s=0.0))
    events = run(m, [0.1, 0.2, 0.95, 0.25, 0.3, 0.05, 0.35, 0.4])
    assert events == []
    assert m.max_progress == pytest.approx(0.35)


def test_flapping_around_the_regression_threshold_gives_one_event() -> None:
    m = EpisodeMonitor(hand_config(stall_timeout_s=0.0))
    # max 0.8; values alternate around the raise line (0.6) after it fired: one raise, no clear, no re-raise
    events = run(m, [0.8, 0.8, 0.55, 0.55] + [0.58, 0.63, 0.66, 0.59] * 10)
    assert kinds(events) == [(EventKind.FAILURE_RAISED, FailureReason.REGRESSED)]
    # alternating single steps below the raise line never raise at all
    m = EpisodeMonitor(hand_config(stall_timeout_s=0.0))
    assert run(m, [0.8, 0.8] + [0.59, 0.61] * 20) == []


def test_flapping_success_probability_around_the_threshold_never_succeeds() -> None:
    m = EpisodeMonitor(hand_config(success_threshold=0.65, success_steps=2, stall_timeout_s=0.0))
    assert run(m, np.linspace(0, 0.9, 40), [0.64, 0.66] * 20) == []
    assert not m.succeeded


def test_noisy_but_rising_progress_raises_nothing() -> None:
    rng = np.random.default_rng(1)
    t = np.arange(120)
    progress = np.clip(t / 100 + rng.normal(0, 0.03, t.size), 0, 1)
    success = np.clip(rng.normal(0.1, 0.05, t.size), 0, 1)
    m = EpisodeMonitor(hand_config())
    events = run(m, progress[:100], success[:100])
    assert events == []


def test_timeout_without_success_and_success_clears_it() -> None:
    m = EpisodeMonitor(hand_config(episode_timeout_s=20.0, stall_timeout_s=0.0), start_stamp_s=100.0)
    events = run(m, np.linspace(0, 0.6, 30), 0.1, t0=105.0)
    assert kinds(events) == [(EventKind.FAILURE_RAISED, FailureReason.TIMEOUT)]
    step, ev = events[0]
    assert ev.stamp_s == 120.0 and ev.severity is Severity.ERROR and step == 15
    later = m.update(140.0, 0.9, 0.9) + m.update(141.0, 0.95, 0.95)
    assert [(e.kind, e.reason) for e in later] == [
        (EventKind.SUCCEEDED, FailureReason.NONE),
        (EventKind.FAILURE_CLEARED, FailureReason.TIMEOUT),
    ]


def test_timeout_is_measured_from_the_first_stamp_when_no_start_is_given() -> None:
    m = EpisodeMonitor(hand_config(episode_timeout_s=5.0, stall_timeout_s=0.0))
    events = run(m, np.linspace(0, 0.5, 10), t0=50.0)
    assert [i for i, _ in events] == [5]
    assert m.start_stamp_s == 50.0


def test_worse_reason_replaces_a_milder_one_and_does_not_downgrade() -> None:
    m = EpisodeMonitor(hand_config(stall_timeout_s=5.0, stall_epsilon=0.02))
    events = run(m, [0.5] * 8 + [0.2] * 10)
    assert kinds(events) == [
        (EventKind.FAILURE_RAISED, FailureReason.STALLED),
        (EventKind.FAILURE_RAISED, FailureReason.REGRESSED),
    ]
    assert m.failure is FailureReason.REGRESSED


def test_nan_and_out_of_range_scores_become_model_errors() -> None:
    m = EpisodeMonitor(hand_config(stall_timeout_s=0.0, clear_steps=2))
    assert m.update(0.0, 0.2, 0.1) == []
    events = m.update(1.0, float("nan"), 0.1)
    assert len(events) == 1 and events[0].reason is FailureReason.MODEL_ERROR
    assert events[0].severity is Severity.ERROR and "nan" in events[0].detail
    assert events[0].progress == pytest.approx(0.2)  # last valid progress
    assert m.update(2.0, 0.3, float("inf")) == []  # still failed: no new event
    assert m.update(3.0, 0.3, 0.1) == []  # one valid step is not enough to clear
    cleared = m.update(4.0, 0.35, 0.1)
    assert [(e.kind, e.reason) for e in cleared] == [(EventKind.FAILURE_CLEARED, FailureReason.MODEL_ERROR)]
    out_of_range = m.update(5.0, 1.7, 0.1)
    assert out_of_range[0].reason is FailureReason.MODEL_ERROR and "outside [0, 1]" in out_of_range[0].detail
    # tiny float overshoot is clamped, not an error
    m2 = EpisodeMonitor(hand_config())
    assert m2.update(0.0, 1.0000001, -1e-7) == []
    assert m2.progress == 1.0 and m2.success_probability == 0.0


def test_model_error_call_is_a_failure() -> None:
    m = EpisodeMonitor(hand_config())
    events = m.model_error(3.0, "engine raised RuntimeError")
    assert events[0].reason is FailureReason.MODEL_ERROR and "engine raised" in events[0].detail
    assert math.isnan(events[0].progress)


def test_end_without_success_raises_low_success_at_end() -> None:
    m = EpisodeMonitor(hand_config(stall_timeout_s=0.0, end_window_steps=3, end_success_threshold=0.6))
    success = np.linspace(0, 0.52, 10)
    run(m, np.linspace(0, 0.7, 10), success)
    events = m.end(10.0, Outcome.FAILURE)
    assert kinds([(0, e) for e in events]) == [(EventKind.FAILURE_RAISED, FailureReason.LOW_SUCCESS_AT_END)]
    window = success[-3:].mean()
    assert events[0].severity is Severity.ERROR and "FAILURE" in events[0].detail
    assert f"last 3 steps {window:.2f} < end_success_threshold 0.60" in events[0].detail
    assert events[0].confidence == pytest.approx((0.6 - window) / 0.6)
    assert m.ended
    assert m.update(11.0, 0.9, 0.99) == [] and m.end(12.0) == []


def test_end_before_any_step() -> None:
    events = EpisodeMonitor(hand_config()).end(0.0)
    assert events[0].reason is FailureReason.LOW_SUCCESS_AT_END and "before any step" in events[0].detail


def test_config_validation_names_the_field() -> None:
    for kwargs, name in [
        ({"success_threshold": 1.5}, "success_threshold"),
        ({"success_threshold": 0.0}, "success_threshold"),
        ({"success_steps": 0}, "success_steps"),
        ({"stall_timeout_s": -1.0}, "stall_timeout_s"),
        ({"stall_epsilon": float("nan")}, "stall_epsilon"),
        ({"regression_margin": 0.0}, "regression_margin"),
        ({"regression_steps": 1.5}, "regression_steps"),
        ({"clear_steps": True}, "clear_steps"),
        ({"episode_timeout_s": float("inf")}, "episode_timeout_s"),
        ({"success_release_threshold": 0.7}, "success_release_threshold"),
        ({"end_window_steps": 0}, "end_window_steps"),
        ({"end_success_threshold": 0.0}, "end_success_threshold"),
        ({"stall_grace_s": -0.5}, "stall_grace_s"),
        ({"success_lost_steps": 0}, "success_lost_steps"),
    ]:
        with pytest.raises(ValueError, match=name):
            hand_config(**kwargs)


def test_stamps_must_not_go_back() -> None:
    m = EpisodeMonitor(hand_config())
    m.update(5.0, 0.1, 0.1)
    assert m.update(5.0, 0.1, 0.1) == []  # equal stamps are fine (same newest frame scored again)
    with pytest.raises(ValueError, match="earlier than the previous"):
        m.update(4.0, 0.1, 0.1)
    with pytest.raises(ValueError, match="finite"):
        m.update(float("nan"), 0.1, 0.1)


# ---------------------------------------------------------------------------------------------- monitor v2
def test_a_success_that_is_lost_is_reported_and_a_new_success_clears_it() -> None:
    cfg = hand_config(success_threshold=0.65, success_release_threshold=0.35, success_lost_steps=2,
                        stall_timeout_s=0.0)
    m = EpisodeMonitor(cfg)
    # done at steps 2-3, the object slips at 5-6 (success collapses), done again at 8-9
    success = [0.1, 0.5, 0.8, 0.9, 0.7, 0.2, 0.1, 0.5, 0.8, 0.85]
    events = run(m, [0.5] * len(success), success)
    assert kinds(events) == [
        (EventKind.SUCCEEDED, FailureReason.NONE),
        (EventKind.FAILURE_RAISED, FailureReason.SUCCESS_LOST),
        (EventKind.SUCCEEDED, FailureReason.NONE),
        (EventKind.FAILURE_CLEARED, FailureReason.SUCCESS_LOST),
    ]
    assert [i for i, _ in events] == [3, 6, 9, 9]
    lost = events[1][1]
    assert lost.severity is Severity.WARN and "below 0.35 for 2 steps (last 0.10)" in lost.detail
    assert lost.confidence == pytest.approx(1 - 0.15 / 0.35)
    assert events[2][1].detail.startswith("again: ")
    assert m.succeeded and m.ever_succeeded and m.verdict == "succeeded"


def test_progress_falling_after_success_loses_it() -> None:
    m = EpisodeMonitor(hand_config(stall_timeout_s=0.0, regression_margin=0.2, regression_steps=2))
    # the drawer was opened (success), then pushed shut again: progress falls while success lingers
    progress = [0.3, 0.6, 0.9, 0.9, 0.9, 0.6, 0.5, 0.5]
    success = [0.1, 0.4, 0.8, 0.9, 0.8, 0.6, 0.5, 0.5]
    events = run(m, progress, success)
    assert kinds(events) == [(EventKind.SUCCEEDED, FailureReason.NONE),
                             (EventKind.FAILURE_RAISED, FailureReason.SUCCESS_LOST)]
    assert events[1][0] == 6 and "progress 0.50 fell 0.40 below its maximum 0.90" in events[1][1].detail
    assert not m.succeeded and m.failed


def test_the_end_verdict_is_the_last_window_not_the_best_step() -> None:
    cfg = hand_config(stall_timeout_s=0.0, end_window_steps=3, end_success_threshold=0.5)
    # succeeded early, then slowly slid back (never 2 steps under the release threshold in a row) -> failure
    m = EpisodeMonitor(cfg)
    run(m, [0.8] * 9, [0.2, 0.9, 0.9, 0.5, 0.3, 0.4, 0.3, 0.4, 0.3])
    assert m.succeeded
    events = m.end(9.0, Outcome.UNKNOWN)
    assert kinds([(0, e) for e in events]) == [(EventKind.FAILURE_RAISED, FailureReason.LOW_SUCCESS_AT_END)]
    detail = events[0].detail
    assert "0.33 < end_success_threshold 0.50 (it had succeeded earlier)" in detail
    assert not m.succeeded and m.verdict == "failed:LOW_SUCCESS_AT_END"
    # reached success only in the last steps (never success_steps in a row) -> a success at the end
    m = EpisodeMonitor(cfg)
    run(m, np.linspace(0.1, 1.0, 8), [0.0, 0.0, 0.1, 0.1, 0.2, 0.4, 0.7, 0.6])
    assert not m.succeeded
    events = m.end(8.0)
    assert kinds([(0, e) for e in events]) == [(EventKind.SUCCEEDED, FailureReason.NONE)]
    assert "at the end: mean success probability over the last 3 steps 0.57 >= end_success_threshold 0.50" \
        in events[0].detail
    assert m.verdict == "succeeded"


def test_a_success_at_the_end_clears_a_stall() -> None:
    m = EpisodeMonitor(hand_config(stall_timeout_s=3.0, stall_grace_s=0.0, end_window_steps=2))
    events = run(m, [0.5] * 6, [0.2, 0.2, 0.2, 0.2, 0.6, 0.62])
    assert kinds(events) == [(EventKind.FAILURE_RAISED, FailureReason.STALLED)]
    events = m.end(6.0)
    assert kinds([(0, e) for e in events]) == [(EventKind.SUCCEEDED, FailureReason.NONE),
                                               (EventKind.FAILURE_CLEARED, FailureReason.STALLED)]


def test_details_never_contradict_their_thresholds() -> None:
    """Every number a detail compares with a threshold is on the right side of it (the old "best success
    probability 0.68 < threshold 0.65" could not happen)."""
    import re

    # "<value> < / >= <name>threshold <threshold>" (the end verdict), ">= <threshold> for ... (last <value>)"
    # (a success) and "below <threshold> for ... (last <value>)" (a success lost)
    patterns = (
        (re.compile(r"(\d\.\d\d) (<|>=) \w*threshold (\d\.\d\d)"), lambda m: m.group(1, 2, 3)),
        (re.compile(r">= (\d\.\d\d) for .*\(last (\d\.\d\d)\)"), lambda m: (m.group(2), ">=", m.group(1))),
        (re.compile(r"below (\d\.\d\d) for .*\(last (\d\.\d\d)\)"), lambda m: (m.group(2), "<", m.group(1))),
    )
    checked = [0] * len(patterns)
    rng = np.random.default_rng(7)
    for _ in range(200):
        threshold = float(rng.uniform(0.3, 0.9))
        cfg = hand_config(success_threshold=threshold, success_release_threshold=threshold / 2,
                            stall_timeout_s=2.0, end_window_steps=int(rng.integers(1, 5)),
                            end_success_threshold=float(rng.uniform(0.2, 0.9)))
        m = EpisodeMonitor(cfg)
        n = int(rng.integers(1, 30))
        events = [e for _, e in run(m, rng.uniform(0, 1, n), list(rng.uniform(0, 1, n)))]
        events += m.end(float(n))
        for event in events:
            for index, (pattern, parts) in enumerate(patterns):
                for match in pattern.finditer(event.detail):
                    value, op, limit = parts(match)
                    checked[index] += 1
                    assert (float(value) < float(limit)) == (op == "<") or value == limit, event.detail
    assert min(checked) >= 10, checked  # every kind of detail was seen: the test cannot pass on no match


def test_stall_grace_period_at_the_start() -> None:
    cfg = hand_config(stall_timeout_s=3.0, stall_grace_s=4.0, stall_epsilon=0.02)
    # idle for the first 5 s, then moving: no stall (the grace period plus the timeout was not reached)
    m = EpisodeMonitor(cfg)
    assert run(m, [0.1] * 6 + [0.2, 0.3, 0.4, 0.5]) == []
    # idle for good: the stall counts from the end of the grace period
    m = EpisodeMonitor(cfg)
    events = run(m, [0.1] * 12)
    assert kinds(events) == [(EventKind.FAILURE_RAISED, FailureReason.STALLED)]
    assert events[0][0] == 7 and "for 7.0 s" in events[0][1].detail  # 4 s grace + 3 s


def test_monitor_events_replays_recorded_steps_like_live_updates() -> None:
    from robometer_ros.session import monitor_events

    rng = np.random.default_rng(3)
    cfg = hand_config(stall_timeout_s=2.0, stall_grace_s=0.5)
    steps = np.stack([np.arange(40) * 0.25, np.clip(np.cumsum(rng.normal(0.02, 0.05, 40)), 0, 1),
                      rng.uniform(0, 1, 40)], axis=1)
    steps[17, 1] = np.nan  # a model error step
    live = EpisodeMonitor(cfg)
    expected = [e for s in steps for e in live.update(*s)] + live.end(steps[-1, 0])
    assert monitor_events(steps, cfg) == expected
    assert any(e.reason is FailureReason.MODEL_ERROR for e in expected)
