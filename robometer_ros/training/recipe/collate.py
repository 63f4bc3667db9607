"""Samples -> padded model inputs, and the batched forward pass that reads the heads.

The token layout of every prompt comes from `robometer_ros.model.prompt.PromptBuilder` (the same code the
engine uses), so training, evaluation and the robot see the same tokens:

* preference sample (training): prompt, "This is Trajectory A. ", A's frames each followed by
  `<|prog_token|>`, `<|split_token|>`, "This is Trajectory B. ", B's frames + prog tokens, the question,
  `<|pref_token|>`;
* progress sample (evaluation / scoring): prompt, then each frame followed by `<|prog_token|>`.

A batch is right-padded (the model is causal, so padding after a prompt changes nothing before it) and
holds, for B prompts of at most L tokens and P prog tokens each:

    input_ids [B, L] int64, attention_mask [B, L] int64, mm_token_type_ids [B, L] int64,
    pixel_values [sum of patch rows, patch_dim] float32, image_grid_thw [num images, 3] int64,
    prog_positions [B, P] int64, pref_positions [B] int64 (preference batches only)

plus, for training batches, the targets of `robometer_ros.training.recipe.losses` (progress_a, progress_mask_a,
success_a, success_mask_a, preference_label). M-RoPE position ids are left to Qwen3VLModel, which computes
them from input_ids, mm_token_type_ids, image_grid_thw and the attention mask exactly as PromptBuilder does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from robometer_ros.model.prompt import PromptBuilder, PromptLayout
from robometer_ros.model.robometer import RobometerModel
from robometer_ros.model.tokenizer import PAD_TOKEN, token_id
from robometer_ros.preprocess import FramePreprocessor
from robometer_ros.training.recipe.sampling import PairSample, stack_pair_labels

GridTHW = tuple[int, int, int]
TARGET_KEYS = ("progress_a", "progress_mask_a", "success_a", "success_mask_a", "preference_label")
MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "pixel_values",
    "image_grid_thw",
    "prog_positions",
    "pref_positions",
)


class BatchCollator:
    """Builds padded model-input batches from frames and instructions (picklable: DataLoader workers use it).

    Args:
        tokenizer: the model's tokenizer (tokenizers.Tokenizer with the Robometer tokens).
        spatial_merge_size: the vision merger's spatial merge (2 for Qwen3-VL).
        frame_size: (height, width) every frame is resized to before patching, or None to keep each
            frame's own size (rounded by the preprocessor). Fixed sizes make batches cheaper and match the
            bundle's fixed frame size.
    """

    def __init__(
        self, tokenizer: Tokenizer, spatial_merge_size: int = 2, frame_size: Sequence[int] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.spatial_merge_size = int(spatial_merge_size)
        self.frame_size = None if frame_size is None else (int(frame_size[0]), int(frame_size[1]))
        self._builder: PromptBuilder | None = None
        self.pad_id = token_id(tokenizer, PAD_TOKEN)

    @property
    def builder(self) -> PromptBuilder:
        # Built lazily so that pickling the collator for worker processes does not carry its caches.
        if self._builder is None:
            self._builder = PromptBuilder(self.tokenizer, self.spatial_merge_size)
        return self._builder

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_builder"] = None
        return state

    # ------------------------------------------------------------------ frames
    def _patches(self, frames: np.ndarray) -> tuple[np.ndarray, list[GridTHW]]:
        """uint8 [F, H, W, 3] -> patch rows [sum N, patch_dim] float32 and one grid per frame."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        if self.frame_size is not None:
            preprocessor = FramePreprocessor(*self.frame_size)
        else:  # the stored size, rounded to multiples of 32 as the official pipeline does
            preprocessor = FramePreprocessor.for_camera(int(frames.shape[1]), int(frames.shape[2]))
        rows = [preprocessor(frame) for frame in frames]
        return np.concatenate(rows, axis=0), [preprocessor.grid_thw] * len(rows)

    # ------------------------------------------------------------------ batches
    def _pad(self, layouts: Sequence[PromptLayout], pixel_chunks: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        lengths = [layout.seq_len for layout in layouts]
        prog_counts = {len(layout.prog_positions) for layout in layouts}
        if len(prog_counts) != 1:
            raise ValueError(f"all prompts of a batch need the same number of frames, got {sorted(prog_counts)}")
        batch, length = len(layouts), max(lengths)
        input_ids = np.full((batch, length), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((batch, length), dtype=np.int64)
        types = np.zeros((batch, length), dtype=np.int64)
        for row, layout in enumerate(layouts):
            n = layout.seq_len
            input_ids[row, :n] = layout.input_ids[0]
            attention_mask[row, :n] = 1
            types[row, :n] = layout.mm_token_type_ids[0]
        grids = np.concatenate([layout.image_grid_thw for layout in layouts], axis=0)
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "mm_token_type_ids": torch.from_numpy(types),
            "pixel_values": torch.from_numpy(np.concatenate(pixel_chunks, axis=0).astype(np.float32, copy=False)),
            "image_grid_thw": torch.from_numpy(grids.astype(np.int64)),
            "prog_positions": torch.from_numpy(np.stack([layout.prog_positions for layout in layouts])),
        }
        if all(layout.pref_position is not None for layout in layouts):
            out["pref_positions"] = torch.from_numpy(
                np.concatenate([layout.pref_position for layout in layouts]).astype(np.int64)
            )
        return out

    def preference_batch(
        self, instructions: Sequence[str], frames_a: Sequence[np.ndarray], frames_b: Sequence[np.ndarray]
    ) -> dict[str, torch.Tensor]:
        """Model inputs of preference prompts (A, split, B, pref token) without targets."""
        if not (len(instructions) == len(frames_a) == len(frames_b)) or not instructions:
            raise ValueError("preference_batch needs the same, non-zero number of instructions, A and B sides")
        layouts, chunks = [], []
        for instruction, a, b in zip(instructions, frames_a, frames_b):
            pixels_a, grids_a = self._patches(a)
            pixels_b, grids_b = self._patches(b)
            layouts.append(self.builder.preference(instruction, grids_a, grids_b, predict_progress=True))
            chunks += [pixels_a, pixels_b]
        return self._pad(layouts, chunks)

    def progress_batch(
        self, instructions: Sequence[str], frames: Sequence[np.ndarray]
    ) -> dict[str, torch.Tensor]:
        """Model inputs of progress-only prompts (one trajectory each)."""
        if len(instructions) != len(frames) or not instructions:
            raise ValueError("progress_batch needs the same, non-zero number of instructions and trajectories")
        layouts, chunks = [], []
        for instruction, trajectory_frames in zip(instructions, frames):
            pixels, grids = self._patches(trajectory_frames)
            layouts.append(self.builder.progress(instruction, grids))
            chunks.append(pixels)
        return self._pad(layouts, chunks)

    def __call__(self, samples: Sequence[PairSample]) -> dict[str, torch.Tensor]:
        """Training batch: preference-prompt inputs plus the loss targets of side A and the labels."""
        if not samples:
            raise ValueError("cannot collate an empty batch")
        batch = self.preference_batch(
            [s.instruction for s in samples], [s.frames_a for s in samples], [s.frames_b for s in samples]
        )
        frames_per_side = batch["prog_positions"].shape[1] // 2
        for key, value in stack_pair_labels(samples).items():
            tensor = torch.from_numpy(value)
            if tensor.ndim == 2 and tensor.shape[1] != frames_per_side:
                raise ValueError(f"{key} has {tensor.shape[1]} frames but the prompt has {frames_per_side}")
            batch[key] = tensor
        return batch


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The model-input tensors of a batch, moved to `device` (targets are left out)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in MODEL_INPUT_KEYS}


