"""RewardEngine: encode each frame once, cache its features by frame id, score any subsample of them.

Qwen3-VL's vision encoder encodes each image on its own, so a frame's visual and deepstack features
do not depend on the other frames or on the prompt: computing them once at ``add_frame`` and reusing
them at every later ``score`` is exact. A scoring step is then only the language part on the prompt
built for those frames (docs/ARCHITECTURE.md, "Model split" and "Contracts").

Prefix reuse (bundles with the ``language_prefix`` / ``language_suffix`` parts, on tensorrt with their
plans built, and the torch backend):
within an episode every step's prompt starts with the same chat text, instruction and first frame (the
subsampling always keeps frame 0). The engine runs that prefix once per (instruction, first frame id),
keeps its keys/values (``PrefixState``), and each step then runs only the suffix (the other frames,
their prog tokens, the end of the prompt) on top of them. The first frame's scores come from the prefix
part, where its prog token is the last position: causal attention makes both exact. A prefix entry is
dropped when its first frame is forgotten, evicted or replaced; at most ``max_cached_prefixes`` are
kept (least recently used first out); ``prefix_cache_nbytes`` is their memory. Dropping an entry is all
the release there is: its ``PrefixState`` (host or device keys/values) is freed with its last reference.

``score_batch`` scores many frame lists of one instruction (an offline replay of an episode's steps):
with the prefix parts the lists that share a first frame share its prefix and go through the suffix
part ``batch_size`` prompts per call (a batch axis: their token layouts are identical).

Thread safety: one producer thread (``add_frame``/``forget``) and one scorer thread (``score``/
``score_batch``/``preference``) may run at the same time. The caches are guarded by a lock held only for
dictionary work; the vision part and the language part each have their own lock, so encoding a new
frame and scoring the previous ones overlap.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robometer_ros.engine.bundle import Bundle
from robometer_ros.engine.runtime import (
    BackendAttempt,
    FrameFeatures,
    HeadOutputs,
    LanguageInputs,
    PrefixInputs,
    PrefixState,
    Runtime,
    RuntimeUnavailableError,
    SuffixInputs,
    check_finite,
    create_runtime,
)
from robometer_ros.model.progress import expected_progress_np, sigmoid_np
from robometer_ros.model.prompt import PromptBuilder, split_after_first_frame
from robometer_ros.preprocess import FramePreprocessor

LOG = logging.getLogger(__name__)


class ModelOutputError(RuntimeError):
    """The model produced NaN or inf; the scores of this call must not be used."""


class UnknownFrameError(LookupError):
    """``score`` or ``preference`` named frame ids that were never added or were forgotten."""

    def __str__(self) -> str:  # LookupError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Scores:
    """Per-frame outputs of one scoring call, in the order of the frame ids given.

    ``progress`` is the C51 expectation over the progress bins (in [0, 1]); ``success_probability``
    the sigmoid of the success logit; ``inference_time`` the seconds the call took (prompt + language
    part + decode; the vision part ran earlier, in ``add_frame``).
    """

    progress: np.ndarray
    success_probability: np.ndarray
    progress_logits: np.ndarray
    success_logits: np.ndarray
    inference_time: float
    frame_ids: tuple[Hashable, ...] = field(default=())


@dataclass
class _PrefixEntry:
    """A cached prefix: valid while ``first`` is still the cached features of its frame id."""

    first: FrameFeatures
    input_ids: np.ndarray
    state: PrefixState


@dataclass
class _SplitInputs:
    prefix: PrefixInputs
    suffix: SuffixInputs | None  # None for a one-frame prompt (the prefix is the whole prompt that matters)


#: suffix prompts per call when the bundle does not say (torch backend on a schema-1 bundle)
DEFAULT_SUFFIX_BATCH = 16


class RewardEngine:
    """Frame-caching Robometer scorer over a bundle (see the module docstring).

    Args:
        bundle: a ``Bundle`` or the path of one (opened with ``verify_checksums``).
        backend: "auto", "tensorrt", "onnxruntime" or "torch" (see ``runtime.create_runtime``).
        device: torch device for the torch backend.
        runtime: an already created ``Runtime`` (tests, benchmarks); ``backend`` is then ignored.
        max_cached_frames: optional bound on cached frames; the oldest added are evicted first.
        verify_checksums: hash every bundle file when opening it from a path (slow for 8 GB bundles).
        prefix_reuse: None = reuse the prompt prefix across steps when the runtime can (bundle parts
            present, or the torch backend); False = always the plain language part; True = require it.
        max_cached_prefixes: prefix keys/values kept (one per instruction and first frame).
        runtime_options: passed to the runtime (e.g. ``intra_op_threads``, ``providers``, ``precision``).
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        backend: str = "auto",
        device: str | None = None,
        runtime: Runtime | None = None,
        max_cached_frames: int | None = None,
        verify_checksums: bool = True,
        prefix_reuse: bool | None = None,
        max_cached_prefixes: int = 4,
        **runtime_options: Any,
    ) -> None:
        if not isinstance(bundle, Bundle):
            bundle = Bundle.open(bundle, verify_checksums=verify_checksums)
        self.bundle = bundle
        m = bundle.manifest
        if runtime is None:
            runtime = create_runtime(bundle, backend, device, prefix_reuse=prefix_reuse, **runtime_options)
        self.runtime = runtime
        supported = bool(getattr(runtime, "supports_prefix", False))
        if prefix_reuse and not supported:
            raise RuntimeUnavailableError(f"prefix_reuse=True but {runtime.backend_name} cannot run the prefix parts "
                                          "(a schema-1 bundle, or a runtime without them)")
        self._prefix_reuse = supported and prefix_reuse is not False
        if max_cached_prefixes < 1:
            raise ValueError(f"max_cached_prefixes must be at least 1, got {max_cached_prefixes}")
        self._max_prefixes = max_cached_prefixes
        self._prefixes: OrderedDict[tuple[str, Hashable], _PrefixEntry] = OrderedDict()
        self._splits: OrderedDict[tuple, _SplitInputs] = OrderedDict()
        f = m.frame
        self.preprocessor = FramePreprocessor(
            f.height, f.width, f.patch_size, f.merge_size, f.temporal_patch_size, f.image_mean, f.image_std
        )
        self.prompts = PromptBuilder.from_file(bundle.tokenizer_path, f.merge_size)
        self._grid = f.grid_thw
        if max_cached_frames is not None and max_cached_frames < 1:
            raise ValueError(f"max_cached_frames must be at least 1, got {max_cached_frames}")
        self._max_cached = max_cached_frames
        self._cache: OrderedDict[Hashable, FrameFeatures] = OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        self._vision_lock = threading.Lock()
        self._language_lock = threading.Lock()
        self._layouts: OrderedDict[tuple, LanguageInputs] = OrderedDict()
        self._instruction_room: tuple[int, int] | None = None  # (tokens left for the instruction, longest token)
        self._layout_lock = threading.Lock()
        LOG.info("RewardEngine %s on %s (frame %dx%d, %d frames, prefix reuse %s)", self.model_id,
                 self.backend_name, f.height, f.width, self.num_frames, "on" if self._prefix_reuse else "off")

    # ---- identity ------------------------------------------------------------------------------
    @property
    def backend_name(self) -> str:
        """Which backend really runs, e.g. "onnxruntime:CPUExecutionProvider", "tensorrt:fp16", "torch:cpu"."""
        return self.runtime.backend_name

    @property
    def backend_attempts(self) -> tuple[BackendAttempt, ...]:
        """How the backend was chosen: each candidate tried and why it did not run (``backend="auto"``)."""
        return tuple(getattr(self.runtime, "backend_attempts", ()))

    @property
    def model_id(self) -> str:
        """The bundle's model id."""
        return self.bundle.model_id

    @property
    def num_frames(self) -> int:
        """Frames per scored prompt the model was trained with (the subsample size)."""
        return self.bundle.manifest.num_frames

    @property
    def prefix_reuse(self) -> bool:
        """Whether steps run the suffix part on a cached prefix (else the plain language part)."""
        return self._prefix_reuse

    @property
    def default_batch_size(self) -> int:
        """score_batch's prompts per suffix call: what suits the runtime's device (4 on a CPU), at most the
        bundle's ``prefix.max_batch`` (the TensorRT profiles' limit; 16 when the bundle has none)."""
        limits = self.bundle.manifest.prefix
        limit = limits.max_batch if limits is not None else DEFAULT_SUFFIX_BATCH
        preferred = getattr(self.runtime, "preferred_suffix_batch", None)
        return min(limit, preferred) if preferred else limit

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) every frame is resized to before the vision part."""
        return (self.bundle.manifest.frame.height, self.bundle.manifest.frame.width)

    # ---- cache ---------------------------------------------------------------------------------
    def add_frame(self, frame_id: Hashable, image: np.ndarray) -> None:
        """Preprocess and encode one uint8 RGB frame [H, W, 3] (any size) and cache it under ``frame_id``.

        Adding an id that is already cached replaces its features.
        """
        try:
            hash(frame_id)
        except TypeError:
            raise TypeError(f"frame_id must be hashable, got {type(frame_id).__name__}") from None
        pixel_values = self.preprocessor(image)
        with self._vision_lock:
            features = self.runtime.encode_frame(pixel_values)
        with self._cache_lock:
            old = self._cache.pop(frame_id, None)
            if old is not None:
                self._cache_bytes -= old.nbytes
                self._drop_prefixes({frame_id})
            self._cache[frame_id] = features
            self._cache_bytes += features.nbytes
            if self._max_cached is not None:
                evicted_ids = set()
                while len(self._cache) > self._max_cached:
                    evicted_id, evicted = self._cache.popitem(last=False)
                    self._cache_bytes -= evicted.nbytes
                    evicted_ids.add(evicted_id)
                self._drop_prefixes(evicted_ids)

    def forget(self, frame_ids: Iterable[Hashable]) -> None:
        """Drop cached frames (ids that are not cached are ignored)."""
        with self._cache_lock:
            dropped = set()
            for frame_id in frame_ids:
                old = self._cache.pop(frame_id, None)
                if old is not None:
                    self._cache_bytes -= old.nbytes
                    dropped.add(frame_id)
            self._drop_prefixes(dropped)

    def clear(self) -> None:
        """Drop every cached frame and prefix (e.g. at a new episode)."""
        with self._cache_lock:
            self._cache.clear()
            self._cache_bytes = 0
            self._prefixes.clear()

    def _drop_prefixes(self, frame_ids: set) -> None:
        """Forget the prefixes whose first frame is one of ``frame_ids`` (caller holds the cache lock)."""
        if frame_ids and self._prefixes:
            for key in [key for key in self._prefixes if key[1] in frame_ids]:
                del self._prefixes[key]

    def __contains__(self, frame_id: Hashable) -> bool:
        with self._cache_lock:
            return frame_id in self._cache

    def __len__(self) -> int:
        with self._cache_lock:
            return len(self._cache)

    def cached_frame_ids(self) -> list[Hashable]:
        """Cached ids, oldest added first."""
        with self._cache_lock:
            return list(self._cache)

    @property
    def cache_nbytes(self) -> int:
        """Memory held by cached features (host or device)."""
        with self._cache_lock:
            return self._cache_bytes

    @property
    def prefix_cache_nbytes(self) -> int:
        """Memory held by cached prefix keys/values (host or device; 0 without prefix reuse)."""
        with self._cache_lock:
            return sum(entry.state.nbytes for entry in self._prefixes.values())

    def cached_prefixes(self) -> list[tuple[str, Hashable]]:
        """(instruction, first frame id) of the cached prefixes, least recently used first."""
        with self._cache_lock:
            return list(self._prefixes)

    def _features(self, frame_ids: Sequence[Hashable], what: str) -> list[FrameFeatures]:
        if isinstance(frame_ids, (str, bytes)) or not isinstance(frame_ids, Sequence):
            raise TypeError(f"{what} must be a sequence of frame ids, got {type(frame_ids).__name__}")
        if len(frame_ids) == 0:
            raise ValueError(f"{what} is empty: at least one frame is needed")
        limit = self.bundle.manifest.sequence.max_frames
        if len(frame_ids) > limit:
            raise ValueError(f"{what} has {len(frame_ids)} frames; this bundle scores at most {limit} per prompt "
                             "(subsample them, e.g. robometer_ros.episode.subsample_indices)")
        with self._cache_lock:
            missing = [fid for fid in frame_ids if fid not in self._cache]
            if missing:
                shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise UnknownFrameError(
                    f"{len(missing)} frame id(s) in {what} are not cached (never added or forgotten): {shown}"
                )
            return [self._cache[fid] for fid in frame_ids]

    # ---- scoring -------------------------------------------------------------------------------
    @staticmethod
    def _check_instruction(instruction: str) -> str:
        if not isinstance(instruction, str):
            raise TypeError(f"instruction must be a string, got {type(instruction).__name__}")
        if not instruction.strip():
            raise ValueError("instruction is empty: Robometer scores progress towards a task description")
        return instruction

    def check_instruction(self, instruction: str) -> None:
        """Raise ValueError when this bundle cannot score ``instruction``: empty, its progress prompt (for
        ``num_frames`` frames) longer than the bundle's maximum sequence length, or, when the engine reuses
        prefixes, its prefix (prompt + first frame) longer than the prefix parts' maximum. The limit is the
        bundle's tokenizer's: a text far too long is refused without tokenizing it (no token covers more
        characters than the longest one in the vocabulary), anything else is tokenized and measured (and the
        prompt is kept for the first step)."""
        self._check_instruction(instruction)
        limit = self.bundle.manifest.sequence.max_length
        prefix_limits = self.bundle.manifest.prefix if self._prefix_reuse else None
        grids = [self._grid] * self.num_frames
        if self._instruction_room is None:
            longest = max((len(token) for token in self.prompts.tokenizer.get_vocab()), default=1)
            room = limit - self.prompts.progress("", grids).seq_len
            if prefix_limits is not None:
                # A bundle exported for more frames than it scores (max_frames > num_frames) leaves the full
                # prompt more room than the prefix parts' profile: the tighter one decides.
                room = min(room, prefix_limits.max_length - self._prefix_length(""))
            self._instruction_room = (room, max(longest, 1))
        room, longest = self._instruction_room
        if len(instruction) > max(room, 0) * longest:
            raise ValueError(f"instruction of {len(instruction)} characters cannot fit this bundle's prompt "
                             f"(room for {room} tokens of at most {longest} characters)")
        self._inputs(("progress", instruction, self.num_frames), lambda: self.prompts.progress(instruction, grids),
                     limit)
        if prefix_limits is not None and self._prefix_length(instruction) > prefix_limits.max_length:
            raise ValueError(
                f"prompt prefix is {self._prefix_length(instruction)} tokens, above this bundle's prefix maximum "
                f"of {prefix_limits.max_length} (instruction too long: at most "
                f"~{self.bundle.manifest.sequence.max_instruction_tokens} tokens)")

    def _prefix_length(self, instruction: str) -> int:
        """Tokens of the prefix part (prompt + first frame) for ``instruction``."""
        return split_after_first_frame(self.prompts.progress(instruction, [self._grid])).prefix_length

    def _inputs(self, key: tuple, build: Any, max_length: int) -> LanguageInputs:
        with self._layout_lock:
            cached = self._layouts.get(key)
            if cached is not None:
                self._layouts.move_to_end(key)
                return cached
        layout = build()
        if layout.seq_len > max_length:
            raise ValueError(
                f"prompt is {layout.seq_len} tokens, above this bundle's maximum of {max_length} "
                f"(instruction too long: at most ~{self.bundle.manifest.sequence.max_instruction_tokens} tokens)"
            )
        inputs = LanguageInputs(
            input_ids=layout.input_ids,
            position_ids=layout.position_ids,
            visual_index=layout.visual_index,
            visual_mask=layout.visual_mask,
            prog_positions=layout.prog_positions,
            pref_position=layout.pref_position,
        )
        with self._layout_lock:
            self._layouts[key] = inputs
            if len(self._layouts) > 32:
                self._layouts.popitem(last=False)
        return inputs

    def _run(self, inputs: LanguageInputs, features: list[FrameFeatures]) -> HeadOutputs:
        with self._language_lock:
            outputs = self.runtime.run_language(inputs, features)
        bad = check_finite(outputs)
        if bad:
            raise ModelOutputError(f"{self.backend_name} returned non-finite values in {', '.join(bad)}")
        return outputs

    def score(self, instruction: str, frame_ids: Sequence[Hashable]) -> Scores:
        """Per-frame progress and success for the cached frames ``frame_ids`` (oldest first) and the task.

        Raises ``UnknownFrameError`` for ids not cached, ``ValueError`` for an empty instruction or too
        many frames, ``ModelOutputError`` when the model returns NaN/inf.
        """
        start = time.perf_counter()
        self._check_instruction(instruction)
        features = self._features(frame_ids, "frame_ids")
        if self._prefix_reuse:
            progress_logits, success_logits = self._run_with_prefix(instruction, [tuple(frame_ids)], [features])[0]
        else:
            outputs = self._run(self._progress_inputs(instruction, len(features)), features)
            progress_logits, success_logits = outputs.progress_logits, outputs.success_logits
        return self._scores(progress_logits, success_logits, time.perf_counter() - start, frame_ids)

    def score_batch(
        self, instruction: str, frame_id_lists: Sequence[Sequence[Hashable]], batch_size: int | None = None
    ) -> list[Scores]:
        """``score`` for many frame lists of one instruction (e.g. every step of an episode), in order.

        All lists must have the same length (one token layout). With prefix reuse, lists that share their
        first frame share its prefix and run through the suffix part ``batch_size`` at a time (default:
        ``default_batch_size``); without it, one plain language call per list.
        The results equal ``score`` on each list; each ``Scores.inference_time`` is the call's time divided
        by the number of lists.
        """
        start = time.perf_counter()
        self._check_instruction(instruction)
        if isinstance(frame_id_lists, (str, bytes)) or not isinstance(frame_id_lists, Sequence):
            raise TypeError(f"frame_id_lists must be a sequence of frame-id sequences, got "
                            f"{type(frame_id_lists).__name__}")
        if len(frame_id_lists) == 0:
            return []
        lengths = {len(ids) if isinstance(ids, Sequence) else -1 for ids in frame_id_lists}
        if len(lengths) != 1:
            raise ValueError(f"score_batch needs frame lists of one length (one token layout), got lengths "
                             f"{sorted(lengths)}")
        features = [self._features(ids, f"frame_id_lists[{i}]") for i, ids in enumerate(frame_id_lists)]
        if self._prefix_reuse:
            batch_size = self.default_batch_size if batch_size is None else batch_size
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            logits = self._run_with_prefix(instruction, [tuple(ids) for ids in frame_id_lists], features, batch_size)
        else:
            inputs = self._progress_inputs(instruction, len(features[0]))
            logits = []
            for frames in features:
                outputs = self._run(inputs, frames)
                logits.append((outputs.progress_logits, outputs.success_logits))
        share = (time.perf_counter() - start) / len(frame_id_lists)
        return [self._scores(p, s, share, ids) for (p, s), ids in zip(logits, frame_id_lists)]

    @staticmethod
    def _scores(progress_logits: np.ndarray, success_logits: np.ndarray, seconds: float,
                frame_ids: Sequence[Hashable]) -> Scores:
        return Scores(
            progress=expected_progress_np(progress_logits),
            success_probability=sigmoid_np(success_logits),
            progress_logits=progress_logits,
            success_logits=success_logits,
            inference_time=seconds,
            frame_ids=tuple(frame_ids),
        )

    def _progress_inputs(self, instruction: str, count: int) -> LanguageInputs:
        grids = [self._grid] * count
        return self._inputs(("progress", instruction, count), lambda: self.prompts.progress(instruction, grids),
                            self.bundle.manifest.sequence.max_length)

    def _split_inputs(self, instruction: str, count: int) -> _SplitInputs:
        """The progress layout for ``count`` frames, cut after the first frame (cached like ``_inputs``)."""
        key = ("split", instruction, count)
        with self._layout_lock:
            cached = self._splits.get(key)
            if cached is not None:
                self._splits.move_to_end(key)
                return cached
        self._progress_inputs(instruction, count)  # the plain path's length check (and its error message)
        split = split_after_first_frame(self.prompts.progress(instruction, [self._grid] * count))
        prefix = PrefixInputs(split.prefix_input_ids, split.prefix_position_ids, split.prefix_visual_index,
                              split.prefix_visual_mask)
        suffix = None
        if count > 1:
            suffix = SuffixInputs(split.suffix_input_ids, split.suffix_position_ids, split.suffix_visual_index,
                                  split.suffix_visual_mask, split.suffix_prog_positions)
        inputs = _SplitInputs(prefix, suffix)
        with self._layout_lock:
            self._splits[key] = inputs
            if len(self._splits) > 32:
                self._splits.popitem(last=False)
        return inputs

    def _prefix(self, instruction: str, first_id: Hashable, first: FrameFeatures, inputs: PrefixInputs) -> PrefixState:
        """The cached prefix of (instruction, first frame), computed now if missing or stale."""
        key = (instruction, first_id)
        with self._cache_lock:
            entry = self._prefixes.get(key)
            if entry is not None and entry.first is first and np.array_equal(entry.input_ids, inputs.input_ids):
                self._prefixes.move_to_end(key)
                return entry.state
        with self._language_lock:
            state = self.runtime.run_prefix(inputs, first)
        bad = check_finite(HeadOutputs(state.progress_logits, state.success_logits))
        if bad:
            raise ModelOutputError(f"{self.backend_name} returned non-finite values in {', '.join(bad)}")
        with self._cache_lock:
            # keep it only while its first frame is still these features (not forgotten or replaced meanwhile)
            if self._cache.get(first_id) is first:
                self._prefixes[key] = _PrefixEntry(first, inputs.input_ids, state)
                self._prefixes.move_to_end(key)
                while len(self._prefixes) > self._max_prefixes:
                    self._prefixes.popitem(last=False)
        return state

    def _run_with_prefix(
        self, instruction: str, id_lists: Sequence[tuple[Hashable, ...]], features: Sequence[list[FrameFeatures]],
        batch_size: int = 1,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(progress_logits [F, bins], success_logits [F]) per list, through the cached prefix + suffix part."""
        count = len(features[0])
        inputs = self._split_inputs(instruction, count)
        results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(id_lists)
        groups: OrderedDict[Hashable, list[int]] = OrderedDict()
        for i, ids in enumerate(id_lists):
            groups.setdefault(ids[0], []).append(i)
        for first_id, members in groups.items():
            first = features[members[0]][0]
            state = self._prefix(instruction, first_id, first, inputs.prefix)
            if inputs.suffix is None:
                for i in members:
                    results[i] = (state.progress_logits, state.success_logits)
                continue
            for begin in range(0, len(members), batch_size):
                chunk = members[begin:begin + batch_size]
                with self._language_lock:
                    out = self.runtime.run_suffix(inputs.suffix, state, [features[i][1:] for i in chunk])
                bad = check_finite(out)
                if bad:
                    raise ModelOutputError(f"{self.backend_name} returned non-finite values in {', '.join(bad)}")
                for row, i in enumerate(chunk):
                    results[i] = (np.concatenate([state.progress_logits, out.progress_logits[row]], axis=0),
                                  np.concatenate([state.success_logits, out.success_logits[row]], axis=0))
        return results  # type: ignore[return-value]

    def preference(self, instruction: str, frame_ids_a: Sequence[Hashable], frame_ids_b: Sequence[Hashable]) -> float:
        """P(trajectory A makes more progress on the task than trajectory B) = sigmoid(preference logit)."""
        self._check_instruction(instruction)
        features = self._features(frame_ids_a, "frame_ids_a") + self._features(frame_ids_b, "frame_ids_b")
        na, nb = len(frame_ids_a), len(frame_ids_b)
        inputs = self._inputs(("preference", instruction, na, nb),
                              lambda: self.prompts.preference(instruction, [self._grid] * na, [self._grid] * nb),
                              self.bundle.manifest.sequence.preference_max_length)
        outputs = self._run(inputs, features)
        assert outputs.preference_logit is not None  # the preference part always returns it
        return float(sigmoid_np(outputs.preference_logit)[0])

    def warmup(self, instruction: str = "warm up") -> float:
        """Run both parts once on a black frame (first calls build kernels / allocate); returns seconds.

        Leaves the cache as it was. Call it before the first real step, e.g. when a node activates.
        """
        start = time.perf_counter()
        self._check_instruction(instruction)
        pixel_values = self.preprocessor(np.zeros((*self.frame_size, 3), dtype=np.uint8))
        with self._vision_lock:
            features = self.runtime.encode_frame(pixel_values)
        n = self.num_frames
        if self._prefix_reuse:
            split = self._split_inputs(instruction, n)
            with self._language_lock:
                state = self.runtime.run_prefix(split.prefix, features)
                if split.suffix is not None:
                    self.runtime.run_suffix(split.suffix, state, [[features] * (n - 1)])
        else:
            self._run(self._progress_inputs(instruction, n), [features] * n)
        return time.perf_counter() - start

    def close(self) -> None:
        """Drop the cache and release the runtime."""
        self.clear()
        self.runtime.close()
