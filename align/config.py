"""The config schema: typed, closed blocks for every stage, each field with its default and meaning.

A config is validated before any model loads (align/validation.py words the errors); defaults
live here and nowhere else. YAML files and `--set` overrides are read by align/config_files.py;
which stage uses which config is declared in align/stages/__init__.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class Closed(BaseModel):
    """A config block that rejects keys it does not know."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSpec(Closed):
    """Which model a stage starts from and how to load it."""

    path: str = Field(min_length=1, description="local dir, hub id, or built-in name (align models)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="dtype the weights load in: auto = float32 for weights that train (full fine-tuning) and on a CPU; frozen weights bfloat16 on GPUs that have it, else float16")
    trust_remote_code: bool = Field(False, description="run the model repository's own python code (needed by some architectures)")
    allow_pickle: bool = Field(False, description="load pickled .bin/.pt weights (they can run code); safetensors only otherwise")
    chat_template: str | None = Field(None, description="a Jinja file to use instead of the tokenizer's")
    revision: str | None = Field(None, description="hub branch, tag or commit to load")

    @model_validator(mode="before")
    @classmethod
    def shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class LoraSpec(Closed):
    """LoRA adapters (on by default) and QLoRA's 4-bit base."""

    enabled: bool = Field(True, description="train LoRA adapters (default) or all weights")
    r: PositiveInt = Field(16, description="LoRA rank")
    alpha: PositiveFloat = Field(32.0, description="LoRA scaling (alpha / r multiplies the update)")
    dropout: Fraction = Field(0.05, description="dropout on the LoRA input")
    target_modules: Union[Literal["all-linear"], list[str]] = Field("all-linear", description="layers that get adapters: all-linear or a list of module names")
    qlora: bool = Field(False, description="LoRA on a 4-bit NF4 base (bitsandbytes)")
    trainable_layers: PositiveInt | None = Field(None, description="with LoRA off: fine-tune only the last N transformer blocks (and the final norm and head); the embeddings, a head tied to them and the earlier blocks stay frozen, and no backward pass runs through them")

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _qlora_needs_lora(self) -> LoraSpec:
        if self.qlora and not self.enabled:
            raise ValueError("qlora trains LoRA adapters on a 4-bit base: it cannot be combined with lora disabled")
        if self.trainable_layers and self.enabled:
            raise ValueError("trainable_layers fine-tunes the last blocks in full: set lora.enabled false (--no-lora) with it")
        return self


class DataSpec(Closed):
    """A data file (or hub dataset) and how to read it."""

    path: str = Field(min_length=1, description="data file (.jsonl/.json/.parquet/.csv) or hub dataset name")
    eval_path: str | None = Field(None, description="a separate eval file (instead of eval_fraction)")
    eval_fraction: Fraction = Field(0.0, description="hold out this share of the data for eval")
    columns: dict[str, str] = Field(default_factory=dict, description="expected name -> name in the file")
    split: str = Field("train", description="the split to read from a hub dataset")
    max_length: PositiveInt = Field(1024, description="longest tokenized row; longer rows are truncated or dropped (overlong)")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="what to do with a row longer than max_length")
    chat_template: Literal["auto", "always", "never"] = Field("auto", description="render rows with the tokenizer's chat template: auto = when it has one and the rows are conversations")
    max_rows: PositiveInt | None = Field(None, description="read only the first N rows")

    @model_validator(mode="before")
    @classmethod
    def shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class TrainSpec(Closed):
    """Optimisation, logging and checkpointing settings shared by all training stages."""

    max_steps: PositiveInt | None = Field(None, description="stop after this many optimizer steps (wins over epochs)")
    epochs: PositiveFloat = Field(1.0, description="passes over the data")
    batch_size: PositiveInt = Field(4, description="rows per device per forward pass")
    grad_accum: PositiveInt = Field(1, description="batches whose gradients add up to one optimizer step")
    learning_rate: PositiveFloat = Field(2e-4, description="peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("linear", description="learning-rate schedule after warmup")
    warmup_ratio: Fraction = Field(0.0, description="share of the steps spent warming the learning rate up from 0")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW weight decay")
    max_grad_norm: PositiveFloat = Field(1.0, description="clip the gradient norm to this")
    seed: int = Field(42, description="random seed (data order, new weights, sampling)")
    logging_steps: PositiveInt = Field(1, description="log metrics every N optimizer steps")
    save_steps: PositiveInt = Field(50, description="save a checkpoint every N optimizer steps")
    save_total_limit: PositiveInt = Field(2, description="checkpoints kept on disk (the newest)")
    eval_steps: PositiveInt | None = Field(None, description="evaluate on the eval data every N steps (default: save_steps)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, about 30% slower")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="compute precision (autocast): auto = bf16 on GPUs and CPUs that have it (AMX, AVX512-BF16), fp16 on other GPUs, else fp32"
    )
    report_to: Literal["none", "tensorboard", "trackio", "wandb", "mlflow"] = Field("none", description="experiment tracker for the metrics")


