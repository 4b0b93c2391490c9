"""Sampling speed of the two engines, hf (transformers' generate) against vllm, on SmolLM2-135M-Instruct.

Run it where vLLM is installed (`make vllm-env`):

    .venv-vllm/bin/python bench/engines.py                 # -> bench/results/engines.json
    .venv-vllm/bin/python bench/engines.py --prompts 32    # a shorter run
    .venv-vllm/bin/python bench/engines.py --dtype bfloat16 --out bench/results/engines-bf16.json

Each arm runs in its own process, one after another (never side by side): the engine is built,
warmed up on one batch, then timed sampling `--prompts` prompts x `--tokens` new tokens at each
batch size. Tokens/s counts the tokens the samples really hold (a row that ends early counts
what it has), over the sampling time alone; start-up (vLLM's load, and its compilation unless
eager) is reported apart. Both engines sample at temperature 1 from the model's own distribution,
in the same dtype (`--dtype`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ARMS = {"hf": {}, "vllm-eager": {"eager": True}, "vllm": {"eager": False}}
PPO_ARMS = {"ppo-hf": ["--engine", "hf"], "ppo-vllm-eager": ["--engine", "vllm", "--set", "generation.eager=true"]}
OUT = Path(__file__).parent / "results" / "engines.json"


def arm(name: str, prompts: int, tokens: int, batches: list[int], dtype: str) -> dict:
    from align.config import EngineSpec, ModelSpec, SamplingSpec
    from align.engines import VLLMEngine
    from align.generation import sample_ids
    from align.models import load_model, load_tokenizer, resolve_model
    from align.precision import weights_dtype

    spec = ModelSpec(path="smollm2-135m-instruct", dtype=dtype)
    source = resolve_model(spec)
    tokenizer = load_tokenizer(spec, source, padding_side="left")
    inputs = [tokenizer.apply_chat_template([{"role": "user", "content": f"Write a short review of film number {i}."}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False) for i in range(prompts)]
    began = time.perf_counter()
    if name == "hf":
        sampler = load_model(spec, source).eval()
    else:
        sampler = VLLMEngine(source, EngineSpec(engine="vllm", kv_cache_gb=2, **ARMS[name]), dtype=weights_dtype(spec), seed=0)
    startup = time.perf_counter() - began
    sample_ids(sampler, tokenizer, inputs[:batches[0]], SamplingSpec(temperature=1.0, max_new_tokens=tokens, batch_size=batches[0]))
    rows = []
    for batch in batches:
        spec_b = SamplingSpec(temperature=1.0, max_new_tokens=tokens, batch_size=batch, seed=1)
        began = time.perf_counter()
        samples = sample_ids(sampler, tokenizer, inputs, spec_b)
        seconds = time.perf_counter() - began
        count = sum(len(c.token_ids) for cs in samples for c in cs)
        rows.append({"batch": batch, "tokens": count, "seconds": round(seconds, 2), "tokens_per_s": round(count / seconds, 1)})
        print(f"{name:>10}  batch {batch:>3}: {count} tokens in {seconds:.1f} s = {count / seconds:.1f} tokens/s", flush=True)
    return {"arm": name, "dtype": str(weights_dtype(spec)).removeprefix("torch."), "startup_s": round(startup, 1), "runs": rows}


def length_reward(prompts, completions, **_):
    """A reward PPO can chase cheaply (the bench measures sampling, not learning)."""
    return [min(len(c), 200) / 200 for c in completions]


def ppo_arm(name: str, updates: int, tokens: int, dtype: str) -> dict:
    """`align ppo` on SmolLM2 (LoRA, 16 rollouts an update): the generate phase of each update after
    the first. Both engines sample in PPO's compute precision (train.precision, from --dtype)."""
    import tempfile

    from align.precision import compute_dtype

    precision = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16"}[dtype]

    work = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write a short review of film number {i}."}) + "\n" for i in range(64)))
    command = [str(Path(sys.executable).parent / "align"), "-q", "ppo", "-m", "smollm2-135m-instruct", "-p", str(prompts),
               "-o", str(work / "ppo"), "--reward-fn", f"{__file__}:length_reward", "--batch-size", "16",
               "--episodes", str(16 * updates), "--max-new-tokens", str(tokens), "--temperature", "1.0",
               "--set", "generation.kv_cache_gb=2", "--set", f"train.precision={precision}", *PPO_ARMS[name]]
    began = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - began
    records = [json.loads(line) for line in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
    later = records[1:] or records
    generate = sum(r["time_generate"] for r in later) / len(later)
    length = sum(r["response_length"] for r in later) / len(later)
    row = {"arm": name, "dtype": str(compute_dtype(precision)).removeprefix("torch."), "wall_s": round(wall, 1), "updates": len(records), "generate_s": round(generate, 2),
           "tokens_per_s": round(16 * length / generate, 1),
           "engine_logprob_gap": [round(r.get("engine_logprob_gap", 0.0), 6) for r in records]}
    print(f"{name}: generate {generate:.2f} s an update ({row['tokens_per_s']} tokens/s), whole run {wall:.0f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--arms", default=",".join([*ARMS, *PPO_ARMS]))
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="both engines sample in this dtype (auto: what `align generate` uses, float32 on CPUs)")
    parser.add_argument("--updates", type=int, default=3, help="PPO updates per ppo arm")
    parser.add_argument("--out", type=Path, default=OUT, help="the results file (arms run before are kept in it)")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # run one arm in this process and print its JSON
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.arm:
        print("RESULT " + json.dumps(arm(args.arm, args.prompts, args.tokens, batches, args.dtype)))
        return
    results, ppo = [], []
    for name in args.arms.split(","):
        if name in PPO_ARMS:
            ppo.append(ppo_arm(name, args.updates, args.tokens, args.dtype))
            continue
        done = subprocess.run([sys.executable, __file__, "--arm", name, "--prompts", str(args.prompts), "--tokens",
                               str(args.tokens), "--batches", args.batches, "--dtype", args.dtype],
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{name}: failed\n{done.stderr[-2000:]}")
            continue
        results.append(json.loads(lines[-1][7:]))
        print(f"{name}: start-up {results[-1]['startup_s']} s; " + ", ".join(
            f"batch {r['batch']} {r['tokens_per_s']} tokens/s" for r in results[-1]["runs"]), flush=True)
    # Arms run before (a run of some arms only) are kept, those run now replace theirs.
    from align.precision import describe_cpu

    saved = json.loads(args.out.read_text()) if args.out.is_file() else {}
    ran = {r["arm"] for r in results + ppo}
    arms = [r for r in saved.get("arms", []) if r["arm"] not in ran] + results
    ppo = [r for r in saved.get("ppo", []) if r["arm"] not in ran] + ppo
    report(arms, ppo)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"machine": describe_cpu(), "prompts": args.prompts,
                               "tokens": args.tokens, "arms": arms, "ppo": ppo}, indent=2) + "\n")


def report(arms: list[dict], ppo: list[dict]) -> None:
    """Each vllm arm's tokens/s over the hf arm's (sampling at each batch size; PPO's generate phase)."""
    hf = next((r for r in arms if r["arm"] == "hf"), None)
    for result in arms:
        if hf and result is not hf:
            result["speedup_vs_hf"] = {str(r["batch"]): round(r["tokens_per_s"] / h["tokens_per_s"], 2)
                                       for r, h in zip(result["runs"], hf["runs"])}
            print(f"{result['arm']} / hf tokens/s: {result['speedup_vs_hf']}")
    ppo_hf = next((r for r in ppo if r["arm"] == "ppo-hf"), None)
    for result in ppo:
        if ppo_hf and result is not ppo_hf:
            result["speedup_vs_hf"] = round(result["tokens_per_s"] / ppo_hf["tokens_per_s"], 2)
            print(f"ppo generate phase, {result['arm']} / hf tokens/s: {result['speedup_vs_hf']}")


if __name__ == "__main__":
    main()
