import json

import pytest

from conftest import assert_clean_failure

@pytest.fixture
def dpo_out(align, pairs_file, tmp_path):
    out = tmp_path / "dpo"
    assert align("dpo", "-m", "tiny", "-d", pairs_file, "-o", out, "--max-steps", "6", "--lr", "5e-3", "--beta", "0.5").code == 0
    return out


def test_eval_of_a_dpo_output_reports_rewards_kl_win_rate_and_pair_accuracy(align, dpo_out, prompts_file, pairs_file, reward_file, tmp_path):
    out = tmp_path / "metrics.json"
    args = ["eval", "-m", dpo_out, "-p", prompts_file, "--pairs", pairs_file, "--reward-fn", f"{reward_file}:length",
            "-o", out, "-n", "2", "--max-new-tokens", "8", "--seed", "3", "--set", "sample_table=10"]
    result = align(*args)
    assert result.code == 0, result.err
    metrics = json.loads(out.read_text())
    name = f"{reward_file}:length"
    assert metrics["reference"] == "tiny" and metrics["samples"] == 10
    assert metrics["kl"] > 0  # DPO moved the policy away from the reference
    # Win rate by hand from the table of every sample: the length scorer against the reference's text.
    wins = [(r[name] > len(r["reference"])) + 0.5 * (r[name] == len(r["reference"])) for r in metrics["table"]]
    assert metrics[f"win_rate/{name}"] == pytest.approx(sum(wins) / len(wins)) and metrics[f"reward/{name}/mean"] > 0
    assert metrics["pairs"]["implicit_reward_accuracy"] == 1.0 and metrics["pairs"]["implicit_margin"] > 0
    assert len(metrics["table"]) == 10 and {"prompt", "completion", "reference", name} <= set(metrics["table"][0])
    again = tmp_path / "again.json"
    assert align(*[str(again) if a == out else a for a in args]).code == 0
    assert json.loads(again.read_text()) == metrics


def test_reference_itself_has_zero_kl_and_even_win_rate(align, tiny_model, prompts_file, reward_file, tmp_path):
    out = tmp_path / "m.json"
    result = align("eval", "-m", "tiny", "-p", prompts_file, "--reference", "tiny", "--reward-fn", f"{reward_file}:length",
                   "--reward-fn", f"{reward_file}:jittery", "-o", out, "--max-new-tokens", "8", "--seed", "1")
    assert result.code == 0, result.err
    metrics = json.loads(out.read_text())
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-5)
    assert metrics[f"win_rate/{reward_file}:length"] == 0.5  # same seed, same model: identical samples, all ties
    # Identical texts tie even when their two scores differ in the last digits (5 samples: no 0.5 from wins and losses)
    assert metrics[f"win_rate/{reward_file}:jittery"] == 0.5


def test_eval_of_a_reward_model_measures_pairwise_accuracy(align, pairs_file, tmp_path):
    rm = tmp_path / "rm"
    assert align("rm", "-m", "tiny", "-d", pairs_file, "-o", rm, "--max-steps", "8", "--lr", "5e-3").code == 0
    out = tmp_path / "rm.json"
    assert align("eval", "-m", rm, "--pairs", pairs_file, "-o", out).code == 0
    assert json.loads(out.read_text())["pairs"]["accuracy"] == 1.0


def test_eval_bad_input(align, tiny_model, prompts_file, reward_file, tmp_path):
    assert_clean_failure(align("eval", "-m", tiny_model, "-p", prompts_file, "-o", tmp_path / "a.json"), 2, "--reference")
    common = ["eval", "-m", "tiny", "-p", prompts_file, "--no-reference", "--max-new-tokens", "4"]
    assert_clean_failure(align(*common, "--reward-fn", f"{reward_file}:broken", "-o", tmp_path / "b.json"), 2, "raised ValueError: no scores today")
    assert_clean_failure(align(*common, "--reward-fn", f"{reward_file}:short", "-o", tmp_path / "c.json"), 2, "returned 1 values for 5")
    assert_clean_failure(align(*common, "--reward-fn", f"{reward_file}:missing", "-o", tmp_path / "d.json"), 2, "no function 'missing'")
    assert not any((tmp_path / n).exists() for n in ("a.json", "b.json", "c.json", "d.json"))


def test_pair_accuracy_scores_each_distinct_completion_once():
    """K-choose-2 pairs repeat each completion K-1 times: 3 pairs of 3 completions read 3 texts, not 6,
    and every pair gets its own sides' scores (length of the response here)."""
    import torch

    from align.stages.eval import score_once

    seen = []

    def reward(prompts, responses):
        seen.extend(zip(map(str, prompts), responses))
        return torch.tensor([float(len(r)) for r in responses])

    pairs = [("p", "a", "bb"), ("p", "a", "ccc"), ("p", "bb", "ccc"), ([{"role": "user", "content": "q"}], "a", "bb")]
    items = [(prompt, chosen) for prompt, chosen, _ in pairs] + [(prompt, rejected) for prompt, _, rejected in pairs]
    scores = score_once(reward, items)
    assert scores.tolist() == [1.0, 1.0, 2.0, 1.0, 2.0, 3.0, 3.0, 2.0]
    assert len(seen) == 5 and len(set(seen)) == 5  # p: a, bb, ccc; the message prompt: a, bb
