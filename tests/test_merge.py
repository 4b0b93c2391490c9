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


def test_merge_casts_to_the_asked_dtype(align, lora_sft, tmp_path):
    out = tmp_path / "bf16"
    assert align("merge", "-m", lora_sft / "adapter", "-o", out, "--dtype", "bfloat16").code == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_merge_bad_input(align, lora_sft, tiny_model, tmp_path):
    assert_clean_failure(align("merge", "-m", tiny_model, "-o", tmp_path / "x"), 4, "no LoRA adapter here")
    assert_clean_failure(align("merge", "-m", lora_sft, "-o", tmp_path / "y", "--push-to-hub", "me/model"), 5, "unreachable")
    assert not (tmp_path / "y").exists()
