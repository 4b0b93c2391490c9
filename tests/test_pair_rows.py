"""One row per preference pair (align/pair_rows.py): the same log-probs, metrics and gradients
as TRL's two rows, for each decoder family it covers, and TRL's forward for anything else."""

from __future__ import annotations

import pytest
import torch

from align import pair_rows

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
PAIRS = [  # prompts, chosen and rejected of different lengths, so both layouts pad
    {"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [8, 9]},
    {"prompt_ids": [11, 12], "chosen_ids": [13], "rejected_ids": [14, 15, 16, 17, 18]},
    {"prompt_ids": [21, 22, 23, 24, 25, 26], "chosen_ids": [27, 28], "rejected_ids": [29]},
]


def tiny_decoder(family: str, attention: str = "sdpa"):
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    config._attn_implementation = attention
    model = AutoModelForCausalLM.from_config(config)
    add_fused_lm_head(model, outputs=OUTPUTS)
    return model


def batch(pairs=PAIRS):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    inputs = DataCollatorForPreference(pad_token_id=0)(pairs)
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    return dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False), labels


def forward_and_grads(model, inputs, labels):
    model.zero_grad()
    out = model(**inputs, labels=labels, fused_lm_head=True)
    out.log_probs.sum().backward()
    return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("family,attention", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("mistral", "sdpa")])
def test_one_row_per_pair_equals_two_rows(family, attention):
    model = tiny_decoder(family, attention)
    if family == "mistral":
        model.config.sliding_window = None
    inputs, labels = batch()
    two_rows, two_grads = forward_and_grads(model, inputs, labels)
    calls = []
    assert pair_rows.install(model, OUTPUTS)
    original_pack = pair_rows.pack
    pair_rows.pack = lambda *a: calls.append(1) or original_pack(*a)
    try:
        one_row, one_grads = forward_and_grads(model, inputs, labels)
    finally:
        pair_rows.pack = original_pack
    assert calls, "the packed path did not run"
    for field in OUTPUTS:
        torch.testing.assert_close(getattr(one_row, field), getattr(two_rows, field), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_row.label_mask, two_rows.label_mask)
    torch.testing.assert_close(one_row.loss, two_rows.loss)
    assert len(one_grads) == len(two_grads)
    for a, b in zip(one_grads, two_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # the sums TRL's loss reads: by hand, each pair's chosen and rejected differ
    sums = one_row.log_probs.sum(1)
    assert sums.shape == (6,) and torch.all(sums < 0)


def test_the_packed_row_reads_prompt_then_chosen_then_rejected():
    inputs, labels = batch(PAIRS[:1])
    rows = pair_rows.pack(inputs["input_ids"], inputs["attention_mask"], labels, pad_id=0)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 4, 5]]
    allowed = rows.allowed[0, 0]
    assert allowed[7].tolist() == [True] * 4 + [False] * 3 + [True, False]  # rejected's first token: prompt + itself
    assert allowed[6].tolist() == [True] * 7 + [False] * 2  # chosen's last: prompt + chosen
    # chosen 5, 6, 7 predicted from indices 3, 4, 5; rejected 8 from the prompt's last (3), 9 from 8's index (7)
    assert rows.source[1].tolist() == [3, 4, 5, 3, 7]
    assert rows.target[0].tolist() == [0, 0, 0, 1, 1] and rows.target[1].tolist() == [3, 4, 5, 3, 4]
    assert rows.tokens.tolist() == [5, 6, 7, 8, 9]


def test_batches_that_are_not_pairs_sharing_a_prompt_use_trls_forward():
    differing = [dict(PAIRS[0]), dict(PAIRS[1])]
    inputs, labels = batch(differing)
    inputs["input_ids"][2, 0] = 50  # the first pair's rejected row no longer has its chosen row's prompt
    assert pair_rows.pack(inputs["input_ids"], inputs["attention_mask"], labels, pad_id=0) is None
    inputs, labels = batch(PAIRS)
    labels[0, :] = -100  # a chosen response cut away entirely
    assert pair_rows.pack(inputs["input_ids"], inputs["attention_mask"], labels, pad_id=0) is None
    inputs, labels = batch(PAIRS)
    assert pair_rows.pack(inputs["input_ids"][:5], inputs["attention_mask"][:5], labels[:5], pad_id=0) is None


