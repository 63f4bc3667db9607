"""Camera frame -> Qwen3-VL patch rows, in numpy + PIL (no torch), matching transformers' image processor.

Qwen3-VL's image processor (``Qwen2VLImageProcessor`` with patch 16, merge 2, temporal patch 2, mean/std 0.5)
does, per image: resize with PIL bicubic to a size whose sides are multiples of patch*merge = 32
(``smart_resize``), rescale by 1/255 (computed in float64, stored float32), normalise (x - 0.5) / 0.5 in float32,
repeat the frame over the temporal patch of 2, and lay the patches out in 2x2 merge-block order, one row of
3*2*16*16 = 1536 values per 16x16 patch. The grid is (1, H/16, W/16).

A bundle fixes one frame size (``FramePreprocessor(height, width)``); every camera frame, whatever its size,
is resized to it, so the vision part always sees the same shape. ``frame_size_for`` picks that size from a
camera resolution with the same rounding rule the official pipeline uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
RESCALE_FACTOR = 1.0 / 255.0
# qwen-vl-utils (which sizes the official pipeline's frames): 4 .. 16384 tokens of 32x32 pixels.
MIN_PIXELS = 4 * 32 * 32
MAX_PIXELS = 16384 * 32 * 32
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = PATCH_SIZE * MERGE_SIZE,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides rounded to multiples of ``factor``, pixel count kept in [min, max].

    Rounding is Python's ``round`` (half to even), as in transformers and qwen-vl-utils.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio must be at most {MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width):.1f}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_size_for(
    height: int,
    width: int,
    shortest_edge: int | None = None,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """The model frame size (height, width) for a camera resolution.

    ``shortest_edge`` first scales the camera size so its short side is that many pixels (the official data
    was stored at a 240-pixel short side); then ``smart_resize`` rounds to multiples of 32.
    """
    if shortest_edge is not None:
        if shortest_edge <= 0:
            raise ValueError(f"shortest_edge must be positive, got {shortest_edge}")
        scale = shortest_edge / min(height, width)
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
    return smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)


def check_frame(frame: np.ndarray) -> np.ndarray:
    """Validate an RGB frame: uint8 [H, W, 3]; returns it C-contiguous."""
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8 RGB, got dtype {frame.dtype}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must have shape [H, W, 3] (RGB), got {list(frame.shape)}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"frame is empty: {list(frame.shape)}")
    return np.ascontiguousarray(frame)


def resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bicubic resize of a uint8 RGB frame (a no-op copy when it already has that size)."""
    frame = check_frame(frame)
    if frame.shape[0] == height and frame.shape[1] == width:
        return frame
    resized = Image.fromarray(frame).resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def normalize_frame(
    frame: np.ndarray, mean: tuple[float, ...] = IMAGE_MEAN, std: tuple[float, ...] = IMAGE_STD
) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H, W, 3]: x/255 (float64, then float32), then (x - mean) / std in float32."""
    scaled = (frame.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    return (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)


def patchify(
    image: np.ndarray,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32 [H, W, C] -> patch rows [N, C*T*p*p] in merge-block order and the grid (1, H/p, W/p).

    Row order: merge blocks raster over (H/p/m, W/p/m), inside a block (m, m) raster; each row is
    [C, T, p, p] with the frame repeated over the temporal patch.
    """
    height, width, channels = image.shape
    unit = patch_size * merge_size
    if height % unit or width % unit:
        raise ValueError(f"image size {height}x{width} is not a multiple of {unit}")
    gh, gw = height // patch_size, width // patch_size
    blocks = image.reshape(gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size, channels)
    # -> (gh/m, gw/m, m, m, C, p, p)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
    rows = np.broadcast_to(
        blocks[:, :, :, :, :, None], (*blocks.shape[:5], temporal_patch_size, patch_size, patch_size)
    )
    return (
        np.ascontiguousarray(rows).reshape(gh * gw, channels * temporal_patch_size * patch_size * patch_size),
        (1, gh, gw),
    )


@dataclass(frozen=True)
class FramePreprocessor:
    """Preprocessing for one bundle frame size: ``__call__(frame) -> pixel_values [N, 1536] float32``.

    Attributes:
        height, width: the model frame size (multiples of patch_size * merge_size).
    """

    height: int
    width: int
    patch_size: int = PATCH_SIZE
    merge_size: int = MERGE_SIZE
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE
    image_mean: tuple[float, float, float] = IMAGE_MEAN
    image_std: tuple[float, float, float] = IMAGE_STD

    def __post_init__(self) -> None:
        unit = self.patch_size * self.merge_size
        if self.height <= 0 or self.width <= 0 or self.height % unit or self.width % unit:
            raise ValueError(f"frame size {self.height}x{self.width} must be positive multiples of {unit}")

    @classmethod
    def for_camera(cls, height: int, width: int, shortest_edge: int | None = None, **kwargs: int) -> FramePreprocessor:
        """A preprocessor whose frame size follows a camera resolution (``frame_size_for``)."""
        h, w = frame_size_for(height, width, shortest_edge=shortest_edge, **kwargs)
        return cls(h, w)

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """Patch grid of one frame: (1, height/16, width/16)."""
        return (1, self.height // self.patch_size, self.width // self.patch_size)

    @property
    def num_patches(self) -> int:
        """Rows of pixel_values per frame."""
        _, gh, gw = self.grid_thw
        return gh * gw

    @property
    def num_tokens(self) -> int:
        """Visual tokens per frame in the language model (patches / merge^2)."""
        return self.num_patches // (self.merge_size**2)

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """uint8 RGB [H, W, 3] of any size -> float32 [num_patches, patch_dim]."""
        resized = resize_frame(frame, self.height, self.width)
        rows, _ = patchify(
            normalize_frame(resized, self.image_mean, self.image_std),
            self.patch_size,
            self.merge_size,
            self.temporal_patch_size,
        )
        return rows
