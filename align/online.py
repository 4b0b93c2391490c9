"""What GRPO and RLOO share: prompts, rewards as TRL reward functions, the trainer run.

Both sample several completions per prompt and compare them with each other (GRPO: group-
normalised rewards; RLOO: the leave-one-out mean as baseline), so neither needs a value model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from datasets import Dataset

from align.checkpoints import prepare_output, write_manifest
from align.config import OnlineRLConfig
from align.data import PROMPT_FORMATS, DataReport, as_messages, is_messages, last_text, load_split, use_chat_template, warn_report
from align.judge import JudgeReward
from align.models import check_lora_possible, count_parameters, load_model, load_tokenizer, peft_config, resolve_model, save_stage_model
from align.rewards import RewardFunction, RewardModel
from align.training import MetricsLog, keep_adapters_float32, last_logged, run_training, trainer_args

log = logging.getLogger("align")


def trl_reward(source, name: str):
    """One of our reward sources as a TRL reward function (text in, list of floats out)."""

    def reward(prompts, completions, **_):
        texts = [last_text(c) for c in completions]
        return source(prompts, texts).tolist()

    reward.__name__ = name
    return reward


def run_online(config: OnlineRLConfig, trainer_cls, args_cls, **method_args) -> Path:
    out, started = Path(config.output), time.time()
    check_lora_possible(config.lora)
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(config.model, source, padding_side="left")
    _, rows, _ = load_split(config.prompts, PROMPT_FORMATS, config.train.seed)
    report = DataReport(config.prompts.path, format="prompt-only", rows_read=len(rows), rows_used=len(rows))
    chat = use_chat_template(tokenizer, config.prompts, is_messages(rows[0]["prompt"]), config.prompts.path)
    # TRL renders message lists with the chat template and leaves strings as they are.
    prompts = [as_messages(r["prompt"], "user") if chat else r["prompt"] for r in rows]
    sources = [RewardModel(spec) for spec in config.reward_models] + [RewardFunction(fn) for fn in config.reward_fns]
    if config.reward_judge:
        sources.append(JudgeReward(config.reward_judge, config))
    rewards = [trl_reward(s, f"reward_{i}") for i, s in enumerate(sources)]
    warn_report(report)
    prepare_output(out, resume=config.resume, overwrite=config.overwrite)

    settings = config.online
    args = trainer_args(
        args_cls, config, out, has_eval=False, num_generations=settings.num_generations,
        max_completion_length=settings.max_new_tokens, temperature=settings.temperature, beta=settings.beta,
        epsilon=settings.epsilon, num_iterations=settings.num_iterations, reward_weights=settings.reward_weights,
        **method_args,
    )
    trainer = trainer_cls(
        model=load_model(config.model, source, config.lora), reward_funcs=rewards, args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tokenizer,
        peft_config=peft_config(config.lora), callbacks=[MetricsLog(out, config.stage)],
    )
    keep_adapters_float32(trainer, config)
    trainable, total = count_parameters(trainer.model)
    log.info("%s: %d prompts x %d generations, %s/%s parameters trainable", config.stage, len(prompts),
             settings.num_generations, f"{trainable:,}", f"{total:,}")
    metrics = run_training(trainer, out, config.resume)
    metrics.update(last_logged(trainer, "reward") | last_logged(trainer, "kl"))
    save_stage_model(trainer.model, tokenizer, out, config.model, source, config.lora)
    write_manifest(out, config=config, metrics=metrics, started=started, data=asdict(report),
                   rewards=[s.name for s in sources], trainable_parameters=trainable, lora=config.lora.enabled)
    return out
