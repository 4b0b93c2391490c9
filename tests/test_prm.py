"""Process reward models: the step loss and metrics by hand, the tokenisation contract, training,
loading with transformers, and scoring anywhere a reward model goes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import assert_clean_failure, stepwise_rows, write_jsonl

IGNORE = -100.0


def test_step_loss_by_hand():
    from align.stages.prm import step_loss

    logits = torch.tensor([[[0.0, 2.0], [1.0, 0.0], [0.0, 0.0], [3.0, -3.0]]])
    labels = torch.tensor([[1.0, 0.0, 0.25, IGNORE]])
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731  log P(label 1) of logits (0, x)
    by_hand = -(log_sigmoid(2.0) + log_sigmoid(1.0) + 0.25 * log_sigmoid(0.0) + 0.75 * log_sigmoid(0.0)) / 3
    assert step_loss(logits, labels).item() == pytest.approx(by_hand, abs=1e-6)


def test_step_counts_by_hand():
    from align.stages.prm import step_counts

    # Row 1: steps right, wrong, wrong; predicted right, right, wrong -> 2 of 3 steps, first error
    # found at step 2 vs 1: missed. Row 2 (one padded position): right, right; predicted right, right.
    right, wrong = [0.0, 1.0], [1.0, 0.0]
    logits = torch.tensor([[right, right, wrong], [right, right, wrong]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.9, IGNORE]])
    assert step_counts(logits, labels).tolist() == [4, 5, 1, 2]


def test_rows_become_the_documented_ids_and_labels(tiny_model):
    from align.config import DataSpec, ModelSpec
    from align.data import DataReport, stepwise_examples
    from align.models import load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(path="tiny"), str(tiny_model))
    rows = [{"prompt": "Add 2 and 3.", "completions": ["2 + 3 = 5", "so 5"], "labels": [True, 0.5]}]
    spec = DataSpec(path="x.jsonl")
    [example] = stepwise_examples(rows, tokenizer, True, spec, DataReport("x"), "\n")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = list(prompt) + encode("2 + 3 = 5") + encode("\n") + encode("so 5") + encode("\n")
    assert example["input_ids"] == expected
    ends = [len(prompt) + len(encode("2 + 3 = 5")) + len(encode("\n")) - 1, len(expected) - 1]
    assert [i for i, label in enumerate(example["labels"]) if label != IGNORE] == ends
    assert [example["labels"][i] for i in ends] == [1.0, 0.5]
    [last] = stepwise_examples(rows, tokenizer, True, spec, DataReport("x"), "\n", last_step_only=True)
    assert [i for i, label in enumerate(last["labels"]) if label != IGNORE] == ends[1:]
    # Too long: the steps that fit are kept with their labels.
    short = DataSpec(path="x.jsonl", max_length=ends[0] + 2)
    report = DataReport("x")
    [cut] = stepwise_examples(rows, tokenizer, True, short, report, "\n")
    assert len(cut["input_ids"]) == ends[0] + 2 and [i for i, v in enumerate(cut["labels"]) if v != IGNORE] == ends[:1]
    assert report.truncated == 1


def test_aggregates_and_auroc_by_hand():
    from align.rewards import aggregate_steps, auroc, step_metrics

    steps = torch.tensor([0.9, 0.5, 0.8])
    assert aggregate_steps(steps, "min").item() == pytest.approx(0.5)
    assert aggregate_steps(steps, "prod").item() == pytest.approx(0.36)
    assert aggregate_steps(steps, "last").item() == pytest.approx(0.8)
    assert aggregate_steps(steps, "mean").item() == pytest.approx(2.2 / 3)
    assert aggregate_steps(torch.tensor([]), "min").item() == 0.0  # no steps: not a correct solution
    # Positives 0.9, 0.4; negatives 0.4, 0.1: pairs above 0.9>0.4, 0.9>0.1, 0.4>0.1, one tie (0.4, 0.4).
    assert auroc(torch.tensor([0.9, 0.4, 0.4, 0.1]), torch.tensor([True, True, False, False])) == pytest.approx(3.5 / 4)
    metrics = step_metrics([torch.tensor([0.9, 0.7, 0.2]), torch.tensor([0.6, 0.3])], [[True, False, False], [1.0, 0.8]])
    assert metrics["step_accuracy"] == pytest.approx(3 / 5)
    assert metrics["first_error_accuracy"] == 0.0  # row 1: first error at 2 vs 1; row 2: at 1 vs none
    assert metrics["steps"] == 5 and metrics["count"] == 2


@pytest.fixture(scope="module")
def trained_prm(tmp_path_factory, tiny_model):
    """A PRM trained on the tiny model until it tells good steps from bad (held-out rows)."""
    from typer.testing import CliRunner

    from align.cli import app

    tmp = tmp_path_factory.mktemp("prm")
    train = write_jsonl(tmp / "train.jsonl", stepwise_rows(32))
    held_out = write_jsonl(tmp / "test.jsonl", stepwise_rows(40)[32:])
    out = tmp / "prm"
    result = CliRunner().invoke(app, ["-q", "prm", "-m", "tiny", "-d", str(train), "--eval-data", str(held_out), "-o", str(out),
                                      "--epochs", "6", "--batch-size", "8", "--lr", "5e-3", "--eval-steps", "24"])
    assert result.exit_code == 0, result.output
    return out, held_out


def test_sibling_steps_are_paired_by_hand(tiny_model):
    from align.config import DataSpec, ModelSpec
    from align.data import DataReport, stepwise_examples
    from align.models import load_tokenizer
    from align.stages.prm import StepCollator, sibling_margins, sibling_pairs, training_items

    tokenizer = load_tokenizer(ModelSpec(path="tiny"), str(tiny_model))
    rows = [
        {"prompt": "p", "completions": ["1 + 1 = 2", "2 * 3 = 6"], "labels": [True, True]},  # 0
        {"prompt": "p", "completions": ["1 + 1 = 2", "2 * 3 = 7"], "labels": [True, False]},  # 1: 0's sibling at step 1
        {"prompt": "q", "completions": ["1 + 1 = 2", "2 * 3 = 7"], "labels": [True, False]},  # 2: another prompt
        {"prompt": "p", "completions": ["1 + 1 = 2", "2 * 3 = 6"], "labels": [True, 0.0]},  # 3: the same step as 0
    ]
    examples = stepwise_examples(rows, tokenizer, True, DataSpec(path="x.jsonl"), DataReport("x"), "\n")
    positions = [[n for n, label in enumerate(e["labels"]) if label != IGNORE] for e in examples]
    # 1's wrong step has one right sibling (0); 3's "wrong" step is 0's own text, so it has none.
    assert sibling_pairs(examples, seed=0) == [(0, positions[0][1], 1, positions[1][1])]
    items, pairs = training_items(examples, pairwise=True, seed=0)
    assert pairs == 1 and [len(item["input_ids"]) for item in items] == [2, 1, 1]
    batch = StepCollator(tokenizer.pad_token_id)([items[1], items[0]])
    assert batch["input_ids"].shape[0] == 3 and batch["pairs"].tolist() == [[1, positions[0][1], 2, positions[1][1]]]
    logits = torch.zeros(3, batch["input_ids"].shape[1], 2)
    logits[1, positions[0][1]] = torch.tensor([0.5, 2.0])  # right step: score 1.5
    logits[2, positions[1][1]] = torch.tensor([1.0, -1.0])  # wrong step: score -2.0
    assert sibling_margins(logits, batch["pairs"]).tolist() == [3.5]
    assert [len(item["input_ids"]) for item in training_items(examples, pairwise=False, seed=0)[0]] == [1, 1, 1, 1]


@pytest.mark.parametrize("family,attention", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_sibling_pairs_share_one_row_with_the_same_logits_and_gradients(family, attention):
    """share_prefix: a sibling pair runs as one row, what the two share computed once; its logits come
    back in the two-row layout equal to the two rows' own, and so do the gradients."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    from align import pair_rows
    from align.stages.prm import StepCollator, pack_siblings, sibling_margins, step_loss

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                                  num_labels=2)
    config._attn_implementation = attention
    model = AutoModelForTokenClassification.from_config(config).eval()  # no dropout: the two layouts draw it differently
    labelled = lambda ids, at: [IGNORE if n not in at else float(n % 2) for n in range(len(ids))]  # noqa: E731
    right, wrong = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 9, 10]  # share 5 tokens, then part (different lengths)
    lone = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]  # longer than either: the two-row batch's width
    items = [{"input_ids": [right, wrong], "labels": [labelled(right, {2, 7}), labelled(wrong, {2, 6})], "pair": [7, 6]},
             {"input_ids": [lone], "labels": [labelled(lone, {4, 10})], "pair": []},
             {"input_ids": [wrong[:6], right[:6]], "labels": [labelled(wrong[:6], {5}), labelled(right[:6], {5})], "pair": [5, 5]}]
    batch = StepCollator(0)(items)
    shared = pack_siblings(batch["input_ids"], batch["attention_mask"], batch["pairs"], 0)
    # 3 rows instead of 5: 8 + 2 tokens, 11, and 6 + 1 (the second pair shares all but its last token)
    assert shared.input_ids.shape == (3, 11) and shared.input_ids[0].tolist() == right + [9, 10] + [0]
    assert shared.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 0]
    assert shared.input_ids[2, :7].tolist() == wrong[:6] + [6] and shared.position_ids[2, :7].tolist() == [0, 1, 2, 3, 4, 5, 5]

    def run(packed: bool):
        model.zero_grad()
        if packed:
            allowed = pair_rows.for_attention(model, shared.allowed)
            logits = model(input_ids=shared.input_ids, attention_mask=allowed, position_ids=shared.position_ids).logits[shared.source]
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = step_loss(logits, batch["labels"]) - torch.nn.functional.logsigmoid(sibling_margins(logits, batch["pairs"])).mean()
        loss.backward()
        return logits.detach(), loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (two, two_loss, two_grads), (one, one_loss, one_grads) = run(False), run(True)
    real = batch["attention_mask"].bool()
    assert torch.allclose(one[real], two[real], atol=1e-5) and abs(one_loss - two_loss) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(one_grads, two_grads))


