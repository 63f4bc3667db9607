"""rosbag2 bags (MCAP or sqlite3; also ROS 1 .bag files) -> Trajectories, via rosbags (no ROS install).

Reads bags written by the reward node's recorder and bags from any other robot stack:

* frames from one image topic: ``sensor_msgs/msg/Image`` (rgb8, bgr8, rgba8, bgra8, mono8, 16-bit and
  YUV variants, see robometer_ros.images) or ``sensor_msgs/msg/CompressedImage`` (jpeg, png); a frame's
  time is its header stamp (the bag's receive time when the stamp is zero);
* the instruction from a ``std_msgs/msg/String`` topic, the node's EpisodeStatus / StepReward, the
  recorder's bag metadata, or a fixed instruction;
* episodes split by the node's episode ids (``robometer_ros/msg/EpisodeStatus`` / ``StepReward``, or
  the recorder's per-bag episode label) when present, otherwise by time gaps between frames (and by
  instruction changes);
* the quality label from the end-of-episode outcome (success -> successful, failure -> failure,
  unknown -> "unknown" by default (left out of training pairs and label-based metrics, and said so in the
  report), or a chosen label, or skip).

Each bag is read twice: the first pass reads stamps and the small topics and decides the episodes and
the frames to keep (frame-rate and max-frames subsampling), the second decodes only the kept frames and
hands over one episode at a time, so memory holds one episode's kept frames.

Nothing is dropped silently: unreadable bags, undecodable frames, frames outside any episode, and empty
or too-short episodes are counted in the ImportReport with their reasons. An MCAP bag cut short (the
recorder killed, a full disk: no metadata.yaml or no MCAP summary) is named as such, with the command that
repairs it (robometer_ros.training.data.bag_repair); with ``repair=True`` it is repaired in place and imported,
and the report counts what was recovered.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robometer_ros.episode import subsample_indices
from robometer_ros.images import ImageConversionError, compressed_msg_to_rgb, image_msg_to_rgb
from robometer_ros.training.data.store import ImportTally, format_counts
from robometer_ros.trajectory import FAILURE, LABELS, SUCCESSFUL, UNKNOWN, Trajectory

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
STRING_TYPE = "std_msgs/msg/String"
SKIP = "skip"  # unknown_label value: leave episodes without an outcome out (counted)
OUTCOME_TO_LABEL = {1: SUCCESSFUL, 2: FAILURE}  # EpisodeStatus.OUTCOME_SUCCESS / OUTCOME_FAILURE
_OUTCOME_NAMES = {"success": 1, "failure": 2, "unknown": 0}  # recorder custom_data values
_STATE_ENDED = 4  # EpisodeStatus.STATE_ENDED
_NS = 1_000_000_000


class BagImportError(RuntimeError):
    """A bag cannot be imported; the message names the bag and the cause."""


@dataclass
class BagImportOptions:
    """How to turn bags into trajectories.

    Attributes:
        image_topic: camera topic; None picks the bag's only Image / CompressedImage topic.
        instruction: fixed instruction for every episode (overrides everything the bag says).
        instruction_topic: std_msgs/String topic; None uses the bag's only String topic if it has one.
        episode_topic: EpisodeStatus topic; None finds it by type (``*/msg/EpisodeStatus``).
        step_reward_topic: StepReward topic; None finds it by type (``*/msg/StepReward``).
        split: "auto" (episode ids when the bag has them, else gaps), "episode_id", "gap" or "none"
            (one episode per bag).
        gap: seconds between frames that start a new episode in gap mode.
        split_on_instruction: in gap mode, also start a new episode when the instruction changes.
        unknown_label: quality label of episodes without an outcome: "unknown" (default), another LABELS
            value, or "skip".
        max_fps: keep at most this many frames per second (None: all).
        max_frames: thin each episode evenly to at most this many frames, first and last kept (None: all).
        min_frames: episodes with fewer kept frames are skipped (and counted).
        shortest_edge: resize frames so the shorter side is this many pixels (None: keep the size).
        data_source: Trajectory.data_source of every episode.
        embodiment: Trajectory.embodiment of every episode.
        repair: repair MCAP bags that were cut short (in place, the cut file kept as ``*.orig``) before
            reading them; otherwise such a bag fails with the repair command in its error.
    """

    image_topic: str | None = None
    instruction: str | None = None
    instruction_topic: str | None = None
    episode_topic: str | None = None
    step_reward_topic: str | None = None
    split: str = "auto"
    gap: float = 2.0
    split_on_instruction: bool = True
    unknown_label: str = UNKNOWN
    max_fps: float | None = None
    max_frames: int | None = None
    min_frames: int = 3
    shortest_edge: int | None = None
    data_source: str = "rosbag"
    embodiment: str | None = None
    repair: bool = False

    def __post_init__(self) -> None:
        if self.split not in ("auto", "episode_id", "gap", "none"):
            raise ValueError(f"split must be auto, episode_id, gap or none, got {self.split!r}")
        if self.unknown_label not in (*LABELS, SKIP):
            raise ValueError(f"unknown_label must be one of {(*LABELS, SKIP)}, got {self.unknown_label!r}")
        if self.gap <= 0:
            raise ValueError(f"gap must be > 0 seconds, got {self.gap}")
        if self.max_fps is not None and self.max_fps <= 0:
            raise ValueError(f"max_fps must be > 0, got {self.max_fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.min_frames < 1:
            raise ValueError(f"min_frames must be >= 1, got {self.min_frames}")
        if self.shortest_edge is not None and self.shortest_edge < 8:
            raise ValueError(f"shortest_edge must be >= 8 pixels, got {self.shortest_edge}")
        if self.instruction is not None and not self.instruction.strip():
            raise ValueError("instruction must not be empty")


@dataclass
class ImportReport(ImportTally):
    """What a bag import did, with every skip counted by reason."""

    bags_read: int = 0
    bags_failed: list[tuple[str, str]] = field(default_factory=list)
    frames_skipped: Counter = field(default_factory=Counter)
    bags_repaired: list[tuple[str, int]] = field(default_factory=list)  # (bag, messages recovered)

    @property
    def ok(self) -> bool:
        """True when every bag could be read (skipped episodes / frames do not make it fail)."""
        return not self.bags_failed

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "bags_read": self.bags_read,
            "bags_failed": [{"bag": bag, "error": error} for bag, error in self.bags_failed],
            "frames_skipped": dict(self.frames_skipped),
            "bags_repaired": [{"bag": bag, "messages_recovered": count} for bag, count in self.bags_repaired],
            **self.tally_dict(),
        }

    def format(self) -> str:
        """Human-readable summary."""
        lines = [f"bags read: {self.bags_read}, failed: {len(self.bags_failed)}", *self.tally_lines()]
        if self.frames_skipped:
            lines.append(f"frames skipped: {format_counts(self.frames_skipped)}")
        lines += [f"repaired {bag} (cut short): {count} messages recovered" for bag, count in self.bags_repaired]
        if self.labels.get(UNKNOWN):
            lines.append(f"{self.labels[UNKNOWN]} episodes had no end-of-episode outcome and were imported as "
                         f"'{UNKNOWN}' (left out of training pairs and label-based metrics; --unknown-label "
                         "sets another label or skips them)")
        lines += [f"FAILED {bag}: {error}" for bag, error in self.bags_failed]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def find_bags(path: str | os.PathLike[str]) -> list[Path]:
    """The bags at `path`: a rosbag2 directory (with metadata.yaml), a single .mcap / .db3 / .bag file,
    or a folder searched recursively for those (sorted; files inside a bag directory are not separate
    bags)."""
    root = Path(path)
    if not root.exists():
        raise BagImportError(f"{root}: no such file or directory")
    if root.is_file():
        if root.suffix not in (".mcap", ".db3", ".bag"):
            raise BagImportError(f"{root}: not a bag (expected a .mcap, .db3 or .bag file or a bag directory)")
        return [root]
    if (root / "metadata.yaml").is_file():
        return [root]
    bags: list[Path] = []
    for directory, subdirectories, files in os.walk(root):
        here = Path(directory)
        if (here / "metadata.yaml").is_file():
            bags.append(here)
            subdirectories[:] = []
            continue
        subdirectories.sort()
        bags += [here / name for name in sorted(files) if Path(name).suffix in (".mcap", ".db3", ".bag")]
    if not bags:
        raise BagImportError(f"{root}: no rosbag2 directories (metadata.yaml) or .mcap / .db3 / .bag files")
    return sorted(bags)


def _stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * _NS + int(stamp.nanosec)


def _open_reader(bag: Path, typestore: Any) -> Any:
    from rosbags.highlevel import AnyReader

    try:
        reader = AnyReader([bag], default_typestore=typestore)
        reader.open()
    except Exception as error:  # rosbags raises several types (AnyReaderError, ReaderError, yaml, sqlite)
        raise BagImportError(f"{bag}: cannot open bag: {type(error).__name__}: {error}") from error
    return reader


@functools.lru_cache(maxsize=1)
def _default_typestore() -> Any:
    """ROS 2 Kilted types plus robometer_ros's messages (for bags that carry no definitions)."""
    from robometer_ros.recorder import make_typestore

    try:
        return make_typestore()
    except FileNotFoundError:
        from rosbags.typesys import Stores, get_typestore

        return get_typestore(Stores.ROS2_KILTED)


