"""align best-of-n: the best of n scored samples per prompt, best-vs-worst pairs, resumable; and
align eval --best-of, the best-of-n policy evaluated as an arm of its own."""

import json
import math
from types import SimpleNamespace

import pytest

from conftest import assert_clean_failure, interrupt_on_call


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def best_of_n(align, prompts, out, *extra):
    return align("best-of-n", "-m", "tiny", "-p", prompts, "-o", out, "-n", "4", "--max-new-tokens", "8", "--batch-size", "8",
                 *extra)


def test_the_best_sample_is_kept_and_paired_with_the_worst(align, prompts_file, reward_file, tmp_path):
    out = tmp_path / "bon"
    result = best_of_n(align, prompts_file, out, "--reward-fn", f"{reward_file}:length")
    assert result.code == 0, result.err
    samples, best, pairs = (read_rows(out / f"{name}.jsonl") for name in ("samples", "best", "pairs"))
    assert len(samples) == 5 * 4
    for chosen, pair in zip(best, pairs, strict=True):
        mine = [s for s in samples if s["prompt"] == chosen["prompt"]]
        assert all(isinstance(s["finished"], bool) for s in mine)
        assert chosen["finished"] == next(s["finished"] for s in mine if s["completion"] == chosen["completion"])
        lengths = [len(s["completion"]) for s in mine]
        assert [s["score"] for s in mine] == lengths  # the reward is the length in characters
        assert chosen["score"] == max(lengths) == len(chosen["completion"])
        assert (pair["chosen"], pair["margin"]) == (chosen["completion"], max(lengths) - min(lengths))
        assert len(pair["rejected"]) == min(lengths) and pair["margin"] > 0
        finished = {s["completion"]: s["finished"] for s in mine}  # each side says whether it was cut, for dpo
        assert (pair["chosen_finished"], pair["rejected_finished"]) == (finished[pair["chosen"]], finished[pair["rejected"]])
    manifest = json.loads((out / "align.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["kl_bound"] == pytest.approx(math.log(4) - 3 / 4)  # 0.6363
    assert metrics["mean_sample_score"] == pytest.approx(sum(s["score"] for s in samples) / 20)
    assert metrics["mean_best_score"] == pytest.approx(sum(b["score"] for b in best) / len(best))
    assert metrics["kept"] + metrics["skipped_min_gap"] == 5 and metrics["mean_best_score"] > metrics["mean_sample_score"]
    assert manifest["completed"] and not (out / "progress.json").exists()


def test_keep_writes_the_best_k_samples_of_each_prompt_best_first(align, prompts_file, reward_file, tmp_path):
    out = tmp_path / "bon"
    assert best_of_n(align, prompts_file, out, "--reward-fn", f"{reward_file}:length", "--keep", "2").code == 0
    samples, best = read_rows(out / "samples.jsonl"), read_rows(out / "best.jsonl")
    kept = {row["prompt"] for row in best}
    assert kept and all(len(r["completion"]) > 0 for r in best)
    for prompt in kept:
        mine = sorted((s for s in samples if s["prompt"] == prompt and s["completion"].strip()), key=lambda s: -s["score"])
        rows = [r for r in best if r["prompt"] == prompt]
        assert [(r["completion"], r["score"], r["finished"]) for r in rows] == [
            (s["completion"], s["score"], s["finished"]) for s in mine[:2]]
    metrics = json.loads((out / "align.json").read_text())["metrics"]
    assert metrics["best_rows"] == len(best) == 2 * metrics["kept"]
    assert metrics["mean_best_score"] == pytest.approx(sum(r["score"] for r in best[::2]) / metrics["kept"])
    # Keeping every sample selects nothing: refused before anything loads.
    assert_clean_failure(best_of_n(align, prompts_file, tmp_path / "all", "--reward-fn", f"{reward_file}:length", "--keep", "4"),
                         2, "keep=4 keeps every one of num_samples=4")
    assert not (tmp_path / "all").exists()


def test_prompts_whose_samples_all_score_alike_are_skipped_and_counted(align, prompts_file, reward_file, tmp_path):
    out = tmp_path / "bon"
    assert best_of_n(align, prompts_file, out, "--reward-fn", f"{reward_file}:constant").code == 0
    assert read_rows(out / "best.jsonl") == [] == read_rows(out / "pairs.jsonl")
    metrics = json.loads((out / "align.json").read_text())["metrics"]
    assert (metrics["kept"], metrics["skipped_min_gap"]) == (0, 5)
    # --min-gap: a pair must differ by more than this; a huge gap keeps nothing.
    assert best_of_n(align, prompts_file, tmp_path / "gap", "--reward-fn", f"{reward_file}:length", "--min-gap", "1000").code == 0
    assert json.loads((tmp_path / "gap" / "align.json").read_text())["metrics"]["skipped_min_gap"] == 5


def test_min_score_keeps_the_prompts_always_solved_and_drops_those_never_solved():
    """ReST-EM with a 0/1 reward, by hand: p0's samples all score 1 (always solved), p1's all 0 (never), p2's 1, 0, 1, 0,
    p3 has one non-empty sample, scoring 1. Without --min-score only p2 differs, so only p2 gets a best; with
    --min-score 1, p0, p2 and p3 do (p2's both right samples with keep 2); p1 none. Pairs need a gap either way."""
    import torch

    from align.generation import Completion
    from align.stages.best_of_n import choose

    scores = [1.0] * 4 + [0.0] * 4 + [1.0, 0.0, 1.0, 0.0] + [1.0, 0.0]
    texts = [f"sample {k}" for k in range(len(scores) - 1)] + [" "]
    samples = [[Completion(t, [], True) for t in texts[k:k + 4]] for k in (0, 4, 8)] + [[Completion(t, [], True) for t in texts[12:]]]
    reward = lambda prompts, completions: torch.tensor(scores)  # noqa: E731
    prompts = ["p0", "p1", "p2", "p3"]
    rows, counts = choose(prompts, samples, reward, 0.0)
    assert [r["completion"] for r in rows["best"]] == ["sample 8"] and counts["kept"] == counts["pairs"] == 1
    assert counts["skipped"] == 3 and counts["below_min_score"] == 0
    rows, counts = choose(prompts, samples, reward, 0.0, keep=2, min_score=1.0)
    assert [(r["prompt"], r["completion"]) for r in rows["best"]] == [
        ("p0", "sample 0"), ("p0", "sample 1"), ("p2", "sample 8"), ("p2", "sample 10"), ("p3", "sample 12")]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows["pairs"]] == [("p2", "sample 8", "sample 9")]
    assert (counts["kept"], counts["best_rows"], counts["pairs"], counts["skipped"], counts["below_min_score"]) == (3, 5, 1, 3, 1)
    # A threshold between the scores keeps only what reaches it: p2's right samples, not its wrong ones.
    rows, _ = choose(prompts, samples, reward, 0.0, keep=3, min_score=0.5)
    assert [r["completion"] for r in rows["best"] if r["prompt"] == "p2"] == ["sample 8", "sample 10"]


def test_the_same_text_scored_twice_is_never_a_pair():
    """A reward model scores one text a little differently in batches of other shapes: p0's three samples are one text
    (no pair, and no best without --min-score); p1's worst-scored sample repeats its best text, so its pair is the best
    against the worst of the other texts."""
    import torch

    from align.generation import Completion
    from align.stages.best_of_n import choose

    samples = [[Completion("same", [], True)] * 3, [Completion(t, [], True) for t in ("good", "fine", "good ")]]
    scores = torch.tensor([1.0, 1.0 + 1e-6, 1.0 - 1e-6, 2.0 + 1e-6, 1.5, 2.0 - 1e-6])
    rows, counts = choose(["p0", "p1"], samples, lambda prompts, completions: scores, 0.0)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows["pairs"]] == [("p1", "good", "fine")]
    assert [r["prompt"] for r in rows["best"]] == ["p1"] and counts["skipped"] == 1


