"""A process that records episodes with the real EpisodeRecorder, for the fault-injection tests (SIGKILL,
full disk, read-only directory): `python -m support.recording_child SCENARIO_JSON`.

The scenario (JSON): {"directory": DIR, "flush_s": 1.0, "min_free_mb": 0, "rate_hz": 30, "frame_bytes":
9216, "fsize_limit": null, "episodes": [{"id": "ep-0", "frames": 10, "end": true}, ...], "then": "exit" |
"hang"}. `fsize_limit` sets RLIMIT_FSIZE (SIGXFSZ ignored), so writes past that many bytes per file fail
with EFBIG: a full-disk stand-in that needs no privileges.

Prints one line per event, flushed at once, so the parent knows what was handed to the recorder and when
(time.monotonic(), the same clock in both processes):
    recorded EPISODE INDEX T          a frame handed to record_image
    error TEXT                         the recorder's on_error
    status EPISODE JSON                the recorder's status() after an episode ended (or began, if not ended)
    waiting                            "then": "hang": all done, sleeping until killed
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import signal
import sys
import threading
import time

import numpy as np

from robometer_ros.recorder import EpisodeRecorder, RecordTopics, make_typestore

T0 = 1_700_000_000 * 10**9


_SAY = threading.Lock()


def say(*words: object) -> None:
    """One whole line at a time: on_error speaks from the recorder's writer thread, and print() of several
    words from two threads can interleave them."""
    line = " ".join(str(w) for w in words) + "\n"
    with _SAY:
        sys.stdout.write(line)
        sys.stdout.flush()


def status_json(recorder: EpisodeRecorder) -> str:
    status = dataclasses.asdict(recorder.status())
    status["free_mb"] = None if math.isnan(status["free_mb"]) else status["free_mb"]
    return json.dumps(status)


def main() -> None:
    scenario = json.loads(sys.argv[1])
    if scenario.get("fsize_limit"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a kill
        limit = int(scenario["fsize_limit"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    store = make_typestore()
    types = store.types
    recorder = EpisodeRecorder(
        scenario["directory"], topics=RecordTopics(image="/camera/image"), flush_s=scenario.get("flush_s", 1.0),
        min_free_mb=scenario.get("min_free_mb", 0.0), on_error=lambda text: say("error", text.replace("\n", " ")),
    )
    side = int(math.sqrt(scenario.get("frame_bytes", 9216) / 3))
    period = 1.0 / scenario.get("rate_hz", 30.0)
    frame_number = 0
    next_time = time.monotonic()
    for episode in scenario["episodes"]:
        recorder.start_episode(episode["id"], f"task of {episode['id']}")
        for index in range(episode["frames"]):
            ns = T0 + frame_number * int(period * 1e9)
            stamp = types["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)
            image = types["sensor_msgs/msg/Image"](
                header=types["std_msgs/msg/Header"](stamp=stamp, frame_id="camera_optical"), height=side,
                width=side, encoding="rgb8", is_bigendian=0, step=side * 3,
                data=np.full(side * side * 3, index % 256, dtype=np.uint8),
            )
            recorder.record_image(image)
            say("recorded", episode["id"], index, f"{time.monotonic():.6f}")
            frame_number += 1
            next_time += period
            time.sleep(max(0.0, next_time - time.monotonic()))
        if episode.get("end", True):
            recorder.end_episode(outcome=1, note="child")
        recorder.flush(30.0)
        say("status", episode["id"], status_json(recorder))
    if scenario.get("then", "exit") == "hang":
        say("waiting")
        while True:
            time.sleep(1.0)
    recorder.close()
    say("status", "closed", status_json(recorder))


if __name__ == "__main__":
    main()
