"""Typed, closed configs for every stage, recipe loading and `--set` overrides.

A config is validated before any model loads. Unknown keys are errors that name the key and
the nearest valid one; defaults live here and nowhere else.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from align.errors import ConfigError

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class Closed(BaseModel):
    """A config block that rejects keys it does not know."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSpec(Closed):
    """Which model a stage starts from and how to load it."""

    path: str = Field(min_length=1, description="local dir, hub id, or built-in name (align models)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="load pickled .bin/.pt weights (they can run code); safetensors only otherwise")
    chat_template: str | None = Field(None, description="a Jinja file to use instead of the tokenizer's")
    revision: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class LoraSpec(Closed):
    """LoRA adapters (on by default) and QLoRA's 4-bit base."""

    enabled: bool = True
    r: PositiveInt = 16
    alpha: PositiveFloat = 32.0
    dropout: Fraction = 0.05
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    qlora: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _qlora_needs_lora(self) -> LoraSpec:
        if self.qlora and not self.enabled:
            raise ValueError("qlora trains LoRA adapters on a 4-bit base: it cannot be combined with lora disabled")
        return self


class DataSpec(Closed):
    """A data file (or hub dataset) and how to read it."""

    path: str = Field(min_length=1)
    eval_path: str | None = None
    eval_fraction: Fraction = 0.0
    columns: dict[str, str] = Field(default_factory=dict, description="expected name -> name in the file")
    split: str = "train"
    max_length: PositiveInt = 1024
    overlong: Literal["truncate", "drop"] = "truncate"
    chat_template: Literal["auto", "always", "never"] = "auto"
    max_rows: PositiveInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class TrainSpec(Closed):
    """Optimisation, logging and checkpointing settings shared by all training stages."""

    max_steps: PositiveInt | None = Field(None, description="stop after this many optimizer steps (wins over epochs)")
    epochs: PositiveFloat = 1.0
    batch_size: PositiveInt = 4
    grad_accum: PositiveInt = 1
    learning_rate: PositiveFloat = 2e-4
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: Fraction = 0.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: PositiveFloat = 1.0
    seed: int = 42
    logging_steps: PositiveInt = 1
    save_steps: PositiveInt = 50
    save_total_limit: PositiveInt = 2
    eval_steps: PositiveInt | None = None
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="compute precision (autocast): auto = bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU"
    )
    report_to: Literal["none", "tensorboard", "trackio", "wandb", "mlflow"] = "none"


class PPOTrain(TrainSpec):
    """PPO's defaults: batch_size is the rollout batch; RL wants a small learning rate."""

    batch_size: PositiveInt = 16
    learning_rate: PositiveFloat = 1e-5
    save_steps: PositiveInt = 10


class OnlineTrain(TrainSpec):
    batch_size: PositiveInt = 8
    learning_rate: PositiveFloat = 1e-5


class StageConfig(Closed):
    """Fields every stage has."""

    name: str | None = None
    model: ModelSpec
    output: str = Field(min_length=1)
    resume: bool = False
    overwrite: bool = False

    # These change how a run proceeds, never what it produces.
    RUN_CONTROL_FIELDS: ClassVar[frozenset[str]] = frozenset({"resume", "overwrite", "name"})

    def identity(self) -> dict[str, Any]:
        """The part of the config that decides the output (for `align run`'s skip check)."""
        return self.model_dump(mode="json", exclude=set(self.RUN_CONTROL_FIELDS))

    def data_files(self) -> list[str]:
        """The data this stage reads (fingerprinted into the manifest)."""
        return []


class TrainStageConfig(StageConfig):
    lora: LoraSpec = Field(default_factory=LoraSpec)
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)

    def data_files(self) -> list[str]:
        return [p for p in (self.data.path, self.data.eval_path) if p]


class SFTConfig(TrainStageConfig):
    stage: Literal["sft"] = "sft"
    completion_only_loss: bool = Field(True, description="train on responses only, not prompts")
    packing: bool = False


class RewardDataSpec(DataSpec):
    """A reward model scores the end of a sequence, so over-long pairs are dropped, never cut."""

    overlong: Literal["truncate", "drop"] = "drop"

    @model_validator(mode="after")
    def _no_truncation(self) -> RewardDataSpec:
        if self.overlong == "truncate":
            raise ValueError(
                "reward models cannot use overlong=truncate: a truncated pair would be scored on text that is "
                "not its response; use drop (the default) or raise max_length"
            )
        return self


