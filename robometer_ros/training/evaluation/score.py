"""`robometer-score MODEL (--dataset DIR | --bags PATH ...) --out FILE.parquet|.csv`: rank and filter episodes.

    robometer-score runs/tiny/bundle --dataset data/play --out scores.parquet
    robometer-score runs/tiny/best --bags bags/ --image-topic /camera/image_raw \
        --instruction "open the drawer" --out scores.csv

Every episode is scored exactly as the reward node scores it live: through the ScoringSession with the
node's settings (the package's config/reward_node.yaml, or ``--params-file``; ``--frame-rate`` overrides the
admission rate, 0 = every frame), each frame offered at its camera stamp, every admitted frame scored (the
newest frame with the first and an even subsample of the others, ``num_frames`` in all), the episode closed
with ``end`` (which scores the last frame), and the node's EpisodeMonitor judging it. Two tables:

* FILE (one row per episode): episode_id, instruction, data_source, quality_label, embodiment, n_frames,
  steps, final_progress / final_success_probability (the last step: the whole episode, first and last frame
  kept), max_progress / mean_progress / max_success_probability over the steps, predicted_failure (the
  node raised a failure flag during the episode or at its end), first_failure (its reason), verdict (the
  monitor's verdict at the end), rank_in_task (1 = highest final progress among episodes with the same
  instruction), task_size, rank_overall, percentile_overall (1 = best).
* FILE with `_frames` before the suffix (one row per scoring step): episode_id, frame_index, stamp, progress,
  success_probability, reward: the dense reward the robot got at that frame.

Filter demonstrations with e.g. `final_progress > 0.8 and not predicted_failure`, or keep the top-k per task
by rank_in_task (as the paper does to filter play data and rank demonstrations).

Sharded over GPUs and machines with the same command under torchrun (robometer_ros.training.evaluation.sharding):
`torchrun --nproc_per_node 4 -m robometer_ros.training.evaluation.score MODEL --bags /fleet/bags --out scores.parquet`
scores a slice of the bags (or dataset episodes) per rank; rank 0 writes the one merged output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from robometer_ros.monitor import EventKind
from robometer_ros.session import NS_PER_S, ScoringSession, SessionConfig, replay
from robometer_ros.training.evaluation.evaluate import add_model_arguments, open_predictor
from robometer_ros.training.recipe.verdicts import label_outcome
from robometer_ros.trajectory import UNKNOWN, Trajectory

EPISODE_COLUMNS = (
    "episode_id", "instruction", "data_source", "quality_label", "embodiment", "n_frames", "steps",
    "final_progress", "final_success_probability", "max_progress", "mean_progress",
    "max_success_probability", "predicted_failure", "first_failure", "verdict", "rank_in_task", "task_size",
    "rank_overall", "percentile_overall",
)
FRAME_COLUMNS = ("episode_id", "frame_index", "stamp", "progress", "success_probability", "reward")


@dataclass
class EpisodeScores:
    """Scores of one episode (see the module docstring for the fields); frame_* arrays have one entry per
    scoring step."""

    episode_id: str
    instruction: str
    data_source: str
    quality_label: str
    embodiment: str | None
    n_frames: int
    final_progress: float
    final_success_probability: float
    frame_indices: np.ndarray
    frame_stamps: np.ndarray
    frame_progress: np.ndarray
    frame_success_probability: np.ndarray
    frame_reward: np.ndarray
    predicted_failure: bool = False
    first_failure: str = ""
    verdict: str = ""
    rank_in_task: int = 0
    task_size: int = 0
    rank_overall: int = 0
    percentile_overall: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def score_episode(session: ScoringSession, trajectory: Trajectory) -> EpisodeScores:
    """Score one trajectory through ``session`` as the node would; its steps and the monitor's verdict."""
    stamps_ns = np.round(np.asarray(trajectory.frame_stamps, dtype=np.float64) * NS_PER_S).astype(np.int64)
    outcome = label_outcome(trajectory.quality_label)
    result = replay(session, trajectory.instruction, stamps_ns, trajectory.frames, outcome)
    steps = [s for s in result.steps if s.ok]
    if not steps:
        raise RuntimeError(f"episode {trajectory.episode_id!r}: no step produced scores "
                           f"({result.steps[-1].error if result.steps else 'no frame was admitted'})")
    step_stamps = np.asarray([s.stamp_ns for s in steps], dtype=np.int64)
    alarms = [e for e in result.events if e.kind is EventKind.FAILURE_RAISED]
    return EpisodeScores(
        episode_id=trajectory.episode_id,
        instruction=trajectory.instruction,
        data_source=trajectory.data_source,
        quality_label=trajectory.quality_label,
        embodiment=trajectory.embodiment,
        n_frames=len(trajectory),
        final_progress=steps[-1].progress,
        final_success_probability=steps[-1].success_probability,
        frame_indices=np.searchsorted(stamps_ns, step_stamps).astype(np.int64),
        frame_stamps=step_stamps / NS_PER_S,
        frame_progress=np.asarray([s.progress for s in steps], dtype=np.float32),
        frame_success_probability=np.asarray([s.success_probability for s in steps], dtype=np.float32),
        frame_reward=np.asarray([s.reward for s in steps], dtype=np.float32),
        predicted_failure=bool(alarms),
        first_failure=alarms[0].reason.name if alarms else "",
        verdict=result.verdict,
    )