class PPOTrain(TrainSpec):
    """PPO's defaults: batch_size is the rollout batch; RL wants a small learning rate."""

    batch_size: PositiveInt = Field(16, description="rollouts per process per PPO update")
    learning_rate: PositiveFloat = Field(1e-5, description="peak learning rate (RL wants a small one)")
    save_steps: PositiveInt = Field(10, description="save a checkpoint every N updates")


class DPOTrain(TrainSpec):
    """DPO's defaults: gradient checkpointing on, as TRL ships it; --no-gradient-checkpointing is faster."""

    gradient_checkpointing: bool = Field(True, description="recompute activations in the backward pass: less memory, about 15% slower")


class OnlineTrain(TrainSpec):
    """GRPO's and RLOO's defaults: the batch holds whole groups; RL wants a small learning rate."""

    batch_size: PositiveInt = Field(8, description="completions per device per step (whole groups of num_generations)")
    learning_rate: PositiveFloat = Field(1e-5, description="peak learning rate")


class StageConfig(Closed):
    """Fields every stage has."""

    name: str | None = Field(None, description="the stage's name in a recipe")
    model: ModelSpec = Field(description="the model this stage starts from: local dir, hub id, stage output, or built-in name (align models)")
    output: str = Field(min_length=1, description="where the stage writes its output")
    resume: bool = Field(False, description="continue from the newest checkpoint in output")
    overwrite: bool = Field(False, description="replace a non-empty output")

    # These change how a run proceeds, never what it produces.
    RUN_CONTROL_FIELDS: ClassVar[frozenset[str]] = frozenset({"resume", "overwrite", "name"})
    # Top-level fields added since a release, each with the default that does what the stage did before it had the
    # field: at that default they are left out of the identity, so a run finished before the field existed
    # still counts as up to date (an upgrade never makes `align run --resume` redo finished stages).
    ADDED_FIELDS: ClassVar[dict[str, Any]] = {}
    # The same for fields added to the specs every stage shares: (the stage's field, the spec's field) -> default.
    ADDED_SPEC_FIELDS: ClassVar[dict[tuple[str, str], Any]] = {("lora", "trainable_layers"): None}

    def identity(self) -> dict[str, Any]:
        """The part of the config that decides the output (for `align run`'s skip check)."""
        identity = self.model_dump(mode="json", exclude=set(self.RUN_CONTROL_FIELDS))
        for (outer, inner), default in self.ADDED_SPEC_FIELDS.items():
            if isinstance(identity.get(outer), dict) and inner in identity[outer] and identity[outer][inner] == default:
                del identity[outer][inner]
        return {key: value for key, value in identity.items()
                if key not in self.ADDED_FIELDS or value != self.ADDED_FIELDS[key]}

    def data_files(self) -> list[str]:
        """The data this stage reads (fingerprinted into the manifest)."""
        return []


class TrainStageConfig(StageConfig):
    """Fields of the stages that train on a data file with a TRL trainer (sft, rm, dpo)."""

    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapters (on by default) and QLoRA")
    data: DataSpec = Field(description="training data file (.jsonl/.json/.parquet/.csv) or hub dataset name")
    train: TrainSpec = Field(default_factory=TrainSpec, description="optimiser, schedule, logging and checkpoints")

    def data_files(self) -> list[str]:
        return [p for p in (self.data.path, self.data.eval_path) if p]


class SFTConfig(TrainStageConfig):
    """Supervised fine-tuning on messages, prompt/completion or text rows."""

    stage: Literal["sft"] = Field("sft", description="the stage type")
    completion_only_loss: bool = Field(True, description="train on responses only, not prompts")
    packing: bool = Field(False, description="pack several rows into each max_length sequence")


class RewardDataSpec(DataSpec):
    """A reward model scores the end of a sequence, so over-long pairs are dropped, never cut."""

    overlong: Literal["truncate", "drop"] = Field("drop", description="what to do with a pair longer than max_length (reward models only drop)")

    @model_validator(mode="after")
    def _no_truncation(self) -> RewardDataSpec:
        if self.overlong == "truncate":
            raise ValueError(
                "reward models cannot use overlong=truncate: a truncated pair would be scored on text that is "
                "not its response; use drop (the default) or raise max_length"
            )
        return self


