"""Host-side prompt and token layout of Robometer (numpy + ``tokenizers`` only: no torch, no transformers).

The official code builds one user turn through the Qwen3-VL chat template with ``add_vision_id=True`` and
``add_generation_prompt=False``; the template adds no system message when the conversation has none, so the
rendered text is::

    <|im_start|>user\\n{prompt}Picture 1: <|vision_start|><|image_pad|><|vision_end|><|prog_token|>
    Picture 2: ... <|prog_token|><|im_end|>\\n

(one line; broken here for width)

and the processor then repeats each ``<|image_pad|>`` t*h*w/merge^2 times (the frame's visual tokens).
``PromptBuilder`` renders that text, tokenizes it with the bundle's tokenizer.json, expands the image pads
and computes everything the language part needs: input_ids, the M-RoPE position ids (the same as
``Qwen3VLModel.get_rope_index`` for images), the visual gather index / mask, the prog-token positions and
the pref-token position. Token ids are always read from the tokenizer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from robometer_ros.model.config import PREF_TOKEN, PROG_TOKEN, SPLIT_TOKEN

GridTHW = tuple[int, int, int]

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Prompt strings of the official collator (robometer/data/collators/rbm_heads.py), verbatim.
PROGRESS_PROMPT = (
    "The task for the robot is '{task}'. Given the trajectory video, predict the task progress at each "
    "frame, how far along the robot is towards completing the task, a float between 0 and 1, where 0 is the "
    "starting state and 1 is when the task is completed. If the robot is not performing the same task, "
    "predict 0 progress."
)
PREFERENCE_PROMPT = (
    "Given these two trajectories for the task '{task}', evaluate which one makes more progress towards the "
    "task. Return A for the first trajectory and B for the second trajectory."
)
PREFERENCE_PROGRESS_SUFFIX = (
    " Also predict the task progress at each frame of the first trajectory, how far along the robot is "
    "towards completing the task, a float between 0 and 1, where 0 is the starting state and 1 is when the "
    "task is completed. If the robot is not performing the same task, predict 0 progress."
)
TRAJECTORY_A_TEXT = "This is Trajectory A. "
TRAJECTORY_B_TEXT = "This is Trajectory B. "
PREFERENCE_QUESTION = "Now predict the preference between the two trajectories."

# mm_token_type_ids values of transformers' Qwen3-VL processor.
TEXT_TYPE, IMAGE_TYPE = 0, 1


def progress_prompt_text(instruction: str) -> str:
    """The text item that opens a progress sample."""
    return PROGRESS_PROMPT.format(task=instruction)


def preference_prompt_text(instruction: str, predict_progress: bool = True) -> str:
    """The text item that opens a preference sample (with the progress request when training predicts it)."""
    text = PREFERENCE_PROMPT.format(task=instruction)
    return text + PREFERENCE_PROGRESS_SUFFIX if predict_progress else text


def progress_conversation(instruction: str, num_frames: int) -> list[dict]:
    """The official progress-sample conversation (images as placeholders), for rendering with a template."""
    content: list[dict] = [{"type": "text", "text": progress_prompt_text(instruction)}]
    for _ in range(num_frames):
        content += [{"type": "image"}, {"type": "text", "text": PROG_TOKEN}]
    return [{"role": "user", "content": content}]


def preference_conversation(
    instruction: str, num_frames_a: int, num_frames_b: int, predict_progress: bool = True
) -> list[dict]:
    """The official preference-sample conversation: A, split token, B, question, pref token."""
    content: list[dict] = [
        {"type": "text", "text": preference_prompt_text(instruction, predict_progress)},
        {"type": "text", "text": TRAJECTORY_A_TEXT},
    ]
    for _ in range(num_frames_a):
        content += [{"type": "image"}, {"type": "text", "text": PROG_TOKEN}]
    content += [{"type": "text", "text": SPLIT_TOKEN}, {"type": "text", "text": TRAJECTORY_B_TEXT}]
    for _ in range(num_frames_b):
        content += [{"type": "image"}, {"type": "text", "text": PROG_TOKEN}]
    content += [{"type": "text", "text": PREFERENCE_QUESTION}, {"type": "text", "text": PREF_TOKEN}]
    return [{"role": "user", "content": content}]


def render_user_turn(content: Sequence[dict]) -> str:
    """What the Qwen3-VL chat template renders for one user turn (add_vision_id=True, no generation prompt).

    Only the parts the Robometer prompts use (text and image items; no system message, no tools).
    """
    parts = [IM_START, "user\n"]
    image_count = 0
    for item in content:
        if item.get("type") == "image" or "image" in item or "image_url" in item:
            image_count += 1
            parts.append(f"Picture {image_count}: {VISION_START}{IMAGE_PAD}{VISION_END}")
        elif "text" in item:
            parts.append(item["text"])
        else:
            raise ValueError(f"unsupported content item {item!r}")
    parts.append(IM_END + "\n")
    return "".join(parts)


@dataclass
class PromptLayout:
    """Token layout of one prompt (batch 1), numpy arrays ready for the language part.

    Attributes:
        input_ids: [1, L] int64, image pads expanded.
        position_ids: [3, 1, L] int64 M-RoPE (temporal, height, width) ids.
        mm_token_type_ids: [1, L] int64, 1 at visual positions, 0 elsewhere.
        visual_index: [1, L] int64, row of the concatenated visual features at each visual position, else 0.
        visual_mask: [1, L] bool, True at visual positions.
        prog_positions: [F] int64 positions of the ``<|prog_token|>`` tokens (all frames, A then B).
        pref_position: [1] int64 position of the ``<|pref_token|>`` (preference prompts), else None.
        visual_spans: per image, [start, end) of its visual tokens in the sequence.
        image_grid_thw: [num_images, 3] int64 patch grids in prompt order.
        rope_delta: max position + 1 - L (what get_rope_index reports; kept for cache-based decoding).
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    mm_token_type_ids: np.ndarray
    visual_index: np.ndarray
    visual_mask: np.ndarray
    prog_positions: np.ndarray
    pref_position: np.ndarray | None
    visual_spans: list[tuple[int, int]]
    image_grid_thw: np.ndarray
    rope_delta: int

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_visual_tokens(self) -> int:
        return int(self.visual_mask.sum())


