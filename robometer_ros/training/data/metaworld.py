"""Simulated robot episodes from Meta-World (``robometer-dataset from-metaworld``).

For every task and every episode slot this renders three episodes of one scene configuration:

* an **expert** episode (the task's scripted policy), which is also the speed reference for the slot;
* a **suboptimal-kind** episode: the expert with Gaussian action noise at one of several scales, or with a
  segment of uniformly random actions;
* a **failure-kind** episode: another task's scripted policy, the expert stalling part-way, or the expert
  stopped early.

The *kind* only says how an episode was made. Its quality label comes from the environment's own success
signal (``info["success"]``), because a wrong policy often succeeds by accident and a noisy one often fails:

* ``successful``: the task succeeded, and first did so no later than ``slow_factor`` x the expert's
  first-success step in the same scene;
* ``suboptimal``: the task succeeded, but later than that (or the slot's expert never succeeded, so there is
  no expert speed to match);
* ``failure``: the task never succeeded.

Every episode ends ``post_success_steps`` after its first success, so all successes end the same way; the
rest run to a horizon capped at about twice the expert's length (early stops end sooner), so episode length
is no shortcut to the label.

Rendering follows ../shared/reference/metaworld-episodes.md: camera ``corner4``, frames rotated by 180
degrees (upright and not mirrored), shadows / reflections / MSAA off, goal marker sites hidden, MT1 task sets
(the scripted experts need the goal in the observation). The physics runs without rendering and only the
chosen ``frames`` states are restored and rendered, which gives the same pixels as rendering inline.

Reproducible: the MT1 benchmark seed is ``--seed``, slot i uses scene configuration i of that benchmark, and
every behaviour's randomness comes from a generator seeded by (seed, task, slot, kind), independent of which
worker process ran it.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robometer_ros.trajectory import FAILURE, SUBOPTIMAL, SUCCESSFUL, Trajectory

# Software EGL (Mesa llvmpipe) renders offscreen without a display or GPU; it must be chosen before
# mujoco is first imported, which only happens inside the functions below.
os.environ.setdefault("MUJOCO_GL", "egl")

DATA_SOURCE = "metaworld"
EMBODIMENT = "sawyer"
GENERATOR_VERSION = 1
CONFIGS_PER_BENCHMARK = 50  # MT1 builds 50 scene configurations per task and seed
MAX_PATH_LENGTH = 500  # Meta-World truncates every episode at 500 steps

# Episode kinds (how an episode was made; never its label).
EXPERT = "expert"
SUBOPTIMAL_KIND = "suboptimal"
FAILURE_KIND = "failure"
KINDS = (EXPERT, SUBOPTIMAL_KIND, FAILURE_KIND)

NOISE_SCALES = (0.25, 0.5, 1.0)

TASKS_FILE = Path(__file__).with_name("metaworld_tasks.yaml")


@dataclass(frozen=True)
class TaskCatalog:
    """The Meta-World tasks of the default model: the task split and how people ask for each task.

    Read from ``metaworld_tasks.yaml`` beside this module (the one data file of phrasings and splits).

    Attributes:
        heldout_tasks: tasks never trained on (chosen before training).
        train_phrasings: per task, the wordings training, model selection and calibration use; the first
            is the instruction stored in generated episodes.
        heldout_phrasings: per task, wordings used only by evaluation and the demo.
        sha256: digest of the file, recorded in the bundle manifest so a bundle names its split.
    """

    heldout_tasks: tuple[str, ...]
    train_phrasings: dict[str, tuple[str, ...]]
    heldout_phrasings: dict[str, tuple[str, ...]]
    sha256: str

    @classmethod
    def load(cls, path: str | os.PathLike[str] = TASKS_FILE) -> TaskCatalog:
        """Read and check a catalog file (every task has training and held-out wordings, none shared)."""
        import hashlib

        import yaml

        raw = Path(path).read_bytes()
        data = yaml.safe_load(raw)
        phrasings = data["phrasings"]
        train = {task: tuple(entry["train"]) for task, entry in phrasings.items()}
        heldout = {task: tuple(entry["heldout"]) for task, entry in phrasings.items()}
        catalog = cls(tuple(data["heldout_tasks"]), train, heldout, hashlib.sha256(raw).hexdigest())
        unknown = set(catalog.heldout_tasks) - set(train)
        if unknown:
            raise ValueError(f"{path}: held-out tasks without phrasings: {sorted(unknown)}")
        wordings = [w for task in train for w in (*train[task], *heldout[task])]
        repeated = sorted(w for w, n in Counter(wordings).items() if n > 1)
        if repeated or not all(train.values()) or not all(heldout.values()):
            raise ValueError(f"{path}: every task needs training and held-out wordings, none shared: {repeated}")
        return catalog

    @property
    def trained_tasks(self) -> tuple[str, ...]:
        """The tasks training uses (every task not held out), sorted."""
        return tuple(sorted(set(self.train_phrasings) - set(self.heldout_tasks)))

    def tasks(self, split: str) -> tuple[str, ...]:
        """Task names of a split: ``trained`` or ``heldout``."""
        if split == "trained":
            return self.trained_tasks
        if split == "heldout":
            return tuple(sorted(self.heldout_tasks))
        raise ValueError(f"task split must be 'trained' or 'heldout', got {split!r}")

    def instruction(self, task: str) -> str:
        """The instruction stored in a task's generated episodes (its first training wording)."""
        try:
            return self.train_phrasings[task][0]
        except KeyError:
            raise ValueError(
                f"unknown Meta-World task {task!r}; known tasks: {', '.join(sorted(self.train_phrasings))}"
            ) from None

    def training_wordings(self) -> dict[str, list[str]]:
        """Stored instruction -> the wordings training samples from (the sampler's ``instruction_phrasings``)."""
        return {wordings[0]: list(wordings) for wordings in self.train_phrasings.values()}

    def summary(self) -> dict[str, Any]:
        """The split as recorded with a trained model (training.json, the bundle manifest)."""
        return {
            "sha256": self.sha256,
            "trained_tasks": list(self.trained_tasks),
            "heldout_tasks": list(self.tasks("heldout")),
            "train_phrasings": {task: list(w) for task, w in sorted(self.train_phrasings.items())},
            "heldout_phrasings": {task: list(w) for task, w in sorted(self.heldout_phrasings.items())},
        }

    def wording(self, instruction: str, key: str, split: str) -> str:
        """A wording of the task whose stored instruction is ``instruction``, from ``split`` (``train`` or
        ``heldout``), chosen by ``key`` (e.g. an episode id) so the same episode always gets the same one."""
        table = {"train": self.train_phrasings, "heldout": self.heldout_phrasings}.get(split)
        if table is None:
            raise ValueError(f"phrasing split must be 'train' or 'heldout', got {split!r}")
        for task, wordings in self.train_phrasings.items():
            if instruction == wordings[0]:
                choices = table[task]
                return choices[zlib.crc32(key.encode()) % len(choices)]
        raise ValueError(f"{instruction!r} is not the stored instruction of any task in the catalog")


