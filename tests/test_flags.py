"""The stage registry and its flags: every option of every command sets the config field it names,
shows the schema's default in --help, and no stage is missing from the registry."""

import importlib
import typing

import click
import pytest
import typer

from align import config as schema
from align.cli import app, build_stage_config
from align.errors import ConfigError
from align.stages import STAGES

RUN_OPTIONS = {"config", "stage", "set_", "resume", "overwrite", "num_processes", "accelerate_config", "quiet", "verbose"}
# The least each stage needs before one more flag is tried on top.
REQUIRED = {"model.path": "m", "output": "out", "data.path": "d.jsonl", "prompts.path": "p.jsonl"}
EXTRA = {"label": {"judge": "j", "pairs.path": "pairs.jsonl", "question": "q"}, "ppo": {"reward_fn": "r.py:f", "question": "q"},
         "grpo": {"reward_fns": ["r.py:f"], "question": "q"}, "rloo": {"reward_fns": ["r.py:f"], "question": "q"},
         "eval": {"question": "q", "prompts.path": "p.jsonl"}, "best-of-n": {"reward_fn": "r.py:f", "question": "q"},
         "label-steps": {"answer_fn": "a.py:f"}}


def _commands() -> dict[str, click.Command]:
    return typer.main.get_command(app).commands


def test_every_command_takes_quiet_and_verbose_after_its_name():
    for name, command in _commands().items():
        options = {opt for param in command.params for opt in param.opts}
        assert {"-q", "--quiet", "-v", "--verbose"} <= options, name


def test_every_stage_is_registered_with_a_module_and_its_own_config():
    configs = {cls for cls in vars(schema).values() if isinstance(cls, type) and issubclass(cls, schema.StageConfig)
               and "stage" in cls.model_fields}
    assert {s.config for s in STAGES.values()} == configs
    for name, stage in STAGES.items():
        assert stage.config.model_fields["stage"].default == name
        assert callable(importlib.import_module(stage.module).run)
        assert name in _commands()


@pytest.mark.parametrize("name", list(STAGES))
def test_every_option_maps_to_a_config_field_with_a_description(name):
    stage, command = STAGES[name], _commands()[name]
    flags = {f.param: f for f in stage.flags}
    assert len(flags) == len(stage.flags), "two flags of one command share a name"
    for param in command.params:
        if param.name in RUN_OPTIONS:
            continue
        flag = flags[param.name]  # KeyError: an option no flag declares
        flag.field(stage.config)  # KeyError: a flag whose key is not in the schema
        assert flag.describe(stage.config), f"{flag.names[0]} of align {name} has no help"
    assert set(flags) <= {p.name for p in command.params}


def _value(flag, config):
    """A value for the flag other than its default, of the type the command line hands over."""
    field = flag.field(config)
    kind = flag.value_type(config)
    if kind is bool:
        return not field.default if flag.off else True
    if kind is int:
        return 2 * (field.default or 1)
    if kind is float:
        return ((field.default or 0.0) + 1) / 2
    if kind == list[str]:
        return ["x"]
    args = typing.get_args(field.annotation)
    literal = next((a for a in [field.annotation, *args] if typing.get_origin(a) is typing.Literal), None)
    return typing.get_args(literal)[-1] if literal else "value"


@pytest.mark.parametrize("name", list(STAGES))
def test_every_flag_sets_its_field(name):
    """Each flag on its own: the built config holds its value at its key, or validation refused
    the value naming that key (which it could only do if the value got there)."""
    stage = STAGES[name]
    required = {name for name, field in stage.config.model_fields.items() if field.is_required()}
    base = {f: REQUIRED[f.key] for f in stage.flags if f.key in REQUIRED and f.key.split(".")[0] in required}
    base |= {f: v for f in stage.flags for k, v in EXTRA.get(name, {}).items() if f.key == k}
    for flag in stage.flags:
        value = _value(flag, stage.config)
        try:
            built = build_stage_config(stage, None, None, None, {**base, flag: value})
        except ConfigError as exc:
            named = [flag.names[0], *flag.key.split(".")]
            assert any(part in str(exc) for part in named), (flag.names[0], str(exc))
            continue
        found = built
        for part in flag.key.split("."):
            found = getattr(found, part)
        if isinstance(value, list):
            found = [getattr(item, "path", item) for item in found]
        elif flag.key in ("judge", "reward_judge"):
            found = found.model
        assert found == value, flag.names[0]


def _help_of(page: str, option: str) -> str:
    """The help text of one option on a --help page, on one line."""
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(option))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("  -")), len(lines))
    return " ".join(" ".join(lines[start:end]).split())


def test_help_shows_the_schema_defaults(align):
    ppo = align("ppo", "--help").out
    assert "[default: 512]" in _help_of(ppo, "--episodes")
    assert "[default: 16]" in _help_of(ppo, "--batch-size")  # PPO's own default, not TrainSpec's 4
    sft = align("sft", "--help").out
    for option, default in [("--save-steps", "50"), ("--learning-rate", "0.0002"), ("--lr-scheduler", "linear"),
                            ("--lora / --no-lora", "lora"), ("--completion-only-loss / --full-loss", "completion-only-loss")]:
        assert f"[default: {default}]" in _help_of(sft, option), option
    assert "[default:" not in _help_of(sft, "--max-steps")  # no default: epochs decide


