"""Best-of-n (rejection sampling): n samples per prompt, each scored, the best kept.

The data of Llama 2's rejection-sampling rounds, WebGPT's best-of-n, RAFT and ReST-EM. Writes in
the output directory:
  best.jsonl     the best sample per prompt (the best --keep), best first:
                 prompt, completion, score, finished                              -> align sft
  pairs.jsonl    best vs worst per prompt: prompt, chosen, rejected, margin,
                 chosen_finished, rejected_finished                               -> align rm / dpo
  samples.jsonl  every sample with its score
`finished` is false for a sample cut at --max-new-tokens: `align sft` trains it without an end of
turn, and `align dpo` a pair's side whose `chosen_finished`/`rejected_finished` is false, so a
round of rejection sampling does not teach the model to stop mid-sentence.
The worst is the worst-scored sample whose text differs from the best's (one text scored twice
differs only by float noise). A prompt whose best and worst samples score within --min-gap of
each other (all alike, by default), or whose samples are all one text, says nothing about which
answer is better: it gets no pair, and no best either unless
--min-score is given, which keeps every best that scores at least that, alike or not (ReST-EM's
filter: with a 0/1 reward, --min-score 1 keeps the prompts the model always solves and drops
those it never does). Empty samples are scored but never chosen.

With --vote, a function names each sample's final answer and the samples vote: each answer's
weight is the sum of its samples' scores, and the best are the best-scored samples of the
heaviest answer (weighted majority vote: Uesato et al. 2022; Math-Shepherd's self-consistency
with a PRM), which on bench/arith.py beats the PRM's own pick from N = 4 on and majority vote
at every N from 2 to 16 (in the previous run a tie at 16). The pair is still that best sample against the worst of all. A
prompt none of whose samples gives an answer is skipped and counted.

The best-of-n policy is KL-cheap: its KL to the model it samples from is at most
log n - (n - 1) / n (Beirami et al. 2024), written to the manifest as kl_bound.

Prompts are sampled and scored in chunks, each seeded by its first prompt, and written as they
finish with progress after every chunk, so a run that dies (a kill, an unreachable judge) keeps
what it scored and `--resume` continues from there with the same samples.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align.checkpoints import prepare_output, write_manifest
from align.chunked import PartialRows
from align.config import BestOfNConfig
from align.data import is_messages, prompts_to_sample
from align.errors import ConfigError, TrainingError
from align.generation import Completion, row_seed, sample
from align.engines import open_sampler
from align.models import context_length, load_tokenizer, resolve_model
from align.rewards import RewardModel, load_reward, warn_unused_aggregate
from align.stages.label_steps import Checker

log = logging.getLogger("align")
FILES = ("best", "pairs", "samples")


def run(config: BestOfNConfig) -> Path:
    out, started, n = Path(config.output), time.time(), config.sampling.num_samples
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(config.model, source, padding_side="left")
    rows, prompts, chat = prompts_to_sample(config.prompts, tokenizer, config.sampling.seed, context_length(config.model, source),
                                            config.sampling.max_new_tokens)
    voter = Checker(config.vote, "vote function") if config.vote else None
    reward = load_reward(config, config.score_batch_size, config.reward_in_4bit, conversational=is_messages(prompts[0]))
    warn_unused_aggregate(config, [reward])
    if voter and isinstance(reward, RewardModel):  # an outcome model (a PRM is its own class, scoring in [0, 1])
        raise ConfigError(f"--vote weighs each sample by its score, and the reward model {config.reward_model.path} scores "
                          "in logits (any sign): vote with a PRM, a judge or a reward function whose scores are not negative")
    prepare_output(out, resume=config.resume, overwrite=config.overwrite)
    with open_sampler(config.model, source, config.generation, config.sampling.seed) as model:
        outputs = PartialRows({k: out / f"{k}.jsonl" for k in FILES}, out / "progress.json", resume=config.resume)
        if outputs.done:
            log.info("best-of-n: resuming after prompt %d of %d", outputs.done, len(prompts))

        def best_of(start: int, end: int):
            sampling = config.sampling.model_copy(update={"seed": row_seed(config.sampling.seed, 0, start)})
            samples = sample(model, tokenizer, prompts[start:end], sampling, chat)
            answers = voter and final_answers(voter, rows[start:end], samples, first_row=start)
            return choose(prompts[start:end], samples, reward, config.min_gap, config.keep, first_row=start,
                          answers=answers, min_score=config.min_score)

        chunk = max(1, config.sampling.batch_size // n)  # prompts whose n samples fill one generation batch
        with tqdm(total=len(prompts), initial=outputs.done, desc="best-of-n", unit="prompt",
                  disable=not log.isEnabledFor(logging.INFO)) as bar:
            for start, end in outputs.fill(len(prompts), chunk, best_of):
                bar.update(end - start)
                kept = outputs.counts.get("kept", 0)
                bar.set_postfix(best=f"{outputs.counts.get('best_sum', 0.0) / max(1, kept):.3g}", refresh=False)
        outputs.finish()

    counts = outputs.counts
    kept, pairs = int(counts.get("kept", 0)), int(counts.get("pairs", 0))
    metrics = {
        "prompts": len(prompts), "samples": len(prompts) * n, "kept": kept, "best_rows": int(counts.get("best_rows", 0)),
        "pairs": pairs, "skipped_min_gap": int(counts.get("skipped", 0)), "empty_samples": int(counts.get("empty", 0)),
        **({"skipped_below_min_score": int(counts.get("below_min_score", 0))} if config.min_score is not None else {}),
        **({"skipped_no_answer": int(counts.get("no_answer", 0)),
            "mean_vote_share": counts.get("vote_share_sum", 0.0) / max(1, kept)} if voter else {}),
        "mean_sample_score": counts.get("score_sum", 0.0) / max(1, counts.get("scored", 0)),
        "mean_best_score": counts.get("best_sum", 0.0) / max(1, kept),
        "mean_margin": counts.get("margin_sum", 0.0) / max(1, pairs),
        "kl_bound": kl_bound(n),
    }
    write_manifest(out, config=config, metrics=metrics, started=started, reward=reward.name)
    log.info("best-of-%d: kept %d of %d prompts, mean score %.3f -> best %.3f (KL to the model <= %.3f)", n, kept,
             len(prompts), metrics["mean_sample_score"], metrics["mean_best_score"], metrics["kl_bound"])
    return out


def kl_bound(n: int) -> float:
    """KL(best-of-n policy || the policy it samples from) <= log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def final_answers(voter: Checker, rows: list[dict], samples: list[list[Completion]], first_row: int) -> list[list]:
    """Each sample's final answer by the user's vote function, one call per chunk, grouped by prompt."""
    flat = [(rows[i], c.text, first_row + i + 1) for i, completions in enumerate(samples) for c in completions]
    found = iter(voter.final_answers(*map(list, zip(*flat)))) if flat else iter(())
    return [[next(found) for _ in completions] for completions in samples]


