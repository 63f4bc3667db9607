"""Trainer pieces on a tiny model: schedule, pair-stream sharding, splits, batched forward, LoRA, exact resume."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from robometer_ros.model.tiny import tiny_model
from robometer_ros.training.data.store import DatasetError, open_split, write_dataset
from robometer_ros.training.recipe.collate import BatchCollator, RobometerBatchModule
from robometer_ros.training.recipe.config import TrainConfig, load_config
from robometer_ros.training.recipe.sampling import PairSampler, SamplingConfig
from robometer_ros.training.recipe.trainer import (
    StepBatchSampler,
    Trainer,
    lora_merged_state_dict,
    lr_factor,
    main,
    prepare_trainable,
)
from support.synthetic_squares import make_trajectories, write_square_dataset

RECIPES = Path(__file__).resolve().parents[2] / "training"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def squares(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_square_dataset(tmp_path_factory.mktemp("squares"), episodes_per_task=4, eval_episodes_per_task=2)


def tiny_recipe(data: Path, out: Path, *overrides: str) -> TrainConfig:
    return load_config(RECIPES / "tiny_cpu.yaml", [
        f"data.dataset={data}", f"output_dir={out}", "log.every=1", "log.progress_bar=false",
        "log.tensorboard=false", "data.eval_split=null", "checkpoint.every=0", *overrides,
    ])


def test_lr_schedule_warms_up_then_follows_a_cosine() -> None:
    config = load_config(None, ["data.dataset=d", "optim.max_steps=100", "optim.warmup_ratio=0.1",
                                "optim.min_lr_ratio=0.1"])
    factors = [lr_factor(step, config) for step in range(100)]
    assert factors[0] == pytest.approx(1 / 11)  # the first step already moves
    assert all(a < b for a, b in pairwise(factors[:11]))  # rising over the 10 warm-up steps
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in pairwise(factors[10:]))  # then never rising
    assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, config) == pytest.approx(0.1)


def test_step_batch_sampler_shards_the_pair_stream_without_overlap() -> None:
    steps, accum, batch, world = 3, 2, 3, 2
    per_rank = [list(StepBatchSampler(0, steps, batch, accum, rank, world)) for rank in range(world)]
    assert all(len(batches) == steps * accum for batches in per_rank)
    flat = [i for batches in per_rank for b in batches for i in b]
    assert sorted(flat) == list(range(steps * accum * batch * world))  # every pair once
    # resuming at step 1 continues the same stream
    assert list(StepBatchSampler(1, steps, batch, accum, 1, world)) == per_rank[1][accum:]


def test_open_split_by_directory_and_by_metadata(tmp_path: Path, squares: Path) -> None:
    assert len(open_split(squares, "val")) == 3 * 2
    flat = tmp_path / "flat"
    write_dataset(flat, make_trajectories(2, seed=1, split="train") + make_trajectories(1, seed=2, split="val"),
                  frame_codec="npz")
    assert len(open_split(flat, "train")) == 6
    assert len(open_split(flat, "val")) == 3
    assert len(open_split(flat, "all")) == 9
    with pytest.raises(DatasetError, match=r"no split 'test'.*splits found in metadata: \['train', 'val'\]"):
        open_split(flat, "test")
    with pytest.raises(DatasetError, match="not a dataset directory"):
        open_split(tmp_path / "missing", "train")


def test_batched_forward_equals_the_reference_forward_per_prompt() -> None:
    """Right padding and per-row gathers give each prompt exactly what the model gives it alone."""
    model, tokenizer = tiny_model(seed=1)
    collator = BatchCollator(tokenizer, 2, (64, 64))
    trajectories = make_trajectories(1)
    frames = [t.frames[:8] for t in trajectories]
    instructions = [trajectories[0].instruction, "x", trajectories[2].instruction + " very slowly and carefully"]
    module = RobometerBatchModule(model).eval()
    with torch.no_grad():
        batch = collator.preference_batch(instructions, frames, frames[::-1])
        assert batch["prog_positions"].shape == (3, 16)
        assert int(batch["attention_mask"][1].sum()) < batch["input_ids"].shape[1]  # row 1 is padded
        out = module(**batch)
        for row in range(3):
            single = collator.preference_batch([instructions[row]], [frames[row]], [frames[::-1][row]])
            reference = model(single["input_ids"], single["pixel_values"], single["image_grid_thw"],
                              single["mm_token_type_ids"], single["prog_positions"][0], single["pref_positions"])
            torch.testing.assert_close(out["progress_logits"][row], reference["progress_logits"], atol=1e-5, rtol=0)
            torch.testing.assert_close(out["success_logits"][row], reference["success_logits"], atol=1e-5, rtol=0)
            torch.testing.assert_close(out["preference_logits"][row], reference["preference_logit"][0],
                                       atol=1e-5, rtol=0)


def test_training_batch_carries_side_a_targets(squares: Path) -> None:
    _, tokenizer = tiny_model()
    collator = BatchCollator(tokenizer, 2, (64, 64))
    sampler = PairSampler(open_split(squares, "train"), SamplingConfig(num_frames=8), seed=3)
    samples = [sampler[i] for i in range(4)]
    batch = collator(samples)
    assert batch["pixel_values"].shape == (4 * 16 * 16, 1536)  # 4 pairs x 16 frames x 4x4 patches
    assert batch["pref_positions"].shape == (4,)
    assert (batch["input_ids"].gather(1, batch["pref_positions"][:, None]) == collator.builder.pref_token_id).all()
    np.testing.assert_array_equal(batch["progress_a"].numpy(), np.stack([s.progress_a for s in samples]))
    np.testing.assert_array_equal(batch["preference_label"].numpy(), [s.preference_label for s in samples])


def test_collator_frame_sizes() -> None:
    _, tokenizer = tiny_model()
    frames = make_trajectories(1)[0].frames[:8]
    fixed = BatchCollator(tokenizer, 2, (64, 64)).progress_batch(["a"], [frames])
    stored = BatchCollator(tokenizer, 2, None).progress_batch(["a"], [frames])  # 64x64 is already a valid size
    assert torch.equal(fixed["pixel_values"], stored["pixel_values"])
    odd = np.zeros((8, 70, 90, 3), np.uint8)  # stored size rounded to multiples of 32: 64 x 96
    batch = BatchCollator(tokenizer, 2, None).progress_batch(["a"], [odd])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6]] * 8
    resized = BatchCollator(tokenizer, 2, (32, 64)).progress_batch(["a"], [odd])
    assert resized["image_grid_thw"].tolist() == [[1, 2, 4]] * 8
    with pytest.raises(ValueError, match="uint8"):
        BatchCollator(tokenizer, 2, None).progress_batch(["a"], [odd.astype(np.float32)])


def test_freeze_vision_and_lora_choose_the_trainable_parameters() -> None:
    config = load_config(None, ["data.dataset=d", "model.freeze_vision=true"])
    model, _ = tiny_model()
    prepare_trainable(model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("model.visual.") for n in trainable)
    assert any(n.startswith("model.language_model.") for n in trainable) and "success_head.0.weight" in trainable

    config = load_config(None, ["data.dataset=d", "lora.enabled=true", "lora.r=4", "lora.alpha=8"])
    model, _ = tiny_model()
    prepare_trainable(model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.split(".")[0].endswith("_head") for n in trainable)
    adapted = {n.split(".lora_")[0] for n in trainable if "lora_" in n}
    assert adapted and all(".language_model.layers." in n for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_gradient_checkpointing_is_on_and_changes_no_gradient() -> None:
    trajectory = make_trajectories(1)[0]
    grads = []
    for checkpointing in (False, True):
        config = load_config(None, ["data.dataset=d", f"model.gradient_checkpointing={str(checkpointing).lower()}",
                                    "model.freeze_vision=false"])
        model, tokenizer = tiny_model(seed=3)
        prepare_trainable(model, config)
        layers = [*model.model.language_model.layers, *model.model.visual.blocks]
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        batch = BatchCollator(tokenizer, 2, (64, 64)).progress_batch([trajectory.instruction], [trajectory.frames[:8]])
        model.train()
        torch.manual_seed(0)  # same head-dropout masks in both runs
        out = RobometerBatchModule(model)(**batch)
        (out["progress_logits"].square().mean() + out["success_logits"].mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("model.visual.") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_lora_merge_gives_a_plain_model_with_the_same_outputs() -> None:
    config = load_config(None, ["data.dataset=d", "lora.enabled=true", "lora.r=4", "lora.alpha=8",
                                "lora.dropout=0.0"])
    model, tokenizer = tiny_model(seed=2)
    prepare_trainable(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op (B = 0): make it matter
                param.normal_(0.0, 0.2)
    plain, _ = tiny_model(seed=5)
    plain.load_state_dict(lora_merged_state_dict(model.state_dict(), config))
    collator = BatchCollator(tokenizer, 2, (64, 64))
    trajectory = make_trajectories(1)[0]
    batch = collator.progress_batch([trajectory.instruction], [trajectory.frames[:8]])
    with torch.no_grad():
        adapted = RobometerBatchModule(model.eval())(**batch)
        merged = RobometerBatchModule(plain.eval())(**batch)
        base, _ = tiny_model(seed=2)
        original = RobometerBatchModule(base.eval())(**batch)
    torch.testing.assert_close(merged["progress_logits"], adapted["progress_logits"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(original["progress_logits"], adapted["progress_logits"], atol=1e-4)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
            if "train/loss" in r}


def test_resumed_run_continues_exactly_like_an_uninterrupted_one(tmp_path: Path, squares: Path) -> None:
    steps = ["optim.max_steps=6", "optim.batch_size=2"]
    Trainer(tiny_recipe(squares, tmp_path / "straight", *steps)).train()
    Trainer(tiny_recipe(squares, tmp_path / "resumed", *steps)).train(stop_at_step=3)
    assert sorted(_losses(tmp_path / "resumed")) == [1, 2, 3]
    with open(tmp_path / "resumed" / "train_log.jsonl", "a") as log:  # logged after the checkpoint, then killed
        log.write(json.dumps({"step": 4, "train/loss": -1.0}) + "\n")
    assert not (tmp_path / "resumed" / "final").exists()
    Trainer(tiny_recipe(squares, tmp_path / "resumed", *steps)).train()  # checkpoint.resume=auto
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the stale step-4 line is gone
    assert resumed == straight  # bitwise: model, optimizer, schedule, RNGs and pair stream all restored
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "resumed" / "final" / "training.json").read_text())
    assert info["step"] == 6 and info["frame_size"] == [64, 64]
    # keep_last: only the newest resumable states stay on disk
    kept = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert kept == ["step-0000003", "step-0000006"]


def test_lora_finetune_from_a_saved_checkpoint_saves_a_merged_plain_model(tmp_path: Path, squares: Path) -> None:
    Trainer(tiny_recipe(squares, tmp_path / "base", "optim.max_steps=2")).train()
    Trainer(tiny_recipe(squares, tmp_path / "lora", "optim.max_steps=2", "optim.lr=5e-2", "lora.enabled=true",
                        "lora.r=4", f"model.init_checkpoint={tmp_path / 'base' / 'final'}")).train()
    base = load_file(str(tmp_path / "base" / "final" / "model.safetensors"))
    tuned = load_file(str(tmp_path / "lora" / "final" / "model.safetensors"))
    assert base.keys() == tuned.keys()  # plain released layout: no lora_* / base_layer keys
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert any(".self_attn.q_proj.weight" in k for k in changed)  # LoRA merged into the projections
    assert any(k.startswith("progress_head.") for k in changed)  # heads trained in full
    assert not any(k.startswith("model.visual.") or "embed_tokens" in k or "norm" in k for k in changed)
    from robometer_ros.model.checkpoint import load_checkpoint

    model, info = load_checkpoint(tmp_path / "lora" / "final")
    assert info.tokenizer.get_vocab_size() == model.config.vocab_size


def test_resume_refuses_a_different_world_size(tmp_path: Path, squares: Path) -> None:
    Trainer(tiny_recipe(squares, tmp_path / "run", "optim.max_steps=4")).train(stop_at_step=1)
    state_file = tmp_path / "run" / "checkpoints" / "step-0000001" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=False)
    state["world_size"] = 2
    torch.save(state, state_file)
    with pytest.raises(ValueError, match="written by 2 ranks"):
        Trainer(tiny_recipe(squares, tmp_path / "run", "optim.max_steps=4")).train()


def test_cli_reports_bad_configs(capsys: pytest.CaptureFixture[str], tmp_path: Path, squares: Path) -> None:
    assert main([str(RECIPES / "tiny_cpu.yaml"), f"data.dataset={tmp_path}", "optim.lr=-1"]) == 2
    assert "optim.lr must be > 0" in capsys.readouterr().err
    assert main([str(RECIPES / "tiny_cpu.yaml"), f"data.dataset={tmp_path}", "optim.lrr=1"]) == 2
    assert "did you mean optim.lr" in capsys.readouterr().err
    assert main([str(RECIPES / "tiny_cpu.yaml"), f"data.dataset={tmp_path / 'none'}"]) == 2
    assert "is not a dataset directory" in capsys.readouterr().err
    assert main([str(RECIPES / "tiny_cpu.yaml"), f"data.dataset={squares}", f"model.init_checkpoint={tmp_path}"]) == 2
    assert "has no config.json" in capsys.readouterr().err


def _hf_base_model(directory: Path, extra_rows: int = 16) -> torch.nn.Module:
    """A tiny Qwen3-VL in the Hugging Face layout (Qwen3VLForConditionalGeneration.save_pretrained +
    tokenizer.json), with more embedding rows than the tokenizer has tokens, like Qwen3-VL-4B-Instruct."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from robometer_ros.model.tiny import config_for_tokenizer, tiny_tokenizer
    from robometer_ros.model.tokenizer import save_tokenizer

    tokenizer = tiny_tokenizer()
    backbone = config_for_tokenizer(tokenizer, "tiny").backbone
    backbone["text_config"]["vocab_size"] = tokenizer.get_vocab_size(with_added_tokens=True) + extra_rows
    torch.manual_seed(11)
    hf = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**backbone)).eval()
    hf.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return hf


