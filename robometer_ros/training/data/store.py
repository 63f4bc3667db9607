"""Sharded, streamable on-disk store of Trajectory records.

Layout of a dataset directory::

    dataset.json            format version, frame codec, shard size, episode count
    index.jsonl             one line of EpisodeMeta per episode, in insertion order
    shard-00000/000000.npz  one file per episode; shards hold `shard_size` episodes each
    shard-00001/...

An episode file holds the frames (see the codecs), ``frame_stamps``, ``progress`` where known, and the
trajectory's low-dimensional ``step_data`` arrays where it has any, as ``step.<name>`` (e.g. a simulator's
per-control-step ``step.observations`` / ``step.actions`` and ``step.frame_steps``, the control step of each
frame). The index lists them with their shapes (``step_data``); an index line without that key (every dataset
written before it existed) has none, so old datasets open unchanged.

Opening a dataset reads only dataset.json and index.jsonl, so counting, filtering and building the
index maps the samplers need (by task, by quality label, by data source) never touches frames. Frames
are decoded when asked for, and with the per-frame codecs (png, jpeg) only the frames asked for.

Frame codecs:
  * ``png``  (default) lossless, one PNG per frame: a sampler that needs 8 of 32 frames decodes 8.
  * ``jpeg`` lossy (quality 95), the smallest files; good for camera data that was JPEG already.
  * ``npz``  the whole [T, H, W, 3] array deflated in one piece: fastest to write, decoded whole.

Pure numpy + PIL: importable without torch or rclpy.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from robometer_ros.trajectory import FRAME_STEPS, LABELS, Trajectory

FORMAT_NAME = "robometer-trajectories"
FORMAT_VERSION = 1
FRAME_CODECS = ("png", "jpeg", "npz")
DEFAULT_SHARD_SIZE = 1000
_HEADER_FILE = "dataset.json"
_INDEX_FILE = "index.jsonl"


class DatasetError(RuntimeError):
    """A dataset directory or episode file is missing, malformed or inconsistent."""


def format_counts(counts: Counter) -> str:
    """``"a 2, b 1"``: counts by name, sorted by name."""
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))


@dataclass
class ImportTally:
    """What every importer counts: what it wrote, and every skipped episode by reason."""

    episodes_written: int = 0
    episodes_skipped: Counter = field(default_factory=Counter)
    frames_written: int = 0
    labels: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def tally_dict(self) -> dict[str, Any]:
        """The JSON-friendly form of these counts."""
        return {
            "episodes_written": self.episodes_written,
            "episodes_skipped": dict(self.episodes_skipped),
            "frames_written": self.frames_written,
            "labels": dict(self.labels),
            "notes": list(self.notes),
        }

    def tally_lines(self, skipped: str = "episodes skipped") -> list[str]:
        """Summary lines of these counts (notes excluded: they go last), skips under the name ``skipped``."""
        lines = [
            f"episodes written: {self.episodes_written} ({format_counts(self.labels) or 'none'})",
            f"frames written: {self.frames_written}",
        ]
        if self.episodes_skipped:
            lines.append(f"{skipped}: {format_counts(self.episodes_skipped)}")
        return lines


@dataclass(frozen=True)
class EpisodeMeta:
    """What the index knows about one episode, without its frames.

    Attributes:
        index: position in the dataset (insertion order).
        episode_id: unique id within the dataset.
        instruction: the task instruction (the "task" the samplers group by).
        quality_label: successful / suboptimal / failure.
        partial_success: human partial-success score in [0, 1], or None.
        data_source: dataset or robot the episode came from.
        embodiment: robot type, or None.
        n_frames: number of stored frames.
        frame_shape: [H, W, 3] of the stored frames.
        has_progress: whether a per-frame progress array is stored.
        file: episode file path relative to the dataset directory.
        metadata: the Trajectory's metadata dict.
        step_data: name -> shape of each stored step_data array (empty: none stored).
    """

    index: int
    episode_id: str
    instruction: str
    quality_label: str
    partial_success: float | None
    data_source: str
    embodiment: str | None
    n_frames: int
    frame_shape: tuple[int, int, int]
    has_progress: bool
    file: str
    metadata: dict[str, Any] = field(default_factory=dict)
    step_data: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> str:
        """One index.jsonl line (the index position is implied by the line number)."""
        record = asdict(self)
        del record["index"]
        record["frame_shape"] = list(self.frame_shape)
        if not self.step_data:
            del record["step_data"]  # lines without step data stay as they were before the field existed
        return json.dumps(record, sort_keys=True)

    @classmethod
    def from_json(cls, line: str, index: int) -> EpisodeMeta:
        record = json.loads(line)
        record["frame_shape"] = tuple(record["frame_shape"])
        return cls(index=index, **record)


def _encode_frames(frames: np.ndarray, codec: str) -> dict[str, np.ndarray]:
    """Frames -> arrays to store in the episode npz."""
    if codec == "npz":
        return {"frames": frames}
    blobs = []
    for frame in frames:
        buffer = io.BytesIO()
        image = Image.fromarray(frame)
        if codec == "png":
            # compress_level 1: ~3x faster to write than the default 6 for a few % more bytes.
            image.save(buffer, format="PNG", compress_level=1)
        else:
            image.save(buffer, format="JPEG", quality=95)
        blobs.append(buffer.getvalue())
    offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
    return {"frame_bytes": np.frombuffer(b"".join(blobs), dtype=np.uint8), "frame_offsets": offsets}


STEP_DATA_PREFIX = "step."  # episode-file key prefix of Trajectory.step_data arrays


def _step_data_shapes(step_data: dict[str, np.ndarray]) -> dict[str, list[int]]:
    return {name: [int(n) for n in np.shape(value)] for name, value in step_data.items()}


def _select_step_data(step_data: dict[str, np.ndarray], frame_indices: Sequence[int] | None) -> dict[str, np.ndarray]:
    """Step data of an episode restricted to some frames: only the per-frame ``frame_steps`` changes."""
    if frame_indices is None or FRAME_STEPS not in step_data:
        return step_data
    return {**step_data, FRAME_STEPS: step_data[FRAME_STEPS][np.asarray(frame_indices, dtype=np.int64)]}


def _decode_frame(blob: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(blob)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as error:  # PIL raises several unrelated types for bad data
        raise DatasetError(f"{where}: cannot decode stored frame: {error}") from error


class DatasetWriter:
    """Appends Trajectories to a dataset directory; `close()` (or the context manager) writes the index.

    Example::

        with DatasetWriter("data/my_robot") as writer:
            for trajectory in trajectories:
                writer.add(trajectory)

    Args:
        directory: dataset directory; created if missing.
        frame_codec: "png" (lossless, per-frame), "jpeg" (lossy, smallest) or "npz" (whole array).
        shard_size: episodes per shard directory.
        append: add to an existing dataset instead of refusing to touch it (its codec is kept).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        frame_codec: str = "png",
        shard_size: int = DEFAULT_SHARD_SIZE,
        append: bool = False,
    ) -> None:
        if frame_codec not in FRAME_CODECS:
            raise ValueError(f"frame_codec must be one of {FRAME_CODECS}, got {frame_codec!r}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.directory = Path(directory)
        self._metas: list[EpisodeMeta] = []
        self._closed = False
        if (self.directory / _HEADER_FILE).exists():
            if not append:
                raise DatasetError(
                    f"{self.directory} already holds a dataset; pass append=True to add to it "
                    "or choose another directory"
                )
            existing = Dataset(self.directory)
            frame_codec, shard_size = existing.frame_codec, existing.shard_size
            self._metas = list(existing.metas)
        elif self.directory.exists() and any(self.directory.iterdir()):
            raise DatasetError(f"{self.directory} exists, is not empty and is not a dataset")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.frame_codec = frame_codec
        self.shard_size = shard_size
        self._ids = {meta.episode_id for meta in self._metas}
        # Written now so that a crashed import leaves a directory that says what it is.
        self._write_header()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._metas)

    def add(self, trajectory: Trajectory) -> EpisodeMeta:
        """Store one trajectory (its frames are written now) and return its index entry."""
        if self._closed:
            raise DatasetError(f"{self.directory}: writer is closed")
        index = len(self._metas)
        episode_id = trajectory.episode_id or f"episode-{index:06d}"
        if episode_id in self._ids:
            raise DatasetError(f"{self.directory}: duplicate episode_id {episode_id!r}")
        try:
            json.dumps(trajectory.metadata)
        except TypeError as error:
            raise DatasetError(
                f"episode {episode_id!r}: metadata is not JSON-serialisable: {error}"
            ) from error
        relative = f"shard-{index // self.shard_size:05d}/{index:06d}.npz"
        path = self.directory / relative
        path.parent.mkdir(exist_ok=True)
        arrays = _encode_frames(trajectory.frames, self.frame_codec)
        arrays["frame_stamps"] = trajectory.frame_stamps
        if trajectory.progress is not None:
            arrays["progress"] = trajectory.progress
        for name, value in trajectory.step_data.items():
            arrays[STEP_DATA_PREFIX + name] = value
        temporary = path.with_suffix(".tmp.npz")
        if self.frame_codec == "npz":
            np.savez_compressed(temporary, **arrays)
        else:
            np.savez(temporary, **arrays)  # PNG/JPEG bytes do not deflate further
        temporary.replace(path)
        meta = EpisodeMeta(
            index=index,
            episode_id=episode_id,
            instruction=trajectory.instruction,
            quality_label=trajectory.quality_label,
            partial_success=None if trajectory.partial_success is None else float(trajectory.partial_success),
            data_source=trajectory.data_source,
            embodiment=trajectory.embodiment,
            n_frames=len(trajectory),
            frame_shape=tuple(int(s) for s in trajectory.frames.shape[1:]),
            has_progress=trajectory.progress is not None,
            file=relative,
            metadata=dict(trajectory.metadata),
            step_data=_step_data_shapes(trajectory.step_data),
        )
        self._metas.append(meta)
        self._ids.add(episode_id)
        return meta

    def close(self) -> None:
        """Write index.jsonl and dataset.json (atomically); idempotent."""
        if self._closed:
            return
        temporary = self.directory / (_INDEX_FILE + ".tmp")
        with open(temporary, "w", encoding="utf-8") as stream:
            for meta in self._metas:
                stream.write(meta.to_json() + "\n")
        temporary.replace(self.directory / _INDEX_FILE)
        self._write_header()
        self._closed = True

    def _write_header(self) -> None:
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "frame_codec": self.frame_codec,
            "shard_size": self.shard_size,
            "num_episodes": len(self._metas),
        }
        temporary = self.directory / (_HEADER_FILE + ".tmp")
        temporary.write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
        temporary.replace(self.directory / _HEADER_FILE)


