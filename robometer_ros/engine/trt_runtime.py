"""TensorRT backend without torch: the bundle's cached plans on cuda-python memory, streams and copies.

A robot needs TensorRT (``tensorrt``, or ``tensorrt_rtx``), NVIDIA's ``cuda-python`` (``cuda-bindings``),
numpy, tokenizers and onnx (bundle validation); torch is never imported here. Device memory, pinned host
buffers, streams and copies go through ``engine/cuda_rt.py``.

How a part runs (``TensorRTRuntime.run_part``, generic over the plan's named tensors, so any part the
bundle's engine index holds can run):

* inputs are bound by name: a host numpy array is cast to the plan's dtype (int64 stays int64: TensorRT
  keeps ONNX INT64 bindings), staged in a reusable pinned buffer and copied to a reusable device buffer
  on the part's stream; a ``DeviceArray`` is bound in place; a ``DeviceConcat`` (e.g. the cached features
  of the prompt's frames) is concatenated on the device by one copy per source (``cuda_rt.concat_plan``),
  a ``DeviceStack`` (a suffix batch: one such concatenation per prompt) likewise (``cuda_rt.stack_plan``);
* ``set_input_shape`` for every input (inside the plan's optimization profile), ``infer_shapes``, then
  output shapes from the context (a data-dependent output is refused: the export has none);
* outputs named in ``keep_on_device`` go to one fresh 256-byte-aligned block and come back as
  ``DeviceArray`` (frame features stay on the GPU and are cached by the RewardEngine, which adds up
  their ``nbytes``); the others are copied to pinned buffers and returned as numpy;
* ``execute_async_v3`` on the part's non-blocking stream, then one stream synchronize per call.

Which language plans run: with a schema-2 bundle whose ``language_prefix`` and ``language_suffix`` plans
are built, each step runs the suffix plan on the episode's prefix keys/values (``run_prefix`` once per
instruction and first frame, ``run_suffix`` per step or per batch of steps), and the plain ``language``
plan is loaded only if something asks for it (``prefix_reuse=False`` engines sharing the runtime). The
prefix's keys/values are kept on the device (``PrefixState.past_keys``/``past_values`` are
``DeviceArray`` views of one block) and bound in place at every suffix call; the block is owned by the
state and goes back to the allocator when the RewardEngine drops the last reference to it. Without
either prefix plan the runtime runs the plain ``language`` plan (logged); with only one of them it
refuses to start (``NoEngineError`` naming the missing one) rather than silently running the slower path.

Threads: the vision part and the language parts have one stream, one lock and their own staging buffers
each, so the producer thread (``encode_frame``) and the scorer thread (``run_language``) overlap; an
execution context is only ever used by its part's group. ``cudaSetDevice`` is called in every call's
thread.

TensorRT Python API used (TensorRT 10.x and 11.x, and TensorRT-RTX 1.x, which has the same runtime
surface; ``TRT_CALLS`` lists them and a test checks them against the installed TensorRT-RTX):
``Logger``, ``Runtime``, ``Runtime.deserialize_cuda_engine`` (returns None on failure),
``ICudaEngine.num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode`` (``TensorIOMode.INPUT``) /
``get_tensor_dtype`` (``DataType``) / ``get_tensor_location`` (``TensorLocation.DEVICE``) /
``create_execution_context``, ``IExecutionContext.set_input_shape`` (bool) / ``infer_shapes`` (names of
unspecified inputs) / ``get_tensor_shape`` / ``set_tensor_address`` (bool; 256-byte aligned) /
``execute_async_v3(stream_handle)`` (bool). None of them changed between 10.x and 11.x (the 11.0
removals are build-side and the v1 device-memory queries, which are not used).

Plans come from ``robometer-build-engines`` (engine/tensorrt_build.py), keyed by TensorRT flavor and
version, GPU name, compute capability and precision; a plan whose ONNX changed since it was built is
not used (``find_usable_engines``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from robometer_ros.engine.bundle import (
    PART_LANGUAGE,
    PART_LANGUAGE_PREFERENCE,
    PART_LANGUAGE_PREFIX,
    PART_LANGUAGE_SUFFIX,
    PART_VISION,
    PREFIX_PART_NAMES,
    Bundle,
    BundleError,
    EngineRecord,
)
from robometer_ros.engine.cuda_rt import (
    ITEMSIZE,
    CudaApi,
    DeviceAllocator,
    DeviceArray,
    DeviceConcat,
    DeviceStack,
    PinnedBuffer,
    align_up,
    bfloat16_bits_to_float32,
    concat_plan,
    float32_to_bfloat16_bits,
    stack_plan,
)
from robometer_ros.engine.runtime import (
    FrameFeatures,
    HeadOutputs,
    LanguageInputs,
    NoDeviceError,
    NoEngineError,
    PrefixInputs,
    PrefixState,
    Runtime,
    RuntimeStartError,
    SuffixInputs,
)
from robometer_ros.engine.trt_common import CPU_AOT_GPU, gpu_identity, import_tensorrt

LOG = logging.getLogger(__name__)

#: precision preference when the caller does not ask for one
PRECISION_ORDER = ("fp8", "int8", "fp16", "bf16", "fp32")

#: the TensorRT runtime API this module calls, by class (tested against the installed TensorRT-RTX)
TRT_CALLS = {
    "Runtime": ("deserialize_cuda_engine",),
    "ICudaEngine": ("num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype",
                    "get_tensor_location", "create_execution_context"),
    "IExecutionContext": ("set_input_shape", "infer_shapes", "get_tensor_shape", "set_tensor_address",
                          "execute_async_v3"),
}

#: numpy dtypes of the manifest dtype names (bfloat16 is carried as uint16 bit patterns on the host)
_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
          "int8": np.int8, "uint8": np.uint8, "bool": np.bool_, "bfloat16": np.uint16}

_VISION_GROUP, _LANGUAGE_GROUP = "vision", "language"


def find_usable_engines(
    bundle: Bundle, precision: str | None = None, device_index: int = 0
) -> dict[str, EngineRecord] | None:
    """Current plans on this GPU and TensorRT at one precision (every part that has one), or None.

    A precision qualifies with a vision plan and a plan a step can start from: ``language`` or a prefix-reuse
    part (whether the prefix pair is complete is the runtime's check, so that a half-built pair is an error
    that names the missing plan instead of "no plan"). Raises ``LibraryMissingError`` when TensorRT is not
    importable and ``NoDeviceError`` when no GPU is visible. With ``precision`` None the fastest qualifying
    precision wins (fp8 > int8 > fp16 > bf16 > fp32).
    """
    trt, flavor = import_tensorrt()
    version = trt.__version__
    if not any(r.key.runtime == flavor and r.key.runtime_version == version for r in bundle.engines()):
        return None  # nothing to match: no need to query the GPU
    gpu = gpu_identity(device_index)
    if gpu is None:
        raise NoDeviceError("no CUDA GPU visible (the CUDA driver and nvidia-smi found none)")
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
        ok, why = _is_current(bundle, record)
        if not ok:
            LOG.warning("ignoring stale TensorRT plan %s: %s", record.file, why)
            continue
        candidates.setdefault(key.precision, {})[record.part] = record
    for p in PRECISION_ORDER:
        plans = candidates.get(p, {})
        if PART_VISION in plans and any(part in plans for part in (PART_LANGUAGE, *PREFIX_PART_NAMES)):
            return plans
    return None


def _is_current(bundle: Bundle, record: EngineRecord) -> tuple[bool, str]:
    try:
        return bundle.engine_is_current(record)
    except BundleError as exc:  # a plan of a part this manifest does not describe
        return False, str(exc)


def _dtype_names(trt: Any) -> dict[Any, str]:
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
             "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
    return {getattr(trt.DataType, k): v for k, v in names.items() if hasattr(trt.DataType, k)}


def host_to_plan_dtype(array: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """``array`` as the C-contiguous host representation of plan dtype ``dtype`` (bfloat16: uint16 bits)."""
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(np.asarray(array, dtype=np.float32))
    target = np.dtype(_NUMPY[dtype])
    if array.dtype.kind in "iu" and target.kind in "iu" and array.size and target.itemsize < array.dtype.itemsize:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise ValueError(f"{what}: values out of range for the plan's {dtype} binding")
    return np.ascontiguousarray(array, dtype=target)


def host_from_plan_dtype(raw: np.ndarray, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """An owned numpy array from a plan output's raw bytes (bfloat16 becomes float32)."""
    if dtype == "bfloat16":
        return bfloat16_bits_to_float32(raw.view(np.uint16)).reshape(shape).copy()
    return raw.view(_NUMPY[dtype]).reshape(shape).copy()


