"""The reward node's health: counters of everything that went wrong or right, and the /diagnostics verdict.

Pure Python + numpy (no rclpy): the node records events here from its callbacks and worker, and turns a
``HealthInputs`` snapshot into (level, message, key/values) once per diagnostics period. The rules, in
order of severity:

* ERROR: configure failed; a model error in the last 10 s; recording failing (until it works again).
* WARN: no frames for ``no_frame_warning_s`` (with a hint that tells a reliability mismatch from large
  best-effort frames that never arrive, from a reliable camera that sends nothing, and from no publisher
  at all); no instruction; bad images, rejected
  instructions or callback errors since the previous report; a trigger call that timed out in the last
  10 s; frames not admitted because camera stamps repeat, go back or jump; waiting for /clock (sim time
  not advancing).
* OK: "scoring at N Hz".
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OK, WARN, ERROR = b"\x00", b"\x01", b"\x02"  # DiagnosticStatus levels
_RECENT_S = 10.0


@dataclass
class CameraGraph:
    """What the ROS graph says about the camera topic (for the no-frames hint).

    Attributes:
        topic: the resolved camera topic.
        publishers: publishers on it now.
        best_effort_publishers: how many of them are best effort.
        subscriber_reliable: the node subscribes reliable (camera_qos reliable).
        incompatible_qos_events: incompatible-QoS events the subscription reported so far.
    """

    topic: str
    publishers: int = 0
    best_effort_publishers: int = 0
    subscriber_reliable: bool = False
    incompatible_qos_events: int = 0


@dataclass
class HealthInputs:
    """The node's state at one diagnostics report (besides what NodeHealth counted itself)."""

    lifecycle_state: str
    configure_error: str = ""
    values: dict[str, Any] = field(default_factory=dict)  # identity: bundle, backend, topics, episode ...
    session_counters: dict[str, int] = field(default_factory=dict)
    has_episode: bool = False
    no_frame_warning_s: float = 2.0
    camera: CameraGraph | None = None
    recorder_values: dict[str, Any] = field(default_factory=dict)
    recorder_error: str = ""  # non-empty while recording does not work
    waiting_for_clock: bool = False


