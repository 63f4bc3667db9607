"""Camera messages -> uint8 RGB numpy arrays, without cv_bridge.

Works on the fields of `sensor_msgs/Image` and `sensor_msgs/CompressedImage` (any object with those
attributes: rclpy messages, rosbags messages), so the same code runs on a ROS install and in a PyPI-only
venv. Why not cv_bridge: the PyPI cv-bridge breaks with numpy 2 / OpenCV 5, and a ROS install's cv_bridge
pulls OpenCV into a node that only needs a reshape; why not rosbags-image: it needs OpenCV too. Raw
encodings are a reshape plus a channel shuffle in numpy; jpeg goes through simplejpeg (libjpeg-turbo,
strict), png through PIL.

Hostile input: every size is checked from the message's header fields (raw) or the declared size in the
JPEG / PNG header (compressed) *before* anything is decoded or allocated, against ``max_pixels``
(default ``DEFAULT_MAX_PIXELS``, 4096x2160: DCI and UHD 4K). Corrupt compressed data is rejected rather
than decoded to garbage: JPEG is decoded by libjpeg-turbo in strict mode (its "corrupt data" and
"premature end" warnings are errors), PNG's CRC-32 of every chunk is checked before decoding. A flipped
bit inside a JPEG's entropy-coded data can still decode without any warning (JPEG carries no checksum);
test/unit/test_images.py measures how often.

Every failure raises `ImageConversionError`, whose `reason` is one of ``IMAGE_ERROR_REASONS`` (a short
stable key for counters in diagnostics) and whose message names the problem and, where there is one, the
fix:

===================== ===================================================================================
reason                meaning
===================== ===================================================================================
empty                 zero width or height, or no data
too_large             declared width*height above max_pixels (raw header or JPEG / PNG header)
truncated             raw data shorter than step*height
bad_layout            raw fields that do not fit together: step < width*bytes per pixel, data longer than
                      step*height, an odd width for 4:2:2 YUV
depth                 a depth image (16UC1, 32FC1, compressedDepth, ...)
unsupported_encoding  a raw encoding not in SUPPORTED_ENCODINGS (e.g. bayer_*)
unsupported_format    compressed data that is an image but not JPEG / PNG (BMP, WebP, CMYK JPEG, ...)
decode_failed         compressed data that is not a valid JPEG / PNG: garbage, cut short, or corrupt
                      (entropy-coding errors, a chunk CRC mismatch)
===================== ===================================================================================
"""

from __future__ import annotations

import io
import struct
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

