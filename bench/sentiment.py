"""Steering sentiment: the DPO paper's controlled-generation experiment, at small scale, on CPU.

The policy (SmolLM2-135M-Instruct) continues movie-review openings we wrote (bench/data/openings.py);
the gold reward is VADER's compound score of the continuation (-1..1), standing in for a human
rater. Whole films are held out: the test openings are about 4 of the 20 films, so no test prompt
and no test film is in any training file.

1. `align generate`: two samples per training opening (and per test opening, for the RM's held-out
   accuracy); the more positive one by VADER is `chosen` (near-ties skipped).
2. The arms, each starting from the same model, as one recipe run by `align run`:
   - DPO on the pairs, at a few betas (one pass), and the main beta with two passes;
   - RM on the pairs, then PPO against the RM, at a few KL coefficients;
   - GRPO with the RM;
   - RLAIF: the same pairs relabelled by the SmolLM2 judge (`align label`), then DPO;
   - and, as a diagnostic, PPO rewarded by VADER itself (what PPO reaches when the RM is not
     the limit).
3. `align eval` of every policy on the held-out openings: mean gold reward, KL to the starting
   model, response length; the RM's pairwise accuracy on held-out pairs.

    pip install -e .[bench]
    python bench/sentiment.py [--work runs/sentiment] [--out bench/results/sentiment.json]

Writes the table to stdout and --out, the reward-vs-KL plot beside --out, and align's HTML
report in the work dir. Rerunning skips finished stages (align run's own skip rule).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data.openings import FRAMES, SUBJECTS  # noqa: E402
from data.vader_reward import score  # noqa: E402

from align.checkpoints import read_manifest  # noqa: E402
from align.stages import STAGES  # noqa: E402

GOLD = f"{HERE / 'data' / 'vader_reward.py'}:positive"
INSTRUCTION = "Continue this movie review: {opening}"
QUESTION = "Which continuation of the movie review is more positive?"
MAX_NEW_TOKENS = 40
TEST_FILMS = 4

# The sweeps behind the reward-vs-KL plot; the first value of each is the arm in the main table.
DPO_BETAS = (0.1, 0.03, 0.5)
PPO_KL_COEFS = (0.05, 0.2)

COMMON = {
    "model": "smollm2-135m-instruct",
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
    "data": {"max_length": 160, "eval_fraction": 0.0},
    "train": {"batch_size": 8, "save_steps": 1000, "lr_scheduler": "cosine", "warmup_ratio": 0.1},
}
DPO_TRAIN = {"max_steps": 22, "learning_rate": 5.0e-4}  # one pass over ~180 pairs
EVAL_SAMPLING = {"num_samples": 1, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.7, "seed": 7}


def split_openings(seed: int = 0) -> tuple[list[str], list[str]]:
    """Training and test openings; the test films are never seen in training."""
    films = list(SUBJECTS)
    random.Random(seed).shuffle(films)
    test_films = set(films[:TEST_FILMS])
    train = [f.format(s=s) for s in SUBJECTS if s not in test_films for f in FRAMES]
    test = [f.format(s=s) for s in SUBJECTS if s in test_films for f in FRAMES]
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def align_run(recipe: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    command = [sys.executable, "-m", "align", "run", str(path), "--resume"]
    print("$ align run", path, "--resume", flush=True)
    subprocess.run(command, check=True, cwd=path.parent)  # the recipe's output_dir is relative to it


def sample_pairs(work: Path, min_gap: float, samples: int) -> dict:
    """`samples` samples per opening from the starting model (2 by default: one pair); every two of
    them make a pair, VADER picks chosen, near-ties are skipped."""
    train, test = split_openings()
    data = work / "data"
    write_jsonl(data / "train_prompts.jsonl", [{"prompt": INSTRUCTION.format(opening=o)} for o in train])
    write_jsonl(data / "test_prompts.jsonl", [{"prompt": INSTRUCTION.format(opening=o)} for o in test])
    sampling = {"num_samples": samples, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "batch_size": 16}
    align_run({
        "name": "sentiment-samples", "output_dir": str(work / "runs"), "model": COMMON["model"],
        "stages": [
            {"name": "samples-train", "stage": "generate", "prompts": "data/train_prompts.jsonl", "sampling": {**sampling, "seed": 1}},
            {"name": "samples-test", "stage": "generate", "prompts": "data/test_prompts.jsonl", "sampling": {**sampling, "seed": 2}},
        ],
    }, work / "samples.yaml")
    counts = {}
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (work / "runs" / f"samples-{split}.jsonl").read_text().splitlines()]
        by_prompt: dict[str, list[str]] = {}
        for row in rows:
            by_prompt.setdefault(row["prompt"], []).append(row["completion"])
        pairs = []
        for prompt, completions in by_prompt.items():
            for a, b in itertools.combinations(completions, 2):
                gap = score(a) - score(b)
                if abs(gap) >= min_gap and a.strip() and b.strip():
                    chosen, rejected = (a, b) if gap > 0 else (b, a)
                    pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        write_jsonl(data / f"{split}_pairs.jsonl", pairs)
        counts[split] = {"prompts": len(by_prompt), "pairs": len(pairs)}
    print(f"pairs: {counts} (near-ties under a VADER gap of {min_gap} skipped)", flush=True)
    return counts


def arms_recipe(work: Path, train_pairs: int) -> dict:
    """The arms; the RM sees its pairs at least once (2.5 passes over the ~180 pairs of two samples)."""
    rm_steps = max(55, math.ceil(train_pairs / 8))

    def evaluate(arm: str, source: str) -> dict:
        return {
            "name": f"eval-{arm}", "stage": "eval", "from": source, "reference": COMMON["model"],
            "prompts": "data/test_prompts.jsonl", "reward_fns": [GOLD], "sampling": EVAL_SAMPLING,
        }

    stages: list[dict] = [
        {"name": "rm", "data": "data/train_pairs.jsonl", "train": {"max_steps": rm_steps, "learning_rate": 5.0e-4}},
        {"name": "eval-rm", "stage": "eval", "from": "rm", "pairs": "data/test_pairs.jsonl"},
    ]
    for beta in DPO_BETAS:
        arm = f"dpo-b{beta}"
        stages += [
            {"name": arm, "stage": "dpo", "data": "data/train_pairs.jsonl", "dpo": {"beta": beta}, "train": DPO_TRAIN},
            evaluate(arm, arm),
        ]
    for kl in PPO_KL_COEFS:
        arm = f"ppo-kl{kl}"
        stages += [
            {
                "name": arm, "stage": "ppo", "reward_from": "rm", "prompts": "data/train_prompts.jsonl",
                "train": {"batch_size": 16, "learning_rate": 3.0e-4},
                "ppo": {"episodes": 128, "mini_batches": 2, "ppo_epochs": 2, "max_new_tokens": MAX_NEW_TOKENS,
                        "temperature": 1.0, "kl_coef": kl, "whiten_advantages": True},
            },
            evaluate(arm, arm),
        ]
    # The main DPO arm again with two passes over the pairs: how far more steps take it.
    stages += [
        {"name": "dpo-2pass", "stage": "dpo", "data": "data/train_pairs.jsonl", "dpo": {"beta": DPO_BETAS[0]},
         "train": {**DPO_TRAIN, "max_steps": 2 * DPO_TRAIN["max_steps"]}},
        evaluate("dpo-2pass", "dpo-2pass"),
    ]
    # The same PPO, rewarded by VADER itself: what PPO reaches when the reward model is not the limit.
    stages += [
        {
            "name": "ppo-gold", "stage": "ppo", "reward_fn": GOLD, "prompts": "data/train_prompts.jsonl",
            "train": {"batch_size": 16, "learning_rate": 3.0e-4},
            "ppo": {"episodes": 128, "mini_batches": 2, "ppo_epochs": 2, "max_new_tokens": MAX_NEW_TOKENS,
                    "temperature": 1.0, "kl_coef": PPO_KL_COEFS[0], "whiten_advantages": True},
        },
        evaluate("ppo-gold", "ppo-gold"),
    ]
    stages += [
        {
            "name": "grpo", "stage": "grpo", "reward_from": "rm", "prompts": "data/train_prompts.jsonl",
            "train": {"batch_size": 8, "max_steps": 16, "learning_rate": 3.0e-4},
            "online": {"num_generations": 4, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "beta": 0.04},
        },
        evaluate("grpo", "grpo"),
        {
            "name": "label", "stage": "label", "judge": COMMON["model"], "pairs": "data/train_pairs.jsonl",
            "question": QUESTION, "sampling": {"batch_size": 16},
        },
        {"name": "dpo-rlaif", "stage": "dpo", "data_from": "label", "dpo": {"beta": DPO_BETAS[0]}, "train": DPO_TRAIN},
        evaluate("dpo-rlaif", "dpo-rlaif"),
    ]
    return {"name": "sentiment", "output_dir": "runs", **COMMON, "stages": stages}


def manifest(runs: Path, stage: dict) -> dict:
    """A finished stage's manifest (align.json in its directory, or beside its one output file)."""
    kind = stage.get("stage", stage["name"])
    return read_manifest(STAGES[kind].output_path(runs, stage["name"]))


