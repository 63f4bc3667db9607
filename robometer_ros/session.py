"""ScoringSession: one reward-model scoring session, ROS-free, shared by the node and every offline tool.

The reward node, ``robometer-eval``, ``robometer-score``, ``robometer-calibrate``, the demo and the Gymnasium
wrapper all score through this class, so a figure measured offline is the figure the robot gets.

It owns the current episode and everything about it: the FrameStore (the one owner of every frame: its
camera frame id, its image until it is encoded, whether the engine holds its features), the engine cache
calls (add_frame / forget), keep-latest scheduling (which frame to encode next, when to score), the reward
(``reward_mode``) and the EpisodeMonitor. Callers feed it and publish what it returns:

* ``offer(stamp_ns, camera_frame_id, image)``: a camera frame; the image may be an array or a zero-argument
  callable that decodes it, called only when the frame is admitted (the node skips decoding dropped frames).
* ``next_job(timeout)`` / ``run(job) -> StepResult | None``: the worker loop (the node's worker thread;
  offline tools call them in a loop, or use ``replay``).
* ``start(instruction)``, ``reset()``, ``end(outcome)``: episode boundaries, returning an EpisodeChange.
  ``end`` first scores the newest frame of the episode if it was not scored yet (including the last frame the
  admission rate dropped), then takes the monitor's end-of-episode verdict.

Camera time rules (``SessionConfig``): a negative stamp or a nanosecond field >= 1e9 is rejected
(``bad_stamp``); a frame more than ``stamp_reset_s`` before, or more than ``max_stamp_jump_s`` after, the
newest admitted frame is held back (``stamp_jump``) until ``jump_confirm_frames`` consecutive frames agree on
the new time line, which then starts a new episode with those frames. A single far-future or zero stamp is
therefore dropped and counted, never a stall "for 351178893 s", and a looping bag or a simulator reset still
starts a new episode by itself.

Threads: ``offer``/``start``/``reset``/``end`` may be called from one thread (the ROS executor) while another
calls ``next_job``/``run`` (the worker). State is guarded by one lock held only for bookkeeping; every engine
call happens under a second lock, so engine calls never overlap and ``end`` waits for a step in flight.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from robometer_ros.episode import AdmissionStatus, FrameStore
from robometer_ros.monitor import EpisodeMonitor, Event, EventKind, FailureReason, MonitorConfig, Outcome

NS_PER_S = 1_000_000_000
REWARD_MODES = ("progress", "progress_delta", "success")  # index = StepReward.REWARD_MODE_*

ImageSource = Any  # np.ndarray (uint8 RGB [H, W, 3]) or a zero-argument callable returning one


class EpisodeState(enum.IntEnum):
    """Where an episode is; values equal EpisodeStatus.STATE_*."""

    WAITING = 0  # started, no frame scored yet
    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    ENDED = 4


def new_episode_id() -> str:
    """A sortable, unique episode id: UTC start time plus a short random suffix."""
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SessionConfig:
    """How a session admits, schedules and judges (node parameters of the same names).

    Attributes:
        num_frames: frames scored per step (the bundle's frame count).
        frame_rate: frames admitted per second of camera time; 0 admits every frame (next episode).
        max_frames_per_episode: frames kept per episode; longer episodes are thinned evenly (next episode).
        scoring_rate: scoring steps per second of wall time at most; 0 = as fast as the engine allows.
        reward_mode: progress, progress_delta or success (what StepResult.reward is).
        max_stamp_jump_s: a frame stamped more than this many seconds after the newest admitted frame is a
            time jump (held back until confirmed), not a frame of this episode.
        stamp_reset_s: a frame stamped more than this many seconds before the newest admitted frame is a
            time jump back (a looping bag, a simulator reset); smaller steps back are out-of-order drops.
        jump_confirm_frames: consecutive frames on the new time line that confirm a time jump and start a
            new episode (1 = at once; 1 stray stamp is then enough to end an episode).
        monitor: the EpisodeMonitor thresholds (live: they apply to the running episode).
    """

    num_frames: int = 8
    frame_rate: float = 5.0
    max_frames_per_episode: int = 128
    scoring_rate: float = 0.0
    reward_mode: str = "progress"
    max_stamp_jump_s: float = 10.0
    stamp_reset_s: float = 1.0
    jump_confirm_frames: int = 3
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        """Check the fields; ValueError naming the first wrong one."""
        for name, low in (("frame_rate", 0.0), ("scoring_rate", 0.0), ("max_stamp_jump_s", 1e-9),
                          ("stamp_reset_s", 1e-9)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low:
                raise ValueError(f"{name} must be a finite number >= {low:g}, got {value!r}")
        for name, low in (("num_frames", 1), ("max_frames_per_episode", 3), ("jump_confirm_frames", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {', '.join(REWARD_MODES)}, got {self.reward_mode!r}")
        if not isinstance(self.monitor, MonitorConfig):
            raise ValueError(f"monitor must be a MonitorConfig, got {type(self.monitor).__name__}")

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        """The node parameter names this config is built from (``monitor.<name>`` for the thresholds)."""
        own = tuple(f.name for f in fields(cls) if f.name != "monitor")
        return own + tuple(f"monitor.{name}" for name in MonitorConfig.field_names())

    @classmethod
    def from_parameters(cls, values: Mapping[str, Any], base: SessionConfig | None = None) -> SessionConfig:
        """A config from node parameter values (flat names as the node declares them; unknown names are
        ignored, missing ones keep ``base``'s value). Raises ValueError naming a bad value."""
        base = base or cls()
        own = {f.name for f in fields(cls)} - {"monitor"}
        mine = {k: _coerce(getattr(base, k), v) for k, v in values.items() if k in own}
        monitor_values = {k.split(".", 1)[1]: v for k, v in values.items()
                          if k.startswith("monitor.") and k.split(".", 1)[1] in MonitorConfig.field_names()}
        monitor = base.monitor
        if monitor_values:
            monitor = replace(monitor, **{k: _coerce(getattr(monitor, k), v) for k, v in monitor_values.items()})
        return replace(base, **mine, monitor=monitor)

    def parameters(self) -> dict[str, Any]:
        """This config as flat node parameter values (the inverse of ``from_parameters``)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "monitor"}
        values.update({f"monitor.{f.name}": getattr(self.monitor, f.name) for f in fields(self.monitor)})
        return values


def _coerce(default: Any, value: Any) -> Any:
    """An int parameter given as 3.0 stays usable, a float given as 3 becomes 3.0 (YAML writes both)."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) \
            and value.is_integer():
        return int(value)
    return value


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class EpisodeSnapshot:
    """What is known about an episode at one moment (the EpisodeStatus message's content)."""

    episode_id: str
    instruction: str
    state: EpisodeState
    outcome: Outcome
    steps: int
    frames: int  # admitted so far
    start_stamp_ns: int | None
    stamp_ns: int  # newest scored frame (newest admitted before the first step; 0 before any frame)
    camera_frame_id: str
    progress: float
    success_probability: float
    max_progress: float
    failure: FailureReason
    verdict: str


@dataclass(frozen=True)
class StepResult:
    """One scoring step: the scores of the newest frame, the reward, and the verdict events it caused.

    A step whose engine call failed has ``error`` set, NaN scores, and the MODEL_ERROR events.
    """

    episode_id: str
    step: int
    instruction: str
    stamp_ns: int
    camera_frame_id: str
    frame_stamps_ns: tuple[int, ...]
    progress: float
    success_probability: float
    frame_progress: np.ndarray
    frame_success_probability: np.ndarray
    reward_mode: str
    reward: float
    frames_in_episode: int
    inference_time: float
    events: tuple[Event, ...]
    status: EpisodeSnapshot
    status_changed: bool
    error: str = ""

    @property
    def ok(self) -> bool:
        """True when the step produced scores."""
        return not self.error


@dataclass(frozen=True)
class EpisodeChange:
    """An episode boundary: the episode that ended (if any) and the one that started (if any).

    Attributes:
        ended: the closed episode (state ENDED, with the robot's outcome).
        final_steps: steps ``end`` scored before judging (the newest, not yet scored frame).
        end_events: the end-of-episode verdict events (only when the ending reports a verdict).
        verdict: the ended episode's verdict for its recording label ("succeeded", "failed:STALLED", ...).
        started: the new episode.
        reason: why, e.g. "new instruction", "reset", "end_episode", "camera time jumped back 12.0 s".
        was_failed: the ended episode had a failure raised at its end (a latched flag to clear).
        kept: the ``keep`` of the frame ``end`` admitted to score the episode's last frame (the node records it).
    """

    ended: EpisodeSnapshot | None
    final_steps: tuple[StepResult, ...]
    end_events: tuple[Event, ...]
    verdict: str
    started: EpisodeSnapshot | None
    reason: str
    was_failed: bool = False
    kept: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Offer:
    """What ``offer`` did with a frame.

    Attributes:
        admitted: the frame is in the episode now.
        drop_reason: why not: rate, duplicate_stamp, out_of_order, stamp_jump, bad_stamp, no_instruction
            ("" when admitted; a frame whose decoding raised is counted as bad_image and the error propagates).
        kept: the ``keep`` objects of every frame this call admitted (this frame's, and on a confirmed time
            jump the held-back frames'), oldest first: the node records those messages.
        change: the episode restart a confirmed time jump caused.
    """

    admitted: bool
    drop_reason: str = ""
    kept: tuple[Any, ...] = ()
    change: EpisodeChange | None = None


# ---------------------------------------------------------------------------------------------- internals
class _Frame:
    """The FrameStore payload of one admitted frame (owned by the session, mutated under its lock)."""

    __slots__ = ("camera_frame_id", "encode_failed", "encoded", "image")

    def __init__(self, camera_frame_id: str, image: np.ndarray) -> None:
        self.camera_frame_id = camera_frame_id
        self.image: np.ndarray | None = image  # dropped once the engine holds the features
        self.encoded = False
        self.encode_failed = False


@dataclass
class _Episode:
    episode_id: str
    instruction: str
    store: FrameStore
    monitor: EpisodeMonitor
    state: EpisodeState = EpisodeState.WAITING
    outcome: Outcome = Outcome.UNKNOWN
    steps: int = 0
    start_stamp_ns: int | None = None
    issued: int | None = None  # newest frame id handed out in a score job
    scored: int | None = None  # newest frame id whose step was applied
    scored_stamp_ns: int = 0
    scored_camera_frame_id: str = ""
    previous_progress: float | None = None
    progress: float = math.nan
    success_probability: float = math.nan
    # the newest frame the admission rate dropped (stamp, camera frame id, source, keep): end() scores it
    tail: tuple[int, str, ImageSource, Any] | None = None
    # frames of a time jump not yet confirmed: (stamp, camera frame id, image, keep)
    jump: list[tuple[int, str, np.ndarray, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class EncodeJob:
    """Encode one admitted frame ahead of time (the engine caches its features)."""

    episode: _Episode
    frame_id: int
    image: np.ndarray


@dataclass(frozen=True)
class ScoreJob:
    """Score the newest state: the selected frames (oldest first) and the images still to encode."""

    episode: _Episode
    instruction: str
    selection: tuple[tuple[int, int], ...]  # (stamp_ns, frame id)
    to_encode: tuple[tuple[int, np.ndarray], ...]


Job = EncodeJob | ScoreJob


class ScoringSession:
    """One reward-model scoring session over an engine (see the module docstring).

    Args:
        engine: a RewardEngine (or anything with ``add_frame``, ``score``, ``forget`` and ``num_frames``;
            optional ``score_batch`` and ``check_instruction``).
        config: admission, scheduling, reward and monitor settings.
        clock: wall-clock seconds for ``scoring_rate`` (``time.monotonic``); offline tools keep the default.
        episode_ids: makes episode ids (``new_episode_id``).
    """

    def __init__(self, engine: Any, config: SessionConfig | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 episode_ids: Callable[[], str] = new_episode_id) -> None:
        self.engine = engine
        self._config = config or SessionConfig()
        if int(engine.num_frames) != self._config.num_frames:
            raise ValueError(f"the engine scores {engine.num_frames} frames per step but the session is "
                             f"configured for num_frames {self._config.num_frames}")
        self._clock = clock
        self._episode_ids = episode_ids
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._engine_lock = threading.Lock()
        self._episode: _Episode | None = None
        self._next_frame_id = 0
        self._to_forget: list[int] = []  # frame ids whose features the engine may drop
        self._outstanding = 0  # score jobs handed out and not yet run
        self._next_step_due = 0.0
        self._closed = False
        self.received = 0
        self.admitted = 0
        self.dropped: Counter[str] = Counter()

    # ------------------------------------------------------------------ settings and state
    @property
    def config(self) -> SessionConfig:
        """The settings in use."""
        return self._config

    def configure(self, config: SessionConfig) -> None:
        """New settings: the monitor thresholds, reward mode and scoring rate apply at once, the admission
        rate and frame budget from the next episode."""
        if config.num_frames != self._config.num_frames:
            raise ValueError("num_frames cannot change during a session")
        with self._lock:
            self._config = config
            if self._episode is not None:
                self._episode.monitor.config = config.monitor
            self._wake.notify_all()

    @property
    def episode(self) -> EpisodeSnapshot | None:
        """The current episode, or None before the first instruction."""
        with self._lock:
            return None if self._episode is None else self._snapshot(self._episode)

    def counters(self) -> dict[str, int]:
        """received / admitted / dropped (all) and dropped.<reason>, for diagnostics."""
        with self._lock:
            values = {"frames_received": self.received, "frames_admitted": self.admitted,
                      "frames_dropped": sum(self.dropped.values())}
            values.update({f"frames_dropped.{k}": v for k, v in sorted(self.dropped.items())})
            if self._episode is not None:
                values["episode_frames_kept"] = len(self._episode.store)
                values["frames_waiting_for_encoding"] = sum(
                    1 for f in self._episode.store.frames() if f.payload.image is not None)
            return values

    def check_instruction(self, instruction: str) -> None:
        """Raise ValueError when the engine cannot score this instruction (empty, or its prompt longer than
        the bundle takes); the message says why."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("empty instruction: Robometer scores progress towards a task description")
        check = getattr(self.engine, "check_instruction", None)
        if callable(check):
            check(instruction)

    # ------------------------------------------------------------------ episodes
    def start(self, instruction: str, reason: str = "new instruction") -> EpisodeChange:
        """End the current episode (no verdict reported) and start one for ``instruction``.

        Raises:
            ValueError: the instruction cannot be scored (``check_instruction``); nothing changes then.
        """
        self.check_instruction(instruction)
        with self._lock:
            return self._restart_locked(instruction, reason)

    def reset(self) -> EpisodeChange:
        """End the current episode (no verdict reported) and start a new one with the same instruction.

        Raises:
            LookupError: there is no episode (no instruction yet).
        """
        with self._lock:
            if self._episode is None:
                raise LookupError("no episode: no instruction received yet")
            return self._restart_locked(self._episode.instruction, "reset")

    def end(self, outcome: Outcome | int = Outcome.UNKNOWN, restart: bool = True,
            reason: str = "end_episode") -> EpisodeChange:
        """Close the episode with the robot's outcome and the monitor's end-of-episode verdict.

        Scores the newest frame first if no step has scored it (the last frame the admission rate dropped
        included), so the verdict sees the episode's end. With ``restart`` a new episode with the same
        instruction starts right after (as ``~/end_episode`` does).

        Raises:
            LookupError: there is no episode (no instruction yet).
        """
        outcome = Outcome(outcome)
        with self._engine_lock:
            with self._lock:
                episode = self._episode
                if episode is None:
                    raise LookupError("no episode: no instruction received yet")
                kept = self._admit_tail_locked(episode)
                job = self._score_job_locked(episode, force=True)
            final: tuple[StepResult, ...] = ()
            if job is not None:
                try:
                    result = self._run_score(job)
                finally:
                    self._finish(1)
                final = (result,) if result is not None else ()
            with self._lock:
                if self._episode is not episode:  # ended meanwhile by another call
                    return EpisodeChange(None, final, (), "", None, reason, kept=kept)
                stamp_ns = max(episode.scored_stamp_ns, episode.store.newest_stamp_ns or 0)
                events = tuple(episode.monitor.end(stamp_ns / NS_PER_S, outcome))
                change = self._close_locked(episode, outcome, reason, final, events)
                started = self._open_locked(episode.instruction) if restart else None
                self._flush_forgets_locked()
                return replace(change, started=started, kept=kept)

    # ------------------------------------------------------------------ frames
    def offer(self, stamp_ns: int, camera_frame_id: str, image: ImageSource, keep: Any = None) -> Offer:
        """Offer one camera frame (its ``header.stamp`` in ns and ``header.frame_id``).

        ``image`` is a uint8 RGB array or a zero-argument callable returning one; a callable is called only
        when the frame is admitted (or held back by a time jump), outside the session's lock, and whatever it
        raises propagates (nothing is counted then: the caller counts its bad images). ``keep`` is returned
        in ``Offer.kept`` when the frame is admitted (the node passes the message it records).
        """
        with self._lock:
            self.received += 1
            verdict = self._classify_locked(int(stamp_ns), camera_frame_id, image, keep)
            if isinstance(verdict, Offer):
                return verdict
        try:
            decoded = _as_rgb(image() if callable(image) else image)
        except Exception:
            with self._lock:
                self.dropped["bad_image"] += 1  # every frame received is admitted or counted as dropped
            raise
        with self._lock:
            episode = self._episode
            if episode is None:
                self.dropped["no_instruction"] += 1
                return Offer(False, "no_instruction")
            if verdict == "jump":
                return self._hold_jump_locked(episode, int(stamp_ns), camera_frame_id, decoded, keep)
            episode.jump.clear()
            admitted = self._admit_locked(episode, int(stamp_ns), camera_frame_id, decoded)
            if not admitted.admitted:
                return admitted
            return Offer(True, kept=(keep,))

    def _classify_locked(self, stamp_ns: int, camera_frame_id: str, image: ImageSource, keep: Any) -> Offer | str:
        """Drop a frame by its stamp before anybody decodes it, or say "admit" / "jump"."""
        if stamp_ns < 0:
            self.dropped["bad_stamp"] += 1
            return Offer(False, "bad_stamp")
        episode = self._episode
        if episode is None:
            self.dropped["no_instruction"] += 1
            return Offer(False, "no_instruction")
        newest = episode.store.newest_stamp_ns
        if newest is not None:
            ahead = stamp_ns - newest
            if ahead > self._config.max_stamp_jump_s * NS_PER_S or -ahead > self._config.stamp_reset_s * NS_PER_S:
                return "jump"
            held = episode.jump
            if held and ahead <= 0 and 0 < stamp_ns - held[-1][0] <= self._config.max_stamp_jump_s * NS_PER_S:
                return "jump"  # the next frame of a time line that jumped back, catching up on the old one
        status = episode.store.would_admit(stamp_ns)
        if status is AdmissionStatus.ADMITTED:
            return "admit"
        episode.store.add(stamp_ns, None)  # counts the drop in the store
        reason = _DROP_REASONS[status]
        self.dropped[reason] += 1
        if status is AdmissionStatus.DROPPED_RATE:
            episode.tail = (stamp_ns, camera_frame_id, image, keep)
        return Offer(False, reason)

    def _admit_locked(self, episode: _Episode, stamp_ns: int, camera_frame_id: str, image: np.ndarray,
                      ignore_rate: bool = False) -> Offer:
        frame_id = self._next_frame_id
        self._next_frame_id += 1
        admission = episode.store.add(stamp_ns, frame_id, _Frame(camera_frame_id, image), ignore_rate=ignore_rate)
        if not admission.admitted:  # the store changed between the check and now (another offer)
            reason = _DROP_REASONS[admission.status]
            self.dropped[reason] += 1
            return Offer(False, reason)
        self._to_forget.extend(admission.evicted)
        self.admitted += 1
        if episode.start_stamp_ns is None:
            episode.start_stamp_ns = stamp_ns
        if episode.tail is not None and episode.tail[0] <= stamp_ns:
            episode.tail = None
        self._wake.notify_all()
        return Offer(True)

    def _hold_jump_locked(self, episode: _Episode, stamp_ns: int, camera_frame_id: str, image: np.ndarray,
                          keep: Any) -> Offer:
        """Hold a frame of a possible new time line; start a new episode once enough frames agree."""
        held = episode.jump
        if held and not (0 < stamp_ns - held[-1][0] <= self._config.max_stamp_jump_s * NS_PER_S):
            held.clear()  # not the same new time line: start over from this frame
        held.append((stamp_ns, camera_frame_id, image, keep))
        self.dropped["stamp_jump"] += 1  # until confirmed (then it is admitted after all)
        if len(held) < self._config.jump_confirm_frames:
            return Offer(False, "stamp_jump")
        newest = episode.store.newest_stamp_ns or 0
        jump_s = (held[0][0] - newest) / NS_PER_S
        direction = f"forward {jump_s:.1f} s" if jump_s > 0 else f"back {-jump_s:.1f} s"
        frames = list(held)
        held.clear()
        self._uncount("stamp_jump", len(frames))
        change = self._restart_locked(episode.instruction, f"camera time jumped {direction}")
        new = self._episode
        assert new is not None
        kept = []
        for stamp, cam, img, kept_obj in frames:
            if self._admit_locked(new, stamp, cam, img, ignore_rate=True).admitted:
                kept.append(kept_obj)
        return Offer(True, kept=tuple(kept), change=change)

    def _admit_tail_locked(self, episode: _Episode) -> tuple[Any, ...]:
        """Admit the newest rate-dropped frame (decoding it now) so that the episode's end gets scored; its
        ``keep`` (empty when there was none to admit)."""
        tail, episode.tail = episode.tail, None
        if tail is None:
            return ()
        stamp_ns, camera_frame_id, source, keep = tail
        newest = episode.store.newest_stamp_ns
        if newest is not None and stamp_ns <= newest:
            return ()
        try:
            image = _as_rgb(source() if callable(source) else source)
        except Exception:  # it was never checked: a frame that cannot be decoded is simply not the end
            return ()
        if not self._admit_locked(episode, stamp_ns, camera_frame_id, image, ignore_rate=True).admitted:
            return ()
        self._uncount("rate", 1)  # it was counted as dropped when it arrived; now it is admitted
        return (keep,)

    def _uncount(self, reason: str, count: int) -> None:
        self.dropped[reason] -= count
        if self.dropped[reason] <= 0:
            del self.dropped[reason]

    # ------------------------------------------------------------------ the worker
    def next_job(self, timeout: float | None = 0.0) -> Job | None:
        """The next piece of work: score the newest state when it is due, else encode a frame ahead of time.

        Waits up to ``timeout`` seconds (None = until there is work or ``close``); 0 returns at once.
        """
        deadline = None if timeout is None else self._clock() + timeout
        with self._wake:
            while not self._closed:
                episode = self._episode
                wait: float | None = None
                if episode is not None:
                    now = self._clock()
                    if now >= self._next_step_due:
                        job = self._score_job_locked(episode)
                        if job is not None:
                            rate = self._config.scoring_rate
                            self._next_step_due = now + (1.0 / rate if rate > 0 else 0.0)
                            return job
                    elif self._has_unscored_locked(episode):
                        wait = self._next_step_due - now
                    encode = self._encode_job_locked(episode)
                    if encode is not None:
                        return encode
                left = None if deadline is None else deadline - self._clock()
                if left is not None and left <= 0:
                    return None
                waits = [w for w in (wait, left) if w is not None]
                self._wake.wait(min(waits) if waits else None)
            return None

    def run(self, job: Job) -> StepResult | None:
        """Do one job (engine calls); for a score job, the StepResult (None when its episode ended meanwhile).

        Never raises for engine failures: they become a model-error StepResult (or, for an encode job, a
        retry when a step needs the frame).
        """
        with self._engine_lock:
            if isinstance(job, ScoreJob):
                try:
                    return self._run_score(job)
                finally:
                    self._finish(1)
            self._run_encode(job)
            self._finish(0)
            return None

    def run_batch(self, jobs: Sequence[ScoreJob]) -> list[StepResult]:
        """Score several jobs of one episode in one engine call where the engine allows (``score_batch``),
        then apply them in order; the results equal ``run`` on each in turn (offline replay)."""
        jobs = [j for j in jobs if isinstance(j, ScoreJob)]
        if not jobs:
            return []
        batch = getattr(self.engine, "score_batch", None)
        same = len({(id(j.episode), j.instruction) for j in jobs}) == 1
        if not callable(batch) or not same or len(jobs) == 1:
            return [r for r in (self.run(j) for j in jobs) if r is not None]
        results: list[StepResult | None] = []
        with self._engine_lock:
            try:
                started = time.perf_counter()
                try:
                    for job in jobs:
                        self._encode_for(job)
                    scores = batch(jobs[0].instruction, [[fid for _, fid in j.selection] for j in jobs])
                    each = (time.perf_counter() - started) / len(jobs)
                    results = [self._apply(job, score, each) for job, score in zip(jobs, scores)]
                except Exception:  # one at a time instead: an error lands on the step it belongs to
                    results = [self._run_score(j) for j in jobs]
            finally:
                self._finish(len(jobs))
        return [r for r in results if r is not None]

    def close(self) -> None:
        """Stop waiting in ``next_job`` (the worker exits); the session keeps its state."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()

    def reopen(self) -> None:
        """Let ``next_job`` hand out work again after ``close`` (a node re-activated)."""
        with self._lock:
            self._closed = False

    def clear(self) -> EpisodeChange | None:
        """End the current episode without a verdict and drop it (node cleanup); None if there was none."""
        with self._engine_lock, self._lock:
            episode = self._episode
            if episode is None:
                return None
            change = self._close_locked(episode, episode.outcome, "cleanup", (), ())
            self._episode = None
            self._flush_forgets_locked()
            return change

    # ------------------------------------------------------------------ scheduling internals
    def _has_unscored_locked(self, episode: _Episode) -> bool:
        newest = episode.store.newest
        return newest is not None and newest.frame_id != episode.issued

    def _score_job_locked(self, episode: _Episode, force: bool = False) -> ScoreJob | None:
        newest = episode.store.newest
        if newest is None:
            return None
        if newest.frame_id == (episode.scored if force else episode.issued):
            return None
        selection = tuple(episode.store.select(self._config.num_frames))
        to_encode = []
        for _, fid in dict.fromkeys(selection):
            frame: _Frame = episode.store.payload(fid)
            if not frame.encoded and frame.image is not None:
                to_encode.append((fid, frame.image))
        episode.issued = newest.frame_id
        self._outstanding += 1
        return ScoreJob(episode, episode.instruction, selection, tuple(to_encode))

    def _encode_job_locked(self, episode: _Episode) -> EncodeJob | None:
        # Newest first: it is the one the next step needs.
        for stored in reversed(episode.store.frames()):
            frame: _Frame = stored.payload
            if not frame.encoded and not frame.encode_failed and frame.image is not None:
                return EncodeJob(episode, stored.frame_id, frame.image)
        return None

    def _finish(self, jobs: int) -> None:
        """``jobs`` score jobs are done (engine lock held); free features when no issued job needs them."""
        with self._lock:
            self._outstanding -= jobs
            self._flush_forgets_locked()

    def _flush_forgets_locked(self) -> None:
        """Free the engine features of frames no episode keeps any more (both locks held). A frame evicted
        after a score job was handed out may still be in that job's selection, so features are only freed
        when every handed-out job has run."""
        if self._to_forget and self._outstanding <= 0:
            ids, self._to_forget = self._to_forget, []
            self.engine.forget(ids)

    def _mark_encoded(self, episode: _Episode, frame_id: int) -> None:
        if frame_id in episode.store:
            frame: _Frame = episode.store.payload(frame_id)
            frame.encoded, frame.encode_failed, frame.image = True, False, None
        else:  # evicted (or its episode ended) while it was being encoded
            self._to_forget.append(frame_id)

    def _run_encode(self, job: EncodeJob) -> None:
        try:
            self.engine.add_frame(job.frame_id, job.image)
        except Exception:
            # Keep the image: the step that needs this frame retries it (a persistent failure becomes a
            # model error there); it is not encoded ahead of time again, so there is no hot loop.
            with self._lock:
                if job.frame_id in job.episode.store:
                    job.episode.store.payload(job.frame_id).encode_failed = True
            return
        with self._lock:
            self._mark_encoded(job.episode, job.frame_id)

    def _encode_for(self, job: ScoreJob) -> None:
        for fid, image in job.to_encode:
            with self._lock:
                if fid in job.episode.store and job.episode.store.payload(fid).encoded:
                    continue
            try:
                self.engine.add_frame(fid, image)
            except Exception:  # once more: a transient failure (a GPU hiccup) must not cost the step
                self.engine.add_frame(fid, image)
            with self._lock:
                self._mark_encoded(job.episode, fid)

    def _run_score(self, job: ScoreJob) -> StepResult | None:
        """Encode what the job needs, score it and apply the result (engine lock held)."""
        started = time.perf_counter()
        try:
            self._encode_for(job)
            scores = self.engine.score(job.instruction, [fid for _, fid in job.selection])
        except Exception as err:
            return self._apply_error(job, f"{type(err).__name__}: {err}")
        return self._apply(job, scores, time.perf_counter() - started)

    def _apply(self, job: ScoreJob, scores: Any, inference_time: float) -> StepResult | None:
        """Turn the engine's scores into a StepResult and feed the monitor (in step order)."""
        count = len(job.selection)
        progress = np.asarray(scores.progress, dtype=np.float64)
        success = np.asarray(scores.success_probability, dtype=np.float64)
        if progress.shape != (count,) or success.shape != (count,):
            return self._apply_error(job, f"engine returned {progress.shape} progress / {success.shape} success "
                                          f"values for {count} frames")
        with self._lock:
            episode = job.episode
            if self._episode is not episode:
                return None  # the episode ended while we scored: its result is stale
            stamp_ns, newest_id = job.selection[-1]
            camera_frame_id = self._camera_frame_id(episode, newest_id)
            value = _unit(progress[-1])
            probability = _unit(success[-1])
            mode = self._config.reward_mode
            if mode == "progress":
                reward = value
            elif mode == "success":
                reward = probability
            else:
                previous = episode.previous_progress
                reward = 0.0 if previous is None or not math.isfinite(previous) else value - previous
            before = episode.state
            step = episode.steps
            episode.steps += 1
            episode.scored, episode.scored_stamp_ns = newest_id, stamp_ns
            episode.scored_camera_frame_id = camera_frame_id
            episode.previous_progress = value
            episode.progress, episode.success_probability = value, probability
            events = tuple(episode.monitor.update(stamp_ns / NS_PER_S, value, probability))
            episode.state = self._state_of(episode)
            return StepResult(
                episode_id=episode.episode_id, step=step, instruction=job.instruction, stamp_ns=stamp_ns,
                camera_frame_id=camera_frame_id, frame_stamps_ns=tuple(s for s, _ in job.selection),
                progress=value, success_probability=probability, frame_progress=progress,
                frame_success_probability=success, reward_mode=mode, reward=float(reward),
                frames_in_episode=episode.store.counters.admitted, inference_time=float(inference_time),
                events=events, status=self._snapshot(episode), status_changed=episode.state != before,
            )

    def _apply_error(self, job: ScoreJob, detail: str) -> StepResult | None:
        with self._lock:
            episode = job.episode
            if self._episode is not episode:
                return None
            stamp_ns, newest_id = job.selection[-1]
            before = episode.state
            step = episode.steps
            episode.steps += 1
            episode.scored, episode.scored_stamp_ns = newest_id, stamp_ns  # wait for a new frame to retry
            episode.scored_camera_frame_id = self._camera_frame_id(episode, newest_id)
            events = tuple(episode.monitor.model_error(stamp_ns / NS_PER_S, detail))
            episode.state = self._state_of(episode)
            nan = np.full(len(job.selection), np.nan)
            return StepResult(
                episode_id=episode.episode_id, step=step, instruction=job.instruction, stamp_ns=stamp_ns,
                camera_frame_id=episode.scored_camera_frame_id,
                frame_stamps_ns=tuple(s for s, _ in job.selection), progress=math.nan,
                success_probability=math.nan, frame_progress=nan, frame_success_probability=nan,
                reward_mode=self._config.reward_mode, reward=math.nan,
                frames_in_episode=episode.store.counters.admitted, inference_time=0.0, events=events,
                status=self._snapshot(episode), status_changed=episode.state != before, error=detail,
            )

    # ------------------------------------------------------------------ episode internals
    @staticmethod
    def _state_of(episode: _Episode) -> EpisodeState:
        if episode.state is EpisodeState.ENDED:
            return EpisodeState.ENDED
        if episode.monitor.failed:
            return EpisodeState.FAILED
        if episode.monitor.succeeded:
            return EpisodeState.SUCCEEDED
        return EpisodeState.RUNNING if episode.steps else EpisodeState.WAITING

    @staticmethod
    def _camera_frame_id(episode: _Episode, frame_id: int) -> str:
        if frame_id in episode.store:
            return episode.store.payload(frame_id).camera_frame_id
        return episode.scored_camera_frame_id

    def _snapshot(self, episode: _Episode) -> EpisodeSnapshot:
        stamp = episode.scored_stamp_ns or (episode.store.newest_stamp_ns or 0)
        camera = episode.scored_camera_frame_id
        if not camera and episode.store.newest is not None:
            camera = episode.store.newest.payload.camera_frame_id
        return EpisodeSnapshot(
            episode_id=episode.episode_id, instruction=episode.instruction, state=episode.state,
            outcome=episode.outcome, steps=episode.steps, frames=episode.store.counters.admitted,
            start_stamp_ns=episode.start_stamp_ns, stamp_ns=stamp, camera_frame_id=camera,
            progress=episode.progress, success_probability=episode.success_probability,
            max_progress=episode.monitor.max_progress, failure=episode.monitor.failure,
            verdict=episode.monitor.verdict,
        )

    def _open_locked(self, instruction: str) -> EpisodeSnapshot:
        cfg = self._config
        episode = _Episode(
            episode_id=self._episode_ids(), instruction=instruction,
            store=FrameStore(cfg.frame_rate, cfg.max_frames_per_episode), monitor=EpisodeMonitor(cfg.monitor),
        )
        self._episode = episode
        self._next_step_due = 0.0
        self._wake.notify_all()
        return self._snapshot(episode)

    def _close_locked(self, episode: _Episode, outcome: Outcome, reason: str,
                      final: tuple[StepResult, ...], events: tuple[Event, ...]) -> EpisodeChange:
        was_failed = episode.monitor.failed
        verdict = episode.monitor.verdict
        episode.state = EpisodeState.ENDED
        episode.outcome = outcome
        self._to_forget.extend(f.frame_id for f in episode.store.frames())
        episode.store.clear()
        episode.jump.clear()
        episode.tail = None
        return EpisodeChange(self._snapshot(episode), final, events, verdict, None, reason, was_failed)

    def _restart_locked(self, instruction: str, reason: str) -> EpisodeChange:
        old = self._episode
        change = EpisodeChange(None, (), (), "", None, reason)
        if old is not None:
            change = self._close_locked(old, old.outcome, reason, (), ())
        started = self._open_locked(instruction)
        return replace(change, started=started)


_DROP_REASONS = {
    AdmissionStatus.DROPPED_RATE: "rate",
    AdmissionStatus.DROPPED_DUPLICATE: "duplicate_stamp",
    AdmissionStatus.DROPPED_OUT_OF_ORDER: "out_of_order",
}


def _unit(value: float) -> float:
    """A score clipped to [0, 1]; NaN stays NaN (the monitor turns it into a model error)."""
    value = float(value)
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else value


def _as_rgb(image: Any) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"a frame must be uint8 RGB [H, W, 3], got {array.dtype} {list(array.shape)}")
    return array


# ---------------------------------------------------------------------------------------------- offline
@dataclass(frozen=True)
class EpisodeReplay:
    """One episode scored offline exactly as the node scores it live.

    Attributes:
        episode_id: the session's episode id (not the dataset's).
        instruction: what it was scored against.
        steps: every scoring step in order, including the steps ``end`` scored.
        end: the EpisodeChange of its end (verdict events, final snapshot).
        frames_offered: frames offered; ``frames_admitted`` of them were admitted.
    """

    episode_id: str
    instruction: str
    steps: tuple[StepResult, ...]
    end: EpisodeChange
    frames_offered: int
    frames_admitted: int

    @property
    def events(self) -> list[Event]:
        """Every verdict event of the episode, in order (the end verdict last)."""
        return [e for s in self.steps for e in s.events] + list(self.end.end_events)

    @property
    def alarms(self) -> list[Event]:
        """The failures raised during the episode or at its end (what a trigger / flag subscriber sees)."""
        return [e for e in self.events if e.kind is EventKind.FAILURE_RAISED]

    @property
    def verdict(self) -> str:
        """The episode's verdict after its end ("succeeded" or "failed:<REASON>")."""
        return self.end.ended.verdict if self.end.ended is not None else ""

    def step_scores(self) -> np.ndarray:
        """[steps, 3] float64: (stamp seconds, progress, success probability) per step, NaN for model errors;
        enough to re-run the monitor with other thresholds (``monitor_events``)."""
        return np.asarray([(s.stamp_ns / NS_PER_S, s.progress, s.success_probability) for s in self.steps],
                          dtype=np.float64).reshape(-1, 3)


def replay(session: ScoringSession, instruction: str, stamps_ns: Iterable[int], frames: Iterable[Any],
           outcome: Outcome | int = Outcome.UNKNOWN, camera_frame_id: str = "camera",
           batch_size: int = 16) -> EpisodeReplay:
    """Score one recorded episode through ``session`` as the node would live with an engine fast enough to
    score every admitted frame: each frame is offered at its stamp, every admitted frame gets a step, and
    the episode is closed with ``end(outcome)`` (which scores the last frame if the rate dropped it).

    Steps are scored ``batch_size`` at a time where the engine has ``score_batch`` (same results).
    """
    session.start(instruction, reason="replay")
    pending: list[ScoreJob] = []
    steps: list[StepResult] = []
    offered = 0

    def drain(block: list[ScoreJob]) -> None:
        steps.extend(session.run_batch(block))
        block.clear()

    for stamp_ns, frame in zip(stamps_ns, frames):
        offered += 1
        session.offer(int(stamp_ns), camera_frame_id, frame)
        job = session.next_job(0.0)
        # Encode jobs are left to the score jobs (they carry the images), so that no feature is freed
        # while a handed-out job still needs it.
        if isinstance(job, ScoreJob):
            pending.append(job)
            if len(pending) >= batch_size:
                drain(pending)
    drain(pending)
    change = session.end(outcome, restart=False, reason="replay end")
    steps.extend(change.final_steps)
    ended = change.ended
    assert ended is not None
    return EpisodeReplay(ended.episode_id, instruction, tuple(steps), change, offered, ended.frames)


def monitor_events(step_scores: np.ndarray, config: MonitorConfig, end_stamp_s: float | None = None,
                   outcome: Outcome | int = Outcome.UNKNOWN) -> list[Event]:
    """The events an EpisodeMonitor with ``config`` gives for recorded steps (``EpisodeReplay.step_scores``)
    and the end of the episode: the node's verdicts under other thresholds without re-running the model."""
    monitor = EpisodeMonitor(config)
    events: list[Event] = []
    for stamp_s, progress, success in np.asarray(step_scores, dtype=np.float64).reshape(-1, 3):
        events += monitor.update(float(stamp_s), float(progress), float(success))
    last = float(step_scores[-1, 0]) if len(step_scores) else 0.0
    events += monitor.end(last if end_stamp_s is None else max(float(end_stamp_s), last), outcome)
    return events
