"""align ppo vs TRL's last PPO trainer (trl 1.5.0, trl.experimental.ppo), side by side.

    python bench/ppo_vs_trl.py                      # tiny model and SmolLM2-135M
    python bench/ppo_vs_trl.py --models tiny --episodes 64
    python bench/ppo_vs_trl.py --models smollm2-135m-instruct --only trl full --runs 2
    .venv-vllm/bin/python bench/ppo_vs_trl.py --models smollm2-135m-instruct --only trl full full_vllm

Matched settings for both: the same policy, reward model (also the value model's start),
prompts, rollout batch, response length and temperature; one PPO epoch, one mini-batch, full
fine-tuning, float32, one forward/backward pass over the whole batch. align additionally runs in
its default LoRA mode (one shared base, micro-batches of 4 rows) for memory, and with the value
head on the policy's own trunk (--value-head-on-policy: one model fewer, so not matched), and where
vLLM is installed with its rollouts sampled by a vLLM engine (`full_vllm`, `full_bf16_vllm`: the
training matched). Both also run with bf16 compute (align: train.precision=bf16; TRL: bf16=True,
which autocasts its training forward pass only): the faster setting on a CPU with AVX512-BF16 or
AMX. On a GPU both always load bf16 weights and compute in bf16, so the float32 and bf16 rows
measure the same thing there.
The `floor` row (CPU, float32) does the same updates' unskippable work in plain torch, with no
trainer (bench/ppo_floor.py: a cached decode loop, one pass of each model, one AdamW step):
what doing the work costs on this machine, against which both trainers' overheads show.
TRL is installed into its own throw-away venv (bench/.venv-trl-1.5.0) with this environment's
torch and transformers versions, so only the trainer differs. Each run is a separate process;
episodes/s counts training wall time only (model loading excluded), peak memory is the
process's peak RSS on CPU or torch's peak allocation on GPU. Results: bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import median

import torch
import transformers

from align.checkpoints import METRICS, read_manifest, read_records
from align.precision import cpu_bf16_units, describe_cpu

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPTS = ROOT / "recipes" / "data" / "ppo_prompts.jsonl"


def trl_venv(path: Path) -> Path:
    python = path / "bin" / "python"
    if not (path / ".ready").exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        pins = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}", "trl==1.5.0", "accelerate", "datasets"]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
        (path / ".ready").write_text("ok\n")
    return python


def prepare(model: str, work: Path) -> tuple[Path, Path]:
    """The policy checkpoint, and a reward model made from it (random score head, seeded)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.models import ensure_builtin

    policy = ensure_builtin(model)
    reward = work / f"{model}-reward"
    if not (reward / "config.json").exists():
        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(policy)
        AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, pad_token_id=tokenizer.pad_token_id).save_pretrained(reward)
        tokenizer.save_pretrained(reward)
    return policy, reward


def run_trl(python: Path, policy: Path, reward: Path, args, work: Path, bf16: bool = False) -> dict:
    command = [str(python), str(HERE / "trl_ppo_runner.py"), str(policy), str(reward), str(PROMPTS),
               str(args.episodes), str(args.batch_size), str(args.response_length), str(work / "trl-out"), *(["bf16"] if bf16 else [])]
    return bench_line(subprocess.run(command, capture_output=True, text=True), "TRL")


def bench_line(result: subprocess.CompletedProcess, what: str) -> dict:
    """The `BENCH {json}` line a runner prints (bench/trl_ppo_runner.py, bench/ppo_floor.py)."""
    if result.returncode:
        sys.exit(f"{what} run failed:\n{result.stderr[-3000:]}")
    line = next(l for l in result.stdout.splitlines() if l.startswith("BENCH "))
    return json.loads(line[len("BENCH "):])


def run_align(policy: Path, reward: Path, args, work: Path, lora: bool, precision: str = "fp32", micro_batch: int | None = None,
              extra: list[str] = ()) -> dict:
    """One `align ppo` run; micro_batch None keeps align's default (ppo.micro_batch_size)."""
    out = work / f"align-{'lora' if lora else 'full'}-{precision}-{micro_batch or 'default'}{''.join(extra)}"
    command = [sys.executable, "-m", "align", "-q", "ppo", "-m", str(policy), "--reward-model", str(reward),
               "-p", str(PROMPTS), "-o", str(out), "--overwrite", "--episodes", str(args.episodes),
               "--batch-size", str(args.batch_size), "--mini-batches", "1", "--ppo-epochs", "1",
               "--max-new-tokens", str(args.response_length), "--temperature", "0.7", "--lr", "1e-5",
               "--set", "train.save_steps=100000", "--set", "ppo.sample_every=100000", "--seed", "0",
               "--set", f"train.precision={precision}"]
    if not lora:
        command.append("--no-lora")
    if micro_batch:
        command += ["--micro-batch-size", str(micro_batch)]
    command += extra
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"align run failed:\n{result.stderr[-3000:]}")
    rows = [r for r in read_records(out / METRICS) if "time_train" in r]
    phases = {phase: sum(r[f"time_{phase}"] for r in rows) for phase in ("generate", "score", "train")}
    manifest = read_manifest(out)
    return {"train_seconds": sum(phases.values()), "episodes": args.episodes, "phases": phases,
            "peak_memory_mb": manifest["metrics"]["peak_memory_mb"],
            "mean_response_length": sum(r["response_length"] for r in rows) / len(rows)}


