"""Supervised fine-tuning on TRL's SFTTrainer, with the loss on responses only by default."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from datasets import Dataset

from align.checkpoints import prepare_output, write_manifest
from align.config import SFTConfig
from align.data import (
    SFT_FORMATS,
    DataReport,
    is_messages,
    load_split,
    sft_examples,
    tokenize_sft,
    use_chat_template,
    warn_report,
)
from align.errors import DataError
from align.models import check_lora_possible, count_parameters, load_model, load_tokenizer, peft_config, resolve_model, save_stage_model
from align.training import MetricsLog, keep_adapters_float32, run_training, trainer_args

log = logging.getLogger("align")


def run(config: SFTConfig) -> Path:
    out = Path(config.output)
    started = time.time()
    check_lora_possible(config.lora)
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(config.model, source)
    report, train_set, eval_set = _prepare_data(config, tokenizer)
    prepare_output(out, resume=config.resume, overwrite=config.overwrite)

    from trl import SFTConfig as TRLSFTConfig, SFTTrainer

    model = load_model(config.model, source, config.lora)
    args = trainer_args(
        TRLSFTConfig, config, out, has_eval=eval_set is not None,
        completion_only_loss=config.completion_only_loss, packing=config.packing, max_length=config.data.max_length,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer,
        peft_config=peft_config(config.lora), callbacks=[MetricsLog(out, "sft")],
    )
    keep_adapters_float32(trainer, config)
    trainable, total = count_parameters(trainer.model)
    log.info("sft: %d rows, %s/%s parameters trainable", report.rows_used, f"{trainable:,}", f"{total:,}")
    metrics = run_training(trainer, out, config.resume)
    save_stage_model(trainer.model, tokenizer, out, config.model, source, config.lora)
    write_manifest(
        out, config=config, metrics=metrics, started=started,
        data=asdict(report), trainable_parameters=trainable, lora=config.lora.enabled,
    )
    return out


def _prepare_data(config: SFTConfig, tokenizer) -> tuple[DataReport, Dataset, Dataset | None]:
    kind, train_rows, eval_rows = load_split(config.data, SFT_FORMATS, config.train.seed)
    conversational = kind == "messages" or (kind == "prompt-completion" and is_messages(train_rows[0]["prompt"]))
    if kind == "text" and config.data.chat_template == "always":
        raise DataError(f"{config.data.path}: plain 'text' rows have no roles to render with a chat template")
    chat = kind != "text" and use_chat_template(tokenizer, config.data, conversational, config.data.path)
    report = DataReport(config.data.path, format=kind, rows_read=len(train_rows) + len(eval_rows))
    completion_only = config.completion_only_loss and kind != "text"
    train = tokenize_sft(sft_examples(train_rows, kind, completion_only), tokenizer, chat, config.data, report)
    evals = tokenize_sft(sft_examples(eval_rows, kind, completion_only), tokenizer, chat, config.data, report)
    if not train:
        raise DataError(f"{config.data.path}: no trainable rows left after filtering ({report.dropped})")
    report.rows_used = len(train)
    warn_report(report)
    return report, Dataset.from_list(train), Dataset.from_list(evals) if evals else None