@dataclass
class PrefixSplit:
    """A progress layout cut right after the first frame's ``<|prog_token|>`` (prefix reuse across steps).

    Within an episode every step's prompt starts with the same chat text, instruction and first frame (the
    subsampling always keeps frame 0), so the tokens up to and including the first prog token are the
    same at every step: that is the *prefix*; the *suffix* is the other frames, their prog tokens and the
    end of the prompt. The arrays are slices of the full layout, so the suffix's M-RoPE ids continue the
    prefix's exactly.

    Attributes:
        prefix_input_ids, prefix_position_ids, prefix_visual_index, prefix_visual_mask: the first P
            positions ([1, P], [3, 1, P]); the visual index rows are the first frame's (0..T-1).
        suffix_input_ids, suffix_position_ids, suffix_visual_mask: positions P.. of the layout.
        suffix_visual_index: [1, S] row of the *suffix frames'* concatenated features (full index - T), 0
            at text positions.
        suffix_prog_positions: [F-1] the other frames' prog-token positions, relative to the suffix start.
        prefix_visual_tokens: T, visual tokens of the first frame.
    """

    prefix_input_ids: np.ndarray
    prefix_position_ids: np.ndarray
    prefix_visual_index: np.ndarray
    prefix_visual_mask: np.ndarray
    suffix_input_ids: np.ndarray
    suffix_position_ids: np.ndarray
    suffix_visual_index: np.ndarray
    suffix_visual_mask: np.ndarray
    suffix_prog_positions: np.ndarray
    prefix_visual_tokens: int

    @property
    def prefix_length(self) -> int:
        return int(self.prefix_input_ids.shape[1])

    @property
    def suffix_length(self) -> int:
        return int(self.suffix_input_ids.shape[1])


