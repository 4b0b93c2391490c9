"""Every user mistake: a non-zero exit, one line naming the culprit, no traceback, nothing finished-looking."""

import subprocess
import sys

import pytest

from conftest import ROOT, assert_clean_failure, write_jsonl


def nothing_finished(out):
    assert not (out / "align.json").exists()


def test_missing_and_empty_data_files(align, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(align("sft", "-m", "tiny", "-d", tmp_path / "none.jsonl", "-o", out), 3, "none.jsonl", "not found")
    (tmp_path / "empty.jsonl").write_text("")
    assert_clean_failure(align("sft", "-m", "tiny", "-d", tmp_path / "empty.jsonl", "-o", out), 3, "empty.jsonl", "empty")
    assert not out.exists()


def test_malformed_jsonl_names_the_line(align, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": "broken\n')
    assert_clean_failure(align("sft", "-m", "tiny", "-d", bad, "-o", tmp_path / "o"), 3, "bad.jsonl", "line 3", "malformed JSON")


def test_wrong_columns_say_what_was_found_and_expected(align, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    assert_clean_failure(
        align("dpo", "-m", "tiny", "-d", data, "-o", tmp_path / "o"), 3,
        "found columns ['answer', 'question']", "expected prompt + chosen + rejected", "data.columns",
    )
    typed = write_jsonl(tmp_path / "typed.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": 5, "rejected": "r"}])
    assert_clean_failure(align("rm", "-m", "tiny", "-d", typed, "-o", tmp_path / "o"), 3, "row 2", "'chosen'")
    flagged = write_jsonl(tmp_path / "flagged.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r", "rejected_finished": False},
                                                       {"prompt": "p", "chosen": "c", "rejected": "r", "chosen_finished": "no"}])
    assert_clean_failure(align("dpo", "-m", "tiny", "-d", flagged, "-o", tmp_path / "o"), 3, "flagged.jsonl", "row 2",
                         "'chosen_finished' must be true or false", "'no'")
    assert not (tmp_path / "o").exists()


def test_identical_pairs_are_dropped_with_a_warning(align, tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "same" if i < 3 else "good", "rejected": "same" if i < 3 else "bad"} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = align("dpo", "-m", "tiny", "-d", data, "-o", tmp_path / "o", "--max-steps", "1")
    assert result.code == 0, result.err
    assert "dropped 3 row(s): chosen identical to rejected" in result.err
    all_same = write_jsonl(tmp_path / "same.jsonl", rows[:3])
    assert_clean_failure(align("dpo", "-m", "tiny", "-d", all_same, "-o", tmp_path / "o2"), 3, "no usable preference pairs")


def test_overlong_rows_are_counted(align, tmp_path):
    rows = [{"prompt": "q", "completion": "word " * 200}] + [{"prompt": "q", "completion": "short"}] * 3
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    result = align("sft", "-m", "tiny", "-d", data, "-o", tmp_path / "o", "--max-length", "32", "--max-steps", "1")
    assert result.code == 0 and "truncated 1 row(s) to max_length" in result.err
    result = align("sft", "-m", "tiny", "-d", data, "-o", tmp_path / "o2", "--max-length", "32", "--max-steps", "1",
                   "--set", "data.overlong=drop")
    assert result.code == 0 and "dropped 1 row(s): longer than max_length=32" in result.err
    # DPO truncates a pair too, but one whose prompt alone fills max_length is dropped (nothing left
    # to compare); when every pair is such, it stops in one line instead of TRL's empty sampler.
    pairs = [{"prompt": "word " * 40, "chosen": "yes", "rejected": "no"}]
    pairs_file = write_jsonl(tmp_path / "long_pairs.jsonl", pairs + [{"prompt": "q", "chosen": "yes", "rejected": "no"}] * 3)
    result = align("dpo", "-m", "tiny", "-d", pairs_file, "-o", tmp_path / "d", "--max-length", "32", "--max-steps", "1")
    assert result.code == 0 and "dropped 1 row(s): prompt alone fills max_length=32" in result.err, result.err
    assert_clean_failure(align("dpo", "-m", "tiny", "-d", write_jsonl(tmp_path / "all_long.jsonl", pairs), "-o",
                               tmp_path / "d2", "--max-length", "32"), 3, "all_long.jsonl", "prompt alone fills max_length=32")


