"""Steering sentiment: the DPO paper's Figure 2 (gold reward against KL to the start), on CPU.

The policy (SmolLM2-135M-Instruct) continues movie-review openings we wrote (bench/data/openings.py);
the gold reward is VADER's compound score of the continuation (-1..1), standing in for a human
rater. Whole films are held out: the test openings are about 4 of the 20 films, so no test prompt
and no test film is in any training file. Every policy is sampled at temperature 1, so the KL on
the plot is the policy's own KL to the starting model.

1. Data (`align best-of-n` scored by VADER): 4 samples per training opening, and 16 more for the
   reward model, which trains on all 20 as ranked rows: every pair of an opening compared in one
   step, `margin` = their VADER gap, near-ties dropped (InstructGPT's K-choose-2; with 4 samples,
   the issue's 6 pairs per opening, held-out accuracy was 0.76, with 20 it is 0.85:
   bench/rm_samples.py). The best-vs-worst pair of the first 4 is the DPO data. 4 samples per test
   opening give the RM's held-out pairs; the best-of-n arm's 16 per test opening a larger check.
2. The arms, each from the same starting model, as one recipe run by `align run`:
   - best-of-n at n = 1..16 on the test openings, picked by the RM and by VADER (one
     `align best-of-n` of 16 samples; each n is the average over disjoint groups of n; KL is
     the bound log n - (n-1)/n);
   - rejection-sampling fine-tuning (ReST-EM): best-of-16 by the RM on the training openings ->
     SFT from the start (1 and 2 epochs), then again sampling from round 1's 2-epoch policy;
   - DPO at three betas; RM -> PPO at three KL coefficients; RM -> GRPO; PPO on VADER itself
     (what PPO reaches when the RM is not the limit).
3. `align eval` of every policy on the held-out openings: VADER and RM means, KL to the start,
   win rate against the start's samples, response length.

    pip install -e .[bench]
    python bench/sentiment.py            # the full frontier (bench/results/sentiment.json + .png)
    python bench/sentiment.py --quick    # fewer points, same code (bench/results/sentiment-quick.json)

Rerunning skips finished stages (align run's own skip rule), so a run that was stopped continues.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data.openings import FRAMES, SUBJECTS  # noqa: E402
from data.vader_reward import score  # noqa: E402

from align.checkpoints import is_complete, read_manifest  # noqa: E402
from align.stages import STAGES  # noqa: E402

GOLD = f"{HERE / 'data' / 'vader_reward.py'}:positive"
INSTRUCTION = "Continue this movie review: {opening}"
MAX_NEW_TOKENS = 32
TEST_FILMS = 4
MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Plan:
    """What one run of the benchmark trains and evaluates; the first value of each sweep is the main arm."""

    name: str
    train_openings: int | None = None  # None: all 240
    pair_samples: int = 4  # samples per opening: the DPO pairs (best vs worst), the held-out RM pairs
    rm_samples: int = 20  # samples per training opening behind the RM (pair_samples of them shared)
    min_gap: float = 0.1  # VADER gap under which a pair is a near-tie
    best_of: tuple[int, ...] = (1, 2, 4, 8, 16)
    rs_rounds: int = 2
    rs_samples: int = 16
    rs_epochs: tuple[float, ...] = (2.0, 1.0)  # round 1 at each (the first is the one round 2 samples from); later rounds at the first
    dpo_betas: tuple[float, ...] = (0.1, 0.3, 1.0)
    dpo_epochs: float = 2.0
    ppo_kl_coefs: tuple[float, ...] = (0.05, 0.1, 0.3)
    ppo_episodes: int = 1024
    ppo_gold: bool = True
    grpo_steps: int = 64  # GRPO optimizer steps of 8 completions (2 prompts x 4)
    eval_samples: int = 2  # per test opening
    rm_check: bool = True  # the RM's accuracy on the main PPO arm's own samples

    @property
    def gold_train_stages(self) -> list[str]:
        """The data stages whose samples of the training openings the RM trains on."""
        return ["gold-train"] + (["gold-train-more"] if self.rm_samples > self.pair_samples else [])


FULL = Plan("sentiment")
# Measured at train_openings=96, ppo_episodes=256 with the RM check: 37.0 minutes; these cuts aim under 30.
QUICK = replace(FULL, name="sentiment-quick", train_openings=64, rm_samples=4, best_of=(1, 2, 4), rs_rounds=1, rs_samples=4,
                rs_epochs=(3.0,), dpo_betas=(0.1,),
                ppo_kl_coefs=(0.05,), ppo_episodes=192, ppo_gold=False, grpo_steps=0, eval_samples=1, rm_check=False)

COMMON = {
    "model": MODEL,
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
    "data": {"max_length": 128, "eval_fraction": 0.0},
    "train": {"batch_size": 8, "save_steps": 1000, "lr_scheduler": "cosine", "warmup_ratio": 0.05},
}
SAMPLING = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "batch_size": 64}  # 1.6x batch 16's tokens/s here
DATA_SAMPLING = {**SAMPLING, "batch_size": 16}


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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def align_run(recipe: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    print("$ align run", path, "--resume", flush=True)
    subprocess.run([sys.executable, "-m", "align", "run", str(path), "--resume"], check=True, cwd=path.parent)


def prepare_data(work: Path, plan: Plan) -> dict:
    """Prompt files, then `pair_samples` samples per opening scored by VADER (align best-of-n), and on the
    training openings more up to `rm_samples`; from them every pair of an opening for the RM, near-ties
    dropped, and from the first `pair_samples` the best-vs-worst pair for DPO."""
    train, test = split_openings()
    if plan.train_openings:
        train = random.Random(1).sample(train, plan.train_openings)
    data = work / "data"
    write_jsonl(data / "train_prompts.jsonl", [{"prompt": INSTRUCTION.format(opening=o)} for o in train])
    write_jsonl(data / "test_prompts.jsonl", [{"prompt": INSTRUCTION.format(opening=o)} for o in test])
    sampling = {**DATA_SAMPLING, "num_samples": plan.pair_samples}
    stages = [{"name": f"gold-{split}", "stage": "best-of-n", "reward_fn": GOLD, "prompts": f"data/{split}_prompts.jsonl",
               "min_gap": plan.min_gap, "sampling": {**sampling, "seed": seed}} for split, seed in (("train", 1), ("test", 2))]
    if "gold-train-more" in plan.gold_train_stages:
        stages.append({"name": "gold-train-more", "stage": "best-of-n", "reward_fn": GOLD, "prompts": "data/train_prompts.jsonl",
                       "sampling": {**SAMPLING, "num_samples": plan.rm_samples - plan.pair_samples, "seed": 11}})
    align_run({"name": f"{plan.name}-data", "output_dir": "runs", "model": MODEL, "stages": stages}, work / "data.yaml")
    for split in ("train", "test"):
        by_prompt: dict[str, list[dict]] = {}
        for stage in plan.gold_train_stages if split == "train" else ["gold-test"]:
            for row in read_jsonl(work / "runs" / stage / "samples.jsonl"):
                by_prompt.setdefault(row["prompt"], []).append(row)
        write_jsonl(data / f"rm_{split}_ranked.jsonl", [
            {"prompt": prompt, "completions": [s["completion"] for s in samples], "scores": [s["score"] for s in samples]}
            for prompt, samples in by_prompt.items()
        ])
        pairs = []
        for prompt, samples in by_prompt.items():
            for a, b in itertools.combinations(samples, 2):
                if abs(a["score"] - b["score"]) > plan.min_gap and a["completion"].strip() and b["completion"].strip():
                    chosen, rejected = (a, b) if a["score"] > b["score"] else (b, a)
                    pairs.append({"prompt": prompt, "chosen": chosen["completion"], "rejected": rejected["completion"],
                                  "margin": round(chosen["score"] - rejected["score"], 4)})
        write_jsonl(data / f"rm_{split}_pairs.jsonl", pairs)
    counts = data_counts(work)
    print(f"pairs: {counts} (VADER gaps of {plan.min_gap} or less dropped)", flush=True)
    return counts


def data_counts(work: Path) -> dict:
    """Openings, RM comparisons and best-vs-worst (DPO) pairs per split, from the data files."""
    return {split: {"openings": len(read_jsonl(work / "data" / f"{split}_prompts.jsonl")),
                    "rm_pairs": len(read_jsonl(work / "data" / f"rm_{split}_pairs.jsonl")),
                    "best_vs_worst_pairs": len(read_jsonl(work / "runs" / f"gold-{split}" / "pairs.jsonl"))}
            for split in ("train", "test")}


def arms_recipe(plan: Plan) -> dict:
    """The arms as one recipe: the reward model, then the main arm of each method, then the sweeps."""
    def evaluate(arm: str) -> dict:
        return {
            "name": f"eval-{arm}", "stage": "eval", "from": arm, "reference": MODEL, "reward_from": "rm",
            "prompts": "data/test_prompts.jsonl", "reward_fns": [GOLD],
            "sampling": {**SAMPLING, "num_samples": plan.eval_samples, "seed": 7},
        }

    def dpo(beta: float) -> list[dict]:
        return [{"name": f"dpo-b{beta}", "stage": "dpo", "data": "runs/gold-train/pairs.jsonl",
                 "dpo": {"beta": beta, "precompute_ref_log_probs": True},
                 "train": {"epochs": plan.dpo_epochs, "learning_rate": 5.0e-4}}, evaluate(f"dpo-b{beta}")]

    def ppo(arm: str, kl: float, **reward) -> list[dict]:
        return [{
            "name": arm, "stage": "ppo", **reward, "prompts": "data/train_prompts.jsonl",
            "train": {"batch_size": 32, "learning_rate": 2.0e-4, "warmup_ratio": 0.0, "lr_scheduler": "constant",
                      "save_steps": 4},  # a checkpoint every 4 updates (6 minutes): a stopped run resumes there
            "ppo": {"episodes": plan.ppo_episodes, "mini_batches": 4, "ppo_epochs": 1, "max_new_tokens": MAX_NEW_TOKENS,
                    "temperature": 1.0, "kl_coef": kl, "whiten_advantages": True, "sample_every": 4},
        }, evaluate(arm)]

    def rm_check(arm: str) -> dict:  # the RM's accuracy on the trained policy's own samples, judged by VADER
        return {"name": f"rm-on-{arm}", "stage": "best-of-n", "from": arm, "reward_from": "rm", "prompts": "data/test_prompts.jsonl",
                "sampling": {**SAMPLING, "num_samples": 4, "seed": 5}}

    def rejection_sampling(round_: int) -> list[dict]:  # ReST-EM: sample from the last round's policy, fine-tune the start
        source = {"from": f"rs-{round_ - 1}"} if round_ > 1 else {}
        seed = 12 + round_ if "gold-train-more" in plan.gold_train_stages else 10 + round_  # not gold-train-more's seed 11
        stages = [{"name": f"rs-samples-{round_}", "stage": "best-of-n", **source, "reward_from": "rm", "prompts": "data/train_prompts.jsonl",
                   "sampling": {**SAMPLING, "num_samples": plan.rs_samples, "seed": seed}}]
        for i, epochs in enumerate(plan.rs_epochs if round_ == 1 else plan.rs_epochs[:1]):
            arm = f"rs-{round_}" if i == 0 else f"rs-{round_}-e{epochs:g}"
            stages += [{"name": arm, "stage": "sft", "data_from": f"rs-samples-{round_}", "train": {"epochs": epochs, "learning_rate": 5.0e-4}},
                       evaluate(arm)]
        return stages

    stages: list[dict] = [
        # Every pair of an opening's samples in one step (ranked rows), margin = VADER gap; one pass, lr annealed
        # to 0. Held-out accuracy at lr 5e-4: 0.60; at 2e-3: 0.75 (two passes: 0.77, twice the time).
        # About 16 completions a step (4 openings of 4, 1 of 20).
        {"name": "rm", "data": "data/rm_train_ranked.jsonl", "min_gap": plan.min_gap, "margins_from_scores": True,
         "train": {"epochs": 1, "batch_size": max(1, 16 // plan.rm_samples), "learning_rate": 2.0e-3, "lr_scheduler": "linear"}},
        {"name": "eval-rm", "stage": "eval", "from": "rm", "pairs": "data/rm_test_pairs.jsonl"},
        {"name": "best-of-n", "stage": "best-of-n", "reward_from": "rm", "prompts": "data/test_prompts.jsonl",
         "sampling": {**SAMPLING, "num_samples": max(plan.best_of), "seed": 3}},
        *rejection_sampling(1),
        *dpo(plan.dpo_betas[0]),
        *ppo(f"ppo-kl{plan.ppo_kl_coefs[0]}", plan.ppo_kl_coefs[0], reward_from="rm"),
        *([rm_check(f"ppo-kl{plan.ppo_kl_coefs[0]}")] if plan.rm_check else []),
    ]
    for round_ in range(2, plan.rs_rounds + 1):
        stages += rejection_sampling(round_)
    # The sweeps, interleaved, each at less KL than the main arms (KL 15-17), so the two methods meet at matched KL
    # (PPO at kl 0.3 against DPO at beta 0.3 and GRPO near KL 6): a stopped run has both methods.
    for kl, beta in itertools.zip_longest(plan.ppo_kl_coefs[1:], plan.dpo_betas[1:]):
        stages += (ppo(f"ppo-kl{kl}", kl, reward_from="rm") if kl else []) + (dpo(beta) if beta else [])
    if plan.grpo_steps:
        stages += [
            {"name": "grpo", "stage": "grpo", "reward_from": "rm", "prompts": "data/train_prompts.jsonl", "loss_type": "dapo",
             "train": {"batch_size": 8, "max_steps": plan.grpo_steps, "learning_rate": 2.0e-4},
             "online": {"num_generations": 4, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "beta": 0.04}},
            evaluate("grpo"),
        ]
    if plan.ppo_gold:
        stages += ppo("ppo-gold", plan.ppo_kl_coefs[0], reward_fn=GOLD)
    return {"name": plan.name, "output_dir": "runs", **COMMON, "stages": stages}


def seconds(runs: Path, name: str, kind: str) -> float:
    """A finished stage's wall time, from its manifest; for PPO at least the sum of its updates' times,
    which also counts the updates of earlier runs that this one resumed."""
    duration = read_manifest(STAGES[kind].output_path(runs, name))["duration_s"]
    if kind == "ppo":
        updates = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        duration = max(duration, sum(u.get("time_generate", 0) + u.get("time_score", 0) + u.get("time_train", 0) for u in updates))
    return duration


def win_rate(picks: list[float], starts: list[float]) -> float:
    """P(a pick beats one of the start's samples of the same opening), ties counting half."""
    return statistics.fmean((p > s) + 0.5 * (p == s) for p, s in zip(picks, starts))


def rm_accuracy(samples: list[dict], min_gap: float) -> dict:
    """How often the RM (each sample's `score`) orders two samples of an opening as VADER does: the pairs
    the data keeps for the RM (both samples non-empty, VADER gap over min_gap)."""
    by_prompt: dict[str, list[dict]] = {}
    for row in samples:
        if row["completion"].strip():
            by_prompt.setdefault(row["prompt"], []).append(row)
    agree = []
    for rows in by_prompt.values():
        for a, b in itertools.combinations(rows, 2):
            gap = score(a["completion"]) - score(b["completion"])
            if abs(gap) > min_gap:
                agree.append((gap > 0) == (a["score"] > b["score"]))
    return {"accuracy": statistics.fmean(agree) if agree else None, "count": len(agree)}


def best_of_n_arms(work: Path, plan: Plan, tokenizer) -> dict:
    """Best-of-n for each n from one run of max(n) samples per opening: each n averages the disjoint groups
    of n samples, picking by the RM or by VADER; KL is the bound; win rate against the data's start samples."""
    from align.stages.best_of_n import kl_bound

    runs = work / "runs"
    by_prompt: dict[str, list[dict]] = {}
    for row in read_jsonl(runs / "best-of-n" / "samples.jsonl"):
        by_prompt.setdefault(row["prompt"], []).append(row)
    start = {}
    for row in read_jsonl(runs / "gold-test" / "samples.jsonl"):
        start.setdefault(row["prompt"], []).append(row["score"])
    cost = seconds(runs, "best-of-n", "best-of-n")
    arms = {}
    for n in plan.best_of:
        for by, key in (("rm", "score"), ("gold", "gold")):
            if n == 1 and by == "gold":
                continue
            golds, rms, lengths, wins = [], [], [], []
            for prompt, samples in by_prompt.items():
                for group in range(len(samples) // n):
                    candidates = samples[group * n:(group + 1) * n]
                    for c in candidates:
                        c.setdefault("gold", score(c["completion"]))
                    pick = max(candidates, key=lambda c: c[key])
                    golds.append(pick["gold"])
                    rms.append(pick["score"])
                    lengths.append(len(tokenizer(pick["completion"], add_special_tokens=False)["input_ids"]))
                    wins.append(win_rate([pick["gold"]] * len(start[prompt]), start[prompt]))
            arms["best-of-1" if n == 1 else f"best-of-{n}-by-{by}"] = {
                "family": "best-of-n by RM" if by == "rm" else "best-of-n by VADER", "point": n,
                "gold": statistics.fmean(golds), "rm": statistics.fmean(rms), "kl": kl_bound(n), "kl_is_bound": True,
                "win_rate": statistics.fmean(wins), "length": statistics.fmean(lengths),
                "seconds": cost * n / max(plan.best_of),  # the share of the sampling this n needs
            }
    return arms


def collect(work: Path, plan: Plan, recipe: dict, counts: dict) -> dict:
    runs = work / "runs"
    from align.models import load_tokenizer, resolve_model
    from align.config import ModelSpec

    spec = ModelSpec(path=MODEL)
    tokenizer = load_tokenizer(spec, resolve_model(spec))
    start_gold = statistics.fmean(r["score"] for r in read_jsonl(runs / "gold-test" / "samples.jsonl"))
    kinds = {s["name"]: s.get("stage", s["name"]) for s in recipe["stages"]}
    kinds = {name: kind for name, kind in kinds.items() if is_complete(STAGES[kind].output_path(runs, name))}  # --table: so far
    cost = {name: seconds(runs, name, kind) for name, kind in kinds.items()}
    arms = best_of_n_arms(work, plan, tokenizer) if "best-of-n" in kinds else {}
    families = {"rs-": "rejection-sampling FT (rounds)", "dpo-b": "DPO (beta)", "ppo-kl": "RM -> PPO (kl_coef)",
                "grpo": "RM -> GRPO (dapo)", "ppo-gold": f"PPO on VADER itself (kl {plan.ppo_kl_coefs[0]})"}
    for name in kinds:
        if not name.startswith("eval-") or name == "eval-rm":
            continue
        arm = name.removeprefix("eval-")
        family = next(label for prefix, label in families.items() if arm.startswith(prefix))
        metrics = json.loads((runs / f"{name}.json").read_text())
        trained, point = cost[arm], arm.rsplit("-", 1)[-1].lstrip("bkl")
        if arm.startswith("rs-"):  # round k needs every round's sampling and the fine-tunes it sampled from
            round_, *epochs = arm.removeprefix("rs-").split("-e")
            rounds = range(1, int(round_))
            trained = cost[arm] + sum(cost[f"rs-samples-{k}"] for k in (*rounds, int(round_))) + sum(cost[f"rs-{k}"] for k in rounds)
            point = f"{round_} ({epochs[0]} epoch)" if epochs else round_
        rm_key = next((k for k in metrics if k.startswith("reward/") and k.endswith("/mean") and GOLD not in k), None)
        arms[arm] = {
            "family": family, "point": point,
            "gold": metrics[f"reward/{GOLD}/mean"], "gold_start_eval": metrics[f"reward/{GOLD}/reference_mean"],
            "rm": metrics[rm_key] if rm_key else None,
            "kl": metrics["kl"], "kl_is_bound": False, "win_rate": metrics[f"win_rate/{GOLD}"],
            "length": metrics["response_length"], "eos_rate": metrics.get("eos_rate"), "seconds": trained,
        }
    for a in arms.values():
        a["gain"] = a["gold"] - start_gold
    for name in kinds:
        if name.startswith("rm-on-"):
            arms[name.removeprefix("rm-on-")]["rm_accuracy_on_own_samples"] = rm_accuracy(
                read_jsonl(runs / name / "samples.jsonl"), plan.min_gap)
    rm_eval = json.loads((runs / "eval-rm.json").read_text())["pairs"] if "eval-rm" in kinds else {}
    if "best-of-n" in kinds:  # the same question on 16 samples per held-out opening (120 pairs each, not 6): 20x the pairs
        rm_eval = {**rm_eval, f"{max(plan.best_of)}_per_opening": rm_accuracy(read_jsonl(runs / "best-of-n" / "samples.jsonl"), plan.min_gap)}
    shared = {"rm": cost.get("rm", 0.0)} | {stage: seconds(runs, stage, "best-of-n") for stage in [*plan.gold_train_stages, "gold-test"]}
    return {"plan": plan.__dict__, "pairs": counts, "start_gold": start_gold, "rm_heldout": rm_eval, "arms": arms,
            "shared_seconds": shared, "stage_seconds": cost, "stages_finished": f"{len(kinds)} of {len(recipe['stages'])}"}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list] = {}
    for name, a in results["arms"].items():
        families.setdefault(a["family"], []).append((a["kl"], a["gold"], str(a["point"]), a["kl_is_bound"]))
    if "best-of-1" in results["arms"] and "best-of-n by VADER" in families:  # n = 1 is the same policy for both
        one = results["arms"]["best-of-1"]
        families["best-of-n by VADER"].append((one["kl"], one["gold"], "1", True))
    markers = iter("os^vDPX*<>")
    for family, points in families.items():
        points.sort()
        bound = points[0][3]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=next(markers), label=family,
                linestyle=":" if bound else "-")
        for x, y, label, _ in points:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(results["start_gold"], color="grey", linestyle="--", label="starting model")
    ax.set_xlabel("KL(policy || starting model), nats per response (best-of-n: the bound)")
    ax.set_ylabel("mean VADER score, held-out films")
    ax.set_title("Steering sentiment on SmolLM2-135M: gold reward vs KL")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict) -> str:
    lines = ["| arm | VADER | gain | KL | win rate | RM score | length | minutes |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, a in results["arms"].items():
        kl = f"≤{a['kl']:.2f}" if a["kl_is_bound"] else f"{a['kl']:.2f}"
        rm = "" if a["rm"] is None else f"{a['rm']:+.2f}"
        lines.append(f"| {name} | {a['gold']:+.3f} | {a['gain']:+.3f} | {kl} | {a['win_rate']:.2f} | {rm} | "
                     f"{a['length']:.1f} | {a['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer points and a quarter of the data (aimed under 30 minutes)")
    parser.add_argument("--work", help="work dir (data, recipes, stage outputs); default runs/sentiment[-quick]")
    parser.add_argument("--table", action="store_true", help="tabulate and plot the stages finished so far; run nothing")
    parser.add_argument("--out", help="results JSON (the plot is written beside it); default bench/results/sentiment[-quick].json")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    try:
        import matplotlib  # noqa: F401
        import vaderSentiment  # noqa: F401
    except ImportError as error:
        sys.exit(f"bench/sentiment.py needs {error.name}: pip install -e '.[bench]'")
    work = Path(args.work or f"runs/{plan.name}").resolve()
    out = Path(args.out or HERE / "results" / f"{plan.name}.json")

    started = time.time()
    recipe = arms_recipe(plan)
    if args.table:
        counts = data_counts(work)
    else:
        counts = prepare_data(work, plan)
        align_run(recipe, work / "arms.yaml")
    results = {**collect(work, plan, recipe, counts), "this_invocation_seconds": round(time.time() - started, 1)}
    data_seconds = sum(v for k, v in results["shared_seconds"].items() if k.startswith("gold-"))
    results["total_stage_minutes"] = round((sum(results["stage_seconds"].values()) + data_seconds) / 60, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, out.with_suffix(".png"))

    print(f"\nstarting model: VADER {results['start_gold']:+.3f} on the held-out openings; pairs {counts}")
    if results["rm_heldout"].get("accuracy") is not None:
        print(f"RM held-out pairwise accuracy {results['rm_heldout']['accuracy']:.3f} on {results['rm_heldout']['count']} pairs")
        many = results["rm_heldout"].get(f"{max(plan.best_of)}_per_opening")
        if many:
            print(f"  on {max(plan.best_of)} samples per held-out opening: {many['accuracy']:.3f} on {many['count']} pairs")
    for name, a in results["arms"].items():
        if "rm_accuracy_on_own_samples" in a:
            own = a["rm_accuracy_on_own_samples"]
            print(f"RM accuracy on {name}'s own samples: {own['accuracy']:.3f} on {own['count']} pairs")
    print(table(results))
    print(f"minutes: RM {results['shared_seconds']['rm'] / 60:.1f} (shared by the RM arms), data "
          f"{sum(v for k, v in results['shared_seconds'].items() if k.startswith('gold-')) / 60:.1f}; all stages "
          f"{results['total_stage_minutes']} ({results['stages_finished']} stages finished; {results['this_invocation_seconds'] / 60:.1f} "
          f"this invocation); {out}, "
          f"{out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
