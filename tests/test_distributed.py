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


def test_a_recipe_on_two_processes(align, sft_file, pairs_file, prompts_file, tmp_path):
    """Every stage of the recipe runs on both processes (training, generate and eval); each output is written once."""
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "two", "output_dir": str(tmp_path / "runs"), "model": "tiny",
        "stages": [
            {"name": "sft", "data": str(sft_file), "train": {"max_steps": 2, "batch_size": 2}},
            # loads sft as a classifier (a new score head) after the second process's trainer ran: no loading report
            {"name": "rm", "from": "sft", "data": str(pairs_file), "train": {"max_steps": 1, "batch_size": 2}},
            {"name": "samples", "stage": "generate", "from": "sft", "prompts": str(prompts_file),
             "sampling": {"max_new_tokens": 4, "num_samples": 2}},
            {"name": "eval", "stage": "eval", "from": "sft", "prompts": str(prompts_file), "sampling": {"max_new_tokens": 4}},
        ],
    }))
    result = align("run", recipe, "--num-processes", "2")
    assert result.code == 0, result.err
    assert "LOAD REPORT" not in result.err and "newly initialized" not in result.err, result.err
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


# -- data stages: each process takes every other chunk of rows, the main process writes them in order --

CHECKERS = """
import os

def seen(prompts):  # which process was asked about which prompts
    if os.environ.get("ALIGN_TEST_LOG"):
        with open(os.environ["ALIGN_TEST_LOG"], "a") as log:
            log.writelines(f"{os.environ.get('RANK', '0')}\\t{p}\\n" for p in prompts)

def has_e(prompts, completions):
    seen(prompts)
    return [c.count("e") % 2 == 0 for c in completions]

def flaky(prompts, completions):
    seen(prompts)
    if os.environ.get("ALIGN_TEST_FAIL_ON") and any(os.environ["ALIGN_TEST_FAIL_ON"] in p for p in prompts):
        raise ValueError("cannot score this one")
    return [c.count("e") / max(len(c), 1) for c in completions]
"""


def askers(log) -> dict[str, set[str]]:
    """Each prompt the user's function saw, by the process that asked (and the log emptied)."""
    by_rank: dict[str, set[str]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        rank, prompt = line.split("\t")
        by_rank.setdefault(rank, set()).add(prompt)
    log.unlink(missing_ok=True)
    return by_rank


def same_files(one, two, names) -> None:
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_data_stages_on_two_processes_write_what_one_writes(align, tmp_path, monkeypatch):
    """best-of-n, label-steps (rollouts), label and critique split their chunks between the processes, generate its
    batches: the same rows, in the same order, and the same metrics as one process (each chunk is seeded by its first
    row, each batch by its index)."""
    from conftest import write_jsonl

    log = tmp_path / "asked.tsv"
    monkeypatch.setenv("ALIGN_TEST_LOG", str(log))
    checkers = tmp_path / "checkers.py"
    checkers.write_text(CHECKERS)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Solve problem {i}."} for i in range(7)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"How was movie {i}?", "chosen": "It was wonderful!",
                                                    "rejected": f"Awful {i}."} for i in range(7)])
    runs = {
        "best-of-n": (["best-of-n", "-m", "tiny", "-p", prompts, "--reward-fn", f"{checkers}:flaky", "-n", "3",
                       "--batch-size", "6", "--max-new-tokens", "6"], ""),
        "label-steps": (["label-steps", "--policy", "tiny", "-p", prompts, "--answer-fn", f"{checkers}:has_e", "-n", "2",
                         "--rollouts", "2", "--max-new-tokens", "8", "--batch-size", "4", "--step-separator", " "], ".jsonl"),
        "label": (["label", "--judge", "tiny", "--pairs", pairs, "--question", "Which is kinder?", "--batch-size", "2"],
                  ".jsonl"),
        "critique": (["critique", "-m", "tiny", "-p", prompts, "--no-few-shot", "--max-new-tokens", "6", "--batch-size", "2"],
                     ""),
        "generate": (["generate", "-m", "tiny", "-p", prompts, "-n", "3", "--batch-size", "4", "--max-new-tokens", "6"],
                     ".jsonl"),
    }
    for name, (args, suffix) in runs.items():
        one, two = tmp_path / f"{name}-one{suffix}", tmp_path / f"{name}-two{suffix}"
        assert align(*args, "-o", one).code == 0
        askers(log)
        result = align(*args, "-o", two, "--num-processes", "2")
        assert result.code == 0, (name, result.err)
        if name in ("best-of-n", "label-steps"):  # the user's function was called by both processes, on different rows
            split = askers(log)
            assert sorted(split) == ["0", "1"] and not split["0"] & split["1"], split
        if suffix:
            assert one.read_bytes() == two.read_bytes() and one.read_bytes(), name
            manifests = [json.loads(path.with_name(path.name + ".align.json").read_text()) for path in (one, two)]
        else:
            files = sorted(p.name for p in one.glob("*.jsonl"))
            assert files and files == sorted(p.name for p in two.glob("*.jsonl")), name
            same_files(one, two, files)
            manifests = [json.loads((path / "align.json").read_text()) for path in (one, two)]
        assert manifests[0]["metrics"] == manifests[1]["metrics"], name


