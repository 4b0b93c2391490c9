"""Recipes: shared blocks plus an ordered list of stages, resolved into one typed config per stage.

```yaml
output_dir: runs/demo          # each stage writes to output_dir/<stage name>
model: smollm2-135m-instruct   # shared blocks: model, lora, data, train
lora: {r: 8}
stages:
  - name: sft
    data: data/sft.jsonl
  - name: dpo
    from: sft                  # start from the sft stage's output
    data: data/pairs.jsonl
```
Relative data paths are read relative to the recipe file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align import stages
from align.config import StageConfig
from align.config_files import deep_merge, parse_override, read_yaml, set_path
from align.errors import ConfigError
from align.validation import build_config

SHARED_BLOCKS = ("model", "lora", "data", "train")
RECIPE_KEYS = ("name", "output_dir", "stages", *SHARED_BLOCKS)
STAGE_KEYS = ("name", "stage", "from", "reward_from", "data_from")
PATH_FIELDS = (
    ("data", "path"), ("data", "eval_path"), ("prompts", "path"), ("eval_prompts", "path"), ("pairs", "path"),
    ("model", "path"), ("model", "chat_template"), ("reward_model", "path"), ("judge", "model"), ("reward_judge", "model"),
)


@dataclass
class Recipe:
    path: Path
    name: str
    output_dir: Path
    stages: list[StageConfig]


def load_recipe(path: Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a whole recipe; every stage's config is checked here."""
    raw = read_yaml(path)
    stage_names = [s.get("name") for s in raw.get("stages", []) if isinstance(s, dict)]
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] in stage_names and len(keys) > 1:
            stage = raw["stages"][stage_names.index(keys[0])]
            set_path(stage, keys[1:], value)
        else:
            set_path(raw, keys, value)
    return resolve_recipe(path, raw)