def test_prm_trains_the_same_with_siblings_in_one_row_or_two(align, tmp_path, monkeypatch):
    from align.stages import prm

    packed, original = [], prm.pack_siblings
    monkeypatch.setattr(prm, "pack_siblings", lambda *a: packed.append(original(*a)) or packed[-1])
    rows = []
    for i in range(8):
        right = [f"step 1 of {i}", f"step 2 good {i}"]
        rows += [{"prompt": f"Solve problem {i}.", "completions": right, "labels": [True, True]},
                 {"prompt": f"Solve problem {i}.", "completions": [right[0], f"step 2 bad {i}"], "labels": [True, False]},
                 {"prompt": f"Solve problem {i} again.", "completions": right, "labels": [True, i % 2 == 0]}]
    data = write_jsonl(tmp_path / "siblings.jsonl", rows)
    curves = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        result = align("prm", "-m", "tiny", "-d", data, "-o", out, "--pairwise", "--max-steps", "4", "--batch-size", "4",
                       "--lr", "5e-3", "--set", f"share_prefix={flag}", "--set", "train.logging_steps=1",
                       "--set", "lora.dropout=0")  # LoRA's dropout would draw differently in the two layouts
        assert result.code == 0, result.err
        curves[flag] = [(r["loss"], r["sibling_accuracy"], r["step_accuracy"]) for r in
                        map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r and "sibling_accuracy" in r]
    assert len(curves["true"]) == 4 and len(packed) == 4 and all(packed)  # every step of the first run packed its pairs
    for (loss, siblings, steps), (loss_two, siblings_two, steps_two) in zip(curves["true"], curves["false"], strict=True):
        assert abs(loss - loss_two) < 1e-4 and (siblings, steps) == (siblings_two, steps_two)


