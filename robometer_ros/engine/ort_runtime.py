"""ONNX Runtime backend: TensorRT -> CUDA -> CPU execution providers, whichever really loads.

``onnxruntime-gpu`` lists TensorRT and CUDA in ``get_available_providers()`` even on a machine where
their libraries cannot load, then silently falls back to CPU at session creation. The only truth is
``session.get_providers()`` after the session exists, so that is what ``backend_name`` reports and
what is logged (with a warning when it is not the provider asked for first).

Does not import torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robometer_ros.engine.bundle import (
    PART_LANGUAGE,
    PART_LANGUAGE_PREFERENCE,
    PART_LANGUAGE_PREFIX,
    PART_LANGUAGE_SUFFIX,
    PART_VISION,
    Bundle,
)
from robometer_ros.engine.runtime import (
    FrameFeatures,
    HeadOutputs,
    LanguageInputs,
    LibraryMissingError,
    PrefixInputs,
    PrefixState,
    ProviderUnavailableError,
    Runtime,
    RuntimeUnavailableError,
    SuffixInputs,
)

LOG = logging.getLogger(__name__)

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
#: score_batch's suffix prompts per call on the CPU provider (benchmarks/bench_engine.py: larger batches lose there)
CPU_SUFFIX_BATCH = 4


def _trt_cache_dir(bundle: Bundle) -> str:
    """Where the TensorRT EP caches its engines: in the bundle if writable, else the user cache."""
    in_bundle = bundle.root / "engines" / "onnxruntime_trt_cache"
    try:
        in_bundle.mkdir(parents=True, exist_ok=True)
        if os.access(in_bundle, os.W_OK):
            return str(in_bundle)
    except OSError:
        pass
    fallback = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "robometer_ros" / "ort_trt"
    fallback = fallback / bundle.model_id.replace("/", "_")
    fallback.mkdir(parents=True, exist_ok=True)
    return str(fallback)


def trt_ep_profile_options(bundle: Bundle, part: str) -> dict[str, str]:
    """TensorRT EP optimization-profile options for a part's dynamic inputs, from the manifest's ranges.

    Without them the EP builds an engine for the first shapes it sees and rebuilds (seconds to minutes
    for a 4B model) whenever a later prompt is longer; with them one engine covers the whole range.
    """
    from robometer_ros.engine.tensorrt_build import axis_ranges

    ranges = axis_ranges(bundle, part)
    spec = bundle.part(part)
    shapes: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for tensor in spec.inputs:
        if not tensor.dynamic_axes:
            continue
        for which, index in (("min", 0), ("opt", 1), ("max", 2)):
            dims = [str(d) if isinstance(d, int) else str(ranges[d][index]) for d in tensor.shape]
            shapes[which].append(f"{tensor.name}:{'x'.join(dims)}")
    if not shapes["min"]:
        return {}
    return {f"trt_profile_{which}_shapes": ",".join(items) for which, items in shapes.items()}


class OnnxRuntimeRuntime(Runtime):
    """The bundle's ONNX parts in ONNX Runtime sessions.

    Opened at creation: vision and the part each step runs: language_prefix + language_suffix when the
    bundle has them and ``prefix_reuse`` is not False, else language. The others (language when prefix
    reuse is on, language_preference) are opened on first use: each language session holds the decoder
    weights once more.
    """

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        trt_fp16: bool = True,
        allow_spinning: bool = False,
        require_provider: str | None = None,
        prefix_reuse: bool | None = None,
        **_: Any,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise LibraryMissingError("onnxruntime is not installed (pip install onnxruntime)") from exc
        self._ort = ort
        self.bundle = bundle
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in PROVIDER_PREFERENCE if p in available]
        else:
            missing = [p for p in providers if p not in available]
            if missing:
                raise ProviderUnavailableError(
                    f"onnxruntime {ort.__version__} has no {', '.join(missing)} in this build (available: "
                    f"{', '.join(available)}; GPU providers need the onnxruntime-gpu package)"
                )
        self.requested_providers = list(providers)
        # With require_provider set, a session whose first provider is another one (onnxruntime-gpu lists
        # providers it then cannot load, and falls back) raises instead of running there.
        self._require_provider = require_provider
        self._provider_options: list[dict[str, Any]] = []
        for p in self.requested_providers:
            if p == "TensorrtExecutionProvider":
                self._provider_options.append({
                    "trt_fp16_enable": bool(trt_fp16),
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": _trt_cache_dir(bundle),
                })
            else:
                self._provider_options.append({})
        self._intra_op_threads = intra_op_threads
        # Two sessions (vision, language) alternate on the same cores; ORT's default busy-waiting thread
        # pool would keep spinning after one session's run and steal the cores from the other.
        self._allow_spinning = allow_spinning
        self._sessions: dict[str, Any] = {}
        self.providers_in_use: dict[str, list[str]] = {}
        if prefix_reuse and not bundle.has_prefix_parts:
            raise RuntimeUnavailableError(f"{bundle.root}: prefix_reuse=True but the bundle has no "
                                          f"{PART_LANGUAGE_PREFIX} / {PART_LANGUAGE_SUFFIX} parts (re-export it)")
        self.supports_prefix = bundle.has_prefix_parts and prefix_reuse is not False
        self._session(PART_VISION)
        step_parts = [PART_LANGUAGE_PREFIX, PART_LANGUAGE_SUFFIX] if self.supports_prefix else [PART_LANGUAGE]
        for part in step_parts:
            self._session(part)
        main = self.providers_in_use[step_parts[-1]][0]
        self.backend_name = f"onnxruntime:{main}"
        if main == "CPUExecutionProvider":
            self.preferred_suffix_batch = CPU_SUFFIX_BATCH

    def _session(self, part: str) -> Any:
        session = self._sessions.get(part)
        if session is not None:
            return session
        options = self._ort.SessionOptions()
        if self._intra_op_threads is not None:
            options.intra_op_num_threads = int(self._intra_op_threads)
        options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not self._allow_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = self.bundle.part_path(part)
        provider_options = [dict(o) for o in self._provider_options]
        for name, opts in zip(self.requested_providers, provider_options):
            if name == "TensorrtExecutionProvider":
                opts.update(trt_ep_profile_options(self.bundle, part))
        session = self._ort.InferenceSession(
            str(path), options, providers=self.requested_providers, provider_options=provider_options
        )
        actual = list(session.get_providers())
        self.providers_in_use[part] = actual
        if self._require_provider and actual[0] != self._require_provider:
            raise ProviderUnavailableError(
                f"onnxruntime {part} part: {self._require_provider} did not load, the session runs on "
                f"{', '.join(actual)} (onnxruntime's log above says why, e.g. a missing CUDA/cuDNN/TensorRT library)"
            )
        if self.requested_providers and actual[0] != self.requested_providers[0]:
            LOG.warning(
                "onnxruntime %s part: asked for %s but it runs on %s (the provider could not load)",
                part, self.requested_providers[0], actual[0],
            )
        else:
            LOG.info("onnxruntime %s part runs on %s", part, actual)
        self._sessions[part] = session
        return session

    def encode_frame(self, pixel_values: np.ndarray) -> FrameFeatures:
        """Vision part on one frame's patch rows."""
        session = self._session(PART_VISION)
        visual, deepstack = session.run(
            ["visual_embeds", "deepstack_embeds"],
            {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)},
        )
        return FrameFeatures(visual=visual, deepstack=deepstack)

    def run_language(self, inputs: LanguageInputs, frames: Sequence[FrameFeatures]) -> HeadOutputs:
        """Language part (or its preference variant) on one prompt."""
        preference = inputs.pref_position is not None
        session = self._session(PART_LANGUAGE_PREFERENCE if preference else PART_LANGUAGE)
        feed = inputs.as_feed()
        feed["visual_embeds"] = np.concatenate([f.visual for f in frames], axis=0)
        feed["deepstack_embeds"] = np.concatenate([f.deepstack for f in frames], axis=1)
        names = ["progress_logits", "success_logits"] + (["preference_logit"] if preference else [])
        out = session.run(names, feed)
        return HeadOutputs(
            progress_logits=np.asarray(out[0], dtype=np.float32),
            success_logits=np.asarray(out[1], dtype=np.float32),
            preference_logit=np.asarray(out[2], dtype=np.float32) if preference else None,
        )

    def run_prefix(self, inputs: PrefixInputs, first: FrameFeatures) -> PrefixState:
        """language_prefix on the shared prompt prefix (keys/values stay numpy: ORT's native host arrays)."""
        feed = inputs.as_feed()
        feed["visual_embeds"] = first.visual
        feed["deepstack_embeds"] = first.deepstack
        progress, success, keys, values = self._session(PART_LANGUAGE_PREFIX).run(
            ["progress_logits", "success_logits", "past_keys", "past_values"], feed)
        return PrefixState(past_keys=keys, past_values=values, progress_logits=np.asarray(progress, np.float32),
                           success_logits=np.asarray(success, np.float32))

    def run_suffix(
        self, inputs: SuffixInputs, prefix: PrefixState, frames: Sequence[Sequence[FrameFeatures]]
    ) -> HeadOutputs:
        """language_suffix for a batch of prompts sharing ``prefix``: features stacked on a batch axis."""
        feed = inputs.as_feed()
        feed["visual_embeds"] = np.stack([np.concatenate([f.visual for f in row], axis=0) for row in frames])
        feed["deepstack_embeds"] = np.stack([np.concatenate([f.deepstack for f in row], axis=1) for row in frames])
        feed["past_keys"] = prefix.past_keys
        feed["past_values"] = prefix.past_values
        progress, success = self._session(PART_LANGUAGE_SUFFIX).run(["progress_logits", "success_logits"], feed)
        return HeadOutputs(progress_logits=np.asarray(progress, np.float32),
                           success_logits=np.asarray(success, np.float32))

    def close(self) -> None:
        """Drop the sessions."""
        self._sessions.clear()
