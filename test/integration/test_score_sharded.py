"""robometer-score under torchrun (2 CPU ranks, gloo): each rank scores a slice of the episodes and rank 0 writes
one merged output equal to the single-process run's, for a dataset and for a fleet of bags whose episode ids
collide across robots (the ids are made unique in single-process order, across ranks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.csv as pcsv
import pytest

from support.synthetic_squares import write_square_dataset

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "default"
FLOAT_COLUMNS = {"final_progress", "final_success_probability", "max_progress", "mean_progress",
                 "max_success_probability", "percentile_overall", "progress", "success_probability", "reward"}


def _score(out: Path, *source: str, ranks: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'test'}"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--standalone"]
                if ranks else [sys.executable])
    command = [*launcher, "-m", "robometer_ros.training.evaluation.score", str(BUNDLE), *source,
               "--backend", "onnxruntime", "--frame-rate", "2", "--out", str(out)]  # the 10 Hz squares: every 5th frame
    # a timeout here means the gather deadlocked
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _rows(path: Path) -> list[dict]:
    return pcsv.read_csv(path).to_pylist()


def _assert_same_tables(single: Path, sharded: Path) -> None:
    for suffix in ("", "_frames"):
        a = _rows(single.with_name(f"{single.stem}{suffix}.csv"))
        b = _rows(sharded.with_name(f"{sharded.stem}{suffix}.csv"))
        assert len(a) == len(b) > 0
        for row_a, row_b in zip(a, b):
            assert row_a.keys() == row_b.keys()
            for key in row_a:
                if key in FLOAT_COLUMNS:
                    assert row_b[key] == pytest.approx(row_a[key], abs=1e-6), (key, row_a, row_b)
                else:
                    assert row_b[key] == row_a[key], (key, row_a, row_b)


@pytest.mark.slow
def test_sharded_dataset_scores_equal_the_single_process_run(tmp_path: Path) -> None:
    data = write_square_dataset(tmp_path / "squares", episodes_per_task=2, eval_episodes_per_task=1)
    _score(tmp_path / "single.csv", "--dataset", str(data / "train"))
    result = _score(tmp_path / "sharded.csv", "--dataset", str(data / "train"), ranks=2)
    assert "[rank 1/2] scored 3 episodes; rank 0 writes" in result.stderr
    assert not (tmp_path / "sharded_rank1.csv").exists() and len(list(tmp_path.glob("sharded*.csv"))) == 2
    _assert_same_tables(tmp_path / "single.csv", tmp_path / "sharded.csv")


@pytest.mark.slow
def test_sharded_bags_with_colliding_episode_ids(tmp_path: Path) -> None:
    # three robots recorded a bag of the same name: the same episode id three times; units = bags, and
    # robot_b's bag (unit 1) is scored on rank 1, robot_a's and robot_c's on rank 0
    fleet = tmp_path / "fleet"
    for robot, demo_bag in (("robot_a", "01_door-open_successful"), ("robot_b", "03_drawer-open_failure"),
                            ("robot_c", "04_window-close_successful")):
        source = REPO / "demo_bags" / demo_bag
        target = fleet / robot / "episode"
        shutil.copytree(source, target)
        (target / f"{demo_bag}.mcap").rename(target / "episode.mcap")
        metadata = target / "metadata.yaml"
        metadata.write_text(metadata.read_text().replace(f"{demo_bag}.mcap", "episode.mcap"))
    _score(tmp_path / "single.csv", "--bags", str(fleet))
    _score(tmp_path / "sharded.csv", "--bags", str(fleet), ranks=2)
    ids = [row["episode_id"] for row in _rows(tmp_path / "sharded.csv")]
    assert ids == ["episode-0000", "episode-0000@episode", "episode-0000@episode#2"]
    _assert_same_tables(tmp_path / "single.csv", tmp_path / "sharded.csv")
