"""Two processes on CPU (gloo) through accelerate launch: the run completes, the output loads, and
the loss curve matches a one-process run with the same global batch.

Tolerance: the two runs add the same numbers in a different order (per-process partial sums,
then an all-reduce), so they agree to float32 rounding, compounded over a few optimizer steps:
we allow 1e-4 relative (seen: about 1e-6).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_clean_failure

TOLERANCE = 1e-4
NO_DROPOUT = ["--set", "lora.dropout=0"]


def curve(out, key: str) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r and r.get("step", 0) > 0]


def assert_same_curve(one, two, key: str) -> None:
    a, b = curve(one, key), curve(two, key)
    assert len(a) == len(b) > 0, (a, b)
    assert a == pytest.approx(b, rel=TOLERANCE, abs=1e-6), (key, a, b)


def run_both(align, tmp_path, args: list[str], batch: int, per_device: int):
    one, two = tmp_path / "one", tmp_path / "two"
    result = align(*args, "-o", one, "--batch-size", batch)
    assert result.code == 0, result.err
    result = align(*args, "-o", two, "--batch-size", per_device, "--num-processes", "2")
    assert result.code == 0, result.err
    manifest = json.loads((two / "align.json").read_text())
    assert manifest["completed"]
    AutoModelForCausalLM.from_pretrained(two)  # the 2-process output loads
    return one, two


def test_sft_on_two_processes_matches_one(align, sft_file, tmp_path):
    one, two = run_both(align, tmp_path, ["sft", "-m", "tiny", "-d", sft_file, "--max-steps", "3", *NO_DROPOUT], 8, 4)
    assert_same_curve(one, two, "loss")


def test_dpo_on_two_processes_matches_one(align, pairs_file, tmp_path):
    one, two = run_both(align, tmp_path, ["dpo", "-m", "tiny", "-d", pairs_file, "--max-steps", "3", *NO_DROPOUT], 4, 2)
    assert_same_curve(one, two, "loss")


def test_ppo_on_two_processes_matches_one(align, ppo_prompts, reward_file, tmp_path):
    args = ["ppo", "-m", "tiny", "-p", ppo_prompts, "--reward-fn", f"{reward_file}:share_of_e", "--episodes", "24",
            "--mini-batches", "1", "--ppo-epochs", "2", "--max-new-tokens", "8", "--set", "ppo.reward_norm=true", *NO_DROPOUT]
    one, two = run_both(align, tmp_path, args, 8, 4)
    for key in ("score", "kl", "policy_loss", "value_loss", "response_length"):
        assert_same_curve(one, two, key)
    # The same updates: the final policies agree (to float rounding).
    a = AutoModelForCausalLM.from_pretrained(one).state_dict()
    b = AutoModelForCausalLM.from_pretrained(two).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_only_the_main_process_writes(align, ppo_prompts, reward_file, tmp_path):
    """One manifest, one copy of each metrics row, no file from a second process."""
    out = tmp_path / "ppo"
    result = align("ppo", "-m", "tiny", "-p", ppo_prompts, "--reward-fn", f"{reward_file}:share_of_e", "--episodes", "16",
                   "--batch-size", "4", "--max-new-tokens", "4", "-o", out, "--num-processes", "2")
    assert result.code == 0, result.err
    steps = curve(out, "step")
    assert steps == [1, 2]  # 16 episodes / (4 per process x 2)
    assert json.loads((out / "align.json").read_text())["metrics"]["episodes"] == 16


def test_a_bad_launch_is_one_line(align, sft_file, tmp_path):
    assert_clean_failure(align("sft", "-m", "tiny", "-d", sft_file, "-o", tmp_path / "o", "--accelerate-config", tmp_path / "nope.yaml"),
                         2, "nope.yaml: no such file", "recipes/accelerate")
    assert not (tmp_path / "o").exists()
