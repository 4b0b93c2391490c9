"""Runs TRL 1.5.0's PPOTrainer (trl.experimental.ppo) once and prints its timing as JSON.

Executed by bench/ppo_vs_trl.py inside a throw-away venv that has trl==1.5.0; it does not
import align. Usage: python trl_ppo_runner.py POLICY REWARD PROMPTS.jsonl EPISODES BATCH LENGTH OUT
"""

import json
import resource
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.experimental.ppo import PPOConfig, PPOTrainer


def main() -> None:
    policy_path, reward_path, prompts_path, episodes, batch, length, out = sys.argv[1:8]
    episodes, batch, length = int(episodes), int(batch), int(length)
    bf16 = torch.cuda.is_available() or sys.argv[8:] == ["bf16"]
    tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in open(prompts_path)]
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False)
           for p in prompts]
    dataset = Dataset.from_dict({"input_ids": ids})
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, dtype=dtype)
    args = PPOConfig(
        output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_mini_batches=1,
        num_ppo_epochs=1, total_episodes=episodes, response_length=length, local_rollout_forward_batch_size=batch,
        temperature=0.7, stop_token="eos", learning_rate=1e-5, report_to=[], save_strategy="no", num_sample_generations=0,
        use_cpu=not torch.cuda.is_available(), bf16=bf16, logging_steps=1, seed=0,
    )
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference, reward_model=reward,
                         train_dataset=dataset, value_model=value)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCH " + json.dumps({"train_seconds": seconds, "episodes": episodes, "peak_memory_mb": peak}))


if __name__ == "__main__":
    main()