def test_min_score_on_the_command_line_keeps_samples_that_all_score_alike(align, prompts_file, reward_file, tmp_path):
    out = tmp_path / "bon"
    assert best_of_n(align, prompts_file, out, "--reward-fn", f"{reward_file}:constant", "--min-score", "1").code == 0
    best, samples = read_rows(out / "best.jsonl"), read_rows(out / "samples.jsonl")
    assert read_rows(out / "pairs.jsonl") == [] and len(best) == 5
    assert all(row["score"] == 1.0 for row in best)
    firsts = {}
    for s in samples:
        if s["completion"].strip():
            firsts.setdefault(s["prompt_row"], s["completion"])
    assert [row["completion"] for row in best] == list(firsts.values())  # equal scores: the first sampled
    metrics = json.loads((out / "align.json").read_text())["metrics"]
    assert (metrics["kept"], metrics["pairs"], metrics["skipped_min_gap"], metrics["skipped_below_min_score"]) == (5, 0, 5, 0)
    assert best_of_n(align, prompts_file, tmp_path / "high", "--reward-fn", f"{reward_file}:constant", "--min-score", "1.5").code == 0
    assert read_rows(tmp_path / "high" / "best.jsonl") == []
    metrics = json.loads((tmp_path / "high" / "align.json").read_text())["metrics"]
    assert (metrics["kept"], metrics["skipped_below_min_score"]) == (0, 5)
    # A threshold nothing can reach or fail is refused before anything loads.
    assert_clean_failure(best_of_n(align, prompts_file, tmp_path / "nan", "--reward-fn", f"{reward_file}:constant",
                                   "--min-score", "nan"), 2, "min_score: Input should be a finite number")
    assert not (tmp_path / "nan").exists()


