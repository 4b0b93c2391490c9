"""Reward-model training on TRL's RewardTrainer (Bradley-Terry, optional per-row margin).

The output is a 1-label sequence classifier: AutoModelForSequenceClassification loads it, and
its score for a sequence is read at the last real token.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from align.config import RMConfig
from align.data import load_preference_data
from align.training import TrainerPlan, run_trainer


def run(config: RMConfig) -> Path:
    return run_trainer(config, lambda tokenizer, source: _plan(config, tokenizer))


def _plan(config: RMConfig, tokenizer) -> TrainerPlan:
    from trl import RewardConfig, RewardTrainer

    report, train_rows, eval_rows = load_preference_data(config.data, tokenizer, config.train.seed)
    return TrainerPlan(
        RewardTrainer, RewardConfig, Dataset.from_list(train_rows), report, f"{report.rows_used} pairs",
        eval_set=Dataset.from_list(eval_rows) if eval_rows else None, model_kind="reward",
        settings=dict(max_length=config.data.max_length, center_rewards_coefficient=config.center_rewards or None),
        kept_metrics=("accuracy", "eval_accuracy"),
    )
