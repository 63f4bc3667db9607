"""robometer-eval / robometer-score plumbing with an oracle predictor that reads progress off the frames."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from robometer_ros.monitor import MonitorConfig
from robometer_ros.session import ScoringSession, SessionConfig
from robometer_ros.training.data.store import InMemoryDataset
from robometer_ros.training.evaluation.score import (
    assign_ranks,
    companion_path,
    score_episode,
    score_trajectories,
    write_tables,
)
from robometer_ros.training.recipe.validation import (
    EvalOptions,
    FailureRule,
    evaluate_collection,
    format_table,
    preference_pairs,
)
from robometer_ros.trajectory import FAILURE, SUBOPTIMAL, SUCCESSFUL
from support.synthetic_squares import COLOURS, FRAME_SIZE, SQUARE, make_trajectories


class OraclePredictor:
    """Progress = how far the square of the instruction's colour is along (0 if that colour is absent)."""

    num_frames = 8

    def __init__(self) -> None:
        self.calls = 0

    @staticmethod
    def _progress(instruction: str, frame: np.ndarray) -> float:
        colour = next(name for name in COLOURS if f" {name} " in instruction)
        mask = np.all(frame == np.asarray(COLOURS[colour], np.uint8), axis=-1)
        if not mask.any():
            return 0.0
        return float(np.flatnonzero(mask.any(axis=0))[0]) / (FRAME_SIZE - 4 - SQUARE)

    def score(self, instructions: Sequence[str], frames: Sequence[np.ndarray]) -> list:
        self.calls += 1
        out = []
        for instruction, trajectory in zip(instructions, frames):
            assert len(trajectory) == self.num_frames
            progress = np.asarray([self._progress(instruction, f) for f in trajectory], dtype=np.float32)
            out.append((progress, (progress > 0.95).astype(np.float32) * 0.9 + 0.05))
        return out

    def preference(self, instructions: Sequence[str], frames_a: Sequence, frames_b: Sequence) -> list[float]:
        a = [p[-1] for p, _ in self.score(instructions, frames_a)]
        b = [p[-1] for p, _ in self.score(instructions, frames_b)]
        return [1.0 / (1.0 + math.exp(-20.0 * (x - y))) for x, y in zip(a, b)]

    @property
    def engine(self) -> OracleEngine:
        return OracleEngine()


class OracleEngine:
    """The oracle behind the engine interface the ScoringSession scores through."""

    num_frames = 8

    def __init__(self) -> None:
        self.frames: dict = {}

    def add_frame(self, frame_id, image) -> None:
        self.frames[frame_id] = image

    def forget(self, frame_ids) -> None:
        for frame_id in frame_ids:
            self.frames.pop(frame_id, None)

    def score(self, instruction, frame_ids):
        from robometer_ros.training.recipe.validation import StepScores

        progress = np.asarray([OraclePredictor._progress(instruction, self.frames[i]) for i in frame_ids])
        return StepScores(progress, (progress > 0.95) * 0.9 + 0.05)


# Every frame admitted (the squares episodes are 12-16 frames at 10 Hz); stalls off; the oracle's success
# shows only at the very last frame, so the end verdict looks at that one.
SESSION = SessionConfig(frame_rate=0.0, monitor=MonitorConfig(stall_timeout_s=0.0, regression_margin=0.3,
                                                              end_window_steps=1))


@pytest.fixture(scope="module")
def collection() -> InMemoryDataset:
    return InMemoryDataset(make_trajectories(4, seed=3))


