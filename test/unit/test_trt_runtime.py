"""The torch-free TensorRT runtime without a GPU: imports, cuda-python error handling with real calls that
return "no driver" here, module-path resolution, plan selection from the engines index, the device-side
concatenation plan, dtype handling, and the whole run_part path on host-memory stand-ins (trt_host_doubles)
scoring exactly like ONNX Runtime. The real GPU path is test/gpu/test_tensorrt_runtime.py."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fixtures_bundle import TINY_INSTRUCTION, build_mid_bundle, copy_bundle, random_frames
from robometer_ros.engine import cuda_rt, trt_runtime
from robometer_ros.engine.bundle import (
    ALL_PART_NAMES,
    PART_LANGUAGE,
    PART_LANGUAGE_PREFERENCE,
    PART_LANGUAGE_PREFIX,
    PART_LANGUAGE_SUFFIX,
    PART_VISION,
    Bundle,
    EngineKey,
)
from robometer_ros.engine.cuda_rt import (
    CudaApi,
    CudaError,
    DeviceAllocator,
    DeviceArray,
    DeviceConcat,
    concat_plan,
    stack_plan,
)
from robometer_ros.engine.reward_engine import RewardEngine
from robometer_ros.engine.runtime import LibraryMissingError, NoDeviceError, NoEngineError, RuntimeStartError
from robometer_ros.engine.trt_common import GpuIdentity
from robometer_ros.episode import subsample_indices
from trt_host_doubles import HostCudart, add_host_plans, host_tensorrt

REPO = Path(__file__).resolve().parents[2]
GPU = GpuIdentity("NVIDIA Jetson AGX Orin", "8.7")
KEY = EngineKey("tensorrt", "10.13.3", GPU.name, GPU.compute_capability, "fp32")


def _real_cudart_or_skip():
    try:
        return cuda_rt.load_cudart()
    except LibraryMissingError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def bundle(tiny_bundle, tmp_path: Path) -> Bundle:
    return Bundle.open(copy_bundle(tiny_bundle.path, tmp_path / "bundle"))


@pytest.fixture
def host_trt(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """TensorRT 10.13 on an 'Orin' as the runtime sees it, backed by host memory and ONNX Runtime."""
    trt = host_tensorrt(bundle.root, KEY.runtime_version)
    monkeypatch.setattr(trt_runtime, "import_tensorrt", lambda prefer=None: (trt, "tensorrt"))
    monkeypatch.setattr(trt_runtime, "gpu_identity", lambda index=0: GPU)
    return trt


# ---- imports and cuda-python ------------------------------------------------------------------------
def test_import_needs_neither_cuda_nor_torch_nor_tensorrt() -> None:
    # (cuda-bindings' .pth file imports the empty ``cuda`` namespace package at start-up; the bindings are not)
    names = ("torch", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart", "tensorrt", "tensorrt_rtx")
    code = ("import sys\nimport robometer_ros.engine.trt_runtime, robometer_ros.engine.cuda_rt\n"
            f"print(sorted(m for m in {names!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_starting_without_a_driver_raises_a_clear_error_and_never_imports_torch(bundle: Bundle) -> None:
    _real_cudart_or_skip()
    add_host_plans(bundle, [PART_VISION, PART_LANGUAGE], KEY)
    # the real start path up to the first CUDA call: plans match (GPU identity faked), cuda-python is real
    code = (
        "import sys\n"
        "from robometer_ros.engine import trt_runtime\n"
        "from robometer_ros.engine.bundle import Bundle\n"
        "from robometer_ros.engine.runtime import RuntimeUnavailableError\n"
        "from robometer_ros.engine.trt_common import GpuIdentity\n"
        f"trt_runtime.gpu_identity = lambda index=0: GpuIdentity({GPU.name!r}, {GPU.compute_capability!r})\n"
        "mod = type(sys)('tensorrt'); mod.__version__ = '10.13.3'\n"
        "trt_runtime.import_tensorrt = lambda prefer=None: (mod, 'tensorrt')\n"
        f"bundle = Bundle.open({str(bundle.root)!r})\n"
        "try:\n"
        "    trt_runtime.TensorRTRuntime(bundle)\n"
        "except RuntimeUnavailableError as exc:\n"
        "    print(type(exc).__name__, '|', exc)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    if "ok" in CudaApi().probe()[1]:
        pytest.skip("this machine has a CUDA device")
    assert "NoDeviceError | the tensorrt backend needs a CUDA GPU: no CUDA driver is installed" in out.stdout
    assert "torch imported: False" in out.stdout


def test_the_whole_tensorrt_path_runs_with_torch_unimportable(bundle: Bundle) -> None:
    """backend=auto -> tensorrt, encode, prefix + suffix steps, score_batch, preference and close, in a process where
    ``import torch`` fails: only CUDA and TensorRT themselves are the host stand-ins (what a GPU would run is
    test/gpu). Catches a torch import anywhere on the robot's tensorrt path, not only at import time."""
    add_host_plans(bundle, ALL_PART_NAMES, KEY)
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch (or of a torch submodule) now raises ImportError
sys.path.insert(0, {str(Path(__file__).parent)!r})
from robometer_ros.engine import cuda_rt, trt_runtime
from robometer_ros.engine.reward_engine import RewardEngine
from robometer_ros.engine.trt_common import GpuIdentity
from robometer_ros.episode import subsample_indices
from robometer_ros.session import ScoringSession  # noqa: F401 - the node's scoring layer imports too
from pathlib import Path
from trt_host_doubles import HostCudart, host_tensorrt
trt = host_tensorrt(Path({str(bundle.root)!r}), {KEY.runtime_version!r})
trt_runtime.import_tensorrt = lambda prefer=None: (trt, "tensorrt")
trt_runtime.gpu_identity = lambda index=0: GpuIdentity({GPU.name!r}, {GPU.compute_capability!r})
cuda_rt.load_cudart = HostCudart
engine = RewardEngine({str(bundle.root)!r}, backend="auto")
print("backend", engine.backend_name, engine.prefix_reuse)
import numpy as np
rng = np.random.default_rng(0)
for i in range(6):
    engine.add_frame(i, rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
lists = [subsample_indices(t + 1, 8) for t in range(1, 6)]
steps = [engine.score({TINY_INSTRUCTION!r}, ids) for ids in lists]
batched = engine.score_batch({TINY_INSTRUCTION!r}, lists[-1:])
engine.preference({TINY_INSTRUCTION!r}, [0, 1, 2], [3, 4, 5])
engine.close()
print("torch modules:", sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "torch" and v is not None))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "backend tensorrt:fp32 True" in out.stdout
    assert "torch modules: []" in out.stdout