class RMConfig(TrainStageConfig):
    """A Bradley-Terry reward model trained on preference pairs."""

    stage: Literal["rm"] = Field("rm", description="the stage type")
    data: RewardDataSpec = Field(description="preference pairs (prompt, chosen, rejected; optional margin) or ranked rows (prompt, completions, scores)")
    center_rewards: Annotated[float, Field(ge=0)] = Field(0.01, description="weight of a penalty pulling the mean reward to 0 (InstructGPT's normalisation)")
    min_gap: Annotated[float, Field(ge=0)] = Field(
        0.0, description="ranked rows: compare two completions only when their scores differ by more than this (0: all but exact ties)"
    )
    margins_from_scores: bool = Field(
        False, description="ranked rows: each comparison's margin is its score gap (as the 'margin' column of pair rows)"
    )
    pair_rows: bool = Field(True, description="pair rows: run each pair as one row (prompt, chosen, rejected), the prompt computed once (the same scores; false: TRL's two rows)")

    ADDED_FIELDS: ClassVar[dict[str, Any]] = {"pair_rows": True}


class PRMConfig(TrainStageConfig):
    """A process reward model: a token classifier scoring each step of a solution."""

    stage: Literal["prm"] = Field("prm", description="the stage type")
    data: DataSpec = Field(description="stepwise rows: prompt, completions (a list of steps), labels (one per step: bool or a number in [0, 1])")
    step_separator: str = Field("\n", min_length=1, description="what follows each step; a step's label sits on its last token")
    last_step_only: bool = Field(False, description="train on each row's last label only: an outcome reward model from the same data")
    pairwise: bool = Field(False, description="also rank sibling steps (two solutions sharing the prompt and earlier steps, then a step right in one and wrong in the other): the right one's score above, which a step's difficulty alone cannot do")
    share_prefix: bool = Field(True, description="with pairwise: run each sibling pair as one row, the prompt and steps they share computed once (the same losses; false: two rows)")

    ADDED_FIELDS: ClassVar[dict[str, Any]] = {"pairwise": False, "share_prefix": True}


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
    """DPO's loss and how strongly it holds the policy to the reference."""

    beta: PositiveFloat = Field(0.1, description="strength of the pull towards the reference model")
    loss: Literal[tuple(DPO_LOSSES)] = Field(  # type: ignore[valid-type]
        "sigmoid", description="sigmoid (DPO), ipo, hinge, robust (cDPO, with label_smoothing), length-normalized (SimPO-style), or another TRL loss"
    )
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = Field(0.0, description="share of labels assumed flipped (robust/cDPO, exo_pair, aot)")
    precompute_ref_log_probs: bool = Field(False, description="compute the reference log-probs once before training")
    pair_rows: bool = Field(True, description="run each pair as one row (prompt, chosen, rejected): the prompt is computed once; false: TRL's two rows")

    @property
    def trl_loss_type(self) -> str:
        return DPO_LOSSES[self.loss]

    @model_validator(mode="after")
    def _smoothing_only_where_used(self) -> DPOSpec:
        if self.label_smoothing and self.trl_loss_type not in {"robust", "exo_pair", "aot"}:
            raise ValueError(f"label_smoothing is used only by the robust (cDPO), exo_pair and aot losses, not by {self.loss!r}")
        return self


class DPOConfig(TrainStageConfig):
    """Direct preference optimisation on prompt/chosen/rejected pairs."""

    stage: Literal["dpo"] = Field("dpo", description="the stage type")
    dpo: DPOSpec = Field(default_factory=DPOSpec, description="DPO's loss and its settings")
    train: DPOTrain = Field(default_factory=DPOTrain, description="optimiser, schedule, logging and checkpoints")


