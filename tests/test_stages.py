"""Each stage through the real CLI on the tiny model: parameters move, outputs load, manifests are complete."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import assert_clean_failure

FAST = ["--max-steps", "3", "--batch-size", "4", "--set", "train.save_steps=2"]


def weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def changed(before, after, fragment):
    keys = [k for k in before if fragment in k]
    assert keys, fragment
    return [k for k in keys if not torch.equal(before[k], after[k])]


def trained_on_a_4bit_base(align, args, out):
    """The same run as plain LoRA gives another adapter: 4-bit rounding of the base changes every
    gradient, so an identical adapter would mean --qlora was silently ignored."""
    from safetensors.torch import load_file

    plain = out.with_name(out.name + "-plain-lora")
    assert align(*[str(plain) if a == str(out) else a for a in map(str, args)]).code == 0
    quantized, unquantized = load_file(out / "adapter" / "adapter_model.safetensors"), load_file(plain / "adapter" / "adapter_model.safetensors")
    return any(not torch.equal(quantized[k], unquantized[k]) for k in quantized)


def manifest(out):
    data = json.loads((out / "align.json").read_text())
    assert data["completed"] is True
    return data


def test_sft_lora_trains_adapters_and_writes_a_merged_loadable_model(align, tiny_model, sft_file, tmp_path):
    out = tmp_path / "sft"
    result = align("sft", "--model", "tiny", "--data", sft_file, "--output", out, "--lr", "1e-2", *FAST)
    assert result.code == 0, result.err
    after = weights(out)
    before = weights(tiny_model)
    assert changed(before, after, "q_proj"), "LoRA deltas must be merged into the attention weights"
    assert not changed(before, after, "embed_tokens"), "LoRA must leave the embeddings alone"
    assert (out / "adapter" / "adapter_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    info = manifest(out)
    assert info["stage"] == "sft" and info["base_model"] == "tiny" and info["lora"] is True
    assert info["metrics"]["train_loss"] > 0 and info["data"]["rows_used"] == 16
    assert info["config"]["train"]["max_steps"] == 3 and len(info["data_fingerprint"]) == 16
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3]


def test_sft_loss_falls_on_repeated_data(align, sft_file, tmp_path):
    out = tmp_path / "sft"
    result = align("sft", "-m", "tiny", "-d", sft_file, "-o", out, "--no-lora", "--lr", "3e-3", "--max-steps", "12")
    assert result.code == 0, result.err
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0] * 0.8, losses


def test_sft_full_finetuning_changes_every_kind_of_weight(align, tiny_model, sft_file, tmp_path):
    out = tmp_path / "full"
    assert align("sft", "-m", "tiny", "-d", sft_file, "-o", out, "--no-lora", "--lr", "1e-2", *FAST).code == 0
    before, after = weights(tiny_model), weights(out)
    assert changed(before, after, "embed_tokens") and changed(before, after, "mlp.down_proj")
    assert not (out / "adapter").exists() and manifest(out)["lora"] is False


def test_sft_qlora_merges_into_a_full_precision_model(align, tiny_model, sft_file, tmp_path):
    out = tmp_path / "qlora"
    args = ["sft", "-m", "tiny", "-d", sft_file, "-o", out, "--lr", "1e-2", *FAST]
    result = align(*args, "--qlora")
    assert result.code == 0, result.err
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert changed(weights(tiny_model), model.state_dict(), "q_proj")
    assert trained_on_a_4bit_base(align, args, out)


def test_reward_model_learns_to_prefer_chosen(align, pairs_file, tmp_path):
    out = tmp_path / "rm"
    result = align("rm", "-m", "tiny", "-d", pairs_file, "-o", out, "--lr", "5e-3", "--max-steps", "8",
                   "--eval-fraction", "0.25", "--set", "train.save_steps=4")
    assert result.code == 0, result.err
    info = manifest(out)
    assert info["metrics"]["eval_accuracy"] == 1.0
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)

    def score(answer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "How was movie 99?"}, {"role": "assistant", "content": answer}], tokenize=False)
        with torch.no_grad():
            return model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()

    assert model.config.num_labels == 1
    assert score("It was wonderful and great, thanks!") > score("It was awful and boring.")


def test_reward_margin_column_is_used(align, tmp_path):
    from conftest import write_jsonl

    rows = [{"prompt": f"p{i}", "chosen": "good answer", "rejected": "bad", "margin": 2.0} for i in range(8)]
    data = write_jsonl(tmp_path / "margin.jsonl", rows)
    out = tmp_path / "rm"
    assert align("rm", "-m", "tiny", "-d", data, "-o", out, "--max-steps", "2").code == 0
    # With margin 2 the Bradley-Terry loss starts near -log(sigmoid(-2)) = 2.127, not log 2 = 0.693.
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(2.127, abs=0.15)


@pytest.mark.parametrize(
    "loss, extra",
    [("sigmoid", []), ("ipo", []), ("hinge", []), ("robust", ["--label-smoothing", "0.1"]), ("length-normalized", [])],
)
def test_dpo_loss_variants_train_and_separate_chosen_from_rejected(align, pairs_file, tmp_path, loss, extra):
    out = tmp_path / loss
    result = align("dpo", "-m", "tiny", "-d", pairs_file, "-o", out, "--loss", loss, "--beta", "0.5",
                   "--lr", "5e-3", "--max-steps", "6", "--eval-fraction", "0.25", *extra)
    assert result.code == 0, result.err
    info = manifest(out)
    assert info["config"]["dpo"]["loss"] == loss
    assert info["metrics"]["eval_rewards/margins"] > 0
    assert info["metrics"]["eval_rewards/accuracies"] == 1.0


def test_dpo_full_finetuning_with_precomputed_reference(align, tiny_model, pairs_file, tmp_path):
    out = tmp_path / "dpo"
    result = align("dpo", "-m", "tiny", "-d", pairs_file, "-o", out, "--no-lora", "--precompute-ref", *FAST)
    assert result.code == 0, result.err
    assert changed(weights(tiny_model), weights(out), "embed_tokens")
    assert manifest(out)["config"]["dpo"]["precompute_ref_log_probs"] is True


@pytest.mark.parametrize("template", ["auto", "never"])
def test_dpo_trains_a_side_cut_at_its_length_limit_without_an_end_of_turn(align, tiny_model, tmp_path, monkeypatch, template):
    """best-of-n and label mark a response cut at its length limit (`chosen_finished`/`rejected_finished`
    false): dpo trains that side as it was sampled, with no end of turn, so a preference round does not
    teach the model to stop mid-sentence; a finished side keeps TRL's rendering. With the chat template
    and as plain text."""
    from transformers import AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [{"prompt": "How was it?", "chosen": "It was wonderful and", "rejected": "It was awful.",
             "chosen_finished": False, "rejected_finished": True},
            {"prompt": "How was it?", "chosen": "It was wonderful and", "rejected": "It was awful.", "rejected_finished": False},
            {"prompt": "How was it?", "chosen": "It was wonderful and", "rejected": "It was awful."}] * 2
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trained, batch = [], DataCollatorForPreference.torch_call  # the examples TRL's collator batches for training
    monkeypatch.setattr(DataCollatorForPreference, "torch_call", lambda self, examples: trained.extend(examples) or batch(self, examples))
    result = align("dpo", "-m", "tiny", "-d", data, "-o", tmp_path / "dpo", "--set", f"data.chat_template={template}", *FAST)
    assert result.code == 0, result.err
    assert manifest(tmp_path / "dpo")["data"]["unfinished"] == 4  # one side in each of rows 1 and 2, twice
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    end = "<|im_end|>\n" if template == "auto" else tokenizer.eos_token
    ends = lambda row: tuple(tokenizer.decode(row[f"{side}_ids"]).endswith(end) for side in ("chosen", "rejected"))  # noqa: E731
    by_ends = {ends(row): row for row in trained}
    assert set(by_ends) == {(False, True), (True, False), (True, True)}  # the cut side of rows 1 and 2 has none
    ended = by_ends[True, True]
    for (chosen_done, rejected_done), row in by_ends.items():
        for side, done in (("chosen", chosen_done), ("rejected", rejected_done)):
            text = tokenizer.decode(row[f"{side}_ids"])
            assert text[:len(text) - len(end) * done].endswith(rows[2][side]), (side, text)
            if not done:  # exactly the finished rendering less its end of turn
                assert ended[f"{side}_ids"][:len(row[f"{side}_ids"])] == row[f"{side}_ids"]
                assert tokenizer.decode(ended[f"{side}_ids"][len(row[f"{side}_ids"]):]) == end


def test_dpo_checkpoints_gradients_by_default_as_trl_ships_it_with_the_same_losses(align, pairs_file, tmp_path, monkeypatch):
    """DPO recomputes each layer in the backward pass unless --no-gradient-checkpointing (bench/dpo_vs_trl.py:
    0.88x TRL's peak memory instead of 1.14x); the losses are the same either way. Other stages keep it off."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    calls = []
    real = LlamaAttention.forward
    monkeypatch.setattr(LlamaAttention, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    runs = {}
    for name, flags in (("default", []), ("off", ["--no-gradient-checkpointing"])):
        calls.clear()
        out = tmp_path / name
        result = align("dpo", "-m", "tiny", "-d", pairs_file, "-o", out, "--lr", "5e-3", "--max-steps", "3", "--batch-size", "4", *flags)
        assert result.code == 0, result.err
        losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        runs[name] = len(calls), losses, manifest(out)["config"]["train"]["gradient_checkpointing"]
    (checkpointed_calls, checkpointed, on), (plain_calls, plain, off) = runs["default"], runs["off"]
    assert (on, off) == (True, False)
    assert checkpointed_calls > plain_calls  # the layers ran again in the backward pass
    assert checkpointed == pytest.approx(plain, rel=1e-5)
    from align.config import SFTConfig

    assert SFTConfig(model="m", data="d.jsonl", output="o").train.gradient_checkpointing is False


def test_generate_writes_one_row_per_sample_reproducibly(align, prompts_file, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (first, second):
        result = align("generate", "-m", "tiny", "-p", prompts_file, "-o", out, "-n", "3",
                       "--max-new-tokens", "8", "--batch-size", "4", "--seed", "7")
        assert result.code == 0, result.err
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(rows) == 15 and [r["sample"] for r in rows[:3]] == [0, 1, 2]
    assert {r["prompt"] for r in rows} == {f"Tell me about movie {i}." for i in range(5)}
    assert all(r["tokens"] <= 8 for r in rows)
    assert first.read_text() == second.read_text()
    info = json.loads((tmp_path / "a.jsonl.align.json").read_text())
    assert info["completed"] and info["metrics"]["samples"] == 15
    third = tmp_path / "c.jsonl"
    align("generate", "-m", "tiny", "-p", prompts_file, "-o", third, "-n", "3", "--max-new-tokens", "8", "--seed", "8")
    assert third.read_text() != first.read_text()


def test_generate_refuses_to_replace_a_file_unasked(align, prompts_file, tmp_path):
    out = tmp_path / "mine.jsonl"
    out.write_text("precious\n")
    assert_clean_failure(align("generate", "-m", "tiny", "-p", prompts_file, "-o", out), 5, "already exists", "--overwrite")
    assert out.read_text() == "precious\n"


def test_stage_runs_from_a_recipe_file_with_flags_on_top(align, sft_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny\ntrain: {{max_steps: 1}}\nstages:\n  - {{name: first, stage: sft, data: {sft_file}}}\n")
    out = tmp_path / "out"
    result = align("sft", "--config", recipe, "--output", out, "--max-steps", "2")
    assert result.code == 0, result.err
    assert manifest(out)["config"]["train"]["max_steps"] == 2
    assert_clean_failure(align("dpo", "--config", recipe, "-o", tmp_path / "x"), 2, "it has no dpo stage")


def test_resume_continues_from_the_newest_checkpoint(align, sft_file, tmp_path):
    out = tmp_path / "sft"
    args = ["sft", "-m", "tiny", "-d", sft_file, "-o", out, "--set", "train.save_steps=2"]
    assert align(*args, "--max-steps", "2").code == 0
    # As if the run had been killed after logging step 3 but before saving it, mid-write.
    (out / "align.json").unlink()
    with (out / "metrics.jsonl").open("a") as log:
        log.write('{"stage": "sft", "step": 3, "loss": 9.9}\n{"stage": "sf')
    result = align(*args, "--max-steps", "4", "--resume")
    assert result.code == 0, result.err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4]
    assert manifest(out)["metrics"]["train_loss"] > 0


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_qlora_preference_stages(align, pairs_file, tmp_path, stage):
    out = tmp_path / stage
    args = [stage, "-m", "tiny", "-d", pairs_file, "-o", out, *FAST]
    result = align(*args, "--qlora")
    assert result.code == 0, result.err
    assert trained_on_a_4bit_base(align, args, out)
