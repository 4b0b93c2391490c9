"""Reward-model training on TRL's RewardTrainer (Bradley-Terry, optional per-row margin).

The output is a 1-label sequence classifier: AutoModelForSequenceClassification loads it, and
its score for a sequence is read at the last real token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from datasets import Dataset

from align.checkpoints import prepare_output, write_manifest
from align.config import RMConfig
from align.data import load_preference_data
from align.models import check_lora_possible, count_parameters, load_model, load_tokenizer, peft_config, resolve_model, save_stage_model
from align.training import MetricsLog, keep_adapters_float32, last_logged, run_training, trainer_args

log = logging.getLogger("align")


def run(config: RMConfig) -> Path:
    out = Path(config.output)
    started = time.time()
    check_lora_possible(config.lora)
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(config.model, source)
    report, train_rows, eval_rows = load_preference_data(config.data, tokenizer, config.train.seed)
    train_set, eval_set = Dataset.from_list(train_rows), Dataset.from_list(eval_rows) if eval_rows else None
    prepare_output(out, resume=config.resume, overwrite=config.overwrite)

    from trl import RewardConfig, RewardTrainer

    model = load_model(config.model, source, config.lora, kind="reward", pad_token_id=tokenizer.pad_token_id)
    args = trainer_args(
        RewardConfig, config, out, has_eval=eval_set is not None,
        max_length=config.data.max_length, center_rewards_coefficient=config.center_rewards or None,
    )
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer,
        peft_config=peft_config(config.lora, kind="reward"), callbacks=[MetricsLog(out, "rm")],
    )
    keep_adapters_float32(trainer, config)
    trainable, total = count_parameters(trainer.model)
    log.info("rm: %d pairs, %s/%s parameters trainable", report.rows_used, f"{trainable:,}", f"{total:,}")
    metrics = run_training(trainer, out, config.resume)
    metrics.update(last_logged(trainer, "accuracy") | last_logged(trainer, "eval_accuracy"))
    save_stage_model(trainer.model, tokenizer, out, config.model, source, config.lora, kind="reward")
    write_manifest(
        out, config=config, metrics=metrics, started=started,
        data=asdict(report), trainable_parameters=trainable, lora=config.lora.enabled,
    )
    return out

