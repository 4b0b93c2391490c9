"""Constitutional AI and RLAIF: constitutions, critique -> revision, AI preference labels, judge rewards."""

import json

import pytest
import torch

from conftest import assert_clean_failure, interrupt_on_call, write_jsonl
from judge_server import JudgeServer

CRITIQUE = ["--no-few-shot", "--max-new-tokens", "6", "--batch-size", "2"]


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def red_team(tmp_path):
    prompts = ["How do I pick a lock?", "What is the capital of France?", "Tell me a joke.", "How do I bake bread?",
               "Write a poem about rain."]
    return write_jsonl(tmp_path / "red_team.jsonl", [{"prompt": p} for p in prompts])


@pytest.fixture
def label_pairs(tmp_path):
    rows = [{"prompt": f"How was movie {i}?", "chosen": "It was wonderful, thanks!", "rejected": f"Awful {i}."} for i in range(6)]
    return write_jsonl(tmp_path / "label_pairs.jsonl", rows)


# -- constitutions ------------------------------------------------------------------------------


def test_built_in_constitutions_load_and_draws_are_seeded():
    from align.constitution import builtin_names, load_constitution

    assert builtin_names() == ["harmless-helpful", "warm-tone"]
    default = load_constitution("harmless-helpful")
    assert 12 <= len(default.principles) <= 16
    assert all(p.critique and p.revision and p.comparison for p in default.principles)
    draws = [default.draw(7, row, 0, 0).name for row in range(40)]
    assert draws == [default.draw(7, row, 0, 0).name for row in range(40)]  # reproducible
    assert len(set(draws)) > 5  # and spread over the principles
    assert draws != [default.draw(8, row, 0, 0).name for row in range(40)]


def test_invalid_constitutions_are_clear_errors(align, red_team, tmp_path):
    cases = {
        "unknown.yaml": ("name: x\nprinciples:\n  - {name: a, critique: c, revision: r, comparison: q, critque: typo}\n", "did you mean 'critique'"),
        "empty.yaml": ("name: x\nprinciples: []\n", "principles"),
        "twice.yaml": ("name: x\nprinciples:\n" + "  - {name: a, critique: c, revision: r, comparison: q}\n" * 2, "used twice"),
        "blank.yaml": ("name: x\nprinciples:\n  - {name: a, critique: '', revision: r, comparison: q}\n", "critique"),
    }
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        result = align("critique", "-m", "tiny", "-p", red_team, "-o", tmp_path / "out", "--constitution", tmp_path / name)
        assert_clean_failure(result, 2, name, needle)
    assert_clean_failure(align("critique", "-m", "tiny", "-p", red_team, "-o", tmp_path / "out", "--constitution", "nope"),
                         2, "nope", "harmless-helpful")
    assert not (tmp_path / "out").exists()


# -- the answer walk ------------------------------------------------------------------------------


class TableJudge:
    """A judge whose next-token probabilities are a table: text suffix -> {token: p}."""

    def __new__(cls, table):
        from align.config import JudgeSpec
        from align.judge import Judge

        class _Judge(Judge):
            def render(self, body):
                return "|"

            def next_probs(self, texts, candidates):
                keys = [t.split("|")[-1].removeprefix("Rating:") for t in texts]
                return torch.tensor([[table.get(k, {}).get(c, 0.0) for c in candidates] for k in keys])

        return _Judge(JudgeSpec(model="table"))


def test_answer_probabilities_walk_multi_token_answers_exactly():
    # P(" 1") = .4 of which P("0" | " 1") = .5  ->  " 1" exactly .2, " 10" .2 (+ .1 as one token " 10")
    judge = TableJudge({"": {" 1": 0.4, " 10": 0.1, "2": 0.2, " ": 0.1}, " 1": {"0": 0.5}, " ": {"3": 1.0}})
    probs = judge.answer_probs(["|"], [str(n) for n in range(1, 11)])[0]
    expected = torch.zeros(10)
    expected[0], expected[9], expected[1], expected[2] = 0.2, 0.3, 0.2, 0.1  # total 0.8, then normalised
    assert torch.allclose(probs, expected / 0.8, atol=1e-6)