class RMConfig(TrainStageConfig):
    stage: Literal["rm"] = "rm"
    data: RewardDataSpec
    center_rewards: Annotated[float, Field(ge=0)] = 0.01


DPO_LOSSES = {
    "sigmoid": "sigmoid",
    "dpo": "sigmoid",
    "ipo": "ipo",
    "hinge": "hinge",
    "robust": "robust",
    "cdpo": "robust",
    "length-normalized": "sigmoid_norm",
    "sigmoid_norm": "sigmoid_norm",
    "simpo": "sigmoid_norm",
    "exo_pair": "exo_pair",
    "nca_pair": "nca_pair",
    "bco_pair": "bco_pair",
    "sppo_hard": "sppo_hard",
    "aot": "aot",
    "apo_zero": "apo_zero",
    "apo_down": "apo_down",
    "discopop": "discopop",
}


class DPOSpec(Closed):
    beta: PositiveFloat = 0.1
    loss: Literal[tuple(DPO_LOSSES)] = "sigmoid"  # type: ignore[valid-type]
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    precompute_ref_log_probs: bool = False

    @property
    def trl_loss_type(self) -> str:
        return DPO_LOSSES[self.loss]

    @model_validator(mode="after")
    def _smoothing_only_where_used(self) -> DPOSpec:
        if self.label_smoothing and self.trl_loss_type not in {"robust", "exo_pair", "aot"}:
            raise ValueError(f"label_smoothing is used only by the robust (cDPO), exo_pair and aot losses, not by {self.loss!r}")
        return self


class DPOConfig(TrainStageConfig):
    stage: Literal["dpo"] = "dpo"
    dpo: DPOSpec = Field(default_factory=DPOSpec)


class SamplingSpec(Closed):
    num_samples: PositiveInt = 1
    max_new_tokens: PositiveInt = 128
    temperature: Annotated[float, Field(ge=0)] = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    batch_size: PositiveInt = 8
    seed: int = 42


class PairSampling(SamplingSpec):
    """Sampling two responses per prompt to compare; defaults set here so a partial block keeps them."""

    num_samples: Annotated[int, Field(ge=2)] = 2
    temperature: Annotated[float, Field(ge=0)] = 1.0


class EvalSampling(SamplingSpec):
    max_new_tokens: PositiveInt = 64


class GenerateConfig(StageConfig):
    stage: Literal["generate"] = "generate"
    prompts: DataSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)

    def data_files(self) -> list[str]:
        return [self.prompts.path]


class JudgeSpec(Closed):
    """An AI judge: a local causal LM (`model`) or an OpenAI-compatible completions endpoint (`url`)."""

    model: str | None = Field(None, description="local dir, stage output or built-in name")
    url: str | None = Field(None, description="http(s)://HOST:PORT[/v1] of an OpenAI-compatible server")
    api_model: str | None = Field(None, description="the model name the server knows (sent as 'model')")
    api_key_env: str = Field("ALIGN_JUDGE_API_KEY", description="environment variable holding the API key (never stored)")
    tokenizer: str | None = Field(None, description="for a URL judge: a local model whose chat template renders the prompt")
    chain_of_thought: bool = Field(False, description="the judge reasons first; the answer is read after its reasoning")
    reasoning_tokens: PositiveInt = 128
    batch_size: PositiveInt = 8
    top_logprobs: PositiveInt = Field(20, description="for a URL judge: how many next-token log-probs to ask for")
    retries: Annotated[int, Field(ge=0)] = 4
    backoff: Annotated[float, Field(ge=0)] = Field(1.0, description="seconds before the first retry; doubled after each")
    timeout: PositiveFloat = 60.0

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"url": value} if value.startswith(("http://", "https://")) else {"model": value}
        return value

    @model_validator(mode="after")
    def _one_backend(self) -> JudgeSpec:
        if (self.model is None) == (self.url is None):
            raise ValueError("a judge is either a local model (--judge MODEL) or a server (--judge-url URL), exactly one")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"judge url {self.url!r} must start with http:// or https://")
        return self


