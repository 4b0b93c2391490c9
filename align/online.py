"""What GRPO and RLOO share: prompts, rewards as TRL reward functions, the trainer run.

Both sample several completions per prompt and compare them with each other (GRPO: group-
normalised rewards; RLOO: the leave-one-out mean as baseline), so neither needs a value model.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from align.config import OnlineRLConfig
from align.data import (PROMPT_FORMATS, DataReport, as_messages, fitting_prompts, is_messages, last_text, load_numbered_split,
                        use_chat_template, warn_report)
from align.judge import JudgeReward
from align.models import context_length
from align.rewards import RewardFunction, reward_model, warn_unused_aggregate
from align.training import TrainerPlan, run_trainer


def trl_reward(source, name: str):
    """One of our reward sources as a TRL reward function (text in, list of floats out)."""

    def reward(prompts, completions, **_):
        texts = [last_text(c) for c in completions]
        return source(prompts, texts).tolist()

    reward.__name__ = name
    return reward


def run_online(config: OnlineRLConfig, trainer_cls, args_cls, **method_settings) -> Path:
    return run_trainer(config, lambda tokenizer, source: _plan(config, tokenizer, source, trainer_cls, args_cls, method_settings),
                       padding_side="left")


def _plan(config: OnlineRLConfig, tokenizer, source: str, trainer_cls, args_cls, method_settings: dict) -> TrainerPlan:
    _, rows, held = load_numbered_split(config.prompts, PROMPT_FORMATS, config.train.seed)
    report = DataReport(config.prompts.path, format="prompt-only", rows_read=len(rows) + len(held))
    chat = use_chat_template(tokenizer, config.prompts, is_messages(rows[0][1]["prompt"]), config.prompts.path)
    window, new_tokens = context_length(config.model, source), config.online.max_new_tokens

    def fitting(part: list, source: str, report: DataReport) -> list:  # TRL renders message lists with the chat template
        prompts, _ = fitting_prompts(part, source, tokenizer, chat, config.prompts, new_tokens, window, report, whole=config.stage)
        return [as_messages(p, "user") if chat else p for p in prompts]

    prompts = fitting(rows, config.prompts.path, report)
    # Held-out prompts (prompts.eval_path or eval_fraction): TRL samples and scores them every eval_steps.
    evals = fitting(held, config.prompts.eval_path or config.prompts.path, DataReport("eval")) if held else None
    report.rows_used = len(prompts)
    sources = [reward_model(spec, config.reward_aggregate) for spec in config.reward_models] + [RewardFunction(fn) for fn in config.reward_fns]
    if config.reward_judge:
        sources.append(JudgeReward(config.reward_judge, config))
    warn_unused_aggregate(config, sources)
    rewards = [trl_reward(s, f"reward_{i}") for i, s in enumerate(sources)]
    warn_report(report)
    online = config.online
    engine_settings = {}
    if config.generation.engine == "vllm":
        trainer_cls, engine_settings = _on_engine(config, trainer_cls)
    return TrainerPlan(
        trainer_cls, args_cls, Dataset.from_list([{"prompt": p} for p in prompts]), report,
        f"{len(prompts)} prompts x {online.num_generations} generations" + (f", {len(evals)} held out" if evals else ""),
        eval_set=Dataset.from_list([{"prompt": p} for p in evals]) if evals else None,
        settings=dict(num_generations=online.num_generations, max_completion_length=online.max_new_tokens,
                      temperature=online.temperature, beta=online.beta, epsilon=online.epsilon,
                      num_iterations=online.num_iterations, reward_weights=online.reward_weights, **engine_settings,
                      **method_settings),
        trainer_inputs=lambda: {"reward_funcs": rewards}, kept_metrics=("reward", "kl"),
        manifest={"rewards": [s.name for s in sources]},
    )


def _on_engine(config: OnlineRLConfig, trainer_cls):
    """TRL's trainer sampling with vLLM in colocate mode, through align's engine (engines.TRLGeneration)."""
    import functools

    import torch

    from align.engines import TRLGeneration, engine_dtype, with_engine

    generation = functools.partial(TRLGeneration, spec=config.generation, seed=config.train.seed,
                                   dtype=engine_dtype(config.model, config.train.precision),
                                   lora_rank=config.lora.r if config.lora.enabled else None)
    settings = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=config.generation.gpu_memory_utilization,
                    vllm_enable_sleep_mode=config.generation.sleep and torch.cuda.is_available())
    return with_engine(trainer_cls, generation), settings
