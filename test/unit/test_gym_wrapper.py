"""The Gymnasium reward wrapper: reward modes, scoring cadence, simulated-time stamps, episode boundaries
(scripted engine on a toy env), and the default bundle on a real Meta-World env (expert vs standing still)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

gymnasium = pytest.importorskip("gymnasium")

from robometer_ros.gym import RewardWrapper  # noqa: E402
from support.scripted_engine import ScriptedRewardEngine  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "default"


class RampEnv(gymnasium.Env):
    """A toy env whose camera frame's red level is 20 x (steps so far): the scripted engine reads it as
    progress 20 t / 255 (success probability from green = 10 t); truncates after ``length`` steps."""

    metadata: ClassVar[dict] = {"render_fps": 10}

    def __init__(self, length: int = 10) -> None:
        self.length = length
        self.t = 0
        self.observation_space = gymnasium.spaces.Box(0, 100, (1,), np.float32)
        self.action_space = gymnasium.spaces.Discrete(1)
        self.renders = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {"reset": True}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.float32), -1.0, False, self.t >= self.length, {"t": self.t}

    def render(self):
        self.renders += 1
        frame = np.zeros((8, 8, 3), np.uint8)
        frame[..., 0] = min(255, 20 * self.t)
        frame[..., 1] = min(255, 10 * self.t)
        return frame


def _episode(env: RewardWrapper) -> tuple[dict, list[tuple[float, dict]]]:
    _, info = env.reset()
    steps = []
    while True:
        _, reward, terminated, truncated, step_info = env.step(0)
        steps.append((reward, step_info))
        if terminated or truncated:
            return info, steps


def test_progress_reward_every_step_with_simulated_time_stamps() -> None:
    env = RewardWrapper(RampEnv(10), ScriptedRewardEngine(num_frames=4), "ramp up")
    info, steps = _episode(env)
    first = info["robometer"]
    assert first["scored"] and first["step"] == 0 and first["stamp_s"] == 0.0
    assert first["progress"] == pytest.approx(0.0, abs=1e-6)
    rewards = [r for r, _ in steps]
    np.testing.assert_allclose(rewards, [20 * t / 255 for t in range(1, 11)], atol=1e-6)
    robometer = [i["robometer"] for _, i in steps]
    assert all(r["scored"] for r in robometer)
    # stamps are simulated time: step t at t / render_fps seconds
    np.testing.assert_allclose([r["stamp_s"] for r in robometer], [t / 10 for t in range(1, 11)])
    np.testing.assert_allclose([r["success_probability"] for r in robometer], [10 * t / 255 for t in range(1, 11)],
                               atol=1e-6)
    assert steps[-1][1]["env_reward"] == -1.0 and steps[-1][1]["t"] == 10
    assert "episode_verdict" in steps[-1][1]["robometer"] and "episode_verdict" not in steps[0][1]["robometer"]
    env.close()


def test_progress_delta_sums_to_the_rise_and_render_every_scores_the_last_step() -> None:
    base = RampEnv(10)
    env = RewardWrapper(base, ScriptedRewardEngine(num_frames=4), "ramp up", reward_mode="progress_delta",
                        render_every=3)
    info, steps = _episode(env)
    scored = [i["robometer"]["scored"] for _, i in steps]
    # steps 3, 6, 9 by the cadence, 10 because it ends the episode
    assert scored == [False, False, True, False, False, True, False, False, True, True]
    assert base.renders == 1 + 4  # the reset frame and the four scored steps
    rewards = np.array([r for r, _ in steps])
    assert np.all(rewards[~np.array(scored)] == 0.0)
    assert rewards.sum() == pytest.approx(steps[-1][1]["robometer"]["progress"] - info["robometer"]["progress"],
                                          abs=1e-6)
    np.testing.assert_allclose(rewards[[2, 5, 8, 9]], [60 / 255, 60 / 255, 60 / 255, 20 / 255], atol=1e-6)
    env.close()


def test_sparse_scoring_is_not_taken_for_a_camera_time_jump() -> None:
    """Frames 30 simulated seconds apart (beyond the node's max_stamp_jump_s) are still one episode's frames."""
    env = RewardWrapper(RampEnv(600), ScriptedRewardEngine(num_frames=4), "ramp up", render_every=300)
    info, steps = _episode(env)
    scored = [(i["robometer"]["step"], i["robometer"]["stamp_s"]) for _, i in steps if i["robometer"]["scored"]]
    assert scored == [(1, 30.0), (2, 60.0)]
    assert steps[-1][1]["robometer"]["episode_id"] == info["robometer"]["episode_id"]
    assert env.session.counters()["frames_dropped"] == 0
    env.close()


def test_success_mode_and_unscored_steps_repeat_the_last_value() -> None:
    env = RewardWrapper(RampEnv(6), ScriptedRewardEngine(num_frames=4), "ramp up", reward_mode="success",
                        render_every=2)
    _, steps = _episode(env)
    rewards = [r for r, _ in steps]
    # scored at 2, 4, 6; steps 1, 3, 5 repeat the previous scored step's success probability
    np.testing.assert_allclose(rewards, [0.0, 20 / 255, 20 / 255, 40 / 255, 40 / 255, 60 / 255], atol=1e-6)
    assert [i["robometer"]["scored"] for _, i in steps] == [False, True, False, True, False, True]
    env.close()


def test_episodes_follow_reset_and_stepping_after_the_end_is_refused() -> None:
    env = RewardWrapper(RampEnv(3), ScriptedRewardEngine(num_frames=4), "ramp up")
    first, steps = _episode(env)
    assert steps[-1][1]["robometer"]["episode_id"] == first["robometer"]["episode_id"]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)
    second, steps = _episode(env)
    assert second["robometer"]["episode_id"] != first["robometer"]["episode_id"]
    # a new episode starts from scratch: the first frame is step 0 again, at time 0
    assert second["robometer"]["step"] == 0 and second["robometer"]["stamp_s"] == 0.0
    assert len(steps) == 3
    # reset in the middle of an episode also starts a new one
    env.reset()
    env.step(0)
    _, third = env.reset()
    assert third["robometer"]["step"] == 0
    env.close()


def test_bad_arguments_are_refused() -> None:
    engine = ScriptedRewardEngine(num_frames=4)
    with pytest.raises(ValueError, match="reward_mode"):
        RewardWrapper(RampEnv(), engine, "x", reward_mode="dense")
    with pytest.raises(ValueError, match="render_every"):
        RewardWrapper(RampEnv(), engine, "x", render_every=0)
    with pytest.raises(ValueError, match="instruction"):
        RewardWrapper(RampEnv(), engine, "  ")


@pytest.mark.slow
def test_default_bundle_on_metaworld_rises_for_the_expert_and_not_when_standing_still() -> None:
    """door-open-v3 (a task the default bundle trained on), a scene of MT1 seed 2 it never saw, 64 px frames
    scored every 5th step over 100 steps: the expert opens the door by step ~80."""
    pytest.importorskip("metaworld")
    from metaworld.policies import ENV_POLICY_MAP

    from robometer_ros.engine.reward_engine import RewardEngine
    from robometer_ros.gym import MetaWorldScene
    from robometer_ros.training.data.metaworld import instruction_for

    task = "door-open-v3"
    engine = RewardEngine(BUNDLE, backend="onnxruntime", intra_op_threads=1)
    env = RewardWrapper(MetaWorldScene(task, seed=2, config_index=0, size=64), engine, instruction_for(task),
                        render_every=5)
    curves = {}
    try:
        for behaviour in ("expert", "still"):  # two episodes of one env: reset puts the same scene back
            policy = ENV_POLICY_MAP[task]()
            obs, info = env.reset()
            progress, succeeded = [info["robometer"]["progress"]], False
            for _ in range(100):
                action = policy.get_action(obs) if behaviour == "expert" else np.zeros(4)
                obs, reward, _, _, info = env.step(action)
                succeeded |= bool(info["success"])
                if info["robometer"]["scored"]:
                    assert reward == info["robometer"]["progress"]
                    progress.append(reward)
            curves[behaviour] = (np.array(progress), succeeded, info["robometer"]["verdict"])
    finally:
        env.close()
        engine.close()
    expert, expert_succeeded, expert_verdict = curves["expert"]
    still, still_succeeded, still_verdict = curves["still"]
    assert expert_succeeded and not still_succeeded  # the simulator agrees with the scenario
    assert len(expert) == len(still) == 21
    assert expert.max() - expert[0] > 0.5, expert
    assert expert[-5:].mean() > 0.6, expert
    assert expert_verdict == "succeeded"
    assert still.max() - still[0] < 0.1, still
    assert still_verdict != "succeeded"
