"""Shared fixtures: an isolated model cache, the tiny model, data files, and a CLI driver.

`align(...)` runs the real console entrypoint in-process (so imports are paid once per test
session) and returns its exit code, stdout and stderr.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    import os

    if "ALIGN_CACHE" not in os.environ:
        os.environ["ALIGN_CACHE"] = str(tmp_path_factory.mktemp("align-cache"))
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # `auto` precision is bf16 on CPUs with bf16 units: pin fp32 so figures do not depend on the machine
    os.environ.setdefault("ALIGN_CPU_BF16", "0")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from align.models import ensure_builtin

    return ensure_builtin("tiny")


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def align(capsys, monkeypatch):
    from align.cli import entrypoint

    def run(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["align", "-q", *map(str, args)])
        code = 0
        try:
            entrypoint()
        except SystemExit as exc:
            code = exc.code or 0
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def sft_file(tmp_path) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"Say something kind, number {i}."},
                      {"role": "assistant", "content": "You are wonderful and kind!"}]}
        for i in range(16)
    ]
    return write_jsonl(tmp_path / "sft.jsonl", rows)


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    rows = [
        {"prompt": f"How was movie {i}?", "chosen": "It was wonderful and great, thanks!", "rejected": "It was awful and boring."}
        for i in range(16)
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def stepwise_rows(count: int) -> list[dict]:
    """Solutions of three steps, each step "good" (correct) or "bad": what a PRM can learn on the tiny model."""
    rows = []
    for i in range(count):
        labels = [bool((i >> k) & 1) or k == 2 and i % 3 == 0 for k in range(3)]
        steps = [f"step {k + 1} {'good' if ok else 'bad'}" for k, ok in enumerate(labels)]
        rows.append({"prompt": f"Solve problem {i}.", "completions": steps, "labels": labels})
    return rows


@pytest.fixture
def steps_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "steps.jsonl", stepwise_rows(16))


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about movie {i}."} for i in range(5)])


@pytest.fixture
def ppo_prompts(tmp_path) -> Path:
    return write_jsonl(tmp_path / "ppo_prompts.jsonl", [{"prompt": f"Tell me about movie {i}."} for i in range(32)])


def interrupt_on_call(monkeypatch, owner, name: str, call: int):
    """Make `owner.name` raise KeyboardInterrupt (as Ctrl-C would) on its `call`-th call.

    Returns a function that puts the original back."""
    original, calls = getattr(owner, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, dying)
    return lambda: monkeypatch.setattr(owner, name, original)


def assert_clean_failure(result: Result, code: int, *needles: str) -> None:
    """A user mistake: the given exit code, one line naming the culprit, and no traceback."""
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err
    error_lines = [line for line in result.err.splitlines() if line.startswith("align: error:")]
    assert len(error_lines) == 1, result.err
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]


SCORERS = """
def share_of_e(prompts, completions):
    return [c.count("e") / max(len(c), 1) for c in completions]

def constant(prompts, completions):
    return [1.0] * len(completions)

def length(prompts, completions):
    return [float(len(c)) for c in completions]

def jittery(prompts, completions):  # a reward model's float noise: the same text scored in batches of other shapes
    import random
    return [float(len(c)) + 1e-6 * random.random() for c in completions]

def not_a_number(prompts, completions):
    return [float("nan")] * len(completions)

def broken(prompts, completions):
    raise ValueError("no scores today")

def short(prompts, completions):
    return [1.0]
"""


@pytest.fixture
def reward_file(tmp_path) -> Path:
    """Python reward functions, as a user would write them in a file."""
    path = tmp_path / "scorers.py"
    path.write_text(SCORERS)
    return path
