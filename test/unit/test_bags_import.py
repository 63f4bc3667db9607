"""The rosbag2 importer on small bags written here: MCAP and sqlite3, raw and compressed images,
episode ids and time gaps, labels, subsampling, and broken input (counted or named, never dropped)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from rosbags.rosbag2 import StoragePlugin, Writer

from robometer_ros.recorder import EpisodeRecorder, RecordTopics, make_typestore
from robometer_ros.training.data.bags import (
    BagImportError,
    BagImportOptions,
    ImportReport,
    find_bags,
    import_bags,
    read_bag,
    read_bags,
)
from robometer_ros.training.data.dataset_cli import main as dataset_main
from robometer_ros.training.data.store import Dataset, DatasetWriter, open_split
from robometer_ros.training.evaluation.evaluate import resolve_split

TS = make_typestore()
T = TS.types
NS = 1_000_000_000


def _time(ns: int):
    return T["builtin_interfaces/msg/Time"](sec=ns // NS, nanosec=ns % NS)


def _header(ns: int):
    return T["std_msgs/msg/Header"](stamp=_time(ns), frame_id="camera")


def _frame(value: int, height: int = 6, width: int = 8) -> np.ndarray:
    """An RGB frame whose pixels say which frame it is: R = value, G = column, B = 200."""
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    frame[..., 0] = value
    frame[..., 1] = np.arange(width)[None, :]
    frame[..., 2] = 200
    return frame


def _raw_image(rgb: np.ndarray, ns: int, encoding: str = "rgb8"):
    if encoding == "rgb8":
        pixels = rgb
    elif encoding == "bgr8":
        pixels = rgb[..., ::-1]
    elif encoding == "rgba8":
        pixels = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=2)
    elif encoding == "bgra8":
        pixels = np.concatenate([rgb[..., ::-1], np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=2)
    elif encoding == "mono8":
        pixels = rgb[..., :1]
    else:
        raise ValueError(encoding)
    pixels = np.ascontiguousarray(pixels)
    height, width, channels = pixels.shape
    return T["sensor_msgs/msg/Image"](
        header=_header(ns), height=height, width=width, encoding=encoding, is_bigendian=0,
        step=width * channels, data=pixels.reshape(-1),
    )


def _compressed_image(rgb: np.ndarray, ns: int, kind: str = "png"):
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="PNG" if kind == "png" else "JPEG", quality=95)
    return T["sensor_msgs/msg/CompressedImage"](
        header=_header(ns), format=kind, data=np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    )


def _status(episode_id: str, ns: int, state: int, outcome: int = 0, start_ns: int = 0, instruction: str = ""):
    return T["robometer_ros/msg/EpisodeStatus"](
        header=_header(ns), episode_id=episode_id, instruction=instruction, start_stamp=_time(start_ns),
        state=state, outcome=outcome, steps=0, frames=0, progress=0.0, success_probability=0.0,
    )


def _step_reward(episode_id: str, ns: int, frame_ns: list[int], instruction: str):
    count = len(frame_ns)
    return T["robometer_ros/msg/StepReward"](
        header=_header(ns), episode_id=episode_id, step=0, instruction=instruction, progress=0.5,
        success_probability=0.1, reward_mode=0, reward=0.5, frame_stamps=[_time(t) for t in frame_ns],
        frame_progress=np.zeros(count, np.float32), frame_success_probability=np.zeros(count, np.float32),
        frames_in_episode=count, model_id="test@1", backend="torch:cpu", inference_time=0.01,
    )


class BagBuilder:
    """Writes (topic, message, bag time) triples into a rosbag2 bag of either storage."""

    def __init__(self, path: Path, storage: str = "mcap") -> None:
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self.writer = Writer(path, version=9, storage_plugin=plugin)
        self.writer.open()
        self.connections: dict[str, object] = {}

    def add(self, topic: str, message, ns: int) -> None:
        if topic not in self.connections:
            self.connections[topic] = self.writer.add_connection(topic, message.__msgtype__, typestore=TS)
        self.writer.write(self.connections[topic], ns, TS.serialize_cdr(message, message.__msgtype__))

    def close(self) -> None:
        self.writer.close()


def _node_bag(path: Path, storage: str = "mcap") -> None:
    """Two node episodes: ep-a frames 1.0..1.9 s (success), ep-b 5.0..5.5 s (failure), and stray frames
    at 3.0 s and 3.1 s between them (after ep-a ended, before ep-b started)."""
    bag = BagBuilder(path, storage)
    bag.add("/instruction", T["std_msgs/msg/String"](data="open the drawer"), 1 * NS)
    a = [NS + i * NS // 10 for i in range(10)]
    b = [5 * NS + i * NS // 10 for i in range(6)]
    bag.add("/reward_node/episode", _status("ep-a", a[0], 0, start_ns=a[0]), a[0])
    for i, t in enumerate(a):
        bag.add("/camera/image", _raw_image(_frame(i), t), t)
        if i % 3 == 2:
            bag.add("/reward_node/step_reward", _step_reward("ep-a", t, [a[0], t], "open the drawer"), t)
    bag.add("/reward_node/episode", _status("ep-a", a[-1], 4, outcome=1, start_ns=a[0]), a[-1] + 1000)
    for t in (3 * NS, 3 * NS + NS // 10):
        bag.add("/camera/image", _raw_image(_frame(99), t), t)
    bag.add("/instruction", T["std_msgs/msg/String"](data="close the drawer"), 4 * NS)
    bag.add("/reward_node/episode", _status("ep-b", b[0], 1, start_ns=b[0], instruction="close the drawer"), b[0])
    for i, t in enumerate(b):
        bag.add("/camera/image", _raw_image(_frame(50 + i), t), t)
    bag.add("/reward_node/episode", _status("ep-b", b[-1], 4, outcome=2, start_ns=b[0]), b[-1] + 1000)
    bag.close()


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_node_bag_split_by_episode_ids(tmp_path: Path, storage: str) -> None:
    _node_bag(tmp_path / "bag", storage)
    report = ImportReport()
    trajectories = list(read_bag(tmp_path / "bag", BagImportOptions(), report))
    assert [t.episode_id for t in trajectories] == ["ep-a", "ep-b"]
    first, second = trajectories
    assert first.instruction == "open the drawer" and second.instruction == "close the drawer"
    assert first.quality_label == "successful" and second.quality_label == "failure"
    assert len(first) == 10 and len(second) == 6
    np.testing.assert_array_equal(first.frames[3], _frame(3))  # rgb8 bytes come through exactly
    np.testing.assert_allclose(first.frame_stamps, 1.0 + np.arange(10) / 10)
    assert first.metadata["episode_split"] == "episode_id" and first.metadata["image_topic"] == "/camera/image"
    assert "split" not in first.metadata  # no train / val split until `robometer-dataset split`
    assert report.frames_skipped["outside_episodes"] == 2  # the stray frames are counted, not lost
    assert report.episodes_written == 2 and report.frames_written == 16 and report.bags_read == 1
    assert report.labels == {"successful": 1, "failure": 1}


def test_generic_bag_split_by_gaps_with_compressed_frames(tmp_path: Path) -> None:
    bag = BagBuilder(tmp_path / "bag", "sqlite3")
    bag.add("/task", T["std_msgs/msg/String"](data="stack the cups"), 0)
    stamps = [NS * 10 + i * NS // 5 for i in range(5)] + [NS * 20 + i * NS // 5 for i in range(4)]
    for i, t in enumerate(stamps):
        bag.add("/cam/compressed", _compressed_image(_frame(10 * i), t, "png" if i % 2 else "jpeg"), t)
    bag.close()
    report = ImportReport()
    trajectories = list(read_bag(tmp_path / "bag", BagImportOptions(unknown_label="suboptimal"), report))
    assert [len(t) for t in trajectories] == [5, 4]  # the 9.2 s gap splits them (gap 2 s)
    assert all(t.instruction == "stack the cups" and t.quality_label == "suboptimal" for t in trajectories)
    assert trajectories[0].episode_id == "bag-0000" and trajectories[1].episode_id == "bag-0001"
    np.testing.assert_array_equal(trajectories[0].frames[1], _frame(10))  # png: lossless
    assert np.abs(trajectories[0].frames[0].astype(int) - _frame(0)).mean() < 4  # jpeg: close
    assert trajectories[0].metadata["label_source"] == "default"
    # one episode per bag, a fixed instruction, and unlabelled episodes skipped
    fixed = list(read_bag(tmp_path / "bag", BagImportOptions(split="none", instruction="wipe")))
    assert len(fixed) == 1 and len(fixed[0]) == 9 and fixed[0].instruction == "wipe"
    skipping = ImportReport()
    assert list(read_bag(tmp_path / "bag", BagImportOptions(unknown_label="skip"), skipping)) == []
    assert skipping.episodes_skipped == {"no_outcome": 2} and skipping.frames_skipped["episode_no_outcome"] == 9


def test_instruction_changes_split_episodes_in_gap_mode(tmp_path: Path) -> None:
    bag = BagBuilder(tmp_path / "bag")
    bag.add("/instruction", T["std_msgs/msg/String"](data="pick"), 0)
    for i in range(8):
        if i == 4:
            bag.add("/instruction", T["std_msgs/msg/String"](data="place"), NS + i * NS // 10 - 1)
        bag.add("/image", _raw_image(_frame(i), NS + i * NS // 10), NS + i * NS // 10)
    bag.close()
    trajectories = list(read_bag(tmp_path / "bag"))
    assert [(t.instruction, len(t)) for t in trajectories] == [("pick", 4), ("place", 4)]
    merged = list(read_bag(tmp_path / "bag", BagImportOptions(split_on_instruction=False)))
    assert [(t.instruction, len(t)) for t in merged] == [("pick", 8)]


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_raw_encodings_become_rgb(tmp_path: Path, encoding: str) -> None:
    bag = BagBuilder(tmp_path / "bag")
    frames = [_frame(30 * i) for i in range(3)]
    for i, frame in enumerate(frames):
        bag.add("/image", _raw_image(frame, NS * (i + 1), encoding), NS * (i + 1))
    bag.close()
    (trajectory,) = read_bag(tmp_path / "bag", BagImportOptions(instruction="look"))
    for got, frame in zip(trajectory.frames, frames):
        expected = np.repeat(frame[..., :1], 3, axis=2) if encoding == "mono8" else frame
        np.testing.assert_array_equal(got, expected)


def test_frame_rate_and_max_frames_subsampling(tmp_path: Path) -> None:
    bag = BagBuilder(tmp_path / "bag")
    for i in range(30):  # 30 Hz for one second
        t = NS + i * NS // 30
        bag.add("/image", _raw_image(_frame(i), t), t)
    bag.close()
    report = ImportReport()
    (every_third,) = read_bag(tmp_path / "bag", BagImportOptions(instruction="x", max_fps=10), report)
    assert every_third.frames[:, 0, 0, 0].tolist() == list(range(0, 30, 3))
    assert report.frames_skipped["subsampled"] == 20 and every_third.metadata["source_frames"] == 30
    (eight,) = read_bag(tmp_path / "bag", BagImportOptions(instruction="x", max_frames=8))
    assert eight.frames[:, 0, 0, 0].tolist() == [0, 4, 8, 12, 17, 21, 25, 29]  # first and last kept
    (small,) = read_bag(tmp_path / "bag", BagImportOptions(instruction="x", max_frames=3, shortest_edge=12))
    assert small.frames.shape == (3, 12, 16, 3)


def test_undecodable_frames_and_short_episodes_are_counted(tmp_path: Path) -> None:
    bag = BagBuilder(tmp_path / "bag")
    for i in range(6):
        t = NS + i * NS // 10
        if i in (2, 4):
            message = T["sensor_msgs/msg/CompressedImage"](
                header=_header(t), format="jpeg", data=np.frombuffer(b"not a jpeg at all", dtype=np.uint8)
            )
        else:
            message = _compressed_image(_frame(i), t)
        bag.add("/image", message, t)
    for i in range(2):  # a second, too-short episode after a gap
        t = 10 * NS + i * NS // 10
        bag.add("/image", _compressed_image(_frame(i), t), t)
    bag.close()
    report = ImportReport()
    (trajectory,) = read_bag(tmp_path / "bag", BagImportOptions(instruction="x"), report)
    assert trajectory.frames[:, 0, 0, 0].tolist() == [0, 1, 3, 5]
    assert report.frames_skipped["undecodable_decode_failed"] == 2
    assert report.episodes_skipped == {"too_short": 1} and report.frames_skipped["episode_too_short"] == 2
    assert any("frame 2" in note for note in report.notes)


def test_empty_episode_and_missing_instruction_are_counted(tmp_path: Path) -> None:
    bag = BagBuilder(tmp_path / "bag")
    bag.add("/reward_node/episode", _status("ep-empty", NS, 4, outcome=1, start_ns=NS), NS)
    bag.add("/reward_node/episode", _status("ep-full", 2 * NS, 1, start_ns=2 * NS), 2 * NS)
    for i in range(4):
        t = 2 * NS + i * NS // 10
        bag.add("/image", _raw_image(_frame(i), t), t)
    bag.close()
    report = ImportReport()
    assert list(read_bag(tmp_path / "bag", report=report)) == []  # no instruction anywhere
    assert report.episodes_skipped == {"empty": 1, "no_instruction": 1}
    assert any("no instruction" in note and "/image" in note for note in report.notes)
    report = ImportReport()
    (trajectory,) = read_bag(tmp_path / "bag", BagImportOptions(instruction="x"), report)
    assert trajectory.episode_id == "ep-full" and trajectory.quality_label == "unknown"  # no outcome reported
    assert report.episodes_skipped == {"empty": 1}


def test_missing_topics_and_corrupt_bags_are_named(tmp_path: Path) -> None:
    bag = BagBuilder(tmp_path / "no_images")
    bag.add("/instruction", T["std_msgs/msg/String"](data="x"), NS)
    bag.close()
    with pytest.raises(BagImportError, match=r"no image topic; the bag has: /instruction \[std_msgs/msg/String\]"):
        list(read_bag(tmp_path / "no_images"))
    _node_bag(tmp_path / "node")
    with pytest.raises(BagImportError, match=r"no image topic '/wrong'.*/camera/image"):
        list(read_bag(tmp_path / "node", BagImportOptions(image_topic="/wrong")))
    with pytest.raises(BagImportError, match="not a image topic"):
        list(read_bag(tmp_path / "node", BagImportOptions(image_topic="/instruction")))

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.yaml").write_text("rosbag2_bagfile_information: {version: 9, storage_identifier: mcap}\n")
    with pytest.raises(BagImportError, match="broken: cannot open bag"):
        list(read_bag(broken))
    garbage = tmp_path / "garbage.mcap"
    garbage.write_bytes(b"\x89MCAP0\r\n" + b"\x00" * 64)
    with pytest.raises(BagImportError, match=r"garbage\.mcap: cut short.*robometer-dataset repair"):
        list(read_bag(garbage))
    # truncating the storage file of a good bag
    _node_bag(tmp_path / "truncated")
    (storage_file,) = (tmp_path / "truncated").glob("*.mcap")
    storage_file.write_bytes(storage_file.read_bytes()[: storage_file.stat().st_size // 2])
    with pytest.raises(BagImportError, match="truncated"):
        list(read_bag(tmp_path / "truncated"))


def test_folder_of_bags_keeps_going_and_reports_failures(tmp_path: Path) -> None:
    folder = tmp_path / "bags"
    _node_bag(folder / "day1" / "run1")
    _node_bag(folder / "day1" / "run2", "sqlite3")  # same episode ids: made unique
    (folder / "day2").mkdir(parents=True)
    (folder / "day2" / "bad.mcap").write_bytes(b"nope")
    assert [p.relative_to(folder).as_posix() for p in find_bags(folder)] == [
        "day1/run1", "day1/run2", "day2/bad.mcap",
    ]
    report = ImportReport()
    ids = [t.episode_id for t in read_bags(folder, report=report)]
    assert ids == ["ep-a", "ep-b", "ep-a@run2", "ep-b@run2"]
    assert report.bags_read == 2 and len(report.bags_failed) == 1 and not report.ok
    assert "bad.mcap" in report.bags_failed[0][0] and "bad.mcap" in report.format()
    with pytest.raises(BagImportError, match=r"bad\.mcap"):
        list(read_bags(folder, strict=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BagImportError, match="no rosbag2 directories"):
        find_bags(tmp_path / "empty")
    with pytest.raises(BagImportError, match="no such file"):
        find_bags(tmp_path / "missing")


def test_ros1_bag(tmp_path: Path) -> None:
    from rosbags.rosbag1 import Writer as Ros1Writer
    from rosbags.typesys import Stores, get_typestore

    ros1 = get_typestore(Stores.ROS1_NOETIC)
    types = ros1.types
    with Ros1Writer(tmp_path / "old.bag") as writer:
        task = writer.add_connection("/task", "std_msgs/msg/String", typestore=ros1)
        camera = writer.add_connection("/cam", "sensor_msgs/msg/Image", typestore=ros1)
        writer.write(task, 1, ros1.serialize_ros1(types["std_msgs/msg/String"](data="pick"), "std_msgs/msg/String"))
        for i in range(4):
            t = NS + i * NS // 10
            stamp = types["builtin_interfaces/msg/Time"](sec=t // NS, nanosec=t % NS)
            header = types["std_msgs/msg/Header"](seq=i, stamp=stamp, frame_id="c")
            pixels = _frame(i)
            image = types["sensor_msgs/msg/Image"](header=header, height=6, width=8, encoding="rgb8",
                                                   is_bigendian=0, step=24, data=pixels.reshape(-1))
            writer.write(camera, t, ros1.serialize_ros1(image, "sensor_msgs/msg/Image"))
    report = ImportReport()
    (trajectory,) = read_bag(tmp_path / "old.bag", report=report)
    assert trajectory.instruction == "pick" and len(trajectory) == 4
    np.testing.assert_array_equal(trajectory.frames[2], _frame(2))
    assert report.frames_skipped == {}


def test_recorder_bags_import_with_their_label(tmp_path: Path) -> None:
    topics = RecordTopics(image="/cam")
    recorder = EpisodeRecorder(tmp_path / "episodes", storage="mcap", topics=topics)
    recorder.start_episode("run-7", "fold the towel")
    for i in range(5):
        recorder.record_image(_raw_image(_frame(i), NS + i * NS // 10))
    recorder.end_episode(outcome=2, note="dropped it", verdict="failed:STALLED")
    recorder.start_episode("run-8", "fold the towel")
    for i in range(4):
        recorder.record_image(_raw_image(_frame(i), 9 * NS + i * NS // 10))
    recorder.end_episode(outcome=1)
    status = recorder.close()
    assert status.ok, status
    report = ImportReport()
    trajectories = {t.episode_id: t for t in read_bags(tmp_path / "episodes", report=report)}
    assert set(trajectories) == {"run-7", "run-8"}
    assert trajectories["run-7"].quality_label == "failure" and len(trajectories["run-7"]) == 5
    assert trajectories["run-8"].quality_label == "successful" and len(trajectories["run-8"]) == 4
    assert trajectories["run-7"].instruction == "fold the towel"
    assert report.ok and not report.frames_skipped.get("outside_episodes")


def test_import_into_dataset_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _node_bag(tmp_path / "bag")
    with DatasetWriter(tmp_path / "ds") as writer:
        report = import_bags(tmp_path / "bag", writer, BagImportOptions(data_source="lab", embodiment="so101"))
    dataset = Dataset(tmp_path / "ds")
    assert len(dataset) == report.episodes_written == 2
    assert dataset.metas[1].data_source == "lab" and dataset.metas[1].embodiment == "so101"
    # robometer-eval's default split on imported data: every episode (there is no val split yet), then val
    # once `robometer-dataset split` made one
    assert resolve_split(tmp_path / "ds", "auto") is None and len(open_split(tmp_path / "ds", None)) == 2
    assert dataset_main(["split", str(tmp_path / "ds"), "--val-fraction", "0.5", "--by", "task"]) == 0
    assert resolve_split(tmp_path / "ds", "auto") == "val" and len(open_split(tmp_path / "ds", "val")) == 1

    code = dataset_main([
        "from-bags", str(tmp_path / "bag"), "--out", str(tmp_path / "cli"), "--max-frames", "4",
        "--data-source", "lab", "--report-json", str(tmp_path / "report.json"),
    ])
    assert code == 0
    assert [m.n_frames for m in Dataset(tmp_path / "cli").metas] == [4, 4]
    assert json.loads((tmp_path / "report.json").read_text())["episodes_written"] == 2
    assert "episodes written: 2" in capsys.readouterr().out
    assert dataset_main(["info", str(tmp_path / "cli")]) == 0
    assert '"episodes": 2' in capsys.readouterr().out
    (tmp_path / "bad.mcap").write_bytes(b"nope")
    assert dataset_main(["from-bags", str(tmp_path / "bad.mcap"), "--out", str(tmp_path / "cli2")]) == 1
    assert "bad.mcap" in capsys.readouterr().out
