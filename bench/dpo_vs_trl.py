"""align dpo vs stock TRL DPOTrainer (the version align installs), side by side.

    python bench/dpo_vs_trl.py                         # SmolLM2-135M-Instruct, 24 steps, twice each
    python bench/dpo_vs_trl.py --model tiny --steps 4 --runs 1

The same model, pairs (recipes/data/pairs.jsonl), steps, batch (8 pairs), learning rate, beta and
LoRA (r16, alpha 32, all linear layers). TRL runs as it ships (gradient checkpointing on, bf16
autocast: accelerate turns it on for every CPU, so on a CPU without bf16 units (no AMX or
AVX512-BF16) TRL emulates bf16 and takes several times longer; the bench says so when it
starts); align with its defaults (fp32 on such a CPU). Each run is a whole process, one at
a time; wall time is the process's, train time the training loop's, peak memory the process's
peak RSS (os.wait4). Both loss curves are printed: the objective is the same, so they must
agree within bf16 noise. Results: bench/results/dpo_vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from align.checkpoints import METRICS, read_records
from align.precision import cpu_bf16_units, describe_cpu

HERE = Path(__file__).resolve().parent
PAIRS = HERE.parent / "recipes" / "data" / "pairs.jsonl"


def run_process(command: list[str]) -> tuple[str, float, float]:
    """Run a whole process; its stdout, wall seconds and its own peak RSS in MB."""
    import tempfile

    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.time()
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.time() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        if child.returncode:
            sys.exit(f"{' '.join(command[:5])} failed:\n{stderr.read()[-3000:]}")
        return stdout.read(), wall, usage.ru_maxrss / 1024


def run_trl(model: Path, args, out: Path) -> dict:
    stdout, wall, peak = run_process([sys.executable, str(HERE / "trl_dpo_runner.py"), str(model), str(PAIRS), str(args.steps),
                                      str(args.batch_size), str(args.lr), str(args.max_length), str(out)])
    result = json.loads(next(l for l in stdout.splitlines() if l.startswith("BENCH "))[len("BENCH "):])
    return result | {"wall_seconds": wall, "peak_memory_mb": peak}


def run_align(model: Path, args, out: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "align", "-q", "dpo", "-m", str(model), "-d", str(PAIRS), "-o", str(out), "--overwrite",
               "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
               "--max-length", str(args.max_length), "--save-steps", "100000", "--seed", "42", *extra]
    _, wall, peak = run_process(command)
    rows = list(read_records(out / METRICS))
    losses = [r["loss"] for r in rows if "loss" in r and "train_runtime" not in r]
    tokens = [r["num_tokens"] for r in rows if "num_tokens" in r]
    runtime = next(r["train_runtime"] for r in rows if "train_runtime" in r)
    return {"train_seconds": runtime, "wall_seconds": wall, "peak_memory_mb": peak, "losses": losses, "num_tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--runs", type=int, default=2, help="runs of each, alternating, to show the noise")
    parser.add_argument("--align-args", default="", help="extra align dpo flags, e.g. '--precision fp32'")
    parser.add_argument("--work", type=Path, default=HERE / ".work" / "dpo_vs_trl")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "dpo_vs_trl.json")
    args = parser.parse_args()
    from align.models import ensure_builtin

    model = ensure_builtin(args.model)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else describe_cpu()
    if not torch.cuda.is_available() and not cpu_bf16_units():
        print("note: this CPU has no bf16 units (AMX, AVX512-BF16): stock TRL's bf16 autocast is emulated here and "
              "runs several times slower; align's auto precision is fp32", file=sys.stderr)
    runs = []
    for i in range(args.runs):
        trl = run_trl(model, args, args.work / f"trl-{i}")
        ours = run_align(model, args, args.work / f"align-{i}", args.align_args.split())
        runs.append({"trl": trl, "align": ours, "speedup_wall": trl["wall_seconds"] / ours["wall_seconds"],
                     "speedup_train": trl["train_seconds"] / ours["train_seconds"],
                     "memory_ratio": ours["peak_memory_mb"] / trl["peak_memory_mb"]})
        print(f"run {i + 1}: TRL {trl['wall_seconds']:.0f} s wall ({trl['train_seconds']:.0f} s training), {trl['peak_memory_mb']:.0f} MB peak; "
              f"align {ours['wall_seconds']:.0f} s wall ({ours['train_seconds']:.0f} s training), {ours['peak_memory_mb']:.0f} MB peak; "
              f"speed-up {runs[-1]['speedup_wall']:.2f}x wall, {runs[-1]['speedup_train']:.2f}x training; memory {runs[-1]['memory_ratio']:.2f}x TRL's",
              flush=True)
    print("loss per step (last run):")
    print("  step " + " ".join(f"{s + 1:6d}" for s in range(args.steps)))
    print("  TRL  " + " ".join(f"{x:6.3f}" for x in runs[-1]["trl"]["losses"]))
    print("  align" + " ".join(f"{x:6.3f}" for x in runs[-1]["align"]["losses"]))
    same_tokens = runs[-1]["trl"]["num_tokens"] == runs[-1]["align"]["num_tokens"]
    print(f"  tokens read per step: {'the same' if same_tokens else 'DIFFERENT'} for both")
    gap = max(abs(a - b) for a, b in zip(runs[-1]["trl"]["losses"], runs[-1]["align"]["losses"]))
    print(f"  largest gap between the curves: {gap:.4f}")
    result = {"device": device, "torch": torch.__version__, "settings": {k: str(v) for k, v in vars(args).items()},
              "runs": runs, "largest_loss_gap": gap, "same_tokens": same_tokens}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
