"""The recipe runner: stages in order, each handing its output to the next.

A stage whose output is finished and was made by the same config, data and upstream run is
skipped (the data and the user's code files it reads compared by content); an interrupted stage
continues with --resume; a changed one is redone only with
--overwrite, because redoing it replaces files on disk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from align import distributed, memory, stages
from align.checkpoints import (
    code_files, has_started, input_models, is_complete, is_up_to_date, out_of_date, read_manifest,
)
from align.config import StageConfig
from align.errors import ConfigError, OutputError
from align.engines import check_stage_engine
from align.precision import check_stage_precision, warn_pure_bfloat16
from align.recipe import Recipe

log = logging.getLogger("align")


@dataclass
class StageResult:
    name: str
    stage: str
    output: str
    status: str  # "ran" or "skipped"
    seconds: float
    metrics: dict = field(default_factory=dict)


def run_stage(config: StageConfig) -> Path:
    """Run one stage by its type (its entry in the stage registry)."""
    if config.resume and is_complete(Path(config.output)):
        log.info("%s is already complete; nothing to resume", config.output)
        return Path(config.output)
    check_output_apart(config)  # an output that would overwrite the stage's own model or data
    check_stage_precision(config)  # a combination that cannot train is refused before anything loads
    check_stage_engine(config)  # and an engine that is not installed or cannot serve the adapter
    warn_pure_bfloat16(config)
    distributed.claim_device()  # this process's GPU, before any model (reward, judge, policy) loads
    stage = stages.get(config.stage)
    memory.keep_freed_memory()  # on the CPU, reuse freed tensors instead of faulting them in again
    train = getattr(config, "train", None)
    if train is not None:
        # New heads (a reward model's score layer) and LoRA matrices are drawn before the trainer
        # seeds anything: seed here, so the same seed gives the same run in any process.
        from transformers import set_seed

        set_seed(train.seed)
    if distributed.launched() and not stage.trains and not shared_out(stage, config):
        # Sampling and scoring stages run on the main process; the others wait for its output.
        if distributed.is_main():
            with distributed.alone():
                out = stage.run(config)
        else:
            out = Path(config.output)
    else:
        out = stage.run(config)
    distributed.barrier()
    return out


def shared_out(stage, config) -> bool:
    """Whether a multi-process run shares this stage's rows out between its processes: a data stage that works in
    chunks, sampling with transformers (a vLLM engine serves from the main process alone, one engine on the machine)."""
    generation = getattr(config, "generation", None)
    return stage.shards and not (generation is not None and generation.engine == "vllm")


def plan_recipe(recipe: Recipe) -> list[tuple[StageConfig, str | None]]:
    """Each stage with why it would run (None: up to date, skipped). A stage that is up to date on
    its own still runs when it reads the output of an earlier stage that runs (that one's new run
    makes it out of date): `--dry-run` says so instead of calling it up to date."""
    planned, running = [], []
    for config in recipe.stages:
        reason = out_of_date(config)
        if reason is None:
            upstream = next((name for name, out in running if any(_inside(path, out) for path in _reads(config))), None)
            if upstream:
                reason = f"it reads {upstream}, which runs before it"
        if reason is not None:
            running.append((config.name, Path(config.output).resolve()))
        planned.append((config, reason))
    return planned


def _reads(config: StageConfig) -> list[Path]:
    """The paths a stage reads: its model, reward models and data files."""
    return [Path(p).resolve() for p in input_models(config) + config.data_files()]


def _every_input(config: StageConfig) -> list[str]:
    """Everything a stage reads from disk that a run could destroy: _reads, and the other models a stage can be given
    (a reference, a value model, a merge's base, a judge), the user's code files."""
    judges = [getattr(config, key, None) for key in ("judge", "reward_judge")]
    extra = [getattr(config, key, None) for key in ("reference", "value_model", "base")] + [j.model for j in judges if j]
    return input_models(config) + config.data_files() + [p for p in extra if isinstance(p, str)] + code_files(config)


def check_output_apart(config: StageConfig) -> None:
    """Refuse an --output that is, or holds, something the stage reads: --overwrite (and the run itself) would delete
    or replace its own input. Said before anything loads."""
    out = Path(config.output).resolve()
    for path in _every_input(config):
        read = Path(path).resolve()
        if read.exists() and _inside(read, out):
            what = "this stage reads it" if read == out else f"it holds {path}, which this stage reads"
            raise OutputError(f"--output {config.output}: {what}, and writing there would destroy that input; "
                              "choose another --output")


def _inside(path: Path, output: Path) -> bool:
    return path == output or output in path.parents


def run_recipe(recipe: Recipe, *, resume: bool = False, overwrite: bool = False) -> list[StageResult]:
    for config in recipe.stages:  # a stage that cannot train is refused before the first one runs
        try:
            check_stage_precision(config)
            check_stage_engine(config)
        except ConfigError as exc:
            raise ConfigError(f"stage '{config.name}': {exc}") from None
    results = []
    for config in recipe.stages:
        started = time.time()
        out = Path(config.output)
        if is_up_to_date(config):
            log.info("%s: up to date in %s, skipping", config.name, out)
            results.append(_result(config, "skipped", 0.0))
            continue
        _check_can_write(config, resume=resume, overwrite=overwrite)
        log.info("%s: running %s -> %s", config.name, config.stage, out)
        run_stage(config.model_copy(update={"resume": resume and has_started(out), "overwrite": overwrite}))
        results.append(_result(config, "ran", time.time() - started))
    return results


def _check_can_write(config: StageConfig, *, resume: bool, overwrite: bool) -> None:
    out = Path(config.output)
    manifest = read_manifest(out)
    if overwrite or not has_started(out):
        return
    if manifest and manifest.get("completed"):
        raise OutputError(f"{out}: holds a finished '{config.name}' run, and {out_of_date(config)} since; "
                          "pass --overwrite to redo it")
    if not resume and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out}: holds an unfinished '{config.name}' run; pass --resume to continue it or --overwrite to restart it")


def _result(config: StageConfig, status: str, seconds: float) -> StageResult:
    manifest = read_manifest(Path(config.output)) or {}
    return StageResult(config.name, config.stage, config.output, status, seconds, manifest.get("metrics", {}))