CATALOG = TaskCatalog.load()
#: Task -> the instruction stored in its generated episodes.
INSTRUCTIONS: dict[str, str] = {task: CATALOG.instruction(task) for task in CATALOG.train_phrasings}


@dataclass(frozen=True)
class RenderSettings:
    """How episodes are run and rendered.

    Attributes:
        frames: frames stored per episode (evenly spaced over the episode, first and last step included).
        size: frame height and width in pixels.
        camera: Meta-World camera name.
        post_success_steps: steps an episode goes on after its first success.
        slow_factor: a success is "successful" when its first-success step is at most this times the
            expert's in the same scene, "suboptimal" when later.
        failure_horizon_factor: stall and wrong-policy episodes run this times the expert's length at most.
        step_data: also store every control step's observation and action in the trajectory's
            ``step_data`` (``observations`` [S + 1, 39], ``actions`` [S, 4], ``frame_steps`` [F]); the
            frames, labels and metadata are the same either way.
    """

    frames: int = 32
    size: int = 128
    camera: str = "corner4"
    post_success_steps: int = 10
    slow_factor: float = 1.2
    failure_horizon_factor: float = 2.0
    step_data: bool = False

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise ValueError(f"frames must be >= 2, got {self.frames}")
        if self.size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {self.size}")
        if self.slow_factor < 1.0:
            raise ValueError(f"slow_factor must be >= 1, got {self.slow_factor}")


