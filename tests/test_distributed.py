"""Two processes on CPU (gloo) through accelerate launch: the run completes, the output loads, and
the loss curve matches a one-process run with the same global batch.

Tolerance: the two runs add the same numbers in a different order (per-process partial sums,
then an all-reduce), so they agree to float32 rounding, compounded over a few optimizer steps:
we allow 1e-4 relative or 1e-6 absolute. Seen: sft and dpo losses and PPO's value loss within
2e-7 relative; PPO's scores identical (the same samples); its policy loss, which sits near 0,
within 1e-8 absolute.
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
    args = ["sft", "-m", "tiny", "-d", sft_file, "--max-steps", "3", "--set", "train.save_steps=1", *NO_DROPOUT]
    one, two = run_both(align, tmp_path, args, 8, 4)
    assert_same_curve(one, two, "loss")
    # Checkpoints were staged and renamed once both processes had written their RNG states.
    newest = two / "checkpoints" / "checkpoint-3"
    assert (newest / "rng_state_0.pth").is_file() and (newest / "rng_state_1.pth").is_file()
    assert not list((two / "checkpoints" / ".staging").glob("checkpoint-*"))


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
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: x\nstages: []\n")
    assert_clean_failure(align("sft", "-m", "tiny", "-d", sft_file, "-o", tmp_path / "o", "--accelerate-config", recipe),
                         2, "recipe.yaml: not an accelerate config", "distributed_type")
    # A mistake found by the launched processes: their one line (once, not once per process), its
    # exit code, and none of the launcher's report about a failed worker.
    result = align("sft", "-m", "tiny", "-d", tmp_path / "missing.jsonl", "-o", tmp_path / "o", "--num-processes", "2")
    assert_clean_failure(result, 3, "missing.jsonl: data file not found")
    assert "ChildFailedError" not in result.err


def test_grpo_on_two_processes(align, ppo_prompts, reward_file, tmp_path):
    out = tmp_path / "grpo"
    result = align("grpo", "-m", "tiny", "-p", ppo_prompts, "--reward-fn", f"{reward_file}:share_of_e", "-o", out,
                   "--max-steps", "2", "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "4", "--num-processes", "2")
    assert result.code == 0, result.err
    assert len(curve(out, "loss")) == 2  # two steps, logged once
    AutoModelForCausalLM.from_pretrained(out)


def test_a_recipe_on_two_processes(align, sft_file, prompts_file, tmp_path):
    """Training stages run on both processes; generate and eval on the main one while the other waits."""
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "two", "output_dir": str(tmp_path / "runs"), "model": "tiny",
        "stages": [
            {"name": "sft", "data": str(sft_file), "train": {"max_steps": 2, "batch_size": 2}},
            {"name": "samples", "stage": "generate", "from": "sft", "prompts": str(prompts_file),
             "sampling": {"max_new_tokens": 4, "num_samples": 2}},
            {"name": "eval", "stage": "eval", "from": "sft", "prompts": str(prompts_file), "sampling": {"max_new_tokens": 4}},
        ],
    }))
    result = align("run", recipe, "--num-processes", "2")
    assert result.code == 0, result.err
    runs = tmp_path / "runs"
    assert len((runs / "samples.jsonl").read_text().splitlines()) == 5 * 2  # written once, by one process
    assert json.loads((runs / "eval.json").read_text())["samples"] == 5
    assert (runs / "report" / "report.html").is_file()


def test_ranked_reward_model_on_two_processes_matches_one(align, tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from conftest import write_jsonl

    rows = [{"prompt": f"How was movie {i}?", "completions": ["Wonderful!", "Awful.", "Fine.", "Dull."],
             "scores": [1.0, -1.0, 0.5, -0.5]} for i in range(8)]
    data = write_jsonl(tmp_path / "ranked.jsonl", rows)
    args = ["rm", "-m", "tiny", "-d", data, "--max-steps", "3", *NO_DROPOUT]
    one, two = tmp_path / "one", tmp_path / "two"
    result = align(*args, "-o", one, "--batch-size", "2")
    assert result.code == 0, result.err
    result = align(*args, "-o", two, "--batch-size", "1", "--num-processes", "2")
    assert result.code == 0, result.err
    AutoModelForSequenceClassification.from_pretrained(two)
    for key in ("loss", "mean_reward", "min_reward", "max_reward"):
        assert_same_curve(one, two, key)


def test_prm_on_two_processes_matches_one(align, steps_file, tmp_path):
    from transformers import AutoModelForTokenClassification

    args = ["prm", "-m", "tiny", "-d", steps_file, "--max-steps", "3", *NO_DROPOUT]
    one, two = tmp_path / "one", tmp_path / "two"
    assert align(*args, "-o", one, "--batch-size", "4").code == 0
    result = align(*args, "-o", two, "--batch-size", "2", "--num-processes", "2")
    assert result.code == 0, result.err
    AutoModelForTokenClassification.from_pretrained(two)
    assert_same_curve(one, two, "loss")
    assert curve(one, "step_accuracy") == curve(two, "step_accuracy")  # counts summed over the processes
