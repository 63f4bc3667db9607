"""StepReward and FailureFlag cross a real DDS link between two processes intact."""

from __future__ import annotations

import pytest
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from robometer_ros.msg import FailureFlag, StepReward
from support.roundtrip_publisher import sample_failure_flag, sample_step_reward


def _fields(msg) -> dict:
    return {name: getattr(msg, name) for name in msg.get_fields_and_field_types()}


def test_messages_arrive_intact_from_another_process(probe, start_node):
    rewards = probe.subscribe("step_reward", StepReward, 10)
    publisher = start_node("support.roundtrip_publisher", ["-p", "count:=3"])
    received = rewards.wait_for(3, timeout=30)

    for i, msg in enumerate(received[:3]):
        expected = sample_step_reward(i)
        got, want = _fields(msg), _fields(expected)
        for name in ("frame_progress", "frame_success_probability"):
            assert list(got.pop(name)) == pytest.approx(list(want.pop(name)))
        assert got == want
    assert received[0].reward_mode == StepReward.REWARD_MODE_PROGRESS_DELTA == 1
    assert len(received[0].frame_stamps) == 8 and received[0].frame_stamps[3].nanosec == 3000

    # The flag is latched: this subscriber is created after it was published and still gets it.
    publisher.wait_for_output("published")
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
    flags = probe.subscribe("failure_flag", FailureFlag, latched)
    (flag,) = flags.wait_for(1, timeout=30)
    assert _fields(flag) == _fields(sample_failure_flag(0))
    assert flag.reason == FailureFlag.REASON_REGRESSED == 2
    assert flag.severity == FailureFlag.SEVERITY_ERROR
    assert publisher.stop() == 0
