"""Batched sampling with left padding, EOS truncation and reproducible seeds; response log-probs.

The only module that knows how text is sampled (sampling_mode: eval mode, and none of the
checkpoint's own sampling defaults). Tensors stay on the model's device: only per-token
log-probs of sampled tokens, (B, T), are ever copied to the host, never (B, T, vocab) logits.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from align.config import SamplingSpec
from align.data import prompt_ids


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finished: bool  # the model ended the response itself (emitted EOS)


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


def unwrapped(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def _keeps_logits(model_class: type) -> bool:
    """Whether a model's forward takes logits_to_keep (read once per class, not per pass)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


@contextmanager
def sampling_mode(model, **settings):
    """The model in eval mode, sampling exactly as `settings` say; its mode is restored after.

    transformers fills every generation setting left unset from the checkpoint's
    generation_config.json and applies its logits processors (repetition_penalty,
    no_repeat_ngram_size, top_k, min_new_tokens, suppressed tokens, ...), and its global default
    top_k is 50. align applies none of them: while sampling, the model's generation config is a
    blank one holding `settings` (and top_k=0, off), so what is sampled is what align's own flags
    say and a log-prob computed from the logits is the log-prob of what was sampled. Eval mode:
    with gradient checkpointing on and the model in train mode, transformers generates garbage."""
    from transformers import GenerationConfig

    inner = unwrapped(model)
    # Every module's own flag, not just the top one's: PPO keeps its layer blocks flagged as
    # training for gradient checkpointing (Roles.train) inside a model in eval mode.
    modes, shipped = {module: module.training for module in model.modules()}, inner.generation_config
    inner.generation_config = GenerationConfig(**({"top_k": 0} if settings.get("do_sample") else {}), **settings)
    model.eval()
    try:
        yield model
    finally:
        inner.generation_config = shipped
        for module, training in modes.items():
            module.training = training


def sample_statistics(lengths: torch.Tensor, finished: torch.Tensor, scores: torch.Tensor | None = None,
                      total=None) -> dict[str, float]:
    """The held-out summary both `align eval` and PPO's --eval-every report over N samples: mean
    response length (tokens), the share of responses that ended with EOS and, given scores, the
    mean score. `total` sums the float64 totals over processes (distributed.all_sum) when each
    holds a shard of the samples."""
    columns = [lengths, finished] + ([scores] if scores is not None else [])
    totals = torch.tensor([float(len(lengths))] + [c.double().sum().item() for c in columns], dtype=torch.float64)
    totals = total(totals) if total else totals
    means = (totals[1:] / totals[0].clamp(min=1)).tolist()
    return dict(zip(("response_length", "eos_rate", "score"), means))


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS and those of the model's generation config (a vLLM engine: of its checkpoint's)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def sample(model, tokenizer, prompts: list[Any], sampling: SamplingSpec, chat: bool, progress=None,
           shared: bool = False) -> list[list[Completion]]:
    """`sampling.num_samples` completions per prompt, in prompt order (see sample_ids)."""
    return sample_ids(model, tokenizer, [prompt_ids(tokenizer, p, chat) for p in prompts], sampling, progress, shared)