def _recorder_label(bag: Path) -> dict[str, str]:
    """The recorder's custom_data episode label of a bag directory ({} if none)."""
    if not bag.is_dir():
        return {}
    from robometer_ros.recorder import read_episode_label

    try:
        return read_episode_label(bag)
    except Exception:  # unreadable metadata is reported when the bag is opened
        return {}


@dataclass
class _Episode:
    """An episode decided in the first pass."""

    key: str
    instruction: str | None
    label: str | None
    frames: list[int]  # positions in the bag's frame list, kept after subsampling
    source_frames: int
    metadata: dict[str, Any]


@dataclass
class _FrameStamp:
    stamp_ns: int
    bag_ns: int


def _topics_text(topics: dict[str, str]) -> str:
    return ", ".join(f"{name} [{kind}]" for name, kind in sorted(topics.items())) or "(no topics)"


class _BagReader:
    """Both passes over one bag."""

    def __init__(self, bag: Path, options: BagImportOptions, report: ImportReport, typestore: Any) -> None:
        self.bag = bag
        self.options = options
        self.report = report
        self.default_typestore = typestore
        self.reader = _open_reader(bag, typestore)
        self.topics = {name: info.msgtype or "?" for name, info in self.reader.topics.items()}

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a half-broken bag must not hide the real error
            self.reader.close()

    def _deserialize(self, raw: bytes, msgtype: str) -> Any:
        if msgtype in self.reader.typestore.fielddefs:
            return self.reader.deserialize(raw, msgtype)
        return self.default_typestore.deserialize_cdr(raw, msgtype)

    def _topic(self, explicit: str | None, accept: Callable[[str], bool], what: str, required: bool) -> str | None:
        if explicit is not None:
            if explicit not in self.topics:
                raise BagImportError(
                    f"{self.bag}: no {what} topic {explicit!r}; the bag has: {_topics_text(self.topics)}"
                )
            if not accept(self.topics[explicit]):
                raise BagImportError(
                    f"{self.bag}: topic {explicit!r} is {self.topics[explicit]}, not a {what} topic"
                )
            return explicit
        matches = sorted(name for name, kind in self.topics.items() if accept(kind))
        if len(matches) == 1:
            return matches[0]
        if required:
            if not matches:
                raise BagImportError(f"{self.bag}: no {what} topic; the bag has: {_topics_text(self.topics)}")
            raise BagImportError(f"{self.bag}: several {what} topics {matches}: choose one")
        return None

    def _messages(self, topic: str) -> Iterator[tuple[int, Any]]:
        connections = [c for c in self.reader.connections if c.topic == topic]
        for connection, bag_ns, raw in self.reader.messages(connections=connections):
            try:
                message = self._deserialize(raw, connection.msgtype)
            except Exception as error:
                raise BagImportError(
                    f"{self.bag}: cannot decode a {connection.msgtype} message on {topic}: {error}"
                ) from error
            yield bag_ns, message

    def plan(self) -> tuple[str, list[_Episode]]:
        """First pass: the image topic and the episodes with the frames to keep."""
        options = self.options
        image_topic = self._topic(options.image_topic, lambda t: t in IMAGE_TYPES, "image", required=True)
        assert image_topic is not None
        frames: list[_FrameStamp] = []
        zero_stamps = 0
        for bag_ns, message in self._messages(image_topic):
            stamp = _stamp_ns(message.header.stamp)
            if stamp == 0:
                zero_stamps += 1
                stamp = bag_ns
            frames.append(_FrameStamp(stamp, bag_ns))
        if zero_stamps:
            self.report.notes.append(
                f"{self.bag}: {zero_stamps} frames had a zero header stamp; used the bag's receive time"
            )

        instructions = _InstructionTimeline([])
        if options.instruction is None:
            instruction_topic = self._topic(
                options.instruction_topic, lambda t: t == STRING_TYPE, "std_msgs/String instruction", required=False
            )
            if instruction_topic is not None:
                instructions = _InstructionTimeline(
                    [(bag_ns, str(m.data)) for bag_ns, m in self._messages(instruction_topic)]
                )

        label = _recorder_label(self.bag)
        status_topic = self._topic(
            options.episode_topic, lambda t: t.endswith("/msg/EpisodeStatus"), "EpisodeStatus", required=False
        )
        reward_topic = self._topic(
            options.step_reward_topic, lambda t: t.endswith("/msg/StepReward"), "StepReward", required=False
        )
        statuses = [m for _, m in self._messages(status_topic)] if status_topic else []
        rewards = [m for _, m in self._messages(reward_topic)] if reward_topic else []

        split = options.split
        has_ids = bool(statuses or rewards or label.get("robometer_ros.episode_id"))
        if split == "auto":
            split = "episode_id" if has_ids else "gap"
        if split == "episode_id" and not has_ids:
            raise BagImportError(
                f"{self.bag}: split=episode_id but the bag has no EpisodeStatus or StepReward messages and no "
                f"recorder episode label; the bag has: {_topics_text(self.topics)}"
            )
        order = sorted(range(len(frames)), key=lambda i: (frames[i].stamp_ns, i))
        if split == "episode_id":
            episodes = self._split_by_ids(frames, order, statuses, rewards, label)
        elif split == "gap":
            episodes = self._split_by_gaps(frames, order, instructions)
        else:
            episodes = [_Episode("0", None, None, order, len(order), {})]
        for episode in episodes:
            if episode.instruction is None:
                episode.instruction = self._instruction_for(episode, frames, instructions, label)
            episode.source_frames = len(episode.frames)
            episode.frames = self._subsample(episode.frames, frames)
            # "episode_split", not "split": in a dataset "split" names the train / val split (open_split,
            # robometer-eval --split), and an imported episode has none until `robometer-dataset split`.
            episode.metadata.update({"bag": str(self.bag), "image_topic": image_topic, "episode_split": split,
                                     "source_frames": episode.source_frames})
        return image_topic, episodes

    def _split_by_ids(
        self,
        frames: list[_FrameStamp],
        order: list[int],
        statuses: list[Any],
        rewards: list[Any],
        label: dict[str, str],
    ) -> list[_Episode]:
        """Episodes from the node's ids: each runs from its first frame stamp to its ENDED stamp (or the
        next episode's start when it was never ended)."""
        info: dict[str, dict[str, Any]] = {}

        def entry(episode_id: str) -> dict[str, Any]:
            return info.setdefault(episode_id, {"starts": [], "stamps": [], "ended": None, "outcome": 0,
                                                "instruction": None})

        for message in statuses:
            item = entry(str(message.episode_id))
            start = _stamp_ns(message.start_stamp)
            header = _stamp_ns(message.header.stamp)
            if start:
                item["starts"].append(start)
            if header:
                item["stamps"].append(header)
            if int(message.state) == _STATE_ENDED:
                item["ended"] = header or None
            if int(message.outcome):
                item["outcome"] = int(message.outcome)
            if str(message.instruction).strip():
                item["instruction"] = str(message.instruction)
        for message in rewards:
            item = entry(str(message.episode_id))
            stamps = [_stamp_ns(s) for s in message.frame_stamps]
            header = _stamp_ns(message.header.stamp)
            item["stamps"] += [s for s in [*stamps, header] if s]
            if stamps and stamps[0]:
                item["starts"].append(stamps[0])
            if item["instruction"] is None and str(message.instruction).strip():
                item["instruction"] = str(message.instruction)
        recorder_id = label.get("robometer_ros.episode_id")
        if recorder_id:
            item = entry(recorder_id)
            outcome = _OUTCOME_NAMES.get(label.get("robometer_ros.outcome", "unknown"), 0)
            item["outcome"] = item["outcome"] or outcome
            if item["instruction"] is None and label.get("robometer_ros.instruction", "").strip():
                item["instruction"] = label["robometer_ros.instruction"]
            if len(info) == 1 and frames:
                # A recorder bag holds exactly its episode's admitted frames.
                item["starts"].append(min(f.stamp_ns for f in frames))
                item["stamps"].append(max(f.stamp_ns for f in frames))

        spans = []
        for episode_id, item in info.items():
            known = item["starts"] + item["stamps"]
            if not known:
                self.report.episodes_skipped["no_stamps"] += 1
                self.report.notes.append(f"{self.bag}: episode {episode_id!r} has no stamped messages; skipped")
                continue
            spans.append([min(item["starts"] or known), item, episode_id])
        spans.sort(key=lambda span: (span[0], span[2]))
        episodes = []
        position = 0
        assigned = 0
        for number, (start, item, episode_id) in enumerate(spans):
            if item["ended"] is not None:
                end = max(item["ended"], *item["stamps"]) if item["stamps"] else item["ended"]
            elif number + 1 < len(spans):
                end = spans[number + 1][0] - 1
            else:
                end = math.inf
            members = []
            while position < len(order) and frames[order[position]].stamp_ns < start:
                position += 1  # before this episode: outside every episode (counted below)
            while position < len(order) and frames[order[position]].stamp_ns <= end:
                members.append(order[position])
                position += 1
            assigned += len(members)
            label_name = OUTCOME_TO_LABEL.get(item["outcome"])
            episodes.append(_Episode(episode_id, item["instruction"], label_name, members, len(members),
                                     {"episode_id": episode_id, "outcome": item["outcome"]}))
        outside = len(frames) - assigned
        if outside:
            self.report.frames_skipped["outside_episodes"] += outside
        return episodes

    def _split_by_gaps(
        self, frames: list[_FrameStamp], order: list[int], instructions: _InstructionTimeline
    ) -> list[_Episode]:
        """Episodes separated by gaps of more than `gap` seconds (and, optionally, instruction changes)."""
        gap_ns = self.options.gap * _NS
        episodes: list[_Episode] = []
        current: list[int] = []
        current_instruction = None
        for position in order:
            instruction = instructions.latest(frames[position].bag_ns)
            new_episode = bool(current) and (
                frames[position].stamp_ns - frames[current[-1]].stamp_ns > gap_ns
                or (self.options.split_on_instruction and instructions and instruction != current_instruction)
            )
            if new_episode:
                episodes.append(_Episode(str(len(episodes)), current_instruction, None, current, len(current), {}))
                current = []
            if not current:
                current_instruction = instruction
            current.append(position)
        if current:
            episodes.append(_Episode(str(len(episodes)), current_instruction, None, current, len(current), {}))
        return episodes

    def _instruction_for(
        self, episode: _Episode, frames: list[_FrameStamp], instructions: _InstructionTimeline, label: dict[str, str]
    ) -> str | None:
        if self.options.instruction is not None:
            return self.options.instruction
        if episode.frames:
            first = min(frames[i].bag_ns for i in episode.frames)
            found = instructions.latest(first)
            if found is None:  # an instruction published just after the first frame
                found = instructions.first_within(first, max(frames[i].bag_ns for i in episode.frames))
            if found is not None:
                return found
        text = label.get("robometer_ros.instruction", "").strip()
        return text or None

    def _subsample(self, members: list[int], frames: list[_FrameStamp]) -> list[int]:
        options = self.options
        kept = members
        if options.max_fps is not None and kept:
            interval = _NS / options.max_fps
            thinned = [kept[0]]
            for position in kept[1:]:
                # a 1 % tolerance so that a 30 Hz camera thinned to 10 fps keeps every third frame
                if frames[position].stamp_ns - frames[thinned[-1]].stamp_ns >= 0.99 * interval:
                    thinned.append(position)
            kept = thinned
        if options.max_frames is not None and len(kept) > options.max_frames:
            kept = [kept[i] for i in subsample_indices(len(kept), options.max_frames)]
        return kept

    def trajectories(self, image_topic: str, episodes: list[_Episode]) -> Iterator[Trajectory]:
        """Second pass: decode the kept frames, one episode at a time, in bag order."""
        options = self.options
        report = self.report
        wanted: dict[int, _Episode] = {}
        usable: list[_Episode] = []
        for episode in episodes:
            reason = None
            if episode.source_frames == 0:
                reason = "empty"
            elif episode.instruction is None:
                reason = "no_instruction"
            elif episode.label is None and options.unknown_label == SKIP:
                reason = "no_outcome"
            if reason is not None:
                report.episodes_skipped[reason] += 1
                report.frames_skipped[f"episode_{reason}"] += episode.source_frames
                if reason == "no_instruction":
                    report.notes.append(
                        f"{self.bag}: episode {episode.key!r} has no instruction; pass an instruction or an "
                        f"instruction topic (the bag has: {_topics_text(self.topics)})"
                    )
                continue
            if episode.source_frames > len(episode.frames):
                report.frames_skipped["subsampled"] += episode.source_frames - len(episode.frames)
            usable.append(episode)
            for position in episode.frames:
                wanted[position] = episode
        if not usable:
            return
        last_position = {id(e): max(e.frames) if e.frames else -1 for e in usable}
        decoded: dict[int, dict[int, tuple[np.ndarray, int]]] = {id(e): {} for e in usable}
        finished: set[int] = set()
        pending = sorted(usable, key=lambda e: last_position[id(e)])
        position = -1
        for bag_ns, message in self._messages(image_topic):
            position += 1
            episode = wanted.get(position)
            if episode is not None:
                try:
                    if hasattr(message, "format"):
                        frame = compressed_msg_to_rgb(message)
                    else:
                        frame = image_msg_to_rgb(message)
                    frame = _resize(frame, options.shortest_edge)
                    stamp = _stamp_ns(message.header.stamp) or bag_ns
                    decoded[id(episode)][position] = (frame, stamp)
                except ImageConversionError as error:
                    report.frames_skipped[f"undecodable_{error.reason}"] += 1
                    if report.frames_skipped[f"undecodable_{error.reason}"] == 1:
                        report.notes.append(f"{self.bag}: frame {position} on {image_topic}: {error}")
            while pending and last_position[id(pending[0])] <= position:
                episode = pending.pop(0)
                finished.add(id(episode))
                trajectory = self._finish(episode, decoded.pop(id(episode)))
                if trajectory is not None:
                    yield trajectory
        for episode in pending:  # the bag ended early (fewer messages on the second pass)
            trajectory = self._finish(episode, decoded.pop(id(episode)))
            if trajectory is not None:
                yield trajectory

    def _finish(self, episode: _Episode, decoded: dict[int, tuple[np.ndarray, int]]) -> Trajectory | None:
        report = self.report
        positions = [p for p in episode.frames if p in decoded]
        if positions:
            shape = decoded[positions[0]][0].shape
            mismatched = [p for p in positions if decoded[p][0].shape != shape]
            if mismatched:
                report.frames_skipped["size_changed"] += len(mismatched)
                positions = [p for p in positions if p not in set(mismatched)]
        if len(positions) < self.options.min_frames:
            reason = "empty" if not positions else "too_short"
            report.episodes_skipped[reason] += 1
            report.frames_skipped[f"episode_{reason}"] += len(positions)
            return None
        frames = np.stack([decoded[p][0] for p in positions])
        stamps = np.array([decoded[p][1] for p in positions], dtype=np.int64)
        label = episode.label or self.options.unknown_label
        episode_id = episode.metadata.get("episode_id") or f"{self.bag.name}-{int(episode.key):04d}"
        metadata = dict(episode.metadata)
        metadata["label_source"] = "outcome" if episode.label else "default"
        report.episodes_written += 1
        report.frames_written += len(positions)
        report.labels[label] += 1
        return Trajectory(
            instruction=str(episode.instruction),
            frames=frames,
            frame_stamps=stamps / _NS,
            quality_label=label,
            data_source=self.options.data_source,
            embodiment=self.options.embodiment,
            episode_id=episode_id,
            metadata=metadata,
        )


