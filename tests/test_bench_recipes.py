"""The benchmarks' recipes are valid align recipes (their stages, keys and values), so a
typo in bench/sentiment.py or bench/arith.py fails here, not an hour into a run."""

from __future__ import annotations

import sys

import pytest
import yaml

from conftest import ROOT


@pytest.mark.parametrize("plan", ["FULL", "QUICK"])
def test_sentiment_recipes_validate(align, tmp_path, monkeypatch, plan):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sentiment
    finally:
        sys.path.remove(str(ROOT / "bench"))
    chosen = getattr(sentiment, plan)
    recipe = sentiment.arms_recipe(chosen)
    (tmp_path / "arms.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = align("run", "arms.yaml", "--dry-run")
    assert result.code == 0, result.err
    names = [stage["name"] for stage in recipe["stages"]]
    for name in names:
        assert name in result.out
    assert sum(n.startswith("dpo-b") for n in names) == len(chosen.dpo_betas)
    assert sum(n.startswith("ppo-kl") for n in names) == len(chosen.ppo_kl_coefs)
    assert sum(n.startswith("rs-samples-") for n in names) == chosen.rs_rounds
    rm = next(stage for stage in recipe["stages"] if stage["name"] == "rm")
    assert rm["train"]["batch_size"] * chosen.rm_samples in (16, 20)  # about 16 completions a step
    # Round 1 at every epoch count, each a point; rounds after it at the first.
    assert sum(n.startswith("rs-") and not n.startswith("rs-samples") for n in names) == len(chosen.rs_epochs) + chosen.rs_rounds - 1
    if plan == "FULL":
        assert "rs-1-e1" in names and chosen.rm_samples == 20 and chosen.rs_samples == 16


def test_sentiment_rm_accuracy_counts_the_pairs_the_data_keeps(monkeypatch):
    """Hand-worked: the RM's order against VADER's over an opening's pairs, near-ties and empty samples left out."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sentiment
    finally:
        sys.path.remove(str(ROOT / "bench"))
    gold = {"good": 0.9, "fine": 0.5, "meh": 0.45, "bad": -0.5, " ": 0.0}
    monkeypatch.setattr(sentiment, "score", gold.get)
    rows = [{"prompt": "p", "completion": c, "score": s} for c, s in (("good", 3.0), ("fine", 1.0), ("meh", 2.0), ("bad", 1.5), (" ", 9.0))]
    # Pairs over gap 0.1: good>fine (RM agrees), good>meh (agrees), good>bad (agrees), fine>bad (RM: 1.0 < 1.5, wrong),
    # meh>bad (agrees); fine vs meh is a near-tie and " " is empty.
    assert sentiment.rm_accuracy(rows, 0.1) == {"accuracy": 0.8, "count": 5}


def test_arith_checkers_by_hand():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from data import arith_tasks as tasks
    finally:
        sys.path.remove(str(ROOT / "bench"))
    prompt = tasks.INSTRUCTION.format(problem="Start with 7. Add 5. Multiply by 2. Subtract 3.")
    right = ["7 + 5 = 12", "12 * 2 = 24", "24 - 3 = 21", "Answer: 21"]
    assert tasks.solution_steps(7, [("Add", 5), ("Multiply by", 2), ("Subtract", 3)]) == right
    assert tasks.right_steps([prompt], [right]) == [[True] * 4]
    # One step off by 2, carried on: judged on its own, that step is the only wrong one; on track, every later one is
    # wrong too, the answer among them.
    twin = tasks.solution_steps(7, [("Add", 5), ("Multiply by", 2), ("Subtract", 3)], wrong_at=1, off=2)
    assert twin == ["7 + 5 = 12", "12 * 2 = 26", "26 - 3 = 23", "Answer: 23"]
    assert tasks.step_labels(prompt, twin) == [True, False, True, True]
    assert tasks.on_track_labels(prompt, twin) == [True, False, False, False]
    # A step that does not start from the value reached, or the wrong operation, or an unreadable step (and all after it).
    assert tasks.step_labels(prompt, ["7 + 5 = 12", "13 * 2 = 26", "26 - 3 = 23", "Answer: 23"]) == [True, False, True, True]
    assert tasks.step_labels(prompt, ["7 + 5 = 12", "12 + 2 = 14", "14 - 3 = 11", "Answer: 11"]) == [True, False, True, True]
    assert tasks.step_labels(prompt, ["7 + 5 = 12", "twice that", "26 - 3 = 23", "Answer: 23"]) == [True, False, False, False]
    assert tasks.step_labels(prompt, right[:3] + ["Answer: 22"]) == [True] * 3 + [False]
    assert tasks.step_labels(prompt, right + ["more"]) == tasks.on_track_labels(prompt, right + ["more"]) == [True] * 4 + [False]
    assert tasks.right_answer([prompt] * 3, ["\n".join(right), "\n".join(twin), "21"]) == [True, False, False]


def test_the_arith_benchmark_runs_end_to_end_on_the_tiny_model(tmp_path):
    """Every stage of bench/arith.py (sft, label-steps both ways, a PRM on ranked sibling steps and an ORM on ranked
    twins, a PRM on Math-Shepherd labels, eval pairs, dense-PRM and ORM PPO) and its tables."""
    import json
    import subprocess

    out = tmp_path / "arith.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "arith.py"), "--smoke", "--work", str(tmp_path / "work"),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["stages_finished"] == "13 of 13"
    assert set(results["best_of_n"]) == {"majority vote", "policy's lowest token log-prob", "PRM (Math-Shepherd labels), min",
                                         "PRM (Math-Shepherd labels), prod", "PRM (sibling steps ranked), min",
                                         "PRM (sibling steps ranked), prod", "ORM (twins ranked)",
                                         "PRM (sibling steps ranked), min-weighted vote", "ORM (twins ranked), weighted vote",
                                         "oracle (any right)"}
    assert set(results["ppo"]) == {"ppo-prm", "ppo-orm"}
    assert set(results["pairwise"]) == {"prm-twins", "prm-twins-prod", "orm-twins", "policy"}
    probe = results["separator_probe"]
    assert len(probe["probe_auroc_by_layer"]) == 3 and 0 <= probe["policy_lowest_log_prob_auroc"] <= 1  # tiny: 2 layers + embeddings
    assert out.with_suffix(".png").stat().st_size > 0

    # The policy's own step scores: each step's lowest token log-prob given everything before it (the
    # steps tokenized as a PRM reads them), the separators left out; a later step leaves an earlier one's score.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "bench"))
    from arith import lowest_step_logprobs

    from align.data import prompt_ids

    runs, prompt = tmp_path / "work" / "runs", "Start with 7. Add 5. Multiply by 2."
    right, slipped = lowest_step_logprobs(runs / "sft", [prompt, prompt], ["7 + 5 = 12\n12 * 2 = 24\nAnswer: 24", "7 + 5 = 12\n12 * 2 = 25\nAnswer: 25"])
    assert len(right) == len(slipped) == 3 and right[0] == slipped[0]
    tokenizer, model = AutoTokenizer.from_pretrained(runs / "sft"), AutoModelForCausalLM.from_pretrained(runs / "sft")
    ids = [prompt_ids(tokenizer, prompt, bool(tokenizer.chat_template))]
    for text in ("7 + 5 = 12", "\n", "12 * 2 = 25"):
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        log_probs = model(input_ids=torch.tensor([sum(ids, [])])).logits[0].log_softmax(-1)
    taken = [log_probs[t - 1, token].item() for t, token in enumerate(sum(ids, [])) if t]  # taken[t - 1]: log P(token t)
    first, second = len(ids[0]), len(ids[0]) + len(ids[1]) + len(ids[2])
    assert abs(slipped[0] - min(taken[first - 1:first - 1 + len(ids[1])])) < 0.1  # bfloat16 autocast against float32
    assert abs(slipped[1] - min(taken[second - 1:second - 1 + len(ids[3])])) < 0.1


def test_the_dpo_benchmark_runs_both_trainers_on_the_same_tokens(tmp_path):
    """bench/dpo_vs_trl.py on the tiny model: stock TRL and align read the same tokens per step and
    their loss curves agree (the same objective), and the ratios are written."""
    import json
    import subprocess

    out = tmp_path / "dpo.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "dpo_vs_trl.py"), "--model", "tiny", "--steps", "3", "--runs", "1",
                           "--work", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    run = results["runs"][0]
    assert results["same_tokens"] and len(run["trl"]["losses"]) == len(run["align"]["losses"]) == 3
    assert results["largest_loss_gap"] < 0.01
    assert run["speedup_wall"] > 0 and run["memory_ratio"] > 0


def test_the_shared_prefix_benchmark_trains_both_layouts_to_the_same_loss(tmp_path):
    """bench/shared_prefix.py on the tiny model: for the PRM and the RM, one row per pair and two rows
    train the same steps to the same loss, and the ratios are written."""
    import json
    import subprocess

    out = tmp_path / "shared_prefix.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "shared_prefix.py"), "--model", "tiny", "--steps", "2",
                           "--runs", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    for stage in ("prm", "rm"):
        one, two = results[stage]["runs"]["one row"][0], results[stage]["runs"]["two rows"][0]
        assert abs(one["loss"] - two["loss"]) < 1e-3 and results[stage]["speedup"] > 0


def test_the_ppo_floor_does_each_part_of_an_update_once(tmp_path, monkeypatch):
    """bench/ppo_floor.py (the `floor` row of bench/ppo_vs_trl.py) on the tiny model: every part of
    the matched update is timed, the three phases add up to its parts, and the run's total covers them."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import ppo_vs_trl

    policy, reward = ppo_vs_trl.prepare("tiny", tmp_path)
    result = ppo_vs_trl.run_floor(policy, reward, SimpleNamespace(episodes=16, batch_size=8, response_length=6))
    detail, phases = result["detail"], result["phases"]
    assert set(detail) == {"generate", "reward", "reference", "value", "policy", "optimizer"} and min(detail.values()) > 0
    assert sum(phases.values()) == pytest.approx(sum(detail.values()))
    assert result["train_seconds"] >= sum(detail.values()) and result["episodes"] == 16


def test_the_rejection_sampling_transfer_recipe_validates(align, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it runs from a sentiment work directory; the dry run reads no data
    result = align("run", ROOT / "bench" / "rs_transfer.yaml", "--dry-run")
    assert result.code == 0, result.err
    assert all(name in result.out for name in ("sft-bo4-e1", "samples16", "sft-bo16-e1", "eval-sft-bo16-e3", "samples16-top2", "eval-sft-top4-e1", "samples16-r2", "eval-sft-r2-e2"))


def test_the_reward_model_samples_study_cuts_each_opening_to_its_first_samples_and_validates(align, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import rm_samples
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rm_samples.write_jsonl(tmp_path / "data" / "rm_train_ranked.jsonl", [
        {"prompt": p, "completions": [f"{p} {k}" for k in range(20)], "scores": [k / 10 for k in range(20)]} for p in ("one", "two")])
    rows = rm_samples.ranked_rows(tmp_path, 4)
    assert rows[1] == {"prompt": "two", "completions": ["two 0", "two 1", "two 2", "two 3"], "scores": [0.0, 0.1, 0.2, 0.3]}
    assert [len(r["completions"]) for r in rm_samples.ranked_rows(tmp_path, 8)] == [8, 8]
    (tmp_path / "rm-samples.yaml").write_text(yaml.safe_dump(rm_samples.recipe(), sort_keys=False), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = align("run", "rm-samples.yaml", "--dry-run")
    assert result.code == 0, result.err
    assert all(name in result.out for name in ("rm-k4", "eval-rm-k4", "rm-k8", "eval-rm-k8"))