def my_batches(requests: int, batch_size: int) -> list[int]:
    """The batches of `requests` this process samples when a multi-process run shares them out: every Nth, by rank."""
    from align import distributed

    every, mine = (distributed.world_size(), distributed.rank()) if distributed.launched() else (1, 0)
    return list(range(mine, -(-requests // batch_size), every))


def my_share(requests: int, batch_size: int) -> int:
    """How many of `requests` this process samples when a multi-process run shares the batches out (all of them in a
    run of one process)."""
    return sum(min(batch_size, requests - b * batch_size) for b in my_batches(requests, batch_size))


@torch.no_grad()
def sample_ids(model, tokenizer, inputs: list[list[int]], sampling: SamplingSpec, progress=None,
               shared: bool = False) -> list[list[Completion]]:
    """`sampling.num_samples` completions continuing each token-id input, in input order.

    Each batch is seeded from (seed, batch index), so a run is reproducible for a given batch size.
    `model` may be a vLLM engine (align.engines.open_sampler): it seeds each request instead.
    `shared`: every process of a multi-process run samples its share of the batches (my_batches) and
    all of them get every completion, the same as one process samples.
    """
    eos_ids = eos_token_ids(model, tokenizer)
    if not isinstance(model, torch.nn.Module):
        return model.sample_ids(tokenizer, inputs, sampling, eos_ids, progress)
    device = next(model.parameters()).device
    requests = [(i, ids) for i, ids in enumerate(inputs) for _ in range(sampling.num_samples)]
    batches = my_batches(len(requests), sampling.batch_size) if shared else range(-(-len(requests) // sampling.batch_size))
    sampled: list[tuple[int, Completion]] = []  # (request, its completion)
    settings = dict(
        do_sample=sampling.temperature > 0, max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature if sampling.temperature > 0 else 1.0,
        top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos_ids),
    )
    with sampling_mode(model, **settings):
        for batch_index in batches:
            start = batch_index * sampling.batch_size
            batch = requests[start:start + sampling.batch_size]
            input_ids, attention_mask = left_pad([ids for _, ids in batch], tokenizer.pad_token_id)
            torch.manual_seed(sampling.seed * 100_003 + batch_index)
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            for offset, row in enumerate(output[:, input_ids.shape[1]:].tolist()):
                tokens, finished = truncate_at_eos(row, eos_ids)
                sampled.append((start + offset, Completion(tokenizer.decode(tokens, skip_special_tokens=True), tokens, finished)))
            if progress:
                progress(len(batch))
    if shared:
        from align import distributed

        sampled = sorted((pair for part in distributed.gather_objects(sampled) for pair in part), key=lambda pair: pair[0])
    results: list[list[Completion]] = [[] for _ in inputs]
    for request, completion in sampled:
        results[requests[request][0]].append(completion)
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
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    query, query_mask = left_pad(prompts, tokenizer.pad_token_id)
    query, query_mask = query.to(device), query_mask.to(device)
    sampler = RowSeededSampler(seeds, temperature)
    with sampling_mode(model, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids),
                       pad_token_id=tokenizer.pad_token_id):
        output = model.generate(input_ids=query, attention_mask=query_mask, logits_processor=LogitsProcessorList([sampler]))
    response = output[:, query.shape[1]:]  # (B, T)
    logprobs = torch.stack(sampler.logprobs, dim=1)[:, :response.shape[1]]
    if torch.isnan(logprobs).any():  # NaN logits: their noisy argmax is meaningless (one sync per rollout)
        raise RuntimeError("probability tensor contains nan (the policy diverged)")
    is_eos = torch.isin(response, torch.tensor(sorted(eos_ids), device=device))
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


def token_ends(tokenizer, tokens: list[int], char_ends: list[int]) -> list[int]:
    """For each character offset e in the decoded text of `tokens` (one past a character), the index
    of the token whose decoding reaches it: where a piece of text that ends at e ends in tokens."""
    if not char_ends:
        return []
    lengths, reach = [], max(char_ends)
    for index in range(len(tokens)):
        lengths.append(len(tokenizer.decode(tokens[:index + 1], skip_special_tokens=True)))
        if lengths[-1] >= reach:
            break
    return [next((i for i, length in enumerate(lengths) if length >= end), len(lengths) - 1) for end in char_ends]


def sequences(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + response as one (B, P + T) batch; positions count real tokens only (left padding)."""
    input_ids = torch.cat([rollout.query, rollout.response], dim=1)
    attention_mask = torch.cat([rollout.query_mask, rollout.response_mask], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


class ModelInputs(NamedTuple):
    """Prompt + response as one batch, in the order response_logits and response_values take them."""

    input_ids: torch.Tensor  # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T)
    position_ids: torch.Tensor  # (B, P + T), counting real tokens only
    prompt_width: int  # P
    length: int  # T

    def rows(self, idx: torch.Tensor | slice) -> ModelInputs:
        return self._replace(input_ids=self.input_ids[idx], attention_mask=self.attention_mask[idx],
                             position_ids=self.position_ids[idx])


def model_inputs(rollout: Rollout) -> ModelInputs:
    return ModelInputs(*sequences(rollout), rollout.query.shape[1], rollout.response.shape[1])


def response_hidden(model, input_ids, attention_mask, position_ids, prompt_width: int, length: int) -> torch.Tensor:
    """Hidden states that predict each response token: positions P-1 .. P+T-2. (B, T, H)."""
    device = next(model.parameters()).device
    hidden = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), position_ids=position_ids.to(device),
        use_cache=False,
    ).last_hidden_state
    return hidden[:, prompt_width - 1: prompt_width - 1 + length]


def body(model):
    """The transformer without its output head (a peft-wrapped model's or a plain model's)."""
    return unwrapped(model).base_model


def response_logits(causal_lm, input_ids, attention_mask, position_ids, prompt_width: int, length: int) -> torch.Tensor:
    """Logits for the response tokens only, through the model's own output path (so final-logit
    soft-capping or scaling, as in Gemma 2, Cohere or Granite, applies exactly as in its forward
    and in generation); the output layer runs on the last T + 1 positions only, never on the
    prompt. Float32. (B, T, V)."""
    device = next(causal_lm.parameters()).device
    keep = {"logits_to_keep": length + 1} if _keeps_logits(type(unwrapped(causal_lm))) else {}
    logits = causal_lm(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), position_ids=position_ids.to(device),
        use_cache=False, **keep,
    ).logits
    # Sequences are prompt (P) then response (T): positions P-1 .. P+T-2 predict the response; the
    # last position predicts past it.
    return logits[:, -(length + 1):-1].float()


def response_values(value_body, head, *inputs) -> torch.Tensor:
    return head(response_hidden(value_body, *inputs)).squeeze(-1)  # (B, T), float32 (the head is)


def response_logits_and_values(causal_lm, head, input_ids, attention_mask, position_ids, prompt_width: int,
                               length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """response_logits and, from the same forward pass, the value head on the model's own last hidden
    states (read where its body hands them to the output layer): (B, T, V), (B, T)."""
    seen = []
    hook = body(causal_lm).register_forward_hook(lambda module, args, output: seen.append(output.last_hidden_state))
    try:
        logits = response_logits(causal_lm, input_ids, attention_mask, position_ids, prompt_width, length)
    finally:
        hook.remove()
    return logits, head(seen[0][:, prompt_width - 1: prompt_width - 1 + length]).squeeze(-1)


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with the tokens outside the top-p nucleus at -inf: the filter sampling applied
    (transformers' own TopPLogitsWarper, so the two cannot drift apart). (..., V)."""
    if top_p >= 1.0:
        return logits
    from transformers import TopPLogitsWarper

    shape = logits.shape
    return TopPLogitsWarper(top_p)(None, logits.reshape(-1, shape[-1])).reshape(shape)


@torch.no_grad()
def completion_logprobs(
    model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, temperature: float = 1.0,
    batch_size: int = 8, top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each completion given its prompt, under the distribution sampling
    draws from: softmax of logits / temperature, restricted to the top-p nucleus and renormalised.

    Returns (logprobs, mask), both (N, T) on the host, zero past each completion's end.
    """
    device = next(model.parameters()).device
    width = max(1, max(len(c) for c in completions))
    logprobs = torch.zeros(len(prompts), width)
    mask = torch.zeros(len(prompts), width)
    with sampling_mode(model):
        for start in range(0, len(prompts), batch_size):
            query, query_mask = left_pad(prompts[start:start + batch_size], pad_id)
            chunk = completions[start:start + batch_size]
            response = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for row, tokens in enumerate(chunk):
                response[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                mask[start + row, :len(tokens)] = 1
            response_mask = mask[start:start + len(chunk)].long()
            rollout = Rollout(query, query_mask, response, response_mask, torch.zeros(response.shape), torch.zeros(len(chunk)))
            logits = nucleus(response_logits(model, *sequences(rollout), query.shape[1], width) / temperature, top_p)
            picked = torch.gather(torch.log_softmax(logits, -1), -1, response.to(device).unsqueeze(-1)).squeeze(-1)
            logprobs[start:start + len(chunk)] = (picked * response_mask.to(device)).cpu()  # (B, T): small
    return logprobs, mask
