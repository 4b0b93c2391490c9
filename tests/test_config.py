from pathlib import Path

import pytest

from align.config import SFTConfig, DPOConfig, RMConfig
from align.config_files import deep_merge, parse_override, set_path
from align.validation import build_config
from align.errors import ConfigError
from align.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
BASE = {"model": "tiny", "data": "d.jsonl", "output": "out"}


def test_shorthands_expand_and_defaults_come_from_the_schema():
    config = build_config(SFTConfig, BASE, "test")
    assert config.model.path == "tiny" and config.data.path == "d.jsonl"
    assert config.lora.enabled and config.lora.r == 16 and not config.lora.qlora
    assert config.train.learning_rate == 2e-4


def test_unknown_key_names_the_nearest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown key 'train.lerning_rate'; did you mean 'learning_rate'\?"):
        build_config(SFTConfig, {**BASE, "train": {"lerning_rate": 1e-4}}, "test")
    with pytest.raises(ConfigError, match=r"unknown key 'dpo'; valid keys: completion_only_loss, data, "):
        build_config(SFTConfig, {**BASE, "dpo": {"beta": 1}}, "test")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"train": {"learning_rate": -1e-4}}, "train.learning_rate"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"train": {"max_steps": 0}}, "train.max_steps"),
        ({"lora": {"enabled": False, "qlora": True}}, "qlora"),
        ({"data": {"path": "d.jsonl", "eval_fraction": 1.5}}, "data.eval_fraction"),
        ({"train": {"report_to": "neptune"}}, "train.report_to"),
    ],
)
def test_invalid_values_are_rejected_with_their_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        build_config(SFTConfig, {**BASE, **override}, "where.yaml")
    message = str(info.value)
    assert message.startswith("where.yaml: ") and fragment in message and "\n" not in message


def test_reward_models_refuse_truncation_and_dpo_checks_label_smoothing():
    with pytest.raises(ConfigError, match="truncate"):
        build_config(RMConfig, {**BASE, "data": {"path": "d.jsonl", "overlong": "truncate"}}, "t")
    assert build_config(RMConfig, BASE, "t").data.overlong == "drop"
    with pytest.raises(ConfigError, match="label_smoothing"):
        build_config(DPOConfig, {**BASE, "dpo": {"loss": "sigmoid", "label_smoothing": 0.1}}, "t")
    robust = build_config(DPOConfig, {**BASE, "dpo": {"loss": "cdpo", "label_smoothing": 0.1}}, "t")
    assert robust.dpo.trl_loss_type == "robust"
    assert build_config(DPOConfig, {**BASE, "dpo": {"loss": "length-normalized"}}, "t").dpo.trl_loss_type == "sigmoid_norm"


def test_overrides_parse_values_as_yaml_and_expand_shorthands():
    assert parse_override("train.learning_rate=1e-4") == (["train", "learning_rate"], 1e-4)
    assert parse_override("lora.enabled=false") == (["lora", "enabled"], False)
    raw = {"data": "d.jsonl", "lora": False}
    set_path(raw, ["data", "max_length"], 64)
    assert raw["data"] == {"path": "d.jsonl", "max_length": 64}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("no-equals-sign")


def test_deep_merge_keeps_shared_settings_under_a_shorthand():
    merged = deep_merge({"data": {"max_length": 64}, "lora": {"r": 4}}, {"data": "x.jsonl", "lora": {"alpha": 8}})
    assert merged == {"data": {"max_length": 64, "path": "x.jsonl"}, "lora": {"r": 4, "alpha": 8}}


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_recipe_hands_outputs_forward_and_resolves_paths_relative_to_it(tmp_path):
    (tmp_path / "sft.jsonl").write_text("{}\n")
    recipe = load_recipe(write(tmp_path, """
output_dir: out
model: tiny
train: {max_steps: 2}
stages:
  - name: sft
    data: sft.jsonl
  - name: dpo
    from: sft
    data: {path: sft.jsonl}
    train: {max_steps: 5}
"""), ["sft.train.learning_rate=0.5", "lora.r=4"])
    sft, dpo = recipe.stages
    assert dpo.model.path == sft.output == str(Path("out") / "sft")
    assert sft.data.path == str(tmp_path / "sft.jsonl")
    assert sft.train.learning_rate == 0.5 and dpo.train.learning_rate == 2e-4
    assert sft.train.max_steps == 2 and dpo.train.max_steps == 5
    assert sft.lora.r == dpo.lora.r == 4


