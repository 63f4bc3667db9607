"""CUDA device memory, streams, pinned host buffers and copies through NVIDIA's cuda-python, no torch.

The TensorRT runtime (trt_runtime.py) keeps frame features on the GPU with this module; nothing here
imports torch, and ``cuda.bindings`` itself is imported only by ``load_cudart`` (importing this module
works on a machine without CUDA).

cuda-python calls used (``cuda.bindings.runtime``, the CUDA Runtime API; every call returns a tuple whose
first element is a ``cudaError_t`` and never raises, so ``CudaApi.check`` turns a failure into
``CudaError``): ``cudaGetDeviceCount``, ``cudaDriverGetVersion``, ``cudaRuntimeGetVersion``,
``cudaGetErrorName``, ``cudaSetDevice``, ``cudaGetDevice``, ``cudaGetDeviceProperties`` (``.name``),
``cudaDeviceGetAttribute`` (``cudaDevAttrComputeCapabilityMajor``/``Minor``), ``cudaMalloc``, ``cudaFree``,
``cudaMallocHost``, ``cudaFreeHost``, ``cudaStreamCreateWithFlags`` (``cudaStreamNonBlocking``),
``cudaStreamSynchronize``, ``cudaStreamDestroy``, ``cudaMemcpyAsync`` and ``cudaMemcpy2DAsync``
(``cudaMemcpyHostToDevice``/``DeviceToHost``/``DeviceToDevice``).

Module paths: cuda-bindings >= 12.6.1 (and every 13.x) has ``cuda.bindings.runtime``; older 12.x/11.x
releases only ``cuda.cudart`` (removed in 13.0). ``load_cudart`` tries them in that order.

Alignment: ``cudaMalloc`` returns >= 256-byte aligned blocks and TensorRT requires 256-byte aligned tensor
addresses, so sub-allocations inside one block are placed at multiples of ``ALIGNMENT``.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from robometer_ros.engine.runtime import LibraryMissingError, NoDeviceError, RuntimeStartError

LOG = logging.getLogger(__name__)

#: address alignment of every device tensor (TensorRT's setTensorAddress requirement)
ALIGNMENT = 256

#: bytes per element of the tensor dtypes the runtimes exchange (names as in the bundle manifest)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}

#: the cuda.bindings.runtime functions this module calls (a test checks them against the installed bindings)
CUDART_CALLS = (
    "cudaGetDeviceCount", "cudaDriverGetVersion", "cudaRuntimeGetVersion", "cudaGetErrorName", "cudaSetDevice",
    "cudaGetDevice", "cudaGetDeviceProperties", "cudaDeviceGetAttribute", "cudaMalloc", "cudaFree",
    "cudaMallocHost", "cudaFreeHost", "cudaStreamCreateWithFlags", "cudaStreamSynchronize", "cudaStreamDestroy",
    "cudaMemcpyAsync", "cudaMemcpy2DAsync", "cudaMemcpy",
)

CUDA_PYTHON_HINT = "pip install 'cuda-bindings>=12.6.1,<13' (CUDA 12 TensorRT) or 'cuda-bindings>=13' (CUDA 13)"


def align_up(offset: int, alignment: int = ALIGNMENT) -> int:
    """``offset`` rounded up to a multiple of ``alignment``."""
    return -(-int(offset) // alignment) * alignment


def load_cudart() -> ModuleType:
    """The cuda-python runtime module (``cuda.bindings.runtime``, else the legacy ``cuda.cudart``).

    Raises ``LibraryMissingError`` naming the package to install when neither imports.
    """
    errors = []
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError as exc:
        errors.append(f"cuda.bindings.runtime: {exc}")
    try:
        import warnings

        with warnings.catch_warnings():  # 12.6.1..12.9 warn that cuda.cudart is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            from cuda import cudart  # type: ignore[attr-defined]

        return cudart
    except ImportError as exc:
        errors.append(f"cuda.cudart: {exc}")
    raise LibraryMissingError(
        "the tensorrt backend needs NVIDIA's cuda-python for device memory and streams, and it is not "
        f"importable ({'; '.join(errors)}); {CUDA_PYTHON_HINT}"
    )


class CudaError(RuntimeStartError):
    """A CUDA runtime call failed; ``code``/``name`` are the ``cudaError_t`` (35, cudaErrorInsufficientDriver)."""

    def __init__(self, what: str, code: int, name: str) -> None:
        super().__init__(f"{what} failed: CUDA error {code} {name}")
        self.what, self.code, self.name = what, code, name


@dataclass(frozen=True)
class DeviceInfo:
    """One CUDA device as the runtime API reports it."""

    index: int
    name: str
    compute_capability: str  # "8.9"


class CudaApi:
    """The CUDA runtime calls the TensorRT runtime needs, with errors turned into ``CudaError``.

    ``cudart`` is the module from ``load_cudart`` (injectable for tests of the error handling).
    """

    def __init__(self, cudart: ModuleType | None = None) -> None:
        self.rt = cudart if cudart is not None else load_cudart()
        self._ok = self.rt.cudaError_t.cudaSuccess
        kinds = self.rt.cudaMemcpyKind
        self.H2D, self.D2H, self.D2D = (
            kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToHost, kinds.cudaMemcpyDeviceToDevice,
        )

    def error_name(self, err: Any) -> str:
        """``cudaGetErrorName`` as text (it returns ``(cudaSuccess, b'cudaError...')``)."""
        try:
            _, name = self.rt.cudaGetErrorName(err)
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # an unknown code: the number is still in the message
            return "unknown CUDA error"

    def check(self, result: Any, what: str) -> Any:
        """Unpack a cuda-python result tuple ``(err, *values)``: the value(s), or raise ``CudaError``."""
        if not isinstance(result, tuple) or not result:
            raise TypeError(f"{what}: expected a cuda-python result tuple, got {result!r}")
        err, *values = result
        if err != self._ok:
            raise CudaError(what, int(err), self.error_name(err))
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    # ---- devices -----------------------------------------------------------------------------
    def probe(self) -> tuple[int, str]:
        """(number of CUDA devices, why none) without raising: "no CUDA driver", "driver too old", ...

        ``cudaGetDeviceCount`` is the first call that fails on a machine without a driver
        (cudaErrorInsufficientDriver, 35) or without a device (cudaErrorNoDevice, 100).
        """
        err, count = self.rt.cudaGetDeviceCount()
        if err == self._ok and count:
            return int(count), "ok"
        driver = self.rt.cudaDriverGetVersion()[1] or 0
        runtime = self.rt.cudaRuntimeGetVersion()[1] or 0
        if err == self.rt.cudaError_t.cudaErrorInsufficientDriver:
            if driver == 0:
                return 0, "no CUDA driver is installed (libcuda not found; cudaErrorInsufficientDriver)"
            return 0, (f"the CUDA driver ({_cuda_version(driver)}) is older than cuda-python's runtime "
                       f"({_cuda_version(runtime)}): install cuda-bindings of the driver's CUDA major")
        if err == self._ok:
            return 0, "the CUDA driver reports no device"
        return 0, f"no usable CUDA device ({self.error_name(err)}, error {int(err)})"

    def require_device(self, index: int) -> DeviceInfo:
        """Select device ``index`` for this thread and describe it; ``NoDeviceError`` when there is none."""
        count, why = self.probe()
        if count == 0:
            raise NoDeviceError(f"the tensorrt backend needs a CUDA GPU: {why}")
        if not 0 <= index < count:
            raise NoDeviceError(f"CUDA device {index} does not exist (this machine has {count})")
        self.set_device(index)
        props = self.check(self.rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
        raw = props.name
        name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        attr = self.rt.cudaDeviceAttr
        major = self.check(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, index),
                           "cudaDeviceGetAttribute(major)")
        minor = self.check(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, index),
                           "cudaDeviceGetAttribute(minor)")
        return DeviceInfo(index, name, f"{major}.{minor}")

    def set_device(self, index: int) -> None:
        """Make ``index`` the current device of the calling host thread (needed once per thread)."""
        self.check(self.rt.cudaSetDevice(int(index)), f"cudaSetDevice({index})")

    # ---- memory and streams --------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr), "cudaFree")

    def malloc_host(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMallocHost(max(int(nbytes), 1)), f"cudaMallocHost({nbytes})"))

    def free_host(self, ptr: int) -> None:
        self.check(self.rt.cudaFreeHost(ptr), "cudaFreeHost")

    def stream_create(self) -> Any:
        # non-blocking: no implicit synchronisation with the legacy default stream
        return self.check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    def stream_sync(self, stream: Any) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def stream_destroy(self, stream: Any) -> None:
        self.check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def copy_async(self, dst: int, src: int, nbytes: int, kind: Any, stream: Any) -> None:
        if nbytes:
            self.check(self.rt.cudaMemcpyAsync(dst, src, int(nbytes), kind, stream), "cudaMemcpyAsync")

    def copy_2d_async(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: Any,
                      stream: Any) -> None:
        if width and height:
            self.check(self.rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream),
                       "cudaMemcpy2DAsync")


def _cuda_version(v: int) -> str:
    return f"CUDA {v // 1000}.{(v % 1000) // 10}" if v else "none"


# ------------------------------------------------------------------------------------------------------
# Device blocks and arrays


#: spare (freed but not returned) bytes a ``DeviceAllocator`` may hold by default
SPARE_BYTES = 256 << 20


class DeviceAllocator:
    """``cudaMalloc`` blocks with a free list per size, so encoding a frame after forgetting one reuses memory.

    Frame features all have the same size, and ``cudaFree`` synchronises the whole device, so a freed
    block goes back to a bounded free list (``keep`` blocks per size, ``keep_bytes`` in all) instead of
    to the driver. The byte bound matters for prefix keys/values: their size follows the instruction's
    length, so blocks of sizes that never come back would otherwise pile up. Blocks are released when
    the last ``DeviceArray`` on them is garbage collected (from any thread).
    """

    def __init__(self, cuda: CudaApi, device: int, keep: int = 32, keep_bytes: int = SPARE_BYTES) -> None:
        self.cuda, self.device, self.keep, self.keep_bytes = cuda, device, keep, keep_bytes
        self._spare: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.live_bytes = 0
        self.spare_bytes = 0

    def alloc(self, nbytes: int) -> DeviceBlock:
        """A block of at least ``nbytes`` (rounded up to the alignment) on this allocator's device."""
        size = align_up(max(int(nbytes), 1))
        with self._lock:
            if self._closed:
                raise RuntimeError("the TensorRT runtime is closed")
            spare = self._spare.get(size)
            ptr = spare.pop() if spare else None
            if ptr is not None:
                self.spare_bytes -= size
            self.live_bytes += size
        if ptr is None:
            try:
                ptr = self.cuda.malloc(size)
            except BaseException:
                with self._lock:
                    self.live_bytes -= size
                raise
        return DeviceBlock(self, ptr, size)

    def copy_of(self, array: DeviceArray) -> DeviceArray:
        """A new device array with the same contents (synchronous device-to-device copy; benchmarks, tools)."""
        block = self.alloc(array.nbytes)
        self.cuda.set_device(self.device)
        self.cuda.check(self.cuda.rt.cudaMemcpy(block.ptr, array.ptr, array.nbytes, self.cuda.D2D), "cudaMemcpy")
        return DeviceArray(block, 0, array.shape, array.dtype)

    def release(self, ptr: int, size: int) -> None:
        """Return a block (called by the block's finalizer)."""
        with self._lock:
            self.live_bytes -= size
            spare = self._spare.setdefault(size, [])
            if not self._closed and len(spare) < self.keep and self.spare_bytes + size <= self.keep_bytes:
                spare.append(ptr)
                self.spare_bytes += size
                return
        self._free(ptr)

    def _free(self, ptr: int) -> None:
        try:
            previous = self.cuda.check(self.cuda.rt.cudaGetDevice(), "cudaGetDevice")
            if previous != self.device:
                self.cuda.set_device(self.device)
            self.cuda.free(ptr)
            if previous != self.device:
                self.cuda.set_device(previous)
        except Exception as exc:  # at interpreter exit the context may already be gone
            LOG.debug("cudaFree of a released block failed: %s", exc)

    def close(self) -> None:
        """Free the spare blocks; blocks still in use are freed when they are released."""
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, {}
            self.spare_bytes = 0
        for ptrs in spare.values():
            for ptr in ptrs:
                self._free(ptr)