@dataclass(frozen=True)
class Behaviour:
    """How one episode's actions are produced.

    Attributes:
        name: expert, noisy, random_segment, wrong_policy, stall or early_stop.
        horizon: the most steps the episode may run.
        noise_scale: Gaussian action-noise standard deviation (noisy).
        segment: [start, end) steps of random actions (random_segment).
        stall_step: step from which the arm holds still (stall).
        other_task: the task whose policy acts (wrong_policy).
    """

    name: str
    horizon: int
    noise_scale: float = 0.0
    segment: tuple[int, int] | None = None
    stall_step: int | None = None
    other_task: str | None = None

    def params(self) -> dict[str, Any]:
        """The behaviour's parameters for episode metadata (JSON-serialisable)."""
        record = {key: value for key, value in asdict(self).items() if value is not None}
        if "segment" in record:
            record["segment"] = list(record["segment"])
        return record


def quality_label(
    first_success_step: int | None, reference_first_success_step: int | None, slow_factor: float
) -> str:
    """The episode's quality from the environment's success signal alone.

    Args:
        first_success_step: the first step at which ``info["success"]`` was true, or None if never.
        reference_first_success_step: the slot's expert first-success step, or None if the expert failed.
        slow_factor: how much slower than the expert a success may be and still count as successful.
    """
    if first_success_step is None:
        return FAILURE
    if reference_first_success_step is None:
        return SUBOPTIMAL  # no expert speed to compare with in this scene
    if first_success_step <= slow_factor * reference_first_success_step:
        return SUCCESSFUL
    return SUBOPTIMAL


def instruction_for(task: str) -> str:
    """The natural-language instruction of a Meta-World task; a clear error for unknown names."""
    return CATALOG.instruction(task)


def behaviour_rng(seed: int, task: str, slot: int, kind: str) -> np.random.Generator:
    """The random generator of one episode, independent of process and order of generation."""
    return np.random.default_rng([seed, zlib.crc32(task.encode()), slot, KINDS.index(kind)])


def plan_behaviour(
    kind: str,
    task: str,
    reference_length: int,
    rng: np.random.Generator,
    failure_horizon_factor: float = 2.0,
) -> Behaviour:
    """Choose the behaviour of a suboptimal-kind or failure-kind episode.

    Args:
        kind: SUBOPTIMAL_KIND or FAILURE_KIND.
        task: the task being attempted.
        reference_length: the slot's expert episode length in steps.
        rng: the episode's generator.
        failure_horizon_factor: stall and wrong-policy episodes run at most this times reference_length.
    """
    settings_cap = MAX_PATH_LENGTH
    if kind == SUBOPTIMAL_KIND:
        choice = int(rng.integers(0, len(NOISE_SCALES) + 1))
        if choice < len(NOISE_SCALES):
            return Behaviour("noisy", settings_cap, noise_scale=NOISE_SCALES[choice])
        length = int(rng.integers(15, 41))
        start = int(rng.integers(0, max(1, int(0.7 * reference_length))))
        return Behaviour("random_segment", settings_cap, segment=(start, start + length))
    if kind == FAILURE_KIND:
        horizon = min(settings_cap, math.ceil(failure_horizon_factor * reference_length))
        choice = int(rng.integers(0, 3))
        if choice == 0:
            others = sorted(name for name in INSTRUCTIONS if name != task)
            return Behaviour("wrong_policy", horizon, other_task=others[int(rng.integers(0, len(others)))])
        if choice == 1:
            stall = max(1, int(rng.uniform(0.2, 0.7) * reference_length))
            return Behaviour("stall", horizon, stall_step=stall)
        return Behaviour("early_stop", max(5, int(rng.uniform(0.2, 0.8) * reference_length)))
    raise ValueError(f"kind must be {SUBOPTIMAL_KIND!r} or {FAILURE_KIND!r}, got {kind!r}")


