"""Reward-model training: Bradley-Terry on preference pairs (TRL's RewardTrainer, optional per-row
margin), or on ranked rows (RankedRewardTrainer, below).

Ranked rows (`prompt`, `completions`, `scores`) are InstructGPT's K-wise comparisons: every pair
of a prompt's completions whose scores differ by more than --min-gap is compared, and all of them
in the same step, each completion scored once. That is the loss of the same pairs written out as
pair rows (mean over comparisons of -log sigmoid(r_better - r_worse - margin)), at K forwards per
prompt instead of K(K-1); and it keeps a completion from being a separate update K-1 times in an
epoch, which InstructGPT found overfits within one epoch. On several processes each averages
its own comparisons and DDP averages the processes, as for pairs; equal when they hold as many.

The output is a 1-label sequence classifier: AutoModelForSequenceClassification loads it, and
its score for a sequence is read at the last real token. Pair rows run each pair as one row, the
prompt computed once (`pair_rows`, as `align dpo` does: align/pair_rows.py); the scores equal the
two rows' up to float rounding.
"""

from __future__ import annotations

import logging
import types
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset

from align import pair_rows
from align.config import RMConfig
from align.data import load_reward_data
from align.errors import ConfigError
from align.training import TrainerPlan, run_trainer

log = logging.getLogger("align")


def run(config: RMConfig) -> Path:
    return run_trainer(config, lambda tokenizer, source: _plan(config, tokenizer))


def _plan(config: RMConfig, tokenizer) -> TrainerPlan:
    from trl import RewardConfig, RewardTrainer

    kind, report, train_rows, eval_rows = load_reward_data(config.data, tokenizer, config.train.seed, config.min_gap,
                                                           config.margins_from_scores)
    if kind == "preference":
        if config.min_gap or config.margins_from_scores:
            raise ConfigError(f"{config.data.path}: --min-gap and --margins-from-scores apply to ranked rows (prompt, "
                              "completions, scores); pair rows give each pair's margin in a 'margin' column")
        trainer, summary = _pair_rows_trainer(RewardTrainer), f"{report.rows_used} pairs"
        inputs = partial(dict, one_row_per_pair=config.pair_rows)
    else:
        comparisons = sum(len(row["pairs"]) for row in train_rows)
        sequences = sum(len(row["sequence_ids"]) for row in train_rows)
        trainer, summary = ranked_trainer(), f"{report.rows_used} prompts, {sequences} completions, {comparisons} comparisons"
        inputs = partial(dict, data_collator=RankedCollator(tokenizer.pad_token_id))
    return TrainerPlan(
        trainer, RewardConfig, Dataset.from_list(train_rows), report, summary,
        eval_set=Dataset.from_list(eval_rows) if eval_rows else None, model_kind="reward",
        settings=dict(max_length=config.data.max_length, center_rewards_coefficient=config.center_rewards or None),
        trainer_inputs=inputs, kept_metrics=("accuracy", "eval_accuracy"),
    )


