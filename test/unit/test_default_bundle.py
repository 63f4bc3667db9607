"""The committed default bundle opens, validates and scores the committed demo episodes sensibly.

Scoring is the node's: each bag is replayed through the ScoringSession with the node's default parameters
(config/reward_node.yaml) plus the demo's (robometer_ros.demo.NODE_PARAMETERS), its monitor included, and the
episode is ended at its last frame.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from robometer_ros import demo
from robometer_ros.engine.bundle import Bundle
from robometer_ros.engine.reward_engine import RewardEngine
from robometer_ros.episode import subsample_indices
from robometer_ros.monitor import EventKind, FailureReason
from robometer_ros.node_parameters import default_parameters_file, load_parameters
from robometer_ros.session import ScoringSession, SessionConfig, replay
from robometer_ros.training.data.metaworld import CATALOG, DEFAULT_FRAME_SIZE

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "default"
BAGS = REPO / "demo_bags"


def _bags(label: str) -> list[Path]:
    return sorted(p for p in BAGS.iterdir() if p.name.endswith(f"_{label}"))


@pytest.fixture(scope="module")
def engine() -> RewardEngine:
    import torch

    torch.set_num_threads(1)
    scorer = RewardEngine(BUNDLE, backend="onnxruntime", intra_op_threads=1)
    yield scorer
    scorer.close()


def _replay(engine: RewardEngine, path: Path) -> tuple[np.ndarray, np.ndarray, list, np.ndarray]:
    """Per-step (progress, success probability) at the newest frame, the monitor's events (the end verdict
    included), and the per-frame progress of the last step (8 frames spanning the whole episode)."""
    episode = demo.read_demo_bag(path)
    parameters = {**load_parameters([default_parameters_file()]), **demo.NODE_PARAMETERS}
    session = ScoringSession(engine, SessionConfig.from_parameters(parameters))
    result = replay(session, episode.instruction, episode.stamps_ns, episode.frames)
    progress = np.array([s.progress for s in result.steps])
    success = np.array([s.success_probability for s in result.steps])
    return progress, success, result.events, np.asarray(result.steps[-1].frame_progress)


def test_bundle_opens_and_validates() -> None:
    bundle = Bundle.open(BUNDLE, verify_checksums=True)
    frame = bundle.manifest.frame
    assert (frame.height, frame.width) == (DEFAULT_FRAME_SIZE, DEFAULT_FRAME_SIZE)
    size = sum(f.stat().st_size for f in BUNDLE.rglob("*") if f.is_file())
    assert size < 40e6, f"the committed default bundle is {size / 1e6:.1f} MB"


def test_bundle_names_the_task_and_wording_split_it_was_trained_with() -> None:
    """The manifest records the task catalog it was trained with, equal to the package's data file, and the
    stored instructions of its training data: exactly the trained tasks', none of a held-out task's."""
    training = Bundle.open(BUNDLE, verify_checksums=False).manifest.extra["training"]
    data = training["training_data"]
    assert data["task_catalog"] == CATALOG.summary()
    assert data["train_instructions"] == sorted(CATALOG.instruction(task) for task in CATALOG.trained_tasks)
    assert training["frame_size"] == [DEFAULT_FRAME_SIZE, DEFAULT_FRAME_SIZE]


def test_demo_bags_are_there_with_both_outcomes() -> None:
    """Unseen scenes of trained and held-out tasks, both outcomes, each asked in a held-out wording."""
    assert _bags("successful") and _bags("failure")
    tasks = set()
    for path in sorted(BAGS.iterdir()):
        episode = demo.read_demo_bag(path)
        assert episode.truth["seed"] == str(demo.DEMO_SEED)  # a scene the model never trained on
        assert episode.frames[0].shape == (demo.DEMO_SIZE, demo.DEMO_SIZE, 3)
        assert np.all(np.diff(episode.stamps_ns) > 0)
        assert episode.instruction in CATALOG.heldout_phrasings[episode.truth["task"]], path.name
        tasks.add(episode.truth["task"])
    assert tasks & set(CATALOG.heldout_tasks) and tasks & set(CATALOG.trained_tasks)


def test_success_rises_and_succeeds(engine: RewardEngine) -> None:
    """The successful demo episodes (a trained and a held-out task, each asked in a held-out wording): progress
    over the whole episode rises, the node judges them SUCCEEDED and raises no failure."""
    for path in _bags("successful"):
        _, success, events, curve = _replay(engine, path)
        # over the whole episode (the last step's 8 frames, first and last kept) progress rises
        assert curve[-1] > curve[0] + 0.3, f"{path.name}: progress over the episode {curve.round(2)}"
        assert any(e.kind == EventKind.SUCCEEDED for e in events), f"{path.name}: success {success.round(2)}"
        assert not any(e.kind == EventKind.FAILURE_RAISED for e in events), f"{path.name}: {events}"


def test_failures_the_demo_reports(engine: RewardEngine) -> None:
    """The stalled window-close (a task the model never trained on) raises STALLED; the stalled door and the
    wrong-policy drawer are called successes (the model sees the arm at the handle and scores progress ~0.85):
    the misses README and `make demo` report."""
    _, _, events, _ = _replay(engine, BAGS / "05_window-close_failure")
    assert FailureReason.STALLED in {e.reason for e in events if e.kind == EventKind.FAILURE_RAISED}
    for name in ("02_door-open_failure", "03_drawer-open_failure"):
        _, _, events, _ = _replay(engine, BAGS / name)
        assert not any(e.kind == EventKind.FAILURE_RAISED for e in events), f"{name}: now flagged: update README"


def test_progress_follows_the_words_not_the_scene(engine: RewardEngine) -> None:
    """Language grounding on a wording the model never trained on: the door-open success scored against its
    held-out wording ends near done; against other tasks' instructions it stays far lower."""
    episode = demo.read_demo_bag(BAGS / "01_door-open_successful")
    engine.clear()
    for index, frame in enumerate(episode.frames):
        engine.add_frame(index, frame)
    ids = [int(i) for i in subsample_indices(len(episode.frames), engine.num_frames)]
    right = engine.score(episode.instruction, ids).progress[-1]
    wrong = [engine.score(CATALOG.heldout_phrasings[task][0], ids).progress[-1]
             for task in ("window-close-v3", "drawer-close-v3", "button-press-v3")]
    engine.clear()
    assert right > 0.7 and max(wrong) < right - 0.3, f"right {right:.2f}, wrong {np.round(wrong, 2)}"