def test_real_cuda_calls_report_no_driver_through_the_error_tuple() -> None:
    rt = _real_cudart_or_skip()
    cuda = CudaApi()
    count, why = cuda.probe()
    if count:
        pytest.skip("this machine has a CUDA device")
    assert why.startswith("no CUDA driver")
    with pytest.raises(CudaError) as info:
        cuda.malloc(256)
    assert info.value.code == 35 and info.value.name == "cudaErrorInsufficientDriver"
    assert "cudaMalloc(256) failed: CUDA error 35 cudaErrorInsufficientDriver" in str(info.value)
    with pytest.raises(NoDeviceError, match="no CUDA driver"):
        cuda.require_device(0)
    assert cuda.check(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion") >= 12000  # a success unpacks
    assert isinstance(info.value, RuntimeStartError)  # CUDA errors make auto fall back


def test_every_cuda_call_used_exists_in_the_installed_bindings() -> None:
    rt = _real_cudart_or_skip()
    assert [name for name in cuda_rt.CUDART_CALLS if not hasattr(rt, name)] == []
    assert hasattr(rt, "cudaStreamNonBlocking") and hasattr(rt.cudaMemcpyKind, "cudaMemcpyDeviceToDevice")


def test_every_tensorrt_call_used_exists_in_tensorrt_rtx() -> None:
    trt = pytest.importorskip("tensorrt_rtx")
    missing = [f"{cls}.{name}" for cls, names in trt_runtime.TRT_CALLS.items() for name in names
               if not hasattr(getattr(trt, cls), name)]
    assert missing == []
    assert trt.TensorLocation.DEVICE is not None and trt.TensorIOMode.INPUT is not None


def test_module_path_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    _real_cudart_or_skip()
    assert cuda_rt.load_cudart().__name__ == "cuda.bindings.runtime"
    # cuda-bindings < 12.6.1: only the legacy module
    import cuda

    legacy = SimpleNamespace(__name__="cuda.cudart")
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", legacy)
    monkeypatch.setattr(cuda, "cudart", legacy, raising=False)
    assert cuda_rt.load_cudart() is legacy
    # neither: the error names both paths and what to install
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    monkeypatch.delattr(cuda, "cudart")
    with pytest.raises(LibraryMissingError, match=r"cuda\.bindings\.runtime.*cuda\.cudart.*pip install 'cuda-bindings"):
        cuda_rt.load_cudart()


def test_deserialize_failure_is_a_start_error() -> None:
    trt = pytest.importorskip("tensorrt_rtx")
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    with pytest.raises(RuntimeStartError, match=r"could not deserialize the vision plan engines/x\.plan"):
        trt_runtime._Part(trt, runtime, b"not a plan", PART_VISION, "engines/x.plan")


# ---- plan selection ---------------------------------------------------------------------------------
def test_plan_selection_current_stale_and_other_gpu(bundle: Bundle, host_trt, monkeypatch, caplog) -> None:
    assert trt_runtime.find_usable_engines(bundle) is None  # no index at all
    other_gpu = EngineKey("tensorrt", "10.13.3", "NVIDIA GeForce RTX 4090", "8.9", "fp32")
    add_host_plans(bundle, [PART_VISION, PART_LANGUAGE], other_gpu)
    assert trt_runtime.find_usable_engines(bundle) is None  # plans for another GPU only
    with pytest.raises(NoEngineError, match="run robometer-build-engines on this machine"):
        trt_runtime.TensorRTRuntime(bundle, cuda=CudaApi(HostCudart()))
    add_host_plans(bundle, [PART_VISION], KEY)
    assert trt_runtime.find_usable_engines(bundle) is None  # this GPU, but no language plan
    add_host_plans(bundle, [PART_LANGUAGE], KEY)
    plans = trt_runtime.find_usable_engines(bundle)
    assert plans is not None and {p: r.key for p, r in plans.items()} == {PART_VISION: KEY, PART_LANGUAGE: KEY}
    fp16 = EngineKey(*[*KEY.__dict__.values()][:4], "fp16")
    add_host_plans(bundle, [PART_VISION, PART_LANGUAGE], fp16)
    assert trt_runtime.find_usable_engines(bundle)[PART_VISION].key.precision == "fp16"  # fastest first
    assert trt_runtime.find_usable_engines(bundle, precision="fp32")[PART_VISION].key == KEY
    # another TensorRT version on the robot: nothing matches
    monkeypatch.setattr(trt_runtime, "import_tensorrt",
                        lambda prefer=None: (SimpleNamespace(__version__="10.14.1"), "tensorrt"))
    assert trt_runtime.find_usable_engines(bundle) is None
    monkeypatch.setattr(trt_runtime, "import_tensorrt", lambda prefer=None: (host_trt, "tensorrt"))
    # a re-exported language part makes its plans stale (ONNX checksum), with a warning
    doc = json.loads((bundle.root / "manifest.json").read_text())
    doc["files"]["onnx/language.onnx"]["sha256"] = "0" * 64
    (bundle.root / "manifest.json").write_text(json.dumps(doc))
    stale = Bundle.open(bundle.root, verify_checksums=False)
    with caplog.at_level("WARNING"):
        assert trt_runtime.find_usable_engines(stale) is None
    assert "ONNX checksum differs" in caplog.text
    # a plan exists but no GPU is visible
    monkeypatch.setattr(trt_runtime, "gpu_identity", lambda index=0: None)
    with pytest.raises(NoDeviceError, match="no CUDA GPU visible"):
        trt_runtime.find_usable_engines(bundle)


# ---- pure pieces ------------------------------------------------------------------------------------
def _apply_on_host(plan_copies, sources: list[np.ndarray], nbytes: int) -> np.ndarray:
    dst = np.zeros(nbytes, dtype=np.uint8)
    for c in plan_copies:
        src = sources[c.source].reshape(-1).view(np.uint8)
        for row in range(c.height):
            dst[c.dst_offset + row * c.dpitch:c.dst_offset + row * c.dpitch + c.width] = \
                src[row * c.spitch:row * c.spitch + c.width]
    return dst


@pytest.mark.parametrize(("shapes", "axis"), [
    ([(6, 64), (6, 64), (6, 64)], 0),
    ([(2, 6, 64), (2, 6, 64), (2, 6, 64)], 1),
    ([(3, 4, 5), (3, 2, 5)], 1),
    ([(2, 3), (2, 5)], 1),
])
def test_concat_plan_equals_numpy_concatenate(shapes, axis) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    want = np.concatenate(arrays, axis=axis)
    shape, copies = concat_plan(shapes, axis, 4)
    assert shape == want.shape
    assert len(copies) == len(shapes) and (axis > 0 or all(c.height == 1 for c in copies))
    got = _apply_on_host(copies, arrays, want.nbytes).view(np.float32).reshape(shape)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="cannot concatenate"):
        concat_plan([(2, 3), (3, 3)], 1, 4)


