"""EpisodeRecorder: bags that read back (rosbags, and rclpy where importable), error states, episode isolation."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rosbags.rosbag2 import Reader

from robometer_ros import recorder as recorder_module
from robometer_ros.recorder import (
    LABEL_DROPPED,
    LABEL_EPISODE_ID,
    LABEL_INSTRUCTION,
    LABEL_NOTE,
    LABEL_OUTCOME,
    LABEL_VERDICT,
    EpisodeRecorder,
    RecordTopics,
    make_typestore,
    read_episode_label,
)

TOPICS = RecordTopics(
    image="/cam/image_raw",
    instruction="/task",
    step_reward="/rn/step_reward",
    failure_flag="/rn/failure_flag",
    episode_status="/rn/episode",
)
T0 = 1_700_000_000_000_000_000
STEP_NS = 100_000_000
HAS_RCLPY = importlib.util.find_spec("rclpy") is not None

TS = make_typestore()
T = TS.types


def stamp(ns: int) -> Any:
    return T["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)


def header(ns: int) -> Any:
    return T["std_msgs/msg/Header"](stamp=stamp(ns), frame_id="camera_optical")


def image(ns: int, value: int) -> Any:
    data = np.full(4 * 6 * 3, value, dtype=np.uint8)
    return T["sensor_msgs/msg/Image"](
        header=header(ns), height=4, width=6, encoding="rgb8", is_bigendian=0, step=18, data=data
    )


def step_reward(ns: int, step: int, progress: float) -> Any:
    return T["robometer_ros/msg/StepReward"](
        header=header(ns),
        episode_id="ep1",
        step=step,
        instruction="open the drawer",
        progress=progress,
        success_probability=0.1,
        reward_mode=0,
        reward=progress,
        frame_stamps=[stamp(T0), stamp(ns)],
        frame_progress=np.array([0.0, progress], dtype=np.float32),
        frame_success_probability=np.array([0.0, 0.1], dtype=np.float32),
        frames_in_episode=step + 1,
        model_id="tiny@1",
        backend="onnxruntime:cpu",
        inference_time=0.01,
    )


def failure_flag(ns: int) -> Any:
    return T["robometer_ros/msg/FailureFlag"](
        header=header(ns),
        episode_id="ep1",
        failed=True,
        reason=1,
        confidence=0.8,
        severity=1,
        progress=0.3,
        max_progress=0.3,
        detail="stalled",
    )


def read_bag(path: Path) -> tuple[dict[str, list[tuple[int, Any]]], dict[str, str]]:
    """topic -> [(bag timestamp, deserialized message)], and topic -> msgtype."""
    out: dict[str, list[tuple[int, Any]]] = {}
    types: dict[str, str] = {}
    with Reader(path) as reader:
        for conn, t, raw in reader.messages():
            out.setdefault(conn.topic, []).append((t, TS.deserialize_cdr(raw, conn.msgtype)))
            types[conn.topic] = conn.msgtype
    return out, types


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_episode_reads_back_with_types_counts_stamps_and_label(tmp_path: Path, storage: str) -> None:
    rec = EpisodeRecorder(tmp_path, storage=storage, topics=TOPICS)
    rec.start_episode("ep1", "open the drawer")
    for i in range(5):
        rec.record_image(image(T0 + i * STEP_NS, i))
        if i >= 1:
            rec.record_step_reward(step_reward(T0 + i * STEP_NS, i - 1, 0.1 * i))
    rec.record_failure_flag(failure_flag(T0 + 4 * STEP_NS))
    rec.end_episode(outcome=2, note="dropped the handle", verdict="failed:STALLED")
    status = rec.close()
    assert status.ok and status.episodes_started == 1 and status.episodes_closed == 1
    assert status.messages_written == 1 + 5 + 4 + 1 + 1 and status.dropped == 0

    bag = tmp_path / "ep1"
    assert (bag / "metadata.yaml").is_file()
    assert list(bag.glob("*.mcap" if storage == "mcap" else "*.db3"))
    msgs, types = read_bag(bag)
    assert types == {
        "/task": "std_msgs/msg/String",
        "/cam/image_raw": "sensor_msgs/msg/Image",
        "/rn/step_reward": "robometer_ros/msg/StepReward",
        "/rn/failure_flag": "robometer_ros/msg/FailureFlag",
        "/rn/episode": "robometer_ros/msg/EpisodeStatus",
    }
    assert [m.data for _, m in msgs["/task"]] == ["open the drawer"]
    assert msgs["/task"][0][0] == T0  # header-less: written at the episode's first camera stamp
    images = msgs["/cam/image_raw"]
    assert [t for t, _ in images] == [T0 + i * STEP_NS for i in range(5)]
    assert [int(m.data[0]) for _, m in images] == list(range(5))
    assert images[2][1].encoding == "rgb8" and images[2][1].header.frame_id == "camera_optical"
    rewards = msgs["/rn/step_reward"]
    assert [m.step for _, m in rewards] == [0, 1, 2, 3]
    assert [t for t, _ in rewards] == [T0 + i * STEP_NS for i in range(1, 5)]
    assert rewards[-1][1].frame_progress.tolist() == pytest.approx([0.0, 0.4])
    assert rewards[-1][1].backend == "onnxruntime:cpu"
    assert msgs["/rn/failure_flag"][0][1].reason == 1
    (end_t, end_status), = msgs["/rn/episode"]
    assert end_t == T0 + 4 * STEP_NS
    assert (end_status.state, end_status.outcome, end_status.episode_id) == (4, 2, "ep1")
    assert end_status.start_stamp.sec == T0 // 10**9

    label = read_episode_label(bag)
    assert label[LABEL_EPISODE_ID] == "ep1" and label[LABEL_INSTRUCTION] == "open the drawer"
    assert label[LABEL_OUTCOME] == "failure" and label[LABEL_NOTE] == "dropped the handle"
    assert label[LABEL_VERDICT] == "failed:STALLED" and label[LABEL_DROPPED] == "0"
    with Reader(bag) as reader:
        assert reader.message_count == 12
        assert reader.start_time == T0


def test_latched_topics_carry_transient_local_qos(tmp_path: Path) -> None:
    import yaml

    with EpisodeRecorder(tmp_path, topics=TOPICS) as rec:
        rec.start_episode("ep", "x")
        rec.record_image(image(T0, 0))
        rec.record_failure_flag(failure_flag(T0))
        rec.end_episode()
    info = yaml.safe_load((tmp_path / "ep" / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert info["version"] == 9
    topics = [t["topic_metadata"] for t in info["topics_with_message_count"]]
    qos = {t["name"]: t["offered_qos_profiles"] for t in topics}
    assert qos["/rn/failure_flag"][0]["durability"] == "transient_local"
    assert qos["/rn/failure_flag"][0]["reliability"] == "reliable"
    assert qos["/cam/image_raw"] == []


def test_two_episodes_give_two_bags_and_ids_are_never_overwritten(tmp_path: Path) -> None:
    with EpisodeRecorder(tmp_path, topics=TOPICS) as rec:
        for episode in ("a/1", "b"):
            rec.start_episode(episode, f"task {episode}")
            for i in range(3):
                rec.record_image(image(T0 + i * STEP_NS, i))
            rec.end_episode(outcome=1)
        rec.start_episode("b", "again")  # same id: a new directory, the first bag stays intact
        rec.record_image(image(T0, 9))
        # not ended: close() closes it with outcome unknown
    bags = sorted(p.name for p in tmp_path.iterdir())
    assert bags == ["a_1", "b", "b_1"]
    for name, n_images in (("a_1", 3), ("b", 3), ("b_1", 1)):
        msgs, _ = read_bag(tmp_path / name)
        assert len(msgs["/cam/image_raw"]) == n_images
    assert read_episode_label(tmp_path / "a_1")[LABEL_EPISODE_ID] == "a/1"
    assert read_episode_label(tmp_path / "b")[LABEL_OUTCOME] == "success"
    assert read_episode_label(tmp_path / "b_1")[LABEL_OUTCOME] == "unknown"


def test_unwritable_directory_is_an_error_status_not_an_exception(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rec = EpisodeRecorder(blocker / "bags", topics=TOPICS)
    rec.start_episode("ep", "x")
    rec.record_image(image(T0, 0))
    rec.end_episode()
    assert rec.flush(10.0)
    status = rec.status()
    assert not status.ok and status.errors == 1
    assert "cannot open bag" in status.message and "bags" in status.last_error
    assert status.dropped_not_written == 1 and status.episodes_closed == 0
    rec.close()


def test_write_failure_in_one_episode_leaves_the_previous_bag_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rosbags.rosbag2 import Writer

    rec = EpisodeRecorder(tmp_path, topics=TOPICS)
    rec.start_episode("good", "x")
    for i in range(3):
        rec.record_image(image(T0 + i * STEP_NS, i))
    rec.end_episode(outcome=1)
    assert rec.flush(10.0)

    real_write = Writer.write
    calls = {"n": 0}

    def failing_write(self: Any, connection: Any, timestamp: int, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(28, "No space left on device")
        real_write(self, connection, timestamp, data)

    monkeypatch.setattr(Writer, "write", failing_write)
    rec.start_episode("bad", "x")
    for i in range(5):
        rec.record_image(image(T0 + i * STEP_NS, i))
    rec.end_episode(outcome=2)
    assert rec.flush(10.0)
    status = rec.status()
    assert not status.ok and "No space left on device" in status.last_error
    assert status.dropped_not_written >= 3

    monkeypatch.setattr(Writer, "write", real_write)
    rec.start_episode("recovered", "x")
    rec.record_image(image(T0, 7))
    rec.end_episode()
    status = rec.close()
    assert status.ok and status.errors == 1  # a new episode writes again; the error stays counted

    msgs, _ = read_bag(tmp_path / "good")
    assert len(msgs["/cam/image_raw"]) == 3
    assert read_episode_label(tmp_path / "good")[LABEL_OUTCOME] == "success"
    # what the failed episode wrote before the failure is still readable
    partial, _ = read_bag(tmp_path / "bad")
    assert sum(len(v) for v in partial.values()) == 2
    # the label marks it incomplete (drops known when it was closed at the failure)
    assert int(read_episode_label(tmp_path / "bad")[LABEL_DROPPED]) >= 1
    assert len(read_bag(tmp_path / "recovered")[0]["/cam/image_raw"]) == 1


def test_full_queue_drops_and_counts_but_never_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    gate = threading.Event()
    real_open = recorder_module.EpisodeRecorder._open

    def slow_open(self: Any, episode_id: str, instruction: str) -> Any:
        gate.wait(10.0)  # the writer thread is stuck (slow disk) until the test lets it go
        return real_open(self, episode_id, instruction)

    monkeypatch.setattr(recorder_module.EpisodeRecorder, "_open", slow_open)
    rec = EpisodeRecorder(tmp_path, topics=TOPICS, max_queue=4)
    rec.start_episode("ep", "x")
    for i in range(10):
        rec.record_image(image(T0 + i * STEP_NS, i))
    rec.end_episode()  # control commands are never dropped
    assert rec.status().dropped_queue_full == 6
    assert rec.status().queued == 4
    gate.set()
    status = rec.close()
    assert status.ok and status.episodes_closed == 1
    msgs, _ = read_bag(tmp_path / "ep")
    assert len(msgs["/cam/image_raw"]) == 4


def test_queue_is_bounded_in_bytes_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    gate = threading.Event()
    real_open = recorder_module.EpisodeRecorder._open

    def slow_open(self: Any, episode_id: str, instruction: str) -> Any:
        gate.wait(10.0)
        return real_open(self, episode_id, instruction)

    monkeypatch.setattr(recorder_module.EpisodeRecorder, "_open", slow_open)
    # each test image carries 72 bytes of pixel data: 200 bytes hold two of them
    rec = EpisodeRecorder(tmp_path, topics=TOPICS, max_queue=100, max_queue_bytes=200)
    rec.start_episode("ep", "x")
    for i in range(5):
        rec.record_image(image(T0 + i * STEP_NS, i))
    rec.record_step_reward(step_reward(T0, 0, 0.1))  # no payload: still fits
    assert rec.status().dropped_queue_full == 3 and rec.status().queued == 3
    gate.set()
    status = rec.close()
    assert status.ok
    msgs, _ = read_bag(tmp_path / "ep")
    assert len(msgs["/cam/image_raw"]) == 2 and len(msgs["/rn/step_reward"]) == 1


def test_messages_outside_an_episode_and_after_close_are_counted(tmp_path: Path) -> None:
    rec = EpisodeRecorder(tmp_path, topics=TOPICS)
    rec.record_image(image(T0, 0))
    rec.close()
    rec.record_image(image(T0, 1))
    assert rec.status().dropped_not_written == 2
    assert list(tmp_path.iterdir()) == []


def test_serialized_input_and_unknown_types(tmp_path: Path) -> None:
    raw = bytes(TS.serialize_cdr(image(T0, 3), "sensor_msgs/msg/Image"))
    with EpisodeRecorder(tmp_path, topics=TOPICS) as rec:
        rec.start_episode("ep", "x")
        rec.record_serialized("/cam/image_raw", "sensor_msgs/msg/Image", raw, T0)
        rec.record_serialized("/other", "my_pkg/msg/Unknown", b"\x00\x01\x00\x00", T0)
        rec.end_episode()
    status = rec.status()
    assert status.ok and status.dropped_not_written == 1 and "my_pkg/msg/Unknown" in status.last_error
    msgs, _ = read_bag(tmp_path / "ep")
    assert int(msgs["/cam/image_raw"][0][1].data[0]) == 3


def test_home_directory_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with EpisodeRecorder("~/episodes", topics=TOPICS) as rec:
        rec.start_episode("ep", "x")
        rec.record_image(image(T0, 0))
        rec.end_episode()
    assert rec.status().ok
    assert (tmp_path / "episodes" / "ep" / "metadata.yaml").is_file()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="storage"):
        EpisodeRecorder("/tmp/x", storage="rosbag1")
    with pytest.raises(ValueError, match="max_queue"):
        EpisodeRecorder("/tmp/x", max_queue=0)
    with pytest.raises(ValueError, match="max_queue_bytes"):
        EpisodeRecorder("/tmp/x", max_queue_bytes=0)


@pytest.mark.skipif(not HAS_RCLPY, reason="rclpy is not importable")
def test_rclpy_messages_round_trip(tmp_path: Path) -> None:
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import CompressedImage
    from std_msgs.msg import String

    from robometer_ros.msg import EpisodeStatus, FailureFlag, StepReward

    jpeg = CompressedImage()
    jpeg.header.stamp.sec, jpeg.header.stamp.nanosec = 1_700_000_000, 5
    jpeg.header.frame_id = "cam"
    jpeg.format = "jpeg"
    jpeg.data = b"\xff\xd8fake\xff\xd9"
    reward = StepReward()
    reward.header = jpeg.header
    reward.episode_id, reward.step, reward.progress = "ep", 3, 0.25
    reward.frame_progress = [0.0, 0.25]
    reward.frame_stamps = [jpeg.header.stamp, jpeg.header.stamp]
    flag = FailureFlag()
    flag.header = jpeg.header
    flag.failed, flag.reason, flag.detail = True, FailureFlag.REASON_REGRESSED, "rewind"
    status = EpisodeStatus()
    status.header = jpeg.header
    status.episode_id, status.state, status.outcome = "ep", EpisodeStatus.STATE_ENDED, EpisodeStatus.OUTCOME_SUCCESS

    with EpisodeRecorder(tmp_path, topics=TOPICS) as rec:
        rec.start_episode("ep", "stack blocks")
        rec.record_image(jpeg)
        rec.record_step_reward(reward)
        rec.record_failure_flag(flag)
        rec.end_episode(outcome=1, status_msg=status)
    assert rec.status().ok and rec.status().messages_written == 5

    classes = {
        "/task": String,
        "/cam/image_raw": CompressedImage,
        "/rn/step_reward": StepReward,
        "/rn/failure_flag": FailureFlag,
        "/rn/episode": EpisodeStatus,
    }
    stamp_ns = 1_700_000_000 * 10**9 + 5
    seen: dict[str, Any] = {}
    with Reader(tmp_path / "ep") as reader:
        for conn, t, raw in reader.messages():
            assert t == stamp_ns
            seen[conn.topic] = deserialize_message(raw, classes[conn.topic])
            TS.deserialize_cdr(raw, conn.msgtype)  # and rosbags decodes the same bytes
    assert set(seen) == set(classes)
    assert seen["/cam/image_raw"].format == "jpeg" and bytes(seen["/cam/image_raw"].data) == b"\xff\xd8fake\xff\xd9"
    assert seen["/rn/step_reward"].step == 3 and list(seen["/rn/step_reward"].frame_progress) == [0.0, 0.25]
    assert seen["/rn/failure_flag"].reason == FailureFlag.REASON_REGRESSED
    assert seen["/rn/episode"].outcome == EpisodeStatus.OUTCOME_SUCCESS
    assert seen["/task"].data == "stack blocks"


def test_custom_type_hashes_match_the_rosidl_build(tmp_path: Path) -> None:
    """The bag's type hashes must equal what rosidl generated, or `ros2 bag play` mismatches the types."""
    import json
    import sys

    share = Path(sys.prefix) / "share" / "robometer_ros" / "msg"
    if not (share / "StepReward.json").is_file():
        pytest.skip(f"no rosidl build output in {share}")
    for name in ("StepReward", "FailureFlag", "EpisodeStatus"):
        generated = json.loads((share / f"{name}.json").read_text())
        hashes = [h["hash_string"] for h in generated["type_hashes"] if h["type_name"] == f"robometer_ros/msg/{name}"]
        assert hashes == [TS.hash_rihs01(f"robometer_ros/msg/{name}")]