def test_start_from_a_hugging_face_qwen3vl_backbone(tmp_path: Path, squares: Path) -> None:
    from robometer_ros.training.recipe.trainer import init_from_base_model

    hf = _hf_base_model(tmp_path / "base")
    model, tokenizer = init_from_base_model(tmp_path / "base", num_frames=8, seed=0)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    reference = hf.model.state_dict()
    ours = model.model.state_dict()
    assert ours.keys() == reference.keys()
    for key, value in ours.items():
        expected = reference[key][:vocab] if key.endswith("embed_tokens.weight") else reference[key]
        assert torch.equal(value, expected), key
    again, _ = init_from_base_model(tmp_path / "base", num_frames=8, seed=0)
    other, _ = init_from_base_model(tmp_path / "base", num_frames=8, seed=1)
    assert torch.equal(again.progress_head[0].weight, model.progress_head[0].weight)  # heads seeded
    assert not torch.equal(other.progress_head[0].weight, model.progress_head[0].weight)
    # and the trainer takes it (model.base_model), saving a Robometer checkpoint
    base = f"model.base_model={tmp_path / 'base'}"
    Trainer(tiny_recipe(squares, tmp_path / "run", "optim.max_steps=1", base)).train()
    from robometer_ros.model.checkpoint import load_checkpoint

    trained, _ = load_checkpoint(tmp_path / "run" / "final")
    assert trained.config.vocab_size == vocab
