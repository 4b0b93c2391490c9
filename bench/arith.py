"""Process supervision on CPU: Let's Verify Step by Step's Figure 3 (accuracy against N) on multi-step arithmetic.

The task (bench/data/arith_tasks.py): "Start with 7. Add 5. Multiply by 2. Subtract 3.", worked one
step a line, then "Answer: 21"; exact checkers for each step and for the answer.

1. `align sft`: SmolLM2-135M-Instruct fine-tuned on clean solutions, briefly, so that its samples at
   temperature 1 are right only part of the time (the policy every later part samples from).
2. `align label-steps` on the policy's own samples: exact labels (--step-fn) on 16 samples of every
   held-out problem (the best-of-N pools), Math-Shepherd labels (--answer-fn, rollouts from every
   step) on one sample of each of a few training problems.
3. From the policy: on synthetic twins (a right solution and one with a step off by 1 to 3, carried
   on: each step labelled on its own, so that step is the twin's only wrong one), a PRM with `align
   prm --pairwise` (sibling steps ranked) and an ORM with `align rm` (whole solutions ranked), the
   same data and budget; and a PRM on the Math-Shepherd labels.
4. Best-of-N on held-out problems for N = 1..16 (disjoint groups of each pool): majority vote over
   final answers, the ORM, the PRMs (min and prod), votes weighted by either model, the policy's
   own lowest token log-prob (no reward model), and the oracle (any right); the PRMs' step AUROC
   against exact labels; `align eval --pairs` on held-out twins (pairwise accuracy), and the
   policy's own ranking of them. The separator probe: can a step's correctness be read, linearly,
   from the policy's hidden state where a PRM's label sits, layer by layer, against the policy's
   own log-probs (separator_probe)?
5. `align ppo` from the policy with the PRM's dense step rewards against PPO with the ORM, the
   same budget; `align eval` accuracy of each at temperature 1 (and of the policy it started from).

    pip install -e .[bench]
    python bench/arith.py            # bench/results/arith.json + .png
    python bench/arith.py --table    # tabulate what has finished; run nothing

Rerunning skips finished stages (align run's own skip rule), so a run that was stopped continues.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data import arith_tasks as tasks  # noqa: E402

from align.checkpoints import is_complete, read_manifest  # noqa: E402
from align.stages import STAGES  # noqa: E402

CHECKS = HERE / "data" / "arith_tasks.py"


@dataclass(frozen=True)
class Plan:
    name: str = "arith"
    model: str = "smollm2-135m-instruct"
    max_new_tokens: int = 64
    sft_problems: int = 1000
    sft_steps: int = 60  # 3.2 s each on 2 cores (batch 8); 60 leave the policy right 59% of the time at temperature 1, 120 69%
    operations: tuple[int, ...] = (3, 4)
    prm_problems: int = 160  # drawn, not used since the policy-labelled PRM/ORM left the run (README); the later sets stay as they were
    ms_problems: int = 32  # Math-Shepherd labels: 2 samples each, `rollouts` from every step
    rollouts: int = 4
    test_problems: int = 64  # 16 samples each: the best-of-N pools
    test_twins: int = 4  # held-out twins per test problem, each different: 256 pairs (the first 64 are the earlier runs' set)
    best_of: tuple[int, ...] = (1, 2, 4, 8, 16)
    prm_epochs: float = 1.0
    ppo_episodes: int = 128
    probe_problems: int = 1600  # synthetic solutions behind the separator probe (separator_probe)
    twin_problems: int = 2400  # synthetic right solutions and one-step-off twins: the sibling-trained PRM and its ORM
    twin_layers: int = 10  # ... fine-tune the policy's last blocks in full (LoRA did not learn the check: README)
    twin_epochs: float = 2.0  # ... two passes of 4 pairs a step: after one the PRM ranked 0.85 of the held-out twins, after two 0.92
    twin_batch: int = 4

PLAN = Plan()
# Every stage on the tiny built-in model, in a minute: what CI runs to keep this script working.
SMOKE = replace(PLAN, name="arith-smoke", model="tiny", max_new_tokens=16, sft_problems=16, sft_steps=2, prm_problems=4,
                ms_problems=2, rollouts=2, test_problems=4, best_of=(1, 2, 4), prm_epochs=1.0, ppo_episodes=16, probe_problems=24,
                twin_problems=8, twin_layers=1, twin_epochs=1.0, test_twins=2)
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prepare_data(work: Path, plan: Plan) -> None:
    """Disjoint problem sets (SFT, PRM labels, Math-Shepherd labels, PPO, test) and the test's twin pairs."""
    rng = random.Random(0)
    sizes = {"sft": plan.sft_problems, "prm": plan.prm_problems, "ms": plan.ms_problems, "ppo": 128,
             "test": plan.test_problems}
    seen: set[str] = set()
    sets: dict[str, list] = {}

    def draw(split: str, size: int, rng: random.Random) -> None:
        sets[split] = []
        while len(sets[split]) < size:
            text, ops, start = tasks.problem(rng, rng.choice(plan.operations))
            if text not in seen:
                seen.add(text)
                sets[split].append((tasks.INSTRUCTION.format(problem=text), ops, start))

    for split, size in sizes.items():
        draw(split, size, rng)
    data = work / "data"
    write_jsonl(data / "sft.jsonl", [{"prompt": p, "completion": "\n".join(tasks.solution_steps(start, ops))}
                                      for p, ops, start in sets["sft"]])
    for split in ("ms", "ppo", "test"):
        write_jsonl(data / f"{split}_prompts.jsonl", [{"prompt": p} for p, _, _ in sets[split]])
    def twins(split: str, rng: random.Random, taken: set | None = None) -> list[dict]:
        """A right solution above its twin with one step off by 1 to 3 (carried on after), one per problem;
        none twice for a problem when `taken` collects (problem, step, offset) across calls."""
        pairs = []
        for p, ops, start in sets[split]:
            while True:
                wrong_at = rng.randrange(len(ops))
                off = rng.choice([-3, -2, -1, 1, 2, 3])
                if taken is None or (p, wrong_at, off) not in taken:
                    break
            if taken is not None:
                taken.add((p, wrong_at, off))
            pairs.append({"prompt": p, "chosen": tasks.solution_steps(start, ops),
                          "rejected": tasks.solution_steps(start, ops, wrong_at, off)})
        return pairs

    taken: set = set()  # the held-out twins: `test_twins` rounds of one per problem, each twin different
    write_jsonl(data / "test_pairs.jsonl", [{**pair, "chosen": "\n".join(pair["chosen"]), "rejected": "\n".join(pair["rejected"])}
                                            for _ in range(plan.test_twins) for pair in twins("test", rng, taken)])
    # Training twins: as stepwise rows, every step labelled on its own (the wrong step is the twin's only wrong one:
    # the steps after it carry its value on correctly; the PRM's siblings are the wrong step and the right one in its
    # place), and as preference pairs of whole solutions (the ORM's).
    draw("twins", plan.twin_problems, random.Random(1))
    pairs = twins("twins", random.Random(2))
    write_jsonl(data / "twins_steps.jsonl", [{"prompt": pair["prompt"], "completions": steps,
                                              "labels": tasks.step_labels(pair["prompt"], steps)}
                                             for pair in pairs for steps in (pair["chosen"], pair["rejected"])])
    write_jsonl(data / "twins_pairs.jsonl", [{**pair, "chosen": "\n".join(pair["chosen"]), "rejected": "\n".join(pair["rejected"])}
                                             for pair in pairs])