@pytest.mark.parametrize(
    "stages, fragment",
    [
        ("  - {name: sft, data: d.jsonl}\n  - {name: dpo, from: later, data: d.jsonl}\n  - {name: later, stage: sft, data: d.jsonl}", "not an earlier stage"),
        ("  - {name: sft, from: sft, data: d.jsonl}", "not an earlier stage"),
        ("  - {name: sft, data: d.jsonl}\n  - {name: sft, data: d.jsonl}", "used twice"),
        ("  - {name: train-it, data: d.jsonl}", "unknown stage type 'train-it'"),
        ("  - {name: sft, data: d.jsonl, epocs: 3}", "unknown key 'epocs'"),
        ("  - {name: sft}", "missing required key 'data'"),
        ("  - just-a-string", "each stage is a mapping"),
    ],
)
def test_bad_recipes_fail_with_the_stage_named(tmp_path, stages, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        load_recipe(write(tmp_path, f"model: tiny\nstages:\n{stages}\n"))
    assert str(tmp_path / "recipe.yaml") in str(info.value)


def test_recipes_share_blocks_through_yaml_anchors_and_merge_keys(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    recipe = load_recipe(write(tmp_path, """
model: tiny
stages:
  - &sft {name: sft, data: d.jsonl, train: {max_steps: 3, learning_rate: 0.1}}
  - {<<: *sft, name: sft-again, stage: sft}
"""))
    first, again = recipe.stages
    assert again.name == "sft-again" and again.data.path == first.data.path
    assert again.train.max_steps == 3 and again.train.learning_rate == 0.1
    with pytest.raises(ConfigError, match="'name' twice"):  # a key written twice beside a merge is still refused
        load_recipe(write(tmp_path, "model: tiny\nstages:\n  - &s {name: a, data: d.jsonl}\n  - {<<: *s, name: b, name: c}\n"))


def test_recipe_resolves_reward_sources_from_earlier_stages_and_files(tmp_path):
    (tmp_path / "p.jsonl").write_text("{}\n")
    (tmp_path / "score.py").write_text("def f(p, c):\n    return [0.0] * len(c)\n")
    recipe = load_recipe(write(tmp_path, """
model: tiny
stages:
  - {name: rm, data: p.jsonl}
  - {name: ppo, from: rm, reward_from: rm, prompts: p.jsonl}
  - {name: ppo2, stage: ppo, reward_fn: "score.py:f", prompts: p.jsonl}
"""))
    rm, ppo, ppo2 = recipe.stages
    assert ppo.reward_model.path == rm.output
    assert ppo2.reward_fn == f"{tmp_path / 'score.py'}:f"


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_recipe(write(tmp_path, "stages: [\n  - {name: sft\n"))
    with pytest.raises(ConfigError, match="non-empty 'stages:'"):
        load_recipe(write(tmp_path, "model: tiny\n"))
    with pytest.raises(ConfigError, match="unknown top-level key 'stagez'"):
        load_recipe(write(tmp_path, "stagez: []\n"))


ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
RECIPES = sorted(set((ROOT / "recipes").rglob("*.yaml")) - set(ACCELERATE_CONFIGS))


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_shipped_recipe_validates_and_its_data_exists(path):
    recipe = load_recipe(path)
    assert recipe.stages
    made: list[Path] = []  # outputs of earlier stages (data_from hands their files on)
    for config in recipe.stages:
        for data_file in config.data_files():
            produced = any(Path(data_file) == out or out in Path(data_file).parents for out in made)
            assert produced or Path(data_file).is_file(), f"{path}: {config.name} reads missing {data_file}"
        made.append(Path(config.output))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_shipped_accelerate_configs_are_what_accelerate_reads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    expected = {"ddp.yaml": "MULTI_GPU", "multi-node.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP",
                "zero2.yaml": "DEEPSPEED", "zero3.yaml": "DEEPSPEED"}[path.name]
    assert str(config.distributed_type).endswith(expected)
    assert config.num_processes >= 2
    if path.name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(path.name[4])
    if path.name == "multi-node.yaml":
        assert config.num_machines == 2 and config.main_process_ip


def test_there_are_recipes_to_check():
    assert {p.name for p in RECIPES} >= {"tiny.yaml", "quickstart.yaml"}
