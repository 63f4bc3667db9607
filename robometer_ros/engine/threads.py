"""Thread limits for scoring on a shared robot computer: intra-op threads, CPU affinity, niceness.

The node's scoring must not starve a control loop (e.g. 30 Hz) on the same CPUs. Three knobs:

* ``intra_op_threads``: threads one model call may use (ONNX Runtime's ``intra_op_num_threads``,
  ``torch.set_num_threads``); 0 = the runtime's default.
* ``cpu_affinity``: the CPUs the scoring threads may run on (empty = any); keep the control loop's CPU
  out of it.
* ``nice``: the scoring threads' niceness (0-19; higher yields the CPU to normal-priority work first).

On Linux, affinity and niceness are per *thread* (``sched_setaffinity(0, ...)`` and
``setpriority(PRIO_PROCESS, tid, ...)`` act on the calling thread) and a new thread inherits both from
the thread that creates it. ONNX Runtime creates its intra-op thread pool when a session is created, so:

1. create the engine inside ``run_with_limits(limits, factory, ...)`` (a short-lived thread that has the
   limits): the pool threads inherit them, and the caller's own thread (e.g. the ROS executor) is not
   niced for good (an unprivileged process cannot lower its niceness again);
2. call ``limits.apply_to_current_thread()`` first thing in the thread that scores (ONNX Runtime runs
   part of each call on the calling thread; torch's OpenMP threads are created by the first thread that
   runs a parallel region and inherit its limits).

Measured here (test/unit/test_threads.py): with ``intra_op_num_threads`` left at 0, ONNX Runtime pins
its pool threads to cores itself, ignoring the inherited affinity (a pool thread ran on a CPU outside
the creating thread's mask); with an explicit thread count the pool threads keep the inherited mask.
Hence ``effective_intra_op_threads``: with an affinity and no thread count, one thread per allowed CPU.
ONNX Runtime also has a session entry ``session.intra_op_thread_affinities`` (1-based processor ids,
``intra_op_num_threads - 1`` entries, the calling thread excluded), which overrides inheritance; it is
not used: inheritance covers every runtime the same way.

Pure Python, no ROS; Linux (``os.sched_setaffinity``, ``os.setpriority``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

MAX_NICE = 19


@dataclass(frozen=True)
class AppliedLimits:
    """What a thread ended up with after ``apply_to_current_thread`` (for the log and diagnostics)."""

    thread_id: int
    cpus: tuple[int, ...]
    nice: int
    note: str = ""

    def describe(self) -> str:
        """One line: thread id, CPUs, niceness, and a note when a request could not be met."""
        text = f"thread {self.thread_id}: CPUs {list(self.cpus)}, nice {self.nice}"
        return f"{text} ({self.note})" if self.note else text


@dataclass(frozen=True)
class ThreadLimits:
    """Limits for the scoring threads (see the module docstring). The default limits nothing."""

    intra_op_threads: int = 0
    cpu_affinity: tuple[int, ...] = ()
    nice: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "cpu_affinity", tuple(int(c) for c in self.cpu_affinity))
        if isinstance(self.intra_op_threads, bool) or int(self.intra_op_threads) < 0:
            raise ValueError(f"scoring.intra_op_threads must be >= 0 (0 = default), got {self.intra_op_threads}")
        object.__setattr__(self, "intra_op_threads", int(self.intra_op_threads))
        if not 0 <= int(self.nice) <= MAX_NICE:
            raise ValueError(f"scoring.nice must be 0..{MAX_NICE}, got {self.nice}")
        object.__setattr__(self, "nice", int(self.nice))
        if any(c < 0 for c in self.cpu_affinity):
            raise ValueError(f"scoring.cpu_affinity holds CPU numbers (>= 0), got {list(self.cpu_affinity)}")
        if len(set(self.cpu_affinity)) != len(self.cpu_affinity):
            raise ValueError(f"scoring.cpu_affinity lists a CPU twice: {list(self.cpu_affinity)}")

    @classmethod
    def from_parameters(cls, intra_op_threads: int, cpu_affinity: Sequence[int], nice: int) -> ThreadLimits:
        """From the node parameters ``scoring.intra_op_threads``, ``scoring.cpu_affinity``, ``scoring.nice``.

        Raises ``ValueError`` naming the parameter; CPUs this process may not use are refused too.
        """
        limits = cls(int(intra_op_threads), tuple(int(c) for c in cpu_affinity), int(nice))
        if limits.cpu_affinity and hasattr(os, "sched_getaffinity"):
            allowed = os.sched_getaffinity(0)
            outside = sorted(set(limits.cpu_affinity) - allowed)
            if outside:
                raise ValueError(f"scoring.cpu_affinity names CPUs {outside} this process may not run on "
                                 f"(allowed: {sorted(allowed)})")
        return limits

    @property
    def is_default(self) -> bool:
        """True when nothing is limited."""
        return not self.intra_op_threads and not self.cpu_affinity and not self.nice

    @property
    def effective_intra_op_threads(self) -> int:
        """The thread count to ask the runtime for: the given one, else one per allowed CPU, else 0 (default)."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return len(self.cpu_affinity)

    def runtime_options(self) -> dict[str, Any]:
        """Options for ``RewardEngine(..., **options)`` / ``create_runtime``: ``intra_op_threads`` when set.

        ONNX Runtime uses it as ``SessionOptions.intra_op_num_threads``, torch as ``torch.set_num_threads``;
        TensorRT ignores it (its host work is copies and launches on the calling thread).
        """
        threads = self.effective_intra_op_threads
        return {"intra_op_threads": threads} if threads else {}

    def apply_to_current_thread(self) -> AppliedLimits:
        """Set the calling thread's CPU affinity and raise its niceness; threads it creates inherit both.

        Niceness is only ever raised: lowering it needs CAP_SYS_NICE, so a thread already nicer than
        asked keeps its value (said in ``note``). Raises ``ValueError`` when the CPUs cannot be used.
        """
        tid = threading.get_native_id()
        notes = []
        if self.cpu_affinity:
            if not hasattr(os, "sched_setaffinity"):
                raise ValueError("scoring.cpu_affinity needs Linux (os.sched_setaffinity)")
            try:
                os.sched_setaffinity(0, set(self.cpu_affinity))
            except OSError as exc:
                raise ValueError(f"scoring.cpu_affinity {list(self.cpu_affinity)}: cannot run on these CPUs "
                                 f"({exc.strerror})") from exc
        nice = _thread_nice(tid)
        if self.nice and nice is not None:
            if self.nice > nice:
                os.setpriority(os.PRIO_PROCESS, tid, self.nice)
                nice = self.nice
            elif self.nice < nice:
                notes.append(f"asked for nice {self.nice}, kept {nice} (lowering needs CAP_SYS_NICE)")
        cpus = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ()
        return AppliedLimits(tid, cpus, nice if nice is not None else 0, "; ".join(notes))

    def describe(self) -> str:
        """One line for the log: threads, CPUs, niceness."""
        threads = self.effective_intra_op_threads or "runtime default"
        cpus = list(self.cpu_affinity) if self.cpu_affinity else "any"
        return f"intra-op threads {threads}, CPUs {cpus}, nice {self.nice}"


