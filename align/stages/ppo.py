"""PPO against a reward model, a reward function or an AI judge: InstructGPT's RL step, in our own loop.

One update (the numbered steps in run()):
  1. rollout     sample a batch of responses (eval mode, temperature, stop at EOS); in float32 the
                 behaviour log-probs come from the sampling pass itself, not from a second forward
                 pass (in bf16/fp16 they are recomputed: see _sampling_is_exact)
  2. score       the reward on prompt + response text, normalised and clipped if asked
  3. advantages  reference log-probs and values (one forward each, on response positions only); the
                 per-token KL penalty, the score on the last token (a process reward model's step
                 scores on the tokens that end the steps); GAE advantages, whitened
  4. update      ppo_epochs over shuffled mini-batches: clipped policy loss, clipped value loss
  5. log, save   the schedules' steps, metrics (held-out scores when due), samples, a checkpoint
The math lives in align/losses.py; the models (one shared base with LoRA) in align/roles.py.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from align import distributed, generation, losses
from align.checkpoints import (
    METRICS, SAMPLES, append_metrics, latest_checkpoint, load_loop_state, prepare_output, read_records, save_loop_state, trim_metrics,
    write_manifest,
)
from align.config import ModelSpec, PPOConfig, PPOSpec
from align.data import PROMPT_FORMATS, DataReport, fitting_prompts, is_messages, load_numbered_split, use_chat_template, warn_report
from align.errors import ConfigError, TrainingError
from align.generation import (ModelInputs, Rollout, model_inputs, response_logits, response_logits_and_values,
                              response_values, sample_rollout, unwrapped)
from align.models import check_lora_possible, context_length, load_tokenizer, resolve_model, save_stage_model
from align.memory import peak_memory_mb
from align.rewards import ProcessRewardModel, RewardModel, load_reward, warn_unused_aggregate
from align.roles import POLICY, Roles, SharedBaseReward, build_roles, save_value, same_vocabulary, shared_reward_adapter
from align.precision import autocast, compute_dtype, grad_scaler, weights_dtype
from align.training import check_tracker

log = logging.getLogger("align")


@dataclass
class Prompts:
    raw: list  # as given (strings or message lists), for the reward and the logs
    ids: list[list[int]]


@dataclass
class Batch:
    """A scored rollout, ready for PPO updates. Per-token tensors are (B, T); sequences in `inputs` (B, P + T)."""

    inputs: ModelInputs
    response: torch.Tensor  # (B, T) token ids
    mask: torch.Tensor  # (B, T) 1.0 on real response tokens
    old_logprobs: torch.Tensor  # (B, T) behaviour policy
    ref_logprobs: torch.Tensor  # (B, T) reference
    values: torch.Tensor  # (B, T) the value function before the update
    advantages: torch.Tensor  # (B, T) GAE, whitened if asked
    returns: torch.Tensor  # (B, T) advantages + values: the value function's targets
    token_kl: torch.Tensor  # (B, T) the per-token KL estimate the penalty is made of
    non_score_reward: torch.Tensor  # (B, T) -kl_coef * token_kl: the penalty part of the rewards
    # The first mini-batch of the first epoch, as (rows, loss weight) micro-batches, and each one's
    # value-loss stats when its value pass (forward and backward) already ran in _score_batch.
    first_mini_batch: list[tuple[torch.Tensor, float]]
    first_value_stats: list[dict[str, float]]


@dataclass
class Optimisation:
    """What PPO's updates change and its checkpoints keep: the trained tensors and AdamW, the
    learning-rate schedule, fp16's loss scale, the adaptive KL coefficient and the running
    moments that normalise scores."""

    params: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any  # torch.amp.GradScaler (disabled unless fp16)
    kl_controller: losses.AdaptiveKLController
    moments: losses.RunningMoments

    def save(self, out: Path, step: int, keep: int) -> None:
        extra = {"kl_coef": self.kl_controller.value, "moments": [self.moments.mean, self.moments.var, self.moments.count],
                 "grad_scaler": self.scaler.state_dict()}
        save_loop_state(out, step, self.params, self.optimizer, self.scheduler, extra, keep)

    def restore(self, out: Path) -> int:
        """Load the newest checkpoint in `out`; the number of updates it had done (0: none)."""
        done, extra = load_loop_state(out, self.params, self.optimizer, self.scheduler)
        if done:
            self.kl_controller.value = extra["kl_coef"]
            self.moments.mean, self.moments.var, self.moments.count = extra["moments"]
            if extra.get("grad_scaler"):
                self.scaler.load_state_dict(extra["grad_scaler"])
        return done


@dataclass
class Session:
    """What stays fixed for a whole run: its config, models, prompts, reward and sizes."""

    config: PPOConfig
    out: Path
    roles: Roles
    tokenizer: Any
    prompts: Prompts
    held_out: Prompts | None
    reward: Any
    updates: int
    global_batch: int  # rollouts per update over all processes
    tracker: Any = None
    engine: Any = None  # a vLLM engine (generation.engine: vllm) that samples the rollouts, or None: the policy does
    engine_serves: int = -1  # the number of updates whose weights the engine serves (-1: none synced yet)


def run(config: PPOConfig) -> Path:
    out, started, ppo = Path(config.output), time.time(), config.ppo
    if distributed.sharded_engine():
        raise ConfigError(
            f"align ppo runs data-parallel (every process holds the models), not under {distributed.sharded_engine()}; "
            "launch it with --num-processes N or recipes/accelerate/ddp.yaml"
        )
    check_lora_possible(config.lora)
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(config.model, source, padding_side="left")
    prompts, held_out, report = _load_prompts(config, tokenizer, context_length(config.model, source))
    # A reward model trained as LoRA on this very base becomes a third adapter, not a second model.
    shared_reward = (
        shared_reward_adapter(resolve_model(config.reward_model), source, config.lora.qlora)
        if config.reward_model and config.lora.enabled
        else None
    )
    reward = None if shared_reward else load_reward(config, config.ppo.score_batch_size, config.ppo.reward_in_4bit,
                                                    conversational=is_messages(prompts.raw[0]))
    dense = isinstance(reward, ProcessRewardModel) and not reward.outcome_only and ppo.process_rewards == "dense"
    reward_name = reward.name if reward is not None else config.reward_model.path  # a reward adapter on the policy's base
    warn_unused_aggregate(config, [reward if reward is not None else reward_name])
    if "process_rewards" in ppo.model_fields_set and ppo.process_rewards == "dense" and not dense:
        log.warning("process_rewards=dense does not apply to %s: it is not a process reward model that scores each step; "
                    "it gives one score per response", reward_name)
    if shared_reward and not config.value_model:
        value_source = resolve_model(config.reward_model)
    else:
        value_source = _value_source(config, tokenizer, reward)
    prepare_output(out, resume=config.resume, overwrite=config.overwrite)

    torch.manual_seed(config.train.seed)  # LoRA's initial A matrices come from this generator
    roles = build_roles(config.model, source, config.lora, value_source, tokenizer.pad_token_id,
                        gradient_checkpointing=config.train.gradient_checkpointing, value_on_policy=ppo.value_head_on_policy)
    if shared_reward:
        reward = SharedBaseReward(roles, shared_reward, tokenizer, ppo.score_batch_size)
    roles.train(False)  # no dropout anywhere: PPO's ratio must be 1 before the first step
    # The rollout batch is per process; each update samples the global batch, a shard per process.
    global_batch = config.train.batch_size * distributed.world_size()
    updates = min(ppo.episodes // global_batch, config.train.max_steps or 1 << 30)
    state = _optimisation(config, roles, updates)
    first = state.restore(out) if config.resume else 0
    if first:
        log.info("resuming %s after update %d", out, first)
    trim_metrics(out, first)
    trim_metrics(out, first, SAMPLES)
    log.info("ppo: %d updates of %d rollouts (%d per process x %d), %s trainable parameters, value from %s",
             updates, global_batch, config.train.batch_size, distributed.world_size(),
             f"{sum(p.numel() for p in state.params.values()):,}", value_source or "scratch")
    engine = _engine(config, source, roles, context_length(config.model, source)) if config.generation.engine == "vllm" else None
    run = Session(config, out, roles, tokenizer, prompts, held_out, reward, updates, global_batch, _tracker(config, out), engine)
    baseline = _baseline(run, first)

    metrics: dict[str, float] = {}
    progress = tqdm(range(first, updates), desc="ppo", unit="update", disable=not log.isEnabledFor(logging.INFO))
    for step in progress:
        began = time.perf_counter()
        # 1. rollout: this process's share of the update's prompts, answered in eval mode
        picked, seeds = _prompts_of_update(run, step)
        _serve_policy(run, step)  # the engine serves the policy as the last update left it
        with _compute(config, roles):
            rollout = _rollout(roles, tokenizer, [prompts.ids[i] for i in picked], ppo, out, seeds, engine)
        if engine:
            engine.rest()  # generation.sleep on a GPU: its memory is training's until the next rollout
        sampled = time.perf_counter()
        # 2. score: the reward on the decoded text, normalised over every process's scores
        completions = _decode(tokenizer, rollout)
        with _compute(config, roles):  # a reward model scores in the compute precision too
            asked = [prompts.raw[i] for i in picked]
            if dense:  # (B, T): each step's score where the step ends; the logged score is their sum
                step_rewards, placed = _step_rewards(reward, tokenizer, asked, completions, rollout, ppo.missing_eos_penalty)
                raw_scores = step_rewards.sum(1)
                all_scores = distributed.gather(raw_scores)
                scores = _normalise_steps(step_rewards, placed, state.moments, ppo)
            else:
                raw_scores = _score(reward, asked, completions, rollout.finished, ppo.missing_eos_penalty)
                all_scores = distributed.gather(raw_scores)
                scores = _normalise(raw_scores, all_scores, state.moments, ppo)
            # 3. advantages: reference and value passes, the KL penalty, GAE
            batch = _score_batch(roles, rollout, scores, config, state, step,
                                 recompute=engine is not None or not _sampling_is_exact(config))
        engine_stats = _engine_gap(rollout, batch, config, step, out) if engine else {}
        scored = time.perf_counter()
        # 4. update: ppo_epochs over shuffled mini-batches
        train_stats = _update(roles, state, batch, config, step, out)
        timings = {**engine_stats, "time_generate": sampled - began, "time_score": scored - sampled, "time_train": time.perf_counter() - scored}
        # 5. log and save
        if step % ppo.sample_every == 0:
            _log_samples(out, step + 1, [prompts.raw[i] for i in picked], completions, raw_scores)
        metrics = _after_update(run, state, step, batch, rollout, all_scores, {**train_stats, **timings})
        progress.set_postfix(score=f"{metrics['score']:.3g}", kl=f"{metrics['kl']:.3g}", refresh=False)

    if run.tracker:
        run.tracker.end_training()
    if engine:
        engine.close()
    save_stage_model(roles.policy, tokenizer, out, config.model, source, config.lora)
    save_value(roles, out / "value")
    write_manifest(
        out, config=config, metrics={**metrics, **baseline, "peak_memory_mb": peak_memory_mb()}, started=started,
        data=asdict(report), lora=config.lora.enabled,
        reward=getattr(reward, "name", ""), dense_process_rewards=dense, reward_on_shared_base=shared_reward is not None, value_init=value_source or "scratch",
        value_head_on_policy=ppo.value_head_on_policy,
    )
    return out


def _after_update(run: Session, state: Optimisation, step: int, batch: Batch, rollout: Rollout, all_scores: torch.Tensor,
                  stats: dict[str, float]) -> dict[str, float]:
    """An update's bookkeeping: the schedules' steps, its metrics (and held-out scores when due)
    to metrics.jsonl and the tracker, and a checkpoint when due."""
    config, done = run.config, step + 1
    state.scheduler.step()
    # Reported KL (and the adaptive controller's input) is k3 per sequence: unbiased and never
    # negative, whatever estimator shapes the rewards.
    token_kl = losses.kl_penalty(batch.old_logprobs, batch.ref_logprobs, "k3") * batch.mask
    sequence_kl = distributed.all_mean({"kl": token_kl.sum(1).mean().item()})["kl"]
    if config.ppo.target_kl:
        state.kl_controller.update(sequence_kl, run.global_batch)
    metrics = {**_update_metrics(step, run.global_batch, all_scores, sequence_kl, batch, rollout, state), **stats}
    if config.ppo.eval_every and run.held_out and (done % config.ppo.eval_every == 0 or done == run.updates):
        _serve_policy(run, done)
        metrics.update(_evaluate(run.roles, run.tokenizer, run.held_out, run.reward, config, run.engine))
    append_metrics(run.out, {"stage": "ppo", **metrics})
    if run.tracker:
        run.tracker.log(metrics, step=done)
    if done % config.train.save_steps == 0 and done < run.updates:
        state.save(run.out, done, config.train.save_total_limit)
    return metrics


# ---------------------------------------------------------------------------------------------
# Setup


def _load_prompts(config: PPOConfig, tokenizer, window: int) -> tuple[Prompts, Prompts | None, DataReport]:
    """Training prompts, and held-out prompts (eval_prompts, or data.eval_fraction of prompts)."""
    _, rows, held = load_numbered_split(config.prompts, PROMPT_FORMATS, config.train.seed)
    report = DataReport(config.prompts.path, format="prompt-only", rows_read=len(rows) + len(held))
    prompts = _tokenize_prompts(rows, config.prompts.path, tokenizer, config, window, report)
    if config.eval_prompts:
        _, held, _ = load_numbered_split(config.eval_prompts.model_copy(update={"eval_fraction": 0.0}), PROMPT_FORMATS, 0)
    source = config.eval_prompts.path if config.eval_prompts else config.prompts.eval_path or config.prompts.path
    evals = _tokenize_prompts(held, source, tokenizer, config, window, DataReport("eval")) if held else None
    report.rows_used = len(prompts.ids)
    warn_report(report)
    return prompts, evals, report


def _tokenize_prompts(rows: list[tuple[int, dict]], source: str, tokenizer, config: PPOConfig, window: int,
                      report: DataReport) -> Prompts:
    """(row number in `source`, row) pairs as prompt ids, cut to prompts.max_length from the start."""
    chat = use_chat_template(tokenizer, config.prompts, is_messages(rows[0][1]["prompt"]), source)
    return Prompts(*fitting_prompts(rows, source, tokenizer, chat, config.prompts, config.ppo.max_new_tokens, window, report))


def _value_source(config: PPOConfig, tokenizer, reward) -> str | None:
    """Initialise the value function from --value-model, else from the reward model when it shares the
    policy's tokenizer and width, else from scratch (LoRA) or the policy (full fine-tuning)."""
    if config.value_model:
        return resolve_model(ModelSpec(path=config.value_model))
    if isinstance(reward, RewardModel) and same_vocabulary(reward.tokenizer, tokenizer):
        reward_width = getattr(reward.model.config, "hidden_size", None)
        if reward_width == _hidden_width(config.model, resolve_model(config.model)):
            return resolve_model(config.reward_model)
    return None


