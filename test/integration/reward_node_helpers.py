"""Helpers for the reward node integration tests: camera frames, QoS profiles, node start arguments."""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from builtin_interfaces.msg import Time
from PIL import Image as PILImage
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

NODE = "/reward_node"
SCRIPTED_NODE_MODULE = "support.scripted_engine"
CAMERA_FRAME = "wrist_camera_optical"
LATCHED = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
LATCHED_ONE = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
RELIABLE = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
SENSOR = qos_profile_sensor_data


def node_args(bundle: Path | str, **params: object) -> list[str]:
    """`--ros-args` list for the reward node: test topics, every frame admitted, plus `params`."""
    base: dict[str, object] = {
        "bundle": str(bundle),
        "image_topic": "/camera/image",
        "instruction_topic": "/task",
        "frame_rate": 0.0,
        "diagnostics_period": 0.2,
    }
    base.update(params)
    args: list[str] = []
    for key, value in base.items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, str) and value == "":
            value = "''"
        args += ["-p", f"{key}:={value}"]
    return args


def publish_instruction(probe, text: str, topic: str = "/task", node: str = NODE):
    """Publish a latched instruction and wait until the node started its episode (so no frame is early)."""
    from std_msgs.msg import String

    from robometer_ros.msg import EpisodeStatus

    statuses = probe.subscribe(f"{node}/episode", EpisodeStatus, LATCHED)
    pub = probe.publisher(topic, String, LATCHED_ONE)
    pub.publish(String(data=text))
    statuses.wait_for(1, timeout=20, predicate=lambda s: s.instruction == text)
    return pub


def colour_frame(progress: float, success: float = 0.0, blue: int = 0, h: int = 48, w: int = 64) -> np.ndarray:
    """A flat RGB frame the scripted engine scores as (progress, success)."""
    frame = np.empty((h, w, 3), dtype=np.uint8)
    frame[..., 0] = round(progress * 255)
    frame[..., 1] = round(success * 255)
    frame[..., 2] = blue
    return frame


def stamp(ns: int) -> Time:
    """Nanoseconds -> builtin_interfaces/Time."""
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def stamp_ns(t: Time) -> int:
    """builtin_interfaces/Time -> nanoseconds."""
    return t.sec * 1_000_000_000 + t.nanosec


def raw_image(rgb: np.ndarray, encoding: str, t_ns: int, frame_id: str = CAMERA_FRAME, pad: int = 0) -> Image:
    """A sensor_msgs/Image holding `rgb` in `encoding` (rgb8, bgr8, rgba8, bgra8, mono8), rows padded by `pad`."""
    if encoding == "rgb8":
        pixels = rgb
    elif encoding == "bgr8":
        pixels = rgb[:, :, ::-1]
    elif encoding == "rgba8":
        pixels = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=2)
    elif encoding == "bgra8":
        pixels = np.concatenate([rgb[:, :, ::-1], np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=2)
    elif encoding == "mono8":
        pixels = rgb[:, :, :1]
    else:
        raise ValueError(encoding)
    h, w, c = pixels.shape
    rows = np.ascontiguousarray(pixels).reshape(h, w * c)
    if pad:
        rows = np.concatenate([rows, np.zeros((h, pad), np.uint8)], axis=1)
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=w * c + pad)
    msg.data = rows.tobytes()
    msg.header.stamp = stamp(t_ns)
    msg.header.frame_id = frame_id
    return msg


def compressed_image(rgb: np.ndarray, fmt: str, t_ns: int, frame_id: str = CAMERA_FRAME) -> CompressedImage:
    """A sensor_msgs/CompressedImage (jpeg or png) of `rgb`."""
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="JPEG" if fmt == "jpeg" else "PNG", quality=95)
    msg = CompressedImage(format=fmt)
    msg.data = buf.getvalue()
    msg.header.stamp = stamp(t_ns)
    msg.header.frame_id = frame_id
    return msg


@dataclass
class SentFrame:
    """A frame the test published and what the scripted engine will score it as."""

    t_ns: int
    progress: float
    success: float
    encoding: str


class Camera:
    """Publishes frames at a fixed rate with monotonically increasing camera stamps."""

    def __init__(self, publisher, rate_hz: float = 30.0, start_ns: int = 1_700_000_000_000_000_000) -> None:
        self.publisher = publisher
        self.period_s = 1.0 / rate_hz
        self.next_ns = start_ns
        self.sent: list[SentFrame] = []

    def publish(self, msgs: Iterable[tuple[object, SentFrame | None]]) -> None:
        """Publish (message, record) pairs at the camera rate."""
        next_time = time.monotonic()
        for msg, record in msgs:
            self.publisher.publish(msg)
            if record is not None:
                self.sent.append(record)
            next_time += self.period_s
            delay = next_time - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the camera's frame period, not a wait for the node

    def stamps(self) -> Sequence[int]:
        """Stamps of the recorded frames."""
        return [f.t_ns for f in self.sent]

    def take_stamp(self) -> int:
        """The next frame's stamp (33 ms apart at 30 Hz)."""
        t = self.next_ns
        self.next_ns += int(self.period_s * 1e9)
        return t