class DeviceBlock:
    """One device allocation; returned to its allocator when garbage collected."""

    def __init__(self, allocator: DeviceAllocator, ptr: int, nbytes: int) -> None:
        self.allocator, self.ptr, self.nbytes = allocator, ptr, nbytes
        self._finalizer = weakref.finalize(self, allocator.release, ptr, nbytes)


class DeviceArray:
    """A C-contiguous tensor in device memory: a block (kept alive by this view), an offset, shape and dtype.

    ``nbytes`` is the tensor's own size (what ``RewardEngine.cache_nbytes`` adds up); ``dtype`` is a
    manifest dtype name ("float32", "float16", "bfloat16", "int64", ...).
    """

    __slots__ = ("block", "dtype", "offset", "shape")

    def __init__(self, block: DeviceBlock, offset: int, shape: Sequence[int], dtype: str) -> None:
        if dtype not in ITEMSIZE:
            raise ValueError(f"unsupported device dtype {dtype!r}")
        self.block, self.offset, self.shape, self.dtype = block, int(offset), tuple(int(d) for d in shape), dtype
        if self.offset + self.nbytes > block.nbytes:
            raise ValueError(f"a {self.shape} {dtype} tensor at offset {offset} does not fit "
                             f"a {block.nbytes}-byte block")

    @property
    def ptr(self) -> int:
        """Device address of the first element."""
        return self.block.ptr + self.offset

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    def copy(self) -> DeviceArray:
        """A copy in new device memory (like ``numpy.ndarray.copy``)."""
        return self.block.allocator.copy_of(self)

    @property
    def is_cuda(self) -> bool:
        """Always True (same spelling as torch.Tensor.is_cuda)."""
        return True

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, ptr=0x{self.ptr:x})"