@pytest.mark.parametrize(("rows", "axis"), [
    ([[(6, 64), (6, 64)], [(6, 64), (6, 64)], [(6, 64), (6, 64)]], 0),  # visual features of 3 prompts x 2 frames
    ([[(3, 6, 64), (3, 6, 64)], [(3, 6, 64), (3, 6, 64)]], 1),  # deepstack [k, tokens, H]: strided copies
    ([[(3, 4, 5)], [(3, 4, 5)]], 1),
    ([[(2, 3), (2, 5)], [(2, 4), (2, 4)]], 1),  # rows of other split points, same total
])
def test_stack_plan_equals_numpy_stack_of_concatenations(rows, axis) -> None:
    rng = np.random.default_rng(1)
    arrays = [[rng.standard_normal(s).astype(np.float32) for s in row] for row in rows]
    want = np.stack([np.concatenate(row, axis=axis) for row in arrays])
    shape, copies = stack_plan(rows, axis, 4)
    assert shape == want.shape and len(copies) == sum(len(r) for r in rows)
    got = _apply_on_host(copies, [a for row in arrays for a in row], want.nbytes).view(np.float32).reshape(shape)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="cannot stack"):
        stack_plan([[(2, 3)], [(2, 4)]], 1, 4)


def test_spare_blocks_are_bounded_in_bytes() -> None:
    # prefix keys/values come in as many sizes as instruction lengths: spares of sizes that never come back
    # must not pile up
    rt = HostCudart()
    allocator = DeviceAllocator(CudaApi(rt), 0, keep=8, keep_bytes=1024)
    blocks = [allocator.alloc(512) for _ in range(3)] + [allocator.alloc(768)]
    assert allocator.live_bytes == 3 * 512 + 768
    while blocks:  # released oldest first
        blocks.pop(0)
    gc.collect()
    assert allocator.live_bytes == 0 and allocator.spare_bytes == 1024
    assert rt.calls.count("cudaFree") == 2  # two blocks kept (1024 bytes), the other two went to the driver
    again = allocator.alloc(512)  # a spare is reused
    assert rt.calls.count("cudaMalloc") == 4 and allocator.spare_bytes == 512
    del again
    allocator.close()
    gc.collect()
    assert not rt.blocks and allocator.spare_bytes == 0


