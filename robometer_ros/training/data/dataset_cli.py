"""`robometer-dataset`: build and inspect trajectory datasets.

    robometer-dataset from-bags BAG_OR_FOLDER... --out DIR [--image-topic T] [--instruction TEXT] [--repair] ...
    robometer-dataset repair BAG... [--out DIR] [--dry-run] [--delete-original]
    robometer-dataset from-hf ROWS.parquet|ROWS.jsonl... --out DIR [--media-dir DIR] ...
    robometer-dataset split DIR --val-fraction 0.1 [--by episode|task]
    robometer-dataset info DIR

Exit status: 0 on success; 1 when some input could not be read or nothing was imported (the report
says what); 2 for bad arguments or an unusable output directory.

Adding a subcommand: write `configure(parser)` and `run(args) -> int` functions (keep heavy imports
inside `run`, so `--help` stays fast) and add a `Subcommand` for them to `subcommands()` below.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robometer_ros.training.data.store import (
    DEFAULT_SHARD_SIZE,
    FRAME_CODECS,
    Dataset,
    DatasetError,
    DatasetWriter,
    assign_splits,
    summarize,
)
from robometer_ros.trajectory import LABELS, UNKNOWN


@dataclass(frozen=True)
class Subcommand:
    """One `robometer-dataset` subcommand."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every importing subcommand shares (output directory, codec, report)."""
    parser.add_argument("--out", required=True, type=Path, help="dataset directory to create")
    parser.add_argument("--append", action="store_true", help="add to an existing dataset at --out")
    parser.add_argument("--codec", choices=FRAME_CODECS, default="jpeg",
                        help="frame storage: jpeg (quality 95; default: ~7x smaller and faster than png on "
                             "camera frames, see benchmarks/dataset_codecs.py), png (lossless) or npz")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="episodes per shard directory")
    parser.add_argument("--report-json", type=Path, help="also write the import report here as JSON")


def open_writer(args: argparse.Namespace) -> DatasetWriter:
    """The DatasetWriter the output options ask for."""
    return DatasetWriter(args.out, frame_codec=args.codec, shard_size=args.shard_size, append=args.append)


def finish_import(args: argparse.Namespace, report: Any) -> int:
    """Print the report (and write it as JSON if asked); 1 when inputs failed or nothing was imported."""
    print(report.format())
    if args.report_json is not None:
        args.report_json.write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    if report.episodes_written == 0:
        print("error: no episodes were imported (see the counts above)", file=sys.stderr)
        return 1
    return 0 if report.ok else 1


def _configure_from_bags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bags", nargs="+", type=Path,
                        help="rosbag2 directories, .mcap / .db3 / .bag files, or folders holding them")
    add_output_arguments(parser)
    parser.add_argument("--image-topic", help="camera topic (default: the bag's only Image/CompressedImage topic)")
    parser.add_argument("--instruction", help="fixed instruction for every episode (overrides the bags)")
    parser.add_argument("--instruction-topic", help="std_msgs/String topic (default: the bag's only String topic)")
    parser.add_argument("--episode-topic", help="robometer_ros EpisodeStatus topic (default: found by type)")
    parser.add_argument("--step-reward-topic", help="robometer_ros StepReward topic (default: found by type)")
    parser.add_argument("--split", choices=("auto", "episode_id", "gap", "none"), default="auto",
                        help="episode splitting: by the node's episode ids, by time gaps, or one per bag "
                             "(auto: ids when present, else gaps)")
    parser.add_argument("--gap", type=float, default=2.0, help="seconds between frames that start a new episode")
    parser.add_argument("--no-split-on-instruction", action="store_true",
                        help="in gap mode, do not start a new episode when the instruction changes")
    parser.add_argument("--unknown-label", choices=(*LABELS, "skip"), default=UNKNOWN,
                        help="quality label of episodes without an end-of-episode outcome (default unknown: "
                             "kept, but left out of training pairs and label-based metrics), or skip them")
    parser.add_argument("--max-fps", type=float, help="keep at most this many frames per second")
    parser.add_argument("--max-frames", type=int, help="thin each episode evenly to at most this many frames")
    parser.add_argument("--min-frames", type=int, default=3, help="skip (and count) shorter episodes")
    parser.add_argument("--shortest-edge", type=int, help="resize frames so the short side has this many pixels")
    parser.add_argument("--data-source", default="rosbag", help="data source name of the episodes")
    parser.add_argument("--embodiment", help="robot type of the episodes")
    parser.add_argument("--strict", action="store_true", help="stop at the first bag that cannot be read")
    parser.add_argument("--repair", action="store_true",
                        help="repair MCAP bags that were cut short (in place, the cut file kept as *.orig) and "
                             "import them (default: report them, naming `robometer-dataset repair`)")