def _hidden_width(spec: ModelSpec, source: str) -> int | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code), "hidden_size", None)


def _tracker(config: PPOConfig, out: Path):
    """Send metrics to --report-to through accelerate's trackers (the same ones the HF Trainer uses)."""
    if config.train.report_to == "none":
        return None
    from accelerate import Accelerator

    check_tracker(config.train.report_to)
    accelerator = Accelerator(log_with=config.train.report_to, project_dir=str(out / "logs"), cpu=not torch.cuda.is_available())
    flat = {k: v for k, v in {**config.ppo.model_dump(), **config.train.model_dump()}.items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(config.name or "align-ppo", config=flat)
    return accelerator


def _optimisation(config: PPOConfig, roles: Roles, updates: int) -> Optimisation:
    params = roles.trainable()
    optimizer = _optimizer(params, config)
    return Optimisation(
        params, optimizer, _scheduler(config, optimizer, updates),
        grad_scaler(config.train.precision, roles.device),  # fp16 compute: scale the losses
        losses.AdaptiveKLController(config.ppo.kl_coef, config.ppo.target_kl or 1.0, config.ppo.kl_horizon),
        losses.RunningMoments(),
    )


def _optimizer(params: dict, config: PPOConfig):
    """AdamW, fused where this torch supports it for these tensors (3x faster than the loop on CPU)."""
    kwargs = dict(lr=config.train.learning_rate, weight_decay=config.train.weight_decay)
    try:
        return torch.optim.AdamW(params.values(), fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params.values(), **kwargs)


def _scheduler(config: PPOConfig, optimizer, updates: int):
    from transformers import get_scheduler

    warmup = round(config.train.warmup_ratio * updates)
    return get_scheduler(config.train.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max(updates, 1))


def _prompts_of_update(run: Session, step: int) -> tuple[list[int], list[int]]:
    """This process's prompts for update `step` (indices into run.prompts) and their sampling seeds."""
    seed = run.config.train.seed
    rows = _shard(_batch_indices(len(run.prompts.ids), run.global_batch, step, seed), run.config.train.batch_size)
    return [index for _, index in rows], [generation.row_seed(seed, step, row) for row, _ in rows]


def _shard(indices: list[int], per_process: int) -> list[tuple[int, int]]:
    """This process's (global row, prompt index) pairs of an update's global batch."""
    start = distributed.rank() * per_process
    return list(enumerate(indices))[start:start + per_process]


def _batch_indices(count: int, batch: int, step: int, seed: int) -> list[int]:
    """Prompts for update `step`: passes over a seeded shuffle, so a resumed run sees the same ones."""
    start = step * batch
    order: list[int] = []
    epoch = start // count
    while len(order) < (start % count) + batch:
        shuffled = list(range(count))
        random.Random(seed * 7919 + epoch).shuffle(shuffled)
        order += shuffled
        epoch += 1
    return order[start % count: start % count + batch]


# ---------------------------------------------------------------------------------------------
# Rollout scoring


def _compute(config: PPOConfig, roles: Roles):
    """Forward passes in the compute precision (train.precision); losses stay in float32."""
    return autocast(config.train.precision, roles.device)


def _sampling_is_exact(config: PPOConfig) -> bool:
    """Whether the sampler's log-probs are the policy's as the scoring and training passes compute
    them. With float32 weights and compute they agree to rounding, so PPO uses them and skips a
    forward pass. In bf16 or fp16, cached one-token-at-a-time decoding rounds differently from a
    full forward: the sampler's log-probs are off by about 1e-2 per token, which shows as KL
    against the reference before the first step and as clipped ratios, so the behaviour log-probs
    are recomputed by a forward pass."""
    return compute_dtype(config.train.precision) == weights_dtype(config.model, not config.lora.enabled) == torch.float32


def _rollout(roles: Roles, tokenizer, prompts: list[list[int]], ppo: PPOSpec, out: Path, seeds: list[int], engine=None) -> Rollout:
    try:
        with roles.acting() as policy:
            if engine:
                return engine.rollout(prompts, ppo.max_new_tokens, ppo.temperature, seeds, tokenizer.pad_token_id,
                                      generation.eos_token_ids(policy, tokenizer), roles.device)
            return sample_rollout(policy, tokenizer, prompts, ppo.max_new_tokens, ppo.temperature, seeds)
    except RuntimeError as exc:
        if "inf" in str(exc) or "nan" in str(exc):  # the sampler met a diverged policy's logits
            _diverged(out, "the policy's probabilities became NaN/inf while sampling")
        raise


def _engine(config: PPOConfig, source: str, roles: Roles, window: int):
    """A vLLM engine serving the starting policy (LoRA: its base, with adapters enabled), in the
    compute precision."""
    from align.engines import VLLMEngine, engine_dtype, lora_sync

    adapters = roles.shared_base and lora_sync(config.generation) == "adapter"
    return VLLMEngine(source, config.generation, dtype=engine_dtype(config.model, config.train.precision), seed=config.train.seed,
                      lora_rank=config.lora.r if adapters else None, max_model_len=window,
                      trust_remote_code=config.model.trust_remote_code)


def _serve_policy(run: Session, done: int) -> None:
    """With an engine: make it serve the policy as `done` updates left it, syncing only if it does not
    yet (an eval after an update and the next update's rollouts share one sync)."""
    if run.engine and run.engine_serves != done:
        _sync_engine(run.engine, run.roles)
        run.engine_serves = done


def _sync_engine(engine, roles: Roles) -> None:
    """Give the engine the policy's current weights: LoRA, its adapter (served as such, or merged into
    the base here); full fine-tuning, every weight."""
    if not roles.shared_base:
        engine.load_weights(unwrapped(roles.policy))
    elif engine.lora_rank:
        engine.load_adapter(roles.policy, POLICY)
    else:
        engine.load_merged(roles.policy, POLICY)


def _engine_gap(rollout: Rollout, batch: Batch, config: PPOConfig, step: int, out: Path) -> dict[str, float]:
    """The stale-weights guard: the engine's log-probs of the tokens it sampled against the trainer's
    own forward pass on them (the behaviour log-probs PPO uses). They differ by rounding when the
    engine serves the trainer's weights; a larger mean gap means it serves other weights (a missed
    sync, an adapter it did not apply), and the run stops before training on those samples."""
    gap = (rollout.logprobs.float() - batch.old_logprobs).abs() * batch.mask
    stats = distributed.all_mean({"engine_logprob_gap": float(gap.sum() / batch.mask.sum().clamp(min=1)),
                                  "engine_logprob_gap_max": float(gap.max())})
    limit = config.generation.max_logprob_gap
    if stats["engine_logprob_gap"] > limit:
        last = latest_checkpoint(out)
        raise TrainingError(
            f"update {step + 1}: the vLLM engine's log-probs of its own samples differ from the trainer's by "
            f"{stats['engine_logprob_gap']:.3f} nats per token (max {stats['engine_logprob_gap_max']:.2f}), above "
            f"generation.max_logprob_gap={limit}: the engine is serving different weights than the trainer. Training "
            f"stopped before this update; {f'the last checkpoint is kept in {last}' if last else 'no checkpoint was saved yet'}."
        )
    return stats


def _decode(tokenizer, rollout: Rollout) -> list[str]:
    rows, lengths = rollout.response.tolist(), rollout.response_mask.sum(1).tolist()  # the mask is a prefix
    return [tokenizer.decode(row[:length], skip_special_tokens=True) for row, length in zip(rows, lengths)]


def _score(reward, prompts: list, completions: list[str], finished: torch.Tensor, eos_penalty: float | None) -> torch.Tensor:
    scores = reward(prompts, completions).float()
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise TrainingError(f"the reward returned {scores[bad[0]].item()} for completion {completions[bad[0]]!r}; training stopped")
    if eos_penalty:
        scores = scores - eos_penalty * (~finished).float()
    return scores


def _step_rewards(reward: ProcessRewardModel, tokenizer, prompts: list, completions: list[str], rollout: Rollout,
                  eos_penalty: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense process rewards, (B, T): each step's score on the response token that ends the step (found
    by decoding the response's tokens), 0 elsewhere; a response that never ends has eos_penalty taken
    off its last token. With them, (B, T) bool: where a reward stands."""
    rewards, placed = torch.zeros(rollout.response.shape), torch.zeros(rollout.response.shape, dtype=torch.bool)
    lengths = rollout.response_mask.sum(1).tolist()
    tokens = rollout.response.tolist()
    for row, (scores, ends) in enumerate(reward.scored_steps(prompts, completions)):
        if not torch.isfinite(scores).all():
            raise TrainingError(f"the process reward model returned {scores.tolist()} for completion {completions[row]!r}; "
                                "training stopped")
        at = torch.tensor(generation.token_ends(tokenizer, tokens[row][:lengths[row]], ends), dtype=torch.long)
        rewards[row].index_add_(0, at, scores.float())
        placed[row, at] = True
    if eos_penalty:
        unfinished = (~rollout.finished.cpu()).nonzero().flatten()
        last = (rollout.response_mask.sum(1) - 1).clamp(min=0).cpu()[unfinished]
        rewards[unfinished, last] -= eos_penalty
        placed[unfinished, last] = True
    return rewards, placed


def _normalise_steps(rewards: torch.Tensor, placed: torch.Tensor, moments: losses.RunningMoments, ppo: PPOSpec) -> torch.Tensor:
    """Dense rewards normalised and clipped as scores are, reward by reward: the running moments are
    those of every process's rewards where they stand."""
    if ppo.reward_norm:
        values = rewards[placed].double()
        moments.update_sums(*distributed.all_sum(torch.stack([values.new_tensor(len(values)), values.sum(),
                                                              (values**2).sum()])).tolist())
        rewards = torch.where(placed, (rewards - moments.mean) / moments.std, rewards)
    if ppo.reward_clip:
        rewards = rewards.clamp(-ppo.reward_clip, ppo.reward_clip)
    return rewards


def _normalise(scores: torch.Tensor, all_scores: torch.Tensor, moments: losses.RunningMoments, ppo: PPOSpec) -> torch.Tensor:
    """This process's scores, normalised by running moments of every process's scores."""
    if ppo.reward_norm:
        moments.update(all_scores)
        scores = (scores - moments.mean) / moments.std
    if ppo.reward_clip:
        scores = scores.clamp(-ppo.reward_clip, ppo.reward_clip)
    return scores


def _score_batch(roles: Roles, rollout: Rollout, scores: torch.Tensor, config: PPOConfig, state: Optimisation, step: int,
                 recompute: bool) -> Batch:
    """Step 3 of an update: everything the PPO losses need, computed once before the epochs.

    The value pass doubles as the value model's training pass for the first mini-batch: the weights
    have not moved yet, so the values it computes are the old values exactly. For each micro-batch
    of that mini-batch the values are computed with gradients, their rows' returns (GAE is per row)
    and value loss follow, and the loss is back-propagated at once; that mini-batch's update then
    runs only the policy pass. The same gradients, one value forward fewer per update. (With the
    value head on the policy, training computes both in one pass, so the values here are plain.)"""
    ppo, inputs, mask = config.ppo, model_inputs(rollout), rollout.response_mask.float()

    def logprobs(role) -> torch.Tensor:
        with role as model:
            return losses.token_logprobs(response_logits(model, *inputs), rollout.response, ppo.temperature)

    with torch.no_grad():
        old_logprobs = logprobs(roles.acting()) * mask if recompute else rollout.logprobs  # see _sampling_is_exact
        ref_logprobs = logprobs(roles.referencing())
        token_kl = losses.kl_penalty(old_logprobs, ref_logprobs, ppo.kl_estimator) * mask
        rewards, non_score_reward = losses.shaped_rewards(scores, token_kl, mask, state.kl_controller.value)
    values, advantages, returns = torch.zeros_like(mask), torch.zeros_like(mask), torch.zeros_like(mask)
    first = _mini_batches(config, mask, step, epoch=0)[0]
    stats = [] if roles.value_on_policy else [
        _value_pass(roles, inputs.rows(idx), mask[idx], rewards[idx], weight, config, state.scaler, values, advantages, returns, idx)
        for idx, weight in first]
    rest = torch.ones(len(mask), dtype=torch.bool)
    if stats:
        rest[torch.cat([idx for idx, _ in first])] = False
    if rest.any():  # the other mini-batches' rows: values only
        idx = rest.nonzero().flatten()
        with torch.no_grad(), roles.valuing() as value_body, _compute(config, roles):
            values[idx] = response_values(value_body, roles.value_head, *inputs.rows(idx)) * mask[idx]
        advantages[idx], returns[idx] = losses.gae(rewards[idx], values[idx], mask[idx], ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        advantages = losses.masked_whiten(advantages, mask, total=distributed.all_sum)  # over the global batch
    return Batch(inputs, rollout.response, mask, old_logprobs, ref_logprobs, values, advantages, returns, token_kl,
                 non_score_reward, first, stats)


def _value_pass(roles: Roles, inputs: ModelInputs, mask: torch.Tensor, rewards: torch.Tensor, weight: float,
                config: PPOConfig, scaler, values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
                idx: torch.Tensor) -> dict[str, float]:
    """One micro-batch's values (written into `values`, with its rows' GAE into `advantages` and
    `returns`) and its value loss, scaled by `weight`, back-propagated. Returns the loss's stats."""
    ppo = config.ppo
    with roles.valuing() as value_body, _compute(config, roles):
        new = response_values(value_body, roles.value_head, *inputs)
        old = new.detach() * mask
        row_advantages, row_returns = losses.gae(rewards, old, mask, ppo.gamma, ppo.lam)
        vf_loss, vf_stats = losses.value_loss(new, old, row_returns, mask, ppo.clip_range_value)
        scaler.scale(weight * ppo.vf_coef * vf_loss).backward()
    values[idx], advantages[idx], returns[idx] = old, row_advantages, row_returns
    return {key: float(value.detach()) for key, value in {"value_loss": vf_loss, **vf_stats}.items()}


# ---------------------------------------------------------------------------------------------
# Updates


def _update(roles: Roles, state: Optimisation, batch: Batch, config: PPOConfig, step: int, out: Path) -> dict[str, float]:
    """ppo_epochs passes of shuffled mini-batches, one optimizer step per mini-batch.

    A mini-batch runs forward and backward in micro-batches of ppo.micro_batch_size rows, each
    loss weighted by its share of the mini-batch's response tokens: the gradients add up to the
    mini-batch's, while only one micro-batch's activations are held at a time. With several
    processes each shuffles its own shard, a global mini-batch is the union of theirs, and the
    weights are shares of the global mini-batch's tokens, so the step is the one a single
    process would take on the union. In fp16 the losses are scaled (`scaler`); a step whose
    scaled gradients overflowed is skipped and the scale lowered, as torch.amp does."""
    ppo = config.ppo
    optimizer, scaler, params = state.optimizer, state.scaler, state.params
    stats: dict[str, list[float]] = defaultdict(list)
    for epoch in range(ppo.ppo_epochs):
        epoch_kl = []
        mini_batches = [batch.first_mini_batch, *_mini_batches(config, batch.mask, step, epoch)[1:]] if epoch == 0 else (
            _mini_batches(config, batch.mask, step, epoch))
        for number, micro_batches in enumerate(mini_batches):
            totals: dict[str, float] = defaultdict(float)
            for i, (idx, weight) in enumerate(micro_batches):
                done = batch.first_value_stats[i] if epoch == number == 0 and batch.first_value_stats else None  # see _score_batch
                for key, value in _accumulate_gradients(roles, batch, idx, weight, config, scaler, done).items():
                    totals[key] += weight * value
            distributed.average_gradients(params.values())
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), config.train.max_grad_norm))
            totals = distributed.all_mean(dict(totals))  # weighted sums per shard -> means over the global mini-batch
            overflow_expected = scaler.is_enabled()  # fp16: an inf gradient only means the scale is too high
            if not all(math.isfinite(x) for x in (totals["policy_loss"], totals["value_loss"])) or (
                    not math.isfinite(grad_norm) and not overflow_expected):
                _diverged(out, "a PPO loss or gradient became NaN/inf")
            scaler.step(optimizer)
            scaler.update()
            if not _all_finite(params.values()):
                _diverged(out, "the weights became NaN/inf after an optimizer step (learning rate too high?)")
            optimizer.zero_grad(set_to_none=True)
            for key, value in {**totals, "grad_norm": grad_norm}.items():
                stats[key].append(value)
            epoch_kl.append(totals["approx_kl"])
        # The same decision on every process (they would wait for each other forever otherwise).
        if ppo.early_stop_kl and sum(epoch_kl) / len(epoch_kl) > ppo.early_stop_kl:
            stats["early_stopped"].append(1.0)
            break
    return {key: sum(values) / len(values) for key, values in stats.items()}


