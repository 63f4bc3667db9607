"""The reward node under faults and odd time, over real DDS: nothing stops it, every fault is visible.

(The fuzz corpus of random and mutated messages is test_fuzz_node.py; recording faults are in the recorder
tests.) Also: the node scores an episode exactly as the offline ScoringSession does, and loads a
robometer-calibrate parameters file as it is.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.srv import GetParameters
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from reward_node_helpers import (
    LATCHED,
    NODE,
    RELIABLE,
    SCRIPTED_NODE_MODULE,
    SENSOR,
    Camera,
    colour_frame,
    node_args,
    publish_instruction,
    raw_image,
    stamp_ns,
)
from robometer_ros.msg import EpisodeStatus, FailureFlag, StepReward
from robometer_ros.ros_graph import NodeProcess
from robometer_ros.srv import EndEpisode
from ros_harness import Probe

TASK = "wipe the table"
REPO = Path(__file__).resolve().parents[2]


def _value(array: DiagnosticArray, key: str) -> str | None:
    return next((kv.value for kv in array.status[0].values if kv.key == key), None)


def _start(start_node, probe, bundle, **params):
    rewards = probe.subscribe(f"{NODE}/step_reward", StepReward, RELIABLE)
    node = start_node(SCRIPTED_NODE_MODULE, node_args(bundle, camera_qos="reliable", **params))
    node.wait_for_output("active:", timeout=30)
    return node, rewards


def test_stray_stamps_are_dropped_and_counted_and_never_raise_a_stall(start_node, probe, tmp_path):
    flags = probe.subscribe(f"{NODE}/failure_flag", FailureFlag, LATCHED)
    diagnostics = probe.subscribe("/diagnostics", DiagnosticArray, 50)
    node, rewards = _start(start_node, probe, tmp_path, **{"monitor.stall_timeout_s": 1.0,
                                                           "monitor.stall_grace_s": 0.0})
    publish_instruction(probe, TASK)
    camera = Camera(probe.publisher("/camera/image", Image, RELIABLE), rate_hz=20.0)
    far_future = raw_image(colour_frame(0.5), "rgb8", 0)
    far_future.header.stamp.sec = 2**31 - 1  # 2038: 351178893 s after the camera's clock
    negative = raw_image(colour_frame(0.5), "rgb8", 0)
    negative.header.stamp.sec = -5
    bad_nanosec = raw_image(colour_frame(0.5), "rgb8", 0)
    bad_nanosec.header.stamp.sec, bad_nanosec.header.stamp.nanosec = 1_700_000_000, 2_000_000_000
    msgs = []
    for i in range(12):  # rising progress: no stall
        t = camera.take_stamp()
        msgs.append((raw_image(colour_frame(0.1 + 0.05 * i), "rgb8", t), None))
        if i == 5:
            msgs += [(far_future, None), (negative, None), (bad_nanosec, None)]
    camera.publish(msgs)
    last = camera.next_ns - int(camera.period_s * 1e9)
    rewards.wait_for(1, timeout=20, predicate=lambda r: stamp_ns(r.header.stamp) == last)
    status = diagnostics.wait_for(1, timeout=10, predicate=lambda a: _value(a, "frames_received") == "15")[-1]
    assert _value(status, "frames_dropped.stamp_jump") == "1" and _value(status, "frames_dropped.bad_stamp") == "2"
    assert _value(status, "frames_admitted") == "12"
    assert len({r.episode_id for r in rewards.messages}) == 1  # a stray stamp does not end the episode
    assert not [f for f in flags.messages if f.failed]
    assert node.running()


def test_an_instruction_the_bundle_cannot_take_is_refused_and_the_episode_goes_on(start_node, probe, tmp_path):
    diagnostics = probe.subscribe("/diagnostics", DiagnosticArray, 50)
    statuses = probe.subscribe(f"{NODE}/episode", EpisodeStatus, LATCHED)
    node, rewards = _start(start_node, probe, tmp_path)
    instruction = publish_instruction(probe, TASK)
    episode = statuses.wait_for(1, timeout=20, predicate=lambda s: s.instruction == TASK)[0].episode_id
    instruction.publish(String(data="x" * 100_000))
    node.wait_for_output("refused, the episode goes on")
    warn = diagnostics.wait_for(1, timeout=10, predicate=lambda a: _value(a, "instructions_rejected") == "1")[-1]
    assert "instruction rejected" in warn.status[0].message and "100000 characters" in warn.status[0].message
    instruction.publish(String(data="[crash] a tokenizer that raises"))  # a callback that raises
    diagnostics.wait_for(1, timeout=10, predicate=lambda a: _value(a, "callback_errors.on_instruction") == "1")
    camera = Camera(probe.publisher("/camera/image", Image, RELIABLE))
    t = camera.take_stamp()
    camera.publish([(raw_image(colour_frame(0.4), "rgb8", t), None)])
    reward = rewards.wait_for(1, timeout=20)[-1]
    assert reward.episode_id == episode and reward.instruction == TASK  # the episode went on
    assert node.running()


def test_a_trigger_service_that_never_answers_times_out_and_is_not_called_twice(start_node, probe, tmp_path,
                                                                              ros_env):
    hung = Probe(ros_env.domain_id, name="hung_arm")
    release = threading.Event()
    calls: list[int] = []

    def never_answers(request, response):
        calls.append(1)
        release.wait(30)
        return response

    hung.node.create_service(Trigger, "/arm/stop", never_answers)
    try:
        diagnostics = probe.subscribe("/diagnostics", DiagnosticArray, 50)
        flags = probe.subscribe(f"{NODE}/failure_flag", FailureFlag, LATCHED)
        node, _ = _start(start_node, probe, tmp_path, trigger_service="/arm/stop", trigger_timeout_s=3.0,
                         **{"monitor.regression_margin": 0.2, "monitor.stall_timeout_s": 0.0})
        publish_instruction(probe, TASK)
        camera = Camera(probe.publisher("/camera/image", Image, RELIABLE), rate_hz=10.0)
        # progress rises, falls (REGRESSED -> trigger), recovers (cleared), falls again: a second failure
        # raised while the first call still waits for its answer (the timeout is 3 s, the curve 1.3 s)
        curve = [0.2, 0.5, 0.8, 0.8, 0.3, 0.3, 0.3, 0.8, 0.8, 0.8, 0.3, 0.3, 0.3]
        camera.publish([(raw_image(colour_frame(p), "rgb8", camera.take_stamp()), None) for p in curve])
        raised = flags.wait_for(2, timeout=20, predicate=lambda f: f.failed)
        assert [f.reason for f in raised[:2]] == [FailureFlag.REASON_REGRESSED] * 2
        # the second failure is not forwarded while the first call is in flight: one call, one skip
        skipped = diagnostics.wait_for(1, timeout=10, predicate=lambda a: _value(a, "trigger.skipped_in_flight") == "1")
        assert _value(skipped[-1], "trigger.called") == "1" and _value(skipped[-1], "trigger.timeout") is None
        node.wait_for_output("not forwarded: the previous call to /arm/stop has not answered yet")
        warn = diagnostics.wait_for(1, timeout=20, predicate=lambda a: _value(a, "trigger.timeout") == "1")[-1]
        assert warn.status[0].level == DiagnosticStatus.WARN
        assert "trigger service did not answer" in warn.status[0].message  # a WARN for 10 s after a timeout
        node.wait_for_output("did not answer the call for REGRESSED within 3 s")
        assert len(calls) == 1 and _value(warn, "trigger.called") == "1" and node.running()
    finally:
        release.set()
        hung.close()


def _wall_ns(array: DiagnosticArray) -> int:
    return stamp_ns(array.header.stamp)  # the node stamps /diagnostics with the wall clock


def test_diagnostics_go_on_without_clock_and_say_so(start_node, probe, tmp_path):
    diagnostics = probe.subscribe("/diagnostics", DiagnosticArray, 50)
    node = start_node(SCRIPTED_NODE_MODULE, [*node_args(tmp_path, use_sim_time=True), "-r", "__ns:=/arm"])
    node.wait_for_output("active: scoring /camera/image")
    first = diagnostics.wait_for(3, timeout=20)  # no /clock at all: the wall-clock timer still ticks
    message = first[-1].status[0].message
    assert "waiting for /clock" in message and first[-1].status[0].name == "robometer_ros: /arm/reward_node"
    assert "nobody publishes /camera/image" in message

    # A paused simulator: /clock keeps arriving but does not move. Diagnostics go on and still say so.
    clock = probe.publisher("/clock", Clock, 10)
    sim_ns = 100 * 1_000_000_000
    paused = threading.Event()
    stop = threading.Event()

    def simulator() -> None:
        nonlocal sim_ns
        while not stop.wait(0.02):
            if not paused.is_set():
                sim_ns += 20_000_000
            clock.publish(Clock(clock=Time(sec=sim_ns // 1_000_000_000, nanosec=sim_ns % 1_000_000_000)))

    thread = threading.Thread(target=simulator, daemon=True)
    thread.start()
    try:
        # running: the warning goes away
        since = time.time_ns()
        diagnostics.wait_for(3, timeout=20, predicate=lambda a: _wall_ns(a) > since
                             and "waiting for /clock" not in a.status[0].message)
        paused.set()
        since = time.time_ns() + 500_000_000  # a report or two after the pause
        reports = diagnostics.wait_for(3, timeout=20, predicate=lambda a: _wall_ns(a) > since)
        assert all("waiting for /clock" in a.status[0].message for a in reports), [a.status[0].message
                                                                                    for a in reports]
        paused.clear()
        since = time.time_ns()
        diagnostics.wait_for(2, timeout=20, predicate=lambda a: _wall_ns(a) > since
                             and "waiting for /clock" not in a.status[0].message)
    finally:
        stop.set()
        thread.join(5)
    assert node.running()


def test_private_names_are_resolved_in_logs_and_diagnostics(start_node, probe, tmp_path):
    diagnostics = probe.subscribe("/diagnostics", DiagnosticArray, 50)
    args = node_args(tmp_path, image_topic="~/image", instruction_topic="task")
    node = start_node(SCRIPTED_NODE_MODULE, [*args, "-r", "__ns:=/arm"])
    node.wait_for_output("active: scoring /arm/reward_node/image")
    report = diagnostics.wait_for(1, timeout=20, predicate=lambda a: "nobody publishes" in a.status[0].message)[0]
    assert _value(report, "image_topic") == "/arm/reward_node/image"
    assert "nobody publishes /arm/reward_node/image" in report.status[0].message
    assert "~/" not in report.status[0].message
    statuses = probe.subscribe("/arm/reward_node/episode", EpisodeStatus, LATCHED)
    flags = probe.subscribe("/arm/reward_node/failure_flag", FailureFlag, LATCHED)
    # latched at activation: a late subscriber gets a state at once, before any instruction
    (idle,) = statuses.wait_for(1, timeout=20)
    assert idle.state == EpisodeStatus.STATE_WAITING and idle.episode_id == ""
    assert not flags.wait_for(1, timeout=20)[0].failed
    publish_instruction(probe, TASK, topic="/arm/task", node="/arm/reward_node")
    node.wait_for_output("new instruction from topic /arm/task")


def test_no_frames_hint_tells_large_best_effort_frames_from_a_silent_reliable_camera(start_node, probe, tmp_path):
    """The graph as the node sees it over DDS: a best-effort camera that matches but delivers nothing (what
    1080p frames without the large-frame Fast DDS profile look like) names the SHM segment_size and the
    profile, not reliability; a reliable camera that sends nothing is not blamed on frame size. (The
    reliability mismatch is test_reward_node_config.py's.)"""
    diagnostics = probe.subscribe("/diagnostics", DiagnosticArray, 50)
    node = start_node(SCRIPTED_NODE_MODULE, node_args(tmp_path))  # camera_qos sensor_data (the default)
    node.wait_for_output("active:")
    silent_best_effort = probe.publisher("/camera/image", Image, SENSOR)  # matched, never publishes
    large = "no frames although 1 publisher(s) on /camera/image match"
    warn = diagnostics.wait_for(1, timeout=20, predicate=lambda a: large in a.status[0].message)[-1]
    message = warn.status[0].message
    assert warn.status[0].level == DiagnosticStatus.WARN and "reliability mismatch" not in message
    assert "segment_size" in message and "FASTDDS_DEFAULT_PROFILES_FILE" in message
    assert "fastdds_large_frames.xml" in message
    probe.node.destroy_publisher(silent_best_effort)

    other = start_node(SCRIPTED_NODE_MODULE, [*node_args(tmp_path, camera_qos="reliable", image_topic="/cam2"),
                                              "-r", "__node:=reliable_node"])
    other.wait_for_output("active:")
    probe.publisher("/cam2", Image, RELIABLE)  # matched, reliable, never publishes
    silent = "no frames although 1 reliable publisher(s) on /cam2 match: the camera publishes nothing"
    report = diagnostics.wait_for(1, timeout=20, predicate=lambda a: silent in a.status[0].message)[-1]
    assert "segment_size" not in report.status[0].message
    assert node.running() and other.running()


def test_best_effort_1080p_frames_without_the_large_frame_profile_get_the_fast_dds_hint(ros_env, probe, tmp_path,
                                                                                        monkeypatch):
    """The fault as a robot meets it: a best-effort 1080p camera and the node, both processes without the
    large-frame Fast DDS profile (the default 512 KB shared-memory segment). Frames are published and none
    arrives; the hint must name the segment size and the profile, not reliability."""
    monkeypatch.delenv("FASTDDS_DEFAULT_PROFILES_FILE", raising=False)  # child processes inherit os.environ
    env = {key: value for key, value in ros_env.env.items() if key != "FASTDDS_DEFAULT_PROFILES_FILE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "test"), os.environ.get("PYTHONPATH", "")) if p)
    diagnostics = probe.subscribe("/diagnostics", DiagnosticArray, 50)
    node = NodeProcess(SCRIPTED_NODE_MODULE, node_args(tmp_path), env=env, log_path=tmp_path / "node.log")
    camera = None
    try:
        node.wait_for_output("active:", timeout=30)
        camera = NodeProcess("support.large_frame_camera", env=env, log_path=tmp_path / "camera.log",
                             args=["/camera/image", "1920", "1080", "3"])
        camera.wait_for_output("published 3", timeout=30)
        # a report made well after the last frame was sent (delivery takes milliseconds here)
        settled = time.time_ns() + 1_000_000_000
        warn = diagnostics.wait_for(1, timeout=20, predicate=lambda a: _wall_ns(a) > settled)[0]
        if _value(warn, "frames_received") != "0":
            pytest.skip(f"this middleware delivered {_value(warn, 'frames_received')} of 3 1080p best-effort "
                        "frames without the profile")
        message = warn.status[0].message
        assert "no frames although 1 publisher(s) on /camera/image match" in message
        assert "segment_size" in message and "fastdds_large_frames.xml" in message
        assert "reliability mismatch" not in message
        assert node.running()
    finally:
        if camera is not None:
            camera.stop()
        node.stop()


def test_the_node_scores_an_episode_exactly_as_the_offline_session(start_node, probe, tmp_path):
    """One episode, frame by frame: the node's StepRewards, flags and end verdict equal the ScoringSession's
    replay of the same frames with the same settings (the figure measured offline is the robot's)."""
    from robometer_ros.monitor import EventKind, MonitorConfig, Outcome
    from robometer_ros.session import ScoringSession, SessionConfig, replay
    from support.scripted_engine import ScriptedRewardEngine

    params = {"frame_rate": 5.0, "monitor.stall_timeout_s": 0.6, "monitor.stall_grace_s": 0.2}
    flags = probe.subscribe(f"{NODE}/failure_flag", FailureFlag, LATCHED)
    _, rewards = _start(start_node, probe, tmp_path, **params)
    publish_instruction(probe, TASK)
    rng = np.random.default_rng(4)
    progress = np.clip(np.concatenate([np.linspace(0, 0.6, 15), np.full(10, 0.6), np.linspace(0.6, 0.9, 8)])
                       + rng.normal(0, 0.01, 33), 0, 1)
    success = np.where(np.arange(33) > 29, 0.8, 0.1)
    frames = [colour_frame(p, s) for p, s in zip(progress, success)]
    stamps = [1_700_000_000_000_000_000 + i * 100_000_000 for i in range(33)]  # a 10 Hz camera
    publisher = probe.publisher("/camera/image", Image, RELIABLE)
    for t, f in zip(stamps, frames):
        publisher.publish(raw_image(f, "rgb8", t))
        if (t - stamps[0]) % 200_000_000 == 0:  # an admitted frame (5 Hz): wait for its step
            rewards.wait_for(1, timeout=20, predicate=lambda r, t=t: stamp_ns(r.header.stamp) == t)
    end = probe.call(EndEpisode, f"{NODE}/end_episode", EndEpisode.Request(outcome=Outcome.SUCCESS))
    assert end.success, end.message
    rewards.wait_for(1, timeout=20, predicate=lambda r: stamp_ns(r.header.stamp) == stamps[-1])
    live = list(rewards.messages)

    config = SessionConfig.from_parameters(params, SessionConfig(monitor=MonitorConfig()))
    offline = replay(ScoringSession(ScriptedRewardEngine(), config), TASK, stamps, frames, Outcome.SUCCESS)
    assert [stamp_ns(r.header.stamp) for r in live] == [s.stamp_ns for s in offline.steps]
    assert [[stamp_ns(t) for t in r.frame_stamps] for r in live] == [list(s.frame_stamps_ns) for s in offline.steps]
    np.testing.assert_allclose([r.progress for r in live], [s.progress for s in offline.steps], atol=1e-6)
    np.testing.assert_allclose([r.success_probability for r in live],
                               [s.success_probability for s in offline.steps], atol=1e-6)
    raised = [e for e in offline.events if e.kind is not EventKind.SUCCEEDED]
    assert raised, "the episode is meant to stall once"
    live_flags = flags.wait_for(len(raised) + 1, timeout=20)[1:]  # the first is the latched idle flag
    assert [(f.failed, f.reason, stamp_ns(f.header.stamp)) for f in live_flags[:len(raised)]] == \
        [(e.failed, int(e.reason) if e.failed else 0, round(e.stamp_s * 1e9)) for e in raised]
    assert end.message.endswith(offline.verdict)


def test_a_calibration_file_is_loaded_as_it_is(start_node, probe, tmp_path):
    from robometer_ros.monitor import MonitorConfig
    from robometer_ros.training.evaluation.calibrate import parameters_yaml

    chosen = MonitorConfig(success_threshold=0.72, stall_timeout_s=1.25, end_window_steps=4, stall_grace_s=0.0)
    calibration = tmp_path / "calibration.yaml"
    calibration.write_text(parameters_yaml(chosen, ["robometer-calibrate (test)"]))
    args = ["--params-file", str(REPO / "config" / "reward_node.yaml"), "--params-file", str(calibration),
            "-p", f"bundle:={tmp_path}"]
    node = start_node(SCRIPTED_NODE_MODULE, args)
    node.wait_for_output("active:")
    names = [f"monitor.{name}" for name in MonitorConfig.field_names()]
    answer = probe.call(GetParameters, f"{NODE}/get_parameters", GetParameters.Request(names=names))
    values = {name: (v.double_value if v.type == 3 else v.integer_value) for name, v in zip(names, answer.values)}
    assert values == {f"monitor.{k}": pytest.approx(v) for k, v in chosen.__dict__.items()}
    assert node.running()


def test_scoring_thread_limits_apply_to_the_worker_and_bad_ones_fail_configure(start_node, probe, tmp_path):
    import os
    import re

    # above this process's own niceness (tests may run under `nice -n 10`): lowering it needs CAP_SYS_NICE
    nice = min(os.nice(0) + 3, 19)
    node = start_node(SCRIPTED_NODE_MODULE, node_args(tmp_path, **{"scoring.nice": nice,
                                                                   "scoring.cpu_affinity": "0"}))
    node.wait_for_output("scoring worker thread")
    match = re.search(rf"scoring worker thread (\d+): CPUs \[0\], nice {nice}\b", node.output())
    assert match, node.output()
    stat = Path(f"/proc/{node.proc.pid}/task/{match.group(1)}/stat").read_text()
    assert int(stat.rsplit(")", 1)[1].split()[16]) == nice  # field 19 of stat: the thread's own niceness
    args = node_args(tmp_path, **{"scoring.cpu_affinity": "'2-1'"})
    bad = start_node(SCRIPTED_NODE_MODULE, [*args, "-r", "__node:=other"])
    bad.wait_for_output("configure failed: scoring.cpu_affinity range '2-1' is not a CPU range")
    assert bad.running()
