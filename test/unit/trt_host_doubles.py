"""Host-memory stand-ins for cuda-python's runtime module and for TensorRT, for CPU tests of trt_runtime.

They let ``TensorRTRuntime``'s own code run on a machine without a GPU: every allocation, copy, 2D copy,
binding, shape query and enqueue it makes goes through these with the same call signatures and the same
``(err, value)`` result tuples, on real host memory. The "engine" runs the bundle's ONNX part in ONNX
Runtime on whatever bytes are bound at its tensor addresses, so a wrong address, offset, dtype (an int32
buffer where int64 is bound) or concatenation changes the scores. Like a real plan, it refuses input
shapes outside the optimization profile ``robometer-build-engines`` would build from the manifest
(``tensorrt_build.axis_ranges``; fixed axes must match). What they cannot show is CUDA or TensorRT
behaviour itself: that is test/gpu/.
"""

from __future__ import annotations

import ctypes
import enum
from types import SimpleNamespace
from typing import Any

import numpy as np


class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100


class _Stream(int):
    """A stream handle: ``int(stream)`` works as with cuda-python's cudaStream_t."""


class HostCudart:
    """The subset of ``cuda.bindings.runtime`` that cuda_rt.CudaApi calls, on host memory."""

    cudaError_t = _Err
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,
                                     cudaMemcpyDeviceToDevice=3)
    cudaDeviceAttr = SimpleNamespace(cudaDevAttrComputeCapabilityMajor=75, cudaDevAttrComputeCapabilityMinor=76)
    cudaStreamNonBlocking = 1

    def __init__(self, devices: int = 1) -> None:
        self.devices = devices
        self.blocks: dict[int, Any] = {}  # address -> ctypes buffer (device and pinned memory alike)
        self.calls: list[str] = []
        self.current = 0

    def _alloc(self, size: int) -> int:
        raw = ctypes.create_string_buffer(size + 256)
        ptr = (ctypes.addressof(raw) + 255) // 256 * 256  # cudaMalloc's >= 256-byte alignment
        self.blocks[ptr] = raw
        return ptr

    def cudaGetDeviceCount(self):
        return (_Err.cudaSuccess, self.devices) if self.devices else (_Err.cudaErrorNoDevice, None)

    def cudaDriverGetVersion(self):
        return _Err.cudaSuccess, 12090

    def cudaRuntimeGetVersion(self):
        return _Err.cudaSuccess, 12090

    def cudaGetErrorName(self, err):
        return _Err.cudaSuccess, _Err(int(err)).name.encode()

    def cudaSetDevice(self, index):
        self.current = index
        return (_Err.cudaSuccess,)

    def cudaGetDevice(self):
        return _Err.cudaSuccess, self.current

    def cudaGetDeviceProperties(self, index):
        return _Err.cudaSuccess, SimpleNamespace(name=b"Host Test GPU" + b"\0" * 243)

    def cudaDeviceGetAttribute(self, attr, index):
        return _Err.cudaSuccess, 8 if attr == 75 else 9

    def cudaMalloc(self, size):
        self.calls.append("cudaMalloc")
        return _Err.cudaSuccess, self._alloc(size)

    def cudaMallocHost(self, size):
        return _Err.cudaSuccess, self._alloc(size)

    def cudaFree(self, ptr):
        self.calls.append("cudaFree")
        return (_Err.cudaSuccess,) if self.blocks.pop(ptr, None) is not None else (_Err.cudaErrorInvalidValue,)

    cudaFreeHost = cudaFree

    def cudaStreamCreateWithFlags(self, flags):
        return _Err.cudaSuccess, _Stream(7)

    def cudaStreamSynchronize(self, stream):
        return (_Err.cudaSuccess,)

    def cudaStreamDestroy(self, stream):
        return (_Err.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        ctypes.memmove(dst, src, count)
        return (_Err.cudaSuccess,)

    def cudaMemcpy(self, dst, src, count, kind):
        ctypes.memmove(dst, src, count)
        return (_Err.cudaSuccess,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        self.calls.append("cudaMemcpy2DAsync")
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        return (_Err.cudaSuccess,)


# ------------------------------------------------------------------------------------------------------
# TensorRT: an engine per plan file whose bytes name the bundle's ONNX part; it runs that part in ORT.

_ORT_TO_TRT = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64",
               "tensor(int32)": "INT32", "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8"}
_TRT_TO_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_,
                 "UINT8": np.uint8}


