"""`robometer-filter-bc`: does ranking demonstrations with the reward model give a better policy?

    robometer-filter-bc --bundle bundles/default --out runs/filter_bc

The experiment, per Meta-World task (all seeded, reproducible on one machine):

1. **Pool.** ``robometer-dataset from-metaworld``'s generator on MT1 seed ``--pool-seed`` (scenes the default
   bundle never trained on) makes ``--episodes-per-task`` scene slots (30), each with three episodes: the
   scripted **expert**; a **suboptimal-kind** episode (the expert with Gaussian action noise of sigma 0.25,
   0.5 or 1.0, or with a 15-40-step segment of random actions; each 1/4); a **failure-kind** episode (another
   task's scripted policy, the expert stalling part-way, or the expert stopped early; each 1/3). The pool
   keeps, like play data where clean demonstrations are the minority, the expert of the first 1/3 of the
   slots, the suboptimal-kind episode of the first 1/2 and every failure-kind episode (``--mix``; default
   10 expert + 15 suboptimal-kind + 30 failure-kind = 55 episodes per task). Quality labels come from the
   simulator's success signal (``metaworld.quality_label``), not from the kind. Every episode's 32 frames are
   rendered at 96 px (the costly part) and its per-control-step observations and actions kept
   (``RenderSettings.step_data``).
2. **Scores.** Every pool episode is scored through the ScoringSession exactly as the reward node scores it
   (``session.replay``: every frame offered at its simulated camera stamp, every admitted frame scored,
   ``end``), with the node's settings (config/reward_node.yaml, or ``--params``) except ``frame_rate`` 0 (all
   32 frames admitted; at 5 Hz a 1-second simulated episode would keep only 6). The **episode score** is the
   mean progress over the last ``--score-window`` (3) scoring steps: the model's view of how far the episode
   got by its end (the whole episode subsampled to the bundle's frame count), averaged over the window the
   monitor's end-of-episode verdict also uses so one noisy step does not decide a rank. Progress rather than
   success probability because it orders failures and slow successes too, not just done vs not done.
3. **Selections** of ``k`` (``--top-k``, default 10: as many as the pool has experts) episodes per task:
   ``top_k`` (highest episode score), ``random_k`` (uniform, a new draw per policy seed), ``all`` (the whole
   pool) and ``oracle_k`` (the simulator's label: successful, then suboptimal, then failure; ties by the
   earlier first success, then by pool order).
4. **Behaviour cloning.** Per task, selection and policy seed: an MLP (39-d observation -> 4-d action, two
   hidden layers of 256, ReLU; inputs standardised by the training set's mean and std) trained with MSE on
   every (observation, action) pair of the selected episodes (Adam, fixed steps, seeded batches).
5. **Evaluation** without rendering, on held-out scenes (MT1 seed ``--eval-seed`` and on, configuration i of
   50 per rollout): success = the simulator's ``info["success"]`` at any step within ``--horizon`` (500, the
   Meta-World episode length). ``--rollouts`` per policy seed, so ``rollouts x len(policy_seeds)`` per task
   and condition; the same scenes for every condition (paired).

Reported (OUT/table.md, OUT/results.json, OUT/success_rates.png): success rate per task and condition with a
95 % Wilson interval over its rollouts, the mean over tasks and the differences top_k - random_k and
top_k - all with 95 % bootstrap intervals (scenes resampled per task, the same draw for every condition),
and what each selection holds (labels, behaviours). ``--pool DIR`` keeps the rendered pool as a dataset, so a
re-run with another bundle skips the rendering.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from robometer_ros.training.data import metaworld as mw
from robometer_ros.trajectory import FAILURE, QUALITY_LABELS, SUBOPTIMAL, SUCCESSFUL, Trajectory

CONDITIONS = ("top_k", "random_k", "all", "oracle_k")
CONDITION_TITLES = {"top_k": "top-k by reward model", "random_k": "random k", "all": "all episodes",
                    "oracle_k": "oracle top-k (simulator label)"}
# Tasks the default bundle trained on (scored in domain), where BC on a few dozen expert episodes learns the
# task from the 39-d state, and where the pool's failures (stalls, other tasks' motions) hurt BC.
DEFAULT_TASKS = ("drawer-open-v3", "lever-pull-v3", "plate-slide-v3", "window-open-v3")
DEFAULT_POOL_SEED = 3  # the default bundle trained on MT1 seed 0 and was evaluated on seed 1
DEFAULT_EVAL_SEED = 100
DEFAULT_RENDER = mw.RenderSettings(frames=32, size=96, step_data=True)  # as `make default-model` renders
_LABEL_RANK = {label: rank for rank, label in enumerate(QUALITY_LABELS)}  # failure 0 < suboptimal < successful


def scoring_instruction(task: str) -> str:
    """The instruction a pool episode of ``task`` is scored against: the phrasing the bundle was trained with.

    The one place the experiment names a task in words (switch it here when the bundle expects other
    phrasings).
    """
    return mw.instruction_for(task)


# ---------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class BCConfig:
    """The behaviour-cloning policy and its training.

    Attributes:
        hidden: width of each hidden layer.
        layers: hidden layers.
        steps: gradient steps.
        batch_size: (observation, action) pairs per step.
        learning_rate: Adam step size.
        min_std: floor of the input standardisation's std (a coordinate that barely varies in the training
            set must not blow up at test time).
    """

    hidden: int = 256
    layers: int = 2
    steps: int = 2000
    batch_size: int = 256
    learning_rate: float = 1e-3
    min_std: float = 1e-2


@dataclass(frozen=True)
class ExperimentConfig:
    """One filtering experiment (see the module docstring).

    Attributes:
        tasks: Meta-World v3 tasks.
        episodes_per_task: scene slots per task generated for the pool (3 episodes each).
        mix: the fraction of the slots whose expert, suboptimal-kind and failure-kind episode (in that order)
            is in the pool: slots [0, round(fraction x episodes_per_task)) of each kind.
        top_k: episodes per selection (top_k, random_k, oracle_k).
        pool_seed: MT1 seed of the pool's scenes and root of its behaviours' randomness.
        eval_seed: first MT1 seed of the evaluation scenes (rollout i uses seed eval_seed + i // 50,
            configuration i % 50).
        rollouts: evaluation rollouts per task, condition and policy seed.
        policy_seeds: BC seeds (initialisation, batches, the random_k draw).
        horizon: control steps per evaluation rollout at most.
        score_window: last scoring steps whose mean progress is an episode's score (0: all steps).
        render: how the pool is run and rendered (step_data is forced on).
        bc: the policy and its training.
        workers: processes for generating the pool and for training + evaluating policies.
    """

    tasks: tuple[str, ...] = DEFAULT_TASKS
    episodes_per_task: int = 30
    mix: tuple[float, float, float] = (1 / 3, 1 / 2, 1.0)
    top_k: int = 10
    pool_seed: int = DEFAULT_POOL_SEED
    eval_seed: int = DEFAULT_EVAL_SEED
    rollouts: int = 50
    policy_seeds: tuple[int, ...] = (0, 1, 2)
    horizon: int = mw.MAX_PATH_LENGTH
    score_window: int = 3
    render: mw.RenderSettings = DEFAULT_RENDER
    bc: BCConfig = field(default_factory=BCConfig)
    workers: int = 2

    def __post_init__(self) -> None:
        """Check the fields; ValueError naming the first wrong one."""
        if not self.tasks:
            raise ValueError("no tasks given")
        for task in self.tasks:
            mw.instruction_for(task)
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks repeat: {list(self.tasks)}")
        if not 1 <= self.episodes_per_task <= mw.CONFIGS_PER_BENCHMARK:
            raise ValueError(f"episodes_per_task must be in [1, {mw.CONFIGS_PER_BENCHMARK}], "
                             f"got {self.episodes_per_task}")
        if len(self.mix) != len(mw.KINDS) or not all(0.0 <= f <= 1.0 for f in self.mix) or not any(self.mix):
            raise ValueError(f"mix must be {len(mw.KINDS)} fractions in [0, 1] ({', '.join(mw.KINDS)}), not all 0, "
                             f"got {list(self.mix)}")
        if not 1 <= self.top_k <= self.pool_size:
            raise ValueError(f"top_k must be in [1, {self.pool_size}] (the pool per task), got {self.top_k}")
        for name in ("rollouts", "horizon", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.score_window < 0:
            raise ValueError(f"score_window must be >= 0 (0 = every step), got {self.score_window}")
        if self.horizon > mw.MAX_PATH_LENGTH:
            raise ValueError(f"horizon must be <= {mw.MAX_PATH_LENGTH} (Meta-World truncates there)")
        if not self.policy_seeds or len(set(self.policy_seeds)) != len(self.policy_seeds):
            raise ValueError(f"policy_seeds must be distinct and not empty, got {list(self.policy_seeds)}")
        if self.eval_seed == self.pool_seed:
            raise ValueError("eval_seed must differ from pool_seed: the policies are evaluated on held-out scenes")

    @property
    def k(self) -> int:
        """Episodes per selection."""
        return self.top_k

    def slots_kept(self, kind: str) -> int:
        """How many slots (the first ones) contribute their ``kind`` episode to the pool."""
        return round(self.mix[mw.KINDS.index(kind)] * self.episodes_per_task)

    @property
    def pool_size(self) -> int:
        """Episodes per task in the pool."""
        return sum(self.slots_kept(kind) for kind in mw.KINDS)

    def in_pool(self, metadata: dict[str, Any]) -> bool:
        """Whether a generated episode (its metadata) is in the pool."""
        return int(metadata["slot"]) < self.slots_kept(str(metadata["kind"]))


# ---------------------------------------------------------------------------------------------- the pool
@dataclass
class PoolEpisode:
    """One pool episode: how it was made, its simulator label, its state-action data and the model's scores.

    Attributes:
        task, episode_id, kind, behaviour: from the generator.
        quality_label: the simulator's label (successful / suboptimal / failure).
        first_success_step: first control step with ``info["success"]``, or None.
        observations: float32 [S + 1, 39]; actions: float32 [S, 4].
        score: the reward model's episode score (mean progress over the last steps).
        final_progress, final_success_probability: the last scoring step's values.
        verdict: the session's end-of-episode verdict ("succeeded", "failed:STALLED", ...).
    """

    task: str
    episode_id: str
    kind: str
    behaviour: str
    quality_label: str
    first_success_step: int | None
    observations: np.ndarray
    actions: np.ndarray
    score: float = math.nan
    final_progress: float = math.nan
    final_success_probability: float = math.nan
    verdict: str = ""

    @property
    def steps(self) -> int:
        """Control steps (state-action pairs)."""
        return len(self.actions)


def pool_trajectories(config: ExperimentConfig, pool_dir: str | Path | None = None,
                      progress_bar: bool = True) -> Iterator[Trajectory]:
    """Every generated trajectory of the pool's slots (``config.in_pool`` says which are in the pool):
    generated (and written to ``pool_dir`` as a dataset when given), or read from ``pool_dir`` when it already
    holds these slots."""
    settings = replace(config.render, step_data=True)
    if pool_dir is not None and (Path(pool_dir) / "dataset.json").is_file():
        yield from _read_pool(config, Path(pool_dir))
        return
    stream = mw.generate(config.tasks, config.episodes_per_task, config.pool_seed, settings,
                         workers=config.workers, progress_bar=progress_bar)
    if pool_dir is None:
        yield from stream
        return
    from robometer_ros.training.data.store import DatasetWriter

    with DatasetWriter(pool_dir, frame_codec="png") as writer:
        for trajectory in stream:
            writer.add(trajectory)
            yield trajectory


def _read_pool(config: ExperimentConfig, directory: Path) -> Iterator[Trajectory]:
    from robometer_ros.training.data.store import Dataset

    dataset = Dataset(directory)
    wanted = {(task, slot) for task in config.tasks for slot in range(config.episodes_per_task)}
    positions, found = [], set()
    settings = config.render
    for position, meta in enumerate(dataset.metas):
        key = (meta.metadata.get("task"), meta.metadata.get("slot"))
        if key in wanted and meta.metadata.get("seed") == config.pool_seed:
            if not meta.step_data:
                raise ValueError(f"{directory}: episode {meta.episode_id!r} has no observations/actions "
                                 "(write the pool with --observations-actions, or delete it to regenerate)")
            rendered = (meta.n_frames, tuple(meta.frame_shape[:2]), meta.metadata.get("camera"))
            if rendered != (settings.frames, (settings.size, settings.size), settings.camera):
                raise ValueError(f"{directory}: episode {meta.episode_id!r} was rendered as (frames, size, camera) "
                                 f"{rendered}, not {(settings.frames, (settings.size,) * 2, settings.camera)}")
            positions.append(position)
            found.add(key)
    if found != wanted:
        missing = sorted(wanted - found)
        raise ValueError(f"{directory} does not hold this pool (MT1 seed {config.pool_seed}): missing "
                         f"{len(missing)} (task, slot) pairs, e.g. {missing[:3]}; use another --pool directory")
    for position in positions:
        yield dataset.trajectory(position)


def episode_score(step_progress: np.ndarray, window: int) -> float:
    """Mean progress of the last ``window`` valid scoring steps (0: of all of them, the area under the
    episode's progress curve, which also prefers faster successes); model errors are skipped; -inf when no
    step is valid, so such an episode ranks last."""
    valid = np.asarray(step_progress, dtype=np.float64)
    valid = valid[np.isfinite(valid)]
    if not len(valid):
        return -math.inf
    return float(valid[-window:].mean() if window else valid.mean())


def score_pool(engine: Any, trajectories: Iterable[Trajectory], session_config: Any, window: int,
               progress_bar: bool = True, keep: Any = lambda metadata: True) -> list[PoolEpisode]:
    """Score every trajectory for which ``keep(metadata)`` holds through one ScoringSession (``session.replay``,
    as the node scores) against ``scoring_instruction(task)``, keeping its state-action data and dropping its
    frames."""
    from robometer_ros.session import ScoringSession, replay

    session = ScoringSession(engine, session_config)
    iterator: Iterable[Trajectory] = trajectories
    if progress_bar:
        from tqdm import tqdm

        iterator = tqdm(trajectories, desc="score", unit="episode")
    episodes = []
    for trajectory in iterator:
        meta = trajectory.metadata
        if not keep(meta):
            continue
        task = str(meta["task"])
        stamps_ns = np.round(np.asarray(trajectory.frame_stamps, dtype=np.float64) * 1e9).astype(np.int64)
        result = replay(session, scoring_instruction(task), stamps_ns, trajectory.frames)
        scores = result.step_scores()
        episodes.append(PoolEpisode(
            task=task, episode_id=trajectory.episode_id, kind=str(meta["kind"]), behaviour=str(meta["behaviour"]),
            quality_label=trajectory.quality_label, first_success_step=meta.get("first_success_step"),
            observations=np.asarray(trajectory.step_data["observations"], dtype=np.float32),
            actions=np.asarray(trajectory.step_data["actions"], dtype=np.float32),
            score=episode_score(scores[:, 1], window),
            final_progress=float(scores[-1, 1]) if len(scores) else math.nan,
            final_success_probability=float(scores[-1, 2]) if len(scores) else math.nan,
            verdict=result.verdict,
        ))
    return episodes


# ---------------------------------------------------------------------------------------------- selections
def oracle_key(episode: PoolEpisode) -> tuple[int, int]:
    """Best first: the simulator's label, then the earlier first success."""
    first = episode.first_success_step if episode.first_success_step is not None else mw.MAX_PATH_LENGTH + 1
    return (-_LABEL_RANK[episode.quality_label], first)


def select(episodes: Sequence[PoolEpisode], condition: str, k: int, rng: np.random.Generator) -> list[int]:
    """Positions in ``episodes`` (one task's pool) of the ``condition``'s selection, best first where ranked.

    Ties keep pool order (Python's sort is stable), so every selection is a function of the pool and ``rng``.
    """
    order = list(range(len(episodes)))
    if condition == "all":
        return order
    k = min(k, len(episodes))
    if condition == "top_k":
        return sorted(order, key=lambda i: -episodes[i].score)[:k]
    if condition == "oracle_k":
        return sorted(order, key=lambda i: oracle_key(episodes[i]))[:k]
    if condition == "random_k":
        return sorted(int(i) for i in rng.choice(len(episodes), size=k, replace=False))
    raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")


def selection_rng(task: str, policy_seed: int) -> np.random.Generator:
    """The random_k draw of one task and policy seed (independent of process and order)."""
    import zlib

    return np.random.default_rng([policy_seed, zlib.crc32(task.encode()), 7])


# ---------------------------------------------------------------------------------------------- the policy
@dataclass
class BCPolicy:
    """A trained MLP policy run with numpy (observation -> action in [-1, 1]).

    Attributes:
        mean, std: the input standardisation.
        weights, biases: per layer, ``x @ W + b`` with ReLU between layers.
        train_loss: the last 100 steps' mean MSE.
    """

    mean: np.ndarray
    std: np.ndarray
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    train_loss: float = math.nan

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        x = (np.asarray(observation, dtype=np.float32) - self.mean) / self.std
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = x @ w + b
            if i < last:
                x = np.maximum(x, 0.0)
        return np.clip(x, -1.0, 1.0)


def train_bc(observations: np.ndarray, actions: np.ndarray, config: BCConfig, seed: int) -> BCPolicy:
    """Behaviour cloning: an MLP regressing ``actions`` [N, A] on ``observations`` [N, D] with MSE."""
    import torch

    if len(observations) != len(actions) or len(actions) == 0:
        raise ValueError(f"need matching, non-empty observations and actions, got {len(observations)} and "
                         f"{len(actions)}")
    obs = np.asarray(observations, dtype=np.float32)
    act = np.asarray(actions, dtype=np.float32)
    mean = obs.mean(0)
    std = np.maximum(obs.std(0), config.min_std).astype(np.float32)
    torch.manual_seed(seed)
    sizes = [obs.shape[1]] + [config.hidden] * config.layers + [act.shape[1]]
    layers: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    x = torch.from_numpy((obs - mean) / std)
    y = torch.from_numpy(act)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(config.steps):
        batch = torch.randint(0, len(x), (config.batch_size,), generator=generator)
        loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    return BCPolicy(
        mean=mean.astype(np.float32), std=std,
        weights=[m.weight.detach().numpy().T.copy() for m in linears],
        biases=[m.bias.detach().numpy().copy() for m in linears],
        train_loss=float(np.mean(losses[-100:])),
    )


# ---------------------------------------------------------------------------------------------- evaluation
class EvalScenes:
    """Held-out Meta-World scenes of one task, without rendering: rollout i is configuration i % 50 of MT1
    seed ``first_seed + i // 50``."""

    def __init__(self, task: str, first_seed: int) -> None:
        warnings.filterwarnings("ignore", module="metaworld")
        self.task = task
        self.first_seed = first_seed
        self._benchmarks: dict[int, Any] = {}
        self.env: Any = None

    def reset(self, rollout: int) -> np.ndarray:
        """Put the env in the scene of ``rollout`` and return the first observation."""
        import metaworld

        seed = self.first_seed + rollout // mw.CONFIGS_PER_BENCHMARK
        if seed not in self._benchmarks:
            self._benchmarks[seed] = metaworld.MT1(self.task, seed=seed)
        benchmark = self._benchmarks[seed]
        if self.env is None:
            self.env = benchmark.train_classes[self.task]()
        self.env.set_task(benchmark.train_tasks[rollout % mw.CONFIGS_PER_BENCHMARK])
        return self.env.reset()[0]

    def close(self) -> None:
        """Close the env."""
        if self.env is not None:
            self.env.close()
            self.env = None


def rollout_success(scenes: EvalScenes, policy: Any, rollout: int, horizon: int) -> tuple[bool, int]:
    """Run ``policy`` in the scene of ``rollout``; (succeeded at any step, steps run)."""
    obs = scenes.reset(rollout)
    for step in range(horizon):
        obs, _, _, truncated, info = scenes.env.step(policy(obs))
        if info["success"]:
            return True, step + 1
        if truncated:
            break
    return False, step + 1


@dataclass(frozen=True)
class PolicyUnit:
    """One policy to train and evaluate: a task, a condition, a seed and its training data."""

    task: str
    condition: str
    policy_seed: int
    observations: np.ndarray
    actions: np.ndarray
    bc: BCConfig
    eval_seed: int
    rollouts: int
    horizon: int


@dataclass(frozen=True)
class PolicyResult:
    """What one PolicyUnit gave: per-rollout success (rollout order) and training facts."""

    task: str
    condition: str
    policy_seed: int
    successes: tuple[bool, ...]
    pairs: int
    train_loss: float
    seconds: float


_worker_scenes: dict[str, EvalScenes] = {}


def run_unit(unit: PolicyUnit) -> PolicyResult:
    """Train the unit's policy and evaluate it (in a worker process or in this one)."""
    import torch

    torch.set_num_threads(1)  # one core per worker; also makes training bitwise repeatable
    started = time.perf_counter()
    policy = train_bc(unit.observations, unit.actions, unit.bc, unit.policy_seed)
    scenes = _worker_scenes.get(unit.task)
    if scenes is None:
        scenes = _worker_scenes[unit.task] = EvalScenes(unit.task, unit.eval_seed)
    if scenes.first_seed != unit.eval_seed:
        scenes.close()
        scenes = _worker_scenes[unit.task] = EvalScenes(unit.task, unit.eval_seed)
    successes = tuple(rollout_success(scenes, policy, i, unit.horizon)[0] for i in range(unit.rollouts))
    return PolicyResult(unit.task, unit.condition, unit.policy_seed, successes, len(unit.actions),
                        policy.train_loss, time.perf_counter() - started)


def _stack(episodes: Sequence[PoolEpisode]) -> tuple[np.ndarray, np.ndarray]:
    """The (observation, action) pairs of some episodes: the observation before each action."""
    obs = np.concatenate([e.observations[: e.steps] for e in episodes])
    act = np.concatenate([e.actions for e in episodes])
    return obs, act


def policy_units(pool: Sequence[PoolEpisode], config: ExperimentConfig) -> tuple[list[PolicyUnit], dict]:
    """Every (task, condition, seed) unit, and the episode ids each selection took."""
    units, selections = [], {}
    for task in config.tasks:
        episodes = [e for e in pool if e.task == task]
        if not episodes:
            raise ValueError(f"the pool has no episode of {task}")
        for condition in CONDITIONS:
            for seed in config.policy_seeds:
                chosen = [episodes[i] for i in select(episodes, condition, config.k, selection_rng(task, seed))]
                selections[(task, condition, seed)] = [e.episode_id for e in chosen]
                obs, act = _stack(chosen)
                units.append(PolicyUnit(task, condition, seed, obs, act, config.bc, config.eval_seed,
                                        config.rollouts, config.horizon))
    return units, selections


def run_units(units: Sequence[PolicyUnit], workers: int, progress_bar: bool = True) -> list[PolicyResult]:
    """Train and evaluate every unit (``workers`` processes; results in unit order)."""
    from tqdm import tqdm

    bar = tqdm(total=len(units), desc="bc", unit="policy", disable=not progress_bar)
    try:
        if workers == 1:
            results = []
            for unit in units:
                results.append(run_unit(unit))
                bar.update(1)
            return results
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            results = []
            for result in pool.imap(run_unit, units):
                results.append(result)
                bar.update(1)
            return results
    finally:
        bar.close()
        for scenes in _worker_scenes.values():
            scenes.close()
        _worker_scenes.clear()


# ---------------------------------------------------------------------------------------------- statistics
def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def success_matrix(results: Sequence[PolicyResult], tasks: Sequence[str],
                   seeds: Sequence[int]) -> dict[tuple[str, str], np.ndarray]:
    """(task, condition) -> bool [seeds, rollouts]."""
    by_key = {(r.task, r.condition, r.policy_seed): r.successes for r in results}
    return {(task, condition): np.asarray([by_key[(task, condition, s)] for s in seeds], dtype=bool)
            for task in tasks for condition in CONDITIONS}


def bootstrap_means(matrix: dict[tuple[str, str], np.ndarray], tasks: Sequence[str], samples: int = 2000,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Bootstrap replicates of each condition's mean success over tasks: per task the evaluation scenes are
    resampled with replacement (all seeds of a scene together), the same draw for every condition, so
    differences between conditions are paired."""
    rng = np.random.default_rng(seed)
    out = {condition: np.zeros(samples) for condition in CONDITIONS}
    for task in tasks:
        rollouts = matrix[(task, CONDITIONS[0])].shape[1]
        draw = rng.integers(0, rollouts, size=(samples, rollouts))
        for condition in CONDITIONS:
            per_scene = matrix[(task, condition)].mean(0)  # [rollouts]: mean over seeds
            out[condition] += per_scene[draw].mean(1) / len(tasks)
    return out


def summarize(results: Sequence[PolicyResult], config: ExperimentConfig) -> dict[str, Any]:
    """Per-task and mean success rates with intervals, and the paired differences."""
    matrix = success_matrix(results, config.tasks, config.policy_seeds)
    per_task: dict[str, dict[str, Any]] = {}
    for task in config.tasks:
        per_task[task] = {}
        for condition in CONDITIONS:
            values = matrix[(task, condition)]
            wins, n = int(values.sum()), int(values.size)
            low, high = wilson_interval(wins, n)
            per_task[task][condition] = {"rate": wins / n, "successes": wins, "rollouts": n,
                                         "ci95": [low, high],
                                         "per_seed": [float(v) for v in values.mean(1)]}
    replicates = bootstrap_means(matrix, config.tasks)
    mean = {}
    for condition in CONDITIONS:
        rate = float(np.mean([per_task[t][condition]["rate"] for t in config.tasks]))
        mean[condition] = {"rate": rate, "ci95": [float(v) for v in np.percentile(replicates[condition], [2.5, 97.5])]}
    differences = {}
    for other in ("random_k", "all", "oracle_k"):
        diff = replicates["top_k"] - replicates[other]
        differences[f"top_k - {other}"] = {
            "difference": mean["top_k"]["rate"] - mean[other]["rate"],
            "ci95": [float(v) for v in np.percentile(diff, [2.5, 97.5])],
            "bootstrap_p_not_positive": float(np.mean(diff <= 0)),
        }
    return {"per_task": per_task, "mean": mean, "differences": differences}


def selection_composition(pool: Sequence[PoolEpisode], selections: dict, config: ExperimentConfig) -> dict:
    """What each selection holds: label counts (summed over seeds for random_k, one seed otherwise)."""
    by_id = {e.episode_id: e for e in pool}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task in config.tasks:
        out[task] = {}
        for condition in CONDITIONS:
            labels: Counter = Counter()
            behaviours: Counter = Counter()
            for seed in config.policy_seeds:
                for episode_id in selections[(task, condition, seed)]:
                    labels[by_id[episode_id].quality_label] += 1
                    behaviours[by_id[episode_id].behaviour] += 1
            total = sum(labels.values())
            out[task][condition] = {
                "episodes": total / len(config.policy_seeds),
                "labels": {label: labels[label] / total for label in (SUCCESSFUL, SUBOPTIMAL, FAILURE)},
                "behaviours": {b: n / total for b, n in sorted(behaviours.items())},
            }
    return out


def ranking_quality(pool: Sequence[PoolEpisode], config: ExperimentConfig) -> dict[str, dict[str, float]]:
    """Per task: how well the model's episode score orders the pool against the simulator (Kendall tau-a of
    score vs label rank, as robometer-eval's trajectory ranking) and the share of the top-k that is labelled
    successful (precision@k)."""
    from robometer_ros.training.recipe.metrics import kendall_tau_a

    out = {}
    for task in config.tasks:
        episodes = [e for e in pool if e.task == task]
        scores = np.array([e.score for e in episodes])
        labels = np.array([_LABEL_RANK[e.quality_label] for e in episodes])
        top = select(episodes, "top_k", config.k, np.random.default_rng(0))
        out[task] = {
            "kendall_tau_a": float(kendall_tau_a(scores, labels)),
            "precision_at_k": float(np.mean([episodes[i].quality_label == SUCCESSFUL for i in top])),
            "successful_in_pool": int(np.sum(labels == _LABEL_RANK[SUCCESSFUL])),
            "pool": len(episodes),
        }
    return out


# ---------------------------------------------------------------------------------------------- report
def _cell(entry: dict[str, Any]) -> str:
    low, high = entry["ci95"]
    return f"{100 * entry['rate']:.0f} % [{100 * low:.0f}, {100 * high:.0f}]"


def format_table(summary: dict[str, Any], ranking: dict[str, dict[str, float]], composition: dict[str, Any],
                 config: ExperimentConfig) -> str:
    """The markdown tables: success rate per task and condition (95 % interval), the mean and the differences;
    then what each selection holds."""
    n = config.rollouts * len(config.policy_seeds)
    header = "| task | " + " | ".join(CONDITION_TITLES[c] for c in CONDITIONS) + " | ranking τ_a / precision@k |"
    lines = [header, "|" + "---|" * (len(CONDITIONS) + 2)]
    for task in config.tasks:
        row = summary["per_task"][task]
        rank = ranking[task]
        lines.append(f"| {task} | " + " | ".join(_cell(row[c]) for c in CONDITIONS)
                     + f" | {rank['kendall_tau_a']:.2f} / {rank['precision_at_k']:.2f} |")
    mean = summary["mean"]
    lines.append("| **mean** | " + " | ".join(f"**{_cell(mean[c])}**" for c in CONDITIONS) + " | |")
    lines.append("")
    lines.append(f"Success rate over {n} rollouts per cell ({config.rollouts} held-out scenes x "
                 f"{len(config.policy_seeds)} policy seeds), 95 % Wilson interval; mean over tasks with a 95 % "
                 f"bootstrap interval (scenes resampled). k = {config.k} of {config.pool_size} pool "
                 "episodes per task.")
    lines.append("")
    for name, entry in summary["differences"].items():
        low, high = entry["ci95"]
        lines.append(f"- {name}: {100 * entry['difference']:+.1f} points (95 % bootstrap interval "
                     f"[{100 * low:+.1f}, {100 * high:+.1f}])")
    lines += ["", "What each selection holds (share labelled successful / suboptimal / failure by the simulator; "
                  "random k over its seeds' draws):", "",
              "| task | " + " | ".join(CONDITION_TITLES[c] for c in CONDITIONS) + " |",
              "|" + "---|" * (len(CONDITIONS) + 1)]
    for task in config.tasks:
        cells = []
        for condition in CONDITIONS:
            labels = composition[task][condition]["labels"]
            cells.append(" / ".join(f"{labels[label]:.2f}" for label in (SUCCESSFUL, SUBOPTIMAL, FAILURE)))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], config: ExperimentConfig, path: Path) -> None:
    """A grouped bar chart of success rates (per task and the mean) with the 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*config.tasks, "mean"]
    rows = [summary["per_task"][t] for t in config.tasks] + [summary["mean"]]
    width = 0.8 / len(CONDITIONS)
    figure, axes = plt.subplots(figsize=(2.2 * len(groups) + 2, 4.2))
    for j, condition in enumerate(CONDITIONS):
        rates = np.array([r[condition]["rate"] for r in rows])
        lows = rates - np.array([r[condition]["ci95"][0] for r in rows])
        highs = np.array([r[condition]["ci95"][1] for r in rows]) - rates
        x = np.arange(len(groups)) + (j - (len(CONDITIONS) - 1) / 2) * width
        axes.bar(x, rates, width, yerr=[lows, highs], capsize=3, label=CONDITION_TITLES[condition])
    axes.set_xticks(np.arange(len(groups)), [g.removesuffix("-v3") for g in groups])
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("success rate (held-out scenes)")
    axes.set_title(f"BC on filtered Meta-World demonstrations (k = {config.k} of {config.pool_size})")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------- running it
def run_experiment(config: ExperimentConfig, engine: Any, session_config: Any, out_dir: str | Path,
                   pool_dir: str | Path | None = None, progress_bar: bool = True,
                   about_model: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build and score the pool, train and evaluate every policy, write OUT/{table.md, results.json,
    success_rates.png, pool_scores.csv}; returns what results.json holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    pool = score_pool(engine, pool_trajectories(config, pool_dir, progress_bar), session_config,
                      config.score_window, progress_bar, config.in_pool)
    timings["pool_and_scoring_s"] = time.perf_counter() - started
    _write_pool_scores(pool, out / "pool_scores.csv")
    units, selections = policy_units(pool, config)
    mark = time.perf_counter()
    results = run_units(units, config.workers, progress_bar)
    timings["bc_train_and_eval_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started
    summary = summarize(results, config)
    ranking = ranking_quality(pool, config)
    composition = selection_composition(pool, selections, config)
    report = {
        "config": _config_json(config),
        "model": about_model or {},
        "session_config": session_config.parameters() if hasattr(session_config, "parameters") else {},
        "episode_score": (f"mean progress over the last {config.score_window} scoring steps" if config.score_window
                          else "mean progress over every scoring step") + " (session.replay)",
        "pool": {task: dict(Counter(e.quality_label for e in pool if e.task == task)) for task in config.tasks},
        "ranking": ranking,
        "summary": summary,
        "selections": composition,
        "policies": [{"task": r.task, "condition": r.condition, "policy_seed": r.policy_seed,
                      "success_rate": float(np.mean(r.successes)), "pairs": r.pairs,
                      "train_loss": r.train_loss, "seconds": r.seconds} for r in results],
        "timings": timings,
    }
    table = format_table(summary, ranking, composition, config)
    (out / "table.md").write_text(table, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(summary, config, out / "success_rates.png")
    return report


def _write_pool_scores(pool: Sequence[PoolEpisode], path: Path) -> None:
    columns = ("episode_id", "task", "kind", "behaviour", "quality_label", "first_success_step", "steps", "score",
               "final_progress", "final_success_probability", "verdict")
    lines = [",".join(columns)]
    for e in pool:
        values = [e.episode_id, e.task, e.kind, e.behaviour, e.quality_label,
                  "" if e.first_success_step is None else str(e.first_success_step), str(e.steps),
                  f"{e.score:.4f}", f"{e.final_progress:.4f}", f"{e.final_success_probability:.4f}", e.verdict]
        lines.append(",".join(values))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _config_json(config: ExperimentConfig) -> dict[str, Any]:
    record = asdict(config)
    record["k"] = config.k
    return record


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of robometer-filter-bc."""
    defaults = ExperimentConfig()
    parser = argparse.ArgumentParser(prog="robometer-filter-bc", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--bundle", default="bundles/default",
                        help="the reward model: a bundle directory (RewardEngine) or a checkpoint directory (torch)")
    parser.add_argument("--backend", default="onnxruntime", help="bundle backend (auto, onnxruntime, tensorrt, torch)")
    parser.add_argument("--out", required=True, help="output directory (table.md, results.json, success_rates.png)")
    parser.add_argument("--pool", help="dataset directory of the rendered pool: written on the first run, read on "
                                       "later runs (another bundle then skips the rendering)")
    parser.add_argument("--params", nargs="*", default=[],
                        help="reward node parameter files for the session (default: config/reward_node.yaml); "
                             "frame_rate is set to 0 (every stored frame scored)")
    parser.add_argument("--tasks", nargs="+", default=list(defaults.tasks), help="Meta-World v3 tasks")
    parser.add_argument("--episodes-per-task", type=int, default=defaults.episodes_per_task,
                        help="pool scene slots per task (3 episodes each: expert, suboptimal-, failure-kind)")
    parser.add_argument("--mix", type=float, nargs=3, default=list(defaults.mix),
                        metavar=("EXPERT", "SUBOPTIMAL", "FAILURE"),
                        help="fraction of the slots whose expert / suboptimal-kind / failure-kind episode is in the "
                             "pool (default 1/3 1/2 1)")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="episodes per selection")
    parser.add_argument("--pool-seed", type=int, default=defaults.pool_seed, help="MT1 seed of the pool")
    parser.add_argument("--eval-seed", type=int, default=defaults.eval_seed, help="first MT1 seed of the evaluation")
    parser.add_argument("--rollouts", type=int, default=defaults.rollouts,
                        help="evaluation rollouts per task, condition and policy seed")
    parser.add_argument("--policy-seeds", type=int, nargs="+", default=list(defaults.policy_seeds))
    parser.add_argument("--horizon", type=int, default=defaults.horizon, help="steps per evaluation rollout")
    parser.add_argument("--score-window", type=int, default=defaults.score_window,
                        help="last scoring steps whose mean progress is the episode score (0: every step, "
                             "the area under the progress curve)")
    parser.add_argument("--bc-steps", type=int, default=defaults.bc.steps, help="BC gradient steps per policy")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def open_engine(path: str | Path, backend: str = "onnxruntime") -> Any:
    """The scoring engine of a model directory: a bundle through RewardEngine, or a checkpoint through a torch
    CheckpointEngine (same engine interface, frames encoded at each score)."""
    from robometer_ros.training.evaluation.evaluate import is_bundle

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a directory (expected a bundle or a checkpoint)")
    if is_bundle(p):
        from robometer_ros.engine.reward_engine import RewardEngine

        return RewardEngine(p, backend=backend, verify_checksums=False, intra_op_threads=1)
    from robometer_ros.training.recipe.validation import TorchPredictor

    return TorchPredictor.from_checkpoint(p, device="cpu").engine  # validation.CheckpointEngine


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of robometer-filter-bc."""
    args = build_parser().parse_args(argv)
    from robometer_ros.engine.bundle import BundleError
    from robometer_ros.node_parameters import session_config_from_files

    try:
        config = ExperimentConfig(
            tasks=tuple(args.tasks), episodes_per_task=args.episodes_per_task, mix=tuple(args.mix), top_k=args.top_k,
            pool_seed=args.pool_seed, eval_seed=args.eval_seed, rollouts=args.rollouts,
            policy_seeds=tuple(args.policy_seeds), horizon=args.horizon, score_window=args.score_window,
            bc=replace(BCConfig(), steps=args.bc_steps), workers=args.workers,
        )
        engine = open_engine(args.bundle, args.backend)
        session_config = replace(session_config_from_files(args.params, num_frames=int(engine.num_frames)),
                                 frame_rate=0.0)
    except (BundleError, FileNotFoundError, ValueError) as error:
        print(f"robometer-filter-bc: {error}", file=sys.stderr)
        return 2
    about = {"path": str(args.bundle), "id": getattr(engine, "model_id", "checkpoint"),
             "backend": getattr(engine, "backend_name", "torch")}
    from robometer_ros.training.data.store import DatasetError

    try:
        report = run_experiment(config, engine, session_config, args.out, args.pool, not args.no_progress, about)
    except (DatasetError, ValueError) as error:
        print(f"robometer-filter-bc: {error}", file=sys.stderr)
        return 2
    print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
    print(f"wall time {report['timings']['total_s']:.0f} s (pool + scoring "
          f"{report['timings']['pool_and_scoring_s']:.0f} s, BC {report['timings']['bc_train_and_eval_s']:.0f} s); "
          f"wrote {args.out}/table.md, results.json, success_rates.png, pool_scores.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