class NodeHealth:
    """Counters and recent timings of one node; thread-safe (callbacks and the worker both record)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.bad_images: collections.Counter[str] = collections.Counter()
        self.callback_errors: collections.Counter[str] = collections.Counter()
        self.trigger: collections.Counter[str] = collections.Counter()
        self.instructions_rejected = 0
        self.model_errors = 0
        self.last_bad_image = ""
        self.last_callback_error = ""
        self.last_rejected_instruction = ""
        self.last_model_error = ""
        self.last_trigger_problem = ""
        self._last_frame: float | None = None
        self._model_error_at: float | None = None
        self._trigger_timeout_at: float | None = None
        self._callback_ms: collections.deque[float] = collections.deque(maxlen=500)
        self._step_times: collections.deque[float] = collections.deque(maxlen=200)
        self._inference_ms: collections.deque[float] = collections.deque(maxlen=200)
        self._stamp_age_ms: collections.deque[float] = collections.deque(maxlen=200)
        self._seen: dict[str, int] = {}  # totals at the previous report, for "since the last report"

    # ------------------------------------------------------------------ recording events
    def frame_arrived(self, callback_seconds: float) -> None:
        """A camera message was handled (whatever became of it) in ``callback_seconds``."""
        with self._lock:
            self._last_frame = self._clock()
            self._callback_ms.append(callback_seconds * 1e3)

    def bad_image(self, reason: str, detail: str) -> int:
        """A camera message could not be used; returns the count of that reason so far."""
        with self._lock:
            self.bad_images[reason] += 1
            self.last_bad_image = detail
            return self.bad_images[reason]

    def callback_error(self, callback: str, detail: str) -> int:
        """A callback raised (and was kept alive); returns the count for that callback so far."""
        with self._lock:
            self.callback_errors[callback] += 1
            self.last_callback_error = f"{callback}: {detail}"
            return self.callback_errors[callback]

    def instruction_rejected(self, detail: str) -> None:
        """An instruction was refused on arrival."""
        with self._lock:
            self.instructions_rejected += 1
            self.last_rejected_instruction = detail

    def model_error(self, detail: str) -> None:
        """A scoring step produced no usable scores."""
        with self._lock:
            self.model_errors += 1
            self.last_model_error = detail
            self._model_error_at = self._clock()

    def step(self, inference_seconds: float, stamp_age_ms: float) -> None:
        """A scoring step was published."""
        with self._lock:
            self._step_times.append(self._clock())
            self._inference_ms.append(inference_seconds * 1e3)
            self._stamp_age_ms.append(stamp_age_ms)

    def trigger_event(self, what: str, detail: str = "") -> None:
        """A trigger call event: called, succeeded, refused, failed, unavailable, timeout, skipped_in_flight."""
        with self._lock:
            self.trigger[what] += 1
            if what in ("failed", "unavailable", "timeout", "refused"):
                self.last_trigger_problem = f"{what}: {detail}" if detail else what
            if what == "timeout":
                self._trigger_timeout_at = self._clock()

    # ------------------------------------------------------------------ the report
    def seconds_since_last_frame(self) -> float | None:
        """Wall seconds since the last camera message, None if none arrived."""
        with self._lock:
            return None if self._last_frame is None else self._clock() - self._last_frame

    def report(self, inputs: HealthInputs) -> tuple[bytes, str, dict[str, Any]]:
        """(level, message, key/values) of the node's health now."""
        now = self._clock()
        with self._lock:
            values: dict[str, Any] = {"state": inputs.lifecycle_state, **inputs.values, **inputs.session_counters}
            values["bad_images"] = sum(self.bad_images.values())
            values.update({f"bad_images.{k}": v for k, v in sorted(self.bad_images.items())})
            values["callback_errors"] = sum(self.callback_errors.values())
            values.update({f"callback_errors.{k}": v for k, v in sorted(self.callback_errors.items())})
            values["instructions_rejected"] = self.instructions_rejected
            values["model_errors"] = self.model_errors
            values.update({f"trigger.{k}": v for k, v in sorted(self.trigger.items())})
            recent = [t for t in self._step_times if now - t <= _RECENT_S]
            inference, ages, callback = list(self._inference_ms), list(self._stamp_age_ms), list(self._callback_ms)
            since = None if self._last_frame is None else now - self._last_frame
            model_error_recent = self._model_error_at is not None and now - self._model_error_at < _RECENT_S
            trigger_timeout_recent = (self._trigger_timeout_at is not None
                                      and now - self._trigger_timeout_at < _RECENT_S)
            fresh = {key: self._fresh(key, total) for key, total in (
                ("bad_images", values["bad_images"]), ("callback_errors", values["callback_errors"]),
                ("instructions_rejected", self.instructions_rejected),
                ("stamp_drops", sum(int(inputs.session_counters.get(f"frames_dropped.{r}", 0))
                                    for r in ("duplicate_stamp", "out_of_order", "stamp_jump", "bad_stamp"))),
                ("admitted", int(inputs.session_counters.get("frames_admitted", 0))),
            )}
            texts = {"last_bad_image": self.last_bad_image, "last_callback_error": self.last_callback_error,
                     "last_rejected_instruction": self.last_rejected_instruction,
                     "last_model_error": self.last_model_error, "last_trigger_problem": self.last_trigger_problem}
        window = min(_RECENT_S, max(now - recent[0], 1e-3)) if len(recent) > 1 else _RECENT_S
        values["scoring_rate_hz"] = f"{(len(recent) - 1) / window:.2f}" if len(recent) > 1 else "0.00"
        for name, series in (("inference_ms", inference), ("stamp_age_ms", ages)):
            if series:
                values[f"{name}.median"] = f"{np.median(series):.1f}"
                values[f"{name}.p95"] = f"{np.percentile(series, 95):.1f}"
        if callback:
            values["image_callback_ms.median"] = f"{np.median(callback):.2f}"
            values["image_callback_ms.p99"] = f"{np.percentile(callback, 99):.2f}"
        values["seconds_since_last_frame"] = "never" if since is None else f"{since:.2f}"
        values.update({k: v for k, v in texts.items() if v})
        values.update(inputs.recorder_values)

        if inputs.configure_error:
            return ERROR, f"configure failed: {inputs.configure_error}", values
        if inputs.lifecycle_state != "active":
            return OK, inputs.lifecycle_state, values
        errors: list[str] = []
        warnings: list[str] = []
        if model_error_recent:
            errors.append(f"model error: {texts['last_model_error']}")
        if inputs.recorder_error:
            errors.append(f"recording failed: {inputs.recorder_error}")
        if inputs.waiting_for_clock:
            warnings.append("waiting for /clock: use_sim_time is true and simulation time is not advancing")
        if since is None or since > inputs.no_frame_warning_s:
            warnings.append(no_frames_hint(inputs.camera))
        if not inputs.has_episode:
            warnings.append("no instruction: publish one on instruction_topic or set the instruction parameter")
        if fresh["bad_images"]:
            warnings.append(f"bad images: {texts['last_bad_image']}")
        if fresh["instructions_rejected"]:
            warnings.append(f"instruction rejected: {texts['last_rejected_instruction']}")
        if fresh["callback_errors"]:
            warnings.append(f"callback error: {texts['last_callback_error']}")
        if trigger_timeout_recent:
            warnings.append(f"trigger service did not answer: {texts['last_trigger_problem']}")
        if fresh["stamp_drops"] and not fresh["admitted"]:
            warnings.append(
                "frames not admitted: camera stamps repeat, go back or jump (header.stamp); check the camera "
                "driver's clock"
            )
        if errors:
            return ERROR, "; ".join(errors + warnings), values
        if warnings:
            return WARN, "; ".join(warnings), values
        return OK, f"scoring at {values['scoring_rate_hz']} Hz", values

    def _fresh(self, key: str, total: int) -> int:
        """How much ``total`` grew since the previous report (lock held)."""
        grown = total - self._seen.get(key, 0)
        self._seen[key] = total
        return grown


