"""The bad-input corpus (tests/bad_inputs): malformed data files, recipes, models and flags.

For each: a non-zero exit with the documented code, exactly one `align: error:` line that names the
culprit (file and line/row/key, or the flag), no traceback, and no finished-looking output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_clean_failure

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
SFT = ["sft", "-m", "tiny", "-d"]
DPO = ["dpo", "-m", "tiny", "-d"]
RM = ["rm", "-m", "tiny", "-d"]
PPO = ["ppo", "-m", "tiny", "--reward-fn", "REWARD", "-p"]

# (case, command before the input file, input file under bad_inputs/, exit code, what the error names)
DATA_CASES = [
    ("empty file", SFT, "data/empty.jsonl", 3, ["empty.jsonl", "empty"]),
    ("blank lines only", SFT, "data/blank_lines.jsonl", 3, ["blank_lines.jsonl", "empty"]),
    ("truncated JSONL", SFT, "data/truncated.jsonl", 3, ["truncated.jsonl: line 2", "malformed JSON"]),
    ("latin-1 bytes", SFT, "data/latin1.jsonl", 3, ["latin1.jsonl: line 1", "UTF-8"]),
    ("UTF-16 file", SFT, "data/utf16.jsonl", 3, ["utf16.jsonl: line 1", "UTF-8"]),
    ("number where text belongs", SFT, "data/completion_number.jsonl", 3, ["completion_number.jsonl: row 2", "'completion'"]),
    ("messages as a string", SFT, "data/messages_string.jsonl", 3, ["messages_string.jsonl: row 1", "'messages'"]),
    ("message without content", SFT, "data/message_without_content.jsonl", 3, ["message_without_content.jsonl: row 1", "'messages'"]),
    ("blank completion", SFT, "data/empty_completion.jsonl", 3, ["empty_completion.jsonl: row 2", "empty string"]),
    ("row that is a list", SFT, "data/row_is_a_list.jsonl", 3, ["row_is_a_list.jsonl: line 2", "JSON object"]),
    ("duplicated key in a row", SFT, "data/duplicate_keys.jsonl", 3, ["duplicate_keys.jsonl: line 2", "'completion' twice"]),
    ("unknown columns", SFT, "data/unknown_columns.jsonl", 3, ["unknown_columns.jsonl", "found columns ['answer', 'question']"]),
    ("pairs all identical", DPO, "data/identical_pairs.jsonl", 3, ["identical_pairs.jsonl", "no"]),
    ("pair without rejected", DPO, "data/missing_rejected.jsonl", 3, ["missing_rejected.jsonl: row 2", "'rejected'"]),
    ("margin that is text", RM, "data/margin_text.jsonl", 3, ["margin_text.jsonl: row 1", "'margin'"]),
    ("ranked row with a score missing", RM, "data/ranked_scores_short.jsonl", 3, ["ranked_scores_short.jsonl: row 2", "one number per completion (3)"]),
    ("ranked score that is text", RM, "data/ranked_score_text.jsonl", 3, ["ranked_score_text.jsonl: row 1", "score 1", "'high'"]),
    ("ranked row with one completion", RM, "data/ranked_one_completion.jsonl", 3, ["ranked_one_completion.jsonl: row 3", "at least two"]),
    ("ranked rows all tied", RM, "data/ranked_all_ties.jsonl", 3, ["ranked_all_ties.jsonl", "no prompt has two completions to compare"]),
    ("null prompt", PPO, "data/null_prompt.jsonl", 3, ["null_prompt.jsonl: row 2", "'prompt'"]),
    ("prompt longer than the context", PPO, "data/long_prompt.jsonl", 3, ["long_prompt.jsonl: row 2", "context"]),
    ("CSV with other columns", SFT, "data/wrong_header.csv", 3, ["wrong_header.csv", "found columns"]),
    ("text posing as parquet", SFT, "data/not_parquet.parquet", 3, ["not_parquet.parquet", "parquet"]),
    ("unsupported file type", SFT, "data/notes.txt", 3, ["notes.txt", "unsupported file type"]),
    ("JSON object, not a list", SFT, "data/object_not_list.json", 3, ["object_not_list.json", "JSON list"]),
    ("truncated JSON", SFT, "data/truncated.json", 3, ["truncated.json: line 1", "malformed JSON"]),
    ("JSON list item not an object", SFT, "data/item_not_object.json", 3, ["item_not_object.json: item 1", "JSON object"]),
    ("a directory as data", SFT, "data", 3, ["data: is a directory"]),
    ("missing data file", SFT, "data/nope.jsonl", 3, ["nope.jsonl: data file not found"]),
]

RECIPE_CASES = [
    ("from: a later stage (a cycle)", "cycle.yaml", 2, ["cycle.yaml", "stages[0] (a)", "'from: b' is not an earlier stage"]),
    ("from: a misspelt stage", "unknown_from.yaml", 2, ["unknown_from.yaml", "'from: stf'", "earlier stages: sft"]),
    ("no stages key", "no_stages.yaml", 2, ["no_stages.yaml", "stages"]),
    ("empty stages list", "empty_stages.yaml", 2, ["empty_stages.yaml", "stages"]),
    ("a number that is a word", "wrong_type.yaml", 2, ["wrong_type.yaml", "train.max_steps"]),
    ("misspelt key", "misspelt_key.yaml", 2, ["misspelt_key.yaml", "lerning_rate", "learning_rate"]),
    ("two stages with one name", "duplicate_names.yaml", 2, ["duplicate_names.yaml", "'sft'"]),
    ("YAML syntax error", "syntax_error.yaml", 2, ["syntax_error.yaml", "line"]),
    ("a list, not a mapping", "top_level_list.yaml", 2, ["top_level_list.yaml", "mapping"]),
    ("a key given twice", "duplicate_key.yaml", 2, ["duplicate_key.yaml", "line 7", "'train' twice"]),
    ("a data file that is not there", "missing_data_file.yaml", 3, ["nope.jsonl", "not found"]),
    ("an unknown stage type", "unknown_stage_type.yaml", 2, ["unknown_stage_type.yaml", "finetune"]),
]

FLAG_CASES = [
    ("batch size 0", ["--batch-size", "0"], 2, ["train.batch_size"]),
    ("negative learning rate", ["--learning-rate", "-1"], 2, ["train.learning_rate"]),
    ("--set without =", ["--set", "train.max_steps"], 2, ["train.max_steps", "KEY=VALUE"]),
    ("--set of an unknown key", ["--set", "train.bogus=1"], 2, ["train.bogus"]),
    ("zero processes", ["--num-processes", "0"], 2, ["--num-processes 0"]),
    ("an eval fraction of 2", ["--eval-fraction", "2"], 2, ["data.eval_fraction"]),
    ("a column mapping to no column", ["--set", "data.columns.prompt=question"], 3, ["ok.jsonl", "'question'", "not in the file"]),
    ("an unknown lr scheduler", ["--lr-scheduler", "cosine-ish"], 2, ["train.lr_scheduler", "cosine-ish"]),
]


@pytest.mark.parametrize("case, command, relative, code, needles", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_files(align, tmp_path, reward_file, case, command, relative, code, needles):
    out = tmp_path / "out"
    command = [f"{reward_file}:share_of_e" if arg == "REWARD" else arg for arg in command]
    assert_clean_failure(align(*command, CORPUS / relative, "-o", out, "--max-steps", "1"), code, *needles)
    assert not (out / "align.json").exists()


@pytest.mark.parametrize("case, recipe, code, needles", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipes(align, tmp_path, case, recipe, code, needles):
    copied = tmp_path / "recipes"
    shutil.copytree(CORPUS / "recipes", copied)
    shutil.copytree(CORPUS / "data", tmp_path / "data")
    assert_clean_failure(align("run", copied / recipe), code, *needles)
    assert not list(copied.glob("**/align.json"))


@pytest.mark.parametrize("case, flags, code, needles", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_flags(align, tmp_path, case, flags, code, needles):
    out = tmp_path / "out"
    assert_clean_failure(align(*SFT, CORPUS / "data/ok.jsonl", "-o", out, *flags), code, *needles)
    assert not out.exists()


@pytest.fixture
def broken_models(tiny_model, tmp_path) -> dict[str, Path]:
    """Model directories a user might point align at by mistake, made from the tiny model."""
    import torch
    from safetensors.torch import load_file

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(tiny_model, target)
        return target

    no_weights = copy("no-weights")
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()
    pickled = copy("pickled")
    for weights in pickled.glob("*.safetensors"):
        torch.save(load_file(weights), pickled / "pytorch_model.bin")
        weights.unlink()
    bad_config = copy("bad-config")
    (bad_config / "config.json").write_text('{"model_type": "llama", ')
    return {"no-weights": no_weights, "pickled": pickled, "bad-config": bad_config}


MODEL_CASES = [
    ("a model dir without weights", "no-weights", 4, ["no-weights"]),
    ("pickled weights only", "pickled", 4, ["pickled", "pytorch_model.bin", "--allow-pickle"]),
    ("a config.json that is not JSON", "bad-config", 4, ["bad-config"]),
]


@pytest.mark.parametrize("case, model, code, needles", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_models(align, broken_models, tmp_path, case, model, code, needles):
    out = tmp_path / "out"
    assert_clean_failure(align("sft", "-m", broken_models[model], "-d", CORPUS / "data/ok.jsonl", "-o", out), code, *needles)
    assert not (out / "align.json").exists()


def test_a_reward_model_as_the_policy(align, tmp_path):
    rm = tmp_path / "rm"
    assert align(*RM, CORPUS / "data/ok_pairs.jsonl", "-o", rm, "--max-steps", "1").code == 0
    assert_clean_failure(align(*SFT[:2], rm, "-d", CORPUS / "data/ok.jsonl", "-o", tmp_path / "o"), 4,
                         "ForSequenceClassification", "not a causal language model")


def test_pickled_weights_load_when_allowed(align, broken_models, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_ALLOW_PICKLE", "0")  # restored after the test: --allow-pickle sets it
    out = tmp_path / "out"
    result = align("--allow-pickle", "sft", "-m", broken_models["pickled"], "-d", CORPUS / "data/ok.jsonl", "-o", out, "--max-steps", "1")
    assert result.code == 0, result.err
    assert json.loads((out / "align.json").read_text())["completed"]



def test_a_missing_adapter_and_a_missing_recipe_stage(align, tmp_path):
    assert_clean_failure(align("merge", "-m", tmp_path / "nope", "-o", tmp_path / "m"), 4, "nope: not found")
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml"
    assert_clean_failure(align("sft", "--config", recipe, "--stage", "sft2"), 2, "no sft stage is named 'sft2'", "sft")
