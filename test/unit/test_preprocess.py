"""Frame preprocessing (numpy + PIL) against transformers' Qwen2VLImageProcessorPil, the resize rule by hand,
the fixed bundle frame size, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from robometer_ros.preprocess import (
    MAX_PIXELS,
    MIN_PIXELS,
    FramePreprocessor,
    check_frame,
    frame_size_for,
    patchify,
    smart_resize,
)


def _processor(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


@pytest.mark.parametrize(
    ("height", "width"),
    [(240, 320), (480, 640), (64, 64), (100, 111), (37, 500), (257, 255), (720, 1280)],
)
def test_matches_transformers_image_processor(height, width):
    frame = np.random.default_rng(height * 1000 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = _processor()(images=[frame], return_tensors="np")
    pre = FramePreprocessor.for_camera(height, width)
    ours = pre(frame)
    assert list(expected["image_grid_thw"][0]) == list(pre.grid_thw)
    assert ours.dtype == np.float32 and ours.shape == (pre.num_patches, 1536)
    np.testing.assert_array_equal(ours, expected["pixel_values"])  # bit-exact


def test_min_max_pixels_follow_the_processor():
    # Qwen3-VL-4B's own processor config uses 65536..16777216 pixels; small frames are scaled up.
    frame = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    expected = _processor(65536, 16777216)(images=[frame], return_tensors="np")
    pre = FramePreprocessor.for_camera(60, 80, min_pixels=65536, max_pixels=16777216)
    assert (pre.height, pre.width) == (224, 320)
    np.testing.assert_array_equal(pre(frame), expected["pixel_values"])


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((240, 320), (256, 320)),  # 7.5 rounds half to even -> 8
        ((240, 427), (256, 416)),  # 104 visual tokens, as the official 240p data gives
        ((240, 240), (256, 256)),
        ((480, 640), (480, 640)),
        ((10, 10), (64, 64)),  # below MIN_PIXELS (4 tokens of 32x32): scaled up
    ],
)
def test_smart_resize_by_hand(size, expected):
    assert smart_resize(*size) == expected
    assert smart_resize(*size) == hf_smart_resize(*size, factor=32, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def test_smart_resize_caps_pixels_and_rejects_extreme_aspect():
    h, w = smart_resize(4000, 6000, max_pixels=1024 * 1024)
    assert h % 32 == 0 and w % 32 == 0 and h * w <= 1024 * 1024
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 5000)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)


def test_frame_size_for_shortest_edge():
    # a 480x640 camera at the official 240-pixel short side -> 240x320 -> 256x320 (80 tokens)
    assert frame_size_for(480, 640, shortest_edge=240) == (256, 320)
    assert FramePreprocessor(*frame_size_for(480, 640, shortest_edge=240)).num_tokens == 80


def test_fixed_bundle_size_resizes_any_camera_frame():
    pre = FramePreprocessor(256, 320)
    rng = np.random.default_rng(5)
    camera = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(camera).resize((320, 256), resample=Image.Resampling.BICUBIC))
    expected = _processor()(images=[resized], return_tensors="np")
    np.testing.assert_array_equal(pre(camera), expected["pixel_values"])
    assert pre(rng.integers(0, 256, (100, 90, 3), dtype=np.uint8)).shape == (320, 1536)
    assert pre.grid_thw == (1, 16, 20)


def test_patch_layout_by_hand():
    # 32x32 image, one merge block of 2x2 patches; patch (r, c) filled with the value 10*r + c + channel/10
    image = np.zeros((32, 32, 3), dtype=np.float32)
    for r in range(2):
        for c in range(2):
            for ch in range(3):
                image[16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1), ch] = 10 * r + c + ch / 10
    rows, grid = patchify(image)
    assert grid == (1, 2, 2) and rows.shape == (4, 1536)
    per_row = rows.reshape(4, 3, 2, 16, 16)  # [C, T, p, p]
    for i, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        for ch in range(3):
            assert np.all(per_row[i, ch] == np.float32(10 * r + c + ch / 10))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((10, 10, 3), dtype=np.float32), "uint8"),
        (np.zeros((10, 10), dtype=np.uint8), r"\[H, W, 3\]"),
        (np.zeros((10, 10, 4), dtype=np.uint8), r"\[H, W, 3\]"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "empty"),
    ],
)
def test_bad_frames_are_named(frame, message):
    with pytest.raises(ValueError, match=message):
        check_frame(frame)
    with pytest.raises(ValueError, match=message):
        FramePreprocessor(64, 64)(frame)


def test_frame_size_must_be_multiple_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        FramePreprocessor(100, 64)
    with pytest.raises(TypeError, match="numpy array"):
        check_frame([[1, 2, 3]])