# 4096x2160 (DCI 4K; UHD 3840x2160 fits too): a frame's RGB copy is at most 26.5 MB.
DEFAULT_MAX_PIXELS = 4096 * 2160
IMAGE_ERROR_REASONS: tuple[str, ...] = (
    "empty",
    "too_large",
    "truncated",
    "bad_layout",
    "depth",
    "unsupported_encoding",
    "unsupported_format",
    "decode_failed",
)
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageConversionError(ValueError):
    """An image that cannot be turned into RGB; `reason` is one of IMAGE_ERROR_REASONS (e.g. "depth")."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width * height > max_pixels:
        raise ImageConversionError(
            "too_large",
            f"{what} declares {width}x{height} = {width * height} pixels, more than max_pixels = {max_pixels}; "
            "lower the camera resolution or raise the limit",
        )


def raw_to_rgb(
    height: int,
    width: int,
    encoding: str,
    is_bigendian: int | bool,
    step: int,
    data: Any,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Convert the fields of a `sensor_msgs/Image` into a new uint8 RGB array of shape (height, width, 3).

    Handles row padding (`step` larger than a packed row) and big-endian 16-bit data; 16-bit channels
    are scaled to 8 bit by keeping the high byte. Raises ImageConversionError for images larger than
    `max_pixels` (checked from the fields, before any allocation), depth images, unsupported encodings,
    and data or step that do not fit the size.
    """
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise ImageConversionError("empty", f"empty image: {width}x{height}")
    _check_pixels(width, height, max_pixels, f"image ({encoding})")
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
            "bad_layout",
            f"step {step} is smaller than width*bytes_per_pixel = {width}*{bytes_per_pixel} = {row_bytes} "
            f"for {encoding} {width}x{height}",
        )
    needed = step * (height - 1) + row_bytes  # the last row may lack its padding
    flat = np.frombuffer(buffer, dtype=np.uint8)
    if flat.size < needed:
        raise ImageConversionError(
            "truncated",
            f"truncated image data: {flat.size} bytes for {encoding} {width}x{height} with step {step} "
            f"(needs {step * height})",
        )
    if flat.size > step * height:
        # More data than the header declares: width, height or step are wrong, so rows would be misread.
        raise ImageConversionError(
            "bad_layout",
            f"{flat.size} bytes of image data for {encoding} {width}x{height} with step {step}, which needs "
            f"{step * height}: height, width or step is wrong",
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
        raise ImageConversionError("bad_layout", f"{encoding} needs an even width, got {width}")
    quads = rows.reshape(rows.shape[0], width // 2, 4).astype(np.float32)
    y0, u, y1, v = (quads[:, :, i] for i in offsets)
    y = np.stack([y0, y1], axis=2).reshape(rows.shape[0], width) - 16.0
    u = np.repeat(u, 2, axis=1) - 128.0
    v = np.repeat(v, 2, axis=1) - 128.0
    r = 1.164 * y + 1.596 * v
    g = 1.164 * y - 0.392 * u - 0.813 * v
    b = 1.164 * y + 2.017 * u
    return np.clip(np.stack([r, g, b], axis=2) + 0.5, 0, 255).astype(np.uint8)


def compressed_to_rgb(format: str, data: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode the fields of a `sensor_msgs/CompressedImage` (jpeg or png) into uint8 RGB (H, W, 3).

    `format` is the image_transport string (e.g. "jpeg", "rgb8; jpeg compressed bgr8"); the codec is
    detected from the bytes, so only compressedDepth is rejected by name. The size declared in the
    JPEG / PNG header is checked against `max_pixels` before decoding; corrupt data is an error, not a
    garbage image (see the module docstring). Raises ImageConversionError for depth, too large, corrupt,
    undecodable or empty data.
    """
    if "compresseddepth" in str(format).lower().replace(" ", ""):
        raise ImageConversionError(
            "depth", f"compressedDepth image ({format!r}): point image_topic at a color camera"
        )
    raw = bytes(data)
    if not raw:
        raise ImageConversionError("empty", f"empty CompressedImage data (format {format!r})")
    if raw.startswith(_JPEG_MAGIC):
        return _decode_jpeg(raw, format, max_pixels)
    if raw.startswith(_PNG_MAGIC):
        return _decode_png(raw, format, max_pixels)
    raise _not_jpeg_or_png(raw, format)


def _decode_failed(raw: bytes, format: str, err: BaseException) -> ImageConversionError:
    return ImageConversionError(
        "decode_failed", f"cannot decode CompressedImage (format {format!r}, {len(raw)} bytes): {err}"
    )


def _decode_jpeg(raw: bytes, format: str, max_pixels: int) -> np.ndarray:
    import simplejpeg  # libjpeg-turbo; only where compressed images are used

    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(raw)
    except ValueError as err:
        raise _decode_failed(raw, format, err) from err
    if height <= 0 or width <= 0:
        raise ImageConversionError("empty", f"empty JPEG: {width}x{height} (format {format!r})")
    _check_pixels(width, height, max_pixels, "JPEG header")
    if colorspace in ("CMYK", "YCCK"):
        raise ImageConversionError(
            "unsupported_format", f"{colorspace} JPEG (format {format!r}): publish an RGB or grey JPEG"
        )
    try:
        # strict: libjpeg's recoverable "corrupt data" / "premature end" warnings raise instead of
        # returning an image patched with grey.
        return simplejpeg.decode_jpeg(raw, colorspace="RGB", strict=True)
    except ValueError as err:
        raise _decode_failed(raw, format, err) from err


def _decode_png(raw: bytes, format: str, max_pixels: int) -> np.ndarray:
    from PIL import Image as PILImage  # PIL only where compressed images are used

    try:
        with PILImage.open(io.BytesIO(raw), formats=("PNG",)) as image:  # reads the header chunks only
            width, height = image.size
            _check_pixels(width, height, max_pixels, "PNG header")
            image.verify()  # the CRC-32 of every chunk, without decoding
        with PILImage.open(io.BytesIO(raw), formats=("PNG",)) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit grey png: keep the high byte, as for raw mono16.
                grey = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except ImageConversionError:
        raise
    except PILImage.DecompressionBombError as err:  # PIL's own limit (at open), far above DEFAULT_MAX_PIXELS
        width, height = struct.unpack(">II", raw[16:24])  # IHDR is the first chunk: PIL has just read it
        raise ImageConversionError(
            "too_large", f"PNG header declares {width}x{height} = {width * height} pixels, more than PIL's "
            f"decompression-bomb limit ({err})"
        ) from err
    except MemoryError as err:  # within max_pixels, but the process has not got the memory for it now
        raise ImageConversionError(
            "too_large", f"not enough memory to decode this {format} image ({len(raw)} bytes)") from err
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, zlib.error ... on bad data
        raise _decode_failed(raw, format, err) from err


def _not_jpeg_or_png(raw: bytes, format: str) -> ImageConversionError:
    """unsupported_format when PIL recognises another image format, else decode_failed."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(raw)) as image:  # the header only: names the format
            name = image.format
    except Exception as err:  # garbage: PIL cannot even tell a format
        return _decode_failed(raw, format, err)
    return ImageConversionError(
        "unsupported_format",
        f"unsupported compressed format {name} (format field {format!r}); "
        f"supported: {', '.join(SUPPORTED_COMPRESSED_FORMATS)}",
    )


def image_msg_to_rgb(msg: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`sensor_msgs/Image` (any object with its fields) -> uint8 RGB (H, W, 3)."""
    return raw_to_rgb(msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step, msg.data, max_pixels)


def compressed_msg_to_rgb(msg: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`sensor_msgs/CompressedImage` (any object with its fields) -> uint8 RGB (H, W, 3)."""
    return compressed_to_rgb(msg.format, msg.data, max_pixels)
