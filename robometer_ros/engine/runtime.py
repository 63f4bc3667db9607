"""One interface over the three ways to run the two model parts: torch, onnxruntime, tensorrt.

A runtime runs the *vision part* (one frame's patch rows -> that frame's visual and deepstack
features) and the *language part* (prompt + the features of the prompt's frames -> per-frame heads),
exactly as described under "Model split" in docs/ARCHITECTURE.md. Host-side work (preprocessing,
tokenizing, the prompt layout, M-RoPE ids) is the RewardEngine's job, not the runtime's.

Frame features stay in the runtime's native memory (numpy for onnxruntime, torch tensors on the
runtime's device for torch, ``cuda_rt.DeviceArray`` device memory for tensorrt), so a frame encoded on
the GPU is never copied back to the host just to be concatenated and copied up again at the next step.

``backend="auto"`` tries, in order (``AUTO_CHAIN``): tensorrt (a current plan for this GPU), onnxruntime
with the TensorRT execution provider, with the CUDA execution provider, onnxruntime on the CPU, and torch
(bundles with a checkpoint/). Each step that cannot run, including one that fails while starting, is
logged with its reason and recorded in ``Runtime.backend_attempts``; the runtime that starts reports
what really runs in ``backend_name`` (for onnxruntime: ``session.get_providers()``, read back).

This module imports neither torch nor onnxruntime nor tensorrt; each runtime imports its own
library when it is created.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from robometer_ros.engine.bundle import Bundle, BundleError

LOG = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")


class RuntimeUnavailableError(RuntimeError):
    """The requested backend cannot run here (library missing, no GPU, no engine/checkpoint in the bundle)."""


class LibraryMissingError(RuntimeUnavailableError):
    """A Python package the backend needs is not importable (the message names what to install)."""


class NoDeviceError(RuntimeUnavailableError):
    """No usable GPU: no CUDA driver, a driver too old for the bindings, or no device."""


class NoEngineError(RuntimeUnavailableError):
    """The bundle has no current TensorRT plan for this GPU, TensorRT version and precision."""


class ProviderUnavailableError(RuntimeUnavailableError):
    """An onnxruntime execution provider is not in this build, or could not load (the session fell back)."""


class RuntimeStartError(RuntimeUnavailableError):
    """The backend is installed and has what it needs, but failed while starting (CUDA error, bad plan, ...)."""


@dataclass
class FrameFeatures:
    """The vision part's output for one frame, in the runtime's native array type (numpy, torch, DeviceArray).

    ``visual``: [tokens_per_frame, hidden]; ``deepstack``: [num_deepstack, tokens_per_frame, hidden].
    """

    visual: Any
    deepstack: Any

    @property
    def nbytes(self) -> int:
        """Memory held by this frame's features (numpy, torch or ``cuda_rt.DeviceArray``: host or device)."""
        return int(_nbytes(self.visual) + _nbytes(self.deepstack))


def _nbytes(array: Any) -> int:
    if hasattr(array, "nbytes"):
        return int(array.nbytes)
    return int(array.numel() * array.element_size())


@dataclass
class LanguageInputs:
    """Host-side (numpy) inputs of the language part for one prompt; see model/prompt.py.

    ``pref_position`` is None for a progress prompt and set for a preference prompt.
    """

    input_ids: np.ndarray  # [1, L] int64
    position_ids: np.ndarray  # [3, 1, L] int64
    visual_index: np.ndarray  # [1, L] int64
    visual_mask: np.ndarray  # [1, L] bool
    prog_positions: np.ndarray  # [F] int64
    pref_position: np.ndarray | None = None  # [1] int64

    def as_feed(self) -> dict[str, np.ndarray]:
        """The ONNX input dict (without the visual features)."""
        feed = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "visual_index": self.visual_index,
            "visual_mask": self.visual_mask,
            "prog_positions": self.prog_positions,
        }
        if self.pref_position is not None:
            feed["pref_position"] = self.pref_position
        return feed


@dataclass
class PrefixInputs:
    """Host-side (numpy) inputs of ``language_prefix``: the first P positions of a progress layout
    (chat text, instruction, first frame, its prog token); see ``model.prompt.split_after_first_frame``."""

    input_ids: np.ndarray  # [1, P] int64
    position_ids: np.ndarray  # [3, 1, P] int64
    visual_index: np.ndarray  # [1, P] int64
    visual_mask: np.ndarray  # [1, P] bool

    def as_feed(self) -> dict[str, np.ndarray]:
        """The ONNX input dict (without the first frame's features)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "visual_index": self.visual_index,
                "visual_mask": self.visual_mask}


@dataclass
class SuffixInputs:
    """Host-side (numpy) inputs of ``language_suffix``, shared by every prompt of a batch."""

    input_ids: np.ndarray  # [1, S] int64
    position_ids: np.ndarray  # [3, 1, S] int64, continuing the prefix's
    visual_index: np.ndarray  # [1, S] int64, rows of the suffix frames' features
    visual_mask: np.ndarray  # [1, S] bool
    prog_positions: np.ndarray  # [F-1] int64, within the suffix

    def as_feed(self) -> dict[str, np.ndarray]:
        """The ONNX input dict (without the frames' features and the prefix keys/values)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "visual_index": self.visual_index,
                "visual_mask": self.visual_mask, "prog_positions": self.prog_positions}


