"""How often does an AI judge's preference agree with a gold scorer, with and without swap-averaging
and chain-of-thought? (issue: RLAIF labels without position bias)

The policy (SmolLM2-135M-Instruct) continues movie-review openings twice; the gold label is the
continuation with the higher VADER compound score (the `vaderSentiment` lexicon: "which
continuation is more positive"); near-ties are skipped. The judge answers "Which continuation is
more positive?" through align's judge (the same code `align label` runs), in each order.

    pip install vaderSentiment
    python bench/judge_agreement.py --pairs 48 [--judge smollm2-135m-instruct] [--out bench/results/judge_agreement.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

QUESTION = "Which continuation of the movie review is more positive?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=48, help="pairs to sample (before skipping near-ties)")
    parser.add_argument("--policy", default="smollm2-135m-instruct")
    parser.add_argument("--judge", default="smollm2-135m-instruct")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--min-gap", type=float, default=0.1, help="skip pairs whose VADER scores differ by less")
    parser.add_argument("--out", default="bench/results/judge_agreement.json")
    args = parser.parse_args()

    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from align.config import JudgeSpec, ModelSpec, SamplingSpec
    from align.generation import sample
    from align.judge import LocalJudge
    from align.models import load_model, load_tokenizer, resolve_model
    from data.openings import openings

    started = time.time()
    prompts = random.Random(1).sample(openings(), args.pairs)
    spec = ModelSpec(path=args.policy)
    source = resolve_model(spec)
    tokenizer, model = load_tokenizer(spec, source, padding_side="left"), load_model(spec, source)
    instruction = [f"Continue this movie review: {p}" for p in prompts]
    sampling = SamplingSpec(num_samples=2, max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=16, seed=3)
    samples = sample(model, tokenizer, instruction, sampling, chat=True)
    vader = SentimentIntensityAnalyzer()
    rows = []
    for prompt, (a, b) in zip(instruction, samples):
        gap = vader.polarity_scores(a.text)["compound"] - vader.polarity_scores(b.text)["compound"]
        if abs(gap) >= args.min_gap and a.text.strip() and b.text.strip():
            rows.append((prompt, a.text, b.text, gap > 0))
    print(f"{len(rows)} pairs with a VADER gap >= {args.min_gap} (of {args.pairs})")
    prompts_, first, second = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    gold = [r[3] for r in rows]
    questions = [QUESTION] * len(rows)

    results = {"pairs": len(rows), "judge": args.judge, "policy": args.policy}
    for cot in (False, True):
        judge = LocalJudge(JudgeSpec(model=args.judge, chain_of_thought=cot, reasoning_tokens=64))
        timer = time.time()
        a_first = judge.prefer_first(prompts_, first, second, questions)
        b_first = judge.prefer_first(prompts_, second, first, questions)
        averaged = (a_first + 1 - b_first) / 2
        name = "cot" if cot else "direct"
        agree = lambda probs: sum((float(p) > 0.5) == g for p, g in zip(probs, gold)) / len(rows)
        results[name] = {
            "agreement_one_order": agree(a_first),
            "agreement_other_order": agree(1 - b_first),
            "agreement_swap_averaged": agree(averaged),
            "position_consistency": float(((a_first > 0.5) == (b_first < 0.5)).float().mean()),
            "first_position_rate": float(((a_first > 0.5).float().mean() + (b_first > 0.5).float().mean()) / 2),
            "seconds": round(time.time() - timer, 1),
        }
        print(name, json.dumps(results[name]))
    results["seconds"] = round(time.time() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
