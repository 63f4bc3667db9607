"""Episode verdicts from the reward model's scores: success, success lost, stall, regression, timeout, model
error, and the verdict at the end of the episode.

Pure Python (no numpy, torch or rclpy). The ScoringSession feeds one ``update`` per scoring step with the
camera stamp of the newest scored frame and the model's progress and success probability at that frame;
the monitor answers with the events that changed the verdict. Time comes only from those stamps (camera
time, so bag replay and simulation time behave like live runs), never from the wall clock.

Rules (``MonitorConfig`` holds every number, with its unit):

* SUCCEEDED: success probability >= ``success_threshold`` at ``success_steps`` consecutive steps. Success
  is not a one-way latch: while succeeded, the task is watched for being undone.
* SUCCESS_LOST: after a success, success probability below ``success_release_threshold`` for
  ``success_lost_steps`` consecutive steps, or progress falling more than ``regression_margin`` below its
  running maximum for ``regression_steps`` steps (the object was dropped, the drawer closed again). The
  episode is no longer succeeded; a new SUCCEEDED (the same confirmation as the first) clears it.
* STALLED: progress has not risen more than ``stall_epsilon`` above its reference level for
  ``stall_timeout_s`` seconds. The reference is the progress at the last step that rose more than
  ``stall_epsilon`` above the previous reference; time before ``stall_grace_s`` seconds after the episode
  start does not count (a robot may take a while to start moving). Cleared when progress stays more than
  ``stall_epsilon`` above the reference for ``clear_steps`` consecutive steps. Not watched while succeeded
  (a finished robot standing still is not a stall).
* REGRESSED (the rewind case, before success): progress below ``max_progress - regression_margin`` for
  ``regression_steps`` consecutive steps. ``max_progress`` is the running maximum of progress sustained
  over ``regression_steps`` consecutive steps (the running max of the minimum over each window), so a
  single-step outlier cannot set it. Cleared when progress is back at or above
  ``max_progress - regression_margin / 2`` for ``clear_steps`` consecutive steps.
* TIMEOUT: ``episode_timeout_s`` seconds after the episode start without success. Cleared only by success.
* MODEL_ERROR: ``model_error()`` was called, or a score was non-finite or outside [0, 1]. Cleared after
  ``clear_steps`` consecutive valid steps.
* End of episode (``end``): the verdict is taken from the last ``end_window_steps`` valid steps, not from
  the best step ever seen: their mean success probability >= ``end_success_threshold`` is a success (a
  SUCCEEDED event if it was not succeeded, and every failure but MODEL_ERROR is cleared); below it is
  LOW_SUCCESS_AT_END.

The gaps between raise and clear conditions, and the consecutive-step counts, are the hysteresis: an
input hovering around a threshold gives one event, not one per step. Several conditions can hold at once;
the monitor reports the most severe one (MODEL_ERROR, then LOW_SUCCESS_AT_END, TIMEOUT, SUCCESS_LOST,
REGRESSED, STALLED) and emits an event only when that reported verdict changes: FAILURE_RAISED when it goes
from none to a reason or from one reason to another, FAILURE_CLEARED when it goes back to none.

The defaults of ``MonitorConfig`` are the thresholds ``robometer-calibrate`` chose for the embedded
default bundle on its labelled Meta-World episodes (camera time = simulated time); calibrate them on your
own robot's labelled bags (README, "Calibrating the failure monitor").

The reason, severity and outcome numbers equal the constants in msg/FailureFlag.msg and
msg/EpisodeStatus.msg, so the node copies them into the messages as they are.
"""

from __future__ import annotations

import enum
import math
import numbers
from collections import deque
from dataclasses import dataclass, fields

# Scores this far outside [0, 1] are float noise and are clamped; beyond it they are a model error.
_RANGE_TOLERANCE = 1e-3


class FailureReason(enum.IntEnum):
    """Why an episode is judged failed; values equal FailureFlag.REASON_*."""

    NONE = 0
    STALLED = 1
    REGRESSED = 2
    LOW_SUCCESS_AT_END = 3
    TIMEOUT = 4
    MODEL_ERROR = 5
    SUCCESS_LOST = 6