@dataclass
class Rollout:
    """One simulated episode before it becomes a Trajectory."""

    frames: np.ndarray  # uint8 [F, H, W, 3]
    frame_steps: np.ndarray  # int [F], simulator step of each frame (0 = reset state)
    steps: int
    first_success_step: int | None
    success: np.ndarray  # bool [steps + 1], per step (step 0 = reset state, never a success)
    in_place: np.ndarray  # float [steps + 1], Meta-World's in_place_reward (a state-based progress proxy)
    dt: float
    # float32 [steps + 1, 39]: the observation before each step's action (the last one after the final step)
    observations: np.ndarray | None = None
    # float32 [steps, 4]: the action applied at each step (noise included), clipped to [-1, 1] as the env does
    actions: np.ndarray | None = None


class TaskScene:
    """One Meta-World environment of a task, set up for fast, upright, marker-free offscreen rendering.

    Args:
        task: Meta-World v3 task name.
        seed: MT1 benchmark seed (selects the 50 scene configurations).
        settings: render settings.
    """

    def __init__(self, task: str, seed: int, settings: RenderSettings) -> None:
        instruction_for(task)  # validates the name
        warnings.filterwarnings("ignore", module="metaworld")  # policies warn about clipping every step
        import metaworld
        import mujoco

        self._mujoco = mujoco
        self.task = task
        self.settings = settings
        self._benchmark = metaworld.MT1(task, seed=seed)
        env = self._benchmark.train_classes[task](
            render_mode="rgb_array", camera_name=settings.camera, width=settings.size, height=settings.size
        )
        self.env = env
        env.set_task(self._benchmark.train_tasks[0])
        env.reset()
        # MSAA is a model option and must be off before the GL context is created by _get_viewer.
        env.model.vis.quality.offsamples = 0
        viewer = env.mujoco_renderer._get_viewer("rgb_array")
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        # Goal markers are sites: they would show the model where "done" is, a shortcut a real camera lacks.
        viewer.vopt.sitegroup[:] = 0
        self._viewer = viewer
        self._state_spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
        self._state_size = mujoco.mj_stateSize(env.model, self._state_spec)

    def close(self) -> None:
        """Free the GL context in its own context (else the next scene of this process renders black)."""
        self._viewer.make_context_current()
        self._viewer.con.free()
        self.env.close()

    def reset(self, config_index: int) -> np.ndarray:
        """Put the scene in configuration ``config_index`` of the benchmark and return the observation."""
        self.env.set_task(self._benchmark.train_tasks[config_index % len(self._benchmark.train_tasks)])
        return self.env.reset()[0]

    def run(self, config_index: int, behaviour: Behaviour, rng: np.random.Generator) -> Rollout:
        """Run one episode in configuration ``config_index`` and render its frames."""
        from metaworld.policies import ENV_POLICY_MAP

        mujoco = self._mujoco
        env = self.env
        obs = self.reset(config_index)
        expert = ENV_POLICY_MAP[self.task]()
        actor = ENV_POLICY_MAP[behaviour.other_task]() if behaviour.other_task else expert
        horizon = min(behaviour.horizon, MAX_PATH_LENGTH)
        states = np.empty((horizon + 1, self._state_size))
        mujoco.mj_getState(env.model, env.data, states[0], self._state_spec)
        success = [False]
        observations = [np.asarray(obs, dtype=np.float32)]
        actions: list[np.ndarray] = []
        in_place: list[float] = []
        first_success: int | None = None
        hold_gripper = 0.0
        steps = 0
        for step in range(horizon):
            action = np.asarray(actor.get_action(obs), dtype=np.float64)
            if behaviour.name == "noisy":
                action = np.clip(action + rng.normal(0.0, behaviour.noise_scale, 4), -1.0, 1.0)
            elif behaviour.segment is not None and behaviour.segment[0] <= step < behaviour.segment[1]:
                action = rng.uniform(-1.0, 1.0, 4)
            elif behaviour.stall_step is not None:
                if step >= behaviour.stall_step:
                    action = np.array([0.0, 0.0, 0.0, hold_gripper])
                else:
                    hold_gripper = float(action[3])
            obs, _, _, truncated, info = env.step(action)
            actions.append(np.clip(action, -1.0, 1.0).astype(np.float32))  # what the simulator applies
            observations.append(np.asarray(obs, dtype=np.float32))
            steps = step + 1
            mujoco.mj_getState(env.model, env.data, states[steps], self._state_spec)
            success.append(bool(info["success"]))
            in_place.append(float(info.get("in_place_reward", 0.0)))
            if first_success is None and info["success"]:
                first_success = steps
            if first_success is not None and steps >= first_success + self.settings.post_success_steps:
                break
            if truncated:
                break
        # The reset state has no info; it gets the first step's value (it moved by one step at most).
        in_place_array = np.array([in_place[0], *in_place], dtype=np.float32)
        frame_steps = np.rint(np.linspace(0, steps, self.settings.frames)).astype(np.int64)
        frames = np.empty((len(frame_steps), self.settings.size, self.settings.size, 3), np.uint8)
        for j, step in enumerate(frame_steps):
            mujoco.mj_setState(env.model, env.data, states[step], self._state_spec)
            mujoco.mj_forward(env.model, env.data)
            frames[j] = self._render()
        return Rollout(
            frames=frames,
            frame_steps=frame_steps,
            steps=steps,
            first_success_step=first_success,
            success=np.array(success, dtype=bool),
            in_place=in_place_array,
            dt=float(env.dt),
            observations=np.stack(observations),
            actions=np.stack(actions) if actions else np.zeros((0, 4), np.float32),
        )

    def render(self) -> np.ndarray:
        """The camera frame of the scene's current state (upright uint8 RGB [size, size, 3])."""
        return self._render()

    def _render(self) -> np.ndarray:
        # Make this scene's context current: another scene created or freed in this process may have
        # unbound it, which renders black frames.
        self._viewer.make_context_current()
        image = self.env.render()
        # Meta-World's cameras have "up" along -z, so the image is upside down; rotating 180 degrees is
        # the physically right fix (a vertical flip alone would mirror the scene).
        return np.ascontiguousarray(image[::-1, ::-1])


