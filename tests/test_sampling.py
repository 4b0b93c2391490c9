"""What is sampled is what align's flags say, whatever the checkpoint's generation_config carries;
log-probs are the model's own (post-processed logits included) and never leave its device as
(B, T, vocab) tensors."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROCESSORS = {"repetition_penalty": 1.5, "top_k": 3, "no_repeat_ngram_size": 2, "min_new_tokens": 4}


@pytest.fixture
def opinionated_model(tiny_model, tmp_path):
    """The tiny model with a generation config like real checkpoints ship (Qwen2.5: repetition_penalty),
    and its weights scaled up so its logits are sharp enough for the processors to change samples."""
    path = tmp_path / "opinionated"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.mul_(4)
    for key, value in PROCESSORS.items():
        setattr(model.generation_config, key, value)
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.6
    model.generation_config._from_model_config = False  # as in a real checkpoint's generation_config.json
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return path


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ppo_starts_on_policy_whatever_the_generation_config_says(align, opinionated_model, ppo_prompts, reward_file,
                                                                  tmp_path, precision):
    out = tmp_path / precision
    result = align("ppo", "-m", opinionated_model, "-p", ppo_prompts, "-o", out, "--reward-fn", f"{reward_file}:share_of_e",
                   "--no-lora", "--episodes", "16", "--batch-size", "8", "--micro-batch-size", "8", "--mini-batches", "1",
                   "--ppo-epochs", "1", "--max-new-tokens", "8", "--set", f"train.precision={precision}")
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["kl"]) < 1e-6  # the policy is still the reference (was 0.027 with the processors applied)
    assert all(abs(r["approx_kl"]) < 1e-6 and r["clipfrac"] == 0 for r in rows)  # was approx_kl 2e-3


def test_generate_ignores_the_checkpoints_sampling_defaults(align, opinionated_model, prompts_file, tmp_path):
    from transformers import GenerationConfig

    plain = tmp_path / "plain"  # the same weights with a generation config that sets nothing
    model = AutoModelForCausalLM.from_pretrained(opinionated_model)
    model.generation_config = GenerationConfig(eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)
    model.save_pretrained(plain)
    AutoTokenizer.from_pretrained(opinionated_model).save_pretrained(plain)
    outputs = []
    for model in (plain, opinionated_model):
        out = tmp_path / f"{model.name}.jsonl"
        assert align("generate", "-m", model, "-p", prompts_file, "-o", out, "--max-new-tokens", "12",
                     "--temperature", "1.0").code == 0
        outputs.append([json.loads(line)["completion"] for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1]


def test_rollout_log_probs_are_the_policys_own_whatever_the_generation_config_says(opinionated_model):
    """With the checkpoint's repetition penalty or n-gram ban applied, the recorded log-probs
    would not be those of softmax(logits / T), and the samples would not be drawn from it."""
    from align.config import ModelSpec
    from align.generation import prompt_ids, response_logits, sample_rollout, sequences
    from align.losses import token_logprobs
    from align.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(path=str(opinionated_model)), str(opinionated_model), padding_side="left")
    model = load_model(ModelSpec(path=str(opinionated_model)), str(opinionated_model))
    prompts = [prompt_ids(tokenizer, f"Tell me about movie {i}", True) for i in range(8)]
    rollout = sample_rollout(model, tokenizer, prompts, 12, 1.0, seeds=list(range(8)))
    with torch.no_grad():
        logits = response_logits(model, *sequences(rollout), rollout.query.shape[1], rollout.response.shape[1])
    fresh = token_logprobs(logits, rollout.response, 1.0) * rollout.response_mask
    assert torch.allclose(fresh, rollout.logprobs, atol=1e-4)
    assert model.generation_config.repetition_penalty == 1.5  # the checkpoint's own config is put back afterwards


def test_eval_log_probs_are_those_of_the_nucleus_that_was_sampled(tiny_model):
    from align.config import ModelSpec
    from align.generation import completion_logprobs, nucleus
    from align.models import load_model

    model = load_model(ModelSpec(path="tiny"), str(tiny_model))
    prompt, completion = [[5, 6, 7]], [[8, 9]]
    full, _ = completion_logprobs(model, prompt, completion, 0, temperature=0.7)
    cut, _ = completion_logprobs(model, prompt, completion, 0, temperature=0.7, top_p=0.9)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8, 9]])).logits[0, 2:4] / 0.7
    probs = torch.softmax(logits, -1)
    assert torch.allclose(full[0], torch.log(probs[[0, 1], [8, 9]]), atol=1e-5)
    # Hand-worked nucleus: the likeliest tokens whose mass reaches 0.9, renormalised.
    for t, token in enumerate([8, 9]):
        ordered, order = probs[t].sort(descending=True)
        kept = order[: int((ordered.cumsum(0) < 0.9).sum()) + 1]
        expected = torch.log(probs[t, token] / probs[t, kept].sum()) if token in kept else torch.tensor(float("-inf"))
        assert torch.isclose(cut[0, t], expected, atol=1e-5) or (expected.isinf() and cut[0, t].isinf())
    assert torch.equal(nucleus(logits, 1.0), logits)


def test_log_probs_use_the_models_own_output_path_with_soft_capping(tmp_path):
    """Gemma 2 caps its final logits: the output layer alone would give other log-probs."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from align.generation import Rollout, response_logits, sequences

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5, max_position_embeddings=64)
    model = Gemma2ForCausalLM(config).eval()
    query, response = torch.tensor([[0, 3, 4], [5, 6, 7]]), torch.tensor([[8, 9], [10, 11]])
    query_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    rollout = Rollout(query, query_mask, response, torch.ones_like(response), torch.zeros(2, 2), torch.zeros(2))
    input_ids, attention_mask, position_ids = sequences(rollout)
    with torch.no_grad():
        ours = response_logits(model, input_ids, attention_mask, position_ids, 3, 2)
        own = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, 2:4]
    assert torch.allclose(ours, own, atol=1e-5)
    assert ours.abs().max() <= 0.5 + 1e-6  # capped