def recipe(plan: Plan) -> dict:
    answer, steps_fn = f"{CHECKS}:right_answer", f"{CHECKS}:right_steps"
    solving = {"max_new_tokens": plan.max_new_tokens, "temperature": 1.0, "batch_size": 64}

    def label(name: str, prompts: str, samples: int, seed: int, **checker) -> dict:
        return {"name": name, "stage": "label-steps", "from": "sft", "prompts": f"data/{prompts}_prompts.jsonl", **checker,
                "sampling": {**solving, "num_samples": samples, "seed": seed}}

    def prm(name: str, data_from: str, **extra) -> dict:
        return {"name": name, "stage": "prm", "from": "sft", "data_from": data_from, **extra,
                "train": {"epochs": plan.prm_epochs, "batch_size": 8, "learning_rate": 1.0e-3, "lr_scheduler": "linear"}}

    def ppo(name: str, reward: str) -> list[dict]:
        return [
            {"name": name, "stage": "ppo", "from": "sft", "reward_from": reward, "prompts": "data/ppo_prompts.jsonl",
             "train": {"batch_size": 16, "learning_rate": 3.0e-5, "lr_scheduler": "constant", "warmup_ratio": 0.0, "save_steps": 4},
             "ppo": {"episodes": plan.ppo_episodes, "mini_batches": 2, "ppo_epochs": 1, "max_new_tokens": plan.max_new_tokens,
                     "temperature": 1.0, "kl_coef": 0.05, "whiten_advantages": True, "sample_every": 4}},
            evaluate(f"eval-{name}", name),
        ]

    def evaluate(name: str, arm: str) -> dict:
        return {"name": name, "stage": "eval", "from": arm, "prompts": "data/test_prompts.jsonl",  # KL to what it started from
                "reward_fns": [f"{CHECKS}:answer_reward"], "sampling": {**solving, "num_samples": 2, "seed": 7}}

    twin_training = {"lora": {"enabled": False, "trainable_layers": plan.twin_layers},
                     "train": {"epochs": plan.twin_epochs, "batch_size": plan.twin_batch, "learning_rate": 1.0e-4,
                               "lr_scheduler": "constant"}}
    stages = [
        {"name": "sft", "stage": "sft", "data": "data/sft.jsonl",
         "train": {"max_steps": plan.sft_steps, "batch_size": 8, "learning_rate": 1.0e-3, "lr_scheduler": "cosine",
                   "warmup_ratio": 0.05}},
        label("steps-test", "test", max(plan.best_of), 2, step_fn=steps_fn),
        # Trained on the difference alone: sibling steps ranked (prm --pairwise), whole twins ranked (rm), the
        # policy's last blocks in full, the same data and budget for both.
        {"name": "prm-twins", "stage": "prm", "from": "sft", "data": "data/twins_steps.jsonl", "pairwise": True, **twin_training},
        {"name": "orm-twins", "stage": "rm", "from": "sft", "data": "data/twins_pairs.jsonl", **twin_training},
        {"name": "pairs-prm-twins", "stage": "eval", "from": "prm-twins", "pairs": "data/test_pairs.jsonl"},
        {"name": "pairs-prm-twins-prod", "stage": "eval", "from": "prm-twins", "pairs": "data/test_pairs.jsonl",
         "reward_aggregate": "prod"},
        {"name": "pairs-orm-twins", "stage": "eval", "from": "orm-twins", "pairs": "data/test_pairs.jsonl"},
        *ppo("ppo-prm", "prm-twins"),  # dense step rewards against one score at the end
        *ppo("ppo-orm", "orm-twins"),
        label("steps-ms", "ms", 1, 3, answer_fn=answer, rollouts=plan.rollouts),
        prm("prm-ms", "steps-ms"),
    ]
    return {"name": plan.name, "output_dir": "runs", "model": plan.model, "lora": LORA,
            "data": {"max_length": 256, "eval_fraction": 0.0}, "stages": stages}