def frame_progress(rollout: Rollout) -> tuple[np.ndarray, str]:
    """Per-frame simulator progress and where it came from.

    Successes: time progress to the first success, ``clip(step / first_success, 0, 1)``. Otherwise
    Meta-World's ``in_place_reward`` (a state-based [0, 1] measure of how close the object is to its goal).
    """
    if rollout.first_success_step is not None:
        progress = np.clip(rollout.frame_steps / rollout.first_success_step, 0.0, 1.0)
        return progress.astype(np.float32), "time_to_first_success"
    return np.clip(rollout.in_place[rollout.frame_steps], 0.0, 1.0).astype(np.float32), "in_place_reward"


def to_trajectory(
    rollout: Rollout,
    task: str,
    seed: int,
    slot: int,
    kind: str,
    behaviour: Behaviour,
    reference_first_success_step: int | None,
    settings: RenderSettings,
) -> Trajectory:
    """Label a rollout by its success signal and wrap it as a Trajectory."""
    label = quality_label(rollout.first_success_step, reference_first_success_step, settings.slow_factor)
    progress, progress_source = frame_progress(rollout)
    step_data: dict[str, np.ndarray] = {}
    if settings.step_data and rollout.observations is not None and rollout.actions is not None:
        step_data = {"observations": rollout.observations, "actions": rollout.actions,
                     "frame_steps": rollout.frame_steps.astype(np.int64)}
    return Trajectory(
        instruction=instruction_for(task),
        frames=rollout.frames,
        frame_stamps=rollout.frame_steps * rollout.dt,
        quality_label=label,
        progress=progress,
        data_source=DATA_SOURCE,
        embodiment=EMBODIMENT,
        episode_id=f"{task}/seed{seed}/slot{slot:02d}/{kind}",
        metadata={
            "task": task,
            "seed": seed,
            "slot": slot,
            "config_index": slot % CONFIGS_PER_BENCHMARK,
            "kind": kind,
            "behaviour": behaviour.name,
            "behaviour_params": behaviour.params(),
            "steps": rollout.steps,
            "first_success_step": rollout.first_success_step,
            "expert_first_success_step": reference_first_success_step,
            "slow_factor": settings.slow_factor,
            "frame_steps": rollout.frame_steps.tolist(),
            "frame_success": rollout.success[rollout.frame_steps].tolist(),
            "progress_source": progress_source,
            "camera": settings.camera,
            "control_dt": rollout.dt,
            "generator_version": GENERATOR_VERSION,
        },
        step_data=step_data,
    )