def test_pairwise_prm_ranks_sibling_steps_and_refuses_data_without_them(align, tiny_model, steps_file, tmp_path):
    rows = []
    for i in range(12):
        right = [f"step 1 of {i}", f"step 2 good {i}"]
        rows += [{"prompt": f"Solve problem {i}.", "completions": right, "labels": [True, True]},
                 {"prompt": f"Solve problem {i}.", "completions": [right[0], f"step 2 bad {i}"], "labels": [True, False]}]
    data = write_jsonl(tmp_path / "siblings.jsonl", rows)
    out = tmp_path / "prm"
    result = align("prm", "-m", "tiny", "-d", data, "-o", out, "--pairwise", "--epochs", "8", "--batch-size", "4", "--lr", "5e-3")
    assert result.code == 0, result.err
    manifest = json.loads((out / "align.json").read_text())
    assert manifest["pairwise"] is True and manifest["sibling_pairs"] == 12 and manifest["metrics"]["sibling_accuracy"] == 1.0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracies = [row["sibling_accuracy"] for row in logged if "sibling_accuracy" in row]
    assert len(accuracies) == 24 and min(accuracies[:3]) < 1.0 and accuracies[-3:] == [1.0] * 3  # 3 steps an epoch
    # No prompt has two solutions that part at a step: nothing to rank.
    assert_clean_failure(align("prm", "-m", "tiny", "-d", steps_file, "-o", tmp_path / "none", "--pairwise"), 3,
                         "steps.jsonl", "no sibling steps")
    assert not (tmp_path / "none").exists()


