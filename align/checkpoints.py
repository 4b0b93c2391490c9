"""Stage output layout, the manifest, atomic finalize and resume discovery.

A finished stage directory:

    OUT/                    model + tokenizer, loadable with transformers' from_pretrained
    OUT/adapter/            the LoRA adapter, when LoRA/QLoRA was used
    OUT/checkpoints/        intermediate checkpoints for --resume (checkpoint-<step>)
    OUT/metrics.jsonl       one JSON object per logged step
    OUT/align.json          the manifest, written last and atomically

A directory without a manifest whose `completed` is true is never a finished stage.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from align import __version__, distributed
from align.errors import OutputError

MANIFEST = "align.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"  # PPO's logged samples, one JSON object per line with its step


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less the umask),
        # so colleagues, serving processes and trackers can read it beside the model files.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def manifest_path(output: Path) -> Path:
    """OUT/align.json for a stage directory; FILE.align.json beside a stage that writes one file."""
    if output.is_dir() or not output.suffix:
        return output / MANIFEST
    return output.with_name(output.name + ".align.json")


def read_manifest(output: Path) -> dict[str, Any] | None:
    try:
        return json.loads(manifest_path(output).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(out: Path) -> bool:
    manifest = read_manifest(out)
    return bool(manifest and manifest.get("completed"))


def prepare_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Make `out` ready for a new run, or refuse: a user's files are never replaced unasked."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; choose another --output")
    busy = out.is_dir() and any(out.iterdir())
    if busy and not (resume or overwrite):
        raise OutputError(
            f"{out}: output directory is not empty; pass --overwrite to replace it or --resume to continue it"
        )
    # Every process has checked; only the main one touches the disk, and the others wait for it.
    distributed.barrier()
    if distributed.is_main():
        _make_output_dir(out, clear=busy and overwrite)
    distributed.barrier()


def _make_output_dir(out: Path, clear: bool) -> None:
    if clear:
        _refuse_dangerous_delete(out)
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".align-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{out}: cannot write there ({exc.strerror}); choose another --output") from None


def prepare_output_file(path: Path, *, overwrite: bool) -> None:
    """The same rule for stages whose output is one file."""
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; --output for this command is a file path")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
    if has_rows_to_lose(path) and not overwrite:
        raise OutputError(
            f"{path}: an unfinished run left {partial_path(path).name}; pass --resume to continue it or --overwrite to start again"
        )
    distributed.barrier()  # as prepare_output: every process has checked before the main one touches the disk
    if distributed.is_main():
        manifest_path(path).unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
    distributed.barrier()


def partial_path(path: Path) -> Path:
    """Where a file output grows until it is finished (see chunked.PartialRows)."""
    return path.with_name(path.name + ".partial")


def has_rows_to_lose(path: Path) -> bool:
    """A file output's unfinished rows from a run that died (an empty one loses nothing)."""
    partial = partial_path(path)
    return partial.is_file() and partial.stat().st_size > 0


def has_started(out: Path) -> bool:
    """Something a --resume could continue: the output, or a file output's unfinished rows."""
    return out.exists() or has_rows_to_lose(out)


def _refuse_dangerous_delete(out: Path) -> None:
    resolved = out.resolve()
    protected = {Path.cwd().resolve(), Path.home().resolve(), Path("/")}
    if resolved in protected or Path.cwd().resolve().is_relative_to(resolved):
        raise OutputError(f"{out}: refusing to delete this directory for --overwrite; choose a dedicated output dir")


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete intermediate checkpoint under OUT/checkpoints, if any."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return None
    steps = []
    for child in root.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and child.is_dir() and (child / "trainer_state.json").is_file():
            steps.append((int(match.group(1)), child))
    return max(steps)[1] if steps else None