def generate_slot(scene: TaskScene, seed: int, slot: int, settings: RenderSettings) -> list[Trajectory]:
    """The expert, suboptimal-kind and failure-kind episodes of one scene configuration."""
    task = scene.task
    expert = Behaviour(EXPERT, MAX_PATH_LENGTH)
    expert_rollout = scene.run(slot, expert, behaviour_rng(seed, task, slot, EXPERT))
    reference = expert_rollout.first_success_step
    reference_length = expert_rollout.steps
    trajectories = [to_trajectory(expert_rollout, task, seed, slot, EXPERT, expert, reference, settings)]
    for kind in (SUBOPTIMAL_KIND, FAILURE_KIND):
        rng = behaviour_rng(seed, task, slot, kind)
        behaviour = plan_behaviour(kind, task, reference_length, rng, settings.failure_horizon_factor)
        rollout = scene.run(slot, behaviour, rng)
        trajectories.append(to_trajectory(rollout, task, seed, slot, kind, behaviour, reference, settings))
    return trajectories


# Work units are (task, slot); each worker process keeps one scene (its own env and GL context) per task.
_worker_scene: TaskScene | None = None
_worker_scene_key: tuple[str, int] | None = None


def _run_unit(unit: tuple[str, int, int, RenderSettings]) -> list[Trajectory]:
    global _worker_scene, _worker_scene_key
    task, seed, slot, settings = unit
    if _worker_scene_key != (task, seed):
        if _worker_scene is not None:
            _worker_scene.close()
        _worker_scene = TaskScene(task, seed, settings)
        _worker_scene_key = (task, seed)
    return generate_slot(_worker_scene, seed, slot, settings)


def _close_worker_scene() -> None:
    global _worker_scene, _worker_scene_key
    if _worker_scene is not None:
        _worker_scene.close()
    _worker_scene, _worker_scene_key = None, None


