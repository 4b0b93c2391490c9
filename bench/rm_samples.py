"""The sentiment reward model's held-out accuracy against samples per training opening.

bench/sentiment.py trains its RM on 20 samples per training opening (its gold-train stage's 4 and
gold-train-more's 16, all scored by VADER). This study trains the same RM (ranked rows, margin =
VADER gap, gaps of 0.1 or less dropped, one pass, lr 2e-3 annealed to 0, about 16 completions a
step) on the first 4 (the issue's InstructGPT setup: 6 comparisons an opening) and the first 8 of
them. Each RM, and the benchmark's own, is evaluated on the benchmark's held-out pairs (4 samples
per held-out opening: 306 pairs, a standard error near 0.02) and on its best-of-n stage's 16 samples
per held-out opening scored by VADER (about 6,200 pairs: near 0.005).

    python bench/sentiment.py --work W          # at least its data, rm, eval-rm and best-of-n stages
    python bench/rm_samples.py --work W         # writes W/data/rm_train_k*.jsonl, runs W/rm-samples.yaml

Measured figures: README, "Steering sentiment".
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from sentiment import MODEL, align_run, read_jsonl, rm_accuracy, write_jsonl

SIZES = (4, 8)  # samples per opening, the first of the benchmark's 20


def ranked_rows(work: Path, k: int) -> list[dict]:
    """The benchmark's ranked rows cut to the first k samples of each opening."""
    return [{"prompt": row["prompt"], "completions": row["completions"][:k], "scores": row["scores"][:k]}
            for row in read_jsonl(work / "data" / "rm_train_ranked.jsonl")]


def recipe() -> dict:
    """One RM and its held-out evaluation per size, each with about 16 completions per step (as the benchmark's: 4 x 4)."""
    stages = []
    for k in SIZES:
        stages += [
            {"name": f"rm-k{k}", "stage": "rm", "data": f"data/rm_train_k{k}.jsonl", "min_gap": 0.1, "margins_from_scores": True,
             "train": {"epochs": 1, "batch_size": max(1, 16 // k), "learning_rate": 2.0e-3, "lr_scheduler": "linear"}},
            {"name": f"eval-rm-k{k}", "stage": "eval", "from": f"rm-k{k}", "pairs": "data/rm_test_pairs.jsonl"},
        ]
    return {"name": "rm-samples", "output_dir": "runs-rm-samples", "model": MODEL, "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "data": {"max_length": 128, "eval_fraction": 0.0}, "train": {"save_steps": 1000, "warmup_ratio": 0.05},
            "stages": stages}


def heldout_accuracy(work: Path, rm: Path, min_gap: float = 0.1) -> dict:
    """The RM at `rm` ordering pairs of the benchmark's 16 samples per held-out opening as VADER does."""
    from align.config import ModelSpec
    from align.rewards import reward_model

    samples = read_jsonl(work / "runs" / "best-of-n" / "samples.jsonl")
    scores = reward_model(ModelSpec(path=str(rm)))([s["prompt"] for s in samples], [s["completion"] for s in samples])
    return rm_accuracy([{**s, "score": v} for s, v in zip(samples, scores.float().tolist())], min_gap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="a bench/sentiment.py work dir (its data, rm, eval-rm and best-of-n stages finished)")
    work = Path(parser.parse_args().work).resolve()
    for k in SIZES:
        rows = ranked_rows(work, k)
        write_jsonl(work / "data" / f"rm_train_k{k}.jsonl", rows)
        comparisons = sum(abs(a - b) > 0.1 for r in rows for a, b in itertools.combinations(r["scores"], 2))
        print(f"{k} samples per opening: {len(rows)} openings, {comparisons} comparisons", flush=True)
    align_run(recipe(), work / "rm-samples.yaml")
    for k, rm in {**{k: work / "runs-rm-samples" / f"rm-k{k}" for k in SIZES}, 20: work / "runs" / "rm"}.items():
        pairs = json.loads((rm.parent / f"eval-{rm.name}.json").read_text())["pairs"]
        many = heldout_accuracy(work, rm)
        print(f"RM on {k} samples per opening: held-out accuracy {pairs['accuracy']:.3f} on {pairs['count']} pairs, "
              f"{many['accuracy']:.3f} on {many['count']} pairs of 16 samples per held-out opening", flush=True)


if __name__ == "__main__":
    main()