def fingerprint(paths: list[str], portable: bool = True) -> str:
    """A content hash of local data files (hub names hash as their names), each named as config_hash
    names it."""
    digest = hashlib.sha256()
    for name in paths:
        path = Path(name)
        digest.update((in_project(name) if portable else name).encode())
        if path.is_file():
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def config_hash(config: Any, portable: bool = True) -> str:
    """A hash of the config fields that decide a stage's output (not --resume/--overwrite). Paths inside
    the directory align runs from count relative to it (`portable`), so a project moved or copied
    elsewhere, runs and all, finds its finished stages up to date."""
    identity = config.identity()
    return hashlib.sha256(json.dumps(in_project(identity) if portable else identity, sort_keys=True).encode()).hexdigest()[:16]


def in_project(value: Any) -> Any:
    """`value` with every absolute path under the working directory (a data file, a reward
    function's file) written relative to it; everything else as it is."""
    try:
        root = os.getcwd().rstrip(os.sep) + os.sep
    except OSError:  # the working directory was removed: nothing is inside it
        return value
    if isinstance(value, dict):
        return {key: in_project(item) for key, item in value.items()}
    if isinstance(value, list):
        return [in_project(item) for item in value]
    return value[len(root):] if isinstance(value, str) and value.startswith(root) else value


FUNCTION_IN_FILE = re.compile(r"(.+\.py):[A-Za-z_]\w*")
FUNCTION_IN_MODULE = re.compile(r"([A-Za-z_][\w.]*):[A-Za-z_]\w*")
SETTINGS_FILES = ("chat_template", "constitution")  # fields that may name a file align reads as it runs