class EngineSpec(Closed):
    """What samples: transformers' generate (hf) or a vLLM engine in the same process (vllm)."""

    engine: Literal["hf", "vllm"] = Field("hf", description="what samples: hf (transformers' generate) or vllm (a vLLM engine: pip install 'align[vllm]' on GPUs, `make vllm-env` on CPUs)")
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = Field(0.3, description="vllm: the share of the device's memory (on a CPU: of RAM) the engine may take for weights and KV cache; the rest is training's")
    kv_cache_gb: PositiveFloat | None = Field(None, description="vllm: the engine's KV cache in GiB (default: what gpu_memory_utilization leaves after its weights)")
    sleep: bool = Field(False, description="vllm on a GPU: free the engine's KV cache and weights between rollouts (vLLM's sleep mode), for training's memory")
    eager: bool = Field(False, description="vllm: skip compilation (and CUDA graphs): starts in seconds, samples slower")
    lora_sync: Literal["auto", "adapter", "merged"] = Field(
        "auto", description="vllm with LoRA: how the trained adapter reaches the engine after each update: adapter (served "
        "as a LoRA request on the unmerged base), merged (base + adapter computed here, loaded as plain weights: no LoRA "
        "kernels while sampling), auto = adapter on GPUs, merged on CPUs (vLLM's CPU LoRA kernels halve its speed)"
    )
    max_logprob_gap: PositiveFloat = Field(
        0.1, description="PPO with vllm: stop when the engine's log-probs of its sampled tokens differ from the trainer's by more "
        "than this on average per token (nats): the engine is serving different weights than the trainer"
    )


class SamplingSpec(Closed):
    """How completions are sampled: count, length, temperature, nucleus, batch, seed."""

    num_samples: PositiveInt = Field(1, description="samples per prompt")
    max_new_tokens: PositiveInt = Field(128, description="longest completion")
    temperature: Annotated[float, Field(ge=0)] = Field(0.7, description="sampling temperature; 0 for greedy decoding")
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(1.0, description="nucleus sampling threshold")
    batch_size: PositiveInt = Field(8, description="sequences per generation batch (prompts x samples)")
    seed: int = Field(42, description="sampling seed (each row's sample is reproducible)")


class PairSampling(SamplingSpec):
    """Sampling two responses per prompt to compare; defaults set here so a partial block keeps them."""

    num_samples: Annotated[int, Field(ge=2)] = Field(2, description="samples per prompt, paired in twos")
    temperature: Annotated[float, Field(ge=0)] = Field(1.0, description="sampling temperature")


class EvalSampling(SamplingSpec):
    """Sampling for eval: shorter completions by default."""

    max_new_tokens: PositiveInt = Field(64, description="longest completion")


class GenerateConfig(StageConfig):
    """Sample completions for a prompt file into one JSONL file."""

    stage: Literal["generate"] = Field("generate", description="the stage type")
    prompts: DataSpec = Field(description="prompt-only file ('prompt' column)")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="how completions are sampled")
    generation: EngineSpec = Field(default_factory=EngineSpec, description="what samples: the hf engine (transformers) or vllm")

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
    reasoning_tokens: PositiveInt = Field(128, description="with chain_of_thought: longest reasoning before the answer")
    batch_size: PositiveInt = Field(8, description="pairs per judge batch (and per saved chunk)")
    top_logprobs: PositiveInt = Field(20, description="for a URL judge: how many next-token log-probs to ask for")
    retries: Annotated[int, Field(ge=0)] = Field(4, description="a URL judge's retries after a failed request")
    backoff: Annotated[float, Field(ge=0)] = Field(1.0, description="seconds before the first retry; doubled after each")
    timeout: PositiveFloat = Field(60.0, description="seconds to wait for a URL judge's answer")

    @model_validator(mode="before")
    @classmethod
    def shorthand(cls, value: Any) -> Any:
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


# How a process reward model's step scores become one score per solution (a sequence RM ignores it).
RewardAggregate = Annotated[Literal["min", "prod", "last", "mean"], Field(
    description="a process reward model's score for a solution from its steps' P(correct): min (the weakest step), "
    "prod (all steps right), last or mean")]


class OneReward(JudgeQuestion):
    """Exactly one reward source: a reward model, a python function or an AI judge."""

    reward_model: ModelSpec | None = Field(None, description="reward model: an `align rm` output or any 1-label sequence classifier")
    reward_fn: str | None = Field(None, description="MODULE:FUNCTION or FILE.py:FUNCTION returning one score per completion")
    reward_judge: JudgeSpec | None = Field(None, description="an AI judge rates each response 1-10 (direct RLAIF)")
    reward_aggregate: RewardAggregate = "min"

    def _check_one_reward(self) -> None:
        if [self.reward_model, self.reward_fn, self.reward_judge].count(None) != 2:
            raise ValueError(
                "give exactly one reward source: reward_model (--reward-model), reward_fn (--reward-fn) "
                "or reward_judge (--reward-judge)"
            )
        self._check_question(needed=self.reward_judge is not None)