class JudgeQuestion(Closed):
    """Where a judge's question comes from: a constitution's principles, or one question."""

    constitution: str | None = Field(None, description="a constitution YAML or built-in name")
    question: str | None = Field(None, description="one question for every judgement")

    def _check_question(self, needed: bool) -> None:
        if self.constitution and self.question:
            raise ValueError("give --constitution or --question, not both")
        if needed and not (self.constitution or self.question):
            raise ValueError("a judge needs a question: --constitution FILE (or a built-in name) or --question TEXT")

    def question_files(self) -> list[str]:
        return [self.constitution] if self.constitution and Path(self.constitution).is_file() else []


class CritiqueConfig(StageConfig):
    """Constitutional AI's supervised stage: answer, critique under a drawn principle, revise."""

    stage: Literal["critique"] = "critique"
    prompts: DataSpec
    constitution: str = Field("harmless-helpful", description="a constitution YAML or built-in name")
    rounds: PositiveInt = 1
    samples_per_prompt: PositiveInt = 1
    few_shot: bool = Field(True, description="show each principle's worked examples before the model's turn")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)

    def data_files(self) -> list[str]:
        return [self.prompts.path] + ([self.constitution] if Path(self.constitution).is_file() else [])


class LabelConfig(JudgeQuestion, StageConfig):
    """RLAIF preference labels: a judge picks A or B for each pair, in both orders."""

    stage: Literal["label"] = "label"
    model: ModelSpec | None = Field(None, description="the policy that samples the pairs (with prompts)")
    judge: JudgeSpec
    pairs: DataSpec | None = None
    prompts: DataSpec | None = None
    sampling: PairSampling = Field(default_factory=PairSampling)
    swap: bool = Field(True, description="judge every pair in both orders and average (removes position bias)")
    min_confidence: Annotated[float, Field(ge=0.5, lt=1)] = Field(0.5, description="drop pairs labelled with less confidence")

    def data_files(self) -> list[str]:
        return [d.path for d in (self.pairs, self.prompts) if d] + self.question_files()

    @model_validator(mode="after")
    def _check(self) -> LabelConfig:
        self._check_question(needed=True)
        if (self.pairs is None) == (self.prompts is None):
            raise ValueError("give --pairs FILE (prompt + two responses), or --prompts FILE with --policy MODEL")
        if self.prompts is not None and self.model is None:
            raise ValueError("--prompts needs --policy MODEL to sample the responses to compare")
        return self


class PPOSpec(Closed):
    """PPO's rollout, reward-shaping and update settings (InstructGPT's RL step)."""

    episodes: PositiveInt = Field(512, description="total sampled responses")
    mini_batches: PositiveInt = 1
    micro_batch_size: PositiveInt = Field(
        4, description="rows per forward/backward pass in an update; the gradients add up to the mini-batch's, "
        "so this trades speed for memory without changing the result"
    )
    ppo_epochs: PositiveInt = 4
    max_new_tokens: PositiveInt = 64
    temperature: PositiveFloat = 0.7
    kl_coef: Annotated[float, Field(ge=0)] = 0.05
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k1"
    target_kl: PositiveFloat | None = Field(None, description="adapt kl_coef towards this KL per sequence")
    kl_horizon: PositiveInt = 10000
    gamma: Annotated[float, Field(gt=0, le=1)] = 1.0
    lam: Annotated[float, Field(ge=0, le=1)] = 0.95
    clip_range: PositiveFloat = 0.2
    clip_range_value: PositiveFloat = 0.2
    vf_coef: PositiveFloat = 0.1
    entropy_coef: Annotated[float, Field(ge=0)] = 0.0
    whiten_advantages: bool = True
    reward_norm: bool = Field(False, description="normalise scores by their running mean and std")
    reward_clip: PositiveFloat | None = None
    missing_eos_penalty: Annotated[float, Field(ge=0)] | None = Field(None, description="subtracted from the score of responses that never end")
    early_stop_kl: PositiveFloat | None = Field(None, description="stop an update's epochs when approx KL exceeds this")
    sample_every: PositiveInt = 10
    eval_every: PositiveInt | None = None
    score_batch_size: PositiveInt = 16
    reward_in_4bit: bool = Field(False, description="load a separate reward model in 4-bit NF4 (bitsandbytes)")


