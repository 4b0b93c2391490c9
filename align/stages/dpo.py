"""Direct preference optimisation on TRL's DPOTrainer, with its loss variants.

With LoRA (the default) the reference model is the base with the adapter switched off, so no
second copy of the model is held in memory. Each pair runs as one row, its prompt computed once
(align/pair_rows.py; `dpo.pair_rows: false` keeps TRL's two rows).
"""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import Dataset

from align import pair_rows
from align.config import DPOConfig
from align.data import last_text, load_preference_data
from align.models import load_model
from align.training import TrainerPlan, run_trainer

log = logging.getLogger("align")


def run(config: DPOConfig) -> Path:
    return run_trainer(config, lambda tokenizer, source: _plan(config, tokenizer, source))


def _plan(config: DPOConfig, tokenizer, source: str) -> TrainerPlan:
    from trl import DPOConfig as TRLDPOConfig, DPOTrainer

    report, train_rows, eval_rows = load_preference_data(config.data, tokenizer, config.train.seed)
    dpo = config.dpo
    return TrainerPlan(
        _trainer_class(DPOTrainer), TRLDPOConfig, Dataset.from_list(train_rows), report,
        f"{report.rows_used} pairs, {dpo.loss} loss, beta={dpo.beta:g}",
        eval_set=Dataset.from_list(eval_rows) if eval_rows else None,
        settings=dict(beta=dpo.beta, loss_type=[dpo.trl_loss_type], label_smoothing=dpo.label_smoothing,
                      precompute_ref_log_probs=dpo.precompute_ref_log_probs, max_length=config.data.max_length),
        # Without LoRA the reference is a second, frozen copy; with it, the base with the adapter off.
        trainer_inputs=lambda: {"ref_model": None if config.lora.enabled else load_model(config.model, source),
                                "one_row_per_pair": dpo.pair_rows},
        kept_metrics=("rewards/", "eval_rewards/"),
    )


def _trainer_class(DPOTrainer):
    """TRL's DPOTrainer whose models run each pair as one row (pair_rows.install)."""

    class PairRowsDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            """TRL's tokenisation, then a side cut at a length limit (`chosen_finished`/`rejected_finished`
            false) loses the end of turn TRL gave it: the response as it was sampled, so DPO does not
            teach the model to stop mid-sentence (what sft does with `finished: false`)."""
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if "chosen_finished" not in dataset.column_names:
                return dataset
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            return dataset.map(lambda row: without_end_of_turn(row, tokenizer), desc=f"Cut {dataset_name} sides as sampled")

        def __init__(self, *args, one_row_per_pair: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            if not one_row_per_pair:
                return
            policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            # what TRL's own forward computes for its metrics (entropy, logits/*, mean_token_accuracy, WPO weights)
            outputs = ("log_probs", "entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if self.use_weighting else ())
            installed = pair_rows.install(policy, outputs)
            if self.ref_model is not None:
                installed = pair_rows.install(self.ref_model, ("log_probs",)) and installed
            if installed:
                log.info("dpo: one row per pair (the prompt computed once for chosen and rejected)")
            else:
                log.info("dpo: %s pairs run as two rows (one row per pair covers %s)", policy.config.model_type,
                         ", ".join(sorted(pair_rows.FAMILIES)))

    return PairRowsDPOTrainer


def without_end_of_turn(row: dict, tokenizer) -> dict:
    """A pair's unfinished sides tokenized as they were sampled: a chat response's own tokens (no end
    of turn: the prompt already holds the assistant header), a plain one without the EOS TRL appends."""
    for side in ("chosen", "rejected"):
        if row[f"{side}_finished"]:
            continue
        ids = row[f"{side}_ids"]
        if isinstance(row[side], list):  # messages: cut after the response's own tokens, where the template's end of turn starts
            own = tokenizer(last_text(row[side]), add_special_tokens=False)["input_ids"]
            ends = [k + len(own) for k in range(len(ids) - len(own), -1, -1) if ids[k:k + len(own)] == own]
            row[f"{side}_ids"] = ids[:ends[0]] if ends else own
        elif ids and ids[-1] == tokenizer.eos_token_id:
            row[f"{side}_ids"] = ids[:-1]
    return row
