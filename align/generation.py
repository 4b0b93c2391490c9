"""Batched sampling with left padding, EOS truncation and reproducible seeds; response log-probs.

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


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), padded on the left so generation continues each row."""
    width = max(len(s) for s in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, seq in enumerate(rows):
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


@dataclass
class Rollout:
    """Sampled responses with the behaviour policy's log-probs, straight from the generation pass.

    query (B, P) left-padded prompts; response (B, T) right-padded; masks mark real tokens. The
    response mask covers every token up to and including the first EOS.
    """

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor  # (B, T) log pi_old(token) under softmax(logits / temperature)
    finished: torch.Tensor  # (B,) bool: ended with EOS


@torch.no_grad()
def sample_rollout(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float, seeds: list[int]) -> Rollout:
    """Sample one response per prompt from softmax(logits / temperature), no top-k/top-p, so the
    log-probs of the sampled tokens (read from the same pass) are exactly PPO's behaviour log-probs.

    Row i's randomness comes from seeds[i] alone (see RowSeededSampler): a response does not depend
    on which other prompts share its batch, so a rollout is the same on one process or many.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    query, query_mask = left_pad(prompts, tokenizer.pad_token_id)
    sampler = RowSeededSampler(seeds, temperature)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids), pad_token_id=tokenizer.pad_token_id,
    )
    try:
        output = model.generate(
            input_ids=query.to(device), attention_mask=query_mask.to(device), generation_config=config,
            logits_processor=LogitsProcessorList([sampler]),
        )
    finally:
        model.train(was_training)
    response = output.cpu()[:, query.shape[1]:]  # (B, T)
    logprobs = torch.stack(sampler.logprobs, dim=1)[:, :response.shape[1]].cpu()
    if torch.isnan(logprobs).any():  # NaN logits: their noisy argmax is meaningless
        raise RuntimeError("probability tensor contains nan (the policy diverged)")
    is_eos = torch.isin(response, torch.tensor(sorted(eos_ids)))
    finished = is_eos.any(dim=1)
    # Tokens after the first EOS are padding: cumsum counts EOS seen strictly before each position.
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    response_mask = (before == 0).long()
    length = int(response_mask.sum(dim=1).max())
    response = response[:, :length].masked_fill(response_mask[:, :length] == 0, tokenizer.pad_token_id)
    return Rollout(query, query_mask, response, response_mask[:, :length], logprobs[:, :length] * response_mask[:, :length], finished)


class RowSeededSampler:
    """A logits processor that samples each row from softmax(logits / temperature) by the Gumbel-max
    trick, argmax(logits / T + G), with the Gumbel noise G drawn from the row's own generator; greedy
    decoding then picks exactly that sample. It records the sampled token's log-prob per step."""

    def __init__(self, seeds: list[int], temperature: float):
        self.seeds, self.temperature = seeds, temperature
        self.generators: list[torch.Generator] = []
        self.logprobs: list[torch.Tensor] = []  # one (B,) tensor per step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.generators:
            self.generators = [torch.Generator(scores.device).manual_seed(seed) for seed in self.seeds]
        tempered = scores.float() / self.temperature
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators])
        noisy = tempered - torch.log(-torch.log(uniform))
        chosen = noisy.argmax(dim=-1, keepdim=True)
        self.logprobs.append(torch.log_softmax(tempered, dim=-1).gather(-1, chosen).squeeze(-1))  # stays on the device: no sync per token
        return noisy


def row_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of global row `row` of update `step` (independent of how rows are split)."""
    return (seed * 1_000_003 + step) * 1_000_033 + row


def sequences(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + response as one (B, P + T) batch; positions count real tokens only (left padding)."""
    input_ids = torch.cat([rollout.query, rollout.response], dim=1)
    attention_mask = torch.cat([rollout.query_mask, rollout.response_mask], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def response_hidden(model, input_ids, attention_mask, position_ids, prompt_width: int, length: int) -> torch.Tensor:
    """Hidden states that predict each response token: positions P-1 .. P+T-2. (B, T, H)."""
    device = next(model.parameters()).device
    hidden = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), position_ids=position_ids.to(device)
    ).last_hidden_state
    return hidden[:, prompt_width - 1: prompt_width - 1 + length]


def body(model):
    """The transformer without its output head (a peft-wrapped model's or a plain model's)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def response_logits(causal_lm, *inputs) -> torch.Tensor:
    """Logits for the response tokens only: the output head never runs on prompt positions. (B, T, V)."""
    return causal_lm.get_output_embeddings()(response_hidden(body(causal_lm), *inputs)).float()


def response_values(value_body, head, *inputs) -> torch.Tensor:
    return head(response_hidden(value_body, *inputs).float()).squeeze(-1)  # (B, T)


@torch.no_grad()
def completion_logprobs(
    model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, temperature: float = 1.0, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each completion given its prompt, under softmax(logits / temperature).

    Returns (logprobs, mask), both (N, T), zero past each completion's end.
    """
    was_training = model.training
    model.eval()
    width = max(1, max(len(c) for c in completions))
    logprobs = torch.zeros(len(prompts), width)
    mask = torch.zeros(len(prompts), width)
    for start in range(0, len(prompts), batch_size):
        query, query_mask = left_pad(prompts[start:start + batch_size], pad_id)
        chunk = completions[start:start + batch_size]
        response = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for row, tokens in enumerate(chunk):
            response[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[start + row, :len(tokens)] = 1
        response_mask = mask[start:start + len(chunk)].long()
        rollout = Rollout(query, query_mask, response, response_mask, torch.zeros(response.shape), torch.zeros(len(chunk)))
        logits = response_logits(model, *sequences(rollout), query.shape[1], width).cpu() / temperature
        picked = torch.gather(torch.log_softmax(logits, -1), -1, response.unsqueeze(-1)).squeeze(-1)
        logprobs[start:start + len(chunk)] = picked * response_mask
    model.train(was_training)
    return logprobs, mask