class PPOConfig(JudgeQuestion, StageConfig):
    stage: Literal["ppo"] = "ppo"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    prompts: DataSpec
    eval_prompts: DataSpec | None = None
    reward_model: ModelSpec | None = None
    reward_fn: str | None = Field(None, description="MODULE:FUNCTION or FILE.py:FUNCTION returning one score per completion")
    reward_judge: JudgeSpec | None = Field(None, description="an AI judge rates each response 1-10 (direct RLAIF)")
    value_model: str | None = Field(None, description="default: the reward model when it shares the policy's tokenizer")
    ppo: PPOSpec = Field(default_factory=PPOSpec)
    train: PPOTrain = Field(default_factory=PPOTrain)

    def data_files(self) -> list[str]:
        return [d.path for d in (self.prompts, self.eval_prompts) if d] + self.question_files()

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        if [self.reward_model, self.reward_fn, self.reward_judge].count(None) != 2:
            raise ValueError(
                "give exactly one reward source: reward_model (--reward-model), reward_fn (--reward-fn) "
                "or reward_judge (--reward-judge)"
            )
        self._check_question(needed=self.reward_judge is not None)
        batch, minis = self.train.batch_size, self.ppo.mini_batches
        if batch % minis:
            divisors = [d for d in range(1, batch + 1) if batch % d == 0]
            raise ValueError(
                f"the rollout batch ({batch}) must split evenly into {minis} mini-batches; "
                f"use --mini-batches {', '.join(map(str, divisors))}, or change --batch-size"
            )
        if self.ppo.episodes < batch:
            raise ValueError(f"--episodes ({self.ppo.episodes}) is smaller than one rollout batch ({batch})")
        if self.train.grad_accum != 1:
            raise ValueError(
                "train.grad_accum does not apply to ppo: each mini-batch is one optimizer step; to hold fewer "
                "activations at once, lower ppo.micro_batch_size (--micro-batch-size) instead"
            )
        return self


class MergeConfig(StageConfig):
    """Merge a LoRA/QLoRA adapter into a standalone checkpoint. `model` is a stage output with an
    adapter/ folder, or an adapter directory; the base comes from the adapter unless `base` is given."""

    stage: Literal["merge"] = "merge"
    base: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    push_to_hub: str | None = Field(None, description="also upload the merged model to this hub repo")
    max_abs_diff: PositiveFloat = Field(1e-3, description="largest logit difference allowed between merged and adapter model")


class EvalConfig(JudgeQuestion, StageConfig):
    """Score a model: rewards, KL and win rate against its reference, accuracy on preference pairs."""

    stage: Literal["eval"] = "eval"
    prompts: DataSpec | None = None
    pairs: DataSpec | None = None
    reward_models: list[ModelSpec] = Field(default_factory=list)
    reward_fns: list[str] = Field(default_factory=list)
    reward_judge: JudgeSpec | None = Field(None, description="an AI judge: rates samples 1-10, and compares with the reference in both orders")
    reference: str | None = Field(None, description="default: the model the stage started from (its manifest)")
    no_reference: bool = False
    sampling: EvalSampling = Field(default_factory=EvalSampling)
    sample_table: Annotated[int, Field(ge=0)] = 5

    def data_files(self) -> list[str]:
        return [d.path for d in (self.prompts, self.pairs) if d] + self.question_files()

    @model_validator(mode="after")
    def _something_to_do(self) -> EvalConfig:
        self._check_question(needed=self.reward_judge is not None)
        if self.prompts is None and self.pairs is None:
            raise ValueError("give --prompts (to sample and score) and/or --pairs (for pairwise accuracy)")
        return self


class OnlineSpec(Closed):
    """Sampling and loss settings shared by GRPO and RLOO (TRL's trainers)."""

    num_generations: Annotated[int, Field(ge=2)] = 4
    max_new_tokens: PositiveInt = 64
    temperature: PositiveFloat = 0.7
    beta: Annotated[float, Field(ge=0)] = 0.04
    epsilon: PositiveFloat = 0.2
    num_iterations: PositiveInt = 1
    reward_weights: list[float] | None = None