def test_a_killed_run_resumes_to_the_same_files(align, prompts_file, reward_file, tmp_path, monkeypatch):
    from align.stages import best_of_n as stage

    common = ["--reward-fn", f"{reward_file}:share_of_e", "--batch-size", "4"]  # one prompt (4 samples) per chunk
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert best_of_n(align, prompts_file, straight, *common).code == 0
    restore = interrupt_on_call(monkeypatch, stage, "choose", 3)  # dies scoring the third prompt
    assert best_of_n(align, prompts_file, killed, *common).code == 130
    assert len(read_rows(killed / "samples.jsonl.partial")) == 2 * 4 and not (killed / "align.json").exists()
    restore()
    assert best_of_n(align, prompts_file, killed, *common, "--resume").code == 0
    for name in ("samples", "best", "pairs"):
        assert read_rows(killed / f"{name}.jsonl") == read_rows(straight / f"{name}.jsonl"), name


def test_best_of_n_feeds_sft_and_dpo_in_a_recipe(align, prompts_file, reward_file, tmp_path):
    recipe = tmp_path / "rs.yaml"
    recipe.write_text(f"""
output_dir: {tmp_path / 'runs'}
model: tiny
train: {{max_steps: 2, batch_size: 2}}
stages:
  - name: round-1
    stage: best-of-n
    prompts: {prompts_file}
    reward_fn: {reward_file}:length
    sampling: {{num_samples: 3, max_new_tokens: 8, batch_size: 6}}
  - name: sft-1
    stage: sft
    data_from: round-1
  - name: round-2
    stage: best-of-n
    from: sft-1
    prompts: {prompts_file}
    reward_fn: {reward_file}:length
    sampling: {{num_samples: 3, max_new_tokens: 8, batch_size: 6}}
  - name: dpo-2
    stage: dpo
    data_from: round-2
""")
    result = align("run", recipe)
    assert result.code == 0, result.err
    runs = tmp_path / "runs"
    kept = json.loads((runs / "round-1" / "align.json").read_text())["metrics"]["kept"]
    sft = json.loads((runs / "sft-1" / "align.json").read_text())
    assert sft["data"]["source"] == str(runs / "round-1" / "best.jsonl") and sft["data"]["rows_used"] == kept
    # Samples cut at max_new_tokens are marked, and sft trains them without an end of turn.
    best = read_rows(runs / "round-1" / "best.jsonl")
    assert sft["data"]["unfinished"] == sum(not row["finished"] for row in best) > 0
    assert json.loads((runs / "round-2" / "align.json").read_text())["base_model"] == str(runs / "sft-1")
    dpo = json.loads((runs / "dpo-2" / "align.json").read_text())
    assert dpo["data"]["source"] == str(runs / "round-2" / "pairs.jsonl")
    pairs = read_rows(runs / "round-2" / "pairs.jsonl")  # ... and dpo trains a pair's cut side without one either
    assert dpo["data"]["unfinished"] == sum((not p["chosen_finished"]) + (not p["rejected_finished"]) for p in pairs) > 0


