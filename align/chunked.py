"""The outputs of the data stages (best-of-n, critique, label, label-steps): JSONL files filled chunk
by chunk, which survive a kill and are shared out between the processes of a multi-process run."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

from align import distributed
from align.checkpoints import atomic_write_text, partial_path
from align.errors import AlignError

log = logging.getLogger("align")


class PartialRows:
    """JSONL outputs filled chunk by chunk that survive a kill: `--resume` neither loses nor repeats a row.

    Rows go to FILE.partial; after each chunk the files are flushed and a progress record (units
    done, every file's byte length, running counts) replaces the old one atomically. A resumed run
    cuts each file back to its recorded length, so rows written after the last record are redone
    once, never kept twice. `finish()` moves the files into place; until then nothing looks finished.

    In a multi-process run every process holds one, and only the main process's touches the disk:
    the others take its progress and counts, and `fill` hands each process its share of the chunks.
    """

    def __init__(self, finals: dict[str, Path], progress: Path, *, resume: bool):
        self.finals = finals
        self.partials = {key: partial_path(path) for key, path in finals.items()}
        self.progress = progress
        state = {"done": 0, "sizes": {}, "counts": {}}
        if distributed.is_main():
            if resume and progress.is_file():
                state = json.loads(progress.read_text(encoding="utf-8"))
            for key, path in self.partials.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("ab") as handle:
                    handle.truncate(state["sizes"].get(key, 0))
        state = distributed.from_main(state)
        self.done: int = state["done"]
        self.counts: dict[str, float] = state["counts"]

    def fill(self, total: int, chunk: int, work: Callable[[int, int], tuple[dict[str, list[dict]], dict[str, float]]]):
        """Run `work(start, end) -> (rows by file, counts)` on each chunk of units from `done` to `total` and append
        its rows in order, yielding (start, end) after each chunk is kept.

        Launched on several processes, each takes every Nth chunk and the main process writes them in order: the
        same rows as one process, as long as a chunk's work depends on its units alone (each chunk is seeded by its
        first unit). A chunk that fails stops every process with its error, the first in order, as one process would."""
        starts = list(range(self.done, total, chunk))
        size = distributed.world_size() if distributed.launched() else 1
        for first in range(0, len(starts), size):
            group = starts[first:first + size]
            if size == 1:
                results = [(None, *work(group[0], min(group[0] + chunk, total)))]
            else:
                mine = group[distributed.rank()] if distributed.rank() < len(group) else None
                mine_done = None if mine is None else _attempt(work, mine, min(mine + chunk, total))
                results = distributed.gather_objects(mine_done)
            for start, (error, rows, counts) in zip(group, results):
                if error is not None:
                    raise error
                end = min(start + chunk, total)
                self.append(rows, done=end, counts=counts)
                yield start, end

    def append(self, rows: dict[str, list[dict]], done: int, counts: dict[str, float] | None = None) -> None:
        for name, value in (counts or {}).items():
            self.counts[name] = self.counts.get(name, 0) + value
        self.done = done
        if not distributed.is_main():
            return
        for key, path in self.partials.items():
            with path.open("a", encoding="utf-8") as handle:
                handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows.get(key, [])))
                handle.flush()
                os.fsync(handle.fileno())
        sizes = {key: path.stat().st_size for key, path in self.partials.items()}
        atomic_write_text(self.progress, json.dumps({"done": done, "sizes": sizes, "counts": self.counts}))

    def finish(self) -> None:
        if distributed.is_main():
            for key, path in self.partials.items():
                os.replace(path, self.finals[key])
            self.progress.unlink(missing_ok=True)
        distributed.barrier()


def _attempt(work, start: int, end: int):
    """(None, rows, counts) from one process's chunk, or (its error, None, None) for the others to raise too."""
    try:
        return (None, *work(start, end))
    except Exception as exc:  # noqa: BLE001 - handed to every process, which raises it
        if not isinstance(exc, AlignError):
            log.exception("chunk %d-%d failed on process %d", start, end, distributed.rank())
            exc = RuntimeError(f"process {distributed.rank()} failed on units {start}-{end}: {type(exc).__name__}: {exc}")
        return exc, None, None
