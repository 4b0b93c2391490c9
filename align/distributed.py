"""Running one align command on many processes: launching through accelerate, and what a stage
needs to know once it runs there (its rank, the world size, the main process, reductions).

`align <stage> --num-processes N` (or `--accelerate-config FILE`) re-runs the same command line
under `accelerate launch -m align ...`; a command started by `accelerate launch` (or torchrun)
directly runs the same way. The process group is accelerate's: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from functools import cache
from pathlib import Path

log = logging.getLogger("align")

LAUNCH_FLAGS = ("--num-processes", "--accelerate-config")


_solo = False


def launched() -> bool:
    """Whether this process works with others started by a launcher (accelerate, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _solo


@contextmanager
def alone():
    """Work that the main process does by itself while the others wait (no collectives inside)."""
    global _solo
    _solo = True
    try:
        yield
    finally:
        _solo = False


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def claim_device() -> None:
    """Put this process on its own GPU (LOCAL_RANK) before any model loads. Until a process sets
    its device, torch.cuda.current_device() is 0 on every rank, so every rank's reward and judge
    models would land on cuda:0 beside rank 0's."""
    import torch

    if not torch.cuda.is_available():
        return
    from align.errors import ConfigError

    if local_rank() >= torch.cuda.device_count():
        raise ConfigError(
            f"process {rank()} has LOCAL_RANK {local_rank()} but this machine shows {torch.cuda.device_count()} GPU(s); "
            "launch at most one process per GPU (--num-processes)"
        )
    torch.cuda.set_device(local_rank())


@cache
def state():
    """accelerate's process state (initialises the process group once, when launched)."""
    import torch
    from accelerate import PartialState

    # Long single-process stages (labelling, evals) keep the others waiting: a generous timeout.
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=12))


def barrier() -> None:
    if launched():
        state().wait_for_everyone()


