"""ScoringSession without DDS: admission, keep-latest scheduling, the engine cache, camera time rules, the
end of an episode, and the offline replay that robometer-eval / -score / -calibrate use.

The engine is the scripted test double (progress = red / 255, success = green / 255 of each frame), so the
expected scores of every step are known from the frames offered.
"""

from __future__ import annotations

import numpy as np
import pytest

from robometer_ros.monitor import EventKind, FailureReason, MonitorConfig, Outcome
from robometer_ros.session import (
    EncodeJob,
    EpisodeState,
    ScoreJob,
    ScoringSession,
    SessionConfig,
    monitor_events,
    replay,
)
from support.scripted_engine import ScriptedRewardEngine

NS = 1_000_000_000
T0 = 1_700_000_000 * NS


def frame(progress: float, success: float = 0.0, blue: int = 0) -> np.ndarray:
    image = np.zeros((6, 8, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = round(progress * 255), round(success * 255), blue
    return image


def session(**config) -> tuple[ScoringSession, ScriptedRewardEngine]:
    engine = ScriptedRewardEngine(num_frames=8)
    monitor = config.pop("monitor", MonitorConfig(stall_timeout_s=0.0))
    return ScoringSession(engine, SessionConfig(monitor=monitor, **config), episode_ids=iter_ids()), engine


def iter_ids():
    counter = iter(range(1000))
    return lambda: f"ep{next(counter)}"


def drain(s: ScoringSession) -> list:
    """Run every job that is ready now, as the node's worker would; the step results."""
    results = []
    while (job := s.next_job(0.0)) is not None:
        result = s.run(job)
        if result is not None:
            results.append(result)
    return results


def test_every_admitted_frame_is_scored_with_the_newest_last_and_the_engine_cache_follows_the_store() -> None:
    s, engine = session(frame_rate=0.0, max_frames_per_episode=16)
    s.start("open the drawer")
    steps = []
    for i in range(60):
        assert s.offer(T0 + i * NS // 10, "cam", frame(i / 60), keep=i).kept == (i,)
        steps += drain(s)
        assert len(engine._features) <= 17  # the store keeps <= 16 (+ the newest), the engine no more
    assert [r.step for r in steps] == list(range(60))
    for i, result in enumerate(steps):
        assert result.stamp_ns == T0 + i * NS // 10 and result.frame_stamps_ns[-1] == result.stamp_ns
        assert result.frame_stamps_ns[0] == T0  # the first frame is always kept
        assert result.progress == pytest.approx(i / 60, abs=0.6 / 255)
        assert result.camera_frame_id == "cam" and result.reward == result.progress
    change = s.end(Outcome.SUCCESS, restart=False)
    assert change.ended.state is EpisodeState.ENDED and change.ended.outcome is Outcome.SUCCESS
    assert change.final_steps == ()  # the newest frame was scored already
    assert engine._features == {}  # nothing of the ended episode stays cached


def test_keep_latest_one_job_for_the_newest_state_and_stale_results_are_dropped() -> None:
    s, _ = session(frame_rate=0.0)
    s.start("task")
    for i in range(5):
        s.offer(T0 + i * NS, "cam", frame(0.1 * i))
    job = s.next_job(0.0)
    assert isinstance(job, ScoreJob) and job.selection[-1][0] == T0 + 4 * NS  # only the newest is scored
    assert isinstance(s.next_job(0.0), EncodeJob)  # nothing else to score: encode ahead
    s.start("another task")  # the episode ends while its job is in flight
    assert s.run(job) is None


def test_scoring_rate_uses_the_wall_clock() -> None:
    now = [100.0]
    s = ScoringSession(ScriptedRewardEngine(), SessionConfig(frame_rate=0.0, scoring_rate=2.0),
                       clock=lambda: now[0])
    s.start("task")
    s.offer(T0, "cam", frame(0.1))
    assert isinstance(s.next_job(0.0), ScoreJob)
    s.offer(T0 + NS // 10, "cam", frame(0.2))
    job = s.next_job(0.0)
    assert not isinstance(job, ScoreJob)  # due only 0.5 s later
    now[0] += 0.5
    assert isinstance(s.next_job(0.0), ScoreJob)


def test_the_end_scores_the_last_frame_even_when_the_admission_rate_dropped_it() -> None:
    s, _ = session(frame_rate=2.0)
    s.start("task")
    stamps = [T0 + i * NS // 10 for i in range(23)]  # 10 Hz camera, 2 Hz admission
    steps = []
    for i, t in enumerate(stamps):
        s.offer(t, "cam", lambda i=i: frame(i / 22, 0.9 if i == 22 else 0.0), keep=i)  # decoded when admitted
        steps += drain(s)
    assert steps[-1].stamp_ns < stamps[-1]  # the rate dropped the last frame
    change = s.end(Outcome.SUCCESS)
    (final,) = change.final_steps
    assert final.stamp_ns == stamps[-1] and final.success_probability == pytest.approx(0.9, abs=0.01)
    assert change.kept == (22,)  # the node records the frame it scored at the end
    # the end frame counts as admitted, not dropped
    assert s.counters()["frames_dropped.rate"] == 23 - len(steps) - 1 and change.ended.frames == len(steps) + 1
    assert change.started is not None and change.started.episode_id != change.ended.episode_id


def test_a_single_far_future_or_negative_stamp_is_dropped_and_never_makes_a_stall() -> None:
    s, _ = session(frame_rate=0.0, monitor=MonitorConfig(stall_timeout_s=2.0, stall_grace_s=0.0))
    s.start("task")
    events = []
    for i in range(10):
        for result in drain(s):
            events += result.events
        s.offer(T0 + i * NS // 10, "cam", frame(0.1 * i))
        if i == 4:
            assert s.offer(T0 + 351_178_893 * NS, "cam", frame(0.5)).drop_reason == "stamp_jump"
            assert s.offer(-5 * NS, "cam", frame(0.5)).drop_reason == "bad_stamp"
    events += [e for r in drain(s) for e in r.events]
    assert not [e for e in events if e.kind is EventKind.FAILURE_RAISED]
    counters = s.counters()
    assert counters["frames_dropped.stamp_jump"] == 1 and counters["frames_dropped.bad_stamp"] == 1
    assert counters["frames_admitted"] == 10 and s.episode.steps == 10


@pytest.mark.parametrize("jump_s", [+3600.0, -30.0])
def test_a_confirmed_time_jump_starts_a_new_episode_with_every_frame_of_the_new_time_line(jump_s) -> None:
    s, _ = session(frame_rate=0.0, jump_confirm_frames=3)
    s.start("task")
    for i in range(5):
        s.offer(T0 + i * NS // 10, "cam", frame(0.2))
        drain(s)
    first = s.episode.episode_id
    base = T0 + int(jump_s * NS)
    assert s.offer(base, "cam", frame(0.3), keep="a").drop_reason == "stamp_jump"
    assert s.offer(base + NS // 10, "cam", frame(0.3), keep="b").drop_reason == "stamp_jump"
    confirmed = s.offer(base + 2 * NS // 10, "cam", frame(0.3), keep="c")
    assert confirmed.admitted and confirmed.kept == ("a", "b", "c")
    direction = "forward" if jump_s > 0 else "back"
    assert confirmed.change.reason.startswith(f"camera time jumped {direction}")
    assert confirmed.change.ended.episode_id == first and confirmed.change.started.episode_id != first
    (step,) = drain(s)
    assert step.frame_stamps_ns[0] == base and step.stamp_ns == base + 2 * NS // 10
    assert "frames_dropped.stamp_jump" not in s.counters()  # all three were admitted in the end


def test_frames_of_another_clock_interleaved_with_the_camera_never_confirm_a_jump() -> None:
    s, _ = session(frame_rate=0.0)
    s.start("task")
    for i in range(20):
        s.offer(T0 + i * NS // 10, "cam", frame(0.2))
        s.offer(i * NS // 10, "other", frame(0.9))  # a second publisher stamping with another clock
        drain(s)
    assert s.episode.steps == 20 and s.counters()["frames_dropped.stamp_jump"] == 20


def test_an_encoding_failure_is_retried_by_the_step_and_a_scoring_failure_is_a_model_error() -> None:
    s, _ = session(frame_rate=0.0, monitor=MonitorConfig(stall_timeout_s=0.0, clear_steps=1))
    s.start("task")
    s.offer(T0, "cam", frame(0.2, blue=220))  # the first add_frame of it fails
    job = s.next_job(0.0)
    result = s.run(job)
    assert result.ok and result.progress == pytest.approx(0.2, abs=0.01)  # the step re-encoded it
    s.offer(T0 + NS // 2, "cam", frame(0.25, blue=220))
    s.run(s.next_job(0.0))  # a step for it is handed out first
    encode = s.next_job(0.0)
    assert encode is None  # the step encodes it; nothing left to encode ahead
    s.offer(T0 + NS, "cam", frame(0.3, blue=255))  # every step that scores this frame raises
    (bad,) = drain(s)
    assert not bad.ok and "ModelOutputError" in bad.error and np.isnan(bad.progress)
    assert [e.reason for e in bad.events] == [FailureReason.MODEL_ERROR] and bad.status.state is EpisodeState.FAILED
    assert s.next_job(0.0) is None  # the failed state is not retried until a new frame arrives


def test_reward_modes_and_live_configuration() -> None:
    s, _ = session(frame_rate=0.0, reward_mode="progress_delta")
    s.start("task")
    rewards = []
    for i, p in enumerate([0.2, 0.5, 0.4]):
        s.offer(T0 + i * NS, "cam", frame(p, 0.7))
        rewards += [r.reward for r in drain(s)]
    assert rewards == pytest.approx([0.0, 0.3, -0.1], abs=0.01)
    s.configure(SessionConfig(frame_rate=0.0, reward_mode="success", monitor=MonitorConfig(success_threshold=0.9)))
    s.offer(T0 + 5 * NS, "cam", frame(0.6, 0.7))
    (step,) = drain(s)
    assert step.reward == pytest.approx(0.7, abs=0.01) and not step.events  # 0.7 < the new threshold 0.9


def test_instructions_are_checked_before_the_episode_changes() -> None:
    s, _ = session()
    s.start("task")
    before = s.episode.episode_id
    with pytest.raises(ValueError, match="empty instruction"):
        s.start("   ")
    assert s.episode.episode_id == before


def test_replay_equals_the_live_loop_and_batching_changes_nothing() -> None:
    class Batched(ScriptedRewardEngine):
        calls = 0

        def score_batch(self, instruction, frame_id_lists):
            Batched.calls += 1
            return [self.score(instruction, ids) for ids in frame_id_lists]

    rng = np.random.default_rng(0)
    progress = np.clip(np.cumsum(rng.uniform(-0.02, 0.06, 50)), 0, 1)
    success = (progress > 0.8) * 0.9
    frames = [frame(p, q) for p, q in zip(progress, success)]
    stamps = [T0 + i * NS // 20 for i in range(50)]
    config = SessionConfig(frame_rate=7.0, max_frames_per_episode=16,
                           monitor=MonitorConfig(stall_timeout_s=0.5, stall_grace_s=0.2))

    live = ScoringSession(ScriptedRewardEngine(), config)
    live.start("task")
    steps = []
    for t, f in zip(stamps, frames):
        live.offer(t, "cam", f)
        steps += drain(live)
    end = live.end(Outcome.FAILURE, restart=False)
    steps += end.final_steps

    engine = Batched()
    offline = replay(ScoringSession(engine, config), "task", stamps, frames, Outcome.FAILURE, "cam", batch_size=4)
    assert Batched.calls >= 3 and engine._features == {}
    assert [(r.stamp_ns, r.frame_stamps_ns, r.progress, r.success_probability) for r in offline.steps] == \
        [(r.stamp_ns, r.frame_stamps_ns, r.progress, r.success_probability) for r in steps]
    assert [(e.kind, e.reason, e.stamp_s) for e in offline.events] == \
        [(e.kind, e.reason, e.stamp_s) for r in steps for e in r.events] + \
        [(e.kind, e.reason, e.stamp_s) for e in end.end_events]
    assert offline.verdict == end.ended.verdict
    # the monitor alone over the recorded step scores gives the same verdict events
    assert monitor_events(offline.step_scores(), config.monitor, outcome=Outcome.FAILURE) == offline.events


def test_parameters_round_trip_through_flat_node_names() -> None:
    config = SessionConfig(frame_rate=3.0, monitor=MonitorConfig(stall_timeout_s=1.5))
    values = config.parameters()
    assert values["monitor.stall_timeout_s"] == 1.5 and values["frame_rate"] == 3.0
    assert SessionConfig.from_parameters(values) == config
    assert SessionConfig.from_parameters({"monitor.success_steps": 3.0, "frame_rate": 4}).monitor.success_steps == 3
    with pytest.raises(ValueError, match="reward_mode"):
        SessionConfig.from_parameters({"reward_mode": "dense"})


def test_replay_on_a_real_bundle_batched_equals_one_step_at_a_time(tiny_bundle) -> None:
    """The tiny bundle (prefix parts, ONNX Runtime): score_batch in the replay gives the one-at-a-time scores."""
    from fixtures_bundle import TINY_INSTRUCTION
    from robometer_ros.engine.reward_engine import RewardEngine

    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(30)]
    stamps = [T0 + i * NS // 10 for i in range(30)]
    config = SessionConfig(frame_rate=0.0, max_frames_per_episode=16)
    engine = RewardEngine(tiny_bundle.path, backend="onnxruntime", verify_checksums=False)
    assert engine.prefix_reuse
    batched = replay(ScoringSession(engine, config), TINY_INSTRUCTION, stamps, frames, batch_size=16)
    single = replay(ScoringSession(engine, config), TINY_INSTRUCTION, stamps, frames, batch_size=1)
    assert len(batched.steps) == len(single.steps) == 30 and len(engine) == 0
    for a, b in zip(batched.steps, single.steps):
        assert a.frame_stamps_ns == b.frame_stamps_ns
        np.testing.assert_allclose(a.frame_progress, b.frame_progress, atol=1e-6)
        np.testing.assert_allclose(a.frame_success_probability, b.frame_success_probability, atol=1e-6)
    engine.close()
