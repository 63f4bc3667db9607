"""`robometer-train CONFIG.yaml key=value ...`: the one training entry point (single process or torchrun).

    robometer-train training/tiny_cpu.yaml data.dataset=data/synth output_dir=runs/tiny
    python -m torch.distributed.run --nproc_per_node 4 --standalone -m robometer_ros.training.recipe.trainer \
        training/full_4b_fsdp.yaml model.init_checkpoint=... data.dataset=...

What one optimiser step does: every rank takes its own `batch_size x grad_accum_steps` preference pairs
from the seeded pair stream (`sampling.PairSampler`: pair i is a pure function of (seed, i), and rank r of
W takes indices ((step * accum + micro) * W + r) * batch_size + j), runs ONE forward pass per micro-batch
that feeds all three heads (preference prompt: A, split, B, pref token), and minimises
w_pref L_pref + w_prog L_prog(A) + w_succ L_succ(A) (`losses.robometer_loss`). AdamW, linear warm-up then
cosine decay, global-norm clipping, bf16 autocast on CUDA only.

Parallelism comes only from torchrun: DDP for models that fit a GPU, FSDP (per Qwen3-VL vision block and
text decoder layer) for the 4B. gloo on CPU, nccl on CUDA.

Output directory:
    config.yaml                      the resolved config
    train_log.jsonl                  one line per logged step (loss terms, lr, grad norm, throughput)
    tensorboard/                     the same scalars for TensorBoard
    checkpoints/step-0000020/        resumable state: training_state.pt (full model + optimizer),
                                     trainer_state.pt (step, scheduler, best score, world size, config),
                                     rng-rank{r}.pt per rank; written under a temporary name and renamed,
                                     so a crash never leaves a half checkpoint (multi-node: output_dir
                                     must be on a filesystem every node sees)
    final/, best/                    the model in the released Robometer layout (LoRA merged), which
                                     `robometer-export` and `robometer-eval` take
    eval/step-0000020/               periodic held-out evaluation (metrics.json, plots)

Resuming (checkpoint.resume=auto) restores all of the above state, so the run continues exactly as if it
had not stopped (the pair stream needs only the step: pairs are indexed, not drawn from a stateful RNG).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from robometer_ros.model.robometer import RobometerModel
from robometer_ros.training.data.store import TrajectoryCollection, open_split
from robometer_ros.training.recipe.collate import BatchCollator, RobometerBatchModule, model_inputs, targets
from robometer_ros.training.recipe.config import (
    ConfigError,
    TrainConfig,
    load_config,
    save_config,
    write_training_info,
)
from robometer_ros.training.recipe.losses import LossWeights, robometer_loss
from robometer_ros.training.recipe.sampling import PairSampler, SamplingConfig, Strategy

STATE_FILE = "training_state.pt"  # model + optimizer (full, unsharded)
PROGRESS_FILE = "trainer_state.pt"  # step, scheduler, best score, world size, config (small)
CHECKPOINT_PREFIX = "step-"


# ---------------------------------------------------------------------------------------------- processes
@dataclass
class DistEnv:
    """Where this process sits in a torchrun job (a single process is rank 0 of 1)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(config: TrainConfig) -> DistEnv:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = None
    if world_size > 1:
        backend = config.distributed.backend
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        if backend == "nccl" and not cuda:
            raise ConfigError("distributed.backend nccl needs CUDA; use gloo (or auto) on CPU")
        if not dist.is_initialized():
            # One hour: under DDP the other ranks wait in a collective while rank 0 runs a held-out eval.
            dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None,
                                    timeout=datetime.timedelta(minutes=60))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA for precision auto/bf16; None (fp32) on CPU."""
    precision = config.optim.precision
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError("optim.precision bf16 is for CUDA only (bf16 autocast); use fp32 or auto on CPU")
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs (dropout is the only randomness left in a step)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- data
def sampling_config(config: TrainConfig, catalog: Any = None) -> SamplingConfig:
    """The PairSampler settings of a run; ``catalog`` (``task_catalog``) gives the wordings pairs are shown in.

    Frames are NOT resized by the sampler: the collator resizes them with the preprocessor the engine
    uses (bicubic, robometer_ros.preprocess), so training sees exactly the pixels the robot will.
    """
    ratios = dict(zip([s.value for s in Strategy], config.data.strategy_ratio))
    return SamplingConfig(
        num_frames=config.data.num_frames,
        strategy_ratios=ratios,
        success_cutoffs=dict(config.data.success_cutoffs),
        use_known_progress=config.data.use_known_progress,
        instruction_phrasings=catalog.training_wordings() if catalog else {},
    )


def task_catalog(config: TrainConfig) -> Any:
    """The run's task catalog (``data.phrasings``), or None."""
    if not config.data.phrasings:
        return None
    from robometer_ros.training.data.metaworld import TaskCatalog

    return TaskCatalog.load(config.data.phrasings)


