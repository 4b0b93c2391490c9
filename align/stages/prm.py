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
share of rollouts that reach the right answer), averaged over the batch's steps. With `pairwise`,
sibling steps (two solutions that share the prompt and every earlier step, then differ at a step
labelled right in one and wrong in the other) are trained together, and a Bradley-Terry loss ranks
the right one's score above the wrong one's: what a step's difficulty alone predicts (later steps,
harder operations are wrong more often) is the same for both, so only the step's content separates them.
Each sibling pair runs as one row (`share_prefix`): the prompt and the steps the two share, then the
rest of each, the second kept from seeing the first by the attention mask and its positions
restarting where the shared part ends (align/pair_rows.py does this for DPO); the logits come back
in the two-row layout, so every loss and metric reads them unchanged.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path

import torch
from datasets import Dataset
from transformers.modeling_outputs import TokenClassifierOutput

from align import pair_rows
from align.config import PRMConfig
from align.data import IGNORE_LABEL as IGNORE
from align.data import load_stepwise_data
from align.errors import DataError
from align.training import TrainerPlan, run_trainer

log = logging.getLogger("align")


def run(config: PRMConfig) -> Path:
    return run_trainer(config, lambda tokenizer, source: _plan(config, tokenizer))


def _plan(config: PRMConfig, tokenizer) -> TrainerPlan:
    from transformers import TrainingArguments

    report, train_rows, eval_rows = load_stepwise_data(config.data, tokenizer, config.train.seed, config.step_separator,
                                                       config.last_step_only)
    steps = sum(sum(label != IGNORE for label in row["labels"]) for row in train_rows)
    train_set, pairs = training_items(train_rows, config.pairwise, config.train.seed)
    if config.pairwise and not pairs:
        raise DataError(f"{config.data.path}: --pairwise found no sibling steps (two solutions of one prompt that share "
                        "every earlier step and differ at a step labelled right in one, wrong in the other); "
                        "add such solutions or train without --pairwise")
    eval_set = training_items(eval_rows, config.pairwise, config.train.seed)[0] if eval_rows else None
    metrics = ("step_accuracy", "first_error_accuracy", "sibling_accuracy")
    return TrainerPlan(
        process_reward_trainer(), TrainingArguments, Dataset.from_list(train_set), report,
        f"{report.rows_used} solutions, {steps} labelled steps" + (f", {pairs} sibling pairs" if config.pairwise else ""),
        eval_set=Dataset.from_list(eval_set) if eval_set else None,
        model_kind="process", settings=dict(prediction_loss_only=True, remove_unused_columns=False),
        trainer_inputs=lambda: dict(data_collator=StepCollator(tokenizer.pad_token_id), share_prefix=config.share_prefix),
        kept_metrics=(*metrics, *(f"eval_{name}" for name in metrics)),
        manifest={"step_separator": config.step_separator, "last_step_only": config.last_step_only,
                  "pairwise": config.pairwise, "sibling_pairs": pairs},
    )


def sibling_pairs(examples: list[dict], seed: int) -> list[tuple[int, int, int, int]]:
    """(right example, its step's label position, wrong example, its step's label position) for each pair
    of sibling steps: the same prompt and earlier steps, then a different step labelled right (> 0.5) in
    one and wrong (< 0.5) in the other. Each example is in one pair at most (matched at random, seeded),
    so no solution is trained twice in an epoch."""
    by_parent: dict[str, list[tuple[int, int, str, float]]] = defaultdict(list)
    for index, example in enumerate(examples):
        positions = [n for n, label in enumerate(example["labels"]) if label != IGNORE]
        for position, (parent, step) in zip(positions, example["steps"]):
            by_parent[parent].append((index, position, step, example["labels"][position]))
    rng, used, pairs = random.Random(seed), set(), []
    for siblings in by_parent.values():
        right = [s for s in siblings if s[3] > 0.5]
        wrong = [s for s in siblings if s[3] < 0.5]
        rng.shuffle(right)
        rng.shuffle(wrong)
        for index, position, step, _ in wrong:
            match = next((r for r in right if r[2] != step and r[0] not in used), None)
            if index not in used and match is not None:
                used.update((match[0], index))
                pairs.append((match[0], match[1], index, position))
    return pairs


def training_items(examples: list[dict], pairwise: bool, seed: int) -> tuple[list[dict], int]:
    """What the trainer batches: each example alone, or with `pairwise` each sibling pair as one item
    (both solutions, and where the two sibling steps' labels sit) and every other example alone; and
    how many pairs."""
    pairs = sibling_pairs(examples, seed) if pairwise else []
    paired = {pair[n] for pair in pairs for n in (0, 2)}
    items = [{"input_ids": [examples[right]["input_ids"], examples[wrong]["input_ids"]],
              "labels": [examples[right]["labels"], examples[wrong]["labels"]], "pair": [right_at, wrong_at]}
             for right, right_at, wrong, wrong_at in pairs]
    items += [{"input_ids": [example["input_ids"]], "labels": [example["labels"]], "pair": []}
              for index, example in enumerate(examples) if index not in paired]
    return items, len(pairs)


