"""Merge a LoRA/QLoRA adapter into a standalone checkpoint, verified against the adapter model.

The adapter's task decides what is merged: a policy's (CAUSAL_LM) into a causal LM, a reward
model's (SEQ_CLS) into a sequence classifier, a process reward model's (TOKEN_CLS) into a token
classifier, each with the head the adapter trained; the stage output's reading of the model (a
PRM's step separator) is carried into the manifest, and `base_model` names the model the adapter
was trained on, so `align eval` compares with it by default.

Verification: the merged model's logits on a few inputs must match the base+adapter model's
(in float32) within `max_abs_diff`; the measured difference goes into the manifest.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from align import hub
from align.checkpoints import prepare_output, read_manifest, write_manifest
from align.config import MergeConfig, ModelSpec
from align.errors import ModelError, OutputError
from align.models import load_model, load_tokenizer, resolve_model

log = logging.getLogger("align")
PROBES = ["Hello! How are you today?", "Write one sentence about the sea.", "2 + 2 ="]
KINDS = {"SEQ_CLS": "reward", "TOKEN_CLS": "process"}  # peft's task type -> load_model's kind; else causal
READING = ("step_separator", "last_step_only")  # what a stage output's manifest says about reading its model


def run(config: MergeConfig) -> Path:
    out, started = Path(config.output), time.time()
    adapter_dir = _adapter_dir(Path(config.model.path))
    adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
    base_source = resolve_model(ModelSpec(path=config.base or _adapter_base(adapter, adapter_dir)))
    stage = read_manifest(adapter_dir.parent if adapter_dir.name == "adapter" else adapter_dir) or {}
    if config.push_to_hub and not hub.reachable():
        raise OutputError(f"--push-to-hub {config.push_to_hub}: the Hugging Face Hub is unreachable from this machine; "
                          "merge without it and upload the folder later")
    prepare_output(out, resume=False, overwrite=config.overwrite)
    from peft import PeftModel

    tokenizer = load_tokenizer(config.model, str(adapter_dir) if (adapter_dir / "tokenizer_config.json").exists() else base_source)
    kind = KINDS.get(adapter.get("task_type"), "causal")
    # On the host, in float32, as a stage merges its own adapter: no GPU memory, no 16-bit rounding of the deltas.
    base = load_model(ModelSpec(path=base_source, dtype="float32"), base_source, kind=kind, pad_token_id=tokenizer.pad_token_id,
                      device="cpu")
    adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
    probes = tokenizer(PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = adapted(**probes).logits
        merged = adapted.merge_and_unload().eval()
        difference = (merged(**probes).logits - expected).abs().max().item()
    if difference > config.max_abs_diff:
        raise ModelError(f"merged model's logits differ from the adapter model's by {difference:.2e} (> {config.max_abs_diff}); not saved")
    merged = merged.to(getattr(torch, config.dtype))
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if config.push_to_hub:
        merged.push_to_hub(config.push_to_hub)
        tokenizer.push_to_hub(config.push_to_hub)
    log.info("merge: %s + %s -> %s (max logit difference %.2e)", base_source, adapter_dir, out, difference)
    write_manifest(out, config=config, metrics={"max_abs_logit_diff": difference}, started=started, adapter=str(adapter_dir),
                   base_model=config.base or stage.get("base_model") or _adapter_base(adapter, adapter_dir), kind=kind,
                   **{key: stage[key] for key in READING if key in stage})
    return out


def _adapter_dir(path: Path) -> Path:
    if not path.exists():
        raise ModelError(f"{path}: not found; pass a stage output with adapter/ or an adapter directory")
    for candidate in (path / "adapter", path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ModelError(f"{path}: no LoRA adapter here (no adapter_config.json in it or in {path / 'adapter'}); "
                     "full fine-tuning outputs are standalone already")


def _adapter_base(adapter: dict, adapter_dir: Path) -> str:
    """The base model an adapter config (adapter_dir's adapter_config.json) names."""
    base = adapter.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{adapter_dir}: the adapter does not name its base model; pass --base")
    return base
