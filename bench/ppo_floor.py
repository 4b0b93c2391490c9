"""The work one PPO update cannot skip, timed with plain torch and transformers (no trainer).

Run by bench/ppo_vs_trl.py (its `floor` setting) at the same shapes as the two trainers: full
fine-tuning, float32, one epoch, one mini-batch, one forward/backward pass over the batch, four
models (policy, reference, reward, value). Per update it does only what any PPO trainer must:

- generate: one prefill of the left-padded prompts, then one cached decode step per new token
  (output layer on the last position only), sampling at the temperature; no stopping early, no
  logits processors;
- reward: one forward pass of the reward model over prompt + response (no gradients);
- reference: one forward pass of the reference, output layer on the response positions only;
- value: one forward and backward pass of the value model (the value loss of the first
  mini-batch; its values are the old values, so no separate value forward is needed);
- policy: one forward and backward pass of the policy, output layer on the response positions
  only (the behaviour log-probs come from sampling in float32, so no separate policy forward);
- optimizer: one AdamW step over the policy's and the value model's weights.

Whatever a trainer spends beyond this sum is its own overhead; the sum bounds the speed-up any
trainer can have over another at these settings. Prints one `BENCH {json}` line like the
runners. Usage: python ppo_floor.py POLICY REWARD PROMPTS.jsonl EPISODES BATCH LENGTH
"""

from __future__ import annotations

import inspect
import json
import resource
import sys
import time
from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

TEMPERATURE = 0.7


class Clock:
    """Seconds per phase, summed over the run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, phase: str):
        clock = self

        class Phase:
            def __enter__(self):
                self.began = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[phase] += time.perf_counter() - self.began

        return Phase()


def left_padded(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False)
           for p in prompts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    return input_ids, mask


@torch.no_grad()
def generate(policy, input_ids: torch.Tensor, mask: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """Prefill, then one cached step per token; the sampled ids (B, length)."""
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = policy(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    # transformers 5.2x renamed past_key_values to cache, in the forward's arguments and its output alike
    name = "cache" if "cache" in inspect.signature(policy.forward).parameters else "past_key_values"
    cache, tokens = getattr(out, name), []
    for _ in range(length):
        probs = torch.softmax(out.logits[:, -1].float() / TEMPERATURE, -1)
        token = torch.multinomial(probs, 1, generator=generator)
        tokens.append(token)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
        positions = positions[:, -1:] + 1
        out = policy(input_ids=token, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                     **{name: cache})
    return torch.cat(tokens, 1)


def response_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    length = response.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                   logits_to_keep=length + 1).logits[:, :-1]
    return torch.log_softmax(logits.float() / TEMPERATURE, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)


def response_values(value, ids: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
    hidden = value.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).last_hidden_state
    return value.score(hidden[:, -length - 1:-1]).squeeze(-1)


def main() -> None:
    policy_path, reward_path, prompts_path, episodes, batch, length = sys.argv[1:7]
    episodes, batch, length = int(episodes), int(batch), int(length)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    prompts = [json.loads(line)["prompt"] for line in open(prompts_path)]
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).eval().requires_grad_(False)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, dtype=torch.float32).eval().requires_grad_(False)
    value = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, dtype=torch.float32)
    policy.eval(), value.eval()  # no dropout, as both trainers run them
    optimizer = torch.optim.AdamW([*policy.parameters(), *value.parameters()], lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    clock = Clock()
    started = time.perf_counter()
    for update in range(episodes // batch):
        picked = [prompts[(update * batch + i) % len(prompts)] for i in range(batch)]
        input_ids, prompt_mask = left_padded(tokenizer, picked)
        with clock("generate"):
            response = generate(policy, input_ids, prompt_mask, length, generator)
        ids = torch.cat([input_ids, response], 1)
        mask = torch.cat([prompt_mask, torch.ones_like(response)], 1)
        with clock("reward"), torch.no_grad():
            scores = reward(input_ids=ids, attention_mask=mask).logits[:, 0]
        with clock("reference"), torch.no_grad():
            ref = response_logprobs(reference, ids, mask, response)
        advantages = (scores[:, None] - ref).detach()  # any numbers: the arithmetic is what is timed
        with clock("value"):
            values = response_values(value, ids, mask, length)
            ((values - advantages) ** 2).mean().backward()
        with clock("policy"):
            logprobs = response_logprobs(policy, ids, mask, response)
            (-(torch.exp(logprobs - logprobs.detach()) * advantages).mean()).backward()
        with clock("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    phases = dict(clock.seconds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCH " + json.dumps({"train_seconds": seconds, "episodes": episodes, "peak_memory_mb": peak, "detail": phases,
                                 "phases": {"generate": phases["generate"],
                                            "score": phases["reward"] + phases["reference"] + phases["value"],
                                            "train": phases["policy"] + phases["optimizer"]}}))


if __name__ == "__main__":
    main()
