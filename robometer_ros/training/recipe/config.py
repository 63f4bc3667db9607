"""Training configuration: typed dataclasses, YAML recipes and `key=value` command-line overrides.

A recipe is a YAML file whose top-level keys are the sections below (model, data, optim, lora, loss,
distributed, checkpoint, eval, log) plus `output_dir` and `seed`. Command-line overrides use dotted paths:

    robometer-train training/tiny_cpu.yaml optim.lr=3e-4 optim.max_steps=50 output_dir=runs/x

Values are parsed as YAML scalars/lists (`lora.target_modules=[q_proj,v_proj]`, `eval.split=null`). Every key
is checked against the dataclasses: an unknown key, a value of the wrong type or a value out of range raises
`ConfigError` naming the dotted key. Torch-free so that recipes can be checked anywhere.

Also training.json (`write_training_info` / `read_training_info`): what a model saved by the trainer records of
its training (frame size, frames, success cutoffs, training data, the whole config), which robometer-eval,
robometer-score and robometer-export read for their defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the offending key."""


@dataclass
class ModelConfig:
    """Which model to train.

    Attributes:
        preset: model factory used when `init_checkpoint` and `base_model` are null: "tiny" (CPU tests),
            "mid" (CPU demo); "qwen3vl_4b" (Robometer-4B) starts from `init_checkpoint` or `base_model`;
            FSDP is its default.
        init_checkpoint: a checkpoint directory in the released Robometer layout (ours or the official
            Robometer-4B) to start from; overrides `preset` (required for qwen3vl_4b).
        tokenizer_dir: where tokenizer.json comes from when init_checkpoint ships none (the released
            Robometer-4B does not): the base Qwen3-VL-4B-Instruct directory.
        base_model: a Hugging Face Qwen3-VL directory (e.g. Qwen3-VL-4B-Instruct: config.json, safetensors,
            tokenizer.json) to start from with new heads, as the official training does.
        freeze_vision: keep the vision encoder (incl. merger) frozen (official default: true).
        gradient_checkpointing: recompute activations in the backward pass (saves memory, ~30% slower).
    """

    preset: str = "tiny"
    init_checkpoint: str | None = None
    tokenizer_dir: str | None = None
    base_model: str | None = None
    freeze_vision: bool = True
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    """Where pairs come from.

    Attributes:
        dataset: a directory written by the data store (`robometer-dataset`).
        train_split / eval_split: split names inside the dataset; eval_split null = no held-out eval.
        num_frames: frames per trajectory in a sample (official: 8; first and last kept).
        strategy_ratio: weights of the pair strategies, in sampling.py's order
            (different expertise, different task, rewind, reverse).
        frame_size: [height, width] every frame is resized to (training, evaluation and the exported
            bundle should agree); null keeps the stored size.
        success_cutoffs: per data source, the fraction of an episode at which the task counts as done
            (progress reaches 1 there; default 1.0).
        use_known_progress: use stored per-frame progress (e.g. from a simulator) as the target instead of
            absolute_first_frame.
        num_workers: DataLoader worker processes per rank (0 = sample in the main process).
        phrasings: a task catalog YAML (the format of robometer_ros/training/data/metaworld_tasks.yaml); each
            pair shows one of its task's `train` wordings instead of the stored instruction. null = stored
            instructions only.
    """

    dataset: str = ""
    train_split: str = "train"
    eval_split: str | None = "val"
    num_frames: int = 8
    strategy_ratio: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    frame_size: list[int] | None = None
    success_cutoffs: dict[str, float] = field(default_factory=dict)
    use_known_progress: bool = False
    num_workers: int = 0
    phrasings: str | None = None


