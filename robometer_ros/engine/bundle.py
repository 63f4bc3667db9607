"""The model bundle: what training hands to the robot.

A bundle is a directory::

    manifest.json                 versioned schema (see ``SCHEMA_VERSION`` and ``Manifest``)
    tokenizer.json                the instruction tokenizer (``tokenizers`` format)
    chat_template.jinja           the Qwen3-VL chat template the prompt is built with
    onnx/vision.onnx              one frame -> visual token embeddings + deepstack features
    onnx/language.onnx            prompt embeddings + cached visual features -> per-frame heads
    onnx/language_preference.onnx the same plus the preference head at <|pref_token|>
    onnx/language_prefix.onnx     optional (schema 2): the prompt prefix + first frame -> its keys/values
    onnx/language_suffix.onnx     optional (schema 2): the rest of the prompt on those keys/values, batched
    onnx/*.onnx.data              external weight files (always for models over 2 GB)
    checkpoint/                   optional: our safetensors layout, for the torch backend
    engines/index.json            TensorRT plans built on the target (keyed by TensorRT version,
    engines/*.plan                GPU name, compute capability and precision)

``Bundle.open(path)`` validates the manifest and raises ``BundleError`` naming exactly what is wrong.
Checksums: every file written by the exporter is listed in ``manifest.json`` with its sha256; engines
are built later on the robot and carry their own sha256 in ``engines/index.json``. Hashing an 8 GB
bundle takes ~10-30 s, so ``verify_checksums=False`` (``--no-verify-checksums`` on the command
lines) skips the hashing but still checks that every file exists with the recorded size.

This module imports neither torch nor rclpy.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: what the exporter writes. 2 = 1 + the optional prefix-reuse parts and the manifest's "prefix" ranges.
SCHEMA_VERSION = 2
#: what Bundle.open reads (schema 1 bundles, e.g. bundles/default, have only the three plain parts)
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
ENGINE_INDEX_NAME = "engines/index.json"
ENGINE_INDEX_SCHEMA_VERSION = 1

# The three ONNX parts every bundle has, and where the exporter writes them.
PART_VISION = "vision"
PART_LANGUAGE = "language"
PART_LANGUAGE_PREFERENCE = "language_preference"
PART_NAMES = (PART_VISION, PART_LANGUAGE, PART_LANGUAGE_PREFERENCE)
# Prefix reuse (schema 2, optional, always both): ``language`` cut after the first frame's prog token.
PART_LANGUAGE_PREFIX = "language_prefix"
PART_LANGUAGE_SUFFIX = "language_suffix"
PREFIX_PART_NAMES = (PART_LANGUAGE_PREFIX, PART_LANGUAGE_SUFFIX)
ALL_PART_NAMES = PART_NAMES + PREFIX_PART_NAMES

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool", "uint8")

_HASH_CHUNK = 8 << 20


class BundleError(Exception):
    """A bundle is missing, malformed or inconsistent; the message names the file and the field."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an ONNX part. ``shape`` holds ints for fixed axes, names for dynamic ones."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        """Return the manifest form of this tensor."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """Axis index -> axis name, for the dynamic axes only."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class PartSpec:
    """One exported ONNX part: its file, external weight files and I/O tensors."""

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Return the manifest form of this part."""
        return {
            "file": self.file,
            "external_data": list(self.external_data),
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }

    def input(self, name: str) -> TensorSpec:
        """The input tensor called ``name``."""
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"part {self.name!r} has no input {name!r}")


@dataclass(frozen=True)
class FrameSpec:
    """The fixed frame geometry the vision part was exported for, and its normalisation."""

    height: int
    width: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """Patch grid (t, h, w) of one frame (one image = one temporal patch)."""
        return (1, self.height // self.patch_size, self.width // self.patch_size)

    @property
    def patches_per_frame(self) -> int:
        """Rows of ``pixel_values`` for one frame."""
        _, gh, gw = self.grid_thw
        return gh * gw

    @property
    def patch_dim(self) -> int:
        """Columns of ``pixel_values``: 3 * temporal_patch * patch * patch."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens one frame contributes to the prompt (after the 2x2 merge)."""
        return self.patches_per_frame // (self.merge_size * self.merge_size)


