"""Checkpoint I/O: round trips (single file and sharded), a checkpoint written the way the released one is
(RFM config.json in transformers-4.57 form, bf16 shards + index, extra official keys, no tokenizer), and the
errors that name what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from robometer_ros.model.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    load_checkpoint,
    load_model,
    read_checkpoint_config,
    save_checkpoint,
)
from robometer_ros.model.config import ROBOMETER_SPECIAL_TOKENS
from robometer_ros.model.prompt import PromptBuilder
from robometer_ros.model.tiny import tiny_model, tiny_tokenizer
from robometer_ros.model.tokenizer import save_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=3)


def _scores(model, tokenizer, n_frames=3, seed=0):
    builder = PromptBuilder(tokenizer)
    grid = (1, 4, 4)
    layout = builder.progress("open the top drawer", [grid] * n_frames)
    pixels = torch.randn(16 * n_frames, 1536, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(
            torch.from_numpy(layout.input_ids),
            pixels,
            torch.from_numpy(layout.image_grid_thw),
            torch.from_numpy(layout.mm_token_type_ids),
            torch.from_numpy(layout.prog_positions),
        )["progress_logits"]


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_round_trip_single_file(tiny, tmp_path):
    model, tokenizer = tiny
    files = save_checkpoint(model, tokenizer, tmp_path)
    assert {f.name for f in files} >= {"model.safetensors", "config.json", "config.yaml", "tokenizer.json"}
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["RBM"]
    loaded, info = load_checkpoint(tmp_path)
    _assert_same_weights(model, loaded)
    assert loaded.config == model.config
    assert not loaded.training
    torch.testing.assert_close(_scores(loaded, info.tokenizer), _scores(model, tokenizer), atol=0, rtol=0)
    for token in ROBOMETER_SPECIAL_TOKENS:
        assert info.token_ids[token] == tokenizer.token_to_id(token)
    assert info.chat_template is not None and "add_vision_id" in info.chat_template


def test_round_trip_sharded(tiny, tmp_path):
    model, tokenizer = tiny
    files = save_checkpoint(model, tokenizer, tmp_path, shard_size="500KB")
    shards = sorted(f.name for f in files if f.name.startswith("model-"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert not (tmp_path / "model.safetensors").exists()
    loaded, _ = load_checkpoint(tmp_path)
    _assert_same_weights(model, loaded)
    # saving again as one file removes the stale shards
    save_checkpoint(model, tokenizer, tmp_path)
    assert not list(tmp_path.glob("model-*")) and not (tmp_path / INDEX_FILE).exists()


def test_bf16_keep_or_convert(tiny, tmp_path):
    model, tokenizer = tiny
    save_checkpoint(model, tokenizer, tmp_path, dtype=torch.bfloat16)
    kept, _ = load_checkpoint(tmp_path, dtype=None)
    assert kept.dtype == torch.bfloat16
    converted, _ = load_checkpoint(tmp_path)  # default float32
    assert converted.dtype == torch.float32
    expected = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    for key, value in converted.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # non-persistent buffers (rotary frequencies) are rebuilt in float32, as transformers keeps them
    assert kept.model.language_model.rotary_emb.inv_freq.dtype == torch.float32


def _write_released_style(model, out: Path, prefix: str = "model.") -> None:
    """A checkpoint as the official trainer writes it: RFM config.json (4.57 rope form), bf16 shards."""
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in model.state_dict().items():
        name = prefix + key[len("model.") :] if key.startswith("model.") else key
        state[name] = value.to(torch.bfloat16).contiguous()
    hidden = model.config.hidden_size
    state["frame_pool_attn.weight"] = torch.zeros(1, hidden, dtype=torch.bfloat16)
    state["similarity_head.0.weight"] = torch.zeros(hidden // 2, hidden, dtype=torch.bfloat16)
    if prefix == "model.model.":
        state["model.lm_head.weight"] = torch.zeros(model.config.vocab_size, hidden, dtype=torch.bfloat16)
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, names in enumerate(halves, start=1):
        file = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in names}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))

    backbone = json.loads(json.dumps(model.config.backbone))
    rope = backbone["text_config"].pop("rope_parameters")
    backbone["text_config"]["rope_scaling"] = {
        "rope_type": rope["rope_type"],
        "mrope_section": rope["mrope_section"],
        "mrope_interleaved": rope["mrope_interleaved"],
    }
    backbone["text_config"]["rope_theta"] = rope["rope_theta"]
    config = {"architectures": ["RFM"], **backbone, "torch_dtype": "bfloat16", "transformers_version": "4.57.1"}
    (out / "config.json").write_text(json.dumps(config))
    (out / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {
                    "base_model_id": "Qwen/Qwen3-VL-4B-Instruct",
                    "progress_loss_type": "${loss.progress_loss_type}",
                    "progress_discrete_bins": "${loss.progress_discrete_bins}",
                    "use_per_frame_progress_token": True,
                    "use_multi_image": "${data.use_multi_image}",
                },
                "data": {"max_frames": 8, "use_multi_image": True},
                "loss": {"progress_loss_type": "discrete", "progress_discrete_bins": 10},
            }
        )
    )


@pytest.mark.parametrize("prefix", ["model.", "model.model."])
def test_released_layout_loads_with_base_tokenizer(tiny, tmp_path, prefix):
    model, tokenizer = tiny
    checkpoint = tmp_path / "Robometer-4B"
    _write_released_style(model, checkpoint, prefix)
    base = tmp_path / "Qwen3-VL-base"
    save_tokenizer(tiny_tokenizer(add_robometer=False), base)  # the base model's tokenizer: no Robometer tokens

    with pytest.raises(CheckpointError, match=r"ships no tokenizer\.json; pass tokenizer_dir="):
        load_checkpoint(checkpoint)
    loaded, info = load_checkpoint(checkpoint, tokenizer_dir=base)

    assert info.source == base
    # the five tokens were appended in checkpoint order and got the same ids as in training
    for token in ROBOMETER_SPECIAL_TOKENS:
        assert info.token_ids[token] == tokenizer.token_to_id(token)
    ids = [info.token_ids[t] for t in ROBOMETER_SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + 5))
    assert loaded.config.num_bins == 10 and loaded.config.num_frames == 8
    assert loaded.config.base_model_id == "Qwen/Qwen3-VL-4B-Instruct"
    expected = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    reference = type(model)(model.config).eval()
    reference.load_state_dict(expected)
    torch.testing.assert_close(_scores(loaded, info.tokenizer), _scores(reference, tokenizer), atol=1e-6, rtol=0)


def test_key_mismatch_names_every_key(tiny, tmp_path):
    model, tokenizer = tiny
    save_checkpoint(model, tokenizer, tmp_path)
    state = dict(model.state_dict())
    del state["progress_head.4.bias"]
    del state["model.language_model.layers.1.mlp.up_proj.weight"]
    state["bogus_head.weight"] = torch.zeros(2)
    state["success_head.0.weight"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    message = str(err.value)
    assert "missing keys (2): model.language_model.layers.1.mlp.up_proj.weight, progress_head.4.bias" in message
    assert "unexpected keys (1): bogus_head.weight" in message
    assert "success_head.0.weight: checkpoint [3, 3] vs model [32, 64]" in message


def test_config_errors(tiny, tmp_path):
    model, tokenizer = tiny
    save_checkpoint(model, tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3VLForConditionalGeneration"]}))
    with pytest.raises(CheckpointError, match="not a Robometer checkpoint"):
        read_checkpoint_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))

    settings = yaml.safe_load((tmp_path / "config.yaml").read_text())
    settings["model"]["progress_loss_type"] = "l2"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(CheckpointError, match="progress_loss_type 'l2' is not supported"):
        read_checkpoint_config(tmp_path)

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        load_checkpoint(empty)


def test_missing_shard_is_named(tiny, tmp_path):
    model, tokenizer = tiny
    save_checkpoint(model, tokenizer, tmp_path, shard_size="500KB")
    (tmp_path / f"model-00002-of-{len(list(tmp_path.glob('model-*'))):05d}.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"shards listed in model.safetensors.index.json are missing: \['model-00002"
    ):
        load_checkpoint(tmp_path)


def test_tokenizer_that_does_not_fit_is_rejected(tiny, tmp_path):
    model, _ = tiny
    save_checkpoint(model, None, tmp_path)
    other = tmp_path / "other_tok"
    save_tokenizer(tiny_tokenizer(instructions=["a completely different vocabulary"], vocab_size=300), other)
    with pytest.raises(CheckpointError, match="image_token_id: config"):
        load_checkpoint(tmp_path, tokenizer_dir=other)


def test_load_model_without_tokenizer_and_save_argument_check(tiny, tmp_path):
    model, _ = tiny
    save_checkpoint(model, None, tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    _assert_same_weights(model, load_model(tmp_path))
    with pytest.raises(TypeError, match="was the output directory passed as the second argument"):
        save_checkpoint(model, tmp_path / "other", tmp_path / "third")


def test_embedding_rows_override_a_stale_config_vocab(tiny, tmp_path):
    # A config.json written before resize_token_embeddings still says the base vocabulary size.
    model, tokenizer = tiny
    save_checkpoint(model, tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["vocab_size"] = 151936
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.config.vocab_size == model.config.vocab_size
