"""The reward node over real DDS: a node process (with the scripted engine test double) and a probe here.

The double scores a frame's progress as its red mean / 255 and success as its green mean / 255
(test/support/scripted_engine.py), so each test scripts the curve it needs through frame colours, and a
wrong channel order or a wrong frame in a StepReward shows up as a wrong score.
"""

from __future__ import annotations

import threading

import pytest
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from reward_node_helpers import (
    CAMERA_FRAME,
    LATCHED,
    LATCHED_ONE,
    NODE,
    RELIABLE,
    SCRIPTED_NODE_MODULE,
    SENSOR,
    Camera,
    SentFrame,
    colour_frame,
    compressed_image,
    node_args,
    publish_instruction,
    raw_image,
    stamp,
    stamp_ns,
)
from robometer_ros.msg import EpisodeStatus, FailureFlag, StepReward
from robometer_ros.srv import EndEpisode

TASK = "put the red block in the bowl"


def start_scored_node(start_node, probe, bundle, **params):
    """Start the node with the scripted engine; return (process, camera publisher, rewards inbox)."""
    rewards = probe.subscribe(f"{NODE}/step_reward", StepReward, RELIABLE)
    node = start_node(SCRIPTED_NODE_MODULE, node_args(bundle, **params))
    node.wait_for_output("active:", timeout=30)
    return node, rewards


def check_rewards_against_frames(rewards: list[StepReward], sent: list[SentFrame], num_frames: int = 8) -> None:
    """Every StepReward scored frames that were sent, with the scores of those frames."""
    by_stamp = {f.t_ns: f for f in sent}
    steps = [r.step for r in rewards]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), f"step index not monotone: {steps}"
    for reward in rewards:
        newest = stamp_ns(reward.header.stamp)
        assert newest in by_stamp, "StepReward header stamp is not the stamp of a frame that was sent"
        assert reward.header.frame_id == CAMERA_FRAME
        frame_stamps = [stamp_ns(t) for t in reward.frame_stamps]
        assert len(frame_stamps) == len(reward.frame_progress) == len(reward.frame_success_probability) == num_frames
        assert frame_stamps == sorted(frame_stamps) and frame_stamps[-1] == newest
        assert set(frame_stamps) <= set(by_stamp), "a scored frame stamp was never sent"
        for t, progress, success in zip(frame_stamps, reward.frame_progress, reward.frame_success_probability):
            sent_frame = by_stamp[t]
            # colours are quantised to 1/255; jpeg adds a few levels of loss
            tolerance = 4 / 255 if sent_frame.encoding == "jpeg" else 0.6 / 255
            assert progress == pytest.approx(sent_frame.progress, abs=tolerance), sent_frame.encoding
            assert success == pytest.approx(sent_frame.success, abs=tolerance), sent_frame.encoding
        assert reward.progress == pytest.approx(reward.frame_progress[-1], abs=1e-6)
        assert reward.reward == pytest.approx(reward.progress, abs=1e-6)  # reward_mode progress
        assert reward.model_id == "scripted-test-double@1" and reward.backend == "scripted:cpu"
        assert reward.instruction == TASK
        assert reward.frames_in_episode >= 1


def test_raw_images_of_every_colour_encoding_give_rewards_stamped_with_sent_frames(start_node, probe, tmp_path):
    _node, rewards = start_scored_node(start_node, probe, tmp_path)
    publish_instruction(probe, TASK)
    camera = Camera(probe.publisher("/camera/image", Image, SENSOR))
    encodings = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"]
    msgs = []
    for i in range(45):
        encoding = encodings[i % len(encodings)]
        progress, success = (i + 10) / 100, (i % 7) / 10
        if encoding == "mono8":
            success = progress  # a grey frame: every channel is the same
        t = camera.take_stamp()
        msgs.append((raw_image(colour_frame(progress, success), encoding, t, pad=3 if i % 2 else 0),
                     SentFrame(t, progress, success, encoding)))
    camera.publish(msgs)
    # Best effort (the default camera QoS) may lose a frame, so wait for a reward on any of the last few.
    tail = camera.sent[-5].t_ns
    received = rewards.wait_for(1, timeout=20, predicate=lambda r: stamp_ns(r.header.stamp) >= tail)
    check_rewards_against_frames(rewards.messages, camera.sent)
    assert len(rewards.messages) >= 5
    assert received[0].frames_in_episode >= 30  # best effort may lose a few frames, not many
    assert len({r.episode_id for r in rewards.messages}) == 1


