"""Robometer as a Gymnasium reward: ``RewardWrapper`` scores an environment's camera through the ScoringSession.

    engine = RewardEngine("bundles/default", backend="onnxruntime")
    env = RewardWrapper(MetaWorldScene("door-open-v3"), engine, instruction_for("door-open-v3"))
    obs, info = env.reset()
    obs, reward, terminated, truncated, info = env.step(action)   # reward: the model's progress

Each env step (or every ``render_every``-th step, and always the last one of an episode) the wrapper renders
the camera, offers the frame to a ScoringSession stamped with the env's simulated time (steps x ``dt``, so the
monitor's stall and timeout rules run in simulated seconds), runs the session's jobs and takes the newest
StepResult: the same scoring as the reward node on a robot (the frame subsample, the reward modes, the
failure monitor). The step returns the chosen ``reward_mode``:

* ``progress``: the model's progress at the newest frame, in [0, 1] (a dense, potential-like reward);
* ``progress_delta``: the change of progress since the previous scored step (0 on steps not scored), so an
  episode's rewards sum to its last minus its first progress;
* ``success``: the model's success probability at the newest frame.

On steps that are not scored, ``progress`` and ``success`` repeat the last scored value.

``info["robometer"]`` holds the raw scores: progress, success_probability, reward, scored (this step),
step (the session's scoring step), stamp_s, events (the monitor's Events this step), verdict and state
(the episode's), episode_id, error (a model error's text), and at the end of an episode episode_verdict
("succeeded", "failed:STALLED", ...) and end_events. The env's own reward is kept as ``info["env_reward"]``.

Episodes follow the env: ``reset`` starts a new session episode and scores the first frame (its scores are
in the reset's info); a step that terminates or truncates renders and scores its final frame, then ends the
session episode (``end``), which reports the monitor's end-of-episode verdict. Step again only after reset.

``MetaWorldScene`` is a Meta-World task as the default bundle saw it in training (camera corner4, upright
frames, goal markers hidden, fast offscreen rendering, a fixed MT1 scene per reset). Gymnasium's registered
``Meta-World/MT1`` envs render upside down and with goal markers, which the default bundle never saw.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import gymnasium
import numpy as np

from robometer_ros.monitor import Outcome
from robometer_ros.session import NS_PER_S, REWARD_MODES, ScoringSession, SessionConfig, StepResult


def default_session_config(num_frames: int, reward_mode: str = "progress") -> SessionConfig:
    """The reward node's default settings (config/reward_node.yaml where the package has it, else the same
    defaults from SessionConfig) for an engine of ``num_frames`` frames, admitting every offered frame: the
    wrapper's ``render_every`` is the frame rate."""
    from robometer_ros.node_parameters import session_config_from_files

    try:
        config = session_config_from_files(num_frames=num_frames)
    except FileNotFoundError:  # a pip install without the ROS share directory
        config = SessionConfig(num_frames=num_frames)
    return replace(config, frame_rate=0.0, reward_mode=reward_mode)


