"""Compatibility with the RELEASED Robometer-4B, offline.

1. Real vocabulary: the Qwen3-VL tokenizer built from the real Qwen BPE ranks (dashscope 2.0.2 wheel,
   robometer_ros/model/qwen_vocab.py) gives the released ids (26 Qwen3-VL specials at 151643..151668, the
   five Robometer tokens at 151669..151673, 151674 rows), and our PromptBuilder's ids equal what the
   official path builds: transformers' chat template over the official conversation, the Qwen3-VL processor
   expanding the image pads for real 240x320 camera frames, the whole string tokenized at once; and equal
   tiktoken's encoding (the tokenizer's original implementation). M-RoPE ids equal get_rope_index.
2. A tiny model saved in the released layout (RFM config.json as transformers 4.57 writes it, config.yaml,
   bf16 shards + index, no tokenizer) + a base-model directory -> ``robometer-export --base-model`` ->
   Bundle.open -> RewardEngine(onnxruntime) equals the torch reference forward on processor-built inputs.

Skipped, saying why, only when the dashscope wheel is not in the test-data directory (scripts/setup_venv.sh
downloads it) or tiktoken is missing.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tempfile
import types
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from robometer_ros.model import prompt as P
from robometer_ros.model import qwen_vocab
from robometer_ros.model.config import (
    QWEN3VL_SPECIAL_TOKENS,
    ROBOMETER_SPECIAL_TOKENS,
    robometer_4b_config,
    tiny_config,
)
from robometer_ros.model.prompt import PromptBuilder
from robometer_ros.model.tokenizer import backbone_token_ids, load_tokenizer, qwen3vl_chat_template
from robometer_ros.preprocess import MAX_PIXELS, MIN_PIXELS

torch.set_num_threads(1)

tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is not installed (requirements/dev.txt pins it)")
SKIP_REASON = (
    f"{qwen_vocab.DASHSCOPE_WHEEL} not found in {qwen_vocab.default_testdata_dir()} (scripts/setup_venv.sh "
    "downloads it; or pip download --no-deps dashscope==2.0.2 -d DIR and set ROBOMETER_ROS_TESTDATA=DIR)"
)

FIRST_SPECIAL_ID = 151643
RELEASED_VOCAB = 151674
CAMERA = (240, 320)  # ~240 px short side, as the training videos; the processor rounds it to 256x320
GRID = (1, 16, 20)  # 256x320 -> 16x20 patches -> 8x10 = 80 visual tokens per frame

# Text the builder joins with the template's pieces: quotes and apostrophes next to the instruction's own,
# digits (Qwen splits every digit), non-ASCII, emoji, a trailing space before the closing quote, a newline,
# a decomposed (NFD) accent the normalizer must compose, and the empty instruction.
INSTRUCTIONS = [
    "pick up the red block and put it in the bowl",
    "put the robot's cup on the 'top' shelf",
    "move 3 cubes 12.5 cm left, then 10cm right",
    "place the crème brûlée on the plate ",
    "把红色方块放进碗里",
    "Don't knock over the 🍺 can!!",
    "open the drawer\nthen close it",
    "cafe\u0301 table",
    "",
]


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def qwen_source() -> Path:
    """The dashscope wheel with the real Qwen vocabulary; every test that needs it skips without it."""
    source = qwen_vocab.find_qwen_vocab()
    if source is None:
        pytest.skip(SKIP_REASON)
    return source


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, qwen_source) -> Path:
    """An offline stand-in for Qwen/Qwen3-VL-4B-Instruct's tokenizer files (no Robometer tokens)."""
    out = tmp_path_factory.mktemp("Qwen3-VL-4B-Instruct")
    qwen_vocab.write_base_tokenizer_dir(qwen_source, out)
    (out / "chat_template.jinja").unlink()  # the HF repo ships the template as chat_template.json
    (out / "chat_template.json").write_text(json.dumps({"chat_template": qwen3vl_chat_template()}))
    return out


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    """Our tokenizer: base tokenizer.json + the five tokens appended (model/tokenizer.py)."""
    return load_tokenizer(base_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(base_dir):
    """The official path: AutoTokenizer on the base model, then add_special_tokens as setup_utils does."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(base_dir))
    hf.add_special_tokens({"additional_special_tokens": list(ROBOMETER_SPECIAL_TOKENS)})
    return hf


@pytest.fixture(scope="module")
def processor(hf_tokenizer):
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        """Qwen3VLProcessor without the video processor (it needs torchvision; frames go in as images)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    )
    return ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=hf_tokenizer, video_processor=None)