def test_compressed_jpeg_and_png_and_garbage(start_node, probe, tmp_path):
    node, rewards = start_scored_node(start_node, probe, tmp_path, image_transport="compressed",
                                      camera_qos="reliable")
    diagnostics = probe.subscribe("/diagnostics", DiagnosticArray, 50)
    publish_instruction(probe, TASK)
    camera = Camera(probe.publisher("/camera/image/compressed", CompressedImage, RELIABLE))
    msgs = []
    for i in range(30):
        fmt = "jpeg" if i % 2 else "png"
        progress, success = 0.2 + i / 100, 0.5
        t = camera.take_stamp()
        msgs.append((compressed_image(colour_frame(progress, success), fmt, t), SentFrame(t, progress, success, fmt)))
        if i == 10:
            garbage = CompressedImage(format="jpeg")
            garbage.data = b"\xff\xd8 not a jpeg at all"
            garbage.header.stamp = stamp(camera.take_stamp())  # a fresh stamp: it is decoded, not a duplicate
            msgs.append((garbage, None))
    camera.publish(msgs)
    last_stamp = camera.sent[-1].t_ns
    rewards.wait_for(1, timeout=20, predicate=lambda r: stamp_ns(r.header.stamp) == last_stamp)
    check_rewards_against_frames(rewards.messages, camera.sent)
    node.wait_for_output("cannot decode CompressedImage")
    # every frame is either admitted or counted as dropped, by reason
    (status,) = diagnostics.wait_for(
        1, timeout=10, predicate=lambda a: _value(a, "frames_received") == "31"
    )[0].status
    assert _value_of(status, "bad_images.decode_failed") == "1"
    assert _value_of(status, "frames_dropped.bad_image") == "1"
    assert _value_of(status, "frames_admitted") == "30"


def _value_of(status: DiagnosticStatus, key: str) -> str | None:
    return next((kv.value for kv in status.values if kv.key == key), None)


def _value(array: DiagnosticArray, key: str) -> str | None:
    return _value_of(array.status[0], key) if array.status else None