def _all_finite(tensors) -> bool:
    """False when any element is NaN or inf: their sums say so in one read, without the bool copy
    of every tensor that isfinite() makes (0.5-1 s per step for two 135M models on a CPU). A sum
    also overflows for weights near float32's limit, which have diverged as surely."""
    return bool(torch.isfinite(torch.stack([t.detach().sum(dtype=torch.float32) for t in tensors])).all())


def _mini_batches(config: PPOConfig, mask: torch.Tensor, step: int, epoch: int) -> list[list[tuple[torch.Tensor, float]]]:
    """An epoch's shuffled mini-batches of this process's rows, each as its micro-batches."""
    size = len(mask)
    generator = torch.Generator().manual_seed(generation.row_seed(config.train.seed, step, epoch) + distributed.rank())
    order, step_size = torch.randperm(size, generator=generator), size // config.ppo.mini_batches
    return [_micro_batches(order[start:start + step_size], mask, config.ppo.micro_batch_size) for start in range(0, size, step_size)]


def _micro_batches(rows: torch.Tensor, mask: torch.Tensor, size: int) -> list[tuple[torch.Tensor, float]]:
    """A mini-batch's rows in chunks of `size`, each with its loss weight: its response tokens x
    world size / the global mini-batch's tokens (one process's weights sum to 1 when it runs alone)."""
    chunks = rows.split(size)
    tokens = [mask[chunk].sum() for chunk in chunks]
    total = distributed.all_sum(sum(tokens))
    scale = distributed.world_size() / float(total.clamp(min=1))
    return [(chunk, float(count) * scale) for chunk, count in zip(chunks, tokens)]