class CritiqueConfig(StageConfig):
    """Constitutional AI's supervised stage: answer, critique under a drawn principle, revise."""

    stage: Literal["critique"] = Field("critique", description="the stage type")
    prompts: DataSpec = Field(description="prompt-only file ('prompt' column), e.g. red-team and ordinary requests")
    constitution: str = Field("harmless-helpful", description="a constitution YAML or built-in name")
    rounds: PositiveInt = Field(1, description="critique-revision rounds per answer")
    samples_per_prompt: PositiveInt = Field(1, description="answers sampled per prompt")
    few_shot: bool = Field(True, description="show each principle's worked examples before the model's turn")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="how answers, critiques and revisions are sampled")
    generation: EngineSpec = Field(default_factory=EngineSpec, description="what samples: the hf engine (transformers) or vllm")

    def data_files(self) -> list[str]:
        return [self.prompts.path] + ([self.constitution] if Path(self.constitution).is_file() else [])


class LabelConfig(JudgeQuestion, StageConfig):
    """RLAIF preference labels: a judge picks A or B for each pair, in both orders."""

    stage: Literal["label"] = Field("label", description="the stage type")
    model: ModelSpec | None = Field(None, description="the policy that samples the pairs (with prompts)")
    judge: JudgeSpec = Field(description="the judge: a local model (any causal LM align can load) or an OpenAI-compatible server")
    pairs: DataSpec | None = Field(None, description="pairs to label: prompt + chosen/rejected (or response_a/response_b)")
    prompts: DataSpec | None = Field(None, description="or prompts to sample pairs for, with the policy (model)")
    sampling: PairSampling = Field(default_factory=PairSampling, description="how the policy samples responses for prompts")
    generation: EngineSpec = Field(default_factory=EngineSpec, description="what samples: the hf engine (transformers) or vllm")
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


class StepSampling(SamplingSpec):
    """Sampling for label-steps: the solutions to label, and the rollouts from each of their steps."""

    num_samples: PositiveInt = Field(4, description="solutions sampled per prompt, each split into steps and labelled")
    max_new_tokens: PositiveInt = Field(256, description="longest solution (and longest rollout from a step)")
    temperature: PositiveFloat = Field(1.0, description="sampling temperature of solutions and rollouts")
    batch_size: PositiveInt = Field(32, description="sequences per generation batch")


class LabelStepsConfig(StageConfig):
    """Step labels without humans (Math-Shepherd): each step of a policy's solutions labelled by whether
    rollouts from it reach the right answer, or by a function that checks each step."""

    stage: Literal["label-steps"] = Field("label-steps", description="the stage type")
    prompts: DataSpec = Field(description="problems: a 'prompt' column, and any columns the answer function reads (say 'answer')")
    answer_fn: str | None = Field(
        None, description="MODULE:FUNCTION or FILE.py:FUNCTION, f(prompts, completions, **columns) -> list[bool]: "
        "does each completed solution reach the right final answer"
    )
    step_fn: str | None = Field(
        None, description="or f(prompts, steps, **columns) -> one list of labels (bool or number in [0, 1]) per solution: "
        "checks each step itself, nothing rolled out"
    )
    rollouts: PositiveInt = Field(8, description="completions rolled out from each step to estimate its label")
    labels: Literal["hard", "soft"] = Field(
        "hard", description="hard: a step is correct when any rollout from it reaches the answer; soft: the share that do"
    )
    step_separator: str = Field("\n", min_length=1, description="what ends each step (as `align prm` reads the output)")
    sampling: StepSampling = Field(default_factory=StepSampling, description="how solutions and rollouts are sampled")
    generation: EngineSpec = Field(default_factory=EngineSpec, description="what samples: the hf engine (transformers) or vllm")

    def data_files(self) -> list[str]:
        return [self.prompts.path]

    @model_validator(mode="after")
    def _check(self) -> LabelStepsConfig:
        if (self.answer_fn is None) == (self.step_fn is None):
            raise ValueError("give one checker: --answer-fn (rollouts from each step, Math-Shepherd) or --step-fn (checks each step)")
        return self