def test_prm_learns_the_steps_and_loads_as_a_token_classifier(trained_prm):
    from transformers import AutoModelForTokenClassification

    out, _ = trained_prm
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in logged if "loss" in row]
    assert len(losses) == 24 and sum(losses[-4:]) < 0.5 * sum(losses[:4])
    manifest = json.loads((out / "align.json").read_text())
    assert manifest["completed"] and manifest["step_separator"] == "\n" and manifest["stage"] == "prm"
    assert manifest["metrics"]["eval_step_accuracy"] >= 0.9
    model = AutoModelForTokenClassification.from_pretrained(out)
    assert model.config.num_labels == 2 and model.config.id2label == {0: "incorrect", 1: "correct"}
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_prm_scores_follow_the_contract_read_with_plain_transformers(trained_prm):
    """ProcessRewardModel's step scores are P(label 1) at each separator's last token, read from the
    checkpoint with transformers alone; its eval on stepwise rows and pairs uses them."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from align.config import ModelSpec
    from align.rewards import ProcessRewardModel, reward_model

    out, held_out = trained_prm
    prm = reward_model(ModelSpec(path=str(out)), aggregate="prod")
    assert isinstance(prm, ProcessRewardModel) and prm.separator == "\n"
    completion = "step 1 good\nstep 2 bad\n\nstep 3 good\n"  # an empty piece is no step
    assert [text for text, _ in prm.steps(completion)] == ["step 1 good", "step 2 bad", "step 3 good"]
    [scores] = prm.step_scores(["Solve problem 7."], [completion])

    tokenizer, model = AutoTokenizer.from_pretrained(out), AutoModelForTokenClassification.from_pretrained(out).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Solve problem 7."}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    ends = []
    for step in ["step 1 good", "step 2 bad", "step 3 good"]:
        ids = list(ids) + tokenizer(step, add_special_tokens=False)["input_ids"] + tokenizer("\n", add_special_tokens=False)["input_ids"]
        ends.append(len(ids) - 1)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, ends].softmax(-1)[:, 1]
    assert torch.allclose(scores, expected, atol=1e-5)
    assert scores[1] < 0.5 < min(scores[0], scores[2])  # it learnt the bad step
    assert prm(["Solve problem 7."], [completion]).item() == pytest.approx(expected.prod().item(), abs=1e-5)


def test_eval_on_a_prm_reports_step_metrics_and_pairwise_accuracy(align, trained_prm, tmp_path):
    out, held_out = trained_prm
    result = align("eval", "-m", out, "--pairs", held_out, "-o", tmp_path / "steps.json")
    assert result.code == 0, result.err
    steps = json.loads((tmp_path / "steps.json").read_text())["pairs"]
    assert steps["count"] == 8 and steps["steps"] == 24
    assert steps["step_accuracy"] >= 0.9 and steps["auroc"] >= 0.9 and steps["first_error_accuracy"] >= 0.75
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"Solve problem {i}.", "chosen": "step 1 good\nstep 2 good", "rejected": "step 1 good\nstep 2 bad"} for i in range(4)
    ])
    result = align("eval", "-m", out, "--pairs", pairs, "-o", tmp_path / "pairs.json", "--reward-aggregate", "min")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "pairs.json").read_text())["pairs"]["accuracy"] == 1.0


def test_best_of_n_picks_by_the_prm(align, trained_prm, tmp_path):
    from align.config import ModelSpec
    from align.rewards import reward_model

    out, _ = trained_prm
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Solve problem {i}."} for i in range(3)])
    result = align("best-of-n", "-m", "tiny", "-p", prompts, "--reward-model", out, "-n", "3", "--max-new-tokens", "6",
                   "-o", tmp_path / "bon", "--reward-aggregate", "mean")
    assert result.code == 0, result.err
    samples = [json.loads(line) for line in (tmp_path / "bon" / "samples.jsonl").read_text().splitlines()]
    prm = reward_model(ModelSpec(path=str(out)), aggregate="mean")
    expected = prm([s["prompt"] for s in samples], [s["completion"] for s in samples])
    assert torch.allclose(torch.tensor([s["score"] for s in samples]), expected, atol=1e-5)
    assert all(0.0 <= s["score"] <= 1.0 for s in samples)


def test_a_prm_is_not_a_policy_and_a_policy_is_not_a_prm(align, trained_prm, tiny_model, prompts_file, sft_file, tmp_path):
    out, held_out = trained_prm
    assert_clean_failure(align("sft", "-m", out, "-d", sft_file, "-o", tmp_path / "sft"), 4, "TokenClassification",
                         "not a causal language model")
    assert not (tmp_path / "sft").exists()
    assert_clean_failure(align("best-of-n", "-m", "tiny", "-p", prompts_file, "--reward-model", tiny_model, "-n", "2",
                               "-o", tmp_path / "bon"), 4, "not a reward model", "align prm")


@pytest.mark.parametrize("rows, needles", [
    ([{"prompt": "p", "completions": ["a", "b"], "labels": [True]}], ["row 1", "one label per step (2)"]),
    ([{"prompt": "p", "completions": ["a"], "labels": [1.5]}], ["row 1", "label 0", "[0, 1]", "1.5"]),
    ([{"prompt": "p", "completions": ["a"], "labels": ["yes"]}], ["row 1", "label 0", "'yes'"]),
    ([{"prompt": "p", "completions": ["a", " "], "labels": [True, False]}], ["row 1", "step 1", "non-empty"]),
    ([{"prompt": "p", "completions": ["a\nb"], "labels": [True]}], ["row 1", "step 0", "contains the step separator"]),
])
def test_bad_stepwise_rows_are_one_line(align, tiny_model, tmp_path, rows, needles):
    data = write_jsonl(tmp_path / "steps.jsonl", [{"prompt": "ok", "completions": ["x"], "labels": [False]}, *rows])
    needles = [n.replace("row 1", "row 2") for n in needles]
    assert_clean_failure(align("prm", "-m", "tiny", "-d", data, "-o", tmp_path / "out"), 3, "steps.jsonl", *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("held_out", [[], ["--eval-fraction", "0.5"]])
def test_a_step_holding_the_separator_is_named_by_its_line_with_rows_held_out(align, tiny_model, tmp_path, held_out):
    """eval_fraction shuffles the rows before they are tokenized; the error still names the file's line."""
    rows = stepwise_rows(8)
    rows[5] = {**rows[5], "completions": ["a\nb", *rows[5]["completions"][1:]]}
    data = write_jsonl(tmp_path / "steps.jsonl", rows)
    assert_clean_failure(align("prm", "-m", "tiny", "-d", data, "-o", tmp_path / "out", *held_out), 3,
                         "steps.jsonl: row 6: step 0 contains the step separator")