def _accumulate_gradients(roles: Roles, batch: Batch, idx: torch.Tensor, weight: float, config: PPOConfig, scaler,
                          value_done: dict[str, float] | None = None) -> dict[str, float]:
    """Forward and backward one micro-batch with its losses scaled by `weight` (and the fp16 loss
    scale); returns its own (unweighted) losses and stats. The policy and value losses are
    back-propagated separately because, on a shared base, each needs its own adapter switched on.
    `value_done`: the stats of its value pass, when that already ran (see _score_batch)."""
    ppo, mask, inputs = config.ppo, batch.mask[idx], batch.inputs.rows(idx)
    with roles.acting() as policy, _compute(config, roles):
        if roles.value_on_policy:  # one pass, one backward: the value head reads the policy's hidden states
            logits, values = response_logits_and_values(policy, roles.value_head, *inputs)
        else:
            logits = response_logits(policy, *inputs)
        logprobs = losses.token_logprobs(logits, batch.response[idx], ppo.temperature)
        pg_loss, pg_stats = losses.policy_loss(logprobs, batch.old_logprobs[idx], batch.advantages[idx], mask, ppo.clip_range)
        named, loss = {"policy_loss": pg_loss, **pg_stats}, pg_loss
        if ppo.entropy_coef:
            named["entropy"] = losses.masked_mean(losses.entropy_from_logits(logits / ppo.temperature), mask)
            loss = loss - ppo.entropy_coef * named["entropy"]
        else:  # only logged: keep its (B, T, vocab) graph out of the backward pass
            with torch.no_grad():
                named["entropy"] = losses.masked_mean(losses.entropy_from_logits(logits.detach() / ppo.temperature), mask)
        if roles.value_on_policy:
            vf_loss, vf_stats = losses.value_loss(values, batch.values[idx], batch.returns[idx], mask, ppo.clip_range_value)
            named.update(value_loss=vf_loss, **vf_stats)
            loss = loss + ppo.vf_coef * vf_loss
        scaler.scale(weight * loss).backward()
    del logits, logprobs  # free before the value pass, which can then reuse the memory
    if value_done is None and not roles.value_on_policy:
        with roles.valuing() as value_body, _compute(config, roles):
            values = response_values(value_body, roles.value_head, *inputs)
            vf_loss, vf_stats = losses.value_loss(values, batch.values[idx], batch.returns[idx], mask, ppo.clip_range_value)
            scaler.scale(weight * ppo.vf_coef * vf_loss).backward()
        named.update(value_loss=vf_loss, **vf_stats)
    return {key: float(value.detach()) for key, value in named.items()} | (value_done or {})


