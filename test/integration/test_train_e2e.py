"""End to end on CPU: synthetic episodes -> robometer-train -> robometer-eval -> robometer-export -> bundle
-> robometer-eval and robometer-score on the bundle (dataset and rosbag), with the exported engine agreeing
with the PyTorch checkpoint it came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch
from rosbags.rosbag2 import StoragePlugin, Writer

from robometer_ros.engine.bundle import Bundle
from robometer_ros.monitor import MonitorConfig
from robometer_ros.node_parameters import load_parameters
from robometer_ros.recorder import make_typestore
from robometer_ros.training.data.metaworld import TaskCatalog
from robometer_ros.training.data.store import open_split
from robometer_ros.training.evaluation.calibrate import main as calibrate_main
from robometer_ros.training.evaluation.evaluate import main as eval_main
from robometer_ros.training.evaluation.score import main as score_main
from robometer_ros.training.export.onnx_export import main as export_main
from robometer_ros.training.recipe.trainer import main as train_main
from support.synthetic_squares import COLOURS, instruction_for, make_trajectories, write_square_dataset

RECIPE = Path(__file__).resolve().parents[2] / "training" / "tiny_cpu.yaml"
TASKS = 3


def _metrics(path: Path) -> dict:
    record = json.loads(path.read_text())  # strict JSON: NaN is written as null
    assert {"settings", "metrics", "episodes"} <= record.keys()
    return record


def _write_catalog(path: Path) -> TaskCatalog:
    """A task catalog (the format of robometer_ros/training/data/metaworld_tasks.yaml) for the synthetic squares."""
    lines = ["heldout_tasks: []", "phrasings:"]
    for colour in COLOURS:
        lines += [f"  {colour}:", f"    train: ['{instruction_for(colour)}', 'move the {colour} square right']",
                  f"    heldout: ['could you slide the {colour} square to the right']"]
    path.write_text("\n".join(lines) + "\n")
    return TaskCatalog.load(path)


def _write_bag(path: Path) -> None:
    """One episode of moving-square frames on /camera/image (raw rgb8), with an instruction topic."""
    store = make_typestore()
    types = store.types
    writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    camera = writer.add_connection("/camera/image", "sensor_msgs/msg/Image", typestore=store)
    task = writer.add_connection("/task", "std_msgs/msg/String", typestore=store)
    trajectory = make_trajectories(1, seed=7)[0]
    start = 10**9
    writer.write(task, start, store.serialize_cdr(types["std_msgs/msg/String"](data=trajectory.instruction),
                                                   "std_msgs/msg/String"))
    for i, frame in enumerate(trajectory.frames):
        ns = start + i * 10**8
        stamp = types["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)
        message = types["sensor_msgs/msg/Image"](
            header=types["std_msgs/msg/Header"](stamp=stamp, frame_id="camera"), height=64, width=64,
            encoding="rgb8", is_bigendian=0, step=64 * 3, data=np.ascontiguousarray(frame).reshape(-1),
        )
        writer.write(camera, ns, store.serialize_cdr(message, "sensor_msgs/msg/Image"))
    writer.close()


@pytest.mark.slow
def test_train_eval_export_score(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    data = write_square_dataset(tmp_path / "data", episodes_per_task=6, eval_episodes_per_task=3)
    run = tmp_path / "run"
    catalog = _write_catalog(tmp_path / "tasks.yaml")

    # --- train: a few dozen steps, each pair in one of its task's training wordings, held-out eval hook at
    # step 10, resumable checkpoints
    assert train_main([
        str(RECIPE), f"data.dataset={data}", f"output_dir={run}", "optim.max_steps=20", "optim.lr=3e-3",
        f"data.phrasings={tmp_path / 'tasks.yaml'}",
        "eval.every=10", "eval.max_pairs=6", "checkpoint.every=10", "log.every=5", "log.progress_bar=false",
    ]) == 0
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    train_losses = [r["train/loss"] for r in log if "train/loss" in r]
    assert len(train_losses) == 4 and all(np.isfinite(train_losses))
    assert any("eval/kendall_tau" in r for r in log)
    hook = _metrics(run / "eval" / "step-0000010" / "metrics.json")
    assert hook["settings"]["trajectories"] == TASKS * 3
    for name in ("final", "best"):
        assert (run / name / "model.safetensors").is_file() and (run / name / "tokenizer.json").is_file()
    assert list((run / "tensorboard").iterdir())

    # --- evaluate the PyTorch checkpoint
    assert eval_main([str(run / "final"), "--dataset", str(data), "--split", "val", "--out",
                      str(tmp_path / "eval_torch"), "--max-pairs", "6", "--plots", "3"]) == 0
    table = capsys.readouterr().out
    assert "overall" in table and "VOC" in table and "squares_a" in table and "squares_b" in table
    torch_eval = _metrics(tmp_path / "eval_torch" / "metrics.json")
    overall = torch_eval["metrics"]["overall"]
    assert overall["episodes"] == TASKS * 3 and overall["ranking_tasks"] == TASKS
    assert overall["pairs"] == 12 and "preference_accuracy_different_task" in overall
    assert "failure_f1" in overall and torch_eval["settings"]["failure_rule"]["success_threshold"] == 0.5
    assert len(list((tmp_path / "eval_torch" / "plots").glob("*.png"))) == 3

    # --- export the trained checkpoint, open the bundle
    bundle_dir = tmp_path / "bundle"
    assert export_main([str(run / "final"), str(bundle_dir), "--frame-size", "64x64"]) == 0
    bundle = Bundle.open(bundle_dir)
    assert bundle.manifest.num_frames == 8 and bundle.manifest.frame.height == 64
    # the manifest names what the model was trained on: the catalog's split and the stored instructions
    training = bundle.manifest.extra["training"]
    assert training["step"] == 20 and training["training_data"]["task_catalog"] == catalog.summary()
    assert training["training_data"]["train_instructions"] == sorted({t.instruction for t in open_split(data, "train")})

    # --- the exported engine gives the checkpoint's predictions
    assert eval_main([str(bundle_dir), "--dataset", str(data), "--split", "val", "--out",
                      str(tmp_path / "eval_bundle"), "--max-pairs", "6", "--backend", "onnxruntime"]) == 0
    bundle_eval = _metrics(tmp_path / "eval_bundle" / "metrics.json")
    assert bundle_eval["settings"]["runner"].startswith("onnxruntime")
    for a, b in zip(torch_eval["episodes"], bundle_eval["episodes"], strict=True):
        assert a["episode_id"] == b["episode_id"]
        np.testing.assert_allclose(b["predicted_progress"], a["predicted_progress"], atol=1e-4)
        np.testing.assert_allclose(b["success_probability"], a["success_probability"], atol=1e-4)

    # --- the same episodes in held-out wordings: the model is given them, metrics still group by task
    assert eval_main([str(bundle_dir), "--dataset", str(data), "--split", "val", "--out",
                      str(tmp_path / "eval_heldout"), "--max-pairs", "6", "--backend", "onnxruntime",
                      "--wording", "heldout", "--phrasings", str(tmp_path / "tasks.yaml")]) == 0
    heldout_eval = _metrics(tmp_path / "eval_heldout" / "metrics.json")
    assert heldout_eval["settings"]["wording"] == "heldout"
    assert heldout_eval["metrics"]["overall"]["ranking_tasks"] == TASKS
    assert any(not np.allclose(a["predicted_progress"], b["predicted_progress"], atol=1e-6)
               for a, b in zip(bundle_eval["episodes"], heldout_eval["episodes"]))
    assert eval_main([str(bundle_dir), "--dataset", str(data), "--split", "val", "--out", str(tmp_path / "x"),
                      "--wording", "heldout"]) == 2  # the package's catalog does not know these tasks

    # --- score a dataset with the bundle (parquet) and a bag with the checkpoint (CSV)
    scores = tmp_path / "scores.parquet"
    assert score_main([str(bundle_dir), "--dataset", str(data), "--split", "val", "--out", str(scores),
                       "--frame-rate", "0"]) == 0  # every frame a scoring step
    episodes = pq.read_table(scores).to_pylist()
    frames = pq.read_table(tmp_path / "scores_frames.parquet").to_pylist()
    assert len(episodes) == TASKS * 3
    assert len(frames) == sum(e["n_frames"] for e in episodes) == sum(e["steps"] for e in episodes)
    assert {e["verdict"].split(":")[0] for e in episodes} <= {"succeeded", "failed"}
    for task in {e["instruction"] for e in episodes}:
        assert sorted(e["rank_in_task"] for e in episodes if e["instruction"] == task) == [1, 2, 3]
    assert sorted(e["rank_overall"] for e in episodes) == list(range(1, TASKS * 3 + 1))
    by_id = {e["episode_id"]: e for e in bundle_eval["episodes"]}
    for e in episodes:  # the last step scores the whole episode: the eval's last-frame prediction
        assert e["final_progress"] == pytest.approx(by_id[e["episode_id"]]["predicted_progress"][-1], abs=1e-5)
    assert len(bundle_eval["node_verdicts"]) == TASKS * 3  # the eval replayed every episode through the session

    # --- calibrate the monitor on the labelled episodes: a parameters file the node loads (node test: see
    # test_reward_node_faults.py::test_a_calibration_file_is_loaded_as_it_is), cross-validated figures, cached scores
    calibration = tmp_path / "calibration.yaml"
    assert calibrate_main([str(bundle_dir), "--dataset", str(data), "--split", "train", "--out", str(calibration),
                           "--folds", "2", "--backend", "onnxruntime"]) == 0
    values = load_parameters([calibration])
    assert set(values) == {f"monitor.{name}" for name in MonitorConfig.field_names()}
    report = json.loads((tmp_path / "calibration_report" / "report.json").read_text())
    train_labels = [t.quality_label for t in open_split(data, "train")]
    assert report["episodes"] == len(train_labels) and report["labels"]["failure"] == train_labels.count("failure") > 0
    assert "cross-validated" in calibration.read_text()
    assert calibrate_main(["-", "--scores", str(tmp_path / "calibration_report" / "scores.npz"), "--out",
                           str(tmp_path / "again.yaml"), "--folds", "2"]) == 0  # no model needed
    assert load_parameters([tmp_path / "again.yaml"]) == values

    _write_bag(tmp_path / "bag")
    bag_scores = tmp_path / "bag_scores.csv"
    assert score_main([str(run / "final"), "--bags", str(tmp_path / "bag"), "--image-topic", "/camera/image",
                       "--out", str(bag_scores)]) == 0
    bag_episodes = pcsv.read_csv(bag_scores).to_pylist()
    assert len(bag_episodes) == 1 and bag_episodes[0]["instruction"] == make_trajectories(1, seed=7)[0].instruction
    bag_frames = pcsv.read_csv(tmp_path / "bag_scores_frames.csv").to_pylist()
    # the node's default 5 Hz admission of the 10 Hz bag: every other frame, and the last one at the end
    n = bag_episodes[0]["n_frames"]
    assert [f["frame_index"] for f in bag_frames] == sorted(set(range(0, n, 2)) | {n - 1})
