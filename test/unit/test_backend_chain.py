"""backend="auto": tensorrt -> onnxruntime TensorRT EP -> CUDA EP -> CPU -> torch, each failure logged with its
reason, the chosen backend read back from the runtime, and a tensorrt runtime that fails to start (a real
cuda-python call answering "no driver", or a plan that does not deserialize) falls back too."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from fixtures_bundle import TINY_INSTRUCTION, copy_bundle, random_frames
from robometer_ros.engine import trt_runtime
from robometer_ros.engine.bundle import PART_LANGUAGE, PART_VISION, Bundle, EngineKey
from robometer_ros.engine.reward_engine import RewardEngine
from robometer_ros.engine.runtime import (
    AUTO_CHAIN,
    LibraryMissingError,
    ProviderUnavailableError,
    RuntimeUnavailableError,
    create_runtime,
    create_runtime_auto,
)
from robometer_ros.engine.trt_common import GpuIdentity
from trt_host_doubles import add_host_plans, host_tensorrt

GPU = GpuIdentity("NVIDIA Jetson AGX Orin", "8.7")
KEY = EngineKey("tensorrt", "10.13.3", GPU.name, GPU.compute_capability, "fp32")

ort = pytest.importorskip("onnxruntime")
CPU_ONLY_ORT = "CUDAExecutionProvider" not in ort.get_available_providers()


@pytest.fixture
def bundle(tiny_bundle, tmp_path: Path) -> Bundle:
    return Bundle.open(copy_bundle(tiny_bundle.path, tmp_path / "bundle"))


def _chain_records(caplog) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("backend auto")]


def test_auto_order_is_tensorrt_then_ort_trt_cuda_cpu_then_torch() -> None:
    assert AUTO_CHAIN == ("tensorrt", "onnxruntime:TensorrtExecutionProvider", "onnxruntime:CUDAExecutionProvider",
                          "onnxruntime:CPUExecutionProvider", "torch")


@pytest.mark.skipif(not CPU_ONLY_ORT, reason="onnxruntime-gpu is installed")
def test_tensorrt_missing_then_each_provider_unavailable_then_cpu(bundle: Bundle, monkeypatch, caplog) -> None:
    # TensorRT not importable (the real import machinery raising ImportError for both flavours)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with caplog.at_level(logging.INFO, logger="robometer_ros.engine.runtime"):
        runtime = create_runtime(bundle, "auto", intra_op_threads=1)
    attempts = runtime.backend_attempts
    assert [a.candidate for a in attempts] == list(AUTO_CHAIN[:4])
    assert [a.error for a in attempts] == ["LibraryMissingError", "ProviderUnavailableError",
                                           "ProviderUnavailableError", ""]
    assert "TensorRT is not importable here" in attempts[0].reason
    assert "has no TensorrtExecutionProvider in this build" in attempts[1].reason
    assert "has no CUDAExecutionProvider in this build" in attempts[2].reason
    assert attempts[3].chosen and runtime.backend_name == "onnxruntime:CPUExecutionProvider"
    records = _chain_records(caplog)
    assert [level for level, _ in records] == ["INFO"] * 4  # expected absences: info, not warnings
    assert records[0][1].startswith("backend auto: tensorrt cannot run: LibraryMissingError: TensorRT is not")
    assert records[1][1].startswith("backend auto: onnxruntime:TensorrtExecutionProvider cannot run")
    assert records[2][1].startswith("backend auto: onnxruntime:CUDAExecutionProvider cannot run")
    assert records[3][1].startswith("backend auto -> onnxruntime:CPUExecutionProvider (tensorrt: LibraryMissingError")
    # what the node reports (StepReward.backend, diagnostics) is the runtime's read-back
    engine = RewardEngine(bundle, runtime=runtime)
    assert engine.backend_name == "onnxruntime:CPUExecutionProvider"
    assert [a.candidate for a in engine.backend_attempts] == list(AUTO_CHAIN[:4])
    engine.close()


@pytest.mark.skipif(not CPU_ONLY_ORT, reason="onnxruntime-gpu is installed")
def test_no_plan_is_a_reason_not_a_failure(bundle: Bundle, monkeypatch) -> None:
    trt = host_tensorrt(bundle.root, KEY.runtime_version)
    monkeypatch.setattr(trt_runtime, "import_tensorrt", lambda prefer=None: (trt, "tensorrt"))
    runtime = create_runtime(bundle, "auto", intra_op_threads=1)
    first = runtime.backend_attempts[0]
    assert first.candidate == "tensorrt" and first.error == "NoEngineError"
    assert "no current TensorRT plan for this GPU/TensorRT" in first.reason


@pytest.mark.skipif(not CPU_ONLY_ORT, reason="onnxruntime-gpu is installed")
def test_a_tensorrt_runtime_that_fails_to_start_falls_back(bundle: Bundle, monkeypatch, caplog) -> None:
    """Current plans for "this GPU" (identity faked), so TensorRTRuntime really starts: its first CUDA call
    goes to the real cuda-python, which answers cudaErrorInsufficientDriver on this machine."""
    from robometer_ros.engine.cuda_rt import CudaApi

    try:
        probe = CudaApi().probe()
    except LibraryMissingError as exc:
        pytest.skip(str(exc))
    if probe[0]:
        pytest.skip("this machine has a CUDA device")
    trt = host_tensorrt(bundle.root, KEY.runtime_version)
    monkeypatch.setattr(trt_runtime, "import_tensorrt", lambda prefer=None: (trt, "tensorrt"))
    monkeypatch.setattr(trt_runtime, "gpu_identity", lambda index=0: GPU)
    add_host_plans(bundle, [PART_VISION, PART_LANGUAGE], KEY)
    assert trt_runtime.find_usable_engines(bundle) is not None  # selection alone would pick tensorrt
    with caplog.at_level(logging.INFO, logger="robometer_ros.engine.runtime"):
        runtime = create_runtime_auto(bundle, intra_op_threads=1)
    first = runtime.backend_attempts[0]
    assert (first.candidate, first.error) == ("tensorrt", "NoDeviceError")
    assert "no CUDA driver is installed" in first.reason
    assert runtime.backend_name == "onnxruntime:CPUExecutionProvider"

    # a plan that does not deserialize: a start failure, logged as a warning, then onnxruntime
    (bundle.root / "engines" / f"{PART_LANGUAGE}.host-test.plan").write_bytes(b"corrupt")
    from trt_host_doubles import HostCudart

    real_api = trt_runtime.CudaApi
    monkeypatch.setattr(trt_runtime, "CudaApi", lambda: real_api(HostCudart()))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="robometer_ros.engine.runtime"):
        engine = RewardEngine(bundle, backend="auto", intra_op_threads=1)
    first = engine.backend_attempts[0]
    assert (first.candidate, first.error) == ("tensorrt", "RuntimeStartError")
    assert "could not deserialize the language plan" in first.reason
    assert ("WARNING", f"backend auto: tensorrt cannot run: RuntimeStartError: {first.reason}") in \
        _chain_records(caplog)
    assert engine.backend_name == "onnxruntime:CPUExecutionProvider"
    for i, image in enumerate(random_frames(2)):
        engine.add_frame(i, image)
    assert engine.score(TINY_INSTRUCTION, [0, 1]).progress.shape == (2,)
    engine.close()


def test_nothing_can_run_lists_every_reason(bundle: Bundle, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RuntimeUnavailableError) as info:
        create_runtime_auto(bundle, chain=AUTO_CHAIN[:4])
    text = str(info.value)
    assert text.startswith("no backend can run this bundle: tensorrt: LibraryMissingError")
    assert text.count("onnxruntime is not installed") == 3


def test_explicit_backend_records_a_single_attempt(bundle: Bundle) -> None:
    runtime = create_runtime(bundle, "onnxruntime", providers=["CPUExecutionProvider"], intra_op_threads=1)
    assert [a.describe() for a in runtime.backend_attempts] == ["onnxruntime: chosen"]
    if CPU_ONLY_ORT:  # an explicit backend does not fall back: the missing provider is an error
        with pytest.raises(ProviderUnavailableError, match="no CUDAExecutionProvider in this build"):
            create_runtime(bundle, "onnxruntime", providers=["CUDAExecutionProvider"])


def test_a_provider_that_did_not_load_is_caught_by_reading_the_session_back(bundle: Bundle) -> None:
    """onnxruntime-gpu creates the session on another provider when the asked one cannot load; the runtime
    reads session.get_providers() back and refuses (on the small vision part, before the language part)."""
    from robometer_ros.engine.ort_runtime import OnnxRuntimeRuntime

    with pytest.raises(ProviderUnavailableError, match="vision part: CUDAExecutionProvider did not load, "
                                                       "the session runs on CPUExecutionProvider"):
        OnnxRuntimeRuntime(bundle, providers=["CPUExecutionProvider"], require_provider="CUDAExecutionProvider")


def test_missing_cuda_python_is_named_and_auto_falls_back(bundle: Bundle, monkeypatch) -> None:
    trt = host_tensorrt(bundle.root, KEY.runtime_version)
    monkeypatch.setattr(trt_runtime, "import_tensorrt", lambda prefer=None: (trt, "tensorrt"))
    monkeypatch.setattr(trt_runtime, "gpu_identity", lambda index=0: GPU)
    add_host_plans(bundle, [PART_VISION, PART_LANGUAGE], KEY)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    import cuda  # the namespace package cuda-bindings' start-up hook imports

    monkeypatch.delattr(cuda, "cudart", raising=False)
    with pytest.raises(LibraryMissingError, match=r"needs NVIDIA's cuda-python .*pip install 'cuda-bindings"):
        trt_runtime.TensorRTRuntime(bundle)
    runtime = create_runtime(bundle, "auto", intra_op_threads=1)
    assert (runtime.backend_attempts[0].candidate, runtime.backend_attempts[0].error) == \
        ("tensorrt", "LibraryMissingError")
    assert runtime.backend_name.startswith("onnxruntime:")
