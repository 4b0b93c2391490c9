"""Constitutional AI's supervised stage: the model answers, critiques its answer under a drawn
principle, and revises it, for `rounds` rounds. Writes, in OUT:

    sft.jsonl     {"messages": [user prompt, assistant final revision], "finished"}  -> align sft
    pairs.jsonl   {"prompt", "chosen": final revision, "rejected": first answer,
                   "chosen_finished", "rejected_finished"}                        -> align rm / dpo
    trace.jsonl   every step: the answer, each round's principle, critique and revision
    align.json    the manifest, with counts

`finished` is false for a text cut at --max-new-tokens: `align sft` trains a cut revision without
an end of turn, and `align dpo` a pair's cut side, so neither teaches the model to stop mid-sentence.

Generation is batched across prompts. Revisions that come back empty, unchanged, or that restate
the request instead of answering are filtered (the answer stays as it was) and counted. Progress
is recorded after every chunk of prompts, so `--resume` continues from the last finished prompt.
"""

from __future__ import annotations

import difflib
import logging
import re
import time
import zlib
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from align.checkpoints import prepare_output, write_manifest
from align.chunked import PartialRows
from align.config import CritiqueConfig
from align.constitution import Constitution, Example, Principle, load_constitution
from align.data import as_messages, every_prompt, last_text
from align.errors import DataError, ModelError
from align.generation import prompt_ids, sample
from align.engines import open_sampler
from align.models import context_length, load_tokenizer, resolve_model

log = logging.getLogger("align")

# Small models often label their rewrite; the label is not part of the answer.
REVISION_LABEL = re.compile(
    r"^\s*(?:(?:here(?:'s| is) (?:a |an |the |my )?(?:revised|rewritten|improved|new|updated)[^:\n]{0,40}:)"
    r"|(?:(?:revised|rewritten|improved) (?:response|answer|version)\s*:)|(?:revision\s*:))\s*",
    re.IGNORECASE,
)
RESTATED = 0.8  # similarity to the request above which a revision counts as restating it
META = re.compile(r"^(?:the|this|my|your) (?:revised |rewritten |original )?(?:response|answer)\b")


def run(config: CritiqueConfig) -> Path:
    out, started = Path(config.output), time.time()
    constitution = load_constitution(config.constitution)
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(config.model, source, padding_side="left")
    if not tokenizer.chat_template:
        raise ModelError(
            f"{config.model.path}: critique and revision are turns of a conversation, and this tokenizer has no chat "
            "template; use a chat model or set model.chat_template to a Jinja file"
        )
    rows = every_prompt(config.prompts, config.sampling.seed)
    prompts = [row["prompt"] for row in rows]
    reviser = Reviser(tokenizer, constitution, config, context_length(config.model, source))
    reviser.check_fits(prompts)
    prepare_output(out, resume=config.resume, overwrite=config.overwrite)
    with open_sampler(config.model, source, config.generation, config.sampling.seed) as reviser.model:
        outputs = PartialRows({k: out / f"{k}.jsonl" for k in ("sft", "pairs", "trace")}, out / "progress.json", resume=config.resume)
        if outputs.done:
            log.info("critique: resuming after prompt %d of %d", outputs.done, len(prompts))

        chunk = config.sampling.batch_size
        with tqdm(total=len(prompts), initial=outputs.done, desc="critique", unit="prompt",
                  disable=not log.isEnabledFor(logging.INFO)) as bar:
            for start, end in outputs.fill(len(prompts), chunk, lambda start, end: reviser.revise(prompts, range(start, end))):
                bar.update(end - start)

        outputs.finish()
    counts = outputs.counts
    samples = len(prompts) * config.samples_per_prompt
    metrics = {
        "prompts": len(prompts), "samples": samples, "revisions": counts.get("revisions", 0),
        "kept": counts.get("kept", 0), "kept_rate": counts.get("kept", 0) / samples,
        "pairs": counts.get("kept", 0) - counts.get("empty_answers", 0),
        "kept_unfinished": counts.get("kept_unfinished", 0),  # kept revisions cut at max_new_tokens
        **{k: v for k, v in sorted(counts.items()) if k.startswith("filtered_")},
    }
    write_manifest(out, config=config, metrics=metrics, started=started, constitution=constitution.name)
    log.info("critique: %d of %d samples revised and kept; %s", metrics["kept"], samples,
             ", ".join(f"{k}={v}" for k, v in metrics.items() if k.startswith("filtered_")) or "none filtered")
    return out