def test_episodes_follow_instruction_reset_and_end(start_node, probe, tmp_path):
    node, rewards = start_scored_node(start_node, probe, tmp_path, camera_qos="reliable")  # exact frame counts
    statuses = probe.subscribe(f"{NODE}/episode", EpisodeStatus, LATCHED)
    instruction = publish_instruction(probe, TASK)
    camera = Camera(probe.publisher("/camera/image", Image, RELIABLE))

    def send(n: int, progress: float = 0.3) -> None:
        msgs = []
        for _ in range(n):
            t = camera.take_stamp()
            msgs.append((raw_image(colour_frame(progress), "rgb8", t), SentFrame(t, progress, 0.0, "rgb8")))
        camera.publish(msgs)
        last = camera.sent[-1].t_ns
        rewards.wait_for(1, timeout=20, predicate=lambda r: stamp_ns(r.header.stamp) == last)

    first = statuses.wait_for(1, timeout=20, predicate=lambda s: s.episode_id != "")[0]
    assert first.instruction == TASK and first.state == EpisodeStatus.STATE_WAITING
    send(5)
    assert {r.episode_id for r in rewards.messages} == {first.episode_id}
    running = statuses.wait_for(1, predicate=lambda s: s.state == EpisodeStatus.STATE_RUNNING)[0]
    assert running.episode_id == first.episode_id and stamp_ns(running.start_stamp) == camera.sent[0].t_ns

    # A different instruction: the old episode ends, a new one starts.
    instruction.publish(String(data="open the drawer"))
    second = statuses.wait_for(1, predicate=lambda s: s.instruction == "open the drawer")[0]
    assert second.episode_id != first.episode_id and second.state == EpisodeStatus.STATE_WAITING
    statuses.wait_for(1, predicate=lambda s: s.episode_id == first.episode_id and s.state == EpisodeStatus.STATE_ENDED)
    send(3)
    assert rewards.messages[-1].episode_id == second.episode_id
    assert rewards.messages[-1].instruction == "open the drawer"
    assert rewards.messages[-1].step < 3  # step index restarts with the episode

    # The same instruction again is not a new episode.
    instruction.publish(String(data="open the drawer"))
    # reset: same instruction, new id
    reset = probe.call(Trigger, f"{NODE}/reset_episode", Trigger.Request())
    assert reset.success, reset.message
    third = statuses.wait_for(
        1, predicate=lambda s: s.state == EpisodeStatus.STATE_WAITING and s.episode_id not in
        ("", first.episode_id, second.episode_id))[0]
    assert third.instruction == "open the drawer"
    assert len({s.episode_id for s in statuses.messages} - {""}) == 3  # the repeated instruction started nothing

    # end with a label: visible in EpisodeStatus, then a new episode starts.
    send(2)
    end = probe.call(EndEpisode, f"{NODE}/end_episode",
                     EndEpisode.Request(outcome=EndEpisode.Request.OUTCOME_SUCCESS, note="placed"))
    assert end.success, end.message
    assert end.ended_episode_id == third.episode_id and end.new_episode_id not in (first.episode_id, third.episode_id)
    ended = statuses.wait_for(1, predicate=lambda s: s.episode_id == third.episode_id
                              and s.state == EpisodeStatus.STATE_ENDED)[0]
    assert ended.outcome == EpisodeStatus.OUTCOME_SUCCESS and ended.steps >= 1 and ended.frames == 2
    statuses.wait_for(1, predicate=lambda s: s.episode_id == end.new_episode_id)
    # An empty instruction is rejected and changes nothing.
    instruction.publish(String(data="  "))
    node.wait_for_output("empty instruction")
    bad = probe.call(EndEpisode, f"{NODE}/end_episode", EndEpisode.Request(outcome=7))
    assert not bad.success and "outcome must be" in bad.message


def test_camera_time_reset_starts_a_new_episode(start_node, probe, tmp_path):
    """A looping bag or a simulator reset: stamps jump back before the episode began -> a new episode."""
    node, rewards = start_scored_node(start_node, probe, tmp_path, camera_qos="reliable")
    statuses = probe.subscribe(f"{NODE}/episode", EpisodeStatus, LATCHED)
    publish_instruction(probe, TASK)
    start_ns = 1_700_000_000_000_000_000
    for lap in range(2):  # the same stamps twice, as a bag replayed in a loop sends them
        # 1.2 s of camera time per lap: a jump back by more than 1 s is a reset, less is reordering.
        camera = Camera(probe.publisher("/camera/image", Image, RELIABLE), rate_hz=10.0, start_ns=start_ns)
        msgs = []
        for _ in range(13):
            t = camera.take_stamp()
            msgs.append((raw_image(colour_frame(0.4), "rgb8", t), SentFrame(t, 0.4, 0.0, "rgb8")))
        camera.publish(msgs)
        last = camera.sent[-1].t_ns
        rewards.wait_for(lap + 1, timeout=20, predicate=lambda r, last=last: stamp_ns(r.header.stamp) == last)
    laps = [r.episode_id for r in rewards.messages if stamp_ns(r.header.stamp) == last]
    assert len(set(laps)) == 2, "the replayed frames must be scored in a new episode, not dropped as old"
    node.wait_for_output("camera time jumped back")
    ended = statuses.wait_for(1, predicate=lambda s: s.episode_id == laps[0] and s.state == EpisodeStatus.STATE_ENDED)
    assert ended[0].instruction == TASK


