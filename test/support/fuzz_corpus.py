"""A seeded fuzz corpus of camera and instruction messages, and the hostile image files it is made of.

ROS-free: every message is a plain description (`FuzzMessage`: a kind and the message's fields), so the
unit tests use the image builders here directly and the node fuzz test (test/integration/test_fuzz_node.py)
turns the fields into rclpy messages. `corpus(seed)` always holds the hand-picked hostile cases (size bombs,
a PNG declaring 20000x20000 pixels in 100 bytes, an 8000x8000 zero PNG, truncated and byte-flipped real
JPEG / PNG files, depth and odd encodings, empty data, negative and far-future stamps, 100 KB and odd
unicode instructions) plus `random_count` random ones drawn from `seed`.

Every field value fits its ROS type (uint32 sizes, int32 seconds, ...), so rclpy can publish each message:
what is hostile is the combination, not the type. Byte-level mutations of whole serialized messages (which
rclpy would refuse to build from fields) come from `mutate_serialized`.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

UINT32_MAX = 2**32 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
GOOD_SEC = 1_700_000_000  # a sane camera stamp (2023)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class FuzzMessage:
    """One corpus entry.

    Attributes:
        kind: "image" (sensor_msgs/Image), "compressed" (sensor_msgs/CompressedImage) or "string"
            (std_msgs/String).
        label: what the case is, e.g. "png_header_20000x20000" (stable across seeds for the fixed cases).
        fields: the message fields: image: height, width, encoding, is_bigendian, step, data (bytes);
            compressed: format, data (bytes); string: data (str). Images also carry stamp_sec,
            stamp_nanosec and frame_id (the header).
        hostile_stamp: the header stamp itself is the attack (negative, far future, nanosec overflow, zero).
    """

    kind: str
    label: str
    fields: dict[str, Any] = field(default_factory=dict)
    hostile_stamp: bool = False


# ---------------------------------------------------------------------------------------- image files
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, *, colour_type: int = 2, bit_depth: int = 8, fill: int = 0,
              with_pixels: bool = True) -> bytes:
    """A valid PNG of `width` x `height` pixels of one byte value, built row by row (never the whole image
    in memory: an 8000x8000 zero PNG is 62 KB and costs a few KB to make). `with_pixels=False` writes the
    header chunks and an empty IDAT only: a ~70-byte file declaring any size."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    out = [PNG_SIGNATURE, _png_chunk(b"IHDR", header)]
    if with_pixels:
        compressor = zlib.compressobj(9)
        row = b"\x00" + bytes([fill]) * (width * channels * bit_depth // 8)  # filter 0 + the row
        parts = [compressor.compress(row) for _ in range(height)]
        parts.append(compressor.flush())
        out.append(_png_chunk(b"IDAT", b"".join(parts)))
    else:
        out.append(_png_chunk(b"IDAT", b""))
    out.append(_png_chunk(b"IEND", b""))
    return b"".join(out)


def scene(height: int = 120, width: int = 160, seed: int = 0) -> np.ndarray:
    """A camera-like RGB frame (gradients, blocks, sensor noise): real texture for a JPEG to code."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frame = np.stack([x / width * 200, y / height * 180, (x + y) / (width + height) * 120], axis=2) + 30
    for _ in range(6):
        top, left = rng.integers(0, height - 10), rng.integers(0, width - 10)
        frame[top:top + rng.integers(8, 40), left:left + rng.integers(8, 50)] = rng.integers(0, 256, 3)
    frame += rng.normal(0, 6, frame.shape)
    return np.clip(frame, 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """`rgb` as a JPEG ("jpeg") or PNG ("png") file made by PIL."""
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="JPEG" if fmt == "jpeg" else "PNG", quality=quality)
    return buf.getvalue()


def jpeg_with_declared_size(jpeg: bytes, width: int, height: int) -> bytes:
    """`jpeg` with its SOF header patched to declare `width` x `height` (uint16 each); the data stays."""
    data = bytearray(jpeg)
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError("not a JPEG marker segment")
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):  # SOF0 / SOF1 / SOF2: precision, height, width
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise ValueError("no SOF segment")


def entropy_start(data: bytes) -> int:
    """Where a JPEG's entropy-coded data starts (after the SOS header), or a PNG's first IDAT payload."""
    if data.startswith(PNG_SIGNATURE):
        return data.index(b"IDAT") + 4
    sos = data.index(b"\xff\xda")
    return sos + 2 + struct.unpack(">H", data[sos + 2:sos + 4])[0]


def flip_bytes(data: bytes, count: int, rng: np.random.Generator, start: int = 0) -> bytes:
    """`data` with `count` bytes in [start, len - 2) XORed with a random non-zero value (the end marker
    stays, so the damage is inside the file, not a truncation)."""
    out = bytearray(data)
    for position in rng.integers(start, len(out) - 2, count):
        out[position] ^= int(rng.integers(1, 256))
    return bytes(out)


def mutate_serialized(blob: bytes, rng: np.random.Generator, flips: int = 8) -> bytes:
    """A serialized (CDR) message with `flips` random bytes changed after the 4-byte encapsulation header:
    length fields and strings go wrong, which the node's middleware must reject or deliver."""
    if len(blob) <= 8:
        return blob
    return flip_bytes(blob, flips, rng, start=4)


# ---------------------------------------------------------------------------------------------- corpus
def _image(label: str, height: int, width: int, encoding: str, step: int, data: bytes, *,
           is_bigendian: int = 0, sec: int = GOOD_SEC, nanosec: int = 0, hostile_stamp: bool = False,
           frame_id: str = "fuzz_camera_optical") -> FuzzMessage:
    return FuzzMessage("image", label, {
        "height": height, "width": width, "encoding": encoding, "is_bigendian": is_bigendian, "step": step,
        "data": data, "stamp_sec": sec, "stamp_nanosec": nanosec, "frame_id": frame_id,
    }, hostile_stamp)


def _compressed(label: str, fmt: str, data: bytes, *, sec: int = GOOD_SEC, nanosec: int = 0,
                hostile_stamp: bool = False) -> FuzzMessage:
    return FuzzMessage("compressed", label, {
        "format": fmt, "data": data, "stamp_sec": sec, "stamp_nanosec": nanosec, "frame_id": "fuzz_camera_optical",
    }, hostile_stamp)


def _string(label: str, text: str) -> FuzzMessage:
    return FuzzMessage("string", label, {"data": text})


HOSTILE_STAMPS: tuple[tuple[str, int, int], ...] = (
    ("stamp_negative", -5, 0),
    ("stamp_int32_min", INT32_MIN, 0),
    ("stamp_far_future", INT32_MAX, 999_999_999),
    ("stamp_nanosec_overflow", GOOD_SEC, UINT32_MAX),
    ("stamp_zero", 0, 0),
    ("stamp_a_year_ahead", GOOD_SEC + 365 * 86_400, 0),
)


def fixed_cases() -> list[FuzzMessage]:
    """The hand-picked hostile cases (the same for every seed)."""
    rng = np.random.default_rng(1234)
    frame = scene()
    h, w = frame.shape[:2]
    rgb = frame.tobytes()
    jpeg, png = encode(frame, "jpeg"), encode(frame, "png")
    cases = [
        # raw size bombs and layouts that do not fit
        _image("raw_declares_20000x20000", 20000, 20000, "rgb8", 60000, b"\x00" * 16),
        _image("raw_declares_uint32_max", UINT32_MAX, UINT32_MAX, "rgb8", UINT32_MAX, b"\x00" * 16),
        _image("raw_zero_size", 0, 0, "rgb8", 0, b""),
        _image("raw_zero_width", h, 0, "rgb8", 0, rgb),
        _image("raw_empty_data", h, w, "rgb8", w * 3, b""),
        _image("raw_truncated", h, w, "rgb8", w * 3, rgb[: len(rgb) // 2]),
        _image("raw_data_longer_than_declared", h // 2, w, "rgb8", w * 3, rgb),
        _image("raw_step_zero", h, w, "rgb8", 0, rgb),
        _image("raw_step_huge", h, w, "rgb8", UINT32_MAX, rgb),
        _image("raw_yuv422_odd_width", h, w - 1, "yuv422", (w - 1) * 2, bytes(h * (w - 1) * 2)),
        _image("raw_depth_16UC1", h, w, "16UC1", w * 2, bytes(h * w * 2)),
        _image("raw_depth_32FC1", h, w, "32FC1", w * 4, bytes(h * w * 4)),
        _image("raw_encoding_empty", h, w, "", w * 3, rgb),
        _image("raw_encoding_bayer", h, w, "bayer_rggb8", w, bytes(h * w)),
        _image("raw_encoding_upper_case", h, w, "RGB8", w * 3, rgb),
        _image("raw_encoding_2kb", h, w, "rgb8" * 512, w * 3, rgb),
        _image("raw_encoding_unicode", h, w, "rgb8\u202e\u00e9", w * 3, rgb),
        _image("raw_mono16_bigendian", h, w, "mono16", w * 2, bytes(h * w * 2), is_bigendian=1),
        _image("raw_random_bytes", h, w, "bgr8", w * 3, rng.integers(0, 256, h * w * 3, dtype=np.uint8).tobytes()),
        # compressed size bombs
        _compressed("png_header_20000x20000", "png", png_bytes(20000, 20000, with_pixels=False)),
        _compressed("png_zeros_8000x8000", "png", png_bytes(8000, 8000, colour_type=0)),
        _compressed("png_header_uint31_max", "png", png_bytes(2**31 - 1, 2**31 - 1, with_pixels=False)),
        _compressed("jpeg_declares_60000x60000", "jpeg", jpeg_with_declared_size(jpeg, 60000, 60000)),
        # corrupt compressed data
        _compressed("compressed_empty", "jpeg", b""),
        _compressed("compressed_random_bytes", "jpeg", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        _compressed("jpeg_magic_then_garbage", "jpeg", b"\xff\xd8\xff" + rng.bytes(500)),
        _compressed("png_magic_then_garbage", "png", PNG_SIGNATURE + rng.bytes(500)),
        _compressed("jpeg_truncated_half", "jpeg", jpeg[: len(jpeg) // 2]),
        _compressed("jpeg_truncated_header", "jpeg", jpeg[:40]),
        _compressed("png_truncated_half", "png", png[: len(png) // 2]),
        _compressed("jpeg_40_flipped_bytes", "jpeg", flip_bytes(jpeg, 40, rng, entropy_start(jpeg))),
        _compressed("png_1_flipped_byte", "png", flip_bytes(png, 1, rng, entropy_start(png))),
        _compressed("png_4_flipped_bytes", "png", flip_bytes(png, 4, rng, entropy_start(png))),
        _compressed("compressed_depth", "16UC1; compressedDepth png", png),
        _compressed("bmp", "bmp", _bmp(frame)),
        _compressed("format_field_lies", "png", jpeg),  # a valid JPEG under a png format string: decodes
    ]
    # a valid frame under each hostile stamp (the stamp is the attack)
    for label, sec, nanosec in HOSTILE_STAMPS:
        cases.append(_image(f"raw_{label}", h, w, "rgb8", w * 3, rgb, sec=sec, nanosec=nanosec, hostile_stamp=True))
        cases.append(_compressed(f"jpeg_{label}", "jpeg", jpeg, sec=sec, nanosec=nanosec, hostile_stamp=True))
    cases += [
        _string("string_100kb", "pick up the cup " * 6400),
        _string("string_1mb_one_word", "x" * 1_000_000),
        _string("string_empty", ""),
        _string("string_whitespace", " \t\n\r " * 10),
        _string("string_controls", "".join(chr(c) for c in range(1, 32)) + "open the drawer"),
        _string("string_rtl_override", "\u202eopen the drawer\u202c"),
        _string("string_emoji_combining", "put \U0001f964 in the sink" + "\u0301" * 200),
        _string("string_surrogate_range_chars", "\ufffd\ufffe\uffff\U0010ffff"),
        _string("string_nul_inside", "open\x00the drawer"),
    ]
    return cases


def _bmp(rgb: np.ndarray) -> bytes:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="BMP")
    return buf.getvalue()


def random_case(rng: np.random.Generator, index: int) -> FuzzMessage:
    """One random message: random fields, random bytes, and mutated real JPEG / PNG files."""
    kind = rng.choice(["image", "compressed", "string"], p=[0.45, 0.4, 0.15])
    label = f"random_{index:04d}_{kind}"
    if kind == "string":
        length = int(rng.choice([0, 1, 10, 100, 10_000]))
        codepoints = rng.integers(1, 0xD7FF, length)  # below the surrogate range: always encodable
        return _string(label, "".join(map(chr, codepoints)))
    sec = int(rng.choice([GOOD_SEC, GOOD_SEC, GOOD_SEC, rng.integers(INT32_MIN, INT32_MAX)]))
    nanosec = int(rng.integers(0, 1_000_000_000)) if rng.random() < 0.9 else int(rng.integers(0, UINT32_MAX))
    if kind == "image":
        height = int(rng.choice([rng.integers(0, 64), rng.integers(0, UINT32_MAX)], p=[0.8, 0.2]))
        width = int(rng.choice([rng.integers(0, 64), rng.integers(0, UINT32_MAX)], p=[0.8, 0.2]))
        encoding = str(rng.choice(["rgb8", "bgr8", "rgba8", "mono8", "mono16", "yuv422", "16UC1", "rgb16",
                                   "bayer_grbg8", "8UC3", "", "jpeg"]))
        step = int(rng.choice([width * 3, width, 0, rng.integers(0, 10_000), UINT32_MAX]))
        size = int(rng.choice([0, height * step if height * step < 200_000 else 10, rng.integers(0, 50_000)]))
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        return _image(label, height, width, encoding, step, data, is_bigendian=int(rng.integers(0, 256)),
                      sec=sec, nanosec=nanosec, hostile_stamp=sec != GOOD_SEC or nanosec >= 1_000_000_000)
    frame = scene(seed=index)
    base = encode(frame, str(rng.choice(["jpeg", "png"])))
    mutation = rng.choice(["flip", "truncate", "random", "flip_header"])
    if mutation == "flip":
        data = flip_bytes(base, int(rng.choice([1, 4, 40])), rng, entropy_start(base))
    elif mutation == "truncate":
        data = base[: int(rng.integers(0, len(base)))]
    elif mutation == "flip_header":
        data = flip_bytes(base, int(rng.integers(1, 4)), rng, 2)
    else:
        data = rng.integers(0, 256, int(rng.integers(0, 20_000)), dtype=np.uint8).tobytes()
    fmt = str(rng.choice(["jpeg", "png", "", "rgb8; jpeg compressed bgr8", "\u00e9" * 50]))
    return _compressed(label, fmt, data, sec=sec, nanosec=nanosec,
                       hostile_stamp=sec != GOOD_SEC or nanosec >= 1_000_000_000)


def corpus(seed: int = 0, random_count: int = 150) -> list[FuzzMessage]:
    """The fixed hostile cases plus `random_count` random ones drawn from `seed` (deterministic)."""
    rng = np.random.default_rng(seed)
    return fixed_cases() + [random_case(rng, i) for i in range(random_count)]