def targets(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The loss targets of a training batch, moved to `device`."""
    return {k: batch[k].to(device, non_blocking=True) for k in TARGET_KEYS}


class RobometerBatchModule(nn.Module):
    """Batched forward of a RobometerModel over padded prompts: one backbone pass for the whole batch.

    This is the module DDP / FSDP wrap (so every parameter is reached through its forward), and what the
    PyTorch evaluation path runs. Heads are read at each row's prog-token positions (and pref token).
    """

    def __init__(self, robometer: RobometerModel) -> None:
        super().__init__()
        self.robometer = robometer

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mm_token_type_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        prog_positions: torch.Tensor,
        pref_positions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Returns progress_logits [B, P, bins], success_logits [B, P] and, with pref_positions,
        preference_logits [B] (P = prog tokens per prompt: 2F for preference prompts, A's first)."""
        backbone = self.robometer.model
        outputs = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
        )
        backbone.rope_deltas = None  # cached by Qwen3VLModel for generation; never reused here
        hidden = outputs.last_hidden_state
        width = hidden.shape[-1]
        frame_hidden = hidden.gather(1, prog_positions.unsqueeze(-1).expand(-1, -1, width))
        progress_logits, success_logits = self.robometer.apply_heads(frame_hidden)
        # The heads' squeeze gives views; FSDP2 warns about returning views (an in-place op on one would
        # skip its backward hook), so the outputs are returned as fresh tensors.
        out = {"progress_logits": progress_logits.float(), "success_logits": success_logits.float().clone()}
        if pref_positions is not None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            preference = self.robometer.apply_preference_head(hidden[rows, pref_positions])
            out["preference_logits"] = preference.float().clone()
        return out