@dataclass(frozen=True)
class SequenceLimits:
    """Sequence-length and frame-count range the language parts serve (TensorRT profiles use it)."""

    min_frames: int
    max_frames: int
    max_instruction_tokens: int
    min_length: int
    opt_length: int
    max_length: int
    preference_min_length: int
    preference_opt_length: int
    preference_max_length: int


@dataclass(frozen=True)
class PrefixLimits:
    """Ranges the prefix-reuse parts serve (their TensorRT profiles use them).

    ``min/opt/max_length``: prefix tokens (chat text + instruction + first frame + its prog token);
    ``suffix_*_length``: tokens after the prefix for 2, ``num_frames`` and ``max_frames`` frames;
    ``max_batch``: prompts per ``language_suffix`` call (offline scoring stacks the steps of an episode).
    """

    min_length: int
    opt_length: int
    max_length: int
    suffix_min_length: int
    suffix_opt_length: int
    suffix_max_length: int
    max_batch: int


@dataclass
class Manifest:
    """The parsed ``manifest.json``. ``Manifest.from_json`` validates every field it reads."""

    schema_version: int
    model_id: str
    model_version: str
    base_model: str
    hidden_size: int
    num_deepstack: int
    vocab_size: int
    frame: FrameSpec
    num_frames: int
    progress_bins: int
    special_tokens: dict[str, int]
    prompt: dict[str, Any]
    tokenizer_file: str
    chat_template_file: str | None
    parts: dict[str, PartSpec]
    sequence: SequenceLimits
    precision: str
    files: dict[str, dict[str, Any]]
    checkpoint_dir: str | None = None
    #: ranges of the prefix-reuse parts; set exactly when ``parts`` has them
    prefix: PrefixLimits | None = None
    created_by: str = ""
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON document (``files`` last, so a diff of two manifests reads top-down)."""
        return {
            "schema_version": self.schema_version,
            "model": {
                "id": self.model_id,
                "version": self.model_version,
                "base_model": self.base_model,
                "hidden_size": self.hidden_size,
                "num_deepstack": self.num_deepstack,
                "vocab_size": self.vocab_size,
            },
            "frame": {
                "height": self.frame.height,
                "width": self.frame.width,
                "patch_size": self.frame.patch_size,
                "temporal_patch_size": self.frame.temporal_patch_size,
                "merge_size": self.frame.merge_size,
                "image_mean": list(self.frame.image_mean),
                "image_std": list(self.frame.image_std),
                "patches_per_frame": self.frame.patches_per_frame,
                "tokens_per_frame": self.frame.tokens_per_frame,
            },
            "num_frames": self.num_frames,
            "progress_bins": self.progress_bins,
            "special_tokens": dict(self.special_tokens),
            "prompt": self.prompt,
            "tokenizer": {"file": self.tokenizer_file, "chat_template": self.chat_template_file},
            "parts": {name: part.to_json() for name, part in self.parts.items()},
            "sequence": asdict(self.sequence),
            "prefix": asdict(self.prefix) if self.prefix is not None else None,
            "precision": self.precision,
            "checkpoint": {"dir": self.checkpoint_dir} if self.checkpoint_dir else None,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "extra": self.extra,
            "files": self.files,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], source: str = MANIFEST_NAME) -> Manifest:
        """Parse and validate a manifest document; raise ``BundleError`` naming the bad field."""
        r = _FieldReader(doc, source)
        version = r.int("schema_version")
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise BundleError(
                f"{source}: unknown schema_version {version}; this robometer_ros reads schema_version "
                f"{' or '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))} (re-export the bundle with a matching "
                "robometer-export)"
            )
        model = r.sub("model")
        frame = r.sub("frame")
        frame_spec = FrameSpec(
            height=frame.int("height", minimum=1),
            width=frame.int("width", minimum=1),
            patch_size=frame.int("patch_size", minimum=1),
            temporal_patch_size=frame.int("temporal_patch_size", minimum=1),
            merge_size=frame.int("merge_size", minimum=1),
            image_mean=tuple(frame.float_list("image_mean", length=3)),  # type: ignore[arg-type]
            image_std=tuple(frame.float_list("image_std", length=3)),  # type: ignore[arg-type]
        )
        unit = frame_spec.patch_size * frame_spec.merge_size
        if frame_spec.height % unit or frame_spec.width % unit:
            raise BundleError(
                f"{source}: frame size {frame_spec.height}x{frame_spec.width} is not a multiple of "
                f"patch_size*merge_size = {unit}"
            )
        tokens = r.sub("special_tokens")
        special = {name: tokens.int(name, minimum=0) for name in tokens.names()}
        for required in ("image_pad", "vision_start", "vision_end", "prog_token", "split_token", "pref_token"):
            if required not in special:
                raise BundleError(f"{source}: special_tokens.{required} is missing")
        tok = r.sub("tokenizer")
        parts_reader = r.sub("parts")
        parts: dict[str, PartSpec] = {}
        for name in PART_NAMES:
            parts[name] = _parse_part(name, parts_reader.sub(name))
        optional = [name for name in PREFIX_PART_NAMES if name in parts_reader.names()]
        if optional and version < 2:
            raise BundleError(f"{source}: parts {optional} need schema_version 2, the manifest says {version}")
        if optional and len(optional) != len(PREFIX_PART_NAMES):
            raise BundleError(f"{source}: parts.{optional[0]} comes with "
                              f"{' and '.join(PREFIX_PART_NAMES)}; the other is missing")
        for name in optional:
            parts[name] = _parse_part(name, parts_reader.sub(name))
        unknown = sorted(set(parts_reader.names()) - set(ALL_PART_NAMES))
        if unknown:
            raise BundleError(f"{source}: unknown parts {unknown}; known parts: {', '.join(ALL_PART_NAMES)}")
        seq = r.sub("sequence")
        limits = SequenceLimits(**{f: seq.int(f, minimum=0) for f in SequenceLimits.__dataclass_fields__})
        prefix_limits = None
        if doc.get("prefix") is not None:
            pre = r.sub("prefix")
            prefix_limits = PrefixLimits(**{f: pre.int(f, minimum=1) for f in PrefixLimits.__dataclass_fields__})
        if bool(optional) != (prefix_limits is not None):
            raise BundleError(f"{source}: the prefix field and the parts {', '.join(PREFIX_PART_NAMES)} come "
                              "together (one is missing)")
        precision = r.str("precision")
        if precision not in PRECISIONS:
            raise BundleError(f"{source}: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        files_doc = r.raw("files")
        if not isinstance(files_doc, dict):
            raise BundleError(f"{source}: files must be an object of path -> {{sha256, size}}")
        files: dict[str, dict[str, Any]] = {}
        for rel, entry in files_doc.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
                raise BundleError(f"{source}: files[{rel!r}] has no sha256")
            if not isinstance(entry.get("size"), int):
                raise BundleError(f"{source}: files[{rel!r}] has no integer size")
            files[rel] = dict(entry)
        checkpoint = doc.get("checkpoint")
        checkpoint_dir = None
        if checkpoint is not None:
            if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("dir"), str):
                raise BundleError(f"{source}: checkpoint must be null or {{\"dir\": PATH}}")
            checkpoint_dir = checkpoint["dir"]
        prompt = r.raw("prompt")
        if not isinstance(prompt, dict):
            raise BundleError(f"{source}: prompt must be an object")
        return cls(
            schema_version=version,
            model_id=model.str("id"),
            model_version=model.str("version"),
            base_model=model.str("base_model"),
            hidden_size=model.int("hidden_size", minimum=1),
            num_deepstack=model.int("num_deepstack", minimum=0),
            vocab_size=model.int("vocab_size", minimum=1),
            frame=frame_spec,
            num_frames=r.int("num_frames", minimum=1),
            progress_bins=r.int("progress_bins", minimum=2),
            special_tokens=special,
            prompt=prompt,
            tokenizer_file=tok.str("file"),
            chat_template_file=tok.optional_str("chat_template"),
            parts=parts,
            sequence=limits,
            precision=precision,
            files=files,
            checkpoint_dir=checkpoint_dir,
            prefix=prefix_limits,
            created_by=str(doc.get("created_by", "")),
            created_at=str(doc.get("created_at", "")),
            extra=dict(doc.get("extra") or {}),
        )


class _FieldReader:
    """Reads typed fields from a JSON object and names the full field path in every error."""

    def __init__(self, doc: Any, where: str, prefix: str = "") -> None:
        if not isinstance(doc, Mapping):
            raise BundleError(f"{where}: {prefix.rstrip('.') or 'document'} must be a JSON object")
        self.doc, self.where, self.prefix = doc, where, prefix

    def names(self) -> Iterable[str]:
        return list(self.doc)

    def raw(self, key: str) -> Any:
        if key not in self.doc:
            raise BundleError(f"{self.where}: field {self.prefix}{key} is missing")
        return self.doc[key]

    def sub(self, key: str) -> _FieldReader:
        return _FieldReader(self.raw(key), self.where, f"{self.prefix}{key}.")

    def int(self, key: str, minimum: int | None = None) -> int:
        value = self.raw(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise BundleError(f"{self.where}: field {self.prefix}{key} must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise BundleError(f"{self.where}: field {self.prefix}{key} must be >= {minimum}, got {value}")
        return value

    def str(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str) or not value:
            raise BundleError(f"{self.where}: field {self.prefix}{key} must be a non-empty string")
        return value

    def optional_str(self, key: str) -> str | None:
        value = self.doc.get(key)
        if value is not None and not isinstance(value, str):
            raise BundleError(f"{self.where}: field {self.prefix}{key} must be a string or null")
        return value

    def float_list(self, key: str, length: int) -> list[float]:
        value = self.raw(key)
        if (
            not isinstance(value, list)
            or len(value) != length
            or not all(isinstance(v, (int, float)) for v in value)
        ):
            raise BundleError(f"{self.where}: field {self.prefix}{key} must be a list of {length} numbers")
        return [float(v) for v in value]


def _parse_tensor(doc: Any, where: str) -> TensorSpec:
    r = _FieldReader(doc, MANIFEST_NAME, where)
    shape = r.raw("shape")
    if not isinstance(shape, list) or not all(
        (isinstance(d, int) and not isinstance(d, bool) and d >= 0) or (isinstance(d, str) and d) for d in shape
    ):
        raise BundleError(f"{MANIFEST_NAME}: {where}shape must be a list of sizes or axis names, got {shape!r}")
    dtype = r.str("dtype")
    if dtype not in DTYPES:
        raise BundleError(f"{MANIFEST_NAME}: {where}dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return TensorSpec(name=r.str("name"), shape=tuple(shape), dtype=dtype)


def _parse_part(name: str, r: _FieldReader) -> PartSpec:
    inputs = r.raw("inputs")
    outputs = r.raw("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or not inputs or not outputs:
        raise BundleError(f"{MANIFEST_NAME}: parts.{name}.inputs and .outputs must be non-empty lists")
    external = r.doc.get("external_data") or []
    if not isinstance(external, list) or not all(isinstance(e, str) for e in external):
        raise BundleError(f"{MANIFEST_NAME}: parts.{name}.external_data must be a list of paths")
    return PartSpec(
        name=name,
        file=r.str("file"),
        inputs=tuple(_parse_tensor(t, f"parts.{name}.inputs[{i}].") for i, t in enumerate(inputs)),
        outputs=tuple(_parse_tensor(t, f"parts.{name}.outputs[{i}].") for i, t in enumerate(outputs)),
        external_data=tuple(external),
    )


# --------------------------------------------------------------------------------------------------
# Files and checksums


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (an 8 GB weight file never sits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_relpath(root: Path, rel: str, what: str) -> Path:
    """``root / rel``, refusing absolute paths and ``..`` escapes (a manifest is input, not trusted)."""
    candidate = Path(rel)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise BundleError(f"{what}: path {rel!r} must be relative to the bundle and stay inside it")
    return root / candidate


def collect_files(root: Path, exclude_dirs: Sequence[str] = ("engines",)) -> list[str]:
    """Bundle-relative POSIX paths of every regular file except manifest.json and ``exclude_dirs``."""
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(root)
        if rel.as_posix() == MANIFEST_NAME or (rel.parts and rel.parts[0] in exclude_dirs):
            continue
        found.append(rel.as_posix())
    return found


def file_records(root: Path, rel_paths: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{path: {"sha256", "size"}}`` for the given bundle-relative files."""
    return {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size} for rel in rel_paths}