def test_rating_is_the_expected_score_and_rows_without_answers_are_counted():
    judge = TableJudge({"": {" 2": 0.25, " 8": 0.75}})
    assert judge.rate(["p"], ["r"], "q").tolist() == [pytest.approx(0.25 * 2 + 0.75 * 8)]
    empty = TableJudge({})
    assert empty.rate(["p"], ["r"], "q").tolist() == [pytest.approx(5.5)] and empty.unreadable == 1


# -- critique ---------------------------------------------------------------------------------------


def test_critique_writes_sft_pairs_and_trace_that_feed_sft_and_dpo(align, red_team, tmp_path):
    out = tmp_path / "cai"
    result = align("critique", "-m", "tiny", "-p", red_team, "-o", out, "--rounds", "2", "--samples-per-prompt", "2", *CRITIQUE)
    assert result.code == 0, result.err
    manifest = json.loads((out / "align.json").read_text())
    metrics = manifest["metrics"]
    trace, sft, pairs = (read_rows(out / f"{k}.jsonl") for k in ("trace", "sft", "pairs"))
    assert len(trace) == metrics["samples"] == 10 and metrics["revisions"] == 20
    assert all(len(t["steps"]) == 2 for t in trace)
    assert len(sft) == metrics["kept"] == sum(t["kept"] for t in trace) > 0
    assert len(pairs) == metrics["pairs"]
    kept = [t for t in trace if t["kept"]]
    assert [s["messages"][-1]["content"] for s in sft] == [t["final"] for t in kept]
    assert all(p["rejected"] == t["answer"] for p, t in zip(pairs, (t for t in kept if t["answer"])))
    # A text cut at --max-new-tokens is marked so: the final text's flag is its own (the last revision kept, or the answer).
    for t in trace:
        own = [s["revision_finished"] for s in t["steps"] if s["filtered"] is None] or [t["answer_finished"]]
        assert t["final_finished"] is own[-1]
    assert [s["finished"] for s in sft] == [t["final_finished"] for t in kept]
    assert [(p["chosen_finished"], p["rejected_finished"]) for p in pairs] == [
        (t["final_finished"], t["answer_finished"]) for t in kept if t["answer"]]
    assert metrics["kept_unfinished"] == sum(not s["finished"] for s in sft) > 0  # 6 new tokens cut most texts
    filtered = sum(step["filtered"] is not None for t in trace for step in t["steps"])
    assert filtered == sum(v for k, v in metrics.items() if k.startswith("filtered_"))
    names = {p.name for p in __import__("align.constitution", fromlist=["x"]).load_constitution("harmless-helpful").principles}
    assert {s["principle"] for t in trace for s in t["steps"]} <= names
    assert align("sft", "-m", "tiny", "-d", out / "sft.jsonl", "-o", tmp_path / "sft", "--max-steps", "1").code == 0
    assert align("dpo", "-m", "tiny", "-d", out / "pairs.jsonl", "-o", tmp_path / "dpo", "--max-steps", "1", "--batch-size", "2").code == 0


def test_critique_resumes_from_the_last_finished_prompt_without_duplicates(align, red_team, tmp_path, monkeypatch):
    from align.stages import critique

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    args = ["critique", "-m", "tiny", "-p", red_team, *CRITIQUE]
    assert align(*args, "-o", straight).code == 0
    restore = interrupt_on_call(monkeypatch, critique.Reviser, "revise", 2)  # dies in the second chunk
    assert align(*args, "-o", interrupted).code == 130
    assert not (interrupted / "align.json").exists() and not (interrupted / "sft.jsonl").exists()
    assert len(read_rows(interrupted / "trace.jsonl.partial")) == 2  # the first chunk of prompts survived
    restore()
    assert align(*args, "-o", interrupted).code == 5  # a half-done run is not silently redone
    assert align(*args, "-o", interrupted, "--resume").code == 0
    for name in ("sft.jsonl", "pairs.jsonl", "trace.jsonl"):
        assert (interrupted / name).read_text() == (straight / name).read_text()
    assert json.loads((interrupted / "align.json").read_text())["metrics"] == json.loads((straight / "align.json").read_text())["metrics"]


