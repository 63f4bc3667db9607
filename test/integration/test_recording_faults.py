"""Recording under faults, with real processes and real filesystems: SIGKILL of a recording process and of
the recording reward node itself (over DDS), a full disk (a small tmpfs where this machine lets the test
mount one; RLIMIT_FSIZE as a stand-in that needs no privileges), a read-only directory. Each closed episode
must read back with rosbags and the mcap library; an interrupted one is repaired (robometer-dataset repair)
with at most the flush bound lost.

The recording process is test/support/recording_child.py (the real EpisodeRecorder); it reports every
frame it hands over with its time.monotonic(), so the test knows what a crash may lose.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcap.reader import make_reader
from rosbags.highlevel import AnyReader
from sensor_msgs.msg import Image

from reward_node_helpers import (
    NODE,
    RELIABLE,
    SCRIPTED_NODE_MODULE,
    Camera,
    SentFrame,
    colour_frame,
    node_args,
    publish_instruction,
    raw_image,
    stamp_ns,
)
from robometer_ros.msg import StepReward
from robometer_ros.recorder import LABEL_STOPPED, EpisodeRecorder, read_episode_label
from robometer_ros.ros_graph import REPO
from robometer_ros.srv import EndEpisode
from robometer_ros.training.data.bag_repair import needs_repair, repair_bag

IMAGE_TOPIC = "/camera/image"


class Child:
    """The recording process and the events it printed."""

    def __init__(self, scenario: dict[str, Any]) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "test"), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "support.recording_child", json.dumps(scenario)], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO),
        )
        self.lines: list[str] = []
        self.recorded: dict[str, list[float]] = {}  # episode -> hand-over time of each frame
        self.statuses: dict[str, dict[str, Any]] = {}
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            with self._cond:
                self.lines.append(line)
                kind, _, rest = line.partition(" ")
                if kind == "recorded":
                    episode, _index, at = rest.split()
                    self.recorded.setdefault(episode, []).append(float(at))
                elif kind == "status":
                    episode, _, text = rest.partition(" ")
                    self.statuses[episode] = json.loads(text)
                elif kind == "error":
                    self.errors.append(rest)
                self._cond.notify_all()

    def wait_for(self, what: str, predicate: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"child never got to {what}; it printed:\n" + "\n".join(self.lines[-30:]))
                self._cond.wait(min(left, 0.2))

    def finish(self, timeout: float = 60.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code


def read_back(bag: Path) -> dict[str, int]:
    """topic -> count, asserting that rosbags and the mcap library (its summary) agree."""
    with AnyReader([bag]) as reader:
        by_rosbags = {c.topic: c.msgcount for c in reader.connections}
        assert sum(1 for _ in reader.messages()) == sum(by_rosbags.values())
    by_mcap: dict[str, int] = {}
    (storage,) = bag.glob("*.mcap")
    with storage.open("rb") as stream:
        reader = make_reader(stream)
        assert reader.get_summary() is not None
        for _, channel, _ in reader.iter_messages():
            by_mcap[channel.topic] = by_mcap.get(channel.topic, 0) + 1
    assert by_rosbags == by_mcap
    return by_rosbags


def scenario(directory: Path, episodes: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    return {"directory": str(directory), "flush_s": 1.0, "min_free_mb": 0, "rate_hz": 30, "frame_bytes": 9216,
            "episodes": episodes, **overrides}


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of `size_kb` at `path`, or a skip where this machine cannot mount one."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_sigkill_mid_episode_loses_at_most_the_flush_bound(tmp_path: Path) -> None:
    """A closed episode survives whole; the one being recorded is repaired with every frame handed over
    more than flush_s (1 s, the default) before the kill. Small frames, so rosbags' 1 MiB chunk limit
    never flushes for us: only the recorder's timed flush bounds the loss."""
    bags = tmp_path / "bags"
    child = Child(scenario(bags, [{"id": "ep-0", "frames": 10}, {"id": "ep-1", "frames": 300, "end": False}]))
    try:
        child.wait_for("2.5 s of ep-1", lambda: len(child.recorded.get("ep-1", [])) >= 75)
        child.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
    assert child.finish() == -signal.SIGKILL
    assert child.statuses["ep-0"]["episodes_closed"] == 1

    assert read_back(bags / "ep-0") == {IMAGE_TOPIC: 10, "/instruction": 1, "/reward_node/episode": 1}
    cut = bags / "ep-1"
    assert needs_repair(cut)
    result = repair_bag(cut)
    recovered = result.messages[IMAGE_TOPIC]
    handed_over = child.recorded["ep-1"]
    assert read_back(cut)[IMAGE_TOPIC] == recovered
    # every frame older than the flush bound (plus scheduling slack on a loaded 2-core machine) is there
    must_have = sum(t < killed_at - 1.0 - 0.4 for t in handed_over)
    lost_s = killed_at - handed_over[recovered] if recovered < len(handed_over) else 0.0
    print(f"SIGKILL: {len(handed_over)} frames handed over, {recovered} recovered, "
          f"{len(handed_over) - recovered} lost = the last {lost_s:.2f} s (flush_s 1.0)")
    assert recovered >= must_have > 0
    assert lost_s <= 1.4
    assert "cut short" in read_episode_label(cut)[LABEL_STOPPED]