def test_bfloat16_conversion_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    values = np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, -3.14159, 65504.0, 1e-30, np.inf, -np.inf, np.nan,
                       3.3895e38], dtype=np.float32)
    bits = cuda_rt.float32_to_bfloat16_bits(values)
    ref = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits[~np.isnan(values)], ref[~np.isnan(values)])
    assert np.isnan(cuda_rt.bfloat16_bits_to_float32(bits)[np.isnan(values)]).all()
    back = cuda_rt.bfloat16_bits_to_float32(bits)
    np.testing.assert_array_equal(back[~np.isnan(values)],
                                  torch.from_numpy(ref.view(np.int16)).view(torch.bfloat16).float().numpy()[~np.isnan(values)])


def test_host_dtypes_for_plan_bindings() -> None:
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    assert trt_runtime.host_to_plan_dtype(ids, "int64", "x").dtype == np.int64  # 8-byte INT64 binding
    assert trt_runtime.host_to_plan_dtype(ids, "int32", "x").dtype == np.int32
    with pytest.raises(ValueError, match="out of range for the plan's int32"):
        trt_runtime.host_to_plan_dtype(np.array([2**40]), "int32", "language input input_ids")
    raw = np.array([1.5, -2.0], dtype=np.float16).view(np.uint8)
    assert trt_runtime.host_from_plan_dtype(raw, "float16", (2,)).tolist() == [1.5, -2.0]


