"""Episode bags: each episode the reward node scores is written as its own rosbag2 bag, off the scoring path.

``EpisodeRecorder(directory)`` writes ``<directory>/<episode_id>/`` (``metadata.yaml`` + one ``.mcap``, or a
``.db3`` with ``storage="sqlite3"``) with rosbags (rosbag2 format version 9, readable by ``ros2 bag`` and by
the training importer). A bag holds:

* the admitted camera frames (``sensor_msgs/msg/Image`` or ``CompressedImage``, as received),
* the instruction (``std_msgs/msg/String``),
* ``robometer_ros/msg/StepReward``, ``FailureFlag`` and ``EpisodeStatus`` as the node published them,
* the end-of-episode label: a final EpisodeStatus (state ENDED, the robot stack's outcome) and the same
  facts as strings in the bag's ``custom_data`` (keys ``LABEL_*`` below; ``read_episode_label`` reads them).

Every message's bag timestamp is its ``header.stamp`` (camera time), so images and rewards line up on
replay. Messages without a usable stamp (the instruction, a status before the first frame) are written at
the first camera stamp of the episode, or at the last one seen.

Input: message objects. ``rclpy`` messages (what the node holds) are serialized with
``rclpy.serialization.serialize_message``, so nothing is converted by hand; rosbags typestore messages
(``__msgtype__``, used by tests and tools without rclpy) with the typestore; already-serialized CDR bytes go
through ``record_serialized``. rclpy is imported lazily, only when an rclpy message arrives. A message must not
be changed after it is handed over (it is serialized later, on the writer thread).

Threading and failure: the caller's methods only append to a bounded queue and never block or raise for I/O.
A full queue drops the data message and counts it; episode start/end commands are never dropped.

What a crash, a full disk or an unwritable directory can lose (issue 11):

* a closed episode: nothing. Its bag was closed (MCAP summary, metadata.yaml) at its end and is never
  touched again.
* the episode in progress: at most ``flush_s`` seconds of it (default 1 s) plus what was still queued.
  Every ``flush_s`` the writer thread ends the MCAP chunk in progress (chunks are also ended at 1 MiB by
  rosbags), hands it to the OS and fsyncs it (sqlite3: commits). A bag cut short by SIGKILL or power loss
  has no summary and no metadata.yaml; ``robometer-dataset repair BAG`` rebuilds both from the flushed
  chunks (robometer_ros.training.data.bag_repair).
* on a disk getting full: the free space is checked before an episode opens, at every flush and after
  every quarter of ``min_free_mb`` written; below
  ``min_free_mb`` the episode's bag is closed cleanly (readable, label key ``LABEL_STOPPED`` says why)
  while there is still room for its index and metadata, and no new bag is opened until space is back.

A write error, an unwritable directory or too little space puts the recorder in an error state that
``status()`` reports (``ok`` False) and that stays until recording works again: until a later episode's
data reaches the disk (a flush or a close succeeds). Every error goes to ``on_error`` (the node passes its
ROS logger) or, without one, to this module's logger. The episode that failed is closed as far as possible
and its later messages are counted as dropped.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PACKAGE = "robometer_ros"
CUSTOM_MSG_TYPES = ("StepReward", "FailureFlag", "EpisodeStatus")

# custom_data keys of the episode label (all values are strings, as rosbag2 requires).
LABEL_EPISODE_ID = "robometer_ros.episode_id"
LABEL_INSTRUCTION = "robometer_ros.instruction"
LABEL_OUTCOME = "robometer_ros.outcome"  # "unknown" / "success" / "failure" (EpisodeStatus.OUTCOME_*)
LABEL_NOTE = "robometer_ros.note"  # the robot stack's free-text note from ~/end_episode
LABEL_VERDICT = "robometer_ros.monitor_verdict"  # the reward node's own verdict, e.g. "succeeded", "failed:STALLED"
LABEL_DROPPED = "robometer_ros.dropped_messages"  # messages of this episode the recorder could not write
LABEL_STOPPED = "robometer_ros.recording_stopped"  # why recording stopped before the episode ended ("" if not)

OUTCOME_NAMES = {0: "unknown", 1: "success", 2: "failure"}
_STATE_ENDED = 4  # EpisodeStatus.STATE_ENDED

STORAGES = ("mcap", "sqlite3")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class RecordTopics:
    """Topic names used inside the bags; the node passes the resolved names it subscribes and publishes."""

    image: str = "/image"
    instruction: str = "/instruction"
    step_reward: str = "/reward_node/step_reward"
    failure_flag: str = "/reward_node/failure_flag"
    episode_status: str = "/reward_node/episode"


@dataclass(frozen=True)
class RecorderStatus:
    """A snapshot of the recorder for diagnostics.

    Attributes:
        ok: False after a write error until an episode bag opens again successfully (and while the current
            episode cannot be written).
        message: a one-line summary ("recording episode X to DIR", "error: ...", "idle").
        last_error: the most recent error text ("" if none ever).
        errors: write errors so far.
        episodes_started: bags opened.
        episodes_closed: bags closed cleanly (metadata.yaml written).
        messages_written: messages written to bags.
        dropped_queue_full: data messages dropped because the writer thread fell behind.
        dropped_not_written: messages dropped because their episode's bag could not be written, no episode
            was open, or the message could not be serialized.
        queued: messages waiting in the queue now.
        current_bag: the bag being written ("" when none).
        last_closed_bag: the most recent bag closed cleanly ("" when none).
        free_mb: free space in MB where bags go, at the last check (NaN before the first).
    """

    ok: bool = True
    message: str = "idle"
    last_error: str = ""
    errors: int = 0
    episodes_started: int = 0
    episodes_closed: int = 0
    messages_written: int = 0
    dropped_queue_full: int = 0
    dropped_not_written: int = 0
    queued: int = 0
    current_bag: str = ""
    last_closed_bag: str = ""
    free_mb: float = math.nan

    @property
    def dropped(self) -> int:
        """Every message that did not reach a bag."""
        return self.dropped_queue_full + self.dropped_not_written


def find_msg_definitions(package: str = PACKAGE) -> Path:
    """The directory holding this package's ``.msg`` files.

    Looked up, in order: the ament index (``share/robometer_ros/msg`` of a colcon install or of the venv,
    which the cmake build installs), ``<sys.prefix>/share/robometer_ros/msg`` (the venv when
    AMENT_PREFIX_PATH is not set), then the source tree's ``msg/``.

    Raises:
        FileNotFoundError: none of them holds the message files.
    """
    candidates: list[Path] = []
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory(package)) / "msg")
    except Exception:  # not installed, AMENT_PREFIX_PATH unset, package not in the index
        pass
    candidates.append(Path(sys.prefix) / "share" / package / "msg")
    candidates.append(Path(__file__).resolve().parent.parent / "msg")
    for directory in candidates:
        if all((directory / f"{name}.msg").is_file() for name in CUSTOM_MSG_TYPES):
            return directory
    raise FileNotFoundError(
        f"no {package} message definitions ({', '.join(CUSTOM_MSG_TYPES)}.msg) in any of: "
        + ", ".join(str(c) for c in candidates)
    )


def make_typestore(msg_dir: Path | None = None) -> Any:
    """A rosbags typestore (ROS 2 Kilted) with robometer_ros's messages registered from their .msg files."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    msg_dir = find_msg_definitions() if msg_dir is None else Path(msg_dir)
    typestore = get_typestore(Stores.ROS2_KILTED)
    types: dict[str, Any] = {}
    for name in CUSTOM_MSG_TYPES:
        types.update(get_types_from_msg((msg_dir / f"{name}.msg").read_text(), f"{PACKAGE}/msg/{name}"))
    typestore.register(types)
    return typestore


