"""`robometer-calibrate MODEL (--dataset DIR | --bags PATH ...) --out calibration.yaml`: monitor thresholds
chosen on labelled episodes, with cross-validated figures.

    robometer-calibrate bundles/default --dataset data/metaworld --split eval_seeds --out calibration.yaml
    robometer-calibrate bundles/my_robot --bags ~/robometer_episodes --max-false-alarm 0.05 --out cal.yaml
    ros2 launch robometer_ros reward.launch.py bundle:=bundles/my_robot calibration:=$PWD/cal.yaml

1. Every labelled episode is scored once through the ScoringSession with the node's settings (the
   package's config/reward_node.yaml, or ``--params-file``): exactly the steps a robot would score.
   Bags the node recorded carry their ``~/end_episode`` label; episodes without one are left out.
2. The EpisodeMonitor thresholds are searched on the cached per-step scores (the model never runs
   again): coordinate ascent over a grid per threshold (time thresholds as fractions of the median
   episode length), maximising failure F1 — or, with ``--max-false-alarm R``, the best F1 whose
   false-alarm rate on non-failure episodes is at most R (else the lowest false-alarm rate).
3. The figures reported are cross-validated (``--folds`` k, stratified by label): each fold is judged with
   thresholds searched on the other folds, so they are not the fitted ones; bootstrap 95% intervals, the
   false-alarm rate, detection delays and per-task figures. The thresholds written are searched on all
   episodes.

Writes OUT (a ROS 2 parameters YAML the node loads as it is: a second ``--params-file``, or the launch
argument ``calibration:=``) with the figures as comments, and beside it OUT_STEM_report/: report.json,
report.md, scores.npz (the cached per-step scores, reusable with ``--scores``), and curves.png
(precision-recall and ROC of the end-of-episode score with the chosen operating point).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from robometer_ros.monitor import MonitorConfig
from robometer_ros.training.recipe.validation import json_ready
from robometer_ros.training.recipe.verdicts import (
    RULE,
    ScoredEpisode,
    Verdict,
    bootstrap_intervals,
    detection_figures,
    figures_by,
    format_figures,
    judge,
    score_episodes,
)

# Thresholds searched, in this order; "time" candidates are fractions of the median episode length.
_GRID: dict[str, tuple[str, tuple[float, ...]]] = {
    "end_success_threshold": ("abs", (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)),
    "end_window_steps": ("abs", (1, 2, 3, 5)),
    "success_threshold": ("abs", (0.5, 0.6, 0.65, 0.7, 0.8, 0.9)),
    "success_steps": ("abs", (1, 2, 3)),
    "success_release_threshold": ("abs", (0.1, 0.2, 0.3, 0.4, 0.5)),
    "success_lost_steps": ("abs", (1, 2, 3, 5)),
    "stall_timeout_s": ("time", (0.0, 0.2, 0.35, 0.5, 0.75, 1.0)),
    "stall_grace_s": ("time", (0.0, 0.1, 0.25)),
    "stall_epsilon": ("abs", (0.01, 0.02, 0.05, 0.1)),
    "regression_margin": ("abs", (0.15, 0.2, 0.3, 0.4, 0.6, 1.0)),
    "regression_steps": ("abs", (1, 2, 3)),
}
_INT_FIELDS = {f.name for f in fields(MonitorConfig) if f.type in (int, "int")}


@dataclass
class Objective:
    """What the search maximises: failure F1, optionally subject to a false-alarm bound."""

    max_false_alarm: float | None = None

    def score(self, verdicts: Sequence[Verdict]) -> tuple[float, ...]:
        """A sortable key (higher is better)."""
        figures = detection_figures(verdicts)
        f1 = figures.f1 if math.isfinite(figures.f1) else 0.0
        far = figures.false_alarm_rate if math.isfinite(figures.false_alarm_rate) else 0.0
        if self.max_false_alarm is None:
            return (f1, -far)
        feasible = far <= self.max_false_alarm + 1e-12
        return (1.0, f1, -far) if feasible else (0.0, -far, f1)


def candidates(name: str, base: MonitorConfig, median_duration_s: float) -> list[Any]:
    """The grid of one threshold (time ones scaled by the median episode duration), valid for ``base``."""
    kind, values = _GRID[name]
    scale = median_duration_s if kind == "time" else 1.0
    out = []
    for value in values:
        value = round(value * scale, 4)
        if name in _INT_FIELDS:
            value = int(value)
        try:
            replace(base, **{name: value})
        except ValueError:
            continue  # e.g. a release threshold above the success threshold
        out.append(value)
    return sorted(set(out), key=out.index)


def search(episodes: Sequence[ScoredEpisode], objective: Objective, start: MonitorConfig | None = None,
           passes: int = 3, log: Callable[[str], None] | None = None) -> MonitorConfig:
    """Coordinate ascent over the grid from ``start`` until a pass changes nothing (at most ``passes``)."""
    config = start or MonitorConfig()
    if not episodes:
        return config
    median = float(np.median([e.duration_s for e in episodes])) or 1.0
    best = objective.score(judge(episodes, config))
    for number in range(passes):
        changed = False
        for name in _GRID:
            current = getattr(config, name)
            values = sorted(set(candidates(name, config, median)) | {current})  # the start value competes too
            keys = {value: best if value == current else
                    objective.score(judge(episodes, replace(config, **{name: value}))) for value in values}
            top = max(keys.values(), default=best)
            if top < best:
                continue
            # Of the values that do equally well, the middle one: the widest margin to the data on both sides.
            tied = [value for value in values if keys[value] == top]
            choice = tied[len(tied) // 2]
            if choice != current:
                config, best, changed = replace(config, **{name: choice}), top, True
        if log:
            log(f"search pass {number + 1}: objective {tuple(round(k, 4) for k in best)}")
        if not changed:
            break
    return config


def folds(episodes: Sequence[ScoredEpisode], k: int, seed: int = 0) -> list[int]:
    """A fold number per episode, stratified by quality label (seeded)."""
    rng = np.random.default_rng(seed)
    assignment = [0] * len(episodes)
    by_label: dict[str, list[int]] = {}
    for i, episode in enumerate(episodes):
        by_label.setdefault(episode.quality_label, []).append(i)
    offset = 0
    for label in sorted(by_label):
        members = by_label[label]
        for position, i in enumerate(rng.permutation(members)):
            assignment[int(i)] = (position + offset) % k
        offset += len(members)
    return assignment


@dataclass
class Calibration:
    """The result: thresholds fitted on all episodes and the cross-validated verdicts."""

    config: MonitorConfig
    cross_validated: list[Verdict]
    fitted: list[Verdict]
    before: list[Verdict]
    fold_configs: list[MonitorConfig]


def calibrate(episodes: Sequence[ScoredEpisode], objective: Objective, k: int = 5, seed: int = 0,
              start: MonitorConfig | None = None, log: Callable[[str], None] | None = None) -> Calibration:
    """Cross-validated threshold search (see the module docstring)."""
    start = start or MonitorConfig()
    k = max(2, min(k, len(episodes)))
    assignment = folds(episodes, k, seed)
    cross: list[Verdict | None] = [None] * len(episodes)
    fold_configs = []
    for fold in range(k):
        train = [e for e, f in zip(episodes, assignment) if f != fold]
        test_index = [i for i, f in enumerate(assignment) if f == fold]
        config = search(train, objective, start)
        fold_configs.append(config)
        for i, verdict in zip(test_index, judge([episodes[i] for i in test_index], config)):
            cross[i] = verdict
        if log:
            held_out = detection_figures([v for i in test_index if (v := cross[i]) is not None])
            log(f"fold {fold + 1}/{k}: {format_figures('held-out fold', held_out)}")
    final = search(episodes, objective, start, log=log)
    return Calibration(final, [v for v in cross if v is not None], judge(episodes, final), judge(episodes, start),
                       fold_configs)


# ---------------------------------------------------------------------------------------------- outputs
def parameters_yaml(config: MonitorConfig, comments: Sequence[str]) -> str:
    """A ROS 2 parameters file setting every monitor threshold (``/**`` applies to any node name)."""
    lines = [f"# {line}" if line else "#" for line in comments]
    lines += ["/**:", "  ros__parameters:", "    monitor:"]
    for f in fields(config):
        lines.append(f"      {f.name}: {_yaml_number(getattr(config, f.name))}")
    return "\n".join(lines) + "\n"


def _yaml_number(value: Any) -> str:
    """An int as an int; a float always with a decimal point (ROS refuses an int for a double parameter)."""
    if isinstance(value, float):
        text = f"{value:.6f}".rstrip("0")
        return text + "0" if text.endswith(".") else text
    return str(int(value))


def end_scores(verdicts: Sequence[Verdict], config: MonitorConfig) -> tuple[np.ndarray, np.ndarray]:
    """(1 - mean success probability over the end window, actual failure) per episode: the scalar the
    end-of-episode rule thresholds, for the curves."""
    score, actual = [], []
    for v in verdicts:
        success = v.episode.step_scores[:, 2]
        success = success[np.isfinite(success)][-config.end_window_steps:]
        score.append(1.0 - float(success.mean()) if success.size else 1.0)
        actual.append(v.episode.failed)
    return np.asarray(score), np.asarray(actual, dtype=bool)


def plot_curves(verdicts: Sequence[Verdict], config: MonitorConfig, path: Path) -> None:
    """Precision-recall and ROC curves of the end-of-episode score, with the chosen operating point of the
    whole monitor (all rules) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score, actual = end_scores(verdicts, config)
    thresholds = np.unique(np.concatenate([score, [-np.inf, np.inf]]))[::-1]
    precision, recall, fpr = [], [], []
    for t in thresholds:
        predicted = score >= t
        tp, fp = int(np.sum(predicted & actual)), int(np.sum(predicted & ~actual))
        fn = int(np.sum(~predicted & actual))
        precision.append(tp / (tp + fp) if tp + fp else 1.0)
        recall.append(tp / (tp + fn) if tp + fn else 0.0)
        fpr.append(fp / max(int(np.sum(~actual)), 1))
    figures = detection_figures(verdicts)
    figure, (pr, roc) = plt.subplots(1, 2, figsize=(9.0, 3.8), dpi=100)
    pr.plot(recall, precision, "-", color="tab:blue", label="end-of-episode score alone")
    pr.plot([figures.recall], [figures.precision], "o", color="tab:red", label="chosen monitor (all rules)")
    pr.set_xlabel("recall (failures flagged)")
    pr.set_ylabel("precision")
    pr.set_xlim(0, 1.02)
    pr.set_ylim(0, 1.02)
    pr.legend(fontsize=7, loc="lower left")
    pr.set_title(f"precision-recall (F1 {figures.f1:.2f})", fontsize=9)
    roc.plot(fpr, recall, "-", color="tab:blue")
    roc.plot([figures.false_alarm_rate], [figures.recall], "o", color="tab:red")
    roc.plot([0, 1], [0, 1], ":", color="0.6")
    roc.set_xlabel("false-alarm rate (non-failures flagged)")
    roc.set_ylabel("recall")
    roc.set_title("ROC", fontsize=9)
    figure.suptitle("cross-validated verdicts", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def save_scores(episodes: Sequence[ScoredEpisode], path: Path) -> None:
    """The per-step scores and labels, to calibrate again without the model (``--scores``)."""
    meta = [{k: getattr(e, k) for k in ("episode_id", "instruction", "task", "data_source", "quality_label",
                                        "start_s", "end_s", "onset_s", "frames_offered", "frames_admitted")}
            for e in episodes]
    arrays = {f"steps_{i}": e.step_scores for i, e in enumerate(episodes)}
    np.savez_compressed(path, meta=json.dumps(meta), **arrays)


def load_scores(path: str | Path) -> list[ScoredEpisode]:
    """Episodes saved by ``save_scores``."""
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        return [ScoredEpisode(step_scores=data[f"steps_{i}"], **m) for i, m in enumerate(meta)]


def report(calibration: Calibration, episodes: Sequence[ScoredEpisode], settings: dict[str, Any],
           out_dir: Path) -> dict[str, Any]:
    """report.json, report.md and curves.png; returns the report."""
    cv = calibration.cross_validated
    record = {
        "settings": settings,
        "rule": RULE,
        "thresholds": {f.name: getattr(calibration.config, f.name) for f in fields(calibration.config)},
        "cross_validated": {**detection_figures(cv).as_dict(), "intervals": bootstrap_intervals(cv)},
        "fitted_on_all": detection_figures(calibration.fitted).as_dict(),
        "defaults_before": detection_figures(calibration.before).as_dict(),
        "per_task_cross_validated": {k: v.as_dict() for k, v in figures_by(cv, "task").items()},
        "episodes": len(episodes),
        "labels": {label: sum(e.quality_label == label for e in episodes)
                   for label in sorted({e.quality_label for e in episodes})},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(json_ready(record), indent=1) + "\n")
    lines = ["# robometer-calibrate report", "", f"Rule: {RULE}.", "",
             f"- {format_figures('before (thresholds given)', detection_figures(calibration.before))}",
             f"- {format_figures('after, cross-validated', detection_figures(cv), bootstrap_intervals(cv))}",
             f"- {format_figures('after, fitted on all (optimistic)', detection_figures(calibration.fitted))}",
             "", "| task | episodes | failures | P | R | F1 | false alarms |", "|---|---|---|---|---|---|---|"]
    for task, f in figures_by(cv, "task").items():
        cells = [f"{x:.2f}" if math.isfinite(x) else "-" for x in (f.precision, f.recall, f.f1, f.false_alarm_rate)]
        lines.append(f"| {task} | {f.episodes} | {f.failures} | " + " | ".join(cells) + " |")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    plot_curves(cv, calibration.config, out_dir / "curves.png")
    return record


# ---------------------------------------------------------------------------------------------- CLI
def labelled_trajectories(args: argparse.Namespace) -> Iterable[Any]:
    """The labelled episodes of --dataset (one split) or --bags (the node's end-of-episode labels)."""
    if args.dataset:
        from robometer_ros.training.data.store import open_split

        return iter(open_split(args.dataset, None if args.split == "all" else args.split))
    from robometer_ros.training.data.bags import BagImportOptions, ImportReport, read_bags

    report_ = ImportReport()
    options = BagImportOptions(image_topic=args.image_topic, unknown_label="skip", min_frames=2)

    def read() -> Iterable[Any]:
        yield from read_bags(args.bags, options, report_)
        print(report_.format(), file=sys.stderr)

    return read()


def main(argv: list[str] | None = None) -> int:
    """Console entry point of robometer-calibrate."""
    from robometer_ros.training.evaluation.evaluate import add_model_arguments

    parser = argparse.ArgumentParser(prog="robometer-calibrate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="labelled dataset directory (robometer-dataset)")
    source.add_argument("--bags", nargs="+", help="bags the node recorded (their ~/end_episode labels)")
    source.add_argument("--scores", help="scores.npz of an earlier run (no model is run)")
    parser.add_argument("--split", default="all", help="dataset split (default: every episode)")
    parser.add_argument("--image-topic", help="bags: camera topic (default: the bag's only image topic)")
    parser.add_argument("--params-file", action="append", default=[],
                        help="the node's parameter files (session settings; default config/reward_node.yaml)")
    parser.add_argument("--max-false-alarm", type=float, help="best F1 with at most this false-alarm rate")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="parameters YAML to write (the node loads it as it is)")
    args = parser.parse_args(argv)

    from robometer_ros.node_parameters import session_config_from_files

    out = Path(args.out)
    report_dir = out.with_name(f"{out.stem}_report")
    report_dir.mkdir(parents=True, exist_ok=True)
    try:
        if args.scores:
            episodes = load_scores(args.scores)
            session = session_config_from_files(args.params_file)
        else:
            from robometer_ros.training.evaluation.evaluate import open_predictor

            predictor = open_predictor(args.model, args.backend, args.device, args.tokenizer_dir,
                                       args.frame_size, args.batch_size)
            session = session_config_from_files(args.params_file, predictor.num_frames)
            episodes = score_episodes(predictor.engine, labelled_trajectories(args), session, progress_bar=True)
            save_scores(episodes, report_dir / "scores.npz")
    except (OSError, ValueError) as error:
        print(f"robometer-calibrate: {error}", file=sys.stderr)
        return 2
    if sum(e.failed for e in episodes) == 0 or all(e.failed for e in episodes):
        print(f"robometer-calibrate: {len(episodes)} labelled episodes, but calibration needs both failures and "
              "non-failures", file=sys.stderr)
        return 2
    objective = Objective(args.max_false_alarm)
    calibration = calibrate(episodes, objective, args.folds, args.seed, start=session.monitor, log=print)
    goal = "F1" if args.max_false_alarm is None else f"F1 at false-alarm rate <= {args.max_false_alarm}"
    settings = {"model": str(args.model), "source": args.dataset or args.bags or args.scores, "split": args.split,
                "params_files": [str(p) for p in args.params_file] or ["config/reward_node.yaml"],
                "frame_rate": session.frame_rate, "folds": args.folds, "seed": args.seed,
                "objective": goal}
    record = report(calibration, episodes, settings, report_dir)
    cv = detection_figures(calibration.cross_validated)
    intervals = record["cross_validated"]["intervals"]
    comments = [
        f"robometer-calibrate: monitor thresholds for {args.model}",
        f"on {len(episodes)} labelled episodes of {settings['source']} (split {args.split}), session settings of "
        f"{', '.join(settings['params_files'])} (frame_rate {session.frame_rate:g} Hz)",
        f"objective: {settings['objective']}; rule: {RULE}",
        f"{args.folds}-fold cross-validated: precision {cv.precision:.3f}, recall {cv.recall:.3f}, F1 {cv.f1:.3f} "
        f"[95% CI {intervals['f1'][0]:.2f}-{intervals['f1'][1]:.2f}], false-alarm rate {cv.false_alarm_rate:.3f}",
        f"(with the thresholds given before: {format_figures('F1', detection_figures(calibration.before))})",
        "load it after the node's own parameters: --params-file config/reward_node.yaml --params-file THIS",
        "or: ros2 launch robometer_ros reward.launch.py calibration:=THIS",
    ]
    out.write_text(parameters_yaml(calibration.config, comments))
    print(format_figures("before", detection_figures(calibration.before)))
    print(format_figures("after (cross-validated)", cv, bootstrap_intervals(calibration.cross_validated)))
    print(f"wrote {out} and {report_dir}/ (report.md, report.json, curves.png, scores.npz)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