def collect(work: Path, recipe: dict) -> dict:
    runs = work / "runs"
    seconds = {s["name"]: manifest(runs, s)["duration_s"] for s in recipe["stages"]}
    arms = {}
    for stage in recipe["stages"]:
        name = stage["name"]
        if not name.startswith("eval-") or name == "eval-rm":
            continue
        arm = name.removeprefix("eval-")
        metrics = json.loads((runs / f"{name}.json").read_text())
        gold = f"reward/{GOLD}"
        uses_rm = arm.startswith(("ppo-kl", "grpo"))
        training = seconds[arm] + (seconds["rm"] if uses_rm else 0) + (seconds["label"] if arm == "dpo-rlaif" else 0)
        arms[arm] = {
            "gold_reward": metrics[f"{gold}/mean"],
            "gold_reward_start": metrics[f"{gold}/reference_mean"],
            "gold_gain": metrics[f"{gold}/mean"] - metrics[f"{gold}/reference_mean"],
            "win_rate": metrics.get(f"win_rate/{GOLD}"),
            "kl": metrics["kl"],
            "response_length": metrics["response_length"],
            "train_seconds": training,
        }
    for split in ("train", "test"):
        seconds[f"samples-{split}"] = manifest(runs, {"name": f"samples-{split}", "stage": "generate"})["duration_s"]
    rm = json.loads((runs / "eval-rm.json").read_text())["pairs"]
    label = manifest(runs, {"name": "label"})["metrics"]
    return {"arms": arms, "rm_heldout": rm, "label": label, "stage_seconds": seconds}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for family, marker in (("dpo-b", "o"), ("dpo-2pass", "v"), ("ppo-kl", "s"), ("ppo-gold", "P"), ("grpo", "^"), ("dpo-rlaif", "D")):
        points = sorted((a["kl"], a["gold_reward"], name) for name, a in results["arms"].items()
                        if name.startswith(family) and (family != "dpo-b" or "rlaif" not in name))
        if not points:
            continue
        label = {"dpo-b": "DPO (beta)", "dpo-2pass": "DPO, two passes", "ppo-kl": "RM + PPO (kl_coef)", "ppo-gold": "PPO on VADER itself",
                 "grpo": "RM + GRPO", "dpo-rlaif": "RLAIF labels + DPO"}[family]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
        for x, y, name in points:
            ax.annotate(name.split("-", 1)[-1], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    start = next(iter(results["arms"].values()))["gold_reward_start"]
    ax.axhline(start, color="grey", linestyle="--", label="starting model")
    ax.set_xlabel("KL(policy || starting model), nats per response")
    ax.set_ylabel("mean VADER score, held-out openings")
    ax.set_title("Steering sentiment: gold reward vs KL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/sentiment", help="work dir (data, recipes, stage outputs)")
    parser.add_argument("--out", default="bench/results/sentiment.json")
    parser.add_argument("--samples-per-prompt", type=int, default=2, help="every two samples of a prompt make a pair")
    parser.add_argument("--min-gap", type=float, default=0.2, help="skip pairs whose VADER scores differ by less")
    args = parser.parse_args()

    work, out = Path(args.work).resolve(), Path(args.out)
    started = time.time()
    counts = sample_pairs(work, args.min_gap, args.samples_per_prompt)
    recipe = arms_recipe(work, counts["train"]["pairs"])
    align_run(recipe, work / "arms.yaml")
    results = {"pairs": counts, **collect(work, recipe), "this_invocation_seconds": round(time.time() - started, 1)}
    results["stage_seconds_total"] = round(sum(results["stage_seconds"].values()), 1)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, out.with_suffix(".png"))

    print(f"\n{'arm':<12} {'gold before':>11} {'gold after':>10} {'gain':>6} {'KL':>6} {'length':>6} {'train s':>8}")
    for name, a in results["arms"].items():
        print(f"{name:<12} {a['gold_reward_start']:>11.3f} {a['gold_reward']:>10.3f} {a['gold_gain']:>+6.3f} "
              f"{a['kl']:>6.2f} {a['response_length']:>6.1f} {a['train_seconds']:>8.0f}")
    print(f"RM held-out pairwise accuracy: {results['rm_heldout']}")
    print(f"judge labels: {results['label']}")
    print(f"whole benchmark: {results['stage_seconds_total'] / 60:.1f} min of stages "
          f"({results['this_invocation_seconds'] / 60:.1f} min this invocation); table {out}, plot {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