def assign_ranks(episodes: Sequence[EpisodeScores]) -> None:
    """rank_in_task / task_size (per instruction), rank_overall and percentile_overall, by final progress
    (ties broken by final success probability, then by episode order)."""
    def order(items: list[int]) -> list[int]:
        return sorted(items, key=lambda i: (-episodes[i].final_progress, -episodes[i].final_success_probability, i))

    by_task: dict[str, list[int]] = {}
    for i, episode in enumerate(episodes):
        by_task.setdefault(episode.instruction, []).append(i)
    for members in by_task.values():
        for rank, i in enumerate(order(members), start=1):
            episodes[i].rank_in_task = rank
            episodes[i].task_size = len(members)
    total = len(episodes)
    for rank, i in enumerate(order(list(range(total))), start=1):
        episodes[i].rank_overall = rank
        episodes[i].percentile_overall = 1.0 if total == 1 else 1.0 - (rank - 1) / (total - 1)


def score_trajectories(
    engine: Any, trajectories: Iterable[Trajectory], config: SessionConfig, progress_bar: bool = False,
) -> list[EpisodeScores]:
    """Score every trajectory through one ScoringSession (streamed: one episode's frames in memory at a
    time) and rank them."""
    session = ScoringSession(engine, config)
    iterator = trajectories
    if progress_bar:
        from tqdm import tqdm

        iterator = tqdm(trajectories, desc="score", unit="episode")
    episodes = [score_episode(session, t) for t in iterator]
    assign_ranks(episodes)
    return episodes


def companion_path(path: str | Path) -> Path:
    """FILE.parquet -> FILE_frames.parquet (where the per-frame table goes)."""
    p = Path(path)
    return p.with_name(f"{p.stem}_frames{p.suffix}")


def write_tables(episodes: Sequence[EpisodeScores], out: str | Path) -> tuple[Path, Path]:
    """Write the episode table to `out` and the frame table next to it (.parquet or .csv, by suffix)."""
    import pyarrow as pa

    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise ValueError(f"--out must end in .parquet or .csv, got {out.name!r}")
    episode_table = pa.table({
        "episode_id": [e.episode_id for e in episodes],
        "instruction": [e.instruction for e in episodes],
        "data_source": [e.data_source for e in episodes],
        "quality_label": [e.quality_label for e in episodes],
        "embodiment": pa.array([e.embodiment for e in episodes], type=pa.string()),
        "n_frames": pa.array([e.n_frames for e in episodes], type=pa.int64()),
        "final_progress": pa.array([e.final_progress for e in episodes], type=pa.float32()),
        "final_success_probability": pa.array([e.final_success_probability for e in episodes], type=pa.float32()),
        "max_progress": pa.array([float(np.max(e.frame_progress)) for e in episodes], type=pa.float32()),
        "mean_progress": pa.array([float(np.mean(e.frame_progress)) for e in episodes], type=pa.float32()),
        "max_success_probability": pa.array(
            [float(np.max(e.frame_success_probability)) for e in episodes], type=pa.float32()),
        "steps": pa.array([len(e.frame_indices) for e in episodes], type=pa.int64()),
        "predicted_failure": pa.array([e.predicted_failure for e in episodes], type=pa.bool_()),
        "first_failure": pa.array([e.first_failure for e in episodes], type=pa.string()),
        "verdict": pa.array([e.verdict for e in episodes], type=pa.string()),
        "rank_in_task": pa.array([e.rank_in_task for e in episodes], type=pa.int64()),
        "task_size": pa.array([e.task_size for e in episodes], type=pa.int64()),
        "rank_overall": pa.array([e.rank_overall for e in episodes], type=pa.int64()),
        "percentile_overall": pa.array([e.percentile_overall for e in episodes], type=pa.float32()),
    })
    frame_table = pa.table({
        "episode_id": [e.episode_id for e in episodes for _ in e.frame_indices],
        "frame_index": pa.array(np.concatenate([e.frame_indices for e in episodes]) if episodes else [],
                                type=pa.int64()),
        "stamp": pa.array(np.concatenate([e.frame_stamps for e in episodes]) if episodes else [],
                          type=pa.float64()),
        "progress": pa.array(np.concatenate([e.frame_progress for e in episodes]) if episodes else [],
                             type=pa.float32()),
        "success_probability": pa.array(
            np.concatenate([e.frame_success_probability for e in episodes]) if episodes else [],
            type=pa.float32()),
        "reward": pa.array(np.concatenate([e.frame_reward for e in episodes]) if episodes else [],
                           type=pa.float32()),
    })
    frames_out = companion_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for table, path in ((episode_table, out), (frame_table, frames_out)):
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, path)
        else:
            import pyarrow.csv as pcsv

            pcsv.write_csv(table, path)
    return out, frames_out


