"""The BC filtering experiment: selections, episode scores, statistics, BC training, and one tiny end-to-end
run through the default bundle (pool cached and re-read, results reproducible)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from robometer_ros.node_parameters import session_config_from_files
from robometer_ros.training.data import metaworld as mw
from robometer_ros.training.evaluation import filtering as fb

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "default"


def _episode(i: int, label: str, score: float, first_success: int | None = None) -> fb.PoolEpisode:
    return fb.PoolEpisode(task="t", episode_id=f"e{i}", kind="expert", behaviour="expert", quality_label=label,
                          first_success_step=first_success, observations=np.zeros((3, 2), np.float32),
                          actions=np.zeros((2, 1), np.float32), score=score)


def test_selections() -> None:
    pool = [_episode(0, "failure", 0.9), _episode(1, "successful", 0.5, 80), _episode(2, "suboptimal", 0.7, 150),
            _episode(3, "successful", 0.2, 60), _episode(4, "failure", -math.inf)]
    rng = np.random.default_rng(0)
    assert fb.select(pool, "top_k", 2, rng) == [0, 2]  # the model's view, right or wrong
    assert fb.select(pool, "oracle_k", 3, rng) == [3, 1, 2]  # label first, then the earlier success
    assert fb.select(pool, "all", 2, rng) == [0, 1, 2, 3, 4]
    assert fb.select(pool, "top_k", 10, rng) == [0, 2, 1, 3, 4]
    draws = {tuple(fb.select(pool, "random_k", 2, fb.selection_rng("t", seed))) for seed in range(8)}
    assert len(draws) > 1  # a new draw per policy seed ...
    assert fb.select(pool, "random_k", 2, fb.selection_rng("t", 3)) == fb.select(pool, "random_k", 2,
                                                                                  fb.selection_rng("t", 3))
    with pytest.raises(ValueError, match="condition"):
        fb.select(pool, "best", 2, rng)


def test_episode_score_is_the_mean_of_the_last_valid_steps() -> None:
    assert fb.episode_score(np.array([0.1, 0.2, 0.6, 0.9, 0.6]), 3) == pytest.approx(0.7)
    assert fb.episode_score(np.array([0.1, 0.5, np.nan]), 2) == pytest.approx(0.3)
    assert fb.episode_score(np.array([np.nan]), 3) == -math.inf
    assert fb.episode_score(np.array([0.4]), 3) == pytest.approx(0.4)
    assert fb.episode_score(np.array([0.1, 0.2, np.nan, 0.9]), 0) == pytest.approx(0.4)


def test_wilson_interval() -> None:
    low, high = fb.wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = fb.wilson_interval(0, 50)
    assert low == 0.0 and high == pytest.approx(0.0713, abs=1e-4)
    assert fb.wilson_interval(50, 50)[1] == pytest.approx(1.0)


def test_bootstrap_pairs_conditions_on_the_same_scenes() -> None:
    """Two conditions that differ on exactly one scene: the paired difference's interval stays tight."""
    rng = np.random.default_rng(1)
    base = rng.random((2, 40)) < 0.5
    better = base.copy()
    better[:, 0] = True
    base[:, 0] = False
    matrix = {("t", c): base for c in fb.CONDITIONS}
    matrix[("t", "top_k")] = better
    replicates = fb.bootstrap_means(matrix, ["t"], samples=500)
    diff = replicates["top_k"] - replicates["random_k"]
    assert np.all(diff >= 0) and diff.max() <= 5 / 40


def test_bc_fits_a_linear_policy_and_is_seeded() -> None:
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(512, 6)).astype(np.float32) * [1, 2, 3, 0.001, 1, 1]
    act = np.tanh(obs @ rng.normal(size=(6, 2)) * 0.5).astype(np.float32)
    config = fb.BCConfig(hidden=32, steps=400, batch_size=64)
    policy = fb.train_bc(obs, act, config, seed=0)
    assert np.mean((policy(obs) - act) ** 2) < 0.05 * np.mean(act ** 2)  # an untrained net is at ~1.0 x
    assert policy.std[3] == config.min_std  # a barely varying input is not blown up
    again = fb.train_bc(obs, act, config, seed=0)
    other = fb.train_bc(obs, act, config, seed=1)
    np.testing.assert_array_equal(again.weights[0], policy.weights[0])
    assert not np.array_equal(other.weights[0], policy.weights[0])
    assert np.all(np.abs(policy(obs * 100)) <= 1.0)  # actions stay in the action space