@dataclass
class PrefixState:
    """``language_prefix``'s result, kept by the engine while the episode's first frame is cached.

    ``past_keys`` / ``past_values``: [layers, 1, kv_heads, P, head_dim] in the runtime's native array type
    (numpy for onnxruntime; torch tensors on the model's device for torch; ``cuda_rt.DeviceArray`` views of
    one device block for tensorrt), so they never leave the device between steps. ``progress_logits``
    [1, bins] / ``success_logits`` [1]: the first frame's heads (host numpy), the same at every step.

    The state owns that memory and there is no release call: it is freed (tensorrt: back to the runtime's
    allocator) when the last reference goes, i.e. when the engine has dropped its entry and no score that
    picked it up is still running, so a ``forget`` on another thread never frees it under a running step.
    """

    past_keys: Any
    past_values: Any
    progress_logits: np.ndarray
    success_logits: np.ndarray

    @property
    def nbytes(self) -> int:
        """Memory held by the keys/values."""
        return int(_nbytes(self.past_keys) + _nbytes(self.past_values))


@dataclass
class HeadOutputs:
    """Raw head outputs as float32 numpy: ``progress_logits`` [F, bins], ``success_logits`` [F],
    ``preference_logit`` [1] (preference prompts only)."""

    progress_logits: np.ndarray
    success_logits: np.ndarray
    preference_logit: np.ndarray | None = None


@dataclass(frozen=True)
class BackendAttempt:
    """One step of backend selection: the candidate and why it did not run ("" for the one that runs)."""

    candidate: str  # e.g. "tensorrt", "onnxruntime:CUDAExecutionProvider"
    reason: str = ""
    error: str = ""  # the exception class, e.g. "NoEngineError"

    @property
    def chosen(self) -> bool:
        """Whether this candidate is the runtime that started."""
        return not self.error

    def describe(self) -> str:
        """``candidate: Error: reason`` (or ``candidate: chosen``)."""
        return f"{self.candidate}: chosen" if self.chosen else f"{self.candidate}: {self.error}: {self.reason}"


class Runtime(ABC):
    """Runs the bundle's vision and language parts on one backend."""

    #: e.g. "torch:cpu", "onnxruntime:CUDAExecutionProvider", "tensorrt:fp16"
    backend_name: str = ""
    #: how this runtime was chosen: every candidate tried, in order, the last one chosen
    backend_attempts: tuple[BackendAttempt, ...] = ()

    @abstractmethod
    def encode_frame(self, pixel_values: np.ndarray) -> FrameFeatures:
        """Vision part on one frame: ``pixel_values`` [patches_per_frame, patch_dim] float32."""

    @abstractmethod
    def run_language(self, inputs: LanguageInputs, frames: Sequence[FrameFeatures]) -> HeadOutputs:
        """Language part + heads on one prompt whose frames are ``frames`` (in prompt order).

        Uses the preference variant when ``inputs.pref_position`` is set.
        """

    #: whether run_prefix / run_suffix work (the bundle has the prefix parts and this runtime runs them)
    supports_prefix: bool = False
    #: prompts per run_suffix call that suit this device (None: as many as the bundle's profiles allow). On a
    #: CPU a large batch's attention tensors outgrow the caches and lose to a few prompts per call; tensorrt
    #: says its suffix plan's batch profile (the manifest's prefix.max_batch).
    preferred_suffix_batch: int | None = None

    def run_prefix(self, inputs: PrefixInputs, first: FrameFeatures) -> PrefixState:
        """``language_prefix`` on the shared prompt prefix whose only frame is ``first``."""
        raise NotImplementedError(f"{type(self).__name__} does not run the prefix-reuse parts")

    def run_suffix(
        self, inputs: SuffixInputs, prefix: PrefixState, frames: Sequence[Sequence[FrameFeatures]]
    ) -> HeadOutputs:
        """``language_suffix`` for B prompts (``frames[b]``: prompt b's frames after the first, in order) that
        share ``prefix`` and the token layout ``inputs``. Returns ``progress_logits`` [B, F-1, bins] and
        ``success_logits`` [B, F-1]."""
        raise NotImplementedError(f"{type(self).__name__} does not run the prefix-reuse parts")

    def close(self) -> None:  # noqa: B027 - optional hook, most runtimes free on garbage collection
        """Release sessions, engines and device memory."""


