"""Did it work, and at what cost? Rewards, KL and win rate against the reference, pairwise accuracy.

- rewards: mean/std per reward source (reward models, python functions) over sampled completions
- KL(model || reference): mean over samples y ~ pi of sum_t k3(t), with k3 = (r - 1) - log r and
  r = pi_ref(y_t) / pi(y_t): an unbiased, non-negative estimate of the sequence-level KL from the
  distribution sampled (the model at the sampling temperature, cut to the --top-p nucleus) to the
  reference at that temperature; below --top-p 1 it includes the nucleus's own cost
- win rate: the model's completion scores higher than the reference's on the same prompt
  (ties, identical texts among them, count half), per reward source
- pairs: a reward model's accuracy (score(chosen) > score(rejected)), or a policy's DPO implicit
  reward accuracy (log-ratio to the reference higher for chosen than for rejected)
- --best-of N: the best-of-N policy on the model instead of the model: each sample is the first
  reward source's pick of N; its KL to the model is reported as the bound log N - (N-1)/N
  (kl_bound), since the pick has no log-probs of its own
Deterministic for a given --seed and batch size.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from align import distributed
from align.checkpoints import atomic_write_text, prepare_output_file, read_manifest, write_manifest
from align.config import EvalConfig, ModelSpec
from align.data import (PREFERENCE_FORMATS, STEPWISE_FORMATS, as_messages, is_messages, last_text, load_split, prompts_to_sample,
                        use_chat_template)
from align.engines import sampler_for
from align.errors import ConfigError
from align.distributed import share_out
from align.generation import completion_logprobs, my_share, prompt_ids, sample, sample_statistics
from align.judge import JudgeReward
from align.losses import kl_penalty
from align.models import context_length, load_model, load_tokenizer, resolve_model
from align.rewards import ProcessRewardModel, RewardFunction, reward_model, step_metrics, warn_unused_aggregate

log = logging.getLogger("align")


def run(config: EvalConfig) -> Path:
    out, started = Path(config.output), time.time()
    source = resolve_model(config.model)
    is_reward_model = any(a.endswith(("ForSequenceClassification", "ForTokenClassification"))
                          for a in AutoConfig.from_pretrained(source).architectures or [])
    reference = None if (config.no_reference or is_reward_model) else _reference(config)
    rewards = [reward_model(spec, config.reward_aggregate) for spec in config.reward_models] + [RewardFunction(fn) for fn in config.reward_fns]
    if config.reward_judge:
        rewards.append(JudgeReward(config.reward_judge, config))
    if not is_reward_model:  # a reward model under evaluation reads the aggregate itself (_reward_model_accuracy)
        warn_unused_aggregate(config, rewards)
    prepare_output_file(out, overwrite=config.overwrite)
    results: dict = {"model": config.model.path, "reference": reference}
    if is_reward_model:
        results["pairs"] = _reward_model_accuracy(config, source)
    else:
        tokenizer = load_tokenizer(config.model, source, padding_side="left")
        model = load_model(config.model, source).eval()
        ref_model = load_model(ModelSpec(path=reference), resolve_model(ModelSpec(path=reference))).eval() if reference else None
        if config.prompts:
            results.update(_sampled(config, (source, model), (reference, ref_model), tokenizer, rewards))
        if config.pairs and ref_model is not None:
            results["pairs"] = _implicit_reward_accuracy(config, model, ref_model, tokenizer)
    if distributed.is_main():
        atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    flat = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    flat |= {f"pairs/{k}": v for k, v in results.get("pairs", {}).items()}  # the summary names pairwise accuracy too
    write_manifest(out, config=config, metrics=flat, started=started)
    log.info("eval: %s", ", ".join(f"{k}={v:.4g}" for k, v in flat.items()))
    return out


def _reference(config: EvalConfig) -> str:
    """What the model is compared with: --reference, else for --best-of N the model itself (sampled
    without the pick: what best-of-N adds, against the same model its KL bound is to), else the
    model its manifest says it started from."""
    if config.reference:
        return config.reference
    if config.best_of:
        return config.model.path
    manifest = read_manifest(Path(config.model.path))
    if not manifest:
        raise ConfigError(
            f"{config.model.path}: has no align manifest naming the model it started from; pass --reference MODEL "
            "(or --no-reference to skip KL and win rate)"
        )
    return manifest["base_model"]


def _sampled(config: EvalConfig, policy: tuple, reference: tuple, tokenizer, rewards) -> dict:
    """Sample the model (and the reference) and score them. `policy` and `reference` are (source,
    loaded model): the loaded model computes log-probs, and samples too unless generation.engine
    says vllm, which samples each in turn."""
    (source, model), (reference_path, ref_model) = policy, reference
    _, prompts, chat = prompts_to_sample(config.prompts, tokenizer, config.sampling.seed, context_length(config.model, source),
                                         config.sampling.max_new_tokens)
    with sampler_for(config.model, source, config.generation, config.sampling.seed, model) as sampler:
        samples = _sample_with_progress(sampler, tokenizer, prompts, config, chat, "eval: model", config.best_of or 1)
    if config.best_of:
        samples = _picks(prompts, samples, rewards[0], config.best_of)
    flat = [(p, c) for p, cs in zip(prompts, samples) for c in cs]
    lengths = torch.tensor([len(c.token_ids) for _, c in flat], dtype=torch.float32)
    finished = torch.tensor([c.finished for _, c in flat])
    # Scoring and log-probs below are shared out between the processes of a multi-process run (share_out).
    scores = {r.name: share_out(flat, lambda part, r=r: r([p for p, _ in part], [c.text for _, c in part])) for r in rewards}
    results = {"samples": len(flat), **sample_statistics(lengths, finished)}  # the summary PPO's held-out eval logs too
    for name, values in scores.items():
        results[f"reward/{name}/mean"] = sample_statistics(lengths, finished, values)["score"]
        results[f"reward/{name}/std"] = values.std().item() if len(values) > 1 else 0.0
    table_ref: list = [None] * len(flat)
    if config.best_of:
        from align.stages.best_of_n import kl_bound

        results["kl_bound"] = kl_bound(config.best_of)
        results["best_of"] = config.best_of
    if ref_model is not None and not config.best_of:
        def kl(part: list) -> torch.Tensor:
            prompt_tokens = [prompt_ids(tokenizer, p, chat) for p, _ in part]
            tokens, temperature = [c.token_ids for _, c in part], config.sampling.temperature or 1.0
            # The policy as it was sampled (temperature and nucleus), against the reference at that temperature.
            policy_lp, mask = completion_logprobs(model, prompt_tokens, tokens, tokenizer.pad_token_id, temperature,
                                                  top_p=config.sampling.top_p if config.sampling.temperature else 1.0)
            ref_lp, _ = completion_logprobs(ref_model, prompt_tokens, tokens, tokenizer.pad_token_id, temperature)
            return (kl_penalty(policy_lp, ref_lp, "k3") * mask).sum(1)

        results["kl"] = share_out(flat, kl).mean().item()
    if ref_model is not None:
        ref_spec = ModelSpec(path=reference_path)
        with sampler_for(ref_spec, resolve_model(ref_spec), config.generation, config.sampling.seed, ref_model) as sampler:
            ref_samples = _sample_with_progress(sampler, tokenizer, prompts, config, chat, "eval: reference")
        ref_flat = [c for cs in ref_samples for c in cs]
        table_ref = [c.text for c in ref_flat]
        both = [(p, c.text, ref) for (p, c), ref in zip(flat, table_ref)]
        for reward in rewards:
            ref_scores = share_out(both, lambda part, r=reward: r([p for p, _, _ in part], [ref for _, _, ref in part]))
            if isinstance(reward, JudgeReward):  # a judge compares the two directly, in both orders
                preferred = share_out(both, lambda part, r=reward: r.prefer(*map(list, zip(*part))))
                wins = (preferred > 0.5).float() + 0.5 * (preferred == 0.5).float()
            else:
                wins = (scores[reward.name] > ref_scores).float() + 0.5 * (scores[reward.name] == ref_scores).float()
            # The same text is a tie, whatever float noise its two scorings (in different batches) carry.
            wins[torch.tensor([text == ref for _, text, ref in both], device=wins.device)] = 0.5
            results[f"win_rate/{reward.name}"] = wins.mean().item()
            results[f"reward/{reward.name}/reference_mean"] = ref_scores.mean().item()
    results["table"] = [
        {"prompt": last_text(p), "completion": c.text, "reference": ref,
         **{name: round(values[i].item(), 4) for name, values in scores.items()}}
        for i, ((p, c), ref) in enumerate(zip(flat, table_ref)) if i < config.sample_table
    ]
    return results


def _sample_with_progress(model, tokenizer, prompts: list, config: EvalConfig, chat: bool, what: str, each: int = 1):
    """config.sampling.num_samples samples per prompt, `each` times over (the candidates of best-of-N)."""
    sampling = config.sampling.model_copy(update={"num_samples": config.sampling.num_samples * each})
    total = my_share(len(prompts) * sampling.num_samples, sampling.batch_size)  # the bar counts this process's share
    with tqdm(total=total, desc=what, unit="sample", disable=not log.isEnabledFor(logging.INFO)) as bar:
        return sample(model, tokenizer, prompts, sampling, chat, progress=bar.update, shared=distributed.launched())


def _picks(prompts: list, samples: list[list], chooser, n: int) -> list[list]:
    """Per prompt, every consecutive n samples reduced to the one `chooser` scores highest."""
    flat = [(p, c) for p, cs in zip(prompts, samples) for c in cs]
    scores = share_out(flat, lambda part: chooser([p for p, _ in part], [c.text for _, c in part])).tolist()
    picked, at = [], 0
    for completions in samples:
        groups = [range(at + g, at + g + n) for g in range(0, len(completions), n)]
        picked.append([flat[max(group, key=lambda i: scores[i])][1] for group in groups])
        at += len(completions)
    return picked


def _pairs(config: EvalConfig) -> list[dict]:
    _, rows, _ = load_split(config.pairs, PREFERENCE_FORMATS, 0)
    return rows


def _reward_model_accuracy(config: EvalConfig, source: str) -> dict:
    """A reward model's pairwise accuracy on preference pairs (a process reward model's by its
    aggregate of each side's steps), or a process reward model's step metrics on stepwise rows."""
    if not config.pairs:
        raise ConfigError(f"{config.model.path}: is a reward model; evaluate it with --pairs FILE")
    reward = reward_model(config.model, config.reward_aggregate)
    process = isinstance(reward, ProcessRewardModel)
    kind, rows, _ = load_split(config.pairs, {**PREFERENCE_FORMATS, **(STEPWISE_FORMATS if process else {})}, 0)
    if kind == "stepwise":
        scores = share_out(rows, lambda part: [s.cpu() for s in reward.step_scores(
            [r["prompt"] for r in part], [reward.separator.join(r["completions"]) for r in part])])
        return step_metrics(scores, [r["labels"] for r in rows])
    scores = score_once(reward, [(r["prompt"], last_text(r[side])) for side in ("chosen", "rejected") for r in rows])
    chosen, rejected = scores[:len(rows)], scores[len(rows):]
    return {"accuracy": (chosen > rejected).float().mean().item(), "margin": (chosen - rejected).mean().item(), "count": len(rows)}


def score_once(reward, items: list[tuple]) -> torch.Tensor:
    """reward's scores of (prompt, response) items, each distinct item scored once: pairs built from
    K ranked completions of a prompt (all K-choose-2 of them) repeat each completion K-1 times, so
    this reads K texts a prompt instead of K(K-1). Shape: (len(items),)."""
    first: dict[tuple[str, str], int] = {}
    unique, index = [], []
    for prompt, response in items:
        key = (json.dumps(prompt, sort_keys=True), response)
        if key not in first:
            first[key] = len(unique)
            unique.append((prompt, response))
        index.append(first[key])
    scores = share_out(unique, lambda part: reward([p for p, _ in part], [r for _, r in part]))
    return scores[torch.as_tensor(index, device=scores.device)]


def _implicit_reward_accuracy(config: EvalConfig, model, ref_model, tokenizer) -> dict:
    rows = _pairs(config)
    chat = use_chat_template(tokenizer, config.pairs, is_messages(rows[0]["chosen"]), config.pairs.path)

    def margins(part: list[dict]) -> torch.Tensor:
        prompts = [prompt_ids(tokenizer, r["prompt"], chat) for r in part]

        def ratio(side: str) -> torch.Tensor:
            tokens = [_completion_ids(tokenizer, r["prompt"], r[side], chat) for r in part]
            pad = tokenizer.pad_token_id
            policy, reference = (completion_logprobs(m, prompts, tokens, pad)[0].sum(1) for m in (model, ref_model))
            return policy - reference

        return ratio("chosen") - ratio("rejected")

    margin = share_out(rows, margins)
    return {"implicit_reward_accuracy": (margin > 0).float().mean().item(), "implicit_margin": margin.mean().item(), "count": len(rows)}


def _completion_ids(tokenizer, prompt, response, chat: bool) -> list[int]:
    """The tokens of `response` as they follow the rendered prompt (with its end-of-turn token)."""
    head = prompt_ids(tokenizer, prompt, chat)
    if chat:
        full = tokenizer.apply_chat_template(as_messages(prompt, "user") + as_messages(response, "assistant"),
                                             tokenize=True, return_dict=False)
    else:
        full = head + tokenizer(last_text(response), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return list(full[len(head):])