def mcap_messages(bag: Path) -> dict[str, int]:
    """topic -> message count, read with the mcap library (the summary when there is one, else a scan)."""
    from mcap.reader import make_reader

    counts: dict[str, int] = {}
    (storage_file,) = bag.glob("*.mcap")
    with storage_file.open("rb") as stream:
        for _schema, channel, _message in make_reader(stream).iter_messages():
            counts[channel.topic] = counts.get(channel.topic, 0) + 1
    return counts


def scanned_messages(bag: Path) -> dict[str, int]:
    """topic -> count of the messages already on disk in a bag still being written (no summary yet)."""
    from mcap.exceptions import McapError
    from mcap.stream_reader import StreamReader

    counts: dict[str, int] = {}
    channels: dict[int, str] = {}
    files = list(bag.glob("*.mcap"))
    if not files:  # the writer thread has not opened the bag yet
        return counts
    with files[0].open("rb") as stream:
        try:
            for record in StreamReader(stream).records:
                kind = type(record).__name__
                if kind == "Channel":
                    channels[record.id] = record.topic
                elif kind == "Message":
                    topic = channels[record.channel_id]
                    counts[topic] = counts.get(topic, 0) + 1
        except (McapError, EOFError, ValueError):
            pass  # the end of what was written so far
    return counts