# ---- the whole runtime on host-memory stand-ins -----------------------------------------------------
def test_run_part_path_scores_like_onnxruntime(bundle: Bundle, host_trt) -> None:
    add_host_plans(bundle, [PART_VISION, PART_LANGUAGE, PART_LANGUAGE_PREFERENCE], KEY)
    rt = HostCudart()
    runtime = trt_runtime.TensorRTRuntime(bundle, cuda=CudaApi(rt))
    assert runtime.backend_name == "tensorrt:fp32"
    assert runtime.parts == [PART_LANGUAGE, PART_LANGUAGE_PREFERENCE, PART_VISION]
    assert runtime.device.name == "Host Test GPU" and runtime.device.compute_capability == "8.9"
    engine = RewardEngine(bundle, runtime=runtime)
    reference = RewardEngine(bundle, backend="onnxruntime", providers=["CPUExecutionProvider"], intra_op_threads=1)
    frames = random_frames(6, seed=3)
    for i, image in enumerate(frames):
        engine.add_frame(i, image)
        reference.add_frame(i, image)

    features = engine._cache[0]
    assert isinstance(features.visual, DeviceArray) and isinstance(features.deepstack, DeviceArray)
    m = bundle.manifest
    tpf, hidden = m.frame.tokens_per_frame, m.hidden_size
    assert features.visual.shape == (tpf, hidden)
    assert features.deepstack.shape == (m.num_deepstack, tpf, hidden)
    assert features.visual.ptr % 256 == 0 and features.deepstack.ptr % 256 == 0
    assert features.visual.block is features.deepstack.block  # one block per frame
    assert engine.cache_nbytes == reference.cache_nbytes == 6 * (1 + m.num_deepstack) * tpf * hidden * 4

    for ids in ([0, 1, 2, 3, 4, 5], [0, 3, 3, 5], [4]):
        a, b = engine.score(TINY_INSTRUCTION, ids), reference.score(TINY_INSTRUCTION, ids)
        np.testing.assert_allclose(a.progress_logits, b.progress_logits, atol=1e-6, rtol=0)
        np.testing.assert_allclose(a.success_logits, b.success_logits, atol=1e-6, rtol=0)
    # deepstack features [k, tokens, H] concatenate along axis 1: a strided copy when k > 1, plain when k == 1
    assert ("cudaMemcpy2DAsync" in rt.calls) == (m.num_deepstack > 1)
    pa = engine.preference(TINY_INSTRUCTION, [0, 1, 2], [3, 4, 5])
    assert abs(pa - reference.preference(TINY_INSTRUCTION, [0, 1, 2], [3, 4, 5])) < 1e-6

    # forgotten frames go back to the allocator's free list; the next frame reuses a block (no cudaMalloc)
    live = runtime._allocator.live_bytes
    engine.forget([0, 1])
    del features
    gc.collect()
    assert runtime._allocator.live_bytes < live
    mallocs = rt.calls.count("cudaMalloc")
    engine.add_frame(10, frames[0])
    assert rt.calls.count("cudaMalloc") == mallocs
    np.testing.assert_allclose(engine.score(TINY_INSTRUCTION, [10, 2]).progress_logits,
                               reference.score(TINY_INSTRUCTION, [0, 2]).progress_logits, atol=1e-6, rtol=0)

    # generic run_part: named inputs, device inputs, clear errors
    pv = engine.preprocessor(frames[1])
    out = runtime.run_part(PART_VISION, {"pixel_values": pv})
    assert isinstance(out["visual_embeds"], np.ndarray)
    np.testing.assert_allclose(out["visual_embeds"], reference._cache[1].visual, atol=1e-6)
    with pytest.raises(ValueError, match="vision plan needs input 'pixel_values'"):
        runtime.run_part(PART_VISION, {})
    with pytest.raises(ValueError, match="no outputs"):
        runtime.run_part(PART_VISION, {"pixel_values": pv}, keep_on_device=("hidden",))
    ids_dev = DeviceArray(runtime._allocator.alloc(64), 0, (1, 8), "int32")
    inputs = engine._inputs(("progress", TINY_INSTRUCTION, 1), lambda: engine.prompts.progress(
        TINY_INSTRUCTION, [m.frame.grid_thw]), m.sequence.max_length)
    feed = {**inputs.as_feed(), "input_ids": ids_dev,
            "visual_embeds": DeviceConcat((engine._cache[2].visual,)),
            "deepstack_embeds": DeviceConcat((engine._cache[2].deepstack,), axis=1)}
    with pytest.raises(ValueError, match="takes input_ids as int64, got a int32 device tensor"):
        runtime.run_part(PART_LANGUAGE, feed)

    engine.close()
    reference.close()
    del feed, ids_dev
    gc.collect()
    assert runtime._allocator.live_bytes == 0  # every block came back once its last view was dropped
    assert not any(c for c in rt.blocks if c % 256)  # every address handed out was aligned