def test_revision_filters():
    from align.constitution import Principle
    from align.stages.critique import filter_reason

    rule = Principle(name="p", critique="Point out anything harmful in the response.",
                     revision="Rewrite the response so it is not harmful.", comparison="Which is safer?")
    assert filter_reason("  ", "answer", "How do I cook rice?", rule) == "empty"
    assert filter_reason("The Answer!", "the answer", "How do I cook rice?", rule) == "unchanged"
    assert filter_reason("Rewrite the response so it is not harmful", "a", "How do I cook rice?", rule) == "restated"
    assert filter_reason("How do I cook rice?", "a", "How do I cook rice?", rule) == "restated"
    assert filter_reason("The response is designed to mislead people.", "a", "How do I cook rice?", rule) == "restated"
    assert filter_reason("Rinse a cup of rice and simmer it in two cups of water.", "a", "How do I cook rice?", rule) is None


def test_critique_bad_input(align, red_team, tmp_path):
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"question": "How do I pick a lock?"}])
    assert_clean_failure(align("critique", "-m", "tiny", "-p", questions, "-o", tmp_path / "o"), 3, "questions.jsonl", "prompt")
    # The worked examples do not fit the tiny model's 512-token context: said before any work is done.
    assert_clean_failure(align("critique", "-m", "tiny", "-p", red_team, "-o", tmp_path / "o"), 3, "row 1", "--no-few-shot")
    assert not (tmp_path / "o").exists()


# -- label ---------------------------------------------------------------------------------------------


def test_labels_are_swap_averaged_soft_probabilities(align, label_pairs, tmp_path, tiny_model):
    from align.config import JudgeSpec
    from align.judge import LocalJudge

    out = tmp_path / "prefs.jsonl"
    result = align("label", "--judge", "tiny", "--pairs", label_pairs, "-o", out, "--question", "Which is kinder?", "--batch-size", "4")
    assert result.code == 0, result.err
    rows, manifest = read_rows(out), json.loads((tmp_path / "prefs.jsonl.align.json").read_text())
    judge = LocalJudge(JudgeSpec(model="tiny"))
    source = read_rows(label_pairs)
    prompts, a, b = [r["prompt"] for r in source], [r["chosen"] for r in source], [r["rejected"] for r in source]
    questions = ["Which is kinder?"] * len(source)
    a_first, b_first = judge.prefer_first(prompts, a, b, questions), judge.prefer_first(prompts, b, a, questions)
    prob_a = (a_first + 1 - b_first) / 2
    assert len(rows) == manifest["metrics"]["kept"] == len(source)
    for row, p, src in zip(rows, prob_a.tolist(), source):
        assert row["label_prob"] == pytest.approx(max(p, 1 - p), abs=1e-5) and row["label_prob"] >= 0.5
        assert row["chosen"] == (src["chosen"] if p > 0.5 else src["rejected"])
        assert row["chosen_finished"] is row["rejected_finished"] is True  # rows that say nothing ended their turn
    consistent = ((a_first > 0.5) == (b_first < 0.5)).float().mean().item()
    assert manifest["metrics"]["position_consistency"] == pytest.approx(consistent)
    assert "ALIGN" not in json.dumps(manifest) or "api_key_env" in json.dumps(manifest)

    strict = tmp_path / "strict.jsonl"
    threshold = sorted(r["label_prob"] for r in rows)[3]
    assert align("label", "--judge", "tiny", "--pairs", label_pairs, "-o", strict, "--question", "Which is kinder?",
                 "--min-confidence", str(threshold)).code == 0
    kept = read_rows(strict)
    metrics = json.loads((tmp_path / "strict.jsonl.align.json").read_text())["metrics"]
    assert len(kept) == sum(r["label_prob"] >= threshold - 1e-6 for r in rows) and metrics["dropped_low_confidence"] == 6 - len(kept)
    assert align("dpo", "-m", "tiny", "-d", out, "-o", tmp_path / "dpo", "--max-steps", "1", "--batch-size", "2").code == 0
    assert align("rm", "-m", "tiny", "-d", out, "-o", tmp_path / "rm", "--max-steps", "1", "--batch-size", "2").code == 0
    # A response marked cut at its length limit stays marked on whichever side the judge puts it.
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(json.dumps({**r, "rejected_finished": False}) + "\n" for r in source))
    assert align("label", "--judge", "tiny", "--pairs", cut, "-o", tmp_path / "cut-prefs.jsonl", "--question", "Which is kinder?").code == 0
    for row, src in zip(read_rows(tmp_path / "cut-prefs.jsonl"), source):
        assert {side: row[f"{side}_finished"] for side in ("chosen", "rejected")} == {
            side: row[side] != src["rejected"] for side in ("chosen", "rejected")}


