"""RobometerModel: the split path (encode_frame + forward_language) against the reference forward, causality,
state-dict names of the released checkpoint, heads, C51 decode and two-hot encode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from robometer_ros.model.config import RobometerConfig, robometer_4b_config
from robometer_ros.model.heads import expected_progress, two_hot
from robometer_ros.model.progress import expected_progress_np, sigmoid_np, two_hot_np
from robometer_ros.model.prompt import PromptBuilder, PromptLayout
from robometer_ros.model.robometer import RobometerModel
from robometer_ros.model.tiny import tiny_model

torch.set_num_threads(1)

INSTRUCTION = "pick up the red block and put it in the bowl"


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_model(seed=1)
    return model, tokenizer, PromptBuilder(tokenizer)


def _frames(grids, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t * h * w, 1536, generator=gen) for t, h, w in grids]


def _split(model: RobometerModel, layout: PromptLayout, pixels, grids):
    encoded = [model.encode_frame(p, g) for p, g in zip(pixels, grids)]
    visual = torch.cat([e[0] for e in encoded])
    deepstack = torch.cat([e[1] for e in encoded], dim=1)
    pref = None if layout.pref_position is None else torch.from_numpy(layout.pref_position)
    return model.forward_language(
        torch.from_numpy(layout.input_ids),
        torch.from_numpy(layout.position_ids),
        visual,
        deepstack,
        torch.from_numpy(layout.visual_index),
        torch.from_numpy(layout.visual_mask),
        torch.from_numpy(layout.prog_positions),
        pref,
    )


def _reference(model: RobometerModel, layout: PromptLayout, pixels):
    pref = None if layout.pref_position is None else torch.from_numpy(layout.pref_position)
    return model(
        torch.from_numpy(layout.input_ids),
        torch.cat(pixels),
        torch.from_numpy(layout.image_grid_thw),
        torch.from_numpy(layout.mm_token_type_ids),
        torch.from_numpy(layout.prog_positions),
        pref,
    )


@pytest.mark.parametrize(
    "grids",
    [
        [(1, 4, 6)],
        [(1, 4, 6)] * 3,
        [(1, 4, 4)] * 8,
        [(1, 4, 6), (1, 6, 4), (1, 2, 8)],  # mixed frame sizes in one prompt
    ],
    ids=["1frame", "3frames", "8frames", "mixed_sizes"],
)
def test_split_path_matches_reference_forward(tiny, grids):
    model, _, builder = tiny
    layout = builder.progress(INSTRUCTION, grids)
    pixels = _frames(grids)
    with torch.no_grad():
        ref = _reference(model, layout, pixels)
        split = _split(model, layout, pixels, grids)
    assert split["progress_logits"].shape == (len(grids), 10)
    assert split["success_logits"].shape == (len(grids),)
    torch.testing.assert_close(split["progress_logits"], ref["progress_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(split["success_logits"], ref["success_logits"], atol=1e-5, rtol=0)
    assert "preference_logit" not in split


def test_preference_layout_split_matches_reference(tiny):
    model, _, builder = tiny
    grids_a, grids_b = [(1, 4, 4)] * 3, [(1, 4, 4)] * 3
    layout = builder.preference(INSTRUCTION, grids_a, grids_b)
    pixels = _frames(grids_a + grids_b, seed=3)
    with torch.no_grad():
        ref = _reference(model, layout, pixels)
        split = _split(model, layout, pixels, grids_a + grids_b)
    assert split["preference_logit"].shape == (1,)
    assert split["progress_logits"].shape == (6, 10)
    for key in ("progress_logits", "success_logits", "preference_logit"):
        torch.testing.assert_close(split[key], ref[key], atol=1e-5, rtol=0)


def test_deepstack_features_change_the_result(tiny):
    # Guards the split path's deepstack addition: dropping it must change the logits.
    model, _, builder = tiny
    grids = [(1, 4, 4)] * 2
    layout = builder.progress(INSTRUCTION, grids)
    pixels = _frames(grids)
    with torch.no_grad():
        encoded = [model.encode_frame(p, g) for p, g in zip(pixels, grids)]
        visual = torch.cat([e[0] for e in encoded])
        deepstack = torch.cat([e[1] for e in encoded], dim=1)
        args = [torch.from_numpy(a) for a in (layout.input_ids, layout.position_ids)]
        rest = [torch.from_numpy(a) for a in (layout.visual_index, layout.visual_mask, layout.prog_positions)]
        with_ds = model.forward_language(*args, visual, deepstack, *rest)
        without = model.forward_language(*args, visual, deepstack[:0], *rest)
    assert deepstack.shape[0] == model.num_deepstack == 1
    assert not torch.allclose(with_ds["progress_logits"], without["progress_logits"], atol=1e-4)


@pytest.fixture(scope="module")
def mid():
    model, tokenizer = tiny_model(seed=1, size="mid")
    return model, tokenizer, PromptBuilder(tokenizer)


def _encoded(model: RobometerModel, grid, count: int, seed: int):
    return [model.encode_frame(p, grid) for p in _frames([grid] * count, seed=seed)]


@pytest.mark.parametrize("size", ["tiny", "mid"])
@pytest.mark.parametrize("num_frames", [1, 2, 5, 8])
def test_prefix_and_suffix_equal_the_plain_language_part(request, size, num_frames):
    """forward_prefix once + forward_suffix on a batch of 3 prompts sharing the first frame == forward_language
    on each prompt, fp32, <= 1e-5 (the first frame's heads come from the prefix, the others from the suffix)."""
    from robometer_ros.model.prompt import split_after_first_frame

    model, _, builder = request.getfixturevalue(size)
    grid = (1, 4, 6)
    layout = builder.progress(INSTRUCTION, [grid] * num_frames)
    split = split_after_first_frame(layout)
    first = _encoded(model, grid, 1, seed=11)[0]
    rows = [[first, *_encoded(model, grid, num_frames - 1, seed=20 + b)] for b in range(3)]
    t = torch.from_numpy
    with torch.no_grad():
        prefix = model.forward_prefix(t(split.prefix_input_ids), t(split.prefix_position_ids), *first,
                                      t(split.prefix_visual_index), t(split.prefix_visual_mask))
        layers, kv_heads, head_dim = (model.config.backbone["text_config"][k] for k in
                                      ("num_hidden_layers", "num_key_value_heads", "head_dim"))
        assert prefix["past_keys"].shape == (layers, 1, kv_heads, split.prefix_length, head_dim)
        plain = [model.forward_language(t(layout.input_ids), t(layout.position_ids), torch.cat([f[0] for f in row]),
                                        torch.cat([f[1] for f in row], 1), t(layout.visual_index),
                                        t(layout.visual_mask), t(layout.prog_positions)) for row in rows]
        if num_frames > 1:
            suffix_args = (t(split.suffix_input_ids), t(split.suffix_position_ids),
                           torch.stack([torch.cat([f[0] for f in row[1:]]) for row in rows]),
                           torch.stack([torch.cat([f[1] for f in row[1:]], 1) for row in rows]),
                           t(split.suffix_visual_index), t(split.suffix_visual_mask), t(split.suffix_prog_positions))
            suffix = model.forward_suffix(*suffix_args, prefix["past_keys"], prefix["past_values"])
            assert suffix["progress_logits"].shape == (3, num_frames - 1, 10)
            # the suffix really reads the prefix: other keys/values change its result
            blind = model.forward_suffix(*suffix_args, prefix["past_keys"] * 0.5, prefix["past_values"])
            assert not torch.allclose(blind["progress_logits"], suffix["progress_logits"], atol=1e-4)
    for b, reference in enumerate(plain):
        progress = [prefix["progress_logits"]] + ([suffix["progress_logits"][b]] if num_frames > 1 else [])
        success = [prefix["success_logits"]] + ([suffix["success_logits"][b]] if num_frames > 1 else [])
        torch.testing.assert_close(torch.cat(progress), reference["progress_logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.cat(success), reference["success_logits"], atol=1e-5, rtol=0)


def test_progress_of_a_frame_is_unchanged_when_later_frames_are_appended(tiny):
    model, _, builder = tiny
    grids = [(1, 4, 6)] * 5
    pixels = _frames(grids, seed=7)
    with torch.no_grad():
        short = _split(model, builder.progress(INSTRUCTION, grids[:3]), pixels[:3], grids[:3])
        long = _split(model, builder.progress(INSTRUCTION, grids), pixels, grids)
    torch.testing.assert_close(long["progress_logits"][:3], short["progress_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(long["success_logits"][:3], short["success_logits"], atol=1e-5, rtol=0)
    # and a later frame does see the earlier ones (the model is not trivially frame-local)
    with torch.no_grad():
        swapped = _split(model, builder.progress(INSTRUCTION, grids), [pixels[1], pixels[0], *pixels[2:]], grids)
    assert not torch.allclose(swapped["progress_logits"][4], long["progress_logits"][4], atol=1e-6)


def test_encode_frame_matches_backbone_image_features(tiny):
    model, _, _ = tiny
    grid = (1, 6, 4)
    (pixels,) = _frames([grid])
    with torch.no_grad():
        visual, deepstack = model.encode_frame(pixels, grid)
        ref = model.model.get_image_features(pixels, torch.tensor([grid]), return_dict=True)
    assert visual.shape == (6, model.hidden_size)
    torch.testing.assert_close(visual, ref.pooler_output[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(deepstack[0], ref.deepstack_features[0][0], atol=1e-6, rtol=0)


def test_encode_frame_rejects_wrong_patch_count(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="pixel_values must be"):
        model.encode_frame(torch.zeros(10, 1536), (1, 4, 4))


def test_final_hidden_state_is_the_post_norm_state_the_official_code_reads(tiny):
    # The official code takes outputs.hidden_states[-1]; our reference uses last_hidden_state.
    model, _, builder = tiny
    grids = [(1, 4, 4)] * 2
    layout = builder.progress(INSTRUCTION, grids)
    with torch.no_grad():
        out = model.model(
            input_ids=torch.from_numpy(layout.input_ids),
            pixel_values=torch.cat(_frames(grids)),
            image_grid_thw=torch.from_numpy(layout.image_grid_thw),
            mm_token_type_ids=torch.from_numpy(layout.mm_token_type_ids),
            output_hidden_states=True,
        )
    model.model.rope_deltas = None
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state, atol=0, rtol=0)


def test_state_dict_uses_released_checkpoint_names(tiny):
    model, _, _ = tiny
    keys = set(model.state_dict())
    for key in (
        "model.visual.patch_embed.proj.weight",
        "model.visual.blocks.0.attn.qkv.weight",
        "model.visual.deepstack_merger_list.0.linear_fc2.weight",
        "model.language_model.embed_tokens.weight",
        "model.language_model.layers.1.self_attn.q_norm.weight",
        "model.language_model.norm.weight",
        "progress_head.0.weight",
        "progress_head.1.weight",
        "progress_head.4.bias",
        "success_head.4.weight",
        "preference_head.0.bias",
    ):
        assert key in keys, key
    head = model.progress_head
    assert [type(m).__name__ for m in head] == ["Linear", "LayerNorm", "GELU", "Dropout", "Linear"]
    assert head[0].out_features == model.hidden_size // 2 and head[4].out_features == 10
    assert head[3].p == pytest.approx(0.1)
    assert model.success_head[4].out_features == 1 and model.preference_head[4].out_features == 1


def test_4b_config_has_the_released_parameter_count():
    config = robometer_4b_config()
    with torch.device("meta"):
        model = RobometerModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    # Qwen3-VL-4B without lm_head (~4.44e9 with the 151674-row embedding) + three heads of ~3.3M each
    assert 4.40e9 < n_params < 4.47e9
    assert model.model.language_model.embed_tokens.weight.shape == (151674, 2560)


def test_config_round_trip_and_validation(tiny):
    model, _, _ = tiny
    config = model.config
    again = RobometerConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ValueError, match="unknown RobometerConfig fields"):
        RobometerConfig.from_dict({**config.to_dict(), "bins": 5})
    with pytest.raises(ValueError, match="num_bins"):
        RobometerConfig(backbone=config.backbone, num_bins=1)
    assert config.special_tokens == (
        "<|split_token|>",
        "<|reward_token|>",
        "<|pref_token|>",
        "<|sim_token|>",
        "<|prog_token|>",
    )
    assert config.patch_dim == 1536


# ------------------------------------------------------------------------------------------ C51 / two-hot
def test_expected_progress_hand_computed():
    bins = 10
    uniform = torch.zeros(1, bins)
    assert expected_progress(uniform).item() == pytest.approx(0.5, abs=1e-6)
    peaked_first = torch.tensor([[50.0] + [0.0] * (bins - 1)])
    peaked_last = torch.tensor([[0.0] * (bins - 1) + [50.0]])
    assert expected_progress(peaked_first).item() == pytest.approx(0.0, abs=1e-6)
    assert expected_progress(peaked_last).item() == pytest.approx(1.0, abs=1e-6)
    # two equal logits on bins 2 and 3 (centres 2/9 and 3/9), all others -inf-ish -> 2.5/9
    two = torch.full((1, bins), -1e4)
    two[0, 2] = two[0, 3] = 1.0
    assert expected_progress(two).item() == pytest.approx(2.5 / 9, abs=1e-6)
    # softmax([0, ln 3]) over bins 0 and 9 -> 0.75 * 1
    pair = torch.full((1, bins), -1e4)
    pair[0, 0], pair[0, 9] = 0.0, math.log(3.0)
    assert expected_progress(pair).item() == pytest.approx(0.75, abs=1e-6)
    logits = np.random.default_rng(0).normal(size=(4, bins))
    np.testing.assert_allclose(expected_progress_np(logits), expected_progress(torch.tensor(logits)).numpy(), atol=1e-6)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0, {0: 1.0}),
        (1.0, {9: 1.0}),
        (0.5, {4: 0.5, 5: 0.5}),
        (0.25, {2: 0.75, 3: 0.25}),
        (2 / 9, {2: 1.0}),
        (-0.3, {0: 1.0}),
        (1.7, {9: 1.0}),
    ],
)
def test_two_hot_hand_computed(value, expected):
    target = np.zeros(10, dtype=np.float32)
    for index, weight in expected.items():
        target[index] = weight
    np.testing.assert_allclose(two_hot(value, 10).numpy(), target, atol=1e-6)
    np.testing.assert_allclose(two_hot_np(value, 10), target, atol=1e-6)


def test_two_hot_batched_and_decodes_back():
    values = np.array([[0.0, 0.13, 0.5], [0.77, 0.999, 1.0]], dtype=np.float32)
    target = two_hot(torch.from_numpy(values), 10)
    assert target.shape == (2, 3, 10)
    torch.testing.assert_close(target.sum(-1), torch.ones(2, 3))
    centers = torch.linspace(0, 1, 10)
    torch.testing.assert_close((target * centers).sum(-1), torch.from_numpy(values), atol=1e-6, rtol=0)
    np.testing.assert_allclose(two_hot_np(values, 10), target.numpy(), atol=1e-6)


def test_sigmoid_np_stable():
    np.testing.assert_allclose(sigmoid_np(np.array([-1000.0, 0.0, 1000.0, 2.0])), [0.0, 0.5, 1.0, 1 / (1 + np.exp(-2))])
