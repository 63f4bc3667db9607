"""launch/reward.launch.py under launch_pytest: its arguments reach the node, which goes active by itself.

Needs launch, launch_ros and launch_pytest (not on PyPI: skipped where they are missing). The node runs the
real RewardEngine on the tiny bundle; a probe in this process drives the camera and the instruction.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

launch_pytest = pytest.importorskip("launch_pytest")
pytest.importorskip("launch_ros.actions")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from launch import LaunchDescription  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from fixtures_bundle import tiny_bundle  # noqa: E402, F401 - the session-scoped tiny bundle fixture
from reward_node_helpers import LATCHED_ONE, RELIABLE, SENSOR, Camera, raw_image, stamp_ns  # noqa: E402
from robometer_ros.msg import StepReward  # noqa: E402

LAUNCH_FILE = Path(__file__).resolve().parents[2] / "launch" / "reward.launch.py"


@launch_pytest.fixture
def reward_launch(ros_env, tiny_bundle):  # noqa: F811
    """reward.launch.py with every topic argument set and a namespace."""
    arguments = {
        "bundle": str(tiny_bundle.path),
        "image_topic": "/cam/image",
        "instruction_topic": "/cam/task",
        "namespace": "arm",
        "log_level": "info",
    }
    return LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(str(LAUNCH_FILE)), launch_arguments=arguments.items()),
        launch_pytest.actions.ReadyToTest(),
    ])


@pytest.mark.launch(fixture=reward_launch)
def test_launch_file_starts_an_active_node_wired_to_its_arguments(probe):
    rewards = probe.subscribe("/arm/reward_node/step_reward", StepReward, RELIABLE)
    probe.publisher("/cam/task", String, LATCHED_ONE, timeout=60).publish(String(data="open the top drawer"))
    # The camera publisher matches only once the node is active (autostart, from the package's params file).
    camera = Camera(probe.publisher("/cam/image", Image, SENSOR, timeout=60))
    rng = np.random.default_rng(0)
    msgs = [(raw_image(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), "rgb8", camera.take_stamp()), None)
            for _ in range(15)]
    sent = [stamp_ns(m.header.stamp) for m, _ in msgs]
    camera.publish(msgs)
    # frame_rate 5 Hz from config/reward_node.yaml: a 0.5 s burst at 30 Hz admits a few frames.
    (reward,) = rewards.wait_for(1, timeout=60)[:1]
    assert reward.model_id == "robometer-tiny-test" and reward.instruction == "open the top drawer"
    assert stamp_ns(reward.header.stamp) in sent
    yield
    # After launch shut the node down (SIGINT), nothing is left to check but that the test got here.
