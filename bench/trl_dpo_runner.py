"""Stock TRL DPOTrainer on a pairs file, as a new user would run it; prints one BENCH line.

    python bench/trl_dpo_runner.py MODEL PAIRS STEPS BATCH LR MAX_LENGTH OUT

LoRA r16 alpha 32 on all linear layers; every other setting is TRL's own default (gradient
checkpointing on, bf16 autocast where the device has it). Run by bench/dpo_vs_trl.py.
"""

import json
import sys
import time

started = time.time()

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

model_path, pairs, steps, batch, lr, max_length, out = sys.argv[1:8]
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
data = load_dataset("json", data_files=pairs, split="train").select_columns(["prompt", "chosen", "rejected"])
if tokenizer.chat_template:  # as align reads plain pairs with a chat model: user turn, then assistant turns
    data = data.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}],
                                 "chosen": [{"role": "assistant", "content": row["chosen"]}],
                                 "rejected": [{"role": "assistant", "content": row["rejected"]}]})
args = DPOConfig(
    output_dir=out, max_steps=int(steps), per_device_train_batch_size=int(batch), learning_rate=float(lr),
    max_length=int(max_length), logging_steps=1, save_strategy="no", report_to=[], seed=42, data_seed=42,
    use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
)
trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                     peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05, task_type="CAUSAL_LM"))
loaded = time.time()
trainer.train()
trained = time.time()
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
tokens = [entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry]
print("BENCH " + json.dumps({"train_seconds": trained - loaded, "load_seconds": loaded - started, "losses": losses, "num_tokens": tokens,
                             "bf16": bool(args.bf16), "gradient_checkpointing": bool(args.gradient_checkpointing)}))