@dataclass(frozen=True)
class DeviceConcat:
    """Feed value: the concatenation of device arrays along ``axis`` (done on the device, no host round trip)."""

    arrays: tuple[DeviceArray, ...]
    axis: int = 0


@dataclass(frozen=True)
class DeviceStack:
    """Feed value: equal-shape concatenations stacked on a new leading (batch) axis, assembled on the device.

    E.g. a suffix batch: row b is prompt b's frames after the first, concatenated along the token axis.
    """

    rows: tuple[DeviceConcat, ...]

    @property
    def arrays(self) -> tuple[DeviceArray, ...]:
        """Every source array, row by row (``stack_plan``'s ``Copy2D.source`` indexes this)."""
        return tuple(a for row in self.rows for a in row.arrays)


@dataclass(frozen=True)
class Copy2D:
    """One strided copy of a concatenation: ``height`` rows of ``width`` bytes from source ``source``."""

    source: int
    dst_offset: int
    dpitch: int
    spitch: int
    width: int
    height: int


def concat_plan(shapes: Sequence[Sequence[int]], axis: int, itemsize: int) -> tuple[tuple[int, ...], list[Copy2D]]:
    """The output shape and the copies that concatenate C-contiguous arrays of ``shapes`` along ``axis``.

    A C-contiguous array of shape S seen at ``axis`` is ``prod(S[:axis])`` rows of ``prod(S[axis:])``
    elements; the output's rows are the sources' rows side by side, so each source is one 2D copy
    (one plain copy when ``axis`` is 0). Pure arithmetic, tested against ``np.concatenate``.
    """
    if not shapes:
        raise ValueError("nothing to concatenate")
    first = tuple(int(d) for d in shapes[0])
    ndim = len(first)
    if not 0 <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for {ndim}-d arrays")
    for shape in shapes:
        if len(shape) != ndim or any(int(a) != b for i, (a, b) in enumerate(zip(shape, first)) if i != axis):
            raise ValueError(f"cannot concatenate shapes {[tuple(s) for s in shapes]} along axis {axis}")
    outer = math.prod(first[:axis])
    widths = [math.prod(int(d) for d in shape[axis:]) * itemsize for shape in shapes]
    dpitch = sum(widths)
    out_shape = (*first[:axis], sum(int(s[axis]) for s in shapes), *first[axis + 1:])
    copies, column = [], 0
    for index, width in enumerate(widths):
        copies.append(Copy2D(index, column, dpitch, width, width, outer))
        column += width
    return out_shape, copies


