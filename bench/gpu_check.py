"""The CUDA-only checks and measurements, in one call on a lent GPU machine (run it through
bench/gpu_check.sh, which installs the wheels it carries first). Writes bench/results/gpu.json.

    python bench/gpu_check.py             # on a CUDA GPU: SmolLM2-shaped model, at most ~9 minutes
    python bench/gpu_check.py --dry-run   # on a CPU: the same stages on the tiny model (CI runs this)

Checks, in order of importance (each recorded as ok / failed with its error line / skipped when
the time budget is spent), every one an `align` process as a user would run it:
  1. sft -> rm -> ppo, and dpo, in `auto` precision (bf16 compute on Ampere and newer, a bf16 frozen
     base under LoRA), and PPO full fine-tuning in `auto` (float32 master weights: its KL must move)
  2. the stages added since the first GPU run (which passed 3 to 5): a PRM trained on sibling
     steps, one row per pair (custom attention masks on CUDA) in auto precision and under QLoRA,
     scoring best-of-n and PPO's dense step rewards, its pairwise eval, label-steps' rollouts from
     step prefixes, and merging a reward model's adapter (its head kept, on the host)
  3. QLoRA PPO (bitsandbytes 4-bit base, 4-bit reward model)
  4. the fp16 path, forced as on a T4: float32 weights + fp16 autocast + GradScaler (full
     fine-tuning), float16 base + fp16 (LoRA), and the refused cell (float16 full fine-tuning)
  5. align ppo against TRL 1.5's PPOTrainer, matched (full fine-tuning in bfloat16 weights as the runner
     loads TRL's, one epoch and mini-batch):
     episodes/s and torch.cuda.max_memory_allocated, and the MFU of align's PPO update
  6. scale: PPO with LoRA on a 1.7B-shaped model (SmolLM2-1.7B's config)
Quality is measured on the CPU (the real SmolLM2 weights are too big to carry); here the weights
are random, built from SmolLM2's config with its real tokenizer, so speed and memory are real.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT / "recipes" / "data"
CARRY = HERE / ".gpu-carry"
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0}  # dense, per GPU
LARGE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32)


def build_model(out: Path, dry_run: bool, shape: dict | None = None) -> Path:
    """A SmolLM2-shaped random model with SmolLM2's tokenizer (carried), or the tiny model (dry run)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from align.models import ensure_builtin

    if dry_run:
        return ensure_builtin("tiny")
    if (out / "config.json").exists():
        return out
    carried = CARRY / "smollm2"
    tokenizer = AutoTokenizer.from_pretrained(carried if carried.is_dir() else ensure_builtin("tiny"))
    config = LlamaConfig.from_pretrained(carried) if carried.is_dir() else LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048)
    for key, value in (shape or {}).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class Checks:
    def __init__(self, work: Path, budget: float, dry_run: bool, out: Path):
        self.work, self.deadline, self.dry_run, self.out = work, time.monotonic() + budget, dry_run, out
        self.started = time.monotonic()
        self.results: dict[str, dict] = {}

    def write(self) -> None:
        """The report so far, rewritten after every check: a run cut off by its time limit keeps what it measured."""
        import torch

        report = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": __import__("transformers").__version__,
            "seconds": round(time.monotonic() - self.started, 1), "checks": self.results,
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(report, indent=2) + "\n")

    def align(self, name: str, *args, expect: int = 0, suffix: str = "") -> dict:
        """Run `align ARGS`; record exit code, wall time and the output's manifest metrics. The output
        is WORK/NAME, a directory, or a file with `suffix` (eval's .json, label-steps' .jsonl)."""
        if time.monotonic() > self.deadline:
            self.results[name] = {"status": "skipped", "why": "time budget spent"}
            return self.results[name]
        out = self.work / (name + suffix)
        command = [sys.executable, "-m", "align", "-q", *map(str, args), "-o", str(out), "--overwrite"]
        started = time.monotonic()
        run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        record = {"seconds": round(time.monotonic() - started, 1), "exit_code": run.returncode, "command": " ".join(command[3:])}
        errors = [line for line in run.stderr.splitlines() if line.strip()]
        if run.returncode != expect:
            record.update(status="failed", error=errors[-1] if errors else "", stderr_tail=run.stderr[-1500:])
        else:
            record["status"] = "ok"
            if expect:
                record["refused_with"] = errors[-1] if errors else ""
            manifest = out.with_name(out.name + ".align.json") if suffix else out / "align.json"
            if manifest.is_file():
                metrics = json.loads(manifest.read_text())["metrics"]
                record["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                record["finite"] = all(math.isfinite(v) for v in record["metrics"].values())
            updates = out / "metrics.jsonl"
            if name.startswith("ppo") and updates.is_file():  # does the policy move? (full fine-tuning in bf16 barely did)
                rows = [json.loads(line) for line in updates.read_text().splitlines()]
                record["kl_per_update"] = [float(f"{r['kl']:.4g}") for r in rows if "kl" in r]
        self.results[name] = record
        self.write()
        print(f"{name}: {record['status']} ({record['seconds']} s)", flush=True)
        return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU with the tiny model (no CUDA checks)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; checks left when it is spent are skipped")
    parser.add_argument("--out", type=Path, help="default: bench/results/gpu.json (a dry run: bench/.work/gpu-dry-run.json)")
    parser.add_argument("--work", type=Path, default=HERE / ".work" / "gpu")
    args = parser.parse_args()
    args.out = args.out or (HERE / ".work" / "gpu-dry-run.json" if args.dry_run else HERE / "results" / "gpu.json")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here; use --dry-run on a CPU")
    args.work.mkdir(parents=True, exist_ok=True)
    checks = Checks(args.work, args.budget, args.dry_run, args.out)
    model = build_model(args.work / "smollm2-shaped", args.dry_run)
    small = ["--max-steps", "2"] if args.dry_run else ["--max-steps", "8"]
    episodes = ["--episodes", "16", "--batch-size", "8"] if args.dry_run else ["--episodes", "64", "--batch-size", "16"]
    ppo = ["-p", DATA / "ppo_prompts.jsonl", *episodes, "--max-new-tokens", "8" if args.dry_run else "32", "--ppo-epochs", "1"]

    # 1. the pipeline in auto precision
    checks.align("sft_auto", "sft", "-m", model, "-d", DATA / "sft.jsonl", *small)
    checks.align("rm_auto", "rm", "-m", model, "-d", DATA / "pairs.jsonl", *small)
    reward = args.work / "rm_auto"
    checks.align("ppo_auto", "ppo", "-m", args.work / "sft_auto", "--reward-model", reward, *ppo)
    checks.align("dpo_auto", "dpo", "-m", model, "-d", DATA / "pairs.jsonl", *small)
    checks.align("ppo_full_auto", "ppo", "-m", model, "--reward-model", reward, *ppo, "--no-lora")
    # 2. never run on a GPU before (the first run passed 3-5): process reward models, best-of-n, label-steps and merge
    steps = sibling_steps(args.work / "steps.jsonl")
    checks.align("prm_pairwise_auto", "prm", "-m", model, "-d", steps, "--pairwise", *small)
    checks.align("prm_pairwise_qlora", "prm", "-m", model, "-d", steps, "--pairwise", "--qlora", *small)
    prm = args.work / "prm_pairwise_auto"
    checks.align("eval_prm_pairs", "eval", "-m", prm, "--pairs", steps, suffix=".json")
    checks.align("best_of_n_prm", "best-of-n", "-m", args.work / "sft_auto", "-p", DATA / "ppo_prompts.jsonl", "--reward-model",
                 prm, "-n", "4", "--max-new-tokens", "8" if args.dry_run else "32")
    checks.align("ppo_dense_prm", "ppo", "-m", args.work / "sft_auto", "--reward-model", prm, *ppo)
    checks.align("label_steps", "label-steps", "--policy", args.work / "sft_auto", "--prompts", steps, "--answer-fn",
                 f"{HERE / 'gpu_scorers.py'}:ends_with_digit", "--rollouts", "2", "--max-new-tokens", "16", suffix=".jsonl")
    checks.align("merge_rm", "merge", "-m", reward)
    # 3. QLoRA
    checks.align("ppo_qlora", "ppo", "-m", model, "--reward-model", reward, *ppo, "--qlora", "--set", "ppo.reward_in_4bit=true")
    # 4. the fp16 path, as a T4 user meets it
    checks.align("sft_fp16_full", "sft", "-m", model, "-d", DATA / "sft.jsonl", *small, "--no-lora",
                 "--set", "model.dtype=float32", "--set", "train.precision=fp16")
    checks.align("ppo_fp16_full", "ppo", "-m", model, "--reward-model", reward, *ppo, "--no-lora",
                 "--set", "model.dtype=float32", "--set", "train.precision=fp16")
    checks.align("ppo_fp16_lora", "ppo", "-m", model, "--reward-model", reward, *ppo,
                 "--set", "model.dtype=float16", "--set", "train.precision=fp16")
    checks.align("sft_fp16_weights_full_refused", "sft", "-m", model, "-d", DATA / "sft.jsonl", *small, "--no-lora",
                 "--set", "model.dtype=float16", expect=2)
    # 5. against TRL 1.5, matched, and the MFU of align's update (the peer needs the carried TRL)
    compare_with_trl(checks, model, reward, args.work, with_trl=not args.dry_run)
    if not args.dry_run:  # 6. scale
        large = build_model(args.work / "large-shaped", False, LARGE)
        checks.align("ppo_1.7b_lora", "ppo", "-m", large, "--reward-fn", f"{HERE / 'gpu_scorers.py'}:length", *ppo)

    checks.write()
    failed = [name for name, r in checks.results.items() if r["status"] == "failed"]
    print(f"gpu_check: {len(checks.results) - len(failed)} of {len(checks.results)} ok; wrote {args.out}")
    if failed:
        print("failed: " + ", ".join(f"{n} ({checks.results[n]['error']})" for n in failed))
        sys.exit(1)


def sibling_steps(path: Path) -> Path:
    """Stepwise rows in pairs of siblings: one problem solved right, and again with its first step
    off by one (labelled wrong), so `align prm --pairwise` has sibling steps to rank."""
    rows = []
    for n in range(32):
        rows.append({"prompt": f"Add 2 to {n}, then double it.", "completions": [f"{n} + 2 = {n + 2}", f"{n + 2} * 2 = {2 * n + 4}"],
                     "labels": [True, True]})
        rows.append({"prompt": f"Add 2 to {n}, then double it.", "completions": [f"{n} + 2 = {n + 3}", f"{n + 3} * 2 = {2 * n + 6}"],
                     "labels": [False, True]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def compare_with_trl(checks: Checks, model: Path, reward: Path, work: Path, with_trl: bool) -> None:
    """align --no-lora against TRL 1.5's PPOTrainer, both bf16 on the GPU, the same batch and lengths."""
    matched = checks.align("ppo_matched", "ppo", "-m", model, "--reward-model", reward, "-p", DATA / "ppo_prompts.jsonl",
                           "--no-lora", "--episodes", "64", "--batch-size", "16", "--mini-batches", "1", "--ppo-epochs", "1",
                           "--micro-batch-size", "16", "--max-new-tokens", "32", "--seed", "0",
                           "--set", "train.save_steps=100000", "--set", "ppo.sample_every=100000",
                           # TRL's runner loads bfloat16 weights on a GPU (full fine-tuning, no master weights)
                           *(["--set", "model.dtype=bfloat16"] if with_trl else []))
    rows = [json.loads(line) for line in (work / "ppo_matched" / "metrics.jsonl").read_text().splitlines()] \
        if matched["status"] == "ok" else []
    rows = [r for r in rows if "time_train" in r]
    if rows:
        seconds = sum(r["time_generate"] + r["time_score"] + r["time_train"] for r in rows)
        matched["episodes_per_second"] = round(64 / seconds, 3)
        matched["mfu_update"] = update_mfu(model, rows)
    trl_path = CARRY / "trl-1.5.0"
    if not with_trl:
        return
    if not trl_path.is_dir():
        checks.results["trl_matched"] = {"status": "skipped", "why": f"{trl_path} missing (bash bench/gpu_check.sh --prepare)"}
        return
    env = {**os.environ, "PYTHONPATH": f"{trl_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, str(HERE / "trl_ppo_runner.py"), str(model), str(reward), str(DATA / "ppo_prompts.jsonl"),
               "64", "16", "32", str(work / "trl-out")]
    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    record = {"seconds": round(time.monotonic() - started, 1), "status": "ok" if run.returncode == 0 else "failed"}
    if run.returncode:
        record["error"] = (run.stderr.strip().splitlines() or [""])[-1]
    else:
        bench = json.loads(next(l for l in run.stdout.splitlines() if l.startswith("BENCH "))[6:])
        record.update(bench, episodes_per_second=round(bench["episodes"] / bench["train_seconds"], 3))
        if "episodes_per_second" in matched:
            record["align_speedup"] = round(matched["episodes_per_second"] / record["episodes_per_second"], 2)
            record["align_memory_ratio"] = round(matched["metrics"]["peak_memory_mb"] / bench["peak_memory_mb"], 2)
    checks.results["trl_matched"] = record


def update_mfu(model: Path, rows: list[dict]) -> dict:
    """Model FLOPs utilisation of PPO's training phase: policy and value forward+backward (6 N per
    token each) over prompt + response tokens, against the GPU's dense bf16 peak."""
    import torch
    from transformers import AutoConfig

    from align.generation import prompt_ids
    from align.models import load_tokenizer
    from align.config import ModelSpec

    config = AutoConfig.from_pretrained(model)
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    params = layers * (4 * hidden * hidden * (1 + config.num_key_value_heads / config.num_attention_heads) / 2
                       + 3 * hidden * config.intermediate_size) + vocab * hidden
    tokenizer = load_tokenizer(ModelSpec(path=str(model)), str(model))
    prompts = [json.loads(line)["prompt"] for line in (DATA / "ppo_prompts.jsonl").read_text().splitlines()]
    prompt_tokens = sum(len(prompt_ids(tokenizer, p, True)) for p in prompts) / len(prompts)
    tokens = 16 * (prompt_tokens + sum(r["response_length"] for r in rows) / len(rows))
    flops = 2 * 6 * params * tokens  # policy + value, one epoch, one mini-batch
    seconds = sum(r["time_train"] for r in rows) / len(rows)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    achieved = flops / seconds / 1e12
    return {"train_tflops": round(achieved, 2), "peak_tflops": peak, "mfu": round(achieved / peak, 4) if peak else None,
            "params": int(params), "tokens_per_update": round(tokens)}


if __name__ == "__main__":
    main()
