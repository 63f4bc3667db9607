"""bag_repair / `robometer-dataset repair`: bags cut short are rebuilt from their flushed chunks with the mcap
library, read by rosbags and mcap afterwards, and the importer names or repairs them.

A cut-short bag is made the way a SIGKILL leaves one: a copy of a bag the recorder still has open, taken
after a flush (test/integration/test_recording_faults.py does it with a real SIGKILL).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mcap.reader import make_reader
from rosbags.highlevel import AnyReader

from robometer_ros.recorder import (
    LABEL_EPISODE_ID,
    LABEL_INSTRUCTION,
    LABEL_OUTCOME,
    LABEL_STOPPED,
    EpisodeRecorder,
    RecordTopics,
    make_typestore,
    read_episode_label,
)
from robometer_ros.training.data.bag_repair import BagRepairError, needs_repair, repair_bag
from robometer_ros.training.data.bags import BagImportError, BagImportOptions, ImportReport, read_bag
from robometer_ros.training.data.dataset_cli import main as dataset_main

TOPICS = RecordTopics(image="/cam", instruction="/task", episode_status="/rn/episode")
T0 = 1_700_000_000 * 10**9
TS = make_typestore()
T = TS.types


def _image(i: int) -> Any:
    ns = T0 + i * 100_000_000
    stamp = T["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)
    return T["sensor_msgs/msg/Image"](
        header=T["std_msgs/msg/Header"](stamp=stamp, frame_id="cam"), height=6, width=8, encoding="rgb8",
        is_bigendian=0, step=24, data=np.full(6 * 8 * 3, i * 10, dtype=np.uint8),
    )


def cut_bag(tmp_path: Path, frames: int = 12, name: str = "run-1") -> Path:
    """A copy of an open recorder bag after a flush: no summary, no metadata.yaml."""
    recorder = EpisodeRecorder(tmp_path / "live", topics=TOPICS, flush_s=30.0)  # only explicit flushes
    recorder.start_episode(name, "fold the towel")
    for i in range(frames):
        recorder.record_image(_image(i))
    assert recorder.flush(10.0)
    cut = tmp_path / "cut" / name
    shutil.copytree(tmp_path / "live" / name, cut)
    recorder.close()
    return cut


def read_everything(bag: Path) -> tuple[dict[str, int], dict[str, int]]:
    """topic -> count with rosbags, and with the mcap library (summary-indexed reader)."""
    with AnyReader([bag]) as reader:
        by_rosbags = {c.topic: c.msgcount for c in reader.connections}
        assert sum(1 for _ in reader.messages()) == sum(by_rosbags.values())
    by_mcap: dict[str, int] = {}
    (storage,) = bag.glob("*.mcap")
    with storage.open("rb") as stream:
        reader = make_reader(stream)
        assert reader.get_summary() is not None  # a real summary, not a scan
        for _, channel, _ in reader.iter_messages():
            by_mcap[channel.topic] = by_mcap.get(channel.topic, 0) + 1
    return by_rosbags, by_mcap


def test_a_cut_bag_is_repaired_in_place_and_reads_everywhere(tmp_path: Path) -> None:
    bag = cut_bag(tmp_path)
    assert needs_repair(bag) and not (bag / "metadata.yaml").exists()
    with pytest.raises(Exception, match="metadata"):
        AnyReader([bag]).open()  # what a standard reader says about it
    result = repair_bag(bag)
    assert result.action == "repaired" and result.output == bag
    assert result.messages == {"/cam": 12, "/task": 1} and result.recovered == 13
    assert result.unreadable_bytes == 0 and not result.complete
    by_rosbags, by_mcap = read_everything(bag)
    assert by_rosbags == by_mcap == {"/cam": 12, "/task": 1}
    assert (bag / "run-1.mcap.orig").is_file() and not needs_repair(bag)
    label = read_episode_label(bag)
    assert label[LABEL_EPISODE_ID] == "run-1" and label[LABEL_INSTRUCTION] == "fold the towel"
    assert label[LABEL_OUTCOME] == "unknown" and "13 messages recovered" in label[LABEL_STOPPED]
    # the frames are the recorded ones, in order
    with AnyReader([bag], default_typestore=TS) as reader:
        values = [int(reader.deserialize(raw, c.msgtype).data[0]) for c, _, raw in reader.messages()
                  if c.topic == "/cam"]
    assert values == [i * 10 for i in range(12)]
    assert repair_bag(bag).action == "intact"


def test_a_bag_cut_inside_a_chunk_keeps_the_complete_chunks(tmp_path: Path) -> None:
    recorder = EpisodeRecorder(tmp_path / "live", topics=TOPICS, flush_s=30.0)
    recorder.start_episode("run", "x")
    for i in range(5):
        recorder.record_image(_image(i))
    assert recorder.flush(10.0)  # chunk 1: the instruction and 5 frames
    (storage,) = (tmp_path / "live" / "run").glob("*.mcap")
    first = storage.stat().st_size
    for i in range(5, 9):
        recorder.record_image(_image(i))
    assert recorder.flush(10.0)  # chunk 2: 4 frames
    data = storage.read_bytes()
    recorder.close()
    bag = tmp_path / "cut" / "run"
    bag.mkdir(parents=True)
    cut = (first + len(data)) // 2  # inside chunk 2
    (bag / "run.mcap").write_bytes(data[:cut])
    result = repair_bag(bag)
    assert result.messages == {"/cam": 5, "/task": 1}
    assert result.unreadable_bytes == cut - first
    assert any(f"read up to byte {first} of {cut}" in note for note in result.notes)
    assert read_everything(bag)[0] == {"/cam": 5, "/task": 1}


def test_a_complete_file_without_metadata_gets_its_label_back(tmp_path: Path) -> None:
    with EpisodeRecorder(tmp_path / "bags", topics=TOPICS) as recorder:
        recorder.start_episode("run-2", "stack the cups")
        for i in range(4):
            recorder.record_image(_image(i))
        recorder.end_episode(outcome=1, note="done")
    bag = tmp_path / "bags" / "run-2"
    (bag / "metadata.yaml").unlink()  # e.g. the disk filled up just as it was written
    assert needs_repair(bag)
    result = repair_bag(bag)
    assert result.complete and result.messages["/cam"] == 4
    assert read_episode_label(bag)[LABEL_OUTCOME] == "success"
    assert any("embedded rosbag2 metadata" in note for note in result.notes)


def test_out_and_dry_run_leave_the_original_alone(tmp_path: Path) -> None:
    bag = cut_bag(tmp_path)
    before = sorted(p.name for p in bag.iterdir())
    assert repair_bag(bag, dry_run=True).recovered == 13
    result = repair_bag(bag, out=tmp_path / "fixed")
    assert result.output == tmp_path / "fixed" / "run-1"
    assert sorted(p.name for p in bag.iterdir()) == before
    assert read_everything(result.output)[0] == {"/cam": 12, "/task": 1}
    with pytest.raises(BagRepairError, match="exists already"):
        repair_bag(bag, out=tmp_path / "fixed")


def test_nothing_to_recover_and_not_mcap_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "empty.mcap").write_bytes(b"\x89MCAP0\r\n")
    with pytest.raises(BagRepairError, match="nothing recoverable"):
        repair_bag(empty)
    assert (empty / "empty.mcap").is_file()  # untouched
    db3 = tmp_path / "db"
    db3.mkdir()
    (db3 / "db.db3").write_bytes(b"")
    with pytest.raises(BagRepairError, match="ros2 bag reindex"):
        repair_bag(db3)
    not_mcap = tmp_path / "x.mcap"
    not_mcap.write_bytes(b"nope")
    assert not needs_repair(not_mcap)


def test_the_importer_names_a_cut_bag_or_repairs_it(tmp_path: Path) -> None:
    bag = cut_bag(tmp_path)
    (storage,) = bag.glob("*.mcap")
    with pytest.raises(BagImportError, match=r"cut short.*robometer-dataset repair"):
        list(read_bag(storage))
    report = ImportReport()
    (trajectory,) = read_bag(storage, BagImportOptions(repair=True), report)
    assert report.bags_repaired == [(str(storage), 13)]
    assert trajectory.episode_id == "run-1" and len(trajectory) == 12
    assert trajectory.quality_label == "unknown"  # never ended: no outcome
    text = report.format()
    assert "repaired" in text and "13 messages recovered" in text
    assert "1 episodes had no end-of-episode outcome and were imported as 'unknown'" in text


def test_cli_repair_and_from_bags_repair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = cut_bag(tmp_path / "a", name="run-1")
    second = cut_bag(tmp_path / "b", name="run-2")
    shutil.move(str(second), str(first.parent / "run-2"))
    assert dataset_main(["repair", str(first.parent), "--dry-run"]) == 0
    assert "would recover 13 messages" in capsys.readouterr().out
    assert needs_repair(first)
    assert dataset_main(["repair", str(first), "--delete-original"]) == 0
    assert "recovered 13 messages (/cam 12, /task 1)" in capsys.readouterr().out
    assert not (first / "run-1.mcap.orig").exists()
    out = tmp_path / "dataset"
    assert dataset_main(["from-bags", str(first.parent), "--out", str(out), "--repair", "--min-frames", "1"]) == 0
    printed = capsys.readouterr().out
    assert "episodes written: 2 (unknown 2)" in printed and "repaired" in printed
