"""Pairs in one row against two: `align prm --pairwise` (sibling solutions) and `align rm` (preference
pairs), each with its one-row packing on and off.

A pair shares a prefix: a PRM's siblings the prompt and the steps before the one they part at, a
reward model's chosen and rejected the prompt. In one row (the default) that prefix is computed
once; in two rows (`share_prefix=false`, `pair_rows=false`) each side computes it. The data, steps
and settings are bench/arith.py's PRM and ORM (SmolLM2-135M, the last 10 of 30 blocks in full,
batches of 8 pairs, lr 1e-4) on its 2,400 twins, the runs of each stage alternated so that
neither layout gets the quieter machine. Reported: seconds per step (the trainer's own
train_runtime) and their ratio, with the final losses (equal up to float rounding:
tests/test_prm.py and tests/test_pair_rows.py check them on the tiny model).

    python bench/shared_prefix.py                     # bench/results/shared_prefix.json
    python bench/shared_prefix.py --model tiny --steps 2 --runs 1   # the smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import arith  # noqa: E402

# stage: (its data in arith's work dir, extra flags, the setting that turns one row per pair off)
STAGES = {"prm": ("twins_steps.jsonl", ["--pairwise"], "share_prefix"), "rm": ("twins_pairs.jsonl", [], "pair_rows")}


def train(stage: str, model: str, data: Path, out: Path, steps: int, one_row: bool, layers: int) -> dict:
    _, extra, setting = STAGES[stage]
    command = [sys.executable, "-m", "align", "-q", stage, "-m", model, "-d", str(data), "-o", str(out), *extra,
               "--no-lora", "--trainable-layers", str(layers), "--lr", "1e-4", "--lr-scheduler", "constant",
               "--batch-size", "8", "--max-steps", str(steps), "--overwrite",
               "--set", "data.max_length=256", "--set", "data.eval_fraction=0", "--set", f"{setting}={str(one_row).lower()}",
               "--set", f"train.save_steps={steps + 1}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"align {stage} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    manifest = json.loads((out / "align.json").read_text())
    return {"seconds_per_step": manifest["metrics"]["train_runtime"] / steps, "loss": manifest["metrics"]["train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=arith.PLAN.model)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=2, help="runs of each layout, alternated")
    parser.add_argument("--stages", default="prm,rm", help="which of prm, rm")
    parser.add_argument("--out", default=str(HERE / "results" / "shared_prefix.json"))
    args = parser.parse_args()
    plan = arith.PLAN if args.model == arith.PLAN.model else replace(arith.SMOKE, model=args.model)
    result = {"model": args.model, "steps": args.steps}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        arith.prepare_data(work, plan)  # the benchmark's twins: 2,400 pairs
        for stage in args.stages.split(","):
            runs: dict[str, list[dict]] = {"one row": [], "two rows": []}
            for _ in range(args.runs):
                for name, one_row in (("one row", True), ("two rows", False)):
                    run = train(stage, args.model, work / "data" / STAGES[stage][0], work / stage / name.replace(" ", "-"),
                                args.steps, one_row, plan.twin_layers)
                    runs[name].append(run)
                    print(f"{stage}, {name}: {run['seconds_per_step']:.2f} s/step, loss {run['loss']:.4f}", flush=True)
            mean = {name: statistics.fmean(r["seconds_per_step"] for r in rows) for name, rows in runs.items()}
            result[stage] = {"runs": runs, "seconds_per_step": mean, "speedup": mean["two rows"] / mean["one row"]}
            print(f"{stage}: one row per pair {result[stage]['speedup']:.2f}x the steps per second of two rows", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
