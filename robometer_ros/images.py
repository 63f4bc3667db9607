"""Camera messages -> uint8 RGB numpy arrays, without cv_bridge.

Works on the fields of `sensor_msgs/Image` and `sensor_msgs/CompressedImage` (any object with those
attributes: rclpy messages, rosbags messages), so the same code runs on a ROS install and in a PyPI-only
venv. Why not cv_bridge: the PyPI cv-bridge breaks with numpy 2 / OpenCV 5, and a ROS install's cv_bridge
pulls OpenCV into a node that only needs a reshape; why not rosbags-image: it needs OpenCV too. Raw
encodings are a reshape plus a channel shuffle in numpy; jpeg / png go through PIL.

Every failure raises `ImageConversionError`, whose `reason` is a short stable key (for counters in
diagnostics) and whose message names the problem and, where there is one, the fix.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

# encoding -> (channels, bytes per channel, channel order of the output RGB taken from the input)
_RAW_ENCODINGS: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "rgb8": (3, 1, (0, 1, 2)),
    "bgr8": (3, 1, (2, 1, 0)),
    "rgba8": (4, 1, (0, 1, 2)),
    "bgra8": (4, 1, (2, 1, 0)),
    "rgb16": (3, 2, (0, 1, 2)),
    "bgr16": (3, 2, (2, 1, 0)),
    "rgba16": (4, 2, (0, 1, 2)),
    "bgra16": (4, 2, (2, 1, 0)),
    "mono8": (1, 1, (0, 0, 0)),
    "8UC1": (1, 1, (0, 0, 0)),
    "mono16": (1, 2, (0, 0, 0)),
}
# Packed 4:2:2 YUV, two pixels in 4 bytes: name -> byte offsets of (Y0, U, Y1, V).
_YUV422_ENCODINGS: dict[str, tuple[int, int, int, int]] = {
    "yuv422": (1, 0, 3, 2),  # UYVY (the ROS name for it)
    "uyvy": (1, 0, 3, 2),
    "yuv422_yuy2": (0, 1, 2, 3),  # YUYV
    "yuyv": (0, 1, 2, 3),
}
_DEPTH_ENCODINGS = {"16UC1", "32FC1", "16SC1", "32SC1", "64FC1"}

SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_RAW_ENCODINGS) + tuple(_YUV422_ENCODINGS)
SUPPORTED_COMPRESSED_FORMATS: tuple[str, ...] = ("jpeg", "png")


class ImageConversionError(ValueError):
    """An image that cannot be turned into RGB; `reason` is a short key for counting (e.g. "depth")."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def raw_to_rgb(
    height: int, width: int, encoding: str, is_bigendian: int | bool, step: int, data: Any
) -> np.ndarray:
    """Convert the fields of a `sensor_msgs/Image` into a new uint8 RGB array of shape (height, width, 3).

    Handles row padding (`step` larger than a packed row) and big-endian 16-bit data; 16-bit channels
    are scaled to 8 bit by keeping the high byte. Raises ImageConversionError for depth images,
    unsupported encodings, and data or step that do not fit the size.
    """
    if height <= 0 or width <= 0:
        raise ImageConversionError("empty", f"empty image: {width}x{height}")
    if encoding in _DEPTH_ENCODINGS:
        raise ImageConversionError(
            "depth",
            f"depth image ({encoding}): point image_topic at a color camera (rgb8, bgr8, mono8, ...)",
        )
    buffer = _byte_buffer(data)
    if encoding in _YUV422_ENCODINGS:
        rows = _rows(buffer, height, width, 2, step, encoding)
        return _yuv422_to_rgb(rows, width, _YUV422_ENCODINGS[encoding], encoding)
    if encoding not in _RAW_ENCODINGS:
        raise ImageConversionError(
            "unsupported_encoding",
            f"unsupported image encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}",
        )
    channels, depth, order = _RAW_ENCODINGS[encoding]
    rows = _rows(buffer, height, width, channels * depth, step, encoding)
    if depth == 2:
        dtype = np.dtype(">u2" if is_bigendian else "<u2")
        pixels = rows.copy().view(dtype).reshape(height, width, channels)
        pixels = (pixels >> 8).astype(np.uint8)
    else:
        pixels = rows.reshape(height, width, channels)
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, list(order)])


