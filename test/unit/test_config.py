"""TrainConfig: YAML recipes, `key=value` overrides and validation errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from robometer_ros.training.recipe.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    load_config,
    parse_override,
    save_config,
)

RECIPES = Path(__file__).resolve().parents[2] / "training"


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "finetune_lora_4b.yaml", "full_4b_fsdp.yaml"])
def test_shipped_recipes_load_with_a_dataset(name: str) -> None:
    config = load_config(RECIPES / name, ["data.dataset=/tmp/ds", "model.init_checkpoint=/ckpt/Robometer-4B"])
    assert config.data.dataset == "/tmp/ds"
    assert config.data.num_frames == 8


def test_recipe_values_and_official_defaults() -> None:
    lora = load_config(RECIPES / "finetune_lora_4b.yaml", ["data.dataset=d", "model.init_checkpoint=c"])
    assert lora.lora.enabled and lora.lora.r == 32 and lora.lora.alpha == 64
    assert lora.lora.target_modules == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    ]
    assert lora.model.freeze_vision
    full = load_config(RECIPES / "full_4b_fsdp.yaml", ["data.dataset=d", "model.init_checkpoint=c"])
    assert full.distributed.strategy == "fsdp"
    assert full.optim.lr == pytest.approx(2e-5) and full.optim.warmup_ratio == pytest.approx(0.1)
    assert full.optim.max_grad_norm == 10.0 and full.optim.weight_decay == pytest.approx(0.01)


def test_overrides_are_typed_and_nested(tmp_path: Path) -> None:
    config = load_config(
        RECIPES / "tiny_cpu.yaml",
        [
            "data.dataset=some/dir",
            "optim.lr=3e-4",  # YAML 1.1 reads this as a string; must still become a float
            "optim.max_steps=7",
            "optim.betas=[0.8, 0.95]",
            "lora.enabled=true",
            "lora.target_modules=[q_proj,v_proj]",
            "data.eval_split=null",
            "data.frame_size=[96, 128]",
            "data.success_cutoffs={metaworld: 1.0, oxe: 0.95}",
            "output_dir=" + str(tmp_path / "run"),
            "seed=3",
        ],
    )
    assert config.optim.lr == pytest.approx(3e-4) and isinstance(config.optim.lr, float)
    assert config.optim.max_steps == 7
    assert config.optim.betas == [0.8, 0.95]
    assert config.lora.enabled is True
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.eval_split is None
    assert config.data.frame_size == [96, 128]
    assert config.data.success_cutoffs == {"metaworld": 1.0, "oxe": 0.95}
    assert config.output_dir == str(tmp_path / "run")
    assert config.seed == 3


def test_defaults_without_a_file_and_round_trip(tmp_path: Path) -> None:
    config = load_config(None, ["data.dataset=x", "model.preset=mid"])
    assert config.model.preset == "mid"
    assert config.optim.lr == pytest.approx(2e-5)  # official default
    path = tmp_path / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert isinstance(config, TrainConfig)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], "unknown config key optim.lrr (did you mean optim.lr?)"),
        (["nosuchsection.x=1"], "unknown config key nosuchsection"),
        (["optim.lr=abc"], "optim.lr must be a number"),
        (["optim.max_steps=1.5"], "optim.max_steps must be an integer"),
        (["lora.enabled=maybe"], "lora.enabled must be true or false"),
        (["optim.betas=0.9"], "optim.betas must be a list"),
        (["optim.lr=-1"], "optim.lr must be > 0"),
        (["optim.warmup_ratio=1.5"], "optim.warmup_ratio must be in [0, 1)"),
        (["model.preset=huge"], "model.preset must be one of"),
        (["distributed.strategy=deepspeed"], "distributed.strategy must be auto, ddp or fsdp"),
        (["data.strategy_ratio=[1,1]"], "data.strategy_ratio needs 4 weights"),
        (["data.strategy_ratio=[0,0,0,0]"], "data.strategy_ratio weights must be >= 0 with a positive sum"),
        (["optim=3"], "optim must be a mapping"),
        (["optim.lr.x=1"], "lr is a value, not a section"),
        (["noequals"], "is not of the form key=value"),
        (["data.frame_size=[60, 64]"], "data.frame_size must be null or [height, width], multiples of 32"),
        (["data.success_cutoffs={a: 1.5}"], "data.success_cutoffs values must be in (0, 1]"),
        (["data.success_cutoffs=[1]"], "data.success_cutoffs must be a mapping"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(RECIPES / "tiny_cpu.yaml", ["data.dataset=d", *overrides])
    assert message in str(info.value)


def test_required_keys() -> None:
    with pytest.raises(ConfigError, match=r"data\.dataset is required"):
        load_config(RECIPES / "tiny_cpu.yaml")
    with pytest.raises(ConfigError, match=r"model\.init_checkpoint is required with model\.preset qwen3vl_4b"):
        load_config(RECIPES / "full_4b_fsdp.yaml", ["data.dataset=d"])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_parse_override_and_apply() -> None:
    assert parse_override("a.b=c") == (["a", "b"], "c")
    assert parse_override("--x=1") == (["x"], 1)
    tree: dict = {"a": {"b": 1}}
    apply_overrides(tree, ["a.c=2", "d.e=[1, 2]"])
    assert tree == {"a": {"b": 1, "c": 2}, "d": {"e": [1, 2]}}
