"""Process reward models (Let's Verify Step by Step, Math-Shepherd): a token classifier that scores
every step of a solution, trained on stepwise rows.

The contract, so that other tools can use our PRMs: the output loads with
`AutoModelForTokenClassification.from_pretrained(OUT)`, 2 labels (1 = the step is correct). Its
input is the prompt's ids (rendered up to the assistant's turn by the chat template, or the text
with the tokenizer's special tokens), then for each step the step's ids and the separator's
(each tokenized alone, without special tokens). A step's score is the probability of label 1 on
the last token of its separator; the separator is recorded in the manifest.

Our own trainer on transformers' Trainer (TRL removed its PRMTrainer in 2026). The loss is the
cross-entropy of each labelled position against its label, hard (0/1) or soft (Math-Shepherd's
share of rollouts that reach the right answer), averaged over the batch's steps.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from datasets import Dataset

from align.config import PRMConfig
from align.data import IGNORE_LABEL as IGNORE
from align.data import load_stepwise_data
from align.training import TrainerPlan, run_trainer


def run(config: PRMConfig) -> Path:
    return run_trainer(config, lambda tokenizer, source: _plan(config, tokenizer))


def _plan(config: PRMConfig, tokenizer) -> TrainerPlan:
    from transformers import TrainingArguments

    report, train_rows, eval_rows = load_stepwise_data(config.data, tokenizer, config.train.seed, config.step_separator,
                                                       config.last_step_only)
    steps = sum(sum(label != IGNORE for label in row["labels"]) for row in train_rows)
    return TrainerPlan(
        process_reward_trainer(), TrainingArguments, Dataset.from_list(train_rows), report,
        f"{report.rows_used} solutions, {steps} labelled steps", eval_set=Dataset.from_list(eval_rows) if eval_rows else None,
        model_kind="process", settings=dict(prediction_loss_only=True),
        trainer_inputs=lambda: dict(data_collator=StepCollator(tokenizer.pad_token_id)),
        kept_metrics=("step_accuracy", "first_error_accuracy", "eval_step_accuracy", "eval_first_error_accuracy"),
        manifest={"step_separator": config.step_separator, "last_step_only": config.last_step_only},
    )


class StepCollator:
    """Stepwise examples as one right-padded batch; padding is labelled IGNORE."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from trl.trainer.utils import pad

        ids = [torch.tensor(row["input_ids"], dtype=torch.long) for row in rows]
        return {"input_ids": pad(ids, padding_value=self.pad_token_id),
                "attention_mask": pad([torch.ones_like(i) for i in ids]),
                "labels": pad([torch.tensor(row["labels"], dtype=torch.float32) for row in rows], padding_value=IGNORE)}


def step_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions of (B, T, 2) logits against (B, T) labels in
    [0, 1] (IGNORE elsewhere): -(p log P(correct) + (1 - p) log P(incorrect))."""
    mask = labels != IGNORE
    log_probs = torch.log_softmax(logits[mask].float(), dim=-1)
    target = labels[mask]
    return -(target * log_probs[:, 1] + (1 - target) * log_probs[:, 0]).mean()


def step_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[steps right, steps, solutions whose first wrong step is found, solutions]: a step is taken as
    correct when P(correct) > 0.5 (a soft label when it is above 0.5); a solution's first wrong step
    is right when the model's first step below 0.5 is the labels' (or neither has one)."""
    mask = labels != IGNORE
    predicted, actual = logits[..., 1] > logits[..., 0], labels > 0.5
    step = mask.cumsum(-1) - 1  # each labelled position's step number
    none = mask.sum(-1, keepdim=True)  # "no wrong step": one past the last
    first_predicted = torch.where(mask & ~predicted, step, none).amin(-1)
    first_actual = torch.where(mask & ~actual, step, none).amin(-1)
    return torch.stack([((predicted == actual) & mask).sum(), mask.sum(), (first_predicted == first_actual).sum(),
                        torch.tensor(len(labels), device=labels.device)]).double()


def process_reward_trainer():
    """transformers' Trainer with the step loss, LoRA from a peft config, and step metrics logged
    like TRL's trainers log theirs (summed over processes and the logging interval)."""
    from transformers import Trainer

    class ProcessRewardTrainer(Trainer):
        def __init__(self, *args, model, peft_config=None, **kwargs):
            if peft_config is not None:
                from peft import get_peft_model

                model = get_peft_model(model, peft_config)
            super().__init__(*args, model=model, **kwargs)
            self.model_accepts_loss_kwargs = False  # the loss is a batch mean: the Trainer averages over accumulation
            self._counts = {"train": defaultdict(float), "eval": defaultdict(float)}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            loss = step_loss(outputs.logits, inputs["labels"])
            with torch.no_grad():
                counts = self.accelerator.gather(step_counts(outputs.logits, inputs["labels"])[None]).sum(0)
            totals = self._counts["train" if self.model.training else "eval"]
            for name, value in zip(("step_right", "steps", "first_right", "solutions"), counts.tolist()):
                totals[name] += value
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            mode = "train" if self.model.training else "eval"
            totals, prefix = self._counts[mode], "" if mode == "train" else "eval_"
            if totals["steps"]:
                logs[f"{prefix}step_accuracy"] = totals["step_right"] / totals["steps"]
                logs[f"{prefix}first_error_accuracy"] = totals["first_right"] / totals["solutions"]
            totals.clear()
            super().log(logs, start_time)

    return ProcessRewardTrainer