def test_oracle_scores_well_on_every_metric(tmp_path: Path, collection: InMemoryDataset) -> None:
    options = EvalOptions(max_pairs=50, num_plots=4, batch_size=5, seed=1, session=SESSION)
    metrics = evaluate_collection(OraclePredictor(), collection, options, tmp_path, {"model": "oracle"})
    overall = metrics["overall"]
    assert overall["episodes"] == 12 and overall["ranking_tasks"] == 3
    assert overall["voc"] > 0.95
    assert overall["failure_f1"] == 1.0  # failures stop half-way: low final progress and success
    # the node's verdicts: failures slide back (REGRESSED) and end without success; nothing else is flagged
    assert overall["node_f1"] == 1.0 and overall["node_false_alarm_rate"] == 0.0
    assert overall["preference_accuracy_different_task"] == 1.0  # the other colour is absent: progress 0
    assert overall["preference_accuracy_different_quality"] > 0.7
    assert overall["pairs"] == 3 * 5 + 24  # every quality pair and every different-task pair (under 50)
    assert set(metrics) == {"overall", "squares_a", "squares_b"}
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["settings"]["model"] == "oracle" and record["settings"]["failure_rule"] == {
        "success_threshold": 0.5, "progress_threshold": 0.5}
    assert len(record["episodes"]) == 12 and len(record["episodes"][0]["predicted_progress"]) == 8
    verdicts = {v["episode_id"]: v for v in record["node_verdicts"]}
    assert len(verdicts) == 12
    for episode in record["episodes"]:
        verdict = verdicts[episode["episode_id"]]
        assert verdict["predicted_failure"] == (episode["quality_label"] == FAILURE)
        assert verdict["steps"] >= 12  # every frame of the episode was a scoring step
    assert "node monitor" in record["settings"]["node_verdicts"]["rule"]
    assert len(list((tmp_path / "plots").glob("*.png"))) == 4
    table = format_table(metrics)
    assert table.splitlines()[2].startswith("overall") and "squares_b" in table


def test_preference_pairs_cover_both_kinds_and_are_seeded(collection: InMemoryDataset) -> None:
    pairs = preference_pairs(collection, max_pairs=1000, seed=0)
    quality = [p for p in pairs if p[0] == "different_quality"]
    different = [p for p in pairs if p[0] == "different_task"]
    rank = {FAILURE: 0, SUBOPTIMAL: 1, SUCCESSFUL: 2}
    metas = collection.metas
    assert len(quality) == 3 * (2 * 1 + 2 * 1 + 1 * 1)
    assert all(rank[metas[b].quality_label] > rank[metas[w].quality_label] for _, b, w, _, _ in quality)
    assert all(metas[b].instruction == task == metas[w].instruction for _, b, w, task, _ in quality)
    assert len(different) == 3 * 2 * 2 * 2  # ordered task pairs x successful x successful
    assert all(metas[w].instruction != task and metas[b].instruction == task for _, b, w, task, _ in different)
    assert preference_pairs(collection, 4, seed=5) == preference_pairs(collection, 4, seed=5)
    assert len(preference_pairs(collection, 4, seed=5)) == 8 and preference_pairs(collection, 0, 0) == []


def test_failure_rule_needs_both_low_success_and_low_progress() -> None:
    rule = FailureRule(success_threshold=0.5, progress_threshold=0.3)
    assert rule(np.array([0.0, 0.2]), np.array([0.0, 0.1]))
    assert not rule(np.array([0.0, 0.4]), np.array([0.0, 0.1]))  # got far enough
    assert not rule(np.array([0.0, 0.2]), np.array([0.0, 0.6]))  # looks done