def parse_cpu_list(text: str | int | Sequence[int]) -> tuple[int, ...]:
    """CPU numbers from a CPU number, a list of them, or the Linux cpulist format ``taskset -c`` and
    ``isolcpus`` use: "" (any CPU), "1", "0,2", "2-5,7". Raises ValueError naming ``scoring.cpu_affinity``."""
    if isinstance(text, bool):
        raise ValueError(f"scoring.cpu_affinity must be CPU numbers, got {text!r}")
    if isinstance(text, int):
        text = str(text)
    elif not isinstance(text, str):
        return tuple(int(c) for c in text)
    cpus: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"scoring.cpu_affinity must look like '1' or '0,2-3' (empty = any CPU), got {text!r}") \
                from None
        if first < 0 or last < first:
            raise ValueError(f"scoring.cpu_affinity range {part!r} is not a CPU range")
        cpus.extend(range(first, last + 1))
    return tuple(cpus)


def _thread_nice(tid: int) -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except (AttributeError, OSError):
        return None


def run_with_limits(limits: ThreadLimits, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a new thread that has ``limits`` applied; its result, or its exception.

    Use it to create the engine: runtime thread pools created inside inherit the limits, and the
    calling thread keeps its own affinity and niceness.
    """
    if limits.is_default:
        return fn(*args, **kwargs)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            limits.apply_to_current_thread()
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="robometer_engine_start", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
