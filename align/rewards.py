"""Reward sources behind one interface: `score(prompts, completions) -> (B,) tensor`.

- RewardModel: a 1-label sequence classifier (an `align rm` output, or any such model). It
  scores the rendered conversation with its own tokenizer and chat template, so it may use a
  different tokenizer and architecture than the policy.
- ProcessRewardModel: a 2-label token classifier (an `align prm` output): a completion is split into
  steps on the separator its manifest records, each step scored P(correct), and the step scores
  aggregated (min, prod, last or mean) into the completion's score, in [0, 1].
- RewardFunction: a user's Python function `f(prompts, completions) -> list[float]`, named as
  `module:function` or `path/to/file.py:function`. This runs the user's code.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch

from align.config import LoraSpec, ModelSpec
from align.data import as_messages, split_steps, step_ids
from align.errors import ConfigError, DataError, ModelError
from align.models import load_model, load_tokenizer, resolve_model

log = logging.getLogger("align")


class RewardModel:
    def __init__(self, spec: ModelSpec, batch_size: int = 16, device: torch.device | None = None, in_4bit: bool = False):
        source = resolve_model(spec)
        _require_classifier(spec, source)
        self.tokenizer = load_tokenizer(spec, source, padding_side="right")
        quantized = LoraSpec(enabled=True, qlora=True) if in_4bit else None  # a frozen 4-bit model, no adapter
        self.model = load_model(spec, source, quantized, kind="reward", pad_token_id=self.tokenizer.pad_token_id).eval()
        if getattr(self.model.config, "num_labels", 1) != 1:
            raise ModelError(f"{spec.path}: the reward model must output one score (num_labels=1), it has {self.model.config.num_labels}")
        if device is not None:
            self.model.to(device)
        self.batch_size = batch_size
        self.chat = bool(self.tokenizer.chat_template)
        self.name = spec.path

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return score_in_batches(self.tokenizer, prompts, completions, self.batch_size, device,
                                lambda batch: self.model(**batch).logits[:, 0].float().cpu())


AGGREGATES = ("min", "prod", "last", "mean")


class ProcessRewardModel:
    def __init__(self, spec: ModelSpec, aggregate: str = "min", batch_size: int = 16, in_4bit: bool = False):
        from align.checkpoints import read_manifest

        if aggregate not in AGGREGATES:
            raise ConfigError(f"reward aggregate {aggregate!r}: choose one of {', '.join(AGGREGATES)}")
        source = resolve_model(spec)
        self.tokenizer = load_tokenizer(spec, source, padding_side="right")
        quantized = LoraSpec(enabled=True, qlora=True) if in_4bit else None
        self.model = load_model(spec, source, quantized, kind="process", pad_token_id=self.tokenizer.pad_token_id).eval()
        manifest = read_manifest(Path(source)) or {}
        self.separator = manifest.get("step_separator", "\n")
        # Trained on last labels only (--last-step-only): an outcome model, read at the last step alone.
        self.outcome_only = bool(manifest.get("last_step_only"))
        self.aggregate, self.batch_size = ("last" if self.outcome_only else aggregate), batch_size
        self.chat = bool(self.tokenizer.chat_template)
        self.name = spec.path

    def steps(self, completion: str) -> list[tuple[str, int]]:
        """The completion's steps, each with the index in it one past its last character."""
        return split_steps(completion, self.separator)

    def step_scores(self, prompts: list, completions: list[str]) -> list[torch.Tensor]:
        """Each completion's step scores, P(correct) per step in order ((0,) for a completion with none)."""
        return [scores for scores, _ in self.scored_steps(prompts, completions)]

    @torch.no_grad()
    def scored_steps(self, prompts: list, completions: list[str]) -> list[tuple[torch.Tensor, list[int]]]:
        """Each completion's step scores with where each step ends in it (one past its last character)."""
        device = next(self.model.parameters()).device
        split = [self.steps(completion) for completion in completions]
        rows = [step_ids(self.tokenizer, prompt, [text for text, _ in steps], self.separator, self.chat)
                for prompt, steps in zip(prompts, split)]
        from trl.trainer.utils import pad

        scores = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            ids = [torch.tensor(row_ids, dtype=torch.long) for row_ids, _ in batch]
            logits = self.model(input_ids=pad(ids, padding_value=self.tokenizer.pad_token_id).to(device),
                                attention_mask=pad([torch.ones_like(i) for i in ids]).to(device)).logits
            probs = logits.float().softmax(-1)[..., 1].cpu()  # one copy per batch, as RewardModel returns its scores
            scores += [probs[n, ends] for n, (_, ends) in enumerate(batch)]
        return [(row_scores, [end for _, end in steps]) for row_scores, steps in zip(scores, split)]

    def __call__(self, prompts: list, completions: list[str]) -> torch.Tensor:
        return torch.stack([aggregate_steps(steps, self.aggregate) for steps in self.step_scores(prompts, completions)])