def test_conversational_data_with_a_tokenizer_without_chat_template(align, tiny_model, sft_file, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    import json

    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    result = align("sft", "-m", bare, "-d", sft_file, "-o", tmp_path / "o")
    assert_clean_failure(result, 3, "needs a chat template", "model.chat_template")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--lr", "-1e-4"], "train.learning_rate"),
        (["--set", "lora.r=0"], "lora.r"),
        (["--max-steps", "0"], "train.max_steps"),
        (["--set", "train.lerning_rate=1"], "did you mean 'learning_rate'"),
        (["--set", "nonsense"], "expected KEY=VALUE"),
        (["--report-to", "neptune"], "train.report_to"),
    ],
)
def test_invalid_config_values(align, sft_file, tmp_path, flags, fragment):
    out = tmp_path / "o"
    assert_clean_failure(align("sft", "-m", "tiny", "-d", sft_file, "-o", out, *flags), 2, fragment)
    assert not out.exists()


def test_required_flags(align, sft_file, tmp_path):
    assert_clean_failure(align("sft", "-d", sft_file, "-o", tmp_path / "o"), 2, "--model is required")
    assert_clean_failure(align("dpo", "-m", "tiny", "-o", tmp_path / "o"), 2, "--data is required")


def test_bad_model_paths(align, sft_file, tmp_path):
    assert_clean_failure(align("sft", "-m", tmp_path / "nope", "-d", sft_file, "-o", tmp_path / "o"), 4, "model not found")
    (tmp_path / "notmodel").mkdir()
    assert_clean_failure(align("sft", "-m", tmp_path / "notmodel", "-d", sft_file, "-o", tmp_path / "o"), 4, "no config.json")
    assert_clean_failure(align("sft", "-m", "nobody-here/no-model", "-d", sft_file, "-o", tmp_path / "o"), 4,
                         "nobody-here/no-model", "Hugging Face Hub", "local directory")


def test_qlora_without_bitsandbytes(align, sft_file, tmp_path, monkeypatch):
    from align import models

    monkeypatch.setattr(models, "has_bitsandbytes", lambda: False)
    assert_clean_failure(align("sft", "-m", "tiny", "-d", sft_file, "-o", tmp_path / "o", "--qlora"), 4, "bitsandbytes")