def module_available(name: str) -> bool:
    """Whether ``import name`` would find a module, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


#: the order ``backend="auto"`` tries (onnxruntime candidates name the execution provider they require)
AUTO_CHAIN = (
    "tensorrt",
    "onnxruntime:TensorrtExecutionProvider",
    "onnxruntime:CUDAExecutionProvider",
    "onnxruntime:CPUExecutionProvider",
    "torch",
)

#: onnxruntime providers requested for each auto candidate (the first one must really run)
_ORT_CANDIDATE_PROVIDERS = {
    "TensorrtExecutionProvider": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "CUDAExecutionProvider": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "CPUExecutionProvider": ["CPUExecutionProvider"],
}


def _start(candidate: str, bundle: Bundle, device: str | None, options: dict[str, Any]) -> Runtime:
    """Start one backend candidate (an ``AUTO_CHAIN`` entry or a plain backend name)."""
    if candidate == "tensorrt":
        from robometer_ros.engine.trt_runtime import TensorRTRuntime

        return TensorRTRuntime(bundle, **options)
    if candidate.startswith("onnxruntime"):
        from robometer_ros.engine.ort_runtime import OnnxRuntimeRuntime

        _, _, provider = candidate.partition(":")
        if provider:
            try:
                import onnxruntime
            except ImportError as exc:
                raise LibraryMissingError("onnxruntime is not installed (pip install onnxruntime)") from exc
            # the required provider first; of its fallbacks (for nodes it cannot run), those in this build
            available = onnxruntime.get_available_providers()
            first, *rest = _ORT_CANDIDATE_PROVIDERS[provider]
            providers = [first] + [p for p in rest if p in available]
            options = {**options, "providers": providers, "require_provider": provider}
        return OnnxRuntimeRuntime(bundle, **options)
    if candidate == "torch":
        if bundle.checkpoint_path is None:
            raise BundleError(
                f"{bundle.root}: the torch backend needs a checkpoint/ in the bundle "
                "(export with robometer-export --include-checkpoint)"
            )
        if not module_available("torch"):
            raise LibraryMissingError("torch is not installed")
        from robometer_ros.engine.torch_runtime import TorchRuntime

        return TorchRuntime.from_bundle(bundle, device=device or "cpu", **options)
    raise ValueError(f"unknown backend candidate {candidate!r}")


def _expected_absence(exc: BaseException) -> bool:
    """A missing library, GPU, plan or provider is normal on many machines; anything else is worth a warning."""
    return isinstance(exc, (LibraryMissingError, NoDeviceError, NoEngineError, ProviderUnavailableError))


def create_runtime_auto(
    bundle: Bundle, device: str | None = None, chain: Sequence[str] = AUTO_CHAIN, **options: Any
) -> Runtime:
    """The first candidate of ``chain`` that starts; every failure is logged with its reason.

    A candidate fails when its library, GPU, plan or provider is missing (logged at INFO) or when it
    raises anything while starting (logged at WARNING: e.g. a TensorRT plan that does not deserialize,
    a CUDA error, an onnxruntime provider that is listed but cannot load). The returned runtime's
    ``backend_attempts`` holds every step. Raises ``RuntimeUnavailableError`` listing all reasons when
    none starts. A ``providers`` option is ignored here (each onnxruntime candidate sets its own).
    """
    options = {k: v for k, v in options.items() if k not in ("providers", "require_provider")}
    attempts: list[BackendAttempt] = []
    for candidate in chain:
        try:
            runtime = _start(candidate, bundle, device, options)
        except Exception as exc:  # any start failure falls through to the next candidate
            attempt = BackendAttempt(candidate, str(exc), type(exc).__name__)
            attempts.append(attempt)
            LOG.log(logging.INFO if _expected_absence(exc) else logging.WARNING,
                    "backend auto: %s cannot run: %s: %s", candidate, attempt.error, attempt.reason)
            continue
        attempts.append(BackendAttempt(candidate))
        runtime.backend_attempts = tuple(attempts)
        LOG.info("backend auto -> %s (%s)", runtime.backend_name, "; ".join(a.describe() for a in attempts))
        return runtime
    raise RuntimeUnavailableError("no backend can run this bundle: " + "; ".join(a.describe() for a in attempts))


def create_runtime(bundle: Bundle, backend: str = "auto", device: str | None = None, **options: Any) -> Runtime:
    """Create the runtime for ``backend`` ("auto", "tensorrt", "onnxruntime", "torch").

    ``auto``: see ``create_runtime_auto`` (tensorrt, onnxruntime TensorRT EP, CUDA EP, CPU, torch).
    ``device`` is for the torch backend ("cpu", "cuda", "cuda:1"); ``options`` go to the runtime
    (e.g. ``intra_op_threads``, ``providers``, ``precision``; each runtime ignores the others').
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return create_runtime_auto(bundle, device, **options)
    runtime = _start(backend, bundle, device, options)
    runtime.backend_attempts = (BackendAttempt(backend),)
    return runtime


def check_finite(outputs: HeadOutputs) -> list[str]:
    """Names of the outputs that hold NaN or inf (empty when all are finite)."""
    bad = []
    for name in ("progress_logits", "success_logits", "preference_logit"):
        value = getattr(outputs, name)
        if value is not None and not np.all(np.isfinite(value)):
            bad.append(name)
    return bad
