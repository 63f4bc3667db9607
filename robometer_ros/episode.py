"""Per-episode frame bookkeeping for the reward node: which frames to keep and which to score.

Pure numpy (no torch, no rclpy), so everything here is unit-tested without ROS.

* ``subsample_indices(n, k)`` is the official Robometer frame rule (``linspace_subsample_frames`` +
  ``pad_trajectory_to_max_frames``): ``rint(linspace(0, n-1, k))`` with the first and last frames
  forced and the result made non-decreasing; fewer than ``k`` frames are right-padded by repeating
  the last index.
* ``FrameStore`` holds one episode's admitted frames by camera stamp (``header.stamp``, never the wall
  clock). It admits at most ``admission_rate_hz`` frames per second of camera time, drops duplicate and
  out-of-order stamps (counted), and keeps memory bounded on long episodes by thinning evenly: it keeps
  every ``stride``-th admitted frame (the stride doubles whenever the store is full) plus the newest one,
  so the kept frames stay evenly spread over the whole episode and the 8-frame subsample of the kept
  frames approximates the official subsample of every admitted frame.

The store holds frame ids and stamps (and an optional payload, e.g. the image for a recorder); the
frame's model features live in the RewardEngine's cache under the same id. Every id the store lets go
of is reported (``Admission.evicted``, ``clear()``) so the caller can ``RewardEngine.forget`` it.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NS_PER_S = 1_000_000_000

# A frame that arrives up to this fraction of the admission period early is still admitted, so camera
# jitter does not halve the rate when the camera runs at (or near) the admission rate. The long-run rate
# still never exceeds admission_rate_hz, because the admission schedule advances by whole periods.
_EARLY_TOLERANCE = 0.25


def subsample_indices(n: int, k: int = 8) -> list[int]:
    """Indices of the ``k`` frames the model scores out of ``n`` frames (oldest first).

    The official Robometer rule: ``np.rint(np.linspace(0, n - 1, k))``, with index 0 and ``n - 1`` forced
    and the sequence made non-decreasing. When ``n < k`` the ``n`` frames are all used and the list is
    right-padded by repeating the last index (official ``pad_trajectory_to_max_frames``), so the result
    always has exactly ``k`` entries and always starts at 0 and ends at ``n - 1``.

    Raises:
        ValueError: ``n`` < 1 (nothing to score) or ``k`` < 1.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"subsample_indices needs at least one frame, got n={n!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"subsample_indices needs k >= 1 frames to select, got k={k!r}")
    n, k = int(n), int(k)
    if n < k:
        return list(range(n)) + [n - 1] * (k - n)
    idx = np.rint(np.linspace(0, n - 1, k)).astype(np.int64)
    idx[0] = 0
    idx[-1] = n - 1
    idx = np.maximum.accumulate(idx)
    return [int(i) for i in idx]


class AdmissionStatus(enum.Enum):
    """What ``FrameStore.add`` did with a frame."""

    ADMITTED = "admitted"
    # Arrived sooner (in camera time) than the admission rate allows after the previous admitted frame.
    DROPPED_RATE = "dropped_rate"
    # Same stamp as the newest admitted frame (a re-published frame, or a camera that leaves stamps at 0).
    DROPPED_DUPLICATE = "dropped_duplicate"
    # Older than the newest admitted frame (reordering transport, bag loop, clock jump back).
    DROPPED_OUT_OF_ORDER = "dropped_out_of_order"


@dataclass(frozen=True)
class Admission:
    """The outcome of one ``FrameStore.add`` call.

    Attributes:
        status: admitted, or why the frame was dropped.
        frame_id: the id that was offered.
        evicted: ids the store let go of because of this call (the previous newest frame when it is not
            on the thinning grid, and frames thinned out when the store was full). The caller should
            ``forget`` them in the engine's feature cache. Never contains ``frame_id`` itself.
    """

    status: AdmissionStatus
    frame_id: Hashable
    evicted: tuple[Hashable, ...] = ()

    @property
    def admitted(self) -> bool:
        """True when the frame is now in the store."""
        return self.status is AdmissionStatus.ADMITTED


@dataclass
class FrameStoreCounters:
    """Running counts of a FrameStore; every frame offered is either admitted or counted as dropped.

    ``evicted`` counts admitted frames later let go of by thinning (they were admitted, so they are not
    in any dropped count).
    """

    admitted: int = 0
    dropped_rate: int = 0
    dropped_duplicate: int = 0
    dropped_out_of_order: int = 0
    evicted: int = 0

    @property
    def dropped(self) -> int:
        """All frames dropped at admission, whatever the reason."""
        return self.dropped_rate + self.dropped_duplicate + self.dropped_out_of_order

    @property
    def offered(self) -> int:
        """Frames offered to ``add`` so far (admitted + dropped)."""
        return self.admitted + self.dropped


@dataclass(frozen=True)
class StoredFrame:
    """One kept frame: camera stamp (ns), caller's id, optional payload, and its admission sequence number."""

    stamp_ns: int
    frame_id: Hashable
    payload: Any = field(default=None, compare=False, repr=False)
    sequence: int = 0