def _run_from_bags(args: argparse.Namespace) -> int:
    from robometer_ros.training.data.bags import BagImportError, BagImportOptions, ImportReport, read_bags

    options = BagImportOptions(
        image_topic=args.image_topic,
        instruction=args.instruction,
        instruction_topic=args.instruction_topic,
        episode_topic=args.episode_topic,
        step_reward_topic=args.step_reward_topic,
        split=args.split,
        gap=args.gap,
        split_on_instruction=not args.no_split_on_instruction,
        unknown_label=args.unknown_label,
        max_fps=args.max_fps,
        max_frames=args.max_frames,
        min_frames=args.min_frames,
        shortest_edge=args.shortest_edge,
        data_source=args.data_source,
        embodiment=args.embodiment,
        repair=args.repair,
    )
    report = ImportReport()
    with open_writer(args) as writer:
        try:
            for trajectory in read_bags(args.bags, options, report, strict=args.strict):
                writer.add(trajectory)
        except BagImportError as error:  # --strict, or no bags at the given paths
            print(report.format())
            print(f"error: {error}", file=sys.stderr)
            return 1
    return finish_import(args, report)


def _configure_from_hf(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rows", nargs="+", type=Path,
                        help="RBM-1M / Hugging Face row files (.parquet, .jsonl, .json) or folders of them")
    add_output_arguments(parser)
    parser.add_argument("--media-dir", type=Path,
                        help="root for relative video / image paths in the rows (default: each file's folder)")
    parser.add_argument("--data-source", help="data source for rows that have none (default: the file's name)")
    parser.add_argument("--fps", type=float, default=None,
                        help="frame rate for frame stamps when neither the row nor the video says (default 1)")
    parser.add_argument("--max-frames", type=int, help="thin each episode evenly to at most this many frames")
    parser.add_argument("--min-frames", type=int, default=3, help="skip (and count) shorter episodes")
    parser.add_argument("--shortest-edge", type=int, help="resize frames so the short side has this many pixels")
    parser.add_argument("--robot-only", action="store_true", help="skip rows with is_robot = false (human videos)")
    parser.add_argument("--limit", type=int, help="import at most this many rows")
    parser.add_argument("--strict", action="store_true", help="stop at the first row that cannot be read")


def _run_from_hf(args: argparse.Namespace) -> int:
    from robometer_ros.training.data.hf_rows import HfImportOptions, HfImportReport, HfRowError, read_hf_rows

    options = HfImportOptions(
        media_dir=args.media_dir,
        data_source=args.data_source,
        fps=args.fps,
        max_frames=args.max_frames,
        min_frames=args.min_frames,
        shortest_edge=args.shortest_edge,
        robot_only=args.robot_only,
        limit=args.limit,
    )
    report = HfImportReport()
    with open_writer(args) as writer:
        try:
            for trajectory in read_hf_rows(args.rows, options, report, strict=args.strict):
                writer.add(trajectory)
        except HfRowError as error:  # --strict, no video decoder, or no row files at the given paths
            print(report.format())
            print(f"error: {error}", file=sys.stderr)
            return 1
    return finish_import(args, report)


