"""RBM-1M / Hugging Face rows (files a user downloaded) -> Trajectories.

The row layout of the Robometer datasets (reference section 5):

    id               str                 episode id (a uuid)
    task             str                 the instruction
    frames           str | list          a video path (mp4, webm, ...: decoded with PyAV), a directory of
                                         images, an .npy / .npz array [T, H, W, 3], or a list of images:
                                         paths, raw bytes, or Hugging Face Image structs {"bytes", "path"}
    quality_label    str                 successful / suboptimal / failure ("failed" is read as failure);
                                         missing -> successful
    partial_success  float | null
    data_source      str                 missing -> --data-source or the row file's name
    is_robot         bool                kept in metadata (human videos are imported unless robot_only)
    fps, embodiment  optional            frame rate for the frame stamps; robot type

Rows come from .parquet (read in small batches, so image bytes never all sit in memory), .jsonl, or
.json (a list of rows) files, or folders holding them. Relative media paths are resolved against
`media_dir` or the row file's folder. Rows that cannot be used are skipped and counted by reason.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from robometer_ros.episode import subsample_indices
from robometer_ros.training.data.store import ImportTally
from robometer_ros.trajectory import FAILURE, QUALITY_LABELS, SUCCESSFUL, Trajectory

ROW_FILE_SUFFIXES = (".parquet", ".jsonl", ".json")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
_LABEL_ALIASES = {"failed": FAILURE, "fail": FAILURE, "success": SUCCESSFUL}
_KNOWN_COLUMNS = {"id", "task", "frames", "quality_label", "partial_success", "data_source", "is_robot", "fps",
                  "embodiment", "lang_vector", "progress"}


class HfRowError(RuntimeError):
    """A row file or a row's media cannot be used; the message names it and the cause."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class HfImportOptions:
    """How to turn rows into trajectories.

    Attributes:
        media_dir: root for relative media paths (None: the row file's folder).
        data_source: data source for rows without one (None: the row file's stem).
        fps: frame rate for frame stamps when neither the row nor the video gives one (None: 1.0).
        max_frames: thin each episode evenly to at most this many frames, first and last kept.
        min_frames: episodes with fewer frames are skipped (and counted).
        shortest_edge: resize frames so the shorter side is this many pixels (None: keep).
        robot_only: skip rows with is_robot = false (counted).
        limit: read at most this many rows in total.
    """

    media_dir: Path | None = None
    data_source: str | None = None
    fps: float | None = None
    max_frames: int | None = None
    min_frames: int = 3
    shortest_edge: int | None = None
    robot_only: bool = False
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.min_frames < 1:
            raise ValueError(f"min_frames must be >= 1, got {self.min_frames}")
        if self.shortest_edge is not None and self.shortest_edge < 8:
            raise ValueError(f"shortest_edge must be >= 8 pixels, got {self.shortest_edge}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.media_dir is not None:
            self.media_dir = Path(self.media_dir)


@dataclass
class HfImportReport(ImportTally):
    """What a row import did, with every skipped row counted by reason."""

    files_read: int = 0
    files_failed: list[tuple[str, str]] = field(default_factory=list)
    rows_read: int = 0

    @property
    def ok(self) -> bool:
        """True when every row file could be read (skipped rows do not make it fail)."""
        return not self.files_failed

    def skip(self, reason: str, message: str) -> None:
        """Count a skipped row; the first message of each reason is kept as a note."""
        self.episodes_skipped[reason] += 1
        if self.episodes_skipped[reason] == 1:
            self.notes.append(message)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "files_read": self.files_read,
            "files_failed": [{"file": name, "error": error} for name, error in self.files_failed],
            "rows_read": self.rows_read,
            **self.tally_dict(),
        }

    def format(self) -> str:
        """Human-readable summary."""
        lines = [
            f"row files read: {self.files_read}, failed: {len(self.files_failed)}; rows read: {self.rows_read}",
            *self.tally_lines(skipped="rows skipped"),
        ]
        lines += [f"FAILED {name}: {error}" for name, error in self.files_failed]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def find_row_files(path: str | os.PathLike[str]) -> list[Path]:
    """Row files at `path`: the file itself, or every .parquet / .jsonl / .json under a folder (sorted)."""
    root = Path(path)
    if not root.exists():
        raise HfRowError("missing_file", f"{root}: no such file or directory")
    if root.is_file():
        if root.suffix not in ROW_FILE_SUFFIXES:
            raise HfRowError("bad_file", f"{root}: not a row file (expected {', '.join(ROW_FILE_SUFFIXES)})")
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in ROW_FILE_SUFFIXES)
    if not files:
        raise HfRowError("bad_file", f"{root}: no {', '.join(ROW_FILE_SUFFIXES)} files")
    return files