class NoVocabTensorLeaves(torch.overrides.TorchFunctionMode):
    """Records every call that would copy a (B, T, vocab) tensor off its device: .cpu(), .to(a
    device), .numpy(), .tolist(). It sees the call, so it works on a CPU-only machine too."""

    COPIES = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.to}

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.seen = vocab, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func in self.COPIES and tensor is not None and tensor.dim() == 3 and tensor.shape[-1] == self.vocab:
            to_device = func is not torch.Tensor.to or "device" in kwargs or any(
                isinstance(a, (str, torch.device)) for a in args[1:])
            if to_device:
                self.seen.append((func.__name__, tuple(tensor.shape)))
        return func(*args, **kwargs)


def test_no_vocab_sized_tensor_leaves_the_device_in_ppo_scoring_or_updates(align, ppo_prompts, reward_file, tmp_path,
                                                                           monkeypatch, tiny_model):
    from align.stages import ppo

    vocab = AutoModelForCausalLM.from_pretrained(tiny_model).config.vocab_size
    guard = NoVocabTensorLeaves(vocab)
    for name in ("_score_batch", "_update", "_rollout"):
        original = getattr(ppo, name)

        def guarded(*args, _original=original, **kwargs):
            with guard:
                return _original(*args, **kwargs)

        monkeypatch.setattr(ppo, name, guarded)
    for mode in ([], ["--no-lora"]):
        out = tmp_path / f"ppo{len(mode)}"
        result = align("ppo", "-m", "tiny", "-p", ppo_prompts, "-o", out, "--reward-fn", f"{reward_file}:share_of_e",
                       "--episodes", "8", "--batch-size", "8", "--max-new-tokens", "4", "--set", "ppo.entropy_coef=0.01", *mode)
        assert result.code == 0, result.err
    assert guard.seen == []
    with guard:  # the guard itself catches such a copy
        torch.zeros(2, 3, vocab).cpu()
    assert guard.seen == [("cpu", (2, 3, vocab))]


def test_eval_kl_of_a_model_against_itself_is_zero_and_counts_the_nucleus(align, tiny_model, prompts_file, tmp_path):
    kls = {}
    for top_p in ("1.0", "0.5"):
        out = tmp_path / f"eval-{top_p}.json"
        assert align("eval", "-m", "tiny", "--reference", tiny_model, "-p", prompts_file, "-o", out,
                     "--max-new-tokens", "6", "--temperature", "1.0", "--set", f"sampling.top_p={top_p}").code == 0
        kls[top_p] = json.loads(out.read_text())["kl"]
    assert abs(kls["1.0"]) < 1e-6
    # Sampled from the top-half nucleus, the KL to the untruncated model is -log(the nucleus's mass)
    # per token: above 0, and at most log 2 for each of the (at most 6) tokens.
    assert 0.1 < kls["0.5"] <= 6 * math.log(2)


def test_gradient_checkpointing_recomputes_layers_in_ppo_without_changing_the_result(align, ppo_prompts, reward_file,
                                                                                     tmp_path, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaAttention

    calls = []
    real = LlamaAttention.forward
    monkeypatch.setattr(LlamaAttention, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    runs = {}
    for checkpointing in (False, True):
        calls.clear()
        out = tmp_path / f"gc-{checkpointing}"
        result = align("ppo", "-m", "tiny", "-p", ppo_prompts, "-o", out, "--reward-fn", f"{reward_file}:share_of_e",
                       "--episodes", "8", "--batch-size", "8", "--max-new-tokens", "4", "--ppo-epochs", "1",
                       "--lr", "1e-3", "--set", f"train.gradient_checkpointing={str(checkpointing).lower()}")
        assert result.code == 0, result.err
        runs[checkpointing] = len(calls), json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    (plain_calls, plain), (checkpointed_calls, checkpointed) = runs[False], runs[True]
    assert checkpointed_calls > plain_calls  # the layers ran again in the backward pass
    for key in ("policy_loss", "value_loss", "approx_kl", "grad_norm"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key
