"""Publishes fully populated StepRewards once a subscriber matched, then one latched FailureFlag.

Started as a separate process by test/integration/test_message_roundtrip.py:
`python -m support.roundtrip_publisher --ros-args -p count:=3`.
"""

from __future__ import annotations

import time

import rclpy
from builtin_interfaces.msg import Time
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from robometer_ros.msg import FailureFlag, StepReward


def sample_step_reward(index: int) -> StepReward:
    """A StepReward with every field set to a value that depends on `index`."""
    msg = StepReward()
    msg.header.stamp = Time(sec=1700000000 + index, nanosec=123456789)
    msg.header.frame_id = "wrist_camera_optical"
    msg.episode_id = f"episode-{index}"
    msg.step = 40 + index
    msg.instruction = "open the drawer — carefully"
    msg.progress = 0.625
    msg.success_probability = 0.25
    msg.reward_mode = StepReward.REWARD_MODE_PROGRESS_DELTA
    msg.reward = -0.125
    msg.frame_stamps = [Time(sec=1700000000, nanosec=k * 1000) for k in range(8)]
    msg.frame_progress = [k / 8 for k in range(8)]
    msg.frame_success_probability = [1.0 - k / 8 for k in range(8)]
    msg.frames_in_episode = 512
    msg.model_id = "robometer-test@1"
    msg.backend = "onnxruntime:CPUExecutionProvider"
    msg.inference_time = 0.03125  # exactly representable in float32
    return msg


def sample_failure_flag(index: int) -> FailureFlag:
    """A FailureFlag with every field set."""
    msg = FailureFlag()
    msg.header.stamp = Time(sec=1700000100 + index, nanosec=5)
    msg.header.frame_id = "wrist_camera_optical"
    msg.episode_id = f"episode-{index}"
    msg.failed = True
    msg.reason = FailureFlag.REASON_REGRESSED
    msg.confidence = 0.75
    msg.severity = FailureFlag.SEVERITY_ERROR
    msg.progress = 0.25
    msg.max_progress = 0.875
    msg.detail = "progress fell 0.62 below its maximum 0.88"
    return msg


class RoundtripPublisher(Node):
    """Publishes `count` StepRewards after a subscriber matched, then one latched FailureFlag."""

    def __init__(self) -> None:
        super().__init__("roundtrip_publisher")
        self.declare_parameter("count", 3)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.rewards = self.create_publisher(StepReward, "step_reward", 10)
        self.flags = self.create_publisher(FailureFlag, "failure_flag", latched)

    def run(self) -> None:
        """Wait for a StepReward subscriber, then publish (the latched flag needs no subscriber yet)."""
        while self.rewards.get_subscription_count() == 0:
            time.sleep(0.02)
        for i in range(self.get_parameter("count").value):
            self.rewards.publish(sample_step_reward(i))
        self.flags.publish(sample_failure_flag(0))
        self.get_logger().info("published")


def main() -> None:
    """Entry point."""
    rclpy.init()
    node = RoundtripPublisher()
    try:
        node.run()
        rclpy.spin(node)  # stay alive (latched flag) until the test stops us
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
