"""SIGKILL a real `align` process at a step chosen at random, then `--resume`: the result equals an
uninterrupted run with the same seed.

Bitwise on CPU for every training stage (sft, rm, prm, dpo, ppo, grpo, rloo): every checkpoint holds
the weights, optimizer, scheduler, RNG states and data position (PPO: also the value head, the
KL controller and the reward moments; its rollouts are seeded per row and update), and every
stage seeds itself before building its model, so the resumed run repeats the same arithmetic.

The kill step is drawn from ALIGN_KILL_SEED (printed on failure) so a failure can be replayed.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

SEED = int(os.environ.get("ALIGN_KILL_SEED", "20261122"))
STEPS = 6
SAVE_EVERY = ["--set", "train.save_steps=1", "--set", "train.logging_steps=1"]


def logged_steps(out) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written when we looked
            continue
        if "step" in record and any(k in record for k in ("loss", "policy_loss")):
            steps.append(record["step"])
    return steps


def kill_when(args: list[str], ready, what: str, quiet: bool = True, timeout: float = 240) -> None:
    """Start `align ARGS` in its own process and SIGKILL it as soon as `ready(stderr so far)` holds."""
    import threading

    process = subprocess.Popen([sys.executable, "-m", "align", *(["-q"] if quiet else []), *map(str, args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: process.stderr.read(256).decode(errors="replace"), "")))
    reader.start()
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if ready("".join(seen)):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    reader.join()
    assert process.returncode == -signal.SIGKILL, f"the run ended before {what}: {''.join(seen)[-800:]}"


def kill_at(args: list[str], out, step: int) -> None:
    """SIGKILL a training run once it has logged `step`."""
    kill_when(args, lambda _: max(logged_steps(out), default=0) >= step, f"step {step}")
    assert not (out / "align.json").exists()  # nothing looks finished


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def straight_and_resumed(align, tmp_path, stage: str, args: list[str]):
    step = random.Random(f"{SEED}-{stage}").randint(1, STEPS - 1)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = align(*args, "-o", straight)
    assert result.code == 0, result.err
    kill_at([*args, "-o", killed], killed, step)
    result = align(*args, "-o", killed, "--resume")
    assert result.code == 0, (step, SEED, result.err)
    steps = logged_steps(killed)
    assert steps == sorted(set(steps)) == list(range(1, STEPS + 1)), (step, steps)  # none lost, none twice
    return straight, killed, step


@pytest.mark.parametrize("stage", ["sft", "rm", "prm", "dpo"])
def test_trainer_stages_resume_bitwise_after_sigkill(align, sft_file, pairs_file, steps_file, tmp_path, stage):
    data = {"sft": sft_file, "prm": steps_file}.get(stage, pairs_file)
    args = [stage, "-m", "tiny", "-d", data, "--max-steps", STEPS, "--batch-size", "4", *SAVE_EVERY]
    straight, killed, step = straight_and_resumed(align, tmp_path, stage, args)
    a, b = weights(straight), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a), f"differs after a kill at step {step} (ALIGN_KILL_SEED={SEED})"


def test_ppo_resumes_bitwise_after_sigkill(align, ppo_prompts, reward_file, tmp_path):
    args = ["ppo", "-m", "tiny", "-p", ppo_prompts, "--reward-fn", f"{reward_file}:share_of_e", "--episodes", STEPS * 4,
            "--batch-size", "4", "--max-new-tokens", "8", "--set", "ppo.reward_norm=true", *SAVE_EVERY]
    straight, killed, step = straight_and_resumed(align, tmp_path, "ppo", args)
    a, b = weights(straight), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a), f"differs after a kill at step {step} (ALIGN_KILL_SEED={SEED})"
    head_a, head_b = load_file(straight / "value" / "value_head.safetensors"), load_file(killed / "value" / "value_head.safetensors")
    assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_online_stages_resume_bitwise_after_sigkill(align, ppo_prompts, reward_file, tmp_path, stage):
    args = [stage, "-m", "tiny", "-p", ppo_prompts, "--reward-fn", f"{reward_file}:share_of_e", "--max-steps", STEPS,
            "--batch-size", "4", "--num-generations", "2", "--max-new-tokens", "8", *SAVE_EVERY]
    straight, killed, step = straight_and_resumed(align, tmp_path, stage, args)
    a, b = weights(straight), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a), f"differs after a kill at step {step} (ALIGN_KILL_SEED={SEED})"


# -- stages that write rows: killed anywhere (mid-chunk, mid-write), resumed, nothing lost or doubled


def done_units(progress) -> int:
    try:
        return json.loads(progress.read_text())["done"]
    except (OSError, ValueError, KeyError):
        return 0


def test_label_killed_mid_run_resumes_to_the_same_file(align, tmp_path):
    from conftest import write_jsonl

    rows = [{"prompt": f"How was movie {i}?", "chosen": f"It was wonderful, thanks ({i})!", "rejected": f"Awful {i}."} for i in range(40)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = ["label", "--judge", "tiny", "--pairs", pairs, "--question", "Which is kinder?", "--batch-size", "1"]
    straight, killed = tmp_path / "straight.jsonl", tmp_path / "killed.jsonl"
    assert align(*args, "-o", straight).code == 0
    units = random.Random(f"{SEED}-label").randint(1, 30)
    progress = tmp_path / "killed.jsonl.progress.json"
    kill_when([*args, "-o", killed], lambda _: done_units(progress) >= units, f"{units} chunks")
    assert not killed.exists()  # only the .partial file: nothing looks finished
    result = align(*args, "-o", killed, "--resume")
    assert result.code == 0, (units, SEED, result.err)
    assert killed.read_bytes() == straight.read_bytes()


def test_critique_killed_mid_run_resumes_to_the_same_files(align, tmp_path):
    from conftest import write_jsonl

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(16)])
    args = ["critique", "-m", "tiny", "-p", prompts, "--no-few-shot", "--max-new-tokens", "6", "--batch-size", "1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert align(*args, "-o", straight).code == 0
    units = random.Random(f"{SEED}-critique").randint(1, 12)
    kill_when([*args, "-o", killed], lambda _: done_units(killed / "progress.json") >= units, f"{units} chunks")
    assert not (killed / "align.json").exists()
    result = align(*args, "-o", killed, "--resume")
    assert result.code == 0, (units, SEED, result.err)
    for name in ("sft.jsonl", "pairs.jsonl", "trace.jsonl"):
        assert (killed / name).read_bytes() == (straight / name).read_bytes()


# -- stages that write one file at the end (generate, eval): killed mid-sampling, they leave no
# file that looks finished, and the rerun writes what an uninterrupted run writes


@pytest.mark.parametrize("stage", ["generate", "eval"])
def test_file_stages_killed_mid_sampling_leave_nothing_finished(align, tmp_path, stage):
    from conftest import write_jsonl

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(96)])
    args = [stage, "-m", "tiny", "-p", prompts, "--max-new-tokens", "24", "--batch-size", "2", "--num-samples", "2"]
    args += ["--no-reference"] if stage == "eval" else []
    straight, killed = tmp_path / "straight.json", tmp_path / "killed.json"
    assert align(*args, "-o", straight).code == 0
    bar = "generate" if stage == "generate" else "eval: model"
    moved = re.compile(re.escape(bar) + r":\s+([1-9]\d?)%")  # 1% to 99%: mid-run
    kill_when([*args, "-o", killed], lambda stderr: bool(moved.search(stderr)), f"{bar} was half done", quiet=False)
    assert not killed.exists() and not (tmp_path / "killed.json.align.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("killed")]  # no half file under another name
    result = align(*args, "-o", killed)  # nothing to resume: the rerun starts over
    assert result.code == 0, result.err
    assert killed.read_bytes() == straight.read_bytes()
