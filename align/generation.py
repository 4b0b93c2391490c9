"""Batched sampling with left padding, EOS truncation and reproducible seeds.

The only module that knows how text is sampled. Models are put in eval mode for sampling:
with gradient checkpointing on and the model in train mode, transformers 5.23 generates garbage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from align.config import SamplingSpec
from align.data import as_messages, render_ids


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finished: bool  # the model ended the response itself (emitted EOS)


def prompt_ids(tokenizer, prompt: Any, chat: bool) -> list[int]:
    """Token ids of a prompt, with the chat template's assistant header when `chat`."""
    if chat:
        return render_ids(tokenizer, as_messages(prompt, "user"), chat=True, generation_prompt=True)
    return render_ids(tokenizer, prompt, chat=False)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), padded on the left so generation continues each row."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


def truncate_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Tokens up to (not including) the first EOS, and whether an EOS was found."""
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:index], True
    return tokens, False


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


@torch.no_grad()
def sample(model, tokenizer, prompts: list[Any], sampling: SamplingSpec, chat: bool, progress=None) -> list[list[Completion]]:
    """`sampling.num_samples` completions per prompt, in prompt order.

    Each batch is seeded from (seed, batch index), so a run is reproducible for a given batch size.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    requests = [(i, prompt_ids(tokenizer, p, chat)) for i, p in enumerate(prompts) for _ in range(sampling.num_samples)]
    results: list[list[Completion]] = [[] for _ in prompts]
    try:
        for batch_index, start in enumerate(range(0, len(requests), sampling.batch_size)):
            batch = requests[start:start + sampling.batch_size]
            input_ids, attention_mask = left_pad([ids for _, ids in batch], tokenizer.pad_token_id)
            torch.manual_seed(sampling.seed * 100_003 + batch_index)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sampling.temperature > 0,
                temperature=sampling.temperature if sampling.temperature > 0 else None,
                top_p=sampling.top_p if sampling.temperature > 0 else None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(eos_ids),
            )
            for (prompt_index, _), row in zip(batch, output[:, input_ids.shape[1]:].tolist()):
                tokens, finished = truncate_at_eos(row, eos_ids)
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                results[prompt_index].append(Completion(text, tokens, finished))
            if progress:
                progress(len(batch))
    finally:
        model.train(was_training)
    return results
