"""The models PPO needs (policy, reference, value), on one shared base when LoRA is used.

LoRA (default), one frozen base in memory (4-bit with QLoRA):
    policy     = base + adapter "default"
    value      = base + adapter "value" + a scalar head
    reference  = base with adapters disabled
Full fine-tuning (--no-lora): separate policy, frozen reference and value models.
With ppo.value_head_on_policy the value is the policy itself plus the scalar head (no "value"
adapter, no value model): one forward pass gives both the logits and the values.

Besides models.py, the only module that touches peft.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from align.config import LoraSpec, ModelSpec
from align.errors import ModelError
from align.generation import body, unwrapped
from align.models import float32_head, load_model, peft_config, score_layer

POLICY, VALUE, REWARD = "default", "value", "reward"


@dataclass
class Roles:
    policy: nn.Module
    value_head: nn.Linear
    value_model: nn.Module | None  # None: the value is an adapter on the policy's base
    reference: nn.Module | None  # None: the policy with its adapters disabled
    checkpointing: bool = False  # train.gradient_checkpointing: recompute each layer in the backward pass
    value_on_policy: bool = False  # ppo.value_head_on_policy: the head reads the policy's own hidden states

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    @property
    def shared_base(self) -> bool:
        """LoRA: policy, reference (and value, unless on the policy) are adapters on one base."""
        return self.reference is None

    @contextmanager
    def acting(self):
        """The policy, for sampling and for the policy loss."""
        if self.shared_base:
            self.policy.set_adapter(POLICY)
        yield self.policy

    @contextmanager
    def valuing(self):
        """The value function's body (returns hidden states)."""
        if self.value_on_policy:
            with self.acting() as policy:
                yield body(policy)
        elif self.shared_base:
            self.policy.set_adapter(VALUE)
            yield body(self.policy)
            self.policy.set_adapter(POLICY)
        else:
            yield body(self.value_model)

    @contextmanager
    def referencing(self):
        """The frozen reference model."""
        if self.reference is None:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self.reference

    def trainable(self) -> dict[str, nn.Parameter]:
        """Every trained tensor once, by a stable name: both adapters and the head, or the full models.

        Switching adapters flips requires_grad, so the value adapter is found by name, not by flag.
        """
        named: dict[str, nn.Parameter] = {}
        seen: set[int] = set()
        for prefix, module in (("policy.", self.policy), ("value_model.", self.value_model), ("value_head.", self.value_head)):
            for name, param in module.named_parameters() if module is not None else ():
                frozen_base = module is self.policy and not (
                    param.requires_grad or (self.shared_base and f".{VALUE}." in name and "lora_" in name)
                )
                if not frozen_base and id(param) not in seen:
                    seen.add(id(param))
                    named[prefix + name] = param
        return named

    def train(self, mode: bool = True) -> None:
        for module in (self.policy, self.value_model, self.value_head):
            if module is not None:
                module.train(mode)
        if self.checkpointing:
            # transformers recomputes a layer only while that layer is in training mode; PPO keeps
            # every module in eval mode (no dropout: the ratio must be 1 before the first step), so the
            # layer blocks alone are flagged as training, and the dropouts inside them stay off.
            from transformers.modeling_layers import GradientCheckpointingLayer

            for model in self.trained_models():
                for layer in model.modules():
                    if isinstance(layer, GradientCheckpointingLayer):
                        layer.training = True

    def trained_models(self) -> list[nn.Module]:
        return [m for m in (self.policy, self.value_model) if m is not None]

    def checkpoint_gradients(self) -> None:
        """Honour train.gradient_checkpointing: activations of each layer are recomputed in the
        backward pass instead of kept (the frozen reference never runs a backward pass)."""
        for model in self.trained_models():
            unwrapped(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.checkpointing = True


def hidden_size(config, where: str) -> int:
    size = getattr(config, "hidden_size", None) or getattr(getattr(config, "text_config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise ModelError(f"{where}: cannot read the hidden size from its config ({config.__class__.__name__}); "
                         "pass a value model with a standard transformers config (--value-model)")
    return size


def build_roles(spec: ModelSpec, source: str, lora: LoraSpec, value_source: str | None, pad_token_id: int,
                gradient_checkpointing: bool = False, value_on_policy: bool = False) -> Roles:
    """Load the PPO roles; `value_source` is a sequence classifier to initialise the value from, if any
    (with value_on_policy, only its score layer: the head's start).

    The value head is float32 whatever the base's dtype (see models.float32_head)."""
    policy = load_model(spec, source, lora)
    width = hidden_size(policy.config, source)
    if lora.enabled:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if lora.qlora:  # what peft asks of a 4-bit base: float32 norms and embeddings, input grads
            policy = prepare_model_for_kbit_training(policy, use_gradient_checkpointing=False)
        policy = get_peft_model(policy, peft_config(lora), adapter_name=POLICY)
        if not value_on_policy:
            policy.add_adapter(VALUE, peft_config(lora))
            policy.set_adapter(POLICY)
        roles = Roles(policy=policy, value_head=_new_head(value_source, width, policy), value_model=None, reference=None,
                      value_on_policy=value_on_policy)
    elif value_on_policy:
        reference = load_model(spec, source, dtype=policy.dtype).eval().requires_grad_(False)
        roles = Roles(policy=policy, value_head=_new_head(value_source, width, policy), value_model=None, reference=reference,
                      value_on_policy=True)
    else:
        # The reference in the policy's own dtype, so that the two agree exactly before the first step.
        reference = load_model(spec, source, dtype=policy.dtype).eval().requires_grad_(False)
        value_model = load_model(spec, value_source or source, LoraSpec(enabled=False), kind="reward", pad_token_id=pad_token_id)
        if hidden_size(value_model.config, value_source or source) != width:
            raise ModelError(f"{value_source}: hidden size differs from the policy's ({width})")
        head = score_layer(value_model, value_source or source)
        roles = Roles(policy=policy, value_head=head, value_model=value_model, reference=reference)
    if gradient_checkpointing:
        roles.checkpoint_gradients()
    return roles


def _new_head(value_source: str | None, width: int, policy: nn.Module) -> nn.Linear:
    """A float32 value head on the policy's device, started from the reward model's score layer
    when the widths match, else at 0.

    Only that layer is read from the checkpoint: loading the whole reward model again would
    briefly double its memory.
    """
    head = float32_head(nn.Linear(width, 1).to(next(policy.parameters()).device))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    if value_source is None:
        return head
    weight, bias = _read_score_layer(Path(value_source))
    if weight.shape != (1, width):
        raise ModelError(
            f"{value_source}: its score layer is {tuple(weight.shape)}, the policy's width is {width}; the value head "
            "sits on the policy's hidden states (LoRA or --value-head-on-policy), so it can only start from a model of "
            "the same width (or use --no-lora without --value-head-on-policy)"
        )
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if bias is not None:
            head.bias.copy_(bias.float())
    return head


def _read_score_layer(source: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    from safetensors import safe_open

    for file in sorted(source.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names = [k for k in handle.keys() if k.split(".")[-2] in ("score", "classifier") and k.endswith("weight")]
            if names:
                prefix = names[0][: -len("weight")]
                bias = handle.get_tensor(prefix + "bias") if prefix + "bias" in handle.keys() else None
                return handle.get_tensor(names[0]), bias
    raise ModelError(f"{source}: no single-output score layer found in its safetensors files; pass a sequence classifier")


def shared_reward_adapter(reward_path: str, policy_source: str, qlora: bool) -> Path | None:
    """The reward model's LoRA adapter, if it was trained on exactly the policy's base: an
    `align rm` output whose adapter names the same base directory and whose base had the same
    quantization (an adapter trained on a full-precision base scores differently on a 4-bit one)."""
    import json

    adapter = Path(reward_path) / "adapter"
    config = adapter / "adapter_config.json"
    manifest = Path(reward_path) / "align.json"
    if not (config.is_file() and manifest.is_file()):
        return None
    record = json.loads(manifest.read_text())
    if record.get("stage") != "rm":
        return None  # a process reward model (align prm) scores steps: it loads as a model of its own
    base = json.loads(config.read_text()).get("base_model_name_or_path") or ""
    trained_4bit = record.get("config", {}).get("lora", {}).get("qlora", False)
    same = Path(base).exists() and Path(base).resolve() == Path(policy_source).resolve() and trained_4bit == qlora
    return adapter if same else None


class SharedBaseReward:
    """A reward model kept as a third adapter ("reward") on the policy's base, with its score layer.

    It reads the rendered conversation with the policy's tokenizer (the same base, so the same
    tokenizer the reward model was trained with) and scores the last real token.
    """

    def __init__(self, roles: Roles, adapter: Path, tokenizer, batch_size: int = 16):
        from peft import LoraConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        config = LoraConfig.from_pretrained(str(adapter))
        config.task_type, config.modules_to_save = "CAUSAL_LM", None
        roles.policy.add_adapter(REWARD, config)
        weights = load_file(str(adapter / "adapter_model.safetensors"))
        set_peft_model_state_dict(roles.policy, {k: v for k, v in weights.items() if "lora_" in k}, adapter_name=REWARD)
        score = [k for k in weights if ".score." in k and k.endswith("weight")]
        if not score:
            raise ModelError(f"{adapter}: has no score layer; it is not a reward-model adapter")
        self.score = weights[score[0]].float()  # (1, H)
        roles.policy.set_adapter(POLICY)
        self.roles, self.tokenizer, self.batch_size = roles, tokenizer, batch_size
        self.name = str(adapter.parent)

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list[str]) -> torch.Tensor:
        from align.rewards import score_in_batches

        policy = self.roles.policy
        device = next(policy.parameters()).device
        score = self.score.to(device)

        def score_batch(batch) -> torch.Tensor:
            hidden = body(policy)(**batch, use_cache=False).last_hidden_state  # (B, T, H)
            last = last_token_index(batch["input_ids"], self.tokenizer.pad_token_id)
            return (hidden[torch.arange(len(last), device=device), last].float() @ score.T).squeeze(-1)

        policy.set_adapter(REWARD)
        try:
            return score_in_batches(self.tokenizer, prompts, completions, self.batch_size, device, score_batch)
        finally:
            policy.set_adapter(POLICY)


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(B,) the position a sequence classifier scores: the last token that is not padding,
    transformers' rule for *ForSequenceClassification. Where padding falls back to EOS and the
    chat template ends in EOS (Llama-3 style), that is the token before the closing EOS, not the
    last attended position, so every scorer here uses this rule, not the attention mask."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    if pad_token_id is None:
        return torch.full(input_ids.shape[:1], input_ids.shape[-1] - 1, device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def same_vocabulary(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def save_value(roles: Roles, out: Path) -> None:
    """Keep the value function (adapter + head, full model + head, or the head alone when it sits on
    the policy, which is saved as the stage's model) for further training."""
    from safetensors.torch import save_file

    from align import distributed

    if not distributed.is_main():
        return
    out.mkdir(parents=True, exist_ok=True)
    if roles.shared_base and not roles.value_on_policy:
        roles.policy.save_pretrained(out, selected_adapters=[VALUE])
    elif roles.value_model is not None:
        roles.value_model.save_pretrained(out)
    save_file({k: v.detach().cpu().contiguous() for k, v in roles.value_head.state_dict().items()}, out / "value_head.safetensors")
