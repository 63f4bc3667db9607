"""``robometer-export CHECKPOINT OUT_BUNDLE``: a Robometer checkpoint -> a bundle of ONNX parts.

Three ONNX parts (docs/ARCHITECTURE.md "Model split"), all opset 18, TorchScript exporter:

* ``onnx/vision.onnx``: one frame of the bundle's fixed size -> visual tokens + deepstack features.
  Fixed shapes (the grid-dependent rotary ids and position-embedding resampling are constants), and
  one attention segment per frame, so no ``cu_seqlens`` split (``.tolist()``) is traced.
* ``onnx/language.onnx``: prompt ids + host M-RoPE ids + the frames' cached features -> per-frame
  progress logits and success logits. Dynamic axes: ``seq`` (prompt length), ``visual_tokens``,
  ``frames``. Visual positions are gathered by index and merged with ``where``: no NonZero, no
  boolean index_put, no data-dependent Python.
* ``onnx/language_preference.onnx``: the same plus ``pref_position`` -> ``preference_logit``.
* ``onnx/language_prefix.onnx`` + ``onnx/language_suffix.onnx`` (prefix reuse, when the bundle serves
  2+ frames): ``language`` cut after the first frame's ``<|prog_token|>``. The prefix part (chat text,
  instruction, first frame) returns every layer's keys/values and the first frame's heads; the suffix
  part runs the other frames on top of those keys/values, for a batch of prompts that share them
  (dynamic axes ``prefix``, ``suffix``, ``suffix_visual_tokens``, ``suffix_frames``, ``batch``). The
  causal mask over past + suffix is built from the two lengths (Range + compare), nothing data-dependent.

Parity is checked inside the export: ONNX Runtime (CPU) against PyTorch on random inputs (random
pixels; a random-token prompt with a frame count and length different from the tracing example, to
exercise the dynamic axes) and on a real prompt built with the bundle's tokenizer; the max |diff| of
every output is printed and the export fails (exit 1, bundle not written) when any output exceeds
``atol + rtol * max|reference|`` (fp32: 1e-4 + 1e-3 * max|ref|; fp16 weights: 5e-2 + 2e-2 * max|ref|).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robometer_ros.engine.bundle import (
    PART_LANGUAGE,
    PART_LANGUAGE_PREFERENCE,
    PART_LANGUAGE_PREFIX,
    PART_LANGUAGE_SUFFIX,
    PART_VISION,
    SCHEMA_VERSION,
    Bundle,
    FrameSpec,
    Manifest,
    PartSpec,
    PrefixLimits,
    SequenceLimits,
    TensorSpec,
    onnx_external_files,
    write_manifest,
)

LOG = logging.getLogger("robometer_ros.export")

OPSET = 18
#: protobuf's hard limit is 2 GiB; leave headroom for the graph itself
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
DEFAULT_MAX_INSTRUCTION_TOKENS = 128
#: prompts per language_suffix call the TensorRT profiles cover (offline scoring batches an episode's steps)
DEFAULT_MAX_BATCH = 16
# 240-pixel short side of the released model's training videos, rounded up to 32, for a 4:3 camera.
DEFAULT_FRAME_SIZE = (256, 320)
#: (atol, rtol) of the exporter's parity check
TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (5e-2, 2e-2)}
#: instruction of the "real prompt" parity check (and the opt length of the sequence profile)
PARITY_INSTRUCTION = "pick up the red block and put it in the bowl"


class ExportError(RuntimeError):
    """The export cannot be completed (bad arguments, parity failure, unexportable model)."""


# ----------------------------------------------------------------------------------------------
# Part wrappers (torch imported lazily so that importing this module stays cheap)


def _wrappers() -> tuple[type, ...]:
    import torch
    from torch import nn

    class VisionPart(nn.Module):
        """pixel_values [N, 1536] float32 -> visual_embeds [N/4, H], deepstack_embeds [k, N/4, H] (float32)."""

        def __init__(self, model: Any, grid_thw: tuple[int, int, int]) -> None:
            super().__init__()
            self.model = model
            self.grid_thw = grid_thw

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            visual, deepstack = self.model.encode_frame(pixel_values, self.grid_thw)
            return visual.float(), deepstack.float()

    class LanguagePart(nn.Module):
        """Language model + progress/success heads at the prog tokens (float32 I/O, any weight dtype)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, visual_embeds, deepstack_embeds, visual_index, visual_mask,
                    prog_positions):
            out = self.model.forward_language(
                input_ids, position_ids, visual_embeds, deepstack_embeds, visual_index, visual_mask, prog_positions
            )
            return out["progress_logits"].float(), out["success_logits"].float()

    class LanguagePreferencePart(nn.Module):
        """LanguagePart plus the preference head at the pref token."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, visual_embeds, deepstack_embeds, visual_index, visual_mask,
                    prog_positions, pref_position):
            out = self.model.forward_language(
                input_ids, position_ids, visual_embeds, deepstack_embeds, visual_index, visual_mask,
                prog_positions, pref_position,
            )
            return out["progress_logits"].float(), out["success_logits"].float(), out["preference_logit"].float()

    class LanguagePrefixPart(nn.Module):
        """The shared prompt prefix -> first frame's heads + every layer's keys/values (float32 I/O)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, visual_embeds, deepstack_embeds, visual_index, visual_mask):
            out = self.model.forward_prefix(input_ids, position_ids, visual_embeds, deepstack_embeds, visual_index,
                                            visual_mask)
            return tuple(out[name].float() for name in PREFIX_OUTPUTS)

    class LanguageSuffixPart(nn.Module):
        """The rest of the prompt on a prefix's keys/values, batched over prompts of one layout."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, visual_embeds, deepstack_embeds, visual_index, visual_mask,
                    prog_positions, past_keys, past_values):
            out = self.model.forward_suffix(input_ids, position_ids, visual_embeds, deepstack_embeds, visual_index,
                                            visual_mask, prog_positions, past_keys, past_values)
            return out["progress_logits"].float(), out["success_logits"].float()

    return VisionPart, LanguagePart, LanguagePreferencePart, LanguagePrefixPart, LanguageSuffixPart


VISION_INPUTS = ("pixel_values",)
VISION_OUTPUTS = ("visual_embeds", "deepstack_embeds")
LANGUAGE_INPUTS = (
    "input_ids", "position_ids", "visual_embeds", "deepstack_embeds", "visual_index", "visual_mask", "prog_positions",
)
LANGUAGE_OUTPUTS = ("progress_logits", "success_logits")
LANGUAGE_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "input_ids": {1: "seq"},
    "position_ids": {2: "seq"},
    "visual_embeds": {0: "visual_tokens"},
    "deepstack_embeds": {1: "visual_tokens"},
    "visual_index": {1: "seq"},
    "visual_mask": {1: "seq"},
    "prog_positions": {0: "frames"},
    "progress_logits": {0: "frames"},
    "success_logits": {0: "frames"},
}


PREFIX_INPUTS = ("input_ids", "position_ids", "visual_embeds", "deepstack_embeds", "visual_index", "visual_mask")
PREFIX_OUTPUTS = ("progress_logits", "success_logits", "past_keys", "past_values")
PREFIX_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "input_ids": {1: "prefix"},
    "position_ids": {2: "prefix"},
    "visual_index": {1: "prefix"},
    "visual_mask": {1: "prefix"},
    "past_keys": {3: "prefix"},
    "past_values": {3: "prefix"},
}
SUFFIX_INPUTS = (*LANGUAGE_INPUTS, "past_keys", "past_values")
SUFFIX_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "input_ids": {1: "suffix"},
    "position_ids": {2: "suffix"},
    "visual_embeds": {0: "batch", 1: "suffix_visual_tokens"},
    "deepstack_embeds": {0: "batch", 2: "suffix_visual_tokens"},
    "visual_index": {1: "suffix"},
    "visual_mask": {1: "suffix"},
    "prog_positions": {0: "suffix_frames"},
    "past_keys": {3: "prefix"},
    "past_values": {3: "prefix"},
    "progress_logits": {0: "batch", 1: "suffix_frames"},
    "success_logits": {0: "batch", 1: "suffix_frames"},
}


def kv_shape(model_config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the language model: the fixed axes of past_keys/past_values."""
    text = model_config.backbone["text_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return int(text["num_hidden_layers"]), int(text.get("num_key_value_heads") or text["num_attention_heads"]), \
        int(head_dim)


def prefix_specs(hidden: int, num_deepstack: int, bins: int, tokens_per_frame: int,
                 kv: tuple[int, int, int]) -> tuple[list[TensorSpec], ...]:
    """Manifest I/O of language_prefix (one frame: fixed visual shapes; ``prefix`` tokens)."""
    layers, kv_heads, head_dim = kv
    past = (layers, 1, kv_heads, "prefix", head_dim)
    inputs = [
        TensorSpec("input_ids", (1, "prefix"), "int64"),
        TensorSpec("position_ids", (3, 1, "prefix"), "int64"),
        TensorSpec("visual_embeds", (tokens_per_frame, hidden), "float32"),
        TensorSpec("deepstack_embeds", (num_deepstack, tokens_per_frame, hidden), "float32"),
        TensorSpec("visual_index", (1, "prefix"), "int64"),
        TensorSpec("visual_mask", (1, "prefix"), "bool"),
    ]
    outputs = [
        TensorSpec("progress_logits", (1, bins), "float32"),
        TensorSpec("success_logits", (1,), "float32"),
        TensorSpec("past_keys", past, "float32"),
        TensorSpec("past_values", past, "float32"),
    ]
    return inputs, outputs


def suffix_specs(hidden: int, num_deepstack: int, bins: int, kv: tuple[int, int, int]) -> tuple[list[TensorSpec], ...]:
    """Manifest I/O of language_suffix (``batch`` prompts sharing one layout and one prefix)."""
    layers, kv_heads, head_dim = kv
    past = (layers, 1, kv_heads, "prefix", head_dim)
    inputs = [
        TensorSpec("input_ids", (1, "suffix"), "int64"),
        TensorSpec("position_ids", (3, 1, "suffix"), "int64"),
        TensorSpec("visual_embeds", ("batch", "suffix_visual_tokens", hidden), "float32"),
        TensorSpec("deepstack_embeds", ("batch", num_deepstack, "suffix_visual_tokens", hidden), "float32"),
        TensorSpec("visual_index", (1, "suffix"), "int64"),
        TensorSpec("visual_mask", (1, "suffix"), "bool"),
        TensorSpec("prog_positions", ("suffix_frames",), "int64"),
        TensorSpec("past_keys", past, "float32"),
        TensorSpec("past_values", past, "float32"),
    ]
    outputs = [
        TensorSpec("progress_logits", ("batch", "suffix_frames", bins), "float32"),
        TensorSpec("success_logits", ("batch", "suffix_frames"), "float32"),
    ]
    return inputs, outputs


def language_specs(hidden: int, num_deepstack: int, bins: int, preference: bool) -> tuple[list[TensorSpec], ...]:
    """Manifest I/O of a language part (the same names and axes the exporter declares)."""
    inputs = [
        TensorSpec("input_ids", (1, "seq"), "int64"),
        TensorSpec("position_ids", (3, 1, "seq"), "int64"),
        TensorSpec("visual_embeds", ("visual_tokens", hidden), "float32"),
        TensorSpec("deepstack_embeds", (num_deepstack, "visual_tokens", hidden), "float32"),
        TensorSpec("visual_index", (1, "seq"), "int64"),
        TensorSpec("visual_mask", (1, "seq"), "bool"),
        TensorSpec("prog_positions", ("frames",), "int64"),
    ]
    outputs = [
        TensorSpec("progress_logits", ("frames", bins), "float32"),
        TensorSpec("success_logits", ("frames",), "float32"),
    ]
    if preference:
        inputs.append(TensorSpec("pref_position", (1,), "int64"))
        outputs.append(TensorSpec("preference_logit", (1,), "float32"))
    return inputs, outputs


def vision_specs(frame: FrameSpec, hidden: int, num_deepstack: int) -> tuple[list[TensorSpec], ...]:
    """Manifest I/O of the vision part for the fixed frame size."""
    n, t = frame.patches_per_frame, frame.tokens_per_frame
    return (
        [TensorSpec("pixel_values", (n, frame.patch_dim), "float32")],
        [
            TensorSpec("visual_embeds", (t, hidden), "float32"),
            TensorSpec("deepstack_embeds", (num_deepstack, t, hidden), "float32"),
        ],
    )


# ----------------------------------------------------------------------------------------------
# Export helpers


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Export-time settings: expected warnings silenced, SDPA's native GQA off.

    transformers calls ``scaled_dot_product_attention(..., enable_gqa=True)`` for grouped-query
    attention without a mask; the TorchScript ONNX exporter cannot convert that, so during export the
    key/value heads are repeated first (``repeat_kv``), which is numerically the same.
    """
    from transformers.integrations import sdpa_attention

    original_gqa = sdpa_attention.use_gqa_in_sdpa
    sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: False
    try:
        with _silenced():
            yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = original_gqa


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*TracerWarning.*")
        try:
            from torch.jit import TracerWarning

            warnings.simplefilter("ignore", category=TracerWarning)
        except ImportError:  # pragma: no cover - older torch
            pass
        yield


def _export_part(module: Any, args: tuple, path: Path, input_names: Sequence[str], output_names: Sequence[str],
                 dynamic_axes: dict[str, dict[int, str]] | None, external_data: bool,
                 output_shapes: dict[str, tuple[int | str, ...]] | None = None) -> None:
    """TorchScript-export ``module`` to ``path``; weights go to ``path.name + '.data'`` when external.

    ``output_shapes`` (manifest shapes) re-declares the fixed axes of outputs that the exporter's shape
    inference left symbolic (e.g. the batch-1 axis of past_keys, which it derives from traced sizes).
    """
    import onnx
    import torch

    with tempfile.TemporaryDirectory(prefix="robometer_export_") as tmp:
        raw = Path(tmp) / path.name
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(
                module, args, str(raw), opset_version=OPSET, dynamo=False,
                input_names=list(input_names), output_names=list(output_names),
                dynamic_axes=dynamic_axes or None, do_constant_folding=True,
            )
        # Without loading the weights: a 4B export is 9-18 GB, which must not sit in memory twice.
        model = onnx.load(str(raw), load_external_data=False)
        for output in model.graph.output:
            declared = (output_shapes or {}).get(output.name)
            dims = output.type.tensor_type.shape.dim
            if declared is None:
                continue
            if len(dims) != len(declared):
                raise ExportError(f"{path.name}: output {output.name} has rank {len(dims)}, expected {declared}")
            for dim, size in zip(dims, declared):
                if isinstance(size, int):
                    dim.Clear()
                    dim.dim_value = size
        weight_bytes = sum(_stored_size(init) for init in model.graph.initializer)
        use_external = external_data or weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in (path, path.with_name(path.name + ".data")):
            stale.unlink(missing_ok=True)
        if use_external:
            _pack_external_data(model, Path(tmp), path)
        else:
            onnx.load_external_data_for_model(model, tmp)
            onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))


_ALIGN = 4096
#: initializers smaller than this stay inside the .onnx file
_INLINE_LIMIT = 1024


def _stored_size(init: Any) -> int:
    """Bytes of an initializer's data, inline or external."""
    import onnx

    if init.data_location == onnx.TensorProto.EXTERNAL:
        return int(_external_entries(init).get("length", 0))
    return len(init.raw_data)


def _pack_external_data(model: Any, source_dir: Path, path: Path) -> None:
    """Write ``model`` to ``path`` with its weights in one ``path.name + '.data'`` file, one tensor at a time.

    The legacy exporter writes a > 2 GB model as one file per tensor; this streams them (and the larger
    inline ones) into a single 4 KiB-aligned file, never holding more than one tensor in memory.
    """
    import onnx

    location = path.name + ".data"
    files: dict[str, Any] = {}
    try:
        with open(path.parent / location, "wb") as out:
            for init in model.graph.initializer:
                external = init.data_location == onnx.TensorProto.EXTERNAL
                if not external and (not init.HasField("raw_data") or len(init.raw_data) < _INLINE_LIMIT):
                    continue
                data = _tensor_bytes(init, source_dir, files)
                offset = -(-out.tell() // _ALIGN) * _ALIGN
                out.write(b"\0" * (offset - out.tell()))
                out.write(data)
                init.ClearField("raw_data")
                init.data_location = onnx.TensorProto.EXTERNAL
                del init.external_data[:]
                for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                    entry = init.external_data.add()
                    entry.key, entry.value = key, value
    finally:
        for handle in files.values():
            handle.close()
    onnx.save_model(model, str(path))


def _external_entries(init: Any) -> dict[str, str]:
    return {entry.key: entry.value for entry in init.external_data}


def _tensor_bytes(init: Any, base: Path, files: dict[str, Any]) -> bytes:
    """The stored bytes of an initializer (inline or external, read without loading the whole file)."""
    import onnx

    if init.data_location != onnx.TensorProto.EXTERNAL:
        return init.raw_data
    entries = _external_entries(init)
    handle = files.get(entries["location"])
    if handle is None:
        handle = files[entries["location"]] = open(base / entries["location"], "rb")  # noqa: SIM115
    handle.seek(int(entries.get("offset", 0)))
    return handle.read(int(entries["length"]))


def share_language_weights(onnx_dir: Path, secondary: str = PART_LANGUAGE_PREFERENCE) -> int:
    """Point ``<secondary>.onnx``'s weights at language.onnx.data where they are byte-identical.

    The language parts (preference, prefix, suffix) hold the same decoder weights as ``language``, so
    without this a 4B bundle would store the language model up to four times (+8 GB each in fp16). Only
    the tensors that are not in language.onnx.data stay in ``<secondary>.onnx.data``. Both parts must use
    external data. Returns the bytes saved.
    """
    import hashlib

    import onnx

    primary = onnx.load(str(onnx_dir / "language.onnx"), load_external_data=False)
    secondary_path = onnx_dir / f"{secondary}.onnx"
    secondary = onnx.load(str(secondary_path), load_external_data=False)
    files: dict[str, Any] = {}
    try:
        shared: dict[tuple, dict[str, str]] = {}
        for init in primary.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                digest = hashlib.sha256(_tensor_bytes(init, onnx_dir, files)).hexdigest()
                shared[(digest, init.data_type, tuple(init.dims))] = _external_entries(init)
        own_name = secondary_path.name + ".data"
        tmp = onnx_dir / (own_name + ".tmp")
        saved = 0
        with open(tmp, "wb") as out:
            for init in secondary.graph.initializer:
                if init.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                data = _tensor_bytes(init, onnx_dir, files)
                key = (hashlib.sha256(data).hexdigest(), init.data_type, tuple(init.dims))
                if key in shared:
                    entries = shared[key]
                    saved += len(data)
                else:
                    offset = -(-out.tell() // _ALIGN) * _ALIGN
                    out.write(b"\0" * (offset - out.tell()))
                    out.write(data)
                    entries = {"location": own_name, "offset": str(offset), "length": str(len(data))}
                del init.external_data[:]
                for k, v in entries.items():
                    entry = init.external_data.add()
                    entry.key, entry.value = k, v
    finally:
        for handle in files.values():
            handle.close()
    tmp.replace(onnx_dir / own_name)
    if (onnx_dir / own_name).stat().st_size == 0:
        (onnx_dir / own_name).unlink()
    onnx.save_model(secondary, str(secondary_path))
    return saved


@dataclass
class ParityReport:
    """Max |diff| per output of one parity case, and whether it is within tolerance."""

    case: str
    diffs: dict[str, float]
    limits: dict[str, float]

    @property
    def ok(self) -> bool:
        return all(self.diffs[k] <= self.limits[k] for k in self.diffs)

    def __str__(self) -> str:
        items = ", ".join(f"{k} {v:.2e} (limit {self.limits[k]:.1e})" for k, v in self.diffs.items())
        return f"{'ok  ' if self.ok else 'FAIL'} {self.case}: {items}"


def _compare(case: str, reference: dict[str, np.ndarray], actual: dict[str, np.ndarray], atol: float,
             rtol: float) -> ParityReport:
    diffs, limits = {}, {}
    for name, ref in reference.items():
        ref = np.asarray(ref, dtype=np.float64)
        got = np.asarray(actual[name], dtype=np.float64)
        if ref.shape != got.shape:
            raise ExportError(f"parity {case}: {name} has shape {got.shape} in ONNX Runtime, {ref.shape} in torch")
        diffs[name] = float(np.max(np.abs(ref - got))) if ref.size else 0.0
        if not np.all(np.isfinite(got)):
            diffs[name] = float("inf")
        limits[name] = atol + rtol * (float(np.max(np.abs(ref))) if ref.size else 0.0)
    return ParityReport(case, diffs, limits)


def _random_language_inputs(rng: np.random.Generator, vocab: int, image_pad: int, prog: int, tokens_per_frame: int,
                            frames: int, hidden: int, num_deepstack: int, grid: tuple[int, int, int],
                            merge: int) -> dict[str, np.ndarray]:
    """A random-token prompt with the real structure: text, then per frame a visual run and a prog token."""
    from robometer_ros.model.prompt import mrope_position_ids

    prefix = int(rng.integers(3, 12))
    ids: list[int] = list(rng.integers(0, vocab, prefix))
    types: list[int] = [0] * prefix
    for _ in range(frames):
        ids += [int(rng.integers(0, vocab))] + [image_pad] * tokens_per_frame + [prog]
        types += [0] + [1] * tokens_per_frame + [0]
    ids_arr = np.asarray(ids, dtype=np.int64)
    ids_arr[(ids_arr == image_pad) & (np.asarray(types) == 0)] = 0  # text never holds the image pad
    mask = np.asarray(types, dtype=bool)
    index = np.zeros(len(ids), dtype=np.int64)
    index[mask] = np.arange(int(mask.sum()))
    position_ids, _ = mrope_position_ids(np.asarray(types), np.asarray([grid] * frames), merge)
    v = frames * tokens_per_frame
    return {
        "input_ids": ids_arr[None, :],
        "position_ids": position_ids.astype(np.int64),
        "visual_embeds": rng.standard_normal((v, hidden)).astype(np.float32),
        "deepstack_embeds": rng.standard_normal((num_deepstack, v, hidden)).astype(np.float32) * 0.1,
        "visual_index": index[None, :],
        "visual_mask": mask[None, :],
        "prog_positions": np.flatnonzero(ids_arr == prog).astype(np.int64),
    }


def _torch_language(model: Any, feed: dict[str, np.ndarray], preference: bool) -> dict[str, np.ndarray]:
    import torch

    device, dtype = model.device, model.dtype
    t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feed.items()}
    for k in ("visual_embeds", "deepstack_embeds"):
        t[k] = t[k].to(dtype)
    with torch.no_grad():
        out = model.forward_language(
            t["input_ids"], t["position_ids"], t["visual_embeds"], t["deepstack_embeds"], t["visual_index"],
            t["visual_mask"], t["prog_positions"], t.get("pref_position") if preference else None,
        )
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def _torch_vision(model: Any, pixel_values: np.ndarray, grid: tuple[int, int, int]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        visual, deepstack = model.encode_frame(torch.from_numpy(pixel_values).to(model.device), grid)
    return {"visual_embeds": visual.float().cpu().numpy(), "deepstack_embeds": deepstack.float().cpu().numpy()}


def _layout_feed(layout: Any, visual: np.ndarray, deepstack: np.ndarray, preference: bool) -> dict[str, np.ndarray]:
    feed = {
        "input_ids": layout.input_ids,
        "position_ids": layout.position_ids,
        "visual_embeds": visual,
        "deepstack_embeds": deepstack,
        "visual_index": layout.visual_index,
        "visual_mask": layout.visual_mask,
        "prog_positions": layout.prog_positions,
    }
    if preference:
        feed["pref_position"] = layout.pref_position
    return feed


def parity_check(model: Any, onnx_dir: Path, builder: Any, frame: FrameSpec, num_frames: int, precision: str,
                 seed: int = 0, log: Any = print, prefix_parts: bool = False) -> list[ParityReport]:
    """ONNX Runtime (CPU) vs PyTorch on random inputs and on a real prompt; returns one report per case.

    With ``prefix_parts``, one more case: ORT language_prefix + language_suffix (a batch of 3 prompts that
    share the first frame, another instruction and frame count than the traced ones) against the PyTorch
    *plain* language part on each prompt, i.e. prefix reuse against the reference it must equal.
    """
    import onnxruntime as ort

    atol, rtol = TOLERANCES[precision]
    rng = np.random.default_rng(seed)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # One language session at a time: for a 4B model each holds the full decoder weights.
    sessions: dict[str, Any] = {}
    grid = frame.grid_thw
    reports = []

    def run(part: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = sessions.get(part)
        if session is None:
            session = sessions[part] = ort.InferenceSession(str(onnx_dir / f"{part}.onnx"), options,
                                                            providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feed)))

    # 1. vision part on random pixels (the processor's output range is about [-1, 1])
    pixels = rng.uniform(-1, 1, (frame.patches_per_frame, frame.patch_dim)).astype(np.float32)
    reports.append(_compare("vision, random pixels", _torch_vision(model, pixels, grid),
                            run(PART_VISION, {"pixel_values": pixels}), atol, rtol))
    frames_px = [rng.uniform(-1, 1, (frame.patches_per_frame, frame.patch_dim)).astype(np.float32)
                 for _ in range(num_frames)]
    torch_feats = [_torch_vision(model, px, grid) for px in frames_px]
    ort_feats = [run(PART_VISION, {"pixel_values": px}) for px in frames_px]
    sessions.pop(PART_VISION)

    def stack(feats: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([f["visual_embeds"] for f in feats], 0),
                np.concatenate([f["deepstack_embeds"] for f in feats], 1))

    hidden, k = model.hidden_size, model.num_deepstack
    half = max(1, num_frames // 2)
    for part, frames in ((PART_LANGUAGE, max(1, num_frames // 2 + 1)), (PART_LANGUAGE_PREFERENCE, num_frames + 1)):
        pref = part == PART_LANGUAGE_PREFERENCE
        # 2. random tokens/features, a frame count != the tracing example (exercises the dynamic axes)
        feed = _random_language_inputs(rng, model.config.vocab_size, builder.image_pad_id, builder.prog_token_id,
                                       frame.tokens_per_frame, frames, hidden, k, grid, frame.merge_size)
        if pref:
            feed["pref_position"] = np.asarray([feed["input_ids"].shape[1] - 1], dtype=np.int64)
        reports.append(_compare(f"{part}, random tokens, {frames} frames", _torch_language(model, feed, pref),
                                run(part, feed), atol, rtol))
        # 3. a real prompt on real frame features (ORT vision -> ORT language vs torch end to end)
        if pref:
            layout = builder.preference(PARITY_INSTRUCTION, [grid] * half, [grid] * half)
            feats_t, feats_o, case = torch_feats[:half] * 2, ort_feats[:half] * 2, f"{half}+{half} frames"
        else:
            layout = builder.progress(PARITY_INSTRUCTION, [grid] * num_frames)
            feats_t, feats_o, case = torch_feats, ort_feats, f"{num_frames} frames"
        ref = _torch_language(model, _layout_feed(layout, *stack(feats_t), pref), pref)
        reports.append(_compare(f"{part}, real prompt, {case}", ref,
                                run(part, _layout_feed(layout, *stack(feats_o), pref)), atol, rtol))
        sessions.pop(part)
    if prefix_parts:
        reports.append(_prefix_parity(model, builder, frame, max(2, num_frames // 2 + 1), torch_feats, ort_feats,
                                      run, atol, rtol))
        sessions.clear()
    for report in reports:
        log(f"parity {report}")
    return reports


def _prefix_parity(model: Any, builder: Any, frame: FrameSpec, frames: int, torch_feats: list, ort_feats: list,
                   run: Any, atol: float, rtol: float, batch: int = 3) -> ParityReport:
    """ORT prefix + batched suffix vs torch forward_language per prompt (see parity_check)."""
    from robometer_ros.model.prompt import split_after_first_frame

    layout = builder.progress("open the drawer", [frame.grid_thw] * frames)
    split = split_after_first_frame(layout)
    n = len(torch_feats)
    choices = [[0] + [(1 + b + j) % n for j in range(frames - 1)] for b in range(batch)]
    reference: dict[str, list[np.ndarray]] = {"progress_logits": [], "success_logits": []}
    for chosen in choices:
        feats = [torch_feats[i] for i in chosen]
        out = _torch_language(model, _layout_feed(layout, np.concatenate([f["visual_embeds"] for f in feats], 0),
                                                  np.concatenate([f["deepstack_embeds"] for f in feats], 1),
                                                  False), False)
        for name in reference:
            reference[name].append(out[name])
    first = ort_feats[0]
    prefix = run(PART_LANGUAGE_PREFIX, {
        "input_ids": split.prefix_input_ids, "position_ids": split.prefix_position_ids,
        "visual_embeds": first["visual_embeds"], "deepstack_embeds": first["deepstack_embeds"],
        "visual_index": split.prefix_visual_index, "visual_mask": split.prefix_visual_mask,
    })
    suffix = run(PART_LANGUAGE_SUFFIX, {
        "input_ids": split.suffix_input_ids, "position_ids": split.suffix_position_ids,
        "visual_embeds": np.stack([np.concatenate([ort_feats[i]["visual_embeds"] for i in c[1:]], 0)
                                   for c in choices]),
        "deepstack_embeds": np.stack([np.concatenate([ort_feats[i]["deepstack_embeds"] for i in c[1:]], 1)
                                      for c in choices]),
        "visual_index": split.suffix_visual_index, "visual_mask": split.suffix_visual_mask,
        "prog_positions": split.suffix_prog_positions,
        "past_keys": prefix["past_keys"], "past_values": prefix["past_values"],
    })
    actual = {name: np.stack([np.concatenate([prefix[name], suffix[name][b]], 0) for b in range(batch)])
              for name in reference}
    return _compare(f"{PART_LANGUAGE_PREFIX} + {PART_LANGUAGE_SUFFIX} vs {PART_LANGUAGE}, real prompt, "
                    f"{frames} frames, batch {batch}", {k: np.stack(v) for k, v in reference.items()}, actual,
                    atol, rtol)


# ----------------------------------------------------------------------------------------------
# Bundle writing


def _sequence_limits(builder: Any, frame: FrameSpec, num_frames: int, max_frames: int,
                     max_instruction_tokens: int) -> SequenceLimits:
    """Prompt-length range for the TensorRT profiles, measured with the real prompt builder."""
    grid = frame.grid_thw
    short = "go"

    def progress_len(instruction: str, frames: int) -> int:
        return builder.progress(instruction, [grid] * frames).seq_len

    def preference_len(instruction: str, frames: int) -> int:
        return builder.preference(instruction, [grid] * frames, [grid] * frames).seq_len

    # The instruction sits inside quotes; BPE merges at its edges can shift the count by a few tokens.
    margin = 8
    return SequenceLimits(
        min_frames=1,
        max_frames=max_frames,
        max_instruction_tokens=max_instruction_tokens,
        min_length=max(1, progress_len(short, 1) - margin),
        opt_length=progress_len(PARITY_INSTRUCTION, num_frames),
        max_length=progress_len("", max_frames) + max_instruction_tokens + margin,
        preference_min_length=max(1, preference_len(short, 1) - margin),
        preference_opt_length=preference_len(PARITY_INSTRUCTION, num_frames),
        preference_max_length=preference_len("", max_frames) + max_instruction_tokens + margin,
    )


def _prefix_limits(builder: Any, frame: FrameSpec, num_frames: int, max_frames: int, max_instruction_tokens: int,
                   max_batch: int) -> PrefixLimits:
    """Prefix / suffix length ranges of the prefix-reuse parts, measured with the real prompt builder.

    The suffix ("Picture k: ..." per frame and the end of the turn) does not depend on the instruction, so
    its lengths are exact; the prefix varies with the instruction like the full prompt does.
    """
    from robometer_ros.model.prompt import split_after_first_frame

    grid = frame.grid_thw

    def split(instruction: str, frames: int) -> Any:
        return split_after_first_frame(builder.progress(instruction, [grid] * frames))

    margin = 8  # BPE merges at the instruction's edges (as in _sequence_limits)
    return PrefixLimits(
        min_length=max(1, split("go", 1).prefix_length - margin),
        opt_length=split(PARITY_INSTRUCTION, 1).prefix_length,
        max_length=split("", 1).prefix_length + max_instruction_tokens + margin,
        suffix_min_length=split(PARITY_INSTRUCTION, 2).suffix_length,
        suffix_opt_length=split(PARITY_INSTRUCTION, max(2, num_frames)).suffix_length,
        suffix_max_length=split(PARITY_INSTRUCTION, max_frames).suffix_length,
        max_batch=max_batch,
    )


def _export_prefix_parts(model: Any, builder: Any, frame: FrameSpec, num_frames: int, onnx_dir: Path,
                         prefix_cls: type, suffix_cls: type, external_data: bool,
                         output_shapes: dict[str, tuple[int | str, ...]]) -> None:
    """Trace language_prefix and language_suffix on the real prompt split (suffix batch 2, zero features)."""
    import torch

    from robometer_ros.model.prompt import split_after_first_frame

    grid = frame.grid_thw
    hidden, k, t = model.hidden_size, model.num_deepstack, frame.tokens_per_frame
    split = split_after_first_frame(builder.progress(PARITY_INSTRUCTION, [grid] * max(2, num_frames)))
    device = model.device

    def tensor(array: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    prefix_args = (tensor(split.prefix_input_ids), tensor(split.prefix_position_ids),
                   torch.zeros(t, hidden, device=device), torch.zeros(k, t, hidden, device=device),
                   tensor(split.prefix_visual_index), tensor(split.prefix_visual_mask))
    prefix_module = prefix_cls(model).eval()
    _export_part(prefix_module, prefix_args, onnx_dir / f"{PART_LANGUAGE_PREFIX}.onnx", PREFIX_INPUTS,
                 PREFIX_OUTPUTS, PREFIX_DYNAMIC_AXES, external_data, output_shapes)
    with torch.no_grad():
        _, _, past_keys, past_values = prefix_module(*prefix_args)
    v = int(split.suffix_visual_mask.sum())
    suffix_args = (tensor(split.suffix_input_ids), tensor(split.suffix_position_ids),
                   torch.zeros(2, v, hidden, device=device), torch.zeros(2, k, v, hidden, device=device),
                   tensor(split.suffix_visual_index), tensor(split.suffix_visual_mask),
                   tensor(split.suffix_prog_positions), past_keys, past_values)
    _export_part(suffix_cls(model).eval(), suffix_args, onnx_dir / f"{PART_LANGUAGE_SUFFIX}.onnx", SUFFIX_INPUTS,
                 LANGUAGE_OUTPUTS, SUFFIX_DYNAMIC_AXES, external_data)


def _frame_spec(model: Any, height: int, width: int) -> FrameSpec:
    from robometer_ros import preprocess

    cfg = model.config
    unit = cfg.patch_size * cfg.spatial_merge_size
    if height % unit or width % unit:
        raise ExportError(f"--frame-size {height}x{width}: both sides must be multiples of {unit} "
                          "(patch size x merge size)")
    mean = tuple(getattr(preprocess, "IMAGE_MEAN", (0.5, 0.5, 0.5)))
    std = tuple(getattr(preprocess, "IMAGE_STD", (0.5, 0.5, 0.5)))
    return FrameSpec(height, width, cfg.patch_size, cfg.temporal_patch_size, cfg.spatial_merge_size, mean, std)


def export_bundle(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    frame_size: tuple[int, int] = DEFAULT_FRAME_SIZE,
    num_frames: int | None = None,
    max_frames: int | None = None,
    model_id: str = "robometer",
    model_version: str = "0",
    chat_template: str | None = None,
    external_data: bool = False,
    fp16: bool = False,
    include_checkpoint: bool = False,
    max_instruction_tokens: int = DEFAULT_MAX_INSTRUCTION_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    prefix_parts: bool = True,
    training: dict[str, Any] | None = None,
    overwrite: bool = False,
    check_parity: bool = True,
    log: Any = print,
) -> Bundle:
    """Export ``model`` (a RobometerModel) and ``tokenizer`` (a ``tokenizers.Tokenizer``) as a bundle.

    Writes into a temporary directory next to ``out_dir`` and renames it into place only after the
    parity check passed, so a failed export never leaves a half bundle behind. ``prefix_parts`` adds
    language_prefix / language_suffix (prefix reuse; needs ``max_frames`` >= 2); ``max_batch`` is the
    largest suffix batch their TensorRT profiles serve. ``training`` (what the model was trained on: step,
    frame size, training data) is kept in the manifest's ``extra.training``.
    """
    import torch

    from robometer_ros.model.prompt import PromptBuilder
    from robometer_ros.model.tokenizer import save_tokenizer

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    cfg = model.config
    num_frames = num_frames or cfg.num_frames
    max_frames = max(max_frames or num_frames, num_frames)
    precision = "fp16" if fp16 else "fp32"
    height, width = frame_size
    frame = _frame_spec(model, height, width)
    builder = PromptBuilder(tokenizer, cfg.spatial_merge_size)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > cfg.vocab_size:
        raise ExportError(f"tokenizer has {vocab} tokens but the model's embedding has {cfg.vocab_size} rows")

    model = model.eval()
    if fp16 and model.dtype != torch.float16:
        # a copy: the caller's model keeps its weights (the CLI loads fp16 directly, so no copy there)
        model = copy.deepcopy(model).half()
    if max_batch < 1:
        raise ExportError(f"--max-batch must be >= 1, got {max_batch}")
    prefix_parts = prefix_parts and max_frames >= 2
    VisionPart, LanguagePart, LanguagePreferencePart, LanguagePrefixPart, LanguageSuffixPart = _wrappers()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        onnx_dir = staging / "onnx"
        grid = frame.grid_thw
        hidden, k = model.hidden_size, model.num_deepstack
        t0 = time.perf_counter()
        pixels = torch.zeros(frame.patches_per_frame, frame.patch_dim, device=model.device)
        _export_part(VisionPart(model, grid).eval(), (pixels,), onnx_dir / "vision.onnx", VISION_INPUTS,
                     VISION_OUTPUTS, None, external_data)
        log(f"exported vision part ({time.perf_counter() - t0:.1f} s)")

        # Trace the language parts on a real prompt with num_frames frames.
        layout = builder.progress(PARITY_INSTRUCTION, [grid] * num_frames)
        v = layout.num_visual_tokens
        example = _layout_feed(layout, np.zeros((v, hidden), np.float32), np.zeros((k, v, hidden), np.float32), False)
        targs = tuple(torch.from_numpy(np.ascontiguousarray(example[n])).to(model.device) for n in LANGUAGE_INPUTS)
        t0 = time.perf_counter()
        _export_part(LanguagePart(model).eval(), targs, onnx_dir / "language.onnx", LANGUAGE_INPUTS,
                     LANGUAGE_OUTPUTS, LANGUAGE_DYNAMIC_AXES, external_data)
        log(f"exported language part ({time.perf_counter() - t0:.1f} s)")
        layout = builder.preference(PARITY_INSTRUCTION, [grid] * num_frames, [grid] * num_frames)
        v = layout.num_visual_tokens
        example = _layout_feed(layout, np.zeros((v, hidden), np.float32), np.zeros((k, v, hidden), np.float32), True)
        names = (*LANGUAGE_INPUTS, "pref_position")
        targs = tuple(torch.from_numpy(np.ascontiguousarray(example[n])).to(model.device) for n in names)
        t0 = time.perf_counter()
        _export_part(LanguagePreferencePart(model).eval(), targs, onnx_dir / "language_preference.onnx", names,
                     (*LANGUAGE_OUTPUTS, "preference_logit"), LANGUAGE_DYNAMIC_AXES, external_data)
        log(f"exported language_preference part ({time.perf_counter() - t0:.1f} s)")
        if prefix_parts:
            t0 = time.perf_counter()
            _, prefix_outputs = prefix_specs(hidden, k, cfg.num_bins, frame.tokens_per_frame, kv_shape(cfg))
            _export_prefix_parts(model, builder, frame, num_frames, onnx_dir, LanguagePrefixPart, LanguageSuffixPart,
                                 external_data, {t.name: t.shape for t in prefix_outputs})
            log(f"exported language_prefix + language_suffix parts ({time.perf_counter() - t0:.1f} s)")
        secondaries = [PART_LANGUAGE_PREFERENCE]
        if prefix_parts:
            secondaries += [PART_LANGUAGE_PREFIX, PART_LANGUAGE_SUFFIX]
        for secondary in secondaries:
            if (onnx_dir / "language.onnx.data").is_file() and (onnx_dir / f"{secondary}.onnx.data").is_file():
                saved = share_language_weights(onnx_dir, secondary)
                log(f"{secondary} shares {saved / 1e6:.1f} MB of weights with language.onnx.data")

        if check_parity:
            reports = parity_check(model, onnx_dir, builder, frame, num_frames, precision, log=log,
                                   prefix_parts=prefix_parts)
            failed = [r for r in reports if not r.ok]
            if failed:
                raise ExportError("ONNX Runtime disagrees with PyTorch beyond tolerance: "
                                  + "; ".join(str(r) for r in failed))

        save_tokenizer(tokenizer, staging, chat_template)
        checkpoint_dir = None
        if include_checkpoint:
            from robometer_ros.model.checkpoint import save_checkpoint

            save_checkpoint(model, tokenizer, staging / "checkpoint", chat_template=chat_template)
            checkpoint_dir = "checkpoint"

        parts = {}
        vin, vout = vision_specs(frame, hidden, k)
        lin, lout = language_specs(hidden, k, cfg.num_bins, preference=False)
        pin, pout = language_specs(hidden, k, cfg.num_bins, preference=True)
        specs = {PART_VISION: (vin, vout), PART_LANGUAGE: (lin, lout), PART_LANGUAGE_PREFERENCE: (pin, pout)}
        if prefix_parts:
            kv = kv_shape(cfg)
            specs[PART_LANGUAGE_PREFIX] = prefix_specs(hidden, k, cfg.num_bins, frame.tokens_per_frame, kv)
            specs[PART_LANGUAGE_SUFFIX] = suffix_specs(hidden, k, cfg.num_bins, kv)
        for name, (inputs, outputs) in specs.items():
            rel = f"onnx/{name}.onnx"
            parts[name] = PartSpec(name, rel, tuple(inputs), tuple(outputs),
                                   tuple(onnx_external_files(staging / rel)))
        from robometer_ros.model import prompt as prompt_module

        special = {
            "image_pad": builder.image_pad_id,
            "vision_start": builder.vision_start_id,
            "vision_end": builder.vision_end_id,
            "prog_token": builder.prog_token_id,
            "pref_token": builder.pref_token_id,
            "split_token": builder.split_token_id,
        }
        for name, token in (("im_start", prompt_module.IM_START), ("im_end", prompt_module.IM_END),
                            ("video_pad", "<|video_pad|>")):
            tid = tokenizer.token_to_id(token)
            if tid is not None:
                special[name] = int(tid)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            model_id=model_id,
            model_version=model_version,
            base_model=cfg.base_model_id,
            hidden_size=hidden,
            num_deepstack=k,
            vocab_size=cfg.vocab_size,
            frame=frame,
            num_frames=num_frames,
            progress_bins=cfg.num_bins,
            special_tokens=special,
            prompt={
                "format": "robometer-qwen3vl-multi-image-v1",
                "chat_template_flags": {"add_vision_id": True, "add_generation_prompt": False,
                                        "enable_thinking": False},
                "progress_prompt": prompt_module.PROGRESS_PROMPT,
                "preference_prompt": prompt_module.PREFERENCE_PROMPT,
                "preference_progress_suffix": prompt_module.PREFERENCE_PROGRESS_SUFFIX,
                "trajectory_a": prompt_module.TRAJECTORY_A_TEXT,
                "trajectory_b": prompt_module.TRAJECTORY_B_TEXT,
                "preference_question": prompt_module.PREFERENCE_QUESTION,
                "robometer_special_tokens": list(cfg.special_tokens),
            },
            tokenizer_file="tokenizer.json",
            chat_template_file="chat_template.jinja",
            parts=parts,
            sequence=_sequence_limits(builder, frame, num_frames, max_frames, max_instruction_tokens),
            precision=precision,
            files={},
            checkpoint_dir=checkpoint_dir,
            prefix=(_prefix_limits(builder, frame, num_frames, max_frames, max_instruction_tokens, max_batch)
                    if prefix_parts else None),
            created_by="robometer-export (robometer_ros)",
            extra={"opset": OPSET, "exporter": "torchscript", "torch": torch.__version__,
                   "robometer_config": cfg.to_dict(), "training": dict(training or {})},
        )
        write_manifest(staging, manifest)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle.open(out)


# ----------------------------------------------------------------------------------------------
# CLI


def _trained_frame_size(checkpoint: str) -> tuple[int, int] | None:
    """The frame size our trainer recorded in the checkpoint's training.json (None for other checkpoints)."""
    from robometer_ros.training.recipe.config import read_training_info

    size = read_training_info(checkpoint).get("frame_size")
    return (int(size[0]), int(size[1])) if size else None


def _training_record(checkpoint: str) -> dict[str, Any]:
    """What the manifest keeps of the checkpoint's training.json: the step, frame size and training data."""
    from robometer_ros.training.recipe.config import read_training_info

    info = read_training_info(checkpoint)
    return {key: info[key] for key in ("step", "frame_size", "num_frames", "training_data") if key in info}


def _frame_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"frame size must be HxW (e.g. 256x320), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"frame size must be positive, got {text!r}")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    """The robometer-export argument parser."""
    p = argparse.ArgumentParser(
        prog="robometer-export",
        description="Export a Robometer checkpoint (ours or the released layout) to a bundle of ONNX parts.",
    )
    p.add_argument("checkpoint", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("out_bundle", help="bundle directory to write")
    p.add_argument("--base-model", metavar="DIR",
                   help="base Qwen3-VL directory with tokenizer.json (for a released checkpoint without one)")
    default_size = "x".join(map(str, DEFAULT_FRAME_SIZE))
    p.add_argument("--frame-size", type=_frame_size, metavar="HxW",
                   help="fixed frame size of the vision part, multiples of 32 (default: the size the checkpoint was "
                        f"trained at, from its training.json, else {default_size})")
    p.add_argument("--num-frames", type=int, help="frames per scored prompt (default: the model's, 8)")
    p.add_argument("--max-frames", type=int, help="largest frame count the TensorRT profiles serve")
    p.add_argument("--max-instruction-tokens", type=int, default=DEFAULT_MAX_INSTRUCTION_TOKENS)
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help="largest batch of prompts per language_suffix call the TensorRT profiles serve "
                        f"(offline scoring; default {DEFAULT_MAX_BATCH})")
    p.add_argument("--no-prefix-parts", action="store_true",
                   help="leave out language_prefix / language_suffix (prefix reuse across steps)")
    p.add_argument("--model-id", help="model id in the manifest (default: checkpoint directory name)")
    p.add_argument("--model-version", default="0")
    p.add_argument("--fp16", action="store_true",
                   help="store fp16 weights (halves the bundle; for TensorRT-RTX and GPUs; I/O stays float32)")
    p.add_argument("--external-data", action="store_true",
                   help="always write weights to external .onnx.data files (automatic above 1.8 GB)")
    p.add_argument("--include-checkpoint", action="store_true",
                   help="also copy the weights as checkpoint/ for the torch backend")
    p.add_argument("--skip-parity", action="store_true", help="skip the ONNX Runtime parity check (not advised)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_BUNDLE if it exists")
    p.add_argument("--device", default="cpu", help="torch device used for export and parity (default cpu)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``robometer-export``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from robometer_ros.model.checkpoint import CheckpointError, load_checkpoint

    try:
        if args.base_model is None and not (Path(args.checkpoint) / "tokenizer.json").is_file():
            raise ExportError(f"{args.checkpoint} ships no tokenizer.json (a released Robometer checkpoint has "
                              "none): pass --base-model DIR, the base Qwen3-VL-4B-Instruct download")
        frame_size = args.frame_size or _trained_frame_size(args.checkpoint) or DEFAULT_FRAME_SIZE
        model, info = load_checkpoint(args.checkpoint, tokenizer_dir=args.base_model, device=args.device,
                                      dtype=torch.float16 if args.fp16 else torch.float32)
        bundle = export_bundle(
            model, info.tokenizer, args.out_bundle,
            frame_size=frame_size, num_frames=args.num_frames, max_frames=args.max_frames,
            model_id=args.model_id or Path(args.checkpoint).resolve().name, model_version=args.model_version,
            chat_template=info.chat_template, external_data=args.external_data, fp16=args.fp16,
            include_checkpoint=args.include_checkpoint, max_instruction_tokens=args.max_instruction_tokens,
            max_batch=args.max_batch, prefix_parts=not args.no_prefix_parts,
            training=_training_record(args.checkpoint),
            overwrite=args.overwrite, check_parity=not args.skip_parity,
        )
    except (ExportError, CheckpointError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"robometer-export: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote bundle {bundle.root} ({bundle.manifest.precision}, frames {bundle.manifest.num_frames}, "
          f"frame {bundle.manifest.frame.height}x{bundle.manifest.frame.width})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