def write_json_atomic(path: Path, doc: Any) -> None:
    """Write JSON through a temporary file + rename, so a crash never leaves half a manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a bundle is shared read-only with the node's user
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def utc_now() -> str:
    """ISO-8601 UTC timestamp, second resolution."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------------------------------
# ONNX graph checks

_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool", 2: "uint8"}


def onnx_io_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Read the graph inputs/outputs of an ONNX file without loading its (external) weights."""
    import onnx  # imported here: opening a bundle for the torch backend does not need it

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / google.protobuf errors; name the file either way
        raise BundleError(f"{path.name}: not a readable ONNX model ({exc})") from exc

    def spec(value_info: Any) -> TensorSpec:
        tensor_type = value_info.type.tensor_type
        dims: list[int | str] = []
        for d in tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
        dtype = _ONNX_DTYPES.get(tensor_type.elem_type, f"onnx-type-{tensor_type.elem_type}")
        return TensorSpec(value_info.name, tuple(dims), dtype)

    initializer_names = {init.name for init in model.graph.initializer}
    inputs = [spec(v) for v in model.graph.input if v.name not in initializer_names]
    outputs = [spec(v) for v in model.graph.output]
    return inputs, outputs


def onnx_external_files(path: Path) -> list[str]:
    """Locations (relative to the ONNX file) of the external weight files an ONNX model refers to."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations: set[str] = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for entry in init.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return sorted(locations)


