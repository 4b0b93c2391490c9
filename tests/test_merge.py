import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import assert_clean_failure


@pytest.fixture
def lora_sft(align, sft_file, tmp_path):
    out = tmp_path / "sft"
    assert align("sft", "-m", "tiny", "-d", sft_file, "-o", out, "--max-steps", "2", "--lr", "1e-2").code == 0
    return out


def test_merge_writes_a_standalone_model_equal_to_base_plus_adapter(align, lora_sft, tmp_path):
    out = tmp_path / "merged"
    result = align("merge", "-m", lora_sft, "-o", out)
    assert result.code == 0, result.err
    manifest = json.loads((out / "align.json").read_text())
    assert manifest["metrics"]["max_abs_logit_diff"] < 1e-4
    merged, stage = load_file(out / "model.safetensors"), load_file(lora_sft / "model.safetensors")
    assert all(torch.allclose(merged[k], stage[k], atol=1e-6) for k in stage)
    assert not (out / "adapter_config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"


@pytest.mark.parametrize("stage", ["rm", "prm"])
def test_a_reward_models_adapter_merges_into_a_classifier_with_its_trained_head(align, stage, pairs_file, tmp_path):
    """An adapter trained as a reward model (SEQ_CLS) or a PRM (TOKEN_CLS) merges into that classifier,
    its trained score head included (not into a causal LM that drops it); it scores as the stage's own
    output does, the PRM's step separator carried in the manifest."""
    from align.config import ModelSpec
    from align.rewards import reward_model
    from conftest import stepwise_rows, write_jsonl

    trained = tmp_path / stage
    if stage == "rm":
        assert align("rm", "-m", "tiny", "-d", pairs_file, "-o", trained, "--max-steps", "2", "--lr", "1e-2").code == 0
    else:
        steps = write_jsonl(tmp_path / "steps.jsonl", [{**row, "completions": [s + "." for s in row["completions"]]}
                                                       for row in stepwise_rows(16)])
        assert align("prm", "-m", "tiny", "-d", steps, "-o", trained, "--step-separator", ". ", "--max-steps", "2",
                     "--lr", "1e-2").code == 0
    out = tmp_path / "merged"
    result = align("merge", "-m", trained, "-o", out)
    assert result.code == 0, result.err
    merged, own = load_file(out / "model.safetensors"), load_file(trained / "model.safetensors")
    assert set(merged) == set(own) and any("score" in k for k in merged)
    assert all(torch.allclose(merged[k], own[k], atol=1e-6) for k in own)
    manifest = json.loads((out / "align.json").read_text())
    assert manifest["kind"] == {"rm": "reward", "prm": "process"}[stage]
    assert manifest["base_model"] == json.loads((trained / "align.json").read_text())["base_model"]
    if stage == "prm":
        assert manifest["step_separator"] == ". "
    prompts, completions = ["Solve problem 1."] * 2, ["step 1 good. step 2 bad", "step 1 bad. step 2 good"]
    scores = [reward_model(ModelSpec(path=str(path)))(prompts, completions) for path in (trained, out)]
    assert torch.allclose(scores[0], scores[1], atol=1e-5)


def test_merge_runs_on_the_host_where_a_gpu_is_present(align, lora_sft, tmp_path, monkeypatch):
    """Stage models go to the GPU when there is one; merge keeps base, adapter and probe inputs on the
    host (before, the model went to the GPU and the probes stayed on the CPU)."""
    from align.stages import merge

    devices, real = [], merge.load_model
    monkeypatch.setattr(merge, "load_model", lambda *args, **kwargs: devices.append(kwargs.get("device")) or real(*args, **kwargs))
    result = align("merge", "-m", lora_sft, "-o", tmp_path / "merged")
    assert result.code == 0, result.err
    assert devices == ["cpu"]  # load_model's default is this process's GPU, where there is one


def test_merge_casts_to_the_asked_dtype(align, lora_sft, tmp_path):
    out = tmp_path / "bf16"
    assert align("merge", "-m", lora_sft / "adapter", "-o", out, "--dtype", "bfloat16").code == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_merge_bad_input(align, lora_sft, tiny_model, tmp_path):
    assert_clean_failure(align("merge", "-m", tiny_model, "-o", tmp_path / "x"), 4, "no LoRA adapter here")
    assert_clean_failure(align("merge", "-m", lora_sft, "-o", tmp_path / "y", "--push-to-hub", "me/model"), 5, "unreachable")
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("kind", ["causal", "reward"])
def test_a_stage_merges_into_its_own_float32_weights_exactly_as_into_a_fresh_base(tiny_model, tmp_path, monkeypatch, kind):
    """The in-place merge (no second model in memory) writes the same bytes as loading a float32 base."""
    from peft import get_peft_model

    from align import models
    from align.config import LoraSpec, ModelSpec

    spec, lora = ModelSpec(path=str(tiny_model)), LoraSpec(r=4)
    tokenizer = models.load_tokenizer(spec, str(tiny_model))

    def trained():
        torch.manual_seed(0)
        model = get_peft_model(models.load_model(spec, str(tiny_model), lora, kind=kind, pad_token_id=tokenizer.pad_token_id),
                               models.peft_config(lora, kind=kind))
        for name, p in model.named_parameters():  # an adapter (and a reward head) that moved
            if p.requires_grad:
                p.data.add_(torch.randn_like(p) * 0.1)
        return model

    in_place, fresh = tmp_path / "in-place", tmp_path / "fresh"
    model = trained()
    assert models._merges_in_place(model, lora)
    models.save_stage_model(model, tokenizer, in_place, spec, str(tiny_model), lora, kind=kind)
    monkeypatch.setattr(models, "_merges_in_place", lambda *_: False)
    models.save_stage_model(trained(), tokenizer, fresh, spec, str(tiny_model), lora, kind=kind)
    a, b = load_file(in_place / "model.safetensors"), load_file(fresh / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(tiny_model / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in base if k in a)  # the adapter is in the weights


def test_a_model_with_two_adapters_or_a_4bit_base_is_merged_into_a_fresh_base():
    from types import SimpleNamespace

    from align.config import LoraSpec
    from align.models import _merges_in_place

    one = SimpleNamespace(peft_config={"default": 0}, parameters=lambda: [torch.zeros(1)])
    assert _merges_in_place(one, LoraSpec())
    assert not _merges_in_place(SimpleNamespace(peft_config={"default": 0, "value": 0}, parameters=one.parameters), LoraSpec())
    assert not _merges_in_place(one, LoraSpec(qlora=True))
    assert not _merges_in_place(SimpleNamespace(peft_config={"default": 0}, parameters=lambda: [torch.zeros(1, dtype=torch.bfloat16)]), LoraSpec())