def _pair_rows_trainer(RewardTrainer):
    """TRL's RewardTrainer whose model runs each pair as one row (install_pair_rows)."""

    class PairRowsRewardTrainer(RewardTrainer):
        def __init__(self, *args, one_row_per_pair: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            if not one_row_per_pair:
                return
            model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            if install_pair_rows(model):
                log.info("rm: one row per pair (the prompt computed once for chosen and rejected)")
            else:
                log.info("rm: %s pairs run as two rows (one row per pair covers %s)", model.config.model_type,
                         ", ".join(sorted(pair_rows.FAMILIES)))

    return PairRowsRewardTrainer


def install_pair_rows(model) -> bool:
    """Route a sequence classifier's calls on TRL's reward batches (chosen rows, then rejected rows,
    right-padded) through one row per pair (pair_rows.share_prefixes), each side scored at the token
    transformers reads it at (its last one that is not padding); anything else, and models
    pair_rows does not cover, keep their own forward. Returns whether it was installed."""
    from transformers.modeling_outputs import SequenceClassifierOutput

    pad_id = model.config.pad_token_id
    if not pair_rows.supported(model) or pad_id is None:
        return False
    fallback = model.forward

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        # PEFT passes inputs_embeds, labels and the like as None, TRL the pairs' margins (which the model never reads)
        other = {k for k, v in kwargs.items() if v is not None and k not in {"use_cache", "return_dict", "margin"}}
        if other or input_ids is None or attention_mask is None or attention_mask.dim() != 2 or input_ids.size(0) % 2:
            return fallback(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        half = input_ids.size(0) // 2
        shared = pair_rows.share_prefixes(input_ids, attention_mask, {i: i + half for i in range(half)}, pad_id)
        hidden = getattr(self, self.base_model_prefix)(input_ids=shared.input_ids, attention_mask=pair_rows.for_attention(self, shared.allowed),
                                                       position_ids=shared.position_ids, use_cache=False).last_hidden_state
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        last = (positions * (input_ids != pad_id)).argmax(-1)  # the rightmost token that is not padding, as transformers reads it
        rows = torch.arange(input_ids.size(0), device=input_ids.device)
        return SequenceClassifierOutput(logits=self.score(hidden[shared.source[0][rows, last], shared.source[1][rows, last]]))

    model.forward = types.MethodType(forward, model)
    return True


class RankedCollator:
    """A batch of ranked rows as one right-padded batch of every completion, with each comparison's
    (better, worse) positions in it and its margin."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from trl.trainer.utils import pad

        sequences, pairs, margins = [], [], []
        for row in rows:
            offset = len(sequences)
            sequences += [torch.tensor(ids, dtype=torch.long) for ids in row["sequence_ids"]]
            pairs += [[offset + i, offset + j] for i, j in row["pairs"]]
            margins += row["margins"]
        pair_index = torch.tensor(pairs, dtype=torch.long)
        return {"input_ids": pad(sequences, padding_value=self.pad_token_id),
                "attention_mask": pad([torch.ones_like(ids) for ids in sequences]),
                "better": pair_index[:, 0], "worse": pair_index[:, 1], "margin": torch.tensor(margins, dtype=torch.float32)}


def ranked_loss(better: torch.Tensor, worse: torch.Tensor, margin: torch.Tensor, center: float | None = None) -> torch.Tensor:
    """Mean over comparisons of -log sigmoid(r_better - r_worse - margin), plus TRL's centring term
    (center x the mean squared sum of each comparison's two rewards): TRL's pair loss."""
    loss = -torch.nn.functional.logsigmoid(better - worse - margin).mean()
    if center:
        loss = loss + center * torch.mean((better + worse) ** 2)
    return loss


def ranked_trainer():
    """TRL's RewardTrainer (its model set-up, metrics and logging) with the ranked rows' loss."""
    from trl import RewardTrainer

    class RankedRewardTrainer(RewardTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # tokenized and filtered by align.data.ranked_examples

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["sequence_ids", "pairs", "margins"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            rewards = outputs.logits.squeeze(-1).float()
            better, worse = rewards[inputs["better"]], rewards[inputs["worse"]]
            loss = ranked_loss(better, worse, inputs["margin"], self.args.center_rewards_coefficient)
            if mode == "train":
                self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            with torch.no_grad():  # processes hold different numbers of completions: gather their summaries
                local = torch.stack([rewards.min(), rewards.max(), rewards.sum(), rewards.new_tensor(float(len(rewards)))])
                gathered = self.accelerator.gather(local[None])
                self._metrics[mode]["min_reward"].append(gathered[:, 0].min().item())
                self._metrics[mode]["max_reward"].append(gathered[:, 1].max().item())
                self._metrics[mode]["mean_reward"].append((gathered[:, 2].sum() / gathered[:, 3].sum()).item())
                accuracy = self.accelerator.gather_for_metrics((better > worse).float().mean()).mean().item()
                self._metrics[mode]["accuracy"].append(accuracy)
                self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics((better - worse).mean()).mean().item())
            return (loss, outputs) if return_outputs else loss

    return RankedRewardTrainer