def test_a_separator_that_is_not_tokens_of_its_own_is_refused(align, tiny_model, steps_file, tmp_path):
    from align.data import check_separator
    from align.errors import DataError

    class Merging:  # a tokenizer whose separator comes back changed (as a normalising tokenizer's does)
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1]}

        def decode(self, ids):
            return " "

    with pytest.raises(DataError, match="does not tokenize to tokens of its own"):
        check_separator(Merging(), "\n")
    result = align("prm", "-m", "tiny", "-d", steps_file, "-o", tmp_path / "out", "--step-separator", "")
    assert result.code == 2 and not (tmp_path / "out").exists()


def test_ppo_scores_with_a_prm_trained_on_its_own_base(align, trained_prm, ppo_prompts, tmp_path):
    """A PRM trained as LoRA on the policy's base is not taken for a shared-base reward adapter (that
    reads one score per sequence): it loads as a model of its own and scores in [0, 1]."""
    out, _ = trained_prm
    result = align("ppo", "-m", "tiny", "-p", ppo_prompts, "--reward-model", out, "--episodes", "8", "--batch-size", "8",
                   "--max-new-tokens", "6", "--reward-aggregate", "prod", "--process-rewards", "final", "-o", tmp_path / "ppo")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "ppo" / "align.json").read_text())
    assert manifest["reward_on_shared_base"] is False and manifest["value_init"] == "scratch"
    assert manifest["dense_process_rewards"] is False
    assert 0.0 <= manifest["metrics"]["score"] <= 1.0