class Reviser:
    """Answer -> (critique -> revision) x rounds for a chunk of prompts, batched across them."""

    def __init__(self, tokenizer, constitution: Constitution, config: CritiqueConfig, window: int):
        self.model = None  # loaded once the inputs are known to be good
        self.tokenizer, self.constitution, self.config, self.window = tokenizer, constitution, config, window
        self.fallback = next(((p, e) for p in constitution.principles for e in p.examples), None)

    def revise(self, prompts: list, indices: range) -> tuple[dict[str, list[dict]], Counter]:
        seed, samples = self.config.sampling.seed, self.config.samples_per_prompt
        items = [(i, k) for i in indices for k in range(samples)]
        base = [as_messages(prompts[i], "user") for i, _ in items]
        answers, answers_finished = self._generate(base, indices.start, "answer")
        current, finished, steps = list(answers), list(answers_finished), [[] for _ in items]
        counts: Counter = Counter()
        for round_ in range(self.config.rounds):
            principles = [self.constitution.draw(seed, i, k, round_) for i, k in items]
            asked = [self._shots(p) + conv + [_assistant(c), _user(p.critique)] for p, conv, c in zip(principles, base, current)]
            critiques, _ = self._generate(asked, indices.start, f"critique{round_}")
            asked = [a + [_assistant(c), _user(p.revision)] for a, c, p in zip(asked, critiques, principles)]
            revisions, revisions_finished = self._generate(asked, indices.start, f"revision{round_}")
            for n, (principle, critique, revision) in enumerate(zip(principles, critiques, revisions)):
                revision = REVISION_LABEL.sub("", revision, count=1).strip()
                problem = filter_reason(revision, current[n], last_text(prompts[items[n][0]]), principle)
                counts["revisions"] += 1
                if problem:
                    counts[f"filtered_{problem}"] += 1
                else:
                    current[n], finished[n] = revision, revisions_finished[n]
                steps[n].append({"round": round_, "principle": principle.name, "critique": critique,
                                 "revision": revision, "revision_finished": revisions_finished[n], "filtered": problem})
        rows: dict[str, list[dict]] = {"sft": [], "pairs": [], "trace": []}
        for n, (i, k) in enumerate(items):
            kept = current[n] != answers[n]
            rows["trace"].append({"prompt": prompts[i], "row": i, "sample": k, "answer": answers[n],
                                  "answer_finished": answers_finished[n], "steps": steps[n], "final": current[n],
                                  "final_finished": finished[n], "kept": kept})
            if kept:
                counts["kept"] += 1
                counts["kept_unfinished"] += not finished[n]
                rows["sft"].append({"messages": as_messages(prompts[i], "user") + [_assistant(current[n])], "finished": finished[n]})
                if answers[n]:  # an empty first answer makes a pair that rm/dpo refuse
                    rows["pairs"].append({"prompt": prompts[i], "chosen": current[n], "rejected": answers[n],
                                          "chosen_finished": finished[n], "rejected_finished": answers_finished[n]})
                else:
                    counts["empty_answers"] += 1
        return rows, counts

    def _shots(self, principle: Principle) -> list[dict]:
        """Worked examples as earlier turns: this principle's own, or the constitution's first."""
        if not self.config.few_shot:
            return []
        shots: list[tuple[Principle, Example]] = [(principle, e) for e in principle.examples]
        if not shots and self.fallback:
            shots = [self.fallback]
        turns = []
        for owner, example in shots:
            turns += [_user(example.prompt), _assistant(example.response), _user(owner.critique),
                      _assistant(example.critique), _user(owner.revision), _assistant(example.revision)]
        return turns

    def check_fits(self, prompts: list) -> None:
        """Fail before any work if a conversation could outgrow the context: the longest worked examples,
        the prompt, both requests, and three generations (answer, critique, revision) at full length."""
        settings = self.config.sampling
        longest = max((self._shots(p) for p in self.constitution.principles), key=lambda t: sum(len(m["content"]) for m in t))
        requests = max(len(p.critique) + len(p.revision) for p in self.constitution.principles)
        for row, prompt in enumerate(prompts, start=1):
            conversation = longest + as_messages(prompt, "user") + [_user("x" * requests)]
            length = len(prompt_ids(self.tokenizer, conversation, True)) + 3 * settings.max_new_tokens
            if length > self.window:
                raise DataError(
                    f"{self.config.prompts.path}: row {row}: a critique conversation can reach {length} tokens (worked "
                    f"examples, prompt, requests and 3 x max_new_tokens={settings.max_new_tokens}), more than the model's "
                    f"context of {self.window}; use --no-few-shot, a shorter prompt or a lower --max-new-tokens"
                )

    def _generate(self, conversations: list[list[dict]], chunk: int, phase: str) -> tuple[list[str], list[bool]]:
        """One response to each conversation, and whether each ended itself (False: cut at max_new_tokens)."""
        settings = self.config.sampling
        # A seed per (chunk, phase): the same prompts get the same text whether or not the run was resumed.
        spec = settings.model_copy(update={"num_samples": 1, "seed": zlib.crc32(f"{settings.seed}:{chunk}:{phase}".encode())})
        responses = [samples[0] for samples in sample(self.model, self.tokenizer, conversations, spec, chat=True)]
        return [r.text.strip() for r in responses], [r.finished for r in responses]


def filter_reason(revision: str, answer: str, request: str, principle: Principle) -> str | None:
    """Why a revision is not used, or None: 'empty', 'unchanged' or 'restated' (it repeats the request,
    or describes the response instead of being one)."""
    text = _normal(revision)
    if not text:
        return "empty"
    if text == _normal(answer):
        return "unchanged"
    if META.match(text):  # talks about the answer instead of being one
        return "restated"
    for asked in (request, principle.revision, principle.critique):
        asked = _normal(asked)
        if asked and (difflib.SequenceMatcher(None, text, asked).ratio() >= RESTATED
                      or (len(asked) >= 20 and text.startswith(asked[:60]))):
            return "restated"
    return None


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}