def read_episode_label(bag_dir: str | Path) -> dict[str, str]:
    """The ``custom_data`` of a bag's metadata.yaml (the episode label keys ``LABEL_*``); {} if none."""
    import yaml

    meta = yaml.safe_load((Path(bag_dir) / "metadata.yaml").read_text())
    info = (meta or {}).get("rosbag2_bagfile_information") or {}
    return {str(k): str(v) for k, v in (info.get("custom_data") or {}).items()}


def _latched_qos() -> list[Any]:
    """The offered QoS of the node's latched topics, so ``ros2 bag play`` republishes them latched."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    zero = QosTime(0, 0)
    return [
        Qos(
            QosHistory.KEEP_LAST,
            1,
            QosReliability.RELIABLE,
            QosDurability.TRANSIENT_LOCAL,
            zero,
            zero,
            QosLiveliness.AUTOMATIC,
            zero,
            False,
        )
    ]


def _rclpy_type_name(msg: Any) -> str:
    """'sensor_msgs/msg/Image' for an rclpy message object (its class lives in sensor_msgs.msg._image)."""
    cls = type(msg)
    parts = cls.__module__.split(".")
    if len(parts) < 2 or parts[1] != "msg":
        raise TypeError(f"{cls.__module__}.{cls.__name__} is not a ROS 2 message class")
    return f"{parts[0]}/msg/{cls.__name__}"


def _header_stamp_ns(msg: Any) -> int:
    """The message's header stamp in ns, or 0 when it has no header (or a zero stamp)."""
    header = getattr(msg, "header", None)
    stamp = getattr(header, "stamp", None)
    if stamp is None:
        return 0
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _free_mb(path: Path) -> float:
    """Free space (MB, for unprivileged writers) of the filesystem holding ``path`` or its nearest
    existing ancestor."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free / 2**20


def _sync_storage(writer: Any) -> bool:
    """Put everything a rosbags Writer holds in memory on the disk; False if its storage offers no way.

    rosbags' MCAP storage keeps the chunk in progress in memory (``storage.chunk``) until 1 MiB: end it
    with ``close_chunk()`` (only when it holds messages: schema and channel records alone wait for the next
    one), then flush the file and fsync it. The sqlite3 storage writes in one transaction: commit it.
    """
    storage = writer.storage
    if storage is None:
        return True
    chunk = getattr(storage, "chunk", None)
    if chunk is not None and hasattr(storage, "close_chunk") and hasattr(storage, "bio"):
        if any(chunk.msgs.values()):
            storage.close_chunk()
        storage.bio.flush()
        os.fsync(storage.bio.fileno())
        return True
    conn = getattr(storage, "conn", None)
    if conn is not None:
        conn.commit()
        return True
    return False


def _payload_size(item: tuple[Any, ...]) -> int:
    """Bytes of a queued data item's payload (the image data; small messages count as 0)."""
    if item[0] == "raw":
        return len(item[3])
    data = getattr(item[2], "data", None)
    try:
        return len(data) if data is not None and not isinstance(data, str) else 0
    except TypeError:
        return 0


