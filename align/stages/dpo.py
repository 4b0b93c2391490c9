"""Direct preference optimisation on TRL's DPOTrainer, with its loss variants.

With LoRA (the default) the reference model is the base with the adapter switched off, so no
second copy of the model is held in memory.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from align.config import DPOConfig
from align.data import load_preference_data
from align.models import load_model
from align.training import TrainerPlan, run_trainer


def run(config: DPOConfig) -> Path:
    return run_trainer(config, lambda tokenizer, source: _plan(config, tokenizer, source))


def _plan(config: DPOConfig, tokenizer, source: str) -> TrainerPlan:
    from trl import DPOConfig as TRLDPOConfig, DPOTrainer

    report, train_rows, eval_rows = load_preference_data(config.data, tokenizer, config.train.seed)
    dpo = config.dpo
    return TrainerPlan(
        DPOTrainer, TRLDPOConfig, Dataset.from_list(train_rows), report,
        f"{report.rows_used} pairs, {dpo.loss} loss, beta={dpo.beta:g}",
        eval_set=Dataset.from_list(eval_rows) if eval_rows else None,
        settings=dict(beta=dpo.beta, loss_type=[dpo.trl_loss_type], label_smoothing=dpo.label_smoothing,
                      precompute_ref_log_probs=dpo.precompute_ref_log_probs, max_length=config.data.max_length),
        # Without LoRA the reference is a second, frozen copy; with it, the base with the adapter off.
        trainer_inputs=lambda: {"ref_model": None if config.lora.enabled else load_model(config.model, source)},
        kept_metrics=("rewards/", "eval_rewards/"),
    )
