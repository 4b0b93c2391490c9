"""What GRPO and RLOO share: prompts, rewards as TRL reward functions, the trainer run.

Both sample several completions per prompt and compare them with each other (GRPO: group-
normalised rewards; RLOO: the leave-one-out mean as baseline), so neither needs a value model.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from align.config import OnlineRLConfig
from align.data import PROMPT_FORMATS, DataReport, as_messages, is_messages, last_text, load_numbered_split, prompt_ids, use_chat_template, warn_report
from align.data import check_room
from align.errors import DataError
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
    window = context_length(config.model, source)
    prompts = _prompts(rows, config.prompts.path, tokenizer, chat, config, window, report)
    # Held-out prompts (prompts.eval_path or eval_fraction): TRL samples and scores them every eval_steps.
    evals = _prompts(held, config.prompts.eval_path or config.prompts.path, tokenizer, chat, config, window,
                     DataReport("eval")) if held else None
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


def _prompts(rows: list[tuple[int, dict]], source: str, tokenizer, chat: bool, config: OnlineRLConfig, window: int,
             report: DataReport) -> list:
    """The (row number, row) pairs' prompts as TRL takes them: message lists it renders with the chat template, or text
    as it is. TRL hands each prompt to the model whole, so one longer than prompts.max_length is
    dropped (overlong=drop) or refused naming its row, and so is one that leaves no room in the
    model's context for max_new_tokens."""
    limit, new_tokens, kept = config.prompts.max_length, config.online.max_new_tokens, []
    for number, row in rows:
        length = len(prompt_ids(tokenizer, row["prompt"], chat))
        if length > limit and config.prompts.overlong == "drop":
            report.drop(f"prompt longer than max_length={limit}")
            continue
        if length > limit:
            raise DataError(f"{source}: row {number}: the prompt is {length} tokens, over prompts.max_length={limit}, and "
                            f"{config.stage} cannot cut a prompt; shorten it, raise prompts.max_length or set prompts.overlong=drop")
        check_room(source, number, length, new_tokens, window)
        kept.append(as_messages(row["prompt"], "user") if chat else row["prompt"])
    if not kept:
        raise DataError(f"{source}: no prompts left after filtering ({report.dropped})")
    return kept


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