def test_score_tables_rank_and_round_trip(tmp_path: Path, collection: InMemoryDataset) -> None:
    # 5 Hz admission of the 10 Hz episodes, as on the robot: every other frame, and the last one at the end
    episodes = score_trajectories(OracleEngine(), collection, replace(SESSION, frame_rate=5.0))
    assert len(episodes) == 12
    for episode in episodes:
        trajectory = next(t for t in collection if t.episode_id == episode.episode_id)
        n = len(trajectory)
        assert list(episode.frame_indices) == sorted(set(range(0, n, 2)) | {n - 1})
        # dense reward at frame t = the oracle's progress of frame t (the newest frame of its step)
        expected = [OraclePredictor._progress(trajectory.instruction, trajectory.frames[t])
                    for t in episode.frame_indices]
        np.testing.assert_allclose(episode.frame_progress, expected, atol=1e-6)
        np.testing.assert_allclose(episode.frame_reward, episode.frame_progress, atol=1e-6)  # reward_mode progress
        assert episode.predicted_failure == (trajectory.quality_label == FAILURE)
        assert episode.verdict == ("failed:LOW_SUCCESS_AT_END" if episode.predicted_failure else "succeeded")
    by_task: dict[str, list] = {}
    for episode in episodes:
        by_task.setdefault(episode.instruction, []).append(episode)
    for members in by_task.values():
        ordered = sorted(members, key=lambda e: e.rank_in_task)
        assert [e.rank_in_task for e in ordered] == [1, 2, 3, 4] and all(e.task_size == 4 for e in members)
        assert all(a.final_progress >= b.final_progress for a, b in pairwise(ordered))
        assert ordered[-1].quality_label == FAILURE
    assert sorted(e.rank_overall for e in episodes) == list(range(1, 13))
    best = min(episodes, key=lambda e: e.rank_overall)
    assert best.percentile_overall == 1.0

    for suffix, read in ((".parquet", pq.read_table), (".csv", pcsv.read_csv)):
        out = tmp_path / f"scores{suffix}"
        written = write_tables(episodes, out)
        assert written == (out, companion_path(out)) and companion_path(out).name == f"scores_frames{suffix}"
        rows = read(out).to_pylist()
        assert [r["episode_id"] for r in rows] == [e.episode_id for e in episodes]
        assert rows[0]["final_progress"] == pytest.approx(episodes[0].final_progress, abs=1e-6)
        frames = read(companion_path(out)).to_pylist()
        assert len(frames) == sum(len(e.frame_indices) for e in episodes)
    with pytest.raises(ValueError, match=r"\.parquet or \.csv"):
        write_tables(episodes, tmp_path / "scores.txt")


def test_single_episode_ranks() -> None:
    trajectory = make_trajectories(1)[0]
    episode = score_episode(ScoringSession(OracleEngine(), replace(SESSION, frame_rate=0.5)), trajectory)
    assert list(episode.frame_indices) == [0, len(trajectory) - 1]  # the first frame, and the last at the end
    assign_ranks([episode])
    assert (episode.rank_in_task, episode.rank_overall, episode.percentile_overall) == (1, 1, 1.0)


def test_jpeg_transport_is_what_the_node_decodes_from_a_compressed_camera(collection: InMemoryDataset) -> None:
    from robometer_ros.training.evaluation.evaluate import JpegTransport

    frames = collection[0].frames
    sent = JpegTransport(quality=95)(frames)
    assert sent.shape == frames.shape and sent.dtype == np.uint8
    error = np.abs(sent.astype(int) - frames.astype(int))
    assert 0 < error.mean() < 3  # lossy, but the scene is intact
    assert np.abs(JpegTransport(quality=20)(frames).astype(int) - frames.astype(int)).mean() > error.mean()


def test_rephrased_instructions_reach_the_model_and_metrics_still_group_by_task(
        collection: InMemoryDataset) -> None:
    seen: list[str] = []

    class Recording(OraclePredictor):
        def score(self, instructions, frames):
            seen.extend(instructions)
            return super().score(instructions, frames)

    reworded = EvalOptions(max_pairs=6, num_plots=0, rephrase=lambda text, key: text.replace("push the", "move that"))
    metrics = evaluate_collection(Recording(), collection, reworded)["overall"]
    assert seen and all(text.startswith("move that") for text in seen)
    assert metrics["ranking_tasks"] == 3 and metrics["voc"] > 0.95  # same task, other words: same scores
    from robometer_ros.training.recipe.validation import score_trajectories as eval_scores

    swapped = EvalOptions(max_pairs=0, num_plots=0, rephrase=lambda text, key: text.replace("red", "blue"))
    for sample, progress, _ in eval_scores(OraclePredictor(), collection, swapped):  # the words matter
        assert (np.max(progress) == 0.0) == (" red " in sample.instruction)  # the stored instruction is kept
