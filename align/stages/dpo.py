"""Direct preference optimisation on TRL's DPOTrainer, with its loss variants.

With LoRA (the default) the reference model is the base with the adapter switched off, so no
second copy of the model is held in memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from datasets import Dataset

from align.checkpoints import prepare_output, write_manifest
from align.config import DPOConfig
from align.data import load_preference_data
from align.models import check_lora_possible, count_parameters, load_model, load_tokenizer, peft_config, resolve_model, save_stage_model
from align.training import MetricsLog, keep_adapters_float32, last_logged, run_training, trainer_args

log = logging.getLogger("align")


def run(config: DPOConfig) -> Path:
    out = Path(config.output)
    started = time.time()
    check_lora_possible(config.lora)
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(config.model, source)
    report, train_rows, eval_rows = load_preference_data(config.data, tokenizer, config.train.seed)
    train_set, eval_set = Dataset.from_list(train_rows), Dataset.from_list(eval_rows) if eval_rows else None
    prepare_output(out, resume=config.resume, overwrite=config.overwrite)

    from trl import DPOConfig as TRLDPOConfig, DPOTrainer

    model = load_model(config.model, source, config.lora)
    ref_model = None if config.lora.enabled else load_model(config.model, source)
    args = trainer_args(
        TRLDPOConfig, config, out, has_eval=eval_set is not None,
        beta=config.dpo.beta, loss_type=[config.dpo.trl_loss_type], label_smoothing=config.dpo.label_smoothing,
        precompute_ref_log_probs=config.dpo.precompute_ref_log_probs, max_length=config.data.max_length,
    )
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=train_set, eval_dataset=eval_set,
        processing_class=tokenizer, peft_config=peft_config(config.lora), callbacks=[MetricsLog(out, "dpo")],
    )
    keep_adapters_float32(trainer, config)
    trainable, total = count_parameters(trainer.model)
    log.info("dpo (%s, beta=%g): %d pairs, %s/%s parameters trainable", config.dpo.loss, config.dpo.beta,
             report.rows_used, f"{trainable:,}", f"{total:,}")
    metrics = run_training(trainer, out, config.resume)
    metrics.update(last_logged(trainer, "rewards/") | last_logged(trainer, "eval_rewards/"))
    save_stage_model(trainer.model, tokenizer, out, config.model, source, config.lora)
    write_manifest(
        out, config=config, metrics=metrics, started=started,
        data=asdict(report), trainable_parameters=trainable, lora=config.lora.enabled,
    )
    return out