def align_run(config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    print("$ align run", path, "--resume", flush=True)
    code = subprocess.run([sys.executable, "-m", "align", "run", str(path), "--resume"], cwd=path.parent).returncode
    if code:  # align has said why in one line
        sys.exit(code)


def seconds(runs: Path, name: str, kind: str) -> float:
    return read_manifest(STAGES[kind].output_path(runs, name))["duration_s"]


def pools(runs: Path) -> dict[str, list[dict]]:
    """The held-out problems' 16 solutions each, in sampling order, with their exact step labels."""
    by_prompt: dict[str, list[dict]] = {}
    for row in read_jsonl(runs / "steps-test.jsonl"):
        row["correct"] = tasks.right_answer([row["prompt"]], ["\n".join(row["completions"])])[0]
        by_prompt.setdefault(row["prompt"] if isinstance(row["prompt"], str) else json.dumps(row["prompt"]), []).append(row)
    return by_prompt


# The reward models each selector reads: a PRM by its steps' min and prod, an outcome model by its one score.
SELECTORS = {"prm-ms": ("PRM (Math-Shepherd labels)", ("min", "prod")),
             "prm-twins": ("PRM (sibling steps ranked)", ("min", "prod")), "orm-twins": ("ORM (twins ranked)", ("last",))}
WEIGHTED_VOTE = ("prm-twins", "orm-twins")  # ... and these also as weights of a majority vote


def score_pools(runs: Path, by_prompt: dict[str, list[dict]], models: list[str]) -> None:
    """Each solution's step scores by each reward model (an `align rm` model's one score as a list of
    one), stored on the rows."""
    from align.config import ModelSpec
    from align.rewards import ProcessRewardModel, RewardModel

    rows = [row for solutions in by_prompt.values() for row in solutions]
    prompts, texts = [row["prompt"] for row in rows], ["\n".join(row["completions"]) for row in rows]
    for name in models:
        spec = ModelSpec(path=str(runs / name))
        if read_manifest(runs / name)["stage"] == "rm":
            scores = [[x] for x in RewardModel(spec, batch_size=32)(prompts, texts).tolist()]
        else:
            scores = [x.tolist() for x in ProcessRewardModel(spec, batch_size=32).step_scores(prompts, texts)]
        for row, steps in zip(rows, scores):
            row[name] = steps


def lowest_step_logprobs(checkpoint: Path, prompts: list, texts: list[str], batch_size: int = 32, hidden: bool = False) -> list:
    """Each solution's steps scored by the causal LM at `checkpoint` (runs/sft: the policy itself), no
    reward model: a step's lowest token log-prob (the separator after it left out: after the answer
    the policy ends, it does not write one), the steps tokenized as a PRM reads them. With `hidden`,
    each row is (scores, every layer's hidden state at each step's separator, [steps, layers + 1,
    width]): where a PRM's label sits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.data import prompt_ids, split_steps, step_ids
    from align.losses import token_logprobs

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    chat, separator = bool(tokenizer.chat_template), len(tokenizer("\n", add_special_tokens=False)["input_ids"])
    rows = [(*step_ids(tokenizer, prompt, [step for step, _ in split_steps(text, "\n")], "\n", chat),
             len(prompt_ids(tokenizer, prompt, chat))) for prompt, text in zip(prompts, texts)]
    out = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # ranking needs no more precision
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            ids = torch.full((len(batch), max(len(row) for row, _, _ in batch)), tokenizer.pad_token_id)
            mask = torch.zeros_like(ids)
            for n, (row, _, _) in enumerate(batch):
                ids[n, :len(row)], mask[n, :len(row)] = torch.tensor(row), 1
            output = model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
            taken = token_logprobs(output.logits[:, :-1], ids[:, 1:])  # [n, t - 1]: log P(token t)
            states = torch.stack(output.hidden_states, 1).float() if hidden else None  # [n, layers + 1, t, width]
            for n, (_, ends, first) in enumerate(batch):
                starts, stops = [first, *(end + 1 for end in ends[:-1])], [end + 1 - separator for end in ends]
                scores = [taken[n, a - 1:b - 1].min().item() for a, b in zip(starts, stops)]  # tokens a .. b - 1
                out.append((scores, states[n, :, ends].transpose(0, 1)) if hidden else scores)
    return out


def separator_probe(runs: Path, plan: Plan) -> dict:
    """Is a step's correctness readable where a PRM's label sits? On synthetic solutions whose steps are
    each off by 1 to 3 with probability 0.3 (each step labelled by its own arithmetic), the AUROC of a
    linear probe on the SFT policy's hidden state at each step's separator, layer by layer (fit on 80%,
    scored on 20%), against the AUROC of the policy's own lowest token log-prob in the step."""
    import torch

    from align.rewards import auroc

    rng, test = random.Random(3), {row["prompt"] for row in read_jsonl(runs.parent / "data" / "test_prompts.jsonl")}
    prompts, texts, labels = [], [], []
    while len(prompts) < plan.probe_problems:
        text, ops, value = tasks.problem(rng, rng.choice(plan.operations))
        prompt = tasks.INSTRUCTION.format(problem=text)
        if prompt in test:
            continue
        steps = []
        for name, operand in ops:
            off = rng.choice([-3, -2, -1, 1, 2, 3]) if rng.random() < 0.3 else 0
            written = tasks.apply(value, tasks.OPS[name], operand) + off
            steps.append(f"{value} {tasks.OPS[name]} {operand} = {written}")
            labels.append(not off)
            value = written  # carried on, as the policy's own slips are
        prompts.append(prompt)
        texts.append("\n".join(steps + [f"Answer: {value}"]))
    scored = lowest_step_logprobs(runs / "sft", prompts, texts, hidden=True)
    own = torch.tensor([x for scores, _ in scored for x in scores[:-1]])  # the answer steps left out
    states = torch.cat([h[:-1] for _, h in scored])
    right = torch.tensor(labels, dtype=torch.float32)
    cut = int(0.8 * len(right))
    layers = []
    for layer in range(states.shape[1]):
        x = states[:, layer]
        x = (x - x[:cut].mean(0)) / (x[:cut].std(0) + 1e-5)
        w = torch.zeros(x.shape[1], requires_grad=True)
        bias = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.Adam([w, bias], lr=1e-2)
        for _ in range(300):
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x[:cut] @ w + bias, right[:cut]) + 1e-3 * w.square().sum()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            layers.append(auroc(x[cut:] @ w + bias, right[cut:].bool()))
    return {"steps": len(right), "right_share": right.mean().item(), "held_out_steps": len(right) - cut,
            "policy_lowest_log_prob_auroc": auroc(own[cut:], right[cut:].bool()), "probe_auroc_by_layer": layers}