@dataclass
class OptimConfig:
    """AdamW with a cosine schedule after linear warm-up (official: lr 2e-5, wd 0.01, warmup 0.1, clip 10).

    Attributes:
        batch_size: pairs per rank per optimiser step (before accumulation).
        grad_accum_steps: micro-batches accumulated per optimiser step.
        max_steps: optimiser steps in the whole run.
        min_lr_ratio: the cosine decays to lr * min_lr_ratio.
        max_grad_norm: clip the global gradient norm to this (0 = no clipping).
        precision: "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" (CUDA only) or "fp32".
    """

    lr: float = 2e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    batch_size: int = 16
    grad_accum_steps: int = 1
    max_steps: int = 1000
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 10.0
    precision: str = "auto"


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the language model; the heads stay fully trainable.

    The official fine-tune recipe: r 32, alpha 64, dropout 0.05 on q/k/v/o/gate/up/down.
    """

    enabled: bool = False
    r: int = 32
    alpha: int = 64
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class LossConfig:
    """Weights of the three terms of the dual objective (official: 1, 1, 1)."""

    preference_weight: float = 1.0
    progress_weight: float = 1.0
    success_weight: float = 1.0


@dataclass
class DistributedConfig:
    """How ranks cooperate when started by torchrun (ignored in a single process).

    Attributes:
        strategy: "auto" (FSDP for the 4B preset, DDP otherwise), "ddp" or "fsdp".
        backend: "auto" (nccl on CUDA, gloo on CPU), "nccl" or "gloo".
    """

    strategy: str = "auto"
    backend: str = "auto"


@dataclass
class CheckpointConfig:
    """Training-state checkpoints (exact resume) and model exports.

    Attributes:
        every: write a resumable training state every N steps (0 = only at the end).
        keep_last: resumable states kept on disk (older ones are deleted).
        resume: "auto" (latest state in output_dir if any), "none", or a path to a state directory.
    """

    every: int = 500
    keep_last: int = 2
    resume: str = "auto"


@dataclass
class EvalConfig:
    """Periodic held-out evaluation (robometer-eval's metrics) during training.

    Attributes:
        every: evaluate every N steps (0 = never during training; the end of training still evaluates when
            data.eval_split is set).
        max_trajectories: cap on evaluated trajectories (0 = all) to keep the hook cheap.
        max_pairs: preference pairs of each kind (different quality, different task) per evaluation.
        best_metric: key of metrics.json's "overall" section used to keep the best model (higher is better).
    """

    every: int = 250
    max_trajectories: int = 200
    max_pairs: int = 100
    best_metric: str = "kendall_tau"


@dataclass
class LogConfig:
    """Console / TensorBoard logging.

    Attributes:
        every: scalars are logged every N steps.
        tensorboard: write TensorBoard event files under output_dir/tensorboard.
        progress_bar: tqdm bar on rank 0.
    """

    every: int = 10
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class TrainConfig:
    """One training run (see the module docstring for the YAML / override syntax)."""

    output_dir: str = "runs/robometer"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        """Check values that types alone cannot; raises ConfigError naming the key."""
        _check(self.model.preset in MODEL_PRESETS, "model.preset", f"must be one of {MODEL_PRESETS}")
        _check(self.model.preset != "qwen3vl_4b" or bool(self.model.init_checkpoint or self.model.base_model),
               "model.init_checkpoint", "is required with model.preset qwen3vl_4b (the Robometer-4B checkpoint "
               "directory), unless model.base_model names a Qwen3-VL-4B directory to start from")
        _check(not (self.model.init_checkpoint and self.model.base_model), "model.base_model",
               "and model.init_checkpoint are alternatives: set one")
        _check(bool(self.data.dataset), "data.dataset", "is required (a dataset directory)")
        _check(self.data.num_frames >= 2, "data.num_frames", "must be >= 2")
        _check(len(self.data.strategy_ratio) == 4, "data.strategy_ratio", "needs 4 weights")
        _check(all(w >= 0 for w in self.data.strategy_ratio) and sum(self.data.strategy_ratio) > 0,
               "data.strategy_ratio", "weights must be >= 0 with a positive sum")
        _check(self.data.num_workers >= 0, "data.num_workers", "must be >= 0")
        fs = self.data.frame_size
        _check(fs is None or (len(fs) == 2 and all(v >= 32 and v % 32 == 0 for v in fs)), "data.frame_size",
               "must be null or [height, width], multiples of 32 (patch 16 x merge 2)")
        _check(all(0 < c <= 1 for c in self.data.success_cutoffs.values()), "data.success_cutoffs",
               "values must be in (0, 1]")
        o = self.optim
        _check(o.lr > 0, "optim.lr", "must be > 0")
        _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
               "must be two numbers in [0, 1)")
        _check(o.eps > 0, "optim.eps", "must be > 0")
        _check(o.batch_size >= 1, "optim.batch_size", "must be >= 1")
        _check(o.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")
        _check(o.max_steps >= 1, "optim.max_steps", "must be >= 1")
        _check(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
        _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        _check(o.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)")
        _check(o.precision in ("auto", "bf16", "fp32"), "optim.precision", "must be auto, bf16 or fp32")
        lo = self.lora
        _check(lo.r >= 1, "lora.r", "must be >= 1")
        _check(lo.alpha > 0, "lora.alpha", "must be > 0")
        _check(0 <= lo.dropout < 1, "lora.dropout", "must be in [0, 1)")
        _check(not lo.enabled or len(lo.target_modules) > 0, "lora.target_modules", "must not be empty")
        for name in ("preference_weight", "progress_weight", "success_weight"):
            _check(getattr(self.loss, name) >= 0, f"loss.{name}", "must be >= 0")
        _check(self.distributed.strategy in ("auto", "ddp", "fsdp"), "distributed.strategy",
               "must be auto, ddp or fsdp")
        _check(self.distributed.backend in ("auto", "nccl", "gloo"), "distributed.backend",
               "must be auto, nccl or gloo")
        _check(self.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
        _check(self.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _check(self.eval.every >= 0, "eval.every", "must be >= 0")
        _check(self.eval.max_trajectories >= 0, "eval.max_trajectories", "must be >= 0")
        _check(self.eval.max_pairs >= 0, "eval.max_pairs", "must be >= 0")
        _check(self.log.every >= 1, "log.every", "must be >= 1")
        _check(bool(self.output_dir), "output_dir", "must not be empty")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what gets saved next to checkpoints as config.yaml)."""
        return dataclasses.asdict(self)


MODEL_PRESETS = ("tiny", "mid", "qwen3vl_4b")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {_coerce(k, key_tp, f"{key}"): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it obviously is.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass `cls` from a nested dict, checking every key and type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key {dotted}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (["a", "b"], parsed value); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` overrides to a nested dict in place (creating sections as needed)."""
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def config_from_dict(tree: dict[str, Any]) -> TrainConfig:
    """Build and validate a TrainConfig from a nested dict."""
    config = _build(TrainConfig, tree, "")
    config.validate()
    return config


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe (or start from the defaults when `path` is None), apply overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            kind = type(loaded).__name__
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {kind}")
        tree = loaded or {}
    apply_overrides(tree, list(overrides or []))
    return config_from_dict(tree)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back to an equal TrainConfig)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------- training.json
TRAINING_INFO_FILE = "training.json"


def write_training_info(directory: Path, config: TrainConfig, step: int,
                        data: dict[str, Any] | None = None) -> None:
    """training.json next to a saved model: how it was trained (frame size and frames, which eval/score
    reuse by default, the step, the training data (``training_data_info``) and the whole config)."""
    info = {
        "step": step,
        "frame_size": config.data.frame_size,
        "num_frames": config.data.num_frames,
        "success_cutoffs": dict(config.data.success_cutoffs),
        "training_data": data or {},
        "config": config.to_dict(),
    }
    (directory / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read_training_info(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """training.json of a model saved by the trainer, or {} (e.g. the released checkpoint)."""
    path = Path(directory) / TRAINING_INFO_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())