def _configure_from_metaworld(parser: argparse.ArgumentParser) -> None:
    from robometer_ros.training.data import metaworld

    add_output_arguments(parser)
    metaworld.add_arguments(parser)


def _run_from_metaworld(args: argparse.Namespace) -> int:
    from robometer_ros.training.data import metaworld

    return metaworld.run(args)


def _configure_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="dataset directory")


def _run_info(args: argparse.Namespace) -> int:
    dataset = Dataset(args.dataset)
    summary = {"directory": str(args.dataset), "frame_codec": dataset.frame_codec, **summarize(dataset)}
    print(json.dumps(summary, indent=2))
    return 0


def _configure_split(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="dataset directory (its index is rewritten in place)")
    parser.add_argument("--val-fraction", type=float, required=True, help="share of episodes (or tasks) for val")
    parser.add_argument("--by", choices=("episode", "task"), default="episode",
                        help="episode: a share of each task's episodes; task: hold out whole tasks")
    parser.add_argument("--seed", type=int, default=0, help="changes which episodes / tasks are chosen")


def _run_split(args: argparse.Namespace) -> int:
    counts = assign_splits(args.dataset, args.val_fraction, by=args.by, seed=args.seed)
    print(f"{args.dataset}: train {counts['train']}, val {counts['val']} (metadata 'split'; "
          "use --split val / data.eval_split: val)")
    return 0


def _configure_repair(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bags", nargs="+", type=Path,
                        help="MCAP bag directories or .mcap files (folders are searched for bags to repair)")
    parser.add_argument("--out", type=Path,
                        help="write repaired bags into this folder and leave the originals alone (default: in "
                             "place, the cut file kept as <name>.mcap.orig)")
    parser.add_argument("--delete-original", action="store_true", help="in place: do not keep the cut file")
    parser.add_argument("--dry-run", action="store_true", help="only count what would be recovered")
    parser.add_argument("--force", action="store_true", help="rewrite bags that look intact too")


def _run_repair(args: argparse.Namespace) -> int:
    from robometer_ros.training.data.bag_repair import BagRepairError, needs_repair, repair_bag

    targets: list[Path] = []
    for path in args.bags:
        if path.is_dir() and not (path / "metadata.yaml").is_file() and not any(path.glob("*.mcap")):
            targets += sorted(p for p in path.rglob("*") if p.is_dir() and needs_repair(p))  # a folder of bags
        else:
            targets.append(path)
    if not targets:
        print("no bag to repair under " + ", ".join(map(str, args.bags)))
        return 0
    failed = 0
    for bag in targets:
        try:
            result = repair_bag(bag, out=args.out, keep_original=not args.delete_original, dry_run=args.dry_run,
                                force=args.force)
        except BagRepairError as error:
            print(f"FAILED {error}", file=sys.stderr)
            failed += 1
            continue
        print(result.format())
    return 1 if failed else 0


def subcommands() -> list[Subcommand]:
    """Every subcommand, in `--help` order. Add new ones here (e.g. from-metaworld)."""
    return [
        Subcommand("from-bags", "import rosbag2 bags (MCAP / sqlite3) as a dataset", _configure_from_bags,
                   _run_from_bags),
        Subcommand("from-hf", "import RBM-1M / Hugging Face rows (parquet / jsonl + media) as a dataset",
                   _configure_from_hf, _run_from_hf),
        Subcommand("from-metaworld", "generate simulated Meta-World episodes (expert / suboptimal / failure)",
                   _configure_from_metaworld, _run_from_metaworld),
        Subcommand("repair", "rebuild MCAP bags cut short (no metadata.yaml / summary) from their flushed data",
                   _configure_repair, _run_repair),
        Subcommand("split", "tag episodes train / val (stable hashes; per task or whole tasks)", _configure_split,
                   _run_split),
        Subcommand("info", "print a dataset's counts (episodes, frames, sources, labels, tasks)", _configure_info,
                   _run_info),
    ]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="robometer-dataset", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in subcommands():
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `robometer-dataset`."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (DatasetError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
