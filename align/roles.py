"""The models PPO needs (policy, reference, value), on one shared base when LoRA is used.

LoRA (default), one frozen base in memory (4-bit with QLoRA):
    policy     = base + adapter "default"
    value      = base + adapter "value" + a scalar head
    reference  = base with adapters disabled
Full fine-tuning (--no-lora): separate policy, frozen reference and value models.

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
from align.generation import body
from align.models import load_model, peft_config

POLICY, VALUE = "default", "value"


@dataclass
class Roles:
    policy: nn.Module
    value_head: nn.Linear
    value_model: nn.Module | None  # None: the value is an adapter on the policy's base
    reference: nn.Module | None  # None: the policy with its adapters disabled

    @property
    def shared_base(self) -> bool:
        return self.value_model is None

    @contextmanager
    def acting(self):
        """The policy, for sampling and for the policy loss."""
        if self.shared_base:
            self.policy.set_adapter(POLICY)
        yield self.policy

    @contextmanager
    def valuing(self):
        """The value function's body (returns hidden states)."""
        if self.shared_base:
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


def hidden_size(config, where: str) -> int:
    size = getattr(config, "hidden_size", None) or getattr(getattr(config, "text_config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise ModelError(f"{where}: cannot read the hidden size from its config ({config.__class__.__name__}); "
                         "pass a value model with a standard transformers config (--value-model)")
    return size


def build_roles(spec: ModelSpec, source: str, lora: LoraSpec, value_source: str | None, pad_token_id: int) -> Roles:
    """Load the PPO roles; `value_source` is a sequence classifier to initialise the value from, if any."""
    policy = load_model(spec, source, lora)
    width = hidden_size(policy.config, source)
    if lora.enabled:
        from peft import get_peft_model

        policy = get_peft_model(policy, peft_config(lora), adapter_name=POLICY)
        policy.add_adapter(VALUE, peft_config(lora))
        policy.set_adapter(POLICY)
        head = nn.Linear(width, 1).to(policy.dtype if not lora.qlora else torch.float32)
        _init_head(head, value_source, spec, pad_token_id, width)
        return Roles(policy=policy, value_head=head, value_model=None, reference=None)
    reference = load_model(spec, source).eval().requires_grad_(False)
    value_model = load_model(spec, value_source or source, kind="reward", pad_token_id=pad_token_id)
    if hidden_size(value_model.config, value_source or source) != width:
        raise ModelError(f"{value_source}: hidden size differs from the policy's ({width})")
    head = _score_layer(value_model)
    return Roles(policy=policy, value_head=head, value_model=value_model, reference=reference)


def _score_layer(classifier: nn.Module) -> nn.Linear:
    head = getattr(classifier, "score", None) or getattr(classifier, "classifier", None)
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise ModelError("the value model must be a sequence classifier with a single linear score layer")
    return head


def _init_head(head: nn.Linear, value_source: str | None, spec: ModelSpec, pad_token_id: int, width: int) -> None:
    """Start the value head from the reward model's score layer when the widths match, else at 0.

    Only that layer is read from the checkpoint: loading the whole reward model again would
    briefly double its memory.
    """
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    if value_source is None:
        return
    weight, bias = _read_score_layer(Path(value_source))
    if weight.shape != (1, width):
        raise ModelError(
            f"{value_source}: its score layer is {tuple(weight.shape)}, the policy's width is {width}; with LoRA the "
            "value shares the policy's base, so its head can only start from a model of the same width (or use --no-lora)"
        )
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if bias is not None:
            head.bias.copy_(bias.float())


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


def same_vocabulary(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def save_value(roles: Roles, out: Path) -> None:
    """Keep the value function (adapter + head, or full model) for resuming or further training."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    if roles.shared_base:
        roles.policy.save_pretrained(out, selected_adapters=[VALUE])
    else:
        roles.value_model.save_pretrained(out)
    save_file({k: v.detach().cpu().contiguous() for k, v in roles.value_head.state_dict().items()}, out / "value_head.safetensors")
