"""NodeHealth: the /diagnostics verdict from counters and what the graph says (no ROS graph needed)."""

from __future__ import annotations

from robometer_ros.health import ERROR, OK, WARN, CameraGraph, HealthInputs, NodeHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def active(**kwargs) -> HealthInputs:
    base = {"lifecycle_state": "active", "has_episode": True,
            "session_counters": {"frames_received": 10, "frames_admitted": 10}}
    return HealthInputs(**{**base, **kwargs})


def test_no_frames_hint_names_the_cause_the_graph_shows() -> None:
    clock = Clock()
    health = NodeHealth(clock)
    topic = "/arm/camera/image"
    level, message, _ = health.report(active(camera=CameraGraph(topic)))
    assert level == WARN and f"nobody publishes {topic}" in message
    mismatch = CameraGraph(topic, publishers=1, best_effort_publishers=1, subscriber_reliable=True)
    assert "a reliability mismatch" in health.report(active(camera=mismatch))[1]
    large = CameraGraph(topic, publishers=2, best_effort_publishers=2, subscriber_reliable=False)
    message = health.report(active(camera=large))[1]
    assert "2 publisher(s) on /arm/camera/image match" in message and "fastdds_large_frames.xml" in message
    assert "segment_size" in message and "reliability mismatch" not in message
    # all reliable, subscribed reliable: DDS would retransmit large frames, so the camera sends nothing
    silent = CameraGraph(topic, publishers=1, best_effort_publishers=0, subscriber_reliable=True)
    message = health.report(active(camera=silent))[1]
    assert "1 reliable publisher(s) on /arm/camera/image match: the camera publishes nothing" in message
    assert "fastdds" not in message.lower() and "mismatch" not in message
    health.frame_arrived(0.001)
    level, message, values = health.report(active(camera=large))
    assert level == OK and message.startswith("scoring at") and values["image_callback_ms.median"] == "1.00"


def test_faults_warn_once_per_report_and_errors_stay_while_they_last() -> None:
    clock = Clock()
    health = NodeHealth(clock)
    health.frame_arrived(0.002)
    health.bad_image("too_large", "PNG header declares 20000x20000")
    level, message, values = health.report(active())
    assert level == WARN and "bad images: PNG header declares" in message and values["bad_images.too_large"] == 1
    assert health.report(active())[0] == OK  # nothing new since the previous report
    health.trigger_event("timeout", "/arm/stop did not answer")
    for _ in range(3):  # a trigger timeout warns for 10 s, not just one report
        clock.now += 2.0
        health.frame_arrived(0.002)
        assert "trigger service did not answer" in health.report(active())[1]
    clock.now += 10.0
    health.frame_arrived(0.002)
    assert health.report(active())[0] == OK
    level, message, _ = health.report(active(recorder_error="no space left on device"))
    assert level == ERROR and "recording failed: no space left on device" in message
    health.model_error("ModelOutputError: NaN")
    assert health.report(active())[0] == ERROR
    clock.now += 11.0
    health.frame_arrived(0.002)
    assert health.report(active())[0] == OK


def test_sim_time_stamps_and_configure_errors() -> None:
    clock = Clock()
    health = NodeHealth(clock)
    health.frame_arrived(0.001)
    assert "waiting for /clock" in health.report(active(waiting_for_clock=True))[1]
    stuck = active(session_counters={"frames_received": 20, "frames_admitted": 10, "frames_dropped.stamp_jump": 10})
    assert "camera stamps repeat, go back or jump" in health.report(stuck)[1]
    level, message, _ = health.report(HealthInputs("unconfigured", configure_error="BundleError: no manifest"))
    assert level == ERROR and message == "configure failed: BundleError: no manifest"