class _Group:
    """One stream, one lock and reusable staging buffers for the parts that share them."""

    def __init__(self, cuda: CudaApi, allocator: DeviceAllocator) -> None:
        self.cuda, self.allocator = cuda, allocator
        self.lock = threading.Lock()
        self.stream = cuda.stream_create()
        self._pinned: dict[str, PinnedBuffer] = {}
        self._device: dict[str, Any] = {}  # name -> DeviceBlock

    def pinned(self, name: str, nbytes: int) -> np.ndarray:
        buf = self._pinned.get(name)
        if buf is None:
            buf = self._pinned[name] = PinnedBuffer(self.cuda)
        return buf.view(nbytes)

    def device(self, name: str, shape: Sequence[int], dtype: str) -> DeviceArray:
        """A reusable device tensor for ``name`` (grown on demand; valid until the group's next call)."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        block = self._device.get(name)
        if block is None or block.nbytes < nbytes:
            block = self._device[name] = self.allocator.alloc(nbytes)
        return DeviceArray(block, 0, shape, dtype)

    def close(self) -> None:
        try:
            self.cuda.stream_sync(self.stream)
        finally:
            for buf in self._pinned.values():
                buf.free()
            self._pinned.clear()
            self._device.clear()
            self.cuda.stream_destroy(self.stream)


class _Part:
    """One deserialized plan: its execution context and its named I/O tensors."""

    def __init__(self, trt: Any, trt_runtime: Any, plan: bytes, name: str, file: str) -> None:
        self.name = name
        engine = trt_runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise RuntimeStartError(
                f"TensorRT could not deserialize the {name} plan {file} (built by another TensorRT version or "
                "for another GPU, or no usable CUDA device; the TensorRT log above says why)"
            )
        context = engine.create_execution_context()
        if context is None:
            raise RuntimeStartError(f"TensorRT could not create an execution context for the {name} plan "
                                    "(out of GPU memory?)")
        self.engine, self.context = engine, context
        dtypes = _dtype_names(trt)
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.dtypes: dict[str, str] = {}
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            dtype = engine.get_tensor_dtype(tensor)
            if dtype not in dtypes:
                raise RuntimeStartError(f"{name} plan: I/O tensor {tensor} has dtype {dtype}, which this runtime "
                                        f"does not bind ({', '.join(sorted(set(dtypes.values())))})")
            if engine.get_tensor_location(tensor) != trt.TensorLocation.DEVICE:
                raise RuntimeStartError(f"{name} plan: {tensor} is a host (shape) tensor; the export has none")
            self.dtypes[tensor] = dtypes[dtype]
            (self.inputs if engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT else self.outputs).append(tensor)

    def close(self) -> None:
        self.context = None  # the context goes before its engine
        self.engine = None


class TensorRTRuntime(Runtime):
    """Runs the bundle's TensorRT plans on one GPU (see the module docstring).

    Args:
        bundle: the opened bundle (its ``engines/index.json`` must hold current plans for this GPU).
        precision: a plan precision to insist on ("fp16", "fp32", ...); None = the fastest available.
        device_index: the CUDA device.
        cuda: a ``CudaApi`` (tests inject one around a fake cuda-python module); default: the real one.
        prefix_reuse: None = run the prefix-reuse plans when both are built, else the plain language plan;
            True = require them; False = the plain language plan only (the prefix plans are not loaded).
    """

    def __init__(self, bundle: Bundle, precision: str | None = None, device_index: int = 0,
                 cuda: CudaApi | None = None, prefix_reuse: bool | None = None, **_: Any) -> None:
        plans = find_usable_engines(bundle, precision, device_index)
        if plans is None:
            raise NoEngineError(
                f"{bundle.root}: no current TensorRT plan for this GPU/TensorRT"
                + (f" at precision {precision}" if precision else "")
                + "; run robometer-build-engines on this machine"
            )
        step_parts = self._step_parts(bundle, plans, prefix_reuse)
        self.bundle = bundle
        self.cuda = cuda if cuda is not None else CudaApi()
        self.device = self.cuda.require_device(device_index)  # NoDeviceError / CudaError before any allocation
        trt, flavor = import_tensorrt()
        self._trt = trt
        self.precision = plans[PART_VISION].key.precision
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._plans = dict(plans)
        if prefix_reuse is False:  # never load them, so they cannot hold the decoder weights once more
            for part in PREFIX_PART_NAMES:
                self._plans.pop(part, None)
        # Other parts with the same key (preference, the plain language part) load on first use.
        anchor = plans[step_parts[0]].key
        for record in bundle.engines():
            if record.part not in self._plans and record.key == anchor and _is_current(bundle, record)[0] \
                    and (prefix_reuse is not False or record.part not in PREFIX_PART_NAMES):
                self._plans[record.part] = record
        self.supports_prefix = step_parts == PREFIX_PART_NAMES
        #: the suffix plan's batch profile (the bundle's prefix.max_batch); run_suffix splits larger batches
        self.max_suffix_batch = bundle.manifest.prefix.max_batch if self.supports_prefix else 0
        self.preferred_suffix_batch = self.max_suffix_batch or None
        self._parts: dict[str, _Part] = {}
        self._allocator = DeviceAllocator(self.cuda, device_index)
        self._groups: dict[str, _Group] = {}
        try:
            self._groups = {g: _Group(self.cuda, self._allocator) for g in (_VISION_GROUP, _LANGUAGE_GROUP)}
            self._part(PART_VISION)
            for part in step_parts:
                self._part(part)
        except BaseException:
            self.close()
            raise
        self.backend_name = f"{flavor}:{self.precision}"
        LOG.info("TensorRT (%s %s) on %s (compute capability %s): steps run %s; plans %s", flavor,
                 trt.__version__, self.device.name, self.device.compute_capability,
                 " + ".join(step_parts) + (" (prefix reuse)" if self.supports_prefix else ""),
                 {p: r.file for p, r in self._plans.items()})

    @staticmethod
    def _step_parts(bundle: Bundle, plans: Mapping[str, EngineRecord], prefix_reuse: bool | None) -> tuple[str, ...]:
        """The plans each progress step runs: the prefix pair, or the plain language plan (see the class doc)."""
        have = [part for part in PREFIX_PART_NAMES if part in plans]
        missing = [part for part in PREFIX_PART_NAMES if part not in plans]
        precision = plans[PART_VISION].key.precision
        rebuild = f"run robometer-build-engines on this machine (precision {precision})"
        if prefix_reuse is not False:
            if not missing:
                return PREFIX_PART_NAMES
            if have:
                raise NoEngineError(
                    f"{bundle.root}: a current TensorRT plan for {have[0]} but none for {missing[0]}: {rebuild} "
                    f"(--parts {missing[0]}), or pass prefix_reuse=False to run the plain language plan")
            if prefix_reuse:
                raise NoEngineError(
                    f"{bundle.root}: prefix_reuse=True but no current TensorRT plans for "
                    f"{' / '.join(PREFIX_PART_NAMES)}"
                    + (f": {rebuild}" if bundle.has_prefix_parts else " (a schema-1 bundle: re-export it)"))
        if PART_LANGUAGE not in plans:
            raise NoEngineError(f"{bundle.root}: no current TensorRT plan for the plain {PART_LANGUAGE} part "
                                f"(prefix_reuse=False): {rebuild}")
        if bundle.has_prefix_parts and prefix_reuse is None:
            LOG.warning("%s: the bundle has the prefix-reuse parts but no TensorRT plans for them: every step runs "
                        "the plain %s plan (%s to build them)", bundle.root, PART_LANGUAGE, rebuild)
        return (PART_LANGUAGE,)

    #: tensors one plan produces and another takes: (producer part, consumer part, tensor names)
    _LINKS = (
        *((PART_VISION, part, ("visual_embeds", "deepstack_embeds"))
          for part in (PART_LANGUAGE, PART_LANGUAGE_PREFERENCE, *PREFIX_PART_NAMES)),
        (PART_LANGUAGE_PREFIX, PART_LANGUAGE_SUFFIX, ("past_keys", "past_values")),
    )

    def _check_links(self, loaded: _Part) -> None:
        """A device tensor one plan outputs must have the dtype the next plan binds (same precision builds)."""
        for producer, consumer, names in self._LINKS:
            if loaded.name not in (producer, consumer):
                continue
            a, b = self._parts.get(producer), self._parts.get(consumer)
            if a is None or b is None:
                continue
            for name in names:
                if name in a.dtypes and name in b.dtypes and a.dtypes[name] != b.dtypes[name]:
                    raise RuntimeStartError(
                        f"the {producer} plan outputs {name} as {a.dtypes[name]} but the {consumer} plan takes "
                        f"{b.dtypes[name]}: build both parts at the same precision"
                    )

    @property
    def parts(self) -> list[str]:
        """The parts this runtime has plans for (loaded or not)."""
        return sorted(self._plans)

    def _part(self, part: str) -> _Part:
        loaded = self._parts.get(part)
        if loaded is None:
            record = self._plans.get(part)
            if record is None:
                raise NoEngineError(f"{self.bundle.root}: no TensorRT plan for part {part!r} matching the loaded "
                                    f"ones (have {', '.join(self.parts)})")
            plan = (self.bundle.root / record.file).read_bytes()
            loaded = _Part(self._trt, self._runtime, plan, part, record.file)
            self._parts[part] = loaded
            try:
                self._check_links(loaded)
            except RuntimeStartError:
                del self._parts[part]
                loaded.close()
                raise
        return loaded

    # ---- generic execution ---------------------------------------------------------------------
    def run_part(
        self,
        part: str,
        feed: Mapping[str, np.ndarray | DeviceArray | DeviceConcat | DeviceStack],
        keep_on_device: Collection[str] = (),
    ) -> dict[str, np.ndarray | DeviceArray]:
        """Run one plan by its tensor names; outputs in ``keep_on_device`` stay on the GPU (fresh memory).

        ``feed`` maps every input name to a host array, a ``DeviceArray``, a ``DeviceConcat`` or a
        ``DeviceStack``. Kept outputs share one fresh block, each at a 256-byte aligned offset. Blocks
        until the outputs are complete. Raises ``ValueError`` for a missing input, a dtype mismatch or a
        shape outside the plan's profile, ``RuntimeError`` when TensorRT refuses to enqueue.
        """
        group = self._groups[_VISION_GROUP if part == PART_VISION else _LANGUAGE_GROUP]
        with group.lock:
            self.cuda.set_device(self.device.index)
            return self._execute(self._part(part), group, feed, set(keep_on_device))

    def _execute(self, part: _Part, group: _Group, feed: Mapping[str, Any], keep: set[str]) -> dict[str, Any]:
        unknown = set(keep) - set(part.outputs)
        if unknown:
            raise ValueError(f"{part.name} plan has no outputs {sorted(unknown)} (outputs: {part.outputs})")
        context, stream = part.context, group.stream
        bound: list[DeviceArray] = []  # referenced until the stream is synchronised
        for name in part.inputs:
            if name not in feed:
                raise ValueError(f"{part.name} plan needs input {name!r}; got {sorted(feed)}")
            array = self._bind_input(part, group, name, feed[name])
            if not context.set_input_shape(name, array.shape):
                raise ValueError(f"TensorRT {part.name} plan rejects input {name} of shape {array.shape} "
                                 "(outside the optimization profile built into the plan)")
            if not context.set_tensor_address(name, array.ptr):
                raise RuntimeError(f"TensorRT refused the address of {part.name} input {name}")
            bound.append(array)
        missing = context.infer_shapes()
        if missing:
            raise ValueError(f"TensorRT {part.name} plan: input shapes not specified for {list(missing)}")
        shapes = {name: tuple(int(d) for d in context.get_tensor_shape(name)) for name in part.outputs}
        for name, shape in shapes.items():
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{part.name} output {name} has a data-dependent shape {shape}; "
                                   "the export must not produce one")
        outputs: dict[str, DeviceArray] = {}
        kept = [n for n in part.outputs if n in keep]
        if kept:  # one aligned block for all kept outputs (e.g. one frame's visual + deepstack features)
            offsets, total = {}, 0
            for name in kept:
                offsets[name] = total
                total = align_up(total + int(np.prod(shapes[name], dtype=np.int64)) * ITEMSIZE[part.dtypes[name]])
            block = self._allocator.alloc(total)
            for name in kept:
                outputs[name] = DeviceArray(block, offsets[name], shapes[name], part.dtypes[name])
        for name in part.outputs:
            if name not in outputs:
                outputs[name] = group.device(f"out:{part.name}:{name}", shapes[name], part.dtypes[name])
            if not context.set_tensor_address(name, outputs[name].ptr):
                raise RuntimeError(f"TensorRT refused the address of {part.name} output {name}")
        if not context.execute_async_v3(int(stream)):
            raise RuntimeError(f"TensorRT {part.name} plan failed to enqueue (see the TensorRT log)")
        staged = {}
        for name in part.outputs:
            if name in keep:
                continue
            array = outputs[name]
            host = group.pinned(f"out:{name}", array.nbytes)
            self.cuda.copy_async(host.ctypes.data, array.ptr, array.nbytes, self.cuda.D2H, stream)
            staged[name] = host
        self.cuda.stream_sync(stream)
        del bound
        result: dict[str, Any] = {name: outputs[name] for name in kept}
        for name, host in staged.items():
            result[name] = host_from_plan_dtype(host, part.dtypes[name], shapes[name])
        return result

    def _bind_input(self, part: _Part, group: _Group, name: str, value: Any) -> DeviceArray:
        want = part.dtypes[name]
        if isinstance(value, DeviceArray):
            self._check_device_dtype(part, name, value)
            return value
        if isinstance(value, (DeviceConcat, DeviceStack)):
            sources = value.arrays
            for array in sources:
                self._check_device_dtype(part, name, array)
            if isinstance(value, DeviceConcat):
                if len(sources) == 1:
                    return sources[0]
                shape, copies = concat_plan([a.shape for a in sources], value.axis, ITEMSIZE[want])
            else:
                if len(sources) == 1:  # one prompt of one frame: the cached tensor itself, seen as a batch of 1
                    only = sources[0]
                    return DeviceArray(only.block, only.offset, (1, *only.shape), only.dtype)
                shape, copies = stack_plan([[a.shape for a in row.arrays] for row in value.rows],
                                           value.rows[0].axis, ITEMSIZE[want])
            dst = group.device(f"in:{part.name}:{name}", shape, want)
            for c in copies:
                src = sources[c.source].ptr
                if c.height == 1:
                    self.cuda.copy_async(dst.ptr + c.dst_offset, src, c.width, self.cuda.D2D, group.stream)
                else:
                    self.cuda.copy_2d_async(dst.ptr + c.dst_offset, c.dpitch, src, c.spitch, c.width, c.height,
                                            self.cuda.D2D, group.stream)
            return dst
        host = host_to_plan_dtype(np.asarray(value), want, f"{part.name} input {name}")
        staging = group.pinned(f"in:{name}", host.nbytes)
        staging[:] = host.reshape(-1).view(np.uint8)
        dst = group.device(f"in:{part.name}:{name}", host.shape, want)
        self.cuda.copy_async(dst.ptr, staging.ctypes.data, host.nbytes, self.cuda.H2D, group.stream)
        return dst

    @staticmethod
    def _check_device_dtype(part: _Part, name: str, array: DeviceArray) -> None:
        if array.dtype != part.dtypes[name]:
            raise ValueError(f"{part.name} plan takes {name} as {part.dtypes[name]}, got a {array.dtype} device "
                             "tensor (build every part at the same precision)")

    # ---- the Runtime interface -----------------------------------------------------------------
    def encode_frame(self, pixel_values: np.ndarray) -> FrameFeatures:
        """Vision plan on one frame; the features stay on the GPU (``DeviceArray``)."""
        out = self.run_part(PART_VISION, {"pixel_values": np.asarray(pixel_values, dtype=np.float32)},
                            keep_on_device=("visual_embeds", "deepstack_embeds"))
        return FrameFeatures(visual=out["visual_embeds"], deepstack=out["deepstack_embeds"])

    def run_language(self, inputs: LanguageInputs, frames: Sequence[FrameFeatures]) -> HeadOutputs:
        """Language plan (or the preference plan) on one prompt; features are concatenated on the GPU."""
        preference = inputs.pref_position is not None
        feed: dict[str, Any] = dict(inputs.as_feed())
        feed["visual_embeds"] = DeviceConcat(tuple(f.visual for f in frames), axis=0)
        feed["deepstack_embeds"] = DeviceConcat(tuple(f.deepstack for f in frames), axis=1)
        out = self.run_part(PART_LANGUAGE_PREFERENCE if preference else PART_LANGUAGE, feed)
        return HeadOutputs(
            progress_logits=np.asarray(out["progress_logits"], dtype=np.float32),
            success_logits=np.asarray(out["success_logits"], dtype=np.float32),
            preference_logit=np.asarray(out["preference_logit"], dtype=np.float32) if preference else None,
        )

    def run_prefix(self, inputs: PrefixInputs, first: FrameFeatures) -> PrefixState:
        """language_prefix plan on the shared prompt prefix; its keys/values stay on the GPU.

        ``past_keys`` / ``past_values`` are ``DeviceArray`` views of one fresh block owned by the returned
        state (256-byte aligned offsets); the block goes back to the allocator when the state is dropped.
        """
        self._require_prefix()
        feed: dict[str, Any] = dict(inputs.as_feed())
        feed["visual_embeds"] = first.visual
        feed["deepstack_embeds"] = first.deepstack
        out = self.run_part(PART_LANGUAGE_PREFIX, feed, keep_on_device=("past_keys", "past_values"))
        return PrefixState(past_keys=out["past_keys"], past_values=out["past_values"],
                           progress_logits=np.asarray(out["progress_logits"], dtype=np.float32),
                           success_logits=np.asarray(out["success_logits"], dtype=np.float32))

    def run_suffix(
        self, inputs: SuffixInputs, prefix: PrefixState, frames: Sequence[Sequence[FrameFeatures]]
    ) -> HeadOutputs:
        """language_suffix plan for B prompts on ``prefix``'s device keys/values (bound in place, no copy).

        Each prompt's frames are concatenated and the prompts stacked on the GPU; more than
        ``max_suffix_batch`` prompts (the plan's batch profile) run in several calls.
        """
        self._require_prefix()
        if not isinstance(prefix.past_keys, DeviceArray) or not isinstance(prefix.past_values, DeviceArray):
            raise TypeError(f"a PrefixState from another runtime (past_keys is {type(prefix.past_keys).__name__}); "
                            "run_prefix on this TensorRT runtime")
        if not frames:
            raise ValueError("run_suffix needs at least one prompt")
        progress, success = [], []
        for begin in range(0, len(frames), self.max_suffix_batch):
            chunk = frames[begin:begin + self.max_suffix_batch]
            feed: dict[str, Any] = dict(inputs.as_feed())
            feed["visual_embeds"] = DeviceStack(tuple(DeviceConcat(tuple(f.visual for f in row), 0) for row in chunk))
            feed["deepstack_embeds"] = DeviceStack(
                tuple(DeviceConcat(tuple(f.deepstack for f in row), 1) for row in chunk))
            feed["past_keys"] = prefix.past_keys
            feed["past_values"] = prefix.past_values
            out = self.run_part(PART_LANGUAGE_SUFFIX, feed)
            progress.append(np.asarray(out["progress_logits"], dtype=np.float32))
            success.append(np.asarray(out["success_logits"], dtype=np.float32))
        return HeadOutputs(progress_logits=np.concatenate(progress, axis=0),
                           success_logits=np.concatenate(success, axis=0))

    def _require_prefix(self) -> None:
        if not self.supports_prefix:
            raise NotImplementedError(f"this TensorRT runtime runs the plain {PART_LANGUAGE} plan (no prefix-reuse "
                                      "plans loaded; see the start-up log)")

    def close(self) -> None:
        """Synchronise, then free contexts, engines, staging buffers and streams.

        Frame features and prefix keys/values still referenced elsewhere are freed when they are garbage
        collected.
        """
        for part in self._parts.values():
            part.close()
        self._parts.clear()
        for group in self._groups.values():
            try:
                group.close()
            except Exception as exc:  # keep closing the rest
                LOG.warning("closing a TensorRT stream failed: %s", exc)
        self._groups = {}
        self._allocator.close()