def test_the_trainer_flags_a_new_user_reaches_for(align, monkeypatch):
    seen = {}
    monkeypatch.setattr("align.pipeline.run_stage", lambda config: seen.setdefault("config", config))
    result = align("sft", "-m", "m", "-d", "d.jsonl", "-o", "out", "--save-steps", "5", "--eval-steps", "3", "--logging-steps", "2",
          "--gradient-accumulation-steps", "4", "--warmup-ratio", "0.1", "--lr-scheduler", "cosine",
          "--gradient-checkpointing", "--precision", "bf16", "--dtype", "bfloat16")
    assert result.code == 0, result.err
    train = seen["config"].train
    assert (train.save_steps, train.eval_steps, train.logging_steps, train.grad_accum) == (5, 3, 2, 4)
    assert (train.warmup_ratio, train.lr_scheduler, train.gradient_checkpointing) == (0.1, "cosine", True)
    assert (train.precision, seen["config"].model.dtype) == ("bf16", "bfloat16")


def test_a_judge_flag_is_a_model_or_a_url_and_keeps_its_other_flags(align, monkeypatch):
    seen = {}
    monkeypatch.setattr("align.pipeline.run_stage", lambda config: seen.setdefault("config", config))
    result = align("label", "--judge", "http://localhost:1/v1", "--judge-model", "m", "--pairs", "p.jsonl", "-o", "o.jsonl",
                   "--question", "Which is kinder?")
    assert result.code == 0, result.err
    judge = seen["config"].judge
    assert (judge.url, judge.model, judge.api_model) == ("http://localhost:1/v1", None, "m")


def test_the_readme_config_reference_is_the_schema():
    from pathlib import Path

    from align.reference import readme_with_reference, reference

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert readme_with_reference(readme) == readme, "run: python -m align.reference --write README.md"
    text = reference()
    for stage in STAGES:
        assert f"**`{stage}`**" in text
    assert "| `kl_horizon` | `10000` | adaptive KL controller's horizon" in text


def _bound(field):
    """A value just outside the field's numeric bounds, or None where it has none."""
    for rule in field.metadata:
        for name, outside in (("gt", lambda b: b), ("ge", lambda b: b - 1), ("lt", lambda b: b), ("le", lambda b: b + 1)):
            bound = getattr(rule, name, None)
            if bound is not None:
                return outside(bound)
    args = typing.get_args(field.annotation)
    for arg in args:  # Optional[PositiveInt] and the like
        for rule in getattr(arg, "__metadata__", ()):
            for name, outside in (("gt", lambda b: b), ("ge", lambda b: b - 1), ("lt", lambda b: b), ("le", lambda b: b + 1)):
                bound = getattr(rule, name, None)
                if bound is not None:
                    return outside(bound)
    return None


@pytest.mark.parametrize("name", list(STAGES))
def test_every_flag_refuses_a_wrong_value_in_one_line(name, align):
    """Every numeric flag just outside its bounds, every choice flag with a made-up choice, every
    number flag with a word: exit 2 and one line naming the flag or its key, before anything loads."""
    stage = STAGES[name]
    required = {name for name, field in stage.config.model_fields.items() if field.is_required()}
    base = [x for f in stage.flags if f.key in REQUIRED and f.key.split(".")[0] in required for x in (f.names[0], REQUIRED[f.key])]
    base += [x for f in stage.flags for k, v in EXTRA.get(name, {}).items() if f.key == k
             for x in (f.names[0], v[0] if isinstance(v, list) else v)]
    tried = 0
    for flag in stage.flags:
        field, kind = flag.field(stage.config), flag.value_type(stage.config)
        wrong = []
        if kind in (int, float):
            wrong.append("many")
            if _bound(field) is not None:
                wrong.append(str(_bound(field)))
        elif kind is str and "(" in flag.describe(stage.config) and " | " in flag.describe(stage.config):
            wrong.append("no-such-choice")
        for value in wrong:
            result = align(name, *base, flag.names[0], value)
            tried += 1
            assert result.code == 2, (flag.names[0], value, result.err)
            lines = result.err.strip().splitlines()
            assert "Traceback" not in result.err and (len(lines) == 1 or "Usage:" in result.err), result.err
            assert flag.names[0] in result.err or flag.key.split(".")[-1] in result.err, (flag.names[0], value, result.err)
    assert tried


def test_the_terminal_shows_one_bar_per_stage_and_the_dicts_only_with_verbose(sft_file, tmp_path, tiny_model):
    """Without -v: align's bar with the loss beside it, no per-step dicts, no library bars; with -v
    the dicts are back. The metrics log has every step either way."""
    import os
    import subprocess
    import sys

    # In-process runs with -q (the align fixture) leave their progress settings in os.environ.
    quiet = {"TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"}
    env = {**{k: v for k, v in os.environ.items() if k not in quiet}, "COLUMNS": "120"}
    runs = {}
    # -v and -q work before the command (`align -v sft`) and after it (`align sft ... -q`)
    for name, before, after in (("plain", [], []), ("verbose", ["-v"], []), ("verbose after", [], ["-v"]),
                                ("quiet after", [], ["-q"])):
        out = tmp_path / name.replace(" ", "-")
        done = subprocess.run([sys.executable, "-m", "align", *before, "sft", "-m", "tiny", "-d", str(sft_file), "-o", str(out),
                               "--max-steps", "3", "--batch-size", "4", *after], capture_output=True, text=True, env=env,
                              timeout=600)
        assert done.returncode == 0, done.stderr
        runs[name] = done.stdout + done.stderr  # tqdm writes the dicts to stdout
        assert len((out / "metrics.jsonl").read_text().splitlines()) >= 3
    plain = runs["plain"]
    assert "loss=" in plain and "3/3" in plain
    assert "{'loss'" not in plain and "Loading weights" not in plain and "Writing model shards" not in plain
    assert "{'loss'" in runs["verbose"] and "{'loss'" in runs["verbose after"]
    assert "align: batch:" in plain
    assert "3/3" not in runs["quiet after"] and "align: batch:" not in runs["quiet after"], runs["quiet after"]