class PPOSpec(Closed):
    """PPO's rollout, reward-shaping and update settings (InstructGPT's RL step)."""

    episodes: PositiveInt = Field(512, description="total sampled responses")
    mini_batches: PositiveInt = Field(1, description="mini-batches per rollout batch (one optimizer step each)")
    micro_batch_size: PositiveInt = Field(
        4, description="rows per forward/backward pass in an update; the gradients add up to the mini-batch's, "
        "so this trades speed for memory without changing the result"
    )
    ppo_epochs: PositiveInt = Field(4, description="passes over each rollout batch")
    max_new_tokens: PositiveInt = Field(64, description="longest response")
    temperature: PositiveFloat = Field(0.7, description="sampling temperature for rollouts")
    kl_coef: Annotated[float, Field(ge=0)] = Field(0.05, description="weight of the per-token KL penalty against the reference (adapted when target_kl is set)")
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = Field("k1", description="per-token KL estimator in the reward: k1 (log-ratio), k2, k3 (Schulman) or abs")
    target_kl: PositiveFloat | None = Field(None, description="adapt kl_coef towards this KL per sequence")
    kl_horizon: PositiveInt = Field(10000, description="adaptive KL controller's horizon in episodes (Ziegler et al.)")
    gamma: Annotated[float, Field(gt=0, le=1)] = Field(1.0, description="discount factor for GAE")
    lam: Annotated[float, Field(ge=0, le=1)] = Field(0.95, description="GAE lambda: bias (0) versus variance (1) of the advantages")
    clip_range: PositiveFloat = Field(0.2, description="PPO's ratio clip epsilon for the policy loss")
    clip_range_value: PositiveFloat = Field(0.2, description="clip range for the value loss around the old values")
    vf_coef: PositiveFloat = Field(0.1, description="weight of the value loss")
    value_head_on_policy: bool = Field(
        False, description="put the value head on the policy's own trunk: one model instead of two, both losses train it "
        "(faster and lighter; InstructGPT and TRL keep a separate value model)"
    )
    entropy_coef: Annotated[float, Field(ge=0)] = Field(0.0, description="weight of an entropy bonus (0: entropy only logged)")
    whiten_advantages: bool = Field(True, description="normalise advantages to mean 0, std 1 over the batch")
    reward_norm: bool = Field(False, description="normalise scores by their running mean and std")
    reward_clip: PositiveFloat | None = Field(None, description="clip scores to +-this after normalising")
    missing_eos_penalty: Annotated[float, Field(ge=0)] | None = Field(None, description="subtracted from the score of responses that never end")
    early_stop_kl: PositiveFloat | None = Field(None, description="stop an update's epochs when approx KL exceeds this")
    sample_every: PositiveInt = Field(10, description="write sample responses to samples.jsonl every N updates")
    eval_every: PositiveInt | None = Field(None, description="score held-out prompts every N updates")
    score_batch_size: PositiveInt = Field(16, description="responses per reward-model batch")
    reward_in_4bit: bool = Field(False, description="load a separate reward model in 4-bit NF4 (bitsandbytes)")
    process_rewards: Literal["dense", "final"] = Field(
        "dense", description="with a process reward model: dense puts each step's score on the response token that ends the "
        "step; final scores the whole response once, aggregated as reward_aggregate says"
    )


class PPOConfig(OneReward, StageConfig):
    """PPO against one reward source: a reward model, a python function or an AI judge."""

    stage: Literal["ppo"] = Field("ppo", description="the stage type")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapters (on by default) and QLoRA")
    prompts: DataSpec = Field(description="prompt-only training file ('prompt' column)")
    eval_prompts: DataSpec | None = Field(None, description="held-out prompts scored every eval_every updates (default: prompts' eval_fraction)")
    value_model: str | None = Field(None, description="default: the reward model when it shares the policy's tokenizer")
    ppo: PPOSpec = Field(default_factory=PPOSpec, description="PPO's rollout, reward shaping and update settings")
    generation: EngineSpec = Field(default_factory=EngineSpec, description="what samples: the hf engine (transformers) or vllm")
    train: PPOTrain = Field(default_factory=PPOTrain, description="optimiser, schedule and checkpoints")

    def data_files(self) -> list[str]:
        return [d.path for d in (self.prompts, self.eval_prompts) if d] + self.question_files()

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        self._check_one_reward()
        batch, minis = self.train.batch_size, self.ppo.mini_batches
        if batch % minis:
            divisors = [d for d in range(1, batch + 1) if batch % d == 0]
            raise ValueError(
                f"the rollout batch ({batch}) must split evenly into {minis} mini-batches; "
                f"use --mini-batches {', '.join(map(str, divisors))}, or change --batch-size"
            )
        if self.ppo.value_head_on_policy and self.value_model:
            raise ValueError("--value-model names a separate value model, --value-head-on-policy puts the value head on "
                             "the policy itself: pick one")
        if self.ppo.episodes < batch:
            raise ValueError(f"--episodes ({self.ppo.episodes}) is smaller than one rollout batch ({batch})")
        if self.train.grad_accum != 1:
            raise ValueError(
                "train.grad_accum does not apply to ppo: each mini-batch is one optimizer step; to hold fewer "
                "activations at once, lower ppo.micro_batch_size (--micro-batch-size) instead"
            )
        return self