def _compare_io(part: PartSpec, kind: str, declared: Sequence[TensorSpec], actual: Sequence[TensorSpec]) -> None:
    declared_names = [t.name for t in declared]
    actual_names = [t.name for t in actual]
    if declared_names != actual_names:
        raise BundleError(
            f"{part.file}: {kind} names {actual_names} do not match the manifest's parts.{part.name}.{kind} "
            f"{declared_names}"
        )
    for want, got in zip(declared, actual):
        if want.dtype != got.dtype:
            raise BundleError(
                f"{part.file}: {kind[:-1]} {want.name!r} has dtype {got.dtype} in the ONNX graph but "
                f"{want.dtype} in the manifest"
            )
        if len(want.shape) != len(got.shape) or any(
            (isinstance(w, int) != isinstance(g, int)) or (isinstance(w, int) and w != g)
            for w, g in zip(want.shape, got.shape)
        ):
            raise BundleError(
                f"{part.file}: shape mismatch for {kind[:-1]} {want.name!r}: ONNX graph has "
                f"{list(got.shape)}, manifest has {list(want.shape)}"
            )


# --------------------------------------------------------------------------------------------------
# Engines (TensorRT plans built on the target)


@dataclass(frozen=True)
class EngineKey:
    """What a TensorRT plan is only valid for."""

    runtime: str  # "tensorrt" or "tensorrt_rtx"
    runtime_version: str
    gpu_name: str
    compute_capability: str
    precision: str