def test_best_of_n_bad_input(align, prompts_file, reward_file, tmp_path):
    out = tmp_path / "bon"
    assert_clean_failure(best_of_n(align, prompts_file, out), 2, "exactly one reward source")
    assert_clean_failure(best_of_n(align, prompts_file, out, "--reward-fn", f"{reward_file}:length", "--reward-model", "tiny"),
                         2, "exactly one reward source")
    assert_clean_failure(align("best-of-n", "-m", "tiny", "-p", prompts_file, "-o", out, "-n", "1",
                               "--reward-fn", f"{reward_file}:length"), 2, "num_samples")
    assert_clean_failure(best_of_n(align, prompts_file, out, "--reward-fn", f"{reward_file}:length", "--temperature", "0"),
                         2, "temperature")
    assert not out.exists()
    picky = tmp_path / "picky.py"
    picky.write_text("def score(prompts, completions):\n"
                     "    if any('movie 3' in p for p in prompts):\n        raise ValueError('cannot score movie 3')\n"
                     "    return [1.0 for _ in completions]\n")
    assert_clean_failure(best_of_n(align, prompts_file, out, "--reward-fn", f"{picky}:score"), 2,
                         "cannot score movie 3", "first on prompt 'Tell me about movie 3.'")
    assert not (out / "align.json").exists()
    assert_clean_failure(best_of_n(align, prompts_file, tmp_path / "nan", "--reward-fn", f"{reward_file}:not_a_number"),
                         2, "nan")


def test_an_unreachable_judge_keeps_the_scored_prompts_and_resumes(align, prompts_file, tmp_path, tiny_model):
    from judge_server import JudgeServer

    out = tmp_path / "bon"
    args = ["--reward-judge", None, "--question", "Is this kind?", "--batch-size", "4",
            "--set", "reward_judge.tokenizer=tiny", "--set", "reward_judge.top_logprobs=1000",
            "--set", "reward_judge.retries=1", "--set", "reward_judge.backoff=0"]
    with JudgeServer(str(tiny_model)) as server:
        server.fail_after = 8  # one request per sample: it rates two prompts' samples, then goes away
        result = best_of_n(align, prompts_file, out, *[server.url if a is None else a for a in args])
        assert_clean_failure(result, 4, server.url, "--resume")
        assert len(read_rows(out / "samples.jsonl.partial")) == 2 * 4 and not (out / "align.json").exists()
        server.fail_after = None
        assert best_of_n(align, prompts_file, out, *[server.url if a is None else a for a in args], "--resume").code == 0
    assert len(read_rows(out / "samples.jsonl")) == 5 * 4


def test_eval_best_of_scores_the_pick_of_n(align, prompts_file, reward_file, tmp_path):
    """The best-of-4 policy's reward is the mean over prompts of the best of the 4 samples the model
    draws with the same seed (generate draws them alike), and its KL is the bound, not an estimate."""
    samples = tmp_path / "samples.jsonl"
    common = ["-m", "tiny", "-p", prompts_file, "--max-new-tokens", "8", "--batch-size", "8", "--temperature", "0.7"]
    assert align("generate", *common, "-o", samples, "-n", "4").code == 0
    out = tmp_path / "eval.json"
    result = align("eval", *common, "-o", out, "--best-of", "4", "--reward-fn", f"{reward_file}:length", "--no-reference")
    assert result.code == 0, result.err
    metrics = json.loads(out.read_text())
    drawn = read_rows(samples)
    best = [max(len(r["completion"]) for r in drawn if r["prompt"] == p["prompt"]) for p in read_rows(prompts_file)]
    assert metrics[f"reward/{reward_file}:length/mean"] == pytest.approx(sum(best) / len(best))
    assert metrics["samples"] == 5 and metrics["kl_bound"] == pytest.approx(math.log(4) - 3 / 4) and "kl" not in metrics
    assert_clean_failure(align("eval", *common, "-o", tmp_path / "e2.json", "--best-of", "4", "--no-reference"), 2, "--best-of")