class BestOfNSampling(SamplingSpec):
    """Sampling for best-of-n: several samples per prompt, from the policy itself by default."""

    num_samples: Annotated[int, Field(ge=2)] = Field(4, description="samples per prompt to choose from (n)")
    temperature: PositiveFloat = Field(
        1.0, description="sampling temperature; at 1 the samples are the model's own, which the KL bound is against"
    )


class BestOfNConfig(OneReward, StageConfig):
    """Rejection sampling: n samples per prompt, each scored; the best kept for SFT, best and worst as a pair."""

    stage: Literal["best-of-n"] = Field("best-of-n", description="the stage type")
    prompts: DataSpec = Field(description="prompt-only file ('prompt' column)")
    sampling: BestOfNSampling = Field(default_factory=BestOfNSampling, description="how the n samples are drawn")
    generation: EngineSpec = Field(default_factory=EngineSpec, description="what samples: the hf engine (transformers) or vllm")
    min_gap: Annotated[float, Field(ge=0)] = Field(
        0.0, description="skip a prompt whose best and worst samples score within this of each other (0: only exact ties)"
    )
    min_score: Annotated[float, Field(allow_inf_nan=False)] | None = Field(
        None, description="best.jsonl keeps a prompt's best samples that score at least this, whether or not its samples "
        "differ (ReST-EM: with a 0/1 reward, 1 keeps every prompt the model solved, the ones it always solves included); "
        "unset: only prompts with a pair (best and worst more than min_gap apart) get a best"
    )
    keep: PositiveInt = Field(
        1, description="the best this many samples of each prompt go to best.jsonl (1: Llama 2's and ReST-EM's pick; "
        "more: RAFT's top fraction, more rows per prompt for SFT)"
    )
    vote: str | None = Field(
        None, description="MODULE:FUNCTION or FILE.py:FUNCTION, f(prompts, completions, **columns) -> each completion's final "
        "answer (a string or number; None for none): the samples vote on answers, each vote weighted by its score, and "
        "the best are taken from the heaviest answer's samples (weighted majority vote, Uesato et al. 2022 and "
        "Math-Shepherd); scores must not be negative (a PRM's probabilities, a judge's grades; not a reward model's logits)"
    )
    score_batch_size: PositiveInt = Field(16, description="samples per reward-model batch")
    reward_in_4bit: bool = Field(False, description="load the reward model in 4-bit NF4 (bitsandbytes)")

    ADDED_FIELDS: ClassVar[dict[str, Any]] = {"keep": 1, "vote": None, "min_score": None}

    def data_files(self) -> list[str]:
        return [self.prompts.path] + self.question_files()

    @model_validator(mode="after")
    def _check(self) -> BestOfNConfig:
        self._check_one_reward()
        if self.keep >= self.sampling.num_samples:
            raise ValueError(f"keep={self.keep} keeps every one of num_samples={self.sampling.num_samples} samples, so "
                             "nothing is selected: keep fewer than you sample")
        return self


class MergeConfig(StageConfig):
    """Merge a LoRA/QLoRA adapter into a standalone checkpoint. `model` is a stage output with an
    adapter/ folder, or an adapter directory; the base comes from the adapter unless `base` is given."""

    stage: Literal["merge"] = Field("merge", description="the stage type")
    base: str | None = Field(None, description="base model (default: the one the adapter names)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the merged weights")
    push_to_hub: str | None = Field(None, description="also upload the merged model to this hub repo")
    max_abs_diff: PositiveFloat = Field(1e-3, description="largest logit difference allowed between merged and adapter model")