def all_mean(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the processes (metrics of equal-sized shards)."""
    if not launched() or not values:
        return values
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=state().device)
    dist.all_reduce(tensor)
    return dict(zip(keys, (tensor / world_size()).tolist()))


def all_sum(tensor):
    """A tensor summed over the processes (a float64 copy, returned in the tensor's dtype and device)."""
    if not launched():
        return tensor
    import torch
    import torch.distributed as dist

    total = tensor.detach().to(state().device, torch.float64, copy=True)  # NCCL reduces GPU tensors only
    dist.all_reduce(total)
    return total.to(tensor.device, tensor.dtype)


def gather(tensor):
    """Every process's (equal-shaped) tensor, concatenated in rank order along dim 0."""
    if not launched():
        return tensor
    import torch
    import torch.distributed as dist

    local = tensor.detach().to(state().device).contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def from_main(value):
    """The main process's `value`, on every process (any picklable object)."""
    if not launched():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value) -> list:
    """Every process's `value` (any picklable object), in rank order, on every process."""
    if not launched():
        return [value]
    import torch.distributed as dist

    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def share_out(items: list, work):
    """`work(items)` spread over a multi-process run: each process works on its contiguous share of `items`, and every
    process gets the shares' results joined in order. `work` returns a tensor (one row per item, returned on the CPU)
    or a list."""
    if not launched() or not items:
        return work(items)
    import torch

    bounds = [len(items) * k // world_size() for k in range(world_size() + 1)]
    mine = items[bounds[rank()]:bounds[rank() + 1]]
    result = work(mine) if mine else None
    parts = [part for part in gather_objects(result.detach().cpu() if isinstance(result, torch.Tensor) else result)
             if part is not None]
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [item for part in parts for item in part]


def average_gradients(params) -> None:
    """DDP's gradient all-reduce, for our own loops: every process ends with the mean gradient."""
    if not launched():
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def sharded_engine() -> str | None:
    """FSDP or DeepSpeed when accelerate launched this process with one of them, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "DeepSpeed"
    return None


# ---------------------------------------------------------------------------------------------
# Launching


def launch_command(argv: list[str], num_processes: int | None, config_file: Path | None) -> list[str]:
    """The `accelerate launch` command line that runs `align ARGV` (ARGV without our launch flags)."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        command += ["--config_file", str(config_file)]
    if num_processes is not None:
        command += ["--num_processes", str(num_processes)]
    if config_file is None:
        # Without a config: one machine, plain data parallel over N processes (GPUs, or CPU with gloo).
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(_free_port())]
        if (num_processes or 1) > 1:
            command += ["--multi_gpu"]
    return command + ["-m", "align", *strip_launch_flags(argv)]


def strip_launch_flags(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in LAUNCH_FLAGS:
            skip = True
            continue
        if arg.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            continue
        kept.append(arg)
    return kept


def relaunch(num_processes: int | None, config_file: Path | None) -> int:
    """Run this very command again under accelerate's launcher; return its exit code.

    A user mistake found by the launched processes is still one line and its exit code: they
    record the code in ALIGN_EXIT_FILE (torchrun itself only knows "a worker failed"), each
    process's identical error line is shown once, and the launcher's own traceback about the
    failed worker is shown only when a worker crashed."""
    from align.errors import ConfigError

    if config_file is not None:
        _check_accelerate_config(config_file)
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes {num_processes}: must be at least 1")
    command = launch_command(sys.argv[1:], num_processes, config_file)
    log.info("launching %s process(es): %s", num_processes or "the configured", " ".join(command[3:]))
    with tempfile.TemporaryDirectory(prefix="align-launch-") as scratch:
        exit_file = Path(scratch) / "exit-code"
        env = {**os.environ, "ALIGN_LAUNCHED": "1", EXIT_FILE: str(exit_file)}
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
        held = _relay(process.stderr)
        code = process.wait()
        if exit_file.is_file():
            return int(exit_file.read_text() or 1)
    sys.stderr.write("".join(held))
    return code


def _check_accelerate_config(path: Path) -> None:
    """Read the file as accelerate will, so a wrong file is one line here, not the launcher's traceback."""
    from accelerate.commands.config.config_args import load_config_from_file

    from align.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"--accelerate-config {path}: no such file (see recipes/accelerate/ for examples)")
    try:
        load_config_from_file(str(path))
    except Exception as exc:  # accelerate raises ValueError, TypeError, YAML and JSON errors alike
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"--accelerate-config {path}: not an accelerate config ({reason}); see recipes/accelerate/") from None


EXIT_FILE = "ALIGN_EXIT_FILE"
_LAUNCHER_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d")  # torchrun's own glog-style lines


def record_exit(code: int) -> None:
    """Called by a launched process that stops on a user mistake (see relaunch)."""
    path = os.environ.get(EXIT_FILE)
    if path:
        Path(path).write_text(str(code))


def _relay(stream) -> list[str]:
    """Copy the launched processes' stderr to ours as it comes (progress bars included), each
    distinct `align: error:` line once; hold back the launcher's own reports. Returns those."""
    held: list[str] = []
    seen: set[str] = set()
    pending, launcher_traceback = "", False
    while chunk := os.read(stream.fileno(), 65536):
        pending += chunk.decode("utf-8", errors="replace")
        *lines, pending = pending.split("\n")
        for line in lines:
            line += "\n"
            if line.startswith("align: error:"):
                if line not in seen:
                    seen.add(line)
                    sys.stderr.write(line)
            elif launcher_traceback or _LAUNCHER_LOG.match(line) or line.startswith("Traceback"):
                launcher_traceback = launcher_traceback or line.startswith("Traceback")
                held.append(line)
            else:
                sys.stderr.write(line)
        if "\r" in pending and not launcher_traceback:  # a progress bar redrawing itself
            cut = pending.rindex("\r") + 1
            sys.stderr.write(pending[:cut])
            pending = pending[cut:]
        sys.stderr.flush()
    if pending:
        sys.stderr.write(pending)
    return held


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
