"""Every dtype and precision a user can pick: each training stage either runs (finite metrics, a
loadable output) or refuses in one line before any model loads; trained heads are float32."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

from conftest import assert_clean_failure, write_jsonl

DTYPES = ["float32", "bfloat16", "float16"]
PRECISIONS = ["fp32", "bf16", "fp16"]
STAGES = ["sft", "rm", "prm", "dpo", "ppo", "grpo", "rloo"]


def refusal(dtype: str, precision: str, lora: bool) -> str | None:
    """What align must say for a cell it refuses (on a CPU), or None for a cell that must run."""
    if dtype == "float16" and not lora:
        return "full fine-tuning cannot train float16 weights"
    halves = {"bfloat16": "bf16", "float16": "fp16"}
    if dtype in halves and precision != "fp32" and halves[dtype] != precision:
        return "mixes bfloat16 and float16"
    return None


def stage_args(stage, out, files):
    sft, pairs, steps, prompts, scorers = files
    fn = ["--reward-fn", f"{scorers}:share_of_e"]
    return {
        "sft": ["sft", "-m", "tiny", "-d", sft, "-o", out, "--max-steps", "1"],
        "rm": ["rm", "-m", "tiny", "-d", pairs, "-o", out, "--max-steps", "1"],
        "prm": ["prm", "-m", "tiny", "-d", steps, "-o", out, "--max-steps", "1"],
        "dpo": ["dpo", "-m", "tiny", "-d", pairs, "-o", out, "--max-steps", "1"],
        "ppo": ["ppo", "-m", "tiny", "-p", prompts, "-o", out, *fn, "--episodes", "8", "--batch-size", "8",
                "--max-new-tokens", "4", "--ppo-epochs", "1"],
        "grpo": ["grpo", "-m", "tiny", "-p", prompts, "-o", out, *fn, "--num-generations", "4", "--batch-size", "4",
                 "--max-new-tokens", "4", "--max-steps", "1"],
        "rloo": ["rloo", "-m", "tiny", "-p", prompts, "-o", out, *fn, "--num-generations", "4", "--batch-size", "4",
                 "--max-new-tokens", "4", "--max-steps", "1"],
    }[stage]


@pytest.fixture
def matrix_files(sft_file, pairs_file, steps_file, prompts_file, reward_file):
    return sft_file, pairs_file, steps_file, prompts_file, reward_file


@pytest.mark.parametrize("stage", STAGES)
def test_precision_matrix(align, stage, matrix_files, tiny_model, tmp_path, monkeypatch):
    """18 cells per stage: model.dtype x train.precision x (LoRA, full)."""
    from align import models

    ran = []
    for dtype in DTYPES:
        for precision in PRECISIONS:
            for lora in (True, False):
                out = tmp_path / f"{dtype}-{precision}-{'lora' if lora else 'full'}"
                args = [*stage_args(stage, out, matrix_files), "--set", f"model.dtype={dtype}",
                        "--set", f"train.precision={precision}", *([] if lora else ["--no-lora"])]
                expected = refusal(dtype, precision, lora)
                if expected:
                    real_guard = models._hub_guard  # every model and tokenizer load goes through it
                    monkeypatch.setattr(models, "_hub_guard", lambda *a, **k: pytest.fail("loaded a model"))
                    assert_clean_failure(align(*args), 2, expected, f"model.dtype={dtype}")
                    monkeypatch.setattr(models, "_hub_guard", real_guard)
                    assert not out.exists()
                    continue
                result = align(*args)
                assert result.code == 0, (dtype, precision, lora, result.err)
                logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                numbers = [v for row in logged for v in row.values() if isinstance(v, float)]
                assert numbers and all(math.isfinite(v) for v in numbers), (dtype, precision, lora)
                auto = {"rm": AutoModelForSequenceClassification, "prm": AutoModelForTokenClassification}.get(stage, AutoModelForCausalLM)
                loaded = auto.from_pretrained(out)
                assert all(torch.isfinite(p).all() for p in loaded.parameters())
                ran.append((dtype, precision, lora))
    # The four cells GPU users meet most run, with LoRA and full fine-tuning alike.
    assert {(d, p, lora) for d in ("float32", "bfloat16") for p in ("fp32", "bf16") for lora in (True, False)} <= set(ran)


@pytest.mark.parametrize("lora", [True, False])
def test_the_value_head_is_float32_and_moves_on_a_bfloat16_base(tiny_model, lora):
    from align.config import LoraSpec, ModelSpec
    from align.generation import response_values
    from align.roles import build_roles

    spec = ModelSpec(path="tiny", dtype="bfloat16")
    roles = build_roles(spec, str(tiny_model), LoraSpec(enabled=lora), None, 0)
    assert next(roles.policy.parameters()).dtype == torch.bfloat16
    assert roles.value_head.weight.dtype == torch.float32
    ids = torch.tensor([[5, 6, 7, 8]])
    inputs = (ids, torch.ones_like(ids), torch.arange(4).unsqueeze(0), 2, 2)
    optimizer = torch.optim.AdamW(roles.value_head.parameters(), lr=1e-5)
    before = roles.value_head.weight.detach().clone()
    with roles.valuing() as value_body:
        values = response_values(value_body, roles.value_head, *inputs)  # bf16 hidden states, no autocast
    assert values.dtype == torch.float32
    values.sum().backward()
    optimizer.step()
    assert not torch.equal(roles.value_head.weight, before)  # a 1e-5 step that bfloat16 would round away


def test_auto_on_a_gpu_without_bfloat16_trains_float32_weights_under_fp16(monkeypatch):
    from align.config import ModelSpec
    from align.precision import check_precision, compute_dtype, weights_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    auto = ModelSpec(path="m")
    assert weights_dtype(auto, trained=True) == torch.float32  # full fine-tuning: float32 master weights
    assert weights_dtype(auto, trained=False) == torch.float16  # a frozen base (LoRA, reference, reward)
    assert compute_dtype("auto") == torch.float16
    check_precision(auto, "auto", trains_base=True)  # runs: float32 weights, fp16 autocast, GradScaler
    with pytest.raises(Exception, match="this GPU has no bfloat16"):
        check_precision(ModelSpec(path="m", dtype="bfloat16"), "fp32", trains_base=False)


def test_auto_on_a_bfloat16_gpu_trains_float32_master_weights(monkeypatch):
    """Full fine-tuning under `auto` keeps float32 weights on a bf16 GPU too (bf16 autocast runs on
    them); only frozen weights load in bfloat16. The first GPU run caught the old bfloat16 choice."""
    from align.config import ModelSpec
    from align.precision import check_precision, compute_dtype, weights_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    auto = ModelSpec(path="m")
    assert weights_dtype(auto, trained=True) == torch.float32
    assert weights_dtype(auto, trained=False) == torch.bfloat16
    assert compute_dtype("auto") == torch.bfloat16
    check_precision(auto, "auto", trains_base=True)


def test_an_adamw_step_at_lr_1e_5_rounds_away_in_bfloat16_weights():
    """Why full fine-tuning keeps float32 master weights: bfloat16's spacing at 0.05 is 2**-12
    (~2.4e-4), so a step of ~1e-5 (AdamW's first step is lr * sign(grad)) leaves the weight as it was."""
    for dtype, moved in ((torch.float32, True), (torch.bfloat16, False)):
        weight = torch.nn.Parameter(torch.full((4,), 0.05, dtype=dtype))
        before = weight.detach().clone()
        optimizer = torch.optim.AdamW([weight], lr=1e-5, weight_decay=0.0)
        weight.sum().backward()
        optimizer.step()
        assert (not torch.equal(weight.detach(), before)) == moved
        if moved:
            assert torch.allclose(before - weight.detach(), torch.full((4,), 1e-5), atol=1e-8)  # float32 spacing at 0.05: ~3.7e-9


def test_full_fine_tuning_in_bfloat16_weights_runs_with_a_warning(caplog):
    from types import SimpleNamespace

    from align.config import LoraSpec, ModelSpec
    from align.precision import warn_pure_bfloat16

    def config(dtype, lora):
        return SimpleNamespace(model=ModelSpec(path="m", dtype=dtype), train=SimpleNamespace(precision="fp32"),
                               lora=LoraSpec(enabled=lora))

    with caplog.at_level("WARNING", logger="align"):
        warn_pure_bfloat16(config("bfloat16", lora=True))
        warn_pure_bfloat16(config("auto", lora=False))
        assert not caplog.records
        warn_pure_bfloat16(config("bfloat16", lora=False))
    assert len(caplog.records) == 1 and "round away" in caplog.records[0].getMessage()


def test_auto_on_a_cpu_is_bf16_where_it_has_bf16_units_and_fp32_elsewhere(monkeypatch):
    from align.precision import compute_dtype, weights_dtype
    from align.config import ModelSpec

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ALIGN_CPU_BF16", "1")
    for amx, avx512_bf16, expected in ((True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        assert compute_dtype("auto") == expected
        assert compute_dtype("fp32") == torch.float32  # asked for: kept
    monkeypatch.setenv("ALIGN_CPU_BF16", "0")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert compute_dtype("auto") == torch.float32
    assert weights_dtype(ModelSpec(path="m")) == torch.float32  # weights stay float32 on a CPU: autocast only


def test_ppo_in_fp16_scales_its_losses(align, ppo_prompts, reward_file, tmp_path, monkeypatch):
    from align.stages import ppo

    scalers = []
    real = ppo.grad_scaler
    monkeypatch.setattr(ppo, "grad_scaler", lambda *a: scalers.append(real(*a)) or scalers[-1])
    out = tmp_path / "fp16"
    result = align("ppo", "-m", "tiny", "-p", ppo_prompts, "-o", out, "--reward-fn", f"{reward_file}:share_of_e",
                   "--episodes", "16", "--batch-size", "8", "--max-new-tokens", "4", "--set", "train.precision=fp16")
    assert result.code == 0, result.err
    assert scalers[0].is_enabled() and scalers[0].get_scale() > 1
    assert all(math.isfinite(json.loads(line)["policy_loss"]) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_lora_is_merged_in_float32_and_saved_in_the_dtype_asked_for(align, tiny_model, sft_file, tmp_path):
    from peft import PeftModel

    out = tmp_path / "sft"
    assert align("sft", "-m", "tiny", "-d", sft_file, "-o", out, "--max-steps", "2", "--lr", "1e-2",
                 "--set", "model.dtype=bfloat16").code == 0
    saved = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert saved.dtype == torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().to(torch.bfloat16).state_dict()
    assert all(torch.equal(expected[k], v) for k, v in saved.state_dict().items())


def test_pooling_follows_transformers_when_pad_is_eos_and_the_template_ends_in_it(align, tiny_model, tmp_path):
    """Llama-3 style: padding falls back to EOS and each turn ends in it. A sequence classifier
    scores the last token that is not padding; the shared-base reward adapter must score the same one."""
    from transformers import AutoTokenizer

    from align.config import LoraSpec, ModelSpec
    from align.rewards import RewardModel
    from align.roles import SharedBaseReward, build_roles, last_token_index, shared_reward_adapter

    base = tmp_path / "eos-pad"
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tokenizer.save_pretrained(base)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"How was movie {i}?", "chosen": "It was wonderful and great, thanks!", "rejected": "Awful."}
        for i in range(8)
    ])
    rm = tmp_path / "rm"
    assert align("rm", "-m", base, "-d", pairs, "-o", rm, "--max-steps", "3", "--lr", "5e-3").code == 0
    eos = tokenizer.eos_token_id
    assert last_token_index(torch.tensor([[4, 5, eos, eos, eos]]), eos).tolist() == [1]
    roles = build_roles(ModelSpec(path=str(base)), str(base), LoraSpec(), str(rm), eos)
    shared = SharedBaseReward(roles, shared_reward_adapter(str(rm), str(base), qlora=False), tokenizer)
    roles.train(False)  # as in the PPO loop, after the reward adapter is added: no dropout
    prompts, answers = ["How was movie 1?", "How was movie 2?"], ["It was wonderful and great, thanks!", "Awful."]
    separate = RewardModel(ModelSpec(path=str(rm)))(prompts, answers)
    assert torch.allclose(shared(prompts, answers), separate, atol=1e-4)


def test_atomic_writes_keep_the_mode_a_plain_write_gives(tmp_path):
    import os

    from align.checkpoints import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


def test_each_process_claims_its_gpu_before_loading(monkeypatch):
    from align import distributed
    from align.errors import ConfigError

    claimed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", claimed.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    distributed.claim_device()
    assert claimed == [1]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match="LOCAL_RANK 2 but this machine shows 2 GPU"):
        distributed.claim_device()