class EvalConfig(JudgeQuestion, StageConfig):
    """Score a model: rewards, KL and win rate against its reference, accuracy on preference pairs."""

    stage: Literal["eval"] = Field("eval", description="the stage type")
    prompts: DataSpec | None = Field(None, description="prompts to sample and score")
    pairs: DataSpec | None = Field(None, description="preference pairs: RM accuracy or DPO implicit-reward accuracy")
    reward_models: list[ModelSpec] = Field(default_factory=list, description="reward models to score with (repeatable; any tokenizer)")
    reward_fns: list[str] = Field(default_factory=list, description="python scorers MODULE:FUNCTION or FILE.py:FUNCTION (repeatable; runs your code)")
    reward_judge: JudgeSpec | None = Field(None, description="an AI judge: rates samples 1-10, and compares with the reference in both orders")
    reward_aggregate: RewardAggregate = "min"
    reference: str | None = Field(None, description="default: the model the stage started from (its manifest); with best_of, the model itself")
    no_reference: bool = Field(False, description="skip KL and win rate")
    sampling: EvalSampling = Field(default_factory=EvalSampling, description="how samples are drawn")
    generation: EngineSpec = Field(default_factory=EngineSpec, description="what samples: the hf engine (transformers) or vllm")
    sample_table: Annotated[int, Field(ge=0)] = Field(5, description="model-vs-reference samples kept for the report")
    best_of: Annotated[int, Field(ge=2)] | None = Field(
        None, description="evaluate the best-of-N policy on the model: each sample is the pick of N by the first reward "
        "source (the first reward model, else function, else the judge), scored by every source; its KL is reported as "
        "the bound log N - (N-1)/N"
    )

    def data_files(self) -> list[str]:
        return [d.path for d in (self.prompts, self.pairs) if d] + self.question_files()

    @model_validator(mode="after")
    def _something_to_do(self) -> EvalConfig:
        self._check_question(needed=self.reward_judge is not None)
        if self.prompts is None and self.pairs is None:
            raise ValueError("give --prompts (to sample and score) and/or --pairs (for pairwise accuracy)")
        if self.best_of and not (self.prompts and (self.reward_models or self.reward_fns or self.reward_judge)):
            raise ValueError("--best-of N needs --prompts and a reward source (--reward-model, --reward-fn or --reward-judge) to pick with")
        return self


class OnlineSpec(Closed):
    """Sampling and loss settings shared by GRPO and RLOO (TRL's trainers)."""

    num_generations: Annotated[int, Field(ge=2)] = Field(4, description="completions sampled per prompt (the group)")
    max_new_tokens: PositiveInt = Field(64, description="longest completion")
    temperature: PositiveFloat = Field(0.7, description="sampling temperature")
    beta: Annotated[float, Field(ge=0)] = Field(0.04, description="KL penalty coefficient (0: no reference model)")
    epsilon: PositiveFloat = Field(0.2, description="ratio clip epsilon")
    num_iterations: PositiveInt = Field(1, description="updates per sampled batch (TRL's mu)")
    reward_weights: list[float] | None = Field(None, description="one weight per reward source (default: all 1)")


class OnlineRLConfig(JudgeQuestion, StageConfig):
    """Online RL on TRL's trainers (GRPO, RLOO): prompts and one or more reward sources."""

    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapters (on by default) and QLoRA")
    prompts: DataSpec = Field(description="prompt-only training file ('prompt' column)")
    reward_models: list[ModelSpec] = Field(default_factory=list, description="reward models (repeatable; any tokenizer)")
    reward_fns: list[str] = Field(default_factory=list, description="python scorers MODULE:FUNCTION or FILE.py:FUNCTION (repeatable; runs your code)")
    reward_judge: JudgeSpec | None = Field(None, description="an AI judge rates each completion 1-10 (direct RLAIF)")
    reward_aggregate: RewardAggregate = "min"
    online: OnlineSpec = Field(default_factory=OnlineSpec, description="sampling and loss settings")
    generation: EngineSpec = Field(default_factory=EngineSpec, description="what samples: the hf engine (transformers) or vllm")
    train: OnlineTrain = Field(default_factory=OnlineTrain, description="optimiser, schedule and checkpoints")

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
    """GRPO: rewards normalised within each prompt's group of generations."""

    stage: Literal["grpo"] = Field("grpo", description="the stage type")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo"] = Field(
        "dapo", description="TRL's GRPO loss: grpo (per-sequence mean, length-biased), dapo (per token over the batch), "
        "dr_grpo (a constant), bnpo (per token over the local batch), cispo, sapo, luspo (needs sequence ratios)"
    )
    importance_sampling: Literal["token", "sequence"] = Field(
        "token", description="the policy ratio per token (PPO, GRPO) or one per sequence (GSPO)"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the reward std of the group, of the batch, or not at all (Dr. GRPO)"
    )

    @model_validator(mode="after")
    def _luspo_is_sequence_level(self) -> GRPOConfig:
        if self.loss_type == "luspo" and self.importance_sampling != "sequence":
            raise ValueError("loss_type luspo is sequence-level: set importance_sampling to sequence (--importance-sampling sequence)")
        return self


class RLOOConfig(OnlineRLConfig):
    """RLOO: each completion baselined by the mean reward of the others in its group."""

    stage: Literal["rloo"] = Field("rloo", description="the stage type")