def no_frames_hint(camera: CameraGraph | None) -> str:
    """Why no frame arrives, from what the graph says about the camera topic."""
    if camera is None:
        return "no frames"
    topic = camera.topic
    if camera.publishers == 0:
        return f"no frames: nobody publishes {topic} (check image_topic and image_transport)"
    if camera.incompatible_qos_events or (camera.subscriber_reliable and camera.best_effort_publishers):
        return (f"no frames: the camera on {topic} is best effort and camera_qos is reliable (a reliability "
                "mismatch): set camera_qos sensor_data")
    if camera.subscriber_reliable:
        # Every publisher matched reliable (a best-effort one is the mismatch above): DDS retransmits large
        # samples on a reliable connection, so frames that never arrive were never sent.
        return (f"no frames although {camera.publishers} reliable publisher(s) on {topic} match: the camera "
                f"publishes nothing (check it is streaming: ros2 topic hz {topic})")
    return (f"no frames although {camera.publishers} publisher(s) on {topic} match: frames larger than Fast DDS's "
            "shared-memory segment (the SHM transport's segment_size, 512 KB by default) are dropped on a "
            "best-effort connection, or the camera publishes nothing; give every process of the graph "
            "FASTDDS_DEFAULT_PROFILES_FILE=<robometer_ros share>/config/fastdds_large_frames.xml (segment_size "
            "32 MB) or use image_transport compressed")