class FrameStore:
    """One episode's admitted frames, keyed by camera stamp, with bounded memory.

    Policy (each choice is tested in test/unit/test_episode.py):

    * Time is the camera's: ``stamp_ns`` is the image's ``header.stamp`` in nanoseconds.
    * Admission rate: with ``admission_rate_hz > 0`` frames are admitted on a schedule that advances by one
      period per admitted frame (a frame up to a quarter period early is accepted, to absorb jitter), so a
      faster camera is thinned to that rate and the long-run admitted rate never exceeds it. After a gap
      longer than a period the schedule restarts at the next frame. ``0`` admits every frame.
    * Duplicate stamps (equal to the newest admitted stamp) are dropped and counted: a camera that leaves
      ``header.stamp`` at zero shows up here as every frame after the first being a duplicate.
    * Out-of-order stamps (older than the newest admitted frame) are dropped and counted, not inserted: the
      episode's already-scored history stays as it was, and a camera stream is in order in normal
      operation. A clock that jumps back (bag loop, simulator reset) therefore drops every frame until the
      caller starts a new episode; ``counters.dropped_out_of_order`` makes that visible.
    * Bounded memory with even thinning: every admitted frame gets a sequence number 0, 1, 2, ...; the store
      keeps the frames whose sequence number is a multiple of ``stride`` plus always the newest frame. When
      that would exceed ``max_frames`` the stride doubles and the frames off the new grid are evicted. The
      first frame (sequence 0) is on every grid, so it is never evicted; the newest is always kept; the
      kept frames are evenly spaced in admission order, so an index subsample of them spans the episode as
      the official subsample of all frames does.

    Not thread-safe: the node guards it with its own lock.
    """

    def __init__(self, admission_rate_hz: float = 0.0, max_frames: int = 256) -> None:
        """Create an empty store.

        Args:
            admission_rate_hz: at most this many frames admitted per second of camera time; 0 admits all.
            max_frames: most frames kept at once (at least 3). Thinning halves the kept frames, so keep it
                at least twice the model's frame count (16 for 8 frames) for the subsample to always find
                that many distinct frames once they have been admitted.

        Raises:
            ValueError: a negative or non-finite rate, or ``max_frames`` < 3.
        """
        try:
            rate = float(admission_rate_hz)
        except (TypeError, ValueError):
            rate = float("nan")
        if not np.isfinite(rate) or rate < 0.0:
            raise ValueError(
                f"admission_rate_hz must be a finite number >= 0 (0 = admit all), got {admission_rate_hz!r}"
            )
        if isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) or max_frames < 3:
            raise ValueError(f"max_frames must be an integer >= 3, got {max_frames!r}")
        self._rate_hz = rate
        self._period_ns = round(NS_PER_S / rate) if rate > 0.0 else 0
        self._tolerance_ns = int(self._period_ns * _EARLY_TOLERANCE)
        self._max_frames = int(max_frames)
        self._frames: list[StoredFrame] = []
        self._by_id: dict[Hashable, StoredFrame] = {}
        self._stride = 1
        self._next_sequence = 0
        self._next_due_ns: int | None = None
        self._newest_stamp_ns: int | None = None
        self.counters = FrameStoreCounters()

    # ------------------------------------------------------------------ properties
    @property
    def admission_rate_hz(self) -> float:
        """The configured admission rate (0 = admit all)."""
        return self._rate_hz

    @property
    def max_frames(self) -> int:
        """The most frames kept at once."""
        return self._max_frames

    @property
    def stride(self) -> int:
        """Current thinning stride: every ``stride``-th admitted frame is kept (plus the newest)."""
        return self._stride

    @property
    def first(self) -> StoredFrame | None:
        """The episode's first admitted frame (never evicted), or None before any."""
        return self._frames[0] if self._frames else None

    @property
    def newest(self) -> StoredFrame | None:
        """The newest admitted frame, or None before any."""
        return self._frames[-1] if self._frames else None

    @property
    def newest_stamp_ns(self) -> int | None:
        """Stamp of the newest admitted frame in ns, or None before any."""
        return self._newest_stamp_ns

    def __len__(self) -> int:
        """Number of frames kept now."""
        return len(self._frames)

    def __contains__(self, frame_id: object) -> bool:
        """True when ``frame_id`` is kept now."""
        return frame_id in self._by_id

    def frames(self) -> list[StoredFrame]:
        """The kept frames, oldest first (a copy)."""
        return list(self._frames)

    def payload(self, frame_id: Hashable) -> Any:
        """The payload stored with a kept frame.

        Raises:
            KeyError: the frame is not kept (never admitted, or evicted).
        """
        frame = self._by_id.get(frame_id)
        if frame is None:
            raise KeyError(f"frame {frame_id!r} is not in the store (never admitted or already evicted)")
        return frame.payload

    # ------------------------------------------------------------------ admission
    def add(self, stamp_ns: int, frame_id: Hashable, payload: Any = None, ignore_rate: bool = False) -> Admission:
        """Offer a frame; admit it or count why not, and thin the store if it is full.

        Args:
            stamp_ns: the image's ``header.stamp`` in nanoseconds (``sec * 10**9 + nanosec``).
            frame_id: the caller's unique id for this frame (the engine's cache key). It must not be an id
                that is kept now.
            payload: anything to keep with the frame while it is kept (e.g. the image for recording);
                None keeps only the id and stamp.
            ignore_rate: admit it even if the admission rate would drop it (the last frame of an episode,
                frames that confirmed a camera time jump); duplicates and older frames are still dropped.

        Returns:
            The Admission: status, and the ids evicted by this call (to ``forget`` in the engine).

        Raises:
            ValueError: ``stamp_ns`` is not a non-negative integer, or ``frame_id`` is already kept
                (both are bugs in the caller, not bad camera data).
        """
        if isinstance(stamp_ns, bool) or not isinstance(stamp_ns, (int, np.integer)) or stamp_ns < 0:
            raise ValueError(f"stamp_ns must be a non-negative integer (nanoseconds), got {stamp_ns!r}")
        stamp_ns = int(stamp_ns)
        status = self.would_admit(stamp_ns)
        if ignore_rate and status is AdmissionStatus.DROPPED_RATE:
            status = AdmissionStatus.ADMITTED
        if status is not AdmissionStatus.ADMITTED:
            # The drop statuses are named after their counters.
            setattr(self.counters, status.value, getattr(self.counters, status.value) + 1)
            return Admission(status, frame_id)
        if frame_id in self._by_id:
            raise ValueError(f"frame id {frame_id!r} is already in the store; frame ids must be unique")

        if self._period_ns:
            due = stamp_ns if self._next_due_ns is None else self._next_due_ns
            due += self._period_ns
            # After a gap (no frames for more than a period) restart the schedule at this frame, so a burst
            # after the gap is not admitted at full camera rate to "catch up".
            self._next_due_ns = due if due > stamp_ns else stamp_ns + self._period_ns

        evicted: list[Hashable] = []
        # The previous newest frame was kept only because it was the newest; let it go if it is off the grid.
        if self._frames and self._frames[-1].sequence % self._stride != 0:
            evicted.append(self._frames.pop().frame_id)
        frame = StoredFrame(stamp_ns, frame_id, payload, self._next_sequence)
        self._next_sequence += 1
        self._frames.append(frame)
        self._by_id[frame_id] = frame
        self._newest_stamp_ns = stamp_ns
        self.counters.admitted += 1

        while len(self._frames) > self._max_frames:
            self._stride *= 2
            kept: list[StoredFrame] = []
            last = len(self._frames) - 1
            for i, f in enumerate(self._frames):
                if i == last or f.sequence % self._stride == 0:
                    kept.append(f)
                else:
                    evicted.append(f.frame_id)
            self._frames = kept

        for frame_id_out in evicted:
            self._by_id.pop(frame_id_out, None)
        self.counters.evicted += len(evicted)
        return Admission(AdmissionStatus.ADMITTED, frame_id, tuple(evicted))

    def would_admit(self, stamp_ns: int) -> AdmissionStatus:
        """What ``add`` would do with a frame stamped ``stamp_ns``, changing nothing.

        Lets the caller skip decoding an image that would be dropped anyway (at 30 Hz with a 5 Hz admission
        rate, five of six frames).
        """
        newest = self._newest_stamp_ns
        if newest is not None:
            if stamp_ns == newest:
                return AdmissionStatus.DROPPED_DUPLICATE
            if stamp_ns < newest:
                return AdmissionStatus.DROPPED_OUT_OF_ORDER
        if self._next_due_ns is not None and stamp_ns < self._next_due_ns - self._tolerance_ns:
            return AdmissionStatus.DROPPED_RATE
        return AdmissionStatus.ADMITTED

    # ------------------------------------------------------------------ selection
    def select(self, k: int = 8, pad: bool = True) -> list[tuple[int, Hashable]]:
        """The frames to score now: ``subsample_indices`` over the kept frames, as ``(stamp_ns, frame_id)``.

        The first and the newest kept frames are always included; order is oldest first.

        Args:
            k: the model's frame count (8 for Robometer).
            pad: True (the official behaviour) returns exactly ``k`` entries, repeating the newest frame when
                fewer than ``k`` are kept; False returns each selected frame once (at most ``k``).

        Returns:
            The selection, or an empty list when no frame has been admitted yet.
        """
        if not self._frames:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
                raise ValueError(f"select needs k >= 1 frames, got k={k!r}")
            return []
        indices = subsample_indices(len(self._frames), k)
        if not pad:
            indices = list(dict.fromkeys(indices))
        return [(self._frames[i].stamp_ns, self._frames[i].frame_id) for i in indices]

    def clear(self) -> list[Hashable]:
        """Let go of every kept frame (end of episode) and return their ids, to ``forget`` in the engine.

        The counters and the admission schedule are kept; a new episode should use a new FrameStore.
        """
        ids = [f.frame_id for f in self._frames]
        self._frames = []
        self._by_id.clear()
        self.counters.evicted += len(ids)
        return ids