def code_files(config: Any) -> list[str]:
    """The user's files a stage runs or reads besides its data: the file of each python function it
    calls (FILE.py:FUNCTION, or MODULE:FUNCTION's module file), a Jinja chat template, a constitution
    YAML. Fingerprinted into the manifest, so editing one makes the stage out of date."""
    files: list[str] = []

    def visit(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for inner, item in value.items():
                visit(item, inner)
        elif isinstance(value, list):
            for item in value:
                visit(item, key)
        elif isinstance(value, str):
            in_file, in_module = FUNCTION_IN_FILE.fullmatch(value), FUNCTION_IN_MODULE.fullmatch(value)
            if in_file and Path(in_file.group(1)).is_file():
                files.append(in_file.group(1))
            elif in_module:
                origin = _module_file(in_module.group(1))
                if origin:
                    files.append(origin)
            elif key in SETTINGS_FILES and Path(value).is_file():
                files.append(value)

    visit(config.identity())
    return sorted(set(files))


def _module_file(name: str) -> str | None:
    """The file that defines importable module `name`, or None (not found, or not a file)."""
    try:
        spec = importlib.util.find_spec(name)
    except Exception:  # a parent package that fails to import: the stage itself says so when it runs
        return None
    origin = spec.origin if spec else None
    return origin if origin and Path(origin).is_file() else None


def input_models(config: Any) -> list[str]:
    """The paths of the models a stage reads: its model, then its reward models."""
    models = [getattr(config, "model", None), getattr(config, "reward_model", None), *getattr(config, "reward_models", [])]
    return [m.path for m in models if m is not None and m.path]


def input_run_id(config: Any) -> str | None:
    """The run ids of the stage outputs this stage reads (its model, and a reward model), if any."""
    ids = [(read_manifest(Path(p)) or {}).get("run_id") for p in input_models(config)]
    return "+".join(i for i in ids if i) or None


def is_up_to_date(config: Any) -> bool:
    """A finished output made by this exact config, from the same data, code and upstream run."""
    return out_of_date(config) is None


NOT_FINISHED = "it is not finished"


def out_of_date(config: Any) -> str | None:
    """Why the output at config.output is not this config's finished run (a phrase: 'its data
    changed'), or None when it is: made by the same config, from the same data, the same code files
    and the same upstream run."""
    manifest = read_manifest(Path(config.output))
    if not manifest or not manifest.get("completed"):
        return NOT_FINISHED
    # Outputs written before paths counted relative to the project (absolute) stay up to date where they are.
    if manifest.get("config_hash") not in {config_hash(config), config_hash(config, portable=False)}:
        return "its config changed"
    data = config.data_files()
    if manifest.get("data_fingerprint") not in {fingerprint(data), fingerprint(data, portable=False)}:
        return f"its data changed ({', '.join(in_project(p) for p in data)})"
    code = code_files(config)
    # Outputs written before code files were fingerprinted have none to compare.
    if manifest.get("code_fingerprint", fingerprint(code)) not in {fingerprint(code), fingerprint(code, portable=False)}:
        return f"a file of code or settings it reads changed ({', '.join(in_project(p) for p in code)})"
    if manifest.get("input_run_id") != input_run_id(config):
        return "a stage it reads from was run again"
    return None


def write_manifest(
    output: Path, *, config: Any, metrics: dict[str, Any], started: float, **extra: Any
) -> dict:
    """Write the manifest last and atomically: only now does the output count as finished.
    In a multi-process run only the main process writes."""
    manifest = {
        "align_version": __version__,
        "stage": config.stage,
        "name": config.name,
        "base_model": config.model.path if config.model else None,
        "config": config.model_dump(mode="json"),
        "config_hash": config_hash(config),
        "data_fingerprint": fingerprint(config.data_files()),
        "code_fingerprint": fingerprint(code_files(config)),
        "run_id": uuid.uuid4().hex,
        "input_run_id": input_run_id(config),
        "metrics": metrics,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "duration_s": round(time.time() - started, 2),
        **extra,
        "completed": True,
    }
    if distributed.is_main():
        atomic_write_text(manifest_path(output), json.dumps(manifest, indent=2) + "\n")
    return manifest


def trim_metrics(out: Path, last_step: int, name: str = METRICS) -> None:
    """Forget the records of a log (OUT/metrics.jsonl, or another OUT/NAME with a "step" in each
    line) after `last_step`, so a resumed run does not log them twice."""
    path = out / name
    if not path.is_file() or not distributed.is_main():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _step(line) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # a torn last line from a killed run: drop it


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a log that a killed run may have left with a torn last line (skipped)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    if not distributed.is_main():
        return
    with (out / METRICS).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def save_loop_state(out: Path, step: int, params: dict, optimizer, scheduler, extra: dict, keep: int) -> Path:
    """Everything an exact resume of our own training loops needs, written to a temp dir and
    renamed into place (a killed save leaves the previous checkpoint as the newest). Every
    process holds the same weights and optimizer state, so the main process writes them."""
    if not distributed.is_main():
        return out / CHECKPOINTS / f"checkpoint-{step}"
    import torch
    from safetensors.torch import save_file

    root = out / CHECKPOINTS
    final, staging = root / f"checkpoint-{step}", root / f".checkpoint-{step}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({name: p.detach().cpu().contiguous() for name, p in params.items()}, staging / "trainable.safetensors")
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
         "torch_rng": torch.get_rng_state()},
        staging / "optimizer.pt",
    )
    (staging / "trainer_state.json").write_text(json.dumps({"global_step": step, **extra}))
    os.replace(staging, final)
    prune_checkpoints(root, keep)
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoint-N directories under `root`."""
    numbered = [p for p in root.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    for old in sorted(numbered, key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old)


def load_loop_state(out: Path, params: dict, optimizer, scheduler) -> tuple[int, dict]:
    """Load the newest checkpoint into the live objects: (step to continue from, extra state)."""
    import torch
    from safetensors.torch import load_file

    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        return 0, {}
    saved = load_file(checkpoint / "trainable.safetensors")
    missing = sorted(set(params) - set(saved))
    if missing:
        raise OutputError(f"{checkpoint}: does not match this run (it lacks {missing[0]}); resume with the same settings")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
    # Onto the device the weights live on: without map_location every process's optimizer state
    # would land where it was saved from (cuda:0 for all of them).
    device = next(iter(params.values())).device
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location=device)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"].cpu())
    extra = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(extra.pop("global_step")), extra