def test_closed_bags_read_the_same_with_the_mcap_library(tmp_path: Path) -> None:
    with EpisodeRecorder(tmp_path, topics=TOPICS, flush_s=0.05) as rec:
        rec.start_episode("ep", "x")
        for i in range(40):  # several flushes: many small chunks in one bag
            rec.record_image(image(T0 + i * STEP_NS, i))
            if i % 10 == 0:
                assert rec.flush(10.0)
        rec.end_episode(outcome=1)
    msgs, _ = read_bag(tmp_path / "ep")
    assert {topic: len(v) for topic, v in msgs.items()} == mcap_messages(tmp_path / "ep")
    assert mcap_messages(tmp_path / "ep")["/cam/image_raw"] == 40


def test_an_open_episode_reaches_the_disk_within_flush_s_without_new_messages(tmp_path: Path) -> None:
    """What a SIGKILL would leave: the frames recorded more than flush_s ago are in the file already
    (rosbags alone holds up to 1 MiB of chunk in memory: these 4 tiny frames would all be lost)."""
    from ros_harness import wait_until

    rec = EpisodeRecorder(tmp_path, topics=TOPICS, flush_s=0.2)
    rec.start_episode("ep", "x")
    for i in range(4):
        rec.record_image(image(T0 + i * STEP_NS, i))
    wait_until(lambda: scanned_messages(tmp_path / "ep").get("/cam/image_raw", 0) == 4, 5.0,
               "the open episode's frames on disk")
    assert scanned_messages(tmp_path / "ep")["/task"] == 1
    assert not (tmp_path / "ep" / "metadata.yaml").exists()  # still open: only the chunks are on disk
    rec.record_image(image(T0 + 4 * STEP_NS, 4))
    assert rec.flush(10.0)  # flush() puts everything on disk at once
    assert scanned_messages(tmp_path / "ep")["/cam/image_raw"] == 5
    rec.close()