def test_failure_flag_is_latched_for_a_late_subscriber_and_calls_the_trigger(start_node, probe, tmp_path):
    calls: list[float] = []
    called = threading.Event()

    def stop_arm(request, response):
        calls.append(1.0)
        called.set()
        response.success = True
        response.message = "arm stopped"
        return response

    probe.node.create_service(Trigger, "/arm/stop", stop_arm)
    node, rewards = start_scored_node(start_node, probe, tmp_path, trigger_service="/arm/stop", camera_qos="reliable")
    publish_instruction(probe, TASK)
    camera = Camera(probe.publisher("/camera/image", Image, RELIABLE), rate_hz=20)

    # Progress rises to 0.8 and holds, then falls to 0.2 (a rewind): REGRESSED (margin 0.2, 2 steps).
    curve = [0.1] * 3 + [0.4] * 3 + [0.8] * 6 + [0.2] * 8
    msgs = []
    for progress in curve:
        t = camera.take_stamp()
        msgs.append((raw_image(colour_frame(progress), "rgb8", t), SentFrame(t, progress, 0.0, "rgb8")))
    camera.publish(msgs)
    node.wait_for_output("failure REGRESSED", timeout=20)
    assert called.wait(10), "the trigger service was not called"
    node.wait_for_output("arm stopped")

    # Created after the flag was published: still gets it (transient local).
    late = probe.subscribe(f"{NODE}/failure_flag", FailureFlag, LATCHED_ONE)
    flag = late.wait_for(1, timeout=20)[-1]
    assert flag.failed and flag.reason == FailureFlag.REASON_REGRESSED
    assert flag.severity == FailureFlag.SEVERITY_WARN
    assert flag.max_progress == pytest.approx(0.8, abs=0.01) and flag.progress == pytest.approx(0.2, abs=0.01)
    assert stamp_ns(flag.header.stamp) in camera.stamps() and flag.header.frame_id == CAMERA_FRAME
    assert flag.episode_id == rewards.messages[-1].episode_id
    assert "fell" in flag.detail
    assert len(calls) == 1  # raised once: no flapping while progress stays low

    # A NaN model output: MODEL_ERROR flag, and the node keeps scoring good frames afterwards.
    t = camera.take_stamp()
    camera.publish([(raw_image(colour_frame(0.5, blue=255), "rgb8", t), None)])
    error = late.wait_for(1, timeout=20, predicate=lambda f: f.reason == FailureFlag.REASON_MODEL_ERROR)[0]
    assert error.failed and error.severity == FailureFlag.SEVERITY_ERROR and "ModelOutputError" in error.detail
    msgs = []
    for _ in range(4):
        t = camera.take_stamp()
        msgs.append((raw_image(colour_frame(0.9), "rgb8", t), SentFrame(t, 0.9, 0.0, "rgb8")))
    camera.publish(msgs)
    last = camera.sent[-1].t_ns
    rewards.wait_for(1, timeout=20, predicate=lambda r: stamp_ns(r.header.stamp) == last)
    assert node.running()


def test_bad_images_are_counted_and_the_node_keeps_scoring(start_node, probe, tmp_path):
    node, rewards = start_scored_node(start_node, probe, tmp_path, camera_qos="reliable")
    diagnostics = probe.subscribe("/diagnostics", DiagnosticArray, 50)
    publish_instruction(probe, TASK)
    camera = Camera(probe.publisher("/camera/image", Image, RELIABLE))
    depth = Image(height=4, width=4, encoding="16UC1", step=8)
    depth.data = bytes(32)
    truncated = raw_image(colour_frame(0.5), "rgb8", camera.take_stamp())
    truncated.data = bytes(truncated.data)[:-10]
    camera.publish([(depth, None), (truncated, None)])
    node.wait_for_output("point image_topic at a color camera")
    node.wait_for_output("truncated image data")
    warn = diagnostics.wait_for(1, timeout=10, predicate=lambda a: _value(a, "bad_images") == "2")[-1].status[0]
    assert _value_of(warn, "bad_images.depth") == "1" and _value_of(warn, "bad_images.truncated") == "1"
    msgs = []
    for i in range(5):
        t = camera.take_stamp()
        msgs.append((raw_image(colour_frame(0.3 + i / 10), "rgb8", t), SentFrame(t, 0.3 + i / 10, 0.0, "rgb8")))
    camera.publish(msgs)
    last = camera.sent[-1].t_ns
    rewards.wait_for(1, timeout=20, predicate=lambda r: stamp_ns(r.header.stamp) == last)
    check_rewards_against_frames(rewards.messages, camera.sent)