def iter_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of one row file, streamed (parquet in batches of 16 rows)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=16):
                yield from batch.to_pylist()
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as stream:
                for line_number, line in enumerate(stream, start=1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError as error:
                            raise HfRowError("bad_file", f"{path}:{line_number}: not JSON: {error}") from error
        else:
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise HfRowError("bad_file", f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
            yield from rows
    except HfRowError:
        raise
    except Exception as error:  # pyarrow / OS errors for corrupt or unreadable files
        raise HfRowError("bad_file", f"{path}: cannot read rows: {type(error).__name__}: {error}") from error


def _decode_image(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as error:  # PIL raises several types for bad data
        raise HfRowError("undecodable_frame", f"{where}: cannot decode image: {error}") from error


def _read_video(path: Path | bytes) -> tuple[np.ndarray, float | None]:
    """All frames of a video (a file, or its bytes) as uint8 RGB and its frame rate (PyAV; GIFs via PIL)."""
    if isinstance(path, bytes):
        where = f"<{len(path)} video bytes>"
        source: Any = io.BytesIO(path)
    else:
        where = str(path)
        source = str(path)
    if not isinstance(path, bytes) and path.suffix.lower() == ".gif":
        from PIL import ImageSequence

        try:
            with Image.open(path) as image:
                frames = [np.asarray(f.convert("RGB"), dtype=np.uint8) for f in ImageSequence.Iterator(image)]
                duration = image.info.get("duration")
        except Exception as error:
            raise HfRowError("undecodable_video", f"{path}: cannot decode GIF: {error}") from error
        return np.stack(frames), (1000.0 / duration if duration else None)
    try:
        import av
    except ImportError as error:
        raise HfRowError(
            "no_video_decoder",
            f"{where}: decoding videos needs PyAV: pip install av (or convert the videos to image lists)",
        ) from error
    try:
        with av.open(source) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except Exception as error:  # av.error.* for missing / corrupt files
        raise HfRowError("undecodable_video", f"{where}: cannot decode video: {error}") from error
    if not frames:
        raise HfRowError("empty", f"{where}: the video has no frames")
    return np.stack(frames), rate


class _RowReader:
    def __init__(self, path: Path, options: HfImportOptions) -> None:
        self.path = path
        self.options = options
        self.media_root = options.media_dir if options.media_dir is not None else path.parent

    def _media_path(self, value: str) -> Path:
        media = Path(value)
        if not media.is_absolute():
            media = self.media_root / media
        if not media.exists():
            raise HfRowError("missing_media", f"{self.path}: media {media} does not exist")
        return media

    def frames(self, value: Any, where: str) -> tuple[np.ndarray, float | None]:
        """Decode a row's `frames` value into uint8 [T, H, W, 3] (+ the video's frame rate if known)."""
        if isinstance(value, (str, os.PathLike)):
            media = self._media_path(str(value))
            suffix = media.suffix.lower()
            if media.is_dir():
                images = sorted(p for p in media.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                if not images:
                    raise HfRowError("empty", f"{where}: {media} holds no images")
                return self._stack([_decode_image(p.read_bytes(), str(p)) for p in images], where), None
            if suffix in VIDEO_SUFFIXES or suffix == ".gif":
                frames, rate = _read_video(media)
                return self._stack(list(frames), where), rate
            if suffix in (".npy", ".npz"):
                return self._array(media, where), None
            if suffix in IMAGE_SUFFIXES:
                return self._stack([_decode_image(media.read_bytes(), str(media))], where), None
            raise HfRowError("bad_frames", f"{where}: unsupported media {media} (suffix {suffix!r})")
        if isinstance(value, dict):  # a Hugging Face Video / Image struct: {"path": ..., "bytes": ...}
            if value.get("bytes"):
                frames, rate = _read_video(bytes(value["bytes"]))
                return self._stack(list(frames), where), rate
            if value.get("path"):
                return self.frames(str(value["path"]), where)
            raise HfRowError("bad_frames", f"{where}: frames struct has neither bytes nor path")
        if isinstance(value, (list, tuple)):
            decoded = []
            for number, item in enumerate(value):
                item_where = f"{where} frame {number}"
                if isinstance(item, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
                    if item.get("bytes"):
                        decoded.append(_decode_image(bytes(item["bytes"]), item_where))
                    elif item.get("path"):
                        decoded.append(_decode_image(self._media_path(item["path"]).read_bytes(), item_where))
                    else:
                        raise HfRowError("bad_frames", f"{item_where}: image struct has neither bytes nor path")
                elif isinstance(item, (bytes, bytearray)):
                    decoded.append(_decode_image(bytes(item), item_where))
                elif isinstance(item, str):
                    decoded.append(_decode_image(self._media_path(item).read_bytes(), item_where))
                else:
                    raise HfRowError("bad_frames", f"{item_where}: unsupported frame type {type(item).__name__}")
            if not decoded:
                raise HfRowError("empty", f"{where}: frames is an empty list")
            return self._stack(decoded, where), None
        raise HfRowError(
            "bad_frames", f"{where}: frames must be a path or a list of images, got {type(value).__name__}"
        )

    @staticmethod
    def _array(media: Path, where: str) -> np.ndarray:
        try:
            loaded = np.load(media)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    key = "frames" if "frames" in loaded.files else loaded.files[0]
                    array = loaded[key]
            else:
                array = loaded
        except Exception as error:
            raise HfRowError("undecodable_frame", f"{where}: cannot load {media}: {error}") from error
        if array.ndim != 4 or array.shape[-1] != 3:
            raise HfRowError("bad_frames", f"{where}: {media} holds {list(array.shape)}, expected [T, H, W, 3]")
        if array.dtype != np.uint8:
            raise HfRowError("bad_frames", f"{where}: {media} holds {array.dtype}, expected uint8")
        return array

    @staticmethod
    def _stack(frames: list[np.ndarray], where: str) -> np.ndarray:
        shapes = {f.shape for f in frames}
        if len(shapes) > 1:
            raise HfRowError("frame_size_mismatch", f"{where}: frames have different sizes {sorted(shapes)}")
        return np.stack(frames)

    def trajectory(self, row: dict[str, Any], number: int) -> Trajectory:
        """One row -> a Trajectory (raises HfRowError with a reason to count)."""
        options = self.options
        where = f"{self.path} row {number}"
        task = row.get("task")
        if not isinstance(task, str) or not task.strip():
            raise HfRowError("no_task", f"{where}: no task (instruction)")
        label = row.get("quality_label") or SUCCESSFUL
        label = _LABEL_ALIASES.get(str(label).lower(), str(label).lower())
        if label not in QUALITY_LABELS:
            raise HfRowError("bad_quality_label", f"{where}: quality_label {row.get('quality_label')!r} "
                                                  f"is not one of {QUALITY_LABELS}")
        is_robot = row.get("is_robot")
        if options.robot_only and is_robot is False:
            raise HfRowError("not_robot", f"{where}: is_robot is false")
        partial = row.get("partial_success")
        if partial is not None:
            partial = float(partial)
            if math.isnan(partial):
                partial = None
            elif not 0.0 <= partial <= 1.0:
                raise HfRowError("bad_partial_success", f"{where}: partial_success {partial} is not in [0, 1]")
        if "frames" not in row or row["frames"] is None:
            raise HfRowError("bad_frames", f"{where}: no frames")
        frames, video_rate = self.frames(row["frames"], where)
        progress = row.get("progress")
        if progress is not None:
            progress = np.asarray(progress, dtype=np.float32)
            if progress.shape != (len(frames),):
                raise HfRowError(
                    "bad_progress", f"{where}: progress has {progress.size} values for {len(frames)} frames"
                )
        source_frames = len(frames)
        if options.max_frames is not None and len(frames) > options.max_frames:
            keep = subsample_indices(len(frames), options.max_frames)
            frames = frames[keep]
            progress = None if progress is None else progress[keep]
            kept = np.asarray(keep)
        else:
            kept = np.arange(len(frames))
        if len(frames) < options.min_frames:
            raise HfRowError("too_short", f"{where}: {len(frames)} frames, fewer than min_frames={options.min_frames}")
        if options.shortest_edge is not None:
            frames = _resize_all(frames, options.shortest_edge)
        rate = row.get("fps") or video_rate or options.fps or 1.0
        metadata = {"source_file": str(self.path), "row": number, "is_robot": is_robot}
        if len(kept) != source_frames:
            metadata["source_frames"] = source_frames
        for key, value in row.items():
            if key not in _KNOWN_COLUMNS and isinstance(value, (str, int, float, bool)) and not key.startswith("_"):
                metadata[key] = value
        return Trajectory(
            instruction=task,
            frames=frames,
            frame_stamps=kept / float(rate),
            quality_label=label,
            partial_success=partial,
            progress=progress,
            data_source=str(row.get("data_source") or options.data_source or self.path.stem),
            embodiment=row.get("embodiment") or None,
            episode_id=str(row.get("id") or f"{self.path.stem}-{number:06d}"),
            metadata=metadata,
        )


def _resize_all(frames: np.ndarray, shortest_edge: int) -> np.ndarray:
    height, width = frames.shape[1:3]
    scale = shortest_edge / min(height, width)
    if scale == 1.0:
        return frames
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in frames])


def read_hf_rows(
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    options: HfImportOptions | None = None,
    report: HfImportReport | None = None,
    strict: bool = False,
) -> Iterator[Trajectory]:
    """Trajectories of every row in the row files under `paths`.

    A row that cannot be used is skipped and counted in `report` by reason (or raises with strict=True);
    a row file that cannot be read is recorded in `report.files_failed` (or raises with strict=True).
    Episode ids are made unique (a repeated id gets "#2", "#3", ...).
    """
    options = options or HfImportOptions()
    report = report if report is not None else HfImportReport()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = [f for p in paths for f in find_row_files(p)]
    seen: set[str] = set()
    for path in files:
        reader = _RowReader(path, options)
        try:
            for number, row in enumerate(iter_rows(path)):
                if options.limit is not None and report.rows_read >= options.limit:
                    return
                report.rows_read += 1
                if not isinstance(row, dict):
                    error = HfRowError("bad_row", f"{path} row {number}: not an object")
                    if strict:
                        raise error
                    report.skip(error.reason, str(error))
                    continue
                try:
                    trajectory = reader.trajectory(row, number)
                except HfRowError as error:
                    if strict or error.reason == "no_video_decoder":
                        raise
                    report.skip(error.reason, str(error))
                    continue
                if trajectory.episode_id in seen:
                    base, suffix = trajectory.episode_id, 2
                    while f"{base}#{suffix}" in seen:
                        suffix += 1
                    trajectory.episode_id = f"{base}#{suffix}"
                seen.add(trajectory.episode_id)
                report.episodes_written += 1
                report.frames_written += len(trajectory)
                report.labels[trajectory.quality_label] += 1
                yield trajectory
        except HfRowError as error:
            if strict or error.reason == "no_video_decoder":
                raise
            report.files_failed.append((str(path), str(error)))
            continue
        report.files_read += 1
