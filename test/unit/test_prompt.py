"""Host-side prompt layout (model/prompt.py) against transformers: the chat template, the Qwen3-VL processor's
token ids and mm_token_type_ids, and Qwen3VLModel.get_rope_index."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from robometer_ros.model import prompt as P
from robometer_ros.model.prompt import PromptBuilder, mrope_position_ids
from robometer_ros.model.tiny import tiny_model
from robometer_ros.model.tokenizer import qwen3vl_chat_template, save_tokenizer
from robometer_ros.preprocess import MAX_PIXELS, MIN_PIXELS, FramePreprocessor

torch.set_num_threads(1)

INSTRUCTION = "open the top drawer"


class _ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without the video processor (which needs torchvision, unusable here)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, tokenizer = tiny_model(seed=2)
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(tokenizer, directory)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(directory))
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    )
    processor = _ImageOnlyQwen3VLProcessor(
        image_processor=image_processor, tokenizer=hf_tokenizer, video_processor=None
    )
    return model, tokenizer, hf_tokenizer, processor, PromptBuilder.from_file(directory)


def _render_with_transformers(hf_tokenizer, conversation):
    return hf_tokenizer.apply_chat_template(
        conversation,
        chat_template=qwen3vl_chat_template(),
        tokenize=False,
        add_generation_prompt=False,
        add_vision_id=True,
        enable_thinking=False,
        fps=1,
    )


@pytest.mark.parametrize("num_frames", [1, 3, 8])
def test_rendered_text_matches_chat_template(setup, num_frames):
    _, _, hf_tokenizer, _, _ = setup
    conversation = P.progress_conversation(INSTRUCTION, num_frames)
    ours = P.render_user_turn(conversation[0]["content"])
    assert ours == _render_with_transformers(hf_tokenizer, conversation)
    # no system message is injected, and the official prompt string opens the user turn
    assert ours.startswith("<|im_start|>user\n" + P.progress_prompt_text(INSTRUCTION) + "Picture 1: <|vision_start|>")
    assert ours.endswith(f"Picture {num_frames}: <|vision_start|><|image_pad|><|vision_end|><|prog_token|><|im_end|>\n")


@pytest.mark.parametrize(("n_a", "n_b", "with_progress"), [(1, 1, True), (3, 2, True), (8, 8, False)])
def test_rendered_preference_text_matches_chat_template(setup, n_a, n_b, with_progress):
    _, _, hf_tokenizer, _, _ = setup
    conversation = P.preference_conversation(INSTRUCTION, n_a, n_b, with_progress)
    ours = P.render_user_turn(conversation[0]["content"])
    assert ours == _render_with_transformers(hf_tokenizer, conversation)
    assert f"<|prog_token|><|split_token|>This is Trajectory B. Picture {n_a + 1}: " in ours
    assert ours.endswith(
        "<|prog_token|>Now predict the preference between the two trajectories.<|pref_token|><|im_end|>\n"
    )
    assert (P.PREFERENCE_PROGRESS_SUFFIX in ours) == with_progress


def test_official_prompt_strings():
    # Verbatim from the official collator; a change here changes every reward the released model gives.
    assert P.progress_prompt_text("stack cups") == (
        "The task for the robot is 'stack cups'. Given the trajectory video, predict the task progress at each frame, "
        "how far along the robot is towards completing the task, a float between 0 and 1, where 0 is the starting "
        "state and 1 is when the task is completed. If the robot is not performing the same task, predict 0 progress."
    )
    assert P.preference_prompt_text("stack cups", predict_progress=False) == (
        "Given these two trajectories for the task 'stack cups', evaluate which one makes more progress towards the "
        "task. Return A for the first trajectory and B for the second trajectory."
    )


def _frames(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.mark.parametrize(
    "sizes",
    [
        [(64, 64)],
        [(64, 96)] * 3,
        [(64, 64)] * 8,
        [(70, 100), (128, 64), (33, 200)],  # sizes the processor has to resize, mixed
    ],
    ids=["1x64", "3x64x96", "8x64", "mixed"],
)
def test_layout_matches_processor_and_get_rope_index(setup, sizes):
    model, _, hf_tokenizer, processor, builder = setup
    frames = _frames(sizes)
    text = _render_with_transformers(hf_tokenizer, P.progress_conversation(INSTRUCTION, len(frames)))
    expected = processor(text=[text], images=frames, return_tensors="np")

    preprocessors = [FramePreprocessor.for_camera(h, w) for h, w in sizes]
    grids = [p.grid_thw for p in preprocessors]
    layout = builder.progress(INSTRUCTION, grids)

    np.testing.assert_array_equal(layout.input_ids, expected["input_ids"])
    np.testing.assert_array_equal(layout.mm_token_type_ids, expected["mm_token_type_ids"])
    np.testing.assert_array_equal(layout.image_grid_thw, expected["image_grid_thw"])
    pixels = np.concatenate([p(f) for p, f in zip(preprocessors, frames)])
    np.testing.assert_array_equal(pixels, expected["pixel_values"])

    position_ids, delta = model.model.get_rope_index(
        torch.from_numpy(layout.input_ids),
        torch.from_numpy(layout.mm_token_type_ids),
        image_grid_thw=torch.from_numpy(layout.image_grid_thw),
        attention_mask=torch.ones(1, layout.seq_len, dtype=torch.long),
    )
    np.testing.assert_array_equal(layout.position_ids, position_ids.numpy())
    assert layout.rope_delta == int(delta)


def test_preference_layout_matches_processor_and_rope(setup):
    model, _, hf_tokenizer, processor, builder = setup
    frames = _frames([(64, 64)] * 5, seed=4)
    text = _render_with_transformers(hf_tokenizer, P.preference_conversation(INSTRUCTION, 2, 3))
    expected = processor(text=[text], images=frames, return_tensors="np")
    layout = builder.preference(INSTRUCTION, [(1, 4, 4)] * 2, [(1, 4, 4)] * 3)
    np.testing.assert_array_equal(layout.input_ids, expected["input_ids"])
    position_ids, _ = model.model.get_rope_index(
        torch.from_numpy(layout.input_ids),
        torch.from_numpy(layout.mm_token_type_ids),
        image_grid_thw=torch.from_numpy(layout.image_grid_thw),
    )
    np.testing.assert_array_equal(layout.position_ids, position_ids.numpy())
    ids = layout.input_ids[0]
    assert len(layout.prog_positions) == 5
    assert (ids[layout.prog_positions] == builder.prog_token_id).all()
    assert ids[layout.pref_position[0]] == builder.pref_token_id
    split = int(np.flatnonzero(ids == builder.split_token_id)[0])
    assert (layout.prog_positions[:2] < split).all() and (layout.prog_positions[2:] > split).all()
    assert layout.pref_position[0] == layout.seq_len - 3  # <|pref_token|><|im_end|>\n


def test_layout_arrays(setup):
    _, tokenizer, _, _, builder = setup
    grids = [(1, 4, 6), (1, 2, 4), (1, 4, 4)]
    layout = builder.progress(INSTRUCTION, grids)
    ids = layout.input_ids[0]
    assert layout.input_ids.dtype == np.int64 and layout.position_ids.shape == (3, 1, layout.seq_len)
    assert layout.visual_mask.dtype == np.bool_
    counts = [6, 2, 4]
    assert [e - s for s, e in layout.visual_spans] == counts
    assert layout.num_visual_tokens == sum(counts)
    np.testing.assert_array_equal(layout.visual_index[layout.visual_mask], np.arange(sum(counts)))
    assert (layout.visual_index[~layout.visual_mask] == 0).all()
    for s, e in layout.visual_spans:
        assert ids[s - 1] == tokenizer.token_to_id("<|vision_start|>")
        assert ids[e] == tokenizer.token_to_id("<|vision_end|>")
        assert ids[e + 1] == builder.prog_token_id
    np.testing.assert_array_equal(layout.prog_positions, [e + 1 for _, e in layout.visual_spans])
    assert layout.pref_position is None
    # the instruction is in the decoded prompt
    assert P.progress_prompt_text(INSTRUCTION) in tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    # token ids come from the tokenizer
    assert builder.token_ids()["<|prog_token|>"] == tokenizer.token_to_id("<|prog_token|>")


def test_cache_returns_same_layout_and_errors(setup):
    _, _, _, _, builder = setup
    first = builder.progress(INSTRUCTION, [(1, 4, 4)] * 2)
    second = builder.progress(INSTRUCTION, [(1, 4, 4)] * 2)
    np.testing.assert_array_equal(first.input_ids, second.input_ids)
    with pytest.raises(ValueError, match="at least one frame"):
        builder.progress(INSTRUCTION, [])
    with pytest.raises(ValueError, match="not divisible"):
        builder.progress(INSTRUCTION, [(1, 3, 3)])
    with pytest.raises(ValueError, match="2 images but 1 frame grids"):
        builder.layout_from_ids(
            builder.encode(P.render_user_turn(P.progress_conversation("x", 2)[0]["content"])), [(1, 2, 2)]
        )


def test_mrope_positions_by_hand():
    # text(2) image(grid 1x4x6 -> 2x3 tokens) text(1)
    types = np.array([0, 0, 1, 1, 1, 1, 1, 1, 0])
    positions, delta = mrope_position_ids(types, np.array([[1, 4, 6]]))
    np.testing.assert_array_equal(positions[0, 0], [0, 1, 2, 2, 2, 2, 2, 2, 5])
    np.testing.assert_array_equal(positions[1, 0], [0, 1, 2, 2, 2, 3, 3, 3, 5])
    np.testing.assert_array_equal(positions[2, 0], [0, 1, 2, 3, 4, 2, 3, 4, 5])
    assert delta == 6 - 9
    with pytest.raises(ValueError, match="has 6 tokens but grid"):
        mrope_position_ids(types, np.array([[1, 4, 4]]))


def test_missing_special_token_is_a_clear_error():
    from robometer_ros.model.tiny import tiny_tokenizer

    base = tiny_tokenizer(add_robometer=False)
    with pytest.raises(KeyError, match="<\\|prog_token\\|>"):
        PromptBuilder(base)


def test_prefix_split_is_the_same_at_every_frame_count(setup):
    """The prefix (chat text, instruction, first frame, its prog token) does not depend on how many frames
    follow, and the suffix is exactly the rest of the layout, its M-RoPE ids continuing the prefix's."""
    builder = setup[4]
    grid = (1, 4, 6)
    layouts = {n: builder.progress(INSTRUCTION, [grid] * n) for n in (1, 2, 5, 8)}
    splits = {n: P.split_after_first_frame(layout) for n, layout in layouts.items()}
    first = splits[1]
    assert first.prefix_input_ids[0, -1] == builder.prog_token_id and first.suffix_prog_positions.size == 0
    assert first.prefix_visual_tokens == 6 and first.prefix_visual_mask.sum() == 6
    for n, split in splits.items():
        layout = layouts[n]
        np.testing.assert_array_equal(split.prefix_input_ids, first.prefix_input_ids)
        np.testing.assert_array_equal(split.prefix_position_ids, first.prefix_position_ids)
        assert split.prefix_length + split.suffix_length == layout.seq_len
        np.testing.assert_array_equal(np.concatenate([split.prefix_input_ids, split.suffix_input_ids], 1),
                                      layout.input_ids)
        np.testing.assert_array_equal(np.concatenate([split.prefix_position_ids, split.suffix_position_ids], 2),
                                      layout.position_ids)
        # suffix visual rows index the suffix frames' features: 0..(n-1)*6-1 in order
        rows = split.suffix_visual_index[split.suffix_visual_mask]
        np.testing.assert_array_equal(rows, np.arange((n - 1) * 6))
        assert np.all(split.suffix_visual_index[~split.suffix_visual_mask] == 0)
        np.testing.assert_array_equal(split.suffix_prog_positions + split.prefix_length, layout.prog_positions[1:])
        assert split.suffix_position_ids.min() > split.prefix_position_ids.max()


def test_prefix_split_refuses_a_preference_prompt(setup):
    builder = setup[4]
    layout = builder.preference(INSTRUCTION, [(1, 4, 6)] * 2, [(1, 4, 6)] * 2)
    with pytest.raises(ValueError, match="preference prompt"):
        P.split_after_first_frame(layout)