@pytest.fixture(scope="module")
def tiktoken_encoding(qwen_source):
    """Qwen's tokenizer as originally implemented (tiktoken, NFC input): an independent reference."""
    from tiktoken.load import load_tiktoken_bpe

    with tempfile.TemporaryDirectory() as tmp:
        ranks_file = Path(tmp) / "qwen.tiktoken"
        ranks_file.write_bytes(qwen_vocab.read_qwen_tiktoken(qwen_source))
        ranks = load_tiktoken_bpe(str(ranks_file))
    specials = {tok: FIRST_SPECIAL_ID + i for i, tok in enumerate(QWEN3VL_SPECIAL_TOKENS + ROBOMETER_SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=qwen_vocab.QWEN_PRETOKENIZE_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials)


def _render(hf_tokenizer, conversation) -> str:
    """Official rendering (robometer collator flags) through transformers' chat-template machinery."""
    return hf_tokenizer.apply_chat_template(
        conversation, chat_template=qwen3vl_chat_template(), tokenize=False, add_generation_prompt=False,
        add_vision_id=True, enable_thinking=False, fps=1,
    )


def _camera_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*CAMERA, 3), dtype=np.uint8) for _ in range(count)]


def _meta_backbone(tokenizer):
    """A Qwen3VLModel on the meta device (no memory) with the real token ids, for get_rope_index."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    cfg = tiny_config(RELEASED_VOCAB, backbone_token_ids(tokenizer))
    with torch.device("meta"):
        return Qwen3VLModel(Qwen3VLConfig(**cfg.backbone))


# ------------------------------------------------------------------------------------------- 1. vocabulary
def test_vocabulary_source_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape("pip download --no-deps dashscope==2.0.2")):
        qwen_vocab.read_qwen_tiktoken(tmp_path / "missing.whl")
    wrong = tmp_path / "qwen.tiktoken"
    wrong.write_bytes(b"IQ== 0\n")
    with pytest.raises(ValueError, match=r"sha256 \w+ is not the known"):
        qwen_vocab.read_qwen_tiktoken(wrong)
    other_wheel = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(other_wheel, "w") as archive:
        archive.writestr("other/__init__.py", "")
    with pytest.raises(ValueError, match=re.escape("has no dashscope/resources/qwen.tiktoken")):
        qwen_vocab.read_qwen_tiktoken(other_wheel)
    assert qwen_vocab.find_qwen_vocab(tmp_path) == wrong  # a bare qwen.tiktoken is found too
    assert qwen_vocab.main([str(tmp_path / "out"), "--source", str(wrong)]) == 1


def test_real_vocabulary_gives_the_released_ids(base_dir, tokenizer, hf_tokenizer):
    from tokenizers import Tokenizer

    base = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    assert base.get_vocab_size(with_added_tokens=True) == 151669
    assert [base.token_to_id(t) for t in QWEN3VL_SPECIAL_TOKENS] == list(range(FIRST_SPECIAL_ID, 151669))
    assert base.token_to_id("<|prog_token|>") is None  # the base model does not have them
    # ours and the official add_special_tokens give the same five ids, right after the base vocabulary
    expected = dict(zip(ROBOMETER_SPECIAL_TOKENS, range(151669, 151674)))
    assert {t: tokenizer.token_to_id(t) for t in ROBOMETER_SPECIAL_TOKENS} == expected
    assert {t: hf_tokenizer.convert_tokens_to_ids(t) for t in ROBOMETER_SPECIAL_TOKENS} == expected
    assert tokenizer.get_vocab_size(with_added_tokens=True) == len(hf_tokenizer) == RELEASED_VOCAB
    assert robometer_4b_config().vocab_size == RELEASED_VOCAB
    assert tokenizer.encode("Hello, world!", add_special_tokens=False).ids == [9707, 11, 1879, 0]


def test_vision_token_ids_match_the_qwen3vl_config_defaults(tokenizer):
    from transformers import Qwen3VLConfig

    defaults = Qwen3VLConfig()
    ids = backbone_token_ids(tokenizer)
    assert ids == {
        "image_token_id": defaults.image_token_id,
        "video_token_id": defaults.video_token_id,
        "vision_start_token_id": defaults.vision_start_token_id,
        "vision_end_token_id": defaults.vision_end_token_id,
    }
    assert (ids["vision_start_token_id"], ids["vision_end_token_id"], ids["image_token_id"]) == (151652, 151653, 151655)
    released = robometer_4b_config().backbone
    assert {k: released[k] for k in ids} == ids
    builder = PromptBuilder(tokenizer)
    assert (builder.image_pad_id, builder.vision_start_id, builder.vision_end_id) == (151655, 151652, 151653)
    assert (builder.split_token_id, builder.pref_token_id, builder.prog_token_id) == (151669, 151671, 151673)


@pytest.mark.parametrize("instruction", INSTRUCTIONS, ids=range(len(INSTRUCTIONS)))
def test_progress_prompt_ids_equal_the_official_processor(tokenizer, hf_tokenizer, processor, instruction):
    builder = PromptBuilder(tokenizer)
    for num_frames in (1, 8):
        conversation = P.progress_conversation(instruction, num_frames)
        text = _render(hf_tokenizer, conversation)
        assert P.render_user_turn(conversation[0]["content"]) == text
        expected = processor(text=[text], images=_camera_frames(num_frames), return_tensors="np")
        layout = builder.progress(instruction, [GRID] * num_frames)
        np.testing.assert_array_equal(expected["image_grid_thw"], [GRID] * num_frames)
        np.testing.assert_array_equal(layout.input_ids, expected["input_ids"])
        np.testing.assert_array_equal(layout.mm_token_type_ids, expected["mm_token_type_ids"])
        assert layout.num_visual_tokens == 80 * num_frames
        # the instruction survives tokenization (NFC-composed, as the tokenizer's normalizer does)
        decoded = hf_tokenizer.decode(layout.input_ids[0].tolist())
        assert unicodedata.normalize("NFC", P.progress_prompt_text(instruction)) in decoded


@pytest.mark.parametrize(("instruction", "n_a", "n_b", "with_progress"), [
    (INSTRUCTIONS[0], 8, 8, True),
    (INSTRUCTIONS[1], 2, 3, True),
    (INSTRUCTIONS[3], 1, 1, False),
    (INSTRUCTIONS[6], 3, 2, True),
])
def test_preference_prompt_ids_equal_the_official_processor(tokenizer, hf_tokenizer, processor, instruction, n_a,
                                                            n_b, with_progress):
    conversation = P.preference_conversation(instruction, n_a, n_b, with_progress)
    text = _render(hf_tokenizer, conversation)
    expected = processor(text=[text], images=_camera_frames(n_a + n_b, seed=1), return_tensors="np")
    layout = PromptBuilder(tokenizer).preference(instruction, [GRID] * n_a, [GRID] * n_b, with_progress)
    np.testing.assert_array_equal(layout.input_ids, expected["input_ids"])
    np.testing.assert_array_equal(layout.mm_token_type_ids, expected["mm_token_type_ids"])
    ids = expected["input_ids"][0]
    np.testing.assert_array_equal(layout.prog_positions, np.flatnonzero(ids == 151673))
    assert layout.pref_position.tolist() == np.flatnonzero(ids == 151671).tolist()


@pytest.fixture
def qwen_vl_utils(monkeypatch):
    """qwen-vl-utils 0.0.14 (the official pin), which sizes the official pipeline's frames.

    It imports torchvision at module level for its video readers only; torchvision cannot be installed next to
    the CPU torch here, so a stub stands in for the import (the image path never touches it).
    """
    if importlib.util.find_spec("qwen_vl_utils") is None:
        pytest.skip("qwen-vl-utils is not installed (requirements/dev.txt pins 0.0.14)")
    if importlib.util.find_spec("torchvision") is None:
        torchvision = types.ModuleType("torchvision")
        io, transforms = types.ModuleType("torchvision.io"), types.ModuleType("torchvision.transforms")
        transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
        torchvision.__version__, torchvision.io, torchvision.transforms = "0.0", io, transforms
        for name, module in (("torchvision", torchvision), ("torchvision.io", io),
                             ("torchvision.transforms", transforms)):
            monkeypatch.setitem(sys.modules, name, module)
    loaded = [name for name in sys.modules if name.startswith("qwen_vl_utils")]
    yield importlib.import_module("qwen_vl_utils")
    for name in [n for n in sys.modules if n.startswith("qwen_vl_utils") and n not in loaded]:
        del sys.modules[name]  # it holds the stub; a later import starts clean


@pytest.mark.parametrize("camera", [CAMERA, (240, 427)], ids=["4:3", "16:9"])
def test_frames_and_ids_equal_the_official_collator_path(qwen_vl_utils, tokenizer, hf_tokenizer, processor, camera):
    # The official collator puts PIL frames into the conversation, sizes them with
    # process_vision_info(image_patch_size=16) and calls the processor with do_resize=False.
    from PIL import Image

    from robometer_ros.preprocess import FramePreprocessor, frame_size_for

    rng = np.random.default_rng(9)
    frames = [rng.integers(0, 256, (*camera, 3), dtype=np.uint8) for _ in range(8)]
    conversation = P.progress_conversation(INSTRUCTIONS[1], len(frames))
    pictures = iter(frames)
    for item in conversation[0]["content"]:
        if item["type"] == "image":
            item["image"] = Image.fromarray(next(pictures))
    images, videos = qwen_vl_utils.process_vision_info(conversation, image_patch_size=16)
    height, width = frame_size_for(*camera)  # the bundle's --frame-size for this camera
    assert videos is None and {image.size for image in images} == {(width, height)}
    expected = processor(text=[_render(hf_tokenizer, conversation)], images=images, do_resize=False,
                         return_tensors="np")

    preprocessor = FramePreprocessor(height, width)  # what RewardEngine does with each camera frame
    np.testing.assert_array_equal(np.concatenate([preprocessor(f) for f in frames]), expected["pixel_values"])
    layout = PromptBuilder(tokenizer).progress(INSTRUCTIONS[1], [preprocessor.grid_thw] * len(frames))
    np.testing.assert_array_equal(layout.input_ids, expected["input_ids"])
    np.testing.assert_array_equal(layout.image_grid_thw, expected["image_grid_thw"])


@pytest.mark.parametrize("ignore_merges", [True, False])
def test_prompt_ids_equal_tiktoken(tokenizer, tiktoken_encoding, ignore_merges):
    # The converter sets ignore_merges (tiktoken's rule: a whole pre-token in the vocabulary wins); the
    # published tokenizer.json may not. Either way the prompt ids must be tiktoken's.
    from tokenizers import Tokenizer

    variant = Tokenizer.from_str(tokenizer.to_str())
    variant.model.ignore_merges = ignore_merges
    builder = PromptBuilder(variant)
    for instruction in INSTRUCTIONS:
        texts = [
            P.render_user_turn(P.progress_conversation(instruction, 8)[0]["content"]),
            P.render_user_turn(P.preference_conversation(instruction, 2, 2)[0]["content"]),
        ]
        for text in texts:
            expected = tiktoken_encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")
            assert builder.encode(text).tolist() == expected, instruction


def test_mrope_ids_with_realistic_grids(tokenizer):
    backbone = _meta_backbone(tokenizer)
    builder = PromptBuilder(tokenizer)
    for layout in (builder.progress(INSTRUCTIONS[0], [GRID] * 8),
                   builder.preference(INSTRUCTIONS[1], [GRID] * 8, [GRID] * 8)):
        position_ids, delta = backbone.get_rope_index(
            torch.from_numpy(layout.input_ids), torch.from_numpy(layout.mm_token_type_ids),
            image_grid_thw=torch.from_numpy(layout.image_grid_thw),
            attention_mask=torch.ones(1, layout.seq_len, dtype=torch.long),
        )
        np.testing.assert_array_equal(layout.position_ids, position_ids.numpy())
        assert layout.rope_delta == int(delta)
    # by hand for the progress prompt: each frame is an 8x10 block starting at the next text position, and
    # the text after it continues at start + max(8, 10)
    layout = builder.progress(INSTRUCTIONS[0], [GRID] * 8)
    pos = layout.position_ids[:, 0]
    for start, end in layout.visual_spans:
        first = pos[0, start]
        assert (pos[:, start] == first).all() and first == pos[0, start - 1] + 1
        assert (pos[0, start:end] == first).all()
        np.testing.assert_array_equal(pos[1, start:end], first + np.repeat(np.arange(8), 10))
        np.testing.assert_array_equal(pos[2, start:end], first + np.tile(np.arange(10), 8))
        assert (pos[:, end] == first + 10).all()
    assert layout.seq_len == layout.position_ids.shape[-1] and layout.num_visual_tokens == 640


# ----------------------------------------------------------------------------- 2. released layout -> bundle
def _released_backbone(model) -> dict:
    """config.json as the official trainer writes it (transformers 4.57 + Unsloth).

    Field for field like a published RBM checkpoint's (amburger66/robometer-4b-lora-robotsmith-task03,
    transformers 4.57.6): rope as ``rope_scaling`` + integer ``rope_theta``, ``dtype`` in the top level AND
    in both sub-configs, Unsloth's extra keys, the pad id of ``<|vision_pad|>``.
    """
    backbone = json.loads(json.dumps(model.config.backbone))
    text = backbone["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_scaling"] = {"mrope_interleaved": rope["mrope_interleaved"], "mrope_section": rope["mrope_section"],
                            "rope_type": rope["rope_type"]}
    text.update(rope_theta=int(rope["rope_theta"]), dtype="bfloat16", bos_token_id=151643, eos_token_id=151645,
                use_cache=True, initializer_range=0.02)
    backbone["vision_config"]["dtype"] = "bfloat16"
    return {"architectures": ["RFM"], **backbone, "dtype": "bfloat16", "model_name": "unsloth/Qwen3-VL-4B-Instruct",
            "pad_token_id": 151654, "transformers_version": "4.57.6", "unsloth_fixed": True,
            "unsloth_version": "2026.3.8"}


RELEASED_CONFIG_YAML = {
    "model": {
        "base_model_id": "Qwen/Qwen3-VL-4B-Instruct",
        "model_type": "default",
        "torch_dtype": "bfloat16",
        "train_language_model": True,
        "train_vision_encoder": False,
        "train_progress_head": True,
        "train_preference_head": True,
        "train_success_head": True,
        "use_peft": False,
        "use_unsloth": True,
        "use_multi_image": "${data.use_multi_image}",
        "use_per_frame_progress_token": True,
        "average_temporal_patches": True,
        "frame_pooling": "mean",
        "progress_loss_type": "${loss.progress_loss_type}",
        "progress_discrete_bins": "${loss.progress_discrete_bins}",
    },
    "data": {"max_frames": 8, "use_multi_image": True, "sample_type_ratio": [1, 0, 0], "load_embeddings": False},
    "loss": {"progress_loss_type": "discrete", "progress_discrete_bins": 10, "predict_last_frame_progress": False},
    "training": {"predict_pref_progress": True, "max_steps": 15000, "bf16": True},
    "custom_eval": {"eval_types": ["reward_alignment", "policy_ranking"], "use_frame_steps": False},
}


def _write_released_checkpoint(model, out: Path) -> None:
    """bf16 model-0000i-of-00002 shards + index, RFM config.json, config.yaml; unused official keys included."""
    out.mkdir(parents=True)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    hidden = model.config.hidden_size
    state["frame_pool_attn.weight"] = torch.zeros(1, hidden, dtype=torch.bfloat16)
    for index, shape in ((0, (hidden // 2, hidden)), (1, (hidden // 2,)), (4, (1, hidden // 2))):
        state[f"similarity_head.{index}.weight"] = torch.zeros(shape, dtype=torch.bfloat16)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": [k for k in keys if "embed_tokens" not in k],
              "model-00002-of-00002.safetensors": [k for k in keys if "embed_tokens" in k]}
    weight_map = {}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(_released_backbone(model), indent=2))
    (out / "config.yaml").write_text(yaml.safe_dump(RELEASED_CONFIG_YAML, sort_keys=False))


@pytest.fixture(scope="module")
def released(tmp_path_factory, tokenizer, base_dir):
    """A tiny model with the real vocabulary, saved as the release is, and exported by the CLI."""
    from robometer_ros.model.robometer import RobometerModel
    from robometer_ros.training.export import onnx_export

    root = tmp_path_factory.mktemp("released")
    config = tiny_config(RELEASED_VOCAB, backbone_token_ids(tokenizer))
    torch.manual_seed(11)
    model = RobometerModel(config).eval()
    checkpoint = root / "Robometer-4B"
    _write_released_checkpoint(model, checkpoint)
    # the reference: the same weights as the checkpoint holds them (bf16), computed in fp32
    reference = RobometerModel(config).eval()
    reference.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    bundle_dir = root / "bundle"
    rc = onnx_export.main([str(checkpoint), str(bundle_dir), "--base-model", str(base_dir), "--frame-size", "256x320"])
    return checkpoint, bundle_dir, reference, rc


@pytest.mark.slow  # shares the ~10 s export of the `released` fixture
def test_released_config_dtype_does_not_override_the_requested_dtype(released, base_dir):
    # The 4.57 config.json carries dtype "bfloat16" in text_config/vision_config too; transformers 5 would
    # build those submodules in bf16 whatever load_checkpoint was asked for (regression: the fp32 export
    # then failed inside the ONNX exporter).
    from robometer_ros.model.checkpoint import load_checkpoint

    checkpoint = released[0]
    assert json.loads((checkpoint / "config.json").read_text())["text_config"]["dtype"] == "bfloat16"
    model, _ = load_checkpoint(checkpoint, tokenizer_dir=base_dir)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    kept, _ = load_checkpoint(checkpoint, tokenizer_dir=base_dir, dtype=None)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}


@pytest.mark.slow  # shares the ~10 s export of the `released` fixture
def test_release_needs_the_base_model_for_its_tokenizer(released, tmp_path, capsys):
    from robometer_ros.training.export import onnx_export

    checkpoint = released[0]
    assert not any(checkpoint.glob("tokenizer*"))
    assert onnx_export.main([str(checkpoint), str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "ships no tokenizer.json" in err and "base" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.slow  # shares the ~10 s export of the `released` fixture
def test_released_checkpoint_exports_with_the_real_ids(released):
    from robometer_ros.engine.bundle import Bundle

    _, bundle_dir, _, rc = released
    assert rc == 0
    bundle = Bundle.open(bundle_dir)
    m = bundle.manifest
    assert m.vocab_size == RELEASED_VOCAB and m.num_frames == 8 and m.progress_bins == 10
    assert (m.frame.height, m.frame.width) == (256, 320) and m.frame.tokens_per_frame == 80
    assert m.base_model == "Qwen/Qwen3-VL-4B-Instruct" and m.model_id == "Robometer-4B"
    assert {k: m.special_tokens[k] for k in ("image_pad", "vision_start", "vision_end", "split_token",
                                              "pref_token", "prog_token")} == {
        "image_pad": 151655, "vision_start": 151652, "vision_end": 151653,
        "split_token": 151669, "pref_token": 151671, "prog_token": 151673}
    shipped = load_tokenizer(bundle.tokenizer_path, add_robometer=False)
    assert shipped.get_vocab_size(with_added_tokens=True) == RELEASED_VOCAB
    # the base model's chat template (chat_template.json) is not read; the packaged one is the same text
    assert (bundle_dir / "chat_template.jinja").read_text() == qwen3vl_chat_template()


def _processor_inputs(processor, hf_tokenizer, conversation, frames):
    text = _render(hf_tokenizer, conversation)
    return processor(text=[text], images=frames, return_tensors="pt")


@pytest.mark.slow  # shares the ~10 s export of the `released` fixture
def test_engine_on_the_exported_release_equals_the_reference_forward(released, processor, hf_tokenizer):
    from robometer_ros.engine.reward_engine import RewardEngine
    from robometer_ros.model.progress import expected_progress_np, sigmoid_np

    _, bundle_dir, reference, rc = released
    assert rc == 0
    engine = RewardEngine(bundle_dir, backend="onnxruntime", intra_op_threads=1)
    frames = _camera_frames(12, seed=5)
    for i, frame in enumerate(frames):
        engine.add_frame(i, frame)
    instruction = INSTRUCTIONS[1]
    for ids in ([0, 2, 3, 5, 6, 8, 9, 11], [4]):
        scores = engine.score(instruction, ids)
        inputs = _processor_inputs(processor, hf_tokenizer, P.progress_conversation(instruction, len(ids)),
                                   [frames[i] for i in ids])
        prog = (inputs["input_ids"][0] == 151673).nonzero().flatten()
        with torch.no_grad():
            ref = reference(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"],
                            inputs["mm_token_type_ids"], prog)
        # fp32 ONNX Runtime vs fp32 torch, 80-token frames: observed max |diff| ~1e-6
        np.testing.assert_allclose(scores.progress_logits, ref["progress_logits"].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(scores.success_logits, ref["success_logits"].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(scores.progress, expected_progress_np(ref["progress_logits"].numpy()), atol=1e-5)
        np.testing.assert_allclose(scores.success_probability, sigmoid_np(ref["success_logits"].numpy()), atol=1e-5)

    a, b = [0, 1, 2, 3], [8, 9, 10, 11]
    probability = engine.preference(instruction, a, b)
    inputs = _processor_inputs(processor, hf_tokenizer, P.preference_conversation(instruction, 4, 4),
                               [frames[i] for i in a + b])
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        ref = reference(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"],
                        inputs["mm_token_type_ids"], (ids == 151673).nonzero().flatten(),
                        (ids == 151671).nonzero().flatten())
    assert probability == pytest.approx(float(torch.sigmoid(ref["preference_logit"]).reshape(-1)[0]), abs=1e-5)
    engine.close()


@pytest.mark.slow  # a second export (~10 s)
def test_fp16_export_of_the_release_stays_close_to_the_fp32_reference(released, base_dir, tmp_path):
    # docs/REAL_ROBOT.md recommends --fp16 for robots: bf16 shards -> fp16 ONNX, scored by ONNX Runtime (CPU here).
    from robometer_ros.engine.reward_engine import RewardEngine
    from robometer_ros.preprocess import FramePreprocessor
    from robometer_ros.training.export import onnx_export

    checkpoint, _, reference, _ = released
    bundle_dir = tmp_path / "bundle-fp16"
    assert onnx_export.main([str(checkpoint), str(bundle_dir), "--base-model", str(base_dir), "--frame-size", "256x320",
                        "--fp16"]) == 0
    engine = RewardEngine(bundle_dir, backend="onnxruntime", intra_op_threads=1)
    assert engine.bundle.manifest.precision == "fp16"
    frames = _camera_frames(8, seed=6)
    for i, frame in enumerate(frames):
        engine.add_frame(i, frame)
    scores = engine.score(INSTRUCTIONS[0], list(range(8)))
    preprocessor = FramePreprocessor(256, 320)
    layout = PromptBuilder(load_tokenizer(base_dir)).progress(INSTRUCTIONS[0], [preprocessor.grid_thw] * 8)
    with torch.no_grad():
        ref = reference(torch.from_numpy(layout.input_ids),
                        torch.from_numpy(np.concatenate([preprocessor(f) for f in frames])),
                        torch.from_numpy(layout.image_grid_thw), torch.from_numpy(layout.mm_token_type_ids),
                        torch.from_numpy(layout.prog_positions))
    # fp16 weights vs the fp32 reference on the tiny model: observed max |diff| ~3e-4
    np.testing.assert_allclose(scores.progress_logits, ref["progress_logits"].numpy(), atol=1e-2, rtol=0)
    np.testing.assert_allclose(scores.success_logits, ref["success_logits"].numpy(), atol=1e-2, rtol=0)
    engine.close()