class TrajectoryCollection:
    """What samplers, evaluation and scoring read: episode metadata plus frames on demand.

    Implemented by `Dataset` (on disk) and `InMemoryDataset` (a list of Trajectories). Subclasses
    provide `metas` and `_load(position, frame_indices)`.
    """

    metas: Sequence[EpisodeMeta]

    def __len__(self) -> int:
        return len(self.metas)

    def __getitem__(self, position: int) -> Trajectory:
        return self.trajectory(position)

    def __iter__(self) -> Iterator[Trajectory]:
        for position in range(len(self)):
            yield self.trajectory(position)

    def _load(self, position: int, frame_indices: Sequence[int] | None) -> dict[str, Any]:
        """frames, frame_stamps, progress (None if not stored) and step_data (a dict) of one episode."""
        raise NotImplementedError

    def _load_step_data(self, position: int) -> dict[str, np.ndarray]:
        """The episode's step_data arrays alone (no frame is decoded)."""
        raise NotImplementedError

    def _check_position(self, position: int) -> int:
        if not -len(self) <= position < len(self):
            raise IndexError(f"episode position {position} out of range for {len(self)} episodes")
        return position % len(self)

    def frames(self, position: int, frame_indices: Sequence[int] | None = None) -> np.ndarray:
        """uint8 [K, H, W, 3] frames of one episode: all of them, or those at `frame_indices` (any order,
        repeats allowed)."""
        position = self._check_position(position)
        return self._load(position, frame_indices)["frames"]

    def step_data(self, position: int) -> dict[str, np.ndarray]:
        """The episode's low-dimensional step_data arrays (e.g. ``observations``, ``actions``,
        ``frame_steps``), without decoding any frame; empty when none were stored."""
        position = self._check_position(position)
        if not self.metas[position].step_data:
            return {}
        return self._load_step_data(position)

    def trajectory(self, position: int, frame_indices: Sequence[int] | None = None) -> Trajectory:
        """The episode at `position` as a Trajectory (restricted to `frame_indices` if given)."""
        position = self._check_position(position)
        meta = self.metas[position]
        arrays = self._load(position, frame_indices)
        return Trajectory(
            instruction=meta.instruction,
            frames=arrays["frames"],
            frame_stamps=arrays["frame_stamps"],
            quality_label=meta.quality_label,
            partial_success=meta.partial_success,
            progress=arrays["progress"],
            data_source=meta.data_source,
            embodiment=meta.embodiment,
            episode_id=meta.episode_id,
            metadata=dict(meta.metadata),
            step_data=arrays["step_data"],
        )

    def select(self, positions: Iterable[int]) -> Subset:
        """A view on some episodes, in the order given (nothing is copied or decoded)."""
        return Subset(self, [self._check_position(p) for p in positions])

    def filter(
        self,
        instructions: Iterable[str] | None = None,
        data_sources: Iterable[str] | None = None,
        quality_labels: Iterable[str] | None = None,
        predicate: Callable[[EpisodeMeta], bool] | None = None,
    ) -> Subset:
        """Episodes whose instruction, data source and quality label are among those given (None: any)
        and for which `predicate(meta)` holds."""
        wanted_instructions = None if instructions is None else set(instructions)
        wanted_sources = None if data_sources is None else set(data_sources)
        wanted_labels = None if quality_labels is None else set(quality_labels)
        if wanted_labels is not None and not wanted_labels <= set(LABELS):
            raise ValueError(f"unknown quality labels {sorted(wanted_labels - set(LABELS))}")
        positions = [
            position
            for position, meta in enumerate(self.metas)
            if (wanted_instructions is None or meta.instruction in wanted_instructions)
            and (wanted_sources is None or meta.data_source in wanted_sources)
            and (wanted_labels is None or meta.quality_label in wanted_labels)
            and (predicate is None or predicate(meta))
        ]
        return self.select(positions)

    def _group(self, key: Callable[[EpisodeMeta], Any]) -> dict[Any, list[int]]:
        groups: dict[Any, list[int]] = {}
        for position, meta in enumerate(self.metas):
            groups.setdefault(key(meta), []).append(position)
        return groups

    def indices_by_task(self) -> dict[str, list[int]]:
        """Instruction -> positions, in first-seen order (deterministic)."""
        return self._group(lambda meta: meta.instruction)

    def indices_by_label(self) -> dict[str, list[int]]:
        """Quality label -> positions."""
        return self._group(lambda meta: meta.quality_label)

    def indices_by_source(self) -> dict[str, list[int]]:
        """Data source -> positions."""
        return self._group(lambda meta: meta.data_source)

    def indices_by_task_and_label(self) -> dict[str, dict[str, list[int]]]:
        """Instruction -> quality label -> positions (what the SUBOPTIMAL sampler and ranking eval need)."""
        result: dict[str, dict[str, list[int]]] = {}
        for position, meta in enumerate(self.metas):
            result.setdefault(meta.instruction, {}).setdefault(meta.quality_label, []).append(position)
        return result


