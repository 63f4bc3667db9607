"""Pair strategies and labels as reference section 2.2-2.3 describes them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from robometer_ros.training.data.store import InMemoryDataset, write_dataset
from robometer_ros.training.recipe.sampling import (
    PairSampler,
    ProgressSampler,
    SamplingConfig,
    SamplingError,
    Strategy,
    absolute_first_frame_progress,
    stack_pair_labels,
    success_labels,
)
from robometer_ros.trajectory import Trajectory


def _trajectory(number: int, task: str, label: str = "successful", n: int = 20, **kwargs) -> Trajectory:
    """Frames carry their own identity: pixel (0,0) = (frame index, episode number, 0)."""
    frames = np.zeros((n, 4, 6, 3), dtype=np.uint8)
    frames[:, 0, 0, 0] = np.arange(n)
    frames[:, 0, 0, 1] = number
    return Trajectory(task, frames, np.arange(n) * 0.1, quality_label=label, episode_id=f"ep{number}", **kwargs)


def _identity(frames: np.ndarray) -> tuple[int, list[int]]:
    """(episode number, frame indices) encoded in the frames."""
    numbers = set(frames[:, 0, 0, 1].tolist())
    assert len(numbers) == 1
    return numbers.pop(), frames[:, 0, 0, 0].astype(int).tolist()


def _trajectories() -> list[Trajectory]:
    return [
        _trajectory(0, "pick", n=20),
        _trajectory(1, "pick", "failure", n=15),
        _trajectory(2, "place", n=12),
        _trajectory(3, "place", "suboptimal", n=16),
        _trajectory(4, "push", n=30),
    ]


def _collection() -> InMemoryDataset:
    return InMemoryDataset(_trajectories())


def _only(strategy: Strategy, **kwargs) -> SamplingConfig:
    return SamplingConfig(strategy_ratios={s.value: float(s is strategy) for s in Strategy}, **kwargs)


def test_progress_labels_by_hand() -> None:
    # N = 21, cutoff 1.0, s = 0: y = idx / 20
    np.testing.assert_allclose(absolute_first_frame_progress([0, 20, 10], 21, 1.0), [0, 1, 0.5])
    # segment from s = 5: y = (idx - 5) / (20 - 5 - 1)
    np.testing.assert_allclose(absolute_first_frame_progress([5, 12, 19], 20, 1.0), [0, 0.5, 1])
    # cutoff 0.5: cutoff_idx = 10, y = idx / 9 capped at 1
    np.testing.assert_allclose(absolute_first_frame_progress([0, 3, 9, 15], 20, 0.5), [0, 1 / 3, 1, 1], rtol=1e-6)
    success, mask = success_labels(np.array([0.0, 0.49, 0.5, 0.9, 0.95, 1.0]), cutoff=0.95, min_success=0.5)
    np.testing.assert_array_equal(success, [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(mask, [1, 1, 0, 0, 1, 1])  # 0.5 <= y < cutoff is ambiguous


def test_same_seed_and_index_give_the_same_pair() -> None:
    one = PairSampler(_collection(), seed=7)
    two = PairSampler(_collection(), seed=7)
    for index in (0, 5, 123):
        a, b = one[index], two[index]
        assert a.strategy == b.strategy and a.preference_label == b.preference_label
        np.testing.assert_array_equal(a.frames_a, b.frames_a)
        np.testing.assert_array_equal(a.progress_a, b.progress_a)
    # order does not matter and other seeds give other pairs
    fresh = PairSampler(_collection(), seed=7)
    _ = one[100]
    assert one[3].metadata["chosen_frame_indices"] == fresh[3].metadata["chosen_frame_indices"]
    other = PairSampler(_collection(), seed=8)
    assert any(
        one[i].metadata["chosen_frame_indices"] != other[i].metadata["chosen_frame_indices"] for i in range(10)
    )


def test_episodes_with_an_unknown_outcome_are_never_sampled() -> None:
    trajectories = [*_trajectories(), _trajectory(5, "pick", "unknown", n=25)]
    sampler = PairSampler(InMemoryDataset(trajectories), seed=0)
    assert sampler.excluded_unknown == 1
    for index in range(200):
        sample = sampler[index]
        for frames in (sample.frames_a, sample.frames_b):
            assert _identity(frames)[0] != 5


def test_strategies_uniform_and_configurable() -> None:
    sampler = PairSampler(_collection(), seed=0)
    assert sampler.strategy_probabilities == {s.value: 0.25 for s in Strategy}
    counts = Counter(sampler[i].strategy for i in range(400))
    assert set(counts) == {s.value for s in Strategy}
    assert all(60 <= c <= 140 for c in counts.values()), counts
    rewind_only = PairSampler(_collection(), _only(Strategy.REWIND), seed=0)
    assert {rewind_only[i].strategy for i in range(20)} == {"rewind"}


def test_chosen_side_is_randomised_and_label_1_means_a_is_chosen() -> None:
    sampler = PairSampler(_collection(), seed=1)
    labels = []
    for index in range(60):
        sample = sampler[index]
        labels.append(sample.preference_label)
        chosen = sample.frames_a if sample.preference_label == 1 else sample.frames_b
        rejected = sample.frames_b if sample.preference_label == 1 else sample.frames_a
        assert _identity(chosen)[1] == sample.metadata["chosen_frame_indices"]
        assert _identity(rejected)[1] == sample.metadata["rejected_frame_indices"]
        assert f"ep{_identity(chosen)[0]}" == sample.metadata["chosen_episode_id"]
        assert sample.frames_a.shape == (8, 4, 6, 3)
    assert 15 <= sum(labels) <= 45


def test_rewind_pair() -> None:
    sampler = PairSampler(_collection(), _only(Strategy.REWIND), seed=2)
    for index in range(20):
        sample = sampler[index]
        chosen = sample.metadata["chosen_frame_indices"]
        rejected = sample.metadata["rejected_frame_indices"]
        assert sample.metadata["chosen_episode_id"] == sample.metadata["rejected_episode_id"]
        assert chosen == sorted(chosen)  # forward
        peak = int(np.argmax(rejected))
        assert rejected[: peak + 1] == sorted(rejected[: peak + 1])  # up ...
        assert rejected[peak:] == sorted(rejected[peak:], reverse=True)  # ... then back down
        assert rejected[-1] < rejected[peak]
        rewind_progress = sample.progress_a if sample.preference_label == 0 else sample.metadata["progress_b"]
        assert rewind_progress[-1] < rewind_progress.max()  # labels follow the indices down
        assert sample.progress_mask_a == 1.0  # both sides successful / rewind


def test_reverse_pair() -> None:
    sampler = PairSampler(_collection(), _only(Strategy.REVERSE_PROGRESS), seed=3)
    for index in range(10):
        sample = sampler[index]
        rejected = sample.metadata["rejected_frame_indices"]
        assert rejected == sorted(rejected, reverse=True) and rejected[0] > rejected[-1]
        progress = sample.progress_a if sample.preference_label == 0 else sample.metadata["progress_b"]
        assert progress[0] > progress[-1] == 0.0  # decreasing to 0 at the segment's first stored frame


def test_different_task_pair() -> None:
    collection = _collection()
    sampler = PairSampler(collection, _only(Strategy.DIFFERENT_TASK), seed=4)
    for index in range(20):
        sample = sampler[index]
        chosen_task = collection.metas[int(sample.metadata["chosen_episode_id"][2:])].instruction
        assert sample.instruction == chosen_task
        assert sample.metadata["rejected_instruction"] != chosen_task
        assert sample.metadata["rejected_quality_label"] == "successful"
        if sample.preference_label == 0:  # A is the other task's video: labels zeroed, still supervised
            np.testing.assert_array_equal(sample.progress_a, 0.0)
            np.testing.assert_array_equal(sample.success_a, 0.0)
            np.testing.assert_array_equal(sample.success_mask_a, 1.0)
            assert sample.progress_mask_a == 1.0
        else:
            np.testing.assert_array_equal(sample.metadata["progress_b"], 0.0)


def test_pairs_show_a_wording_of_the_chosen_task() -> None:
    """With instruction_phrasings each pair shows one wording of its chosen task (also the different-task
    pairs: the other task's video is shown under a wording of the chosen one), drawn per pair index; the
    frames and labels are those of the sampler without phrasings."""
    wordings = {"pick": ["pick", "pick it up", "grab it"], "place": ["place", "put it down"]}
    plain = PairSampler(_collection(), seed=3)
    worded = PairSampler(_collection(), SamplingConfig(instruction_phrasings=wordings), seed=3)
    shown: dict[str, set[str]] = {}
    for index in range(200):
        a, b = plain[index], worded[index]
        assert b.metadata["stored_instruction"] == a.instruction
        assert b.instruction in wordings.get(a.instruction, [a.instruction])
        shown.setdefault(a.instruction, set()).add(b.instruction)
        np.testing.assert_array_equal(a.frames_a, b.frames_a)
        np.testing.assert_array_equal(a.progress_a, b.progress_a)
    assert shown["pick"] == set(wordings["pick"]) and shown["place"] == set(wordings["place"])
    assert shown["push"] == {"push"}  # not listed: shown as stored
    again = PairSampler(_collection(), SamplingConfig(instruction_phrasings=wordings), seed=3)
    assert [again[i].instruction for i in (7, 3, 150)] == [worded[i].instruction for i in (7, 3, 150)]
    with pytest.raises(ValueError, match="no wordings"):
        SamplingConfig(instruction_phrasings={"pick": []})


def test_suboptimal_pair() -> None:
    sampler = PairSampler(_collection(), _only(Strategy.SUBOPTIMAL), seed=5)
    seen_whole = False
    for index in range(40):
        sample = sampler[index]
        assert sample.metadata["chosen_quality_label"] == "successful"
        assert sample.metadata["rejected_quality_label"] in ("failure", "suboptimal")
        assert sample.instruction in ("pick", "place")  # push has no worse trajectory
        if sample.preference_label == 0:  # A is the worse trajectory
            assert sample.progress_mask_a == 0.0
            np.testing.assert_array_equal(sample.success_a, 0.0)
            np.testing.assert_array_equal(sample.success_mask_a, 1.0)
        rejected = sample.metadata["rejected_frame_indices"]
        seen_whole |= rejected[0] == 0 and rejected[-1] in (14, 15)  # a worse pick is shown whole
    assert seen_whole


def test_successful_segment_labels_and_cutoff() -> None:
    config = _only(Strategy.REWIND, success_cutoffs={"lab": 0.5})
    collection = InMemoryDataset([_trajectory(0, "pick", n=20, data_source="lab")])
    sampler = PairSampler(collection, config, seed=6)
    for index in range(10):
        sample = sampler[index]
        chosen = np.array(sample.metadata["chosen_frame_indices"])
        progress = sample.progress_a if sample.preference_label == 1 else sample.metadata["progress_b"]
        expected = np.minimum(1.0, (chosen - chosen.min()) / max(1, 10 - chosen.min() - 1))
        np.testing.assert_allclose(progress, expected, rtol=1e-6)
        if sample.preference_label == 1:
            np.testing.assert_array_equal(sample.success_a, progress >= 0.5)
            np.testing.assert_array_equal(sample.success_mask_a, (progress < 0.5) | (progress >= 0.5))


def test_partial_success_pairs_need_a_gap() -> None:
    collection = InMemoryDataset([
        _trajectory(0, "wipe", "suboptimal", n=10, partial_success=0.3),
        _trajectory(1, "wipe", "suboptimal", n=10, partial_success=0.4),  # within 0.2 of both others
        _trajectory(2, "wipe", "suboptimal", n=10, partial_success=0.55),
    ])
    sampler = PairSampler(collection, _only(Strategy.SUBOPTIMAL), seed=0)
    for index in range(20):
        sample = sampler[index]
        assert {sample.metadata["chosen_episode_id"], sample.metadata["rejected_episode_id"]} == {"ep0", "ep2"}
        assert sample.metadata["chosen_episode_id"] == "ep2"  # the higher score is chosen
        progress = sample.progress_a if sample.preference_label == 1 else sample.metadata["progress_b"]
        np.testing.assert_allclose(progress, [0, 0, 0, 0, 0, 0, 0, 0.55], rtol=1e-6)  # only the last frame
        assert sample.progress_mask_a == 1.0
    close = InMemoryDataset([_trajectory(0, "wipe", n=10, partial_success=0.3),
                             _trajectory(1, "wipe", n=10, partial_success=0.4)])
    with pytest.raises(SamplingError, match="no pair strategy"):
        PairSampler(close, _only(Strategy.SUBOPTIMAL))


def test_short_and_infeasible_collections() -> None:
    with pytest.raises(SamplingError, match="shorter than min_frames"):
        PairSampler(InMemoryDataset([_trajectory(0, "pick", n=2)]))
    with pytest.raises(SamplingError, match="DIFFERENT_TASK"):
        PairSampler(InMemoryDataset([_trajectory(0, "pick")]), _only(Strategy.DIFFERENT_TASK))
    sampler = PairSampler(InMemoryDataset([_trajectory(0, "pick", n=3)]), seed=0)
    assert sampler.strategy_probabilities["different_task"] == 0.0
    assert sampler[0].frames_a.shape[0] == 8  # 3 stored frames padded to 8 by repeating the last


def test_preference_only_sources_and_resizing() -> None:
    collection = InMemoryDataset([_trajectory(0, "pick", data_source="epic")])
    config = _only(Strategy.REVERSE_PROGRESS, preference_only_sources=("epic",), frame_size=(32, 64))
    sample = PairSampler(collection, config, seed=0)[0]
    assert sample.progress_mask_a == 0.0
    assert sample.frames_a.shape == (8, 32, 64, 3) and sample.frames_b.shape == (8, 32, 64, 3)


def test_progress_sampler_and_on_disk_dataset_agree(tmp_path: Path) -> None:
    trajectories = [_trajectory(0, "pick", n=20), _trajectory(1, "pick", "failure", n=15)]
    on_disk = write_dataset(tmp_path / "ds", trajectories)
    memory = ProgressSampler(InMemoryDataset(trajectories))
    disk = ProgressSampler(on_disk)
    sample = disk[0]
    np.testing.assert_array_equal(sample.frame_indices, [0, 3, 5, 8, 11, 14, 16, 19])
    np.testing.assert_allclose(sample.progress, sample.frame_indices / 19, rtol=1e-6)
    np.testing.assert_array_equal(sample.frames, memory[0].frames)
    assert disk[1].progress_mask == 0.0 and disk[1].success_mask.all() and not disk[1].success.any()
    pair_disk = PairSampler(on_disk, seed=9)[4]
    pair_memory = PairSampler(InMemoryDataset(trajectories), seed=9)[4]
    np.testing.assert_array_equal(pair_disk.frames_a, pair_memory.frames_a)


def test_stack_pair_labels_shapes() -> None:
    sampler = PairSampler(_collection(), seed=0)
    batch = stack_pair_labels([sampler[i] for i in range(3)])
    assert batch["progress_a"].shape == (3, 8) and batch["progress_mask_a"].shape == (3,)
    assert batch["success_mask_a"].shape == (3, 8) and batch["preference_label"].dtype == np.float32


def test_config_from_dict_rejects_unknown_keys() -> None:
    config = SamplingConfig.from_dict({"strategy_ratios": {"rewind": 0.0}, "frame_size": [64, 96]})
    assert config.strategy_ratios["rewind"] == 0.0 and config.strategy_ratios["suboptimal"] == 1.0
    assert config.frame_size == (64, 96)
    with pytest.raises(ValueError, match="unknown sampling options"):
        SamplingConfig.from_dict({"num_frame": 8})
    with pytest.raises(ValueError, match="unknown strategies"):
        SamplingConfig(strategy_ratios={"forward": 1.0})