def test_a_bad_plan_fails_the_start(bundle: Bundle, host_trt) -> None:
    add_host_plans(bundle, [PART_VISION, PART_LANGUAGE], KEY)
    (bundle.root / "engines" / f"{PART_LANGUAGE}.host-test.plan").write_bytes(b"corrupt")
    doc = json.loads(bundle.engine_index_path.read_text())
    from robometer_ros.engine.bundle import sha256_file

    for entry in doc["engines"]:
        entry["sha256"] = sha256_file(bundle.root / entry["file"])
    bundle.engine_index_path.write_text(json.dumps(doc))
    with pytest.raises(RuntimeStartError, match="could not deserialize the language plan"):
        trt_runtime.TensorRTRuntime(bundle, cuda=CudaApi(HostCudart()))


# ---- prefix reuse on the host-memory stand-ins ------------------------------------------------------
def _episode_lists(steps: int, k: int) -> list[list[int]]:
    """The frame ids the node scores at each step 1..steps-1 of an episode (the official subsampling)."""
    return [subsample_indices(t + 1, k) for t in range(1, steps)]


def test_prefix_plans_score_like_the_plain_language_part_and_keep_the_prefix_on_the_device(
        bundle: Bundle, host_trt) -> None:
    add_host_plans(bundle, ALL_PART_NAMES, KEY)
    rt = HostCudart()
    runtime = trt_runtime.TensorRTRuntime(bundle, cuda=CudaApi(rt))
    m = bundle.manifest
    assert runtime.supports_prefix and runtime.preferred_suffix_batch == runtime.max_suffix_batch == m.prefix.max_batch
    # only what a step runs is loaded: the plain language and preference plans wait for first use
    assert set(runtime._parts) == {PART_VISION, PART_LANGUAGE_PREFIX, PART_LANGUAGE_SUFFIX}
    engine = RewardEngine(bundle, runtime=runtime)
    assert engine.prefix_reuse and engine.default_batch_size == m.prefix.max_batch
    reference = RewardEngine(bundle, backend="onnxruntime", providers=["CPUExecutionProvider"], intra_op_threads=1,
                             prefix_reuse=False)  # the plain language part: what prefix reuse must equal
    steps = m.prefix.max_batch + 8  # more steps than one suffix batch holds
    frames = random_frames(steps, seed=5)
    for i, image in enumerate(frames):
        engine.add_frame(i, image)
        reference.add_frame(i, image)
    lists = _episode_lists(steps, m.num_frames)
    want = [reference.score(TINY_INSTRUCTION, ids) for ids in lists]

    prefix_context = runtime._parts[PART_LANGUAGE_PREFIX].context
    suffix_context = runtime._parts[PART_LANGUAGE_SUFFIX].context
    for ids, ref in zip(lists, want):  # the node: one score per step
        got = engine.score(TINY_INSTRUCTION, ids)
        np.testing.assert_allclose(got.progress_logits, ref.progress_logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.success_logits, ref.success_logits, atol=1e-5, rtol=0)
    assert prefix_context.enqueued == 1  # once per (instruction, first frame), reused by every step
    assert suffix_context.enqueued == len(lists)
    one_frame = engine.score(TINY_INSTRUCTION, [0])  # a one-frame prompt is the prefix alone
    np.testing.assert_allclose(one_frame.progress_logits, reference.score(TINY_INSTRUCTION, [0]).progress_logits,
                               atol=1e-5, rtol=0)
    assert prefix_context.enqueued == 1 and suffix_context.enqueued == len(lists)
    two = engine.score(TINY_INSTRUCTION, [0, 3])  # one prompt of one suffix frame: the cached tensors bound in place
    np.testing.assert_allclose(two.progress_logits, reference.score(TINY_INSTRUCTION, [0, 3]).progress_logits,
                               atol=1e-5, rtol=0)
    assert suffix_context.addresses["visual_embeds"] == engine._cache[3].visual.ptr

    # the keys/values live on the device, in one aligned block owned by the state, bound in place each step
    ((key, entry),) = engine._prefixes.items()
    state = entry.state
    assert key == (TINY_INSTRUCTION, 0)
    assert isinstance(state.past_keys, DeviceArray) and isinstance(state.past_values, DeviceArray)
    assert state.past_keys.block is state.past_values.block
    assert state.past_keys.ptr % 256 == 0 and state.past_values.ptr % 256 == 0
    layers, _, kv_heads, prefix_len, head_dim = state.past_keys.shape
    assert state.past_values.shape == state.past_keys.shape and prefix_len >= m.prefix.min_length
    assert engine.prefix_cache_nbytes == 2 * layers * kv_heads * prefix_len * head_dim * 4
    assert suffix_context.addresses["past_keys"] == state.past_keys.ptr
    assert suffix_context.addresses["past_values"] == state.past_values.ptr

    # score_batch: the episode's steps stacked on the suffix plan's batch axis, within its profile
    # (batch <= prefix.max_batch: the host engine refuses larger shapes like a real plan)
    before = suffix_context.enqueued
    for batch_size in (None, len(lists)):  # the engine's chunks, then one call the runtime must split
        batched = engine.score_batch(TINY_INSTRUCTION, lists, batch_size=batch_size)
        for got, ref in zip(batched, want):
            np.testing.assert_allclose(got.progress_logits, ref.progress_logits, atol=1e-5, rtol=0)
            np.testing.assert_allclose(got.success_logits, ref.success_logits, atol=1e-5, rtol=0)
    per_pass = -(-len(lists) // m.prefix.max_batch)
    assert suffix_context.enqueued - before == 2 * per_pass and prefix_context.enqueued == 1
    with pytest.raises(ValueError, match="outside the optimization profile"):
        runtime.run_part(PART_LANGUAGE_SUFFIX, {**engine._split_inputs(TINY_INSTRUCTION, 2).suffix.as_feed(),
                                                "visual_embeds": np.zeros((m.prefix.max_batch + 1, 6, 64), np.float32),
                                                "deepstack_embeds": np.zeros((m.prefix.max_batch + 1, 1, 6, 64),
                                                                             np.float32),
                                                "past_keys": state.past_keys, "past_values": state.past_values})

    # preference still runs its own plan, loaded on first use
    pa = engine.preference(TINY_INSTRUCTION, [0, 1, 2], [3, 4, 5])
    assert abs(pa - reference.preference(TINY_INSTRUCTION, [0, 1, 2], [3, 4, 5])) < 1e-5
    assert PART_LANGUAGE_PREFERENCE in runtime._parts and PART_LANGUAGE not in runtime._parts

    # dropping the prefix (its first frame forgotten) returns its block; the next episode computes its own
    live = runtime._allocator.live_bytes
    kv_block = state.past_keys.block.nbytes
    del state, entry
    engine.forget([0])
    gc.collect()
    assert engine.cached_prefixes() == [] and engine.prefix_cache_nbytes == 0
    frame_block = engine._cache[1].visual.block.nbytes
    assert runtime._allocator.live_bytes == live - kv_block - frame_block
    next_episode = [[1, *ids[1:]] for ids in lists[-2:]]
    for ids in next_episode:
        reference_scores = reference.score(TINY_INSTRUCTION, ids)
        np.testing.assert_allclose(engine.score(TINY_INSTRUCTION, ids).progress_logits,
                                   reference_scores.progress_logits, atol=1e-5, rtol=0)
    assert prefix_context.enqueued == 2 and engine.cached_prefixes() == [(TINY_INSTRUCTION, 1)]

    # close: every device block and pinned buffer goes back to the (host stand-in) driver
    engine.close()
    reference.close()
    gc.collect()
    assert runtime._allocator.live_bytes == 0
    assert not rt.blocks, f"{len(rt.blocks)} blocks still allocated after close"


def test_prefix_plan_choice_and_honest_errors(bundle: Bundle, host_trt, caplog) -> None:
    def start(**options):
        return trt_runtime.TensorRTRuntime(bundle, cuda=CudaApi(HostCudart()), **options)

    # a schema-2 bundle whose prefix plans were never built: the plain part, said in the log
    add_host_plans(bundle, [PART_VISION, PART_LANGUAGE], KEY)
    with caplog.at_level("WARNING", logger="robometer_ros.engine.trt_runtime"):
        runtime = start()
    assert not runtime.supports_prefix and runtime.preferred_suffix_batch is None
    assert "no TensorRT plans for them: every step runs the plain language plan" in caplog.text
    with pytest.raises(NotImplementedError, match="runs the plain language plan"):
        runtime.run_prefix(None, None)
    assert not RewardEngine(bundle, runtime=runtime).prefix_reuse
    runtime.close()
    with pytest.raises(NoEngineError, match="prefix_reuse=True but no current TensorRT plans"):
        start(prefix_reuse=True)
    # half a pair is an error naming the missing plan, not a silent fallback
    add_host_plans(bundle, [PART_LANGUAGE_PREFIX], KEY)
    with pytest.raises(NoEngineError, match=r"plan for language_prefix but none for language_suffix.*--parts "
                                            r"language_suffix.*prefix_reuse=False"):
        start()
    plain = start(prefix_reuse=False)  # the escape hatch: the prefix plans are not even considered
    assert not plain.supports_prefix and PART_LANGUAGE_PREFIX not in plain.parts
    plain.close()
    # prefix + suffix plans without the plain language plan are enough for the robot's steps
    doc = json.loads(bundle.engine_index_path.read_text())
    doc["engines"] = [e for e in doc["engines"] if e["part"] != PART_LANGUAGE]
    bundle.engine_index_path.write_text(json.dumps(doc))
    add_host_plans(bundle, [PART_LANGUAGE_SUFFIX], KEY)
    runtime = start()
    assert runtime.supports_prefix and PART_LANGUAGE not in runtime.parts
    # a suffix plan built at another precision than the prefix's keys/values is refused at start
    runtime._parts[PART_LANGUAGE_SUFFIX].dtypes["past_keys"] = "float16"
    with pytest.raises(RuntimeStartError, match="language_prefix plan outputs past_keys as float32 but the "
                                                "language_suffix plan takes float16"):
        runtime._check_links(runtime._parts[PART_LANGUAGE_SUFFIX])
    runtime.close()
    with pytest.raises(NoEngineError, match="no current TensorRT plan for the plain language part"):
        start(prefix_reuse=False)


# ---- the mid config on the host-memory stand-ins ----------------------------------------------------
@pytest.fixture(scope="module")
def mid_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return build_mid_bundle(tmp_path_factory.mktemp("mid_trt") / "bundle")


@pytest.mark.slow
def test_mid_config_plans_score_like_the_plain_language_part(mid_bundle: Bundle, monkeypatch) -> None:
    """The mid config (512 wide, 2 deepstack levels, so each frame's deepstack features concatenate and stack by
    strided 2D copies, which the tiny model's single level never needs) through the TensorRT runtime on the
    host stand-ins: the prefix + suffix plans (one score per step, and score_batch) and the plain language plan
    equal ONNX Runtime's plain language part over an episode's steps, <= 1e-5 (fp32)."""
    trt = host_tensorrt(mid_bundle.root, KEY.runtime_version)
    monkeypatch.setattr(trt_runtime, "import_tensorrt", lambda prefer=None: (trt, "tensorrt"))
    monkeypatch.setattr(trt_runtime, "gpu_identity", lambda index=0: GPU)
    add_host_plans(mid_bundle, ALL_PART_NAMES, KEY)
    m = mid_bundle.manifest
    assert m.num_deepstack > 1
    rt = HostCudart()
    reuse = RewardEngine(mid_bundle, runtime=trt_runtime.TensorRTRuntime(mid_bundle, cuda=CudaApi(rt)))
    plain = RewardEngine(mid_bundle, runtime=trt_runtime.TensorRTRuntime(mid_bundle, cuda=CudaApi(HostCudart()),
                                                                         prefix_reuse=False))
    reference = RewardEngine(mid_bundle, backend="onnxruntime", providers=["CPUExecutionProvider"],
                             intra_op_threads=1, prefix_reuse=False)
    assert reuse.prefix_reuse and not plain.prefix_reuse
    steps = 11
    for i, image in enumerate(random_frames(steps, seed=8)):
        for engine in (reuse, plain, reference):
            engine.add_frame(i, image)
    lists = _episode_lists(steps, m.num_frames)
    want = [reference.score(TINY_INSTRUCTION, ids) for ids in lists]
    got = [*(reuse.score(TINY_INSTRUCTION, ids) for ids in lists),
           *(plain.score(TINY_INSTRUCTION, ids) for ids in lists),
           *reuse.score_batch(TINY_INSTRUCTION, lists, batch_size=len(lists))]  # one suffix call for the episode
    for a, ref in zip(got, [*want, *want, *want], strict=True):
        np.testing.assert_allclose(a.progress_logits, ref.progress_logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.success_logits, ref.success_logits, atol=1e-5, rtol=0)
    assert "cudaMemcpy2DAsync" in rt.calls  # the strided copies really ran
    assert reuse.runtime._parts[PART_LANGUAGE_PREFIX].context.enqueued == 1
    for engine in (reuse, plain, reference):
        engine.close()