def test_missing_bundle_fails_configure_clearly_and_a_fixed_bundle_recovers(start_node, probe, tmp_path):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    missing = tmp_path / "no_such_bundle"
    diagnostics = probe.subscribe("/diagnostics", DiagnosticArray, 50)
    rewards = probe.subscribe(f"{NODE}/step_reward", StepReward, RELIABLE)
    node = start_node(SCRIPTED_NODE_MODULE, node_args(missing, camera_qos="reliable"))
    node.wait_for_output("configure failed: cannot load bundle")
    assert str(missing) in node.output()
    error = diagnostics.wait_for(1, timeout=10, predicate=lambda a: a.status[0].level == DiagnosticStatus.ERROR)[0]
    assert "configure failed" in error.status[0].message and str(missing) in error.status[0].message
    state = probe.call(GetState, f"{NODE}/get_state", GetState.Request())
    assert state.current_state.label == "unconfigured" and node.running()

    # Fix the bundle and walk the lifecycle by hand, as a lifecycle manager would.
    value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=str(tmp_path))
    result = probe.call(SetParameters, f"{NODE}/set_parameters",
                        SetParameters.Request(parameters=[Parameter(name="bundle", value=value)]))
    assert result.results[0].successful, result.results[0].reason
    for transition in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
        answer = probe.call(ChangeState, f"{NODE}/change_state",
                            ChangeState.Request(transition=Transition(id=transition)))
        assert answer.success
    # Configure-time parameters are refused while configured, with the reason.
    refused = probe.call(SetParameters, f"{NODE}/set_parameters",
                         SetParameters.Request(parameters=[Parameter(name="bundle", value=value)]))
    assert not refused.results[0].successful and "applied at configure" in refused.results[0].reason

    publish_instruction(probe, TASK)
    camera = Camera(probe.publisher("/camera/image", Image, RELIABLE))
    msgs = []
    for _ in range(5):
        t = camera.take_stamp()
        msgs.append((raw_image(colour_frame(0.4), "rgb8", t), SentFrame(t, 0.4, 0.0, "rgb8")))
    camera.publish(msgs)
    last = camera.sent[-1].t_ns
    rewards.wait_for(1, timeout=20, predicate=lambda r: stamp_ns(r.header.stamp) == last)
    ok = diagnostics.wait_for(1, timeout=10, predicate=lambda a: a.status[0].level == DiagnosticStatus.OK)[-1]
    assert ok.status[0].hardware_id == "scripted-test-double@1"
    assert node.stop() == 0


def _set_parameter(probe, name: str, value) -> tuple[bool, str]:
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    if isinstance(value, str):
        pv = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)
    elif isinstance(value, float):
        pv = ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
    else:
        pv = ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=value)
    answer = probe.call(SetParameters, f"{NODE}/set_parameters",
                        SetParameters.Request(parameters=[Parameter(name=name, value=pv)]))
    return answer.results[0].successful, answer.results[0].reason