def test_a_chunk_that_fails_on_another_process_stops_the_run_and_resume_finishes_it(align, tmp_path, monkeypatch):
    """The failure is the one line a single process gives, the chunks written before it are kept, and --resume on two
    processes, or on one, ends with what one process writes in one go."""
    from conftest import write_jsonl

    checkers = tmp_path / "checkers.py"
    checkers.write_text(CHECKERS)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about movie {i}."} for i in range(9)])
    args = ["best-of-n", "-m", "tiny", "-p", prompts, "--reward-fn", f"{checkers}:flaky", "-n", "2", "--batch-size", "4",
            "--max-new-tokens", "6"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert align(*args, "-o", whole).code == 0
    monkeypatch.setenv("ALIGN_TEST_FAIL_ON", "movie 6")  # chunks of 2 prompts: the 4th, which the second process takes
    assert_clean_failure(align(*args, "-o", split, "--num-processes", "2"), 2, "flaky", "cannot score this one", "movie 6")
    progress = json.loads((split / "progress.json").read_text())
    assert progress["done"] == 6 and not (split / "align.json").exists()
    assert len((split / "samples.jsonl.partial").read_text().splitlines()) == 6 * 2
    elsewhere = tmp_path / "elsewhere"  # the same failure, to be resumed by one process
    assert_clean_failure(align(*args, "-o", elsewhere, "--num-processes", "2"), 2, "movie 6")
    monkeypatch.delenv("ALIGN_TEST_FAIL_ON")
    result = align(*args, "-o", split, "--num-processes", "2", "--resume")
    assert result.code == 0, result.err
    same_files(whole, split, ["best.jsonl", "pairs.jsonl", "samples.jsonl"])
    assert align(*args, "-o", elsewhere, "--resume").code == 0  # chunks do not depend on the number of processes
    same_files(whole, elsewhere, ["best.jsonl", "pairs.jsonl", "samples.jsonl"])


def test_generate_shares_its_batches_out_by_rank(monkeypatch):
    from align.generation import my_batches

    assert my_batches(10, 2) == [0, 1, 2, 3, 4]  # one process: every batch
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    assert my_batches(10, 2) == [1, 4] and my_batches(11, 2) == [1, 4]
    monkeypatch.setenv("RANK", "2")
    assert my_batches(11, 2) == [2, 5]


def test_eval_on_two_processes_matches_one(align, pairs_file, tmp_path, monkeypatch):
    """eval shares out its sampling (the same samples), scoring, KL and pair accuracy: the same table, and metrics equal
    to one process's to float rounding (a reward model reads each share in batches of other shapes)."""
    from conftest import write_jsonl

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about movie {i}."} for i in range(7)])
    checkers = tmp_path / "checkers.py"
    checkers.write_text(CHECKERS)
    rm = tmp_path / "rm"
    assert align("rm", "-m", "tiny", "-d", pairs_file, "-o", rm, "--max-steps", "1").code == 0
    dpo = tmp_path / "dpo"
    assert align("dpo", "-m", "tiny", "-d", pairs_file, "-o", dpo, "--max-steps", "2").code == 0
    log = tmp_path / "asked.tsv"
    monkeypatch.setenv("ALIGN_TEST_LOG", str(log))
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"eval{processes}.json"
        result = align("eval", "-m", dpo, "-p", prompts, "--pairs", pairs_file, "--reward-model", rm, "--reward-fn",
                       f"{checkers}:flaky", "-n", "2", "--max-new-tokens", "6", "--batch-size", "4", "-o", out,
                       *(["--num-processes", "2"] if processes == 2 else []))
        assert result.code == 0, result.err
        outputs[processes] = json.loads(out.read_text())
        assert sorted(askers(log)) == ["0", "1"][:processes]  # the user's reward function ran in both processes
    one, two = outputs[1], outputs[2]
    assert [(r["completion"], r["reference"]) for r in one["table"]] == [(r["completion"], r["reference"]) for r in two["table"]]
    assert one["samples"] == two["samples"] == 14 and one["kl"] > 0
    numbers = {k: v for k, v in one.items() if isinstance(v, float)}
    assert numbers and numbers == pytest.approx({k: two[k] for k in numbers}, rel=1e-4, abs=1e-6)
    assert one["pairs"] == pytest.approx(two["pairs"], rel=1e-4, abs=1e-6)
    rm_eval = {}
    for processes in (1, 2):  # a reward model's own pair accuracy
        out = tmp_path / f"rm{processes}.json"
        assert align("eval", "-m", rm, "--pairs", pairs_file, "-o", out, *(["--num-processes", "2"] if processes == 2 else [])).code == 0
        rm_eval[processes] = json.loads(out.read_text())["pairs"]
    assert rm_eval[1] == pytest.approx(rm_eval[2], rel=1e-4, abs=1e-6)
