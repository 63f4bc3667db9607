"""TensorRT runtime on a real GPU: build the tiny bundle's plans here, then the RewardEngine's tensorrt backend
(cuda-python memory, no torch in the runtime) must match ONNX Runtime (fp32 plans: 1e-3 on logits, TensorRT
may use TF32), with the prefix-reuse plans (the default when they are built) and with the plain language plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fixtures_bundle import TINY_INSTRUCTION, copy_bundle, random_frames
from robometer_ros.engine.bundle import Bundle
from robometer_ros.engine.reward_engine import RewardEngine

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def built_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    from robometer_ros.engine import tensorrt_build
    from robometer_ros.engine.trt_common import import_tensorrt

    try:
        import_tensorrt()
    except Exception as exc:
        pytest.skip(f"no TensorRT: {exc}")
    # only now the tiny bundle (an ONNX export): on a GPU machine without TensorRT these tests skip at once
    tiny_bundle = request.getfixturevalue("tiny_bundle")
    bundle = Bundle.open(copy_bundle(tiny_bundle.path, tmp_path_factory.mktemp("trt") / "bundle"))
    results = tensorrt_build.build_engines(bundle, precision="fp32")
    assert all(r.status == "built" for r in results), [r.message for r in results]
    return bundle


@pytest.mark.parametrize("prefix_reuse", [None, False])
def test_tensorrt_matches_onnxruntime(built_bundle: Bundle, prefix_reuse) -> None:
    trt_engine = RewardEngine(built_bundle, backend="tensorrt", prefix_reuse=prefix_reuse)
    ort_engine = RewardEngine(built_bundle, backend="onnxruntime", providers=["CPUExecutionProvider"])
    assert trt_engine.backend_name.endswith(":fp32")
    assert trt_engine.prefix_reuse == (prefix_reuse is None)  # every part was built, so the prefix plans run
    frames = random_frames(8, seed=11)
    for i, image in enumerate(frames):
        trt_engine.add_frame(i, image)
        ort_engine.add_frame(i, image)
    for ids in ([0, 1, 2, 3, 4, 5, 6, 7], [0, 3, 3, 7], [5]):
        a = trt_engine.score(TINY_INSTRUCTION, ids)
        b = ort_engine.score(TINY_INSTRUCTION, ids)
        np.testing.assert_allclose(a.progress_logits, b.progress_logits, atol=1e-3, rtol=0)
        np.testing.assert_allclose(a.success_logits, b.success_logits, atol=1e-3, rtol=0)
    pa = trt_engine.preference(TINY_INSTRUCTION, [0, 1, 2, 3], [4, 5, 6, 7])
    pb = ort_engine.preference(TINY_INSTRUCTION, [0, 1, 2, 3], [4, 5, 6, 7])
    assert abs(pa - pb) < 1e-3


def test_auto_picks_tensorrt_when_a_plan_exists(built_bundle: Bundle) -> None:
    engine = RewardEngine(built_bundle, backend="auto")
    assert engine.backend_name.startswith("tensorrt")
    assert [a.candidate for a in engine.backend_attempts] == ["tensorrt"] and engine.backend_attempts[0].chosen


def test_features_stay_on_the_gpu(built_bundle: Bundle, tmp_path: Path) -> None:
    engine = RewardEngine(built_bundle, backend="tensorrt")
    engine.add_frame("a", random_frames(1)[0])
    features = engine._cache["a"]
    from robometer_ros.engine.cuda_rt import DeviceArray

    assert isinstance(features.visual, DeviceArray) and isinstance(features.deepstack, DeviceArray)
    assert features.visual.ptr % 256 == 0 and features.deepstack.ptr % 256 == 0
    assert engine.cache_nbytes == features.nbytes > 0


def test_tensorrt_prefix_reuse_over_an_episode(built_bundle: Bundle) -> None:
    """Steps of an episode through the prefix + suffix plans equal the plain language part (ONNX Runtime); the
    prefix runs once, its keys/values stay on the GPU, and every block is returned at close."""
    from robometer_ros.engine.bundle import PART_LANGUAGE_PREFIX
    from robometer_ros.engine.cuda_rt import DeviceArray
    from robometer_ros.episode import subsample_indices

    trt_engine = RewardEngine(built_bundle, backend="tensorrt")
    ort_engine = RewardEngine(built_bundle, backend="onnxruntime", providers=["CPUExecutionProvider"],
                              prefix_reuse=False)
    runtime = trt_engine.runtime
    assert runtime.supports_prefix
    calls = []
    run_part = runtime.run_part
    runtime.run_part = lambda part, *a, **k: (calls.append(part), run_part(part, *a, **k))[1]
    m = built_bundle.manifest
    steps = m.prefix.max_batch + 4
    for i, image in enumerate(random_frames(steps, seed=13)):
        trt_engine.add_frame(i, image)
        ort_engine.add_frame(i, image)
    lists = [subsample_indices(t + 1, m.num_frames) for t in range(1, steps)]
    want = [ort_engine.score(TINY_INSTRUCTION, ids) for ids in lists]
    got = [trt_engine.score(TINY_INSTRUCTION, ids) for ids in lists]
    batched = trt_engine.score_batch(TINY_INSTRUCTION, lists)
    for a, b, ref in zip(got, batched, want):
        np.testing.assert_allclose(a.progress_logits, ref.progress_logits, atol=1e-3, rtol=0)
        np.testing.assert_allclose(a.success_logits, ref.success_logits, atol=1e-3, rtol=0)
        np.testing.assert_allclose(b.progress_logits, a.progress_logits, atol=1e-4, rtol=0)
    assert calls.count(PART_LANGUAGE_PREFIX) == 1
    state = trt_engine._prefixes[(TINY_INSTRUCTION, 0)].state
    assert isinstance(state.past_keys, DeviceArray) and state.past_keys.ptr % 256 == 0
    assert state.past_values.ptr % 256 == 0
    del state
    trt_engine.close()
    import gc

    gc.collect()
    assert runtime._allocator.live_bytes == 0
