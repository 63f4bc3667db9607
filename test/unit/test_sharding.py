"""Sharded scoring without processes: which units a rank takes, the merge back into single-process order with
unique bag episode ids and global ranks, GPU pinning per local rank, and the torchrun environment checks.
(test/integration/test_score_sharded.py runs robometer-score under torchrun with 2 gloo ranks.)"""

from __future__ import annotations

import numpy as np
import pytest

from robometer_ros.training.data.bags import UniqueEpisodeIds
from robometer_ros.training.evaluation.score import EpisodeScores
from robometer_ros.training.evaluation.sharding import (
    Shard,
    ShardedEpisodes,
    ShardError,
    merge_gathered,
    merge_on_main,
    pin_local_gpu,
    shard_from_env,
)
from robometer_ros.trajectory import Trajectory


def test_shard_from_torchrun_environment() -> None:
    assert shard_from_env({}) == Shard(0, 1, 0, 1) and not shard_from_env({}).distributed
    shard = shard_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert shard == Shard(3, 4, 1, 2) and shard.distributed and not shard.is_main
    assert list(shard.indices(10)) == [3, 7]
    with pytest.raises(ShardError, match="need 0 <= RANK < WORLD_SIZE"):
        shard_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ShardError, match="WORLD_SIZE='two' is not an integer"):
        shard_from_env({"WORLD_SIZE": "two"})
    with pytest.raises(ShardError, match="LOCAL_RANK"):
        shard_from_env({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"})


def _trajectory(episode_id: str) -> Trajectory:
    return Trajectory(instruction="open the drawer", frames=np.zeros((1, 4, 4, 3), np.uint8),
                      frame_stamps=np.zeros(1), episode_id=episode_id)


def _scores(episode_id: str, final_progress: float, instruction: str = "open the drawer") -> EpisodeScores:
    return EpisodeScores(episode_id, instruction, "test", "successful", None, 1, final_progress, 0.5,
                         np.zeros(1, np.int64), np.zeros(1), np.asarray([final_progress]), np.asarray([0.5]),
                         np.asarray([final_progress]))


def test_ranks_read_disjoint_units_and_the_merge_restores_the_single_process_order() -> None:
    # 5 bags holding 2, 0, 1, 2, 1 episodes; the same episode id in bags 0 and 3 (two robots, one naming scheme)
    bags = {"robot_a": ["ep-1", "ep-2"], "empty": [], "robot_b": ["ep-3"], "robot_c": ["ep-1", "ep-4"],
            "robot_d": ["ep-5"]}
    names = list(bags)
    read_log: list[str] = []

    def read(name: str) -> list[Trajectory]:
        read_log.append(name)
        return [_trajectory(i) for i in bags[name]]

    progress = {"robot_a": [0.1, 0.9], "robot_b": [0.5], "robot_c": [0.3, 0.7], "robot_d": [0.2]}
    gathered = []
    for rank in range(2):
        episodes = ShardedEpisodes(Shard(rank, 2), names, read)
        assert len(episodes) == (3 if rank == 0 else 2)
        scored = []
        for trajectory in episodes:
            unit = names[episodes.unit_of[-1]]
            within = sum(1 for u in episodes.unit_of if names[u] == unit) - 1
            scored.append(_scores(trajectory.episode_id, progress[unit][within]))
        gathered.append((episodes.unit_of, scored))
    assert sorted(read_log) == sorted(names) and len(read_log) == len(set(read_log))  # each bag read once
    assert gathered[0][0] == [0, 0, 2, 4] and gathered[1][0] == [3, 3]  # units 0, 2, 4 on rank 0; 1, 3 on rank 1
    merged = merge_gathered(gathered, names)
    # single-process order, and read_bags' id rule applied in that order (the second ep-1 is robot_c's)
    assert [e.episode_id for e in merged] == ["ep-1", "ep-2", "ep-3", "ep-1@robot_c", "ep-4", "ep-5"]
    ids = UniqueEpisodeIds()
    assert [ids.assign(i, name) for name in names for i in bags[name]] == [e.episode_id for e in merged]
    # ranks are over all episodes of all ranks (by final progress), and per task
    assert [e.final_progress for e in merged] == [0.1, 0.9, 0.5, 0.3, 0.7, 0.2]
    assert [e.rank_overall for e in merged] == [6, 1, 3, 4, 2, 5]
    assert all(e.task_size == 6 for e in merged)


def test_merge_ranks_by_final_progress_across_ranks() -> None:
    gathered = [([0, 2], [_scores("a", 0.2), _scores("c", 0.9)]), ([1], [_scores("b", 0.5)])]
    merged = merge_gathered(gathered)
    assert [e.episode_id for e in merged] == ["a", "b", "c"]
    assert [e.rank_overall for e in merged] == [3, 2, 1] and merged[2].percentile_overall == 1.0


def test_single_process_merge_needs_no_process_group() -> None:
    episodes = [_scores("x", 0.4), _scores("y", 0.6)]
    merged = merge_on_main(Shard(), episodes, [0, 1])
    assert [e.rank_overall for e in merged] == [2, 1]
    with pytest.raises(ValueError, match="2 episodes but 1 unit indices"):
        merge_on_main(Shard(), episodes, [0])


def test_each_local_rank_gets_its_own_gpu() -> None:
    env: dict[str, str] = {}
    assert pin_local_gpu(Shard(1, 4, 1, 2), env, gpu_count=lambda: 2) == "1" and env["CUDA_VISIBLE_DEVICES"] == "1"
    env = {"CUDA_VISIBLE_DEVICES": "4,6"}  # the user's selection is kept: rank 1 takes its second entry
    assert pin_local_gpu(Shard(3, 4, 1, 2), env) == "6"
    env = {}
    assert pin_local_gpu(Shard(2, 3, 2, 3), env, gpu_count=lambda: 2) == "0"  # more ranks than GPUs: they share
    env = {}
    assert pin_local_gpu(Shard(1, 2, 1, 2), env, gpu_count=lambda: None) is None and env == {}  # no GPUs
    assert pin_local_gpu(Shard(1, 2, 0, 1), env, gpu_count=lambda: 8) is None  # one rank per machine