def _read(ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_ubyte * max(count, 1)).from_address(ptr)
    return np.frombuffer(raw, dtype=np.uint8, count=count).view(dtype).reshape(shape).copy()


class _Context:
    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.results: dict[str, np.ndarray] = {}
        self.enqueued = 0

    def set_input_shape(self, name, shape):
        shape = tuple(int(d) for d in shape)
        if name not in self.engine.inputs or not self.engine.in_profile(name, shape):
            return False  # TensorRT: an unknown input, or a shape outside the profile
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, ptr):
        if ptr % 256:
            return False  # TensorRT's alignment rule
        self.addresses[name] = int(ptr)
        return True

    def infer_shapes(self):
        missing = [n for n in self.engine.inputs if n not in self.shapes or n not in self.addresses]
        if missing:
            return missing
        feed = {n: _read(self.addresses[n], self.shapes[n], _TRT_TO_NUMPY[self.engine.dtypes[n]])
                for n in self.engine.inputs}
        values = self.engine.session.run(self.engine.outputs, feed)
        self.results = dict(zip(self.engine.outputs, values))
        return []

    def get_tensor_shape(self, name):
        if name in self.engine.inputs:
            return self.shapes[name]
        return self.results[name].shape

    def execute_async_v3(self, stream_handle):
        int(stream_handle)
        for name, value in self.results.items():
            data = np.ascontiguousarray(value, dtype=_TRT_TO_NUMPY[self.engine.dtypes[name]])
            ctypes.memmove(self.addresses[name], data.ctypes.data, data.nbytes)
        self.enqueued += 1
        return True


class _Engine:
    def __init__(self, onnx_path: str, profile: dict[str, list[tuple[int, int]]] | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.dtypes = {t.name: _ORT_TO_TRT[t.type] for t in self.session.get_inputs() + self.session.get_outputs()}
        self.names = self.inputs + self.outputs
        self.contexts: list[_Context] = []
        self.profile = profile or {}  # input -> (min, max) per axis

    def in_profile(self, name: str, shape: tuple[int, ...]) -> bool:
        bounds = self.profile.get(name)
        if bounds is None:
            return True
        return len(shape) == len(bounds) and all(lo <= d <= hi for d, (lo, hi) in zip(shape, bounds))

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_location(self, name):
        return "DEVICE"

    def create_execution_context(self):
        context = _Context(self)
        self.contexts.append(context)
        return context


def add_host_plans(bundle: Any, parts: Any, key: Any) -> None:
    """Record a plan per part in the bundle's engine index whose bytes name the part's ONNX file."""
    from robometer_ros.engine.bundle import EngineRecord, sha256_file, utc_now

    for part in parts:
        rel = f"engines/{part}.host-test.plan"
        path = bundle.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"onnx:{bundle.part(part).file}".encode())
        bundle.record_engine(EngineRecord(part=part, file=rel, sha256=sha256_file(path), key=key,
                                          onnx_sha256=bundle.file_sha256(bundle.part(part).file), built_at=utc_now()))


def _profile(bundle_root: Any, onnx_file: str) -> dict[str, list[tuple[int, int]]]:
    """(min, max) per axis of every input of the part stored in ``onnx_file``, as the engine builder sets them."""
    from robometer_ros.engine.bundle import Bundle
    from robometer_ros.engine.tensorrt_build import axis_ranges

    bundle = Bundle.open(bundle_root, verify_checksums=False)
    part = next(name for name, spec in bundle.manifest.parts.items() if spec.file == onnx_file)
    ranges = axis_ranges(bundle, part)
    return {t.name: [(d, d) if isinstance(d, int) else (ranges[d][0], ranges[d][2]) for d in t.shape]
            for t in bundle.part(part).inputs}


def host_tensorrt(bundle_root: Any, version: str = "10.13.3") -> SimpleNamespace:
    """A module-like TensorRT whose Runtime turns a plan file's bytes b"onnx:<relpath>" into an ORT engine."""

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, plan):
            text = bytes(plan).decode(errors="replace")
            if not text.startswith("onnx:"):
                return None  # TensorRT returns None for a plan it cannot read
            return _Engine(str(bundle_root / text[5:]), _profile(bundle_root, text[5:]))

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    return SimpleNamespace(
        __version__=version, Runtime=Runtime, Logger=Logger,
        DataType=SimpleNamespace(**{k: k for k in ("FLOAT", "HALF", "INT64", "INT32", "BOOL", "UINT8")}),
        TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        TensorLocation=SimpleNamespace(DEVICE="DEVICE", HOST="HOST"),
    )