def stack_plan(rows: Sequence[Sequence[Sequence[int]]], axis: int, itemsize: int) -> tuple[tuple[int, ...],
                                                                                            list[Copy2D]]:
    """The output shape and copies of ``np.stack([np.concatenate(row, axis) for row in rows])``.

    Each row is one ``concat_plan`` placed ``row_bytes`` after the previous one; ``Copy2D.source`` counts
    the sources row by row. Every row must concatenate to the same shape. Pure arithmetic, tested against
    numpy.
    """
    if not rows:
        raise ValueError("nothing to stack")
    row_shape, copies, offset, index = None, [], 0, 0
    for row in rows:
        shape, row_copies = concat_plan(row, axis, itemsize)
        if row_shape is None:
            row_shape = shape
        elif shape != row_shape:
            raise ValueError(f"cannot stack rows that concatenate to {row_shape} and {shape}")
        for c in row_copies:
            copies.append(Copy2D(index + c.source, offset + c.dst_offset, c.dpitch, c.spitch, c.width, c.height))
        offset += math.prod(shape) * itemsize
        index += len(row)
    assert row_shape is not None
    return (len(rows), *row_shape), copies


# ------------------------------------------------------------------------------------------------------
# Pinned host memory


class PinnedBuffer:
    """Page-locked host memory (``cudaMallocHost``) with numpy views; grown, never shrunk."""

    def __init__(self, cuda: CudaApi) -> None:
        self.cuda = cuda
        self.ptr = 0
        self.capacity = 0

    def ensure(self, nbytes: int) -> None:
        """At least ``nbytes`` of capacity (the old block is freed: callers synchronise before reuse)."""
        if nbytes <= self.capacity:
            return
        size = align_up(max(nbytes, 1), 4096)
        ptr = self.cuda.malloc_host(size)
        self.free()
        self.ptr, self.capacity = ptr, size

    def view(self, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` as a writable uint8 array (valid until the buffer grows or is freed)."""
        self.ensure(nbytes)
        if nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        raw = ctypes.cast(ctypes.c_void_p(self.ptr), ctypes.POINTER(ctypes.c_ubyte))
        return np.ctypeslib.as_array(raw, (nbytes,))

    def free(self) -> None:
        if self.ptr:
            try:
                self.cuda.free_host(self.ptr)
            except CudaError as exc:
                LOG.debug("cudaFreeHost failed: %s", exc)
        self.ptr, self.capacity = 0, 0


# ------------------------------------------------------------------------------------------------------
# bfloat16 on the host (numpy has no bfloat16)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 values, rounded to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact)."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
