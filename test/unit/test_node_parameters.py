"""The reward node's parameter rules without a node: which changes it refuses, and what configure checks.

(The same rules over DDS, with the node's answers to SetParameters, are in test_reward_node.py; the table
against config/reward_node.yaml and the README in test_reward_node_config.py.)
"""

from __future__ import annotations

import pytest

from robometer_ros.node_parameters import (
    PARAMETERS,
    SESSION_PARAMETERS,
    check_change,
    check_configuration,
)
from robometer_ros.session import SessionConfig

DEFAULTS = {spec.name: spec.default for spec in PARAMETERS}
SESSION_DEFAULTS = {name: DEFAULTS[name] for name in SESSION_PARAMETERS}


def test_live_changes_are_taken_in_every_state() -> None:
    for state in ("unconfigured", "inactive", "active"):
        assert check_change({"reward_mode": "success", "monitor.stall_timeout_s": 3.0}, state, SESSION_DEFAULTS) == ""
    assert check_change({"not_a_parameter_of_ours": 1}, "active", SESSION_DEFAULTS) == ""


def test_configure_time_parameters_change_only_while_unconfigured() -> None:
    assert check_change({"image_topic": "/other"}, "unconfigured", SESSION_DEFAULTS) == ""
    reason = check_change({"image_topic": "/other"}, "active", SESSION_DEFAULTS)
    assert reason.startswith("image_topic is applied at configure; the node is active")
    assert "then configure again" in reason


def test_choices_and_session_settings_are_checked_with_the_current_values() -> None:
    assert check_change({"reward_mode": "dense"}, "active", SESSION_DEFAULTS) == \
        "reward_mode must be one of progress, progress_delta, success, got 'dense'"
    # valid alone, invalid beside the current release threshold (0.35): refused, naming both
    reason = check_change({"monitor.success_threshold": 0.3}, "active", SESSION_DEFAULTS)
    assert "success_release_threshold" in reason and "success_threshold" in reason
    lowered = {**SESSION_DEFAULTS, "monitor.success_release_threshold": 0.2}
    assert check_change({"monitor.success_threshold": 0.3}, "active", lowered) == ""
    # both in one request: judged together
    assert check_change({"monitor.success_threshold": 0.3, "monitor.success_release_threshold": 0.2}, "active",
                        SESSION_DEFAULTS) == ""
    assert "success_threshold" in check_change({"monitor.success_threshold": 0.0}, "active", SESSION_DEFAULTS)


def test_configuration_gives_the_session_settings_or_names_the_wrong_parameter() -> None:
    values = {**DEFAULTS, "bundle": "/bundles/default", "frame_rate": 2, "monitor.success_steps": 3.0}
    config = check_configuration(values)
    assert config == SessionConfig.from_parameters(values)
    assert config.frame_rate == 2.0 and config.monitor.success_steps == 3
    with pytest.raises(ValueError, match="parameter backend must be one of auto, tensorrt, onnxruntime, torch, "
                                         "got 'cuda'"):
        check_configuration({**values, "backend": "cuda"})
    with pytest.raises(ValueError, match="parameter bundle is empty: set it to the exported bundle directory"):
        check_configuration({**values, "bundle": "  "})
    with pytest.raises(ValueError, match="parameter image_topic is empty"):
        check_configuration({**values, "image_topic": ""})
    with pytest.raises(ValueError, match=r"^session parameters: .*success_release_threshold"):
        check_configuration({**values, "monitor.success_threshold": 0.2})
