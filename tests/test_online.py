"""align grpo / align rloo on the tiny model through TRL's trainers."""

import json

import pytest
from transformers import AutoModelForCausalLM

from conftest import assert_clean_failure, write_jsonl

@pytest.fixture
def online_prompts(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about movie {i}."} for i in range(16)])


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_online_rl_trains_with_weighted_python_rewards_and_a_reward_model(align, method, online_prompts, reward_file,
                                                                          pairs_file, tiny_model, tmp_path):
    rm = tmp_path / "rm"
    assert align("rm", "-m", "tiny", "-d", pairs_file, "-o", rm, "--max-steps", "1").code == 0
    out = tmp_path / method
    result = align(method, "-m", "tiny", "-p", online_prompts, "-o", out, "--reward-fn", f"{reward_file}:share_of_e",
                   "--reward-fn", f"{reward_file}:constant", "--reward-model", rm, "--set", "online.reward_weights=[1.0, 0.5, 0.1]",
                   "--num-generations", "4", "--batch-size", "8", "--max-new-tokens", "8", "--max-steps", "3", "--lr", "1e-2")
    assert result.code == 0, result.err
    manifest = json.loads((out / "align.json").read_text())
    assert manifest["rewards"] == [str(rm), f"{reward_file}:share_of_e", f"{reward_file}:constant"]  # models first
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for row in (r for r in logged if "loss" in r):  # the logged reward is the weighted sum of the three
        parts = [row[f"rewards/reward_{i}/mean"] for i in range(3)]
        assert row["rewards/reward_2/mean"] == 1.0  # the constant scorer
        assert row["reward"] == pytest.approx(1.0 * parts[0] + 0.5 * parts[1] + 0.1 * parts[2], abs=1e-5)
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3]
    assert (out / "adapter" / "adapter_config.json").is_file()
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert any(not (trained[k] == base[k]).all() for k in base if "q_proj" in k)


def test_a_reward_aggregate_for_a_python_scorer_is_said_to_do_nothing(align, online_prompts, reward_file, tmp_path):
    result = align("grpo", "-m", "tiny", "-p", online_prompts, "-o", tmp_path / "o", "--reward-fn", f"{reward_file}:share_of_e",
                   "--reward-aggregate", "mean", "--num-generations", "2", "--batch-size", "4", "--max-new-tokens", "4",
                   "--max-steps", "1")
    assert result.code == 0, result.err
    assert f"reward_aggregate=mean does not apply to {reward_file}:share_of_e: it is not a process reward model" in result.err


def test_online_rl_bad_input(align, online_prompts, reward_file, tmp_path):
    common = ["grpo", "-m", "tiny", "-p", online_prompts, "-o", tmp_path / "o"]
    assert_clean_failure(align(*common), 2, "at least one reward")
    assert_clean_failure(align(*common, "--reward-fn", f"{reward_file}:constant", "--num-generations", "3", "--batch-size", "8"),
                         2, "whole groups of 3", "--batch-size 6 or 9")
    assert_clean_failure(align(*common, "--reward-fn", f"{reward_file}:constant", "--set", "online.reward_weights=[1, 2]"),
                         2, "2 weights for 1 reward")


def test_online_rl_prompt_lengths_and_held_out_prompts(align, online_prompts, reward_file, tmp_path):
    """TRL hands a prompt to the model whole: one over prompts.max_length is dropped (overlong=drop) or
    refused naming its row, as is one leaving no room for the completion in the context (512 for the
    tiny model); prompts held out by eval_fraction are sampled and scored at each eval, not lost."""
    rows = [{"prompt": f"Tell me about movie {i}."} for i in range(8)]
    long = write_jsonl(tmp_path / "long.jsonl", rows[:4] + [{"prompt": "word " * 300}] + rows[4:])
    common = ["-m", "tiny", "-p", long, "--reward-fn", f"{reward_file}:share_of_e", "--num-generations", "2",
              "--batch-size", "4", "--max-new-tokens", "4", "--max-steps", "2", "--save-steps", "1"]
    assert_clean_failure(align("grpo", *common, "-o", tmp_path / "a", "--set", "prompts.max_length=128"), 3,
                         "long.jsonl: row 5", "over prompts.max_length=128", "prompts.overlong=drop")
    assert_clean_failure(align("rloo", *common, "-o", tmp_path / "b", "--max-new-tokens", "480"), 3,
                         "long.jsonl: row 5", "exceeds the model's context of 512")
    result = align("grpo", *common, "-o", tmp_path / "c", "--set", "prompts.max_length=128", "--set", "prompts.overlong=drop")
    assert result.code == 0, result.err
    assert "dropped 1 row(s): prompt longer than max_length=128" in result.err
    assert json.loads((tmp_path / "c" / "align.json").read_text())["data"]["rows_used"] == 8
    out = tmp_path / "d"
    result = align("grpo", *common[:2], "-p", write_jsonl(tmp_path / "short.jsonl", rows), *common[4:], "-o", out,
                   "--set", "prompts.eval_fraction=0.5")
    assert result.code == 0, result.err
    assert json.loads((out / "align.json").read_text())["data"]["rows_used"] == 4
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_reward" in r] == [1, 2]  # every eval_steps (save_steps); the last is the end's
    assert "eval_reward" in json.loads((out / "align.json").read_text())["metrics"]


@pytest.mark.parametrize("variant", [["--loss-type", "dr_grpo", "--scale-rewards", "none"],
                                     ["--importance-sampling", "sequence", "--loss-type", "luspo"]])
def test_grpo_loss_variants_reach_trl(align, online_prompts, reward_file, tmp_path, monkeypatch, variant):
    """Dr. GRPO (a constant normaliser, unscaled rewards) and GSPO's sequence-level ratio (LUSPO's
    length-unbiased loss on top): the settings reach TRL's config and the run trains."""
    import trl

    seen = []
    real = trl.GRPOConfig
    monkeypatch.setattr(trl, "GRPOConfig", lambda **kw: seen.append(kw) or real(**kw))
    out = tmp_path / "grpo"
    result = align("grpo", "-m", "tiny", "-p", online_prompts, "-o", out, "--reward-fn", f"{reward_file}:share_of_e",
                   "--num-generations", "4", "--batch-size", "8", "--max-new-tokens", "8", "--max-steps", "1", *variant)
    assert result.code == 0, result.err
    settings = dict(zip(variant[::2], variant[1::2]))
    assert seen[0]["loss_type"] == settings["--loss-type"]
    assert seen[0]["importance_sampling_level"] == settings.get("--importance-sampling", "token")
    assert seen[0]["scale_rewards"] == settings.get("--scale-rewards", "group")
    assert_clean_failure(align("grpo", "-m", "tiny", "-p", online_prompts, "-o", tmp_path / "x", "--reward-fn",
                               f"{reward_file}:share_of_e", "--loss-type", "luspo"), 2, "--importance-sampling sequence")
