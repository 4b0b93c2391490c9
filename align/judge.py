"""AI judges: a language model that compares two responses (A or B) or rates one (1 to 10).

Answers are read from the judge's next-token distribution, never from sampled text: the
probability of an answer is the probability that the judge's reply *is* that answer, walked
token by token, so answers that take several tokens ("10") or share a prefix ("1" and "10")
are handled exactly:

    P(exactly "1") = P("1") * (1 - P("0" | "1"))      P("10") = P("1") * P("0" | "1") + P(token "10")

Each answer counts in two surface forms, " A" and "A", and the answer probabilities are
normalised to sum to one. Two backends read the same distribution:
- LocalJudge: any causal LM align can load; the whole next-token distribution.
- HTTPJudge: an OpenAI-compatible `/v1/completions` endpoint (vLLM, llama.cpp, TGI, hosted):
  the top log-probs it returns. The API key is read from an environment variable and goes
  nowhere but the request header.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from typing import Any

import torch

from align.config import JudgeQuestion, JudgeSpec, ModelSpec
from align.constitution import load_constitution
from align.data import as_messages, last_text
from align.errors import ConfigError, ModelError

log = logging.getLogger("align")

COMPARE = """You are comparing two responses to the same request.

Request:
{prompt}

Response (A):
{first}

Response (B):
{second}

Question: {question}
{instruction}"""
COMPARE_DIRECT = "Reply with just the letter A or B."
COMPARE_REASONED = "First explain your reasoning in two or three sentences, then finish with 'Answer: A' or 'Answer: B'."

RATE = """Request:
{prompt}

Response:
{response}

Question: {question}
Reply with just a number from 1 to 10."""

ANSWER_PREFIX = "Answer:"
RATING_PREFIX = "Rating:"
CHOICES = ["A", "B"]
SCORES = [str(n) for n in range(1, 11)]
MIN_MASS = 1e-4  # states of the answer walk whose probability is below this in every row are not expanded


class Judge:
    """What every backend provides; the prompts and the answer walk live here."""

    name: str

    def render(self, body: str) -> str:
        """The text the judge continues: `body` as the user's turn, the assistant's turn opened."""
        raise NotImplementedError

    def next_probs(self, texts: list[str], candidates: list[str]) -> torch.Tensor:
        """(N, C): the probability that the next token of each text is exactly each candidate string."""
        raise NotImplementedError

    def complete(self, texts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations (for chain-of-thought)."""
        raise NotImplementedError

    def __init__(self, spec: JudgeSpec):
        self.spec = spec
        self.unreadable = 0  # rows where no answer had any probability

    # -- questions ---------------------------------------------------------------------------

    def prefer_first(self, prompts: list, first: list[str], second: list[str], questions: list[str]) -> torch.Tensor:
        """(N,): P(the judge prefers `first` over `second`), shown in that order."""
        reasoned = self.spec.chain_of_thought
        bodies = [
            COMPARE.format(prompt=last_text(p), first=a, second=b, question=q,
                           instruction=COMPARE_REASONED if reasoned else COMPARE_DIRECT)
            for p, a, b, q in zip(prompts, first, second, questions)
        ]
        texts = self._answer_texts(bodies, ANSWER_PREFIX)
        return self.answer_probs(texts, CHOICES)[:, 0]

    def rate(self, prompts: list, responses: list[str], question: str) -> torch.Tensor:
        """(N,): the expected score from 1 to 10 under the judge's distribution over the score tokens."""
        bodies = [RATE.format(prompt=last_text(p), response=r, question=question) for p, r in zip(prompts, responses)]
        probs = self.answer_probs(self._answer_texts(bodies, RATING_PREFIX), SCORES)
        return probs @ torch.arange(1, 11, dtype=torch.float32)

    def _answer_texts(self, bodies: list[str], prefix: str) -> list[str]:
        opened = [self.render(b) for b in bodies]
        if not self.spec.chain_of_thought:
            return [t + prefix for t in opened]
        reasons = []
        for start in range(0, len(opened), self.spec.batch_size):
            reasons += self.complete(opened[start:start + self.spec.batch_size], self.spec.reasoning_tokens)
        # The reasoning ends where the judge starts its own answer line; we write that line.
        return [t + r.split(prefix)[0].rstrip() + "\n" + prefix for t, r in zip(opened, reasons)]

    # -- the answer walk ---------------------------------------------------------------------

    def answer_probs(self, texts: list[str], answers: list[str]) -> torch.Tensor:
        """(N, K): the probability of each answer, normalised over the answers, in batches."""
        parts = [self._answer_probs(texts[s:s + self.spec.batch_size], answers)
                 for s in range(0, len(texts), self.spec.batch_size)]
        return torch.cat(parts)

    def _answer_probs(self, texts: list[str], answers: list[str]) -> torch.Tensor:
        forms = [(k, form) for k, answer in enumerate(answers) for form in (" " + answer, answer)]
        exact = torch.zeros(len(texts), len(answers))
        frontier = {"": torch.ones(len(texts))}  # consumed text -> probability of having produced it
        while frontier:
            consumed, mass = frontier.popitem()
            if float(mass.max()) < MIN_MASS:
                continue
            remaining = [form[len(consumed):] for _, form in forms if form.startswith(consumed) and len(form) > len(consumed)]
            candidates = sorted({rest[:n] for rest in remaining for n in range(1, len(rest) + 1)})
            probs = self.next_probs([t + consumed for t in texts], candidates) if candidates else torch.zeros(len(texts), 0)
            for k, form in forms:
                if form == consumed:  # an answer ends here unless the judge goes on to a longer one
                    exact[:, k] += mass * (1 - probs.sum(1)).clamp(min=0)
            for j, piece in enumerate(candidates):
                step = mass * probs[:, j]
                frontier[consumed + piece] = frontier.get(consumed + piece, 0) + step
        total = exact.sum(1, keepdim=True)
        lost = total.squeeze(1) < 1e-12
        self.unreadable += int(lost.sum())
        return torch.where(lost.unsqueeze(1), torch.full_like(exact, 1 / len(answers)), exact / total.clamp(min=1e-12))