def test_reward_modes_and_live_parameter_validation(start_node, probe, tmp_path):
    node, rewards = start_scored_node(start_node, probe, tmp_path, camera_qos="reliable",
                                      reward_mode="progress_delta")
    publish_instruction(probe, TASK)
    camera = Camera(probe.publisher("/camera/image", Image, RELIABLE), rate_hz=15)

    def send(values: list[tuple[float, float]]) -> list[StepReward]:
        msgs = []
        for progress, success in values:
            t = camera.take_stamp()
            frame = raw_image(colour_frame(progress, success), "rgb8", t)
            msgs.append((frame, SentFrame(t, progress, success, "rgb8")))
        camera.publish(msgs)
        last = camera.sent[-1].t_ns
        rewards.wait_for(1, timeout=20, predicate=lambda r: stamp_ns(r.header.stamp) == last)
        return [r for r in rewards.messages if stamp_ns(r.header.stamp) >= msgs[0][1].t_ns]

    delta = send([(0.2, 0.1), (0.3, 0.1), (0.5, 0.1), (0.4, 0.1)])
    assert all(r.reward_mode == StepReward.REWARD_MODE_PROGRESS_DELTA for r in delta)
    assert rewards.messages[0].reward == 0.0  # step 0 of the episode has no previous step
    for previous, current in zip(rewards.messages, rewards.messages[1:]):
        assert current.reward == pytest.approx(current.progress - previous.progress, abs=1e-6)

    assert _set_parameter(probe, "reward_mode", "success") == (True, "")
    success = send([(0.6, 0.3), (0.7, 0.35)])
    assert success[-1].reward_mode == StepReward.REWARD_MODE_SUCCESS
    assert success[-1].reward == pytest.approx(success[-1].success_probability, abs=1e-6)
    assert success[-1].reward == pytest.approx(0.35, abs=1 / 255)

    ok, reason = _set_parameter(probe, "reward_mode", "dense")
    assert not ok and "reward_mode must be one of progress, progress_delta, success, got 'dense'" in reason
    ok, reason = _set_parameter(probe, "monitor.success_threshold", 0.0)
    assert not ok and "success_threshold" in reason
    ok, reason = _set_parameter(probe, "monitor.success_threshold", 1.5)  # outside the declared range
    assert not ok
    ok, reason = _set_parameter(probe, "image_topic", "/other")
    assert not ok and "applied at configure" in reason
    # A live threshold change applies to the running episode: success 0.35 now counts after 2 steps.
    ok, reason = _set_parameter(probe, "monitor.success_threshold", 0.3)  # below the release threshold 0.35
    assert not ok and "success_release_threshold" in reason
    assert _set_parameter(probe, "monitor.success_release_threshold", 0.2) == (True, "")
    assert _set_parameter(probe, "monitor.success_threshold", 0.3) == (True, "")
    node.wait_for_output("success_threshold=0.3")
    send([(0.8, 0.36), (0.85, 0.37), (0.9, 0.38)])
    node.wait_for_output("succeeded: success probability >= 0.30")


def test_a_transient_encoding_failure_is_retried_and_a_model_failure_is_flagged(start_node, probe, tmp_path):
    node, rewards = start_scored_node(start_node, probe, tmp_path, camera_qos="reliable")
    diagnostics = probe.subscribe("/diagnostics", DiagnosticArray, 50)
    publish_instruction(probe, TASK)
    flags = probe.subscribe(f"{NODE}/failure_flag", FailureFlag, LATCHED)
    camera = Camera(probe.publisher("/camera/image", Image, RELIABLE), rate_hz=15)
    # The episode's first frame (scored at every step) fails to encode once: the step encodes it again.
    first = camera.take_stamp()
    msgs = [(raw_image(colour_frame(0.1, blue=220), "rgb8", first), SentFrame(first, 0.1, 0.0, "rgb8"))]
    for _ in range(6):
        t = camera.take_stamp()
        msgs.append((raw_image(colour_frame(0.3), "rgb8", t), SentFrame(t, 0.3, 0.0, "rgb8")))
    camera.publish(msgs)
    last = camera.sent[-1].t_ns
    (reward,) = rewards.wait_for(1, timeout=20, predicate=lambda r: stamp_ns(r.header.stamp) == last)
    assert stamp_ns(reward.frame_stamps[0]) == first  # the first frame was encoded after all
    assert not any(f.failed for f in flags.messages)  # a transient failure costs no step and raises nothing
    # A model that returns NaN for a frame: a MODEL_ERROR flag (ERROR) and an ERROR in diagnostics.
    bad = camera.take_stamp()
    camera.publish([(raw_image(colour_frame(0.3, blue=255), "rgb8", bad), None)])
    raised = flags.wait_for(1, predicate=lambda f: f.failed and f.reason == FailureFlag.REASON_MODEL_ERROR)[0]
    assert "scripted NaN output" in raised.detail and raised.severity == FailureFlag.SEVERITY_ERROR
    assert stamp_ns(raised.header.stamp) == bad
    error = diagnostics.wait_for(1, timeout=10, predicate=lambda a: a.status[0].level == DiagnosticStatus.ERROR)[-1]
    assert "model error" in error.status[0].message and node.running()