class _InstructionTimeline:
    """Instructions by bag time (empty strings dropped), with O(log n) look-ups."""

    def __init__(self, messages: list[tuple[int, str]]) -> None:
        kept = sorted(((t, text) for t, text in messages if text.strip()), key=lambda item: item[0])
        self.times = [t for t, _ in kept]
        self.texts = [text for _, text in kept]

    def __bool__(self) -> bool:
        return bool(self.times)

    def latest(self, at_ns: int) -> str | None:
        """The last instruction published at or before `at_ns`."""
        index = bisect.bisect_right(self.times, at_ns)
        return self.texts[index - 1] if index else None

    def first_within(self, start_ns: int, end_ns: int) -> str | None:
        """The first instruction published in [start_ns, end_ns]."""
        index = bisect.bisect_left(self.times, start_ns)
        return self.texts[index] if index < len(self.times) and self.times[index] <= end_ns else None


def _resize(frame: np.ndarray, shortest_edge: int | None) -> np.ndarray:
    if shortest_edge is None:
        return frame
    height, width = frame.shape[:2]
    scale = shortest_edge / min(height, width)
    if scale == 1.0:
        return frame
    from PIL import Image

    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR))


def read_bag(bag: str | os.PathLike[str], options: BagImportOptions | None = None,
             report: ImportReport | None = None) -> Iterator[Trajectory]:
    """The trajectories of one bag, one episode at a time. Raises BagImportError for an unreadable bag
    or a missing topic; counts skipped episodes and frames in `report`."""
    from robometer_ros.training.data.bag_repair import BagRepairError, needs_repair, repair_bag

    options = options or BagImportOptions()
    report = report if report is not None else ImportReport()
    bag = Path(bag)
    if needs_repair(bag):
        if not options.repair:
            raise BagImportError(
                f"{bag}: cut short (no metadata.yaml or no MCAP summary: the recording was interrupted); "
                f"repair it with `robometer-dataset repair {bag}` or import with --repair"
            )
        try:
            repaired = repair_bag(bag)
        except BagRepairError as error:
            raise BagImportError(f"{bag}: cut short and not repairable: {error}") from error
        report.bags_repaired.append((str(bag), repaired.recovered))
        bag = repaired.output or bag
    reader = _BagReader(bag, options, report, _default_typestore())
    try:
        image_topic, episodes = reader.plan()
        yield from reader.trajectories(image_topic, episodes)
    except BagImportError:
        raise
    except Exception as error:  # a storage error in the middle of a bag (truncated file, bad chunk)
        raise BagImportError(f"{bag}: cannot read bag: {type(error).__name__}: {error}") from error
    finally:
        reader.close()
    report.bags_read += 1


