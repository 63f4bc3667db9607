"""Repair MCAP bags cut short (the recorder SIGKILLed, the disk full, the machine off): `robometer-dataset repair`.

A rosbag2 MCAP bag that was never closed has no summary section, no footer and no metadata.yaml, so
rosbags and ``ros2 bag`` refuse it. Everything the recorder flushed is still in it (robometer_ros.recorder
ends and fsyncs a chunk every ``flush_s``). Repair reads the file front to back with the ``mcap`` library's
stream reader, keeps every complete record up to the first damaged or missing one (a chunk CRC is checked
where the writer stored one; rosbags stores none, so only damage to the record structure is seen), and
writes the recovered messages as a new rosbag2 bag with rosbags (summary, metadata.yaml, type hashes), in
place of the old one:

    BAG/metadata.yaml            the new metadata (message counts, the episode label, see below)
    BAG/BAG.mcap                 the recovered messages
    BAG/BAG.mcap.orig            the file as it was cut (kept unless --delete-original)

The episode label (recorder ``custom_data``) is taken from the file's own embedded rosbag2 metadata when
the file was complete and only metadata.yaml was lost; otherwise it is rebuilt: the episode id from the
node's EpisodeStatus / StepReward messages (else the directory name), the instruction from the bag's
std_msgs/String topic, the outcome from a final EpisodeStatus (state ENDED) if one was written, else
"unknown", and ``LABEL_STOPPED`` saying the bag was cut short and what was recovered.

Only MCAP is repaired here; for a sqlite3 (.db3) bag use ``ros2 bag reindex`` (the recorder commits the
database every ``flush_s``, so its rows are there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORIGINAL_SUFFIX = ".orig"
_STATE_ENDED = 4  # EpisodeStatus.STATE_ENDED
_OUTCOME_NAMES = {0: "unknown", 1: "success", 2: "failure"}


class BagRepairError(RuntimeError):
    """A bag cannot be repaired; the message names the bag and the cause."""


@dataclass
class RepairResult:
    """What `repair_bag` did to one bag.

    Attributes:
        bag: the bag directory (or .mcap file) asked for.
        output: the repaired bag directory (None when nothing was written).
        action: "repaired", "intact" (had metadata.yaml and a complete file: nothing to do) or "dry_run".
        messages: messages recovered, by topic.
        unreadable_bytes: bytes at the end of the file (or after a damaged record) that held nothing usable.
        complete: the file had its summary and footer (only metadata.yaml was missing).
        notes: anything else worth knowing (skipped channels, the label's source).
    """

    bag: Path
    output: Path | None
    action: str
    messages: dict[str, int] = field(default_factory=dict)
    unreadable_bytes: int = 0
    complete: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def recovered(self) -> int:
        """Messages recovered in all."""
        return sum(self.messages.values())

    def format(self) -> str:
        """One line per bag, plus its notes."""
        if self.action == "intact":
            return f"{self.bag}: intact (metadata.yaml and a complete MCAP file), nothing to do"
        topics = ", ".join(f"{topic} {count}" for topic, count in sorted(self.messages.items())) or "none"
        verb = "would recover" if self.action == "dry_run" else "recovered"
        where = "" if self.output is None else f" -> {self.output}"
        lines = [f"{self.bag}: {verb} {self.recovered} messages ({topics}); {self.unreadable_bytes} bytes "
                 f"unreadable{where}"]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def needs_repair(bag: str | os.PathLike[str]) -> bool:
    """True for an MCAP bag that standard readers refuse because it was cut short: a directory with .mcap
    files and no metadata.yaml, or an .mcap file without a valid footer."""
    path = Path(bag)
    if path.is_dir():
        return not (path / "metadata.yaml").is_file() and any(path.glob("*.mcap"))
    if path.is_file() and path.suffix == ".mcap":
        if not _starts_as_mcap(path):
            return False  # not an MCAP file at all: nothing to recover
        in_bag_without_metadata = path.parent.name == path.stem and not (path.parent / "metadata.yaml").is_file()
        return in_bag_without_metadata or not _has_footer(path)
    return False


_MAGIC = b"\x89MCAP0\r\n"


def _starts_as_mcap(path: Path) -> bool:
    with path.open("rb") as stream:
        return stream.read(len(_MAGIC)) == _MAGIC


def _has_footer(path: Path) -> bool:
    magic = _MAGIC
    size = path.stat().st_size
    if size < 2 * len(magic) + 29:  # magic, footer record (1 + 8 + 20 bytes), magic
        return False
    with path.open("rb") as stream:
        stream.seek(size - len(magic))
        return stream.read(len(magic)) == magic


@dataclass
class _Scan:
    schemas: dict[int, Any] = field(default_factory=dict)
    channels: dict[int, Any] = field(default_factory=dict)
    messages: list[tuple[int, int, bytes]] = field(default_factory=list)  # (channel id, log time, data)
    embedded_metadata: str = ""  # the rosbag2 metadata record of a file that was closed
    good_bytes: int = 0
    complete: bool = False
    error: str = ""


def _scan(path: Path) -> _Scan:
    """Every complete record of an MCAP file, up to the first damaged or missing one."""
    from mcap.records import Channel, Chunk, Footer, Message, Metadata, Schema
    from mcap.stream_reader import StreamReader, breakup_chunk

    scan = _Scan()
    with path.open("rb") as stream:
        reader = StreamReader(stream, emit_chunks=True, validate_crcs=True)
        try:
            for record in reader.records:
                inner = breakup_chunk(record, validate_crc=True) if isinstance(record, Chunk) else [record]
                for item in inner:
                    if isinstance(item, Schema):
                        scan.schemas[item.id] = item
                    elif isinstance(item, Channel):
                        scan.channels[item.id] = item
                    elif isinstance(item, Message):
                        scan.messages.append((item.channel_id, item.log_time, bytes(item.data)))
                    elif isinstance(item, Metadata) and item.name == "rosbag2":
                        scan.embedded_metadata = item.metadata.get("serialized_metadata", "")
                scan.good_bytes = stream.tell()
                if isinstance(record, Footer):
                    scan.complete = True
        except Exception as error:  # the cut: EndOfFile, a CRC mismatch, a garbled length, ...
            scan.error = f"{type(error).__name__}: {error}"
    return scan


def _typestore_for(schema: Any) -> Any:
    """A rosbags typestore holding the message type of one MCAP schema (and the types it uses)."""
    from rosbags.typesys import Stores, get_types_from_idl, get_types_from_msg, get_typestore

    text = schema.data.decode("utf-8")
    store = get_typestore(Stores.EMPTY)
    if schema.encoding == "ros2msg":
        store.register(get_types_from_msg(text, schema.name))
    elif schema.encoding == "ros2idl":
        separator = "=" * 80 + "\n"
        for part in text.split(separator):
            if part.startswith("IDL: "):
                part = part.split("\n", 1)[1]
            if part.strip():
                store.register(get_types_from_idl(part))
    else:
        raise BagRepairError(f"schema encoding {schema.encoding!r} is not a ROS 2 one")
    return store


def _sources(bag: Path) -> tuple[Path, list[Path]]:
    """(the repaired bag's directory, the .mcap files to read, in order)."""
    if bag.is_dir():
        files = sorted(bag.glob("*.mcap"))
        if not files:
            raise BagRepairError(f"{bag}: no .mcap file to repair (a .db3 bag: use `ros2 bag reindex`)")
        return bag, files
    if bag.is_file() and bag.suffix == ".mcap":
        if bag.parent.name == bag.stem and not (bag.parent / "metadata.yaml").is_file():
            return bag.parent, [bag]  # the storage file of a rosbag2 directory (named after it)
        target = bag.with_suffix("")  # a lone file: the repaired bag is a directory beside it
        if target.exists():
            raise BagRepairError(f"{bag}: {target} exists already; pass --out")
        return target, [bag]
    raise BagRepairError(f"{bag}: not an MCAP bag directory or .mcap file")


def repair_bag(bag: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
               keep_original: bool = True, dry_run: bool = False, force: bool = False) -> RepairResult:
    """Rebuild a cut-short MCAP bag (see the module docstring) and return what was recovered.

    Args:
        bag: a rosbag2 directory or an .mcap file.
        out: write the repaired bag into this folder (as ``out/<bag name>``) and leave the original alone;
            default: in place.
        keep_original: in place, keep the cut file as ``<name>.mcap.orig`` in the repaired bag.
        dry_run: only scan and count.
        force: rewrite a bag that looks intact too.

    Raises:
        BagRepairError: not an MCAP bag, nothing recoverable, or the new bag cannot be written (the
            original is then left as it was).
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.rosbag2.metadata import parse_qos

    bag = Path(bag)
    if not bag.exists():
        raise BagRepairError(f"{bag}: no such file or directory")
    if not force and not needs_repair(bag):
        if bag.is_dir() and not any(bag.glob("*.mcap")):
            raise BagRepairError(f"{bag}: no .mcap file to repair (a .db3 bag: use `ros2 bag reindex`)")
        return RepairResult(bag, None, "intact", complete=True)
    target, files = _sources(bag)
    result = RepairResult(bag, None, "dry_run" if dry_run else "repaired")
    scans = []
    for path in files:
        scan = _scan(path)
        scans.append(scan)
        unreadable = path.stat().st_size - scan.good_bytes
        result.unreadable_bytes += unreadable
        if unreadable:
            result.notes.append(f"{path.name}: read up to byte {scan.good_bytes} of {scan.good_bytes + unreadable} "
                                f"({scan.error})")
    result.complete = all(scan.complete for scan in scans)

    # Channels by (topic, type, qos) across the files; messages in time order (the files' order for ties).
    connections: dict[tuple[str, str, str], dict[str, Any]] = {}
    messages: list[tuple[int, int, tuple[str, str, str], bytes]] = []
    for number, scan in enumerate(scans):
        for channel_id, log_time, data in scan.messages:
            channel = scan.channels.get(channel_id)
            schema = scan.schemas.get(channel.schema_id) if channel is not None else None
            if channel is None or schema is None:
                result.notes.append(f"a message on unknown channel {channel_id} skipped")
                continue
            key = (channel.topic, schema.name, channel.metadata.get("offered_qos_profiles", ""))
            if key not in connections:
                connections[key] = {"channel": channel, "schema": schema}
            messages.append((log_time, number, key, data))
    messages.sort(key=lambda m: (m[0], m[1]))
    for _, _, key, _ in messages:
        result.messages[key[0]] = result.messages.get(key[0], 0) + 1
    if not messages:
        raise BagRepairError(f"{bag}: nothing recoverable (no complete message in {', '.join(map(str, files))})")
    if dry_run:
        return result

    label = _label(target, scans, connections, messages, result)
    in_place = out is None
    final = target if in_place else Path(out) / target.name
    if not in_place and final.exists():
        raise BagRepairError(f"{final} exists already; choose another --out")
    staging_root = final.parent / f".robometer-repair-{os.getpid()}-{final.name}"
    staging = staging_root / final.name
    try:
        staging_root.mkdir(parents=True)
        writer = Writer(staging, version=9, storage_plugin=StoragePlugin.MCAP)
        for key_name, value in label.items():
            writer.set_custom_data(key_name, value)
        writer.open()
        handles: dict[tuple[str, str, str], Any] = {}
        for key, info in connections.items():
            schema, channel = info["schema"], info["channel"]
            try:
                store = _typestore_for(schema)
                handles[key] = writer.add_connection(
                    channel.topic, schema.name, msgdef=schema.data.decode("utf-8"),
                    rihs01=store.hash_rihs01(schema.name), serialization_format=channel.message_encoding,
                    offered_qos_profiles=parse_qos(key[2]) if key[2] else (),
                )
            except Exception as error:
                result.notes.append(f"{channel.topic} ({schema.name}) skipped: its schema does not parse: {error}")
        for log_time, _, key, data in messages:
            handle = handles.get(key)
            if handle is None:
                result.messages[key[0]] -= 1
                continue
            writer.write(handle, log_time, data)
        writer.close()
        result.messages = {topic: count for topic, count in result.messages.items() if count}
        if in_place:
            for path in files:
                if keep_original:
                    path.replace(staging / (path.name + ORIGINAL_SUFFIX))
                else:
                    path.unlink()
            if target.is_dir():
                for leftover in target.iterdir():  # anything else the directory held moves along
                    leftover.replace(staging / leftover.name)
                target.rmdir()
        staging.replace(final)
    except BagRepairError:
        raise
    except Exception as error:
        raise BagRepairError(f"{bag}: writing the repaired bag failed ({type(error).__name__}: {error}); "
                             "the original is unchanged") from error
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging_root)
    result.output = final
    return result


def _label(target: Path, scans: list[_Scan], connections: dict[tuple[str, str, str], dict[str, Any]],
           messages: list[tuple[int, int, tuple[str, str, str], bytes]], result: RepairResult) -> dict[str, str]:
    """The recorder's episode label for the repaired bag (see the module docstring)."""
    import yaml

    from robometer_ros.recorder import (
        LABEL_EPISODE_ID,
        LABEL_INSTRUCTION,
        LABEL_NOTE,
        LABEL_OUTCOME,
        LABEL_STOPPED,
        LABEL_VERDICT,
    )

    for scan in scans:
        if scan.embedded_metadata:
            try:
                info = yaml.safe_load(scan.embedded_metadata) or {}
            except yaml.YAMLError:
                continue
            custom = {str(k): str(v) for k, v in (info.get("custom_data") or {}).items()}
            if custom:
                result.notes.append("episode label taken from the file's embedded rosbag2 metadata")
                return custom
    label = {LABEL_EPISODE_ID: target.name, LABEL_INSTRUCTION: "", LABEL_OUTCOME: "unknown", LABEL_NOTE: "",
             LABEL_VERDICT: ""}
    from robometer_ros.training.data.bags import _default_typestore

    store = _default_typestore()
    string_topics = {key for key in connections if key[1] == "std_msgs/msg/String"}
    for _, _, key, data in messages:
        msgtype = key[1]
        try:
            if msgtype.endswith("/msg/EpisodeStatus") or msgtype.endswith("/msg/StepReward"):
                message = store.deserialize_cdr(data, msgtype)
                if str(message.episode_id):
                    label[LABEL_EPISODE_ID] = str(message.episode_id)
                if msgtype.endswith("/msg/EpisodeStatus") and int(message.state) == _STATE_ENDED:
                    label[LABEL_OUTCOME] = _OUTCOME_NAMES.get(int(message.outcome), "unknown")
            elif key in string_topics and len(string_topics) == 1 and not label[LABEL_INSTRUCTION]:
                label[LABEL_INSTRUCTION] = str(store.deserialize_cdr(data, msgtype).data)
        except Exception:  # a type this typestore lacks or a message that does not decode: no label from it
            continue
    recovered = sum(result.messages.values())
    label[LABEL_STOPPED] = (f"cut short; repaired by robometer-dataset repair: {recovered} messages recovered, "
                            f"{result.unreadable_bytes} bytes unreadable")
    return label