def _bag_episodes(args: argparse.Namespace, shard: Any) -> tuple[Any, list[str], Any]:
    """This rank's bags as ShardedEpisodes (ids made unique at the merge), the bag names, the import report."""
    from robometer_ros.training.data.bags import BagImportOptions, ImportReport, find_bags, read_bags
    from robometer_ros.training.evaluation.sharding import ShardedEpisodes

    options = BagImportOptions(
        image_topic=args.image_topic,
        instruction=args.instruction,
        instruction_topic=args.instruction_topic,
        unknown_label=UNKNOWN,
        min_frames=1,
        max_frames=args.max_frames,
        data_source=args.data_source,
    )
    report = ImportReport()
    bags = [bag for path in args.bags for bag in find_bags(path)]
    episodes = ShardedEpisodes(shard, bags, lambda bag: read_bags([bag], options, report, unique_ids=False))
    return episodes, [bag.name for bag in bags], report


def main(argv: list[str] | None = None) -> int:
    """Console entry point of robometer-score."""
    parser = argparse.ArgumentParser(prog="robometer-score", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="dataset directory (robometer-dataset)")
    source.add_argument("--bags", nargs="+", help="rosbag2 bags or folders of them")
    parser.add_argument("--split", default="all", help="dataset split to score (default: all episodes)")
    parser.add_argument("--image-topic", help="bags: camera topic (default: the bag's only image topic)")
    parser.add_argument("--instruction", help="bags: fixed instruction (default: the bag's instruction topic)")
    parser.add_argument("--instruction-topic", help="bags: std_msgs/String instruction topic")
    parser.add_argument("--max-frames", type=int, help="bags: thin each episode to at most this many frames")
    parser.add_argument("--data-source", default="rosbag", help="bags: data source name of the episodes")
    parser.add_argument("--out", required=True, help="episode table, .parquet or .csv (frames go to *_frames.*)")
    parser.add_argument("--params-file", action="append", default=[],
                        help="the node's parameter files (session settings and monitor thresholds; repeatable; "
                        "default: the package's config/reward_node.yaml)")
    parser.add_argument("--frame-rate", type=float, help="frames admitted per second of camera time, overriding the "
                        "params file (0 = score every frame)")
    args = parser.parse_args(argv)

    from robometer_ros.engine.bundle import BundleError
    from robometer_ros.training.data.bags import BagImportError
    from robometer_ros.training.data.store import DatasetError, open_split
    from robometer_ros.training.evaluation import sharding

    report = unit_names = None
    try:
        if Path(args.out).suffix not in (".parquet", ".csv"):
            raise ValueError(f"--out must end in .parquet or .csv, got {args.out!r}")
        shard = sharding.shard_from_env()  # rank 0 of 1 unless under torchrun
        sharding.pin_local_gpu(shard)
        if args.dataset:
            collection = open_split(args.dataset, args.split)
            trajectories = sharding.ShardedEpisodes(shard, range(len(collection)), lambda i: [collection[i]])
        else:
            trajectories, unit_names, report = _bag_episodes(args, shard)
        predictor = open_predictor(args.model, args.backend, args.device, args.tokenizer_dir, args.frame_size,
                                   args.batch_size)
        from robometer_ros.node_parameters import session_config_from_files

        config = session_config_from_files(args.params_file, predictor.num_frames)
        if args.frame_rate is not None:
            config = replace(config, frame_rate=args.frame_rate)
    except (BundleError, DatasetError, BagImportError, FileNotFoundError, ValueError) as error:
        print(f"robometer-score: {error}", file=sys.stderr)
        return 2
    episodes = score_trajectories(predictor.engine, trajectories, config, progress_bar=shard.is_main)
    if report is not None:
        print(report.format(), file=sys.stderr)
    episodes = sharding.merge_on_main(shard, episodes, trajectories.unit_of, unit_names)
    if episodes is None:  # not rank 0: it sent its episodes there
        sharding.log_rank(shard, f"scored {len(trajectories.unit_of)} episodes; rank 0 writes {args.out}")
        return 0
    if not episodes:
        print("robometer-score: no episodes to score", file=sys.stderr)
        return 1
    episode_path, frame_path = write_tables(episodes, args.out)
    print(f"scored {len(episodes)} episodes: {episode_path} (episodes), {frame_path} (frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