class UniqueEpisodeIds:
    """Makes episode ids unique across bags, in reading order: a repeated id gets the bag name appended
    (``id@bag``), then ``#2``, ``#3`` ... (one rule for read_bags and for merging sharded scoring)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def assign(self, episode_id: str, bag_name: str) -> str:
        """The id this episode gets (``episode_id`` unless an earlier episode has it)."""
        if episode_id in self._seen:
            base = candidate = f"{episode_id}@{bag_name}"
            suffix = 2
            while candidate in self._seen:
                candidate, suffix = f"{base}#{suffix}", suffix + 1
            episode_id = candidate
        self._seen.add(episode_id)
        return episode_id


def read_bags(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
              options: BagImportOptions | None = None, report: ImportReport | None = None,
              strict: bool = False, unique_ids: bool = True) -> Iterator[Trajectory]:
    """Trajectories of every bag under `paths` (bag dirs, bag files, or folders of them).

    Episode ids are made unique across bags (`UniqueEpisodeIds`) unless `unique_ids` is False (the
    caller then does it, e.g. after gathering sharded results). A bag that cannot be read is recorded in
    `report.bags_failed` and skipped, or raises with `strict=True`.
    """
    options = options or BagImportOptions()
    report = report if report is not None else ImportReport()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    bags = [bag for path in paths for bag in find_bags(path)]
    ids = UniqueEpisodeIds()
    for bag in bags:
        try:
            for trajectory in read_bag(bag, options, report):
                if unique_ids:
                    trajectory.episode_id = ids.assign(trajectory.episode_id, bag.name)
                yield trajectory
        except BagImportError as error:
            if strict:
                raise
            report.bags_failed.append((str(bag), str(error)))


def import_bags(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], writer: Any,
                options: BagImportOptions | None = None, strict: bool = False) -> ImportReport:
    """Write the trajectories of every bag under `paths` with `writer.add` (a DatasetWriter) and return
    the report. The caller closes the writer."""
    report = ImportReport()
    for trajectory in read_bags(paths, options, report, strict=strict):
        writer.add(trajectory)
    return report
