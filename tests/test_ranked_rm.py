"""Reward models on ranked rows (prompt, completions, scores): InstructGPT's K-wise comparisons."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import write_jsonl

COMPLETIONS = ["It was wonderful and great, thanks!", "It was awful and boring.", "Fine, I liked it."]
SCORES = [1.0, -1.0, 0.25]


def first_logged(out):
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_ranked_loss_by_hand():
    from align.stages.rm import ranked_loss

    rewards = torch.tensor([1.0, 0.0, -0.5])
    better, worse = rewards[[0, 0, 1]], rewards[[1, 2, 2]]  # the three comparisons of three completions
    softplus = lambda x: math.log1p(math.exp(-x))  # -log sigmoid(x)  # noqa: E731
    plain = ranked_loss(better, worse, torch.zeros(3))
    assert plain.item() == pytest.approx((softplus(1.0) + softplus(1.5) + softplus(0.5)) / 3, abs=1e-6)
    margin = torch.tensor([2.0, 1.25, 0.5])
    centred = ranked_loss(better, worse, margin, center=0.1)
    by_hand = (softplus(1.0 - 2.0) + softplus(1.5 - 1.25) + softplus(0.5 - 0.5)) / 3 + 0.1 * (1.0 + 0.25 + 0.25) / 3
    assert centred.item() == pytest.approx(by_hand, abs=1e-6)


def test_ranked_rows_become_every_pair_above_the_gap(tiny_model):
    from align.config import DataSpec
    from align.data import DataReport, as_messages, ranked_examples, render_ids
    from align.models import load_tokenizer
    from align.config import ModelSpec

    tokenizer = load_tokenizer(ModelSpec(path="tiny"), str(tiny_model))
    row = {"prompt": "How was it?", "completions": ["a", "b", "c", "d"], "scores": [3.0, 1.0, 1.0, 0.5]}
    report = DataReport("x")
    [wide] = ranked_examples([row], tokenizer, True, DataSpec(path="x"), report, min_gap=0.6, margins=True)
    assert wide["pairs"] == [[0, 1], [0, 2], [0, 3]]  # 1-2 tie, 1-3 and 2-3 within the gap
    assert wide["margins"] == [2.0, 2.0, 2.5]
    assert wide["sequence_ids"][3] == render_ids(tokenizer, as_messages("How was it?", "user") + as_messages("d", "assistant"), chat=True)
    [every] = ranked_examples([row], tokenizer, True, DataSpec(path="x"), report, min_gap=0.0, margins=False)
    assert every["pairs"] == [[0, 1], [0, 2], [0, 3], [1, 3], [2, 3]] and every["margins"] == [0.0] * 5
    unused = {"prompt": "p", "completions": ["a", "b", "c"], "scores": [1.0, 0.0, 0.5]}
    [kept] = ranked_examples([unused], tokenizer, True, DataSpec(path="x"), report, min_gap=0.6, margins=False)
    assert kept["pairs"] == [[0, 1]] and len(kept["sequence_ids"]) == 2  # "c" is in no comparison: not forwarded


def test_ranked_rows_train_on_the_same_loss_as_their_pairs_at_half_the_tokens(align, tmp_path):
    """One prompt's 3 comparisons as one ranked row, and as 3 pair rows with the score gaps as margins:
    the first step's loss and gradient are the same, from 3 forwards instead of 6."""
    ranked = write_jsonl(tmp_path / "ranked.jsonl", [{"prompt": "How was the movie?", "completions": COMPLETIONS, "scores": SCORES}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "How was the movie?", "chosen": COMPLETIONS[i], "rejected": COMPLETIONS[j], "margin": SCORES[i] - SCORES[j]}
        for i in range(3) for j in range(3) if SCORES[i] > SCORES[j]
    ])
    a, b = tmp_path / "ranked", tmp_path / "pairs"
    assert align("rm", "-m", "tiny", "-d", ranked, "-o", a, "--max-steps", "1", "--batch-size", "1", "--margins-from-scores").code == 0
    assert align("rm", "-m", "tiny", "-d", pairs, "-o", b, "--max-steps", "1", "--batch-size", "3").code == 0
    one, three = first_logged(a), first_logged(b)
    assert one["loss"] == pytest.approx(three["loss"], rel=1e-5)
    assert one["grad_norm"] == pytest.approx(three["grad_norm"], rel=1e-4)
    assert one["num_tokens"] * 2 == three["num_tokens"]


def test_reward_model_learns_from_ranked_rows(align, tmp_path):
    rows = [{"prompt": f"How was movie {i}?", "completions": ["It was wonderful and great, thanks!", "It was awful and boring.",
                                                               "Fine, I liked it.", "Dull and bad."],
             "scores": [1.0, -1.0, 0.5, -0.8]} for i in range(16)]
    data = write_jsonl(tmp_path / "ranked.jsonl", rows)
    out = tmp_path / "rm"
    result = align("rm", "-m", "tiny", "-d", data, "-o", out, "--lr", "5e-3", "--max-steps", "8", "--batch-size", "2",
                   "--eval-fraction", "0.25", "--min-gap", "0.2", "--margins-from-scores")
    assert result.code == 0, result.err
    info = json.loads((out / "align.json").read_text())
    assert info["data"]["format"] == "ranked" and info["data"]["rows_used"] == 12
    assert info["metrics"]["eval_accuracy"] == 1.0
    assert first_logged(out)["loss"] > 1.0  # margins up to 2 on an untrained model: well above log 2
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1


def test_ranked_only_options_on_pair_rows_are_refused(align, pairs_file, tmp_path):
    from conftest import assert_clean_failure

    result = align("rm", "-m", "tiny", "-d", pairs_file, "-o", tmp_path / "rm", "--margins-from-scores")
    assert_clean_failure(result, 2, "pairs.jsonl", "--margins-from-scores", "ranked rows", "'margin' column")
    assert not (tmp_path / "rm").exists()