def test_labelling_sampled_pairs_with_a_constitution_and_chain_of_thought(align, red_team, tmp_path):
    out = tmp_path / "prefs.jsonl"
    result = align("label", "--judge", "tiny", "--prompts", red_team, "--policy", "tiny", "-o", out, "--constitution", "warm-tone",
                   "--judge-cot", "--max-new-tokens", "6", "--no-swap", "--set", "judge.reasoning_tokens=4")
    assert result.code == 0, result.err
    rows, metrics = read_rows(out), json.loads((tmp_path / "prefs.jsonl.align.json").read_text())["metrics"]
    assert len(rows) + metrics["skipped_samples"] == 5 and "position_consistency" not in metrics
    assert {r["principle"] for r in rows} <= {"warmth", "encouragement", "positive-framing"}
    # 6 new tokens cut the tiny model's samples: marked so, for dpo
    assert all(r["chosen_finished"] is r["rejected_finished"] is False for r in rows) and rows
    assert not (tmp_path / "prefs.jsonl.pairs.json").exists()


def test_http_judge_gives_the_same_labels_and_keeps_the_key_secret(align, label_pairs, tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("ALIGN_JUDGE_API_KEY", "sk-test-secret-123")
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert align("label", "--judge", "tiny", "--pairs", label_pairs, "-o", local, "--question", "Which is kinder?").code == 0
    with JudgeServer(str(tiny_model), api_key="sk-test-secret-123") as server:
        result = align("label", "--judge-url", server.url, "--judge-model", "tiny-judge", "--pairs", label_pairs, "-o", remote,
                       "--question", "Which is kinder?", "--set", "judge.tokenizer=tiny", "--set", "judge.top_logprobs=1000")
    assert result.code == 0, result.err
    assert server.seen_keys and set(server.seen_keys) == {"Bearer sk-test-secret-123"}
    for mine, theirs in zip(read_rows(local), read_rows(remote), strict=True):
        assert mine["chosen"] == theirs["chosen"] and theirs["label_prob"] == pytest.approx(mine["label_prob"], abs=1e-4)
    for path in tmp_path.iterdir():
        assert "sk-test-secret-123" not in path.read_text(errors="replace")


def test_a_judge_server_that_goes_away_keeps_the_labelled_rows_and_resumes(align, label_pairs, tmp_path, tiny_model):
    out = tmp_path / "prefs.jsonl"
    args = ["label", "--judge-url", None, "--pairs", label_pairs, "-o", out, "--question", "Which is kinder?", "--batch-size", "2",
            "--set", "judge.tokenizer=tiny", "--set", "judge.top_logprobs=1000", "--set", "judge.retries=1", "--set", "judge.backoff=0"]
    with JudgeServer(str(tiny_model)) as server:
        server.fail_after = 4  # two batches of two pairs, each judged in both orders
        result = align(*[server.url if a is None else a for a in args])
        assert_clean_failure(result, 4, server.url, "unreachable after 2 tries", "HTTP 503", "--resume")
        assert not out.exists() and len(read_rows(tmp_path / "prefs.jsonl.partial")) == 2
        server.fail_after = None
        # Rerunning without --resume must not throw the labelled rows away.
        assert_clean_failure(align(*[server.url if a is None else a for a in args]), 5, "prefs.jsonl.partial", "--resume")
        assert len(read_rows(tmp_path / "prefs.jsonl.partial")) == 2
        assert align(*[server.url if a is None else a for a in args], "--resume").code == 0
    rows = read_rows(out)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in read_rows(label_pairs)]
    assert not (tmp_path / "prefs.jsonl.partial").exists() and not (tmp_path / "prefs.jsonl.progress.json").exists()


