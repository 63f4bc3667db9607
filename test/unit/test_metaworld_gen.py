"""The Meta-World episode generator: kinds, labels from the success signal, upright frames, reproducibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("metaworld")
pytest.importorskip("mujoco")

from robometer_ros.training.data import dataset_cli
from robometer_ros.training.data import metaworld as mw
from robometer_ros.training.data.store import Dataset
from robometer_ros.trajectory import FAILURE, SUBOPTIMAL, SUCCESSFUL

SETTINGS = mw.RenderSettings(frames=8, size=48)
TASKS = ["reach-v3", "drawer-close-v3"]


def _assert_upright(frames: np.ndarray) -> None:
    """corner4 upright and not mirrored: grey wall on top, brown table at the bottom, red arm base at left."""
    pixels = frames.astype(np.float64)
    top = pixels[:, :4].reshape(-1, 3).mean(0)
    bottom = pixels[:, -4:].reshape(-1, 3).mean(0)
    left = pixels[:, :, :4].reshape(-1, 3).mean(0)
    assert abs(top[0] - top[2]) < 15, f"top rows are not the grey wall: mean RGB {top}"
    assert bottom[0] - bottom[2] > 20, f"bottom rows are not the brown table: mean RGB {bottom}"
    assert left[0] - left[1] > 30, f"left columns do not show the red arm base: mean RGB {left}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """Two tasks x 2 slots written through `robometer-dataset from-metaworld` into a dataset store."""
    out = tmp_path_factory.mktemp("mw") / "ds"
    argv = ["from-metaworld", "--tasks", *TASKS, "--episodes-per-task", "2", "--seed", "0", "--out", str(out),
            "--frames", str(SETTINGS.frames), "--size", str(SETTINGS.size), "--codec", "png", "--no-progress"]
    assert dataset_cli.main(argv) == 0
    return Dataset(out)


def test_kinds_labels_and_frames(dataset: Dataset) -> None:
    assert len(dataset) == 2 * 2 * 3
    kinds: dict[str, list[str]] = {}
    for position in range(len(dataset)):
        trajectory = dataset.trajectory(position)
        meta = trajectory.metadata
        kinds.setdefault(meta["task"], []).append(meta["kind"])
        assert trajectory.instruction == mw.INSTRUCTIONS[meta["task"]]
        assert trajectory.data_source == "metaworld"
        assert meta["seed"] == 0
        # The label follows the success signal recorded for the episode, whatever the behaviour was.
        expected = mw.quality_label(
            meta["first_success_step"], meta["expert_first_success_step"], meta["slow_factor"]
        )
        assert trajectory.quality_label == expected
        if trajectory.quality_label == FAILURE:
            assert not any(meta["frame_success"])
            assert meta["progress_source"] == "in_place_reward"
        else:
            assert meta["steps"] == meta["first_success_step"] + SETTINGS.post_success_steps
            assert trajectory.progress[0] == 0.0 and trajectory.progress[-1] == 1.0
            assert np.all(np.diff(trajectory.progress) >= 0)
        # frames: uint8, the asked size and count, not black, upright; stamps at the control period
        assert trajectory.frames.dtype == np.uint8
        assert trajectory.frames.shape == (SETTINGS.frames, SETTINGS.size, SETTINGS.size, 3)
        assert trajectory.frames.mean() > 40, "black frames"
        _assert_upright(trajectory.frames)
        assert meta["frame_steps"][0] == 0 and meta["frame_steps"][-1] == meta["steps"]
        np.testing.assert_allclose(trajectory.frame_stamps, np.array(meta["frame_steps"]) * meta["control_dt"])
        # failure horizons are capped relative to the expert, so length is no shortcut
        if meta["kind"] == mw.FAILURE_KIND and meta["expert_first_success_step"] is not None:
            expert_steps = meta["expert_first_success_step"] + SETTINGS.post_success_steps
            assert meta["steps"] <= np.ceil(SETTINGS.failure_horizon_factor * expert_steps)
    assert kinds == {task: ["expert", "suboptimal", "failure"] * 2 for task in TASKS}
    # the expert is its own speed reference: successful whenever it succeeded
    for position in dataset.indices_by_label()[FAILURE]:
        assert dataset.metas[position].metadata["first_success_step"] is None


def test_same_seed_same_episodes_other_seed_other_scenes(dataset: Dataset) -> None:
    again = list(mw.generate(["drawer-close-v3"], 1, seed=0, settings=SETTINGS, progress_bar=False))
    first = [dataset.trajectory(p) for p in range(len(dataset)) if dataset.metas[p].metadata["task"]
             == "drawer-close-v3" and dataset.metas[p].metadata["slot"] == 0]
    assert len(again) == len(first) == 3
    for a, b in zip(again, first):
        np.testing.assert_array_equal(a.frames, b.frames)
        assert a.metadata == b.metadata
        assert a.quality_label == b.quality_label
    other = next(iter(mw.generate(["drawer-close-v3"], 1, seed=1, settings=SETTINGS, progress_bar=False)))
    assert not np.array_equal(other.frames, first[0].frames)


def test_observations_and_actions_are_stored_without_changing_the_episode(
    dataset: Dataset, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """--observations-actions adds each control step's observation and action; frames, labels and metadata
    stay those of the same episode generated without it, and the actions replayed in the scene give back the
    stored observations and the recorded first success."""
    out = tmp_path_factory.mktemp("mw_steps") / "ds"
    argv = ["from-metaworld", "--tasks", "drawer-close-v3", "--episodes-per-task", "1", "--seed", "0",
            "--out", str(out), "--frames", str(SETTINGS.frames), "--size", str(SETTINGS.size), "--codec", "png",
            "--no-progress", "--observations-actions"]
    assert dataset_cli.main(argv) == 0
    with_steps = Dataset(out)
    plain = [p for p in range(len(dataset)) if dataset.metas[p].metadata["task"] == "drawer-close-v3"
             and dataset.metas[p].metadata["slot"] == 0]
    assert len(with_steps) == len(plain) == 3
    scene = mw.TaskScene("drawer-close-v3", 0, SETTINGS)
    try:
        for position, reference in zip(range(len(with_steps)), plain):
            trajectory, expected = with_steps.trajectory(position), dataset.trajectory(reference)
            np.testing.assert_array_equal(trajectory.frames, expected.frames)
            np.testing.assert_array_equal(trajectory.progress, expected.progress)
            assert trajectory.quality_label == expected.quality_label
            assert trajectory.metadata == expected.metadata
            assert expected.step_data == {}
            meta = trajectory.metadata
            steps = trajectory.step_data
            assert steps["observations"].shape == (meta["steps"] + 1, 39)
            assert steps["actions"].shape == (meta["steps"], 4)
            assert steps["observations"].dtype == steps["actions"].dtype == np.float32
            np.testing.assert_array_equal(steps["frame_steps"], meta["frame_steps"])
            assert np.abs(steps["actions"]).max() <= 1.0
            np.testing.assert_array_equal(with_steps.step_data(position)["actions"], steps["actions"])
            # the stored observation is what the policy saw; its action, applied, gives the next one
            obs = scene.reset(meta["config_index"])
            np.testing.assert_array_equal(obs.astype(np.float32), steps["observations"][0])
            first_success = None
            for step, action in enumerate(steps["actions"], start=1):
                obs, _, _, _, info = scene.env.step(action.astype(np.float64))
                np.testing.assert_allclose(obs, steps["observations"][step], atol=1e-6)
                if first_success is None and info["success"]:
                    first_success = step
            assert first_success == meta["first_success_step"]
    finally:
        scene.close()


def test_label_comes_from_success_not_from_behaviour() -> None:
    """A wrong policy that happens to solve the task is not a failure; a stall that never does is."""
    scene = mw.TaskScene("reach-v3", 0, SETTINGS)
    try:
        rng = np.random.default_rng(0)
        expert = scene.run(0, mw.Behaviour("expert", mw.MAX_PATH_LENGTH), rng)
        assert expert.first_success_step is not None
        # reach-wall's policy also moves the gripper to the goal of a reach scene
        wrong = mw.Behaviour("wrong_policy", 2 * expert.steps, other_task="reach-wall-v3")
        rollout = scene.run(0, wrong, rng)
        trajectory = mw.to_trajectory(
            rollout, "reach-v3", 0, 0, mw.FAILURE_KIND, wrong, expert.first_success_step, SETTINGS
        )
        assert rollout.first_success_step is not None
        assert trajectory.quality_label in (SUCCESSFUL, SUBOPTIMAL)
        assert trajectory.metadata["kind"] == mw.FAILURE_KIND
        stall = mw.Behaviour("stall", 2 * expert.steps, stall_step=3)
        stalled = scene.run(0, stall, rng)
        trajectory = mw.to_trajectory(
            stalled, "reach-v3", 0, 0, mw.FAILURE_KIND, stall, expert.first_success_step, SETTINGS
        )
        assert trajectory.quality_label == FAILURE
        assert stalled.steps == 2 * expert.steps
    finally:
        scene.close()


def test_quality_label_rule() -> None:
    assert mw.quality_label(None, 50, 1.2) == FAILURE
    assert mw.quality_label(None, None, 1.2) == FAILURE
    assert mw.quality_label(50, 50, 1.2) == SUCCESSFUL
    assert mw.quality_label(30, 50, 1.2) == SUCCESSFUL  # faster than the expert
    assert mw.quality_label(60, 50, 1.2) == SUCCESSFUL
    assert mw.quality_label(61, 50, 1.2) == SUBOPTIMAL
    assert mw.quality_label(40, None, 1.2) == SUBOPTIMAL  # no expert speed in this scene


def test_instructions_cover_all_tasks_and_bad_names_are_named() -> None:
    import metaworld

    assert set(mw.INSTRUCTIONS) == set(metaworld.ALL_V3_ENVIRONMENTS)
    assert len(set(mw.INSTRUCTIONS.values())) == len(mw.INSTRUCTIONS), "two tasks share an instruction"
    with pytest.raises(ValueError, match="no-such-task"):
        next(mw.generate(["no-such-task"], 1, seed=0, settings=SETTINGS, progress_bar=False))
    with pytest.raises(ValueError, match="episodes_per_task"):
        next(mw.generate(["reach-v3"], 51, seed=0, settings=SETTINGS, progress_bar=False))


def test_task_catalog_splits_tasks_and_wordings() -> None:
    """The data file the default model is trained and evaluated with: every task, at least 8 wordings split
    into training and held-out ones, at least 10 held-out tasks, and no wording in two places."""
    import metaworld

    catalog = mw.CATALOG
    assert set(catalog.train_phrasings) == set(metaworld.ALL_V3_ENVIRONMENTS)
    for task in catalog.train_phrasings:
        assert len(catalog.train_phrasings[task]) + len(catalog.heldout_phrasings[task]) >= 8, task
        assert len(catalog.heldout_phrasings[task]) >= 3, task
    assert len(catalog.heldout_tasks) >= 10
    assert not set(catalog.heldout_tasks) & set(catalog.trained_tasks)
    assert len(catalog.trained_tasks) + len(catalog.heldout_tasks) == 50
    wordings = [w for task in catalog.train_phrasings
                for w in (*catalog.train_phrasings[task], *catalog.heldout_phrasings[task])]
    assert len(wordings) == len(set(wordings))
    # the stored instruction is the first training wording
    assert mw.instruction_for("door-open-v3") == catalog.train_phrasings["door-open-v3"][0]


def test_catalog_wording_is_per_episode_and_from_the_asked_split() -> None:
    catalog = mw.CATALOG
    stored = mw.instruction_for("door-open-v3")
    chosen = {catalog.wording(stored, f"door-open-v3/seed1/slot{i:02d}/expert", "heldout") for i in range(40)}
    assert chosen == set(catalog.heldout_phrasings["door-open-v3"])  # every held-out wording is used
    key = "door-open-v3/seed1/slot03/failure"
    assert catalog.wording(stored, key, "heldout") == catalog.wording(stored, key, "heldout")
    assert catalog.wording(stored, key, "train") in catalog.train_phrasings["door-open-v3"]
    with pytest.raises(ValueError, match="not the stored instruction"):
        catalog.wording("open the pod bay doors", key, "heldout")
    with pytest.raises(ValueError, match="phrasing split"):
        catalog.wording(stored, key, "test")


def test_catalog_file_errors_are_named(tmp_path: Path) -> None:
    shared = tmp_path / "tasks.yaml"
    shared.write_text("heldout_tasks: []\nphrasings:\n  a: {train: [push it], heldout: [shove it]}\n"
                      "  b: {train: [push it], heldout: [nudge it]}\n")
    with pytest.raises(ValueError, match="push it"):
        mw.TaskCatalog.load(shared)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("heldout_tasks: [c]\nphrasings:\n  a: {train: [push it], heldout: [shove it]}\n")
    with pytest.raises(ValueError, match="c"):
        mw.TaskCatalog.load(unknown)