def test_token_ends_find_the_token_that_ends_each_piece(tiny_model):
    from align.config import ModelSpec
    from align.generation import token_ends
    from align.models import load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(path="tiny"), str(tiny_model))
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    first, newline, second = encode("2 + 3 = 5"), encode("\n"), encode("so 5")
    tokens = first + newline + second + [tokenizer.eos_token_id]
    # "2 + 3 = 5" ends at character 9, "so 5" at 14: the last token of each piece (never the EOS after them).
    assert token_ends(tokenizer, tokens, [9, 14]) == [len(first) - 1, len(first) + len(newline) + len(second) - 1]
    assert token_ends(tokenizer, tokens, []) == []


def test_dense_process_rewards_by_hand(tiny_model):
    """Each step's score on the token that ends it; a response that never ended pays the EOS penalty on its last token."""
    from align.config import ModelSpec
    from align.data import split_steps
    from align.generation import Rollout
    from align.models import load_tokenizer
    from align.stages.ppo import _step_rewards

    tokenizer = load_tokenizer(ModelSpec(path="tiny"), str(tiny_model))
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731

    class StepScores:  # a PRM that scores the steps it is shown 0.9, 0.4, ... (as ProcessRewardModel splits them)
        def scored_steps(self, prompts, completions):
            return [(torch.tensor([0.9, 0.4, 0.3][:len(steps)]) if len(steps) > 1 else torch.tensor([0.3]),
                     [end for _, end in steps]) for steps in (split_steps(c, "\n") for c in completions)]

    first, newline, second, single = encode("2 + 3 = 5"), encode("\n"), encode("so 5"), encode("7 bad")
    finished_row = first + newline + second + [tokenizer.eos_token_id]
    width = len(finished_row)
    unfinished_row = single + [tokenizer.pad_token_id] * (width - len(single))
    response = torch.tensor([finished_row, unfinished_row])
    mask = torch.tensor([[1] * width, [1] * len(single) + [0] * (width - len(single))])
    rollout = Rollout(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), response, mask,
                      torch.zeros(2, width), torch.tensor([True, False]))
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(response.tolist(), mask.sum(1).tolist())]
    assert texts == ["2 + 3 = 5\nso 5", "7 bad"]
    rewards, placed = _step_rewards(StepScores(), tokenizer, ["p", "p"], texts, rollout, eos_penalty=0.25)
    expected = torch.zeros(2, width)
    expected[0, len(first) - 1] = 0.9
    expected[0, len(first) + len(newline) + len(second) - 1] = 0.4
    expected[1, len(single) - 1] = 0.3 - 0.25
    assert torch.allclose(rewards, expected)
    assert placed.tolist() == (expected != 0).tolist()