class LocalJudge(Judge):
    def __init__(self, spec: JudgeSpec):
        from align.models import load_model, load_tokenizer, resolve_model

        super().__init__(spec)
        model_spec = ModelSpec(path=spec.model)
        source = resolve_model(model_spec)
        self.tokenizer = load_tokenizer(model_spec, source, padding_side="left")
        self.model = load_model(model_spec, source).eval()
        self.name = spec.model
        self.chat = bool(self.tokenizer.chat_template)
        self._check_answers_expressible()
        self._strings: dict[str, list[int]] | None = None

    def _check_answers_expressible(self) -> None:
        unk = self.tokenizer.unk_token_id
        for answer in [*CHOICES, *SCORES]:
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            if (unk is not None and unk in ids) or self.tokenizer.decode(ids).strip() != answer:
                raise ModelError(
                    f"judge {self.name}: its tokenizer cannot express the answer {answer!r} "
                    f"(it reads back as {self.tokenizer.decode(ids)!r}); use a judge whose tokenizer covers "
                    "plain letters and digits (any byte-level BPE tokenizer does)"
                )

    def render(self, body: str) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template(as_messages(body, "user"), tokenize=False, add_generation_prompt=True)
        return f"{body}\n\n"

    def _ids_of(self, piece: str) -> list[int]:
        """Every token id whose text is exactly `piece`."""
        if self._strings is None:
            self._strings = {}
            for token_id in range(len(self.tokenizer)):
                self._strings.setdefault(self.tokenizer.decode([token_id]), []).append(token_id)
        return self._strings.get(piece, [])

    def _batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (input_ids, attention_mask) on the judge's device."""
        from align.generation import left_pad

        rows = [self.tokenizer(t, add_special_tokens=not self.chat)["input_ids"] for t in texts]
        device = next(self.model.parameters()).device
        return tuple(t.to(device) for t in left_pad(rows, self.tokenizer.pad_token_id))

    @torch.no_grad()
    def next_probs(self, texts: list[str], candidates: list[str]) -> torch.Tensor:
        input_ids, attention_mask = self._batch(texts)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            logits_to_keep=1).logits[:, -1]
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        return torch.stack([probs[:, self._ids_of(c)].sum(1) for c in candidates], dim=1)

    @torch.no_grad()
    def complete(self, texts: list[str], max_new_tokens: int) -> list[str]:
        from align.generation import eos_token_ids, sampling_mode

        input_ids, attention_mask = self._batch(texts)
        # Greedy, with none of the judge checkpoint's own repetition penalties or n-gram bans.
        with sampling_mode(self.model, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                           eos_token_id=sorted(eos_token_ids(self.model, self.tokenizer))):
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask)
        return self.tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)