def test_too_little_free_space_refuses_the_episode_and_the_error_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    errors: list[str] = []
    free = {"mb": 50.0}
    monkeypatch.setattr(recorder_module, "_free_mb", lambda path: free["mb"])
    rec = EpisodeRecorder(tmp_path, topics=TOPICS, min_free_mb=100, on_error=errors.append)
    rec.start_episode("full", "x")
    rec.record_image(image(T0, 0))
    rec.end_episode()
    assert rec.flush(10.0)
    status = rec.status()
    assert not status.ok and status.episodes_started == 0 and status.free_mb == 50.0
    assert "disk nearly full: 50 MB free" in status.last_error and "min_free_mb 100" in status.last_error
    assert not (tmp_path / "full").exists()
    assert len(errors) == 1 and "disk nearly full" in errors[0]
    rec.start_episode("still_full", "x")  # the next episode on a still-full disk: still an error, not OK
    rec.record_image(image(T0, 0))
    assert rec.flush(10.0)
    assert not rec.status().ok and rec.status().errors == 2

    free["mb"] = 500.0  # space is back: the next episode records and the error state ends
    rec.start_episode("room", "x")
    rec.record_image(image(T0, 0))
    rec.end_episode(outcome=1)
    status = rec.close()
    assert status.ok and status.episodes_closed == 1 and status.errors == 2
    assert read_episode_label(tmp_path / "room")[LABEL_OUTCOME] == "success"


