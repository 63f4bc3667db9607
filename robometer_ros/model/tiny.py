"""Factories for small Robometer models built offline: tests, CI, benchmarks.

``tiny_tokenizer`` trains a byte-level BPE on a handful of robot instructions plus the prompt text, with the
real Qwen3-VL special tokens and the five Robometer tokens after it; ``tiny_model`` / ``mid_model`` build a
random-weight RobometerModel whose vocabulary and vision token ids come from that tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer

from robometer_ros.model.config import RobometerConfig, mid_config, tiny_config
from robometer_ros.model.prompt import (
    PREFERENCE_PROGRESS_SUFFIX,
    PREFERENCE_PROMPT,
    PREFERENCE_QUESTION,
    PROGRESS_PROMPT,
    TRAJECTORY_A_TEXT,
    TRAJECTORY_B_TEXT,
)
from robometer_ros.model.robometer import RobometerModel
from robometer_ros.model.tokenizer import backbone_token_ids, build_tokenizer

SAMPLE_INSTRUCTIONS: tuple[str, ...] = (
    "pick up the red block and put it in the bowl",
    "open the top drawer",
    "close the microwave door",
    "push the green button",
    "stack the blue cup on the yellow cup",
    "fold the towel in half",
)


def prompt_texts(instructions: Iterable[str] = SAMPLE_INSTRUCTIONS) -> list[str]:
    """Training texts for a small tokenizer: the prompts filled with each instruction."""
    texts = []
    for task in instructions:
        texts.append(PROGRESS_PROMPT.format(task=task))
        texts.append(PREFERENCE_PROMPT.format(task=task) + PREFERENCE_PROGRESS_SUFFIX)
    texts += [TRAJECTORY_A_TEXT, TRAJECTORY_B_TEXT, PREFERENCE_QUESTION, "Picture 1: Picture 12: "]
    return texts


def tiny_tokenizer(
    instructions: Iterable[str] = SAMPLE_INSTRUCTIONS, vocab_size: int = 400, add_robometer: bool = True
) -> Tokenizer:
    """A small BPE tokenizer (about vocab_size + 31 tokens) covering the prompt vocabulary."""
    return build_tokenizer(prompt_texts(instructions), vocab_size=vocab_size, add_robometer=add_robometer)


def config_for_tokenizer(tokenizer: Tokenizer, size: str = "tiny", num_frames: int = 8) -> RobometerConfig:
    """A tiny or mid RobometerConfig whose vocabulary and vision token ids match the tokenizer."""
    factories = {"tiny": tiny_config, "mid": mid_config}
    if size not in factories:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(factories)}")
    return factories[size](tokenizer.get_vocab_size(with_added_tokens=True), backbone_token_ids(tokenizer), num_frames)


def tiny_model(
    tokenizer: Tokenizer | None = None, seed: int = 0, size: str = "tiny"
) -> tuple[RobometerModel, Tokenizer]:
    """A random-weight Robometer (eval mode, float32) and its tokenizer; same seed, same weights."""
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = config_for_tokenizer(tokenizer, size)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = RobometerModel(config).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    return model, tokenizer


def mid_model(tokenizer: Tokenizer | None = None, seed: int = 0) -> tuple[RobometerModel, Tokenizer]:
    """The mid-size benchmark model (4 layers x 512) with random weights."""
    return tiny_model(tokenizer, seed, size="mid")
