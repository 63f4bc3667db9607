"""Checkpoint I/O in the released Robometer layout (load the official weights; save ours the same way).

Facts this relies on (checked 2026-11-25; read for facts only, nothing copied):

* Class and attributes. The official ``RBM`` (formerly ``RFM``; robometer/robometer, robometer/models/rbm.py
  @c7f38e2) is a ``PreTrainedModel`` whose backbone is ``self.model`` = ``Qwen3VLModel`` (setup_utils.py loads
  ``Qwen3VLModel.from_pretrained`` or takes ``.model`` of Unsloth's ForConditionalGeneration) and whose heads
  come from ``PredictionHeadsMixin`` (robometer/models/heads.py): ``progress_head``, ``preference_head``,
  ``success_head`` = Sequential(Linear(H, H/2), LayerNorm(H/2), GELU, Dropout(0.1), Linear(H/2, out)), so keys
  ``progress_head.0.weight``, ``.1.weight`` (LayerNorm), ``.4.weight``. RBM also always creates
  ``frame_pool_attn`` (Linear(H, 1, bias=False)), unused with per-frame prog tokens; the older RFM code line
  (aliang8/reward_fm) also had a ``similarity_head``. Both are accepted and ignored here.
* Key prefixes. Saved through the HF Trainer (``save_model`` -> ``save_pretrained`` of the RBM), so keys are
  ``model.visual.*``, ``model.language_model.*`` and the head keys. Qwen3VLModel's submodule names
  (visual.patch_embed.proj, visual.pos_embed, visual.blocks.N.{norm1,norm2,attn.qkv,attn.proj,mlp.linear_fc1/2},
  visual.merger.*, visual.deepstack_merger_list.N.*, language_model.embed_tokens / layers.N.* / norm) are the
  same in transformers 4.57 (the training pin, ``transformers>=4.57``) and 5.24 (installed here), and 5.24 has
  no key conversion registered for qwen3_vl. The official loader and LeRobot's port
  (huggingface/lerobot src/lerobot/rewards/robometer/_upstream_loader.py) also try ``model.model.*`` (a
  ForConditionalGeneration saved inside the wrapper); that prefix is accepted too (its ``lm_head`` ignored).
* config.json is the backbone's Qwen3VLConfig dict with ``architectures: ["RFM"]`` (released 4B) or
  ``["RBM"]``, no ``auto_map``; a 4.57 file writes rope as ``rope_scaling`` + ``rope_theta``, which 5.24's
  Qwen3VLConfig converts to ``rope_parameters``. The vocabulary is resized to len(tokenizer) = 151674.
* config.yaml (robometer/configs/config.yaml) holds ``model.base_model_id`` (Qwen/Qwen3-VL-4B-Instruct),
  ``model.progress_loss_type`` / ``progress_discrete_bins`` (often as ``${loss.*}`` references to the
  ``loss`` section: discrete, 10), ``data.max_frames`` (8 for the released model), ``data.use_multi_image``
  and ``model.use_per_frame_progress_token`` (true).
* Weights: ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
  (``weight_map``); the released 4B is two bf16 shards. No tokenizer files: the tokenizer is the base
  Qwen3-VL-4B-Instruct one plus the five added tokens, in order (robometer/utils/setup_utils.py
  ``_add_special_tokens_and_resize``).
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from robometer_ros.model.config import (
    BACKBONE_TOKEN_FIELDS,
    DEFAULT_BASE_MODEL_ID,
    ROBOMETER_SPECIAL_TOKENS,
    RobometerConfig,
)
from robometer_ros.model.robometer import RobometerModel
from robometer_ros.model.tokenizer import (
    TOKENIZER_FILE,
    backbone_token_ids,
    load_chat_template,
    load_tokenizer,
    save_tokenizer,
    token_id,
)

log = logging.getLogger(__name__)

CONFIG_JSON = "config.json"
CONFIG_YAML = "config.yaml"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
KNOWN_ARCHITECTURES = ("RBM", "RFM")
SAVED_ARCHITECTURE = "RBM"
# Present in official checkpoints, unused by the per-frame prog-token model: accepted and skipped.
IGNORED_KEY_PREFIXES = ("frame_pool_attn.", "similarity_head.", "model.lm_head.", "lm_head.")
DEFAULT_SHARD_SIZE = 5 * 1024**3
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names what is wrong."""