def aggregate_steps(scores: torch.Tensor, how: str) -> torch.Tensor:
    """One score for a solution from its steps' (Let's Verify Step by Step uses the product; min is
    the weakest step). A solution with no steps scores 0."""
    if not len(scores):
        return torch.tensor(0.0)
    return {"min": scores.min, "prod": scores.prod, "last": lambda: scores[-1], "mean": scores.mean}[how]()


def step_metrics(scores: list[torch.Tensor], labels: list[list[float]]) -> dict:
    """A process reward model's step scores against step labels (a label above 0.5 is a correct step):
    step accuracy (P(correct) > 0.5 when the step is correct), first-error-step accuracy (the first
    step scored below 0.5 is the first wrong one, or neither has one) and the AUROC of the scores."""
    right = first_right = 0
    flat_scores, flat_correct = [], []
    for row_scores, row_labels in zip(scores, labels):
        correct = torch.tensor([float(label) > 0.5 for label in row_labels])
        predicted = row_scores > 0.5
        right += int((predicted == correct).sum())
        first_right += int(_first_wrong(predicted) == _first_wrong(correct))
        flat_scores.append(row_scores)
        flat_correct.append(correct)
    steps = sum(len(row) for row in labels)
    return {"step_accuracy": right / steps, "first_error_accuracy": first_right / len(labels),
            "auroc": auroc(torch.cat(flat_scores), torch.cat(flat_correct)), "steps": steps, "count": len(labels)}


def _first_wrong(correct: torch.Tensor) -> int:
    wrong = (~correct).nonzero()
    return int(wrong[0]) if len(wrong) else len(correct)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """The chance a random positive scores above a random negative (ties count half): the
    Mann-Whitney U statistic over the two counts. None when one class is absent."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return None
    above = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    return (above / (len(pos) * len(neg))).item()


def reward_model(spec: ModelSpec, aggregate: str = "min", batch_size: int = 16, in_4bit: bool = False):
    """The reward model at spec: a process reward model (a token classifier, as `align prm` writes)
    or a sequence classifier."""
    if is_process_reward_model(resolve_model(spec), spec):
        return ProcessRewardModel(spec, aggregate, batch_size, in_4bit)
    return RewardModel(spec, batch_size=batch_size, in_4bit=in_4bit)


def warn_unused_aggregate(config, sources: list) -> None:
    """One warning line for each reward source that ignores a reward_aggregate the user gave: it is
    not a process reward model, or it is an outcome model (--last-step-only), read at its last step.
    A source given as a string is a reward model's name that is not a process reward model."""
    if "reward_aggregate" not in config.model_fields_set:
        return
    for source in sources:
        if isinstance(source, ProcessRewardModel) and not source.outcome_only:
            continue
        why = ("it was trained on last steps only and is read at its last step" if isinstance(source, ProcessRewardModel)
               else "it is not a process reward model, whose step scores it aggregates")
        log.warning("reward_aggregate=%s does not apply to %s: %s", config.reward_aggregate, getattr(source, "name", source), why)


def is_process_reward_model(source: str, spec: ModelSpec) -> bool:
    return any(a.endswith("ForTokenClassification") for a in _architectures(spec, source))


def _architectures(spec: ModelSpec, source: str) -> list[str]:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code).architectures or []


