"""The sentiment reward model's held-out accuracy against samples per training opening.

bench/sentiment.py trains its RM on 4 samples per opening (6 comparisons each, the issue's
InstructGPT setup) and reaches 0.748 on the held-out pairs. This study adds samples of the same
starting model from bench/rs_transfer.yaml's best-of-16 stage, scored by VADER, and trains the same
RM (ranked rows, margin = VADER gap, gaps of 0.1 or less dropped, one pass, lr 2e-3 annealed to 0)
on 8 and on 20 samples per opening; each is evaluated on the benchmark's held-out pairs.

    python bench/sentiment.py --work W          # at least its data and eval-rm stages
    cd W && align run /path/to/align/bench/rs_transfer.yaml   # at least its samples16 stage
    python bench/rm_samples.py --work W         # writes W/data/rm_train_k*.jsonl, runs W/rm-samples.yaml

Measured figures: README, "Steering sentiment".
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from sentiment import MODEL, align_run, read_jsonl, score, write_jsonl

EXTRA = {8: 4, 20: 16}  # samples per opening -> how many best-of-16 samples join the benchmark's 4


def ranked_rows(work: Path, extra: int) -> list[dict]:
    """The benchmark's ranked rows, each with the first `extra` best-of-16 samples of its opening added."""
    more: dict[str, list[str]] = {}
    for row in read_jsonl(work / "runs-rs-transfer" / "samples16" / "samples.jsonl"):
        more.setdefault(row["prompt"], []).append(row["completion"])
    rows = []
    for row in read_jsonl(work / "data" / "rm_train_ranked.jsonl"):
        added = more[row["prompt"]][:extra]
        rows.append({"prompt": row["prompt"], "completions": row["completions"] + added,
                     "scores": row["scores"] + [score(text) for text in added]})
    return rows


def recipe() -> dict:
    """One RM and its held-out evaluation per size, each with about 16 completions per step (as the benchmark's: 4 x 4)."""
    stages = []
    for k in EXTRA:
        stages += [
            {"name": f"rm-k{k}", "stage": "rm", "data": f"data/rm_train_k{k}.jsonl", "min_gap": 0.1, "margins_from_scores": True,
             "train": {"epochs": 1, "batch_size": max(1, 16 // k), "learning_rate": 2.0e-3, "lr_scheduler": "linear"}},
            {"name": f"eval-rm-k{k}", "stage": "eval", "from": f"rm-k{k}", "pairs": "data/rm_test_pairs.jsonl"},
        ]
    return {"name": "rm-samples", "output_dir": "runs-rm-samples", "model": MODEL, "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "data": {"max_length": 128, "eval_fraction": 0.0}, "train": {"save_steps": 1000, "warmup_ratio": 0.05},
            "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="a bench/sentiment.py work dir where bench/rs_transfer.yaml ran")
    work = Path(parser.parse_args().work).resolve()
    for k, extra in EXTRA.items():
        rows = ranked_rows(work, extra)
        write_jsonl(work / "data" / f"rm_train_k{k}.jsonl", rows)
        comparisons = sum(abs(a - b) > 0.1 for r in rows for a, b in itertools.combinations(r["scores"], 2))
        print(f"{k} samples per opening: {len(rows)} openings, {comparisons} comparisons", flush=True)
    align_run(recipe(), work / "rm-samples.yaml")
    for k in EXTRA:
        accuracy = json.loads((work / "runs-rm-samples" / f"eval-rm-k{k}.json").read_text())["pairs"]
        print(f"RM on {k} samples per opening: held-out accuracy {accuracy['accuracy']:.3f} on {accuracy['count']} pairs")


if __name__ == "__main__":
    main()