def test_a_disk_filling_up_mid_episode_closes_the_bag_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from robometer_ros.recorder import LABEL_STOPPED

    errors: list[str] = []
    free = {"mb": 1000.0}
    monkeypatch.setattr(recorder_module, "_free_mb", lambda path: free["mb"])
    rec = EpisodeRecorder(tmp_path, topics=TOPICS, min_free_mb=100, on_error=errors.append)
    rec.start_episode("ep", "x")
    for i in range(3):
        rec.record_image(image(T0 + i * STEP_NS, i))
    assert rec.flush(10.0) and rec.status().ok
    free["mb"] = 20.0
    rec.record_image(image(T0 + 3 * STEP_NS, 3))
    assert rec.flush(10.0)  # the free-space check at the flush stops the episode
    for i in range(4, 6):
        rec.record_image(image(T0 + i * STEP_NS, i))
    rec.end_episode(outcome=1)
    status = rec.close()
    assert not status.ok and status.errors == 1 and status.dropped_not_written == 2
    assert "stopped recording episode ep: disk nearly full" in errors[0]
    bag = tmp_path / "ep"
    label = read_episode_label(bag)  # closed cleanly while there was room: metadata.yaml and summary
    assert "disk nearly full" in label[LABEL_STOPPED] and label[LABEL_OUTCOME] == "unknown"
    msgs, _ = read_bag(bag)
    assert len(msgs["/cam/image_raw"]) == 4
    assert mcap_messages(bag)["/cam/image_raw"] == 4


