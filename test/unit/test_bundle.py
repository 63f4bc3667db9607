"""Bundle validation: a good bundle opens; each kind of damage raises BundleError naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures_bundle import TINY_FRAME_SIZE, copy_bundle
from robometer_ros.engine.bundle import (
    ALL_PART_NAMES,
    PART_LANGUAGE,
    PART_LANGUAGE_PREFIX,
    PART_LANGUAGE_SUFFIX,
    PART_VISION,
    SCHEMA_VERSION,
    Bundle,
    BundleError,
    EngineKey,
    EngineRecord,
    sha256_file,
    utc_now,
)


def _edit_manifest(root: Path, edit) -> None:
    path = root / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path: Path) -> Path:
    return copy_bundle(tiny_bundle.path, tmp_path / "bundle")


def test_open_reads_manifest(tiny_bundle) -> None:
    b = Bundle.open(tiny_bundle.path)
    m = b.manifest
    assert m.schema_version == SCHEMA_VERSION
    assert (m.frame.height, m.frame.width) == TINY_FRAME_SIZE
    assert m.frame.grid_thw == (1, 4, 6)
    assert m.frame.tokens_per_frame == 6
    assert m.num_frames == 8 and m.progress_bins == 10
    assert m.hidden_size == 64 and m.num_deepstack == 1
    assert set(m.parts) == set(ALL_PART_NAMES) and b.has_prefix_parts
    # token ids come from the tokenizer, never hard-coded
    tok = tiny_bundle.tokenizer
    assert m.special_tokens["prog_token"] == tok.token_to_id("<|prog_token|>")
    assert m.special_tokens["image_pad"] == tok.token_to_id("<|image_pad|>")
    vision = b.part(PART_VISION)
    assert vision.inputs[0].shape == (24, 1536)
    assert [t.name for t in vision.outputs] == ["visual_embeds", "deepstack_embeds"]
    language = b.part(PART_LANGUAGE)
    assert language.input("input_ids").dynamic_axes == {1: "seq"}
    assert language.input("visual_embeds").shape == ("visual_tokens", 64)
    prefix, suffix = b.part(PART_LANGUAGE_PREFIX), b.part(PART_LANGUAGE_SUFFIX)
    assert prefix.input("visual_embeds").shape == (6, 64)  # one frame
    assert [t.shape for t in prefix.outputs] == [(1, 10), (1,), (2, 1, 2, "prefix", 16), (2, 1, 2, "prefix", 16)]
    assert suffix.input("deepstack_embeds").shape == ("batch", 1, "suffix_visual_tokens", 64)
    assert suffix.input("past_keys").shape == (2, 1, 2, "prefix", 16)
    assert [t.shape for t in suffix.outputs] == [("batch", "suffix_frames", 10), ("batch", "suffix_frames")]
    pre = m.prefix
    assert pre is not None and pre.min_length <= pre.opt_length <= pre.max_length
    assert pre.suffix_min_length < pre.suffix_opt_length <= pre.suffix_max_length and pre.max_batch == 16
    # prefix + suffix of the longest prompt is the full prompt's longest length (the prefix limit has its margin)
    assert pre.max_length + pre.suffix_max_length == m.sequence.max_length
    seq = m.sequence
    assert seq.min_length <= seq.opt_length <= seq.max_length
    assert seq.preference_min_length <= seq.preference_opt_length <= seq.preference_max_length
    # every exported file has a checksum, and it is right
    for rel in ("tokenizer.json", "onnx/vision.onnx", "onnx/language.onnx", "onnx/language_preference.onnx"):
        assert m.files[rel]["sha256"] == sha256_file(tiny_bundle.path / rel)


def test_missing_directory_and_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.open(tmp_path / "nope")
    with pytest.raises(BundleError, match=r"missing manifest\.json"):
        Bundle.open(tmp_path)


def test_invalid_json(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(bundle_copy)


def test_unknown_schema_version(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d.update(schema_version=99))
    with pytest.raises(BundleError, match="unknown schema_version 99"):
        Bundle.open(bundle_copy)


def _as_schema_1(doc: dict) -> None:
    """What robometer-export wrote before prefix reuse: the three plain parts, no prefix ranges."""
    doc["schema_version"] = 1
    for name in (PART_LANGUAGE_PREFIX, PART_LANGUAGE_SUFFIX):
        del doc["parts"][name]
    del doc["prefix"]


def test_schema_1_bundles_still_open(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, _as_schema_1)
    bundle = Bundle.open(bundle_copy)
    assert bundle.manifest.schema_version == 1 and bundle.manifest.prefix is None
    assert not bundle.has_prefix_parts and set(bundle.manifest.parts) == {"vision", "language", "language_preference"}


@pytest.mark.parametrize("damage, message", [
    (lambda d: d.update(schema_version=1), r"parts \['language_prefix', 'language_suffix'\] need schema_version 2"),
    (lambda d: d["parts"].pop(PART_LANGUAGE_SUFFIX), "comes with language_prefix and language_suffix"),
    (lambda d: d.pop("prefix"), "the prefix field and the parts language_prefix, language_suffix come together"),
    (lambda d: d["prefix"].update(max_batch=0), r"field prefix\.max_batch must be >= 1"),
    (lambda d: d["parts"].update(extra=d["parts"]["language"]), r"unknown parts \['extra'\]"),
])
def test_prefix_parts_are_validated(bundle_copy: Path, damage, message: str) -> None:
    _edit_manifest(bundle_copy, damage)
    with pytest.raises(BundleError, match=message):
        Bundle.open(bundle_copy)


def test_missing_field_is_named(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d["frame"].pop("height"))
    with pytest.raises(BundleError, match=r"field frame\.height is missing"):
        Bundle.open(bundle_copy)


def test_wrong_field_type_is_named(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d.update(num_frames="eight"))
    with pytest.raises(BundleError, match="field num_frames must be an integer"):
        Bundle.open(bundle_copy)


def test_missing_file(bundle_copy: Path) -> None:
    (bundle_copy / "onnx" / "vision.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing file onnx/vision\.onnx"):
        Bundle.open(bundle_copy)


def test_checksum_mismatch_same_size(bundle_copy: Path) -> None:
    path = bundle_copy / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\t")  # same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch for tokenizer\.json"):
        Bundle.open(bundle_copy)
    # the fast path skips hashing but still opens
    assert Bundle.open(bundle_copy, verify_checksums=False).model_id == "robometer-tiny-test"


def test_size_change_caught_without_hashing(bundle_copy: Path) -> None:
    with open(bundle_copy / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match=r"tokenizer\.json is \d+ bytes but the manifest records"):
        Bundle.open(bundle_copy, verify_checksums=False)


def test_shape_mismatch_between_manifest_and_onnx(bundle_copy: Path) -> None:
    def edit(d):
        d["parts"]["vision"]["inputs"][0]["shape"] = [99, 1536]

    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=r"shape mismatch for input 'pixel_values'.*\[24, 1536\].*\[99, 1536\]"):
        Bundle.open(bundle_copy)


def test_dynamic_axis_declared_fixed_is_a_mismatch(bundle_copy: Path) -> None:
    def edit(d):
        d["parts"]["language"]["inputs"][0]["shape"] = [1, 200]

    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match="shape mismatch for input 'input_ids'"):
        Bundle.open(bundle_copy)


def test_dtype_mismatch(bundle_copy: Path) -> None:
    def edit(d):
        d["parts"]["language"]["inputs"][5]["dtype"] = "int64"  # visual_mask is bool

    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match="'visual_mask' has dtype bool in the ONNX graph but int64"):
        Bundle.open(bundle_copy)


def test_io_name_mismatch(bundle_copy: Path) -> None:
    def edit(d):
        d["parts"]["vision"]["outputs"][0]["name"] = "features"

    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match="outputs names"):
        Bundle.open(bundle_copy)


def test_path_escaping_the_bundle_is_refused(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d["tokenizer"].update(file="../tokenizer.json"))
    with pytest.raises(BundleError, match="must be relative to the bundle"):
        Bundle.open(bundle_copy)


def test_frame_size_must_fit_patch_grid(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d["frame"].update(height=70))
    with pytest.raises(BundleError, match="not a multiple of patch_size\\*merge_size = 32"):
        Bundle.open(bundle_copy)


def test_engine_index_round_trip_and_staleness(bundle_copy: Path) -> None:
    b = Bundle.open(bundle_copy)
    assert b.engines() == []
    key = EngineKey("tensorrt", "10.9.0", "NVIDIA RTX 4090", "8.9", "fp16")
    plan = bundle_copy / "engines" / "vision.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"plan bytes")
    record = EngineRecord(part=PART_VISION, file="engines/vision.plan", sha256=sha256_file(plan), key=key,
                          onnx_sha256=b.file_sha256("onnx/vision.onnx"), built_at=utc_now())
    b.record_engine(record)
    b.record_engine(record)  # same part + key: replaced, not duplicated
    assert len(b.engines()) == 1
    found = b.find_engine(PART_VISION, key)
    assert found is not None and found.key == key
    assert b.find_engine(PART_VISION, EngineKey("tensorrt", "10.9.0", "NVIDIA RTX 4090", "8.9", "fp32")) is None
    assert b.engine_is_current(found, verify_checksum=True) == (True, "current")
    plan.write_bytes(b"other bytes")
    ok, why = b.engine_is_current(found, verify_checksum=True)
    assert not ok and "does not match its recorded sha256" in why
    stale = EngineRecord(**{**record.__dict__, "onnx_sha256": "0" * 64})
    ok, why = b.engine_is_current(stale)
    assert not ok and "ONNX checksum differs" in why
    plan.unlink()
    ok, why = b.engine_is_current(found)
    assert not ok and "missing" in why
    # engines are not part of the manifest's checksummed files: the bundle still opens
    Bundle.open(bundle_copy)


def test_corrupt_engine_index(bundle_copy: Path) -> None:
    (bundle_copy / "engines").mkdir()
    (bundle_copy / "engines" / "index.json").write_text(json.dumps({"schema_version": 7, "engines": []}))
    with pytest.raises(BundleError, match="unknown engine index schema_version 7"):
        Bundle.open(bundle_copy).engines()


def test_describe_cli(tiny_bundle, bundle_copy: Path, capsys) -> None:
    from robometer_ros.engine.bundle import main

    assert main([str(tiny_bundle.path)]) == 0
    out = capsys.readouterr().out
    assert "frame 64x96, grid (1, 4, 6), 6 tokens/frame" in out and "engines: none" in out
    assert "prefix reuse: prefix" in out and "language_suffix: onnx/language_suffix.onnx" in out
    (bundle_copy / "onnx" / "vision.onnx").unlink()
    assert main([str(bundle_copy), "--no-verify-checksums"]) == 1
    assert "invalid bundle" in capsys.readouterr().err