def test_run_stage_claims_the_device_before_the_stage_loads_anything(monkeypatch, tmp_path):
    import types

    from align import distributed, pipeline, stages
    from align.config import GenerateConfig

    order = []
    monkeypatch.setattr(distributed, "claim_device", lambda: order.append("claim"))
    fake = types.SimpleNamespace(run=lambda config: order.append("run") or tmp_path)
    monkeypatch.setattr(stages.importlib, "import_module", lambda name: fake)
    pipeline.run_stage(GenerateConfig(model="tiny", output=str(tmp_path / "x.jsonl"), prompts=str(tmp_path / "p.jsonl")))
    assert order == ["claim", "run"]


def test_optimizer_state_is_loaded_onto_the_weights_device(monkeypatch, tmp_path):
    from align import checkpoints

    params = {"w": torch.nn.Parameter(torch.ones(2))}
    optimizer = torch.optim.AdamW(params.values())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    checkpoints.save_loop_state(tmp_path, 1, params, optimizer, scheduler, {}, 2)
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or real(*a, **k))
    assert checkpoints.load_loop_state(tmp_path, params, optimizer, scheduler)[0] == 1
    assert seen == [torch.device("cpu")]


def test_a_recipe_with_a_stage_that_cannot_train_is_refused_before_any_stage_runs(align, tmp_path):
    import shutil

    from conftest import ROOT

    shutil.copytree(ROOT / "recipes" / "data", tmp_path / "data")
    text = (ROOT / "recipes" / "tiny.yaml").read_text().replace("output_dir: runs/tiny", f"output_dir: {tmp_path / 'runs'}")
    text = text.replace("    dpo: {beta: 0.1, loss: sigmoid}", "    dpo: {beta: 0.1, loss: sigmoid}\n    lora: false\n    model: {dtype: float16}")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(text)
    assert_clean_failure(align("run", recipe), 2, "stage 'dpo'", "full fine-tuning cannot train float16 weights")
    assert not (tmp_path / "runs" / "sft").exists()  # sft, before it, did not run either