def test_ppo_with_dense_process_rewards_sums_the_step_scores(align, trained_prm, ppo_prompts, tmp_path):
    """The logged score of each sampled response is the sum of the PRM's scores of its steps."""
    from align.config import ModelSpec
    from align.rewards import ProcessRewardModel

    out, _ = trained_prm
    result = align("ppo", "-m", "tiny", "-p", ppo_prompts, "--reward-model", out, "--episodes", "16", "--batch-size", "8",
                   "--max-new-tokens", "12", "--set", "ppo.sample_every=1", "-o", tmp_path / "ppo")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "ppo" / "align.json").read_text())
    assert manifest["dense_process_rewards"] is True
    samples = [json.loads(line) for line in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()]
    prm = ProcessRewardModel(ModelSpec(path=str(out)))
    sums = [float(s.sum()) for s in prm.step_scores([s["prompt"] for s in samples], [s["completion"] for s in samples])]
    assert sum(1 for s in prm.step_scores([x["prompt"] for x in samples], [x["completion"] for x in samples]) if len(s) > 1)
    assert [s["score"] for s in samples] == pytest.approx(sums, abs=1e-4)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_online_rl_scores_with_a_prm_by_the_chosen_aggregate(align, method, trained_prm, ppo_prompts, tmp_path, monkeypatch):
    """GRPO and RLOO take a PRM as their reward model: it is read as one (not refused as a sequence
    classifier), aggregates by --reward-aggregate, and each logged step's reward is the mean of the
    aggregated scores it gave that step's completions."""
    from align.config import ModelSpec
    from align.rewards import ProcessRewardModel

    out, _ = trained_prm
    calls = []
    real_call = ProcessRewardModel.__call__

    def recorded(self, prompts, completions):
        scores = real_call(self, prompts, completions)
        calls.append((self.aggregate, list(prompts), list(completions), scores))
        return scores

    monkeypatch.setattr(ProcessRewardModel, "__call__", recorded)
    result = align(method, "-m", "tiny", "-p", ppo_prompts, "-o", tmp_path / method, "--reward-model", out,
                   "--reward-aggregate", "prod", "--num-generations", "4", "--batch-size", "8", "--max-new-tokens", "12",
                   "--max-steps", "2")
    assert result.code == 0, result.err
    assert "does not apply" not in result.err  # a PRM aggregates as asked
    assert json.loads((tmp_path / method / "align.json").read_text())["rewards"] == [str(out)]
    logged = [json.loads(line)["rewards/reward_0/mean"] for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(calls) == len(logged) == 2 and {aggregate for aggregate, *_ in calls} == {"prod"}
    assert logged == pytest.approx([float(scores.mean()) for *_, scores in calls], abs=1e-5)
    _, prompts, completions, scores = calls[0]
    steps = ProcessRewardModel(ModelSpec(path=str(out))).step_scores(prompts, completions)  # by hand: the product of the steps
    assert scores.tolist() == pytest.approx([float(s.prod()) for s in steps], abs=1e-5)


def test_an_outcome_model_is_read_at_its_last_step_and_gets_no_dense_rewards(align, steps_file, ppo_prompts, tmp_path):
    from align.config import ModelSpec
    from align.rewards import ProcessRewardModel

    orm = tmp_path / "orm"
    assert align("prm", "-m", "tiny", "-d", steps_file, "-o", orm, "--last-step-only", "--max-steps", "2").code == 0
    model = ProcessRewardModel(ModelSpec(path=str(orm)), aggregate="min")
    assert model.outcome_only and model.aggregate == "last"
    [steps] = model.step_scores(["Solve problem 1."], ["step 1 good\nstep 2 bad"])
    assert model(["Solve problem 1."], ["step 1 good\nstep 2 bad"]).item() == pytest.approx(steps[-1].item())
    result = align("ppo", "-m", "tiny", "-p", ppo_prompts, "--reward-model", orm, "--episodes", "8", "--batch-size", "8",
                   "--max-new-tokens", "6", "-o", tmp_path / "ppo")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "ppo" / "align.json").read_text())["dense_process_rewards"] is False
    assert "does not apply" not in result.err  # nothing asked that it ignores
    # Asked for what an outcome model cannot give: each setting ignored is said, in one line.
    result = align("ppo", "-m", "tiny", "-p", ppo_prompts, "--reward-model", orm, "--episodes", "8", "--batch-size", "8",
                   "--max-new-tokens", "6", "--reward-aggregate", "prod", "--process-rewards", "dense", "-o", tmp_path / "ppo2")
    assert result.code == 0, result.err
    assert f"reward_aggregate=prod does not apply to {orm}: it was trained on last steps only" in result.err
    assert f"process_rewards=dense does not apply to {orm}" in result.err