def best_of_n(by_prompt: dict[str, list[dict]], plan: Plan, models: list[str]) -> dict[str, dict[int, float]]:
    """Accuracy of each selection method at each N: the mean over disjoint groups of N of each pool."""
    import math

    def answer(row) -> int | None:
        return tasks.final_answer("\n".join(row["completions"]))

    def score(model: str, how: str):  # a solution's score by a model's steps (None for none)
        value = (lambda s: s[-1]) if how == "last" else min if how == "min" else math.prod
        return lambda r: value(r[model]) if r[model] else None

    def best(by):  # is the solution scored highest by `by` right?
        return lambda group: bool(max(group, key=lambda r: -math.inf if by(r) is None else by(r))["correct"])

    def vote(weight):  # is the answer whose solutions' weights sum highest (ties: the first sampled) right?
        def right(group: list[dict]) -> bool:
            weights: Counter = Counter()
            for r in group:
                if answer(r) is not None and (w := weight(r)) is not None:
                    weights[answer(r)] += w
            top = max(weights, key=weights.__getitem__) if weights else None
            return top is not None and any(r["correct"] and answer(r) == top for r in group)
        return right

    def probability(logit):  # an outcome model's score is a logit: its sigmoid weighs a vote
        return lambda r: None if logit(r) is None else 1 / (1 + math.exp(-logit(r)))

    pickers = {
        "majority vote": vote(lambda r: 1),
        **({"policy's lowest token log-prob": best(score("policy", "min"))} if "policy" in models else {}),
        **{name if how == "last" else f"{name}, {how}": best(score(m, how)) for m in models if m != "policy"
           for name, hows in [SELECTORS[m]] for how in hows},
        # Weighted majority vote (Uesato et al. 2022, Math-Shepherd): each final answer's votes are the
        # solutions' scores (a PRM's min step probability, an outcome model's sigmoid), the top answer wins.
        **{f"{name}, {'min-' if how == 'min' else ''}weighted vote": vote(probability(score(m, how)) if how == "last" else score(m, how))
           for m in models if m in WEIGHTED_VOTE for name, hows in [SELECTORS[m]] for how in hows[:1]},
    }
    curves: dict[str, dict[int, float]] = {name: {} for name in [*pickers, "oracle (any right)"]}
    for n in plan.best_of:
        hits: dict[str, list[bool]] = {name: [] for name in curves}
        for solutions in by_prompt.values():
            for g in range(len(solutions) // n):
                group = solutions[g * n:(g + 1) * n]
                hits["oracle (any right)"].append(any(r["correct"] for r in group))
                for name, right in pickers.items():
                    hits[name].append(right(group))
        for name in curves:
            curves[name][n] = statistics.fmean(hits[name])
    return curves


def step_auroc(by_prompt: dict[str, list[dict]], models: list[str], ms_rows: list[dict] | None) -> dict:
    """Each PRM's steps' AUROC against exact labels on the held-out pools (and the Math-Shepherd labels'
    own agreement with the exact ones on the rows they were made for)."""
    import torch

    from align.rewards import auroc, step_metrics

    rows = [row for solutions in by_prompt.values() for row in solutions]
    out = {m: step_metrics([torch.tensor(r[m]) for r in rows], [r["labels"] for r in rows]) for m in models
           if SELECTORS[m][1] != ("last",)}
    if rows and "policy" in rows[0]:  # log-probs: no 0.5 threshold, so the AUROC alone
        out["policy's lowest token log-prob"] = {
            "auroc": auroc(torch.tensor([x for r in rows for x in r["policy"]]),
                           torch.tensor([float(x) > 0.5 for r in rows for x in r["labels"]])),
            "steps": sum(len(r["labels"]) for r in rows)}
    if ms_rows:
        exact = [tasks.on_track_labels(r["prompt"], r["completions"]) for r in ms_rows]  # what the rollouts estimate
        out["math-shepherd labels vs exact"] = step_metrics([torch.tensor([float(x) for x in r["labels"]]) for r in ms_rows], exact)
    return out


def collect(work: Path, plan: Plan, config: dict) -> dict:
    runs = work / "runs"
    kinds = {s["name"]: s["stage"] for s in config["stages"]}
    done = {name: kind for name, kind in kinds.items() if is_complete(STAGES[kind].output_path(runs, name))}
    cost = {name: round(seconds(runs, name, kind), 1) for name, kind in done.items()}
    results: dict = {"plan": plan.__dict__, "stage_seconds": cost, "stages_finished": f"{len(done)} of {len(kinds)}"}
    if "steps-test" in done:
        by_prompt = pools(runs)
        models = [m for m in SELECTORS if m in done]
        score_pools(runs, by_prompt, models)
        rows = [row for solutions in by_prompt.values() for row in solutions]
        for row, steps in zip(rows, lowest_step_logprobs(runs / "sft", [r["prompt"] for r in rows], ["\n".join(r["completions"]) for r in rows])):
            row["policy"] = steps
        results["best_of_n"] = best_of_n(by_prompt, plan, [*models, "policy"])
        ms_rows = read_jsonl(runs / "steps-ms.jsonl") if "steps-ms" in done else None
        results["step_auroc"] = step_auroc(by_prompt, models, ms_rows)
        results["policy_accuracy"] = statistics.fmean(r["correct"] for s in by_prompt.values() for r in s)  # 16 x 64 samples
    results["pairwise"] = {m: json.loads((runs / f"pairs-{m}.json").read_text())["pairs"]
                           for m in [*SELECTORS, "prm-twins-prod"] if f"pairs-{m}" in done}  # a PRM by its min, and by its prod
    if "sft" in done:
        results["separator_probe"] = separator_probe(runs, plan)
        # the same pairs ranked by the policy's own lowest token log-prob, no reward model
        pairs = read_jsonl(work / "data" / "test_pairs.jsonl")
        lowest = [min(steps) for steps in lowest_step_logprobs(runs / "sft", [p["prompt"] for p in pairs] * 2,
                                                             [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])]
        results["pairwise"]["policy"] = {"accuracy": statistics.fmean(c > r for c, r in zip(lowest, lowest[len(pairs):])),
                                         "count": len(pairs)}
    results["ppo"] = {}
    for arm in ("ppo-prm", "ppo-orm"):
        if f"eval-{arm}" in done:
            metrics = json.loads((runs / f"eval-{arm}.json").read_text())
            results["ppo"][arm] = {"accuracy": metrics[f"reward/{CHECKS}:answer_reward/mean"],
                                   "start_accuracy": metrics[f"reward/{CHECKS}:answer_reward/reference_mean"],
                                   "kl": metrics["kl"], "length": metrics["response_length"], "minutes": cost[arm] / 60}
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2])  # 20 colours, none repeated
    for (name, curve), marker in zip(results.get("best_of_n", {}).items(), "os^vDPX*<>hd"):
        ns = sorted(int(n) for n in curve)
        ax.plot(ns, [100 * curve[n] for n in ns], marker=marker, label=name,
                linestyle=":" if name.startswith("oracle") else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N = solutions per problem (log scale)")
    ax.set_ylabel("% of held-out problems solved")
    ax.set_title("Best-of-N on multi-step arithmetic, SmolLM2-135M")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict) -> str:
    curves = results.get("best_of_n", {})
    if not curves:
        return "(no best-of-N pools yet)"
    ns = sorted(int(n) for n in next(iter(curves.values())))
    lines = ["| selection | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
    for name, curve in curves.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * curve[n]:.1f}" for n in ns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="work dir (data, recipe, stage outputs); default runs/arith")
    parser.add_argument("--table", action="store_true", help="tabulate and plot the stages finished so far; run nothing")
    parser.add_argument("--out", help="results JSON (the plot beside it); default bench/results/arith.json")
    parser.add_argument("--smoke", action="store_true", help="every stage on the tiny built-in model, in a minute (CI runs it)")
    args = parser.parse_args()
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        sys.exit(f"bench/arith.py needs {error.name}: pip install -e '.[bench]'")
    plan = SMOKE if args.smoke else PLAN
    work = Path(args.work or f"runs/{plan.name}").resolve()
    out = Path(args.out or HERE / "results" / f"{plan.name}.json")
    started = time.time()
    config = recipe(plan)
    if not args.table:
        prepare_data(work, plan)
        align_run(config, work / "arms.yaml")
    results = {**collect(work, plan, config), "this_invocation_seconds": round(time.time() - started, 1)}
    results["total_stage_minutes"] = round(sum(results["stage_seconds"].values()) / 60, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, out.with_suffix(".png"))

    if "policy_accuracy" in results:
        print(f"\npolicy (SFT) accuracy at temperature 1 (the best-of-N pools): {results['policy_accuracy']:.3f}")
    print(table(results))
    for name, metrics in results.get("step_auroc", {}).items():
        accuracy = (f", step accuracy {metrics['step_accuracy']:.3f}, first-error accuracy {metrics['first_error_accuracy']:.3f}"
                    if "step_accuracy" in metrics else "")
        print(f"{name}: step AUROC {metrics['auroc']}{accuracy} ({metrics['steps']} steps)")
    for name, pairs in results["pairwise"].items():
        print(f"{name}: correct above its one-wrong-step twin in {pairs['accuracy']:.3f} of {pairs['count']} pairs")
    if "separator_probe" in results:
        probe = results["separator_probe"]
        best = max((a for a in probe["probe_auroc_by_layer"] if a is not None), default=float("nan"))
        print(f"where a PRM's label sits: a linear probe's step AUROC at best {best:.3f} over "
              f"{len(probe['probe_auroc_by_layer'])} layers; the policy's own lowest token log-prob {probe['policy_lowest_log_prob_auroc']:.3f}")
    for arm, a in results["ppo"].items():
        print(f"{arm}: accuracy {a['start_accuracy']:.3f} -> {a['accuracy']:.3f}, KL {a['kl']:.2f}, {a['minutes']:.1f} min")
    print(f"all stages {results['total_stage_minutes']} minutes ({results['stages_finished']} stages finished); {out}")


if __name__ == "__main__":
    main()