def _byte_buffer(data: Any) -> Any:
    """The message's data as a flat byte buffer, without copying where possible."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return memoryview(data).cast("B")
    except TypeError:  # a list of ints
        return np.asarray(data, dtype=np.uint8)


def _rows(buffer: Any, height: int, width: int, bytes_per_pixel: int, step: int, encoding: str) -> np.ndarray:
    """The packed pixel bytes, (height, width*bytes_per_pixel), with any row padding cut off."""
    row_bytes = width * bytes_per_pixel
    if step < row_bytes:
        raise ImageConversionError(
            "bad_step",
            f"step {step} is smaller than width*bytes_per_pixel = {width}*{bytes_per_pixel} = {row_bytes} "
            f"for {encoding} {width}x{height}",
        )
    needed = step * (height - 1) + row_bytes
    flat = np.frombuffer(buffer, dtype=np.uint8)
    if flat.size < needed:
        raise ImageConversionError(
            "truncated",
            f"truncated image data: {flat.size} bytes for {encoding} {width}x{height} with step {step} "
            f"(needs {step * height})",
        )
    if step == row_bytes:
        return flat[: height * row_bytes].reshape(height, row_bytes)
    # Padded rows: a strided view over the message buffer (the last row may lack its padding).
    return np.lib.stride_tricks.as_strided(flat, shape=(height, row_bytes), strides=(step, 1))


def _yuv422_to_rgb(
    rows: np.ndarray, width: int, offsets: tuple[int, int, int, int], encoding: str
) -> np.ndarray:
    """Packed 4:2:2 YUV (BT.601, limited range) -> RGB."""
    if width % 2:
        raise ImageConversionError("bad_size", f"{encoding} needs an even width, got {width}")
    quads = rows.reshape(rows.shape[0], width // 2, 4).astype(np.float32)
    y0, u, y1, v = (quads[:, :, i] for i in offsets)
    y = np.stack([y0, y1], axis=2).reshape(rows.shape[0], width) - 16.0
    u = np.repeat(u, 2, axis=1) - 128.0
    v = np.repeat(v, 2, axis=1) - 128.0
    r = 1.164 * y + 1.596 * v
    g = 1.164 * y - 0.392 * u - 0.813 * v
    b = 1.164 * y + 2.017 * u
    return np.clip(np.stack([r, g, b], axis=2) + 0.5, 0, 255).astype(np.uint8)


def compressed_to_rgb(format: str, data: Any) -> np.ndarray:
    """Decode the fields of a `sensor_msgs/CompressedImage` (jpeg or png) into uint8 RGB (H, W, 3).

    `format` is the image_transport string (e.g. "jpeg", "rgb8; jpeg compressed bgr8"); the codec is
    detected from the bytes, so only compressedDepth is rejected by name. Raises ImageConversionError
    for depth, undecodable or empty data.
    """
    if "compresseddepth" in format.lower().replace(" ", ""):
        raise ImageConversionError(
            "depth", f"compressedDepth image ({format!r}): point image_topic at a color camera"
        )
    raw = bytes(data)
    if not raw:
        raise ImageConversionError("empty", f"empty CompressedImage data (format {format!r})")
    from PIL import Image as PILImage  # PIL only where compressed images are used

    try:
        with PILImage.open(io.BytesIO(raw)) as image:
            image.load()  # decode now: a truncated file fails here, not later
            if image.format not in ("JPEG", "PNG"):
                raise ImageConversionError(
                    "unsupported_format",
                    f"unsupported compressed format {image.format} (format field {format!r}); "
                    f"supported: {', '.join(SUPPORTED_COMPRESSED_FORMATS)}",
                )
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit grey png: keep the high byte, as for raw mono16.
                grey = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except ImageConversionError:
        raise
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for garbage / truncated data
        raise ImageConversionError(
            "decode_failed", f"cannot decode CompressedImage (format {format!r}, {len(raw)} bytes): {err}"
        ) from err


def image_msg_to_rgb(msg: Any, max_pixels: int | None = None) -> np.ndarray:
    """`sensor_msgs/Image` (any object with its fields) -> uint8 RGB (H, W, 3)."""
    return raw_to_rgb(msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step, msg.data)


def compressed_msg_to_rgb(msg: Any, max_pixels: int | None = None) -> np.ndarray:
    """`sensor_msgs/CompressedImage` (any object with its fields) -> uint8 RGB (H, W, 3)."""
    return compressed_to_rgb(msg.format, msg.data)
