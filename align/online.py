"""What GRPO and RLOO share: prompts, rewards as TRL reward functions, the trainer run.

Both sample several completions per prompt and compare them with each other (GRPO: group-
normalised rewards; RLOO: the leave-one-out mean as baseline), so neither needs a value model.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from align.config import OnlineRLConfig
from align.data import PROMPT_FORMATS, DataReport, as_messages, is_messages, last_text, load_split, use_chat_template, warn_report
from align.judge import JudgeReward
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
    return run_trainer(config, lambda tokenizer, source: _plan(config, tokenizer, trainer_cls, args_cls, method_settings),
                       padding_side="left")


def _plan(config: OnlineRLConfig, tokenizer, trainer_cls, args_cls, method_settings: dict) -> TrainerPlan:
    _, rows, _ = load_split(config.prompts, PROMPT_FORMATS, config.train.seed)
    report = DataReport(config.prompts.path, format="prompt-only", rows_read=len(rows), rows_used=len(rows))
    chat = use_chat_template(tokenizer, config.prompts, is_messages(rows[0]["prompt"]), config.prompts.path)
    # TRL renders message lists with the chat template and leaves strings as they are.
    prompts = [as_messages(r["prompt"], "user") if chat else r["prompt"] for r in rows]
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
        f"{len(prompts)} prompts x {online.num_generations} generations",
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
