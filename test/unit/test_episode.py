"""FrameStore admission, thinning and selection, and the official subsampling rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from robometer_ros.episode import NS_PER_S, AdmissionStatus, FrameStore, subsample_indices

CAMERA_30HZ_NS = NS_PER_S // 30


def official_linspace_subsample(n: int, k: int) -> list[int]:
    """The official rule written out independently: rint(linspace), ends forced, non-decreasing, right pad."""
    if n < k:
        return list(range(n)) + [n - 1] * (k - n)
    out = [round(float(x)) for x in np.linspace(0, n - 1, k)]
    out[0], out[-1] = 0, n - 1
    for i in range(1, k):
        out[i] = max(out[i], out[i - 1])
    return out


# ---------------------------------------------------------------------------- subsample_indices
@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 10, 15, 16, 17, 33, 100, 1001])
def test_subsample_matches_official_rule_and_keeps_ends(n: int) -> None:
    idx = subsample_indices(n, 8)
    assert idx == official_linspace_subsample(n, 8)
    assert len(idx) == 8
    assert idx[0] == 0 and idx[-1] == n - 1
    assert all(b >= a for a, b in itertools.pairwise(idx))


def test_subsample_known_values() -> None:
    assert subsample_indices(20, 8) == [0, 3, 5, 8, 11, 14, 16, 19]
    assert subsample_indices(8, 8) == list(range(8))
    # fewer frames than k: every frame once, then the last one repeated (official right padding)
    assert subsample_indices(3, 8) == [0, 1, 2, 2, 2, 2, 2, 2]
    assert subsample_indices(1, 8) == [0] * 8
    assert subsample_indices(5, 1) == [4]  # a single slot holds the newest frame


def test_subsample_with_more_frames_has_distinct_indices() -> None:
    for n in range(8, 200):
        assert len(set(subsample_indices(n, 8))) == 8


@pytest.mark.parametrize(("n", "k"), [(0, 8), (-1, 8), (5, 0), (2.5, 8), (True, 8)])
def test_subsample_rejects_bad_arguments(n: object, k: object) -> None:
    with pytest.raises(ValueError, match="subsample_indices"):
        subsample_indices(n, k)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- admission
def test_admit_all_when_rate_is_zero() -> None:
    store = FrameStore(admission_rate_hz=0.0, max_frames=1000)
    for i in range(90):
        assert store.add(i * CAMERA_30HZ_NS, i).admitted
    assert len(store) == 90
    assert store.counters.admitted == 90 and store.counters.dropped == 0


def test_rate_limit_uses_camera_time_and_counts_every_frame() -> None:
    store = FrameStore(admission_rate_hz=10.0, max_frames=1000)
    statuses = [store.add(i * CAMERA_30HZ_NS, i).status for i in range(300)]  # 10 s of a 30 Hz camera
    admitted = statuses.count(AdmissionStatus.ADMITTED)
    assert admitted in (100, 101)
    assert statuses.count(AdmissionStatus.DROPPED_RATE) == 300 - admitted
    assert store.counters.offered == 300
    stamps = [f.stamp_ns for f in store.frames()]
    gaps = np.diff(stamps)
    assert gaps.min() >= 0.75 * NS_PER_S / 10  # never faster than the rate (minus the jitter allowance)


def test_rate_limit_tolerates_jitter_at_the_camera_rate() -> None:
    # A 30 Hz camera with +-3 ms jitter admitted at 30 Hz: no frame should be lost to the rate limit.
    rng = np.random.default_rng(0)
    stamps = (np.arange(300) * CAMERA_30HZ_NS + rng.integers(-3_000_000, 3_000_000, 300)).astype(np.int64)
    stamps[0] = max(stamps[0], 0)
    store = FrameStore(admission_rate_hz=30.0, max_frames=1000)
    for i, s in enumerate(stamps):
        store.add(int(s), i)
    assert store.counters.dropped_rate == 0
    assert store.counters.admitted == 300


def test_rate_limit_long_run_never_exceeds_rate() -> None:
    # 40 Hz camera, 30 Hz admission: the early-frame allowance must not raise the long-run rate.
    store = FrameStore(admission_rate_hz=30.0, max_frames=10_000)
    period = NS_PER_S // 40
    for i in range(4000):  # 100 s
        store.add(i * period, i)
    assert store.counters.admitted <= 30 * 100 + 1
    assert store.counters.admitted >= 30 * 100 * 0.9


def test_rate_schedule_restarts_after_a_gap() -> None:
    store = FrameStore(admission_rate_hz=2.0, max_frames=100)
    assert store.add(0, "a").admitted
    # 10 s gap, then a 30 Hz burst: the first frame is admitted, the next only half a second later
    assert store.add(10 * NS_PER_S, "b").admitted
    assert store.add(10 * NS_PER_S + CAMERA_30HZ_NS, "c").status is AdmissionStatus.DROPPED_RATE
    assert store.add(10 * NS_PER_S + NS_PER_S // 2, "d").admitted


def test_duplicate_and_out_of_order_stamps_are_dropped_and_counted() -> None:
    store = FrameStore()
    assert store.add(1_000, "a").admitted
    assert store.add(2_000, "b").admitted
    dup = store.add(2_000, "b-again")
    assert dup.status is AdmissionStatus.DROPPED_DUPLICATE and not dup.admitted
    old = store.add(1_500, "late")
    assert old.status is AdmissionStatus.DROPPED_OUT_OF_ORDER
    assert store.add(3_000, "c").admitted
    assert [f.frame_id for f in store.frames()] == ["a", "b", "c"]
    c = store.counters
    assert (c.admitted, c.dropped_duplicate, c.dropped_out_of_order, c.dropped) == (3, 1, 1, 2)
    assert "late" not in store and "b-again" not in store


def test_zero_stamps_from_a_careless_driver_show_as_duplicates() -> None:
    store = FrameStore()
    for i in range(5):
        store.add(0, i)
    assert len(store) == 1 and store.counters.dropped_duplicate == 4


def test_bad_calls_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="admission_rate_hz"):
        FrameStore(admission_rate_hz=-1.0)
    with pytest.raises(ValueError, match="admission_rate_hz"):
        FrameStore(admission_rate_hz=float("nan"))
    with pytest.raises(ValueError, match="max_frames"):
        FrameStore(max_frames=2)
    store = FrameStore()
    with pytest.raises(ValueError, match="stamp_ns"):
        store.add(-5, "a")
    with pytest.raises(ValueError, match="stamp_ns"):
        store.add(1.5, "a")  # type: ignore[arg-type]
    store.add(10, "a")
    with pytest.raises(ValueError, match="already in the store"):
        store.add(20, "a")


# ---------------------------------------------------------------------------- thinning
def test_memory_is_bounded_and_evictions_are_reported() -> None:
    store = FrameStore(max_frames=16)
    alive: set[int] = set()
    for i in range(5000):
        admission = store.add(i * CAMERA_30HZ_NS, i, payload=f"img{i}")
        assert admission.admitted
        assert i not in admission.evicted
        alive.add(i)
        alive.difference_update(admission.evicted)
        assert len(store) <= 16
        # exactly the ids not reported as evicted are kept: the engine cache can mirror the store
        assert alive == {f.frame_id for f in store.frames()}
    assert store.counters.evicted == 5000 - len(store)
    assert store.first is not None and store.first.frame_id == 0
    assert store.newest is not None and store.newest.frame_id == 4999
    assert store.payload(4999) == "img4999"
    with pytest.raises(KeyError, match="not in the store"):
        store.payload(1)


def test_thinning_keeps_frames_evenly_spread_over_the_whole_episode() -> None:
    store = FrameStore(max_frames=32)
    n = 10_000
    for i in range(n):
        store.add(i * CAMERA_30HZ_NS, i)
    kept = [f.frame_id for f in store.frames()]
    assert kept[0] == 0 and kept[-1] == n - 1
    assert len(kept) >= 16  # thinning halves at most
    grid = np.diff(kept[:-1])
    assert len(set(grid.tolist())) == 1  # evenly spaced (the newest frame rides on top of the grid)
    assert grid[0] == store.stride
    # the 8 frames scored now are close to the official subsample of every admitted frame
    chosen = [fid for _, fid in store.select(8)]
    official = subsample_indices(n, 8)
    assert chosen[0] == 0 and chosen[-1] == n - 1
    assert max(abs(a - b) for a, b in zip(chosen, official)) <= store.stride


def test_select_returns_first_and_newest_with_stamps() -> None:
    store = FrameStore(max_frames=64)
    assert store.select(8) == []
    for i in range(3):
        store.add(100 + i, f"f{i}")
    padded = store.select(8)
    assert [fid for _, fid in padded] == ["f0", "f1", "f2", "f2", "f2", "f2", "f2", "f2"]
    assert padded[0][0] == 100
    assert store.select(8, pad=False) == [(100, "f0"), (101, "f1"), (102, "f2")]
    for i in range(3, 40):
        store.add(100 + i, f"f{i}")
    sel = store.select(8)
    assert len(sel) == 8 and len({fid for _, fid in sel}) == 8
    assert sel[0] == (100, "f0") and sel[-1] == (139, "f39")
    assert [s for s, _ in sel] == sorted(s for s, _ in sel)


def test_clear_returns_every_kept_id() -> None:
    store = FrameStore(max_frames=8)
    evicted: list[object] = []
    for i in range(50):
        evicted.extend(store.add(i, i).evicted)
    kept = [f.frame_id for f in store.frames()]
    assert sorted(store.clear()) == sorted(kept)
    assert len(store) == 0 and store.select(8) == []
    assert sorted(evicted + kept) == list(range(50))


def test_would_admit_predicts_add_without_changing_anything():
    store = FrameStore(admission_rate_hz=10.0, max_frames=16)
    offered = [0, 30_000_000, 100_000_000, 100_000_000, 50_000_000, 200_000_000, 230_000_000, 320_000_000]
    for i, stamp in enumerate(offered):
        before = (store.counters.admitted, store.counters.dropped, len(store))
        predicted = store.would_admit(stamp)
        assert (store.counters.admitted, store.counters.dropped, len(store)) == before
        assert store.add(stamp, i).status is predicted
    assert [store.would_admit(s) for s in (320_000_000, 10_000_000, 330_000_000, 420_000_000)] == [
        AdmissionStatus.DROPPED_DUPLICATE,
        AdmissionStatus.DROPPED_OUT_OF_ORDER,
        AdmissionStatus.DROPPED_RATE,
        AdmissionStatus.ADMITTED,
    ]
