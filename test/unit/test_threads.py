"""ThreadLimits: parameter checks, per-thread affinity and niceness, and ONNX Runtime's intra-op pool threads
inheriting them when the engine is created inside run_with_limits (read back from /proc for every thread)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from robometer_ros.engine.threads import ThreadLimits, run_with_limits

linux = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not Path("/proc/self/task").is_dir(),
                           reason="per-thread affinity and /proc are Linux")


def _threads() -> dict[int, tuple[tuple[int, ...], int]]:
    """Every thread of this process: tid -> (allowed CPUs, nice)."""
    found = {}
    for task in Path("/proc/self/task").iterdir():
        tid = int(task.name)
        try:
            nice = int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
            found[tid] = (tuple(sorted(os.sched_getaffinity(tid))), nice)
        except (OSError, IndexError):  # a thread that just exited
            continue
    return found


def _nicer(by: int) -> int:
    """A niceness ``by`` above this process's (the tests may themselves run under nice)."""
    value = os.getpriority(os.PRIO_PROCESS, 0) + by
    if value > 19:
        pytest.skip("the test process is already too nice")
    return value


def _two_cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    return cpus[0], cpus[1]


def test_parameters_are_checked_with_their_names() -> None:
    with pytest.raises(ValueError, match=r"scoring\.nice must be 0\.\.19"):
        ThreadLimits.from_parameters(0, [], 20)
    with pytest.raises(ValueError, match=r"scoring\.intra_op_threads must be >= 0"):
        ThreadLimits.from_parameters(-1, [], 0)
    with pytest.raises(ValueError, match=r"scoring\.cpu_affinity lists a CPU twice"):
        ThreadLimits.from_parameters(0, [0, 0], 0)
    with pytest.raises(ValueError, match=r"scoring\.cpu_affinity holds CPU numbers"):
        ThreadLimits.from_parameters(0, [-1], 0)
    if hasattr(os, "sched_getaffinity"):
        with pytest.raises(ValueError, match=r"scoring\.cpu_affinity names CPUs \[4096\]"):
            ThreadLimits.from_parameters(0, [4096], 0)
    assert ThreadLimits.from_parameters(0, [], 0).is_default


def test_thread_count_follows_the_affinity_when_not_given() -> None:
    assert ThreadLimits().runtime_options() == {}
    assert ThreadLimits(intra_op_threads=3).runtime_options() == {"intra_op_threads": 3}
    # ONNX Runtime's default thread count pins threads itself (see the test below): one per allowed CPU
    assert ThreadLimits(cpu_affinity=(0, 1)).runtime_options() == {"intra_op_threads": 2}
    assert ThreadLimits(intra_op_threads=1, cpu_affinity=(0, 1)).runtime_options() == {"intra_op_threads": 1}
    assert ThreadLimits(1, (1,), 10).describe() == "intra-op threads 1, CPUs [1], nice 10"


@linux
def test_apply_limits_only_the_calling_thread() -> None:
    first, second = _two_cpus()
    nice, less = _nicer(5), _nicer(2)
    main_before = _threads()[threading.get_native_id()]
    seen = {}

    def worker() -> None:
        applied = ThreadLimits(cpu_affinity=(second,), nice=nice).apply_to_current_thread()
        seen["applied"] = applied
        child = threading.Thread(target=lambda: seen.setdefault("child", _threads()[threading.get_native_id()]))
        child.start()
        child.join()
        seen["self"] = _threads()[threading.get_native_id()]
        # asking for less niceness than the thread has cannot be granted unprivileged: kept, and said so
        seen["lower"] = ThreadLimits(nice=less).apply_to_current_thread()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["applied"].cpus == (second,) and seen["applied"].nice == nice
    assert seen["self"] == ((second,), nice)
    assert seen["child"] == ((second,), nice)  # threads created afterwards inherit both
    assert seen["lower"].nice == nice and "lowering needs CAP_SYS_NICE" in seen["lower"].note
    assert _threads()[threading.get_native_id()] == main_before  # the caller is untouched
    assert first in main_before[0]


@linux
def test_run_with_limits_returns_and_raises_in_the_caller() -> None:
    _, second = _two_cpus()
    limits = ThreadLimits(cpu_affinity=(second,), nice=_nicer(1))
    assert run_with_limits(limits, lambda x: (x, tuple(sorted(os.sched_getaffinity(0)))), 5) == (5, (second,))
    with pytest.raises(KeyError, match="boom"):
        run_with_limits(limits, lambda: {}["boom"])


@linux
def test_onnxruntime_pool_threads_inherit_the_limits(tiny_bundle) -> None:
    """The measurement behind the design: ORT's intra-op pool threads are created at session creation and
    inherit the creating thread's affinity and niceness, but only with an explicit thread count."""
    pytest.importorskip("onnxruntime")
    from robometer_ros.engine.ort_runtime import OnnxRuntimeRuntime

    first, second = _two_cpus()
    nice = _nicer(5)
    before = set(_threads())
    limits = ThreadLimits(intra_op_threads=2, cpu_affinity=(first,), nice=nice)
    runtime = run_with_limits(limits, OnnxRuntimeRuntime, tiny_bundle.bundle, providers=["CPUExecutionProvider"],
                              **limits.runtime_options())
    created = {tid: v for tid, v in _threads().items() if tid not in before}
    runtime.close()
    assert created, "ONNX Runtime created no pool thread for intra_op_num_threads=2"
    assert all(v == ((first,), nice) for v in created.values()), created

    # with the default thread count (0), ORT pins its pool threads to cores itself, outside the inherited mask
    before = set(_threads())
    default = run_with_limits(ThreadLimits(cpu_affinity=(first,), nice=nice), OnnxRuntimeRuntime, tiny_bundle.bundle,
                              providers=["CPUExecutionProvider"])
    created = {tid: v for tid, v in _threads().items() if tid not in before}
    default.close()
    assert any(second in cpus for cpus, _ in created.values()), created