def test_config_pool_mix_and_checks() -> None:
    config = fb.ExperimentConfig()
    assert (config.slots_kept("expert"), config.slots_kept("suboptimal"), config.slots_kept("failure")) == (10, 15, 30)
    assert config.pool_size == 55 and config.k == 10
    assert config.in_pool({"slot": 9, "kind": "expert"}) and not config.in_pool({"slot": 10, "kind": "expert"})
    assert config.in_pool({"slot": 29, "kind": "failure"})
    for bad, match in (({"tasks": ("open-v3",)}, "unknown Meta-World task"), ({"top_k": 56}, "top_k"),
                       ({"eval_seed": fb.DEFAULT_POOL_SEED}, "eval_seed"), ({"mix": (0.5, 2.0, 1.0)}, "mix"),
                       ({"policy_seeds": (1, 1)}, "policy_seeds"), ({"horizon": 501}, "horizon")):
        with pytest.raises(ValueError, match=match):
            fb.ExperimentConfig(**bad)


@pytest.mark.slow
def test_tiny_experiment_end_to_end_is_reproducible_from_the_cached_pool(tmp_path: Path) -> None:
    """reach-v3 (BC learns it from a handful of experts), 3 slots, 4-frame 32 px episodes, the default bundle:
    every output is written, the pool is cached as a dataset with observations and actions, and a second run
    that reads it back gives the same scores and the same success rates."""
    pytest.importorskip("metaworld")
    import torch

    torch.set_num_threads(1)
    config = fb.ExperimentConfig(
        tasks=("reach-v3",), episodes_per_task=3, mix=(1.0, 1.0, 1.0), top_k=2, rollouts=3, policy_seeds=(0,),
        horizon=150, render=mw.RenderSettings(frames=4, size=32, step_data=True), bc=fb.BCConfig(steps=150),
        workers=1,
    )
    engine = fb.open_engine(BUNDLE)
    session_config = replace(session_config_from_files(num_frames=engine.num_frames), frame_rate=0.0)
    first = fb.run_experiment(config, engine, session_config, tmp_path / "a", tmp_path / "pool", progress_bar=False)
    for name in ("table.md", "results.json", "success_rates.png", "pool_scores.csv"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    from robometer_ros.training.data.store import Dataset

    pool = Dataset(tmp_path / "pool")
    assert len(pool) == 9 and all(meta.step_data for meta in pool.metas)
    assert sum(first["pool"]["reach-v3"].values()) == 9
    summary = first["summary"]["per_task"]["reach-v3"]
    assert {c: summary[c]["rollouts"] for c in fb.CONDITIONS} == dict.fromkeys(fb.CONDITIONS, 3)
    assert first["selections"]["reach-v3"]["all"]["episodes"] == 9
    assert first["selections"]["reach-v3"]["oracle_k"]["labels"]["successful"] == 1.0  # 3 experts succeed
    second = fb.run_experiment(config, engine, session_config, tmp_path / "b", tmp_path / "pool",
                               progress_bar=False)
    assert (tmp_path / "a" / "pool_scores.csv").read_text() == (tmp_path / "b" / "pool_scores.csv").read_text()
    assert second["summary"] == first["summary"]
    assert json.loads((tmp_path / "b" / "results.json").read_text())["summary"] == first["summary"]
    engine.close()
    with pytest.raises(ValueError, match="does not hold this pool"):
        list(fb.pool_trajectories(replace(config, pool_seed=5), tmp_path / "pool"))


def test_a_checkpoint_scores_through_the_session_as_its_bundle_does(tiny_bundle) -> None:
    """open_engine on a checkpoint directory (torch) gives the session the scores the exported bundle gives."""
    from fixtures_bundle import TINY_FRAME_SIZE, TINY_INSTRUCTION
    from robometer_ros.session import ScoringSession, SessionConfig, replay

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (*TINY_FRAME_SIZE, 3), dtype=np.uint8) for _ in range(6)]
    stamps = [i * 100_000_000 for i in range(6)]
    scores = []
    for engine in (fb.open_engine(tiny_bundle.path), fb.open_engine(tiny_bundle.path / "checkpoint")):
        session = ScoringSession(engine, SessionConfig(num_frames=engine.num_frames, frame_rate=0.0))
        scores.append(replay(session, TINY_INSTRUCTION, stamps, frames).step_scores())
    from robometer_ros.training.recipe.validation import CheckpointEngine

    assert isinstance(engine, CheckpointEngine)
    assert scores[0].shape == (6, 3)
    np.testing.assert_allclose(scores[1], scores[0], atol=1e-5)
    with pytest.raises(FileNotFoundError):
        fb.open_engine(tiny_bundle.path / "missing")