def test_full_disk_closes_the_bag_readable_and_the_next_episode_is_an_error(tmp_path: Path) -> None:
    """An 8 MB tmpfs, 100 KB frames at 100 Hz, min_free_mb 2: the second episode is closed cleanly while
    there is room, and a third on the still-full disk is refused and reported (never OK with 0 bytes)."""
    with mounted_tmpfs(tmp_path / "disk", 8 * 1024) as disk:
        child = Child(scenario(disk, [{"id": "ep-0", "frames": 10}, {"id": "ep-1", "frames": 150},
                                      {"id": "ep-2", "frames": 10}],
                               frame_bytes=100 * 1024, min_free_mb=2, flush_s=0.5, rate_hz=100))
        assert child.finish() == 0, "\n".join(child.lines[-20:])
        assert read_back(disk / "ep-0")[IMAGE_TOPIC] == 10
        stopped = read_back(disk / "ep-1")[IMAGE_TOPIC]
        assert 20 < stopped < 150  # what fitted above the margin, closed with its index and metadata
        assert "disk nearly full" in read_episode_label(disk / "ep-1")[LABEL_STOPPED]
        assert child.statuses["ep-1"]["ok"] is False
        third = child.statuses["ep-2"]
        assert third["ok"] is False and "not recording episode ep-2: disk nearly full" in third["last_error"]
        assert not (disk / "ep-2").exists()
        assert any("disk nearly full" in error for error in child.errors)  # on_error, i.e. the node's log


def test_full_disk_without_a_margin_is_repairable_up_to_the_flush_bound(tmp_path: Path) -> None:
    """min_free_mb 0: the write fails with ENOSPC, the bag cannot be closed; what was flushed is repaired
    onto another disk, and the next episode on the full disk reports an error."""
    with mounted_tmpfs(tmp_path / "disk", 4 * 1024) as disk:
        child = Child(scenario(disk, [{"id": "ep-0", "frames": 5}, {"id": "ep-1", "frames": 120},
                                      {"id": "ep-2", "frames": 10}],
                               frame_bytes=100 * 1024, min_free_mb=0, flush_s=0.5, rate_hz=100))
        assert child.finish() == 0, "\n".join(child.lines[-20:])
        assert read_back(disk / "ep-0")[IMAGE_TOPIC] == 5
        assert any("No space left on device" in error for error in child.errors)
        assert child.statuses["ep-1"]["ok"] is False and child.statuses["ep-2"]["ok"] is False
        assert child.statuses["closed"]["ok"] is False
        assert needs_repair(disk / "ep-1")
        result = repair_bag(disk / "ep-1", out=tmp_path / "repaired")
        recovered = result.messages[IMAGE_TOPIC]
        # ep-0 and the bag files take part of the 4 MB: at least the frames of the flushes that fitted
        assert recovered >= 15
        assert read_back(tmp_path / "repaired" / "ep-1")[IMAGE_TOPIC] == recovered


