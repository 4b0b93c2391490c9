"""Command-line flags, each declared once with the config field it sets.

A flag's type, default and help come from that field in the schema (align/config.py), so
`--help` shows the default a run will use and a flag cannot drift from its field. The stages
list their flags in align/stages/__init__.py; align/cli.py turns them into typer options.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from align.validation import model_in

UNIONS = (typing.Union, types.UnionType)


@dataclass(frozen=True)
class Flag:
    """`--name VALUE` sets the config field at `key` (a dotted path, e.g. `ppo.episodes`)."""

    key: str
    names: tuple[str, ...]
    help: str = ""  # only where the field's own description does not fit the command line
    off: str = ""  # a boolean's flag that sets it false (`--no-lora`); without one the flag sets true

    @property
    def param(self) -> str:
        """The python parameter name typer passes the value as."""
        return self.names[0].lstrip("-").replace("-", "_")

    def field(self, config: type[BaseModel]):
        """The schema field this flag sets in `config`; KeyError when there is none."""
        return self._fields(config)[-1]

    def _fields(self, config: type[BaseModel]) -> list:
        """The fields along the key's path, outermost first."""
        block, fields = config, []
        for part in self.key.split("."):
            if block is None:
                raise KeyError(self.key)
            fields.append(block.model_fields[part])
            block = model_in(fields[-1].annotation)
        return fields

    def value_type(self, config: type[BaseModel]) -> Any:
        """What the command line hands over: bool, int, float, str, or list[str] for a repeatable flag."""
        annotation = self.field(config).annotation
        if typing.get_origin(annotation) is list:
            return list[str]
        scalar = _scalar(annotation)
        return scalar if scalar in (bool, int, float) else str

    def describe(self, config: type[BaseModel]) -> str:
        """The help text: the field's description; for `block.path` the block's, which says what the file is for."""
        fields = self._fields(config)
        field = fields[-1]
        text = self.help or field.description or ""
        if self.key.endswith(".path") and not self.help and fields[-2].description:
            text = fields[-2].description
        choices = _choices(field.annotation)
        if choices:
            text += f" ({' | '.join(choices)})"
        return text[:1].upper() + text[1:]

    def default_shown(self, config: type[BaseModel]) -> str | None:
        """The schema's default as --help shows it; None where there is nothing to show."""
        field = self.field(config)
        default = field.get_default(call_default_factory=True)
        if default is PydanticUndefined or default is None or default == [] or default == {}:
            return None
        if isinstance(default, bool):
            if not self.off:
                return None  # an on-only flag: its absence is the default
            return self.names[0].lstrip("-") if default else self.off.lstrip("-")
        return repr(default) if isinstance(default, str) and not default.isprintable() else str(default)  # "\\n", not a line break


def flag(key: str, *names: str, help: str = "", off: str = "") -> Flag:
    return Flag(key, names, help, off)


def _scalar(annotation: Any) -> Any:
    """The plain type inside Optional[...], Annotated[...] and Literal[...]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _scalar(typing.get_args(annotation)[0])
    if origin is Literal:
        return type(typing.get_args(annotation)[0])
    if origin in UNIONS:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar(options[0]) if len(options) == 1 else str
    return annotation


def _choices(annotation: Any) -> list[str]:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    if origin is typing.Annotated or origin in UNIONS:
        return [c for a in typing.get_args(annotation) for c in _choices(a)]
    return []


# Flags many stages share ---------------------------------------------------------------------

MODEL = flag("model.path", "--model", "-m")
OUTPUT = flag("output", "--output", "-o")
SEED = flag("train.seed", "--seed")
LORA = (flag("lora.enabled", "--lora", off="--no-lora"), flag("lora.qlora", "--qlora"),
        flag("lora.trainable_layers", "--trainable-layers"))
PRECISION = (flag("model.dtype", "--dtype"), flag("train.precision", "--precision"))
ENGINE = flag("generation.engine", "--engine")  # every stage that samples

# The optimiser, schedule and checkpoint cadence of every training stage.
OPTIMISATION = (
    flag("train.max_steps", "--max-steps"), flag("train.epochs", "--epochs"), flag("train.batch_size", "--batch-size"),
    flag("train.learning_rate", "--learning-rate", "--lr"), flag("train.lr_scheduler", "--lr-scheduler"),
    flag("train.warmup_ratio", "--warmup-ratio"), flag("train.grad_accum", "--gradient-accumulation-steps"),
    flag("train.gradient_checkpointing", "--gradient-checkpointing", off="--no-gradient-checkpointing"),
    flag("train.save_steps", "--save-steps"), flag("train.logging_steps", "--logging-steps"), SEED, flag("train.report_to", "--report-to"),
)
TRAINING_DATA = (
    flag("data.path", "--data", "-d"), flag("data.eval_path", "--eval-data"), flag("data.eval_fraction", "--eval-fraction"),
    flag("data.max_length", "--max-length"),
)
# sft, rm and dpo: a data file, an optimiser, LoRA.
TRAINER = (MODEL, *TRAINING_DATA, OUTPUT, *OPTIMISATION, flag("train.eval_steps", "--eval-steps"), *LORA, *PRECISION)

PROMPTS = flag("prompts.path", "--prompts", "-p")
JUDGE_QUESTION = (flag("constitution", "--constitution"), flag("question", "--question"))
# An AI judge as a reward source (ppo, grpo, rloo, eval).
REWARD_JUDGE = (
    flag("reward_judge", "--reward-judge"), flag("reward_judge.api_model", "--judge-model"),
    flag("reward_judge.chain_of_thought", "--judge-cot"), *JUDGE_QUESTION,
)
# Several reward sources at once (grpo, rloo, eval): every flag repeatable.
REWARD_SOURCES = (flag("reward_models", "--reward-model"), flag("reward_fns", "--reward-fn"), *REWARD_JUDGE,
                  flag("reward_aggregate", "--reward-aggregate"))

SAMPLING = (
    flag("sampling.num_samples", "--num-samples", "-n"), flag("sampling.max_new_tokens", "--max-new-tokens"),
    flag("sampling.temperature", "--temperature"), flag("sampling.batch_size", "--batch-size"),
    flag("sampling.seed", "--seed"),
)