class OnlineRLConfig(JudgeQuestion, StageConfig):
    lora: LoraSpec = Field(default_factory=LoraSpec)
    prompts: DataSpec
    reward_models: list[ModelSpec] = Field(default_factory=list)
    reward_fns: list[str] = Field(default_factory=list)
    reward_judge: JudgeSpec | None = Field(None, description="an AI judge rates each completion 1-10 (direct RLAIF)")
    online: OnlineSpec = Field(default_factory=OnlineSpec)
    train: OnlineTrain = Field(default_factory=OnlineTrain)

    def data_files(self) -> list[str]:
        return [self.prompts.path] + self.question_files()

    @model_validator(mode="after")
    def _check(self) -> OnlineRLConfig:
        self._check_question(needed=self.reward_judge is not None)
        sources = len(self.reward_models) + len(self.reward_fns) + (self.reward_judge is not None)
        if not sources:
            raise ValueError("give at least one reward: --reward-model, --reward-fn (repeatable) or --reward-judge")
        weights = self.online.reward_weights
        if weights is not None and len(weights) != sources:
            raise ValueError(f"online.reward_weights has {len(weights)} weights for {sources} reward sources")
        batch, group = self.train.batch_size, self.online.num_generations
        if batch % group:
            raise ValueError(
                f"the batch ({batch} completions) must hold whole groups of {group} generations per prompt; "
                f"use --batch-size {group * max(1, batch // group)} or {group * (batch // group + 1)}"
            )
        return self


class GRPOConfig(OnlineRLConfig):
    stage: Literal["grpo"] = "grpo"
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"


class RLOOConfig(OnlineRLConfig):
    stage: Literal["rloo"] = "rloo"


STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    "sft": SFTConfig,
    "rm": RMConfig,
    "dpo": DPOConfig,
    "generate": GenerateConfig,
    "ppo": PPOConfig,
    "merge": MergeConfig,
    "eval": EvalConfig,
    "grpo": GRPOConfig,
    "rloo": RLOOConfig,
    "critique": CritiqueConfig,
    "label": LabelConfig,
}


# ---------------------------------------------------------------------------------------------
# Validation with errors a person can act on


def build_config(cls: type[StageConfig], raw: dict[str, Any], where: str) -> StageConfig:
    """Validate `raw` as `cls`; errors become one-line ConfigErrors that start with `where`."""
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_describe(cls, exc)}") from None


def _describe(cls: type[BaseModel], exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = [str(part) for part in first["loc"] if not str(part).startswith("function-")]
    key = ".".join(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        valid = _fields_at(cls, loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(valid))}"
        message = f"unknown key {key!r}; {hint}"
    elif first["type"] == "missing":
        message = f"missing required key {key!r}"
    else:
        got = first.get("input")
        shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
        text = first["msg"].removeprefix("Value error, ")
        message = f"{key}: {text}{shown}" if loc else text
    more = len(errors) - 1
    return message + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def _fields_at(cls: type[BaseModel], loc: list[str]) -> list[str]:
    """The field names of the config block at `loc` inside `cls`."""
    for part in loc:
        if part.isdigit():  # an item of a list block
            continue
        field = cls.model_fields.get(part)
        block = _model_in(getattr(field, "annotation", None))
        if block is None:
            return []
        cls = block
    return list(cls.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config block inside an annotation: X, list[X] or X | None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------
# Files, overrides and recipes


class _StrictLoader(yaml.SafeLoader):
    """The safe loader (no python objects), refusing a key given twice in one mapping: plain YAML
    keeps the last one silently, so `train:` written twice would drop the first block."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} twice in one mapping; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; one-line errors for every way it can fail."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(loaded).__name__}")
    return loaded


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), with the value read as a YAML scalar."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str):
        # YAML 1.1 reads 1e-4 as a string; people mean the number.
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip().split("."), parsed


def set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `target[path[0]][path[1]]... = value`, creating blocks; shorthands become blocks."""
    for part in path[:-1]:
        child = target.get(part)
        child = _expand(child) if isinstance(child, (dict, str, bool)) else {}
        target[part] = child
        target = child
    target[path[-1]] = value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `extra` over `base`, merging nested blocks (shorthands expanded)."""
    merged = dict(base)
    for key, value in extra.items():
        old = merged.get(key)
        if isinstance(value, dict) and isinstance(old, (dict, str, bool)):
            merged[key] = deep_merge(_expand(old), value)
        elif isinstance(old, dict) and isinstance(value, (str, bool)):
            merged[key] = deep_merge(old, _expand(value))
        else:
            merged[key] = value
    return merged


def _expand(value: dict | str | bool) -> dict[str, Any]:
    """`model: NAME` means `model: {path: NAME}`; `lora: false` means `lora: {enabled: false}`."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, bool):
        return {"enabled": value}
    return {"path": value}