def resolve_recipe(path: Path, raw: dict[str, Any]) -> Recipe:
    unknown = [k for k in raw if k not in RECIPE_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {unknown[0]!r}; a recipe has {', '.join(RECIPE_KEYS)}")
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: a recipe needs a non-empty 'stages:' list")
    name = str(raw.get("name") or path.stem)
    output_dir = Path(raw.get("output_dir") or Path("runs") / name)
    shared = {key: raw[key] for key in SHARED_BLOCKS if key in raw}
    earlier: dict[str, StageConfig] = {}
    configs = []
    for index, entry in enumerate(stages):
        where = f"{path}: stages[{index}]"
        # Against the recipe's absolute directory: `align run x.yaml` and `align run ./x.yaml` or
        # `/abs/x.yaml` from the same place make the same configs, so a rerun skips what is finished.
        config = _resolve_stage(entry, where, shared, earlier, output_dir, path.absolute().parent)
        earlier[config.name] = config
        configs.append(config)
    return Recipe(path=path, name=name, output_dir=output_dir, stages=configs)


def _resolve_stage(
    entry: Any, where: str, shared: dict, earlier: dict[str, StageConfig], output_dir: Path, base_dir: Path
) -> StageConfig:
    outputs = {name: config.output for name, config in earlier.items()}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each stage is a mapping with at least 'name', got {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: every stage needs a 'name'")
    where = f"{where} ({name})"
    if name in outputs:
        raise ConfigError(f"{where}: stage name {name!r} is used twice; give each stage its own name")
    kind = entry.get("stage", name)
    if kind not in stages.STAGES:
        raise ConfigError(
            f"{where}: unknown stage type {kind!r}; set 'stage:' to one of {', '.join(stages.STAGES)}"
        )
    stage = stages.STAGES[kind]
    cls = stage.config
    body = {k: v for k, v in entry.items() if k not in STAGE_KEYS}
    merged = deep_merge({k: v for k, v in shared.items() if k in cls.model_fields}, body)
    merged["name"] = name
    merged.setdefault("output", str(stage.output_path(output_dir, name)))
    # Paths written in the recipe are resolved against it; earlier stages' outputs (from:,
    # reward_from:, data_from:) are not: they must read the same on every run of the recipe.
    for block, key in PATH_FIELDS:
        _resolve_relative(merged, block, key, base_dir)
    if "from" in entry:
        merged = deep_merge(merged, {"model": {"path": _resolve_from(entry["from"], where, outputs)}})
    if "reward_from" in entry:
        reward = _resolve_from(entry["reward_from"], where, outputs)
        if "reward_models" in cls.model_fields:  # eval, grpo and rloo take a list of reward models
            merged["reward_models"] = [*merged.get("reward_models", []), reward]
        else:
            merged = deep_merge(merged, {"reward_model": {"path": reward}})
    if "data_from" in entry:
        merged = deep_merge(merged, {"data": {"path": _data_from(entry["data_from"], stage, where, earlier)}})
    if isinstance(merged.get("constitution"), str):
        candidate = base_dir / merged["constitution"]
        if candidate.is_file():
            merged["constitution"] = str(candidate)
    _resolve_reward_fn(merged, base_dir)
    return build_config(cls, merged, where)


def _resolve_from(source: Any, where: str, outputs: dict[str, str]) -> str:
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{where}: 'from' must name an earlier stage or a model path, got {source!r}")
    if source in outputs:
        return outputs[source]
    if Path(source).exists() or "/" in source:
        return source
    earlier = ", ".join(outputs) or "none"
    raise ConfigError(
        f"{where}: 'from: {source}' is not an earlier stage (earlier stages: {earlier}) "
        "nor an existing path; stages can only start from stages listed before them"
    )


def _data_from(source: Any, stage: stages.Stage, where: str, earlier: dict[str, StageConfig]) -> str:
    """The data file an earlier stage wrote: a label/generate stage's file, or the file of a
    data-writing stage (critique's sft.jsonl or pairs.jsonl) that this stage reads."""
    if not isinstance(source, str) or source not in earlier:
        names = ", ".join(earlier) or "none"
        raise ConfigError(f"{where}: 'data_from: {source}' must name an earlier stage (earlier stages: {names})")
    output, kind = earlier[source].output, earlier[source].stage
    writer = stages.STAGES[kind]
    if writer.output:  # a stage whose output is one file
        return output
    readers = [s.name for s in stages.STAGES.values() if s.reads]
    if not stage.reads:
        raise ConfigError(f"{where}: 'data_from' gives training data to {', '.join(readers)} stages, not to {stage.name!r}")
    if stage.reads not in writer.writes:
        raise ConfigError(f"{where}: 'data_from: {source}': a {kind} stage writes no {stage.reads} data for {stage.name} to read")
    return str(Path(output) / writer.writes[stage.reads])


def _resolve_relative(config: dict, block: str, key: str, base_dir: Path) -> None:
    """Paths written in a recipe are relative to the recipe file when the file exists there."""
    value = config.get(block)
    if isinstance(value, str) and key == "path":
        value = config[block] = {"path": value}
    if not isinstance(value, dict) or not isinstance(value.get(key), str):
        return
    candidate = base_dir / value[key]
    if not Path(value[key]).is_absolute() and candidate.exists():
        value[key] = str(candidate)


def _resolve_reward_fn(config: dict, base_dir: Path) -> None:
    """`reward_fn: rewards.py:score` (or a `reward_fns` list) in a recipe means the file beside the recipe."""

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and ".py:" in value:
            file, _, function = value.rpartition(":")
            if not Path(file).is_absolute() and (base_dir / file).is_file():
                return f"{base_dir / file}:{function}"
        return value

    if "reward_fn" in config:
        config["reward_fn"] = resolve(config["reward_fn"])
    if isinstance(config.get("reward_fns"), list):
        config["reward_fns"] = [resolve(v) for v in config["reward_fns"]]


def stage_from_file(path: Path, kind: str, stage_name: str | None) -> dict[str, Any]:
    """The raw config for one `align <kind> --config FILE` run.

    FILE is either a plain stage config or a recipe; from a recipe the stage is picked by
    `--stage NAME`, or as the only stage of this kind, with the recipe's shared blocks applied.
    """
    raw = read_yaml(path)
    if "stages" not in raw:
        return raw
    recipe = resolve_recipe(path, raw)
    matching = [c for c in recipe.stages if c.stage == kind and (stage_name is None or c.name == stage_name)]
    if len(matching) != 1:
        names = [c.name for c in recipe.stages if c.stage == kind]
        asked = f"no {kind} stage is named {stage_name!r}; " if stage_name and names else ""
        detail = f"{asked}its {kind} stages are: {', '.join(names)}; pick one with --stage NAME" if names else f"it has no {kind} stage"
        raise ConfigError(f"{path}: cannot pick the {kind} stage to run: {detail}")
    return matching[0].model_dump(mode="json", exclude_none=True)