def test_errors_go_to_on_error_not_the_logger(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    errors: list[str] = []
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with caplog.at_level("WARNING", logger="robometer_ros.recorder"):
        rec = EpisodeRecorder(blocker / "bags", topics=TOPICS, on_error=errors.append)
        rec.start_episode("ep", "x")
        rec.close()
    assert len(errors) == 1 and "cannot open bag" in errors[0]
    assert not caplog.records


def test_new_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="flush_s"):
        EpisodeRecorder("/tmp/x", flush_s=0)
    with pytest.raises(ValueError, match="min_free_mb"):
        EpisodeRecorder("/tmp/x", min_free_mb=-1)


def test_sqlite3_bags_are_committed_at_each_flush(tmp_path: Path) -> None:
    """The sqlite3 storage writes one transaction: a flush commits it, so a crash keeps the rows
    (`ros2 bag reindex` rebuilds metadata.yaml from them)."""
    import sqlite3

    rec = EpisodeRecorder(tmp_path, storage="sqlite3", topics=TOPICS, flush_s=30.0)
    rec.start_episode("ep", "x")
    for i in range(3):
        rec.record_image(image(T0 + i * STEP_NS, i))
    assert rec.flush(10.0) and rec.status().ok
    (database,) = (tmp_path / "ep").glob("*.db3")
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as reader:  # another connection: committed rows only
        assert reader.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 4
    rec.close()
    assert len(read_bag(tmp_path / "ep")[0]["/cam/image_raw"]) == 3