def generate(
    tasks: Sequence[str],
    episodes_per_task: int,
    seed: int,
    settings: RenderSettings | None = None,
    workers: int = 1,
    progress_bar: bool = True,
) -> Iterator[Trajectory]:
    """Yield 3 x ``episodes_per_task`` labelled Trajectories per task, in task and slot order.

    Args:
        tasks: Meta-World v3 task names.
        episodes_per_task: episode slots per task (each gives an expert, a suboptimal-kind and a
            failure-kind episode); at most 50, the scene configurations of one MT1 seed.
        seed: MT1 benchmark seed and the root of every behaviour's randomness.
        settings: render settings (defaults: 32 frames, 128 px, corner4).
        workers: processes; 1 runs in this process. Each worker builds its own environments.
        progress_bar: show a tqdm bar of slots done.
    """
    settings = settings or RenderSettings()
    if not tasks:
        raise ValueError("no tasks given")
    for task in tasks:
        instruction_for(task)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks repeat: {list(tasks)}")
    if not 1 <= episodes_per_task <= CONFIGS_PER_BENCHMARK:
        raise ValueError(
            f"episodes_per_task must be in [1, {CONFIGS_PER_BENCHMARK}] (the scene configurations of one "
            f"MT1 seed), got {episodes_per_task}; generate more with further --seed values"
        )
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    units = [(task, seed, slot, settings) for task in tasks for slot in range(episodes_per_task)]
    from tqdm import tqdm

    bar = tqdm(total=len(units), unit="slot", desc="metaworld", disable=not progress_bar)
    try:
        if workers == 1:
            try:
                for unit in units:
                    yield from _run_unit(unit)
                    bar.update(1)
            finally:
                _close_worker_scene()
        else:
            # spawn: a fresh interpreter per worker, so no GL state is inherited through fork.
            context = multiprocessing.get_context("spawn")
            with context.Pool(workers) as pool:
                # chunks of one task's slots keep each worker on one scene as long as possible
                for trajectories in pool.imap(_run_unit, units, chunksize=max(1, episodes_per_task // 2)):
                    yield from trajectories
                    bar.update(1)
    finally:
        bar.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``from-metaworld`` subcommand's own arguments (the output options come from dataset_cli)."""
    parser.add_argument("--tasks", nargs="+", required=True, help="Meta-World v3 task names, e.g. door-open-v3")
    parser.add_argument("--episodes-per-task", type=int, default=20,
                        help="scene slots per task, at most 50 (each gives 3 episodes: expert, suboptimal- "
                             "and failure-kind)")
    parser.add_argument("--seed", type=int, default=0, help="MT1 benchmark seed and behaviour seed root")
    parser.add_argument("--frames", type=int, default=32, help="frames per episode")
    parser.add_argument("--size", type=int, default=128, help="frame height and width in pixels")
    parser.add_argument("--camera", default="corner4", help="Meta-World camera name")
    parser.add_argument("--slow-factor", type=float, default=1.2,
                        help="a success slower than this times the expert's is labelled suboptimal")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (each builds its own envs)")
    parser.add_argument("--observations-actions", action="store_true",
                        help="also store every control step's observation (39-d simulator state) and action "
                             "(step.observations / step.actions, with step.frame_steps: the step of each frame)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Generate the episodes into the dataset at ``args.out`` (dataset_cli's output options) and print
    how many episodes of each kind got each label."""
    import json

    from robometer_ros.training.data.store import DEFAULT_SHARD_SIZE, DatasetWriter

    settings = RenderSettings(
        frames=args.frames, size=args.size, camera=args.camera, slow_factor=args.slow_factor,
        step_data=getattr(args, "observations_actions", False),
    )
    counts: dict[str, dict[str, int]] = {}
    writer = DatasetWriter(
        args.out,
        frame_codec=getattr(args, "codec", "png"),
        shard_size=getattr(args, "shard_size", DEFAULT_SHARD_SIZE),
        append=getattr(args, "append", False),
    )
    with writer:
        for trajectory in generate(
            args.tasks, args.episodes_per_task, args.seed, settings, args.workers, not args.no_progress
        ):
            writer.add(trajectory)
            by_label = counts.setdefault(trajectory.metadata["kind"], {})
            by_label[trajectory.quality_label] = by_label.get(trajectory.quality_label, 0) + 1
    print(f"wrote {sum(sum(c.values()) for c in counts.values())} episodes to {args.out} (kind -> label)")
    for kind in KINDS:
        print(f"  {kind:<10s} " + ", ".join(f"{label} {n}" for label, n in sorted(counts.get(kind, {}).items())))
    if getattr(args, "report_json", None) is not None:
        report = {"out": str(args.out), "tasks": list(args.tasks), "seed": args.seed, "kind_label_counts": counts}
        Path(args.report_json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


# ---------------------------------------------------------------------------------------------- default model
def _size(hidden: int, layers: int, heads: int, vision_hidden: int, vision_depth: int) -> dict[str, Any]:
    # head_dim 32 and mrope_section [6, 5, 5] (sum = head_dim / 2) in every size. rope_theta is 1e4 rather than
    # Qwen3-VL's 5e6: with head_dim 32, a 5e6 base leaves almost no rotary dimensions that resolve the short
    # distances between a frame's visual tokens and its <|prog_token|>, and the model learns which frame it is
    # scoring more slowly.
    return {
        "text": {"hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": layers,
                 "num_attention_heads": heads, "num_key_value_heads": 2, "head_dim": 32,
                 "mrope_section": [6, 5, 5], "rope_theta": 10000.0},
        "vision": {"depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": 8 * vision_hidden // 3,
                   "num_heads": vision_hidden // 32, "num_position_embeddings": 64,
                   "deepstack_visual_indexes": [0]},
    }


#: Robometer-shaped Qwen3-VL sizes measured for the default model (benchmarks/bench_default_sizes.py); the
#: default is the largest that trains to convergence in about two hours on 2 CPU cores and scores a step in
#: well under 10 ms on one core (README, "The embedded default model").
DEFAULT_MODEL_SIZES: dict[str, dict[str, Any]] = {
    "s": _size(128, 3, 4, 96, 2),
    "m": _size(192, 4, 6, 128, 2),
    "l": _size(256, 4, 8, 128, 3),
}
DEFAULT_MODEL_SIZE_NAME = "m"
DEFAULT_FRAME_SIZE = 64
DEFAULT_TOKENIZER_VOCAB = 800


def default_model_tokenizer() -> Any:
    """A small byte-level BPE trained on the Robometer prompts filled with the trained tasks' training wordings.

    Only those: held-out wordings and held-out tasks never shape the vocabulary, so their words reach the model
    as the pieces (sub-words, bytes) it learnt from other words.
    """
    from robometer_ros.model.tiny import tiny_tokenizer

    wordings = sorted(w for task in CATALOG.trained_tasks for w in CATALOG.train_phrasings[task])
    return tiny_tokenizer(wordings, vocab_size=DEFAULT_TOKENIZER_VOCAB)


def default_model_config(tokenizer: Any, num_frames: int = 8, size: str = DEFAULT_MODEL_SIZE_NAME) -> Any:
    """The RobometerConfig of the default model in ``size`` (a DEFAULT_MODEL_SIZES key), its vocabulary and
    vision token ids from ``tokenizer``."""
    from robometer_ros.model.config import RobometerConfig
    from robometer_ros.model.tiny import config_for_tokenizer

    if size not in DEFAULT_MODEL_SIZES:
        raise ValueError(f"unknown default-model size {size!r}; known: {sorted(DEFAULT_MODEL_SIZES)}")
    base = config_for_tokenizer(tokenizer, "tiny", num_frames=num_frames).to_dict()
    text, vision = base["backbone"]["text_config"], base["backbone"]["vision_config"]
    sizes = DEFAULT_MODEL_SIZES[size]
    for key, value in sizes["text"].items():
        if key == "mrope_section":
            text["rope_parameters"]["mrope_section"] = list(value)
        elif key == "rope_theta":
            text["rope_parameters"]["rope_theta"] = float(value)
        else:
            text[key] = value
    vision.update({key: value for key, value in sizes["vision"].items()})
    vision["out_hidden_size"] = text["hidden_size"]
    if 2 * sum(text["rope_parameters"]["mrope_section"]) != text["head_dim"]:
        raise ValueError("mrope_section must sum to head_dim / 2")
    base["base_model_id"] = "robometer_ros/metaworld-default"
    return RobometerConfig.from_dict(base)


def write_default_model_init(out_dir: str | os.PathLike[str], seed: int = 0,
                             size: str = DEFAULT_MODEL_SIZE_NAME) -> None:
    """Write the randomly initialised default model + its tokenizer as a checkpoint the trainer starts from
    (``model.init_checkpoint``)."""
    import torch

    from robometer_ros.model.checkpoint import save_checkpoint
    from robometer_ros.model.robometer import RobometerModel

    tokenizer = default_model_tokenizer()
    config = default_model_config(tokenizer, size=size)
    torch.manual_seed(seed)
    model = RobometerModel(config)
    save_checkpoint(model, tokenizer, out_dir)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"wrote the untrained default model, size {size} ({parameters / 1e6:.2f} M parameters, "
          f"vocabulary {config.vocab_size}) to {out_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m robometer_ros.training.data.metaworld {generate,init-model} ...``."""
    parser = argparse.ArgumentParser(prog="python -m robometer_ros.training.data.metaworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    from robometer_ros.training.data.dataset_cli import add_output_arguments

    generate_parser = commands.add_parser("generate", help="as robometer-dataset from-metaworld")
    add_output_arguments(generate_parser)
    add_arguments(generate_parser)
    init = commands.add_parser("init-model", help="write the untrained default model + tokenizer")
    init.add_argument("out", help="checkpoint directory to write")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--size", choices=sorted(DEFAULT_MODEL_SIZES), default=DEFAULT_MODEL_SIZE_NAME,
                      help="model size (DEFAULT_MODEL_SIZES)")
    tasks = commands.add_parser("tasks", help="print the task names of a split of metaworld_tasks.yaml")
    tasks.add_argument("split", choices=("trained", "heldout"))
    args = parser.parse_args(argv)
    if args.command == "generate":
        return run(args)
    if args.command == "tasks":
        print(" ".join(CATALOG.tasks(args.split)))
        return 0
    write_default_model_init(args.out, args.seed, args.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