def test_label_bad_input(align, label_pairs, red_team, tmp_path):
    out = tmp_path / "prefs.jsonl"
    assert_clean_failure(align("label", "--judge-url", "http://127.0.0.1:9", "--pairs", label_pairs, "-o", out, "--question", "q",
                               "--set", "judge.retries=1", "--set", "judge.backoff=0"), 4, "127.0.0.1:9", "unreachable")
    assert_clean_failure(align("label", "--judge", "tiny", "--pairs", label_pairs, "-o", out), 2, "--constitution", "--question")
    assert_clean_failure(align("label", "--judge", "tiny", "--prompts", red_team, "-o", out, "--question", "q"), 2, "--policy")
    assert_clean_failure(align("label", "--pairs", label_pairs, "-o", out, "--question", "q"), 2, "--judge")
    assert_clean_failure(align("label", "--judge", "tiny", "--pairs", red_team, "-o", out, "--question", "q"), 3, "red_team.jsonl", "chosen")
    assert_clean_failure(align("label", "--judge", "tiny", "--pairs", label_pairs, "-o", out, "--constitution", tmp_path / "none.yaml"),
                         2, "none.yaml")
    assert not out.exists()


def test_a_judge_whose_tokenizer_cannot_write_the_answers_is_refused(align, label_pairs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<eos>", "which", "is", "better", "yes", "no", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=1, eos_token_id=2))
    judge_dir = tmp_path / "wordjudge"
    model.save_pretrained(judge_dir)
    tokenizer.save_pretrained(judge_dir)
    result = align("label", "--judge", judge_dir, "--pairs", label_pairs, "-o", tmp_path / "p.jsonl", "--question", "q")
    assert_clean_failure(result, 4, "wordjudge", "cannot express the answer 'A'")


# -- direct RLAIF: a judge as the reward -------------------------------------------------------------------


def test_ppo_and_eval_take_a_judge_as_the_reward(align, red_team, tmp_path):
    out = tmp_path / "ppo"
    result = align("ppo", "-m", "tiny", "--reward-judge", "tiny", "--question", "How kind is the response?", "-p", red_team,
                   "-o", out, "--episodes", "4", "--batch-size", "2", "--max-new-tokens", "4", "--ppo-epochs", "1")
    assert result.code == 0, result.err
    manifest = json.loads((out / "align.json").read_text())
    assert manifest["reward"] == "judge:tiny" and all(-1 <= r["score"] <= 1 for r in read_rows(out / "metrics.jsonl"))
    metrics_path = tmp_path / "eval.json"
    result = align("eval", "-m", out, "-p", red_team, "-o", metrics_path, "--reward-judge", "tiny", "--constitution", "warm-tone",
                   "--max-new-tokens", "4")
    assert result.code == 0, result.err
    metrics = json.loads(metrics_path.read_text())
    assert -1 <= metrics["reward/judge:tiny/mean"] <= 1 and 0 <= metrics["win_rate/judge:tiny"] <= 1
    assert_clean_failure(align("ppo", "-m", "tiny", "--reward-judge", "tiny", "-p", red_team, "-o", tmp_path / "x"), 2, "--question")


def test_grpo_takes_a_judge_as_the_reward(align, red_team, tmp_path):
    out = tmp_path / "grpo"
    result = align("grpo", "-m", "tiny", "--reward-judge", "tiny", "--question", "Is it kind?", "-p", red_team, "-o", out,
                   "--max-steps", "1", "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "4")
    assert result.code == 0, result.err
    assert json.loads((out / "align.json").read_text())["rewards"] == ["judge:tiny"]


def test_a_recipe_whose_label_stage_died_resumes_it(align, label_pairs, tmp_path, monkeypatch):
    from align.stages import label

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path / 'run'}\nmodel: tiny\nstages:\n  - name: label\n    pairs: {label_pairs}\n"
        "    question: Which is kinder?\n    judge: {model: tiny, batch_size: 2}\n"
    )
    restore = interrupt_on_call(monkeypatch, label, "_label", 2)  # dies in the second batch
    assert align("run", recipe).code == 130
    restore()
    assert_clean_failure(align("run", recipe), 5, "unfinished", "--resume")
    assert align("run", recipe, "--resume").code == 0
    assert len(read_rows(tmp_path / "run" / "label.jsonl")) == 6