@dataclass
class EngineRecord:
    """One cached plan in ``engines/index.json``."""

    part: str
    file: str
    sha256: str
    key: EngineKey
    onnx_sha256: str
    built_at: str
    profiles: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Return the index form of this record."""
        doc = {"part": self.part, "file": self.file, "sha256": self.sha256, **asdict(self.key)}
        doc.update(onnx_sha256=self.onnx_sha256, built_at=self.built_at, profiles=self.profiles,
                   build_seconds=self.build_seconds)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> EngineRecord:
        """Parse one index entry; raise ``BundleError`` on a malformed one."""
        r = _FieldReader(doc, ENGINE_INDEX_NAME, "engines[].")
        key = EngineKey(
            runtime=r.str("runtime"),
            runtime_version=r.str("runtime_version"),
            gpu_name=r.str("gpu_name"),
            compute_capability=r.str("compute_capability"),
            precision=r.str("precision"),
        )
        return cls(
            part=r.str("part"),
            file=r.str("file"),
            sha256=r.str("sha256"),
            key=key,
            onnx_sha256=r.str("onnx_sha256"),
            built_at=str(doc.get("built_at", "")),
            profiles=dict(doc.get("profiles") or {}),
            build_seconds=float(doc.get("build_seconds") or 0.0),
        )


# --------------------------------------------------------------------------------------------------
# The bundle


class Bundle:
    """An opened, validated bundle directory. Use ``Bundle.open(path)``."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        verify_checksums: bool = True,
        check_onnx: bool = True,
    ) -> Bundle:
        """Open and validate the bundle at ``path``.

        Checks, in order: the directory and manifest exist and parse; the schema version is known;
        every field has the right type; every file the manifest lists exists with its recorded size
        (and sha256 unless ``verify_checksums`` is False); the tokenizer, every ONNX part and its
        external weight files are present; each ONNX graph's input/output names, dtypes and shapes
        match the manifest (``check_onnx``). Raises ``BundleError`` naming the first problem found.
        """
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"bundle directory {str(root)!r} does not exist or is not a directory")
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise BundleError(f"{root}: missing {MANIFEST_NAME} (not a robometer bundle?)")
        try:
            doc = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from exc
        manifest = Manifest.from_json(doc, source=str(manifest_path))
        bundle = cls(root, manifest)
        bundle._check_files(verify_checksums)
        if check_onnx:
            bundle._check_onnx_parts()
        return bundle

    def _check_files(self, verify_checksums: bool) -> None:
        m = self.manifest
        required = [m.tokenizer_file] + [p.file for p in m.parts.values()]
        required += [f"{Path(p.file).parent.as_posix()}/{e}" for p in m.parts.values() for e in p.external_data]
        if m.chat_template_file:
            required.append(m.chat_template_file)
        for rel in required:
            path = _safe_relpath(self.root, rel, MANIFEST_NAME)
            if not path.is_file():
                raise BundleError(f"{self.root}: missing file {rel} (named in {MANIFEST_NAME})")
            if rel not in m.files:
                raise BundleError(f"{MANIFEST_NAME}: file {rel} has no checksum entry in 'files'")
        if m.checkpoint_dir is not None:
            ckpt = _safe_relpath(self.root, m.checkpoint_dir, MANIFEST_NAME)
            if not ckpt.is_dir():
                raise BundleError(f"{self.root}: missing checkpoint directory {m.checkpoint_dir}")
        for rel, entry in m.files.items():
            path = _safe_relpath(self.root, rel, MANIFEST_NAME)
            if not path.is_file():
                raise BundleError(f"{self.root}: missing file {rel} (listed in {MANIFEST_NAME} files)")
            size = path.stat().st_size
            if size != entry["size"]:
                raise BundleError(
                    f"{self.root}: {rel} is {size} bytes but the manifest records {entry['size']} "
                    "(truncated or replaced file)"
                )
            if verify_checksums:
                digest = sha256_file(path)
                if digest != entry["sha256"]:
                    raise BundleError(
                        f"{self.root}: checksum mismatch for {rel}: sha256 {digest[:16]}... but the manifest "
                        f"records {entry['sha256'][:16]}... (corrupt or modified file)"
                    )

    def _check_onnx_parts(self) -> None:
        for part in self.manifest.parts.values():
            path = self.root / part.file
            inputs, outputs = onnx_io_specs(path)
            _compare_io(part, "inputs", part.inputs, inputs)
            _compare_io(part, "outputs", part.outputs, outputs)
            for location in onnx_external_files(path):
                if not (path.parent / location).is_file():
                    raise BundleError(f"{part.file}: external weight file {location} is missing")

    # ---- accessors ----------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """The model id recorded at export."""
        return self.manifest.model_id

    @property
    def has_prefix_parts(self) -> bool:
        """Whether the bundle holds ``language_prefix`` / ``language_suffix`` (prefix reuse across steps)."""
        return all(name in self.manifest.parts for name in PREFIX_PART_NAMES)

    def part(self, name: str) -> PartSpec:
        """The manifest entry of an ONNX part (``vision``, ``language``, ``language_preference``, and with
        schema 2 optionally ``language_prefix`` / ``language_suffix``)."""
        if name not in self.manifest.parts:
            raise BundleError(f"bundle has no part {name!r}; parts: {sorted(self.manifest.parts)}")
        return self.manifest.parts[name]

    def part_path(self, name: str) -> Path:
        """Absolute path of the ONNX file of a part."""
        return self.root / self.part(name).file

    @property
    def tokenizer_path(self) -> Path:
        """Path of tokenizer.json."""
        return self.root / self.manifest.tokenizer_file

    @property
    def chat_template(self) -> str | None:
        """The chat template text, if the bundle has one."""
        if self.manifest.chat_template_file is None:
            return None
        return (self.root / self.manifest.chat_template_file).read_text()

    @property
    def checkpoint_path(self) -> Path | None:
        """The checkpoint directory for the torch backend, or None when the bundle has none."""
        return None if self.manifest.checkpoint_dir is None else self.root / self.manifest.checkpoint_dir

    def file_sha256(self, rel: str) -> str:
        """The sha256 the manifest records for a bundle file."""
        return self.manifest.files[rel]["sha256"]

    # ---- engines ------------------------------------------------------------------------------
    @property
    def engine_index_path(self) -> Path:
        """Path of engines/index.json."""
        return self.root / ENGINE_INDEX_NAME

    def engines(self) -> list[EngineRecord]:
        """Every plan recorded in engines/index.json (empty when there is no index)."""
        path = self.engine_index_path
        if not path.is_file():
            return []
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{path}: not valid JSON ({exc})") from exc
        version = doc.get("schema_version") if isinstance(doc, dict) else None
        if version != ENGINE_INDEX_SCHEMA_VERSION:
            raise BundleError(f"{path}: unknown engine index schema_version {version!r}")
        entries = doc.get("engines")
        if not isinstance(entries, list):
            raise BundleError(f"{path}: 'engines' must be a list")
        return [EngineRecord.from_json(e) for e in entries]

    def find_engine(self, part: str, key: EngineKey) -> EngineRecord | None:
        """The recorded plan for ``part`` and exactly this key, or None."""
        for record in self.engines():
            if record.part == part and record.key == key:
                return record
        return None

    def engine_is_current(self, record: EngineRecord, verify_checksum: bool = False) -> tuple[bool, str]:
        """Whether a recorded plan is usable: its file exists and it was built from the current ONNX."""
        path = _safe_relpath(self.root, record.file, ENGINE_INDEX_NAME)
        if not path.is_file():
            return False, f"plan file {record.file} is missing"
        part = self.part(record.part)
        if record.onnx_sha256 != self.file_sha256(part.file):
            return False, f"{part.file} changed since the plan was built (ONNX checksum differs)"
        if verify_checksum and sha256_file(path) != record.sha256:
            return False, f"plan file {record.file} does not match its recorded sha256"
        return True, "current"

    def record_engine(self, record: EngineRecord) -> None:
        """Add or replace (same part and key) a plan in engines/index.json."""
        kept = [r for r in self.engines() if not (r.part == record.part and r.key == record.key)]
        kept.append(record)
        write_json_atomic(
            self.engine_index_path,
            {"schema_version": ENGINE_INDEX_SCHEMA_VERSION, "engines": [r.to_json() for r in kept]},
        )

    def __repr__(self) -> str:
        return f"Bundle({str(self.root)!r}, model_id={self.model_id!r}, precision={self.manifest.precision!r})"


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Fill ``manifest.files`` with the sha256 and size of every bundle file, then write manifest.json.

    Engines are excluded: they are built later on the target and tracked by engines/index.json.
    """
    manifest.files = file_records(root, collect_files(root))
    if not manifest.created_at:
        manifest.created_at = utc_now()
    write_json_atomic(root / MANIFEST_NAME, manifest.to_json())
    return manifest


def describe(bundle: Bundle) -> str:
    """A human-readable summary of a bundle: model, frame, parts, limits and engines."""
    m = bundle.manifest
    f = m.frame
    lines = [
        f"bundle {bundle.root}",
        f"  model {m.model_id} version {m.model_version} (base {m.base_model}), precision {m.precision}, "
        f"schema {m.schema_version}",
        f"  frame {f.height}x{f.width}, grid {f.grid_thw}, {f.tokens_per_frame} tokens/frame, "
        f"{m.num_frames} frames per prompt (max {m.sequence.max_frames}), {m.progress_bins} progress bins",
        f"  prompt length {m.sequence.min_length}..{m.sequence.max_length} "
        f"(preference {m.sequence.preference_min_length}..{m.sequence.preference_max_length})",
    ]
    if m.prefix is not None:
        lines.append(f"  prefix reuse: prefix {m.prefix.min_length}..{m.prefix.max_length} tokens, suffix "
                     f"{m.prefix.suffix_min_length}..{m.prefix.suffix_max_length}, batch <= {m.prefix.max_batch}")
    for part in m.parts.values():
        ins = ", ".join(f"{t.name}{list(t.shape)}" for t in part.inputs)
        outs = ", ".join(f"{t.name}{list(t.shape)}" for t in part.outputs)
        folder = Path(part.file).parent.as_posix()
        own = [e for e in part.external_data if e.startswith(Path(part.file).name)]
        shared = [e for e in part.external_data if e not in own]
        size = sum(m.files.get(rel, {}).get("size", 0) for rel in [part.file] + [f"{folder}/{e}" for e in own])
        note = f", shares {', '.join(shared)}" if shared else ""
        lines.append(f"  {part.name}: {part.file} ({size / 1e6:.1f} MB{note}) in: {ins} out: {outs}")
    lines.append(f"  checkpoint: {m.checkpoint_dir or 'none (no torch backend)'}")
    engines = bundle.engines()
    if not engines:
        lines.append("  engines: none (run robometer-build-engines on the target)")
    for e in engines:
        ok, why = bundle.engine_is_current(e)
        lines.append(f"  engine {e.part}: {e.key.runtime} {e.key.runtime_version}, {e.key.gpu_name} "
                     f"({e.key.compute_capability}), {e.key.precision} -> {e.file} [{'current' if ok else why}]")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m robometer_ros.engine.bundle BUNDLE``: validate a bundle and print what it holds."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m robometer_ros.engine.bundle",
                                     description="Validate a robometer bundle and describe it.")
    parser.add_argument("bundle")
    parser.add_argument("--no-verify-checksums", action="store_true",
                        help="skip hashing the files (sizes, names and ONNX shapes are still checked)")
    args = parser.parse_args(argv)
    try:
        bundle = Bundle.open(args.bundle, verify_checksums=not args.no_verify_checksums)
        print(describe(bundle))
    except BundleError as exc:
        print(f"invalid bundle: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
