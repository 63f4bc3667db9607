"""cuda-python on a real GPU (no TensorRT, no torch in the code under test): device query, pinned host <-> device
round trip, device-side concatenation by 2D copies, and the allocator's free list."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from robometer_ros.engine.cuda_rt import CudaApi, DeviceAllocator, DeviceArray, PinnedBuffer, concat_plan
from robometer_ros.engine.runtime import LibraryMissingError

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda() -> CudaApi:
    try:
        api = CudaApi()
    except LibraryMissingError as exc:
        pytest.skip(str(exc))
    count, why = api.probe()
    if not count:
        pytest.skip(why)
    return api


def test_device_copies_and_concatenation(cuda: CudaApi) -> None:
    device = cuda.require_device(0)
    assert device.name and device.compute_capability.count(".") == 1
    allocator = DeviceAllocator(cuda, 0)
    stream = cuda.stream_create()
    pinned = PinnedBuffer(cuda)
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((3, 6, 64)).astype(np.float32) for _ in range(4)]
    arrays = []
    for host in parts:
        block = allocator.alloc(host.nbytes)
        assert block.ptr % 256 == 0
        cuda.copy_async(block.ptr, host.ctypes.data, host.nbytes, cuda.H2D, stream)
        arrays.append(DeviceArray(block, 0, host.shape, "float32"))
    cuda.stream_sync(stream)
    shape, copies = concat_plan([a.shape for a in arrays], 1, 4)
    dst = DeviceArray(allocator.alloc(int(np.prod(shape)) * 4), 0, shape, "float32")
    for c in copies:
        cuda.copy_2d_async(dst.ptr + c.dst_offset, c.dpitch, arrays[c.source].ptr, c.spitch, c.width, c.height,
                           cuda.D2D, stream)
    view = pinned.view(dst.nbytes)
    cuda.copy_async(view.ctypes.data, dst.ptr, dst.nbytes, cuda.D2H, stream)
    cuda.stream_sync(stream)
    np.testing.assert_array_equal(view.view(np.float32).reshape(shape), np.concatenate(parts, axis=1))
    copy = dst.copy()
    back = np.empty(shape, np.float32)
    cuda.check(cuda.rt.cudaMemcpy(back.ctypes.data, copy.ptr, copy.nbytes, cuda.D2H), "cudaMemcpy")
    np.testing.assert_array_equal(back, np.concatenate(parts, axis=1))

    freed = {a.ptr for a in arrays}
    del arrays, copy, block
    gc.collect()
    again = allocator.alloc(parts[0].nbytes)  # same size as the released blocks: one of them, no cudaMalloc
    assert again.ptr in freed
    pinned.free()
    cuda.stream_destroy(stream)
    allocator.close()