# Queue items: ("start", episode_id, instruction), ("msg", topic, payload, stamp_ns, qos_kind),
# ("raw", topic, msgtype, bytes, stamp_ns), ("end", outcome, note, verdict, status_msg), ("sync",), ("stop",)
_Item = tuple[Any, ...]


@dataclass
class _Episode:
    episode_id: str
    instruction: str
    path: Path
    writer: Any = None
    connections: dict[tuple[str, str], Any] = field(default_factory=dict)
    pending: list[tuple[str, str, bytes, bool]] = field(default_factory=list)
    first_stamp_ns: int = 0
    last_stamp_ns: int = 0
    failed: bool = False
    dropped: int = 0
    unflushed: int = 0  # messages handed to the writer since the last flush
    bytes_since_space_check: int = 0
    last_flush: float = field(default_factory=time.monotonic)


class EpisodeRecorder:
    """Writes each episode to its own rosbag2 bag on a background thread (see the module docstring).

    Usage (the node, one episode)::

        recorder = EpisodeRecorder("/data/episodes", storage="mcap", topics=RecordTopics(image="/cam/image"))
        recorder.start_episode("ep-0001", "put the cup in the sink")
        recorder.record_image(image_msg)            # every admitted frame
        recorder.record_step_reward(step_msg)       # every published StepReward
        recorder.record_failure_flag(flag_msg)      # every published FailureFlag
        recorder.record_episode_status(status_msg)  # every published EpisodeStatus
        recorder.end_episode(outcome=1, note="placed", verdict="succeeded")
        ...
        recorder.close()                            # at shutdown: finishes and closes the open bag

    Thread-safe: any thread may call the record methods; they return at once.
    """

    def __init__(
        self,
        directory: str | Path,
        storage: str = "mcap",
        topics: RecordTopics | None = None,
        max_queue: int = 64,
        max_queue_bytes: int = 256 * 1024 * 1024,
        msg_dir: str | Path | None = None,
        flush_s: float = 1.0,
        min_free_mb: float = 200.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        """Start the writer thread. Never touches the disk here: directory problems show in ``status()``.

        Args:
            directory: where episode bags go (created if missing; "~" is expanded).
            storage: "mcap" (default; what ``ros2 bag`` records by default since Iron) or "sqlite3".
            topics: the topic names written into the bags.
            max_queue: data messages waiting at most.
            max_queue_bytes: payload bytes (image data) waiting at most; with ``max_queue`` this bounds the
                memory a slow disk can tie up (a 640x480 rgb8 frame is 0.9 MB, a 1080p one 6 MB).
            msg_dir: directory of robometer_ros's .msg files; default: ``find_msg_definitions()``.
            flush_s: seconds of an episode at most held in memory before they are written and fsynced:
                what a crash of the process (or the machine) can lose of the episode in progress.
            min_free_mb: free space (MB) below which no episode is started and the one being written is
                closed (while its index and metadata still fit); 0 turns the check off.
            on_error: called (on the writer thread) with the text of every recorder error and per-message
                problem, e.g. the node's ROS logger; default: this module's logger.

        Raises:
            ValueError: unknown storage, max_queue < 1, max_queue_bytes < 1, flush_s <= 0 or min_free_mb < 0.
            FileNotFoundError: the robometer_ros message definitions cannot be found.
        """
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        if isinstance(max_queue_bytes, bool) or not isinstance(max_queue_bytes, int) or max_queue_bytes < 1:
            raise ValueError(f"max_queue_bytes must be an integer >= 1, got {max_queue_bytes!r}")
        if not (isinstance(flush_s, (int, float)) and math.isfinite(flush_s) and flush_s > 0):
            raise ValueError(f"flush_s must be a number of seconds > 0, got {flush_s!r}")
        if not (isinstance(min_free_mb, (int, float)) and math.isfinite(min_free_mb) and min_free_mb >= 0):
            raise ValueError(f"min_free_mb must be a number >= 0, got {min_free_mb!r}")
        from rosbags.rosbag2 import StoragePlugin

        self.directory = Path(directory).expanduser()  # "~/robometer_episodes" from a params file
        self.storage = storage
        self.topics = topics if topics is not None else RecordTopics()
        self._plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self._typestore = make_typestore(None if msg_dir is None else Path(msg_dir))
        self._max_queue = max_queue
        self._max_queue_bytes = max_queue_bytes
        self.flush_s = float(flush_s)
        self.min_free_mb = float(min_free_mb)
        self._on_error = on_error
        self._warned_no_sync = False
        self._queued_bytes = 0
        self._items: collections.deque[_Item] = collections.deque()
        self._data_items = 0
        self._cond = threading.Condition()
        self._status = RecorderStatus()
        self._closed = False
        self._busy = False  # the writer thread is handling an item (flush waits for it)
        self._serialize_rclpy: Callable[[Any], bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="episode-recorder", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side (never blocks on I/O)
    def start_episode(self, episode_id: str, instruction: str) -> None:
        """Open a new bag for ``episode_id`` (closing the previous one with outcome unknown if still open).

        The instruction is written as a std_msgs/String at the episode's first camera stamp.
        """
        self._put(("start", str(episode_id), str(instruction)), data=False)

    def end_episode(
        self, outcome: int = 0, note: str = "", verdict: str = "", status_msg: Any = None
    ) -> None:
        """Write the label and close the episode's bag.

        Args:
            outcome: EpisodeStatus.OUTCOME_* (0 unknown, 1 success, 2 failure) as the robot stack said.
            note: free text from ~/end_episode.
            verdict: the node's own verdict for the label, e.g. "succeeded" or "failed:REGRESSED".
            status_msg: the final EpisodeStatus the node published; when None the recorder writes one
                itself (state ENDED, this outcome, stamped with the episode's last camera stamp).
        """
        if int(outcome) not in OUTCOME_NAMES:
            logger.warning("end_episode: unknown outcome %r recorded as 'unknown'", outcome)
            outcome = 0
        self._put(("end", int(outcome), str(note), str(verdict), status_msg), data=False)

    def record_image(self, msg: Any) -> None:
        """Record an admitted camera frame (sensor_msgs Image or CompressedImage), at its header stamp."""
        self._put(("msg", self.topics.image, msg, 0, False), data=True)

    def record_step_reward(self, msg: Any) -> None:
        """Record a published StepReward."""
        self._put(("msg", self.topics.step_reward, msg, 0, False), data=True)

    def record_failure_flag(self, msg: Any) -> None:
        """Record a published FailureFlag (written with the latched QoS it is published with)."""
        self._put(("msg", self.topics.failure_flag, msg, 0, True), data=True)

    def record_episode_status(self, msg: Any) -> None:
        """Record a published EpisodeStatus (written with the latched QoS it is published with)."""
        self._put(("msg", self.topics.episode_status, msg, 0, True), data=True)

    def record(self, topic: str, msg: Any, stamp_ns: int = 0) -> None:
        """Record any message on ``topic``; ``stamp_ns`` 0 takes its header stamp (or the episode's)."""
        self._put(("msg", str(topic), msg, int(stamp_ns), False), data=True)

    def record_serialized(self, topic: str, msgtype: str, data: bytes, stamp_ns: int = 0) -> None:
        """Record an already CDR-serialized message of type ``msgtype`` (e.g. 'sensor_msgs/msg/Image')."""
        self._put(("raw", str(topic), str(msgtype), bytes(data), int(stamp_ns)), data=True)

    def status(self) -> RecorderStatus:
        """A snapshot of counts and the error state (for /diagnostics)."""
        with self._cond:
            return replace(self._status, queued=self._data_items)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until everything queued so far is written and on the disk (fsynced); False if ``timeout``
        seconds passed first."""
        self._put(("sync",), data=False)
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout)

    def close(self, timeout: float = 30.0) -> RecorderStatus:
        """Write what is queued, close the open bag (outcome unknown), stop the thread; returns the status.

        Idempotent. Never raises for I/O problems (see ``status()``).
        """
        with self._cond:
            if not self._closed:
                self._closed = True
                self._items.append(("stop",))
                self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("episode recorder did not finish writing within %.1f s", timeout)
        return self.status()

    def __enter__(self) -> EpisodeRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _put(self, item: _Item, data: bool) -> None:
        with self._cond:
            if self._closed:
                if data:
                    self._status = replace(self._status, dropped_not_written=self._status.dropped_not_written + 1)
                return
            if data:
                size = _payload_size(item)
                full = self._data_items >= self._max_queue
                # one message larger than the whole budget is still taken when the queue is empty
                full = full or (self._data_items and self._queued_bytes + size > self._max_queue_bytes)
                if full:
                    self._status = replace(self._status, dropped_queue_full=self._status.dropped_queue_full + 1)
                    return
                self._data_items += 1
                self._queued_bytes += size
            self._items.append(item)
            self._cond.notify_all()

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        episode: _Episode | None = None
        while True:
            with self._cond:
                timeout = None
                if episode is not None and episode.unflushed and not episode.failed:
                    timeout = max(0.0, episode.last_flush + self.flush_s - time.monotonic())
                self._cond.wait_for(lambda: bool(self._items), timeout)
                item = self._items.popleft() if self._items else ("sync",)  # timed out: flush deadline
                if item[0] in ("msg", "raw"):
                    self._data_items -= 1
                    self._queued_bytes -= _payload_size(item)
                self._busy = True
            kind = item[0]
            try:
                if kind == "sync":
                    if episode is not None:
                        self._flush(episode)
                elif kind == "stop":
                    if episode is not None:
                        self._finish(episode, 0, "", "", None)
                    return
                elif kind == "start":
                    if episode is not None:
                        self._finish(episode, 0, "", "", None)
                    episode = self._open(item[1], item[2])
                elif kind == "end":
                    if episode is not None:
                        self._finish(episode, *item[1:])
                    episode = None
                elif episode is None or episode.failed:
                    self._count(dropped_not_written=1)
                    if episode is not None:
                        episode.dropped += 1
                elif kind == "msg":
                    self._write_msg(episode, *item[1:])
                else:
                    _, topic, msgtype, data, stamp_ns = item
                    self._write(episode, topic, msgtype, data, stamp_ns, False)
                if (episode is not None and episode.unflushed and not episode.failed
                        and time.monotonic() - episode.last_flush >= self.flush_s):
                    self._flush(episode)
            except Exception as exc:  # the thread must survive anything; the node reads the error state
                logger.debug("episode recorder: unexpected error", exc_info=True)
                self._error(f"unexpected {type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _open(self, episode_id: str, instruction: str) -> _Episode:
        name = _SAFE_NAME.sub("_", episode_id) or "episode"
        path = self.directory / name
        suffix = 1
        while path.exists():  # never overwrite: a restarted node may reuse an id
            path = self.directory / f"{name}_{suffix}"
            suffix += 1
        episode = _Episode(episode_id, instruction, path)
        low = self._low_space(self.directory)
        if low:
            episode.failed = True
            self._error(f"not recording episode {episode_id}: {low}")
            return episode
        writer = None
        try:
            from rosbags.rosbag2 import Writer

            self.directory.mkdir(parents=True, exist_ok=True)
            writer = Writer(path, version=9, storage_plugin=self._plugin)
            writer.set_custom_data(LABEL_EPISODE_ID, episode_id)
            writer.set_custom_data(LABEL_INSTRUCTION, instruction)
            writer.open()
            episode.writer = writer
        except Exception as exc:
            episode.failed = True
            if writer is not None and writer.storage is None and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)  # a bag directory with no storage file: not a bag
            self._error(f"cannot open bag {path}: {type(exc).__name__}: {exc}")
            return episode
        with self._cond:
            self._status = replace(
                self._status,
                # ok comes back only once this episode's data reaches the disk (see _recording_works)
                message=f"recording episode {episode_id} to {path}" if self._status.ok else self._status.message,
                episodes_started=self._status.episodes_started + 1,
                current_bag=str(path),
            )
        String = self._typestore.types["std_msgs/msg/String"]
        data = self._typestore.serialize_cdr(String(data=instruction), "std_msgs/msg/String")
        self._write(episode, self.topics.instruction, "std_msgs/msg/String", bytes(data), 0, False)
        return episode

    def _write_msg(self, episode: _Episode, topic: str, msg: Any, stamp_ns: int, latched: bool) -> None:
        try:
            msgtype, data = self._serialize(msg)
        except Exception as exc:
            episode.dropped += 1
            self._count(dropped_not_written=1)
            self._note_error(f"cannot serialize a message for {topic}: {type(exc).__name__}: {exc}")
            return
        self._write(episode, topic, msgtype, data, stamp_ns or _header_stamp_ns(msg), latched)

    def _serialize(self, msg: Any) -> tuple[str, bytes]:
        msgtype = getattr(msg, "__msgtype__", None)
        if isinstance(msgtype, str):  # a rosbags typestore message
            return msgtype, bytes(self._typestore.serialize_cdr(msg, msgtype))
        if self._serialize_rclpy is None:
            from rclpy.serialization import serialize_message  # lazy: only nodes hand us rclpy messages

            self._serialize_rclpy = serialize_message
        return _rclpy_type_name(msg), bytes(self._serialize_rclpy(msg))

    def _write(
        self, episode: _Episode, topic: str, msgtype: str, data: bytes, stamp_ns: int, latched: bool
    ) -> None:
        """Write one message, or hold it until the episode's first camera stamp is known."""
        if stamp_ns <= 0:
            if episode.last_stamp_ns == 0:
                if len(episode.pending) < 64:
                    episode.pending.append((topic, msgtype, data, latched))
                else:
                    episode.dropped += 1
                    self._count(dropped_not_written=1)
                return
            stamp_ns = episode.last_stamp_ns
        if episode.first_stamp_ns == 0:
            episode.first_stamp_ns = stamp_ns
        episode.last_stamp_ns = max(episode.last_stamp_ns, stamp_ns)
        pending, episode.pending = episode.pending, []
        for p_topic, p_type, p_data, p_latched in pending:
            self._write_now(episode, p_topic, p_type, p_data, episode.first_stamp_ns, p_latched)
        self._write_now(episode, topic, msgtype, data, stamp_ns, latched)

    def _write_now(
        self, episode: _Episode, topic: str, msgtype: str, data: bytes, stamp_ns: int, latched: bool
    ) -> None:
        if episode.failed:
            episode.dropped += 1
            self._count(dropped_not_written=1)
            return
        try:
            key = (topic, msgtype)
            connection = episode.connections.get(key)
            if connection is None:
                if msgtype not in self._typestore.types:
                    episode.dropped += 1
                    self._count(dropped_not_written=1)
                    self._note_error(f"no message definition for {msgtype} (topic {topic}); not recorded")
                    return
                connection = episode.writer.add_connection(
                    topic,
                    msgtype,
                    typestore=self._typestore,
                    offered_qos_profiles=_latched_qos() if latched else (),
                )
                episode.connections[key] = connection
            episode.writer.write(connection, stamp_ns, data)
            episode.unflushed += 1
            episode.bytes_since_space_check += len(data)
        except Exception as exc:
            episode.dropped += 1
            self._count(dropped_not_written=1)
            self._fail_episode(episode, f"write to {episode.path} failed: {type(exc).__name__}: {exc}")
            return
        self._count(messages_written=1)
        if self.min_free_mb and episode.bytes_since_space_check >= self.min_free_mb * 2**20 / 4:
            # A fast camera can write more than the margin between two flushes: look again after every
            # quarter of it, so the bag is closed while its index and metadata still fit.
            episode.bytes_since_space_check = 0
            low = self._low_space(episode.path)
            if low:
                self._fail_episode(episode, f"stopped recording episode {episode.episode_id}: {low}; its bag "
                                            "is closed with what was written")

    def _finish(self, episode: _Episode, outcome: int, note: str, verdict: str, status_msg: Any) -> None:
        """Write the final status and label, then close the bag (no-op for an episode that failed)."""
        if episode.failed:
            return
        if status_msg is not None:
            self._write_msg(episode, self.topics.episode_status, status_msg, 0, True)
        else:
            self._write_final_status(episode, outcome)
        # Pending header-less messages of an episode without any camera stamp are written at time 0.
        for p_topic, p_type, p_data, p_latched in episode.pending:
            self._write_now(episode, p_topic, p_type, p_data, episode.last_stamp_ns, p_latched)
        episode.pending = []
        if episode.failed:
            return
        writer = episode.writer
        try:
            writer.set_custom_data(LABEL_OUTCOME, OUTCOME_NAMES.get(outcome, "unknown"))
            writer.set_custom_data(LABEL_NOTE, note)
            writer.set_custom_data(LABEL_VERDICT, verdict)
            writer.set_custom_data(LABEL_DROPPED, str(episode.dropped))
            writer.set_custom_data(LABEL_STOPPED, "")
            writer.close()
        except Exception as exc:
            self._fail_episode(episode, f"closing {episode.path} failed: {type(exc).__name__}: {exc}")
            return
        episode.writer = None
        self._recording_works(episode)
        with self._cond:
            self._status = replace(
                self._status,
                message=f"idle (last bag {episode.path})" if self._status.ok else self._status.message,
                episodes_closed=self._status.episodes_closed + 1,
                current_bag="",
                last_closed_bag=str(episode.path),
            )

    def _write_final_status(self, episode: _Episode, outcome: int) -> None:
        types = self._typestore.types
        Status = types[f"{PACKAGE}/msg/EpisodeStatus"]
        Header = types["std_msgs/msg/Header"]
        Time = types["builtin_interfaces/msg/Time"]

        def time(ns: int) -> Any:
            return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)

        msg = Status(
            header=Header(stamp=time(episode.last_stamp_ns), frame_id=""),
            episode_id=episode.episode_id,
            instruction=episode.instruction,
            start_stamp=time(episode.first_stamp_ns),
            state=_STATE_ENDED,
            outcome=outcome,
            steps=0,
            frames=0,
            progress=0.0,
            success_probability=0.0,
        )
        self._write_msg(episode, self.topics.episode_status, msg, 0, True)

    def _flush(self, episode: _Episode) -> None:
        """Write what the episode's writer holds to the disk (and check the free space first)."""
        if episode.failed or episode.writer is None:
            return
        low = self._low_space(episode.path)
        if low:
            self._fail_episode(episode, f"stopped recording episode {episode.episode_id}: {low}; its bag "
                                        "is closed with what was written")
            return
        try:
            synced = _sync_storage(episode.writer)
        except Exception as exc:
            self._fail_episode(episode, f"writing {episode.path} to disk failed: {type(exc).__name__}: {exc}")
            return
        if not synced and not self._warned_no_sync:
            self._warned_no_sync = True
            self._report(f"this rosbags version's {self.storage} writer cannot be flushed: a crash may lose "
                         "more than flush_s of an episode")
        episode.unflushed = 0
        episode.last_flush = time.monotonic()
        self._recording_works(episode)

    def _low_space(self, path: Path) -> str:
        """Why there is too little space to record at ``path`` ("" when there is enough or no limit)."""
        try:
            free = _free_mb(path)
        except OSError:
            return ""  # cannot tell: opening or writing the bag reports the real problem
        with self._cond:
            self._status = replace(self._status, free_mb=free)
        if free >= self.min_free_mb:
            return ""
        return (f"disk nearly full: {free:.0f} MB free on {path}, below min_free_mb {self.min_free_mb:g} "
                "(free space or lower record_min_free_mb)")

    def _recording_works(self, episode: _Episode) -> None:
        """Data of ``episode`` reached the disk: an earlier error state ends here."""
        with self._cond:
            if self._status.ok:
                return
            self._status = replace(self._status, ok=True, message=f"recording episode {episode.episode_id} "
                                                                  f"to {episode.path}")
        logger.info("episode recorder: recording works again (%s)", episode.path)

    def _fail_episode(self, episode: _Episode, message: str) -> None:
        """Stop writing this episode; close what was written if the storage still allows it."""
        episode.failed = True
        self._error(message)
        writer, episode.writer = episode.writer, None
        if writer is None:
            return
        try:
            for key in (LABEL_NOTE, LABEL_VERDICT):
                writer.custom_data.setdefault(key, "")
            writer.custom_data.setdefault(LABEL_OUTCOME, OUTCOME_NAMES[0])  # never ended: the outcome is unknown
            writer.set_custom_data(LABEL_DROPPED, str(episode.dropped))
            writer.set_custom_data(LABEL_STOPPED, message)
            writer.close()  # keeps what was written readable when the failure was transient
        except Exception:
            try:
                writer.abort()  # what was flushed stays repairable (robometer-dataset repair)
            except Exception:
                logger.debug("aborting %s failed too", episode.path, exc_info=True)
        with self._cond:
            self._status = replace(self._status, current_bag="")

    def _report(self, message: str) -> None:
        """Hand one error text to ``on_error`` (or the module logger)."""
        if self._on_error is None:
            logger.error("episode recorder: %s", message)
            return
        try:
            self._on_error(message)
        except Exception:  # a broken callback must not stop the recording
            logger.exception("episode recorder: on_error failed; the error was: %s", message)

    def _error(self, message: str) -> None:
        self._report(message)
        with self._cond:
            self._status = replace(
                self._status,
                ok=False,
                message=f"error: {message}",
                last_error=message,
                errors=self._status.errors + 1,
            )

    def _note_error(self, message: str) -> None:
        """A problem with one message (not with the bag): remembered, but the recorder stays ok."""
        self._report(message)
        with self._cond:
            self._status = replace(self._status, last_error=message)

    def _count(self, messages_written: int = 0, dropped_not_written: int = 0) -> None:
        with self._cond:
            self._status = replace(
                self._status,
                messages_written=self._status.messages_written + messages_written,
                dropped_not_written=self._status.dropped_not_written + dropped_not_written,
            )
