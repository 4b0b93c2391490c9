"""Every training stage x {LoRA, QLoRA, full fine-tuning} for a few steps on a built-in model.

    python bench/stage_matrix.py                       # SmolLM2-135M-Instruct
    python bench/stage_matrix.py --model tiny --steps 2

For each run: exit status, wall seconds (process, including model loading), peak RSS, and
whether the output loads with transformers. Uses the bundled recipes/data files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "recipes" / "data"
MODES = {"lora": [], "qlora": ["--qlora"], "full": ["--no-lora"]}


def stage_args(stage: str, model: str, out: Path, steps: int, rm: Path) -> list[str]:
    if stage == "sft":
        return ["sft", "-m", model, "-d", str(DATA / "sft.jsonl"), "--max-steps", str(steps), "--batch-size", "2"]
    if stage in ("rm", "dpo"):
        return [stage, "-m", model, "-d", str(DATA / "pairs.jsonl"), "--max-steps", str(steps), "--batch-size", "2"]
    return ["ppo", "-m", model, "--reward-model", str(rm), "-p", str(DATA / "ppo_prompts.jsonl"), "--episodes", str(4 * steps),
            "--batch-size", "4", "--mini-batches", "2", "--max-new-tokens", "16"]


def run(command: list[str]) -> tuple[int, float, float, str]:
    started = time.time()
    process = subprocess.Popen([sys.executable, "-m", "align", "-q", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    err = process.stderr.read()
    return os.waitstatus_to_exitcode(status), time.time() - started, usage.ru_maxrss / 1024, err.strip().splitlines()[-1:] and err.strip().splitlines()[-1] or ""


def loads(out: Path, stage: str) -> bool:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    try:
        auto.from_pretrained(out)
        return (out / "align.json").is_file()
    except Exception:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--stages", nargs="+", default=["sft", "rm", "dpo", "ppo"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="align-matrix-"))
    print(f"{'stage':6} {'mode':6} {'exit':>4} {'seconds':>8} {'peak MB':>8}  loads")
    for stage in args.stages:
        for mode, flags in MODES.items():
            out = work / f"{stage}-{mode}"
            command = stage_args(stage, args.model, out, args.steps, work / "rm-lora") + ["-o", str(out), *flags]
            code, seconds, peak, last = run(command)
            print(f"{stage:6} {mode:6} {code:4d} {seconds:8.1f} {peak:8.0f}  {loads(out, stage) if code == 0 else last}", flush=True)


if __name__ == "__main__":
    main()