class StepBatchSampler(Sampler[list[int]]):
    """Yields the pair indices of this rank's micro-batches, from `start_step` to `max_steps`.

    Micro-batch m of step s on rank r holds indices ((s * accum + m) * world + r) * batch + j, j < batch:
    every index is used once across ranks, and resuming at step s continues the same stream.
    """

    def __init__(
        self, start_step: int, max_steps: int, batch_size: int, accum: int, rank: int, world_size: int
    ) -> None:
        self.start_step, self.max_steps = start_step, max_steps
        self.batch_size, self.accum = batch_size, accum
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.max_steps):
            for micro in range(self.accum):
                first = ((step * self.accum + micro) * self.world_size + self.rank) * self.batch_size
                yield list(range(first, first + self.batch_size))


# ---------------------------------------------------------------------------------------------- model
def build_model(config: TrainConfig, train_collection: TrajectoryCollection) -> tuple[RobometerModel, Any]:
    """The model to train (float32) and its tokenizer, from a checkpoint or a preset (the same on every rank)."""
    if config.model.init_checkpoint:
        from robometer_ros.model.checkpoint import load_checkpoint

        model, info = load_checkpoint(
            config.model.init_checkpoint, tokenizer_dir=config.model.tokenizer_dir, dtype=torch.float32
        )
        # The saved model (and the bundle exported from it) scores as many frames as it was trained on.
        model.config.num_frames = config.data.num_frames
        return model, info.tokenizer
    if config.model.base_model:
        return init_from_base_model(config.model.base_model, config.data.num_frames, config.seed)
    preset = config.model.preset
    if preset in ("tiny", "mid"):
        from robometer_ros.model.tiny import SAMPLE_INSTRUCTIONS, config_for_tokenizer, tiny_tokenizer

        instructions = sorted({m.instruction for m in train_collection.metas} | set(SAMPLE_INSTRUCTIONS))
        tokenizer = tiny_tokenizer(instructions)
        model_config = config_for_tokenizer(tokenizer, preset, num_frames=config.data.num_frames)
        torch.manual_seed(config.seed)
        return RobometerModel(model_config), tokenizer
    raise ConfigError(
        f"model.preset {preset} has no random-init recipe here: set model.init_checkpoint to a Robometer "
        "checkpoint directory (e.g. the released Robometer-4B; with model.tokenizer_dir = the base "
        "Qwen3-VL-4B-Instruct directory if it ships no tokenizer.json) or model.base_model to a Qwen3-VL "
        "directory to start from the backbone with new heads"
    )