def score_in_batches(tokenizer, prompts: list, completions: list[str], batch_size: int, device, score) -> torch.Tensor:
    """The one scoring loop of every reward model: each (prompt, completion) rendered as the model
    reads it (render_for_reward), tokenized right-padded in batches, each batch scored by
    `score(batch) -> (B,)`; (N,) in the order given."""
    texts = [render_for_reward(tokenizer, p, c) for p, c in zip(prompts, completions)]
    special = not tokenizer.chat_template  # a chat template writes its own special tokens
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        scores = [
            score(tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=special).to(device))
            for start in range(0, len(texts), batch_size)
        ]
    finally:
        tokenizer.padding_side = side
    return torch.cat(scores)


def render_for_reward(tokenizer, prompt: Any, completion: str) -> str:
    """The text a reward model reads: the conversation in its chat template, or prompt + completion + EOS."""
    if tokenizer.chat_template:
        messages = (as_messages(prompt, "user") if prompt else []) + as_messages(completion, "assistant")
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"{prompt}{completion}{tokenizer.eos_token or ''}"


def _require_classifier(spec: ModelSpec, source: str) -> None:
    architectures = _architectures(spec, source)
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ModelError(
            f"{spec.path}: is a {architectures[0]}, not a reward model (a sequence classifier with one score, or a "
            "process reward model); train one with `align rm` or `align prm`, or pass a python scorer with --reward-fn"
        )


def load_reward(config, batch_size: int = 16, in_4bit: bool = False, conversational: bool = False):
    """The one reward source of a stage that takes exactly one (config.OneReward: ppo, best-of-n)."""
    if config.reward_fn:
        return RewardFunction(config.reward_fn)
    if config.reward_judge:
        from align.judge import JudgeReward

        return JudgeReward(config.reward_judge, config)
    reward = reward_model(config.reward_model, config.reward_aggregate, batch_size=batch_size, in_4bit=in_4bit)
    if conversational and not reward.chat:
        raise DataError(
            f"{config.reward_model.path}: the prompts are conversations but the reward model's tokenizer has no chat "
            "template, so it cannot read them; give it one (reward_model.chat_template) or use plain-text prompts"
        )
    return reward


class RewardFunction:
    def __init__(self, reference: str):
        self.fn = load_function(reference)
        self.name = reference

    def __call__(self, prompts: list, completions: list[str]) -> torch.Tensor:
        values = call_user(
            f"reward function {self.name}", lambda pairs: self.fn([p for p, _ in pairs], [c for _, c in pairs]),
            list(zip(prompts, completions)), lambda pair: f"prompt {str(pair[0])[:60]!r}, completion {pair[1][:60]!r}")
        for row, value in enumerate(values):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"reward function {self.name} returned {value!r} for row {row}; expected a finite number")
        return torch.tensor(values, dtype=torch.float32)


def call_user(name: str, call: Callable[[list], Any], items: list, describe: Callable[[Any], str]) -> list:
    """`call(items)`, the user's code, as a list of one value per item. When it raises, the error
    names the first item it fails on alone (`describe(item)`); a wrong number of values is an error too."""
    try:
        values = call(items)
    except Exception as exc:  # the user's code: report, don't crash with their traceback
        culprit = next((f" (first on {describe(item)})" for item in items if _fails(call, item)), "")
        raise ConfigError(f"{name} raised {exc.__class__.__name__}: {exc}{culprit}") from None
    values = list(values) if not isinstance(values, list) else values
    if len(values) != len(items):
        raise ConfigError(f"{name} returned {len(values)} values for {len(items)} completions")
    return values


def _fails(call: Callable[[list], Any], item: Any) -> bool:
    try:
        call([item])
    except Exception:
        return True
    return False


def load_function(reference: str, what: str = "reward function") -> Callable:
    """`package.module:function` or `path/to/file.py:function` -> the function (`what` names it in errors)."""
    module_name, sep, attribute = reference.rpartition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{what} {reference!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"{what} {reference!r}: file {path} not found")
            spec = importlib.util.spec_from_file_location(f"align_user_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{what} {reference!r}: importing it failed ({exc.__class__.__name__}: {exc})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"{what} {reference!r}: {module_name} has no function {attribute!r}")
    return function