def test_eval_best_of_compares_with_the_model_itself(align, prompts_file, sft_file, reward_file, tmp_path):
    """Best-of-N on a stage output is compared with that model sampled plainly (what the pick adds,
    against the model its KL bound is to), not with the model the stage started from."""
    sft = tmp_path / "sft"
    assert align("sft", "-m", "tiny", "-d", sft_file, "-o", sft, "--max-steps", "1").code == 0
    common = ["-m", sft, "-p", prompts_file, "--max-new-tokens", "8", "--batch-size", "8", "--temperature", "0.7"]
    plain = tmp_path / "plain.jsonl"
    assert align("generate", *common, "-o", plain, "-n", "1").code == 0
    out = tmp_path / "eval.json"
    assert align("eval", *common, "-o", out, "--best-of", "4", "--reward-fn", f"{reward_file}:length").code == 0
    metrics = json.loads(out.read_text())
    assert metrics["reference"] == str(sft)
    lengths = [len(r["completion"]) for r in read_rows(plain)]
    assert metrics[f"reward/{reward_file}:length/reference_mean"] == pytest.approx(sum(lengths) / len(lengths))


def test_runs_finished_before_keep_vote_and_min_score_existed_stay_up_to_date(reward_file, tmp_path):
    """A field added later is left out of the config hash at its default: upgrading align never makes
    `align run --resume` redo a finished best-of-n stage (the sentiment benchmark's data stages)."""
    from align.checkpoints import config_hash
    from align.config import BestOfNConfig

    common = {"model": "tiny", "prompts": {"path": "p.jsonl"}, "output": str(tmp_path / "bon"), "reward_fn": f"{reward_file}:length"}
    before = BestOfNConfig(**common).model_dump(mode="json", exclude={"resume", "overwrite", "name", "keep", "vote",
                                                                                         "min_score"})
    assert config_hash(BestOfNConfig(**common)) == config_hash(SimpleNamespace(identity=lambda: before))
    assert config_hash(BestOfNConfig(**common, keep=2)) != config_hash(BestOfNConfig(**common))
    assert config_hash(BestOfNConfig(**common, vote="answers.py:final")) != config_hash(BestOfNConfig(**common))
    assert config_hash(BestOfNConfig(**common, min_score=1.0)) != config_hash(BestOfNConfig(**common))