def choose(prompts: list, samples: list[list[Completion]], reward, min_gap: float, keep: int = 1, first_row: int = 0,
           answers: list[list] | None = None, min_score: float | None = None):
    """Score every sample; per prompt the best-worst pair when those two differ by more than min_gap, and the best `keep`:
    those of the pair, or with min_score those scoring at least that, whether or not the samples differ. With `answers`
    (each sample's final answer, None for none) the best are drawn from the answer whose samples' scores sum highest
    (ties: the answer sampled first)."""
    flat = [(i, k, c) for i, completions in enumerate(samples) for k, c in enumerate(completions)]
    scores = reward([prompts[i] for i, _, _ in flat], [c.text for _, _, c in flat]).float().cpu()
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        i, k, c = flat[bad[0]]
        raise TrainingError(f"the reward returned {scores[bad[0]].item()} for sample {k} of prompt row {first_row + i + 1}: "
                            f"{c.text[:60]!r}")
    if answers is not None and (scores < 0).any():
        first = int((scores < 0).nonzero()[0])
        i, k, c = flat[first]
        raise ConfigError(f"--vote weighs samples by their scores, and the reward gave {scores[first].item():.4g} to sample "
                          f"{k} of prompt row {first_row + i + 1} ({c.text[:60]!r}): votes need scores that are not negative")
    rows: dict[str, list[dict]] = {key: [] for key in FILES}
    counts: Counter = Counter()
    by_prompt = scores.split([len(c) for c in samples])
    for i, (completions, values) in enumerate(zip(samples, by_prompt)):
        prompt = prompts[i]
        rows["samples"] += [{"prompt": prompt, "completion": c.text, "score": float(v), "finished": c.finished, "sample": k,
                             "prompt_row": first_row + i + 1, **({"answer": answers[i][k]} if answers is not None else {})}
                            for k, (c, v) in enumerate(zip(completions, values.tolist()))]
        counts["scored"] += len(values)
        counts["score_sum"] += float(values.sum())
        candidates = [k for k, c in enumerate(completions) if c.text.strip()]
        counts["empty"] += len(completions) - len(candidates)
        if not candidates:
            counts["skipped"] += 1
            continue
        eligible, share = candidates, 0.0
        if answers is not None:
            weights: dict = {}
            for k in candidates:
                if answers[i][k] is not None:
                    weights[answers[i][k]] = weights.get(answers[i][k], 0.0) + float(values[k])
            if not weights:
                counts["no_answer"] += 1
                continue
            top = max(weights, key=weights.__getitem__)  # the first-sampled of tied answers
            eligible = [k for k in candidates if answers[i][k] == top]
            share = weights[top] / max(sum(weights.values()), 1e-12)
        picks = sorted(eligible, key=lambda k: -values[k])[:keep]  # stable: equal scores keep sampling order
        best = picks[0]
        # The worst of the samples whose text differs from the best's: the same text scored twice differs only by float
        # noise (a reward model's batches of other shapes), and a pair of one text teaches nothing.
        others = [k for k in candidates if completions[k].text.strip() != completions[best].text.strip()]
        worst = min(others, key=lambda k: values[k]) if others else best  # min: the first of tied worst, as before
        margin = float(values[best] - values[worst])
        if margin <= min_gap:
            counts["skipped"] += 1  # no pair: the samples say nothing about which answer is better
        else:
            rows["pairs"].append({"prompt": prompt, "chosen": completions[best].text, "rejected": completions[worst].text,
                                  "margin": margin, "chosen_finished": completions[best].finished,
                                  "rejected_finished": completions[worst].finished})
            counts["pairs"] += 1
            counts["margin_sum"] += margin
        # best.jsonl: with min_score, every pick that scores at least that (alike or not); without, the picks of a pair
        if min_score is not None:
            picks = [k for k in picks if values[k] >= min_score]
            counts["below_min_score"] += not picks
        elif margin <= min_gap:
            picks = []
        if not picks:
            continue
        rows["best"] += [{"prompt": prompt, "completion": completions[k].text, "score": float(values[k]),
                          "finished": completions[k].finished} for k in picks]
        counts["best_rows"] += len(picks)
        counts["kept"] += 1
        counts["vote_share_sum"] += share
        counts["best_sum"] += float(values[picks[0]])
    return rows, counts