class RewardWrapper(gymnasium.Wrapper):
    """Replace an env's reward with the reward model's (see the module docstring).

    Args:
        env: the environment; its camera frames come from ``frame(env)``.
        engine: a RewardEngine (or the path of a bundle, opened with ONNX Runtime and closed with the wrapper).
        instruction: the task instruction the frames are scored against.
        reward_mode: progress, progress_delta or success.
        render_every: score every n-th step (1 = every step); the last step of an episode is always scored.
        frame: returns the current uint8 RGB camera frame [H, W, 3] of the env (default ``env.render()``).
        config: the session's settings (default ``default_session_config``); its reward_mode is replaced by
            ``reward_mode``. The monitor's times are simulated seconds: a Meta-World episode lasts at most
            6.25 s, shorter than the node's default ``stall_timeout_s``.
        dt: simulated seconds per step (default the env's ``dt``, else 1 / ``metadata["render_fps"]``).
        camera_frame_id: the frame id the session records for the camera.
    """

    def __init__(self, env: gymnasium.Env, engine: Any, instruction: str, reward_mode: str = "progress",
                 render_every: int = 1, frame: Callable[[gymnasium.Env], np.ndarray] | None = None,
                 config: SessionConfig | None = None, dt: float | None = None,
                 camera_frame_id: str = "camera") -> None:
        super().__init__(env)
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {', '.join(REWARD_MODES)}, got {reward_mode!r}")
        if isinstance(render_every, bool) or not isinstance(render_every, int) or render_every < 1:
            raise ValueError(f"render_every must be an integer >= 1, got {render_every!r}")
        self._owns_engine = isinstance(engine, (str, os.PathLike))
        if self._owns_engine:
            from robometer_ros.engine.reward_engine import RewardEngine

            engine = RewardEngine(engine, backend="onnxruntime")
        self.engine = engine
        self.instruction = instruction
        self.reward_mode = reward_mode
        self.render_every = render_every
        self._frame = frame or (lambda e: e.render())
        self.dt = float(dt) if dt is not None else _step_seconds(env)
        if not math.isfinite(self.dt) or self.dt <= 0:
            raise ValueError(f"dt must be a positive number of seconds, got {self.dt!r}")
        base = config or default_session_config(int(engine.num_frames), reward_mode)
        # Frames render_every steps apart must not look like a camera time jump to the session.
        jump_s = max(base.max_stamp_jump_s, 2.0 * render_every * self.dt)
        self.session = ScoringSession(engine, replace(base, reward_mode=reward_mode, max_stamp_jump_s=jump_s))
        self.session.check_instruction(instruction)
        self.camera_frame_id = camera_frame_id
        self._steps = 0
        self._last: StepResult | None = None
        self._running = False

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        """Reset the env, start a new session episode and score its first frame."""
        obs, info = self.env.reset(seed=seed, options=options)
        self.session.start(self.instruction, reason="env reset")
        self._steps = 0
        self._last = None
        self._running = True
        result = self._score()
        info = dict(info)
        info["robometer"] = self._report(result)
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        """Step the env; score the frame when due; return the model's reward and the env's flags."""
        if not self._running:
            raise RuntimeError("step() before reset() or after the episode ended: call reset() first")
        obs, env_reward, terminated, truncated, info = self.env.step(action)
        self._steps += 1
        done = bool(terminated or truncated)
        result = self._score() if done or self._steps % self.render_every == 0 else None
        report = self._report(result)
        if done:
            change = self.session.end(Outcome.UNKNOWN, restart=False, reason="env episode end")
            if change.final_steps:  # a frame admitted but not yet scored (not the case with every job run)
                result = change.final_steps[-1]
                self._last = result
                report = self._report(result)
            report["episode_verdict"] = change.verdict
            report["end_events"] = change.end_events
            self._running = False
        info = dict(info)
        info["env_reward"] = env_reward
        info["robometer"] = report
        return obs, float(report["reward"]), terminated, truncated, info

    def close(self) -> None:
        """Drop the session's episode, close the engine if the wrapper opened it, close the env."""
        self.session.clear()
        if self._owns_engine:
            self.engine.close()
        super().close()

    # ------------------------------------------------------------------ scoring
    def _score(self) -> StepResult | None:
        """Offer the current frame at the simulated time and run the session's jobs; the newest StepResult."""
        image = np.ascontiguousarray(self._frame(self.env))
        stamp_ns = round(self._steps * self.dt * NS_PER_S)
        self.session.offer(stamp_ns, self.camera_frame_id, image)
        newest = None
        while (job := self.session.next_job(0.0)) is not None:
            result = self.session.run(job)
            if result is not None:
                newest = result
        if newest is not None:
            self._last = newest
        return newest

    def _report(self, result: StepResult | None) -> dict[str, Any]:
        """info["robometer"] of a step: this step's scores, or the last scored step's when not scored."""
        last = result or self._last
        if last is None:
            return {"scored": False, "progress": math.nan, "success_probability": math.nan, "reward": 0.0,
                    "step": -1, "stamp_s": math.nan, "events": (), "verdict": "", "state": "", "episode_id": "",
                    "error": ""}
        if result is not None:
            reward = result.reward
        elif self.reward_mode == "progress_delta":
            reward = 0.0
        else:
            reward = last.reward
        return {
            "scored": result is not None,
            "progress": last.progress,
            "success_probability": last.success_probability,
            "reward": float(reward),
            "step": last.step,
            "stamp_s": last.stamp_ns / NS_PER_S,
            "events": result.events if result is not None else (),
            "verdict": last.status.verdict,
            "state": last.status.state.name,
            "episode_id": last.episode_id,
            "error": last.error,
        }


def _step_seconds(env: gymnasium.Env) -> float:
    dt = getattr(env.unwrapped, "dt", None)
    if dt is not None:
        return float(dt)
    fps = (getattr(env, "metadata", None) or {}).get("render_fps")
    if fps:
        return 1.0 / float(fps)
    raise ValueError("the env has neither dt nor metadata['render_fps']: pass dt (simulated seconds per step)")


class MetaWorldScene(gymnasium.Wrapper):
    """A Meta-World v3 task rendered as the default bundle's training episodes were (``metaworld.TaskScene``:
    camera corner4, upright frames, goal markers hidden, shadows/reflections/MSAA off).

    ``reset`` puts MT1 scene configuration ``config_index`` of benchmark seed ``seed`` (or
    ``options["config_index"]``) and resets; ``render()`` returns the upright frame. Episodes truncate at 500
    steps (Meta-World); ``info["success"]`` is the simulator's success signal.

    Args:
        task: Meta-World v3 task name.
        seed: MT1 benchmark seed (its 50 scene configurations).
        config_index: the scene configuration used by ``reset`` (0-49).
        size: frame height and width in pixels (96: the size the default bundle's episodes were rendered at).
        camera: Meta-World camera name.
    """

    def __init__(self, task: str, seed: int = 0, config_index: int = 0, size: int = 96,
                 camera: str = "corner4") -> None:
        from robometer_ros.training.data.metaworld import RenderSettings, TaskScene

        self.scene = TaskScene(task, seed, RenderSettings(size=size, camera=camera))
        super().__init__(self.scene.env)
        self.task = task
        self.config_index = config_index
        self._closed = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        """Reset into the scene configuration (Meta-World ignores ``seed``; scenes come from MT1)."""
        index = int((options or {}).get("config_index", self.config_index))
        return self.scene.reset(index), {"config_index": index}

    def render(self) -> np.ndarray:
        """The upright camera frame of the current state."""
        return self.scene.render()

    def close(self) -> None:
        """Free the GL context in its own context, then close the env (once)."""
        if not self._closed:
            self._closed = True
            self.scene.close()