def test_a_vote_weighted_by_the_scores_picks_the_heaviest_answer_not_the_best_sample():
    """--vote by hand: prompt 0's answers A, B, B, A, none score 0.9, 0.4, 0.5, 0.1, 0.95: A weighs 1.0, B 0.9, so
    the best is A's best sample (0.9), not the best-scored one (0.95, no answer); the pair is it against the worst of
    all (0.1). Prompt 1: A, A, A, B at 0.1 each and 0.9: B (0.9) outweighs three As (0.3). Prompt 2 has no answers."""
    import torch

    from align.generation import Completion
    from align.stages.best_of_n import choose

    scores = [0.9, 0.4, 0.5, 0.1, 0.95, 0.1, 0.1, 0.1, 0.9, 0.2, 0.7]
    texts = [f"sample {k}" for k in range(len(scores))]
    samples = [[Completion(t, [], True) for t in texts[:5]], [Completion(t, [], True) for t in texts[5:9]],
               [Completion(t, [], True) for t in texts[9:]]]
    answers = [["A", "B", "B", "A", None], ["A", "A", "A", "B"], [None, None]]
    rows, counts = choose(["p0", "p1", "p2"], samples, lambda prompts, completions: torch.tensor(scores), 0.0, answers=answers)
    assert [(r["prompt"], r["completion"], r["score"]) for r in rows["best"]] == [("p0", "sample 0", pytest.approx(0.9)),
                                                                                ("p1", "sample 8", pytest.approx(0.9))]
    assert [(r["chosen"], r["rejected"]) for r in rows["pairs"]] == [("sample 0", "sample 3"), ("sample 8", "sample 5")]
    assert rows["pairs"][0]["margin"] == pytest.approx(0.8)
    assert [r["answer"] for r in rows["samples"]] == sum(answers, [])
    assert counts["no_answer"] == 1 and counts["kept"] == 2
    assert counts["vote_share_sum"] == pytest.approx(1.0 / 1.9 + 0.9 / 1.2)
    # Without a vote the best-scored sample wins.
    rows, _ = choose(["p0", "p1", "p2"], samples, lambda prompts, completions: torch.tensor(scores), 0.0)
    assert [r["completion"] for r in rows["best"]] == ["sample 4", "sample 8", "sample 10"]


def test_best_of_n_vote_end_to_end_and_its_bad_input(align, prompts_file, reward_file, pairs_file, tmp_path):
    voters = tmp_path / "voters.py"
    voters.write_text("def first_word(prompts, completions):\n"
                      "    return [c.split()[0] if c.split() else None for c in completions]\n\n"
                      "def a_list(prompts, completions):\n    return [[1] for _ in completions]\n\n"
                      "def negative(prompts, completions):\n    return [-1.0 for _ in completions]\n")
    out = tmp_path / "bon"
    result = best_of_n(align, prompts_file, out, "--reward-fn", f"{reward_file}:length", "--vote", f"{voters}:first_word")
    assert result.code == 0, result.err
    samples, best = read_rows(out / "samples.jsonl"), read_rows(out / "best.jsonl")
    assert best
    for chosen in best:
        mine = [s for s in samples if s["prompt"] == chosen["prompt"] and s["completion"].strip()]
        assert all(s["answer"] == s["completion"].split()[0] for s in mine)
        weights = {}
        for s in mine:
            weights[s["answer"]] = weights.get(s["answer"], 0.0) + s["score"]
        top = max(weights, key=weights.__getitem__)
        assert chosen["score"] == max(s["score"] for s in mine if s["answer"] == top)
        assert chosen["completion"].split()[0] == top
    metrics = json.loads((out / "align.json").read_text())["metrics"]
    assert 0 < metrics["mean_vote_share"] <= 1 and metrics["skipped_no_answer"] == 0
    assert json.loads((out / "align.json").read_text())["config"]["vote"] == f"{voters}:first_word"

    assert_clean_failure(best_of_n(align, prompts_file, tmp_path / "list", "--reward-fn", f"{reward_file}:length",
                                   "--vote", f"{voters}:a_list"), 2, "vote function", "prompt row 1", "[1]")
    assert_clean_failure(best_of_n(align, prompts_file, tmp_path / "neg", "--reward-fn", f"{voters}:negative",
                                   "--vote", f"{voters}:first_word"), 2, "-1", "prompt row 1", "not negative")
    assert_clean_failure(best_of_n(align, prompts_file, tmp_path / "missing", "--reward-fn", f"{reward_file}:length",
                                   "--vote", f"{voters}:nothing"), 2, "vote function", "no function 'nothing'")
    assert not (tmp_path / "missing").exists()
    rm = tmp_path / "rm"  # an outcome reward model scores in logits of any sign: no votes by them
    assert align("rm", "-m", "tiny", "-d", pairs_file, "-o", rm, "--max-steps", "1").code == 0
    assert_clean_failure(best_of_n(align, prompts_file, tmp_path / "by-rm", "--reward-model", rm, "--vote", f"{voters}:first_word"),
                         2, "logits", "vote with a PRM")
    assert not (tmp_path / "by-rm" / "align.json").exists()
