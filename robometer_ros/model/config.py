"""RobometerConfig: sizes of the Qwen3-VL backbone, the heads and the prompt of one Robometer model.

Pure Python (no torch import): the bundle manifest and the host-side prompt code read it too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

# The five tokens the official code adds to the Qwen3-VL tokenizer, in this order; the embedding rows of a
# released checkpoint are tied to the ids they received (len(qwen tokenizer) + 0..4), so the order is part of
# the checkpoint contract. Only split, pref and prog are used by the prompts.
ROBOMETER_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|split_token|>",
    "<|reward_token|>",
    "<|pref_token|>",
    "<|sim_token|>",
    "<|prog_token|>",
)
SPLIT_TOKEN, REWARD_TOKEN, PREF_TOKEN, SIM_TOKEN, PROG_TOKEN = ROBOMETER_SPECIAL_TOKENS

# Qwen3-VL's own added tokens, in the order of the public tokenizer (ids 151643.. in the real vocabulary).
QWEN3VL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

DEFAULT_BASE_MODEL_ID = "Qwen/Qwen3-VL-4B-Instruct"

# Token-id fields of the backbone config that must name tokens of the tokenizer in use.
BACKBONE_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclass
class RobometerConfig:
    """Everything needed to build a RobometerModel, without weights.

    Attributes:
        backbone: Qwen3-VL config as a plain dict (the ``Qwen3VLConfig.to_dict()`` shape: ``text_config``,
            ``vision_config``, the four vision token ids). This is what a released checkpoint's config.json
            holds (plus ``architectures``).
        num_bins: progress bins of the C51-style progress head (bin centres linspace(0, 1, num_bins)).
        num_frames: frames per trajectory the model was trained with (the subsample size at inference).
        head_dropout: dropout inside the three heads (inactive in eval mode).
        special_tokens: the Robometer added tokens in checkpoint order.
        base_model_id: the Hugging Face id of the backbone the tokenizer comes from.
    """

    backbone: dict[str, Any]
    num_bins: int = 10
    num_frames: int = 8
    head_dropout: float = 0.1
    special_tokens: tuple[str, ...] = ROBOMETER_SPECIAL_TOKENS
    base_model_id: str = DEFAULT_BASE_MODEL_ID
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.special_tokens = tuple(self.special_tokens)
        if self.num_bins < 2:
            raise ValueError(f"num_bins must be at least 2, got {self.num_bins}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {self.num_frames}")
        for key in ("text_config", "vision_config"):
            if not isinstance(self.backbone.get(key), dict):
                raise ValueError(f"backbone config has no '{key}' dict")
        missing = [t for t in (SPLIT_TOKEN, PREF_TOKEN, PROG_TOKEN) if t not in self.special_tokens]
        if missing:
            raise ValueError(f"special_tokens lacks {missing}")

    # ----- derived sizes -----
    @property
    def text_config(self) -> dict[str, Any]:
        return self.backbone["text_config"]

    @property
    def vision_config(self) -> dict[str, Any]:
        return self.backbone["vision_config"]

    @property
    def hidden_size(self) -> int:
        """Width of the language model's hidden state (the heads' input)."""
        return int(self.text_config["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.text_config["vocab_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.get("patch_size", 16))

    @property
    def temporal_patch_size(self) -> int:
        return int(self.vision_config.get("temporal_patch_size", 2))

    @property
    def spatial_merge_size(self) -> int:
        return int(self.vision_config.get("spatial_merge_size", 2))

    @property
    def in_channels(self) -> int:
        return int(self.vision_config.get("in_channels", 3))

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: channels * temporal patch * patch * patch (1536 for Qwen3-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def num_deepstack(self) -> int:
        return len(self.vision_config.get("deepstack_visual_indexes", []))

    # ----- serialisation -----
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``from_dict(to_dict())`` gives an equal config."""
        return {
            "backbone": copy.deepcopy(self.backbone),
            "num_bins": self.num_bins,
            "num_frames": self.num_frames,
            "head_dropout": self.head_dropout,
            "special_tokens": list(self.special_tokens),
            "base_model_id": self.base_model_id,
            "extra": copy.deepcopy(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RobometerConfig:
        """Inverse of ``to_dict``; unknown keys are an error so that a typo does not pass silently."""
        known = {
            "backbone",
            "num_bins",
            "num_frames",
            "head_dropout",
            "special_tokens",
            "base_model_id",
            "extra",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RobometerConfig fields: {unknown}")
        if "backbone" not in data:
            raise ValueError("RobometerConfig dict has no 'backbone'")
        return cls(**copy.deepcopy(data))

    def with_token_ids(self, token_ids: dict[str, int], vocab_size: int | None = None) -> RobometerConfig:
        """A copy whose backbone vision token ids (and optionally vocab size) come from a tokenizer."""
        new = RobometerConfig.from_dict(self.to_dict())
        for key in BACKBONE_TOKEN_FIELDS:
            if key in token_ids:
                new.backbone[key] = int(token_ids[key])
        if vocab_size is not None:
            new.backbone["text_config"]["vocab_size"] = int(vocab_size)
        return new


def _backbone(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    mrope_section: list[int],
    vision_depth: int,
    vision_hidden: int,
    vision_intermediate: int,
    vision_heads: int,
    num_position_embeddings: int,
    deepstack_visual_indexes: list[int],
    token_ids: dict[str, int],
    max_position_embeddings: int = 262144,
) -> dict[str, Any]:
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    if len(deepstack_visual_indexes) > num_layers or max(deepstack_visual_indexes, default=0) >= vision_depth:
        raise ValueError("deepstack_visual_indexes must be < vision depth and no more than the text layers")
    return {
        "model_type": "qwen3_vl",
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": list(mrope_section),
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": True,
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": vision_intermediate,
            "num_heads": vision_heads,
            "in_channels": 3,
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": hidden_size,
            "num_position_embeddings": num_position_embeddings,
            "deepstack_visual_indexes": list(deepstack_visual_indexes),
            "hidden_act": "gelu_pytorch_tanh",
            "initializer_range": 0.02,
        },
        "tie_word_embeddings": True,
        **{k: int(v) for k, v in token_ids.items()},
    }


# Ids of the vision tokens in the real Qwen3-VL vocabulary (read from the tokenizer at run time; these only
# seed the 4B-shaped config used for meta-device / GPU benchmarks without a tokenizer).
_QWEN3VL_TOKEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


def tiny_config(vocab_size: int, token_ids: dict[str, int], num_frames: int = 8) -> RobometerConfig:
    """A few-hundred-thousand-parameter Robometer for tests (2 text layers x 64, 2 vision blocks x 64).

    ``token_ids`` maps the backbone token fields (``image_token_id`` ...) to the tokenizer's ids.
    """
    backbone = _backbone(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mrope_section=[4, 2, 2],
        vision_depth=2,
        vision_hidden=64,
        vision_intermediate=128,
        vision_heads=4,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
        token_ids=token_ids,
        max_position_embeddings=8192,
    )
    return RobometerConfig(backbone=backbone, num_frames=num_frames, base_model_id="robometer_ros/tiny")


def mid_config(vocab_size: int, token_ids: dict[str, int], num_frames: int = 8) -> RobometerConfig:
    """A mid-size Robometer for CPU benchmarks: 4 text layers x 512, 4 vision blocks x 256, 2 deepstack."""
    backbone = _backbone(
        vocab_size=vocab_size,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        mrope_section=[12, 10, 10],
        vision_depth=4,
        vision_hidden=256,
        vision_intermediate=1024,
        vision_heads=4,
        num_position_embeddings=576,
        deepstack_visual_indexes=[0, 2],
        token_ids=token_ids,
        max_position_embeddings=32768,
    )
    return RobometerConfig(backbone=backbone, num_frames=num_frames, base_model_id="robometer_ros/mid")


def robometer_4b_config(vocab_size: int = 151674, token_ids: dict[str, int] | None = None) -> RobometerConfig:
    """The Robometer-4B shape (Qwen3-VL-4B-Instruct backbone, vocabulary resized to 151674 for the 5 tokens).

    For meta-device parameter counts and random-weight GPU benchmarks; a real checkpoint's config.json
    always takes precedence when loading.
    """
    backbone = _backbone(
        vocab_size=vocab_size,
        hidden_size=2560,
        intermediate_size=9728,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        mrope_section=[24, 20, 20],
        vision_depth=24,
        vision_hidden=1024,
        vision_intermediate=4096,
        vision_heads=16,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[5, 11, 17],
        token_ids=token_ids or _QWEN3VL_TOKEN_IDS,
    )
    return RobometerConfig(backbone=backbone, base_model_id=DEFAULT_BASE_MODEL_ID)