@dataclass
class TokenizerInfo:
    """The tokenizer a checkpoint is used with and the token ids read from it.

    Attributes:
        tokenizer: a ``tokenizers.Tokenizer`` with the Robometer tokens.
        source: the directory its tokenizer.json came from.
        token_ids: special token -> id (the five Robometer tokens and the vision tokens).
        chat_template: the chat template found next to it, if any.
    """

    tokenizer: Tokenizer
    source: Path
    token_ids: dict[str, int] = field(default_factory=dict)
    chat_template: str | None = None


# ---------------------------------------------------------------------------------------------- config
def _resolve_reference(value: Any, root: dict[str, Any]) -> Any:
    """Resolve an OmegaConf-style ``${section.key}`` string against the YAML root (one level is enough)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\$\{([\w.]+)\}", value.strip())
        if match:
            node: Any = root
            for part in match.group(1).split("."):
                if not isinstance(node, dict) or part not in node:
                    return None
                node = node[part]
            return node
    return value


def _yaml_field(root: dict[str, Any], *paths: str) -> Any:
    for path in paths:
        node: Any = root
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        node = _resolve_reference(node, root)
        if node is not None:
            return node
    return None


def read_checkpoint_config(checkpoint_dir: str | Path) -> RobometerConfig:
    """RobometerConfig from a checkpoint's config.json (backbone) and config.yaml (bins, frames, base model)."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config_json = directory / CONFIG_JSON
    if not config_json.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_JSON}")
    backbone = json.loads(config_json.read_text())
    architectures = backbone.get("architectures") or []
    if not any(arch in KNOWN_ARCHITECTURES for arch in architectures):
        raise CheckpointError(
            f"{config_json}: architectures {architectures} is not a Robometer checkpoint "
            f"(expected one of {list(KNOWN_ARCHITECTURES)})"
        )
    for key in ("text_config", "vision_config"):
        if not isinstance(backbone.get(key), dict):
            raise CheckpointError(f"{config_json} has no '{key}' (not a Qwen3-VL backbone config)")
    # dtype is the caller's choice (load_checkpoint(dtype=...)), not part of the architecture
    for key in ("architectures", "auto_map", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        backbone.pop(key, None)
    # A bf16 save also writes dtype into the sub-configs; transformers 5 builds those submodules in it, which
    # would silently override load_checkpoint(dtype=...) (bf16 weights in an fp32 export -> exporter failure).
    for sub in ("text_config", "vision_config"):
        for key in ("dtype", "torch_dtype"):
            backbone[sub].pop(key, None)

    settings: dict[str, Any] = {}
    config_yaml = directory / CONFIG_YAML
    if config_yaml.is_file():
        root = yaml.safe_load(config_yaml.read_text()) or {}
        if not isinstance(root, dict):
            raise CheckpointError(f"{config_yaml} is not a YAML mapping")
        loss_type = _yaml_field(root, "model.progress_loss_type", "loss.progress_loss_type")
        if loss_type is not None and str(loss_type).lower() != "discrete":
            raise CheckpointError(
                f"{config_yaml}: progress_loss_type {loss_type!r} is not supported (only the discrete, "
                "binned progress head of the released models)"
            )
        per_frame = _yaml_field(root, "model.use_per_frame_progress_token", "data.use_per_frame_progress_token")
        if per_frame is False:
            raise CheckpointError(
                f"{config_yaml}: use_per_frame_progress_token is false; only the per-frame prog-token model is "
                "supported"
            )
        bins = _yaml_field(root, "model.progress_discrete_bins", "loss.progress_discrete_bins")
        frames = _yaml_field(root, "data.max_frames")
        base = _yaml_field(root, "model.base_model_id")
        ours = root.get("robometer_ros") if isinstance(root.get("robometer_ros"), dict) else {}
        if bins is not None:
            settings["num_bins"] = int(bins)
        if frames is not None and int(frames) > 0:
            settings["num_frames"] = int(frames)
        if base:
            settings["base_model_id"] = str(base)
        if "head_dropout" in ours:
            settings["head_dropout"] = float(ours["head_dropout"])
        if "special_tokens" in ours:
            settings["special_tokens"] = tuple(ours["special_tokens"])
    else:
        log.warning("%s has no %s; using 10 bins, 8 frames, base %s", directory, CONFIG_YAML, DEFAULT_BASE_MODEL_ID)
    try:
        return RobometerConfig(backbone=backbone, **settings)
    except ValueError as err:
        raise CheckpointError(f"{directory}: {err}") from err


# ---------------------------------------------------------------------------------------------- weights
def weight_files(checkpoint_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: from the index when there is one, else the single file."""
    directory = Path(checkpoint_dir)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(f"{directory}: shards listed in {INDEX_FILE} are missing: {missing}")
        return [directory / n for n in names]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    shards = sorted(p for p in directory.iterdir() if SHARD_PATTERN.match(p.name))
    if shards:
        return shards
    raise CheckpointError(f"{directory} has no {SINGLE_FILE}, no {INDEX_FILE} and no model-*-of-*.safetensors shards")


def _canonical_key(key: str, has_canonical_backbone: bool) -> str:
    """Map accepted key variants onto our names (``model.model.X`` -> ``model.X`` when no ``model.visual``)."""
    if not has_canonical_backbone and key.startswith("model.model."):
        return key[len("model.") :]
    return key


def _checkpoint_index(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Our key -> (file, key in file, shape), read from the safetensors headers only (no tensor data)."""
    raw: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                raw[key] = (file, tuple(handle.get_slice(key).get_shape()))
    has_canonical = any(k.startswith(("model.visual.", "model.language_model.")) for k in raw)
    return {_canonical_key(k, has_canonical): (f, k, shape) for k, (f, shape) in raw.items()}


def _vocab_from_embedding(config: RobometerConfig, index: dict[str, tuple[Path, str, tuple[int, ...]]]) -> None:
    """The embedding's row count is the vocabulary size that counts (config.json may predate the resize)."""
    entry = index.get("model.language_model.embed_tokens.weight")
    if entry is not None and int(entry[2][0]) != config.vocab_size:
        log.info("vocab size %d from the embedding overrides config.json's %d", entry[2][0], config.vocab_size)
        config.backbone["text_config"]["vocab_size"] = int(entry[2][0])


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build_empty_model(config: RobometerConfig, dtype: torch.dtype, attn_implementation: str) -> RobometerModel:
    """A RobometerModel in ``dtype`` without spending time on random initialisation (weights come next)."""
    from transformers.initialization import no_init_weights

    with _default_dtype(dtype), no_init_weights():
        return RobometerModel(config, attn_implementation=attn_implementation)


def _check_keys(
    model_shapes: dict[str, tuple[int, ...]], checkpoint: dict[str, tuple[Path, str, tuple[int, ...]]], where: Path
) -> list[str]:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key; return the ignored keys."""
    ignored = sorted(k for k in checkpoint if k.startswith(IGNORED_KEY_PREFIXES) and k not in model_shapes)
    provided = set(checkpoint) - set(ignored)
    missing = sorted(set(model_shapes) - provided)
    unexpected = sorted(provided - set(model_shapes))
    mismatched = sorted(
        f"{k}: checkpoint {list(checkpoint[k][2])} vs model {list(model_shapes[k])}"
        for k in provided & set(model_shapes)
        if tuple(checkpoint[k][2]) != tuple(model_shapes[k])
    )
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {where} does not match the Robometer model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
        raise CheckpointError("\n".join(lines))
    return ignored


# ---------------------------------------------------------------------------------------------- tokenizer
def _load_tokenizer_info(checkpoint_dir: Path, tokenizer_dir: str | Path | None) -> TokenizerInfo:
    if (checkpoint_dir / TOKENIZER_FILE).is_file():
        source = checkpoint_dir
    elif tokenizer_dir is not None:
        source = Path(tokenizer_dir)
        if not (source / TOKENIZER_FILE).is_file():
            raise CheckpointError(f"tokenizer directory {source} has no {TOKENIZER_FILE}")
    else:
        raise CheckpointError(
            f"{checkpoint_dir} ships no {TOKENIZER_FILE}; pass tokenizer_dir= the base model directory "
            "(Qwen3-VL-4B-Instruct for the released Robometer-4B)"
        )
    tokenizer = load_tokenizer(source, add_robometer=True)
    ids = {tok: token_id(tokenizer, tok) for tok in ROBOMETER_SPECIAL_TOKENS}
    for tok in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"):
        ids[tok] = token_id(tokenizer, tok)
    try:
        template = load_chat_template(source)
    except FileNotFoundError:
        template = None
    return TokenizerInfo(tokenizer=tokenizer, source=source, token_ids=ids, chat_template=template)


def _check_tokenizer(config: RobometerConfig, info: TokenizerInfo, vocab_rows: int, where: Path) -> None:
    vision_ids = backbone_token_ids(info.tokenizer)
    wrong = [
        f"{field_name}: config {config.backbone.get(field_name)} vs tokenizer {vision_ids[field_name]}"
        for field_name in BACKBONE_TOKEN_FIELDS
        if field_name in config.backbone and int(config.backbone[field_name]) != vision_ids[field_name]
    ]
    too_big = {tok: tid for tok, tid in info.token_ids.items() if tid >= vocab_rows}
    if wrong or too_big:
        raise CheckpointError(
            f"tokenizer {info.source} does not fit checkpoint {where}: "
            + "; ".join(wrong + [f"{tok} id {tid} >= embedding rows {vocab_rows}" for tok, tid in too_big.items()])
        )


# ---------------------------------------------------------------------------------------------- public
def load_checkpoint(
    checkpoint_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[RobometerModel, TokenizerInfo]:
    """Load a Robometer checkpoint directory (released RBM/RFM layout or ours) into a RobometerModel.

    Args:
        checkpoint_dir: directory with config.json (architectures RBM or RFM), config.yaml and the
            safetensors weights (one file, or shards with model.safetensors.index.json).
        tokenizer_dir: where tokenizer.json comes from when the checkpoint ships none (the released one
            does not): the base Qwen3-VL-4B-Instruct directory. The five Robometer tokens are appended in
            checkpoint order when missing.
        dtype: dtype of the loaded model (bf16 weights are converted); None keeps the checkpoint's dtype.
        device: where the model ends up.
        attn_implementation: transformers attention backend ("sdpa" or "eager").

    Returns:
        The model in eval mode and the tokenizer info (token ids read from the tokenizer).

    Raises:
        CheckpointError: naming every missing, unexpected or mis-shaped key, or what else is wrong.
    """
    directory = Path(checkpoint_dir)
    config = read_checkpoint_config(directory)
    index = _checkpoint_index(weight_files(directory))
    _vocab_from_embedding(config, index)
    info = _load_tokenizer_info(directory, tokenizer_dir)
    _check_tokenizer(config, info, config.vocab_size, directory)

    return _load_weights(directory, config, dtype, device, attn_implementation, index), info


def _load_weights(
    directory: Path,
    config: RobometerConfig,
    dtype: torch.dtype | None,
    device: str | torch.device,
    attn_implementation: str,
    index: dict[str, tuple[Path, str, tuple[int, ...]]],
) -> RobometerModel:
    """Build the model for ``config`` and copy the checkpoint's tensors into it, one shard at a time."""
    if dtype is None:
        first_file, first_key, _ = next(iter(index.values()))
        with safe_open(str(first_file), framework="pt") as handle:
            dtype = handle.get_slice(first_key).get_dtype()
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(str(dtype), torch.float32)

    model = _build_empty_model(config, dtype, attn_implementation)
    params = dict(model.state_dict())
    ignored = _check_keys({k: tuple(v.shape) for k, v in params.items()}, index, directory)
    if ignored:
        log.info("ignored %d unused checkpoint keys: %s", len(ignored), ", ".join(ignored))

    by_file: dict[Path, list[tuple[str, str]]] = {}
    for key, (file, file_key, _) in index.items():
        if key in params:
            by_file.setdefault(file, []).append((key, file_key))
    with torch.no_grad():
        for file, keys in by_file.items():  # one shard at a time keeps peak memory near the model size
            with safe_open(str(file), framework="pt") as handle:
                for key, file_key in keys:
                    params[key].copy_(handle.get_tensor(file_key).to(params[key].dtype))
    model.to(device)
    model.eval()
    return model


def load_model(
    checkpoint_dir: str | Path,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> RobometerModel:
    """Only the model of a checkpoint (no tokenizer needed), for runtimes that get token ids elsewhere.

    Same checks on the weights as ``load_checkpoint``; the tokenizer/vocabulary cross-check is skipped, so
    use ``load_checkpoint`` when the tokenizer is at hand.
    """
    directory = Path(checkpoint_dir)
    config = read_checkpoint_config(directory)
    index = _checkpoint_index(weight_files(directory))
    _vocab_from_embedding(config, index)
    return _load_weights(directory, config, dtype, device, attn_implementation, index)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(size).upper())
    if not match:
        raise ValueError(f"cannot parse shard size {size!r} (use bytes or e.g. '5GB')")
    return int(float(match.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2)])


def checkpoint_yaml(config: RobometerConfig) -> dict[str, Any]:
    """The config.yaml content we write: the official fields we read back, plus our own section."""
    return {
        "model": {
            "base_model_id": config.base_model_id,
            "progress_loss_type": "discrete",
            "progress_discrete_bins": config.num_bins,
            "use_multi_image": True,
            "use_per_frame_progress_token": True,
        },
        "loss": {"progress_loss_type": "discrete", "progress_discrete_bins": config.num_bins},
        "data": {"max_frames": config.num_frames, "use_multi_image": True},
        "robometer_ros": {
            "format_version": FORMAT_VERSION,
            "head_dropout": config.head_dropout,
            "special_tokens": list(config.special_tokens),
        },
    }


def save_checkpoint(
    model: RobometerModel,
    tokenizer: Tokenizer | None,
    out_dir: str | Path,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    chat_template: str | None = None,
) -> list[Path]:
    """Write a checkpoint in the released layout (so training outputs load through ``load_checkpoint``).

    Writes config.json (the backbone config, ``architectures: ["RBM"]``), config.yaml, the weights as
    model.safetensors or, above ``shard_size`` bytes, model-0000i-of-0000n.safetensors + index, and (when a
    tokenizer is given) tokenizer.json, tokenizer_config.json and chat_template.jinja. Returns the files.
    """
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        raise TypeError(
            f"save_checkpoint(model, tokenizer, out_dir): tokenizer must be a tokenizers.Tokenizer or None, "
            f"got {type(tokenizer).__name__} (was the output directory passed as the second argument?)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(shard_size)
    if limit <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    for stale in [*out.glob("model-*-of-*.safetensors"), out / SINGLE_FILE, out / INDEX_FILE]:
        if stale.is_file():
            stale.unlink()

    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][key] = tensor
        used += nbytes

    written: list[Path] = []
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata=metadata)
        written.append(out / SINGLE_FILE)
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
            written.append(out / name)
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.append(out / INDEX_FILE)

    config = model.config
    backbone = dict(config.backbone)
    saved_dtype = dtype or next(iter(state.values())).dtype
    config_json = {"architectures": [SAVED_ARCHITECTURE], **backbone, "dtype": str(saved_dtype).replace("torch.", "")}
    (out / CONFIG_JSON).write_text(json.dumps(config_json, indent=2) + "\n")
    (out / CONFIG_YAML).write_text(yaml.safe_dump(checkpoint_yaml(config), sort_keys=False))
    written += [out / CONFIG_JSON, out / CONFIG_YAML]
    if tokenizer is not None:
        written += save_tokenizer(tokenizer, out, chat_template)
    return written