class Dataset(TrajectoryCollection):
    """A dataset directory written by DatasetWriter, opened read-only.

    Opening reads only the index; `trajectory(i)` / `frames(i, indices)` decode one episode's frames.
    Safe to use from DataLoader worker processes (each open is per call, no shared file handles).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        header_path = self.directory / _HEADER_FILE
        index_path = self.directory / _INDEX_FILE
        if not header_path.is_file():
            raise DatasetError(f"{self.directory} is not a dataset: {_HEADER_FILE} is missing")
        try:
            header = json.loads(header_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DatasetError(f"{header_path}: not valid JSON: {error}") from error
        if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
            raise DatasetError(
                f"{header_path}: format {header.get('format')!r} version {header.get('version')!r} "
                f"is not {FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        if header.get("frame_codec") not in FRAME_CODECS:
            raise DatasetError(f"{header_path}: unknown frame_codec {header.get('frame_codec')!r}")
        self.frame_codec: str = header["frame_codec"]
        self.shard_size: int = int(header["shard_size"])
        if not index_path.is_file():
            raise DatasetError(
                f"{self.directory}: {_INDEX_FILE} is missing (was the DatasetWriter closed?)"
            )
        metas = []
        with open(index_path, encoding="utf-8") as stream:
            for line_number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    metas.append(EpisodeMeta.from_json(line, index=len(metas)))
                except (json.JSONDecodeError, TypeError, KeyError) as error:
                    raise DatasetError(f"{index_path}:{line_number}: bad index entry: {error}") from error
        self.metas: list[EpisodeMeta] = metas

    def __repr__(self) -> str:
        return f"Dataset({str(self.directory)!r}, episodes={len(self)}, codec={self.frame_codec!r})"

    def _read_step_data(self, archive: Any, meta: EpisodeMeta, path: Path) -> dict[str, np.ndarray]:
        missing = [name for name in meta.step_data if STEP_DATA_PREFIX + name not in archive.files]
        if missing:
            raise DatasetError(f"{path}: episode {meta.episode_id!r} lacks the step_data {missing} its index lists")
        return {name: archive[STEP_DATA_PREFIX + name] for name in meta.step_data}

    def _load_step_data(self, position: int) -> dict[str, np.ndarray]:
        meta = self.metas[position]
        path = self.directory / meta.file
        try:
            with np.load(path) as archive:
                return self._read_step_data(archive, meta, path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise DatasetError(f"{path}: cannot read episode {meta.episode_id!r}: {error}") from error

    def _load(self, position: int, frame_indices: Sequence[int] | None) -> dict[str, Any]:
        meta = self.metas[position]
        path = self.directory / meta.file
        if frame_indices is not None:
            frame_indices = [int(i) for i in frame_indices]
            bad = [i for i in frame_indices if not 0 <= i < meta.n_frames]
            if bad:
                raise IndexError(f"episode {meta.episode_id!r} has {meta.n_frames} frames; asked for {bad}")
        try:
            with np.load(path) as archive:
                stamps = archive["frame_stamps"]
                progress = archive["progress"] if "progress" in archive.files else None
                step_data = self._read_step_data(archive, meta, path)
                if self.frame_codec == "npz":
                    frames = archive["frames"]
                    if frame_indices is not None:
                        frames = frames[frame_indices]
                else:
                    blob = archive["frame_bytes"]
                    offsets = archive["frame_offsets"]
                    wanted = range(meta.n_frames) if frame_indices is None else frame_indices
                    decoded: dict[int, np.ndarray] = {}
                    for i in wanted:
                        if i not in decoded:
                            decoded[i] = _decode_frame(
                                blob[offsets[i] : offsets[i + 1]].tobytes(), f"{path} frame {i}"
                            )
                    frames = np.stack([decoded[i] for i in wanted])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise DatasetError(f"{path}: cannot read episode {meta.episode_id!r}: {error}") from error
        if frame_indices is not None:
            stamps = stamps[frame_indices]
            progress = None if progress is None else progress[frame_indices]
        return {"frames": frames, "frame_stamps": stamps, "progress": progress,
                "step_data": _select_step_data(step_data, frame_indices)}


class InMemoryDataset(TrajectoryCollection):
    """Trajectories held in memory behind the same interface as Dataset (tests, small synthetic sets)."""

    def __init__(self, trajectories: Sequence[Trajectory]) -> None:
        self._trajectories = list(trajectories)
        self.metas = [
            EpisodeMeta(
                index=i,
                episode_id=t.episode_id or f"episode-{i:06d}",
                instruction=t.instruction,
                quality_label=t.quality_label,
                partial_success=t.partial_success,
                data_source=t.data_source,
                embodiment=t.embodiment,
                n_frames=len(t),
                frame_shape=tuple(int(s) for s in t.frames.shape[1:]),
                has_progress=t.progress is not None,
                file="",
                metadata=dict(t.metadata),
                step_data=_step_data_shapes(t.step_data),
            )
            for i, t in enumerate(self._trajectories)
        ]

    def _load_step_data(self, position: int) -> dict[str, np.ndarray]:
        return dict(self._trajectories[position].step_data)

    def _load(self, position: int, frame_indices: Sequence[int] | None) -> dict[str, Any]:
        trajectory = self._trajectories[position]
        if frame_indices is None:
            return {"frames": trajectory.frames, "frame_stamps": trajectory.frame_stamps,
                    "progress": trajectory.progress, "step_data": dict(trajectory.step_data)}
        selection = np.asarray([int(i) for i in frame_indices], dtype=np.int64)
        return {
            "frames": trajectory.frames[selection],
            "frame_stamps": trajectory.frame_stamps[selection],
            "progress": None if trajectory.progress is None else trajectory.progress[selection],
            "step_data": _select_step_data(dict(trajectory.step_data), selection),
        }


class Subset(TrajectoryCollection):
    """Some episodes of another collection, by position; metas are re-indexed 0..n-1 in view order."""

    def __init__(self, parent: TrajectoryCollection, positions: Sequence[int]) -> None:
        self.parent = parent
        self.positions = list(positions)
        self.metas = [_reindexed(parent.metas[p], i) for i, p in enumerate(self.positions)]

    def _load(self, position: int, frame_indices: Sequence[int] | None) -> dict[str, Any]:
        return self.parent._load(self.positions[position], frame_indices)

    def _load_step_data(self, position: int) -> dict[str, np.ndarray]:
        return self.parent._load_step_data(self.positions[position])


def _reindexed(meta: EpisodeMeta, index: int) -> EpisodeMeta:
    if meta.index == index:
        return meta
    values = asdict(meta)
    values["index"] = index
    values["frame_shape"] = meta.frame_shape
    return EpisodeMeta(**values)


def open_dataset(
    source: str | os.PathLike[str] | TrajectoryCollection | Sequence[Trajectory],
) -> TrajectoryCollection:
    """A dataset directory, an existing collection, or a list of Trajectories -> a TrajectoryCollection."""
    if isinstance(source, TrajectoryCollection):
        return source
    if isinstance(source, (str, os.PathLike)):
        return Dataset(source)
    return InMemoryDataset(source)


def open_split(dataset: str | os.PathLike[str], split: str | None) -> TrajectoryCollection:
    """The episodes of one split: `DIR/<split>/` if that is a dataset, else the episodes of DIR whose
    metadata "split" equals `split`; split None (or "all") is every episode of DIR."""
    root = Path(dataset)
    if split not in (None, "", "all") and (root / split / "dataset.json").is_file():
        return Dataset(root / split)
    if not (root / "dataset.json").is_file():
        raise DatasetError(f"{root} is not a dataset directory (no dataset.json) and has no split {split!r}")
    collection = Dataset(root)
    if split in (None, "", "all"):
        return collection
    subset = collection.filter(predicate=lambda meta: meta.metadata.get("split") == split)
    if len(subset) == 0:
        splits = sorted({str(m.metadata.get("split")) for m in collection.metas if "split" in m.metadata})
        raise DatasetError(
            f"{root} has no split {split!r}: no {root / split}/dataset.json and no episode with "
            f"metadata split={split!r} (splits found in metadata: {splits or 'none'})"
        )
    return subset


def write_dataset(
    directory: str | os.PathLike[str], trajectories: Iterable[Trajectory], frame_codec: str = "png",
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> Dataset:
    """Write all `trajectories` to a new dataset directory and open it."""
    with DatasetWriter(directory, frame_codec=frame_codec, shard_size=shard_size) as writer:
        for trajectory in trajectories:
            writer.add(trajectory)
    return Dataset(directory)


def _stable_fraction(text: str, seed: int) -> float:
    """A number in [0, 1) fixed by (text, seed): the same on every machine and Python run."""
    digest = hashlib.sha256(f"{seed}\x1f{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    directory: str | os.PathLike[str], val_fraction: float, by: str = "episode", seed: int = 0
) -> dict[str, int]:
    """Tag every episode's metadata "split" as "train" or "val" and rewrite index.jsonl (frames untouched).

    by="episode": within each task, the `val_fraction` of its episodes with the lowest stable hash of
    (seed, episode_id) go to val (rounded, so a task with few episodes may have none in val);
    by="task": whole tasks go to val (held-out instructions), chosen by the stable hash of the task.
    The trainer and evaluator select a split with `--split val` / `data.eval_split`. Returns counts.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if by not in ("episode", "task"):
        raise ValueError(f"by must be 'episode' or 'task', got {by!r}")
    dataset = Dataset(directory)
    in_val: set[int] = set()
    by_task = dataset.indices_by_task()
    if by == "task":
        tasks = sorted(by_task, key=lambda task: _stable_fraction(task, seed))
        for task in tasks[: round(val_fraction * len(tasks))]:
            in_val.update(by_task[task])
    else:
        for positions in by_task.values():
            ranked = sorted(positions, key=lambda p: _stable_fraction(dataset.metas[p].episode_id, seed))
            in_val.update(ranked[: round(val_fraction * len(ranked))])
    temporary = dataset.directory / (_INDEX_FILE + ".tmp")
    with open(temporary, "w", encoding="utf-8") as stream:
        for meta in dataset.metas:
            metadata = {**meta.metadata, "split": "val" if meta.index in in_val else "train"}
            values = asdict(meta)
            values["metadata"] = metadata
            values["frame_shape"] = meta.frame_shape
            stream.write(EpisodeMeta(**values).to_json() + "\n")
    temporary.replace(dataset.directory / _INDEX_FILE)
    return {"train": len(dataset) - len(in_val), "val": len(in_val)}