class Severity(enum.IntEnum):
    """How bad a verdict is; values equal FailureFlag.SEVERITY_*."""

    INFO = 0  # informational (cleared flags, success)
    WARN = 1  # recoverable: the robot may keep trying
    ERROR = 2  # the episode should be stopped or reset


class Outcome(enum.IntEnum):
    """How the robot stack says an episode ended; values equal EpisodeStatus.OUTCOME_* / EndEpisode.srv."""

    UNKNOWN = 0
    SUCCESS = 1
    FAILURE = 2


class EventKind(enum.Enum):
    """What changed."""

    SUCCEEDED = "succeeded"
    FAILURE_RAISED = "failure_raised"
    FAILURE_CLEARED = "failure_cleared"


# Severity of each reason: stalls, rewinds and a lost success are recoverable (the policy may re-grasp or
# retry); a timeout, an episode that ended without success and a broken model call ask for a stop or reset.
REASON_SEVERITY: dict[FailureReason, Severity] = {
    FailureReason.NONE: Severity.INFO,
    FailureReason.STALLED: Severity.WARN,
    FailureReason.REGRESSED: Severity.WARN,
    FailureReason.SUCCESS_LOST: Severity.WARN,
    FailureReason.LOW_SUCCESS_AT_END: Severity.ERROR,
    FailureReason.TIMEOUT: Severity.ERROR,
    FailureReason.MODEL_ERROR: Severity.ERROR,
}

# Most severe first: the reported verdict is the first active reason in this order.
_PRIORITY = (
    FailureReason.MODEL_ERROR,
    FailureReason.LOW_SUCCESS_AT_END,
    FailureReason.TIMEOUT,
    FailureReason.SUCCESS_LOST,
    FailureReason.REGRESSED,
    FailureReason.STALLED,
)
# What a success (mid-episode or at the end) clears.
_CLEARED_BY_SUCCESS = (FailureReason.STALLED, FailureReason.REGRESSED, FailureReason.TIMEOUT,
                       FailureReason.SUCCESS_LOST)


@dataclass(frozen=True)
class Event:
    """One change of the episode verdict.

    Attributes:
        kind: SUCCEEDED, FAILURE_RAISED or FAILURE_CLEARED.
        stamp_s: camera time of the step that caused it, seconds.
        reason: the failure reason for FAILURE_RAISED; the reason that was cleared for FAILURE_CLEARED;
            NONE for SUCCEEDED.
        confidence: in [0, 1], how far past its threshold the evidence is (see ``EpisodeMonitor``).
        severity: Severity of ``reason`` for FAILURE_RAISED; INFO otherwise.
        detail: a human-readable explanation, e.g. "progress stayed within 0.02 of 0.41 for 12.0 s".
        progress: progress at that step, in [0, 1]; for a model error the last valid progress (NaN if none).
        max_progress: the running maximum of progress in this episode, in [0, 1].
    """

    kind: EventKind
    stamp_s: float
    reason: FailureReason = FailureReason.NONE
    confidence: float = 1.0
    severity: Severity = Severity.INFO
    detail: str = ""
    progress: float = 0.0
    max_progress: float = 0.0

    @property
    def failed(self) -> bool:
        """The FailureFlag ``failed`` field after this event (True only for FAILURE_RAISED)."""
        return self.kind is EventKind.FAILURE_RAISED