# ---------------------------------------------------------------------------------------------
# Evaluation, samples, checkpoints


@torch.no_grad()
def _update_metrics(step: int, global_batch: int, all_scores, sequence_kl: float, batch: Batch, rollout: Rollout,
                    state: Optimisation) -> dict[str, float]:
    """What one update logs (README, PPO section), over the global batch."""
    shard_means = distributed.all_mean({
        "non_score_reward": batch.non_score_reward.sum(1).mean().item(), "kl_penalty": batch.token_kl.sum(1).mean().item(),
        "explained_variance": losses.explained_variance(batch.values, batch.returns, batch.mask).item(),
        "response_length": rollout.response_mask.sum(1).float().mean().item(),
        "eos_rate": rollout.finished.float().mean().item(),
    })
    return {
        "step": step + 1, "episodes": (step + 1) * global_batch,
        "score": all_scores.mean().item(), "score_std": all_scores.std().item(), "kl": sequence_kl, **shard_means,
        "learning_rate": state.scheduler.get_last_lr()[0], "kl_coef": state.kl_controller.value,
    }


def _diverged(out: Path, what: str) -> None:
    last = latest_checkpoint(out)
    kept = f"The last checkpoint is kept in {last}." if last else "No checkpoint had been saved yet."
    raise TrainingError(f"{what}; training stopped. {kept} Lower the learning rate or check the reward.")