def summarize(collection: TrajectoryCollection) -> dict[str, Any]:
    """Counts for `robometer-dataset info`: episodes, frames, by source / label / task, frame shapes."""
    by_source: dict[str, int] = {}
    by_label: dict[str, int] = {}
    by_task: dict[str, int] = {}
    shapes: dict[str, int] = {}
    frames = 0
    for meta in collection.metas:
        by_source[meta.data_source] = by_source.get(meta.data_source, 0) + 1
        by_label[meta.quality_label] = by_label.get(meta.quality_label, 0) + 1
        by_task[meta.instruction] = by_task.get(meta.instruction, 0) + 1
        shape = "x".join(str(s) for s in meta.frame_shape)
        shapes[shape] = shapes.get(shape, 0) + 1
        frames += meta.n_frames
    lengths = [meta.n_frames for meta in collection.metas]
    return {
        "episodes": len(collection),
        "frames": frames,
        "frames_per_episode": {
            "min": min(lengths, default=0),
            "mean": float(np.mean(lengths)) if lengths else 0.0,
            "max": max(lengths, default=0),
        },
        "by_data_source": dict(sorted(by_source.items())),
        "by_quality_label": dict(sorted(by_label.items())),
        "tasks": len(by_task),
        "episodes_per_task": dict(sorted(by_task.items())),
        "frame_shapes": dict(sorted(shapes.items())),
        "with_partial_success": sum(meta.partial_success is not None for meta in collection.metas),
        "with_progress": sum(meta.has_progress for meta in collection.metas),
        "with_step_data": sum(bool(meta.step_data) for meta in collection.metas),
        "by_split": dict(sorted(Counter(str(m.metadata["split"]) for m in collection.metas
                                        if "split" in m.metadata).items())),
    }