def split_after_first_frame(layout: PromptLayout) -> PrefixSplit:
    """Cut a progress layout after its first ``<|prog_token|>`` (see ``PrefixSplit``).

    Raises ValueError for a layout where that cut is not a frame boundary (a preference prompt, or a
    first prog token that does not directly follow the first image).
    """
    if layout.pref_position is not None:
        raise ValueError("prefix reuse is for progress prompts; a preference prompt has no shared per-episode prefix")
    if len(layout.prog_positions) == 0 or not layout.visual_spans:
        raise ValueError("a progress layout needs at least one frame and one <|prog_token|>")
    cut = int(layout.prog_positions[0]) + 1
    first_start, first_end = layout.visual_spans[0]
    if not first_end <= cut - 1 or (len(layout.visual_spans) > 1 and layout.visual_spans[1][0] < cut):
        raise ValueError(f"the first <|prog_token|> (position {cut - 1}) does not close the first frame's span "
                         f"{layout.visual_spans[0]}")
    tokens = first_end - first_start
    mask = layout.visual_mask[:, cut:]
    index = np.where(mask, layout.visual_index[:, cut:] - tokens, 0).astype(np.int64)
    return PrefixSplit(
        prefix_input_ids=np.ascontiguousarray(layout.input_ids[:, :cut]),
        prefix_position_ids=np.ascontiguousarray(layout.position_ids[:, :, :cut]),
        prefix_visual_index=np.ascontiguousarray(layout.visual_index[:, :cut]),
        prefix_visual_mask=np.ascontiguousarray(layout.visual_mask[:, :cut]),
        suffix_input_ids=np.ascontiguousarray(layout.input_ids[:, cut:]),
        suffix_position_ids=np.ascontiguousarray(layout.position_ids[:, :, cut:]),
        suffix_visual_index=np.ascontiguousarray(index),
        suffix_visual_mask=np.ascontiguousarray(mask),
        suffix_prog_positions=(layout.prog_positions[1:] - cut).astype(np.int64),
        prefix_visual_tokens=int(tokens),
    )


def mrope_position_ids(
    mm_token_type_ids: np.ndarray, image_grid_thw: np.ndarray, spatial_merge_size: int = 2
) -> tuple[np.ndarray, int]:
    """M-RoPE ids [3, 1, L] for one unpadded sequence of text and image runs (Qwen3VLModel.get_rope_index).

    A text run continues all three axes from the current position; an image run of grid (t, h, w) gets
    (start + t_idx, start + h_idx, start + w_idx) over its merged (t, h/m, w/m) grid, and the next run starts
    at start + max(h, w)/m.
    """
    types = np.asarray(mm_token_type_ids).reshape(-1)
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    length = types.shape[0]
    positions = np.zeros((3, length), dtype=np.int64)
    boundaries = np.flatnonzero(np.diff(types)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [length]])
    current = 0
    image = 0
    for start, end in zip(starts.tolist(), ends.tolist()):
        if types[start] == TEXT_TYPE:
            positions[:, start:end] = np.arange(end - start, dtype=np.int64) + current
            current += end - start
            continue
        if image >= len(grids):
            raise ValueError(f"more image runs in the sequence than grids ({len(grids)})")
        t, h, w = (int(v) for v in grids[image])
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        if t * gh * gw != end - start:
            raise ValueError(f"image run {image} has {end - start} tokens but grid {(t, h, w)} gives {t * gh * gw}")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        positions[0, start:end] = tt.reshape(-1) + current
        positions[1, start:end] = hh.reshape(-1) + current
        positions[2, start:end] = ww.reshape(-1) + current
        current += max(h, w) // spatial_merge_size
        image += 1
    if image != len(grids):
        raise ValueError(f"{len(grids)} grids given but the sequence has {image} image runs")
    rope_delta = int(positions.max()) + 1 - length if length else 0
    return positions[:, None, :], rope_delta


