"""TensorRT backend: the bundle's cached plans, one CUDA stream, pinned host staging, dynamic shapes.

Device memory is held in torch CUDA tensors (torch is imported when the runtime is created, never at
module import), so frame features stay on the GPU between steps and the language part's inputs are
concatenated there. Host -> device copies go through reusable pinned buffers; outputs come back
through pinned buffers on the same stream, then one synchronize per call.

Plans come from ``robometer-build-engines`` (engine/tensorrt_build.py), keyed by TensorRT flavor and
version, GPU name, compute capability and precision; a plan whose ONNX changed since it was built is
not used.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from robometer_ros.engine.bundle import (
    PART_LANGUAGE,
    PART_LANGUAGE_PREFERENCE,
    PART_VISION,
    Bundle,
    EngineRecord,
)
from robometer_ros.engine.runtime import (
    FrameFeatures,
    HeadOutputs,
    LanguageInputs,
    Runtime,
    RuntimeUnavailableError,
)
from robometer_ros.engine.trt_common import CPU_AOT_GPU, gpu_identity, import_tensorrt

LOG = logging.getLogger(__name__)

#: precision preference when the caller does not ask for one
PRECISION_ORDER = ("fp8", "int8", "fp16", "bf16", "fp32")


def find_usable_engines(
    bundle: Bundle, precision: str | None = None, device_index: int = 0
) -> dict[str, EngineRecord] | None:
    """Current plans for the vision and language parts on this GPU and TensorRT, or None.

    Raises ``RuntimeUnavailableError`` when TensorRT or a GPU is missing. With ``precision`` None the
    fastest precision that has plans for both parts wins (fp8 > int8 > fp16 > bf16 > fp32).
    """
    trt, flavor = import_tensorrt()
    version = trt.__version__
    if not any(r.key.runtime == flavor and r.key.runtime_version == version for r in bundle.engines()):
        return None  # nothing to match: no need to query the GPU
    gpu = gpu_identity(device_index)
    if gpu is None:
        raise RuntimeUnavailableError("no CUDA GPU visible (the CUDA driver and nvidia-smi found none)")
    candidates: dict[str, dict[str, EngineRecord]] = {}
    for record in bundle.engines():
        key = record.key
        if key.runtime != flavor or key.runtime_version != version:
            continue
        same_gpu = key.gpu_name == gpu.name and key.compute_capability == gpu.compute_capability
        # TensorRT-RTX ahead-of-time plans built without a GPU: for any supported RTX GPU ("aot") or for
        # the listed targets ("aot-SM86-SM89").
        aot_ok = flavor == "tensorrt_rtx" and key.gpu_name == CPU_AOT_GPU and (
            key.compute_capability == "aot" or f"SM{gpu.sm}" in key.compute_capability.split("-")
        )
        if not same_gpu and not aot_ok:
            continue
        if precision is not None and key.precision != precision:
            continue
        ok, why = bundle.engine_is_current(record)
        if not ok:
            LOG.warning("ignoring stale TensorRT plan %s: %s", record.file, why)
            continue
        candidates.setdefault(key.precision, {})[record.part] = record
    for p in PRECISION_ORDER:
        plans = candidates.get(p, {})
        if PART_VISION in plans and PART_LANGUAGE in plans:
            return plans
    return None


def _torch_dtype(trt: Any, torch: Any, dtype: Any) -> Any:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT32: torch.int32,
        trt.DataType.BOOL: torch.bool,
        trt.DataType.UINT8: torch.uint8,
    }
    if dtype not in table:
        raise RuntimeUnavailableError(f"TensorRT I/O dtype {dtype} is not supported by this runtime")
    return table[dtype]


class _PinnedStaging:
    """Reusable page-locked host buffers, one per tensor name, grown on demand."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self._buffers: dict[str, Any] = {}

    def get(self, name: str, numel: int, dtype: Any) -> Any:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._torch.empty(max(numel, 1), dtype=dtype, pin_memory=True)
            self._buffers[name] = buf
        return buf[:numel]