def test_non_empty_output_is_refused_and_left_alone(align, sft_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_clean_failure(align("sft", "-m", "tiny", "-d", sft_file, "-o", out), 5, "not empty", "--overwrite", "--resume")
    assert (out / "notes.txt").read_text() == "mine"
    assert align("sft", "-m", "tiny", "-d", sft_file, "-o", out, "--overwrite", "--max-steps", "1").code == 0
    assert not (out / "notes.txt").exists() and (out / "align.json").exists()


def test_an_output_that_is_or_holds_the_stages_own_input_is_refused_even_with_overwrite(align, sft_file, tmp_path):
    """merge -m X -o X --overwrite deleted the adapter it was about to merge (then a traceback); the same for a stage
    whose output folder holds its model or whose output file is its prompts or reward code."""
    runs = tmp_path / "runs"
    sft = runs / "sft"
    assert align("sft", "-m", "tiny", "-d", sft_file, "-o", sft, "--max-steps", "1").code == 0
    before = sorted(p.name for p in sft.iterdir())
    assert_clean_failure(align("merge", "-m", sft, "-o", sft, "--overwrite"), 5, str(sft), "this stage reads it")
    assert_clean_failure(align("dpo", "-m", sft, "-d", sft_file, "-o", runs, "--overwrite"), 5, str(sft), "holds")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    assert_clean_failure(align("generate", "-m", sft, "-p", prompts, "-o", prompts, "--overwrite"), 5, "prompts.jsonl")
    assert sorted(p.name for p in sft.iterdir()) == before and prompts.read_text() == '{"prompt": "Hi"}\n'
    # Beside or inside an input is fine: an eval written into the model's folder
    assert align("eval", "-m", sft, "-p", prompts, "-o", sft / "eval.json", "--no-reference", "--max-new-tokens", "2").code == 0


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_writes_no_manifest(align, sft_file, tmp_path):
    out = tmp_path / "o"
    # Adam moves every weight by ~lr on step 1; lr=1e30 overflows the next forward pass to NaN.
    result = align("sft", "-m", "tiny", "-d", sft_file, "-o", out, "--no-lora", "--lr", "1e30",
                   "--max-steps", "5", "--set", "train.save_steps=1", "--set", "train.max_grad_norm=1e9")
    assert_clean_failure(result, 6, "became nan", "last good checkpoint")
    assert (out / "checkpoints" / "checkpoint-1").is_dir()
    nothing_finished(out)


def test_errors_from_a_real_process_are_one_line_without_traceback(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "align", "sft", "-m", "tiny", "-d", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert process.returncode == 3
    assert process.stderr.strip().splitlines() == [f"align: error: {tmp_path / 'missing.jsonl'}: data file not found"]


def test_unknown_command_and_flag_are_usage_errors(align):
    assert align("sfx").code == 2
    assert align("sft", "--no-such-flag").code == 2


def test_report_to_a_tracker_that_is_not_installed(align, sft_file, tmp_path):
    import importlib.util

    missing = next((t for t in ("mlflow", "wandb", "trackio") if importlib.util.find_spec(t) is None), None)
    if missing is None:
        pytest.skip("every tracker is installed here")
    out = tmp_path / "o"
    assert_clean_failure(align("sft", "-m", "tiny", "-d", sft_file, "-o", out, "--report-to", missing), 2,
                         f"needs the {missing} package")
    assert not (out / "align.json").exists()


@pytest.mark.parametrize("command", [
    ["generate"], ["best-of-n", "-n", "2", "--reward-fn", "{scorers}:length"], ["eval", "--no-reference", "--reward-fn", "{scorers}:length"],
    ["label", "--question", "Which is better?"], ["label-steps", "--answer-fn", "{scorers}:short", "--rollouts", "1"],
])
def test_a_prompt_with_no_room_to_answer_is_refused_before_sampling(align, reward_file, tmp_path, command):
    """Past the context (512 positions in the tiny model) learned positions fail and rotary ones give
    noise: every stage that samples names the row instead, before it writes anything."""
    prompts = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "short"}, {"prompt": "word " * 300}])
    model = ["--policy", "tiny", "--judge", "tiny"] if command[0] == "label" else ["-m", "tiny"]
    out = tmp_path / ("out.json" if command[0] == "eval" else "out.jsonl")
    args = [a.format(scorers=reward_file) for a in command]
    assert_clean_failure(align(*args, *model, "--prompts", prompts, "-o", out, "--max-new-tokens", "4"), 3,
                         "long.jsonl: row 2", "exceeds the model's context of 512")
    assert not out.exists()


def test_a_sampling_stage_refuses_to_hold_prompts_out(align, prompts_file, tmp_path):
    """eval_fraction held a seeded share of the prompts out of `generate` unsaid: it samples them all."""
    out = tmp_path / "out.jsonl"
    assert_clean_failure(align("generate", "-m", "tiny", "--prompts", prompts_file, "-o", out, "--set", "prompts.eval_fraction=0.5"),
                         2, "prompts.eval_fraction holds prompts out", "remove prompts.eval_fraction")
    assert not out.exists()


def test_label_steps_leaves_room_for_a_rollout_after_a_whole_solution(align, reward_file, tmp_path):
    """Rollouts continue a solution from its steps: with --answer-fn the prompt needs room for
    max_new_tokens twice (tiny model: 512 positions)."""
    prompts = write_jsonl(tmp_path / "mid.jsonl", [{"prompt": "word " * 120}])  # over 256 tokens, under 412
    out = tmp_path / "steps.jsonl"
    assert_clean_failure(align("label-steps", "-m", "tiny", "--prompts", prompts, "-o", out, "--answer-fn",
                               f"{reward_file}:short", "--rollouts", "1", "--max-new-tokens", "100"), 3,
                         "mid.jsonl: row 1", "max_new_tokens=100 twice (a solution, then rollouts from its steps)")
    assert not out.exists()