class PromptBuilder:
    """Builds Robometer prompt layouts from a ``tokenizers.Tokenizer`` (the bundle's tokenizer.json).

    Tokenization of the rendered text is cached per (prompt kind, instruction, frame counts), so a step
    costs one dictionary lookup plus the numpy layout work.
    """

    def __init__(self, tokenizer: Tokenizer, spatial_merge_size: int = 2, cache_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.spatial_merge_size = spatial_merge_size
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self.image_pad_id = self._id(IMAGE_PAD)
        self.vision_start_id = self._id(VISION_START)
        self.vision_end_id = self._id(VISION_END)
        self.prog_token_id = self._id(PROG_TOKEN)
        self.pref_token_id = self._id(PREF_TOKEN)
        self.split_token_id = self._id(SPLIT_TOKEN)

    @classmethod
    def from_file(cls, path: str | Path, spatial_merge_size: int = 2) -> PromptBuilder:
        """Load tokenizer.json (file or directory) and build on it (the Robometer tokens must be present)."""
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        return cls(Tokenizer.from_file(str(file)), spatial_merge_size)

    def _id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise KeyError(f"tokenizer has no {token!r} token (is it a Qwen3-VL tokenizer with the Robometer tokens?)")
        return int(tid)

    def token_ids(self) -> dict[str, int]:
        """The special-token ids this builder uses (for a bundle manifest)."""
        return {
            IMAGE_PAD: self.image_pad_id,
            VISION_START: self.vision_start_id,
            VISION_END: self.vision_end_id,
            PROG_TOKEN: self.prog_token_id,
            PREF_TOKEN: self.pref_token_id,
            SPLIT_TOKEN: self.split_token_id,
        }

    def encode(self, text: str) -> np.ndarray:
        """Token ids of a rendered prompt (special tokens in the text map to their single ids)."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def _cached_ids(self, key: tuple, text_fn) -> np.ndarray:
        ids = self._cache.get(key)
        if ids is None:
            ids = self.encode(text_fn())
            self._cache[key] = ids
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return ids

    def progress(self, instruction: str, grids: Sequence[GridTHW]) -> PromptLayout:
        """Layout of a progress sample: the instruction, then per frame an image and a ``<|prog_token|>``."""
        if not grids:
            raise ValueError("a progress prompt needs at least one frame")
        key = ("progress", instruction, len(grids))
        ids = self._cached_ids(
            key, lambda: render_user_turn(progress_conversation(instruction, len(grids))[0]["content"])
        )
        return self.layout_from_ids(ids, grids)

    def preference(
        self,
        instruction: str,
        grids_a: Sequence[GridTHW],
        grids_b: Sequence[GridTHW],
        predict_progress: bool = True,
    ) -> PromptLayout:
        """Layout of a preference sample: A's frames, ``<|split_token|>``, B's frames, ``<|pref_token|>``."""
        if not grids_a or not grids_b:
            raise ValueError("a preference prompt needs frames in both trajectories")
        key = ("preference", instruction, len(grids_a), len(grids_b), predict_progress)
        conversation = preference_conversation(instruction, len(grids_a), len(grids_b), predict_progress)
        ids = self._cached_ids(key, lambda: render_user_turn(conversation[0]["content"]))
        layout = self.layout_from_ids(ids, list(grids_a) + list(grids_b))
        if layout.pref_position is None:
            raise ValueError("preference prompt has no <|pref_token|>")
        return layout

    def layout_from_ids(self, ids: np.ndarray, grids: Sequence[GridTHW]) -> PromptLayout:
        """Expand each ``<|image_pad|>`` of an unexpanded id sequence by its grid and compute the layout."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pad_positions = np.flatnonzero(ids == self.image_pad_id)
        if len(pad_positions) != len(grids):
            raise ValueError(f"prompt has {len(pad_positions)} images but {len(grids)} frame grids were given")
        grid_arr = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
        merge2 = self.spatial_merge_size**2
        counts = grid_arr.prod(axis=1) // merge2
        if np.any(grid_arr.prod(axis=1) % merge2) or np.any(counts <= 0):
            raise ValueError(f"grids {grid_arr.tolist()} are not divisible into {merge2}-patch tokens")
        repeats = np.ones_like(ids)
        repeats[pad_positions] = counts
        input_ids = np.repeat(ids, repeats)
        visual_mask = input_ids == self.image_pad_id
        total_visual = int(counts.sum())
        visual_index = np.zeros(input_ids.shape[0], dtype=np.int64)
        visual_index[visual_mask] = np.arange(total_visual, dtype=np.int64)
        types = visual_mask.astype(np.int64)
        position_ids, rope_delta = mrope_position_ids(types, grid_arr, self.spatial_merge_size)
        span_starts = np.concatenate([[0], np.cumsum(repeats)[:-1]])[pad_positions]
        spans = [(int(s), int(s + c)) for s, c in zip(span_starts, counts)]
        prog_positions = np.flatnonzero(input_ids == self.prog_token_id).astype(np.int64)
        pref = np.flatnonzero(input_ids == self.pref_token_id).astype(np.int64)
        if len(pref) > 1:
            raise ValueError(f"prompt has {len(pref)} <|pref_token|> tokens, expected at most 1")
        return PromptLayout(
            input_ids=input_ids[None, :],
            position_ids=position_ids,
            mm_token_type_ids=types[None, :],
            visual_index=visual_index[None, :],
            visual_mask=visual_mask[None, :],
            prog_positions=prog_positions,
            pref_position=pref if len(pref) else None,
            visual_spans=spans,
            image_grid_thw=grid_arr,
            rope_delta=rope_delta,
        )