@torch.no_grad()
def _evaluate(roles: Roles, tokenizer, prompts: Prompts, reward, config: PPOConfig, engine=None) -> dict[str, float]:
    """Mean reward, length and EOS rate of sampled responses on held-out prompts (each process
    samples every world_size-th prompt; the same seeds each time, so evals compare like with like)."""
    mine = list(range(distributed.rank(), len(prompts.ids), distributed.world_size()))
    scores, lengths, finished = [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0, dtype=torch.bool)]
    for start in range(0, len(mine), config.train.batch_size):
        chunk = mine[start:start + config.train.batch_size]
        seeds = [generation.row_seed(config.train.seed, -1, i) for i in chunk]
        with _compute(config, roles):
            rollout = _rollout(roles, tokenizer, [prompts.ids[i] for i in chunk], config.ppo, Path(config.output), seeds, engine)
        with _compute(config, roles):
            scores.append(reward([prompts.raw[i] for i in chunk], _decode(tokenizer, rollout)).float().cpu())
        lengths.append(rollout.response_mask.sum(1).float().cpu())
        finished.append(rollout.finished.cpu())
    summary = generation.sample_statistics(torch.cat(lengths), torch.cat(finished), torch.cat(scores), total=distributed.all_sum)
    return {f"eval_{key}": value for key, value in summary.items()}


def _baseline(run: Session, first: int) -> dict:
    """Held-out scores of the starting policy (logged as step 0), to compare the trained one with."""
    if not (run.held_out and run.config.ppo.eval_every):
        return {}
    if first == 0:
        _serve_policy(run, 0)
        start = _evaluate(run.roles, run.tokenizer, run.held_out, run.reward, run.config, run.engine)
        append_metrics(run.out, {"stage": "ppo", "step": 0, **start})
    else:
        start = next((r for r in read_records(run.out / METRICS) if r.get("step") == 0), {})
    return {f"{key}_start": value for key, value in start.items() if key.startswith("eval_")}


def _log_samples(out: Path, step: int, prompts: list, completions: list[str], scores: torch.Tensor, count: int = 3) -> None:
    if not distributed.is_main():
        return
    with (out / SAMPLES).open("a", encoding="utf-8") as handle:
        for prompt, completion, score in list(zip(prompts, completions, scores.tolist()))[:count]:
            handle.write(json.dumps({"step": step, "prompt": prompt, "completion": completion, "score": score}) + "\n")
