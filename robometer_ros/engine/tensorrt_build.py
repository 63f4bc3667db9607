"""``robometer-build-engines BUNDLE``: build TensorRT plans of the bundle's ONNX parts on this machine.

Run on the target (the robot's GPU): a plan is only valid for the TensorRT version, GPU and
precision it was built with, so plans are cached in the bundle under ``engines/`` and indexed in
``engines/index.json`` by (TensorRT flavor + version, GPU name, compute capability, precision). A
plan is rebuilt when its ONNX part changed (checksum), when TensorRT changed (a different key), or
with ``--force``.

Works with NVIDIA TensorRT (``import tensorrt``; needs the GPU) and with TensorRT-RTX
(``import tensorrt_rtx``), which builds ahead of time without a GPU; CI uses the latter to prove the
tiny model's parts parse and build.

Precision:
  * ``fp16`` (default where possible): TensorRT's FP16 builder flag on an fp32 bundle; builders
    without that flag (TensorRT-RTX, strongly typed TensorRT) take the precision from the ONNX
    weights, so they need a bundle exported with ``robometer-export --fp16``. ``auto`` picks fp16
    where possible and the bundle's own precision otherwise.
  * ``fp32``: the ONNX as exported.
  * ``int8`` / ``fp8``: explicit quantization only (the ONNX must carry Q/DQ nodes, e.g. from NVIDIA
    ModelOpt), on a GPU that has the tensor cores for it (INT8: compute capability >= 7.5 here;
    FP8: >= 8.9, Ada/Hopper/Blackwell). The builder says which condition is not met.

Optimization profiles come from the manifest: ``seq`` (prompt length min/opt/max),
``visual_tokens`` (frames x tokens per frame) and ``frames`` (min_frames / num_frames / max_frames,
doubled for the preference part). The prefix-reuse parts (schema 2 bundles) take ``prefix`` (prefix
length, from the manifest's ``prefix`` ranges), ``suffix`` (suffix length for 2 / num_frames / max_frames
frames), ``suffix_frames`` (1 / num_frames - 1 / max_frames - 1), ``suffix_visual_tokens`` and ``batch``
(1 / 1 / max_batch: opt 1 because the robot's online step is batch 1; offline scoring uses larger ones).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robometer_ros.engine.bundle import (
    ALL_PART_NAMES,
    PART_LANGUAGE_PREFERENCE,
    PART_LANGUAGE_PREFIX,
    PART_LANGUAGE_SUFFIX,
    PART_NAMES,
    Bundle,
    BundleError,
    EngineKey,
    EngineRecord,
    sha256_file,
    utc_now,
)
from robometer_ros.engine.runtime import NoDeviceError, RuntimeUnavailableError
from robometer_ros.engine.trt_common import GpuIdentity, engine_key, gpu_identity, import_tensorrt, slug

LOG = logging.getLogger("robometer_ros.build_engines")

BUILD_PRECISIONS = ("auto", "fp16", "fp32", "int8", "fp8")
MIN_SM = {"int8": 75, "fp8": 89}


class EngineBuildError(RuntimeError):
    """A plan cannot be built (unsupported precision, parser error, builder failure)."""


@dataclass
class BuildResult:
    """What happened to one part."""

    part: str
    status: str  # "built", "current" (kept), "failed"
    record: EngineRecord | None
    message: str = ""


def axis_ranges(bundle: Bundle, part: str) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each dynamic axis name of ``part``, from the manifest."""
    m = bundle.manifest
    seq = m.sequence
    tpf = m.frame.tokens_per_frame
    if part in (PART_LANGUAGE_PREFIX, PART_LANGUAGE_SUFFIX):
        pre = m.prefix
        if pre is None:
            raise BundleError(f"{bundle.root}: part {part} needs the manifest's prefix ranges (schema 2)")
        ranges = {"prefix": (pre.min_length, pre.opt_length, pre.max_length)}
        if part == PART_LANGUAGE_SUFFIX:
            frames = (1, max(1, m.num_frames - 1), max(1, seq.max_frames - 1))
            ranges.update(suffix=(pre.suffix_min_length, pre.suffix_opt_length, pre.suffix_max_length),
                          suffix_frames=frames, suffix_visual_tokens=tuple(f * tpf for f in frames),
                          batch=(1, 1, pre.max_batch))
        return ranges  # type: ignore[return-value]
    if part == PART_LANGUAGE_PREFERENCE:
        frames = (2 * seq.min_frames, 2 * m.num_frames, 2 * seq.max_frames)
        length = (seq.preference_min_length, seq.preference_opt_length, seq.preference_max_length)
    else:
        frames = (seq.min_frames, m.num_frames, seq.max_frames)
        length = (seq.min_length, seq.opt_length, seq.max_length)
    return {"seq": length, "frames": frames, "visual_tokens": tuple(f * tpf for f in frames)}  # type: ignore[dict-item]


