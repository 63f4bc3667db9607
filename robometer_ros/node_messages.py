"""What the reward node publishes, built from what the ScoringSession returns (no node, no graph).

Every output carries the camera's header: the stamp and frame_id of the newest frame scored (never the
node's clock), so rewards, flags and statuses line up with the images in message_filters and bags.
"""

from __future__ import annotations

import math

from builtin_interfaces.msg import Time as TimeMsg
from std_msgs.msg import Header

from robometer_ros.monitor import REASON_SEVERITY, Event, FailureReason
from robometer_ros.msg import EpisodeStatus, FailureFlag, StepReward
from robometer_ros.session import NS_PER_S, REWARD_MODES, EpisodeSnapshot, StepResult


def to_time_msg(stamp_ns: int) -> TimeMsg:
    """Nanoseconds -> builtin_interfaces/Time."""
    return TimeMsg(sec=int(stamp_ns // NS_PER_S), nanosec=int(stamp_ns % NS_PER_S))


def stamp_to_ns(stamp: TimeMsg) -> int:
    """builtin_interfaces/Time -> nanoseconds; -1 for a stamp no clock produces (nanosec >= 1e9), which the
    session refuses as a bad stamp."""
    if not 0 <= int(stamp.nanosec) < NS_PER_S:
        return -1
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def camera_header(stamp_ns: int, frame_id: str) -> Header:
    """The header of a camera frame."""
    return Header(stamp=to_time_msg(stamp_ns), frame_id=frame_id)


def _unit(value: float) -> float:
    return float(value) if math.isfinite(value) else 0.0


def step_reward(result: StepResult, model_id: str, backend: str) -> StepReward:
    """The StepReward of a step that produced scores."""
    return StepReward(
        header=camera_header(result.stamp_ns, result.camera_frame_id), episode_id=result.episode_id,
        step=result.step, instruction=result.instruction, progress=result.progress,
        success_probability=result.success_probability, reward_mode=REWARD_MODES.index(result.reward_mode),
        reward=result.reward, frame_stamps=[to_time_msg(s) for s in result.frame_stamps_ns],
        frame_progress=[float(v) for v in result.frame_progress],
        frame_success_probability=[float(v) for v in result.frame_success_probability],
        frames_in_episode=result.frames_in_episode, model_id=model_id, backend=backend,
        inference_time=result.inference_time,
    )


def failure_flag(episode: EpisodeSnapshot | None, event: Event | None, failed: bool, header: Header,
                 detail: str = "") -> FailureFlag:
    """The FailureFlag after a monitor event, or (``event`` None) stating the episode's verdict now: at
    activation, and "not failed" when a new episode starts."""
    msg = FailureFlag(header=header, episode_id=episode.episode_id if episode else "", failed=failed)
    if event is not None:
        msg.reason = int(event.reason) if failed else FailureFlag.REASON_NONE
        msg.severity, msg.confidence, msg.detail = int(event.severity), float(event.confidence), event.detail
        msg.progress, msg.max_progress = _unit(event.progress), _unit(event.max_progress)
        return msg
    reason = episode.failure if (episode and failed) else FailureReason.NONE
    msg.reason, msg.severity = int(reason), int(REASON_SEVERITY[reason])
    msg.confidence, msg.detail = 1.0, detail or (reason.name if failed else "no failure")
    if episode is not None:
        msg.progress, msg.max_progress = _unit(episode.progress), _unit(episode.max_progress)
    return msg


def episode_status(episode: EpisodeSnapshot | None) -> EpisodeStatus:
    """The EpisodeStatus of an episode (state WAITING with no episode id before the first instruction)."""
    msg = EpisodeStatus(state=EpisodeStatus.STATE_WAITING)
    if episode is None:
        return msg
    msg.header = camera_header(episode.stamp_ns, episode.camera_frame_id)
    msg.episode_id, msg.instruction = episode.episode_id, episode.instruction
    if episode.start_stamp_ns is not None:
        msg.start_stamp = to_time_msg(episode.start_stamp_ns)
    msg.state, msg.outcome = int(episode.state), int(episode.outcome)
    msg.steps, msg.frames = episode.steps, episode.frames
    msg.progress, msg.success_probability = _unit(episode.progress), _unit(episode.success_probability)
    return msg
