"""The on-disk trajectory store: round trips, shards, lazy reads, filters, index maps, errors."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from robometer_ros.training.data.dataset_cli import main as dataset_main
from robometer_ros.training.data.hf_rows import HfImportOptions, HfImportReport, HfRowError, read_hf_rows
from robometer_ros.training.data.store import (
    Dataset,
    DatasetError,
    DatasetWriter,
    InMemoryDataset,
    assign_splits,
    summarize,
    write_dataset,
)
from robometer_ros.trajectory import Trajectory


def _trajectory(number: int, task: str = "pick", label: str = "successful", n: int = 6, **kwargs) -> Trajectory:
    rng = np.random.default_rng(number)
    frames = rng.integers(0, 256, size=(n, 12, 16, 3), dtype=np.uint8)
    return Trajectory(
        instruction=task,
        frames=frames,
        frame_stamps=np.arange(n) * 0.5 + number,
        quality_label=label,
        episode_id=f"ep{number}",
        metadata={"number": number},
        **kwargs,
    )


@pytest.mark.parametrize("codec", ["png", "npz"])
def test_lossless_round_trip(tmp_path: Path, codec: str) -> None:
    originals = [
        _trajectory(0, progress=np.linspace(0, 1, 6), partial_success=0.4, data_source="lab", embodiment="so101"),
        _trajectory(1, task="place", label="failure", n=9),
    ]
    dataset = write_dataset(tmp_path / "ds", originals, frame_codec=codec)
    assert len(dataset) == 2
    for original, loaded in zip(originals, dataset):
        np.testing.assert_array_equal(loaded.frames, original.frames)
        np.testing.assert_array_equal(loaded.frame_stamps, original.frame_stamps)
        assert loaded.instruction == original.instruction
        assert loaded.quality_label == original.quality_label
        assert loaded.partial_success == original.partial_success
        assert loaded.data_source == original.data_source
        assert loaded.embodiment == original.embodiment
        assert loaded.episode_id == original.episode_id
        assert loaded.metadata == original.metadata
    np.testing.assert_allclose(dataset[0].progress, np.linspace(0, 1, 6))
    assert dataset[1].progress is None


def test_jpeg_is_close_and_smaller(tmp_path: Path) -> None:
    smooth = np.broadcast_to(np.linspace(0, 255, 64, dtype=np.uint8)[None, None, :, None], (5, 48, 64, 3))
    trajectory = Trajectory("pick", np.ascontiguousarray(smooth), np.arange(5.0))
    jpeg = write_dataset(tmp_path / "jpeg", [trajectory], frame_codec="jpeg")
    assert np.abs(jpeg[0].frames.astype(int) - smooth).mean() < 3.0
    noisy = np.clip(smooth + np.random.default_rng(0).normal(0, 3, smooth.shape), 0, 255).astype(np.uint8)
    sizes = {}
    for codec in ("jpeg", "png"):
        write_dataset(tmp_path / f"noisy-{codec}", [Trajectory("pick", noisy, np.arange(5.0))], frame_codec=codec)
        sizes[codec] = sum(p.stat().st_size for p in (tmp_path / f"noisy-{codec}").rglob("*.npz"))
    assert sizes["jpeg"] < sizes["png"]


def test_shards_and_partial_frame_reads(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "ds", [_trajectory(i, n=7) for i in range(5)], shard_size=2)
    assert [m.file for m in dataset.metas] == [
        "shard-00000/000000.npz", "shard-00000/000001.npz", "shard-00001/000002.npz",
        "shard-00001/000003.npz", "shard-00002/000004.npz",
    ]
    full = dataset[3]
    part = dataset.trajectory(3, [6, 0, 0])
    np.testing.assert_array_equal(part.frames, full.frames[[6, 0, 0]])
    np.testing.assert_array_equal(part.frame_stamps, full.frame_stamps[[6, 0, 0]])
    np.testing.assert_array_equal(dataset.frames(-1, [2]), dataset[4].frames[[2]])
    with pytest.raises(IndexError, match="7 frames"):
        dataset.frames(0, [7])
    with pytest.raises(IndexError):
        dataset[5]


def test_metadata_needs_no_frames(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "ds", [_trajectory(0), _trajectory(1, task="place", label="failure")])
    (tmp_path / "ds" / dataset.metas[1].file).unlink()  # frames gone: the index still answers
    reopened = Dataset(tmp_path / "ds")
    assert len(reopened.filter(quality_labels=["failure"])) == 1
    assert reopened.indices_by_task() == {"pick": [0], "place": [1]}
    with pytest.raises(DatasetError, match=r"000001\.npz"):
        reopened[1]
    episode_file = tmp_path / "ds" / dataset.metas[0].file
    episode_file.write_bytes(episode_file.read_bytes()[:100])  # truncated
    with pytest.raises(DatasetError, match=r"000000\.npz: cannot read episode 'ep0'"):
        reopened.frames(0, [1])


def test_filters_and_index_maps() -> None:
    trajectories = [
        _trajectory(0, "pick", "successful", data_source="a"),
        _trajectory(1, "pick", "failure", data_source="a"),
        _trajectory(2, "place", "successful", data_source="b"),
        _trajectory(3, "pick", "suboptimal", data_source="b"),
    ]
    collection = InMemoryDataset(trajectories)
    assert collection.indices_by_task() == {"pick": [0, 1, 3], "place": [2]}
    assert collection.indices_by_label() == {"successful": [0, 2], "failure": [1], "suboptimal": [3]}
    assert collection.indices_by_source() == {"a": [0, 1], "b": [2, 3]}
    assert collection.indices_by_task_and_label()["pick"] == {"successful": [0], "failure": [1], "suboptimal": [3]}
    subset = collection.filter(instructions=["pick"], data_sources=["b"])
    assert [m.episode_id for m in subset.metas] == ["ep3"]
    assert subset.metas[0].index == 0  # views are re-indexed
    np.testing.assert_array_equal(subset[0].frames, trajectories[3].frames)
    picked = collection.filter(predicate=lambda meta: meta.metadata["number"] % 2 == 0)
    assert [m.episode_id for m in picked.metas] == ["ep0", "ep2"]
    with pytest.raises(ValueError, match="unknown quality labels"):
        collection.filter(quality_labels=["great"])


def test_append_duplicates_and_refusals(tmp_path: Path) -> None:
    directory = tmp_path / "ds"
    write_dataset(directory, [_trajectory(0)], frame_codec="npz")
    with pytest.raises(DatasetError, match="already holds a dataset"):
        DatasetWriter(directory)
    with DatasetWriter(directory, append=True) as writer:
        assert writer.frame_codec == "npz"  # the existing codec is kept
        writer.add(_trajectory(1))
        with pytest.raises(DatasetError, match="duplicate episode_id 'ep0'"):
            writer.add(_trajectory(0))
    assert [m.episode_id for m in Dataset(directory).metas] == ["ep0", "ep1"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        DatasetWriter(tmp_path / "other")
    with pytest.raises(ValueError, match="frame_codec"):
        DatasetWriter(tmp_path / "new", frame_codec="gif")


def test_unreadable_directories_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset\.json is missing"):
        Dataset(tmp_path)
    directory = tmp_path / "ds"
    writer = DatasetWriter(directory)
    writer.add(_trajectory(0))
    with pytest.raises(DatasetError, match=r"index\.jsonl is missing"):
        Dataset(directory)  # not closed yet
    writer.close()
    (directory / "index.jsonl").write_text("{not json\n")
    with pytest.raises(DatasetError, match=r"index\.jsonl:1"):
        Dataset(directory)
    (directory / "dataset.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(DatasetError, match="format 'other'"):
        Dataset(directory)


def test_writing_is_deterministic(tmp_path: Path) -> None:
    trajectories = [_trajectory(i) for i in range(3)]
    write_dataset(tmp_path / "one", trajectories)
    write_dataset(tmp_path / "two", trajectories)
    assert (tmp_path / "one" / "index.jsonl").read_bytes() == (tmp_path / "two" / "index.jsonl").read_bytes()
    for name in ("shard-00000/000000.npz", "shard-00000/000002.npz"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_assign_splits_is_stable_and_per_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trajectories = [_trajectory(i, task=f"task{i % 4}", n=3) for i in range(40)]
    write_dataset(tmp_path / "ds", trajectories, frame_codec="npz")
    counts = assign_splits(tmp_path / "ds", 0.2)
    assert counts == {"train": 32, "val": 8}
    dataset = Dataset(tmp_path / "ds")
    val = dataset.filter(predicate=lambda meta: meta.metadata["split"] == "val")
    assert sorted(Counter(m.instruction for m in val.metas).values()) == [2, 2, 2, 2]  # 20 % of each task
    assert dataset.metas[5].metadata["number"] == 5  # other metadata kept
    np.testing.assert_array_equal(dataset[5].frames, trajectories[5].frames)
    first = [m.metadata["split"] for m in dataset.metas]
    assign_splits(tmp_path / "ds", 0.2)
    assert [m.metadata["split"] for m in Dataset(tmp_path / "ds").metas] == first  # same answer again
    assert dataset_main(["split", str(tmp_path / "ds"), "--val-fraction", "0.5", "--by", "task"]) == 0
    assert "train 20, val 20" in capsys.readouterr().out
    held_out = {m.instruction for m in Dataset(tmp_path / "ds").metas if m.metadata["split"] == "val"}
    assert len(held_out) == 2
    assert summarize(Dataset(tmp_path / "ds"))["by_split"] == {"train": 20, "val": 20}
    with pytest.raises(ValueError, match="val_fraction"):
        assign_splits(tmp_path / "ds", 1.0)


def test_summary_counts() -> None:
    summary = summarize(InMemoryDataset([_trajectory(0, n=4), _trajectory(1, "place", "failure", n=8)]))
    assert summary["episodes"] == 2
    assert summary["frames"] == 12
    assert summary["by_quality_label"] == {"failure": 1, "successful": 1}
    assert summary["tasks"] == 2
    assert summary["frame_shapes"] == {"12x16x3": 2}


def _step_data(n_frames: int, steps: int = 11) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(steps)
    return {
        "observations": rng.normal(size=(steps + 1, 5)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(steps, 2)).astype(np.float32),
        "frame_steps": np.rint(np.linspace(0, steps, n_frames)).astype(np.int64),
    }


@pytest.mark.parametrize("codec", ["png", "npz"])
def test_step_data_round_trip_and_frame_selection(tmp_path: Path, codec: str) -> None:
    with_steps = _trajectory(0, n=6, step_data=_step_data(6))
    without = _trajectory(1, n=4)
    dataset = write_dataset(tmp_path / "ds", [with_steps, without], frame_codec=codec)
    assert dataset.metas[0].step_data == {"observations": [12, 5], "actions": [11, 2], "frame_steps": [6]}
    assert dataset.metas[1].step_data == {}
    loaded = dataset.trajectory(0)
    assert sorted(loaded.step_data) == ["actions", "frame_steps", "observations"]
    for name, value in with_steps.step_data.items():
        np.testing.assert_array_equal(loaded.step_data[name], value)
        np.testing.assert_array_equal(dataset.step_data(0)[name], value)
        assert loaded.step_data[name].dtype == value.dtype
    np.testing.assert_array_equal(loaded.frames, with_steps.frames)  # frames unaffected
    assert dataset.trajectory(1).step_data == {} and dataset.step_data(1) == {}
    # a frame subset keeps every control step and the frame -> step map of the frames kept
    part = dataset.trajectory(0, [5, 0, 3])
    np.testing.assert_array_equal(part.step_data["frame_steps"], with_steps.step_data["frame_steps"][[5, 0, 3]])
    np.testing.assert_array_equal(part.step_data["actions"], with_steps.step_data["actions"])
    subset = dataset.select([1, 0])
    np.testing.assert_array_equal(subset.step_data(1)["observations"], with_steps.step_data["observations"])
    in_memory = InMemoryDataset([with_steps])
    np.testing.assert_array_equal(in_memory.trajectory(0, [1]).step_data["frame_steps"],
                                  with_steps.step_data["frame_steps"][[1]])
    assert summarize(dataset)["with_step_data"] == 1


def test_datasets_without_step_data_keep_their_index_lines(tmp_path: Path) -> None:
    """An episode without step data writes the index line it wrote before the field existed, so datasets of
    either age open with both old and new code; an index naming an array its file lacks is an error."""
    dataset = write_dataset(tmp_path / "ds", [_trajectory(0), _trajectory(1, step_data=_step_data(6))])
    lines = [json.loads(line) for line in (tmp_path / "ds" / "index.jsonl").read_text().splitlines()]
    assert "step_data" not in lines[0] and "step_data" in lines[1]
    old_keys = {"episode_id", "instruction", "quality_label", "partial_success", "data_source", "embodiment",
                "n_frames", "frame_shape", "has_progress", "file", "metadata"}
    assert set(lines[0]) == old_keys
    lines[1]["step_data"]["velocities"] = [3]
    (tmp_path / "ds" / "index.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    reopened = Dataset(dataset.directory)
    assert reopened.trajectory(0).step_data == {}
    with pytest.raises(DatasetError, match="velocities"):
        reopened.step_data(1)


def test_step_data_is_checked() -> None:
    with pytest.raises(ValueError, match="frame_steps"):
        _trajectory(0, n=6, step_data={"frame_steps": np.arange(5)})
    with pytest.raises(ValueError, match="frame_steps"):
        _trajectory(0, n=3, step_data={"frame_steps": np.array([0, -2, 1])})
    with pytest.raises(ValueError, match="identifier"):
        _trajectory(0, step_data={"step.actions": np.zeros(3)})
    with pytest.raises(ValueError, match="numeric array"):
        _trajectory(0, step_data={"actions": np.float32(1.0)})


# --------------------------------------------------------------------------- RBM-1M / Hugging Face rows


def _png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def _frames(n: int, value: int = 0) -> np.ndarray:
    frames = np.zeros((n, 16, 24, 3), dtype=np.uint8)
    frames[:, :, :, 0] = (np.arange(n) * 10)[:, None, None]
    frames[:, :, :, 1] = value
    return frames


def _write_mp4(path: Path, frames: np.ndarray, fps: int = 5) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_hf_rows_parquet_with_image_structs_and_bad_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [{"bytes": _png(f), "path": None} for f in _frames(5)]
    rows = [
        {"id": "u1", "task": "open the door", "frames": good, "quality_label": "successful",
         "partial_success": None, "data_source": "oxe_toto", "is_robot": True},
        {"id": "u2", "task": "open the door", "frames": good[:4], "quality_label": "failed",
         "partial_success": 0.25, "data_source": "oxe_toto", "is_robot": False},
        {"id": "u3", "task": "", "frames": good, "quality_label": "successful",
         "partial_success": None, "data_source": "oxe_toto", "is_robot": True},
        {"id": "u4", "task": "x", "frames": [{"bytes": b"junk", "path": None}] * 3, "quality_label": "successful",
         "partial_success": None, "data_source": "oxe_toto", "is_robot": True},
        {"id": "u5", "task": "x", "frames": good, "quality_label": "great",
         "partial_success": None, "data_source": "oxe_toto", "is_robot": True},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    report = HfImportReport()
    trajectories = list(read_hf_rows(tmp_path / "rows.parquet", HfImportOptions(fps=10), report))
    assert [t.episode_id for t in trajectories] == ["u1", "u2"]
    np.testing.assert_array_equal(trajectories[0].frames, _frames(5))
    np.testing.assert_allclose(trajectories[0].frame_stamps, np.arange(5) / 10)
    assert trajectories[1].quality_label == "failure" and trajectories[1].partial_success == 0.25
    assert trajectories[1].metadata["is_robot"] is False and trajectories[0].data_source == "oxe_toto"
    assert report.rows_read == 5 and report.episodes_written == 2
    assert report.episodes_skipped == {"no_task": 1, "undecodable_frame": 1, "bad_quality_label": 1}
    assert any("row 3 frame 0" in note for note in report.notes)
    robots = list(read_hf_rows(tmp_path / "rows.parquet", HfImportOptions(robot_only=True)))
    assert [t.episode_id for t in robots] == ["u1"]
    with pytest.raises(HfRowError, match="row 2"):
        list(read_hf_rows(tmp_path / "rows.parquet", strict=True))


def test_hf_rows_jsonl_with_mp4_image_dirs_and_arrays(tmp_path: Path) -> None:
    media = tmp_path / "media"
    (media / "ep2").mkdir(parents=True)
    _write_mp4(media / "ep1.mp4", _frames(10, value=100))
    for i, frame in enumerate(_frames(4)):
        (media / "ep2" / f"{i:03d}.png").write_bytes(_png(frame))
    np.save(media / "ep3.npy", _frames(6))
    rows = [
        {"id": "a", "task": "pour", "frames": "ep1.mp4", "data_source": "racer"},
        {"id": "b", "task": "pour", "frames": "ep2", "quality_label": "suboptimal"},
        {"id": "c", "task": "pour", "frames": "ep3.npy", "fps": 2},
        {"id": "d", "task": "pour", "frames": "missing.mp4"},
        {"id": "e", "task": "pour", "frames": {"path": "ep1.mp4", "bytes": None}},
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = HfImportReport()
    options = HfImportOptions(media_dir=media, max_frames=8, data_source="mine")
    trajectories = {t.episode_id: t for t in read_hf_rows(tmp_path / "rows.jsonl", options, report)}
    assert set(trajectories) == {"a", "b", "c", "e"}
    np.testing.assert_array_equal(trajectories["e"].frames, trajectories["a"].frames)
    video = trajectories["a"]
    assert video.frames.shape == (8, 16, 24, 3) and video.metadata["source_frames"] == 10
    assert np.abs(video.frames[:, 4, 4, 1].astype(int) - 100).max() < 8  # lossy video, right content
    np.testing.assert_allclose(video.frame_stamps, np.array([0, 1, 3, 4, 5, 6, 8, 9]) / 5)  # the video's 5 fps
    assert trajectories["b"].quality_label == "suboptimal" and trajectories["b"].data_source == "mine"
    np.testing.assert_array_equal(trajectories["b"].frames, _frames(4))
    np.testing.assert_allclose(trajectories["c"].frame_stamps, np.arange(6) / 2)
    assert report.episodes_skipped == {"missing_media": 1}
    import pyarrow as pa
    import pyarrow.parquet as pq

    video_bytes = {"id": "f", "task": "pour", "frames": {"bytes": (media / "ep1.mp4").read_bytes(), "path": None}}
    pq.write_table(pa.Table.from_pylist([video_bytes]), tmp_path / "video.parquet")
    (trajectory,) = read_hf_rows(tmp_path / "video.parquet", options)
    np.testing.assert_array_equal(trajectory.frames, video.frames)  # a video held in the row itself


def test_hf_cli_and_broken_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frames = [{"bytes": _png(f)} for f in _frames(4)]
    (tmp_path / "rows.json").write_text(json.dumps([{"id": "z", "task": "t", "frames": []}]))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "rows"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": "p", "task": "t", "frames": frames}]), folder / "a.parquet")
    (folder / "b.parquet").write_bytes(b"garbage")
    code = dataset_main(["from-hf", str(folder), "--out", str(tmp_path / "ds")])
    out = capsys.readouterr().out
    assert code == 1 and "b.parquet" in out and "episodes written: 1" in out  # partial import, failure named
    assert len(Dataset(tmp_path / "ds")) == 1
    report = HfImportReport()
    assert list(read_hf_rows(tmp_path / "rows.json", report=report)) == []
    assert report.episodes_skipped == {"empty": 1}
    with pytest.raises(HfRowError, match="no such file"):
        list(read_hf_rows(tmp_path / "nothing.parquet"))