def test_prefix_reuse_and_batches_score_as_the_plain_language_part(engine: RewardEngine) -> None:
    """The bundle holds the prefix-reuse parts and the node uses them; a step scored on a reused prefix, and
    score_batch (the offline replay's call), equal the plain language part that re-runs the whole prompt."""
    assert engine.bundle.has_prefix_parts and engine.prefix_reuse
    plain = RewardEngine(BUNDLE, backend="onnxruntime", intra_op_threads=1, prefix_reuse=False)
    episode = demo.read_demo_bag(_bags("successful")[0])
    engine.clear()
    for index, frame in enumerate(episode.frames[:12]):
        engine.add_frame(index, frame)
        plain.add_frame(index, frame)
    lists = [[int(i) for i in subsample_indices(t + 1, engine.num_frames)] for t in range(12)]
    for ids, scores in zip(lists, engine.score_batch(episode.instruction, lists)):
        reference = plain.score(episode.instruction, ids)
        np.testing.assert_allclose(scores.progress_logits, reference.progress_logits, atol=1e-4)
        np.testing.assert_allclose(engine.score(episode.instruction, ids).progress_logits,
                                   reference.progress_logits, atol=1e-4)
    plain.close()
    engine.clear()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_default_model_goes_on_where_it_stopped(tmp_path: Path) -> None:
    """An interrupted `make default-model` run again redoes only the unfinished split (from an empty directory)
    and keeps the finished ones and the initial model; both training stages run (they resume themselves)."""
    data, run = tmp_path / "data", tmp_path / "run"
    for done in ("train", "calibration", "eval_seeds"):
        (data / done).mkdir(parents=True)
        (data / done / ".complete").touch()
    (data / "eval_tasks").mkdir()  # interrupted: no stamp
    (run / "init").mkdir(parents=True)
    (run / "init" / ".complete").touch()
    plan = subprocess.run(
        ["make", "-n", "default-model", f"MW_DATA={data}", f"MW_RUN={run}", f"VENV={sys.prefix}"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    generated = [line for line in plan.splitlines() if "from-metaworld" in line]
    assert len(generated) == 1 and generated[0].endswith(f"--out {data}/eval_tasks"), plan
    assert [line for line in plan.splitlines() if line.startswith("rm ")] == [f"rm -rf {data}/eval_tasks"], plan
    assert "init-model" not in plan, plan
    assert plan.count("robometer-train training/default_model.yaml") == 2, plan