class _EnginePart:
    """One deserialized plan with its execution context."""

    def __init__(self, trt: Any, torch: Any, runtime: Any, plan: bytes, name: str, device: Any) -> None:
        self.name = name
        self._trt, self._torch, self._device = trt, torch, device
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeUnavailableError(f"TensorRT could not deserialize the {name} plan (built for another GPU?)")
        self.context = self.engine.create_execution_context()
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.dtypes: dict[str, Any] = {}
        for i in range(self.engine.num_io_tensors):
            tensor = self.engine.get_tensor_name(i)
            self.dtypes[tensor] = _torch_dtype(trt, torch, self.engine.get_tensor_dtype(tensor))
            if self.engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT:
                self.inputs.append(tensor)
            else:
                self.outputs.append(tensor)

    def run(self, feed: dict[str, Any], stream: Any) -> dict[str, Any]:
        """Run on device tensors (``feed``: name -> CUDA tensor); returns name -> CUDA tensor."""
        torch = self._torch
        keep = []
        for name in self.inputs:
            tensor = feed[name]
            if tensor.dtype != self.dtypes[name]:
                tensor = tensor.to(self.dtypes[name])
            tensor = tensor.contiguous()
            keep.append(tensor)
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(
                    f"TensorRT {self.name} plan rejects input {name} of shape {tuple(tensor.shape)} "
                    "(outside the optimization profile built into the plan)"
                )
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[name], device=self._device)
            outputs[name] = out
            self.context.set_tensor_address(name, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT {self.name} plan failed to enqueue")
        return outputs


class TensorRTRuntime(Runtime):
    """Runs the bundle's TensorRT plans on one GPU."""

    def __init__(self, bundle: Bundle, precision: str | None = None, device_index: int = 0, **_: Any) -> None:
        plans = find_usable_engines(bundle, precision, device_index)
        if plans is None:
            raise RuntimeUnavailableError(
                f"{bundle.root}: no current TensorRT plan for this GPU/TensorRT"
                + (f" at precision {precision}" if precision else "")
                + "; run robometer-build-engines on this machine"
            )
        try:
            import torch
        except ImportError as exc:
            raise RuntimeUnavailableError("the tensorrt backend needs torch (with CUDA) for device memory") from exc
        if not torch.cuda.is_available():
            raise RuntimeUnavailableError("the tensorrt backend needs a CUDA build of torch and a GPU")
        trt, flavor = import_tensorrt()
        self._torch, self._trt = torch, trt
        self.bundle = bundle
        self.device = torch.device("cuda", device_index)
        self.precision = plans[PART_VISION].key.precision
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._plans = dict(plans)
        # Preference plans are optional and deserialized on first use (they duplicate the LM weights).
        for record in bundle.engines():
            if (
                record.part == PART_LANGUAGE_PREFERENCE
                and record.key == plans[PART_LANGUAGE].key
                and bundle.engine_is_current(record)[0]
            ):
                self._plans[PART_LANGUAGE_PREFERENCE] = record
        self._parts: dict[str, _EnginePart] = {}
        # One stream and one staging pool per part: the producer (vision) and the scorer (language)
        # threads run concurrently without sharing buffers.
        self._streams = {p: torch.cuda.Stream(device=self.device) for p in (PART_VISION, "language")}
        self._staging = {p: _PinnedStaging(torch) for p in (PART_VISION, "language")}
        self._locks = {p: threading.Lock() for p in (PART_VISION, "language")}
        with torch.cuda.device(self.device):
            self._part(PART_VISION)
            self._part(PART_LANGUAGE)
        self.backend_name = f"{flavor}:{self.precision}"
        LOG.info("TensorRT (%s %s) plans %s on %s", flavor, trt.__version__,
                 {p: r.file for p, r in self._plans.items()}, torch.cuda.get_device_name(self.device))

    def _part(self, part: str) -> _EnginePart:
        loaded = self._parts.get(part)
        if loaded is None:
            record = self._plans.get(part)
            if record is None:
                raise RuntimeUnavailableError(
                    f"{self.bundle.root}: no TensorRT plan for part {part!r} matching the loaded ones"
                )
            plan = (self.bundle.root / record.file).read_bytes()
            loaded = _EnginePart(self._trt, self._torch, self._runtime, plan, part, self.device)
            self._parts[part] = loaded
        return loaded

    def _upload(self, group: str, name: str, array: np.ndarray, stream: Any) -> Any:
        torch = self._torch
        host = torch.from_numpy(np.ascontiguousarray(array))
        staging = self._staging[group].get(name, host.numel(), host.dtype)
        staging.copy_(host.reshape(-1))
        with torch.cuda.stream(stream):
            return staging.to(self.device, non_blocking=True).reshape(host.shape)

    def _download(self, group: str, outputs: dict[str, Any], stream: Any) -> dict[str, np.ndarray]:
        torch = self._torch
        hosts = {}
        with torch.cuda.stream(stream):
            for name, tensor in outputs.items():
                staging = self._staging[group].get(f"out:{name}", tensor.numel(), torch.float32)
                staging.copy_(tensor.reshape(-1).float(), non_blocking=True)
                hosts[name] = (staging, tuple(tensor.shape))
        stream.synchronize()
        return {name: buf.numpy().reshape(shape).copy() for name, (buf, shape) in hosts.items()}

    def encode_frame(self, pixel_values: np.ndarray) -> FrameFeatures:
        """Vision plan on one frame; the features stay on the GPU."""
        stream = self._streams[PART_VISION]
        with self._locks[PART_VISION], self._torch.cuda.device(self.device):
            part = self._part(PART_VISION)
            feed = {"pixel_values": self._upload(PART_VISION, "pixel_values", pixel_values.astype(np.float32), stream)}
            with self._torch.cuda.stream(stream):
                out = part.run(feed, stream)
            stream.synchronize()  # the features must be complete before another stream reads them
        return FrameFeatures(visual=out["visual_embeds"], deepstack=out["deepstack_embeds"])

    def run_language(self, inputs: LanguageInputs, frames: Sequence[FrameFeatures]) -> HeadOutputs:
        """Language plan (or the preference plan) on one prompt; features are concatenated on the GPU."""
        torch = self._torch
        preference = inputs.pref_position is not None
        stream = self._streams["language"]
        with self._locks["language"], torch.cuda.device(self.device):
            part = self._part(PART_LANGUAGE_PREFERENCE if preference else PART_LANGUAGE)
            feed = {name: self._upload("language", name, value, stream) for name, value in inputs.as_feed().items()}
            with torch.cuda.stream(stream):
                feed["visual_embeds"] = torch.cat([f.visual for f in frames], dim=0)
                feed["deepstack_embeds"] = torch.cat([f.deepstack for f in frames], dim=1)
                out = part.run(feed, stream)
            host = self._download("language", out, stream)
        return HeadOutputs(
            progress_logits=host["progress_logits"],
            success_logits=host["success_logits"],
            preference_logit=host.get("preference_logit") if preference else None,
        )

    def close(self) -> None:
        """Free contexts, engines and buffers."""
        self._parts.clear()
        self._staging.clear()