def _has_qdq(onnx_path: Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def resolve_precision(requested: str, trt: Any, flavor: str, bundle: Bundle, gpu: GpuIdentity | None) -> str:
    """The precision a build will really use, or ``EngineBuildError`` saying why the request cannot be met."""
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    bundle_precision = bundle.manifest.precision
    if requested == "auto":
        if bundle_precision == "fp16" or has_fp16_flag:
            return "fp16"
        LOG.info("%s %s is strongly typed (no FP16 builder flag) and the bundle is %s: building %s "
                 "(export with --fp16 for an FP16 plan)", flavor, trt.__version__, bundle_precision, bundle_precision)
        return bundle_precision
    if requested == "fp16":
        if bundle_precision == "fp16" or has_fp16_flag:
            return "fp16"
        raise EngineBuildError(
            f"{flavor} {trt.__version__} takes precision from the ONNX types (no FP16 builder flag) and this "
            f"bundle is {bundle_precision}: re-export it with robometer-export --fp16, or build --precision fp32"
        )
    if requested == "fp32":
        if bundle_precision != "fp32":
            raise EngineBuildError(f"the bundle's weights are {bundle_precision}; an fp32 plan needs an fp32 export")
        return "fp32"
    # int8 / fp8: explicit quantization only
    if gpu is None:
        raise EngineBuildError(f"{requested} needs the target GPU present to check its tensor cores (none visible)")
    if gpu.sm < MIN_SM[requested]:
        raise EngineBuildError(
            f"{requested} is not supported on {gpu.name} (compute capability {gpu.compute_capability}; "
            f"{requested} needs >= {MIN_SM[requested] // 10}.{MIN_SM[requested] % 10})"
        )
    if not any(_has_qdq(bundle.part_path(p)) for p in PART_NAMES):
        raise EngineBuildError(
            f"{requested} needs explicitly quantized ONNX parts (QuantizeLinear/DequantizeLinear nodes, e.g. from "
            "NVIDIA ModelOpt); this bundle has none, and implicit calibration is not supported here"
        )
    return requested


def plan_file_name(part: str, key: EngineKey) -> str:
    """engines/<part>.<flavor>-<version>.<gpu>-<cc>.<precision>.plan"""
    return (f"engines/{part}.{key.runtime}-{slug(key.runtime_version)}.{slug(key.gpu_name)}-"
            f"{slug(key.compute_capability)}.{key.precision}.plan")


def build_part(
    bundle: Bundle,
    part: str,
    trt: Any,
    key: EngineKey,
    workspace_bytes: int,
    optimization_level: int | None = None,
    timing_cache_path: Path | None = None,
    compute_capabilities: Sequence[str] = (),
) -> EngineRecord:
    """Parse one ONNX part, build its plan with profiles from the manifest, write and return its record."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    weakly_typed_reduction = key.precision in ("fp16", "int8", "fp8") and hasattr(trt.BuilderFlag, "FP16")
    if not weakly_typed_reduction and hasattr(trt, "NetworkDefinitionCreationFlag") and hasattr(
        trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"
    ) and key.runtime == "tensorrt":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = bundle.part_path(part)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{onnx_path.name}: TensorRT's ONNX parser failed: " + " | ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    if weakly_typed_reduction:
        config.set_flag(trt.BuilderFlag.FP16)
        if key.precision == "int8" and hasattr(trt.BuilderFlag, "INT8"):
            config.set_flag(trt.BuilderFlag.INT8)
        if key.precision == "fp8" and hasattr(trt.BuilderFlag, "FP8"):
            config.set_flag(trt.BuilderFlag.FP8)
    if compute_capabilities:  # TensorRT-RTX ahead-of-time targets, e.g. SM89
        if not hasattr(config, "set_compute_capability"):
            raise EngineBuildError(f"{key.runtime} has no compute-capability targets (TensorRT-RTX only)")
        config.num_compute_capabilities = len(compute_capabilities)
        for index, cc in enumerate(compute_capabilities):
            target = getattr(trt.ComputeCapability, cc.upper(), None)
            if target is None:
                known = [n for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
                raise EngineBuildError(f"unknown compute capability {cc!r}; {key.runtime} knows {known}")
            config.set_compute_capability(target, index)

    ranges = axis_ranges(bundle, part)
    profile = builder.create_optimization_profile()
    profile_doc: dict[str, Any] = {}
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if all(d >= 0 for d in shape):
            continue
        dynamic = True
        spec = bundle.part(part).input(tensor.name)
        mins, opts, maxs = [], [], []
        for axis, dim in enumerate(shape):
            if dim >= 0:
                mins.append(dim), opts.append(dim), maxs.append(dim)
                continue
            name = spec.shape[axis]
            if not isinstance(name, str) or name not in ranges:
                raise EngineBuildError(f"{onnx_path.name}: input {tensor.name} axis {axis} is dynamic but the "
                                       f"manifest gives no range for it ({name!r})")
            lo, opt, hi = ranges[name]
            mins.append(lo), opts.append(opt), maxs.append(hi)
        profile.set_shape(tensor.name, mins, opts, maxs)
        profile_doc[tensor.name] = {"min": mins, "opt": opts, "max": maxs}
    if dynamic:
        config.add_optimization_profile(profile)

    cache = None
    if timing_cache_path is not None and hasattr(config, "create_timing_cache"):
        blob = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=True)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EngineBuildError(f"{onnx_path.name}: TensorRT failed to build the plan (see the log above)")
    rel = plan_file_name(part, key)
    out = bundle.root / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(memoryview(serialized)))
    tmp.replace(out)
    if cache is not None and timing_cache_path is not None:
        timing_cache_path.write_bytes(bytes(memoryview(cache.serialize())))
    return EngineRecord(
        part=part, file=rel, sha256=sha256_file(out), key=key, onnx_sha256=bundle.file_sha256(bundle.part(part).file),
        built_at=utc_now(), profiles=profile_doc, build_seconds=round(seconds, 3),
    )


def build_engines(
    bundle: Bundle,
    precision: str = "auto",
    parts: Sequence[str] | None = None,
    force: bool = False,
    workspace_gib: float = 4.0,
    optimization_level: int | None = None,
    flavor: str | None = None,
    device_index: int = 0,
    compute_capabilities: Sequence[str] = (),
    log: Any = print,
) -> list[BuildResult]:
    """Build (or keep, when current) the plans of ``parts`` (default: every part the bundle holds) for this
    machine; record them in the bundle."""
    if precision not in BUILD_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(BUILD_PRECISIONS)}")
    trt, flavor = import_tensorrt(flavor)
    gpu = gpu_identity(device_index)
    if gpu is None and flavor == "tensorrt":
        raise NoDeviceError("TensorRT needs the target GPU to build plans and none is visible "
                                      "(TensorRT-RTX can build ahead of time without one)")
    resolved = resolve_precision(precision, trt, flavor, bundle, gpu)
    key = engine_key(flavor, trt.__version__, gpu, resolved)
    if gpu is None and compute_capabilities:  # AOT plans are only valid on the targets they were built for
        key = EngineKey(key.runtime, key.runtime_version, key.gpu_name,
                        "aot-" + "-".join(sorted(c.upper() for c in compute_capabilities)), key.precision)
    log(f"building with {flavor} {trt.__version__} for {key.gpu_name} ({key.compute_capability}), {resolved}")
    # Timing caches record measured tactics: only meaningful (and only creatable) with the GPU present.
    timing_cache = None
    if gpu is not None:
        timing_cache = bundle.root / "engines" / f"timing_cache.{flavor}-{slug(trt.__version__)}.{slug(gpu.name)}.bin"
    results = []
    parts = list(bundle.manifest.parts) if parts is None else list(parts)
    for part in parts:
        if part not in bundle.manifest.parts:
            raise ValueError(f"unknown part {part!r}; this bundle's parts: {', '.join(bundle.manifest.parts)}")
        existing = bundle.find_engine(part, key)
        if existing is not None and not force:
            ok, why = bundle.engine_is_current(existing, verify_checksum=True)
            if ok:
                results.append(BuildResult(part, "current", existing, "plan is current"))
                log(f"{part}: current ({existing.file})")
                continue
            log(f"{part}: rebuilding, {why}")
        try:
            record = build_part(bundle, part, trt, key, int(workspace_gib * (1 << 30)), optimization_level,
                                timing_cache, compute_capabilities)
        except EngineBuildError as exc:
            results.append(BuildResult(part, "failed", None, str(exc)))
            log(f"{part}: FAILED: {exc}")
            continue
        bundle.record_engine(record)
        size = (bundle.root / record.file).stat().st_size
        results.append(BuildResult(part, "built", record, f"{size / 1e6:.1f} MB in {record.build_seconds:.1f} s"))
        log(f"{part}: built {record.file} ({size / 1e6:.1f} MB, {record.build_seconds:.1f} s)")
    return results


def build_parser() -> argparse.ArgumentParser:
    """The robometer-build-engines argument parser."""
    p = argparse.ArgumentParser(
        prog="robometer-build-engines",
        description="Build TensorRT plans of a bundle's ONNX parts for this GPU and cache them in the bundle.",
    )
    p.add_argument("bundle", help="bundle directory (written by robometer-export)")
    p.add_argument("--precision", choices=BUILD_PRECISIONS, default="auto",
                   help="auto = fp16 where the builder can, else the bundle's precision (default)")
    p.add_argument("--parts", nargs="+", choices=ALL_PART_NAMES, default=None,
                   help="parts to build (default: every part the bundle holds)")
    p.add_argument("--force", action="store_true", help="rebuild even when a current plan exists")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace limit (default 4 GiB)")
    p.add_argument("--optimization-level", type=int, choices=range(6), help="builder optimization level 0-5")
    p.add_argument("--tensorrt", choices=("tensorrt", "tensorrt_rtx"), help="force one TensorRT flavor")
    p.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    p.add_argument("--compute-capability", action="append", default=[], metavar="SMxx",
                   help="TensorRT-RTX ahead-of-time target (e.g. SM89); repeatable")
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="skip hashing the bundle's files when opening it (sizes are still checked)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``robometer-build-engines``; exit 1 when any part failed."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        bundle = Bundle.open(args.bundle, verify_checksums=not args.no_verify_checksums)
        results = build_engines(
            bundle, precision=args.precision, parts=args.parts, force=args.force, workspace_gib=args.workspace_gib,
            optimization_level=args.optimization_level, flavor=args.tensorrt, device_index=args.device,
            compute_capabilities=args.compute_capability,
        )
    except (BundleError, EngineBuildError, RuntimeUnavailableError, ValueError) as exc:
        print(f"robometer-build-engines: error: {exc}", file=sys.stderr)
        return 1
    failed = [r for r in results if r.status == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