class StepCollator:
    """Items of one or two stepwise examples (see training_items) as one right-padded batch of
    solutions; padding is labelled IGNORE. `pairs` holds (row, position) of each sibling pair's right
    step, then its wrong step's: [pairs, 4]."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        from trl.trainer.utils import pad

        ids, labels, pairs = [], [], []
        for item in items:
            if item["pair"]:
                right, wrong = item["pair"]
                pairs.append([len(ids), right, len(ids) + 1, wrong])
            ids += [torch.tensor(row, dtype=torch.long) for row in item["input_ids"]]
            labels += [torch.tensor(row, dtype=torch.float32) for row in item["labels"]]
        return {"input_ids": pad(ids, padding_value=self.pad_token_id), "attention_mask": pad([torch.ones_like(i) for i in ids]),
                "labels": pad(labels, padding_value=IGNORE), "pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 4)}


def pack_siblings(input_ids: torch.Tensor, attention_mask: torch.Tensor, pairs: torch.Tensor, pad_id: int):
    """StepCollator's batch with each sibling pair (rows `pairs[:, 0]` and `pairs[:, 2]`) as one row
    (pair_rows.share_prefixes); None when it has no pairs."""
    if not len(pairs):
        return None
    return pair_rows.share_prefixes(input_ids, attention_mask, {int(a): int(b) for a, _, b, _ in pairs.tolist()}, pad_id)


def step_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions of (B, T, 2) logits against (B, T) labels in
    [0, 1] (IGNORE elsewhere): -(p log P(correct) + (1 - p) log P(incorrect))."""
    mask = labels != IGNORE
    log_probs = torch.log_softmax(logits[mask].float(), dim=-1)
    target = labels[mask]
    return -(target * log_probs[:, 1] + (1 - target) * log_probs[:, 0]).mean()


def sibling_margins(logits: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Each sibling pair's right step's score minus its wrong step's, in logits of P(correct)."""
    score = (logits[..., 1] - logits[..., 0]).float()
    return score[pairs[:, 0], pairs[:, 1]] - score[pairs[:, 2], pairs[:, 3]]


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
        def __init__(self, *args, model, peft_config=None, share_prefix: bool = True, **kwargs):
            if peft_config is not None:
                from peft import get_peft_model

                model = get_peft_model(model, peft_config)
            super().__init__(*args, model=model, **kwargs)
            self.share_prefix = share_prefix and pair_rows.supported(model)
            if share_prefix and not self.share_prefix:
                log.info("prm: %s sibling pairs run as two rows (one row per pair covers %s)", model.config.model_type,
                         ", ".join(sorted(pair_rows.FAMILIES)))
            self.model_accepts_loss_kwargs = False  # the loss is a batch mean: the Trainer averages over accumulation
            self._counts = {"train": defaultdict(float), "eval": defaultdict(float)}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            shared = pack_siblings(inputs["input_ids"], inputs["attention_mask"], inputs["pairs"],
                                   self.model.config.pad_token_id or 0) if self.share_prefix else None
            if shared is None:
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            else:
                packed = model(input_ids=shared.input_ids, attention_mask=pair_rows.for_attention(self.model, shared.allowed),
                               position_ids=shared.position_ids, use_cache=False)
                outputs = TokenClassifierOutput(logits=packed.logits[shared.source])  # back in the two-row layout
            loss = step_loss(outputs.logits, inputs["labels"])
            margins = sibling_margins(outputs.logits, inputs["pairs"])
            if len(margins):  # the Bradley-Terry loss of the batch's sibling pairs, beside the step loss
                loss = loss - torch.nn.functional.logsigmoid(margins).mean()
            with torch.no_grad():
                counts = torch.cat([step_counts(outputs.logits, inputs["labels"]),
                                    torch.stack([(margins > 0).double().sum(), margins.new_tensor(len(margins)).double()])])
                counts = self.accelerator.gather(counts[None]).sum(0)
            totals = self._counts["train" if self.model.training else "eval"]
            for name, value in zip(("step_right", "steps", "first_right", "solutions", "pairs_right", "pairs"), counts.tolist()):
                totals[name] += value
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            mode = "train" if self.model.training else "eval"
            totals, prefix = self._counts[mode], "" if mode == "train" else "eval_"
            if totals["steps"]:
                logs[f"{prefix}step_accuracy"] = totals["step_right"] / totals["steps"]
                logs[f"{prefix}first_error_accuracy"] = totals["first_right"] / totals["solutions"]
            if totals["pairs"]:
                logs[f"{prefix}sibling_accuracy"] = totals["pairs_right"] / totals["pairs"]
            totals.clear()
            super().log(logs, start_time)

    return ProcessRewardTrainer
