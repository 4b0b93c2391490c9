"""Supervised fine-tuning on TRL's SFTTrainer, with the loss on responses only by default."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

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
from align.training import TrainerPlan, run_trainer


def run(config: SFTConfig) -> Path:
    return run_trainer(config, lambda tokenizer, source: _plan(config, tokenizer))


def _plan(config: SFTConfig, tokenizer) -> TrainerPlan:
    from trl import SFTConfig as TRLSFTConfig, SFTTrainer

    report, train_set, eval_set = _prepare_data(config, tokenizer)
    return TrainerPlan(
        SFTTrainer, TRLSFTConfig, train_set, report, f"{report.rows_used} rows", eval_set=eval_set,
        settings=dict(completion_only_loss=config.completion_only_loss, packing=config.packing, max_length=config.data.max_length),
    )


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