def test_models_it_does_not_cover_keep_trls_forward():
    model = tiny_decoder("mistral")
    model.config.sliding_window = 16
    assert not pair_rows.install(model, OUTPUTS)
    gemma = tiny_decoder("gemma2", "eager")  # logit soft-capping
    assert not pair_rows.install(gemma, OUTPUTS)


def test_dpo_trains_the_same_with_one_row_or_two(align, pairs_file, tmp_path, monkeypatch):
    from align.checkpoints import METRICS, read_records

    packed, original = [], pair_rows.pack
    monkeypatch.setattr(pair_rows, "pack", lambda *a: packed.append(original(*a) is not None) or original(*a))
    curves = {}
    for name, flag in (("one", "true"), ("two", "false")):
        out = tmp_path / name
        result = align("dpo", "-m", "tiny", "-d", pairs_file, "-o", out, "--max-steps", "3", "--batch-size", "4",
                       "--lr", "1e-3", "--save-steps", "100", "--set", f"dpo.pair_rows={flag}")
        assert result.code == 0, result.err
        curves[name] = [(r["loss"], r["rewards/margins"]) for r in read_records(out / METRICS) if "rewards/margins" in r]
    assert len(curves["one"]) == 3
    # every policy and reference forward of the first run (3 steps x 2) went through one row per pair
    assert len(packed) == 6 and all(packed), packed
    assert curves["one"][-1][1] > curves["one"][0][1]  # it learns: the margin grows
    for (loss_one, margin_one), (loss_two, margin_two) in zip(curves["one"], curves["two"]):
        assert abs(loss_one - loss_two) < 1e-4 and abs(margin_one - margin_two) < 1e-4


@pytest.mark.parametrize("family,attention", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_a_reward_pair_in_one_row_scores_as_two_rows(family, attention):
    """align rm: TRL's reward batch (chosen rows, then rejected rows) as one row per pair gives each side
    the score transformers reads at its last token, and the same gradients."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from align.stages.rm import install_pair_rows

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                                  num_labels=1)
    config._attn_implementation = attention
    model = AutoModelForSequenceClassification.from_config(config).eval()
    sides = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [1, 2, 3, 4, 10], [7, 8, 11, 12, 13]]  # chosen 0, 1; rejected 0, 1
    ids = torch.zeros(4, 6, dtype=torch.long)
    for row, side in enumerate(sides):
        ids[row, :len(side)] = torch.tensor(side)
    inputs = dict(input_ids=ids, attention_mask=(ids != 0).long(), use_cache=False)

    def scores_and_grads():
        model.zero_grad()
        logits = model(**inputs).logits
        (logits[:2] - logits[2:]).sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    two, two_grads = scores_and_grads()
    assert install_pair_rows(model)
    one, one_grads = scores_and_grads()
    assert one.shape == (4, 1) and torch.allclose(one, two, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(one_grads, two_grads))
    assert torch.allclose(model(input_ids=ids[:3], attention_mask=inputs["attention_mask"][:3]).logits, two[:3], atol=1e-5)  # odd: its own forward


def test_rm_trains_the_same_with_one_row_or_two(align, pairs_file, tmp_path, monkeypatch):
    from align.checkpoints import METRICS, read_records

    packed, original = [], pair_rows.share_prefixes
    monkeypatch.setattr(pair_rows, "share_prefixes", lambda *a: packed.append(1) or original(*a))
    curves = {}
    for name, flag in (("one", "true"), ("two", "false")):
        out = tmp_path / name
        result = align("rm", "-m", "tiny", "-d", pairs_file, "-o", out, "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3",
                       "--save-steps", "100", "--set", f"pair_rows={flag}", "--set", "lora.dropout=0")
        assert result.code == 0, result.err
        curves[name] = [(r["loss"], r["accuracy"]) for r in read_records(out / METRICS) if "accuracy" in r]
    assert len(curves["one"]) == 3 and len(packed) == 3  # every step of the first run went through one row per pair
    for (loss_one, accuracy_one), (loss_two, accuracy_two) in zip(curves["one"], curves["two"], strict=True):
        assert abs(loss_one - loss_two) < 1e-4 and accuracy_one == accuracy_two