class HTTPJudge(Judge):
    """An OpenAI-compatible completions endpoint. Each request is retried with exponential backoff."""

    def __init__(self, spec: JudgeSpec):
        super().__init__(spec)
        self.url = spec.url.rstrip("/")
        if not self.url.endswith("/completions"):
            self.url += "/v1/completions" if not self.url.endswith("/v1") else "/completions"
        self.name = spec.api_model or spec.url
        self.template = None
        if spec.tokenizer:
            from align.models import load_tokenizer, resolve_model

            model_spec = ModelSpec(path=spec.tokenizer)
            self.template = load_tokenizer(model_spec, resolve_model(model_spec))

    def render(self, body: str) -> str:
        if self.template is not None and self.template.chat_template:
            return self.template.apply_chat_template(as_messages(body, "user"), tokenize=False, add_generation_prompt=True)
        return f"{body}\n\n"

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.spec.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if self.spec.api_model:
            payload = {"model": self.spec.api_model, **payload}
        data = json.dumps(payload).encode()
        delay, problem = self.spec.backoff, ""
        for attempt in range(self.spec.retries + 1):
            if attempt:
                log.warning("judge %s: %s; retrying in %.1fs (%d/%d)", self.url, problem, delay, attempt, self.spec.retries)
                time.sleep(delay)
                delay *= 2
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.spec.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code} {exc.reason}"
                if exc.code in (400, 401, 403, 404, 422):  # retrying will not help
                    detail = exc.read().decode("utf-8", "replace")[:200]
                    raise ModelError(f"judge {self.url}: {problem}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
                problem = str(getattr(exc, "reason", exc)) or exc.__class__.__name__
        raise ModelError(f"judge {self.url}: unreachable after {self.spec.retries + 1} tries ({problem}); "
                         "check --judge-url and that the server is up, then rerun with --resume")

    def next_probs(self, texts: list[str], candidates: list[str]) -> torch.Tensor:
        reply = self._post({"prompt": texts, "max_tokens": 1, "temperature": 0, "logprobs": self.spec.top_logprobs})
        probs = torch.zeros(len(texts), len(candidates))
        for choice in _choices(reply, len(texts), self.url):
            top = ((choice.get("logprobs") or {}).get("top_logprobs") or [{}])[0] or {}
            for j, piece in enumerate(candidates):
                if piece in top:
                    probs[choice["index"], j] = math.exp(top[piece])
        return probs

    def complete(self, texts: list[str], max_new_tokens: int) -> list[str]:
        reply = self._post({"prompt": texts, "max_tokens": max_new_tokens, "temperature": 0})
        out = [""] * len(texts)
        for choice in _choices(reply, len(texts), self.url):
            out[choice["index"]] = choice.get("text", "")
        return out


def _choices(reply: dict, count: int, url: str) -> list[dict]:
    choices = reply.get("choices")
    if not isinstance(choices, list) or len(choices) != count or not all(isinstance(c, dict) and "index" in c for c in choices):
        raise ModelError(f"judge {url}: the reply is not an OpenAI completions response with {count} choices")
    return choices


def load_judge(spec: JudgeSpec) -> Judge:
    return HTTPJudge(spec) if spec.url else LocalJudge(spec)


class JudgeReward:
    """A judge as a reward source (d-RLAIF): the expected 1-10 score, mapped to [-1, 1].

    The questions come from --question, or from a constitution's overall rating and comparison
    questions.
    """

    def __init__(self, spec: JudgeSpec, source: JudgeQuestion):
        if source.question:
            self.rating = self.comparison = source.question
        elif source.constitution:
            constitution = load_constitution(source.constitution)
            self.rating, self.comparison = constitution.rating_question(), constitution.comparison_question()
        else:
            raise ConfigError("a judge reward needs a question: --question TEXT or --constitution FILE")
        self.judge = load_judge(spec)
        self.name = f"judge:{self.judge.name}"

    def __call__(self, prompts: list, completions: list[str]) -> torch.Tensor:
        return (self.judge.rate(prompts, completions, self.rating) - 5.5) / 4.5

    def prefer(self, prompts: list, first: list[str], second: list[str]) -> torch.Tensor:
        """(N,): P(first is better than second), averaged over both orders."""
        questions = [self.comparison] * len(prompts)
        shown_first = self.judge.prefer_first(prompts, first, second, questions)
        shown_second = self.judge.prefer_first(prompts, second, first, questions)
        return (shown_first + 1 - shown_second) / 2
