"""What every TRL-backed stage shares: one runner (run_trainer), trainer arguments, the metrics
log and progress bar, the NaN guard, resume.

A stage says what differs (its data, trainer class and settings) in a TrainerPlan; run_trainer
does the rest the same way for all of them. There is no trainer base class of our own.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from align import distributed
from align.checkpoints import CHECKPOINTS, append_metrics, latest_checkpoint, prepare_output, prune_checkpoints, trim_metrics, write_manifest
from align.config import TrainStageConfig
from align.data import DataReport
from align.errors import ConfigError, TrainingError
from align.models import check_architecture, check_lora_possible, count_parameters, load_model, load_tokenizer, peft_config, resolve_model, save_stage_model
from align.precision import compute_dtype

log = logging.getLogger("align")


@dataclass
class TrainerPlan:
    """What one TRL-backed stage brings to run_trainer; everything else is the same for all."""

    trainer: Any  # the TRL trainer class (SFTTrainer, RewardTrainer, ...)
    args: Any  # its config class (trl.SFTConfig, ...)
    train_set: Any  # datasets.Dataset
    report: DataReport
    summary: str  # what it trains on, for the log line: "16 rows", "8 prompts x 4 generations"
    eval_set: Any = None
    model_kind: str = "causal"  # or "reward": a 1-label sequence classifier
    settings: dict[str, Any] = field(default_factory=dict)  # the stage's own fields of the TRL config
    trainer_inputs: Callable[[], dict[str, Any]] = dict  # more trainer arguments, made once the output is claimed
    kept_metrics: tuple[str, ...] = ()  # prefixes of logged metrics whose last value goes in the manifest
    manifest: dict[str, Any] = field(default_factory=dict)


def run_trainer(config, plan: Callable[[Any, str], TrainerPlan], padding_side: str = "right") -> Path:
    """A TRL-backed stage from start to finish: resolve the model, read the data (plan(tokenizer,
    source)) before the output is touched, then build, train, save and record."""
    out, started = Path(config.output), time.time()
    check_lora_possible(config.lora)
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(config.model, source, padding_side=padding_side)
    stage = plan(tokenizer, source)
    check_architecture(source, config.model, stage.model_kind)  # a reward model given as a policy: before the output
    prepare_output(out, resume=config.resume, overwrite=config.overwrite)

    model = load_model(config.model, source, config.lora, kind=stage.model_kind, pad_token_id=tokenizer.pad_token_id)
    args = trainer_args(stage.args, config, out, has_eval=stage.eval_set is not None, **stage.settings)
    trainer = stage.trainer(
        model=model, args=args, train_dataset=stage.train_set, eval_dataset=stage.eval_set, processing_class=tokenizer,
        peft_config=peft_config(config.lora, kind=stage.model_kind), callbacks=[MetricsLog(out, config.stage)],
        **stage.trainer_inputs(),
    )
    keep_adapters_float32(trainer, config)
    trainable, total = count_parameters(trainer.model)
    log.info("%s: %s, %s/%s parameters trainable", config.stage, stage.summary, f"{trainable:,}", f"{total:,}")
    metrics = run_training(trainer, out, config.resume)
    for prefix in stage.kept_metrics:
        metrics.update(last_logged(trainer, prefix))
    save_stage_model(trainer.model, tokenizer, out, config.model, source, config.lora, kind=stage.model_kind)
    write_manifest(out, config=config, metrics=metrics, started=started, data=asdict(stage.report),
                   trainable_parameters=trainable, lora=config.lora.enabled, **stage.manifest)
    return out


def trainer_args(args_cls, config: TrainStageConfig, out: Path, has_eval: bool, **stage_args: Any):
    """A TRL config object (SFTConfig, DPOConfig, ...) from our typed config."""
    train = config.train
    on_gpu = torch.cuda.is_available()
    precision = compute_dtype(train.precision)
    if config.train.report_to != "none":
        check_tracker(config.train.report_to)
    eval_steps = train.eval_steps or train.save_steps
    processes = distributed.world_size()
    log.info("batch: %d per device x %d accumulation x %d process(es) = %d rows per optimizer step",
             train.batch_size, train.grad_accum, processes, train.batch_size * train.grad_accum * processes)
    return args_cls(
        output_dir=str(out / CHECKPOINTS),
        max_steps=train.max_steps or -1,
        num_train_epochs=train.epochs,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        # Keep NaN losses visible: the default filter would hide them behind the running mean.
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        gradient_checkpointing=train.gradient_checkpointing,
        ddp_find_unused_parameters=False,  # every trainable tensor (adapters, heads) takes part in each step
        report_to=[] if train.report_to == "none" else [train.report_to],
        use_cpu=not on_gpu,
        bf16=precision == torch.bfloat16,
        fp16=precision == torch.float16,
        disable_tqdm=not logging.getLogger("align").isEnabledFor(logging.INFO),
        # transformers' verbosity stays as align set it (-q / -v): by default the Trainer turns it up to "warning" on
        # every process but the first, and a recipe's later stages then printed their weight-loading reports.
        log_level="passive", log_level_replica="passive",
        **stage_args,
    )


def check_tracker(name: str) -> None:
    import importlib.util

    module = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}[name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"--report-to {name} needs the {module} package: pip install {module}")


class MetricsLog(TrainerCallback):
    """Appends every logged dict to OUT/metrics.jsonl and stops on a NaN/inf loss."""

    def __init__(self, out: Path, stage: str):
        self.out = out
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if state.is_world_process_zero:
            append_metrics(self.out, {"stage": self.stage, "step": state.global_step, **logs})
        for key in ("loss", "eval_loss"):
            value = logs.get(key)
            if value is not None and not math.isfinite(value):
                raise TrainingError(
                    f"{key} became {value} at step {state.global_step}; training stopped. "
                    f"{_last_good(args.output_dir)} Lower the learning rate or check the data."
                )


class ProgressBar(ProgressCallback):
    """transformers' progress bar with the few metrics a person watches beside it, instead of
    every logged dict printed under it (those go to metrics.jsonl, and to the terminal with -v)."""

    SHOWN = {
        "loss": "loss", "eval_loss": "eval_loss", "mean_token_accuracy": "acc", "accuracy": "acc",
        "eval_accuracy": "eval_acc", "rewards/accuracies": "acc", "rewards/margins": "margin",
        "eval_rewards/accuracies": "eval_acc", "reward": "reward", "kl": "kl",
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shown: dict[str, str] = {}  # the latest value of each, so an eval's metrics do not hide the loss

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and self.training_bar is not None):
            return
        self.shown.update({short: f"{logs[key]:.3g}" for key, short in self.SHOWN.items()
                           if isinstance((logs or {}).get(key), (int, float))})
        if self.shown:
            self.training_bar.set_postfix(self.shown, refresh=False)


def _last_good(checkpoints_dir: str) -> str:
    last = latest_checkpoint(Path(checkpoints_dir).parent)
    return f"The last good checkpoint is kept in {last}." if last else "No checkpoint had been saved yet."


def keep_adapters_float32(trainer, config: TrainStageConfig) -> None:
    """LoRA adapters (and a reward model's score layer) are float32 master weights whatever the
    base's dtype: peft makes them so, but TRL casts a QLoRA model's to bfloat16, where AdamW's small
    steps vanish, and fp16's GradScaler refuses float16 gradients. Inputs are cast to match (peft's
    layers do it, score layers carry models.float32_head's hook)."""
    if not config.lora.enabled:
        return
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def stage_checkpoints(trainer) -> None:
    """Make the Trainer's checkpoints appear whole or not at all.

    transformers writes checkpoint-N in place, file by file; a run killed mid-save would leave a
    half checkpoint that looks like the newest. Each one is written under checkpoints/.staging
    and renamed into place once every process has written its part (RNG states are per process).
    """
    save, root = trainer._save_checkpoint, Path(trainer.args.output_dir)
    staging = root / ".staging"

    def staged_save(model, trial):
        trainer.args.output_dir = str(staging)
        try:
            save(model, trial)
        finally:
            trainer.args.output_dir = str(root)
        distributed.barrier()
        if trainer.args.should_save:
            name = f"checkpoint-{trainer.state.global_step}"
            shutil.rmtree(root / name, ignore_errors=True)
            os.replace(staging / name, root / name)
            prune_checkpoints(root, trainer.args.save_total_limit or 1 << 30)
        distributed.barrier()

    trainer._save_checkpoint = staged_save


def run_training(trainer, out: Path, resume: bool) -> dict[str, float]:
    """Train (from the newest checkpoint when resuming); return the final metrics."""
    stage_checkpoints(trainer)
    if not log.isEnabledFor(logging.INFO):
        trainer.remove_callback(PrinterCallback)
    elif not log.isEnabledFor(logging.DEBUG):  # -v keeps transformers' own bar, which prints every dict
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ProgressBar)
    checkpoint = latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        log.info("%s: no intermediate checkpoint to resume from; starting from the beginning", out)
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    trim_metrics(out, int(checkpoint.name.split("-")[-1]) if checkpoint else 0)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    if trainer.eval_dataset is not None:  # the final model's eval metrics, once: an eval at the last step is reused
        at_end = [h for h in trainer.state.log_history if h.get("step") == trainer.state.global_step and "eval_runtime" in h]
        evaluated = at_end[-1] if at_end else trainer.evaluate()
        metrics.update({k: v for k, v in evaluated.items() if k.startswith("eval_") and isinstance(v, (int, float))})
    _check_finite(metrics, out)
    return metrics


def _check_finite(metrics: dict[str, float], out: Path) -> None:
    for key in ("train_loss", "eval_loss"):
        if key in metrics and not math.isfinite(metrics[key]):
            raise TrainingError(f"{key} is {metrics[key]}; the run diverged. {_last_good(str(out / CHECKPOINTS))}")


def last_logged(trainer, prefix: str = "") -> dict[str, float]:
    """The most recent value of each logged metric (optionally only keys starting with `prefix`)."""
    latest: dict[str, float] = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if key.startswith(prefix) and isinstance(value, (int, float)):
                latest[key] = value
    return latest