def test_qlora_prm_keeps_its_head_out_of_4_bit_and_scores_in_4_bit(align, steps_file, tmp_path):
    """QLoRA on a token classifier: its score head is trained in full (not quantized, which bitsandbytes
    cannot train), written into the merged output, and a PRM read in 4 bits scores with it."""
    from safetensors.torch import load_file

    from align.config import ModelSpec
    from align.rewards import ProcessRewardModel

    out = tmp_path / "prm"
    result = align("prm", "-m", "tiny", "-d", steps_file, "-o", out, "--qlora", "--max-steps", "2", "--lr", "1e-2")
    assert result.code == 0, result.err
    adapter, merged = load_file(out / "adapter" / "adapter_model.safetensors"), load_file(out / "model.safetensors")
    assert torch.equal(adapter["base_model.model.score.weight"], merged["score.weight"])
    prompts, completions = ["Solve problem 1."], ["step 1 good\nstep 2 bad"]
    full = ProcessRewardModel(ModelSpec(path=str(out))).step_scores(prompts, completions)[0]
    in_4bit = ProcessRewardModel(ModelSpec(path=str(out)), in_4bit=True)
    assert in_4bit.model.score.weight.dtype == torch.float32
    assert torch.allclose(in_4bit.step_scores(prompts, completions)[0], full, atol=0.05)


def test_trainable_layers_fine_tunes_only_the_last_blocks(align, tiny_model, tmp_path):
    from safetensors.torch import load_file

    rows = []
    for i in range(8):
        rows += [{"prompt": f"Solve problem {i}.", "completions": [f"step 1 of {i}", f"step 2 good {i}"], "labels": [True, True]},
                 {"prompt": f"Solve problem {i}.", "completions": [f"step 1 of {i}", f"step 2 bad {i}"], "labels": [True, False]}]
    data = write_jsonl(tmp_path / "siblings.jsonl", rows)
    out = tmp_path / "prm"
    result = align("prm", "-m", "tiny", "-d", data, "-o", out, "--pairwise", "--no-lora", "--trainable-layers", "1",
                   "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2")
    assert result.code == 0, result.err
    before, after = load_file(tiny_model / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name, weight in after.items() if name in before and not torch.equal(weight, before[name].to(weight.dtype))}
    blocks = {name.split(".")[2] for name in before if name.startswith("model.layers.")}
    last = str(max(int(b) for b in blocks))
    assert changed and all(name.startswith((f"model.layers.{last}.", "model.norm.")) for name in changed), changed
    assert any(name.startswith(f"model.layers.{last}.") for name in changed)
    # With LoRA on, it is refused in one line before anything loads.
    assert_clean_failure(align("prm", "-m", "tiny", "-d", data, "-o", tmp_path / "x", "--trainable-layers", "1"), 2,
                         "trainable_layers", "--no-lora")


def test_runs_finished_before_pairwise_share_prefix_and_trainable_layers_existed_stay_up_to_date(tmp_path):
    """These fields are left out of the config hash at their defaults: upgrading align never makes
    `align run --resume` redo a finished stage (bench/arith.py's work dirs)."""
    from types import SimpleNamespace

    from align.checkpoints import config_hash
    from align.config import PRMConfig

    common = {"model": "tiny", "data": {"path": "s.jsonl"}, "output": str(tmp_path / "prm")}
    before = PRMConfig(**common).model_dump(mode="json", exclude={"resume", "overwrite", "name", "pairwise", "share_prefix"})
    del before["lora"]["trainable_layers"]
    assert config_hash(PRMConfig(**common)) == config_hash(SimpleNamespace(identity=lambda: before))
    assert config_hash(PRMConfig(**common, pairwise=True)) != config_hash(PRMConfig(**common))
    full = {**common, "lora": {"enabled": False}}
    last_two = {**common, "lora": {"enabled": False, "trainable_layers": 2}}
    assert config_hash(PRMConfig(**last_two)) != config_hash(PRMConfig(**full))