RUNS = {"trl": "TRL 1.5.0 PPOTrainer", "full": "align ppo --no-lora", "lora": "align ppo (LoRA)",
        "on_policy": "align, value on policy", "trl_bf16": "TRL 1.5.0, bf16", "full_bf16": "align --no-lora, bf16",
        "full_vllm": "align --no-lora --engine vllm", "full_bf16_vllm": "align --no-lora, bf16, --engine vllm", "floor": "plain torch, the work only"}
# Sampling on a vLLM engine (eager: its start-up, like model loading, is outside the timed loop) with
# the same matched training; needs vLLM (run this script with .venv-vllm/bin/python).
VLLM = ["--engine", "vllm", "--set", "generation.eager=true", "--set", "generation.kv_cache_gb=1"]


def run_floor(policy: Path, reward: Path, args) -> dict:
    """The matched update's unskippable work in plain torch (bench/ppo_floor.py), in this environment."""
    command = [sys.executable, str(HERE / "ppo_floor.py"), str(policy), str(reward), str(PROMPTS), str(args.episodes),
               str(args.batch_size), str(args.response_length)]
    # glibc keeps freed memory, as align does (align/memory.py): with its default (freed blocks of
    # 128 KB and more handed back, then faulted in again) the same work took 1.12x align's time.
    keep = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
    return bench_line(subprocess.run(command, capture_output=True, text=True, env={**os.environ, **keep}), "floor")


def run_setting(name: str, python: Path, policy: Path, reward: Path, args, work: Path) -> dict:
    bf16 = "_bf16" in name
    if name == "floor":
        return run_floor(policy, reward, args)
    if name.startswith("trl"):
        return run_trl(python, policy, reward, args, work, bf16=bf16)
    # Matched ("full"): like TRL here (gradient_accumulation_steps=1), one forward/backward over the
    # whole batch. "lora" keeps align's defaults (LoRA, micro-batches of ppo.micro_batch_size).
    # "on_policy": "full" with the value head on the policy's trunk (one model fewer: not matched).
    return run_align(policy, reward, args, work, lora=name == "lora", precision="bf16" if bf16 else "fp32",
                     micro_batch=None if name == "lora" else args.batch_size,
                     extra=VLLM if name.endswith("_vllm") else ["--value-head-on-policy"] if name == "on_policy" else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m-instruct"])
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2, help="times each setting runs (interleaved), to show the noise")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these settings (default: all; the bf16 "
                        "rows only where the device has bf16 units)")
    parser.add_argument("--venv", type=Path, default=HERE / ".venv-trl-1.5.0")
    parser.add_argument("--work", type=Path, default=HERE / ".work")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ppo_vs_trl.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    python = trl_venv(args.venv)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else describe_cpu()
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    names = args.only or [n for n in RUNS if ("_bf16" not in n or (not cuda and cpu_bf16_units()))
                          and (not n.endswith("_vllm") or has_vllm) and (n != "floor" or not cuda)]
    if not args.only and not cuda and not cpu_bf16_units():
        print("note: this CPU has no bf16 units (AVX512-BF16/AMX): the bf16 rows are skipped (both tools would emulate bf16)")
    results = {"device": device, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "models": {}}
    for model in args.models:
        policy, reward = prepare(model, args.work)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for _ in range(args.runs):  # interleaved, so a slow spell of the machine hits both tools
            for name in names:
                runs[name].append(run_setting(name, python, policy, reward, args, args.work / model))
        eps = {name: [r["episodes"] / r["train_seconds"] for r in rs] for name, rs in runs.items()}
        r = results["models"][model] = {"runs": runs, "episodes_per_second": eps}
        for ours, theirs in (("full", "trl"), ("lora", "trl"), ("on_policy", "trl"), ("full_bf16", "trl_bf16"), ("full_vllm", "trl"), ("full_bf16_vllm", "trl_bf16"),
                              ("floor", "trl"), ("full", "floor")):
            if ours in eps and theirs in eps:  # ratio of medians; each run's own ratio shows the noise
                r[f"speedup_{ours}_vs_{theirs}"] = median(eps[ours]) / median(eps[theirs])
                r[f"memory_{ours}_vs_{theirs}"] = median(x["peak_memory_mb"] for x in runs[ours]) / median(x["peak_memory_mb"] for x in runs[theirs])
        print(f"\n{model} on {device}: {args.episodes} episodes, batch {args.batch_size}, {args.response_length} new tokens, {args.runs} runs each")
        print(f"  {'':30} {'episodes/s (each run)':>24} {'peak MB':>9}  seconds: generate / score / train")
        for name in names:
            phases = ["   " + " / ".join(f"{x['phases'][k]:5.1f}" for k in ("generate", "score", "train")) if "phases" in x else "" for x in runs[name]]
            print(f"  {RUNS[name]:30} {'  '.join(f'{e:6.3f}' for e in eps[name]):>24} {median(x['peak_memory_mb'] for x in runs[name]):9.0f}"
                  f"  {' |'.join(p for p in phases if p)}")
        for key, value in r.items():
            if key.startswith(("speedup_", "memory_")):
                print(f"  {key}: {value:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
