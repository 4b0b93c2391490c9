"""Every stage align runs, declared once.

An entry says what the rest of align needs to know of a stage: its config (the schema in
align/config.py), its command's help and flags, whether its output is a directory or one file,
whether it trains (every process of a multi-process run takes a shard), shares its rows out
between the processes (sampling and scoring) or runs on the main process alone, what `align
report` plots for it and whether it resumes. The CLI, recipes, the pipeline and the report read
these entries and keep no table of their own.

A stage's code is the module of its name here (align/stages/<name>.py, `-` written `_`) with a `run(config)`
that returns its output path. The module is imported only when the stage runs: the entries
must load without torch, so that `align --help` and a config error answer at once.

Adding a stage: its config class, its module, one entry below, its tests and its README section.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from align import config as schema
from align.errors import ConfigError
from align.flags import (
    ENGINE, LORA, MODEL, OPTIMISATION, OUTPUT, PRECISION, PROMPTS, REWARD_JUDGE, REWARD_SOURCES, SAMPLING, TRAINER, JUDGE_QUESTION,
    Flag, flag,
)


@dataclass(frozen=True)
class Stage:
    name: str  # the command (`align NAME`) and `stage:` in a recipe
    config: type[schema.StageConfig]
    help: str  # the command's help: first line in `align --help`, all of it in `align NAME --help`
    flags: tuple[Flag, ...]
    output: str = ""  # "" when the output is a directory; the suffix (".jsonl") when it is one file
    output_help: str = "Output directory."
    trains: bool = True  # False: sampling/scoring; a multi-process run does it on the main process alone, unless:
    shards: bool = False  # its rows are shared out between the processes (PartialRows.fill, sample(shared=True), share_out)
    resumes: bool = True  # takes --resume (continues an interrupted run without losing or redoing work)
    reads: str = ""  # the data `data_from: STAGE` hands it from a data-writing stage: "sft" or "pairs"
    writes: dict[str, str] = field(default_factory=dict)  # a directory stage's data files by kind, for data_from
    curves: tuple[tuple[str, ...], ...] = ()  # report plots, each the metrics.jsonl keys drawn together
    reward_vs_kl: bool = False  # the report also plots score against KL

    @property
    def module(self) -> str:
        return f"align.stages.{self.name.replace('-', '_')}"

    def run(self, config: schema.StageConfig) -> Path:
        return importlib.import_module(self.module).run(config)

    def output_path(self, directory: Path, name: str) -> Path:
        """Where a recipe's stage called `name` writes, inside the recipe's output_dir."""
        return directory / (name + self.output)


def get(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage type {name!r}; choose one of {', '.join(STAGES)}")
    return STAGES[name]


ONLINE_FLAGS = (
    MODEL, PROMPTS, OUTPUT, *REWARD_SOURCES,
    flag("online.num_generations", "--num-generations"), flag("online.max_new_tokens", "--max-new-tokens"),
    flag("online.temperature", "--temperature"), flag("online.beta", "--beta"),
    *OPTIMISATION, *LORA, *PRECISION, ENGINE,
)
LOSS_CURVES = ("loss", "eval_loss")

_ENTRIES = (
    Stage(
        "sft", schema.SFTConfig,
        "Supervised fine-tuning (TRL SFTTrainer): messages, prompt/completion or text data.",
        (*TRAINER, flag("completion_only_loss", "--completion-only-loss", off="--full-loss"), flag("packing", "--packing")),
        reads="sft", curves=(LOSS_CURVES, ("mean_token_accuracy",)),
    ),
    Stage(
        "rm", schema.RMConfig,
        "Reward-model training (Bradley-Terry) on preference pairs (TRL RewardTrainer; optional per-row 'margin') "
        "or ranked rows: prompt, completions, scores (every pair of a prompt compared in one step, InstructGPT's K-wise loss).",
        (*TRAINER, flag("center_rewards", "--center-rewards"), flag("min_gap", "--min-gap"),
         flag("margins_from_scores", "--margins-from-scores")),
        reads="pairs", curves=(LOSS_CURVES, ("accuracy", "eval_accuracy"), ("margin", "eval_margin")),
    ),
    Stage(
        "prm", schema.PRMConfig,
        "Process reward model (Let's Verify Step by Step): a token classifier scoring each step of a solution, trained on "
        "stepwise rows: prompt, completions (the steps), labels (one per step: true/false or a number in [0, 1]).\n\n"
        "A step's score is P(correct) on the last token of the separator after it; the output loads with "
        "AutoModelForTokenClassification and is used anywhere a reward model goes.",
        (*TRAINER, flag("step_separator", "--step-separator"), flag("last_step_only", "--last-step-only"),
         flag("pairwise", "--pairwise")),
        curves=(LOSS_CURVES, ("step_accuracy", "eval_step_accuracy"), ("first_error_accuracy", "eval_first_error_accuracy"),
                ("sibling_accuracy", "eval_sibling_accuracy")),
    ),
    Stage(
        "dpo", schema.DPOConfig,
        "Direct preference optimisation (TRL DPOTrainer) on prompt/chosen/rejected pairs.",
        (*TRAINER, flag("dpo.beta", "--beta"), flag("dpo.loss", "--loss"), flag("dpo.label_smoothing", "--label-smoothing"),
         flag("dpo.precompute_ref_log_probs", "--precompute-ref")),
        reads="pairs",
        curves=(LOSS_CURVES, ("rewards/accuracies", "eval_rewards/accuracies"), ("rewards/margins", "eval_rewards/margins")),
    ),
    Stage(
        "ppo", schema.PPOConfig,
        "PPO (InstructGPT's RL step, our own trainer) against a reward model, a python reward or an AI judge.",
        (MODEL, flag("reward_model.path", "--reward-model"), flag("reward_fn", "--reward-fn"), PROMPTS,
         flag("eval_prompts.path", "--eval-prompts"), OUTPUT, flag("ppo.episodes", "--episodes"),
         flag("train.batch_size", "--batch-size"), flag("ppo.mini_batches", "--mini-batches"),
         flag("ppo.micro_batch_size", "--micro-batch-size"), flag("ppo.ppo_epochs", "--ppo-epochs"),
         flag("ppo.max_new_tokens", "--max-new-tokens"), flag("ppo.temperature", "--temperature"),
         flag("ppo.kl_coef", "--kl-coef"), flag("ppo.target_kl", "--target-kl"), *REWARD_JUDGE,
         flag("reward_aggregate", "--reward-aggregate"), flag("ppo.process_rewards", "--process-rewards"),
         flag("value_model", "--value-model"), flag("ppo.value_head_on_policy", "--value-head-on-policy"),
         flag("ppo.eval_every", "--eval-every"),
         flag("train.learning_rate", "--learning-rate", "--lr"), flag("train.lr_scheduler", "--lr-scheduler"),
         flag("train.warmup_ratio", "--warmup-ratio"), flag("train.max_steps", "--max-steps"),
         flag("train.gradient_checkpointing", "--gradient-checkpointing", off="--no-gradient-checkpointing"),
         flag("train.save_steps", "--save-steps"),
         flag("train.seed", "--seed"), flag("train.report_to", "--report-to"), *LORA, *PRECISION, ENGINE),
        curves=(("score", "eval_score"), ("kl",), ("policy_loss", "value_loss"), ("entropy",),
                ("response_length", "eval_response_length")),
        reward_vs_kl=True,
    ),
    Stage(
        "grpo", schema.GRPOConfig,
        "GRPO (TRL GRPOTrainer): several completions per prompt, rewards normalised within each group.",
        (*ONLINE_FLAGS, flag("loss_type", "--loss-type"), flag("importance_sampling", "--importance-sampling"),
         flag("scale_rewards", "--scale-rewards")),
    ),
    Stage(
        "rloo", schema.RLOOConfig,
        "RLOO (TRL RLOOTrainer): several completions per prompt, each baselined by the others' mean reward.",
        ONLINE_FLAGS,
    ),
    Stage(
        "critique", schema.CritiqueConfig,
        "Constitutional AI data: answer, critique under a principle, revise; writes SFT rows and preference pairs.",
        (MODEL, PROMPTS, OUTPUT, flag("constitution", "--constitution"), flag("rounds", "--rounds"),
         flag("samples_per_prompt", "--samples-per-prompt"), flag("few_shot", "--few-shot", off="--no-few-shot"),
         *(f for f in SAMPLING if f.key != "sampling.num_samples"), ENGINE),
        output_help="Output directory (sft.jsonl, pairs.jsonl, trace.jsonl).",
        trains=False, shards=True, writes={"sft": "sft.jsonl", "pairs": "pairs.jsonl"},
    ),
    Stage(
        "label", schema.LabelConfig,
        "RLAIF preference labels: a judge picks the better response, in both orders; soft labels from its log-probs.",
        (flag("judge", "--judge", help="the judge: a local model (any causal LM align can load)"),
         flag("judge.url", "--judge-url"), flag("judge.api_model", "--judge-model"), OUTPUT, flag("pairs.path", "--pairs"),
         PROMPTS, flag("model.path", "--policy"), flag("sampling.num_samples", "--num-samples", "-n"), *JUDGE_QUESTION,
         flag("judge.chain_of_thought", "--judge-cot"), flag("swap", "--swap", off="--no-swap"),
         flag("min_confidence", "--min-confidence"), flag("sampling.max_new_tokens", "--max-new-tokens"),
         flag("sampling.temperature", "--temperature"), flag("judge.batch_size", "--batch-size"),
         flag("sampling.seed", "--seed"), ENGINE),
        output=".jsonl", output_help="Output JSONL of labelled pairs (prompt, chosen, rejected, label_prob).",
        trains=False, shards=True,
    ),
    Stage(
        "label-steps", schema.LabelStepsConfig,
        "Step labels without humans (Math-Shepherd): a policy's solutions split into steps, each step labelled by whether "
        "rollouts from it reach the right answer (--answer-fn), or by a function that checks each step (--step-fn).\n\n"
        "Writes stepwise rows (prompt, completions = the steps, labels) ready for `align prm`.",
        (flag("model.path", "--policy", "-m", help="the policy whose solutions are labelled: local dir, stage output or built-in name"),
         PROMPTS, OUTPUT, flag("answer_fn", "--answer-fn"), flag("step_fn", "--step-fn"),
         flag("rollouts", "--rollouts"), flag("labels", "--labels"), flag("step_separator", "--step-separator"), *SAMPLING,
         flag("model.dtype", "--dtype"), ENGINE),
        output=".jsonl", output_help="Output JSONL of stepwise rows (prompt, completions, labels).", trains=False,
        shards=True,
    ),
    Stage(
        "best-of-n", schema.BestOfNConfig,
        "Rejection sampling: n samples per prompt, scored by one reward; the best kept for SFT, best vs worst as pairs.\n\n"
        "Writes best.jsonl (-> align sft), pairs.jsonl with margins (-> align rm / dpo) and samples.jsonl; the "
        "manifest has the mean sample and best scores and the best-of-n policy's KL bound, log n - (n-1)/n.",
        (MODEL, PROMPTS, OUTPUT, flag("reward_model.path", "--reward-model"), flag("reward_fn", "--reward-fn"),
         *REWARD_JUDGE, flag("reward_aggregate", "--reward-aggregate"), *SAMPLING, flag("sampling.top_p", "--top-p"), flag("min_gap", "--min-gap"),
         flag("min_score", "--min-score"), flag("keep", "--keep"), flag("vote", "--vote"), flag("model.dtype", "--dtype"), ENGINE),
        output_help="Output directory (best.jsonl, pairs.jsonl, samples.jsonl).",
        trains=False, shards=True, writes={"sft": "best.jsonl", "pairs": "pairs.jsonl"},
    ),
    Stage(
        "generate", schema.GenerateConfig,
        "Sample completions from any model or stage output into a JSONL file.\n\n"
        "Sampling follows --temperature and --top-p only: the checkpoint's own generation_config settings "
        "(top_k, repetition_penalty, no_repeat_ngram_size, ...) are not applied.",
        (MODEL, PROMPTS, OUTPUT, *SAMPLING, flag("sampling.top_p", "--top-p"), ENGINE),
        output=".jsonl", output_help="Output JSONL file.", trains=False, shards=True, resumes=False,
    ),
    Stage(
        "eval", schema.EvalConfig,
        "Evaluate a model: rewards, KL and win rate against its reference, accuracy on pairs.",
        (MODEL, PROMPTS, OUTPUT, *REWARD_SOURCES, flag("reference", "--reference"), flag("no_reference", "--no-reference"),
         flag("pairs.path", "--pairs"), *SAMPLING, flag("sampling.top_p", "--top-p"), flag("best_of", "--best-of"), ENGINE),
        output=".json", output_help="Where to write metrics.json.", trains=False, shards=True, resumes=False,
    ),
    Stage(
        "merge", schema.MergeConfig,
        "Merge a LoRA/QLoRA adapter into a standalone full-precision checkpoint, verified by its logits.",
        (flag("model.path", "--model", "-m", help="a stage output with adapter/, or an adapter directory"), OUTPUT,
         flag("base", "--base"), flag("dtype", "--dtype"), flag("push_to_hub", "--push-to-hub")),
        trains=False, resumes=False,
    ),
)
STAGES: dict[str, Stage] = {entry.name: entry for entry in _ENTRIES}
