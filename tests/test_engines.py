"""--engine vllm where vLLM is not installed (this environment), and the checks made before anything
loads. The engine itself is tested in tests/test_vllm_engine.py, inside .venv-vllm."""

from __future__ import annotations

import sys

import pytest
from conftest import assert_clean_failure

from align import engines
from align.errors import ConfigError


@pytest.mark.parametrize("stage", ["generate", "best-of-n", "ppo"])
def test_engine_vllm_without_vllm_is_refused_in_one_line(align, tiny_model, prompts_file, reward_file, tmp_path, monkeypatch, stage):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, as where it is not installed
    out = tmp_path / ("out.jsonl" if stage == "generate" else "out")
    reward = [] if stage == "generate" else ["--reward-fn", f"{reward_file}:share_of_e"]
    result = align(stage, "-m", "tiny", "-p", prompts_file, "-o", out, *reward, "--engine", "vllm")
    assert_clean_failure(result, 2, "--engine vllm: vLLM is not installed", "make vllm-env", "--engine hf")
    assert not out.exists()


def test_the_hf_engine_is_the_default_and_needs_no_vllm(align, tiny_model, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert align("generate", "-m", "tiny", "-p", prompts_file, "-o", tmp_path / "g.jsonl", "--max-new-tokens", "4").code == 0


def test_an_adapter_rank_above_the_engines_largest_is_refused_before_loading(align, tiny_model, ppo_prompts, reward_file,
                                                                              tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "require_vllm", lambda: None)
    result = align("ppo", "-m", "tiny", "-p", ppo_prompts, "-o", tmp_path / "ppo", "--reward-fn", f"{reward_file}:share_of_e",
                   "--engine", "vllm", "--set", "lora.r=1024", "--set", "generation.lora_sync=adapter")
    assert_clean_failure(result, 2, "LoRA rank 1024", "largest adapter rank (512)", "--engine hf")
    assert not (tmp_path / "ppo").exists()


def test_adapters_are_served_at_the_next_rank_the_engine_has():
    assert [engines.engine_lora_rank(r) for r in (1, 4, 8, 16, 17, 64, 300, 512)] == [1, 8, 8, 16, 32, 64, 320, 512]
    with pytest.raises(ConfigError, match="above the vLLM engine's largest"):
        engines.engine_lora_rank(513)


def test_a_multi_process_run_is_refused_for_training_stages_only(monkeypatch):
    from align.config import GenerateConfig, PPOConfig

    monkeypatch.setattr(engines, "require_vllm", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    ppo = PPOConfig(model="tiny", prompts="p.jsonl", output="o", reward_fn="f.py:g", generation={"engine": "vllm"})
    with pytest.raises(ConfigError, match="runs in one process for now"):
        engines.check_stage_engine(ppo)
    engines.check_stage_engine(GenerateConfig(model="tiny", prompts="p.jsonl", output="o.jsonl", generation={"engine": "vllm"}))


def test_each_engine_samples_in_the_precision_the_hf_engine_would(monkeypatch):
    """On a CPU with bf16 units: `generate` and the other sampling commands load float32 with hf, so
    vLLM serves float32 there too; PPO/GRPO/RLOO roll out under the trainer's bf16 autocast, so their
    engine computes in bf16. An explicit model.dtype is both engines' dtype."""
    import torch

    from align import precision
    from align.config import EngineSpec, ModelSpec

    monkeypatch.setenv("ALIGN_CPU_BF16", "1")
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: True)
    served = []
    closed = []

    class Engine:
        def __init__(self, source, spec, *, dtype, **_):
            served.append(dtype)

        def close(self):
            closed.append(True)

    monkeypatch.setattr(engines, "VLLMEngine", Engine)
    with engines.open_sampler(ModelSpec(path="tiny"), "src", EngineSpec(engine="vllm"), seed=0):
        assert closed == []
    with engines.open_sampler(ModelSpec(path="tiny", dtype="bfloat16"), "src", EngineSpec(engine="vllm"), seed=0):
        pass
    assert served == [torch.float32, torch.bfloat16]
    assert closed == [True, True]  # the sampling stages close their engine when they are done with it
    assert engines.engine_dtype(ModelSpec(path="tiny"), "auto") == torch.bfloat16
    assert engines.engine_dtype(ModelSpec(path="tiny"), "fp32") == torch.float32
