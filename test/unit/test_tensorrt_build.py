"""robometer-build-engines: the tiny bundle's parts parse and build with TensorRT-RTX on CPU (ahead of time),
plans are indexed by key with manifest-derived profiles, current plans are kept, stale ones rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures_bundle import copy_bundle
from robometer_ros.engine import tensorrt_build
from robometer_ros.engine.bundle import (
    ALL_PART_NAMES,
    PART_LANGUAGE,
    PART_LANGUAGE_PREFERENCE,
    PART_LANGUAGE_PREFIX,
    PART_LANGUAGE_SUFFIX,
    PART_VISION,
    Bundle,
)
from robometer_ros.engine.runtime import RuntimeUnavailableError, create_runtime
from robometer_ros.engine.trt_common import CPU_AOT_GPU

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed (requirements/core.txt has it)")


@pytest.fixture
def bundle(tiny_bundle, tmp_path: Path) -> Bundle:
    return Bundle.open(copy_bundle(tiny_bundle.path, tmp_path / "bundle"))


def test_axis_ranges_follow_the_manifest(tiny_bundle) -> None:
    m = tiny_bundle.bundle.manifest
    ranges = tensorrt_build.axis_ranges(tiny_bundle.bundle, PART_LANGUAGE)
    assert ranges["frames"] == (1, 8, 8)
    assert ranges["visual_tokens"] == (6, 48, 48)
    assert ranges["seq"] == (m.sequence.min_length, m.sequence.opt_length, m.sequence.max_length)
    pref = tensorrt_build.axis_ranges(tiny_bundle.bundle, PART_LANGUAGE_PREFERENCE)
    assert pref["frames"] == (2, 16, 16) and pref["visual_tokens"] == (12, 96, 96)
    p = m.prefix
    assert tensorrt_build.axis_ranges(tiny_bundle.bundle, PART_LANGUAGE_PREFIX) == {
        "prefix": (p.min_length, p.opt_length, p.max_length)}
    suffix = tensorrt_build.axis_ranges(tiny_bundle.bundle, PART_LANGUAGE_SUFFIX)
    assert suffix["suffix"] == (p.suffix_min_length, p.suffix_opt_length, p.suffix_max_length)
    assert suffix["suffix_frames"] == (1, 7, 7) and suffix["suffix_visual_tokens"] == (6, 42, 42)
    assert suffix["batch"] == (1, 1, 16) and suffix["prefix"] == (p.min_length, p.opt_length, p.max_length)


@pytest.mark.slow
def test_builds_every_part_on_cpu_and_reuses_current_plans(bundle: Bundle) -> None:
    logs: list[str] = []
    results = tensorrt_build.build_engines(bundle, flavor="tensorrt_rtx", log=logs.append)
    assert [r.status for r in results] == ["built"] * 5, [r.message for r in results]
    records = {r.part: r for r in bundle.engines()}
    assert set(records) == set(ALL_PART_NAMES)  # every part the bundle holds, the prefix-reuse parts included
    for part, record in records.items():
        assert record.key.runtime == "tensorrt_rtx" and record.key.runtime_version == trt.__version__
        assert record.key.gpu_name == CPU_AOT_GPU
        assert record.key.precision == "fp32"  # strongly typed builder + fp32 bundle
        assert (bundle.root / record.file).stat().st_size > 100_000
        assert record.onnx_sha256 == bundle.file_sha256(f"onnx/{part}.onnx")
    assert records[PART_VISION].profiles == {}  # fixed shapes
    m = bundle.manifest
    profile = records[PART_LANGUAGE].profiles
    assert profile["input_ids"] == {"min": [1, m.sequence.min_length], "opt": [1, m.sequence.opt_length],
                                    "max": [1, m.sequence.max_length]}
    assert profile["deepstack_embeds"]["max"] == [1, 48, 64]
    assert profile["prog_positions"] == {"min": [1], "opt": [8], "max": [8]}
    suffix = records[PART_LANGUAGE_SUFFIX].profiles
    assert suffix["visual_embeds"] == {"min": [1, 6, 64], "opt": [1, 42, 64], "max": [16, 42, 64]}
    assert suffix["past_keys"]["max"] == [2, 1, 2, m.prefix.max_length, 16]

    # a second run keeps the current plans
    again = tensorrt_build.build_engines(bundle, flavor="tensorrt_rtx", parts=[PART_VISION], log=logs.append)
    assert again[0].status == "current"
    # --force rebuilds
    forced = tensorrt_build.build_engines(bundle, flavor="tensorrt_rtx", parts=[PART_VISION], force=True,
                                          log=logs.append)
    assert forced[0].status == "built"
    # a re-exported ONNX part (new checksum in the manifest) makes its plan stale
    doc = json.loads((bundle.root / "manifest.json").read_text())
    doc["files"]["onnx/vision.onnx"]["sha256"] = "f" * 64
    (bundle.root / "manifest.json").write_text(json.dumps(doc))
    reopened = Bundle.open(bundle.root, verify_checksums=False)
    rebuilt = tensorrt_build.build_engines(reopened, flavor="tensorrt_rtx", parts=[PART_VISION], log=logs.append)
    assert rebuilt[0].status == "built"
    assert any("ONNX checksum differs" in line for line in logs)
    assert len(reopened.engines()) == 5  # replaced, not added

    # plans exist, but without a GPU the auto backend must not pick TensorRT
    assert create_runtime(reopened, "auto", intra_op_threads=1).backend_name.startswith("onnxruntime:")
    with pytest.raises(RuntimeUnavailableError, match=r"no CUDA GPU|not importable"):
        create_runtime(reopened, "tensorrt")


def test_precision_requests_that_cannot_be_met(bundle: Bundle) -> None:
    with pytest.raises(tensorrt_build.EngineBuildError, match="re-export it with robometer-export --fp16"):
        tensorrt_build.resolve_precision("fp16", trt, "tensorrt_rtx", bundle, None)
    with pytest.raises(tensorrt_build.EngineBuildError, match="needs the target GPU"):
        tensorrt_build.resolve_precision("int8", trt, "tensorrt_rtx", bundle, None)
    from robometer_ros.engine.trt_common import GpuIdentity

    with pytest.raises(tensorrt_build.EngineBuildError, match=r"fp8 is not supported on .*8\.6.*>= 8\.9"):
        tensorrt_build.resolve_precision("fp8", trt, "tensorrt_rtx", bundle, GpuIdentity("NVIDIA RTX A6000", "8.6"))
    with pytest.raises(tensorrt_build.EngineBuildError, match=r"Q/DQ|QuantizeLinear"):
        tensorrt_build.resolve_precision("fp8", trt, "tensorrt_rtx", bundle, GpuIdentity("NVIDIA H100", "9.0"))
    assert tensorrt_build.resolve_precision("auto", trt, "tensorrt_rtx", bundle, None) == "fp32"


def test_cli_reports_errors(tmp_path: Path, capsys) -> None:
    assert tensorrt_build.main([str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_aot_targets_are_part_of_the_key_and_matched_at_runtime(bundle: Bundle, monkeypatch) -> None:
    from robometer_ros.engine import trt_runtime
    from robometer_ros.engine.trt_common import GpuIdentity

    results = tensorrt_build.build_engines(bundle, flavor="tensorrt_rtx", parts=[PART_VISION, PART_LANGUAGE],
                                           compute_capabilities=["SM89"], log=lambda *_: None)
    assert [r.status for r in results] == ["built", "built"]
    assert {r.key.compute_capability for r in bundle.engines()} == {"aot-SM89"}
    bad = tensorrt_build.build_engines(bundle, flavor="tensorrt_rtx", parts=[PART_VISION],
                                       compute_capabilities=["SM99"], log=lambda *_: None)
    assert bad[0].status == "failed" and "unknown compute capability 'SM99'" in bad[0].message

    monkeypatch.setattr(trt_runtime, "gpu_identity", lambda index=0: GpuIdentity("NVIDIA GeForce RTX 4090", "8.9"))
    plans = trt_runtime.find_usable_engines(bundle)
    assert plans is not None and set(plans) == {PART_VISION, PART_LANGUAGE}
    monkeypatch.setattr(trt_runtime, "gpu_identity", lambda index=0: GpuIdentity("NVIDIA RTX A6000", "8.6"))
    assert trt_runtime.find_usable_engines(bundle) is None  # built for SM89 only
    assert trt_runtime.find_usable_engines(bundle, precision="fp16") is None
