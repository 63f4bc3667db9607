"""The reward node end to end with the real RewardEngine on the tiny exported bundle (ONNX Runtime, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sensor_msgs.msg import Image
from std_msgs.msg import String

from fixtures_bundle import tiny_bundle  # noqa: F401 - the session-scoped tiny bundle fixture
from reward_node_helpers import CAMERA_FRAME, LATCHED_ONE, NODE, RELIABLE, SENSOR, Camera, node_args, stamp_ns
from reward_node_helpers import raw_image as make_raw_image
from robometer_ros.msg import StepReward

pytestmark = pytest.mark.slow


def test_real_engine_scores_camera_frames_end_to_end(start_node, probe, tiny_bundle):  # noqa: F811
    rewards = probe.subscribe(f"{NODE}/step_reward", StepReward, RELIABLE)
    node = start_node("robometer_ros.reward_node", node_args(tiny_bundle.path, backend="onnxruntime"))
    node.wait_for_output("active:", timeout=60)
    probe.publisher("/task", String, LATCHED_ONE).publish(String(data="open the top drawer"))
    camera = Camera(probe.publisher("/camera/image", Image, SENSOR))
    rng = np.random.default_rng(0)
    msgs = []
    for _ in range(12):  # camera-sized frames: the engine's preprocessor resizes to the bundle's frame size
        frame = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
        msgs.append((make_raw_image(frame, "bgr8", camera.take_stamp()), None))
    sent = [stamp_ns(m.header.stamp) for m, _ in msgs]
    camera.publish(msgs)
    rewards.wait_for(1, timeout=60, predicate=lambda r: stamp_ns(r.header.stamp) == sent[-1])
    for reward in rewards.messages:
        assert reward.model_id == "robometer-tiny-test"
        assert reward.backend.startswith("onnxruntime")
        assert stamp_ns(reward.header.stamp) in sent and reward.header.frame_id == CAMERA_FRAME
        assert len(reward.frame_progress) == len(reward.frame_stamps) == 8
        assert {stamp_ns(t) for t in reward.frame_stamps} <= set(sent)
        values = [reward.progress, reward.success_probability, *reward.frame_progress]
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
        assert reward.inference_time > 0
    assert node.stop() == 0