@dataclass(frozen=True)
class MonitorConfig:
    """Thresholds of the EpisodeMonitor. Validated on construction (ValueError naming the field).

    The defaults are ``robometer-calibrate``'s choice for the embedded default bundle (see the module
    docstring); the README's parameter table gives each one's unit and meaning.

    Attributes:
        success_threshold: success probability (0-1] at or above which a step counts as successful.
        success_steps: consecutive successful steps needed for SUCCEEDED.
        success_release_threshold: success probability [0-1] below which a step counts towards losing a
            success; at most ``success_threshold`` (the gap is the hysteresis).
        success_lost_steps: consecutive steps below ``success_release_threshold`` that turn a success into
            SUCCESS_LOST.
        end_window_steps: valid steps at the end of the episode whose mean success probability decides
            the end verdict.
        end_success_threshold: mean success probability (0-1] over the end window at or above which the
            episode ends as a success; below it the end verdict is LOW_SUCCESS_AT_END.
        stall_timeout_s: seconds of camera time without progress before STALLED; 0 turns stalls off.
        stall_grace_s: seconds of camera time from the episode start that do not count towards a stall.
        stall_epsilon: smallest progress rise (0-1) that counts as progress.
        regression_margin: fall (0-1] below the running progress maximum that counts as a rewind
            (REGRESSED; SUCCESS_LOST after a success).
        regression_steps: consecutive steps below the margin needed to raise it; also the window over
            which a progress value must be sustained to set the running maximum.
        clear_steps: consecutive steps with the condition clearly gone before a raised failure is cleared.
        episode_timeout_s: seconds of camera time from the episode start before TIMEOUT; 0 = off (the
            robot stack usually owns episode length).
    """

    success_threshold: float = 0.8
    success_steps: int = 1
    success_release_threshold: float = 0.4
    success_lost_steps: int = 3
    end_window_steps: int = 2
    end_success_threshold: float = 0.3
    stall_timeout_s: float = 0.2263
    stall_grace_s: float = 2.0
    stall_epsilon: float = 0.05
    regression_margin: float = 0.4
    regression_steps: int = 2
    clear_steps: int = 2
    episode_timeout_s: float = 0.0

    def __post_init__(self) -> None:
        """Check every field and raise ValueError naming the first wrong one."""
        _check_number("success_threshold", self.success_threshold, low=0.0, high=1.0, low_open=True)
        _check_number("success_release_threshold", self.success_release_threshold, low=0.0, high=1.0)
        _check_number("end_success_threshold", self.end_success_threshold, low=0.0, high=1.0, low_open=True)
        _check_number("stall_timeout_s", self.stall_timeout_s, low=0.0)
        _check_number("stall_grace_s", self.stall_grace_s, low=0.0)
        _check_number("stall_epsilon", self.stall_epsilon, low=0.0, high=1.0)
        _check_number("regression_margin", self.regression_margin, low=0.0, high=1.0, low_open=True)
        _check_number("episode_timeout_s", self.episode_timeout_s, low=0.0)
        for name in ("success_steps", "success_lost_steps", "end_window_steps", "regression_steps",
                     "clear_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MonitorConfig.{name} must be an integer >= 1, got {value!r}")
        if self.success_release_threshold > self.success_threshold:
            raise ValueError(
                f"MonitorConfig.success_release_threshold ({self.success_release_threshold}) must not exceed "
                f"success_threshold ({self.success_threshold})"
            )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The thresholds' names, in declaration order (the node's ``monitor.<name>`` parameters)."""
        return tuple(f.name for f in fields(cls))


def _check_number(
    name: str, value: object, low: float, high: float | None = None, low_open: bool = False
) -> None:
    """Raise ValueError unless ``value`` is a finite real number in the given range."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bracket = "(" if low_open else "["
        upper = f"{high}]" if high is not None else "inf)"
        raise ValueError(
            f"MonitorConfig.{name} must be a finite number in {bracket}{low}, {upper}, got {value!r}"
        )


class EpisodeMonitor:
    """Turns one episode's per-step scores into success / failure events (pure; one per episode).

    Confidence of each event, in [0, 1]:
    SUCCEEDED: the mean success probability over the confirming steps (the end window at the end).
    STALLED: 1 - (highest rise above the reference during the stall) / stall_epsilon (1 = perfectly flat).
    REGRESSED / SUCCESS_LOST by progress: (max_progress - progress) / (2 * regression_margin), capped at 1.
    SUCCESS_LOST by success probability: 1 - mean(success over the losing steps) / release threshold.
    LOW_SUCCESS_AT_END: (end_success_threshold - end-window mean) / end_success_threshold.
    TIMEOUT, MODEL_ERROR and FAILURE_CLEARED: 1.

    Not thread-safe: the ScoringSession calls it under its lock.
    """

    def __init__(self, config: MonitorConfig | None = None, start_stamp_s: float | None = None) -> None:
        """Create the monitor of a new episode.

        Args:
            config: thresholds; defaults to ``MonitorConfig()``.
            start_stamp_s: camera time the episode started (its first frame), for the timeout and the stall
                grace period. None takes the stamp of the first ``update`` or ``model_error`` call.
        """
        self._config = config if config is not None else MonitorConfig()
        if start_stamp_s is not None:
            _check_stamp(start_stamp_s)
        self._start_s: float | None = None if start_stamp_s is None else float(start_stamp_s)
        self._last_stamp_s: float | None = None
        self._steps = 0
        self._ended = False
        self._succeeded = False
        self._ever_succeeded = False
        self._active: dict[FailureReason, tuple[float, str]] = {}  # reason -> (confidence, detail)
        self._reported = FailureReason.NONE
        self._progress = math.nan
        self._success_probability = math.nan
        self._success_run: list[float] = []
        self._release_run: list[float] = []
        self._end_window: deque[float] = deque(maxlen=self._config.end_window_steps)
        # running max of progress sustained over regression_steps steps
        self._max_progress = 0.0
        self._recent_progress: list[float] = []
        self._below_run = 0
        self._regression_clear_run = 0
        # stall reference: the level progress must rise above, and since when it has not
        self._stall_ref: float | None = None
        self._stall_ref_s = 0.0
        self._stall_peak = 0.0
        self._stall_clear_run = 0
        self._valid_run = 0

    # ------------------------------------------------------------------ state
    @property
    def config(self) -> MonitorConfig:
        """The thresholds in use."""
        return self._config

    @config.setter
    def config(self, config: MonitorConfig) -> None:
        """Apply new thresholds from the next step on (live parameter changes)."""
        self._config = config
        self._end_window = deque(self._end_window, maxlen=config.end_window_steps)

    @property
    def succeeded(self) -> bool:
        """True while the episode is judged succeeded (a lost success makes it False again)."""
        return self._succeeded

    @property
    def ever_succeeded(self) -> bool:
        """True once SUCCEEDED was emitted in this episode, even if the success was lost later."""
        return self._ever_succeeded

    @property
    def failure(self) -> FailureReason:
        """The reported failure verdict now (NONE when not failed)."""
        return self._reported

    @property
    def failed(self) -> bool:
        """True while a failure is reported."""
        return self._reported is not FailureReason.NONE

    @property
    def ended(self) -> bool:
        """True after ``end`` (further updates are ignored)."""
        return self._ended

    @property
    def steps(self) -> int:
        """Scoring steps seen (valid or not)."""
        return self._steps

    @property
    def progress(self) -> float:
        """Progress at the last valid step (NaN before any)."""
        return self._progress

    @property
    def success_probability(self) -> float:
        """Success probability at the last valid step (NaN before any)."""
        return self._success_probability

    @property
    def max_progress(self) -> float:
        """Running maximum of sustained progress in this episode (0 before any)."""
        return self._max_progress

    @property
    def start_stamp_s(self) -> float | None:
        """Camera time of the episode start, once known."""
        return self._start_s

    @property
    def verdict(self) -> str:
        """The verdict now, as recorded in episode bags: "succeeded", "failed:<REASON>", "running" or
        "not_scored" (no step yet)."""
        if self.failed:
            return f"failed:{self._reported.name}"
        if self._succeeded:
            return "succeeded"
        return "running" if self._steps else "not_scored"

    # ------------------------------------------------------------------ inputs
    def update(self, stamp_s: float, progress: float, success_probability: float) -> list[Event]:
        """Feed one scoring step and return the events it caused (usually none).

        Args:
            stamp_s: camera stamp of the newest scored frame, seconds; never earlier than the previous one.
            progress: the model's progress at that frame, in [0, 1].
            success_probability: the model's success probability at that frame, in [0, 1].

        A non-finite or out-of-range score does not raise: it becomes a MODEL_ERROR failure. Call it once
        per scoring step of a new newest frame: every call counts as a step for the step counts.

        Raises:
            ValueError: ``stamp_s`` is not finite, or earlier than the previous step's (a caller bug: the
                ScoringSession never scores an older frame).
        """
        if self._ended:
            return []
        self._advance_time(stamp_s)
        self._steps += 1
        problem = _score_problem("progress", progress) or _score_problem(
            "success probability", success_probability
        )
        if problem:
            self._valid_run = 0
            self._active[FailureReason.MODEL_ERROR] = (1.0, problem)
            return self._report(stamp_s, self._progress)
        progress = min(max(float(progress), 0.0), 1.0)
        success = min(max(float(success_probability), 0.0), 1.0)
        self._progress, self._success_probability = progress, success
        self._end_window.append(success)

        self._valid_run += 1
        if FailureReason.MODEL_ERROR in self._active and self._valid_run >= self._config.clear_steps:
            del self._active[FailureReason.MODEL_ERROR]

        events: list[Event] = []
        self._track_max(progress)
        if self._succeeded:
            self._check_success_lost(stamp_s, progress, success)
        else:
            self._check_success(stamp_s, progress, success, events)
        if not self._succeeded:
            self._check_regression(progress)
            self._check_stall(stamp_s, progress)
            self._check_timeout(stamp_s)
        return events + self._report(stamp_s, progress)

    def model_error(self, stamp_s: float, detail: str) -> list[Event]:
        """Report that the model produced no usable scores at this step (engine exception, bad output).

        Args:
            stamp_s: camera stamp of the newest frame the step tried to score, seconds.
            detail: what went wrong, for the FailureFlag's detail field.
        """
        if self._ended:
            return []
        self._advance_time(stamp_s)
        self._steps += 1
        self._valid_run = 0
        self._active[FailureReason.MODEL_ERROR] = (1.0, f"model error: {detail}")
        return self._report(stamp_s, self._progress)

    def end(self, stamp_s: float, outcome: Outcome | int = Outcome.UNKNOWN) -> list[Event]:
        """Close the episode with the end-of-episode verdict (see the module docstring).

        Args:
            stamp_s: camera stamp of the newest frame at the end (the last step's stamp if unsure), seconds.
            outcome: the robot stack's own verdict (EndEpisode.srv), quoted in the detail.

        Returns:
            SUCCEEDED (and the FAILURE_CLEARED of a failure it ends) when the end window is a success and
            the episode was not succeeded; FAILURE_RAISED LOW_SUCCESS_AT_END when it is not; else nothing.
            Later calls to ``update``, ``model_error`` and ``end`` return no events.
        """
        if self._ended:
            return []
        outcome = Outcome(outcome)
        self._advance_time(stamp_s)
        self._ended = True
        cfg = self._config
        window = list(self._end_window)
        if self._steps == 0 or not window:
            when = "before any step was scored" if self._steps == 0 else "with no valid score to judge by"
            self._active[FailureReason.LOW_SUCCESS_AT_END] = (
                1.0, f"episode ended (robot outcome {outcome.name}) {when}"
            )
            self._succeeded = False
            return self._report(stamp_s, self._progress)
        mean = sum(window) / len(window)
        over = f"mean success probability over the last {len(window)} step{'s' if len(window) > 1 else ''}"
        if mean >= cfg.end_success_threshold:
            events: list[Event] = []
            if not self._succeeded:
                self._succeed(stamp_s, self._progress, mean,
                              f"at the end: {over} {mean:.2f} >= end_success_threshold "
                              f"{cfg.end_success_threshold:.2f}", events)
            return events + self._report(stamp_s, self._progress)
        self._succeeded = False
        earlier = " (it had succeeded earlier)" if self._ever_succeeded else ""
        self._active[FailureReason.LOW_SUCCESS_AT_END] = (
            min(max((cfg.end_success_threshold - mean) / cfg.end_success_threshold, 0.0), 1.0),
            f"episode ended (robot outcome {outcome.name}) without success: {over} {mean:.2f} < "
            f"end_success_threshold {cfg.end_success_threshold:.2f}{earlier}",
        )
        return self._report(stamp_s, self._progress)

    # ------------------------------------------------------------------ rules
    def _succeed(self, stamp_s: float, progress: float, confidence: float, detail: str,
                 events: list[Event]) -> None:
        self._succeeded = self._ever_succeeded = True
        self._success_run.clear()
        self._release_run.clear()
        self._below_run = 0
        for reason in _CLEARED_BY_SUCCESS:
            self._active.pop(reason, None)
        events.append(Event(EventKind.SUCCEEDED, stamp_s, confidence=confidence, detail=detail,
                            progress=progress, max_progress=max(self._max_progress, progress)))

    def _check_success(self, stamp_s: float, progress: float, success: float, events: list[Event]) -> None:
        cfg = self._config
        if success >= cfg.success_threshold:
            self._success_run.append(success)
        else:
            self._success_run.clear()
        if len(self._success_run) < cfg.success_steps:
            return
        run = self._success_run[-cfg.success_steps :]
        again = "again: " if self._ever_succeeded else ""
        self._succeed(
            stamp_s, progress, sum(run) / len(run),
            f"{again}success probability >= {cfg.success_threshold:.2f} for {cfg.success_steps} consecutive "
            f"step{'s' if cfg.success_steps > 1 else ''} (last {success:.2f})",
            events,
        )

    def _check_success_lost(self, stamp_s: float, progress: float, success: float) -> None:
        cfg = self._config
        if success < cfg.success_release_threshold:
            self._release_run.append(success)
        else:
            self._release_run.clear()
        drop = self._max_progress - progress
        self._below_run = self._below_run + 1 if drop > cfg.regression_margin else 0
        detail = ""
        if len(self._release_run) >= cfg.success_lost_steps:
            run = self._release_run[-cfg.success_lost_steps :]
            mean = sum(run) / len(run)
            confidence = 1.0 - mean / cfg.success_release_threshold if cfg.success_release_threshold > 0 else 1.0
            detail = (f"success lost: success probability below {cfg.success_release_threshold:.2f} for "
                      f"{len(run)} step{'s' if len(run) > 1 else ''} (last {success:.2f})")
        elif self._below_run >= cfg.regression_steps:
            confidence = min(drop / (2 * cfg.regression_margin), 1.0)
            detail = (f"success lost: progress {progress:.2f} fell {drop:.2f} below its maximum "
                      f"{self._max_progress:.2f} (margin {cfg.regression_margin:.2f}) for {self._below_run} steps")
        if not detail:
            return
        self._succeeded = False
        self._success_run.clear()
        self._release_run.clear()
        self._below_run = self._regression_clear_run = 0
        self._active[FailureReason.SUCCESS_LOST] = (min(max(confidence, 0.0), 1.0), detail)
        # Stall time counts afresh from here: the robot was done until now.
        self._stall_ref, self._stall_ref_s, self._stall_peak = progress, stamp_s, progress

    def _track_max(self, progress: float) -> None:
        n = self._config.regression_steps
        self._recent_progress.append(progress)
        del self._recent_progress[:-n]
        if len(self._recent_progress) == n:
            self._max_progress = max(self._max_progress, min(self._recent_progress))

    def _check_regression(self, progress: float) -> None:
        cfg = self._config
        drop = self._max_progress - progress
        if drop > cfg.regression_margin:
            self._below_run += 1
        else:
            self._below_run = 0
        if FailureReason.REGRESSED in self._active:
            if drop <= cfg.regression_margin / 2:
                self._regression_clear_run += 1
                if self._regression_clear_run >= cfg.clear_steps:
                    del self._active[FailureReason.REGRESSED]
            else:
                self._regression_clear_run = 0
        elif self._below_run >= cfg.regression_steps:
            self._regression_clear_run = 0
            self._active[FailureReason.REGRESSED] = (
                min(drop / (2 * cfg.regression_margin), 1.0),
                f"progress {progress:.2f} fell {drop:.2f} below its maximum {self._max_progress:.2f} "
                f"(margin {cfg.regression_margin:.2f}) for {self._below_run} steps",
            )

    def _check_stall(self, stamp_s: float, progress: float) -> None:
        cfg = self._config
        if cfg.stall_timeout_s <= 0.0:
            return
        if self._stall_ref is None:
            self._stall_ref, self._stall_ref_s, self._stall_peak = progress, stamp_s, progress
            return
        risen = progress > self._stall_ref + cfg.stall_epsilon
        if FailureReason.STALLED in self._active:
            self._stall_clear_run = self._stall_clear_run + 1 if risen else 0
            if self._stall_clear_run >= cfg.clear_steps:
                del self._active[FailureReason.STALLED]
                self._stall_ref, self._stall_ref_s, self._stall_peak = progress, stamp_s, progress
            return
        if risen:
            self._stall_ref, self._stall_ref_s, self._stall_peak = progress, stamp_s, progress
            return
        self._stall_peak = max(self._stall_peak, progress)
        start = self._start_s if self._start_s is not None else stamp_s
        since = max(self._stall_ref_s, start + cfg.stall_grace_s)
        waited = stamp_s - since
        if waited >= cfg.stall_timeout_s:
            rise = self._stall_peak - self._stall_ref
            confidence = 1.0
            if cfg.stall_epsilon > 0.0:
                confidence = min(max(1.0 - rise / cfg.stall_epsilon, 0.0), 1.0)
            self._stall_clear_run = 0
            flat_for = stamp_s - self._stall_ref_s
            self._active[FailureReason.STALLED] = (
                confidence,
                f"progress stayed within {cfg.stall_epsilon:.2f} of {self._stall_ref:.2f} for {flat_for:.1f} s",
            )

    def _check_timeout(self, stamp_s: float) -> None:
        timeout = self._config.episode_timeout_s
        if timeout <= 0.0 or FailureReason.TIMEOUT in self._active or self._start_s is None:
            return
        elapsed = stamp_s - self._start_s
        if elapsed >= timeout:
            self._active[FailureReason.TIMEOUT] = (
                1.0,
                f"no success after {elapsed:.1f} s (episode_timeout_s {timeout:.1f})",
            )

    # ------------------------------------------------------------------ helpers
    def _advance_time(self, stamp_s: float) -> None:
        _check_stamp(stamp_s)
        stamp_s = float(stamp_s)
        if self._last_stamp_s is not None and stamp_s < self._last_stamp_s:
            raise ValueError(
                f"stamp {stamp_s:.9f} s is earlier than the previous step's {self._last_stamp_s:.9f} s; "
                "the monitor needs non-decreasing camera stamps"
            )
        self._last_stamp_s = stamp_s
        if self._start_s is None:
            self._start_s = stamp_s

    def _report(self, stamp_s: float, progress: float) -> list[Event]:
        """Emit an event when the most severe active reason differs from the one reported so far."""
        now = next((r for r in _PRIORITY if r in self._active), FailureReason.NONE)
        if now is self._reported:
            return []
        before, self._reported = self._reported, now
        if now is FailureReason.NONE:
            return [
                Event(
                    EventKind.FAILURE_CLEARED,
                    stamp_s,
                    reason=before,
                    confidence=1.0,
                    severity=Severity.INFO,
                    detail=f"{before.name} cleared" + (" by success" if self._succeeded else ""),
                    progress=progress,
                    max_progress=self._max_progress,
                )
            ]
        confidence, detail = self._active[now]
        return [
            Event(
                EventKind.FAILURE_RAISED,
                stamp_s,
                reason=now,
                confidence=confidence,
                severity=REASON_SEVERITY[now],
                detail=detail,
                progress=progress,
                max_progress=self._max_progress,
            )
        ]


def _check_stamp(stamp_s: object) -> None:
    if isinstance(stamp_s, bool) or not isinstance(stamp_s, numbers.Real) or not math.isfinite(stamp_s):
        raise ValueError(f"stamp must be a finite number of seconds, got {stamp_s!r}")


def _score_problem(name: str, value: object) -> str:
    """Why ``value`` is not a usable score, or "" when it is."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"{name} is not a number: {value!r}"
    if not math.isfinite(number):
        return f"{name} is {number} (non-finite model output)"
    if number < -_RANGE_TOLERANCE or number > 1.0 + _RANGE_TOLERANCE:
        return f"{name} {number:.4f} is outside [0, 1]"
    return ""