def init_from_base_model(directory: str | os.PathLike[str], num_frames: int, seed: int) -> tuple[RobometerModel, Any]:
    """Robometer on a Hugging Face Qwen3-VL directory (config.json, safetensors, tokenizer.json), as the
    official training starts: the five Robometer tokens are appended to the tokenizer, the embedding is cut
    to the new vocabulary (as resize_token_embeddings does: the first len(tokenizer) rows are kept), the
    backbone weights are copied and the three heads are new (seeded). lm_head is not used."""
    from safetensors import safe_open
    from transformers.initialization import no_init_weights

    from robometer_ros.model.checkpoint import CheckpointError, weight_files
    from robometer_ros.model.config import RobometerConfig
    from robometer_ros.model.tokenizer import backbone_token_ids, load_tokenizer

    root = Path(directory)
    if not (root / "config.json").is_file():
        raise CheckpointError(f"model.base_model {root}: no config.json (expected a Qwen3-VL model directory)")
    tokenizer = load_tokenizer(root, add_robometer=True)
    backbone = json.loads((root / "config.json").read_text())
    for key in ("architectures", "auto_map", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        backbone.pop(key, None)
    for sub in ("text_config", "vision_config"):
        if not isinstance(backbone.get(sub), dict):
            raise CheckpointError(f"model.base_model {root}: config.json has no {sub} (not a Qwen3-VL config)")
        for key in ("dtype", "torch_dtype"):
            backbone[sub].pop(key, None)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    config = RobometerConfig(backbone=backbone, num_frames=num_frames, base_model_id=root.name)
    config = config.with_token_ids(backbone_token_ids(tokenizer), vocab_size=vocab)
    with no_init_weights():
        model = RobometerModel(config)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for file in weight_files(root):
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                    if key not in params:
                        continue  # lm_head, or anything else the reward model does not have
                    tensor = handle.get_tensor(key)
                    if key.endswith("embed_tokens.weight"):
                        if tensor.shape[0] < vocab:
                            raise CheckpointError(f"{file}: {key} has {tensor.shape[0]} rows, the tokenizer {vocab}")
                        tensor = tensor[:vocab]
                    if tuple(tensor.shape) != tuple(params[key].shape):
                        raise CheckpointError(f"{file}: {key} is {list(tensor.shape)}, the model needs "
                                              f"{list(params[key].shape)}")
                    params[key].copy_(tensor.to(params[key].dtype))
                    loaded.add(key)
    missing = sorted(k for k in params if k not in loaded and not k.split(".")[0].endswith("_head"))
    if missing:
        raise CheckpointError(f"model.base_model {root} lacks {len(missing)} backbone weights: {missing[:8]}")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for head in (model.progress_head, model.success_head, model.preference_head):
            for module in head.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    finally:
        torch.random.set_rng_state(generator_state)
    return model.float(), tokenizer


def prepare_trainable(model: RobometerModel, config: TrainConfig) -> None:
    """Freeze the vision encoder, add LoRA adapters and gradient checkpointing, as configured."""
    if config.lora.enabled:
        from peft import LoraConfig, inject_adapter_in_model

        names = "|".join(config.lora.target_modules)
        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            # Only the language model's projections: the vision blocks have their own q/k/v naming, but
            # a full-name regex keeps a future vision module called e.g. "up_proj" out too.
            target_modules=rf".*\.language_model\.layers\.\d+\..*\.({names})",
            bias="none",
        )
        inject_adapter_in_model(lora, model)
        for name, param in model.named_parameters():
            param.requires_grad = "lora_" in name or name.split(".")[0].endswith("_head")
    elif config.model.freeze_vision:
        for param in model.model.visual.parameters():
            param.requires_grad = False
    if config.model.gradient_checkpointing:
        # Non-reentrant checkpointing of every vision block and decoder layer (it needs no input that
        # requires grad, so a frozen embedding under LoRA is fine). transformers 5 renamed the method.
        backbone = model.model
        if hasattr(backbone, "activation_checkpointing_enable"):
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lora_merged_state_dict(state: dict[str, torch.Tensor], config: TrainConfig) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict with the adapters merged into the base weights, in the plain key layout:
    W = W0 + (alpha / r) * B @ A for every adapted Linear; lora_* keys dropped, `.base_layer.` removed."""
    scale = config.lora.alpha / config.lora.r
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, leaf = key.split(".base_layer.")
            if leaf == "weight" and f"{prefix}.lora_A.default.weight" in state:
                lora_a = state[f"{prefix}.lora_A.default.weight"].float()
                lora_b = state[f"{prefix}.lora_B.default.weight"].float()
                value = (value.float() + scale * (lora_b @ lora_a)).to(value.dtype)
            key = f"{prefix}.{leaf}"
        merged[key] = value
    return merged


def use_fsdp(config: TrainConfig, env: DistEnv) -> bool:
    strategy = config.distributed.strategy
    if strategy == "auto":
        strategy = "fsdp" if config.model.preset == "qwen3vl_4b" else "ddp"
    return strategy == "fsdp" and env.distributed


def wrap_model(
    module: RobometerBatchModule, config: TrainConfig, env: DistEnv, amp_dtype: torch.dtype | None
) -> nn.Module:
    """DDP, FSDP (per vision block and text decoder layer, then the root) or nothing (one process)."""
    if not env.distributed:
        return module
    if use_fsdp(config, env):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer, Qwen3VLVisionBlock

        policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else None
        kwargs = {"mp_policy": policy} if policy is not None else {}
        for sub in module.modules():
            if isinstance(sub, (Qwen3VLVisionBlock, Qwen3VLTextDecoderLayer)):
                fully_shard(sub, **kwargs)
        fully_shard(module, **kwargs)
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.device.index] if env.device.type == "cuda" else None
    # find_unused_parameters: a head whose loss weight is 0 gets no gradient, and DDP must not wait for
    # it (frozen parameters are ignored by DDP anyway).
    weights = (config.loss.preference_weight, config.loss.progress_weight, config.loss.success_weight)
    unused = any(w == 0 for w in weights)
    # broadcast_buffers off: the only buffers are rotary constants, identical on every rank.
    return DistributedDataParallel(
        module, device_ids=device_ids, find_unused_parameters=unused, broadcast_buffers=False
    )


def unwrap(model: nn.Module) -> RobometerBatchModule:
    """The RobometerBatchModule inside a DDP wrapper (FSDP2 shards in place, no wrapper)."""
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; biases and norm weights (1-D) get no weight decay."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("no trainable parameters (check model.freeze_vision / lora settings)")
    groups = [
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=config.optim.lr, betas=tuple(config.optim.betas), eps=config.optim.eps
    )


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base lr at optimiser step `step` (0-based): linear warm-up to 1 over
    ceil(warmup_ratio * max_steps) steps (the first step already gets 1/(warmup+1)), then cosine to
    min_lr_ratio at max_steps."""
    total = config.optim.max_steps
    warmup = math.ceil(config.optim.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = config.optim.min_lr_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- checkpoints
def training_data_info(collection: TrajectoryCollection, catalog: Any = None) -> dict[str, Any]:
    """What a model was trained on, for training.json and the bundle manifest: the stored instructions of the
    training split and, with the run's task catalog (``task_catalog``), its split (tasks and wordings, file digest)."""
    info: dict[str, Any] = {"train_instructions": sorted({m.instruction for m in collection.metas})}
    if catalog is not None:
        info["task_catalog"] = catalog.summary()
    return info


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict(), optimizer.state_dict()


def _load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_file: Path, fsdp: bool, is_main: bool
) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # Only rank 0 reads the (for the 4B: tens of GB) file; the shards are broadcast from it. Model and
        # optimizer are set in two calls: the combined set_state_dict lets the other ranks return early
        # from the model broadcast when they pass empty dicts (torch 2.13), which deadlocks rank 0.
        full = torch.load(state_file, map_location="cpu", weights_only=False) if is_main else {
            "model": {}, "optimizer": {}}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full["model"], options=options)
        set_optimizer_state_dict(model, optimizer, full["optimizer"], options=options)
        return
    full = torch.load(state_file, map_location="cpu", weights_only=False)
    unwrap(model).load_state_dict(full["model"])
    optimizer.load_state_dict(full["optimizer"])


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can touch, for exact resume."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete resumable checkpoints of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()
             and (p / PROGRESS_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from, per checkpoint.resume (auto / none / a path)."""
    choice = config.checkpoint.resume
    if choice == "none":
        return None
    if choice == "auto":
        found = list_checkpoints(config.output_dir)
        return found[-1] if found else None
    path = Path(choice)
    missing = [name for name in (STATE_FILE, PROGRESS_FILE) if not (path / name).is_file()]
    if missing:
        raise ConfigError(f"checkpoint.resume {choice}: no {' / '.join(missing)} there")
    return path


class _PlainWeights:
    """What save_checkpoint needs of a model (``config``, ``state_dict()``) for a state dict in the plain
    RobometerModel layout, checked against that layout on the meta device (no second full-size model)."""

    def __init__(self, config: Any, state: dict[str, torch.Tensor]) -> None:
        with torch.device("meta"):
            reference = RobometerModel(config)
        expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
            wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
            raise RuntimeError(f"model state does not match RobometerModel: missing {missing[:5]}, "
                               f"unexpected {extra[:5]}, mis-shaped {wrong[:5]}")
        self.config = config
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One training run: build with a TrainConfig, call `train()`; see the module docstring."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.env = init_distributed(config)
        self.amp_dtype = autocast_dtype(config, self.env.device)
        self.output_dir = Path(config.output_dir)
        seed_everything(config.seed)

        self.train_collection = open_split(config.data.dataset, config.data.train_split)
        self.eval_collection = (
            open_split(config.data.dataset, config.data.eval_split) if config.data.eval_split else None
        )
        catalog = task_catalog(config)  # read once: the sampler's wordings and the training record
        self.sampler = PairSampler(self.train_collection, sampling_config(config, catalog), seed=config.seed)
        self.training_data = training_data_info(self.train_collection, catalog)

        robometer, self.tokenizer = build_model(config, self.train_collection)
        prepare_trainable(robometer, config)
        self.robometer = robometer
        self.fsdp = use_fsdp(config, self.env)
        robometer.to(self.env.device)
        if self.amp_dtype is not None and not self.fsdp:
            # Frozen weights need no fp32 master copy: keep them in bf16 (halves their memory).
            for param in robometer.parameters():
                if not param.requires_grad:
                    param.data = param.data.to(self.amp_dtype)
        robometer.train()
        self.model = wrap_model(RobometerBatchModule(robometer), config, self.env, self.amp_dtype)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config)
        )
        self.collator = BatchCollator(
            self.tokenizer, robometer.config.spatial_merge_size, config.data.frame_size
        )
        self.loss_weights = LossWeights(
            progress=config.loss.progress_weight,
            success=config.loss.success_weight,
            preference=config.loss.preference_weight,
        )
        self.step = 0
        self.best_score: float | None = None
        self._writer: Any = None
        self._log_file: Any = None

    # ---------------------------------------------------------------- state
    def save_state(self) -> Path | None:
        """Write a resumable checkpoint for the current step (collective: every rank calls it)."""
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.step:07d}"
        temporary = root / f".{final.name}.tmp"
        if self.env.is_main:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        self.env.barrier()
        model_state, optim_state = _full_state(self.model, self.optimizer, self.fsdp)
        torch.save(rng_state(), temporary / f"rng-rank{self.env.rank}.pt")
        if self.env.is_main:
            torch.save({"model": model_state, "optimizer": optim_state}, temporary / STATE_FILE)
            torch.save(
                {
                    "step": self.step,
                    "scheduler": self.scheduler.state_dict(),
                    "best_score": self.best_score,
                    "world_size": self.env.world_size,
                    "config": self.config.to_dict(),
                },
                temporary / PROGRESS_FILE,
            )
        self.env.barrier()
        if self.env.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temporary, final)
            for old in list_checkpoints(self.output_dir)[: -self.config.checkpoint.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.env.barrier()
        return final

    def load_state(self, path: Path) -> None:
        """Restore model, optimizer, scheduler, step, best score and this rank's RNGs from a checkpoint."""
        state = torch.load(path / PROGRESS_FILE, map_location="cpu", weights_only=False)
        if state["world_size"] != self.env.world_size:
            raise ConfigError(
                f"{path} was written by {state['world_size']} ranks; resume it with the same number "
                f"(this job has {self.env.world_size}) or set checkpoint.resume=none"
            )
        _load_full_state(self.model, self.optimizer, path / STATE_FILE, self.fsdp, self.env.is_main)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.best_score = state.get("best_score")
        rng_file = path / f"rng-rank{self.env.rank}.pt"
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))

    def save_model(self, directory: Path) -> None:
        """The model (LoRA merged) + tokenizer in the released Robometer layout (collective)."""
        from robometer_ros.model import checkpoint as checkpoint_io

        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            state = unwrap(self.model).state_dict()
        if self.env.is_main:
            state = {k.removeprefix("robometer."): v.detach().cpu() for k, v in state.items()}
            if self.config.lora.enabled:
                state = lora_merged_state_dict(state, self.config)
            weights = _PlainWeights(self.robometer.config, state)
            temporary = directory.with_name(f".{directory.name}.tmp")
            shutil.rmtree(temporary, ignore_errors=True)
            # bf16 training saves bf16 weights, as the released checkpoint; fp32 training saves fp32.
            checkpoint_io.save_checkpoint(weights, self.tokenizer, temporary, dtype=self.amp_dtype or torch.float32)
            write_training_info(temporary, self.config, self.step, self.training_data)
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(temporary, directory)
        self.env.barrier()

    # ---------------------------------------------------------------- logging
    def _say(self, text: str) -> None:
        """A message on rank 0's stderr (kept clear of the progress bar)."""
        if not self.env.is_main:
            return
        try:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)
        except ImportError:
            print(text, file=sys.stderr)

    def describe(self) -> str:
        """One paragraph about the run: ranks, device, precision, parameters, pairs per step, strategies."""
        total = sum(p.numel() for p in self.robometer.parameters())
        trainable = sum(p.numel() for p in self.robometer.parameters() if p.requires_grad)
        optim = self.config.optim
        mode = ("FSDP" if self.fsdp else "DDP") if self.env.distributed else "single process"
        strategies = ", ".join(f"{k} {v:.2f}" for k, v in self.sampler.strategy_probabilities.items())
        return (
            f"robometer-train: {mode}, {self.env.world_size} rank(s) on {self.env.device} "
            f"({self.env.backend or 'no backend'}), precision {self.amp_dtype or torch.float32}; "
            f"{total / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M trainable"
            f"{' (LoRA)' if self.config.lora.enabled else ''}; "
            f"{optim.batch_size * optim.grad_accum_steps * self.env.world_size} pairs per step for "
            f"{optim.max_steps} steps; {len(self.train_collection)} training episodes "
            f"({len(self.eval_collection) if self.eval_collection is not None else 0} held out); "
            f"pair strategies: {strategies}"
        )

    def _log(self, scalars: dict[str, float]) -> None:
        if not self.env.is_main:
            return
        if self._log_file is None:
            self._log_file = open(self.output_dir / "train_log.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._log_file.write(json.dumps({"step": self.step, **scalars}) + "\n")
        self._log_file.flush()
        if self.config.log.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.output_dir / "tensorboard"))
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, self.step)

    def _truncate_log(self) -> None:
        """Drop log lines written after the resumed step by the interrupted run (they are redone)."""
        path = self.output_dir / "train_log.jsonl"
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
        temporary = path.with_suffix(".tmp")
        temporary.write_text("".join(f"{line}\n" for line in kept))
        os.replace(temporary, path)

    def close(self) -> None:
        """Flush logs (the process group is left to the caller)."""
        if self._writer is not None:
            self._writer.close()
        if self._log_file is not None:
            self._log_file.close()

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, Any] | None:
        """Held-out evaluation with robometer-eval's metrics (collective under FSDP; rank 0 under DDP)."""
        if self.eval_collection is None:
            return None
        from robometer_ros.training.recipe.validation import EvalOptions, TorchPredictor, evaluate_collection

        module = unwrap(self.model)
        metrics = None
        if self.fsdp or self.env.is_main:
            was_training = module.training
            module.eval()
            # FSDP: every rank runs the sharded root module (its forward gathers the shards). DDP: rank 0
            # runs the inner module alone; the DDP wrapper's forward could start collectives the other
            # ranks never join.
            runner = self.model if self.fsdp else module
            predictor = TorchPredictor(runner, self.collator, self.env.device, self.amp_dtype,
                                       num_frames=self.config.data.num_frames)
            out_dir = self.output_dir / "eval" / f"{CHECKPOINT_PREFIX}{self.step:07d}"
            options = EvalOptions(max_trajectories=self.config.eval.max_trajectories,
                                  max_pairs=self.config.eval.max_pairs,
                                  success_cutoffs=dict(self.config.data.success_cutoffs),
                                  seed=self.config.seed)
            metrics = evaluate_collection(
                predictor, self.eval_collection, options, out_dir=out_dir if self.env.is_main else None,
                settings={"step": self.step, "split": self.config.data.eval_split},
            )
            module.train(was_training)
        if self.env.distributed:
            holder = [metrics]
            dist.broadcast_object_list(holder, src=0)
            metrics = holder[0]
        return metrics

    def _after_eval(self, metrics: dict[str, Any] | None) -> None:
        if metrics is None:
            return
        overall = metrics.get("overall", {})
        scalars = {f"eval/{k}": float(v) for k, v in overall.items()
                   if isinstance(v, (int, float)) and v == v}  # drop NaN (metric undefined on this split)
        self._log(scalars)
        if self.env.is_main:
            from robometer_ros.training.recipe.validation import format_table

            self._say(f"held-out evaluation at step {self.step}:\n{format_table(metrics)}")
        key = self.config.eval.best_metric
        score = overall.get(key)
        if key not in overall:
            self._say(f"eval.best_metric {key!r} is not a metric (known: {', '.join(sorted(overall))}); "
                      "no best model is chosen")
        if score is None or score != score:
            return
        if self.best_score is None or score > self.best_score:
            self.best_score = float(score)
            self.save_model(self.output_dir / "best")

    # ---------------------------------------------------------------- loop
    def _loader(self) -> DataLoader:
        optim = self.config.optim
        batches = StepBatchSampler(self.step, optim.max_steps, optim.batch_size, optim.grad_accum_steps,
                                   self.env.rank, self.env.world_size)
        workers = self.config.data.num_workers
        return DataLoader(
            self.sampler,
            batch_sampler=batches,
            collate_fn=self.collator,
            num_workers=workers,
            pin_memory=self.env.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=2 if workers else None,
            # Its own generator: creating a loader iterator draws a seed, which must not come from the
            # global RNG (that would shift the dropout masks of a resumed run against an uninterrupted one).
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> Any:
        device = self.env.device
        autocast = (torch.autocast(device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            out = self.model(**model_inputs(batch, device))
        frames = out["progress_logits"].shape[1] // 2
        return robometer_loss(
            targets(batch, device),
            out["progress_logits"][:, :frames],
            out["success_logits"][:, :frames],
            out["preference_logits"],
            self.loss_weights,
        )

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient all-reduce / reduce-scatter on all but the last accumulation micro-batch."""
        if hasattr(self.model, "no_sync"):  # DDP
            return contextlib.nullcontext() if sync else self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        if not self.env.distributed:
            return values
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.env.device)
        dist.all_reduce(tensor)
        return {k: float(v) / self.env.world_size for k, v in zip(keys, tensor.tolist())}

    def train(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Run to optim.max_steps (resuming first, as configured); returns the last logged scalars.

        `stop_at_step` ends the run early, after writing a resumable checkpoint, as if the job had been
        stopped there (the schedule still spans optim.max_steps); the final model is not written then.
        """
        config, env = self.config, self.env
        if env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")
        env.barrier()
        self._say(self.describe())
        resume = resolve_resume(config)
        if resume is not None:
            self.load_state(resume)
            self._say(f"resumed from {resume} at step {self.step}")
            if env.is_main:
                self._truncate_log()
        accum = config.optim.grad_accum_steps
        pairs_per_step = config.optim.batch_size * accum * env.world_size
        progress = None
        if env.is_main and config.log.progress_bar:
            from tqdm import tqdm

            progress = tqdm(total=config.optim.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        last: dict[str, Any] = {}
        batches = iter(self._loader())
        tick = time.perf_counter()
        while self.step < config.optim.max_steps:
            sums = {"loss": 0.0, "loss_progress": 0.0, "loss_success": 0.0, "loss_preference": 0.0}
            for micro in range(accum):
                batch = next(batches)
                with self._gradient_sync(micro == accum - 1):
                    terms = self._forward_loss(batch)
                    (terms.total / accum).backward()
                floats = terms.as_floats()
                sums["loss"] += floats["total"] / accum
                sums["loss_progress"] += floats["progress"] / accum
                sums["loss_success"] += floats["success"] / accum
                sums["loss_preference"] += floats["preference"] / accum
            max_norm = config.optim.max_grad_norm if config.optim.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
                grad_norm = grad_norm.full_tensor()
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{sums['loss']:.4f}", lr=f"{lr:.2e}")
            if self.step % config.log.every == 0 or self.step == config.optim.max_steps:
                elapsed = time.perf_counter() - tick
                steps = config.log.every if self.step % config.log.every == 0 else self.step % config.log.every
                scalars = self._mean_over_ranks(sums)
                scalars.update({
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "pairs_per_second": pairs_per_step * steps / max(elapsed, 1e-9),
                })
                self._log({f"train/{k}": v for k, v in scalars.items()})
                last = scalars
                tick = time.perf_counter()
            if config.eval.every and self.step % config.eval.every == 0 and self.step < config.optim.max_steps:
                self._after_eval(self.evaluate())
                tick = time.perf_counter()  # throughput counts training only
            if config.checkpoint.every and self.step % config.checkpoint.every == 0:
                self.save_state()
            if stop_at_step is not None and self.step >= stop_at_step:
                break
        if progress is not None:
            progress.close()
        if self.step < config.optim.max_steps:
            if not config.checkpoint.every or self.step % config.checkpoint.every != 0:
                self.save_state()
            self.close()
            return last
        if config.checkpoint.every == 0 or self.step % config.checkpoint.every != 0:
            self.save_state()
        self.save_model(self.output_dir / "final")
        self._after_eval(self.evaluate())
        if env.is_main and not (self.output_dir / "best").exists():
            # No held-out metric chose a best model: the final one is the best we know.
            shutil.copytree(self.output_dir / "final", self.output_dir / "best")
        env.barrier()
        self.close()
        return last


def main(argv: list[str] | None = None) -> int:
    """Console entry point: robometer-train CONFIG.yaml [key=value ...]."""
    parser = argparse.ArgumentParser(
        prog="robometer-train",
        description="Train or fine-tune Robometer (single process, or under torchrun for DDP / FSDP).",
        epilog="Overrides use dotted keys, e.g. optim.lr=1e-4 data.dataset=data/my_robot lora.enabled=true",
    )
    parser.add_argument("config", help="YAML recipe (see training/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    from robometer_ros.model.checkpoint import CheckpointError
    from robometer_ros.training.data.store import DatasetError
    from robometer_ros.training.recipe.sampling import SamplingError

    try:
        config = load_config(args.config, args.overrides)
        trainer = Trainer(config)
        trainer.train()
    except (CheckpointError, ConfigError, DatasetError, SamplingError, FileNotFoundError) as error:
        print(f"robometer-train: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


__all__ = [
    "DistEnv",
    "StepBatchSampler",
    "Trainer",
    "build_optimizer",
    "lora_merged_state_dict",
    "lr_factor",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