def test_file_size_limit_stand_in_needs_no_privileges(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (EFBIG past 400 KB per file): the failing episode is repairable, and recording works
    again for the next one (a limit per file, unlike a full disk)."""
    bags = tmp_path / "bags"
    child = Child(scenario(bags, [{"id": "ep-0", "frames": 5}, {"id": "ep-1", "frames": 90},
                                  {"id": "ep-2", "frames": 5}],
                           frame_bytes=20 * 1024, flush_s=0.1, fsize_limit=400 * 1024, rate_hz=100))
    assert child.finish() == 0, "\n".join(child.lines[-20:])
    assert read_back(bags / "ep-0")[IMAGE_TOPIC] == 5
    assert child.statuses["ep-1"]["ok"] is False and "File too large" in child.statuses["ep-1"]["last_error"]
    result = repair_bag(bags / "ep-1")
    assert 5 <= result.messages[IMAGE_TOPIC] <= 20  # 400 KB of 20 KB frames, less the last unflushed part
    assert read_back(bags / "ep-2")[IMAGE_TOPIC] == 5
    assert child.statuses["ep-2"]["ok"] is True and child.statuses["ep-2"]["errors"] >= 1


@contextlib.contextmanager
def read_only_directory(path: Path) -> Iterator[Path]:
    """A directory writes to which fail (EROFS from a read-only tmpfs as root, else EACCES from chmod)."""
    if os.geteuid() == 0:  # root ignores permission bits: a read-only mount is the real thing
        with mounted_tmpfs(path, 1024):
            remount = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
            if remount.returncode != 0:
                pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
            try:
                yield path
            finally:
                subprocess.run(["mount", "-o", "remount,rw", str(path)], capture_output=True)
    else:
        path.mkdir()
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


def test_read_only_directory_is_an_error_and_leaves_no_unreadable_bag(tmp_path: Path) -> None:
    from robometer_ros.recorder import RecordTopics, make_typestore

    types = make_typestore().types
    image = types["sensor_msgs/msg/Image"](
        header=types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=1_700_000_000,
                                                                                      nanosec=0), frame_id="c"),
        height=2, width=2, encoding="rgb8", is_bigendian=0, step=6, data=bytes(12),
    )
    errors: list[str] = []
    with read_only_directory(tmp_path / "ro") as directory:
        recorder = EpisodeRecorder(directory / "bags", topics=RecordTopics(image=IMAGE_TOPIC), min_free_mb=0,
                                   on_error=errors.append)
        recorder.start_episode("ep", "x")
        recorder.record_image(image)
        recorder.end_episode()
        assert recorder.flush(10.0)
        status = recorder.status()
        assert not status.ok and status.episodes_started == 0 and status.dropped_not_written == 1
        assert "cannot open bag" in status.last_error
        assert any(word in status.last_error for word in ("Read-only file system", "Permission denied"))
        assert errors and "cannot open bag" in errors[0]
        assert list(directory.iterdir()) == []  # nothing half-made that a reader would trip on
        recorder.close()


def test_sigkill_of_the_recording_reward_node_loses_at_most_the_flush_bound(start_node, probe, tmp_path: Path) -> None:
    """The reward node itself (real DDS, a camera in another process, record on): a closed episode's bag
    reads back whole; the episode open at SIGKILL is repaired, the instruction and every frame the node
    received more than record_flush_s before the kill included."""
    bags = tmp_path / "bags"
    rewards = probe.subscribe(f"{NODE}/step_reward", StepReward, RELIABLE)
    node = start_node(SCRIPTED_NODE_MODULE, node_args(tmp_path, camera_qos="reliable", record=True,
                                                      record_dir=str(bags), record_flush_s=1.0,
                                                      record_min_free_mb=0.0))
    node.wait_for_output("active:")
    camera = Camera(probe.publisher("/camera/image", Image, RELIABLE), rate_hz=30.0)

    sent_at: list[float] = []  # time.monotonic() each frame of the open episode was handed to DDS
    stop = threading.Event()

    def frames(count: int, progress: float, record: list[float] | None = None) -> None:
        """Publish `count` frames at 30 Hz (until `stop`)."""
        for _ in range(count):
            if stop.is_set():
                return
            t = camera.take_stamp()
            camera.publish([(raw_image(colour_frame(progress), "rgb8", t), SentFrame(t, progress, 0.0, "rgb8"))])
            if record is not None:
                record.append(time.monotonic())

    publish_instruction(probe, "stack the cups")
    frames(10, 0.3)
    rewards.wait_for(1, timeout=20, predicate=lambda r: stamp_ns(r.header.stamp) == camera.sent[-1].t_ns)
    end = probe.call(EndEpisode, f"{NODE}/end_episode", EndEpisode.Request(outcome=1, note="done"))
    closed = bags / end.ended_episode_id
    publish_instruction(probe, "stack the plates")
    # the camera keeps running while the node is killed, as it would on a robot
    streaming = threading.Thread(target=frames, args=(300, 0.6, sent_at), daemon=True)
    streaming.start()
    rewards.wait_for(1, timeout=20, predicate=lambda r: r.instruction == "stack the plates")
    deadline = time.monotonic() + 30
    while len(sent_at) < 90:  # 3 s of the open episode
        assert time.monotonic() < deadline and streaming.is_alive(), f"camera stuck at {len(sent_at)} frames"
        time.sleep(0.01)
    open_id = next(r.episode_id for r in reversed(rewards.messages) if r.instruction == "stack the plates")
    node.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    stop.set()
    streaming.join(10)
    assert node.proc.wait(10) == -signal.SIGKILL

    counts = read_back(closed)  # closed before the kill: untouched, readable by rosbags and mcap
    assert counts["/camera/image"] == 10 and counts["/task"] == 1
    cut = bags / open_id
    assert needs_repair(cut)
    result = repair_bag(cut)
    recovered = result.messages["/camera/image"]
    assert result.messages.get("/task") == 1  # the instruction is the first thing of the bag
    assert read_back(cut)["/camera/image"] == recovered
    # every frame the node had more than flush_s (1 s) before the kill, plus slack for DDS and a loaded
    # 2-core machine, is in the bag
    before_kill = [t for t in sent_at if t < killed_at]
    must_have = sum(t < killed_at - 1.0 - 0.5 for t in before_kill)
    lost_s = killed_at - before_kill[recovered] if recovered < len(before_kill) else 0.0
    print(f"reward node SIGKILL: {len(before_kill)} frames sent in the open episode before the kill, {recovered} "
          f"recovered, {len(before_kill) - recovered} lost = the last {lost_s:.2f} s (record_flush_s 1.0)")
    assert recovered >= must_have > 0
    assert lost_s <= 1.5
    assert "cut short" in read_episode_label(cut)[LABEL_STOPPED]
