"""Sibling pairs in one row against two: `align prm --pairwise` with `share_prefix` on and off.

Each sibling pair (a solution and its twin, sharing the prompt and the steps before the one they
part at) runs either as one row, what the two share computed once (the default), or as TRL-style
two rows. The same data, steps, seed and settings as bench/arith.py's PRM (SmolLM2-135M, the last
10 of 30 blocks in full, batches of 8 pairs, lr 1e-4), the two runs alternated so that neither
gets the quieter machine; reported: seconds per step (the trainer's own train_runtime) and their
ratio, with the final losses (equal up to float rounding: tests/test_prm.py checks it exactly on
the tiny model).

    python bench/prm_pairs.py                      # bench/results/prm_pairs.json
    python bench/prm_pairs.py --model tiny --steps 2 --runs 1   # the smoke run
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


def train(model: str, data: Path, out: Path, steps: int, share: bool, layers: int) -> dict:
    command = [sys.executable, "-m", "align", "-q", "prm", "-m", model, "-d", str(data), "-o", str(out), "--pairwise",
               "--no-lora", "--trainable-layers", str(layers), "--lr", "1e-4", "--lr-scheduler", "constant",
               "--batch-size", "8", "--max-steps", str(steps), "--overwrite",
               "--set", "data.max_length=256", "--set", "data.eval_fraction=0", "--set", f"share_prefix={str(share).lower()}",
               "--set", f"train.save_steps={steps + 1}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"align prm failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    manifest = json.loads((out / "align.json").read_text())
    return {"seconds_per_step": manifest["metrics"]["train_runtime"] / steps, "loss": manifest["metrics"]["train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=arith.PLAN.model)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=2, help="runs of each, alternated")
    parser.add_argument("--out", default=str(HERE / "results" / "prm_pairs.json"))
    args = parser.parse_args()
    plan = arith.PLAN if args.model == arith.PLAN.model else replace(arith.SMOKE, model=args.model)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        arith.prepare_data(work, plan)  # the benchmark's twins: 2,400 pairs, each a stepwise row twice
        data = work / "data" / "twins_steps.jsonl"
        runs: dict[str, list[dict]] = {"one row": [], "two rows": []}
        for _ in range(args.runs):
            for name, share in (("one row", True), ("two rows", False)):
                runs[name].append(train(args.model, data, work / name.replace(" ", "-"), args.steps, share, plan.twin_layers))
                print(f"{name}: {runs[name][-1]['seconds_per_step']:.2f} s/step, loss {runs[name][-1]['loss']:.4f}", flush=True)
    mean = {name: statistics.fmean(r["seconds_per_step"] for r in rows) for name, rows in runs.items()}
    result = {"model": args.model, "steps": args.steps, "runs": runs, "seconds_per_step": mean,
              "speedup": mean["two rows"] / mean["one row"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"one row per sibling pair: {result['speedup']:.2f}x the steps per second of two rows ({args.out})")


if __name__ == "__main__":
    main()
