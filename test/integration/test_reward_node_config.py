"""The reward node's parameters file, lifecycle (autostart off, deactivate/cleanup) and episode recording."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from sensor_msgs.msg import Image

from reward_node_helpers import (
    LATCHED,
    NODE,
    RELIABLE,
    SCRIPTED_NODE_MODULE,
    Camera,
    SentFrame,
    colour_frame,
    node_args,
    publish_instruction,
    raw_image,
    stamp_ns,
)
from robometer_ros.msg import EpisodeStatus, StepReward
from robometer_ros.reward_node import PARAMETERS
from robometer_ros.srv import EndEpisode

REPO = Path(__file__).resolve().parents[2]
PARAMS_FILE = REPO / "config" / "reward_node.yaml"


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_params_file_lists_every_parameter_with_the_declared_default() -> None:
    params = _flatten(yaml.safe_load(PARAMS_FILE.read_text())["/**"]["ros__parameters"])
    declared = {spec.name: spec.default for spec in PARAMETERS}
    assert params == declared
    text = PARAMS_FILE.read_text()
    for spec in PARAMETERS:  # every parameter has a comment line right above it
        leaf = spec.name.rsplit(".", 1)[-1]
        lines = text.splitlines()
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{leaf}:"))
        assert lines[index - 1].strip().startswith("#"), f"{spec.name} has no comment"


def test_parameter_descriptors_carry_ranges_choices_and_read_only() -> None:
    specs = {spec.name: spec.descriptor() for spec in PARAMETERS}
    assert specs["autostart"].read_only and specs["diagnostics_period"].read_only
    assert not specs["bundle"].read_only  # fixable while unconfigured, then configure again
    assert "applied at configure" in specs["bundle"].additional_constraints
    rate = specs["frame_rate"].floating_point_range[0]
    assert (rate.from_value, rate.to_value) == (0.0, 1000.0)
    assert specs["num_frames"].integer_range[0].from_value == 1
    assert "one of: auto, tensorrt, onnxruntime, torch" in specs["backend"].additional_constraints
    assert all(d.description for d in specs.values())


def test_node_starts_from_the_params_file_and_walks_the_lifecycle(start_node, probe, tmp_path) -> None:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    diagnostics = probe.subscribe("/diagnostics", DiagnosticArray, 50)
    node = start_node(SCRIPTED_NODE_MODULE, ["--params-file", str(PARAMS_FILE), "-p", f"bundle:={tmp_path}",
                                             "-p", "autostart:=false", "-p", "instruction:=wipe the table",
                                             "-p", "diagnostics_period:=0.2"])
    node.wait_for_output("autostart is false")
    state = probe.call(GetState, f"{NODE}/get_state", GetState.Request())
    assert state.current_state.label == "unconfigured"

    def change(transition: int) -> None:
        request = ChangeState.Request(transition=Transition(id=transition))
        answer = probe.call(ChangeState, f"{NODE}/change_state", request)
        assert answer.success

    change(Transition.TRANSITION_CONFIGURE)
    change(Transition.TRANSITION_ACTIVATE)
    # Defaults from the file: private topics; the fixed instruction starts an episode at activation.
    statuses = probe.subscribe(f"{NODE}/episode", EpisodeStatus, LATCHED)
    (status,) = statuses.wait_for(1, timeout=20)
    assert status.instruction == "wipe the table"
    # No frames: diagnostics warn with the QoS hint.
    warn = diagnostics.wait_for(1, timeout=20, predicate=lambda a: a.status[0].level == DiagnosticStatus.WARN)[-1]
    assert "no frames: nobody publishes /reward_node/image" in warn.status[0].message
    assert warn.status[0].name == "robometer_ros: /reward_node"

    # Deactivate pauses (frames are not taken), cleanup releases the engine; configure + activate resumes.
    change(Transition.TRANSITION_DEACTIVATE)
    assert probe.node.count_subscribers(f"{NODE}/image") == 0
    change(Transition.TRANSITION_CLEANUP)
    node.wait_for_output("engine released")
    change(Transition.TRANSITION_CONFIGURE)
    change(Transition.TRANSITION_ACTIVATE)
    rewards = probe.subscribe(f"{NODE}/step_reward", StepReward, RELIABLE)
    camera = Camera(probe.publisher(f"{NODE}/image", Image, RELIABLE))
    msgs = []
    for _i in range(8):  # frame_rate 5 Hz from the file: a 30 Hz camera is thinned to every 6th frame
        t = camera.take_stamp()
        msgs.append((raw_image(colour_frame(0.5), "rgb8", t), SentFrame(t, 0.5, 0.0, "rgb8")))
    camera.publish(msgs)
    rewards.wait_for(1, timeout=20)
    assert rewards.messages[-1].instruction == "wipe the table"
    admitted = diagnostics.wait_for(1, timeout=10, predicate=lambda a: _value(a, "frames_received") == "8")[-1]
    assert _value(admitted, "frames_admitted") == "2" and _value(admitted, "frames_dropped.rate") == "6"


def _value(array: DiagnosticArray, key: str) -> str | None:
    return next((kv.value for kv in array.status[0].values if kv.key == key), None)


def test_recording_writes_a_bag_per_episode_that_reads_back(start_node, probe, tmp_path) -> None:
    from rosbags.rosbag2 import Reader

    from robometer_ros.recorder import LABEL_NOTE, LABEL_OUTCOME, make_typestore, read_episode_label

    bags = tmp_path / "bags"
    rewards = probe.subscribe(f"{NODE}/step_reward", StepReward, RELIABLE)
    node = start_node(SCRIPTED_NODE_MODULE, node_args(tmp_path, record=True, record_dir=str(bags),
                                                      camera_qos="reliable"))
    node.wait_for_output("recording episodes to")
    node.wait_for_output("active:")
    publish_instruction(probe, "stack the cups")
    camera = Camera(probe.publisher("/camera/image", Image, RELIABLE))
    msgs = []
    for i in range(6):
        t = camera.take_stamp()
        msgs.append((raw_image(colour_frame(0.1 * i), "bgr8", t), SentFrame(t, 0.1 * i, 0.0, "bgr8")))
    camera.publish(msgs)
    last = camera.sent[-1].t_ns
    rewards.wait_for(1, timeout=20, predicate=lambda r: stamp_ns(r.header.stamp) == last)
    episode_id = rewards.messages[-1].episode_id
    end = probe.call(EndEpisode, f"{NODE}/end_episode", EndEpisode.Request(outcome=2, note="cup fell"))
    assert end.success and end.ended_episode_id == episode_id

    bag = bags / episode_id
    deadline = time.monotonic() + 20
    while not (bag / "metadata.yaml").exists():  # the recorder closes the bag on its own thread
        assert time.monotonic() < deadline, f"no bag at {bag}"
        time.sleep(0.05)
    label = read_episode_label(bag)
    assert label[LABEL_OUTCOME] == "failure" and label[LABEL_NOTE] == "cup fell"
    typestore = make_typestore()
    topics: dict[str, list] = {}
    with Reader(bag) as reader:
        for connection, timestamp, raw in reader.messages():
            msg = typestore.deserialize_cdr(raw, connection.msgtype)
            topics.setdefault(connection.topic, []).append((timestamp, msg))
    images = topics["/camera/image"]
    assert [t for t, _ in images] == camera.stamps()  # every admitted frame, at its camera stamp
    assert images[0][1].encoding == "bgr8"
    assert [m.data for _, m in topics["/task"]] == ["stack the cups"]
    recorded_rewards = [m for _, m in topics[f"{NODE}/step_reward"]]
    published = [r for r in rewards.messages if r.episode_id == episode_id]
    assert [r.step for r in recorded_rewards] == [r.step for r in published]
    final = topics[f"{NODE}/episode"][-1][1]
    assert final.state == EpisodeStatus.STATE_ENDED and final.outcome == 2 and final.episode_id == episode_id
    assert f"{NODE}/failure_flag" in topics  # the end verdict (LOW_SUCCESS_AT_END) is on record

    # The training importer reads the node's bag back as one labelled trajectory, colours intact.
    from robometer_ros.training.data.bags import read_bag

    (trajectory,) = read_bag(bag)
    assert trajectory.instruction == "stack the cups" and trajectory.quality_label == "failure"
    assert [int(f[0, 0, 0]) for f in trajectory.frames] == [round(0.1 * i * 255) for i in range(6)]
    assert node.stop() == 0


@pytest.mark.parametrize("bad", [{"backend": "cuda"}, {"num_frames": 4}])
def test_bad_configuration_fails_configure_with_the_reason(start_node, probe, tmp_path, bad) -> None:
    node = start_node(SCRIPTED_NODE_MODULE, node_args(tmp_path, **bad))
    text = node.wait_for_output("configure failed")
    if "backend" in bad:
        assert "backend must be one of auto, tensorrt, onnxruntime, torch, got 'cuda'" in text
    else:
        assert "scores 8 frames per step but parameter num_frames is 4" in text
    assert node.running()


def test_unwritable_record_dir_is_an_error_that_stays_until_recording_works_again(start_node, probe,
                                                                                   tmp_path) -> None:
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the bag directory should be")
    diagnostics = probe.subscribe("/diagnostics", DiagnosticArray, 50)
    rewards = probe.subscribe(f"{NODE}/step_reward", StepReward, RELIABLE)
    node = start_node(SCRIPTED_NODE_MODULE, node_args(tmp_path, record=True, record_dir=str(blocker / "bags"),
                                                      record_flush_s=0.2, record_min_free_mb=0.0))
    node.wait_for_output("active:")
    publish_instruction(probe, "stack the cups")
    camera = Camera(probe.publisher("/camera/image", Image, RELIABLE))

    def frames(count: int) -> None:
        msgs = []
        for _ in range(count):
            t = camera.take_stamp()
            msgs.append((raw_image(colour_frame(0.5), "rgb8", t), SentFrame(t, 0.5, 0.0, "rgb8")))
        camera.publish(msgs)
        rewards.wait_for(1, timeout=20, predicate=lambda r: stamp_ns(r.header.stamp) == camera.sent[-1].t_ns)

    frames(3)
    error = diagnostics.wait_for(1, timeout=10, predicate=lambda a: a.status[0].level == DiagnosticStatus.ERROR)[-1]
    assert "recording failed" in error.status[0].message and "not_a_directory" in error.status[0].message
    node.wait_for_output("recording: cannot open bag")  # the recorder's error reaches the node's ROS log
    # it stays an ERROR while nothing changes, not just for one report (diagnostics_period 0.2 s)
    since = stamp_ns(error.header.stamp)
    later = diagnostics.wait_for(5, timeout=10, predicate=lambda a: stamp_ns(a.header.stamp) > since)
    assert all(a.status[0].level == DiagnosticStatus.ERROR for a in later), [a.status[0].message for a in later]

    blocker.unlink()  # the directory can be made now: the next episode records, and the ERROR goes away
    publish_instruction(probe, "stack the plates")
    frames(3)
    recovered = diagnostics.wait_for(1, timeout=15, predicate=lambda a: "recording failed" not in a.status[0].message
                                     and stamp_ns(a.header.stamp) > stamp_ns(later[-1].header.stamp))[-1]
    assert recovered.status[0].level != DiagnosticStatus.ERROR, recovered.status[0].message
    end = probe.call(EndEpisode, f"{NODE}/end_episode", EndEpisode.Request(outcome=1))
    bag = blocker / "bags" / end.ended_episode_id
    deadline = time.monotonic() + 20
    while not (bag / "metadata.yaml").exists():
        assert time.monotonic() < deadline, f"no bag at {bag}"
        time.sleep(0.05)
    assert node.running()


# rclpy's own default incompatible-QoS handler on the probe's publisher logs through a deprecated call.
@pytest.mark.filterwarnings("ignore:Deprecated in favor of:DeprecationWarning")
def test_reliable_subscriber_with_a_best_effort_camera_says_so(start_node, probe, tmp_path) -> None:
    from reward_node_helpers import SENSOR

    diagnostics = probe.subscribe("/diagnostics", DiagnosticArray, 50)
    node = start_node(SCRIPTED_NODE_MODULE, node_args(tmp_path, camera_qos="reliable"))
    node.wait_for_output("active:")
    publish_instruction(probe, "stack the cups")
    camera = probe.publisher("/camera/image", Image, SENSOR, wait_for_subscribers=0)
    camera.publish(raw_image(colour_frame(0.5), "rgb8", 1))
    node.wait_for_output("incompatible QoS")
    assert "use camera_qos sensor_data" in node.output()
    mismatch = "the camera on /camera/image is best effort and camera_qos is reliable (a reliability mismatch)"
    warn = diagnostics.wait_for(1, timeout=20, predicate=lambda a: mismatch in a.status[0].message)[-1]
    assert warn.status[0].level == DiagnosticStatus.WARN


def test_readme_parameter_table_lists_every_parameter_with_its_default() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip().strip("`")
            for line in readme.splitlines() if line.startswith("| `")}
    for spec in PARAMETERS:
        assert spec.name in rows, f"README's parameter table lacks {spec.name}"
        default = str(spec.default).lower() if isinstance(spec.default, bool) else str(spec.default)
        assert rows[spec.name].strip('"') == default, f"{spec.name}: README says {rows[spec.name]}, node {default}"
