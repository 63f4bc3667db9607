"""robometer-export: graph hygiene, the in-exporter parity check (it passes, and it can fail), external
data, the CLI on a checkpoint in the released layout, and torch vs ONNX Runtime parity per part."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fixtures_bundle import TINY_FRAME_SIZE, TINY_INSTRUCTION, build_mid_bundle, build_tiny_bundle, random_frames
from robometer_ros.engine.bundle import ALL_PART_NAMES, Bundle, BundleError
from robometer_ros.model.checkpoint import save_checkpoint
from robometer_ros.model.prompt import PromptBuilder
from robometer_ros.preprocess import FramePreprocessor
from robometer_ros.training.export import onnx_export

torch.set_num_threads(1)

# fp32 ONNX Runtime vs fp32 PyTorch on the tiny model: observed max |diff| ~ 5e-7
ATOL = 1e-5


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_graphs_have_no_data_dependent_ops(tiny_bundle) -> None:
    assert set(tiny_bundle.bundle.manifest.parts) == set(ALL_PART_NAMES)
    for part in ALL_PART_NAMES:
        model = onnx.load(str(tiny_bundle.bundle.part_path(part)), load_external_data=False)
        ops = {node.op_type for node in model.graph.node}
        assert "NonZero" not in ops, part  # TensorRT's parser rejects it; the layout is gathered by index
        # a boolean index_put (deepstack / visual merge) would export as ScatterND; the only ScatterNDs
        # allowed are M-RoPE's static interleave slices inside the rotary embedding
        scatters = [n.name for n in model.graph.node if n.op_type == "ScatterND"]
        assert all(name.startswith("/rotary_emb/") for name in scatters), (part, scatters)
        assert model.opset_import[0].version == onnx_export.OPSET


def test_parity_check_passes_on_the_exported_bundle(tiny_bundle) -> None:
    builder = PromptBuilder(tiny_bundle.tokenizer)
    reports = onnx_export.parity_check(tiny_bundle.model, tiny_bundle.path / "onnx", builder,
                                  tiny_bundle.bundle.manifest.frame, 8, "fp32", log=lambda *_: None,
                                  prefix_parts=True)
    assert len(reports) == 6 and reports[-1].case.startswith("language_prefix + language_suffix vs language")
    assert all(r.ok for r in reports), [str(r) for r in reports]
    assert max(max(r.diffs.values()) for r in reports) < ATOL


def test_parity_check_detects_a_different_model(tiny_bundle) -> None:
    model = copy.deepcopy(tiny_bundle.model)
    with torch.no_grad():
        model.progress_head[-1].bias.add_(0.5)  # only the progress logits change
    builder = PromptBuilder(tiny_bundle.tokenizer)
    reports = onnx_export.parity_check(model, tiny_bundle.path / "onnx", builder, tiny_bundle.bundle.manifest.frame, 8,
                                  "fp32", log=lambda *_: None, prefix_parts=True)
    vision = [r for r in reports if r.case.startswith("vision")]
    language = [r for r in reports if not r.case.startswith("vision")]
    assert all(r.ok for r in vision)
    assert not any(r.ok for r in language)
    assert all(r.diffs["progress_logits"] > 0.4 for r in language)


def test_failed_parity_fails_the_export_and_leaves_no_bundle(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(onnx_export.TOLERANCES, "fp32", (-1.0, 0.0))  # nothing can pass
    with pytest.raises(onnx_export.ExportError, match="ONNX Runtime disagrees with PyTorch"):
        build_tiny_bundle(tmp_path / "b", include_checkpoint=False)
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []  # the staging directory is gone too


@pytest.mark.slow
def test_external_data_export(tmp_path: Path) -> None:
    tiny = build_tiny_bundle(tmp_path / "b", include_checkpoint=False, external_data=True)
    m = tiny.bundle.manifest
    assert m.parts["vision"].external_data == ("vision.onnx.data",)
    assert m.parts["language"].external_data == ("language.onnx.data",)
    # the preference part reuses the language part's weight file; only its own head is stored again
    assert m.parts["language_preference"].external_data == ("language.onnx.data", "language_preference.onnx.data")
    sizes = {rel: entry["size"] for rel, entry in m.files.items()}
    assert sizes["onnx/language_preference.onnx.data"] < sizes["onnx/language.onnx.data"] / 10
    for part in ("language_prefix", "language_suffix"):  # the prefix parts share the decoder weights too
        assert m.parts[part].external_data[0] == "language.onnx.data"
        assert sizes.get(f"onnx/{part}.onnx.data", 0) < sizes["onnx/language.onnx.data"] / 10
    # and still computes the same thing (the exporter's parity check ran on the shared files; run it again)
    reports = onnx_export.parity_check(tiny.model, tmp_path / "b" / "onnx", PromptBuilder(tiny.tokenizer), m.frame, 8,
                                  "fp32", log=lambda *_: None, prefix_parts=True)
    assert all(r.ok for r in reports)
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        pass
    else:  # TensorRT's parser follows external data into both files
        from robometer_ros.engine.tensorrt_build import build_engines

        results = build_engines(tiny.bundle, parts=["language_preference"], flavor="tensorrt_rtx", log=lambda *_: None)
        assert results[0].status == "built", results[0].message
    (tmp_path / "b" / "onnx" / "language.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"missing file onnx/language\.onnx\.data"):
        Bundle.open(tmp_path / "b")


def test_vision_part_parity(tiny_bundle) -> None:
    frame = tiny_bundle.bundle.manifest.frame
    prep = FramePreprocessor(frame.height, frame.width)
    session = _session(tiny_bundle.bundle.part_path("vision"))
    for image in random_frames(3, seed=1):
        pixels = prep(image)
        with torch.no_grad():
            visual, deepstack = tiny_bundle.model.encode_frame(torch.from_numpy(pixels), frame.grid_thw)
        got_visual, got_deepstack = session.run(None, {"pixel_values": pixels})
        np.testing.assert_allclose(got_visual, visual.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(got_deepstack, deepstack.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_frames", [1, 3, 8])
def test_language_part_parity_over_frame_counts(tiny_bundle, num_frames: int) -> None:
    model, frame = tiny_bundle.model, tiny_bundle.bundle.manifest.frame
    builder = PromptBuilder(tiny_bundle.tokenizer)
    layout = builder.progress(TINY_INSTRUCTION, [frame.grid_thw] * num_frames)
    rng = np.random.default_rng(num_frames)
    v = layout.num_visual_tokens
    feed = {
        "input_ids": layout.input_ids, "position_ids": layout.position_ids,
        "visual_embeds": rng.standard_normal((v, 64)).astype(np.float32),
        "deepstack_embeds": rng.standard_normal((1, v, 64)).astype(np.float32),
        "visual_index": layout.visual_index, "visual_mask": layout.visual_mask,
        "prog_positions": layout.prog_positions,
    }
    with torch.no_grad():
        ref = model.forward_language(*(torch.from_numpy(feed[n]) for n in onnx_export.LANGUAGE_INPUTS))
    got = _session(tiny_bundle.bundle.part_path("language")).run(None, feed)
    assert got[0].shape == (num_frames, 10)
    np.testing.assert_allclose(got[0], ref["progress_logits"].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[1], ref["success_logits"].numpy(), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_cli_exports_a_checkpoint(tiny_bundle, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "ckpt"
    save_checkpoint(tiny_bundle.model, tiny_bundle.tokenizer, ckpt)
    out = tmp_path / "bundle"
    h, w = TINY_FRAME_SIZE
    assert onnx_export.main([str(ckpt), str(out), "--frame-size", f"{h}x{w}", "--model-id", "cli-test",
                        "--num-frames", "4"]) == 0
    b = Bundle.open(out)
    assert b.model_id == "cli-test" and b.manifest.num_frames == 4
    assert "parity ok" in capsys.readouterr().out
    # the same weights: the exported vision part matches the in-memory model
    pixels = FramePreprocessor(h, w)(random_frames(1, seed=3)[0])
    got = _session(b.part_path("vision")).run(["visual_embeds"], {"pixel_values": pixels})[0]
    with torch.no_grad():
        ref = tiny_bundle.model.encode_frame(torch.from_numpy(pixels), b.manifest.frame.grid_thw)[0].numpy()
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    # an existing bundle is not overwritten without --overwrite
    assert onnx_export.main([str(ckpt), str(out), "--frame-size", f"{h}x{w}"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_cli_takes_the_frame_size_a_checkpoint_was_trained_at(tiny_bundle, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    save_checkpoint(tiny_bundle.model, tiny_bundle.tokenizer, ckpt)
    h, w = TINY_FRAME_SIZE
    (ckpt / "training.json").write_text(json.dumps({"frame_size": [h, w], "num_frames": 8}))
    assert onnx_export.main([str(ckpt), str(tmp_path / "bundle"), "--num-frames", "4"]) == 0
    frame = Bundle.open(tmp_path / "bundle").manifest.frame
    assert (frame.height, frame.width) == (h, w) != onnx_export.DEFAULT_FRAME_SIZE


def test_cli_rejects_a_frame_size_off_the_patch_grid(tiny_bundle, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "ckpt"
    save_checkpoint(tiny_bundle.model, tiny_bundle.tokenizer, ckpt)
    assert onnx_export.main([str(ckpt), str(tmp_path / "b"), "--frame-size", "70x96"]) == 1
    assert "multiples of 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        onnx_export.main([str(ckpt), str(tmp_path / "b"), "--frame-size", "big"])


@pytest.mark.slow
def test_cli_released_layout_needs_the_base_model_tokenizer(tiny_bundle, tmp_path: Path, capsys) -> None:
    """The released checkpoint: bf16 shards, no tokenizer files; the tokenizer comes from --base-model."""
    from robometer_ros.model.tokenizer import save_tokenizer

    ckpt = tmp_path / "released"
    save_checkpoint(tiny_bundle.model, None, ckpt, shard_size=400_000, dtype=torch.bfloat16)
    assert (ckpt / "model.safetensors.index.json").is_file() and not (ckpt / "tokenizer.json").exists()
    base = tmp_path / "qwen3vl-base"
    save_tokenizer(tiny_bundle.tokenizer, base)
    h, w = TINY_FRAME_SIZE
    assert onnx_export.main([str(ckpt), str(tmp_path / "b1"), "--frame-size", f"{h}x{w}"]) == 1
    assert "pass --base-model DIR" in capsys.readouterr().err
    assert onnx_export.main([str(ckpt), str(tmp_path / "b2"), "--frame-size", f"{h}x{w}", "--base-model", str(base),
                        "--include-checkpoint"]) == 0
    b = Bundle.open(tmp_path / "b2")
    assert b.checkpoint_path is not None and (b.checkpoint_path / "tokenizer.json").is_file()
    assert b.manifest.special_tokens["prog_token"] == tiny_bundle.tokenizer.token_to_id("<|prog_token|>")


def test_pack_external_data_streams_per_tensor_files(tiny_bundle, tmp_path: Path) -> None:
    """A > 2 GB legacy export arrives as one file per tensor; packing gives one aligned .data file, same bytes."""
    original = onnx.load(str(tiny_bundle.bundle.part_path("language")))
    want = {i.name: onnx.numpy_helper.to_array(i) for i in original.graph.initializer}
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    onnx.save_model(original, str(split_dir / "language.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(split_dir.iterdir())) > 10
    out = tmp_path / "packed" / "language.onnx"
    out.parent.mkdir()
    split = onnx.load(str(split_dir / "language.onnx"), load_external_data=False)
    onnx_export._pack_external_data(split, split_dir, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["language.onnx", "language.onnx.data"]
    packed = onnx.load(str(out))
    got = {i.name: onnx.numpy_helper.to_array(i) for i in packed.graph.initializer}
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("num_frames, batch", [(2, 1), (4, 3), (8, 2)])
def test_prefix_parts_equal_the_language_part_in_onnxruntime(tiny_bundle, num_frames: int, batch: int) -> None:
    """ORT language_prefix once + language_suffix on a batch == ORT language on each prompt, <= 1e-5 (fp32),
    over frame counts, batch sizes and a prefix length the parts were not traced at."""
    from robometer_ros.model.prompt import split_after_first_frame

    b, frame = tiny_bundle.bundle, tiny_bundle.bundle.manifest.frame
    layout = PromptBuilder(tiny_bundle.tokenizer).progress("fold the towel in half", [frame.grid_thw] * num_frames)
    split = split_after_first_frame(layout)
    rng = np.random.default_rng(num_frames * 10 + batch)
    first = (rng.standard_normal((6, 64)).astype(np.float32), rng.standard_normal((1, 6, 64)).astype(np.float32))
    rest = [(rng.standard_normal(((num_frames - 1) * 6, 64)).astype(np.float32),
             rng.standard_normal((1, (num_frames - 1) * 6, 64)).astype(np.float32)) for _ in range(batch)]
    language = _session(b.part_path("language"))
    plain = [language.run(None, {
        "input_ids": layout.input_ids, "position_ids": layout.position_ids,
        "visual_embeds": np.concatenate([first[0], v]), "deepstack_embeds": np.concatenate([first[1], d], 1),
        "visual_index": layout.visual_index, "visual_mask": layout.visual_mask, "prog_positions": layout.prog_positions,
    }) for v, d in rest]
    progress, success, keys, values = _session(b.part_path("language_prefix")).run(None, {
        "input_ids": split.prefix_input_ids, "position_ids": split.prefix_position_ids, "visual_embeds": first[0],
        "deepstack_embeds": first[1], "visual_index": split.prefix_visual_index,
        "visual_mask": split.prefix_visual_mask,
    })
    assert keys.shape == (2, 1, 2, split.prefix_length, 16)
    suffix_progress, suffix_success = _session(b.part_path("language_suffix")).run(None, {
        "input_ids": split.suffix_input_ids, "position_ids": split.suffix_position_ids,
        "visual_embeds": np.stack([v for v, _ in rest]), "deepstack_embeds": np.stack([d for _, d in rest]),
        "visual_index": split.suffix_visual_index, "visual_mask": split.suffix_visual_mask,
        "prog_positions": split.suffix_prog_positions, "past_keys": keys, "past_values": values,
    })
    assert suffix_progress.shape == (batch, num_frames - 1, 10)
    for row, (plain_progress, plain_success) in enumerate(plain):
        np.testing.assert_allclose(np.concatenate([progress, suffix_progress[row]]), plain_progress, atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.concatenate([success, suffix_success[row]]), plain_success, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def mid_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return build_mid_bundle(tmp_path_factory.mktemp("mid") / "bundle")


@pytest.mark.slow
def test_prefix_reuse_equals_the_plain_language_part_on_the_mid_config(mid_bundle: Bundle) -> None:
    """The mid config in ONNX Runtime through the RewardEngine: language_prefix + language_suffix (one score per
    step, and score_batch) == the plain language part over an episode's steps, <= 1e-5 (fp32). The tiny config
    is covered by the test above and test_reward_engine; torch on both configs by test_model."""
    from robometer_ros.engine.reward_engine import RewardEngine
    from robometer_ros.episode import subsample_indices

    def engine(prefix_reuse: bool) -> RewardEngine:
        return RewardEngine(mid_bundle, backend="onnxruntime", providers=["CPUExecutionProvider"],
                            intra_op_threads=1, prefix_reuse=prefix_reuse)

    plain, reuse = engine(False), engine(True)
    assert reuse.prefix_reuse and not plain.prefix_reuse
    steps = 10
    for i, image in enumerate(random_frames(steps, seed=4)):
        plain.add_frame(i, image)
        reuse.add_frame(i, image)
    lists = [subsample_indices(t + 1, mid_bundle.manifest.num_frames) for t in range(1, steps)]
    want = [plain.score(TINY_INSTRUCTION, ids) for ids in lists]
    got = [reuse.score(TINY_INSTRUCTION, ids) for ids in lists]
    batched = reuse.score_batch(TINY_INSTRUCTION, lists, batch_size=3)  # subsample_indices pads: one list length
    assert reuse.cached_prefixes() == [(TINY_INSTRUCTION, 0)]
    for a, ref in [*zip(got, want, strict=True), *zip(batched, want, strict=True)]:
        np.testing.assert_allclose(a.progress_logits, ref.progress_logits, atol=ATOL, rtol=0)
        np.testing.assert_allclose(a.success_logits, ref.success_logits, atol=ATOL, rtol=0)
    plain.close()
    reuse.close()
